// AWQ and GPTQ checkpoints (config.json `quantization_config`, 4-bit) read in Kestrel's terms.
//
// Both store, per quantized linear PREFIX (e.g. model.layers.0.self_attn.q_proj), int32 words
// of eight 4-bit codes, and per group of `group_size` input columns a fp16 scale s and a 4-bit
// zero z per output row; the weight is w = (q - z) * s.
//   AWQ (AutoAWQ GEMM): PREFIX.qweight [in, out/8], PREFIX.qzeros [in/group, out/8],
//     PREFIX.scales [in/group, out]. Both pack along the output dimension in the interleaved
//     order 0, 2, 4, 6, 1, 3, 5, 7: nibble k (bits 4k..4k+3) of word j holds output 8j + order[k].
//     Zeros are stored as they are.
//   GPTQ (AutoGPTQ): PREFIX.qweight [in/8, out] packs along the input dimension in plain order
//     (nibble k of word i holds input 8i + k); PREFIX.qzeros [in/group, out/8] packs along the
//     output dimension in plain order; PREFIX.scales [in/group, out]; PREFIX.g_idx [in] when
//     present must be the trivial i / group (act-order is refused). checkpoint_format "gptq"
//     (v1, AutoGPTQ's and transformers' default) stores z - 1, so a stored 15 means z = 16, as
//     AutoGPTQ's kernels compute it; "gptq_v2" stores z.
//
// Mapping onto Kestrel block 32 (each group's scale and zero repeated over group / 32 blocks):
//   zeros all 8 (GPTQ sym) -> sym_int4: value (q - 8) * s with the same fp16 s: exact.
//   otherwise               -> asym_int4: value q * d + m with d = s (exact) and m = -z * s
//                              rounded to fp16: |m - (-z * s)| <= 2^-11 * |z * s| (2^-25
//                              absolute below fp16's normal range); a product above 65504 is
//                              Inf and the load is refused.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "io/config.h"
#include "io/safetensors.h"
#include "quant/format.h"

namespace kestrel {

// The format (block 32) a pre-quantized checkpoint's matrices copy into.
WeightFormat prequant_format(const PrequantConfig& config);
// The format and block a load gets: the requested ones when `format_explicit` (the codes are then
// dequantized and requantized unless they match prequant_format, block 32), else the copy's.
std::pair<WeightFormat, int> prequant_load_format(const PrequantConfig& config,
                                                  WeightFormat requested, bool format_explicit,
                                                  int block);

// One quantized linear layer of `rows` output and `cols` input features.
class PrequantTensor {
 public:
  // Whether `source` holds a quantized linear under `prefix` (its qweight).
  static bool present(const TensorSource& source, const std::string& prefix);
  // Checks every tensor's dtype and shape against the config and [rows, cols], g_idx's order,
  // and (sym) that every zero is 8, before anything is read into weights.
  static Result<PrequantTensor> open(const TensorSource& source, const PrequantConfig& config,
                                     const std::string& prefix, int64_t rows, int64_t cols);

  int code(int64_t row, int64_t col) const;
  int zero(int64_t row, int64_t group) const;
  uint16_t scale(int64_t row, int64_t group) const;  // fp16 bits

  // Row `row` as the checkpoint's kernels compute it, (q - z) * s, into out[cols].
  void dequantize_row(int64_t row, float* out) const;
  // Row `row` into row `row` of `w` (prequant_format, block 32) without requantization.
  void copy_row(int64_t row, QuantWeight& w) const;

 private:
  PrequantConfig config_;
  int64_t rows_ = 0, cols_ = 0;
  const TensorRef* qweight_ = nullptr;
  const TensorRef* qzeros_ = nullptr;
  const TensorRef* scales_ = nullptr;
};

}  // namespace kestrel
