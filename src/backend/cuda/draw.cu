// Sampled tokens drawn on the device (draw_rows, sample.cuh): the host sampler's steps 3-7 in
// the arithmetic of sample/draw_rules.h, so a row's token is Sampler::pick's to the bit.
//
// A block of 1024 threads takes a row. Its passes over the row:
//   1. top-k: the k-th largest key by an MSD radix select on the keys' ordered bits (four 8-bit
//      digits, a histogram a digit);
//   2. the most probable candidate's key (a block maximum);
//   3. each candidate's fixed-point probability, into the row's slice of the workspace, and
//      their sum;
//   4. top-p: an MSD radix select on the fixed-point probabilities (four 11-bit digits from bit
//      44, each digit's buckets holding a count and an integer mass), which leaves the boundary
//      value and how many of the tokens of that value, in id order, are kept;
//   5. the kept tokens' mass a warp (each warp a contiguous segment of the row, walked 32 tokens
//      at a time), min-p's floor applied, and the draw's point in their total;
//   6. the warp whose segment holds the point walks it again to the token.
// Every sum is an integer sum, so the order the threads add in does not change a bit.
//
// By default (KESTREL_CUDA_DRAW_AHEAD=0 or set_draw_ahead(false) turn it off), a pass over the row
// keeps several loads a thread in flight (walk_row): one SM's threads walking a 128256-token
// row one load at a time are bound by the loads' latency. A warp's tokens of one bucket always
// count into a histogram with one atomic (__match_any_sync); with loads ahead, a round whose
// tokens all fall in the warp's hot bucket (the largest group of an earlier aggregated round)
// adds into the lanes' registers instead, flushed with one atomic when the hot bucket changes
// and at the pass's end: rows whose tokens crowd one bucket (a flat row's tail, every top-p
// digit) otherwise take every round's atomics in turn.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.cuh"
#include "backend/cuda/sample.cuh"
#include "sample/draw_rules.h"

namespace kestrel::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kKeyDigitBits = 8;
constexpr int kKeyBuckets = 1 << kKeyDigitBits;
constexpr int kProbDigitBits = 11;
constexpr int kProbBuckets = 1 << kProbDigitBits;
constexpr int kProbTopBit = 44;  // the fixed-point probabilities are at most 2^40
static_assert(kProbTopBit % kProbDigitBits == 0 && kProbTopBit > draw::kProbBits);
// The histograms sum a warp's masses in two 21-bit halves, 32 of each within 32 bits.
static_assert(draw::kProbBits <= 40);
static_assert(kProbBuckets == 2 * kThreads, "a thread holds two buckets");

// Top-p's bucket masses as three 32-bit parts of 14, 14 and 13 bits (a mass is below 2^41):
// each part's sum over a bucket stays below 2^32 for rows of at most 2^18 tokens, and a shared
// 32-bit atomic add is one instruction where a 64-bit one is a compare-and-swap loop, which the
// rows' crowded buckets make spin (H200: top-p 0.65-0.97 ms a launch with the 64-bit form, the
// other settings 0.12-0.33 ms). Wider rows keep the 64-bit sums.
constexpr int kPartBits = 14;
// Elements a thread requests at once in a pass over the row (walk_row), and rounds a warp
// requests at once in its segment (walk_segment): draw_kernel<true>'s (the default since the
// twenty-sixth session's H100 measurement: 10-27% less a launch; PERF.md); draw_kernel<false>
// (KESTREL_CUDA_DRAW_AHEAD=0, set_draw_ahead(false)) walks one at a time and aggregates no hot
// bucket, as before them.
constexpr int kDrawAhead = 8;
constexpr int64_t kMaxNarrowTokens = int64_t(1) << 18;
static_assert(kMaxNarrowTokens * ((int64_t(1) << kPartBits) - 1) < (int64_t(1) << 32));
static_assert(3 * kPartBits >= draw::kProbBits + 1, "three parts hold a mass below 2^41");

struct Shared {
  union {
    uint32_t key_count[kKeyBuckets];
    struct {
      uint32_t count[kProbBuckets];
      union {
        unsigned long long mass[kProbBuckets];  // rows wider than kMaxNarrowTokens
        uint32_t part[3][kProbBuckets];
      };
    } prob;
  };
  unsigned long long warp_u64[kWarps];
  uint32_t warp_u32[kWarps];
  unsigned long long broadcast_u64[2];
  uint32_t broadcast_u32[2];
};

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct Max {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return max(a, b);
  }
};
struct Min {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return min(a, b);
  }
};

template <typename T, typename Op>
__device__ inline T warp_reduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, T(__shfl_xor_sync(0xffffffffu, v, o)));
  return v;
}

// Inclusive prefix sum over the lanes.
template <typename T>
__device__ inline T warp_inclusive(T v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T other = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += other;
  }
  return v;
}

// A block reduction through `slots` (a word a warp): every thread gets the result. It begins
// with a barrier, so calls may follow each other.
template <typename T, typename Op>
__device__ inline T block_reduce(T* slots, T v, Op op) {
  v = warp_reduce(v, op);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) slots[threadIdx.x >> 5] = v;
  __syncthreads();
  return warp_reduce(slots[threadIdx.x & 31], op);
}

// Exclusive prefix sum over the block's threads in thread order; `total` gets the whole sum.
template <typename T>
__device__ inline T block_exclusive(T* warp_totals, T v, T& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T inclusive = warp_inclusive(v);
  __syncthreads();
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  const T mine = warp_totals[lane];
  const T warps_inclusive = warp_inclusive(mine);
  total = __shfl_sync(0xffffffffu, warps_inclusive, 31);
  const T before_warp = __shfl_sync(0xffffffffu, warps_inclusive - mine, warp);
  return before_warp + inclusive - v;
}

__device__ inline uint64_t block_exclusive_u64(Shared& sh, uint64_t v, uint64_t& total) {
  unsigned long long t = 0;
  const unsigned long long r =
      block_exclusive<unsigned long long>(sh.warp_u64, (unsigned long long)v, t);
  total = t;
  return r;
}

__device__ inline uint32_t block_exclusive_u32(Shared& sh, uint32_t v, uint32_t& total) {
  return block_exclusive<uint32_t>(sh.warp_u32, v, total);
}

// The kept rule after top-p: q > value, or q == value and among the first `ties` of that value
// in id order (ties == UINT32_MAX: all of them).
struct Nucleus {
  uint64_t value = 0;
  uint32_t ties = UINT32_MAX;
};

// One pass over the row's n elements of src: round r's elements i = r kAhead kThreads + u kThreads
// + tid (u < kAhead) are all requested before the first is used, then f(i, value, i < n) for each
// u in turn (value T{} past n). Every thread runs every round, so f may hold warp-wide steps.
template <int kAhead, typename T, typename F>
__device__ inline void walk_row(const T* src, int64_t n, F&& f) {
  for (int64_t round = 0; round < n; round += int64_t(kAhead) * kThreads) {
    T v[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t i = round + int64_t(u) * kThreads + threadIdx.x;
      v[u] = i < n ? src[i] : T{};
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t i = round + int64_t(u) * kThreads + threadIdx.x;
      f(i, v[u], i < n);
    }
  }
}

// A warp's walk over its segment [begin, end) of q in id order, 32 tokens a round (token
// round + lane), kAhead rounds' loads requested at once: f(i, value) for every round (value 0
// past end; every lane runs every round) until it returns false, which it must do warp-uniformly.
template <int kAhead, typename F>
__device__ inline void walk_segment(const uint64_t* q, int64_t begin, int64_t end, F&& f) {
  const int lane = threadIdx.x & 31;
  for (int64_t base = begin; base < end; base += int64_t(kAhead) * 32) {
    uint64_t v[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t i = base + u * 32 + lane;
      v[u] = i < end ? q[i] : 0;
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      if (!f(base + u * 32 + lane, v[u])) return;
    }
  }
}

// A warp's hot bucket for a histogram pass: the rounds whose tokens are all in it (or in none)
// add into each lane's registers instead of shared memory. `take` is called by every lane of the
// warp each round with the lane's bucket (-1: none) and its weight; it returns whether the round
// was taken (else the caller aggregates it with __match_any_sync and atomics, then calls
// `consider` with the round's groups); `flush` adds the registers' sums through `add` (lane 0,
// bucket, count, weight sum) and forgets the bucket. W: the weight's type (unused for counts).
template <typename W, bool kOn>
struct HotBucket {
  int bucket = -1;  // warp-uniform
  uint32_t count = 0;
  W sum = 0;

  __device__ bool take(int b, W w) {
    if constexpr (!kOn) return false;
    if (!__all_sync(0xffffffffu, b < 0 || b == bucket)) return false;
    if (b >= 0) {
      ++count;
      sum += w;
    }
    return true;
  }

  // After an aggregated round: the largest group's bucket becomes hot when it held at least
  // half the warp (the registers of the old one flushed first).
  template <typename Add>
  __device__ void consider(int b, unsigned peers, Add&& add) {
    if constexpr (!kOn) return;
    const unsigned size = b >= 0 ? unsigned(__popc(peers)) : 0u;
    const unsigned best = __reduce_max_sync(0xffffffffu, (size << 16) | unsigned(b & 0xffff));
    const int best_bucket = int(best & 0xffffu);
    if ((best >> 16) >= 16 && best_bucket != bucket) {
      flush(add);
      bucket = best_bucket;
    }
  }

  template <typename Add>
  __device__ void flush(Add&& add) {
    if constexpr (!kOn) return;
    const uint32_t total = __reduce_add_sync(0xffffffffu, count);
    W s = sum;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (bucket >= 0 && total > 0 && (threadIdx.x & 31) == 0) add(bucket, total, s);
    count = 0;
    sum = 0;
  }
};

template <bool kFast>
__global__ void __launch_bounds__(kThreads)
    draw_kernel(const float* __restrict__ logits, int64_t cols, DrawLaunch launch, int32_t* out,
                uint64_t* __restrict__ work) {
  constexpr int kAhead = kFast ? kDrawAhead : 1;
  pdl_wait();
  pdl_trigger();
  __shared__ Shared sh;
  const DrawRow d = launch.rows[blockIdx.x];
  const float* __restrict__ x = logits + int64_t(d.row) * cols;
  uint64_t* __restrict__ q = work + int64_t(blockIdx.x) * cols;
  const int64_t n = min(int64_t(d.vocab), cols);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (n <= 0) {
    if (tid == 0) out[d.row] = 0;
    return;
  }

  // 1. Top-k: candidates are valid keys at or above the k-th largest (ordered) key.
  uint32_t bar = 0;  // every valid key's ordered bits are above 0
  if (d.top_k > 0) {
    uint32_t valid = 0;
    walk_row<kAhead>(x, n, [&](int64_t, float l, bool in) { valid += in && draw::valid_logit(l); });
    const uint32_t count = block_reduce(sh.warp_u32, valid, Sum());
    if (uint32_t(d.top_k) < count) {
      uint32_t prefix = 0, prefix_mask = 0, remaining = uint32_t(d.top_k);
      for (int shift = 32 - kKeyDigitBits; shift >= 0; shift -= kKeyDigitBits) {
        __syncthreads();
        for (int b = tid; b < kKeyBuckets; b += kThreads) sh.key_count[b] = 0;
        __syncthreads();
        // A warp's tokens of one bucket count in with one atomic (rows crowd a few buckets,
        // and a shared atomic on one address is taken in turn), or none in its hot bucket;
        // every lane runs every round.
        HotBucket<uint32_t, kFast> hot;
        auto add = [&](int b, uint32_t c, uint32_t) { atomicAdd(&sh.key_count[b], c); };
        walk_row<kAhead>(x, n, [&](int64_t, float l, bool in) {
          int bucket = -1;
          const uint32_t o = draw::ordered_key(l);
          if (in && draw::valid_logit(l) && (o & prefix_mask) == prefix) {
            bucket = int((o >> shift) & (kKeyBuckets - 1));
          }
          if (hot.take(bucket, 0u)) return;
          const unsigned peers = __match_any_sync(0xffffffffu, bucket);
          if (bucket >= 0 && lane == __ffs(peers) - 1) {
            atomicAdd(&sh.key_count[bucket], unsigned(__popc(peers)));
          }
          hot.consider(bucket, peers, add);
        });
        hot.flush(add);
        __syncthreads();
        // Warp 0 finds the digit holding the remaining-th largest: lane l sums buckets
        // 255 - 8l down to 248 - 8l, the lanes' sums are scanned from the top.
        if (warp == 0) {
          constexpr int kPerLane = kKeyBuckets / 32;
          uint32_t mine = 0;
          for (int j = 0; j < kPerLane; ++j)
            mine += sh.key_count[kKeyBuckets - 1 - lane * kPerLane - j];
          const uint32_t inclusive = warp_inclusive(mine);
          const uint32_t found = __ballot_sync(0xffffffffu, inclusive >= remaining);
          const int owner = __ffs(found) - 1;  // the remaining-th is within the counted keys
          if (lane == owner) {
            uint32_t above = inclusive - mine;
            int digit = kKeyBuckets - 1 - lane * kPerLane;
            for (int j = 0; j < kPerLane; ++j, --digit) {
              const uint32_t c = sh.key_count[digit];
              if (above + c >= remaining) break;
              above += c;
            }
            sh.broadcast_u32[0] = uint32_t(digit);
            sh.broadcast_u32[1] = remaining - above;
          }
        }
        __syncthreads();
        prefix |= sh.broadcast_u32[0] << shift;
        prefix_mask |= uint32_t(kKeyBuckets - 1) << shift;
        remaining = sh.broadcast_u32[1];
      }
      bar = prefix;
    }
  }

  // 2. The most probable candidate's key.
  uint32_t top = 0;
  walk_row<kAhead>(x, n, [&](int64_t, float l, bool in) {
    if (in && draw::valid_logit(l))
      top = max(top, draw::ordered_key(l) >= bar ? draw::ordered_key(l) : 0u);
  });
  top = block_reduce(sh.warp_u32, top, Max());
  if (top == 0) {
    // No candidate: the argmax of the first n columns, as the host's fallback (row_argmax:
    // the first non-NaN, here the first -inf, or 0).
    uint32_t first = UINT32_MAX;
    walk_row<kAhead>(x, n, [&](int64_t i, float l, bool in) {
      if (in && !(l != l)) first = min(first, uint32_t(i));
    });
    first = block_reduce(sh.warp_u32, first, Min());
    if (tid == 0) out[d.row] = first == UINT32_MAX ? 0 : int32_t(first);
    return;
  }

  // 3. Fixed-point probabilities (0 for the rest) and their sum.
  const double inv_t = draw::inverse_temperature(d.temperature);
  const float top_key = draw::key_value(top);
  uint64_t mass = 0;
  walk_row<kAhead>(x, n, [&](int64_t i, float l, bool in) {
    if (!in) return;
    uint64_t p = 0;
    if (draw::valid_logit(l) && draw::ordered_key(l) >= bar) {
      p = draw::fixed_prob(draw::logit_key(l), top_key, inv_t);
    }
    q[i] = p;
    mass += p;
  });
  const uint64_t total = block_reduce(sh.warp_u64, (unsigned long long)mass, Sum());

  // 4. Top-p, over the tokens with mass: those outside the candidates hold 0, as do candidates
  // too improbable for a fixed-point bit, and neither can move the boundary or be drawn (the
  // host's buckets count the latter; whether a token of no mass is "kept" changes no draw).
  // The most probable token, 2^40, is always the first kept.
  Nucleus nucleus;
  const bool narrow = n <= kMaxNarrowTokens && !launch.wide_histograms;
  // A bucket's mass from whichever form the row's histograms take.
  auto bucket_mass = [&](int b) -> uint64_t {
    if (!narrow) return sh.prob.mass[b];
    return uint64_t(sh.prob.part[0][b]) + (uint64_t(sh.prob.part[1][b]) << kPartBits) +
           (uint64_t(sh.prob.part[2][b]) << (2 * kPartBits));
  };
  if (d.top_p < 1.0f) {
    const uint64_t target = draw::nucleus_target(d.top_p, total);
    uint64_t before = 0;  // the mass kept so far, all of it more probable than the undecided
    bool kept_any = false;
    uint64_t high = 0;  // the undecided tokens' bits above the current digit
    uint32_t boundary_count = 0;
    bool decided = false;
    for (int shift = kProbTopBit - kProbDigitBits; shift >= 0; shift -= kProbDigitBits) {
      const int above = shift + kProbDigitBits;
      __syncthreads();
      for (int b = tid; b < kProbBuckets; b += kThreads) {
        sh.prob.count[b] = 0;
        if (narrow) {
          sh.prob.part[0][b] = sh.prob.part[1][b] = sh.prob.part[2][b] = 0;
        } else {
          sh.prob.mass[b] = 0;
        }
      }
      __syncthreads();
      // A warp's tokens of one bucket count in with one atomic each for the count and the
      // mass (summed by the warp: below 2^41 a token, so two 21-bit halves of 32 tokens fit 32
      // bits; in narrow rows three parts of at most 14 bits, each part its own 32-bit atomic),
      // or none in its hot bucket, whose registers' mass is added as three parts of its own
      // (the bits below 14, the next 14, the rest: a part's sums over the row stay within 32
      // bits as the tokens' own parts do, and the parts' weighted sum is the same mass); every
      // lane runs every round.
      HotBucket<uint64_t, kFast> hot;
      auto add = [&](int b, uint32_t c, uint64_t m) {
        atomicAdd(&sh.prob.count[b], c);
        if (narrow) {
          constexpr uint64_t kMask = (uint64_t(1) << kPartBits) - 1;
          atomicAdd(&sh.prob.part[0][b], uint32_t(m & kMask));
          atomicAdd(&sh.prob.part[1][b], uint32_t((m >> kPartBits) & kMask));
          atomicAdd(&sh.prob.part[2][b], uint32_t(m >> (2 * kPartBits)));
        } else {
          atomicAdd(&sh.prob.mass[b], (unsigned long long)m);
        }
      };
      walk_row<kAhead>(q, n, [&](int64_t, uint64_t v, bool) {
        // Tokens of no mass are left out: they cannot move the boundary or be drawn, and with
        // top-k they are nearly the whole row, all on bucket 0's two counters. (Past n, v is 0.)
        const int b = v == 0 || (v >> above) != high ? -1 : int((v >> shift) & (kProbBuckets - 1));
        if (hot.take(b, v)) return;
        const unsigned peers = __match_any_sync(0xffffffffu, b);
        const bool leader = b >= 0 && lane == __ffs(peers) - 1;
        if (narrow) {
          constexpr uint64_t kMask = (uint64_t(1) << kPartBits) - 1;
          const uint64_t w = b >= 0 ? v : 0;
          const uint32_t s0 = __reduce_add_sync(peers, uint32_t(w & kMask));
          const uint32_t s1 = __reduce_add_sync(peers, uint32_t((w >> kPartBits) & kMask));
          const uint32_t s2 = __reduce_add_sync(peers, uint32_t(w >> (2 * kPartBits)));
          if (leader) {
            atomicAdd(&sh.prob.count[b], unsigned(__popc(peers)));
            atomicAdd(&sh.prob.part[0][b], s0);
            atomicAdd(&sh.prob.part[1][b], s1);
            atomicAdd(&sh.prob.part[2][b], s2);
          }
        } else {
          const uint32_t low = __reduce_add_sync(peers, b >= 0 ? uint32_t(v & 0x1fffffu) : 0u);
          const uint32_t high21 = __reduce_add_sync(peers, b >= 0 ? uint32_t(v >> 21) : 0u);
          if (leader) {
            atomicAdd(&sh.prob.count[b], unsigned(__popc(peers)));
            atomicAdd(&sh.prob.mass[b], ((unsigned long long)high21 << 21) + low);
          }
        }
        hot.consider(b, peers, add);
      });
      hot.flush(add);
      __syncthreads();
      // Thread t holds buckets 2047 - 2t and 2046 - 2t: thread order is most probable first.
      const int b0 = kProbBuckets - 1 - 2 * tid, b1 = b0 - 1;
      const uint64_t m0 = bucket_mass(b0), m1 = bucket_mass(b1);
      const uint32_t c0 = sh.prob.count[b0], c1 = sh.prob.count[b1];
      uint64_t mass_total = 0;
      uint32_t nonempty_total = 0;
      const uint64_t mass_above = before + block_exclusive_u64(sh, m0 + m1, mass_total);
      const uint32_t nonempty_above =
          block_exclusive_u32(sh, uint32_t(c0 > 0) + uint32_t(c1 > 0), nonempty_total);
      // The boundary: the first non-empty bucket where the kept mass reaches the target (at
      // once, when it already has).
      const bool reached = kept_any && before >= target;
      uint32_t position = UINT32_MAX;  // 2t or 2t + 1: the bucket's place, most probable first
      if (c0 > 0 && (reached || mass_above + m0 >= target)) {
        position = 2 * tid;
      } else if (c1 > 0 && (reached || mass_above + m0 + m1 >= target)) {
        position = 2 * tid + 1;
      }
      const uint32_t first = block_reduce(sh.warp_u32, position, Min());
      if (first == UINT32_MAX) {
        // The target is past the whole mass: every undecided token is kept, so the kept ones
        // are those of at least the range's lowest value, high << above.
        const uint64_t lowest = high << above;
        nucleus.value = lowest == 0 ? 0 : lowest - 1;
        nucleus.ties = lowest == 0 ? UINT32_MAX : 0;
        decided = true;
        break;
      }
      if (uint32_t(tid) == first / 2) {
        const bool second = first % 2 == 1;
        sh.broadcast_u64[0] = mass_above + (second ? m0 : 0);
        sh.broadcast_u32[0] = nonempty_above + uint32_t(second && c0 > 0);
        sh.broadcast_u32[1] = second ? c1 : c0;
      }
      __syncthreads();
      before = sh.broadcast_u64[0];
      kept_any = kept_any || sh.broadcast_u32[0] > 0;
      boundary_count = sh.broadcast_u32[1];
      high = (high << kProbDigitBits) | uint64_t(kProbBuckets - 1 - int(first));
    }
    if (!decided) {  // high is now a whole value: its tokens are kept in id order
      nucleus.value = high;
      nucleus.ties = draw::nucleus_ties_kept(before, target, kept_any, high, boundary_count);
    }
  }

  // 5. The kept mass, a warp a contiguous segment of the row walked 32 tokens at a time (the
  // ties' ranks are in id order), min-p's floor applied.
  const uint64_t floor = d.min_p > 0.0f ? draw::min_p_floor(d.min_p) : 0;
  const bool ranked = nucleus.ties != UINT32_MAX && nucleus.ties != 0;
  const int64_t segment = ((n + kWarps - 1) / kWarps + 31) / 32 * 32;
  const int64_t seg_begin = min(n, int64_t(warp) * segment);
  const int64_t seg_end = min(n, seg_begin + segment);
  uint32_t tie_offset = 0;  // ties before this warp's segment
  if (ranked) {
    uint32_t ties = 0;
    walk_segment<kAhead>(q, seg_begin, seg_end, [&](int64_t i, uint64_t v) {
      ties += i < seg_end && v == nucleus.value;
      return true;
    });
    ties = warp_reduce(ties, Sum());
    uint32_t unused = 0;
    const uint32_t offset = block_exclusive_u32(sh, lane == 0 ? ties : 0u, unused);
    tie_offset = __shfl_sync(0xffffffffu, offset, 0);
  }
  const uint32_t lanes_below = (1u << lane) - 1;
  // Whether token i (this lane's, in a warp-wide step; v its q, 0 past the segment) is kept;
  // `rank` carries the warp's count of ties so far.
  auto kept_mass = [&](int64_t i, uint64_t v, uint32_t& rank) -> uint64_t {
    const bool tie = i < seg_end && v == nucleus.value;
    const uint32_t tie_lanes = __ballot_sync(0xffffffffu, tie);
    const uint32_t my_rank = rank + __popc(tie_lanes & lanes_below);
    rank += __popc(tie_lanes);
    const bool kept =
        i < seg_end && (v > nucleus.value || (tie && my_rank < nucleus.ties)) && v >= floor;
    return kept ? v : 0;
  };
  uint64_t warp_mass = 0;
  {
    uint32_t rank = tie_offset;
    walk_segment<kAhead>(q, seg_begin, seg_end, [&](int64_t i, uint64_t v) {
      warp_mass += kept_mass(i, v, rank);
      return true;
    });
    warp_mass = warp_reduce((unsigned long long)warp_mass, Sum());
  }
  uint64_t kept_total = 0;
  const uint64_t warp_before =
      __shfl_sync(0xffffffffu, block_exclusive_u64(sh, lane == 0 ? warp_mass : 0, kept_total), 0);
  if (kept_total == 0) return;  // not reached (the most probable token is kept): the argmax

  // 6. The draw: the first kept token, in id order, whose running mass passes the point.
  const uint64_t point = draw::draw_point(d.u, kept_total);
  if (point < warp_before || point >= warp_before + warp_mass) return;
  uint32_t rank = tie_offset;
  uint64_t running = warp_before;
  walk_segment<kAhead>(q, seg_begin, seg_end, [&](int64_t i, uint64_t v) {
    const uint64_t m = kept_mass(i, v, rank);
    const uint64_t inclusive = warp_inclusive(m);
    const uint32_t passed = __ballot_sync(0xffffffffu, running + inclusive > point);
    if (passed != 0) {
      if (lane == __ffs(passed) - 1) out[d.row] = int32_t(i);
      return false;
    }
    running += __shfl_sync(0xffffffffu, inclusive, 31);
    return true;
  });
}

std::atomic<bool>& draw_wide_histograms_flag() {
  static std::atomic<bool> on{false};
  return on;
}

std::atomic<bool>& draw_ahead_flag() {
  static std::atomic<bool> on{!env_is("KESTREL_CUDA_DRAW_AHEAD", "0")};
  return on;
}

}  // namespace

bool set_draw_wide_histograms(bool on) {
  return draw_wide_histograms_flag().exchange(on);
}

bool set_draw_ahead(bool on) {
  return draw_ahead_flag().exchange(on);
}

Status draw_rows(const float* x, int64_t rows, int64_t cols, const DrawLaunch& launch, int count,
                 int32_t* out, uint64_t* work, cudaStream_t stream) {
  if (count == 0) return Status::ok();
  if (count < 0 || count > kDrawRowsPerLaunch || cols <= 0 || cols > draw::kMaxTokens) {
    return Status::error("draw_rows: " + std::to_string(count) + " rows of " +
                         std::to_string(cols) + " columns (at most " +
                         std::to_string(kDrawRowsPerLaunch) + " rows a launch, " +
                         std::to_string(draw::kMaxTokens) + " columns)");
  }
  for (int i = 0; i < count; ++i) {
    if (launch.rows[i].row < 0 || launch.rows[i].row >= rows) {
      return Status::error("draw_rows: row " + std::to_string(launch.rows[i].row) + " of " +
                           std::to_string(rows));
    }
  }
  DrawLaunch l = launch;
  l.wide_histograms = draw_wide_histograms_flag().load(std::memory_order_relaxed);
  auto kernel =
      draw_ahead_flag().load(std::memory_order_relaxed) ? draw_kernel<true> : draw_kernel<false>;
  KS_CUDA_CHECK("draw_rows", launch_pdl(kernel, dim3(unsigned(count)), dim3(kThreads), 0, stream, x,
                                        cols, l, out, work));
  KS_CUDA_CHECK_LAUNCH("draw_rows", "draw_kernel");
  return Status::ok();
}

}  // namespace kestrel::cuda
