// The harness of the device backends' op tests (tests/cuda, tests/vulkan): random weights and
// models, a CPU and a device backend holding the same weights and reservation, error norms. The
// device is the test binary's: it defines make_device_backend() and write_device_tensor().
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "model/weights.h"
#include "quant/format.h"
#include "scrambled_tables.h"

namespace kestrel::backend_test {

// The backend under test (defined once by each device's test binary).
Result<std::unique_ptr<Backend>> make_device_backend();
// Copies host fp32 [t.rows, t.cols] into a scratch tensor of that backend.
Status write_device_tensor(Backend& backend, Tensor t, const float* host);

inline std::vector<float> random_values(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

inline QuantWeight random_weight(WeightFormat format, int64_t rows, int64_t cols, int block,
                                 uint64_t seed) {
  QuantWeight w = allocate_weight(format, rows, cols, block);
  const std::vector<float> values =
      random_values(size_t(rows * cols), seed, 1.0f / std::sqrt(float(cols)));
  for (int64_t r = 0; r < rows; ++r) quantize_row(w, r, values.data() + r * cols);
  return w;
}

inline Linear random_linear(WeightFormat format, int64_t rows, int64_t cols, int block, bool bias,
                            uint64_t seed) {
  Linear l;
  l.w = random_weight(format, rows, cols, block, seed);
  if (bias) {
    l.bias = Blob::allocate(size_t(rows) * sizeof(float));
    const std::vector<float> b = random_values(size_t(rows), seed + 1, 0.1f);
    std::copy(b.begin(), b.end(), l.bias.as_mutable<float>());
  }
  return l;
}

inline Vector random_vector(int64_t n, uint64_t seed) {
  Vector v;
  v.n = n;
  v.data = Blob::allocate(size_t(n) * sizeof(float));
  const std::vector<float> values = random_values(size_t(n), seed, 0.2f);
  for (int64_t i = 0; i < n; ++i) v.data.as_mutable<float>()[i] = 1.0f + values[size_t(i)];
  return v;
}

// A model of `config`'s shape with random weights in `format`, every tensor of the tensor list
// (model/weights.h); `bias`: every linear carries a bias, whatever the config says.
inline ModelWeights random_model(const ModelConfig& config, WeightFormat format, int block,
                                 bool bias, uint64_t seed) {
  ModelWeights w = weights_skeleton(config);
  w.format = format;
  w.block = block;
  const Status s = for_each_tensor(w, [&](const TensorInfo& t, auto& member) -> Status {
    using Member = std::remove_cvref_t<decltype(member)>;
    if constexpr (std::is_same_v<Member, QuantWeight>) {
      member = random_weight(format, t.rows, t.cols, block, seed++);
    } else if constexpr (std::is_same_v<Member, Linear>) {
      // The lm_head gets its own table even when the config ties it: the tests compare the
      // backends, not the tying.
      member = random_linear(format, t.rows, t.cols, block, bias && t.layer >= 0, seed++);
    } else {
      member = random_vector(t.rows, seed++);
    }
    return Status::ok();
  });
  EXPECT_TRUE(s.is_ok()) << s.message();
  return w;
}

inline ModelConfig small_config(int64_t hidden, int64_t intermediate, int64_t heads,
                                int64_t kv_heads, int64_t head_dim, int64_t vocab) {
  ModelConfig c;
  c.arch = Architecture::llama;
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.n_layers = 2;
  c.n_heads = heads;
  c.n_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.vocab_size = vocab;
  c.max_position_embeddings = 4096;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  return c;
}

// ||a - b|| / ||b||, and infinity when either holds a NaN (unwritten poisoned output).
inline double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return INFINITY;
    diff += (double(a[i]) - double(b[i])) * (double(a[i]) - double(b[i]));
    norm += double(b[i]) * double(b[i]);
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// A CPU and a device backend holding the same weights and reservation; ops run on both with the
// same inputs.
struct BackendPair {
  std::unique_ptr<Backend> cpu;
  std::unique_ptr<Backend> gpu;
  // Both backends read and write the KV cache through the same shuffled block tables.
  testing::ScrambledBlockTables tables;
  BatchView paged(BatchView view) const { return tables(view); }

  // Fails the test (returns false) when the device backend cannot be made. `device`, when
  // given, is the device backend to use instead of make_device_backend()'s; `reference`, when
  // given, takes the CPU's place (two configurations of one device compared with each other).
  bool init(ModelWeights& weights, const RunShape& shape, std::unique_ptr<Backend> device = {},
            std::unique_ptr<Backend> reference = {}) {
    cpu = reference != nullptr ? std::move(reference) : make_cpu_backend(2);
    if (device != nullptr) {
      gpu = std::move(device);
    } else {
      auto g = make_device_backend();
      EXPECT_TRUE(g.is_ok()) << g.status().message();
      if (!g.is_ok()) return false;
      gpu = std::move(g).value();
    }
    tables = testing::ScrambledBlockTables(shape, 0x5eed + uint64_t(shape.max_context));
    for (Backend* b : {cpu.get(), gpu.get()}) {
      Status s = b->upload(weights);
      EXPECT_TRUE(s.is_ok()) << s.message();
      s = b->reserve(weights.config, shape);
      EXPECT_TRUE(s.is_ok()) << s.message();
      if (!s.is_ok()) return false;
    }
    return true;
  }
};

// Copies host values into a tensor of either backend.
inline void fill(Backend& backend, Tensor t, const std::vector<float>& values) {
  ASSERT_EQ(values.size(), size_t(t.rows * t.cols));
  if (backend.name().rfind("cpu", 0) != 0) {
    const Status s = write_device_tensor(backend, t, values.data());
    ASSERT_TRUE(s.is_ok()) << s.message();
  } else {
    std::copy(values.begin(), values.end(), static_cast<float*>(t.data));
  }
}

inline std::vector<float> fetch(Backend& backend, Tensor t) {
  std::vector<float> out(size_t(t.rows * t.cols));
  const Status s = backend.read(t, out.data());
  EXPECT_TRUE(s.is_ok()) << s.message();
  return out;
}

// Fills a tensor with NaN so that any element an op fails to write shows up in the comparison.
inline void poison(Backend& backend, Tensor t) {
  fill(backend, t, std::vector<float>(size_t(t.rows * t.cols), NAN));
}

// --- shared by the op tests ----------------------------------------------------------------

struct FormatCase {
  WeightFormat format;
  int block;
};

inline std::string format_case_name(const ::testing::TestParamInfo<FormatCase>& info) {
  return std::string(format_name(info.param.format)) + "_b" + std::to_string(info.param.block);
}

inline const FormatCase kFormats[] = {
    {WeightFormat::sym_int4, 32},  {WeightFormat::sym_int4, 64}, {WeightFormat::asym_int4, 32},
    {WeightFormat::asym_int4, 64}, {WeightFormat::sym_int8, 32}, {WeightFormat::fp16, 0},
    {WeightFormat::bf16, 0},       {WeightFormat::fp32, 0},
};

// y = x · wᵀ + b in double over the weight's own dequantized values.
inline std::vector<float> reference_matmul(const Linear& l, const std::vector<float>& x,
                                           int64_t n) {
  const QuantWeight& w = l.w;
  std::vector<float> row(size_t(w.cols));
  std::vector<float> y(size_t(n * w.rows));
  for (int64_t r = 0; r < w.rows; ++r) {
    dequantize_row(w, r, row.data());
    for (int64_t t = 0; t < n; ++t) {
      double acc = l.bias.empty() ? 0.0 : double(l.bias.as<float>()[r]);
      for (int64_t k = 0; k < w.cols; ++k)
        acc += double(row[size_t(k)]) * double(x[size_t(t * w.cols + k)]);
      y[size_t(t * w.rows + r)] = float(acc);
    }
  }
  return y;
}

inline BatchView batch_of(int64_t n, std::vector<int32_t>& storage, int32_t first_pos = 0,
                          int32_t seq = 0) {
  storage.assign(size_t(3 * n), 0);
  for (int64_t i = 0; i < n; ++i) {
    storage[size_t(i)] = int32_t(i % 7);
    storage[size_t(n + i)] = first_pos + int32_t(i);
    storage[size_t(2 * n + i)] = seq;
  }
  return BatchView{n, storage.data(), storage.data() + n, storage.data() + 2 * n};
}

}  // namespace kestrel::backend_test
