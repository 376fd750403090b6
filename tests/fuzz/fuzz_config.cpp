// libFuzzer target for config.json and generation_config.json parsing. Besides not crashing,
// every accepted config must survive model_config_to_json and parse back unchanged.
#include <cstddef>
#include <cstdint>
#include <string>

#include "io/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);

  kestrel::ModelConfig defaults;
  (void)kestrel::apply_generation_config(defaults, text, "generation_config.json");

  auto config = kestrel::parse_model_config(text, "config.json");
  if (!config.is_ok()) return 0;
  kestrel::ModelConfig c = config.value();
  auto back = kestrel::parse_model_config(kestrel::model_config_to_json(c), "written.json");
  if (!back.is_ok() || !(back.value() == c)) __builtin_trap();
  (void)kestrel::apply_generation_config(c, text, "generation_config.json");
  return 0;
}
