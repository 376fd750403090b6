// The text path of the public API: a model's tokenizer and chat template, sampling, and a
// streaming generate with stop conditions, on top of an Engine.
//
//   auto engine = kestrel::Engine::create(options);
//   auto text = kestrel::TextGenerator::create(**engine, "/models/qwen2-1.5b");
//   kestrel::TextGenerationParams params;
//   params.sampling.temperature = 0.7f;
//   params.stop_strings = {"\n\n"};
//   auto stats = (*text)->chat({{"user", "Hello!"}}, params,
//                              [](const std::string& piece) { std::fputs(piece.c_str(), stdout);
//                              });
//
// Thread safety: a TextGenerator runs its Engine (sequence slot 0) and follows the Engine's
// rule: one thread at a time, and no other use of that Engine while it generates. encode(),
// decode() and render_chat() only read, and may run on several threads at once.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kestrel/engine.h"
#include "kestrel/sampling.h"
#include "kestrel/status.h"

namespace kestrel {

struct TextGenerationParams {
  SamplingParams sampling;
  int64_t max_new_tokens = 128;
  int64_t min_new_tokens = 0;             // end-of-sequence tokens are suppressed before this many
  std::vector<std::string> stop_strings;  // matched across tokens; not part of the output
  bool stop_at_eos = true;                // eos ids from generation_config.json
  // Set by another thread or a signal handler (Ctrl-C): generation stops after the current token.
  const std::atomic<bool>* interrupt = nullptr;
};

struct TextGenerationStats {
  int64_t prompt_tokens = 0;  // tokens prefilled by this call (after the reused prefix)
  int64_t reused_tokens = 0;  // tokens whose KV cache entries were reused
  int64_t generated_tokens = 0;
  double prefill_seconds = 0;  // prefill through the first token's logits
  double decode_seconds = 0;   // later steps
  StopReason stop_reason = StopReason::none;
  std::string text;             // the generated text (stop string excluded)
  std::vector<int32_t> tokens;  // every generated id; the last is not in the cache
};

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

// Receives generated text as soon as it can no longer turn out to be part of a stop string.
using TextCallback = std::function<void(const std::string& text)>;

// A model's tokenizer and chat template without an Engine (what AutoTokenizer
// is in transformers). Every method only reads: one TextTokenizer may be used from several threads
// at once.
class TextTokenizer {
 public:
  // `path`: a model directory (tokenizer.json; the chat template from chat_template.jinja or
  // tokenizer_config.json, when it has one) or a tokenizer.json file (the template is looked
  // for beside it).
  static Result<std::unique_ptr<TextTokenizer>> load(const std::string& path);
  ~TextTokenizer();
  TextTokenizer(const TextTokenizer&) = delete;
  TextTokenizer& operator=(const TextTokenizer&) = delete;

  // As Hugging Face tokenizers' encode/decode (see TextGenerator).
  Result<std::vector<int32_t>> encode(const std::string& text, bool add_special_tokens) const;
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;
  // The id of a token as HF spells it ("<|im_end|>", "Ġthe"), or -1.
  int32_t token_to_id(const std::string& token) const;
  // The token of `id` as HF spells it, or "" when there is none.
  std::string id_to_token(int32_t id) const;
  size_t vocab_size() const;  // added tokens included
  bool is_special(int32_t id) const;

  bool has_chat_template() const;
  Result<std::string> render_chat(const std::vector<ChatMessage>& messages,
                                  bool add_generation_prompt) const;
  // The same with the messages as a JSON array text (any fields the template reads: tool calls,
  // ...) and `extra_context_json`, a JSON object of further template variables (tools,
  // enable_thinking, ...), as transformers' apply_chat_template takes them.
  Result<std::string> render_chat_json(const std::string& messages_json, bool add_generation_prompt,
                                       const std::string& extra_context_json = "{}") const;

 private:
  friend class TextGenerator;
  struct Impl;
  explicit TextTokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class TextGenerator {
 public:
  // Loads the tokenizer (tokenizer.json) and, when there is one, the chat template
  // (chat_template.jinja or tokenizer_config.json) from `tokenizer_path`: a model directory or a
  // tokenizer.json file. `engine` must outlive the generator.
  static Result<std::unique_ptr<TextGenerator>> create(Engine& engine,
                                                       const std::string& tokenizer_path);
  ~TextGenerator();
  TextGenerator(const TextGenerator&) = delete;
  TextGenerator& operator=(const TextGenerator&) = delete;

  Result<std::vector<int32_t>> encode(const std::string& text, bool add_special_tokens) const;
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;

  // The conversation as the model's chat template renders it (an error when it has none).
  Result<std::string> render_chat(const std::vector<ChatMessage>& messages,
                                  bool add_generation_prompt) const;

  // Continues `prompt` (encoded with the tokenizer's special tokens, e.g. a leading bos).
  Result<TextGenerationStats> generate(const std::string& prompt,
                                       const TextGenerationParams& params,
                                       const TextCallback& on_text = {});
  // Continues `prompt_ids` as they are.
  Result<TextGenerationStats> generate(const std::vector<int32_t>& prompt_ids,
                                       const TextGenerationParams& params,
                                       const TextCallback& on_text = {});
  // The assistant's reply to `messages`, rendered with the chat template. A conversation that
  // extends the previous call's (the next turn) prefills only its new tokens.
  Result<TextGenerationStats> chat(const std::vector<ChatMessage>& messages,
                                   const TextGenerationParams& params,
                                   const TextCallback& on_text = {});

 private:
  struct Impl;
  explicit TextGenerator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kestrel
