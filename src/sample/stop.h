// When generation stops, and how much generated text is safe to stream.
//
// Generation stops at an end-of-sequence token (any of generation_config.json's eos_token_id),
// when the decoded text contains a stop string (matched across token boundaries; the stop string
// and anything after it are not part of the output, as in OpenAI-style APIs), or after
// max_new_tokens. Before min_new_tokens tokens, end-of-sequence tokens are suppressed (their
// logits set to -inf, as transformers' MinNewTokensLengthLogitsProcessor does) and stop strings
// ending in the text of those tokens do not count.
//
// Streaming: text that ends with the beginning of a stop string is held back until the next
// tokens show whether the stop string completes; take_ready_text() returns only what can no
// longer become part of one.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kestrel/sampling.h"

namespace kestrel {

struct StopConditions {
  std::vector<int32_t> eos_ids;
  std::vector<std::string> stop_strings;  // empty strings are ignored
  int64_t max_new_tokens = -1;            // < 0: no limit
  int64_t min_new_tokens = 0;
};

// StopReason and stop_reason_name() are public (kestrel/sampling.h).

class StopChecker {
 public:
  explicit StopChecker(StopConditions conditions);

  // Before sampling the next token: sets the eos logits [vocab] to -inf while fewer than
  // min_new_tokens tokens have been generated.
  void suppress_eos(std::span<float> logits) const;
  // Whether suppress_eos would change a row now.
  bool suppresses_eos() const;

  // Records a generated token and the text it decoded to (possibly empty while a UTF-8
  // character is incomplete); returns why generation must stop now, or none. An eos token's
  // text is not added to the output.
  StopReason add(int32_t token, std::string_view text);

  // No token may be generated (max_new_tokens reached, or a stop already happened).
  bool done() const;
  StopReason reason() const { return reason_; }
  int64_t generated_tokens() const { return generated_; }

  // Output text so far (after a stop string matched: the text before it).
  const std::string& text() const { return text_; }
  // Output text not returned yet, minus what is held back; advances the stream position.
  std::string take_ready_text();
  // Bytes at the end of text() held back because they begin a stop string.
  size_t held_back_bytes() const;
  // After generation ends: everything not returned yet, the held-back tail included (it can no
  // longer become a stop string).
  std::string take_remaining_text();

 private:
  StopConditions conditions_;
  size_t longest_stop_ = 0;
  std::string text_;
  size_t streamed_ = 0;     // bytes of text_ returned by take_*
  size_t searched_to_ = 0;  // stop strings ending at or before this were searched for
  int64_t generated_ = 0;
  StopReason reason_ = StopReason::none;
};

}  // namespace kestrel
