#include <cfloat>
#include <cstdlib>
#include <string>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.cuh"
#include "backend/cuda/sample.cuh"

namespace kestrel::cuda {
namespace {

constexpr int kThreads = 1024;

// (value, index) with the larger value winning and the lower index breaking ties.
__device__ inline void better(float& v, int32_t& i, float v2, int32_t i2) {
  if (v2 > v || (v2 == v && i2 < i)) {
    v = v2;
    i = i2;
  }
}

// The best (v, i) of a warp, in every lane.
__device__ inline void warp_best(float& v, int32_t& i) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, v, offset);
    const int32_t i2 = __shfl_xor_sync(0xffffffffu, i, offset);
    better(v, i, v2, i2);
  }
}

// The best (v, i) of a block of kBlockThreads threads, in thread 0 (every thread calls it; the
// warps' bests meet in warp 0). Calls after the first need a barrier between them.
template <int kBlockThreads>
__device__ inline void block_best(float& v, int32_t& i) {
  constexpr int kBlockWarps = kBlockThreads / 32;
  __shared__ float values[kBlockWarps];
  __shared__ int32_t indices[kBlockWarps];
  warp_best(v, i);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    values[warp] = v;
    indices[warp] = i;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < kBlockWarps ? values[lane] : -INFINITY;
    i = lane < kBlockWarps ? indices[lane] : INT32_MAX;
    warp_best(v, i);
  }
}

// Row `row`'s token from its best index: NaN never wins and a row of nothing but NaN gives
// index 0, as row_argmax (core/argmax.h), the host's rule, does.
__device__ inline void store_token(int32_t* out, int32_t* feed, int row, int32_t best_i) {
  const int32_t token = best_i == INT32_MAX ? 0 : best_i;
  out[row] = token;
  if (feed != nullptr) feed[row] = token;
}

__global__ void __launch_bounds__(kThreads)
    argmax_kernel(const float* x, int64_t cols, int32_t* out, int32_t* feed) {
  pdl_wait();
  pdl_trigger();
  const float* row = x + int64_t(blockIdx.x) * cols;
  float best = -INFINITY;
  int32_t best_i = INT32_MAX;
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) better(best, best_i, row[c], int32_t(c));
  block_best<kThreads>(best, best_i);
  if (threadIdx.x == 0) store_token(out, feed, int(blockIdx.x), best_i);
}

// The sliced argmax (argmax_rows_sliced): block (slice, row) takes columns [slice * per_block,
// + per_block) of its row, a thread 16 of every 4096 with all of its loads in flight (float4
// when the row is 16-byte aligned), and the block's best goes to its partial. The best of a set
// under better() does not depend on the order it is taken in, so the slices may count in in any
// order and the result is argmax_kernel's.
constexpr int kSliceThreads = 256;
constexpr int kPerThread = kArgmaxSliceCols / kSliceThreads;  // 16
static_assert(kPerThread % 4 == 0, "a thread's columns are whole float4s");

__global__ void __launch_bounds__(kSliceThreads)
    argmax_sliced_kernel(const float* x, int64_t cols, int64_t per_block, bool vec4, int32_t* out,
                         int32_t* feed, int2* partials, unsigned* counters) {
  pdl_wait();
  pdl_trigger();
  const int row = int(blockIdx.y);
  const float* r = x + int64_t(row) * cols;
  const int64_t begin = int64_t(blockIdx.x) * per_block;
  const int64_t end = min(cols, begin + per_block);
  float best = -INFINITY;
  int32_t best_i = INT32_MAX;
  for (int64_t base = begin; base < end; base += kArgmaxSliceCols) {
    // Thread t takes 16 columns: float4 k of them at base + (k * 256 + t) * 4.
    float v[kPerThread];
    if (vec4) {
#pragma unroll
      for (int k = 0; k < kPerThread / 4; ++k) {
        const int64_t c = base + (int64_t(k) * kSliceThreads + threadIdx.x) * 4;
        const float4 f = c < end ? __ldg(reinterpret_cast<const float4*>(r + c))
                                 : make_float4(NAN, NAN, NAN, NAN);
        v[4 * k] = f.x;
        v[4 * k + 1] = f.y;
        v[4 * k + 2] = f.z;
        v[4 * k + 3] = f.w;
      }
    } else {
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int64_t c = base + int64_t(k) * kSliceThreads + threadIdx.x;
        v[k] = c < end ? __ldg(r + c) : NAN;
      }
    }
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t c = vec4 ? base + (int64_t(k / 4) * kSliceThreads + threadIdx.x) * 4 + k % 4
                             : base + int64_t(k) * kSliceThreads + threadIdx.x;
      better(best, best_i, v[k], int32_t(c));  // NaN (and the padding) never wins
    }
  }
  block_best<kSliceThreads>(best, best_i);
  __shared__ bool merges;
  if (threadIdx.x == 0) {
    partials[int64_t(row) * kArgmaxMaxSlices + blockIdx.x] =
        make_int2(__float_as_int(best), best_i);
    __threadfence();  // the partial is visible before the count
    merges = atomicAdd(&counters[row], 1u) + 1 == gridDim.x;
    if (merges) counters[row] = 0;  // for the next launch
  }
  __syncthreads();
  if (!merges) return;
  __threadfence();
  best = -INFINITY;
  best_i = INT32_MAX;
  for (unsigned s = threadIdx.x; s < gridDim.x; s += kSliceThreads) {
    const int2 p = __ldcg(&partials[int64_t(row) * kArgmaxMaxSlices + s]);
    better(best, best_i, __int_as_float(p.x), p.y);
  }
  block_best<kSliceThreads>(best, best_i);
  if (threadIdx.x == 0) store_token(out, feed, row, best_i);
}

// Sliced by default (the H200, tg128: 8B b1 562 -> 565 tok/s, 1.5B b1 1083 -> 1099);
// KESTREL_CUDA_ARGMAX=block takes the one-block kernel, for an A/B.
bool sliced = [] {
  const char* v = std::getenv("KESTREL_CUDA_ARGMAX");
  return v == nullptr || std::string(v) != "block";
}();

}  // namespace

bool argmax_sliced() {
  return sliced;
}

bool set_argmax_sliced(bool on) {
  const bool before = sliced;
  sliced = on;
  return before;
}

Status argmax_rows_sliced(const float* x, int64_t rows, int64_t cols, int32_t* out, int32_t* feed,
                          int2* partials, unsigned* counters, cudaStream_t stream) {
  if (rows == 0) return Status::ok();
  if (rows > kArgmaxSplitRows || cols <= 0 || cols > int64_t(INT32_MAX)) {
    return Status::error("argmax_rows_sliced: " + std::to_string(rows) + " rows of " +
                         std::to_string(cols) + " columns (at most " +
                         std::to_string(kArgmaxSplitRows) + " rows)");
  }
  // Slices of whole 4096-column steps, as few as keep it within kArgmaxMaxSlices blocks.
  const int64_t steps = (cols + kArgmaxSliceCols - 1) / kArgmaxSliceCols;
  const int64_t steps_per_block = (steps + kArgmaxMaxSlices - 1) / kArgmaxMaxSlices;
  const int64_t per_block = steps_per_block * kArgmaxSliceCols;
  const int64_t blocks = (cols + per_block - 1) / per_block;
  const bool vec4 = cols % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  KS_CUDA_CHECK(
      "argmax_rows",
      launch_pdl(argmax_sliced_kernel, dim3(unsigned(blocks), unsigned(rows)), dim3(kSliceThreads),
                 0, stream, x, cols, per_block, vec4, out, feed, partials, counters));
  KS_CUDA_CHECK_LAUNCH("argmax_rows", "argmax_sliced_kernel");
  return Status::ok();
}

Status argmax_rows(const float* x, int64_t rows, int64_t cols, int32_t* out, int32_t* feed,
                   cudaStream_t stream) {
  if (rows == 0) return Status::ok();
  KS_CUDA_CHECK("argmax_rows", launch_pdl(argmax_kernel, dim3(unsigned(rows)), dim3(kThreads), 0,
                                          stream, x, cols, out, feed));
  KS_CUDA_CHECK_LAUNCH("argmax_rows", "argmax_kernel");
  return Status::ok();
}

}  // namespace kestrel::cuda
