#include "bench/profile.h"

#include <algorithm>
#include <thread>

#include "io/config.h"

namespace kestrel {

Result<DeviceProfile> device_profile(const std::string& device, int threads) {
  DeviceProfile profile;
  profile.device = device;
  if (device == "cpu") {
    const int workers =
        threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency()));
    // Read bandwidth measured with 2 threads on the development machine (DESIGN.md), for the
    // step deadlines only: the roofline is the backend's measured read bandwidth (or
    // --roofline-gbs), this figure only where that measurement fails.
    profile.bandwidth_gbs = 31.0;
    profile.compute_gflops = 4.0 * workers;
    // Code pages first touched by a run, thread stacks, allocator arenas and small buffers: the
    // process's peak resident set grew 0.6 to 1.5 MB beyond the planned buffers in tiny-model
    // runs on the development machine.
    profile.reserve_bytes = size_t(1) << 20;
    profile.host_memory = true;
    profile.deadline_floor_s = 30.0;
    profile.first_call_s = 10.0;
    // Conversion counts its rows every few milliseconds; a minute without one is a stall.
    profile.load_stall_s = 60.0;
    return profile;
  }
  if (device == "cuda") {
    // H100 device-to-device copy rate (DESIGN.md).
    profile.bandwidth_gbs = 3000.0;
    profile.compute_gflops = 50000.0;
    // Beyond the backend's own reservation (its layout counts cuBLAS's workspace): kernel
    // modules loaded at their first launch, CUDA graph memory and 2 MiB allocation granularity.
    profile.reserve_bytes = size_t(64) << 20;
    profile.host_memory = false;
    profile.deadline_floor_s = 10.0;
    // A shape's first call captures a CUDA graph and lets cuBLAS choose its algorithms.
    profile.first_call_s = 30.0;
    profile.load_stall_s = 60.0;
    return profile;
  }
  if (device == "vulkan" || device.rfind("vulkan:", 0) == 0) {
    // Any Vulkan device, Mesa's CPU driver included: a low bandwidth and compute rate keep the
    // deadlines generous enough for lavapipe. Only for deadlines: the roofline is the backend's
    // measured copy rate (or --roofline-gbs).
    profile.bandwidth_gbs = 30.0;
    profile.compute_gflops = 8.0;
    // Pipelines, command buffers and the driver's own allocations beyond the reservation.
    profile.reserve_bytes = size_t(64) << 20;
    profile.host_memory = false;
    profile.deadline_floor_s = 30.0;
    // A shape's first call builds its pipelines (lavapipe compiles each with LLVM).
    profile.first_call_s = 60.0;
    profile.load_stall_s = 60.0;
    return profile;
  }
  return Status::error("unknown device '" + device + "' (expected cpu, cuda or vulkan[:N])");
}

StepCost prefill_cost(const WeightSpec& spec, int64_t n_tokens, int64_t context_end,
                      double kv_entry_bytes) {
  const ModelConfig& c = spec.config;
  const double per_position_kv = double(c.n_layers) * 2.0 * double(c.kv_dim()) * kv_entry_bytes;
  // Token at position p attends to p + 1 positions: q·K and p·V, 2 flops each, every layer.
  const double first = double(context_end - n_tokens + 1);
  const double last = double(context_end);
  const double attended = (first + last) * double(n_tokens) / 2.0;
  StepCost cost;
  cost.bytes = double(planned_decode_bytes(spec)) + per_position_kv * double(context_end);
  cost.flops = 2.0 * double(layer_matrix_params(c)) * double(n_tokens) +
               2.0 * double(c.vocab_size) * double(c.hidden_size) +
               4.0 * double(c.q_dim()) * double(c.n_layers) * attended;
  return cost;
}

StepCost decode_cost(const WeightSpec& spec, int64_t n_seqs, int64_t context,
                     double kv_entry_bytes) {
  const ModelConfig& c = spec.config;
  const double per_position_kv = double(c.n_layers) * 2.0 * double(c.kv_dim()) * kv_entry_bytes;
  StepCost cost;
  cost.bytes =
      double(planned_decode_bytes(spec)) + per_position_kv * double(context) * double(n_seqs);
  cost.flops =
      2.0 * double(layer_matrix_params(c) + c.vocab_size * c.hidden_size) * double(n_seqs) +
      4.0 * double(c.q_dim()) * double(c.n_layers) * double(context) * double(n_seqs);
  return cost;
}

double expected_seconds(const StepCost& cost, const DeviceProfile& profile) {
  return std::max(cost.bytes / (profile.bandwidth_gbs * 1e9),
                  cost.flops / (profile.compute_gflops * 1e9));
}

}  // namespace kestrel
