// Sampling parameters and why generation stopped: plain types of the public text API
// (kestrel/text.h). The order in which the parameters apply is that of Hugging Face
// transformers; src/sample/sampler.h spells it out.
#pragma once

#include <cstdint>

namespace kestrel {

struct SamplingParams {
  float temperature = 0.0f;         // 0: greedy
  int top_k = 0;                    // 0: off
  float top_p = 1.0f;               // 1: off
  float min_p = 0.0f;               // 0: off
  float repetition_penalty = 1.0f;  // 1: off
  float presence_penalty = 0.0f;    // 0: off
  float frequency_penalty = 0.0f;   // 0: off; subtracted once per earlier occurrence
  uint64_t seed = 0;
};

// A logit row whose token is drawn on the backend's device rather than taken at its argmax
// (Engine::run_argmax with draws): the settings' steps 3-7 (penalties are not applied; the
// temperature is above 0) with the draw's uniform number given, so a seeded request's stream
// stays the host sampler's (src/sample/sampler.h: Sampler::next_draw and Sampler::pick).
struct RowDraw {
  int32_t row = 0;  // index into the batch's logit rows
  SamplingParams params;
  int32_t vocab_size = 0;  // candidates are the row's first vocab_size logits
  double u = 0;            // uniform in [0, 1)
};

// interrupted: the caller asked generation to stop (Ctrl-C in a chat).
enum class StopReason : uint8_t { none, eos, stop_string, max_tokens, interrupted };

// "none", "eos", "stop_string", "max_tokens".
const char* stop_reason_name(StopReason reason);

}  // namespace kestrel
