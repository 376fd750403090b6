// Engine::run_argmax with some rows whole, as a server step asks for them, on any engine: three
// slots prefilled, then decode steps of one token a slot, each run twice, once with run() and
// once with every row's argmax and two rows whole (tests/unit and tests/cuda share it).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/argmax.h"
#include "io/config.h"
#include "kestrel/engine.h"
#include "sample/sampler.h"

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

// Prompts of length + slot * growth tokens (a step of `stride` through the vocabulary) into
// slots 0-2; each slot's next token (its last logits' argmax) and position.
inline void prefill_three_slots(Engine& engine, int32_t length, int32_t growth, int64_t stride,
                                std::vector<int32_t>* next, std::vector<int32_t>* positions) {
  const int64_t vocab = engine.config().vocab_size;
  for (int32_t slot = 0; slot < 3; ++slot) {
    const int32_t n = length + growth * slot;
    Batch prompt;
    for (int32_t i = 0; i < n; ++i) {
      prompt.add(int32_t((stride * (i + 1) + 31 * slot) % vocab), i, slot, i + 1 == n);
    }
    std::vector<float> logits;
    ASSERT_TRUE(engine.run(prompt, &logits).is_ok());
    next->push_back(argmax(logits.data(), vocab));
    positions->push_back(n);
  }
}

// `engine` has at least 3 slots of at least 40 positions; rows of its two calls of a step must
// agree within `bound` (relative to the row's largest magnitude).
inline void expect_rows_and_argmax_match_run(Engine& engine, double bound) {
  const int64_t vocab = engine.config().vocab_size;
  std::vector<int32_t> next;
  std::vector<int32_t> positions;
  ASSERT_NO_FATAL_FAILURE(prefill_three_slots(engine, 5, 4, 7919, &next, &positions));
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

// Engine::run_argmax with draws (RowDraw): in each decode step of three slots, rows 0 and 2
// are drawn (each with its own settings and uniform number) and every row is also read back
// whole in the same call, so each drawn token is Sampler::pick's on the very logits the draw
// saw, and row 1 keeps its argmax.
inline void expect_draws_match_pick(Engine& engine) {
  const int64_t vocab = engine.config().vocab_size;
  std::vector<int32_t> next;
  std::vector<int32_t> positions;
  ASSERT_NO_FATAL_FAILURE(prefill_three_slots(engine, 3, 2, 104729, &next, &positions));
  const std::vector<int32_t> all_rows = {0, 1, 2};
  for (int step = 0; step < 6; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    Batch batch;
    for (int32_t slot = 0; slot < 3; ++slot) {
      batch.add(next[size_t(slot)], positions[size_t(slot)] + step, slot, true);
    }
    std::vector<RowDraw> draws(2);
    draws[0].row = 2;
    draws[0].params.temperature = 0.8f + 0.1f * float(step);
    draws[0].params.top_p = step % 2 ? 0.9f : 1.0f;
    draws[0].vocab_size = int32_t(vocab);
    draws[0].u = (step + 0.5) / 6.0;
    draws[1].row = 0;
    draws[1].params.temperature = 1.3f;
    draws[1].params.top_k = 20 + step;
    draws[1].params.min_p = 0.02f;
    draws[1].vocab_size = int32_t(vocab);
    draws[1].u = 1.0 - (step + 1) / 7.0;
    std::vector<int32_t> tokens;
    std::vector<float> rows;
    const Status s = engine.run_argmax(batch, &tokens, all_rows, &rows, draws);
    ASSERT_TRUE(s.is_ok()) << s.message();
    ASSERT_EQ(tokens.size(), size_t(3));
    ASSERT_EQ(rows.size(), size_t(3 * vocab));
    auto row = [&](int32_t r) {
      return std::span<const float>(rows.data() + int64_t(r) * vocab, size_t(vocab));
    };
    for (const RowDraw& d : draws) {
      EXPECT_EQ(tokens[size_t(d.row)], Sampler::pick(row(d.row), d.params, d.vocab_size, d.u))
          << "row " << d.row;
    }
    EXPECT_EQ(tokens[1], row_argmax(row(1).data(), vocab));
    next = tokens;
  }
}

// Decode run ahead with draws (Engine::start_argmax with RowDraw): six decode steps of three
// slots, rows 0 and 2 drawn, run once in turn (run_argmax, each step fed the host's tokens) and
// once ahead (each step queued before the one before it is finished, fed its tokens on the
// device); both give the same tokens, so the step after a draw is fed the drawn token, not the
// row's argmax. `engine` is run_argmax's and start_argmax's (any engine of one backend).
inline void expect_drawn_steps_run_ahead_as_in_turn(Engine& engine) {
  const int64_t vocab = engine.config().vocab_size;
  constexpr int kSteps = 6;
  auto draws_of_step = [&](int step) {
    std::vector<RowDraw> draws(2);
    draws[0].row = 0;
    draws[0].params.temperature = 1.1f;
    draws[0].params.top_k = 30;
    draws[0].vocab_size = int32_t(vocab);
    draws[0].u = (step + 0.25) / kSteps;
    draws[1].row = 2;
    draws[1].params.temperature = 0.9f;
    draws[1].params.top_p = 0.95f;
    draws[1].vocab_size = int32_t(vocab);
    draws[1].u = 1.0 - (step + 0.5) / kSteps;
    return draws;
  };
  std::vector<std::vector<int32_t>> in_turn, ahead;
  std::vector<int32_t> positions;
  std::vector<int32_t> first;
  ASSERT_NO_FATAL_FAILURE(prefill_three_slots(engine, 4, 3, 65537, &first, &positions));
  std::vector<int32_t> next = first;
  for (int step = 0; step < kSteps; ++step) {
    Batch batch;
    for (int32_t slot = 0; slot < 3; ++slot) {
      batch.add(next[size_t(slot)], positions[size_t(slot)] + step, slot, true);
    }
    std::vector<int32_t> tokens;
    const Status s = engine.run_argmax(batch, &tokens, {}, nullptr, draws_of_step(step));
    ASSERT_TRUE(s.is_ok()) << s.message();
    in_turn.push_back(tokens);
    next = tokens;
  }
  // The same prompts again (their positions overwritten), then the steps run ahead.
  std::vector<int32_t> again;
  std::vector<int32_t> again_positions;
  ASSERT_NO_FATAL_FAILURE(prefill_three_slots(engine, 4, 3, 65537, &again, &again_positions));
  ASSERT_EQ(again, first);
  auto queue = [&](int step, bool from_argmax) {
    Batch batch;
    for (int32_t slot = 0; slot < 3; ++slot) {
      batch.add(from_argmax ? 0 : first[size_t(slot)], positions[size_t(slot)] + step, slot, true);
    }
    return engine.start_argmax(batch, from_argmax, draws_of_step(step));
  };
  Status s = queue(0, false);
  ASSERT_TRUE(s.is_ok()) << s.message();
  for (int step = 0; step < kSteps; ++step) {
    if (step + 1 < kSteps) {
      s = queue(step + 1, true);
      ASSERT_TRUE(s.is_ok()) << s.message();
    }
    std::vector<int32_t> tokens;
    s = engine.finish_argmax(&tokens);
    ASSERT_TRUE(s.is_ok()) << s.message();
    ahead.push_back(tokens);
  }
  EXPECT_EQ(ahead, in_turn);
  // The drawn rows were drawn: at least one drawn token that feeds a later step is not its row's
  // argmax (the steps run in turn once more, reading the rows whole).
  int not_argmax = 0;
  next = first;
  ASSERT_NO_FATAL_FAILURE(prefill_three_slots(engine, 4, 3, 65537, &again, &again_positions));
  for (int step = 0; step + 1 < kSteps; ++step) {
    Batch batch;
    for (int32_t slot = 0; slot < 3; ++slot) {
      batch.add(next[size_t(slot)], positions[size_t(slot)] + step, slot, true);
    }
    std::vector<float> logits;
    ASSERT_TRUE(engine.run(batch, &logits).is_ok());
    for (int32_t r : {0, 2}) {
      not_argmax +=
          in_turn[size_t(step)][size_t(r)] != row_argmax(logits.data() + r * vocab, vocab);
    }
    next = in_turn[size_t(step)];
  }
  EXPECT_GT(not_argmax, 0);
  // A draw of a row the step does not have is refused.
  Batch one;
  one.add(first[0], positions[0], 0, true);
  std::vector<RowDraw> outside = draws_of_step(0);
  s = engine.start_argmax(one, false, outside);
  EXPECT_NE(s.message().find("a draw from row 2 of 1 logit rows"), std::string::npos)
      << s.message();
}

}  // namespace kestrel::argmax_rows_check
