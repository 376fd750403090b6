// AVX-512 kernels for cpu::matmul (F, BW, VL, DQ and VNNI; chosen at run time).
//
// This file is compiled with AVX-512 flags, so it must not instantiate any template or inline
// function that baseline code also uses (std:: algorithms and containers, core/ helpers): the
// linker keeps one copy of each, and if it kept this one the AVX2 path would execute AVX-512
// instructions on CPUs without them. Everything here is intrinsics and functions in an
// anonymous namespace.
//
// Integer formats. Every format is treated as an unsigned byte code u per weight, multiplied by
// the signed int8 activations with VPDPBUSD:
//   sym_int4   u = nibble,     value = (u - 8) * d
//   sym_int8   u = q ^ 0x80,   value = (u - 128) * d
//   asym_int4  u = nibble,     value = u * d + m
// so one group's dot product is d * sx * Σ u·xq + offset * (sx * Σ xq), offset = -8d, -128d or m.
// The second term only needs the activation group sums, applied once per 16 groups.
// One 64-byte load holds four int4 groups (a "quad"); its low nibbles are values 0..15 of each
// group and its high nibbles values 16..31, which is why the activations are laid out per quad
// (matmul.h). The int32 lanes of a quad's dot products then belong to groups 0..3 by 128-bit
// lane; scales are converted once per 16 groups (one fp32 lane per group) and broadcast to the
// quad's lanes with one permute.
//
// Tiles. With few tokens (decode) the kernels are memory bound, and a tile is one weight row:
// each thread then reads one sequential stream, which the hardware prefetchers follow at close
// to full bandwidth. Four interleaved row streams of a 4-row tile reached only about 60% of it
// on Zen 4, and software prefetching made both worse. With many tokens (prefill) the kernels
// are compute bound, and 4-row x 4-token tiles reuse every loaded activation and weight
// register four times.
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own `__Y = __Y` placeholders
// (GCC bug 105593, fixed in 13); the pragma must precede the header to cover its lines.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "backend/cpu/matmul.h"

namespace kestrel::cpu::detail {

namespace {

constexpr int kTokenTile = 4;
// One-row tiles up to this many tokens (see run_tiles).
constexpr int kOneRowMaxTokens = 8;

inline int64_t min_i64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

inline float hsum(__m512 v) {
  return _mm512_reduce_add_ps(v);
}

template <int R, int T>
inline void store_tile(const MatmulArgs& a, int64_t r0, int64_t t0, const __m512 (&acc)[R][T]) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const int64_t row = r0 + r;
    if (row >= a.rows) break;
    const float b = a.bias != nullptr ? a.bias[row] : 0.0f;
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) a.y[(t0 + t) * a.rows + row] = hsum(acc[r][t]) + b;
  }
}

// Weight scales of one 16-group chunk, one fp32 lane per group.
template <int kBlock>
inline __m512 load_chunk_halves(const uint16_t* row_values, int64_t g0, int ng) {
  if constexpr (kBlock == 32) {
    const __mmask16 m = ng >= 16 ? __mmask16(0xffff) : __mmask16((1u << ng) - 1);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row_values + g0));
  } else {
    const int nb = ng / 2;
    const __mmask8 m = nb >= 8 ? __mmask8(0xff) : __mmask8((1u << nb) - 1);
    const __m256 v = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(m, row_values + g0 / 2));
    const __m512i dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    return _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(v));
  }
}

// Unsigned codes of one quad of groups: lo = values 0..15 of each group, hi = values 16..31.
template <bool kInt8>
inline void load_quad_codes(const uint8_t* row, int64_t g, int nq, __m512i* lo, __m512i* hi) {
  if constexpr (kInt8) {
    // Natural order: 32 bytes per group; regroup 16-byte halves to the quad layout.
    const uint8_t* p = row + g * 32;
    __m512i a;
    __m512i b;
    if (nq >= 4) {
      a = _mm512_loadu_si512(p);
      b = _mm512_loadu_si512(p + 64);
    } else {
      const int bytes = nq * 32;
      a = _mm512_maskz_loadu_epi8(bytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1, p);
      b = _mm512_maskz_loadu_epi8(bytes > 64 ? (__mmask64(1) << (bytes - 64)) - 1 : 0, p + 64);
    }
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    *lo = _mm512_xor_si512(_mm512_shuffle_i64x2(a, b, 0x88), flip);
    *hi = _mm512_xor_si512(_mm512_shuffle_i64x2(a, b, 0xdd), flip);
  } else {
    const uint8_t* p = row + g * 16;
    const __m512i raw = nq >= 4 ? _mm512_loadu_si512(p)
                                : _mm512_maskz_loadu_epi8((__mmask64(1) << (nq * 16)) - 1, p);
    const __m512i mask = _mm512_set1_epi8(0x0f);
    *lo = _mm512_and_si512(raw, mask);
    *hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
  }
}

template <int kBlock, bool kInt8, int R, int T>
[[gnu::always_inline]] inline void int_tile(const MatmulArgs& a, int64_t r0, int64_t t0) {
  const int64_t groups = a.xq.groups;
  const int64_t gp = a.xq.groups_padded;
  const uint8_t* wrow[R];
  const uint16_t* drow[R];
  const uint16_t* mrow[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    // Rows past the end repeat the last row; their results are computed and dropped.
    const int64_t row = min_i64(r0 + r, a.rows - 1);
    wrow[r] = a.data + row * int64_t(a.data_row_bytes);
    drow[r] = a.scales + row * a.blocks_per_row;
    mrow[r] = a.mins != nullptr ? a.mins + row * a.blocks_per_row : nullptr;
  }
  const int8_t* xv[T];
  const float* xl[T];
  const float* xsc[T];
  const float* xs[T];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
    xv[t] = a.xq.values + (t0 + t) * gp * kActGroup;
    xl[t] = a.xq.scale_lanes + (t0 + t) * gp * 4;
    xsc[t] = a.xq.scales + (t0 + t) * gp;
    xs[t] = a.xq.sums + (t0 + t) * gp;
  }
  const __m512 neg_zero_point = _mm512_set1_ps(kInt8 ? -128.0f : -8.0f);
  const bool asym = a.mins != nullptr;
  // Lane l of a quad's dot products belongs to group l / 4 of the quad.
  const __m512i quad_idx[4] = {
      _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
      _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7),
      _mm512_setr_epi32(8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11),
      _mm512_setr_epi32(12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15)};

  // Small tiles alternate two accumulators between quads, so that the fma latency does not
  // serialize the loop.
  constexpr bool kTwoChains = R * T <= 2;
  __m512 acc[R][T];
  __m512 acc_odd[R][T];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[r][t] = acc_odd[r][t] = _mm512_setzero_ps();
  }
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int ng = int(min_i64(16, groups - g0));
    // Per group lane: the weight scale, or for T == 1 weight scale * activation scale.
    __m512 scale[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 d = load_chunk_halves<kBlock>(drow[r], g0, ng);
      const __m512 offset =
          asym ? load_chunk_halves<kBlock>(mrow[r], g0, ng) : _mm512_mul_ps(d, neg_zero_point);
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        acc[r][t] = _mm512_fmadd_ps(offset, _mm512_load_ps(xs[t] + g0), acc[r][t]);
      }
      scale[r] = T == 1 ? _mm512_mul_ps(d, _mm512_load_ps(xsc[0] + g0)) : d;
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      if (4 * q >= ng) break;
      const int64_t g = g0 + 4 * q;
      const int nq = ng - 4 * q;
      __m512i lo[R];
      __m512i hi[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        load_quad_codes<kInt8>(wrow[r], g, nq, &lo[r], &hi[r]);
      }
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        const __m512i xlo = _mm512_load_si512(xv[t] + g * kActGroup);
        const __m512i xhi = _mm512_load_si512(xv[t] + g * kActGroup + 64);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], xlo);
          dot = _mm512_dpbusd_epi32(dot, hi[r], xhi);
          const __m512 lane_scale = _mm512_permutexvar_ps(quad_idx[q], scale[r]);
          __m512& sum = kTwoChains && (q & 1) ? acc_odd[r][t] : acc[r][t];
          if constexpr (T == 1) {
            sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), lane_scale, sum);
          } else {
            const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), lane_scale);
            sum = _mm512_fmadd_ps(scaled, _mm512_load_ps(xl[t] + g * 4), sum);
          }
        }
      }
    }
  }
  if constexpr (kTwoChains) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_add_ps(acc[r][t], acc_odd[r][t]);
    }
  }
  store_tile<R, T>(a, r0, t0, acc);
}

// 16 weights widened to fp32; `count` < 16 loads only that many (the rest are zero).
template <WeightFormat F>
inline __m512 load_float16(const uint8_t* row, int64_t c, int count) {
  const __mmask16 m = count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1);
  if constexpr (F == WeightFormat::fp32) {
    return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(row) + c);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(row) + c);
    if constexpr (F == WeightFormat::fp16) {
      return _mm512_cvtph_ps(h);
    } else {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

template <WeightFormat F, int R, int T>
[[gnu::always_inline]] inline void float_tile(const MatmulArgs& a, int64_t r0, int64_t t0) {
  const int64_t cols = a.cols;
  const uint8_t* wrow[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    wrow[r] = a.data + min_i64(r0 + r, a.rows - 1) * int64_t(a.data_row_bytes);
  }
  const float* xr[T];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) xr[t] = a.x + (t0 + t) * cols;

  __m512 acc[R][T];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < cols; c += 16) {
    const int count = int(min_i64(16, cols - c));
    __m512 w[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      w[r] = load_float16<F>(wrow[r], c, count);
    }
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const __m512 xv =
          load_float16<WeightFormat::fp32>(reinterpret_cast<const uint8_t*>(xr[t]), c, count);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(w[r], xv, acc[r][t]);
    }
  }
  store_tile<R, T>(a, r0, t0, acc);
}

using TileFn = void (*)(const MatmulArgs&, int64_t, int64_t);

// One token, rows [begin, end) one after the other: the decode loop, with the per-tile setup
// hoisted out of it by inlining.
template <void (*kTile)(const MatmulArgs&, int64_t, int64_t)>
void one_token_rows(const MatmulArgs& a, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) kTile(a, r, 0);
}

// Kernels indexed by token-tile size (1..kTokenTile) for one-row tiles and for kRowTile-row
// tiles, and the decode loop.
struct TileSet {
  TileFn one_row[kTokenTile + 1];
  TileFn rows[kTokenTile + 1];
  void (*one_token)(const MatmulArgs&, int64_t, int64_t);
};

void run_tiles(const MatmulArgs& a, int64_t row_begin, int64_t row_end, const TileSet& set) {
  if (a.n == 1) {
    set.one_token(a, row_begin, row_end);
    return;
  }
  if (a.n <= kOneRowMaxTokens) {
    for (int64_t r0 = row_begin; r0 < row_end; ++r0) {
      for (int64_t t0 = 0; t0 < a.n; t0 += kTokenTile) {
        set.one_row[min_i64(kTokenTile, a.n - t0)](a, r0, t0);
      }
    }
    return;
  }
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowTile) {
    for (int64_t t0 = 0; t0 < a.n; t0 += kTokenTile) {
      set.rows[min_i64(kTokenTile, a.n - t0)](a, r0, t0);
    }
  }
}

template <int kBlock, bool kInt8>
constexpr TileSet kIntTiles = {
    {nullptr, int_tile<kBlock, kInt8, 1, 1>, int_tile<kBlock, kInt8, 1, 2>,
     int_tile<kBlock, kInt8, 1, 3>, int_tile<kBlock, kInt8, 1, 4>},
    {nullptr, int_tile<kBlock, kInt8, kRowTile, 1>, int_tile<kBlock, kInt8, kRowTile, 2>,
     int_tile<kBlock, kInt8, kRowTile, 3>, int_tile<kBlock, kInt8, kRowTile, 4>},
    one_token_rows<int_tile<kBlock, kInt8, 1, 1>>};

template <WeightFormat F>
constexpr TileSet kFloatTiles = {
    {nullptr, float_tile<F, 1, 1>, float_tile<F, 1, 2>, float_tile<F, 1, 3>, float_tile<F, 1, 4>},
    {nullptr, float_tile<F, kRowTile, 1>, float_tile<F, kRowTile, 2>, float_tile<F, kRowTile, 3>,
     float_tile<F, kRowTile, 4>},
    one_token_rows<float_tile<F, 1, 1>>};

}  // namespace

void matmul_rows_avx512(const MatmulArgs& a, int64_t row_begin, int64_t row_end) {
  switch (a.format) {
    case WeightFormat::fp32:
      return run_tiles(a, row_begin, row_end, kFloatTiles<WeightFormat::fp32>);
    case WeightFormat::fp16:
      return run_tiles(a, row_begin, row_end, kFloatTiles<WeightFormat::fp16>);
    case WeightFormat::bf16:
      return run_tiles(a, row_begin, row_end, kFloatTiles<WeightFormat::bf16>);
    case WeightFormat::sym_int8:
      return a.block == 32 ? run_tiles(a, row_begin, row_end, kIntTiles<32, true>)
                           : run_tiles(a, row_begin, row_end, kIntTiles<64, true>);
    case WeightFormat::sym_int4:
    case WeightFormat::asym_int4:
      return a.block == 32 ? run_tiles(a, row_begin, row_end, kIntTiles<32, false>)
                           : run_tiles(a, row_begin, row_end, kIntTiles<64, false>);
  }
}

uint64_t int8_macs_avx512(int64_t iterations, int seed) {
  // Twelve chains: VPDPBUSD's latency (4-5 cycles) behind two issues a cycle; each chain carries
  // its accumulator, whose multiply-add cannot leave the loop. The operands come from the seed,
  // unknown to the compiler. int8_macs_avx2 in matmul.cpp is its twin: this file shares no code
  // with baseline code (the header says why).
  const __m512i u = _mm512_set1_epi8(char(1 + (seed & 7)));
  const __m512i x = _mm512_set1_epi8(char(2 + (seed & 3)));
  constexpr int kChains = 12;
  __m512i acc[kChains];
#pragma GCC unroll 12
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_epi32(c);
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbusd_epi32(acc[c], u, x);
  }
#pragma GCC unroll 12
  for (int c = 0; c < kChains; ++c) asm volatile("" : : "v"(acc[c]));  // the sums are used
  return uint64_t(iterations) * kChains * 64;
}

}  // namespace kestrel::cpu::detail
