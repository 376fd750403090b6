// Tensor parallelism on the CPU stand-in (model/shard.h, runtime/tensor_parallel.h,
// backend/host_communicator.h): a model split 2 and 4 ways gives the unsplit model's logits
// within fp32 rounding and the same greedy tokens, on random models of awkward shapes (KV heads
// replicated, a vocabulary that does not divide, a row-parallel bias), on synthetic presets
// through the Engine, and on the HF golden fixtures.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "../golden/hf_fixture.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/host_communicator.h"
#include "core/thread_pool.h"
#include "kestrel/engine.h"
#include "model/forward.h"
#include "model/loader.h"
#include "model/shard.h"
#include "runtime/tensor_parallel.h"

namespace kestrel {
namespace {

// ||a - b|| / ||b|| of each row of [rows, cols], the worst row.
double worst_row_error(const std::vector<float>& a, const std::vector<float>& b, int64_t cols) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  for (size_t row = 0; row * size_t(cols) < std::min(a.size(), b.size()); ++row) {
    double diff = 0, norm = 0;
    for (int64_t i = 0; i < cols; ++i) {
      const double x = a[row * size_t(cols) + size_t(i)], y = b[row * size_t(cols) + size_t(i)];
      diff += (x - y) * (x - y);
      norm += y * y;
    }
    worst = std::max(worst, std::isfinite(diff) ? std::sqrt(diff / norm) : INFINITY);
  }
  return worst;
}

// A random model of `config` in `format`: weights uniform in [-0.5, 0.5] / sqrt(cols), norms
// near 1, biases small.
ModelWeights random_model(const ModelConfig& config, WeightFormat format, uint32_t seed) {
  std::mt19937 rng(seed);
  TensorMaker maker;
  maker.matrix = [&](const TensorInfo& t) -> Result<QuantWeight> {
    QuantWeight w = allocate_weight(format, t.rows, t.cols, 32);
    std::uniform_real_distribution<float> u(-0.5f, 0.5f);
    const float scale = 2.0f / std::sqrt(float(t.cols));
    std::vector<float> row(size_t(t.cols));
    for (int64_t r = 0; r < t.rows; ++r) {
      for (float& v : row) v = u(rng) * scale;
      quantize_row(w, r, row.data());
    }
    return w;
  };
  maker.vector = [&](const TensorInfo& t) -> Result<Blob> {
    Blob b = Blob::allocate(size_t(t.rows) * sizeof(float));
    const bool bias = t.name.ends_with(".bias");
    std::uniform_real_distribution<float> u(bias ? -0.1f : 0.8f, bias ? 0.1f : 1.2f);
    for (int64_t i = 0; i < t.rows; ++i) b.as_mutable<float>()[i] = u(rng);
    return b;
  };
  auto w = build_weights(config, format, 32, maker);
  EXPECT_TRUE(w.is_ok()) << w.status().message();
  return std::move(w).value();
}

// tiny-llama's config with `heads`, `kv_heads`, a vocabulary of `vocab` and o_proj bias.
ModelConfig odd_llama(int64_t heads, int64_t kv_heads, int64_t vocab) {
  ModelConfig c = *synthetic_config("tiny-llama");
  c.n_heads = heads;
  c.n_kv_heads = kv_heads;
  c.head_dim = 32;
  c.hidden_size = 96;
  c.intermediate_size = 256;
  c.vocab_size = vocab;
  c.attention_bias = true;  // Llama: q/k/v and o_proj biases, o_proj's row-parallel
  c.tie_word_embeddings = false;
  return c;
}

constexpr int64_t kContext = 64;

RunShape small_shape() {
  RunShape shape;
  shape.max_seqs = 1;
  shape.max_context = kContext;
  shape.max_batch_tokens = 16;
  shape.max_logit_rows = 16;
  return shape;
}

// One sequence in slot 0 whose block table is 0, 1, 2, ...
struct OneSequence {
  std::vector<int32_t> table;
  OneSequence() {
    for (int32_t b = 0; b < int32_t(small_shape().blocks_per_seq()); ++b) table.push_back(b);
  }
  BlockTables tables() const { return {table.data(), int64_t(table.size())}; }
};

Batch prompt_batch(const std::vector<int32_t>& ids, int32_t first_position) {
  Batch batch;
  for (size_t i = 0; i < ids.size(); ++i) batch.add(ids[i], first_position + int32_t(i), 0, true);
  return batch;
}

std::unique_ptr<TensorParallel> split(const ModelWeights& full, int world) {
  std::vector<std::unique_ptr<Backend>> backends;
  std::vector<ModelWeights> shards;
  for (int r = 0; r < world; ++r) {
    backends.push_back(make_cpu_backend(1));
    auto shard = shard_weights(full, shard_plan(full.config, r, world));
    EXPECT_TRUE(shard.is_ok()) << shard.status().message();
    if (!shard.is_ok()) return nullptr;
    shards.push_back(std::move(shard).value());
  }
  auto tp = TensorParallel::create(full.config, std::move(shards), std::move(backends),
                                   make_host_communicators(world));
  EXPECT_TRUE(tp.is_ok()) << tp.status().message();
  if (!tp.is_ok()) return nullptr;
  EXPECT_TRUE((*tp)->reserve(small_shape()).is_ok());
  return std::move(tp).value();
}

// The worst row error a split may add. fp32: the order of fp32 sums. The integer formats
// quantize each matmul's input to int8 (groups of 32, as the CPU backend does): a difference in
// the last bit can move one value across a rounding boundary, a step of 1/127 of its group's
// largest value, which moves a row's logits by up to ~1e-2 on these tiny models (measured 1.5e-2
// on tiny-qwen2 from position 14 on). A sharding mistake moves them by O(1).
double bound(WeightFormat format) {
  return format == WeightFormat::fp32 ? 1e-5 : 5e-2;
}

// Logits of a prompt (two calls, so the second reads the KV cache the first wrote) and 6 greedy
// tokens after it, unsplit and split, compared.
void expect_split_matches(const ModelWeights& full, int world, double bound) {
  SCOPED_TRACE("world " + std::to_string(world));
  const int64_t vocab = full.config.vocab_size;
  std::vector<int32_t> prompt;
  std::mt19937 rng(7);
  for (int i = 0; i < 11; ++i) prompt.push_back(int32_t(rng() % uint32_t(vocab)));
  const std::vector<int32_t> first(prompt.begin(), prompt.begin() + 6);
  const std::vector<int32_t> second(prompt.begin() + 6, prompt.end());
  OneSequence seq;

  std::unique_ptr<Backend> cpu = make_cpu_backend(1);
  ModelWeights whole = full;
  ASSERT_TRUE(cpu->upload(whole).is_ok());
  ASSERT_TRUE(cpu->reserve(whole.config, small_shape()).is_ok());
  auto tp = split(full, world);
  ASSERT_NE(tp, nullptr);

  for (const auto* part : {&first, &second}) {
    const int32_t at = part == &first ? 0 : int32_t(first.size());
    std::vector<float> want, got;
    ASSERT_TRUE(forward(*cpu, whole, prompt_batch(*part, at), seq.tables(), &want).is_ok());
    const Status s = tp->forward(prompt_batch(*part, at), seq.tables(), &got);
    ASSERT_TRUE(s.is_ok()) << s.message();
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LT(worst_row_error(got, want, vocab), bound);
    // The same call again (its KV writes are the same values) with every row's argmax and two
    // rows whole, out of order, as a server step asks for them: the rows are the call's own, bit
    // for bit, on one rank and split, and the argmax is row_argmax of the rows.
    const std::vector<int32_t> full_rows{int32_t(part->size()) - 1, 0};
    for (const bool on_ranks : {false, true}) {
      SCOPED_TRACE(on_ranks ? "split" : "whole");
      const std::vector<float>& all = on_ranks ? got : want;
      std::vector<int32_t> tokens;
      std::vector<float> rows;
      const Status r = on_ranks ? tp->forward_argmax(prompt_batch(*part, at), seq.tables(), &tokens,
                                                     full_rows, &rows)
                                : forward_argmax(*cpu, whole, prompt_batch(*part, at), seq.tables(),
                                                 &tokens, full_rows, &rows);
      ASSERT_TRUE(r.is_ok()) << r.message();
      ASSERT_EQ(tokens.size(), part->size());
      ASSERT_EQ(rows.size(), full_rows.size() * size_t(vocab));
      for (size_t i = 0; i < tokens.size(); ++i) {
        EXPECT_EQ(tokens[i], row_argmax(all.data() + int64_t(i) * vocab, vocab)) << "row " << i;
      }
      for (size_t i = 0; i < full_rows.size(); ++i) {
        EXPECT_TRUE(std::equal(rows.begin() + int64_t(i) * vocab,
                               rows.begin() + int64_t(i + 1) * vocab,
                               all.begin() + int64_t(full_rows[i]) * vocab))
            << "row " << full_rows[i];
      }
    }
  }
  // Greedy decoding from there, one token a step, argmax gathered across the ranks.
  std::vector<int32_t> want_token{0}, got_token{0};
  ASSERT_TRUE(forward_argmax(*cpu, whole, prompt_batch({prompt.back()}, int32_t(prompt.size()) - 1),
                             seq.tables(), &want_token)
                  .is_ok());
  ASSERT_TRUE(tp->forward_argmax(prompt_batch({prompt.back()}, int32_t(prompt.size()) - 1),
                                 seq.tables(), &got_token)
                  .is_ok());
  for (int32_t step = 0; step < 6; ++step) {
    ASSERT_EQ(got_token, want_token) << "step " << step;
    const int32_t at = int32_t(prompt.size()) + step;
    ASSERT_TRUE(forward_argmax(*cpu, whole, prompt_batch(want_token, at), seq.tables(), &want_token)
                    .is_ok());
    ASSERT_TRUE(tp->forward_argmax(prompt_batch(got_token, at), seq.tables(), &got_token).is_ok());
  }
}

TEST(TensorParallelShard, ChecksTheSplit) {
  const ModelConfig c = odd_llama(6, 2, 500);
  EXPECT_TRUE(check_tensor_parallel(c, 1, WeightFormat::sym_int4, 32).is_ok());
  EXPECT_TRUE(check_tensor_parallel(c, 2, WeightFormat::sym_int4, 32).is_ok());
  // 6 heads over 4 ranks.
  EXPECT_NE(check_tensor_parallel(c, 4, WeightFormat::fp32, 32).message().find("attention heads"),
            std::string::npos);
  // 2 KV heads over 3 ranks: rank 1's query heads would straddle both.
  EXPECT_NE(check_tensor_parallel(c, 3, WeightFormat::fp32, 32).message().find("KV heads"),
            std::string::npos);
  // Each rank's q_dim is 3 x 32 = 96 columns of wo: not whole blocks of 64.
  ModelConfig narrow = c;
  EXPECT_NE(check_tensor_parallel(narrow, 2, WeightFormat::sym_int4, 64).message().find("block"),
            std::string::npos);
  EXPECT_TRUE(check_tensor_parallel(narrow, 2, WeightFormat::fp16, 64).is_ok());
  narrow.intermediate_size = 251;
  EXPECT_NE(check_tensor_parallel(narrow, 2, WeightFormat::fp32, 32).message().find("intermediate"),
            std::string::npos);
  EXPECT_FALSE(check_tensor_parallel(c, 0, WeightFormat::fp32, 32).is_ok());
  EXPECT_FALSE(check_tensor_parallel(c, kMaxTensorParallel + 1, WeightFormat::fp32, 32).is_ok());
}

TEST(TensorParallelShard, PlansCoverTheModelOnce) {
  const ModelConfig c = odd_llama(8, 2, 1001);
  for (int world : {2, 4, 8}) {
    int64_t tokens = 0, heads = 0;
    std::vector<int> kv_users(size_t(c.n_kv_heads), 0);
    for (int r = 0; r < world; ++r) {
      const ShardPlan p = shard_plan(c, r, world);
      EXPECT_EQ(p.first_token, tokens);
      tokens += p.real_vocab;
      heads += p.heads;
      EXPECT_EQ(p.kv_replicated, world > c.n_kv_heads);
      // Every query head of the rank uses one of the rank's KV heads.
      const int64_t group = c.n_heads / c.n_kv_heads;
      for (int64_t h = r * p.heads; h < (r + 1) * p.heads; ++h) {
        EXPECT_GE(h / group, p.first_kv_head);
        EXPECT_LT(h / group, p.first_kv_head + p.kv_heads);
      }
      for (int64_t k = 0; k < p.kv_heads; ++k) ++kv_users[size_t(p.first_kv_head + k)];
      // A token of another rank looks up the zero row.
      EXPECT_EQ(shard_token(p, int32_t(p.first_token + p.real_vocab)), int32_t(p.vocab));
    }
    EXPECT_EQ(tokens, c.vocab_size);
    EXPECT_EQ(heads, c.n_heads);
    for (int users : kv_users) EXPECT_EQ(users, std::max(1, world / int(c.n_kv_heads)));
  }
}

TEST(TensorParallelShard, ShardsHoldTheWholeModelsBlocks) {
  const ModelWeights full = random_model(odd_llama(4, 2, 300), WeightFormat::asym_int4, 3);
  const ShardPlan p = shard_plan(full.config, 1, 2);
  auto shard = shard_weights(full, p);
  ASSERT_TRUE(shard.is_ok()) << shard.status().message();
  // Row-parallel w_down: rank 1 holds the second half of each row, dequantized alike.
  const QuantWeight& whole = full.layers[1].w_down.w;
  const QuantWeight& part = shard->layers[1].w_down.w;
  ASSERT_EQ(part.cols * 2, whole.cols);
  std::vector<float> a(size_t(whole.cols)), b(size_t(part.cols));
  for (int64_t r = 0; r < whole.rows; ++r) {
    dequantize_row(whole, r, a.data());
    dequantize_row(part, r, b.data());
    for (int64_t i = 0; i < part.cols; ++i) ASSERT_EQ(b[size_t(i)], a[size_t(part.cols + i)]);
  }
  // Vocabulary-parallel embedding: rank 1's row 0 is token 150; its last row is zeros.
  dequantize_row(full.tok_embd, 150, a.data());
  std::vector<float> c(size_t(full.config.hidden_size));
  dequantize_row(shard->tok_embd, 0, c.data());
  for (int64_t i = 0; i < full.config.hidden_size; ++i) EXPECT_EQ(c[size_t(i)], a[size_t(i)]);
  dequantize_row(shard->tok_embd, p.vocab, c.data());
  for (float v : c) EXPECT_EQ(v, 0.0f);
  // o_proj's bias is added once: on rank 0.
  for (int64_t i = 0; i < full.config.hidden_size; ++i) {
    EXPECT_EQ(shard->layers[0].wo.bias.as<float>()[i], 0.0f);
  }
}

// Every tensor's bytes (data, scales, mins, bias; norms), in tensor-list order.
std::vector<std::string> tensor_bytes(const ModelWeights& w) {
  std::vector<std::string> out;
  auto bytes = [](const Blob& b) { return std::string(b.as<char>(), b.size()); };
  (void)for_each_tensor(w, [&](const TensorInfo& t, const auto& m) -> Status {
    using Member = std::remove_cvref_t<decltype(m)>;
    if constexpr (std::is_same_v<Member, QuantWeight>) {
      out.push_back(t.name + bytes(m.data) + bytes(m.scales) + bytes(m.mins));
    } else if constexpr (std::is_same_v<Member, Linear>) {
      out.push_back(t.name + bytes(m.w.data) + bytes(m.w.scales) + bytes(m.w.mins) + bytes(m.bias));
    } else {
      out.push_back(t.name + bytes(m.data));
    }
    return Status::ok();
  });
  return out;
}

TEST(TensorParallelShard, CheckpointShardsEqualCutShards) {
  // An HF checkpoint converts straight into each rank's rows; the result must be the blocks
  // that cutting the whole converted model gives (qwen2: q/k/v biases, tied embeddings).
  const std::string dir = std::string(KESTREL_SOURCE_DIR) + "/tests/golden/models/qwen2-tied-f32";
  for (WeightFormat format : {WeightFormat::asym_int4, WeightFormat::fp16}) {
    SCOPED_TRACE(format_name(format));
    LoadOptions options;
    options.format = format;
    options.format_explicit = true;
    options.progress = false;
    ThreadPool pool(2);
    auto whole = load_model(dir, options, pool);
    auto sharded = load_model_shards(dir, options, pool, 2);
    ASSERT_TRUE(whole.is_ok() && sharded.is_ok()) << sharded.status().message();
    EXPECT_EQ(sharded->whole.config.n_heads, whole->config.n_heads);
    ASSERT_EQ(sharded->shards.size(), 2u);
    for (int r = 0; r < 2; ++r) {
      auto cut = shard_weights(*whole, shard_plan(whole->config, r, 2));
      ASSERT_TRUE(cut.is_ok());
      EXPECT_EQ(tensor_bytes(sharded->shards[size_t(r)]), tensor_bytes(*cut)) << "rank " << r;
    }
  }
  // A split that does not divide fails before anything is converted, naming the number.
  LoadOptions options;
  options.progress = false;
  ThreadPool pool(2);
  auto refused = load_model_shards(dir, options, pool, 3);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_NE(refused.status().message().find("attention heads"), std::string::npos);
}

TEST(HostCommunicator, SumsInRankOrderOnEveryRank) {
  constexpr int kWorld = 3;
  auto comms = make_host_communicators(kWorld);
  // Values whose fp32 sum depends on the order: only rank order gives `want` exactly.
  const float values[kWorld] = {1e8f, -1e8f, 1.0f};
  const float want = (values[0] + values[1]) + values[2];
  std::vector<std::vector<float>> data(kWorld);
  std::vector<std::thread> threads;
  std::vector<Status> results(kWorld);
  for (int r = 0; r < kWorld; ++r) {
    data[size_t(r)].assign(40, values[r]);
    threads.emplace_back([&, r] {
      Tensor t{data[size_t(r)].data(), 4, 10};
      for (int repeat = 0; repeat < 3 && results[size_t(r)].is_ok(); ++repeat) {
        data[size_t(r)].assign(40, values[r]);
        results[size_t(r)] = comms[size_t(r)]->all_reduce_sum(t);
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < kWorld; ++r) {
    ASSERT_TRUE(results[size_t(r)].is_ok()) << results[size_t(r)].message();
    for (float v : data[size_t(r)]) ASSERT_EQ(v, want);
  }
}

TEST(HostCommunicator, AbortReleasesWaitingRanksAndResetRecovers) {
  auto comms = make_host_communicators(2);
  Status waited;
  std::thread waiter([&] { waited = comms[1]->barrier(); });
  comms[0]->abort(Status::error("rank 0 failed"));
  waiter.join();
  EXPECT_EQ(waited.message(), "rank 0 failed");
  EXPECT_FALSE(comms[0]->barrier().is_ok());
  for (auto& c : comms) ASSERT_TRUE(c->reset().is_ok());
  Status other;
  std::thread again([&] { other = comms[1]->barrier(); });
  EXPECT_TRUE(comms[0]->barrier().is_ok());
  again.join();
  EXPECT_TRUE(other.is_ok());
}

TEST(TensorParallel, RandomModelsSplitLikeTheWhole) {
  // KV heads split (4 over 2), replicated (2 over 4), one KV head over 2; vocabulary 1001 does
  // not divide; Llama o_proj bias (row-parallel) everywhere.
  struct Case {
    int64_t heads, kv_heads;
    int world;
  };
  for (const Case& k : {Case{4, 4, 2}, Case{4, 2, 4}, Case{4, 1, 2}}) {
    for (WeightFormat format : {WeightFormat::fp32, WeightFormat::sym_int4}) {
      SCOPED_TRACE(std::string(format_name(format)) + " heads " + std::to_string(k.heads) + " kv " +
                   std::to_string(k.kv_heads));
      const ModelWeights full = random_model(odd_llama(k.heads, k.kv_heads, 1001), format, 5);
      expect_split_matches(full, k.world, bound(format));
    }
  }
}

TEST(TensorParallel, BadTokenFailsOnEveryRankAndTheGroupRecovers) {
  const ModelWeights full = random_model(odd_llama(4, 2, 300), WeightFormat::fp32, 9);
  auto tp = split(full, 2);
  ASSERT_NE(tp, nullptr);
  OneSequence seq;
  std::vector<float> logits;
  const Status bad = tp->forward(prompt_batch({1, 300}, 0), seq.tables(), &logits);
  EXPECT_NE(bad.message().find("outside the vocabulary of 300"), std::string::npos)
      << bad.message();
  // A position past the reservation fails inside every rank's begin_batch; later calls work.
  EXPECT_FALSE(tp->forward(prompt_batch({1}, int32_t(kContext)), seq.tables(), &logits).is_ok());
  EXPECT_TRUE(tp->forward(prompt_batch({1, 2}, 0), seq.tables(), &logits).is_ok());
  EXPECT_EQ(logits.size(), size_t(2 * 300));
}

// Through the Engine, as the CLI runs it: prompt logits (in chunks of 16, so the ranks' KV
// caches are read back across calls) and greedy generation.
std::unique_ptr<Engine> engine_for(const std::string& model, WeightFormat format, int ranks) {
  return hf_fixture::cpu_engine(model, format, ranks);
}

TEST(TensorParallel, SyntheticPresetsThroughTheEngine) {
  // tiny-qwen2: 4 heads, 2 KV heads (split over 2, replicated over 4); tiny-llama: 1 KV head.
  struct Case {
    const char* model;
    int ranks;
  };
  for (const Case& k : {Case{"synthetic:tiny-qwen2", 2}, Case{"synthetic:tiny-qwen2", 4},
                        Case{"synthetic:tiny-llama", 2}}) {
    for (WeightFormat format : {WeightFormat::fp32, WeightFormat::sym_int4}) {
      SCOPED_TRACE(std::string(k.model) + " x" + std::to_string(k.ranks) + " " +
                   format_name(format));
      auto whole = engine_for(k.model, format, 1);
      auto split = engine_for(k.model, format, k.ranks);
      ASSERT_TRUE(whole && split);
      EXPECT_EQ(split->info().tensor_parallel, k.ranks);
      EXPECT_GT(split->info().weight_bytes, whole->info().weight_bytes);  // + zero rows, norms
      std::vector<int32_t> prompt;
      for (int i = 0; i < 19; ++i) prompt.push_back(100 + 37 * i);
      auto want = whole->prompt_logits(prompt);
      auto got = split->prompt_logits(prompt);
      ASSERT_TRUE(want.is_ok() && got.is_ok()) << got.status().message();
      EXPECT_LT(worst_row_error(*got, *want, whole->config().vocab_size), bound(format));
      auto want_greedy = whole->generate_greedy(prompt, 8);
      auto got_greedy = split->generate_greedy(prompt, 8);
      ASSERT_TRUE(want_greedy.is_ok() && got_greedy.is_ok());
      EXPECT_EQ(got_greedy->tokens, want_greedy->tokens);
    }
  }
}

TEST(TensorParallel, EngineRefusesSplitsThatDoNotDivide) {
  EngineOptions options;
  options.model = "synthetic:tiny-llama";  // intermediate 320: 80 a rank over 4, not blocks of 32
  options.threads = 2;
  options.progress = false;
  options.max_context = 64;
  options.tensor_parallel = 4;
  auto engine = Engine::create(options);
  ASSERT_FALSE(engine.is_ok());
  EXPECT_NE(engine.status().message().find("block 32"), std::string::npos)
      << engine.status().message();
  options.tensor_parallel = 0;
  EXPECT_FALSE(Engine::create(options).is_ok());
}

class TensorParallelGolden : public ::testing::TestWithParam<const char*> {};

// The HF fixtures in fp32, split 2 and 4 ways: the same logits as unsplit within fp32 rounding,
// HF's within the golden test's bound, and HF's greedy continuation.
TEST_P(TensorParallelGolden, Fp32SplitMatchesUnsplitAndHf) {
  const hf_fixture::Fixture f = hf_fixture::load(GetParam());
  auto whole = engine_for(f.dir, WeightFormat::fp32, 1);
  ASSERT_NE(whole, nullptr);
  auto want = whole->prompt_logits(f.prompt);
  ASSERT_TRUE(want.is_ok());
  for (int ranks : {2, 4}) {
    SCOPED_TRACE("x" + std::to_string(ranks));
    auto split = engine_for(f.dir, WeightFormat::fp32, ranks);
    ASSERT_NE(split, nullptr);
    auto got = split->prompt_logits(f.prompt);
    ASSERT_TRUE(got.is_ok()) << got.status().message();
    EXPECT_LT(worst_row_error(*got, *want, f.vocab), 1e-5);
    EXPECT_LE(hf_fixture::compare(*got, f.logits, f.vocab).max_rel_error, 1e-3);
    auto greedy = split->generate_greedy(f.prompt, int64_t(f.greedy.size()));
    ASSERT_TRUE(greedy.is_ok());
    EXPECT_EQ(greedy->tokens, f.greedy);
  }
}

// The two fixtures whose heads split 2 and 4 ways (llama-tied-bias-f16 has 6 heads, 3 KV heads).
INSTANTIATE_TEST_SUITE_P(Models, TensorParallelGolden,
                         ::testing::Values("qwen2-tied-f32", "llama3-scaled-bf16-sharded"),
                         [](const auto& info) { return hf_fixture::param_name(info.param); });

}  // namespace
}  // namespace kestrel
