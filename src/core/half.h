// fp16 and bf16 <-> fp32 conversions, exact and portable (round to nearest even).
#pragma once

#include <cstdint>
#include <cstring>

namespace kestrel {

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

inline float bf16_to_float(uint16_t h) {
  return bits_to_float(uint32_t(h) << 16);
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits = float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // Subnormal: value is mant * 2^-24.
    const float magnitude = float(mant) * (1.0f / 16777216.0f);
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t float_to_fp16(float f) {
  uint32_t bits = float_to_bits(f);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  bits &= 0x7fffffffu;
  if (bits > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // NaN
  if (bits >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow rounds to inf
  if (bits < 0x38800000u) {
    // Subnormal or zero in fp16: round |f| * 2^24 to an integer, ties to even.
    if (bits < 0x33000000u) return sign;  // below half the smallest subnormal
    const uint32_t exp = bits >> 23;
    const uint32_t mant = (bits & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // in [14, 24]
    uint32_t value = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (value & 1u))) ++value;
    return uint16_t(sign | value);
  }
  // Normal: rebias the exponent and round the mantissa to 10 bits, ties to even.
  bits += ((bits >> 13) & 1u) + 0xfffu;
  return uint16_t(sign | ((bits - 0x38000000u) >> 13));
}

}  // namespace kestrel
