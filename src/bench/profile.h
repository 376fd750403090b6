// What the benchmark expects of a device: its memory bandwidth and a deliberately low compute
// rate, from which it derives rooflines and per-step deadlines, and the host memory it may use.
// The memory plan itself (runtime/planner.h) needs none of this.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/status.h"
#include "runtime/planner.h"

namespace kestrel {

// What a device offers, for roofline figures and step deadlines.
struct DeviceProfile {
  std::string device;           // "cpu", "cuda" or "vulkan[:N]"
  double bandwidth_gbs = 0;     // memory bandwidth roofline of a decode step
  double compute_gflops = 0;    // a deliberately low sustained rate: deadlines, not rooflines
  size_t reserve_bytes = 0;     // planned beyond the buffers (runtime, allocator, libraries)
  bool host_memory = true;      // buffers and the host's logits share one memory
  double deadline_floor_s = 0;  // added to every step deadline (scheduling, page faults)
  double first_call_s = 0;      // added to the first call of each shape (graph capture, autotune)
  double load_stall_s = 0;      // building the weights fails after this long without progress
};

// The profile of "cpu" (with `threads` workers), "cuda" or "vulkan[:N]"; an error for other
// devices.
Result<DeviceProfile> device_profile(const std::string& device, int threads);

// Bytes and floating-point operations of one forward call.
struct StepCost {
  double bytes = 0;
  double flops = 0;
};
// A prefill chunk of `n_tokens` ending at position `context_end` of one sequence.
StepCost prefill_cost(const WeightSpec& spec, int64_t n_tokens, int64_t context_end,
                      double kv_entry_bytes);
// A decode step of `n_seqs` sequences whose caches hold `context` positions after the step.
StepCost decode_cost(const WeightSpec& spec, int64_t n_seqs, int64_t context,
                     double kv_entry_bytes);
// The time a step needs at the profile's rates: the larger of its memory and compute times.
double expected_seconds(const StepCost& cost, const DeviceProfile& profile);

}  // namespace kestrel
