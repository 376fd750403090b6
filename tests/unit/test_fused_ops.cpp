// The fused ops' default implementations (backend.h) are exactly the plain ops they stand for:
// on the CPU backend, each fused op and its plain sequence give bit-identical outputs, in every
// weight format, with biases and without, and so is decoder_layer's with the five fused ops (the
// shared checks of the device backends, with a second CPU backend as the device and a bound of
// zero).
#include <gtest/gtest.h>

#include <algorithm>
#include <iterator>
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

class CpuDecoderLayer : public ::testing::TestWithParam<DecoderLayerCase> {};

// Backend::decoder_layer's default (the CPU backend's) is the five fused ops one by one: x after
// every layer of every prefill and decode call is the same bit for bit, and the caches they
// leave give the same attention at every later call (check_decoder_layer with a second CPU
// backend as the device and a bound of zero). The check's own sanity runs (a wrong layer index,
// a wrong position) must miss by far.
TEST_P(CpuDecoderLayer, DefaultEqualsTheFiveFusedOpsExactly) {
  const DecoderLayerCase dc = GetParam();
  ModelWeights weights = decoder_layer_model(dc);
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, decoder_layer_shape(dc)));
  int64_t decode_steps = 0, prefill_calls = 0;
  check_decoder_layer(
      pair, weights, [](int64_t) { return 0.0; },
      [&](Backend&, int64_t n, bool done) {
        if (done) ++(n == 1 ? decode_steps : prefill_calls);
      },
      LayerReference::fused_ops);
  EXPECT_EQ(decode_steps, int64_t(std::size(kLayerPrompts)) * kLayerDecodeSteps);
  EXPECT_EQ(prefill_calls, 5);  // 13, 62, and 700 in three
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CpuDecoderLayer,
    ::testing::Values(DecoderLayerCase{},
                      DecoderLayerCase{256, 8, 2, 32, 320, {WeightFormat::asym_int4, 64}, false},
                      DecoderLayerCase{192, 2, 2, 128, 384, {WeightFormat::fp16, 0}, true}),
    decoder_layer_case_name);

}  // namespace
}  // namespace kestrel::backend_test
