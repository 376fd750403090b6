#include "model/prequant.h"

#include <cstring>

#include "core/half.h"
#include "core/quote.h"

namespace kestrel {
namespace {

constexpr int kBlock = 32;  // Kestrel's int4 nibble group and the block every copy uses

// AWQ: the nibble that holds output 8j + m of word j (the inverse of the order 0,2,4,6,1,3,5,7).
constexpr int kAwqNibble[8] = {0, 4, 1, 5, 2, 6, 3, 7};

int32_t load_i32(const TensorRef& t, int64_t index) {
  int32_t v;
  std::memcpy(&v, t.data + size_t(index) * 4, 4);
  return v;
}

int nibble(int32_t word, int k) {
  return int((uint32_t(word) >> (4 * k)) & 0x0f);
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

Result<const TensorRef*> get_checked(const TensorSource& source, const std::string& name,
                                     DType dtype, const std::vector<int64_t>& shape,
                                     const std::string& layout) {
  KS_ASSIGN_OR_RETURN(const TensorRef* t, source.get(name));
  if (t->dtype != dtype || t->shape != shape) {
    return Status::error(source.where() + ": tensor " + quote_untrusted(name) + " is " +
                         dtype_name(t->dtype) + " " + shape_text(t->shape) + "; " + layout +
                         " implies " + dtype_name(dtype) + " " + shape_text(shape));
  }
  return t;
}

}  // namespace

WeightFormat prequant_format(const PrequantConfig& config) {
  return config.method == PrequantMethod::gptq && config.sym ? WeightFormat::sym_int4
                                                             : WeightFormat::asym_int4;
}

std::pair<WeightFormat, int> prequant_load_format(const PrequantConfig& config,
                                                  WeightFormat requested, bool format_explicit,
                                                  int block) {
  if (format_explicit) return {requested, block};
  return {prequant_format(config), kBlock};
}

bool PrequantTensor::present(const TensorSource& source, const std::string& prefix) {
  return source.find(prefix + ".qweight") != nullptr;
}

Result<PrequantTensor> PrequantTensor::open(const TensorSource& source,
                                            const PrequantConfig& config, const std::string& prefix,
                                            int64_t rows, int64_t cols) {
  const bool awq = config.method == PrequantMethod::awq;
  const int64_t group = config.group_size;
  const std::string layout = std::string(awq ? "AWQ" : "GPTQ") + " group_size " +
                             std::to_string(group) + " for a [" + std::to_string(rows) + ", " +
                             std::to_string(cols) + "] weight";
  if (rows % 8 != 0 || cols % group != 0 || group % kBlock != 0) {
    return Status::error(source.where() + ": " + quote_untrusted(prefix) + ": " + layout +
                         " needs output features divisible by 8 and input features by the "
                         "group size");
  }
  PrequantTensor t;
  t.config_ = config;
  t.rows_ = rows;
  t.cols_ = cols;
  const std::vector<int64_t> qweight_shape =
      awq ? std::vector<int64_t>{cols, rows / 8} : std::vector<int64_t>{cols / 8, rows};
  KS_ASSIGN_OR_RETURN(t.qweight_,
                      get_checked(source, prefix + ".qweight", DType::i32, qweight_shape, layout));
  KS_ASSIGN_OR_RETURN(t.qzeros_, get_checked(source, prefix + ".qzeros", DType::i32,
                                             {cols / group, rows / 8}, layout));
  KS_ASSIGN_OR_RETURN(
      t.scales_, get_checked(source, prefix + ".scales", DType::f16, {cols / group, rows}, layout));
  if (!awq) {
    if (const TensorRef* g_idx = source.find(prefix + ".g_idx")) {
      KS_RETURN_IF_ERROR(
          get_checked(source, prefix + ".g_idx", DType::i32, {cols}, layout).status());
      for (int64_t i = 0; i < cols; ++i) {
        if (load_i32(*g_idx, i) != i / group) {
          return Status::error(source.where() + ": tensor " + quote_untrusted(g_idx->name) +
                               " maps input " + std::to_string(i) + " to group " +
                               std::to_string(load_i32(*g_idx, i)) + ", not " +
                               std::to_string(i / group) +
                               "; only the plain order i / group_size is supported (act-order "
                               "checkpoints are not)");
        }
      }
    }
  }
  if (prequant_format(config) == WeightFormat::sym_int4) {
    for (int64_t g = 0; g < cols / group; ++g) {
      for (int64_t r = 0; r < rows; ++r) {
        if (t.zero(r, g) != 8) {
          return Status::error(source.where() + ": tensor " + quote_untrusted(t.qzeros_->name) +
                               " holds zero " + std::to_string(t.zero(r, g)) + " (row " +
                               std::to_string(r) +
                               ") but quantization_config says sym true, where every zero is 8");
        }
      }
    }
  }
  return t;
}

int PrequantTensor::code(int64_t row, int64_t col) const {
  if (config_.method == PrequantMethod::awq) {
    return nibble(load_i32(*qweight_, col * (rows_ / 8) + row / 8), kAwqNibble[row % 8]);
  }
  return nibble(load_i32(*qweight_, (col / 8) * rows_ + row), int(col % 8));
}

int PrequantTensor::zero(int64_t row, int64_t group) const {
  const int32_t word = load_i32(*qzeros_, group * (rows_ / 8) + row / 8);
  if (config_.method == PrequantMethod::awq) return nibble(word, kAwqNibble[row % 8]);
  return nibble(word, int(row % 8)) + (config_.zeros_minus_one ? 1 : 0);
}

uint16_t PrequantTensor::scale(int64_t row, int64_t group) const {
  uint16_t h;
  std::memcpy(&h, scales_->data + size_t(group * rows_ + row) * 2, 2);
  return h;
}

void PrequantTensor::dequantize_row(int64_t row, float* out) const {
  const int64_t group = config_.group_size;
  for (int64_t g = 0; g < cols_ / group; ++g) {
    const float s = fp16_to_float(scale(row, g));
    const int z = zero(row, g);
    for (int64_t i = g * group; i < (g + 1) * group; ++i) out[i] = float(code(row, i) - z) * s;
  }
}

void PrequantTensor::copy_row(int64_t row, QuantWeight& w) const {
  const int64_t blocks = cols_ / kBlock;
  uint8_t* data = w.data.mutable_data() + size_t(row) * w.data_row_bytes();
  uint16_t* scales = w.scales.as_mutable<uint16_t>() + row * blocks;
  uint16_t* mins = w.mins.empty() ? nullptr : w.mins.as_mutable<uint16_t>() + row * blocks;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t g = b * kBlock / config_.group_size;
    scales[b] = scale(row, g);
    // Non-finite scales and products stay non-finite, so the loader's check refuses the tensor.
    if (mins != nullptr) mins[b] = float_to_fp16(-float(zero(row, g)) * fp16_to_float(scales[b]));
    uint8_t* bytes = data + b * (kBlock / 2);
    for (int i = 0; i < kBlock / 2; ++i) {
      const int64_t col = b * kBlock + i;
      bytes[i] = uint8_t(code(row, col) | (code(row, col + kBlock / 2) << 4));
    }
  }
}

}  // namespace kestrel
