// The pre-tokenizer's regex: HF tokenizer.json patterns (written for Oniguruma) run with PCRE2
// (UTF + UCP, JIT-compiled), rewritten so both engines agree code point for code point.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace kestrel {

// HF runs patterns with Oniguruma, whose Unicode tables are newer than PCRE2's and whose \s is the
// White_Space property (PCRE2's \s also has U+180E). This rewrites \p{L}, \p{N}, \pL, \pN (inside
// and outside classes), \P{L}, \P{N}, \s and \S (outside classes) into classes with Oniguruma's
// membership. Other escapes, and \S or \P{..} inside a class (which PCRE2 cannot take apart),
// keep PCRE2's meaning: they only differ for code points assigned after Unicode 14.
std::string rewrite_oniguruma_pattern(std::string_view pattern);

struct ByteSpan {
  uint32_t begin, end;  // [begin, end) in bytes
};

class Regex {
 public:
  // Compiles an HF "Regex" pattern (rewritten as above).
  static Result<Regex> compile(std::string_view pattern);
  // Compiles a pattern matching `text` literally (HF's "String" split patterns).
  static Result<Regex> literal(std::string_view text);

  // Appends the successive non-overlapping matches in `text` (valid UTF-8) to `out`, with
  // Oniguruma's find_iter rule for empty matches (an empty match right where the previous match
  // ended is skipped by advancing one character).
  Status find_all(std::string_view text, std::vector<ByteSpan>& out) const;

  const std::string& pattern() const { return pattern_; }

 private:
  struct Compiled;
  static Result<Regex> compile_raw(std::string pcre2_pattern, uint32_t options);
  std::shared_ptr<const Compiled> compiled_;
  std::string pattern_;  // as given to PCRE2
};

}  // namespace kestrel
