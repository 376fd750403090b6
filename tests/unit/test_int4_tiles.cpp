// The CUDA backend's tiled int4 layout (src/backend/cuda/int4_tiles.h) holds every weight of the
// host layout where its index functions say, and zeros in the padding: checked on the CPU, so
// the layout is tested where no GPU is.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "backend/cuda/int4_tiles.h"
#include "core/half.h"
#include "quant/format.h"

namespace kestrel {
namespace {

float value_at(const cuda::TiledInt4& t, WeightFormat format, int64_t row, int64_t k) {
  const int64_t g = k / 32;
  const int j = int(k % 32);
  const uint8_t byte = t.data[size_t(t.tiles.group_offset(row, g) + (j & 15))];
  const int code = j < 16 ? (byte & 0x0f) : (byte >> 4);
  const size_t s = size_t(t.tiles.scale_index(row, g));
  const float d = fp16_to_float(t.scales[s]);
  if (format == WeightFormat::sym_int4) return float(code - 8) * d;
  return float(code) * d + fp16_to_float(t.mins[s]);
}

struct Case {
  WeightFormat format;
  int64_t rows, cols;
  int block;
};

TEST(Int4Tiles, HoldsEveryWeightOfTheHostLayout) {
  // Rows not a multiple of 16 and groups not a multiple of 4 exercise the padding.
  const Case cases[] = {{WeightFormat::sym_int4, 37, 96, 32},
                        {WeightFormat::asym_int4, 37, 96, 32},
                        {WeightFormat::sym_int4, 20, 256, 64},
                        {WeightFormat::asym_int4, 48, 640, 64},
                        {WeightFormat::sym_int4, 16, 32, 32}};
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(format_name(c.format)) + " " + std::to_string(c.rows) + "x" +
                 std::to_string(c.cols) + " block " + std::to_string(c.block));
    QuantWeight w = allocate_weight(c.format, c.rows, c.cols, c.block);
    std::vector<float> row(size_t(c.cols));
    for (int64_t r = 0; r < c.rows; ++r) {
      for (float& v : row) v = normal(rng);
      quantize_row(w, r, row.data());
    }
    const cuda::TiledInt4 t = cuda::tile_int4(w);
    EXPECT_EQ(t.tiles.n_tiles, (c.rows + 15) / 16);
    EXPECT_EQ(t.tiles.n_chunks, (c.cols / 32 + 3) / 4);
    std::vector<float> expected(size_t(c.cols));
    for (int64_t r = 0; r < c.rows; ++r) {
      dequantize_row(w, r, expected.data());
      for (int64_t k = 0; k < c.cols; ++k) {
        // Near, not equal: the compiler may fuse the asym multiply-add here (a layout error
        // gives another weight's value, far outside this bound).
        const float e = expected[size_t(k)];
        ASSERT_NEAR(value_at(t, c.format, r, k), e, 1e-5f * (1.0f + std::abs(e)))
            << "row " << r << " col " << k;
      }
    }
    // Every byte is written once by a real weight or stays zero: count the non-padding slots.
    std::vector<int> data_hits(t.data.size(), 0), scale_hits(t.scales.size(), 0);
    for (int64_t r = 0; r < c.rows; ++r) {
      for (int64_t g = 0; g < c.cols / 32; ++g) {
        for (int i = 0; i < 16; ++i) ++data_hits[size_t(t.tiles.group_offset(r, g) + i)];
        ++scale_hits[size_t(t.tiles.scale_index(r, g))];
      }
    }
    for (size_t i = 0; i < t.data.size(); ++i) {
      ASSERT_LE(data_hits[i], 1) << "data byte " << i << " belongs to two weights";
      if (data_hits[i] == 0) {
        ASSERT_EQ(t.data[i], 0) << "padding byte " << i;
      }
    }
    const int sharing = c.block / 32;  // groups sharing one scale
    for (size_t i = 0; i < t.scales.size(); ++i) {
      ASSERT_TRUE(scale_hits[i] == 0 || scale_hits[i] == sharing) << "scale " << i;
      if (scale_hits[i] == 0) {
        ASSERT_EQ(t.scales[i], 0) << "padding scale " << i;
      }
    }
  }
}

}  // namespace
}  // namespace kestrel
