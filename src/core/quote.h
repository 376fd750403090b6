// Quoting text that comes from untrusted files (tensor names, config values) for error messages.
#pragma once

#include <cstdio>
#include <string>
#include <string_view>

namespace kestrel {

// text with control bytes escaped and the length bounded, so every message stays one line.
inline std::string escape_untrusted(std::string_view text, size_t max_shown) {
  std::string out;
  for (size_t i = 0; i < text.size() && i < max_shown; ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == 0x7f) {
      char buf[5];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  if (text.size() > max_shown) out += "...";
  return out;
}

// 'text', escaped and bounded as escape_untrusted does.
inline std::string quote_untrusted(std::string_view text, size_t max_shown = 120) {
  return "'" + escape_untrusted(text, max_shown) + "'";
}

}  // namespace kestrel
