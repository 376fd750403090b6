// The collectives a tensor-parallel forward pass needs between its ranks (one rank per device,
// one thread per rank, one process: docs/ARCHITECTURE.md, "Tensor parallelism"). The model code
// sees only this interface; the in-memory stand-in (host_communicator.h) and NCCL implement it.
#pragma once

#include <cstdint>
#include <string>

#include "backend/backend.h"
#include "core/status.h"

namespace kestrel {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual std::string name() const = 0;

  // Sums `t` [rows, cols] element by element over the ranks, in place: every rank's `t` (a
  // scratch tensor of this rank's backend, the same shape on every rank) ends holding the same
  // sum. Every rank must call it, in the same order of calls.
  virtual Status all_reduce_sum(Tensor t) = 0;
  // Every rank gives `n` values of host memory; `all` [world_size, n] receives them in rank
  // order on every rank.
  virtual Status all_gather(const float* mine, int64_t n, float* all) = 0;
  // Returns once every rank has called it.
  virtual Status barrier() = 0;
  // Makes every call now waiting, on every rank, and every later one fail with `why`: a rank
  // that fails between two collectives would otherwise leave the others waiting for it forever.
  virtual void abort(const Status& why) = 0;
  // Makes an aborted communicator usable again, called on every rank once no rank is inside a
  // call (the caller has joined them): the next forward call starts from a clean state.
  virtual Status reset() = 0;
};

}  // namespace kestrel
