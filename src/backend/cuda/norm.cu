#include "backend/cuda/cuda_check.cuh"
#include "backend/cuda/norm.cuh"

namespace kestrel::cuda {
namespace {

constexpr int kNormThreads = 512;

__global__ void __launch_bounds__(kNormThreads)
    rms_norm_kernel(float* out, const float* x, const float* w, float eps, int64_t cols,
                    ShadowOut shadow) {
  pdl_wait();
  pdl_trigger();
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const float* in = x + r * cols;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < cols; i += kNormThreads) sum += in[i] * in[i];
  sum = block_sum(sum, scratch);
  const float scale = 1.0f / sqrtf(sum / float(cols) + eps);
  float* o = out != nullptr ? out + r * cols : nullptr;
  const int64_t width = shadow.data != nullptr ? shadow.row_stride : cols;
  for (int64_t i = threadIdx.x; i < width; i += kNormThreads) {
    float value = 0.0f;
    if (i < cols) {
      value = w[i] * (in[i] * scale);
      if (out != nullptr) o[i] = value;
    }
    if (shadow.data != nullptr) {
      shadow.data[shadow_index(r, i, shadow.row_stride, shadow.permuted)] = __float2half_rn(value);
    }
  }
}

}  // namespace

Status rms_norm(float* out, const float* x, const float* w, float eps, int64_t rows, int64_t cols,
                ShadowOut shadow, cudaStream_t stream) {
  if (rows == 0) return Status::ok();
  if (out == nullptr && shadow.data == nullptr) {
    return Status::error("cuda rms_norm: neither an output nor a shadow to write");
  }
  KS_CUDA_CHECK("rms_norm", launch_pdl(rms_norm_kernel, dim3(unsigned(rows)), dim3(kNormThreads), 0,
                                       stream, out, x, w, eps, cols, shadow));
  KS_CUDA_CHECK_LAUNCH("rms_norm", "rms_norm_kernel");
  return Status::ok();
}

}  // namespace kestrel::cuda
