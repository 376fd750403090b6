// RMSNorm, with the fp16 shadow of its output written in the same pass (the next op is always a
// matrix product).
#pragma once

#include <cuda_runtime.h>

#include "backend/cuda/common.cuh"
#include "core/status.h"

namespace kestrel::cuda {

// out[r, :] = w * (x[r, :] / sqrt(mean(x[r, :]^2) + eps)) for rows x cols, fp32, and its fp16
// shadow when one is given; with a shadow, out may be null (the shadow alone is written).
Status rms_norm(float* out, const float* x, const float* w, float eps, int64_t rows, int64_t cols,
                ShadowOut shadow, cudaStream_t stream);

}  // namespace kestrel::cuda
