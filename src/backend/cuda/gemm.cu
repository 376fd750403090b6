#include <atomic>

#include "backend/cuda/cuda_check.cuh"
#include "backend/cuda/gemm.cuh"

namespace kestrel::cuda {
namespace {

// sym_int8 weights to fp16, one thread per group of 32 weights: rows [row_begin, row_begin +
// n_rows) of `w` into out[n_rows, out_stride], natural column order. (int4 weights take
// dequantize_int4_kernel.)
__global__ void dequantize_int8_kernel(DeviceWeight w, int64_t row_begin, int64_t n_rows,
                                       __half* out, int64_t out_stride) {
  pdl_wait();
  pdl_trigger();
  const int64_t groups_per_row = w.cols / kGroup;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_rows * groups_per_row) return;
  const int64_t r = idx / groups_per_row;
  const int64_t g = idx % groups_per_row;
  const int64_t row = row_begin + r;
  const __half2 scale = __half2half2(w.scales[row * (w.cols / w.block) + g * kGroup / w.block]);
  __align__(16) __half2 values[kGroup / 2];
  const int8_t* q = reinterpret_cast<const int8_t*>(w.data + row * w.row_bytes + g * kGroup);
#pragma unroll
  for (int i = 0; i < kGroup / 2; ++i) {
    values[i] = __hmul2(__floats2half2_rn(float(q[2 * i]), float(q[2 * i + 1])), scale);
  }
  uint4* dst = reinterpret_cast<uint4*>(out + r * out_stride + g * kGroup);
  const uint4* v = reinterpret_cast<const uint4*>(values);
#pragma unroll
  for (int i = 0; i < 4; ++i) dst[i] = v[i];
}

// Int4 weights (tiled, int4_tiles.h) to fp16: a thread makes kDequantUnits units of 8
// consecutive values of a row, each from 8 of its group's 16 packed bytes (weights 8k .. 8k + 7 of
// a group are the low nibbles of bytes 0-7 or 8-15 for k = 0, 1, their high nibbles for k = 2,
// 3), with every load in flight before the first conversion; a warp's stores are 512 contiguous
// bytes. A nibble q becomes the fp16 1024 + q by OR-ing in 1024's exponent, and 1024 (+ 8 for
// sym_int4) comes off exactly, so the values are those of the thread-per-group kernel of before bit
// for bit (which wrote 1.75 TB/s on the 8B's 14336 x 4096 weights, H200).
constexpr int kDequantThreads = 128;
constexpr int kDequantUnits = 4;
constexpr int kDequantRowUnits = kDequantThreads * kDequantUnits;  // 8-value units a block makes

// Nibbles 0 and 2 (even) and 1 and 3 (odd) of the bytes of `word` as fp16 1024 + q, in order.
__device__ inline void int4_to_half_biased(uint32_t word, __half2& q01, __half2& q23) {
  const uint32_t even = (word & 0x000f000fu) | 0x64006400u;        // q0, q2
  const uint32_t odd = ((word >> 8) & 0x000f000fu) | 0x64006400u;  // q1, q3
  const uint32_t lo = __byte_perm(even, odd, 0x5410);
  const uint32_t hi = __byte_perm(even, odd, 0x7632);
  q01 = *reinterpret_cast<const __half2*>(&lo);
  q23 = *reinterpret_cast<const __half2*>(&hi);
}

template <bool kAsym>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_int4_kernel(DeviceWeight w, int64_t row_begin, int64_t n_rows, __half* out,
                           int64_t out_stride) {
  pdl_wait();
  pdl_trigger();
  const int units_per_row = int(w.cols / 8);
  const __half2 bias = __float2half2_rn(kAsym ? 1024.0f : 1032.0f);
  for (int64_t r = blockIdx.y; r < n_rows; r += gridDim.y) {
    const int64_t row = row_begin + r;
    uint2 packed[kDequantUnits];
    __half2 scale[kDequantUnits], min[kDequantUnits];
#pragma unroll
    for (int i = 0; i < kDequantUnits; ++i) {
      const int u = int(blockIdx.x) * kDequantRowUnits + i * kDequantThreads + int(threadIdx.x);
      if (u < units_per_row) {
        const int64_t g = u >> 2;
        packed[i] =
            *reinterpret_cast<const uint2*>(w.data + w.tiles.group_offset(row, g) + (u & 1) * 8);
        const int64_t s = w.tiles.scale_index(row, g);
        scale[i] = __half2half2(w.scales[s]);
        if constexpr (kAsym) min[i] = __half2half2(w.mins[s]);
      }
    }
#pragma unroll
    for (int i = 0; i < kDequantUnits; ++i) {
      const int u = int(blockIdx.x) * kDequantRowUnits + i * kDequantThreads + int(threadIdx.x);
      if (u >= units_per_row) continue;
      const int shift = (u & 2) * 2;  // high nibbles for units 2 and 3 of a group
      __align__(16) __half2 v[4];
      int4_to_half_biased(packed[i].x >> shift, v[0], v[1]);
      int4_to_half_biased(packed[i].y >> shift, v[2], v[3]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const __half2 q = __hsub2(v[j], bias);  // exact: small integers
        v[j] = kAsym ? __hfma2(q, scale[i], min[i]) : __hmul2(q, scale[i]);
      }
      *reinterpret_cast<uint4*>(out + r * out_stride + int64_t(u) * 8) =
          *reinterpret_cast<const uint4*>(v);
    }
  }
}

__global__ void add_bias_kernel(float* y, const float* bias, int64_t n, int64_t rows) {
  pdl_wait();
  pdl_trigger();
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < n * rows) y[idx] += bias[idx % rows];
}

__global__ void embed_kernel(DeviceWeight table, const int32_t* tokens, float* out) {
  pdl_wait();
  pdl_trigger();
  const int64_t t = blockIdx.x;
  const int64_t row = tokens[t];
  for (int64_t k = threadIdx.x; k < table.cols; k += blockDim.x) {
    out[t * table.cols + k] = dequant_one(table, row, k);
  }
}

// cublasSetStream resets the handle to cuBLAS's default workspace pool, which allocates on first
// use in every captured graph; the reserved workspace is bound again after it.
Status bind_stream(const GemmWorkspace& ws, cudaStream_t stream) {
  KS_CUBLAS_CHECK("matmul", cublasSetStream(ws.cublas, stream));
  if (ws.cublas_workspace != nullptr) {
    KS_CUBLAS_CHECK("matmul",
                    cublasSetWorkspace(ws.cublas, ws.cublas_workspace, ws.cublas_workspace_bytes));
  }
  return Status::ok();
}

// y[n, w.rows] += bias, when the weight has one (fp32 products only: check_gemm refuses an fp16
// product of a weight with a bias).
Status add_bias(const DeviceWeight& w, void* out, int64_t n, cudaStream_t stream) {
  if (w.bias == nullptr) return Status::ok();
  float* y = static_cast<float*>(out);
  KS_CUDA_CHECK("matmul", launch_pdl(add_bias_kernel, dim3(unsigned(ceil_div(n * w.rows, 256))),
                                     dim3(256), 0, stream, y, w.bias, n, int64_t(w.rows)));
  KS_CUDA_CHECK_LAUNCH("matmul", "add_bias_kernel");
  return Status::ok();
}

// y[n, w.rows] = x · w16ᵀ (as `out` says) for w16, w's fp16 rows [row_begin, row_begin + n_rows)
// (leading dimension lda), into columns [row_begin, ...) of y.
cublasStatus_t multiply(const DeviceWeight& w, const __half* w16, int64_t lda, int64_t row_begin,
                        int64_t n_rows, const __half* x, int64_t x_stride, int64_t n, void* y,
                        const GemmWorkspace& ws, GemmOut out) {
  const float alpha = 1.0f;
  const float beta = out == GemmOut::accumulate ? 1.0f : 0.0f;
  const bool half = out == GemmOut::store_fp16;
  void* c = static_cast<char*>(y) + row_begin * int64_t(half ? sizeof(__half) : sizeof(float));
  // Column-major view: y^T[rows, n] = W[rows, cols] · x^T[cols, n]; W is row-major [rows, cols],
  // i.e. column-major [cols, rows], hence op T.
  return cublasGemmEx(ws.cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(n_rows), int(n), int(w.cols), &alpha,
                      w16, CUDA_R_16F, int(lda), x, CUDA_R_16F, int(x_stride), &beta, c,
                      half ? CUDA_R_16F : CUDA_R_32F, int(w.rows), CUBLAS_COMPUTE_32F,
                      CUBLAS_GEMM_DEFAULT);
}

// Spins for `ns` nanoseconds of the global timer: the test aids' stall of a stream.
__global__ void spin_kernel(uint64_t ns) {
  uint64_t start = 0, now = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

std::atomic<int> ahead_delay_us{0};  // set_dequant_ahead_delay

}  // namespace

Status spin_stream(cudaStream_t stream, int microseconds) {
  if (microseconds <= 0) return Status::ok();
  spin_kernel<<<1, 1, 0, stream>>>(uint64_t(microseconds) * 1000);
  KS_CUDA_CHECK_LAUNCH("test aid", "spin_kernel");
  return Status::ok();
}

void set_dequant_ahead_delay(int microseconds) {
  ahead_delay_us.store(microseconds);
}

Status dequantize_rows(const DeviceWeight& w, int64_t row_begin, int64_t n_rows, __half* out,
                       cudaStream_t stream) {
  if (n_rows <= 0) return Status::ok();
  if (is_tiled(w.format)) {
    const dim3 grid(unsigned(ceil_div(w.cols / 8, kDequantRowUnits)),
                    unsigned(std::min<int64_t>(n_rows, 65535)));
    const auto kernel = w.format == WeightFormat::asym_int4 ? dequantize_int4_kernel<true>
                                                            : dequantize_int4_kernel<false>;
    KS_CUDA_CHECK("matmul", launch_pdl(kernel, grid, dim3(kDequantThreads), 0, stream, w, row_begin,
                                       n_rows, out, int64_t(w.cols)));
    KS_CUDA_CHECK_LAUNCH("matmul", "dequantize_int4_kernel");
    return Status::ok();
  }
  const int64_t groups = n_rows * (w.cols / kGroup);
  KS_CUDA_CHECK("matmul",
                launch_pdl(dequantize_int8_kernel, dim3(unsigned(ceil_div(groups, 256))), dim3(256),
                           0, stream, w, row_begin, n_rows, out, int64_t(w.cols)));
  KS_CUDA_CHECK_LAUNCH("matmul", "dequantize_int8_kernel");
  return Status::ok();
}

int64_t gemm_dequant_elems(const DeviceWeight& w) {
  if (w.format == WeightFormat::fp16 || w.format == WeightFormat::fp32) return 0;
  return w.rows * w.cols;
}

static Status check_gemm(const DeviceWeight& w, GemmOut out) {
  if (w.format == WeightFormat::fp32) {
    return Status::error("cuda matmul: an fp32 weight takes the fp32 path, not the fp16 GEMM");
  }
  if (out == GemmOut::store_fp16 && w.bias != nullptr) {
    return Status::error("cuda matmul: an fp16 product takes no bias");
  }
  return Status::ok();
}

Status gemm(const DeviceWeight& w, const __half* x, int64_t x_stride, int64_t n, void* y,
            const GemmWorkspace& ws, cudaStream_t stream, GemmOut out) {
  KS_RETURN_IF_ERROR(check_gemm(w, out));
  KS_RETURN_IF_ERROR(bind_stream(ws, stream));
  if (w.format == WeightFormat::fp16) {
    KS_CUBLAS_CHECK("matmul", multiply(w, reinterpret_cast<const __half*>(w.data), w.row_bytes / 2,
                                       0, w.rows, x, x_stride, n, y, ws, out));
  } else {
    const int64_t slice_rows = std::min<int64_t>(w.rows, ws.dequant_elems / w.cols);
    if (slice_rows <= 0) {
      return Status::error("cuda matmul: prefill dequantization scratch of " +
                           std::to_string(ws.dequant_elems) +
                           " values is smaller than one row of " + std::to_string(w.cols));
    }
    for (int64_t begin = 0; begin < w.rows; begin += slice_rows) {
      const int64_t rows = std::min(slice_rows, w.rows - begin);
      KS_RETURN_IF_ERROR(dequantize_rows(w, begin, rows, ws.dequant, stream));
      KS_CUBLAS_CHECK("matmul",
                      multiply(w, ws.dequant, w.cols, begin, rows, x, x_stride, n, y, ws, out));
    }
  }
  return add_bias(w, y, n, stream);
}

DequantAhead::~DequantAhead() {
  if (ahead_ != nullptr) cudaStreamSynchronize(ahead_);
  for (cudaEvent_t e : written_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  for (cudaEvent_t e : read_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  if (ahead_ != nullptr) cudaStreamDestroy(ahead_);
}

Status DequantAhead::reset(__half* copy0, __half* copy1, int64_t elems) {
  KS_RETURN_IF_ERROR(drain());
  copy_[0] = copy0;
  copy_[1] = copy1;
  elems_ = 0;
  hits_ = 0;
  if (copy0 == nullptr || copy1 == nullptr) return Status::ok();
  if (ahead_ == nullptr) {
    // The stream of the lowest priority, which is also the default priority of the caller's
    // stream: the two share the GPU as equals (a higher-priority caller stream is untried).
    int least = 0, greatest = 0;
    KS_CUDA_CHECK("matmul", cudaDeviceGetStreamPriorityRange(&least, &greatest));
    cudaStream_t stream = nullptr;
    KS_CUDA_CHECK("matmul", cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, least));
    ahead_ = stream;
    for (int i = 0; i < 2; ++i) {
      KS_CUDA_CHECK("matmul", cudaEventCreateWithFlags(&written_[i], cudaEventDisableTiming));
      KS_CUDA_CHECK("matmul", cudaEventCreateWithFlags(&read_[i], cudaEventDisableTiming));
      // Recorded once on the idle stream, so that the first waits find a completed event.
      KS_CUDA_CHECK("matmul", cudaEventRecord(written_[i], ahead_));
      KS_CUDA_CHECK("matmul", cudaEventRecord(read_[i], ahead_));
    }
  }
  // Only now: a failure above leaves elems_ 0, so every call takes gemm() with its own scratch.
  elems_ = elems;
  return Status::ok();
}

Status DequantAhead::drain() {
  if (ahead_ != nullptr) KS_CUDA_CHECK("matmul", cudaStreamSynchronize(ahead_));
  held_[0] = held_[1] = -1;
  held_count_[0] = held_count_[1] = 0;
  return Status::ok();
}

Status DequantAhead::wait(cudaStream_t stream, cudaEvent_t event) {
  KS_CUDA_CHECK("matmul", cudaStreamWaitEvent(stream, event, 0));
  return Status::ok();
}

Status DequantAhead::gemm(const DeviceWeight& w, int key, const DeviceWeight* next, int next_key,
                          const __half* x, int64_t x_stride, int64_t n, void* y, GemmWorkspace ws,
                          cudaStream_t stream, GemmOut out) {
  const DeviceWeight* one[] = {&w};
  return gemm_stack(one, key, next, next_key, x, x_stride, n, y, ws, stream, out);
}

bool DequantAhead::stacks(std::span<const DeviceWeight* const> weights) const {
  if (weights.empty() || elems_ == 0) return false;
  int64_t rows = 0;
  for (const DeviceWeight* w : weights) {
    if (gemm_dequant_elems(*w) == 0 || w->bias != nullptr || w->cols != weights[0]->cols ||
        w->format != weights[0]->format) {
      return false;
    }
    rows += w->rows;
  }
  return rows * weights[0]->cols <= elems_;
}

Status DequantAhead::gemm_stack(std::span<const DeviceWeight* const> stack, int key,
                                const DeviceWeight* next, int next_key, const __half* x,
                                int64_t x_stride, int64_t n, void* y, GemmWorkspace ws,
                                cudaStream_t stream, GemmOut out) {
  if (stack.empty()) return Status::error("cuda matmul: a GEMM of no weights");
  const DeviceWeight& w = *stack[0];
  for (const DeviceWeight* s : stack) KS_RETURN_IF_ERROR(check_gemm(*s, out));
  if (stack.size() > 1 && !stacks(stack)) {
    return Status::error(
        "cuda matmul: stacked weights must be quantized, of one format and width, without "
        "biases, and fit one fp16 copy");
  }
  if (stack.size() == 1 && (gemm_dequant_elems(w) == 0 || elems_ == 0)) {
    return kestrel::cuda::gemm(w, x, x_stride, n, y, ws, stream, out);
  }
  if (stack.size() == 1 && w.rows * w.cols > elems_) {
    // The sliced path writes the first copy: after its last reader and its last writer.
    KS_RETURN_IF_ERROR(wait(stream, read_[0]));
    KS_RETURN_IF_ERROR(wait(stream, written_[0]));
    held_[0] = -1;
    held_count_[0] = 0;
    ws.dequant = copy_[0];
    ws.dequant_elems = elems_;
    KS_RETURN_IF_ERROR(kestrel::cuda::gemm(w, x, x_stride, n, y, ws, stream, out));
    KS_CUDA_CHECK("matmul", cudaEventRecord(read_[0], stream));
    return Status::ok();
  }
  int c = held_[0] == key ? 0 : held_[1] == key ? 1 : -1;
  if (c < 0) {
    // Not made ahead: dequantize here, into the copy not holding `next`.
    c = held_[0] == next_key ? 1 : 0;
    held_[c] = -1;
    held_count_[c] = 0;
  } else {
    ++hits_;
  }
  // After the copy's last writer, and (when another stream read it last) its last reader.
  KS_RETURN_IF_ERROR(wait(stream, read_[c]));
  KS_RETURN_IF_ERROR(wait(stream, written_[c]));
  // The stack's weights the copy lacks (all, or those after the one made ahead), after the
  // rows it holds.
  const int count = int(stack.size());
  if (held_count_[c] < count) {
    int64_t row = 0;
    for (int i = 0; i < held_count_[c]; ++i) row += stack[size_t(i)]->rows;
    for (int i = held_count_[c]; i < count; ++i) {
      const DeviceWeight& s = *stack[size_t(i)];
      KS_RETURN_IF_ERROR(dequantize_rows(s, 0, s.rows, copy_[c] + row * w.cols, stream));
      row += s.rows;
    }
    KS_CUDA_CHECK("matmul", cudaEventRecord(written_[c], stream));
    held_[c] = key;
    held_count_[c] = count;
  }
  DeviceWeight stacked = w;  // the rows of every weight of the stack, one after another
  for (int i = 1; i < count; ++i) stacked.rows += stack[size_t(i)]->rows;
  KS_RETURN_IF_ERROR(bind_stream(ws, stream));
  KS_CUBLAS_CHECK("matmul",
                  multiply(stacked, copy_[c], w.cols, 0, stacked.rows, x, x_stride, n, y, ws, out));
  KS_CUDA_CHECK("matmul", cudaEventRecord(read_[c], stream));
  if (count == 1) KS_RETURN_IF_ERROR(add_bias(w, y, n, stream));
  // The next weight into the other copy, once the GEMM that last read that copy is done.
  const int o = 1 - c;
  if (next != nullptr && next_key >= 0 && held_[o] != next_key && held_[c] != next_key &&
      gemm_dequant_elems(*next) > 0 && next->rows * next->cols <= elems_) {
    held_[o] = -1;
    held_count_[o] = 0;
    KS_RETURN_IF_ERROR(wait(ahead_, read_[o]));
    KS_RETURN_IF_ERROR(spin_stream(ahead_, ahead_delay_us.load()));
    KS_RETURN_IF_ERROR(dequantize_rows(*next, 0, next->rows, copy_[o], ahead_));
    KS_CUDA_CHECK("matmul", cudaEventRecord(written_[o], ahead_));
    held_[o] = next_key;
    held_count_[o] = 1;
  }
  return Status::ok();
}

Status gemm_f32(const DeviceWeight& w, const float* x, int64_t n, float* y, const GemmWorkspace& ws,
                cudaStream_t stream) {
  if (w.format != WeightFormat::fp32 || w.row_bytes != w.cols * int64_t(sizeof(float))) {
    return Status::error("cuda matmul: the fp32 GEMM needs an unpadded fp32 weight, got " +
                         std::string(format_name(w.format)));
  }
  if (n <= 0) return Status::ok();
  KS_RETURN_IF_ERROR(bind_stream(ws, stream));
  const float alpha = 1.0f;
  const float beta = 0.0f;
  // Column-major view as in gemm(): y^T[rows, n] = W[rows, cols] · x^T[cols, n], W row-major
  // [rows, cols] = column-major [cols, rows] (op T), x row-major [n, cols] = column-major
  // [cols, n].
  KS_CUBLAS_CHECK("matmul", cublasGemmEx(ws.cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(w.rows), int(n),
                                         int(w.cols), &alpha, w.data, CUDA_R_32F, int(w.cols), x,
                                         CUDA_R_32F, int(w.cols), &beta, y, CUDA_R_32F, int(w.rows),
                                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return add_bias(w, y, n, stream);
}

Status embed_rows(const DeviceWeight& table, const int32_t* tokens, int64_t n, float* out,
                  cudaStream_t stream) {
  if (n == 0) return Status::ok();
  // 1024 threads: each dequantizes a few values, whose loads (a step's first kernel, from DRAM)
  // are all in flight at once (H200, 8B decode: 256 threads took ~11 us).
  KS_CUDA_CHECK("embed", launch_pdl(embed_kernel, dim3(unsigned(n)), dim3(1024), 0, stream, table,
                                    tokens, out));
  KS_CUDA_CHECK_LAUNCH("embed", "embed_kernel");
  return Status::ok();
}

}  // namespace kestrel::cuda
