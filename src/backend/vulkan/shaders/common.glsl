// Shared by every Kestrel compute shader: tensors are reached through 64-bit buffer device
// addresses in push constants (no descriptor sets), fp32 activations, packed weights read as
// 32-bit words (no 8- or 16-bit storage features needed).
#extension GL_EXT_buffer_reference : require
#extension GL_EXT_shader_explicit_arithmetic_types_int64 : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require

layout(buffer_reference, std430, buffer_reference_align = 4) buffer Floats {
  float v[];
};
layout(buffer_reference, std430, buffer_reference_align = 4) buffer Words {
  uint v[];
};
layout(buffer_reference, std430, buffer_reference_align = 4) buffer Ints {
  int v[];
};

// Weight formats: the values of WeightFormat (kestrel/types.h).
const uint FMT_FP32 = 0;
const uint FMT_FP16 = 1;
const uint FMT_BF16 = 2;
const uint FMT_SYM_INT8 = 3;
const uint FMT_SYM_INT4 = 4;
const uint FMT_ASYM_INT4 = 5;

// Element `i` of an array of 16-bit values.
uint half_bits(Words a, uint64_t i) {
  return (a.v[uint(i >> 1)] >> (16u * uint(i & 1))) & 0xffffu;
}
float fp16_at(Words a, uint64_t i) {
  return unpackHalf2x16(half_bits(a, i)).x;
}
float bf16_at(Words a, uint64_t i) {
  return uintBitsToFloat(half_bits(a, i) << 16);
}
