// The in-memory stand-in for a collective library: ranks are threads of one process and every
// collective goes through host memory. The CPU backend's tensors are host fp32, so CPU ranks
// use it whole; a device communicator (NCCL) reuses its barrier and host gather and does only
// the all-reduce on the device.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "backend/communicator.h"

namespace kestrel {

// What the ranks of one group share: a barrier that can be aborted, and a table where each rank
// publishes a host pointer for the others to read between two barriers.
class HostExchange {
 public:
  explicit HostExchange(int world_size);
  int world_size() const { return world_size_; }

  // Returns once all world_size ranks have arrived, or the abort status.
  Status arrive_and_wait();
  void abort(const Status& why);
  // Makes an aborted exchange usable again. Only while no rank is inside a call.
  void reset();

  // Rank `rank`'s pointer and value count for the collective in progress; read by the other
  // ranks only between the barrier after publishing and the next one.
  void publish(int rank, const float* data, int64_t n);
  const float* published(int rank) const { return slots_[size_t(rank)].data; }
  int64_t published_count(int rank) const { return slots_[size_t(rank)].n; }

 private:
  struct Slot {
    const float* data = nullptr;
    int64_t n = 0;
  };
  const int world_size_;
  std::vector<Slot> slots_;
  std::mutex mutex_;
  std::condition_variable changed_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool aborted_ = false;
  Status abort_status_;
};

// One rank of a group on a shared HostExchange. all_reduce_sum reads its tensor as host fp32
// (the CPU backend's activations); every rank sums the ranks' values in rank order, so all ranks
// hold bit-identical results and a run is reproducible whatever the threads' timing.
class HostCommunicator : public Communicator {
 public:
  HostCommunicator(std::shared_ptr<HostExchange> exchange, int rank);
  int rank() const override { return rank_; }
  int world_size() const override { return exchange_->world_size(); }
  std::string name() const override { return "host memory"; }
  Status all_reduce_sum(Tensor t) override;
  Status all_gather(const float* mine, int64_t n, float* all) override;
  Status barrier() override { return exchange_->arrive_and_wait(); }
  void abort(const Status& why) override { exchange_->abort(why); }
  Status reset() override;

 private:
  // Publishes this rank's `n` values, waits for every rank's and checks that they gave as many.
  Status publish_and_wait(const char* op, const float* data, int64_t n);

  std::shared_ptr<HostExchange> exchange_;
  const int rank_;
  std::vector<float> sum_;  // this rank's private copy of the sum, [rows * cols]
};

// `world_size` communicators of one group, rank i at index i.
std::vector<std::unique_ptr<Communicator>> make_host_communicators(int world_size);

}  // namespace kestrel
