// Elementwise ops on fp32 activations: SwiGLU (writing the down projection's fp16 shadow in the
// same pass), residual add, row gather, and the fp16 shadow of any tensor.
#pragma once

#include <cuda_runtime.h>

#include "backend/cuda/common.cuh"
#include "core/status.h"

namespace kestrel::cuda {

// out = silu(gate) * up, all [rows, cols]; out may alias gate.
Status swiglu(float* out, const float* gate, const float* up, int64_t rows, int64_t cols,
              ShadowOut shadow, cudaStream_t stream);

// The natural fp16 shadow [rows, shadow.row_stride] of silu(gate) * up for fp16 gate and up
// [rows, cols]: cols a multiple of 8, 16-byte aligned rows, the padding zeroed.
Status swiglu_half(const __half* gate, const __half* up, int64_t rows, int64_t cols,
                   ShadowOut shadow, cudaStream_t stream);

// x += y over n values.
Status add(float* x, const float* y, int64_t n, cudaStream_t stream);

// out[i, :] = x[rows[i], :] for i < n; rows in device memory.
Status gather_rows(float* out, const float* x, const int32_t* rows, int64_t n, int64_t cols,
                   cudaStream_t stream);

// The fp16 shadow of x [rows, cols] (for a matrix product whose input no op shadowed).
Status write_shadow(const float* x, int64_t rows, int64_t cols, ShadowOut shadow,
                    cudaStream_t stream);

}  // namespace kestrel::cuda
