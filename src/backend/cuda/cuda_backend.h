// The CUDA backend's entry points for code outside src/backend/cuda/ (no CUDA types here).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/status.h"
#include "quant/format.h"

namespace kestrel {

// The CUDA backend on device 0; fails with the runtime's message when there is no usable GPU.
Result<std::unique_ptr<Backend>> make_cuda_backend();
// The same on `device` (a rank of a model split over the GPUs).
Result<std::unique_ptr<Backend>> make_cuda_backend_on(int device);

namespace cuda {

// Copies host fp32 [t.rows, t.cols] into a scratch tensor of a CUDA backend: tests feed ops
// their inputs this way.
Status write_tensor(Backend& backend, Tensor t, const float* host);

// Per-op device time for benchmarks. While enabled, forward calls run eagerly (no CUDA graph)
// with events around every op; op_times() returns the accumulated milliseconds and calls per op
// name since the last reset.
struct OpTime {
  std::string op;
  double milliseconds = 0;
  int64_t calls = 0;
};
Status set_op_timing(Backend& backend, bool enabled);
std::vector<OpTime> op_times(Backend& backend);

// The cudaStream_t a CUDA backend issues its ops on (null for another backend): collectives
// run on it, in the order of the ops.
void* backend_stream(Backend& backend);

// Batch-1 decode layers one launch of the layer kernel runs at most (layer.cuh: their pointers
// travel in the kernel's 32 KB of parameters); decoder_layers over more takes several launches.
constexpr int kMaxLaunchLayers = 48;

// How many decode steps replayed a captured graph, and how many graphs were captured.
struct GraphStats {
  int64_t captured = 0;
  int64_t replayed = 0;
};
GraphStats graph_stats(Backend& backend);

// Whether the int4 decode GEMV takes `n_tokens` rows of `cols` (a multiple of 32) columns
// through its dp4a path, which quantizes the input to int8 in groups of 32 as the CPU backend
// does (gemv.cuh); otherwise it rounds the input to fp16 for the tensor cores.
bool gemv_uses_dp4a(int64_t n_tokens, int64_t cols);

// Whether argmax_rows (and start_argmax) take the sliced kernel for up to 64 rows (sample.cuh;
// the default, KESTREL_CUDA_ARGMAX=block at start-up for the one-block kernel): a test aid,
// process-wide; set it while no other thread launches. Returns the setting before.
bool set_argmax_sliced(bool on);

// At most `blocks` blocks for a persistent (int4) GEMV launch, 0 for no cap beyond one wave: a
// test aid that makes small weights loop over several row tiles a block. Process-wide; set it
// only while no other thread launches GEMVs.
void set_gemv_block_cap(int blocks);

// The int4 GEMV's row-warp kernel (gemv.cu: four warps a block, each over 32 whole rows, the
// block's input staged once a chunk) for 3-16 tokens: 0 (the default) where its 128-row units
// (swiglu: 64) fill a wave of four blocks an SM (the lm_heads), 1 wherever it applies (whole
// 128-column chunks, no fused norm), 2 never. A test aid and measurement switch
// (KESTREL_CUDA_GEMV_ROWS_KERNEL sets the starting value); process-wide, like set_gemv_block_cap.
void set_gemv_rows_kernel(int mode);

// The int4 GEMV's dp4a path loading its first tile's bias and residual in the epilogue, as every
// later tile does, instead of the bias before the wait and the residual right after it: a test
// aid and measurement switch (KESTREL_CUDA_GEMV_LOADS=epilogue sets the starting value); both
// give the same bits. Process-wide, like set_gemv_block_cap; captured decode graphs keep the
// setting they were captured with. Returns the setting before.
bool set_gemv_loads_in_epilogue(bool on);
// The dp4a input stage requesting both of a thread's groups (two a token at most) before it
// quantizes the first (the default), or one group after another: a test aid and measurement
// switch (KESTREL_CUDA_GEMV_INPUT_AHEAD=0 sets the starting value); both give the same bits.
// Process-wide like set_gemv_loads_in_epilogue. Returns the setting before.
bool set_gemv_input_ahead(bool on);
// The fused norm's weight loaded before the GEMV's wait (the default) or after it
// (KESTREL_CUDA_GEMV_NORM_AHEAD=0 sets the starting value); both give the same bits. Returns the
// setting before.
bool set_gemv_norm_ahead(bool on);
// Whether a one-token dp4a GEMV reads the half-group quantization its producer wrote (the swiglu
// GEMV's epilogue, for w_down: the default) or quantizes the fp16 shadow itself in groups of 32
// (KESTREL_CUDA_GEMV_HALF_GROUPS=0 sets the starting value). Results differ within the int8
// quantization's error. Returns the setting before; gemv_half_groups() reads it.
bool set_gemv_half_groups(bool on);
bool gemv_half_groups();
// Whether a one-token dp4a GEMV whose row tiles are no more than the SMs and whose warps have more
// chunks of a tile than the default ring holds (the 1.5B's w_down) takes a ring that holds the
// whole tile, so all of its weights are requested before the wait (the default;
// KESTREL_CUDA_GEMV_DEEP_RING=0 turns it off at start-up). The same arithmetic in the same order:
// the same bits. Process-wide; a captured step keeps the kernel it was captured with, which
// gives the same bits. Returns the setting before.
bool set_gemv_deep_ring(bool on);
// Whether the deep ring is taken at two tokens too, by the same rule (the default;
// KESTREL_CUDA_GEMV_DEEP_RING_TWO=0 turns it off at start-up): the 1.5B's w_down at batch 2. The
// same bits; its launches count in gemv_deep_ring_launches. Returns the setting before.
bool set_gemv_deep_ring_two(bool on);
// GEMV launches that took the deep ring since the process started (host-side count of the calls
// that chose it, a test aid).
uint64_t gemv_deep_ring_launches();
// Whether the int4 and sym_int8 GEMVs of 3-8 tokens take two m-tiles where their 32-row blocks
// are at least half a wave (as past 8 tokens) instead of only from two waves on (the default;
// KESTREL_CUDA_GEMV_FEW_TOKENS_MT2=0 turns it off at start-up): the 8B's q/k/v, wo and w_down at
// batch 3-8. The same bits. Returns the setting before;
// gemv_few_tokens_two_mtiles_launches counts the launches that took it.
bool set_gemv_few_tokens_two_mtiles(bool on);
uint64_t gemv_few_tokens_two_mtiles_launches();
// Whether the fp16 and sym_int8 GEMVs with a fused RMSNorm input (one token) take a launch bound
// of two blocks an SM instead of three, so their loops keep their values in registers (the
// default; KESTREL_CUDA_GEMV_NORM_TWO_BLOCKS=0 sets the starting value off). The same
// arithmetic in the same order: the same bits. Process-wide; a captured step keeps the kernel it
// was captured with. Returns the setting before.
bool set_gemv_norm_two_blocks(bool on);
// Launches that took it since the process started (a test aid).
uint64_t gemv_norm_two_blocks_launches();
// Whether the two-m-tile int4 GEMVs of the mma path (3-64 tokens, and 1-2 over more than
// kMaxDpCols columns) stream through a two-stage ring instead of three (52 KiB a block instead of
// 70 at 16 tokens, so their two blocks an SM fit a smaller shared-memory split, meant to leave
// more L1 for the activations they read through it; the default,
// KESTREL_CUDA_GEMV_SHALLOW_RING=0 sets the starting value off). The same arithmetic in
// the same order: the same bits. Process-wide; a captured step keeps the kernel it was captured
// with. Returns the setting before.
bool set_gemv_shallow_ring(bool on);
// Launches that took it since the process started (a test aid).
uint64_t gemv_shallow_ring_launches();
// Whether every GEMV marks its weight copies evict_first in L2 (a weight is read once a step, so
// its lines go first and the activations, norm weights, KV cache and code stay), instead of the
// normal priority (on by default; KESTREL_CUDA_WEIGHT_EVICT_FIRST=0 sets the starting value off).
// Only the cache's victims differ: the same bits. Process-wide; a captured step keeps the policy
// it was captured with. Returns the setting before.
bool set_gemv_weight_evict_first(bool on);
// GEMV launches that took it since the process started (a test aid).
uint64_t gemv_weight_evict_first_launches();
// Whether a GEMV adding into the residual at one token also prepares the residual's next RMSNorm
// input (NormHalvesOut, gemv.cuh: x·g in half groups and the tiles' sums of squares) for that
// norm's GEMV, which then neither normalizes nor quantizes (on by default;
// KESTREL_CUDA_GEMV_NORM_HALVES=0 turns it off at start-up; any other value leaves it on). Results
// differ within the int8 quantization's error. Returns the setting before; gemv_norm_halves() reads
// it.
bool set_gemv_norm_halves(bool on);
bool gemv_norm_halves();
// With set_gemv_norm_halves on: whether the last layer's w_down also prepares the final norm's
// input for the lm_head (the default), or only the layers' own norms do. A test aid that shows
// the lm_head reads it; process-wide. Returns the setting before.
bool set_plan_final_norm(bool on);
// int8 activations for the batch-16 int4 GEMVs (an experiment, off by default): with mode 1 the
// RMSNorms before q/k/v and gate/up also write their output's rows as int8 half groups
// (TokenHalfGroups, gemv.cuh) where that GEMV's 16-token launches read them (9-64 tokens of
// sym_int4 on the mma path: gemv_reads_token_halves), and the shadow they write holds the values
// the codes stand for; a gate/up launch that reads them writes w_down's input so too (9-16 tokens,
// rows whole groups of 32); mode 2 also quantizes, in a launch of its own, every other such
// GEMV's input (wo's from attention) in place. They halve the activation
// bytes the mma loop loads, and results differ within the int8 quantization's error (two scales
// a group of 32 columns). KESTREL_CUDA_INT8_ACTIVATIONS sets the starting value (0, 1 or 2; else
// 0). Process-wide; part of a captured step's key. Returns the mode before.
int set_int8_activations(int mode);
// The in-place quantization launches of mode 2 since the process started.
uint64_t int8_requantize_launches();
// Which kernel launches ask for the SM's largest shared-memory split (the carveout launch
// attribute; smem_split.h): 0 none, 1 all, 2 all but the column-split GEMVs without a fused norm
// or dp4a input, which read their input through L1 (the default; KESTREL_CUDA_SMEM_SPLIT sets the
// starting value; out of range: 2). The same kernels and arithmetic: the same bits. Process-wide;
// part of a captured step's key, so a step after a change is captured anew. Returns the mode
// before.
int set_smem_split(int mode);
// The split the L1-reading GEMVs ask for where the mode above leaves them the driver's: -1 none
// (the default), else a percent of the SM's largest shared memory, 0-100, which the driver rounds
// up to a split it offers (KESTREL_CUDA_L1_READER_CARVEOUT sets the starting value; out of range:
// -1). A measurement aid (an L1 reader's split apart from its ring's depth); a percent too small
// for the blocks an SM a persistent grid was sized by only runs it in more waves. The same kernels
// and arithmetic: the same bits. Process-wide; part of a captured step's key. Returns the setting
// before.
int set_l1_reader_carveout(int percent);
// Whether a one-token decode attention writes its output's half-group quantization
// (attention_writes_halves, attention.cuh) for wo's dp4a GEMV, which then copies it instead of
// quantizing the shadow in every block in groups of 32 (on by default;
// KESTREL_CUDA_ATTENTION_HALF_GROUPS=0 turns it off at start-up; any other value leaves it
// on). Results differ within the int8 quantization's error. Returns the setting before;
// attention_half_groups() reads it.
bool set_attention_half_groups(bool on);
bool attention_half_groups();

// Top-p's histograms in the draw kernel (draw.cu) in 64-bit sums for every row, where rows of at
// most 2^18 tokens take three 32-bit parts: a test aid (both give the same integer sums, so the
// same tokens), process-wide like set_gemv_block_cap. Returns the setting before.
bool set_draw_wide_histograms(bool on);
// The draw kernel's passes with several loads a thread in flight and the histograms' hot buckets
// in registers (the default), or one load at a time and every round's atomics
// (KESTREL_CUDA_DRAW_AHEAD=0 sets that as the starting value): a test aid and measurement switch;
// both give the same integer sums, so the same tokens. Process-wide. Returns the setting before.
bool set_draw_ahead(bool on);

// Key groups of the flash prefill attention kernel (attention.cu): 1 or 2 forces them for every
// launch, 0 (the default) chooses by the grid (two where it holds no more blocks than two per
// SM). A test aid and measurement switch (KESTREL_CUDA_PREFILL_ATTENTION_GROUPS sets the starting
// value); process-wide, like set_gemv_block_cap.
void set_prefill_attention_groups(int groups);

// The most splits a (token, KV head) of the tensor-core decode attention kernel takes: 0 (the
// default) leaves the one-wave rule alone, n > 0 caps it at n (1: one block walks the whole
// context). A test aid and measurement switch (KESTREL_CUDA_DECODE_SPLIT_CAP sets the starting
// value); process-wide, like set_gemv_block_cap. Captured decode graphs keep the count they
// were captured with.
void set_decode_split_cap(int cap);
// The decode attention's solo rule (DecodeWorkspace::solo: contexts of at most `tiles` 64-key
// tiles take one split, which writes its output itself; 0 off) for every backend, or -1 for the
// default (one tile): a test aid, process-wide like the split cap.
void set_decode_solo(int tiles);
// Whether the tensor-core decode attention copies its fp16 tiles a cache block a warp, one
// block-table lookup a block (on by default; KESTREL_CUDA_ATTENTION_BLOCK_COPY=0 sets the starting
// value off), instead of a lookup a row a thread. The same bits. Returns the setting before.
bool set_decode_block_copy(bool on);
// Whether the tensor-core decode attention of a group of at most 8 query heads a KV head leaves
// out the mma fragments' rows 8-15, which hold no query (on by default;
// KESTREL_CUDA_ATTENTION_LOWER_ROWS=0 sets the starting value off). The same bits. Returns the
// setting before.
bool set_decode_lower_rows(bool on);

// Test aids for the prefill GEMMs' copies made ahead (gemm.cuh, DequantAhead): delay_stream
// queues a kernel spinning for `microseconds` on the backend's stream (its later work waits
// behind it); set_dequant_ahead_delay makes every copy made ahead wait that long on its own
// stream first (0: none; process-wide); dequant_ahead_hits counts the prefill GEMMs whose copy
// was found made since the backend's last reservation (0 for another backend).
Status delay_stream(Backend& backend, int microseconds);
void set_dequant_ahead_delay(int microseconds);
int64_t dequant_ahead_hits(Backend& backend);

// Device-to-device copy bandwidth of device 0 in GB/s, counting bytes read and written (1 GiB,
// median of 7 graph replays): the decode roofline the benchmarks report against.
Result<double> measure_copy_gbs();

// The decode GEMV alone: one weight of `rows` x `cols` (random values) times `n_tokens` tokens,
// 64 calls captured in a graph over enough copies of the weight to miss the L2; the median
// device time of one call and the weight's bytes.
// With `int8_activations`, the input is also quantized once into int8 half groups
// (quantize_token_half_groups) and every call passes them (gemv.cuh, TokenHalfGroups; 9-16
// tokens of sym_int4): `int8_activations` in the result says whether the launches read them.
struct GemvTiming {
  double microseconds = 0;
  double bytes = 0;
  bool int8_activations = false;
};
Result<GemvTiming> time_gemv(WeightFormat format, int64_t rows, int64_t cols, int n_tokens,
                             bool int8_activations = false);

// A test aid for the int8 half-group input (TokenHalfGroups): random sym_int4 weights (two of
// them, gate and up, with `swiglu`), a random permuted fp16 input `x` of n_tokens, its
// quantization by quantize_token_half_groups (`codes`, `scales` as their bits), then the GEMV of
// the fp16 values the codes stand for (y_fp16) and the GEMV of the codes themselves (y_int8),
// each job's outputs one after the other. launches_*: the launches that read the codes.
// Swiglu over whole groups of rows (rows % 32 == 0) in one launch (at most 16 tokens) also writes
// the gate's permuted shadow: `swiglu_plain` from the fp16 pass, and from the int8 pass
// `swiglu_shadow` with the int8 half groups the launch writes beside it (`swiglu_codes`,
// `swiglu_scales`: ShadowOut::tokens, w_down's input); empty otherwise.
struct Int8GemvCheck {
  std::vector<uint16_t> x;
  std::vector<uint8_t> codes;
  std::vector<uint32_t> scales;
  std::vector<float> y_fp16, y_int8;
  uint64_t launches_fp16 = 0, launches_int8 = 0;
  std::vector<uint16_t> swiglu_plain, swiglu_shadow;
  std::vector<uint8_t> swiglu_codes;
  std::vector<uint32_t> swiglu_scales;
};
Result<Int8GemvCheck> check_gemv_int8_activations(int64_t rows, int64_t cols, int n_tokens,
                                                  bool swiglu, uint64_t seed);
// A test aid for the int8 half groups an RMSNorm writes (ShadowOut::tokens, norm.cuh): random
// rows of x and a norm weight whose first groups make the quantizer's special cases (a NaN and
// an Inf a row, a zero half, halves of scales that round to zero or are fp16 subnormals); the
// norm's permuted shadow without them (`plain`), with them (`shadow`, `codes`, `scales`), and
// requantize_token_half_groups of a copy of `plain` (`requantized`, `re_codes`, `re_scales`):
// fp16 bits, codes, and each group's two scales' bits. Rows 1-64, columns 128-8192 (multiples
// of 4 take the float4 kernel, which writes them in its pass; others a second launch).
struct NormTokenCheck {
  int64_t stride = 0;  // round_up(cols, 32)
  std::vector<uint16_t> plain, shadow, requantized;
  std::vector<uint8_t> codes, re_codes;
  std::vector<uint32_t> scales, re_scales;
};
Result<NormTokenCheck> check_norm_token_halves(int64_t rows, int64_t cols, uint64_t seed);
// GEMV launches that read an int8 half-group input since the process started.
uint64_t gemv_int8_activation_launches();
// How many chunks ahead those launches load their codes: 1 (the default) or 2
// (KESTREL_CUDA_GEMV_INT8_AHEAD=2 at start-up). The same bits. Returns the setting before.
int set_gemv_int8_ahead(int chunks);

// The GEMV's phases, from inside (a measurement aid: KESTREL_CUDA_GEMV_PROFILE=1 or
// set_gemv_profile before the launches are made or captured). Thread 0 of block 0 of every decode
// GEMV launch records the device clock (ns) at its start, when its wait for the kernel before
// returns, after its input stage (the norm and int8 quantization), when its first chunk of
// weights has landed, after its chunk loop of the first row tile (thread 0's: warp 0's chunks),
// after that tile's exchange between warps and its stores (which wait for every warp's chunks)
// and at its end, into a ring of the last 4096 launches that gemv_profile reads (after
// synchronizing the device) oldest first. The row-warp kernel (the lm_head at 3-16 tokens)
// records nothing.
struct GemvProfileRecord {
  int64_t rows = 0;  // the first weight's rows and columns
  int64_t cols = 0;
  int n_tokens = 0;
  int blocks = 0;       // the launch's grid
  int tiles = 0;        // its row tiles
  int block_tiles = 0;  // block 0's share of them
  // start, wait returned, input staged, first chunk landed, first tile's chunks multiplied, first
  // tile done, end
  uint64_t ns[7] = {};
};
void set_gemv_profile(bool on);
Status reset_gemv_profile();
Result<std::vector<GemvProfileRecord>> gemv_profile();

// What a dependency between decode stages costs by itself (CudaBench.DISABLED_Chain). A decode
// step is a chain of stages, each reading the whole output of the one before (a GEMV its input
// vector) and streaming weights that nothing writes; the last stage's output is the next step's
// input. time_chain runs such a chain with no arithmetic beyond reading every byte: each block
// issues its first 32 KB of the stage's weights, waits for the stage before, takes the minimum
// of that stage's whole output, reads the rest of its weights and writes its share of the
// outputs as the minimum plus one. Mechanisms:
//   launch      a kernel a stage, in stream order;
//   pdl         a kernel a stage with programmatic dependent launch, as the batch-1 decode
//               step runs: a block lets the next stage launch right after issuing its first
//               loads, and waits (griddepcontrol.wait) before reading its input;
//   pdl_late    the same, the next stage let in only after a block's outputs (batch 16's GEMVs);
//   persistent  one kernel, a grid barrier between stages, each block's first loads of the
//               next stage issued before the barrier (the layer-stack kernel's pattern);
//   persistent_counting  the same with a lighter barrier: one release add a block on a count
//               zeroed before each launch, and an acquire spin (no generation, no full fence);
//   pdl_counted pdl, but a stage waits on a count instead of griddepcontrol.wait: each block of
//               the stage before adds one (release) once its outputs are written, and the
//               stage's blocks spin (acquire) until all have: what a dependency finer than a
//               kernel's end would cost (the twenty-eighth session's question);
//   unordered   pdl with no wait: a negative control, whose stages read inputs the stage before
//               has not written yet, so the check below must catch it.
// Every replay's outputs are checked (a stage's output is its index plus one more than the
// chain's last output of the replay before): a stage that read a stale input fails the call.
enum class ChainMode {
  launch,
  pdl,
  pdl_late,
  persistent,
  persistent_counting,
  pdl_counted,
  unordered
};
struct ChainStage {
  int64_t weight_bytes = 0;  // streamed once a step (rounded up to 16 bytes)
  int64_t outputs = 1;       // floats written, read whole by the next stage
};
struct ChainTiming {
  double microseconds = 0;  // one step: every stage once (median of the trials)
  double bytes = 0;         // weight bytes a step
  int blocks = 0;           // blocks a stage (persistent: resident for the whole step)
};
// At least 2 stages, at most 4096; `trials` timed replays after one warm-up.
Result<ChainTiming> time_chain(ChainMode mode, const std::vector<ChainStage>& stages, int trials);

}  // namespace cuda
}  // namespace kestrel
