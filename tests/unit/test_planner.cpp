// The memory planner: weight bytes against loaded models, KV cache and workspace against what
// the CPU backend allocates and hand-computed sizes, chunk shrinking and failure messages.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <limits>
#include <random>

#include "backend/backend.h"
#include "bench/profile.h"
#include "core/thread_pool.h"
#include "kestrel/engine.h"
#include "kestrel/generate.h"
#include "model/loader.h"
#include "runtime/planner.h"
#include "runtime/text_generation.h"
#include "tokenizer/tokenizer.h"

namespace kestrel {
namespace {

namespace fs = std::filesystem;

struct FormatCase {
  WeightFormat format;
  int block;
};

const FormatCase kFormats[] = {
    {WeightFormat::sym_int4, 32},  {WeightFormat::sym_int4, 64}, {WeightFormat::asym_int4, 32},
    {WeightFormat::asym_int4, 64}, {WeightFormat::sym_int8, 32}, {WeightFormat::fp16, 32},
    {WeightFormat::bf16, 32},      {WeightFormat::fp32, 32},
};

TEST(Planner, WeightBytesEqualWhatTheLoaderAllocates) {
  ThreadPool pool(2);
  for (const char* model : {"synthetic:tiny-qwen2", "synthetic:tiny-llama"}) {
    for (const FormatCase& f : kFormats) {
      LoadOptions load;
      load.format = f.format;
      load.block = f.block;
      load.format_explicit = true;
      load.progress = false;
      auto weights = load_model(model, load, pool);
      ASSERT_TRUE(weights.is_ok()) << weights.status().message();
      auto spec = weight_spec_of(model, f.format, true, f.block);
      ASSERT_TRUE(spec.is_ok()) << spec.status().message();
      SCOPED_TRACE(std::string(model) + " " + format_name(f.format) + " block " +
                   std::to_string(f.block));
      EXPECT_EQ(planned_weight_bytes(*spec), weights->resident_bytes());
      EXPECT_EQ(planned_decode_bytes(*spec), weights->decode_bytes());
    }
  }
}

TEST(Planner, Qwen2OnePointFiveBSymInt4ByHand) {
  auto spec = weight_spec_of("synthetic:qwen2-1.5b", WeightFormat::sym_int4, true, 32);
  ASSERT_TRUE(spec.is_ok());
  // Half a byte per weight plus an fp16 scale per 32 weights; the embedding counted once (tied);
  // per layer two fp32 norms of 1536 and fp32 q/k/v biases of 1536 + 256 + 256.
  auto int4 = [](int64_t rows, int64_t cols) { return rows * cols / 2 + rows * (cols / 32) * 2; };
  const int64_t per_layer = int4(1536, 1536) * 2 + int4(256, 1536) * 2 + int4(8960, 1536) * 2 +
                            int4(1536, 8960) + 2 * 1536 * 4 + (1536 + 512) * 4;
  const int64_t expected = int4(151936, 1536) + 28 * per_layer + 1536 * 4;
  EXPECT_EQ(int64_t(planned_weight_bytes(*spec)), expected);
  EXPECT_EQ(int64_t(planned_decode_bytes(*spec)), expected + int4(151936, 1536) / 151936);
}

TEST(Planner, WeightSpecReadsHfAndConvertedDirectories) {
  ThreadPool pool(2);
  const std::string source_dir = KESTREL_SOURCE_DIR;
  // A Llama with attention_bias: q/k/v and o_proj biases.
  const std::string hf = source_dir + "/tests/golden/models/llama-tied-bias-f16";
  auto spec = weight_spec_of(hf, WeightFormat::sym_int8, true, 32);
  ASSERT_TRUE(spec.is_ok()) << spec.status().message();
  LoadOptions load;
  load.format = WeightFormat::sym_int8;
  load.format_explicit = true;
  load.progress = false;
  auto weights = load_model(hf, load, pool);
  ASSERT_TRUE(weights.is_ok()) << weights.status().message();
  EXPECT_FALSE(weights->layers[0].wq.bias.empty());
  EXPECT_FALSE(weights->layers[0].wo.bias.empty());
  EXPECT_EQ(planned_weight_bytes(*spec), weights->resident_bytes());

  // A converted directory keeps its own format when none is asked for.
  const fs::path out =
      fs::temp_directory_path() / ("kestrel_planner_" + std::to_string(::getpid()));
  ASSERT_TRUE(save_converted(*weights, hf, out.string()).is_ok());
  auto converted = weight_spec_of(out.string(), WeightFormat::sym_int4, false, 32);
  ASSERT_TRUE(converted.is_ok()) << converted.status().message();
  EXPECT_EQ(converted->format, WeightFormat::sym_int8);
  EXPECT_EQ(planned_weight_bytes(*converted), weights->resident_bytes());
  EXPECT_FALSE(weight_spec_of(out.string(), WeightFormat::sym_int4, true, 32).is_ok());
  fs::remove_all(out);

  EXPECT_FALSE(weight_spec_of("/nonexistent/model", WeightFormat::sym_int4, true, 32).is_ok());
  // tiny-qwen2's hidden size 128 is a multiple of 64 but its intermediate 384 is too; block 48
  // is no block at all.
  EXPECT_FALSE(weight_spec_of("synthetic:tiny-qwen2", WeightFormat::sym_int4, true, 48).is_ok());
}

TEST(Planner, WeightBytesOfEveryGoldenFixture) {
  ThreadPool pool(2);
  const fs::path models = fs::path(KESTREL_SOURCE_DIR) / "tests/golden/models";
  int checked = 0;
  for (const auto& entry : fs::directory_iterator(models)) {
    for (WeightFormat format : {WeightFormat::fp32, WeightFormat::fp16, WeightFormat::bf16,
                                WeightFormat::sym_int4, WeightFormat::asym_int4}) {
      const std::string dir = entry.path().string();
      SCOPED_TRACE(dir + " " + format_name(format));
      auto spec = weight_spec_of(dir, format, true, 32);
      ASSERT_TRUE(spec.is_ok()) << spec.status().message();
      LoadOptions load;
      load.format = format;
      load.format_explicit = true;
      load.progress = false;
      auto weights = load_model(dir, load, pool);
      ASSERT_TRUE(weights.is_ok()) << weights.status().message();
      EXPECT_EQ(planned_weight_bytes(*spec), weights->resident_bytes());
      EXPECT_EQ(planned_decode_bytes(*spec), weights->decode_bytes());
      ++checked;
    }
  }
  EXPECT_GE(checked, 15);
}

PlanInputs inputs_for(const WeightSpec& spec, int64_t batch, int64_t in, int64_t out) {
  PlanInputs inputs;
  inputs.weights = spec;
  inputs.batch_size = batch;
  inputs.in_len = in;
  inputs.out_len = out;
  inputs.prefill_chunk = 512;
  inputs.reserve_bytes = 3 << 20;
  return inputs;
}

MemoryBudget unlimited() {
  MemoryBudget budget;
  budget.bytes = std::numeric_limits<size_t>::max();
  budget.source = "test";
  return budget;
}

TEST(Planner, KvCacheAndPartsByHand) {
  auto backend = make_backend("cpu", 2);
  ASSERT_TRUE(backend.is_ok());
  auto spec = weight_spec_of("synthetic:qwen2-1.5b", WeightFormat::sym_int4, true, 32);
  ASSERT_TRUE(spec.is_ok());
  const LayoutOf layout_of = [&](const RunShape& shape) {
    return (*backend)->reserve_layout(spec->config, shape);
  };
  PlanInputs inputs = inputs_for(*spec, 4, 1024, 512);
  inputs.num_beams = 2;
  auto plan = plan_memory(inputs, unlimited(), layout_of);
  ASSERT_TRUE(plan.is_ok()) << plan.status().message();
  // batch x beams x (in + out) x layers x (K and V) x kv_dim x fp32
  EXPECT_EQ(plan->kv_cache_bytes, size_t(4) * 2 * 1536 * 28 * 2 * 256 * 4);
  EXPECT_EQ(plan->shape.max_seqs, 8);
  EXPECT_EQ(plan->shape.max_context, 1536);
  EXPECT_EQ(plan->shape.max_batch_tokens, 512);
  EXPECT_EQ(plan->shape.max_logit_rows, 8);
  EXPECT_EQ(plan->prefill_chunk, 512);
  EXPECT_EQ(plan->weight_bytes, planned_weight_bytes(*spec));
  EXPECT_EQ(plan->reserve_bytes, size_t(3) << 20);
  // The final head's rows (8 x (vocab + 2 hidden)) and the host's logits (8 x vocab), fp32.
  EXPECT_EQ(plan->logits_bytes, size_t(8) * (151936 + 2 * 1536) * 4 + size_t(8) * 151936 * 4);
  EXPECT_EQ(plan->total_bytes(), plan->weight_bytes + plan->kv_cache_bytes + plan->workspace_bytes +
                                     plan->logits_bytes + plan->reserve_bytes);

  inputs.in_len = 32760;  // + 512 > max_position_embeddings 32768
  auto too_long = plan_memory(inputs, unlimited(), layout_of);
  ASSERT_FALSE(too_long.is_ok());
  EXPECT_NE(too_long.status().message().find("max_position_embeddings"), std::string::npos);
}

TEST(Planner, CpuBackendAllocatesItsLayout) {
  std::mt19937 rng(7);
  auto config = synthetic_config("tiny-llama");
  ASSERT_TRUE(config.is_ok());
  for (int threads : {1, 2, 3}) {
    auto backend = make_backend("cpu", threads);
    ASSERT_TRUE(backend.is_ok());
    for (int trial = 0; trial < 4; ++trial) {
      RunShape shape;
      shape.max_seqs = std::uniform_int_distribution<int64_t>(1, 9)(rng);
      shape.max_context = std::uniform_int_distribution<int64_t>(1, 700)(rng);
      shape.max_batch_tokens = std::uniform_int_distribution<int64_t>(1, 300)(rng);
      shape.max_logit_rows = std::uniform_int_distribution<int64_t>(1, 9)(rng);
      auto layout = (*backend)->reserve_layout(*config, shape);
      ASSERT_TRUE(layout.is_ok());
      ASSERT_TRUE((*backend)->reserve(*config, shape).is_ok());
      // Everything but the matmul's own activation buffer is allocated by reserve().
      EXPECT_EQ((*backend)->memory_in_use(), layout->total_bytes() - layout->kernel_scratch_bytes);
      // K and V of every layer, slot and position, the context rounded up to whole blocks.
      const int64_t blocks = (shape.max_context + kKvBlockSize - 1) / kKvBlockSize;
      EXPECT_EQ(layout->kv_cache_bytes(),
                size_t(2 * 2 * shape.max_seqs * blocks * kKvBlockSize * 32 * 4));
      // The widest matmul input (intermediate 320) is 10 groups of 32, padded to 16 groups of an
      // int8 32-vector and 6 floats each.
      EXPECT_EQ(layout->kernel_scratch_bytes, size_t(shape.max_batch_tokens) * 16 * (32 + 24));
    }
  }
}

TEST(Planner, PlannedShapeRunsTheForwardPass) {
  // A plan at a shrunken chunk must still give forward() all the scratch it asks for.
  auto spec = weight_spec_of("synthetic:tiny-qwen2", WeightFormat::sym_int4, true, 32);
  ASSERT_TRUE(spec.is_ok());
  auto backend = make_backend("cpu", 2);
  ASSERT_TRUE(backend.is_ok());
  const LayoutOf layout_of = [&](const RunShape& shape) {
    return (*backend)->reserve_layout(spec->config, shape);
  };
  PlanInputs inputs = inputs_for(*spec, 3, 100, 9);
  inputs.prefill_chunk = 32;
  auto plan = plan_memory(inputs, unlimited(), layout_of);
  ASSERT_TRUE(plan.is_ok());
  EngineOptions options;
  options.model = "synthetic:tiny-qwen2";
  options.progress = false;
  options.run_shape = plan->shape;
  auto engine = Engine::create(options, std::move(*backend));
  ASSERT_TRUE(engine.is_ok()) << engine.status().message();
  EXPECT_EQ((*engine)->weights().resident_bytes(), plan->weight_bytes);
  std::vector<int32_t> prompt(100);
  std::mt19937 rng(3);
  for (auto& id : prompt) id = std::uniform_int_distribution<int32_t>(0, 1023)(rng);
  BatchGenerateParams params;
  params.batch_size = 3;
  params.n_new = 9;
  auto result = (*engine)->generate_batch(prompt, params);
  ASSERT_TRUE(result.is_ok()) << result.status().message();
  EXPECT_EQ(result->tokens[2].size(), 9u);
}

TEST(Planner, ShrinksTheChunkToFitAndFailsWithTheNumbers) {
  auto backend = make_backend("cpu", 2);
  ASSERT_TRUE(backend.is_ok());
  auto spec = weight_spec_of("synthetic:qwen2-0.5b", WeightFormat::sym_int4, true, 32);
  ASSERT_TRUE(spec.is_ok());
  const LayoutOf layout_of = [&](const RunShape& shape) {
    return (*backend)->reserve_layout(spec->config, shape);
  };
  auto total_at = [&](int64_t chunk) {
    PlanInputs inputs = inputs_for(*spec, 2, 2048, 128);
    inputs.prefill_chunk = chunk;
    auto plan = plan_memory(inputs, unlimited(), layout_of);
    EXPECT_TRUE(plan.is_ok());
    EXPECT_EQ(plan->prefill_chunk, chunk);
    return plan->total_bytes();
  };
  const size_t t512 = total_at(512), t128 = total_at(128), t64 = total_at(64), t16 = total_at(16);
  ASSERT_GT(t512, t128);
  ASSERT_GT(t128, t64);
  ASSERT_GT(t64, t16);

  const PlanInputs inputs = inputs_for(*spec, 2, 2048, 128);
  MemoryBudget budget;
  budget.source = "--max-memory 1GB";
  budget.from_flag = true;
  budget.bytes = t64 + (t128 - t64) / 2;  // 128 does not fit, 64 does
  auto shrunk = plan_memory(inputs, budget, layout_of);
  ASSERT_TRUE(shrunk.is_ok()) << shrunk.status().message();
  EXPECT_EQ(shrunk->prefill_chunk, 64);
  EXPECT_EQ(shrunk->total_bytes(), t64);
  EXPECT_EQ(shrunk->budget_bytes, budget.bytes);

  budget.bytes = t512;  // exactly enough
  auto exact = plan_memory(inputs, budget, layout_of);
  ASSERT_TRUE(exact.is_ok());
  EXPECT_EQ(exact->prefill_chunk, 512);

  budget.bytes = t16 - 1;
  auto failed = plan_memory(inputs, budget, layout_of);
  ASSERT_FALSE(failed.is_ok());
  const std::string message = failed.status().message();
  EXPECT_NE(message.find("needs " + format_bytes(t16)), std::string::npos) << message;
  EXPECT_NE(message.find("--max-memory 1GB allows " + format_bytes(t16 - 1)), std::string::npos)
      << message;
  EXPECT_NE(message.find("raise --max-memory"), std::string::npos) << message;
  EXPECT_NE(message.find("prefill chunk 16"), std::string::npos) << message;

  budget.from_flag = false;
  budget.source = "free device memory";
  auto no_memory = plan_memory(inputs, budget, layout_of);
  ASSERT_FALSE(no_memory.is_ok());
  EXPECT_EQ(no_memory.status().message().find("--max-memory"), std::string::npos);
  EXPECT_NE(no_memory.status().message().find("lower batch_size"), std::string::npos);
}

TEST(Planner, BackendsWithoutALayoutCannotBePlanned) {
  auto spec = weight_spec_of("synthetic:tiny-qwen2", WeightFormat::sym_int4, true, 32);
  ASSERT_TRUE(spec.is_ok());
  const LayoutOf no_layout = [](const RunShape&) -> Result<WorkspaceLayout> {
    return Status::error("no layout");
  };
  auto plan = plan_memory(inputs_for(*spec, 1, 8, 8), unlimited(), no_layout);
  ASSERT_FALSE(plan.is_ok());
  EXPECT_EQ(plan.status().message(), "no layout");
}

// EngineOptions::max_memory on synthetic:tiny-qwen2 in sym_int4, named as the CLI names it
// ("--max-memory TEXT"; unnamed for an empty text): two slots of 64 positions, calls of up to 64
// tokens.
EngineOptions capped_tiny(size_t max_memory, const std::string& text) {
  EngineOptions options;
  options.model = "synthetic:tiny-qwen2";
  options.threads = 2;
  options.progress = false;
  options.max_seqs = 2;
  options.max_context = 64;
  options.prefill_chunk = 64;
  options.max_memory = max_memory;
  options.max_memory_text = text.empty() ? "" : "--max-memory " + text;
  return options;
}

// What the engine plans for `options` on a CPU backend: the weights and the reservation's layout.
struct TinyPlan {
  size_t weights = 0;
  RunShape shape;
  LayoutOf layout_of;
  std::unique_ptr<Backend> backend;
  WeightSpec spec;
};

TinyPlan tiny_plan(const EngineOptions& options) {
  TinyPlan plan;
  auto spec = weight_spec_of(options.model, WeightFormat::sym_int4, false, 32);
  EXPECT_TRUE(spec.is_ok());
  plan.spec = *spec;
  plan.weights = planned_weight_bytes(plan.spec);
  plan.shape = requested_shape(options, plan.spec.config, plan.spec.format);
  auto backend = make_backend("cpu", 2);
  EXPECT_TRUE(backend.is_ok());
  plan.backend = std::move(*backend);
  plan.layout_of = [b = plan.backend.get(), config = plan.spec.config](const RunShape& shape) {
    return b->reserve_layout(config, shape);
  };
  return plan;
}

// Bytes the engine plans for `shape` on the plan's model: its weights and the reservation.
size_t planned_bytes(const TinyPlan& plan, const RunShape& shape) {
  auto layout = plan.layout_of(shape);
  EXPECT_TRUE(layout.is_ok()) << layout.status().message();
  return plan.weights + (layout.is_ok() ? layout->total_bytes() : 0);
}

// requested_shape() of `options` with calls of up to `chunk` tokens.
RunShape shape_at_chunk(EngineOptions options, const TinyPlan& plan, int64_t chunk) {
  options.prefill_chunk = chunk;
  return requested_shape(options, plan.spec.config, plan.spec.format);
}

// The tokens per call the engine may try for `options`, largest first: the wanted one, halved
// down to kMinPrefillChunk (wanted chunks here are powers of two, so halving is exact).
std::vector<int64_t> chunk_ladder(const EngineOptions& options, const TinyPlan& plan) {
  std::vector<int64_t> ladder = {
      shape_at_chunk(options, plan, options.prefill_chunk).max_batch_tokens};
  while (ladder.back() > std::max(options.max_seqs, kMinPrefillChunk)) {
    ladder.push_back(shape_at_chunk(options, plan, ladder.back() / 2).max_batch_tokens);
  }
  return ladder;
}

// What a KV pool costs in `shape`'s reservation: the rest of the reservation, and one block.
struct PoolCosts {
  size_t fixed = 0;
  size_t per_block = 0;
};

PoolCosts pool_costs(const TinyPlan& plan, RunShape shape) {
  shape.kv_blocks = 1;
  const WorkspaceLayout one = *plan.layout_of(shape);
  shape.kv_blocks = 2;
  const WorkspaceLayout two = *plan.layout_of(shape);
  return {one.total_bytes() - one.kv_cache_bytes(), two.kv_cache_bytes() - one.kv_cache_bytes()};
}

TEST(MaxMemory, ACapBelowTheWeightsFailsBeforeTheyAreBuilt) {
  auto engine = Engine::create(capped_tiny(1000, "1KB"));
  ASSERT_FALSE(engine.is_ok());
  const std::string message = engine.status().message();
  EXPECT_NE(message.find("synthetic:tiny-qwen2 in sym_int4 needs"), std::string::npos) << message;
  EXPECT_NE(message.find("of weights but --max-memory 1KB allows 1 kB; raise the memory cap"),
            std::string::npos)
      << message;
  // Set through the library without its text, the cap is named by its field and bytes, and no
  // CLI flag appears (library errors name EngineOptions fields).
  auto unnamed = Engine::create(capped_tiny(1000, ""));
  ASSERT_FALSE(unnamed.is_ok());
  EXPECT_NE(unnamed.status().message().find("but max_memory 1 kB allows"), std::string::npos)
      << unnamed.status().message();
  EXPECT_EQ(unnamed.status().message().find("--"), std::string::npos) << unnamed.status().message();
  // The 70B in fp32 (282 GB) is refused from its config: were it built first, the host check
  // would answer instead (or the build would take the host's memory).
  EngineOptions big = capped_tiny(size_t(1) << 30, "1GiB");
  big.model = "synthetic:llama3.1-70b";
  big.format = WeightFormat::fp32;
  auto refused = Engine::create(big);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_NE(refused.status().message().find("of weights but --max-memory 1GiB"), std::string::npos)
      << refused.status().message();
  // Split over two CPU ranks, the host holds both shards: a cap above one shard but below both
  // is refused.
  const TinyPlan plan = tiny_plan(capped_tiny(0, ""));
  auto rank = rank_weight_spec(plan.spec, 2);
  ASSERT_TRUE(rank.is_ok()) << rank.status().message();
  const size_t shard = planned_weight_bytes(*rank);
  EngineOptions split = capped_tiny(shard + shard / 2, "1.5 shards");
  split.tensor_parallel = 2;
  auto split_refused = Engine::create(split);
  ASSERT_FALSE(split_refused.is_ok());
  EXPECT_NE(
      split_refused.status().message().find(format_bytes(2 * shard) + " of weights (its 2 shards)"),
      std::string::npos)
      << split_refused.status().message();
}

TEST(MaxMemory, TheReservationGetsWhatTheCapLeavesBesideTheWeights) {
  const TinyPlan plan = tiny_plan(capped_tiny(0, ""));
  auto layout = plan.layout_of(plan.shape);
  ASSERT_TRUE(layout.is_ok());
  const size_t needed = plan.weights + layout->total_bytes();

  // One byte short: the prefill chunk is halved (64 -> 32 tokens a call) rather than refused
  // (MaxMemory.TheChunkIsHalvedToTheLargestThatFits; refusals below).
  auto short_of_one = Engine::create(capped_tiny(needed - 1, "X"));
  ASSERT_TRUE(short_of_one.is_ok()) << short_of_one.status().message();
  EXPECT_EQ((*short_of_one)->run_shape().max_batch_tokens, 32);

  // Exactly enough: the engine runs with the shape it asked for, without a word, and generates
  // what it generates without a cap.
  auto capped = Engine::create(capped_tiny(needed, "X"));
  ASSERT_TRUE(capped.is_ok()) << capped.status().message();
  EXPECT_EQ((*capped)->run_shape().max_batch_tokens, plan.shape.max_batch_tokens);
  EXPECT_EQ((*capped)->run_shape().max_logit_rows, plan.shape.max_logit_rows);
  EXPECT_TRUE((*capped)->weights().warnings.empty());
  auto uncapped = Engine::create(capped_tiny(0, ""));
  ASSERT_TRUE(uncapped.is_ok()) << uncapped.status().message();
  EXPECT_EQ((*capped)->weights().resident_bytes(), plan.weights);
  auto a = (*capped)->generate_greedy({1, 2, 3}, 8);
  auto b = (*uncapped)->generate_greedy({1, 2, 3}, 8);
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  EXPECT_EQ(a->tokens, b->tokens);

  // A later reserve() is held to the cap less the weights: refused, the old reservation kept.
  RunShape longer = (*capped)->run_shape();
  longer.max_context = 128;
  const Status refused = (*capped)->reserve(longer);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_NE(refused.message().find("(--max-memory X less the weights' " +
                                   format_bytes(plan.weights) + ")"),
            std::string::npos)
      << refused.message();
  EXPECT_NE(refused.message().find("raise the memory cap, or lower the context length "
                                   "(max_context), the tokens per call (prefill_chunk) or the "
                                   "sequences decoded together (max_seqs)"),
            std::string::npos)
      << refused.message();
  EXPECT_EQ((*capped)->max_context(), 64);
  EXPECT_TRUE((*capped)->generate_greedy({1, 2, 3}, 8).is_ok());
  // Without a cap the same reserve() fits the host.
  EXPECT_TRUE((*uncapped)->reserve(longer).is_ok());
}

TEST(MaxMemory, AFittedPoolIsSizedFromTheCap) {
  // As serve sizes its pool: kv_memory_fraction of what the cap leaves beside the weights.
  EngineOptions options = capped_tiny(0, "");
  options.kv_memory_fraction = 0.5;
  const TinyPlan plan = tiny_plan(options);
  const auto [fixed, per_block] = pool_costs(plan, plan.shape);

  // Half of the cap's remainder holds exactly 10 blocks beside the workspace.
  options.max_memory = plan.weights + 2 * (fixed + 10 * per_block);
  options.max_memory_text = "--max-memory T";
  auto engine = Engine::create(options);
  ASSERT_TRUE(engine.is_ok()) << engine.status().message();
  EXPECT_EQ((*engine)->run_shape().pool_blocks(), 10);
  // Without the cap the pool comes from half of the host's available memory: many more blocks
  // (counted here rather than allocated).
  auto available = host_available_memory();
  ASSERT_TRUE(available.is_ok());
  auto uncapped =
      kv_blocks_that_fit(plan.layout_of, plan.shape, {*available, "MemAvailable", false}, 0.5);
  ASSERT_TRUE(uncapped.is_ok()) << uncapped.status().message();
  EXPECT_GT(*uncapped, 10);

  // A cap whose half cannot hold one full context (4 blocks) even beside the smallest workspace
  // (16 tokens a call) is refused, naming it.
  const size_t fixed_16 = pool_costs(plan, shape_at_chunk(options, plan, 16)).fixed;
  options.max_memory = plan.weights + 2 * (fixed_16 + 3 * per_block);
  auto too_small = Engine::create(options);
  ASSERT_FALSE(too_small.is_ok());
  const std::string message = too_small.status().message();
  EXPECT_NE(message.find("cannot hold one full context"), std::string::npos) << message;
  EXPECT_NE(message.find("--max-memory T less the weights' " + format_bytes(plan.weights)),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("raise the memory cap"), std::string::npos) << message;
}

// capped_tiny() under "--max-memory T" with 1 to 3 slots and a wanted chunk of `smallest_chunk`
// times 1, 2, ... 2^(chunk_choices - 1); its cap is the caller's to set.
EngineOptions random_capped_tiny(std::mt19937& rng, int64_t smallest_chunk,
                                 uint32_t chunk_choices) {
  EngineOptions options = capped_tiny(0, "T");
  options.max_seqs = 1 + int64_t(rng() % 3);
  options.prefill_chunk = smallest_chunk << (rng() % chunk_choices);
  return options;
}

std::string described(const EngineOptions& options) {
  return "max_seqs " + std::to_string(options.max_seqs) + ", prefill_chunk " +
         std::to_string(options.prefill_chunk) + ", cap " + std::to_string(options.max_memory);
}

TEST(MaxMemory, ACapThatFitsTheWantedChunkChangesNothing) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 3; ++trial) {
    EngineOptions options = random_capped_tiny(rng, 32, 3);
    const TinyPlan plan = tiny_plan(options);
    const size_t needed = planned_bytes(plan, plan.shape);
    // Anywhere from exactly enough to 10 MB more.
    options.max_memory = needed + rng() % 10000000;
    SCOPED_TRACE(described(options));
    EXPECT_TRUE(check_max_memory(options, *plan.backend).is_ok());
    auto engine = Engine::create(options);
    ASSERT_TRUE(engine.is_ok()) << engine.status().message();
    const RunShape& shape = (*engine)->run_shape();
    EXPECT_EQ(shape.max_batch_tokens, plan.shape.max_batch_tokens);
    EXPECT_EQ(shape.max_logit_rows, plan.shape.max_logit_rows);
    EXPECT_EQ(shape.max_seqs, plan.shape.max_seqs);
    EXPECT_EQ(shape.max_context, plan.shape.max_context);
    EXPECT_TRUE((*engine)->weights().warnings.empty());
  }
}

// DESIGN.md's memory plan: a plan too big for the cap shrinks the prefill chunk, and the engine
// takes the largest of the halvings that fits.
TEST(MaxMemory, TheChunkIsHalvedToTheLargestThatFits) {
  std::mt19937 rng(12);
  for (int trial = 0; trial < 6; ++trial) {
    EngineOptions options = random_capped_tiny(rng, 64, 2);
    const TinyPlan plan = tiny_plan(options);
    const std::vector<int64_t> ladder = chunk_ladder(options, plan);
    ASSERT_GE(ladder.size(), 3u);
    ASSERT_EQ(ladder.back(), kMinPrefillChunk);
    // 1 to 3 halvings: a cap from the need at the rung to one byte below the rung above.
    const size_t halvings = 1 + rng() % std::min<size_t>(3, ladder.size() - 1);
    const size_t fits = planned_bytes(plan, shape_at_chunk(options, plan, ladder[halvings]));
    const size_t above = planned_bytes(plan, shape_at_chunk(options, plan, ladder[halvings - 1]));
    ASSERT_LT(fits, above);
    options.max_memory = fits + rng() % (above - fits);
    SCOPED_TRACE(described(options) + ", " + std::to_string(halvings) + " halvings");

    EXPECT_TRUE(check_max_memory(options, *plan.backend).is_ok());
    auto engine = Engine::create(options);
    ASSERT_TRUE(engine.is_ok()) << engine.status().message();
    const RunShape& shape = (*engine)->run_shape();
    const int64_t chosen = shape.max_batch_tokens;
    EXPECT_EQ(chosen, ladder[halvings]);
    EXPECT_EQ(shape.max_logit_rows, chosen);
    EXPECT_EQ(shape.max_context, plan.shape.max_context);
    EXPECT_EQ(shape.max_seqs, plan.shape.max_seqs);
    // The chosen chunk fits and twice it does not, each counted from the backend's layout.
    EXPECT_LE(planned_bytes(plan, shape), options.max_memory);
    EXPECT_GT(planned_bytes(plan, shape_at_chunk(options, plan, 2 * chosen)), options.max_memory);
    // Said once, among the load's warnings.
    const std::vector<std::string>& warnings = (*engine)->weights().warnings;
    ASSERT_EQ(warnings.size(), 1u);
    EXPECT_EQ(warnings[0], "prefill chunk " + std::to_string(ladder[0]) + " -> " +
                               std::to_string(chosen) +
                               " tokens per call to fit --max-memory T less the weights' " +
                               format_bytes(plan.weights))
        << warnings[0];
  }
}

TEST(MaxMemory, ACapBelowTheSmallestChunkFailsWithItsNumbers) {
  std::mt19937 rng(13);
  for (const int64_t max_seqs : {1, 2}) {
    EngineOptions options = capped_tiny(0, "T");
    options.max_seqs = max_seqs;
    const TinyPlan plan = tiny_plan(options);
    const RunShape smallest = shape_at_chunk(options, plan, kMinPrefillChunk);
    const size_t needed = planned_bytes(plan, smallest);
    // Anywhere from one byte short to 1 MB short (the weights still fit).
    options.max_memory = needed - 1 - rng() % 1000000;
    ASSERT_GT(options.max_memory, plan.weights);
    SCOPED_TRACE("max_seqs " + std::to_string(max_seqs));

    auto engine = Engine::create(options);
    ASSERT_FALSE(engine.is_ok());
    const std::string message = engine.status().message();
    // The numbers of the smallest chunk, the cap, and what to change: the chunk is still one of
    // them (the engine stops at 16, a caller may go lower, the logit rows being most of the
    // tiny plan).
    EXPECT_NE(message.find("needs " + format_bytes(needed) + " (weights " +
                           format_bytes(plan.weights) + " + KV cache"),
              std::string::npos)
        << message;
    EXPECT_NE(message.find(std::to_string(max_seqs) + " sequences x 64 positions"),
              std::string::npos)
        << message;
    EXPECT_NE(message.find("for calls of 16 tokens"), std::string::npos) << message;
    EXPECT_NE(message.find("but --max-memory T allows"), std::string::npos) << message;
    const std::string change =
        max_seqs > 1
            ? "; raise the memory cap, or lower the context length (max_context), the "
              "tokens per call (prefill_chunk) or the sequences decoded together (max_seqs)"
            : "; raise the memory cap, or lower the context length (max_context) or the "
              "tokens per call (prefill_chunk)";
    EXPECT_EQ(message.substr(message.size() - change.size()), change) << message;
    // Library errors name EngineOptions fields: a Python user read -c and -b here.
    EXPECT_EQ(message.find("(-"), std::string::npos) << message;
    // The check made before loading (serve's too) says the same.
    const Status before_load = check_max_memory(options, *plan.backend);
    ASSERT_FALSE(before_load.is_ok());
    EXPECT_EQ(before_load.message(), message);

    // Exactly the smallest chunk's need: the engine runs at 16 tokens a call.
    options.max_memory = needed;
    auto smallest_fits = Engine::create(options);
    ASSERT_TRUE(smallest_fits.is_ok()) << smallest_fits.status().message();
    EXPECT_EQ((*smallest_fits)->run_shape().max_batch_tokens, kMinPrefillChunk);
  }
}

TEST(MaxMemory, ARunShapeSetByTheCallerIsNotShrunk) {
  // The benchmark sets the shape from its own plan (already shrunk to its budget) and records
  // that plan: the engine reserves it as it is, or fails.
  EngineOptions options = capped_tiny(0, "T");
  const TinyPlan plan = tiny_plan(options);
  options.run_shape = plan.shape;
  const size_t needed = planned_bytes(plan, plan.shape);
  options.max_memory = needed - 1;
  auto refused = Engine::create(options);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_NE(refused.status().message().find("for calls of 64 tokens"), std::string::npos)
      << refused.status().message();
  EXPECT_NE(refused.status().message().find(", the tokens per call (prefill_chunk)"),
            std::string::npos)
      << refused.status().message();
  options.max_memory = needed;
  auto engine = Engine::create(options);
  ASSERT_TRUE(engine.is_ok()) << engine.status().message();
  EXPECT_EQ((*engine)->run_shape().max_batch_tokens, plan.shape.max_batch_tokens);
}

TEST(MaxMemory, AFittedPoolShrinksTheChunkItCannotHoldAContextBeside) {
  // As serve sizes its pool: half of what the cap leaves beside the weights. At 64 tokens a call
  // the workspace leaves half of it too little for one context (4 blocks); at 32, 5 blocks.
  EngineOptions options = capped_tiny(0, "T");
  options.kv_memory_fraction = 0.5;
  const TinyPlan plan = tiny_plan(options);
  const auto [fixed_64, per_block] = pool_costs(plan, plan.shape);
  const auto [fixed_32, per_block_32] = pool_costs(plan, shape_at_chunk(options, plan, 32));
  ASSERT_EQ(per_block, per_block_32);
  ASSERT_GT(fixed_64, fixed_32 + per_block);
  options.max_memory = plan.weights + 2 * (fixed_32 + 5 * per_block);
  ASSERT_LT(options.max_memory, plan.weights + 2 * (fixed_64 + 4 * per_block));
  EXPECT_TRUE(check_max_memory(options, *plan.backend).is_ok());
  auto engine = Engine::create(options);
  ASSERT_TRUE(engine.is_ok()) << engine.status().message();
  EXPECT_EQ((*engine)->run_shape().max_batch_tokens, 32);
  EXPECT_EQ((*engine)->run_shape().pool_blocks(), 5);
  ASSERT_EQ((*engine)->weights().warnings.size(), 1u);
  EXPECT_NE((*engine)->weights().warnings[0].find("prefill chunk 64 -> 32 tokens per call"),
            std::string::npos);
}

std::vector<int32_t> prompt_of(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < n; ++i) ids.push_back(int32_t(rng() % 1000));
  return ids;
}

// Every path that chunks a prompt takes the chunk the engine shrank to (a longer call is past
// its reservation, and the backend refuses it), and computes what an engine asked for that
// chunk computes.
TEST(MaxMemory, AShrunkChunkIsTheOneEveryPrefillUses) {
  EngineOptions options = capped_tiny(0, "");
  const TinyPlan plan = tiny_plan(options);
  const size_t at_16 = planned_bytes(plan, shape_at_chunk(options, plan, 16));
  const size_t at_32 = planned_bytes(plan, shape_at_chunk(options, plan, 32));
  options.max_memory = at_16 + (at_32 - at_16) / 2;
  auto shrunk = Engine::create(options);
  ASSERT_TRUE(shrunk.is_ok()) << shrunk.status().message();
  ASSERT_EQ((*shrunk)->run_shape().max_batch_tokens, 16);
  EngineOptions asked = capped_tiny(0, "");
  asked.prefill_chunk = 16;
  auto reference = Engine::create(asked);
  ASSERT_TRUE(reference.is_ok()) << reference.status().message();
  Engine& a = **shrunk;
  Engine& b = **reference;
  const std::vector<int32_t> prompt = prompt_of(40, 5);

  auto greedy_a = a.generate_greedy(prompt, 6);
  auto greedy_b = b.generate_greedy(prompt, 6);
  ASSERT_TRUE(greedy_a.is_ok()) << greedy_a.status().message();
  ASSERT_TRUE(greedy_b.is_ok()) << greedy_b.status().message();
  EXPECT_EQ(greedy_a->tokens, greedy_b->tokens);

  auto logits_a = a.prompt_logits(prompt, 1);
  auto logits_b = b.prompt_logits(prompt, 1);
  ASSERT_TRUE(logits_a.is_ok()) << logits_a.status().message();
  ASSERT_TRUE(logits_b.is_ok()) << logits_b.status().message();
  EXPECT_EQ(*logits_a, *logits_b);

  auto prefill_a = a.prefill(prompt, 0);
  ASSERT_TRUE(prefill_a.is_ok()) << prefill_a.status().message();

  int64_t prefill_calls = 0;
  StepHooks hooks;
  hooks.before = [&](const StepInfo& info) {
    if (info.prefill) {
      ++prefill_calls;
      EXPECT_LE(info.n_tokens, 16) << info.describe();
    }
    return Status::ok();
  };
  const BatchGenerateParams two_copies{2, 1, 4};
  auto batch_a = a.generate_batch(prompt_of(20, 6), two_copies, hooks);
  auto batch_b = b.generate_batch(prompt_of(20, 6), two_copies);
  ASSERT_TRUE(batch_a.is_ok()) << batch_a.status().message();
  ASSERT_TRUE(batch_b.is_ok()) << batch_b.status().message();
  EXPECT_EQ(batch_a->tokens, batch_b->tokens);
  EXPECT_EQ(prefill_calls, 3);  // 2 x 20 prompt tokens in calls of 16

  TokenGenerationParams params;
  params.max_new_tokens = 4;
  params.stop_at_eos = false;
  const std::vector<std::vector<int32_t>> prompts = {prompt_of(30, 7), prompt_of(25, 8)};
  auto tokens_a = generate_tokens(a, prompts, params);
  auto tokens_b = generate_tokens(b, prompts, params);
  ASSERT_TRUE(tokens_a.is_ok()) << tokens_a.status().message();
  ASSERT_TRUE(tokens_b.is_ok()) << tokens_b.status().message();
  EXPECT_EQ(tokens_a->tokens, tokens_b->tokens);

  auto tokenizer =
      Tokenizer::load(std::string(KESTREL_SOURCE_DIR) + "/.cache/tokenizers/qwen3/models");
  ASSERT_TRUE(tokenizer.is_ok()) << tokenizer.status().message();
  TextGenerationParams text_params;
  text_params.max_new_tokens = 4;
  text_params.stop_at_eos = false;
  TextSession session_a(a, *tokenizer);
  TextSession session_b(b, *tokenizer);
  auto text_a = session_a.generate(prompt, text_params, [](const std::string&) {});
  auto text_b = session_b.generate(prompt, text_params, [](const std::string&) {});
  ASSERT_TRUE(text_a.is_ok()) << text_a.status().message();
  ASSERT_TRUE(text_b.is_ok()) << text_b.status().message();
  EXPECT_EQ(text_a->tokens, text_b->tokens);
}

TEST(Planner, StepCostsAndDeadlines) {
  auto spec = weight_spec_of("synthetic:tiny-qwen2", WeightFormat::sym_int4, true, 32);
  ASSERT_TRUE(spec.is_ok());
  const ModelConfig& c = spec->config;
  // tiny-qwen2: 2 layers, kv_dim 64, q_dim 128; a decode step of 3 sequences at context 10.
  const StepCost decode = decode_cost(*spec, 3, 10, 4);
  EXPECT_DOUBLE_EQ(decode.bytes, double(planned_decode_bytes(*spec)) + 3.0 * 10 * 2 * 2 * 64 * 4);
  const double matrix_params = double(layer_matrix_params(c) + c.vocab_size * c.hidden_size);
  EXPECT_DOUBLE_EQ(decode.flops, 2.0 * matrix_params * 3 + 4.0 * 128 * 2 * 10 * 3);
  // A prefill chunk of 4 tokens ending at 6 attends to 3 + 4 + 5 + 6 positions.
  const StepCost prefill = prefill_cost(*spec, 4, 6, 4);
  EXPECT_DOUBLE_EQ(prefill.flops, 2.0 * double(layer_matrix_params(c)) * 4 +
                                      2.0 * double(c.vocab_size * c.hidden_size) +
                                      4.0 * 128 * 2 * (3 + 4 + 5 + 6));
  DeviceProfile profile;
  profile.bandwidth_gbs = 10;
  profile.compute_gflops = 1;
  EXPECT_DOUBLE_EQ(expected_seconds(StepCost{2e9, 1e6}, profile), 0.2);
  EXPECT_DOUBLE_EQ(expected_seconds(StepCost{2e6, 3e9}, profile), 3.0);

  auto cpu = device_profile("cpu", 2);
  ASSERT_TRUE(cpu.is_ok());
  EXPECT_DOUBLE_EQ(cpu->bandwidth_gbs, 31.0);
  EXPECT_TRUE(cpu->host_memory);
  auto cuda = device_profile("cuda", 0);
  ASSERT_TRUE(cuda.is_ok());
  EXPECT_DOUBLE_EQ(cuda->bandwidth_gbs, 3000.0);
  EXPECT_FALSE(cuda->host_memory);
  for (const char* vulkan : {"vulkan", "vulkan:1"}) {
    auto profile = device_profile(vulkan, 0);
    ASSERT_TRUE(profile.is_ok()) << vulkan;
    EXPECT_FALSE(profile->host_memory);
    EXPECT_GT(profile->first_call_s, 0.0);
  }
  EXPECT_FALSE(device_profile("tpu", 0).is_ok());
  EXPECT_FALSE(device_profile("vulkanx", 0).is_ok());
}

TEST(Planner, HostMemoryAndFormatting) {
  auto available = host_available_memory();
  ASSERT_TRUE(available.is_ok()) << available.status().message();
  EXPECT_GT(*available, size_t(1) << 20);
  EXPECT_EQ(format_bytes(1500000000), "1.50 GB");
  EXPECT_EQ(format_bytes(12345678), "12.3 MB");
  EXPECT_EQ(format_bytes(512000), "512 kB");
}

}  // namespace
}  // namespace kestrel
