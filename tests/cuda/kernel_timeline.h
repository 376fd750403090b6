// Where a decode step's time goes between kernels: the start and end of every kernel the process
// runs, graph-replayed ones included, from CUPTI's activity records (the GPU's own timestamps).
// Op timing (cuda::op_times) times eager launches one by one; this shows the replayed step as
// it runs, with programmatic dependent launch overlapping kernels and the gaps between them. A
// measurement tool of the CUDA test binary, not of the engine: the engine never links CUPTI.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"

namespace kestrel::cuda_test {

struct KernelSpan {
  std::string name;  // demangled
  uint64_t start_ns = 0;
  uint64_t end_ns = 0;
  int64_t blocks = 0;  // grid x * y * z
};

// Starts recording every kernel (an error when this build has no CUPTI, or CUPTI refuses); with
// `activities`, runtime API calls, copies and fills as well (timeline_activities).
Status timeline_start(bool activities = false);
// Stops recording (after synchronizing the device) and returns the kernels since
// timeline_start(), ordered by start.
Result<std::vector<KernelSpan>> timeline_stop();
// The runtime API calls, copies and fills the last recording with `activities` saw, ordered by
// start (blocks: the bytes of a copy or fill, 0 for a call), once.
std::vector<KernelSpan> timeline_activities();

// One kernel of a step, placed against the kernel before it in start order.
struct StepKernel {
  const KernelSpan* span = nullptr;
  double start_us = 0;     // from the step's first start
  double duration_us = 0;  // end - start (includes a dependent launch's wait)
  double adds_us = 0;      // how much later the step's latest end is after this kernel
};

struct StepTimeline {
  double span_us = 0;        // first start to last end
  double kernel_sum_us = 0;  // sum of durations (overlaps count twice)
  std::vector<StepKernel> kernels;
};

// Splits `spans` (ordered by start) into steps: each step ends with a kernel named as the last
// one recorded (a decode step's last kernel, its argmax), so warm-up steps that differ do not
// shift the others.
std::vector<std::vector<KernelSpan>> split_steps(const std::vector<KernelSpan>& spans);

// Lays out one step's kernels (ordered by start; the result points into `step`, which must
// outlive it); an error for an empty step.
Result<StepTimeline> step_timeline(const std::vector<KernelSpan>& step);

// Kernels grouped by name and grid size, in order of first appearance in the step.
struct KernelGroup {
  std::string name;
  int64_t blocks = 0;
  int count = 0;
  double duration_us = 0;  // summed over the group
  double adds_us = 0;      // summed over the group
};
std::vector<KernelGroup> group_kernels(const StepTimeline& step);

// The step as Chrome trace events (chrome://tracing, ui.perfetto.dev): one row per kernel.
std::string chrome_trace(const StepTimeline& step);

}  // namespace kestrel::cuda_test
