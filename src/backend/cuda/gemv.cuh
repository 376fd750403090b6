// Decode matrix products: y[n, rows] = x[n, cols] · wᵀ (+ bias) for 1..64 tokens, dequantizing in
// registers, on the tensor cores. One launch takes up to 16 tokens and reads every weight byte
// once whatever its n is; a call of more runs a launch per 16 (kMaxGemvBatchTokens).
#pragma once

#include <cuda_runtime.h>

#include "backend/cuda/common.cuh"
#include "core/status.h"

namespace kestrel::cuda {

constexpr int kMaxGemvJobs = 3;  // q/k/v share one input: one launch

// Most tokens gemv() takes: past kMaxGemvTokens (one launch's two n-tiles) it launches once per
// 16 tokens, reading the weights again each time. Up to 64 tokens that is still far cheaper
// than dequantizing every weight to fp16 for cuBLAS, and continuous batching runs decode steps
// of 17-64 sequences (H200, 8B served through cuBLAS at those sizes: 55 ms per output token
// with 32 running sequences, against 15 ms with 16 on the GEMV).
constexpr int kMaxGemvBatchTokens = 64;

struct GemvJob {
  DeviceWeight w;
  float* y = nullptr;         // [n_tokens, w.rows]
  float* residual = nullptr;  // [n_tokens, w.rows]: when set, also residual += y (fused add)
};

// The GEMV's input as the RMSNorm of an fp32 activation, computed by every block into shared
// memory (fp16, permuted) instead of by a separate kernel and an fp16 shadow in global memory.
struct NormInput {
  const float* x = nullptr;  // [n_tokens, cols] fp32, the norm's input; null: no norm
  const float* w = nullptr;  // [cols] norm weight
  float* out = nullptr;      // [n_tokens, cols] fp32 normalized rows (block 0 writes them)
  float eps = 0.0f;
};

// Widest activation whose norm a GEMV block computes itself: a thread holds its share of the
// row (4 float4 of x and of w at 4096 columns) between the sum of squares and the scaling.
constexpr int64_t kMaxNormInputCols = 4096;

// Whether gemv() can take a NormInput for `n_tokens` rows of `cols` columns. Batch-1 decode
// only: measured on the H100, every block normalizing several tokens cost more than the
// separate norm kernel (Qwen2-1.5B batch 4: 2441 against 2853 tok/s).
inline bool gemv_fuses_norm(int64_t cols, int64_t n_tokens) {
  return n_tokens == 1 && cols > 0 && cols % kGroup == 0 && cols <= kMaxNormInputCols;
}

// The int4 GEMV's dp4a path: for a few tokens the input is quantized to int8 in groups of 32
// (the CPU backend's quantization) and multiplied with the unpacked nibbles by dp4a, 8
// multiply-adds in three instructions, where the mma path spends ~16 dequantization
// instructions per 8 weights. Widest input it stages in shared memory:
// (gemv_uses_dp4a in cuda_backend.h says which calls take it.)
constexpr int64_t kMaxDpCols = 16384;

// A one-token input already quantized in half groups by its producer (HalfGroupOut, common.cuh,
// the swiglu GEMV's epilogue): a dp4a GEMV of one m-tile without a fused norm copies it instead
// of quantizing x in every block, and multiplies each 32-weight group as two halves, each with
// its own scale. Other launches ignore it and read x, which must still be the same activation's
// shadow.
struct HalfGroupInput {
  const uint32_t* q = nullptr;
  const int2* scales = nullptr;
};

// The half groups a producer wrote, as a GEMV's input.
inline HalfGroupInput input_of(const HalfGroupOut& out) {
  return HalfGroupInput{out.q, out.scales};
}

// A residual's next RMSNorm input, prepared at one token by the GEMV that adds into the residual
// (a store epilogue with a residual, rows a multiple of 32): per 16-row tile, the new residual
// times the norm's weight `w` quantized in half groups (`out`), and the tile's sum of squares of
// the new residual (`ss`, [rows / 16]). The norm's GEMV then reads these instead of normalizing
// and quantizing the row in every block: each half's scale times rsqrt(mean(x^2) + eps), the
// sums of squares added in a fixed order (NormHalvesIn).
struct NormHalvesOut {
  const float* w = nullptr;
  HalfGroupOut out;
  float* ss = nullptr;
};

struct NormHalvesIn {
  HalfGroupInput in;
  const float* ss = nullptr;
};

// A 9-16-token input quantized in half groups for the int4 mma path (an experiment behind
// set_int8_activations, off by default; gemv()'s `tokens_in`): an int8 value a column in the
// permuted shadow order (common.cuh), stored plus 128 (128 is zero), and two fp16 scales a group
// of 32 columns, one a half (natural columns 0-15 and 16-31: in the permuted order, the first and
// the last four of every eight). A column's value is (code - 128) * scale, rounded to fp16 once:
// the mma path multiplies exactly those fp16 values, so a GEMV of these is the same bits as one of
// the fp16 shadow that holds them. It halves the activation bytes the
// batch-16 chunk loop loads from L1/L2 (16 bytes a column and token for 2 KB of weights a warp),
// for ~100 more instructions a chunk (a byte permute into the 0x6400 exponent, a subtraction and
// the scale's multiply a pair of columns).
struct TokenHalfGroups {
  const uint8_t* codes = nullptr;   // [n_tokens, x_stride]
  const __half2* scales = nullptr;  // [n_tokens, x_stride / 32]: {half 0's, half 1's}
};

// The int8 half groups a producer wrote (ShadowOut::tokens), as a GEMV's input.
inline TokenHalfGroups input_of(const TokenHalvesOut& out) {
  return TokenHalfGroups{out.codes, out.scales};
}

// Quantizes `n_tokens` rows of a permuted fp16 shadow `x` ([n_tokens, x_stride], x_stride a
// multiple of 32) into `codes` and `scales` (TokenHalfGroups' layout). A half's scale is its
// largest magnitude over 127 (fp32, rounded to fp16; at most 515.5, whose 127 is finite), a code
// the value over that fp16 scale rounded to the nearest integer (ties to even), within +-127; NaN
// values, and every value of a half whose largest magnitude is not finite or whose scale rounds to
// 0, get code 0 (128 stored) and that half scale 0. Its CPU twin is the test's
// (CudaOps.TokenHalfGroups*).
Status quantize_token_half_groups(const __half* x, int n_tokens, int64_t x_stride, uint8_t* codes,
                                  __half2* scales, cudaStream_t stream);

// The same quantization of a shadow whose producer wrote only the fp16 values, and x rewritten
// in place as the values the codes stand for (token_half_value, common.cuh), so that the launches
// that read x take the codes' numbers (the decode step's int8 inputs where no producer writes
// them: set_int8_activations, mode 2).
Status requantize_token_half_groups(__half* x, int n_tokens, int64_t x_stride, uint8_t* codes,
                                    __half2* scales, cudaStream_t stream);

enum class GemvEpilogue {
  store,   // y_j = x · w_jᵀ + bias_j
  swiglu,  // two jobs of equal rows (gate, up): y_1 = up, y_0 = silu(gate) * up, plus its shadow
};

// Runs every job against the same input: `x` is the permuted fp16 shadow [n_tokens, x_stride]
// (common.cuh) of an activation with w.cols columns; all jobs share format and cols.
// n_tokens in [1, kMaxGemvBatchTokens]. `swiglu_shadow` receives the fp16 shadow of y_0 in swiglu
// mode. With `norm.x` set, the input is rms_norm(norm.x) * norm.w instead and `x` is unused (null);
// gemv_fuses_norm(cols, n_tokens) must hold.
// `halves`, with one token and a store epilogue, is x's half-group quantization (see
// HalfGroupInput). In swiglu mode, swiglu_shadow.halves receives y_0's (one token, dp4a weights:
// gemv_writes_halves; an error otherwise).
// `tokens_in` (9-16 tokens a launch, sym_int4, no fused norm) is x quantized as TokenHalfGroups:
// the launches of gemv_kernel's mma path read it instead of x (gemv_int8_activation_launches
// counts them); the row-warp kernel and every other launch read x, which must hold its
// dequantized values for the call to mean one thing. The decode step passes it with
// set_int8_activations on (cuda_backend.h).
// `norm_halves` (with `norm`, one token): that norm's input as the residual's producer prepared
// it (NormHalvesOut); norm.x is still the residual (block 0 writes norm.out from it). `norm_out`
// (one token, one job with a residual): prepare the residual's next norm input.
Status gemv(const GemvJob* jobs, int n_jobs, const __half* x, int64_t x_stride, int n_tokens,
            int sm_count, cudaStream_t stream, GemvEpilogue epilogue = GemvEpilogue::store,
            ShadowOut swiglu_shadow = {}, NormInput norm = {}, HalfGroupInput halves = {},
            NormHalvesIn norm_halves = {}, NormHalvesOut norm_out = {},
            TokenHalfGroups tokens_in = {});

// Whether a gemv() of these jobs (sym_int4, no fused norm) over `n_tokens` reads a
// TokenHalfGroups input given one: past 8 tokens, where its 16-token launches take the mma path
// and not the row-warp kernel (the lm_heads), which reads x.
bool gemv_reads_token_halves(const GemvJob* jobs, int n_jobs, int64_t x_stride, int n_tokens,
                             GemvEpilogue epilogue, int sm_count);

// Whether a swiglu gemv() of gate and up over `n_tokens` that reads a TokenHalfGroups input can
// also write its output's (swiglu_shadow.tokens: w_down's input): one launch (at most 16
// tokens), gate's rows whole groups of 32; gemv() refuses a request where this does not hold.
bool gemv_writes_token_halves(const GemvJob* jobs, int n_jobs, int64_t x_stride, int n_tokens,
                              int sm_count);

// Whether a one-job store gemv() with a residual of `rows` rows over these weights can take a
// NormHalvesOut.
bool gemv_writes_norm_halves(WeightFormat format, int64_t n_tokens, int64_t cols, int64_t rows);

// Whether a swiglu gemv() of n_tokens over these weights writes swiglu_shadow.halves.
bool gemv_writes_halves(WeightFormat format, int64_t n_tokens, int64_t cols);

}  // namespace kestrel::cuda
