// The CUDA backend lives in a module (libkestrel_cuda.so) loaded on first use, so a binary that
// never touches a GPU does not load the CUDA runtime and cuBLAS at start, and runs where they
// are not installed. The module exports the C functions below; this header is the contract
// between it and the code that loads it.
#pragma once

#include <memory>
#include <string>

#include "backend/backend.h"
#include "core/status.h"

// Bumped whenever Backend, ModelWeights or anything else passed across the module boundary
// changes layout: a module from another build is refused instead of crashing.
#define KESTREL_CUDA_MODULE_ABI 5

extern "C" {
// Returns KESTREL_CUDA_MODULE_ABI as the module was compiled.
using KestrelCudaModuleAbiFn = int (*)();
// Sets *out to a CUDA backend on device 0, or to why there is none.
using KestrelCudaModuleCreateFn = void (*)(kestrel::Result<std::unique_ptr<kestrel::Backend>>* out);
}

namespace kestrel {

inline constexpr const char* kCudaModuleFile = "libkestrel_cuda.so";
inline constexpr const char* kCudaModuleAbiSymbol = "kestrel_cuda_module_abi";
inline constexpr const char* kCudaModuleCreateSymbol = "kestrel_cuda_module_create";

// A CUDA backend from the module (found next to the binary or library holding this code, or in
// the install tree's library directory), or an error saying what is missing: the module, the
// CUDA libraries it needs, or a device.
Result<std::unique_ptr<Backend>> load_cuda_backend();

// Where the module would be loaded from, or an empty string when it is not found. Does not
// load it.
std::string find_cuda_module();

// Makes "cuda" use `factory` instead of the module: for binaries that link the CUDA backend in
// (the CUDA tests), so that the backend an Engine runs on is the one the test inspects.
void set_cuda_backend_factory(Result<std::unique_ptr<Backend>> (*factory)());

}  // namespace kestrel
