#include "backend/cuda/cuda_check.cuh"
#include "backend/cuda/gemv.cuh"
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

// The int8 half groups (shadow.tokens, TokenHalvesOut) of columns 4j .. 4j + 3 of row `row` of a
// permuted shadow, each lane of a run of eight (a group: lanes 0-3 its first half, 4-7 its
// second) calling this with its four values: writes their codes (in the slots store_shadow4
// gives them) and, from the run's first lane, the group's two scales; returns the values the
// codes stand for, which the shadow then holds.
__device__ inline float4 store_token_halves(const ShadowOut& shadow, int64_t row, int j, float4 a) {
  float v[4] = {__half2float(__float2half_rn(a.x)), __half2float(__float2half_rn(a.y)),
                __half2float(__float2half_rn(a.z)), __half2float(__float2half_rn(a.w))};
  uint32_t q[4];
  const __half bits = token_half4(v, q);
  // store_shadow4's slots: the four columns go to b, b + 2, b + 1, b + 3.
  reinterpret_cast<uint32_t*>(shadow.tokens.codes + row * shadow.row_stride)[shadow4_slot(j) / 4] =
      q[0] | q[2] << 8 | q[1] << 16 | q[3] << 24;
  const __half second = __shfl_down_sync(run_lanes<8>(), bits, 4, 8);
  if ((j & 7) == 0) {
    shadow.tokens.scales[row * (shadow.row_stride / kGroup) + (j >> 3)] =
        __halves2half2(bits, second);
  }
  return make_float4(v[0], v[1], v[2], v[3]);
}

// The same norm for rows of float4s (cols % 4 == 0, aligned pointers) of at most
// kPer * kVecThreads float4 (shadow padding included): a thread keeps its share of the row in
// registers from the sum of squares to the scaling, the norm weight (which no earlier kernel
// writes) is loaded before the wait for the previous kernel, and the shadow is written as fp16
// pairs (store_shadow4, as gemv.cu's normalize_input). A decode step's norms are latency:
// one L2 round trip after the wait instead of three.
constexpr int kVecThreads = 256;

template <int kPer>
__global__ void __launch_bounds__(kVecThreads)
    rms_norm_vec_kernel(float* out, const float* x, const float* w, float eps, int64_t cols,
                        ShadowOut shadow) {
  __shared__ float scratch[32];
  const int n4 = int(cols / 4);
  const int width4 = shadow.data != nullptr ? int(shadow.row_stride / 4) : n4;
  const float4* w4 = reinterpret_cast<const float4*>(w);
  float4 g[kPer];
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int j = int(threadIdx.x) + r * kVecThreads;
    if (j < n4) g[r] = w4[j];
  }
  pdl_wait();
  pdl_trigger();
  const int64_t row = blockIdx.x;
  const float4* x4 = reinterpret_cast<const float4*>(x + row * cols);
  float4 v[kPer];
  float sum = 0.0f;
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int j = int(threadIdx.x) + r * kVecThreads;
    if (j < n4) {
      v[r] = x4[j];
      sum += v[r].x * v[r].x + v[r].y * v[r].y + v[r].z * v[r].z + v[r].w * v[r].w;
    }
  }
  sum = block_sum(sum, scratch);
  const float scale = 1.0f / sqrtf(sum / float(cols) + eps);
  float4* o4 = out != nullptr ? reinterpret_cast<float4*>(out + row * cols) : nullptr;
  uint32_t* s32 = shadow.data != nullptr
                      ? reinterpret_cast<uint32_t*>(shadow.data + row * shadow.row_stride)
                      : nullptr;
  const bool tokens = s32 != nullptr && shadow.tokens.codes != nullptr;
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int j = int(threadIdx.x) + r * kVecThreads;  // columns 4j .. 4j + 3
    if (j >= width4) continue;  // width4 is whole groups: a group's 8 lanes go on together
    float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);  // the shadow's padding past cols is zero
    if (j < n4) {
      a = make_float4(g[r].x * (v[r].x * scale), g[r].y * (v[r].y * scale),
                      g[r].z * (v[r].z * scale), g[r].w * (v[r].w * scale));
      if (o4 != nullptr) o4[j] = a;
    }
    if (tokens) a = store_token_halves(shadow, row, j, a);
    if (s32 != nullptr) store_shadow4(s32, j, a, shadow.permuted);
  }
}

template <int kPer>
cudaError_t launch_vec(int64_t rows, float* out, const float* x, const float* w, float eps,
                       int64_t cols, ShadowOut shadow, cudaStream_t stream) {
  return launch_pdl(rms_norm_vec_kernel<kPer>, dim3(unsigned(rows)), dim3(kVecThreads), 0, stream,
                    out, x, w, eps, cols, shadow);
}

bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

}  // namespace

Status rms_norm(float* out, const float* x, const float* w, float eps, int64_t rows, int64_t cols,
                ShadowOut shadow, cudaStream_t stream) {
  if (rows == 0) return Status::ok();
  if (out == nullptr && shadow.data == nullptr) {
    return Status::error("cuda rms_norm: neither an output nor a shadow to write");
  }
  if (shadow.tokens.codes != nullptr &&
      (shadow.data == nullptr || !shadow.permuted || shadow.tokens.scales == nullptr ||
       (reinterpret_cast<uintptr_t>(shadow.tokens.codes) & 15) != 0 ||
       (reinterpret_cast<uintptr_t>(shadow.data) & 15) != 0 || shadow.row_stride % kGroup != 0 ||
       (reinterpret_cast<uintptr_t>(shadow.tokens.scales) & 3) != 0)) {
    return Status::error(
        "cuda rms_norm: int8 half groups need a permuted shadow and aligned buffers");
  }
  // float4 rows where they fit: the shadow's rows whole groups (its padding in float4s too).
  const int64_t width = shadow.data != nullptr ? shadow.row_stride : cols;
  const int64_t per = (width / 4 + kVecThreads - 1) / kVecThreads;
  const bool vec =
      cols % 4 == 0 && aligned16(x) && aligned16(w) && (out == nullptr || aligned16(out)) &&
      (shadow.data == nullptr || (shadow.row_stride % kGroup == 0 && shadow.row_stride >= cols &&
                                  (reinterpret_cast<uintptr_t>(shadow.data) & 3) == 0)) &&
      per <= 8;
  cudaError_t launched;
  if (!vec) {
    launched = launch_pdl(rms_norm_kernel, dim3(unsigned(rows)), dim3(kNormThreads), 0, stream, out,
                          x, w, eps, cols, shadow);
  } else if (per <= 1) {
    launched = launch_vec<1>(rows, out, x, w, eps, cols, shadow, stream);
  } else if (per <= 2) {
    launched = launch_vec<2>(rows, out, x, w, eps, cols, shadow, stream);
  } else if (per <= 4) {
    launched = launch_vec<4>(rows, out, x, w, eps, cols, shadow, stream);
  } else {
    launched = launch_vec<8>(rows, out, x, w, eps, cols, shadow, stream);
  }
  KS_CUDA_CHECK("rms_norm", launched);
  KS_CUDA_CHECK_LAUNCH("rms_norm", "rms_norm_kernel");
  // The row kernel writes no int8 half groups: a second launch quantizes its shadow in place.
  if (shadow.tokens.codes != nullptr && !vec) {
    return requantize_token_half_groups(shadow.data, int(rows), shadow.row_stride,
                                        shadow.tokens.codes, shadow.tokens.scales, stream);
  }
  return Status::ok();
}

}  // namespace kestrel::cuda
