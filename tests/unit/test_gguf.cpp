// The GGUF container reader against images assembled byte by byte here, following the published
// layout (header, key/values, tensor infos, aligned data), and against corrupt variants of them.
#include "gguf_image.h"
#include "io/gguf.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

namespace kestrel {
namespace {

using testing::GgufImage;

GgufImage header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
  GgufImage im;
  im.put<uint32_t>(0x46554747).put<uint32_t>(version).put<uint64_t>(n_tensors).put<uint64_t>(n_kv);
  return im;
}

// Two tensors (an F32 [2, 3] and a Q8_0 [32, 2]) and metadata of several kinds.
std::vector<uint8_t> valid_image() {
  GgufImage im = header(2, 4);
  im.kv_str("general.architecture", "llama");
  im.kv_u32("llama.block_count", 7);
  im.str("tokenizer.ggml.tokens").put<uint32_t>(9).put<uint32_t>(8).put<uint64_t>(2);
  im.str("a").str("bc");
  im.str("scores").put<uint32_t>(9).put<uint32_t>(6).put<uint64_t>(2);
  im.put<float>(0.5f).put<float>(-1.0f);
  im.tensor("w.f32", {3, 2}, 0, 0);
  im.tensor("w.q8", {32, 2}, 8, 32);
  im.align(32);
  for (int i = 0; i < 6; ++i) im.put<float>(float(i));
  im.align(32);
  for (int i = 0; i < 68; ++i) im.put<uint8_t>(uint8_t(i));
  return im.bytes;
}

Result<GgufFile> parse(const std::vector<uint8_t>& bytes) {
  return GgufFile::parse(nullptr, bytes.data(), bytes.size(), "t.gguf");
}

void expect_error(const std::vector<uint8_t>& bytes, const std::string& fragment) {
  auto f = parse(bytes);
  ASSERT_FALSE(f.is_ok()) << "expected an error containing: " << fragment;
  EXPECT_NE(f.status().message().find(fragment), std::string::npos) << f.status().message();
  EXPECT_EQ(f.status().message().find('\n'), std::string::npos);
}

TEST(Gguf, ParsesValidImage) {
  const std::vector<uint8_t> bytes = valid_image();
  auto f = parse(bytes);
  ASSERT_TRUE(f.is_ok()) << f.status().message();
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(*f->get_string("general.architecture"), "llama");
  EXPECT_EQ(*f->get_int("llama.block_count"), 7);
  EXPECT_EQ(**f->get_strings("tokenizer.ggml.tokens"), (std::vector<std::string>{"a", "bc"}));
  EXPECT_EQ(*f->get_float_array("scores"), (std::vector<float>{0.5f, -1.0f}));
  ASSERT_EQ(f->tensors().size(), 2u);
  const GgufTensor* t = f->find_tensor("w.f32");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dims, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(t->rows(), 2);
  EXPECT_EQ(t->nbytes, 24u);
  float third;
  std::memcpy(&third, t->data + 8, 4);
  EXPECT_EQ(third, 2.0f);
  const GgufTensor* q = f->find_tensor("w.q8");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->type, GgmlType::q8_0);
  EXPECT_EQ(q->nbytes, 68u);
  EXPECT_EQ(q->data[0], 0);
  EXPECT_EQ(q->data[67], 67);
}

TEST(Gguf, TypedReadsNameKeyAndType) {
  auto f = parse(valid_image());
  ASSERT_TRUE(f.is_ok());
  auto missing = f->get_int("llama.context_length");
  ASSERT_FALSE(missing.is_ok());
  EXPECT_NE(missing.status().message().find("llama.context_length"), std::string::npos);
  auto wrong = f->get_int("general.architecture");
  ASSERT_FALSE(wrong.is_ok());
  EXPECT_NE(wrong.status().message().find("must be an integer"), std::string::npos);
  EXPECT_FALSE(f->get_strings("scores").is_ok());
  EXPECT_FALSE(f->get_int_array("tokenizer.ggml.tokens").is_ok());
}

TEST(Gguf, EveryTruncationIsAnError) {
  const std::vector<uint8_t> bytes = valid_image();
  for (size_t n = 0; n + 1 < bytes.size(); ++n) {
    std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + long(n));
    auto f = parse(cut);
    EXPECT_FALSE(f.is_ok()) << "accepted a file cut to " << n << " bytes";
  }
}

TEST(Gguf, RejectsBadMagicAndVersions) {
  std::vector<uint8_t> bytes = valid_image();
  bytes[0] = 'X';
  expect_error(bytes, "not a GGUF file");
  expect_error(header(0, 0, 1).bytes, "version 1");
  expect_error(header(0, 0, 0x03000000u).bytes, "big-endian");
  expect_error(header(0, 0, 9).bytes, "version 9");
}

TEST(Gguf, RejectsCountsBeyondTheFile) {
  expect_error(header(0, uint64_t(1) << 60).bytes, "metadata count");
  expect_error(header(uint64_t(1) << 60, 0).bytes, "tensor count");
  GgufImage huge_string = header(0, 1);
  huge_string.str("k").put<uint32_t>(8).put<uint64_t>(uint64_t(1) << 40);
  expect_error(huge_string.bytes, "exceeds the limit");
  GgufImage long_string = header(0, 1);
  long_string.str("k").put<uint32_t>(8).put<uint64_t>(100).put<uint32_t>(0);
  expect_error(long_string.bytes, "truncated");
  GgufImage huge_array = header(0, 1);
  huge_array.str("k").put<uint32_t>(9).put<uint32_t>(6).put<uint64_t>(uint64_t(1) << 62);
  expect_error(huge_array.bytes, "does not fit");
  GgufImage string_array = header(0, 1);
  string_array.str("k").put<uint32_t>(9).put<uint32_t>(8).put<uint64_t>(1000).put<uint64_t>(0);
  expect_error(string_array.bytes, "does not fit");
}

TEST(Gguf, RejectsBadValueTypesAndNesting) {
  GgufImage bad_type = header(0, 1);
  bad_type.str("k").put<uint32_t>(13).put<uint32_t>(0);
  expect_error(bad_type.bytes, "unknown value type 13");
  GgufImage bad_element = header(0, 1);
  bad_element.str("k").put<uint32_t>(9).put<uint32_t>(77).put<uint64_t>(0);
  expect_error(bad_element.bytes, "unknown array element type");
  GgufImage deep = header(0, 1);
  deep.str("k").put<uint32_t>(9);
  for (int i = 0; i < 6; ++i) deep.put<uint32_t>(9).put<uint64_t>(1);
  deep.put<uint32_t>(4).put<uint64_t>(0);
  expect_error(deep.bytes, "nested deeper");
  GgufImage twice = header(0, 2);
  twice.kv_u32("k", 1).kv_u32("k", 2);
  expect_error(twice.bytes, "appears twice");
}

TEST(Gguf, ChecksAlignment) {
  GgufImage wrong_type = header(0, 1);
  wrong_type.str("general.alignment").put<uint32_t>(10).put<uint64_t>(64);
  expect_error(wrong_type.bytes, "must be uint32");
  GgufImage odd = header(0, 1);
  odd.kv_u32("general.alignment", 48);
  expect_error(odd.bytes, "power of two");
  GgufImage zero = header(0, 1);
  zero.kv_u32("general.alignment", 0);
  expect_error(zero.bytes, "power of two");

  // With alignment 64 the data starts at 64 and a tensor at offset 32 is misaligned.
  GgufImage im = header(1, 1);
  im.kv_u32("general.alignment", 64);
  im.tensor("t", {4}, 0, 32);
  im.align(64);
  for (int i = 0; i < 64; ++i) im.put<uint8_t>(0);
  expect_error(im.bytes, "not a multiple of the alignment 64");
}

TEST(Gguf, RejectsBadTensorInfos) {
  auto one = [](std::vector<uint64_t> dims, uint32_t type, uint64_t offset, size_t data) {
    GgufImage im = header(1, 0);
    im.tensor("t", std::move(dims), type, offset);
    im.align(32);
    for (size_t i = 0; i < data; ++i) im.put<uint8_t>(0);
    return im.bytes;
  };
  expect_error(one({}, 0, 0, 64), "0 dimensions");
  expect_error(one({1, 1, 1, 1, 1}, 0, 0, 64), "5 dimensions");
  expect_error(one({4, 0}, 0, 0, 64), "is zero");
  expect_error(one({uint64_t(1) << 40, uint64_t(1) << 40}, 0, 0, 64), "overflow");
  expect_error(one({4}, 31, 0, 64), "unknown ggml type 31");
  expect_error(one({48}, 2, 0, 64), "blocks of 32");
  expect_error(one({17}, 0, 0, 64), "past the end");
  expect_error(one({4}, 0, 64, 64), "past the end");
  expect_error(one({4}, 0, uint64_t(-32), 64), "past the end");

  GgufImage dup = header(2, 0);
  dup.tensor("t", {4}, 0, 0).tensor("t", {4}, 0, 32).align(32);
  for (int i = 0; i < 64; ++i) dup.put<uint8_t>(0);
  expect_error(dup.bytes, "appears twice");

  GgufImage overlap = header(2, 0);
  overlap.tensor("a", {16}, 0, 0).tensor("b", {4}, 0, 32).align(32);
  for (int i = 0; i < 64; ++i) overlap.put<uint8_t>(0);
  expect_error(overlap.bytes, "overlaps");
}

TEST(Gguf, TypeTraitsCoverTheCommonTypes) {
  EXPECT_STREQ(ggml_type_name(GgmlType::q4_k), "Q4_K");
  EXPECT_EQ(ggml_type_traits(uint32_t(GgmlType::q6_k)).block_bytes, 210);
  EXPECT_EQ(ggml_type_traits(uint32_t(GgmlType::q4_0)).block_bytes, 18);
  EXPECT_EQ(ggml_type_traits(uint32_t(GgmlType::bf16)).block_bytes, 2);
  EXPECT_EQ(ggml_type_traits(4).name, nullptr);  // 4 and 5 were removed from ggml
}

}  // namespace
}  // namespace kestrel
