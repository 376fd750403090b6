#include <algorithm>

#include "backend/cuda/act.cuh"
#include "backend/cuda/cuda_check.cuh"

namespace kestrel::cuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) {
  return unsigned(ceil_div(n, kThreads));
}

// Elementwise kernels over [rows, width] (width: the shadow's padded row, or cols without a
// shadow) take a 2-D grid, columns on x and rows on y (grid-strided past 65535 rows), so no
// thread divides a 64-bit flat index. `per_thread` columns per thread.
dim3 grid_2d(int64_t rows, int64_t width, int per_thread = 1) {
  return dim3(unsigned(ceil_div(width, int64_t(kThreads) * per_thread)),
              unsigned(std::min<int64_t>(rows, 65535)));
}

__device__ inline float silu_times(float g, float u) {
  return g / (1.0f + expf(-g)) * u;
}

// swiglu_kernel with four columns a thread (cols a multiple of 4): 16-byte loads and stores,
// and an 8-byte store of the shadow's four halves when it is in natural order. The prefill
// SwiGLU of 1024 x 14336 moves 205 MB (gate, up, out in fp32, the fp16 shadow): the scalar
// kernel took 88 us on the H200, 60% of the copy bandwidth.
__global__ void swiglu4_kernel(float* out, const float* gate, const float* up, int64_t rows,
                               int64_t cols, ShadowOut shadow) {
  pdl_wait();
  pdl_trigger();
  const int64_t width = shadow.data != nullptr ? shadow.row_stride : cols;
  const int64_t c = 4 * (int64_t(blockIdx.x) * blockDim.x + threadIdx.x);
  if (c >= width) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (c < cols) {
      const float4 g = *reinterpret_cast<const float4*>(gate + r * cols + c);
      const float4 u = *reinterpret_cast<const float4*>(up + r * cols + c);
      v = make_float4(silu_times(g.x, u.x), silu_times(g.y, u.y), silu_times(g.z, u.z),
                      silu_times(g.w, u.w));
      *reinterpret_cast<float4*>(out + r * cols + c) = v;
    }
    if (shadow.data == nullptr) continue;
    if (!shadow.permuted) {
      *reinterpret_cast<uint2*>(shadow.data + r * shadow.row_stride + c) =
          make_uint2(pack_half2(v.x, v.y), pack_half2(v.z, v.w));
    } else {
      const float vals[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        shadow.data[shadow_index(r, c + i, shadow.row_stride, true)] = __float2half_rn(vals[i]);
      }
    }
  }
}

// SwiGLU of fp16 gate and up products [rows, cols] (cols a multiple of 8) into the natural fp16
// shadow only, 8 columns a thread: the prefill layer's MLP activation, whose gate and up GEMMs
// store fp16 (half the bytes of fp32 written by cuBLAS and read here).
__global__ void swiglu_half_kernel(const __half* gate, const __half* up, int64_t rows, int64_t cols,
                                   ShadowOut shadow) {
  pdl_wait();
  pdl_trigger();
  const int64_t c = 8 * (int64_t(blockIdx.x) * blockDim.x + threadIdx.x);
  if (c >= shadow.row_stride) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    uint4 packed = make_uint4(0, 0, 0, 0);  // the shadow's padding past cols: zeros
    if (c < cols) {
      const uint4 g = *reinterpret_cast<const uint4*>(gate + r * cols + c);
      const uint4 u = *reinterpret_cast<const uint4*>(up + r * cols + c);
      const __half2* g2 = reinterpret_cast<const __half2*>(&g);
      const __half2* u2 = reinterpret_cast<const __half2*>(&u);
      uint32_t* out = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // A gate product past fp16's range arrives as an infinity: taken as the largest finite
        // value, silu gives what the fp32 product would (about 0 below, the value above)
        // instead of NaN for -inf. NaN stays NaN.
        float2 gf = __half22float2(g2[i]);
        if (isinf(gf.x)) gf.x = copysignf(65504.0f, gf.x);
        if (isinf(gf.y)) gf.y = copysignf(65504.0f, gf.y);
        const float2 uf = __half22float2(u2[i]);
        out[i] = pack_half2(silu_times(gf.x, uf.x), silu_times(gf.y, uf.y));
      }
    }
    *reinterpret_cast<uint4*>(shadow.data + r * shadow.row_stride + c) = packed;
  }
}

__global__ void swiglu_kernel(float* out, const float* gate, const float* up, int64_t rows,
                              int64_t cols, ShadowOut shadow) {
  pdl_wait();
  pdl_trigger();
  const int64_t width = shadow.data != nullptr ? shadow.row_stride : cols;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= width) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    float value = 0.0f;
    if (c < cols) {
      value = silu_times(gate[r * cols + c], up[r * cols + c]);
      out[r * cols + c] = value;
    }
    if (shadow.data != nullptr) {
      shadow.data[shadow_index(r, c, shadow.row_stride, shadow.permuted)] = __float2half_rn(value);
    }
  }
}

__global__ void add_kernel(float* x, const float* y, int64_t n) {
  pdl_wait();
  pdl_trigger();
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < n) x[idx] += y[idx];
}

__global__ void add4_kernel(float4* x, const float4* y, int64_t n4) {
  pdl_wait();
  pdl_trigger();
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < n4) {
    float4 a = x[idx];
    const float4 b = y[idx];
    a.x += b.x;
    a.y += b.y;
    a.z += b.z;
    a.w += b.w;
    x[idx] = a;
  }
}

__global__ void gather_rows_kernel(float* out, const float* x, const int32_t* rows, int64_t cols) {
  pdl_wait();
  pdl_trigger();
  const int64_t i = blockIdx.x;
  const float* src = x + int64_t(rows[i]) * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) out[i * cols + c] = src[c];
}

__global__ void write_shadow_kernel(const float* x, int64_t rows, int64_t cols, ShadowOut shadow) {
  pdl_wait();
  pdl_trigger();
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= shadow.row_stride) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float value = c < cols ? x[r * cols + c] : 0.0f;
    shadow.data[shadow_index(r, c, shadow.row_stride, shadow.permuted)] = __float2half_rn(value);
  }
}

}  // namespace

Status swiglu(float* out, const float* gate, const float* up, int64_t rows, int64_t cols,
              ShadowOut shadow, cudaStream_t stream) {
  const int64_t width = shadow.data != nullptr ? shadow.row_stride : cols;
  if (rows * width == 0) return Status::ok();
  const bool aligned =
      (reinterpret_cast<uintptr_t>(out) | reinterpret_cast<uintptr_t>(gate) |
       reinterpret_cast<uintptr_t>(up) | reinterpret_cast<uintptr_t>(shadow.data)) %
          16 ==
      0;
  if (aligned && cols % 4 == 0 && width % 4 == 0) {
    KS_CUDA_CHECK("swiglu", launch_pdl(swiglu4_kernel, grid_2d(rows, width, 4), dim3(kThreads), 0,
                                       stream, out, gate, up, rows, cols, shadow));
  } else {
    KS_CUDA_CHECK("swiglu", launch_pdl(swiglu_kernel, grid_2d(rows, width), dim3(kThreads), 0,
                                       stream, out, gate, up, rows, cols, shadow));
  }
  KS_CUDA_CHECK_LAUNCH("swiglu", "swiglu_kernel");
  return Status::ok();
}

Status swiglu_half(const __half* gate, const __half* up, int64_t rows, int64_t cols,
                   ShadowOut shadow, cudaStream_t stream) {
  if (shadow.data == nullptr || shadow.permuted || cols % 8 != 0 || shadow.row_stride % 8 != 0 ||
      shadow.row_stride < cols ||
      (reinterpret_cast<uintptr_t>(gate) | reinterpret_cast<uintptr_t>(up) |
       reinterpret_cast<uintptr_t>(shadow.data)) %
              16 !=
          0) {
    return Status::error(
        "cuda swiglu_half: needs a natural shadow, 8-column multiples and 16-byte alignment");
  }
  if (rows == 0) return Status::ok();
  KS_CUDA_CHECK("swiglu", launch_pdl(swiglu_half_kernel, grid_2d(rows, shadow.row_stride, 8),
                                     dim3(kThreads), 0, stream, gate, up, rows, cols, shadow));
  KS_CUDA_CHECK_LAUNCH("swiglu", "swiglu_half_kernel");
  return Status::ok();
}

Status add(float* x, const float* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return Status::ok();
  const bool aligned = (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) % 16 == 0;
  if (aligned && n % 4 == 0) {
    KS_CUDA_CHECK(
        "add", launch_pdl(add4_kernel, dim3(blocks_for(n / 4)), dim3(kThreads), 0, stream,
                          reinterpret_cast<float4*>(x), reinterpret_cast<const float4*>(y), n / 4));
  } else {
    KS_CUDA_CHECK("add",
                  launch_pdl(add_kernel, dim3(blocks_for(n)), dim3(kThreads), 0, stream, x, y, n));
  }
  KS_CUDA_CHECK_LAUNCH("add", "add_kernel");
  return Status::ok();
}

Status gather_rows(float* out, const float* x, const int32_t* rows, int64_t n, int64_t cols,
                   cudaStream_t stream) {
  if (n == 0) return Status::ok();
  // A block per row, as wide as a block goes: the loop's loads wait on nothing but latency, so
  // fewer iterations each are what makes it short (H200, 8B decode: 256 threads took ~11 us).
  constexpr int kGatherThreads = 1024;
  KS_CUDA_CHECK("gather_rows", launch_pdl(gather_rows_kernel, dim3(unsigned(n)),
                                          dim3(kGatherThreads), 0, stream, out, x, rows, cols));
  KS_CUDA_CHECK_LAUNCH("gather_rows", "gather_rows_kernel");
  return Status::ok();
}

Status write_shadow(const float* x, int64_t rows, int64_t cols, ShadowOut shadow,
                    cudaStream_t stream) {
  if (rows == 0) return Status::ok();
  KS_CUDA_CHECK("matmul", launch_pdl(write_shadow_kernel, grid_2d(rows, shadow.row_stride),
                                     dim3(kThreads), 0, stream, x, rows, cols, shadow));
  KS_CUDA_CHECK_LAUNCH("matmul", "write_shadow_kernel");
  return Status::ok();
}

}  // namespace kestrel::cuda
