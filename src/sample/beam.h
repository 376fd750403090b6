// Beam search over the logits of a forward call: which hypotheses survive a step, and which KV
// cache slot each one keeps. The engine runs the model; this decides what to keep.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "core/status.h"

namespace kestrel {

// One hypothesis of beam search, or the one sequence of a greedy copy.
struct Beam {
  int32_t slot = 0;
  double score = 0;  // sum of log-probabilities of `tokens`
  std::vector<int32_t> tokens;
};

// Copies a sequence's KV cache from slot `src` into slot `dst` (a forked beam's new slot).
using CopySlot = std::function<Status(int32_t src, int32_t dst)>;

// One beam search step of one copy: `rows` holds the logits of each live beam ([live, vocab]).
// Keeps the `n_beams` best extensions over all beams (ties: lower parent, then lower token), best
// first. A parent's first child inherits its cache slot; further children get a slot no survivor
// holds, filled from the parent's by `copy_slot`.
Status advance_beams(std::vector<Beam>& live, const float* rows, int64_t vocab, int64_t n_beams,
                     int32_t first_slot, const CopySlot& copy_slot);

}  // namespace kestrel
