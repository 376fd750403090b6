// The one greedy rule, shared by every place that picks the most likely token.
#pragma once

#include <cmath>
#include <cstdint>

namespace kestrel {

// The index of the largest of values[0, n), the lowest among ties; NaN never wins, and a row of
// nothing but NaN (or an empty one) gives 0. The CUDA argmax kernels, Backend::argmax_rows'
// default, the engine's argmax() and the Sampler's greedy pick all give this index, so a token
// picked on a device equals the one a host sampler picks from the same row.
inline int32_t row_argmax(const float* values, int64_t n) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isnan(values[i]) && (best < 0 || values[i] > values[best])) best = i;
  }
  return best < 0 ? 0 : int32_t(best);
}

}  // namespace kestrel
