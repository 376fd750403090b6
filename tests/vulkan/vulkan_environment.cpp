// Set up once before any Vulkan test: the device under test is the preferred Vulkan device
// (`--device vulkan`; on CI Mesa's lavapipe). Without a usable one every test is skipped and the
// line below tells ctest (SKIP_REGULAR_EXPRESSION) and the reader why.
#include <gtest/gtest.h>

#include <cstdio>

#include "backend/vulkan/vulkan_backend.h"
#include "vulkan_test_util.h"

namespace kestrel {

namespace backend_test {
Result<std::unique_ptr<Backend>> make_device_backend() {
  return make_vulkan_backend("vulkan");
}
Status write_device_tensor(Backend& backend, Tensor t, const float* host) {
  return vulkan::write_tensor(backend, t, host);
}
}  // namespace backend_test

namespace {

class VulkanEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    auto backend = make_vulkan_backend("vulkan");
    if (!backend.is_ok()) {
      std::printf("kestrel_vulkan_tests: skipped: no usable Vulkan device (%s)\n",
                  backend.status().message().c_str());
      GTEST_SKIP() << "no Vulkan device";
    }
    std::printf("kestrel_vulkan_tests: on %s\n", (*backend)->name().c_str());
  }
};

[[maybe_unused]] ::testing::Environment* const environment =
    ::testing::AddGlobalTestEnvironment(new VulkanEnvironment);

}  // namespace
}  // namespace kestrel
