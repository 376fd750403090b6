// Lexer for the chat-template interpreter. It reproduces Jinja's whitespace handling under
// transformers' settings (trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False):
//   - `{%-`/`{#-`/`{{-` strip all whitespace before the tag, `-%}`/`-#}`/`-}}` all after it;
//   - a block or comment tag (not `{{`) preceded on its line only by spaces/tabs loses them,
//     unless opened with `{%+`;
//   - the first newline after a block or comment tag is dropped, unless closed with `+%}`.
#include <charconv>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "template/jinja_ast.h"

namespace kestrel::jinja {
namespace {

std::string line_error(int line, const std::string& message) {
  return "line " + std::to_string(line) + ": " + message;
}

// Jinja splits the source on \r\n, \r and \n, joins with \n, and drops one trailing newline.
std::string normalize_newlines(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '\r') {
      out.push_back('\n');
      if (i + 1 < in.size() && in[i + 1] == '\n') ++i;
    } else {
      out.push_back(in[i]);
    }
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

// Length in bytes of the code point at `pos` if it is Python whitespace, else 0.
size_t py_space_at(const std::string& s, size_t pos) {
  const unsigned char c = static_cast<unsigned char>(s[pos]);
  if (c < 0x80) return is_py_space(c) ? 1 : 0;
  const size_t len = (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 1;
  if (pos + len > s.size()) return 0;
  const std::u32string cp = decode_utf8(std::string_view(s).substr(pos, len));
  return (cp.size() == 1 && is_py_space(cp[0])) ? len : 0;
}

// Python's str.rstrip() on a byte range of UTF-8 text: returns the new end.
size_t rstrip_end(const std::string& s, size_t begin, size_t end) {
  while (end > begin) {
    size_t start = end - 1;
    while (start > begin && (static_cast<unsigned char>(s[start]) & 0xc0) == 0x80) --start;
    if (py_space_at(s, start) != end - start) break;
    end = start;
  }
  return end;
}

bool is_name_start(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c >= 0x80;
}
bool is_name_char(unsigned char c) {
  return is_name_start(c) || (c >= '0' && c <= '9');
}
bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Jinja decodes a string literal with
// `value.encode("ascii", "backslashreplace").decode("unicode-escape")`: non-ASCII characters
// first become \x/\u/\U escapes, then Python escape sequences are decoded. Doing the same two
// steps keeps its quirks (a backslash before a non-ASCII character, unknown escapes kept).
Result<std::string> unescape_string(std::string_view body, int line) {
  std::string ascii;
  ascii.reserve(body.size());
  for (char32_t c : decode_utf8(body)) {
    if (c < 0x80) {
      ascii.push_back(static_cast<char>(c));
      continue;
    }
    static const char* kHex = "0123456789abcdef";
    const int digits = c <= 0xff ? 2 : c <= 0xffff ? 4 : 8;
    ascii += c <= 0xff ? "\\x" : c <= 0xffff ? "\\u" : "\\U";
    for (int i = digits - 1; i >= 0; --i) ascii.push_back(kHex[(c >> (4 * i)) & 0xf]);
  }
  std::string out;
  out.reserve(ascii.size());
  for (size_t i = 0; i < ascii.size(); ++i) {
    const char c = ascii[i];
    if (c != '\\') {
      out.push_back(c);
      continue;
    }
    if (i + 1 >= ascii.size()) {
      return Status::error(line_error(line, "string literal ends with a lone backslash"));
    }
    const char e = ascii[++i];
    switch (e) {
      case '\n':
        break;
      case '\\':
      case '\'':
      case '"':
        out.push_back(e);
        break;
      case 'a':
        out.push_back('\a');
        break;
      case 'b':
        out.push_back('\b');
        break;
      case 'f':
        out.push_back('\f');
        break;
      case 'n':
        out.push_back('\n');
        break;
      case 'r':
        out.push_back('\r');
        break;
      case 't':
        out.push_back('\t');
        break;
      case 'v':
        out.push_back('\v');
        break;
      case 'x':
      case 'u':
      case 'U': {
        const int digits = e == 'x' ? 2 : e == 'u' ? 4 : 8;
        char32_t cp = 0;
        for (int k = 0; k < digits; ++k) {
          const int h = i + 1 + k < ascii.size() ? hex_value(ascii[i + 1 + k]) : -1;
          if (h < 0) {
            return Status::error(
                line_error(line, std::string("truncated \\") + e + " escape in string literal"));
          }
          cp = cp * 16 + static_cast<char32_t>(h);
        }
        if (cp > 0x10ffff) {
          return Status::error(line_error(line, "escape beyond U+10FFFF in string literal"));
        }
        if (cp >= 0xd800 && cp <= 0xdfff) {
          return Status::error(line_error(line, "surrogate escape in string literal"));
        }
        i += digits;
        append_utf8(out, cp);
        break;
      }
      case 'N':
        return Status::error(line_error(line, "\\N{...} escapes are not supported"));
      default:
        if (e >= '0' && e <= '7') {
          char32_t cp = static_cast<char32_t>(e - '0');
          for (int k = 0;
               k < 2 && i + 1 < ascii.size() && ascii[i + 1] >= '0' && ascii[i + 1] <= '7'; ++k) {
            cp = cp * 8 + static_cast<char32_t>(ascii[++i] - '0');
          }
          append_utf8(out, cp);
        } else {
          out.push_back('\\');
          out.push_back(e);
        }
    }
  }
  return out;
}

class Lexer {
 public:
  explicit Lexer(std::string source) : src_(std::move(source)) {}

  Result<std::vector<Token>> run() {
    const size_t n = src_.size();
    while (pos_ < n) {
      const size_t tag = find_tag(pos_);
      if (tag == std::string::npos) {
        emit_text(pos_, n);
        advance_to(n);
        break;
      }
      const char kind = src_[tag + 1];
      size_t after = tag + 2;
      char sign = 0;
      if (after < n && (src_[after] == '-' || src_[after] == '+')) sign = src_[after++];

      size_t raw_body = 0;
      const bool is_raw = kind == '%' && match_raw_begin(after, &raw_body);

      size_t text_end = tag;
      if (sign == '-') {
        text_end = rstrip_end(src_, pos_, tag);
      } else if (sign != '+' && kind != '{') {
        // Back to the line's start, but no further than the text not yet emitted: searching the
        // whole line would make a line of many tags quadratic.
        size_t line_start = tag;
        while (line_start > pos_ && src_[line_start - 1] != '\n') --line_start;
        const bool at_line_start = line_start > pos_ || line_starting_;
        bool only_blanks = true;
        for (size_t i = line_start; i < tag; ++i) {
          if (src_[i] != ' ' && src_[i] != '\t') only_blanks = false;
        }
        if (at_line_start && only_blanks) text_end = line_start;
      }
      emit_text(pos_, text_end);
      advance_to(after);
      line_starting_ = false;

      if (is_raw) {
        KS_RETURN_IF_ERROR(lex_raw(raw_body));
      } else if (kind == '#') {
        KS_RETURN_IF_ERROR(lex_comment());
      } else {
        KS_RETURN_IF_ERROR(lex_tag(kind == '%'));
      }
    }
    Token eof;
    eof.type = TokenType::eof;
    eof.line = line_;
    tokens_.push_back(std::move(eof));
    return std::move(tokens_);
  }

 private:
  size_t find_tag(size_t from) const {
    for (size_t i = src_.find('{', from); i != std::string::npos; i = src_.find('{', i + 1)) {
      if (i + 1 < src_.size() && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#')) {
        return i;
      }
    }
    return std::string::npos;
  }

  void advance_to(size_t to) {
    for (size_t i = pos_; i < to; ++i) {
      if (src_[i] == '\n') ++line_;
    }
    pos_ = to;
  }

  size_t skip_spaces(size_t p) const {
    while (p < src_.size()) {
      const size_t len = py_space_at(src_, p);
      if (len == 0) break;
      p += len;
    }
    return p;
  }

  void emit_text(size_t begin, size_t end) {
    if (end <= begin) return;
    Token t;
    t.type = TokenType::text;
    t.text = src_.substr(begin, end - begin);
    t.line = line_;
    tokens_.push_back(std::move(t));
  }

  void emit(TokenType type, std::string text = {}) {
    Token t;
    t.type = type;
    t.text = std::move(text);
    t.line = line_;
    tokens_.push_back(std::move(t));
  }

  // `{%` already consumed up to `after`; matches `\s*raw\s*(-%}\s*|%})` and returns where the
  // raw body starts (no trim_blocks newline removal here, as in Jinja).
  bool match_raw_begin(size_t after, size_t* body) const {
    size_t p = skip_spaces(after);
    if (src_.compare(p, 3, "raw") != 0) return false;
    p += 3;
    if (p < src_.size() && is_name_char(static_cast<unsigned char>(src_[p]))) return false;
    p = skip_spaces(p);
    if (src_.compare(p, 3, "-%}") == 0) {
      *body = skip_spaces(p + 3);
      return true;
    }
    if (src_.compare(p, 2, "%}") == 0) {
      *body = p + 2;
      return true;
    }
    return false;
  }

  Status lex_raw(size_t body) {
    const int start_line = line_;
    advance_to(body);
    for (size_t i = src_.find("{%", body); i != std::string::npos; i = src_.find("{%", i + 1)) {
      size_t p = i + 2;
      char sign = 0;
      if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) sign = src_[p++];
      p = skip_spaces(p);
      if (src_.compare(p, 6, "endraw") != 0) continue;
      p = skip_spaces(p + 6);
      size_t end;
      bool newline_after = false;
      if (src_.compare(p, 3, "+%}") == 0) {
        end = p + 3;
      } else if (src_.compare(p, 3, "-%}") == 0) {
        end = skip_spaces(p + 3);
        newline_after = end > p + 3 && src_[end - 1] == '\n';
      } else if (src_.compare(p, 2, "%}") == 0) {
        end = p + 2;
        if (end < src_.size() && src_[end] == '\n') {
          ++end;
          newline_after = true;
        }
      } else {
        continue;
      }
      size_t text_end = i;
      if (sign == '-') {
        text_end = rstrip_end(src_, body, i);
      } else if (sign != '+') {
        size_t line_start = src_.rfind('\n', i == 0 ? 0 : i - 1);
        line_start = (line_start == std::string::npos || line_start < body) ? body : line_start + 1;
        bool only_blanks = true;
        for (size_t k = line_start; k < i; ++k) {
          if (src_[k] != ' ' && src_[k] != '\t') only_blanks = false;
        }
        const bool after_newline = body > 0 && src_[body - 1] == '\n';
        if ((line_start > body || after_newline) && only_blanks) text_end = line_start;
      }
      emit_text(body, text_end);
      advance_to(end);
      line_starting_ = newline_after;
      return Status::ok();
    }
    return Status::error(line_error(start_line, "missing {% endraw %} for this {% raw %}"));
  }

  Status lex_comment() {
    const int start_line = line_;
    const size_t close = src_.find("#}", pos_);
    // Jinja's lexer stops quietly when a comment opens at the very end of the template.
    if (pos_ >= src_.size()) return Status::ok();
    if (close == std::string::npos) {
      return Status::error(line_error(start_line, "missing end of comment tag '#}'"));
    }
    size_t end = close + 2;
    const char before = close > pos_ ? src_[close - 1] : 0;
    if (before == '-') {
      end = skip_spaces(end);
    } else if (before != '+' && end < src_.size() && src_[end] == '\n') {
      ++end;
    }
    line_starting_ = end > 0 && src_[end - 1] == '\n';
    advance_to(end);
    return Status::ok();
  }

  Status lex_tag(bool block) {
    const int start_line = line_;
    emit(block ? TokenType::block_begin : TokenType::variable_begin);
    std::vector<char> balance;
    const size_t n = src_.size();
    while (true) {
      if (pos_ >= n) {
        return Status::error(line_error(start_line, block ? "missing '%}' to close this tag"
                                                          : "missing '}}' to close this tag"));
      }
      if (balance.empty()) {
        size_t end = 0;
        bool matched = false;
        if (block) {
          if (src_.compare(pos_, 3, "+%}") == 0) {
            end = pos_ + 3, matched = true;
          } else if (src_.compare(pos_, 3, "-%}") == 0) {
            end = skip_spaces(pos_ + 3), matched = true;
          } else if (src_.compare(pos_, 2, "%}") == 0) {
            end = pos_ + 2, matched = true;
            if (end < n && src_[end] == '\n') ++end;
          }
        } else {
          if (src_.compare(pos_, 3, "-}}") == 0) {
            end = skip_spaces(pos_ + 3), matched = true;
          } else if (src_.compare(pos_, 2, "}}") == 0) {
            end = pos_ + 2, matched = true;
          }
        }
        if (matched) {
          emit(block ? TokenType::block_end : TokenType::variable_end);
          line_starting_ = src_[end - 1] == '\n';
          advance_to(end);
          return Status::ok();
        }
      }
      const size_t space = py_space_at(src_, pos_);
      if (space) {
        advance_to(skip_spaces(pos_));
        continue;
      }
      KS_RETURN_IF_ERROR(lex_expression_token(balance));
    }
  }

  Status lex_expression_token(std::vector<char>& balance) {
    const size_t n = src_.size();
    const char c = src_[pos_];
    const bool after_dot =
        !tokens_.empty() && tokens_.back().type == TokenType::op && tokens_.back().text == ".";
    if (is_digit(c)) return lex_number(after_dot);
    if (is_name_start(static_cast<unsigned char>(c))) {
      size_t e = pos_;
      while (e < n && is_name_char(static_cast<unsigned char>(src_[e]))) ++e;
      emit(TokenType::name, src_.substr(pos_, e - pos_));
      advance_to(e);
      return Status::ok();
    }
    if (c == '\'' || c == '"') {
      size_t e = pos_ + 1;
      while (e < n && src_[e] != c) e += (src_[e] == '\\') ? 2 : 1;
      if (e >= n) return Status::error(line_error(line_, "unterminated string literal"));
      KS_ASSIGN_OR_RETURN(
          std::string value,
          unescape_string(std::string_view(src_).substr(pos_ + 1, e - pos_ - 1), line_));
      emit(TokenType::string, std::move(value));
      advance_to(e + 1);
      return Status::ok();
    }
    static const char* kTwoCharOps[] = {"//", "**", "==", "!=", ">=", "<="};
    for (const char* op : kTwoCharOps) {
      if (src_.compare(pos_, 2, op) == 0) {
        emit(TokenType::op, op);
        advance_to(pos_ + 2);
        return Status::ok();
      }
    }
    static const std::string kOneCharOps = "+-/*%~[](){}><=.:|,;";
    if (kOneCharOps.find(c) == std::string::npos) {
      std::string shown;
      append_utf8(shown, decode_utf8(std::string_view(src_).substr(pos_, 4))[0]);
      return Status::error(line_error(line_, "unexpected character '" + shown + "'"));
    }
    if (c == '(' || c == '[' || c == '{') {
      balance.push_back(c == '(' ? ')' : c == '[' ? ']' : '}');
    } else if (c == ')' || c == ']' || c == '}') {
      if (balance.empty()) {
        return Status::error(line_error(line_, std::string("unexpected '") + c + "'"));
      }
      if (balance.back() != c) {
        return Status::error(line_error(
            line_, std::string("unexpected '") + c + "', expected '" + balance.back() + "'"));
      }
      balance.pop_back();
    }
    emit(TokenType::op, std::string(1, c));
    advance_to(pos_ + 1);
    return Status::ok();
  }

  // Digits with optional `_` separators: returns the end, or `p` if none.
  size_t scan_digits(size_t p) const {
    const size_t n = src_.size();
    if (p >= n || !is_digit(src_[p])) return p;
    size_t e = p;
    while (e < n && is_digit(src_[e])) {
      ++e;
      if (e + 1 < n && src_[e] == '_' && is_digit(src_[e + 1])) ++e;
    }
    return e;
  }

  Status lex_number(bool after_dot) {
    const size_t n = src_.size();
    const size_t start = pos_;
    // 0x / 0o / 0b integers.
    if (src_[start] == '0' && start + 1 < n) {
      const char base_char = static_cast<char>(src_[start + 1] | 0x20);
      const int base = base_char == 'x' ? 16 : base_char == 'o' ? 8 : base_char == 'b' ? 2 : 0;
      if (base) {
        size_t e = start + 2;
        uint64_t value = 0;
        bool any = false;
        while (e < n) {
          if (src_[e] == '_' && any) {
            ++e;
            continue;
          }
          const int d = hex_value(src_[e]);
          if (d < 0 || d >= base) break;
          if (value > (static_cast<uint64_t>(INT64_MAX) - d) / base) {
            return Status::error(line_error(line_, "integer literal is too large"));
          }
          value = value * base + d;
          any = true;
          ++e;
        }
        if (!any) return Status::error(line_error(line_, "malformed integer literal"));
        Token t;
        t.type = TokenType::integer;
        t.int_value = static_cast<int64_t>(value);
        t.line = line_;
        tokens_.push_back(std::move(t));
        advance_to(e);
        return Status::ok();
      }
    }
    size_t e = scan_digits(start);
    bool is_float = false;
    if (!after_dot) {
      size_t f = e;
      if (f + 1 < n && src_[f] == '.' && is_digit(src_[f + 1])) {
        f = scan_digits(f + 1);
        is_float = true;
      }
      if (f < n && (src_[f] == 'e' || src_[f] == 'E')) {
        size_t g = f + 1;
        if (g < n && (src_[g] == '+' || src_[g] == '-')) ++g;
        const size_t h = scan_digits(g);
        if (h > g) {
          f = h;
          is_float = true;
        }
      }
      if (is_float) e = f;
    }
    std::string digits;
    for (size_t i = start; i < e; ++i) {
      if (src_[i] != '_') digits.push_back(src_[i]);
    }
    Token t;
    t.line = line_;
    if (is_float) {
      t.type = TokenType::floating;
      auto res = std::from_chars(digits.data(), digits.data() + digits.size(), t.float_value);
      if (res.ec == std::errc::result_out_of_range) {
        // Python's float() turns an overflowing literal into inf and an underflowing one into 0.
        const size_t exp_pos = digits.find_first_of("eE");
        const bool negative_exp = exp_pos != std::string::npos && exp_pos + 1 < digits.size() &&
                                  digits[exp_pos + 1] == '-';
        t.float_value = negative_exp ? 0.0 : HUGE_VAL;
      } else if (res.ec != std::errc()) {
        return Status::error(line_error(line_, "malformed float literal"));
      }
    } else {
      if (digits.size() > 1 && digits[0] == '0') {
        for (char d : digits) {
          if (d != '0') return Status::error(line_error(line_, "leading zeros in integer literal"));
        }
      }
      t.type = TokenType::integer;
      auto res = std::from_chars(digits.data(), digits.data() + digits.size(), t.int_value);
      if (res.ec != std::errc()) {
        return Status::error(line_error(line_, "integer literal is too large"));
      }
    }
    tokens_.push_back(std::move(t));
    advance_to(e);
    return Status::ok();
  }

  std::string src_;
  size_t pos_ = 0;
  int line_ = 1;
  bool line_starting_ = true;
  std::vector<Token> tokens_;
};

}  // namespace

Result<std::vector<Token>> lex_template(std::string_view source) {
  Lexer lexer(normalize_newlines(source));
  return lexer.run();
}

}  // namespace kestrel::jinja
