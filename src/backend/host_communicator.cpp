#include "backend/host_communicator.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace kestrel {

HostExchange::HostExchange(int world_size)
    : world_size_(world_size), slots_(size_t(std::max(world_size, 1))) {}

Status HostExchange::arrive_and_wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (aborted_) return abort_status_;
  const uint64_t generation = generation_;
  if (++arrived_ == world_size_) {
    arrived_ = 0;
    ++generation_;
    changed_.notify_all();
    return Status::ok();
  }
  changed_.wait(lock, [&] { return generation_ != generation || aborted_; });
  // A barrier every rank reached before the abort still counts as passed.
  if (generation_ != generation) return Status::ok();
  return abort_status_;
}

void HostExchange::abort(const Status& why) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (aborted_) return;
  aborted_ = true;
  abort_status_ = why.is_ok() ? Status::error("tensor-parallel group aborted") : why;
  changed_.notify_all();
}

void HostExchange::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  aborted_ = false;
  abort_status_ = Status::ok();
  arrived_ = 0;
  for (Slot& slot : slots_) slot = Slot{};
}

void HostExchange::publish(int rank, const float* data, int64_t n) {
  slots_[size_t(rank)] = Slot{data, n};
}

HostCommunicator::HostCommunicator(std::shared_ptr<HostExchange> exchange, int rank)
    : exchange_(std::move(exchange)), rank_(rank) {}

Status HostCommunicator::publish_and_wait(const char* op, const float* data, int64_t n) {
  exchange_->publish(rank_, data, n);
  KS_RETURN_IF_ERROR(exchange_->arrive_and_wait());
  // Every rank sees the same counts, so all of them agree on this error and none waits for
  // another at the collective's second barrier.
  for (int r = 0; r < world_size(); ++r) {
    if (exchange_->published_count(r) != n) {
      return Status::error(std::string(op) + ": rank " + std::to_string(r) + " gave " +
                           std::to_string(exchange_->published_count(r)) + " values, rank " +
                           std::to_string(rank_) + " " + std::to_string(n));
    }
  }
  return Status::ok();
}

Status HostCommunicator::all_reduce_sum(Tensor t) {
  const int64_t n = t.rows * t.cols;
  float* mine = static_cast<float*>(t.data);
  KS_RETURN_IF_ERROR(publish_and_wait("all_reduce_sum", mine, n));
  // Summed into a private buffer in rank order (the same order on every rank, hence the same
  // bits); the ranks' tensors are written only after everyone has read them.
  sum_.assign(size_t(n), 0.0f);
  for (int r = 0; r < world_size(); ++r) {
    const float* values = exchange_->published(r);
    for (int64_t i = 0; i < n; ++i) sum_[size_t(i)] += values[i];
  }
  KS_RETURN_IF_ERROR(exchange_->arrive_and_wait());
  if (n > 0) std::memcpy(mine, sum_.data(), size_t(n) * sizeof(float));
  return Status::ok();
}

Status HostCommunicator::all_gather(const float* mine, int64_t n, float* all) {
  KS_RETURN_IF_ERROR(publish_and_wait("all_gather", mine, n));
  for (int r = 0; r < world_size(); ++r) {
    if (n > 0)
      std::memcpy(all + int64_t(r) * n, exchange_->published(r), size_t(n) * sizeof(float));
  }
  return exchange_->arrive_and_wait();
}

Status HostCommunicator::reset() {
  exchange_->reset();
  return Status::ok();
}

std::vector<std::unique_ptr<Communicator>> make_host_communicators(int world_size) {
  auto exchange = std::make_shared<HostExchange>(world_size);
  std::vector<std::unique_ptr<Communicator>> ranks;
  for (int r = 0; r < world_size; ++r) {
    ranks.push_back(std::make_unique<HostCommunicator>(exchange, r));
  }
  return ranks;
}

}  // namespace kestrel
