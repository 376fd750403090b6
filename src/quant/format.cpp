// Quantizers for the formats in format.h. The rules, per row, block by block:
//
//   sym_int4   amax = the element with the largest |w| (the first one on ties), sign kept.
//              d = amax / -8, stored as fp16; the rest uses dh = the fp16-rounded d, so that
//              q is chosen for the scale the kernels will actually multiply by.
//              q = clamp(round(w * (1 / dh)), -8, 7), stored as the nibble q + 8.
//              Dividing by a negative d maps amax itself to exactly -8, so the asymmetric
//              integer range [-8, 7] loses no resolution on the side of the largest value.
//   asym_int4  d = (max - min) / 15 and min, both stored as fp16 (dh, mh);
//              q = clamp(round((w - mh) / dh), 0, 15); value = q * dh + mh.
//   sym_int8   d = max|w| / 127 stored as fp16 (dh); q = clamp(round(w / dh), -127, 127).
//   fp16/bf16  round to nearest even (core/half.h); fp32 is copied.
//
// round() is round-half-to-even (std::nearbyint in the default rounding mode, which Kestrel
// never changes). A scale of zero (an all-zero block, or one whose scale underflows fp16)
// stores q = 0 (nibble 8 for sym_int4), which dequantizes to exactly zero (or to the min for
// asym_int4). Scales and mins beyond the fp16 range are clamped to +-65504 so that a block
// never dequantizes to inf or NaN. A NaN weight quantizes to the lowest code rather than
// invoking undefined behaviour in the float-to-int conversion.
#include "quant/format.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/half.h"
#include "core/quote.h"

namespace kestrel {

namespace {

constexpr float kMaxHalf = 65504.0f;
constexpr int kGroup = 32;  // int4 nibble packing group (format.h)

uint16_t to_half_clamped(float v) {
  return float_to_fp16(std::clamp(v, -kMaxHalf, kMaxHalf));
}

// round-half-to-even, then clamp into [lo, hi]; NaN goes to lo.
int round_clamp(float v, int lo, int hi) {
  const float r = std::nearbyint(v);
  if (!(r >= float(lo))) return lo;
  if (r > float(hi)) return hi;
  return int(r);
}

size_t row_bytes(WeightFormat format, int64_t cols) {
  switch (format) {
    case WeightFormat::fp32:
      return size_t(cols) * 4;
    case WeightFormat::fp16:
    case WeightFormat::bf16:
      return size_t(cols) * 2;
    case WeightFormat::sym_int8:
      return size_t(cols);
    case WeightFormat::sym_int4:
    case WeightFormat::asym_int4:
      return size_t(cols) / 2;
  }
  return 0;
}

void quantize_sym_int4_block(const float* w, int n, uint16_t* scale, int8_t* q) {
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) {
    if (std::fabs(w[i]) > std::fabs(amax)) amax = w[i];
  }
  // An all-zero block stores +0 rather than the -0 that 0 / -8 gives.
  const uint16_t dh = amax == 0.0f ? uint16_t(0) : to_half_clamped(amax / -8.0f);
  const float d = fp16_to_float(dh);
  *scale = dh;
  const float inv = d != 0.0f ? 1.0f / d : 0.0f;
  for (int i = 0; i < n; ++i) q[i] = d != 0.0f ? int8_t(round_clamp(w[i] * inv, -8, 7)) : 0;
}

void quantize_asym_int4_block(const float* w, int n, uint16_t* scale, uint16_t* min_out,
                              int8_t* q) {
  float lo = w[0];
  float hi = w[0];
  for (int i = 1; i < n; ++i) {
    lo = std::min(lo, w[i]);
    hi = std::max(hi, w[i]);
  }
  const uint16_t mh = to_half_clamped(lo);
  const uint16_t dh = to_half_clamped((hi - lo) / 15.0f);
  const float m = fp16_to_float(mh);
  const float d = fp16_to_float(dh);
  *scale = dh;
  *min_out = mh;
  for (int i = 0; i < n; ++i) q[i] = d != 0.0f ? int8_t(round_clamp((w[i] - m) / d, 0, 15)) : 0;
}

void quantize_sym_int8_block(const float* w, int n, uint16_t* scale, int8_t* q) {
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(w[i]));
  const uint16_t dh = to_half_clamped(amax / 127.0f);
  const float d = fp16_to_float(dh);
  *scale = dh;
  for (int i = 0; i < n; ++i) q[i] = d != 0.0f ? int8_t(round_clamp(w[i] / d, -127, 127)) : 0;
}

// Packs 32 codes in [0, 15]: byte j holds code j (low nibble) and code j + 16 (high nibble).
void pack_group(const int8_t* codes, uint8_t* out) {
  for (int j = 0; j < kGroup / 2; ++j) {
    out[j] = uint8_t((codes[j] & 0x0f) | ((codes[j + kGroup / 2] & 0x0f) << 4));
  }
}

void unpack_group(const uint8_t* in, int8_t* codes) {
  for (int j = 0; j < kGroup / 2; ++j) {
    codes[j] = int8_t(in[j] & 0x0f);
    codes[j + kGroup / 2] = int8_t(in[j] >> 4);
  }
}

std::string shape_string(int64_t rows, int64_t cols) {
  // Appended piecewise: `"[" + std::to_string(...)` trips a false -Wrestrict in GCC 12 at -O3.
  std::string s = "[";
  s += std::to_string(rows);
  s += ", ";
  s += std::to_string(cols);
  s += "]";
  return s;
}

}  // namespace

const char* format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::fp32:
      return "fp32";
    case WeightFormat::fp16:
      return "fp16";
    case WeightFormat::bf16:
      return "bf16";
    case WeightFormat::sym_int8:
      return "sym_int8";
    case WeightFormat::sym_int4:
      return "sym_int4";
    case WeightFormat::asym_int4:
      return "asym_int4";
  }
  return "unknown";
}

Result<WeightFormat> parse_format(const std::string& name) {
  for (WeightFormat f : {WeightFormat::fp32, WeightFormat::fp16, WeightFormat::bf16,
                         WeightFormat::sym_int8, WeightFormat::sym_int4, WeightFormat::asym_int4}) {
    if (name == format_name(f)) return f;
  }
  return Status::error("unknown weight format '" + name +
                       "' (expected sym_int4, asym_int4, sym_int8, fp16, bf16 or fp32)");
}

const char* kv_cache_name(KvCacheType type) {
  switch (type) {
    case KvCacheType::automatic:
      return "auto";
    case KvCacheType::fp16:
      return "fp16";
    case KvCacheType::fp8:
      return "fp8";
    case KvCacheType::fp32:
      return "fp32";
  }
  return "?";
}

Result<KvCacheType> parse_kv_cache(const std::string& name) {
  for (KvCacheType t :
       {KvCacheType::automatic, KvCacheType::fp16, KvCacheType::fp8, KvCacheType::fp32}) {
    if (name == kv_cache_name(t)) return t;
  }
  return Status::error("unknown KV cache type " + quote_untrusted(name, 40) +
                       " (expected auto, fp16, fp8 or fp32)");
}

KvCacheType resolve_kv_cache(KvCacheType asked, WeightFormat format) {
  if (asked != KvCacheType::automatic) return asked;
  return format == WeightFormat::fp32 ? KvCacheType::fp32 : KvCacheType::fp16;
}

Status check_block(WeightFormat format, int block) {
  if (!is_quantized(format) || block == 32 || block == 64) return Status::ok();
  return Status::error(std::string(format_name(format)) + " needs block 32 or 64, got " +
                       std::to_string(block));
}

Result<int> parse_block(const std::string& text, WeightFormat format) {
  if (!is_quantized(format)) {
    if (text == "0") return 0;
    return Status::error("block " + quote_untrusted(text, 40) + " is not 0, as " +
                         format_name(format) + " has no blocks");
  }
  if (text == "32" || text == "64") return std::stoi(text);
  return Status::error("block " + quote_untrusted(text, 40) + " is neither 32 nor 64");
}

double data_bytes_per_weight(WeightFormat format) {
  switch (format) {
    case WeightFormat::fp32:
      return 4.0;
    case WeightFormat::fp16:
    case WeightFormat::bf16:
      return 2.0;
    case WeightFormat::sym_int8:
      return 1.0;
    case WeightFormat::sym_int4:
    case WeightFormat::asym_int4:
      return 0.5;
  }
  return 0.0;
}

size_t QuantWeight::data_row_bytes() const {
  return row_bytes(format, cols);
}

Status check_weight_shape(WeightFormat format, int64_t rows, int64_t cols, int block,
                          const std::string& what) {
  if (rows <= 0 || cols <= 0) {
    return Status::error(what + ": invalid shape " + shape_string(rows, cols) +
                         " for a weight (both dimensions must be positive)");
  }
  // Float formats have no blocks; whatever block the caller configured does not apply to them.
  if (!is_quantized(format)) return Status::ok();
  KS_RETURN_IF_ERROR(check_block(format, block).with_context(what));
  if (cols % block != 0) {
    return Status::error(what + ": shape " + shape_string(rows, cols) + " cannot be stored as " +
                         format_name(format) + " with block " + std::to_string(block) + ": cols (" +
                         std::to_string(cols) + ") is not a multiple of " + std::to_string(block));
  }
  return Status::ok();
}

QuantWeight allocate_weight(WeightFormat format, int64_t rows, int64_t cols, int block) {
  QuantWeight w;
  w.format = format;
  w.rows = rows;
  w.cols = cols;
  w.block = is_quantized(format) ? block : 0;
  w.data = Blob::allocate(size_t(rows) * row_bytes(format, cols));
  if (is_quantized(format)) {
    const size_t n_scales = size_t(rows) * size_t(w.blocks_per_row());
    w.scales = Blob::allocate(n_scales * sizeof(uint16_t));
    if (format == WeightFormat::asym_int4) w.mins = Blob::allocate(n_scales * sizeof(uint16_t));
  }
  return w;
}

void quantize_row(QuantWeight& w, int64_t row, const float* values) {
  const int64_t cols = w.cols;
  uint8_t* data = w.data.mutable_data() + size_t(row) * w.data_row_bytes();
  switch (w.format) {
    case WeightFormat::fp32:
      std::memcpy(data, values, size_t(cols) * sizeof(float));
      return;
    case WeightFormat::fp16: {
      uint16_t* out = reinterpret_cast<uint16_t*>(data);
      for (int64_t i = 0; i < cols; ++i) out[i] = float_to_fp16(values[i]);
      return;
    }
    case WeightFormat::bf16: {
      uint16_t* out = reinterpret_cast<uint16_t*>(data);
      for (int64_t i = 0; i < cols; ++i) out[i] = float_to_bf16(values[i]);
      return;
    }
    default:
      break;
  }
  const int block = w.block;
  const int64_t n_blocks = w.blocks_per_row();
  uint16_t* scales = w.scales.as_mutable<uint16_t>() + row * n_blocks;
  uint16_t* mins = w.format == WeightFormat::asym_int4
                       ? w.mins.as_mutable<uint16_t>() + row * n_blocks
                       : nullptr;
  int8_t codes[64];
  for (int64_t b = 0; b < n_blocks; ++b) {
    const float* src = values + b * block;
    switch (w.format) {
      case WeightFormat::sym_int8: {
        quantize_sym_int8_block(src, block, &scales[b], codes);
        std::memcpy(data + b * block, codes, size_t(block));
        break;
      }
      case WeightFormat::sym_int4: {
        quantize_sym_int4_block(src, block, &scales[b], codes);
        for (int i = 0; i < block; ++i) codes[i] = int8_t(codes[i] + 8);
        for (int g = 0; g < block / kGroup; ++g) {
          pack_group(codes + g * kGroup, data + (b * block + g * kGroup) / 2);
        }
        break;
      }
      case WeightFormat::asym_int4: {
        quantize_asym_int4_block(src, block, &scales[b], &mins[b], codes);
        for (int g = 0; g < block / kGroup; ++g) {
          pack_group(codes + g * kGroup, data + (b * block + g * kGroup) / 2);
        }
        break;
      }
      default:
        break;
    }
  }
}

void dequantize_row(const QuantWeight& w, int64_t row, float* out) {
  const int64_t cols = w.cols;
  const uint8_t* data = w.data.data() + size_t(row) * w.data_row_bytes();
  switch (w.format) {
    case WeightFormat::fp32:
      std::memcpy(out, data, size_t(cols) * sizeof(float));
      return;
    case WeightFormat::fp16: {
      const uint16_t* in = reinterpret_cast<const uint16_t*>(data);
      for (int64_t i = 0; i < cols; ++i) out[i] = fp16_to_float(in[i]);
      return;
    }
    case WeightFormat::bf16: {
      const uint16_t* in = reinterpret_cast<const uint16_t*>(data);
      for (int64_t i = 0; i < cols; ++i) out[i] = bf16_to_float(in[i]);
      return;
    }
    default:
      break;
  }
  const int block = w.block;
  const int64_t n_blocks = w.blocks_per_row();
  const uint16_t* scales = w.scales.as<uint16_t>() + row * n_blocks;
  const uint16_t* mins =
      w.format == WeightFormat::asym_int4 ? w.mins.as<uint16_t>() + row * n_blocks : nullptr;
  int8_t codes[kGroup];
  for (int64_t b = 0; b < n_blocks; ++b) {
    const float d = fp16_to_float(scales[b]);
    float* dst = out + b * block;
    if (w.format == WeightFormat::sym_int8) {
      const int8_t* q = reinterpret_cast<const int8_t*>(data) + b * block;
      for (int i = 0; i < block; ++i) dst[i] = float(q[i]) * d;
      continue;
    }
    const float m = mins != nullptr ? fp16_to_float(mins[b]) : 0.0f;
    for (int g = 0; g < block / kGroup; ++g) {
      unpack_group(data + (b * block + g * kGroup) / 2, codes);
      float* gdst = dst + g * kGroup;
      if (w.format == WeightFormat::sym_int4) {
        for (int i = 0; i < kGroup; ++i) gdst[i] = float(codes[i] - 8) * d;
      } else {
        for (int i = 0; i < kGroup; ++i) gdst[i] = float(codes[i]) * d + m;
      }
    }
  }
}

}  // namespace kestrel
