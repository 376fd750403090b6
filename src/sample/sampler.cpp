#include "sample/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <string>

#include "core/argmax.h"

namespace kestrel {
namespace {

std::string number(float v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  return buf;
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t rotl(uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

}  // namespace

Status validate_sampling_params(const SamplingParams& p) {
  if (!std::isfinite(p.temperature) || p.temperature < 0) {
    return Status::error("temperature must be a number >= 0 (got " + number(p.temperature) + ")");
  }
  if (p.top_k < 0) return Status::error("top_k must be >= 0 (got " + std::to_string(p.top_k) + ")");
  if (!std::isfinite(p.top_p) || p.top_p <= 0 || p.top_p > 1) {
    return Status::error("top_p must be in (0, 1] (got " + number(p.top_p) + ")");
  }
  if (!std::isfinite(p.min_p) || p.min_p < 0 || p.min_p > 1) {
    return Status::error("min_p must be in [0, 1] (got " + number(p.min_p) + ")");
  }
  if (!std::isfinite(p.repetition_penalty) || p.repetition_penalty <= 0) {
    return Status::error("repetition_penalty must be > 0 (got " + number(p.repetition_penalty) +
                         ")");
  }
  if (!std::isfinite(p.presence_penalty)) {
    return Status::error("presence_penalty must be a finite number");
  }
  if (!std::isfinite(p.frequency_penalty)) {
    return Status::error("frequency_penalty must be a finite number");
  }
  return Status::ok();
}

SamplingRng::SamplingRng(uint64_t seed) {
  uint64_t state = seed;
  for (uint64_t& s : s_) s = splitmix64(state);
}

uint64_t SamplingRng::next() {
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double SamplingRng::uniform() {
  return static_cast<double>(next() >> 11) * 0x1.0p-53;
}

Sampler::Sampler(const SamplingParams& params, int32_t vocab_size)
    : params_(params), vocab_size_(std::max<int32_t>(vocab_size, 0)), rng_(params.seed) {
  // Out-of-range settings fall back to the nearest well-defined behaviour.
  if (!(params_.temperature > 0) || !std::isfinite(params_.temperature)) params_.temperature = 0;
  if (params_.top_k < 0) params_.top_k = 0;
  if (!(params_.top_p > 0)) params_.top_p = 0;  // keeps only the most probable token
  if (params_.top_p > 1) params_.top_p = 1;
  if (!(params_.min_p >= 0)) params_.min_p = 0;
  if (params_.min_p > 1) params_.min_p = 1;
  if (!(params_.repetition_penalty > 0) || !std::isfinite(params_.repetition_penalty)) {
    params_.repetition_penalty = 1;
  }
  if (!std::isfinite(params_.presence_penalty)) params_.presence_penalty = 0;
  if (!std::isfinite(params_.frequency_penalty)) params_.frequency_penalty = 0;
  work_.resize(static_cast<size_t>(vocab_size_));
  seen_.assign(static_cast<size_t>(vocab_size_), 0);
}

bool Sampler::greedy() const {
  return params_.temperature == 0 || params_.top_k == 1;
}

bool Sampler::picks_argmax() const {
  return greedy() && params_.repetition_penalty == 1.0f && params_.presence_penalty == 0.0f &&
         params_.frequency_penalty == 0.0f;
}

void Sampler::apply_penalties(std::span<float> logits, std::span<const int32_t> history) {
  const float rep = params_.repetition_penalty;
  const float presence = params_.presence_penalty;
  const float frequency = params_.frequency_penalty;
  if (rep == 1.0f && presence == 0.0f && frequency == 0.0f) return;
  const size_t n = std::min(logits.size(), static_cast<size_t>(vocab_size_));
  if (++stamp_ == 0) {  // wrapped: forget old stamps
    std::fill(seen_.begin(), seen_.end(), 0);
    stamp_ = 1;
  }
  for (const int32_t id : history) {
    if (id < 0 || static_cast<size_t>(id) >= n) continue;
    // The multiplicative penalty and the presence penalty act once per distinct token, before
    // the per-occurrence frequency penalty (OpenAI's order: logit - count * f - present * p).
    if (seen_[id] != stamp_) {
      seen_[id] = stamp_;
      float l = logits[id];
      if (rep != 1.0f) l = l > 0 ? l / rep : l * rep;
      logits[id] = l - presence;
    }
    logits[id] -= frequency;
  }
}

size_t Sampler::prepare(std::span<const float> logits, std::span<const int32_t> history) {
  const size_t n = std::min(logits.size(), static_cast<size_t>(vocab_size_));
  std::copy_n(logits.begin(), n, work_.begin());
  apply_penalties(std::span<float>(work_.data(), n), history);
  return n;
}

int32_t Sampler::argmax(size_t n) const {
  return row_argmax(work_.data(), static_cast<int64_t>(n));
}

double Sampler::filter(size_t n) {
  candidates_.clear();
  const double inv_t = 1.0 / static_cast<double>(params_.temperature);
  // +inf counts as the largest finite logit; NaN and -inf are never candidates.
  auto key = [](float l) { return std::min(l, std::numeric_limits<float>::max()); };
  auto valid = [](float l) {
    return !std::isnan(l) && l != -std::numeric_limits<float>::infinity();
  };

  // Top-k before anything is exponentiated: the k-th largest logit, by selection over the
  // logits alone, is the bar (scaling by 1 / T keeps the order, so the set is the same).
  float bar = -std::numeric_limits<float>::infinity();
  const size_t k = static_cast<size_t>(params_.top_k);
  if (k > 0 && k <= kTopKHeap) {
    // The k largest so far in a min-heap: most logits fall below its top at one compare.
    keys_.clear();
    size_t count = 0;
    for (size_t i = 0; i < n; ++i) {
      if (!valid(work_[i])) continue;
      const float v = key(work_[i]);
      ++count;
      if (keys_.size() < k) {
        keys_.push_back(v);
        std::push_heap(keys_.begin(), keys_.end(), std::greater<float>());
      } else if (v > keys_.front()) {
        std::pop_heap(keys_.begin(), keys_.end(), std::greater<float>());
        keys_.back() = v;
        std::push_heap(keys_.begin(), keys_.end(), std::greater<float>());
      }
    }
    if (k < count) bar = keys_.front();
  } else if (k > 0) {
    keys_.clear();
    for (size_t i = 0; i < n; ++i) {
      if (valid(work_[i])) keys_.push_back(key(work_[i]));
    }
    if (k < keys_.size()) {
      std::nth_element(keys_.begin(), keys_.begin() + static_cast<ptrdiff_t>(k - 1), keys_.end(),
                       std::greater<float>());
      bar = keys_[k - 1];
    }
  }
  for (size_t i = 0; i < n; ++i) {
    const float l = work_[i];
    if (!valid(l) || key(l) < bar) continue;
    candidates_.push_back({static_cast<double>(key(l)) * inv_t, static_cast<int32_t>(i)});
  }
  if (candidates_.empty()) return 0;

  double max_logit = -std::numeric_limits<double>::infinity();
  for (const Candidate& c : candidates_) max_logit = std::max(max_logit, c.logit);
  double total = 0;
  for (Candidate& c : candidates_) {
    c.logit = std::exp(c.logit - max_logit);  // now an unnormalized probability; max is 1
    total += c.logit;
  }

  if (params_.top_p < 1.0f) nucleus(static_cast<double>(params_.top_p) * total);

  if (params_.min_p > 0.0f) {
    const double threshold = static_cast<double>(params_.min_p);  // times the top probability, 1
    candidates_.erase(
        std::remove_if(candidates_.begin(), candidates_.end(),
                       [threshold](const Candidate& c) { return c.logit < threshold; }),
        candidates_.end());
  }

  total = 0;
  for (const Candidate& c : candidates_) total += c.logit;
  return total;
}

void Sampler::nucleus(double target) {
  const size_t m = candidates_.size();
  keep_.assign(m, 0);
  order_.resize(m);
  for (size_t i = 0; i < m; ++i) order_[i] = static_cast<uint32_t>(i);
  auto bits_of = [&](uint32_t i) {
    uint64_t b;
    std::memcpy(&b, &candidates_[i].logit, sizeof(b));
    return b;
  };
  auto more_probable = [&](uint32_t a, uint32_t b) {
    const Candidate& x = candidates_[a];
    const Candidate& y = candidates_[b];
    return x.logit != y.logit ? x.logit > y.logit : x.id < y.id;
  };
  size_t begin = 0, end = m;  // order_[begin, end): the tokens not decided yet, in id order
  double before = 0;          // the mass of the tokens kept so far, all more probable than those
  bool kept_any = false;
  int shift = 64;  // bits of the probabilities not yet bucketed on (below `shift`)
  for (;;) {
    if (end - begin <= kNucleusSortBelow || shift == 0) {
      // The few left (or a set of equal probabilities): in order, each kept while the mass
      // before it is below the target, the first one whatever it is.
      std::sort(order_.begin() + static_cast<ptrdiff_t>(begin),
                order_.begin() + static_cast<ptrdiff_t>(end), more_probable);
      for (size_t j = begin; j < end; ++j) {
        if (kept_any && before >= target) break;
        keep_[order_[j]] = 1;
        before += candidates_[order_[j]].logit;
        kept_any = true;
      }
      break;
    }
    const int bits = std::min(shift, kNucleusDigitBits);
    shift -= bits;
    const uint64_t mask = (uint64_t(1) << bits) - 1;
    std::fill_n(bucket_count_.begin(), mask + 1, 0u);
    std::fill_n(bucket_mass_.begin(), mask + 1, 0.0);
    for (size_t j = begin; j < end; ++j) {
      const size_t d = static_cast<size_t>((bits_of(order_[j]) >> shift) & mask);
      ++bucket_count_[d];
      bucket_mass_[d] += candidates_[order_[j]].logit;
    }
    // Buckets from the most probable down: a whole bucket is kept while the mass before its
    // last token stays below the target (every token's before is at most before + the bucket's
    // mass less its own); the first bucket that reaches it is split by the next bits.
    size_t boundary = mask + 1;
    for (size_t d = mask + 1; d-- > 0;) {
      if (bucket_count_[d] == 0) continue;
      if ((kept_any && before >= target) || before + bucket_mass_[d] >= target) {
        boundary = d;
        break;
      }
      before += bucket_mass_[d];
      kept_any = true;
    }
    if (boundary > mask) {  // every bucket kept: the target is past the whole mass
      for (size_t j = begin; j < end; ++j) keep_[order_[j]] = 1;
      break;
    }
    // Without branches (the buckets come in no order): the buckets above are kept, the
    // boundary's tokens go on, in id order.
    size_t next = begin;
    for (size_t j = begin; j < end; ++j) {
      const uint32_t i = order_[j];
      const size_t d = static_cast<size_t>((bits_of(i) >> shift) & mask);
      keep_[i] = d > boundary;
      order_[next] = i;
      next += d == boundary;
    }
    end = next;
  }
  size_t w = 0;
  for (size_t i = 0; i < m; ++i) {
    candidates_[w] = candidates_[i];
    w += keep_[i];
  }
  candidates_.resize(w);
}

int32_t Sampler::sample(std::span<const float> logits, std::span<const int32_t> history) {
  const size_t n = prepare(logits, history);
  if (n == 0) return 0;
  if (greedy()) return argmax(n);
  const double total = filter(n);
  if (candidates_.empty() || !(total > 0)) return argmax(n);
  const double target = rng_.uniform() * total;
  double cumulative = 0;
  for (const Candidate& c : candidates_) {
    cumulative += c.logit;
    if (target < cumulative) return c.id;
  }
  return candidates_.back().id;  // rounding left the target at the very end
}

std::vector<std::pair<int32_t, double>> Sampler::distribution(std::span<const float> logits,
                                                              std::span<const int32_t> history) {
  std::vector<std::pair<int32_t, double>> out;
  const size_t n = prepare(logits, history);
  if (n == 0) return out;
  if (greedy()) {
    out.emplace_back(argmax(n), 1.0);
    return out;
  }
  const double total = filter(n);
  if (candidates_.empty() || !(total > 0)) {
    out.emplace_back(argmax(n), 1.0);
    return out;
  }
  std::sort(candidates_.begin(), candidates_.end(), [](const Candidate& a, const Candidate& b) {
    return a.logit != b.logit ? a.logit > b.logit : a.id < b.id;
  });
  for (const Candidate& c : candidates_) out.emplace_back(c.id, c.logit / total);
  return out;
}

}  // namespace kestrel
