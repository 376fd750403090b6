#include "backend/cuda_module.h"

#include <dlfcn.h>

#include <filesystem>
#include <mutex>
#include <system_error>
#include <vector>

namespace kestrel {
namespace {

namespace fs = std::filesystem;

Result<std::unique_ptr<Backend>> (*g_factory)() = nullptr;

// The directory of the binary or shared library this code was linked into. dladdr names the
// main program by its argv[0], which may be relative or bare; /proc/self/exe is absolute.
fs::path own_directory() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&find_cuda_module), &info) != 0 && info.dli_fname != nullptr &&
      info.dli_fname[0] == '/') {
    std::error_code ec;
    const fs::path real = fs::canonical(info.dli_fname, ec);
    if (!ec) return real.parent_path();
  }
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  return ec ? fs::path() : exe.parent_path();
}

// Next to this binary (the build tree), the install tree's library directory relative to it,
// then the library directory Kestrel was configured to install into.
std::vector<fs::path> module_candidates() {
  std::vector<fs::path> dirs;
  const fs::path own = own_directory();
  if (!own.empty()) {
    dirs.push_back(own);
#if defined(KESTREL_CUDA_MODULE_RELDIR)
    dirs.push_back((own / KESTREL_CUDA_MODULE_RELDIR).lexically_normal());
#endif
  }
#if defined(KESTREL_CUDA_MODULE_LIBDIR)
  dirs.push_back(fs::path(KESTREL_CUDA_MODULE_LIBDIR));
#endif
  std::vector<fs::path> files;
  for (const fs::path& dir : dirs) files.push_back(dir / kCudaModuleFile);
  return files;
}

[[maybe_unused]] std::string join_dirs(const std::vector<fs::path>& files) {
  std::string out;
  for (const fs::path& f : files) {
    if (!out.empty()) out += ", ";
    out += f.parent_path().string();
  }
  return out;
}

struct LoadedModule {
  KestrelCudaModuleCreateFn create = nullptr;
  KestrelCudaModuleCreateGroupFn create_group = nullptr;  // absent: built without NCCL
  Status status;
};

// The CUDA runtime does not support being unloaded while it holds a context, and backends made
// by the module run its code: the module, once loaded, stays for the life of the process.
LoadedModule open_module() {
  LoadedModule loaded;
  const std::string path = find_cuda_module();
  if (path.empty()) {
#if defined(KESTREL_HAVE_CUDA)
    loaded.status = Status::error(std::string("CUDA backend module ") + kCudaModuleFile +
                                  " not found (looked in " + join_dirs(module_candidates()) + ")");
#else
    loaded.status =
        Status::error("this build of Kestrel has no CUDA backend (it was built without nvcc)");
#endif
    return loaded;
  }
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    loaded.status = Status::error("cannot load the CUDA backend " + path + ": " +
                                  (why != nullptr ? why : "unknown error") +
                                  " (it needs the CUDA runtime and cuBLAS libraries"
#if defined(KESTREL_CUDA_VERSION_MAJOR)
                                  " of CUDA " KESTREL_CUDA_VERSION_MAJOR
#endif
                                  " and an NVIDIA driver)");
    return loaded;
  }
  auto abi = reinterpret_cast<KestrelCudaModuleAbiFn>(dlsym(handle, kCudaModuleAbiSymbol));
  auto create = reinterpret_cast<KestrelCudaModuleCreateFn>(dlsym(handle, kCudaModuleCreateSymbol));
  if (abi == nullptr || create == nullptr) {
    loaded.status = Status::error(path + " is not a Kestrel CUDA backend module (no " +
                                  kCudaModuleCreateSymbol + ")");
    return loaded;
  }
  if (abi() != KESTREL_CUDA_MODULE_ABI) {
    loaded.status =
        Status::error(path + " is from another Kestrel build (module ABI " + std::to_string(abi()) +
                      ", this binary expects " + std::to_string(KESTREL_CUDA_MODULE_ABI) + ")");
    return loaded;
  }
  loaded.create = create;
  loaded.create_group =
      reinterpret_cast<KestrelCudaModuleCreateGroupFn>(dlsym(handle, kCudaModuleCreateGroupSymbol));
  return loaded;
}

const LoadedModule& loaded_module() {
  static std::once_flag once;
  static LoadedModule module;
  std::call_once(once, [] { module = open_module(); });
  return module;
}

}  // namespace

std::string find_cuda_module() {
  for (const fs::path& file : module_candidates()) {
    std::error_code ec;
    if (fs::is_regular_file(file, ec)) return file.string();
  }
  return "";
}

void set_cuda_backend_factory(Result<std::unique_ptr<Backend>> (*factory)()) {
  g_factory = factory;
}

Result<std::unique_ptr<Backend>> load_cuda_backend() {
  if (g_factory != nullptr) return g_factory();
  const LoadedModule& module = loaded_module();
  if (module.create == nullptr) return module.status;
  Result<std::unique_ptr<Backend>> out = Status::error("CUDA backend module returned nothing");
  module.create(&out);
  return out;
}

Result<DeviceGroup> load_cuda_group(int world) {
  const LoadedModule& module = loaded_module();
  if (module.create == nullptr) return module.status;
  if (module.create_group == nullptr) {
    return Status::error(
        "this CUDA backend was built without NCCL, which splitting a model over GPUs needs "
        "(configure with -DKESTREL_NCCL=ON where nccl.h and libnccl are installed)");
  }
  Result<DeviceGroup> out = Status::error("CUDA backend module returned no device group");
  module.create_group(world, &out);
  return out;
}

}  // namespace kestrel
