// Kernel microbenchmarks for the benchmark binaries: the machine's copy bandwidth (the decode
// roofline) and the decode GEMV alone, on random weights, replayed from a CUDA graph.
#include <algorithm>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.cuh"
#include "backend/cuda/gemv.cuh"
#include "core/stats.h"

namespace kestrel::cuda {
namespace {

__global__ void fill_random_kernel(uint32_t* out, int64_t n, uint64_t seed, uint32_t mask,
                                   uint32_t add) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint64_t z = seed + uint64_t(i) * 0x9e3779b97f4a7c15ull;  // splitmix64
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  out[i] = (uint32_t(z) & mask) + add;
}

// Words of random bits; with mask/add, e.g. fp16 pairs in [2^-7, 2^-6) (0x2000..0x23ff).
Status fill_random(void* p, size_t bytes, uint64_t seed, uint32_t mask, uint32_t add,
                   cudaStream_t stream) {
  const int64_t n = int64_t(bytes / 4);
  fill_random_kernel<<<unsigned(ceil_div(n, 256)), 256, 0, stream>>>(static_cast<uint32_t*>(p), n,
                                                                     seed, mask, add);
  KS_CUDA_CHECK_LAUNCH("bench", "fill_random_kernel");
  return Status::ok();
}

// dst = src, 64 bytes a thread per iteration in flight: what the SMs can stream through the memory
// (a memcpy node may run on the copy engines, which are slower).
__global__ void copy_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = src[i], b = src[i + stride], c = src[i + 2 * stride], d = src[i + 3 * stride];
    dst[i] = a;
    dst[i + stride] = b;
    dst[i + 2 * stride] = c;
    dst[i + 3 * stride] = d;
  }
  for (; i < n; i += stride) dst[i] = src[i];
}

// Frees what the benchmark allocated, whatever path it leaves by.
struct Allocations {
  std::vector<void*> ptrs;
  cudaStream_t stream = nullptr;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  ~Allocations() {
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    if (graph != nullptr) cudaGraphDestroy(graph);
    if (start != nullptr) cudaEventDestroy(start);
    if (stop != nullptr) cudaEventDestroy(stop);
    for (void* p : ptrs) cudaFree(p);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
  Result<void*> alloc(size_t bytes) {
    void* p = nullptr;
    KS_CUDA_CHECK("bench", cudaMalloc(&p, bytes));
    ptrs.push_back(p);
    return p;
  }
  Status init() {
    KS_CUDA_CHECK("bench", cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    KS_CUDA_CHECK("bench", cudaEventCreate(&start));
    KS_CUDA_CHECK("bench", cudaEventCreate(&stop));
    return Status::ok();
  }
  // Median over `trials` of the milliseconds one replay of the captured graph takes.
  Result<double> time_graph(int trials) {
    KS_CUDA_CHECK("bench", cudaGraphInstantiate(&exec, graph, 0));
    KS_CUDA_CHECK("bench", cudaGraphLaunch(exec, stream));  // warm-up
    std::vector<double> ms;
    for (int t = 0; t < trials; ++t) {
      KS_CUDA_CHECK("bench", cudaEventRecord(start, stream));
      KS_CUDA_CHECK("bench", cudaGraphLaunch(exec, stream));
      KS_CUDA_CHECK("bench", cudaEventRecord(stop, stream));
      KS_CUDA_CHECK("bench", cudaEventSynchronize(stop));
      float elapsed = 0;
      KS_CUDA_CHECK("bench", cudaEventElapsedTime(&elapsed, start, stop));
      ms.push_back(double(elapsed));
    }
    return median(ms);
  }
};

}  // namespace

Result<double> measure_copy_gbs() {
  constexpr size_t kBytes = size_t(1) << 30;
  Allocations a;
  KS_RETURN_IF_ERROR(a.init());
  KS_ASSIGN_OR_RETURN(void* src, a.alloc(kBytes));
  KS_ASSIGN_OR_RETURN(void* dst, a.alloc(kBytes));
  KS_RETURN_IF_ERROR(fill_random(src, kBytes, 1, 0xffffffffu, 0, a.stream));
  KS_CUDA_CHECK("bench", cudaStreamBeginCapture(a.stream, cudaStreamCaptureModeThreadLocal));
  int device = 0, sm_count = 0;
  KS_CUDA_CHECK("bench", cudaGetDevice(&device));
  KS_CUDA_CHECK("bench", cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  copy_kernel<<<unsigned(sm_count * 4), 512, 0, a.stream>>>(
      static_cast<const uint4*>(src), static_cast<uint4*>(dst), int64_t(kBytes / 16));
  KS_CUDA_CHECK_LAUNCH("bench", "copy_kernel");
  KS_CUDA_CHECK("bench", cudaStreamEndCapture(a.stream, &a.graph));
  KS_ASSIGN_OR_RETURN(double ms, a.time_graph(7));
  return 2.0 * double(kBytes) / (ms * 1e-3) / 1e9;
}

Result<GemvTiming> time_gemv(WeightFormat format, int64_t rows, int64_t cols, int n_tokens) {
  if (format != WeightFormat::sym_int4 && format != WeightFormat::asym_int4 &&
      format != WeightFormat::sym_int8 && format != WeightFormat::fp16) {
    return Status::error("bench: no GEMV for this format");
  }
  if (cols % 64 != 0 || rows < 1 || n_tokens < 1 || n_tokens > kMaxGemvTokens) {
    return Status::error("bench: GEMV shape out of range");
  }
  int device = 0, sm_count = 0;
  KS_CUDA_CHECK("bench", cudaGetDevice(&device));
  KS_CUDA_CHECK("bench", cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int block = 32;
  const bool quantized = format != WeightFormat::fp16;
  const int64_t row_bytes = format == WeightFormat::fp16       ? cols * 2
                            : format == WeightFormat::sym_int8 ? cols
                                                               : cols / 2;
  const bool tiled = is_tiled(format);
  const Int4Tiles tiles = Int4Tiles::of(rows, cols, block);
  const size_t data_bytes = size_t(tiled ? tiles.data_bytes() : rows * row_bytes);
  const size_t scale_bytes = !quantized ? 0
                             : tiled    ? size_t(tiles.scale_halves() * 2)
                                        : size_t(rows * (cols / block) * 2);
  const size_t min_bytes = format == WeightFormat::asym_int4 ? scale_bytes : 0;
  const size_t weight_bytes = data_bytes + scale_bytes + min_bytes;
  // Enough copies of the weight that one pass over them is several times the 60 MB L2, so
  // every call streams from device memory as a decode step does.
  const int copies =
      int(std::max<size_t>(2, ((size_t(512) << 20) + weight_bytes - 1) / weight_bytes));
  constexpr int kCallsPerReplay = 64;

  Allocations a;
  KS_RETURN_IF_ERROR(a.init());
  std::vector<DeviceWeight> weights(static_cast<size_t>(copies));
  for (int c = 0; c < copies; ++c) {
    DeviceWeight& w = weights[size_t(c)];
    w.format = format;
    w.rows = rows;
    w.cols = cols;
    w.block = quantized ? block : 0;
    w.row_bytes = tiled ? 0 : row_bytes;
    w.tiles = tiles;
    KS_ASSIGN_OR_RETURN(void* d, a.alloc(data_bytes));
    // fp16 weights: values in [2^-7, 2^-6) with random signs; quantized: random codes.
    KS_RETURN_IF_ERROR(
        quantized ? fill_random(d, data_bytes, 10 + c, 0xffffffffu, 0, a.stream)
                  : fill_random(d, data_bytes, 10 + c, 0x83ff83ffu, 0x20002000u, a.stream));
    w.data = static_cast<const uint8_t*>(d);
    if (quantized) {
      KS_ASSIGN_OR_RETURN(void* s, a.alloc(scale_bytes));
      KS_RETURN_IF_ERROR(fill_random(s, scale_bytes, 1000 + c, 0x03ff03ffu, 0x20002000u, a.stream));
      w.scales = static_cast<const __half*>(s);
    }
    if (min_bytes > 0) {
      KS_ASSIGN_OR_RETURN(void* m, a.alloc(min_bytes));
      KS_RETURN_IF_ERROR(fill_random(m, min_bytes, 2000 + c, 0x03ff03ffu, 0xa000a000u, a.stream));
      w.mins = static_cast<const __half*>(m);
    }
  }
  const int64_t x_stride = cols;
  KS_ASSIGN_OR_RETURN(void* x, a.alloc(size_t(n_tokens * x_stride * 2)));
  KS_RETURN_IF_ERROR(
      fill_random(x, size_t(n_tokens * x_stride * 2), 7, 0x83ff83ffu, 0x38003800u, a.stream));
  KS_ASSIGN_OR_RETURN(void* y, a.alloc(size_t(n_tokens * rows * 4)));

  KS_CUDA_CHECK("bench", cudaStreamBeginCapture(a.stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < kCallsPerReplay; ++i) {
    GemvJob job;
    job.w = weights[size_t(i % copies)];
    job.y = static_cast<float*>(y);
    const Status s =
        gemv(&job, 1, static_cast<const __half*>(x), x_stride, n_tokens, sm_count, a.stream);
    if (!s.is_ok()) {
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(a.stream, &g);
      if (g != nullptr) cudaGraphDestroy(g);
      return s;
    }
  }
  KS_CUDA_CHECK("bench", cudaStreamEndCapture(a.stream, &a.graph));
  KS_ASSIGN_OR_RETURN(double ms, a.time_graph(5));
  GemvTiming t;
  t.microseconds = ms * 1e3 / kCallsPerReplay;
  t.bytes = double(weight_bytes);
  return t;
}

}  // namespace kestrel::cuda
