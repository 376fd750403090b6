// Byte-level BPE model: vocabulary and ranked merges from tokenizer.json's "model" object, and the
// merge loop HF's `tokenizers` runs on each pre-token.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "core/status.h"

namespace kestrel {

// The byte-level alphabet (GPT-2): every byte is shown as one printable code point, so tokens are
// valid UTF-8 strings. Printable Latin-1 bytes map to themselves, the other 68 to U+0100.. in
// order.
uint32_t byte_to_unicode(uint8_t byte);
// The byte a byte-level code point stands for, or -1 when the code point is not in the alphabet.
int byte_from_unicode(uint32_t code_point);
// Raw bytes of a byte-level string, or false when some character is outside the alphabet.
bool byte_level_decode(std::string_view token, std::string& bytes);
std::string byte_level_encode(std::string_view bytes);

// Open-addressing map from byte strings to ids; the keys live in one buffer.
class StringIdMap {
 public:
  void reserve(size_t n);
  // Inserts or overwrites.
  void insert(std::string_view key, int32_t id);
  // The id of `key`, or -1.
  int32_t find(std::string_view key) const;
  size_t size() const { return size_; }

 private:
  struct Slot {
    uint64_t hash = 0;
    uint32_t offset = 0, length = 0;
    int32_t id = -1;  // -1: empty
  };
  void grow();
  std::vector<Slot> slots_;
  std::string keys_;
  size_t size_ = 0;
};

// Vocabulary ids are below this (4M, far above every released vocabulary of ~256k).
constexpr int64_t kMaxTokenIds = int64_t(1) << 22;

class BpeModel {
 public:
  // Parses tokenizer.json's "model" object. Only what byte-level BPE needs is accepted: no
  // dropout, no byte fallback, no subword prefix or end-of-word suffix.
  static Result<std::unique_ptr<BpeModel>> from_json(const nlohmann::json& model);

  // Appends the ids of one pre-token given as raw bytes (the byte-level mapping is implicit).
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  // Model vocabulary lookups by the token's byte-level string, as written in tokenizer.json.
  int32_t token_to_id(std::string_view token) const;
  // Byte-level string of `id`, or nullptr when the model has no such id.
  const std::string* id_to_token(int32_t id) const;
  // Number of entries in the model vocabulary (HF's get_vocab_size(false)).
  size_t vocab_size() const { return vocab_size_; }
  // One past the largest model id.
  int32_t id_limit() const { return static_cast<int32_t>(tokens_.size()); }

 private:
  struct MergeSlot {
    uint64_t pair = ~uint64_t{0};  // (left << 32) | right; all ones: empty
    uint32_t rank = 0;
    int32_t merged = -1;
  };
  // Rank and result of merging (left, right), or nullptr.
  const MergeSlot* find_merge(int32_t left, int32_t right) const {
    const uint64_t key = (uint64_t(uint32_t(left)) << 32) | uint32_t(right);
    size_t i = (key * 0x9E3779B97F4A7C15ull) >> merge_shift_;
    while (true) {
      const MergeSlot& slot = merges_[i];
      if (slot.pair == key) return &slot;
      if (slot.merged < 0) return nullptr;
      i = (i + 1) & (merges_.size() - 1);
    }
  }
  void add_merge(int32_t left, int32_t right, uint32_t rank, int32_t merged);
  void merge_small(std::vector<int32_t>& symbols) const;
  void merge_large(std::vector<int32_t>& symbols) const;

  std::vector<std::string> tokens_;  // [id] -> byte-level string ("" where no token has the id)
  std::vector<bool> has_token_;
  size_t vocab_size_ = 0;
  StringIdMap token_ids_;                // byte-level string -> id
  StringIdMap bytes_ids_;                // raw bytes -> id
  std::array<int32_t, 256> byte_ids_{};  // single byte -> id, -1 if absent
  std::vector<MergeSlot> merges_;
  int merge_shift_ = 64;
  bool ignore_merges_ = false;

  // Pre-tokens repeat (words, indentation), so merge results are cached like HF does; the cache
  // stops growing at kCacheCapacity words.
  static constexpr size_t kCacheCapacity = 10000;
  static constexpr size_t kCacheMaxWordBytes = 256;
  struct WordHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, WordHash, std::equal_to<>> cache_;
};

}  // namespace kestrel
