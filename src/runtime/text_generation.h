// Text in, streamed text out: sampling, stop conditions and incremental prompts on one sequence
// of an Engine. `kestrel run -p` and `kestrel chat` are thin layers over this.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kestrel/engine.h"
#include "sample/sampler.h"
#include "sample/stop.h"
#include "tokenizer/tokenizer.h"

namespace kestrel {

struct TextGenerationParams {
  SamplingParams sampling;
  int64_t max_new_tokens = 128;
  int64_t min_new_tokens = 0;
  std::vector<std::string> stop_strings;
  bool stop_at_eos = true;  // eos ids from generation_config.json
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

// One conversation on sequence slot 0 of `engine`. It remembers which tokens its KV cache holds,
// so a follow-up prompt that extends the previous one (a chat turn) only prefills the new tokens.
class TextSession {
 public:
  TextSession(Engine& engine, const Tokenizer& tokenizer);

  // Runs `prompt_ids` (the whole conversation so far, as tokens) and generates a continuation;
  // `on_text` receives text as soon as it cannot be part of a stop string.
  Result<TextGenerationStats> generate(const std::vector<int32_t>& prompt_ids,
                                       const TextGenerationParams& params,
                                       const std::function<void(const std::string&)>& on_text);

  // Tokens whose keys and values the cache holds, in order.
  const std::vector<int32_t>& cached_tokens() const { return cached_; }

 private:
  Engine& engine_;
  const Tokenizer& tokenizer_;
  std::vector<int32_t> cached_;
};

}  // namespace kestrel
