// The Vulkan tests' helpers: the device backends' shared harness (unit/backend_test_util.h),
// with Vulkan as the device (vulkan_environment.cpp).
#pragma once

#include "../unit/backend_test_util.h"
#include "backend/vulkan/vulkan_backend.h"

namespace kestrel::vulkan_test {
using namespace kestrel::backend_test;
}  // namespace kestrel::vulkan_test
