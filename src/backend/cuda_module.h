// The CUDA backend lives in a module (libkestrel_cuda.so) loaded on first use, so a binary that
// never touches a GPU does not load the CUDA runtime and cuBLAS at start, and runs where they
// are not installed. The module exports the C functions below; this header is the contract
// between it and the code that loads it.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/communicator.h"
#include "core/status.h"

// Bumped whenever Backend, ModelWeights or anything else passed across the module boundary
// changes layout: a module from another build is refused instead of crashing.
#define KESTREL_CUDA_MODULE_ABI 6

namespace kestrel {
// The ranks of a model split over devices: rank i's backend and communicator at index i.
struct DeviceGroup {
  std::vector<std::unique_ptr<Backend>> backends;
  std::vector<std::unique_ptr<Communicator>> comms;
};
}  // namespace kestrel

extern "C" {
// Returns KESTREL_CUDA_MODULE_ABI as the module was compiled.
using KestrelCudaModuleAbiFn = int (*)();
// Sets *out to a CUDA backend on device 0, or to why there is none.
using KestrelCudaModuleCreateFn = void (*)(kestrel::Result<std::unique_ptr<kestrel::Backend>>* out);
// Sets *out to `world` backends on devices 0 .. world - 1 and their NCCL communicators, or to why
// not. Only a module built with NCCL exports it.
using KestrelCudaModuleCreateGroupFn = void (*)(int world,
                                                kestrel::Result<kestrel::DeviceGroup>* out);
}

namespace kestrel {

inline constexpr const char* kCudaModuleFile = "libkestrel_cuda.so";
inline constexpr const char* kCudaModuleAbiSymbol = "kestrel_cuda_module_abi";
inline constexpr const char* kCudaModuleCreateSymbol = "kestrel_cuda_module_create";
inline constexpr const char* kCudaModuleCreateGroupSymbol = "kestrel_cuda_module_create_group";

// A CUDA backend from the module (found next to the binary or library holding this code, or in
// the install tree's library directory), or an error saying what is missing: the module, the
// CUDA libraries it needs, or a device.
Result<std::unique_ptr<Backend>> load_cuda_backend();

// `world` CUDA backends, rank i on device i, with NCCL communicators between them (one group):
// what a model split over the GPUs runs on. Fails when the module was built without NCCL or the
// machine has fewer devices.
Result<DeviceGroup> load_cuda_group(int world);

// Where the module would be loaded from, or an empty string when it is not found. Does not
// load it.
std::string find_cuda_module();

// Makes "cuda" use `factory` instead of the module: for binaries that link the CUDA backend in
// (the CUDA tests), so that the backend an Engine runs on is the one the test inspects.
void set_cuda_backend_factory(Result<std::unique_ptr<Backend>> (*factory)());

}  // namespace kestrel
