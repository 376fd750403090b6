// UTF-8 and Unicode helpers for the tokenizer: strict validation, the lossy conversion HF applies
// when decoding, and NFC normalization with the Unicode 9.0 data HF's normalizer uses.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace kestrel::unicode {

// Byte offset of the first byte that does not start a well-formed UTF-8 sequence (overlong forms,
// surrogates, code points above U+10FFFF and truncated sequences are all ill-formed), or nullopt.
std::optional<size_t> find_invalid_utf8(std::string_view text);

// Decodes the well-formed sequence at `text[pos]` and advances `pos` past it.
inline uint32_t next_code_point(std::string_view text, size_t& pos) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data()) + pos;
  if (s[0] < 0x80) {
    pos += 1;
    return s[0];
  }
  if (s[0] < 0xE0) {
    pos += 2;
    return (uint32_t(s[0] & 0x1F) << 6) | (s[1] & 0x3F);
  }
  if (s[0] < 0xF0) {
    pos += 3;
    return (uint32_t(s[0] & 0x0F) << 12) | (uint32_t(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
  }
  pos += 4;
  return (uint32_t(s[0] & 0x07) << 18) | (uint32_t(s[1] & 0x3F) << 12) |
         (uint32_t(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
}

void append_utf8(std::string& out, uint32_t code_point);

// Classifies the bytes at the start of `bytes`, following the "maximal subpart" rule of the
// Unicode standard (the rule Rust's String::from_utf8_lossy uses):
//   kValid:      a well-formed character of `length` bytes;
//   kInvalid:    `length` bytes (1..3) that can never start a well-formed character, to be
//                replaced by one U+FFFD;
//   kIncomplete: all of `bytes` is a proper prefix of a well-formed character; more bytes decide.
struct Utf8Step {
  enum Kind { kValid, kInvalid, kIncomplete } kind;
  size_t length;
};
Utf8Step utf8_step(std::string_view bytes);

// Appends `bytes` to `out`, replacing each maximal ill-formed subpart by U+FFFD (an incomplete
// sequence at the end counts as ill-formed), exactly as Rust's String::from_utf8_lossy.
void append_utf8_lossy(std::string& out, std::string_view bytes);

// True when NFC leaves `text` (valid UTF-8) unchanged for certain, checked cheaply.
bool is_nfc_quick(std::string_view text);
// Appends the NFC form of `text` (valid UTF-8) to `out`.
void append_nfc(std::string& out, std::string_view text);

// The White_Space property (the whitespace HF strips around added tokens).
bool is_white_space(uint32_t code_point);

}  // namespace kestrel::unicode
