// libFuzzer target for the GGUF container reader. Every tensor the parser accepts is read end to
// end and every metadata array walked, so a view that reaches outside the input trips
// AddressSanitizer.
#include <cstddef>
#include <cstdint>

#include "io/gguf.h"

namespace {

uint64_t walk(const kestrel::GgufValue& v) {
  uint64_t sum = v.u + uint64_t(v.i) + v.str.size();
  for (const auto& s : v.strings) sum += s.size();
  for (const auto& a : v.arrays) sum += walk(a);
  return sum;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = kestrel::GgufFile::parse(nullptr, data, size, "fuzz.gguf");
  if (!file.is_ok()) return 0;
  uint64_t sum = 0;
  for (const auto& [key, value] : file->metadata()) {
    sum += walk(value);
    // The typed array reads decode every element from the mapping.
    if (auto ints = file->get_int_array(key); ints.is_ok()) {
      for (int64_t x : *ints) sum += uint64_t(x);
    }
    if (auto floats = file->get_float_array(key); floats.is_ok()) sum += floats->size();
  }
  for (const auto& tensor : file->tensors()) {
    if (tensor.data < data || tensor.nbytes > size_t(data + size - tensor.data)) __builtin_trap();
    const auto traits = kestrel::ggml_type_traits(uint32_t(tensor.type));
    if (size_t(tensor.numel() / traits.block * traits.block_bytes) != tensor.nbytes) {
      __builtin_trap();
    }
    for (size_t i = 0; i < tensor.nbytes; ++i) sum += tensor.data[i];
  }
  volatile uint64_t sink = sum;
  (void)sink;
  return 0;
}
