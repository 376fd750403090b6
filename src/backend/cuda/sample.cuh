// Token choice on the device, so a decode step copies back one int per sequence instead of a
// vocabulary of logits.
#pragma once

#include <cuda_runtime.h>

#include "core/status.h"

namespace kestrel::cuda {

// out[r] = index of the largest value of row r of x [rows, cols], the lowest index among ties
// (as kestrel::argmax). NaN never wins.
Status argmax_rows(const float* x, int64_t rows, int64_t cols, int32_t* out, cudaStream_t stream);

}  // namespace kestrel::cuda
