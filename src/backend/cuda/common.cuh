// Types and device helpers shared by the CUDA kernel families.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "backend/cuda/int4_tiles.h"
#include "backend/cuda/smem_split.h"
#include "quant/format.h"

namespace kestrel::cuda {

// A weight as the kernels see it. The weights of an fp32 model stay fp32 on the device (that
// mode computes in fp32 throughout: cuBLAS SGEMM on the fp32 activations, gemm.cuh); every other
// float weight is fp16 (bf16, and fp32 tensors of other models, are converted at upload);
// sym_int8 keeps the planar layout of quant/format.h and the int4 formats are stored in tiles
// (int4_tiles.h).
struct DeviceWeight {
  WeightFormat format = WeightFormat::fp16;  // fp32, fp16, sym_int8, sym_int4 or asym_int4
  int64_t rows = 0;
  int64_t cols = 0;
  int block = 0;                   // weights per scale; 0 for fp32 and fp16
  int64_t row_bytes = 0;           // fp32, fp16 and sym_int8: bytes per row of `data` (fp16
                                   // rows are padded to 32 values, fp32 rows are not); 0 for
                                   // the tiled int4 formats
  Int4Tiles tiles;                 // int4 formats: the tiling of data, scales and mins
  const uint8_t* data = nullptr;   // [rows, row_bytes], or tiles.data_bytes()
  const __half* scales = nullptr;  // [rows, cols / block], or tiles.scale_halves()
  const __half* mins = nullptr;    // as scales, asym_int4 only
  const float* bias = nullptr;     // [rows] or null
};

__host__ __device__ inline bool is_tiled(WeightFormat f) {
  return f == WeightFormat::sym_int4 || f == WeightFormat::asym_int4;
}

// Bytes of a device weight's `data` array.
__host__ __device__ inline int64_t data_bytes(const DeviceWeight& w) {
  return is_tiled(w.format) ? w.tiles.data_bytes() : w.rows * w.row_bytes;
}

constexpr int kGroup = 32;          // int4 packing group, and the unit of the permuted layout
constexpr int kMaxGemvTokens = 16;  // tokens a GEMV call handles (two mma n-tiles)

inline int64_t round_up(int64_t v, int64_t m) {
  return (v + m - 1) / m * m;
}
inline int64_t ceil_div(int64_t v, int64_t m) {
  return (v + m - 1) / m;
}

// Activations are fp32 tensors; matrix products read an fp16 "shadow" of their input written
// by the producing op. Two layouts, both [rows, round_up(cols, 32)] with zeros past cols:
//  - natural: element k at column k (cuBLAS prefill GEMMs);
//  - permuted: within every group of 32 columns, slot s holds element perm(s) where, for
//    u = s / 8 and t = s % 8, perm(s) = 4u + (t < 4 ? 0 : 16) + {0, 2, 1, 3}[t % 4]. This is the
//    order in which the GEMV's mma fragments pair up the nibbles of one 16-byte int4 group
//    (gemv.cu), so a lane reads its B fragments as one 16-byte load.
__host__ __device__ inline int permuted_slot(int k_in_group) {
  const int hi = k_in_group >= 16 ? 1 : 0;
  const int o = k_in_group - 16 * hi;
  const int u = o >> 2;
  const int t = o & 3;
  return u * 8 + hi * 4 + ((t >> 1) | ((t & 1) << 1));
}

__host__ __device__ inline int64_t shadow_index(int64_t row, int64_t k, int64_t row_stride,
                                                bool permuted) {
  if (!permuted) return row * row_stride + k;
  return row * row_stride + (k & ~int64_t(kGroup - 1)) + permuted_slot(int(k & (kGroup - 1)));
}

// One token's activation quantized for the dp4a GEMV in half groups (16 columns): q holds
// round_up(cols, 32) int8 values in natural order, four to a word, and scales[h] = {scale bits,
// sum of the 16 int8 values} of columns 16 h .. 16 h + 15 (value = scale * q). A GEMV reads it
// instead of quantizing the fp16 shadow itself (HalfGroupInput, gemv.cuh).
struct HalfGroupOut {
  uint32_t* q = nullptr;
  int2* scales = nullptr;
};

// A permuted shadow's rows quantized as int8 half groups for the int4 mma GEMV past 8 tokens
// (TokenHalfGroups' layout, gemv.cuh): codes [rows, row_stride] (value + 128, a column in the
// permuted order), scales [rows, row_stride / 32] (each group's two half scales). A producer that
// writes them writes the fp16 shadow as the values the codes stand for (token_half_value), so
// that every reader of the shadow takes the same numbers.
struct TokenHalvesOut {
  uint8_t* codes = nullptr;
  __half2* scales = nullptr;
};

// Where an op writes the fp16 copy of its output; data == nullptr when none is wanted. `halves`,
// when set, also receives the half-group quantization of a one-token output (the dp4a swiglu
// GEMV's epilogue and the tensor-core decode attention write it: gemv_writes_halves,
// attention_writes_halves). `tokens`, when set (a permuted shadow), receives every row's
// TokenHalvesOut (rms_norm writes it: set_int8_activations in cuda_backend.h).
struct ShadowOut {
  __half* data = nullptr;
  int64_t row_stride = 0;  // round_up(cols, 32)
  bool permuted = false;
  HalfGroupOut halves;
  TokenHalvesOut tokens;
};

// Whether environment variable `name` is set to exactly `value`: the measurement switches'
// start-up values.
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

// Environment variable `name` as an integer (std::atoi), or `unset` where it is unset or empty:
// the numeric switches' start-up values, each range-checked by its reader.
inline int env_int(const char* name, int unset) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : unset;
}

// __float2int_rn(x) for |x| < 2^22 (NaN: 0, as the conversion gives) in one add: x + 1.5 * 2^23
// is rounded to the nearest integer, ties to even, as the conversion rounds, and that integer
// is the sum's low mantissa bits. A float-to-integer conversion issues at a sixteenth of the
// FMA rate on sm_80-sm_90, and the GEMV's input stage converts its whole input in every block at
// once (the 8B's w_down input: 14336 conversions a block, three blocks an SM). round_bits is the
// sum's bits (never contracted with a product before it): 0x4B400000 plus the integer.
__device__ inline uint32_t round_bits(float x) {
  return __float_as_uint(__fadd_rn(x, 12582912.0f));
}

__device__ inline int round_small(float x) {
  return x == x ? int(round_bits(x) - 0x4B400000u) : 0;
}

// Lanes 0-15 of a warp: a half group's lanes where each holds one of its 16 values (the GEMVs'
// epilogue threads).
constexpr unsigned kHalfLanes = 0x0000ffffu;

// The calling lane's run of kLanes lanes (a power of two up to 16), aligned to kLanes.
template <int kLanes>
__device__ inline unsigned run_lanes() {
  static_assert(kLanes >= 1 && kLanes <= 16 && (kLanes & (kLanes - 1)) == 0, "a run of lanes");
  return ((1u << kLanes) - 1u) << (threadIdx.x & (32 - kLanes));
}

// The sum of v over the calling lane's run of kLanes lanes (every one of them calls this
// together), in every one of them.
template <int kLanes, typename T>
__device__ inline T run_sum(T v) {
  const unsigned mask = run_lanes<kLanes>();
#pragma unroll
  for (int o = 1; o < kLanes; o <<= 1) v += __shfl_xor_sync(mask, v, o, kLanes);
  return v;
}

// The dp4a path's half-group quantization (HalfGroupOut) of 16 consecutive columns, held kPer
// consecutive values a lane by a run of 16 / kPer lanes (run_lanes) that call this together:
// lanes 0-15 with one value each (the GEMVs' epilogues), or runs of four lanes with four
// (attention's output). The values times 127 / their largest magnitude, rounded to the nearest
// integer (ties to even; NaN to 0, and an infinite maximum scales every value to 0 as
// quantize_input's conversion path does), into q; returns the half's {scale bits, sum of the 16
// int8 values} in every lane of the run.
template <int kPer>
__device__ inline int2 quantize_half_group(const float (&v)[kPer], int (&q)[kPer]) {
  constexpr int kLanes = 16 / kPer;
  static_assert(kLanes * kPer == 16, "16 values a half group");
  const unsigned mask = run_lanes<kLanes>();
  float amax = 0.0f;  // from 0 and by fmaxf, as quantize_input: NaN never wins
#pragma unroll
  for (int i = 0; i < kPer; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
  for (int o = 1; o < kLanes; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(mask, amax, o, kLanes));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  int sum = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    q[i] = round_small(__fmul_rn(v[i], inv));
    sum += q[i];
  }
  return make_int2(__float_as_int(amax / 127.0f), run_sum<kLanes>(sum));
}

// TokenHalfGroups' quantization, a value at a time (quantize_token_half_groups, the norm's
// epilogue and their CPU twin in the tests): a half's scale is its largest magnitude (of its fp16
// values: NaN never wins) over 127, rounded to fp16; 0 (and bits 0) where that maximum is not
// finite or the scale rounds to 0; at most 515.5, so that code 127 stands for a finite value
// (127 x 516, the scale of a maximum of 65504, rounds to Inf in fp16; 127 x 515.5 to 65472).
// Returns the scale as a float; `bits` receives it as fp16.
__device__ inline float token_half_scale(float amax, __half& bits) {
  constexpr float kMaxScale = 515.5f;  // exact in fp16
  __half s = __float2half_rn(__fdiv_rn(amax, 127.0f));
  if (__half2float(s) > kMaxScale) s = __float2half_rn(kMaxScale);
  const bool usable = isfinite(amax) && __half2float(s) > 0.0f;
  bits = usable ? s : __ushort_as_half(0);
  return usable ? __half2float(s) : 0.0f;
}

// A value's integer code under scale `sf` (token_half_scale): v / sf rounded to the nearest
// integer (ties to even) within +-127; 0 for NaN and for a zero scale. Stored plus 128.
__device__ inline int token_half_code(float v, float sf) {
  const float q = sf > 0.0f && v == v ? rintf(__fdiv_rn(v, sf)) : 0.0f;
  return int(fminf(fmaxf(q, -127.0f), 127.0f));
}

// The fp16 value a code stands for, as the int8 mma path makes it: (code) * scale rounded once
// (the product of a 7-bit integer and an fp16 scale is exact in fp32).
__device__ inline float token_half_value(int q, float sf) {
  return __half2float(__float2half_rn(float(q) * sf));
}

// Four fp16 values of one half group (v, already rounded to fp16), held by each lane of a run of
// four lanes (run_lanes<4>) that call this together: their TokenHalfGroups codes (plus 128) in
// q, v replaced by the values the codes stand for; returns the half's scale bits.
__device__ inline __half token_half4(float (&v)[4], uint32_t (&q)[4]) {
  const unsigned mask = run_lanes<4>();
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) amax = fmaxf(amax, fabsf(v[i]));
  amax = fmaxf(amax, __shfl_xor_sync(mask, amax, 1, 4));
  amax = fmaxf(amax, __shfl_xor_sync(mask, amax, 2, 4));
  __half bits;
  const float sf = token_half_scale(amax, bits);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = token_half_code(v[i], sf);
    q[i] = uint32_t(c + 128);
    v[i] = token_half_value(c, sf);
  }
  return bits;
}

// Programmatic dependent launch: kernels of a decode step are launched so that the next one
// may start while the previous drains (its blocks can prefetch weights, which no kernel
// writes). Every kernel calls pdl_wait() before it reads or writes activations; pdl_wait()
// returns once the previous kernel has finished and its writes are visible, and is a no-op
// for a kernel launched without the attribute.
__device__ inline void pdl_wait() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}
// Lets the next kernel's blocks be scheduled (they still wait for this grid to finish).
__device__ inline void pdl_trigger() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
}

// The device-wide clock in nanoseconds (profiles that compare blocks on different SMs).
__device__ inline uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// How long a block waits at a grid barrier before it traps instead of hanging, so that the
// launch fails with CUDA's error: about 9 s at 1.98 GHz.
constexpr long long kGridBarrierTimeoutCycles = 1ll << 34;

// A barrier across a grid whose blocks are all resident (persistent kernels sized from the
// occupancy): every block arrives before any leaves, and each block's writes before it are
// visible to every block after it. `arrive` returns to zero after each barrier; `generation`
// counts them.
__device__ inline void grid_barrier(unsigned* arrive, unsigned* generation) {
  __syncthreads();  // the block's writes are observed by thread 0, whose fence publishes them
  if (threadIdx.x == 0) {
    volatile unsigned* gen = generation;
    const unsigned seen = *gen;
    __threadfence();
    if (atomicAdd(arrive, 1u) == gridDim.x - 1) {
      atomicExch(arrive, 0u);
      __threadfence();
      atomicAdd(generation, 1u);
    } else {
      const long long start = clock64();
      while (*gen == seen) {
        if (clock64() - start > kGridBarrierTimeoutCycles) __trap();
      }
    }
    __threadfence();
  }
  __syncthreads();
}

// Which launches through launch_pdl ask for the SM's largest shared-memory split (the launch
// attribute cudaLaunchAttributePreferredSharedMemoryCarveout = cudaSharedmemCarveoutMaxShared;
// set_smem_split, KESTREL_CUDA_SMEM_SPLIT at start-up; wants_max_shared in smem_split.h): 0 none
// (the driver's choice for every kernel), 1 all, 2 (the default) all but the kernels that read
// their input through L1 (launch_pdl<true>: the column-split GEMVs with kDp == 0 and no fused
// norm, i.e. int4 at 3-64 tokens or past kMaxDpCols columns, and fp16 / sym_int8 at every batch;
// the row-warp kernel stages its input with cp.async.cg, past L1, and is not one). The driver
// gives each kernel the split its occupancy needs (Nsight, thirtieth session, H100: the batch-1
// step's GEMVs 164, 196 or 228 KB of shared memory, attention 228), and kernels of different
// splits do not share an SM (its split changes only when it is idle), so a kernel launched early
// under programmatic dependent launch cannot take an SM still running a kernel of another split.
// One split for the batch-1 step of the int4 models gave tg128 b1 +2.8% (8B) and +2.1% (1.5B) in
// the same call; for the batch-16 GEMVs it cost 3.9% / 1.1%: their activations hit L1 39-58% of
// the time at the driver's 164 KB, and the largest split leaves L1 28 KB. The mode offers only
// the largest split: the occupancy calculator (cuda_occupancy.h) counts on an SM's whole shared
// memory under the default preference, so the persistent grids sized from it stay co-resident;
// a smaller split could hold fewer (the L1 readers' own carveout below, a measurement aid, may).
// Measured as a rule in the thirty-first session (H100): the driver's split for every kernel
// (0) lost 3.0% / 1.6% at batch 1 against it, batch 16 within 0.6%. Nsight's replay of a kernel
// alone shows the kernel's own preference, not the attribute's split (PERF.md, thirty-first
// session). The mode is part of a captured step's key (path_switches).
inline std::atomic<int>& smem_split_mode() {
  static std::atomic<int> mode{valid_smem_split(env_int("KESTREL_CUDA_SMEM_SPLIT", 2))};
  return mode;
}

// The split the L1 readers ask for where the mode leaves them the driver's (launch_carveout in
// smem_split.h; set_l1_reader_carveout, KESTREL_CUDA_L1_READER_CARVEOUT at start-up): -1 none,
// else a percent of the largest shared memory. A measurement aid: it tells an L1 reader's split
// apart from its ring's depth (the two-stage ring's batch-16 gain, thirty-first session). Part of
// a captured step's key (path_switches).
inline std::atomic<int>& l1_reader_carveout() {
  static std::atomic<int> percent{
      valid_l1_reader_carveout(env_int("KESTREL_CUDA_L1_READER_CARVEOUT", -1))};
  return percent;
}

static_assert(int(cudaSharedmemCarveoutMaxShared) == 100 && int(cudaSharedmemCarveoutMaxL1) == 0,
              "launch_carveout's percents are the carveout attribute's");

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialization.
// kL1Reader: a kernel whose input comes through L1 (see smem_split_mode).
template <bool kL1Reader = false, typename... KernelArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[2];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  const int carveout =
      launch_carveout(smem_split_mode().load(std::memory_order_relaxed), kL1Reader,
                      kL1Reader ? l1_reader_carveout().load(std::memory_order_relaxed) : -1);
  attribute[1].id = cudaLaunchAttributePreferredSharedMemoryCarveout;
  attribute[1].val.sharedMemCarveout = unsigned(carveout);  // 100: cudaSharedmemCarveoutMaxShared
  config.attrs = attribute;
  config.numAttrs = carveout >= 0 ? 2 : 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// Asynchronous global -> shared copies (the weight rings of the GEMV and the layer kernel). A
// 16-byte copy goes through L2 only (.cg: weights are read once, L1 would only be polluted).
__device__ inline void cp_async_16(void* smem, const void* global) {
  const uint32_t s = uint32_t(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(global));
}

__device__ inline void cp_async_4(void* smem, const void* global) {
  const uint32_t s = uint32_t(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(global));
}

// The L2 policy of a weight stream (createpolicy): evict_first marks the lines a weight read
// brings into L2 as the first to be replaced, so a decode step's ~110 MB a layer of weights, each
// byte read once, stop pushing out what is read again (the KV cache, activations, partial sums,
// the kernels' code); evict_normal is the priority of a copy without a hint. The GEMVs take it
// once per thread and give it to every weight copy (cp_async_16_hint, cp_async_4_hint), so the
// switch (set_gemv_weight_evict_first) costs no instruction in their loops.
__device__ inline uint64_t weight_l2_policy(bool evict_first) {
  uint64_t policy;
  if (evict_first) {
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  } else {
    asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(policy));
  }
  return policy;
}

__device__ inline void cp_async_16_hint(void* smem, const void* global, uint64_t policy) {
  const uint32_t s = uint32_t(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(s),
               "l"(global), "l"(policy));
}

__device__ inline void cp_async_4_hint(void* smem, const void* global, uint64_t policy) {
  const uint32_t s = uint32_t(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global.L2::cache_hint [%0], [%1], 4, %2;\n" ::"r"(s),
               "l"(global), "l"(policy));
}

// Copies `unit` bytes (4, 8 or 16) from global to shared memory, or zero-fills them where `live`
// is false (`global` must still be a valid address then).
__device__ inline void cp_async(void* smem, const void* global, int unit, bool live) {
  const uint32_t dst = uint32_t(__cvta_generic_to_shared(smem));
  const uint32_t n = live ? uint32_t(unit) : 0u;
  if (unit == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global), "r"(n));
  } else if (unit == 8) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(global), "r"(n));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(global), "r"(n));
  }
}

__device__ inline void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ inline float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ inline float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ inline float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  float total = lane < n_warps ? scratch[lane] : 0.0f;
  return warp_sum(total);
}

__device__ inline uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// The first permuted slot b of columns 4j .. 4j + 3 of a row: with group offset o = 4 (j % 8),
// columns o .. o + 3 go to slots b, b + 2, b + 1, b + 3 (permuted_slot).
__device__ inline int shadow4_slot(int j) {
  const int o = (j & 7) * 4;
  return (j >> 3) * kGroup + ((o & 15) >> 2) * 8 + (o >= 16 ? 4 : 0);
}

// Stores columns 4j .. 4j + 3 (a) of a shadow row as fp16, `row32` the row's first 32-bit word.
// Permuted: two 32-bit stores hold (o, o + 2) and (o + 1, o + 3) at shadow4_slot(j).
__device__ inline void store_shadow4(uint32_t* row32, int j, float4 a, bool permuted) {
  if (permuted) {
    const int slot = shadow4_slot(j);
    row32[slot / 2] = pack_half2(a.x, a.z);
    row32[slot / 2 + 1] = pack_half2(a.y, a.w);
  } else {
    row32[2 * j] = pack_half2(a.x, a.y);
    row32[2 * j + 1] = pack_half2(a.z, a.w);
  }
}

// D[16x8] += A[16x16] · B[16x8], fp16 inputs, fp32 accumulators (PTX fragment layouts).
__device__ inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One weight of row `row`, column `k`, dequantized to fp32 exactly as quant/format.cpp does.
__device__ inline float dequant_one(const DeviceWeight& w, int64_t row, int64_t k) {
  const uint8_t* data = w.data + row * w.row_bytes;  // fp32, fp16 and sym_int8
  switch (w.format) {
    case WeightFormat::fp32:
      return reinterpret_cast<const float*>(data)[k];
    case WeightFormat::fp16:
      return __half2float(reinterpret_cast<const __half*>(data)[k]);
    case WeightFormat::sym_int8: {
      const float d = __half2float(w.scales[row * (w.cols / w.block) + k / w.block]);
      return float(reinterpret_cast<const int8_t*>(data)[k]) * d;
    }
    case WeightFormat::sym_int4:
    case WeightFormat::asym_int4: {
      const int64_t g = k / kGroup;
      const int j = int(k % kGroup);
      const uint8_t byte = w.data[w.tiles.group_offset(row, g) + (j & 15)];
      const int code = j < 16 ? (byte & 0x0f) : (byte >> 4);
      const int64_t s = w.tiles.scale_index(row, g);
      const float d = __half2float(w.scales[s]);
      if (w.format == WeightFormat::sym_int4) return float(code - 8) * d;
      // Separate multiply and add, as the CPU does (no fused rounding).
      return __fadd_rn(__fmul_rn(float(code), d), __half2float(w.mins[s]));
    }
    default:
      return 0.0f;
  }
}

}  // namespace kestrel::cuda
