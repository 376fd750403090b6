// The template engine's linear substring search (src/template/jinja_search.h) against the
// standard library's, on random strings of a small alphabet (many partial matches) with needles
// on both sides of the short-needle cut-off.
#include <gtest/gtest.h>

#include <random>
#include <string>

#include "template/jinja_search.h"

namespace kestrel::jinja {
namespace {

template <class C>
std::basic_string<C> random_text(std::mt19937& rng, size_t n) {
  std::basic_string<C> s(n, C('a'));
  for (C& c : s) c = C('a' + rng() % 2);
  return s;
}

template <class C>
void check_against_std(uint32_t seed) {
  std::mt19937 rng(seed);
  for (int round = 0; round < 300; ++round) {
    const size_t m = 1 + rng() % 45;
    const auto hay = random_text<C>(rng, rng() % 400);
    // Needles mostly cut from the haystack, so that they occur.
    auto needle = random_text<C>(rng, m);
    if (hay.size() >= m && rng() % 4 != 0) needle = hay.substr(rng() % (hay.size() - m + 1), m);
    const std::basic_string_view<C> h(hay), n(needle);
    const Searcher<C> search(n);
    for (size_t from : {size_t(0), size_t(rng() % (hay.size() + 2))}) {
      ASSERT_EQ(search.find(h, from), h.find(n, from)) << "round " << round << " from " << from;
    }
    ASSERT_EQ(search.rfind(h), h.rfind(n)) << "round " << round;
    const size_t end = rng() % (hay.size() + 2);
    const size_t want = end >= m ? h.rfind(n, end - m) : std::basic_string_view<C>::npos;
    ASSERT_EQ(search.rfind(h, end), want) << "round " << round << " end " << end;
  }
}

TEST(JinjaSearch, FindsWhatTheStandardSearchFinds) {
  check_against_std<char>(1);
  check_against_std<char32_t>(2);
}

TEST(JinjaSearch, TheWorstCaseIsLinear) {
  // 'a' * 2000000 against 'a' * 100000 ~ 'b': 2e11 comparisons for a search at every position;
  // this one reads the haystack about twice (run time bounded, not asserted).
  const std::string hay(2000000, 'a');
  const std::string needle = std::string(100000, 'a') + "b";
  EXPECT_EQ(Searcher<char>(needle).find(hay), std::string::npos);
  EXPECT_EQ(Searcher<char>(needle).rfind(hay), std::string::npos);
}

}  // namespace
}  // namespace kestrel::jinja
