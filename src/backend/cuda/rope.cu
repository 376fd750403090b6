#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_check.cuh"
#include "backend/cuda/rope.cuh"

namespace kestrel::cuda {
namespace {

__global__ void rope_kernel(float* q, float* k, int n_heads, int n_kv_heads, int head_dim,
                            const int32_t* positions, const float* inv_freq) {
  pdl_wait();
  pdl_trigger();
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const float pos = float(positions[t]);
  const int pairs = (n_heads + n_kv_heads) * half;
  for (int idx = threadIdx.x; idx < pairs; idx += blockDim.x) {
    const int head = idx / half;
    const int i = idx % half;
    // As HF: the angle is an fp32 product, then fp32 cos and sin.
    float sin_v, cos_v;
    sincosf(pos * inv_freq[i], &sin_v, &cos_v);
    float* base = head < n_heads ? q + (t * n_heads + head) * head_dim
                                 : k + (t * n_kv_heads + (head - n_heads)) * head_dim;
    const float a = base[i];
    const float b = base[i + half];
    base[i] = a * cos_v - b * sin_v;
    base[i + half] = b * cos_v + a * sin_v;
  }
}

}  // namespace

Status rope(float* q, float* k, int64_t n_tokens, int n_heads, int n_kv_heads, int head_dim,
            const int32_t* positions, const float* inv_freq, cudaStream_t stream) {
  if (n_tokens == 0) return Status::ok();
  KS_CUDA_CHECK("rope", launch_pdl(rope_kernel, dim3(unsigned(n_tokens)), dim3(256), 0, stream, q,
                                   k, n_heads, n_kv_heads, head_dim, positions, inv_freq));
  KS_CUDA_CHECK_LAUNCH("rope", "rope_kernel");
  return Status::ok();
}

}  // namespace kestrel::cuda
