// Prefill matrix products (more than 64 tokens, gemv.cuh's kMaxGemvBatchTokens): the weight is
// dequantized to fp16 in row slices and multiplied on the tensor cores by cuBLAS (fp16 inputs,
// fp32 accumulation and output).
// fp32 weights instead multiply the fp32 activation itself in fp32 (gemm_f32), at every token
// count.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "backend/cuda/common.cuh"
#include "core/status.h"

namespace kestrel::cuda {

struct GemmWorkspace {
  cublasHandle_t cublas = nullptr;
  __half* dequant = nullptr;  // fp16 scratch for one weight slice
  int64_t dequant_elems = 0;
  void* cublas_workspace = nullptr;  // cuBLAS's own scratch, bound before every call
  size_t cublas_workspace_bytes = 0;
};

// y[n, w.rows] = x[n, w.cols] · wᵀ + bias, where x is the natural fp16 shadow [n, x_stride].
// Not for fp32 weights (gemm_f32).
Status gemm(const DeviceWeight& w, const __half* x, int64_t x_stride, int64_t n, float* y,
            const GemmWorkspace& ws, cudaStream_t stream);

// y[n, w.rows] = x[n, w.cols] · wᵀ + bias for an fp32 weight and the fp32 activation x
// [n, w.cols] (row-major, no padding), any n >= 1: cuBLAS with fp32 inputs, CUBLAS_COMPUTE_32F
// and the handle's default math mode, which never rounds to TF32. Decode steps call it too, so
// it runs inside captured graphs (with the workspace of `ws`, so capture allocates nothing).
Status gemm_f32(const DeviceWeight& w, const float* x, int64_t n, float* y, const GemmWorkspace& ws,
                cudaStream_t stream);

// Elements of fp16 scratch gemm() needs for `w` (0 for fp16 and fp32 weights, which cuBLAS reads
// as they are). A weight larger than the scratch is processed in slices of whole rows.
int64_t gemm_dequant_elems(const DeviceWeight& w);

// out[i, :] = fp32 row tokens[i] of `table`, for the n tokens in device memory.
Status embed_rows(const DeviceWeight& table, const int32_t* tokens, int64_t n, float* out,
                  cudaStream_t stream);

}  // namespace kestrel::cuda
