// The whole model on CUDA: against the CPU backend (synthetic models, every format), against
// Hugging Face transformers (the fixtures of tests/golden/models), and captured decode graphs
// against eager execution.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>

#include "../golden/hf_fixture.h"
#include "../unit/argmax_rows_check.h"
#include "cuda_test_util.h"
#include "kestrel/engine.h"

namespace kestrel::cuda_test {
namespace {

std::unique_ptr<Engine> make_engine(const std::string& model, WeightFormat format,
                                    const std::string& device, int64_t chunk, int block = 32,
                                    int64_t max_seqs = 1) {
  EngineOptions options;
  options.model = model;
  options.format = format;
  options.block = block;
  options.device = device;
  options.threads = 0;
  options.progress = false;
  options.max_context = 512;
  options.max_seqs = max_seqs;
  options.prefill_chunk = chunk;
  auto engine = Engine::create(options);
  EXPECT_TRUE(engine.is_ok()) << engine.status().message();
  return engine.is_ok() ? std::move(engine).value() : nullptr;
}

std::vector<int32_t> prompt_of(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int32_t& id : ids) id = int32_t(rng() % uint64_t(vocab));
  return ids;
}

using hf_fixture::compare;
using hf_fixture::Comparison;

// Per-format bounds of CUDA against CPU logits. The CPU's integer formats quantize activations
// to int8 (its own golden bound against HF's fake-quantized logits is 0.12), CUDA rounds them
// to fp16 (0.003 against the same references, CudaHfGolden below), so for integer formats the
// CPU's rounding is what these bounds measure: 0.014-0.037 and 88-100% top-1 agreement seen on
// these tiny random models, whose logits are nearly flat. fp16 and bf16 differ by fp16
// activations (and fp16 weights for bf16 models) only; fp32 computes in fp32 on both (the CPU
// is 1e-6 from HF fp32), so only summation order differs.
struct Bound {
  WeightFormat format;
  double max_rel_error;
  double min_top1_agreement;
};

const Bound kVsCpu[] = {
    {WeightFormat::fp32, 1e-4, 0.95},     {WeightFormat::fp16, 1e-2, 0.95},
    {WeightFormat::bf16, 1e-2, 0.95},     {WeightFormat::sym_int8, 8e-2, 0.75},
    {WeightFormat::sym_int4, 8e-2, 0.75}, {WeightFormat::asym_int4, 8e-2, 0.75}};

class CudaModelVsCpu : public ::testing::TestWithParam<const char*> {};

// 40 prompt tokens in chunks of 16: full chunks are 16-token calls that want all logits (the
// captured-graph path), the last 8; then greedy decoding.
TEST_P(CudaModelVsCpu, LogitsAndGreedyMatchCpu) {
  const std::string model = std::string("synthetic:") + GetParam();
  for (const Bound& bound : kVsCpu) {
    auto cpu = make_engine(model, bound.format, "cpu", 16);
    auto gpu = make_engine(model, bound.format, "cuda", 16);
    ASSERT_TRUE(cpu && gpu);
    const int64_t vocab = cpu->config().vocab_size;
    const auto prompt = prompt_of(40, vocab, 7);
    auto a = gpu->prompt_logits(prompt);
    auto b = cpu->prompt_logits(prompt);
    ASSERT_TRUE(a.is_ok()) << a.status().message();
    ASSERT_TRUE(b.is_ok()) << b.status().message();
    const Comparison c = compare(*a, *b, vocab);
    std::printf("[ %s %s ] CUDA vs CPU max rel error %.3g, top-1 agreement %.2f\n", GetParam(),
                format_name(bound.format), c.max_rel_error, c.top1_agreement);
    EXPECT_LE(c.max_rel_error, bound.max_rel_error) << format_name(bound.format);
    EXPECT_GE(c.top1_agreement, bound.min_top1_agreement) << format_name(bound.format);

    auto ga = gpu->generate_greedy(prompt, 12);
    auto gb = cpu->generate_greedy(prompt, 12);
    ASSERT_TRUE(ga.is_ok() && gb.is_ok());
    if (!is_quantized(bound.format)) {
      EXPECT_EQ(ga->tokens, gb->tokens) << format_name(bound.format);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Synthetic, CudaModelVsCpu, ::testing::Values("tiny-qwen2", "tiny-llama"),
                         [](const auto& info) {
                           std::string s = info.param;
                           for (char& ch : s)
                             if (ch == '-') ch = '_';
                           return s;
                         });

// A real architecture's dimensions (head_dim 64, 14 heads over 2 KV heads, vocab 151936): one
// 200-token prefill call (flash attention, cuBLAS GEMMs) then decode steps, last logits each.
TEST(CudaModel, Qwen2HalfBillionShapeMatchesCpu) {
  for (WeightFormat format : {WeightFormat::sym_int4, WeightFormat::fp16, WeightFormat::fp32}) {
    auto cpu = make_engine("synthetic:qwen2-0.5b", format, "cpu", 512);
    auto gpu = make_engine("synthetic:qwen2-0.5b", format, "cuda", 512);
    ASSERT_TRUE(cpu && gpu);
    const int64_t vocab = cpu->config().vocab_size;
    std::vector<int32_t> ids = prompt_of(200, vocab, 11);
    Batch prompt;
    for (size_t i = 0; i < ids.size(); ++i) prompt.add(ids[i], int32_t(i), 0, i + 1 == ids.size());
    std::vector<float> a, b;
    ASSERT_TRUE(gpu->run(prompt, &a).is_ok());
    ASSERT_TRUE(cpu->run(prompt, &b).is_ok());
    double worst = compare(a, b, vocab).max_rel_error;
    for (int step = 0; step < 6; ++step) {
      Batch next;
      next.add(argmax(b.data(), vocab), int32_t(ids.size()) + step, 0, true);
      ASSERT_TRUE(gpu->run(next, &a).is_ok());
      ASSERT_TRUE(cpu->run(next, &b).is_ok());
      worst = std::max(worst, compare(a, b, vocab).max_rel_error);
    }
    std::printf("[ qwen2-0.5b %s ] CUDA vs CPU max rel error %.3g\n", format_name(format), worst);
    EXPECT_LE(worst, format == WeightFormat::fp32   ? 1e-4
                     : format == WeightFormat::fp16 ? 1e-2
                                                    : 5e-2)
        << format_name(format);
  }
}

// The inputs quantized by their producers (both on by default since the twenty-fifth session;
// each variant sets both switches): the residual adds
// preparing their next norm's input (set_gemv_norm_halves: x·g in half groups and the tiles' sums
// of squares, which q/k/v's, gate/up's and the lm_head's GEMVs then read instead of normalizing
// and quantizing the residual; also without the final norm's, set_plan_final_norm(false)),
// decode attention writing wo's input in half groups (set_attention_half_groups; qwen2-0.5b's
// head_dim 64 and 7 query heads a KV head: the merging split; qwen2-1.5b's 128 and 6 in asym_int4
// blocks of 64), and both: a 200-token prefill, then
// decode steps, against the CPU within the same bound as without them (and within twice that
// path's error plus 0.01); the decode logits differ from those without (the path ran, the
// lm_head's prepared input too), and steps replay a graph.
TEST(CudaModel, DecodeWithPreparedInputsMatchesCpu) {
  // The process-wide switches, restored however the loop body ends.
  const ScopedSwitch norm(cuda::set_gemv_norm_halves, false);
  const ScopedSwitch attention(cuda::set_attention_half_groups, false);
  const ScopedSwitch final_norm(cuda::set_plan_final_norm, true);
  struct Case {
    const char* model;
    WeightFormat format;
    int block;
    double bound;  // against the CPU: CudaModelVsCpu's for int formats; the HF goldens' for the
                   // deeper 1.5B, not yet measured against the CPU at one token
  };
  // qwen2-0.5b sym_int4 (head_dim 64, 7 query heads a KV head), and qwen2-1.5b asym_int4 in
  // blocks of 64 (head_dim 128, 6 a KV head: the merge's second pass; the asym GEMVs' prepared
  // inputs, whose scales carry r and whose sums do not).
  const Case cases[] = {{"qwen2-0.5b", WeightFormat::sym_int4, 32, 5e-2},
                        {"qwen2-1.5b", WeightFormat::asym_int4, 64, 0.12}};
  for (const Case& k : cases) {
    SCOPED_TRACE(std::string(k.model) + " " + format_name(k.format));
    const std::string model = std::string("synthetic:") + k.model;
    auto cpu = make_engine(model, k.format, "cpu", 512, k.block);
    ASSERT_TRUE(cpu);
    const int64_t vocab = cpu->config().vocab_size;
    const std::vector<int32_t> ids = prompt_of(200, vocab, 13);
    Batch prompt;
    for (size_t i = 0; i < ids.size(); ++i) prompt.add(ids[i], int32_t(i), 0, i + 1 == ids.size());
    std::vector<std::vector<float>> cpu_logits(7);
    ASSERT_TRUE(cpu->run(prompt, &cpu_logits[0]).is_ok());
    std::vector<int32_t> next_ids;
    for (int step = 0; step < 6; ++step) {
      next_ids.push_back(argmax(cpu_logits[size_t(step)].data(), vocab));
      Batch next;
      next.add(next_ids.back(), int32_t(ids.size()) + step, 0, true);
      ASSERT_TRUE(cpu->run(next, &cpu_logits[size_t(step) + 1]).is_ok());
    }
    cpu.reset();
    struct Variant {
      const char* name;
      bool norm, attention, final_norm;
    };
    const Variant variants[] = {{"neither", false, false, true},
                                {"prepared norms", true, false, true},
                                {"attention halves", false, true, true},
                                {"both", true, true, true},
                                {"prepared norms but the final one", true, false, false}};
    constexpr int kVariants = int(std::size(variants));
    double worst[kVariants] = {};
    std::vector<float> last[kVariants];
    for (int v = 0; v < kVariants; ++v) {
      cuda::set_gemv_norm_halves(variants[v].norm);
      cuda::set_attention_half_groups(variants[v].attention);
      cuda::set_plan_final_norm(variants[v].final_norm);
      auto gpu = make_engine(model, k.format, "cuda", 512, k.block);
      ASSERT_TRUE(gpu);
      std::vector<float> a;
      ASSERT_TRUE(gpu->run(prompt, &a).is_ok());
      for (int step = 0; step < 6; ++step) {
        Batch next;
        next.add(next_ids[size_t(step)], int32_t(ids.size()) + step, 0, true);
        ASSERT_TRUE(gpu->run(next, &a).is_ok());
        worst[v] =
            std::max(worst[v], compare(a, cpu_logits[size_t(step) + 1], vocab).max_rel_error);
      }
      last[v] = a;
      // The steps after the first decode step replay its captured graph.
      EXPECT_GT(cuda::graph_stats(gpu->backend()).replayed, 0) << variants[v].name;
    }
    std::printf(
        "[ %s %s decode ] CUDA vs CPU max rel error %.3g, prepared norms %.3g, attention halves "
        "%.3g, both %.3g, prepared norms but the final one %.3g\n",
        k.model, format_name(k.format), worst[0], worst[1], worst[2], worst[3], worst[4]);
    EXPECT_LE(worst[0], k.bound) << "without the prepared inputs";
    for (int v = 1; v < kVariants; ++v) {
      // The same bound as the path without them; the prepared inputs add int8 rounding at more
      // places a layer (half groups; no fp16 step for the norms), so a ratio to that path's
      // error is loose.
      EXPECT_LE(worst[v], k.bound) << variants[v].name;
      EXPECT_LE(worst[v], 2.0 * worst[0] + 1e-2) << variants[v].name;
      EXPECT_NE(last[0], last[v]) << variants[v].name << ": the prepared inputs were not read";
    }
    EXPECT_NE(last[1], last[3]) << "with the prepared norms, the attention halves were not read";
    EXPECT_NE(last[1], last[4]) << "the lm_head did not read the final norm's prepared input";
  }
}

// int8 activations for the batch-16 GEMVs (set_int8_activations): 16 sequences prefilled
// together, then decode steps of one token each, against the CPU within the bound of the path
// without them (and within twice that path's error plus 0.01). Mode 1 (the norms before q/k/v
// and gate/up, and the gate/up GEMV for w_down, write the int8 half groups) and mode 2 (wo's
// input quantized in place too) read codes (the GEMVs' launch count), only mode 2 quantizes in
// place, and each changes the logits (the paths ran); the steps replay a graph. qwen2-0.5b in
// sym_int4: head_dim 64, 896 columns (28 groups), w_down's 4864.
TEST(CudaModel, DecodeWithInt8ActivationsMatchesCpu) {
  struct ModeBack {
    int before = cuda::set_int8_activations(0);
    ~ModeBack() { cuda::set_int8_activations(before); }
  } mode_back;
  constexpr int kSeqs = 16, kPrompt = 24, kSteps = 4;
  const std::string model = "synthetic:qwen2-0.5b";
  auto cpu = make_engine(model, WeightFormat::sym_int4, "cpu", 512, 32, kSeqs);
  ASSERT_TRUE(cpu);
  const int64_t vocab = cpu->config().vocab_size;
  Batch prompt;
  for (int32_t seq = 0; seq < kSeqs; ++seq) {
    const std::vector<int32_t> ids = prompt_of(kPrompt, vocab, 17 + uint64_t(seq));
    for (int32_t i = 0; i < kPrompt; ++i) prompt.add(ids[size_t(i)], i, seq, i + 1 == kPrompt);
  }
  // The CPU's steps, each sequence fed its own greedy token.
  std::vector<float> logits;
  ASSERT_TRUE(cpu->run(prompt, &logits).is_ok());
  std::vector<Batch> steps;
  std::vector<std::vector<float>> cpu_logits;
  for (int step = 0; step < kSteps; ++step) {
    Batch next;
    for (int32_t seq = 0; seq < kSeqs; ++seq) {
      next.add(argmax(logits.data() + size_t(seq) * size_t(vocab), vocab), kPrompt + step, seq,
               true);
    }
    ASSERT_TRUE(cpu->run(next, &logits).is_ok());
    steps.push_back(next);
    cpu_logits.push_back(logits);
  }
  cpu.reset();
  double worst[3] = {};
  std::vector<float> last[3];
  for (int mode = 0; mode < 3; ++mode) {
    SCOPED_TRACE("mode " + std::to_string(mode));
    cuda::set_int8_activations(mode);
    auto gpu = make_engine(model, WeightFormat::sym_int4, "cuda", 512, 32, kSeqs);
    ASSERT_TRUE(gpu);
    std::vector<float> a;
    ASSERT_TRUE(gpu->run(prompt, &a).is_ok());
    const uint64_t reads = cuda::gemv_int8_activation_launches();
    const uint64_t requantized = cuda::int8_requantize_launches();
    for (int step = 0; step < kSteps; ++step) {
      ASSERT_TRUE(gpu->run(steps[size_t(step)], &a).is_ok());
      worst[mode] =
          std::max(worst[mode], compare(a, cpu_logits[size_t(step)], vocab).max_rel_error);
    }
    last[mode] = a;
    // The steps not replayed (the captured one) launch on the host and count; the others replay
    // it. A layer's GEMVs reading codes: q/k/v (the norm's), gate/up (the norm's) and w_down
    // (gate/up's epilogue), and wo in mode 2 (quantized in place); the lm_head takes the
    // row-warp kernel on these GPUs (1187 units: at least four blocks an SM up to 296 SMs) and
    // reads fp16, but its input is the final norm's, so a GPU of more SMs may add one a step.
    const cuda::GraphStats graphs = cuda::graph_stats(gpu->backend());
    EXPECT_GT(graphs.replayed, 0);
    const uint64_t launched_steps = uint64_t(kSteps - graphs.replayed);
    const uint64_t layers = uint64_t(gpu->config().n_layers);
    const uint64_t per_layer = mode == 0 ? 0 : mode == 1 ? 3 : 4;
    const uint64_t read = cuda::gemv_int8_activation_launches() - reads;
    EXPECT_GE(read, per_layer * layers * launched_steps) << "GEMV launches that read codes";
    EXPECT_LE(read, (per_layer * layers + (mode == 0 ? 0 : 1)) * launched_steps)
        << "GEMV launches that read codes";
    EXPECT_EQ(cuda::int8_requantize_launches() - requantized,
              (mode == 2 ? layers : 0) * launched_steps)
        << "in-place quantizations (wo's input, mode 2 alone)";
  }
  std::printf(
      "[ qwen2-0.5b sym_int4 batch-16 decode ] CUDA vs CPU max rel error %.3g, int8 norms %.3g, "
      "int8 inputs %.3g\n",
      worst[0], worst[1], worst[2]);
  EXPECT_LE(worst[0], 5e-2) << "without int8 activations";
  for (int mode = 1; mode < 3; ++mode) {
    EXPECT_LE(worst[mode], 5e-2) << "mode " << mode;
    EXPECT_LE(worst[mode], 2.0 * worst[0] + 1e-2) << "mode " << mode;
  }
  EXPECT_NE(last[0], last[1]) << "mode 1's codes were not read";
  EXPECT_NE(last[1], last[2]) << "mode 2's in-place codes were not read";
}

// Captured graphs replay exactly what eager execution computes, at every position; for fp32
// the graphs hold cuBLAS's GEMMs.
class CudaGraphReplay : public ::testing::TestWithParam<WeightFormat> {};

TEST_P(CudaGraphReplay, EqualsEagerExecution) {
  auto gpu = make_engine("synthetic:tiny-llama", GetParam(), "cuda", 64, 32, 4);
  ASSERT_TRUE(gpu);
  const int64_t vocab = gpu->config().vocab_size;
  const auto prompt = prompt_of(30, vocab, 3);
  std::vector<std::vector<float>> runs[2];
  for (int eager = 0; eager < 2; ++eager) {
    ASSERT_TRUE(cuda::set_op_timing(gpu->backend(), eager == 1).is_ok());
    for (int32_t seq = 0; seq < 3; ++seq) {
      Batch b;
      for (size_t i = 0; i < prompt.size(); ++i) b.add(prompt[i] + seq, int32_t(i), seq, false);
      std::vector<float> unused;
      ASSERT_TRUE(gpu->run(b, &unused).is_ok());
    }
    for (int step = 0; step < 5; ++step) {
      Batch b;
      for (int32_t seq = 0; seq < 3; ++seq) b.add(5 + seq + step, 30 + step, seq, true);
      std::vector<float> logits;
      const Status s = gpu->run(b, &logits);
      ASSERT_TRUE(s.is_ok()) << s.message();
      runs[eager].push_back(logits);
    }
  }
  ASSERT_TRUE(cuda::set_op_timing(gpu->backend(), false).is_ok());
  const cuda::GraphStats stats = cuda::graph_stats(gpu->backend());
  EXPECT_EQ(stats.captured, 1);
  EXPECT_EQ(stats.replayed, 4);
  ASSERT_EQ(runs[0].size(), runs[1].size());
  for (size_t i = 0; i < runs[0].size(); ++i) {
    EXPECT_EQ(std::memcmp(runs[0][i].data(), runs[1][i].data(), runs[0][i].size() * 4), 0)
        << "step " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, CudaGraphReplay,
                         ::testing::Values(WeightFormat::sym_int4, WeightFormat::fp32),
                         [](const auto& info) { return std::string(format_name(info.param)); });

// Greedy decode run ahead (EngineOptions::run_ahead): each step's tokens are the argmax the step
// before it left in the tokens' device slots, queued before that argmax comes back to the host.
// The same kernels in the same order as step by step, so the same tokens, through captured
// graphs and with op timing (no graphs, every event read) alike.
// A server step's call: every row's argmax on the device, only rows 2 and 0 read back whole
// (Backend::read_rows), against run()'s rows of the same step (a replayed decode graph both).
TEST(CudaModel, ArgmaxWithSomeRowsWholeMatchesRun) {
  auto gpu = argmax_rows_check::tiny_three_slot_engine("cuda");
  ASSERT_TRUE(gpu);
  argmax_rows_check::expect_rows_and_argmax_match_run(*gpu, 1e-5);
}

// Sampled rows drawn on the device (Engine::run_argmax with draws) are the host sampler's draws
// from the same call's rows.
TEST(CudaModel, DrawsAreTheHostSamplersPicks) {
  auto gpu = argmax_rows_check::tiny_three_slot_engine("cuda");
  ASSERT_TRUE(gpu);
  argmax_rows_check::expect_draws_match_pick(*gpu);
}

// Drawn rows run ahead: the draw kernel's tokens feed the next step on the device (the copy of
// argmax_out_ into the token slots), so the steps' tokens are those of the steps run in turn.
TEST(CudaModel, DrawnStepsRunAheadAsInTurn) {
  auto gpu = argmax_rows_check::tiny_three_slot_engine("cuda");
  ASSERT_TRUE(gpu);
  argmax_rows_check::expect_drawn_steps_run_ahead_as_in_turn(*gpu);
}

TEST(CudaModel, RunAheadEqualsStepByStep) {
  auto plain = argmax_rows_check::tiny_three_slot_engine("cuda", false);
  auto ahead = argmax_rows_check::tiny_three_slot_engine("cuda", true);
  ASSERT_TRUE(plain && ahead);
  const auto prompt = prompt_of(21, plain->config().vocab_size, 8);
  for (int timed = 0; timed < 2; ++timed) {
    SCOPED_TRACE(timed ? "op timing" : "graphs");
    ASSERT_TRUE(cuda::set_op_timing(plain->backend(), timed == 1).is_ok());
    ASSERT_TRUE(cuda::set_op_timing(ahead->backend(), timed == 1).is_ok());
    auto a = plain->generate_greedy(prompt, 24);
    auto b = ahead->generate_greedy(prompt, 24);
    ASSERT_TRUE(a.is_ok() && b.is_ok()) << b.status().message();
    EXPECT_EQ(b->tokens, a->tokens);
    BatchGenerateParams params;
    params.batch_size = 3;
    params.n_new = 17;
    auto c = plain->generate_batch(prompt, params);
    auto d = ahead->generate_batch(prompt, params);
    ASSERT_TRUE(c.is_ok() && d.is_ok()) << d.status().message();
    EXPECT_EQ(d->tokens, c->tokens);
  }
  ASSERT_TRUE(cuda::set_op_timing(ahead->backend(), false).is_ok());
  // The run-ahead steps replayed graphs (batch 1 and 3: one capture each, in the graphs pass).
  const cuda::GraphStats stats = cuda::graph_stats(ahead->backend());
  EXPECT_EQ(stats.captured, 2);
  EXPECT_GE(stats.replayed, 23 + 16 - 2);
}

// Forked sequences (shared full blocks, a copied partly filled block, slots whose blocks are not
// in slot order) decode through captured graphs like their parent and like the CPU: the graphs
// read the block tables begin_batch refreshes, not the ones of the call they were captured in.
TEST(CudaModel, ForkedSequencesDecodeThroughSharedBlocks) {
  auto gpu = make_engine("synthetic:tiny-qwen2", WeightFormat::fp16, "cuda", 64, 32, 3);
  auto cpu = make_engine("synthetic:tiny-qwen2", WeightFormat::fp16, "cpu", 64, 32, 3);
  ASSERT_TRUE(gpu && cpu);
  const int64_t vocab = gpu->config().vocab_size;
  const auto prompt = prompt_of(37, vocab, 9);
  std::vector<std::vector<float>> steps[2];
  int i = 0;
  for (Engine* e : {cpu.get(), gpu.get()}) {
    // Slot 2 takes the first blocks and gives them back, so slot 0's are blocks 3, 4, 5.
    ASSERT_TRUE(e->prefill(prompt_of(40, vocab, 10), 2).is_ok());
    ASSERT_TRUE(e->prefill(prompt, 0).is_ok());
    e->release_sequence(2);
    ASSERT_TRUE(e->copy_sequence(0, 1, 37).is_ok());
    ASSERT_TRUE(e->copy_sequence(0, 2, 37).is_ok());
    for (int step = 0; step < 16; ++step) {  // crosses into a new block at position 48
      Batch b;
      for (int32_t seq = 0; seq < 3; ++seq) b.add(7 + step, 37 + step, seq, true);
      std::vector<float> logits;
      const Status s = e->run(b, &logits);
      ASSERT_TRUE(s.is_ok()) << s.message();
      for (int32_t seq = 1; seq < 3; ++seq) {
        const std::vector<float> parent(logits.begin(), logits.begin() + long(vocab));
        const std::vector<float> fork(logits.begin() + long(seq * vocab),
                                      logits.begin() + long((seq + 1) * vocab));
        EXPECT_LE(rel_error(fork, parent), 1e-5) << e->backend().name() << " step " << step;
      }
      steps[i].push_back(std::move(logits));
    }
    ++i;
  }
  EXPECT_GT(cuda::graph_stats(gpu->backend()).replayed, 0);
  for (size_t s = 0; s < steps[0].size(); ++s) {
    const Comparison c = compare(steps[1][s], steps[0][s], vocab);
    EXPECT_LE(c.max_rel_error, 1e-2) << "step " << s;
  }
}

// --- Hugging Face fixtures -------------------------------------------------------------------

// Against HF float32 logits: float formats on the original weights, integer formats on weights
// quantize-dequantized by make_golden.py's independent implementation of format.h
// (hf_fixture.h's reference_logits), as in tests/golden/test_hf_models.cpp. fp32 computes in
// fp32 (issue 9: 1e-4, where fp16 math gave 8.8e-4); CUDA keeps bf16 weights as fp16 and
// multiplies fp16 activations; integer formats keep the CPU's bounds (CUDA rounds activations
// to fp16, finer than the CPU's int8).
struct HfBound {
  WeightFormat format;
  int block;
  double max_rel_error;
  double min_top1_agreement;
};

const HfBound kVsHf[] = {
    {WeightFormat::fp32, 0, 1e-4, 1.0},       {WeightFormat::fp16, 0, 1e-2, 0.95},
    {WeightFormat::bf16, 0, 5e-2, 0.9},       {WeightFormat::sym_int8, 32, 0.12, 0.8},
    {WeightFormat::sym_int4, 32, 0.12, 0.8},  {WeightFormat::sym_int4, 64, 0.12, 0.8},
    {WeightFormat::asym_int4, 32, 0.12, 0.8},
};

class CudaHfGolden : public ::testing::TestWithParam<const char*> {};

TEST_P(CudaHfGolden, EveryFormatWithinItsBound) {
  const hf_fixture::Fixture f = hf_fixture::load(GetParam());
  for (const HfBound& bound : kVsHf) {
    if (bound.block == 64 && std::string(GetParam()) != "qwen2-tied-f32") continue;
    auto engine = make_engine(f.dir, bound.format, "cuda", 16, std::max(bound.block, 32));
    ASSERT_TRUE(engine);
    auto logits = engine->prompt_logits(f.prompt);
    ASSERT_TRUE(logits.is_ok()) << logits.status().message();
    const Comparison c =
        compare(*logits, hf_fixture::reference_logits(f, bound.format, bound.block), f.vocab);
    std::printf("[ %s %s b%d ] CUDA vs HF max rel error %.3g, top-1 agreement %.2f\n", GetParam(),
                format_name(bound.format), bound.block, c.max_rel_error, c.top1_agreement);
    EXPECT_LE(c.max_rel_error, bound.max_rel_error) << format_name(bound.format);
    EXPECT_GE(c.top1_agreement, bound.min_top1_agreement) << format_name(bound.format);
  }
}

// The greedy continuation (prefill, then captured decode steps with the argmax on the device)
// is HF's, token for token, for the float formats.
TEST_P(CudaHfGolden, GreedyMatchesHf) {
  const hf_fixture::Fixture f = hf_fixture::load(GetParam());
  for (WeightFormat format : {WeightFormat::fp32, WeightFormat::fp16}) {
    auto engine = make_engine(f.dir, format, "cuda", 16);
    ASSERT_TRUE(engine);
    auto generated = engine->generate_greedy(f.prompt, int64_t(f.greedy.size()));
    ASSERT_TRUE(generated.is_ok()) << generated.status().message();
    EXPECT_EQ(generated->tokens, f.greedy) << format_name(format);
  }
}

// An fp8 KV cache against the fp16 one, with the same fp16 weights, in one prompt's logits and in
// greedy decode steps. The stated cost of fp8 entries (e4m3: 3 mantissa bits, relative rounding
// up to 1/16 per entry) on these small random models, whose peaked attention amplifies it: a
// relative logit error of at most 0.15 and top-1 agreement of 85% against fp16 entries (measured
// 0.08-0.10 and 0.92-0.93 on the H200). Head sizes off the multiple of 16 are refused (the op
// test checks the message).
TEST_P(CudaHfGolden, Fp8KvCacheWithinItsBound) {
  const hf_fixture::Fixture f = hf_fixture::load(GetParam());
  EngineOptions options;
  options.model = f.dir;
  options.format = WeightFormat::fp16;
  options.device = "cuda";
  options.progress = false;
  options.max_context = 512;
  options.prefill_chunk = 64;  // prompts through the flash kernel's fp8 tiles too
  options.kv_cache = KvCacheType::fp8;
  auto fp8 = Engine::create(options);
  if (!fp8.is_ok() && fp8.status().message().find("multiple of 16") != std::string::npos) {
    GTEST_SKIP() << fp8.status().message();
  }
  ASSERT_TRUE(fp8.is_ok()) << fp8.status().message();
  options.kv_cache = KvCacheType::fp16;
  auto half = Engine::create(options);
  ASSERT_TRUE(half.is_ok()) << half.status().message();
  auto a = (*half)->prompt_logits(f.prompt);
  auto b = (*fp8)->prompt_logits(f.prompt);
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  const Comparison c = compare(*b, *a, f.vocab);
  std::printf("[ %s fp8 KV ] vs fp16 KV max rel error %.3g, top-1 agreement %.2f\n", GetParam(),
              c.max_rel_error, c.top1_agreement);
  EXPECT_LE(c.max_rel_error, 0.15);
  EXPECT_GE(c.top1_agreement, 0.85);
  auto ga = (*half)->generate_greedy(f.prompt, 8);
  auto gb = (*fp8)->generate_greedy(f.prompt, 8);
  ASSERT_TRUE(ga.is_ok() && gb.is_ok());
  int same = 0;
  const size_t n = std::min(ga->tokens.size(), gb->tokens.size());
  while (size_t(same) < n && ga->tokens[size_t(same)] == gb->tokens[size_t(same)]) ++same;
  std::printf("[ %s fp8 KV ] greedy: %d of %zu leading tokens equal to fp16 KV's\n", GetParam(),
              same, n);
}

// fp32 with the whole prompt in one call (more than 16 tokens: the prefill path) and with one
// token per call (decode steps, captured graphs), against HF float32 logits.
TEST_P(CudaHfGolden, Fp32PrefillAndDecodeWithinOneInTenThousand) {
  const hf_fixture::Fixture f = hf_fixture::load(GetParam());
  for (int64_t chunk : {int64_t(512), int64_t(1)}) {
    auto engine = make_engine(f.dir, WeightFormat::fp32, "cuda", chunk);
    ASSERT_TRUE(engine);
    auto logits = engine->prompt_logits(f.prompt);
    ASSERT_TRUE(logits.is_ok()) << logits.status().message();
    const Comparison c = compare(*logits, f.logits, f.vocab);
    std::printf("[ %s fp32, chunk %lld ] CUDA vs HF max rel error %.3g\n", GetParam(),
                static_cast<long long>(chunk), c.max_rel_error);
    EXPECT_LE(c.max_rel_error, 1e-4) << "chunk " << chunk;
    EXPECT_EQ(c.top1_agreement, 1.0) << "chunk " << chunk;
  }
}

INSTANTIATE_TEST_SUITE_P(Models, CudaHfGolden, ::testing::ValuesIn(hf_fixture::kNames),
                         [](const auto& info) { return hf_fixture::param_name(info.param); });

}  // namespace
}  // namespace kestrel::cuda_test
