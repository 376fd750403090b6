// The arithmetic of a sampled token's draw (Sampler's steps 3-7), shared by the host sampler and
// the CUDA sampler (backend/cuda/draw.cu) so that both give the same token for the same row,
// settings and uniform number, to the bit. A host file computing with these is compiled with
// -ffp-contract=off (CMakeLists.txt: sample/sampler.cpp), or g++ fuses x * inv_t - top into one
// fma where the device rounds twice; the device side uses explicitly rounded intrinsics.
//
// Every step is either exact or one IEEE operation whose rounding both sides share:
//   - the candidates' order is that of their float logits (a bit pattern, exact);
//   - a probability is exp(l / T - max / T) by exp_nonpositive below (IEEE operations and fmas);
//   - it becomes a fixed-point integer, round(p * 2^kProbBits) (the most probable token is
//     exactly 2^kProbBits), and every sum after that is an integer sum, exact in any order: a
//     device's tree of partial sums gives the host's sequential total. A token whose probability
//     is below 2^-41 of the most probable one's rounds to 0 and is never drawn.
//   - top-p's target, min-p's floor and the draw's point are each one rounding of a double.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define KS_DRAW_HD __host__ __device__ __forceinline__
#else
#include <bit>
#define KS_DRAW_HD inline
#endif

namespace kestrel::draw {

// Fraction bits of a fixed-point probability. A row of up to 2^23 tokens sums below 2^63.
constexpr int kProbBits = 40;
constexpr int64_t kMaxTokens = int64_t(1) << 23;
constexpr double kProbScale = 0x1p40;
static_assert(kProbScale == double(int64_t(1) << kProbBits));

// A logit as a candidate key: +inf counts as the largest finite float; NaN and -inf are never
// candidates.
KS_DRAW_HD bool valid_logit(float l) {
  return l == l && l != -INFINITY;
}

// A valid logit's key: +inf counts as the largest finite float.
KS_DRAW_HD float logit_key(float l) {
  return l > 3.40282347e+38f ? 3.40282347e+38f : l;
}

// The key of a valid logit as an unsigned integer of the same order (larger key, larger value).
// -0 is +0 (they compare equal, as the host's float comparisons take them).
KS_DRAW_HD uint32_t ordered_key(float l) {
  const float key = l == 0.0f ? 0.0f : logit_key(l);
#ifdef __CUDA_ARCH__
  const uint32_t bits = __float_as_uint(key);
#else
  const uint32_t bits = std::bit_cast<uint32_t>(key);
#endif
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// The key's float back from ordered_key.
KS_DRAW_HD float key_value(uint32_t ordered) {
  const uint32_t bits = (ordered & 0x80000000u) ? ordered & 0x7fffffffu : ~ordered;
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  return std::bit_cast<float>(bits);
#endif
}

KS_DRAW_HD double as_double(uint64_t bits) {
#ifdef __CUDA_ARCH__
  return __longlong_as_double(static_cast<long long>(bits));
#else
  return std::bit_cast<double>(bits);
#endif
}

KS_DRAW_HD int64_t as_int64(double v) {
#ifdef __CUDA_ARCH__
  return __double_as_longlong(v);
#else
  return std::bit_cast<int64_t>(v);
#endif
}

KS_DRAW_HD double fma_rn(double a, double b, double c) {
#ifdef __CUDA_ARCH__
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

KS_DRAW_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);  // never contracted into an fma
#else
  return a * b;
#endif
}

KS_DRAW_HD double sub_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, -b);
#else
  return a - b;
#endif
}

// exp(v) for v <= 0 (0 below -745.2), within 1 ulp of the C library's: exp(v) = 2^k exp(r),
// k = round(v / ln 2), r = v - k ln 2 (Cody and Waite's two-part ln 2, whose high part's
// trailing zeros keep k times it exact), |r| <= ln 2 / 2; exp(r) is its Taylor series to r^13
// (the next term is below 5e-18 there); 2^k is applied in two halves so that subnormal results
// come out right. Every step is an IEEE operation or an fma, so the bits are the same wherever
// the arithmetic is IEEE: the host's vectorized loop and a CUDA thread agree.
KS_DRAW_HD double exp_nonpositive(double x) {
  constexpr double kLog2e = 1.4426950408889634;
  constexpr double kLn2Hi = 0x1.62e42fefa3800p-1;
  constexpr double kLn2Lo = 0x1.ef35793c76730p-45;
  constexpr double kShifter = 0x1.8p52;  // v / ln 2 + this holds round(v / ln 2) in its low bits
  const double v = x > -746.0 ? x : -746.0;  // below, the result is 0 all the same
  const double shifted = fma_rn(v, kLog2e, kShifter);
  const double kd = sub_rn(shifted, kShifter);
  const int64_t k = as_int64(shifted) - as_int64(kShifter);
  const double r = fma_rn(-kd, kLn2Lo, fma_rn(-kd, kLn2Hi, v));
  // Horner's rule on 1/13!, 1/12!, ..., 1/1!, 1/0!.
  double p = fma_rn(1.0 / 6227020800.0, r, 1.0 / 479001600.0);
  p = fma_rn(p, r, 1.0 / 39916800.0);
  p = fma_rn(p, r, 1.0 / 3628800.0);
  p = fma_rn(p, r, 1.0 / 362880.0);
  p = fma_rn(p, r, 1.0 / 40320.0);
  p = fma_rn(p, r, 1.0 / 5040.0);
  p = fma_rn(p, r, 1.0 / 720.0);
  p = fma_rn(p, r, 1.0 / 120.0);
  p = fma_rn(p, r, 1.0 / 24.0);
  p = fma_rn(p, r, 1.0 / 6.0);
  p = fma_rn(p, r, 0.5);
  p = fma_rn(p, r, 1.0);
  p = fma_rn(p, r, 1.0);
  const int64_t k1 = k >> 1, k2 = k - k1;
  return mul_rn(mul_rn(p, as_double(uint64_t(k1 + 1023) << 52)),
                as_double(uint64_t(k2 + 1023) << 52));
}

KS_DRAW_HD double inverse_temperature(float temperature) {
#ifdef __CUDA_ARCH__
  return __drcp_rn(static_cast<double>(temperature));
#else
  return 1.0 / static_cast<double>(temperature);
#endif
}

KS_DRAW_HD double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// A candidate's logit scaled by 1 / T, less the most probable one's (the same product): the
// argument of its probability's exponential.
KS_DRAW_HD double scaled_gap(float key, float top_key, double inv_t) {
  return sub_rn(mul_rn(static_cast<double>(key), inv_t),
                mul_rn(static_cast<double>(top_key), inv_t));
}

// A probability in [0, 1] as a fixed-point integer, round(p * 2^kProbBits) to nearest even: adding
// 1.5 * 2^52 leaves the rounded value in the low bits (exact below 2^51), in IEEE operations that
// vectorize on the host and match a device's.
KS_DRAW_HD uint64_t fixed_from_prob(double p) {
  constexpr double kShifter = 0x1.8p52;
  return static_cast<uint64_t>(as_int64(add_rn(mul_rn(p, kProbScale), kShifter)) -
                               as_int64(kShifter));
}

// A candidate's fixed-point probability: its key and the most probable candidate's key.
KS_DRAW_HD uint64_t fixed_prob(float key, float top_key, double inv_t) {
  return fixed_from_prob(exp_nonpositive(scaled_gap(key, top_key, inv_t)));
}

KS_DRAW_HD double to_double(uint64_t v) {
#ifdef __CUDA_ARCH__
  return __ull2double_rn(v);
#else
  return static_cast<double>(v);
#endif
}

// Top-p's target mass: the tokens kept, most probable first, while the mass before each is below
// it (at least one).
KS_DRAW_HD uint64_t nucleus_target(float top_p, uint64_t total) {
  const double t = mul_rn(static_cast<double>(top_p), to_double(total));
#ifdef __CUDA_ARCH__
  return __double2ull_rn(t);
#else
  return static_cast<uint64_t>(std::nearbyint(t));
#endif
}

// Min-p's floor: tokens whose fixed-point probability is below it are dropped (the most
// probable one, 2^kProbBits, never is).
KS_DRAW_HD uint64_t min_p_floor(float min_p) {
  const double f = mul_rn(static_cast<double>(min_p), kProbScale);
#ifdef __CUDA_ARCH__
  return __double2ull_ru(f);
#else
  return static_cast<uint64_t>(std::ceil(f));
#endif
}

// The draw's point in [0, total): the token drawn is the first kept one, in id order, whose
// running mass passes it.
KS_DRAW_HD uint64_t draw_point(double u, uint64_t total) {
  const double t = mul_rn(u, to_double(total));
#ifdef __CUDA_ARCH__
  const uint64_t point = __double2ull_rd(t);
#else
  const uint64_t point = static_cast<uint64_t>(std::floor(t));
#endif
  return point < total ? point : total - 1;
}

// Of `count` tokens of equal probability `q`, taken in id order after tokens of mass `before`
// (`kept_any`: at least one token kept before them), how many the nucleus keeps: each while the
// mass before it is below `target`, the first of all whatever it is.
KS_DRAW_HD uint32_t nucleus_ties_kept(uint64_t before, uint64_t target, bool kept_any, uint64_t q,
                                      uint32_t count) {
  if (count == 0) return 0;
  uint32_t kept = 0;
  if (!kept_any) {
    kept = 1;
    before += q;
  }
  if (before >= target) return kept;
  if (q == 0) return count;                             // the mass never grows: all of them
  const uint64_t more = (target - before + q - 1) / q;  // while before + j q < target
  return more >= uint64_t(count - kept) ? count : kept + uint32_t(more);
}

}  // namespace kestrel::draw

#undef KS_DRAW_HD
