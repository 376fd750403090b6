#include "io/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>
#include <string_view>
#include <utility>

#include <nlohmann/json.hpp>

#include "core/quote.h"
#include "io/config.h"

namespace kestrel {
namespace {

using nlohmann::json;

// Real headers are tens of kilobytes; the cap keeps a hostile length from making us parse
// gigabytes of JSON.
constexpr uint64_t kMaxHeaderBytes = 100ull * 1024 * 1024;
constexpr size_t kAlignment = 64;

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ",";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

bool parse_dtype(std::string_view name, DType& dtype) {
  static constexpr std::pair<std::string_view, DType> kNames[] = {
      {"F64", DType::f64}, {"F32", DType::f32},     {"F16", DType::f16}, {"BF16", DType::bf16},
      {"I64", DType::i64}, {"I32", DType::i32},     {"I16", DType::i16}, {"I8", DType::i8},
      {"U8", DType::u8},   {"BOOL", DType::boolean}};
  for (const auto& [spelling, value] : kNames) {
    if (spelling == name) {
      dtype = value;
      return true;
    }
  }
  return false;
}

// A JSON integer in [0, 2^63): safetensors shapes and offsets never need more, and staying inside
// int64 lets the size arithmetic below be checked once.
bool json_to_index(const json& value, uint64_t& out) {
  if (value.is_number_unsigned()) {
    out = value.get<uint64_t>();
  } else if (value.is_number_integer()) {
    const int64_t v = value.get<int64_t>();
    if (v < 0) return false;
    out = uint64_t(v);
  } else {
    return false;
  }
  return out <= uint64_t(std::numeric_limits<int64_t>::max());
}

struct Extent {
  uint64_t begin = 0;
  uint64_t end = 0;
  const std::string* name = nullptr;
};

Status parse_tensor_entry(const std::string& path, const std::string& name, const json& entry,
                          uint64_t data_size, TensorRef& ref, Extent& extent) {
  const std::string where = path + ": tensor " + quote_untrusted(name);
  if (!entry.is_object()) return Status::error(where + ": entry is not a JSON object");

  const auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end()) return Status::error(where + ": missing \"dtype\"");
  if (!dtype_it->is_string()) return Status::error(where + ": \"dtype\" must be a string");
  const std::string& dtype_text = dtype_it->get_ref<const std::string&>();
  if (!parse_dtype(dtype_text, ref.dtype)) {
    return Status::error(where + ": unsupported dtype " + quote_untrusted(dtype_text));
  }

  const auto shape_it = entry.find("shape");
  if (shape_it == entry.end()) return Status::error(where + ": missing \"shape\"");
  if (!shape_it->is_array()) return Status::error(where + ": \"shape\" must be an array");
  uint64_t numel = 1;
  bool numel_overflows = false;
  ref.shape.reserve(shape_it->size());
  for (const json& dim : *shape_it) {
    uint64_t d = 0;
    if (!json_to_index(dim, d)) {
      return Status::error(where + ": \"shape\" must hold non-negative integers");
    }
    ref.shape.push_back(int64_t(d));
    // Keep scanning after an overflow: a later zero dimension makes the product 0 again, but
    // such a shape is still rejected because an int64 numel() could not be computed stepwise.
    if (d != 0 && numel > uint64_t(std::numeric_limits<int64_t>::max()) / d) {
      numel_overflows = true;
    }
    numel *= d;
  }
  if (numel_overflows) {
    return Status::error(where + ": shape " + shape_string(ref.shape) + " has too many elements");
  }

  const auto offsets_it = entry.find("data_offsets");
  if (offsets_it == entry.end()) return Status::error(where + ": missing \"data_offsets\"");
  uint64_t begin = 0;
  uint64_t end = 0;
  if (!offsets_it->is_array() || offsets_it->size() != 2 ||
      !json_to_index((*offsets_it)[0], begin) || !json_to_index((*offsets_it)[1], end)) {
    return Status::error(where +
                         ": \"data_offsets\" must be [begin, end] of non-negative integers");
  }
  if (begin > end) {
    return Status::error(where + ": data_offsets [" + std::to_string(begin) + "," +
                         std::to_string(end) + "] end before they begin");
  }
  if (end > data_size) {
    return Status::error(where + ": data_offsets [" + std::to_string(begin) + "," +
                         std::to_string(end) + "] past the end of the data (" +
                         std::to_string(data_size) + " bytes)");
  }

  const uint64_t element_size = dtype_size(ref.dtype);
  const uint64_t given = end - begin;
  const bool needed_overflows = numel > std::numeric_limits<uint64_t>::max() / element_size;
  if (needed_overflows || numel * element_size != given) {
    const std::string needed =
        needed_overflows ? std::string("more than 2^64") : std::to_string(numel * element_size);
    return Status::error(where + ": shape " + shape_string(ref.shape) + " of dtype " +
                         dtype_name(ref.dtype) + " needs " + needed + " bytes but offsets give " +
                         std::to_string(given));
  }

  ref.name = name;
  ref.nbytes = size_t(given);
  extent.begin = begin;
  extent.end = end;
  return Status::ok();
}

Status parse_metadata(const std::string& path, const json& value,
                      std::map<std::string, std::string>& metadata) {
  if (!value.is_object()) return Status::error(path + ": \"__metadata__\" must be a JSON object");
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string()) {
      return Status::error(path + ": \"__metadata__\" value for " + quote_untrusted(key) +
                           " must be a string");
    }
    metadata.emplace(key, item.get<std::string>());
  }
  return Status::ok();
}

// Zero-length tensors occupy no bytes, so they cannot overlap anything.
Status check_no_overlap(const std::string& path, std::vector<Extent>& extents) {
  std::sort(extents.begin(), extents.end(), [](const Extent& a, const Extent& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const Extent* furthest = nullptr;
  for (const Extent& e : extents) {
    if (e.begin == e.end) continue;
    if (furthest != nullptr && e.begin < furthest->end) {
      return Status::error(path + ": tensor " + quote_untrusted(*e.name) + " overlaps tensor " +
                           quote_untrusted(*furthest->name));
    }
    if (furthest == nullptr || e.end > furthest->end) furthest = &e;
  }
  return Status::ok();
}

Status write_all(int fd, const void* data, size_t size, const std::string& path) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, std::min<size_t>(size, size_t(1) << 30));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::error(path + ": cannot write: " + std::strerror(errno));
    }
    p += n;
    size -= size_t(n);
  }
  return Status::ok();
}

size_t align_up(size_t n) {
  return (n + kAlignment - 1) / kAlignment * kAlignment;
}

}  // namespace

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f64:
      return "F64";
    case DType::f32:
      return "F32";
    case DType::f16:
      return "F16";
    case DType::bf16:
      return "BF16";
    case DType::i64:
      return "I64";
    case DType::i32:
      return "I32";
    case DType::i16:
      return "I16";
    case DType::i8:
      return "I8";
    case DType::u8:
      return "U8";
    case DType::boolean:
      return "BOOL";
  }
  return "?";
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f64:
    case DType::i64:
      return 8;
    case DType::f32:
    case DType::i32:
      return 4;
    case DType::f16:
    case DType::bf16:
    case DType::i16:
      return 2;
    case DType::i8:
    case DType::u8:
    case DType::boolean:
      return 1;
  }
  return 1;
}

int64_t TensorRef::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Result<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  KS_ASSIGN_OR_RETURN(std::shared_ptr<MappedFile> file, MappedFile::open(path));
  const uint8_t* bytes = file->data();
  const size_t size = file->size();
  return parse(std::move(file), bytes, size, path);
}

Result<SafetensorsFile> SafetensorsFile::parse(std::shared_ptr<const MappedFile> file,
                                               const uint8_t* bytes, size_t size,
                                               const std::string& path) {
  if (size < 8) {
    return Status::error(path + ": truncated: " + std::to_string(size) +
                         " bytes, too short for the 8-byte header length");
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > size - 8) {
    return Status::error(path + ": header length " + std::to_string(header_len) +
                         " past end of file (size " + std::to_string(size) + ")");
  }
  if (header_len > kMaxHeaderBytes) {
    return Status::error(path + ": header length " + std::to_string(header_len) +
                         " exceeds the 100 MB limit");
  }

  const char* header_begin = reinterpret_cast<const char*>(bytes + 8);
  json header;
  try {
    header = json::parse(header_begin, header_begin + header_len);
  } catch (const json::parse_error& e) {
    return Status::error(path + ": header is not valid JSON (error at byte " +
                         std::to_string(e.byte) + " of the header)");
  } catch (const std::exception& e) {
    return Status::error(path + ": header is not valid JSON (" + e.what() + ")");
  }
  if (!header.is_object()) return Status::error(path + ": header is not a JSON object");

  const uint8_t* data = bytes + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;

  SafetensorsFile out;
  out.path_ = path;
  std::vector<Extent> extents;
  extents.reserve(header.size());
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      KS_RETURN_IF_ERROR(parse_metadata(path, entry, out.metadata_));
      continue;
    }
    TensorRef ref;
    Extent extent;
    KS_RETURN_IF_ERROR(parse_tensor_entry(path, name, entry, data_size, ref, extent));
    ref.data = data + extent.begin;
    ref.file = file;
    // nlohmann keeps the last of duplicate JSON keys, so every name here is new.
    const auto it = out.tensors_.emplace(name, std::move(ref)).first;
    extent.name = &it->first;
    extents.push_back(extent);
  }
  KS_RETURN_IF_ERROR(check_no_overlap(path, extents));
  return out;
}

const TensorRef* SafetensorsFile::find(const std::string& name) const {
  const auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

Result<TensorSource> TensorSource::open_file(const std::string& path) {
  KS_ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::open(path));
  TensorSource source;
  source.where_ = path;
  source.files_.push_back(std::make_unique<SafetensorsFile>(std::move(file)));
  for (const auto& [name, ref] : source.files_.front()->tensors())
    source.index_.emplace(name, &ref);
  return source;
}

Result<TensorSource> TensorSource::open_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string index_path = (fs::path(dir) / "model.safetensors.index.json").string();
  const std::string single_path = (fs::path(dir) / "model.safetensors").string();
  std::error_code ec;
  if (!fs::exists(index_path, ec)) {
    if (!fs::exists(single_path, ec)) {
      return Status::error(dir + ": no model.safetensors or model.safetensors.index.json");
    }
    KS_ASSIGN_OR_RETURN(TensorSource source, open_file(single_path));
    source.where_ = dir;
    return source;
  }

  KS_ASSIGN_OR_RETURN(std::string index_text, read_text_file(index_path));
  json index;
  try {
    index = json::parse(index_text);
  } catch (const json::parse_error& e) {
    return Status::error(index_path + ": not valid JSON (error at byte " + std::to_string(e.byte) +
                         ")");
  } catch (const std::exception& e) {
    return Status::error(index_path + ": not valid JSON (" + e.what() + ")");
  }
  if (!index.is_object()) return Status::error(index_path + ": not a JSON object");
  const auto map_it = index.find("weight_map");
  if (map_it == index.end() || !map_it->is_object()) {
    return Status::error(index_path + ": missing \"weight_map\" object");
  }

  // shard file name -> tensors the index places in it
  std::map<std::string, std::vector<std::string>> shards;
  for (const auto& [tensor, shard] : map_it->items()) {
    if (!shard.is_string()) {
      return Status::error(index_path + ": shard of tensor " + quote_untrusted(tensor) +
                           " must be a string");
    }
    const std::string& shard_name = shard.get_ref<const std::string&>();
    // The index comes from the download; it must not send us outside the model directory.
    if (shard_name.empty() || shard_name == "." || shard_name == ".." ||
        shard_name.find('/') != std::string::npos || shard_name.find('\0') != std::string::npos) {
      return Status::error(index_path + ": tensor " + quote_untrusted(tensor) + " names shard " +
                           quote_untrusted(shard_name) + ", which is not a plain file name");
    }
    shards[shard_name].push_back(tensor);
  }
  if (shards.empty()) return Status::error(index_path + ": \"weight_map\" lists no tensors");

  TensorSource source;
  source.where_ = dir;
  std::map<std::string, std::string> shard_of;  // tensor -> shard file that holds it
  for (const auto& [shard_name, listed] : shards) {
    const std::string shard_path = (fs::path(dir) / shard_name).string();
    auto file = SafetensorsFile::open(shard_path);
    if (!file.is_ok()) {
      return Status::error(index_path + ": shard " + quote_untrusted(shard_name) +
                           " cannot be loaded: " + file.status().message());
    }
    for (const std::string& tensor : listed) {
      if (file->find(tensor) == nullptr) {
        return Status::error(index_path + ": tensor " + quote_untrusted(tensor) +
                             " is listed in shard " + quote_untrusted(shard_name) +
                             " but that shard does not contain it");
      }
    }
    source.files_.push_back(std::make_unique<SafetensorsFile>(std::move(file).value()));
    for (const auto& [name, ref] : source.files_.back()->tensors()) {
      const auto [it, inserted] = shard_of.emplace(name, shard_name);
      if (!inserted) {
        return Status::error(dir + ": tensor " + quote_untrusted(name) + " appears in both shard " +
                             quote_untrusted(it->second) + " and shard " +
                             quote_untrusted(shard_name));
      }
      source.index_.emplace(name, &ref);
    }
  }
  return source;
}

const TensorRef* TensorSource::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

Result<const TensorRef*> TensorSource::get(const std::string& name) const {
  const TensorRef* ref = find(name);
  if (ref == nullptr) return Status::error(where_ + ": missing tensor " + quote_untrusted(name));
  return ref;
}

const std::map<std::string, std::string>& TensorSource::metadata() const {
  static const std::map<std::string, std::string> kEmpty;
  return files_.empty() ? kEmpty : files_.front()->metadata();
}

Status write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                         const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) {
    json meta = json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header["__metadata__"] = std::move(meta);
  }

  // Tensors whose size is a multiple of 64 bytes go first, so each starts 64-byte aligned with
  // no gaps; the rest follow back to back. The HF safetensors library rejects gaps between
  // tensors, and this order needs none.
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_partition(order.begin(), order.end(),
                        [&](size_t i) { return tensors[i].nbytes % kAlignment == 0; });
  std::vector<size_t> offsets(tensors.size());  // start of each tensor within the data region
  size_t data_size = 0;
  for (size_t index : order) {
    const TensorToWrite& t = tensors[index];
    const std::string where = path + ": tensor " + quote_untrusted(t.name);
    if (t.name.empty() || t.name == "__metadata__") {
      return Status::error(path + ": invalid tensor name " + quote_untrusted(t.name));
    }
    if (header.contains(t.name)) return Status::error(where + ": written twice");
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) return Status::error(where + ": negative dimension in " + shape_string(t.shape));
      if (d != 0 && numel > uint64_t(std::numeric_limits<int64_t>::max()) / uint64_t(d)) {
        return Status::error(where + ": shape " + shape_string(t.shape) + " is too large");
      }
      numel *= uint64_t(d);
    }
    if (numel > std::numeric_limits<uint64_t>::max() / dtype_size(t.dtype) ||
        numel * dtype_size(t.dtype) != t.nbytes) {
      return Status::error(where + ": shape " + shape_string(t.shape) + " of dtype " +
                           dtype_name(t.dtype) + " does not match " + std::to_string(t.nbytes) +
                           " bytes");
    }
    if (t.data == nullptr && t.nbytes > 0) return Status::error(where + ": no data");
    const size_t begin = data_size;
    offsets[index] = begin;
    data_size = begin + t.nbytes;
    header[t.name] = {{"dtype", dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {uint64_t(begin), uint64_t(data_size)}}};
  }

  std::string header_text = header.dump();
  header_text.resize(align_up(8 + header_text.size()) - 8, ' ');
  uint8_t length_bytes[8];
  for (int i = 0; i < 8; ++i) length_bytes[i] = uint8_t(uint64_t(header_text.size()) >> (8 * i));

  const std::string tmp_path = path + ".tmp";
  const int fd = ::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::error(tmp_path + ": cannot create: " + std::strerror(errno));
  auto write_body = [&]() -> Status {
    KS_RETURN_IF_ERROR(write_all(fd, length_bytes, sizeof(length_bytes), tmp_path));
    KS_RETURN_IF_ERROR(write_all(fd, header_text.data(), header_text.size(), tmp_path));
    for (size_t index : order) {
      KS_RETURN_IF_ERROR(write_all(fd, tensors[index].data, tensors[index].nbytes, tmp_path));
    }
    return Status::ok();
  };
  Status status = write_body();
  if (::close(fd) != 0 && status.is_ok()) {
    status = Status::error(tmp_path + ": cannot write: " + std::strerror(errno));
  }
  if (status.is_ok() && std::rename(tmp_path.c_str(), path.c_str()) != 0) {
    status = Status::error(path + ": cannot rename from " + tmp_path + ": " + std::strerror(errno));
  }
  if (!status.is_ok()) ::unlink(tmp_path.c_str());
  return status;
}

}  // namespace kestrel
