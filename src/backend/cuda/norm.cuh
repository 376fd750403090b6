// RMSNorm, with the fp16 shadow of its output written in the same pass (the next op is always a
// matrix product).
#pragma once

#include <cuda_runtime.h>

#include "backend/cuda/common.cuh"
#include "core/status.h"

namespace kestrel::cuda {

// out[r, :] = w * (x[r, :] / sqrt(mean(x[r, :]^2) + eps)) for rows x cols, fp32, and its fp16
// shadow when one is given; with a shadow, out may be null (the shadow alone is written).
// With shadow.tokens (a permuted shadow), every row is also quantized as int8 half groups
// (TokenHalvesOut, common.cuh; the same codes and scales as quantize_token_half_groups of the
// fp16 shadow) and the shadow holds the values the codes stand for: in the float4 kernel's own
// pass, else by a second launch (requantize_token_half_groups).
Status rms_norm(float* out, const float* x, const float* w, float eps, int64_t rows, int64_t cols,
                ShadowOut shadow, cudaStream_t stream);

}  // namespace kestrel::cuda
