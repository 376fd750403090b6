// CPU matrix multiply against a packed weight (quant/format.h): the whole cost of a decode step.
//
// Float weights (fp32, fp16, bf16) are widened to fp32 in registers and multiplied with the fp32
// activations, accumulating in fp32. Integer weights (sym_int8, sym_int4, asym_int4) use integer
// dot products: the activations are quantized once per call to int8 in groups of 32
// (scale = max|x| / 127, round to nearest even), and each group's integer dot product is scaled
// by weight scale * activation scale in fp32. That activation rounding, not the kernel, bounds
// the error of the integer paths (about 1e-2 relative to the dequantized-weight product for
// random data; tests/unit/test_cpu_matmul.cpp states the measured bounds).
//
// Output rows are split across the thread pool. Each worker computes tiles of weight rows x up to
// 4 tokens, all tokens of a row tile before moving on, so every weight byte is read from memory
// once per call whatever n is: one-row tiles for small n (memory bound: one sequential stream
// per thread), 4-row tiles for large n (compute bound: register reuse).
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/thread_pool.h"
#include "quant/format.h"

namespace kestrel::cpu {

// y[n, w.rows] = x[n, w.cols] · wᵀ (+ bias[w.rows] when bias != nullptr).
// x and y are fp32 row-major and must not overlap. Integer formats need w.cols % 32 == 0, which
// check_weight_shape guarantees; float formats take any cols.
void matmul(const QuantWeight& w, const float* x, int64_t n, float* y, const float* bias,
            ThreadPool& pool);

// The kernel family matmul dispatches to now: "avx512-vnni" or "avx2".
const char* matmul_isa();

// The host's integer multiply-add rate with the instructions of matmul_isa()'s kernels, every
// thread of `pool` at once, the fastest of `passes` passes: the matrix rate the CPU's prompt
// products (int8 activations times integer weight codes) can reach, in TOP/s (1e12, two
// operations a multiply-add). Weight decoding, scales and memory are not in it: a ceiling.
double measure_int8_tops(ThreadPool& pool, int passes);

// Makes matmul use the AVX2 kernels even where AVX-512 is available, so tests and benchmarks can
// cover both paths on one machine. Process-wide; not meant to be flipped while matmuls run.
void set_force_avx2(bool force);

namespace detail {

// The interface between matmul.cpp (dispatch, activation quantization, AVX2 kernels) and
// matmul_avx512.cpp. Plain pointers only: the AVX-512 translation unit must not instantiate
// anything shared with baseline code (see matmul_avx512.cpp).

constexpr int kRowTile = 4;    // rows of a multi-row tile; work is handed out in these units
constexpr int kActGroup = 32;  // activation values per int8 quantization group

// Activations quantized for the integer kernels. Groups beyond `groups` (up to
// `groups_padded`) are zero everywhere, so kernels may read whole 16-group chunks.
struct QuantizedActivations {
  int64_t groups = 0;         // cols / 32
  int64_t groups_padded = 0;  // groups rounded up to a multiple of 16
  // [n, groups_padded * 32] int8. AVX2 layout: natural order. AVX-512 layout: per quad of four
  // groups, 64 bytes holding values 0..15 of each group, then 64 bytes holding values 16..31
  // (the order in which one 64-byte load of int4 weights unpacks).
  const int8_t* values = nullptr;
  const float* scales = nullptr;       // [n, groups_padded]  group scale sx
  const float* scale_lanes = nullptr;  // [n, groups_padded * 4]  sx repeated 4x (AVX-512 only)
  const float* sums = nullptr;         // [n, groups_padded]  sx * sum(q): the group's sum of x
};

struct MatmulArgs {
  WeightFormat format = WeightFormat::fp32;
  int64_t rows = 0;
  int64_t cols = 0;
  int block = 0;
  const uint8_t* data = nullptr;  // [rows, data_row_bytes]
  size_t data_row_bytes = 0;
  const uint16_t* scales = nullptr;  // [rows, blocks_per_row] fp16, integer formats
  const uint16_t* mins = nullptr;    // [rows, blocks_per_row] fp16, asym_int4 only
  int64_t blocks_per_row = 0;
  int64_t n = 0;
  const float* x = nullptr;  // [n, cols], float formats
  QuantizedActivations xq;   // integer formats
  float* y = nullptr;        // [n, rows]
  const float* bias = nullptr;
  // The ISA's entry point below, chosen by matmul().
  void (*kernel)(const MatmulArgs&, int64_t row_begin, int64_t row_end) = nullptr;
};

// Computes y rows [row_begin, row_end) for all n tokens; row_begin is a multiple of kRowTile and
// row_end is too, or it is `rows`.
void matmul_rows_avx2(const MatmulArgs& args, int64_t row_begin, int64_t row_end);
void matmul_rows_avx512(const MatmulArgs& args, int64_t row_begin, int64_t row_end);

// `iterations` turns of independent chains of the integer kernels' multiply-add instructions
// (AVX2: VPMADDUBSW, VPMADDWD, VPADDD; AVX-512: VPDPBUSD) on registers alone; returns the
// multiply-adds done. Their operands come from `seed` and their sums are used (empty asm
// statements), so the compiler can neither fold nor drop a chain.
uint64_t int8_macs_avx2(int64_t iterations, int seed);
uint64_t int8_macs_avx512(int64_t iterations, int seed);

}  // namespace detail

}  // namespace kestrel::cpu
