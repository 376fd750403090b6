// Text in, streamed text out: sampling, stop conditions and incremental prompts on one sequence
// of an Engine. `kestrel run -p` and `kestrel chat` are thin layers over this.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kestrel/engine.h"
#include "kestrel/text.h"
#include "sample/sampler.h"
#include "sample/stop.h"
#include "tokenizer/tokenizer.h"

namespace kestrel {

// TextGenerationParams and TextGenerationStats are public (kestrel/text.h); TextGenerator there
// is the public face of a TextSession.

// One conversation on sequence slot 0 of `engine`. It remembers which tokens its KV cache holds,
// so a follow-up prompt that extends the previous one (a chat turn) only prefills the new tokens.
class TextSession {
 public:
  TextSession(Engine& engine, const Tokenizer& tokenizer);

  // Runs `prompt_ids` (the whole conversation so far, as tokens) and generates a continuation;
  // `on_text` receives text as soon as it cannot be part of a stop string.
  Result<TextGenerationStats> generate(const std::vector<int32_t>& prompt_ids,
                                       const TextGenerationParams& params,
                                       const TextCallback& on_text);

  // Tokens whose keys and values the cache holds, in order.
  const std::vector<int32_t>& cached_tokens() const { return cached_; }

 private:
  Engine& engine_;
  const Tokenizer& tokenizer_;
  std::vector<int32_t> cached_;
};

}  // namespace kestrel
