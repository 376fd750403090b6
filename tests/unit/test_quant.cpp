// Weight formats: names, shapes, exact packed layouts and quantization error bounds.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/half.h"
#include "quant/format.h"

namespace kestrel {
namespace {

const WeightFormat kAllFormats[] = {WeightFormat::fp32,     WeightFormat::fp16,
                                    WeightFormat::bf16,     WeightFormat::sym_int8,
                                    WeightFormat::sym_int4, WeightFormat::asym_int4};
const WeightFormat kIntFormats[] = {WeightFormat::sym_int8, WeightFormat::sym_int4,
                                    WeightFormat::asym_int4};

std::vector<float> random_normal(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

uint8_t nibble(const QuantWeight& w, int64_t row, int64_t col) {
  // format.h: group of 32 at byte 16 * (col / 32); byte j holds weight j (low) and j + 16 (high).
  const uint8_t* data = w.data.data() + row * w.data_row_bytes();
  const int64_t group = col / 32;
  const int64_t j = col % 32;
  const uint8_t byte = data[group * 16 + (j % 16)];
  return j < 16 ? byte & 0x0f : byte >> 4;
}

float scale_of(const QuantWeight& w, int64_t row, int64_t col) {
  return fp16_to_float(w.scales.as<uint16_t>()[row * w.blocks_per_row() + col / w.block]);
}

float min_of(const QuantWeight& w, int64_t row, int64_t col) {
  return fp16_to_float(w.mins.as<uint16_t>()[row * w.blocks_per_row() + col / w.block]);
}

TEST(QuantFormat, NamesRoundTrip) {
  for (WeightFormat f : kAllFormats) {
    auto parsed = parse_format(format_name(f));
    ASSERT_TRUE(parsed.is_ok()) << format_name(f);
    EXPECT_EQ(*parsed, f);
  }
  EXPECT_STREQ(format_name(WeightFormat::sym_int4), "sym_int4");
  auto bad = parse_format("q4_0");
  ASSERT_FALSE(bad.is_ok());
  EXPECT_NE(bad.status().message().find("q4_0"), std::string::npos);
}

// --kv-cache names, and what `auto` means: fp32 entries for fp32 weights, fp16 otherwise.
TEST(KvCacheType, NamesRoundTripAndAutoFollowsTheWeights) {
  for (KvCacheType t :
       {KvCacheType::automatic, KvCacheType::fp16, KvCacheType::fp8, KvCacheType::fp32}) {
    auto parsed = parse_kv_cache(kv_cache_name(t));
    ASSERT_TRUE(parsed.is_ok()) << kv_cache_name(t);
    EXPECT_EQ(*parsed, t);
  }
  auto bad = parse_kv_cache("q8_0");
  ASSERT_FALSE(bad.is_ok());
  EXPECT_NE(bad.status().message().find("expected auto, fp16, fp8 or fp32"), std::string::npos);
  EXPECT_EQ(resolve_kv_cache(KvCacheType::automatic, WeightFormat::fp32), KvCacheType::fp32);
  EXPECT_EQ(resolve_kv_cache(KvCacheType::automatic, WeightFormat::sym_int4), KvCacheType::fp16);
  EXPECT_EQ(resolve_kv_cache(KvCacheType::fp8, WeightFormat::fp32), KvCacheType::fp8);
}

TEST(QuantFormat, BytesPerWeight) {
  EXPECT_EQ(data_bytes_per_weight(WeightFormat::fp32), 4.0);
  EXPECT_EQ(data_bytes_per_weight(WeightFormat::fp16), 2.0);
  EXPECT_EQ(data_bytes_per_weight(WeightFormat::bf16), 2.0);
  EXPECT_EQ(data_bytes_per_weight(WeightFormat::sym_int8), 1.0);
  EXPECT_EQ(data_bytes_per_weight(WeightFormat::sym_int4), 0.5);
  EXPECT_EQ(data_bytes_per_weight(WeightFormat::asym_int4), 0.5);
}

TEST(QuantFormat, AllocationMatchesLayout) {
  const int64_t rows = 3;
  const int64_t cols = 128;
  for (WeightFormat f : kAllFormats) {
    for (int block : {32, 64}) {
      SCOPED_TRACE(std::string(format_name(f)) + " block " + std::to_string(block));
      QuantWeight w = allocate_weight(f, rows, cols, block);
      EXPECT_EQ(w.rows, rows);
      EXPECT_EQ(w.cols, cols);
      EXPECT_EQ(w.data_row_bytes(), size_t(cols * data_bytes_per_weight(f)));
      EXPECT_EQ(w.data.size(), size_t(rows) * w.data_row_bytes());
      EXPECT_EQ(reinterpret_cast<uintptr_t>(w.data.data()) % 64, 0u);
      if (is_quantized(f)) {
        EXPECT_EQ(w.block, block);
        EXPECT_EQ(w.scales.size(), size_t(rows * (cols / block) * 2));
        EXPECT_EQ(reinterpret_cast<uintptr_t>(w.scales.data()) % 64, 0u);
        EXPECT_EQ(w.mins.size(), f == WeightFormat::asym_int4 ? w.scales.size() : 0u);
      } else {
        EXPECT_EQ(w.block, 0);
        EXPECT_TRUE(w.scales.empty());
        EXPECT_TRUE(w.mins.empty());
      }
      EXPECT_EQ(w.total_bytes(), w.data.size() + w.scales.size() + w.mins.size());
    }
  }
}

TEST(QuantFormat, CheckWeightShape) {
  EXPECT_TRUE(check_weight_shape(WeightFormat::sym_int4, 8, 1536, 32, "wq").is_ok());
  EXPECT_TRUE(check_weight_shape(WeightFormat::asym_int4, 8, 1536, 64, "wq").is_ok());
  // Float formats have no blocks: any cols, and a configured block is ignored.
  EXPECT_TRUE(check_weight_shape(WeightFormat::fp16, 3, 77, 0, "w").is_ok());
  EXPECT_TRUE(check_weight_shape(WeightFormat::bf16, 3, 77, 32, "w").is_ok());

  Status s = check_weight_shape(WeightFormat::sym_int4, 8, 100, 32, "layers.3.w_up");
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("layers.3.w_up"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("[8, 100]"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("32"), std::string::npos) << s.message();

  s = check_weight_shape(WeightFormat::sym_int8, 8, 96, 64, "w_down");
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("64"), std::string::npos) << s.message();

  s = check_weight_shape(WeightFormat::sym_int4, 8, 128, 16, "wk");
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("wk"), std::string::npos);
  EXPECT_NE(s.message().find("16"), std::string::npos);

  EXPECT_FALSE(check_weight_shape(WeightFormat::fp32, 0, 16, 0, "w").is_ok());
  EXPECT_FALSE(check_weight_shape(WeightFormat::sym_int4, 4, -32, 32, "w").is_ok());
  // Block 0 used to reach `cols % block` (SIGFPE).
  EXPECT_FALSE(check_weight_shape(WeightFormat::sym_int4, 8, 128, 0, "w").is_ok());
}

TEST(QuantFormat, BlocksAre32Or64Exactly) {
  EXPECT_TRUE(check_block(WeightFormat::sym_int4, 64).is_ok());
  EXPECT_TRUE(check_block(WeightFormat::fp16, 0).is_ok());  // float formats have no blocks
  EXPECT_FALSE(check_block(WeightFormat::sym_int8, 0).is_ok());
  EXPECT_FALSE(check_block(WeightFormat::asym_int4, -32).is_ok());
  EXPECT_EQ(*parse_block("32", WeightFormat::sym_int4), 32);
  EXPECT_EQ(*parse_block("64", WeightFormat::asym_int4), 64);
  EXPECT_EQ(*parse_block("0", WeightFormat::fp16), 0);  // what convert writes for floats
  for (const char* text : {"32x", "0", "", " 32", "+32", "3.2e1", "128"}) {
    EXPECT_FALSE(parse_block(text, WeightFormat::sym_int8).is_ok()) << text;
  }
  EXPECT_FALSE(parse_block("0x", WeightFormat::fp32).is_ok());
}

// A row whose sym_int4 codes are known: values are integers in [-8, 7] with -8 first, so
// amax = -8, d = amax / -8 = 1 exactly, and code = value + 8.
TEST(QuantFormat, SymInt4NibbleLayoutIsExact) {
  const int64_t cols = 64;
  std::vector<float> row(cols);
  std::vector<int> code(cols);
  for (int j = 0; j < cols; ++j) {
    code[j] = (j * 5 + j / 32) % 16;  // group 1 differs from group 0
    row[j] = float(code[j] - 8);
  }
  ASSERT_EQ(code[0], 0);
  for (int block : {32, 64}) {
    QuantWeight w = allocate_weight(WeightFormat::sym_int4, 2, cols, block);
    std::vector<float> other = random_normal(cols, 1);
    quantize_row(w, 0, other.data());
    quantize_row(w, 1, row.data());
    const uint8_t* bytes = w.data.data() + w.data_row_bytes();
    for (int g = 0; g < 2; ++g) {
      for (int j = 0; j < 16; ++j) {
        const uint8_t expect = uint8_t(code[g * 32 + j] | (code[g * 32 + j + 16] << 4));
        EXPECT_EQ(bytes[g * 16 + j], expect)
            << "block " << block << " group " << g << " byte " << j;
      }
    }
    const uint16_t* scales = w.scales.as<uint16_t>() + w.blocks_per_row();
    for (int b = 0; b < cols / block; ++b) EXPECT_EQ(scales[b], 0x3c00) << "fp16(1.0)";
    std::vector<float> back(cols);
    dequantize_row(w, 1, back.data());
    EXPECT_EQ(back, row);
  }
}

// The element of largest magnitude keeps its sign in the scale: with a positive amax the
// scale is negative and that element gets code 0 (q = -8), reproduced to fp16 accuracy.
TEST(QuantFormat, SymInt4AmaxSign) {
  std::vector<float> row(32);
  for (int j = 0; j < 32; ++j) row[j] = float(8 - (j * 7) % 16);  // values in [-7, 8]
  row[5] = 8.0f;
  QuantWeight w = allocate_weight(WeightFormat::sym_int4, 1, 32, 32);
  quantize_row(w, 0, row.data());
  EXPECT_EQ(w.scales.as<uint16_t>()[0], 0xbc00) << "fp16(-1.0)";
  std::vector<float> back(32);
  dequantize_row(w, 0, back.data());
  EXPECT_EQ(back, row);  // q = -value, all integers in [-8, 7]
  EXPECT_EQ(nibble(w, 0, 5), 0);

  // Random data: the largest |w| maps to q = -8 whichever its sign.
  for (uint32_t seed = 0; seed < 20; ++seed) {
    std::vector<float> v = random_normal(32, 100 + seed);
    int arg = 0;
    for (int j = 1; j < 32; ++j) {
      if (std::fabs(v[j]) > std::fabs(v[arg])) arg = j;
    }
    quantize_row(w, 0, v.data());
    EXPECT_EQ(nibble(w, 0, arg), 0) << "seed " << seed;
    EXPECT_EQ(std::signbit(scale_of(w, 0, 0)), !std::signbit(v[arg])) << "seed " << seed;
    dequantize_row(w, 0, back.data());
    EXPECT_NEAR(back[arg], v[arg], std::fabs(v[arg]) * 1e-3f);
  }
}

TEST(QuantFormat, AsymInt4KnownRow) {
  // Values 0..15 (shuffled) plus 0.0 and 15.0 present: min 0, d = 1, code = value.
  std::vector<float> row(32);
  for (int j = 0; j < 32; ++j) row[j] = float((j * 11 + 3) % 16);
  row[0] = 0.0f;
  row[1] = 15.0f;
  QuantWeight w = allocate_weight(WeightFormat::asym_int4, 1, 32, 32);
  quantize_row(w, 0, row.data());
  EXPECT_EQ(w.scales.as<uint16_t>()[0], 0x3c00);
  EXPECT_EQ(w.mins.as<uint16_t>()[0], 0x0000);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(nibble(w, 0, j), int(row[j])) << j;
  std::vector<float> back(32);
  dequantize_row(w, 0, back.data());
  EXPECT_EQ(back, row);

  // Shifted by -20: the min is stored and added back.
  for (float& v : row) v -= 20.0f;
  quantize_row(w, 0, row.data());
  EXPECT_EQ(min_of(w, 0, 0), -20.0f);
  dequantize_row(w, 0, back.data());
  EXPECT_EQ(back, row);
}

TEST(QuantFormat, ZeroAndConstantBlocks) {
  std::vector<float> zeros(64, 0.0f);
  std::vector<float> back(64, 1.0f);
  for (WeightFormat f : kIntFormats) {
    SCOPED_TRACE(format_name(f));
    QuantWeight w = allocate_weight(f, 1, 64, 32);
    quantize_row(w, 0, zeros.data());
    dequantize_row(w, 0, back.data());
    for (float v : back) EXPECT_EQ(v, 0.0f);
    EXPECT_EQ(w.scales.as<uint16_t>()[0], 0);
    if (f == WeightFormat::sym_int4) {
      for (size_t i = 0; i < w.data.size(); ++i) EXPECT_EQ(w.data.data()[i], 0x88);
    }
  }
  // A constant block keeps its value in asym_int4 (d = 0, value = min).
  std::vector<float> constant(32, 0.375f);
  QuantWeight w = allocate_weight(WeightFormat::asym_int4, 1, 32, 32);
  quantize_row(w, 0, constant.data());
  dequantize_row(w, 0, back.data());
  for (int j = 0; j < 32; ++j) EXPECT_EQ(back[j], 0.375f);
}

// Per-element error bounds on random normal rows (with a few scaled blocks so scales vary).
TEST(QuantFormat, RoundTripErrorBounds) {
  const int64_t rows = 4;
  const int64_t cols = 512;
  for (WeightFormat f : kAllFormats) {
    for (int block : {32, 64}) {
      SCOPED_TRACE(std::string(format_name(f)) + " block " + std::to_string(block));
      QuantWeight w = allocate_weight(f, rows, cols, block);
      std::vector<std::vector<float>> src(rows);
      for (int64_t r = 0; r < rows; ++r) {
        src[r] = random_normal(cols, 7 + uint32_t(r), 0.02f * float(r + 1));
        src[r][3] *= 10.0f;  // an outlier
        quantize_row(w, r, src[r].data());
      }
      std::vector<float> back(cols);
      double sum_err = 0.0;
      double sum_step = 0.0;
      for (int64_t r = 0; r < rows; ++r) {
        dequantize_row(w, r, back.data());
        for (int64_t c = 0; c < cols; ++c) {
          const float v = src[r][c];
          const float err = std::fabs(back[c] - v);
          switch (f) {
            case WeightFormat::fp32:
              ASSERT_EQ(back[c], v);
              break;
            case WeightFormat::fp16:
              // Half an ulp; below the normal range an ulp is 2^-24.
              ASSERT_LE(err, std::max(std::fabs(v) * 0x1p-11f, 0x1p-25f)) << c;
              break;
            case WeightFormat::bf16:
              ASSERT_LE(err, std::fabs(v) * 0x1p-8f) << c;
              break;
            case WeightFormat::sym_int8: {
              const float d = std::fabs(scale_of(w, r, c));
              ASSERT_LE(err, 0.5f * d * (1 + 1e-4f)) << c;
              sum_err += err;
              sum_step += d;
              break;
            }
            case WeightFormat::sym_int4: {
              const float d = std::fabs(scale_of(w, r, c));
              // Codes round to nearest; only the side opposite to amax can clamp (at q = 7),
              // and there |v| <= 8 |d| (+ fp16 rounding of d), so the error stays below |d|.
              const bool clamped = nibble(w, r, c) == 15 && std::fabs(v) > 7.5f * d;
              ASSERT_LE(err, (clamped ? 1.0f : 0.5f) * d * (1 + 1e-2f)) << c;
              sum_err += err;
              sum_step += d;
              break;
            }
            case WeightFormat::asym_int4: {
              const float d = scale_of(w, r, c);
              // min is stored as fp16, and max lands within 15 * rounding(d) of code 15.
              float lo = src[r][c - c % block];
              for (int i = 0; i < block; ++i) lo = std::min(lo, src[r][c - c % block + i]);
              const float bound = 0.5f * d + std::fabs(lo - min_of(w, r, c)) + 16 * d * 0x1p-11f;
              ASSERT_LE(err, bound * (1 + 1e-5f)) << c;
              sum_err += err;
              sum_step += d;
              break;
            }
          }
        }
      }
      if (is_quantized(f)) {
        // Rounding errors are spread over [0, d/2]: a mean near d/4 shows real quantization.
        const double ratio = sum_err / sum_step;
        EXPECT_GT(ratio, 0.15);
        EXPECT_LT(ratio, 0.35);
      }
    }
  }
}

TEST(QuantFormat, KnownHalfConversions) {
  const float v[4] = {1.0f, -2.5f, 1.0f + 0x1p-8f, 65504.0f};
  QuantWeight h = allocate_weight(WeightFormat::fp16, 1, 4, 0);
  QuantWeight b = allocate_weight(WeightFormat::bf16, 1, 4, 0);
  quantize_row(h, 0, v);
  quantize_row(b, 0, v);
  const uint16_t* hb = h.data.as<uint16_t>();
  const uint16_t* bb = b.data.as<uint16_t>();
  EXPECT_EQ(hb[0], 0x3c00);
  EXPECT_EQ(hb[1], 0xc100);
  EXPECT_EQ(hb[2], 0x3c04);
  EXPECT_EQ(hb[3], 0x7bff);
  EXPECT_EQ(bb[0], 0x3f80);
  EXPECT_EQ(bb[1], 0xc020);
  EXPECT_EQ(bb[2], 0x3f80);  // 1 + 2^-8 is a tie in bf16: rounds to even
}

TEST(QuantFormat, Deterministic) {
  const int64_t cols = 256;
  std::vector<float> a = random_normal(cols, 42);
  std::vector<float> b = random_normal(cols, 43);
  for (WeightFormat f : kAllFormats) {
    SCOPED_TRACE(format_name(f));
    QuantWeight w1 = allocate_weight(f, 2, cols, 64);
    QuantWeight w2 = allocate_weight(f, 2, cols, 64);
    quantize_row(w1, 0, a.data());
    quantize_row(w1, 1, b.data());
    quantize_row(w2, 1, b.data());  // other order, other rows
    quantize_row(w2, 0, a.data());
    EXPECT_EQ(std::memcmp(w1.data.data(), w2.data.data(), w1.data.size()), 0);
    if (!w1.scales.empty()) {
      EXPECT_EQ(std::memcmp(w1.scales.data(), w2.scales.data(), w1.scales.size()), 0);
    }
    if (!w1.mins.empty()) {
      EXPECT_EQ(std::memcmp(w1.mins.data(), w2.mins.data(), w1.mins.size()), 0);
    }
    // Row 0 and row 1 differ, and rows do not overlap.
    EXPECT_NE(
        std::memcmp(w1.data.data(), w1.data.data() + w1.data_row_bytes(), w1.data_row_bytes()), 0);
  }
}

}  // namespace
}  // namespace kestrel
