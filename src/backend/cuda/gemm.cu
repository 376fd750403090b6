#include "backend/cuda/cuda_check.cuh"
#include "backend/cuda/gemm.cuh"

namespace kestrel::cuda {
namespace {

// One thread per group of 32 weights: rows [row_begin, row_begin + n_rows) of `w` into
// out[n_rows, out_stride] fp16, natural column order.
__global__ void dequantize_fp16_kernel(DeviceWeight w, int64_t row_begin, int64_t n_rows,
                                       __half* out, int64_t out_stride) {
  pdl_wait();
  pdl_trigger();
  const int64_t groups_per_row = w.cols / kGroup;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_rows * groups_per_row) return;
  const int64_t r = idx / groups_per_row;
  const int64_t g = idx % groups_per_row;
  const int64_t row = row_begin + r;
  const bool tiled = is_tiled(w.format);
  const int64_t s =
      tiled ? w.tiles.scale_index(row, g) : row * (w.cols / w.block) + g * kGroup / w.block;
  const __half2 scale = __half2half2(w.scales[s]);
  __align__(16) __half2 values[kGroup / 2];
  const uint8_t* src =
      w.data + (tiled ? w.tiles.group_offset(row, g) : row * w.row_bytes + g * kGroup);
  if (w.format == WeightFormat::sym_int8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(src);
#pragma unroll
    for (int i = 0; i < kGroup / 2; ++i) {
      values[i] = __hmul2(__floats2half2_rn(float(q[2 * i]), float(q[2 * i + 1])), scale);
    }
  } else {
    const uint4 packed = *reinterpret_cast<const uint4*>(src);
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&packed);
    const bool asym = w.format == WeightFormat::asym_int4;
    const __half2 min = asym ? __half2half2(w.mins[s]) : __float2half2_rn(0.0f);
    const float offset = asym ? 0.0f : 8.0f;
#pragma unroll
    for (int i = 0; i < kGroup / 2; ++i) {
      // Weight j of the group: byte j % 16, low nibble for j < 16.
      const int j0 = 2 * i;
      const int j1 = 2 * i + 1;
      const int q0 = j0 < 16 ? (bytes[j0] & 0x0f) : (bytes[j0 - 16] >> 4);
      const int q1 = j1 < 16 ? (bytes[j1] & 0x0f) : (bytes[j1 - 16] >> 4);
      const __half2 q = __floats2half2_rn(float(q0) - offset, float(q1) - offset);
      values[i] = asym ? __hfma2(q, scale, min) : __hmul2(q, scale);
    }
  }
  uint4* dst = reinterpret_cast<uint4*>(out + r * out_stride + g * kGroup);
  const uint4* v = reinterpret_cast<const uint4*>(values);
#pragma unroll
  for (int i = 0; i < 4; ++i) dst[i] = v[i];
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

// y[n, w.rows] += bias, when the weight has one.
Status add_bias(const DeviceWeight& w, float* y, int64_t n, cudaStream_t stream) {
  if (w.bias == nullptr) return Status::ok();
  KS_CUDA_CHECK("matmul", launch_pdl(add_bias_kernel, dim3(unsigned(ceil_div(n * w.rows, 256))),
                                     dim3(256), 0, stream, y, w.bias, n, int64_t(w.rows)));
  KS_CUDA_CHECK_LAUNCH("matmul", "add_bias_kernel");
  return Status::ok();
}

}  // namespace

int64_t gemm_dequant_elems(const DeviceWeight& w) {
  if (w.format == WeightFormat::fp16 || w.format == WeightFormat::fp32) return 0;
  return w.rows * w.cols;
}

Status gemm(const DeviceWeight& w, const __half* x, int64_t x_stride, int64_t n, float* y,
            const GemmWorkspace& ws, cudaStream_t stream) {
  if (w.format == WeightFormat::fp32) {
    return Status::error("cuda matmul: an fp32 weight takes the fp32 path, not the fp16 GEMM");
  }
  KS_RETURN_IF_ERROR(bind_stream(ws, stream));
  const float alpha = 1.0f;
  const float beta = 0.0f;
  // Column-major view: y^T[rows, n] = W[rows, cols] · x^T[cols, n]; W is row-major [rows, cols],
  // i.e. column-major [cols, rows], hence op T.
  auto multiply = [&](const __half* weights, int64_t lda, int64_t row_begin, int64_t n_rows) {
    return cublasGemmEx(ws.cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(n_rows), int(n), int(w.cols),
                        &alpha, weights, CUDA_R_16F, int(lda), x, CUDA_R_16F, int(x_stride), &beta,
                        y + row_begin, CUDA_R_32F, int(w.rows), CUBLAS_COMPUTE_32F,
                        CUBLAS_GEMM_DEFAULT);
  };
  if (w.format == WeightFormat::fp16) {
    KS_CUBLAS_CHECK("matmul",
                    multiply(reinterpret_cast<const __half*>(w.data), w.row_bytes / 2, 0, w.rows));
  } else {
    const int64_t slice_rows = std::min<int64_t>(w.rows, ws.dequant_elems / w.cols);
    if (slice_rows <= 0) {
      return Status::error("cuda matmul: prefill dequantization scratch of " +
                           std::to_string(ws.dequant_elems) +
                           " values is smaller than one row of " + std::to_string(w.cols));
    }
    for (int64_t begin = 0; begin < w.rows; begin += slice_rows) {
      const int64_t rows = std::min(slice_rows, w.rows - begin);
      const int64_t groups = rows * (w.cols / kGroup);
      KS_CUDA_CHECK("matmul",
                    launch_pdl(dequantize_fp16_kernel, dim3(unsigned(ceil_div(groups, 256))),
                               dim3(256), 0, stream, w, begin, rows, ws.dequant, int64_t(w.cols)));
      KS_CUDA_CHECK_LAUNCH("matmul", "dequantize_fp16_kernel");
      KS_CUBLAS_CHECK("matmul", multiply(ws.dequant, w.cols, begin, rows));
    }
  }
  return add_bias(w, y, n, stream);
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
