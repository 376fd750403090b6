// Op scenarios every device backend runs against the CPU (tests/cuda, tests/vulkan), each with
// the device's bound; the harness is backend_test_util.h.
#pragma once

#include <gtest/gtest.h>

#include "backend_test_util.h"

namespace kestrel::backend_test {

// argmax_rows on a real vocabulary's width: ties go to the lower index, maxima at both ends.
inline void check_argmax_rows_first_of_ties() {
  const int64_t n = 5, cols = 151936;
  std::vector<float> v = random_values(size_t(n * cols), 51);
  v[size_t(0 * cols + 70000)] = 50.0f;
  v[size_t(0 * cols + 90000)] = 50.0f;  // tie: the lower index wins
  v[size_t(1 * cols + cols - 1)] = 60.0f;
  v[size_t(2 * cols + 0)] = 60.0f;
  std::vector<int32_t> results[2];
  // The fixture's reservation holds logits of a 50-token vocabulary; this needs a real one.
  ModelWeights big;
  big.config = small_config(64, 64, 1, 1, 64, cols);
  big.config.n_layers = 1;
  big.layers.resize(1);
  BackendPair pair;
  ASSERT_TRUE(pair.init(big, RunShape{1, 16, 8, 8}));
  int i = 0;
  for (Backend* b : {pair.cpu.get(), pair.gpu.get()}) {
    std::vector<int32_t> meta;
    ASSERT_TRUE(b->begin_batch(pair.paged(batch_of(n, meta))).is_ok());
    auto t = b->scratch(n, cols);
    ASSERT_TRUE(t.is_ok());
    fill(*b, *t, v);
    results[i].assign(size_t(n), -1);
    ASSERT_TRUE(b->argmax_rows(*t, results[i].data()).is_ok());
    i++;
  }
  EXPECT_EQ(results[1], results[0]);
  EXPECT_EQ(results[1][0], 70000);
  EXPECT_EQ(results[1][1], cols - 1);
  EXPECT_EQ(results[1][2], 0);
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

// One model-shaped sequence of calls on both backends: two prefill chunks of one sequence
// (flash path for head_dim 64/128), prompts of two more sequences, a mixed decode batch of all
// three, a 20-token batch interleaving two sequences (twenty one-token runs), and the chunks of
// two prompts packed into one call (two runs, each its own flash launch).
// With `copy_block`, a last call then copies block 0 of sequence 0 over block 0 of sequence 2
// (copy_kv_block) and decodes sequence 2 at position 16, which reads the copy. Within `bound`
// of the CPU's output at every call and layer.
inline void check_attention_over_prefill_and_decode(int head_dim, double bound, bool copy_block) {
  const int n_heads = 8, n_kv = 2;
  ModelWeights weights;
  weights.config = small_config(n_heads * head_dim, 64, n_heads, n_kv, head_dim, 16);
  weights.layers.resize(2);
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, RunShape{3, 512, 160, 160}));
  const RopeParams p{head_dim, n_heads, n_kv};
  const int64_t q_dim = n_heads * head_dim, kv_dim = n_kv * head_dim;

  struct Call {
    std::vector<int32_t> positions, seqs;
  };
  std::vector<Call> calls;
  auto run_of = [](int32_t seq, int32_t first, int32_t n) {
    Call c;
    for (int32_t i = 0; i < n; ++i) {
      c.positions.push_back(first + i);
      c.seqs.push_back(seq);
    }
    return c;
  };
  calls.push_back(run_of(0, 0, 100));
  calls.push_back(run_of(0, 100, 37));
  calls.push_back(run_of(1, 0, 40));
  calls.push_back(run_of(2, 0, 5));
  calls.push_back(Call{{137, 40, 5}, {0, 1, 2}});
  Call mixed;
  for (int32_t i = 0; i < 10; ++i) {
    mixed.positions.push_back(138 + i);
    mixed.seqs.push_back(0);
    mixed.positions.push_back(41 + i);
    mixed.seqs.push_back(1);
  }
  calls.push_back(mixed);
  Call packed = run_of(1, 51, 40);
  const Call second = run_of(2, 6, 70);
  packed.positions.insert(packed.positions.end(), second.positions.begin(), second.positions.end());
  packed.seqs.insert(packed.seqs.end(), second.seqs.begin(), second.seqs.end());
  calls.push_back(packed);
  calls.push_back(Call{{148}, {0}});
  if (copy_block) calls.push_back(Call{{16}, {2}});

  uint64_t seed = 1000 + uint64_t(head_dim);
  for (size_t ci = 0; ci < calls.size(); ++ci) {
    const Call& c = calls[ci];
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

// q, k and v of one input in one matmul_multi call, each checked against its own reference
// within `bound(n, cols)` for n tokens.
template <typename Bound>
void check_matmul_multi(Bound bound) {
  const int64_t cols = 256;
  const int64_t rows[3] = {256, 64, 96};
  ModelWeights weights;
  weights.config = small_config(cols, 256, 4, 1, 64, 16);
  weights.config.n_layers = 1;
  weights.format = WeightFormat::sym_int4;
  weights.layers.resize(1);
  LayerWeights& l = weights.layers[0];
  l.wq = random_linear(WeightFormat::sym_int4, rows[0], cols, 32, true, 1);
  l.wk = random_linear(WeightFormat::sym_int4, rows[1], cols, 32, true, 2);
  l.wv = random_linear(WeightFormat::sym_int4, rows[2], cols, 32, false, 3);
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, RunShape{1, 64, 64, 64}));
  for (int64_t n : {1, 7, 16, 33}) {
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
