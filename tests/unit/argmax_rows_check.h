// Engine::run_argmax with some rows whole, as a server step asks for them, on any engine: three
// slots prefilled, then decode steps of one token a slot, each run twice, once with run() and
// once with every row's argmax and two rows whole (tests/unit and tests/cuda share it).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/argmax.h"
#include "io/config.h"
#include "kestrel/engine.h"

namespace kestrel::argmax_rows_check {

// synthetic:tiny-llama in sym_int4 on `device` with 3 slots of 128 positions (the device tests'
// engine for this check and for run ahead).
inline std::unique_ptr<Engine> tiny_three_slot_engine(const std::string& device,
                                                      bool run_ahead = false) {
  auto engine = Engine::create(EngineOptions{.model = "synthetic:tiny-llama",
                                             .format = WeightFormat::sym_int4,
                                             .device = device,
                                             .max_context = 128,
                                             .max_seqs = 3,
                                             .prefill_chunk = 32,
                                             .progress = false,
                                             .run_ahead = run_ahead,
                                             .run_shape = {}});
  EXPECT_TRUE(engine.is_ok()) << engine.status().message();
  return engine.is_ok() ? std::move(engine).value() : nullptr;
}

// `engine` has at least 3 slots of at least 40 positions; rows of its two calls of a step must
// agree within `bound` (relative to the row's largest magnitude).
inline void expect_rows_and_argmax_match_run(Engine& engine, double bound) {
  const int64_t vocab = engine.config().vocab_size;
  std::vector<int32_t> next;
  std::vector<int32_t> positions;
  for (int32_t slot = 0; slot < 3; ++slot) {
    const int32_t length = 5 + 4 * slot;
    Batch prompt;
    for (int32_t i = 0; i < length; ++i) {
      prompt.add(int32_t((7919 * (i + 1) + 31 * slot) % vocab), i, slot, i + 1 == length);
    }
    std::vector<float> logits;
    ASSERT_TRUE(engine.run(prompt, &logits).is_ok());
    next.push_back(argmax(logits.data(), vocab));
    positions.push_back(length);
  }
  for (int step = 0; step < 6; ++step) {
    // Two rows out of order, then a run of two (one copy on a device).
    const std::vector<int32_t> full_rows =
        step % 2 == 0 ? std::vector<int32_t>{2, 0} : std::vector<int32_t>{0, 1};
    SCOPED_TRACE("step " + std::to_string(step));
    Batch batch;
    for (int32_t slot = 0; slot < 3; ++slot) {
      batch.add(next[size_t(slot)], positions[size_t(slot)] + step, slot, true);
    }
    std::vector<float> all;
    ASSERT_TRUE(engine.run(batch, &all).is_ok());
    ASSERT_EQ(all.size(), size_t(3 * vocab));
    std::vector<int32_t> tokens;
    std::vector<float> rows(7, 1.0f);
    const Status s = engine.run_argmax(batch, &tokens, full_rows, &rows);
    ASSERT_TRUE(s.is_ok()) << s.message();
    ASSERT_EQ(tokens.size(), size_t(3));
    ASSERT_EQ(rows.size(), full_rows.size() * size_t(vocab));
    // Every row's token is the largest logit of run()'s row (within the bound: a device's two
    // calls may round differently), exactly row_argmax on the CPU.
    for (size_t r = 0; r < tokens.size(); ++r) {
      const float* want = all.data() + int64_t(r) * vocab;
      ASSERT_GE(tokens[r], 0);
      ASSERT_LT(tokens[r], vocab);
      float best = want[0], scale = 0;
      for (int64_t c = 0; c < vocab; ++c) {
        best = std::max(best, want[c]);
        scale = std::max(scale, std::fabs(want[c]));
      }
      EXPECT_GE(want[tokens[r]], best - float(bound) * scale) << "row " << r;
      if (bound == 0) {
        EXPECT_EQ(tokens[r], row_argmax(want, vocab)) << "row " << r;
      }
    }
    for (size_t i = 0; i < full_rows.size(); ++i) {
      const float* got = rows.data() + int64_t(i) * vocab;
      const float* want = all.data() + int64_t(full_rows[i]) * vocab;
      // The row whole is the one the call's argmax read.
      EXPECT_EQ(tokens[size_t(full_rows[i])], row_argmax(got, vocab)) << "row " << full_rows[i];
      float scale = 0, worst = 0;
      for (int64_t c = 0; c < vocab; ++c) {
        scale = std::max(scale, std::fabs(want[c]));
        worst = std::max(worst, std::fabs(got[c] - want[c]));
      }
      EXPECT_LE(worst, bound * scale) << "row " << full_rows[i];
    }
    next = tokens;
  }
  // A row that is not one of the batch's logit rows is refused.
  Batch one;
  one.add(next[0], positions[0] + 6, 0, true);
  std::vector<int32_t> tokens;
  std::vector<float> rows;
  const std::vector<int32_t> outside{1};
  const Status s = engine.run_argmax(one, &tokens, outside, &rows);
  EXPECT_NE(s.message().find("logits of row 1 of 1 logit rows"), std::string::npos) << s.message();
}

}  // namespace kestrel::argmax_rows_check
