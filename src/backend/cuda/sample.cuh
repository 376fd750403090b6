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

// The same by slices (a measurement switch until it has run on a GPU: KESTREL_CUDA_ARGMAX=split):
// each row's columns go to up to kArgmaxMaxSlices blocks of kArgmaxSliceCols, every block's
// best (value, index) to `partials` [rows, kArgmaxMaxSlices], and the row's last block to count
// in (`counters` [rows], zero before the launch and left zero after it) picks the row's best of
// them. A decode step's single-block argmax reads a 128256-column row alone (~11 us on the
// H200); sliced, one round trip of 32 blocks plus one of the partials. At most kArgmaxSplitRows
// rows.
constexpr int kArgmaxSliceCols = 4096;
constexpr int kArgmaxMaxSlices = 256;
constexpr int kArgmaxSplitRows = 64;
// Whether the backend's argmax takes argmax_rows_sliced (rows permitting):
// KESTREL_CUDA_ARGMAX=split at start-up, or set_argmax_sliced (cuda_backend.h).
bool argmax_sliced();
Status argmax_rows_sliced(const float* x, int64_t rows, int64_t cols, int32_t* out, int32_t* feed,
                          int2* partials, unsigned* counters, cudaStream_t stream);

}  // namespace kestrel::cuda
