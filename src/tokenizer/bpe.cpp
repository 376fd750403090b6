#include "tokenizer/bpe.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <queue>

#include <nlohmann/json.hpp>

#include "core/quote.h"
#include "tokenizer/unicode.h"

namespace kestrel {
namespace {

struct ByteTables {
  std::array<uint32_t, 256> to_unicode{};
  std::array<int16_t, 324> from_unicode{};  // code points 0..323 cover the whole alphabet
};

const ByteTables& byte_tables() {
  static const ByteTables tables = [] {
    ByteTables t;
    t.from_unicode.fill(-1);
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      t.to_unicode[b] = printable ? uint32_t(b) : next++;
      t.from_unicode[t.to_unicode[b]] = static_cast<int16_t>(b);
    }
    return t;
  }();
  return tables;
}

uint64_t hash_bytes(std::string_view s) {
  // FNV-1a over 8-byte words, finished with a multiply-xorshift: keys are short token strings.
  uint64_t h = 0xCBF29CE484222325ull ^ s.size();
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    h = (h ^ w) * 0x100000001B3ull;
    h ^= h >> 29;
  }
  uint64_t tail = 0;
  std::memcpy(&tail, s.data() + i, s.size() - i);
  h = (h ^ tail) * 0x9E3779B97F4A7C15ull;
  return h ^ (h >> 32);
}

}  // namespace

uint32_t byte_to_unicode(uint8_t byte) {
  return byte_tables().to_unicode[byte];
}

int byte_from_unicode(uint32_t cp) {
  return cp < byte_tables().from_unicode.size() ? byte_tables().from_unicode[cp] : -1;
}

bool byte_level_decode(std::string_view token, std::string& bytes) {
  bytes.clear();
  for (size_t i = 0; i < token.size();) {
    const int b = byte_from_unicode(unicode::next_code_point(token, i));
    if (b < 0) return false;
    bytes.push_back(static_cast<char>(b));
  }
  return true;
}

std::string byte_level_encode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) unicode::append_utf8(out, byte_to_unicode(static_cast<uint8_t>(c)));
  return out;
}

void StringIdMap::reserve(size_t n) {
  size_t cap = 16;
  while (cap < n * 2) cap *= 2;
  if (cap <= slots_.size()) return;
  std::vector<Slot> old = std::move(slots_);
  slots_.assign(cap, Slot{});
  for (const Slot& s : old) {
    if (s.id < 0) continue;
    size_t i = s.hash & (cap - 1);
    while (slots_[i].id >= 0) i = (i + 1) & (cap - 1);
    slots_[i] = s;
  }
}

void StringIdMap::grow() {
  reserve(std::max<size_t>(16, slots_.size()));
}

void StringIdMap::insert(std::string_view key, int32_t id) {
  if ((size_ + 1) * 2 > slots_.size()) grow();
  const uint64_t h = hash_bytes(key);
  size_t i = h & (slots_.size() - 1);
  while (slots_[i].id >= 0) {
    Slot& s = slots_[i];
    if (s.hash == h && std::string_view(keys_).substr(s.offset, s.length) == key) {
      s.id = id;
      return;
    }
    i = (i + 1) & (slots_.size() - 1);
  }
  slots_[i] = Slot{h, static_cast<uint32_t>(keys_.size()), static_cast<uint32_t>(key.size()), id};
  keys_.append(key);
  ++size_;
}

int32_t StringIdMap::find(std::string_view key) const {
  if (slots_.empty()) return -1;
  const uint64_t h = hash_bytes(key);
  size_t i = h & (slots_.size() - 1);
  while (true) {
    const Slot& s = slots_[i];
    if (s.id < 0) return -1;
    if (s.hash == h && s.length == key.size() &&
        std::memcmp(keys_.data() + s.offset, key.data(), key.size()) == 0) {
      return s.id;
    }
    i = (i + 1) & (slots_.size() - 1);
  }
}

void BpeModel::add_merge(int32_t left, int32_t right, uint32_t rank, int32_t merged) {
  const uint64_t key = (uint64_t(uint32_t(left)) << 32) | uint32_t(right);
  size_t i = (key * 0x9E3779B97F4A7C15ull) >> merge_shift_;
  while (merges_[i].merged >= 0 && merges_[i].pair != key) i = (i + 1) & (merges_.size() - 1);
  // HF collects the merges into a hash map, so a repeated pair keeps its last rank.
  merges_[i] = MergeSlot{key, rank, merged};
}

Result<std::unique_ptr<BpeModel>> BpeModel::from_json(const nlohmann::json& model) {
  using json = nlohmann::json;
  if (!model.is_object()) return Status::error("\"model\" is not an object");
  const std::string type = model.value("type", std::string("BPE"));
  if (type != "BPE") {
    return Status::error("model type " + quote_untrusted(type) + " is not supported (only BPE)");
  }
  auto null_or = [&](const char* key, auto pred) {
    return !model.contains(key) || model[key].is_null() || pred(model[key]);
  };
  if (!null_or("dropout", [](const json& v) { return v.is_number() && v.get<double>() == 0.0; })) {
    return Status::error("BPE dropout is not supported (encoding would be random)");
  }
  if (!null_or("byte_fallback", [](const json& v) { return v.is_boolean() && !v.get<bool>(); })) {
    return Status::error("BPE byte_fallback is not supported (not a byte-level BPE)");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (!null_or(key,
                 [](const json& v) { return v.is_string() && v.get<std::string>().empty(); })) {
      return Status::error(std::string("BPE ") + key + " is not supported");
    }
  }
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    return Status::error("BPE model has no \"vocab\" object");
  }
  if (!model.contains("merges") || !model["merges"].is_array()) {
    return Status::error("BPE model has no \"merges\" array");
  }

  auto bpe = std::make_unique<BpeModel>();
  bpe->ignore_merges_ = model.value("ignore_merges", false);
  const json& vocab = model["vocab"];
  int32_t max_id = -1;
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0) {
      return Status::error("vocab entry " + quote_untrusted(token) + " has an invalid id");
    }
    // Ids index dense tables, so one huge id would cost memory for every id below it.
    if (id.get<int64_t>() >= kMaxTokenIds) {
      return Status::error("vocab entry " + quote_untrusted(token) + " has id " +
                           std::to_string(id.get<int64_t>()) + ", past the limit of " +
                           std::to_string(kMaxTokenIds) + " token ids");
    }
    max_id = std::max(max_id, id.get<int32_t>());
  }
  bpe->vocab_size_ = vocab.size();
  bpe->tokens_.assign(static_cast<size_t>(max_id + 1), std::string());
  bpe->has_token_.assign(static_cast<size_t>(max_id + 1), false);
  bpe->token_ids_.reserve(vocab.size());
  bpe->bytes_ids_.reserve(vocab.size());
  std::string bytes;
  for (const auto& [token, id_json] : vocab.items()) {
    const int32_t id = id_json.get<int32_t>();
    if (unicode::find_invalid_utf8(token)) {
      return Status::error("vocab token with id " + std::to_string(id) + " is not valid UTF-8");
    }
    bpe->tokens_[id] = token;
    bpe->has_token_[id] = true;
    bpe->token_ids_.insert(token, id);
    // A token with characters outside the byte-level alphabet can never equal a pre-token.
    if (byte_level_decode(token, bytes)) bpe->bytes_ids_.insert(bytes, id);
  }
  for (int b = 0; b < 256; ++b) {
    bpe->byte_ids_[b] = bpe->token_to_id(byte_level_encode(std::string(1, static_cast<char>(b))));
  }
  if (model.contains("unk_token") && !model["unk_token"].is_null()) {
    for (int b = 0; b < 256; ++b) {
      if (bpe->byte_ids_[b] < 0) {
        return Status::error("BPE unk_token is set and the vocab lacks byte " + std::to_string(b) +
                             "; unknown-token handling is not supported");
      }
    }
  }

  const json& merges = model["merges"];
  size_t cap = 16;
  while (cap < merges.size() * 2) cap *= 2;
  bpe->merges_.assign(cap, MergeSlot{});
  bpe->merge_shift_ = 64 - std::countr_zero(cap);
  uint32_t rank = 0;
  for (size_t i = 0; i < merges.size(); ++i) {
    const json& m = merges[i];
    std::string left, right;
    if (m.is_string()) {
      const std::string& line = m.get_ref<const std::string&>();
      if (line.starts_with("#version")) continue;  // header line of merges.txt files
      const size_t space = line.find(' ');
      if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
        return Status::error("merge " + std::to_string(i) + " (" + quote_untrusted(line) +
                             ") is not two tokens separated by one space");
      }
      left = line.substr(0, space);
      right = line.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      return Status::error("merge " + std::to_string(i) + " is neither \"a b\" nor [\"a\", \"b\"]");
    }
    const int32_t a = bpe->token_to_id(left), b = bpe->token_to_id(right);
    left += right;  // the merged token
    const int32_t merged = bpe->token_to_id(left);
    left.resize(left.size() - right.size());
    if (a < 0 || b < 0 || merged < 0) {
      const std::string& missing = a < 0 ? left : b < 0 ? right : left + right;
      return Status::error("merge " + std::to_string(i) + " uses " + quote_untrusted(missing) +
                           ", which is not in the vocab");
    }
    bpe->add_merge(a, b, rank++, merged);
  }
  return bpe;
}

int32_t BpeModel::token_to_id(std::string_view token) const {
  return token_ids_.find(token);
}

const std::string* BpeModel::id_to_token(int32_t id) const {
  if (id < 0 || id >= id_limit() || !has_token_[id]) return nullptr;
  return &tokens_[id];
}

// Repeatedly merges the adjacent pair of lowest rank, leftmost first (HF's order), keeping one
// rank per adjacent pair in arrays: short words fit in cache and need no heap.
void BpeModel::merge_small(std::vector<int32_t>& symbols) const {
  constexpr uint32_t kNone = std::numeric_limits<uint32_t>::max();
  size_t n = symbols.size();
  uint32_t ranks[64];  // ranks[i]: pair (symbols[i], symbols[i + 1])
  int32_t merged[64];
  for (size_t i = 0; i + 1 < n; ++i) {
    const MergeSlot* m = find_merge(symbols[i], symbols[i + 1]);
    ranks[i] = m ? m->rank : kNone;
    merged[i] = m ? m->merged : -1;
  }
  while (n > 1) {
    size_t best = 0;
    for (size_t i = 1; i + 1 < n; ++i) {
      if (ranks[i] < ranks[best]) best = i;
    }
    if (ranks[best] == kNone) break;
    symbols[best] = merged[best];
    for (size_t i = best + 1; i + 1 < n; ++i) symbols[i] = symbols[i + 1];
    for (size_t i = best + 1; i + 2 < n; ++i) {
      ranks[i] = ranks[i + 1];
      merged[i] = merged[i + 1];
    }
    --n;
    for (size_t i = best > 0 ? best - 1 : 0; i <= best && i + 1 < n; ++i) {
      const MergeSlot* m = find_merge(symbols[i], symbols[i + 1]);
      ranks[i] = m ? m->rank : kNone;
      merged[i] = m ? m->merged : -1;
    }
  }
  symbols.resize(n);
}

// The same merge order for long words: a doubly linked list of symbols and a min-heap of
// candidate pairs, where a popped pair is skipped if its symbols changed since it was pushed.
void BpeModel::merge_large(std::vector<int32_t>& symbols) const {
  const size_t n = symbols.size();
  std::vector<int32_t> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (size_t i = 0; i < n; ++i) {
    prev[i] = static_cast<int32_t>(i) - 1;
    next[i] = i + 1 < n ? static_cast<int32_t>(i + 1) : -1;
  }
  struct Candidate {
    uint32_t rank;
    int32_t pos;
    int32_t merged;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  auto push = [&](int32_t pos) {
    if (pos < 0 || next[pos] < 0) return;
    if (const MergeSlot* m = find_merge(symbols[pos], symbols[next[pos]])) {
      heap.push({m->rank, pos, m->merged});
    }
  };
  for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int32_t>(i));
  while (!heap.empty()) {
    const Candidate top = heap.top();
    heap.pop();
    const int32_t pos = top.pos;
    if (!alive[pos] || next[pos] < 0) continue;
    const int32_t right = next[pos];
    const MergeSlot* m = find_merge(symbols[pos], symbols[right]);
    if (m == nullptr || m->merged != top.merged) continue;  // stale entry
    symbols[pos] = top.merged;
    alive[right] = false;
    next[pos] = next[right];
    if (next[right] >= 0) prev[next[right]] = pos;
    push(prev[pos]);
    push(pos);
  }
  size_t out = 0;
  for (int32_t i = 0; i >= 0; i = next[i]) symbols[out++] = symbols[i];
  symbols.resize(out);
}

void BpeModel::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (word.size() == 1 && byte_ids_[static_cast<uint8_t>(word[0])] >= 0) {
    out.push_back(byte_ids_[static_cast<uint8_t>(word[0])]);
    return;
  }
  if (ignore_merges_) {
    const int32_t id = bytes_ids_.find(word);
    if (id >= 0) {
      out.push_back(id);
      return;
    }
  }
  const bool cacheable = word.size() < kCacheMaxWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> symbols;
  symbols.reserve(word.size());
  for (char c : word) {
    // HF drops a character with no token when there is no unk token; from_json rejects files
    // where an unk token would be needed.
    const int32_t id = byte_ids_[static_cast<uint8_t>(c)];
    if (id >= 0) symbols.push_back(id);
  }
  if (symbols.size() <= 64) {
    merge_small(symbols);
  } else {
    merge_large(symbols);
  }
  out.insert(out.end(), symbols.begin(), symbols.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() < kCacheCapacity) cache_.emplace(std::string(word), std::move(symbols));
  }
}

}  // namespace kestrel
