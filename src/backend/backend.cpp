#include "backend/backend.h"

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/matmul.h"
#include "backend/cuda_module.h"

namespace kestrel {

Result<std::unique_ptr<Backend>> make_backend(const std::string& device, int threads) {
  if (device == "cpu") return make_cpu_backend(threads);
  if (device == "cuda") return load_cuda_backend();
  return Status::error("unknown device '" + device + "' (expected cpu or cuda)");
}

std::string compiled_backends() {
  std::string list = std::string("cpu (") + cpu::matmul_isa() + ")";
  // Only whether the module is there: loading it would cost the start time it exists to save.
  const std::string module = find_cuda_module();
  if (!module.empty()) list += ", cuda (" + module + ", loaded when used)";
  return list;
}

}  // namespace kestrel
