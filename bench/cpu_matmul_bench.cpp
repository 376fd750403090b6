// CPU matmul microbenchmark on the Qwen2-1.5B projection shapes: per-shape decode (n = 1) time
// and weight bandwidth against the machine's read roofline, a whole decode step's matmuls
// (28 layers + lm_head, every weight distinct, as in a real step), and prefill GFLOP/s.
//
// Build: `cmake --build build --target cpu_matmul_bench`.
// Run: build/cpu_matmul_bench [--threads 2] [--format sym_int4] [--block 32] [--prefill-n 128]
//                            [--roofline-gbs GBS] [--avx2]
// Without --roofline-gbs the roofline is the pool's measured read bandwidth (as `kestrel bench`
// measures the CPU backend's).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backend/cpu/cpu_features.h"
#include "backend/cpu/matmul.h"
#include "backend/cpu/read_bandwidth.h"
#include "core/half.h"
#include "quant/format.h"

namespace {

using kestrel::QuantWeight;
using kestrel::ThreadPool;
using kestrel::WeightFormat;

struct Options {
  int threads = 2;
  WeightFormat format = WeightFormat::sym_int4;
  int block = 32;
  int64_t prefill_n = 128;
  double roofline_gbs = 0;  // 0: measured (cpu::measure_read_bandwidth with the pool's threads)
  bool avx2 = false;
};

struct Shape {
  const char* name;
  int64_t rows;
  int64_t cols;
  int per_layer;  // how many matmuls of this shape one layer runs (0: once per model)
};

// Qwen2-1.5B: hidden 1536, 12 heads + 2 KV heads of 128, intermediate 8960, vocab 151936.
const Shape kShapes[] = {{"q_proj/o_proj", 1536, 1536, 2},
                         {"k_proj/v_proj", 256, 1536, 2},
                         {"gate/up_proj", 8960, 1536, 2},
                         {"down_proj", 1536, 8960, 1},
                         {"lm_head", 151936, 1536, 0}};
constexpr int kLayers = 28;

uint64_t next_random(uint64_t& state) {
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return state;
}

// Random codes and plausible scales; the kernels' speed does not depend on the values, and
// quantizing 1.5 billion weights properly would dominate the benchmark's run time.
QuantWeight random_weight(const Options& o, int64_t rows, int64_t cols, uint64_t seed,
                          ThreadPool& pool) {
  QuantWeight w = kestrel::allocate_weight(o.format, rows, cols, o.block);
  auto fill = [&](kestrel::Blob& blob, bool halves) {
    uint8_t* p = blob.mutable_data();
    const int64_t words = int64_t(blob.size() / 8);
    pool.parallel_for(words, 4096, [&](int64_t begin, int64_t end, int) {
      uint64_t state = seed * 0x9e3779b97f4a7c15ull + uint64_t(begin) + 1;
      for (int64_t i = begin; i < end; ++i) {
        uint64_t v = next_random(state);
        if (halves) {
          // Four fp16 values in [-0.02, 0.02): valid scales, mins and float weights.
          for (int k = 0; k < 4; ++k) {
            const float f = (float((v >> (16 * k)) & 0xffff) / 65536.0f - 0.5f) * 0.04f;
            const uint16_t h = kestrel::float_to_fp16(f);
            std::memcpy(p + i * 8 + k * 2, &h, 2);
          }
        } else {
          std::memcpy(p + i * 8, &v, 8);
        }
      }
    });
  };
  const bool float_data = !kestrel::is_quantized(o.format);
  if (o.format == WeightFormat::fp32) {
    float* f = w.data.as_mutable<float>();
    pool.parallel_for(int64_t(rows * cols), 4096, [&](int64_t begin, int64_t end, int) {
      for (int64_t i = begin; i < end; ++i) f[i] = float((i * 2654435761u) % 1000) * 1e-5f;
    });
  } else {
    fill(w.data, float_data);
  }
  if (!w.scales.empty()) fill(w.scales, true);
  if (!w.mins.empty()) fill(w.mins, true);
  return w;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::vector<float> random_activations(int64_t count) {
  std::vector<float> x(static_cast<size_t>(count));
  uint64_t state = 12345;
  for (float& v : x) v = float(int64_t(next_random(state) % 2001) - 1000) * 1e-3f;
  return x;
}

// Decode: each call reads a different copy of the weight (at least 256 MB in rotation), so the
// weights come from DRAM as in a real step rather than from the 32 MB L3.
void bench_decode_shapes(const Options& o, ThreadPool& pool) {
  std::printf("\n## Decode (n = 1), weights streamed from DRAM\n\n");
  std::printf("| %-14s | %-15s | %9s | %9s | %8s | %6s |\n", "matmul", "shape", "MB", "ms", "GB/s",
              "% roof");
  std::printf("|%s|%s|%s|%s|%s|%s|\n", "----------------", "-----------------",
              "----------:", "----------:", "---------:", "-------:");
  for (const Shape& s : kShapes) {
    const QuantWeight probe = random_weight(o, s.rows, s.cols, 1, pool);
    const double mb = double(probe.total_bytes()) / 1e6;
    const int copies = std::max(1, int(std::ceil(256.0 / mb)));
    std::vector<QuantWeight> weights;
    weights.reserve(size_t(copies));
    for (int c = 0; c < copies; ++c)
      weights.push_back(random_weight(o, s.rows, s.cols, c + 2, pool));
    const std::vector<float> x = random_activations(s.cols);
    std::vector<float> y(size_t(s.rows));
    const int reps = std::max(20, copies);
    std::vector<double> times;
    for (int i = 0; i < reps + 2; ++i) {
      const QuantWeight& w = weights[size_t(i % copies)];
      const double t0 = now_seconds();
      kestrel::cpu::matmul(w, x.data(), 1, y.data(), nullptr, pool);
      const double t1 = now_seconds();
      if (i >= 2) times.push_back(t1 - t0);
    }
    const double t = median(times);
    const double gbs = double(probe.total_bytes()) / t / 1e9;
    char shape[32];
    std::snprintf(shape, sizeof(shape), "%lldx%lld", (long long)s.rows, (long long)s.cols);
    std::printf("| %-14s | %-15s | %9.2f | %9.4f | %8.2f | %5.1f%% |\n", s.name, shape, mb, t * 1e3,
                gbs, 100.0 * gbs / o.roofline_gbs);
  }
}

// Every matmul of one decode step, in model order, each weight distinct.
void bench_decode_step(const Options& o, ThreadPool& pool) {
  struct Layer {
    QuantWeight q, k, v, out, gate, up, down;
  };
  std::vector<Layer> layers(kLayers);
  uint64_t seed = 1000;
  size_t bytes = 0;
  for (Layer& l : layers) {
    l.q = random_weight(o, 1536, 1536, seed++, pool);
    l.k = random_weight(o, 256, 1536, seed++, pool);
    l.v = random_weight(o, 256, 1536, seed++, pool);
    l.out = random_weight(o, 1536, 1536, seed++, pool);
    l.gate = random_weight(o, 8960, 1536, seed++, pool);
    l.up = random_weight(o, 8960, 1536, seed++, pool);
    l.down = random_weight(o, 1536, 8960, seed++, pool);
    for (const QuantWeight* w : {&l.q, &l.k, &l.v, &l.out, &l.gate, &l.up, &l.down}) {
      bytes += w->total_bytes();
    }
  }
  const QuantWeight lm_head = random_weight(o, 151936, 1536, seed++, pool);
  bytes += lm_head.total_bytes();
  const std::vector<float> x = random_activations(8960);
  std::vector<float> y(151936);
  const float* bias = nullptr;
  auto step = [&] {
    for (const Layer& l : layers) {
      for (const QuantWeight* w : {&l.q, &l.k, &l.v, &l.out, &l.gate, &l.up, &l.down}) {
        kestrel::cpu::matmul(*w, x.data(), 1, y.data(), bias, pool);
      }
    }
    kestrel::cpu::matmul(lm_head, x.data(), 1, y.data(), bias, pool);
  };
  std::vector<double> times;
  for (int i = 0; i < 12; ++i) {
    const double t0 = now_seconds();
    step();
    const double t1 = now_seconds();
    if (i >= 2) times.push_back(t1 - t0);
  }
  const double t = median(times);
  const double gbs = double(bytes) / t / 1e9;
  std::printf("\n## Whole decode step: 28 layers x 7 matmuls + lm_head\n\n");
  std::printf(
      "%.1f MB of weights, %.2f ms per step (%.1f tok/s matmul-only), %.2f GB/s = %.1f%% "
      "of %.0f GB/s\n",
      double(bytes) / 1e6, t * 1e3, 1.0 / t, gbs, 100.0 * gbs / o.roofline_gbs, o.roofline_gbs);
}

void bench_prefill(const Options& o, ThreadPool& pool) {
  const int64_t n = o.prefill_n;
  std::printf("\n## Prefill (n = %lld)\n\n", (long long)n);
  std::printf("| %-14s | %-15s | %10s | %9s |\n", "matmul", "shape", "ms", "GFLOP/s");
  std::printf("|%s|%s|%s|%s|\n", "----------------", "-----------------",
              "-----------:", "----------:");
  double total_flops = 0.0;
  double total_time = 0.0;
  for (const Shape& s : kShapes) {
    if (s.per_layer == 0) continue;  // lm_head runs on the last position only
    const QuantWeight w = random_weight(o, s.rows, s.cols, 7, pool);
    const std::vector<float> x = random_activations(n * s.cols);
    std::vector<float> y(size_t(n * s.rows));
    std::vector<double> times;
    for (int i = 0; i < 6; ++i) {
      const double t0 = now_seconds();
      kestrel::cpu::matmul(w, x.data(), n, y.data(), nullptr, pool);
      const double t1 = now_seconds();
      if (i >= 1) times.push_back(t1 - t0);
    }
    const double t = median(times);
    const double flops = 2.0 * double(n) * double(s.rows) * double(s.cols);
    total_flops += flops * s.per_layer;
    total_time += t * s.per_layer;
    char shape[32];
    std::snprintf(shape, sizeof(shape), "%lldx%lld", (long long)s.rows, (long long)s.cols);
    std::printf("| %-14s | %-15s | %10.3f | %9.1f |\n", s.name, shape, t * 1e3, flops / t / 1e9);
  }
  std::printf("\nOne layer's matmuls: %.2f ms, %.1f GFLOP/s; 28 layers: %.0f ms for %lld tokens\n",
              total_time * 1e3, total_flops / total_time / 1e9, total_time * 1e3 * kLayers,
              (long long)n);
}

bool parse_options(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--threads" && has_value) {
      o->threads = std::atoi(argv[++i]);
    } else if (a == "--format" && has_value) {
      auto f = kestrel::parse_format(argv[++i]);
      if (!f.is_ok()) {
        std::fprintf(stderr, "%s\n", f.status().message().c_str());
        return false;
      }
      o->format = *f;
    } else if (a == "--block" && has_value) {
      o->block = std::atoi(argv[++i]);
    } else if (a == "--prefill-n" && has_value) {
      o->prefill_n = std::atoll(argv[++i]);
    } else if (a == "--roofline-gbs" && has_value) {
      o->roofline_gbs = std::atof(argv[++i]);
      if (!(o->roofline_gbs >= 0.1 && o->roofline_gbs <= 1e6)) {
        std::fprintf(stderr, "--roofline-gbs must be a number of GB/s from 0.1 to 1e6\n");
        return false;
      }
    } else if (a == "--avx2") {
      o->avx2 = true;
    } else {
      std::fprintf(stderr, "unknown or incomplete option: %s\n", a.c_str());
      return false;
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse_options(argc, argv, &o)) return 2;
  const kestrel::Status shape_ok =
      kestrel::check_weight_shape(o.format, 1536, 1536, o.block, "--block");
  if (!shape_ok.is_ok()) {
    std::fprintf(stderr, "%s\n", shape_ok.message().c_str());
    return 2;
  }
  kestrel::cpu::set_force_avx2(o.avx2);
  ThreadPool pool(o.threads);
  std::printf("# cpu matmul: %s block %d, %d threads, kernels %s (cpu: %s)\n",
              kestrel::format_name(o.format), kestrel::is_quantized(o.format) ? o.block : 0,
              o.threads, kestrel::cpu::matmul_isa(), kestrel::cpu::describe_cpu_features().c_str());
  if (o.roofline_gbs <= 0) {
    const auto r = kestrel::cpu::measure_read_bandwidth(
        pool, kestrel::cpu::read_bandwidth_bytes(pool.size()), 7);
    if (!r.is_ok()) {
      std::fprintf(stderr, "read bandwidth: %s (pass --roofline-gbs)\n",
                   r.status().message().c_str());
      return 1;
    }
    o.roofline_gbs = r->gbs;
    std::printf("# roofline: %.1f GB/s (measured: %zu MiB read by %d threads, fastest of %d)\n",
                r->gbs, r->bytes >> 20, r->threads, r->passes);
  } else {
    std::printf("# roofline: %.1f GB/s (given)\n", o.roofline_gbs);
  }
  bench_decode_shapes(o, pool);
  bench_decode_step(o, pool);
  if (o.prefill_n > 0) bench_prefill(o, pool);
  return 0;
}
