// The fused ops' default implementations (backend.h) are exactly the plain ops they stand for:
// on the CPU backend, each fused op and its plain sequence give bit-identical outputs, in every
// weight format, with biases and without (the shared check of the device backends, with a second
// CPU backend as the device and a bound of zero).
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>

#include "backend_op_checks.h"

namespace kestrel::backend_test {

// The harness's "device" in this binary is a second CPU backend.
Result<std::unique_ptr<Backend>> make_device_backend() {
  return make_cpu_backend(2);
}

Status write_device_tensor(Backend& backend, Tensor t, const float* host) {
  (void)backend;
  std::copy(host, host + t.rows * t.cols, static_cast<float*>(t.data));
  return Status::ok();
}

namespace {

class CpuFusedOps : public ::testing::TestWithParam<FusedCase> {};

TEST_P(CpuFusedOps, DefaultsEqualThePlainOpsExactly) {
  const auto [fc, bias] = GetParam();
  ModelWeights weights = fused_ops_model(fc, bias);
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, fused_ops_shape()));
  int watched = 0;
  check_fused_ops(
      pair, weights, [](FusedOutput, int64_t) { return 0.0; },
      [&](Backend&, int64_t, bool) { ++watched; });
  EXPECT_EQ(watched, 10);  // before and after each of the five calls
}

INSTANTIATE_TEST_SUITE_P(FormatsAndBiases, CpuFusedOps,
                         ::testing::Combine(::testing::ValuesIn(kFormats), ::testing::Bool()),
                         fused_case_name);

}  // namespace
}  // namespace kestrel::backend_test
