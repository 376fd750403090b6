#include "io/config.h"
#include "test_util.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include <nlohmann/json.hpp>

namespace kestrel {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// The published config.json of Qwen2.5-1.5B (abridged of training-only fields).
const char* kQwen2Config = R"({
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 1536,
  "initializer_range": 0.02,
  "intermediate_size": 8960,
  "max_position_embeddings": 131072,
  "max_window_layers": 28,
  "model_type": "qwen2",
  "num_attention_heads": 12,
  "num_hidden_layers": 28,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 131072,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.40.1",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})";

// The published config.json of Llama-3.1-8B-Instruct.
const char* kLlama31Config = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009],
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.42.3",
  "use_cache": true,
  "vocab_size": 128256
})";

using testing::TempDir;

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

// kLlama31Config with `patch` merged in (a null value removes the key).
std::string llama_with(const json& patch) {
  json j = json::parse(kLlama31Config);
  j.merge_patch(patch);
  return j.dump();
}

void expect_error(const std::string& text, const std::string& expected_substring) {
  auto result = parse_model_config(text, "config.json");
  ASSERT_FALSE(result.is_ok()) << "expected: " << expected_substring;
  const std::string& msg = result.status().message();
  EXPECT_EQ(msg.rfind("config.json: ", 0), 0u) << msg;
  EXPECT_NE(msg.find(expected_substring), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
}

TEST(ModelConfig, Qwen2) {
  auto result = parse_model_config(kQwen2Config, "config.json");
  ASSERT_TRUE(result.is_ok()) << result.status().message();
  const ModelConfig& c = result.value();
  EXPECT_EQ(c.arch, Architecture::qwen2);
  EXPECT_EQ(c.vocab_size, 151936);
  EXPECT_EQ(c.hidden_size, 1536);
  EXPECT_EQ(c.intermediate_size, 8960);
  EXPECT_EQ(c.n_layers, 28);
  EXPECT_EQ(c.n_heads, 12);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.q_dim(), 1536);
  EXPECT_EQ(c.kv_dim(), 256);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.rope_scaling.type, RopeType::plain);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  EXPECT_EQ(c.bos_token_id, 151643);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>({151643}));
  EXPECT_STREQ(architecture_name(c.arch), "Qwen2ForCausalLM");
}

TEST(ModelConfig, Llama31WithLlama3Rope) {
  auto result = parse_model_config(kLlama31Config, "config.json");
  ASSERT_TRUE(result.is_ok()) << result.status().message();
  const ModelConfig& c = result.value();
  EXPECT_EQ(c.arch, Architecture::llama);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.n_layers, 32);
  EXPECT_EQ(c.n_heads, 32);
  EXPECT_EQ(c.n_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 5e5);
  EXPECT_EQ(c.rope_scaling.type, RopeType::llama3);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>({128001, 128008, 128009}));
  EXPECT_STREQ(architecture_name(c.arch), "LlamaForCausalLM");
}

TEST(ModelConfig, Llama32StyleExplicitHeadDimAndTiedEmbeddings) {
  auto result = parse_model_config(llama_with({{"hidden_size", 2048},
                                               {"num_attention_heads", 32},
                                               {"head_dim", 64},
                                               {"tie_word_embeddings", true},
                                               {"rope_scaling", {{"factor", 32.0}}}}),
                                   "config.json");
  ASSERT_TRUE(result.is_ok()) << result.status().message();
  EXPECT_EQ(result->head_dim, 64);
  EXPECT_TRUE(result->tie_word_embeddings);
  EXPECT_DOUBLE_EQ(result->rope_scaling.factor, 32.0);

  // head_dim that is not hidden / heads is taken as given.
  result = parse_model_config(llama_with({{"head_dim", 256}}), "config.json");
  ASSERT_TRUE(result.is_ok()) << result.status().message();
  EXPECT_EQ(result->head_dim, 256);
  EXPECT_EQ(result->q_dim(), 32 * 256);
}

TEST(ModelConfig, DefaultsAndAlternateSpellings) {
  // No architectures: model_type decides. Null head_dim, absent kv heads, rope_theta and
  // rope_scaling, old-style "type" key.
  auto result = parse_model_config(llama_with({{"architectures", nullptr},
                                               {"head_dim", nullptr},
                                               {"num_key_value_heads", nullptr},
                                               {"rope_theta", nullptr},
                                               {"rope_scaling", nullptr},
                                               {"attention_bias", nullptr},
                                               {"tie_word_embeddings", nullptr},
                                               {"torch_dtype", nullptr},
                                               {"bos_token_id", nullptr},
                                               {"eos_token_id", nullptr}}),
                                   "config.json");
  ASSERT_TRUE(result.is_ok()) << result.status().message();
  EXPECT_EQ(result->arch, Architecture::llama);
  EXPECT_EQ(result->head_dim, 128);
  EXPECT_EQ(result->n_kv_heads, 32);
  EXPECT_DOUBLE_EQ(result->rope_theta, 10000.0);
  EXPECT_EQ(result->rope_scaling.type, RopeType::plain);
  EXPECT_FALSE(result->attention_bias);
  EXPECT_FALSE(result->tie_word_embeddings);
  EXPECT_EQ(result->torch_dtype, "");
  EXPECT_EQ(result->bos_token_id, -1);
  EXPECT_TRUE(result->eos_token_ids.empty());

  result = parse_model_config(
      llama_with({{"architectures", nullptr},
                  {"model_type", "qwen2"},
                  {"dtype", "float16"},
                  {"torch_dtype", nullptr},
                  {"rope_scaling", {{"rope_type", nullptr}, {"type", "default"}}}}),
      "config.json");
  ASSERT_TRUE(result.is_ok()) << result.status().message();
  EXPECT_EQ(result->arch, Architecture::qwen2);
  EXPECT_TRUE(result->attention_bias);
  EXPECT_EQ(result->torch_dtype, "float16");
  EXPECT_EQ(result->rope_scaling.type, RopeType::plain);

  result =
      parse_model_config(llama_with({{"rope_scaling", {{"rope_type", nullptr}, {"type", "llama3"}}},
                                     {"attention_bias", true}}),
                         "config.json");
  ASSERT_TRUE(result.is_ok()) << result.status().message();
  EXPECT_EQ(result->rope_scaling.type, RopeType::llama3);
  EXPECT_TRUE(result->attention_bias);
}

TEST(ModelConfig, TransformersV5RopeParameters) {
  json j = json::parse(kLlama31Config);
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "llama3"},   {"rope_theta", 500000.0},
                          {"factor", 8.0},           {"low_freq_factor", 1.0},
                          {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  auto v5 = parse_model_config(j.dump(), "config.json");
  ASSERT_TRUE(v5.is_ok()) << v5.status().message();
  auto v4 = parse_model_config(kLlama31Config, "config.json");
  ASSERT_TRUE(v4.is_ok());
  EXPECT_EQ(v5.value(), v4.value());

  json q = json::parse(kQwen2Config);
  q.erase("rope_theta");
  q["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1000000.0}};
  auto qwen = parse_model_config(q.dump(), "config.json");
  ASSERT_TRUE(qwen.is_ok()) << qwen.status().message();
  EXPECT_DOUBLE_EQ(qwen->rope_theta, 1e6);
  EXPECT_EQ(qwen->rope_scaling.type, RopeType::plain);

  q["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  expect_error(q.dump(), "unsupported rope_parameters type 'yarn'");
  q["rope_parameters"] = {{"full_attention", {{"rope_type", "default"}}}};
  expect_error(q.dump(), "per-layer-type");
}

TEST(ModelConfigErrors, Architecture) {
  auto result =
      parse_model_config(llama_with({{"architectures", {"MistralForCausalLM"}}}), "config.json");
  ASSERT_FALSE(result.is_ok());
  EXPECT_EQ(result.status().message(),
            "config.json: unsupported architecture 'MistralForCausalLM' (supported: "
            "LlamaForCausalLM, Qwen2ForCausalLM)");
  expect_error(llama_with({{"architectures", json::array()}}), "field 'architectures'");
  expect_error(llama_with({{"architectures", "LlamaForCausalLM"}}), "field 'architectures'");
  expect_error(llama_with({{"architectures", nullptr}, {"model_type", "mistral"}}),
               "unsupported model_type 'mistral'");
  expect_error(llama_with({{"architectures", nullptr}, {"model_type", nullptr}}),
               "neither 'architectures' nor 'model_type'");
}

TEST(ModelConfigErrors, RopeScaling) {
  auto result = parse_model_config(
      llama_with({{"rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}}}), "config.json");
  ASSERT_FALSE(result.is_ok());
  EXPECT_EQ(result.status().message(), "config.json: unsupported rope_scaling type 'yarn'");
  expect_error(llama_with({{"rope_scaling", {{"rope_type", "linear"}}}}),
               "unsupported rope_scaling type 'linear'");
  expect_error(llama_with({{"rope_scaling", {{"rope_type", nullptr}, {"type", "dynamic"}}}}),
               "unsupported rope_scaling type 'dynamic'");
  for (const char* field :
       {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}) {
    expect_error(llama_with({{"rope_scaling", {{field, nullptr}}}}),
                 std::string("missing field 'rope_scaling.") + field + "'");
  }
  expect_error(llama_with({{"rope_scaling", {{"factor", "8"}}}}),
               "field 'rope_scaling.factor' must be a number");
  expect_error(llama_with({{"rope_scaling", {{"high_freq_factor", 1.0}}}}),
               "field 'rope_scaling.high_freq_factor' must be greater than low_freq_factor");
  expect_error(llama_with({{"rope_scaling", {{"original_max_position_embeddings", 8192.5}}}}),
               "field 'rope_scaling.original_max_position_embeddings' must be an integer");
  expect_error(llama_with({{"rope_scaling", "llama3"}}), "field 'rope_scaling'");
}

TEST(ModelConfigErrors, WrongTypes) {
  expect_error(llama_with({{"hidden_size", "4096"}}), "field 'hidden_size' must be an integer");
  expect_error(llama_with({{"hidden_size", 4096.5}}), "field 'hidden_size' must be an integer");
  expect_error(llama_with({{"num_hidden_layers", true}}),
               "field 'num_hidden_layers' must be an integer");
  expect_error(llama_with({{"rms_norm_eps", "1e-5"}}), "field 'rms_norm_eps' must be a number");
  expect_error(llama_with({{"rope_theta", json::array()}}), "field 'rope_theta' must be a number");
  expect_error(llama_with({{"tie_word_embeddings", "yes"}}),
               "field 'tie_word_embeddings' must be true or false");
  expect_error(llama_with({{"attention_bias", 1}}), "field 'attention_bias' must be true or false");
  expect_error(llama_with({{"torch_dtype", 16}}), "field 'torch_dtype' must be a string");
  expect_error(llama_with({{"eos_token_id", "x"}}), "field 'eos_token_id'");
  expect_error(llama_with({{"eos_token_id", {1, "2"}}}), "field 'eos_token_id'");
  expect_error(llama_with({{"eos_token_id", -3}}), "field 'eos_token_id'");
  expect_error(llama_with({{"bos_token_id", -3}}), "field 'bos_token_id'");
  expect_error(llama_with({{"vocab_size", 18446744073709551615ull}}), "field 'vocab_size'");
}

TEST(ModelConfigErrors, MissingAndInvalidSizes) {
  for (const char* field : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads"}) {
    expect_error(llama_with({{field, nullptr}}), std::string("missing field '") + field + "'");
    expect_error(llama_with({{field, 0}}), std::string("field '") + field + "' must be positive");
    expect_error(llama_with({{field, -4}}), std::string("field '") + field + "' must be positive");
  }
  expect_error(llama_with({{"num_key_value_heads", 5}}),
               "num_attention_heads 32 is not a multiple of num_key_value_heads 5");
  expect_error(llama_with({{"head_dim", 63}}), "head_dim 63 must be even");
  expect_error(llama_with({{"head_dim", 0}}), "field 'head_dim' must be positive");
  expect_error(
      llama_with({{"hidden_size", 4000}, {"num_attention_heads", 48}, {"num_key_value_heads", 8}}),
      "hidden_size 4000 is not a multiple of num_attention_heads 48");
  expect_error(llama_with({{"hidden_size", int64_t(1) << 40}}), "field 'hidden_size' is");
  expect_error(llama_with({{"rms_norm_eps", 0.0}}), "field 'rms_norm_eps'");
  expect_error(llama_with({{"rope_theta", -1.0}}), "field 'rope_theta'");
}

TEST(ModelConfigErrors, UnsupportedVariants) {
  expect_error(llama_with({{"hidden_act", "gelu"}}), "unsupported hidden_act 'gelu'");
  expect_error(llama_with({{"mlp_bias", true}}), "mlp_bias");
  json q = json::parse(kQwen2Config);
  q["use_sliding_window"] = true;
  expect_error(q.dump(), "use_sliding_window");
}

TEST(ModelConfigErrors, NotJson) {
  expect_error("{\"hidden_size\": ", "not valid JSON");
  expect_error("[1, 2]", "not a JSON object");
  expect_error("", "not valid JSON");
}

TEST(ModelConfig, GenerationConfigOverridesTokens) {
  auto result = parse_model_config(kLlama31Config, "config.json");
  ASSERT_TRUE(result.is_ok());
  ModelConfig c = result.value();
  Status st = apply_generation_config(
      c, R"({"bos_token_id": 128000, "do_sample": true, "eos_token_id": 128009, "top_p": 0.9})",
      "generation_config.json");
  ASSERT_TRUE(st.is_ok()) << st.message();
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>({128009}));
  EXPECT_EQ(c.bos_token_id, 128000);

  st = apply_generation_config(c, R"({"eos_token_id": [1, 2], "bos_token_id": 7})", "g.json");
  ASSERT_TRUE(st.is_ok()) << st.message();
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>({1, 2}));
  EXPECT_EQ(c.bos_token_id, 7);

  // Absent or null fields keep what config.json said.
  st = apply_generation_config(c, R"({"eos_token_id": null, "temperature": 0.6})", "g.json");
  ASSERT_TRUE(st.is_ok()) << st.message();
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>({1, 2}));
  EXPECT_EQ(c.bos_token_id, 7);

  const ModelConfig before = c;
  st = apply_generation_config(c, R"({"eos_token_id": [1, 2.5], "bos_token_id": 3})", "g.json");
  ASSERT_FALSE(st.is_ok());
  EXPECT_EQ(st.message().rfind("g.json: field 'eos_token_id'", 0), 0u) << st.message();
  EXPECT_EQ(c, before);  // a failed apply changes nothing
  st = apply_generation_config(c, "not json", "g.json");
  ASSERT_FALSE(st.is_ok());
  EXPECT_NE(st.message().find("g.json"), std::string::npos);
}

void expect_round_trip(const ModelConfig& c) {
  const std::string text = model_config_to_json(c);
  auto back = parse_model_config(text, "written.json");
  ASSERT_TRUE(back.is_ok()) << back.status().message() << "\n" << text;
  EXPECT_EQ(back.value(), c) << text;
  // The text is an HF config: the keys transformers reads are present.
  const json j = json::parse(text);
  EXPECT_EQ(j.at("architectures").at(0), architecture_name(c.arch));
  EXPECT_EQ(j.at("num_hidden_layers"), c.n_layers);
  EXPECT_EQ(j.at("num_key_value_heads"), c.n_kv_heads);
}

TEST(ModelConfig, JsonRoundTripOfPublishedConfigs) {
  for (const char* text : {kQwen2Config, kLlama31Config}) {
    auto c = parse_model_config(text, "config.json");
    ASSERT_TRUE(c.is_ok()) << c.status().message();
    expect_round_trip(c.value());
  }
  const json j = json::parse(model_config_to_json(parse_model_config(kLlama31Config, "c").value()));
  EXPECT_EQ(j.at("rope_scaling").at("rope_type"), "llama3");
  EXPECT_EQ(j.at("model_type"), "llama");
}

TEST(ModelConfig, JsonRoundTripOfRandomConfigs) {
  std::mt19937_64 rng(1234);
  auto pick = [&](int64_t lo, int64_t hi) { return lo + int64_t(rng() % uint64_t(hi - lo + 1)); };
  for (int i = 0; i < 50; ++i) {
    ModelConfig c;
    c.arch = rng() % 2 ? Architecture::llama : Architecture::qwen2;
    c.n_kv_heads = pick(1, 8);
    c.n_heads = c.n_kv_heads * pick(1, 8);
    c.head_dim = 2 * pick(8, 128);
    c.hidden_size = rng() % 2 ? c.n_heads * c.head_dim : pick(64, 8192);
    c.vocab_size = pick(100, 300000);
    c.intermediate_size = pick(64, 30000);
    c.n_layers = pick(1, 100);
    c.max_position_embeddings = pick(128, 1 << 20);
    c.rms_norm_eps = std::uniform_real_distribution<double>(1e-7, 1e-4)(rng);
    c.rope_theta = std::uniform_real_distribution<double>(1e3, 1e7)(rng);
    if (rng() % 2) {
      c.rope_scaling.type = RopeType::llama3;
      c.rope_scaling.factor = std::uniform_real_distribution<double>(1, 64)(rng);
      c.rope_scaling.low_freq_factor = std::uniform_real_distribution<double>(0.5, 2)(rng);
      c.rope_scaling.high_freq_factor =
          c.rope_scaling.low_freq_factor + std::uniform_real_distribution<double>(0.1, 8)(rng);
      c.rope_scaling.original_max_position_embeddings = pick(512, 16384);
    }
    c.tie_word_embeddings = rng() % 2;
    c.attention_bias = c.arch == Architecture::qwen2 || rng() % 2;
    c.torch_dtype = rng() % 2 ? "bfloat16" : "";
    c.bos_token_id = rng() % 2 ? pick(0, c.vocab_size - 1) : -1;
    for (int64_t k = pick(0, 3); k > 0; --k) c.eos_token_ids.push_back(pick(0, c.vocab_size - 1));
    expect_round_trip(c);
  }
}

#ifdef KESTREL_SOURCE_DIR
TEST(ModelConfig, FuzzSeedsParse) {
  const std::string dir = std::string(KESTREL_SOURCE_DIR) + "/tests/fuzz/corpus_config/";
  for (const char* name : {"qwen2_1.5b.json", "llama3.1_8b.json"}) {
    auto text = read_text_file(dir + name);
    ASSERT_TRUE(text.is_ok()) << text.status().message();
    auto c = parse_model_config(text.value(), name);
    ASSERT_TRUE(c.is_ok()) << c.status().message();
  }
}
#endif

#ifdef KESTREL_SOURCE_DIR
// config.json files written by HF transformers 5.17 (rope_parameters, "dtype") for the golden
// checkpoints, with their generation_config.json applied.
TEST(ModelConfig, LoadsHfGoldenConfigs) {
  const std::string root = std::string(KESTREL_SOURCE_DIR) + "/tests/golden/models/";
  auto qwen = load_model_config(root + "qwen2-tied-f32");
  ASSERT_TRUE(qwen.is_ok()) << qwen.status().message();
  EXPECT_EQ(qwen->arch, Architecture::qwen2);
  EXPECT_EQ(qwen->vocab_size, 320);
  EXPECT_EQ(qwen->hidden_size, 64);
  EXPECT_EQ(qwen->head_dim, 16);
  EXPECT_EQ(qwen->n_kv_heads, 2);
  EXPECT_DOUBLE_EQ(qwen->rope_theta, 1e6);
  EXPECT_EQ(qwen->rope_scaling.type, RopeType::plain);
  EXPECT_TRUE(qwen->tie_word_embeddings);
  EXPECT_TRUE(qwen->attention_bias);
  EXPECT_EQ(qwen->torch_dtype, "float32");
  EXPECT_EQ(qwen->eos_token_ids, std::vector<int64_t>({7}));

  auto tied = load_model_config(root + "llama-tied-bias-f16");
  ASSERT_TRUE(tied.is_ok()) << tied.status().message();
  EXPECT_EQ(tied->arch, Architecture::llama);
  EXPECT_EQ(tied->head_dim, 16);
  EXPECT_EQ(tied->n_heads, 6);
  EXPECT_EQ(tied->n_kv_heads, 3);
  EXPECT_TRUE(tied->attention_bias);
  EXPECT_TRUE(tied->tie_word_embeddings);
  EXPECT_DOUBLE_EQ(tied->rope_theta, 10000.0);

  auto scaled = load_model_config(root + "llama3-scaled-bf16-sharded");
  ASSERT_TRUE(scaled.is_ok()) << scaled.status().message();
  EXPECT_EQ(scaled->head_dim, 24);  // not hidden / heads = 16
  EXPECT_EQ(scaled->q_dim(), 96);
  EXPECT_EQ(scaled->n_kv_heads, 1);
  EXPECT_DOUBLE_EQ(scaled->rope_theta, 5e5);
  EXPECT_EQ(scaled->rope_scaling.type, RopeType::llama3);
  EXPECT_DOUBLE_EQ(scaled->rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(scaled->rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(scaled->rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(scaled->rope_scaling.original_max_position_embeddings, 32);
  EXPECT_FALSE(scaled->tie_word_embeddings);
  EXPECT_EQ(scaled->bos_token_id, 1);
  EXPECT_EQ(scaled->eos_token_ids, std::vector<int64_t>({5, 6}));  // from generation_config
}
#endif

TEST(ModelConfig, LoadFromDirectory) {
  TempDir dir;
  auto missing = load_model_config(dir.str());
  ASSERT_FALSE(missing.is_ok());
  EXPECT_EQ(missing.status().message(), dir.file("config.json") + ": not found");

  write_text(dir.file("config.json"), kLlama31Config);
  auto c = load_model_config(dir.str());
  ASSERT_TRUE(c.is_ok()) << c.status().message();
  EXPECT_EQ(c->eos_token_ids, std::vector<int64_t>({128001, 128008, 128009}));

  write_text(dir.file("generation_config.json"),
             R"({"bos_token_id": 128000, "eos_token_id": [128001, 128009]})");
  c = load_model_config(dir.str());
  ASSERT_TRUE(c.is_ok()) << c.status().message();
  EXPECT_EQ(c->eos_token_ids, std::vector<int64_t>({128001, 128009}));

  write_text(dir.file("generation_config.json"), R"({"eos_token_id": "x"})");
  c = load_model_config(dir.str());
  ASSERT_FALSE(c.is_ok());
  EXPECT_NE(c.status().message().find(dir.file("generation_config.json")), std::string::npos)
      << c.status().message();

  write_text(dir.file("config.json"), llama_with({{"hidden_size", "big"}}));
  c = load_model_config(dir.str());
  ASSERT_FALSE(c.is_ok());
  EXPECT_EQ(c.status().message(),
            dir.file("config.json") + ": field 'hidden_size' must be an integer");
}

TEST(ReadTextFile, ErrorsNameThePath) {
  TempDir dir;
  const std::string path = dir.file("absent.json");
  auto result = read_text_file(path);
  ASSERT_FALSE(result.is_ok());
  EXPECT_EQ(result.status().message().rfind(path + ": ", 0), 0u) << result.status().message();

  result = read_text_file(dir.str());
  ASSERT_FALSE(result.is_ok());
  EXPECT_NE(result.status().message().find(dir.str()), std::string::npos);

  const std::string big = dir.file("big.json");
  write_text(big, "{}");
  fs::resize_file(big, (64ull << 20) + 1);  // sparse: no real 64 MB written
  result = read_text_file(big);
  ASSERT_FALSE(result.is_ok());
  EXPECT_NE(result.status().message().find(big), std::string::npos);
  EXPECT_NE(result.status().message().find("64 MiB"), std::string::npos);

  const std::string small = dir.file("small.txt");
  const std::string text = "line one\nline two\n";
  write_text(small, text);
  result = read_text_file(small);
  ASSERT_TRUE(result.is_ok()) << result.status().message();
  EXPECT_EQ(result.value(), text);
}

// JSON parsers stop at a NUL, so whatever follows one would be silently ignored.
TEST(ReadTextFile, RefusesNulBytes) {
  TempDir dir;
  const std::string path = dir.file("config.json");
  write_text(path, std::string("{\"a\": 1}\0{\"b\": 2}", 18));
  auto result = read_text_file(path);
  ASSERT_FALSE(result.is_ok());
  EXPECT_NE(result.status().message().find("NUL byte at offset 8"), std::string::npos)
      << result.status().message();
}

// Opening a FIFO for reading waits for a writer that never comes; it must be refused at once.
TEST(ReadTextFile, RefusesAFifoWithoutBlocking) {
  TempDir dir;
  const std::string path = dir.file("config.json");
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  auto result = read_text_file(path);
  ASSERT_FALSE(result.is_ok());
  EXPECT_NE(result.status().message().find("not a regular file"), std::string::npos);
  auto config = load_model_config(dir.str());
  ASSERT_FALSE(config.is_ok());
  EXPECT_NE(config.status().message().find(path), std::string::npos);
}

TEST(ModelConfigErrors, UnsupportedPreQuantizedCheckpointsAreRefused) {
  const std::pair<nlohmann::json, const char*> cases[] = {
      {{{"quant_method", "bitsandbytes"}, {"bits", 4}}, "quant_method 'bitsandbytes'"},
      {{{"bits", 4}}, "quant_method 'missing'"},
      {{{"quant_method", "awq"}, {"bits", 8}}, "bits 8 is not supported"},
      {{{"quant_method", "gptq"}, {"bits", 3}}, "bits 3 is not supported"},
      {{{"quant_method", "awq"}, {"w_bit", 2}}, "bits 2 is not supported"},
      {{{"quant_method", "gptq"}, {"group_size", -1}}, "group_size -1 is not supported"},
      {{{"quant_method", "awq"}, {"q_group_size", 256}}, "group_size 256 is not supported"},
      {{{"quant_method", "awq"}, {"version", "gemv"}}, "version 'gemv' is not supported"},
      {{{"quant_method", "awq"}, {"zero_point", false}}, "zero_point false"},
      {{{"quant_method", "gptq"}, {"desc_act", true}}, "desc_act true"},
      {{{"quant_method", "gptq"}, {"checkpoint_format", "marlin"}}, "checkpoint_format 'marlin'"},
      {{{"quant_method", "gptq"}, {"sym", "yes"}}, "must be true or false"},
      {"awq", "must be an object"},
  };
  for (const auto& [q, needle] : cases) {
    auto config = nlohmann::json::parse(kLlama31Config);
    config["quantization_config"] = q;
    auto c = parse_model_config(config.dump(), "config.json");
    ASSERT_FALSE(c.is_ok()) << q.dump();
    EXPECT_NE(c.status().message().find(needle), std::string::npos) << c.status().message();
    EXPECT_EQ(c.status().message().find('\n'), std::string::npos);
  }
}

TEST(ModelConfig, PreQuantizedCheckpointsParse) {
  auto config = nlohmann::json::parse(kLlama31Config);
  config["quantization_config"] = {{"quant_method", "awq"},
                                   {"w_bit", 4},
                                   {"q_group_size", 64},
                                   {"zero_point", true},
                                   {"version", "GEMM"}};
  auto awq = parse_model_config(config.dump(), "config.json");
  ASSERT_TRUE(awq.is_ok()) << awq.status().message();
  EXPECT_EQ(awq->prequant.method, PrequantMethod::awq);
  EXPECT_EQ(awq->prequant.group_size, 64);
  EXPECT_FALSE(awq->prequant.zeros_minus_one);
  // transformers' GPTQConfig defaults: group_size 128, sym true, desc_act false, format v1.
  config["quantization_config"] = {{"quant_method", "gptq"}, {"bits", 4}};
  auto gptq = parse_model_config(config.dump(), "config.json");
  ASSERT_TRUE(gptq.is_ok()) << gptq.status().message();
  EXPECT_EQ(gptq->prequant.method, PrequantMethod::gptq);
  EXPECT_EQ(gptq->prequant.group_size, 128);
  EXPECT_TRUE(gptq->prequant.sym);
  EXPECT_TRUE(gptq->prequant.zeros_minus_one);
  config["quantization_config"]["checkpoint_format"] = "gptq_v2";
  config["quantization_config"]["sym"] = false;
  auto v2 = parse_model_config(config.dump(), "config.json");
  ASSERT_TRUE(v2.is_ok()) << v2.status().message();
  EXPECT_FALSE(v2->prequant.zeros_minus_one);
  EXPECT_FALSE(v2->prequant.sym);
  // A converted model's config.json carries no quantization_config.
  EXPECT_EQ(model_config_to_json(*v2).find("quantization_config"), std::string::npos);
}

}  // namespace
}  // namespace kestrel
