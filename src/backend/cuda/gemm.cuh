// Prefill matrix products (more than 16 tokens): the weight is dequantized to fp16 in row slices
// and multiplied on the tensor cores by cuBLAS (fp16 inputs, fp32 accumulation and output).
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
};

// y[n, w.rows] = x[n, w.cols] · wᵀ + bias, where x is the natural fp16 shadow [n, x_stride].
Status gemm(const DeviceWeight& w, const __half* x, int64_t x_stride, int64_t n, float* y,
            const GemmWorkspace& ws, cudaStream_t stream);

// Elements of fp16 scratch gemm() needs for `w` (0 for fp16 weights, which cuBLAS reads as they
// are). A weight larger than the scratch is processed in slices of whole rows.
int64_t gemm_dequant_elems(const DeviceWeight& w);

// out[i, :] = fp32 row tokens[i] of `table`, for the n tokens in device memory.
Status embed_rows(const DeviceWeight& table, const int32_t* tokens, int64_t n, float* out,
                  cudaStream_t stream);

}  // namespace kestrel::cuda
