// The decode GEMV on mma.sync m16n8k16: weights are the A operand (16 rows per m-tile), tokens
// the B operand (8 per n-tile), so one pass over the weights serves up to 16 tokens and the
// arithmetic of 16 tokens stays far below the tensor cores' rate (CUDA-core FMAs would make
// batch-16 decode compute-bound).
//
// Work split: a row tile is 16 * MT consecutive rows of one weight (in swiglu mode, the same 16
// rows of the gate and of the up weight, so the epilogue sees both). A block of 8 warps takes a
// tile at a time; its warps stride over the columns in chunks of 128 (4 groups of 32), lane
// c = lane % 4 taking group c of the chunk for rows lane / 4 and lane / 4 + 8 of each m-tile.
// int4 weights (both paths below) launch one wave of blocks that loop over the tiles, fp16 and
// int8 a block per tile. The 8 warps' partial sums meet in shared memory after each tile. A lane's
// 16-byte int4 group holds weight j in the low nibble and j + 16 in the high nibble of byte j; the
// mask-and-or trick turns nibble pairs at bits 0/16 into two fp16 values 1024 + q, so a 32-bit word
// yields the A fragment halves (4u, 4u+2), (4u+1, 4u+3), (16+4u, 16+4u+2), (16+4u+1, 16+4u+3) for
// word u. The k order that results is the "permuted" shadow layout of common.cuh, so the matching B
// fragment of token lane / 4 is one 16-byte load. int8 and fp16 rows are unpacked into the same
// order with byte permutes.
//
// With a NormInput (batch-1 decode), the input is RMSNorm(x) · w of an fp32 activation: every
// block computes it (each needs all of it: 32 KB of x and w from L2 at 4096 columns) into shared
// memory in the permuted fp16 layout, so the separate norm kernel, its fp16 shadow in global
// memory and one dependent launch drop out of a decode step, twice a layer.
//
// The dp4a path (int4 weights, one or two tokens: gemv_uses_dp4a): at batch 1 the mma path is
// bound by instruction issue, not bandwidth (~16 dequantization instructions per 8 weights, and
// the mma's n = 8 is 1/8 used). Instead every block quantizes its input once into shared memory
// as int8 in groups of 32 with the CPU backend's rounding (quantize_input), and a lane multiplies
// its raw nibbles with them: word u of a group gives the low nibbles of weights 4u .. 4u + 3 and
// the high nibbles of 16 + 4u .. 19 + 4u, two dp4a against input words u and 4 + u, and the zero
// point (8) and the scales are applied once per group. Same weight pipeline. Since the input
// stage is the whole input, per block, the dp4a launch is persistent: a wave of blocks, each
// quantizing once and then looping over row tiles with the warps' rings running on across tile
// boundaries; the quads' sums meet in a small shared buffer after each tile.
//
// At one token an input can also come already quantized by its producer, in half groups of 16
// columns (a producer's tile is 16 rows, half a group): w_down's from the swiglu GEMV's epilogue
// (HalfGroupInput), and, behind a switch, a fused norm's from the residual add before it
// (NormHalvesOut / NormHalvesIn: x·g in half groups and the tiles' sums of squares, each scale
// times the norm's rsqrt). Such a block copies its input instead of quantizing it (kHalves), and
// multiplies each group's two halves with their own scales.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <type_traits>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.cuh"
#include "backend/cuda/gemv.cuh"

namespace kestrel::cuda {
namespace {

// The GEMV's phase profile (set_gemv_profile, KESTREL_CUDA_GEMV_PROFILE=1; a measurement aid):
// thread 0 of block 0 of every gemv_kernel launch takes a slot of this ring and records
// %globaltimer at its start, when its wait for the kernel before returns, after the input stage,
// when its first chunk of weights has landed, after its chunk loop of the first row tile, after
// that tile's exchange and stores, and at its end, beside the call's shape
// (GemvProfileRecord::ns).
constexpr int kGemvProfileSlots = 4096;
constexpr int kGemvProfileMarks = 7;
struct GemvProfileSlot {
  uint64_t marks[kGemvProfileMarks];
  int64_t rows;
  int64_t cols;
  int n_tokens;
  int blocks;
  int tiles;
  int block_tiles;
};
__device__ GemvProfileSlot g_gemv_profile[kGemvProfileSlots];
__device__ unsigned long long g_gemv_profile_count;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunkGroups = 4;  // groups of 32 columns per warp iteration (one per lane of a quad)

struct GemvParams {
  GemvJob jobs[kMaxGemvJobs];
  int first_tile[kMaxGemvJobs];  // each job's first row tile; tiles are numbered job after job
  int n_tiles = 0;
  int n_jobs = 0;
  ShadowOut shadow;           // swiglu mode: fp16 shadow of jobs[0].y
  NormInput norm;             // when norm.x is set, the input is computed from it, x is null
  const __half* x = nullptr;  // [n_tokens, x_stride] permuted fp16
  HalfGroupInput xh;          // set: x already quantized in half groups (the kHalves instance)
  TokenHalfGroups xb;         // set: 9-16 tokens of x as int8 half groups (the kInt8B instance)
  const float* norm_ss = nullptr;  // kNorm with xh: the tiles' sums of squares (NormHalvesIn)
  NormHalvesOut norm_out;          // one token, a residual: prepare its next norm's input
  int sm_count = 0;                // host only: the device's SMs
  bool dp4a = false;           // host only: the int4 dp4a path (gemv_uses_dp4a of the whole call)
  bool early_trigger = false;  // let the next kernel launch at this one's start (trigger_mode)
  bool profile = false;        // host only: the dp4a path's profiling instance (gemv_profile_flag)
  bool loads_in_epilogue = false;  // the dp4a path's first-tile loads as later tiles' (switch)
  bool input_ahead = true;  // the dp4a input stage requests two groups a thread at once (switch)
  bool norm_ahead = true;   // the fused norm's weight loaded before the wait (switch)
  bool weight_evict_first = false;  // weight copies marked evict_first in L2 (switch)
  int64_t x_stride = 0;
  int64_t n_groups = 0;  // x_stride / 32
  int n_tokens = 0;
};

// 32-bit words a lane reads per row per group of 32 weights.
template <WeightFormat F>
constexpr int words_per_group() {
  return F == WeightFormat::fp16 ? 16 : F == WeightFormat::sym_int8 ? 8 : 4;
}

__device__ inline uint32_t half2_bits(__half2 h) {
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ inline __half2 bits_half2(uint32_t b) {
  return *reinterpret_cast<__half2*>(&b);
}

// (a & b) | c in one instruction. Written as C++, ptxas splits it into two LOP3s (each takes one
// immediate, and the mask and the 0x6400 exponent are both constants): 64 of the batch-16 chunk
// loop's 506 SASS instructions (the twenty-ninth session's sass benchmark).
__device__ inline uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Dequantizes word set u of one lane's group into the four A-fragment halves described above.
template <WeightFormat F>
__device__ inline void dequant_quarter(const uint32_t (&w)[words_per_group<F>()], int u,
                                       __half2 scale, __half2 min, uint32_t (&out)[4]) {
  if constexpr (F == WeightFormat::sym_int4 || F == WeightFormat::asym_int4) {
    // Nibbles 0/4 and 2/6 land at bits 0 and 16 (1024 + q); nibbles 1/5 and 3/7 stay 4 bits
    // up (1024 + 16 q) and come down in the multiply-add by 1/16, which is exact: one shift and
    // four masks a word instead of three shifts.
    const uint32_t q = w[u];
    const uint32_t q8 = q >> 8;
    const uint32_t parts[4] = {
        and_or(q, 0x000f000fu, 0x64006400u), and_or(q8, 0x000f000fu, 0x64006400u),
        and_or(q, 0x00f000f0u, 0x64006400u), and_or(q8, 0x00f000f0u, 0x64006400u)};
    constexpr bool kSym = F == WeightFormat::sym_int4;
    // The value's offset: sym 1024 + 8 (q - 8 exactly), asym 1024 (q); for the 16 q parts over 16.
    const __half2 offset = __half2half2(__ushort_as_half(kSym ? 0x6408 : 0x6400));
    const __half2 offset16 = __half2half2(__ushort_as_half(kSym ? 0xd480 : 0xd400));  // -72, -64
    const __half2 sixteenth = __half2half2(__ushort_as_half(0x2c00));                 // 1/16
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 v = i < 2 ? __hsub2(bits_half2(parts[i]), offset)
                              : __hfma2(bits_half2(parts[i]), sixteenth, offset16);
      // One rounding, in the scale's multiply (or the asym multiply-add).
      out[i] = half2_bits(kSym ? __hmul2(v, scale) : __hfma2(v, scale, min));
    }
  } else if constexpr (F == WeightFormat::sym_int8) {
    // Bias the signed bytes by 128 and place each under a 0x64 high byte: 1024 + 128 + q.
    const uint32_t lo = w[u] ^ 0x80808080u;
    const uint32_t hi = w[4 + u] ^ 0x80808080u;
    const uint32_t parts[4] = {
        __byte_perm(lo, 0x64646464u, 0x4240), __byte_perm(lo, 0x64646464u, 0x4341),
        __byte_perm(hi, 0x64646464u, 0x4240), __byte_perm(hi, 0x64646464u, 0x4341)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 v = __hsub2(bits_half2(parts[i]), __half2half2(__ushort_as_half(0x6480)));
      out[i] = half2_bits(__hmul2(v, scale));
    }
  } else {
    out[0] = __byte_perm(w[2 * u], w[2 * u + 1], 0x5410);
    out[1] = __byte_perm(w[2 * u], w[2 * u + 1], 0x7632);
    out[2] = __byte_perm(w[8 + 2 * u], w[9 + 2 * u], 0x5410);
    out[3] = __byte_perm(w[8 + 2 * u], w[9 + 2 * u], 0x7632);
  }
}

// The weight pipeline: every warp streams its chunks through its own ring of shared-memory
// stages filled with cp.async, so many chunks are in flight without holding registers. A lane
// copies, and later reads, only its own bytes (its two rows' 16-byte pieces of the group and
// their scales), so a stage needs no barrier: cp.async.wait_group alone says it has landed.
// Ring::deep: a ring that holds a whole row tile of up to kDeepStages chunks a warp (92 KB at
// sym_int4 with one m-tile, 100 KB at asym_int4): deep_ring's launches, one tile a block (unless a
// test's block cap makes blocks loop over tiles).
// Ring::shallow: two stages instead of three for the two-m-tile int4 mma GEMV (shallow_ring, the
// default): sym_int4 at 16 tokens, 52 KiB a block with its exchange instead of 70 (asym_int4 56
// instead of 76; at 3-8 tokens 44 instead of 62). What it gains (H200: tg128 b16 +1.7% 8B, +0.7%
// 1.5B) is fewer bytes in flight an SM, not the larger L1 its 132 KB split leaves: given three
// stages' 164 KB split (KESTREL_CUDA_L1_READER_CARVEOUT=71) it kept the whole gain (PERF.md,
// thirty-fourth session).
constexpr int kDeepStages = 10;
enum class Ring { standard, deep, shallow };

template <WeightFormat F, int MT, Ring kRing = Ring::standard>
struct Pipe {
  static constexpr bool kAsym = F == WeightFormat::asym_int4;
  static constexpr int kWords = words_per_group<F>();  // per row per group
  static constexpr int kPieces = MT * 2 * kWords / 4;  // 16-byte pieces per lane per chunk
  static constexpr bool kTiled = F == WeightFormat::sym_int4 || kAsym;
  // Per lane and chunk: the host layout needs one word per row (mt, h); the tiled layout holds
  // both rows' scales (h = 0, 1) in one word per m-tile. Mins follow the scales.
  static constexpr int kScaleWordsPerKind = F == WeightFormat::fp16 ? 0 : kTiled ? MT : MT * 2;
  static constexpr int kScaleWords = kScaleWordsPerKind * (kAsym ? 2 : 1);
  // Deep enough to cover DRAM latency, small enough that three or four blocks share an SM
  // (a stage is 1 KB a warp for int4 with one m-tile).
  static_assert(kRing != Ring::deep || (kTiled && MT == 1),
                "the deep ring is the one-m-tile int4 GEMV's");
  static_assert(kRing != Ring::shallow || (kTiled && MT == 2),
                "the shallow ring is the two-m-tile int4 GEMV's");
  static constexpr int kStages = kRing == Ring::deep                      ? kDeepStages
                                 : kRing == Ring::shallow                 ? 2
                                 : (F == WeightFormat::sym_int4 || kAsym) ? (MT == 1 ? 5 : 3)
                                 : F == WeightFormat::sym_int8            ? (MT == 1 ? 4 : 2)
                                                                          : (MT == 1 ? 3 : 2);
  static constexpr int kLaneBytes = kPieces * 16 + kScaleWords * 4;
  static constexpr int kWarpStageBytes = kLaneBytes * 32;
  static constexpr int kBytes = kWarps * kStages * kWarpStageBytes;
};

// The NormInput prologue (one token): xs [x_stride] fp16 permuted = rms_norm(norm.x) * norm.w
// with the rms_norm kernel's arithmetic (norm.cu) for each value; block 0 also stores the fp32
// row in norm.out. Each thread keeps its columns in registers from the sum of squares to the
// scaling, so the prologue is one round trip to L2 and two barriers. The norm's weight `g`, a
// weight that no kernel writes, is loaded before the wait (load_norm_weight), so the ~400 blocks'
// stages read only x from L2 at once after it.
constexpr int kNormPerThread = int(kMaxNormInputCols / 4 / kThreads);  // float4s a thread

__device__ inline void load_norm_weight(const GemvParams& p, float4 (&g)[kNormPerThread]) {
  const int n4 = int(p.x_stride / 4);
  const float4* w4 = reinterpret_cast<const float4*>(p.norm.w);
#pragma unroll
  for (int r = 0; r < kNormPerThread; ++r) {
    const int j = int(threadIdx.x) + r * kThreads;
    g[r] = j < n4 ? w4[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
}

// The block's rsqrt(mean(x^2) + eps) of the fused norm, from each thread's part of the sum of
// squares: every thread calls it; the warps' sums meet in shared memory and are added in warp
// order, so every block that sums the same parts gets the same bits.
__device__ inline float block_rms_scale(const GemvParams& p, float sum) {
  __shared__ float partial[kWarps];
  sum = warp_sum(sum);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sum;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int wp = 0; wp < kWarps; ++wp) total += partial[wp];
  return 1.0f / sqrtf(total / float(p.x_stride) + p.norm.eps);
}

__device__ void normalize_input(const GemvParams& p, __half* xs,
                                const float4 (&g)[kNormPerThread]) {
  constexpr int kPerThread = kNormPerThread;
  const int n4 = int(p.x_stride / 4);
  const float4* x4 = reinterpret_cast<const float4*>(p.norm.x);
  float4 v[kPerThread];
  float sum = 0.0f;
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    const int j = int(threadIdx.x) + r * kThreads;
    if (j < n4) {
      v[r] = x4[j];
      sum += v[r].x * v[r].x + v[r].y * v[r].y + v[r].z * v[r].z + v[r].w * v[r].w;
    }
  }
  const float scale = block_rms_scale(p, sum);
  uint32_t* xs32 = reinterpret_cast<uint32_t*>(xs);
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    const int j = int(threadIdx.x) + r * kThreads;  // columns 4j .. 4j + 3
    if (j < n4) {
      const float4 a = make_float4(g[r].x * (v[r].x * scale), g[r].y * (v[r].y * scale),
                                   g[r].z * (v[r].z * scale), g[r].w * (v[r].w * scale));
      if (blockIdx.x == 0) reinterpret_cast<float4*>(p.norm.out)[j] = a;
      store_shadow4(xs32, j, a, /*permuted=*/true);
    }
  }
  __syncthreads();
}

// One group of finite fp16 values (`raw`: slot order, common.cuh's permutation) times inv,
// rounded to integers as round_small rounds, into words[8] of int8 in natural order; returns
// their sum. The sum of 1.5 * 2^23 and an integer q with |q| <= 127 has q's two's-complement byte
// as its low byte, so three byte permutes pack four values with no conversion or subtraction,
// and one dp4a against ones a word sums them: ~4 instructions a value against ~9 on the
// conversion's path. Word w holds slots s0 .. s0 + 3 (s0 = 8 (w % 4) + 4 (w / 4): half2 words
// 2 (w / 4) and 2 (w / 4) + 1 of raw[w % 4]) at bytes 0, 2, 1, 3, the permutation's last two
// bits swapped back.
__device__ inline int packed_group(const uint4 (&raw)[4], float inv, uint32_t (&words)[8]) {
  auto rounded = [&](float x) { return round_bits(__fmul_rn(x, inv)); };
  int sum = 0;
#pragma unroll
  for (int w = 0; w < 8; ++w) {
    const uint4 q = raw[w & 3];
    const float2 a = __half22float2(bits_half2(w < 4 ? q.x : q.z));       // slots s0, s0 + 1
    const float2 b = __half22float2(bits_half2(w < 4 ? q.y : q.w));       // slots s0 + 2, s0 + 3
    const uint32_t lo = __byte_perm(rounded(a.x), rounded(b.x), 0x0040);  // bytes 0, 1
    const uint32_t hi = __byte_perm(rounded(a.y), rounded(b.y), 0x0040);  // bytes 2, 3
    words[w] = __byte_perm(lo, hi, 0x5410);
    sum = __dp4a(int(words[w]), 0x01010101, sum);
  }
  return sum;
}

// The dp4a path's input stage: every (token, group of 32) of the fp16 permuted input `src`
// ([kDp, x_stride], tokens past n_tokens read as zeros) becomes 32 int8 values in natural
// order in `xq` with its scale and the sum of its values in `xqp` = {scale bits, sum}: the
// CPU backend's quantization (scale = amax / 127, round to nearest even), so the integer dot
// products below are the CPU's. A thread takes whole groups: the stage runs in every block at
// once, so what bounds it is the instructions a group, which a group spread over lanes
// multiplied (PERF.md, twenty-first session). With p.input_ahead a thread requests the 64
// bytes of each of its groups before it quantizes the first (at most two a token: 16384
// columns are 512 groups), so the down GEMVs' input (8960 and 14336 columns: more groups than
// threads) takes one round trip instead of two, rounds to integers by an add (round_small)
// instead of a conversion, and packs a group of finite values with byte permutes
// (packed_group); the results are the same.
template <int kDp>
__device__ void quantize_input(const __half* src, const GemvParams& p, uint32_t* xq, int2* xqp) {
  const int n_groups = int(p.n_groups);
  const int total = kDp * n_groups;
  auto load = [&](int e, uint4(&raw)[4]) {
    const int t = e / n_groups;
    const int g = e - t * n_groups;
    if (e < total && t < p.n_tokens) {
      const uint4* s4 =
          reinterpret_cast<const uint4*>(src + int64_t(t) * p.x_stride + int64_t(g) * kGroup);
#pragma unroll
      for (int i = 0; i < 4; ++i) raw[i] = s4[i];
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) raw[i] = make_uint4(0, 0, 0, 0);
    }
  };
  auto store_group = [&](int t, int g, const uint32_t(&words)[8], float sx, int sq) {
    uint4* dst =
        reinterpret_cast<uint4*>(xq) + (int64_t(t) * p.x_stride + int64_t(g) * kGroup) / 16;
    dst[0] = make_uint4(words[0], words[1], words[2], words[3]);
    dst[1] = make_uint4(words[4], words[5], words[6], words[7]);
    xqp[t * n_groups + g] = make_int2(__float_as_int(sx), sq);
  };
  auto quantize = [&](int e, const uint4(&raw)[4]) {
    const int t = e / n_groups;
    const int g = e - t * n_groups;
    uint32_t words[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float sx = 0.0f;
    int sq = 0;
    if (t < p.n_tokens) {
      // With input_ahead, a group whose values are all finite takes packed_group's shorter
      // arithmetic; the others (a NaN or an infinity: their amax says so, taken NaN-first in
      // fp16, where it is exact) the conversion's below, whose rules for them it keeps.
      if (p.input_ahead) {
        __half2 m2 = __float2half2_rn(0.0f);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t w[4] = {raw[i].x, raw[i].y, raw[i].z, raw[i].w};
#pragma unroll
          for (int j = 0; j < 4; ++j) m2 = __hmax2_nan(m2, __habs2(bits_half2(w[j])));
        }
        const float amax = __half2float(__hmax_nan(__low2half(m2), __high2half(m2)));
        if (amax <= 65504.0f) {  // false for NaN and infinity
          sx = amax / 127.0f;
          sq = packed_group(raw, amax > 0.0f ? 127.0f / amax : 0.0f, words);
          store_group(t, g, words, sx, sq);
          return;
        }
      }
      float v[kGroup];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t w[4] = {raw[i].x, raw[i].y, raw[i].z, raw[i].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 f = __half22float2(bits_half2(w[j]));
          v[8 * i + 2 * j] = f.x;
          v[8 * i + 2 * j + 1] = f.y;
        }
      }
      float amax = 0.0f;
#pragma unroll
      for (int s = 0; s < kGroup; ++s) amax = fmaxf(amax, fabsf(v[s]));
      sx = amax / 127.0f;
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
#pragma unroll
      for (int s = 0; s < kGroup; ++s) {
        // Slot s holds element k (common.cuh's permutation; its last two bits swap back).
        const int b = s & 3;
        const int k = 4 * (s >> 3) + 16 * ((s >> 2) & 1) + ((b >> 1) | ((b & 1) << 1));
        const float scaled = __fmul_rn(v[s], inv);
        const int q = p.input_ahead ? round_small(scaled) : __float2int_rn(scaled);
        sq += q;
        words[k >> 2] |= (uint32_t(q) & 0xffu) << (8 * (k & 3));
      }
    }
    store_group(t, g, words, sx, sq);
  };
  if (p.input_ahead) {
    for (int e = int(threadIdx.x); e < total; e += 2 * kThreads) {
      uint4 first[4], second[4];
      load(e, first);
      load(e + kThreads, second);
      quantize(e, first);
      if (e + kThreads < total) quantize(e + kThreads, second);
    }
  } else {
    for (int e = int(threadIdx.x); e < total; e += kThreads) {
      uint4 raw[4];
      load(e, raw);
      quantize(e, raw);
    }
  }
  __syncthreads();
}

// The 16-byte units of a one-token half-group input (HalfGroupInput): 2 n_groups of int8 values,
// then n_groups of scales, {scale of the low half, its sum, scale of the high half, its sum}.
// load_half_units requests a thread's kRound units from `base` (every kThreads-th), before
// store_half_units puts them into xq and xqp, the scales times `scale` (kScaled; for a norm's
// rsqrt).
template <int kRound>
__device__ inline void load_half_units(const GemvParams& p, int base, uint4 (&v)[kRound]) {
  const int q_units = int(p.n_groups) * 2;
  const int total = q_units + int(p.n_groups);
  const uint4* q_src = reinterpret_cast<const uint4*>(p.xh.q);
  const uint4* s_src = reinterpret_cast<const uint4*>(p.xh.scales);
#pragma unroll
  for (int r = 0; r < kRound; ++r) {
    const int e = base + r * kThreads;
    if (e < total) v[r] = e < q_units ? q_src[e] : s_src[e - q_units];
  }
}

template <int kRound, bool kScaled>
__device__ inline void store_half_units(const GemvParams& p, int base, const uint4 (&v)[kRound],
                                        uint32_t* xq, int2* xqp, float scale = 1.0f) {
  const int q_units = int(p.n_groups) * 2;
  const int total = q_units + int(p.n_groups);
#pragma unroll
  for (int r = 0; r < kRound; ++r) {
    const int e = base + r * kThreads;
    if (e < q_units) {
      reinterpret_cast<uint4*>(xq)[e] = v[r];
    } else if (e < total) {
      uint4 u = v[r];
      if constexpr (kScaled) {
        u.x = __float_as_uint(__uint_as_float(u.x) * scale);
        u.z = __float_as_uint(__uint_as_float(u.z) * scale);
      }
      reinterpret_cast<uint4*>(xqp)[e - q_units] = u;
    }
  }
}

// The kHalves input stage: the producer's half-group quantization (p.xh: 32 bytes of int8 and 16
// of scales a group) copied into xq and xqp, a thread's units of a round requested before any is
// stored, so the stage is one round trip to L2 for up to 4 x 256 units (the 8B's w_down input:
// 14336 columns, 1344 units, two rounds).
__device__ void copy_half_groups(const GemvParams& p, uint32_t* xq, int2* xqp) {
  constexpr int kRound = 4;
  const int total = int(p.n_groups) * 3;
  for (int base = int(threadIdx.x); base < total; base += kRound * kThreads) {
    uint4 v[kRound];
    load_half_units(p, base, v);
    store_half_units<kRound, false>(p, base, v, xq, xqp);
  }
  __syncthreads();
}

// The kHalves stage of a fused norm (NormHalvesIn): the residual's producer left, per 16
// columns, its values times the norm's weight in half groups and their sum of squares. The block
// adds the sums in a fixed order (every block the same rsqrt), copies the half groups with each
// scale times rsqrt(mean(x^2) + eps), and block 0 stores the fp32 normalized row from the
// residual as normalize_input does. One round trip: the sums, the half groups (at most 384
// units of 16 bytes at 4096 columns) and block 0's row are all requested before the sum's
// barrier.
__device__ void copy_norm_halves(const GemvParams& p, uint32_t* xq, int2* xqp,
                                 const float4 (&g)[kNormPerThread]) {
  static_assert(kMaxNormInputCols / 16 <= kThreads, "a thread adds one tile's sum of squares");
  constexpr int kRound = int((kMaxNormInputCols / 32 * 3 + kThreads - 1) / kThreads);
  uint4 v[kRound];
  load_half_units(p, int(threadIdx.x), v);
  const int n_halves = int(p.n_groups) * 2;
  float sum = int(threadIdx.x) < n_halves ? p.norm_ss[threadIdx.x] : 0.0f;
  const int n4 = int(p.x_stride / 4);
  const float4* x4 = reinterpret_cast<const float4*>(p.norm.x);
  float4 x[kNormPerThread];
  if (blockIdx.x == 0) {
#pragma unroll
    for (int r = 0; r < kNormPerThread; ++r) {
      const int j = int(threadIdx.x) + r * kThreads;
      if (j < n4) x[r] = x4[j];
    }
  }
  const float scale = block_rms_scale(p, sum);
  store_half_units<kRound, true>(p, int(threadIdx.x), v, xq, xqp, scale);
  if (blockIdx.x == 0) {
#pragma unroll
    for (int r = 0; r < kNormPerThread; ++r) {
      const int j = int(threadIdx.x) + r * kThreads;
      if (j < n4) {
        reinterpret_cast<float4*>(p.norm.out)[j] =
            make_float4(g[r].x * (x[r].x * scale), g[r].y * (x[r].y * scale),
                        g[r].z * (x[r].z * scale), g[r].w * (x[r].w * scale));
      }
    }
  }
  __syncthreads();
}

// A row half's dot products with one input group in two halves (kHalves): the low nibbles of
// its four words are weights 0-15, against input words 0-3, the high nibbles weights 16-31,
// against words 4-7; {columns 0-15, columns 16-31}.
__device__ inline int2 dp4a_halves(const uint32_t (&w)[4], const uint32_t (&xw)[8]) {
  int lo = 0, hi = 0;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    lo = __dp4a(int(w[u] & 0x0f0f0f0fu), int(xw[u]), lo);
    hi = __dp4a(int((w[u] >> 4) & 0x0f0f0f0fu), int(xw[4 + u]), hi);
  }
  return make_int2(lo, hi);
}

// The epilogue of one output: row `row` of job `job` for token `token` (rows past the end and
// token slots past n_tokens are dropped), plus the bias and the residual add. Returns the
// residual's new value (0 without one, or for a dropped output).
__device__ inline float store_output(const GemvParams& p, int job, int64_t row, int token,
                                     float sum) {
  const GemvJob& out = p.jobs[job];
  const int64_t n_rows = out.w.rows;
  if (row < n_rows && token < p.n_tokens) {
    const float value = sum + (out.w.bias != nullptr ? out.w.bias[row] : 0.0f);
    const int64_t at = int64_t(token) * n_rows + row;
    out.y[at] = value;
    if (out.residual != nullptr) {
      const float updated = out.residual[at] + value;
      out.residual[at] = updated;
      return updated;
    }
  }
  return 0.0f;
}

// store_output with the bias and the residual's old value loaded beforehand (the dp4a path's
// first tile: bias before the wait, residual right after it, so neither load is a round trip
// at the end of the chain): the same arithmetic.
__device__ inline float store_output_loaded(const GemvParams& p, int job, int64_t row, int token,
                                            float sum, float bias, float residual) {
  const GemvJob& out = p.jobs[job];
  const int64_t n_rows = out.w.rows;
  if (row < n_rows && token < p.n_tokens) {
    const float value = sum + bias;
    const int64_t at = int64_t(token) * n_rows + row;
    out.y[at] = value;
    if (out.residual != nullptr) {
      out.residual[at] = residual + value;
      return residual + value;
    }
  }
  return 0.0f;
}

// swiglu: up = u, gate = silu(g) * u, and gate's fp16 shadow. Returns the gate value as the
// shadow holds it (rounded to fp16), 0 for a row past the end.
// Without `shadow`, the fp16 value is returned and not stored (the int8 output's epilogue stores
// the value its code stands for instead).
__device__ inline float store_swiglu_output(const GemvParams& p, int64_t row, int token, float g,
                                            float u, bool shadow = true) {
  const GemvJob& gate = p.jobs[0];
  const GemvJob& up = p.jobs[1];
  const int64_t n_rows = gate.w.rows;
  if (row < n_rows && token < p.n_tokens) {
    if (gate.w.bias != nullptr) g += gate.w.bias[row];
    if (up.w.bias != nullptr) u += up.w.bias[row];
    const float value = g / (1.0f + expf(-g)) * u;
    up.y[int64_t(token) * n_rows + row] = u;
    gate.y[int64_t(token) * n_rows + row] = value;
    const __half h = __float2half_rn(value);
    if (shadow && p.shadow.data != nullptr) {
      p.shadow.data[shadow_index(token, row, p.shadow.row_stride, p.shadow.permuted)] = h;
    }
    return __half2float(h);
  }
  return 0.0f;
}

// The dp4a path's half-group quantization of 16 values, one a lane of lanes 0-15 (every one of
// them calls this together; quantize_half_group, common.cuh): returns the lane's int8 value and
// gives the half's {scale bits, sum of the 16}.
__device__ inline int quantize_half16(float v, int2& scale_sum) {
  const float values[1] = {v};
  int q[1];
  scale_sum = quantize_half_group<1>(values, q);
  return q[0];
}

// Lanes 0-15 store half `half` of token 0's half-group input (HalfGroupInput's layout): lane l's
// value is element l of the half, byte 16 (half % 2) + l of group half / 2.
__device__ inline void store_half16(const HalfGroupOut& out, int64_t half, int lane, int q,
                                    int2 scale_sum) {
  uint32_t word = uint32_t(q) & 0xffu;
  word |= (uint32_t(__shfl_down_sync(kHalfLanes, q, 1, 16)) & 0xffu) << 8;
  word |= (uint32_t(__shfl_down_sync(kHalfLanes, q, 2, 16)) & 0xffu) << 16;
  word |= (uint32_t(__shfl_down_sync(kHalfLanes, q, 3, 16)) & 0xffu) << 24;
  if ((lane & 3) == 0) out.q[half * 4 + lane / 4] = word;
  if (lane == 0) out.scales[half] = scale_sum;
}

// The int8 half groups (p.shadow.tokens, TokenHalvesOut) of a 9-16-token swiglu tile's 16 gate
// rows from row_base (a multiple of 16: half (row_base / 16) % 2 of group row_base / 32), each
// thread of the block (every one calls this) holding the fp16 value of one (row row_base + r,
// token) of the tile (0 past the rows or tokens): each token's 16 values meet in `scratch` (256
// floats the block may overwrite), their largest magnitude gives the half's scale
// (token_half_scale), and each thread stores its code, the value the code stands for into the
// fp16 shadow, and, for row 0 of its token, the half's scale.
__device__ inline void store_swiglu_tokens(const GemvParams& p, int64_t row_base, int r, int token,
                                           float value, float* scratch) {
  static_assert(kThreads == 256, "one thread a (row, token) of a 16 x 16 tile");
  __syncthreads();  // scratch held the warps' partial sums
  scratch[token * 16 + r] = value;
  __syncthreads();
  float amax = 0.0f;  // from 0 and by fmaxf: NaN never wins
#pragma unroll
  for (int k = 0; k < 16; ++k) amax = fmaxf(amax, fabsf(scratch[token * 16 + k]));
  __half bits;
  const float sf = token_half_scale(amax, bits);
  const int64_t row = row_base + r;
  if (row < p.jobs[0].w.rows && token < p.n_tokens) {
    const int q = token_half_code(value, sf);
    const int64_t stride = p.shadow.row_stride;
    p.shadow.tokens.codes[token * stride + (row & ~int64_t(kGroup - 1)) +
                          permuted_slot(int(row & (kGroup - 1)))] = uint8_t(q + 128);
    p.shadow.data[shadow_index(token, row, stride, true)] =
        __float2half_rn(token_half_value(q, sf));
    if (r == 0) {
      reinterpret_cast<__half*>(
          p.shadow.tokens
              .scales)[(token * (stride / kGroup) + row_base / kGroup) * 2 + (row_base / 16) % 2] =
          bits;
    }
  }
}

// The swiglu shadow's padding past the last row (when rows is not a multiple of 32) is zero:
// written by the grid's last block; so are the half groups past the last tile's, which no tile
// writes.
__device__ inline void zero_swiglu_shadow_pad(const GemvParams& p) {
  const int64_t n_rows = p.jobs[0].w.rows;
  if (p.shadow.halves.q != nullptr && blockIdx.x == gridDim.x - 1) {
    const int64_t first = (n_rows + 15) / 16;
    const int64_t end = (n_rows + kGroup - 1) / kGroup * 2;
    for (int64_t h = first + threadIdx.x; h < end; h += blockDim.x) {
      reinterpret_cast<uint4*>(p.shadow.halves.q)[h] = make_uint4(0u, 0u, 0u, 0u);
      p.shadow.halves.scales[h] = make_int2(0, 0);
    }
  }
  if (p.shadow.data != nullptr && blockIdx.x == gridDim.x - 1) {
    const int64_t pad = p.shadow.row_stride - n_rows;
    for (int64_t e = threadIdx.x; e < pad * p.n_tokens; e += blockDim.x) {
      const int64_t token = e / pad;
      const int64_t col = n_rows + e % pad;
      p.shadow.data[shadow_index(token, col, p.shadow.row_stride, p.shadow.permuted)] =
          __float2half_rn(0.0f);
    }
  }
}

// A lane's offsets into the tiled int4 layout (int4_tiles.h) for the 16 rows from `first_row`
// (a multiple of 16; rows past the weight clamp to its last tile, their sums never stored): its
// 16-byte piece of chunk 0 for row half h (data, h = 0 and 1) and the word with both halves'
// scales of chunk 0 (in 32-bit words).
__device__ inline void tiled_offsets(const DeviceWeight& w, int64_t first_row, int lane,
                                     int block_shift, uint32_t (&data)[2], uint32_t& scale) {
  const Int4Tiles& t = w.tiles;
  const int64_t t16 = min(first_row / kTileRows, t.n_tiles - 1);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    data[h] = uint32_t(t16 * t.n_chunks * kTileChunkBytes + h * 512 + lane * 16);
  }
  scale = uint32_t(t16 * t.n_chunks * t.chunk_scale_words() + ((lane & 3) >> block_shift) * 8 +
                   (lane >> 2));
}

// One lane's weights of one chunk in registers: rows (lane/4, lane/4 + 8) of each m-tile.
template <WeightFormat F, int MT>
struct Fragment {
  uint32_t words[MT][2][words_per_group<F>()];
  __half2 scale[MT][2];
  __half2 min[MT][2];
};

// Copies m-tile mt of a lane's tiled int4 chunk c into a ring stage ([kPieces][32 lanes] pieces,
// then [kScaleWords][32 lanes] words): the 16-byte pieces of its two row halves (`data`, chunk
// 0's offsets from tiled_offsets), the word of both halves' scales and, asym, of their mins.
template <WeightFormat F, int MT>
__device__ inline void copy_tiled_mtile(const DeviceWeight& w, int mt, const uint32_t (&data)[2],
                                        uint32_t scale, uint32_t c, uint32_t chunk_scale_words,
                                        uint4* pieces, uint32_t* scale_words, int lane,
                                        uint64_t policy) {
  static_assert(words_per_group<F>() == 4, "one 16-byte piece a row half: int4");
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    cp_async_16_hint(&pieces[(mt * 2 + h) * 32 + lane],
                     w.data + data[h] + c * uint32_t(kTileChunkBytes), policy);
  }
  const uint32_t si = 2 * (scale + c * chunk_scale_words);
  cp_async_4_hint(&scale_words[mt * 32 + lane], w.scales + si, policy);
  if constexpr (F == WeightFormat::asym_int4) {
    cp_async_4_hint(&scale_words[(MT + mt) * 32 + lane], w.mins + si, policy);
  }
}

// m-tile mt of a lane's landed tiled chunk (copy_tiled_mtile) into its registers; a lane past
// the last group (`valid` false) copied nothing and takes zeros, never stale bytes.
template <WeightFormat F, int MT>
__device__ inline void read_tiled_mtile(const uint4* pieces, const uint32_t* scale_words, int mt,
                                        int lane, bool valid, Fragment<F, MT>& f) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint4 v = valid ? pieces[(mt * 2 + h) * 32 + lane] : make_uint4(0, 0, 0, 0);
    f.words[mt][h][0] = v.x;
    f.words[mt][h][1] = v.y;
    f.words[mt][h][2] = v.z;
    f.words[mt][h][3] = v.w;
    const uint32_t sw = valid ? scale_words[mt * 32 + lane] : 0u;
    f.scale[mt][h] = __half2half2(__ushort_as_half(uint16_t(h == 1 ? sw >> 16 : sw)));
    if constexpr (F == WeightFormat::asym_int4) {
      const uint32_t mw = valid ? scale_words[(MT + mt) * 32 + lane] : 0u;
      f.min[mt][h] = __half2half2(__ushort_as_half(uint16_t(h == 1 ? mw >> 16 : mw)));
    }
  }
}

// The A fragments of word u of a lane's chunk, [mt][low, high]: rows (lane/4, lane/4 + 8) of
// m-tile mt, the low nibbles' weights and the high nibbles'.
template <WeightFormat F, int MT>
__device__ inline void a_fragments(const Fragment<F, MT>& f, int u, uint32_t (&a)[MT][2][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    uint32_t top[4], bottom[4];
    dequant_quarter<F>(f.words[mt][0], u, f.scale[mt][0], f.min[mt][0], top);
    dequant_quarter<F>(f.words[mt][1], u, f.scale[mt][1], f.min[mt][1], bottom);
    a[mt][0][0] = top[0], a[mt][0][1] = bottom[0], a[mt][0][2] = top[1];
    a[mt][0][3] = bottom[1];
    a[mt][1][0] = top[2], a[mt][1][1] = bottom[2], a[mt][1][2] = top[3];
    a[mt][1][3] = bottom[3];
  }
}

// kProfile: the instance that records the phase profile (dp4a only; gemv_profile_flag).
// kHalves: the input is p.xh, quantized in half groups by its producer (HalfGroupInput): copied
// into shared memory instead of quantized, each group's two halves multiplied with their own
// scales; with kNorm, the residual's next-norm input (NormHalvesIn: p.xh and p.norm_ss), each
// scale times the norm's rsqrt.
// kRing: the weight ring's depth (Ring::deep for deep_ring, Ring::shallow for shallow_ring), the
// same arithmetic in the same order whichever it is.
// kWide: two blocks an SM in the launch bound (128 registers) instead of the fused norm's three
// (80): the fp16 and sym_int8 norm instances' batch-1 loops spill there (norm_two_blocks).
// kInt8B: the B fragments from p.xb (TokenHalfGroups): a chunk's codes and scales (9 registers a
// token slot instead of 16) loaded kInt8B chunks ahead (1 as the fp16 fragments, or 2:
// gemv_int8_ahead), each pair of columns turned into the fp16 value (code - 128) * scale as the
// mma takes it; 0 for the fp16 fragments.
template <WeightFormat F, int MT, int NT, bool kSwiglu, bool kNorm, int kDp, bool kProfile = false,
          bool kHalves = false, Ring kRing = Ring::standard, bool kWide = false, int kInt8B = 0>
__global__ void __launch_bounds__(kThreads, !kWide && (kNorm || kDp == 1) ? 3 : 2)
    gemv_kernel(const __grid_constant__ GemvParams p) {
  static_assert(!kWide || (kNorm && kDp == 0), "kWide: the fp16 and int8 fused-norm bound");
  static_assert(
      kInt8B == 0 ||
          (kInt8B <= 2 && kDp == 0 && !kNorm && !kHalves && NT == 2 && F == WeightFormat::sym_int4),
      "int8 half-group B fragments: the sym_int4 mma path past 8 tokens, 1 or 2 chunks ahead");
  constexpr bool kI8 = kInt8B > 0;
  static_assert(kRing != Ring::deep || (kDp >= 1 && kDp <= 2 && !kSwiglu && !kNorm),
                "deep_ring's instances");
  static_assert(kRing != Ring::shallow || (kDp == 0 && !kNorm), "shallow_ring's instances");
  static_assert(!kSwiglu || MT == 2, "swiglu pairs one m-tile of gate with one of up");
  static_assert(!kHalves || (kDp == 1 && (kNorm || (!kSwiglu && MT == 1))),
                "a half-group input is one token's: a plain one-m-tile GEMV's, or a fused norm's");
  static_assert(
      kDp == 0 || (NT == 1 && (F == WeightFormat::sym_int4 || F == WeightFormat::asym_int4)),
      "the dp4a path reads int4 tiles for at most 8 tokens");
  // Tiles of 16 * MT rows (swiglu: 16 rows of gate and of up), numbered job after job. A block
  // takes tiles blockIdx.x, + gridDim.x, ...: one each when the grid covers them all, several
  // when the launch is persistent (the dp4a path, whose input stage is per block).
  struct TileAt {
    int job;
    int64_t row_base;
  };
  auto locate = [&](int tile) {
    if constexpr (kSwiglu) {
      return TileAt{0, int64_t(tile) * 16};
    } else {
      int job = 0;
#pragma unroll
      for (int j = 1; j < kMaxGemvJobs; ++j) {
        if (j < p.n_jobs && tile >= p.first_tile[j]) job = j;
      }
      return TileAt{job, int64_t(tile - p.first_tile[job]) * 16 * MT};
    }
  };
  auto weight = [&](int job, int mt) -> const DeviceWeight& {
    return kSwiglu ? p.jobs[mt].w : p.jobs[job].w;
  };
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int quad_row = lane >> 2;
  const int quad_col = lane & 3;
  // The int4 (tiled) formats loop over tiles, on both paths; the fp16 and int8 grids cover
  // their tiles, one a block: consume() reads the host-layout scales' parity from the issue
  // cursor's offsets, which run ahead into the next tile, and only the tiled formats need no
  // per-tile state there.
  constexpr bool kPersistent = Pipe<F, MT, kRing>::kTiled;
  // This block's tiles: tile0, tile0 + tile_step, ...
  const int tile0 = int(blockIdx.x);
  const int tile_step = int(gridDim.x);
  const int n_my_tiles = !kPersistent        ? 1
                         : tile0 < p.n_tiles ? (p.n_tiles - 1 - tile0) / tile_step + 1
                                             : 0;

  float acc[MT][NT][4];
  const int64_t n_chunks = (p.n_groups + kChunkGroups - 1) / kChunkGroups;
  using P = Pipe<F, MT, kRing>;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* pipe = smem + warp * P::kStages * P::kWarpStageBytes;
  // NormInput mode: [1, x_stride] fp16 permuted input, after the pipeline's stages.
  __half* xs = reinterpret_cast<__half*>(smem + P::kBytes);
  // dp4a mode: [kDp, x_stride] int8 input and [kDp, n_groups] {scale, sum} (kHalves: [2 n_groups],
  // a half group each), after that.
  // (A fused norm from the producer's half groups, kHalves, has no fp16 row: xq comes first.)
  constexpr bool kShadowRow = kNorm && !kHalves;
  uint32_t* xq = reinterpret_cast<uint32_t*>(smem + P::kBytes + (kShadowRow ? 2 * p.x_stride : 0));
  int2* xqp = reinterpret_cast<int2*>(reinterpret_cast<uint8_t*>(xq) + kDp * p.x_stride);
  auto pieces = [&](int stage) {  // [kPieces][32 lanes] uint4
    return reinterpret_cast<uint4*>(pipe + stage * P::kWarpStageBytes);
  };
  auto scale_words = [&](int stage) {  // [kScaleWords][32 lanes] uint32
    return reinterpret_cast<uint32_t*>(pipe + stage * P::kWarpStageBytes + P::kPieces * 16 * 32);
  };
  // Per-row offsets computed once: no division or 64-bit multiply per chunk (the launcher
  // checks that a weight's data and scales fit 32-bit offsets). Host layout: scales are fp16,
  // two to a 32-bit word; the copy takes the aligned word and the read picks the half. Tiled
  // layout (int4_tiles.h): a lane's piece of chunk c is at data_offset + c * 1024 and the word
  // with both of its rows' scales at scale_offset + c * chunk_scale_words.
  const int block_shift = p.jobs[0].w.block == 64 ? 1 : 0;
  // The tile the next issue reads from: its job and per-lane offsets, set once per tile. The
  // issues run kStages chunks ahead of the consumer, into the block's next tile.
  int issue_job = 0;
  uint32_t data_offset[MT][2];
  uint32_t scale_offset[MT][2];
  auto set_issue_tile = [&](int tile) {
    const TileAt at = locate(tile);
    issue_job = at.job;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const DeviceWeight& w = weight(at.job, mt);
      const int64_t first_row = at.row_base + (kSwiglu ? 0 : mt * 16);
      if constexpr (P::kTiled) {
        tiled_offsets(w, first_row, lane, block_shift, data_offset[mt], scale_offset[mt][0]);
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // Rows past the end read the last row; their sums are never stored.
          const int64_t row = min(first_row + quad_row + 8 * h, w.rows - 1);
          data_offset[mt][h] = uint32_t(row * w.row_bytes);
          scale_offset[mt][h] =
              P::kScaleWords > 0 ? uint32_t(row * (w.cols >> (5 + block_shift))) : 0u;
        }
      }
    }
  };
  const uint32_t chunk_scale_words = uint32_t(p.jobs[0].w.tiles.chunk_scale_words());
  const uint64_t weight_policy = weight_l2_policy(p.weight_evict_first);
  auto issue = [&](int stage, int64_t chunk) {
    const int64_t group = chunk * kChunkGroups + quad_col;
    if (chunk < n_chunks && group < p.n_groups) {
      const uint32_t g = uint32_t(group);
      const uint32_t c = uint32_t(chunk);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const DeviceWeight& w = weight(issue_job, mt);
        if constexpr (P::kTiled) {
          copy_tiled_mtile<F, MT>(w, mt, data_offset[mt], scale_offset[mt][0], c, chunk_scale_words,
                                  pieces(stage), scale_words(stage), lane, weight_policy);
        } else {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint8_t* src = w.data + data_offset[mt][h] + g * uint32_t(P::kWords * 4);
#pragma unroll
            for (int i = 0; i < P::kWords / 4; ++i) {
              cp_async_16_hint(&pieces(stage)[((mt * 2 + h) * (P::kWords / 4) + i) * 32 + lane],
                               src + 16 * i, weight_policy);
            }
            if constexpr (P::kScaleWords > 0) {
              const uint32_t si = (scale_offset[mt][h] + (g >> block_shift)) & ~1u;
              cp_async_4_hint(&scale_words(stage)[(mt * 2 + h) * 32 + lane], w.scales + si,
                              weight_policy);
            }
          }
        }
      }
    }
    cp_async_commit();  // one group per chunk, empty or not, keeps the wait counts uniform
  };
  auto consume = [&](int stage, int64_t chunk, Fragment<F, MT>& f) {
    const int64_t group = chunk * kChunkGroups + quad_col;
    const bool valid = group < p.n_groups;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if constexpr (P::kTiled) {
        read_tiled_mtile(pieces(stage), scale_words(stage), mt, lane, valid, f);
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int i = 0; i < P::kWords / 4; ++i) {
            // A lane past the last group copied nothing: zeros, never stale bytes.
            const uint4 v = valid ? pieces(stage)[((mt * 2 + h) * (P::kWords / 4) + i) * 32 + lane]
                                  : make_uint4(0, 0, 0, 0);
            f.words[mt][h][4 * i + 0] = v.x;
            f.words[mt][h][4 * i + 1] = v.y;
            f.words[mt][h][4 * i + 2] = v.z;
            f.words[mt][h][4 * i + 3] = v.w;
          }
          if constexpr (P::kScaleWords > 0) {
            const bool high = ((scale_offset[mt][h] + (uint32_t(group) >> block_shift)) & 1u) != 0;
            const uint32_t sw = valid ? scale_words(stage)[(mt * 2 + h) * 32 + lane] : 0u;
            f.scale[mt][h] = __half2half2(__ushort_as_half(uint16_t(high ? sw >> 16 : sw)));
          }
        }
      }
    }
  };
  // Activations (the B fragments) come from L1/L2 and are loaded one chunk ahead. From global
  // memory (no fused norm), a lane's rows of the input (token nt * 8 + quad_row, from its group
  // of chunk 0; null past n_tokens) are set once, so a chunk's loads are one offset from them
  // and immediates; the fused norm's shared-memory row keeps its per-load indexing (its 32-bit
  // addresses are cheaper than a generic pointer's, and ptxas spills more in those instances).
  const __half* b_rows[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int token = nt * 8 + quad_row;
    b_rows[nt] = !kNorm && token < p.n_tokens
                     ? p.x + token * p.x_stride + int64_t(quad_col) * kGroup
                     : nullptr;
  }
  // kInt8B: a lane's code row (bytes, one a column) and scale row (a __half2 a group) of each
  // token slot, from its group of chunk 0; null past n_tokens.
  const uint8_t* b8_rows[NT];
  const __half2* bs_rows[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int token = nt * 8 + quad_row;
    const bool live = kI8 && token < p.n_tokens;
    b8_rows[nt] = live ? p.xb.codes + token * p.x_stride + int64_t(quad_col) * kGroup : nullptr;
    bs_rows[nt] = live ? p.xb.scales + token * p.n_groups + quad_col : nullptr;
  }
  // kInt8B: r[nt][0..7] the 32 codes of the lane's group (word k: permuted columns 4k .. 4k + 3),
  // r[nt][8] its two half scales. Past n_tokens or the last group: codes 128 and scale 0, which
  // make +0 values as the fp16 path's zero fill.
  auto load_r = [&](int64_t chunk, uint32_t(&r)[NT][9]) {
    const int64_t group = chunk * kChunkGroups + quad_col;
    const bool valid = chunk < n_chunks && group < p.n_groups;
    const int64_t at = chunk * (kChunkGroups * kGroup);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (valid && b8_rows[nt] != nullptr) {
        const uint4 v0 = *reinterpret_cast<const uint4*>(b8_rows[nt] + at);
        const uint4 v1 = *reinterpret_cast<const uint4*>(b8_rows[nt] + at + 16);
        r[nt][0] = v0.x, r[nt][1] = v0.y, r[nt][2] = v0.z, r[nt][3] = v0.w;
        r[nt][4] = v1.x, r[nt][5] = v1.y, r[nt][6] = v1.z, r[nt][7] = v1.w;
        r[nt][8] = *reinterpret_cast<const uint32_t*>(bs_rows[nt] + chunk * kChunkGroups);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) r[nt][i] = 0x80808080u;
        r[nt][8] = 0u;
      }
    }
  };
  auto load_b = [&](int64_t chunk, uint32_t(&b)[NT][4][4]) {
    const int64_t group = chunk * kChunkGroups + quad_col;
    const bool valid = chunk < n_chunks && group < p.n_groups;
    const int64_t at = chunk * (kChunkGroups * kGroup);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int token = nt * 8 + quad_row;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const bool live = kNorm ? valid && token < p.n_tokens : valid && b_rows[nt] != nullptr;
        if (live) {
          const __half* src =
              kNorm ? xs + token * p.x_stride + group * kGroup + u * 8 : b_rows[nt] + at + u * 8;
          const uint4 v = *reinterpret_cast<const uint4*>(src);
          b[nt][u][0] = v.x;
          b[nt][u][1] = v.y;
          b[nt][u][2] = v.z;
          b[nt][u][3] = v.w;
        } else {
          b[nt][u][0] = b[nt][u][1] = b[nt][u][2] = b[nt][u][3] = 0;
        }
      }
    }
  };

  // The warp's chunks of a tile: warp, warp + kWarps, ... below n_chunks. The issue cursor walks
  // them tile after tile, one commit group per call whether it copies or not.
  const int per_tile = warp < n_chunks ? int((n_chunks - 1 - warp) / kWarps) + 1 : 0;
  int issue_iter = 0;  // the cursor's tile (of this block's) and its chunk slot
  int issue_slot = 0;
  if (!kPersistent || n_my_tiles > 0) set_issue_tile(tile0);
  auto issue_next = [&](int stage) {
    if constexpr (!kPersistent) {
      // One tile: issue() itself skips (and still commits) chunks past the end.
      issue(stage, warp + int64_t(issue_slot++) * kWarps);
    } else if (issue_iter < n_my_tiles && per_tile > 0) {
      issue(stage, warp + int64_t(issue_slot) * kWarps);
      if (++issue_slot == per_tile) {
        issue_slot = 0;
        if (++issue_iter < n_my_tiles) set_issue_tile(tile0 + issue_iter * tile_step);
      }
    } else {
      cp_async_commit();
    }
  };

  // The profile's slot, read back by thread 0 alone (its marks are thread 0's clock). An
  // instance of its own, so that the others' code is what it was without it.
  __shared__ int profile_slot;
  const bool profiled = kProfile && blockIdx.x == 0 && threadIdx.x == 0;
  auto mark = [&](int i) { g_gemv_profile[profile_slot].marks[i] = global_ns(); };
  if (profiled) {
    profile_slot = int(atomicAdd(&g_gemv_profile_count, 1ull) % kGemvProfileSlots);
    GemvProfileSlot& slot = g_gemv_profile[profile_slot];
    slot.rows = p.jobs[0].w.rows;
    slot.cols = p.jobs[0].w.cols;
    slot.n_tokens = p.n_tokens;
    slot.blocks = int(gridDim.x);
    slot.tiles = p.n_tiles;
    slot.block_tiles = n_my_tiles;
    mark(0);
  }
  // Weights depend on no earlier kernel: the whole ring is requested before the wait.
  if (p.early_trigger) pdl_trigger();
#pragma unroll
  for (int stage = 0; stage < P::kStages; ++stage) issue_next(stage);
  // The dp4a path's first tile (store mode): output thread e = threadIdx.x (row e / kDp, token
  // e % kDp: one output a thread, kRowsOut * kDp <= 64) loads its bias now, a weight, and its
  // residual's old value right after the wait, beside the input stage's loads, instead of each
  // being a round trip after the tile's sums (gemv_loads_in_epilogue: as later tiles do).
  constexpr bool kLoadsAhead = kDp > 0 && !kSwiglu;
  // The instances that can prepare the residual's next norm input (p.norm_out): one token, one
  // m-tile, a plain input (launch_format keeps such launches at one m-tile).
  constexpr bool kNormProducer = kDp == 1 && !kSwiglu && !kNorm && MT == 1;
  const bool loads_ahead =
      kLoadsAhead && !p.loads_in_epilogue && n_my_tiles > 0 && int(threadIdx.x) < 16 * MT * kDp;
  float first_bias = 0.0f, first_residual = 0.0f;
  float first_next_norm = 0.0f;  // p.norm_out.w of the first tile's row, a weight too
  int64_t first_at = -1;         // the output's index in y and the residual, -1 for none
  if (loads_ahead) {
    const TileAt at = locate(tile0);
    const GemvJob& out = p.jobs[at.job];
    const int64_t row = at.row_base + int(threadIdx.x) / (kDp > 0 ? kDp : 1);
    const int token = int(threadIdx.x) % (kDp > 0 ? kDp : 1);
    if (row < out.w.rows && token < p.n_tokens) {
      first_at = int64_t(token) * out.w.rows + row;
      if (out.w.bias != nullptr) first_bias = out.w.bias[row];
      if (kNormProducer && p.norm_out.w != nullptr) first_next_norm = p.norm_out.w[row];
    }
  }
  // The fused norm's weight: before the wait (norm_ahead), or after it. From the producer's half
  // groups (kHalves) only block 0 needs it, for the fp32 row it stores.
  float4 norm_w[kNorm ? kNormPerThread : 1];
  const bool needs_norm_w = kNorm && (!kHalves || blockIdx.x == 0);
  if constexpr (kNorm) {
    if (p.norm_ahead && needs_norm_w) load_norm_weight(p, norm_w);
  }
  pdl_wait();
  if (profiled) mark(1);
  if constexpr (kNorm) {
    if (!p.norm_ahead && needs_norm_w) load_norm_weight(p, norm_w);
  }
  if (loads_ahead && first_at >= 0) {
    const GemvJob& out = p.jobs[locate(tile0).job];
    if (out.residual != nullptr) first_residual = out.residual[first_at];
  }
  if constexpr (kHalves && kNorm) {
    copy_norm_halves(p, xq, xqp, norm_w);
  } else if constexpr (kHalves) {
    copy_half_groups(p, xq, xqp);
  } else {
    if constexpr (kNorm) normalize_input(p, xs, norm_w);
    if constexpr (kDp > 0) quantize_input<kDp>(kNorm ? xs : p.x, p, xq, xqp);
  }
  if (profiled) mark(2);
  // dp4a mode: the warps' row sums of a tile meet here, after the input stage.
  float* dp_sums =
      reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(xqp) +
                               kDp * p.n_groups * (kHalves ? 2 : 1) * int64_t(sizeof(int2)));
  int stage = 0;
  for (int iter = 0; iter < n_my_tiles; ++iter) {
    if (profiled && iter == 1) mark(5);
    const TileAt at = locate(tile0 + iter * tile_step);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;
    // dp4a mode: per lane, rows (mt, h) x tokens, over the lane's groups only.
    float dacc[MT][2][kDp > 0 ? kDp : 1];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int t = 0; t < (kDp > 0 ? kDp : 1); ++t) dacc[mt][h][t] = 0.0f;
    uint32_t b_cur[NT][4][4];
    uint32_t r_cur[kI8 ? NT : 1][9];
    uint32_t r_ahead[kInt8B == 2 ? NT : 1][9];  // two ahead: the next chunk's, loaded before
    if constexpr (kI8) {
      load_r(warp, r_cur);
      if constexpr (kInt8B == 2) load_r(warp + kWarps, r_ahead);
    } else if constexpr (kDp == 0) {
      load_b(warp, b_cur);
    }
    for (int64_t chunk = warp; chunk < n_chunks; chunk += kWarps) {
      uint32_t b_next[NT][4][4];
      uint32_t r_next[kI8 ? NT : 1][9];
      if constexpr (kI8) {
        load_r(chunk + kInt8B * kWarps, r_next);
      } else if constexpr (kDp == 0) {
        load_b(chunk + kWarps, b_next);
      }
      cp_async_wait<P::kStages - 1>();
      if (profiled && iter == 0 && chunk == warp) mark(3);  // thread 0's first chunk landed
      Fragment<F, MT> f;
      consume(stage, chunk, f);
      if constexpr (kDp > 0) {
        // 8 weights per dp4a pair: the low nibbles of word u are weights 4u .. 4u + 3, the high
        // nibbles 16 + 4u .. 19 + 4u, matching words u and 4 + u of the natural-order input.
        const int64_t group = chunk * kChunkGroups + quad_col;
        if (group < p.n_groups) {
#pragma unroll
          for (int t = 0; t < kDp; ++t) {
            const uint4* x4 = reinterpret_cast<const uint4*>(xq) +
                              (int64_t(t) * p.x_stride + group * kGroup) / 16;
            const uint4 xa = x4[0];
            const uint4 xb = x4[1];
            const uint32_t xw[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
            if constexpr (kHalves) {
              // Columns 0-15 of the group (the low nibbles) and 16-31 (the high ones), each
              // half with its own {scale, sum}.
              const int4 qh = reinterpret_cast<const int4*>(xqp)[group];
              const float sx_lo = __int_as_float(qh.x);
              const float sx_hi = __int_as_float(qh.z);
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                  const int2 sums = dp4a_halves(f.words[mt][h], xw);
                  const int s_lo = sums.x, s_hi = sums.y;
                  const float d = __low2float(f.scale[mt][h]);
                  if constexpr (F == WeightFormat::sym_int4) {
                    dacc[mt][h][0] +=
                        float(s_lo - 8 * qh.y) * (d * sx_lo) + float(s_hi - 8 * qh.w) * (d * sx_hi);
                  } else {
                    const float m = __low2float(f.min[mt][h]);
                    dacc[mt][h][0] += sx_lo * (d * float(s_lo) + m * float(qh.y)) +
                                      sx_hi * (d * float(s_hi) + m * float(qh.w));
                  }
                }
              }
              continue;
            }
            const int2 qp = xqp[int64_t(t) * p.n_groups + group];
            const float sx = __int_as_float(qp.x);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                int s = 0;
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                  const uint32_t w = f.words[mt][h][u];
                  s = __dp4a(int(w & 0x0f0f0f0fu), int(xw[u]), s);
                  s = __dp4a(int((w >> 4) & 0x0f0f0f0fu), int(xw[4 + u]), s);
                }
                const float d = __low2float(f.scale[mt][h]);
                if constexpr (F == WeightFormat::sym_int4) {
                  dacc[mt][h][t] += float(s - 8 * qp.y) * (d * sx);
                } else {
                  dacc[mt][h][t] += sx * (d * float(s) + __low2float(f.min[mt][h]) * float(qp.y));
                }
              }
            }
          }
        }
      } else {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          uint32_t a[MT][2][4];
          a_fragments(f, u, a);
          if constexpr (kI8) {
            // Word 2u holds the permuted columns 8u .. 8u + 3 (half 0), word 2u + 1 the next
            // four (half 1): two columns a byte permute into 1024 + code, less 1152, times the
            // half's scale, exact but for the multiply's one rounding.
            const __half2 bias = __half2half2(__ushort_as_half(0x6480));  // 1152
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              const __half2 sc = bits_half2(r_cur[nt][8]);
              const __half2 s[2] = {__low2half2(sc), __high2half2(sc)};
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                const uint32_t pair = __byte_perm(r_cur[nt][2 * u + i / 2], 0x64646464u,
                                                  i % 2 == 0 ? 0x4140u : 0x4342u);
                // _rn: each its own rounding, never contracted into one (the fp16 shadow's
                // value is the product's rounding alone).
                b_cur[nt][u][i] =
                    half2_bits(__hmul2_rn(__hsub2_rn(bits_half2(pair), bias), s[i / 2]));
              }
            }
          }
          // Consecutive mmas go to different accumulators, so none waits on the one before.
#pragma unroll
          for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
              for (int nt = 0; nt < NT; ++nt)
                mma_16816(acc[mt][nt], a[mt][half], b_cur[nt][u][2 * half],
                          b_cur[nt][u][2 * half + 1]);
        }
      }
      // The stage's bytes are in registers now; refill it with the chunk kStages ahead.
      issue_next(stage);
      stage = stage + 1 == P::kStages ? 0 : stage + 1;
      if constexpr (kInt8B == 2) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 9; ++i) r_cur[nt][i] = r_ahead[nt][i], r_ahead[nt][i] = r_next[nt][i];
      } else if constexpr (kI8) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 9; ++i) r_cur[nt][i] = r_next[nt][i];
      } else if constexpr (kDp == 0) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int u = 0; u < 4; ++u)
#pragma unroll
            for (int i = 0; i < 4; ++i) b_cur[nt][u][i] = b_next[nt][u][i];
      }
    }
    if (profiled && iter == 0) mark(4);  // thread 0's chunks of the first tile multiplied
    if constexpr (kDp > 0) {
      // The quad's four lanes hold the same rows over different groups: their sums meet by
      // shuffles, lane quad_col == 0 posts them, and after the barrier each output sums the
      // warps in order. The ring keeps streaming the next tile meanwhile.
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int t = 0; t < kDp; ++t) {
            float v = dacc[mt][h][t];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            if (quad_col == 0) dp_sums[(((warp * MT + mt) * 2 + h) * kDp + t) * 8 + quad_row] = v;
          }
        }
      }
      if (!p.early_trigger && iter + 1 == n_my_tiles) pdl_trigger();
      __syncthreads();
      constexpr int kRowsOut = kSwiglu ? 16 : 16 * MT;
      // Output e is token e % kDp of row e / kDp.
      auto store_sum = [&](int e, float sum) {
        if (loads_ahead && iter == 0) {
          return store_output_loaded(p, at.job, at.row_base + e / kDp, e % kDp, sum, first_bias,
                                     first_residual);
        }
        return store_output(p, at.job, at.row_base + e / kDp, e % kDp, sum);
      };
      static_assert(16 * 2 * 2 <= kThreads, "the dp4a path's tile is one output a thread");
      float gate_value = 0.0f;    // swiglu, one token: thread r's gate value as its shadow holds it
      float new_residual = 0.0f;  // store, one token: thread r's residual after its add
      for (int e = threadIdx.x; e < kRowsOut * kDp; e += kThreads) {
        const int t = e % kDp;
        const int r = e / kDp;
        const int h = (r & 15) >> 3;
        auto warp_sum_of = [&](int mt) {
          float sum = 0.0f;
#pragma unroll
          for (int wp = 0; wp < kWarps; ++wp) {
            sum += dp_sums[(((wp * MT + mt) * 2 + h) * kDp + t) * 8 + (r & 7)];
          }
          return sum;
        };
        if constexpr (kSwiglu) {
          gate_value = store_swiglu_output(p, at.row_base + r, t, warp_sum_of(0), warp_sum_of(1));
        } else {
          new_residual = store_sum(e, warp_sum_of(r >> 4));
        }
      }
      if constexpr (kNormProducer) {
        // The residual's next norm input (NormHalvesOut): the tile's 16 rows are a half group,
        // lanes 0-15 of warp 0: the new residual times the norm's weight, quantized, and the
        // rows' sum of squares.
        if (p.norm_out.out.q != nullptr && threadIdx.x < 16) {
          const int64_t row = at.row_base + int(threadIdx.x);
          const float g = loads_ahead && iter == 0      ? first_next_norm
                          : row < p.jobs[at.job].w.rows ? p.norm_out.w[row]
                                                        : 0.0f;
          const int64_t half = at.row_base / 16;
          int2 scale_sum;
          const int q = quantize_half16(new_residual * g, scale_sum);
          store_half16(p.norm_out.out, half, int(threadIdx.x), q, scale_sum);
          const float sq = run_sum<16>(new_residual * new_residual);
          if (threadIdx.x == 0) p.norm_out.ss[half] = sq;
        }
      }
      if constexpr (kSwiglu && kDp == 1) {
        // The tile's 16 gate rows are one half group of the down GEMV's input: threads 0-15
        // quantize it for that GEMV (HalfGroupOut), so its blocks copy it instead.
        if (p.shadow.halves.q != nullptr && threadIdx.x < 16) {
          int2 scale_sum;
          const int q = quantize_half16(gate_value, scale_sum);
          store_half16(p.shadow.halves, at.row_base / 16, int(threadIdx.x), q, scale_sum);
        }
      }
      __syncthreads();  // dp_sums is the next tile's
      continue;
    }
    // The mma path: the warps' accumulators meet in shared memory. A persistent block's own
    // buffer follows the pipeline, whose ring streams on into the next tile meanwhile; a block
    // a tile (fp16, int8) reuses the drained pipeline's memory.
    if constexpr (!kPersistent) cp_async_wait<0>();
    if constexpr (!kPersistent) __syncthreads();
    if (!p.early_trigger && iter + 1 == n_my_tiles) pdl_trigger();

    constexpr int kValues = MT * NT * 4;
    auto partial = reinterpret_cast<float(*)[kValues][32]>(
        smem +
        (kPersistent ? P::kBytes + (kNorm ? 2 * p.x_stride : 0) : 0));  // [kWarps][kValues][32]
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) partial[warp][(mt * NT + nt) * 4 + i][lane] = acc[mt][nt][i];
    __syncthreads();
    // A lane's accumulator (i) holds tokens 2 (l % 4) + i % 2 of rows l / 4 + 8 (i / 2).
    if constexpr (kSwiglu) {
      // kInt8B: w_down's input as int8 half groups too (p.shadow.tokens; gemv_launch checks that
      // gate's rows are whole groups): the tile's 16 gate rows are one half of a group for each
      // token.
      // (With NT == 2, as every kInt8B instance, each thread takes one (row, token).)
      const bool tokens_out = kI8 && p.shadow.tokens.codes != nullptr;
      float gate_value = 0.0f;
      int gate_r = 0, gate_token = 0;
      for (int e = threadIdx.x; e < NT * 4 * 32; e += kThreads) {
        const int l = e & 31;
        const int idx = e >> 5;  // (nt, i) of the gate tile; the up tile follows at + NT * 4
        float g = 0.0f, u = 0.0f;
#pragma unroll
        for (int wp = 0; wp < kWarps; ++wp) {
          g += partial[wp][idx][l];
          u += partial[wp][NT * 4 + idx][l];
        }
        const int i = idx & 3;
        gate_r = (l >> 2) + (i >= 2 ? 8 : 0);
        gate_token = (idx >> 2) * 8 + (l & 3) * 2 + (i & 1);
        gate_value = store_swiglu_output(p, at.row_base + gate_r, gate_token, g, u, !tokens_out);
      }
      if (tokens_out) {
        store_swiglu_tokens(p, at.row_base, gate_r, gate_token, gate_value, &partial[0][0][0]);
      }
    } else {
      // Output e is lane l = e % 32's accumulator (mt, nt, i) = e / 32.
      auto store_sum = [&](int e, float sum) {
        const int l = e & 31;
        const int idx = e >> 5;
        const int i = idx & 3;
        const int nt = (idx >> 2) % NT;
        const int mt = (idx >> 2) / NT;
        store_output(p, at.job, at.row_base + mt * 16 + (l >> 2) + (i >= 2 ? 8 : 0),
                     nt * 8 + (l & 3) * 2 + (i & 1), sum);
      };
      for (int e = threadIdx.x; e < kValues * 32; e += kThreads) {
        float sum = 0.0f;
#pragma unroll
        for (int wp = 0; wp < kWarps; ++wp) sum += partial[wp][e >> 5][e & 31];
        store_sum(e, sum);
      }
    }
    if constexpr (kPersistent) __syncthreads();  // `partial` is the next tile's
  }                                              // tiles
  if constexpr (kSwiglu) zero_swiglu_shadow_pad(p);
  if (profiled) {
    if (n_my_tiles < 1) {
      mark(3);
      mark(4);
    }
    if (n_my_tiles < 2) mark(5);
    mark(6);
  }
}

// The row-warp GEMV (int4 tiled weights, 3-16 tokens, the mma path's arithmetic): where the
// weight has enough rows, a block's four warps each own 32 rows (swiglu: the same 16 rows of gate
// and of up) over every column, instead of eight warps sharing 32 rows by columns. All four warps
// multiply the same 128-column chunk of the input at a time, so the block stages it once a chunk
// in shared memory (cp.async, a ring beside the warps' weight rings) for all of them, and a warp's
// sums are complete at the end of its rows: no exchange between warps and no per-tile setup.
// That is 1/4 of the input traffic from L2 of the column-split kernel at 16 tokens (128 rows per
// pass over the input instead of 32), no double-buffer moves and no exchange. Its chunk loop is
// not shorter for it: the swizzled input and copy addresses computed every chunk make it 538 PTX
// instructions for 32 mma against the column-split kernel's 413 (nvcc -ptx, 2026-12-04; no SASS
// count yet). A unit is the block's 128 rows (swiglu: 64
// output rows) of one job; launches are persistent, blocks looping over units with both rings
// streaming on across unit boundaries. Its blocks are four warps, so it needs a wave of units
// to keep an SM as busy as the column-split kernel: by default it takes the lm_heads only
// (launch_format).
//
// The input stage of a chunk is [group c][token t][quarter u] 16-byte units (the permuted
// layout's eight values u of group c), unit (c, t, u) at c * 32 NT + t * 4 + (u ^ c): a quarter
// warp's reads (tokens 2q, 2q + 1, groups 0-3, one u) then hit eight different 16-byte bank
// groups. Tokens past n_tokens are zero-filled. One barrier a chunk: after it every thread's
// copies of the chunk have landed and every warp is done with the stage the next copy refills.
constexpr int kRowWarps = 4;
constexpr int kRowThreads = kRowWarps * 32;
constexpr int kRowStages = 4;  // ring stages; copies run kRowStages - 1 chunks ahead
// Blocks an SM holds (the launch bound; 53 KB of shared memory a block at 16 tokens).
constexpr int kRowBlocksPerSm = 4;

template <WeightFormat F, int NT, bool kSwiglu>
__global__ void __launch_bounds__(kRowThreads, kRowBlocksPerSm)
    gemv_rows_kernel(const __grid_constant__ GemvParams p) {
  static_assert(F == WeightFormat::sym_int4 || F == WeightFormat::asym_int4, "tiled int4 only");
  constexpr int MT = 2;
  using P = Pipe<F, MT>;
  constexpr int kXUnits = kChunkGroups * NT * 8 * 4;  // 16-byte units of a chunk's input
  constexpr int kRowsPerUnit = kSwiglu ? kRowWarps * 16 : kRowWarps * 32;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int quad_row = lane >> 2;
  const int quad_col = lane & 3;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* pipe = smem + warp * kRowStages * P::kWarpStageBytes;
  uint4* xring = reinterpret_cast<uint4*>(smem + kRowWarps * kRowStages * P::kWarpStageBytes);
  auto pieces = [&](int stage) {  // [kPieces][32 lanes] uint4
    return reinterpret_cast<uint4*>(pipe + stage * P::kWarpStageBytes);
  };
  auto scale_words = [&](int stage) {  // [kScaleWords][32 lanes] uint32
    return reinterpret_cast<uint32_t*>(pipe + stage * P::kWarpStageBytes + P::kPieces * 16 * 32);
  };
  const int n_chunks = int(p.n_groups / kChunkGroups);  // the launcher checks n_groups % 4 == 0
  const int n_units = p.n_tiles;
  const int n_my_units =
      int(blockIdx.x) < n_units ? (n_units - 1 - int(blockIdx.x)) / int(gridDim.x) + 1 : 0;
  struct UnitAt {
    int job;
    int64_t row_base;  // the block's first row (swiglu: output row)
  };
  auto locate = [&](int unit) {
    int job = 0;
    if constexpr (!kSwiglu) {
#pragma unroll
      for (int j = 1; j < kMaxGemvJobs; ++j) {
        if (j < p.n_jobs && unit >= p.first_tile[j]) job = j;
      }
    }
    return UnitAt{job, int64_t(unit - p.first_tile[job]) * kRowsPerUnit};
  };
  auto weight = [&](int job, int mt) -> const DeviceWeight& {
    return kSwiglu ? p.jobs[mt].w : p.jobs[job].w;
  };
  const int block_shift = p.jobs[0].w.block == 64 ? 1 : 0;
  const uint32_t chunk_scale_words = uint32_t(p.jobs[0].w.tiles.chunk_scale_words());
  const uint64_t weight_policy = weight_l2_policy(p.weight_evict_first);
  // The issue cursor: its unit (of this block's), chunk, and the warp's offsets in that unit.
  int issue_iter = 0, issue_chunk = 0, issue_job = 0;
  uint32_t data_offset[MT][2];
  uint32_t scale_offset[MT];
  auto set_issue_unit = [&](int unit) {
    const UnitAt at = locate(unit);
    issue_job = at.job;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int64_t first_row = at.row_base + (kSwiglu ? warp * 16 : warp * 32 + mt * 16);
      tiled_offsets(weight(at.job, mt), first_row, lane, block_shift, data_offset[mt],
                    scale_offset[mt]);
    }
  };
  auto issue_weights = [&](int stage) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      copy_tiled_mtile<F, MT>(weight(issue_job, mt), mt, data_offset[mt], scale_offset[mt],
                              uint32_t(issue_chunk), chunk_scale_words, pieces(stage),
                              scale_words(stage), lane, weight_policy);
    }
  };
  auto issue_input = [&](int stage) {
    const __half* x = p.x + int64_t(issue_chunk) * kChunkGroups * kGroup;
#pragma unroll
    for (int i = tid; i < kXUnits; i += kRowThreads) {
      const int c = i / (NT * 32);
      const int t = (i / 4) % (NT * 8);
      const int u = i % 4;
      const bool live = t < p.n_tokens;
      cp_async(&xring[stage * kXUnits + c * NT * 32 + t * 4 + (u ^ c)],
               x + (live ? int64_t(t) * p.x_stride + c * kGroup + u * 8 : 0), 16, live);
    }
  };
  auto advance = [&]() {  // the cursor to the next chunk, into the block's next unit
    if (++issue_chunk == n_chunks) {
      issue_chunk = 0;
      if (++issue_iter < n_my_units) set_issue_unit(int(blockIdx.x) + issue_iter * int(gridDim.x));
    }
  };
  if (n_my_units > 0) set_issue_unit(int(blockIdx.x));

  // Weights depend on no earlier kernel: the first chunks' weights are requested before the
  // wait, their inputs after it (one group each, so chunk k's are landed at wait_group 1 below
  // in every iteration but the first few, which wait for a little more).
  if (p.early_trigger) pdl_trigger();
  constexpr int kAhead = kRowStages - 1;
  const int total = n_my_units * n_chunks;  // chunks this block multiplies
  for (int k = 0; k < kAhead; ++k) {
    if (k < total) issue_weights(k);
    cp_async_commit();
    if (k < total) advance();
  }
  pdl_wait();
  issue_iter = 0;  // the input copies walk the same chunks (they need no unit offsets)
  issue_chunk = 0;
  for (int k = 0; k < kAhead; ++k) {
    if (k < total) {
      issue_input(k);
      advance();
    }
    cp_async_commit();
  }
  // advance() ran as often again: the cursor (and its unit's offsets) is where the weight copies
  // left it.

  int k = 0;  // the block's chunk counter, over its units
  for (int iter = 0; iter < n_my_units; ++iter) {
    const UnitAt at = locate(int(blockIdx.x) + iter * int(gridDim.x));
    float acc[MT][NT][4] = {};
    for (int chunk = 0; chunk < n_chunks; ++chunk, ++k) {
      cp_async_wait<kAhead - 1>();
      __syncthreads();  // chunk k's input landed for all; every warp is done with chunk k - 1
      {                 // refill chunk k - 1's stage with chunk k + kAhead
        const int refill = k + kAhead;
        const int stage = refill % kRowStages;
        if (refill < total) {
          issue_weights(stage);
          issue_input(stage);
          advance();
        }
        cp_async_commit();
      }
      const int stage = k % kRowStages;
      Fragment<F, MT> f;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        read_tiled_mtile(pieces(stage), scale_words(stage), mt, lane, /*valid=*/true, f);
      }
      const uint4* xs = xring + stage * kXUnits + quad_col * NT * 32;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        uint32_t a[MT][2][4];
        a_fragments(f, u, a);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint4 b = xs[(nt * 8 + quad_row) * 4 + (u ^ quad_col)];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816(acc[mt][nt], a[mt][0], b.x, b.y);
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816(acc[mt][nt], a[mt][1], b.z, b.w);
          }
        }
      }
    }
    if (!p.early_trigger && iter + 1 == n_my_units) pdl_trigger();
      // A lane's accumulator (i) holds tokens 2 (l % 4) + i % 2 of rows l / 4 + 8 (i / 2).
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int token = nt * 8 + quad_col * 2 + (i & 1);
        const int r = quad_row + (i >= 2 ? 8 : 0);
        if constexpr (kSwiglu) {
          store_swiglu_output(p, at.row_base + warp * 16 + r, token, acc[0][nt][i], acc[1][nt][i]);
        } else {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            store_output(p, at.job, at.row_base + warp * 32 + mt * 16 + r, token, acc[mt][nt][i]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  if constexpr (kSwiglu) zero_swiglu_shadow_pad(p);
}

// Bytes of the dp4a input stage for `kDp` tokens of `cols` columns (int8 values, then one
// {scale, sum} pair per group).
constexpr int64_t dp_input_bytes(int kDp, int64_t cols, bool halves = false) {
  return kDp * (cols + cols / kGroup * (halves ? 2 : 1) * int64_t(sizeof(int2)));
}

// Bytes of the dp4a path's per-tile exchange of warp sums (dp_sums in the kernel).
constexpr int dp_sums_bytes(int kDp, int MT) {
  return kWarps * MT * 2 * kDp * 8 * int(sizeof(float));
}

int block_cap = 0;  // set_gemv_block_cap

// Whether deep_ring may choose the deep ring (set_gemv_deep_ring): the default since the
// twenty-seventh session's H100 measurement (tg128 at batch 1: 1.5B +2.0% in both rounds, its
// w_down 5.18 -> 4.45 us after the wait; the 8B has no such weight);
// KESTREL_CUDA_GEMV_DEEP_RING=0 at start-up turns it off.
std::atomic<bool>& gemv_deep_ring_flag() {
  static std::atomic<bool> on{!env_is("KESTREL_CUDA_GEMV_DEEP_RING", "0")};
  return on;
}

// Whether deep_ring may choose the deep ring for two tokens too (set_gemv_deep_ring_two): the
// default since the thirty-eighth session's H100 measurement (PERF.md). The 1.5B's w_down alone
// took 5.3 us at one token (the deep ring), 9.2 at two (the two-token dp4a instance, five chunks
// a warp ahead of the wait) and 7.7 at four (the mma path); the deep ring brought two tokens to
// 7.05 us, and tg128 at batch 2 +4.4% and +4.1% in two calls (2060 -> 2151, 2066 -> 2150 tok/s;
// the 8B has no such weight). KESTREL_CUDA_GEMV_DEEP_RING_TWO=0 at start-up turns it off.
std::atomic<bool>& gemv_deep_ring_two_flag() {
  static std::atomic<bool> on{!env_is("KESTREL_CUDA_GEMV_DEEP_RING_TWO", "0")};
  return on;
}

// Whether a one-token dp4a GEMV of one-m-tile tiles (two tokens under set_gemv_deep_ring_two)
// takes the deep ring (Ring::deep): where the tiles are no more than the SMs, so every block has
// one tile and the SM to itself once the kernel before it leaves, and a warp's chunks of a tile
// outnumber the default ring's stages but fit the deep one's (the 1.5B's w_down: 96 tiles of 70
// chunks, 9 a warp; a wider tile, which the deep ring would not hold, was not measured and keeps
// the default). The deep ring requests the whole tile before the wait, where the default one
// requests five chunks a warp and the rest after it (the twenty-sixth session's profile: 4.35 us
// of that GEMV's 5.22 after the wait were its first tile, at 1484 GB/s).
// Counts the launches it chooses (gemv_deep_ring_launches).
std::atomic<uint64_t> deep_ring_launches{0};

// Whether a launch takes a switch's choice: the switch is on and the launch qualifies (fits);
// counts the launches that take it (the gemv_*_launches the tests read).
bool take_switch(const std::atomic<bool>& on, std::atomic<uint64_t>& taken, bool fits = true) {
  if (!fits || !on.load(std::memory_order_relaxed)) return false;
  taken.fetch_add(1, std::memory_order_relaxed);
  return true;
}

template <WeightFormat F>
bool deep_ring(const GemvParams& p) {
  const int64_t per_warp = ceil_div(ceil_div(p.n_groups, kChunkGroups), kWarps);
  return take_switch(
      p.n_tokens == 1 ? gemv_deep_ring_flag() : gemv_deep_ring_two_flag(), deep_ring_launches,
      p.n_tiles <= p.sm_count && per_warp > Pipe<F, 1>::kStages && per_warp <= kDeepStages);
}

// Whether the two-m-tile int4 mma GEMVs (3-64 tokens, and 1-2 over more than kMaxDpCols columns:
// the 8B's batch-16 q/k/v, wo, gate/up and w_down, the 1.5B's batch-16 gate/up) take the two-stage
// ring (Ring::shallow; set_gemv_shallow_ring; the default since the thirty-first session,
// KESTREL_CUDA_GEMV_SHALLOW_RING=0 at start-up gives the three stages). They read their activations
// through L1 (hit 39-58% in the thirtieth session's Nsight rows, H100, at the driver's 164 KB split
// for their 70 KiB blocks at 16 tokens); 52 KiB blocks at two blocks an SM (the launch bound's) fit
// the 132 KB split, which the driver gives the 1.5B's 53 KiB one-m-tile blocks (Nsight,
// thirty-first session), and whose ~124 KB of L1 hold nearly the 8B's whole 16-token activation at
// 4096 columns (128 KiB): the reason it was built; Nsight has not yet shown the L1 hits rise
// (PERF.md, thirty-first session, for the other readings). H100, tg128 at batch 16, two rounds of
// one call: 8B +3.2% and +3.8%, 1.5B +1.2% and +1.2%, batch 1 unchanged (its GEMVs are dp4a
// instances); at 1024 positions the 8B's batch-16 step 3.81 -> 3.74 ms. Counts the launches it
// takes (gemv_shallow_ring_launches).
std::atomic<bool>& gemv_shallow_ring_flag() {
  static std::atomic<bool> on{!env_is("KESTREL_CUDA_GEMV_SHALLOW_RING", "0")};
  return on;
}
std::atomic<uint64_t> shallow_ring_launches{0};

bool shallow_ring() {
  return take_switch(gemv_shallow_ring_flag(), shallow_ring_launches);
}

// Whether a GEMV of 3-8 tokens (one n-tile) takes two m-tiles down to half a wave of 32-row
// blocks, as past 8 tokens, instead of only from two waves on (set_gemv_few_tokens_two_mtiles;
// the default since the fortieth session, KESTREL_CUDA_GEMV_FEW_TOKENS_MT2=0 at start-up gives
// the two-wave rule). The 8B's q/k/v (192 such blocks at 132 SMs), wo and w_down (128) take two
// m-tiles at 3-8 tokens; the 1.5B's (48-64 blocks) do not. In the step (H100, one call, tg128):
// 8B batch 4 1711.6 -> 1784.3 tok/s (+4.2%), batch 8 3205.8 -> 3423.7 (+6.8%); the 1.5B, batch
// 1 and batch 16 unchanged. Alone on an H100 (PERF.md, thirty-eighth session) the 8B's q/k/v
// took 10.85 / 12.19 us at 4 / 8 tokens with one m-tile and 10.47 at 16 with two; wo 7.28 / 7.78
// and 8.37, w_down 15.49 / 16.42 and 21.70. The same arithmetic in the same order (a row's
// m-tile is the same mma on the same fragments whichever tile holds it): the same bits. Counts
// the launches it takes (gemv_few_tokens_two_mtiles_launches).
std::atomic<bool>& gemv_few_tokens_two_mtiles_flag() {
  static std::atomic<bool> on{!env_is("KESTREL_CUDA_GEMV_FEW_TOKENS_MT2", "0")};
  return on;
}
std::atomic<uint64_t> few_tokens_two_mtiles_launches{0};

// Launches that read a TokenHalfGroups input (the kInt8B instances; gemv_int8_activation_launches).
std::atomic<uint64_t> int8_activation_launches{0};

// How many chunks ahead those instances load their codes: 1 (the default, as the fp16
// fragments) or 2 (KESTREL_CUDA_GEMV_INT8_AHEAD=2 at start-up, set_gemv_int8_ahead; 18 more
// registers). The same arithmetic: the same bits. Two ahead tests the reading that the batch-16
// loop waits on its activation loads' latency (PERF.md, fortieth session), one ahead what the
// halved bytes give alone.
std::atomic<int>& gemv_int8_ahead_flag() {
  static std::atomic<int> depth{env_int("KESTREL_CUDA_GEMV_INT8_AHEAD", 1) == 2 ? 2 : 1};
  return depth;
}

bool few_tokens_two_mtiles(int64_t n_tokens, int blocks32, int sm_count) {
  return take_switch(
      gemv_few_tokens_two_mtiles_flag(), few_tokens_two_mtiles_launches,
      n_tokens >= 3 && n_tokens <= 8 && blocks32 < 2 * sm_count && 2 * blocks32 >= sm_count);
}

// Whether every GEMV's weight copies carry the L2 policy evict_first (weight_l2_policy,
// common.cuh; set_gemv_weight_evict_first; the default since the thirty-fifth session,
// KESTREL_CUDA_WEIGHT_EVICT_FIRST=0 at start-up gives the normal priority, that of a copy without a
// hint). A decode step streams each weight once, ~110 MB a layer of the 8B through a 50-60 MB L2,
// and with the normal priority that stream replaces everything else between two uses: the
// activations and half groups a GEMV reads after its wait, the norms' weights, the KV cache, the
// partial sums and the code of the step's kernels. H100, two rounds of one call, tg128: 8B +3.3%
// at batch 1 and +4.0% at 16, 1.5B -0.5% (-1.3 and +0.3) and +1.2%; at 1024 positions the 8B's
// step 2.03 -> 1.96 ms (batch 1) and 3.74 -> 3.69 ms (16); 8192 positions unchanged. The
// timelines put the batch-1 gain in the fused-norm gate/up GEMV (25.0 -> 23.7 us a layer) and the
// batch-16 one in the norms, gate/up, wo and w_down (PERF.md, thirty-fifth session). Only the
// cache's choice of victims differs: the same bits. Counts the launches that take it
// (gemv_weight_evict_first_launches).
std::atomic<bool>& gemv_weight_evict_first_flag() {
  static std::atomic<bool> on{!env_is("KESTREL_CUDA_WEIGHT_EVICT_FIRST", "0")};
  return on;
}
std::atomic<uint64_t> weight_evict_first_launches{0};

// Whether the fp16 and sym_int8 fused-norm instances (one token, the mma path) take the launch
// bound of two blocks an SM (set_gemv_norm_two_blocks; on by default since the thirtieth session,
// KESTREL_CUDA_GEMV_NORM_TWO_BLOCKS=0 at start-up gives the old three). Under three blocks an SM
// (80 registers) their chunk loops spill (the twenty-ninth session's local SASS count: 4-22 LDL
// and 4-15 STL a loop); two give them 128 registers and no spills. Their shared memory (a
// review's count from Pipe's sizes) already holds most of them to two blocks an SM or one (fp16
// gate/up), so the third block the old bound provided for rarely ran: only the 1.5B's sym_int8
// gate/up and lm_head fit three. H100, same call, tg128 b1: fp16 8B 108.43 -> 109.90, 1.5B
// 412.78 -> 417.13; sym_int8 8B 174.79 -> 186.02, 1.5B 591.43 -> 615.36 tok/s. Counts the
// launches it takes (gemv_norm_two_blocks_launches).
std::atomic<bool>& gemv_norm_two_blocks_flag() {
  static std::atomic<bool> on{!env_is("KESTREL_CUDA_GEMV_NORM_TWO_BLOCKS", "0")};
  return on;
}
std::atomic<uint64_t> norm_two_blocks_launches{0};

bool norm_two_blocks() {
  return take_switch(gemv_norm_two_blocks_flag(), norm_two_blocks_launches);
}

// Whether int4 launches are persistent (a wave of blocks looping over the row tiles) or a block
// a tile. KESTREL_CUDA_GEMV_PERSISTENT, a measurement aid: 1 (the default) both paths, 2 the
// dp4a path only (the eighth session's default), 0 neither.
bool launch_persistent(bool dp4a) {
  static const int mode = [] {
    const char* env = std::getenv("KESTREL_CUDA_GEMV_PERSISTENT");
    const std::string v = env != nullptr ? env : "";
    return v == "0" ? 0 : v == "2" ? 2 : 1;  // anything else: the default
  }();
  return mode == 1 || (mode == 2 && dp4a);
}

// Launches the kernel over p.n_tiles row tiles. int4 weights (both paths) take as many blocks as
// fit on the device at once, each looping over tiles: the weight ring streams on across tile
// boundaries instead of filling and draining once a tile, and the dp4a path's input stage
// (each block quantizes the whole input) runs once a block. fp16 and int8 take a block a tile.
template <WeightFormat F, int MT, int NT, bool kSwiglu, bool kNorm, int kDp, bool kProfile = false,
          bool kHalves = false, Ring kRing = Ring::standard, bool kWide = false, int kInt8B = 0>
Status launch_kernel(const GemvParams& p, cudaStream_t stream) {
  using P = Pipe<F, MT, kRing>;
  constexpr int kReduceBytes = kWarps * MT * NT * 4 * 32 * int(sizeof(float));
  constexpr int kPipeBytes = P::kBytes;
  constexpr int kSumBytes = kDp > 0 ? dp_sums_bytes(kDp, MT) : 0;
  constexpr bool kShadowRow = kNorm && !kHalves;  // the kernel's xs (none from half groups)
  constexpr int kMaxInputBytes = (kShadowRow ? int(kMaxNormInputCols * sizeof(__half)) : 0) +
                                 int(dp_input_bytes(kDp, kMaxDpCols, kHalves)) + kSumBytes;
  constexpr int kMaxSmem = kPipeBytes + kMaxInputBytes + kReduceBytes;
  const int input_bytes = (kShadowRow ? int(p.x_stride * int64_t(sizeof(__half))) : 0) +
                          int(dp_input_bytes(kDp, p.x_stride, kHalves)) + kSumBytes;
  // A persistent mma-path block keeps its warps' exchange apart from the ring, which streams on.
  constexpr bool kOwnReduce = P::kTiled && kDp == 0;
  const int smem = kOwnReduce ? kPipeBytes + input_bytes + kReduceBytes
                              : std::max(kPipeBytes + input_bytes, kReduceBytes);
  auto kernel =
      gemv_kernel<F, MT, NT, kSwiglu, kNorm, kDp, kProfile, kHalves, kRing, kWide, kInt8B>;
  static std::atomic<uint64_t> limit_set{0};  // devices, once per instantiation
  KS_CUDA_CHECK("matmul",
                set_smem_limit_once(reinterpret_cast<const void*>(kernel), kMaxSmem, limit_set));
  int blocks = p.n_tiles;
  if (P::kTiled && launch_persistent(kDp > 0)) {
    // Blocks an SM holds depend only on the instantiation and its shared memory (the input's
    // width: wo and down share an instantiation): asked once per width, not at every launch of
    // an eager step. Per thread, as a tensor-parallel run drives each device from its own.
    thread_local std::map<int, int> per_sm_of_smem;
    auto known = per_sm_of_smem.find(smem);
    if (known == per_sm_of_smem.end()) {
      int per_sm = 0;
      KS_CUDA_CHECK("matmul",
                    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
      known = per_sm_of_smem.emplace(smem, per_sm).first;
    }
    blocks = std::min(blocks, std::max(1, known->second) * p.sm_count);
    if (block_cap > 0) blocks = std::min(blocks, block_cap);
  }
  // The mma path without a fused norm reads its activations through L1 (smem_split_mode).
  constexpr bool kL1Reader = kDp == 0 && !kNorm;
  KS_CUDA_CHECK("matmul", launch_pdl<kL1Reader>(kernel, dim3(unsigned(blocks)), dim3(kThreads),
                                                size_t(smem), stream, p));
  KS_CUDA_CHECK_LAUNCH("matmul", "gemv_kernel");
  return Status::ok();
}

// The row-warp kernel over p.n_tiles units, persistent: a wave of blocks looping over units.
template <WeightFormat F, int NT, bool kSwiglu>
Status launch_rows(const GemvParams& p, cudaStream_t stream) {
  constexpr int kXBytes = kChunkGroups * NT * 8 * 4 * 16;
  constexpr int smem = kRowWarps * kRowStages * Pipe<F, 2>::kWarpStageBytes + kRowStages * kXBytes;
  auto kernel = gemv_rows_kernel<F, NT, kSwiglu>;
  static std::atomic<uint64_t> limit_set{0};
  KS_CUDA_CHECK("matmul",
                set_smem_limit_once(reinterpret_cast<const void*>(kernel), smem, limit_set));
  thread_local int per_sm = 0;  // per thread, as a tensor-parallel run drives each device
  if (per_sm == 0) {
    KS_CUDA_CHECK("matmul", cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel,
                                                                          kRowThreads, smem));
    per_sm = std::max(per_sm, 1);
  }
  int blocks = std::min(p.n_tiles, per_sm * p.sm_count);
  if (block_cap > 0) blocks = std::min(blocks, block_cap);
  KS_CUDA_CHECK("matmul", launch_pdl(kernel, dim3(unsigned(blocks)), dim3(kRowThreads),
                                     size_t(smem), stream, p));
  KS_CUDA_CHECK_LAUNCH("matmul", "gemv_rows_kernel");
  return Status::ok();
}

int rows_kernel_mode = [] {  // set_gemv_rows_kernel
  const char* v = std::getenv("KESTREL_CUDA_GEMV_ROWS_KERNEL");
  const std::string m = v != nullptr ? v : "";
  return m == "1" ? 1 : m == "2" ? 2 : 0;
}();

template <WeightFormat F, int MT, bool kSwiglu>
Status launch_mt(const GemvParams& p, cudaStream_t stream) {
  if constexpr (F == WeightFormat::sym_int4 || F == WeightFormat::asym_int4) {
    // The half-group input (p.xh, set by gemv_launch for one token without a norm) is read by
    // the one-m-tile instances; the others quantize p.x, the same activation's shadow.
    constexpr bool kMayHalve = MT == 1 && !kSwiglu;
    // The dp4a instances, with the phase profile's marks (kProfile: p.profile) or without.
    auto dp4a = [&](auto profile) -> Status {
      constexpr bool kP = decltype(profile)::value;
      if (p.norm.x != nullptr && p.norm_ss != nullptr) {
        return launch_kernel<F, MT, 1, kSwiglu, true, 1, kP, true>(p, stream);
      }
      if (p.norm.x != nullptr) return launch_kernel<F, MT, 1, kSwiglu, true, 1, kP>(p, stream);
      if constexpr (kMayHalve) {
        if (p.n_tokens == 1) {
          // (p.xh is set for one token only.)
          const bool deep = deep_ring<F>(p);
          if (p.xh.q != nullptr) {
            return deep ? launch_kernel<F, MT, 1, false, false, 1, kP, true, Ring::deep>(p, stream)
                        : launch_kernel<F, MT, 1, false, false, 1, kP, true>(p, stream);
          }
          if (deep)
            return launch_kernel<F, MT, 1, false, false, 1, kP, false, Ring::deep>(p, stream);
        } else if constexpr (!kP) {
          // Two tokens (no profile instance: the phase profile is the one-token GEMVs').
          if (deep_ring<F>(p)) {
            return launch_kernel<F, MT, 1, false, false, 2, false, false, Ring::deep>(p, stream);
          }
        }
      }
      if (p.n_tokens == 1) return launch_kernel<F, MT, 1, kSwiglu, false, 1, kP>(p, stream);
      return launch_kernel<F, MT, 1, kSwiglu, false, 2, kP>(p, stream);
    };
    if (p.dp4a) return p.profile ? dp4a(std::true_type{}) : dp4a(std::false_type{});
    // A fused norm input is one token of at most 4096 columns, which always takes dp4a: the
    // int4 mma path has no norm instance.
    if (p.norm.x != nullptr) {
      return Status::error("cuda matmul: an int4 GEMV with a fused RMSNorm input takes dp4a");
    }
  } else {
    if (p.norm.x != nullptr) {
      if (norm_two_blocks()) {
        return launch_kernel<F, MT, 1, kSwiglu, true, 0, false, false, Ring::standard, true>(
            p, stream);
      }
      return launch_kernel<F, MT, 1, kSwiglu, true, 0>(p, stream);
    }
  }
  // The mma instances: one token a tile up to 8 tokens, two past them, under either ring.
  auto mma = [&](auto ring) -> Status {
    constexpr Ring kRing = decltype(ring)::value;
    if (p.n_tokens <= 8) {
      return launch_kernel<F, MT, 1, kSwiglu, false, 0, false, false, kRing>(p, stream);
    }
    if constexpr (F == WeightFormat::sym_int4) {
      if (p.xb.codes != nullptr) {
        KS_RETURN_IF_ERROR(
            gemv_int8_ahead_flag().load(std::memory_order_relaxed) == 2
                ? (launch_kernel<F, MT, 2, kSwiglu, false, 0, false, false, kRing, false, 2>(
                      p, stream))
                : (launch_kernel<F, MT, 2, kSwiglu, false, 0, false, false, kRing, false, 1>(
                      p, stream)));
        int8_activation_launches.fetch_add(1, std::memory_order_relaxed);
        return Status::ok();
      }
    }
    return launch_kernel<F, MT, 2, kSwiglu, false, 0, false, false, kRing>(p, stream);
  };
  if constexpr (MT == 2 && (F == WeightFormat::sym_int4 || F == WeightFormat::asym_int4)) {
    if (shallow_ring()) return mma(std::integral_constant<Ring, Ring::shallow>{});
  }
  return mma(std::integral_constant<Ring, Ring::standard>{});
}

// The units (kRowWarps * 32 rows of every job, or kRowWarps * 16 rows of a swiglu pair) of an
// int4 call that launch_format gives to the row-warp kernel, 0 for a call it does not: by default
// where they fill a wave of kRowBlocksPerSm blocks an SM; on the mma path (no dp4a, no fused
// norm) with whole chunks only.
int rows_kernel_units(const GemvJob* jobs, int n_jobs, int64_t n_groups, bool dp4a, bool norm,
                      GemvEpilogue epilogue, int sm_count) {
  if (rows_kernel_mode == 2 || dp4a || norm || n_groups % kChunkGroups != 0) return 0;
  int64_t units = 0;
  if (epilogue == GemvEpilogue::swiglu) {
    units = ceil_div(jobs[0].w.rows, kRowWarps * 16);
  } else {
    for (int j = 0; j < n_jobs; ++j) units += ceil_div(jobs[j].w.rows, kRowWarps * 32);
  }
  const bool taken = rows_kernel_mode == 1 || units >= int64_t(kRowBlocksPerSm) * sm_count;
  return taken ? int(units) : 0;
}

template <WeightFormat F>
Status launch_format(GemvParams& p, GemvEpilogue epilogue, int sm_count, cudaStream_t stream) {
  p.sm_count = sm_count;
  auto count_tiles = [&](int rows_per_tile) {
    int total = 0;
    for (int j = 0; j < p.n_jobs; ++j) {
      p.first_tile[j] = total;
      total += int(ceil_div(p.jobs[j].w.rows, rows_per_tile));
    }
    p.n_tiles = total;
    return total;
  };
  // The row-warp kernel (int4 on the mma path, whole chunks): by default where its units fill
  // a wave (four blocks an SM), i.e. the lm_heads (8B 1002 units, 1.5B 1187). Measured on the
  // H200 (PERF.md, twelfth session), at 16 tokens: 8B lm_head 136.6 -> 110.5 us, 1.5B 80.7 ->
  // 54.0; but the 8B's gate/up (224 swiglu units) lost 3% of the whole batch-16 step: with fewer
  // units than a wave an SM holds one or two four-warp blocks, where the column-split kernel
  // keeps sixteen warps.
  if constexpr (F == WeightFormat::sym_int4 || F == WeightFormat::asym_int4) {
    if (const int units = rows_kernel_units(p.jobs, p.n_jobs, p.n_groups, p.dp4a,
                                            p.norm.x != nullptr, epilogue, sm_count);
        units > 0) {
      if (epilogue == GemvEpilogue::swiglu) {
        p.n_tiles = units;
        p.first_tile[0] = 0;
      } else {
        count_tiles(kRowWarps * 32);  // each job's first unit; n_tiles = units
      }
      const bool two = p.n_tokens > 8;
      if (epilogue == GemvEpilogue::swiglu) {
        return two ? launch_rows<F, 2, true>(p, stream) : launch_rows<F, 1, true>(p, stream);
      }
      return two ? launch_rows<F, 2, false>(p, stream) : launch_rows<F, 1, false>(p, stream);
    }
  }
  if (epilogue == GemvEpilogue::swiglu) {
    p.n_tiles = int(ceil_div(p.jobs[0].w.rows, 16));
    return launch_mt<F, 2, true>(p, stream);
  }
  // Two m-tiles per warp halve the B-fragment traffic, but only while there are enough blocks
  // to keep every SM streaming; fp16 rows are 4x wider in registers, so they keep one.
  if constexpr (F != WeightFormat::fp16) {
    const int blocks32 = count_tiles(32);
    // Past 8 tokens (two n-tiles) every block also reads 8 KB of input per token from L2, as
    // much as its weights at 16 tokens: 32-row blocks halve that, worth it down to half a wave
    // of blocks (H200, 8B at 16 tokens: wo 9.5 -> 8.4 us, down 24.8 -> 20.8 us; the 1.5B's
    // 48-block weights lose 25%).
    const bool one_mtile = p.norm_out.out.q != nullptr;  // only those instances prepare norms
    if (!one_mtile && (blocks32 >= 2 * sm_count || (p.n_tokens > 8 && 2 * blocks32 >= sm_count) ||
                       few_tokens_two_mtiles(p.n_tokens, blocks32, sm_count))) {
      return launch_mt<F, 2, false>(p, stream);
    }
  }
  count_tiles(16);
  return launch_mt<F, 1, false>(p, stream);
}

}  // namespace

void set_gemv_block_cap(int blocks) {
  block_cap = std::max(0, blocks);
}

void set_gemv_rows_kernel(int mode) {
  rows_kernel_mode = mode == 1 || mode == 2 ? mode : 0;
}

bool gemv_reads_token_halves(const GemvJob* jobs, int n_jobs, int64_t x_stride, int n_tokens,
                             GemvEpilogue epilogue, int sm_count) {
  return n_jobs >= 1 && jobs[0].w.format == WeightFormat::sym_int4 && n_tokens > 8 &&
         n_tokens <= kMaxGemvBatchTokens && !gemv_uses_dp4a(n_tokens, x_stride) &&
         rows_kernel_units(jobs, n_jobs, x_stride / kGroup, false, false, epilogue, sm_count) == 0;
}

bool gemv_writes_token_halves(const GemvJob* jobs, int n_jobs, int64_t x_stride, int n_tokens,
                              int sm_count) {
  return n_jobs == 2 && n_tokens <= kMaxGemvTokens && jobs[0].w.rows % kGroup == 0 &&
         gemv_reads_token_halves(jobs, n_jobs, x_stride, n_tokens, GemvEpilogue::swiglu, sm_count);
}

bool gemv_uses_dp4a(int64_t n_tokens, int64_t cols) {
  // Measured on the H200 (PERF.md): dp4a beats the mma path by 15-30% at one token and by
  // 5-15% at two on the large weights; at four it is even with it on the GEMV alone and 16%
  // slower in a whole decode step (8B), whose other weights it cannot help.
  return n_tokens <= 2 && cols <= kMaxDpCols;
}

namespace {

// Where a GEMV lets the next kernel launch (programmatic dependent launch). Early, at its start,
// the next kernel's blocks take the SM slots left free and request their weights while this one
// streams; late, after the main loop, they take the slots this one's blocks leave. Measured on
// the H200 (PERF.md, seventh and eighth sessions): early pays for the batch-1/2 (dp4a) GEMVs (8B
// batch 1: 500 -> 556 tok/s in the seventh; with attention in one launch, the 1.5B 1018-1049 ->
// 1120 and the 8B 563 -> 571 against the seventh session's rule of large weights only), and every
// kernel early lost batch 16 (8B 4349 -> 4166, 1.5B 10797 -> 8660). So by default
// (KESTREL_CUDA_GEMV_TRIGGER=1) every dp4a call triggers early and every mma-path GEMV late; 0
// makes every GEMV late and 2 every one early (measurement aids). 3 (the residual GEMVs late)
// lost 5-7% at batch 1 (PERF.md, twenty-first session) and is gone; so are 4 (the dp4a GEMVs'
// dependents let in when their wait returns: 8B -1.6%, 1.5B even at batch 1, twenty-eighth
// session) and 5 (4 for the fused-norm GEMVs alone: 1.5B -2.0%), as is a ring issuing two of its
// stages before the wait and the rest after it (-5 to -8%): the early rings are worth more than
// the order in which DRAM serves them.
int trigger_mode() {
  static const int mode = [] {
    const int m = env_int("KESTREL_CUDA_GEMV_TRIGGER", 1);
    return m >= 0 && m <= 2 ? m : 1;
  }();
  return mode;
}

// The process-wide switches below start from the environment (env_is, common.cuh).
std::atomic<bool>& gemv_profile_flag() {
  static std::atomic<bool> on{env_is("KESTREL_CUDA_GEMV_PROFILE", "1")};
  return on;
}

// The dp4a path's first tile loading its bias and residual in its epilogue, as every later tile
// does, instead of before and right after the wait (KESTREL_CUDA_GEMV_LOADS=epilogue at start-up,
// set_gemv_loads_in_epilogue; a measurement switch and test aid). Both give the same bits.
std::atomic<bool>& gemv_loads_in_epilogue_flag() {
  static std::atomic<bool> on{env_is("KESTREL_CUDA_GEMV_LOADS", "epilogue")};
  return on;
}

// The dp4a input stage requesting two groups a thread before quantizing (the default), or each
// group's loads after the last one's quantization (KESTREL_CUDA_GEMV_INPUT_AHEAD=0 at start-up,
// set_gemv_input_ahead; a measurement switch and test aid). Both give the same bits.
std::atomic<bool>& gemv_input_ahead_flag() {
  static std::atomic<bool> on{!env_is("KESTREL_CUDA_GEMV_INPUT_AHEAD", "0")};
  return on;
}

// The fused norm's weight loaded before the wait (the default) or after it
// (KESTREL_CUDA_GEMV_NORM_AHEAD=0 at start-up, set_gemv_norm_ahead; a measurement switch and test
// aid, apart from input_ahead since the twenty-second session: that switch's parts help the 8B
// and cost the 1.5B). Both give the same bits.
// Whether the backend asks the swiglu GEMV for its output's half groups and gives them to the
// GEMV that reads that output (gemv_half_groups; the default: on the H100, tg128 at batch 1 8B
// +2.2% and 1.5B +4.4%), or every GEMV quantizes its shadow itself in groups of 32
// (KESTREL_CUDA_GEMV_HALF_GROUPS=0 at start-up, set_gemv_half_groups; a measurement switch and
// test aid). The two quantize differently, so their results differ within the int8
// quantization's error.
std::atomic<bool>& gemv_half_groups_flag() {
  static std::atomic<bool> on{!env_is("KESTREL_CUDA_GEMV_HALF_GROUPS", "0")};
  return on;
}

// Whether the backend asks a GEMV adding into the residual for the residual's next norm input
// (NormHalvesOut) and gives it to that norm's GEMV (gemv_norm_halves), or the norm's GEMV
// normalizes and quantizes the residual in every block (the first is the default since the
// twenty-fifth session's H100 measurement; KESTREL_CUDA_GEMV_NORM_HALVES=0 at start-up, or
// set_gemv_norm_halves, turns it off: a measurement switch and test aid). The two round differently
// (no fp16 step between the norm and the quantization, half groups), so their results differ within
// the int8 quantization's error.
std::atomic<bool>& gemv_norm_halves_flag() {
  static std::atomic<bool> on{!env_is("KESTREL_CUDA_GEMV_NORM_HALVES", "0")};
  return on;
}

bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0;
}

std::atomic<bool>& gemv_norm_ahead_flag() {
  static std::atomic<bool> on{!env_is("KESTREL_CUDA_GEMV_NORM_AHEAD", "0")};
  return on;
}

bool triggers_early(bool dp4a) {
  if (trigger_mode() != 1) return trigger_mode() == 2;
  return dp4a;
}

// One launch: at most kMaxGemvTokens tokens; `dp4a` is decided by gemv() for the whole call.
Status gemv_launch(const GemvJob* jobs, int n_jobs, const __half* x, int64_t x_stride, int n_tokens,
                   int sm_count, cudaStream_t stream, GemvEpilogue epilogue,
                   ShadowOut swiglu_shadow, NormInput norm, bool dp4a, HalfGroupInput halves,
                   NormHalvesIn norm_halves, NormHalvesOut norm_out, TokenHalfGroups tokens_in) {
  GemvParams p;
  p.n_jobs = n_jobs;
  const WeightFormat format = jobs[0].w.format;
  for (int j = 0; j < n_jobs; ++j) {
    if (data_bytes(jobs[j].w) >= (int64_t(1) << 32)) {
      return Status::error("cuda matmul: a weight of 4 GiB or more needs 64-bit GEMV offsets");
    }
    // One block size too: the kernel takes the scale layout from the first job.
    if (jobs[j].w.format != format || jobs[j].w.cols != jobs[0].w.cols ||
        jobs[j].w.block != jobs[0].w.block) {
      return Status::error(
          "cuda matmul: weights launched together differ in format, width or block size");
    }
    p.jobs[j] = jobs[j];
  }
  if (epilogue == GemvEpilogue::swiglu &&
      (n_jobs != 2 || jobs[0].w.rows != jobs[1].w.rows || jobs[0].residual != nullptr)) {
    return Status::error("cuda matmul: swiglu GEMV needs gate and up weights of equal rows");
  }
  if (norm.x != nullptr) {
    if (!gemv_fuses_norm(jobs[0].w.cols, n_tokens) || x_stride != jobs[0].w.cols ||
        norm.w == nullptr || norm.out == nullptr) {
      return Status::error("cuda matmul: an RMSNorm input of " + std::to_string(n_tokens) + " x " +
                           std::to_string(jobs[0].w.cols) + " cannot be fused into the GEMV");
    }
  } else if (x == nullptr) {
    return Status::error("cuda matmul: GEMV without an input");
  }
  if (swiglu_shadow.halves.q != nullptr &&
      (epilogue != GemvEpilogue::swiglu || !dp4a || n_tokens != 1 ||
       swiglu_shadow.data == nullptr || !aligned16(swiglu_shadow.halves.q) ||
       !aligned16(swiglu_shadow.halves.scales))) {
    return Status::error("cuda matmul: this GEMV cannot write a half-group quantized output");
  }
  p.shadow = swiglu_shadow;
  p.norm = norm;
  p.x = x;
  // The residual's next norm input: one token's, one job adding into the residual, rows a whole
  // number of groups (no padding half to write).
  if (norm_out.out.q != nullptr) {
    if (!dp4a || n_tokens != 1 || n_jobs != 1 || epilogue != GemvEpilogue::store ||
        norm.x != nullptr || jobs[0].residual == nullptr || jobs[0].w.rows % kGroup != 0 ||
        norm_out.w == nullptr || norm_out.ss == nullptr || !aligned16(norm_out.out.q) ||
        !aligned16(norm_out.out.scales)) {
      return Status::error("cuda matmul: this GEMV cannot prepare a norm's input");
    }
    p.norm_out = norm_out;
  }
  // A fused norm's input from those: one token, the residual's width.
  if (norm_halves.in.q != nullptr && norm.x != nullptr && dp4a && n_tokens == 1) {
    if (norm_halves.ss == nullptr || !aligned16(norm_halves.in.q) ||
        !aligned16(norm_halves.in.scales)) {
      return Status::error("cuda matmul: a norm's half-group input is incomplete");
    }
    p.xh = norm_halves.in;
    p.norm_ss = norm_halves.ss;
  }
  // int8 half groups of 9-16 tokens for the mma path (gemv_kernel's kInt8B instances); x stays
  // the input of every other launch.
  if (tokens_in.codes != nullptr && !dp4a && norm.x == nullptr && n_tokens > 8 &&
      format == WeightFormat::sym_int4) {
    if (tokens_in.scales == nullptr || !aligned16(tokens_in.codes) || x_stride % kGroup != 0 ||
        reinterpret_cast<uintptr_t>(tokens_in.scales) % 4 != 0) {
      return Status::error("cuda matmul: an int8 half-group input must be whole and aligned");
    }
    p.xb = tokens_in;
  }
  // w_down's input as int8 half groups, from a swiglu launch that reads int8 half groups itself
  // (the kInt8B instances' epilogue, store_swiglu_tokens): gate's rows whole groups, and the
  // shadow's rows no wider (no padding group that no tile would write).
  if (swiglu_shadow.tokens.codes != nullptr &&
      (epilogue != GemvEpilogue::swiglu || p.xb.codes == nullptr || swiglu_shadow.data == nullptr ||
       !swiglu_shadow.permuted || swiglu_shadow.tokens.scales == nullptr ||
       swiglu_shadow.row_stride != jobs[0].w.rows ||
       !gemv_writes_token_halves(jobs, n_jobs, x_stride, n_tokens, sm_count))) {
    return Status::error("cuda matmul: this GEMV cannot write an int8 half-group output");
  }
  // The half-group input replaces the input stage of one token's plain dp4a GEMV; x stays the
  // input of every other instance (it is the same activation's shadow).
  if (halves.q != nullptr && dp4a && n_tokens == 1 && norm.x == nullptr &&
      epilogue == GemvEpilogue::store) {
    if (!aligned16(halves.q) || !aligned16(halves.scales)) {
      return Status::error("cuda matmul: a half-group input must be 16-byte aligned");
    }
    p.xh = halves;
  }
  p.x_stride = x_stride;
  p.n_groups = x_stride / kGroup;
  p.n_tokens = n_tokens;
  p.dp4a = dp4a;
  p.early_trigger = triggers_early(dp4a);
  p.profile = gemv_profile_flag().load(std::memory_order_relaxed);
  p.loads_in_epilogue = gemv_loads_in_epilogue_flag().load(std::memory_order_relaxed);
  p.input_ahead = gemv_input_ahead_flag().load(std::memory_order_relaxed);
  p.norm_ahead = gemv_norm_ahead_flag().load(std::memory_order_relaxed);
  p.weight_evict_first = take_switch(gemv_weight_evict_first_flag(), weight_evict_first_launches);
  switch (format) {
    case WeightFormat::fp16:
      return launch_format<WeightFormat::fp16>(p, epilogue, sm_count, stream);
    case WeightFormat::sym_int8:
      return launch_format<WeightFormat::sym_int8>(p, epilogue, sm_count, stream);
    case WeightFormat::sym_int4:
      return launch_format<WeightFormat::sym_int4>(p, epilogue, sm_count, stream);
    case WeightFormat::asym_int4:
      return launch_format<WeightFormat::asym_int4>(p, epilogue, sm_count, stream);
    default:
      return Status::error(std::string("cuda matmul: no GEMV for device format ") +
                           format_name(format));
  }
}

}  // namespace

bool set_gemv_input_ahead(bool on) {
  return gemv_input_ahead_flag().exchange(on);
}

bool set_gemv_norm_ahead(bool on) {
  return gemv_norm_ahead_flag().exchange(on);
}

bool set_gemv_half_groups(bool on) {
  return gemv_half_groups_flag().exchange(on);
}

bool set_gemv_deep_ring(bool on) {
  return gemv_deep_ring_flag().exchange(on);
}

bool set_gemv_deep_ring_two(bool on) {
  return gemv_deep_ring_two_flag().exchange(on);
}

bool set_gemv_few_tokens_two_mtiles(bool on) {
  return gemv_few_tokens_two_mtiles_flag().exchange(on);
}

uint64_t gemv_few_tokens_two_mtiles_launches() {
  return few_tokens_two_mtiles_launches.load(std::memory_order_relaxed);
}

uint64_t gemv_int8_activation_launches() {
  return int8_activation_launches.load(std::memory_order_relaxed);
}

int set_gemv_int8_ahead(int chunks) {
  return gemv_int8_ahead_flag().exchange(chunks == 2 ? 2 : 1);
}

namespace {

// One thread a group of one token (TokenHalfGroups' layout, quantize_token_half_groups). With
// kInPlace, x's group is rewritten as the values its codes stand for
// (requantize_token_half_groups).
template <bool kInPlace>
__global__ void quantize_token_half_groups_kernel(__half* x, int n_tokens, int64_t x_stride,
                                                  uint8_t* codes, __half2* scales) {
  const int64_t n_groups = x_stride / kGroup;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(n_tokens) * n_groups) return;
  const int64_t at = (i / n_groups) * x_stride + (i % n_groups) * kGroup;
  float v[kGroup];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint4 w = reinterpret_cast<const uint4*>(x + at)[k];
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(bits_half2(words[j]));
      v[8 * k + 2 * j] = f.x;
      v[8 * k + 2 * j + 1] = f.y;
    }
  }
  // Permuted column c is in half (c & 7) >= 4 (gemv.cuh, TokenHalfGroups).
  float amax[2] = {0.0f, 0.0f};  // from 0 and by fmaxf: NaN never wins
#pragma unroll
  for (int c = 0; c < kGroup; ++c) {
    const int h = (c & 7) >= 4 ? 1 : 0;
    amax[h] = fmaxf(amax[h], fabsf(v[c]));
  }
  __half scale[2];
  float scale_f[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) scale_f[h] = token_half_scale(amax[h], scale[h]);
  uint32_t out[kGroup / 4];
#pragma unroll
  for (int k = 0; k < kGroup / 4; ++k) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = 4 * k + j;
      const float sf = scale_f[(c & 7) >= 4 ? 1 : 0];
      const int q = token_half_code(v[c], sf);
      word |= uint32_t(q + 128) << (8 * j);
      if constexpr (kInPlace) v[c] = token_half_value(q, sf);
    }
    out[k] = word;
  }
  uint4* dst = reinterpret_cast<uint4*>(codes + at);
  dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
  dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
  scales[i] = __halves2half2(scale[0], scale[1]);
  if constexpr (kInPlace) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      reinterpret_cast<uint4*>(x + at)[k] = make_uint4(
          pack_half2(v[8 * k], v[8 * k + 1]), pack_half2(v[8 * k + 2], v[8 * k + 3]),
          pack_half2(v[8 * k + 4], v[8 * k + 5]), pack_half2(v[8 * k + 6], v[8 * k + 7]));
    }
  }
}

template <bool kInPlace>
Status launch_quantize_token_half_groups(__half* x, int n_tokens, int64_t x_stride, uint8_t* codes,
                                         __half2* scales, cudaStream_t stream) {
  if (n_tokens < 1 || x_stride <= 0 || x_stride % kGroup != 0 || !aligned16(x) ||
      !aligned16(codes) || reinterpret_cast<uintptr_t>(scales) % 4 != 0) {
    return Status::error("cuda quantize: a half-group input of whole, aligned groups");
  }
  const int64_t n = int64_t(n_tokens) * (x_stride / kGroup);
  quantize_token_half_groups_kernel<kInPlace>
      <<<unsigned(ceil_div(n, 128)), 128, 0, stream>>>(x, n_tokens, x_stride, codes, scales);
  KS_CUDA_CHECK_LAUNCH("quantize", "quantize_token_half_groups_kernel");
  return Status::ok();
}

}  // namespace

Status quantize_token_half_groups(const __half* x, int n_tokens, int64_t x_stride, uint8_t* codes,
                                  __half2* scales, cudaStream_t stream) {
  // The kernel only writes x in place.
  return launch_quantize_token_half_groups<false>(const_cast<__half*>(x), n_tokens, x_stride, codes,
                                                  scales, stream);
}

Status requantize_token_half_groups(__half* x, int n_tokens, int64_t x_stride, uint8_t* codes,
                                    __half2* scales, cudaStream_t stream) {
  return launch_quantize_token_half_groups<true>(x, n_tokens, x_stride, codes, scales, stream);
}

uint64_t gemv_deep_ring_launches() {
  return deep_ring_launches.load(std::memory_order_relaxed);
}

bool set_gemv_norm_two_blocks(bool on) {
  return gemv_norm_two_blocks_flag().exchange(on);
}

uint64_t gemv_norm_two_blocks_launches() {
  return norm_two_blocks_launches.load(std::memory_order_relaxed);
}

bool set_gemv_weight_evict_first(bool on) {
  return gemv_weight_evict_first_flag().exchange(on);
}

uint64_t gemv_weight_evict_first_launches() {
  return weight_evict_first_launches.load(std::memory_order_relaxed);
}

bool set_gemv_shallow_ring(bool on) {
  return gemv_shallow_ring_flag().exchange(on);
}

uint64_t gemv_shallow_ring_launches() {
  return shallow_ring_launches.load(std::memory_order_relaxed);
}

bool gemv_half_groups() {
  return gemv_half_groups_flag().load(std::memory_order_relaxed);
}

bool set_gemv_norm_halves(bool on) {
  return gemv_norm_halves_flag().exchange(on);
}

bool gemv_norm_halves() {
  return gemv_norm_halves_flag().load(std::memory_order_relaxed);
}

bool gemv_writes_norm_halves(WeightFormat format, int64_t n_tokens, int64_t cols, int64_t rows) {
  return gemv_writes_halves(format, n_tokens, cols) && rows % kGroup == 0;
}

bool gemv_writes_halves(WeightFormat format, int64_t n_tokens, int64_t cols) {
  return (format == WeightFormat::sym_int4 || format == WeightFormat::asym_int4) && n_tokens == 1 &&
         gemv_uses_dp4a(n_tokens, round_up(cols, kGroup));
}

bool set_gemv_loads_in_epilogue(bool on) {
  return gemv_loads_in_epilogue_flag().exchange(on);
}

void set_gemv_profile(bool on) {
  gemv_profile_flag().store(on);
}

Status reset_gemv_profile() {
  const unsigned long long zero = 0;
  KS_CUDA_CHECK("gemv profile", cudaMemcpyToSymbol(g_gemv_profile_count, &zero, sizeof(zero)));
  return Status::ok();
}

Result<std::vector<GemvProfileRecord>> gemv_profile() {
  unsigned long long count = 0;
  KS_CUDA_CHECK("gemv profile", cudaDeviceSynchronize());
  KS_CUDA_CHECK("gemv profile", cudaMemcpyFromSymbol(&count, g_gemv_profile_count, sizeof(count)));
  std::vector<GemvProfileSlot> slots(kGemvProfileSlots);
  KS_CUDA_CHECK("gemv profile", cudaMemcpyFromSymbol(slots.data(), g_gemv_profile,
                                                     slots.size() * sizeof(GemvProfileSlot)));
  // The ring's last min(count, slots) records, oldest first.
  const uint64_t n = std::min<uint64_t>(count, kGemvProfileSlots);
  std::vector<GemvProfileRecord> out;
  for (uint64_t k = count - n; k < count; ++k) {
    const GemvProfileSlot& s = slots[size_t(k % kGemvProfileSlots)];
    GemvProfileRecord r;
    r.rows = s.rows;
    r.cols = s.cols;
    r.n_tokens = s.n_tokens;
    r.blocks = s.blocks;
    r.tiles = s.tiles;
    r.block_tiles = s.block_tiles;
    static_assert(kGemvProfileMarks == sizeof(r.ns) / sizeof(r.ns[0]), "a record's marks");
    for (int i = 0; i < kGemvProfileMarks; ++i) r.ns[i] = s.marks[i];
    out.push_back(r);
  }
  return out;
}

Status gemv(const GemvJob* jobs, int n_jobs, const __half* x, int64_t x_stride, int n_tokens,
            int sm_count, cudaStream_t stream, GemvEpilogue epilogue, ShadowOut swiglu_shadow,
            NormInput norm, HalfGroupInput halves, NormHalvesIn norm_halves, NormHalvesOut norm_out,
            TokenHalfGroups tokens_in) {
  if (n_jobs < 1 || n_jobs > kMaxGemvJobs) {
    return Status::error("cuda matmul: " + std::to_string(n_jobs) + " weights in one GEMV");
  }
  if (n_tokens < 1 || n_tokens > kMaxGemvBatchTokens) {
    return Status::error("cuda matmul: GEMV takes 1 to " + std::to_string(kMaxGemvBatchTokens) +
                         " tokens, got " + std::to_string(n_tokens));
  }
  // Every token of a call gets the same arithmetic: the dp4a path (int8 inputs) is chosen by the
  // call's token count, never by a slice's (the last 1-2 tokens of an 18-token call stay fp16).
  // (With `tokens_in`, a slice of 8 tokens or fewer, and the row-warp kernel, read x instead of
  // the codes: the same values only where x holds the codes' dequantized values, as gemv.cuh
  // asks of its callers.)
  const bool dp4a =
      (jobs[0].w.format == WeightFormat::sym_int4 || jobs[0].w.format == WeightFormat::asym_int4) &&
      gemv_uses_dp4a(n_tokens, x_stride);
  if (n_tokens <= kMaxGemvTokens) {
    return gemv_launch(jobs, n_jobs, x, x_stride, n_tokens, sm_count, stream, epilogue,
                       swiglu_shadow, norm, dp4a, halves, norm_halves, norm_out, tokens_in);
  }
  // Slices of 16 tokens, one launch each: every row of the input, outputs and shadow belongs to
  // one token, so a slice is the same call on offset pointers.
  if (norm.x != nullptr) return Status::error("cuda matmul: a fused RMSNorm input is one token");
  for (int t0 = 0; t0 < n_tokens; t0 += kMaxGemvTokens) {
    const int count = std::min(kMaxGemvTokens, n_tokens - t0);
    GemvJob slice[kMaxGemvJobs];
    for (int j = 0; j < n_jobs; ++j) {
      slice[j] = jobs[j];
      slice[j].y = jobs[j].y + int64_t(t0) * jobs[j].w.rows;
      if (jobs[j].residual != nullptr) {
        slice[j].residual = jobs[j].residual + int64_t(t0) * jobs[j].w.rows;
      }
    }
    ShadowOut shadow = swiglu_shadow;
    if (shadow.data != nullptr) shadow.data += int64_t(t0) * shadow.row_stride;
    // Half groups are one token's: a sliced call has many (and its int8 half groups of 9-16
    // tokens are one launch's).
    if (shadow.halves.q != nullptr || norm_out.out.q != nullptr || shadow.tokens.codes != nullptr) {
      return Status::error("cuda matmul: this GEMV cannot write a half-group quantized output");
    }
    TokenHalfGroups slice_in = tokens_in;
    if (slice_in.codes != nullptr) {
      slice_in.codes += int64_t(t0) * x_stride;
      slice_in.scales += int64_t(t0) * (x_stride / kGroup);
    }
    KS_RETURN_IF_ERROR(gemv_launch(slice, n_jobs, x + int64_t(t0) * x_stride, x_stride, count,
                                   sm_count, stream, epilogue, shadow, norm, dp4a, {}, {}, {},
                                   slice_in));
  }
  return Status::ok();
}

}  // namespace kestrel::cuda
