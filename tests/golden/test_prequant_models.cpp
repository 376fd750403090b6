// AWQ and GPTQ checkpoints against references independent of Kestrel: fixtures written by
// scripts/make_prequant_fixtures.py in AutoAWQ's GEMM and AutoGPTQ's layouts from the golden HF
// models, with logits from make_gguf_fixtures.py's numpy forward pass (checked there against HF
// transformers) over the weights as the formats define them, (q - z) * s.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "../unit/test_util.h"
#include "core/half.h"
#include "hf_fixture.h"
#include "io/safetensors.h"
#include "kestrel/engine.h"
#include "model/loader.h"

namespace kestrel {
namespace {

namespace fs = std::filesystem;

const std::string kDir = std::string(KESTREL_SOURCE_DIR) + "/tests/golden/prequant/";

struct Fixture {
  std::string name;
  std::string dir;
  std::vector<int32_t> prompt;
  int64_t vocab = 0;
  WeightFormat native = WeightFormat::asym_int4;
  std::vector<float> logits;         // fp32 reference [prompt, vocab]
  std::vector<float> native_logits;  // embedding / lm_head as the native format quantizes them
};

std::vector<float> read_logits(const std::string& path, size_t n) {
  std::vector<float> v(n);
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(v.data()), std::streamsize(n * sizeof(float)));
  EXPECT_TRUE(f.good()) << path;
  return v;
}

Fixture load_fixture(const std::string& name) {
  std::ifstream manifest_file(kDir + "manifest.json");
  const auto manifest = nlohmann::json::parse(manifest_file);
  const auto& entry = manifest.at(name);
  Fixture f;
  f.name = name;
  f.dir = kDir + name;
  f.prompt = entry["prompt"].get<std::vector<int32_t>>();
  f.vocab = entry["vocab"].get<int64_t>();
  f.native =
      entry["native_format"] == "sym_int4" ? WeightFormat::sym_int4 : WeightFormat::asym_int4;
  const size_t n = f.prompt.size() * size_t(f.vocab);
  f.logits = read_logits(f.dir + "/logits.f32", n);
  f.native_logits = read_logits(f.dir + "/logits_native.f32", n);
  return f;
}

using hf_fixture::cpu_engine;

const char* const kFixtures[] = {"qwen2-tied.awq-g64", "llama3-scaled.gptq-asym-g32",
                                 "llama-tied-bias.gptq-sym-g32", "llama-tied-bias.awq-g32",
                                 "qwen2-tied.gptq-v2-g64"};

class PrequantGolden : public ::testing::TestWithParam<const char*> {};

// Loaded into fp32 every packed weight is dequantized exactly, so only summation order separates
// Kestrel from numpy's float64 pass: 1e-4 allowed. A wrong nibble order, zero convention or
// group mapping gives errors near 1.
TEST_P(PrequantGolden, Fp32MatchesReference) {
  const Fixture f = load_fixture(GetParam());
  auto engine = cpu_engine(f.dir, WeightFormat::fp32);
  ASSERT_TRUE(engine);
  auto logits = engine->prompt_logits(f.prompt);
  ASSERT_TRUE(logits.is_ok()) << logits.status().message();
  const auto [error, agreement] = hf_fixture::compare(*logits, f.logits, f.vocab);
  std::printf("[ %s fp32 ] max rel error %.3g\n", GetParam(), error);
  EXPECT_LE(error, 1e-4);
  EXPECT_EQ(agreement, 1.0);
}

// The default load copies the codes into sym_int4 / asym_int4 block 32 and quantizes the float
// embedding (and lm_head) into the same format; the reference quantizes those the same way.
// What remains is the CPU kernels' int8 rounding of activations and, for asym_int4, the fp16
// rounding of each min -z * s (2^-11 of it): the golden HF tests' bound, 0.12 and 80% top-1.
TEST_P(PrequantGolden, NativeFormatWithinBound) {
  const Fixture f = load_fixture(GetParam());
  auto engine = cpu_engine(f.dir, std::nullopt);
  ASSERT_TRUE(engine);
  EXPECT_EQ(engine->weights().format, f.native);
  EXPECT_EQ(engine->weights().block, 32);
  auto logits = engine->prompt_logits(f.prompt);
  ASSERT_TRUE(logits.is_ok()) << logits.status().message();
  const auto [error, agreement] = hf_fixture::compare(*logits, f.native_logits, f.vocab);
  std::printf("[ %s %s ] max rel error %.3g, top-1 agreement %.2f\n", GetParam(),
              format_name(engine->weights().format), error, agreement);
  EXPECT_LE(error, 0.12);
  EXPECT_GE(agreement, 0.8);
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, PrequantGolden, ::testing::ValuesIn(kFixtures),
                         [](const auto& info) { return hf_fixture::param_name(info.param); });

// The copied weights against the exact ones, weight by weight: GPTQ sym -> sym_int4 is the same
// numbers; asym_int4's min -z * s is rounded to fp16, moving a weight by at most
// 2^-11 |z s| + 2^-25.
TEST(PrequantCopies, DequantizeLikeTheFormats) {
  for (const char* name : kFixtures) {
    const Fixture f = load_fixture(name);
    auto native = cpu_engine(f.dir, std::nullopt);
    auto exact = cpu_engine(f.dir, WeightFormat::fp32);
    ASSERT_TRUE(native && exact);
    const bool sym = native->weights().format == WeightFormat::sym_int4;
    for (size_t layer = 0; layer < native->weights().layers.size(); ++layer) {
      const auto& a = native->weights().layers[layer];
      const auto& b = exact->weights().layers[layer];
      const std::pair<const QuantWeight*, const QuantWeight*> matrices[] = {
          {&a.wq.w, &b.wq.w},        {&a.wk.w, &b.wk.w},         {&a.wv.w, &b.wv.w},
          {&a.wo.w, &b.wo.w},        {&a.w_gate.w, &b.w_gate.w}, {&a.w_up.w, &b.w_up.w},
          {&a.w_down.w, &b.w_down.w}};
      for (const auto& [q, r] : matrices) {
        std::vector<float> x(size_t(q->cols)), y(size_t(q->cols));
        for (int64_t row = 0; row < q->rows; ++row) {
          dequantize_row(*q, row, x.data());
          dequantize_row(*r, row, y.data());
          for (int64_t i = 0; i < q->cols; ++i) {
            const float d = std::fabs(x[size_t(i)] - y[size_t(i)]);
            if (sym) {
              ASSERT_EQ(d, 0.0f) << name << " row " << row << " col " << i;
            } else {
              const uint16_t min_bits =
                  q->mins.as<uint16_t>()[size_t(row * q->blocks_per_row() + i / 32)];
              const float bound = std::ldexp(std::fabs(fp16_to_float(min_bits)), -10) +
                                  std::ldexp(std::fabs(y[size_t(i)]), -22) + std::ldexp(1.0f, -24);
              ASSERT_LE(d, bound) << name << " row " << row << " col " << i;
            }
          }
        }
      }
    }
  }
}

// A copy of fixture `name` in a temp dir, with config.json's quantization_config patched by
// `patch` and tensors rewritten by `rewrite` (name, mutable bytes).
struct Mutant {
  testing::TempDir dir;
  Status load() {
    ThreadPool pool(1);
    LoadOptions options;
    options.progress = false;
    return load_model(dir.str(), options, pool).status();
  }
};

std::unique_ptr<Mutant> mutate(
    const std::string& name, const std::function<void(nlohmann::json&)>& patch,
    const std::function<void(const std::string&, std::vector<int64_t>&, std::vector<uint8_t>&)>&
        rewrite = nullptr) {
  auto m = std::make_unique<Mutant>();
  const std::string src = kDir + name;
  std::ifstream config_in(src + "/config.json");
  nlohmann::json config = nlohmann::json::parse(config_in);
  patch(config["quantization_config"]);
  std::ofstream(m->dir.file("config.json")) << config.dump();
  fs::copy_file(src + "/generation_config.json", m->dir.file("generation_config.json"));
  auto source = TensorSource::open_dir(src);
  EXPECT_TRUE(source.is_ok());
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<TensorToWrite> tensors;
  bytes.reserve(source->all().size());
  shapes.reserve(source->all().size());
  for (const auto& [tensor_name, t] : source->all()) {
    bytes.emplace_back(t->data, t->data + t->nbytes);
    shapes.push_back(t->shape);
    if (rewrite) rewrite(tensor_name, shapes.back(), bytes.back());
    tensors.push_back(TensorToWrite{tensor_name, t->dtype, shapes.back(), bytes.back().data(),
                                    bytes.back().size()});
  }
  EXPECT_TRUE(write_safetensors(m->dir.file("model.safetensors"), tensors, {}).is_ok());
  return m;
}

void expect_refused(Mutant& m, const std::string& needle) {
  const Status s = m.load();
  ASSERT_FALSE(s.is_ok()) << needle;
  EXPECT_NE(s.message().find(needle), std::string::npos) << s.message();
  EXPECT_EQ(s.message().find('\n'), std::string::npos) << s.message();
}

TEST(PrequantErrors, MismatchedConfigAndTensorsAreRefused) {
  const std::string gptq = "llama3-scaled.gptq-asym-g32";
  auto unchanged = mutate(gptq, [](nlohmann::json&) {});
  EXPECT_TRUE(unchanged->load().is_ok());
  // The tensors hold groups of 32: a config of 64 no longer fits their shapes.
  auto group = mutate(gptq, [](nlohmann::json& q) { q["group_size"] = 64; });
  expect_refused(*group, "implies I32");
  // sym true needs every zero to be 8.
  auto sym = mutate(gptq, [](nlohmann::json& q) { q["sym"] = true; });
  expect_refused(*sym, "sym true");
  // An act-order g_idx (a permutation of the groups) is refused, not silently misread.
  auto g_idx = mutate(
      gptq, [](nlohmann::json&) {},
      [](const std::string& n, std::vector<int64_t>&, std::vector<uint8_t>& b) {
        if (n.find("layers.1.mlp.down_proj.g_idx") == std::string::npos) return;
        int32_t v = 1;
        std::memcpy(b.data(), &v, 4);
      });
  expect_refused(*g_idx, "plain order");
  // A qweight of the same size in the other layout's shape.
  auto shape = mutate(
      "qwen2-tied.awq-g64", [](nlohmann::json&) {},
      [](const std::string& n, std::vector<int64_t>& dims, std::vector<uint8_t>&) {
        if (n == "model.layers.0.self_attn.k_proj.qweight") {
          std::swap(dims[0], dims[1]);
        }
      });
  expect_refused(*shape, "implies I32 [64, 4]");
  // Scales whose product with the zero overflows fp16 are refused, not clamped.
  auto inf = mutate(
      "qwen2-tied.awq-g64", [](nlohmann::json&) {},
      [](const std::string& n, std::vector<int64_t>&, std::vector<uint8_t>& b) {
        if (n != "model.layers.0.mlp.up_proj.scales") return;
        const uint16_t big = 0x7bff;  // 65504
        for (size_t i = 0; i + 1 < b.size(); i += 2) std::memcpy(&b[i], &big, 2);
      });
  const Status overflow = inf->load();
  ASSERT_FALSE(overflow.is_ok());
  EXPECT_NE(overflow.message().find("NaN or Inf"), std::string::npos) << overflow.message();
}

}  // namespace
}  // namespace kestrel
