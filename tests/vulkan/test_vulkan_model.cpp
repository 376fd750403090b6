// The whole model on Vulkan: against Hugging Face transformers (the fixtures of
// tests/golden/models, hf_fixture.h) and against the CPU backend on the synthetic tiny models,
// prefill in chunks and decode alike.
#include <gtest/gtest.h>

#include <random>

#include "../golden/hf_fixture.h"
#include "../unit/argmax_rows_check.h"
#include "kestrel/engine.h"
#include "vulkan_test_util.h"

namespace kestrel::vulkan_test {
namespace {

using hf_fixture::compare;
using hf_fixture::Comparison;

std::unique_ptr<Engine> make_engine(const std::string& model, WeightFormat format,
                                    const std::string& device, int block = 32) {
  return hf_fixture::device_engine(model, format, block, device);
}

// Float formats: the CPU's own golden bounds (tests/golden/test_hf_models.cpp, where each is
// explained), set by the rounding of the weights against HF's original float32 ones. Integer
// formats are compared with HF float32 on weights quantize-dequantized by make_golden.py's
// independent implementation of format.h; the CPU rounds activations to int8 on top (bound
// 0.12), the Vulkan backend does not, so only fp32 summation order remains (~2e-6 measured on
// lavapipe): 1e-4 and every top-1 equal. A wrong scale, nibble or group gives errors near 1.

const std::vector<hf_fixture::FormatBound> kVsHf = {
    {WeightFormat::fp32, 0, 1e-3, 1.0},       {WeightFormat::fp16, 0, 1e-2, 0.95},
    {WeightFormat::bf16, 0, 5e-2, 0.9},       {WeightFormat::sym_int8, 32, 1e-4, 1.0},
    {WeightFormat::sym_int4, 32, 1e-4, 1.0},  {WeightFormat::sym_int4, 64, 1e-4, 1.0},
    {WeightFormat::asym_int4, 32, 1e-4, 1.0},
};

class VulkanHfGolden : public ::testing::TestWithParam<const char*> {};

TEST_P(VulkanHfGolden, EveryFormatWithinItsBound) {
  const hf_fixture::Fixture f = hf_fixture::load(GetParam());
  std::vector<hf_fixture::FormatBound> bounds;
  for (const hf_fixture::FormatBound& b : kVsHf) {
    if (b.block != 64 || std::string(GetParam()) == "qwen2-tied-f32") bounds.push_back(b);
  }
  hf_fixture::check_formats(f, GetParam(), "Vulkan vs HF", bounds,
                            [&](WeightFormat format, int block) {
                              return make_engine(f.dir, format, "vulkan", std::max(block, 32));
                            });
}

// Prefill, then decode steps with the argmax on the device: HF's continuation, token for token.
TEST_P(VulkanHfGolden, GreedyMatchesHf) {
  const hf_fixture::Fixture f = hf_fixture::load(GetParam());
  for (WeightFormat format : {WeightFormat::fp32, WeightFormat::fp16}) {
    auto engine = make_engine(f.dir, format, "vulkan");
    ASSERT_TRUE(engine);
    auto generated = engine->generate_greedy(f.prompt, int64_t(f.greedy.size()));
    ASSERT_TRUE(generated.is_ok()) << generated.status().message();
    EXPECT_EQ(generated->tokens, f.greedy) << format_name(format);
  }
}

INSTANTIATE_TEST_SUITE_P(Models, VulkanHfGolden, ::testing::ValuesIn(hf_fixture::kNames),
                         [](const auto& info) { return hf_fixture::param_name(info.param); });

// The synthetic tiny models (real vocabularies) on both backends: 24 prompt tokens in chunks
// of 16, then greedy decoding. The CPU rounds activations to int8 for the integer formats
// (~1e-2 per matmul), so those are compared with CUDA's bounds against the CPU; float formats
// agree to fp32 summation order.
// A server step's call: every row's argmax on the device, only two rows read back whole
// (Backend::read_rows), against run()'s rows of the same step.
TEST(VulkanModel, ArgmaxWithSomeRowsWholeMatchesRun) {
  auto engine = argmax_rows_check::tiny_three_slot_engine("vulkan");
  ASSERT_TRUE(engine);
  argmax_rows_check::expect_rows_and_argmax_match_run(*engine, 1e-5);
}

TEST(VulkanModel, DrawsAreTheHostSamplersPicks) {
  auto engine = argmax_rows_check::tiny_three_slot_engine("vulkan");
  ASSERT_TRUE(engine);
  argmax_rows_check::expect_draws_match_pick(*engine);
}

TEST(VulkanModel, DrawnStepsRunAheadAsInTurn) {
  auto engine = argmax_rows_check::tiny_three_slot_engine("vulkan");
  ASSERT_TRUE(engine);
  argmax_rows_check::expect_drawn_steps_run_ahead_as_in_turn(*engine);
}

TEST(VulkanModel, TinyModelsMatchCpu) {
  for (const char* name : {"tiny-qwen2", "tiny-llama"}) {
    const std::string model = std::string("synthetic:") + name;
    for (WeightFormat format : {WeightFormat::fp16, WeightFormat::sym_int4}) {
      auto cpu = make_engine(model, format, "cpu");
      auto vk = make_engine(model, format, "vulkan");
      ASSERT_TRUE(cpu && vk);
      const int64_t vocab = cpu->config().vocab_size;
      std::mt19937_64 rng(7);
      std::vector<int32_t> prompt(24);
      for (int32_t& id : prompt) id = int32_t(rng() % uint64_t(vocab));
      auto a = vk->prompt_logits(prompt);
      auto b = cpu->prompt_logits(prompt);
      ASSERT_TRUE(a.is_ok()) << a.status().message();
      ASSERT_TRUE(b.is_ok()) << b.status().message();
      const Comparison c = compare(*a, *b, vocab);
      std::printf("[ %s %s ] Vulkan vs CPU max rel error %.3g, top-1 agreement %.2f\n", name,
                  format_name(format), c.max_rel_error, c.top1_agreement);
      const bool quantized = is_quantized(format);
      EXPECT_LE(c.max_rel_error, quantized ? 8e-2 : 1e-4) << name << " " << format_name(format);
      EXPECT_GE(c.top1_agreement, quantized ? 0.75 : 1.0) << name << " " << format_name(format);
      auto ga = vk->generate_greedy(prompt, 6);
      auto gb = cpu->generate_greedy(prompt, 6);
      ASSERT_TRUE(ga.is_ok()) << ga.status().message();
      ASSERT_TRUE(gb.is_ok()) << gb.status().message();
      if (!quantized) {
        EXPECT_EQ(ga->tokens, gb->tokens) << name;
      }
    }
  }
}

}  // namespace
}  // namespace kestrel::vulkan_test
