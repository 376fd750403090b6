#include "tokenizer/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "tokenizer/unicode.h"
#include "tokenizer/unicode_tables.h"

namespace kestrel {
namespace {

void append_ranges(std::string& out, std::span<const unicode_tables::CodeRange> ranges) {
  char buf[40];
  for (const auto& r : ranges) {
    if (r.lo == r.hi) {
      std::snprintf(buf, sizeof(buf), "\\x{%X}", r.lo);
    } else {
      std::snprintf(buf, sizeof(buf), "\\x{%X}-\\x{%X}", r.lo, r.hi);
    }
    out += buf;
  }
}

// The class members (without brackets) for \p{L} / \p{N} / \s as Oniguruma has them.
std::string class_body(char what) {
  std::string body;
  if (what == 'L') {
    body = "\\p{L}";
    append_ranges(body, unicode_tables::letter_extra());
  } else if (what == 'N') {
    body = "\\p{N}";
    append_ranges(body, unicode_tables::number_extra());
  } else {
    append_ranges(body, unicode_tables::white_space());
  }
  return body;
}

// Length of the escape sequence starting at pattern[i] == '\\', copied through unchanged:
// \x{...}, \p{...}, \o{...}, \N{...}, \Q...\E, or a backslash and one character.
size_t escape_length(std::string_view p, size_t i) {
  if (i + 1 >= p.size()) return 1;
  const char c = p[i + 1];
  if ((c == 'x' || c == 'p' || c == 'P' || c == 'o' || c == 'N' || c == 'g' || c == 'k') &&
      i + 2 < p.size() && p[i + 2] == '{') {
    const size_t close = p.find('}', i + 3);
    return close == std::string_view::npos ? p.size() - i : close + 1 - i;
  }
  if (c == 'Q') {
    const size_t end = p.find("\\E", i + 2);
    return end == std::string_view::npos ? p.size() - i : end + 2 - i;
  }
  // The rest of a multi-byte UTF-8 character escaped by a backslash.
  size_t n = 2;
  while (i + n < p.size() && (static_cast<unsigned char>(p[i + n]) & 0xC0) == 0x80) ++n;
  return n;
}

// Which property an escape names, if it is one we rewrite: 'L', 'N', or 0.
char rewritten_property(std::string_view esc) {
  if (esc == "\\p{L}" || esc == "\\pL" || esc == "\\P{L}" || esc == "\\PL") return 'L';
  if (esc == "\\p{N}" || esc == "\\pN" || esc == "\\P{N}" || esc == "\\PN") return 'N';
  return 0;
}

}  // namespace

std::string rewrite_oniguruma_pattern(std::string_view p) {
  std::string out;
  out.reserve(p.size() * 4);
  bool in_class = false;
  size_t class_start = 0;  // index in p just after '[' (and '^')
  for (size_t i = 0; i < p.size();) {
    const char c = p[i];
    if (c == '\\') {
      size_t len = escape_length(p, i);
      if (len == 2 && (p[i + 1] == 'p' || p[i + 1] == 'P') && i + 2 < p.size()) len = 3;  // \pL
      const std::string_view esc = p.substr(i, len);
      const char prop = rewritten_property(esc);
      const bool negated = esc.size() > 1 && esc[1] == 'P';
      if (prop != 0 && !in_class) {
        out += negated ? "[^" : "[";
        out += class_body(prop);
        out += "]";
      } else if (prop != 0 && in_class && !negated) {
        out += class_body(prop);
      } else if (esc == "\\s") {
        out += in_class ? class_body('s') : "[" + class_body('s') + "]";
      } else if (esc == "\\S" && !in_class) {
        out += "[^" + class_body('s') + "]";
      } else {
        out += esc;
      }
      i += len;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      ++i;
      if (i < p.size() && p[i] == '^') {
        out += '^';
        ++i;
      }
      class_start = i;
      continue;
    }
    if (in_class) {
      if (c == '[' && i + 1 < p.size() && p[i + 1] == ':') {  // POSIX class [:name:]
        const size_t close = p.find(":]", i + 2);
        const size_t len = close == std::string_view::npos ? 1 : close + 2 - i;
        out += p.substr(i, len);
        i += len;
        continue;
      }
      if (c == ']' && i != class_start) in_class = false;  // a leading ']' is a literal
    }
    out += c;
    ++i;
  }
  return out;
}

struct Regex::Compiled {
  pcre2_code* code = nullptr;
  bool jit = false;
  ~Compiled() { pcre2_code_free(code); }
};

Result<Regex> Regex::compile_raw(std::string pattern, uint32_t options) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   options, &error, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    return Status::error("PCRE2 cannot compile the pre-tokenizer regex at offset " +
                         std::to_string(offset) + ": " + reinterpret_cast<char*>(message) +
                         " (pattern: " + pattern + ")");
  }
  auto compiled = std::make_shared<Compiled>();
  compiled->code = code;
  // Without JIT support PCRE2's interpreter gives the same matches, only slower.
  compiled->jit = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  Regex regex;
  regex.compiled_ = std::move(compiled);
  regex.pattern_ = std::move(pattern);
  return regex;
}

Result<Regex> Regex::compile(std::string_view pattern) {
  // Oniguruma's ^ and $ are line anchors; its \s, \p{L}, \p{N} are handled by the rewrite.
  return compile_raw(rewrite_oniguruma_pattern(pattern), PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE);
}

Result<Regex> Regex::literal(std::string_view text) {
  return compile_raw(std::string(text), PCRE2_UTF | PCRE2_LITERAL);
}

namespace {

struct MatchData {
  explicit MatchData(const pcre2_code* code)
      : data(pcre2_match_data_create_from_pattern(code, nullptr)),
        context(pcre2_match_context_create(nullptr)) {}
  ~MatchData() {
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
  MatchData(const MatchData&) = delete;
  MatchData& operator=(const MatchData&) = delete;
  pcre2_match_data* data;
  pcre2_match_context* context;
};

// PCRE2's default bound on backtracking steps a match (and Oniguruma's, whose Rust binding panics
// past it).
constexpr uint64_t kDefaultMatchLimit = 10'000'000;

// One match attempt from `start`: JIT first, the interpreter when the JIT stack runs out. The
// patterns' whitespace alternatives (`\s*[\r\n]+`) take a run of spaces whole and give it back a
// character at a time, so one attempt costs steps in proportion to the run: the limit grows with
// the text left (a 10-million-space run without a line break used to fail at the default).
int match_once(const pcre2_code* code, bool jit, std::string_view text, size_t start,
               MatchData& md) {
  const uint64_t limit = std::min<uint64_t>(
      UINT32_MAX, std::max<uint64_t>(kDefaultMatchLimit, 8 * uint64_t(text.size() - start)));
  pcre2_set_match_limit(md.context, uint32_t(limit));
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  if (jit) {
    const int rc = pcre2_jit_match(code, subject, text.size(), start, 0, md.data, md.context);
    if (rc != PCRE2_ERROR_JIT_STACKLIMIT) return rc;
  }
  return pcre2_match(code, subject, text.size(), start, PCRE2_NO_JIT | PCRE2_NO_UTF_CHECK, md.data,
                     md.context);
}

Status match_error(int rc) {
  PCRE2_UCHAR message[256];
  pcre2_get_error_message(rc, message, sizeof(message));
  return Status::error(std::string("pre-tokenizer regex failed: ") +
                       reinterpret_cast<char*>(message));
}

}  // namespace

Status Regex::find_all(std::string_view text, std::vector<ByteSpan>& out) const {
  const pcre2_code* code = compiled_->code;
  MatchData md(code);
  size_t last_end = 0;
  bool have_last = false;
  size_t last_match_end = 0;
  while (last_end <= text.size()) {
    const int rc = match_once(code, compiled_->jit, text, last_end, md);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) return match_error(rc);
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.data);
    const size_t s = ov[0], e = ov[1];
    if (s == e && have_last && last_match_end == e) {
      if (last_end >= text.size()) break;
      size_t next = last_end;
      unicode::next_code_point(text, next);
      last_end = next;
      continue;
    }
    last_end = e;
    last_match_end = e;
    have_last = true;
    out.push_back({static_cast<uint32_t>(s), static_cast<uint32_t>(e)});
  }
  return Status::ok();
}

}  // namespace kestrel
