// GGUF files (llama.cpp's model container, versions 2 and 3, little-endian): a header, typed
// key/value metadata, tensor infos, then tensor data aligned to `general.alignment` (default 32).
// The file is memory-mapped; every count, string length, array length, tensor dimension, offset
// and extent read from it is checked against the bytes that remain before it is used or
// allocated, so a hostile file gives one error line that names the file and the key or tensor.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/blob.h"
#include "core/status.h"

namespace kestrel {

enum class GgufValueType : uint32_t {
  u8 = 0,
  i8 = 1,
  u16 = 2,
  i16 = 3,
  u32 = 4,
  i32 = 5,
  f32 = 6,
  boolean = 7,
  string = 8,
  array = 9,
  u64 = 10,
  i64 = 11,
  f64 = 12,
};
const char* gguf_value_type_name(GgufValueType type);

// One metadata value. Scalars hold their value widened; arrays of fixed-size elements stay in
// the mapping (`raw`, `count` little-endian elements of `element`), arrays of strings and of
// arrays are unpacked (each element occupies at least 8 bytes of the file, so their memory stays
// within a small multiple of the file size).
struct GgufValue {
  GgufValueType type = GgufValueType::u8;
  uint64_t u = 0;  // unsigned integers and bool
  int64_t i = 0;   // signed integers
  double f = 0;    // f32 / f64
  std::string str;

  GgufValueType element = GgufValueType::u8;  // arrays only
  uint64_t count = 0;
  const uint8_t* raw = nullptr;
  std::vector<std::string> strings;
  std::vector<GgufValue> arrays;

  bool is_integer() const;
  bool is_float() const { return type == GgufValueType::f32 || type == GgufValueType::f64; }
};

// ggml tensor types (the numbers are the file's); only their sizes matter to the container.
enum class GgmlType : uint32_t {
  f32 = 0,
  f16 = 1,
  q4_0 = 2,
  q4_1 = 3,
  q5_0 = 6,
  q5_1 = 7,
  q8_0 = 8,
  q8_1 = 9,
  q2_k = 10,
  q3_k = 11,
  q4_k = 12,
  q5_k = 13,
  q6_k = 14,
  q8_k = 15,
  iq2_xxs = 16,
  iq2_xs = 17,
  iq3_xxs = 18,
  iq1_s = 19,
  iq4_nl = 20,
  iq3_s = 21,
  iq2_s = 22,
  iq4_xs = 23,
  i8 = 24,
  i16 = 25,
  i32 = 26,
  i64 = 27,
  f64 = 28,
  iq1_m = 29,
  bf16 = 30,
  tq1_0 = 34,
  tq2_0 = 35,
  mxfp4 = 39,
};

struct GgmlTypeTraits {
  const char* name = nullptr;  // "Q4_K"; nullptr for numbers ggml does not define
  int64_t block = 0;           // elements per block
  int64_t block_bytes = 0;     // bytes per block
};
GgmlTypeTraits ggml_type_traits(uint32_t type);
const char* ggml_type_name(GgmlType type);

struct GgufTensor {
  std::string name;
  GgmlType type = GgmlType::f32;
  std::vector<int64_t> dims;  // ggml order: dims[0] is the contiguous (column) dimension
  uint64_t offset = 0;        // within the data section
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  std::shared_ptr<const MappedFile> file;  // keeps `data` valid

  int64_t numel() const;
  // Rows of dims[0] elements: the product of the other dimensions.
  int64_t rows() const;
};

class GgufFile {
 public:
  static Result<GgufFile> open(const std::string& path);
  // Parses an in-memory image (the fuzz target and tests use this); `path` names it in errors.
  // `file`, when given, owns `bytes` and is kept alive by the result.
  static Result<GgufFile> parse(std::shared_ptr<const MappedFile> file, const uint8_t* bytes,
                                size_t size, const std::string& path);

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  const std::map<std::string, GgufValue>& metadata() const { return metadata_; }
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* find_tensor(const std::string& name) const;
  const GgufValue* find(const std::string& key) const;

  // Typed reads of metadata; errors name the file and the key. Integers of any width and
  // signedness are accepted when the value fits; floats accept f32 and f64.
  Result<int64_t> get_int(const std::string& key) const;
  Result<double> get_float(const std::string& key) const;
  Result<std::string> get_string(const std::string& key) const;
  Result<const std::vector<std::string>*> get_strings(const std::string& key) const;
  Result<std::vector<int64_t>> get_int_array(const std::string& key) const;
  Result<std::vector<float>> get_float_array(const std::string& key) const;

 private:
  std::shared_ptr<const MappedFile> mapping_;  // keeps metadata arrays' `raw` valid
  std::string path_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

// Whether `path` is a regular file starting with the GGUF magic (false for unreadable files,
// without opening FIFOs or devices).
bool has_gguf_magic(const std::string& path);

}  // namespace kestrel
