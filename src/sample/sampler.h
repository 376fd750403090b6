// Token sampling: greedy, temperature, top-k, top-p, min-p, repetition and presence penalties,
// with a seeded generator that gives the same tokens for the same seed on every platform.
//
// Order, as in Hugging Face transformers (logits processors first, then its warpers in the order
// generate() builds them):
//   1. penalties  repetition_penalty (HF): for each distinct token in `history`, a logit l
//                 becomes l / p when l > 0, else l * p; presence_penalty (OpenAI): subtract it
//                 once from the logit of each distinct token in `history`; frequency_penalty
//                 (OpenAI): subtract it once per occurrence of a token in `history`;
//   2. greedy     temperature == 0 (or top_k == 1): the highest logit, lowest id on ties;
//   3. temperature  l / T;
//   4. top-k      keep the k highest logits and every logit tied with the k-th (as HF does);
//   5. top-p      keep the most probable tokens until the probability of the tokens before the
//                 next one reaches p (HF: drop tokens whose ascending cumulative probability is
//                 <= 1 - p), at least one;
//   6. min-p      drop tokens whose probability is below min_p times the most probable one's;
//   7. draw       one token from the renormalized probabilities.
// NaN logits are never picked (greedy: core/argmax.h's rule; otherwise they are dropped as -inf
// is). Only the first `vocab_size` logits are candidates, so rows of a
// padded lm_head beyond the tokenizer's vocabulary can be excluded.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "core/status.h"
#include "kestrel/sampling.h"

namespace kestrel {

// SamplingParams is public (kestrel/sampling.h).

// Rejects values no sampler accepts (negative temperature, top_p outside (0, 1], ...), naming
// the parameter.
Status validate_sampling_params(const SamplingParams& params);

// xoshiro256** seeded through splitmix64: fixed, portable arithmetic, so a seed gives the same
// stream everywhere (unlike the standard library's distributions).
class SamplingRng {
 public:
  explicit SamplingRng(uint64_t seed);
  uint64_t next();
  // Uniform in [0, 1), from the top 53 bits.
  double uniform();

 private:
  uint64_t s_[4];
};

class Sampler {
 public:
  // `params` should have passed validate_sampling_params; out-of-range values are clamped to the
  // nearest meaningful behaviour rather than misbehaving.
  Sampler(const SamplingParams& params, int32_t vocab_size);

  // Picks the next token from `logits` [>= vocab_size used: the first vocab_size] given the
  // tokens seen so far (`history`: prompt and generated, for the penalties).
  int32_t sample(std::span<const float> logits, std::span<const int32_t> history);

  // Steps 1-6 without the draw: the tokens sample() can return with their probabilities, most
  // probable first (ties by id). Greedy settings give the one chosen token with probability 1.
  std::vector<std::pair<int32_t, double>> distribution(std::span<const float> logits,
                                                       std::span<const int32_t> history);

  // Whether sample() picks the argmax of the row as it is (core/argmax.h), whatever the
  // history: greedy settings with no penalty. A caller may then pick it without the row, from a
  // device's argmax.
  bool picks_argmax() const;

  // Step 1 in place on `logits` [vocab_size].
  void apply_penalties(std::span<float> logits, std::span<const int32_t> history);

  const SamplingParams& params() const { return params_; }
  int32_t vocab_size() const { return vocab_size_; }

 private:
  struct Candidate {
    double logit;
    int32_t id;
  };
  bool greedy() const;
  // Penalized logits of the first vocab_size entries into work_; returns their count.
  size_t prepare(std::span<const float> logits, std::span<const int32_t> history);
  int32_t argmax(size_t n) const;
  // Steps 3-6 on work_[0, n): fills candidates_ (in id order) with unnormalized
  // probabilities; returns their sum.
  double filter(size_t n);
  // Step 5: keeps the candidates most probable first (ties: lower id) while the mass before each
  // is below `target`, at least one, in id order. An MSD radix select on the probabilities' bits
  // (a positive double orders as its bit pattern): each level buckets the undecided tokens by
  // kNucleusDigitBits more bits, keeps the buckets above the one where the mass reaches the
  // target and goes down into that one, and the last few are sorted: a few passes over the
  // candidates however many the nucleus holds (a flat distribution's, nearly all of them, cost
  // repeated partial sorts of the vocabulary, ~30 ms a token on a 128k one).
  void nucleus(double target);
  static constexpr int kNucleusDigitBits = 11;
  // Top-k of at most this many selects with a heap of k, larger ones with nth_element.
  static constexpr size_t kTopKHeap = 1024;
  static constexpr size_t kNucleusSortBelow = 64;

  SamplingParams params_;
  int32_t vocab_size_;
  SamplingRng rng_;
  std::vector<float> work_;     // [vocab_size] penalized logits
  std::vector<uint32_t> seen_;  // [vocab_size] stamp of the last call that saw the token
  uint32_t stamp_ = 0;
  std::vector<Candidate> candidates_;  // logit holds the unnormalized probability after filter()
  std::vector<float> keys_;            // top-k's selection
  std::vector<uint32_t> order_;        // nucleus: candidates not decided yet
  std::vector<uint8_t> keep_;          // nucleus: candidates kept
  std::vector<uint32_t> bucket_count_ = std::vector<uint32_t>(size_t(1) << kNucleusDigitBits);
  std::vector<double> bucket_mass_ = std::vector<double>(size_t(1) << kNucleusDigitBits);
};

}  // namespace kestrel
