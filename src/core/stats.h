// Small statistics over measurements.
#pragma once

#include <algorithm>
#include <vector>

namespace kestrel {

// The median of `values` (the mean of the middle two for an even count; 0 for none): the
// benchmarks' latencies and bandwidths over trials, so one slow trial does not move them.
inline double median(std::vector<double> values) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  const size_t mid = values.size() / 2;
  return values.size() % 2 == 1 ? values[mid] : (values[mid - 1] + values[mid]) / 2.0;
}

}  // namespace kestrel
