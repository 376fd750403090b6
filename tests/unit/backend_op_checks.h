// Op scenarios every device backend runs against the CPU (tests/cuda, tests/vulkan), each with
// the device's bound; the harness is backend_test_util.h.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <ostream>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "backend_test_util.h"
#include "core/argmax.h"
#include "sample/sampler.h"

namespace kestrel::backend_test {

// A model of one layer whose logits are `vocab` wide (a fixture's reservation holds logits of a
// 50-token vocabulary; the argmax and read-back checks need a real one).
inline ModelWeights one_layer_model(int64_t vocab) {
  ModelWeights big;
  big.config = small_config(64, 64, 1, 1, 64, vocab);
  big.config.n_layers = 1;
  big.layers.resize(1);
  return big;
}

// Runs each(backend, t, i) on the CPU (i 0) and then the device (i 1) of `pair`, with t a
// scratch tensor [n, cols] holding `values`, in a call of n tokens.
template <typename Each>
void on_both_backends(BackendPair& pair, const std::vector<float>& values, int64_t n, int64_t cols,
                      Each each) {
  int i = 0;
  for (Backend* b : {pair.cpu.get(), pair.gpu.get()}) {
    std::vector<int32_t> meta;
    ASSERT_TRUE(b->begin_batch(pair.paged(batch_of(n, meta))).is_ok());
    auto t = b->scratch(n, cols);
    ASSERT_TRUE(t.is_ok());
    fill(*b, *t, values);
    each(*b, *t, i++);
  }
}

// argmax_rows on a real vocabulary's width: ties go to the lower index, maxima at both ends.
inline void check_argmax_rows_first_of_ties() {
  const int64_t n = 5, cols = 151936;
  std::vector<float> v = random_values(size_t(n * cols), 51);
  v[size_t(0 * cols + 70000)] = 50.0f;
  v[size_t(0 * cols + 90000)] = 50.0f;  // tie: the lower index wins
  v[size_t(1 * cols + cols - 1)] = 60.0f;
  v[size_t(2 * cols + 0)] = 60.0f;
  std::vector<int32_t> results[2];
  ModelWeights big = one_layer_model(cols);
  BackendPair pair;
  ASSERT_TRUE(pair.init(big, RunShape{1, 16, 8, 8}));
  on_both_backends(pair, v, n, cols, [&](Backend& b, Tensor t, int i) {
    results[i].assign(size_t(n), -1);
    ASSERT_TRUE(b.argmax_rows(t, results[i].data()).is_ok());
  });
  EXPECT_EQ(results[1], results[0]);
  EXPECT_EQ(results[1][0], 70000);
  EXPECT_EQ(results[1][1], cols - 1);
  EXPECT_EQ(results[1][2], 0);
}

// A server step reads back only the rows its host samplers need (Backend::read_rows): a run of
// consecutive rows in one copy, in the order asked, bit for bit; 6 rows fit a device's staging
// for 16 rows of the vocabulary, 24 do not. Its greedy rows take the device's argmax instead
// of the host's pick, so rows where NaN comes first follow the host's rule (core/argmax.h).
inline void check_read_rows_and_nan_argmax() {
  const int64_t cols = 1000, n = 24;
  ModelWeights big = one_layer_model(cols);
  BackendPair pair;
  ASSERT_TRUE(pair.init(big, RunShape{1, 32, 32, 32}));
  std::vector<float> v = random_values(size_t(n * cols), 91);
  auto row = [&](int64_t r) { return v.begin() + r * cols; };
  std::fill(row(0), row(1), -INFINITY);  // NaN first, -inf, one finite value
  v[0] = NAN;
  v[size_t(cols / 2)] = -3.0f;
  std::fill(row(1), row(2), -INFINITY);  // NaN first, then nothing but -inf
  v[size_t(cols)] = NAN;
  std::fill(row(2), row(3), NAN);                             // nothing but NaN
  for (int64_t c = 0; c < cols; c += 3) *(row(3) + c) = NAN;  // NaN among values

  const std::vector<int32_t> few = {5, 6, 7, 2, 23, 22};
  // Every row once, in runs of consecutive rows (a copy each) and single rows.
  const std::vector<int32_t> many = {10, 11, 12, 13, 0,  1,  23, 5,  6,  7,  8,  9,
                                     2,  3,  4,  14, 15, 16, 17, 18, 19, 20, 21, 22};
  ASSERT_EQ(many.size(), size_t(n));
  std::vector<int32_t> tokens[2];
  std::vector<float> read_few[2], read_many[2];
  on_both_backends(pair, v, n, cols, [&](Backend& b, Tensor t, int i) {
    tokens[i].assign(size_t(n), -1);
    ASSERT_TRUE(b.argmax_rows(t, tokens[i].data()).is_ok());
    read_few[i].assign(few.size() * size_t(cols), 1.0f);
    read_many[i].assign(many.size() * size_t(cols), 1.0f);
    Status s = b.read_rows(t, few, read_few[i].data());
    ASSERT_TRUE(s.is_ok()) << s.message();
    s = b.read_rows(t, many, read_many[i].data());
    ASSERT_TRUE(s.is_ok()) << s.message();
  });
  EXPECT_EQ(tokens[1], tokens[0]);
  for (int64_t r = 0; r < n; ++r) EXPECT_EQ(tokens[0][size_t(r)], row_argmax(&*row(r), cols));
  EXPECT_EQ(tokens[0][0], cols / 2);
  EXPECT_EQ(tokens[0][1], 1);
  EXPECT_EQ(tokens[0][2], 0);
  // Bit for bit (NaN included), and the rows themselves.
  EXPECT_EQ(std::memcmp(read_few[1].data(), read_few[0].data(), read_few[0].size() * 4), 0);
  EXPECT_EQ(std::memcmp(read_many[1].data(), read_many[0].data(), read_many[0].size() * 4), 0);
  for (size_t k = 0; k < many.size(); ++k) {
    EXPECT_EQ(std::memcmp(read_many[0].data() + k * size_t(cols), &*row(many[k]), size_t(cols) * 4),
              0)
        << "row " << many[k];
  }
}

// Sampled rows drawn by the backend (Backend::pick_rows) against the host sampler's rule
// (Sampler::pick) on the same values, token for token: rows flat, peaked, with ties, with NaN,
// -inf and +inf, of nothing but NaN or -inf (the argmax fallback), all equal, spread so wide
// that most tokens round to no mass, with signed zeros at the top-k bar; settings across
// temperature, top-k (below, at and past the row's valid tokens), top-p (down to keeping one
// token), min-p and a vocabulary narrower than the row; uniform numbers at both ends. More rows
// than one launch draws, in no order, the others keeping their argmax; twice (the workspace
// reused); and the checks on the draws.
inline void check_pick_rows_draw_as_the_host_sampler(int64_t cols, uint64_t seed) {
  const int64_t n = 21;
  ModelWeights big = one_layer_model(cols);
  BackendPair pair;
  ASSERT_TRUE(pair.init(big, RunShape{1, 32, 32, 32}));
  std::mt19937_64 rng(seed);
  auto uniform = [&] { return double(rng() >> 11) * 0x1.0p-53; };
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    std::vector<float> v = random_values(size_t(n * cols), seed + uint64_t(round));
    for (int64_t r = 0; r < n; ++r) {
      float* row = v.data() + r * cols;
      switch ((r + round) % 9) {
        case 0:
          break;  // flat
        case 1:   // peaked
          for (int j = 0; j < 20; ++j) row[(j * 7919 + r) % cols] += 12.0f;
          break;
        case 2:  // few distinct values: ties everywhere
          for (int64_t c = 0; c < cols; ++c) row[c] = std::round(row[c] * 4.0f) / 4.0f;
          break;
        case 3:  // NaN, -inf and +inf among values
          for (int64_t c = 0; c < cols; c += 5) row[c] = c % 2 ? NAN : -INFINITY;
          row[cols / 2] = INFINITY;
          break;
        case 4:  // nothing but NaN, or NaN and -inf: no candidate
          for (int64_t c = 0; c < cols; ++c) row[c] = (round == 0 || c % 3) ? NAN : -INFINITY;
          break;
        case 5:
          std::fill(row, row + cols, 1.5f);
          break;  // all equal
        case 6:   // wide: most tokens carry no mass
          for (int64_t c = 0; c < cols; ++c) row[c] *= 40.0f;
          break;
        case 7:  // signed zeros at the top
          for (int64_t c = 0; c < cols; ++c) row[c] = -std::fabs(row[c]) - 1.0f;
          for (int64_t c = 0; c < cols; c += 3) row[c] = c % 2 ? -0.0f : 0.0f;
          break;
        default:  // small logits at a low temperature
          for (int64_t c = 0; c < cols; ++c) row[c] *= 0.01f;
          break;
      }
    }
    const float temperatures[] = {0.05f, 0.25f, 0.7f, 1.0f, 1.5f, 5.0f};
    const int top_ks[] = {0, 0, 2, 50, 1000, int(cols) - 1, int(cols) + 3};
    const float top_ps[] = {1.0f, 1.0f, 0.95f, 0.5f, 0.01f, 1e-7f, 0.999f};
    const float min_ps[] = {0.0f, 0.0f, 0.05f, 0.5f};
    std::vector<RowDraw> draws;
    for (int64_t r = 0; r < n; ++r) {
      if (r % 5 == 4) continue;  // keeps its argmax
      RowDraw d;
      d.row = int32_t(r);
      d.params.temperature = temperatures[rng() % std::size(temperatures)];
      d.params.top_k = top_ks[rng() % std::size(top_ks)];
      if (d.params.top_k == 1) d.params.top_k = 2;
      d.params.top_p = top_ps[rng() % std::size(top_ps)];
      d.params.min_p = min_ps[rng() % std::size(min_ps)];
      d.vocab_size = int32_t(rng() % 4 == 0 ? cols - std::min<int64_t>(5, cols - 1) : cols);
      d.u = r == 0 ? 0.0 : r == 1 ? 1.0 - 0x1.0p-53 : uniform();
      draws.push_back(d);
    }
    std::shuffle(draws.begin(), draws.end(), rng);
    ASSERT_GT(draws.size(), size_t(16));  // more than one launch of the CUDA sampler
    std::vector<int32_t> tokens[2];
    on_both_backends(pair, v, n, cols, [&](Backend& b, Tensor t, int i) {
      tokens[i].assign(size_t(n), -1);
      const Status s = b.pick_rows(t, draws, tokens[i].data());
      ASSERT_TRUE(s.is_ok()) << s.message();
      // The same draws queued (start_argmax, as a step run ahead queues them) come back alike.
      std::vector<int32_t> queued;
      Status q = b.start_argmax(t, draws);
      ASSERT_TRUE(q.is_ok()) << q.message();
      q = b.finish_argmax(&queued);
      ASSERT_TRUE(q.is_ok()) << q.message();
      EXPECT_EQ(queued, tokens[i]) << "backend " << i << ": start_argmax against pick_rows";
    });
    std::vector<int32_t> want(static_cast<size_t>(n));
    for (int64_t r = 0; r < n; ++r) want[size_t(r)] = row_argmax(v.data() + r * cols, cols);
    for (const RowDraw& d : draws) {
      const std::span<const float> row(v.data() + int64_t(d.row) * cols, size_t(cols));
      want[size_t(d.row)] = Sampler::pick(row, d.params, d.vocab_size, d.u);
    }
    for (int64_t r = 0; r < n; ++r) {
      SCOPED_TRACE("row " + std::to_string(r));
      EXPECT_EQ(tokens[0][size_t(r)], want[size_t(r)]);
      EXPECT_EQ(tokens[1][size_t(r)], want[size_t(r)]);
    }
  }
  // The draws are checked before anything runs.
  std::vector<int32_t> meta;
  Backend& b = *pair.gpu;
  ASSERT_TRUE(b.begin_batch(pair.paged(batch_of(2, meta))).is_ok());
  auto t = b.scratch(2, cols);
  ASSERT_TRUE(t.is_ok());
  std::vector<int32_t> out(2);
  RowDraw d;
  d.params.temperature = 1.0f;
  d.vocab_size = int32_t(cols);
  d.row = 2;
  EXPECT_NE(b.pick_rows(*t, std::vector<RowDraw>{d}, out.data()).message().find("row 2 of"),
            std::string::npos);
  d.row = 1;
  EXPECT_NE(b.pick_rows(*t, std::vector<RowDraw>{d, d}, out.data()).message().find("twice"),
            std::string::npos);
  d.params.temperature = 0.0f;
  EXPECT_NE(b.pick_rows(*t, std::vector<RowDraw>{d}, out.data()).message().find("greedy"),
            std::string::npos);
  d.params.temperature = 1.0f;
  d.u = 1.0;
  EXPECT_NE(b.pick_rows(*t, std::vector<RowDraw>{d}, out.data()).message().find("[0, 1)"),
            std::string::npos);
  // start_argmax checks them alike, and queues nothing then.
  d.u = 0.5;
  d.row = 2;
  EXPECT_NE(b.start_argmax(*t, std::vector<RowDraw>{d}).message().find("row 2 of"),
            std::string::npos);
  std::vector<int32_t> none;
  EXPECT_NE(b.finish_argmax(&none).message().find("no argmax queued"), std::string::npos);
}

// rope at positions up to 4096, plain or with Llama 3 scaling (`llama3`); within `bound` of the
// CPU's.
inline void check_rope_at_large_positions(bool llama3, double bound) {
  ModelWeights weights;
  weights.config = small_config(256, 256, 4, 2, 64, 16);
  weights.config.n_layers = 1;
  if (llama3) {
    weights.config.rope_theta = 500000.0;
    weights.config.rope_scaling = RopeScaling{RopeType::llama3, 8.0, 1.0, 4.0, 512};
  }
  weights.layers.resize(1);
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, RunShape{1, 4096, 16, 16}));
  const int64_t n = 7;
  const int32_t positions[n] = {0, 1, 17, 511, 1000, 2047, 4095};
  const int32_t tokens[n] = {1, 2, 3, 4, 5, 6, 7};
  const int32_t seqs[n] = {0, 0, 0, 0, 0, 0, 0};
  const auto q = random_values(size_t(n * 256), 61);
  const auto k = random_values(size_t(n * 128), 62);
  std::vector<float> results[2][2];
  int i = 0;
  for (Backend* b : {pair.cpu.get(), pair.gpu.get()}) {
    ASSERT_TRUE(b->begin_batch(pair.paged(BatchView{n, tokens, positions, seqs})).is_ok());
    auto qt = b->scratch(n, 256);
    auto kt = b->scratch(n, 128);
    ASSERT_TRUE(qt.is_ok() && kt.is_ok());
    fill(*b, *qt, q);
    fill(*b, *kt, k);
    ASSERT_TRUE(b->rope(*qt, *kt, RopeParams{64, 4, 2}).is_ok());
    results[i][0] = fetch(*b, *qt);
    results[i][1] = fetch(*b, *kt);
    i++;
  }
  EXPECT_LE(rel_error(results[1][0], results[0][0]), bound);
  EXPECT_LE(rel_error(results[1][1], results[0][1]), bound);
  EXPECT_NE(results[1][0], q);  // it did rotate
}

// A call of attention: each token's position and sequence.
struct AttentionCall {
  std::vector<int32_t> positions, seqs;
};

// n tokens of sequence `seq` at positions first .. first + n - 1.
inline AttentionCall run_of(int32_t seq, int32_t first, int32_t n) {
  AttentionCall c;
  for (int32_t i = 0; i < n; ++i) {
    c.positions.push_back(first + i);
    c.seqs.push_back(seq);
  }
  return c;
}

// The weights the attention checks need: only the shape of a model with n_heads query and n_kv
// KV heads of head_dim, in two layers (attention reads no weight).
inline ModelWeights attention_model(int head_dim, int n_heads, int n_kv) {
  ModelWeights weights;
  weights.config = small_config(n_heads * head_dim, 64, n_heads, n_kv, head_dim, 16);
  weights.layers.resize(2);
  return weights;
}

// The model-shaped calls of three sequences the attention checks run: two prefill chunks of
// sequence 0 (flash path for head_dim 64/128), prompts of sequences 1 and 2, a decode batch of
// all three, a 20-token batch interleaving two sequences (twenty one-token runs), the chunks of
// two prompts packed into one call (two runs), and one decode token of sequence 0.
inline std::vector<AttentionCall> model_attention_calls() {
  std::vector<AttentionCall> calls;
  calls.push_back(run_of(0, 0, 100));
  calls.push_back(run_of(0, 100, 37));
  calls.push_back(run_of(1, 0, 40));
  calls.push_back(run_of(2, 0, 5));
  calls.push_back(AttentionCall{{137, 40, 5}, {0, 1, 2}});
  AttentionCall mixed;
  for (int32_t i = 0; i < 10; ++i) {
    mixed.positions.push_back(138 + i);
    mixed.seqs.push_back(0);
    mixed.positions.push_back(41 + i);
    mixed.seqs.push_back(1);
  }
  calls.push_back(mixed);
  AttentionCall packed = run_of(1, 51, 40);
  const AttentionCall second = run_of(2, 6, 70);
  packed.positions.insert(packed.positions.end(), second.positions.begin(), second.positions.end());
  packed.seqs.insert(packed.seqs.end(), second.seqs.begin(), second.seqs.end());
  calls.push_back(packed);
  calls.push_back(AttentionCall{{148}, {0}});
  return calls;
}

// One model-shaped sequence of calls on both backends: two prefill chunks of one sequence
// (flash path for head_dim 64/128), prompts of two more sequences, a mixed decode batch of all
// three, a 20-token batch interleaving two sequences (twenty one-token runs), and the chunks of
// two prompts packed into one call (two runs, each its own flash launch).
// With `copy_block`, a last call then copies block 0 of sequence 0 over block 0 of sequence 2
// (copy_kv_block) and decodes sequence 2 at position 16, which reads the copy. Within `bound`
// of the CPU's output at every call and layer.
inline void check_attention_over_prefill_and_decode(int head_dim, double bound, bool copy_block) {
  const int n_heads = 8, n_kv = 2;
  ModelWeights weights = attention_model(head_dim, n_heads, n_kv);
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, RunShape{3, 512, 160, 160}));
  const RopeParams p{head_dim, n_heads, n_kv};
  const int64_t q_dim = n_heads * head_dim, kv_dim = n_kv * head_dim;

  std::vector<AttentionCall> calls = model_attention_calls();
  if (copy_block) calls.push_back(AttentionCall{{16}, {2}});

  uint64_t seed = 1000 + uint64_t(head_dim);
  for (size_t ci = 0; ci < calls.size(); ++ci) {
    const AttentionCall& c = calls[ci];
    if (copy_block && ci + 1 == calls.size()) {
      const BatchView tables = pair.paged(BatchView{});
      const int32_t src = tables.block_tables[0];
      const int32_t dst = tables.block_tables[2 * tables.block_table_stride];
      for (Backend* b : {pair.cpu.get(), pair.gpu.get()}) {
        const Status s = b->copy_kv_block(src, dst);
        ASSERT_TRUE(s.is_ok()) << s.message();
      }
    }
    const int64_t n = int64_t(c.positions.size());
    const std::vector<int32_t> tokens(size_t(n), 1);
    const auto q = random_values(size_t(n * q_dim), seed++);
    const auto k = random_values(size_t(n * kv_dim), seed++);
    const auto v = random_values(size_t(n * kv_dim), seed++);
    for (int64_t layer : {0, 1}) {
      std::vector<float> results[2];
      int i = 0;
      for (Backend* b : {pair.cpu.get(), pair.gpu.get()}) {
        ASSERT_TRUE(b->begin_batch(
                         pair.paged(BatchView{n, tokens.data(), c.positions.data(), c.seqs.data()}))
                        .is_ok());
        auto qt = b->scratch(n, q_dim);
        auto kt = b->scratch(n, kv_dim);
        auto vt = b->scratch(n, kv_dim);
        auto out = b->scratch(n, q_dim);
        ASSERT_TRUE(qt.is_ok() && kt.is_ok() && vt.is_ok() && out.is_ok());
        fill(*b, *qt, q);
        // Layer 1 gets other keys than layer 0: the layers' caches must not mix.
        std::vector<float> kl = k, vl = v;
        if (layer == 1) {
          for (float& x : kl) x = -x;
          for (float& x : vl) x *= 0.5f;
        }
        fill(*b, *kt, kl);
        fill(*b, *vt, vl);
        poison(*b, *out);
        // As the forward pass: rope, then attention (on CUDA one launch rotates and caches).
        ASSERT_TRUE(b->rope(*qt, *kt, p).is_ok());
        const Status s = b->attention(*out, *qt, *kt, *vt, layer, p);
        ASSERT_TRUE(s.is_ok()) << s.message();
        results[i++] = fetch(*b, *out);
      }
      EXPECT_LE(rel_error(results[1], results[0]), bound)
          << "call " << ci << " (" << n << " tokens) layer " << layer;
    }
  }
}

// The shapes of check_matmul_multi: q, k and v rows over `cols` columns, at these token counts.
struct MultiShape {
  int64_t cols = 256;
  int64_t rows[3] = {256, 64, 96};
  std::vector<int64_t> tokens = {1, 7, 16, 33};
};

// q, k and v of one input in one matmul_multi call, each checked against its own reference
// within `bound(n, cols)` for n tokens.
template <typename Bound>
void check_matmul_multi(Bound bound, const MultiShape& shape = {}) {
  const int64_t cols = shape.cols;
  const int64_t* rows = shape.rows;
  ModelWeights weights;
  // The scratch arena is sized by the config: the widest output sets its intermediate size.
  weights.config =
      small_config(cols, std::max({int64_t(256), rows[0], rows[1], rows[2]}), 4, 1, 64, 16);
  weights.config.n_layers = 1;
  weights.format = WeightFormat::sym_int4;
  weights.layers.resize(1);
  LayerWeights& l = weights.layers[0];
  l.wq = random_linear(WeightFormat::sym_int4, rows[0], cols, 32, true, 1);
  l.wk = random_linear(WeightFormat::sym_int4, rows[1], cols, 32, true, 2);
  l.wv = random_linear(WeightFormat::sym_int4, rows[2], cols, 32, false, 3);
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, RunShape{1, 64, 64, 64}));
  for (int64_t n : shape.tokens) {
    const std::vector<float> x = random_values(size_t(n * cols), 40 + uint64_t(n));
    Backend& b = *pair.gpu;
    std::vector<int32_t> meta;
    ASSERT_TRUE(b.begin_batch(pair.paged(batch_of(n, meta))).is_ok());
    auto xt = b.scratch(n, cols);
    ASSERT_TRUE(xt.is_ok());
    fill(b, *xt, x);
    Tensor outs[3];
    for (int i = 0; i < 3; ++i) {
      auto t = b.scratch(n, rows[i]);
      ASSERT_TRUE(t.is_ok());
      outs[i] = *t;
      poison(b, outs[i]);
    }
    const Linear* const ws[] = {&l.wq, &l.wk, &l.wv};
    const Status s = b.matmul_multi(outs, *xt, ws);
    ASSERT_TRUE(s.is_ok()) << s.message();
    for (int i = 0; i < 3; ++i) {
      EXPECT_LE(rel_error(fetch(b, outs[i]), reference_matmul(*ws[i], x, n)), bound(n, cols))
          << "weight " << i << " n=" << n;
    }
  }
}

}  // namespace kestrel::backend_test

namespace kestrel::backend_test {

// --- fused ops -------------------------------------------------------------------------------

// What a fused op's output is compared with the CPU's within: the norm's output, matmul
// outputs (and sums or swiglu products of them), q and k rotated by rope, attention's output.
enum class FusedOutput { normed, matmul, rope, attention };

// A fused-op test case: the weights' format, and whether every linear carries a bias.
using FusedCase = std::tuple<FormatCase, bool>;

inline std::string fused_case_name(const ::testing::TestParamInfo<FusedCase>& info) {
  const FormatCase fc = std::get<0>(info.param);
  return std::string(format_name(fc.format)) + "_b" + std::to_string(fc.block) +
         (std::get<1>(info.param) ? "_bias" : "_nobias");
}

// The weights the fused-op check multiplies with: one layer and an lm_head in `fc`'s format,
// with a bias on every linear or none. Quantized widths are multiples of 64 (block 64 fits);
// float weights get an intermediate size off the 32-column grid (the padding of the fp16 shadow
// swiglu leaves for the down projection). The hidden size is one the batch-1 norm-in-GEMV path
// takes.
inline ModelWeights fused_ops_model(const FormatCase fc, bool bias) {
  const int64_t inter = is_quantized(fc.format) ? 320 : 200;
  ModelWeights w;
  w.config = small_config(256, inter, 4, 2, 64, 200);
  w.config.n_layers = 1;
  w.format = fc.format;
  w.block = fc.block;
  w.layers.resize(1);
  LayerWeights& l = w.layers[0];
  uint64_t seed = 300 + uint64_t(fc.format) * 20 + uint64_t(fc.block) + (bias ? 10 : 0);
  // The embedding table is there for what an upload keys on it (CUDA: an fp32 model's fp32 KV
  // cache); no op here reads it.
  w.tok_embd = random_weight(fc.format, 200, 256, fc.block, seed++);
  l.attn_norm = random_vector(256, seed++);
  l.ffn_norm = random_vector(256, seed++);
  w.output_norm = random_vector(256, seed++);
  l.wq = random_linear(fc.format, 256, 256, fc.block, bias, seed++);
  l.wk = random_linear(fc.format, 128, 256, fc.block, bias, seed++);
  l.wv = random_linear(fc.format, 128, 256, fc.block, bias, seed++);
  l.wo = random_linear(fc.format, 256, 256, fc.block, bias, seed++);
  l.w_gate = random_linear(fc.format, inter, 256, fc.block, bias, seed++);
  l.w_up = random_linear(fc.format, inter, 256, fc.block, bias, seed++);
  l.w_down = random_linear(fc.format, 256, inter, fc.block, bias, seed++);
  w.output = random_linear(fc.format, 200, 256, fc.block, bias, seed++);
  return w;
}

// The reservation fused_ops_model's check runs in: one sequence, 80 + 33 + 16 + 2 + 1 positions.
inline RunShape fused_ops_shape() {
  return RunShape{1, 160, 96, 96};
}

// Every fused op of backend.h on pair.gpu against the plain ops it stands for, issued one by one
// on pair.cpu, in the order a layer and the head of the forward pass use them: norm_matmul
// (q/k/v), rope_attention, matmul_add (the o projection reading attention's output),
// norm_matmul_swiglu, matmul_add (the down projection reading swiglu's output), norm_matmul (the
// lm_head). Before each op the CPU's inputs are set to the device's values, so each op is
// compared alone on the same inputs while the device runs the chain as the forward pass does
// (the shadows an op leaves for the next). Calls of 80 (prefill), 33 (a serving step's size),
// 16, 2 and 1 tokens of one sequence, so attention reads the cache of earlier calls. Every output
// an op writes (normed, up, rotated q and k, the projection and the residual) is compared within
// bound(FusedOutput, n); watch(device, n, done) runs before (done false) and after (done true) each
// call's ops.
template <typename Bound, typename Watch>
void check_fused_ops(BackendPair& pair, const ModelWeights& w, Bound bound, Watch watch) {
  const ModelConfig& c = w.config;
  const LayerWeights& l = w.layers[0];
  const RopeParams rope{c.head_dim, c.n_heads, c.n_kv_heads};
  const float eps = 1e-5f;
  const int64_t hidden = c.hidden_size, q_dim = c.q_dim(), kv_dim = c.kv_dim();
  enum { x, normed, q, k, v, qa, ka, va, attn, proj, gate, up, logits, n_tensors };
  const int64_t widths[n_tensors] = {hidden,
                                     hidden,
                                     q_dim,
                                     kv_dim,
                                     kv_dim,
                                     q_dim,
                                     kv_dim,
                                     kv_dim,
                                     q_dim,
                                     hidden,
                                     c.intermediate_size,
                                     c.intermediate_size,
                                     c.vocab_size};
  const char* names[n_tensors] = {"x",           "normed",      "q",     "k",         "v",
                                  "q (rotated)", "k (rotated)", "v",     "attention", "proj",
                                  "gate",        "up",          "logits"};
  Backend* sides[2] = {pair.cpu.get(), pair.gpu.get()};
  int32_t first = 0;
  uint64_t seed = 7000;
  for (int64_t n : {80, 33, 16, 2, 1}) {
    Tensor t[2][n_tensors];
    std::vector<float> inputs[n_tensors];
    inputs[x] = random_values(size_t(n * hidden), seed++, 2.0f);
    for (int j : {qa, ka, va}) inputs[j] = random_values(size_t(n * widths[j]), seed++);
    std::vector<int32_t> meta[2];  // the batches' tokens and positions, read by every op
    for (int side = 0; side < 2; ++side) {
      Backend& b = *sides[side];
      ASSERT_TRUE(b.begin_batch(pair.paged(batch_of(n, meta[side], first))).is_ok());
      for (int j = 0; j < n_tensors; ++j) {
        auto s = b.scratch(n, widths[j]);
        ASSERT_TRUE(s.is_ok());
        t[side][j] = *s;
        if (!inputs[j].empty()) {
          fill(b, t[side][j], inputs[j]);
        } else {
          poison(b, t[side][j]);
        }
      }
    }
    Backend& cpu = *pair.cpu;
    Backend& dev = *pair.gpu;
    watch(dev, n, false);
    // One op: the CPU's inputs `in` set to the device's, then `fused` on the device and `plain`
    // on the CPU, then each of `out` compared.
    auto step = [&](const char* op, std::initializer_list<int> in,
                    std::initializer_list<std::pair<int, FusedOutput>> out, auto fused,
                    auto plain) {
      for (int j : in) fill(cpu, t[0][j], fetch(dev, t[1][j]));
      Status s = fused(dev, t[1]);
      ASSERT_TRUE(s.is_ok()) << op << ": " << s.message();
      s = plain(cpu, t[0]);
      ASSERT_TRUE(s.is_ok()) << op << " (plain ops): " << s.message();
      for (const auto& [j, kind] : out) {
        EXPECT_LE(rel_error(fetch(dev, t[1][j]), fetch(cpu, t[0][j])), bound(kind, n))
            << op << ": " << names[j] << ", n=" << n;
      }
    };
    using Ts = Tensor*;
    // matmul_add of an output projection (wo, w_down) reading `input`, into the residual x.
    auto matmul_add_step = [&](const char* op, int input, const Linear& w) {
      step(
          op, {input, x}, {{proj, FusedOutput::matmul}, {x, FusedOutput::matmul}},
          [&](Backend& b, Ts ts) { return b.matmul_add(ts[proj], ts[input], w, ts[x]); },
          [&](Backend& b, Ts ts) {
            KS_RETURN_IF_ERROR(b.matmul(ts[proj], ts[input], w));
            return b.add(ts[x], ts[proj]);
          });
    };
    const Linear* const qkv_w[] = {&l.wq, &l.wk, &l.wv};
    step(
        "norm_matmul (q/k/v)", {x},
        {{normed, FusedOutput::normed},
         {q, FusedOutput::matmul},
         {k, FusedOutput::matmul},
         {v, FusedOutput::matmul}},
        [&](Backend& b, Ts ts) {
          const Tensor outs[] = {ts[q], ts[k], ts[v]};
          return b.norm_matmul(outs, ts[normed], ts[x], l.attn_norm, eps, qkv_w);
        },
        [&](Backend& b, Ts ts) {
          const Tensor outs[] = {ts[q], ts[k], ts[v]};
          KS_RETURN_IF_ERROR(b.rms_norm(ts[normed], ts[x], l.attn_norm, eps));
          return b.matmul_multi(outs, ts[normed], qkv_w);
        });
    step(
        "rope_attention", {},
        {{attn, FusedOutput::attention}, {qa, FusedOutput::rope}, {ka, FusedOutput::rope}},
        [&](Backend& b, Ts ts) {
          return b.rope_attention(ts[attn], ts[qa], ts[ka], ts[va], 0, rope);
        },
        [&](Backend& b, Ts ts) {
          KS_RETURN_IF_ERROR(b.rope(ts[qa], ts[ka], rope));
          return b.attention(ts[attn], ts[qa], ts[ka], ts[va], 0, rope);
        });
    matmul_add_step("matmul_add (wo)", attn, l.wo);
    step(
        "norm_matmul_swiglu", {x},
        {{normed, FusedOutput::normed}, {gate, FusedOutput::matmul}, {up, FusedOutput::matmul}},
        [&](Backend& b, Ts ts) {
          return b.norm_matmul_swiglu(ts[gate], ts[up], ts[normed], ts[x], l.ffn_norm, eps,
                                      l.w_gate, l.w_up);
        },
        [&](Backend& b, Ts ts) {
          const Tensor outs[] = {ts[gate], ts[up]};
          const Linear* const ws[] = {&l.w_gate, &l.w_up};
          KS_RETURN_IF_ERROR(b.rms_norm(ts[normed], ts[x], l.ffn_norm, eps));
          KS_RETURN_IF_ERROR(b.matmul_multi(outs, ts[normed], ws));
          return b.swiglu(ts[gate], ts[gate], ts[up]);
        });
    matmul_add_step("matmul_add (w_down)", gate, l.w_down);
    const Linear* const head_w[] = {&w.output};
    step(
        "norm_matmul (lm_head)", {x},
        {{normed, FusedOutput::normed}, {logits, FusedOutput::matmul}},
        [&](Backend& b, Ts ts) {
          const Tensor outs[] = {ts[logits]};
          return b.norm_matmul(outs, ts[normed], ts[x], w.output_norm, eps, head_w);
        },
        [&](Backend& b, Ts ts) {
          KS_RETURN_IF_ERROR(b.rms_norm(ts[normed], ts[x], w.output_norm, eps));
          return b.matmul(ts[logits], ts[normed], w.output);
        });
    watch(dev, n, true);
    first += int32_t(n);
  }
}

}  // namespace kestrel::backend_test

namespace kestrel::backend_test {

// --- decoder layer ---------------------------------------------------------------------------

// A decoder_layer test case: the model's shape, the weights' format, whether q, k and v carry a
// bias (as Qwen2's do), and the KV cache entries the device is asked for (the CPU keeps fp32).
struct DecoderLayerCase {
  int64_t hidden = 256;
  int64_t n_heads = 4;
  int64_t n_kv_heads = 2;
  int64_t head_dim = 64;
  int64_t intermediate = 640;
  FormatCase format{WeightFormat::sym_int4, 32};
  bool qkv_bias = true;
  KvCacheType kv_cache = KvCacheType::automatic;
};

// "sym_int4_b32_d64_h4kv2_bias" (and "_fp8" for an fp8 cache).
inline std::string decoder_layer_label(const DecoderLayerCase& dc) {
  return std::string(format_name(dc.format.format)) + "_b" + std::to_string(dc.format.block) +
         "_d" + std::to_string(dc.head_dim) + "_h" + std::to_string(dc.n_heads) + "kv" +
         std::to_string(dc.n_kv_heads) + (dc.qkv_bias ? "_bias" : "_nobias") +
         (dc.kv_cache == KvCacheType::automatic ? ""
                                                : std::string("_") + kv_cache_name(dc.kv_cache));
}

inline std::string decoder_layer_case_name(const ::testing::TestParamInfo<DecoderLayerCase>& info) {
  return decoder_layer_label(info.param);
}

// How gtest prints a case (a failing test's GetParam()).
inline void PrintTo(const DecoderLayerCase& dc, std::ostream* os) {
  *os << decoder_layer_label(dc) << ", hidden " << dc.hidden << ", intermediate "
      << dc.intermediate;
}

// The prompts check_decoder_layer prefills, each in its own sequence slot, and the batch-1 decode
// steps that follow each: contexts of 1-4 keys (prompt 0), 14-17 (a KV block boundary at 16),
// 63-66 (one and two 64-key tiles) and 701-704 (several hundred keys, which a decode attention
// splits; the splits' edges fall at other offsets into the 16-position blocks at every step).
inline constexpr int32_t kLayerPrompts[] = {0, 13, 62, 700};
inline constexpr int32_t kLayerDecodeSteps = 4;
// Tokens per prefill call: the 700-token prompt takes three, the later ones reading the cache of
// the earlier.
inline constexpr int64_t kLayerPrefillChunk = 256;

// What the model's attention norm weights are scaled by, and so q·k/√d (the square): attention
// tests elsewhere feed scores of unit variance, whose errors are this much smaller.
inline constexpr float kLayerAttnNormScale = 1.5f;
inline constexpr double kLayerScoreScale = double(kLayerAttnNormScale) * kLayerAttnNormScale;

// The model check_decoder_layer runs: two layers (the cache holds both; layer 1 is a layer index
// above 0) of random weights in `dc`'s format. The attention norm's weights are scaled by
// kLayerAttnNormScale, so q·k/√d has a standard deviation near 2.25 instead of 1: softmax over
// 700 keys then weighs a few of them (not all nearly alike, as unit-variance scores would), so
// attention's output is as large as v's at every context and an error in it shows in the layer's
// update of x.
// `n_layers` (at least 2) makes a deeper stack for check_decoder_layers.
inline ModelWeights decoder_layer_model(const DecoderLayerCase& dc, int64_t n_layers = 2) {
  ModelConfig config =
      small_config(dc.hidden, dc.intermediate, dc.n_heads, dc.n_kv_heads, dc.head_dim, 64);
  config.n_layers = n_layers;
  config.arch = dc.qkv_bias ? Architecture::qwen2 : Architecture::llama;
  config.attention_bias = dc.qkv_bias;
  const FormatCase fc = dc.format;
  uint64_t seed = 9000 + uint64_t(fc.format) * 100 + uint64_t(dc.head_dim) +
                  uint64_t(dc.n_heads * 7 + dc.n_kv_heads) + (dc.qkv_bias ? 50 : 0);
  ModelWeights w = random_model(config, fc.format, fc.block, false, seed);
  seed += 1000;
  for (LayerWeights& l : w.layers) {
    if (dc.qkv_bias) {
      l.wq = random_linear(fc.format, config.q_dim(), dc.hidden, fc.block, true, seed++);
      l.wk = random_linear(fc.format, config.kv_dim(), dc.hidden, fc.block, true, seed++);
      l.wv = random_linear(fc.format, config.kv_dim(), dc.hidden, fc.block, true, seed++);
    }
    float* norm = l.attn_norm.data.as_mutable<float>();
    for (int64_t i = 0; i < l.attn_norm.n; ++i) norm[i] *= kLayerAttnNormScale;
  }
  return w;
}

// check_decoder_layer's reservation: a slot for each prompt, each slot's context the longest
// prompt and its decode steps (44 blocks of 16 positions).
// `prompts` replaces kLayerPrompts (for a longer context) in this and in check_decoder_layer.
inline RunShape decoder_layer_shape(const DecoderLayerCase& dc,
                                    std::span<const int32_t> prompts = kLayerPrompts) {
  const int64_t context = *std::max_element(prompts.begin(), prompts.end()) + kLayerDecodeSteps;
  RunShape shape{int64_t(prompts.size()), context, kLayerPrefillChunk, 1};
  shape.kv_cache = dc.kv_cache;
  return shape;
}

// How the reference side of check_decoder_layer (pair.cpu) runs a layer.
enum class LayerReference {
  decoder_layer,  // Backend::decoder_layer
  fused_ops,      // the five fused ops one by one, in the forward pass's order
};

// The five fused ops of one decoder layer, issued one by one as backend.h's decoder_layer
// documents them.
inline Status layer_by_fused_ops(Backend& b, Tensor x, const LayerScratch& s, const LayerWeights& l,
                                 int64_t layer, const RopeParams& rope, float eps) {
  const Tensor qkv[] = {s.q, s.k, s.v};
  const Linear* const qkv_weights[] = {&l.wq, &l.wk, &l.wv};
  KS_RETURN_IF_ERROR(b.norm_matmul(qkv, s.normed, x, l.attn_norm, eps, qkv_weights));
  KS_RETURN_IF_ERROR(b.rope_attention(s.attn, s.q, s.k, s.v, layer, rope));
  KS_RETURN_IF_ERROR(b.matmul_add(s.proj, s.attn, l.wo, x));
  KS_RETURN_IF_ERROR(
      b.norm_matmul_swiglu(s.gate, s.up, s.normed, x, l.ffn_norm, eps, l.w_gate, l.w_up));
  return b.matmul_add(s.proj, s.gate, l.w_down, x);
}

// How far a layer's output `got` is from `want`, relative to the layer's update of its input `in`:
// ||got - want|| / ||want - in||, in double (0 only when the two are equal bit for bit), and
// infinity when either holds a NaN. x itself would hide the layer's error behind the residual it
// carries through.
inline double layer_update_error(const std::vector<float>& got, const std::vector<float>& want,
                                 const std::vector<float>& in) {
  EXPECT_EQ(got.size(), want.size());
  EXPECT_EQ(want.size(), in.size());
  double diff = 0, update = 0;
  for (size_t i = 0; i < std::min({got.size(), want.size(), in.size()}); ++i) {
    if (std::isnan(got[i]) || std::isnan(want[i])) return INFINITY;
    const double d = double(got[i]) - double(want[i]), u = double(want[i]) - double(in[i]);
    diff += d * d;
    update += u * u;
  }
  return update > 0 ? std::sqrt(diff / update) : std::sqrt(diff);
}

// x and a decoder layer's scratch (forward_scratch's tensors) of one call on one backend.
struct LayerCall {
  Tensor x;
  LayerScratch s;

  // Begins a call of `batch` on `b` and takes its tensors.
  void begin(Backend& b, const BatchView& batch, const ModelConfig& c) {
    const Status begun = b.begin_batch(batch);
    ASSERT_TRUE(begun.is_ok()) << begun.message();
    namespace fs = forward_scratch;
    Tensor* slots[fs::kTokenTensors] = {};
    slots[fs::residual] = &x;
    slots[fs::normed] = &s.normed;
    slots[fs::q] = &s.q;
    slots[fs::k] = &s.k;
    slots[fs::v] = &s.v;
    slots[fs::attn] = &s.attn;
    slots[fs::proj] = &s.proj;
    slots[fs::gate] = &s.gate;
    slots[fs::up] = &s.up;
    for (int i = 0; i < fs::kTokenTensors; ++i) {
      auto t = b.scratch(batch.n_tokens, fs::width(c, fs::Token(i)));
      ASSERT_TRUE(t.is_ok()) << t.status().message();
      *slots[i] = *t;
    }
  }
  // x set to `in` and the scratch poisoned: a layer that reads scratch it has not written reads
  // NaN, whatever an earlier layer left there.
  void reset(Backend& b, const std::vector<float>& in) {
    fill(b, x, in);
    for (Tensor t : {s.normed, s.q, s.k, s.v, s.attn, s.proj, s.gate, s.up}) poison(b, t);
  }
};

// The calls check_decoder_layer and check_decoder_layers make for a prompt: its prefill in calls
// of up to kLayerPrefillChunk tokens, then kLayerDecodeSteps batch-1 steps; [first position,
// tokens] each.
inline std::vector<std::pair<int32_t, int64_t>> layer_calls(int32_t prompt) {
  std::vector<std::pair<int32_t, int64_t>> calls;
  for (int32_t p = 0; p < prompt; p += int32_t(kLayerPrefillChunk)) {
    calls.emplace_back(p, std::min<int64_t>(kLayerPrefillChunk, prompt - p));
  }
  for (int32_t step = 0; step < kLayerDecodeSteps; ++step) calls.emplace_back(prompt + step, 1);
  return calls;
}

// One such call: n tokens at positions first, first + 1, ... of sequence slot `slot`, begun on
// both backends of `pair` (t[0] on pair.cpu, t[1] on pair.gpu).
struct LayerStep {
  std::vector<int32_t> tokens, positions, seqs;
  LayerCall t[2];
  std::string where;

  void begin(BackendPair& pair, const ModelConfig& c, size_t slot, int32_t prompt, int32_t first,
             int64_t n) {
    const auto count = static_cast<size_t>(n);
    tokens.assign(count, 0);
    positions.assign(count, 0);
    seqs.assign(count, int32_t(slot));
    for (int64_t i = 0; i < n; ++i) {
      tokens[size_t(i)] = int32_t((first + i) % 7);
      positions[size_t(i)] = first + int32_t(i);
    }
    for (int side = 0; side < 2; ++side) {
      t[side].begin(side == 0 ? *pair.cpu : *pair.gpu,
                    pair.paged(BatchView{n, tokens.data(), positions.data(), seqs.data()}), c);
    }
    where = "prompt " + std::to_string(prompt) + ", positions " + std::to_string(first) + "+" +
            std::to_string(n);
  }
};

// fn(step, prompt, first, n) for every call of every prompt (layer_calls), prompt i in sequence
// slot i, each call begun on both backends; stops at the first fatal failure.
template <typename Fn>
void for_each_layer_step(BackendPair& pair, const ModelConfig& c, std::span<const int32_t> prompts,
                         Fn fn) {
  for (size_t slot = 0; slot < prompts.size(); ++slot) {
    const int32_t prompt = prompts[slot];
    for (const auto& [first, n] : layer_calls(prompt)) {
      LayerStep step;
      step.begin(pair, c, slot, prompt, first, n);
      if (::testing::Test::HasFatalFailure()) return;
      fn(step, prompt, first, n);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

// decoder_layer on pair.gpu against pair.cpu (its decoder_layer, or the five fused ops by
// `reference`), both reserved with decoder_layer_shape for `w` (decoder_layer_model). For each
// prompt of kLayerPrompts, in its own sequence slot: the prompt's calls of up to
// kLayerPrefillChunk tokens, then kLayerDecodeSteps batch-1 decode steps at the positions after
// it, each call through every layer. Every layer of every call starts both backends from the same
// x, the reference's output of the layer before (the first layer from fresh random values), so
// each layer is held to the bound alone, as the other op checks hold each op, while each backend
// attends over its own cache (the device's entries from its own earlier calls, prefill through
// its composition and decode through whatever its decoder_layer runs). The layer's update of x is
// compared (layer_update_error) within bound(n) for calls of n tokens. watch(device, n, done) runs
// before (done false) and after (done true) the device's layers of each call, around nothing else.
//
// The check must be able to fail: after the last decode step of each non-empty prompt (whose slot
// nothing reads again), the device runs that step's layer 0 again with layer 1's cache, and at
// half the position (another rotation, half the keys). Both must miss the reference's layer 0 by
// more than max(0.5, 3 bound(1)) (on the CPU they miss by 0.6 to 2).
template <typename Bound, typename Watch>
void check_decoder_layer(BackendPair& pair, const ModelWeights& w, Bound bound, Watch watch,
                         LayerReference reference = LayerReference::decoder_layer,
                         std::span<const int32_t> prompts = kLayerPrompts) {
  const ModelConfig& c = w.config;
  ASSERT_GE(c.n_layers, 2);
  const RopeParams rope{c.head_dim, c.n_heads, c.n_kv_heads};
  const float eps = float(c.rms_norm_eps);
  Backend& ref = *pair.cpu;
  Backend& dev = *pair.gpu;
  auto run_reference = [&](const LayerCall& t, int64_t layer) {
    const LayerWeights& l = w.layers[size_t(layer)];
    return reference == LayerReference::fused_ops
               ? layer_by_fused_ops(ref, t.x, t.s, l, layer, rope, eps)
               : ref.decoder_layer(t.x, t.s, l, layer, rope, eps);
  };
  const double clearly_wrong = std::max(0.5, 3 * bound(int64_t{1}));
  uint64_t seed = 20000;
  for_each_layer_step(
      pair, c, prompts, [&](LayerStep& step, int32_t prompt, int32_t first, int64_t n) {
        LayerCall* t = step.t;
        const std::string& where = step.where;
        std::vector<float> in = random_values(size_t(n) * size_t(c.hidden_size), seed++);
        const std::vector<float> first_in = in;
        std::vector<float> first_out;  // the reference's layer 0
        for (int64_t layer = 0; layer < c.n_layers; ++layer) {
          t[0].reset(ref, in);
          Status s = run_reference(t[0], layer);
          ASSERT_TRUE(s.is_ok()) << where << ", layer " << layer << " (reference): " << s.message();
          const std::vector<float> want = fetch(ref, t[0].x);
          if (layer == 0) {
            first_out = want;
            watch(dev, n, false);
          }
          t[1].reset(dev, in);
          s = dev.decoder_layer(t[1].x, t[1].s, w.layers[size_t(layer)], layer, rope, eps);
          ASSERT_TRUE(s.is_ok()) << where << ", layer " << layer << ": " << s.message();
          EXPECT_LE(layer_update_error(fetch(dev, t[1].x), want, in), bound(n))
              << where << ", layer " << layer;
          in = want;
        }
        watch(dev, n, true);
        if (n != 1 || first != prompt + kLayerDecodeSteps - 1 || prompt == 0) return;
        // Layer 0 of this step with layer 1's cache.
        t[1].reset(dev, first_in);
        Status s = dev.decoder_layer(t[1].x, t[1].s, w.layers[0], 1, rope, eps);
        ASSERT_TRUE(s.is_ok()) << where << ", layer 0 with layer 1's cache: " << s.message();
        EXPECT_GT(layer_update_error(fetch(dev, t[1].x), first_out, first_in), clearly_wrong)
            << where << ": layer 0 run with layer 1's cache was not told apart";
        // And at half the position.
        const int32_t half = first / 2;
        LayerCall moved;
        moved.begin(dev, pair.paged(BatchView{1, step.tokens.data(), &half, step.seqs.data()}), c);
        if (::testing::Test::HasFatalFailure()) return;
        moved.reset(dev, first_in);
        s = dev.decoder_layer(moved.x, moved.s, w.layers[0], 0, rope, eps);
        ASSERT_TRUE(s.is_ok()) << where << ", at position " << half << ": " << s.message();
        EXPECT_GT(layer_update_error(fetch(dev, moved.x), first_out, first_in), clearly_wrong)
            << where << ": layer 0 run at position " << half << " was not told apart";
      });
}

// decoder_layers over all of w's layers on pair.gpu, one call a step, against pair.cpu's
// decoder_layer layer by layer, both reserved with decoder_layer_shape for `w` (decoder_layer_model
// of any depth) and `prompts`: each prompt's prefill calls and kLayerDecodeSteps batch-1 decode
// steps in its own sequence slot, as check_decoder_layer runs them. Here each device layer takes
// its input from the device's layer before, as the forward pass does, so the bound(n) for a call
// of n tokens holds the update of x over the whole stack (layer_update_error). watch(device, n,
// done) runs around the device's call.
//
// The check must be able to fail: at the last decode step of each non-empty prompt the device's
// stack runs again at half the position (another rotation, half the keys), which must miss the
// reference by more than max(0.5, 3 bound(1)).
template <typename Bound, typename Watch>
void check_decoder_layers(BackendPair& pair, const ModelWeights& w, Bound bound, Watch watch,
                          std::span<const int32_t> prompts = kLayerPrompts) {
  const ModelConfig& c = w.config;
  ASSERT_GE(c.n_layers, 2);
  const RopeParams rope{c.head_dim, c.n_heads, c.n_kv_heads};
  const float eps = float(c.rms_norm_eps);
  Backend& ref = *pair.cpu;
  Backend& dev = *pair.gpu;
  const double clearly_wrong = std::max(0.5, 3 * bound(int64_t{1}));
  uint64_t seed = 30000;
  for_each_layer_step(
      pair, c, prompts, [&](LayerStep& step, int32_t prompt, int32_t first, int64_t n) {
        LayerCall* t = step.t;
        const std::string& where = step.where;
        const std::vector<float> in = random_values(size_t(n) * size_t(c.hidden_size), seed++);
        t[0].reset(ref, in);
        for (int64_t layer = 0; layer < c.n_layers; ++layer) {
          const Status s =
              ref.decoder_layer(t[0].x, t[0].s, w.layers[size_t(layer)], layer, rope, eps);
          ASSERT_TRUE(s.is_ok()) << where << ", layer " << layer << " (reference): " << s.message();
        }
        const std::vector<float> want = fetch(ref, t[0].x);
        t[1].reset(dev, in);
        watch(dev, n, false);
        Status s = dev.decoder_layers(t[1].x, t[1].s, w.layers, 0, rope, eps);
        ASSERT_TRUE(s.is_ok()) << where << ": " << s.message();
        const std::vector<float> got = fetch(dev, t[1].x);
        watch(dev, n, true);
        EXPECT_LE(layer_update_error(got, want, in), bound(n)) << where;
        if (n != 1 || first != prompt + kLayerDecodeSteps - 1 || prompt == 0) return;
        const int32_t half = first / 2;
        LayerCall moved;
        moved.begin(dev, pair.paged(BatchView{1, step.tokens.data(), &half, step.seqs.data()}), c);
        if (::testing::Test::HasFatalFailure()) return;
        moved.reset(dev, in);
        s = dev.decoder_layers(moved.x, moved.s, w.layers, 0, rope, eps);
        ASSERT_TRUE(s.is_ok()) << where << ", at position " << half << ": " << s.message();
        EXPECT_GT(layer_update_error(fetch(dev, moved.x), want, in), clearly_wrong)
            << where << ": the stack run at position " << half << " was not told apart";
      });
}

}  // namespace kestrel::backend_test
