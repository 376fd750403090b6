#include "io/safetensors.h"
#include "test_util.h"

#include "io/config.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace kestrel {
namespace {

namespace fs = std::filesystem;

using testing::TempDir;

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

// A safetensors image put together by hand, the way the format describes it, independent of
// write_safetensors.
std::vector<uint8_t> make_image(const std::string& header, const std::vector<uint8_t>& data) {
  const uint64_t n = header.size();
  std::vector<uint8_t> out;
  out.reserve(8 + header.size() + data.size());
  for (int i = 0; i < 8; ++i) out.push_back(uint8_t(n >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> out(n);
  for (auto& b : out) b = uint8_t(rng());
  return out;
}

// Writes the image to DIR/NAME and opens it, expecting an error that mentions every `needle`.
void expect_open_error(const std::vector<uint8_t>& image, const std::vector<std::string>& needles) {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  write_bytes(path, image);
  auto result = SafetensorsFile::open(path);
  ASSERT_FALSE(result.is_ok()) << "expected an error mentioning " << needles.front();
  const std::string& msg = result.status().message();
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  for (const auto& needle : needles) EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
}

std::vector<uint8_t> header_only(const std::string& header, size_t data_bytes = 0) {
  return make_image(header, random_bytes(data_bytes, 7));
}

TEST(Safetensors, ParsesHandBuiltImage) {
  // Two f32 values and three bf16 values, laid out contiguously as HF's writer does.
  std::vector<uint8_t> data(8 + 6);
  const float f[2] = {1.5f, -2.25f};
  std::memcpy(data.data(), f, 8);
  const uint16_t bf[3] = {0x3f80, 0xc000, 0x4040};  // 1, -2, 3
  std::memcpy(data.data() + 8, bf, 6);
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"BF16","shape":[1,3],"data_offsets":[8,14]}}   )";
  const auto image = make_image(header, data);
  auto file = SafetensorsFile::parse(nullptr, image.data(), image.size(), "mem");
  ASSERT_TRUE(file.is_ok()) << file.status().message();
  ASSERT_EQ(file->tensors().size(), 2u);
  EXPECT_EQ(file->metadata().at("format"), "pt");
  const TensorRef* w = file->find("w");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->dtype, DType::f32);
  EXPECT_EQ(w->shape, std::vector<int64_t>({2}));
  EXPECT_EQ(w->nbytes, 8u);
  EXPECT_EQ(w->data, image.data() + 8 + header.size());
  float got[2];
  std::memcpy(got, w->data, 8);
  EXPECT_EQ(got[0], 1.5f);
  EXPECT_EQ(got[1], -2.25f);
  const TensorRef* b = file->find("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, DType::bf16);
  EXPECT_EQ(b->numel(), 3);
  uint16_t got_bf[3];
  std::memcpy(got_bf, b->data, 6);
  EXPECT_EQ(got_bf[2], 0x4040);
  EXPECT_EQ(file->find("missing"), nullptr);
}

TEST(Safetensors, DtypeNamesAndSizes) {
  const std::pair<DType, std::pair<const char*, size_t>> expected[] = {
      {DType::f64, {"F64", 8}},     {DType::f32, {"F32", 4}}, {DType::f16, {"F16", 2}},
      {DType::bf16, {"BF16", 2}},   {DType::i64, {"I64", 8}}, {DType::i32, {"I32", 4}},
      {DType::i16, {"I16", 2}},     {DType::i8, {"I8", 1}},   {DType::u8, {"U8", 1}},
      {DType::boolean, {"BOOL", 1}}};
  for (const auto& [dtype, name_size] : expected) {
    EXPECT_STREQ(dtype_name(dtype), name_size.first);
    EXPECT_EQ(dtype_size(dtype), name_size.second);
    // Every dtype parses back from its spelling.
    const std::string header = std::string(R"({"t":{"dtype":")") + name_size.first +
                               R"(","shape":[3],"data_offsets":[0,)" +
                               std::to_string(3 * name_size.second) + "]}}";
    const auto image = header_only(header, 3 * name_size.second);
    auto file = SafetensorsFile::parse(nullptr, image.data(), image.size(), "mem");
    ASSERT_TRUE(file.is_ok()) << file.status().message();
    EXPECT_EQ(file->find("t")->dtype, dtype);
  }
}

TEST(Safetensors, WriteThenOpenRoundTrips) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  struct Spec {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
  };
  // Odd byte counts (bf16 [7], i8 [5]) force padding before the next tensor.
  const std::vector<Spec> specs = {{"layers.0.wq", DType::f32, {3, 5}}, {"bias", DType::bf16, {7}},
                                   {"emb", DType::f16, {2, 3, 4}},      {"codes", DType::i8, {5}},
                                   {"empty", DType::u8, {0, 4}},        {"scalar", DType::i64, {}},
                                   {"mask", DType::boolean, {3}}};
  std::vector<std::vector<uint8_t>> payloads;
  std::vector<TensorToWrite> to_write;
  for (size_t i = 0; i < specs.size(); ++i) {
    int64_t numel = 1;
    for (int64_t d : specs[i].shape) numel *= d;
    payloads.push_back(random_bytes(size_t(numel) * dtype_size(specs[i].dtype), 100 + i));
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    to_write.push_back(
        {specs[i].name, specs[i].dtype, specs[i].shape, payloads[i].data(), payloads[i].size()});
  }
  const std::map<std::string, std::string> metadata = {{"format", "pt"},
                                                       {"kestrel.low_bit", "sym_int4"}};
  Status st = write_safetensors(path, to_write, metadata);
  ASSERT_TRUE(st.is_ok()) << st.message();
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  // The header is padded with spaces so the data region starts 64-byte aligned.
  std::ifstream in(path, std::ios::binary);
  std::vector<uint8_t> raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | raw[i];
  EXPECT_EQ((8 + n) % 64, 0u);
  EXPECT_EQ(raw[8 + n - 1], ' ');

  auto source = TensorSource::open_file(path);
  ASSERT_TRUE(source.is_ok()) << source.status().message();
  EXPECT_EQ(source->metadata(), metadata);
  ASSERT_EQ(source->all().size(), specs.size());
  std::vector<std::pair<size_t, size_t>> extents;  // [begin, end) of each tensor in the file
  for (size_t i = 0; i < specs.size(); ++i) {
    auto ref = source->get(specs[i].name);
    ASSERT_TRUE(ref.is_ok()) << ref.status().message();
    const TensorRef* t = ref.value();
    EXPECT_EQ(t->name, specs[i].name);
    EXPECT_EQ(t->dtype, specs[i].dtype);
    EXPECT_EQ(t->shape, specs[i].shape);
    ASSERT_EQ(t->nbytes, payloads[i].size());
    EXPECT_TRUE(std::equal(t->data, t->data + t->nbytes, payloads[i].begin())) << specs[i].name;
    ASSERT_NE(t->file, nullptr);
    const size_t offset = size_t(t->data - t->file->data());
    // Tensors whose size is a multiple of 64 bytes are written first and so start aligned.
    if (t->nbytes % 64 == 0) {
      EXPECT_EQ(offset % 64, 0u) << specs[i].name;
    }
    extents.emplace_back(offset, offset + t->nbytes);
  }
  // Tensors lie back to back with no gaps (HF's safetensors library rejects gaps), and the last
  // one ends the file.
  std::sort(extents.begin(), extents.end());
  size_t pos = 8 + n;
  for (const auto& [begin, end] : extents) {
    EXPECT_EQ(pos, begin);
    pos = std::max(pos, end);
  }
  EXPECT_EQ(pos, raw.size());
}

TEST(Safetensors, TensorRefOutlivesItsSource) {
  TempDir dir;
  const std::string path = dir.file("a.safetensors");
  const auto payload = random_bytes(64 * 4, 3);
  ASSERT_TRUE(
      write_safetensors(path, {{"x", DType::f32, {8, 8}, payload.data(), payload.size()}}, {})
          .is_ok());
  TensorRef kept;
  {
    auto source = TensorSource::open_file(path);
    ASSERT_TRUE(source.is_ok()) << source.status().message();
    EXPECT_TRUE(source->metadata().empty());
    kept = *source->find("x");
  }
  fs::remove(path);  // the mapping stays valid after unlink
  const Blob blob = kept.blob();
  ASSERT_EQ(blob.size(), payload.size());
  EXPECT_EQ(std::memcmp(blob.data(), payload.data(), payload.size()), 0);
}

TEST(Safetensors, ZeroLengthTensorsDoNotOverlap) {
  const auto image = header_only(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                 R"("z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
                                 R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                                 12);
  auto file = SafetensorsFile::parse(nullptr, image.data(), image.size(), "mem");
  ASSERT_TRUE(file.is_ok()) << file.status().message();
  EXPECT_EQ(file->tensors().size(), 3u);
}

#ifdef KESTREL_SOURCE_DIR
// The fuzz seeds are written by tests/fuzz/make_corpus.py (Python's struct + json), so they check
// the reader against an independent writer.
TEST(Safetensors, OpensPythonWrittenFiles) {
  const std::string dir = std::string(KESTREL_SOURCE_DIR) + "/tests/fuzz/corpus_safetensors/";
  auto hf = TensorSource::open_file(dir + "hf_contiguous.safetensors");
  ASSERT_TRUE(hf.is_ok()) << hf.status().message();
  EXPECT_EQ(hf->metadata().at("format"), "pt");
  ASSERT_EQ(hf->all().size(), 3u);
  EXPECT_EQ(hf->find("model.embed_tokens.weight")->dtype, DType::bf16);
  EXPECT_EQ(hf->find("lm_head.weight")->shape, std::vector<int64_t>({8, 4}));
  EXPECT_EQ(hf->find("model.norm.weight")->nbytes, 16u);

  auto aligned = TensorSource::open_file(dir + "aligned_padded.safetensors");
  ASSERT_TRUE(aligned.is_ok()) << aligned.status().message();
  EXPECT_EQ(aligned->all().size(), 8u);
  for (const auto& [name, ref] : aligned->all()) {
    EXPECT_EQ(size_t(ref->data - ref->file->data()) % 64, 0u) << name;
  }
  EXPECT_EQ(aligned->find("scalar")->numel(), 1);
  EXPECT_EQ(aligned->find("empty")->nbytes, 0u);

  auto empty = TensorSource::open_file(dir + "empty.safetensors");
  ASSERT_TRUE(empty.is_ok()) << empty.status().message();
  EXPECT_TRUE(empty->all().empty());
}
#endif

#ifdef KESTREL_SOURCE_DIR
// Checkpoints written by HF transformers 5.17 (tests/golden/models, from scripts/make_golden.py):
// every tensor the config implies is there with the implied shape and dtype.
TEST(Safetensors, OpensHfGoldenCheckpoints) {
  const std::string root = std::string(KESTREL_SOURCE_DIR) + "/tests/golden/models/";
  struct Expect {
    const char* dir;
    DType dtype;
    size_t tensors;  // 9 per layer + embed + norm, + lm_head when untied, + biases
  };
  for (const Expect& e : {Expect{"qwen2-tied-f32", DType::f32, 2 * 12 + 2},
                          Expect{"llama-tied-bias-f16", DType::f16, 2 * 13 + 2},
                          Expect{"llama3-scaled-bf16-sharded", DType::bf16, 3 * 9 + 3}}) {
    const std::string dir = root + e.dir;
    auto config = load_model_config(dir);
    ASSERT_TRUE(config.is_ok()) << config.status().message();
    auto source = TensorSource::open_dir(dir);
    ASSERT_TRUE(source.is_ok()) << source.status().message();
    EXPECT_EQ(source->all().size(), e.tensors) << e.dir;
    const ModelConfig& c = config.value();
    auto expect_tensor = [&](const std::string& name, std::vector<int64_t> shape) {
      auto ref = source->get(name);
      ASSERT_TRUE(ref.is_ok()) << ref.status().message();
      EXPECT_EQ(ref.value()->dtype, e.dtype) << name;
      EXPECT_EQ(ref.value()->shape, shape) << name;
    };
    expect_tensor("model.embed_tokens.weight", {c.vocab_size, c.hidden_size});
    expect_tensor("model.norm.weight", {c.hidden_size});
    EXPECT_EQ(source->find("lm_head.weight") == nullptr, c.tie_word_embeddings) << e.dir;
    for (int64_t layer = 0; layer < c.n_layers; ++layer) {
      const std::string p = "model.layers." + std::to_string(layer) + ".";
      expect_tensor(p + "self_attn.q_proj.weight", {c.q_dim(), c.hidden_size});
      expect_tensor(p + "self_attn.k_proj.weight", {c.kv_dim(), c.hidden_size});
      expect_tensor(p + "self_attn.v_proj.weight", {c.kv_dim(), c.hidden_size});
      expect_tensor(p + "self_attn.o_proj.weight", {c.hidden_size, c.q_dim()});
      expect_tensor(p + "mlp.gate_proj.weight", {c.intermediate_size, c.hidden_size});
      expect_tensor(p + "mlp.up_proj.weight", {c.intermediate_size, c.hidden_size});
      expect_tensor(p + "mlp.down_proj.weight", {c.hidden_size, c.intermediate_size});
      expect_tensor(p + "input_layernorm.weight", {c.hidden_size});
      expect_tensor(p + "post_attention_layernorm.weight", {c.hidden_size});
      EXPECT_EQ(source->find(p + "self_attn.q_proj.bias") != nullptr, c.attention_bias) << p;
      if (c.attention_bias) expect_tensor(p + "self_attn.k_proj.bias", {c.kv_dim()});
    }
  }
}
#endif

TEST(SafetensorsErrors, Truncated) {
  expect_open_error({1, 0, 0, 0, 0}, {"truncated"});
  expect_open_error({}, {"truncated"});
}

TEST(SafetensorsErrors, HeaderLengthPastEnd) {
  std::vector<uint8_t> image(20, ' ');
  const uint64_t n = 1000;
  for (int i = 0; i < 8; ++i) image[i] = uint8_t(n >> (8 * i));
  expect_open_error(image, {"header length 1000 past end of file (size 20)"});
  // A length near 2^64 must not wrap around the bounds check.
  for (int i = 0; i < 8; ++i) image[i] = 0xff;
  expect_open_error(image, {"past end of file"});
}

TEST(SafetensorsErrors, HeaderLengthOverCap) {
  // A sparse 150 MB file whose header length claims 120 MB: inside the file, over the cap.
  TempDir dir;
  const std::string path = dir.file("huge.safetensors");
  {
    std::vector<uint8_t> prefix(8);
    const uint64_t n = 120ull << 20;
    for (int i = 0; i < 8; ++i) prefix[i] = uint8_t(n >> (8 * i));
    write_bytes(path, prefix);
  }
  fs::resize_file(path, 150ull << 20);
  auto result = SafetensorsFile::open(path);
  ASSERT_FALSE(result.is_ok());
  EXPECT_NE(result.status().message().find(path), std::string::npos);
  EXPECT_NE(result.status().message().find("100 MB"), std::string::npos)
      << result.status().message();
}

TEST(SafetensorsErrors, HeaderNotJsonObject) {
  expect_open_error(header_only("{\"a\": [1, 2"), {"not valid JSON"});
  expect_open_error(header_only("\xff\xfe garbage"), {"not valid JSON"});
  expect_open_error(header_only("[1, 2, 3]"), {"not a JSON object"});
  expect_open_error(header_only(R"({"a": 5})"), {"tensor 'a'", "not a JSON object"});
}

TEST(SafetensorsErrors, BadDtype) {
  expect_open_error(header_only(R"({"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", 2),
                    {"tensor 'w'", "unsupported dtype 'F8_E4M3'"});
  expect_open_error(header_only(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", 8),
                    {"tensor 'w'", "dtype"});
  expect_open_error(header_only(R"({"w":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8),
                    {"tensor 'w'", "dtype"});
}

TEST(SafetensorsErrors, BadShape) {
  expect_open_error(header_only(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", 8),
                    {"tensor 'w'", "shape"});
  expect_open_error(header_only(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
                    {"tensor 'w'", "shape"});
  expect_open_error(header_only(R"({"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8),
                    {"tensor 'w'", "shape"});
  expect_open_error(header_only(R"({"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", 8),
                    {"tensor 'w'", "shape"});
  // 2^32 * 2^32 overflows int64, even though a later 0 would make the product 0.
  expect_open_error(
      header_only(
          R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}})"),
      {"tensor 'w'", "too many elements"});
  // numel fits int64 but numel * 8 bytes does not fit 64 bits.
  expect_open_error(
      header_only(R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}})", 8),
      {"tensor 'w'", "needs more than 2^64 bytes"});
}

TEST(SafetensorsErrors, BadOffsets) {
  expect_open_error(header_only(R"({"w":{"dtype":"F32","shape":[2]}})", 8),
                    {"tensor 'w'", "data_offsets"});
  expect_open_error(header_only(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8),
                    {"tensor 'w'", "data_offsets"});
  expect_open_error(header_only(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8),
                    {"tensor 'w'", "end before"});
  expect_open_error(header_only(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 8),
                    {"tensor 'w'", "past the end"});
  expect_open_error(
      header_only(
          R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551615,18446744073709551615]}})",
          8),
      {"tensor 'w'", "data_offsets"});
}

TEST(SafetensorsErrors, ShapeByteMismatch) {
  expect_open_error(header_only(R"({"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,10]}})", 16),
                    {"tensor 'w'", "shape [2,3] of dtype F16 needs 12 bytes but offsets give 10"});
}

TEST(SafetensorsErrors, Overlap) {
  expect_open_error(header_only(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                12),
                    {"tensor 'b' overlaps tensor 'a'"});
  // A tensor nested inside a long one that is followed by a short one.
  expect_open_error(header_only(R"({"a":{"dtype":"U8","shape":[32],"data_offsets":[0,32]},)"
                                R"("b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]},)"
                                R"("c":{"dtype":"U8","shape":[4],"data_offsets":[16,20]}})",
                                32),
                    {"overlaps tensor 'a'"});
}

TEST(SafetensorsErrors, BadMetadata) {
  expect_open_error(header_only(R"({"__metadata__":[1]})"), {"__metadata__"});
  expect_open_error(header_only(R"({"__metadata__":{"format":1}})"), {"__metadata__", "format"});
}

TEST(SafetensorsErrors, ControlCharactersInNamesStayOnOneLine) {
  expect_open_error(header_only("{\"a\\nb\": 5}"), {"tensor 'a\\x0ab'"});
}

class TensorSourceTest : public ::testing::Test {
 protected:
  // Writes a shard holding `names`, each a random f32 [4, 16] tensor, and remembers the bytes.
  void write_shard(const std::string& file, const std::vector<std::string>& names,
                   const std::map<std::string, std::string>& metadata = {}) {
    std::vector<TensorToWrite> tensors;
    for (const auto& name : names) {
      auto& bytes = payload_[name];
      bytes = random_bytes(4 * 16 * 4, uint32_t(std::hash<std::string>()(name)));
      tensors.push_back({name, DType::f32, {4, 16}, bytes.data(), bytes.size()});
    }
    Status st = write_safetensors(dir_.file(file), tensors, metadata);
    ASSERT_TRUE(st.is_ok()) << st.message();
  }

  void write_index(const std::map<std::string, std::string>& weight_map) {
    std::string text = R"({"metadata": {"total_size": 1}, "weight_map": {)";
    bool first = true;
    for (const auto& [tensor, shard] : weight_map) {
      text += (first ? "" : ",") + std::string("\"") + tensor + "\": \"" + shard + "\"";
      first = false;
    }
    write_text(dir_.file("model.safetensors.index.json"), text + "}}");
  }

  void expect_dir_error(const std::vector<std::string>& needles) {
    auto source = TensorSource::open_dir(dir_.str());
    ASSERT_FALSE(source.is_ok());
    const std::string& msg = source.status().message();
    for (const auto& needle : needles) EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }

  TempDir dir_;
  std::map<std::string, std::vector<uint8_t>> payload_;
};

TEST_F(TensorSourceTest, SingleFile) {
  write_shard("model.safetensors", {"a", "b"}, {{"format", "pt"}});
  auto source = TensorSource::open_dir(dir_.str());
  ASSERT_TRUE(source.is_ok()) << source.status().message();
  EXPECT_EQ(source->where(), dir_.str());
  EXPECT_EQ(source->all().size(), 2u);
  EXPECT_EQ(source->metadata().at("format"), "pt");
  const TensorRef* b = source->find("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(std::memcmp(b->data, payload_["b"].data(), b->nbytes), 0);

  auto missing = source->get("nope");
  ASSERT_FALSE(missing.is_ok());
  EXPECT_EQ(missing.status().message(), dir_.str() + ": missing tensor 'nope'");
}

TEST_F(TensorSourceTest, Sharded) {
  write_shard("model-00001-of-00002.safetensors", {"embed", "layers.0.wq"}, {{"format", "pt"}});
  // "extra" is in a shard but not in the index: still available.
  write_shard("model-00002-of-00002.safetensors", {"layers.0.wk", "norm", "extra"});
  write_index({{"embed", "model-00001-of-00002.safetensors"},
               {"layers.0.wq", "model-00001-of-00002.safetensors"},
               {"layers.0.wk", "model-00002-of-00002.safetensors"},
               {"norm", "model-00002-of-00002.safetensors"}});
  auto source = TensorSource::open_dir(dir_.str());
  ASSERT_TRUE(source.is_ok()) << source.status().message();
  EXPECT_EQ(source->all().size(), 5u);
  EXPECT_EQ(source->metadata().at("format"), "pt");
  for (const auto& [name, bytes] : payload_) {
    auto ref = source->get(name);
    ASSERT_TRUE(ref.is_ok()) << ref.status().message();
    ASSERT_EQ(ref.value()->nbytes, bytes.size());
    EXPECT_EQ(std::memcmp(ref.value()->data, bytes.data(), bytes.size()), 0) << name;
  }
  EXPECT_NE(source->find("layers.0.wk")->file, source->find("embed")->file);
}

TEST_F(TensorSourceTest, IndexWinsOverSingleFileAndMovesKeepPointers) {
  write_shard("model.safetensors", {"stale"});
  write_shard("shard.safetensors", {"fresh"});
  write_index({{"fresh", "shard.safetensors"}});
  auto source = TensorSource::open_dir(dir_.str());
  ASSERT_TRUE(source.is_ok()) << source.status().message();
  TensorSource moved = std::move(source).value();
  EXPECT_EQ(moved.find("stale"), nullptr);
  ASSERT_NE(moved.find("fresh"), nullptr);
  EXPECT_EQ(moved.find("fresh")->name, "fresh");
}

TEST_F(TensorSourceTest, NoWeights) {
  expect_dir_error({dir_.str() + ": no model.safetensors or model.safetensors.index.json"});
}

TEST_F(TensorSourceTest, MissingShard) {
  write_shard("model-00001-of-00002.safetensors", {"a"});
  write_index(
      {{"a", "model-00001-of-00002.safetensors"}, {"b", "model-00002-of-00002.safetensors"}});
  expect_dir_error({"model.safetensors.index.json", "shard 'model-00002-of-00002.safetensors'"});
}

TEST_F(TensorSourceTest, TensorMissingFromItsShard) {
  write_shard("s1.safetensors", {"a"});
  write_shard("s2.safetensors", {"b"});
  write_index({{"a", "s1.safetensors"}, {"b", "s1.safetensors"}});
  expect_dir_error({"model.safetensors.index.json", "tensor 'b'", "shard 's1.safetensors'"});
}

TEST_F(TensorSourceTest, ShardNameMustBePlain) {
  write_shard("s1.safetensors", {"a"});
  write_index({{"a", "../s1.safetensors"}});
  expect_dir_error({"model.safetensors.index.json", "not a plain file name"});
  write_index({{"a", ".."}});
  expect_dir_error({"not a plain file name"});
}

TEST_F(TensorSourceTest, TensorInTwoShards) {
  write_shard("s1.safetensors", {"a", "dup"});
  write_shard("s2.safetensors", {"b", "dup"});
  write_index({{"a", "s1.safetensors"}, {"b", "s2.safetensors"}});
  expect_dir_error({"tensor 'dup'", "s1.safetensors", "s2.safetensors"});
}

TEST_F(TensorSourceTest, BadIndex) {
  write_text(dir_.file("model.safetensors.index.json"), "{\"weight_map\": ");
  expect_dir_error({"model.safetensors.index.json", "not valid JSON"});
  write_text(dir_.file("model.safetensors.index.json"), R"({"metadata": {}})");
  expect_dir_error({"model.safetensors.index.json", "weight_map"});
  write_text(dir_.file("model.safetensors.index.json"), R"({"weight_map": {"a": 3}})");
  expect_dir_error({"model.safetensors.index.json", "tensor 'a'"});
}

TEST_F(TensorSourceTest, CorruptShardNamesShardAndTensor) {
  write_shard("s1.safetensors", {"a"});
  write_bytes(dir_.file("s2.safetensors"), header_only(R"({"b":{"dtype":"F32","shape":[4]}})"));
  write_index({{"a", "s1.safetensors"}, {"b", "s2.safetensors"}});
  expect_dir_error({"s2.safetensors", "tensor 'b'", "data_offsets"});
}

TEST_F(TensorSourceTest, OpeningManyShardsIsFast) {
  // An 8B-sized layout: 4 shards, ~300 tensors. Opening reads headers only.
  std::map<std::string, std::string> weight_map;
  for (int s = 0; s < 4; ++s) {
    std::vector<std::string> names;
    for (int i = 0; i < 75; ++i) {
      names.push_back("model.layers." + std::to_string(s * 8 + i / 10) + ".t" + std::to_string(i));
      weight_map[names.back()] = "shard" + std::to_string(s) + ".safetensors";
    }
    write_shard("shard" + std::to_string(s) + ".safetensors", names);
  }
  write_index(weight_map);
  const auto start = std::chrono::steady_clock::now();
  auto source = TensorSource::open_dir(dir_.str());
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(source.is_ok()) << source.status().message();
  EXPECT_EQ(source->all().size(), 300u);
  EXPECT_LT(ms, 250.0);
}

TEST(SafetensorsWrite, RejectsBadInput) {
  TempDir dir;
  const std::string path = dir.file("out.safetensors");
  const auto bytes = random_bytes(16, 1);
  Status st = write_safetensors(path, {{"w", DType::f32, {3}, bytes.data(), 16}}, {});
  ASSERT_FALSE(st.is_ok());
  EXPECT_NE(st.message().find(path), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("tensor 'w'"), std::string::npos) << st.message();

  st = write_safetensors(
      path, {{"w", DType::u8, {16}, bytes.data(), 16}, {"w", DType::u8, {16}, bytes.data(), 16}},
      {});
  ASSERT_FALSE(st.is_ok());
  EXPECT_NE(st.message().find("tensor 'w'"), std::string::npos) << st.message();

  const std::string bad_path = dir.file("no/such/dir/out.safetensors");
  st = write_safetensors(bad_path, {{"w", DType::u8, {16}, bytes.data(), 16}}, {});
  ASSERT_FALSE(st.is_ok());
  EXPECT_NE(st.message().find(bad_path), std::string::npos) << st.message();
  EXPECT_FALSE(fs::exists(path));
}

}  // namespace
}  // namespace kestrel
