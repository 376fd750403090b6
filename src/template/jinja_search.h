#pragma once
// Substring search in time linear in the haystack, for the template engine: the standard
// library's find compares the needle at every position (haystack x needle at worst), which a
// hostile template reaches with 'a' * 8000000 ~ 'b' in 'a' * 16000000 (hours). Needles of up
// to kShortNeedle characters keep the standard search (at most that factor); longer ones take
// Knuth-Morris-Pratt, whose failure table (a needle's length of 32-bit entries) is built once
// per Searcher and only for the direction asked.

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <vector>

namespace kestrel::jinja {

template <class C>
class Searcher {
 public:
  static constexpr size_t npos = std::basic_string_view<C>::npos;
  static constexpr size_t kShortNeedle = 32;

  explicit Searcher(std::basic_string_view<C> needle) : needle_(needle) {}

  // The first match starting at or after `from`.
  size_t find(std::basic_string_view<C> hay, size_t from = 0) const {
    const size_t m = needle_.size();
    if (m <= kShortNeedle) return hay.find(needle_, from);
    if (from > hay.size() || m > hay.size() - from) return npos;  // before building the table
    if (fwd_.empty()) fwd_ = borders(false);
    size_t k = 0;  // the needle's characters matched so far
    for (size_t i = from; i < hay.size(); ++i) {
      while (k > 0 && hay[i] != needle_[k]) k = fwd_[k - 1];
      if (hay[i] == needle_[k]) ++k;
      if (k == m) return i + 1 - m;
    }
    return npos;
  }

  // The last match that ends at or before `end` (the haystack's end by default), i.e. starts
  // at or before end - size: std::basic_string_view::rfind(needle, end - size).
  size_t rfind(std::basic_string_view<C> hay, size_t end = npos) const {
    const size_t m = needle_.size();
    end = std::min(end, hay.size());
    if (m > end) return npos;
    if (m <= kShortNeedle) return hay.rfind(needle_, end - m);
    if (bwd_.empty()) bwd_ = borders(true);
    size_t k = 0;  // the needle's characters matched so far, from its end
    for (size_t i = end; i-- > 0;) {
      while (k > 0 && hay[i] != needle_[m - 1 - k]) k = bwd_[k - 1];
      if (hay[i] == needle_[m - 1 - k]) ++k;
      if (k == m) return i;
    }
    return npos;
  }

 private:
  // KMP's failure function of the needle (reversed: of the needle read from its end): entry j
  // is the length of the longest proper border of its first j + 1 characters.
  std::vector<uint32_t> borders(bool reversed) const {
    const size_t m = needle_.size();
    auto at = [&](size_t j) { return reversed ? needle_[m - 1 - j] : needle_[j]; };
    std::vector<uint32_t> fail(m, 0);
    uint32_t k = 0;
    for (size_t j = 1; j < m; ++j) {
      while (k > 0 && at(j) != at(k)) k = fail[k - 1];
      if (at(j) == at(k)) ++k;
      fail[j] = k;
    }
    return fail;
  }

  std::basic_string_view<C> needle_;
  mutable std::vector<uint32_t> fwd_, bwd_;
};

}  // namespace kestrel::jinja
