// The paged KV cache: the block allocator and prefix cache (runtime/kv_cache.h), the CPU
// attention reading and writing through block tables, and the engine's use of both.
#include <gtest/gtest.h>

#include <random>
#include <set>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "kestrel/engine.h"
#include "model/weights.h"
#include "runtime/kv_cache.h"
#include "runtime/planner.h"
#include "scrambled_tables.h"

namespace kestrel {
namespace {

std::vector<int32_t> tokens_from(int32_t first, size_t n) {
  std::vector<int32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = first + int32_t(i);
  return t;
}

TEST(KvBlocks, ReserveTakesWholeBlocksOrNothing) {
  PagedKvCache kv(10, 3, 4);
  EXPECT_EQ(kv.available_blocks(), 10);
  EXPECT_EQ(kv.blocks_to_reserve(0, 17), 2);
  ASSERT_TRUE(kv.reserve(0, 17));  // 2 blocks
  EXPECT_EQ(kv.table(0).size(), 2u);
  EXPECT_EQ(kv.blocks_to_reserve(0, 32), 0);
  EXPECT_EQ(kv.blocks_to_reserve(0, 33), 1);
  EXPECT_EQ(kv.blocks_to_reserve(3, 16), 0);  // no such slot
  ASSERT_TRUE(kv.reserve(0, 32));             // still 2
  EXPECT_EQ(kv.table(0).size(), 2u);
  ASSERT_TRUE(kv.reserve(1, 64));  // 4
  EXPECT_EQ(kv.used_blocks(), 6);
  EXPECT_FALSE(kv.reserve(2, 65));  // past the table
  ASSERT_TRUE(kv.reserve(2, 64));   // the last 4
  EXPECT_EQ(kv.available_blocks(), 0);
  EXPECT_FALSE(kv.reserve(0, 33));  // pool empty: nothing taken
  EXPECT_EQ(kv.table(0).size(), 2u);
  // Every block held once, and the tables say which.
  std::set<int32_t> seen;
  for (int32_t slot = 0; slot < 3; ++slot) {
    for (int32_t b : kv.table(slot)) EXPECT_TRUE(seen.insert(b).second) << b;
    for (size_t i = 0; i < kv.table(slot).size(); ++i) {
      EXPECT_EQ(kv.tables()[slot * 4 + int64_t(i)], kv.table(slot)[i]);
    }
  }
  kv.release(1);
  EXPECT_EQ(kv.available_blocks(), 4);
  EXPECT_EQ(kv.tables()[4], -1);
  ASSERT_TRUE(kv.reserve(0, 64));
  EXPECT_EQ(kv.available_blocks(), 2);
}

TEST(KvBlocks, SharedBlocksAreCopiedBeforeAWrite) {
  PagedKvCache kv(8, 2, 4);
  ASSERT_TRUE(kv.reserve(0, 40));  // 3 blocks
  kv.share(0, 1, 3);
  EXPECT_EQ(kv.used_blocks(), 3);
  EXPECT_EQ(std::vector<int32_t>(kv.table(1).begin(), kv.table(1).end()),
            std::vector<int32_t>(kv.table(0).begin(), kv.table(0).end()));
  const int32_t shared = kv.table(0)[2];
  auto copy = kv.make_writable(1, 2);
  ASSERT_TRUE(copy.is_ok());
  ASSERT_TRUE(copy->has_value());
  EXPECT_EQ((*copy)->first, shared);
  EXPECT_EQ((*copy)->second, kv.table(1)[2]);
  EXPECT_NE(kv.table(1)[2], shared);
  EXPECT_EQ(kv.used_blocks(), 4);
  // Now private to each: no more copies.
  auto again = kv.make_writable(0, 2);
  ASSERT_TRUE(again.is_ok());
  EXPECT_FALSE(again->has_value());
  // Releasing one holder keeps the shared blocks for the other.
  kv.release(0);
  EXPECT_EQ(kv.used_blocks(), 3);
  kv.release(1);
  EXPECT_EQ(kv.available_blocks(), 8);
}

TEST(KvBlocks, PrefixCacheFindsPublishedBlocksAndEvictsOldestFirst) {
  PagedKvCache kv(6, 2, 4);
  const std::vector<int32_t> prompt = tokens_from(100, 40);
  ASSERT_TRUE(kv.reserve(0, 40));
  uint64_t hash = 0;
  for (int64_t b = 0; b < 2; ++b) {
    const std::span<const int32_t> block(prompt.data() + b * kKvBlockSize, size_t(kKvBlockSize));
    hash = PagedKvCache::chain_hash(hash, block);
    kv.publish(0, b, hash, block);
  }
  EXPECT_EQ(kv.cached_blocks(), 2);
  const std::vector<int32_t> found = kv.lookup(prompt, 10);
  ASSERT_EQ(found.size(), 2u);
  EXPECT_EQ(found[0], kv.table(0)[0]);
  EXPECT_EQ(found[1], kv.table(0)[1]);
  EXPECT_EQ(kv.lookup(prompt, 1).size(), 1u);
  // Another second block, or another first block, misses from there on.
  std::vector<int32_t> other = prompt;
  other[20] = 7;
  EXPECT_EQ(kv.lookup(other, 10).size(), 1u);
  other[3] = 7;
  EXPECT_EQ(kv.lookup(other, 10).size(), 0u);

  // Released, the published blocks stay findable but count as available.
  kv.release(0);
  EXPECT_EQ(kv.available_blocks(), 6);
  EXPECT_EQ(kv.unheld(found), 2);
  kv.attach(1, found);
  EXPECT_EQ(kv.available_blocks(), 4);
  EXPECT_EQ(kv.unheld(found), 0);
  ASSERT_TRUE(kv.reserve(1, 64));
  EXPECT_EQ(kv.table(1)[0], found[0]);
  kv.release(1);

  // Filling the pool evicts them, the chain's later block first.
  ASSERT_TRUE(kv.reserve(0, 64));  // 4 free blocks: nothing evicted
  EXPECT_EQ(kv.lookup(prompt, 10).size(), 2u);
  ASSERT_TRUE(kv.reserve(1, 16));
  EXPECT_EQ(kv.lookup(prompt, 10).size(), 1u);
  ASSERT_TRUE(kv.reserve(1, 32));
  EXPECT_EQ(kv.lookup(prompt, 10).size(), 0u);
  EXPECT_EQ(kv.cached_blocks(), 0);
}

TEST(KvBlocks, WritingAPublishedBlockWithdrawsIt) {
  PagedKvCache kv(4, 1, 4);
  const std::vector<int32_t> prompt = tokens_from(5, 16);
  ASSERT_TRUE(kv.reserve(0, 16));
  kv.publish(0, 0, PagedKvCache::chain_hash(0, prompt), prompt);
  ASSERT_EQ(kv.lookup(prompt, 1).size(), 1u);
  auto copy = kv.make_writable(0, 0);
  ASSERT_TRUE(copy.is_ok());
  EXPECT_FALSE(copy->has_value());
  EXPECT_EQ(kv.lookup(prompt, 1).size(), 0u);
}

// A tiny attention-only setup on the CPU backend: one layer, 4 query heads over 2 KV heads.
struct AttentionRig {
  ModelConfig config;
  RunShape shape{2, 64, 64, 64};
  std::unique_ptr<Backend> backend = make_cpu_backend(2);
  RopeParams rope{16, 4, 2};

  AttentionRig() {
    config.hidden_size = 64;
    config.n_layers = 1;
    config.n_heads = 4;
    config.n_kv_heads = 2;
    config.head_dim = 16;
    config.intermediate_size = 64;
    config.vocab_size = 32;
    config.max_position_embeddings = 64;
    EXPECT_TRUE(backend->reserve(config, shape).is_ok());
  }

  // Attention output of a call of tokens (slot, position) with seeded q, k, v.
  std::vector<float> call(const std::vector<int32_t>& seqs, const std::vector<int32_t>& positions,
                          const int32_t* tables, uint64_t seed) {
    const int64_t n = int64_t(seqs.size());
    const std::vector<int32_t> tokens(seqs.size(), 1);
    BatchView view;
    view.n_tokens = n;
    view.tokens = tokens.data();
    view.positions = positions.data();
    view.seq_ids = seqs.data();
    view.block_tables = tables;
    view.block_table_stride = shape.blocks_per_seq();
    EXPECT_TRUE(backend->begin_batch(view).is_ok());
    Tensor q = *backend->scratch(n, 64), k = *backend->scratch(n, 32);
    Tensor v = *backend->scratch(n, 32), out = *backend->scratch(n, 64);
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> dist;
    for (Tensor t : {q, k, v}) {
      for (int64_t i = 0; i < t.rows * t.cols; ++i) static_cast<float*>(t.data)[i] = dist(rng);
    }
    EXPECT_TRUE(backend->attention(out, q, k, v, 0, rope).is_ok());
    const float* o = static_cast<const float*>(out.data);
    return std::vector<float>(o, o + n * 64);
  }
};

std::vector<int32_t> slots(int32_t seq, int32_t n) {
  return std::vector<int32_t>(size_t(n), seq);
}
std::vector<int32_t> positions(int32_t first, int32_t n) {
  return tokens_from(first, size_t(n));
}

TEST(PagedAttention, ScrambledTablesGiveTheContiguousResult) {
  AttentionRig contiguous, scrambled;
  std::vector<int32_t> identity(size_t(contiguous.shape.max_seqs * 4));
  for (size_t i = 0; i < identity.size(); ++i) identity[i] = int32_t(i);
  const testing::ScrambledBlockTables shuffled(scrambled.shape, 3);
  // Prompts of both slots across block boundaries, then a mixed decode call.
  struct Call {
    std::vector<int32_t> seqs, positions;
  };
  std::vector<Call> calls = {{slots(0, 37), positions(0, 37)},
                             {slots(1, 20), positions(0, 20)},
                             {{0, 1, 1}, {37, 20, 21}},
                             {slots(0, 10), positions(38, 10)}};
  uint64_t seed = 1;
  for (const Call& c : calls) {
    const auto a = contiguous.call(c.seqs, c.positions, identity.data(), seed);
    const auto b = scrambled.call(c.seqs, c.positions, shuffled.entries.data(), seed);
    ++seed;
    EXPECT_EQ(a, b);
  }
}

TEST(PagedAttention, SlotsSharingBlocksSeeTheSameCache) {
  AttentionRig rig;
  // Slot 0: blocks 0 1 2 3; slot 1 shares its first two and has 4 5 of its own.
  const std::vector<int32_t> tables = {0, 1, 2, 3, 0, 1, 4, 5};
  rig.call(slots(0, 32), positions(0, 32), tables.data(), 11);
  // The same q, k, v at position 32 of each slot: slot 1 reads slot 0's 32 positions.
  const auto first = rig.call({0}, {32}, tables.data(), 12);
  const auto second = rig.call({1}, {32}, tables.data(), 12);
  EXPECT_EQ(first, second);
  // A slot with blocks of its own (never written) sees something else.
  const std::vector<int32_t> private_tables = {0, 1, 2, 3, 4, 5, 6, 7};
  const auto unshared = rig.call({1}, {32}, private_tables.data(), 12);
  EXPECT_NE(first, unshared);
}

TEST(PagedAttention, BadTablesAreRefused) {
  AttentionRig rig;
  const int32_t token = 1, pos = 20, seq = 0;
  std::vector<int32_t> tables = {0, 9, -1, -1, -1, -1, -1, -1};  // block 9: outside the pool
  BatchView view;
  view.n_tokens = 1;
  view.tokens = &token;
  view.positions = &pos;
  view.seq_ids = &seq;
  view.block_tables = tables.data();
  view.block_table_stride = 4;
  EXPECT_FALSE(rig.backend->begin_batch(view).is_ok());
  tables[1] = -1;  // unassigned
  EXPECT_FALSE(rig.backend->begin_batch(view).is_ok());
  tables[1] = 7;
  EXPECT_TRUE(rig.backend->begin_batch(view).is_ok());
  view.block_tables = nullptr;
  EXPECT_FALSE(rig.backend->begin_batch(view).is_ok());
}

std::unique_ptr<Engine> tiny_engine(int64_t max_seqs, int64_t kv_blocks) {
  EngineOptions options;
  options.model = "synthetic:tiny-qwen2";
  options.format = WeightFormat::fp32;
  options.threads = 2;
  options.progress = false;
  options.max_seqs = max_seqs;
  options.max_context = 64;
  options.prefill_chunk = 64;
  options.kv_blocks = kv_blocks;
  auto engine = Engine::create(options);
  EXPECT_TRUE(engine.is_ok()) << engine.status().message();
  return std::move(engine).value();
}

TEST(PagedEngine, RunsFailCleanlyWhenThePoolIsFull) {
  auto engine = tiny_engine(2, 4);  // one full context of 64 positions
  EXPECT_EQ(engine->run_shape().pool_blocks(), 4);
  const std::vector<int32_t> prompt = tokens_from(10, 40);
  ASSERT_TRUE(engine->prefill(prompt, 0).is_ok());
  EXPECT_EQ(engine->kv_cache().used_blocks(), 3);
  // Slot 1 needs 2 blocks; only 1 is left.
  Batch batch;
  for (int32_t i = 0; i < 20; ++i) batch.add(5, i, 1, i == 19);
  std::vector<float> logits;
  const Status s = engine->run(batch, &logits);
  EXPECT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("KV cache is full"), std::string::npos) << s.message();
  EXPECT_EQ(engine->kv_cache().used_blocks(), 3);  // nothing was taken for the failed call
  engine->release_sequence(0);
  EXPECT_TRUE(engine->run(batch, &logits).is_ok());
  // A pool below one full context is refused up front.
  EngineOptions options;
  options.model = "synthetic:tiny-qwen2";
  options.progress = false;
  options.max_context = 64;
  options.kv_blocks = 3;
  EXPECT_FALSE(Engine::create(options).is_ok());
}

TEST(PagedEngine, PoolIsSizedFromTheMemoryLeft) {
  AttentionRig rig;
  const RunShape shape = rig.shape;  // 2 slots of 64 positions: 4 blocks a table
  const LayoutOf layout_of = [&](const RunShape& s) {
    return rig.backend->reserve_layout(rig.config, s);
  };
  RunShape one_block = shape;
  one_block.kv_blocks = 1;
  const WorkspaceLayout base = *layout_of(one_block);
  const size_t per_block = base.kv_cache_bytes();
  const size_t fixed = base.total_bytes() - per_block;
  // Exactly 10 blocks beside the workspace at half of the memory.
  auto blocks =
      kv_blocks_that_fit(layout_of, shape, {2 * (fixed + 10 * per_block), "test", false}, 0.5);
  ASSERT_TRUE(blocks.is_ok()) << blocks.status().message();
  EXPECT_EQ(*blocks, 10);
  RunShape sized = shape;
  sized.kv_blocks = *blocks;
  EXPECT_LE(layout_of(sized)->total_bytes(), fixed + 10 * per_block);
  // Less than one full context (4 blocks) is refused, naming the numbers.
  auto small =
      kv_blocks_that_fit(layout_of, shape, {fixed + 3 * per_block, "test memory", false}, 1.0);
  ASSERT_FALSE(small.is_ok());
  EXPECT_NE(small.status().message().find("test memory"), std::string::npos);
  EXPECT_NE(small.status().message().find("4 needed"), std::string::npos)
      << small.status().message();
  EXPECT_EQ(small.status().message().find("--max-memory"), std::string::npos);
  // Where --max-memory is the limit, the error says to raise it.
  auto capped = kv_blocks_that_fit(
      layout_of, shape, {fixed + 3 * per_block, "--max-memory 1MB less the weights", true}, 1.0);
  ASSERT_FALSE(capped.is_ok());
  EXPECT_NE(capped.status().message().find("raise the memory cap"), std::string::npos)
      << capped.status().message();
  // Where the workspace alone takes the budget (serve --max-memory 13MB with 512 tokens a
  // step), a shorter context cannot help: the error names the tokens per call.
  for (const bool from_flag : {false, true}) {
    auto no_room = kv_blocks_that_fit(layout_of, shape, {fixed / 2, "test memory", from_flag}, 1.0);
    ASSERT_FALSE(no_room.is_ok());
    EXPECT_NE(no_room.status().message().find("lower the tokens per call"), std::string::npos)
        << no_room.status().message();
    EXPECT_EQ(no_room.status().message().find("context length"), std::string::npos)
        << no_room.status().message();
  }
}

TEST(PagedEngine, CopySequenceSharesFullBlocks) {
  auto engine = tiny_engine(2, 0);
  const std::vector<int32_t> prompt = tokens_from(10, 37);  // 2 full blocks + 5 positions
  ASSERT_TRUE(engine->prefill(prompt, 0).is_ok());
  ASSERT_TRUE(engine->copy_sequence(0, 1, 37).is_ok());
  const PagedKvCache& kv = engine->kv_cache();
  EXPECT_EQ(kv.table(1)[0], kv.table(0)[0]);
  EXPECT_EQ(kv.table(1)[1], kv.table(0)[1]);
  EXPECT_NE(kv.table(1)[2], kv.table(0)[2]);
  EXPECT_EQ(kv.used_blocks(), 4);
  // Both continue identically.
  Batch batch;
  batch.add(42, 37, 0, true);
  batch.add(42, 37, 1, true);
  std::vector<float> logits;
  ASSERT_TRUE(engine->run(batch, &logits).is_ok());
  const size_t v = size_t(engine->config().vocab_size);
  EXPECT_TRUE(std::equal(logits.begin(), logits.begin() + long(v), logits.begin() + long(v)));
}

}  // namespace
}  // namespace kestrel
