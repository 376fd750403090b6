#include "backend/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <optional>

#include "backend/cpu/matmul.h"
#include "backend/cpu/read_bandwidth.h"
#include "model/rope.h"

namespace kestrel {
namespace {

float* f32(Tensor t) {
  return static_cast<float*>(t.data);
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads) {}

  std::string name() const override { return std::string("cpu (") + cpu::matmul_isa() + ")"; }
  // The host's read bandwidth with this backend's threads, measured at the first call (a fill
  // and seven passes over 256 MiB take ~0.3 s on the development machine) and kept. A constant
  // (DESIGN.md's 31 GB/s) read 128% there, which measured 28-69 GB/s with the same two threads
  // from one minute to the next. The mutex keeps the measurement to one caller; it runs on
  // pool_, which, like every op here, takes one caller at a time.
  Roofline roofline() override {
    std::lock_guard<std::mutex> lock(roofline_mutex_);
    if (!roofline_) {
      Result<cpu::ReadBandwidth> r = cpu::measure_read_bandwidth(
          pool_, cpu::read_bandwidth_bytes(pool_.size()), kRooflinePasses);
      roofline_ = r.is_ok() ? Roofline{r->gbs, "measured: " + std::to_string(r->bytes >> 20) +
                                                   " MiB read by " + std::to_string(r->threads) +
                                                   " threads, fastest of " +
                                                   std::to_string(r->passes) + " passes"}
                            : Roofline{0, "measurement failed: " + r.status().message()};
    }
    return *roofline_;
  }

  // The prompt's products of integer weights: int8 activations times integer codes, with the
  // kernels' own multiply-add instructions on every thread (measure_int8_tops, ~30-60 ms), once.
  MatrixRate matrix_rate() override {
    std::lock_guard<std::mutex> lock(roofline_mutex_);
    if (!matrix_rate_) {
      matrix_rate_ =
          MatrixRate{cpu::measure_int8_tops(pool_, kRooflinePasses),
                     std::string("measured: ") + cpu::matmul_isa() + " int8 multiply-adds on " +
                         std::to_string(pool_.size()) + " threads, registers only, fastest of " +
                         std::to_string(kRooflinePasses) + " passes"};
    }
    return *matrix_rate_;
  }

  Status upload(ModelWeights&) override { return Status::ok(); }

  WorkspaceTypes workspace_types() const {
    WorkspaceTypes types;
    types.kv_element_bytes = sizeof(float);
    types.activation_element_bytes = sizeof(float);
    types.score_rows = pool_.size();  // one attention score row per worker thread
    return types;
  }

  Result<WorkspaceLayout> reserve_layout(const ModelConfig& config,
                                         const RunShape& shape) const override {
    WorkspaceLayout layout = workspace_layout(config, shape, workspace_types());
    // cpu::matmul quantizes each call's activations into a buffer its calling thread keeps: per
    // token, an int8 and up to 6 floats per 32 inputs of the widest matmul input, the groups
    // rounded up to 16 (matmul.cpp, quantize_activations).
    const int64_t widest = std::max({config.hidden_size, config.q_dim(), config.intermediate_size});
    const int64_t groups_padded = ((widest + 31) / 32 + 15) / 16 * 16;
    layout.kernel_scratch_bytes =
        size_t(shape.max_batch_tokens) * size_t(groups_padded) * (32 + 6 * sizeof(float));
    return layout;
  }

  Status do_reserve(const ModelConfig& config, const RunShape& shape) override {
    // Release the previous reservation before allocating the next, so that a re-reserve never
    // holds both.
    std::vector<float>().swap(k_cache_);
    std::vector<float>().swap(v_cache_);
    std::vector<float>().swap(scratch_);
    std::vector<float>().swap(scores_);
    config_ = config;
    shape_ = shape;
    inv_freq_ = rope_inv_freq(config);
    const WorkspaceLayout layout = workspace_layout(config, shape, workspace_types());
    k_cache_.assign(layout.kv_cache_elements, 0.0f);
    v_cache_.assign(layout.kv_cache_elements, 0.0f);
    scratch_.assign(layout.scratch_elements, 0.0f);
    scratch_used_ = 0;
    scores_.assign(layout.score_elements, 0.0f);
    return Status::ok();
  }

  Status do_copy_kv_block(int32_t src, int32_t dst) override {
    if (src == dst) return Status::ok();
    const size_t block = size_t(kKvBlockSize * config_.kv_dim());
    for (int64_t layer = 0; layer < config_.n_layers; ++layer) {
      for (std::vector<float>* cache : {&k_cache_, &v_cache_}) {
        std::memcpy(kv_row(*cache, layer, dst, 0, 0), kv_row(*cache, layer, src, 0, 0),
                    block * sizeof(float));
      }
    }
    return Status::ok();
  }

  Status do_begin_batch(const BatchView& batch) override {
    batch_ = batch;
    scratch_used_ = 0;
    return Status::ok();
  }

  Result<Tensor> scratch(int64_t rows, int64_t cols) override {
    const size_t n = (size_t(rows * cols) + 15) / 16 * 16;  // keep 64-byte alignment
    if (scratch_used_ + n > scratch_.size()) {
      return Status::error("cpu backend: scratch workspace exhausted (planner bug)");
    }
    Tensor t{scratch_.data() + scratch_used_, rows, cols};
    scratch_used_ += n;
    return t;
  }

  Status embed(Tensor out, const QuantWeight& table) override {
    for (int64_t i = 0; i < batch_.n_tokens; ++i) {
      const int32_t token = batch_.tokens[i];
      if (token < 0 || token >= table.rows) {
        return Status::error("token id " + std::to_string(token) + " outside the vocabulary of " +
                             std::to_string(table.rows));
      }
      dequantize_row(table, token, f32(out) + i * out.cols);
    }
    return Status::ok();
  }

  Status rms_norm(Tensor out, Tensor x, const Vector& w, float eps) override {
    const float* weight = w.f32();
    const int64_t d = x.cols;
    pool_.parallel_for(x.rows, 1, [&](int64_t begin, int64_t end, int) {
      for (int64_t r = begin; r < end; ++r) {
        const float* in = f32(x) + r * d;
        float* o = f32(out) + r * d;
        // HF computes the mean of squares in fp32 for fp32 models; double here costs nothing.
        double sum = 0.0;
        for (int64_t i = 0; i < d; ++i) sum += double(in[i]) * double(in[i]);
        const float scale = float(1.0 / std::sqrt(sum / double(d) + double(eps)));
        for (int64_t i = 0; i < d; ++i) o[i] = weight[i] * (in[i] * scale);
      }
    });
    return Status::ok();
  }

  Status matmul(Tensor out, Tensor x, const Linear& w) override {
    cpu::matmul(w.w, f32(x), x.rows, f32(out), w.bias.empty() ? nullptr : w.bias.as<float>(),
                pool_);
    return Status::ok();
  }

  Status rope(Tensor q, Tensor k, const RopeParams& p) override {
    const int64_t half = p.head_dim / 2;
    pool_.parallel_for(batch_.n_tokens, 1, [&](int64_t begin, int64_t end, int) {
      std::vector<float> cos_v(static_cast<size_t>(half)), sin_v(static_cast<size_t>(half));
      for (int64_t t = begin; t < end; ++t) {
        const float pos = float(batch_.positions[t]);
        for (int64_t i = 0; i < half; ++i) {
          // HF: the angle is an fp32 product, its cos/sin fp32.
          const float angle = pos * inv_freq_[size_t(i)];
          cos_v[size_t(i)] = std::cos(angle);
          sin_v[size_t(i)] = std::sin(angle);
        }
        auto rotate = [&](float* head) {
          // rotate_half convention: element i pairs with element i + head_dim/2.
          for (int64_t i = 0; i < half; ++i) {
            const float a = head[i], b = head[i + half];
            head[i] = a * cos_v[size_t(i)] - b * sin_v[size_t(i)];
            head[i + half] = b * cos_v[size_t(i)] + a * sin_v[size_t(i)];
          }
        };
        for (int64_t h = 0; h < p.n_heads; ++h) rotate(f32(q) + t * q.cols + h * p.head_dim);
        for (int64_t h = 0; h < p.n_kv_heads; ++h) rotate(f32(k) + t * k.cols + h * p.head_dim);
      }
    });
    return Status::ok();
  }

  // K or V of (layer, block, KV head, row of the block): head_dim contiguous floats.
  float* kv_row(std::vector<float>& cache, int64_t layer, int64_t block, int64_t kv_head,
                int64_t row) {
    const int64_t d = config_.head_dim;
    return cache.data() +
           (((layer * shape_.pool_blocks() + block) * config_.n_kv_heads + kv_head) * kKvBlockSize +
            row) *
               d;
  }
  // Where position `pos` of slot `seq` lives: (block, row).
  std::pair<int64_t, int64_t> kv_place(int64_t seq, int64_t pos) const {
    const int32_t* table = batch_.block_tables + seq * batch_.block_table_stride;
    return {table[pos / kKvBlockSize], pos % kKvBlockSize};
  }

  Status attention(Tensor out, Tensor q, Tensor k, Tensor v, int64_t layer,
                   const RopeParams& p) override {
    const int64_t kv_dim = config_.kv_dim();
    const int64_t d = p.head_dim;
    for (int64_t t = 0; t < batch_.n_tokens; ++t) {
      const auto [block, row] = kv_place(batch_.seq_ids[t], batch_.positions[t]);
      for (int64_t kv_h = 0; kv_h < p.n_kv_heads; ++kv_h) {
        std::memcpy(kv_row(k_cache_, layer, block, kv_h, row), f32(k) + t * kv_dim + kv_h * d,
                    size_t(d) * sizeof(float));
        std::memcpy(kv_row(v_cache_, layer, block, kv_h, row), f32(v) + t * kv_dim + kv_h * d,
                    size_t(d) * sizeof(float));
      }
    }
    const int64_t group = p.n_heads / p.n_kv_heads;
    const float scale = 1.0f / std::sqrt(float(p.head_dim));
    // One unit of work is one (token, head) pair; it reads the positions 0..pos of its sequence.
    pool_.parallel_for(batch_.n_tokens * p.n_heads, 1, [&](int64_t begin, int64_t end, int tid) {
      float* scores = scores_.data() + size_t(tid) * size_t(shape_.max_context);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t t = unit / p.n_heads;
        const int64_t h = unit % p.n_heads;
        const int64_t kv_h = h / group;
        const int64_t seq = batch_.seq_ids[t];
        const int64_t n_ctx = batch_.positions[t] + 1;
        const float* qh = f32(q) + t * q.cols + h * d;
        float max_score = -INFINITY;
        for (int64_t j = 0; j < n_ctx; ++j) {
          const auto [block, row] = kv_place(seq, j);
          const float* kj = kv_row(k_cache_, layer, block, kv_h, row);
          float dot = 0.0f;
          for (int64_t i = 0; i < d; ++i) dot += qh[i] * kj[i];
          scores[j] = dot * scale;
          max_score = std::max(max_score, scores[j]);
        }
        double denom = 0.0;
        for (int64_t j = 0; j < n_ctx; ++j) {
          scores[j] = std::exp(scores[j] - max_score);
          denom += scores[j];
        }
        const float inv_denom = float(1.0 / denom);
        float* o = f32(out) + t * out.cols + h * d;
        std::fill(o, o + d, 0.0f);
        for (int64_t j = 0; j < n_ctx; ++j) {
          const float pj = scores[j] * inv_denom;
          const auto [block, row] = kv_place(seq, j);
          const float* vj = kv_row(v_cache_, layer, block, kv_h, row);
          for (int64_t i = 0; i < d; ++i) o[i] += pj * vj[i];
        }
      }
    });
    return Status::ok();
  }

  Status swiglu(Tensor out, Tensor gate, Tensor up) override {
    const int64_t n = gate.rows * gate.cols;
    pool_.parallel_for(n, 1024, [&](int64_t begin, int64_t end, int) {
      for (int64_t i = begin; i < end; ++i) {
        const float g = f32(gate)[i];
        f32(out)[i] = g / (1.0f + std::exp(-g)) * f32(up)[i];
      }
    });
    return Status::ok();
  }

  Status add(Tensor x, Tensor y) override {
    const int64_t n = x.rows * x.cols;
    for (int64_t i = 0; i < n; ++i) f32(x)[i] += f32(y)[i];
    return Status::ok();
  }

  Status gather_rows(Tensor out, Tensor x, const int32_t* rows, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(f32(out) + i * x.cols, f32(x) + int64_t(rows[i]) * x.cols,
                  size_t(x.cols) * sizeof(float));
    }
    return Status::ok();
  }

  Status read(Tensor t, float* host) override {
    std::memcpy(host, t.data, size_t(t.rows * t.cols) * sizeof(float));
    return Status::ok();
  }

  size_t memory_in_use() const override {
    return (k_cache_.size() + v_cache_.size() + scratch_.size() + scores_.size()) * sizeof(float);
  }
  size_t peak_memory() const override { return memory_in_use(); }

 private:
  static constexpr int kRooflinePasses = 7;

  ThreadPool pool_;
  std::mutex roofline_mutex_;
  std::optional<Roofline> roofline_;       // roofline()'s measurement, once made
  std::optional<MatrixRate> matrix_rate_;  // matrix_rate()'s
  ModelConfig config_;
  RunShape shape_;
  BatchView batch_;
  std::vector<float> inv_freq_;
  std::vector<float> k_cache_;  // [layer, block, kv_head, kKvBlockSize, head_dim]
  std::vector<float> v_cache_;  // [layer, block, kv_head, kKvBlockSize, head_dim]
  std::vector<float> scratch_;
  size_t scratch_used_ = 0;
  std::vector<float> scores_;  // [thread, max_context]
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads) {
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace kestrel
