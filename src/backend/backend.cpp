#include "backend/backend.h"

#include <filesystem>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/matmul.h"

namespace kestrel {

#if defined(KESTREL_HAVE_CUDA)
// Defined in src/backend/cuda/ when the CUDA backend is compiled in.
Result<std::unique_ptr<Backend>> make_cuda_backend();
#endif

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
  if (device == "cpu") return make_cpu_backend(threads);
  if (device == "cuda") {
    if (!nvidia_driver_loaded()) {
      return Status::error(
          "--device cuda: this machine has no CUDA device (no NVIDIA driver is loaded); use "
          "--device cpu");
    }
#if defined(KESTREL_HAVE_CUDA)
    return make_cuda_backend();
#else
    return Status::error("--device cuda: this build has no CUDA backend (built without nvcc)");
#endif
  }
  return Status::error("unknown --device '" + device + "' (use cpu or cuda)");
}

std::string default_device() {
#if defined(KESTREL_HAVE_CUDA)
  if (nvidia_driver_loaded()) return "cuda";
#endif
  return "cpu";
}

std::string compiled_backends() {
  std::string list = std::string("cpu (") + cpu::matmul_isa() + ")";
#if defined(KESTREL_HAVE_CUDA)
  list += ", cuda";
#endif
  return list;
}

}  // namespace kestrel
