// A read-only or owned span of bytes that keeps its storage alive: heap memory or a memory-mapped
// file. Weights loaded from a converted model point straight into the mapping (no second copy).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/status.h"

namespace kestrel {

class Blob {
 public:
  Blob() = default;
  // Owned, 64-byte aligned, uninitialized heap memory.
  static Blob allocate(size_t size);
  // A view into memory kept alive by `owner`.
  static Blob view(std::shared_ptr<const void> owner, const uint8_t* data, size_t size);

  const uint8_t* data() const { return data_; }
  // Writable only for blobs made by allocate().
  uint8_t* mutable_data() { return writable_ ? const_cast<uint8_t*>(data_) : nullptr; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  template <typename T>
  const T* as() const {
    return reinterpret_cast<const T*>(data_);
  }
  template <typename T>
  T* as_mutable() {
    return reinterpret_cast<T*>(mutable_data());
  }

 private:
  std::shared_ptr<const void> owner_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool writable_ = false;
};

// A whole file mapped read-only. Shared so tensor views can keep it alive.
class MappedFile {
 public:
  static Result<std::shared_ptr<MappedFile>> open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace kestrel
