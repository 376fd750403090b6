// KV cache block tables for tests that drive a backend directly: every slot of a RunShape gets
// the blocks of its full context, handed out in a shuffled order, so that no slot's positions
// are contiguous in the pool and slot s does not start at block s * blocks_per_seq.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "backend/backend.h"
#include "kestrel/types.h"

namespace kestrel::testing {

struct ScrambledBlockTables {
  std::vector<int32_t> entries;  // [max_seqs, stride]
  int64_t stride = 0;

  ScrambledBlockTables() = default;
  ScrambledBlockTables(const RunShape& shape, uint64_t seed) : stride(shape.blocks_per_seq()) {
    std::vector<int32_t> blocks(size_t(shape.pool_blocks()));
    std::iota(blocks.begin(), blocks.end(), 0);
    std::shuffle(blocks.begin(), blocks.end(), std::mt19937_64(seed));
    entries.assign(size_t(shape.max_seqs * stride), -1);
    for (size_t i = 0; i < entries.size() && i < blocks.size(); ++i) entries[i] = blocks[i];
  }
  // `view` reading and writing through these tables.
  BatchView operator()(BatchView view) const {
    view.block_tables = entries.data();
    view.block_table_stride = stride;
    return view;
  }
};

}  // namespace kestrel::testing
