// Kernel microbenchmarks for the benchmark binaries: the machine's copy bandwidth (the decode
// roofline), the decode GEMV alone on random weights, and what a dependency between decode stages
// costs (time_chain), each replayed from a CUDA graph.
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.cuh"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/norm.cuh"
#include "core/half.h"
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
  // Median over `trials` of the milliseconds one replay of the captured graph takes, after
  // kWarmUps replays.
  static constexpr int kWarmUps = 1;
  Result<double> time_graph(int trials) {
    KS_CUDA_CHECK("bench", cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < kWarmUps; ++i) KS_CUDA_CHECK("bench", cudaGraphLaunch(exec, stream));
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
  KS_ASSIGN_OR_RETURN(const int sm_count, device_sm_count("bench"));
  copy_kernel<<<unsigned(sm_count * 4), 512, 0, a.stream>>>(
      static_cast<const uint4*>(src), static_cast<uint4*>(dst), int64_t(kBytes / 16));
  KS_CUDA_CHECK_LAUNCH("bench", "copy_kernel");
  KS_CUDA_CHECK("bench", cudaStreamEndCapture(a.stream, &a.graph));
  KS_ASSIGN_OR_RETURN(double ms, a.time_graph(7));
  return 2.0 * double(kBytes) / (ms * 1e-3) / 1e9;
}

namespace {

// The bytes one weight of this shape takes on the device (data, scales, mins), and a weight of
// random values in `a` (seed c: weights of distinct seeds differ), as time_gemv and
// check_gemv_int8_activations make them.
struct RandomWeights {
  WeightFormat format;
  int64_t rows, cols;
  static constexpr int kBlock = 32;
  bool quantized() const { return format != WeightFormat::fp16; }
  bool tiled() const { return is_tiled(format); }
  Int4Tiles tiles() const { return Int4Tiles::of(rows, cols, kBlock); }
  int64_t row_bytes() const {
    return format == WeightFormat::fp16       ? cols * 2
           : format == WeightFormat::sym_int8 ? cols
                                              : cols / 2;
  }
  size_t data_bytes() const { return size_t(tiled() ? tiles().data_bytes() : rows * row_bytes()); }
  size_t scale_bytes() const {
    return !quantized() ? 0
           : tiled()    ? size_t(tiles().scale_halves() * 2)
                        : size_t(rows * (cols / kBlock) * 2);
  }
  size_t min_bytes() const { return format == WeightFormat::asym_int4 ? scale_bytes() : 0; }
  size_t bytes() const { return data_bytes() + scale_bytes() + min_bytes(); }

  Result<DeviceWeight> make(Allocations& a, int c) const {
    DeviceWeight w;
    w.format = format;
    w.rows = rows;
    w.cols = cols;
    w.block = quantized() ? kBlock : 0;
    w.row_bytes = tiled() ? 0 : row_bytes();
    w.tiles = tiles();
    KS_ASSIGN_OR_RETURN(void* d, a.alloc(data_bytes()));
    // fp16 weights: values in [2^-7, 2^-6) with random signs; quantized: random codes.
    KS_RETURN_IF_ERROR(
        quantized() ? fill_random(d, data_bytes(), 10 + c, 0xffffffffu, 0, a.stream)
                    : fill_random(d, data_bytes(), 10 + c, 0x83ff83ffu, 0x20002000u, a.stream));
    w.data = static_cast<const uint8_t*>(d);
    if (quantized()) {
      KS_ASSIGN_OR_RETURN(void* sc, a.alloc(scale_bytes()));
      KS_RETURN_IF_ERROR(
          fill_random(sc, scale_bytes(), 1000 + c, 0x03ff03ffu, 0x20002000u, a.stream));
      w.scales = static_cast<const __half*>(sc);
    }
    if (min_bytes() > 0) {
      KS_ASSIGN_OR_RETURN(void* m, a.alloc(min_bytes()));
      KS_RETURN_IF_ERROR(fill_random(m, min_bytes(), 2000 + c, 0x03ff03ffu, 0xa000a000u, a.stream));
      w.mins = static_cast<const __half*>(m);
    }
    return w;
  }
};

bool benchable(WeightFormat format) {
  return format == WeightFormat::sym_int4 || format == WeightFormat::asym_int4 ||
         format == WeightFormat::sym_int8 || format == WeightFormat::fp16;
}

}  // namespace

Result<GemvTiming> time_gemv(WeightFormat format, int64_t rows, int64_t cols, int n_tokens,
                             bool int8_activations) {
  if (!benchable(format)) return Status::error("bench: no GEMV for this format");
  if (cols % 64 != 0 || rows < 1 || n_tokens < 1 || n_tokens > kMaxGemvTokens) {
    return Status::error("bench: GEMV shape out of range");
  }
  KS_ASSIGN_OR_RETURN(const int sm_count, device_sm_count("bench"));
  const RandomWeights shape{format, rows, cols};
  const size_t weight_bytes = shape.bytes();
  // Enough copies of the weight that one pass over them is several times the 60 MB L2, so
  // every call streams from device memory as a decode step does.
  const int copies =
      int(std::max<size_t>(2, ((size_t(512) << 20) + weight_bytes - 1) / weight_bytes));
  constexpr int kCallsPerReplay = 64;

  Allocations a;
  KS_RETURN_IF_ERROR(a.init());
  std::vector<DeviceWeight> weights;
  for (int c = 0; c < copies; ++c) {
    KS_ASSIGN_OR_RETURN(DeviceWeight w, shape.make(a, c));
    weights.push_back(w);
  }
  const int64_t x_stride = cols;
  KS_ASSIGN_OR_RETURN(void* x, a.alloc(size_t(n_tokens * x_stride * 2)));
  KS_RETURN_IF_ERROR(
      fill_random(x, size_t(n_tokens * x_stride * 2), 7, 0x83ff83ffu, 0x38003800u, a.stream));
  KS_ASSIGN_OR_RETURN(void* y, a.alloc(size_t(n_tokens * rows * 4)));
  TokenHalfGroups tokens_in;
  if (int8_activations) {
    KS_ASSIGN_OR_RETURN(void* codes, a.alloc(size_t(n_tokens * x_stride)));
    KS_ASSIGN_OR_RETURN(void* scales, a.alloc(size_t(n_tokens * (x_stride / kGroup) * 4)));
    KS_RETURN_IF_ERROR(quantize_token_half_groups(static_cast<const __half*>(x), n_tokens, x_stride,
                                                  static_cast<uint8_t*>(codes),
                                                  static_cast<__half2*>(scales), a.stream));
    tokens_in =
        TokenHalfGroups{static_cast<const uint8_t*>(codes), static_cast<const __half2*>(scales)};
  }
  const uint64_t int8_before = gemv_int8_activation_launches();

  KS_CUDA_CHECK("bench", cudaStreamBeginCapture(a.stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < kCallsPerReplay; ++i) {
    GemvJob job;
    job.w = weights[size_t(i % copies)];
    job.y = static_cast<float*>(y);
    const Status s = gemv(&job, 1, static_cast<const __half*>(x), x_stride, n_tokens, sm_count,
                          a.stream, GemvEpilogue::store, {}, {}, {}, {}, {}, tokens_in);
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
  t.int8_activations = gemv_int8_activation_launches() > int8_before;
  return t;
}

Result<NormTokenCheck> check_norm_token_halves(int64_t rows, int64_t cols, uint64_t seed) {
  if (rows < 1 || rows > kMaxGemvBatchTokens || cols < 4 * kGroup || cols > 8192) {
    return Status::error("check: norm shape out of range");
  }
  Allocations a;
  KS_RETURN_IF_ERROR(a.init());
  NormTokenCheck out;
  out.stride = round_up(cols, kGroup);
  const size_t n_halves = size_t(rows * out.stride);
  const size_t n_scales = size_t(rows * (out.stride / kGroup));
  // Rows of values in [-2, 2); a norm weight in [0.5, 1.5) but for the quantizer's special cases
  // in the first groups: a NaN (group 0, half 0) and an Inf (group 0, half 1) in every row, a
  // half of zeros (group 1), and halves of ~1e-6 (scales that round to zero) and ~1e-4 (fp16
  // subnormal scales) (groups 2 and 3).
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> value(-2.0f, 2.0f), gain(0.5f, 1.5f);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  std::vector<float> w(static_cast<size_t>(cols));
  for (float& v : x) v = value(rng);
  for (float& v : w) v = gain(rng);
  w[3] = std::numeric_limits<float>::quiet_NaN();
  w[20] = std::numeric_limits<float>::infinity();
  for (int c = 0; c < 16; ++c) {
    w[size_t(kGroup + c)] = 0.0f;
    w[size_t(2 * kGroup + c)] = 1e-6f * gain(rng);
    w[size_t(3 * kGroup + c)] = 1e-4f * gain(rng);
  }
  KS_ASSIGN_OR_RETURN(void* xd, a.alloc(x.size() * 4));
  KS_ASSIGN_OR_RETURN(void* wd, a.alloc(w.size() * 4));
  KS_CUDA_CHECK("check",
                cudaMemcpyAsync(xd, x.data(), x.size() * 4, cudaMemcpyHostToDevice, a.stream));
  KS_CUDA_CHECK("check",
                cudaMemcpyAsync(wd, w.data(), w.size() * 4, cudaMemcpyHostToDevice, a.stream));
  void* buffers[7];
  const size_t sizes[7] = {n_halves * 2, n_halves * 2, n_halves,    n_scales * 4,
                           n_halves * 2, n_halves,     n_scales * 4};
  for (int i = 0; i < 7; ++i) {
    KS_ASSIGN_OR_RETURN(buffers[i], a.alloc(sizes[i]));
    KS_CUDA_CHECK("check", cudaMemsetAsync(buffers[i], 0x5a, sizes[i], a.stream));  // not zeros
  }
  auto* plain = static_cast<__half*>(buffers[0]);
  auto* shadow = static_cast<__half*>(buffers[1]);
  auto* requantized = static_cast<__half*>(buffers[4]);
  const auto* x32 = static_cast<const float*>(xd);
  const auto* w32 = static_cast<const float*>(wd);
  const float eps = 1e-6f;
  ShadowOut without;
  without.data = plain;
  without.row_stride = out.stride;
  without.permuted = true;
  KS_RETURN_IF_ERROR(rms_norm(nullptr, x32, w32, eps, rows, cols, without, a.stream));
  ShadowOut with = without;
  with.data = shadow;
  with.tokens =
      TokenHalvesOut{static_cast<uint8_t*>(buffers[2]), static_cast<__half2*>(buffers[3])};
  KS_RETURN_IF_ERROR(rms_norm(nullptr, x32, w32, eps, rows, cols, with, a.stream));
  KS_CUDA_CHECK("check", cudaMemcpyAsync(requantized, plain, n_halves * 2, cudaMemcpyDeviceToDevice,
                                         a.stream));
  KS_RETURN_IF_ERROR(requantize_token_half_groups(requantized, int(rows), out.stride,
                                                  static_cast<uint8_t*>(buffers[5]),
                                                  static_cast<__half2*>(buffers[6]), a.stream));
  out.plain.resize(n_halves);
  out.shadow.resize(n_halves);
  out.requantized.resize(n_halves);
  out.codes.resize(n_halves);
  out.re_codes.resize(n_halves);
  out.scales.resize(n_scales);
  out.re_scales.resize(n_scales);
  void* hosts[7] = {out.plain.data(),    out.shadow.data(),      out.codes.data(),
                    out.scales.data(),   out.requantized.data(), out.re_codes.data(),
                    out.re_scales.data()};
  for (int i = 0; i < 7; ++i) {
    KS_CUDA_CHECK(
        "check", cudaMemcpyAsync(hosts[i], buffers[i], sizes[i], cudaMemcpyDeviceToHost, a.stream));
  }
  KS_CUDA_CHECK("check", cudaStreamSynchronize(a.stream));
  return out;
}

Result<Int8GemvCheck> check_gemv_int8_activations(int64_t rows, int64_t cols, int n_tokens,
                                                  bool swiglu, uint64_t seed) {
  if (cols % kGroup != 0 || rows < 1 || n_tokens < 1 || n_tokens > kMaxGemvBatchTokens) {
    return Status::error("check: GEMV shape out of range");
  }
  KS_ASSIGN_OR_RETURN(const int sm_count, device_sm_count("check"));
  const RandomWeights shape{WeightFormat::sym_int4, rows, cols};
  Allocations a;
  KS_RETURN_IF_ERROR(a.init());
  const int n_jobs = swiglu ? 2 : 1;
  GemvJob jobs[2];
  for (int j = 0; j < n_jobs; ++j) {
    KS_ASSIGN_OR_RETURN(jobs[j].w, shape.make(a, int(seed % 1000) * 2 + j));
  }
  const int64_t x_stride = cols;
  const size_t x_halves = size_t(n_tokens * x_stride);
  const size_t n_scales = size_t(n_tokens * (x_stride / kGroup));
  KS_ASSIGN_OR_RETURN(void* x, a.alloc(x_halves * 2));
  // Values in [2^-1, 2) with random signs and mantissas: every half group has its own scale.
  // Token 0's first groups then get the quantizer's special cases: a NaN and an Inf (their
  // halves quantize to zeros), a half of zeros, and halves of small values whose scales are
  // fp16 subnormals (~1e-5 and ~1e-3 over 127) or round to zero (~1e-6); and a half whose
  // largest magnitude, 65504, takes the largest scale (515.5, whose code 127 stays finite).
  KS_RETURN_IF_ERROR(fill_random(x, x_halves * 2, seed, 0x87ff87ffu, 0x38003800u, a.stream));
  Int8GemvCheck out;
  out.x.resize(x_halves);
  KS_CUDA_CHECK("check",
                cudaMemcpyAsync(out.x.data(), x, x_halves * 2, cudaMemcpyDeviceToHost, a.stream));
  KS_CUDA_CHECK("check", cudaStreamSynchronize(a.stream));
  if (cols >= 6 * kGroup) {
    out.x[1] = 0x7e00;      // NaN: group 0, half 0
    out.x[8 + 5] = 0xfc00;  // -Inf: group 0, half 1
    const float small[3] = {1e-5f, 1e-3f, 1e-6f};
    for (int c = 0; c < kGroup; ++c) {
      if ((c & 7) >= 4) continue;     // half 0 only
      out.x[size_t(kGroup + c)] = 0;  // group 1: zeros
      for (int k = 0; k < 3; ++k) {   // groups 2-4: small values of mixed signs
        out.x[size_t((2 + k) * kGroup + c)] = float_to_fp16(small[k] * float((c % 7) - 3));
      }
    }
    out.x[5 * kGroup + 2] = 0xfbff;  // -65504: group 5's half 0 takes the largest scale, 515.5
    KS_CUDA_CHECK("check",
                  cudaMemcpyAsync(x, out.x.data(), x_halves * 2, cudaMemcpyHostToDevice, a.stream));
  }
  KS_ASSIGN_OR_RETURN(void* codes, a.alloc(x_halves));
  KS_ASSIGN_OR_RETURN(void* scales, a.alloc(n_scales * 4));
  KS_RETURN_IF_ERROR(quantize_token_half_groups(static_cast<const __half*>(x), n_tokens, x_stride,
                                                static_cast<uint8_t*>(codes),
                                                static_cast<__half2*>(scales), a.stream));
  out.codes.resize(x_halves);
  out.scales.resize(n_scales);
  KS_CUDA_CHECK("check", cudaMemcpyAsync(out.codes.data(), codes, x_halves, cudaMemcpyDeviceToHost,
                                         a.stream));
  KS_CUDA_CHECK("check", cudaMemcpyAsync(out.scales.data(), scales, n_scales * 4,
                                         cudaMemcpyDeviceToHost, a.stream));
  KS_CUDA_CHECK("check", cudaStreamSynchronize(a.stream));
  // The fp16 values the codes stand for: (code - 128) * scale, rounded to fp16 once (exact in
  // fp32 first), in the same permuted places.
  std::vector<uint16_t> dequantized(x_halves);
  for (size_t i = 0; i < x_halves; ++i) {
    const size_t token = i / size_t(x_stride);
    const size_t column = i % size_t(x_stride);
    const uint32_t pair = out.scales[token * size_t(x_stride / kGroup) + column / kGroup];
    const bool high = (column % kGroup & 7) >= 4;
    const float scale = fp16_to_float(uint16_t(high ? pair >> 16 : pair & 0xffffu));
    dequantized[i] = float_to_fp16(float(int(out.codes[i]) - 128) * scale);
  }
  KS_ASSIGN_OR_RETURN(void* xd, a.alloc(x_halves * 2));
  KS_CUDA_CHECK("check", cudaMemcpyAsync(xd, dequantized.data(), x_halves * 2,
                                         cudaMemcpyHostToDevice, a.stream));
  const size_t y_floats = size_t(n_tokens * rows);
  std::vector<float>* results[2] = {&out.y_fp16, &out.y_int8};
  // Swiglu that can write its output's int8 half groups (gemv_writes_token_halves): the gate's
  // shadow, and from the int8 pass its int8 half groups too.
  const bool tokens_out =
      swiglu && gemv_writes_token_halves(jobs, n_jobs, x_stride, n_tokens, sm_count);
  const size_t out_halves = size_t(n_tokens * rows);
  const size_t out_scales = size_t(n_tokens * (rows / kGroup));
  void* out_buffers[4] = {nullptr, nullptr, nullptr, nullptr};  // shadows, codes, scales
  const size_t out_sizes[4] = {out_halves * 2, out_halves * 2, out_halves, out_scales * 4};
  if (tokens_out) {
    for (int i = 0; i < 4; ++i) {
      KS_ASSIGN_OR_RETURN(out_buffers[i], a.alloc(out_sizes[i]));
      KS_CUDA_CHECK("check", cudaMemsetAsync(out_buffers[i], 0x5a, out_sizes[i], a.stream));
    }
  }
  for (int pass = 0; pass < 2; ++pass) {
    void* y[2] = {nullptr, nullptr};
    for (int j = 0; j < n_jobs; ++j) {
      KS_ASSIGN_OR_RETURN(y[j], a.alloc(y_floats * 4));
      KS_CUDA_CHECK("check", cudaMemsetAsync(y[j], 0xff, y_floats * 4, a.stream));  // NaN
      jobs[j].y = static_cast<float*>(y[j]);
    }
    TokenHalfGroups tokens_in;
    if (pass == 1) {
      tokens_in =
          TokenHalfGroups{static_cast<const uint8_t*>(codes), static_cast<const __half2*>(scales)};
    }
    ShadowOut shadow;
    if (tokens_out) {
      shadow.data = static_cast<__half*>(out_buffers[pass]);
      shadow.row_stride = rows;
      shadow.permuted = true;
      if (pass == 1) {
        shadow.tokens = TokenHalvesOut{static_cast<uint8_t*>(out_buffers[2]),
                                       static_cast<__half2*>(out_buffers[3])};
      }
    }
    const uint64_t before = gemv_int8_activation_launches();
    KS_RETURN_IF_ERROR(gemv(jobs, n_jobs, static_cast<const __half*>(xd), x_stride, n_tokens,
                            sm_count, a.stream, swiglu ? GemvEpilogue::swiglu : GemvEpilogue::store,
                            shadow, {}, {}, {}, {}, tokens_in));
    (pass == 0 ? out.launches_fp16 : out.launches_int8) = gemv_int8_activation_launches() - before;
    std::vector<float>& r = *results[pass];
    r.resize(y_floats * size_t(n_jobs));
    for (int j = 0; j < n_jobs; ++j) {
      KS_CUDA_CHECK("check", cudaMemcpyAsync(r.data() + size_t(j) * y_floats, y[j], y_floats * 4,
                                             cudaMemcpyDeviceToHost, a.stream));
    }
    KS_CUDA_CHECK("check", cudaStreamSynchronize(a.stream));
  }
  if (tokens_out) {
    out.swiglu_plain.resize(out_halves);
    out.swiglu_shadow.resize(out_halves);
    out.swiglu_codes.resize(out_halves);
    out.swiglu_scales.resize(out_scales);
    void* hosts[4] = {out.swiglu_plain.data(), out.swiglu_shadow.data(), out.swiglu_codes.data(),
                      out.swiglu_scales.data()};
    for (int i = 0; i < 4; ++i) {
      KS_CUDA_CHECK("check", cudaMemcpyAsync(hosts[i], out_buffers[i], out_sizes[i],
                                             cudaMemcpyDeviceToHost, a.stream));
    }
    KS_CUDA_CHECK("check", cudaStreamSynchronize(a.stream));
  }
  return out;
}

// ---- Dependency chains (time_chain, cuda_backend.h) ----
namespace {

constexpr int kChainThreads = 256;
// 16-byte loads a thread has in flight: 32 KB a block, about what the decode GEMV's weight ring
// holds. The first round of a stage's weights is copied into shared memory before the stage's
// dependency (cp.async, as the GEMV's ring), so no register waits on it; the rest, and the
// input, stream through registers in rounds of this many loads a thread.
constexpr int kChainAhead = 8;

struct ChainArgs {
  const uint4* w = nullptr;   // the stage's weights
  int64_t units = 0;          // their 16-byte units
  const float* in = nullptr;  // the stage before's output (16-byte aligned)
  int64_t n_in = 0;
  float* out = nullptr;  // 16-byte aligned
  int64_t n_out = 0;
  // ChainMode::pdl_counted: the count this stage waits on (the stage before's; null for the
  // first stage, which waits as pdl does), its target, and the count this stage adds to.
  const unsigned* count_in = nullptr;
  unsigned target = 0;
  unsigned* count_out = nullptr;
};

// Block b's share [begin, end) of n items.
__device__ inline void chain_share(int64_t n, int64_t* begin, int64_t* end) {
  *begin = n * blockIdx.x / gridDim.x;
  *end = n * (blockIdx.x + 1) / gridDim.x;
}

// A 16-byte load through L2 only where `live`, zeros elsewhere: a load predicated off sends no
// request, so the lanes past a block's share cost nothing.
__device__ inline uint4 load_cg_if(const void* p, bool live) {
  uint4 v = make_uint4(0, 0, 0, 0);
  asm volatile(
      "{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n"
      " @q ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
      : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
      : "l"(p), "r"(int(live)));
  return v;
}

__device__ inline uint32_t fold(uint4 v, uint32_t x) {
  return x ^ v.x ^ v.y ^ v.z ^ v.w;
}

// The block's first round of the stage's weights into `ring` (kChainAhead units a thread, each
// thread its own slots): what may be in flight before the stage's input is.
__device__ inline void chain_issue(const ChainArgs& s, uint4* ring) {
  int64_t begin, end;
  chain_share(s.units, &begin, &end);
#pragma unroll
  for (int k = 0; k < kChainAhead; ++k) {
    const int64_t i = begin + threadIdx.x + int64_t(k) * kChainThreads;
    if (i < end) cp_async_16(ring + k * kChainThreads + threadIdx.x, s.w + i);
  }
  cp_async_commit();
}

// The stage after its dependency: the minimum of the whole input (every block reads it all, as a
// GEMV block reads its input vector: float4 loads, a round of kChainAhead a thread, one round up
// to 8192 floats), the block's weights (the first round from `ring`, the rest in rounds of
// loads), and its share of the outputs (that minimum plus one). `red` holds a float a warp.
__device__ void chain_finish(const ChainArgs& s, const uint4* ring, float* red) {
  float low = INFINITY;
  const int64_t quads = s.n_in / 4;
  const uint4* in4 = reinterpret_cast<const uint4*>(s.in);
  for (int64_t q0 = 0; q0 < quads; q0 += kChainAhead * kChainThreads) {
    uint4 v[kChainAhead];
#pragma unroll
    for (int k = 0; k < kChainAhead; ++k) {
      const int64_t q = q0 + threadIdx.x + int64_t(k) * kChainThreads;
      v[k] = load_cg_if(in4 + q, q < quads);
    }
#pragma unroll
    for (int k = 0; k < kChainAhead; ++k) {
      if (q0 + threadIdx.x + int64_t(k) * kChainThreads < quads) {
        low = fminf(low, fminf(fminf(__uint_as_float(v[k].x), __uint_as_float(v[k].y)),
                               fminf(__uint_as_float(v[k].z), __uint_as_float(v[k].w))));
      }
    }
  }
  for (int64_t i = quads * 4 + threadIdx.x; i < s.n_in; i += kChainThreads) {
    low = fminf(low, __ldcg(s.in + i));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) low = fminf(low, __shfl_xor_sync(0xffffffffu, low, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = low;

  int64_t begin, end;
  chain_share(s.units, &begin, &end);
  uint32_t x = 0;
  cp_async_wait<0>();  // this thread's own slots: no barrier needed
#pragma unroll
  for (int k = 0; k < kChainAhead; ++k) {
    if (begin + threadIdx.x + int64_t(k) * kChainThreads < end) {
      x = fold(ring[k * kChainThreads + threadIdx.x], x);
    }
  }
  for (int64_t i0 = begin + kChainAhead * kChainThreads; i0 < end;
       i0 += kChainAhead * kChainThreads) {
    uint4 v[kChainAhead];
#pragma unroll
    for (int k = 0; k < kChainAhead; ++k) {
      const int64_t i = i0 + threadIdx.x + int64_t(k) * kChainThreads;
      v[k] = load_cg_if(s.w + i, i < end);
    }
#pragma unroll
    for (int k = 0; k < kChainAhead; ++k) x = fold(v[k], x);
  }
  // Every weight word is read and none changes the outputs: n_out is never negative, which the
  // compiler cannot know.
  if (s.n_out < 0) s.out[0] = float(x);
  __syncthreads();
  low = red[0];
  for (int w = 1; w < kChainThreads / 32; ++w) low = fminf(low, red[w]);
  int64_t out_begin, out_end;
  chain_share(s.n_out, &out_begin, &out_end);
  for (int64_t i = out_begin + threadIdx.x; i < out_end; i += kChainThreads) s.out[i] = low + 1.0f;
  __syncthreads();  // `red` and `ring` are the next stage's
}

// One arrival on `count` (release: the writes this thread has seen, the block's after a
// barrier, are visible to whoever acquires the count).
__device__ inline void count_arrive(unsigned* count) {
  asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(count) : "memory");
}

// Thread 0 spins (acquire) until `count` reaches `target`, then the block goes on, its reads
// after thread 0's acquire; traps as grid_barrier does. The counting barrier's wait, and
// ChainMode::pdl_counted's in place of griddepcontrol.wait (the stage before's blocks each
// arrive after their outputs, so the count says those are written without waiting for that
// kernel to end).
__device__ inline void count_wait(const unsigned* count, unsigned target) {
  if (threadIdx.x == 0) {
    const long long start = clock64();
    unsigned seen = 0;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(seen) : "l"(count) : "memory");
      if (clock64() - start > kGridBarrierTimeoutCycles) __trap();
    } while (seen < target);
  }
  __syncthreads();
}

// A lighter grid barrier: one release add a block on a count that only grows (a memset in the
// graph zeroes it before each launch), and an acquire spin until barrier k's k x gridDim.x
// arrivals are in: no generation word, no full fences. Traps as grid_barrier does.
__device__ inline void counting_barrier(unsigned* count, unsigned target) {
  __syncthreads();  // the block's writes are ordered before thread 0's release
  if (threadIdx.x == 0) count_arrive(count);
  count_wait(count, target);
}

// A kernel a stage. Four blocks fit an SM, so the next stage's two can be resident beside this
// one's two and issue their first copies early. kEarly lets the next stage launch right after
// them, as the batch-1 GEMVs do; otherwise only after the outputs are written, as the batch-16
// ones do. kWait false is the negative control (ChainMode::unordered). kCounted: the stage
// waits on the stage before's count instead of griddepcontrol.wait (ChainMode::pdl_counted) and
// adds to its own once its outputs are written. Its next stage is let in (early) only after
// every one of its blocks has started, so every block a count waits on is resident: no spin
// waits on a block that cannot run.
template <bool kWait, bool kEarly, bool kCounted = false>
__global__ void __launch_bounds__(kChainThreads, 4) chain_stage_kernel(ChainArgs s) {
  __shared__ float red[kChainThreads / 32];
  __shared__ uint4 ring[kChainAhead * kChainThreads];
  chain_issue(s, ring);
  if constexpr (kEarly) pdl_trigger();
  if constexpr (kCounted) {
    if (s.count_in != nullptr) {
      count_wait(s.count_in, s.target);
    } else {
      pdl_wait();  // the first stage: after the graph's memset of the counts
    }
  } else if constexpr (kWait) {
    pdl_wait();
  }
  chain_finish(s, ring, red);  // ends in a barrier: the block's outputs are written
  if constexpr (kCounted) {
    if (threadIdx.x == 0) count_arrive(s.count_out);
  }
  if constexpr (!kEarly) pdl_trigger();
}

// One kernel for the whole chain; every block resident (time_chain sizes the grid from the
// occupancy). Each block copies its first round of the next stage's weights before the barrier:
// the layer kernel's grid_barrier, or with kCounting the lighter counting_barrier.
template <bool kCounting>
__global__ void __launch_bounds__(kChainThreads)
    chain_persistent_kernel(const ChainArgs* stages, int n_stages, unsigned* sync) {
  __shared__ float red[kChainThreads / 32];
  __shared__ uint4 ring[kChainAhead * kChainThreads];
  chain_issue(stages[0], ring);
  for (int s = 0; s < n_stages; ++s) {
    const ChainArgs stage = stages[s];
    if (s > 0) {
      if constexpr (kCounting) {
        counting_barrier(sync, unsigned(s) * gridDim.x);
      } else {
        grid_barrier(sync, sync + 1);
      }
    }
    chain_finish(stage, ring, red);
    if (s + 1 < n_stages) chain_issue(stages[s + 1], ring);
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
    case ChainMode::persistent_counting:
      return "persistent_counting";
    case ChainMode::pdl_counted:
      return "pdl_counted";
    case ChainMode::unordered:
      return "unordered";
  }
  return "?";
}

}  // namespace

Result<ChainTiming> time_chain(ChainMode mode, const std::vector<ChainStage>& stages, int trials) {
  const int64_t n = int64_t(stages.size());
  // Outputs stay exact in fp32: the last one of the last replay is (warm-ups + trials) * n.
  const int64_t replays = int64_t(Allocations::kWarmUps) + trials;
  if (n < 2 || n > 4096 || trials < 1 || replays * n >= (int64_t(1) << 24)) {
    return Status::error("bench: a chain takes 2 to 4096 stages and (trials + 1) x stages < 2^24");
  }
  int64_t units = 0, floats = 0;
  for (const ChainStage& s : stages) {
    if (s.weight_bytes < 0 || s.weight_bytes > (int64_t(1) << 36) || s.outputs < 1 ||
        s.outputs > (int64_t(1) << 24)) {
      return Status::error("bench: a chain stage's bytes or outputs are out of range");
    }
    units += ceil_div(s.weight_bytes, 16);
    floats += ceil_div(s.outputs, 4) * 4;  // each stage's output 16-byte aligned
  }
  KS_ASSIGN_OR_RETURN(const int sm_count, device_sm_count("bench"));
  int per_sm = 0;
  const bool persistent = mode == ChainMode::persistent || mode == ChainMode::persistent_counting;
  if (persistent) {
    KS_CUDA_CHECK("bench", cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                               &per_sm, chain_persistent_kernel<false>, kChainThreads, 0));
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
    c.units = ceil_div(stages[size_t(s)].weight_bytes, 16);
    c.out = static_cast<float*>(outputs) + offset;
    c.n_out = stages[size_t(s)].outputs;
    out_offset[size_t(s)] = offset;
    unit += c.units;
    offset += ceil_div(c.n_out, 4) * 4;
  }
  for (int64_t s = 0; s < n; ++s) {  // the first stage reads the last one's (the step before's)
    const ChainArgs& before = args[size_t((s + n - 1) % n)];
    args[size_t(s)].in = before.out;
    args[size_t(s)].n_in = before.n_out;
  }
  // pdl_counted: a count a stage, zeroed at the start of every replay (a memset node), each
  // reaching the stage's block count.
  unsigned* counts = nullptr;
  if (mode == ChainMode::pdl_counted) {
    KS_ASSIGN_OR_RETURN(void* c, a.alloc(size_t(n) * sizeof(unsigned)));
    counts = static_cast<unsigned*>(c);
    for (int64_t s = 0; s < n; ++s) {
      args[size_t(s)].count_out = counts + s;
      args[size_t(s)].count_in = s > 0 ? counts + (s - 1) : nullptr;
      args[size_t(s)].target = unsigned(blocks);
    }
  }
  ChainArgs* device_args = nullptr;
  unsigned* sync = nullptr;
  if (persistent) {
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
    chain_persistent_kernel<false>
        <<<unsigned(blocks), kChainThreads, 0, a.stream>>>(device_args, int(n), sync);
    launched = cudaGetLastError();
  } else if (mode == ChainMode::persistent_counting) {
    launched = cudaMemsetAsync(sync, 0, sizeof(unsigned), a.stream);
    if (launched == cudaSuccess) {
      chain_persistent_kernel<true>
          <<<unsigned(blocks), kChainThreads, 0, a.stream>>>(device_args, int(n), sync);
      launched = cudaGetLastError();
    }
  } else {
    if (mode == ChainMode::pdl_counted) {
      launched = cudaMemsetAsync(counts, 0, size_t(n) * sizeof(unsigned), a.stream);
    }
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
      } else if (mode == ChainMode::pdl_counted) {
        launched = launch_pdl(chain_stage_kernel<false, true, true>, grid, block, 0, a.stream, c);
      } else {
        launched = launch_pdl(chain_stage_kernel<false, true>, grid, block, 0, a.stream, c);
      }
    }
  }
  const cudaError_t captured = cudaStreamEndCapture(a.stream, &a.graph);
  KS_CUDA_CHECK("bench", launched);
  KS_CUDA_CHECK("bench", captured);
  KS_ASSIGN_OR_RETURN(double ms, a.time_graph(trials));

  // time_graph replayed `replays` times: stage s of the last replay wrote (replays - 1) n + s + 1.
  std::vector<float> host(static_cast<size_t>(floats));
  KS_CUDA_CHECK("bench", cudaMemcpy(host.data(), outputs, host.size() * sizeof(float),
                                    cudaMemcpyDeviceToHost));
  for (int64_t s = 0; s < n; ++s) {
    const float expected = float((replays - 1) * n + s + 1);
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
