// libFuzzer target for the safetensors header parser. Every tensor the parser accepts is read
// end to end, so a view that reaches outside the input trips AddressSanitizer.
#include <cstddef>
#include <cstdint>

#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = kestrel::SafetensorsFile::parse(nullptr, data, size, "fuzz.safetensors");
  if (!file.is_ok()) return 0;
  uint64_t sum = 0;
  for (const auto& [name, tensor] : file->tensors()) {
    if (tensor.data < data || tensor.nbytes > size_t(data + size - tensor.data)) __builtin_trap();
    if (size_t(tensor.numel()) * kestrel::dtype_size(tensor.dtype) != tensor.nbytes) {
      __builtin_trap();
    }
    for (size_t i = 0; i < tensor.nbytes; ++i) sum += tensor.data[i];
  }
  // Keeps the reads from being optimized away.
  volatile uint64_t sink = sum;
  (void)sink;
  return 0;
}
