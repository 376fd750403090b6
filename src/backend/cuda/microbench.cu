// Kernel microbenchmarks for the benchmark binaries: the machine's copy bandwidth (the decode
// roofline) and the decode GEMV alone, on random weights, replayed from a CUDA graph.
#include <algorithm>
#include <vector>

#include "backend/cuda/common.cuh"
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

// ---- Dependency chains (time_chain, cuda_backend.h) ----
namespace {

constexpr int kChainThreads = 256;
// 16-byte loads a thread has in flight: 32 KB a block, about what the decode GEMV's weight ring
// holds; issued before a stage's dependency, then again in each round after it.
constexpr int kChainAhead = 8;

struct ChainArgs {
  const uint4* w = nullptr;    // the stage's weights
  int64_t units = 0;           // their 16-byte units
  const uint4* any = nullptr;  // a unit that exists whatever `units` is
  const float* in = nullptr;   // the stage before's output
  int64_t n_in = 0;
  float* out = nullptr;
  int64_t n_out = 0;
};

// Block b's share [begin, end) of n items.
__device__ inline void chain_share(int64_t n, int64_t* begin, int64_t* end) {
  *begin = n * blockIdx.x / gridDim.x;
  *end = n * (blockIdx.x + 1) / gridDim.x;
}

struct ChainLoads {
  uint4 v[kChainAhead];
};

// One round of the block's weights from unit `first` on (16-byte loads, all in flight at once).
__device__ inline void chain_load(const ChainArgs& s, int64_t first, int64_t end, ChainLoads* l) {
#pragma unroll
  for (int k = 0; k < kChainAhead; ++k) {
    // Every load is issued, past the end from a unit that always exists, so that all of them
    // are in flight before the first is used.
    const int64_t i = first + threadIdx.x + int64_t(k) * kChainThreads;
    const uint4 v = __ldcg(i < end ? s.w + i : s.any);
    l->v[k] = i < end ? v : make_uint4(0, 0, 0, 0);
  }
}

__device__ inline uint32_t chain_fold(const ChainLoads& l, uint32_t x) {
#pragma unroll
  for (int k = 0; k < kChainAhead; ++k) x ^= l.v[k].x ^ l.v[k].y ^ l.v[k].z ^ l.v[k].w;
  return x;
}

// The block's first round of the stage's weights: what may be in flight before its input is.
__device__ inline void chain_issue(const ChainArgs& s, ChainLoads* first) {
  int64_t begin, end;
  chain_share(s.units, &begin, &end);
  chain_load(s, begin, end, first);
}

// The stage after its dependency: the minimum of the whole input, the rest of the block's
// weights, and its share of the outputs (that minimum plus one). `red` holds a float a warp.
__device__ void chain_finish(const ChainArgs& s, const ChainLoads& first, float* red) {
  float low = INFINITY;
  for (int64_t i = threadIdx.x; i < s.n_in; i += kChainThreads) low = fminf(low, __ldcg(s.in + i));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) low = fminf(low, __shfl_xor_sync(0xffffffffu, low, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = low;
  int64_t begin, end;
  chain_share(s.units, &begin, &end);
  uint32_t x = chain_fold(first, 0);
  for (int64_t i = begin + kChainAhead * kChainThreads; i < end; i += kChainAhead * kChainThreads) {
    ChainLoads l;
    chain_load(s, i, end, &l);
    x = chain_fold(l, x);
  }
  // Every weight word is loaded and none changes the outputs: n_out is never negative, which
  // the compiler cannot know, so it keeps the loads.
  if (s.n_out < 0) s.out[0] = float(x);
  __syncthreads();
  low = red[0];
  for (int w = 1; w < kChainThreads / 32; ++w) low = fminf(low, red[w]);
  int64_t out_begin, out_end;
  chain_share(s.n_out, &out_begin, &out_end);
  for (int64_t i = out_begin + threadIdx.x; i < out_end; i += kChainThreads) s.out[i] = low + 1.0f;
  __syncthreads();  // `red` is the next stage's
}

// A kernel a stage. Four blocks fit an SM, so the next stage's two can be resident beside this
// one's two and issue their first loads early. kWait false is the negative control
// (ChainMode::unordered).
// kEarly lets the next stage launch right after the first loads, as the batch-1 GEMVs do;
// otherwise only after the outputs are written, as the batch-16 ones do.
template <bool kWait, bool kEarly>
__global__ void __launch_bounds__(kChainThreads, 4) chain_stage_kernel(ChainArgs s) {
  __shared__ float red[kChainThreads / 32];
  ChainLoads first;
  chain_issue(s, &first);
  if constexpr (kEarly) pdl_trigger();
  if constexpr (kWait) pdl_wait();
  chain_finish(s, first, red);
  if constexpr (!kEarly) pdl_trigger();
}

// One kernel for the whole chain; every block resident (time_chain sizes the grid from the
// occupancy).
__global__ void __launch_bounds__(kChainThreads)
    chain_persistent_kernel(const ChainArgs* stages, int n_stages, unsigned* sync) {
  __shared__ float red[kChainThreads / 32];
  ChainLoads first;
  chain_issue(stages[0], &first);
  for (int s = 0; s < n_stages; ++s) {
    const ChainArgs stage = stages[s];
    if (s > 0) grid_barrier(sync, sync + 1);
    chain_finish(stage, first, red);
    if (s + 1 < n_stages) chain_issue(stages[s + 1], &first);
  }
}

const char* chain_mode_name(ChainMode mode) {
  switch (mode) {
    case ChainMode::launch:
      return "launch";
    case ChainMode::pdl:
      return "pdl";
    case ChainMode::pdl_late:
      return "pdl_late";
    case ChainMode::persistent:
      return "persistent";
    case ChainMode::unordered:
      return "unordered";
  }
  return "?";
}

}  // namespace

Result<ChainTiming> time_chain(ChainMode mode, const std::vector<ChainStage>& stages, int trials) {
  const int64_t n = int64_t(stages.size());
  // Outputs stay exact in fp32: the last one of the last replay is (trials + 1) * n.
  if (n < 2 || n > 4096 || trials < 1 || (int64_t(trials) + 1) * n >= (int64_t(1) << 24)) {
    return Status::error("bench: a chain takes 2 to 4096 stages and (trials + 1) x stages < 2^24");
  }
  int64_t units = 0, floats = 0;
  for (const ChainStage& s : stages) {
    if (s.weight_bytes < 0 || s.weight_bytes > (int64_t(1) << 36) || s.outputs < 1 ||
        s.outputs > (int64_t(1) << 24)) {
      return Status::error("bench: a chain stage's bytes or outputs are out of range");
    }
    units += ceil_div(s.weight_bytes, 16);
    floats += s.outputs;
  }
  int device = 0, sm_count = 0, per_sm = 0;
  KS_CUDA_CHECK("bench", cudaGetDevice(&device));
  KS_CUDA_CHECK("bench", cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  if (mode == ChainMode::persistent) {
    KS_CUDA_CHECK("bench", cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                               &per_sm, chain_persistent_kernel, kChainThreads, 0));
  } else {
    KS_CUDA_CHECK("bench", cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                               &per_sm, chain_stage_kernel<true, true>, kChainThreads, 0));
  }
  if (per_sm < 1) return Status::error("bench: the chain kernel does not fit an SM");
  // Two blocks an SM, as the decode GEMVs keep two or three.
  const int blocks = sm_count * std::min(per_sm, 2);

  Allocations a;
  KS_RETURN_IF_ERROR(a.init());
  KS_ASSIGN_OR_RETURN(void* weights, a.alloc(size_t(std::max<int64_t>(units, 1)) * 16));
  KS_RETURN_IF_ERROR(
      fill_random(weights, size_t(std::max<int64_t>(units, 1)) * 16, 31, 0xffffffffu, 0, a.stream));
  KS_ASSIGN_OR_RETURN(void* outputs, a.alloc(size_t(floats) * sizeof(float)));
  KS_CUDA_CHECK("bench", cudaMemsetAsync(outputs, 0, size_t(floats) * sizeof(float), a.stream));
  std::vector<ChainArgs> args(static_cast<size_t>(n));
  std::vector<int64_t> out_offset(static_cast<size_t>(n));
  int64_t unit = 0, offset = 0;
  for (int64_t s = 0; s < n; ++s) {
    ChainArgs& c = args[size_t(s)];
    c.w = static_cast<const uint4*>(weights) + unit;
    c.any = static_cast<const uint4*>(weights);
    c.units = ceil_div(stages[size_t(s)].weight_bytes, 16);
    c.out = static_cast<float*>(outputs) + offset;
    c.n_out = stages[size_t(s)].outputs;
    out_offset[size_t(s)] = offset;
    unit += c.units;
    offset += c.n_out;
  }
  for (int64_t s = 0; s < n; ++s) {  // the first stage reads the last one's (the step before's)
    const ChainArgs& before = args[size_t((s + n - 1) % n)];
    args[size_t(s)].in = before.out;
    args[size_t(s)].n_in = before.n_out;
  }
  ChainArgs* device_args = nullptr;
  unsigned* sync = nullptr;
  if (mode == ChainMode::persistent) {
    KS_ASSIGN_OR_RETURN(void* d, a.alloc(args.size() * sizeof(ChainArgs)));
    device_args = static_cast<ChainArgs*>(d);
    KS_CUDA_CHECK("bench",
                  cudaMemcpyAsync(device_args, args.data(), args.size() * sizeof(ChainArgs),
                                  cudaMemcpyHostToDevice, a.stream));
    KS_ASSIGN_OR_RETURN(void* w, a.alloc(2 * sizeof(unsigned)));
    sync = static_cast<unsigned*>(w);
    KS_CUDA_CHECK("bench", cudaMemsetAsync(sync, 0, 2 * sizeof(unsigned), a.stream));
  }
  KS_CUDA_CHECK("bench", cudaStreamSynchronize(a.stream));

  KS_CUDA_CHECK("bench", cudaStreamBeginCapture(a.stream, cudaStreamCaptureModeThreadLocal));
  cudaError_t launched = cudaSuccess;
  if (mode == ChainMode::persistent) {
    chain_persistent_kernel<<<unsigned(blocks), kChainThreads, 0, a.stream>>>(device_args, int(n),
                                                                              sync);
    launched = cudaGetLastError();
  } else {
    for (int64_t s = 0; s < n && launched == cudaSuccess; ++s) {
      const ChainArgs& c = args[size_t(s)];
      const dim3 grid{unsigned(blocks)}, block{unsigned(kChainThreads)};
      if (mode == ChainMode::launch) {
        chain_stage_kernel<true, true><<<grid, block, 0, a.stream>>>(c);
        launched = cudaGetLastError();
      } else if (mode == ChainMode::pdl) {
        launched = launch_pdl(chain_stage_kernel<true, true>, grid, block, 0, a.stream, c);
      } else if (mode == ChainMode::pdl_late) {
        launched = launch_pdl(chain_stage_kernel<true, false>, grid, block, 0, a.stream, c);
      } else {
        launched = launch_pdl(chain_stage_kernel<false, true>, grid, block, 0, a.stream, c);
      }
    }
  }
  const cudaError_t captured = cudaStreamEndCapture(a.stream, &a.graph);
  KS_CUDA_CHECK("bench", launched);
  KS_CUDA_CHECK("bench", captured);
  KS_ASSIGN_OR_RETURN(double ms, a.time_graph(trials));

  // time_graph replayed trials + 1 times: stage s of the last replay wrote trials * n + s + 1.
  std::vector<float> host(static_cast<size_t>(floats));
  KS_CUDA_CHECK("bench", cudaMemcpy(host.data(), outputs, host.size() * sizeof(float),
                                    cudaMemcpyDeviceToHost));
  for (int64_t s = 0; s < n; ++s) {
    const float expected = float(int64_t(trials) * n + s + 1);
    for (int64_t i = 0; i < stages[size_t(s)].outputs; ++i) {
      const float got = host[size_t(out_offset[size_t(s)] + i)];
      if (got != expected) {
        return Status::error("bench: chain (" + std::string(chain_mode_name(mode)) + ") stage " +
                             std::to_string(s) + " output " + std::to_string(i) + " is " +
                             std::to_string(got) + ", not " + std::to_string(expected) +
                             ": a stage read its input before the stage before wrote it");
      }
    }
  }
  ChainTiming t;
  t.microseconds = ms * 1e3;
  t.bytes = double(units) * 16.0;
  t.blocks = blocks;
  return t;
}

}  // namespace kestrel::cuda
