// Op scenarios every device backend runs against the CPU (tests/cuda, tests/vulkan), each with
// the device's bound; the harness is backend_test_util.h.
#pragma once

#include <gtest/gtest.h>

#include <initializer_list>
#include <string>
#include <tuple>

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
