// cpu::matmul against double-precision references built from dequantize_row, on both ISA paths.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/cpu_features.h"
#include "backend/cpu/matmul.h"
#include "quant/format.h"

namespace kestrel {
namespace {

const WeightFormat kAllFormats[] = {WeightFormat::fp32,     WeightFormat::fp16,
                                    WeightFormat::bf16,     WeightFormat::sym_int8,
                                    WeightFormat::sym_int4, WeightFormat::asym_int4};

std::vector<float> random_normal(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

QuantWeight make_weight(WeightFormat f, int64_t rows, int64_t cols, int block, uint32_t seed) {
  QuantWeight w = allocate_weight(f, rows, cols, block);
  std::vector<float> values = random_normal(size_t(rows * cols), seed, 0.05f);
  // A few rows with a larger scale and an offset, so scales and asym mins vary between blocks.
  for (int64_t r = 0; r < rows; r += 5) {
    for (int64_t c = 0; c < cols; ++c) values[r * cols + c] = values[r * cols + c] * 4 + 0.03f;
  }
  for (int64_t r = 0; r < rows; ++r) quantize_row(w, r, values.data() + r * cols);
  return w;
}

std::vector<double> dequantized(const QuantWeight& w) {
  std::vector<double> out(size_t(w.rows * w.cols));
  std::vector<float> row(size_t(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    dequantize_row(w, r, row.data());
    for (int64_t c = 0; c < w.cols; ++c) out[r * w.cols + c] = row[c];
  }
  return out;
}

// y = x · wᵀ + bias in double, from the dequantized weights.
std::vector<double> reference(const std::vector<double>& wd, int64_t rows, int64_t cols,
                              const std::vector<double>& x, int64_t n, const float* bias) {
  std::vector<double> y(size_t(n * rows));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t r = 0; r < rows; ++r) {
      double s = bias != nullptr ? bias[r] : 0.0;
      for (int64_t c = 0; c < cols; ++c) s += wd[r * cols + c] * x[t * cols + c];
      y[t * rows + r] = s;
    }
  }
  return y;
}

// The activations as the integer kernels see them: groups of 32, scale = max|x| / 127, values
// rounded to nearest even (the rule documented in matmul.h), written out independently here.
std::vector<double> activations_as_int8(const std::vector<float>& x, int64_t n, int64_t cols) {
  std::vector<double> out(x.size());
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t g = 0; g < cols / 32; ++g) {
      const float* src = x.data() + t * cols + g * 32;
      float amax = 0.0f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(src[i]));
      const float scale = amax / 127.0f;
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      for (int i = 0; i < 32; ++i) {
        out[t * cols + g * 32 + i] = double(std::nearbyint(src[i] * inv)) * double(scale);
      }
    }
  }
  return out;
}

double normalized_error(const std::vector<float>& y, const std::vector<double>& ref) {
  double num = 0.0;
  double den = 0.0;
  for (size_t i = 0; i < y.size(); ++i) {
    num += (y[i] - ref[i]) * (y[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

struct Isa {
  const char* name;
  bool force_avx2;
};

std::vector<Isa> isas_to_test() {
  std::vector<Isa> isas = {{"avx2", true}};
  if (cpu::has_avx512_kernels()) isas.push_back({"avx512-vnni", false});
  return isas;
}

class ForceAvx2Reset : public ::testing::Test {
 protected:
  void TearDown() override { cpu::set_force_avx2(false); }
};

using CpuMatmul = ForceAvx2Reset;

TEST(CpuFeatures, Consistent) {
  const cpu::CpuFeatures& f = cpu::cpu_features();
  // AVX-512 kernels imply the baseline, and the description lists what was detected.
  if (cpu::has_avx512_kernels()) {
    EXPECT_TRUE(cpu::has_baseline_features());
    EXPECT_TRUE(f.avx512vnni && f.avx512bw && f.avx512vl);
  }
  const std::string description = cpu::describe_cpu_features();
  EXPECT_EQ(description.find("avx512vnni") != std::string::npos, f.avx512vnni) << description;
  EXPECT_EQ(description.find("avx2") != std::string::npos, f.avx2) << description;
  // The whole suite runs the baseline kernels; a CI machine without them is misconfigured.
  EXPECT_TRUE(cpu::has_baseline_features()) << description;
}

TEST_F(CpuMatmul, IsaSelection) {
  cpu::set_force_avx2(true);
  EXPECT_STREQ(cpu::matmul_isa(), "avx2");
  cpu::set_force_avx2(false);
  EXPECT_STREQ(cpu::matmul_isa(), cpu::has_avx512_kernels() ? "avx512-vnni" : "avx2");
}

// Every format, both blocks, token counts that exercise every token-tile size and its tail, a
// row count that is not a multiple of the 4-row tile, and column counts whose group counts
// (10, 18) leave partial 16-group chunks and partial 4-group quads.
//
// Bounds (normalized error ||y - ref|| / ||ref||), measured on both ISAs with these seeds:
//  * float formats vs the exact product of the (exactly dequantized) weights: fp32 rounding in
//    the accumulation only, measured <= 1.9e-7; bound 1e-6.
//  * integer formats vs the same double product but with the activations rounded to int8 as
//    the kernels do (activations_as_int8): again only fp32 rounding, since the integer dot
//    products are exact; asym_int4 is the largest because its min term is summed separately
//    and cancels against the rest: measured <= 5.4e-7; bound 2e-6. This catches any wrong
//    scale, sum or lane, which would cost far more than that.
//  * integer formats vs the unrounded activations: the int8 rounding of x adds independent
//    errors of up to max|x|/254 per value, about 0.6% of |x| for normal data, which average to
//    about 0.6% of |y|: measured <= 7.5e-3; bound 2e-2.
TEST_F(CpuMatmul, MatchesReferenceAllFormats) {
  ThreadPool pool(2);
  const int64_t rows = 37;
  for (const Isa& isa : isas_to_test()) {
    cpu::set_force_avx2(isa.force_avx2);
    ASSERT_STREQ(cpu::matmul_isa(), isa.name);
    for (WeightFormat f : kAllFormats) {
      for (int block : {32, 64}) {
        if (!is_quantized(f) && block == 64) continue;
        for (int64_t cols : {320, 576}) {
          const QuantWeight w = make_weight(f, rows, cols, block, uint32_t(cols + block));
          const std::vector<double> wd = dequantized(w);
          for (int64_t n : {1, 3, 5, 16, 37}) {
            SCOPED_TRACE(std::string(isa.name) + " " + format_name(f) + " block " +
                         std::to_string(block) + " cols " + std::to_string(cols) + " n " +
                         std::to_string(n));
            const std::vector<float> x = random_normal(size_t(n * cols), uint32_t(n * 7 + cols));
            std::vector<float> y(size_t(n * rows), std::nanf(""));
            cpu::matmul(w, x.data(), n, y.data(), nullptr, pool);
            const std::vector<double> xd(x.begin(), x.end());
            const double err = normalized_error(y, reference(wd, rows, cols, xd, n, nullptr));
            if (is_quantized(f)) {
              const std::vector<double> xq = activations_as_int8(x, n, cols);
              const double err_q = normalized_error(y, reference(wd, rows, cols, xq, n, nullptr));
              EXPECT_LT(err_q, 2e-6);
              EXPECT_LT(err, 2e-2);
            } else {
              EXPECT_LT(err, 1e-6);
            }
          }
        }
      }
    }
  }
}

// Float formats take any column count (tails shorter than a vector).
TEST_F(CpuMatmul, FloatFormatsOddColumns) {
  ThreadPool pool(2);
  const int64_t rows = 6;
  for (const Isa& isa : isas_to_test()) {
    cpu::set_force_avx2(isa.force_avx2);
    for (WeightFormat f : {WeightFormat::fp32, WeightFormat::fp16, WeightFormat::bf16}) {
      for (int64_t cols : {1, 7, 77}) {
        SCOPED_TRACE(std::string(isa.name) + " " + format_name(f) + " cols " +
                     std::to_string(cols));
        const QuantWeight w = make_weight(f, rows, cols, 0, 3);
        const int64_t n = 5;
        const std::vector<float> x = random_normal(size_t(n * cols), 4);
        std::vector<float> y(size_t(n * rows));
        cpu::matmul(w, x.data(), n, y.data(), nullptr, pool);
        const std::vector<double> xd(x.begin(), x.end());
        EXPECT_LT(normalized_error(y, reference(dequantized(w), rows, cols, xd, n, nullptr)), 1e-6);
      }
    }
  }
}

TEST_F(CpuMatmul, AddsBias) {
  ThreadPool pool(2);
  const int64_t rows = 9;
  const int64_t cols = 128;
  const int64_t n = 5;
  const std::vector<float> bias = random_normal(rows, 11, 3.0f);
  const std::vector<float> x = random_normal(size_t(n * cols), 12);
  for (const Isa& isa : isas_to_test()) {
    cpu::set_force_avx2(isa.force_avx2);
    for (WeightFormat f : kAllFormats) {
      SCOPED_TRACE(std::string(isa.name) + " " + format_name(f));
      const QuantWeight w = make_weight(f, rows, cols, 32, 13);
      std::vector<float> plain(size_t(n * rows));
      std::vector<float> biased(size_t(n * rows));
      cpu::matmul(w, x.data(), n, plain.data(), nullptr, pool);
      cpu::matmul(w, x.data(), n, biased.data(), bias.data(), pool);
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t r = 0; r < rows; ++r) {
          const float p = plain[t * rows + r];
          EXPECT_NEAR(biased[t * rows + r], p + bias[r], 1e-5f * (std::fabs(p) + 3.0f));
        }
      }
    }
  }
}

// Every output is computed by the same tile whatever the thread count, so results are
// bit-identical across pools: generation does not depend on the machine's core count.
TEST_F(CpuMatmul, SameBitsForAnyThreadCount) {
  ThreadPool one(1);
  ThreadPool three(3);
  const int64_t rows = 70;
  const int64_t cols = 256;
  const int64_t n = 7;
  const std::vector<float> x = random_normal(size_t(n * cols), 21);
  for (const Isa& isa : isas_to_test()) {
    cpu::set_force_avx2(isa.force_avx2);
    for (WeightFormat f : {WeightFormat::fp16, WeightFormat::sym_int4}) {
      SCOPED_TRACE(std::string(isa.name) + " " + format_name(f));
      const QuantWeight w = make_weight(f, rows, cols, 32, 22);
      std::vector<float> y1(size_t(n * rows));
      std::vector<float> y3(size_t(n * rows));
      cpu::matmul(w, x.data(), n, y1.data(), nullptr, one);
      cpu::matmul(w, x.data(), n, y3.data(), nullptr, three);
      EXPECT_EQ(std::memcmp(y1.data(), y3.data(), y1.size() * sizeof(float)), 0);
    }
  }
}

// An activation group of zeros (scale 0) and one with a large outlier: no NaN from the zero
// scale, and the kernels still compute exactly the int8-rounded product (the outlier only
// coarsens its own group).
TEST_F(CpuMatmul, ZeroGroupsAndOutliers) {
  ThreadPool pool(2);
  const int64_t rows = 8;
  const int64_t cols = 128;
  std::vector<float> x = random_normal(cols, 31);
  for (int i = 0; i < 32; ++i) x[i] = 0.0f;
  x[40] = 1000.0f;
  const std::vector<double> xq = activations_as_int8(x, 1, cols);
  for (const Isa& isa : isas_to_test()) {
    cpu::set_force_avx2(isa.force_avx2);
    for (WeightFormat f :
         {WeightFormat::sym_int8, WeightFormat::sym_int4, WeightFormat::asym_int4}) {
      SCOPED_TRACE(std::string(isa.name) + " " + format_name(f));
      const QuantWeight w = make_weight(f, rows, cols, 64, 32);
      std::vector<float> y(rows);
      cpu::matmul(w, x.data(), 1, y.data(), nullptr, pool);
      EXPECT_LT(normalized_error(y, reference(dequantized(w), rows, cols, xq, 1, nullptr)), 2e-6);
    }
  }
}

// A copy of `blob` whose last byte sits right before an inaccessible page, as the end of a
// memory-mapped model file may: any read past the array faults.
Blob guarded_copy(const Blob& blob) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t data_pages = (blob.size() + page - 1) / page;
  const size_t total = (data_pages + 1) * page;
  void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return Blob();
  uint8_t* base = static_cast<uint8_t*>(p);
  mprotect(base + data_pages * page, page, PROT_NONE);
  uint8_t* start = base + data_pages * page - blob.size();
  std::memcpy(start, blob.data(), blob.size());
  std::shared_ptr<const void> owner(
      p, [total](const void* q) { munmap(const_cast<void*>(q), total); });
  return Blob::view(std::move(owner), start, blob.size());
}

// Tails of every kind (partial quads and chunks, float tails) at the very end of each array.
TEST_F(CpuMatmul, NoReadsPastTheWeightArrays) {
  ThreadPool pool(2);
  const int64_t rows = 5;
  for (const Isa& isa : isas_to_test()) {
    cpu::set_force_avx2(isa.force_avx2);
    for (WeightFormat f : kAllFormats) {
      for (int block : {32, 64}) {
        const int64_t cols = is_quantized(f) ? 3 * 64 : 37;  // 6 groups; odd float tail
        SCOPED_TRACE(std::string(isa.name) + " " + format_name(f) + " block " +
                     std::to_string(block));
        QuantWeight w = make_weight(f, rows, cols, block, 5);
        const std::vector<double> wd = dequantized(w);
        w.data = guarded_copy(w.data);
        if (!w.scales.empty()) w.scales = guarded_copy(w.scales);
        if (!w.mins.empty()) w.mins = guarded_copy(w.mins);
        ASSERT_FALSE(w.data.empty());
        for (int64_t n : {1, 6, 9}) {
          const std::vector<float> x = random_normal(size_t(n * cols), 6);
          std::vector<float> y(size_t(n * rows));
          cpu::matmul(w, x.data(), n, y.data(), nullptr, pool);
          const std::vector<double> xd = is_quantized(f) ? activations_as_int8(x, n, cols)
                                                         : std::vector<double>(x.begin(), x.end());
          EXPECT_LT(normalized_error(y, reference(wd, rows, cols, xd, n, nullptr)), 2e-6);
        }
      }
    }
  }
}

TEST_F(CpuMatmul, NoTokensLeavesOutputAlone) {
  ThreadPool pool(2);
  const QuantWeight w = make_weight(WeightFormat::sym_int4, 4, 64, 32, 1);
  float y = 42.0f;
  cpu::matmul(w, nullptr, 0, &y, nullptr, pool);
  EXPECT_EQ(y, 42.0f);
}

}  // namespace
}  // namespace kestrel
