// The kernel timeline of a replayed decode step and of a prefill call (kernel_timeline.h): a
// measurement, disabled by default. Run it with
//   build-gpu/kestrel_cuda_tests --gtest_also_run_disabled_tests --gtest_filter='CudaTimeline.*'
// It prints, for one batch-1 and one batch-16 decode step of the synthetic Llama-3.1-8B and
// Qwen2-1.5B in sym_int4, each kind of kernel's count, summed duration and the time it adds to
// the step's end (its end past every earlier kernel's), and writes the step as a Chrome trace to
// $KESTREL_TIMELINE_DIR/timeline-NAME.json (timeline-NAME-b16.json) when that is set.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "io/config.h"
#include "kernel_timeline.h"
#include "kestrel/engine.h"
#include "quant/format.h"

namespace kestrel::cuda_test {
namespace {

// The step arithmetic on made-up spans: a warm-up step with an extra kernel, then two steps of
// three kernels ending with "end", the second kernel overlapping the first (a dependent launch
// waiting), the third after a gap.
TEST(CudaTimeline, SplitsStepsAndAttributesTheirTime) {
  std::vector<KernelSpan> spans = {{"setup", 0, 100, 1}, {"a", 200, 300, 10}, {"end", 400, 500, 1}};
  for (uint64_t base : {10000ull, 100000ull}) {
    spans.push_back({"a", base + 1000, base + 5000, 10});
    spans.push_back({"b", base + 2000, base + 9000, 20});
    spans.push_back({"end", base + 10000, base + 12000, 1});
  }
  const auto steps = split_steps(spans);
  ASSERT_EQ(steps.size(), 3u);
  EXPECT_EQ(steps[0].size(), 3u);
  EXPECT_EQ(steps[1].size(), 3u);
  auto step = step_timeline(steps[2]);
  ASSERT_TRUE(step.is_ok()) << step.status().message();
  EXPECT_DOUBLE_EQ(step->span_us, 11.0);  // 101000 .. 112000 ns
  EXPECT_DOUBLE_EQ(step->kernel_sum_us, 4.0 + 7.0 + 2.0);
  ASSERT_EQ(step->kernels.size(), 3u);
  EXPECT_DOUBLE_EQ(step->kernels[0].adds_us, 4.0);  // its whole duration
  EXPECT_DOUBLE_EQ(step->kernels[1].adds_us, 4.0);  // ends 4 us after the first
  EXPECT_DOUBLE_EQ(step->kernels[2].adds_us, 3.0);  // 1 us gap + 2 us
  EXPECT_DOUBLE_EQ(step->kernels[2].start_us, 9.0);
  const auto groups = group_kernels(*step);
  ASSERT_EQ(groups.size(), 3u);
  EXPECT_EQ(groups[0].name, "a");
  EXPECT_EQ(groups[0].count, 1);
  EXPECT_EQ(groups[1].blocks, 20);
  EXPECT_DOUBLE_EQ(groups[2].duration_us, 2.0);
  double added = 0;
  for (const KernelGroup& g : groups) added += g.adds_us;
  EXPECT_DOUBLE_EQ(added, step->span_us);  // the added times sum to the step's span
  const std::string trace = chrome_trace(*step);
  EXPECT_NE(trace.find("\"tid\":1"), std::string::npos) << trace;  // the overlap's own row
  EXPECT_FALSE(step_timeline({}).is_ok());
}

// The synthetic model `name` in sym_int4 on the GPU: `max_seqs` slots of 1200 positions, prefill
// calls of up to `chunk` tokens.
Result<std::unique_ptr<Engine>> timeline_engine(const std::string& name, int64_t max_seqs,
                                                int64_t chunk) {
  EngineOptions options;
  options.model = "synthetic:" + name;
  options.format = WeightFormat::sym_int4;
  options.device = "cuda";
  options.max_seqs = max_seqs;
  options.max_context = 1200;
  options.prefill_chunk = chunk;
  options.progress = false;
  return Engine::create(options);
}

// What the device does between decode steps: from a step's last kernel end to the next step's
// first kernel start (the copies, and on the host: the argmax's wait, the next batch, the forward
// pass walked for the replay, the graph launch), and the steps' period (first start to first
// start); medians over the steps after the first two (the graph's capture).
struct BetweenSteps {
  double gap_us = 0;
  double period_us = 0;
  size_t n = 0;
};
BetweenSteps between_steps(const std::vector<std::vector<KernelSpan>>& steps) {
  std::vector<double> gaps, periods;
  for (size_t i = 2; i + 1 < steps.size(); ++i) {
    uint64_t end = 0;
    for (const KernelSpan& k : steps[i]) end = std::max(end, k.end_ns);
    const double next = double(steps[i + 1].front().start_ns);
    gaps.push_back((next - double(end)) / 1e3);
    periods.push_back((next - double(steps[i].front().start_ns)) / 1e3);
  }
  auto median = [](std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  return {median(gaps), median(periods), gaps.size()};
}

// A decode step of `n_seqs` sequences at `kContext` positions each (1024: the context bench's
// batch-1 and batch-16 decode; 64: the middle of tg128's, which decodes from an empty context),
// replayed from its captured graph. Then as many steps run ahead (Engine::start_argmax: each
// queued before the one before it has come back, its tokens that step's argmax on the device),
// for the time between steps either way.
void decode_timeline(const std::string& name, int n_seqs, int64_t kContext = 1024) {
  // Every sequence's context is one call.
  auto created = timeline_engine(name, n_seqs, kContext * n_seqs);
  ASSERT_TRUE(created.is_ok()) << created.status().message();
  Engine& engine = **created;
  const ModelConfig& c = engine.config();
  std::mt19937_64 rng(7);
  Batch context;
  for (int seq = 0; seq < n_seqs; ++seq) {
    for (int64_t i = 0; i < kContext; ++i) {
      context.add(int32_t(rng() % uint64_t(c.vocab_size)), int32_t(i), seq, i + 1 == kContext);
    }
  }
  std::vector<int32_t> next;
  const Status prefilled = engine.run_argmax(context, &next);
  ASSERT_TRUE(prefilled.is_ok()) << prefilled.message();
  // Recording starts before the first decode step, which captures the step's graph; the later
  // steps replay it. The second-to-last step is the one shown.
  const Status started = timeline_start();
  ASSERT_TRUE(started.is_ok()) << started.message();
  constexpr int kSteps = 12;
  for (int i = 0; i < kSteps; ++i) {
    ASSERT_EQ(next.size(), size_t(n_seqs));
    Batch b;
    for (int seq = 0; seq < n_seqs; ++seq)
      b.add(next[size_t(seq)], int32_t(kContext + i), seq, true);
    const Status stepped = engine.run_argmax(b, &next);
    ASSERT_TRUE(stepped.is_ok()) << stepped.message();
  }
  auto spans = timeline_stop();
  ASSERT_TRUE(spans.is_ok()) << spans.status().message();
  const auto steps = split_steps(*spans);
  ASSERT_GE(steps.size(), 2u) << spans->size() << " kernels recorded";
  // The same number of steps run ahead, from where those left off.
  const Status ahead_started = timeline_start();
  ASSERT_TRUE(ahead_started.is_ok()) << ahead_started.message();
  auto ahead_batch = [&](int i, bool from_argmax) {
    Batch b;
    for (int seq = 0; seq < n_seqs; ++seq) {
      b.add(from_argmax ? 0 : next[size_t(seq)], int32_t(kContext + kSteps + i), seq, true);
    }
    return b;
  };
  Status ahead = engine.start_argmax(ahead_batch(0, false), false);
  for (int i = 0; ahead.is_ok() && i < kSteps; ++i) {
    if (i + 1 < kSteps) ahead = engine.start_argmax(ahead_batch(i + 1, true), true);
    if (ahead.is_ok()) ahead = engine.finish_argmax(&next);
  }
  ASSERT_TRUE(ahead.is_ok()) << ahead.message();
  auto ahead_spans = timeline_stop();
  ASSERT_TRUE(ahead_spans.is_ok()) << ahead_spans.status().message();
  const BetweenSteps plain = between_steps(steps);
  const BetweenSteps run_ahead = between_steps(split_steps(*ahead_spans));
  auto step = step_timeline(steps[steps.size() - 2]);
  ASSERT_TRUE(step.is_ok()) << step.status().message();
  std::printf("\n%zu kernels recorded in %zu steps; kernels a step:", spans->size(), steps.size());
  for (const auto& s : steps) std::printf(" %zu", s.size());
  std::printf(
      "\n### %s, batch-%d decode step at %lld positions: %zu kernels, %.1f us from the "
      "first start to the last end, %.1f us of kernel time summed\n\n",
      name.c_str(), n_seqs, static_cast<long long>(kContext), step->kernels.size(), step->span_us,
      step->kernel_sum_us);
  std::printf(
      "#### %s, batch-%d at %lld positions, between steps: %.1f us step by step, %.1f us run "
      "ahead (device idle from a step's last kernel to the next one's first); period %.1f / %.1f "
      "us (medians of %zu / %zu)\n\n",
      name.c_str(), n_seqs, static_cast<long long>(kContext), plain.gap_us, run_ahead.gap_us,
      plain.period_us, run_ahead.period_us, plain.n, run_ahead.n);
  std::printf(
      "| kernel | blocks | count | duration (sum) | adds to the step (sum) | adds each |\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  for (const KernelGroup& g : group_kernels(*step)) {
    std::printf("| %s | %lld | %d | %.1f us | %.1f us | %.2f us |\n", g.name.substr(0, 90).c_str(),
                static_cast<long long>(g.blocks), g.count, g.duration_us, g.adds_us,
                g.adds_us / g.count);
  }
  std::printf("\nThe first kernels of the step (us from its first start):\n\n");
  std::printf(
      "| # | kernel | blocks | start | duration | adds |\n|---:|---|---:|---:|---:|---:|\n");
  for (size_t i = 0; i < step->kernels.size() && i < 16; ++i) {
    const StepKernel& k = step->kernels[i];
    std::printf("| %zu | %s | %lld | %.2f | %.2f | %.2f |\n", i, k.span->name.substr(0, 60).c_str(),
                static_cast<long long>(k.span->blocks), k.start_us, k.duration_us, k.adds_us);
  }
  std::fflush(stdout);
  if (const char* dir = std::getenv("KESTREL_TIMELINE_DIR"); dir != nullptr && *dir != '\0') {
    const std::string suffix = (n_seqs == 1 ? "" : "-b" + std::to_string(n_seqs)) +
                               (kContext == 1024 ? "" : "-at" + std::to_string(kContext));
    std::ofstream(std::string(dir) + "/timeline-" + name + suffix + ".json") << chrome_trace(*step);
  }
}

// One prefill call of `n_prompts` prompts of 1024 tokens each (the bench's first token and its
// 16-prompt prefill), after a warm-up call of the same shape: every kernel of the call, grouped.
void prefill_timeline(const std::string& name, int n_prompts) {
  constexpr int64_t kPrompt = 1024;
  // Every prompt in one call, as the bench runs them.
  auto created = timeline_engine(name, n_prompts, kPrompt * n_prompts);
  ASSERT_TRUE(created.is_ok()) << created.status().message();
  Engine& engine = **created;
  const ModelConfig& c = engine.config();
  std::mt19937_64 rng(11);
  Batch prompts;
  for (int seq = 0; seq < n_prompts; ++seq) {
    for (int64_t i = 0; i < kPrompt; ++i) {
      prompts.add(int32_t(rng() % uint64_t(c.vocab_size)), int32_t(i), seq, i + 1 == kPrompt);
    }
  }
  std::vector<int32_t> next;
  for (int run = 0; run < 2; ++run) {
    for (int seq = 0; seq < n_prompts; ++seq) engine.release_sequence(seq);
    if (run == 1) {
      const Status started = timeline_start(/*activities=*/true);
      ASSERT_TRUE(started.is_ok()) << started.message();
    }
    const Status prefilled = engine.run_argmax(prompts, &next);
    ASSERT_TRUE(prefilled.is_ok()) << prefilled.message();
  }
  auto spans = timeline_stop();
  ASSERT_TRUE(spans.is_ok()) << spans.status().message();
  auto call = step_timeline(*spans);
  ASSERT_TRUE(call.is_ok()) << call.status().message();
  std::printf(
      "\n### %s, prefill of %d x %lld tokens in one call: %zu kernels, %.1f us from the first "
      "start to the last end, %.1f us of kernel time summed\n\n",
      name.c_str(), n_prompts, static_cast<long long>(kPrompt), call->kernels.size(), call->span_us,
      call->kernel_sum_us);
  std::printf("| kernel | blocks | count | duration (sum) | adds to the call (sum) |\n");
  std::printf("|---|---:|---:|---:|---:|\n");
  for (const KernelGroup& g : group_kernels(*call)) {
    std::printf("| %s | %lld | %d | %.1f us | %.1f us |\n", g.name.substr(0, 90).c_str(),
                static_cast<long long>(g.blocks), g.count, g.duration_us, g.adds_us);
  }
  // The kernels that add the most (a gap before a kernel counts as its own).
  std::vector<const StepKernel*> most;
  for (const StepKernel& k : call->kernels) most.push_back(&k);
  std::sort(most.begin(), most.end(),
            [](const StepKernel* a, const StepKernel* b) { return a->adds_us > b->adds_us; });
  std::printf("\nThe kernels that add the most:\n\n| kernel | start | duration | adds |\n");
  std::printf("|---|---:|---:|---:|\n");
  for (size_t i = 0; i < most.size() && i < 6; ++i) {
    std::printf("| %s | %.2f | %.2f | %.2f |\n", most[i]->span->name.substr(0, 60).c_str(),
                most[i]->start_us, most[i]->duration_us, most[i]->adds_us);
  }
  // The runtime calls, copies and fills of more than 50 us, and every one before the first
  // layer's first launch after the embedding (us from the first kernel's start).
  const uint64_t t0 = call->kernels.front().span->start_ns;
  const uint64_t second = call->kernels.size() > 1 ? call->kernels[1].span->start_ns : t0;
  std::printf("\nRuntime calls, copies and fills (long ones, and those before kernel 1):\n\n");
  std::printf("| activity | bytes | start | duration |\n|---|---:|---:|---:|\n");
  int shown = 0;
  for (const KernelSpan& a : timeline_activities()) {
    const double start = (double(a.start_ns) - double(t0)) / 1e3;
    const double duration = double(a.end_ns - a.start_ns) / 1e3;
    if ((duration > 50.0 || a.start_ns < second) && shown++ < 40) {
      std::printf("| %s | %lld | %.2f | %.2f |\n", a.name.c_str(), static_cast<long long>(a.blocks),
                  start, duration);
    }
  }
  // A layer's kernels in order (the second layer's, past the first layer's warm start).
  const size_t per_layer =
      call->kernels.size() > 3 ? (call->kernels.size() - 3) / size_t(c.n_layers) : 0;
  std::printf("\nThe second layer's kernels (us from the call's first start):\n\n");
  std::printf(
      "| # | kernel | blocks | start | duration | adds |\n|---:|---|---:|---:|---:|---:|\n");
  for (size_t i = 1 + per_layer; i < call->kernels.size() && i < 1 + 2 * per_layer; ++i) {
    const StepKernel& k = call->kernels[i];
    std::printf("| %zu | %s | %lld | %.2f | %.2f | %.2f |\n", i, k.span->name.substr(0, 60).c_str(),
                static_cast<long long>(k.span->blocks), k.start_us, k.duration_us, k.adds_us);
  }
  std::fflush(stdout);
}

TEST(CudaTimeline, DISABLED_Llama3_1_8bPrefill) {
  prefill_timeline("llama3.1-8b", 1);
}
TEST(CudaTimeline, DISABLED_Llama3_1_8bPrefill16) {
  prefill_timeline("llama3.1-8b", 16);
}
TEST(CudaTimeline, DISABLED_Qwen2_1_5bPrefill) {
  prefill_timeline("qwen2-1.5b", 1);
}

TEST(CudaTimeline, DISABLED_Llama3_1_8bDecodeStep) {
  decode_timeline("llama3.1-8b", 1);
}
TEST(CudaTimeline, DISABLED_Qwen2_1_5bDecodeStep) {
  decode_timeline("qwen2-1.5b", 1);
}
TEST(CudaTimeline, DISABLED_Llama3_1_8bDecodeStepAt64) {
  decode_timeline("llama3.1-8b", 1, 64);
}
TEST(CudaTimeline, DISABLED_Qwen2_1_5bDecodeStepAt64) {
  decode_timeline("qwen2-1.5b", 1, 64);
}
TEST(CudaTimeline, DISABLED_Llama3_1_8bDecodeStep16) {
  decode_timeline("llama3.1-8b", 16);
}
TEST(CudaTimeline, DISABLED_Qwen2_1_5bDecodeStep16) {
  decode_timeline("qwen2-1.5b", 16);
}

}  // namespace
}  // namespace kestrel::cuda_test
