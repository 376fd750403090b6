// The Vulkan compute backend: fp32 activations and KV cache (like the CPU reference), weights
// in their packed formats, GLSL shaders compiled to SPIR-V at build time (shaders/). Works on
// any Vulkan 1.2 device with buffer device addresses, 64-bit integers and subgroup arithmetic:
// discrete and integrated GPUs, and Mesa's CPU driver (lavapipe) for testing.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "backend/backend.h"

namespace kestrel {

struct VulkanOptions {
  // Largest allocation weights are packed into (0: the device's maxMemoryAllocationSize, at most
  // 2 GiB, the limit of every allocation). A matrix larger than this is split by rows; the tests
  // lower it to check the split on small weights.
  size_t max_weight_allocation_bytes = 0;
  // Dispatches recorded before the command buffer is submitted without waiting, so the device
  // starts while the host records the rest (0: the backend's default). The tests take 1 to put
  // a submission boundary between every dependent pair of dispatches.
  int dispatches_per_submission = 0;
};

// `device`: "vulkan" (the preferred usable device: discrete, then integrated GPU, then others)
// or "vulkan:N" (the N-th device of `kestrel devices`).
Result<std::unique_ptr<Backend>> make_vulkan_backend(const std::string& device,
                                                     const VulkanOptions& options = {});

// One line per Vulkan device ("vulkan:0  NVIDIA H200 (discrete GPU, Vulkan 1.3, 140 GiB)", with
// why it cannot run Kestrel when it cannot), or the reason none can be listed.
Result<std::vector<std::string>> describe_vulkan_devices();

namespace vulkan {
// Copies host fp32 values into a tensor of a Vulkan backend (tests fill inputs with it).
Status write_tensor(Backend& backend, Tensor t, const float* host);
}  // namespace vulkan

}  // namespace kestrel
