#include "backend/backend.h"

#include <filesystem>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/matmul.h"
#include "backend/cuda_module.h"

namespace kestrel {

namespace {
// Without a loaded NVIDIA driver the CUDA runtime reports "driver version is insufficient for
// CUDA runtime version", which sends users looking for a driver update; say what is true.
bool nvidia_driver_loaded() {
  std::error_code ec;
  return std::filesystem::exists("/proc/driver/nvidia/version", ec) ||
         std::filesystem::exists("/dev/nvidiactl", ec);
}
}  // namespace

Result<std::unique_ptr<Backend>> make_backend(const std::string& device, int threads) {
  if (device == "auto") return make_backend(default_device(), threads);
  if (device == "cpu") return make_cpu_backend(threads);
  if (device == "cuda") {
    if (!nvidia_driver_loaded()) {
      return Status::error(
          "device cuda: this machine has no CUDA device (no NVIDIA driver is loaded); use the "
          "cpu device");
    }
    return load_cuda_backend();
  }
  return Status::error("unknown device '" + device + "' (expected auto, cpu or cuda)");
}

std::string default_device() {
  if (nvidia_driver_loaded() && !find_cuda_module().empty()) return "cuda";
  return "cpu";
}

std::string compiled_backends() {
  std::string list = std::string("cpu (") + cpu::matmul_isa() + ")";
  // Only whether the module is there: loading it would cost the start time it exists to save.
  const std::string module = find_cuda_module();
  if (!module.empty()) list += ", cuda (" + module + ", loaded when used)";
  return list;
}

}  // namespace kestrel
