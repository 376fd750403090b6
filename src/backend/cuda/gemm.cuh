// Prefill matrix products (more than 64 tokens, gemv.cuh's kMaxGemvBatchTokens): the weight is
// dequantized to fp16 in row slices and multiplied on the tensor cores by cuBLAS (fp16 inputs,
// fp32 accumulation and output).
// fp32 weights instead multiply the fp32 activation itself in fp32 (gemm_f32), at every token
// count.
#pragma once

#include <span>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "backend/cuda/common.cuh"
#include "core/status.h"

namespace kestrel::cuda {

// What a prefill GEMM does with its product: stores it (fp32), adds it into y (fp32; the sum
// rounded once, in the GEMM's epilogue), or stores it rounded to fp16.
enum class GemmOut { store, accumulate, store_fp16 };

struct GemmWorkspace {
  cublasHandle_t cublas = nullptr;
  __half* dequant = nullptr;  // fp16 scratch for one weight slice
  int64_t dequant_elems = 0;
  void* cublas_workspace = nullptr;  // cuBLAS's own scratch, bound before every call
  size_t cublas_workspace_bytes = 0;
};

// y[n, w.rows] = x[n, w.cols] · wᵀ + bias, where x is the natural fp16 shadow [n, x_stride]; y is
// float, or __half for GemmOut::store_fp16 (weights without a bias only). Not for fp32 weights
// (gemm_f32).
Status gemm(const DeviceWeight& w, const __half* x, int64_t x_stride, int64_t n, void* y,
            const GemmWorkspace& ws, cudaStream_t stream, GemmOut out = GemmOut::store);

// y[n, w.rows] = x[n, w.cols] · wᵀ + bias for an fp32 weight and the fp32 activation x
// [n, w.cols] (row-major, no padding), any n >= 1: cuBLAS with fp32 inputs, CUBLAS_COMPUTE_32F
// and the handle's default math mode, which never rounds to TF32. Decode steps call it too, so
// it runs inside captured graphs (with the workspace of `ws`, so capture allocates nothing).
Status gemm_f32(const DeviceWeight& w, const float* x, int64_t n, float* y, const GemmWorkspace& ws,
                cudaStream_t stream);

// Rows [row_begin, row_begin + n_rows) of the quantized `w` as fp16, natural column order, into
// out[n_rows, w.cols].
Status dequantize_rows(const DeviceWeight& w, int64_t row_begin, int64_t n_rows, __half* out,
                       cudaStream_t stream);

// Prefill GEMMs of quantized weights through two whole-weight fp16 copies. The GEMM of one weight
// reads one copy while a second stream dequantizes the weight expected next into the other, so
// the dequantization, which only moves memory, can run beside the GEMM, which is bound by the
// tensor cores (where the GEMM leaves room on the SMs: the 1.5B's do, the 8B's do not). Each copy
// is tagged with the weight it holds; events order every write of a copy after the last GEMM that
// read it and every GEMM after the write it reads, so a wrong guess costs only the bandwidth of the
// wasted copy. Weights larger than a copy take gemm() in slices through the first copy; with one
// copy (reset with copy1 null) every call takes gemm() with the workspace's scratch.
class DequantAhead {
 public:
  DequantAhead() = default;
  DequantAhead(const DequantAhead&) = delete;
  DequantAhead& operator=(const DequantAhead&) = delete;
  ~DequantAhead();

  // Creates the stream and events (once); forgets what the copies held. copy0 and copy1 hold
  // `elems` fp16 values each; with copy1 null, every call takes gemm().
  Status reset(__half* copy0, __half* copy1, int64_t elems);
  // Waits for the dequantization in flight (before the copies are freed or the weights change)
  // and forgets what the copies held.
  Status drain();

  // gemm()'s product of x and w, where `key` names w (its upload slot); then starts the copy of
  // `next` (key `next_key`; null for none) when it fits. `stream` is the caller's.
  Status gemm(const DeviceWeight& w, int key, const DeviceWeight* next, int next_key,
              const __half* x, int64_t x_stride, int64_t n, void* y, GemmWorkspace ws,
              cudaStream_t stream, GemmOut out);

  // One GEMM of the weights of `stack` (consecutive upload slots from `key`) stacked row-wise:
  // y[n, sum of rows] = x · [w0; w1; ...]ᵀ, each weight's products in its own column range.
  // Weights stacks() accepts only (no biases: the caller adds them). A copy made ahead of the
  // first weight alone is kept and the rest dequantized after it.
  Status gemm_stack(std::span<const DeviceWeight* const> stack, int key, const DeviceWeight* next,
                    int next_key, const __half* x, int64_t x_stride, int64_t n, void* y,
                    GemmWorkspace ws, cudaStream_t stream, GemmOut out);
  // Whether gemm_stack takes these weights: quantized, of one format and width, without biases,
  // their rows together within one copy.
  bool stacks(std::span<const DeviceWeight* const> weights) const;

  // GEMMs whose copy was found made (the weight, or a stack's first weight) since reset().
  int64_t hits() const { return hits_; }

 private:
  Status wait(cudaStream_t stream, cudaEvent_t event);

  cudaStream_t ahead_ = nullptr;
  __half* copy_[2] = {nullptr, nullptr};
  int64_t elems_ = 0;
  int held_[2] = {-1, -1};      // the key of the first weight each copy holds (-1: none)
  int held_count_[2] = {0, 0};  // weights of consecutive keys from held_ each copy holds
  int64_t hits_ = 0;
  cudaEvent_t written_[2] = {nullptr, nullptr};  // after the last write of each copy
  cudaEvent_t read_[2] = {nullptr, nullptr};     // after the last GEMM that read each copy
};

// Test aids (cuda_backend.h): a kernel spinning for `microseconds` on `stream`, and a delay of
// that kind before every copy DequantAhead makes ahead (0: none; process-wide).
Status spin_stream(cudaStream_t stream, int microseconds);
void set_dequant_ahead_delay(int microseconds);

// Elements of fp16 scratch gemm() needs for `w` (0 for fp16 and fp32 weights, which cuBLAS reads
// as they are). A weight larger than the scratch is processed in slices of whole rows.
int64_t gemm_dequant_elems(const DeviceWeight& w);

// out[i, :] = fp32 row tokens[i] of `table`, for the n tokens in device memory.
Status embed_rows(const DeviceWeight& table, const int32_t* tokens, int64_t n, float* out,
                  cudaStream_t stream);

}  // namespace kestrel::cuda
