// Every CUDA call and kernel launch is checked; a failure becomes a Status naming the op, the
// call and where it was made, e.g. "cuda matmul: cudaMemcpyAsync(...) failed: invalid argument
// (src/backend/cuda/cuda_backend.cu:412)".
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "core/status.h"

namespace kestrel::cuda {

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) once per device
// for a call site: the attribute is the current device's, so a tensor-parallel thread driving a
// second device sets it again there. `done` is the call site's mask of devices already set (the
// first 64; a device past them sets it at every call).
inline cudaError_t set_smem_limit_once(const void* kernel, int bytes, std::atomic<uint64_t>& done) {
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  const cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess) done.fetch_or(bit, std::memory_order_acq_rel);
  return e;
}

inline Status cuda_error(const char* op, const char* call, const std::string& what,
                         const char* file, int line) {
  return Status::error(std::string("cuda ") + op + ": " + call + " failed: " + what + " (" + file +
                       ":" + std::to_string(line) + ")");
}

}  // namespace kestrel::cuda

// Returns a Status from the enclosing function when the CUDA runtime call `expr` fails.
#define KS_CUDA_CHECK(op, expr)                                                                 \
  do {                                                                                          \
    const cudaError_t ks_cuda_err_ = (expr);                                                    \
    if (ks_cuda_err_ != cudaSuccess) {                                                          \
      return ::kestrel::cuda::cuda_error(op, #expr, cudaGetErrorString(ks_cuda_err_), __FILE__, \
                                         __LINE__);                                             \
    }                                                                                           \
  } while (0)

// Checks the launch just made (bad configuration, missing kernel image, sticky errors);
// `kernel` is a string literal naming the kernel.
#define KS_CUDA_CHECK_LAUNCH(op, kernel)                                                        \
  do {                                                                                          \
    const cudaError_t ks_cuda_err_ = cudaGetLastError();                                        \
    if (ks_cuda_err_ != cudaSuccess) {                                                          \
      return ::kestrel::cuda::cuda_error(op, "launch of " kernel,                               \
                                         cudaGetErrorString(ks_cuda_err_), __FILE__, __LINE__); \
    }                                                                                           \
  } while (0)

#define KS_CUBLAS_CHECK(op, expr)                                                                  \
  do {                                                                                             \
    const cublasStatus_t ks_cublas_st_ = (expr);                                                   \
    if (ks_cublas_st_ != CUBLAS_STATUS_SUCCESS) {                                                  \
      return ::kestrel::cuda::cuda_error(                                                          \
          op, #expr, std::string("cuBLAS status ") + std::to_string(int(ks_cublas_st_)), __FILE__, \
          __LINE__);                                                                               \
    }                                                                                              \
  } while (0)

namespace kestrel::cuda {

// The current device's SM count; a failure to read it is `op`'s error.
inline Result<int> device_sm_count(const char* op) {
  int device = 0, sm_count = 0;
  KS_CUDA_CHECK(op, cudaGetDevice(&device));
  KS_CUDA_CHECK(op, cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  return sm_count;
}

}  // namespace kestrel::cuda
