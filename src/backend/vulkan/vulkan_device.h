// The Vulkan loader (libvulkan.so.1, opened on first use so that a binary never using Vulkan
// neither needs nor loads it), the functions Kestrel calls through it, and the listing of
// devices with whether each can run the backend.
#pragma once

#define VK_NO_PROTOTYPES
#include <vulkan/vulkan.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"

namespace kestrel::vulkan {

// Every Vulkan function the backend calls, resolved through vkGetInstanceProcAddr.
#define KESTREL_VK_INSTANCE_FUNCTIONS(X)      \
  X(vkDestroyInstance)                        \
  X(vkEnumeratePhysicalDevices)               \
  X(vkGetPhysicalDeviceProperties)            \
  X(vkGetPhysicalDeviceProperties2)           \
  X(vkGetPhysicalDeviceFeatures2)             \
  X(vkGetPhysicalDeviceMemoryProperties)      \
  X(vkGetPhysicalDeviceMemoryProperties2)     \
  X(vkGetPhysicalDeviceQueueFamilyProperties) \
  X(vkEnumerateDeviceExtensionProperties)     \
  X(vkCreateDevice)                           \
  X(vkDestroyDevice)                          \
  X(vkGetDeviceQueue)                         \
  X(vkCreateBuffer)                           \
  X(vkDestroyBuffer)                          \
  X(vkGetBufferMemoryRequirements)            \
  X(vkAllocateMemory)                         \
  X(vkFreeMemory)                             \
  X(vkBindBufferMemory)                       \
  X(vkMapMemory)                              \
  X(vkGetBufferDeviceAddress)                 \
  X(vkCreateShaderModule)                     \
  X(vkDestroyShaderModule)                    \
  X(vkCreatePipelineLayout)                   \
  X(vkDestroyPipelineLayout)                  \
  X(vkCreateComputePipelines)                 \
  X(vkDestroyPipeline)                        \
  X(vkCreateCommandPool)                      \
  X(vkDestroyCommandPool)                     \
  X(vkAllocateCommandBuffers)                 \
  X(vkBeginCommandBuffer)                     \
  X(vkEndCommandBuffer)                       \
  X(vkResetCommandBuffer)                     \
  X(vkCmdBindPipeline)                        \
  X(vkCmdPushConstants)                       \
  X(vkCmdDispatch)                            \
  X(vkCmdPipelineBarrier)                     \
  X(vkCmdCopyBuffer)                          \
  X(vkCmdFillBuffer)                          \
  X(vkCreateQueryPool)                        \
  X(vkDestroyQueryPool)                       \
  X(vkCmdResetQueryPool)                      \
  X(vkCmdWriteTimestamp)                      \
  X(vkGetQueryPoolResults)                    \
  X(vkCreateFence)                            \
  X(vkDestroyFence)                           \
  X(vkResetFences)                            \
  X(vkWaitForFences)                          \
  X(vkQueueSubmit)                            \
  X(vkDeviceWaitIdle)

struct Functions {
  PFN_vkCreateInstance vkCreateInstance = nullptr;
#define KESTREL_VK_MEMBER(name) PFN_##name name = nullptr;
  KESTREL_VK_INSTANCE_FUNCTIONS(KESTREL_VK_MEMBER)
#undef KESTREL_VK_MEMBER
};

// The process's Vulkan instance, with every function of Functions resolved. One for the life
// of the process, created on first use and never destroyed: destroying the last instance makes
// the loader unload the driver, and NVIDIA's driver (libGLX_nvidia) cannot be loaded again and
// again in one process (its static TLS runs out: after ~30 backends, vkCreateInstance failed
// with VK_ERROR_INCOMPATIBLE_DRIVER on the H200). Backends create and destroy their devices.
class Instance {
 public:
  // The instance, or why there is none (the same error on every call).
  static Result<std::shared_ptr<const Instance>> shared();
  ~Instance();
  Instance(const Instance&) = delete;
  Instance& operator=(const Instance&) = delete;

  const Functions& vk() const { return vk_; }
  VkInstance handle() const { return instance_; }
  std::vector<VkPhysicalDevice> physical_devices() const;

 private:
  Instance() = default;
  static Result<std::unique_ptr<Instance>> create();
  Functions vk_;
  VkInstance instance_ = VK_NULL_HANDLE;
};

// What the backend needs of a device: Vulkan 1.2, buffer device addresses (the shaders address
// every tensor through a 64-bit pointer in their push constants), 64-bit integers, subgroup
// arithmetic in compute shaders, and a compute queue.
struct DeviceInfo {
  int index = 0;  // position in the instance's enumeration: `--device vulkan:INDEX`
  std::string name;
  std::string type;  // "discrete GPU", "integrated GPU", "CPU", ...
  uint32_t api_version = 0;
  uint64_t device_local_bytes = 0;  // the largest device-local heap
  uint32_t subgroup_size = 0;
  bool has_memory_budget = false;  // VK_EXT_memory_budget
  std::string unusable;            // empty when the backend can run on it; else why not
  int rank = 0;                    // lower is preferred by plain `--device vulkan`
};

DeviceInfo describe_device(const Instance& instance, VkPhysicalDevice device, int index);

// Every Vulkan device of the machine, or why none can be listed (no loader, no driver).
Result<std::vector<DeviceInfo>> list_devices();

// "vulkan" (the preferred usable device) or "vulkan:N" -> the device index; error for others.
Result<int> parse_device_index(const std::string& device, const std::vector<DeviceInfo>& devices);

// VkResult as its name ("VK_ERROR_DEVICE_LOST").
std::string result_name(VkResult result);

}  // namespace kestrel::vulkan
