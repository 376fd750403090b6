// The Hugging Face fixtures of tests/golden/models, made by scripts/make_golden.py: tiny random
// Qwen2 and Llama checkpoints with HF float32 logits of every prompt position, a 32-token greedy
// continuation, and the logits of weights quantize-dequantized by make_golden.py's independent
// implementation of quant/format.h. Shared by the CPU golden tests and the CUDA and Vulkan tests.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "kestrel/engine.h"
#include "quant/format.h"

namespace kestrel::hf_fixture {

// The fixtures, by directory name under tests/golden/models.
inline const char* const kNames[] = {"qwen2-tied-f32", "llama3-scaled-bf16-sharded",
                                     "llama-tied-bias-f16"};

struct Fixture {
  std::string dir;
  std::vector<int32_t> prompt;
  std::vector<int32_t> greedy;
  int64_t vocab = 0;
  std::vector<float> logits;  // [prompt, vocab], HF float32 on the original weights
};

inline Fixture load(const std::string& name) {
  Fixture f;
  f.dir = std::string(KESTREL_SOURCE_DIR) + "/tests/golden/models/" + name;
  std::ifstream ref_file(f.dir + "/reference.json");
  EXPECT_TRUE(ref_file.good()) << f.dir;
  const auto ref = nlohmann::json::parse(ref_file);
  f.prompt = ref["prompt"].get<std::vector<int32_t>>();
  f.greedy = ref["greedy"].get<std::vector<int32_t>>();
  f.vocab = ref["vocab_size"].get<int64_t>();
  f.logits.resize(f.prompt.size() * size_t(f.vocab));
  std::ifstream logits_file(f.dir + "/logits.f32", std::ios::binary);
  logits_file.read(reinterpret_cast<char*>(f.logits.data()),
                   std::streamsize(f.logits.size() * sizeof(float)));
  EXPECT_TRUE(logits_file.good()) << "logits.f32 of " << name;
  return f;
}

// The reference a format is compared with: HF float32 logits for the float formats, the
// fake-quantized ones (logits_<format>_b<block>.f32) for the integer formats.
inline std::vector<float> reference_logits(const Fixture& f, WeightFormat format, int block) {
  if (!is_quantized(format)) return f.logits;
  const std::string path =
      f.dir + "/logits_" + format_name(format) + "_b" + std::to_string(block) + ".f32";
  std::vector<float> logits(f.logits.size());
  std::ifstream file(path, std::ios::binary);
  file.read(reinterpret_cast<char*>(logits.data()), std::streamsize(logits.size() * sizeof(float)));
  EXPECT_TRUE(file.good()) << path;
  return logits;
}

// The worst per-position ||ours - ref|| / ||ref|| of [positions, vocab] logits (infinite when
// either holds a NaN), and how often the top-1 token agrees.
struct Comparison {
  double max_rel_error = 0;
  double top1_agreement = 0;
};

inline Comparison compare(const std::vector<float>& ours, const std::vector<float>& ref,
                          int64_t vocab) {
  Comparison c;
  EXPECT_EQ(ours.size(), ref.size());
  const size_t n = std::min(ours.size(), ref.size()) / size_t(vocab);
  int agree = 0;
  for (size_t p = 0; p < n; ++p) {
    const float* a = ours.data() + p * size_t(vocab);
    const float* b = ref.data() + p * size_t(vocab);
    double diff = 0, norm = 0;
    for (int64_t i = 0; i < vocab; ++i) {
      if (std::isnan(a[i]) || std::isnan(b[i])) diff = INFINITY;
      diff += double(a[i] - b[i]) * double(a[i] - b[i]);
      norm += double(b[i]) * double(b[i]);
    }
    c.max_rel_error = std::max(c.max_rel_error, norm > 0 ? std::sqrt(diff / norm) : diff);
    agree += argmax(a, vocab) == argmax(b, vocab);
  }
  c.top1_agreement = n > 0 ? double(agree) / double(n) : 0;
  return c;
}

// An engine on `device` and `model` (2 threads, context 256, prompts in chunks of 16, so the KV
// cache is used across calls) with weights in `format` (unset: the source chooses) and `block`,
// split over `tensor_parallel` ranks. Null, with a test failure, on error.
inline std::unique_ptr<Engine> device_engine(const std::string& model,
                                             std::optional<WeightFormat> format, int block,
                                             const std::string& device, int tensor_parallel = 1) {
  EngineOptions options;
  options.model = model;
  options.format = format;
  options.block = block;
  options.device = device;
  options.threads = 2;
  options.progress = false;
  options.max_context = 256;
  options.prefill_chunk = 16;
  options.tensor_parallel = tensor_parallel;
  auto engine = Engine::create(options);
  EXPECT_TRUE(engine.is_ok()) << engine.status().message();
  return engine.is_ok() ? std::move(engine).value() : nullptr;
}

// device_engine on the CPU with 32-weight blocks.
inline std::unique_ptr<Engine> cpu_engine(const std::string& model,
                                          std::optional<WeightFormat> format,
                                          int tensor_parallel = 1) {
  return device_engine(model, format, 32, "cpu", tensor_parallel);
}

// A weight format's bound on the worst position's normalized logit error against the fixture's
// reference (reference_logits), and on top-1 agreement.
struct FormatBound {
  WeightFormat format;
  int block;
  double max_rel_error;
  double min_top1_agreement;
};

// Runs the prompt through `make_engine(format, block)` for each bound and checks its logits;
// prints one line a format, `label` naming the backend.
template <typename MakeEngine>
void check_formats(const Fixture& f, const std::string& name, const std::string& label,
                   const std::vector<FormatBound>& bounds, MakeEngine make_engine) {
  for (const FormatBound& bound : bounds) {
    std::unique_ptr<Engine> engine = make_engine(bound.format, bound.block);
    ASSERT_TRUE(engine);
    auto logits = engine->prompt_logits(f.prompt);
    ASSERT_TRUE(logits.is_ok()) << logits.status().message();
    const Comparison c =
        compare(*logits, reference_logits(f, bound.format, bound.block), f.vocab);
    std::printf("[ %s %s b%d ] %s max rel error %.3g, top-1 agreement %.2f\n", name.c_str(),
                format_name(bound.format), bound.block, label.c_str(), c.max_rel_error,
                c.top1_agreement);
    EXPECT_LE(c.max_rel_error, bound.max_rel_error) << format_name(bound.format);
    EXPECT_GE(c.top1_agreement, bound.min_top1_agreement) << format_name(bound.format);
  }
}

// A fixture's name as a gtest parameter name ("qwen2_tied_f32").
inline std::string param_name(const std::string& name) {
  std::string s = name;
  for (char& ch : s) {
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  }
  return s;
}

}  // namespace kestrel::hf_fixture
