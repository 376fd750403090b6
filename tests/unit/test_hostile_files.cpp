// Files built to break the loaders: nesting deep enough to exhaust the stack, token strings that
// are not UTF-8, non-finite GGUF floats and token ids past int32. Each must come back as a clean
// error that names what is wrong, never as a crash, an exception or a silently defaulted value.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gguf_image.h"
#include "io/config.h"
#include "model/gguf_model.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace kestrel {
namespace {

using json = nlohmann::json;
using testing::GgufImage;

constexpr int kDepth = 100000;

void expect_refused(const Status& status, const std::string& fragment) {
  ASSERT_FALSE(status.is_ok()) << "expected an error containing: " << fragment;
  EXPECT_NE(status.message().find(fragment), std::string::npos) << status.message();
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// A minimal byte-level BPE tokenizer.json whose `key` holds `value` (JSON text).
std::string tokenizer_json_with(const std::string& key, const std::string& value) {
  std::string text =
      R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},)"
      R"( "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false},)"
      R"( "decoder": {"type": "ByteLevel"})";
  return text + ", \"" + key + "\": " + value + "}";
}

// `open` repeated kDepth times, then `innermost`, then `close` repeated kDepth times.
std::string nested(const std::string& open, const std::string& innermost,
                   const std::string& close) {
  std::string text;
  text.reserve((open.size() + close.size()) * kDepth + innermost.size());
  for (int i = 0; i < kDepth; ++i) text += open;
  text += innermost;
  for (int i = 0; i < kDepth; ++i) text += close;
  return text;
}

TEST(HostileFiles, ShallowComponentsOfTheNestingTokenizerLoad) {
  EXPECT_TRUE(Tokenizer::from_json(tokenizer_json_with("normalizer", "null")).is_ok());
  auto tok = Tokenizer::from_json(tokenizer_json_with(
      "post_processor", R"({"type": "Sequence", "processors": [{"type": "ByteLevel"}]})"));
  ASSERT_TRUE(tok.is_ok()) << tok.status().message();
  EXPECT_EQ(*tok->encode("ab", true), std::vector<int32_t>{2});
}

TEST(HostileFiles, DeeplyNestedNormalizerIsRefused) {
  auto tok = Tokenizer::from_json(tokenizer_json_with("normalizer", nested("[", "", "]")));
  expect_refused(tok.status(), "nest");
}

// Sequences of each component nested kDepth deep: the component parsers recurse through them.
TEST(HostileFiles, DeeplyNestedSequencesAreRefused) {
  struct Case {
    const char* key;
    const char* open;
    const char* innermost;
  };
  for (const Case& c :
       {Case{"normalizer", R"({"type": "Sequence", "normalizers": [)", R"({"type": "NFC"})"},
        Case{"pre_tokenizer", R"({"type": "Sequence", "pretokenizers": [)",
             R"({"type": "ByteLevel"})"},
        Case{"post_processor", R"({"type": "Sequence", "processors": [)",
             R"({"type": "ByteLevel"})"}}) {
    SCOPED_TRACE(c.key);
    auto tok = Tokenizer::from_json(tokenizer_json_with(c.key, nested(c.open, c.innermost, "]}")));
    expect_refused(tok.status(), "nest");
  }
}

// A GGUF tokenizer (gpt2, llama-bpe) of 1300 tokens whose token 1234 is `token_1234`.
std::vector<uint8_t> gguf_tokenizer_with(const std::string& token_1234) {
  GgufImage im;
  im.put<uint32_t>(0x46554747).put<uint32_t>(3).put<uint64_t>(0).put<uint64_t>(4);
  im.kv_str("tokenizer.ggml.model", "gpt2").kv_str("tokenizer.ggml.pre", "llama-bpe");
  im.str("tokenizer.ggml.tokens").put<uint32_t>(9).put<uint32_t>(8).put<uint64_t>(1300);
  for (int id = 0; id < 1300; ++id) im.str(id == 1234 ? token_1234 : "t" + std::to_string(id));
  im.str("tokenizer.ggml.merges").put<uint32_t>(9).put<uint32_t>(8).put<uint64_t>(0);
  return im.bytes;
}

TEST(HostileFiles, GgufTokenThatIsNotUtf8IsRefusedWithItsId) {
  testing::TempDir dir;
  const std::string good = dir.file("good.gguf");
  write_bytes(good, gguf_tokenizer_with("ok"));
  auto loaded = Tokenizer::load(good);
  ASSERT_TRUE(loaded.is_ok()) << loaded.status().message();

  const std::string bad = dir.file("bad.gguf");
  write_bytes(bad, gguf_tokenizer_with("\xff"));
  auto tok = Tokenizer::load(bad);
  expect_refused(tok.status(), "UTF-8");
  EXPECT_NE(tok.status().message().find("1234"), std::string::npos) << tok.status().message();
}

// A llama GGUF with the metadata config_from_gguf needs and an F32 [32, 64] token_embd.
std::vector<uint8_t> llama_gguf(float rms_epsilon, float freq_base) {
  GgufImage im;
  im.put<uint32_t>(0x46554747).put<uint32_t>(3).put<uint64_t>(1).put<uint64_t>(8);
  im.kv_str("general.architecture", "llama");
  im.kv_u32("llama.block_count", 1).kv_u32("llama.embedding_length", 64);
  im.kv_u32("llama.feed_forward_length", 128).kv_u32("llama.attention.head_count", 4);
  im.kv_u32("llama.context_length", 128);
  im.str("llama.attention.layer_norm_rms_epsilon").put<uint32_t>(6).put<float>(rms_epsilon);
  im.str("llama.rope.freq_base").put<uint32_t>(6).put<float>(freq_base);
  im.tensor("token_embd.weight", {64, 32}, 0, 0);
  im.align(32);
  im.bytes.resize(im.bytes.size() + 64 * 32 * sizeof(float), 0);
  return im.bytes;
}

Result<GgufModel> open_llama_gguf(const testing::TempDir& dir, float rms_epsilon, float freq_base) {
  const std::string path = dir.file("m.gguf");
  write_bytes(path, llama_gguf(rms_epsilon, freq_base));
  return GgufModel::open(path);
}

TEST(HostileFiles, GgufNonFiniteRmsEpsilonIsRefused) {
  testing::TempDir dir;
  auto good = open_llama_gguf(dir, 1e-5f, 500000.0f);
  ASSERT_TRUE(good.is_ok()) << good.status().message();
  EXPECT_FLOAT_EQ(float(good->config().rms_norm_eps), 1e-5f);
  auto nan = open_llama_gguf(dir, std::numeric_limits<float>::quiet_NaN(), 500000.0f);
  expect_refused(nan.status(), "layer_norm_rms_epsilon");
}

TEST(HostileFiles, GgufInfiniteRopeFreqBaseIsRefused) {
  testing::TempDir dir;
  auto inf = open_llama_gguf(dir, 1e-5f, std::numeric_limits<float>::infinity());
  expect_refused(inf.status(), "freq_base");
}

const char* kSmallLlamaConfig = R"({
  "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
  "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 1,
  "vocab_size": 32, "max_position_embeddings": 128, "rms_norm_eps": 1e-05,
  "rope_theta": 500000.0, "bos_token_id": 1, "eos_token_id": 2
})";

Result<ModelConfig> small_llama_with(const std::string& key, const json& value) {
  json j = json::parse(kSmallLlamaConfig);
  j[key] = value;
  return parse_model_config(j.dump(), "config.json");
}

TEST(HostileFiles, ConfigTokenIdsPastInt32AreRefused) {
  ASSERT_TRUE(parse_model_config(kSmallLlamaConfig, "config.json").is_ok());
  const int64_t past_int32 = int64_t(1) << 32;
  expect_refused(small_llama_with("eos_token_id", past_int32).status(), "eos_token_id");
  expect_refused(small_llama_with("eos_token_id", json::array({1, past_int32})).status(),
                 "eos_token_id");
  expect_refused(small_llama_with("bos_token_id", past_int32).status(), "bos_token_id");
}

TEST(HostileFiles, ConfigRopeScalingWithoutTypeIsRefused) {
  const json llama3_parameters = {{"factor", 8.0},
                                  {"low_freq_factor", 1.0},
                                  {"high_freq_factor", 4.0},
                                  {"original_max_position_embeddings", 64}};
  expect_refused(small_llama_with("rope_scaling", llama3_parameters).status(), "rope_type");
}

}  // namespace
}  // namespace kestrel
