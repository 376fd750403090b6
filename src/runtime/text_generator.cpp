// kestrel::TextGenerator (include/kestrel/text.h): the public face of the tokenizer, the chat
// template and a TextSession, so that users need none of their internal headers.
#include <filesystem>
#include <optional>

#include "kestrel/text.h"
#include "runtime/text_generation.h"
#include "template/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kestrel {

struct TextGenerator::Impl {
  Impl(Engine& engine, Tokenizer loaded)
      : tokenizer(std::move(loaded)), session(engine, tokenizer) {}

  Tokenizer tokenizer;
  TextSession session;  // holds a reference to `tokenizer`: Impl never moves
  std::optional<ChatTemplateConfig> chat_template;
  Status chat_template_status;  // why there is none
};

TextGenerator::TextGenerator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TextGenerator::~TextGenerator() = default;

Result<std::unique_ptr<TextGenerator>> TextGenerator::create(Engine& engine,
                                                             const std::string& tokenizer_path) {
  KS_ASSIGN_OR_RETURN(Tokenizer tokenizer, Tokenizer::load(tokenizer_path));
  auto impl = std::make_unique<Impl>(engine, std::move(tokenizer));
  // A model may have no chat template; only chat() and render_chat() need one.
  std::error_code ec;
  const std::filesystem::path path = tokenizer_path;
  const std::string dir =
      std::filesystem::is_regular_file(path, ec) ? path.parent_path().string() : tokenizer_path;
  auto chat_template = load_chat_template(dir.empty() ? "." : dir);
  if (chat_template.is_ok()) {
    impl->chat_template = std::move(chat_template).value();
  } else {
    impl->chat_template_status = chat_template.status();
  }
  return std::unique_ptr<TextGenerator>(new TextGenerator(std::move(impl)));
}

Result<std::vector<int32_t>> TextGenerator::encode(const std::string& text,
                                                   bool add_special_tokens) const {
  return impl_->tokenizer.encode(text, add_special_tokens);
}

std::string TextGenerator::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  return impl_->tokenizer.decode(ids, skip_special_tokens);
}

Result<std::string> TextGenerator::render_chat(const std::vector<ChatMessage>& messages,
                                               bool add_generation_prompt) const {
  if (!impl_->chat_template) return impl_->chat_template_status;
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (const ChatMessage& m : messages) list.push_back({{"role", m.role}, {"content", m.content}});
  return render_chat_template(*impl_->chat_template, list, add_generation_prompt);
}

Result<TextGenerationStats> TextGenerator::generate(const std::string& prompt,
                                                    const TextGenerationParams& params,
                                                    const TextCallback& on_text) {
  KS_ASSIGN_OR_RETURN(std::vector<int32_t> ids, impl_->tokenizer.encode(prompt, true));
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
  KS_ASSIGN_OR_RETURN(std::vector<int32_t> ids, impl_->tokenizer.encode(rendered, false));
  return impl_->session.generate(ids, params, on_text);
}

}  // namespace kestrel
