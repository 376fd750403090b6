// The CUDA benchmark of issue 4, as a test binary mode (disabled by default; scripts/gpu-suite
// runs it with --gtest_also_run_disabled_tests --gtest_filter='*CudaBench*'):
//   first-token latency of a 1024-token prompt and decode tok/s at batch 1, 4 and 16, for
//   synthetic Llama-3.1-8B and Qwen2-1.5B shapes in sym_int4, each number next to the bytes or
//   FLOPs it moved per second and this device's measured copy bandwidth; then per-op device time of
//   eager decode steps, to say where a step's time goes.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "../unit/backend_op_checks.h"
#include "backend/cuda/cuda_backend.h"
#include "kestrel/engine.h"
#include "kestrel/sampling.h"
#include "quant/format.h"

namespace kestrel {
namespace {

// Dense bf16 GEMM on random data: about 790 TFLOP/s on the H200 and 800 on the H100 (DESIGN.md);
// the benchmark does not measure it.
constexpr double kTensorTflops = 790.0;
constexpr int64_t kPrompt = 1024;
constexpr int64_t kDecodeContext = 512;
constexpr int64_t kDecodeSteps = 128;

// The decode roofline: this device's copy bandwidth, measured once per run.
double bandwidth_gbs() {
  static const double gbs = [] {
    auto measured = cuda::measure_copy_gbs();
    EXPECT_TRUE(measured.is_ok()) << measured.status().message();
    const double value = measured.is_ok() ? *measured : 0.0;
    std::printf("\nroofline: device-to-device copy %.0f GB/s (measured, read + write, 1 GiB)\n",
                value);
    return value;
  }();
  return gbs;
}

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
  options.prefill_chunk = 4 * kPrompt;  // a call holds up to four prompts
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

  // Sixteen prompts prefilled together, packed four to a call: the matrix products of a call
  // share one pass over (and one dequantization of) every weight.
  {
    BatchGenerateParams params;
    params.batch_size = 16;
    params.n_new = 1;
    std::vector<double> times;
    for (int rep = 0; rep < 3; ++rep) {
      auto r = engine.generate_batch(prompt, params, StepHooks{});
      ASSERT_TRUE(r.is_ok()) << r.status().message();
      times.push_back(r->first_token_seconds);
    }
    const double t = median(times);
    rows.push_back({"16 x 1024-token prompts (packed prefill)", fmt("%.1f ms", t * 1e3),
                    fmt("%.0f TFLOP/s", 16.0 * flops / t / 1e12),
                    fmt("%.0f%%", 100.0 * 16.0 * flops / t / 1e12 / kTensorTflops)});
  }

  // Decode: every sequence holds the same 512-token context, each in blocks of its own (a
  // forked copy would share them and read the KV cache from L2), then decodes 128 steps.
  for (int32_t s = 0; s < 16; ++s) {
    Batch context;
    for (int64_t i = 0; i < kDecodeContext; ++i) {
      context.add(prompt[size_t(i)], int32_t(i), s, i + 1 == kDecodeContext);
    }
    ASSERT_TRUE(engine.run_argmax(context, &next).is_ok());
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
        {label, value, fmt("%.0f GB/s", gbs), fmt("%.0f%%", 100.0 * gbs / bandwidth_gbs())});
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

// One weight's decode matrix product alone (cuda::time_gemv: graph-replayed, from device memory),
// for every weight shape of Llama-3.1-8B and Qwen2-1.5B, at 1 to 16 tokens, and at 16 from int8
// half groups.
TEST(CudaBench, DISABLED_Gemv) {
  struct Shape {
    const char* what;
    int64_t rows, cols;
  };
  const Shape shapes[] = {{"8B qkv", 6144, 4096},       {"8B wo", 4096, 4096},
                          {"8B gate+up", 28672, 4096},  {"8B down", 4096, 14336},
                          {"8B lm_head", 128256, 4096}, {"1.5B qkv", 2048, 1536},
                          {"1.5B wo", 1536, 1536},      {"1.5B gate+up", 17920, 1536},
                          {"1.5B down", 1536, 8960},    {"1.5B lm_head", 151936, 1536}};
  const double roofline = bandwidth_gbs();
  std::printf(
      "\n| weight (sym_int4) | tokens | us per call | GB/s | of %.0f GB/s "
      "|\n|---|---|---|---|---|\n",
      roofline);
  for (const Shape& shape : shapes) {
    for (int n : {1, 2, 4, 8, 16}) {
      auto t = cuda::time_gemv(WeightFormat::sym_int4, shape.rows, shape.cols, n);
      ASSERT_TRUE(t.is_ok()) << t.status().message();
      const double gbs = t->bytes / (t->microseconds * 1e-6) / 1e9;
      std::printf("| %s %lld x %lld | %d | %.2f | %.0f | %.0f%% |\n", shape.what,
                  (long long)shape.rows, (long long)shape.cols, n, t->microseconds, gbs,
                  100.0 * gbs / roofline);
    }
    // 16 tokens from int8 half groups (TokenHalfGroups, the experiment), their codes loaded one
    // chunk ahead ("16 int8") and two ("16 int8 two ahead"); "(not taken)" where another kernel
    // (the row-warp one) read the fp16 input instead.
    for (const int ahead : {1, 2}) {
      const int before = cuda::set_gemv_int8_ahead(ahead);
      auto t = cuda::time_gemv(WeightFormat::sym_int4, shape.rows, shape.cols, 16, true);
      cuda::set_gemv_int8_ahead(before);
      ASSERT_TRUE(t.is_ok()) << t.status().message();
      const double gbs = t->bytes / (t->microseconds * 1e-6) / 1e9;
      std::printf("| %s %lld x %lld | 16 int8%s%s | %.2f | %.0f | %.0f%% |\n", shape.what,
                  (long long)shape.rows, (long long)shape.cols, ahead == 2 ? " two ahead" : "",
                  t->int8_activations ? "" : " (not taken)", t->microseconds, gbs,
                  100.0 * gbs / roofline);
    }
  }
  std::fflush(stdout);
}

// Sampled rows drawn on the device (Backend::pick_rows: the argmax, then the draw kernel, one
// block a row) on the two vocabularies, 1 and 16 rows, under the settings servers see: the
// device time of each launch (op timing), and the logits' bytes over it against the copy
// bandwidth (the draw reads a row several times: a floor on its passes, not a roofline).
TEST(CudaBench, DISABLED_Draw) {
  struct Setting {
    const char* what;
    float temperature, top_p, min_p;
    int top_k;
  };
  const Setting settings[] = {{"T 1", 1.0f, 1.0f, 0.0f, 0},
                              {"T 0.9, top_p 0.95", 0.9f, 0.95f, 0.0f, 0},
                              {"T 0.7, top_k 40", 0.7f, 1.0f, 0.0f, 40},
                              {"T 1, min_p 0.05", 1.0f, 1.0f, 0.05f, 0}};
  const double roofline = bandwidth_gbs();
  std::printf(
      "\n| vocabulary | rows | settings | draw us per launch | argmax us | logits GB/s in the draw "
      "| of %.0f GB/s |\n|---|---|---|---|---|---|---|\n",
      roofline);
  for (const int64_t cols : {int64_t(128256), int64_t(151936)}) {
    ModelWeights model = backend_test::one_layer_model(cols);
    backend_test::BackendPair pair;
    ASSERT_TRUE(pair.init(model, RunShape{1, 32, 16, 16}));
    Backend& b = *pair.gpu;
    // Logits shaped like a model's: mostly small, a tail of likelier tokens.
    std::vector<float> logits = backend_test::random_values(size_t(16 * cols), 77, 2.0f);
    for (int64_t r = 0; r < 16; ++r) {
      for (int j = 0; j < 64; ++j) logits[size_t(r * cols + (j * 7919 + r * 31) % cols)] += 6.0f;
    }
    for (const int64_t rows : {int64_t(1), int64_t(16)}) {
      for (const Setting& setting : settings) {
        std::vector<int32_t> meta;
        ASSERT_TRUE(b.begin_batch(pair.paged(backend_test::batch_of(rows, meta))).is_ok());
        auto t = b.scratch(rows, cols);
        ASSERT_TRUE(t.is_ok());
        std::vector<float> part(logits.begin(), logits.begin() + rows * cols);
        ASSERT_TRUE(backend_test::write_device_tensor(b, *t, part.data()).is_ok());
        std::vector<RowDraw> draws;
        for (int64_t r = 0; r < rows; ++r) {
          RowDraw d;
          d.row = int32_t(r);
          d.params.temperature = setting.temperature;
          d.params.top_p = setting.top_p;
          d.params.top_k = setting.top_k;
          d.params.min_p = setting.min_p;
          d.vocab_size = int32_t(cols);
          d.u = (double(r) + 0.37) / double(rows + 1);
          draws.push_back(d);
        }
        std::vector<int32_t> out(static_cast<size_t>(rows));
        ASSERT_TRUE(b.pick_rows(*t, draws, out.data()).is_ok());  // warm-up
        ASSERT_TRUE(cuda::set_op_timing(b, true).is_ok());
        constexpr int kReps = 20;
        for (int i = 0; i < kReps; ++i) ASSERT_TRUE(b.pick_rows(*t, draws, out.data()).is_ok());
        double draw_us = 0, argmax_us = 0;
        for (const cuda::OpTime& op : cuda::op_times(b)) {
          const double us = 1e3 * op.milliseconds / double(std::max<int64_t>(op.calls, 1));
          if (op.op == "draw") draw_us = us;
          if (op.op == "argmax") argmax_us = us;
        }
        ASSERT_TRUE(cuda::set_op_timing(b, false).is_ok());
        ASSERT_GT(draw_us, 0.0) << "no \"draw\" launch was timed";
        const double gbs = double(rows * cols) * 4.0 / (draw_us * 1e-6) / 1e9;
        std::printf("| %lld | %lld | %s | %.2f | %.2f | %.0f | %.1f%% |\n", (long long)cols,
                    (long long)rows, setting.what, draw_us, argmax_us, gbs, 100.0 * gbs / roofline);
      }
    }
  }
  std::fflush(stdout);
}

// A decode step's chain of dependent stages, shaped like each model's at 1024 positions: per layer
// q/k/v, attention (its KV bytes), wo, gate/up (the SwiGLU's outputs), down; then the lm_head and
// the argmax and embedding (no weights). Weights are sym_int4 with fp16 scales a 32-group:
// 9/16 of a byte a weight. Every block of a stage reads the whole output of the stage before, so
// the lm_head's stage writes a hidden-sized output, not the logits (the argmax reads those once,
// not once a block).
std::vector<cuda::ChainStage> decode_chain(int layers, int64_t hidden, int64_t q_dim,
                                           int64_t kv_dim, int64_t inter, int64_t vocab) {
  const auto int4 = [](int64_t rows, int64_t cols) { return rows * cols * 9 / 16; };
  const int64_t kv_bytes = 2 * kv_dim * 2 * 1024;  // K and V, fp16, 1024 positions
  std::vector<cuda::ChainStage> stages;
  for (int l = 0; l < layers; ++l) {
    stages.push_back({int4(q_dim + 2 * kv_dim, hidden), q_dim + 2 * kv_dim});
    stages.push_back({kv_bytes, q_dim});
    stages.push_back({int4(hidden, q_dim), hidden});
    stages.push_back({int4(2 * inter, hidden), inter});
    stages.push_back({int4(hidden, inter), hidden});
  }
  stages.push_back({int4(vocab, hidden), hidden});
  stages.push_back({0, hidden});
  return stages;
}

// The chain's timed mechanisms, in the benchmark table's column order (unordered, the negative
// control, is run on its own).
constexpr cuda::ChainMode kChainModes[] = {cuda::ChainMode::launch,
                                           cuda::ChainMode::pdl,
                                           cuda::ChainMode::pdl_late,
                                           cuda::ChainMode::persistent,
                                           cuda::ChainMode::persistent_counting,
                                           cuda::ChainMode::pdl_counted};

// The chain benchmark's own check, in the default suite: every stage of a short chain saw the
// output of the stage before in the same replay, under each mechanism (time_chain fails
// otherwise), and the persistent kernel's barrier returns. The unordered control, whose stages do
// not wait, must be caught: its second stage starts reading while the first still streams 64 MB.
TEST(CudaChain, EveryStageSeesTheStageBefore) {
  const std::vector<cuda::ChainStage> stages = {{int64_t(64) << 20, 1536},
                                                {0, 2048},
                                                {(int64_t(3) << 20) + 48, 8960},
                                                {123456, 7},
                                                {16, 1536}};
  for (const cuda::ChainMode mode : kChainModes) {
    auto t = cuda::time_chain(mode, stages, 3);
    ASSERT_TRUE(t.is_ok()) << int(mode) << ": " << t.status().message();
    EXPECT_GT(t->microseconds, 0.0);
    EXPECT_EQ(t->bytes, double((int64_t(67) << 20) + 48 + 123456 + 16));
  }
  int caught = 0;
  for (int attempt = 0; attempt < 5; ++attempt) {
    auto t = cuda::time_chain(cuda::ChainMode::unordered, stages, 3);
    if (!t.is_ok()) {
      EXPECT_NE(t.status().message().find("read its input before"), std::string::npos)
          << t.status().message();
      ++caught;
    }
  }
  EXPECT_GT(caught, 0) << "stages that never wait were not caught by the chain's check";
  EXPECT_FALSE(cuda::time_chain(cuda::ChainMode::pdl, {{16, 1}}, 3).is_ok());
}

// What a dependency between decode stages costs by itself (cuda::time_chain): each model's
// step-shaped chain (and the same number of stages with no weights) under a kernel a stage, the
// decode path's programmatic dependent launch (early and late), and one persistent kernel with
// grid barriers (and its lighter counting barrier), and kernels a stage under programmatic
// dependent launch that wait on the stage before's count instead of its end, against the step's
// weight bytes at the copy bandwidth.
TEST(CudaBench, DISABLED_Chain) {
  struct Pattern {
    const char* what;
    std::vector<cuda::ChainStage> stages;
  };
  const auto no_weights = [](size_t n, int64_t outputs) {
    return std::vector<cuda::ChainStage>(n, cuda::ChainStage{0, outputs});
  };
  const std::vector<cuda::ChainStage> qwen = decode_chain(28, 1536, 1536, 256, 8960, 151936);
  const std::vector<cuda::ChainStage> llama = decode_chain(32, 4096, 4096, 1024, 14336, 128256);
  // The chain's own streaming rate: one stage of 1 GiB and a stage of nothing, the bytes' time
  // with two boundaries.
  const Pattern patterns[] = {{"1.5B step", qwen},
                              {"1.5B stages, no weights", no_weights(qwen.size(), 1536)},
                              {"8B step", llama},
                              {"8B stages, no weights", no_weights(llama.size(), 4096)},
                              {"1 GiB in one stage", {{int64_t(1) << 30, 4096}, {0, 4096}}}};
  const double roofline = bandwidth_gbs();
  std::printf(
      "\n| chain | stages | MB a step | bytes at %.0f GB/s, us | launch us | pdl us | pdl_late us "
      "| persistent us | persistent, counting barrier us | pdl, counted us | pdl us a stage over "
      "the "
      "bytes | best GB/s (%% of roofline) |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
      roofline);
  for (const Pattern& p : patterns) {
    constexpr int kModes = int(std::size(kChainModes));
    double us[kModes] = {};
    double bytes = 0;
    for (int m = 0; m < kModes; ++m) {
      auto t = cuda::time_chain(kChainModes[m], p.stages, 9);
      ASSERT_TRUE(t.is_ok()) << p.what << ": " << t.status().message();
      us[m] = t->microseconds;
      bytes = t->bytes;
    }
    const double floor_us = roofline > 0 ? bytes / (roofline * 1e3) : 0.0;
    const double best = *std::min_element(us, us + kModes);
    const double gbs = bytes / (best * 1e-6) / 1e9;
    std::printf(
        "| %s | %zu | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f | %.0f (%.1f%%) "
        "|\n",
        p.what, p.stages.size(), bytes / 1e6, floor_us, us[0], us[1], us[2], us[3], us[4], us[5],
        (us[1] - floor_us) / double(p.stages.size()), gbs,
        roofline > 0 ? 100.0 * gbs / roofline : 0.0);
  }
  std::fflush(stdout);
}

// The batch-1 decode GEMVs' phases from inside (cuda::gemv_profile): block 0 of every launch of
// 32 replayed steps after a 1000-token prompt, medians per weight. "wait" is from the block's
// start to its wait's return (long where the launch came early, under the kernel before);
// "after the wait" is the block's critical path once its input is there: the input stage (the
// norm and int8 quantization), its first row tile, its other tiles. The first tile in three:
// until thread 0's first chunk of weights has landed (requested at the block's start, before
// the wait), the rest of thread 0's chunks (their arrival and the multiplications), and the
// exchange of the warps' sums and the stores (after a barrier that waits for every warp's
// chunks).
TEST(CudaBench, DISABLED_GemvProfile) {
  cuda::set_gemv_profile(true);
  std::printf(
      "\n| model | weight | rows x cols | weights MB | blocks | tiles (block 0's) | launches | "
      "wait us | input stage us | first chunk us | first tile's other chunks us | first tile's "
      "exchange and stores us | other tiles us | after the wait us | weights GB/s after the wait "
      "|\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const std::string name : {"qwen2-1.5b", "llama3.1-8b"}) {
    EngineOptions options;
    options.model = "synthetic:" + name;
    options.format = WeightFormat::sym_int4;
    options.device = "cuda";
    options.max_seqs = 1;
    options.max_context = 1100;
    options.prefill_chunk = 1024;
    options.progress = false;
    auto created = Engine::create(options);
    ASSERT_TRUE(created.is_ok()) << created.status().message();
    Engine& engine = **created;
    const ModelConfig& c = engine.config();
    std::mt19937_64 rng(7);
    constexpr int32_t kPromptTokens = 1000;
    Batch prefill;
    for (int32_t i = 0; i < kPromptTokens; ++i) {
      prefill.add(int32_t(rng() % uint64_t(c.vocab_size)), i, 0, i + 1 == kPromptTokens);
    }
    std::vector<int32_t> next;
    ASSERT_TRUE(engine.run_argmax(prefill, &next).is_ok());
    int32_t position = kPromptTokens;
    auto steps = [&](int n) {
      for (int i = 0; i < n; ++i) {
        Batch b;
        b.add(next[0], position++, 0, true);
        const Status s = engine.run_argmax(b, &next);
        ASSERT_TRUE(s.is_ok()) << s.message();
      }
    };
    steps(4);  // the step's graph captured and replayed
    ASSERT_TRUE(cuda::reset_gemv_profile().is_ok());
    constexpr int kSteps = 32;
    steps(kSteps);
    auto records = cuda::gemv_profile();
    ASSERT_TRUE(records.is_ok()) << records.status().message();
    ASSERT_FALSE(records->empty()) << "no GEMV launch recorded its profile";
    struct Phases {
      const cuda::GemvProfileRecord* first = nullptr;
      std::vector<double> wait, input, chunk, chunks, stores, rest, after;
    };
    std::map<std::tuple<int64_t, int64_t, int>, Phases> by_weight;
    for (const cuda::GemvProfileRecord& r : *records) {
      Phases& p = by_weight[{r.rows, r.cols, r.tiles}];
      if (p.first == nullptr) p.first = &r;
      const auto us = [&](int a, int b) { return double(r.ns[b] - r.ns[a]) * 1e-3; };
      p.wait.push_back(us(0, 1));
      p.input.push_back(us(1, 2));
      p.chunk.push_back(us(2, 3));
      p.chunks.push_back(us(3, 4));
      p.stores.push_back(us(4, 5));
      p.rest.push_back(us(5, 6));
      p.after.push_back(us(1, 6));
    }
    // q/k/v and wo share their first weight's shape where q_dim is the hidden size: q/k/v has
    // the k and v tiles too, so of two launches of that shape it has the more tiles.
    std::vector<int> shared_shape_tiles;
    for (const auto& [key, p] : by_weight) {
      if (std::get<0>(key) == c.q_dim() && std::get<1>(key) == c.hidden_size) {
        shared_shape_tiles.push_back(std::get<2>(key));
      }
    }
    const int qkv_tiles =
        shared_shape_tiles.size() == 2
            ? *std::max_element(shared_shape_tiles.begin(), shared_shape_tiles.end())
            : -1;
    for (const auto& [key, p] : by_weight) {
      const auto [rows, cols, tiles] = key;
      const std::string what = rows == c.vocab_size                      ? "lm_head"
                               : cols == c.intermediate_size             ? "down"
                               : rows == c.intermediate_size             ? "gate/up"
                               : rows == 2 * c.intermediate_size         ? "gate/up"
                               : rows == c.q_dim() + 2 * c.kv_dim()      ? "q/k/v"
                               : tiles == qkv_tiles && rows == c.q_dim() ? "q/k/v"
                               : rows == c.hidden_size                   ? "wo"
                                                                         : "?";
      // The weights a launch reads: gate and up, or q, k and v, together.
      const int64_t all_rows = what == "gate/up" ? 2 * c.intermediate_size
                               : what == "q/k/v" ? c.q_dim() + 2 * c.kv_dim()
                                                 : rows;  // q/k/v: three weights or one
      const double mb = double(all_rows) * double(cols) * 9.0 / 16.0 / 1e6;
      const double after = median(p.after);
      std::printf(
          "| %s | %s | %lld x %lld | %.1f | %d | %d (%d) | %zu | %.2f | %.2f | %.2f | %.2f | %.2f "
          "| %.2f | %.2f | %.0f |\n",
          name.c_str(), what.c_str(), (long long)rows, (long long)cols, mb, p.first->blocks, tiles,
          p.first->block_tiles, p.after.size(), median(p.wait), median(p.input), median(p.chunk),
          median(p.chunks), median(p.stores), median(p.rest), after, mb * 1e-3 / (after * 1e-6));
    }
  }
  cuda::set_gemv_profile(false);
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
