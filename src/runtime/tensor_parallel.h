// One model split over several backends (model/shard.h), one thread per rank, in one process
// (docs/ARCHITECTURE.md, "Tensor parallelism"). The Engine holds one of these instead of a
// backend and a model when EngineOptions::tensor_parallel > 1.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "backend/communicator.h"
#include "model/forward.h"
#include "model/shard.h"

namespace kestrel {

// Threads of each rank's CPU backend when `threads` (0: all hardware threads) are shared by
// `ranks`; `threads` itself for one rank.
int threads_per_rank(int threads, int ranks);

class TensorParallel {
 public:
  // The model of `config` split over shards.size() ranks (load_model_shards, or shard_weights
  // of each shard_plan): rank i holds shards[i], runs on backends[i] and talks through comms[i]
  // (rank i of one group). Each rank uploads its shard on its own thread.
  static Result<std::unique_ptr<TensorParallel>> create(
      const ModelConfig& config, std::vector<ModelWeights> shards,
      std::vector<std::unique_ptr<Backend>> backends,
      std::vector<std::unique_ptr<Communicator>> comms);
  ~TensorParallel();
  TensorParallel(const TensorParallel&) = delete;
  TensorParallel& operator=(const TensorParallel&) = delete;

  int world_size() const { return int(backends_.size()); }
  Backend& backend(int rank) { return *backends_[size_t(rank)]; }
  const Backend& backend(int rank) const { return *backends_[size_t(rank)]; }
  const ModelWeights& shard(int rank) const { return shards_[size_t(rank)]; }
  const ShardPlan& plan(int rank) const { return plans_[size_t(rank)]; }
  // Every rank's weights together: what memory holds, what one decode step streams.
  size_t resident_bytes() const;
  size_t decode_bytes() const;

  // Each rank reserves `shape` for its shard (its KV heads, its scratch widths).
  Status reserve(const RunShape& shape);
  // Copies a KV cache block on every rank (each holds its KV heads of every block).
  Status copy_kv_block(int32_t src, int32_t dst);
  // forward() / forward_argmax() of the whole model (model/forward.h), every rank running its
  // shard: the logits are the ranks' vocabulary rows side by side; the argmax is each rank's
  // best (value, index), gathered, the largest value winning and the lowest index among ties.
  Status forward(const Batch& batch, const BlockTables& tables, std::vector<float>* logits);
  // With `logits`, also the logits of the logit rows `full_rows`, as model/forward.h's.
  Status forward_argmax(const Batch& batch, const BlockTables& tables, std::vector<int32_t>* tokens,
                        std::span<const int32_t> full_rows = {},
                        std::vector<float>* logits = nullptr);

 private:
  TensorParallel() = default;
  // Runs job(rank) on every rank's thread and waits for all of them. A rank that fails aborts
  // the group (the others return from their collectives); once all have returned the group is
  // reset, and the first failure (in rank order) is returned.
  Status on_every_rank(const std::function<Status(int rank)>& job);
  void rank_loop(int rank);
  // One forward call on every rank; `each` sees the rank's output tensor and its plan.
  Status run_forward(const Batch& batch, const BlockTables& tables,
                     const std::function<Status(int rank, Tensor out)>& each);

  int64_t vocab_ = 0;
  std::vector<std::unique_ptr<Backend>> backends_;
  std::vector<std::unique_ptr<Communicator>> comms_;
  std::vector<ShardPlan> plans_;
  std::vector<ModelWeights> shards_;

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<Status(int)>* job_ = nullptr;
  uint64_t job_number_ = 0;
  int running_ = 0;
  bool stopping_ = false;
  std::vector<Status> results_;
};

}  // namespace kestrel
