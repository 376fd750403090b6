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

// The 32 weights of row `row`, columns [32 g, 32 g + 32), into out (columns past `cols` are 0).
void weight_group(Weight w, uint format, uint row, uint g, out float vals[32]) {
  const uint col0 = g * 32;
  if (format == FMT_SYM_INT4 || format == FMT_ASYM_INT4) {
    const uint64_t base = (uint64_t(row) * w.cols + col0) >> 3;  // word of the group's 16 bytes
    const uint64_t s = uint64_t(row) * (w.cols / w.block) + col0 / w.block;
    const float d = fp16_at(w.scales, s);
    const float m = format == FMT_ASYM_INT4 ? fp16_at(w.mins, s) : 0.0;
    for (uint k = 0; k < 4; ++k) {
      const uint word = w.data.v[uint(base) + k];
      for (uint b = 0; b < 4; ++b) {
        const uint byte_value = (word >> (8 * b)) & 0xffu;
        const uint j = 4 * k + b;
        if (format == FMT_SYM_INT4) {
          vals[j] = float(int(byte_value & 15u) - 8) * d;
          vals[j + 16] = float(int(byte_value >> 4) - 8) * d;
        } else {
          vals[j] = float(byte_value & 15u) * d + m;
          vals[j + 16] = float(byte_value >> 4) * d + m;
        }
      }
    }
    return;
  }
  if (format == FMT_SYM_INT8) {
    const uint64_t base = (uint64_t(row) * w.cols + col0) >> 2;
    const uint64_t s = uint64_t(row) * (w.cols / w.block) + col0 / w.block;
    const float d = fp16_at(w.scales, s);
    for (uint k = 0; k < 8; ++k) {
      const int word = int(w.data.v[uint(base) + k]);
      for (uint b = 0; b < 4; ++b) vals[4 * k + b] = float(bitfieldExtract(word, 8 * int(b), 8)) * d;
    }
    return;
  }
  for (uint j = 0; j < 32; ++j) {
    vals[j] = col0 + j < w.cols ? weight_at(w, format, row, col0 + j) : 0.0;
  }
}
