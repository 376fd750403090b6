// Safetensors files: a little-endian u64 header length, a JSON header, then raw tensor bytes.
// Files are memory-mapped; a TensorRef points into the mapping and keeps it alive. Everything
// read from a file (header length, offsets, shapes, dtypes) is validated against the file's size
// before it is used, and every error names the file and the tensor.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/blob.h"
#include "core/status.h"

namespace kestrel {

enum class DType : uint8_t { f64, f32, f16, bf16, i64, i32, i16, i8, u8, boolean };

const char* dtype_name(DType dtype);  // safetensors spelling: "F32", "BF16", ...
size_t dtype_size(DType dtype);

struct TensorRef {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  std::shared_ptr<const MappedFile> file;  // keeps `data` valid

  int64_t numel() const;
  Blob blob() const { return Blob::view(file, data, nbytes); }
};

class SafetensorsFile {
 public:
  static Result<SafetensorsFile> open(const std::string& path);
  // Parses an in-memory image (the fuzz target and tests use this); `path` names it in errors.
  static Result<SafetensorsFile> parse(std::shared_ptr<const MappedFile> file, const uint8_t* bytes,
                                       size_t size, const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorRef>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorRef* find(const std::string& name) const;

 private:
  std::string path_;
  std::map<std::string, TensorRef> tensors_;
  std::map<std::string, std::string> metadata_;
};

// The weights of a model directory: model.safetensors, or the shards listed by
// model.safetensors.index.json (every listed shard must exist and hold what the index says).
class TensorSource {
 public:
  static Result<TensorSource> open_dir(const std::string& dir);
  static Result<TensorSource> open_file(const std::string& path);

  const TensorRef* find(const std::string& name) const;
  // Error names the directory and the tensor when it is absent.
  Result<const TensorRef*> get(const std::string& name) const;
  const std::map<std::string, const TensorRef*>& all() const { return index_; }
  // The metadata of the first (or only) file.
  const std::map<std::string, std::string>& metadata() const;
  const std::string& where() const { return where_; }

 private:
  std::string where_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorRef*> index_;
};

struct TensorToWrite {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t nbytes = 0;
};

// Writes a safetensors file whose data region starts 64-byte aligned (the header is padded with
// spaces, which the format allows). Tensors lie back to back with no gaps, as HF's safetensors
// library requires; those whose size is a multiple of 64 bytes come first, so they all start
// 64-byte aligned and a mapped file can be used in place by the kernels. Writes to a temporary
// name and renames on success.
Status write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                         const std::map<std::string, std::string>& metadata);

}  // namespace kestrel
