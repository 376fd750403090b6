// The KV cache's bookkeeping on the host: a pool of blocks of kKvBlockSize positions with
// reference counts, a block table per sequence slot, and the prefix cache. The backend holds the
// blocks' keys and values; this class decides which block holds which positions of which slot.
//
// Sharing is only ever of full blocks, which nobody writes again: a slot's partially filled last
// block is its own, so no block is copied on write in normal use. make_writable() copies one
// anyway when a caller rewrites positions of a shared block (a sequence restarted mid-way).
//
// Prefix cache: a full block a slot has computed can be published under the hash of its tokens
// chained with the hash of every earlier block of the sequence; a later request whose prompt
// starts with the same tokens takes those blocks instead of computing them. Published blocks stay
// after their last holder releases them and are evicted, oldest release first, only when an
// allocation finds no free block. A hit also compares the block's own tokens, so a wrong match
// needs a 64-bit collision of the whole prefix's chained hash.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kestrel/status.h"
#include "kestrel/types.h"

namespace kestrel {

class PagedKvCache {
 public:
  PagedKvCache(int64_t n_blocks, int64_t n_slots, int64_t blocks_per_seq);

  int64_t n_blocks() const { return int64_t(refs_.size()); }
  int64_t n_slots() const { return int64_t(lengths_.size()); }
  int64_t blocks_per_seq() const { return blocks_per_seq_; }
  // Blocks an allocation can take now: free ones and published ones no slot holds.
  int64_t available_blocks() const { return int64_t(free_.size() + evictable_.size()); }
  // Blocks some slot holds.
  int64_t used_blocks() const { return n_blocks() - available_blocks(); }
  // Blocks the prefix cache offers (held or not).
  int64_t cached_blocks() const { return int64_t(by_hash_.size()); }

  // [n_slots, blocks_per_seq]: entry b of slot s is the block of its positions
  // [kKvBlockSize b, kKvBlockSize (b + 1)), -1 past the blocks the slot holds.
  const int32_t* tables() const { return tables_.data(); }
  std::span<const int32_t> table(int32_t slot) const;  // the blocks the slot holds

  // Gives `slot` blocks until it covers positions [0, n_positions); false, with nothing taken,
  // when the pool has too few available or n_positions is past the slot's table.
  bool reserve(int32_t slot, int64_t n_positions);
  // The blocks reserve(slot, n_positions) would take: those past the ones the slot holds.
  int64_t blocks_to_reserve(int32_t slot, int64_t n_positions) const;
  // Drops every block of the slot (shared and published ones stay with their other holders).
  void release(int32_t slot);
  // Makes table entry `index` of the slot (which it holds) a block no other slot holds and the
  // prefix cache does not offer, so that positions in it can be written. When the block was
  // shared, a new one takes its place and the (source, destination) copy the backend must make
  // before the write is returned; an empty pool is an error.
  Result<std::optional<std::pair<int32_t, int32_t>>> make_writable(int32_t slot, int64_t index);
  // Whether table entry `index` of the slot is a block another slot holds too.
  bool is_shared(int32_t slot, int64_t index) const;
  // The (empty) slot `dst` shares the first `n` blocks of slot `src`.
  void share(int32_t src, int32_t dst, int64_t n);

  // The chained hash of a full block: `previous` is the hash of the block before it (0 for the
  // first), `tokens` its kKvBlockSize tokens.
  static uint64_t chain_hash(uint64_t previous, std::span<const int32_t> tokens);
  // The published blocks holding the longest run of `tokens`' first full blocks (at most
  // `max_blocks`), in order.
  std::vector<int32_t> lookup(std::span<const int32_t> tokens, int64_t max_blocks) const;
  // How many of `blocks` no slot holds: taking them lowers available_blocks() by that much.
  int64_t unheld(std::span<const int32_t> blocks) const;
  // Appends `blocks` (published ones, from lookup) to the empty slot's table.
  void attach(int32_t slot, std::span<const int32_t> blocks);
  // Offers table entry `index` of the slot, a full block holding `tokens` (kKvBlockSize of them)
  // whose chained hash is `hash`, to later lookups. A hash already published keeps its block.
  void publish(int32_t slot, int64_t index, uint64_t hash, std::span<const int32_t> tokens);

 private:
  int32_t take_block();  // a free block, else the oldest evictable one; -1 when none
  void drop_reference(int32_t block);
  void unpublish(int32_t block);
  bool valid_slot(int32_t slot) const { return slot >= 0 && slot < n_slots(); }

  int64_t blocks_per_seq_ = 0;
  std::vector<int32_t> tables_;   // [n_slots, blocks_per_seq]
  std::vector<int64_t> lengths_;  // [n_slots] blocks each slot holds
  std::vector<int32_t> refs_;     // [n_blocks] slots holding each block
  std::vector<int32_t> free_;     // unpublished blocks nobody holds
  // Published blocks nobody holds, by release order (first: evicted first).
  std::set<std::pair<uint64_t, int32_t>> evictable_;
  uint64_t release_clock_ = 0;
  std::vector<uint64_t> evict_key_;                 // [n_blocks] the block's key in evictable_
  std::vector<std::optional<uint64_t>> published_;  // [n_blocks] its hash when published
  std::vector<int32_t> block_tokens_;               // [n_blocks, kKvBlockSize] when published
  std::unordered_map<uint64_t, int32_t> by_hash_;
};

}  // namespace kestrel
