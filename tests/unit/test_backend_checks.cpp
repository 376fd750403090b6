// The checking layer every backend shares (Backend::reserve, begin_batch, copy_kv_block): each
// out-of-range argument is refused with a message before the backend's op runs.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "model/loader.h"

namespace kestrel {
namespace {

TEST(BackendChecks, BatchesAndCopiesOutsideTheReservationAreRefused) {
  auto config = synthetic_config("tiny-qwen2");
  ASSERT_TRUE(config.is_ok());
  const std::unique_ptr<Backend> backend = make_cpu_backend(1);
  Backend& b = *backend;
  int32_t token = 1, pos = 0, seq = 0, row = 0;
  // Two slots of 16 positions: one block each, blocks 0 and 1 of the pool.
  const int32_t tables[] = {0, 1};
  auto view = [&](int64_t n, const int32_t* tokens, const int32_t* positions, const int32_t* seqs,
                  int64_t n_rows, const int32_t* rows) {
    return BatchView{n, tokens, positions, seqs, tables, 1, n_rows, rows};
  };
  const BatchView one = view(1, &token, &pos, &seq, 1, &row);
  EXPECT_FALSE(b.begin_batch(one).is_ok());  // before reserve
  EXPECT_FALSE(b.copy_kv_block(0, 1).is_ok());
  EXPECT_FALSE(b.reserve(*config, RunShape{0, 16, 4, 2}).is_ok());
  EXPECT_FALSE(b.reserve(*config, RunShape{2, 16, 0, 2}).is_ok());
  ASSERT_TRUE(b.reserve(*config, RunShape{2, 16, 4, 2}).is_ok());
  EXPECT_TRUE(b.begin_batch(one).is_ok());

  auto refused = [&](BatchView batch, const char* what) {
    const Status s = b.begin_batch(batch);
    EXPECT_FALSE(s.is_ok()) << what;
    EXPECT_NE(s.message().find(what), std::string::npos) << s.message();
  };
  int32_t bad_token = int32_t(config->vocab_size), bad_pos = 16, bad_seq = 2, bad_row = 1;
  refused(view(1, &bad_token, &pos, &seq, 1, &row), "vocabulary");
  refused(view(1, &token, &bad_pos, &seq, 1, &row), "context");
  refused(view(1, &token, &pos, &bad_seq, 1, &row), "sequence id");
  refused(view(1, &token, &pos, &seq, 1, &bad_row), "logit row 1");
  std::vector<int32_t> five(5, 1), positions = {0, 1, 2, 3, 4}, seqs(5, 0);
  refused(view(5, five.data(), positions.data(), seqs.data(), 0, nullptr), "5 tokens");
  std::vector<int32_t> rows = {0, 1, 2};
  refused(view(3, five.data(), positions.data(), seqs.data(), 3, rows.data()), "logit rows");
  refused(view(0, &token, &pos, &seq, 0, nullptr), "0 tokens");

  EXPECT_TRUE(b.copy_kv_block(0, 1).is_ok());
  EXPECT_FALSE(b.copy_kv_block(0, 2).is_ok());
  EXPECT_FALSE(b.copy_kv_block(-1, 1).is_ok());
  const int32_t bad_tables[] = {0, 2};
  const Status outside =
      b.begin_batch(BatchView{1, &token, &pos, &bad_seq, bad_tables, 1, 0, nullptr});
  EXPECT_FALSE(outside.is_ok());
  int32_t second = 1;
  const Status bad_block =
      b.begin_batch(BatchView{1, &token, &pos, &second, bad_tables, 1, 0, nullptr});
  EXPECT_NE(bad_block.message().find("outside the pool"), std::string::npos) << bad_block.message();
  // A shape refused before anything is released leaves the previous reservation in place.
  EXPECT_FALSE(b.reserve(*config, RunShape{1, 0, 4, 1}).is_ok());
  EXPECT_TRUE(b.begin_batch(one).is_ok());
}

// start_argmax / finish_argmax (greedy decode run ahead): results in the order started, at most
// kArgmaxInFlight queued, and a batch takes its tokens from an argmax only right after one of
// its size was started.
TEST(BackendChecks, ArgmaxRunAheadIsCheckedAndKeepsOrder) {
  auto config = synthetic_config("tiny-qwen2");
  ASSERT_TRUE(config.is_ok());
  const std::unique_ptr<Backend> backend = make_cpu_backend(1);
  Backend& b = *backend;
  ASSERT_TRUE(b.reserve(*config, RunShape{2, 16, 4, 2}).is_ok());
  const int32_t tables[] = {0, 1};
  int32_t tokens[] = {1, 2}, positions[] = {0, 0}, seqs[] = {0, 1}, rows[] = {0, 1};
  const BatchView two{2, tokens, positions, seqs, tables, 1, 2, rows};
  ASSERT_TRUE(b.begin_batch(two).is_ok());
  const int64_t vocab = config->vocab_size;
  auto logits = b.scratch(2, vocab);
  ASSERT_TRUE(logits.is_ok());
  float* values = static_cast<float*>(logits->data);
  auto peak_at = [&](int32_t first, int32_t second) {
    std::fill(values, values + 2 * vocab, 0.0f);
    values[first] = 1.0f;
    values[vocab + second] = 1.0f;
  };
  std::vector<int32_t> out;
  EXPECT_NE(b.finish_argmax(&out).message().find("no argmax queued"), std::string::npos);
  peak_at(7, 9);
  ASSERT_TRUE(b.start_argmax(*logits).is_ok());
  peak_at(11, 3);
  ASSERT_TRUE(b.start_argmax(*logits).is_ok());
  EXPECT_NE(b.start_argmax(*logits).message().find("already queued"), std::string::npos);
  ASSERT_TRUE(b.finish_argmax(&out).is_ok());
  EXPECT_EQ(out, (std::vector<int32_t>{7, 9}));
  ASSERT_TRUE(b.finish_argmax(&out).is_ok());
  EXPECT_EQ(out, (std::vector<int32_t>{11, 3}));

  // The next batch takes the last argmax's rows as its tokens.
  BatchView fed = two;
  fed.tokens = nullptr;
  fed.tokens_from_argmax = true;
  EXPECT_TRUE(b.begin_batch(fed).is_ok());
  // Only once, right after it: the argmax fed the call before.
  EXPECT_NE(b.begin_batch(fed).message().find("no argmax was started"), std::string::npos);
  // Every row asks for its logits, in order.
  ASSERT_TRUE(b.start_argmax(*logits).is_ok());
  int32_t swapped[] = {1, 0};
  BatchView reordered = fed;
  reordered.logit_rows = swapped;
  EXPECT_NE(b.begin_batch(reordered).message().find("every row, in order"), std::string::npos);
  ASSERT_TRUE(b.finish_argmax(&out).is_ok());
  // And of the batch's size.
  ASSERT_TRUE(b.start_argmax(*logits).is_ok());
  BatchView one = fed;
  one.n_tokens = 1;
  one.n_logit_rows = 1;
  EXPECT_NE(b.begin_batch(one).message().find("that argmax has 2 rows"), std::string::npos);
  // A batch of host tokens drops what was queued and never finished.
  ASSERT_TRUE(b.start_argmax(*logits).is_ok());
  ASSERT_TRUE(b.begin_batch(two).is_ok());
  EXPECT_NE(b.finish_argmax(&out).message().find("no argmax queued"), std::string::npos);
}

TEST(BackendChecks, ReadRowsCopiesTheRowsAskedForInTheirOrder) {
  const std::unique_ptr<Backend> backend = make_cpu_backend(1);
  Backend& b = *backend;
  ASSERT_TRUE(b.reserve(ModelConfig{}, RunShape{1, 16, 4, 4}).is_ok());
  auto t = b.scratch(4, 5);
  ASSERT_TRUE(t.is_ok());
  float* values = static_cast<float*>(t->data);
  for (int i = 0; i < 20; ++i) values[i] = float(i);
  const int32_t rows[] = {3, 1, 2};
  std::vector<float> out(15, -1.0f);
  ASSERT_TRUE(b.read_rows(*t, rows, out.data()).is_ok());
  EXPECT_EQ(out, (std::vector<float>{15, 16, 17, 18, 19, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14}));
  // No rows: nothing is written.
  out.assign(15, -1.0f);
  ASSERT_TRUE(b.read_rows(*t, {}, out.data()).is_ok());
  EXPECT_EQ(out, std::vector<float>(15, -1.0f));
  // A row outside the tensor is refused before anything is copied.
  for (const int32_t bad : {4, -1}) {
    const int32_t outside[] = {0, bad};
    const Status s = b.read_rows(*t, outside, out.data());
    EXPECT_NE(s.message().find("read_rows of row " + std::to_string(bad) + " of a tensor of 4"),
              std::string::npos)
        << s.message();
    EXPECT_EQ(out, std::vector<float>(15, -1.0f));
  }
}

}  // namespace
}  // namespace kestrel
