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
// From step 3 on, the arithmetic is draw_rules.h's: the probabilities become fixed-point integers
// whose sums are exact, so the CUDA sampler (Backend::pick_rows) draws the same token from the
// same row and uniform number.
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

// exp of each value, for values <= 0 (a sampler's logits less their maximum; 0 below -745.2):
// within 1 ulp of std::exp, in IEEE operations and fmas only (the same bits on every machine
// with IEEE doubles), and about 3x faster than std::exp on a vectorizing compiler. Sampling
// spends most of a row's time here: one exponential a token of a 128k vocabulary.
void exp_in_place(std::span<double> x);

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

  // Whether sample() draws from the row as it is (no penalty, not greedy): a caller may then take
  // next_draw() and have a device draw the token with pick()'s rule (Backend::pick_rows).
  bool draws_from_row() const;
  // The draw sample() would make next, of logit row `row`: this sampler's settings, vocabulary
  // and the uniform number its generator gives next (consumed).
  RowDraw next_draw(int32_t row);

  // Whether settings (normalized) take the argmax: temperature 0 or top_k 1.
  static bool is_greedy(const SamplingParams& params);

  // Steps 3-7 of `params` (penalties are not applied) on `logits` [>= vocab_size used] with the
  // draw's uniform number `u` given: the token sample() returns when its generator gives `u`.
  // The arithmetic is draw_rules.h's, which the CUDA sampler shares, so a device's token is
  // this one.
  static int32_t pick(std::span<const float> logits, const SamplingParams& params,
                      int32_t vocab_size, double u);

  // `params` with out-of-range settings moved to the nearest well-defined behaviour (what a
  // Sampler and pick() apply).
  static SamplingParams normalized(SamplingParams params);

  // Step 1 in place on `logits` [vocab_size].
  void apply_penalties(std::span<float> logits, std::span<const int32_t> history);

  const SamplingParams& params() const { return params_; }
  int32_t vocab_size() const { return vocab_size_; }

 private:
  static constexpr int kNucleusDigitBits = 11;
  // Top-k of at most this many selects with a heap of k, larger ones with nth_element.
  static constexpr size_t kTopKHeap = 1024;
  static constexpr size_t kNucleusSortBelow = 64;
  // The fixed-point probabilities (draw_rules.h) are at most 2^40: four digits from bit 44.
  static constexpr int kNucleusTopBit = 44;
  // A call's working arrays: one set a thread, shared by its samplers (a server samples a row
  // of every slot on a pool of threads; each slot's own arrays would not stay in cache).
  struct Scratch {
    std::vector<float> work;       // [vocab_size] penalized logits
    std::vector<float> cand_keys;  // the candidates' keys (draw_rules.h: logit_key)
    std::vector<uint64_t> q;       // the candidates' fixed-point probabilities (draw_rules.h)
    std::vector<int32_t> ids;      // the candidates' token ids
    std::vector<float> keys;       // top-k's selection
    std::vector<uint32_t> order;   // nucleus: candidates not decided yet
    std::vector<uint8_t> keep;     // nucleus: candidates kept
    std::vector<uint32_t> bucket_count = std::vector<uint32_t>(size_t(1) << kNucleusDigitBits);
    std::vector<uint64_t> bucket_mass = std::vector<uint64_t>(size_t(1) << kNucleusDigitBits);
  };
  static Scratch& scratch();
  bool has_penalties() const;
  // Penalized logits of the first vocab_size entries into t.work; returns their count.
  size_t prepare(Scratch& t, std::span<const float> logits, std::span<const int32_t> history);
  static int32_t argmax(const float* logits, size_t n);
  // Steps 3-6 of `p` on logits[0, n): fills t.ids with the candidates (in id order) and t.q with
  // their fixed-point probabilities (draw_rules.h); returns their sum (0: no candidate).
  static uint64_t filter(Scratch& t, const float* logits, size_t n, const SamplingParams& p);
  static uint64_t sum(std::span<const uint64_t> values);
  // Step 7: the candidate whose running mass, in id order, first passes u * total.
  static int32_t draw(const Scratch& t, uint64_t total, double u);
  // Steps 2-7 of `p` (normalized) on logits[0, n), u the draw's number.
  static int32_t pick_from(Scratch& t, const float* logits, size_t n, const SamplingParams& p,
                           double u);
  // Step 5: keeps the candidates most probable first (ties: lower id) while the mass before each
  // is below `target`, at least one, in id order. An MSD radix select on the fixed-point
  // probabilities' bits: each level buckets the undecided tokens by
  // kNucleusDigitBits more bits, keeps the buckets above the one where the mass reaches the
  // target and goes down into that one, and the last few are sorted: a few passes over the
  // candidates however many the nucleus holds (a flat distribution's, nearly all of them, cost
  // repeated partial sorts of the vocabulary, ~30 ms a token on a 128k one).
  static void nucleus(Scratch& t, uint64_t target);

  SamplingParams params_;
  int32_t vocab_size_;
  SamplingRng rng_;
  std::vector<uint32_t> seen_;  // [vocab_size] stamp of the last call that saw the token
  uint32_t stamp_ = 0;
};

}  // namespace kestrel
