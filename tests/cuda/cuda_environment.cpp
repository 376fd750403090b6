// Set up once before any CUDA test: the backend linked into this binary serves every "cuda"
// request (Engine::create, make_backend), so a test inspects the very backend an engine runs on
// rather than a second copy loaded from libkestrel_cuda.so. Without a usable device every test
// is skipped and the line below tells ctest (SKIP_REGULAR_EXPRESSION) and the reader why.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda_module.h"
#include "cuda_test_util.h"

namespace kestrel {

namespace backend_test {
Result<std::unique_ptr<Backend>> make_device_backend() {
  return make_cuda_backend();
}
Status write_device_tensor(Backend& backend, Tensor t, const float* host) {
  return cuda::write_tensor(backend, t, host);
}
}  // namespace backend_test

namespace {

class CudaEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    set_cuda_backend_factory(&make_cuda_backend);
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
      std::printf("kestrel_cuda_tests: skipped: no CUDA device (CUDA runtime: %s)\n",
                  err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
      GTEST_SKIP() << "no CUDA device";
    }
  }
};

[[maybe_unused]] ::testing::Environment* const environment =
    ::testing::AddGlobalTestEnvironment(new CudaEnvironment);

}  // namespace
}  // namespace kestrel
