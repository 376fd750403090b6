// The entry points of libkestrel_cuda.so (backend/cuda_module.h): the only symbols the module
// exports; everything else in it, its copy of the Kestrel library included, is hidden.
#include <cuda_runtime.h>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda_module.h"

#define KESTREL_MODULE_EXPORT extern "C" __attribute__((visibility("default")))

KESTREL_MODULE_EXPORT int kestrel_cuda_module_abi() {
  return KESTREL_CUDA_MODULE_ABI;
}

KESTREL_MODULE_EXPORT void kestrel_cuda_module_create(
    kestrel::Result<std::unique_ptr<kestrel::Backend>>* out) {
  // Without a driver or a GPU the runtime reports different errors (no device, insufficient
  // driver); the user wants to hear one thing first.
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    *out =
        kestrel::Status::error(std::string("no CUDA device (CUDA runtime: ") +
                               (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") + ")");
    return;
  }
  *out = kestrel::make_cuda_backend();
}
