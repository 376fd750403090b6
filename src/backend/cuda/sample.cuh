// Token choice on the device, so a decode step copies back one int per sequence instead of a
// vocabulary of logits.
#pragma once

#include <cuda_runtime.h>

#include "core/status.h"

namespace kestrel::cuda {

// out[r] = index of the largest value of row r of x [rows, cols], the lowest index among ties
// (as kestrel::argmax). NaN never wins. When `feed` is set, feed[r] gets the same index: the
// next call's token r, left on the device (greedy decode run ahead).
Status argmax_rows(const float* x, int64_t rows, int64_t cols, int32_t* out, int32_t* feed,
                   cudaStream_t stream);

}  // namespace kestrel::cuda
