// Every Vulkan op against the CPU backend (the reference) on fresh random inputs, with the CUDA
// op tests' harness and bounds; outputs are poisoned with NaN beforehand so an unwritten element
// fails the comparison. The Vulkan backend keeps fp32 activations and KV cache, so where CUDA's
// bounds allow for fp16 activations this backend sits far inside them.
#include <gtest/gtest.h>

#include <functional>

#include "../unit/backend_op_checks.h"
#include "vulkan_test_util.h"

namespace kestrel::vulkan_test {
namespace {

using Op = std::function<Status(Backend&, Tensor out, std::vector<Tensor>& in)>;
struct Input {
  int64_t cols;
  std::vector<float> values;
};

// Runs `op` on the CPU and the device with the same batch and inputs ([batch rows, cols] each)
// into a poisoned [out_rows, out_cols] output; returns {cpu, device} outputs.
std::pair<std::vector<float>, std::vector<float>> run_both(BackendPair& pair, BatchView batch,
                                                           const std::vector<Input>& inputs,
                                                           int64_t out_rows, int64_t out_cols,
                                                           const Op& op) {
  std::vector<float> results[2];
  int i = 0;
  for (Backend* b : {pair.cpu.get(), pair.gpu.get()}) {
    const Status begun = b->begin_batch(pair.paged(batch));
    EXPECT_TRUE(begun.is_ok()) << begun.message();
    std::vector<Tensor> ts;
    for (const Input& in : inputs) {
      auto t = b->scratch(batch.n_tokens, in.cols);
      EXPECT_TRUE(t.is_ok());
      if (!t.is_ok()) return {};
      fill(*b, *t, in.values);
      ts.push_back(*t);
    }
    auto out = b->scratch(out_rows, out_cols);
    EXPECT_TRUE(out.is_ok());
    if (!out.is_ok()) return {};
    poison(*b, *out);
    const Status s = op(*b, *out, ts);
    EXPECT_TRUE(s.is_ok()) << s.message();
    results[i++] = fetch(*b, *out);
  }
  return {results[0], results[1]};
}

// --- matmul ----------------------------------------------------------------------------------

class VulkanMatmul : public ::testing::TestWithParam<FormatCase> {};

// Shapes with rows off the 4-row workgroup and columns off any power of two past 64 (and, for fp
// formats, rows that do not start on 16 bytes: matmul.comp's unaligned path; rows of more than
// 64 16-byte units, so that every format's threads take several units of a row),
// token counts on both sides of the 8-token workgroup, the vector path at 16 and 17 tokens and
// the tiled path at 45. `max_allocation` > 0 splits every weight into parts of that many bytes
// (the iGPU allocation limit, exercised on small weights; the wide shape's rows exceed it).
void check_matmul(const FormatCase fc, size_t max_allocation) {
  const int64_t shapes[][2] = {{200, 192}, {72, 128}, {1040, 576}, {37, 99}, {9, 4160}};
  uint64_t seed = 100 + uint64_t(fc.format) * 10 + uint64_t(fc.block);
  for (const auto& shape : shapes) {
    const int64_t rows = shape[0], cols = shape[1];
    if (cols % 32 != 0 && is_quantized(fc.format)) continue;
    if (cols > 1024 && max_allocation > 0) continue;
    ModelWeights weights;
    weights.config = small_config(cols, rows, 1, 1, 64, 16);
    weights.config.n_layers = 1;
    weights.format = fc.format;
    weights.layers.resize(1);
    weights.layers[0].w_gate = random_linear(fc.format, rows, cols, fc.block, true, seed++);
    BackendPair pair;
    if (max_allocation > 0) {
      auto device = make_vulkan_backend("vulkan", VulkanOptions{max_allocation});
      ASSERT_TRUE(device.is_ok()) << device.status().message();
      pair.cpu = make_cpu_backend(2);
      pair.gpu = std::move(device).value();
      pair.tables = testing::ScrambledBlockTables(RunShape{1, 64, 64, 64}, 0x5eed + 64);
      for (Backend* b : {pair.cpu.get(), pair.gpu.get()}) {
        ASSERT_TRUE(b->upload(weights).is_ok());
        ASSERT_TRUE(b->reserve(weights.config, RunShape{1, 64, 64, 64}).is_ok());
      }
    } else {
      ASSERT_TRUE(pair.init(weights, RunShape{1, 64, 64, 64}));
    }
    const Linear& w = weights.layers[0].w_gate;
    for (int64_t n : {1, 2, 3, 8, 9, 16, 17, 45}) {
      const std::vector<float> x = random_values(size_t(n * cols), seed++);
      const std::vector<float> ref = reference_matmul(w, x, n);
      std::vector<int32_t> meta;
      const auto [cpu, gpu] = run_both(
          pair, batch_of(n, meta), {{cols, x}}, n, rows,
          [&](Backend& b, Tensor out, std::vector<Tensor>& in) { return b.matmul(out, in[0], w); });
      // fp32 activations: only summation order differs from the double reference (~1e-6);
      // the CPU's integer paths quantize activations to int8 (~1e-2). A wrong nibble, scale or
      // group gives errors near 1.
      EXPECT_LE(rel_error(gpu, ref), 2e-3) << rows << "x" << cols << " n=" << n;
      EXPECT_LE(rel_error(gpu, cpu), is_quantized(fc.format) ? 3e-2 : 2e-3)
          << rows << "x" << cols << " n=" << n;
    }
  }
}

TEST_P(VulkanMatmul, MatchesDequantizedReferenceAndCpu) {
  check_matmul(GetParam(), 0);
}

TEST_P(VulkanMatmul, WeightsSplitUnderTheAllocationLimit) {
  check_matmul(GetParam(), 8192);
}

INSTANTIATE_TEST_SUITE_P(Formats, VulkanMatmul, ::testing::ValuesIn(kFormats), format_case_name);

// fp32 activations: summation order only, at every token count.
TEST(VulkanOps, MatmulMultiRunsEveryWeight) {
  check_matmul_multi([](int64_t, int64_t) { return 2e-3; });
}

// --- elementwise ops, norms, rope, embedding ---------------------------------------------------

class VulkanElementwise : public ::testing::Test {
 protected:
  void SetUp() override {
    weights_.config = small_config(300, 352, 4, 2, 64, 50);
    weights_.config.n_layers = 1;
    weights_.format = WeightFormat::fp16;
    weights_.layers.resize(1);
    weights_.layers[0].attn_norm = random_vector(300, 7);
    weights_.layers[0].w_gate = random_linear(WeightFormat::fp16, 352, 300, 0, false, 8);
    weights_.layers[0].w_down = random_linear(WeightFormat::sym_int4, 300, 352, 32, false, 9);
    ASSERT_TRUE(pair_.init(weights_, RunShape{2, 4096, 64, 64}));
  }
  std::pair<std::vector<float>, std::vector<float>> run(int64_t n, const std::vector<Input>& in,
                                                        int64_t out_cols, const Op& op) {
    std::vector<int32_t> meta;
    return run_both(pair_, batch_of(n, meta), in, n, out_cols, op);
  }

  ModelWeights weights_;
  BackendPair pair_;
};

TEST_F(VulkanElementwise, RmsNormAndMatmulAfterIt) {
  for (int64_t n : {1, 5, 40}) {
    const std::vector<Input> in = {{300, random_values(size_t(n * 300), 11 + uint64_t(n), 3.0f)}};
    const auto [cpu, gpu] = run(n, in, 300, [&](Backend& b, Tensor out, std::vector<Tensor>& x) {
      return b.rms_norm(out, x[0], weights_.layers[0].attn_norm, 1e-5f);
    });
    EXPECT_LE(rel_error(gpu, cpu), 1e-6) << "n=" << n;
    const auto [cpu2, gpu2] = run(n, in, 352, [&](Backend& b, Tensor out, std::vector<Tensor>& x) {
      auto h = b.scratch(n, 300);
      if (!h.is_ok()) return h.status();
      KS_RETURN_IF_ERROR(b.rms_norm(*h, x[0], weights_.layers[0].attn_norm, 1e-5f));
      return b.matmul(out, *h, weights_.layers[0].w_gate);
    });
    EXPECT_LE(rel_error(gpu2, cpu2), 2e-3) << "n=" << n;
  }
}

TEST_F(VulkanElementwise, SwigluInPlaceAndIntoMatmul) {
  for (int64_t n : {3, 20}) {
    const std::vector<Input> in = {{352, random_values(size_t(n * 352), 31 + uint64_t(n), 2.0f)},
                                   {352, random_values(size_t(n * 352), 32 + uint64_t(n))}};
    const auto [cpu, gpu] = run(n, in, 352, [](Backend& b, Tensor out, std::vector<Tensor>& x) {
      return b.swiglu(out, x[0], x[1]);
    });
    EXPECT_LE(rel_error(gpu, cpu), 1e-6) << "n=" << n;
    const auto [cpu2, gpu2] = run(n, in, 300, [&](Backend& b, Tensor out, std::vector<Tensor>& x) {
      KS_RETURN_IF_ERROR(b.swiglu(x[0], x[0], x[1]));
      return b.matmul(out, x[0], weights_.layers[0].w_down);
    });
    EXPECT_LE(rel_error(gpu2, cpu2), 3e-2) << "n=" << n;
  }
}

TEST_F(VulkanElementwise, AddAndGather) {
  const int64_t n = 9;
  const std::vector<Input> in = {{300, random_values(size_t(n * 300), 41)},
                                 {300, random_values(size_t(n * 300), 42)}};
  const auto [cpu, gpu] = run(n, in, 300, [](Backend& b, Tensor out, std::vector<Tensor>& x) {
    KS_RETURN_IF_ERROR(b.add(x[0], x[1]));
    const int32_t rows[] = {0, 1, 2, 3, 4, 5, 6, 7, 8};
    return b.gather_rows(out, x[0], rows, 9);
  });
  EXPECT_EQ(gpu, cpu);
  std::vector<int32_t> meta;
  const auto [cpu2, gpu2] = run_both(pair_, batch_of(n, meta), in, 4, 300,
                                     [](Backend& b, Tensor out, std::vector<Tensor>& x) {
                                       const int32_t picks[] = {8, 0, 3, 3};
                                       return b.gather_rows(out, x[0], picks, 4);
                                     });
  EXPECT_EQ(gpu2, cpu2);
  EXPECT_EQ(gpu2[0], in[0].values[8 * 300]);
}

TEST(VulkanOps, ArgmaxRowsTakesTheFirstOfTies) {
  check_argmax_rows_first_of_ties();
}

TEST(VulkanOps, PickRowsDrawTheHostSamplersTokens) {
  check_pick_rows_draw_as_the_host_sampler(4097, 99);
}

TEST(VulkanOps, ReadRowsAndNanArgmaxMatchTheCpu) {
  check_read_rows_and_nan_argmax();
}

class VulkanRope : public ::testing::TestWithParam<bool> {};

// The cos / sin table is the CPU's, computed on the host: exact up to the rotation's rounding.
TEST_P(VulkanRope, MatchesCpuAtLargePositions) {
  check_rope_at_large_positions(GetParam(), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(PlainAndLlama3, VulkanRope, ::testing::Bool());

class VulkanEmbed : public ::testing::TestWithParam<FormatCase> {};

// Every format is reproduced bit for bit, also with the table split into parts of 4 KiB.
TEST_P(VulkanEmbed, RowsMatchCpuExactly) {
  const FormatCase fc = GetParam();
  ModelWeights weights;
  weights.config = small_config(192, 64, 1, 1, 64, 300);
  weights.config.n_layers = 1;
  weights.format = fc.format;
  weights.layers.resize(1);
  weights.tok_embd = random_weight(fc.format, 300, 192, fc.block, 71);
  for (size_t max_allocation : {size_t(0), size_t(4096)}) {
    BackendPair pair;
    pair.cpu = make_cpu_backend(2);
    auto device = make_vulkan_backend("vulkan", VulkanOptions{max_allocation});
    ASSERT_TRUE(device.is_ok()) << device.status().message();
    pair.gpu = std::move(device).value();
    const RunShape shape{1, 64, 16, 16};
    pair.tables = testing::ScrambledBlockTables(shape, 0x5eed + 64);
    for (Backend* b : {pair.cpu.get(), pair.gpu.get()}) {
      ASSERT_TRUE(b->upload(weights).is_ok());
      ASSERT_TRUE(b->reserve(weights.config, shape).is_ok());
    }
    const int64_t n = 6;
    const int32_t tokens[n] = {299, 0, 17, 17, 150, 1};
    const int32_t positions[n] = {0, 1, 2, 3, 4, 5};
    const int32_t seqs[n] = {0, 0, 0, 0, 0, 0};
    const auto [cpu, gpu] = run_both(pair, BatchView{n, tokens, positions, seqs}, {}, n, 192,
                                     [&](Backend& b, Tensor out, std::vector<Tensor>&) {
                                       return b.embed(out, weights.tok_embd);
                                     });
    EXPECT_EQ(gpu, cpu) << "allocation limit " << max_allocation;
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, VulkanEmbed, ::testing::ValuesIn(kFormats), format_case_name);

// --- attention and the KV cache ------------------------------------------------------------------

class VulkanAttention : public ::testing::TestWithParam<int> {};

// A model-shaped sequence of prefill and decode calls over three sequences through shuffled
// block tables, then a block copied to another sequence and read there (backend_op_checks.h).
// fp32 throughout: summation order and exp's rounding only (CUDA's bound is 5e-3).
TEST_P(VulkanAttention, MatchesCpuOverPrefillDecodeAndBlockCopy) {
  check_attention_over_prefill_and_decode(GetParam(), 5e-5, /*copy_block=*/true);
}

INSTANTIATE_TEST_SUITE_P(HeadDims, VulkanAttention, ::testing::Values(64, 128, 24));

// --- fused ops ---------------------------------------------------------------------------------

class VulkanFusedOps : public ::testing::TestWithParam<FusedCase> {};

// check_fused_ops's bound for `format`: those of the plain ops' tests above.
auto fused_bound(WeightFormat format) {
  return [format](FusedOutput what, int64_t) {
    switch (what) {
      case FusedOutput::normed:
      case FusedOutput::rope:
        return 1e-6;
      case FusedOutput::attention:
        return 5e-5;
      case FusedOutput::matmul:
        break;
    }
    return is_quantized(format) ? 3e-2 : 2e-3;
  };
}

// The fused ops (this backend's are the plain ops in sequence, backend.h's defaults) against the
// CPU's plain ops (backend_op_checks.h).
TEST_P(VulkanFusedOps, MatchCpuPlainOps) {
  const auto [fc, bias] = GetParam();
  ModelWeights weights = fused_ops_model(fc, bias);
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, fused_ops_shape()));
  check_fused_ops(pair, weights, fused_bound(fc.format), [](Backend&, int64_t, bool) {});
}

INSTANTIATE_TEST_SUITE_P(FormatsAndBiases, VulkanFusedOps,
                         ::testing::Combine(::testing::ValuesIn(kFormats), ::testing::Bool()),
                         fused_case_name);

// decoder_layer (this backend's is the five fused ops, backend.h's default) against the CPU's over
// check_decoder_layer's prefills and decode steps: sym_int4 weights, q/k/v with a bias, 2 query
// heads per KV head. The layer's update of x passes through three matmuls in series (q/k/v,
// attention, wo; the norm of x + o, gate/up, w_down) and attention (for scores kLayerScoreScale
// times as large), so it is held to the sum of their bounds in fused_bound, 9e-2; the update
// misses the CPU's by up to 2.3e-2 (the CPU's int8 inputs).
TEST(VulkanDecoderLayer, MatchesCpu) {
  const DecoderLayerCase dc;
  ModelWeights weights = decoder_layer_model(dc);
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, decoder_layer_shape(dc)));
  const auto op_bound = fused_bound(dc.format.format);
  const double bound =
      3 * op_bound(FusedOutput::matmul, 1) + kLayerScoreScale * op_bound(FusedOutput::attention, 1);
  check_decoder_layer(
      pair, weights, [&](int64_t) { return bound; }, [](Backend&, int64_t, bool) {});
}

// The same chain (prefill, attention over earlier calls' cache, decode) with a submission after
// every dispatch: each dependent pair of dispatches straddles a submission boundary, so a
// barrier or a host write that relies on one command buffer would show here.
TEST(VulkanSubmissions, FusedOpsAcrossEverySubmissionBoundary) {
  const FormatCase fc{WeightFormat::sym_int4, 32};
  ModelWeights weights = fused_ops_model(fc, true);
  VulkanOptions options;
  options.dispatches_per_submission = 1;
  auto device = make_vulkan_backend("vulkan", options);
  ASSERT_TRUE(device.is_ok()) << device.status().message();
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, fused_ops_shape(), std::move(device).value()));
  check_fused_ops(pair, weights, fused_bound(fc.format), [](Backend&, int64_t, bool) {});
}

// --- memory, limits, checks --------------------------------------------------------------------

TEST(VulkanBackend, ReportsMemoryAndRefusesWhatItCannotHold) {
  ModelWeights weights;
  weights.config = small_config(256, 256, 4, 2, 64, 64);
  weights.config.n_layers = 2;
  weights = random_model(weights.config, WeightFormat::sym_int4, 32, true, 5);
  auto device = make_vulkan_backend("vulkan");
  ASSERT_TRUE(device.is_ok()) << device.status().message();
  Backend& b = **device;
  ASSERT_TRUE(b.upload(weights).is_ok());
  const size_t after_upload = b.memory_in_use();
  EXPECT_GE(after_upload, weights.resident_bytes());
  EXPECT_GT(b.free_memory(), 0u);
  const RunShape shape{1, 256, 16, 4};
  ASSERT_TRUE(b.reserve(weights.config, shape).is_ok());
  auto layout = b.reserve_layout(weights.config, shape);
  ASSERT_TRUE(layout.is_ok());
  EXPECT_GE(b.memory_in_use() - after_upload, layout->total_bytes());
  EXPECT_EQ(b.peak_memory(), b.memory_in_use());
  // One layer's KV cache of 262145 blocks x 16 x 128 floats (2147491840 bytes) is over the
  // 2 GiB every allocation stays under: refused with both numbers before anything is allocated.
  const Status s = b.reserve(weights.config, RunShape{1, (int64_t(1) << 22) + 16, 16, 4});
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("2147491840"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("2147483648"), std::string::npos) << s.message();
  EXPECT_EQ(b.memory_in_use(), after_upload);
  // A weight that was never uploaded is refused, not read from address 0.
  ASSERT_TRUE(b.reserve(weights.config, shape).is_ok());
  Linear stray = random_linear(WeightFormat::sym_int4, 64, 256, 32, false, 9);
  std::vector<int32_t> meta;
  ASSERT_TRUE(b.begin_batch(testing::ScrambledBlockTables(shape, 1)(batch_of(1, meta))).is_ok());
  auto x = b.scratch(1, 256), y = b.scratch(1, 64);
  ASSERT_TRUE(x.is_ok() && y.is_ok());
  EXPECT_FALSE(b.matmul(*y, *x, stray).is_ok());
}

// The roofline is the device's measured copy rate, measured once, and the probe's buffers are
// gone afterwards (neither the memory in use nor the peak shows them). The probe checks words
// spread from the first to the last 16 bytes of the destination after its copies and reports a
// failed measurement (0 GB/s) when any is wrong, so a copy shader that copies nothing, or only
// part of the buffer, fails here instead of measuring a huge bandwidth.
TEST(VulkanBackend, MeasuresItsCopyBandwidthOnce) {
  auto device = make_vulkan_backend("vulkan");
  ASSERT_TRUE(device.is_ok()) << device.status().message();
  Backend& b = **device;
  const size_t in_use = b.memory_in_use(), peak = b.peak_memory();
  const Roofline r = b.roofline();
  EXPECT_GT(r.bandwidth_gbs, 0.0) << r.source;
  EXPECT_NE(r.source.find("measured: compute-shader copy"), std::string::npos) << r.source;
  EXPECT_NE(r.source.find("read + write"), std::string::npos) << r.source;
  EXPECT_EQ(b.memory_in_use(), in_use);
  EXPECT_EQ(b.peak_memory(), peak);
  const Roofline again = b.roofline();
  EXPECT_EQ(again.bandwidth_gbs, r.bandwidth_gbs);
  EXPECT_EQ(again.source, r.source);
}

TEST(VulkanBackend, DeviceNamesAreChecked) {
  EXPECT_FALSE(make_vulkan_backend("vulkan:999").is_ok());
  EXPECT_FALSE(make_vulkan_backend("vulkan:x").is_ok());
  EXPECT_FALSE(make_vulkan_backend("vulkan:").is_ok());
  auto lines = describe_vulkan_devices();
  ASSERT_TRUE(lines.is_ok()) << lines.status().message();
  ASSERT_FALSE(lines->empty());
  EXPECT_EQ((*lines)[0].rfind("vulkan:0", 0), 0u) << (*lines)[0];
}

}  // namespace
}  // namespace kestrel::vulkan_test
