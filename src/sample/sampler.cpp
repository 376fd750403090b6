#include "sample/sampler.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>

#include "core/argmax.h"
#include "sample/draw_rules.h"

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

void exp_in_place(std::span<double> x) {
  // draw_rules.h's exponential, a loop that vectorizes.
  double* const data = x.data();
  const size_t n = x.size();
  for (size_t i = 0; i < n; ++i) data[i] = draw::exp_nonpositive(data[i]);
}

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

SamplingParams Sampler::normalized(SamplingParams p) {
  // Out-of-range settings fall back to the nearest well-defined behaviour.
  if (!(p.temperature > 0) || !std::isfinite(p.temperature)) p.temperature = 0;
  if (p.top_k < 0) p.top_k = 0;
  if (!(p.top_p > 0)) p.top_p = 0;  // keeps only the most probable token
  if (p.top_p > 1) p.top_p = 1;
  if (!(p.min_p >= 0)) p.min_p = 0;
  if (p.min_p > 1) p.min_p = 1;
  if (!(p.repetition_penalty > 0) || !std::isfinite(p.repetition_penalty)) {
    p.repetition_penalty = 1;
  }
  if (!std::isfinite(p.presence_penalty)) p.presence_penalty = 0;
  if (!std::isfinite(p.frequency_penalty)) p.frequency_penalty = 0;
  return p;
}

Sampler::Sampler(const SamplingParams& params, int32_t vocab_size)
    : params_(normalized(params)),
      vocab_size_(std::max<int32_t>(vocab_size, 0)),
      rng_(params.seed) {
  seen_.assign(static_cast<size_t>(vocab_size_), 0);
}

Sampler::Scratch& Sampler::scratch() {
  thread_local Scratch t;
  return t;
}

bool Sampler::is_greedy(const SamplingParams& params) {
  return params.temperature == 0 || params.top_k == 1;
}

bool Sampler::has_penalties() const {
  return params_.repetition_penalty != 1.0f || params_.presence_penalty != 0.0f ||
         params_.frequency_penalty != 0.0f;
}

bool Sampler::picks_argmax() const {
  return is_greedy(params_) && !has_penalties();
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

size_t Sampler::prepare(Scratch& t, std::span<const float> logits,
                        std::span<const int32_t> history) {
  const size_t n = std::min(logits.size(), static_cast<size_t>(vocab_size_));
  t.work.resize(n);
  std::copy_n(logits.begin(), n, t.work.begin());
  apply_penalties(std::span<float>(t.work.data(), n), history);
  return n;
}

int32_t Sampler::argmax(const float* logits, size_t n) {
  return row_argmax(logits, static_cast<int64_t>(n));
}

uint64_t Sampler::filter(Scratch& t, const float* logits, size_t n, const SamplingParams& p) {
  const double inv_t = draw::inverse_temperature(p.temperature);
  // +inf counts as the largest finite logit; NaN and -inf are never candidates.
  auto key = draw::logit_key;
  auto valid = draw::valid_logit;

  // Top-k before anything is exponentiated: the k-th largest logit, by selection over the
  // logits alone, is the bar (scaling by 1 / T keeps the order, so the set is the same).
  float bar = -std::numeric_limits<float>::infinity();
  const size_t k = static_cast<size_t>(p.top_k);
  if (k > 0 && k <= kTopKHeap) {
    // The k largest so far in a min-heap: most logits fall below its top at one compare.
    t.keys.clear();
    size_t count = 0;
    for (size_t i = 0; i < n; ++i) {
      if (!valid(logits[i])) continue;
      const float v = key(logits[i]);
      ++count;
      if (t.keys.size() < k) {
        t.keys.push_back(v);
        std::push_heap(t.keys.begin(), t.keys.end(), std::greater<float>());
      } else if (v > t.keys.front()) {
        std::pop_heap(t.keys.begin(), t.keys.end(), std::greater<float>());
        t.keys.back() = v;
        std::push_heap(t.keys.begin(), t.keys.end(), std::greater<float>());
      }
    }
    if (k < count) bar = t.keys.front();
  } else if (k > 0) {
    t.keys.clear();
    for (size_t i = 0; i < n; ++i) {
      if (valid(logits[i])) t.keys.push_back(key(logits[i]));
    }
    if (k < t.keys.size()) {
      std::nth_element(t.keys.begin(), t.keys.begin() + static_cast<ptrdiff_t>(k - 1), t.keys.end(),
                       std::greater<float>());
      bar = t.keys[k - 1];
    }
  }
  // The candidates. Without top-k nearly every logit is one: without branches, every logit is
  // written and the count moves past it only when it is one. With top-k few are: a branch that
  // is nearly always taken the same way.
  t.cand_keys.resize(n);
  t.ids.resize(n);
  size_t m = 0;
  float top = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < n; ++i) {
    const float l = logits[i];
    if (k > 0 && !(key(l) >= bar)) continue;
    t.cand_keys[m] = key(l);
    t.ids[m] = static_cast<int32_t>(i);
    const bool candidate = valid(l) && key(l) >= bar;
    top = candidate ? std::max(top, key(l)) : top;
    m += candidate;
  }
  t.cand_keys.resize(m);
  t.ids.resize(m);
  t.q.resize(m);
  if (m == 0) return 0;

  // Fixed-point probabilities (the top token's is 2^40), as the CUDA sampler computes them: from
  // here on every sum is exact.
  for (size_t j = 0; j < m; ++j) t.q[j] = draw::fixed_prob(t.cand_keys[j], top, inv_t);

  if (p.top_p < 1.0f) nucleus(t, draw::nucleus_target(p.top_p, sum(t.q)));

  if (p.min_p > 0.0f) {
    const uint64_t floor = draw::min_p_floor(p.min_p);
    size_t w = 0;
    for (size_t j = 0; j < t.q.size(); ++j) {
      t.q[w] = t.q[j];
      t.ids[w] = t.ids[j];
      w += t.q[j] >= floor;
    }
    t.q.resize(w);
    t.ids.resize(w);
  }
  return sum(t.q);
}

uint64_t Sampler::sum(std::span<const uint64_t> values) {
  uint64_t total = 0;
  for (const uint64_t v : values) total += v;
  return total;
}

void Sampler::nucleus(Scratch& t, uint64_t target) {
  const size_t m = t.q.size();
  t.keep.assign(m, 0);
  t.order.resize(m);
  for (size_t i = 0; i < m; ++i) t.order[i] = static_cast<uint32_t>(i);
  auto more_probable = [&](uint32_t a, uint32_t b) {
    return t.q[a] != t.q[b] ? t.q[a] > t.q[b] : t.ids[a] < t.ids[b];
  };
  size_t begin = 0, end = m;  // t.order[begin, end): the tokens not decided yet, in id order
  uint64_t before = 0;        // the mass of the tokens kept so far, all more probable than those
  bool kept_any = false;
  int shift = kNucleusTopBit;  // bits of the probabilities not yet bucketed on (below `shift`)
  for (;;) {
    if (end - begin <= kNucleusSortBelow || shift == 0) {
      // The few left (or a set of equal probabilities): in order, each kept while the mass
      // before it is below the target, the first one whatever it is.
      std::sort(t.order.begin() + static_cast<ptrdiff_t>(begin),
                t.order.begin() + static_cast<ptrdiff_t>(end), more_probable);
      for (size_t j = begin; j < end; ++j) {
        if (kept_any && before >= target) break;
        t.keep[t.order[j]] = 1;
        before += t.q[t.order[j]];
        kept_any = true;
      }
      break;
    }
    const int bits = std::min(shift, kNucleusDigitBits);
    shift -= bits;
    const uint64_t mask = (uint64_t(1) << bits) - 1;
    std::fill_n(t.bucket_count.begin(), mask + 1, 0u);
    std::fill_n(t.bucket_mass.begin(), mask + 1, uint64_t(0));
    for (size_t j = begin; j < end; ++j) {
      const size_t d = static_cast<size_t>((t.q[t.order[j]] >> shift) & mask);
      ++t.bucket_count[d];
      t.bucket_mass[d] += t.q[t.order[j]];
    }
    // Buckets from the most probable down: a whole bucket is kept while the mass before its
    // last token stays below the target (every token's before is at most before + the bucket's
    // mass less its own); the first bucket that reaches it is split by the next bits.
    size_t boundary = mask + 1;
    for (size_t d = mask + 1; d-- > 0;) {
      if (t.bucket_count[d] == 0) continue;
      if ((kept_any && before >= target) || before + t.bucket_mass[d] >= target) {
        boundary = d;
        break;
      }
      before += t.bucket_mass[d];
      kept_any = true;
    }
    if (boundary > mask) {  // every bucket kept: the target is past the whole mass
      for (size_t j = begin; j < end; ++j) t.keep[t.order[j]] = 1;
      break;
    }
    // Without branches (the buckets come in no order): the buckets above are kept, the
    // boundary's tokens go on, in id order.
    size_t next = begin;
    for (size_t j = begin; j < end; ++j) {
      const uint32_t i = t.order[j];
      const size_t d = static_cast<size_t>((t.q[i] >> shift) & mask);
      t.keep[i] = d > boundary;
      t.order[next] = i;
      next += d == boundary;
    }
    end = next;
  }
  size_t w = 0;
  for (size_t i = 0; i < m; ++i) {
    t.q[w] = t.q[i];
    t.ids[w] = t.ids[i];
    w += t.keep[i];
  }
  t.q.resize(w);
  t.ids.resize(w);
}

int32_t Sampler::draw(const Scratch& t, uint64_t total, double u) {
  const uint64_t point = draw::draw_point(u, total);
  uint64_t cumulative = 0;
  for (size_t j = 0; j < t.q.size(); ++j) {
    cumulative += t.q[j];
    if (point < cumulative) return t.ids[j];
  }
  return t.ids.back();  // not reached: the point is below the total
}

int32_t Sampler::pick_from(Scratch& t, const float* logits, size_t n, const SamplingParams& p,
                           double u) {
  if (is_greedy(p)) return argmax(logits, n);
  const uint64_t total = filter(t, logits, n, p);
  if (total == 0) return argmax(logits, n);
  return draw(t, total, u);
}

int32_t Sampler::sample(std::span<const float> logits, std::span<const int32_t> history) {
  Scratch& t = scratch();
  const size_t n = prepare(t, logits, history);
  if (n == 0) return 0;
  if (is_greedy(params_)) return argmax(t.work.data(), n);
  // Drawn before the row is looked at, as a caller that has a device draw it takes (next_draw)
  // does: a seed gives the same stream whichever draws.
  return pick_from(t, t.work.data(), n, params_, rng_.uniform());
}

RowDraw Sampler::next_draw(int32_t row) {
  return RowDraw{row, params_, vocab_size_, rng_.uniform()};
}

bool Sampler::draws_from_row() const {
  return !is_greedy(params_) && !has_penalties();
}

int32_t Sampler::pick(std::span<const float> logits, const SamplingParams& params,
                      int32_t vocab_size, double u) {
  const size_t n = std::min(logits.size(), static_cast<size_t>(std::max<int32_t>(vocab_size, 0)));
  if (n == 0) return 0;
  return pick_from(scratch(), logits.data(), n, normalized(params), u);
}

std::vector<std::pair<int32_t, double>> Sampler::distribution(std::span<const float> logits,
                                                              std::span<const int32_t> history) {
  std::vector<std::pair<int32_t, double>> out;
  Scratch& t = scratch();
  const size_t n = prepare(t, logits, history);
  if (n == 0) return out;
  if (is_greedy(params_)) {
    out.emplace_back(argmax(t.work.data(), n), 1.0);
    return out;
  }
  const uint64_t total = filter(t, t.work.data(), n, params_);
  if (total == 0) {
    out.emplace_back(argmax(t.work.data(), n), 1.0);
    return out;
  }
  for (size_t j = 0; j < t.q.size(); ++j) {
    if (t.q[j] > 0) out.emplace_back(t.ids[j], double(t.q[j]) / double(total));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return a.second != b.second ? a.second > b.second : a.first < b.first;
  });
  return out;
}

}  // namespace kestrel
