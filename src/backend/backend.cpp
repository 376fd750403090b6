#include "backend/backend.h"

#include <filesystem>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/matmul.h"
#include "backend/cuda_module.h"

namespace kestrel {

namespace {
// Without a loaded NVIDIA driver the CUDA runtime reports "driver version is insufficient for
// CUDA runtime version", which sends users looking for a driver update; say what is true.
bool nvidia_driver_loaded() {
  std::error_code ec;
  return std::filesystem::exists("/proc/driver/nvidia/version", ec) ||
         std::filesystem::exists("/dev/nvidiactl", ec);
}
}  // namespace

Status Backend::reserve(const ModelConfig& config, const RunShape& shape) {
  if (shape.max_context <= 0 || shape.max_seqs <= 0 || shape.max_batch_tokens <= 0 ||
      shape.max_logit_rows < 0) {
    return Status::error(name() +
                         " backend: run shape needs positive context, sequences and tokens");
  }
  // The backend releases the previous reservation first: until this one succeeds, none holds.
  reserved_ = false;
  KS_RETURN_IF_ERROR(do_reserve(config, shape));
  reserved_ = true;
  reserved_vocab_ = config.vocab_size;
  reserved_shape_ = shape;
  return Status::ok();
}

Status Backend::copy_sequence(int32_t src, int32_t dst, int64_t n_positions) {
  if (!reserved_) return Status::error(name() + " backend: copy_sequence before reserve");
  const RunShape& shape = reserved_shape_;
  if (src < 0 || src >= shape.max_seqs || dst < 0 || dst >= shape.max_seqs) {
    return Status::error(name() + " backend: copy_sequence slots " + std::to_string(src) + " -> " +
                         std::to_string(dst) + " outside the " + std::to_string(shape.max_seqs) +
                         " reserved");
  }
  if (n_positions < 0 || n_positions > shape.max_context) {
    return Status::error(name() + " backend: copy_sequence of " + std::to_string(n_positions) +
                         " positions outside the context of " + std::to_string(shape.max_context));
  }
  return do_copy_sequence(src, dst, n_positions);
}

Status Backend::begin_batch(const BatchView& batch) {
  if (!reserved_) return Status::error(name() + " backend: begin_batch before reserve");
  const RunShape& shape = reserved_shape_;
  const int64_t n = batch.n_tokens;
  if (n <= 0 || n > shape.max_batch_tokens) {
    return Status::error(name() + " backend: batch of " + std::to_string(n) + " tokens (reserved " +
                         std::to_string(shape.max_batch_tokens) + ")");
  }
  if (batch.n_logit_rows < 0 || batch.n_logit_rows > shape.max_logit_rows) {
    return Status::error(name() + " backend: " + std::to_string(batch.n_logit_rows) +
                         " logit rows (reserved " + std::to_string(shape.max_logit_rows) + ")");
  }
  for (int64_t i = 0; i < n; ++i) {
    if (batch.seq_ids[i] < 0 || batch.seq_ids[i] >= shape.max_seqs) {
      return Status::error(name() + " backend: sequence id " + std::to_string(batch.seq_ids[i]) +
                           " outside the " + std::to_string(shape.max_seqs) + " reserved");
    }
    if (batch.positions[i] < 0 || batch.positions[i] >= shape.max_context) {
      return Status::error(name() + " backend: position " + std::to_string(batch.positions[i]) +
                           " outside the context of " + std::to_string(shape.max_context));
    }
    if (batch.tokens[i] < 0 || batch.tokens[i] >= reserved_vocab_) {
      return Status::error("token id " + std::to_string(batch.tokens[i]) +
                           " outside the vocabulary of " + std::to_string(reserved_vocab_));
    }
  }
  for (int64_t i = 0; i < batch.n_logit_rows; ++i) {
    if (batch.logit_rows[i] < 0 || batch.logit_rows[i] >= n) {
      return Status::error(name() + " backend: logit row " + std::to_string(batch.logit_rows[i]) +
                           " outside the batch of " + std::to_string(n) + " tokens");
    }
  }
  return do_begin_batch(batch);
}

Result<std::unique_ptr<Backend>> make_backend(const std::string& device, int threads) {
  if (device == "cpu") return make_cpu_backend(threads);
  if (device == "cuda") {
    if (!nvidia_driver_loaded()) {
      return Status::error(
          "device cuda: this machine has no CUDA device (no NVIDIA driver is loaded); use the "
          "cpu device");
    }
    return load_cuda_backend();
  }
  return Status::error("unknown device '" + device + "' (expected cpu or cuda)");
}

std::string default_device() {
  if (nvidia_driver_loaded() && !find_cuda_module().empty()) return "cuda";
  return "cpu";
}

std::string compiled_backends() {
  std::string list = std::string("cpu (") + cpu::matmul_isa() + ")";
  // Only whether the module is there: loading it would cost the start time it exists to save.
  const std::string module = find_cuda_module();
  if (!module.empty()) list += ", cuda (" + module + ", loaded when used)";
  return list;
}

}  // namespace kestrel
