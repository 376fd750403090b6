// The CUDA benchmark of issue 4, as a test binary mode (disabled by default; scripts/gpu-suite
// runs it with --gtest_also_run_disabled_tests --gtest_filter='*CudaBench*'):
//   first-token latency of a 1024-token prompt and decode tok/s at batch 1, 4 and 16, for
//   synthetic Llama-3.1-8B and Qwen2-1.5B shapes in sym_int4, each number next to the bytes or
//   FLOPs it moved per second and the H100's roofline; then per-op device time of eager decode
//   steps, to say where a step's time goes.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "kestrel/engine.h"
#include "quant/format.h"

namespace kestrel {
namespace {

constexpr double kBandwidthGBs = 3000.0;  // device-to-device copy, read + write (DESIGN.md)
constexpr double kTensorTflops = 800.0;   // dense bf16 GEMM (DESIGN.md)
constexpr int64_t kPrompt = 1024;
constexpr int64_t kDecodeContext = 512;
constexpr int64_t kDecodeSteps = 128;

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Multiply-adds of one prompt token through every layer, and of causal attention over n tokens.
double prefill_flops(const ModelConfig& c, int64_t n) {
  const double per_layer = double(c.hidden_size) * double(c.q_dim() + 2 * c.kv_dim()) +
                           double(c.q_dim()) * double(c.hidden_size) +
                           3.0 * double(c.hidden_size) * double(c.intermediate_size);
  const double linear = 2.0 * per_layer * double(c.n_layers) * double(n) +
                        2.0 * double(c.hidden_size) * double(c.vocab_size);
  const double attention =
      4.0 * double(c.n_layers) * double(c.q_dim()) * double(n) * double(n + 1) / 2.0;
  return linear + attention;
}

struct Row {
  std::string what;
  std::string value;
  std::string rate;
  std::string roofline;
};

void print_rows(const std::string& title, const std::vector<Row>& rows) {
  std::printf("\n%s\n\n| measurement | value | achieved | of roofline |\n|---|---|---|---|\n",
              title.c_str());
  for (const Row& r : rows) {
    std::printf("| %s | %s | %s | %s |\n", r.what.c_str(), r.value.c_str(), r.rate.c_str(),
                r.roofline.c_str());
  }
  std::fflush(stdout);
}

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

// The per-op device times accumulated since timing was switched on, per call of `what`.
void print_op_times(const char* what, Engine& engine, int calls) {
  const auto times = cuda::op_times(engine.backend());
  double total = 0;
  for (const auto& t : times) total += t.milliseconds / calls;
  std::printf(
      "\n%s, eager with events: %.3f ms summed device time\n\n"
      "| op | ms | launches | share |\n|---|---|---|---|\n",
      what, total);
  for (const auto& t : times) {
    std::printf("| %s | %.3f | %.0f | %.0f%% |\n", t.op.c_str(), t.milliseconds / calls,
                double(t.calls) / calls, 100.0 * t.milliseconds / calls / total);
  }
  std::fflush(stdout);
}

void bench_model(const std::string& name) {
  EngineOptions options;
  options.model = "synthetic:" + name;
  options.format = WeightFormat::sym_int4;
  options.device = "cuda";
  options.max_seqs = 16;
  options.max_context = kPrompt + 128;
  options.prefill_chunk = kPrompt;
  options.progress = false;
  const double t_load = now_seconds();
  auto created = Engine::create(options);
  ASSERT_TRUE(created.is_ok()) << created.status().message();
  Engine& engine = **created;
  const ModelConfig& c = engine.config();
  const double load_s = now_seconds() - t_load;
  const double step_bytes = double(engine.weights().decode_bytes());
  std::vector<Row> rows;

  std::mt19937_64 rng(42);
  std::vector<int32_t> prompt(static_cast<size_t>(kPrompt));
  for (int32_t& id : prompt) id = int32_t(rng() % uint64_t(c.vocab_size));
  std::vector<int32_t> next;

  // First token: the whole prompt in one call, lm_head on its last row, argmax on the device.
  Batch prefill;
  for (int64_t i = 0; i < kPrompt; ++i)
    prefill.add(prompt[size_t(i)], int32_t(i), 0, i + 1 == kPrompt);
  std::vector<double> first;
  for (int rep = 0; rep < 6; ++rep) {
    const double t0 = now_seconds();
    const Status s = engine.run_argmax(prefill, &next);
    ASSERT_TRUE(s.is_ok()) << s.message();
    if (rep > 0) first.push_back(now_seconds() - t0);  // the first run warms cuBLAS up
  }
  const double ttft = median(first);
  const double flops = prefill_flops(c, kPrompt);
  rows.push_back({"first token, 1024-token prompt", fmt("%.2f ms", ttft * 1e3),
                  fmt("%.0f TFLOP/s", flops / ttft / 1e12),
                  fmt("%.0f%%", 100.0 * flops / ttft / 1e12 / kTensorTflops)});

  // Decode: every sequence holds the same 512-token context, then decodes 128 steps.
  Batch context;
  for (int64_t i = 0; i < kDecodeContext; ++i) {
    context.add(prompt[size_t(i)], int32_t(i), 0, i + 1 == kDecodeContext);
  }
  ASSERT_TRUE(engine.run_argmax(context, &next).is_ok());
  for (int32_t s = 1; s < 16; ++s) {
    ASSERT_TRUE(engine.backend().copy_sequence(0, s, kDecodeContext).is_ok());
  }
  double batch1_tps = 0;
  for (int64_t batch : {1, 4, 16}) {
    std::vector<int32_t> tokens(size_t(batch), next[0]);
    auto step = [&](int64_t position) {
      Batch b;
      for (int64_t s = 0; s < batch; ++s) {
        b.add(tokens[size_t(s)], int32_t(position), int32_t(s), true);
      }
      const Status st = engine.run_argmax(b, &tokens);
      EXPECT_TRUE(st.is_ok()) << st.message();
    };
    for (int64_t i = 0; i < 3; ++i) step(kDecodeContext + i);  // capture the graph
    const double t0 = now_seconds();
    for (int64_t i = 0; i < kDecodeSteps; ++i) step(kDecodeContext + 3 + i);
    const double dt = now_seconds() - t0;
    const double tps = double(batch * kDecodeSteps) / dt;
    if (batch == 1) batch1_tps = tps;
    const double gbs = step_bytes * double(kDecodeSteps) / dt / 1e9;
    std::string label = "decode tok/s, batch " + std::to_string(batch);
    std::string value = fmt("%.0f tok/s", tps);
    if (batch > 1) value += fmt(" (%.1fx batch 1)", tps / batch1_tps);
    rows.push_back(
        {label, value, fmt("%.0f GB/s", gbs), fmt("%.0f%%", 100.0 * gbs / kBandwidthGBs)});
  }
  rows.push_back({"weights streamed per decode step", fmt("%.2f GB", step_bytes / 1e9), "", ""});
  rows.push_back({"peak device memory",
                  fmt("%.2f GiB", double(engine.backend().peak_memory()) / double(1ull << 30)), "",
                  ""});
  rows.push_back({"load (synthesize + quantize + upload)", fmt("%.1f s", load_s), "", ""});
  print_rows("### " + name + " sym_int4 on " + engine.backend().name(), rows);

  // Where the time goes: device time per op of one prefill and of eager batch-1 decode steps.
  ASSERT_TRUE(cuda::set_op_timing(engine.backend(), true).is_ok());
  ASSERT_TRUE(engine.run_argmax(prefill, &next).is_ok());
  print_op_times("1024-token prefill", engine, 1);
  ASSERT_TRUE(cuda::set_op_timing(engine.backend(), true).is_ok());
  std::vector<int32_t> tokens(1, next[0]);
  const int steps = 16;
  const double t0 = now_seconds();
  for (int i = 0; i < steps; ++i) {
    Batch b;
    b.add(tokens[0], int32_t(kDecodeContext + i), 0, true);
    ASSERT_TRUE(engine.run_argmax(b, &tokens).is_ok());
  }
  const double eager_ms = (now_seconds() - t0) * 1e3 / steps;
  std::printf("\nbatch-1 decode, eager: %.3f ms a step (wall)\n", eager_ms);
  print_op_times("batch-1 decode step", engine, steps);
  ASSERT_TRUE(cuda::set_op_timing(engine.backend(), false).is_ok());
}

// One weight's decode matrix product alone, repeated: the GEMV's bandwidth without the rest of
// the step (shapes of Llama-3.1-8B's gate/up, down and lm_head).
TEST(CudaBench, DISABLED_Gemv) {
  const int64_t shapes[][2] = {{14336, 4096}, {4096, 14336}, {128256, 4096}};
  std::printf("\n| weight | tokens | us per call | GB/s |\n|---|---|---|---|\n");
  for (const auto& shape : shapes) {
    const int64_t rows = shape[0], cols = shape[1];
    ModelWeights weights;
    weights.config.hidden_size = cols;
    weights.config.intermediate_size = rows;
    weights.config.n_layers = 1;
    weights.config.n_heads = 1;
    weights.config.n_kv_heads = 1;
    weights.config.head_dim = 64;
    weights.config.vocab_size = 16;
    weights.layers.resize(1);
    QuantWeight w = allocate_weight(WeightFormat::sym_int4, rows, cols, 32);
    std::mt19937_64 rng(7);
    std::vector<float> row(static_cast<size_t>(cols));
    for (int64_t r = 0; r < rows; ++r) {
      for (float& v : row) v = float(int64_t(rng() % 2001) - 1000) / 1000.0f;
      quantize_row(w, r, row.data());
    }
    weights.layers[0].w_gate.w = std::move(w);
    auto backend = make_backend("cuda", 0);
    ASSERT_TRUE(backend.is_ok());
    Backend& b = **backend;
    ASSERT_TRUE(b.upload(weights).is_ok());
    ASSERT_TRUE(b.reserve(weights.config, RunShape{1, 64, 16, 16}).is_ok());
    const double bytes = double(weights.layers[0].w_gate.w.total_bytes());
    for (int64_t n : {1, 16}) {
      std::vector<int32_t> meta(static_cast<size_t>(3 * n), 0);
      for (int64_t i = 0; i < n; ++i) meta[size_t(n + i)] = int32_t(i);
      ASSERT_TRUE(
          b.begin_batch(BatchView{n, meta.data(), meta.data() + n, meta.data() + 2 * n}).is_ok());
      auto x = b.scratch(n, cols);
      auto y = b.scratch(n, rows);
      ASSERT_TRUE(x.is_ok() && y.is_ok());
      std::vector<float> xv(static_cast<size_t>(n * cols), 0.5f);
      ASSERT_TRUE(cuda::write_tensor(b, *x, xv.data()).is_ok());
      std::vector<float> out(static_cast<size_t>(n * rows));
      const int reps = 50;
      double best = 1e9;
      for (int trial = 0; trial < 3; ++trial) {
        const double t0 = now_seconds();
        for (int i = 0; i < reps; ++i)
          ASSERT_TRUE(b.matmul(*y, *x, weights.layers[0].w_gate).is_ok());
        ASSERT_TRUE(b.read(*y, out.data()).is_ok());
        best = std::min(best, (now_seconds() - t0) / reps);
      }
      std::printf("| %lld x %lld sym_int4 | %lld | %.1f | %.0f |\n", (long long)rows,
                  (long long)cols, (long long)n, best * 1e6, bytes / best / 1e9);
    }
  }
  std::fflush(stdout);
}

TEST(CudaBench, DISABLED_Qwen2_1_5b) {
  bench_model("qwen2-1.5b");
}
TEST(CudaBench, DISABLED_Llama3_1_8b) {
  bench_model("llama3.1-8b");
}

}  // namespace
}  // namespace kestrel
