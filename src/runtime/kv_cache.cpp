#include "runtime/kv_cache.h"

#include <algorithm>
#include <string>

namespace kestrel {

PagedKvCache::PagedKvCache(int64_t n_blocks, int64_t n_slots, int64_t blocks_per_seq)
    : blocks_per_seq_(blocks_per_seq),
      tables_(size_t(n_slots * blocks_per_seq), -1),
      lengths_(size_t(n_slots), 0),
      refs_(size_t(n_blocks), 0),
      evict_key_(size_t(n_blocks), 0),
      published_(size_t(n_blocks)),
      block_tokens_(size_t(n_blocks * kKvBlockSize), 0) {
  // Handed out from the back: block 0 first.
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_.push_back(int32_t(b));
}

std::span<const int32_t> PagedKvCache::table(int32_t slot) const {
  if (!valid_slot(slot)) return {};
  return {tables_.data() + slot * blocks_per_seq_, size_t(lengths_[size_t(slot)])};
}

int32_t PagedKvCache::take_block() {
  int32_t block = -1;
  if (!free_.empty()) {
    block = free_.back();
    free_.pop_back();
  } else if (!evictable_.empty()) {
    block = evictable_.begin()->second;
    evictable_.erase(evictable_.begin());
    unpublish(block);
  } else {
    return -1;
  }
  refs_[size_t(block)] = 1;
  return block;
}

void PagedKvCache::unpublish(int32_t block) {
  std::optional<uint64_t>& hash = published_[size_t(block)];
  if (!hash) return;
  by_hash_.erase(*hash);
  hash.reset();
}

void PagedKvCache::drop_reference(int32_t block) {
  if (--refs_[size_t(block)] > 0) return;
  if (published_[size_t(block)]) {
    evict_key_[size_t(block)] = release_clock_++;
    evictable_.insert({evict_key_[size_t(block)], block});
  } else {
    free_.push_back(block);
  }
}

int64_t PagedKvCache::blocks_to_reserve(int32_t slot, int64_t n_positions) const {
  if (!valid_slot(slot)) return 0;
  const int64_t wanted = (n_positions + kKvBlockSize - 1) / kKvBlockSize;
  return std::max<int64_t>(0, wanted - lengths_[size_t(slot)]);
}

bool PagedKvCache::reserve(int32_t slot, int64_t n_positions) {
  if (!valid_slot(slot)) return false;
  const int64_t wanted = (n_positions + kKvBlockSize - 1) / kKvBlockSize;
  int64_t& length = lengths_[size_t(slot)];
  if (wanted <= length) return true;
  if (wanted > blocks_per_seq_ || wanted - length > available_blocks()) return false;
  int32_t* table = tables_.data() + slot * blocks_per_seq_;
  while (length < wanted) table[length++] = take_block();
  return true;
}

void PagedKvCache::release(int32_t slot) {
  if (!valid_slot(slot)) return;
  int32_t* table = tables_.data() + slot * blocks_per_seq_;
  int64_t& length = lengths_[size_t(slot)];
  // Last block first, so that a chain's later blocks are evicted before its earlier ones (a
  // prefix lookup stops at the first miss).
  while (length > 0) {
    drop_reference(table[--length]);
    table[length] = -1;
  }
}

Result<std::optional<std::pair<int32_t, int32_t>>> PagedKvCache::make_writable(int32_t slot,
                                                                               int64_t index) {
  if (!valid_slot(slot) || index < 0 || index >= lengths_[size_t(slot)]) {
    return Status::error("KV cache: slot " + std::to_string(slot) + " holds no block " +
                         std::to_string(index));
  }
  int32_t& entry = tables_[size_t(slot * blocks_per_seq_ + index)];
  if (refs_[size_t(entry)] == 1) {
    // Only this slot holds it: writing changes its tokens, so the prefix cache lets it go.
    unpublish(entry);
    return std::optional<std::pair<int32_t, int32_t>>();
  }
  const int32_t fresh = take_block();
  if (fresh < 0) {
    return Status::error("KV cache: no free block for a private copy of block " +
                         std::to_string(entry) + " (" + std::to_string(n_blocks()) +
                         " blocks in the pool)");
  }
  const int32_t shared = entry;
  drop_reference(shared);
  entry = fresh;
  return std::optional<std::pair<int32_t, int32_t>>(std::pair(shared, fresh));
}

bool PagedKvCache::is_shared(int32_t slot, int64_t index) const {
  if (!valid_slot(slot) || index < 0 || index >= lengths_[size_t(slot)]) return false;
  return refs_[size_t(tables_[size_t(slot * blocks_per_seq_ + index)])] > 1;
}

void PagedKvCache::share(int32_t src, int32_t dst, int64_t n) {
  if (!valid_slot(src) || !valid_slot(dst) || src == dst) return;
  release(dst);
  n = std::min(n, lengths_[size_t(src)]);
  const int32_t* from = tables_.data() + src * blocks_per_seq_;
  int32_t* to = tables_.data() + dst * blocks_per_seq_;
  for (int64_t b = 0; b < n; ++b) {
    to[b] = from[b];
    ++refs_[size_t(from[b])];
  }
  lengths_[size_t(dst)] = n;
}

uint64_t PagedKvCache::chain_hash(uint64_t previous, std::span<const int32_t> tokens) {
  // FNV-1a over the previous hash and the tokens, then a splitmix64 finalizer to spread it.
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= (v >> (8 * i)) & 0xffu;
      h *= 1099511628211ull;
    }
  };
  mix(previous);
  for (int32_t t : tokens) mix(uint64_t(uint32_t(t)));
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  h ^= h >> 31;
  return h;
}

std::vector<int32_t> PagedKvCache::lookup(std::span<const int32_t> tokens,
                                          int64_t max_blocks) const {
  std::vector<int32_t> found;
  uint64_t hash = 0;
  const int64_t full = std::min<int64_t>(int64_t(tokens.size()) / kKvBlockSize, max_blocks);
  for (int64_t b = 0; b < full; ++b) {
    const std::span<const int32_t> block_tokens =
        tokens.subspan(size_t(b * kKvBlockSize), size_t(kKvBlockSize));
    hash = chain_hash(hash, block_tokens);
    const auto it = by_hash_.find(hash);
    if (it == by_hash_.end()) break;
    const int32_t* stored = block_tokens_.data() + int64_t(it->second) * kKvBlockSize;
    if (!std::equal(block_tokens.begin(), block_tokens.end(), stored)) break;
    found.push_back(it->second);
  }
  return found;
}

int64_t PagedKvCache::unheld(std::span<const int32_t> blocks) const {
  int64_t n = 0;
  for (int32_t b : blocks) n += refs_[size_t(b)] == 0 ? 1 : 0;
  return n;
}

void PagedKvCache::attach(int32_t slot, std::span<const int32_t> blocks) {
  if (!valid_slot(slot)) return;
  release(slot);
  int32_t* table = tables_.data() + slot * blocks_per_seq_;
  int64_t& length = lengths_[size_t(slot)];
  for (int32_t b : blocks) {
    if (length == blocks_per_seq_) break;
    if (refs_[size_t(b)]++ == 0) evictable_.erase({evict_key_[size_t(b)], b});
    table[length++] = b;
  }
}

void PagedKvCache::publish(int32_t slot, int64_t index, uint64_t hash,
                           std::span<const int32_t> tokens) {
  if (!valid_slot(slot) || index < 0 || index >= lengths_[size_t(slot)] ||
      int64_t(tokens.size()) != kKvBlockSize || by_hash_.count(hash) != 0) {
    return;
  }
  const int32_t block = tables_[size_t(slot * blocks_per_seq_ + index)];
  if (published_[size_t(block)]) return;
  published_[size_t(block)] = hash;
  by_hash_[hash] = block;
  std::copy(tokens.begin(), tokens.end(), block_tokens_.begin() + int64_t(block) * kKvBlockSize);
}

}  // namespace kestrel
