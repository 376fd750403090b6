// kestrel::TextGenerator (include/kestrel/text.h): the public face of the tokenizer, the chat
// template and a TextSession, so that users need none of their internal headers.
#include <filesystem>
#include <optional>

#include "kestrel/text.h"
#include "runtime/text_generation.h"
#include "template/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kestrel {

struct TextTokenizer::Impl {
  explicit Impl(Tokenizer loaded) : tokenizer(std::move(loaded)) {}

  Tokenizer tokenizer;
  std::optional<ChatTemplateConfig> chat_template;
  Status chat_template_status;  // why there is none
};

TextTokenizer::TextTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TextTokenizer::~TextTokenizer() = default;

Result<std::unique_ptr<TextTokenizer>> TextTokenizer::load(const std::string& path) {
  KS_ASSIGN_OR_RETURN(Tokenizer tokenizer, Tokenizer::load(path));
  auto impl = std::make_unique<Impl>(std::move(tokenizer));
  // A model may have no chat template; only rendering a chat needs one.
  std::error_code ec;
  const std::filesystem::path fs_path = path;
  const std::string dir =
      std::filesystem::is_regular_file(fs_path, ec) ? fs_path.parent_path().string() : path;
  auto chat_template = load_chat_template(dir.empty() ? "." : dir);
  if (chat_template.is_ok()) {
    impl->chat_template = std::move(chat_template).value();
  } else {
    impl->chat_template_status = chat_template.status();
  }
  return std::unique_ptr<TextTokenizer>(new TextTokenizer(std::move(impl)));
}

Result<std::vector<int32_t>> TextTokenizer::encode(const std::string& text,
                                                   bool add_special_tokens) const {
  return impl_->tokenizer.encode(text, add_special_tokens);
}

std::string TextTokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  return impl_->tokenizer.decode(ids, skip_special_tokens);
}

int32_t TextTokenizer::token_to_id(const std::string& token) const {
  return impl_->tokenizer.token_to_id(token);
}

std::string TextTokenizer::id_to_token(int32_t id) const {
  return impl_->tokenizer.id_to_token(id);
}

size_t TextTokenizer::vocab_size() const {
  return impl_->tokenizer.vocab_size();
}

bool TextTokenizer::is_special(int32_t id) const {
  return impl_->tokenizer.is_special(id);
}

bool TextTokenizer::has_chat_template() const {
  return impl_->chat_template.has_value();
}

Result<std::string> TextTokenizer::render_chat(const std::vector<ChatMessage>& messages,
                                               bool add_generation_prompt) const {
  if (!impl_->chat_template) return impl_->chat_template_status;
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (const ChatMessage& m : messages) list.push_back({{"role", m.role}, {"content", m.content}});
  return render_chat_template(*impl_->chat_template, list, add_generation_prompt);
}

Result<std::string> TextTokenizer::render_chat_json(const std::string& messages_json,
                                                    bool add_generation_prompt,
                                                    const std::string& extra_context_json) const {
  if (!impl_->chat_template) return impl_->chat_template_status;
  auto messages = nlohmann::ordered_json::parse(messages_json, nullptr, false);
  if (messages.is_discarded() || !messages.is_array()) {
    return Status::error("chat messages must be a JSON array of objects");
  }
  for (const auto& m : messages) {
    if (!m.is_object()) return Status::error("chat messages must be a JSON array of objects");
  }
  auto extra = nlohmann::ordered_json::parse(extra_context_json, nullptr, false);
  if (extra.is_discarded() || !extra.is_object()) {
    return Status::error("chat template variables must be a JSON object");
  }
  return render_chat_template(*impl_->chat_template, messages, add_generation_prompt, extra);
}

struct TextGenerator::Impl {
  Impl(Engine& engine, std::unique_ptr<TextTokenizer> loaded, const Tokenizer& tokenizer)
      : text(std::move(loaded)), session(engine, tokenizer) {}

  std::unique_ptr<TextTokenizer> text;
  TextSession session;  // holds a reference to text's tokenizer, which never moves
};

TextGenerator::TextGenerator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TextGenerator::~TextGenerator() = default;

Result<std::unique_ptr<TextGenerator>> TextGenerator::create(Engine& engine,
                                                             const std::string& tokenizer_path) {
  KS_ASSIGN_OR_RETURN(std::unique_ptr<TextTokenizer> text, TextTokenizer::load(tokenizer_path));
  const Tokenizer& tokenizer = text->impl_->tokenizer;
  return std::unique_ptr<TextGenerator>(
      new TextGenerator(std::make_unique<Impl>(engine, std::move(text), tokenizer)));
}

Result<std::vector<int32_t>> TextGenerator::encode(const std::string& text,
                                                   bool add_special_tokens) const {
  return impl_->text->encode(text, add_special_tokens);
}

std::string TextGenerator::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  return impl_->text->decode(ids, skip_special_tokens);
}

Result<std::string> TextGenerator::render_chat(const std::vector<ChatMessage>& messages,
                                               bool add_generation_prompt) const {
  return impl_->text->render_chat(messages, add_generation_prompt);
}

Result<TextGenerationStats> TextGenerator::generate(const std::string& prompt,
                                                    const TextGenerationParams& params,
                                                    const TextCallback& on_text) {
  KS_ASSIGN_OR_RETURN(std::vector<int32_t> ids, impl_->text->encode(prompt, true));
  return generate(ids, params, on_text);
}

Result<TextGenerationStats> TextGenerator::generate(const std::vector<int32_t>& prompt_ids,
                                                    const TextGenerationParams& params,
                                                    const TextCallback& on_text) {
  return impl_->session.generate(prompt_ids, params, on_text);
}

Result<TextGenerationStats> TextGenerator::chat(const std::vector<ChatMessage>& messages,
                                                const TextGenerationParams& params,
                                                const TextCallback& on_text) {
  KS_ASSIGN_OR_RETURN(std::string rendered, render_chat(messages, true));
  // The template writes the special tokens itself, as `kestrel chat` and transformers do.
  KS_ASSIGN_OR_RETURN(std::vector<int32_t> ids, impl_->text->encode(rendered, false));
  return impl_->session.generate(ids, params, on_text);
}

}  // namespace kestrel
