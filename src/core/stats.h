// Small statistics over measurements.
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

#include "core/status.h"

namespace kestrel {

// The median of `values` (the mean of the middle two for an even count; 0 for none): the
// benchmarks' latencies and bandwidths over trials, so one slow trial does not move them.
inline double median(std::vector<double> values) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  const size_t mid = values.size() / 2;
  return values.size() % 2 == 1 ? values[mid] : (values[mid - 1] + values[mid]) / 2.0;
}

// The fastest of `passes` (at least one) timed calls of `pass`, in seconds: the rooflines'
// measurements, where a slower pass is the machine's other work, not its rate. `pass` returns a
// Status; its first error ends the passes and is returned, as is a fastest pass of no
// measurable time.
template <class Pass>
Result<double> fastest_pass_seconds(int passes, Pass&& pass) {
  double best = 0;
  for (int i = 0; i < std::max(1, passes); ++i) {
    const auto start = std::chrono::steady_clock::now();
    Status status = pass();
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!status.is_ok()) return status;
    if (s > 0 && (best == 0 || s < best)) best = s;
  }
  if (best <= 0) return Status::error("the timed passes took no measurable time");
  return best;
}

}  // namespace kestrel
