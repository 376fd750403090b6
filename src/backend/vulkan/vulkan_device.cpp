#include "backend/vulkan/vulkan_device.h"

#include <dlfcn.h>

#include <algorithm>
#include <mutex>

namespace kestrel::vulkan {
namespace {

struct Loader {
  PFN_vkGetInstanceProcAddr get_instance_proc_addr = nullptr;
  std::string error;
};

// The loader stays open for the life of the process: drivers it loads may keep threads.
const Loader& loader() {
  static Loader loaded;
  static std::once_flag once;
  std::call_once(once, [] {
    void* handle = dlopen("libvulkan.so.1", RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* why = dlerror();
      loaded.error = std::string("the Vulkan loader libvulkan.so.1 is not installed (") +
                     (why != nullptr ? why : "dlopen failed") + ")";
      return;
    }
    loaded.get_instance_proc_addr =
        reinterpret_cast<PFN_vkGetInstanceProcAddr>(dlsym(handle, "vkGetInstanceProcAddr"));
    if (loaded.get_instance_proc_addr == nullptr) {
      loaded.error = "libvulkan.so.1 has no vkGetInstanceProcAddr";
    }
  });
  return loaded;
}

std::string device_type_name(VkPhysicalDeviceType type) {
  switch (type) {
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU:
      return "discrete GPU";
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU:
      return "integrated GPU";
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU:
      return "virtual GPU";
    case VK_PHYSICAL_DEVICE_TYPE_CPU:
      return "CPU";
    default:
      return "other";
  }
}

int device_type_rank(VkPhysicalDeviceType type) {
  switch (type) {
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU:
      return 0;
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU:
      return 1;
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU:
      return 2;
    case VK_PHYSICAL_DEVICE_TYPE_CPU:
      return 4;
    default:
      return 3;
  }
}

}  // namespace

std::string result_name(VkResult result) {
  switch (result) {
#define KESTREL_VK_RESULT(name) \
  case name:                    \
    return #name;
    KESTREL_VK_RESULT(VK_SUCCESS)
    KESTREL_VK_RESULT(VK_NOT_READY)
    KESTREL_VK_RESULT(VK_TIMEOUT)
    KESTREL_VK_RESULT(VK_INCOMPLETE)
    KESTREL_VK_RESULT(VK_ERROR_OUT_OF_HOST_MEMORY)
    KESTREL_VK_RESULT(VK_ERROR_OUT_OF_DEVICE_MEMORY)
    KESTREL_VK_RESULT(VK_ERROR_INITIALIZATION_FAILED)
    KESTREL_VK_RESULT(VK_ERROR_DEVICE_LOST)
    KESTREL_VK_RESULT(VK_ERROR_MEMORY_MAP_FAILED)
    KESTREL_VK_RESULT(VK_ERROR_LAYER_NOT_PRESENT)
    KESTREL_VK_RESULT(VK_ERROR_EXTENSION_NOT_PRESENT)
    KESTREL_VK_RESULT(VK_ERROR_FEATURE_NOT_PRESENT)
    KESTREL_VK_RESULT(VK_ERROR_INCOMPATIBLE_DRIVER)
    KESTREL_VK_RESULT(VK_ERROR_TOO_MANY_OBJECTS)
    KESTREL_VK_RESULT(VK_ERROR_OUT_OF_POOL_MEMORY)
    KESTREL_VK_RESULT(VK_ERROR_INVALID_EXTERNAL_HANDLE)
    KESTREL_VK_RESULT(VK_ERROR_UNKNOWN)
#undef KESTREL_VK_RESULT
    default:
      return "VkResult " + std::to_string(int(result));
  }
}

Result<std::unique_ptr<Instance>> Instance::create() {
  const Loader& l = loader();
  if (l.get_instance_proc_addr == nullptr) return Status::error(l.error);
  std::unique_ptr<Instance> instance(new Instance());
  Functions& vk = instance->vk_;
  vk.vkCreateInstance = reinterpret_cast<PFN_vkCreateInstance>(
      l.get_instance_proc_addr(VK_NULL_HANDLE, "vkCreateInstance"));
  auto enumerate_version = reinterpret_cast<PFN_vkEnumerateInstanceVersion>(
      l.get_instance_proc_addr(VK_NULL_HANDLE, "vkEnumerateInstanceVersion"));
  uint32_t version = VK_API_VERSION_1_0;
  if (enumerate_version != nullptr) enumerate_version(&version);
  if (vk.vkCreateInstance == nullptr || version < VK_API_VERSION_1_2) {
    return Status::error("the Vulkan loader supports Vulkan " +
                         std::to_string(VK_API_VERSION_MAJOR(version)) + "." +
                         std::to_string(VK_API_VERSION_MINOR(version)) + "; Kestrel needs 1.2");
  }
  VkApplicationInfo app{};
  app.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO;
  app.pApplicationName = "kestrel";
  app.pEngineName = "kestrel";
  app.apiVersion = VK_API_VERSION_1_2;
  VkInstanceCreateInfo info{};
  info.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO;
  info.pApplicationInfo = &app;
  const VkResult r = vk.vkCreateInstance(&info, nullptr, &instance->instance_);
  if (r != VK_SUCCESS) {
    return Status::error(
        "vkCreateInstance failed: " + result_name(r) +
        (r == VK_ERROR_INCOMPATIBLE_DRIVER ? " (no Vulkan driver is installed)" : ""));
  }
  bool missing = false;
  std::string missing_name;
#define KESTREL_VK_LOAD(name)                                                                   \
  vk.name = reinterpret_cast<PFN_##name>(l.get_instance_proc_addr(instance->instance_, #name)); \
  if (vk.name == nullptr && !missing) {                                                         \
    missing = true;                                                                             \
    missing_name = #name;                                                                       \
  }
  KESTREL_VK_INSTANCE_FUNCTIONS(KESTREL_VK_LOAD)
#undef KESTREL_VK_LOAD
  if (missing) return Status::error("the Vulkan loader lacks " + missing_name);
  return instance;
}

Result<std::shared_ptr<const Instance>> Instance::shared() {
  // Deliberately never freed (see the header): a static shared_ptr would destroy the instance
  // at exit, while driver threads may still run.
  static const Result<std::shared_ptr<const Instance>>* const instance = [] {
    auto created = create();
    if (!created.is_ok()) return new Result<std::shared_ptr<const Instance>>(created.status());
    return new Result<std::shared_ptr<const Instance>>(
        std::shared_ptr<const Instance>(std::move(created).value()));
  }();
  return *instance;
}

Instance::~Instance() {
  if (instance_ != VK_NULL_HANDLE && vk_.vkDestroyInstance != nullptr) {
    vk_.vkDestroyInstance(instance_, nullptr);
  }
}

std::vector<VkPhysicalDevice> Instance::physical_devices() const {
  uint32_t count = 0;
  if (vk_.vkEnumeratePhysicalDevices(instance_, &count, nullptr) != VK_SUCCESS) return {};
  std::vector<VkPhysicalDevice> devices(count);
  if (vk_.vkEnumeratePhysicalDevices(instance_, &count, devices.data()) != VK_SUCCESS) return {};
  devices.resize(count);
  return devices;
}

DeviceInfo describe_device(const Instance& instance, VkPhysicalDevice device, int index) {
  const Functions& vk = instance.vk();
  DeviceInfo info;
  info.index = index;
  VkPhysicalDeviceSubgroupProperties subgroup{};
  subgroup.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES;
  VkPhysicalDeviceProperties2 props{};
  props.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2;
  props.pNext = &subgroup;
  vk.vkGetPhysicalDeviceProperties2(device, &props);
  info.name = props.properties.deviceName;
  info.type = device_type_name(props.properties.deviceType);
  info.rank = device_type_rank(props.properties.deviceType);
  info.api_version = props.properties.apiVersion;
  info.subgroup_size = subgroup.subgroupSize;

  VkPhysicalDeviceMemoryProperties memory{};
  vk.vkGetPhysicalDeviceMemoryProperties(device, &memory);
  for (uint32_t h = 0; h < memory.memoryHeapCount; ++h) {
    if (memory.memoryHeaps[h].flags & VK_MEMORY_HEAP_DEVICE_LOCAL_BIT) {
      info.device_local_bytes =
          std::max<uint64_t>(info.device_local_bytes, memory.memoryHeaps[h].size);
    }
  }

  uint32_t n_ext = 0;
  vk.vkEnumerateDeviceExtensionProperties(device, nullptr, &n_ext, nullptr);
  std::vector<VkExtensionProperties> extensions(n_ext);
  vk.vkEnumerateDeviceExtensionProperties(device, nullptr, &n_ext, extensions.data());
  for (const VkExtensionProperties& e : extensions) {
    if (std::string(e.extensionName) == VK_EXT_MEMORY_BUDGET_EXTENSION_NAME) {
      info.has_memory_budget = true;
    }
  }

  VkPhysicalDeviceVulkan12Features features12{};
  features12.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES;
  VkPhysicalDeviceFeatures2 features{};
  features.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2;
  features.pNext = &features12;
  if (info.api_version >= VK_API_VERSION_1_2) vk.vkGetPhysicalDeviceFeatures2(device, &features);

  uint32_t n_families = 0;
  vk.vkGetPhysicalDeviceQueueFamilyProperties(device, &n_families, nullptr);
  std::vector<VkQueueFamilyProperties> families(n_families);
  vk.vkGetPhysicalDeviceQueueFamilyProperties(device, &n_families, families.data());
  const bool has_compute = std::any_of(families.begin(), families.end(), [](const auto& f) {
    return (f.queueFlags & VK_QUEUE_COMPUTE_BIT) != 0;
  });

  const VkSubgroupFeatureFlags needed_ops =
      VK_SUBGROUP_FEATURE_BASIC_BIT | VK_SUBGROUP_FEATURE_ARITHMETIC_BIT;
  if (info.api_version < VK_API_VERSION_1_2) {
    info.unusable = "Vulkan " + std::to_string(VK_API_VERSION_MAJOR(info.api_version)) + "." +
                    std::to_string(VK_API_VERSION_MINOR(info.api_version)) + " (needs 1.2)";
  } else if (!features12.bufferDeviceAddress) {
    info.unusable = "no bufferDeviceAddress";
  } else if (!features.features.shaderInt64) {
    info.unusable = "no shaderInt64";
  } else if ((subgroup.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) == 0 ||
             (subgroup.supportedOperations & needed_ops) != needed_ops) {
    info.unusable = "no subgroup arithmetic in compute shaders";
  } else if (!has_compute) {
    info.unusable = "no compute queue";
  }
  return info;
}

Result<std::vector<DeviceInfo>> list_devices() {
  KS_ASSIGN_OR_RETURN(std::shared_ptr<const Instance> instance, Instance::shared());
  std::vector<DeviceInfo> out;
  const std::vector<VkPhysicalDevice> devices = instance->physical_devices();
  for (size_t i = 0; i < devices.size(); ++i) {
    out.push_back(describe_device(*instance, devices[i], int(i)));
  }
  return out;
}

Result<int> parse_device_index(const std::string& device, const std::vector<DeviceInfo>& devices) {
  if (device == "vulkan") {
    const DeviceInfo* best = nullptr;
    for (const DeviceInfo& d : devices) {
      if (d.unusable.empty() && (best == nullptr || d.rank < best->rank)) best = &d;
    }
    if (best == nullptr) {
      std::string why = devices.empty() ? "the Vulkan loader found no device" : "";
      for (const DeviceInfo& d : devices) {
        why += (why.empty() ? "" : "; ") + d.name + ": " + d.unusable;
      }
      return Status::error("device vulkan: no usable Vulkan device (" + why + ")");
    }
    return best->index;
  }
  const std::string prefix = "vulkan:";
  const std::string digits = device.substr(prefix.size());
  if (device.rfind(prefix, 0) != 0 || digits.empty() || digits.size() > 6 ||
      !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return Status::error("unknown device '" + device + "' (expected vulkan or vulkan:N)");
  }
  const int index = std::stoi(digits);
  if (index >= int(devices.size())) {
    return Status::error("device " + device + ": this machine has " +
                         std::to_string(devices.size()) + " Vulkan device(s)");
  }
  if (!devices[size_t(index)].unusable.empty()) {
    return Status::error("device " + device + " (" + devices[size_t(index)].name +
                         ") cannot run Kestrel: " + devices[size_t(index)].unusable);
  }
  return index;
}

}  // namespace kestrel::vulkan
