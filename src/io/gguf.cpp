#include "io/gguf.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "core/quote.h"

namespace kestrel {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr int kMaxDims = 4;              // ggml tensors have at most four dimensions
constexpr int kMaxArrayDepth = 4;        // real files nest no arrays at all
// Keys and tensor names are short in practice (ggml caps tensor names at 64 bytes); the cap
// keeps a hostile length out of every error message and map.
constexpr uint64_t kMaxNameBytes = 64 * 1024;
constexpr uint64_t kMaxAlignment = 1u << 20;

// Bounds-checked little-endian reads over the mapped bytes; every read says what it read, so the
// error names the field that ran past the end.
class Cursor {
 public:
  Cursor(const uint8_t* bytes, size_t size, const std::string& path)
      : bytes_(bytes), size_(size), path_(path) {}

  size_t pos() const { return pos_; }
  size_t remaining() const { return size_ - pos_; }

  Status need(uint64_t n, const std::string& what) const {
    if (n > remaining()) {
      return Status::error(path_ + ": truncated: " + what + " needs " + std::to_string(n) +
                           " bytes at offset " + std::to_string(pos_) + " but the file has " +
                           std::to_string(remaining()) + " left");
    }
    return Status::ok();
  }

  template <typename T>
  Status read(T& out, const std::string& what) {
    KS_RETURN_IF_ERROR(need(sizeof(T), what));
    std::memcpy(&out, bytes_ + pos_, sizeof(T));  // the host is little-endian (x86-64, aarch64)
    pos_ += sizeof(T);
    return Status::ok();
  }

  Status read_string(std::string& out, const std::string& what, uint64_t max_bytes) {
    uint64_t len = 0;
    KS_RETURN_IF_ERROR(read(len, what + " length"));
    if (len > max_bytes) {
      return Status::error(path_ + ": " + what + " length " + std::to_string(len) +
                           " exceeds the limit of " + std::to_string(max_bytes) + " bytes");
    }
    KS_RETURN_IF_ERROR(need(len, what));
    out.assign(reinterpret_cast<const char*>(bytes_ + pos_), size_t(len));
    pos_ += size_t(len);
    return Status::ok();
  }

  const uint8_t* skip(size_t n) {
    const uint8_t* p = bytes_ + pos_;
    pos_ += n;
    return p;
  }

 private:
  const uint8_t* bytes_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& path_;
};

// Bytes of one fixed-size element, 0 for strings and arrays.
uint64_t fixed_size(GgufValueType type) {
  switch (type) {
    case GgufValueType::u8:
    case GgufValueType::i8:
    case GgufValueType::boolean:
      return 1;
    case GgufValueType::u16:
    case GgufValueType::i16:
      return 2;
    case GgufValueType::u32:
    case GgufValueType::i32:
    case GgufValueType::f32:
      return 4;
    case GgufValueType::u64:
    case GgufValueType::i64:
    case GgufValueType::f64:
      return 8;
    case GgufValueType::string:
    case GgufValueType::array:
      return 0;
  }
  return 0;
}

bool known_type(uint32_t t) {
  return t <= uint32_t(GgufValueType::f64);
}

// The smallest number of bytes one element of `type` can occupy: bounds array counts before
// anything is reserved.
uint64_t min_element_bytes(GgufValueType type) {
  if (type == GgufValueType::string) return 8;  // the length
  if (type == GgufValueType::array) return 12;  // element type + count
  return fixed_size(type);
}

void decode_scalar(GgufValueType type, const uint8_t* p, GgufValue& v) {
  switch (type) {
    case GgufValueType::u8:
      v.u = p[0];
      break;
    case GgufValueType::i8:
      v.i = int8_t(p[0]);
      break;
    case GgufValueType::boolean:
      v.u = p[0] != 0;
      break;
    case GgufValueType::u16: {
      uint16_t x;
      std::memcpy(&x, p, 2);
      v.u = x;
      break;
    }
    case GgufValueType::i16: {
      int16_t x;
      std::memcpy(&x, p, 2);
      v.i = x;
      break;
    }
    case GgufValueType::u32: {
      uint32_t x;
      std::memcpy(&x, p, 4);
      v.u = x;
      break;
    }
    case GgufValueType::i32: {
      int32_t x;
      std::memcpy(&x, p, 4);
      v.i = x;
      break;
    }
    case GgufValueType::f32: {
      float x;
      std::memcpy(&x, p, 4);
      v.f = x;
      break;
    }
    case GgufValueType::u64:
      std::memcpy(&v.u, p, 8);
      break;
    case GgufValueType::i64:
      std::memcpy(&v.i, p, 8);
      break;
    case GgufValueType::f64:
      std::memcpy(&v.f, p, 8);
      break;
    case GgufValueType::string:
    case GgufValueType::array:
      break;
  }
}

Status read_value(Cursor& in, GgufValueType type, GgufValue& v, const std::string& what, int depth,
                  const std::string& path);

Status read_array(Cursor& in, GgufValue& v, const std::string& what, int depth,
                  const std::string& path) {
  if (depth >= kMaxArrayDepth) {
    return Status::error(path + ": " + what + ": arrays nested deeper than " +
                         std::to_string(kMaxArrayDepth));
  }
  uint32_t element = 0;
  KS_RETURN_IF_ERROR(in.read(element, what + " element type"));
  if (!known_type(element)) {
    return Status::error(path + ": " + what + ": unknown array element type " +
                         std::to_string(element));
  }
  v.element = GgufValueType(element);
  KS_RETURN_IF_ERROR(in.read(v.count, what + " array length"));
  const uint64_t min_bytes = min_element_bytes(v.element);
  if (v.count > in.remaining() / min_bytes) {
    return Status::error(path + ": " + what + ": array of " + std::to_string(v.count) + " " +
                         gguf_value_type_name(v.element) + " elements does not fit in the " +
                         std::to_string(in.remaining()) + " bytes left");
  }
  if (fixed_size(v.element) != 0) {
    v.raw = in.skip(size_t(v.count * min_bytes));
    return Status::ok();
  }
  if (v.element == GgufValueType::string) {
    v.strings.reserve(size_t(v.count));
    for (uint64_t k = 0; k < v.count; ++k) {
      std::string s;
      KS_RETURN_IF_ERROR(
          in.read_string(s, what + "[" + std::to_string(k) + "]", kMaxNameBytes * 16));
      v.strings.push_back(std::move(s));
    }
    return Status::ok();
  }
  v.arrays.reserve(size_t(v.count));
  for (uint64_t k = 0; k < v.count; ++k) {
    GgufValue item;
    KS_RETURN_IF_ERROR(read_value(in, GgufValueType::array, item,
                                  what + "[" + std::to_string(k) + "]", depth + 1, path));
    v.arrays.push_back(std::move(item));
  }
  return Status::ok();
}

Status read_value(Cursor& in, GgufValueType type, GgufValue& v, const std::string& what, int depth,
                  const std::string& path) {
  v.type = type;
  if (type == GgufValueType::string) {
    // Chat templates are the longest strings in real files (tens of kilobytes).
    return in.read_string(v.str, what, 16 * 1024 * 1024);
  }
  if (type == GgufValueType::array) return read_array(in, v, what, depth, path);
  const uint64_t n = fixed_size(type);
  KS_RETURN_IF_ERROR(in.need(n, what));
  decode_scalar(type, in.skip(size_t(n)), v);
  return Status::ok();
}

std::string dims_string(const std::vector<int64_t>& dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(dims[i]);
  }
  return out + "]";
}

Status parse_tensor_info(Cursor& in, const std::string& path, uint64_t index, GgufTensor& t) {
  const std::string what = "tensor info " + std::to_string(index);
  KS_RETURN_IF_ERROR(in.read_string(t.name, what + " name", kMaxNameBytes));
  const std::string where = path + ": tensor " + quote_untrusted(t.name);
  uint32_t n_dims = 0;
  KS_RETURN_IF_ERROR(in.read(n_dims, what + " dimension count"));
  if (n_dims < 1 || n_dims > uint32_t(kMaxDims)) {
    return Status::error(where + ": " + std::to_string(n_dims) +
                         " dimensions (ggml tensors have 1 to 4)");
  }
  uint64_t numel = 1;
  for (uint32_t d = 0; d < n_dims; ++d) {
    uint64_t dim = 0;
    KS_RETURN_IF_ERROR(in.read(dim, what + " dimension"));
    if (dim == 0 || dim > uint64_t(std::numeric_limits<int64_t>::max()) / numel) {
      return Status::error(where + ": dimension " + std::to_string(dim) +
                           (dim == 0 ? " is zero" : " makes the element count overflow"));
    }
    numel *= dim;
    t.dims.push_back(int64_t(dim));
  }
  uint32_t type = 0;
  KS_RETURN_IF_ERROR(in.read(type, what + " type"));
  const GgmlTypeTraits traits = ggml_type_traits(type);
  if (traits.name == nullptr) {
    return Status::error(where + ": unknown ggml type " + std::to_string(type));
  }
  t.type = GgmlType(type);
  if (uint64_t(t.dims[0]) % uint64_t(traits.block) != 0) {
    return Status::error(where + ": type " + traits.name + " stores blocks of " +
                         std::to_string(traits.block) + " elements but the row has " +
                         std::to_string(t.dims[0]));
  }
  const uint64_t blocks = numel / uint64_t(traits.block);
  if (blocks > std::numeric_limits<uint64_t>::max() / uint64_t(traits.block_bytes)) {
    return Status::error(where + ": shape " + dims_string(t.dims) + " is too large");
  }
  t.nbytes = size_t(blocks * uint64_t(traits.block_bytes));
  KS_RETURN_IF_ERROR(in.read(t.offset, what + " offset"));
  return Status::ok();
}

}  // namespace

const char* gguf_value_type_name(GgufValueType type) {
  switch (type) {
    case GgufValueType::u8:
      return "uint8";
    case GgufValueType::i8:
      return "int8";
    case GgufValueType::u16:
      return "uint16";
    case GgufValueType::i16:
      return "int16";
    case GgufValueType::u32:
      return "uint32";
    case GgufValueType::i32:
      return "int32";
    case GgufValueType::f32:
      return "float32";
    case GgufValueType::boolean:
      return "bool";
    case GgufValueType::string:
      return "string";
    case GgufValueType::array:
      return "array";
    case GgufValueType::u64:
      return "uint64";
    case GgufValueType::i64:
      return "int64";
    case GgufValueType::f64:
      return "float64";
  }
  return "?";
}

bool GgufValue::is_integer() const {
  switch (type) {
    case GgufValueType::u8:
    case GgufValueType::i8:
    case GgufValueType::u16:
    case GgufValueType::i16:
    case GgufValueType::u32:
    case GgufValueType::i32:
    case GgufValueType::u64:
    case GgufValueType::i64:
      return true;
    default:
      return false;
  }
}

GgmlTypeTraits ggml_type_traits(uint32_t type) {
  switch (GgmlType(type)) {
    case GgmlType::f32:
      return {"F32", 1, 4};
    case GgmlType::f16:
      return {"F16", 1, 2};
    case GgmlType::q4_0:
      return {"Q4_0", 32, 18};
    case GgmlType::q4_1:
      return {"Q4_1", 32, 20};
    case GgmlType::q5_0:
      return {"Q5_0", 32, 22};
    case GgmlType::q5_1:
      return {"Q5_1", 32, 24};
    case GgmlType::q8_0:
      return {"Q8_0", 32, 34};
    case GgmlType::q8_1:
      return {"Q8_1", 32, 36};
    case GgmlType::q2_k:
      return {"Q2_K", 256, 84};
    case GgmlType::q3_k:
      return {"Q3_K", 256, 110};
    case GgmlType::q4_k:
      return {"Q4_K", 256, 144};
    case GgmlType::q5_k:
      return {"Q5_K", 256, 176};
    case GgmlType::q6_k:
      return {"Q6_K", 256, 210};
    case GgmlType::q8_k:
      return {"Q8_K", 256, 292};
    case GgmlType::iq2_xxs:
      return {"IQ2_XXS", 256, 66};
    case GgmlType::iq2_xs:
      return {"IQ2_XS", 256, 74};
    case GgmlType::iq3_xxs:
      return {"IQ3_XXS", 256, 98};
    case GgmlType::iq1_s:
      return {"IQ1_S", 256, 50};
    case GgmlType::iq4_nl:
      return {"IQ4_NL", 32, 18};
    case GgmlType::iq3_s:
      return {"IQ3_S", 256, 110};
    case GgmlType::iq2_s:
      return {"IQ2_S", 256, 82};
    case GgmlType::iq4_xs:
      return {"IQ4_XS", 256, 136};
    case GgmlType::i8:
      return {"I8", 1, 1};
    case GgmlType::i16:
      return {"I16", 1, 2};
    case GgmlType::i32:
      return {"I32", 1, 4};
    case GgmlType::i64:
      return {"I64", 1, 8};
    case GgmlType::f64:
      return {"F64", 1, 8};
    case GgmlType::iq1_m:
      return {"IQ1_M", 256, 56};
    case GgmlType::bf16:
      return {"BF16", 1, 2};
    case GgmlType::tq1_0:
      return {"TQ1_0", 256, 54};
    case GgmlType::tq2_0:
      return {"TQ2_0", 256, 66};
    case GgmlType::mxfp4:
      return {"MXFP4", 32, 17};
  }
  return {};
}

const char* ggml_type_name(GgmlType type) {
  const char* name = ggml_type_traits(uint32_t(type)).name;
  return name != nullptr ? name : "?";
}

int64_t GgufTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

int64_t GgufTensor::rows() const {
  return dims.empty() ? 0 : numel() / dims[0];
}

Result<GgufFile> GgufFile::open(const std::string& path) {
  KS_ASSIGN_OR_RETURN(std::shared_ptr<MappedFile> file, MappedFile::open(path));
  const uint8_t* bytes = file->data();
  const size_t size = file->size();
  return parse(std::move(file), bytes, size, path);
}

Result<GgufFile> GgufFile::parse(std::shared_ptr<const MappedFile> file, const uint8_t* bytes,
                                 size_t size, const std::string& path) {
  Cursor in(bytes, size, path);
  uint32_t magic = 0;
  KS_RETURN_IF_ERROR(in.read(magic, "the GGUF magic"));
  if (magic != kMagic) return Status::error(path + ": not a GGUF file (no 'GGUF' magic)");
  GgufFile out;
  out.mapping_ = file;
  out.path_ = path;
  KS_RETURN_IF_ERROR(in.read(out.version_, "the version"));
  if (out.version_ == 1) {
    return Status::error(path + ": GGUF version 1 is not supported (versions 2 and 3 are)");
  }
  if (out.version_ != 2 && out.version_ != 3) {
    // A big-endian file reads its version 3 as 0x03000000 here.
    const bool big_endian = out.version_ == 0x02000000u || out.version_ == 0x03000000u;
    return Status::error(path + ": GGUF version " + std::to_string(out.version_) +
                         (big_endian ? " (a big-endian file)" : "") +
                         " is not supported (little-endian versions 2 and 3 are)");
  }
  uint64_t n_tensors = 0;
  uint64_t n_kv = 0;
  KS_RETURN_IF_ERROR(in.read(n_tensors, "the tensor count"));
  KS_RETURN_IF_ERROR(in.read(n_kv, "the metadata count"));
  // A key/value pair takes at least 13 bytes, a tensor info at least 29.
  if (n_kv > in.remaining() / 13) {
    return Status::error(path + ": metadata count " + std::to_string(n_kv) +
                         " does not fit in the file (" + std::to_string(size) + " bytes)");
  }
  if (n_tensors > in.remaining() / 29) {
    return Status::error(path + ": tensor count " + std::to_string(n_tensors) +
                         " does not fit in the file (" + std::to_string(size) + " bytes)");
  }

  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key;
    KS_RETURN_IF_ERROR(in.read_string(key, "metadata key " + std::to_string(k), kMaxNameBytes));
    const std::string what = "metadata " + quote_untrusted(key);
    uint32_t type = 0;
    KS_RETURN_IF_ERROR(in.read(type, what + " type"));
    if (!known_type(type)) {
      return Status::error(path + ": " + what + " has unknown value type " + std::to_string(type));
    }
    GgufValue value;
    KS_RETURN_IF_ERROR(read_value(in, GgufValueType(type), value, what, 0, path));
    if (!out.metadata_.emplace(key, std::move(value)).second) {
      return Status::error(path + ": " + what + " appears twice");
    }
  }

  if (const GgufValue* a = out.find("general.alignment")) {
    if (a->type != GgufValueType::u32) {
      return Status::error(path + ": metadata 'general.alignment' must be uint32, not " +
                           gguf_value_type_name(a->type));
    }
    if (a->u == 0 || (a->u & (a->u - 1)) != 0 || a->u > kMaxAlignment) {
      return Status::error(path + ": metadata 'general.alignment' = " + std::to_string(a->u) +
                           " is not a power of two up to " + std::to_string(kMaxAlignment));
    }
    out.alignment_ = a->u;
  }

  out.tensors_.reserve(size_t(n_tensors));
  for (uint64_t k = 0; k < n_tensors; ++k) {
    GgufTensor t;
    KS_RETURN_IF_ERROR(parse_tensor_info(in, path, k, t));
    if (!out.tensor_index_.emplace(t.name, out.tensors_.size()).second) {
      return Status::error(path + ": tensor " + quote_untrusted(t.name) + " appears twice");
    }
    out.tensors_.push_back(std::move(t));
  }

  // The data section starts at the next multiple of the alignment after the tensor infos.
  const uint64_t data_start =
      (uint64_t(in.pos()) + out.alignment_ - 1) / out.alignment_ * out.alignment_;
  const uint64_t data_size = data_start <= size ? size - data_start : 0;
  std::vector<const GgufTensor*> by_offset;
  for (GgufTensor& t : out.tensors_) {
    const std::string where = path + ": tensor " + quote_untrusted(t.name);
    if (t.offset % out.alignment_ != 0) {
      return Status::error(where + ": offset " + std::to_string(t.offset) +
                           " is not a multiple of the alignment " + std::to_string(out.alignment_));
    }
    if (t.offset > data_size || t.nbytes > data_size - t.offset) {
      return Status::error(where + ": data [" + std::to_string(t.offset) + ", +" +
                           std::to_string(t.nbytes) + ") runs past the end of the data section (" +
                           std::to_string(data_size) + " bytes)");
    }
    t.data = bytes + data_start + t.offset;
    t.file = file;
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const GgufTensor* a, const GgufTensor* b) { return a->offset < b->offset; });
  for (size_t k = 1; k < by_offset.size(); ++k) {
    const GgufTensor& prev = *by_offset[k - 1];
    if (by_offset[k]->offset < prev.offset + prev.nbytes) {
      return Status::error(path + ": tensor " + quote_untrusted(by_offset[k]->name) +
                           " overlaps tensor " + quote_untrusted(prev.name));
    }
  }
  return out;
}

const GgufTensor* GgufFile::find_tensor(const std::string& name) const {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GgufValue* GgufFile::find(const std::string& key) const {
  const auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

namespace {

// Widens an integer scalar (or one array element's bytes) to int64; false when it does not fit.
bool integer_of(const GgufValue& v, int64_t& out) {
  switch (v.type) {
    case GgufValueType::u8:
    case GgufValueType::u16:
    case GgufValueType::u32:
    case GgufValueType::u64:
      if (v.u > uint64_t(std::numeric_limits<int64_t>::max())) return false;
      out = int64_t(v.u);
      return true;
    case GgufValueType::i8:
    case GgufValueType::i16:
    case GgufValueType::i32:
    case GgufValueType::i64:
      out = v.i;
      return true;
    default:
      return false;
  }
}

}  // namespace

Result<int64_t> GgufFile::get_int(const std::string& key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return Status::error(path_ + ": missing metadata " + quote_untrusted(key));
  int64_t out = 0;
  if (!integer_of(*v, out)) {
    return Status::error(path_ + ": metadata " + quote_untrusted(key) +
                         " must be an integer, not " + gguf_value_type_name(v->type) +
                         (v->type == GgufValueType::u64 ? " above 2^63" : ""));
  }
  return out;
}

Result<double> GgufFile::get_float(const std::string& key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return Status::error(path_ + ": missing metadata " + quote_untrusted(key));
  if (v->is_float()) return v->f;
  int64_t i = 0;
  if (integer_of(*v, i)) return double(i);
  return Status::error(path_ + ": metadata " + quote_untrusted(key) + " must be a number, not " +
                       gguf_value_type_name(v->type));
}

Result<std::string> GgufFile::get_string(const std::string& key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return Status::error(path_ + ": missing metadata " + quote_untrusted(key));
  if (v->type != GgufValueType::string) {
    return Status::error(path_ + ": metadata " + quote_untrusted(key) + " must be a string, not " +
                         gguf_value_type_name(v->type));
  }
  return v->str;
}

Result<const std::vector<std::string>*> GgufFile::get_strings(const std::string& key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return Status::error(path_ + ": missing metadata " + quote_untrusted(key));
  if (v->type != GgufValueType::array || v->element != GgufValueType::string) {
    return Status::error(path_ + ": metadata " + quote_untrusted(key) +
                         " must be an array of strings");
  }
  return &v->strings;
}

Result<std::vector<int64_t>> GgufFile::get_int_array(const std::string& key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return Status::error(path_ + ": missing metadata " + quote_untrusted(key));
  const uint64_t size = v->type == GgufValueType::array ? fixed_size(v->element) : 0;
  GgufValue probe;
  probe.type = v->element;
  if (size == 0 || !probe.is_integer()) {
    return Status::error(path_ + ": metadata " + quote_untrusted(key) +
                         " must be an array of integers");
  }
  std::vector<int64_t> out(size_t(v->count));
  for (uint64_t k = 0; k < v->count; ++k) {
    decode_scalar(v->element, v->raw + k * size, probe);
    if (!integer_of(probe, out[size_t(k)])) {
      return Status::error(path_ + ": metadata " + quote_untrusted(key) + "[" + std::to_string(k) +
                           "] does not fit in int64");
    }
  }
  return out;
}

Result<std::vector<float>> GgufFile::get_float_array(const std::string& key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return Status::error(path_ + ": missing metadata " + quote_untrusted(key));
  if (v->type != GgufValueType::array ||
      (v->element != GgufValueType::f32 && v->element != GgufValueType::f64)) {
    return Status::error(path_ + ": metadata " + quote_untrusted(key) +
                         " must be an array of floats");
  }
  const uint64_t size = fixed_size(v->element);
  std::vector<float> out(size_t(v->count));
  GgufValue probe;
  for (uint64_t k = 0; k < v->count; ++k) {
    decode_scalar(v->element, v->raw + k * size, probe);
    out[size_t(k)] = float(probe.f);
  }
  return out;
}

bool has_gguf_magic(const std::string& path) {
  // Opening a FIFO for reading would block until a writer appears.
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return false;
  std::ifstream file(path, std::ios::binary);
  char magic[4] = {};
  file.read(magic, sizeof(magic));
  return file.good() && std::memcmp(magic, "GGUF", 4) == 0;
}

}  // namespace kestrel
