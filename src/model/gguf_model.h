// A llama.cpp GGUF model file seen in Kestrel's terms: its ModelConfig, its tensors under
// Kestrel's canonical names (HF row order restored), and each tensor either copied into a Kestrel
// format block for block or dequantized to fp32 exactly as ggml dequantizes it.
//
// Which ggml types copy into which Kestrel formats (block 32), and what differs:
//   Q4_0 -> sym_int4   value = (nibble - 8) * d, d fp16, byte j = weights j and j + 16: the same
//                      bytes and arithmetic; copied unchanged.
//   Q8_0 -> sym_int8   value = q * d, d fp16: the same, except that ggml's int8 range includes
//                      -128, which Kestrel's own quantizer never writes but every Kestrel kernel
//                      computes exactly (AVX2's sign trick, the AVX-512 and CUDA kernels' offset
//                      codes alike).
//   Q4_K -> asym_int4  value = (d * sc) * q - (dmin * m) per 32 weights, sc and m 6-bit: Kestrel
//                      stores the products d * sc and -dmin * m as fp16, which rounds them to 11
//                      significant bits: each 32-weight scale and min moves by at most 2^-11 of
//                      itself (a product of an 11-bit and a 6-bit number needs up to 17). The
//                      nibbles are reordered, not changed.
//   Q4_1 -> asym_int4  value = q * d + m, d and m fp16, byte j = weights j and j + 16: Kestrel's
//                      scale and min and its nibbles; copied unchanged.
//   Q5_0 -> sym_int8   value = (q - 16) * d, q five bits: q - 16 is the int8 code; d copied.
//   F32 / F16 / BF16 -> fp32 / fp16 / bf16 copied; F16 and BF16 -> fp32 exact.
// Everything else (Q5_1, Q2_K, Q3_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS into any format; any type
// into a format it does not map onto) is dequantized with ggml's formulas and quantized by
// Kestrel's quantizer: requantization, reported.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "io/config.h"
#include "io/gguf.h"
#include "quant/format.h"

namespace kestrel {

class GgufModel {
 public:
  // Opens and validates the file, and derives the config from its metadata (architectures
  // llama and qwen2).
  static Result<GgufModel> open(const std::string& path);

  const ModelConfig& config() const { return config_; }
  const GgufFile& file() const { return file_; }

  // The format and block a load gets: the requested ones when `format_explicit`, else the format
  // the file's most common matrix type maps to (Q4_0 -> sym_int4; Q4_1, Q4_K -> asym_int4; Q8_0,
  // Q5_0, Q5_1, Q5_K, Q6_K, Q2_K, Q3_K, IQ4_NL, IQ4_XS -> sym_int8; F16 -> fp16, BF16 -> bf16,
  // F32 -> fp32), block 32.
  std::pair<WeightFormat, int> load_format(WeightFormat requested, bool format_explicit,
                                           int block) const;

  // The tensor behind canonical `name` ("tok_embd", "blk.3.wq", "blk.3.wq.bias", ...), checked
  // to be [rows, cols] (cols = 1 for vectors) and of a type Kestrel reads.
  Result<const GgufTensor*> tensor(const std::string& name, int64_t rows, int64_t cols) const;

  // Whether a tensor of `type` is copied into `format` with `block` rather than requantized.
  static bool copies_into(GgmlType type, WeightFormat format, int block);
  // Row `row` (HF order) of canonical tensor `name`, as ggml dequantizes it, into out[cols].
  void dequantize_row(const std::string& name, const GgufTensor& t, int64_t row, float* out) const;
  // Copies row `row` (HF order) into row `row` of `w`; copies_into(t.type, w.format, w.block).
  void copy_row(const std::string& name, const GgufTensor& t, int64_t row, QuantWeight& w) const;

  // One line: what happened to each ggml type of the model's matrices, e.g.
  // "Q4_K x 11 -> asym_int4 (copied; scales and mins rounded to fp16), Q6_K x 5 -> asym_int4
  // (requantized), F32 x 5 -> fp32 (norms)".
  std::string load_report(WeightFormat format, int block) const;

 private:
  // The GGUF row holding HF row `row` of `name`: llama.cpp interleaves the two rotary halves of
  // every head of Llama's q and k projections.
  int64_t source_row(const std::string& name, int64_t row) const;

  GgufFile file_;
  ModelConfig config_;
};

// The GGUF tensor name of canonical `name`, e.g. "blk.0.wq" -> "blk.0.attn_q.weight".
std::string gguf_tensor_name(const std::string& canonical);

// Whether `source` names a GGUF file (by its magic, or its .gguf extension).
bool is_gguf_source(const std::string& source);

}  // namespace kestrel
