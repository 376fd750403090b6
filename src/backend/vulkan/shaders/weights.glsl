// Dequantization of the packed layouts of quant/format.h, with the CPU's arithmetic
// (dequantize_row): `precise` keeps the driver from contracting code * scale + min into an fma,
// so the values are bit-identical to the CPU's.
struct Weight {
  Words data;
  Words scales;
  Words mins;
  uint cols;
  uint block;
};

// Weight (row, col) of a matrix of `format`.
float weight_at(Weight w, uint format, uint row, uint col) {
  const uint64_t i = uint64_t(row) * w.cols + col;
  if (format == FMT_FP32) return uintBitsToFloat(w.data.v[uint(i)]);
  if (format == FMT_FP16) return fp16_at(w.data, i);
  if (format == FMT_BF16) return bf16_at(w.data, i);
  const uint64_t s = uint64_t(row) * (w.cols / w.block) + col / w.block;
  const float d = fp16_at(w.scales, s);
  if (format == FMT_SYM_INT8) {
    const int q = bitfieldExtract(int(w.data.v[uint(i >> 2)]), 8 * int(i & 3), 8);
    precise float v = float(q) * d;
    return v;
  }
  // int4: byte j of a 32-group holds weight j (low nibble) and weight j + 16 (high nibble).
  const uint64_t group = i >> 5;
  const uint j = uint(i & 31);
  const uint byte_index = uint(group * 16) + (j & 15);
  const uint byte_value = (w.data.v[byte_index >> 2] >> (8 * (byte_index & 3))) & 0xffu;
  const uint code = j < 16 ? (byte_value & 15u) : (byte_value >> 4);
  if (format == FMT_SYM_INT4) {
    precise float v = float(int(code) - 8) * d;
    return v;
  }
  const float m = fp16_at(w.mins, s);
  precise float v = float(code) * d + m;
  return v;
}
