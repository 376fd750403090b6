// cpu::matmul: dispatch, activation quantization and the AVX2 kernels (the AVX-512 kernels are in
// matmul_avx512.cpp).
//
// AVX2 integer kernels: VPMADDUBSW multiplies unsigned by signed bytes, adding pairs into int16
// (saturating), and VPMADDWD with ones widens to int32. For int4 the unsigned operand is the
// nibble (u <= 15, so a pair sum <= 2 * 15 * 127 never saturates) and the zero point is removed
// afterwards with the activation group sums, as in the AVX-512 kernels. For int8 a byte code
// offset by 128 would saturate, so the sign trick is used instead: |w| times x with w's sign.
#include "backend/cpu/matmul.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <thread>

#include "backend/cpu/cpu_features.h"
#include "core/stats.h"

namespace kestrel::cpu {

namespace {

using detail::kActGroup;
using detail::kRowTile;
using detail::MatmulArgs;

std::atomic<bool> g_force_avx2{false};

bool use_avx512() {
  return !g_force_avx2.load(std::memory_order_relaxed) && has_avx512_kernels();
}

// Per calling thread, grown on demand and reused, so decode steps do not allocate.
class Scratch {
 public:
  void* get(size_t bytes) {
    if (bytes > capacity_) {
      const size_t rounded = (bytes + 4095) / 4096 * 4096;
      void* p = std::aligned_alloc(64, rounded);
      if (p == nullptr) throw std::bad_alloc();
      buffer_.reset(p);
      capacity_ = rounded;
    }
    return buffer_.get();
  }

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> buffer_;
  size_t capacity_ = 0;
};

thread_local Scratch t_activation_scratch;

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// Where quantize_activations writes, and what it reads: the job of one call.
struct ActivationJob {
  const float* x = nullptr;  // [n, cols]
  int64_t cols = 0;
  int64_t groups = 0;
  int64_t groups_padded = 0;
  bool quad_layout = false;  // AVX-512 value order (matmul.h)
  int8_t* values = nullptr;  // [n, groups_padded * 32]
  float* scales = nullptr;   // [n, groups_padded]
  float* lanes = nullptr;    // [n, groups_padded * 4], quad layout only
  float* sums = nullptr;     // [n, groups_padded]
};

// Token t: x[t, :] -> int8 groups with scale amax / 127, rounded to nearest even.
void quantize_activation_row(const ActivationJob& job, int64_t t) {
  const int64_t groups = job.groups;
  const int64_t gp = job.groups_padded;
  const float* x = job.x + t * job.cols;
  int8_t* values = job.values + t * gp * kActGroup;
  float* scales = job.scales + t * gp;
  float* sums = job.sums + t * gp;
  float* lanes = job.lanes != nullptr ? job.lanes + t * gp * 4 : nullptr;
  // Zero the padding first: in the quad layout a partial last quad interleaves real and padding
  // groups, so it is cleared whole and then overwritten.
  const int64_t full_quads_groups = groups / 4 * 4;
  std::memset(values + full_quads_groups * kActGroup, 0,
              size_t((gp - full_quads_groups) * kActGroup));
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < groups; ++g) {
    const float* src = x + g * kActGroup;
    const __m256 v0 = _mm256_loadu_ps(src);
    const __m256 v1 = _mm256_loadu_ps(src + 8);
    const __m256 v2 = _mm256_loadu_ps(src + 16);
    const __m256 v3 = _mm256_loadu_ps(src + 24);
    const __m256 m =
        _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, abs_mask), _mm256_and_ps(v1, abs_mask)),
                      _mm256_max_ps(_mm256_and_ps(v2, abs_mask), _mm256_and_ps(v3, abs_mask)));
    const float amax = hmax(m);
    const float scale = amax / 127.0f;
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    // The default MXCSR rounding is to nearest even; |x * inv| <= 127 so nothing saturates.
    const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv));
    const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
    const __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv));
    const __m256i q3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
    const int sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3)));
    // packs interleave 128-bit lanes; the permute restores value order.
    const __m256i packed = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3)), order);
    int8_t* lo;
    int8_t* hi;
    if (job.quad_layout) {
      lo = values + (g / 4) * 128 + (g % 4) * 16;
      hi = lo + 64;
    } else {
      lo = values + g * kActGroup;
      hi = lo + 16;
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm256_castsi256_si128(packed));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm256_extracti128_si256(packed, 1));
    scales[g] = scale;
    sums[g] = scale * float(sum);
    if (lanes != nullptr) {
      for (int i = 0; i < 4; ++i) lanes[g * 4 + i] = scale;
    }
  }
  std::fill(scales + groups, scales + gp, 0.0f);
  std::fill(sums + groups, sums + gp, 0.0f);
  if (lanes != nullptr) std::fill(lanes + groups * 4, lanes + gp * 4, 0.0f);
}

// Quantizes x [n, cols] into scratch memory owned by the calling thread.
detail::QuantizedActivations quantize_activations(const float* x, int64_t n, int64_t cols,
                                                  bool quad_layout, ThreadPool& pool) {
  ActivationJob job;
  job.x = x;
  job.cols = cols;
  job.groups = cols / kActGroup;
  job.groups_padded = (job.groups + 15) / 16 * 16;
  job.quad_layout = quad_layout;
  const size_t floats = size_t(n) * size_t(job.groups_padded);
  const size_t values_bytes = floats * kActGroup;
  const size_t lanes_floats = quad_layout ? floats * 4 : 0;
  auto* base = static_cast<uint8_t*>(
      t_activation_scratch.get(values_bytes + (2 * floats + lanes_floats) * sizeof(float)));
  job.values = reinterpret_cast<int8_t*>(base);
  job.scales = reinterpret_cast<float*>(base + values_bytes);
  job.sums = job.scales + floats;
  job.lanes = quad_layout ? job.sums + floats : nullptr;
  // A few microseconds of work per thousand groups; below that the fork-join costs more.
  if (n * job.groups >= 4096) {
    // One pointer captured, so std::function holds the lambda without allocating.
    pool.parallel_for(n, 1, [&job](int64_t begin, int64_t end, int) {
      for (int64_t t = begin; t < end; ++t) quantize_activation_row(job, t);
    });
  } else {
    for (int64_t t = 0; t < n; ++t) quantize_activation_row(job, t);
  }
  detail::QuantizedActivations q;
  q.groups = job.groups;
  q.groups_padded = job.groups_padded;
  q.values = job.values;
  q.scales = job.scales;
  q.scale_lanes = job.lanes;
  q.sums = job.sums;
  return q;
}

// ---- AVX2 kernels: tiles of R weight rows x T tokens. One-row tiles for small n, so each
// thread reads its weights as one sequential stream (which the hardware prefetchers follow much
// better than several interleaved rows); kRowTile-row tiles for large n, to reuse each loaded
// activation across rows. 16 ymm registers allow up to 4 x 2 accumulators.

constexpr int kOneRowMaxTokens = 8;
constexpr int kOneRowTokenTile = 4;
constexpr int kRowsTokenTile = 2;

template <int R, int T>
void store_tile(const MatmulArgs& a, int64_t r0, int64_t t0, const __m256 (&acc)[R][T]) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const int64_t row = r0 + r;
    if (row >= a.rows) break;
    const float b = a.bias != nullptr ? a.bias[row] : 0.0f;
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) a.y[(t0 + t) * a.rows + row] = hsum(acc[r][t]) + b;
  }
}

// Eight fp16 values, one per group of 32 weights, for groups g0 .. g0 + ng - 1 (ng <= 8; the
// rest are zero).
template <int kBlock>
inline __m256 load_group_halves(const uint16_t* row_values, int64_t g0, int ng) {
  if (ng == 8) {
    if constexpr (kBlock == 32) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row_values + g0)));
    } else {
      const __m128 d =
          _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row_values + g0 / 2)));
      return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d),
                                      _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    }
  }
  constexpr int kGroupsPerBlock = kBlock / kActGroup;
  alignas(16) uint16_t h[8] = {};
  for (int i = 0; i < ng; ++i) h[i] = row_values[(g0 + i) / kGroupsPerBlock];
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h)));
}

template <int kBlock, bool kInt8, int R, int T>
[[gnu::always_inline]] inline void int_tile_avx2(const MatmulArgs& a, int64_t r0, int64_t t0) {
  const int64_t groups = a.xq.groups;
  const int64_t gp = a.xq.groups_padded;
  const uint8_t* wrow[R];
  const uint16_t* drow[R];
  const uint16_t* mrow[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    // Rows past the end repeat the last row; their results are computed and dropped.
    const int64_t row = std::min(r0 + r, a.rows - 1);
    wrow[r] = a.data + row * int64_t(a.data_row_bytes);
    drow[r] = a.scales + row * a.blocks_per_row;
    mrow[r] = a.mins != nullptr ? a.mins + row * a.blocks_per_row : nullptr;
  }
  const int8_t* xv[T];
  const float* xsc[T];
  const float* xsum[T];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
    xv[t] = a.xq.values + (t0 + t) * gp * kActGroup;
    xsc[t] = a.xq.scales + (t0 + t) * gp;
    xsum[t] = a.xq.sums + (t0 + t) * gp;
  }
  // The int8 sign trick multiplies the true signed value, so only int4 needs a zero point.
  const bool asym = a.mins != nullptr;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);

  // Small tiles alternate two accumulators between groups, so that the fma latency does not
  // serialize the loop.
  constexpr bool kTwoChains = R * T <= 2;
  __m256 acc[R][T];
  __m256 acc_odd[R][T];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[r][t] = acc_odd[r][t] = _mm256_setzero_ps();
  }
  // weight scale * activation scale per group of the current 8-group chunk
  alignas(32) float scale[R][T][8];
  for (int64_t g0 = 0; g0 < groups; g0 += 8) {
    const int ng = int(std::min<int64_t>(8, groups - g0));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256 d = load_group_halves<kBlock>(drow[r], g0, ng);
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        _mm256_store_ps(scale[r][t], _mm256_mul_ps(d, _mm256_load_ps(xsc[t] + g0)));
      }
      if constexpr (!kInt8) {
        const __m256 offset = asym ? load_group_halves<kBlock>(mrow[r], g0, ng)
                                   : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) {
          acc[r][t] = _mm256_fmadd_ps(offset, _mm256_load_ps(xsum[t] + g0), acc[r][t]);
        }
      }
    }
    // Group j of the chunk, accumulated into `sums`.
    const auto group = [&](int j, __m256(&sums)[R][T]) {
      const int64_t g = g0 + j;
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        if constexpr (kInt8) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow[r] + g * 32));
          const __m256i wabs = _mm256_abs_epi8(w);
#pragma GCC unroll 16
          for (int t = 0; t < T; ++t) {
            const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(xv[t] + g * 32));
            const __m256i p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w));
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
            sums[r][t] = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(&scale[r][t][j]), sums[r][t]);
          }
        } else {
          const __m128i packed =
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow[r] + g * 16));
          const __m256i u = _mm256_and_si256(
              _mm256_srlv_epi32(_mm256_broadcastsi128_si256(packed), shift), nibble);
#pragma GCC unroll 16
          for (int t = 0; t < T; ++t) {
            const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(xv[t] + g * 32));
            const __m256i p = _mm256_maddubs_epi16(u, x);
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
            sums[r][t] = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(&scale[r][t][j]), sums[r][t]);
          }
        }
      }
    };
    if (ng == 8) {
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) group(j, kTwoChains && (j & 1) ? acc_odd : acc);
    } else {
      for (int j = 0; j < ng; ++j) group(j, acc);
    }
  }
  if constexpr (kTwoChains) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_add_ps(acc[r][t], acc_odd[r][t]);
    }
  }
  store_tile<R, T>(a, r0, t0, acc);
}

template <WeightFormat F>
inline __m256 load_float8(const uint8_t* row, int64_t c) {
  if constexpr (F == WeightFormat::fp32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + c);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 2));
    if constexpr (F == WeightFormat::fp16) {
      return _mm256_cvtph_ps(h);
    } else {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
}

template <WeightFormat F>
inline float load_float1(const uint8_t* row, int64_t c) {
  if constexpr (F == WeightFormat::fp32) {
    return reinterpret_cast<const float*>(row)[c];
  } else {
    uint16_t h;
    std::memcpy(&h, row + c * 2, 2);
    if constexpr (F == WeightFormat::fp16) {
      return _cvtsh_ss(h);
    } else {
      uint32_t bits = uint32_t(h) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
  }
}

template <WeightFormat F, int R, int T>
[[gnu::always_inline]] inline void float_tile_avx2(const MatmulArgs& a, int64_t r0, int64_t t0) {
  const int64_t cols = a.cols;
  const uint8_t* wrow[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    wrow[r] = a.data + std::min(r0 + r, a.rows - 1) * int64_t(a.data_row_bytes);
  }
  const float* xr[T];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) xr[t] = a.x + (t0 + t) * cols;

  __m256 acc[R][T];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    __m256 w[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) w[r] = load_float8<F>(wrow[r], c);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const __m256 xv = _mm256_loadu_ps(xr[t] + c);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(w[r], xv, acc[r][t]);
    }
  }
  float tail[R][T] = {};
  for (; c < cols; ++c) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float w = load_float1<F>(wrow[r], c);
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) tail[r][t] += w * xr[t][c];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      acc[r][t] = _mm256_add_ps(acc[r][t], _mm256_setr_ps(tail[r][t], 0, 0, 0, 0, 0, 0, 0));
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

// Kernels indexed by token-tile size, for one-row tiles and for kRowTile-row tiles, and the
// decode loop.
struct TileSet {
  TileFn one_row[kOneRowTokenTile + 1];
  TileFn rows[kRowsTokenTile + 1];
  void (*one_token)(const MatmulArgs&, int64_t, int64_t);
};

void run_tiles(const MatmulArgs& a, int64_t row_begin, int64_t row_end, const TileSet& set) {
  if (a.n == 1) {
    set.one_token(a, row_begin, row_end);
    return;
  }
  if (a.n <= kOneRowMaxTokens) {
    for (int64_t r0 = row_begin; r0 < row_end; ++r0) {
      for (int64_t t0 = 0; t0 < a.n; t0 += kOneRowTokenTile) {
        set.one_row[std::min<int64_t>(kOneRowTokenTile, a.n - t0)](a, r0, t0);
      }
    }
    return;
  }
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowTile) {
    for (int64_t t0 = 0; t0 < a.n; t0 += kRowsTokenTile) {
      set.rows[std::min<int64_t>(kRowsTokenTile, a.n - t0)](a, r0, t0);
    }
  }
}

template <int kBlock, bool kInt8>
constexpr TileSet kIntTiles = {
    {nullptr, int_tile_avx2<kBlock, kInt8, 1, 1>, int_tile_avx2<kBlock, kInt8, 1, 2>,
     int_tile_avx2<kBlock, kInt8, 1, 3>, int_tile_avx2<kBlock, kInt8, 1, 4>},
    {nullptr, int_tile_avx2<kBlock, kInt8, kRowTile, 1>, int_tile_avx2<kBlock, kInt8, kRowTile, 2>},
    one_token_rows<int_tile_avx2<kBlock, kInt8, 1, 1>>};

template <WeightFormat F>
constexpr TileSet kFloatTiles = {
    {nullptr, float_tile_avx2<F, 1, 1>, float_tile_avx2<F, 1, 2>, float_tile_avx2<F, 1, 3>,
     float_tile_avx2<F, 1, 4>},
    {nullptr, float_tile_avx2<F, kRowTile, 1>, float_tile_avx2<F, kRowTile, 2>},
    one_token_rows<float_tile_avx2<F, 1, 1>>};

}  // namespace

namespace detail {

void matmul_rows_avx2(const MatmulArgs& a, int64_t row_begin, int64_t row_end) {
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

}  // namespace detail

const char* matmul_isa() {
  return use_avx512() ? "avx512-vnni" : "avx2";
}

namespace detail {

uint64_t int8_macs_avx2(int64_t iterations, int seed) {
  // Six independent products a turn, each into its own accumulator: only the add is carried
  // from turn to turn, so the chains wait on nothing but the multiply units (a product fed into
  // the next measured the latency, about a third slower). An empty asm makes each unsigned
  // operand unknown again every turn, so no product is hoisted out of the loop; six operands,
  // six accumulators, the signed operand and the ones fit AVX2's 16 registers.
  constexpr int kChains = 6;
  const __m256i x = _mm256_set1_epi8(char(2 + (seed & 3)));
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i u[kChains];
  __m256i acc[kChains];
#pragma GCC unroll 6
  for (int c = 0; c < kChains; ++c) {
    u[c] = _mm256_set1_epi8(char(1 + ((seed + c) & 7)));
    acc[c] = _mm256_setzero_si256();
  }
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 6
    for (int c = 0; c < kChains; ++c) {
      asm volatile("" : "+x"(u[c]));
      acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(_mm256_maddubs_epi16(u[c], x), ones));
    }
  }
#pragma GCC unroll 6
  for (int c = 0; c < kChains; ++c) asm volatile("" : : "x"(acc[c]));  // the sums are used
  return uint64_t(iterations) * kChains * 32;
}

}  // namespace detail

double measure_int8_tops(ThreadPool& pool, int passes) {
  const bool avx512 = use_avx512();
  // A pass is about 4-8 ms on the development machine's two cores, well past the pool's
  // wake-up; four tasks a thread that has a hardware thread (the rate is the cores'; `-t 1024`
  // on two cores would run 1024 threads' work), so a thread that starts late still finds work.
  const int hardware = int(std::thread::hardware_concurrency());
  const int64_t units = int64_t(hardware > 0 ? std::min(pool.size(), hardware) : pool.size()) * 4;
  const int64_t iterations = avx512 ? 500000 : 300000;
  const int seed = int(units);    // unknown to the compiler
  std::atomic<uint64_t> macs{0};  // the last pass's; every pass does the same work
  auto multiply = [&]() -> Status {
    macs.store(0, std::memory_order_relaxed);
    pool.parallel_for(units, 1, [&](int64_t begin, int64_t end, int) {
      uint64_t done = 0;
      for (int64_t i = begin; i < end; ++i) {
        done += avx512 ? detail::int8_macs_avx512(iterations, seed)
                       : detail::int8_macs_avx2(iterations, seed);
      }
      macs.fetch_add(done, std::memory_order_relaxed);
    });
    return Status::ok();
  };
  Result<double> best_s = fastest_pass_seconds(passes, multiply);
  if (!best_s.is_ok()) return 0;
  return 2.0 * double(macs.load()) / *best_s / 1e12;
}

void set_force_avx2(bool force) {
  g_force_avx2.store(force, std::memory_order_relaxed);
}

void matmul(const QuantWeight& w, const float* x, int64_t n, float* y, const float* bias,
            ThreadPool& pool) {
  if (n <= 0 || w.rows <= 0) return;
  const bool avx512 = use_avx512();
  MatmulArgs a;
  a.format = w.format;
  a.rows = w.rows;
  a.cols = w.cols;
  a.block = w.block;
  a.data = w.data.data();
  a.data_row_bytes = w.data_row_bytes();
  a.scales = w.scales.empty() ? nullptr : w.scales.as<uint16_t>();
  a.mins = w.mins.empty() ? nullptr : w.mins.as<uint16_t>();
  a.blocks_per_row = w.blocks_per_row();
  a.n = n;
  a.x = x;
  a.y = y;
  a.bias = bias;
  if (is_quantized(w.format)) a.xq = quantize_activations(x, n, w.cols, avx512, pool);

  a.kernel = avx512 ? detail::matmul_rows_avx512 : detail::matmul_rows_avx2;
  // Work is handed out in whole row tiles. One pointer captured, so std::function holds the
  // lambda without allocating.
  const int64_t tiles = (w.rows + kRowTile - 1) / kRowTile;
  pool.parallel_for(tiles, 1, [&a](int64_t begin, int64_t end, int) {
    a.kernel(a, begin * kRowTile, std::min(a.rows, end * kRowTile));
  });
}

}  // namespace kestrel::cpu
