// Weight formats and the packed layouts the kernels read.
//
// Every format stores a 2-D weight of [rows, cols]. Linear layers keep the HF layout
// [out_features, in_features], so one output is one contiguous row; the embedding table is
// [vocab, hidden], so one token's embedding is one row too.
//
// Layouts (planar: values, scales and mins are separate arrays, each row-major and 64-byte
// aligned, so a kernel can issue 16-byte loads of packed values without touching scales):
//   fp32 / fp16 / bf16  data  [rows, cols]            of that type
//   sym_int8            data  int8  [rows, cols]      value = q * scale, q in [-127, 127]
//                       scales fp16 [rows, cols/block]
//   sym_int4            data  uint8 [rows, cols/2]    value = (nibble - 8) * scale
//                       scales fp16 [rows, cols/block]
//   asym_int4           data  uint8 [rows, cols/2]    value = nibble * scale + min
//                       scales fp16 [rows, cols/block], mins fp16 [rows, cols/block]
// Int4 nibbles are packed per group of 32 consecutive weights of a row: byte j (0..15) of the
// group holds weight j in its low nibble and weight j + 16 in its high nibble. One 16-byte load
// then yields 32 weights whose low and high halves unpack with a mask and a shift, on AVX2 and
// on CUDA alike. Blocks (one scale each) are 32 or 64 weights; a 64-block spans two groups.
#pragma once

#include <cstdint>
#include <string>

#include "core/blob.h"
#include "core/status.h"
#include "kestrel/types.h"

namespace kestrel {

// WeightFormat, format_name() and parse_format() are public (kestrel/types.h).
inline bool is_quantized(WeightFormat f) {
  return f == WeightFormat::sym_int8 || f == WeightFormat::sym_int4 || f == WeightFormat::asym_int4;
}
// Quantized formats keep one scale per `block` weights of a row: 32 or 64.
Status check_block(WeightFormat format, int block);
// A block written as text (a converted model's metadata): exactly "32" or "64" for quantized
// formats, "0" for float formats.
Result<int> parse_block(const std::string& text, WeightFormat format);
// Bytes of the `data` array per weight (0.5 for int4).
double data_bytes_per_weight(WeightFormat format);

struct QuantWeight {
  WeightFormat format = WeightFormat::fp32;
  int64_t rows = 0;
  int64_t cols = 0;
  int block = 0;  // weights per scale; 0 for fp32/fp16/bf16
  Blob data;
  Blob scales;
  Blob mins;

  int64_t blocks_per_row() const { return block > 0 ? cols / block : 0; }
  size_t data_row_bytes() const;
  // Bytes a kernel streams to use the whole weight once (data + scales + mins).
  size_t total_bytes() const { return data.size() + scales.size() + mins.size(); }
};

// Checks that a [rows, cols] weight can be stored in `format` with `block` (block 32 or 64 for
// quantized formats, cols a multiple of the block); the message names `what`.
Status check_weight_shape(WeightFormat format, int64_t rows, int64_t cols, int block,
                          const std::string& what);

// An uninitialized weight of the given shape; call quantize_row for every row.
QuantWeight allocate_weight(WeightFormat format, int64_t rows, int64_t cols, int block);

// Converts one row of fp32 values (cols of them) into row `row` of `w`. Deterministic: the same
// values give the same bytes on every machine and thread count.
void quantize_row(QuantWeight& w, int64_t row, const float* values);

// Expands row `row` of `w` into fp32 (exactly what the kernels compute with).
void dequantize_row(const QuantWeight& w, int64_t row, float* out);

}  // namespace kestrel
