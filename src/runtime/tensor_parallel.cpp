#include "runtime/tensor_parallel.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "kestrel/engine.h"

namespace kestrel {

int threads_per_rank(int threads, int ranks) {
  if (ranks <= 1) return threads;
  const int total = threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency()));
  return std::max(1, total / ranks);
}

Result<std::unique_ptr<TensorParallel>> TensorParallel::create(
    const ModelConfig& config, std::vector<ModelWeights> shards,
    std::vector<std::unique_ptr<Backend>> backends,
    std::vector<std::unique_ptr<Communicator>> comms) {
  const int world = int(backends.size());
  if (world < 1 || comms.size() != backends.size() || shards.size() != backends.size()) {
    return Status::error("tensor parallelism needs one shard, backend and communicator a rank");
  }
  for (int r = 0; r < world; ++r) {
    if (backends[size_t(r)] == nullptr || comms[size_t(r)] == nullptr ||
        comms[size_t(r)]->rank() != r || comms[size_t(r)]->world_size() != world) {
      return Status::error("tensor parallelism: rank " + std::to_string(r) +
                           " has no backend or a communicator of another rank or group");
    }
  }
  KS_RETURN_IF_ERROR(check_tensor_parallel(config, world, shards[0].format, shards[0].block));
  std::unique_ptr<TensorParallel> tp(new TensorParallel());
  tp->vocab_ = config.vocab_size;
  tp->backends_ = std::move(backends);
  tp->comms_ = std::move(comms);
  tp->shards_ = std::move(shards);
  tp->results_.resize(size_t(world));
  for (int r = 0; r < world; ++r) {
    tp->plans_.push_back(shard_plan(config, r, world));
    const ModelConfig want = shard_config(config, tp->plans_.back());
    const ModelConfig& got = tp->shards_[size_t(r)].config;
    if (got.n_heads != want.n_heads || got.n_kv_heads != want.n_kv_heads ||
        got.intermediate_size != want.intermediate_size || got.vocab_size != want.vocab_size) {
      return Status::error("tensor parallelism: shard " + std::to_string(r) + " is not rank " +
                           std::to_string(r) + " of " + std::to_string(world));
    }
  }
  for (int r = 0; r < world; ++r) tp->threads_.emplace_back([t = tp.get(), r] { t->rank_loop(r); });
  // On the rank's own thread: a device backend's upload goes to the device that thread uses.
  KS_RETURN_IF_ERROR(tp->on_every_rank(
      [&](int r) { return tp->backends_[size_t(r)]->upload(tp->shards_[size_t(r)]); }));
  return tp;
}

TensorParallel::~TensorParallel() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : threads_) t.join();
}

void TensorParallel::rank_loop(int rank) {
  uint64_t seen = 0;
  for (;;) {
    const std::function<Status(int)>* job = nullptr;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || job_number_ != seen; });
      if (stopping_) return;
      seen = job_number_;
      job = job_;
    }
    Status status = backends_[size_t(rank)]->use_on_this_thread();
    if (status.is_ok()) status = (*job)(rank);
    if (!status.is_ok()) comms_[size_t(rank)]->abort(status);
    std::lock_guard<std::mutex> lock(mutex_);
    results_[size_t(rank)] = status;
    if (--running_ == 0) done_.notify_all();
  }
}

Status TensorParallel::on_every_rank(const std::function<Status(int rank)>& job) {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = &job;
    running_ = world_size();
    ++job_number_;
    wake_.notify_all();
    done_.wait(lock, [&] { return running_ == 0; });
    job_ = nullptr;
  }
  for (int r = 0; r < world_size(); ++r) {
    if (results_[size_t(r)].is_ok()) continue;
    for (auto& comm : comms_) {
      const Status reset = comm->reset();
      if (!reset.is_ok()) {
        return Status::error(results_[size_t(r)].message() + " (then " + reset.message() + ")");
      }
    }
    return results_[size_t(r)];
  }
  return Status::ok();
}

size_t TensorParallel::resident_bytes() const {
  size_t total = 0;
  for (const ModelWeights& s : shards_) total += s.resident_bytes();
  return total;
}

size_t TensorParallel::decode_bytes() const {
  size_t total = 0;
  for (const ModelWeights& s : shards_) total += s.decode_bytes();
  return total;
}

Status TensorParallel::reserve(const RunShape& shape) {
  return on_every_rank(
      [&](int r) { return backends_[size_t(r)]->reserve(shards_[size_t(r)].config, shape); });
}

Status TensorParallel::copy_kv_block(int32_t src, int32_t dst) {
  return on_every_rank([&](int r) { return backends_[size_t(r)]->copy_kv_block(src, dst); });
}

Status TensorParallel::run_forward(const Batch& batch, const BlockTables& tables,
                                   const std::function<Status(int rank, Tensor out)>& each) {
  // Checked against the whole vocabulary here: shard_token() would send an id out of range to a
  // rank's zero row, and the ranks' own checks see only their local ids.
  for (size_t i = 0; i < batch.tokens.size(); ++i) {
    const int32_t token = batch.tokens[i];
    if (token < 0 || token >= vocab_) {
      return Status::error("token id " + std::to_string(token) + " at batch position " +
                           std::to_string(i) + " outside the vocabulary of " +
                           std::to_string(vocab_));
    }
  }
  // Every rank's begin_batch would make the same checks: made once here, so a bad batch fails
  // before any rank starts and no rank is left waiting in a collective for one that stopped.
  auto local_batch = [&](int r) {
    Batch local = batch;
    for (int32_t& token : local.tokens) token = shard_token(plans_[size_t(r)], token);
    return local;
  };
  const Batch first = local_batch(0);
  KS_RETURN_IF_ERROR(backends_[0]->check_batch(batch_view(first, tables)));
  return on_every_rank([&](int r) -> Status {
    const Batch local = r == 0 ? first : local_batch(r);
    KS_ASSIGN_OR_RETURN(Tensor out, forward_logits(*backends_[size_t(r)], shards_[size_t(r)], local,
                                                   tables, comms_[size_t(r)].get()));
    return each(r, out);
  });
}

Status TensorParallel::forward(const Batch& batch, const BlockTables& tables,
                               std::vector<float>* logits) {
  const int64_t rows = int64_t(batch.logit_rows.size());
  logits->assign(size_t(rows * vocab_), 0.0f);
  return run_forward(batch, tables, [&](int r, Tensor out) -> Status {
    if (rows == 0) return Status::ok();
    const ShardPlan& plan = plans_[size_t(r)];
    std::vector<float> local(size_t(out.rows * out.cols));  // [rows, plan.vocab + 1]
    KS_RETURN_IF_ERROR(backends_[size_t(r)]->read(out, local.data()));
    // The gather: each rank writes its own columns of the shared host result.
    for (int64_t row = 0; row < rows; ++row) {
      std::copy_n(local.data() + row * out.cols, plan.real_vocab,
                  logits->data() + row * vocab_ + plan.first_token);
    }
    return Status::ok();
  });
}

Status TensorParallel::forward_argmax(const Batch& batch, const BlockTables& tables,
                                      std::vector<int32_t>* tokens,
                                      std::span<const int32_t> full_rows,
                                      std::vector<float>* logits) {
  const int64_t rows = int64_t(batch.logit_rows.size());
  tokens->assign(size_t(rows), 0);
  if (logits != nullptr) logits->assign(full_rows.size() * size_t(vocab_), 0.0f);
  return run_forward(batch, tables, [&](int r, Tensor out) -> Status {
    if (rows == 0) return Status::ok();
    const ShardPlan& plan = plans_[size_t(r)];
    std::vector<float> local(size_t(out.rows * out.cols));  // [rows, plan.vocab + 1]
    KS_RETURN_IF_ERROR(backends_[size_t(r)]->read(out, local.data()));
    // The rows asked for whole: each rank writes its own columns, as forward() does.
    for (size_t i = 0; logits != nullptr && i < full_rows.size(); ++i) {
      std::copy_n(local.data() + int64_t(full_rows[i]) * out.cols, plan.real_vocab,
                  logits->data() + int64_t(i) * vocab_ + plan.first_token);
    }
    // [rows, 2]: this rank's best value and its token id (exact in fp32: ids < 2^24).
    std::vector<float> best(size_t(rows * 2));
    for (int64_t row = 0; row < rows; ++row) {
      const float* values = local.data() + row * out.cols;
      const int32_t i = plan.real_vocab > 0 ? argmax(values, plan.real_vocab) : 0;
      // A rank without vocabulary rows offers NaN, which never wins (its token is past the
      // vocabulary).
      best[size_t(2 * row)] = plan.real_vocab > 0 ? values[i] : NAN;
      best[size_t(2 * row + 1)] = float(plan.first_token + i);
    }
    std::vector<float> all(size_t(world_size() * rows * 2));  // [world, rows, 2]
    KS_RETURN_IF_ERROR(comms_[size_t(r)]->all_gather(best.data(), rows * 2, all.data()));
    if (r != 0) return Status::ok();
    for (int64_t row = 0; row < rows; ++row) {
      // Ranks hold increasing token ids: a later rank wins only with a larger value (or over a
      // rank that had nothing but NaN: argmax()'s rule for the whole row).
      float value = all[size_t(2 * row)];
      int32_t token = int32_t(all[size_t(2 * row + 1)]);
      for (int q = 1; q < world_size(); ++q) {
        const float* pair = all.data() + (int64_t(q) * rows + row) * 2;
        if (pair[0] > value || (std::isnan(value) && !std::isnan(pair[0]))) {
          value = pair[0];
          token = int32_t(pair[1]);
        }
      }
      (*tokens)[size_t(row)] = token;
    }
    return Status::ok();
  });
}

}  // namespace kestrel
