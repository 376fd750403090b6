// A GGUF file's tokenizer against HF `tokenizers`: the real Llama 3.1 and Qwen tokenizer.json files
// (scripts/fetch_tokenizers.sh) are written into GGUF metadata as llama.cpp's converter writes
// them (tokens by id, token types normal / control / user-defined / unused, "a b" merges,
// tokenizer.ggml.pre), and the ids are compared with HF's on the golden corpus.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "gguf_image.h"
#include "template/chat_template.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace kestrel {
namespace {

using json = nlohmann::json;

std::string source_path(const std::string& relative) {
  return std::string(KESTREL_SOURCE_DIR) + "/" + relative;
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  return in ? json::parse(in) : json();
}

// The GGUF image of `vocab`'s tokenizer.json and tokenizer_config.json.
std::vector<uint8_t> tokenizer_gguf(const std::string& vocab) {
  const std::string dir = source_path(".cache/tokenizers/" + vocab + "/models/");
  const json tok = read_json(dir + "tokenizer.json");
  const json cfg = read_json(dir + "tokenizer_config.json");
  EXPECT_TRUE(tok.is_object()) << dir << " (filled by scripts/fetch_tokenizers.sh)";
  std::map<int64_t, std::pair<std::string, int32_t>> by_id;  // id -> token, type
  for (const auto& [token, id] : tok["model"]["vocab"].items())
    by_id[id.get<int64_t>()] = {token, 1};
  for (const auto& t : tok["added_tokens"]) {
    by_id[t["id"].get<int64_t>()] = {t["content"].get<std::string>(),
                                     t["special"].get<bool>() ? 3 : 4};
  }
  const int64_t n = by_id.empty() ? 0 : by_id.rbegin()->first + 1;
  std::vector<std::string> tokens(static_cast<size_t>(n));
  std::vector<int32_t> types(static_cast<size_t>(n),
                             5);  // gaps: unused padding, as the converter writes
  for (int64_t i = 0; i < n; ++i) tokens[size_t(i)] = "[PAD" + std::to_string(i) + "]";
  for (const auto& [id, entry] : by_id) {
    tokens[size_t(id)] = entry.first;
    types[size_t(id)] = entry.second;
  }
  std::vector<std::string> merges;
  for (const auto& m : tok["model"]["merges"]) {
    merges.push_back(m.is_string() ? m.get<std::string>()
                                   : m[0].get<std::string>() + " " + m[1].get<std::string>());
  }
  const bool llama = vocab == "llama3_1";
  const int64_t bos = llama ? 128000 : 151643;
  const int64_t eos = llama ? 128009 : 151645;

  testing::GgufImage im;
  im.put<uint32_t>(0x46554747).put<uint32_t>(3).put<uint64_t>(0).put<uint64_t>(9);
  im.kv_str("tokenizer.ggml.model", "gpt2");
  im.kv_str("tokenizer.ggml.pre", llama ? "llama-bpe" : "qwen2");
  im.str("tokenizer.ggml.tokens").put<uint32_t>(9).put<uint32_t>(8).put<uint64_t>(tokens.size());
  for (const auto& t : tokens) im.str(t);
  im.str("tokenizer.ggml.token_type").put<uint32_t>(9).put<uint32_t>(5).put<uint64_t>(types.size());
  for (int32_t t : types) im.put<int32_t>(t);
  im.str("tokenizer.ggml.merges").put<uint32_t>(9).put<uint32_t>(8).put<uint64_t>(merges.size());
  for (const auto& m : merges) im.str(m);
  im.kv_u32("tokenizer.ggml.bos_token_id", uint32_t(bos));
  im.kv_u32("tokenizer.ggml.eos_token_id", uint32_t(eos));
  im.str("tokenizer.ggml.add_bos_token").put<uint32_t>(7).put<uint8_t>(llama ? 1 : 0);
  im.kv_str("tokenizer.chat_template", cfg["chat_template"].get<std::string>());
  return im.bytes;
}

class GgufTokenizer : public ::testing::TestWithParam<const char*> {};

TEST_P(GgufTokenizer, IdsMatchHf) {
  const std::string vocab = GetParam();
  testing::TempDir dir;
  const std::string path = dir.file(vocab + ".gguf");
  {
    const std::vector<uint8_t> bytes = tokenizer_gguf(vocab);
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  }
  auto tok = Tokenizer::load(path);
  ASSERT_TRUE(tok.is_ok()) << tok.status().message();
  std::ifstream rows(source_path("tests/golden/tokenizer/golden.jsonl"));
  std::string line;
  size_t n = 0, mismatches = 0;
  while (std::getline(rows, line)) {
    const json row = json::parse(line);
    const std::string text = row["text"];
    const std::vector<int32_t> want = row[vocab];
    auto got = tok->encode(text, row["add_special_tokens"].get<bool>());
    ASSERT_TRUE(got.is_ok()) << got.status().message();
    ++n;
    if (*got != want && ++mismatches <= 5) {
      ADD_FAILURE() << vocab << ": " << json(text).dump().substr(0, 100) << ": got "
                    << json(*got).dump().substr(0, 160) << ", HF "
                    << json(want).dump().substr(0, 160);
    }
  }
  EXPECT_GE(n, 2000u);
  EXPECT_EQ(mismatches, 0u) << "of " << n << " rows";

  auto hf_template = load_chat_template(source_path(".cache/tokenizers/" + vocab + "/models"));
  auto gguf_template = load_chat_template(path);
  ASSERT_TRUE(hf_template.is_ok() && gguf_template.is_ok()) << gguf_template.status().message();
  EXPECT_EQ(gguf_template->template_text, hf_template->template_text);
  EXPECT_EQ(gguf_template->special_tokens["eos_token"],
            vocab == "llama3_1" ? "<|eot_id|>" : "<|im_end|>");
}

INSTANTIATE_TEST_SUITE_P(Vocabs, GgufTokenizer, ::testing::Values("llama3_1", "qwen3"));

TEST(GgufTokenizerErrors, UnsupportedModelsAreNamed) {
  testing::TempDir dir;
  auto load = [&](const std::string& model, const std::string& pre) {
    testing::GgufImage im;
    im.put<uint32_t>(0x46554747).put<uint32_t>(3).put<uint64_t>(0).put<uint64_t>(2);
    im.kv_str("tokenizer.ggml.model", model).kv_str("tokenizer.ggml.pre", pre);
    const std::string path = dir.file("t.gguf");
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(im.bytes.data()), std::streamsize(im.bytes.size()));
    out.close();
    return Tokenizer::load(path);
  };
  auto spm = load("llama", "default");
  ASSERT_FALSE(spm.is_ok());
  EXPECT_NE(spm.status().message().find("'gpt2', is"), std::string::npos) << spm.status().message();
  auto pre = load("gpt2", "deepseek-llm");
  ASSERT_FALSE(pre.is_ok());
  EXPECT_NE(pre.status().message().find("llama-bpe and qwen2"), std::string::npos);
}

}  // namespace
}  // namespace kestrel
