// The batch-1 decoder layer kernel (layer.cuh). One block per SM, 16 warps, five phases a layer:
//
//   0. q/k/v     input rms_norm(x) · attn_norm; outputs q, k, v (+ bias)
//   A. attention rope of q and of the new k, the new K/V rows into the cache, split attention
//                over the context with the last split of each KV head merging the rest
//   1. wo        input attn; x += attn · woᵀ (+ bias)
//   2. gate/up   input rms_norm(x) · ffn_norm; act = silu(gate) * up
//   3. down      input act; x += act · w_downᵀ (+ bias)
//
// with a grid-wide barrier after each of 0, A, 1 and 2, and after 3 when another layer follows.
// Every block stages a phase's input itself (all of it: each of its row tiles needs every column),
// as the GEMV's NormInput prologue does: fp32 -> (norm) -> fp16 -> int8 in groups of 32 with the
// CPU backend's rounding, the arithmetic of gemv.cu's dp4a path, so the kernel's results are the
// plain ops' within their bounds.
//
// Weights: each GEMV phase splits its 16-row tiles (int4_tiles.h) evenly over the blocks (the
// gate and up tiles of the same rows go to the same block, for the SwiGLU epilogue); a block's
// tiles x 128-column chunks, in order, are dealt to its warps round-robin. Each warp owns a ring of
// kStages cp.async stages and walks ONE sequence of units, the four phases' in order: its ring
// is refilled as it consumes, so while the block waits at a barrier or runs attention, the next
// phase's first units are landing. A lane copies and reads only its own bytes, so a stage needs
// no barrier, as in gemv.cu. Partial sums meet per (tile, warp) in shared memory and are summed
// in a fixed order: the result does not depend on timing.
//
// The barrier is a counter and a generation word in global memory (every block resident: one
// block per SM, and the launch checks the occupancy). A block that waits longer than a few
// seconds traps instead of hanging: the launch then fails with CUDA's error.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>

#include "backend/cuda/cuda_check.cuh"
#include "backend/cuda/layer.cuh"

namespace kestrel::cuda {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = 8;            // ring depth per warp: 8 KB of weights in flight a warp
constexpr int kStageBytes = 1280;     // two 512-byte halves of a tile chunk, scales, mins
constexpr int kMaxLocalTiles = 16;    // row tiles of one phase per block
constexpr int kMaxInputCols = 16384;  // widest staged input (int8 + group scales in shared memory)
constexpr int kNormVec = 4;           // float4 a thread holds of a normalized input
constexpr int kMaxNormCols = 4 * kNormVec * kThreads;
constexpr int kMaxSplits = 32;     // attention splits per KV head
constexpr int kMinSplitKeys = 64;  // fewer keys than this per split are not worth a split
constexpr int kAttnKeys = 32;      // keys per staged K/V chunk (two chunks in flight)
constexpr int kMaxGroup = 8;       // query heads per KV head
constexpr float kLog2e = 1.4426950408889634f;

// The merge keeps one weight per split in a row of the scores buffer, and a split of at least
// kMinSplitKeys keys can never be empty when there are at most kMaxSplits of them.
static_assert(kMaxSplits <= kAttnKeys && kMaxSplits <= kMinSplitKeys);

__host__ __device__ constexpr int ring_bytes(int stages) {
  return kWarps * stages * kStageBytes;
}
constexpr int kRedBytes = kMaxLocalTiles * kWarps * 16 * int(sizeof(float));

__host__ __device__ constexpr int input_bytes(int cols) {
  return cols + cols / kGroup * int(sizeof(int2));
}
__host__ __device__ constexpr int attention_bytes(int head_dim) {
  return (kMaxGroup * head_dim + kMaxGroup * kAttnKeys + 3 * kMaxGroup) * int(sizeof(float)) +
         2 * 2 * kAttnKeys * head_dim * int(sizeof(__half));
}

// One GEMV phase as one block sees it: its tiles [first, first + n_tiles) of the phase's tile
// sequence, `chunks` 128-column chunks each.
struct PhasePlan {
  int first = 0;
  int n_tiles = 0;
  int chunks = 0;
};

// Where a warp's ring is refilled from: (tile lt of phase, 128-column chunk) and this lane's
// source bytes there. Warp-uniform but for the pointers. Phase 4 of the last layer is the end of
// the sequence: past a layer's phase 3 comes the next layer's phase 0.
struct Cursor {
  int li;  // layer of the launch
  int phase;
  int lt;
  int chunk;
  const uint8_t* data;   // the lane's piece in the top half of the tile chunk
  const __half* scales;  // the lane's scale word (as fp16 halves: index of the low half)
  const __half* mins;    // asym_int4
  int64_t scale_step;    // halves between chunk c and chunk c + kWarps of a tile
};

// Four unsigned bytes of a times four signed bytes of b, plus c.
__device__ inline int dp4a_us(uint32_t a, uint32_t b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// The block's share of `tiles` row tiles (balanced: floor or ceil of tiles / blocks).
__device__ inline PhasePlan plan_for(int64_t tiles, int64_t chunks, int pair) {
  const int64_t b = blockIdx.x, g = gridDim.x;
  const int64_t first = b * tiles / g;
  const int64_t last = (b + 1) * tiles / g;
  PhasePlan p;
  p.first = int(first * pair);
  p.n_tiles = int((last - first) * pair);
  p.chunks = int(chunks);
  return p;
}

template <int HD, bool kAsym>
struct Layer {
  const DecodeLayerArgs& a;
  const PhasePlan* plan;  // [4], shared
  uint8_t* ring;          // this warp's stages
  uint32_t* xq;           // staged input: int8 values, natural order
  int2* xqp;              // {scale bits, sum of values} per group of 32
  float* red;             // [kMaxLocalTiles][kWarps][16] partial sums
  int lane, warp, quad_row, quad_col;

  // Points `c` at its (phase, lt, chunk), moving on past tiles and phases. A phase's units are
  // its local tiles' chunks in order, (lt, chunk) = index / chunks, index % chunks, and warp w
  // takes indices w, w + kWarps, ...: every warp works even where a tile has fewer than
  // kWarps chunks (a 1536-column weight has 12).
  __device__ void settle(Cursor& c) const {
    while (c.phase < 4) {
      const PhasePlan& p = plan[c.phase];
      if (c.lt >= p.n_tiles) {
        if (++c.phase == 4 && c.li + 1 < a.n_layers) {
          ++c.li;
          c.phase = 0;
        }
        c.lt = 0;
        c.chunk = warp;
      } else if (c.chunk >= p.chunks) {
        c.chunk -= p.chunks;
        ++c.lt;
      } else {
        int64_t tile;
        const int which = tile_of(c.phase, c.lt, tile);
        const DeviceWeight& w = shape(which);
        const LayerPointers& lp = a.layers[c.li];
        const int64_t at = tile * w.tiles.n_chunks + c.chunk;
        c.data = lp.data[which] + at * kTileChunkBytes + lane * 16;
        const int64_t half = 2 * (at * w.tiles.chunk_scale_words() +
                                  (quad_col >> w.tiles.scale_shift) * 8 + quad_row);
        c.scales = lp.scales[which] + half;
        if constexpr (kAsym) c.mins = lp.mins[which] + half;
        c.scale_step = 2 * int64_t(kWarps) * w.tiles.chunk_scale_words();
        return;
      }
    }
  }

  __device__ void advance(Cursor& c) const {
    if (c.phase >= 4) return;  // past the last unit: the ring's remaining groups are empty
    c.chunk += kWarps;
    if (c.chunk < plan[c.phase].chunks) {
      c.data += kWarps * kTileChunkBytes;
      c.scales += c.scale_step;
      if constexpr (kAsym) c.mins += c.scale_step;
    } else {
      settle(c);
    }
  }

  // The shape of weight `which` (LayerWeightIndex), every layer's.
  __device__ const DeviceWeight& shape(int which) const {
    switch (which) {
      case kWq:
        return a.wq;
      case kWk:
        return a.wk;
      case kWv:
        return a.wv;
      case kWo:
        return a.wo;
      case kWGate:
        return a.w_gate;
      case kWUp:
        return a.w_up;
      default:
        return a.w_down;
    }
  }

  // Which weight (LayerWeightIndex) local tile `lt` of `phase` is in, and its tile there.
  __device__ int tile_of(int phase, int lt, int64_t& tile) const {
    const int vt = plan[phase].first + lt;
    switch (phase) {
      case 0: {
        const int64_t tq = a.wq.tiles.n_tiles, tk = a.wk.tiles.n_tiles;
        if (vt < tq) {
          tile = vt;
          return kWq;
        }
        if (vt < tq + tk) {
          tile = vt - tq;
          return kWk;
        }
        tile = vt - tq - tk;
        return kWv;
      }
      case 1:
        tile = vt;
        return kWo;
      case 2:
        tile = vt >> 1;
        return (vt & 1) ? kWUp : kWGate;
      default:
        tile = vt;
        return kWDown;
    }
  }

  // Copies the unit at `c` into `stage` (an empty group past the last unit).
  __device__ void issue(int stage, const Cursor& c) const {
    if (c.phase < 4) {
      uint8_t* s = ring + stage * kStageBytes;
      cp_async_16(s + lane * 16, c.data);
      cp_async_16(s + 512 + lane * 16, c.data + 512);
      cp_async_4(s + 1024 + lane * 4, c.scales);
      if constexpr (kAsym) cp_async_4(s + 1152 + lane * 4, c.mins);
    }
    cp_async_commit();  // one group per unit, empty or not: the wait counts stay uniform
  }

  // Adds the unit in `stage`, of column group `group`, to the lane's sums of its two rows.
  __device__ void consume(int stage, int group, float& acc0, float& acc1) const {
    const uint8_t* s = ring + stage * kStageBytes;
    const uint4 top = reinterpret_cast<const uint4*>(s)[lane];
    const uint4 bottom = reinterpret_cast<const uint4*>(s + 512)[lane];
    const uint32_t scales = reinterpret_cast<const uint32_t*>(s + 1024)[lane];
    const uint4 xa = reinterpret_cast<const uint4*>(xq)[2 * group];
    const uint4 xb = reinterpret_cast<const uint4*>(xq)[2 * group + 1];
    const int2 qp = xqp[group];
    const uint32_t xw[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
    const uint32_t w0[4] = {top.x, top.y, top.z, top.w};
    const uint32_t w1[4] = {bottom.x, bottom.y, bottom.z, bottom.w};
    // Word u: low nibbles are weights 4u .. 4u + 3, high nibbles 16 + 4u .. 19 + 4u. The high
    // nibbles are multiplied in place (16 times their value, unsigned bytes against the signed
    // input) and divided out exactly once; four independent chains keep the dp4a latencies
    // overlapped.
    int lo0 = 0, hi0 = 0, lo1 = 0, hi1 = 0;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      lo0 = dp4a_us(w0[u] & 0x0f0f0f0fu, xw[u], lo0);
      hi0 = dp4a_us(w0[u] & 0xf0f0f0f0u, xw[4 + u], hi0);
      lo1 = dp4a_us(w1[u] & 0x0f0f0f0fu, xw[u], lo1);
      hi1 = dp4a_us(w1[u] & 0xf0f0f0f0u, xw[4 + u], hi1);
    }
    const int s0 = lo0 + (hi0 >> 4);
    const int s1 = lo1 + (hi1 >> 4);
    const float sx = __int_as_float(qp.x);
    const float d0 = __half2float(__ushort_as_half(uint16_t(scales)));
    const float d1 = __half2float(__ushort_as_half(uint16_t(scales >> 16)));
    if constexpr (kAsym) {
      const uint32_t mins = reinterpret_cast<const uint32_t*>(s + 1152)[lane];
      const float m0 = __half2float(__ushort_as_half(uint16_t(mins)));
      const float m1 = __half2float(__ushort_as_half(uint16_t(mins >> 16)));
      acc0 += sx * (d0 * float(s0) + m0 * float(qp.y));
      acc1 += sx * (d1 * float(s1) + m1 * float(qp.y));
    } else {
      acc0 += float(s0 - 8 * qp.y) * (d0 * sx);
      acc1 += float(s1 - 8 * qp.y) * (d1 * sx);
    }
  }

  // The warp's sums of local tile `lt`, over the quad's four groups, into red[lt][warp].
  __device__ void flush(int lt, float& acc0, float& acc1) const {
    acc0 += __shfl_xor_sync(0xffffffffu, acc0, 1);
    acc0 += __shfl_xor_sync(0xffffffffu, acc0, 2);
    acc1 += __shfl_xor_sync(0xffffffffu, acc1, 1);
    acc1 += __shfl_xor_sync(0xffffffffu, acc1, 2);
    if (quad_col == 0) {
      red[(lt * kWarps + warp) * 16 + quad_row] = acc0;
      red[(lt * kWarps + warp) * 16 + quad_row + 8] = acc1;
    }
    acc0 = acc1 = 0.0f;
  }

  // Consumes the warp's units of `phase` in the order settle() walks them, refilling the ring
  // from `next` as it goes. Every chunk is whole (columns a multiple of 128): no unit needs a
  // bounds check. Two units a step, each into its own partial sums, so that their loads and
  // dp4a chains interleave; the partials join the running sums of their tile in unit order.
  __device__ void run_phase(int phase, Cursor& next, int& stage) const {
    const PhasePlan& p = plan[phase];
    auto step = [&] {
      issue(stage, next);
      advance(next);
      stage = stage + 1 == kStages ? 0 : stage + 1;
    };
    // (lt, chunk) of the warp's unit after (lt, chunk + kWarps - 1)'s.
    auto following = [&](int& lt, int& chunk) {
      chunk += kWarps;
      while (chunk >= p.chunks) {
        chunk -= p.chunks;
        ++lt;
      }
    };
    int lt = 0, chunk = warp - kWarps;
    following(lt, chunk);
    if (lt >= p.n_tiles) return;  // no unit of this phase
    int cur = lt;
    float acc0 = 0.0f, acc1 = 0.0f;
    // Adds a unit's partial sums of tile `t` to the running sums, flushing the tile before.
    auto join = [&](int t, float p0, float p1) {
      if (t != cur) {
        flush(cur, acc0, acc1);
        cur = t;
      }
      acc0 += p0;
      acc1 += p1;
    };
    while (lt < p.n_tiles) {
      int lt1 = lt, chunk1 = chunk;
      following(lt1, chunk1);
      const bool two = lt1 < p.n_tiles;
      float a0 = 0.0f, a1 = 0.0f, b0 = 0.0f, b1 = 0.0f;
      if (two) {
        cp_async_wait<kStages - 2>();
        const int stage1 = stage + 1 == kStages ? 0 : stage + 1;
        consume(stage, chunk * kTileGroups + quad_col, a0, a1);
        consume(stage1, chunk1 * kTileGroups + quad_col, b0, b1);
      } else {
        cp_async_wait<kStages - 1>();
        consume(stage, chunk * kTileGroups + quad_col, a0, a1);
      }
      join(lt, a0, a1);
      step();
      if (two) {
        join(lt1, b0, b1);
        step();
        following(lt1, chunk1);
      }
      lt = lt1;
      chunk = chunk1;
    }
    flush(cur, acc0, acc1);
  }

  // The block's sum for row r of local tile lt (fixed order over warps); zeroes the partials
  // for the next phase.
  __device__ float take(int lt, int r) const {
    float sum = 0.0f;
#pragma unroll
    for (int wp = 0; wp < kWarps; ++wp) {
      float& v = red[(lt * kWarps + wp) * 16 + r];
      sum += v;
      v = 0.0f;
    }
    return sum;
  }

  // Word j of the staged input from values 4j .. 4j + 3 (`valid`: j is a word of the input):
  // rounded to fp16, then int8 in groups of 32 (8 lanes a group) with the CPU backend's
  // rounding: the GEMV's quantize_input arithmetic.
  __device__ void quantize_word(float4 v, int j, bool valid) const {
    const float f[4] = {__half2float(__float2half_rn(v.x)), __half2float(__float2half_rn(v.y)),
                        __half2float(__float2half_rn(v.z)), __half2float(__float2half_rn(v.w))};
    float amax = fmaxf(fmaxf(fabsf(f[0]), fabsf(f[1])), fmaxf(fabsf(f[2]), fabsf(f[3])));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    uint32_t word = 0;
    int sum = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int q = __float2int_rn(f[i] * inv);
      sum += q;
      word |= (uint32_t(q) & 0xffu) << (8 * i);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    sum += __shfl_xor_sync(0xffffffffu, sum, 4);
    if (valid) {
      xq[j] = word;
      if ((lane & 7) == 0) xqp[j / 8] = make_int2(__float_as_int(amax / 127.0f), sum);
    }
  }

  // x[row] += the block's sum + bias for the rows of `phase`'s tiles, of layer li: the
  // epilogue of wo and of down. Each row belongs to one block, which reads x through L2 (other
  // blocks wrote it).
  __device__ void add_to_residual(int phase, int li) const {
    for (int e = int(threadIdx.x); e < plan[phase].n_tiles * 16; e += kThreads) {
      const int lt = e >> 4, r = e & 15;
      const float sum = take(lt, r);
      int64_t tile;
      const int which = tile_of(phase, lt, tile);
      const float* bias = a.layers[li].bias[which];
      const int64_t row = tile * 16 + r;
      if (row < shape(which).rows) {
        a.x[row] = __ldcg(a.x + row) + (sum + (bias != nullptr ? bias[row] : 0.0f));
      }
    }
  }

  // v[r] = src's float4 r * kThreads + threadIdx.x of `n4` (zeros past the end), every load
  // issued before the first is used: one L2 round trip (src was written by other blocks of this
  // launch).
  template <int kVec>
  __device__ void load_input(const float* src, int n4, float4 (&v)[kVec]) const {
    const float4* src4 = reinterpret_cast<const float4*>(src);
#pragma unroll
    for (int r = 0; r < kVec; ++r) {
      const int j = r * kThreads + int(threadIdx.x);
      v[r] = j < n4 ? __ldcg(src4 + j) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }

  // xq/xqp from the values load_input left in v, each valid float4 j first passed through
  // `f(value, j)`.
  template <int kVec, typename F>
  __device__ void quantize_input(const float4 (&v)[kVec], int n4, F f) const {
#pragma unroll
    for (int r = 0; r < kVec; ++r) {
      if (r * kThreads < n4) {  // block-uniform: whole passes only
        const int j = r * kThreads + int(threadIdx.x);
        const bool valid = j < n4;
        quantize_word(valid ? f(v[r], j) : v[r], j, valid);
      }
    }
  }

  // xq/xqp = the staged input of `src`, of `cols` columns.
  __device__ void stage_input(const float* src, int cols) const {
    constexpr int kVec = kMaxInputCols / 4 / kThreads;  // float4 a thread holds
    const int n4 = cols / 4;
    float4 v[kVec];
    load_input(src, n4, v);
    quantize_input(v, n4, [](float4 x, int) { return x; });
  }

  // The same of rms_norm(src) · norm_w (normalize_input's arithmetic), `cols` <= kMaxNormCols:
  // each thread keeps its values in registers from the sum of squares to the quantization.
  __device__ void stage_norm_input(const float* src, const float* norm_w, int cols,
                                   float* scratch) const {
    const int n4 = cols / 4;
    float4 v[kNormVec];
    load_input(src, n4, v);
    float sum = 0.0f;
#pragma unroll
    for (int r = 0; r < kNormVec; ++r) {
      sum += v[r].x * v[r].x + v[r].y * v[r].y + v[r].z * v[r].z + v[r].w * v[r].w;
    }
    sum = block_sum(sum, scratch);
    const float scale = 1.0f / sqrtf(sum / float(cols) + a.eps);
    quantize_input(v, n4, [&](float4 x, int j) {
      const float4 g = __ldg(reinterpret_cast<const float4*>(norm_w) + j);
      return make_float4(g.x * (x.x * scale), g.y * (x.y * scale), g.z * (x.z * scale),
                         g.w * (x.w * scale));
    });
  }

  // Phase A of cache layer `layer` for the block's (KV head, split) items. `smem` is the staged
  // input's space. With `prefetch`, only requests the K/V rows of the block's first item's first
  // two chunks (the cache's old rows depend on nothing this launch computes: issued before the
  // barrier, their round trip overlaps it); the call after the barrier does the rest.
  __device__ void attention(float* smem, int max_splits, int64_t layer, bool prefetch) const {
    const KvCache& c = a.cache;
    const int n_kv = c.n_kv_heads;
    const int group = a.n_heads / n_kv;
    const int pos = a.positions[0];
    const int seq = a.seq_ids[0];
    const int context = pos + 1;
    const int splits = max(1, min(max_splits, (context + kMinSplitKeys - 1) / kMinSplitKeys));
    const int per_split = (context + splits - 1) / splits;
    constexpr int kHalf = HD / 2;
    constexpr int kPieces = HD / 8;                 // 16-byte pieces of a cache row
    float* qs = smem;                               // [kMaxGroup][HD], rotated and pre-scaled
    float* scores = qs + kMaxGroup * HD;            // [kMaxGroup][kAttnKeys]
    float* m_run = scores + kMaxGroup * kAttnKeys;  // [kMaxGroup] running max (log2 domain)
    float* l_run = m_run + kMaxGroup;               // [kMaxGroup] running sum of exp
    float* alpha = l_run + kMaxGroup;               // [kMaxGroup] this chunk's rescale
    // [2 buffers][K, V][kAttnKeys][HD] fp16
    __half* kv_buf = reinterpret_cast<__half*>(alpha + kMaxGroup);
    __shared__ int last_split;
    const float q_scale = kLog2e / sqrtf(float(HD));
    const int tid = int(threadIdx.x);
    __half* k_cache = static_cast<__half*>(c.k);
    __half* v_cache = static_cast<__half*>(c.v);
    auto row_of = [&](int h, int p) { return cache_offset(c, layer, seq, h, p); };

    for (int item = int(blockIdx.x); item < n_kv * max_splits; item += int(gridDim.x)) {
      const int h = item / max_splits;
      const int s = item - h * max_splits;
      if (s >= splits) continue;
      const int first = s * per_split;
      const int end = min(context, first + per_split);
      const int n_chunks = end > first ? (end - first + kAttnKeys - 1) / kAttnKeys : 0;
      // K and V of keys [first + 32 ci, + 32) into buffer ci % 2: every piece of the chunk is
      // requested at once, so a chunk costs one round trip.
      auto load_chunk = [&](int ci) {
        if (ci < n_chunks) {
          const int key0 = first + ci * kAttnKeys;
          const int n = min(kAttnKeys, end - key0);
          __half* buf = kv_buf + (ci & 1) * 2 * kAttnKeys * HD;
          for (int p = tid; p < 2 * kAttnKeys * kPieces; p += kThreads) {
            const int kv = p / (kAttnKeys * kPieces);
            const int rem = p - kv * kAttnKeys * kPieces;
            const int key = rem / kPieces;
            const int part = rem - key * kPieces;
            if (key < n) {
              const __half* src = (kv == 0 ? k_cache : v_cache) + row_of(h, key0 + key) + part * 8;
              cp_async_16(buf + (kv * kAttnKeys + key) * HD + part * 8, src);
            }
          }
        }
        cp_async_commit();
      };
      if (prefetch) {
        load_chunk(0);
        load_chunk(1);
        return;
      }
      if (item != int(blockIdx.x)) {
        load_chunk(0);
        load_chunk(1);
      }
      // The new position's K and V rows (its split only), loaded with the queries: one round trip.
      const bool holds_pos = first <= pos && pos < end;
      float nk0 = 0.0f, nk1 = 0.0f, nv0 = 0.0f, nv1 = 0.0f, nsn = 0.0f, ncs = 1.0f;
      if (holds_pos && tid < kHalf) {
        const float* k = a.k + int64_t(h) * HD;
        const float* v = a.v + int64_t(h) * HD;
        nk0 = __ldcg(k + tid);
        nk1 = __ldcg(k + tid + kHalf);
        nv0 = __ldcg(v + tid);
        nv1 = __ldcg(v + tid + kHalf);
        sincosf(float(pos) * a.inv_freq[tid], &nsn, &ncs);
      }
      // The group's queries, rotated (as rope_kernel: fp32 angle, sincosf) and scaled so that
      // scores are in the log2 domain.
      for (int idx = tid; idx < group * kHalf; idx += kThreads) {
        const int r = idx / kHalf;
        const int i = idx - r * kHalf;
        const float* q = a.q + int64_t(h * group + r) * HD;
        const float x0 = __ldcg(q + i), x1 = __ldcg(q + i + kHalf);
        float sn, cs;
        sincosf(float(pos) * a.inv_freq[i], &sn, &cs);
        qs[r * HD + i] = (x0 * cs - x1 * sn) * q_scale;
        qs[r * HD + i + kHalf] = (x1 * cs + x0 * sn) * q_scale;
      }
      // The split holding the new position stores its rotated K row and its V row in the cache
      // (fp16, as the cache write kernel). Chunks requested later read them from there; a chunk
      // requested before the barrier holds a stale row, patched here once its copies landed.
      if (holds_pos) {
        const int ci = (pos - first) / kAttnKeys;
        const bool patch = ci < 2;
        if (patch) {
          cp_async_wait<0>();
          __syncthreads();
        }
        if (tid < kHalf) {
          const int64_t row = row_of(h, pos);
          const __half k0 = __float2half_rn(nk0 * ncs - nk1 * nsn);
          const __half k1 = __float2half_rn(nk1 * ncs + nk0 * nsn);
          const __half v0 = __float2half_rn(nv0);
          const __half v1 = __float2half_rn(nv1);
          k_cache[row + tid] = k0;
          k_cache[row + tid + kHalf] = k1;
          v_cache[row + tid] = v0;
          v_cache[row + tid + kHalf] = v1;
          if (patch) {
            __half* kb =
                kv_buf + (ci & 1) * 2 * kAttnKeys * HD + (pos - first - ci * kAttnKeys) * HD;
            __half* vb = kb + kAttnKeys * HD;
            kb[tid] = k0;
            kb[tid + kHalf] = k1;
            vb[tid] = v0;
            vb[tid + kHalf] = v1;
          }
        }
      }
      if (tid < kMaxGroup) {
        m_run[tid] = -INFINITY;
        l_run[tid] = 0.0f;
      }
      __syncthreads();  // queries staged; the new rows visible to the block

      // Output pairs (r, dims 2i, 2i + 1): at most two per thread.
      constexpr int kPairs = (kMaxGroup * kHalf + kThreads - 1) / kThreads;
      float2 o[kPairs];
#pragma unroll
      for (int pi = 0; pi < kPairs; ++pi) o[pi] = make_float2(0.0f, 0.0f);

      for (int ci = 0; ci < n_chunks; ++ci) {
        const int key0 = first + ci * kAttnKeys;
        const int n = min(kAttnKeys, end - key0);
        const __half* kb = kv_buf + (ci & 1) * 2 * kAttnKeys * HD;
        const __half* vb = kb + kAttnKeys * HD;
        cp_async_wait<1>();
        __syncthreads();
        // Scores: 8 threads a key, each over HD / 8 dimensions, for every query head (the
        // first 8 * kAttnKeys threads).
        if (tid < 8 * kAttnKeys) {
          constexpr int kDims = HD / 8;
          const int key = tid >> 3;
          const int sub = tid & 7;
          float sc[kMaxGroup];
#pragma unroll
          for (int r = 0; r < kMaxGroup; ++r) sc[r] = 0.0f;
#pragma unroll
          for (int d8 = 0; d8 < kDims / 8; ++d8) {
            const int d = sub * kDims + d8 * 8;
            const uint4 kw = *reinterpret_cast<const uint4*>(kb + key * HD + d);
            const uint32_t words[4] = {kw.x, kw.y, kw.z, kw.w};
            float kf[8];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
              kf[2 * i] = f.x;
              kf[2 * i + 1] = f.y;
            }
#pragma unroll
            for (int r = 0; r < kMaxGroup; ++r) {
              if (r < group) {
                const float4 qa = *reinterpret_cast<const float4*>(qs + r * HD + d);
                const float4 qb = *reinterpret_cast<const float4*>(qs + r * HD + d + 4);
                sc[r] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] +
                         qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
              }
            }
          }
#pragma unroll
          for (int r = 0; r < kMaxGroup; ++r) {
            sc[r] += __shfl_xor_sync(0xffffffffu, sc[r], 1);
            sc[r] += __shfl_xor_sync(0xffffffffu, sc[r], 2);
            sc[r] += __shfl_xor_sync(0xffffffffu, sc[r], 4);
            if (sub == 0 && r < group) scores[r * kAttnKeys + key] = key < n ? sc[r] : -INFINITY;
          }
        }
        __syncthreads();
        // The chunk's softmax: warp r takes query head r, a lane per key.
        if (warp < group) {
          float* row = scores + warp * kAttnKeys;
          const float x = row[lane];
          const float m_old = m_run[warp];
          const float m_new = fmaxf(m_old, warp_max(x));
          const float p = exp2f(x - m_new);
          row[lane] = p;
          const float sum = warp_sum(p);
          __syncwarp();  // every lane has read m_run[warp] before lane 0 replaces it
          if (lane == 0) {
            const float scale = exp2f(m_old - m_new);
            alpha[warp] = scale;
            m_run[warp] = m_new;
            l_run[warp] = l_run[warp] * scale + sum;
          }
        }
        __syncthreads();
        // o = o * alpha + p · V.
#pragma unroll
        for (int pi = 0; pi < kPairs; ++pi) {
          const int idx = tid + pi * kThreads;
          const int r = idx / kHalf;
          if (r < group) {
            const int i = idx - r * kHalf;
            const float scale = alpha[r];
            float2 acc = make_float2(o[pi].x * scale, o[pi].y * scale);
            const float* p = scores + r * kAttnKeys;
            const __half2* vcol = reinterpret_cast<const __half2*>(vb) + i;
#pragma unroll 8
            for (int j = 0; j < n; ++j) {
              const float2 vf = __half22float2(vcol[j * kHalf]);
              acc.x += p[j] * vf.x;
              acc.y += p[j] * vf.y;
            }
            o[pi] = acc;
          }
        }
        __syncthreads();  // buffer ci % 2 and the scores are free again
        load_chunk(ci + 2);
      }
      cp_async_wait<0>();

      // This split's partials, then the last split of the KV head to finish merges them all.
      const int64_t base = int64_t(h) * group * max_splits;
#pragma unroll
      for (int pi = 0; pi < kPairs; ++pi) {
        const int idx = tid + pi * kThreads;
        const int r = idx / kHalf;
        if (r < group) {
          const int i = idx - r * kHalf;
          reinterpret_cast<float2*>(a.split_o + ((base + r * max_splits + s) * HD))[i] = o[pi];
        }
      }
      if (tid < group) {
        a.split_ml[(base + tid * max_splits + s) * 2] = m_run[tid];
        a.split_ml[(base + tid * max_splits + s) * 2 + 1] = l_run[tid];
      }
      __syncthreads();
      if (tid == 0) {
        __threadfence();
        unsigned* counter = a.sync + 2 + h;
        last_split = atomicAdd(counter, 1u) == unsigned(splits - 1);
        if (last_split) atomicExch(counter, 0u);
      }
      __syncthreads();
      if (last_split) {
        __threadfence();
        // Each split's weight exp2(m_t - m) / l for every query head of the group, in the
        // scores buffer (splits <= kMaxSplits <= kAttnKeys), then every thread sums its pairs'
        // partial outputs with their loads in flight together.
        float* weight = scores;  // [group][kAttnKeys]
        if (warp < group) {
          const float* ml = a.split_ml + (base + warp * max_splits) * 2;
          const bool mine = lane < splits;
          const float m_t = mine ? __ldcg(ml + 2 * lane) : -INFINITY;
          const float l_t = mine ? __ldcg(ml + 2 * lane + 1) : 0.0f;
          const float m = warp_max(m_t);
          const float w = mine ? exp2f(m_t - m) : 0.0f;
          const float l = warp_sum(w * l_t);
          weight[warp * kAttnKeys + lane] = w / l;
        }
        __syncthreads();
        for (int idx = tid; idx < group * kHalf; idx += kThreads) {
          const int r = idx / kHalf;
          const int i = idx - r * kHalf;
          const float2* o_t =
              reinterpret_cast<const float2*>(a.split_o + (base + r * max_splits) * HD) + i;
          float2 acc = make_float2(0.0f, 0.0f);
          for (int t0 = 0; t0 < splits; t0 += 8) {
            float2 part[8];
#pragma unroll
            for (int t = 0; t < 8; ++t) {
              part[t] =
                  t0 + t < splits ? __ldcg(o_t + int64_t(t0 + t) * kHalf) : make_float2(0.0f, 0.0f);
            }
#pragma unroll
            for (int t = 0; t < 8; ++t) {
              const float w = t0 + t < splits ? weight[r * kAttnKeys + t0 + t] : 0.0f;
              acc.x += w * part[t].x;
              acc.y += w * part[t].y;
            }
          }
          reinterpret_cast<float2*>(a.attn + int64_t(h * group + r) * HD)[i] = acc;
        }
      }
      __syncthreads();  // the shared buffers are reused by the next item
    }
  }
};

template <int HD, bool kAsym>
__global__ void __launch_bounds__(kThreads, 1)
    decode_layer_kernel(const __grid_constant__ DecodeLayerArgs a, int max_splits, int profile) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ PhasePlan plan[4];
  __shared__ float scratch[32];
  const int tid = int(threadIdx.x);
  if (tid == 0) {
    plan[0] = plan_for(a.wq.tiles.n_tiles + a.wk.tiles.n_tiles + a.wv.tiles.n_tiles,
                       a.wq.tiles.n_chunks, 1);
    plan[1] = plan_for(a.wo.tiles.n_tiles, a.wo.tiles.n_chunks, 1);
    plan[2] = plan_for(a.w_gate.tiles.n_tiles, a.w_gate.tiles.n_chunks, 2);
    plan[3] = plan_for(a.w_down.tiles.n_tiles, a.w_down.tiles.n_chunks, 1);
  }
  constexpr int kRingBytes = ring_bytes(kStages);
  float* red = reinterpret_cast<float*>(smem + kRingBytes);
  uint8_t* input = smem + kRingBytes + kRedBytes;
  for (int i = tid; i < kMaxLocalTiles * kWarps * 16; i += kThreads) red[i] = 0.0f;
  __syncthreads();

  Layer<HD, kAsym> L{a, plan, nullptr, nullptr, nullptr, red};
  L.lane = tid & 31;
  L.warp = tid >> 5;
  L.quad_row = L.lane >> 2;
  L.quad_col = L.lane & 3;
  L.ring = smem + L.warp * kStages * kStageBytes;
  const int d = int(a.wq.cols), dq = int(a.wo.cols), f = int(a.w_down.cols);
  const int widest = max(d, max(dq, f));
  L.xq = reinterpret_cast<uint32_t*>(input);
  L.xqp = reinterpret_cast<int2*>(input + widest);

  // Weights depend on nothing before this kernel: the ring fills before the wait.
  Cursor next{0, 0, 0, L.warp};
  L.settle(next);
  for (int stage = 0; stage < kStages; ++stage) {
    L.issue(stage, next);
    L.advance(next);
  }
  int stage = 0;
  auto barrier = [&] { grid_barrier(a.sync, a.sync + 1); };
  pdl_wait();

  for (int li = 0; li < a.n_layers; ++li) {
    const int64_t layer = a.first_layer + li;
    const LayerPointers& lp = a.layers[li];
    // KESTREL_CUDA_LAYER_PROFILE: block 0 prints when it passed each phase of cache layer 1,
    // every 64th position (a measurement aid; off, it costs one predicate).
    const bool mark = profile != 0 && blockIdx.x == 0 && tid == 0 && layer == 1;
    uint64_t t[9] = {};
    if (mark) t[0] = global_ns();
    // x is whole: the layer before ended with a barrier (the first waited for the kernel before).
    L.stage_norm_input(a.x, lp.attn_norm, d, scratch);
    __syncthreads();
    L.run_phase(0, next, stage);
    if (mark) t[1] = global_ns();
    __syncthreads();
    for (int e = tid; e < plan[0].n_tiles * 16; e += kThreads) {
      const int lt = e >> 4, r = e & 15;
      const float sum = L.take(lt, r);
      int64_t tile;
      const int which = L.tile_of(0, lt, tile);
      float* out = which == kWq ? a.q : which == kWk ? a.k : a.v;
      const float* bias = lp.bias[which];
      const int64_t row = tile * 16 + r;
      if (row < L.shape(which).rows) out[row] = sum + (bias != nullptr ? bias[row] : 0.0f);
    }
    L.attention(reinterpret_cast<float*>(input), max_splits, layer, /*prefetch=*/true);
    barrier();
    if (mark) t[2] = global_ns();
    L.attention(reinterpret_cast<float*>(input), max_splits, layer, /*prefetch=*/false);
    if (mark) t[3] = global_ns();
    barrier();
    if (mark) t[4] = global_ns();

    L.stage_input(a.attn, dq);
    __syncthreads();
    L.run_phase(1, next, stage);
    if (mark) t[5] = global_ns();
    __syncthreads();
    L.add_to_residual(1, li);
    barrier();

    L.stage_norm_input(a.x, lp.ffn_norm, d, scratch);
    __syncthreads();
    L.run_phase(2, next, stage);
    if (mark) t[6] = global_ns();
    __syncthreads();
    const float* gate_bias = lp.bias[kWGate];
    const float* up_bias = lp.bias[kWUp];
    for (int e = tid; e < plan[2].n_tiles / 2 * 16; e += kThreads) {
      const int pair = e >> 4, r = e & 15;
      float g = L.take(2 * pair, r);
      float u = L.take(2 * pair + 1, r);
      const int64_t row = int64_t(plan[2].first / 2 + pair) * 16 + r;
      if (row < a.w_gate.rows) {
        if (gate_bias != nullptr) g += gate_bias[row];
        if (up_bias != nullptr) u += up_bias[row];
        a.act[row] = g / (1.0f + expf(-g)) * u;
      }
    }
    barrier();
    // In the last layer, the next kernel's blocks may be scheduled (they wait for this grid).
    if (li + 1 == a.n_layers) pdl_trigger();

    L.stage_input(a.act, f);
    __syncthreads();
    L.run_phase(3, next, stage);
    if (mark) t[7] = global_ns();
    __syncthreads();
    L.add_to_residual(3, li);
    // The next layer's input is every block's residual rows.
    if (li + 1 < a.n_layers) barrier();
    if (mark && a.positions[0] % 64 == 0) {
      t[8] = global_ns();
      printf(
          "layer kernel profile (us, pos %d, layer 1 of %d in the launch): qkv %.2f bar %.2f "
          "attn %.2f bar %.2f wo %.2f gate/up %.2f down %.2f end %.2f total %.2f\n",
          a.positions[0], a.n_layers, (t[1] - t[0]) * 1e-3, (t[2] - t[1]) * 1e-3,
          (t[3] - t[2]) * 1e-3, (t[4] - t[3]) * 1e-3, (t[5] - t[4]) * 1e-3, (t[6] - t[5]) * 1e-3,
          (t[7] - t[6]) * 1e-3, (t[8] - t[7]) * 1e-3, (t[8] - t[0]) * 1e-3);
    }
  }
  cp_async_wait<0>();
}

bool profile_enabled() {
  static const bool on = std::getenv("KESTREL_CUDA_LAYER_PROFILE") != nullptr;
  return on;
}

int splits_for(const DecodeLayerArgs& a, int sm_count) {
  return std::min(std::min(sm_count / std::max(1, a.cache.n_kv_heads), kMaxSplits), a.max_splits);
}

// The kernel's parameters must fit the 32764 bytes a launch may carry.
static_assert(sizeof(DecodeLayerArgs) + 2 * sizeof(int) <= 32764);

int shared_bytes(const DecodeLayerArgs& a) {
  const int widest = int(std::max({a.wq.cols, a.wo.cols, a.w_down.cols}));
  return ring_bytes(kStages) + kRedBytes +
         std::max(input_bytes(widest), attention_bytes(a.cache.head_dim));
}

template <int HD, bool kAsym>
Status launch(const DecodeLayerArgs& a, int sm_count, cudaStream_t stream) {
  auto kernel = decode_layer_kernel<HD, kAsym>;
  const int smem = shared_bytes(a);
  // Set on every launch (a host call; replayed graphs skip it): the attribute is per device.
  KS_CUDA_CHECK("decoder layer",
                cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  KS_CUDA_CHECK("decoder layer",
                launch_pdl(kernel, dim3(unsigned(sm_count)), dim3(kThreads), size_t(smem), stream,
                           a, splits_for(a, sm_count), profile_enabled() ? 1 : 0));
  KS_CUDA_CHECK_LAUNCH("decoder layer", "decode_layer_kernel");
  return Status::ok();
}

std::mutex owners_mutex;
std::set<int> owners;  // devices whose layer kernel a backend holds

}  // namespace

bool claim_decode_layer(int device) {
  std::lock_guard<std::mutex> lock(owners_mutex);
  return owners.insert(device).second;
}

void release_decode_layer(int device) {
  std::lock_guard<std::mutex> lock(owners_mutex);
  owners.erase(device);
}

std::string decode_layer_unsupported(const DecodeLayerArgs& a, int sm_count,
                                     size_t shared_per_block) {
  const DeviceWeight* all[] = {&a.wq, &a.wk, &a.wv, &a.wo, &a.w_gate, &a.w_up, &a.w_down};
  for (const DeviceWeight* w : all) {
    if (!is_tiled(w->format) || w->format != a.wq.format)
      return "weights not all of one int4 format";
    if (w->cols % (kGroup * kTileGroups) != 0 || w->cols <= 0 || w->rows <= 0) {
      return "weight columns not a multiple of 128";
    }
  }
  const int64_t hd = a.cache.head_dim;
  const int64_t n_kv = a.cache.n_kv_heads;
  if (a.cache.type != KvType::f16) return "KV cache entries not fp16";
  if (hd != 64 && hd != 128) return "head_dim not 64 or 128";
  if (n_kv < 1 || a.n_heads % n_kv != 0 || a.n_heads / n_kv > kMaxGroup) return "head grouping";
  const int64_t d = a.wq.cols;
  if (a.wq.rows != a.n_heads * hd || a.wk.rows != n_kv * hd || a.wv.rows != n_kv * hd ||
      a.wk.cols != d || a.wv.cols != d || a.wo.cols != a.wq.rows || a.wo.rows != d ||
      a.w_gate.cols != d || a.w_up.cols != d || a.w_up.rows != a.w_gate.rows ||
      a.w_down.cols != a.w_gate.rows || a.w_down.rows != d) {
    return "layer shapes do not chain";
  }
  if (std::max({d, a.wo.cols, a.w_down.cols}) > kMaxInputCols) return "input wider than 16384";
  if (d > kMaxNormCols) return "hidden size over 8192";
  if (sm_count < 1 || sm_count < n_kv) return "fewer SMs than KV heads";
  auto per_block = [&](int64_t tiles) { return (tiles + sm_count - 1) / sm_count; };
  const int64_t most =
      std::max({per_block(a.wq.tiles.n_tiles + a.wk.tiles.n_tiles + a.wv.tiles.n_tiles),
                per_block(a.wo.tiles.n_tiles), 2 * per_block(a.w_gate.tiles.n_tiles),
                per_block(a.w_down.tiles.n_tiles)});
  if (most > kMaxLocalTiles) return "more row tiles per SM than the kernel holds";
  if (splits_for(a, sm_count) < 1) return "no attention workspace";
  // One block a core, all resident: the block's shared memory decides (registers are bounded by
  // the launch bounds), static shared memory included.
  if (size_t(shared_bytes(a)) + 1024 > shared_per_block)
    return "too little shared memory per block";
  if (a.sync == nullptr || a.split_o == nullptr || a.split_ml == nullptr) return "no workspace";
  if (a.n_layers < 1 || a.n_layers > kMaxLaunchLayers) return "layer count out of range";
  const bool asym = a.wq.format == WeightFormat::asym_int4;
  for (int li = 0; li < a.n_layers; ++li) {
    const LayerPointers& lp = a.layers[li];
    if (lp.attn_norm == nullptr || lp.ffn_norm == nullptr) return "a layer without norms";
    for (int w = 0; w < kLayerWeights; ++w) {
      if (lp.data[w] == nullptr || lp.scales[w] == nullptr || (asym && lp.mins[w] == nullptr))
        return "a layer without weights";
    }
  }
  return {};
}

Status decode_layer(const DecodeLayerArgs& a, int sm_count, size_t shared_per_block,
                    cudaStream_t stream) {
  const std::string why = decode_layer_unsupported(a, sm_count, shared_per_block);
  if (!why.empty()) return Status::error("cuda decoder layer: " + why);
  const bool asym = a.wq.format == WeightFormat::asym_int4;
  if (a.cache.head_dim == 64) {
    return asym ? launch<64, true>(a, sm_count, stream) : launch<64, false>(a, sm_count, stream);
  }
  return asym ? launch<128, true>(a, sm_count, stream) : launch<128, false>(a, sm_count, stream);
}

}  // namespace kestrel::cuda
