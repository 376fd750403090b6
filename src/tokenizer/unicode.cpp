#include "tokenizer/unicode.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "tokenizer/unicode_tables.h"

namespace kestrel::unicode {
namespace {

namespace tables = kestrel::unicode_tables;

bool in_ranges(std::span<const tables::CodeRange> ranges, uint32_t cp) {
  auto it = std::upper_bound(ranges.begin(), ranges.end(), cp,
                             [](uint32_t c, const tables::CodeRange& r) { return c < r.lo; });
  return it != ranges.begin() && cp <= std::prev(it)->hi;
}

// Hangul syllable arithmetic (Unicode 3.12).
constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28;
constexpr uint32_t kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

uint8_t combining_class(uint32_t cp) {
  if (cp < 0x300) return 0;
  auto ccc = tables::combining_classes();
  auto it = std::upper_bound(ccc.begin(), ccc.end(), cp,
                             [](uint32_t c, const tables::CccRange& r) { return c < r.lo; });
  if (it == ccc.begin() || cp > std::prev(it)->hi) return 0;
  return std::prev(it)->ccc;
}

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const uint32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out.push_back(kTBase + s % kTCount);
    return;
  }
  auto decomp = tables::decompositions();
  auto it =
      std::lower_bound(decomp.begin(), decomp.end(), cp,
                       [](const tables::Decomposition& d, uint32_t c) { return d.code_point < c; });
  if (it == decomp.end() || it->code_point != cp) {
    out.push_back(cp);
    return;
  }
  auto data = tables::decomposition_data().subspan(it->offset, it->length);
  out.insert(out.end(), data.begin(), data.end());
}

// The primary composite of (first, second), or 0.
uint32_t compose(uint32_t first, uint32_t second) {
  if (first >= kLBase && first < kLBase + kLCount && second >= kVBase &&
      second < kVBase + kVCount) {
    return kSBase + ((first - kLBase) * kVCount + (second - kVBase)) * kTCount;
  }
  if (first >= kSBase && first < kSBase + kSCount && (first - kSBase) % kTCount == 0 &&
      second > kTBase && second < kTBase + kTCount) {
    return first + (second - kTBase);
  }
  auto comp = tables::compositions();
  auto it = std::lower_bound(comp.begin(), comp.end(), std::pair{first, second},
                             [](const tables::Composition& c, std::pair<uint32_t, uint32_t> key) {
                               return std::pair{c.first, c.second} < key;
                             });
  if (it != comp.end() && it->first == first && it->second == second) return it->composite;
  return 0;
}

// One bit per BMP code point: may change under NFC. Supplementary planes use binary search.
const std::array<uint64_t, 1024>& bmp_unsafe_bits() {
  static const std::array<uint64_t, 1024> bits = [] {
    std::array<uint64_t, 1024> b{};
    for (const auto& r : tables::nfc_unsafe()) {
      for (uint32_t c = r.lo; c <= r.hi && c < 0x10000; ++c) b[c >> 6] |= uint64_t{1} << (c & 63);
    }
    return b;
  }();
  return bits;
}

bool nfc_unsafe(uint32_t cp) {
  if (cp < 0x300) return false;
  if (cp < 0x10000) return (bmp_unsafe_bits()[cp >> 6] >> (cp & 63)) & 1;
  return in_ranges(tables::nfc_unsafe(), cp);
}

}  // namespace

Utf8Step utf8_step(std::string_view bytes) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  const unsigned char b0 = s[0];
  if (b0 < 0x80) return {Utf8Step::kValid, 1};
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    return {Utf8Step::kInvalid, 1};
  }
  for (size_t i = 1; i < need; ++i) {
    if (i >= n) return {Utf8Step::kIncomplete, n};
    const unsigned char b = s[i];
    const bool ok = i == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) return {Utf8Step::kInvalid, i};
  }
  return {Utf8Step::kValid, need};
}

std::optional<size_t> find_invalid_utf8(std::string_view text) {
  size_t i = 0;
  const size_t n = text.size();
  while (i < n) {
    if (i + 8 <= n) {
      uint64_t word;
      std::memcpy(&word, text.data() + i, 8);
      if ((word & 0x8080808080808080ull) == 0) {
        i += 8;
        continue;
      }
    }
    if (static_cast<unsigned char>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    const Utf8Step step = utf8_step(text.substr(i));
    if (step.kind != Utf8Step::kValid) return i;
    i += step.length;
  }
  return std::nullopt;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

void append_utf8_lossy(std::string& out, std::string_view bytes) {
  size_t i = 0;
  while (i < bytes.size()) {
    const Utf8Step step = utf8_step(bytes.substr(i));
    if (step.kind == Utf8Step::kValid) {
      out.append(bytes.data() + i, step.length);
    } else {
      out.append("\xEF\xBF\xBD");  // U+FFFD
    }
    i += step.length;
  }
}

bool is_nfc_quick(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    if (static_cast<unsigned char>(text[i]) < 0xCC) {  // lead bytes below 0xCC encode < U+0300
      ++i;
      continue;
    }
    if (nfc_unsafe(next_code_point(text, i))) return false;
  }
  return true;
}

namespace {

// Full NFC of `text`: decompose, order marks canonically, compose.
void append_nfc_full(std::string& out, std::string_view text) {
  std::vector<uint32_t> cps;
  cps.reserve(text.size());
  for (size_t i = 0; i < text.size();) decompose(next_code_point(text, i), cps);

  std::vector<uint8_t> ccc(cps.size());
  for (size_t i = 0; i < cps.size(); ++i) ccc[i] = combining_class(cps[i]);
  // Canonical ordering: stable sort of every run of non-starters by combining class.
  for (size_t i = 0; i < cps.size();) {
    if (ccc[i] == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < cps.size() && ccc[j] != 0) ++j;
    if (j - i <= 8) {
      for (size_t a = i + 1; a < j; ++a) {  // insertion sort: real runs are this short
        for (size_t b = a; b > i && ccc[b - 1] > ccc[b]; --b) {
          std::swap(ccc[b - 1], ccc[b]);
          std::swap(cps[b - 1], cps[b]);
        }
      }
    } else {
      // A long run is text built to be slow (insertion sort was quadratic: a review's 320 KB of
      // marks in reverse class order took 30 s): a stable sort, as HF's normalizer does.
      std::vector<std::pair<uint8_t, uint32_t>> run(j - i);
      for (size_t k = i; k < j; ++k) run[k - i] = {ccc[k], cps[k]};
      std::stable_sort(run.begin(), run.end(),
                       [](const auto& a, const auto& b) { return a.first < b.first; });
      for (size_t k = i; k < j; ++k) std::tie(ccc[k], cps[k]) = run[k - i];
    }
    i = j;
  }

  // Canonical composition: a character joins the last starter unless a character between them
  // is a starter or has a combining class at least its own.
  std::vector<uint32_t> composed;
  composed.reserve(cps.size());
  ptrdiff_t starter = -1;
  uint8_t last_ccc = 0;
  for (size_t i = 0; i < cps.size(); ++i) {
    const uint32_t c = cps[i];
    const uint8_t cc = ccc[i];
    if (starter >= 0) {
      const bool adjacent = starter == static_cast<ptrdiff_t>(composed.size()) - 1;
      if (adjacent || last_ccc < cc) {
        if (uint32_t p = compose(composed[starter], c)) {
          composed[starter] = p;
          continue;
        }
      }
    }
    if (cc == 0) starter = static_cast<ptrdiff_t>(composed.size());
    last_ccc = cc;
    composed.push_back(c);
  }
  for (uint32_t c : composed) append_utf8(out, c);
}

}  // namespace

// Only the stretches around characters that may change are normalized. A safe character (ccc 0,
// NFC_Quick_Check Yes) is a stable boundary: nothing before it reorders or composes across it,
// though it may compose with what follows, so each stretch starts at the safe character before
// the first unsafe one and ends at the next safe character.
void append_nfc(std::string& out, std::string_view text) {
  size_t copied = 0;     // text[0, copied) is in `out`
  size_t last_safe = 0;  // start of the last safe character not yet normalized
  size_t i = 0;
  while (i < text.size()) {
    const auto b = static_cast<unsigned char>(text[i]);
    if (b < 0xCC) {  // below U+0300 (or a continuation byte): safe
      if (b < 0x80 || b >= 0xC0) last_safe = i;
      ++i;
      continue;
    }
    size_t next = i;
    if (!nfc_unsafe(next_code_point(text, next))) {
      last_safe = i;
      i = next;
      continue;
    }
    const size_t start = std::max(last_safe, copied);
    size_t end = next;
    while (end < text.size()) {
      size_t after = end;
      if (!nfc_unsafe(next_code_point(text, after))) break;
      end = after;
    }
    out.append(text.substr(copied, start - copied));
    append_nfc_full(out, text.substr(start, end - start));
    copied = end;
    last_safe = end;
    i = end;
  }
  out.append(text.substr(copied));
}

bool is_white_space(uint32_t cp) {
  return in_ranges(tables::white_space(), cp);
}

}  // namespace kestrel::unicode
