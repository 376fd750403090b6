#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include <cuda_fp8.h>

#include "backend/cuda/attention.cuh"
#include "backend/cuda/cuda_check.cuh"

namespace kestrel::cuda {
namespace {

constexpr int kDecodeThreads = 128;  // 32 keys x 4 lanes in the score phase
constexpr int kCombineThreads = 128;
constexpr int kPrefillThreads = 128;  // 4 warps x 16 query rows
constexpr int kPrefillRows = 64;
constexpr int kPrefillKeys = 64;
constexpr float kLog2e = 1.4426950408889634f;

// The element types of the three caches: storage, and conversion to and from float.
template <KvType kType>
struct Kv;
template <>
struct Kv<KvType::f16> {
  using T = __half;
  __device__ static T from(float x) { return __float2half_rn(x); }
};
template <>
struct Kv<KvType::f8> {
  using T = __nv_fp8_storage_t;
  __device__ static T from(float x) { return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3); }
};
template <>
struct Kv<KvType::f32> {
  using T = float;
  __device__ static T from(float x) { return x; }
};

constexpr float kFp8Max = 448.0f;  // e4m3's largest finite value

// The entries of one 32-bit word of a staged row, as floats (2 fp16, 4 fp8 or 1 fp32).
template <KvType kType>
struct Word;
template <>
struct Word<KvType::f16> {
  static constexpr int n = 2;
  __device__ static void get(uint32_t w, float (&f)[2]) {
    const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&w));
    f[0] = v.x;
    f[1] = v.y;
  }
};
template <>
struct Word<KvType::f8> {
  static constexpr int n = 4;
  __device__ static void get(uint32_t w, float (&f)[4]) {
    const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w & 0xffffu), __NV_E4M3);
    const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w >> 16), __NV_E4M3);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&lo));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&hi));
    f[0] = a.x;
    f[1] = a.y;
    f[2] = b.x;
    f[3] = b.y;
  }
};
template <>
struct Word<KvType::f32> {
  static constexpr int n = 1;
  __device__ static void get(uint32_t w, float (&f)[1]) { f[0] = __uint_as_float(w); }
};

// Every thread of the block gets the largest v of the block.
__device__ inline float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  return warp_max(lane < n_warps ? scratch[lane] : -INFINITY);
}

// Stores one cache row (K or V of one KV head at one position) whose elements i and i + half
// are x0 and x1 in thread i (threads past `half` hold nothing). fp8 rows are scaled by the
// row's largest magnitude, found over the whole block: every thread of the block must call.
// When `seen` is given, thread i also gets the two entries as load_kv_tile reads them back into
// fp16 (fp16 and fp8 caches), so a kernel can use the row without reading the cache. fp8: with
// `raw` given, thread i also puts its two entries' bytes at raw[i] and raw[i + half], and thread 0
// the row's scale at *raw_scale (the row as stored, for the decode kernel's raw tiles).
template <KvType kType>
__device__ inline void store_row(void* cache, float* scales, int64_t row, int head_dim, int i,
                                 float x0, float x1, float* scratch, __half* seen = nullptr,
                                 uint8_t* raw = nullptr, float* raw_scale = nullptr) {
  using T = typename Kv<kType>::T;
  const int half = head_dim / 2;
  const bool mine = i < half;
  T* dst = static_cast<T*>(cache) + row * head_dim;
  if constexpr (kType == KvType::f8) {
    const float amax = block_max(mine ? fmaxf(fabsf(x0), fabsf(x1)) : 0.0f, scratch);
    const float scale = amax > 0.0f ? amax / kFp8Max : 1.0f;
    const float inv = amax > 0.0f ? kFp8Max / amax : 1.0f;
    if (mine) {
      const T e0 = Kv<kType>::from(x0 * inv);
      const T e1 = Kv<kType>::from(x1 * inv);
      dst[i] = e0;
      dst[i + half] = e1;
      if (raw != nullptr) {
        raw[i] = uint8_t(e0);
        raw[i + half] = uint8_t(e1);
      }
      if (seen != nullptr) {
        // load_kv_tile's conversion: e4m3 to fp16 (exact), to float, times the row's scale.
        float f[4];
        Word<KvType::f8>::get(uint32_t(e0) | uint32_t(e1) << 8, f);
        seen[0] = __float2half_rn(f[0] * scale);
        seen[1] = __float2half_rn(f[1] * scale);
      }
    }
    if (threadIdx.x == 0) {
      scales[row] = scale;
      if (raw_scale != nullptr) *raw_scale = scale;
    }
  } else if (mine) {
    const T e0 = Kv<kType>::from(x0);
    const T e1 = Kv<kType>::from(x1);
    dst[i] = e0;
    dst[i + half] = e1;
    if constexpr (kType == KvType::f16) {
      if (seen != nullptr) {
        seen[0] = e0;
        seen[1] = e1;
      }
    }
  }
}

// The rotation of one pair (x0, x1) = elements (i, i + head_dim / 2) of a head at position pos,
// as rope_kernel (rope.cu) and HF compute it: an fp32 angle, fp32 cos and sin.
__device__ inline void rope_angle(int64_t pos, const float* inv_freq, int i, float& cos_v,
                                  float& sin_v) {
  sincosf(float(pos) * inv_freq[i], &sin_v, &cos_v);
}
__device__ inline float2 rotate(float x0, float x1, float cos_v, float sin_v) {
  return make_float2(x0 * cos_v - x1 * sin_v, x1 * cos_v + x0 * sin_v);
}

// Stores the batch's k and v rows: a block per (token, KV head), a thread per pair (i, i + half).
template <KvType kType>
__global__ void kv_write_kernel(AttentionArgs a, KvCache c) {
  pdl_wait();
  pdl_trigger();
  __shared__ float scratch[32];
  const int64_t t = blockIdx.x;
  const int kvh = blockIdx.y;
  const int64_t row = cache_row(c, a.layer, a.seq_ids[t], kvh, a.positions[t]);
  const int half = c.head_dim / 2;
  const int64_t kv_dim = int64_t(c.n_kv_heads) * c.head_dim;
  const float* k = a.k + t * kv_dim + int64_t(kvh) * c.head_dim;
  const float* v = a.v + t * kv_dim + int64_t(kvh) * c.head_dim;
  for (int base = 0; base < half; base += blockDim.x) {  // fp8: blockDim.x >= half, one round
    const int i = base + threadIdx.x;
    const bool mine = i < half;
    store_row<kType>(c.k, c.k_scale, row, c.head_dim, i, mine ? k[i] : 0.0f,
                     mine ? k[i + half] : 0.0f, scratch);
    store_row<kType>(c.v, c.v_scale, row, c.head_dim, i, mine ? v[i] : 0.0f,
                     mine ? v[i + half] : 0.0f, scratch);
  }
}

// rope_kernel (rope.cu) and kv_write_kernel fused. Blocks are (token, head: query heads, then
// KV heads), a thread per rotated pair, so a decode step's launch is one round of loads and
// stores; KV heads also store their rotated K row and their V row in the cache.
template <KvType kType>
__global__ void rope_kv_write_kernel(AttentionArgs a, KvCache c, const float* inv_freq) {
  pdl_wait();
  pdl_trigger();
  __shared__ float scratch[32];
  const int64_t t = blockIdx.x;
  const int head = blockIdx.y;
  const int64_t pos = a.positions[t];
  const int head_dim = c.head_dim;
  const int half = head_dim / 2;
  const bool is_q = head < a.n_heads;
  const int kvh = head - a.n_heads;
  float* base =
      is_q ? a.q + (t * a.n_heads + head) * head_dim : a.k + (t * c.n_kv_heads + kvh) * head_dim;
  const int64_t row = is_q ? 0 : cache_row(c, a.layer, a.seq_ids[t], kvh, pos);
  const float* v = a.v + (t * c.n_kv_heads + kvh) * head_dim;
  for (int b = 0; b < half; b += blockDim.x) {  // fp8: blockDim.x >= half, one round
    const int i = b + threadIdx.x;
    float r0 = 0.0f, r1 = 0.0f;
    if (i < half) {
      float cos_v, sin_v;
      rope_angle(pos, inv_freq, i, cos_v, sin_v);
      const float2 r = rotate(base[i], base[i + half], cos_v, sin_v);
      r0 = r.x;
      r1 = r.y;
      base[i] = r0;
      base[i + half] = r1;
    }
    if (is_q) continue;  // uniform over the block
    store_row<kType>(c.k, c.k_scale, row, head_dim, i, r0, r1, scratch);
    store_row<kType>(c.v, c.v_scale, row, head_dim, i, i < half ? v[i] : 0.0f,
                     i < half ? v[i + half] : 0.0f, scratch);
  }
}

// rope_kv_write_kernel for many tokens (prefill) and an fp16 or fp32 cache: a block per token,
// threadIdx.x a rotated pair and threadIdx.y a head (query heads, then KV heads) in steps of
// blockDim.y, so a pair's angle is computed once for every head of the token and a block does
// enough work to hide its start (a block per (token, head) spent 50 us on a 1024-token 8B layer,
// H200, where its bytes take ~6).
template <KvType kType>
__global__ void rope_kv_write_tokens_kernel(AttentionArgs a, KvCache c, const float* inv_freq) {
  static_assert(kType != KvType::f8, "fp8 rows need a block-wide maximum per row");
  pdl_wait();
  pdl_trigger();
  const int64_t t = blockIdx.x;
  const int64_t pos = a.positions[t];
  const int head_dim = c.head_dim;
  const int half = head_dim / 2;
  const int heads = a.n_heads + c.n_kv_heads;
  const int32_t seq = a.seq_ids[t];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float cos_v, sin_v;
    rope_angle(pos, inv_freq, i, cos_v, sin_v);
    for (int head = threadIdx.y; head < heads; head += blockDim.y) {
      const bool is_q = head < a.n_heads;
      const int kvh = head - a.n_heads;
      float* base = is_q ? a.q + (t * a.n_heads + head) * head_dim
                         : a.k + (t * c.n_kv_heads + kvh) * head_dim;
      const float* src = a.qkv == nullptr ? base
                         : is_q           ? a.qkv + t * a.qkv_stride + int64_t(head) * head_dim
                                : a.qkv + t * a.qkv_stride + (int64_t(a.n_heads) + kvh) * head_dim;
      float x0 = src[i], x1 = src[i + half];
      const float* bias = is_q ? a.q_bias : a.k_bias;
      if (bias != nullptr) {
        const int64_t at = int64_t(is_q ? head : kvh) * head_dim;
        x0 += bias[at + i];
        x1 += bias[at + i + half];
      }
      const float2 r = rotate(x0, x1, cos_v, sin_v);
      base[i] = r.x;
      base[i + half] = r.y;
      if (is_q) continue;
      const int64_t row = cache_row(c, a.layer, seq, kvh, pos);
      // v is written back only when its bias joins here and it was read from v (the
      // projection's output is v then).
      float* v = const_cast<float*>(a.v) + (t * c.n_kv_heads + kvh) * head_dim;
      const float* v_src =
          a.qkv == nullptr
              ? v
              : a.qkv + t * a.qkv_stride + (int64_t(a.n_heads) + c.n_kv_heads + kvh) * head_dim;
      float v0 = v_src[i], v1 = v_src[i + half];
      if (a.v_bias != nullptr) {
        v0 += a.v_bias[int64_t(kvh) * head_dim + i];
        v1 += a.v_bias[int64_t(kvh) * head_dim + i + half];
        if (a.qkv == nullptr) {
          v[i] = v0;
          v[i + half] = v1;
        }
      }
      store_row<kType>(c.k, c.k_scale, row, head_dim, i, r.x, r.y, nullptr);
      store_row<kType>(c.v, c.v_scale, row, head_dim, i, v0, v1, nullptr);
    }
  }
}

// Row stride, in 32-bit words, of the K and V chunks in shared memory: 16-byte aligned rows,
// offset by 4 banks from row to row so that the 8 keys a warp reads at once hit distinct banks.
__host__ __device__ inline int tile_stride_words(int head_dim, int entry_bytes) {
  return head_dim * entry_bytes / 4 + 4;
}

// Floats of the split kernel's shared memory before its K and V stages: queries,
// accumulators, scores, the running max, sum and rescale factor of each query head, rounded up
// to 16 bytes.
__host__ __device__ inline int split_smem_floats(int group, int head_dim) {
  return (group * (2 * head_dim + kDecodeSplit + 3) + 3) / 4 * 4;
}

// Dynamic shared memory of the split kernel: the floats above and two stages of a K and a V
// chunk.
inline size_t split_smem_bytes(int group, int head_dim, int entry_bytes) {
  const size_t converted =  // fp8 chunks converted to fp16
      entry_bytes == 1 ? 2 * size_t(kDecodeSplit) * size_t(tile_stride_words(head_dim, 2)) : 0;
  return size_t(split_smem_floats(group, head_dim)) * sizeof(float) +
         (2 * 2 * size_t(kDecodeSplit) * size_t(tile_stride_words(head_dim, entry_bytes)) +
          converted) *
             sizeof(uint32_t);
}

// Chunks of `chunk_keys` keys in a context of n_ctx positions, how many of them each split
// walks, and how many splits that takes (the rest exit at once).
__host__ __device__ inline int64_t chunks_per_split(int64_t n_ctx, int n_splits, int chunk_keys) {
  const int64_t chunks = (n_ctx + chunk_keys - 1) / chunk_keys;
  return (chunks + n_splits - 1) / n_splits;
}
__host__ __device__ inline int splits_used(int64_t n_ctx, int n_splits, int chunk_keys) {
  const int64_t chunks = (n_ctx + chunk_keys - 1) / chunk_keys;
  const int64_t per = chunks_per_split(n_ctx, n_splits, chunk_keys);
  return int((chunks + per - 1) / per);
}

// One block per (split, KV head, token). A split walks its chunks of 32 keys with the next
// chunk's K and V rows copied (cp.async) while the current one is used; the group's query
// heads score the chunk's keys, update their running max and sum (online softmax) and their
// weighted sums of V in shared memory. The partial results go to the workspace for the combine
// kernel. Splits past the token's context exit at once, so launch shapes never depend on
// positions. fp8 scales multiply the dot products (K) and the probabilities (V).
template <int kD, KvType kType>  // head_dim, or 0 to read it at run time
__global__ void __launch_bounds__(kDecodeThreads)
    attention_split_kernel(AttentionArgs a, KvCache c, DecodeWorkspace ws, int64_t token_begin,
                           int n_splits) {
  pdl_wait();
  pdl_trigger();
  // fp8 chunks are converted to fp16 (scales applied) once as they land, and used as fp16.
  constexpr bool kConvert = kType == KvType::f8;
  constexpr KvType kUse = kConvert ? KvType::f16 : kType;
  using W = Word<kUse>;
  constexpr int kEntry = int(sizeof(typename Kv<kType>::T));
  const int split = blockIdx.x;
  const int kvh = blockIdx.y;
  const int64_t local = blockIdx.z;
  const int64_t t = token_begin + local;
  const int64_t n_ctx = int64_t(a.positions[t]) + 1;
  const int64_t per_split = chunks_per_split(n_ctx, n_splits, kDecodeSplit);
  const int64_t chunk_begin = int64_t(split) * per_split;
  const int64_t n_chunks = (n_ctx + kDecodeSplit - 1) / kDecodeSplit;
  if (chunk_begin >= n_chunks) return;
  const int64_t chunk_end = min(n_chunks, chunk_begin + per_split);
  const int D = kD > 0 ? kD : c.head_dim;
  const int G = a.n_heads / c.n_kv_heads;
  const int row_words = D * kEntry / 4;  // as stored
  const int stride = row_words + 4;
  const int use_words = D * int(sizeof(typename Kv<kUse>::T)) / 4;  // as used
  const int use_stride = use_words + 4;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  extern __shared__ float smem[];
  float* q_s = smem;                    // [G, D] scaled queries
  float* o_s = q_s + G * D;             // [G, D] weighted sums of V
  float* p_s = o_s + G * D;             // [G, 32] scores, then probabilities
  float* m_s = p_s + G * kDecodeSplit;  // [G] running max
  float* l_s = m_s + G;                 // [G] running sum of exp
  float* alpha_s = l_s + G;             // [G] this chunk's rescale of the sums
  // [2][K, V][32, stride], 16-byte aligned for the copies; fp8: then [K, V][32, use_stride]
  uint32_t* stages = reinterpret_cast<uint32_t*>(smem + split_smem_floats(G, D));
  uint32_t* converted = stages + 2 * 2 * kDecodeSplit * stride;

  const int64_t seq = a.seq_ids[t];
  // Copy unit: the widest of 16, 8, 4 bytes that divides a row.
  const int row_bytes = D * kEntry;
  const int unit = row_bytes % 16 == 0 ? 16 : row_bytes % 8 == 0 ? 8 : 4;
  const int units = row_bytes / unit;
  auto issue = [&](int stage, int64_t chunk) {
    uint32_t* k_s = stages + stage * 2 * kDecodeSplit * stride;
    uint32_t* v_s = k_s + kDecodeSplit * stride;
    const int64_t key0 = chunk * kDecodeSplit;
    for (int i = tid; i < kDecodeSplit * units; i += kDecodeThreads) {
      const int j = i / units;
      const int u = i % units;
      const bool live = key0 + j < n_ctx;
      const int64_t off =
          cache_offset(c, a.layer, seq, kvh, live ? key0 + j : 0) * kEntry + int64_t(u) * unit;
      cp_async(reinterpret_cast<uint8_t*>(k_s + j * stride) + u * unit,
               static_cast<const uint8_t*>(c.k) + off, unit, live);
      cp_async(reinterpret_cast<uint8_t*>(v_s + j * stride) + u * unit,
               static_cast<const uint8_t*>(c.v) + off, unit, live);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  issue(0, chunk_begin);

  const float scale = 1.0f / sqrtf(float(D));
  const float* q = a.q + t * int64_t(a.n_heads) * D + int64_t(kvh) * G * D;
  for (int i = tid; i < G * D; i += kDecodeThreads) {
    q_s[i] = q[i] * scale;
    o_s[i] = 0.0f;
  }
  for (int g = tid; g < G; g += kDecodeThreads) {
    m_s[g] = -INFINITY;
    l_s[g] = 0.0f;
  }

  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int stage = int((chunk - chunk_begin) & 1);
    if (chunk + 1 < chunk_end) {
      issue(stage ^ 1, chunk + 1);
      asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads();
    const uint32_t* k_s = stages + stage * 2 * kDecodeSplit * stride;
    const uint32_t* v_s = k_s + kDecodeSplit * stride;
    const int64_t key0 = chunk * kDecodeSplit;
    const int n_keys = int(n_ctx - key0 < kDecodeSplit ? n_ctx - key0 : kDecodeSplit);
    if constexpr (kConvert) {
      // Word i of a row (4 entries) becomes words 2i, 2i + 1 of fp16 pairs, times the row scale.
      uint32_t* ck = converted;
      uint32_t* cv = ck + kDecodeSplit * use_stride;
      for (int i = tid; i < kDecodeSplit * row_words; i += kDecodeThreads) {
        const int j = i / row_words;
        const int w = i % row_words;
        float ks = 0.0f, vs = 0.0f;
        if (j < n_keys) {
          const int64_t row = cache_row(c, a.layer, seq, kvh, key0 + j);
          ks = c.k_scale[row];
          vs = c.v_scale[row];
        }
        float f[4];
        Word<KvType::f8>::get(k_s[j * stride + w], f);
        ck[j * use_stride + 2 * w] = pack_half2(f[0] * ks, f[1] * ks);
        ck[j * use_stride + 2 * w + 1] = pack_half2(f[2] * ks, f[3] * ks);
        Word<KvType::f8>::get(v_s[j * stride + w], f);
        cv[j * use_stride + 2 * w] = pack_half2(f[0] * vs, f[1] * vs);
        cv[j * use_stride + 2 * w + 1] = pack_half2(f[2] * vs, f[3] * vs);
      }
      __syncthreads();
      k_s = ck;
      v_s = cv;
    }

    {
      // Four lanes per key, each taking every fourth word of the row.
      const int j = tid >> 2;
      const int part = tid & 3;
      const bool valid = j < n_keys;
      const uint32_t* k_row = k_s + j * use_stride;
      for (int g = 0; g < G; ++g) {
        float dot = 0.0f;
        if (valid) {
#pragma unroll 4
          for (int w = part; w < use_words; w += 4) {
            float f[W::n];
            W::get(k_row[w], f);
            if constexpr (W::n == 2) {
              const float2 qv = *reinterpret_cast<const float2*>(&q_s[g * D + 2 * w]);
              dot += qv.x * f[0] + qv.y * f[1];
            } else {
              dot += q_s[g * D + w] * f[0];
            }
          }
        }
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        dot += __shfl_xor_sync(0xffffffffu, dot, 2);
        if (part == 0) p_s[g * kDecodeSplit + j] = valid ? dot : -INFINITY;
      }
    }
    __syncthreads();

    for (int g = warp; g < G; g += kDecodeThreads / 32) {
      const float s = p_s[g * kDecodeSplit + lane];
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, warp_max(s));  // finite: the chunk has a key
      const float p = lane < n_keys ? expf(s - m_new) : 0.0f;
      const float sum = warp_sum(p);
      p_s[g * kDecodeSplit + lane] = p;
      __syncwarp();
      if (lane == 0) {
        const float alpha = expf(m_old - m_new);  // 0 on the first chunk
        alpha_s[g] = alpha;
        m_s[g] = m_new;
        l_s[g] = l_s[g] * alpha + sum;
      }
    }
    __syncthreads();

    for (int idx = tid; idx < G * use_words; idx += kDecodeThreads) {
      const int g = idx / use_words;
      const int w = idx % use_words;
      float acc[W::n] = {};
#pragma unroll 8
      for (int j = 0; j < n_keys; ++j) {
        const float p = p_s[g * kDecodeSplit + j];
        float f[W::n];
        W::get(v_s[j * use_stride + w], f);
#pragma unroll
        for (int e = 0; e < W::n; ++e) acc[e] += p * f[e];
      }
      float* o = o_s + g * D + w * W::n;
      const float alpha = alpha_s[g];
#pragma unroll
      for (int e = 0; e < W::n; ++e) o[e] = o[e] * alpha + acc[e];
    }
    __syncthreads();  // the stage and the scores are read; the next chunk may overwrite them
  }

  for (int g = tid; g < G; g += kDecodeThreads) {
    float* ml = ws.ml + ((local * a.n_heads + kvh * G + g) * ws.max_splits + split) * 2;
    ml[0] = m_s[g];
    ml[1] = l_s[g];
  }
  for (int idx = tid; idx < G * D; idx += kDecodeThreads) {
    const int g = idx / D;
    const int d = idx % D;
    ws.o[((local * a.n_heads + kvh * G + g) * ws.max_splits + split) * D + d] = o_s[idx];
  }
}

// Zeroes token t's fp16 shadow of the attention output past its q_dim columns (the row's padding
// up to row_stride), when there is a shadow: the block that writes the row's last head calls it,
// every thread of its `threads`.
__device__ inline void zero_shadow_padding(const AttentionArgs& a, int64_t t, int64_t q_dim,
                                           int threads) {
  if (a.shadow.data == nullptr) return;
  for (int64_t col = q_dim + threadIdx.x; col < a.shadow.row_stride; col += threads) {
    a.shadow.data[shadow_index(t, col, a.shadow.row_stride, a.shadow.permuted)] =
        __float2half_rn(0.0f);
  }
}

// Merges a token-head's splits: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s. The
// splits' weights are computed once into shared memory, in parallel.
__global__ void __launch_bounds__(kCombineThreads)
    attention_combine_kernel(AttentionArgs a, int head_dim, int n_kv_heads, DecodeWorkspace ws,
                             int64_t token_begin, int n_splits, int chunk_keys) {
  pdl_wait();
  pdl_trigger();
  extern __shared__ float weights[];  // [max_splits]
  __shared__ float scratch[32];
  const int h = blockIdx.x;
  const int64_t local = blockIdx.y;
  const int64_t t = token_begin + local;
  const int64_t n_ctx = int64_t(a.positions[t]) + 1;
  const int used = splits_used(n_ctx, n_splits, chunk_keys);
  // Rope mode (the split kernel rotated q and k as it read them): q head h, and K head h when
  // there is one, are left rotated in memory, now that no split reads them. Thread i < half
  // holds pair i; the loads go out first, the stores last, off the merge's path.
  const bool rope = a.inv_freq != nullptr;
  const int half = head_dim / 2;
  const int64_t q_dim = int64_t(a.n_heads) * head_dim;
  const bool has_k = h < n_kv_heads;
  float* qh = nullptr;
  float* kh = nullptr;
  const int pair = int(threadIdx.x);
  float2 q_pair = make_float2(0.0f, 0.0f), k_pair = make_float2(0.0f, 0.0f);
  if (rope && pair < half) {  // head_dim <= 128 here (tensor_core_attention)
    qh = a.q + t * q_dim + int64_t(h) * head_dim;
    q_pair = make_float2(qh[pair], qh[pair + half]);
    if (has_k) {
      kh = a.k + t * int64_t(n_kv_heads) * head_dim + int64_t(h) * head_dim;
      k_pair = make_float2(kh[pair], kh[pair + half]);
    }
  }
  const float* ml = ws.ml + (local * a.n_heads + h) * ws.max_splits * 2;
  float m_max = -INFINITY;
  for (int s = threadIdx.x; s < used; s += kCombineThreads) m_max = fmaxf(m_max, ml[2 * s]);
  m_max = block_max(m_max, scratch);
  float denom = 0.0f;
  for (int s = threadIdx.x; s < used; s += kCombineThreads) {
    const float e = expf(ml[2 * s] - m_max);
    weights[s] = e;
    denom += e * ml[2 * s + 1];
  }
  denom = block_sum(denom, scratch);  // its barriers also publish `weights`
  const float inv_denom = 1.0f / denom;
  const float* o = ws.o + (local * a.n_heads + h) * ws.max_splits * int64_t(head_dim);
  for (int d = threadIdx.x; d < head_dim; d += kCombineThreads) {
    float acc = 0.0f;
#pragma unroll 8
    for (int s = 0; s < used; ++s) acc += weights[s] * o[s * head_dim + d];
    const float value = acc * inv_denom;
    const int64_t col = int64_t(h) * head_dim + d;
    a.out[t * q_dim + col] = value;
    if (a.shadow.data != nullptr) {
      a.shadow.data[shadow_index(t, col, a.shadow.row_stride, a.shadow.permuted)] =
          __float2half_rn(value);
    }
  }
  if (h == a.n_heads - 1) zero_shadow_padding(a, t, q_dim, kCombineThreads);
  if (rope && pair < half) {
    float cos_v, sin_v;
    rope_angle(n_ctx - 1, a.inv_freq, pair, cos_v, sin_v);
    const float2 rq = rotate(q_pair.x, q_pair.y, cos_v, sin_v);
    qh[pair] = rq.x;
    qh[pair + half] = rq.y;
    if (has_k) {
      const float2 rk = rotate(k_pair.x, k_pair.y, cos_v, sin_v);
      kh[pair] = rk.x;
      kh[pair + half] = rk.y;
    }
  }
}

// 2^x on the SFU (ex2.approx: ~2 ulp, flushes denormals): the probabilities become fp16 for the
// P·V product anyway.
__device__ inline float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The largest v of the lane's quad (the four lanes of an mma fragment's row).
__device__ inline float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// 16 fp8 entries (one 16-byte word) times their row's scale, as 16 fp16 values.
__device__ inline void fp8x16_to_half(const uint4 in, float scale, uint4 (&out)[2]) {
  const uint32_t words[4] = {in.x, in.y, in.z, in.w};
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    float f[4];
    Word<KvType::f8>::get(words[w], f);
    o[2 * w] = pack_half2(f[0] * scale, f[1] * scale);
    o[2 * w + 1] = pack_half2(f[2] * scale, f[3] * scale);
  }
}

// 16 fp16 values (two 16-byte words) to 16-byte aligned shared memory.
__device__ inline void store_16_halves(__half* dst, const uint4 (&v)[2]) {
  uint4* d = reinterpret_cast<uint4*>(dst);
  d[0] = v[0];
  d[1] = v[1];
}

// cp.async of the K and V rows (kRowBytes each, a multiple of 16) of keys key0 + row0 .. key0 +
// row0 + kRows - 1 of (layer, slot, KV head) into shared rows `dst_stride` bytes apart (row r of
// the tile at r * dst_stride). Keys at or past kv_len are zero-filled (src-size 0); the row of
// key `skip` is not copied. No commit.
template <int kRowBytes, int kThreads, int kRows = kPrefillKeys>
__device__ inline void copy_kv_rows(const KvCache& c, int64_t layer, int64_t seq, int kvh,
                                    int64_t key0, int64_t kv_len, uint8_t* k_dst, uint8_t* v_dst,
                                    int dst_stride, int64_t skip, int tid, int row0 = 0) {
  static_assert(kRowBytes % 16 == 0, "rows of 16-byte copies");
  constexpr int kUnits = kRowBytes / 16;
  const uint8_t* kc = static_cast<const uint8_t*>(c.k);
  const uint8_t* vc = static_cast<const uint8_t*>(c.v);
  for (int idx = tid; idx < kRows * kUnits; idx += kThreads) {
    const int r = row0 + idx / kUnits;
    const int u = idx % kUnits;
    const int64_t key = key0 + r;
    if (key == skip) continue;
    const bool live = key < kv_len;
    const int64_t at = cache_row(c, layer, seq, kvh, live ? key : 0) * kRowBytes + u * 16;
    cp_async(k_dst + r * dst_stride + u * 16, kc + at, 16, live);
    cp_async(v_dst + r * dst_stride + u * 16, vc + at, 16, live);
  }
}

// copy_kv_rows' copies where the rows start at a cache block (key0 + row0 a multiple of
// kKvBlockSize): a block's kKvBlockSize rows are adjacent in the cache, so warp w of the caller's
// kThreads / 32 copies the tile's blocks w, w + warps, ... from one block-table lookup each, its
// lanes' addresses at fixed offsets from the block's first row. copy_kv_rows looks a row up
// for every 16-byte unit (~260 instructions a warp for an fp16 K and V tile of 64 rows at
// head_dim 128, Nsight's count, PERF.md thirty-sixth session). The same bytes into the same
// places: keys at or past kv_len zero-filled from their own block's rows (key 0's block where the
// whole block is past kv_len), the row of key `skip` not copied. No commit.
template <int kRowBytes, int kThreads, int kRows = kPrefillKeys>
__device__ inline void copy_kv_block_rows(const KvCache& c, int64_t layer, int64_t seq, int kvh,
                                          int64_t key0, int64_t kv_len, uint8_t* k_dst,
                                          uint8_t* v_dst, int dst_stride, int64_t skip, int tid,
                                          int row0 = 0) {
  constexpr int kBlock = int(kKvBlockSize);
  constexpr int kUnits = kRowBytes / 16;
  constexpr int kBlockUnits = kBlock * kUnits;  // a block's 16-byte units
  constexpr int kWarps = kThreads / 32;
  static_assert(kRowBytes % 16 == 0 && kThreads % 32 == 0, "whole units, whole warps");
  static_assert(kRows % kBlock == 0 && kBlockUnits % 32 == 0, "whole blocks, every lane busy");
  const uint8_t* kc = static_cast<const uint8_t*>(c.k);
  const uint8_t* vc = static_cast<const uint8_t*>(c.v);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  for (int b = warp; b < kRows / kBlock; b += kWarps) {
    const int first_row = row0 + b * kBlock;  // the block's first row in the destination
    const int64_t first = key0 + first_row;   // and its first key
    const int64_t base = cache_row(c, layer, seq, kvh, first < kv_len ? first : 0) * kRowBytes;
    // Rows of the block that are live, and the skipped one's (outside 0 .. kBlock - 1: none).
    const int live_rows = int(min(max(kv_len - first, int64_t(0)), int64_t(kBlock)));
    const int skip_row = skip >= first && skip < first + kBlock ? int(skip - first) : -1;
#pragma unroll
    for (int i = 0; i < kBlockUnits / 32; ++i) {
      const int idx = lane + 32 * i;
      const int r = idx / kUnits;
      const int u = idx % kUnits;
      if (r == skip_row) continue;
      const int from = r * kRowBytes + u * 16;
      const int to = (first_row + r) * dst_stride + u * 16;
      const bool live = r < live_rows;
      cp_async(k_dst + to, kc + base + from, 16, live);
      cp_async(v_dst + to, vc + base + from, 16, live);
    }
  }
}

// Copies the K and V rows of keys key0 .. key0 + 63 of (layer, slot, KV head) into fp16 tiles
// [64][D + 8] in shared memory, as one cp.async group. Keys at or past kv_len are zero-filled
// (src-size 0): unwritten cache memory could hold NaN patterns, and 0 * NaN would poison the
// P·V product. fp8 rows are loaded, scaled and stored as fp16 (not asynchronously); the group
// is committed either way, so callers' wait counts do not depend on the type. The row of key
// `skip` is left untouched (the decode kernel writes that key's row itself). by_block: an fp16
// tile starting at a cache block is copied a block a warp (copy_kv_block_rows).
template <int D, KvType kType, int kThreads>
__device__ inline void load_kv_tile(const KvCache& c, int64_t layer, int64_t seq, int kvh,
                                    int64_t key0, int64_t kv_len, __half* k_s, __half* v_s,
                                    int64_t skip = -1, int tid = -1, bool by_block = false) {
  constexpr int kStride = D + 8;
  if (tid < 0) tid = int(threadIdx.x);  // else the caller's index among kThreads threads
  if constexpr (kType == KvType::f16) {
    if (by_block && key0 % kKvBlockSize == 0) {
      copy_kv_block_rows<D* int(sizeof(__half)), kThreads>(
          c, layer, seq, kvh, key0, kv_len, reinterpret_cast<uint8_t*>(k_s),
          reinterpret_cast<uint8_t*>(v_s), kStride * int(sizeof(__half)), skip, tid);
      asm volatile("cp.async.commit_group;\n" ::);
      return;
    }
    copy_kv_rows<D* int(sizeof(__half)), kThreads>(
        c, layer, seq, kvh, key0, kv_len, reinterpret_cast<uint8_t*>(k_s),
        reinterpret_cast<uint8_t*>(v_s), kStride * int(sizeof(__half)), skip, tid);
  } else {
    // 16 fp8 entries a thread: one 16-byte load, two 16-byte stores of fp16.
    const uint8_t* kc = static_cast<const uint8_t*>(c.k);
    const uint8_t* vc = static_cast<const uint8_t*>(c.v);
    for (int idx = tid; idx < kPrefillKeys * (D / 16); idx += kThreads) {
      const int r = idx / (D / 16);
      const int ch = idx % (D / 16);
      const int64_t key = key0 + r;
      if (key == skip) continue;
      uint4 kh[2] = {}, vh[2] = {};
      if (key < kv_len) {
        const int64_t row = cache_row(c, layer, seq, kvh, key);
        const int64_t at = row * D + ch * 16;
        const uint4 kw = *reinterpret_cast<const uint4*>(kc + at);
        const uint4 vw = *reinterpret_cast<const uint4*>(vc + at);
        fp8x16_to_half(kw, c.k_scale[row], kh);
        fp8x16_to_half(vw, c.v_scale[row], vh);
      }
      store_16_halves(&k_s[r * kStride + ch * 16], kh);
      store_16_halves(&v_s[r * kStride + ch * 16], vh);
    }
  }
  asm volatile("cp.async.commit_group;\n" ::);
}

// Dynamic shared memory of the prefill kernel: two stages of a K and a V tile per key group.
template <int D, int kGroups = 1>
constexpr size_t prefill_smem_bytes() {
  return size_t(kGroups) * 2 * 2 * kPrefillKeys * (D + 8) * sizeof(__half);
}

// Flash attention (online softmax) for 64 queries of one head per block; each warp of a key
// group owns 16 query rows, and the group walks 64-key tiles of the cache up to its last query's
// position. The next tile's K and V are copied (cp.async) while the current one is multiplied.
// Blocks are (head, query tile) with the last query tiles, which see the most keys, scheduled
// first, so the short causal tiles fill the tail of the grid instead of the long ones. An fp8
// cache's rows are loaded, scaled and stored as fp16 (the copy is not asynchronous then).
//
// kGroups > 1 (few heads: a grid of fewer blocks than the SMs hold, where the longest query tile's
// walk is the kernel's time): the block has kGroups groups of four warps over the same 64
// queries, group g taking key tiles g, g + kGroups, ..., each with its own stages, barrier and
// running max and sum; at the end group 0 merges the others' partial results through shared
// memory. A row can see no key of its group's first tile (a query tile straddling two key tiles
// at a nonzero start position), so those groups keep an all-masked row's maximum at -inf without
// forming -inf - -inf.
template <int D, KvType kType, int kGroups>
__global__ void __launch_bounds__(kPrefillThreads* kGroups)
    attention_prefill_kernel(AttentionArgs a, KvCache c) {
  static_assert(kType == KvType::f16 || kType == KvType::f8, "prefill reads fp16 or fp8 caches");
  pdl_wait();
  pdl_trigger();
  constexpr int kStride = D + 8;  // padded rows: fragment reads hit distinct banks
  constexpr int kTile = kPrefillKeys * kStride;
  extern __shared__ __align__(16) __half prefill_smem[];  // [group][stage][K, V][kTile]
  const int lane = threadIdx.x & 31;
  const int group = int(threadIdx.x) / kPrefillThreads;
  const int gtid = int(threadIdx.x) % kPrefillThreads;  // index within the key group
  const int warp = gtid >> 5;
  const int qr = lane >> 2;
  const int qc = lane & 3;
  const int h = blockIdx.x;
  const int kvh = h / (a.n_heads / c.n_kv_heads);
  const int64_t p0 = a.positions[0];
  const int64_t seq = a.seq_ids[0];
  const int64_t tile_begin = int64_t(gridDim.y - 1 - blockIdx.y) * kPrefillRows;
  const int64_t row0 = tile_begin + warp * 16 + qr;
  const int64_t row1 = row0 + 8;
  const int64_t qpos0 = p0 + row0;
  const int64_t qpos1 = p0 + row1;
  const int64_t q_ld = int64_t(a.n_heads) * D;
  const float scale = kLog2e / sqrtf(float(D));
  // The key group's own barrier (named barrier 1 + group over its 128 threads).
  auto group_sync = [&] {
    if constexpr (kGroups == 1) {
      __syncthreads();
    } else {
      asm volatile("bar.sync %0, %1;\n" ::"r"(1 + group), "r"(kPrefillThreads) : "memory");
    }
  };

  uint32_t qa[D / 16][4];
  auto load_q = [&](int64_t row, int col) -> uint32_t {
    if (row >= a.n_tokens) return 0u;
    const float2 v = *reinterpret_cast<const float2*>(a.q + row * q_ld + int64_t(h) * D + col);
    return pack_half2(v.x * scale, v.y * scale);
  };
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const int col = ks * 16 + 2 * qc;
    qa[ks][0] = load_q(row0, col);
    qa[ks][1] = load_q(row1, col);
    qa[ks][2] = load_q(row0, col + 8);
    qa[ks][3] = load_q(row1, col + 8);
  }

  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

  const int64_t last_row =
      (a.n_tokens < tile_begin + kPrefillRows ? a.n_tokens : tile_begin + kPrefillRows) - 1;
  const int64_t kv_len = p0 + last_row + 1;

  // Copies the K and V rows of keys key0 .. key0 + 63 into the group's `stage`. Keys past the
  // block's last query are zero-filled (src-size 0): unwritten cache memory could hold NaN
  // patterns, and 0 * NaN would poison the P·V product.
  __half* group_smem = prefill_smem + group * 2 * 2 * kTile;
  auto issue = [&](int stage, int64_t key0) {
    __half* k_s = group_smem + stage * 2 * kTile;
    load_kv_tile<D, kType, kPrefillThreads>(c, a.layer, seq, kvh, key0, kv_len, k_s, k_s + kTile,
                                            -1, gtid);
  };

  const int64_t n_tiles = (kv_len + kPrefillKeys - 1) / kPrefillKeys;
  if (group < n_tiles) issue(0, group * int64_t(kPrefillKeys));
  for (int64_t t = group, i = 0; t < n_tiles; t += kGroups, ++i) {
    const int64_t key0 = t * kPrefillKeys;
    if (t + kGroups < n_tiles) {
      issue(int((i + 1) & 1), key0 + kGroups * kPrefillKeys);
      asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    group_sync();
    const __half* k_s = group_smem + (i & 1) * 2 * kTile;
    const __half* v_s = k_s + kTile;

    float s[kPrefillKeys / 8][4];
#pragma unroll
    for (int nt = 0; nt < kPrefillKeys / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        const __half* k_row = &k_s[(nt * 8 + qr) * kStride + ks * 16 + 2 * qc];
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(k_row);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(k_row + 8);
        mma_16816(s[nt], qa[ks], b0, b1);
      }
    }

    float mx0 = -INFINITY, mx1 = -INFINITY;
    // Only tiles reaching past a warp's first query need the causal mask.
    const bool masked = key0 + kPrefillKeys - 1 > qpos0;
#pragma unroll
    for (int nt = 0; nt < kPrefillKeys / 8; ++nt) {
      if (masked) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t key = key0 + nt * 8 + 2 * qc + (i & 1);
          const int64_t qpos = i < 2 ? qpos0 : qpos1;
          if (key > qpos) s[nt][i] = -INFINITY;
        }
      }
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
    mx0 = quad_max(mx0);
    mx1 = quad_max(mx1);
    // One key group: key 0 is visible to every query, so after the first tile both maxima are
    // finite. More groups: a row that has seen no key yet subtracts 0 instead of -inf.
    const float new_m0 = fmaxf(m0, mx0);
    const float new_m1 = fmaxf(m1, mx1);
    const float sub0 = kGroups > 1 && new_m0 == -INFINITY ? 0.0f : new_m0;
    const float sub1 = kGroups > 1 && new_m1 == -INFINITY ? 0.0f : new_m1;
    const float alpha0 = fast_exp2(m0 - sub0);
    const float alpha1 = fast_exp2(m1 - sub1);
    m0 = new_m0;
    m1 = new_m1;
    l0 *= alpha0;
    l1 *= alpha1;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= alpha0;
      o[dt][1] *= alpha0;
      o[dt][2] *= alpha1;
      o[dt][3] *= alpha1;
    }
#pragma unroll
    for (int nt = 0; nt < kPrefillKeys / 8; ++nt) {
      s[nt][0] = fast_exp2(s[nt][0] - sub0);
      s[nt][1] = fast_exp2(s[nt][1] - sub0);
      s[nt][2] = fast_exp2(s[nt][2] - sub1);
      s[nt][3] = fast_exp2(s[nt][3] - sub1);
      l0 += s[nt][0] + s[nt][1];
      l1 += s[nt][2] + s[nt][3];
    }

#pragma unroll
    for (int j = 0; j < kPrefillKeys / 16; ++j) {
      const uint32_t pa[4] = {pack_half2(s[2 * j][0], s[2 * j][1]),
                              pack_half2(s[2 * j][2], s[2 * j][3]),
                              pack_half2(s[2 * j + 1][0], s[2 * j + 1][1]),
                              pack_half2(s[2 * j + 1][2], s[2 * j + 1][3])};
      // V's B fragments (keys x dims) by transposing 8x8 loads: lanes 8i..8i+7 address the rows
      // (keys) of matrix i; matrices 0/1 are keys 0-7/8-15 of dims dt*8.., 2/3 the same keys of
      // the next 8 dims.
      const int key = 16 * j + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {
        const int col = dt * 8 + (lane >> 4) * 8;
        uint32_t b[4];
        const uint32_t addr = uint32_t(__cvta_generic_to_shared(&v_s[key * kStride + col]));
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                     : "r"(addr));
        mma_16816(o[dt], pa, b[0], b[1]);
        mma_16816(o[dt + 1], pa, b[2], b[3]);
      }
    }
    group_sync();  // the stage is read; the next iteration's copy may overwrite it
  }

  if constexpr (kGroups > 1) {
    // Groups 1.. post their (m, l, o) per lane; group 0, whose lanes hold the same rows and
    // columns, merges them in group order. Every copy has landed (each group's last wait was
    // for all of its groups), so the stages are free once every thread is here.
    constexpr int kValues = D / 2 + 4;                       // o[D / 8][4], then m0, m1, l0, l1
    float* posted = reinterpret_cast<float*>(prefill_smem);  // [group - 1][kValues][128]
    __syncthreads();
    if (group > 0) {
      float* mine = posted + (group - 1) * kValues * kPrefillThreads + gtid;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) mine[(dt * 4 + i) * kPrefillThreads] = o[dt][i];
      }
      mine[(D / 2 + 0) * kPrefillThreads] = m0;
      mine[(D / 2 + 1) * kPrefillThreads] = m1;
      mine[(D / 2 + 2) * kPrefillThreads] = l0;
      mine[(D / 2 + 3) * kPrefillThreads] = l1;
    }
    __syncthreads();
    if (group > 0) return;
#pragma unroll 1
    for (int g = 1; g < kGroups; ++g) {
      const float* theirs = posted + (g - 1) * kValues * kPrefillThreads + gtid;
      const float om0 = theirs[(D / 2 + 0) * kPrefillThreads];
      const float om1 = theirs[(D / 2 + 1) * kPrefillThreads];
      // Group 0 saw key 0, so its maxima, and the merged ones, are finite; an all-masked row of
      // the other group (-inf, l = 0, o = 0) gets weight 0.
      const float mm0 = fmaxf(m0, om0);
      const float mm1 = fmaxf(m1, om1);
      const float a0 = fast_exp2(m0 - mm0), b0 = fast_exp2(om0 - mm0);
      const float a1 = fast_exp2(m1 - mm1), b1 = fast_exp2(om1 - mm1);
      m0 = mm0;
      m1 = mm1;
      l0 = l0 * a0 + theirs[(D / 2 + 2) * kPrefillThreads] * b0;
      l1 = l1 * a1 + theirs[(D / 2 + 3) * kPrefillThreads] * b1;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][0] = o[dt][0] * a0 + theirs[(dt * 4 + 0) * kPrefillThreads] * b0;
        o[dt][1] = o[dt][1] * a0 + theirs[(dt * 4 + 1) * kPrefillThreads] * b0;
        o[dt][2] = o[dt][2] * a1 + theirs[(dt * 4 + 2) * kPrefillThreads] * b1;
        o[dt][3] = o[dt][3] * a1 + theirs[(dt * 4 + 3) * kPrefillThreads] * b1;
      }
    }
  }

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = 1.0f / l0;
  const float inv1 = 1.0f / l1;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    const int64_t col = int64_t(h) * D + dt * 8 + 2 * qc;
    if (row0 < a.n_tokens) {
      const float2 v = make_float2(o[dt][0] * inv0, o[dt][1] * inv0);
      *reinterpret_cast<float2*>(a.out + row0 * q_ld + col) = v;
      if (a.shadow.data != nullptr) {
        *reinterpret_cast<uint32_t*>(a.shadow.data + row0 * a.shadow.row_stride + col) =
            pack_half2(v.x, v.y);
      }
    }
    if (row1 < a.n_tokens) {
      const float2 v = make_float2(o[dt][2] * inv1, o[dt][3] * inv1);
      *reinterpret_cast<float2*>(a.out + row1 * q_ld + col) = v;
      if (a.shadow.data != nullptr) {
        *reinterpret_cast<uint32_t*>(a.shadow.data + row1 * a.shadow.row_stride + col) =
            pack_half2(v.x, v.y);
      }
    }
  }
}

// Rope mode's write-back of a (token, KV head) group: its G q heads and its K head, each pair
// (i, i + D / 2) of a head one entry, a thread's entries at tid, + kPrefillThreads, ... Loaded
// (load_group_pairs) before the stores they follow, so the write-back adds no round trip of its
// own, then stored rotated (store_group_pairs).
template <int D>
struct GroupPairs {
  static constexpr int kHalf = D / 2;
  static constexpr int kPerThread = (kMaxHeadGroup + 1) * kHalf / kPrefillThreads + 1;
  float2 v[kPerThread];
};

template <int D>
__device__ inline float* group_pair_head(const AttentionArgs& a, const KvCache& c, int64_t t,
                                         int kvh, int G, int g) {
  const int64_t q_dim = int64_t(a.n_heads) * D;
  return g < G ? a.q + t * q_dim + (int64_t(kvh) * G + g) * D
               : a.k + (t * c.n_kv_heads + kvh) * int64_t(D);
}

template <int D>
__device__ inline void load_group_pairs(const AttentionArgs& a, const KvCache& c, int64_t t,
                                        int kvh, int G, GroupPairs<D>& p) {
  constexpr int kHalf = GroupPairs<D>::kHalf;
#pragma unroll
  for (int j = 0; j < GroupPairs<D>::kPerThread; ++j) {
    const int idx = int(threadIdx.x) + j * kPrefillThreads;
    if (idx < (G + 1) * kHalf) {
      const float* head = group_pair_head<D>(a, c, t, kvh, G, idx / kHalf);
      p.v[j] = make_float2(head[idx % kHalf], head[idx % kHalf + kHalf]);
    }
  }
}

template <int D>
__device__ inline void store_group_pairs(const AttentionArgs& a, const KvCache& c, int64_t t,
                                         int kvh, int G, const GroupPairs<D>& p,
                                         const float2* angles) {
  constexpr int kHalf = GroupPairs<D>::kHalf;
#pragma unroll
  for (int j = 0; j < GroupPairs<D>::kPerThread; ++j) {
    const int idx = int(threadIdx.x) + j * kPrefillThreads;
    if (idx < (G + 1) * kHalf) {
      const int i = idx % kHalf;
      float* head = group_pair_head<D>(a, c, t, kvh, G, idx / kHalf);
      const float2 r = rotate(p.v[j].x, p.v[j].y, angles[i].x, angles[i].y);
      head[i] = r.x;
      head[i + kHalf] = r.y;
    }
  }
}

// The last split of a (token, KV head) to finish merges the group's splits itself (the merge the
// combine kernel does for the CUDA-core split kernel), so a decode step's attention is one launch:
// out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s for each of the G query heads, and in rope
// mode q heads kvh * G .. + G - 1 and K head kvh left rotated in memory (every split of the group
// has read them by now) unless a.keep_rotated is false (a decoder layer's scratch). The merge is
// one block's latency on the step's path, so it keeps every load in flight at once: a thread takes
// four adjacent outputs of one head and merges the splits online, 16 at a time, each batch's
// partial sums and {m, l} requested together. The splits go in a fixed order, so a replayed graph
// gives the eager step's bits. The partial results are read through L2 (__ldcg): other blocks wrote
// them.
// The last step of a merge: four adjacent outputs acc / l of token t (columns col .. col + 3)
// into a.out and its fp16 shadow. merge_group's, and a solo split's for its one partial result.
// With a.shadow.halves (one token: attention_writes_halves), also the shadow's values in half
// groups for wo's GEMV: a half group's 16 columns are the four outputs of four lanes in a run
// (the callers' threads take consecutive quads of a head, kQuads = D / 4 a multiple of four, so
// a run's lanes enter and leave the loop together), one int8 word a lane in natural order, and
// the run's first lane stores the half's {scale, sum}.
__device__ inline void store_merged4(const AttentionArgs& a, int64_t t, int64_t q_dim, int64_t col,
                                     float4 acc, float l) {
  const float inv = 1.0f / l;
  const float value[4] = {acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv};
  *reinterpret_cast<float4*>(a.out + t * q_dim + col) =
      make_float4(value[0], value[1], value[2], value[3]);
  if (a.shadow.data != nullptr) {
    float held[4];  // the values as the shadow holds them
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half h = __float2half_rn(value[i]);
      a.shadow.data[shadow_index(t, col + i, a.shadow.row_stride, a.shadow.permuted)] = h;
      held[i] = __half2float(h);
    }
    if (a.shadow.halves.q != nullptr) {
      int q[4];
      const int2 scale_sum = quantize_half_group<4>(held, q);
      a.shadow.halves.q[col / 4] = (uint32_t(q[0]) & 0xffu) | ((uint32_t(q[1]) & 0xffu) << 8) |
                                   ((uint32_t(q[2]) & 0xffu) << 16) | (uint32_t(q[3]) << 24);
      if (col % 16 == 0) a.shadow.halves.scales[col / 16] = scale_sum;
    }
  }
}

// One output quad's running merge over a group's splits (merge_group): the
// splits' maxima m (natural-log units), their sums l and outputs o, combined a batch at a time.
struct MergeQuad {
  float m = -INFINITY;
  float l = 0.0f;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  // To a batch's running maximum mb (>= m, finite: every split that ran saw a key); e^(-inf) = 0
  // drops the first batch's empty state.
  __device__ void rescale_to(float mb) {
    const float rescale = expf(m - mb);
    l *= rescale;
    acc.x *= rescale;
    acc.y *= rescale;
    acc.z *= rescale;
    acc.w *= rescale;
    m = mb;
  }
  // One split's {m, l} and outputs, at the running maximum (an empty slot's -inf adds 0).
  __device__ void add(float2 ml, float4 o) {
    const float e = expf(ml.x - m);
    l += e * ml.y;
    acc.x += e * o.x;
    acc.y += e * o.y;
    acc.z += e * o.z;
    acc.w += e * o.w;
  }
};

template <int D>
__device__ void merge_group(const AttentionArgs& a, const KvCache& c, const DecodeWorkspace& ws,
                            int64_t local, int64_t t, int kvh, int G, int used,
                            const float2* angles) {
  constexpr int kQuads = D / 4;
  static_assert(kQuads % 4 == 0, "a half group is four quads of one head (store_merged4)");
  constexpr int kMergeBatch = 16;
  const int tid = threadIdx.x;
  const int64_t q_dim = int64_t(a.n_heads) * D;
  const int64_t head0 = local * a.n_heads + int64_t(kvh) * G;  // the group's first (token, head)
  // Rope mode: the group's q heads and its K head are left rotated in place. Their pairs are
  // loaded first, with the partial results, so the write-back adds no round trip of its own.
  // These registers, like the profile's marks and printf, each take the head_dim-128 kernels
  // from 156-158 to 166-168; together 168 of the 170 that three blocks an SM allow (ptxas, no
  // spills): the next value kept live across the kernel will spill.
  static_assert(kMaxHeadGroup <= 16, "the decode kernel's query rows hold a group");
  GroupPairs<D> pairs;
  const bool write_back = a.inv_freq != nullptr && a.keep_rotated;
  if (write_back) load_group_pairs<D>(a, c, t, kvh, G, pairs);
  for (int idx = tid; idx < G * kQuads; idx += kPrefillThreads) {
    const int g = idx / kQuads;
    const int d = (idx % kQuads) * 4;
    const float4* o =
        reinterpret_cast<const float4*>(ws.o + (head0 + g) * ws.max_splits * int64_t(D) + d);
    const float2* ml = reinterpret_cast<const float2*>(ws.ml + (head0 + g) * ws.max_splits * 2);
    MergeQuad quad;
    for (int s0 = 0; s0 < used; s0 += kMergeBatch) {
      float2 mv[kMergeBatch];
      float4 ov[kMergeBatch];
#pragma unroll
      for (int i = 0; i < kMergeBatch; ++i) {
        const bool in = s0 + i < used;
        mv[i] = in ? __ldcg(ml + s0 + i) : make_float2(-INFINITY, 0.0f);
        ov[i] = in ? __ldcg(o + int64_t(s0 + i) * kQuads) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
      float mb = quad.m;
#pragma unroll
      for (int i = 0; i < kMergeBatch; ++i) mb = fmaxf(mb, mv[i].x);
      quad.rescale_to(mb);
#pragma unroll
      for (int i = 0; i < kMergeBatch; ++i) quad.add(mv[i], ov[i]);
    }
    store_merged4(a, t, q_dim, (int64_t(kvh) * G + g) * D + d, quad.acc, quad.l);
  }
  if (kvh == c.n_kv_heads - 1) zero_shadow_padding(a, t, q_dim, kPrefillThreads);
  if (write_back) store_group_pairs<D>(a, c, t, kvh, G, pairs, angles);
}

// KESTREL_CUDA_ATTENTION_PROFILE (DecodeWorkspace::profile): whether this block prints its
// phases: layer 1, the first token's first KV head, every `profile` positions (1: every 256).
__device__ inline bool profiled_step(const AttentionArgs& a, const DecodeWorkspace& ws,
                                     int64_t local, int kvh, int64_t pos) {
  const int64_t period = ws.profile > 1 ? ws.profile : 256;
  return a.layer == 1 && local == 0 && kvh == 0 && pos % period == 0;
}

// The profile's line from thread 0's marks (us between them). A split that writes its output
// itself (solo) prints that phase as "partials", with no arrival or merge. Out of line, so the
// kernel's registers do not carry printf's arguments.
__device__ __noinline__ void print_attention_profile(const uint64_t* marks, int64_t pos, int split,
                                                     int used) {
  printf(
      "attention profile (us, pos %lld, split %d of %d, layer 1): wait %.2f q %.2f tiles %.2f "
      "partials %.2f arrive %.2f merge %.2f total %.2f\n",
      static_cast<long long>(pos), split, used, (marks[1] - marks[0]) * 1e-3,
      (marks[2] - marks[1]) * 1e-3, (marks[3] - marks[2]) * 1e-3, (marks[4] - marks[3]) * 1e-3,
      (marks[5] - marks[4]) * 1e-3, (marks[6] - marks[5]) * 1e-3, (marks[6] - marks[0]) * 1e-3);
}

// The decode kernel's fp8 tiles: the raw entries of keys key0 .. key0 + 63 ([64][D] bytes for K
// and for V) and their rows' scales ([64] floats each) copied with cp.async as one group, so the
// next tile's bytes are in flight while this one is multiplied (load_kv_tile converts fp8 rows
// with plain loads, which wait for the memory). Keys at or past kv_len are zero-filled, entries
// and scale (0 * 0: no NaN from unwritten memory); the row of key `skip` is not copied.
template <int D, int kThreads, int kRows = kPrefillKeys>
__device__ inline void copy_fp8_tile(const KvCache& c, int64_t layer, int64_t seq, int kvh,
                                     int64_t key0, int64_t kv_len, uint8_t* k_raw, uint8_t* v_raw,
                                     float* k_scale, float* v_scale, int64_t skip, int tid,
                                     int row0 = 0) {
  copy_kv_rows<D, kThreads, kRows>(c, layer, seq, kvh, key0, kv_len, k_raw, v_raw, D, skip, tid,
                                   row0);
  for (int r = row0 + tid; r < row0 + kRows; r += kThreads) {
    const int64_t key = key0 + r;
    const bool live = key < kv_len && key != skip;
    const int64_t row = cache_row(c, layer, seq, kvh, live ? key : 0);
    cp_async(k_scale + r, c.k_scale + row, 4, live);
    cp_async(v_scale + r, c.v_scale + row, 4, live);
  }
  asm volatile("cp.async.commit_group;\n" ::);
}

// The direct fp8 path's copy of one warp's 16 keys key0 .. key0 + 15 (key0 a multiple of 16) into
// rows row0 .. row0 + 15 of the raw stages, and their scales, as one cp.async group. The rows are
// swizzled: unit u of row r lands in unit u ^ (r % 8), so the kernel's fragment reads of eight
// rows at once fall in different banks. The 16 keys are one cache block (kKvBlockSize), so their
// rows are adjacent: one block-table lookup, where copy_kv_rows makes one a 16-byte unit. Keys at
// or past kv_len are zero-filled (from the block's first row, or key 0's block where the warp has
// no live key); the row of key `skip` is not copied and its scales are zeros.
template <int D>
__device__ inline void copy_fp8_block_rows(const KvCache& c, int64_t layer, int64_t seq, int kvh,
                                           int64_t key0, int64_t kv_len, uint8_t* k_raw,
                                           uint8_t* v_raw, float* k_scale, float* v_scale,
                                           int64_t skip, int lane, int row0) {
  static_assert(kKvBlockSize == 16 && D == 128, "a warp's 16 keys fill one block of 128-byte rows");
  constexpr int kUnits = D / 16;
  const int64_t base = cache_row(c, layer, seq, kvh, key0 < kv_len ? key0 : 0);
  const uint8_t* kc = static_cast<const uint8_t*>(c.k) + base * D;
  const uint8_t* vc = static_cast<const uint8_t*>(c.v) + base * D;
#pragma unroll
  for (int i = 0; i < 16 * kUnits / 32; ++i) {
    const int idx = lane + 32 * i;
    const int r = idx / kUnits;
    const int u = idx % kUnits;
    const int64_t key = key0 + r;
    if (key == skip) continue;
    const bool live = key < kv_len;
    const int from = live ? r * D + u * 16 : 0;
    const int to = (row0 + r) * D + (u ^ ((row0 + r) & 7)) * 16;
    cp_async(k_raw + to, kc + from, 16, live);
    cp_async(v_raw + to, vc + from, 16, live);
  }
  // Lanes 0-15 the K scales, 16-31 the V scales.
  const int r = lane & 15;
  const bool live = key0 + r < kv_len && key0 + r != skip;
  cp_async((lane < 16 ? k_scale : v_scale) + row0 + r,
           (lane < 16 ? c.k_scale : c.v_scale) + base + (live ? r : 0), 4, live);
  cp_async_commit();
}

// 16 fp8 entries as 16 fp16 values, unscaled (exact: every e4m3 value is an fp16 value).
__device__ inline void fp8x16_to_half_exact(const uint4 in, uint4 (&out)[2]) {
  const uint32_t words[4] = {in.x, in.y, in.z, in.w};
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const __half2_raw lo =
        __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(words[w] & 0xffffu), __NV_E4M3);
    const __half2_raw hi =
        __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(words[w] >> 16), __NV_E4M3);
    o[2 * w] = uint32_t(lo.x) | uint32_t(lo.y) << 16;
    o[2 * w + 1] = uint32_t(hi.x) | uint32_t(hi.y) << 16;
  }
}

// The landed raw tile (copy_fp8_tile) as the fp16 tiles [64][D + 8] the kernel multiplies. K
// rows stay unscaled: the kernel multiplies each key's score by its scale in fp32. V rows are
// scaled here, by an fp16 multiply where the scale is a normal fp16 value (the scale rounded to
// fp16 first, so a value can differ from the float route's by an ulp, far inside fp8's own
// rounding) and in fp32 where it is not (rows whose largest entry is below
// 448 * 2^-14). The row of key `skip` is left to the caller.
template <int D, int kThreads, int kRows = kPrefillKeys>
__device__ inline void convert_fp8_tile(const uint8_t* k_raw, const uint8_t* v_raw,
                                        const float* v_scale, __half* k_s, __half* v_s,
                                        int64_t key0, int64_t skip, int tid, int row0 = 0) {
  constexpr int kStride = D + 8;
  constexpr float kMinNormalHalf = 6.103515625e-05f;  // 2^-14
  for (int idx = tid; idx < kRows * (D / 16); idx += kThreads) {
    const int r = row0 + idx / (D / 16);
    const int ch = idx % (D / 16);
    if (key0 + r == skip) continue;
    uint4 kh[2], vh[2];
    fp8x16_to_half_exact(*reinterpret_cast<const uint4*>(k_raw + r * D + ch * 16), kh);
    const uint4 vw = *reinterpret_cast<const uint4*>(v_raw + r * D + ch * 16);
    const float vs = v_scale[r];
    if (vs >= kMinNormalHalf) {
      fp8x16_to_half_exact(vw, vh);
      const __half2 s2 = __float2half2_rn(vs);
      uint32_t* v32 = reinterpret_cast<uint32_t*>(vh);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const __half2 v = __hmul2(*reinterpret_cast<const __half2*>(&v32[i]), s2);
        v32[i] = *reinterpret_cast<const uint32_t*>(&v);
      }
    } else {
      fp8x16_to_half(vw, vs, vh);
    }
    store_16_halves(&k_s[r * kStride + ch * 16], kh);
    store_16_halves(&v_s[r * kStride + ch * 16], vh);
  }
}

// The four e4m3 entries of `w` as two fp16 pairs, exactly (every e4m3 value is an fp16 value):
// bytes 0, 1 in lo and bytes 2, 3 in hi, the lower byte in the lower half of each. The halves of w
// go to the conversions as they are (no shifts or masks to extract them).
__device__ inline void e4m3x4_to_half2x2(uint32_t w, uint32_t& lo, uint32_t& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.rn.f16x2.e4m3x2 %0, l;\n"
      "cvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(w));
#else
  const __half2_raw a = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w & 0xffffu), __NV_E4M3);
  const __half2_raw b = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w >> 16), __NV_E4M3);
  lo = uint32_t(a.x) | uint32_t(a.y) << 16;
  hi = uint32_t(b.x) | uint32_t(b.y) << 16;
#endif
}

// log2 on the SFU (lg2.approx: log2(0) = -inf), for the fp8 value rows' scales.
__device__ inline float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Decode attention on the tensor cores, for head_dim 64 / 128 over fp16 or fp8 caches: the split
// kernel's work with the G query heads of a KV head as the rows of an m16n8k16 tile (rows past
// G are zeros). A split walks its 64-key tiles; each warp takes 16 keys of every tile with its
// own running max and sum (scores in log2 units, as the prefill kernel). fp16 tiles come in by
// load_kv_tile (cp.async double buffer, all threads, block barriers); an fp8 warp copies,
// converts and waits for its own rows alone, so an fp8 tile takes no block barrier: at head_dim
// 128 the raw bytes (three stages, copy_fp8_block_rows) go straight into the mma fragments
// (ARCHITECTURE.md, "fp8 straight into the mma fragments"); at 64 they are double-buffered
// (copy_fp8_tile) and each landed tile converted to one fp16 stage. The block
// merges its four warps in shared memory at the end. The partial results are the split kernel's;
// the group's last split to finish merges them (merge_group), so there is no combine launch.
//
// With a.inv_freq set (rope_attention of a batch whose tokens are all of different sequences),
// the kernel also does rope_kv_write_kernel's work, so a decode step has no launch for it: the
// queries are rotated as they are loaded (a lane holds both elements of every pair it needs:
// columns c and c + D / 2 are fragments ks and ks + D / 32 of the same lane), and the split that
// holds the token's own position rotates its K row, stores it and its V row in the cache and
// puts them (staged once in own_rows) in its tile, the row the copies skipped. Every other key is
// in the cache from earlier calls, so the first tile is requested before the wait for the q/k/v
// projection, with the angles. The merging split (with ws.solo, a group's only split) leaves q
// and k rotated in memory, as rope_attention's contract says, once every split of its group has
// read them (unless a.keep_rotated is false: a decoder layer's scratch).
//
// Blocks an SM: three at head_dim 128 (the shared memory allows three), four at 64.
template <int D, KvType kType>
__global__ void __launch_bounds__(kPrefillThreads, D == 128 ? 3 : 4)
    attention_split_mma_kernel(AttentionArgs a, KvCache c, DecodeWorkspace ws, int64_t token_begin,
                               int n_splits) {
  const bool rope = a.inv_freq != nullptr;
  // The profile's marks (ws.profile): thread 0's clock at each phase's end.
  __shared__ uint64_t marks[7];
  const bool mark = ws.profile != 0 && threadIdx.x == 0;
  if (mark) marks[0] = global_ns();
  if (!rope) {
    pdl_wait();
    pdl_trigger();
    if (mark) marks[1] = global_ns();
  }
  constexpr int kStride = D + 8;
  constexpr int kTile = kPrefillKeys * kStride;
  constexpr int kWarps = kPrefillThreads / 32;
  extern __shared__ __align__(16) __half decode_smem[];  // [stage][K, V][kTile]
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int qr = lane >> 2;
  const int qc = lane & 3;
  const int split = blockIdx.x;
  const int kvh = blockIdx.y;
  const int64_t local = blockIdx.z;
  const int64_t t = token_begin + local;
  const int64_t n_ctx = int64_t(a.positions[t]) + 1;
  const int64_t n_tiles = (n_ctx + kPrefillKeys - 1) / kPrefillKeys;
  // ws.solo (a switch, head_dim 128): a context of at most ws.solo tiles takes one split, which
  // walks them all and writes the output itself (below) instead of splits merging (not when the
  // combine kernel merges: it counts the launch's splits).
  const bool solo_rule = D == 128 && ws.solo > 0 && ws.arrivals != nullptr;
  const int splits = solo_rule && n_tiles <= ws.solo ? 1 : n_splits;
  const int64_t per_split = chunks_per_split(n_ctx, splits, kPrefillKeys);
  const int64_t tile_begin = int64_t(split) * per_split;
  if (tile_begin >= n_tiles) return;
  const int used = splits_used(n_ctx, splits, kPrefillKeys);
  const int64_t tile_end = min(n_tiles, tile_begin + per_split);
  const int G = a.n_heads / c.n_kv_heads;
  const int64_t seq = a.seq_ids[t];
  const int64_t pos = n_ctx - 1;
  // Rope mode: this split holds the token's own key, whose row the kernel writes.
  const bool own_key = rope && tile_end == n_tiles;
  const int64_t own_tile = n_tiles - 1;

  // fp8: one fp16 stage [K, V][kTile] (none at head_dim 128), then kStages raw stages
  // [K, V][64][D] bytes and their scales [K, V][64] floats, within the fp16 kernel's two stages.
  constexpr bool kRaw = kType == KvType::f8;
  // fp8 at head_dim 128: the raw bytes go from the stages straight into the mma fragments (no
  // fp16 stage; the rows swizzled, copy_fp8_block_rows), the head dimensions permuted so a lane's K
  // bytes of a key are 32 adjacent ones (the queries permuted to match) and the output
  // dimensions so its V bytes are 16; V's scale rides in the P·V weights (below).
  constexpr bool kDirect = kRaw && D == 128;
  // Tiles in flight: the direct path has no fp16 stage, so three raw stages fit where the fp16
  // stage and two raw stages were (a warp's 4 KB of entries a tile: 96 KB requested an SM).
  constexpr int kStages = kDirect ? 3 : 2;
  constexpr size_t kFp16Stage = kDirect ? 0 : 2 * kTile * sizeof(__half);
  uint8_t* raw = reinterpret_cast<uint8_t*>(decode_smem) + kFp16Stage;
  float* raw_scales = reinterpret_cast<float*>(raw + kStages * 2 * kPrefillKeys * D);
  static_assert(!kRaw || (kFp16Stage + kStages * 2 * kPrefillKeys * D +
                          kStages * 2 * kPrefillKeys * sizeof(float)) <= prefill_smem_bytes<D>(),
                "the fp8 stages fit the kernel's shared memory");
  // A warp reads only its own 16 keys of every tile (the scores' B operands and the P·V
  // product's rows), so an fp8 warp copies, converts and waits for those alone: no block barrier
  // a tile (8B, batch 16 at 8192 positions: 7.25 -> 6.98 ms a step). fp16 keeps the block-wide
  // copy: warp-private fp16 copies cost batch 1 at 1024 positions 1.1% (PERF.md, 2026-12-04).
  auto issue = [&](int stage, int64_t tile) {
    if constexpr (kRaw) {
      uint8_t* k_raw = raw + stage * 2 * kPrefillKeys * D;
      float* k_scale = raw_scales + stage * 2 * kPrefillKeys;
      if constexpr (kDirect) {
        copy_fp8_block_rows<D>(c, a.layer, seq, kvh, tile * kPrefillKeys + warp * 16, n_ctx, k_raw,
                               k_raw + kPrefillKeys * D, k_scale, k_scale + kPrefillKeys,
                               own_key ? pos : -1, lane, warp * 16);
      } else {
        copy_fp8_tile<D, 32, 16>(c, a.layer, seq, kvh, tile * kPrefillKeys, n_ctx, k_raw,
                                 k_raw + kPrefillKeys * D, k_scale, k_scale + kPrefillKeys,
                                 own_key ? pos : -1, lane, warp * 16);
      }
    } else {
      __half* k_s = decode_smem + stage * 2 * kTile;
      load_kv_tile<D, kType, kPrefillThreads>(c, a.layer, seq, kvh, tile * kPrefillKeys, n_ctx, k_s,
                                              k_s + kTile, own_key ? pos : -1, -1, ws.block_copy);
    }
  };
  constexpr int kHalf = D / 2;
  constexpr int kPairFrags = D / 32;  // fragments ks < kPairFrags hold the first halves
  __shared__ float2 angles[kHalf];    // rope mode: (cos, sin) of pair i at the token's position
  // Rope mode, the split of the token's own key: thread i < D / 2 holds pair (i, i + D / 2) of
  // its new K and V rows.
  float2 k_new = make_float2(0.0f, 0.0f), v_new = make_float2(0.0f, 0.0f);
  // The first kStages - 1 tiles (rope mode: before the wait, earlier calls' keys only); a group
  // each, empty past the split's end, so the waits below count uniformly.
#pragma unroll
  for (int s = 0; s + 1 < kStages; ++s) {
    if (tile_begin + s < tile_end) {
      issue(s, tile_begin + s);
    } else {
      cp_async_commit();
    }
  }
  if (rope) {
    if (tid < kHalf) {
      float cos_v, sin_v;
      rope_angle(pos, a.inv_freq, tid, cos_v, sin_v);
      angles[tid] = make_float2(cos_v, sin_v);
    }
    __syncthreads();
    pdl_wait();
    pdl_trigger();
    if (mark) marks[1] = global_ns();
    if (own_key && tid < kHalf) {  // requested before the queries, to overlap them
      const int64_t at = t * int64_t(c.n_kv_heads) * D + int64_t(kvh) * D + tid;
      k_new = make_float2(a.k[at], a.k[at + kHalf]);
      v_new = make_float2(a.v[at], a.v[at + kHalf]);
    }
  }

  const float scale = kLog2e / sqrtf(float(D));
  const float* q = a.q + t * int64_t(a.n_heads) * D + int64_t(kvh) * G * D;
  auto load_q = [&](int row, int col) -> float2 {
    if (row >= G) return make_float2(0.0f, 0.0f);
    return *reinterpret_cast<const float2*>(q + int64_t(row) * D + col);
  };
  auto pack_q = [&](float2 v) { return pack_half2(v.x * scale, v.y * scale); };
  uint32_t qa[D / 16][4];
  if constexpr (kDirect) {
    // Fragment ks of lane (qr, qc) holds head dimensions qc * 32 + 4 ks + {0, 1} (a0, a1) and
    // + {2, 3} (a2, a3): the K fragments' order below. Rope pairs (d, d + D / 2) are loaded
    // together, whichever lane's dimensions they are.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = qr + 8 * h;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        const int d = qc * 32 + 4 * ks;
        float4 x = row < G ? *reinterpret_cast<const float4*>(q + int64_t(row) * D + d)
                           : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (rope) {
          const int partner = d < kHalf ? d + kHalf : d - kHalf;
          const float4 y = row < G
                               ? *reinterpret_cast<const float4*>(q + int64_t(row) * D + partner)
                               : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          const int i0 = d < kHalf ? d : partner;  // the pairs' angle index
          const float xs[4] = {x.x, x.y, x.z, x.w};
          const float ys[4] = {y.x, y.y, y.z, y.w};
          float r[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 an = angles[i0 + e];
            r[e] =
                d < kHalf ? rotate(xs[e], ys[e], an.x, an.y).x : rotate(ys[e], xs[e], an.x, an.y).y;
          }
          x = make_float4(r[0], r[1], r[2], r[3]);
        }
        qa[ks][h] = pack_q(make_float2(x.x, x.y));
        qa[ks][2 + h] = pack_q(make_float2(x.z, x.w));
      }
    }
  } else if (rope) {
    // kLower (ws.lower_rows): a group of at most 8 query heads (the 8B's 4, the 1.5B's 6) has no
    // query in the fragments' rows 8-15, the pieces i = 1 and 3: they are zeros, without the
    // loads and the rotations of zeros that were half of this phase's ~300 instructions a warp
    // (Nsight, PERF.md thirty-sixth session). Those rows' scores are never read.
    auto rotate_queries = [&](auto lower) {
      constexpr bool kLower = decltype(lower)::value;
#pragma unroll
      for (int ks = 0; ks < kPairFrags; ++ks) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // the fragment's (row, col) pieces, as below
          if (kLower && (i & 1)) {
            qa[ks][i] = 0u;
            qa[ks + kPairFrags][i] = 0u;
            continue;
          }
          const int row = qr + ((i & 1) ? 8 : 0);
          const int h = i >> 1;
          const int col = ks * 16 + 2 * qc + 8 * h;
          const float2 x0 = load_q(row, col);
          const float2 x1 = load_q(row, col + kHalf);
          const float2 a0 = angles[col];
          const float2 a1 = angles[col + 1];
          const float2 r0 = rotate(x0.x, x1.x, a0.x, a0.y);
          const float2 r1 = rotate(x0.y, x1.y, a1.x, a1.y);
          qa[ks][i] = pack_q(make_float2(r0.x, r1.x));
          qa[ks + kPairFrags][i] = pack_q(make_float2(r0.y, r1.y));
        }
      }
    };
    if (G <= 8 && ws.lower_rows) {
      rotate_queries(std::true_type{});
    } else {
      rotate_queries(std::false_type{});
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const int col = ks * 16 + 2 * qc;
      qa[ks][0] = pack_q(load_q(qr, col));
      qa[ks][1] = pack_q(load_q(qr + 8, col));
      qa[ks][2] = pack_q(load_q(qr, col + 8));
      qa[ks][3] = pack_q(load_q(qr + 8, col + 8));
    }
  }
  // The own key's K row rotated, stored with its V row, and kept for the warp whose keys hold it
  // (the tile's copy skipped the row; written once: one barrier): as the cache's reader would see
  // it, or, on the direct fp8 path, as stored: the K and V rows' bytes [2][D], then their scales.
  __shared__ __align__(16) __half own_rows[2][D];
  uint8_t* own_raw = reinterpret_cast<uint8_t*>(own_rows);
  float* own_scale = reinterpret_cast<float*>(own_raw + 2 * D);
  if (own_key) {
    __shared__ float scratch[32];
    const float2 angle = angles[tid < kHalf ? tid : 0];
    const float2 kr = rotate(k_new.x, k_new.y, angle.x, angle.y);
    const int64_t row = cache_row(c, a.layer, seq, kvh, pos);
    if constexpr (kDirect) {
      store_row<kType>(c.k, c.k_scale, row, D, tid, kr.x, kr.y, scratch, nullptr, own_raw,
                       own_scale);
      store_row<kType>(c.v, c.v_scale, row, D, tid, v_new.x, v_new.y, scratch, nullptr, own_raw + D,
                       own_scale + 1);
    } else {
      __half own_k[2], own_v[2];
      store_row<kType>(c.k, c.k_scale, row, D, tid, kr.x, kr.y, scratch, own_k);
      store_row<kType>(c.v, c.v_scale, row, D, tid, v_new.x, v_new.y, scratch, own_v);
      if (tid < kHalf) {
        own_rows[0][tid] = own_k[0];
        own_rows[0][tid + kHalf] = own_k[1];
        own_rows[1][tid] = own_v[0];
        own_rows[1][tid + kHalf] = own_v[1];
      }
    }
    __syncthreads();
  }
  if (mark) marks[2] = global_ns();
  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
  // The direct fp8 path's second running maximum, of score + log2(the key's V scale): o sums
  // 2^(s + log2 sv - w) v over the raw (exactly converted) V entries, so its largest weight is 1
  // whatever the rows' scales (an fp16 weight p * sv would leave fp16's range for rows of large
  // or tiny scale), and l sums 2^(s - m); the end rescales o by 2^(w - m).
  float w0 = -INFINITY, w1 = -INFINITY;

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    // The tile kStages - 1 ahead goes into the stage the last tile left (read by the barrier or
    // __syncwarp that ended it), then this tile's group is waited for.
    const int stage = int((tile - tile_begin) % kStages);
    const int ahead = stage == 0 ? kStages - 1 : stage - 1;
    if (tile + kStages - 1 < tile_end) {
      issue(ahead, tile + kStages - 1);
    } else {
      cp_async_commit();
    }
    cp_async_wait<kStages - 1>();
    // fp8: the warp's lanes' copies of its rows have landed; fp16: every thread's copies.
    if constexpr (kRaw) {
      __syncwarp();
    } else {
      __syncthreads();
    }
    if constexpr (kDirect) {
      uint8_t* k_raw = raw + stage * 2 * kPrefillKeys * D;
      uint8_t* v_raw = k_raw + kPrefillKeys * D;
      float* k_scale = raw_scales + stage * 2 * kPrefillKeys;
      float* v_scale = k_scale + kPrefillKeys;
      if (own_key && tile == own_tile) {  // the own rows, as stored, into the row the copy skipped
        const int r = int(pos - own_tile * kPrefillKeys);
        if (r / 16 == warp) {
          if (lane < 16) {
            const int u = lane & 7;
            *reinterpret_cast<uint4*>((lane < 8 ? k_raw : v_raw) + r * D + (u ^ (r & 7)) * 16) =
                *reinterpret_cast<const uint4*>(own_raw + (lane >> 3) * D + u * 16);
          } else if (lane < 18) {
            (lane == 16 ? k_scale : v_scale)[r] = own_scale[lane - 16];
          }
        }
      }
      __syncwarp();
      const int64_t key0 = tile * kPrefillKeys + warp * 16;  // this warp's 16 keys
      // Scores: key nt * 8 + qr's bytes qc * 32 .. + 31 (rows swizzled: r % 8 == qr), word ks
      // of them the B fragment of k-step ks, converted exactly; the scale multiplies in fp32.
      float sc[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const uint8_t* row = k_raw + (warp * 16 + nt * 8 + qr) * D;
        const uint4 u0 = *reinterpret_cast<const uint4*>(row + ((2 * qc) ^ qr) * 16);
        const uint4 u1 = *reinterpret_cast<const uint4*>(row + ((2 * qc + 1) ^ qr) * 16);
        const uint32_t kw[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
        sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
          uint32_t b0, b1;
          e4m3x4_to_half2x2(kw[ks], b0, b1);
          mma_16816(sc[nt], qa[ks], b0, b1);
        }
      }
      // The lane's keys nt * 8 + 2 qc + e: K scales on the scores, log2 of the V scales (0 for
      // keys past the context: -inf, as their masked scores).
      float lv[2][2];
      float mx0 = -INFINITY, mx1 = -INFINITY, mw0 = -INFINITY, mw1 = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = warp * 16 + nt * 8 + 2 * qc + e;
          const float ks = k_scale[key];
          lv[nt][e] = fast_log2(v_scale[key]);
          const bool past = key0 + nt * 8 + 2 * qc + e >= n_ctx;
          sc[nt][e] = past ? -INFINITY : sc[nt][e] * ks;
          sc[nt][2 + e] = past ? -INFINITY : sc[nt][2 + e] * ks;
          mx0 = fmaxf(mx0, sc[nt][e]);
          mx1 = fmaxf(mx1, sc[nt][2 + e]);
          mw0 = fmaxf(mw0, sc[nt][e] + lv[nt][e]);
          mw1 = fmaxf(mw1, sc[nt][2 + e] + lv[nt][e]);
        }
      }
      mx0 = quad_max(mx0);
      mx1 = quad_max(mx1);
      mw0 = quad_max(mw0);
      mw1 = quad_max(mw1);
      // A warp whose 16 keys are all past the context keeps its state (maxima stay -inf).
      const float new_m0 = fmaxf(m0, mx0), new_m1 = fmaxf(m1, mx1);
      const float new_w0 = fmaxf(w0, mw0), new_w1 = fmaxf(w1, mw1);
      const float alpha0 = new_m0 == -INFINITY ? 1.0f : fast_exp2(m0 - new_m0);
      const float alpha1 = new_m1 == -INFINITY ? 1.0f : fast_exp2(m1 - new_m1);
      const float beta0 = new_w0 == -INFINITY ? 1.0f : fast_exp2(w0 - new_w0);
      const float beta1 = new_w1 == -INFINITY ? 1.0f : fast_exp2(w1 - new_w1);
      m0 = new_m0;
      m1 = new_m1;
      w0 = new_w0;
      w1 = new_w1;
      l0 *= alpha0;
      l1 *= alpha1;
      // Once the maxima settle most tiles leave o as it is: skip the rescale then.
      if (__any_sync(0xffffffffu, beta0 != 1.0f || beta1 != 1.0f)) {
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          o[dt][0] *= beta0;
          o[dt][1] *= beta0;
          o[dt][2] *= beta1;
          o[dt][3] *= beta1;
        }
      }
      float pv[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          l0 += m0 == -INFINITY ? 0.0f : fast_exp2(sc[nt][e] - m0);
          l1 += m1 == -INFINITY ? 0.0f : fast_exp2(sc[nt][2 + e] - m1);
          pv[nt][e] = w0 == -INFINITY ? 0.0f : fast_exp2(sc[nt][e] + lv[nt][e] - w0);
          pv[nt][2 + e] = w1 == -INFINITY ? 0.0f : fast_exp2(sc[nt][2 + e] + lv[nt][e] - w1);
        }
      }
      const uint32_t pa[4] = {pack_half2(pv[0][0], pv[0][1]), pack_half2(pv[0][2], pv[0][3]),
                              pack_half2(pv[1][0], pv[1][1]), pack_half2(pv[1][2], pv[1][3])};
      // P·V: output column n of tile dt is head dimension n * 16 + dt, so lane (qr, qc) takes
      // the 16 bytes qr * 16 .. + 15 of its keys 2 qc, 2 qc + 1 (b0) and 2 qc + 8, 2 qc + 9
      // (b1), paired a byte of each key at a time.
      const uint8_t* vrow = v_raw + (warp * 16 + 2 * qc) * D;
      const int ua = (qr ^ (2 * qc)) * 16;      // rows 2 qc and 2 qc + 8 (r % 8 == 2 qc)
      const int ub = (qr ^ (2 * qc + 1)) * 16;  // rows 2 qc + 1 and 2 qc + 9
      const uint4 va = *reinterpret_cast<const uint4*>(vrow + ua);
      const uint4 vb = *reinterpret_cast<const uint4*>(vrow + D + ub);
      const uint4 vc = *reinterpret_cast<const uint4*>(vrow + 8 * D + ua);
      const uint4 vd = *reinterpret_cast<const uint4*>(vrow + 9 * D + ub);
      const uint32_t wa[4] = {va.x, va.y, va.z, va.w}, wb[4] = {vb.x, vb.y, vb.z, vb.w};
      const uint32_t wc[4] = {vc.x, vc.y, vc.z, vc.w}, wd[4] = {vd.x, vd.y, vd.z, vd.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const uint32_t ab01 = __byte_perm(wa[w], wb[w], 0x5140);  // bytes 0, 1 of each key
        const uint32_t ab23 = __byte_perm(wa[w], wb[w], 0x7362);  // bytes 2, 3
        const uint32_t cd01 = __byte_perm(wc[w], wd[w], 0x5140);
        const uint32_t cd23 = __byte_perm(wc[w], wd[w], 0x7362);
        uint32_t ab[4], cd[4];  // dimension 4w + j's pairs
        e4m3x4_to_half2x2(ab01, ab[0], ab[1]);
        e4m3x4_to_half2x2(ab23, ab[2], ab[3]);
        e4m3x4_to_half2x2(cd01, cd[0], cd[1]);
        e4m3x4_to_half2x2(cd23, cd[2], cd[3]);
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_16816(o[4 * w + j], pa, ab[j], cd[j]);
      }
      __syncwarp();  // the warp's rows of the stage are read; the next copy may overwrite them
      continue;
    }
    __half* k_tile = decode_smem + (kRaw ? 0 : stage) * 2 * kTile;
    if constexpr (kRaw) {
      const int64_t key0 = tile * kPrefillKeys;
      const uint8_t* k_raw = raw + stage * 2 * kPrefillKeys * D;
      convert_fp8_tile<D, 32, 16>(k_raw, k_raw + kPrefillKeys * D,
                                  raw_scales + stage * 2 * kPrefillKeys + kPrefillKeys, k_tile,
                                  k_tile + kTile, key0, own_key ? pos : -1, lane, warp * 16);
    }
    if (own_key && tile == own_tile) {
      const int r = int(pos - own_tile * kPrefillKeys);
      if (r / 16 == warp) {
        for (int d = lane; d < D; d += 32) {
          k_tile[r * kStride + d] = own_rows[0][d];
          k_tile[kTile + r * kStride + d] = own_rows[1][d];
        }
        // fp8: the own row holds the values a reader of the cache sees, scales applied.
        if (kRaw && lane == 0) raw_scales[stage * 2 * kPrefillKeys + r] = 1.0f;
      }
    }
    __syncwarp();  // the own row, written by the warp that reads it
    const __half* k_s = k_tile;
    const __half* v_s = k_s + kTile;
    const int64_t key0 = tile * kPrefillKeys + warp * 16;  // this warp's 16 keys

    float sc[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        const __half* k_row = &k_s[(warp * 16 + nt * 8 + qr) * kStride + ks * 16 + 2 * qc];
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(k_row);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(k_row + 8);
        mma_16816(sc[nt], qa[ks], b0, b1);
      }
    }
    if constexpr (kRaw) {  // the K rows' scales (0 for keys past the context, masked below)
      const float* k_scale = raw_scales + stage * 2 * kPrefillKeys + warp * 16;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) sc[nt][i] *= k_scale[nt * 8 + 2 * qc + (i & 1)];
      }
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (key0 + nt * 8 + 2 * qc + (i & 1) >= n_ctx) sc[nt][i] = -INFINITY;
      }
      mx0 = fmaxf(mx0, fmaxf(sc[nt][0], sc[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(sc[nt][2], sc[nt][3]));
    }
    mx0 = quad_max(mx0);
    mx1 = quad_max(mx1);
    // A warp whose 16 keys are all past the context keeps its state (max stays -inf).
    const float new_m0 = fmaxf(m0, mx0);
    const float new_m1 = fmaxf(m1, mx1);
    const float alpha0 = new_m0 == -INFINITY ? 1.0f : fast_exp2(m0 - new_m0);
    const float alpha1 = new_m1 == -INFINITY ? 1.0f : fast_exp2(m1 - new_m1);
    m0 = new_m0;
    m1 = new_m1;
    l0 *= alpha0;
    l1 *= alpha1;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= alpha0;
      o[dt][1] *= alpha0;
      o[dt][2] *= alpha1;
      o[dt][3] *= alpha1;
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      sc[nt][0] = m0 == -INFINITY ? 0.0f : fast_exp2(sc[nt][0] - m0);
      sc[nt][1] = m0 == -INFINITY ? 0.0f : fast_exp2(sc[nt][1] - m0);
      sc[nt][2] = m1 == -INFINITY ? 0.0f : fast_exp2(sc[nt][2] - m1);
      sc[nt][3] = m1 == -INFINITY ? 0.0f : fast_exp2(sc[nt][3] - m1);
      l0 += sc[nt][0] + sc[nt][1];
      l1 += sc[nt][2] + sc[nt][3];
    }
    const uint32_t pa[4] = {pack_half2(sc[0][0], sc[0][1]), pack_half2(sc[0][2], sc[0][3]),
                            pack_half2(sc[1][0], sc[1][1]), pack_half2(sc[1][2], sc[1][3])};
    const int key = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int dt = 0; dt < D / 8; dt += 2) {
      const int col = dt * 8 + (lane >> 4) * 8;
      uint32_t b[4];
      const uint32_t addr = uint32_t(__cvta_generic_to_shared(&v_s[key * kStride + col]));
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                   : "r"(addr));
      mma_16816(o[dt], pa, b[0], b[1]);
      mma_16816(o[dt + 1], pa, b[2], b[3]);
    }
    // The stage is read (fp8: the warp's rows of it); the next copy may overwrite it.
    if constexpr (kRaw) {
      __syncwarp();
    } else {
      __syncthreads();
    }
  }
  cp_async_wait<0>();  // the groups past the split's end are empty; none is left in flight
  __syncthreads();     // every warp is done with the stages, which hold the merge's buffers next
  if (mark) marks[3] = global_ns();
  if constexpr (kDirect) {  // o in the units of m, as the other paths'
    const float f0 = m0 == -INFINITY ? 0.0f : fast_exp2(w0 - m0);
    const float f1 = m1 == -INFINITY ? 0.0f : fast_exp2(w1 - m1);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= f0;
      o[dt][1] *= f0;
      o[dt][2] *= f1;
      o[dt][3] *= f1;
    }
  }

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  // The four warps' states, in the stages' shared memory: m, l [warp][16], o [warp][16][D + 8].
  // The padded row stride makes a half warp's float2 stores (rows qr 0-3, columns 2 qc) cover 32
  // distinct banks, where a stride of D puts its four rows' on the same eight (H200, the profile's
  // partials phase, 8B and 1.5B at batch 1 and 16: 2.1-3.5 us -> 1.6-2.8).
  constexpr int kRedStride = D + 8;
  static_assert(
      (2 * kWarps * 16 + kWarps * 16 * kRedStride) * sizeof(float) <= prefill_smem_bytes<D>(),
      "the warps' states fit the stages' shared memory");
  float* red_m = reinterpret_cast<float*>(decode_smem);
  float* red_l = red_m + kWarps * 16;
  float* red_o = red_l + kWarps * 16;
  if (qc == 0) {
    red_m[warp * 16 + qr] = m0;
    red_m[warp * 16 + qr + 8] = m1;
    red_l[warp * 16 + qr] = l0;
    red_l[warp * 16 + qr + 8] = l1;
  }
  // The lane's rows qr and qr + 8 from column 2 qc; column dt * 8 is float2 dt * 4. (With the
  // stores indexed from red_o instead, ptxas spills 4 bytes at head_dim 128 over fp8.)
  float2* row0 = reinterpret_cast<float2*>(red_o + (warp * 16 + qr) * kRedStride + 2 * qc);
  float2* row8 = reinterpret_cast<float2*>(red_o + (warp * 16 + qr + 8) * kRedStride + 2 * qc);
  // Rows 8-15 hold queries only in a group of more than 8 heads (merge_warps reads rows g < G):
  // ws.lower_rows leaves them out.
  if (G > 8 || !ws.lower_rows) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      row0[dt * 4] = make_float2(o[dt][0], o[dt][1]);
      row8[dt * 4] = make_float2(o[dt][2], o[dt][3]);
    }
  } else {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) row0[dt * 4] = make_float2(o[dt][0], o[dt][1]);
  }
  __syncthreads();
  constexpr float kLn2 = 0.6931471805599453f;
  // ws.solo (a switch until it has run on a GPU): a group of one split writes its output here,
  // as the merge would from its one partial result, with no partial results, fences, count or
  // merge round trips; in rope mode it loads the pairs it writes back rotated before the
  // outputs, to overlap them. At head_dim 128 only: at 64 the path spills 12-20 bytes at the 128
  // registers of four blocks an SM (ptxas, sm_90).
  const bool solo = solo_rule && used == 1;
  const int64_t q_dim = int64_t(a.n_heads) * D;
  GroupPairs<D> solo_pairs;
  const bool write_back = rope && a.keep_rotated;
  if (solo && write_back) load_group_pairs<D>(a, c, t, kvh, G, solo_pairs);
  // The block's four warps' states of query row g merged, for the four dimensions d .. d + 3
  // (d a multiple of 4): the row's maximum and weights once for all four, and one 16-byte
  // read a warp's state (the direct fp8 path's columns are permuted: four reads). Each value's
  // arithmetic is the same as merging it alone.
  auto merge_warps = [&](int g, int d, float& m, float& l, float4& acc) {
    m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, red_m[w * 16 + g]);
    l = 0.0f;
    acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float mw = red_m[w * 16 + g];
      const float e = mw == -INFINITY ? 0.0f : fast_exp2(mw - m);
      l += e * red_l[w * 16 + g];
      const float* row = red_o + (w * 16 + g) * kRedStride;
      float4 v;
      if constexpr (kDirect) {  // column dt * 8 + n is head dimension n * 16 + dt
        auto at = [&](int dim) { return row[(dim & 15) * 8 + (dim >> 4)]; };
        v = make_float4(at(d), at(d + 1), at(d + 2), at(d + 3));
      } else {
        v = *reinterpret_cast<const float4*>(row + d);
      }
      acc.x += e * v.x;
      acc.y += e * v.y;
      acc.z += e * v.z;
      acc.w += e * v.w;
    }
  };
  constexpr int kQuads = D / 4;
  static_assert(kQuads % 4 == 0, "a half group is four quads of one head (store_merged4)");
  // f(g, d, m, l, acc) for each of the block's G x D / 4 merged outputs, a thread's at tid,
  // + kPrefillThreads, ...
  auto each_merged = [&](auto&& f) {
    for (int idx = tid; idx < G * kQuads; idx += kPrefillThreads) {
      const int g = idx / kQuads;
      const int d = (idx % kQuads) * 4;
      float m, l;
      float4 acc;
      merge_warps(g, d, m, l, acc);
      f(g, d, m, l, acc);
    }
  };
  if (solo) {
    each_merged([&](int g, int d, float, float l, float4 acc) {
      store_merged4(a, t, q_dim, (int64_t(kvh) * G + g) * D + d, acc, l);  // one split's merge
    });
    if (kvh == c.n_kv_heads - 1) zero_shadow_padding(a, t, q_dim, kPrefillThreads);
    if (write_back) store_group_pairs<D>(a, c, t, kvh, G, solo_pairs, angles);
    if (ws.profile != 0) __syncthreads();  // the output's end is its slowest thread's
    if (mark && profiled_step(a, ws, local, kvh, pos)) {
      marks[4] = marks[5] = marks[6] = global_ns();  // its output phase, printed as "partials"
      print_attention_profile(marks, pos, split, used);
    }
    return;
  }
  each_merged([&](int g, int d, float m, float l, float4 acc) {
    const int64_t slot = (local * a.n_heads + kvh * G + g) * ws.max_splits + split;
    *reinterpret_cast<float4*>(ws.o + slot * D + d) = acc;
    if (d == 0) {
      ws.ml[slot * 2] = m * kLn2;  // natural-log units, as the split kernel's
      ws.ml[slot * 2 + 1] = l;
    }
  });
  // Arrival: after the block's barrier, thread 0's count is an acquire-release atomic: its release
  // publishes the block's partial results (cumulative through the barrier, as CUTLASS's
  // semaphores do), and the split that brings the count to the group's splits acquires the
  // others' and, after the next barrier, merges them (setting the count back to zero for the next
  // launch). Measured on the H200 (PERF.md, twenty-first session) against a __threadfence() by
  // every thread before the count and again in the merging block: the partials phase 0.4-2.0 us
  // shorter, the wait moved into the count (arrive 0.2-0.4 -> 0.7-2.1 us), the merge 0.2-0.8 us
  // shorter; tg128 +0.3% (8B) and +0.7% (1.5B) at batch 1, +0.3% and +0.6% at 16.
  if (ws.arrivals == nullptr) return;  // the combine kernel merges (a measurement aid)
  __shared__ bool merges;
  __syncthreads();
  if (tid == 0) {
    if (mark) marks[4] = global_ns();
    unsigned* count = ws.arrivals + local * c.n_kv_heads + kvh;
    unsigned before = 0;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n"
                 : "=r"(before)
                 : "l"(count)
                 : "memory");
    merges = before + 1 == unsigned(used);
    if (merges) *count = 0;
    if (mark) marks[5] = global_ns();
  }
  __syncthreads();
  if (!merges) return;
  merge_group<D>(a, c, ws, local, t, kvh, G, used, angles);
  if (ws.profile != 0) __syncthreads();  // the merge's end is its slowest thread's
  if (mark && profiled_step(a, ws, local, kvh, pos)) {
    marks[6] = global_ns();
    print_attention_profile(marks, pos, split, used);
  }
}

// Calls f(std::integral_constant<KvType, type>{}) for the cache's entry type.
template <typename F>
Status dispatch_kv(KvType type, F&& f) {
  switch (type) {
    case KvType::f16:
      return f(std::integral_constant<KvType, KvType::f16>{});
    case KvType::f8:
      return f(std::integral_constant<KvType, KvType::f8>{});
    case KvType::f32:
      return f(std::integral_constant<KvType, KvType::f32>{});
  }
  return Status::error("cuda attention: unknown KV cache type");
}

// Threads of a block that stores cache rows: a thread per pair of a row, in whole warps.
int row_threads(int head_dim) {
  return std::min(512, (head_dim / 2 + 31) / 32 * 32);
}

// set_decode_solo: -1, the workspace's own ws.solo (one tile).
int decode_solo_override = -1;

// set_decode_block_copy (KESTREL_CUDA_ATTENTION_BLOCK_COPY=0 turns its starting value off):
// DecodeWorkspace's block_copy for every launch. H100, one call (PERF.md, thirty-seventh
// session): tg128 8B b1 +1.1%, 1.5B b16 +1.9%, the others within 0.2%; at 1024 positions the
// 1.5B's batch-16 step 1.51 -> 1.49 ms.
std::atomic<bool>& decode_block_copy_flag() {
  static std::atomic<bool> on{!env_is("KESTREL_CUDA_ATTENTION_BLOCK_COPY", "0")};
  return on;
}

// set_decode_lower_rows (KESTREL_CUDA_ATTENTION_LOWER_ROWS=0 turns its starting value off):
// DecodeWorkspace's lower_rows for every launch. H100, one call (PERF.md, thirty-seventh
// session): tg128 1.5B b1 +1.4%, 8B b1 +0.3%, batch 16 within 0.2%.
std::atomic<bool>& decode_lower_rows_flag() {
  static std::atomic<bool> on{!env_is("KESTREL_CUDA_ATTENTION_LOWER_ROWS", "0")};
  return on;
}

// KESTREL_CUDA_ATTENTION_COMBINE=1 (a measurement aid): the tensor-core decode kernel leaves its
// splits to the combine kernel, as before it merged them itself.
bool combine_launch() {
  static const bool on = env_is("KESTREL_CUDA_ATTENTION_COMBINE", "1");
  return on;
}

// Whether the backend asks a one-token decode attention for its output's half groups
// (attention_half_groups; the default since the twenty-fifth session's H100 measurement;
// KESTREL_CUDA_ATTENTION_HALF_GROUPS=0 at start-up turns it off).
std::atomic<bool>& attention_half_groups_flag() {
  static std::atomic<bool> on{!env_is("KESTREL_CUDA_ATTENTION_HALF_GROUPS", "0")};
  return on;
}

// set_decode_split_cap (KESTREL_CUDA_DECODE_SPLIT_CAP as its starting value): 0, no cap.
int decode_split_cap = std::max(env_int("KESTREL_CUDA_DECODE_SPLIT_CAP", 0), 0);

}  // namespace

void set_decode_solo(int tiles) {
  decode_solo_override = tiles;
}

bool set_decode_block_copy(bool on) {
  return decode_block_copy_flag().exchange(on);
}

bool set_decode_lower_rows(bool on) {
  return decode_lower_rows_flag().exchange(on);
}

void set_decode_split_cap(int cap) {
  decode_split_cap = cap > 0 ? cap : 0;
}

bool set_attention_half_groups(bool on) {
  return attention_half_groups_flag().exchange(on);
}

bool attention_half_groups() {
  return attention_half_groups_flag().load(std::memory_order_relaxed);
}

bool attention_writes_halves(int head_dim, KvType type, int64_t n_tokens) {
  return n_tokens == 1 && tensor_core_attention(head_dim, type) && !combine_launch();
}

int decode_splits(int sm_count, int n_kv_heads, int64_t tokens, int64_t max_context) {
  const int64_t target = 4 * int64_t(std::max(sm_count, 1));
  const int64_t per_head = std::max<int64_t>(1, n_kv_heads) * std::max<int64_t>(1, tokens);
  const int64_t chunks = std::max<int64_t>(1, ceil_div(max_context, kDecodeSplit));
  return int(std::clamp<int64_t>(ceil_div(target, per_head), 1, chunks));
}

Status check_kv_cache(KvType type, int head_dim) {
  if (type == KvType::f8 && (head_dim % 16 != 0 || head_dim > 1024)) {
    return Status::error(
        "cuda: an fp8 KV cache needs head_dim a multiple of 16 and at most 1024, "
        "got " +
        std::to_string(head_dim) + " (use --kv-cache fp16)");
  }
  return Status::ok();
}

Status kv_cache_write(const AttentionArgs& args, const KvCache& cache, cudaStream_t stream) {
  if (args.q_bias != nullptr || args.k_bias != nullptr || args.v_bias != nullptr ||
      args.qkv != nullptr) {
    return Status::error("cuda attention: the cache write takes no biases or stacked product");
  }
  return dispatch_kv(cache.type, [&](auto type) -> Status {
    KS_CUDA_CHECK("attention",
                  launch_pdl(kv_write_kernel<decltype(type)::value>,
                             dim3(unsigned(args.n_tokens), unsigned(cache.n_kv_heads)),
                             dim3(unsigned(row_threads(cache.head_dim))), 0, stream, args, cache));
    KS_CUDA_CHECK_LAUNCH("attention", "kv_write_kernel");
    return Status::ok();
  });
}

Status rope_kv_cache_write(const AttentionArgs& args, const KvCache& cache, const float* inv_freq,
                           cudaStream_t stream) {
  const int heads = args.n_heads + cache.n_kv_heads;
  const bool biased = args.q_bias != nullptr || args.k_bias != nullptr || args.v_bias != nullptr;
  if ((biased || args.qkv != nullptr) &&
      (cache.type == KvType::f8 || args.n_tokens < kRopeTokensThreshold)) {
    return Status::error(
        "cuda attention: q/k/v biases or a stacked q/k/v product go through the rope launch only "
        "in prefill calls over an fp16 or fp32 cache");
  }
  return dispatch_kv(cache.type, [&](auto type) -> Status {
    constexpr KvType kType = decltype(type)::value;
    if constexpr (kType != KvType::f8) {
      if (args.n_tokens >= kRopeTokensThreshold) {
        // A block per token: 64 pairs (a head of 128) x 8 heads.
        const int pairs = std::min(cache.head_dim / 2, 64);
        KS_CUDA_CHECK("attention",
                      launch_pdl(rope_kv_write_tokens_kernel<kType>, dim3(unsigned(args.n_tokens)),
                                 dim3(unsigned(pairs), unsigned(std::min(heads, 512 / pairs))), 0,
                                 stream, args, cache, inv_freq));
        KS_CUDA_CHECK_LAUNCH("attention", "rope_kv_write_tokens_kernel");
        return Status::ok();
      }
    }
    KS_CUDA_CHECK("attention", launch_pdl(rope_kv_write_kernel<decltype(type)::value>,
                                          dim3(unsigned(args.n_tokens), unsigned(heads)),
                                          dim3(unsigned(row_threads(cache.head_dim))), 0, stream,
                                          args, cache, inv_freq));
    KS_CUDA_CHECK_LAUNCH("attention", "rope_kv_write_kernel");
    return Status::ok();
  });
}

namespace {

template <int kD, KvType kType>
Status launch_decode(const AttentionArgs& args, const KvCache& cache, const DecodeWorkspace& ws,
                     cudaStream_t stream) {
  // The tensor-core kernel where it applies; the CUDA-core one for other head sizes and for fp32
  // entries (fp32 arithmetic throughout).
  constexpr bool kMma = tensor_core_attention(kD, kType);
  constexpr int kMmaD = kD == 64 ? 64 : 128;
  constexpr KvType kMmaType = kType == KvType::f32 ? KvType::f16 : kType;  // never launched
  if (args.inv_freq != nullptr && !kMma) {
    return Status::error(
        "cuda attention: rope inside the decode kernel needs head_dim 64 or 128 and an fp16 or "
        "fp8 cache");
  }
  auto kernel =
      kMma ? attention_split_mma_kernel<kMmaD, kMmaType> : attention_split_kernel<kD, kType>;
  const int threads = kMma ? kPrefillThreads : kDecodeThreads;
  const int chunk_keys = kMma ? kPrefillKeys : kDecodeSplit;
  const int group = args.n_heads / cache.n_kv_heads;
  const size_t smem = kMma ? prefill_smem_bytes<kMmaD>()
                           : split_smem_bytes(group, cache.head_dim, int(kv_type_bytes(kType)));
  if (kMma && smem > 48 * 1024) {  // the tensor-core kernel's size is fixed per instantiation
    static std::atomic<uint64_t> limit_set{0};
    KS_CUDA_CHECK("attention",
                  set_smem_limit_once(reinterpret_cast<const void*>(kernel), int(smem), limit_set));
  }
  if (!kMma && smem > 48 * 1024) {  // the CUDA-core kernel's size depends on the group
    KS_CUDA_CHECK("attention", cudaFuncSetAttribute(
                                   kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  static int resident = 0;  // blocks of this kernel an SM holds at once, once per instantiation
  if (resident == 0) {
    KS_CUDA_CHECK("attention",
                  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, threads, smem));
    resident = std::max(resident, 1);
  }
  const bool merge_in_split = kMma && !combine_launch();
  DecodeWorkspace split_ws = ws;
  if (!merge_in_split) split_ws.arrivals = nullptr;
  if (decode_solo_override >= 0) split_ws.solo = decode_solo_override;
  split_ws.block_copy = decode_block_copy_flag().load(std::memory_order_relaxed);
  split_ws.lower_rows = decode_lower_rows_flag().load(std::memory_order_relaxed);
  const size_t combine_smem = size_t(ws.max_splits) * sizeof(float);
  if (!merge_in_split && combine_smem > 48 * 1024) {
    KS_CUDA_CHECK("attention", cudaFuncSetAttribute(attention_combine_kernel,
                                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    int(combine_smem)));
  }
  const int64_t max_context = int64_t(ws.max_splits) * kDecodeSplit;  // a bound on the context
  for (int64_t begin = 0; begin < args.n_tokens; begin += kMaxGemvTokens) {
    const int64_t count = std::min<int64_t>(kMaxGemvTokens, args.n_tokens - begin);
    int splits = 0;
    if (kMma) {
      // One wave: as many blocks as the SMs hold at once, shared by the (token, KV head) pairs.
      const int64_t wave = int64_t(resident) * ws.sm_count;
      splits = int(std::clamp<int64_t>(wave / (int64_t(cache.n_kv_heads) * count), 1,
                                       ceil_div(max_context, kPrefillKeys)));
    } else {
      splits = decode_splits(ws.sm_count, cache.n_kv_heads, count, max_context);
    }
    if (kMma && decode_split_cap > 0) splits = std::min(splits, decode_split_cap);
    splits = std::min(splits, ws.max_splits);
    const dim3 grid(unsigned(splits), unsigned(cache.n_kv_heads), unsigned(count));
    KS_CUDA_CHECK("attention", launch_pdl(kernel, grid, dim3(unsigned(threads)), smem, stream, args,
                                          cache, split_ws, begin, splits));
    KS_CUDA_CHECK_LAUNCH("attention", "attention_split_kernel");
    if (merge_in_split) continue;  // the split kernel merged its splits
    KS_CUDA_CHECK(
        "attention",
        launch_pdl(attention_combine_kernel, dim3(unsigned(args.n_heads), unsigned(count)),
                   dim3(kCombineThreads), combine_smem, stream, args, cache.head_dim,
                   cache.n_kv_heads, ws, begin, splits, chunk_keys));
    KS_CUDA_CHECK_LAUNCH("attention", "attention_combine_kernel");
  }
  return Status::ok();
}

}  // namespace

Status attention_decode(const AttentionArgs& args, const KvCache& cache, const DecodeWorkspace& ws,
                        cudaStream_t stream) {
  if (args.shadow.halves.q != nullptr &&
      (args.shadow.data == nullptr ||
       !attention_writes_halves(cache.head_dim, cache.type, args.n_tokens))) {
    return Status::error(
        "cuda attention: only the tensor-core decode kernel's own merge of one token writes "
        "half groups, beside a shadow");
  }
  return dispatch_kv(cache.type, [&](auto type) -> Status {
    constexpr KvType kType = decltype(type)::value;
    if (cache.head_dim == 64) return launch_decode<64, kType>(args, cache, ws, stream);
    if (cache.head_dim == 128) return launch_decode<128, kType>(args, cache, ws, stream);
    return launch_decode<0, kType>(args, cache, ws, stream);
  });
}

namespace {

// Key groups of a prefill launch (the kernel's kGroups): 0 chooses by the grid, 1 or 2 forces
// (set_prefill_attention_groups; KESTREL_CUDA_PREFILL_ATTENTION_GROUPS as its starting value).
int prefill_groups_forced = [] {
  const int g = env_int("KESTREL_CUDA_PREFILL_ATTENTION_GROUPS", 0);
  return g == 1 || g == 2 ? g : 0;
}();

template <int D, KvType kType, int kGroups>
Status launch_prefill_groups(const AttentionArgs& args, const KvCache& cache, dim3 grid,
                             cudaStream_t stream) {
  constexpr size_t kSmem = prefill_smem_bytes<D, kGroups>();
  static std::atomic<uint64_t> limit_set{0};  // devices, once per instantiation
  KS_CUDA_CHECK("attention", set_smem_limit_once(reinterpret_cast<const void*>(
                                                     attention_prefill_kernel<D, kType, kGroups>),
                                                 int(kSmem), limit_set));
  KS_CUDA_CHECK("attention",
                launch_pdl(attention_prefill_kernel<D, kType, kGroups>, grid,
                           dim3(kPrefillThreads * kGroups), kSmem, stream, args, cache));
  KS_CUDA_CHECK_LAUNCH("attention", "attention_prefill_kernel");
  return Status::ok();
}

// One key group while the grid is large: its waves' tails are the short causal tiles. A small
// grid leaves the longest query tile's walk as the kernel's time, which two groups halve. The
// line is drawn at two blocks an SM, where it was measured (H200): Qwen2-1.5B's 12 heads x 16
// query tiles of a 1024-token prompt, 192 blocks on 132 SMs, took 8.6 ms to the first token with
// one group and 7.4 with two, though a one-group block fits three to an SM (D 128, fp16: 168
// registers, 70 KB) and a two-group block one (227 registers, 139 KB), so two groups run 1.45
// waves where one group ran one. Grids between one and two blocks an SM of other shapes are
// unmeasured.
template <int D, KvType kType>
Status launch_prefill(const AttentionArgs& args, const KvCache& cache, cudaStream_t stream) {
  const dim3 grid(unsigned(args.n_heads), unsigned(ceil_div(args.n_tokens, kPrefillRows)));
  int groups = prefill_groups_forced;
  if (groups == 0) {
    KS_ASSIGN_OR_RETURN(const int sm_count, device_sm_count("attention"));
    groups = int64_t(grid.x) * grid.y <= 2 * int64_t(sm_count) ? 2 : 1;
  }
  if (groups == 2) return launch_prefill_groups<D, kType, 2>(args, cache, grid, stream);
  return launch_prefill_groups<D, kType, 1>(args, cache, grid, stream);
}

}  // namespace

void set_prefill_attention_groups(int groups) {
  prefill_groups_forced = groups == 1 || groups == 2 ? groups : 0;
}

Status attention_prefill(const AttentionArgs& args, const KvCache& cache, cudaStream_t stream) {
  if (args.shadow.halves.q != nullptr) {
    return Status::error("cuda attention: the prefill kernel writes no half groups");
  }
  if (ceil_div(args.n_tokens, kPrefillRows) > 65535) {
    return Status::error("cuda attention: a prefill run of " + std::to_string(args.n_tokens) +
                         " tokens exceeds the kernel's grid");
  }
  if (cache.type == KvType::f16 && cache.head_dim == 64) {
    return launch_prefill<64, KvType::f16>(args, cache, stream);
  }
  if (cache.type == KvType::f16 && cache.head_dim == 128) {
    return launch_prefill<128, KvType::f16>(args, cache, stream);
  }
  if (cache.type == KvType::f8 && cache.head_dim == 64) {
    return launch_prefill<64, KvType::f8>(args, cache, stream);
  }
  if (cache.type == KvType::f8 && cache.head_dim == 128) {
    return launch_prefill<128, KvType::f8>(args, cache, stream);
  }
  return Status::error("cuda attention: prefill kernel has no head_dim " +
                       std::to_string(cache.head_dim));
}

}  // namespace kestrel::cuda
