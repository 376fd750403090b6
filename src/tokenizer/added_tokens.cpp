#include "tokenizer/added_tokens.h"

#include <algorithm>

#include "tokenizer/regex.h"
#include "tokenizer/unicode.h"

namespace kestrel {
namespace {

// Rust regex's \w, which HF uses for single_word boundaries: Alphabetic, Mark, Decimal_Number,
// Connector_Punctuation and Join_Control. PCRE2 before 10.40 lacks \p{Alphabetic}; there the
// letters plus letter numbers stand in for it.
bool is_word_char(uint32_t cp) {
  static const Regex word = [] {
    auto r = Regex::compile("[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}]");
    if (r.is_ok()) return std::move(r).value();
    return std::move(Regex::compile("[\\p{L}\\p{Nl}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}]"))
        .value();
  }();
  std::string s;
  unicode::append_utf8(s, cp);
  std::vector<ByteSpan> spans;
  return word.find_all(s, spans).is_ok() && !spans.empty();
}

uint32_t last_code_point(std::string_view text) {
  size_t i = text.size() - 1;
  while (i > 0 && (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80) --i;
  return unicode::next_code_point(text, i);
}

// Start of the run of whitespace that ends `text` (text.size() when there is none).
size_t trailing_space_start(std::string_view text) {
  size_t end = text.size();
  while (end > 0) {
    size_t i = end - 1;
    while (i > 0 && (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80) --i;
    size_t j = i;
    if (!unicode::is_white_space(unicode::next_code_point(text, j))) break;
    end = i;
  }
  return end;
}

// Length of the run of whitespace that starts `text`.
size_t leading_space_length(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    size_t j = i;
    if (!unicode::is_white_space(unicode::next_code_point(text, j))) break;
    i = j;
  }
  return i;
}

}  // namespace

void AddedTokenMatcher::add(std::string_view pattern, const AddedToken& token) {
  if (pattern.empty()) return;
  int32_t node = 0;
  for (char ch : pattern) {
    const auto byte = static_cast<uint8_t>(ch);
    auto& children = nodes_[node].children;
    auto it = std::find_if(children.begin(), children.end(),
                           [byte](const auto& c) { return c.first == byte; });
    if (it != children.end()) {
      node = it->second;
    } else {
      const auto child = static_cast<int32_t>(nodes_.size());
      nodes_[node].children.emplace_back(byte, child);
      nodes_.emplace_back();
      node = child;
    }
  }
  nodes_[node].token = static_cast<int32_t>(tokens_.size());
  tokens_.push_back(token);
  first_byte_[static_cast<uint8_t>(pattern[0])] = true;
}

bool AddedTokenMatcher::find_leftmost_longest(std::string_view text, size_t from,
                                              Match& match) const {
  for (size_t start = from; start < text.size(); ++start) {
    if (!first_byte_[static_cast<uint8_t>(text[start])]) continue;
    int32_t node = 0;
    int32_t best = -1;
    size_t best_end = 0;
    for (size_t i = start; i < text.size(); ++i) {
      const auto byte = static_cast<uint8_t>(text[i]);
      const auto& children = nodes_[node].children;
      auto it = std::find_if(children.begin(), children.end(),
                             [byte](const auto& c) { return c.first == byte; });
      if (it == children.end()) break;
      node = it->second;
      if (nodes_[node].token >= 0) {
        best = nodes_[node].token;
        best_end = i + 1;
      }
    }
    if (best >= 0) {
      match = {start, best_end, best};
      return true;
    }
  }
  return false;
}

void AddedTokenMatcher::split(std::string_view text, std::vector<AddedSplit>& out) const {
  if (text.empty()) return;
  size_t start_offset = 0;
  Match m{};
  for (size_t from = 0; find_leftmost_longest(text, from, m); from = m.end) {
    const AddedToken& token = tokens_[m.token];
    size_t start = m.begin, stop = m.end;
    if (token.single_word) {
      const bool start_space = start == 0 || !is_word_char(last_code_point(text.substr(0, start)));
      size_t next = stop;
      const bool stop_space =
          stop == text.size() || !is_word_char(unicode::next_code_point(text, next));
      if (!start_space || !stop_space) continue;
    }
    if (token.lstrip) start = std::max(trailing_space_start(text.substr(0, start)), start_offset);
    if (token.rstrip) stop += leading_space_length(text.substr(stop));
    if (start_offset < start) {
      out.push_back({static_cast<uint32_t>(start_offset), static_cast<uint32_t>(start), -1});
    }
    out.push_back({static_cast<uint32_t>(start), static_cast<uint32_t>(stop), token.id});
    start_offset = stop;
  }
  if (start_offset != text.size()) {
    out.push_back({static_cast<uint32_t>(start_offset), static_cast<uint32_t>(text.size()), -1});
  }
}

}  // namespace kestrel
