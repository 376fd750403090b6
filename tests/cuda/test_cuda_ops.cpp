// Every CUDA op against the CPU backend (the reference) on fresh random inputs, outputs poisoned
// with NaN beforehand so an unwritten element fails the comparison.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <numeric>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <utility>

#include "../unit/backend_op_checks.h"
#include "core/half.h"
#include "cuda_test_util.h"

namespace kestrel::cuda_test {
namespace {

// --- matmul ----------------------------------------------------------------------------------

// Whether the CUDA matmul of n rows quantizes its input to int8 as the CPU does (the int4
// GEMV's dp4a path) rather than rounding it to fp16.
bool int8_inputs(WeightFormat format, int64_t n, int64_t cols) {
  return (format == WeightFormat::sym_int4 || format == WeightFormat::asym_int4) &&
         cuda::gemv_uses_dp4a(n, (cols + 31) / 32 * 32);
}

class CudaMatmul : public ::testing::TestWithParam<FormatCase> {};

// Shapes with rows not a multiple of 16 or 32 and columns not a multiple of the 128-column
// chunk, token counts on both sides of the GEMV's launch of 16 tokens, of its n-tile at 8 and
// of the GEMV/GEMM switch at 64.
TEST_P(CudaMatmul, MatchesDequantizedReferenceAndCpu) {
  const FormatCase fc = GetParam();
  // 17000 rows: more row tiles than the device holds blocks at once, so the persistent int4
  // launches loop over several tiles a block, the last one partial (the dp4a path at 1-2 tokens,
  // the mma path's 32-row tiles at 3-64; its 16-row tiles loop in
  // CudaOps.PersistentGemvGivesTheSameBitsOnAnyGrid, against a full grid).
  const int64_t shapes[][2] = {{200, 192}, {72, 128}, {1040, 576}, {17000, 64}};
  uint64_t seed = 100 + uint64_t(fc.format) * 10 + uint64_t(fc.block);
  for (const auto& shape : shapes) {
    const int64_t rows = shape[0], cols = shape[1];
    ModelWeights weights;
    weights.config = small_config(cols, rows, 1, 1, 64, 16);
    weights.config.n_layers = 1;
    weights.format = fc.format;
    weights.layers.resize(1);
    weights.layers[0].w_gate = random_linear(fc.format, rows, cols, fc.block, true, seed++);
    BackendPair pair;
    ASSERT_TRUE(pair.init(weights, RunShape{1, 96, 96, 96}));
    const Linear& w = weights.layers[0].w_gate;
    for (int64_t n : {1, 2, 3, 4, 5, 8, 9, 16, 17, 45, 64, 70}) {
      const std::vector<float> x = random_values(size_t(n * cols), seed++);
      const std::vector<float> ref = reference_matmul(w, x, n);
      std::vector<float> outs[2];
      int i = 0;
      for (Backend* b : {pair.cpu.get(), pair.gpu.get()}) {
        std::vector<int32_t> meta;
        ASSERT_TRUE(b->begin_batch(pair.paged(batch_of(n, meta))).is_ok());
        auto xt = b->scratch(n, cols);
        auto yt = b->scratch(n, rows);
        ASSERT_TRUE(xt.is_ok() && yt.is_ok());
        fill(*b, *xt, x);
        poison(*b, *yt);
        const Status s = b->matmul(*yt, *xt, w);
        ASSERT_TRUE(s.is_ok()) << s.message();
        outs[i++] = fetch(*b, *yt);
      }
      const double vs_ref = rel_error(outs[1], ref);
      const double vs_cpu = rel_error(outs[1], outs[0]);
      // The mma path: fp16 activations (2^-11 relative) and fp16 products of scale and code,
      // ~3e-4 observed kind of error; the CPU's integer paths quantize activations to int8
      // (~1e-2). The int4 dp4a path quantizes them as the CPU does: ~1e-2 from the reference,
      // and 2-3e-3 from the CPU (observed), where an fp16-rounded input lands on the other
      // side of a rounding boundary than the CPU's fp32 one; a wrong nibble, scale or group
      // gives errors near 1.
      // fp32 weights multiply the fp32 input in fp32 (no TF32, whose 10-bit mantissa gives
      // ~1e-3): only the summation order differs, ~1e-7.
      const bool fp32 = fc.format == WeightFormat::fp32;
      const bool int8 = int8_inputs(fc.format, n, cols);
      EXPECT_LE(vs_ref, fp32 ? 1e-5 : int8 ? 3e-2 : 2e-3) << rows << "x" << cols << " n=" << n;
      EXPECT_LE(vs_cpu, fp32                      ? 1e-5
                        : int8                    ? 1e-2
                        : is_quantized(fc.format) ? 3e-2
                                                  : 2e-3)
          << rows << "x" << cols << " n=" << n;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, CudaMatmul, ::testing::ValuesIn(kFormats), format_case_name);

// Every GEMV kind of a layer and the lm_head on `n` tokens x (norm + q/k/v, norm + gate/up with
// SwiGLU, w_down with its residual add, norm + lm_head), outputs poisoned beforehand: the outputs
// q, k, v, gate, up, down, the residual and the logits, one after another (empty on a failure).
std::vector<float> layer_gemv_outputs(Backend& b, BackendPair& pair, const ModelWeights& weights,
                                      int64_t n, const std::vector<float>& x) {
  const ModelConfig& config = weights.config;
  const LayerWeights& l = weights.layers[0];
  const Linear* const qkv[] = {&l.wq, &l.wk, &l.wv};
  const Linear* const head[] = {&weights.output};
  std::vector<int32_t> meta;
  if (!b.begin_batch(pair.paged(batch_of(n, meta))).is_ok()) {
    ADD_FAILURE() << "begin_batch";
    return {};
  }
  bool ok = true;
  auto take = [&](int64_t cols) {
    auto t = b.scratch(n, cols);
    ok = ok && t.is_ok();
    if (!t.is_ok()) return Tensor{};
    poison(b, *t);
    return *t;
  };
  Tensor xt = take(config.hidden_size), normed = take(config.hidden_size);
  Tensor q = take(config.q_dim()), k = take(config.kv_dim()), v = take(config.kv_dim());
  Tensor gate = take(config.intermediate_size), up = take(config.intermediate_size);
  Tensor down = take(config.hidden_size), logits = take(config.vocab_size);
  if (!ok) {
    ADD_FAILURE() << "scratch";
    return {};
  }
  fill(b, xt, x);
  const Tensor qkv_out[] = {q, k, v};
  const Tensor head_out[] = {logits};
  const Status steps[] = {
      b.norm_matmul(qkv_out, normed, xt, l.attn_norm, 1e-5f, qkv),
      b.norm_matmul_swiglu(gate, up, normed, xt, l.ffn_norm, 1e-5f, l.w_gate, l.w_up),
      b.matmul_add(down, gate, l.w_down, xt),
      b.norm_matmul(head_out, normed, xt, weights.output_norm, 1e-5f, head)};
  for (const Status& st : steps) {
    if (!st.is_ok()) {
      ADD_FAILURE() << st.message();
      return {};
    }
  }
  std::vector<float> r;
  for (Tensor t : {q, k, v, gate, up, down, xt, logits, normed}) {
    const std::vector<float> values = fetch(b, t);
    r.insert(r.end(), values.begin(), values.end());
  }
  return r;
}

// A one-layer model of seeded random weights with biases (8 heads and 2 KV heads of 64; `block`
// columns a quantization block, 0 for fp16) for the layer-GEMV tests (layer_gemv_outputs), and
// the run shape they initialize both backends with.
ModelWeights layer_gemv_model(int64_t hidden, int64_t inter, int64_t vocab, WeightFormat format,
                              int block, uint64_t seed) {
  ModelConfig config = small_config(hidden, inter, 8, 2, 64, vocab);
  config.n_layers = 1;
  return random_model(config, format, block, true, seed);
}
constexpr RunShape kLayerRun{1, 64, 64, 64};

// The current device's SMs (0 if the runtime cannot say).
int device_sms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 0;
  }
  return sms;
}

// Lifts the GEMV block cap (set_gemv_block_cap) when it goes out of scope, whichever way a test
// ends.
struct NoBlockCapAfter {
  ~NoBlockCapAfter() { cuda::set_gemv_block_cap(0); }
};

// No NaN: every output was written (layer_gemv_outputs poisons them with NaN beforehand).
bool no_nan(const std::vector<float>& v) {
  return std::none_of(v.begin(), v.end(), [](float x) { return std::isnan(x); });
}

// Values whose bit patterns differ. Both sides' outputs are poisoned with the same NaN, so an
// output neither wrote is equal here: callers check for NaN on their own (no_nan).
size_t bits_differ(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  size_t differ = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    uint32_t x, y;
    std::memcpy(&x, &a[i], 4);
    std::memcpy(&y, &b[i], 4);
    differ += x != y;
  }
  return differ;
}

// The same for fp16 bits.
size_t bits_differ(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  EXPECT_EQ(a.size(), b.size());
  size_t differ = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) differ += a[i] != b[i];
  return differ;
}

// The persistent int4 GEMV gives the same bits whichever block takes which row tile, on the dp4a
// path (one and two tokens) and the mma path (5 tokens: one n-tile; 16: two; 16-row tiles but for
// gate/up, whose swiglu tiles pair 16 rows of each): every GEMV kind of a layer and the lm_head,
// once with a wave of blocks (here one tile a block, the weights being small) and once with 3
// blocks looping over all the tiles. 1088 columns are 9 chunks, the last one half empty, so the
// warps of a block own different chunk counts and the issue cursor wraps inside every tile;
// q/k/v's tiles run from q into k and v.
TEST(CudaOps, PersistentGemvGivesTheSameBitsOnAnyGrid) {
  const NoBlockCapAfter no_cap_after;
  ModelWeights weights = layer_gemv_model(1088, 704, 300, WeightFormat::sym_int4, 32, 4100);
  const ModelConfig& config = weights.config;
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, kLayerRun));
  for (int64_t n : {1, 2, 5, 16}) {
    const std::vector<float> x = random_values(size_t(n * config.hidden_size), 4200 + n, 2.0f);
    std::vector<float> results[2];
    for (int cap : {0, 3}) {
      cuda::set_gemv_block_cap(cap);
      results[cap == 0 ? 0 : 1] = layer_gemv_outputs(*pair.gpu, pair, weights, n, x);
    }
    ASSERT_FALSE(results[0].empty());
    EXPECT_TRUE(no_nan(results[0])) << "an output left unwritten, n=" << n;
    EXPECT_EQ(bits_differ(results[0], results[1]), 0u)
        << "of " << results[0].size() << " values, n=" << n;
  }
}

// The dp4a GEMV's latency options give the bits of the path without them: its first tile with
// its bias and residual loaded around the wait (set_gemv_loads_in_epilogue), its input stage
// requesting two groups a thread at once (set_gemv_input_ahead; the wide layer's 9248-column
// down input is 289 groups, more than a block's threads) and the fused norm's weight loaded
// before the wait (set_gemv_norm_ahead). Every GEMV kind of a layer and the lm_head at one token
// (q/k/v with biases, w_down with its residual) and at two, on a wave of blocks and on 3 blocks
// looping over the tiles (later tiles load in their epilogue either way), and at one token with
// a NaN in the input. 1088 x 704 and a wider layer.
TEST(CudaOps, GemvLatencyOptionsGiveTheSameBits) {
  const NoBlockCapAfter no_cap_after;
  const int64_t shapes[][2] = {{1088, 704}, {2080, 9248}};
  for (const auto& shape : shapes) {
    ModelWeights weights = layer_gemv_model(shape[0], shape[1], 300, WeightFormat::sym_int4, 32,
                                            4500 + uint64_t(shape[0]));
    const ModelConfig& config = weights.config;
    BackendPair pair;
    ASSERT_TRUE(pair.init(weights, kLayerRun));
    for (int64_t n : {1, 2, 0}) {
      const bool nan_input = n == 0;
      if (nan_input) n = 1;
      ASSERT_TRUE(int8_inputs(WeightFormat::sym_int4, n, shape[1]));
      std::vector<float> x = random_values(size_t(n * config.hidden_size), 4600 + n, 2.0f);
      if (nan_input) x[5] = std::numeric_limits<float>::quiet_NaN();
      SCOPED_TRACE(nan_input ? "a NaN in the input" : "finite input");
      for (int cap : {0, 3}) {
        cuda::set_gemv_block_cap(cap);
        // [the options on, every option off]
        std::vector<float> results[2];
        for (int run : {0, 1}) {
          const bool plain = run == 1;
          const bool loads_before = cuda::set_gemv_loads_in_epilogue(plain);
          const bool ahead_before = cuda::set_gemv_input_ahead(!plain);
          const bool norm_before = cuda::set_gemv_norm_ahead(!plain);
          results[run] = layer_gemv_outputs(*pair.gpu, pair, weights, n, x);
          cuda::set_gemv_loads_in_epilogue(loads_before);
          cuda::set_gemv_input_ahead(ahead_before);
          cuda::set_gemv_norm_ahead(norm_before);
        }
        ASSERT_FALSE(results[0].empty());
        if (!nan_input) {
          EXPECT_TRUE(no_nan(results[0])) << "an output left unwritten, n=" << n;
          EXPECT_TRUE(no_nan(results[1])) << "an output left unwritten (plain path), n=" << n;
        }
        EXPECT_EQ(bits_differ(results[0], results[1]), 0u)
            << "of " << results[0].size() << " values, " << shape[0] << " x " << shape[1]
            << ", n=" << n << ", block cap " << cap;
      }
    }
  }
}

// Launches that ask for the SM's largest shared-memory split (set_smem_split: the carveout launch
// attribute on every launch, or on all but the mma-path GEMVs, the default), and the mma-path
// GEMVs asking for a split of their own (set_l1_reader_carveout, 71% of the largest: the 164 KB
// split on an H100 or H200), run and give the bits of launches without the attribute: every GEMV
// kind of a layer and the lm_head, int4 weights, at one token (dp4a) and sixteen (mma). Whether a
// split took effect shows in timings; Nsight's replay of a kernel alone seems to show the kernel's
// own preference instead (PERF.md, thirty-first session).
TEST(CudaOps, SmemSplitGivesTheSameBits) {
  ModelWeights weights = layer_gemv_model(1088, 704, 300, WeightFormat::sym_int4, 32, 4800);
  const ModelConfig& config = weights.config;
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, kLayerRun));
  for (int64_t n : {1, 16}) {
    const std::vector<float> x = random_values(size_t(n * config.hidden_size), 4801 + n, 2.0f);
    // [mode 0: the driver's split, 1: the largest, 2: the default, 2 with the L1 readers at 71%]
    std::vector<float> results[4];
    for (int run : {0, 1, 2, 3}) {
      const int mode_before = cuda::set_smem_split(run == 3 ? 2 : run);
      const int carveout_before = cuda::set_l1_reader_carveout(run == 3 ? 71 : -1);
      results[run] = layer_gemv_outputs(*pair.gpu, pair, weights, n, x);
      cuda::set_smem_split(mode_before);
      cuda::set_l1_reader_carveout(carveout_before);
    }
    ASSERT_FALSE(results[0].empty());
    for (int run : {1, 2, 3}) {
      ASSERT_FALSE(results[run].empty()) << "n=" << n << ", run " << run;
      EXPECT_TRUE(no_nan(results[run])) << "an output left unwritten, n=" << n << ", run " << run;
      EXPECT_EQ(bits_differ(results[0], results[run]), 0u)
          << "of " << results[0].size() << " values, n=" << n << ", run " << run;
    }
  }
}

// The fused-norm GEMVs of fp16 and sym_int8 weights under the launch bound of two blocks an SM
// (set_gemv_norm_two_blocks, the default since the thirtieth session) against three: the same
// arithmetic in the same order, so a layer's GEMV outputs keep their bits at one token (the fused
// norm's only batch). The vocabulary
// is wide enough (more 32-row tiles than twice the SMs of any device the backend runs on) that
// sym_int8's lm_head takes the two-m-tile instance, its q/k/v the one-m-tile one. The launch count
// says the switch's instances ran, once each for q/k/v, gate/up and the lm_head, and only with
// it on. (fp16 and sym_int8 launch a block a tile, so no block cap applies.)
TEST(CudaOps, GemvNormTwoBlocksGivesTheSameBits) {
  for (const WeightFormat format : {WeightFormat::fp16, WeightFormat::sym_int8}) {
    SCOPED_TRACE(format_name(format));
    const int block = format == WeightFormat::fp16 ? 0 : 32;
    ModelWeights weights =
        layer_gemv_model(1088, 2080, 10240, format, block, 4700 + uint64_t(format));
    const ModelConfig& config = weights.config;
    BackendPair pair;
    ASSERT_TRUE(pair.init(weights, kLayerRun));
    const std::vector<float> x = random_values(size_t(config.hidden_size), 4701, 2.0f);
    std::vector<float> results[2];  // [three blocks an SM, two]
    uint64_t launches[2] = {};
    for (int run : {0, 1}) {
      const bool before = cuda::set_gemv_norm_two_blocks(run == 1);
      const uint64_t start = cuda::gemv_norm_two_blocks_launches();
      results[run] = layer_gemv_outputs(*pair.gpu, pair, weights, 1, x);
      launches[run] = cuda::gemv_norm_two_blocks_launches() - start;
      cuda::set_gemv_norm_two_blocks(before);
    }
    ASSERT_FALSE(results[0].empty());
    EXPECT_TRUE(no_nan(results[0])) << "an output left unwritten";
    EXPECT_TRUE(no_nan(results[1])) << "an output left unwritten (two blocks an SM)";
    EXPECT_EQ(launches[0], 0u);
    EXPECT_EQ(launches[1], 3u) << "q/k/v, gate/up and the lm_head take the fused norm";
    EXPECT_EQ(bits_differ(results[0], results[1]), 0u) << "of " << results[0].size() << " values";
  }
}

// A layer's GEMV outputs (layer_gemv_outputs) on each of `tokens` with a switch off and on, on a
// wave of blocks and on 3 blocks looping over the tiles: every output written both ways and the
// same bits, no launch counted with the switch off and `launches_on` (`taken` says which) with it
// on. `dp4a`: whether the tokens take the dp4a path (else the mma path).
void expect_switch_keeps_bits(bool (*set)(bool), uint64_t (*count)(), BackendPair& pair,
                              const ModelWeights& weights, std::initializer_list<int64_t> tokens,
                              bool dp4a, uint64_t launches_on, const char* taken, uint64_t seed) {
  const NoBlockCapAfter no_cap_after;
  for (int64_t n : tokens) {
    ASSERT_EQ(int8_inputs(WeightFormat::sym_int4, n, weights.config.hidden_size), dp4a)
        << (dp4a ? "the dp4a path" : "the mma path");
    const std::vector<float> x =
        random_values(size_t(n * weights.config.hidden_size), seed + uint64_t(n), 2.0f);
    for (int cap : {0, 3}) {
      SCOPED_TRACE("n=" + std::to_string(n) + ", block cap " + std::to_string(cap));
      cuda::set_gemv_block_cap(cap);
      std::vector<float> results[2];  // [off, on]
      uint64_t launches[2];
      for (int on : {0, 1}) {
        const ScopedSwitch switched(set, on == 1);
        const uint64_t start = count();
        results[on] = layer_gemv_outputs(*pair.gpu, pair, weights, n, x);
        launches[on] = count() - start;
      }
      ASSERT_FALSE(results[0].empty());
      ASSERT_FALSE(results[1].empty());
      EXPECT_TRUE(no_nan(results[0])) << "an output left unwritten (switch off)";
      EXPECT_TRUE(no_nan(results[1])) << "an output left unwritten (switch on)";
      EXPECT_EQ(launches[0], 0u) << "a launch took the switch's path with it off";
      EXPECT_EQ(launches[1], launches_on) << taken;
      EXPECT_EQ(bits_differ(results[0], results[1]), 0u) << "of " << results[0].size();
    }
  }
}

// The deep ring (set_gemv_deep_ring): a one-token dp4a GEMV with no more row tiles than SMs whose
// warps have more chunks of a tile than the default ring's five requests its whole tile before
// the wait. The same arithmetic in the same order, so every output of a layer's GEMVs keeps its
// bits: w_down over 9248 columns (73 chunks, ten a warp: the ring holds the tile), 256 rows (16
// tiles, no more than the SMs of any device the backend runs on), from the swiglu GEMV's half
// groups and from its fp16 shadow, on a wave of blocks and on 3 blocks looping over the tiles (the
// ring running on into the next tile). The launch count says the deep ring ran with the switch on
// and not with it off, and not at all over 12320 columns (97 chunks, thirteen a warp: more than
// the deep ring holds), whose outputs keep their bits too. Two tokens likewise under their own
// switch (set_gemv_deep_ring_two, the two-token dp4a instance; the one-token switch, left on, does
// not reach them).
TEST(CudaOps, GemvDeepRingGivesTheSameBits) {
  for (int64_t inter : {9248, 12320}) {
    ModelWeights weights =
        layer_gemv_model(256, inter, 300, WeightFormat::sym_int4, 32, 4700 + uint64_t(inter));
    BackendPair pair;
    ASSERT_TRUE(pair.init(weights, kLayerRun));
    const ScopedSwitch one_token_on(cuda::set_gemv_deep_ring, true);
    const uint64_t launches_on = inter == 9248 ? 1 : 0;
    const char* taken = "w_down alone takes the deep ring, where it holds the tile";
    for (int64_t n : {1, 2}) ASSERT_TRUE(int8_inputs(WeightFormat::sym_int4, n, inter));
    // Half groups are one token's input: one token runs from them and from the fp16 shadow.
    for (bool halves : {true, false}) {
      SCOPED_TRACE(std::to_string(inter) + " columns" + (halves ? ", half groups" : ""));
      const ScopedSwitch halves_switch(cuda::set_gemv_half_groups, halves);
      expect_switch_keeps_bits(cuda::set_gemv_deep_ring, cuda::gemv_deep_ring_launches, pair,
                               weights, {1}, true, launches_on, taken, 4800);
    }
    SCOPED_TRACE(std::to_string(inter) + " columns");
    expect_switch_keeps_bits(cuda::set_gemv_deep_ring_two, cuda::gemv_deep_ring_launches, pair,
                             weights, {2}, true, launches_on, taken, 4800);
  }
}

// The two-stage ring of the two-m-tile int4 mma GEMVs (set_gemv_shallow_ring, the default since the
// thirty-first session) against three stages: the same arithmetic in the same order, so a layer's
// GEMV outputs keep their bits at 5 tokens (one n-tile) and 16 (two), on a wave of blocks and on 3
// blocks looping over the tiles (the ring running on into the next tile). The vocabulary is wide
// enough (320 tiles of 32 rows: at least twice the SMs up to 160 SMs; H100 and H200 have 132)
// that the lm_head takes a two-m-tile instance, as gate/up does (its 80 units of 128 rows are
// too few for the row-warp kernel, which also wants whole chunks: 1088 columns are not); the
// launch count says both took the shallow ring with the switch on, and nothing did with it off.
TEST(CudaOps, GemvShallowRingGivesTheSameBits) {
  // The lm_head's 320 tiles of 32 rows take two m-tiles where they are at least twice the SMs;
  // below 69 SMs wo and w_down (34 such tiles) would at 16 tokens too.
  const int sms = device_sms();
  if (sms > 160 || sms < 69) GTEST_SKIP() << sms << " SMs: another set of two-m-tile launches";
  ModelWeights weights = layer_gemv_model(1088, 2080, 10240, WeightFormat::sym_int4, 32, 4900);
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, kLayerRun));
  // gate/up and the lm_head take two m-tiles, and with them the shallow ring.
  expect_switch_keeps_bits(cuda::set_gemv_shallow_ring, cuda::gemv_shallow_ring_launches, pair,
                           weights, {5, 16}, false, 2, "gate/up and the lm_head take two m-tiles",
                           4901);
}

// Two m-tiles at 3-8 tokens down to half a wave (set_gemv_few_tokens_two_mtiles): w_down of 4096
// rows (128 blocks of 32: between half a wave and two of a 65-256 SM device; H100 and H200 have
// 132) takes them at 3, 5 and 8 tokens with the switch on; q/k/v (768 rows), the lm_head (300)
// and gate/up (its own swiglu instance) keep theirs. A row's m-tile is the same mma on the same
// fragments in either tile, so every output keeps its bits, on a wave of blocks and on 3 blocks
// looping over the tiles; the launch count says w_down alone took it, and nothing with it off.
TEST(CudaOps, GemvFewTokensTwoMtilesGiveTheSameBits) {
  const int sms = device_sms();
  if (sms < 65 || sms > 256) GTEST_SKIP() << sms << " SMs: w_down's 128 blocks are out of range";
  ModelWeights weights = layer_gemv_model(4096, 1088, 300, WeightFormat::sym_int4, 32, 5100);
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, kLayerRun));
  expect_switch_keeps_bits(cuda::set_gemv_few_tokens_two_mtiles,
                           cuda::gemv_few_tokens_two_mtiles_launches, pair, weights, {3, 5, 8},
                           false, 1, "w_down alone takes two m-tiles", 5101);
}

// CPU twin of cuda::quantize_token_half_groups (gemv.cuh, TokenHalfGroups): per token and group
// of 32 permuted columns, each half's (columns c with (c & 7) >= 4 in the second) largest
// magnitude over 127 rounded to fp16 (at most 515.5), the values over it rounded to the nearest
// integer (ties to even) within +-127, plus 128; NaN, and a half of non-finite maximum or zero
// scale, give 128.
void quantize_token_half_groups_host(const std::vector<uint16_t>& x, int64_t stride,
                                     std::vector<uint8_t>& codes, std::vector<uint32_t>& scales) {
  const int64_t n_groups = stride / 32;
  const int64_t n_tokens = int64_t(x.size()) / stride;
  codes.assign(x.size(), 128);
  scales.assign(size_t(n_tokens * n_groups), 0);
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t g = 0; g < n_groups; ++g) {
      const size_t at = size_t(t * stride + g * 32);
      float amax[2] = {0.0f, 0.0f};
      for (int c = 0; c < 32; ++c) {
        const float v = fp16_to_float(x[at + size_t(c)]);
        if (!std::isnan(v)) amax[(c & 7) >= 4] = std::max(amax[(c & 7) >= 4], std::fabs(v));
      }
      uint16_t bits[2] = {0, 0};
      float scale[2] = {0.0f, 0.0f};
      for (int h = 0; h < 2; ++h) {
        uint16_t s = float_to_fp16(amax[h] / 127.0f);
        if (fp16_to_float(s) > 515.5f) s = float_to_fp16(515.5f);  // 127 x it stays finite
        if (std::isfinite(amax[h]) && fp16_to_float(s) > 0.0f) {
          bits[h] = s;
          scale[h] = fp16_to_float(s);
        }
      }
      scales[size_t(t * n_groups + g)] = uint32_t(bits[0]) | uint32_t(bits[1]) << 16;
      for (int c = 0; c < 32; ++c) {
        const float v = fp16_to_float(x[at + size_t(c)]);
        const float s = scale[(c & 7) >= 4];
        float q = s > 0.0f && !std::isnan(v) ? std::nearbyint(v / s) : 0.0f;
        q = std::min(std::max(q, -127.0f), 127.0f);
        codes[at + size_t(c)] = uint8_t(int(q) + 128);
      }
    }
  }
}

// The fp16 values (bits) that TokenHalfGroups codes and scales of rows of `stride` columns stand
// for: (code - 128) * its half's scale, rounded to fp16 once.
std::vector<uint16_t> token_half_values_host(const std::vector<uint8_t>& codes,
                                             const std::vector<uint32_t>& scales, int64_t stride) {
  std::vector<uint16_t> values(codes.size());
  for (size_t i = 0; i < codes.size(); ++i) {
    const size_t column = i % size_t(stride);
    const uint32_t pair = scales[i / size_t(stride) * size_t(stride / 32) + column / 32];
    const float scale =
        fp16_to_float(uint16_t((column % 32 & 7) >= 4 ? pair >> 16 : pair & 0xffffu));
    values[i] = float_to_fp16(float(int(codes[i]) - 128) * scale);
  }
  return values;
}

// The int8 half-group input of the batch-16 mma path (TokenHalfGroups, an experiment no decode
// step uses yet): the device quantizer gives its CPU twin's codes and scales (token 0 with a NaN,
// an Inf, a zero half and halves of subnormal or zero scale where there are 6 groups), and the
// GEMV of those codes gives the same bits as the GEMV of the fp16 values they stand for (the mma
// takes exactly those values either way), on 4096 columns (whole chunks), 1568 (a last chunk of
// one group) and 96, plain and swiglu, at 9, 13 and 16 tokens and at 24 (a 16-token launch that
// reads the codes and an 8-token one that reads the fp16 values), with the codes loaded one chunk
// ahead and two (set_gemv_int8_ahead). 4240 rows take two m-tiles when plain (133 blocks of 32
// rows: at least half a wave up to 266 SMs), the others one; swiglu always two. The launch count
// says the codes were read with them given, and never without. Each case runs uncapped (a tile a
// block) and on 5 blocks (set_gemv_block_cap: several row tiles a block). 1024 rows (whole groups)
// at 9-16 tokens also check the swiglu launch's int8 output (w_down's input, ShadowOut::tokens)
// against the twin's quantization of its fp16 shadow.
TEST(CudaOps, TokenHalfGroupsMatchTheirTwinAndKeepTheGemvsBits) {
  // The row-warp kernel reads x, never the codes: kept off whatever KESTREL_CUDA_GEMV_ROWS_KERNEL
  // says (none of these shapes would take it by default).
  cuda::set_gemv_rows_kernel(2);
  struct RowsKernelBack {
    ~RowsKernelBack() { cuda::set_gemv_rows_kernel(0); }
  } rows_kernel_back;
  struct AheadBack {
    ~AheadBack() { cuda::set_gemv_int8_ahead(1); }
  } ahead_back;
  struct BlockCapBack {
    ~BlockCapBack() { cuda::set_gemv_block_cap(0); }
  } block_cap_back;
  const int64_t shapes[][2] = {{4240, 4096}, {400, 1568}, {272, 96}, {1024, 1568}};
  uint64_t seed = 5200;
  int swiglu_outputs = 0;
  // Uncapped (a tile a block on these shapes) and 5 blocks, each walking several row tiles (the
  // codes' look-ahead restarting at each tile's first chunk, as the large weights do).
  for (const int cap : {0, 5}) {
    for (const int ahead : {1, 2}) {
      cuda::set_gemv_block_cap(cap);
      cuda::set_gemv_int8_ahead(ahead);
      for (const auto& shape : shapes) {
        for (const int n : {9, 13, 16, 24}) {
          for (const bool swiglu : {false, true}) {
            SCOPED_TRACE(std::to_string(shape[0]) + " x " + std::to_string(shape[1]) +
                         ", n=" + std::to_string(n) + (swiglu ? ", swiglu" : "") + ", " +
                         std::to_string(ahead) + " chunks ahead, block cap " + std::to_string(cap));
            auto r = cuda::check_gemv_int8_activations(shape[0], shape[1], n, swiglu, seed++);
            ASSERT_TRUE(r.is_ok()) << r.status().message();
            std::vector<uint8_t> codes;
            std::vector<uint32_t> scales;
            quantize_token_half_groups_host(r->x, shape[1], codes, scales);
            EXPECT_EQ(codes, r->codes) << "the quantizer's codes differ from the CPU twin's";
            EXPECT_EQ(scales, r->scales) << "the quantizer's scales differ from the CPU twin's";
            EXPECT_EQ(r->launches_fp16, 0u) << "a launch read codes it was not given";
            EXPECT_EQ(r->launches_int8, 1u) << "the 16-token launch did not read the codes";
            ASSERT_EQ(r->y_fp16.size(), r->y_int8.size());
            EXPECT_TRUE(no_nan(r->y_fp16)) << "an output left unwritten (fp16 input)";
            EXPECT_TRUE(no_nan(r->y_int8)) << "an output left unwritten (int8 input)";
            EXPECT_EQ(bits_differ(r->y_fp16, r->y_int8), 0u) << "of " << r->y_fp16.size();
            // Swiglu over whole groups of rows at 9-16 tokens: the launch reading codes writes
            // w_down's input as codes too, the twin's of the gate's fp16 shadow, and the shadow
            // holds the values they stand for.
            const bool tokens_out = swiglu && shape[0] % 32 == 0 && n <= 16;
            ASSERT_EQ(r->swiglu_codes.empty(), !tokens_out);
            if (!tokens_out) continue;
            ++swiglu_outputs;
            std::vector<uint8_t> out_codes;
            std::vector<uint32_t> out_scales;
            quantize_token_half_groups_host(r->swiglu_plain, shape[0], out_codes, out_scales);
            EXPECT_EQ(r->swiglu_codes, out_codes) << "the swiglu epilogue's codes";
            EXPECT_EQ(r->swiglu_scales, out_scales) << "the swiglu epilogue's scales";
            EXPECT_EQ(bits_differ(r->swiglu_shadow,
                                  token_half_values_host(out_codes, out_scales, shape[0])),
                      0u)
                << "swiglu shadow values that are not their codes'";
          }
        }
      }
    }
  }
  EXPECT_EQ(swiglu_outputs, 2 * 2 * 3)
      << "the swiglu int8 outputs checked (two caps, two look-aheads, 9-16 tokens)";
}

// The int8 half groups an RMSNorm writes for the batch-16 GEMVs (ShadowOut::tokens,
// set_int8_activations): the codes and scales of every row are the CPU twin's of the norm's own
// fp16 shadow (the norm without them), and the shadow then holds the values the codes stand for;
// requantize_token_half_groups in place does the same to the plain shadow. In the float4 kernel's
// pass (4096, 2048, 8192 and 1000 columns: its instances of 4, 2, 8 and 1 float4 a thread, the
// last with the padding of a last group) and by the second launch
// after the row kernel (1566 columns); at 9, 16 and 40 rows; with a NaN and an Inf in every row
// and halves of zeros, of scales that round to zero and of subnormal scales.
TEST(CudaOps, NormTokenHalvesMatchTheirTwin) {
  uint64_t seed = 5300;
  for (const int64_t cols : {4096, 1000, 2048, 8192, 1566}) {
    for (const int64_t rows : {9, 16, 40}) {
      SCOPED_TRACE(std::to_string(rows) + " x " + std::to_string(cols));
      auto r = cuda::check_norm_token_halves(rows, cols, seed++);
      ASSERT_TRUE(r.is_ok()) << r.status().message();
      std::vector<uint8_t> codes;
      std::vector<uint32_t> scales;
      quantize_token_half_groups_host(r->plain, r->stride, codes, scales);
      EXPECT_EQ(r->codes, codes) << "the norm's codes differ from the twin's of its shadow";
      EXPECT_EQ(r->scales, scales) << "the norm's scales differ from the twin's of its shadow";
      EXPECT_EQ(r->re_codes, codes) << "the in-place quantizer's codes differ from the twin's";
      EXPECT_EQ(r->re_scales, scales) << "the in-place quantizer's scales differ from the twin's";
      // The values the codes stand for.
      const std::vector<uint16_t> values = token_half_values_host(codes, scales, r->stride);
      EXPECT_EQ(bits_differ(r->shadow, values), 0u)
          << "shadow values that are not their codes' (of " << codes.size() << ")";
      EXPECT_EQ(bits_differ(r->requantized, values), 0u)
          << "requantized values that are not their codes'";
      // The quantization did something: most codes are not zero.
      EXPECT_GT(std::count_if(codes.begin(), codes.end(), [](uint8_t c) { return c != 128; }),
                int64_t(codes.size() / 2));
    }
  }
}

// The weights' L2 policy (set_gemv_weight_evict_first): evict_first only changes which lines L2
// replaces, so every GEMV output of a layer keeps its bits, at one token (the dp4a instances, with
// their fused norms) and at 16 (the two-m-tile mma instances), in sym_int4 and in sym_int8 (the
// host layout's copies); the launch count says every GEMV of the layer took the policy with the
// switch on and none with it off.
TEST(CudaOps, GemvWeightEvictFirstGivesTheSameBits) {
  for (WeightFormat format : {WeightFormat::sym_int4, WeightFormat::sym_int8}) {
    ModelWeights weights = layer_gemv_model(512, 1376, 1000, format, 32, 5000);
    const ModelConfig& config = weights.config;
    BackendPair pair;
    ASSERT_TRUE(pair.init(weights, kLayerRun));
    for (int64_t n : {1, 16}) {
      SCOPED_TRACE(std::string(format_name(format)) + ", n=" + std::to_string(n));
      const std::vector<float> x = random_values(size_t(n * config.hidden_size), 5001 + n, 2.0f);
      std::vector<float> results[2];  // [evict_normal, evict_first]
      uint64_t launches[2];
      for (int first : {0, 1}) {
        const ScopedSwitch policy(cuda::set_gemv_weight_evict_first, first == 1);
        const uint64_t start = cuda::gemv_weight_evict_first_launches();
        results[first] = layer_gemv_outputs(*pair.gpu, pair, weights, n, x);
        launches[first] = cuda::gemv_weight_evict_first_launches() - start;
      }
      ASSERT_FALSE(results[0].empty());
      EXPECT_TRUE(no_nan(results[1])) << "an output left unwritten (evict_first)";
      EXPECT_EQ(launches[0], 0u) << "a GEMV took evict_first with the switch off";
      EXPECT_GE(launches[1], 4u) << "q/k/v, gate/up, w_down and the lm_head";
      EXPECT_EQ(bits_differ(results[0], results[1]), 0u) << "of " << results[0].size();
    }
  }
}

// The down GEMV's half-group input (HalfGroupInput): at one token the swiglu GEMV's epilogue
// quantizes each 16-row tile of its output, and w_down's blocks copy that instead of quantizing
// the fp16 shadow in groups of 32 (set_gemv_half_groups(false)). The two quantize differently,
// so w_down's outputs differ; each is checked against the exact product of the fp16-rounded gate
// (what both quantize) with the dequantized weight, in double: the halves' error no larger than
// the groups of 32's (a byte, half or scale out of place would put the outputs off by their own
// size; simulated on the CPU, the halves' error is 0.78-0.94 of the groups'). Intermediate sizes
// of 736 (46 tiles, an odd number of groups) and 9248 (w_down's columns, a multiple of 32, leave
// no tile part past the rows and no padding half), on a wave of blocks and on 3 blocks looping over
// the tiles; two tokens never take the halves (the same bits either way). Then a gate written after
// the swiglu GEMV: w_down must read the new values, not the halves.
TEST(CudaOps, GemvHalfGroupInputFromTheSwigluEpilogue) {
  const NoBlockCapAfter no_cap_after;
  const int64_t shapes[][2] = {{256, 736}, {2080, 9248}};
  for (const auto& shape : shapes) {
    SCOPED_TRACE(std::to_string(shape[0]) + " x " + std::to_string(shape[1]));
    const int64_t hidden = shape[0], inter = shape[1];
    ModelWeights weights =
        layer_gemv_model(hidden, inter, 300, WeightFormat::sym_int4, 32, 5100 + uint64_t(inter));
    const LayerWeights& l = weights.layers[0];
    BackendPair pair;
    ASSERT_TRUE(pair.init(weights, kLayerRun));
    // gate, up = swiglu(norm(x)); down = gate · w_downᵀ (+ x): [gate, down] of the device.
    auto run = [&](Backend& b, int64_t n, bool rewrite_gate) {
      std::vector<int32_t> meta;
      EXPECT_TRUE(b.begin_batch(pair.paged(batch_of(n, meta))).is_ok());
      auto xt = b.scratch(n, hidden);
      auto normed = b.scratch(n, hidden);
      auto gate = b.scratch(n, inter);
      auto up = b.scratch(n, inter);
      auto down = b.scratch(n, hidden);
      EXPECT_TRUE(xt.is_ok() && normed.is_ok() && gate.is_ok() && up.is_ok() && down.is_ok());
      if (!xt.is_ok() || !normed.is_ok() || !gate.is_ok() || !up.is_ok() || !down.is_ok()) {
        return std::pair<std::vector<float>, std::vector<float>>{};
      }
      fill(b, *xt, random_values(size_t(n * hidden), 5200 + uint64_t(n), 2.0f));
      poison(b, *down);
      EXPECT_TRUE(
          b.norm_matmul_swiglu(*gate, *up, *normed, *xt, l.ffn_norm, 1e-5f, l.w_gate, l.w_up)
              .is_ok());
      if (rewrite_gate) fill(b, *gate, random_values(size_t(n * inter), 5301, 1.0f));
      EXPECT_TRUE(b.matmul_add(*down, *gate, l.w_down, *xt).is_ok());
      return std::pair{fetch(b, *gate), fetch(b, *down)};
    };
    // The exact product of the fp16-rounded gate rows with w_down, plus its bias.
    auto exact = [&](std::vector<float> gate, int64_t n) {
      for (float& g : gate) g = fp16_to_float(float_to_fp16(g));
      return reference_matmul(l.w_down, gate, n);
    };
    for (int64_t n : {1, 2}) {
      ASSERT_TRUE(int8_inputs(WeightFormat::sym_int4, n, inter));
      for (int cap : {0, 3}) {
        cuda::set_gemv_block_cap(cap);
        std::pair<std::vector<float>, std::vector<float>> results[2];  // [groups of 32, halves]
        for (int halves : {0, 1}) {
          const bool before = cuda::set_gemv_half_groups(halves == 1);
          results[halves] = run(*pair.gpu, n, false);
          cuda::set_gemv_half_groups(before);
        }
        ASSERT_EQ(results[1].second.size(), size_t(n * hidden));
        EXPECT_EQ(bits_differ(results[0].first, results[1].first), 0u) << "the gates differ";
        EXPECT_TRUE(no_nan(results[1].second)) << "an output left unwritten, n=" << n;
        const std::vector<float> ref = exact(results[1].first, n);
        const double groups = rel_error(results[0].second, ref);
        const double halves = rel_error(results[1].second, ref);
        EXPECT_LE(groups, 2e-2) << "n=" << n << ", block cap " << cap;
        EXPECT_LE(halves, 1.25 * groups + 1e-6) << "n=" << n << ", block cap " << cap;
        if (n == 1) {
          EXPECT_GT(bits_differ(results[0].second, results[1].second), 0u)
              << "the halves were not read";
        } else {
          EXPECT_EQ(bits_differ(results[0].second, results[1].second), 0u)
              << "two tokens took the halves";
        }
      }
    }
    // A gate rewritten after the swiglu GEMV: w_down reads it, not the stale halves.
    cuda::set_gemv_block_cap(0);
    const bool before = cuda::set_gemv_half_groups(true);
    const auto rewritten = run(*pair.gpu, 1, true);
    cuda::set_gemv_half_groups(before);
    ASSERT_FALSE(rewritten.second.empty());
    EXPECT_LE(rel_error(rewritten.second, exact(rewritten.first, 1)), 2e-2)
        << "w_down read a stale input";
    EXPECT_LE(rel_error(rewritten.second, run(*pair.cpu, 1, true).second), 2e-3);
  }
}

// Call c's batch begun on b (through pair's block tables) and its q, k and v inputs and the
// attention output, [q_dim], [kv_dim], [kv_dim] and [q_dim] a token; nullopt, reported, where a
// scratch tensor could not be had.
std::optional<std::array<Tensor, 4>> begin_attention_call(Backend& b, const BackendPair& pair,
                                                          const AttentionCall& c, int64_t q_dim,
                                                          int64_t kv_dim) {
  const int64_t n = int64_t(c.positions.size());
  const std::vector<int32_t> tokens(size_t(n), 1);
  EXPECT_TRUE(
      b.begin_batch(pair.paged(BatchView{n, tokens.data(), c.positions.data(), c.seqs.data()}))
          .is_ok());
  auto qt = b.scratch(n, q_dim);
  auto kt = b.scratch(n, kv_dim);
  auto vt = b.scratch(n, kv_dim);
  auto out = b.scratch(n, q_dim);
  if (!qt.is_ok() || !kt.is_ok() || !vt.is_ok() || !out.is_ok()) {
    ADD_FAILURE() << "scratch";
    return std::nullopt;
  }
  return std::array<Tensor, 4>{*qt, *kt, *vt, *out};
}

// wo's input from decode attention in half groups (set_attention_half_groups): the tensor-core
// decode kernel's merge quantizes the fp16 shadow of its one token's output in half groups, four
// lanes of four values each, and wo's dp4a GEMV copies them instead of quantizing the shadow in
// groups of 32. Against the exact product of the fp16-rounded attention output with wo in double:
// the halves' error no larger than 1.25 times the groups' (a byte, lane or scale out of place
// would put the outputs off by their own size), and the outputs differ (the halves were read).
// Shapes: head_dim 128 with 4 query heads a KV head and with 6 (the merge loop's second pass:
// 192 quads for 128 threads), head_dim 64 with 7 (the last pass leaves half a warp idle); fp16
// and fp8 caches; one token at 41 keys (one tile: solo at head_dim 128 by default, else one
// merging split) and at 301 (five tiles: splits merged by the last), with the solo rule on and
// off. Attention's own output keeps its bits; two tokens, and an fp32 cache (the CUDA-core
// kernel), never take the halves. Then an attention output rewritten before wo: wo reads it, not
// the stale halves.
TEST(CudaOps, AttentionHalfGroupsFeedTheOutputProjection) {
  struct Shape {
    int head_dim, n_heads, n_kv;
  };
  const Shape shapes[] = {{128, 8, 2}, {128, 12, 2}, {64, 14, 2}};
  const ScopedSwitch halves_switch(cuda::set_attention_half_groups, false);
  struct Restore {  // the solo rule's default
    ~Restore() { cuda::set_decode_solo(-1); }
  } restore;
  uint64_t seed = 6100;
  for (const Shape& sh : shapes) {
    for (KvCacheType kv : {KvCacheType::fp16, KvCacheType::fp8, KvCacheType::fp32}) {
      SCOPED_TRACE("head_dim " + std::to_string(sh.head_dim) + ", " + std::to_string(sh.n_heads) +
                   " heads, cache type " + std::to_string(int(kv)));
      const int64_t q_dim = int64_t(sh.n_heads) * sh.head_dim;
      const int64_t kv_dim = int64_t(sh.n_kv) * sh.head_dim;
      constexpr int64_t hidden = 256;
      ModelConfig config = small_config(hidden, 256, sh.n_heads, sh.n_kv, sh.head_dim, 64);
      config.n_layers = 1;
      ModelWeights weights = random_model(config, WeightFormat::sym_int4, 32, true, seed++);
      const Linear& wo = weights.layers[0].wo;
      RunShape shape{2, 512, 512, 512};
      shape.kv_cache = kv;
      BackendPair pair;
      ASSERT_TRUE(pair.init(weights, shape));
      Backend& b = *pair.gpu;
      const RopeParams p{sh.head_dim, sh.n_heads, sh.n_kv};
      // rope_attention of call c, then wo adding into a residual: [attention output, wo's
      // product]; with `rewrite`, the attention output is overwritten before wo.
      auto run = [&](const AttentionCall& c, uint64_t call_seed, bool rewrite = false) {
        std::pair<std::vector<float>, std::vector<float>> result;
        const int64_t n = int64_t(c.positions.size());
        const auto io = begin_attention_call(b, pair, c, q_dim, kv_dim);
        auto proj = b.scratch(n, hidden);
        auto residual = b.scratch(n, hidden);
        if (!io || !proj.is_ok() || !residual.is_ok()) {
          if (io) ADD_FAILURE() << "scratch";
          return result;
        }
        const auto& [qt, kt, vt, out] = *io;
        fill(b, qt, random_values(size_t(n * q_dim), call_seed));
        fill(b, kt, random_values(size_t(n * kv_dim), call_seed + 1));
        fill(b, vt, random_values(size_t(n * kv_dim), call_seed + 2));
        fill(b, *residual, random_values(size_t(n * hidden), call_seed + 3));
        poison(b, out);
        poison(b, *proj);
        Status st = b.rope_attention(out, qt, kt, vt, 0, p);
        EXPECT_TRUE(st.is_ok()) << st.message();
        if (rewrite) fill(b, out, random_values(size_t(n * q_dim), call_seed + 4, 0.5f));
        st = b.matmul_add(*proj, out, wo, *residual);
        EXPECT_TRUE(st.is_ok()) << st.message();
        result = {fetch(b, out), fetch(b, *proj)};
        return result;
      };
      // The exact product of the fp16-rounded attention rows with wo, plus its bias.
      auto exact = [&](std::vector<float> attn, int64_t n) {
        for (float& a : attn) a = fp16_to_float(float_to_fp16(a));
        return reference_matmul(wo, attn, n);
      };
      run(run_of(0, 0, 300), 6200);  // the prompts (the flash prefill kernel, or the split one)
      run(run_of(1, 0, 40), 6300);
      const AttentionCall decodes[] = {{{300}, {0}}, {{40}, {1}}, {{300, 40}, {0, 1}}};
      uint64_t call_seed = 6400;
      for (int solo : {-1, 0}) {  // the solo rule's default (one tile), and off
        cuda::set_decode_solo(solo);
        for (const AttentionCall& c : decodes) {
          const int64_t n = int64_t(c.positions.size());
          SCOPED_TRACE(std::to_string(n) + " tokens at position " + std::to_string(c.positions[0]) +
                       (solo == 0 ? ", solo off" : ""));
          ASSERT_TRUE(int8_inputs(WeightFormat::sym_int4, n, q_dim));
          std::pair<std::vector<float>, std::vector<float>> results[2];  // [groups of 32, halves]
          for (int halves : {0, 1}) {
            cuda::set_attention_half_groups(halves == 1);
            results[halves] = run(c, call_seed);  // the same rows: the cache gets the same values
            cuda::set_attention_half_groups(false);
          }
          call_seed += 10;
          ASSERT_EQ(results[1].second.size(), size_t(n * hidden));
          EXPECT_EQ(bits_differ(results[0].first, results[1].first), 0u)
              << "the attention outputs differ";
          EXPECT_TRUE(no_nan(results[1].first) && no_nan(results[1].second))
              << "an output left unwritten";
          const std::vector<float> ref = exact(results[1].first, n);
          const double groups = rel_error(results[0].second, ref);
          const double halves = rel_error(results[1].second, ref);
          EXPECT_LE(groups, 2e-2);
          EXPECT_LE(halves, 1.25 * groups + 1e-6);
          if (n == 1 && kv != KvCacheType::fp32) {
            EXPECT_GT(bits_differ(results[0].second, results[1].second), 0u)
                << "the halves were not read";
          } else {
            EXPECT_EQ(bits_differ(results[0].second, results[1].second), 0u)
                << "a launch without halves took them";
          }
        }
      }
      cuda::set_decode_solo(-1);
      // An attention output rewritten after attention: wo reads it, not the stale halves.
      cuda::set_attention_half_groups(true);
      const auto rewritten = run(AttentionCall{{300}, {0}}, call_seed, true);
      cuda::set_attention_half_groups(false);
      ASSERT_FALSE(rewritten.second.empty());
      EXPECT_LE(rel_error(rewritten.second, exact(rewritten.first, 1)), 2e-2)
          << "wo read a stale input";
    }
  }
}

// Two switches of the decode attention give the same bits as its old paths: its fp16 tiles
// copied a cache block a warp (set_decode_block_copy) put the same bytes in the same places as
// the copies a row a thread, and a group of at most 8 query heads leaving out the fragments' rows
// 8-15 (set_decode_lower_rows) changes no value that is read. The outputs and the rotated q and k
// keep their bits. Head_dim 128 with 4 and 6 query heads a KV head (the lower rows alone), 64
// with 7, and 128 with 12 (rows 8-11 too), over an fp16 and an fp8 cache (the lower rows' stores
// on the fp8 paths; the block copy is the fp16 tiles'). Slot 1's prompt fills 64 positions whose
// V rows past 40 are NaN: a decode at 40 (41 keys: two live blocks, one partly live holding the
// token's own key, one wholly past the context) turns NaN if a row past the context is read as
// live. Slot 0 decodes at 301 keys (five tiles, the last the same way), both at once, and slot 1
// at 41 and 42 together (one slot twice: no rope in attention, the last live key read from the
// cache, not written by the kernel); with the solo rule on and off, and with one split walking
// every tile (its copies ahead into the second stage, the own key's tile not the first).
TEST(CudaOps, AttentionBlockCopyAndLowerRowsGiveTheSameBits) {
  struct Shape {
    int head_dim, n_heads, n_kv;
  };
  const Shape shapes[] = {{128, 8, 2}, {128, 12, 2}, {64, 14, 2}, {128, 24, 2}};
  struct Restore {  // the solo rule's and the split cap's defaults
    ~Restore() {
      cuda::set_decode_solo(-1);
      cuda::set_decode_split_cap(0);
    }
  } restore;
  uint64_t seed = 6700;
  for (const KvCacheType kv : {KvCacheType::fp16, KvCacheType::fp8}) {
    for (const Shape& sh : shapes) {
      SCOPED_TRACE(std::string(kv == KvCacheType::fp8 ? "fp8" : "fp16") + " cache, head_dim " +
                   std::to_string(sh.head_dim) + ", " + std::to_string(sh.n_heads) + " heads");
      const int64_t q_dim = int64_t(sh.n_heads) * sh.head_dim;
      const int64_t kv_dim = int64_t(sh.n_kv) * sh.head_dim;
      ModelConfig config = small_config(256, 256, sh.n_heads, sh.n_kv, sh.head_dim, 64);
      config.n_layers = 1;
      ModelWeights weights = random_model(config, WeightFormat::sym_int4, 32, true, seed++);
      RunShape shape{2, 512, 512, 512};
      shape.kv_cache = kv;
      BackendPair pair;
      ASSERT_TRUE(pair.init(weights, shape));
      Backend& b = *pair.gpu;
      const RopeParams p{sh.head_dim, sh.n_heads, sh.n_kv};
      // rope_attention of call c: [output, q, k] as it leaves them. Tokens at positions from
      // nan_v_from on get NaN V rows.
      auto run = [&](const AttentionCall& c, uint64_t call_seed, int32_t nan_v_from = -1) {
        std::vector<std::vector<float>> result;
        const int64_t n = int64_t(c.positions.size());
        const auto io = begin_attention_call(b, pair, c, q_dim, kv_dim);
        if (!io) return result;
        const auto& [qt, kt, vt, out] = *io;
        std::vector<float> v = random_values(size_t(n * kv_dim), call_seed + 2);
        for (int64_t i = 0; nan_v_from >= 0 && i < n; ++i) {
          if (c.positions[size_t(i)] < nan_v_from) continue;
          std::fill_n(v.begin() + i * kv_dim, kv_dim, std::numeric_limits<float>::quiet_NaN());
        }
        fill(b, qt, random_values(size_t(n * q_dim), call_seed));
        fill(b, kt, random_values(size_t(n * kv_dim), call_seed + 1));
        fill(b, vt, v);
        poison(b, out);
        const Status st = b.rope_attention(out, qt, kt, vt, 0, p);
        EXPECT_TRUE(st.is_ok()) << st.message();
        result = {fetch(b, out), fetch(b, qt), fetch(b, kt)};
        return result;
      };
      run(run_of(0, 0, 300), 6800);  // the prompts
      run(run_of(1, 0, 64), 6900, 41);
      const AttentionCall decodes[] = {
          {{300}, {0}}, {{40}, {1}}, {{300, 40}, {0, 1}}, {{41, 42}, {1, 1}}};
      uint64_t call_seed = 7000;
      for (int mode : {0, 1, 2}) {  // solo by default, solo off, one split
        cuda::set_decode_solo(mode == 1 ? 0 : -1);
        cuda::set_decode_split_cap(mode == 2 ? 1 : 0);
        for (const AttentionCall& c : decodes) {
          SCOPED_TRACE(std::to_string(c.positions.size()) + " tokens at position " +
                       std::to_string(c.positions[0]) +
                       (mode == 1   ? ", solo off"
                        : mode == 2 ? ", one split"
                                    : ""));
          // [the old paths, a block a warp, the lower rows]: the same rows each time, so the
          // cache gets the same values.
          std::vector<std::vector<float>> results[3];
          for (int variant : {0, 1, 2}) {
            const ScopedSwitch copy(cuda::set_decode_block_copy, variant == 1);
            const ScopedSwitch lower(cuda::set_decode_lower_rows, variant == 2);
            results[variant] = run(c, call_seed);
          }
          call_seed += 10;
          const char* const what[] = {"the outputs", "the rotated q", "the rotated k"};
          for (int variant : {0, 1, 2}) {
            SCOPED_TRACE(variant == 0   ? "the old paths"
                         : variant == 1 ? "a block a warp"
                                        : "the lower rows");
            ASSERT_EQ(results[variant].size(), 3u);
            EXPECT_TRUE(no_nan(results[variant][0]))
                << "an output left unwritten, or a row past the context read";
            if (variant == 0) continue;
            for (int i = 0; i < 3; ++i) {
              EXPECT_EQ(bits_differ(results[0][i], results[variant][i]), 0u)
                  << what[i] << " differ";
            }
          }
        }
      }
    }
  }
}

// The dp4a input stage's two paths in one input: with input ahead on, a group of finite values
// is packed by byte permutes (packed_group) and a group with a NaN or an infinity takes the
// conversion's path; with it off, every group takes the conversion. Inputs exact in fp16, so the
// shadow holds what the CPU quantizes: groups of ties (amax 127, so x.5 scales to x.5 and rounds
// to even), zeros, negative zeros and subnormals, 65504 (fp16's largest) beside small values,
// one small value among zeros, the rest multiples of 1/64. Against the CPU backend within the
// summation order (a value packed into the wrong byte, or rounded the other way, gives errors
// far above it) and the same bits on both paths; then a NaN in one group (the conversion's rule:
// it counts as 0 and the other 31 keep their scale, so the outputs stay finite) and an infinity
// in another (bits only). One token and two (kDp 1 and 2), 18 groups.
TEST(CudaOps, GemvInputStagePackedGroupsKeepTheConversionsBits) {
  constexpr int64_t rows = 200, cols = 576;
  ModelWeights weights;
  weights.config = small_config(cols, rows, 1, 1, 64, 16);
  weights.config.n_layers = 1;
  weights.format = WeightFormat::sym_int4;
  weights.layers.resize(1);
  weights.layers[0].w_gate = random_linear(WeightFormat::sym_int4, rows, cols, 32, true, 4800);
  const Linear& w = weights.layers[0].w_gate;
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, RunShape{1, 8, 8, 8}));
  auto run = [&](Backend& b, int64_t n, const std::vector<float>& x) {
    std::vector<int32_t> meta;
    EXPECT_TRUE(b.begin_batch(pair.paged(batch_of(n, meta))).is_ok());
    auto xt = b.scratch(n, cols);
    auto yt = b.scratch(n, rows);
    EXPECT_TRUE(xt.is_ok() && yt.is_ok());
    if (!xt.is_ok() || !yt.is_ok()) return std::vector<float>{};
    fill(b, *xt, x);
    poison(b, *yt);
    const Status st = b.matmul(*yt, *xt, w);
    EXPECT_TRUE(st.is_ok()) << st.message();
    return fetch(b, *yt);
  };
  for (int64_t n : {1, 2}) {
    ASSERT_TRUE(int8_inputs(WeightFormat::sym_int4, n, cols));
    std::vector<float> x(size_t(n * cols));
    uint64_t state = 4900 + uint64_t(n);
    for (float& v : x) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      v = float(int64_t(state >> 33) % 513 - 256) / 64.0f;  // [-4, 4] in steps of 1/64
    }
    for (int64_t t = 0; t < n; ++t) {
      float* g = x.data() + t * cols;
      for (int i = 0; i < 32; ++i) g[i] = float(i % 31 - 15) + 0.5f;  // ties
      g[7] = t == 0 ? 127.0f : -127.0f;
      for (int i = 32; i < 64; ++i) g[i] = 0.0f;
      for (int i = 64; i < 96; ++i) g[i] = i % 2 ? -0.0f : std::ldexp(float(i - 64), -24);
      for (int i = 96; i < 128; ++i) g[i] = float(i - 112) / 8.0f;
      g[100] = 65504.0f;
      for (int i = 128; i < 160; ++i) g[i] = 0.0f;
      g[131] = 1.0f / 1024.0f;
    }
    std::vector<float> with_nan = x, with_inf = x;
    with_nan[5 * 32 + 3] = std::numeric_limits<float>::quiet_NaN();
    with_inf[6 * 32 + 9] = std::numeric_limits<float>::infinity();
    struct Case {
      const char* what;
      const std::vector<float>* input;
    };
    const Case cases[] = {{"finite", &x}, {"a NaN", &with_nan}, {"an infinity", &with_inf}};
    for (const Case& c : cases) {
      SCOPED_TRACE(std::string(c.what) + ", n=" + std::to_string(n));
      // [conversion, packed groups]
      std::vector<float> results[2];
      for (int mode : {1, 0}) {
        const bool before = cuda::set_gemv_input_ahead(mode != 0);
        results[mode] = run(*pair.gpu, n, *c.input);
        cuda::set_gemv_input_ahead(before);
      }
      ASSERT_EQ(results[1].size(), size_t(n * rows));
      EXPECT_EQ(bits_differ(results[1], results[0]), 0u);
      if (c.input == &with_inf) continue;
      EXPECT_TRUE(no_nan(results[1]));
      if (c.input == &x) {
        EXPECT_LE(rel_error(results[1], run(*pair.cpu, n, x)), 1e-5);
      }
    }
  }
}

// The row-warp GEMV (gemv.cu; forced here, as the test weights are too small for its default
// rule) on every GEMV kind of a layer and the lm_head, int4 with 32- and 64-wide blocks, sym and
// asym, at 3-16 tokens (one n-tile and two) and 45 (three 16-token launches): against the CPU
// backend (int8 activations there: the mma path's ~1e-2), against the column-split kernel (the
// same fp16 arithmetic summed in another order: a wrong row, token, scale or input stage gives
// errors near 1), and the same bits with a wave of blocks and with 3 blocks looping over every
// unit. 1024 columns are 8 chunks, 768 (w_down's input) 6; q/k/v's 768 rows are 6 units of 128
// (q's four, then k's and v's one each); the lm_head's 300 rows end inside its third unit; the
// gate's 768 make 12 swiglu units of 64.
TEST(CudaOps, RowWarpGemvMatchesCpuAndColumnSplitKernel) {
  const NoBlockCapAfter no_cap_after;
  struct Case {
    WeightFormat format;
    int block;
  };
  const Case cases[] = {
      {WeightFormat::sym_int4, 32}, {WeightFormat::sym_int4, 64}, {WeightFormat::asym_int4, 32}};
  for (const Case& fc : cases) {
    SCOPED_TRACE(std::string(format_name(fc.format)) + " block " + std::to_string(fc.block));
    ModelWeights weights =
        layer_gemv_model(1024, 768, 300, fc.format, fc.block, 4300 + uint64_t(fc.block));
    const ModelConfig& config = weights.config;
    BackendPair pair;
    ASSERT_TRUE(pair.init(weights, kLayerRun));
    for (int64_t n : {3, 5, 9, 16, 45}) {
      const std::vector<float> x = random_values(size_t(n * config.hidden_size), 4400 + n, 2.0f);
      // [CPU, row-warp kernel, column-split kernel, row-warp kernel on 3 blocks]
      std::vector<float> results[4];
      for (int run = 0; run < 4; ++run) {
        cuda::set_gemv_rows_kernel(run == 2 ? 2 : 1);
        cuda::set_gemv_block_cap(run == 3 ? 3 : 0);
        results[run] = layer_gemv_outputs(run == 0 ? *pair.cpu : *pair.gpu, pair, weights, n, x);
      }
      cuda::set_gemv_rows_kernel(0);
      ASSERT_FALSE(results[1].empty());
      EXPECT_TRUE(no_nan(results[1])) << "an output left unwritten, n=" << n;
      EXPECT_LE(rel_error(results[1], results[0]), 3e-2) << "row-warp vs CPU, n=" << n;
      EXPECT_LE(rel_error(results[1], results[2]), 1e-4) << "row-warp vs column-split, n=" << n;
      EXPECT_EQ(bits_differ(results[1], results[3]), 0u)
          << "of " << results[1].size() << " values, n=" << n;
    }
  }
}

// Prefill GEMMs (more than 64 rows) through the two fp16 copies of DequantAhead (gemm.cuh): every
// linear of two layers in the forward order (each copy but the first made ahead, under the GEMM
// before it: counted), then in an order that guesses wrong (backwards, a weight twice in a row,
// layers interleaved) with the lm_head, larger than a copy, through slices in between. Each order
// runs three times with every GEMM issued back to back (outputs poisoned beforehand): plainly
// (which also loads every kernel, so no lazy load synchronizes later), behind a 20 ms stall of
// the backend's stream (still running when the last GEMM is issued: checked), so a copy made
// ahead that did not wait for the last GEMM reading its buffer would overwrite it first, and with
// every copy made ahead delayed 3 ms, so a GEMM that did not wait for its copy would read a stale
// one. Each result against the dequantized reference: either race gives errors near 1.
TEST(CudaOps, PrefillGemmsWithCopiesMadeAhead) {
  ModelConfig config = small_config(320, 896, 4, 2, 64, 2000);
  config.n_layers = 2;
  ModelWeights weights = random_model(config, WeightFormat::sym_int4, 32, true, 5100);
  BackendPair pair;
  constexpr int64_t n = 96;
  // Room in the scratch arena for every input and output of an order at once.
  ASSERT_TRUE(pair.init(weights, RunShape{4, 256, 8 * n, n}));
  Backend& b = *pair.gpu;
  std::vector<const Linear*> forward;
  for (const LayerWeights& l : weights.layers) {
    for (const Linear* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) {
      forward.push_back(w);
    }
  }
  const LayerWeights& l0 = weights.layers[0];
  const LayerWeights& l1 = weights.layers[1];
  const std::vector<const Linear*> scrambled = {
      &l1.w_down, &l1.w_up,        &l1.w_gate, &l1.w_gate, &weights.output, &l0.wq,
      &l1.wq,     &l0.wk,          &l1.wk,     &l0.w_down, &l0.wo,          &l1.wo,
      &l0.w_gate, &weights.output, &l0.w_up,   &l1.w_down, &l0.wv,          &l0.wk};
  const std::vector<const Linear*>& forward_order = forward;
  enum class Mode { plain, stalled_stream, delayed_copies };
  // The copy delay is process-wide: off again whatever happens below.
  struct DelayOff {
    ~DelayOff() { cuda::set_dequant_ahead_delay(0); }
  } delay_off;
  for (const Mode mode : {Mode::plain, Mode::stalled_stream, Mode::delayed_copies}) {
    for (const auto* order : {&forward_order, &scrambled}) {
      const char* what = mode == Mode::plain            ? "plain"
                         : mode == Mode::stalled_stream ? "stalled stream"
                                                        : "delayed copies";
      std::vector<int32_t> meta;
      ASSERT_TRUE(b.begin_batch(pair.paged(batch_of(n, meta))).is_ok());
      std::map<int64_t, std::vector<float>> inputs;  // by width
      std::map<int64_t, Tensor> input_tensors;
      for (int64_t cols : {config.hidden_size, config.q_dim(), config.intermediate_size}) {
        inputs[cols] = random_values(size_t(n * cols), 5200 + uint64_t(cols));
        auto t = b.scratch(n, cols);
        ASSERT_TRUE(t.is_ok());
        fill(b, *t, inputs[cols]);
        input_tensors[cols] = *t;
      }
      std::vector<Tensor> outs;
      for (const Linear* w : *order) {
        auto y = b.scratch(n, w->w.rows);
        ASSERT_TRUE(y.is_ok());
        poison(b, *y);  // synchronizes: done before any GEMM is issued
        outs.push_back(*y);
      }
      const int64_t hits = cuda::dequant_ahead_hits(b);
      if (mode == Mode::stalled_stream) {
        ASSERT_TRUE(cuda::delay_stream(b, 20000).is_ok());
      }
      if (mode == Mode::delayed_copies) cuda::set_dequant_ahead_delay(3000);
      for (size_t i = 0; i < outs.size(); ++i) {
        const Linear& w = *(*order)[i];
        const Status s = b.matmul(outs[i], input_tensors.at(w.w.cols), w);
        ASSERT_TRUE(s.is_ok()) << s.message();
      }
      if (mode == Mode::stalled_stream) {
        // Every GEMM was issued while the stall still held the stream.
        EXPECT_EQ(cudaStreamQuery(static_cast<cudaStream_t>(cuda::backend_stream(b))),
                  cudaErrorNotReady);
      }
      cuda::set_dequant_ahead_delay(0);
      for (size_t i = 0; i < outs.size(); ++i) {
        const Linear& w = *(*order)[i];
        const std::vector<float> ref = reference_matmul(w, inputs.at(w.w.cols), n);
        EXPECT_LE(rel_error(fetch(b, outs[i]), ref), 2e-3)
            << (order == &forward_order ? "forward" : "scrambled") << " order, " << what
            << ", GEMM " << i << " (" << w.w.rows << " x " << w.w.cols << ")";
      }
      if (order == &forward_order) {
        EXPECT_GE(cuda::dequant_ahead_hits(b) - hits, int64_t(order->size()) - 1) << what;
      }
    }
  }
}

// q, k and v of one input in one launch (backend_op_checks.h).
TEST(CudaOps, MatmulMultiRunsEveryWeight) {
  auto bound = [](int64_t n, int64_t cols) {
    return int8_inputs(WeightFormat::sym_int4, n, cols) ? 3e-2 : 2e-3;
  };
  check_matmul_multi(bound);
  // More row tiles than the device holds blocks at once: a persistent dp4a block's tiles cross
  // from q into k and v (one and two tokens), and the mma path's grid is that large too.
  MultiShape large;
  large.cols = 64;
  large.rows[0] = 12000;
  large.rows[1] = 6000;
  large.rows[2] = 4000;
  large.tokens = {1, 2, 5};
  check_matmul_multi(bound, large);
}

// --- elementwise ops and norms ---------------------------------------------------------------

class CudaElementwise : public ::testing::Test {
 protected:
  void SetUp() override {
    weights_.config = small_config(300, 352, 4, 2, 64, 50);
    weights_.config.n_layers = 1;
    weights_.format = WeightFormat::fp16;
    weights_.layers.resize(1);
    weights_.layers[0].attn_norm = random_vector(300, 7);
    weights_.layers[0].w_gate = random_linear(WeightFormat::fp16, 352, 300, 0, false, 8);
    weights_.layers[0].w_down = random_linear(WeightFormat::sym_int4, 300, 352, 32, false, 9);
    ASSERT_TRUE(pair_.init(weights_, RunShape{2, 4096, 64, 64}));
  }

  // Runs `op` on both backends with the same fresh inputs; returns {cpu, gpu} outputs.
  template <typename Op>
  std::pair<std::vector<float>, std::vector<float>> run_both(
      int64_t n, const std::vector<std::pair<int64_t, std::vector<float>>>& inputs,
      int64_t out_cols, Op op, const BatchView* batch = nullptr) {
    std::vector<float> results[2];
    int i = 0;
    for (Backend* b : {pair_.cpu.get(), pair_.gpu.get()}) {
      std::vector<int32_t> meta;
      EXPECT_TRUE(
          b->begin_batch(pair_.paged(batch != nullptr ? *batch : batch_of(n, meta))).is_ok());
      std::vector<Tensor> ts;
      for (const auto& [cols, values] : inputs) {
        auto t = b->scratch(n, cols);
        EXPECT_TRUE(t.is_ok());
        fill(*b, *t, values);
        ts.push_back(*t);
      }
      auto out = b->scratch(n, out_cols);
      EXPECT_TRUE(out.is_ok());
      poison(*b, *out);
      const Status s = op(*b, *out, ts);
      EXPECT_TRUE(s.is_ok()) << s.message();
      results[i++] = fetch(*b, *out);
    }
    return {results[0], results[1]};
  }

  ModelWeights weights_;
  BackendPair pair_;
};

TEST_F(CudaElementwise, RmsNorm) {
  for (int64_t n : {1, 5, 40}) {
    const auto [cpu, gpu] =
        run_both(n, {{300, random_values(size_t(n * 300), 11 + uint64_t(n), 3.0f)}}, 300,
                 [&](Backend& b, Tensor out, std::vector<Tensor>& in) {
                   return b.rms_norm(out, in[0], weights_.layers[0].attn_norm, 1e-5f);
                 });
    EXPECT_LE(rel_error(gpu, cpu), 1e-6) << "n=" << n;
  }
}

// RMSNorm at widths the fixture's 300 does not reach: 302 (off the float4 grid: the scalar kernel),
// 1100 (two float4 a thread, the shadow padded to 1120) and 8000 (eight), alone and with the
// shadow the next matmul reads, for a single token, a decode batch of 16 (the GEMV's permuted
// shadow) and 80 tokens (the GEMM's natural one). fp16 weights: an int4 upload takes only whole
// groups of 32 columns.
TEST(CudaOps, RmsNormAtEveryKernelWidth) {
  for (int64_t cols : {302, 1100, 8000}) {
    ModelConfig config = small_config(cols, 64, 4, 2, 64, 50);
    config.n_layers = 1;
    ModelWeights weights = random_model(config, WeightFormat::fp16, 0, true, 900 + cols);
    BackendPair pair;
    ASSERT_TRUE(pair.init(weights, RunShape{1, 96, 96, 96}));
    const LayerWeights& l = weights.layers[0];
    for (int64_t n : {1, 16, 80}) {
      const std::vector<float> x = random_values(size_t(n * cols), 910 + uint64_t(n), 3.0f);
      std::vector<float> normed[2], product[2];
      int i = 0;
      for (Backend* b : {pair.cpu.get(), pair.gpu.get()}) {
        std::vector<int32_t> meta;
        ASSERT_TRUE(b->begin_batch(pair.paged(batch_of(n, meta))).is_ok());
        auto xt = b->scratch(n, cols);
        auto ht = b->scratch(n, cols);
        auto yt = b->scratch(n, config.intermediate_size);
        ASSERT_TRUE(xt.is_ok() && ht.is_ok() && yt.is_ok());
        fill(*b, *xt, x);
        poison(*b, *ht);
        poison(*b, *yt);
        ASSERT_TRUE(b->rms_norm(*ht, *xt, l.attn_norm, 1e-5f).is_ok());
        ASSERT_TRUE(b->matmul(*yt, *ht, l.w_gate).is_ok());
        normed[i] = fetch(*b, *ht);
        product[i++] = fetch(*b, *yt);
      }
      EXPECT_LE(rel_error(normed[1], normed[0]), 1e-6) << cols << " columns, n=" << n;
      EXPECT_LE(rel_error(product[1], product[0]), 2e-3) << cols << " columns, n=" << n;
    }
  }
}

// A quantized weight whose rows end inside a scale block (2080 columns of 64-wide blocks) is
// refused at upload with the weight's name (the embedding table's, uploaded first), not
// multiplied wrongly; 32-wide blocks of the same width are taken. Both int4 formats.
TEST(CudaOps, UploadRefusesRowsEndingInsideABlock) {
  ModelConfig config = small_config(2080, 128, 4, 2, 64, 50);
  config.n_layers = 1;
  for (const auto& [format, block] :
       {std::pair{WeightFormat::sym_int4, 32}, std::pair{WeightFormat::sym_int4, 64},
        std::pair{WeightFormat::asym_int4, 32}, std::pair{WeightFormat::asym_int4, 64}}) {
    SCOPED_TRACE(std::string(format_name(format)) + " block " + std::to_string(block));
    ModelWeights weights = random_model(config, format, block, false, 950);
    auto gpu = make_device_backend();
    ASSERT_TRUE(gpu.is_ok()) << gpu.status().message();
    const Status s = (*gpu)->upload(weights);
    if (block == 32) {
      EXPECT_TRUE(s.is_ok()) << s.message();
    } else {
      ASSERT_FALSE(s.is_ok());
      EXPECT_NE(
          s.message().find("cuda upload tok_embd: quantized width 2080 / block 64 unsupported"),
          std::string::npos)
          << s.message();
    }
  }
}

// The fp16 shadow rms_norm writes is what the next matmul reads (width 300: padded groups).
TEST_F(CudaElementwise, RmsNormShadowFeedsMatmul) {
  for (int64_t n : {2, 16, 24}) {
    const auto [cpu, gpu] =
        run_both(n, {{300, random_values(size_t(n * 300), 21 + uint64_t(n))}}, 352,
                 [&](Backend& b, Tensor out, std::vector<Tensor>& in) {
                   auto h = b.scratch(n, 300);
                   if (!h.is_ok()) return h.status();
                   KS_RETURN_IF_ERROR(b.rms_norm(*h, in[0], weights_.layers[0].attn_norm, 1e-5f));
                   return b.matmul(out, *h, weights_.layers[0].w_gate);
                 });
    EXPECT_LE(rel_error(gpu, cpu), 2e-3) << "n=" << n;
  }
}

TEST_F(CudaElementwise, SwigluAndItsShadowFeedMatmul) {
  for (int64_t n : {3, 20}) {
    const auto inputs = std::vector<std::pair<int64_t, std::vector<float>>>{
        {352, random_values(size_t(n * 352), 31 + uint64_t(n), 2.0f)},
        {352, random_values(size_t(n * 352), 32 + uint64_t(n))}};
    const auto [cpu, gpu] =
        run_both(n, inputs, 352, [](Backend& b, Tensor out, std::vector<Tensor>& in) {
          return b.swiglu(out, in[0], in[1]);
        });
    EXPECT_LE(rel_error(gpu, cpu), 1e-6) << "n=" << n;
    // A width off the 4-column grid takes the scalar kernel.
    const auto odd = std::vector<std::pair<int64_t, std::vector<float>>>{
        {350, random_values(size_t(n * 350), 33 + uint64_t(n), 2.0f)},
        {350, random_values(size_t(n * 350), 34 + uint64_t(n))}};
    const auto [cpu_odd, gpu_odd] =
        run_both(n, odd, 350, [](Backend& b, Tensor out, std::vector<Tensor>& in) {
          return b.swiglu(out, in[0], in[1]);
        });
    EXPECT_LE(rel_error(gpu_odd, cpu_odd), 1e-6) << "n=" << n << ", 350 columns";
    // In place, as the forward pass calls it, then the down projection reads the shadow.
    const auto [cpu2, gpu2] =
        run_both(n, inputs, 300, [&](Backend& b, Tensor out, std::vector<Tensor>& in) {
          KS_RETURN_IF_ERROR(b.swiglu(in[0], in[0], in[1]));
          return b.matmul(out, in[0], weights_.layers[0].w_down);
        });
    EXPECT_LE(rel_error(gpu2, cpu2), 3e-2) << "n=" << n;
  }
}

TEST_F(CudaElementwise, AddAndGather) {
  const int64_t n = 9;
  const auto x = random_values(size_t(n * 300), 41);
  const auto y = random_values(size_t(n * 300), 42);
  const auto [cpu, gpu] =
      run_both(n, {{300, x}, {300, y}}, 300, [](Backend& b, Tensor out, std::vector<Tensor>& in) {
        KS_RETURN_IF_ERROR(b.add(in[0], in[1]));
        const int32_t rows[] = {0, 1, 2, 3, 4, 5, 6, 7, 8};
        return b.gather_rows(out, in[0], rows, 9);
      });
  EXPECT_EQ(gpu, cpu);
  const int32_t picks[] = {8, 0, 3, 3};
  std::vector<float> results[2];
  int i = 0;
  for (Backend* b : {pair_.cpu.get(), pair_.gpu.get()}) {
    std::vector<int32_t> meta;
    ASSERT_TRUE(b->begin_batch(pair_.paged(batch_of(n, meta))).is_ok());
    auto src = b->scratch(n, 300);
    auto out = b->scratch(4, 300);
    ASSERT_TRUE(src.is_ok() && out.is_ok());
    fill(*b, *src, x);
    poison(*b, *out);
    ASSERT_TRUE(b->gather_rows(*out, *src, picks, 4).is_ok());
    results[i++] = fetch(*b, *out);
  }
  EXPECT_EQ(results[1], results[0]);
}

TEST_F(CudaElementwise, ArgmaxRowsTakesTheFirstOfTies) {
  check_argmax_rows_first_of_ties();
}

TEST_F(CudaElementwise, ReadRowsAndNanArgmaxMatchTheCpu) {
  check_read_rows_and_nan_argmax();
}

// The CUDA sampler (draw.cu) draws the host sampler's tokens: a real vocabulary's width, one
// that is not a multiple of anything, and one narrower than a warp's segment; with top-p's
// histograms in three 32-bit parts (the default at these widths) and in 64-bit sums (the form
// of rows wider than 2^18 tokens, forced by set_draw_wide_histograms); with the passes' loads
// ahead and the hot buckets (the default) and without (set_draw_ahead(false)).
TEST(CudaDraw, PickRowsDrawTheHostSamplersTokens) {
  const ScopedSwitch wide(cuda::set_draw_wide_histograms, false);
  const ScopedSwitch ahead_switch(cuda::set_draw_ahead, true);
  for (const bool ahead : {true, false}) {
    cuda::set_draw_ahead(ahead);
    for (const bool wide : {false, true}) {
      cuda::set_draw_wide_histograms(wide);
      for (const int64_t cols : {int64_t(151936), int64_t(4097), int64_t(37)}) {
        SCOPED_TRACE("cols " + std::to_string(cols) + (wide ? ", 64-bit histograms" : "") +
                     (ahead ? "" : ", one load at a time"));
        check_pick_rows_draw_as_the_host_sampler(cols, 1234 + uint64_t(cols));
      }
    }
  }
}

// The draw workspace holds the model's vocabulary a row: rows wider than that are refused with
// draws, by pick_rows and start_argmax alike (which then queues nothing), and taken without them
// (the argmax alone reads any width).
TEST(CudaDraw, RowsWiderThanTheWorkspaceAreRefusedOnlyWithDraws) {
  const int64_t vocab = 4096;
  ModelWeights model = one_layer_model(vocab);
  BackendPair pair;
  ASSERT_TRUE(pair.init(model, RunShape{1, 16, 16, 16}));
  Backend& b = *pair.gpu;
  std::vector<int32_t> meta;
  ASSERT_TRUE(b.begin_batch(pair.paged(batch_of(1, meta))).is_ok());
  auto wide = b.scratch(1, 2 * vocab);
  ASSERT_TRUE(wide.is_ok()) << wide.status().message();
  std::vector<float> v = random_values(size_t(2 * vocab), 5);
  v[size_t(vocab + 17)] = 40.0f;
  fill(b, *wide, v);
  RowDraw d;
  d.row = 0;
  d.params.temperature = 1.0f;
  d.vocab_size = int32_t(vocab);
  d.u = 0.5;
  std::vector<int32_t> out(1, -1);
  const std::vector<RowDraw> draws{d};
  EXPECT_NE(b.pick_rows(*wide, draws, out.data()).message().find("reserved"), std::string::npos);
  EXPECT_NE(b.start_argmax(*wide, draws).message().find("reserved"), std::string::npos);
  std::vector<int32_t> none;
  EXPECT_NE(b.finish_argmax(&none).message().find("no argmax queued"), std::string::npos);
  const Status s = b.pick_rows(*wide, {}, out.data());
  ASSERT_TRUE(s.is_ok()) << s.message();
  EXPECT_EQ(out[0], int32_t(vocab + 17));
}

// The sliced argmax (the default: a row's columns over several blocks, the last to
// count in picking the best of theirs) against the CPU's and the one-block kernel's: widths that
// are and are not multiples of 4 (float4 and scalar loads), of one slice and of many; ties
// within a slice, across slices and at a slice boundary (the lower index wins); a row of NaN and
// one of -inf; 1, 5 and 16 rows; twice in a row (the counters left at zero).
TEST(CudaArgmax, SlicedMatchesCpuAndOneBlock) {
  for (const int64_t cols :
       {int64_t(151936), int64_t(128257), int64_t(4096), int64_t(4097), int64_t(37)}) {
    SCOPED_TRACE("cols " + std::to_string(cols));
    ModelWeights big = one_layer_model(cols);
    BackendPair pair;
    ASSERT_TRUE(pair.init(big, RunShape{1, 16, 16, 16}));
    for (const int64_t n : {int64_t(1), int64_t(5), int64_t(16)}) {
      SCOPED_TRACE("rows " + std::to_string(n));
      std::vector<float> v = random_values(size_t(n * cols), 77 + uint64_t(n));
      auto at = [&](int64_t r, int64_t c) -> float& { return v[size_t(r * cols + c)]; };
      at(0, cols / 3) = 50.0f;
      at(0, std::min(cols - 1, cols / 3 + 4096)) = 50.0f;  // another slice's tie
      if (n > 1) at(1, cols - 1) = 60.0f;
      if (n > 2) std::fill(&at(2, 0), &at(2, 0) + cols, NAN);
      if (n > 3) std::fill(&at(3, 0), &at(3, 0) + cols, -INFINITY);
      if (n > 4 && cols > 4096) {
        at(4, 4095) = 70.0f;  // the last column of slice 0 and the first of slice 1
        at(4, 4096) = 70.0f;
      }
      std::vector<int32_t> results[3];
      const bool sliced_before = cuda::set_argmax_sliced(false);
      for (int i = 0; i < 3; ++i) {
        Backend& b = i == 0 ? *pair.cpu : *pair.gpu;
        cuda::set_argmax_sliced(i == 2);
        std::vector<int32_t> meta;
        ASSERT_TRUE(b.begin_batch(pair.paged(batch_of(n, meta))).is_ok());
        auto t = b.scratch(n, cols);
        ASSERT_TRUE(t.is_ok());
        fill(b, *t, v);
        for (int rep = 0; rep < (i == 2 ? 2 : 1); ++rep) {
          results[i].assign(size_t(n), -1);
          const Status s = b.argmax_rows(*t, results[i].data());
          ASSERT_TRUE(s.is_ok()) << s.message();
        }
      }
      cuda::set_argmax_sliced(sliced_before);
      EXPECT_EQ(results[1], results[0]);
      EXPECT_EQ(results[2], results[0]);
      EXPECT_EQ(results[2][0], cols / 3);
      if (n > 4 && cols > 4096) {
        EXPECT_EQ(results[2][4], 4095);
      }
    }
  }
}

class CudaRope : public ::testing::TestWithParam<bool> {};

TEST_P(CudaRope, MatchesCpuAtLargePositions) {
  check_rope_at_large_positions(GetParam(), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(PlainAndLlama3, CudaRope, ::testing::Bool());

class CudaEmbed : public ::testing::TestWithParam<FormatCase> {};

TEST_P(CudaEmbed, RowsMatchCpu) {
  const FormatCase fc = GetParam();
  ModelWeights weights;
  weights.config = small_config(192, 64, 1, 1, 64, 300);
  weights.config.n_layers = 1;
  weights.format = fc.format;
  weights.layers.resize(1);
  weights.tok_embd = random_weight(fc.format, 300, 192, fc.block, 71);
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, RunShape{1, 64, 16, 16}));
  const int64_t n = 6;
  const int32_t tokens[n] = {299, 0, 17, 17, 150, 1};
  const int32_t positions[n] = {0, 1, 2, 3, 4, 5};
  const int32_t seqs[n] = {0, 0, 0, 0, 0, 0};
  std::vector<float> results[2];
  int i = 0;
  for (Backend* b : {pair.cpu.get(), pair.gpu.get()}) {
    ASSERT_TRUE(b->begin_batch(pair.paged(BatchView{n, tokens, positions, seqs})).is_ok());
    auto out = b->scratch(n, 192);
    ASSERT_TRUE(out.is_ok());
    poison(*b, *out);
    ASSERT_TRUE(b->embed(*out, weights.tok_embd).is_ok());
    results[i++] = fetch(*b, *out);
  }
  // Every format is reproduced exactly (an fp32 model's table stays fp32 on the device).
  EXPECT_EQ(rel_error(results[1], results[0]), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Formats, CudaEmbed, ::testing::ValuesIn(kFormats), format_case_name);

// --- attention -------------------------------------------------------------------------------

using AttentionCase = std::tuple<int, KvCacheType>;  // head_dim, CUDA KV cache entries

class CudaAttention : public ::testing::TestWithParam<AttentionCase> {};

// Runs `calls` on both backends of a model with n_heads query and n_kv KV heads of head_dim, in
// two layers (layer 1 with other keys and values: the layers' caches must not mix), and compares
// each call's output and the rotated q and k. The device runs rope_attention, the CPU rope then
// attention; the device's op times say whether the rotation rode in the attention launch, which
// it must exactly for at most 64 tokens of distinct sequences at head_dim 64 / 128 over an fp16
// or fp8 cache. The CPU keeps fp32 entries; the bound says what the CUDA cache's entries cost.
//
// `v_scale` multiplies every value row (small rows test an fp8 cache's scales below fp16's
// normal range); with `v_spread`, the value rows of position p are further multiplied by
// 2^((9 floor(p / 37) mod 25) - 12): runs of 37 positions at 2^-12, 2^-3, 2^6, 2^-10, 2^-1, 2^8,
// ..., so an fp8 cache's rows' scales change across and inside 64-key tiles.
void check_attention_calls(int head_dim, KvCacheType kv_cache, int n_heads, int n_kv,
                           RunShape shape, const std::vector<AttentionCall>& calls,
                           float v_scale = 1.0f, bool v_spread = false) {
  ModelWeights weights = attention_model(head_dim, n_heads, n_kv);
  shape.kv_cache = kv_cache;
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, shape));
  const RopeParams p{head_dim, n_heads, n_kv};
  const int64_t q_dim = int64_t(n_heads) * head_dim, kv_dim = int64_t(n_kv) * head_dim;
  uint64_t seed = 1000 + uint64_t(head_dim);
  for (size_t ci = 0; ci < calls.size(); ++ci) {
    const AttentionCall& c = calls[ci];
    const int64_t n = int64_t(c.positions.size());
    const std::vector<int32_t> tokens(size_t(n), 1);
    const auto q = random_values(size_t(n * q_dim), seed++);
    const auto k = random_values(size_t(n * kv_dim), seed++);
    auto v = random_values(size_t(n * kv_dim), seed++);
    for (int64_t j = 0; j < n; ++j) {
      const int run = c.positions[size_t(j)] / 37;
      const float spread = v_spread ? std::ldexp(1.0f, (9 * run) % 25 - 12) : 1.0f;
      for (int64_t e = 0; e < kv_dim; ++e) v[size_t(j * kv_dim + e)] *= v_scale * spread;
    }
    for (int64_t layer : {0, 1}) {
      std::vector<float> results[2], rotated_q[2], rotated_k[2];
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
        const bool device = b == pair.gpu.get();
        Status s;
        if (device) {
          ASSERT_TRUE(cuda::set_op_timing(*b, true).is_ok());  // also clears the op times
          s = b->rope_attention(*out, *qt, *kt, *vt, layer, p);
        } else {
          ASSERT_TRUE(b->rope(*qt, *kt, p).is_ok());
          s = b->attention(*out, *qt, *kt, *vt, layer, p);
        }
        ASSERT_TRUE(s.is_ok()) << s.message();
        results[i] = fetch(*b, *out);
        rotated_q[i] = fetch(*b, *qt);
        rotated_k[i] = fetch(*b, *kt);
        ++i;
        if (device) {  // the op times are read after the fetches' synchronization
          std::map<std::string, int64_t> launches;
          for (const cuda::OpTime& t : cuda::op_times(*b)) launches[t.op] += t.calls;
          ASSERT_TRUE(cuda::set_op_timing(*b, false).is_ok());
          const std::set<int32_t> seqs(c.seqs.begin(), c.seqs.end());
          const bool in_kernel = int64_t(seqs.size()) == n && n <= 64 &&
                                 (head_dim == 64 || head_dim == 128) &&
                                 kv_cache != KvCacheType::fp32;
          EXPECT_EQ(launches["rope + cache write"], in_kernel ? 0 : 1) << "call " << ci;
          EXPECT_EQ(launches["attention"], 1) << "call " << ci;
        }
      }
      // The rotation is the same fp32 arithmetic on both sides (CudaRope's bound).
      EXPECT_LE(rel_error(rotated_q[1], rotated_q[0]), 1e-6) << "call " << ci << " rotated q";
      EXPECT_LE(rel_error(rotated_k[1], rotated_k[0]), 1e-6) << "call " << ci << " rotated k";
      // fp16 queries, keys, values and probabilities: ~1e-3. fp8 entries (3 mantissa bits,
      // relative rounding up to 1/16): a few percent. fp32 entries: fp32 arithmetic.
      const double bound = kv_cache == KvCacheType::fp8    ? 6e-2
                           : kv_cache == KvCacheType::fp32 ? 1e-5
                                                           : 5e-3;
      EXPECT_LE(rel_error(results[1], results[0]), bound)
          << "call " << ci << " (" << n << " tokens) layer " << layer;
    }
  }
}

// Holds the decode attention's solo rule (cuda::set_decode_solo) for a scope.
struct DecodeSolo {
  explicit DecodeSolo(int tiles) { cuda::set_decode_solo(tiles); }
  ~DecodeSolo() { cuda::set_decode_solo(-1); }
  DecodeSolo(const DecodeSolo&) = delete;
  DecodeSolo& operator=(const DecodeSolo&) = delete;
};

// The model-shaped calls (model_attention_calls: prefill chunks on the flash path for head_dim
// 64/128 over fp16 and fp8 caches, decode batches, interleaved and packed runs), then a long
// prefill chunk and a 16-token decode batch at 600 positions, whose splits walk several chunks
// each (check_attention_calls; the three-sequence batch and the single token are the ones whose
// rotation rides in the split kernel). Once with each count of the prefill kernel's key groups,
// then once with the decode kernel held to one split.
TEST_P(CudaAttention, MatchesCpuOverPrefillAndDecode) {
  const auto [head_dim, kv_cache] = GetParam();
  const int n_heads = 8, n_kv = 2;
  const RunShape shape{3, 1024, 512, 512};
  if (kv_cache == KvCacheType::fp8 && head_dim % 16 != 0) {
    ModelWeights weights = attention_model(head_dim, n_heads, n_kv);
    RunShape fp8_shape = shape;
    fp8_shape.kv_cache = kv_cache;
    auto gpu = make_cuda_backend();
    ASSERT_TRUE(gpu.is_ok()) << gpu.status().message();
    ASSERT_TRUE((*gpu)->upload(weights).is_ok());
    const Status s = (*gpu)->reserve(weights.config, fp8_shape);
    ASSERT_FALSE(s.is_ok());
    EXPECT_NE(s.message().find("multiple of 16"), std::string::npos) << s.message();
    return;
  }
  std::vector<AttentionCall> calls = model_attention_calls();
  calls.push_back(run_of(0, 149, 451));
  AttentionCall wide;
  for (int32_t i = 0; i < 10; ++i) {
    wide.positions.push_back(600 + i);
    wide.seqs.push_back(0);
  }
  for (int32_t i = 0; i < 6; ++i) {
    wide.positions.push_back(91 + i);
    wide.seqs.push_back(1);
  }
  calls.push_back(wide);

  // The flash prefill kernel with one key group and with two (each group walking every other
  // key tile, merged at the end): the packed run at positions 6.. and the chunk at 51.. give
  // query tiles whose rows see no key of the second group's first tile.
  for (int groups : {1, 2}) {
    SCOPED_TRACE("prefill key groups " + std::to_string(groups));
    cuda::set_prefill_attention_groups(groups);
    check_attention_calls(head_dim, kv_cache, n_heads, n_kv, shape, calls);
  }
  cuda::set_prefill_attention_groups(0);
  // The tensor-core decode kernel (head_dim 64 / 128 over fp16 or fp8; the cap leaves the
  // CUDA-core kernel alone) with one split a (token, KV head): a block walks the whole context
  // (up to 10 tiles here: the 16-token batch at 600 positions) and merges only itself.
  if ((head_dim != 64 && head_dim != 128) || kv_cache == KvCacheType::fp32) return;
  struct SplitCap {
    SplitCap() { cuda::set_decode_split_cap(1); }
    ~SplitCap() { cuda::set_decode_split_cap(0); }
  } cap;
  // Each group's one split merging itself through the workspace, and (head_dim 128, solo) writing
  // its output itself.
  for (int solo : {0, 1}) {
    SCOPED_TRACE(solo ? "one decode split, solo" : "one decode split");
    const DecodeSolo forced(solo);
    check_attention_calls(head_dim, kv_cache, n_heads, n_kv, shape, calls);
  }
  // Six query heads a KV head (the 1.5B's group): at head_dim 128 the warps' merge has G x D / 4
  // = 192 outputs of four dimensions for the block's 128 threads, so its loop takes a second
  // pass, in the partial results and in the solo output.
  for (int solo : {0, 1}) {
    SCOPED_TRACE(solo ? "six query heads a KV head, solo" : "six query heads a KV head");
    const DecodeSolo forced(solo);
    check_attention_calls(head_dim, kv_cache, 12, 2, shape, calls);
  }
  // 16 query heads a KV head (the most a group holds), splits uncapped (the one-wave rule: 10
  // used at 600 positions on 132 SMs): the merge's 16 x D / 4 outputs take several rounds of the
  // block's 128 threads.
  cuda::set_decode_split_cap(0);
  SCOPED_TRACE("16 query heads a KV head, splits uncapped");
  check_attention_calls(head_dim, kv_cache, 32, 2, shape, calls);
}

// Decode batches of distinct sequences where the split kernel's rotation takes its other paths:
// with 16 KV heads a 16-token slice gets one or two splits per (token, KV head), so a split walks
// several 64-key tiles and the token's own tile is loaded inside its loop (either stage), not
// before the wait; 23 sequences make two slices, the second's splits reading q and k while the
// first slice's merging splits have rotated their own in place, and its arrival counts starting
// from the zeros the first left; positions sit at the edges of tiles
// (63, 64, 127, 128 keys before). A second step reads the rows the first wrote in-kernel, and a
// single token ends it.
TEST_P(CudaAttention, RotatesInsideDecodeAcrossTilesAndSlices) {
  const auto [head_dim, kv_cache] = GetParam();
  if (kv_cache == KvCacheType::fp8 && head_dim % 16 != 0) return;  // refused (the test above)
  const int lengths[8] = {63, 64, 15, 127, 128, 1, 200, 65};
  const int n_seqs = 23;
  std::vector<AttentionCall> calls;
  for (int32_t s = 0; s < n_seqs; ++s) calls.push_back(run_of(s, 0, lengths[s % 8]));
  for (int32_t step = 0; step < 2; ++step) {
    AttentionCall decode;
    for (int32_t s = 0; s < n_seqs; ++s) {
      decode.positions.push_back(lengths[s % 8] + step);
      decode.seqs.push_back(s);
    }
    calls.push_back(decode);
  }
  calls.push_back(AttentionCall{{lengths[3] + 2}, {3}});
  // fp8: value rows of widely different scales too (check_attention_calls' v_spread). Then with
  // contexts of up to two tiles in one split that writes its own output (head_dim 128, solo):
  // the lengths up to 128 and the second steps past them.
  for (int solo : {0, 2}) {
    SCOPED_TRACE("solo " + std::to_string(solo));
    const DecodeSolo forced(solo);
    check_attention_calls(head_dim, kv_cache, 32, 16, RunShape{24, 256, 256, 256}, calls, 1.0f,
                          kv_cache == KvCacheType::fp8);
  }
}

// fp8 value rows whose scale (largest entry / 448) is below fp16's normal range: at head_dim 64
// the decode kernel scales those rows in fp32, the others by an fp16 multiply (a subnormal fp16
// scale would cost them most of their bits); at 128 the scale rides in the P·V weights, whose
// largest is 1 whatever the scales. Values of about 2^-16 put every row there; prompts of 200 and
// 70 keys, then a decode step of both sequences over several tiles.
TEST(CudaAttentionFp8, SmallValueRowsKeepTheirPrecision) {
  std::vector<AttentionCall> calls = {run_of(0, 0, 200), run_of(1, 0, 70)};
  calls.push_back(AttentionCall{{200, 70}, {0, 1}});
  for (int head_dim : {64, 128}) {
    SCOPED_TRACE("head_dim " + std::to_string(head_dim));
    check_attention_calls(head_dim, KvCacheType::fp8, 8, 2, RunShape{2, 512, 256, 256}, calls,
                          1.0f / 65536.0f);
  }
}

// fp8 value rows whose scales span 2^-12 .. 2^8 (v_spread): the decode kernel's fp8 path at
// head_dim 128 carries each V row's scale in the P·V weights against a second running maximum,
// which later tiles raise (larger rows at positions 74 and 185 on), so a wrong rescale of o between
// tiles shows, as would weights leaving fp16's range. Prompts of 200 and 70 keys, then two decode
// steps of both sequences (the new rows written in the kernel, with their own scales), with one
// split a (token, KV head), whose block walks every tile, and with the one-wave rule.
TEST(CudaAttentionFp8, RowsOfWidelyDifferentScales) {
  std::vector<AttentionCall> calls = {run_of(0, 0, 200), run_of(1, 0, 70)};
  calls.push_back(AttentionCall{{200, 70}, {0, 1}});
  calls.push_back(AttentionCall{{201, 71}, {0, 1}});
  for (int cap : {0, 1}) {
    SCOPED_TRACE("decode split cap " + std::to_string(cap));
    cuda::set_decode_split_cap(cap);
    for (int head_dim : {64, 128}) {
      SCOPED_TRACE("head_dim " + std::to_string(head_dim));
      check_attention_calls(head_dim, KvCacheType::fp8, 8, 2, RunShape{2, 512, 256, 256}, calls,
                            1.0f, true);
    }
  }
  cuda::set_decode_split_cap(0);
}

INSTANTIATE_TEST_SUITE_P(HeadDims, CudaAttention,
                         ::testing::Combine(::testing::Values(64, 128, 24),
                                            ::testing::Values(KvCacheType::automatic,
                                                              KvCacheType::fp8, KvCacheType::fp32)),
                         [](const ::testing::TestParamInfo<AttentionCase>& info) {
                           return "d" + std::to_string(std::get<0>(info.param)) + "_" +
                                  kv_cache_name(std::get<1>(info.param));
                         });

// --- fused ops -------------------------------------------------------------------------------

// The launches (op timing's names and calls) one call of check_fused_ops's sequence takes: the
// decode GEMV carries every fusion up to 64 tokens (the norm as its input stage at batch 1
// only), GEMMs and the plain kernels take over beyond, and fp32 weights never fuse. rope rides
// in the cache write, except in a decode batch of distinct sequences (here n = 1: one sequence)
// over an fp16 cache, where the attention launch does it; no op needs an fp16 shadow launch of
// its own.
std::map<std::string, int64_t> fused_launches(WeightFormat format, int64_t n) {
  if (format == WeightFormat::fp32) {
    return {{"rms_norm", 3}, {"matmul (fp32)", 5},      {"add", 2},
            {"swiglu", 1},   {"rope + cache write", 1}, {"attention", 1}};
  }
  if (n == 1) {
    return {{"rms_norm + matmul", 2},
            {"rms_norm + matmul + swiglu", 1},
            {"matmul + add", 2},
            {"attention", 1}};
  }
  if (n <= 64) {  // the GEMV, a launch per 16 tokens inside each op (kMaxGemvBatchTokens)
    return {{"rms_norm", 3},           {"matmul", 2},   {"matmul + swiglu", 1}, {"matmul + add", 2},
            {"rope + cache write", 1}, {"attention", 1}};
  }
  return {{"rms_norm", 3}, {"matmul (prefill)", 5},   {"add", 2},
          {"swiglu", 1},   {"rope + cache write", 1}, {"attention", 1}};
}

class CudaFusedOps : public ::testing::TestWithParam<FusedCase> {};

// Every fused op against the CPU's plain ops (backend_op_checks.h) at 80, 33, 16, 2 and 1 tokens,
// with the bounds of the plain ops' tests, and the kernels each call launched.
TEST_P(CudaFusedOps, MatchCpuPlainOpsAndTakeTheFusedKernels) {
  const auto [fc, bias] = GetParam();
  ModelWeights weights = fused_ops_model(fc, bias);
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, fused_ops_shape()));
  const bool fp32 = fc.format == WeightFormat::fp32;
  auto bound = [&](FusedOutput what, int64_t) {
    switch (what) {
      case FusedOutput::normed:  // fp32 on both sides (also the GEMV's block 0): sum order only
        return 1e-5;
      case FusedOutput::rope:  // the rope kernel's bound (CudaRope)
        return 1e-6;
      case FusedOutput::attention:  // fp32 or fp16 cache entries (CudaAttention)
        return fp32 ? 1e-5 : 5e-3;
      case FusedOutput::matmul:
        break;
    }
    // CudaMatmul's bounds against the CPU (the int4 dp4a path's 1e-2 inside the 3e-2).
    return fp32 ? 1e-5 : is_quantized(fc.format) ? 3e-2 : 2e-3;
  };
  auto watch = [&](Backend& device, int64_t n, bool done) {
    if (!done) {
      ASSERT_TRUE(cuda::set_op_timing(device, true).is_ok());  // also clears the op times
      return;
    }
    std::map<std::string, int64_t> calls;
    for (const cuda::OpTime& t : cuda::op_times(device)) calls[t.op] += t.calls;
    EXPECT_EQ(calls, fused_launches(fc.format, n)) << "n=" << n;
    ASSERT_TRUE(cuda::set_op_timing(device, false).is_ok());
  };
  check_fused_ops(pair, weights, bound, watch);
}

INSTANTIATE_TEST_SUITE_P(FormatsAndBiases, CudaFusedOps,
                         ::testing::Combine(::testing::ValuesIn(kFormats), ::testing::Bool()),
                         fused_case_name);

// An fp32 model computes in fp32 at every token count (batch-1 decode, a few tokens, the
// 16-token graph size, prefill): a layer's sequence of ops as the forward pass issues them
// (norm, q/k/v with biases, o projection + residual, norm, gate/up + swiglu, down + residual,
// final norm, an lm_head off the 32-column grid), through the fused ops the forward pass calls,
// matches the CPU within fp32 summation order, and none of the GEMV fusions is taken (each of
// them reads fp16).
TEST(CudaOps, Fp32ModelMatmulsComputeInFp32) {
  const int64_t hidden = 256, inter = 200, q_dim = 256, kv_dim = 64, vocab = 1000;
  ModelConfig config = small_config(hidden, inter, 4, 1, 64, vocab);
  config.n_layers = 1;
  ModelWeights weights = random_model(config, WeightFormat::fp32, 0, true, 121);
  const LayerWeights& l = weights.layers[0];
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, RunShape{1, 128, 128, 128}));
  enum { x, h, q, k, v, proj, gate, up, logits, n_tensors };
  const int64_t widths[n_tensors] = {hidden, hidden, q_dim, kv_dim, kv_dim,
                                     hidden, inter,  inter, vocab};
  for (int64_t n : {1, 3, 16, 100}) {
    ASSERT_TRUE(cuda::set_op_timing(*pair.gpu, true).is_ok());  // also clears the op times
    const auto x0 = random_values(size_t(n * hidden), 140 + uint64_t(n), 2.0f);
    std::vector<float> results[2][8];
    int i = 0;
    for (Backend* b : {pair.cpu.get(), pair.gpu.get()}) {
      std::vector<int32_t> meta;
      ASSERT_TRUE(b->begin_batch(pair.paged(batch_of(n, meta))).is_ok());
      Tensor t[n_tensors];
      for (int j = 0; j < n_tensors; ++j) {
        auto s = b->scratch(n, widths[j]);
        ASSERT_TRUE(s.is_ok());
        t[j] = *s;
        if (j == x) {
          fill(*b, t[j], x0);
        } else {
          poison(*b, t[j]);
        }
      }
      // The forward pass's fused ops, q standing in for attention's output.
      const Tensor qkv[] = {t[q], t[k], t[v]};
      const Linear* const qkv_w[] = {&l.wq, &l.wk, &l.wv};
      ASSERT_TRUE(b->norm_matmul(qkv, t[h], t[x], l.attn_norm, 1e-5f, qkv_w).is_ok());
      ASSERT_TRUE(b->matmul_add(t[proj], t[q], l.wo, t[x]).is_ok());
      ASSERT_TRUE(
          b->norm_matmul_swiglu(t[gate], t[up], t[h], t[x], l.ffn_norm, 1e-5f, l.w_gate, l.w_up)
              .is_ok());
      ASSERT_TRUE(b->matmul_add(t[proj], t[gate], l.w_down, t[x]).is_ok());
      const Tensor head[] = {t[logits]};
      const Linear* const head_w[] = {&weights.output};
      const Status s = b->norm_matmul(head, t[h], t[x], weights.output_norm, 1e-5f, head_w);
      ASSERT_TRUE(s.is_ok()) << s.message();
      const int read[] = {q, k, v, gate, up, x, h, logits};
      for (int r = 0; r < 8; ++r) results[i][r] = fetch(*b, t[read[r]]);
      i++;
    }
    const char* names[] = {"q",          "k",     "v", "silu(gate) * up", "up", "x + o + down",
                           "final norm", "logits"};
    for (int r = 0; r < 8; ++r) {
      EXPECT_LE(rel_error(results[1][r], results[0][r]), 1e-5) << names[r] << " n=" << n;
    }
    // Against the double-precision product of the CPU's own inputs as well: the lm_head alone.
    EXPECT_LE(rel_error(results[1][7], reference_matmul(weights.output, results[0][6], n)), 1e-5)
        << "logits against the reference, n=" << n;
    // Every op launched alone: 5 matmul calls, 3 norms, 2 adds, 1 swiglu, and nothing else (no
    // "rms_norm + matmul", "matmul + add", "matmul + swiglu", fp16 "matmul" or "shadow").
    std::map<std::string, int64_t> calls;
    int64_t total = 0;
    for (const cuda::OpTime& t : cuda::op_times(*pair.gpu)) {
      calls[t.op] += t.calls;
      total += t.calls;
    }
    EXPECT_EQ(calls["matmul (fp32)"], 5) << "n=" << n;
    EXPECT_EQ(calls["rms_norm"], 3) << "n=" << n;
    EXPECT_EQ(calls["add"], 2) << "n=" << n;
    EXPECT_EQ(calls["swiglu"], 1) << "n=" << n;
    EXPECT_EQ(total, 11) << "n=" << n;
  }
}

TEST(CudaBackend, ReportsMemoryAndRejectsBadBatches) {
  ModelWeights weights;
  weights.config = small_config(128, 128, 2, 1, 64, 32);
  weights.config.n_layers = 1;
  weights.layers.resize(1);
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, RunShape{2, 128, 32, 32}));
  Backend& b = *pair.gpu;
  EXPECT_GT(b.memory_in_use(), 0u);
  EXPECT_GE(b.peak_memory(), b.memory_in_use());
  auto layout = b.reserve_layout(weights.config, RunShape{2, 128, 32, 32});
  ASSERT_TRUE(layout.is_ok());
  EXPECT_GE(layout->total_bytes(), b.memory_in_use() / 2);
  const int32_t token = 99, pos = 0, seq = 0, bad_seq = 2, bad_pos = 128;
  EXPECT_FALSE(b.begin_batch(pair.paged(BatchView{1, &token, &pos, &seq})).is_ok());
  const int32_t ok_token = 3;
  EXPECT_FALSE(b.begin_batch(pair.paged(BatchView{1, &ok_token, &pos, &bad_seq})).is_ok());
  EXPECT_FALSE(b.begin_batch(pair.paged(BatchView{1, &ok_token, &bad_pos, &seq})).is_ok());
  EXPECT_TRUE(b.begin_batch(pair.paged(BatchView{1, &ok_token, &pos, &seq})).is_ok());
  // A table entry outside the pool, and no table at all.
  BatchView outside = pair.paged(BatchView{1, &ok_token, &pos, &seq});
  std::vector<int32_t> bad_table(pair.tables.entries);
  bad_table[0] = int32_t(RunShape{2, 128, 32, 32}.pool_blocks());
  outside.block_tables = bad_table.data();
  EXPECT_FALSE(b.begin_batch(outside).is_ok());
  EXPECT_FALSE(b.begin_batch(BatchView{1, &ok_token, &pos, &seq}).is_ok());
  Linear not_uploaded = random_linear(WeightFormat::fp16, 8, 128, 0, false, 5);
  auto x = b.scratch(1, 128);
  auto y = b.scratch(1, 8);
  ASSERT_TRUE(x.is_ok() && y.is_ok());
  const Status s = b.matmul(*y, *x, not_uploaded);
  EXPECT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("matmul"), std::string::npos) << s.message();
}

// --- decoder layer ---------------------------------------------------------------------------

// The variable a CUDA backend reads when it is created: "1" turns its batch-1 layer kernel on,
// "0" off (unset: the backend's default).
constexpr const char* kLayerKernelVariable = "KESTREL_CUDA_LAYER_KERNEL";

// A CUDA backend with the layer kernel on ("1") or off ("0"), the variable as it was again
// afterwards.
// A CUDA backend created while `variable` is `value` (the backend reads its switches once, when
// it is created); the variable is restored afterwards.
Result<std::unique_ptr<Backend>> make_cuda_backend_with(const char* variable, const char* value) {
  const char* was = std::getenv(variable);
  const std::optional<std::string> saved =
      was != nullptr ? std::optional<std::string>(was) : std::nullopt;
  setenv(variable, value, 1);
  auto backend = make_cuda_backend();
  if (saved) {
    setenv(variable, saved->c_str(), 1);
  } else {
    unsetenv(variable);
  }
  return backend;
}

Result<std::unique_ptr<Backend>> make_cuda_backend_with_layer_kernel(bool enabled) {
  return make_cuda_backend_with(kLayerKernelVariable, enabled ? "1" : "0");
}

// Whether the CUDA backend's batch-1 layer kernel takes `dc`'s layers: all seven weights sym_int4
// or asym_int4, an fp16 cache (asked for or automatic), head_dim 64 or 128, at most 8 query heads
// per KV head, every weight's columns a multiple of 128 and a hidden size up to 8192.
bool layer_kernel_takes(const DecoderLayerCase& dc) {
  const WeightFormat f = dc.format.format;
  return (f == WeightFormat::sym_int4 || f == WeightFormat::asym_int4) &&
         (dc.kv_cache == KvCacheType::automatic || dc.kv_cache == KvCacheType::fp16) &&
         (dc.head_dim == 64 || dc.head_dim == 128) && dc.n_heads % dc.n_kv_heads == 0 &&
         dc.n_heads / dc.n_kv_heads <= 8 && dc.hidden % 128 == 0 && dc.hidden <= 8192 &&
         dc.intermediate % 128 == 0 && (dc.n_heads * dc.head_dim) % 128 == 0;
}

// The bound of a layer's update of x against the CPU for calls of n tokens (check_decoder_layer):
// the update passes through three matmuls in series (q/k/v, attention, wo; the norm of x + o,
// gate/up, w_down) and attention, so it is held to the sum of their op tests' bounds: CudaMatmul's
// against the CPU (1e-2 where the int4 GEMV quantizes its input to int8 as the CPU does, 3e-2
// for the other int4 paths' fp16 input, 2e-3 for float weights) and CudaAttention's (5e-3 over
// fp16 entries, 6e-2 over fp8), the latter for scores kLayerScoreScale times as large as that
// test's. The int4 dp4a path comes to 4.1e-2, the fp16-input int4 paths to 0.1 (the Vulkan
// backend, fp32 throughout, misses the CPU by up to 2.3e-2 on the same check).
double layer_bound_vs_cpu(const DecoderLayerCase& dc, int64_t n) {
  const WeightFormat f = dc.format.format;
  const bool int8 = int8_inputs(f, n, dc.hidden) && int8_inputs(f, n, dc.n_heads * dc.head_dim) &&
                    int8_inputs(f, n, dc.intermediate);
  const double matmul = int8 ? 1e-2 : is_quantized(f) ? 3e-2 : 2e-3;
  const double attention = dc.kv_cache == KvCacheType::fp8 ? 6e-2 : 5e-3;
  return 3 * matmul + kLayerScoreScale * attention;
}

// check_decoder_layer's watch on a CUDA device: op timing on for each call's layers, and the
// "decoder layer" ops they issued counted: `per_decode_step` in a batch-1 decode step (one per
// layer with the kernel, none without), none in a prefill call. `decode_steps` counts the steps.
auto count_layer_kernels(int64_t per_decode_step, int64_t* decode_steps) {
  return [=](Backend& device, int64_t n, bool done) {
    if (!done) {
      ASSERT_TRUE(cuda::set_op_timing(device, true).is_ok());  // also clears the op times
      return;
    }
    int64_t layer_ops = 0, ops = 0;
    for (const cuda::OpTime& t : cuda::op_times(device)) {
      ops += t.calls;
      if (t.op == "decoder layer") layer_ops += t.calls;
    }
    EXPECT_GT(ops, 0) << "n=" << n;
    EXPECT_EQ(layer_ops, n == 1 ? per_decode_step : 0) << "n=" << n;
    if (n == 1) ++*decode_steps;
    ASSERT_TRUE(cuda::set_op_timing(device, false).is_ok());
  };
}

// check_decoder_layer for `dc` on a CUDA backend with the layer kernel on, against the CPU within
// layer_bound_vs_cpu: a "decoder layer" op per layer in each decode step where the kernel takes
// `dc`'s layers, none where it does not.
void check_layer_against_cpu(const DecoderLayerCase& dc,
                             std::span<const int32_t> prompts = kLayerPrompts) {
  ModelWeights weights = decoder_layer_model(dc);
  auto device = make_cuda_backend_with_layer_kernel(true);
  ASSERT_TRUE(device.is_ok()) << device.status().message();
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, decoder_layer_shape(dc, prompts), std::move(device).value()));
  int64_t decode_steps = 0;
  check_decoder_layer(
      pair, weights, [&](int64_t n) { return layer_bound_vs_cpu(dc, n); },
      count_layer_kernels(layer_kernel_takes(dc) ? weights.config.n_layers : 0, &decode_steps),
      LayerReference::decoder_layer, prompts);
  EXPECT_EQ(decode_steps, int64_t(prompts.size()) * kLayerDecodeSteps);
}

// sym_int4 (block 32) and asym_int4 (block 64) weights; head_dim 64 and 128; 1, 4 and 6 query
// heads per KV head; q/k/v with a bias (Qwen2) or without. The hidden size is the heads' width,
// as in Qwen2 and Llama.
using LayerKernelCase = std::tuple<FormatCase, int, std::pair<int, int>, bool>;

DecoderLayerCase layer_kernel_case(const LayerKernelCase& param) {
  const auto& [fc, head_dim, heads, bias] = param;
  DecoderLayerCase dc;
  dc.n_heads = heads.first;
  dc.n_kv_heads = heads.second;
  dc.head_dim = head_dim;
  dc.hidden = dc.n_heads * dc.head_dim;
  dc.intermediate = 2 * dc.hidden + 128;
  dc.format = fc;
  dc.qkv_bias = bias;
  return dc;
}

class CudaDecoderLayer : public ::testing::TestWithParam<LayerKernelCase> {};

// decoder_layer (the layer kernel at batch 1, the composition in prefill) against the CPU's over
// check_decoder_layer's prefills and decode steps, and one "decoder layer" op per layer in each
// decode step.
TEST_P(CudaDecoderLayer, MatchesCpu) {
  const DecoderLayerCase dc = layer_kernel_case(GetParam());
  ASSERT_TRUE(layer_kernel_takes(dc));
  check_layer_against_cpu(dc);
}

// The layer kernel against the composition it stands for, on the same GPU: a backend created
// with KESTREL_CUDA_LAYER_KERNEL=0 is the reference. Prefill takes the prefill layer on both
// (the same kernels: 1e-6). In decode both quantize their inputs to int8 and keep fp16 cache
// entries; the composition's producers also prepare the norms' and wo's inputs in half groups by
// default (set_gemv_norm_halves, set_attention_half_groups), which the kernel does not, so the
// reference turns those two off here: their own tests hold them to the CPU. Then the two differ
// in summation order and so, now and then, in which side of an int8 rounding boundary an input
// lands (the 2-3e-3 CudaMatmul sees between the dp4a GEMV and the CPU),
// and the kernel's attention keeps the rotated queries in fp32 where the composition's tensor-core
// kernel rounds them to fp16 (the scores here are sharpened 2.25x): 2e-2 for the layer's update,
// half the bound against the CPU (measured on the H200: up to 1.03e-2). The reference issues no
// "decoder layer" op at all.
TEST_P(CudaDecoderLayer, KernelMatchesComposition) {
  const ScopedSwitch norm(cuda::set_gemv_norm_halves, false);
  const ScopedSwitch attention(cuda::set_attention_half_groups, false);
  const DecoderLayerCase dc = layer_kernel_case(GetParam());
  ModelWeights weights = decoder_layer_model(dc);
  auto kernel = make_cuda_backend_with_layer_kernel(true);
  auto composition = make_cuda_backend_with_layer_kernel(false);
  ASSERT_TRUE(kernel.is_ok()) << kernel.status().message();
  ASSERT_TRUE(composition.is_ok()) << composition.status().message();
  // Both upload the same weights in the same order, so the slot each records in them is the same.
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, decoder_layer_shape(dc), std::move(kernel).value(),
                        std::move(composition).value()));
  ASSERT_TRUE(cuda::set_op_timing(*pair.cpu, true).is_ok());
  int64_t decode_steps = 0;
  check_decoder_layer(
      pair, weights, [](int64_t n) { return n == 1 ? 2e-2 : 1e-6; },
      count_layer_kernels(weights.config.n_layers, &decode_steps));
  EXPECT_EQ(decode_steps, int64_t(std::size(kLayerPrompts)) * kLayerDecodeSteps);
  int64_t reference_ops = 0;
  for (const cuda::OpTime& t : cuda::op_times(*pair.cpu)) {
    reference_ops += t.calls;
    EXPECT_NE(t.op, "decoder layer");
  }
  EXPECT_GT(reference_ops, 0);
}

// The prefill layer (norms writing only their fp16 shadows, the output projections adding into x
// in their GEMMs' epilogues, gate and up stored as fp16 products, SwiGLU writing only the down
// projection's shadow) against the fused ops' composition on the same GPU, a backend created with
// KESTREL_CUDA_PREFILL_LAYER=0. The fp16 gate and up are each rounded once more (2^-11 relative)
// before SwiGLU, and the epilogues round x + product once either way: 2e-3 for a prefill call's
// update of x (~4e-4 expected), where a lost bias, activation or residual gives errors near 1.
// Decode takes the same launches on both: bit for bit.
TEST_P(CudaDecoderLayer, PrefillLayerMatchesComposition) {
  const DecoderLayerCase dc = layer_kernel_case(GetParam());
  ModelWeights weights = decoder_layer_model(dc);
  auto prefill = make_cuda_backend_with("KESTREL_CUDA_PREFILL_LAYER", "1");
  auto composition = make_cuda_backend_with("KESTREL_CUDA_PREFILL_LAYER", "0");
  ASSERT_TRUE(prefill.is_ok()) << prefill.status().message();
  ASSERT_TRUE(composition.is_ok()) << composition.status().message();
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, decoder_layer_shape(dc), std::move(prefill).value(),
                        std::move(composition).value()));
  // Prefill calls must take the prefill layer's own launches: the stacked q/k/v GEMM where its
  // product fits the gate tensor (not with as many KV heads as query heads here) and the fp16
  // SwiGLU (op timing counts them by name; decode calls are left untimed).
  const ModelConfig& c = weights.config;
  const bool stacks = c.q_dim() + 2 * c.kv_dim() <= c.intermediate_size;
  auto takes_prefill_layer = [stacks](Backend& device, int64_t n, bool done) {
    if (n <= 64) return;
    if (!done) {
      ASSERT_TRUE(cuda::set_op_timing(device, true).is_ok());  // also clears the op times
      return;
    }
    std::map<std::string, int64_t> calls;
    for (const cuda::OpTime& t : cuda::op_times(device)) calls[t.op] += t.calls;
    EXPECT_EQ(calls["matmul (prefill, q/k/v stacked)"] > 0, stacks) << "n=" << n;
    EXPECT_EQ(calls["matmul (prefill)"] > 0, !stacks) << "n=" << n;
    EXPECT_GT(calls["swiglu (fp16)"], 0) << "n=" << n;
    EXPECT_EQ(calls["add"], 0) << "n=" << n;
    ASSERT_TRUE(cuda::set_op_timing(device, false).is_ok());
  };
  check_decoder_layer(
      pair, weights, [](int64_t n) { return n == 1 ? 0.0 : 2e-3; }, takes_prefill_layer);
}

INSTANTIATE_TEST_SUITE_P(
    FormatsHeadsAndBiases, CudaDecoderLayer,
    ::testing::Combine(::testing::Values(FormatCase{WeightFormat::sym_int4, 32},
                                         FormatCase{WeightFormat::asym_int4, 64}),
                       ::testing::Values(64, 128),
                       ::testing::Values(std::pair{8, 8}, std::pair{8, 2}, std::pair{12, 2}),
                       ::testing::Bool()),
    [](const ::testing::TestParamInfo<LayerKernelCase>& info) {
      return decoder_layer_label(layer_kernel_case(info.param));
    });

// A context of 2500 keys: on a GPU of 132 SMs the kernel's splits hit their cap (32 a KV head
// here, 2 KV heads), each split walks three or more 32-key chunks, and the split holding the new
// position reads its row back through the chunk loader instead of patching a prefetched chunk.
TEST(CudaDecoderLayerLong, MatchesCpuPastTheSplitCap) {
  DecoderLayerCase dc =
      layer_kernel_case({FormatCase{WeightFormat::sym_int4, 32}, 128, std::pair{8, 2}, true});
  ASSERT_TRUE(layer_kernel_takes(dc));
  constexpr int32_t kLongPrompts[] = {2500};
  check_layer_against_cpu(dc, kLongPrompts);
}

// check_decoder_layers for `dc`'s layers, n_layers deep, on a CUDA backend with the layer kernel
// on, against the CPU: each decode step is `launches` "decoder layer" ops (one a kMaxLaunchLayers
// layers), each prefill call none. The device's layers feed each other; held to the update of x
// over the whole stack, their errors, independent from layer to layer, grow no faster than the
// update does: twice a layer's bound.
void check_stack_against_cpu(const DecoderLayerCase& dc, int64_t n_layers, int64_t launches,
                             std::span<const int32_t> prompts) {
  ModelWeights weights = decoder_layer_model(dc, n_layers);
  auto device = make_cuda_backend_with_layer_kernel(true);
  ASSERT_TRUE(device.is_ok()) << device.status().message();
  BackendPair pair;
  ASSERT_TRUE(pair.init(weights, decoder_layer_shape(dc, prompts), std::move(device).value()));
  int64_t decode_steps = 0;
  check_decoder_layers(
      pair, weights, [&](int64_t n) { return 2 * layer_bound_vs_cpu(dc, n); },
      count_layer_kernels(launches, &decode_steps), prompts);
  EXPECT_EQ(decode_steps, int64_t(prompts.size()) * kLayerDecodeSteps);
}

// Three layers in one launch: the kernel's weight ring runs from one layer's last tile into the
// next layer's first, and each layer reads its own cache layer.
TEST(CudaDecoderLayers, OneLaunchMatchesCpu) {
  for (const LayerKernelCase& param :
       {LayerKernelCase{FormatCase{WeightFormat::sym_int4, 32}, 128, std::pair{8, 2}, true},
        LayerKernelCase{FormatCase{WeightFormat::asym_int4, 64}, 64, std::pair{12, 2}, false}}) {
    const DecoderLayerCase dc = layer_kernel_case(param);
    SCOPED_TRACE(decoder_layer_label(dc));
    ASSERT_TRUE(layer_kernel_takes(dc));
    check_stack_against_cpu(dc, 3, 1, kLayerPrompts);
  }
}

// More layers than one launch carries: two launches a step, the second starting at cache layer
// kMaxLaunchLayers.
TEST(CudaDecoderLayers, SplitsPastTheLaunchLimit) {
  const DecoderLayerCase dc =
      layer_kernel_case({FormatCase{WeightFormat::sym_int4, 32}, 64, std::pair{4, 2}, true});
  ASSERT_TRUE(layer_kernel_takes(dc));
  constexpr int32_t kPrompts[] = {0, 40};
  check_stack_against_cpu(dc, cuda::kMaxLaunchLayers + 2, 2, kPrompts);
}

class CudaDecoderLayerFallback : public ::testing::TestWithParam<DecoderLayerCase> {};

// Layers the kernel does not take run the composition at batch 1 too (no "decoder layer" op) and
// still match the CPU: int4 weights over an fp8 cache, fp16 weights, a head_dim of 96.
TEST_P(CudaDecoderLayerFallback, MatchesCpuThroughTheComposition) {
  const DecoderLayerCase dc = GetParam();
  ASSERT_FALSE(layer_kernel_takes(dc));
  check_layer_against_cpu(dc);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CudaDecoderLayerFallback,
    ::testing::Values(
        DecoderLayerCase{512, 8, 2, 64, 1152, {WeightFormat::sym_int4, 32}, true, KvCacheType::fp8},
        DecoderLayerCase{512, 8, 2, 64, 1152, {WeightFormat::fp16, 0}, true},
        DecoderLayerCase{768, 8, 2, 96, 1664, {WeightFormat::sym_int4, 32}, false}),
    decoder_layer_case_name);

}  // namespace
}  // namespace kestrel::cuda_test
