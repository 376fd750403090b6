#include <algorithm>
#include <cmath>

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

// Element offset of (layer, slot, KV head, position) in K or V, through the slot's block table.
__device__ inline int64_t cache_offset(const KvCache& c, int64_t layer, int64_t seq, int64_t kvh,
                                       int64_t pos) {
  const int64_t block = c.block_tables[seq * c.table_stride + pos / kKvBlockSize];
  return (((layer * c.n_blocks + block) * c.n_kv_heads + kvh) * kKvBlockSize + pos % kKvBlockSize) *
         c.head_dim;
}

__global__ void kv_write_kernel(AttentionArgs a, KvCache c) {
  pdl_wait();
  pdl_trigger();
  const int64_t t = blockIdx.x;
  const int64_t pos = a.positions[t];
  const int64_t seq = a.seq_ids[t];
  const int kv_dim = c.n_kv_heads * c.head_dim;
  for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
    const int kvh = i / c.head_dim;
    const int d = i % c.head_dim;
    const int64_t off = cache_offset(c, a.layer, seq, kvh, pos) + d;
    c.k[off] = __float2half_rn(a.k[t * kv_dim + i]);
    c.v[off] = __float2half_rn(a.v[t * kv_dim + i]);
  }
}

// rope_kernel (rope.cu) and kv_write_kernel fused. Blocks are (token, group of heads_per_block
// heads: query heads, then KV heads); KV heads also write their V row. Decode launches a block
// per head, a thread per rotated pair, so the launch is one round of loads and stores (a block
// per token looping over 40 heads of 128 took ten dependent rounds, ~10 us of an 8B decode
// layer); prefill keeps a block per token, whose loop is already wide enough.
__global__ void rope_kv_write_kernel(float* q, float* k, AttentionArgs a, KvCache c,
                                     const float* inv_freq, int heads_per_block) {
  pdl_wait();
  pdl_trigger();
  const int64_t t = blockIdx.x;
  const int64_t pos = a.positions[t];
  const int64_t seq = a.seq_ids[t];
  const int head_dim = c.head_dim;
  const int half = head_dim / 2;
  const int first = int(blockIdx.y) * heads_per_block;
  const int n = min(heads_per_block, a.n_heads + c.n_kv_heads - first);
  for (int idx = threadIdx.x; idx < n * half; idx += blockDim.x) {
    const int head = first + idx / half;
    const int i = idx % half;
    float sin_v, cos_v;
    sincosf(float(pos) * inv_freq[i], &sin_v, &cos_v);
    const bool is_q = head < a.n_heads;
    const int kvh = head - a.n_heads;
    float* base =
        is_q ? q + (t * a.n_heads + head) * head_dim : k + (t * c.n_kv_heads + kvh) * head_dim;
    const float x0 = base[i];
    const float x1 = base[i + half];
    const float r0 = x0 * cos_v - x1 * sin_v;
    const float r1 = x1 * cos_v + x0 * sin_v;
    base[i] = r0;
    base[i + half] = r1;
    if (!is_q) {
      __half* dst = c.k + cache_offset(c, a.layer, seq, kvh, pos);
      dst[i] = __float2half_rn(r0);
      dst[i + half] = __float2half_rn(r1);
    }
  }
  const int kv_first = max(first, a.n_heads);  // this block's KV heads write their V rows
  for (int idx = threadIdx.x; idx < (first + n - kv_first) * head_dim; idx += blockDim.x) {
    const int kvh = kv_first - a.n_heads + idx / head_dim;
    const int d = idx % head_dim;
    c.v[cache_offset(c, a.layer, seq, kvh, pos) + d] =
        __float2half_rn(a.v[(t * c.n_kv_heads + kvh) * head_dim + d]);
  }
}

// Row stride, in 32-bit words, of the K and V tiles in shared memory: 16-byte aligned rows,
// offset by 4 banks from row to row so that the 8 keys a warp reads at once hit distinct banks.
__host__ __device__ inline int tile_stride_words(int head_dim) {
  return head_dim / 2 + 4;
}

// Dynamic shared memory of the split kernel.
inline size_t split_smem_bytes(int group, int head_dim) {
  return size_t(group) * size_t(head_dim + kDecodeSplit) * sizeof(float) +
         2 * size_t(kDecodeSplit) * size_t(tile_stride_words(head_dim)) * sizeof(uint32_t);
}

// One block per (split of 32 keys, KV head, token): the split's K and V rows are staged in
// shared memory with every load in flight at once, then the group's query heads score the keys,
// take their local softmax (max and sum kept for the merge) and the weighted sum of V. Splits
// past the token's position exit at once, so launch shapes never depend on positions.
template <int kD>  // head_dim, or 0 to read it at run time
__global__ void __launch_bounds__(kDecodeThreads)
    attention_split_kernel(AttentionArgs a, KvCache c, DecodeWorkspace ws, int64_t token_begin) {
  pdl_wait();
  pdl_trigger();
  const int split = blockIdx.x;
  const int kvh = blockIdx.y;
  const int64_t local = blockIdx.z;
  const int64_t t = token_begin + local;
  const int64_t n_ctx = int64_t(a.positions[t]) + 1;
  const int64_t key_begin = int64_t(split) * kDecodeSplit;
  if (key_begin >= n_ctx) return;
  const int n_keys = int(n_ctx - key_begin < kDecodeSplit ? n_ctx - key_begin : kDecodeSplit);
  const int D = kD > 0 ? kD : c.head_dim;
  const int G = a.n_heads / c.n_kv_heads;
  const int stride = tile_stride_words(D);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  extern __shared__ float smem[];
  float* q_s = smem;                                                    // [G, D] scaled queries
  float* p_s = q_s + G * D;                                             // [G, 32] scores, then p
  uint32_t* k_s = reinterpret_cast<uint32_t*>(p_s + G * kDecodeSplit);  // [32, stride] half2
  uint32_t* v_s = k_s + kDecodeSplit * stride;                          // [32, stride] half2

  // A split of 32 keys spans two blocks of the cache; each row is found through the table.
  const int64_t seq = a.seq_ids[t];
  if (D % 8 == 0) {
    const int chunks = D / 8;  // 16-byte pieces per row
    for (int i = tid; i < n_keys * chunks; i += kDecodeThreads) {
      const int j = i / chunks;
      const int ch = i % chunks;
      const int64_t off = cache_offset(c, a.layer, seq, kvh, key_begin + j) + ch * 8;
      *reinterpret_cast<uint4*>(k_s + j * stride + ch * 4) =
          *reinterpret_cast<const uint4*>(c.k + off);
      *reinterpret_cast<uint4*>(v_s + j * stride + ch * 4) =
          *reinterpret_cast<const uint4*>(c.v + off);
    }
  } else {
    for (int i = tid; i < n_keys * (D / 2); i += kDecodeThreads) {
      const int j = i / (D / 2);
      const int pr = i % (D / 2);
      const int64_t off = cache_offset(c, a.layer, seq, kvh, key_begin + j);
      k_s[j * stride + pr] = reinterpret_cast<const uint32_t*>(c.k + off)[pr];
      v_s[j * stride + pr] = reinterpret_cast<const uint32_t*>(c.v + off)[pr];
    }
  }
  const float scale = 1.0f / sqrtf(float(D));
  const float* q = a.q + t * int64_t(a.n_heads) * D + int64_t(kvh) * G * D;
  for (int i = tid; i < G * D; i += kDecodeThreads) q_s[i] = q[i] * scale;
  __syncthreads();

  {
    // Four lanes per key, each taking every fourth pair of dimensions.
    const int j = tid >> 2;
    const int part = tid & 3;
    const bool valid = j < n_keys;
    const uint32_t* k_row = k_s + j * stride;
    for (int g = 0; g < G; ++g) {
      float dot = 0.0f;
      if (valid) {
#pragma unroll 8
        for (int pr = part; pr < D / 2; pr += 4) {
          const float2 kf = __half22float2(*reinterpret_cast<const __half2*>(&k_row[pr]));
          dot += q_s[g * D + 2 * pr] * kf.x + q_s[g * D + 2 * pr + 1] * kf.y;
        }
      }
      dot += __shfl_xor_sync(0xffffffffu, dot, 1);
      dot += __shfl_xor_sync(0xffffffffu, dot, 2);
      if (valid && part == 0) p_s[g * kDecodeSplit + j] = dot;
    }
  }
  __syncthreads();

  for (int g = warp; g < G; g += kDecodeThreads / 32) {
    const float s = lane < n_keys ? p_s[g * kDecodeSplit + lane] : -INFINITY;
    const float m = warp_max(s);
    const float p = lane < n_keys ? expf(s - m) : 0.0f;
    const float l = warp_sum(p);
    p_s[g * kDecodeSplit + lane] = p;
    if (lane == 0) {
      float* ml = ws.ml + ((local * a.n_heads + kvh * G + g) * ws.max_splits + split) * 2;
      ml[0] = m;
      ml[1] = l;
    }
  }
  __syncthreads();

  for (int idx = tid; idx < G * (D / 2); idx += kDecodeThreads) {
    const int g = idx / (D / 2);
    const int pr = idx % (D / 2);
    float2 acc = make_float2(0.0f, 0.0f);
#pragma unroll 8
    for (int j = 0; j < n_keys; ++j) {
      const float p = p_s[g * kDecodeSplit + j];
      const float2 vf = __half22float2(*reinterpret_cast<const __half2*>(&v_s[j * stride + pr]));
      acc.x += p * vf.x;
      acc.y += p * vf.y;
    }
    float* o = ws.o + ((local * a.n_heads + kvh * G + g) * ws.max_splits + split) * D;
    o[2 * pr] = acc.x;
    o[2 * pr + 1] = acc.y;
  }
}

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

// Merges a token-head's splits: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s. The
// splits' weights are computed once into shared memory, in parallel.
__global__ void __launch_bounds__(kCombineThreads)
    attention_combine_kernel(AttentionArgs a, int head_dim, DecodeWorkspace ws,
                             int64_t token_begin) {
  pdl_wait();
  pdl_trigger();
  extern __shared__ float weights[];  // [max_splits]
  __shared__ float scratch[32];
  const int h = blockIdx.x;
  const int64_t local = blockIdx.y;
  const int64_t t = token_begin + local;
  const int n_splits = int((int64_t(a.positions[t]) + kDecodeSplit) / kDecodeSplit);
  const float* ml = ws.ml + (local * a.n_heads + h) * ws.max_splits * 2;
  float m_max = -INFINITY;
  for (int s = threadIdx.x; s < n_splits; s += kCombineThreads) m_max = fmaxf(m_max, ml[2 * s]);
  m_max = block_max(m_max, scratch);
  float denom = 0.0f;
  for (int s = threadIdx.x; s < n_splits; s += kCombineThreads) {
    const float e = expf(ml[2 * s] - m_max);
    weights[s] = e;
    denom += e * ml[2 * s + 1];
  }
  denom = block_sum(denom, scratch);  // its barriers also publish `weights`
  const float inv_denom = 1.0f / denom;
  const float* o = ws.o + (local * a.n_heads + h) * ws.max_splits * int64_t(head_dim);
  const int64_t q_dim = int64_t(a.n_heads) * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += kCombineThreads) {
    float acc = 0.0f;
#pragma unroll 8
    for (int s = 0; s < n_splits; ++s) acc += weights[s] * o[s * head_dim + d];
    const float value = acc * inv_denom;
    const int64_t col = int64_t(h) * head_dim + d;
    a.out[t * q_dim + col] = value;
    if (a.shadow.data != nullptr) {
      a.shadow.data[shadow_index(t, col, a.shadow.row_stride, a.shadow.permuted)] =
          __float2half_rn(value);
    }
  }
  if (a.shadow.data != nullptr && h == a.n_heads - 1) {
    for (int64_t col = q_dim + threadIdx.x; col < a.shadow.row_stride; col += kCombineThreads) {
      a.shadow.data[shadow_index(t, col, a.shadow.row_stride, a.shadow.permuted)] =
          __float2half_rn(0.0f);
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

// Dynamic shared memory of the prefill kernel: two stages of a K and a V tile.
template <int D>
constexpr size_t prefill_smem_bytes() {
  return size_t(2) * 2 * kPrefillKeys * (D + 8) * sizeof(__half);
}

// Flash attention (online softmax) for 64 queries of one head per block; each warp owns 16
// query rows, the block walks 64-key tiles of the cache up to its last query's position. The
// next tile's K and V are copied (cp.async) while the current one is multiplied. Blocks are
// (head, query tile) with the last query tiles, which see the most keys, scheduled first, so
// the short causal tiles fill the tail of the grid instead of the long ones.
template <int D>
__global__ void __launch_bounds__(kPrefillThreads)
    attention_prefill_kernel(AttentionArgs a, KvCache c) {
  pdl_wait();
  pdl_trigger();
  constexpr int kStride = D + 8;  // padded rows: fragment reads hit distinct banks
  constexpr int kTile = kPrefillKeys * kStride;
  extern __shared__ __align__(16) __half prefill_smem[];  // [stage][K, V][kTile]
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
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

  // Copies the K and V rows of keys key0 .. key0 + 63 into `stage`. Keys past the block's last
  // query are zero-filled (src-size 0): unwritten cache memory could hold NaN patterns, and
  // 0 * NaN would poison the P·V product.
  auto issue = [&](int stage, int64_t key0) {
    __half* k_s = prefill_smem + stage * 2 * kTile;
    __half* v_s = k_s + kTile;
    for (int idx = tid; idx < kPrefillKeys * (D / 8); idx += kPrefillThreads) {
      const int r = idx / (D / 8);
      const int ch = idx % (D / 8);
      const int64_t key = key0 + r;
      const bool live = key < kv_len;
      const int64_t at = cache_offset(c, a.layer, seq, kvh, live ? key : 0) + ch * 8;
      const uint32_t bytes = live ? 16u : 0u;
      const uint32_t ks = uint32_t(__cvta_generic_to_shared(&k_s[r * kStride + ch * 8]));
      const uint32_t vs = uint32_t(__cvta_generic_to_shared(&v_s[r * kStride + ch * 8]));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(ks), "l"(c.k + at),
                   "r"(bytes));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(vs), "l"(c.v + at),
                   "r"(bytes));
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };

  const int64_t n_tiles = (kv_len + kPrefillKeys - 1) / kPrefillKeys;
  issue(0, 0);
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t key0 = t * kPrefillKeys;
    if (t + 1 < n_tiles) {
      issue(int((t + 1) & 1), key0 + kPrefillKeys);
      asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads();
    const __half* k_s = prefill_smem + (t & 1) * 2 * kTile;
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
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    // Key 0 is visible to every query, so after the first tile both maxima are finite.
    const float new_m0 = fmaxf(m0, mx0);
    const float new_m1 = fmaxf(m1, mx1);
    const float alpha0 = fast_exp2(m0 - new_m0);
    const float alpha1 = fast_exp2(m1 - new_m1);
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
      s[nt][0] = fast_exp2(s[nt][0] - m0);
      s[nt][1] = fast_exp2(s[nt][1] - m0);
      s[nt][2] = fast_exp2(s[nt][2] - m1);
      s[nt][3] = fast_exp2(s[nt][3] - m1);
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
    __syncthreads();  // the stage is read; the next iteration's copy may overwrite it
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

}  // namespace

Status kv_cache_write(const AttentionArgs& args, const KvCache& cache, cudaStream_t stream) {
  KS_CUDA_CHECK("attention", launch_pdl(kv_write_kernel, dim3(unsigned(args.n_tokens)), dim3(256),
                                        0, stream, args, cache));
  KS_CUDA_CHECK_LAUNCH("attention", "kv_write_kernel");
  return Status::ok();
}

Status rope_kv_cache_write(float* q, float* k, const AttentionArgs& args, const KvCache& cache,
                           const float* inv_freq, cudaStream_t stream) {
  const int heads = args.n_heads + cache.n_kv_heads;
  const bool decode = args.n_tokens <= kMaxGemvTokens;
  const int heads_per_block = decode ? 1 : heads;
  const int threads = decode ? std::min(256, (cache.head_dim / 2 + 31) / 32 * 32) : 256;
  KS_CUDA_CHECK(
      "attention",
      launch_pdl(rope_kv_write_kernel,
                 dim3(unsigned(args.n_tokens), unsigned(heads / heads_per_block)),
                 dim3(unsigned(threads)), 0, stream, q, k, args, cache, inv_freq, heads_per_block));
  KS_CUDA_CHECK_LAUNCH("attention", "rope_kv_write_kernel");
  return Status::ok();
}

Status attention_decode(const AttentionArgs& args, const KvCache& cache, const DecodeWorkspace& ws,
                        cudaStream_t stream) {
  const int group = args.n_heads / cache.n_kv_heads;
  const size_t smem = split_smem_bytes(group, cache.head_dim);
  auto kernel = cache.head_dim == 64    ? attention_split_kernel<64>
                : cache.head_dim == 128 ? attention_split_kernel<128>
                                        : attention_split_kernel<0>;
  if (smem > 48 * 1024) {
    KS_CUDA_CHECK("attention", cudaFuncSetAttribute(
                                   kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  const size_t combine_smem = size_t(ws.max_splits) * sizeof(float);
  if (combine_smem > 48 * 1024) {
    KS_CUDA_CHECK("attention", cudaFuncSetAttribute(attention_combine_kernel,
                                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    int(combine_smem)));
  }
  for (int64_t begin = 0; begin < args.n_tokens; begin += kMaxGemvTokens) {
    const int64_t count = std::min<int64_t>(kMaxGemvTokens, args.n_tokens - begin);
    const dim3 grid(unsigned(ws.max_splits), unsigned(cache.n_kv_heads), unsigned(count));
    KS_CUDA_CHECK("attention", launch_pdl(kernel, grid, dim3(kDecodeThreads), smem, stream, args,
                                          cache, ws, begin));
    KS_CUDA_CHECK_LAUNCH("attention", "attention_split_kernel");
    KS_CUDA_CHECK(
        "attention",
        launch_pdl(attention_combine_kernel, dim3(unsigned(args.n_heads), unsigned(count)),
                   dim3(kCombineThreads), combine_smem, stream, args, cache.head_dim, ws, begin));
    KS_CUDA_CHECK_LAUNCH("attention", "attention_combine_kernel");
  }
  return Status::ok();
}

bool prefill_supports(int head_dim) {
  return head_dim == 64 || head_dim == 128;
}

template <int D>
Status launch_prefill(const AttentionArgs& args, const KvCache& cache, cudaStream_t stream) {
  constexpr size_t kSmem = prefill_smem_bytes<D>();
  static bool attribute_set = false;  // once per instantiation
  if (!attribute_set) {
    KS_CUDA_CHECK("attention",
                  cudaFuncSetAttribute(attention_prefill_kernel<D>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem)));
    attribute_set = true;
  }
  const dim3 grid(unsigned(args.n_heads), unsigned(ceil_div(args.n_tokens, kPrefillRows)));
  KS_CUDA_CHECK("attention", launch_pdl(attention_prefill_kernel<D>, grid, dim3(kPrefillThreads),
                                        kSmem, stream, args, cache));
  KS_CUDA_CHECK_LAUNCH("attention", "attention_prefill_kernel");
  return Status::ok();
}

Status attention_prefill(const AttentionArgs& args, const KvCache& cache, cudaStream_t stream) {
  if (ceil_div(args.n_tokens, kPrefillRows) > 65535) {
    return Status::error("cuda attention: a prefill run of " + std::to_string(args.n_tokens) +
                         " tokens exceeds the kernel's grid");
  }
  if (cache.head_dim == 64) return launch_prefill<64>(args, cache, stream);
  if (cache.head_dim == 128) return launch_prefill<128>(args, cache, stream);
  return Status::error("cuda attention: prefill kernel has no head_dim " +
                       std::to_string(cache.head_dim));
}

}  // namespace kestrel::cuda
