// The ops the model is written against. Each backend implements them; the CPU backend is the
// numerical reference for every other. Nothing here names a device API: tensors are opaque
// pointers into memory the backend owns.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "backend/workspace.h"
#include "core/argmax.h"
#include "core/status.h"
#include "kestrel/engine.h"
#include "kestrel/sampling.h"
#include "kestrel/types.h"
#include "model/weights.h"

namespace kestrel {

class Communicator;

// A 2-D activation tensor, row-major [rows, cols], in the backend's activation type.
struct Tensor {
  void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
};

// The tokens of one forward call (host memory; device backends copy it in begin_batch).
struct BatchView {
  int64_t n_tokens = 0;
  const int32_t* tokens = nullptr;     // [n_tokens]
  const int32_t* positions = nullptr;  // [n_tokens] position of each token in its sequence
  const int32_t* seq_ids = nullptr;    // [n_tokens] sequence slot of each token
  // [max_seqs, block_table_stride] the KV cache block of each slot's positions
  // [kKvBlockSize b, kKvBlockSize (b + 1)) at entry b; the entry of every position a token writes
  // or reads must be a block of the pool (begin_batch checks it). Blocks may repeat across slots
  // (shared prefixes): a call writes only blocks no other slot of the call reads.
  const int32_t* block_tables = nullptr;
  int64_t block_table_stride = 0;
  // The rows whose logits the call will produce (a device backend keys its captured decode
  // graphs on them); empty when the call ends without logits.
  int64_t n_logit_rows = 0;
  const int32_t* logit_rows = nullptr;  // [n_logit_rows]
  // Greedy decode run ahead: token i is row i of the argmax that start_argmax queued last, which
  // has n_tokens rows, instead of tokens[i] (ignored). The call may begin before that argmax has
  // come back to the host: a device backend leaves it on the device for the call's embed.
  bool tokens_from_argmax = false;
};

// The memory-bandwidth ceiling a decode step is measured against, and where the figure comes
// from (a measurement on this machine, or a documented figure).
struct Roofline {
  double bandwidth_gbs = 0;  // 0: unknown
  std::string source;
};

// The matrix rate a prompt's products can reach on a backend, for the benchmark's prompt rows of
// integer-format weights: TFLOP/s (1e12 operations, two a multiply-add) of the arithmetic its
// prefill of those weights uses. 0: unknown.
struct MatrixRate {
  double tflops = 0;
  std::string source;
};

struct RopeParams {
  int64_t head_dim = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
};

// The per-token scratch a decoder layer works in: [n, hidden] normed and proj, [n, q_dim] q and
// attn, [n, kv_dim] k and v, [n, intermediate] gate and up (forward_scratch's tensors).
struct LayerScratch {
  Tensor normed, q, k, v, attn, proj, gate, up;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // Makes the calling thread ready to call this backend: a device backend makes its device
  // current (a model split over several devices calls each from its own thread).
  virtual Status use_on_this_thread() { return Status::ok(); }

  // Makes the weights usable by this backend (one upload; CPU uses them in place).
  virtual Status upload(ModelWeights& weights) = 0;

  // --- Checked entry points. Not virtual: each checks its arguments against the reservation,
  // once for every backend, and only then calls the backend's op (do_reserve, do_copy_kv_block,
  // do_begin_batch below), which may rely on what was checked.

  // Allocates the KV cache and the activation workspace for `shape` (positive context,
  // sequences and tokens per call). May be called again with another shape; the previous
  // reservation is released first, so the peak is one reservation.
  Status reserve(const ModelConfig& config, const RunShape& shape);
  // Copies KV cache block `src` into block `dst`, every layer, K and V (a sequence forked in
  // the middle of a block gets a private copy of that block). Both blocks of the pool.
  Status copy_kv_block(int32_t src, int32_t dst);
  // Starts a forward call: frees the previous call's scratch tensors and takes the batch. Checks
  // that the batch fits the reservation: 1 to max_batch_tokens tokens, each a sequence slot,
  // position and token id in range with its block table entries in the pool
  // (check_batch_slots), and at most max_logit_rows logit rows, each a row of the batch.
  // With tokens_from_argmax, the tokens are the rows of the argmax started last, which must have
  // been started after the previous begin_batch and have n_tokens rows, and every row of the
  // batch asks for its logits, in order (so the call stages no host rows for a gather while
  // the step before it may still be running).
  Status begin_batch(const BatchView& batch);
  // begin_batch's checks alone: whether begin_batch would take `batch` (a model split over
  // several backends checks once before any rank starts, so no rank fails alone).
  Status check_batch(const BatchView& batch) const;

  // What reserve(config, shape) would allocate, without allocating: the memory planner's input.
  // Backends compute it with workspace_layout() and size their buffers from the same result.
  virtual Result<WorkspaceLayout> reserve_layout(const ModelConfig& config,
                                                 const RunShape& shape) const {
    (void)config;
    (void)shape;
    return Status::error(name() + " backend does not report its reservation (reserve_layout)");
  }
  // This device's bandwidth roofline. Device backends measure it (once per backend: it takes a
  // few milliseconds of device time); the default knows none.
  virtual Roofline roofline() { return {}; }
  // This device's matrix rate (MatrixRate), measured or known once; the default knows none.
  virtual MatrixRate matrix_rate() { return {}; }
  // Free memory of the device in bytes; 0 when the backend has no memory of its own (the CPU)
  // or cannot tell. The planner compares plans with it; the benchmark measures peaks with it.
  virtual size_t free_memory() const { return 0; }
  // A scratch activation tensor valid until the next begin_batch.
  virtual Result<Tensor> scratch(int64_t rows, int64_t cols) = 0;

  // out[n, hidden] = table rows of batch tokens
  virtual Status embed(Tensor out, const QuantWeight& table) = 0;
  // out = x / rms(x) * w, per row
  virtual Status rms_norm(Tensor out, Tensor x, const Vector& w, float eps) = 0;
  // out[n, w.rows] = x[n, w.cols] · wᵀ + bias
  virtual Status matmul(Tensor out, Tensor x, const Linear& w) = 0;
  // outs[i] = x · weights[i]ᵀ + bias for each i: projections of one input (q/k/v, gate/up),
  // which a device backend runs as one launch. By default, one matmul after another.
  virtual Status matmul_multi(std::span<const Tensor> outs, Tensor x,
                              std::span<const Linear* const> weights) {
    if (outs.size() != weights.size()) return Status::error("matmul_multi: outputs != weights");
    for (size_t i = 0; i < outs.size(); ++i) KS_RETURN_IF_ERROR(matmul(outs[i], x, *weights[i]));
    return Status::ok();
  }
  // Rotates q [n, n_heads*head_dim] and k [n, n_kv_heads*head_dim] in place at batch positions.
  virtual Status rope(Tensor q, Tensor k, const RopeParams& params) = 0;
  // Writes k, v [n, kv_dim] of batch tokens into `layer`'s cache at their positions, then
  // out[n, n_heads*head_dim] = causal softmax(q·Kᵀ/√d)·V over each token's sequence so far.
  virtual Status attention(Tensor out, Tensor q, Tensor k, Tensor v, int64_t layer,
                           const RopeParams& params) = 0;
  // out = silu(gate) * up
  virtual Status swiglu(Tensor out, Tensor gate, Tensor up) = 0;
  // x += y
  virtual Status add(Tensor x, Tensor y) = 0;

  // --- Fused ops: the sequences of plain ops the forward pass issues, named so that a device
  // backend can run each as fewer launches. The default composes the plain ops above (the CPU
  // backend's is the reference of every fused op); an override must compute the same values
  // within the plain ops' bounds and write every output the composition writes. The tensors of
  // one call are distinct from one another (rope_attention's q and k are rotated in place, as by
  // rope): a device backend may read one while it writes another, so callers never alias them,
  // and the CUDA backend refuses norm_matmul, norm_matmul_swiglu and matmul_add calls that do.

  // normed = rms_norm(x) · norm_w, then outs[i] = normed · weights[i]ᵀ + bias: the projections
  // that follow a norm (q/k/v after attn_norm; lm_head after the final norm). `normed` is always
  // written, as by rms_norm.
  virtual Status norm_matmul(std::span<const Tensor> outs, Tensor normed, Tensor x,
                             const Vector& norm_w, float eps,
                             std::span<const Linear* const> weights) {
    KS_RETURN_IF_ERROR(rms_norm(normed, x, norm_w, eps));
    return matmul_multi(outs, normed, weights);
  }
  // normed = rms_norm(x) · norm_w; up = normed · w_upᵀ + bias; gate = silu(normed · w_gateᵀ +
  // bias) * up: the MLP's input half. `normed` and `up` are written too.
  virtual Status norm_matmul_swiglu(Tensor gate, Tensor up, Tensor normed, Tensor x,
                                    const Vector& norm_w, float eps, const Linear& w_gate,
                                    const Linear& w_up) {
    const Tensor outs[] = {gate, up};
    const Linear* const weights[] = {&w_gate, &w_up};
    KS_RETURN_IF_ERROR(rms_norm(normed, x, norm_w, eps));
    KS_RETURN_IF_ERROR(matmul_multi(outs, normed, weights));
    return swiglu(gate, gate, up);
  }
  // out = x · wᵀ + bias, then residual += out: an output projection joining the residual
  // stream. `residual` must not overlap `out` (the CUDA backend refuses such a call).
  virtual Status matmul_add(Tensor out, Tensor x, const Linear& w, Tensor residual) {
    KS_RETURN_IF_ERROR(matmul(out, x, w));
    return add(residual, out);
  }
  // rope(q, k), then attention(out, q, k, v, layer): q and k are left rotated, as by rope.
  virtual Status rope_attention(Tensor out, Tensor q, Tensor k, Tensor v, int64_t layer,
                                const RopeParams& params) {
    KS_RETURN_IF_ERROR(rope(q, k, params));
    return attention(out, q, k, v, layer, params);
  }

  // One decoder layer of the residual stream x [n, hidden]: the five fused ops above in the
  // forward pass's order (norm_matmul to q/k/v, rope_attention, matmul_add of wo,
  // norm_matmul_swiglu, matmul_add of w_down). x is updated and the layer's K and V rows are in the
  // cache; the scratch tensors' contents afterwards are unspecified: a device backend may run the
  // whole layer without writing them (the CUDA backend's batch-1 layer kernel keeps q/k/v, the
  // attention output and the MLP activation in them, but not the norms or the projections). The
  // default composes the fused ops, so the CPU backend's is the reference.
  virtual Status decoder_layer(Tensor x, const LayerScratch& s, const LayerWeights& l,
                               int64_t layer, const RopeParams& rope, float eps) {
    const Tensor qkv[] = {s.q, s.k, s.v};
    const Linear* const qkv_weights[] = {&l.wq, &l.wk, &l.wv};
    KS_RETURN_IF_ERROR(norm_matmul(qkv, s.normed, x, l.attn_norm, eps, qkv_weights));
    KS_RETURN_IF_ERROR(rope_attention(s.attn, s.q, s.k, s.v, layer, rope));
    KS_RETURN_IF_ERROR(matmul_add(s.proj, s.attn, l.wo, x));
    KS_RETURN_IF_ERROR(
        norm_matmul_swiglu(s.gate, s.up, s.normed, x, l.ffn_norm, eps, l.w_gate, l.w_up));
    return matmul_add(s.proj, s.gate, l.w_down, x);
  }

  // Layers first, first + 1, ... of the residual stream x, one after another: decoder_layer for
  // each (the default), with the same contract. A device backend may run them as one launch.
  virtual Status decoder_layers(Tensor x, const LayerScratch& s,
                                std::span<const LayerWeights> layers, int64_t first,
                                const RopeParams& rope, float eps) {
    for (size_t i = 0; i < layers.size(); ++i) {
      KS_RETURN_IF_ERROR(decoder_layer(x, s, layers[i], first + int64_t(i), rope, eps));
    }
    return Status::ok();
  }

  // Sums t over the ranks of a split model through `comm` (backend/communicator.h), in place.
  // An op, not a bare communicator call, so that a backend replaying a captured step (CUDA
  // graphs) replays the collective with the rest of the step instead of calling it again.
  virtual Status all_reduce_sum(Tensor t, Communicator& comm);
  // out[i] = x[rows[i]]; rows in host memory.
  virtual Status gather_rows(Tensor out, Tensor x, const int32_t* rows, int64_t n) = 0;
  // Copies t to host fp32 [rows, cols].
  virtual Status read(Tensor t, float* host) = 0;
  // Copies rows `rows` of t (each in [0, t.rows)) to host fp32 [rows.size(), cols], in that
  // order: a server step reads back only the logit rows its host samplers need.
  Status read_rows(Tensor t, std::span<const int32_t> rows, float* host);
  // out[r] = row_argmax of row r of t, to host. Device backends compute it in place and copy
  // back one int per row; by default, via read().
  virtual Status argmax_rows(Tensor t, int32_t* out) {
    std::vector<float> values(size_t(t.rows * t.cols));
    KS_RETURN_IF_ERROR(read(t, values.data()));
    for (int64_t r = 0; r < t.rows; ++r) out[r] = row_argmax(values.data() + r * t.cols, t.cols);
    return Status::ok();
  }

  // As argmax_rows, except that each row of `draws` (RowDraw::row in [0, t.rows), each at most
  // once, its temperature above 0) takes Sampler::pick's token of its settings and uniform number
  // (sample/sampler.h) instead of its argmax. The CUDA backend draws on the device with the same
  // arithmetic (sample/draw_rules.h), so only the tokens come back; by default the drawn rows are
  // read back and picked on the host, one after another (draws_on_device() false: a caller with
  // a pool samples whole rows itself).
  Status pick_rows(Tensor t, std::span<const RowDraw> draws, int32_t* out);
  virtual bool draws_on_device() const { return false; }

  // pick_rows in two halves, so a caller can queue the next call before this one's tokens are
  // back (decode run ahead: the next call begins with tokens_from_argmax). start_argmax queues
  // the argmax of every row of t, the rows of `draws` drawn instead (checked as pick_rows checks
  // them); finish_argmax waits for the oldest queued one and returns its rows. At most
  // kArgmaxInFlight are queued at once; a begin_batch whose tokens come from the host drops any
  // that were never finished. finish_argmax goes between calls (after a call's start_argmax,
  // before the next begin_batch), never among a call's ops.
  static constexpr int kArgmaxInFlight = 2;
  Status start_argmax(Tensor t, std::span<const RowDraw> draws = {});
  Status finish_argmax(std::vector<int32_t>* out);
  // Whether start_argmax leaves the rows on the device, for the next call's tokens, without
  // waiting for them (CUDA). The default halves compute them at start: a call queued after one
  // then overlaps nothing.
  virtual bool argmax_on_device() const { return false; }

  // Bytes of device memory this backend holds now, and its high-water mark.
  virtual size_t memory_in_use() const = 0;
  virtual size_t peak_memory() const = 0;

 protected:
  // The ops behind the checked entry points above, called only with checked arguments.
  virtual Status do_reserve(const ModelConfig& config, const RunShape& shape) = 0;
  virtual Status do_copy_kv_block(int32_t src, int32_t dst) = 0;
  virtual Status do_begin_batch(const BatchView& batch) = 0;
  // The halves of start_argmax and finish_argmax; `slot` (0 .. kArgmaxInFlight - 1) pairs them.
  // By default start computes the rows at once (do_pick_rows) into a host buffer of the slot and
  // finish copies them out. A backend that overrides them and leaves the rows on its device for
  // the next call's tokens (argmax_on_device) gets tokens_from_argmax batches with null tokens.
  virtual Status do_start_argmax(Tensor t, int slot, std::span<const RowDraw> draws);
  // read_rows with checked rows. By default read() of the whole tensor and a host copy of the
  // rows; a device backend copies only the rows.
  virtual Status do_read_rows(Tensor t, std::span<const int32_t> rows, float* host);
  virtual Status do_finish_argmax(int slot, int32_t* out);
  // pick_rows with checked draws.
  virtual Status do_pick_rows(Tensor t, std::span<const RowDraw> draws, int32_t* out);

 private:
  // What the last successful reserve() was given; the checks compare with it.
  bool reserved_ = false;
  int64_t reserved_vocab_ = 0;
  RunShape reserved_shape_;
  // start_argmax / finish_argmax: calls of each so far (the slot is the count modulo
  // kArgmaxInFlight), each slot's rows, the default halves' results, and the rows and columns of
  // the argmax the next begin_batch may take its tokens from (-1: none since the last one).
  int64_t argmax_started_ = 0;
  int64_t argmax_finished_ = 0;
  int64_t argmax_slot_rows_[kArgmaxInFlight] = {};
  std::vector<int32_t> argmax_host_[kArgmaxInFlight];
  int64_t feed_rows_ = -1;
  int64_t feed_cols_ = 0;

  // pick_rows' and start_argmax's check of `draws` against t: the draws as the device takes
  // them (normalized settings), or the first fault.
  Result<std::vector<RowDraw>> checked_draws(Tensor t, std::span<const RowDraw> draws) const;
};

// Whether every row of the batch asks for its logits, in order (a decode step): the forward pass
// then needs no gather of the logit rows, and only such a batch may run ahead.
bool logits_of_every_row(const BatchView& batch);

// Checks a batch against a reservation: every token's slot and position inside `shape`, and the
// block table entries of every position a token reads (0 up to its own) blocks of the pool.
// `who` begins the error ("cpu backend").
Status check_batch_slots(const BatchView& batch, const RunShape& shape, const std::string& who);

// Checks the blocks of a copy_kv_block call against the pool of `shape`.
Status check_kv_block_copy(int32_t src, int32_t dst, const RunShape& shape, const std::string& who);

// "cpu", "cuda" when compiled in, "vulkan" / "vulkan:N" when compiled in, or "auto"
// (default_device()). `threads` applies to the CPU backend.
Result<std::unique_ptr<Backend>> make_backend(const std::string& device, int threads);

// The backends compiled into this binary, e.g. "cpu (avx512-vnni), cuda".
std::string compiled_backends();
// One line per device this binary can run on or knows of: the CPU, CUDA (the device, or why
// none), every Vulkan device (with why it cannot run Kestrel, if it cannot). Creates a CUDA
// backend when the module and a driver are there, and a Vulkan instance.
std::vector<std::string> list_devices();
// default_device(), what "auto" stands for, is declared in kestrel/engine.h (public).

}  // namespace kestrel
