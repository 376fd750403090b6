// A GGUF image assembled byte by byte, following the published layout, for the tests.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace kestrel::testing {

class GgufImage {
 public:
  template <typename T>
  GgufImage& put(T v) {
    const size_t at = bytes.size();
    bytes.resize(at + sizeof(T));
    std::memcpy(bytes.data() + at, &v, sizeof(T));
    return *this;
  }
  GgufImage& str(const std::string& s) {
    put<uint64_t>(s.size());
    bytes.insert(bytes.end(), s.begin(), s.end());
    return *this;
  }
  GgufImage& kv_u32(const std::string& key, uint32_t v) {
    return str(key).put<uint32_t>(4).put<uint32_t>(v);
  }
  GgufImage& kv_str(const std::string& key, const std::string& v) {
    return str(key).put<uint32_t>(8).str(v);
  }
  GgufImage& tensor(const std::string& name, std::vector<uint64_t> dims, uint32_t type,
                    uint64_t offset) {
    str(name).put<uint32_t>(uint32_t(dims.size()));
    for (uint64_t d : dims) put<uint64_t>(d);
    return put<uint32_t>(type).put<uint64_t>(offset);
  }
  GgufImage& align(size_t a) {
    bytes.resize((bytes.size() + a - 1) / a * a, 0);
    return *this;
  }
  std::vector<uint8_t> bytes;
};

}  // namespace kestrel::testing
