#include "backend/backend.h"
#include <cstdlib>

#include <algorithm>
#include <filesystem>

#include "backend/communicator.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/matmul.h"
#include "backend/cuda_module.h"
#include "sample/sampler.h"
#if defined(KESTREL_HAVE_VULKAN)
#include "backend/vulkan/vulkan_backend.h"
#endif

namespace kestrel {

Status Backend::all_reduce_sum(Tensor t, Communicator& comm) {
  return comm.all_reduce_sum(t);
}

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
  // Nothing queued before survives the new reservation's buffers.
  argmax_finished_ = argmax_started_;
  feed_rows_ = -1;
  return Status::ok();
}

Status Backend::copy_kv_block(int32_t src, int32_t dst) {
  if (!reserved_) return Status::error(name() + " backend: copy_kv_block before reserve");
  KS_RETURN_IF_ERROR(check_kv_block_copy(src, dst, reserved_shape_, name() + " backend"));
  return do_copy_kv_block(src, dst);
}

Status Backend::begin_batch(const BatchView& batch) {
  const int64_t feed_rows = feed_rows_;
  feed_rows_ = -1;  // an argmax feeds the call right after it, or none
  if (!batch.tokens_from_argmax) {
    // Nothing queued is waited for any more (a run ahead that stopped early, or an error).
    argmax_finished_ = argmax_started_;
    KS_RETURN_IF_ERROR(check_batch(batch));
    return do_begin_batch(batch);
  }
  if (feed_rows < 0 || feed_rows != batch.n_tokens) {
    return Status::error(name() + " backend: a batch of " + std::to_string(batch.n_tokens) +
                         " tokens from the argmax before it, but " +
                         (feed_rows < 0
                              ? std::string("no argmax was started since the last call")
                              : "that argmax has " + std::to_string(feed_rows) + " rows"));
  }
  if (!logits_of_every_row(batch)) {
    return Status::error(name() +
                         " backend: a batch run ahead (tokens from the argmax before it) must "
                         "ask for the logits of every row, in order");
  }
  if (feed_cols_ > reserved_vocab_) {
    return Status::error(name() + " backend: tokens from an argmax over " +
                         std::to_string(feed_cols_) + " columns, past the vocabulary of " +
                         std::to_string(reserved_vocab_));
  }
  if (argmax_on_device()) {
    KS_RETURN_IF_ERROR(check_batch(batch));
    return do_begin_batch(batch);
  }
  // The default halves computed the rows on the host already: they are the tokens.
  BatchView view = batch;
  view.tokens = argmax_host_[(argmax_started_ - 1) % kArgmaxInFlight].data();
  view.tokens_from_argmax = false;
  KS_RETURN_IF_ERROR(check_batch(view));
  return do_begin_batch(view);
}

Status Backend::start_argmax(Tensor t, std::span<const RowDraw> draws) {
  if (argmax_started_ - argmax_finished_ >= kArgmaxInFlight) {
    return Status::error(name() + " backend: start_argmax with " + std::to_string(kArgmaxInFlight) +
                         " already queued (finish_argmax first)");
  }
  if (t.rows <= 0 || t.cols <= 0) {
    return Status::error(name() + " backend: start_argmax of an empty tensor");
  }
  KS_ASSIGN_OR_RETURN(std::vector<RowDraw> checked, checked_draws(t, draws));
  const int slot = int(argmax_started_ % kArgmaxInFlight);
  KS_RETURN_IF_ERROR(do_start_argmax(t, slot, checked));
  argmax_slot_rows_[slot] = t.rows;
  ++argmax_started_;
  feed_rows_ = t.rows;
  feed_cols_ = t.cols;
  return Status::ok();
}

Status Backend::finish_argmax(std::vector<int32_t>* out) {
  if (argmax_finished_ == argmax_started_) {
    return Status::error(name() + " backend: finish_argmax with no argmax queued");
  }
  const int slot = int(argmax_finished_ % kArgmaxInFlight);
  out->resize(size_t(argmax_slot_rows_[slot]));
  ++argmax_finished_;  // an error leaves it finished: its rows are lost either way
  return do_finish_argmax(slot, out->data());
}

Status Backend::read_rows(Tensor t, std::span<const int32_t> rows, float* host) {
  for (const int32_t r : rows) {
    if (r < 0 || r >= t.rows) {
      return Status::error(name() + " backend: read_rows of row " + std::to_string(r) +
                           " of a tensor of " + std::to_string(t.rows) + " rows");
    }
  }
  if (rows.empty()) return Status::ok();
  return do_read_rows(t, rows, host);
}

Status Backend::do_read_rows(Tensor t, std::span<const int32_t> rows, float* host) {
  std::vector<float> values(size_t(t.rows * t.cols));
  KS_RETURN_IF_ERROR(read(t, values.data()));
  for (size_t i = 0; i < rows.size(); ++i) {
    std::copy_n(values.data() + int64_t(rows[i]) * t.cols, t.cols, host + int64_t(i) * t.cols);
  }
  return Status::ok();
}

Status Backend::pick_rows(Tensor t, std::span<const RowDraw> draws, int32_t* out) {
  KS_ASSIGN_OR_RETURN(std::vector<RowDraw> checked, checked_draws(t, draws));
  if (t.rows == 0) return Status::ok();
  return do_pick_rows(t, checked, out);
}

Result<std::vector<RowDraw>> Backend::checked_draws(Tensor t,
                                                    std::span<const RowDraw> draws) const {
  // The settings as a Sampler applies them (a device kernel takes them as they come).
  std::vector<RowDraw> checked(draws.begin(), draws.end());
  std::vector<uint8_t> drawn(size_t(std::max<int64_t>(t.rows, 0)), 0);
  for (RowDraw& d : checked) {
    const std::string which = name() + " backend: a draw of row " + std::to_string(d.row);
    if (d.row < 0 || d.row >= t.rows) {
      return Status::error(which + " of a tensor of " + std::to_string(t.rows) + " rows");
    }
    if (drawn[size_t(d.row)]++ != 0) return Status::error(which + " twice");
    d.params = Sampler::normalized(d.params);
    if (Sampler::is_greedy(d.params)) {
      return Status::error(which + " with greedy settings (its argmax is the token)");
    }
    if (!(d.u >= 0 && d.u < 1)) return Status::error(which + " with u outside [0, 1)");
  }
  return checked;
}

Status Backend::do_pick_rows(Tensor t, std::span<const RowDraw> draws, int32_t* out) {
  KS_RETURN_IF_ERROR(argmax_rows(t, out));
  if (draws.empty()) return Status::ok();
  std::vector<int32_t> rows;
  for (const RowDraw& d : draws) rows.push_back(d.row);
  std::vector<float> values(draws.size() * size_t(t.cols));
  KS_RETURN_IF_ERROR(do_read_rows(t, rows, values.data()));
  for (size_t i = 0; i < draws.size(); ++i) {
    const std::span<const float> row(values.data() + i * size_t(t.cols), size_t(t.cols));
    out[draws[i].row] = Sampler::pick(row, draws[i].params, draws[i].vocab_size, draws[i].u);
  }
  return Status::ok();
}

Status Backend::do_start_argmax(Tensor t, int slot, std::span<const RowDraw> draws) {
  std::vector<int32_t>& rows = argmax_host_[slot];
  rows.resize(size_t(t.rows));
  return do_pick_rows(t, draws, rows.data());
}

Status Backend::do_finish_argmax(int slot, int32_t* out) {
  std::copy(argmax_host_[slot].begin(), argmax_host_[slot].end(), out);
  return Status::ok();
}

Status Backend::check_batch(const BatchView& batch) const {
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
  KS_RETURN_IF_ERROR(check_batch_slots(batch, shape, name() + " backend"));
  // Tokens left on the device by an argmax are in range by construction (begin_batch checks
  // that argmax's width against the vocabulary).
  for (int64_t i = 0; i < n && !batch.tokens_from_argmax; ++i) {
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
  return Status::ok();
}

bool logits_of_every_row(const BatchView& batch) {
  if (batch.n_logit_rows != batch.n_tokens) return false;
  for (int64_t i = 0; i < batch.n_logit_rows; ++i) {
    if (batch.logit_rows[i] != i) return false;
  }
  return true;
}

Status check_batch_slots(const BatchView& batch, const RunShape& shape, const std::string& who) {
  // The highest position each slot reaches in the call: its table entries up to that one are
  // read.
  std::vector<int32_t> last_position(size_t(shape.max_seqs), -1);
  for (int64_t i = 0; i < batch.n_tokens; ++i) {
    const int32_t seq = batch.seq_ids[i];
    const int32_t pos = batch.positions[i];
    if (seq < 0 || seq >= shape.max_seqs) {
      return Status::error(who + ": sequence id " + std::to_string(seq) + " outside the " +
                           std::to_string(shape.max_seqs) + " reserved");
    }
    if (pos < 0 || pos >= shape.max_context) {
      return Status::error(who + ": position " + std::to_string(pos) + " outside the context of " +
                           std::to_string(shape.max_context));
    }
    last_position[size_t(seq)] = std::max(last_position[size_t(seq)], pos);
  }
  if (batch.n_tokens > 0 &&
      (batch.block_tables == nullptr || batch.block_table_stride < shape.blocks_per_seq())) {
    return Status::error(who + ": the batch has no block table of " +
                         std::to_string(shape.blocks_per_seq()) + " entries a slot");
  }
  const int64_t n_blocks = shape.pool_blocks();
  for (int64_t seq = 0; seq < shape.max_seqs; ++seq) {
    const int32_t* table = batch.block_tables + seq * batch.block_table_stride;
    for (int64_t b = 0;
         b <= int64_t(last_position[size_t(seq)]) / kKvBlockSize && last_position[size_t(seq)] >= 0;
         ++b) {
      if (table[b] < 0 || table[b] >= n_blocks) {
        return Status::error(who + ": block table entry " + std::to_string(b) + " of slot " +
                             std::to_string(seq) + " is " + std::to_string(table[b]) +
                             ", outside the pool of " + std::to_string(n_blocks) + " blocks");
      }
    }
  }
  return Status::ok();
}

Status check_kv_block_copy(int32_t src, int32_t dst, const RunShape& shape,
                           const std::string& who) {
  const int64_t n_blocks = shape.pool_blocks();
  if (src >= 0 && src < n_blocks && dst >= 0 && dst < n_blocks) return Status::ok();
  return Status::error(who + ": copy_kv_block " + std::to_string(src) + " -> " +
                       std::to_string(dst) + " outside the pool of " + std::to_string(n_blocks) +
                       " blocks");
}

Result<std::unique_ptr<Backend>> make_backend(const std::string& device, int threads) {
  if (device == "auto") return make_backend(default_device(), threads);
  if (device == "cpu") return make_cpu_backend(threads);
  if (device == "cuda") {
    if (!nvidia_driver_loaded()) {
      return Status::error(
          "device cuda: this machine has no CUDA device (no NVIDIA driver is loaded); use the "
          "cpu device");
    }
    return load_cuda_backend();
  }
  if (device == "vulkan" || device.rfind("vulkan:", 0) == 0) {
#if defined(KESTREL_HAVE_VULKAN)
    return make_vulkan_backend(device);
#else
    return Status::error("device " + device +
                         ": this build of Kestrel has no Vulkan backend (it was built without "
                         "the Vulkan headers or glslc)");
#endif
  }
  const char* env = std::getenv("KESTREL_DEVICE");
  const bool from_env = env != nullptr && device == env;
  return Status::error("unknown device '" + device + "'" +
                       (from_env ? " (from the environment variable KESTREL_DEVICE)" : "") +
                       " (expected auto, cpu, cuda, vulkan or vulkan:N)");
}

std::string default_device() {
  // KESTREL_DEVICE picks what "auto" means (the CPU test suite pins it to cpu on GPU machines);
  // a device named on the command line still wins.
  if (const char* env = std::getenv("KESTREL_DEVICE");
      env != nullptr && *env != '\0' && std::string(env) != "auto") {
    return env;
  }
  if (nvidia_driver_loaded() && !find_cuda_module().empty()) return "cuda";
  return "cpu";
}

std::string compiled_backends() {
  std::string list = std::string("cpu (") + cpu::matmul_isa() + ")";
  // Only whether the module is there: loading it would cost the start time it exists to save.
  const std::string module = find_cuda_module();
  if (!module.empty()) list += ", cuda (" + module + ", loaded when used)";
#if defined(KESTREL_HAVE_VULKAN)
  list += ", vulkan (through libvulkan.so.1, loaded when used)";
#endif
  return list;
}

std::vector<std::string> list_devices() {
  std::vector<std::string> lines = {std::string("cpu  ") + cpu::matmul_isa()};
  const std::string module = find_cuda_module();
  if (module.empty()) {
    lines.push_back("cuda: not built into this binary (no libkestrel_cuda.so)");
  } else if (!nvidia_driver_loaded()) {
    lines.push_back("cuda: no NVIDIA driver is loaded");
  } else {
    auto backend = load_cuda_backend();
    lines.push_back(backend.is_ok() ? "cuda  " + (*backend)->name()
                                    : "cuda: " + backend.status().message());
  }
#if defined(KESTREL_HAVE_VULKAN)
  auto vulkan = describe_vulkan_devices();
  if (!vulkan.is_ok()) {
    lines.push_back("vulkan: " + vulkan.status().message());
  } else if (vulkan->empty()) {
    lines.push_back("vulkan: the Vulkan loader found no device");
  } else {
    lines.insert(lines.end(), vulkan->begin(), vulkan->end());
  }
#else
  lines.push_back("vulkan: not built into this binary (no Vulkan headers or glslc at build time)");
#endif
  return lines;
}

}  // namespace kestrel
