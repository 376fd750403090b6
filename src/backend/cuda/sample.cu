#include <cfloat>

#include "backend/cuda/common.cuh"
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

__global__ void __launch_bounds__(kThreads)
    argmax_kernel(const float* x, int64_t cols, int32_t* out, int32_t* feed) {
  pdl_wait();
  pdl_trigger();
  __shared__ float values[32];
  __shared__ int32_t indices[32];
  const float* row = x + int64_t(blockIdx.x) * cols;
  float best = -INFINITY;
  int32_t best_i = INT32_MAX;
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) better(best, best_i, row[c], int32_t(c));
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, offset);
    const int32_t i = __shfl_xor_sync(0xffffffffu, best_i, offset);
    better(best, best_i, v, i);
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    values[warp] = best;
    indices[warp] = best_i;
  }
  __syncthreads();
  if (warp == 0) {
    best = values[lane];
    best_i = indices[lane];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float v = __shfl_xor_sync(0xffffffffu, best, offset);
      const int32_t i = __shfl_xor_sync(0xffffffffu, best_i, offset);
      better(best, best_i, v, i);
    }
    // A row of NaN (or nothing above -inf) keeps the first index, as the sequential loop does.
    if (lane == 0) {
      const int32_t token = best_i == INT32_MAX ? 0 : best_i;
      out[blockIdx.x] = token;
      if (feed != nullptr) feed[blockIdx.x] = token;
    }
  }
}

}  // namespace

Status argmax_rows(const float* x, int64_t rows, int64_t cols, int32_t* out, int32_t* feed,
                   cudaStream_t stream) {
  if (rows == 0) return Status::ok();
  KS_CUDA_CHECK("argmax_rows", launch_pdl(argmax_kernel, dim3(unsigned(rows)), dim3(kThreads), 0,
                                          stream, x, cols, out, feed));
  KS_CUDA_CHECK_LAUNCH("argmax_rows", "argmax_kernel");
  return Status::ok();
}

}  // namespace kestrel::cuda
