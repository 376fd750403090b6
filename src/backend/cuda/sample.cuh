// Token choice on the device, so a decode step copies back one int per sequence instead of a
// vocabulary of logits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/status.h"

namespace kestrel::cuda {

// out[r] = index of the largest value of row r of x [rows, cols], the lowest index among ties
// (as kestrel::argmax). NaN never wins. When `feed` is set, feed[r] gets the same index: the
// next call's token r, left on the device (greedy decode run ahead).
Status argmax_rows(const float* x, int64_t rows, int64_t cols, int32_t* out, int32_t* feed,
                   cudaStream_t stream);

// The same by slices (the default; KESTREL_CUDA_ARGMAX=block for argmax_rows instead):
// each row's columns go to up to kArgmaxMaxSlices blocks of kArgmaxSliceCols, every block's
// best (value, index) to `partials` [rows, kArgmaxMaxSlices], and the row's last block to count
// in (`counters` [rows], zero before the launch and left zero after it) picks the row's best of
// them. A decode step's single-block argmax reads a 128256-column row alone (~11 us on the
// H200); sliced, one round trip of 32 blocks plus one of the partials. At most kArgmaxSplitRows
// rows.
constexpr int kArgmaxSliceCols = 4096;
constexpr int kArgmaxMaxSlices = 256;
constexpr int kArgmaxSplitRows = 64;
// Whether the backend's argmax takes argmax_rows_sliced (rows permitting): unless
// KESTREL_CUDA_ARGMAX=block at start-up, or as set_argmax_sliced (cuda_backend.h) says.
bool argmax_sliced();
Status argmax_rows_sliced(const float* x, int64_t rows, int64_t cols, int32_t* out, int32_t* feed,
                          int2* partials, unsigned* counters, cudaStream_t stream);

// Sampled tokens drawn on the device (draw.cu): out[row] = Sampler::pick's token of the row's
// settings and uniform number (sample/sampler.h), for the up to kDrawRowsPerLaunch rows of
// `launch`, a block a row. `work` holds kDrawRowsPerLaunch * cols fixed-point probabilities
// (8 bytes each). The other rows of `out` are left as they are (the argmax before it wrote
// them); a drawn row with no candidate token (nothing but NaN and -inf) gets the argmax of its
// first `vocab` columns, the host's fallback.
constexpr int kDrawRowsPerLaunch = 16;
struct DrawRow {
  int32_t row = 0;
  int32_t vocab = 0;
  int32_t top_k = 0;
  float temperature = 1;
  float top_p = 1;
  float min_p = 0;
  double u = 0;
};
struct DrawLaunch {
  DrawRow rows[kDrawRowsPerLaunch];
  // Top-p's histograms in 64-bit sums even for rows of at most 2^18 tokens, which take three
  // 32-bit parts otherwise (set_draw_wide_histograms, a test aid: the same integer sums).
  bool wide_histograms = false;
};
Status draw_rows(const float* x, int64_t rows, int64_t cols, const DrawLaunch& launch, int count,
                 int32_t* out, uint64_t* work, cudaStream_t stream);

}  // namespace kestrel::cuda
