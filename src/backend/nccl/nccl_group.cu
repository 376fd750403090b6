// NCCL between the GPUs of one host: the communicator of a model split over CUDA backends, one
// rank per device, every rank a thread of this process (docs/ARCHITECTURE.md, "Tensor
// parallelism"). Built into the CUDA module only when CMake finds NCCL (KESTREL_NCCL); the
// module then exports kestrel_cuda_module_create_group (backend/cuda_module.h).
#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda_module.h"
#include "backend/host_communicator.h"

namespace kestrel {
namespace {

Status nccl_check(const char* what, ncclResult_t result) {
  if (result == ncclSuccess) return Status::ok();
  return Status::error(std::string("nccl ") + what + ": " + ncclGetErrorString(result));
}

// The NCCL communicators of one group. Aborting is group-wide: a rank that failed mid-step
// leaves the others inside an all-reduce kernel that waits for it, which only ncclCommAbort of
// every communicator ends.
class NcclGroup {
 public:
  explicit NcclGroup(std::vector<ncclComm_t> comms) : comms_(std::move(comms)) {}
  ~NcclGroup() {
    for (ncclComm_t c : comms_) {
      if (c != nullptr) ncclCommDestroy(c);
    }
  }
  ncclComm_t comm(int rank) const { return aborted_ ? nullptr : comms_[size_t(rank)]; }
  bool aborted() const { return aborted_; }
  void abort() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (aborted_) return;
    aborted_ = true;
    for (ncclComm_t& c : comms_) {
      ncclCommAbort(c);
      c = nullptr;
    }
  }

 private:
  std::vector<ncclComm_t> comms_;
  std::mutex mutex_;
  std::atomic<bool> aborted_{false};
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(std::shared_ptr<NcclGroup> group, std::shared_ptr<HostExchange> exchange,
                   cudaStream_t stream, int rank)
      : group_(std::move(group)), host_(std::move(exchange), rank), stream_(stream), rank_(rank) {}
  int rank() const override { return rank_; }
  int world_size() const override { return host_.world_size(); }
  std::string name() const override { return "nccl"; }

  // fp32 activations summed in place, enqueued on the rank's backend stream: ordered after the
  // op that produced them, and captured into the backend's decode graph with the step.
  Status all_reduce_sum(Tensor t) override {
    const ncclComm_t comm = group_->comm(rank_);
    if (comm == nullptr) return Status::error("nccl: the group was aborted after an error");
    return nccl_check("all_reduce", ncclAllReduce(t.data, t.data, size_t(t.rows * t.cols),
                                                  ncclFloat, ncclSum, comm, stream_));
  }
  // Host values of threads of one process: shared memory is the transport.
  Status all_gather(const float* mine, int64_t n, float* all) override {
    return host_.all_gather(mine, n, all);
  }
  Status barrier() override { return host_.barrier(); }
  void abort(const Status& why) override {
    host_.abort(why);
    group_->abort();
  }
  Status reset() override {
    KS_RETURN_IF_ERROR(host_.reset());
    if (group_->aborted()) {
      return Status::error("the NCCL group was aborted; load the model again");
    }
    return Status::ok();
  }

 private:
  std::shared_ptr<NcclGroup> group_;
  HostCommunicator host_;
  cudaStream_t stream_;
  const int rank_;
};

Result<DeviceGroup> create_group(int world) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    return Status::error(std::string("no CUDA device (CUDA runtime: ") +
                         (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") + ")");
  }
  if (world < 1 || world > count) {
    return Status::error("tensor parallelism over " + std::to_string(world) +
                         " GPUs, but this machine has " + std::to_string(count));
  }
  DeviceGroup group;
  std::vector<int> devices;
  for (int d = 0; d < world; ++d) {
    KS_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, make_cuda_backend_on(d));
    group.backends.push_back(std::move(backend));
    devices.push_back(d);
  }
  // NVLink SHARP (multicast) can take the host's GPUs out of service when it fails; Kestrel's
  // all-reduces are small enough that the ring and tree algorithms serve them.
  setenv("NCCL_NVLS_ENABLE", "0", 1);
  std::vector<ncclComm_t> comms(size_t(world), nullptr);
  KS_RETURN_IF_ERROR(nccl_check("init", ncclCommInitAll(comms.data(), world, devices.data())));
  auto nccl = std::make_shared<NcclGroup>(std::move(comms));
  auto exchange = std::make_shared<HostExchange>(world);
  for (int r = 0; r < world; ++r) {
    auto* stream = static_cast<cudaStream_t>(cuda::backend_stream(*group.backends[size_t(r)]));
    group.comms.push_back(std::make_unique<NcclCommunicator>(nccl, exchange, stream, r));
  }
  return Result<DeviceGroup>(std::move(group));
}

}  // namespace
}  // namespace kestrel

extern "C" __attribute__((visibility("default"))) void kestrel_cuda_module_create_group(
    int world, kestrel::Result<kestrel::DeviceGroup>* out) {
  *out = kestrel::create_group(world);
}
