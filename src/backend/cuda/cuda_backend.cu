// The CUDA backend: fp32 activations in one scratch arena, fp16 shadows of matrix-product inputs,
// an fp16 KV cache, weights uploaded once. Every buffer is allocated in upload() or reserve();
// a forward call allocates nothing.
//
// Decode steps (at most 16 tokens with logits wanted) run as CUDA graphs: the first call of a
// shape is captured while the ops are issued, later calls with the same shape skip the launches
// and replay the graph. Kernels read tokens, positions and sequence ids from fixed device
// buffers that begin_batch fills before the replay, so one graph serves every position. While
// replaying, the ops still do their host-side bookkeeping (scratch offsets, shadow ownership)
// and fold their arguments into a fingerprint that must equal the captured one.
//
// Fusion is explicit: the backend's fused ops (backend.h: norm_matmul, norm_matmul_swiglu,
// matmul_add, rope_attention) are what a decode step issues, and each runs as fewer launches
// here. Up to 64 tokens, a matmul is the decode GEMV (gemv.cuh: one launch per 16 tokens), and
// a fused op rides on it: matmul_add adds into the residual in the GEMV's epilogue;
// norm_matmul_swiglu's gate and up rows meet in one block (the swiglu epilogue); at batch 1
// (gemv_fuses_norm) the norm is the GEMV's input stage (NormInput: every block normalizes the
// activation itself, block 0 writes `normed`), so a layer launches no norm of its own.
// rope_attention rotates q and k in the same launch that writes the KV cache; in a decode batch
// of distinct sequences (one token each, up to 64) the tensor-core split kernel does both itself
// (attention.cuh, tensor_core_attention) and its last split per KV head merges, so attention is
// one launch per 16 tokens.
// Beyond 64 tokens the matmuls are GEMMs and the rest of a fused op runs as the plain op's kernel
// after them. The plain ops never fuse: each is its own launches, whatever comes before or after
// it.
//
// Every launch goes through launch(), which folds the op's name and arguments into the step's
// fingerprint (and launches nothing while replaying), times it when op timing is on and checks
// the launch, so no op can miss one of the three.
//
// An fp32 model (--low-bit fp32) computes in fp32: its weights stay fp32 on the device and every
// matmul, at any token count, is one cuBLAS fp32 GEMM on the fp32 activation (gemm_f32), not the
// fp16 shadow. None of the GEMV fusions is taken for it: its norm_matmul, norm_matmul_swiglu and
// matmul_add launch the plain ops' kernels one after another (the norm, the GEMMs, then the add
// or swiglu); rope_attention's rotation still rides in the cache write.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include "backend/communicator.h"
#include "backend/cuda/act.cuh"
#include "backend/cuda/attention.cuh"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.cuh"
#include "backend/cuda/gemm.cuh"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/layer.cuh"
#include "backend/cuda/norm.cuh"
#include "backend/cuda/rope.cuh"
#include "backend/cuda/sample.cuh"
#include "core/half.h"
#include "model/rope.h"

namespace kestrel {
namespace cuda {
namespace {

constexpr size_t kAlignFloats = 16;  // scratch tensors start on 64-byte boundaries
constexpr size_t kCublasWorkspaceBytes = 32u << 20;
constexpr int kMaxTimedEvents = 8192;
// Measured on the H200 (docs/PERF.md, "The decoder layer as one kernel" and "The layer stack as
// one launch"): the layer kernel still decodes slower than the fused ops' ~7 launches a
// layer at batch 1, so it is opt-in.
constexpr bool kLayerKernelByDefault = false;

float* f32(Tensor t) {
  return static_cast<float*>(t.data);
}

// The matrix rate of a device, for the benchmark's prompt rows (issue 10: "a table keyed on the
// device name with the source of each figure"): dense fp16/bf16 tensor-core GEMMs, which the
// prompt's dequantized weights run through cuBLAS. Measured figures only; a device not listed
// prints no percentage.
struct KnownMatrixRate {
  const char* device;  // cudaDeviceProp::name
  double tflops;
  const char* source;
};
const std::vector<KnownMatrixRate>& matrix_rate_table() {
  static const std::vector<KnownMatrixRate> table = {
      {"NVIDIA H200", 790.0,
       "table: bf16 GEMM on large random matrices, measured 2026-12-02 (DESIGN.md)"},
      {"NVIDIA H100 80GB HBM3", 800.0, "table: dense bf16 GEMM, measured (DESIGN.md)"},
  };
  return table;
}

// set_plan_final_norm: whether the last layer's w_down prepares the final norm's input.
bool& plan_final_norm_flag() {
  static bool on = true;
  return on;
}

// set_int8_activations' modes: 0, 1 or 2; anything else is 0.
int valid_int8_activations(int mode) {
  return mode >= 0 && mode <= 2 ? mode : 0;
}

// set_int8_activations (KESTREL_CUDA_INT8_ACTIVATIONS as its starting value).
std::atomic<int>& int8_activations_mode() {
  static std::atomic<int> mode{valid_int8_activations(env_int("KESTREL_CUDA_INT8_ACTIVATIONS", 0))};
  return mode;
}

// The in-place quantizations of shadows no producer quantized (mode 2).
std::atomic<uint64_t> int8_requantize_count{0};

// The run-time switches that choose a decode step's launches (or their attributes: the
// shared-memory split), as bits of a captured step's key:
// a step after one of them changes (the tests' variants) is captured anew instead of failing
// its replay's check against launches that differ.
int32_t path_switches() {
  return int32_t(gemv_half_groups()) | int32_t(gemv_norm_halves()) << 1 |
         int32_t(plan_final_norm_flag()) << 2 | int32_t(attention_half_groups()) << 3 |
         smem_split_mode().load(std::memory_order_relaxed) << 4 |
         (l1_reader_carveout().load(std::memory_order_relaxed) + 1) << 6 |
         int8_activations_mode().load(std::memory_order_relaxed) << 13;
}

// Two weights one layer kernel launch may treat alike: the same format, shape and tiling.
bool same_shape(const DeviceWeight& a, const DeviceWeight& b) {
  return a.format == b.format && a.rows == b.rows && a.cols == b.cols && a.block == b.block &&
         a.tiles.n_tiles == b.tiles.n_tiles && a.tiles.n_chunks == b.tiles.n_chunks &&
         a.tiles.scale_shift == b.tiles.scale_shift;
}

enum class Mode { eager, capture, replay };

// The host-side record of which activation the shadow buffer currently mirrors.
struct ShadowState {
  const void* owner = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  bool permuted = false;
  int buffer = 0;       // which of the two shadow buffers holds it
  bool halves = false;  // the buffer's half-group quantization (HalfGroupOut) is written too
  bool tokens = false;  // its rows' int8 half groups (TokenHalvesOut), whose values it holds
};

// The host-side record of which residual's next norm input (NormHalvesOut) is prepared, and for
// which norm weight.
struct NormHalvesState {
  const void* owner = nullptr;  // the residual
  const float* norm_w = nullptr;
  int buffer = 0;  // which of the two norm-halves buffers holds it
};

// A norm weight a residual add may prepare the input of (its device copy and width); w null:
// none.
struct PlannedNorm {
  const float* w = nullptr;
  int64_t n = 0;
};

// One of those buffers: x·g in half groups and the tiles' sums of squares.
struct NormHalvesBuffer {
  HalfGroupOut out;
  float* ss = nullptr;
};

// One decode GEMV launch: its jobs (one weight and output each) over one input.
struct GemvCall {
  GemvJob jobs[kMaxGemvJobs];
  Tensor outs[kMaxGemvJobs];
  int slots[kMaxGemvJobs] = {};  // each job's upload slot (DequantAhead's key)
  int n_jobs = 0;
  bool fp32 = false;          // fp32 weights: cuBLAS fp32 GEMMs instead (matmul_f32)
  NormInput norm;             // set: the input is this RMSNorm, x is null
  const __half* x = nullptr;  // the input's permuted shadow
  HalfGroupInput halves;     // the same input quantized in half groups, where its producer wrote it
  NormHalvesIn norm_halves;  // with norm: that norm's input as the residual's producer left it
  NormHalvesOut norm_out;    // a residual add: prepare the residual's next norm input
  TokenHalfGroups tokens_in;  // the input's int8 half groups (set_int8_activations)
  int64_t x_stride = 0;
  int n_tokens = 0;
};

struct StepGraph {
  cudaGraphExec_t exec = nullptr;
  uint64_t fingerprint = 0;
};

// The batch-1 layer kernel (layer.cuh) is wanted when KESTREL_CUDA_LAYER_KERNEL=1, the fused
// ops when it is 0, and by default kLayerKernelByDefault decides.
bool layer_kernel_wanted() {
  const char* v = std::getenv("KESTREL_CUDA_LAYER_KERNEL");
  if (v == nullptr || *v == '\0') return kLayerKernelByDefault;
  return std::string(v) != "0";
}

// A measurement switch that is on unless the environment variable `name` is "0".
bool switch_on(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::string(v) != "0";
}

class CudaBackend final : public Backend {
 public:
  static Result<std::unique_ptr<Backend>> create(int device) {
    int count = 0;
    KS_CUDA_CHECK("init", cudaGetDeviceCount(&count));
    if (count == 0) return Status::error("cuda init: no CUDA device");
    if (device < 0 || device >= count) {
      return Status::error("cuda init: no device " + std::to_string(device) +
                           " (this machine has " + std::to_string(count) + ")");
    }
    std::unique_ptr<CudaBackend> backend(new CudaBackend());
    backend->device_ = device;
    KS_CUDA_CHECK("init", cudaSetDevice(device));
    KS_CUDA_CHECK("init", cudaGetDeviceProperties(&backend->props_, device));
    // KESTREL_CUDA_MAIN_PRIORITY=1 (a measurement switch): the backend's stream at the device's
    // greatest priority, so that a prefill's GEMMs go before the weight copies made ahead for
    // the next ones (DequantAhead's stream has the least, which is also the default).
    const char* priority = std::getenv("KESTREL_CUDA_MAIN_PRIORITY");
    if (priority != nullptr && std::string(priority) == "1") {
      int least = 0, greatest = 0;
      KS_CUDA_CHECK("init", cudaDeviceGetStreamPriorityRange(&least, &greatest));
      KS_CUDA_CHECK(
          "init", cudaStreamCreateWithPriority(&backend->stream_, cudaStreamNonBlocking, greatest));
    } else {
      KS_CUDA_CHECK("init", cudaStreamCreateWithFlags(&backend->stream_, cudaStreamNonBlocking));
    }
    KS_CUBLAS_CHECK("init", cublasCreate(&backend->cublas_));
    KS_CUBLAS_CHECK("init", cublasSetStream(backend->cublas_, backend->stream_));
    // One backend per device may use the layer kernel (layer.cuh, claim_decode_layer).
    backend->layer_kernel_ = layer_kernel_wanted() && claim_decode_layer(device);
    return std::unique_ptr<Backend>(std::move(backend));
  }

  ~CudaBackend() override {
    if (layer_kernel_) release_decode_layer(device_);
    abort_capture();
    // A step run ahead (and its copy into pinned memory) may still be queued.
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    clear_graphs();
    (void)ahead_.drain();  // before the copies it writes are freed
    for (cudaEvent_t e : timing_events_) cudaEventDestroy(e);
    for (cudaEvent_t e : meta_copied_) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    for (cudaEvent_t e : argmax_copied_) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    for (auto& [ptr, bytes] : allocations_) cudaFree(ptr);
    for (void* p : pinned_) cudaFreeHost(p);
    if (cublas_ != nullptr) cublasDestroy(cublas_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  std::string name() const override { return std::string("cuda (") + props_.name + ")"; }

  Status use_on_this_thread() override {
    KS_CUDA_CHECK("set device", cudaSetDevice(device_));
    return Status::ok();
  }

  // The collective runs on this backend's stream, after the ops before it, so a decode step's
  // capture holds it and a replay runs it again with the graph.
  Status all_reduce_sum(Tensor t, Communicator& comm) override {
    note_write(t);
    return launch("all_reduce", {addr(t.data), uint64_t(t.rows), uint64_t(t.cols)},
                  [&] { return comm.all_reduce_sum(t); });
  }

  cudaStream_t stream() const { return stream_; }

  // The copy bandwidth is measured (matrix_rate() is a table's).
  Roofline roofline() override {
    if (!roofline_) {
      auto gbs = measure_copy_gbs();
      roofline_ = gbs.is_ok() ? Roofline{*gbs, "measured: device-to-device copy, read + write"}
                              : Roofline{0, "not measured: " + gbs.status().message()};
    }
    return *roofline_;
  }

  // The prompt's fp16 tensor-core GEMMs (integer weights dequantized for cuBLAS): from
  // matrix_rate_table() by the device's name.
  MatrixRate matrix_rate() override {
    for (const KnownMatrixRate& rate : matrix_rate_table()) {
      if (std::strcmp(props_.name, rate.device) == 0) return MatrixRate{rate.tflops, rate.source};
    }
    return MatrixRate{0, "no figure for " + std::string(props_.name)};
  }

  Status upload(ModelWeights& weights) override {
    KS_RETURN_IF_ERROR(release_weights());
    weights_format_ = weights.format;
    embed_host_ = weights.tok_embd.data.data();
    // Every tensor of the model's tensor list (model/weights.h), in its order.
    KS_RETURN_IF_ERROR(for_each_tensor(weights, [&](const TensorInfo& t, auto& member) -> Status {
      using Member = std::remove_cvref_t<decltype(member)>;
      if constexpr (std::is_same_v<Member, QuantWeight>) {
        KS_ASSIGN_OR_RETURN(embed_, upload_weight(member, t.name));
      } else if constexpr (std::is_same_v<Member, Vector>) {
        KS_RETURN_IF_ERROR(upload_vector(member, t.name));
      } else if (member.w.rows > 0 && member.w.data.data() == embed_host_ && member.bias.empty()) {
        // Tied embeddings: lm_head reads the embedding table's device copy.
        member.backend_slot = int(linears_.size());
        linears_.push_back(embed_);
      } else {
        KS_RETURN_IF_ERROR(upload_linear(member, t.name));
      }
      return Status::ok();
    }));
    // The final norm: the last layer's w_down prepares its input (decoder_layers' plan) where the
    // lm_head's one-token GEMV takes a prepared input (int4, the dp4a path).
    const auto output_norm = vector_of(weights.output_norm, "upload");
    const auto head = linear_of(weights.output);
    const int64_t n = weights.output_norm.n;
    const bool takes = output_norm.is_ok() && head.is_ok() && n > 0 &&
                       is_tiled(head.value()->format) && gemv_fuses_norm(n, 1) &&
                       gemv_uses_dp4a(1, round_up(n, kGroup));
    output_norm_ = takes ? PlannedNorm{output_norm.value(), n} : PlannedNorm{};
    return Status::ok();
  }

  Result<WorkspaceLayout> reserve_layout(const ModelConfig& config,
                                         const RunShape& shape) const override {
    return workspace_layout(config, shape, workspace_types(config, shape));
  }

  size_t free_memory() const override {
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) return 0;
    return free_bytes;
  }

  Status do_reserve(const ModelConfig& config, const RunShape& shape) override {
    norm_halves_ = NormHalvesState{};
    if (shape.max_logit_rows <= 0) {
      return Status::error("cuda backend: run shape needs positive logit rows");
    }
    if (config.head_dim % 2 != 0 || config.n_kv_heads <= 0 ||
        config.n_heads % config.n_kv_heads != 0) {
      return Status::error("cuda backend: head_dim must be even and heads a multiple of KV heads");
    }
    if (config.n_heads / config.n_kv_heads > kMaxHeadGroup) {
      return Status::error("cuda backend: more than " + std::to_string(kMaxHeadGroup) +
                           " query heads per KV head");
    }
    abort_capture();
    clear_graphs();
    KS_CUDA_CHECK("reserve", cudaStreamSynchronize(stream_));
    KS_RETURN_IF_ERROR(ahead_.drain());
    for (void* p : reservation_) KS_RETURN_IF_ERROR(free_device(p));
    reservation_.clear();
    for (void* p : pinned_) KS_CUDA_CHECK("reserve", cudaFreeHost(p));
    pinned_.clear();

    config_ = config;
    shape_ = shape;
    const WorkspaceLayout layout = workspace_layout(config, shape, workspace_types(config, shape));
    const Extras extras = extras_for(config, shape);

    cache_ = KvCache{};
    cache_.type = kv_type(shape);
    KS_RETURN_IF_ERROR(check_kv_cache(cache_.type, int(config.head_dim)));
    cache_.n_blocks = shape.pool_blocks();
    cache_.table_stride = shape.blocks_per_seq();
    cache_.n_kv_heads = int(config.n_kv_heads);
    cache_.head_dim = int(config.head_dim);
    const size_t kv_bytes = layout.kv_cache_elements * kv_type_bytes(cache_.type);
    KS_ASSIGN_OR_RETURN(cache_.k, reserve_device<uint8_t>(kv_bytes, "K cache"));
    KS_ASSIGN_OR_RETURN(cache_.v, reserve_device<uint8_t>(kv_bytes, "V cache"));
    // Zeroed so that reads of positions no sequence wrote are finite.
    KS_CUDA_CHECK("reserve", cudaMemsetAsync(cache_.k, 0, kv_bytes, stream_));
    KS_CUDA_CHECK("reserve", cudaMemsetAsync(cache_.v, 0, kv_bytes, stream_));
    if (cache_.type == KvType::f8) {
      const size_t scale_bytes = layout.kv_cache_rows * sizeof(float);
      KS_ASSIGN_OR_RETURN(cache_.k_scale, reserve_device<float>(scale_bytes, "K cache scales"));
      KS_ASSIGN_OR_RETURN(cache_.v_scale, reserve_device<float>(scale_bytes, "V cache scales"));
      KS_CUDA_CHECK("reserve", cudaMemsetAsync(cache_.k_scale, 0, scale_bytes, stream_));
      KS_CUDA_CHECK("reserve", cudaMemsetAsync(cache_.v_scale, 0, scale_bytes, stream_));
    }

    arena_floats_ = layout.scratch_elements;
    KS_ASSIGN_OR_RETURN(arena_, reserve_device<float>(arena_floats_ * sizeof(float), "scratch"));
    shadow_rows_ = extras.shadow_rows;
    shadow_cols_ = extras.shadow_cols;
    for (__half*& buffer : shadow_buffers_) {
      KS_ASSIGN_OR_RETURN(buffer,
                          reserve_device<__half>(extras.shadow_bytes, "fp16 activation shadow"));
    }
    // One token's half groups at the start of `bytes` (extras.halves_bytes): shadow_cols_ int8
    // values, then a {scale, sum} per 16 of them.
    auto half_groups_at = [&](uint8_t* bytes) {
      return HalfGroupOut{reinterpret_cast<uint32_t*>(bytes),
                          reinterpret_cast<int2*>(bytes + shadow_cols_)};
    };
    for (NormHalvesBuffer& b : norm_buffers_) {
      KS_ASSIGN_OR_RETURN(uint8_t * bytes,
                          reserve_device<uint8_t>(extras.norm_halves_bytes, "norm input halves"));
      b.out = half_groups_at(bytes);
      b.ss = reinterpret_cast<float*>(bytes + extras.halves_bytes);
    }
    for (HalfGroupOut& halves : half_buffers_) {
      KS_ASSIGN_OR_RETURN(uint8_t * bytes,
                          reserve_device<uint8_t>(extras.halves_bytes, "int8 activation halves"));
      halves = half_groups_at(bytes);
    }
    // Each shadow buffer's rows as int8 half groups (set_int8_activations): codes, then scales.
    token_rows_ = extras.token_rows;
    for (TokenHalvesOut& tokens : token_buffers_) {
      KS_ASSIGN_OR_RETURN(uint8_t * bytes, reserve_device<uint8_t>(extras.tokens_bytes,
                                                                   "int8 activation half groups"));
      tokens =
          TokenHalvesOut{bytes, reinterpret_cast<__half2*>(bytes + token_rows_ * shadow_cols_)};
    }
    gemm_ws_ = GemmWorkspace{};
    gemm_ws_.cublas = cublas_;
    __half* second_copy = nullptr;
    if (extras.dequant_bytes > 0) {
      const size_t copy_bytes = extras.dequant_bytes / size_t(extras.dequant_copies);
      gemm_ws_.dequant_elems = int64_t(copy_bytes / sizeof(__half));
      KS_ASSIGN_OR_RETURN(gemm_ws_.dequant,
                          reserve_device<__half>(copy_bytes, "prefill dequant scratch"));
      if (extras.dequant_copies == 2) {
        KS_ASSIGN_OR_RETURN(second_copy,
                            reserve_device<__half>(copy_bytes, "prefill dequant scratch (ahead)"));
      }
    }
    KS_RETURN_IF_ERROR(ahead_.reset(gemm_ws_.dequant, second_copy, gemm_ws_.dequant_elems));
    if (extras.cublas_bytes > 0) {
      KS_ASSIGN_OR_RETURN(void* ws, reserve_device<uint8_t>(extras.cublas_bytes, "cuBLAS"));
      KS_CUBLAS_CHECK("reserve", cublasSetWorkspace(cublas_, ws, extras.cublas_bytes));
      gemm_ws_.cublas_workspace = ws;
      gemm_ws_.cublas_workspace_bytes = extras.cublas_bytes;
    }
    decode_ws_ = DecodeWorkspace{};
    decode_ws_.max_splits = extras.max_splits;
    decode_ws_.sm_count = props_.multiProcessorCount;
    // KESTREL_CUDA_ATTENTION_PROFILE=N > 0: a line every N positions (1: every 256); 0 or
    // anything else: off.
    decode_ws_.profile = std::clamp(env_int("KESTREL_CUDA_ATTENTION_PROFILE", 0), 0, 1 << 20);
    KS_ASSIGN_OR_RETURN(decode_ws_.o,
                        reserve_device<float>(extras.split_o_bytes, "attention partial sums"));
    KS_ASSIGN_OR_RETURN(decode_ws_.ml,
                        reserve_device<float>(extras.split_ml_bytes, "attention partial maxima"));
    KS_ASSIGN_OR_RETURN(decode_ws_.arrivals,
                        reserve_device<unsigned>(extras.arrival_bytes, "attention split counters"));
    KS_CUDA_CHECK("reserve",
                  cudaMemsetAsync(decode_ws_.arrivals, 0, extras.arrival_bytes, stream_));
    KS_ASSIGN_OR_RETURN(
        layer_sync_, reserve_device<unsigned>(extras.layer_sync_bytes, "decoder layer counters"));
    // The layer kernel's barrier and merge counters start at zero; each launch leaves them so.
    KS_CUDA_CHECK("reserve", cudaMemsetAsync(layer_sync_, 0, extras.layer_sync_bytes, stream_));
    KS_ASSIGN_OR_RETURN(meta_, reserve_device<int32_t>(extras.meta_bytes, "batch metadata"));
    cache_.block_tables = block_tables_device();
    KS_ASSIGN_OR_RETURN(gather_rows_, reserve_device<int32_t>(extras.rows_bytes, "gather rows"));
    KS_ASSIGN_OR_RETURN(argmax_out_, reserve_device<int32_t>(extras.rows_bytes, "argmax"));
    KS_ASSIGN_OR_RETURN(argmax_partials_,
                        reserve_device<int2>(extras.argmax_partial_bytes, "argmax slices"));
    KS_ASSIGN_OR_RETURN(argmax_counters_,
                        reserve_device<unsigned>(extras.argmax_count_bytes, "argmax counters"));
    // The sliced argmax's counters start at zero; each launch leaves them so.
    KS_CUDA_CHECK("reserve",
                  cudaMemsetAsync(argmax_counters_, 0, extras.argmax_count_bytes, stream_));
    KS_ASSIGN_OR_RETURN(draw_work_,
                        reserve_device<uint64_t>(extras.draw_work_bytes, "sampling draws"));
    draw_work_cols_ = extras.draw_work_bytes / (kDrawRowsPerLaunch * sizeof(uint64_t));
    const std::vector<float> inv_freq = rope_inv_freq(config);
    KS_ASSIGN_OR_RETURN(inv_freq_,
                        reserve_device<float>(inv_freq.size() * sizeof(float), "rope frequencies"));
    KS_CUDA_CHECK("reserve", cudaMemcpy(inv_freq_, inv_freq.data(), inv_freq.size() * sizeof(float),
                                        cudaMemcpyHostToDevice));

    // Two staging copies of the metadata and kArgmaxInFlight of the argmax rows: a call run
    // ahead fills one while the copy out of the other may still be queued (begin_batch).
    KS_ASSIGN_OR_RETURN(host_meta_, pinned<int32_t>(2 * extras.meta_bytes));
    // begin_batch copies whole slots, the tokens past a call's own included: never garbage.
    std::memset(host_meta_, 0, 2 * extras.meta_bytes);
    meta_slot_stride_ = extras.meta_bytes / sizeof(int32_t);
    KS_ASSIGN_OR_RETURN(host_rows_, pinned<int32_t>(extras.rows_bytes));
    KS_ASSIGN_OR_RETURN(host_argmax_, pinned<int32_t>(kArgmaxInFlight * extras.rows_bytes));
    argmax_slot_stride_ = extras.rows_bytes / sizeof(int32_t);
    for (cudaEvent_t& e : meta_copied_) {
      if (e == nullptr)
        KS_CUDA_CHECK("reserve", cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
    for (cudaEvent_t& e : argmax_copied_) {
      if (e == nullptr)
        KS_CUDA_CHECK("reserve", cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
    host_read_floats_ = size_t(kMaxGemvTokens) * size_t(config.vocab_size);
    KS_ASSIGN_OR_RETURN(host_read_, pinned<float>(host_read_floats_ * sizeof(float)));
    KS_CUDA_CHECK("reserve", cudaStreamSynchronize(stream_));
    reserved_ = true;
    return Status::ok();
  }

  Status do_copy_kv_block(int32_t src, int32_t dst) override {
    if (src == dst) return Status::ok();
    // One block of one layer: [n_kv_heads, kKvBlockSize] rows of head_dim entries, contiguous,
    // and as many row scales in an fp8 cache.
    const int64_t rows = config_.n_kv_heads * kKvBlockSize;
    const size_t row_bytes = size_t(config_.head_dim) * kv_type_bytes(cache_.type);
    const int64_t n_blocks = shape_.pool_blocks();
    auto copy = [&](void* base, size_t bytes_per_row) -> Status {
      if (base == nullptr) return Status::ok();
      auto* bytes = static_cast<uint8_t*>(base);
      const size_t block_bytes = size_t(rows) * bytes_per_row;
      for (int64_t layer = 0; layer < config_.n_layers; ++layer) {
        const size_t from = size_t(layer * n_blocks + src) * block_bytes;
        const size_t to = size_t(layer * n_blocks + dst) * block_bytes;
        KS_CUDA_CHECK("copy_kv_block", cudaMemcpyAsync(bytes + to, bytes + from, block_bytes,
                                                       cudaMemcpyDeviceToDevice, stream_));
      }
      return Status::ok();
    };
    KS_RETURN_IF_ERROR(copy(cache_.k, row_bytes));
    KS_RETURN_IF_ERROR(copy(cache_.v, row_bytes));
    KS_RETURN_IF_ERROR(copy(cache_.k_scale, sizeof(float)));
    KS_RETURN_IF_ERROR(copy(cache_.v_scale, sizeof(float)));
    return Status::ok();
  }

  Status do_begin_batch(const BatchView& batch) override {
    // A call that failed while being captured left its capture, to be dropped.
    abort_capture();
    mode_ = Mode::eager;
    if (!reserved_) return Status::error("cuda backend: begin_batch before reserve");
    const int64_t n = batch.n_tokens;  // checked by Backend::begin_batch against the reservation
    const int64_t cap = shape_.max_batch_tokens;
    // The metadata is staged in one of two pinned copies, taken in turn; the copy out of this one
    // two calls ago must be done before it is refilled. A call run ahead (tokens_from_argmax)
    // waits for nothing else: the step before it may still be running, and its tokens are that
    // step's argmax, which the argmax kernel left in the tokens' device slots. Any other call
    // first waits for the stream, as before run ahead: everything before it is done.
    meta_slot_ ^= 1;
    int32_t* host_meta = host_meta_ + meta_slot_ * meta_slot_stride_;
    if (batch.tokens_from_argmax) {
      KS_CUDA_CHECK("begin_batch", cudaEventSynchronize(meta_copied_[meta_slot_]));
    } else {
      KS_CUDA_CHECK("begin_batch", cudaStreamSynchronize(stream_));
      std::memcpy(host_meta, batch.tokens, size_t(n) * sizeof(int32_t));
    }
    std::memcpy(host_meta + cap, batch.positions, size_t(n) * sizeof(int32_t));
    std::memcpy(host_meta + 2 * cap, batch.seq_ids, size_t(n) * sizeof(int32_t));
    // The block tables go to a fixed device buffer, which captured graphs read at replay, right
    // after the three token arrays (block_tables_device()), so that one copy takes the call's
    // metadata: every copy in the stream adds its latency between two steps. The slots of the
    // tokens past n go along with whatever they held; no kernel reads them.
    const int64_t table_stride = shape_.blocks_per_seq();
    for (int64_t seq = 0; seq < shape_.max_seqs; ++seq) {
      std::memcpy(host_meta + 3 * cap + seq * table_stride,
                  batch.block_tables + seq * batch.block_table_stride,
                  size_t(table_stride) * sizeof(int32_t));
    }
    const int64_t first = batch.tokens_from_argmax ? cap : 0;  // the tokens stay as they are
    const int64_t end = 3 * cap + shape_.max_seqs * table_stride;
    KS_CUDA_CHECK("begin_batch", cudaMemcpyAsync(meta_ + first, host_meta + first,
                                                 size_t(end - first) * sizeof(int32_t),
                                                 cudaMemcpyHostToDevice, stream_));
    KS_CUDA_CHECK("begin_batch", cudaEventRecord(meta_copied_[meta_slot_], stream_));
    batch_ = batch;
    scratch_used_ = 0;
    shadow_ = ShadowState{};
    // Each step starts from the same norm-halves buffer, so its launches (and a captured step's
    // fingerprint) are the same step after step.
    norm_halves_ = NormHalvesState{};
    // Runs: maximal spans of one sequence at consecutive positions (a prompt chunk, or a
    // decode token). Several prompts prefilled in one call are several runs.
    runs_.clear();
    for (int64_t i = 0; i < n; ++i) {
      if (i > 0 && batch.seq_ids[i] == batch.seq_ids[i - 1] &&
          batch.positions[i] == batch.positions[i - 1] + 1) {
        ++runs_.back().second;
      } else {
        runs_.emplace_back(i, 1);
      }
    }
    // Rope inside decode attention: up to 64 tokens, each of its own sequence (a token never
    // reads another's new row), where the tensor-core split kernel runs.
    rope_in_decode_ = n <= kMaxGemvBatchTokens && rope_in_attention_ &&
                      tensor_core_attention(int(config_.head_dim), cache_.type);
    for (int64_t i = 0; rope_in_decode_ && i < n; ++i) {
      for (int64_t j = 0; j < i; ++j) {
        if (batch.seq_ids[j] == batch.seq_ids[i]) rope_in_decode_ = false;
      }
    }

    const bool graph = !timing_ && n <= kMaxGemvTokens && batch.n_logit_rows > 0 &&
                       batch.n_logit_rows <= kMaxGemvTokens;
    if (graph) {
      // The attention launches differ with rope_in_decode_, and the launches with the switches
      // that choose paths at run time (a step after a switch changes is captured anew).
      graph_key_.assign({int32_t(n), int32_t(rope_in_decode_), path_switches()});
      graph_key_.insert(graph_key_.end(), batch.logit_rows, batch.logit_rows + batch.n_logit_rows);
      fingerprint_ = 1469598103934665603ull;
      if (graphs_.count(graph_key_) != 0) {
        mode_ = Mode::replay;
      } else {
        KS_CUDA_CHECK("begin_batch",
                      cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
        mode_ = Mode::capture;
      }
    }
    return Status::ok();
  }

  Result<Tensor> scratch(int64_t rows, int64_t cols) override {
    const size_t n = (size_t(rows * cols) + kAlignFloats - 1) / kAlignFloats * kAlignFloats;
    if (scratch_used_ + n > arena_floats_) {
      return Status::error("cuda backend: scratch workspace exhausted (planner bug)");
    }
    Tensor t{arena_ + scratch_used_, rows, cols};
    scratch_used_ += n;
    return t;
  }

  Status embed(Tensor out, const QuantWeight& table) override {
    if (table.data.data() != embed_host_ || table.cols != out.cols) {
      return Status::error("cuda embed: the embedding table was not uploaded to this backend");
    }
    note_write(out);
    return launch("embed", {addr(out.data), uint64_t(batch_.n_tokens)}, [&] {
      return embed_rows(embed_, tokens_device(), batch_.n_tokens, f32(out), stream_);
    });
  }

  Status rms_norm(Tensor out, Tensor x, const Vector& w, float eps) override {
    KS_ASSIGN_OR_RETURN(const float* weight, norm_weight(out, x, w, "rms_norm"));
    return launch_norm(out, x, weight, eps);
  }

  Status matmul(Tensor out, Tensor x, const Linear& w) override {
    const Tensor outs[] = {out};
    const Linear* const weights[] = {&w};
    return matmul_multi(outs, x, weights);
  }

  Status matmul_multi(std::span<const Tensor> outs, Tensor x,
                      std::span<const Linear* const> weights) override {
    KS_ASSIGN_OR_RETURN(GemvCall m, gemv_call(outs, x, weights));
    return launch_matmul(m, x);
  }

  // --- fused ops (backend.h). Each takes the decode GEMV (<= 64 tokens, fp16 or quantized weights)
  // with the fusion in its prologue or epilogue; otherwise the plain ops' launches one after
  // another. fp32 weights never fuse: their matmuls are cuBLAS fp32 GEMMs.

  Status norm_matmul(std::span<const Tensor> outs, Tensor normed, Tensor x, const Vector& norm_w,
                     float eps, std::span<const Linear* const> weights) override {
    KS_ASSIGN_OR_RETURN(const float* weight, norm_weight(normed, x, norm_w, "norm_matmul"));
    KS_RETURN_IF_ERROR(check_norm_operands("norm_matmul", x, normed, outs));
    KS_ASSIGN_OR_RETURN(GemvCall m, gemv_call(outs, normed, weights));
    if (!m.fp32 && gemv_fuses_norm(x.cols, x.rows)) {
      // The GEMV's blocks normalize x themselves; block 0 writes `normed`.
      m.norm = NormInput{f32(x), weight, f32(normed), eps};
      m.norm_halves = prepared_norm(x, weight);
      note_write(normed);
      for (int i = 0; i < m.n_jobs; ++i) note_write(m.outs[i]);
      return launch_gemv(m, GemvEpilogue::store, ShadowOut{});
    }
    KS_RETURN_IF_ERROR(launch_norm(normed, x, weight, eps, false,
                                   wants_token_halves(m, normed, GemvEpilogue::store)));
    return launch_matmul(m, normed);
  }

  Status norm_matmul_swiglu(Tensor gate, Tensor up, Tensor normed, Tensor x, const Vector& norm_w,
                            float eps, const Linear& w_gate, const Linear& w_up) override {
    if (gate.rows != up.rows || gate.cols != up.cols) {
      return Status::error("cuda norm_matmul_swiglu: gate and up shapes differ");
    }
    KS_ASSIGN_OR_RETURN(const float* weight, norm_weight(normed, x, norm_w, "norm_matmul_swiglu"));
    const Tensor outs[] = {gate, up};
    KS_RETURN_IF_ERROR(check_norm_operands("norm_matmul_swiglu", x, normed, outs));
    const Linear* const weights[] = {&w_gate, &w_up};
    KS_ASSIGN_OR_RETURN(GemvCall m, gemv_call(outs, normed, weights));
    if (!m.fp32 && gemv_fuses_norm(x.cols, x.rows)) {
      m.norm = NormInput{f32(x), weight, f32(normed), eps};
      m.norm_halves = prepared_norm(x, weight);
      note_write(normed);
      note_write(gate);
      note_write(up);
      const ShadowOut shadow = produce_shadow(gate, writes_halves(m));
      return launch_gemv(m, GemvEpilogue::swiglu, shadow);
    }
    const bool gemv = !m.fp32 && x.rows <= kMaxGemvBatchTokens;
    KS_RETURN_IF_ERROR(launch_norm(normed, x, weight, eps, false,
                                   gemv && wants_token_halves(m, normed, GemvEpilogue::swiglu)));
    if (gemv) {
      // gate, up = normed · [w_gate, w_up]ᵀ and gate = silu(gate) * up in one launch, reading
      // the shadow the norm wrote; the gate's shadow goes to the other buffer.
      KS_RETURN_IF_ERROR(ensure_shadow(normed));
      note_write(gate);
      note_write(up);
      KS_RETURN_IF_ERROR(bind_shadow(m, normed, GemvEpilogue::swiglu));
      // A launch that reads int8 half groups writes w_down's input as them too, where it can.
      const bool tokens_out = m.tokens_in.codes != nullptr &&
                              gemv_writes_token_halves(m.jobs, m.n_jobs, m.x_stride, m.n_tokens,
                                                       props_.multiProcessorCount);
      const ShadowOut shadow = produce_shadow(gate, writes_halves(m), tokens_out);
      return launch_gemv(m, GemvEpilogue::swiglu, shadow);
    }
    KS_RETURN_IF_ERROR(launch_matmul(m, normed));
    return launch_swiglu(gate, gate, up);
  }

  Status matmul_add(Tensor out, Tensor x, const Linear& w, Tensor residual) override {
    if (residual.rows != out.rows || residual.cols != out.cols) {
      return Status::error("cuda matmul_add: residual and output shapes differ");
    }
    if (overlap(residual, out)) {
      return Status::error("cuda matmul_add: the residual overlaps the output");
    }
    const Tensor outs[] = {out};
    const Linear* const weights[] = {&w};
    KS_ASSIGN_OR_RETURN(GemvCall m, gemv_call(outs, x, weights));
    if (!m.fp32 && x.rows <= kMaxGemvBatchTokens) {
      // out = x · wᵀ and residual += out in one launch (the GEMV's epilogue).
      KS_RETURN_IF_ERROR(ensure_shadow(x));
      note_write(out);
      note_write(residual);
      KS_RETURN_IF_ERROR(bind_shadow(m, x, GemvEpilogue::store));
      m.jobs[0].residual = f32(residual);
      const float* next_norm = planned_norm(m, residual);
      if (next_norm != nullptr) {
        const int buffer = 1 - norm_halves_.buffer;
        const NormHalvesBuffer& b = norm_buffers_[buffer];
        m.norm_out = NormHalvesOut{next_norm, b.out, b.ss};
        norm_halves_ = NormHalvesState{residual.data, next_norm, buffer};
      }
      return launch_gemv(m, GemvEpilogue::store, ShadowOut{});
    }
    KS_RETURN_IF_ERROR(launch_matmul(m, x));
    return launch_add(residual, out);
  }

  // Batch-1 decode layers of int4 weights over an fp16 cache are one launch per
  // kMaxLaunchLayers layers (layer.cuh); anything else composes the fused ops layer by layer.
  Status decoder_layer(Tensor x, const LayerScratch& s, const LayerWeights& l, int64_t layer,
                       const RopeParams& p, float eps) override {
    return decoder_layers(x, s, std::span<const LayerWeights>(&l, 1), layer, p, eps);
  }

  Status decoder_layers(Tensor x, const LayerScratch& s, std::span<const LayerWeights> layers,
                        int64_t first, const RopeParams& p, float eps) override {
    for (size_t done = 0; done < layers.size();) {
      const size_t n = std::min(layers.size() - done, size_t(layers_per_launch_));
      const std::span<const LayerWeights> part = layers.subspan(done, n);
      const int64_t at = first + int64_t(done);
      done += n;
      KS_ASSIGN_OR_RETURN(std::optional<DecodeLayerArgs> args,
                          layer_kernel_args(x, s, part, at, p, eps));
      if (!args) {
        const bool prefill = prefill_layer_ && x.rows > kMaxGemvBatchTokens && !fp32_weights_;
        for (size_t i = 0; i < part.size(); ++i) {
          if (prefill) {
            KS_RETURN_IF_ERROR(prefill_layer(x, s, part[i], at + int64_t(i), p, eps));
            continue;
          }
          // The layer's two residual adds feed its ffn_norm, then the next layer's attn_norm, or
          // after the model's last layer its final norm (when the lm_head can take it).
          const size_t index = size_t(at - first) + i;
          KS_ASSIGN_OR_RETURN(norm_plan_[0], planned(part[i].ffn_norm));
          norm_plan_[1] = PlannedNorm{};
          if (index + 1 < layers.size()) {
            KS_ASSIGN_OR_RETURN(norm_plan_[1], planned(layers[index + 1].attn_norm));
          } else if (at + int64_t(i) + 1 == config_.n_layers && plan_final_norm_flag()) {
            norm_plan_[1] = output_norm_;
          }
          norm_plan_next_ = 0;
          // The composition's q and k are scratch after its attention: decode attention need not
          // write them back rotated.
          in_layer_ = true;
          const Status done_layer = Backend::decoder_layer(x, s, part[i], at + int64_t(i), p, eps);
          norm_plan_next_ = 2;
          in_layer_ = false;
          KS_RETURN_IF_ERROR(done_layer);
        }
        continue;
      }
      for (const Tensor& t : {x, s.q, s.k, s.v, s.attn, s.gate}) note_write(t);
      const uint64_t trace[] = {
          addr(x.data),      addr(s.q.data),      addr(s.k.data), addr(s.v.data), addr(s.attn.data),
          addr(s.gate.data), addr(args->wq.data), uint64_t(at),   uint64_t(n),    bits(eps)};
      KS_RETURN_IF_ERROR(launch("decoder layer", trace, [&] {
        return decode_layer(*args, props_.multiProcessorCount, props_.sharedMemPerBlockOptin,
                            stream_);
      }));
    }
    return Status::ok();
  }

  // A decoder layer of more than 64 tokens (prefill, GEMMs): the composition of the fused ops,
  // except where backend.h's contract lets a layer leave its scratch tensors unwritten. The norms
  // write only the fp16 shadows their GEMMs read; the two output projections add into x in their
  // GEMMs' epilogues (no proj tensor, no add launch); gate and up are stored as fp16 products
  // (in the first halves of their own tensors) and SwiGLU reads them and writes only the shadow
  // the down projection reads. Measured on the H200, 8B, 16 x 1024-token prefill: the add
  // launches took 11.9 ms of 454, SwiGLU over fp32 gate and up 21 ms.
  Status prefill_layer(Tensor x, const LayerScratch& s, const LayerWeights& l, int64_t layer,
                       const RopeParams& p, float eps) {
    const Tensor qkv[] = {s.q, s.k, s.v};
    const Linear* const qkv_weights[] = {&l.wq, &l.wk, &l.wv};
    KS_ASSIGN_OR_RETURN(GemvCall qkv_call, gemv_call(qkv, s.normed, qkv_weights));
    KS_RETURN_IF_ERROR(launch_norm_for_gemm(s.normed, x, l.attn_norm, eps));
    // q/k/v's biases join in the rope launch, which reads q, k and v anyway (an fp8 cache's rope
    // launch cannot take them).
    const bool rope_takes_qkv = cache_.type != KvType::f8 && x.rows >= kRopeTokensThreshold;
    const float* biases[3] = {qkv_call.jobs[0].w.bias, qkv_call.jobs[1].w.bias,
                              qkv_call.jobs[2].w.bias};
    const bool bias_in_rope =
        bias_in_rope_ && rope_takes_qkv &&
        (biases[0] != nullptr || biases[1] != nullptr || biases[2] != nullptr);
    if (bias_in_rope) {
      for (int i = 0; i < 3; ++i) qkv_call.jobs[i].w.bias = nullptr;
    }
    KS_RETURN_IF_ERROR(check_rope(s.q, s.k, p));
    // q, k and v as one GEMM of the three weights stacked (their upload slots are consecutive),
    // into s.gate's memory, which the MLP fills only later; the rope launch reads them there.
    const DeviceWeight* stack[] = {&qkv_call.jobs[0].w, &qkv_call.jobs[1].w, &qkv_call.jobs[2].w};
    const int64_t stacked_cols = s.q.cols + s.k.cols + s.v.cols;
    const bool stacked = stack_qkv_ && rope_takes_qkv && s.gate.cols >= stacked_cols &&
                         qkv_call.slots[1] == qkv_call.slots[0] + 1 &&
                         qkv_call.slots[2] == qkv_call.slots[0] + 2 && ahead_.stacks(stack);
    if (!stacked) {
      KS_RETURN_IF_ERROR(launch_matmul(qkv_call, s.normed));
      KS_RETURN_IF_ERROR(launch_attention(s.attn, s.q, s.k, s.v, layer, p, /*rotate=*/true,
                                          bias_in_rope ? biases : nullptr));
    } else {
      KS_RETURN_IF_ERROR(ensure_shadow(s.normed));
      note_write(s.gate);
      const __half* in = shadow_buffers_[shadow_.buffer];
      const int next = qkv_call.slots[2] + 1;
      KS_RETURN_IF_ERROR(
          launch("matmul (prefill, q/k/v stacked)",
                 {addr(in), uint64_t(x.rows), addr(s.gate.data), addr(stack[0]->data)}, [&] {
                   return ahead_.gemm_stack(stack, qkv_call.slots[0], linear_at(next), next, in,
                                            qkv_call.x_stride, x.rows, f32(s.gate), gemm_ws_,
                                            stream_, GemmOut::store);
                 }));
      KS_RETURN_IF_ERROR(launch_attention(s.attn, s.q, s.k, s.v, layer, p, /*rotate=*/true,
                                          bias_in_rope ? biases : nullptr, f32(s.gate)));
    }
    KS_RETURN_IF_ERROR(matmul_accumulate(x, s.attn, l.wo));
    KS_RETURN_IF_ERROR(launch_norm_for_gemm(s.normed, x, l.ffn_norm, eps));
    const Tensor outs[] = {s.gate, s.up};
    const Linear* const weights[] = {&l.w_gate, &l.w_up};
    KS_ASSIGN_OR_RETURN(GemvCall m, gemv_call(outs, s.normed, weights));
    const bool half = fp16_mlp_ && shadow_fits(s.gate) && s.gate.cols % 8 == 0 &&
                      m.jobs[0].w.bias == nullptr && m.jobs[1].w.bias == nullptr;
    if (!half) {
      KS_RETURN_IF_ERROR(launch_matmul(m, s.normed));
      KS_RETURN_IF_ERROR(launch_swiglu(s.gate, s.gate, s.up));
      return matmul_accumulate(x, s.gate, l.w_down);
    }
    KS_RETURN_IF_ERROR(launch_matmul(m, s.normed, GemmOut::store_fp16));
    // silu(gate) * up into the shadow only; s.gate and s.up hold fp16 products, which nothing
    // else reads.
    const ShadowOut shadow = produce_shadow(s.gate);
    const auto* gate16 = reinterpret_cast<const __half*>(s.gate.data);
    const auto* up16 = reinterpret_cast<const __half*>(s.up.data);
    KS_RETURN_IF_ERROR(launch(
        "swiglu (fp16)",
        {addr(gate16), addr(up16), uint64_t(s.gate.rows), uint64_t(s.gate.cols), addr(shadow.data)},
        [&] {
          return cuda::swiglu_half(gate16, up16, s.gate.rows, s.gate.cols, shadow, stream_);
        }));
    return matmul_accumulate(x, s.gate, l.w_down);
  }

  // rms_norm of x into `normed` for a GEMM that reads only its fp16 shadow: the shadow alone is
  // written where it fits (prefill_layer), else normed too.
  Status launch_norm_for_gemm(Tensor normed, Tensor x, const Vector& norm_w, float eps) {
    KS_ASSIGN_OR_RETURN(const float* w, norm_weight(normed, x, norm_w, "prefill layer"));
    return launch_norm(normed, x, w, eps, /*shadow_only=*/shadow_fits(normed));
  }

  Status rope_attention(Tensor out, Tensor q, Tensor k, Tensor v, int64_t layer,
                        const RopeParams& p) override {
    KS_RETURN_IF_ERROR(check_rope(q, k, p));
    // In a decode batch the merging split (or the combine kernel) writes `out` and then rotates q
    // and k in place.
    if (overlap(out, q) || overlap(out, k) || overlap(out, v) || overlap(q, k) || overlap(q, v) ||
        overlap(k, v)) {
      return Status::error("cuda rope_attention: out, q, k and v must not overlap one another");
    }
    return launch_attention(out, q, k, v, layer, p, /*rotate=*/true);
  }

  // --- plain ops -----------------------------------------------------------------------------

  Status rope(Tensor q, Tensor k, const RopeParams& p) override {
    KS_RETURN_IF_ERROR(check_rope(q, k, p));
    note_write(q);
    note_write(k);
    return launch("rope", {addr(q.data), addr(k.data), uint64_t(q.rows)}, [&] {
      return cuda::rope(f32(q), f32(k), q.rows, int(p.n_heads), int(p.n_kv_heads), int(p.head_dim),
                        positions_device(), inv_freq_, stream_);
    });
  }

  Status attention(Tensor out, Tensor q, Tensor k, Tensor v, int64_t layer,
                   const RopeParams& p) override {
    return launch_attention(out, q, k, v, layer, p, /*rotate=*/false);
  }

  Status swiglu(Tensor out, Tensor gate, Tensor up) override {
    if (gate.rows != up.rows || gate.cols != up.cols || out.rows != gate.rows ||
        out.cols != gate.cols) {
      return Status::error("cuda swiglu: shapes do not match");
    }
    return launch_swiglu(out, gate, up);
  }

  Status add(Tensor x, Tensor y) override {
    if (x.rows != y.rows || x.cols != y.cols) return Status::error("cuda add: shapes differ");
    return launch_add(x, y);
  }

  Status gather_rows(Tensor out, Tensor x, const int32_t* rows, int64_t n) override {
    // The rows are staged in one pinned buffer, which the previous step's graph (a captured copy)
    // may still be about to read while a call run ahead goes on: such a call gathers nothing
    // (begin_batch: every row asks for logits, in order).
    if (batch_.tokens_from_argmax) {
      return Status::error("cuda gather_rows: not in a call run ahead");
    }
    if (n > shape_.max_logit_rows && n > shape_.max_batch_tokens) {
      return Status::error("cuda gather_rows: more rows than reserved");
    }
    if (out.rows != n || out.cols != x.cols) {
      return Status::error("cuda gather_rows: output shape does not match");
    }
    for (int64_t i = 0; i < n; ++i) {
      if (rows[i] < 0 || rows[i] >= x.rows) {
        return Status::error("cuda gather_rows: row " + std::to_string(rows[i]) + " outside " +
                             std::to_string(x.rows));
      }
    }
    // The rows travel through a pinned buffer: a replayed graph copies whatever it holds now.
    std::memcpy(host_rows_, rows, size_t(n) * sizeof(int32_t));
    note_write(out);
    return launch("gather_rows", {addr(out.data), addr(x.data), uint64_t(n), uint64_t(x.cols)},
                  [&]() -> Status {
                    KS_CUDA_CHECK("gather_rows", cudaMemcpyAsync(gather_rows_, host_rows_,
                                                                 size_t(n) * sizeof(int32_t),
                                                                 cudaMemcpyHostToDevice, stream_));
                    return cuda::gather_rows(f32(out), f32(x), gather_rows_, n, x.cols, stream_);
                  });
  }

  Status read(Tensor t, float* host) override {
    KS_RETURN_IF_ERROR(finish_graph());
    const size_t n = size_t(t.rows * t.cols);
    if (n <= host_read_floats_) {
      KS_CUDA_CHECK("read", cudaMemcpyAsync(host_read_, t.data, n * sizeof(float),
                                            cudaMemcpyDeviceToHost, stream_));
      KS_CUDA_CHECK("read", cudaStreamSynchronize(stream_));
      std::memcpy(host, host_read_, n * sizeof(float));
    } else {
      KS_CUDA_CHECK("read", cudaMemcpyAsync(host, t.data, n * sizeof(float), cudaMemcpyDeviceToHost,
                                            stream_));
      KS_CUDA_CHECK("read", cudaStreamSynchronize(stream_));
    }
    return collect_timings();
  }

  // Only the rows asked for cross to the host, a run of consecutive rows in one copy, through
  // the pinned staging when they fit it (a server step's rows do: at most kMaxGemvTokens).
  Status do_read_rows(Tensor t, std::span<const int32_t> rows, float* host) override {
    KS_RETURN_IF_ERROR(finish_graph());
    const size_t cols = size_t(t.cols);
    float* const staged = rows.size() * cols <= host_read_floats_ ? host_read_ : host;
    const float* const x = static_cast<const float*>(t.data);
    for (size_t i = 0; i < rows.size();) {
      size_t run = 1;
      while (i + run < rows.size() && rows[i + run] == rows[i] + int32_t(run)) ++run;
      KS_CUDA_CHECK("read_rows",
                    cudaMemcpyAsync(staged + i * cols, x + size_t(rows[i]) * cols,
                                    run * cols * sizeof(float), cudaMemcpyDeviceToHost, stream_));
      i += run;
    }
    KS_CUDA_CHECK("read_rows", cudaStreamSynchronize(stream_));
    if (staged != host) std::memcpy(host, staged, rows.size() * cols * sizeof(float));
    return collect_timings();
  }

  Status argmax_rows(Tensor t, int32_t* out) override { return pick_and_read(t, {}, out); }

  // Sampled rows drawn on the device after the argmax, into its output, so the one copy brings
  // back every row's token. Callers (the server's scheduler, generate_tokens) are told to draw
  // here unless KESTREL_CUDA_DRAW=0 (a measurement switch: the host's samplers then pick from
  // the rows read back); pick_rows draws on the device either way. Serving the 8B at 16 clients
  // with T 0.9, top_p 0.95: 2072 -> 3613 output tok/s, TPOT p50 7.47 -> 4.12 ms (H200, PERF.md,
  // twenty-first session).
  bool draws_on_device() const override {
    static const bool on = [] {
      const char* v = std::getenv("KESTREL_CUDA_DRAW");
      return v == nullptr || std::string(v) != "0";
    }();
    return on && draw_work_ != nullptr;
  }

  Status do_pick_rows(Tensor t, std::span<const RowDraw> draws, int32_t* out) override {
    return pick_and_read(t, draws, out);
  }

  Status pick_and_read(Tensor t, std::span<const RowDraw> draws, int32_t* out) {
    KS_RETURN_IF_ERROR(queue_argmax(t, /*feed=*/false, 0, draws));
    KS_CUDA_CHECK("argmax_rows", cudaStreamSynchronize(stream_));
    std::memcpy(out, host_argmax_, size_t(t.rows) * sizeof(int32_t));
    return collect_timings();
  }

  // Decode run ahead (Backend::start_argmax): the argmax (and the draws after it) also write
  // the tokens' device slots, where the next call (tokens_from_argmax) finds its tokens, and its
  // rows come back to host slot `slot` behind an event, so nothing here waits for the device.
  bool argmax_on_device() const override { return true; }

  Status do_start_argmax(Tensor t, int slot, std::span<const RowDraw> draws) override {
    KS_RETURN_IF_ERROR(queue_argmax(t, /*feed=*/true, slot, draws));
    KS_CUDA_CHECK("argmax_rows", cudaEventRecord(argmax_copied_[slot], stream_));
    return Status::ok();
  }

  Status do_finish_argmax(int slot, int32_t* out) override {
    KS_CUDA_CHECK("argmax_rows", cudaEventSynchronize(argmax_copied_[slot]));
    std::memcpy(out, host_argmax_ + slot * argmax_slot_stride_,
                size_t(argmax_rows_[slot]) * sizeof(int32_t));
    // Op timing reads every pending event, a call queued after this one's included.
    if (timing_) KS_CUDA_CHECK("argmax_rows", cudaStreamSynchronize(stream_));
    return collect_timings();
  }

  // The step's graph, then the argmax of t's rows (an eager launch after the graph, timed, never
  // traced; with `feed` also into the tokens' device slots, meta_'s first max_batch_tokens), the
  // draws over it, and the rows' copy to host slot `slot`. Without draws the argmax kernel
  // writes the token slots itself; the draw kernel writes only argmax_out_, so with draws the
  // fed tokens are a device copy of argmax_out_ after the last draw.
  Status queue_argmax(Tensor t, bool feed, int slot, std::span<const RowDraw> draws = {}) {
    if (!draws.empty() && size_t(t.cols) > draw_work_cols_) {
      return Status::error("cuda draws: rows of " + std::to_string(t.cols) +
                           " columns, more than the " + std::to_string(draw_work_cols_) +
                           " reserved");
    }
    KS_RETURN_IF_ERROR(finish_graph());
    if (t.rows > shape_.max_logit_rows && t.rows > shape_.max_batch_tokens) {
      return Status::error("cuda argmax_rows: more rows than reserved");
    }
    if (feed && t.rows > shape_.max_batch_tokens) {
      return Status::error("cuda argmax_rows: more rows than a call's tokens (run ahead)");
    }
    int32_t* tokens = feed ? meta_ : nullptr;
    // With draws, the argmax feeds nothing: the copy after the draws does.
    int32_t* argmax_feeds = draws.empty() ? tokens : nullptr;
    KS_RETURN_IF_ERROR(launch("argmax", {addr(t.data), uint64_t(t.rows), uint64_t(t.cols)}, [&] {
      if (argmax_sliced() && t.rows <= kArgmaxSplitRows) {
        return argmax_rows_sliced(f32(t), t.rows, t.cols, argmax_out_, argmax_feeds,
                                  argmax_partials_, argmax_counters_, stream_);
      }
      return cuda::argmax_rows(f32(t), t.rows, t.cols, argmax_out_, argmax_feeds, stream_);
    }));
    for (size_t first = 0; first < draws.size(); first += kDrawRowsPerLaunch) {
      const size_t count = std::min(draws.size() - first, size_t(kDrawRowsPerLaunch));
      DrawLaunch rows;
      for (size_t i = 0; i < count; ++i) {
        const RowDraw& d = draws[first + i];
        rows.rows[i] = DrawRow{
            d.row,          d.vocab_size, d.params.top_k, d.params.temperature, d.params.top_p,
            d.params.min_p, d.u};
      }
      KS_RETURN_IF_ERROR(
          launch("draw", {addr(t.data), uint64_t(t.rows), uint64_t(t.cols), uint64_t(count)}, [&] {
            return draw_rows(f32(t), t.rows, t.cols, rows, int(count), argmax_out_, draw_work_,
                             stream_);
          }));
    }
    if (feed && !draws.empty()) {
      KS_CUDA_CHECK("argmax_rows",
                    cudaMemcpyAsync(tokens, argmax_out_, size_t(t.rows) * sizeof(int32_t),
                                    cudaMemcpyDeviceToDevice, stream_));
    }
    argmax_rows_[slot] = t.rows;
    KS_CUDA_CHECK("argmax_rows", cudaMemcpyAsync(host_argmax_ + slot * argmax_slot_stride_,
                                                 argmax_out_, size_t(t.rows) * sizeof(int32_t),
                                                 cudaMemcpyDeviceToHost, stream_));
    return Status::ok();
  }

  size_t memory_in_use() const override { return in_use_; }
  size_t peak_memory() const override { return peak_; }

  // Test and benchmark hooks (cuda_backend.h).
  Status write(Tensor t, const float* host) {
    if (mode_ != Mode::eager) return Status::error("cuda write_tensor: not during a captured step");
    note_write(t);
    KS_CUDA_CHECK("write_tensor", cudaMemcpyAsync(t.data, host, size_t(t.rows * t.cols) * 4,
                                                  cudaMemcpyHostToDevice, stream_));
    KS_CUDA_CHECK("write_tensor", cudaStreamSynchronize(stream_));
    return Status::ok();
  }

  Status set_timing(bool enabled) {
    if (enabled && timing_events_.empty()) {
      timing_events_.resize(kMaxTimedEvents);
      for (cudaEvent_t& e : timing_events_) KS_CUDA_CHECK("op timing", cudaEventCreate(&e));
    }
    timing_ = enabled;
    op_times_.clear();
    pending_.clear();
    return Status::ok();
  }

  std::vector<OpTime> timings() const {
    std::vector<OpTime> out;
    for (const auto& [op, t] : op_times_) out.push_back(t);
    std::sort(out.begin(), out.end(),
              [](const OpTime& a, const OpTime& b) { return a.milliseconds > b.milliseconds; });
    return out;
  }

  GraphStats graph_stats() const { return stats_; }
  int64_t dequant_ahead_hits() const { return ahead_.hits(); }

 private:
  CudaBackend() = default;

  // What reserve() allocates beyond the KV cache and the scratch arena.
  struct Extras {
    int64_t shadow_rows = 0;
    int64_t shadow_cols = 0;
    size_t shadow_bytes = 0;
    size_t halves_bytes = 0;       // one token's int8 values and half-group scales (HalfGroupOut)
    size_t norm_halves_bytes = 0;  // those and a sum of squares a half (NormHalvesBuffer)
    int64_t token_rows = 0;        // rows of a shadow's int8 half groups (TokenHalvesOut)
    size_t tokens_bytes = 0;       // their codes and scales
    size_t dequant_bytes = 0;      // dequant_copies fp16 copies of the largest weight
    int dequant_copies = 1;
    size_t cublas_bytes = 0;
    int max_splits = 0;
    size_t split_o_bytes = 0;
    size_t split_ml_bytes = 0;
    size_t meta_bytes = 0;
    size_t rows_bytes = 0;
    size_t arrival_bytes = 0;
    size_t layer_sync_bytes = 0;
    size_t argmax_partial_bytes = 0;
    size_t argmax_count_bytes = 0;
    size_t draw_work_bytes = 0;
    size_t total() const {
      return 2 * shadow_bytes + 2 * halves_bytes + 2 * norm_halves_bytes + 2 * tokens_bytes +
             dequant_bytes + cublas_bytes + split_o_bytes + split_ml_bytes + arrival_bytes +
             meta_bytes + 2 * rows_bytes + layer_sync_bytes + argmax_partial_bytes +
             argmax_count_bytes + draw_work_bytes;
    }
  };

  Extras extras_for(const ModelConfig& c, const RunShape& shape) const {
    Extras e;
    const int64_t widest = std::max({c.hidden_size, c.q_dim(), c.intermediate_size});
    e.shadow_rows =
        std::max({shape.max_batch_tokens, shape.max_logit_rows, int64_t(kMaxGemvTokens)});
    e.shadow_cols = round_up(widest, kGroup);
    e.shadow_bytes = size_t(e.shadow_rows * e.shadow_cols) * sizeof(__half);
    e.halves_bytes = size_t(e.shadow_cols + e.shadow_cols / 16 * int64_t(sizeof(int2)));
    e.norm_halves_bytes = e.halves_bytes + size_t(e.shadow_cols / 16) * sizeof(float);
    // Only permuted shadows (at most kMaxGemvBatchTokens rows) are quantized so.
    e.token_rows = std::min(e.shadow_rows, int64_t(kMaxGemvBatchTokens));
    e.tokens_bytes = size_t(e.token_rows * e.shadow_cols) +
                     size_t(e.token_rows * (e.shadow_cols / kGroup)) * sizeof(__half2);
    const bool prefill_gemm =
        shape.max_batch_tokens > kMaxGemvBatchTokens || shape.max_logit_rows > kMaxGemvBatchTokens;
    // Float weights (fp16 on the device, or an fp32 model's fp32) go to cuBLAS as they are;
    // before upload the format is unknown, so the planner is given the quantized (larger)
    // figure.
    const bool float_weights = weights_uploaded() && !is_quantized(weights_format_);
    if (prefill_gemm && !float_weights) {
      // One fp16 copy of the largest layer weight (lm_head, when prefill asks for many logit
      // rows, goes through it in slices of rows). Measured on the H100: slices of 16 MB, meant
      // to keep the copy in L2, made Llama-3.1-8B's 1024-token prefill twice as slow (cuBLAS on
      // thin slices), so whole weights it is. A second copy lets the next weight's copy be made
      // under the current GEMM (DequantAhead, gemm.cuh).
      const int64_t largest = std::max({c.q_dim() * c.hidden_size, c.kv_dim() * c.hidden_size,
                                        c.intermediate_size * c.hidden_size});
      e.dequant_copies = dequant_ahead_ ? 2 : 1;
      e.dequant_bytes = size_t(e.dequant_copies) * size_t(largest) * sizeof(__half);
    }
    // An fp32 model multiplies through cuBLAS at every token count, decode steps included.
    if (prefill_gemm || fp32_weights_) e.cublas_bytes = kCublasWorkspaceBytes;
    e.max_splits =
        decode_splits(props_.multiProcessorCount, int(c.n_kv_heads), 1, shape.max_context);
    const size_t partials = size_t(kMaxGemvTokens) * size_t(c.n_heads) * size_t(e.max_splits);
    e.split_o_bytes = partials * size_t(c.head_dim) * sizeof(float);
    e.split_ml_bytes = partials * 2 * sizeof(float);
    e.arrival_bytes = size_t(kMaxGemvTokens) * size_t(c.n_kv_heads) * sizeof(unsigned);
    e.meta_bytes = size_t(3 * shape.max_batch_tokens + shape.max_seqs * shape.blocks_per_seq()) *
                   sizeof(int32_t);
    e.rows_bytes = size_t(std::max(shape.max_logit_rows, shape.max_batch_tokens)) * sizeof(int32_t);
    e.layer_sync_bytes = size_t(decode_layer_sync_words(int(c.n_kv_heads))) * sizeof(unsigned);
    e.argmax_partial_bytes = size_t(kArgmaxSplitRows) * kArgmaxMaxSlices * sizeof(int2);
    e.argmax_count_bytes = size_t(kArgmaxSplitRows) * sizeof(unsigned);
    // Sampled rows drawn on the device: a fixed-point probability a token of each of a launch's
    // rows (19.4 MB on a 151936-token vocabulary).
    e.draw_work_bytes = size_t(kDrawRowsPerLaunch) * size_t(c.vocab_size) * sizeof(uint64_t);
    return e;
  }

  WorkspaceTypes workspace_types(const ModelConfig& c, const RunShape& shape) const {
    WorkspaceTypes types;
    types.kv_element_bytes = kv_type_bytes(kv_type(shape));
    types.kv_row_bytes = kv_type(shape) == KvType::f8 ? sizeof(float) : 0;
    types.activation_element_bytes = sizeof(float);
    types.score_rows = 0;
    types.fixed_bytes = extras_for(c, shape).total() + size_t(c.head_dim) * sizeof(float);
    return types;
  }

  bool weights_uploaded() const { return embed_.data != nullptr; }

  // The cache's entries: what the shape asks, else fp32 for fp32 weights and fp16 otherwise.
  KvType kv_type(const RunShape& shape) const {
    switch (shape.kv_cache) {
      case KvCacheType::fp16:
        return KvType::f16;
      case KvCacheType::fp8:
        return KvType::f8;
      case KvCacheType::fp32:
        return KvType::f32;
      case KvCacheType::automatic:
        break;
    }
    return weights_uploaded() && weights_format_ == WeightFormat::fp32 ? KvType::f32 : KvType::f16;
  }

  const int32_t* tokens_device() const { return meta_; }
  const int32_t* positions_device() const { return meta_ + shape_.max_batch_tokens; }
  const int32_t* seq_ids_device() const { return meta_ + 2 * shape_.max_batch_tokens; }
  int32_t* block_tables_device() const { return meta_ + 3 * shape_.max_batch_tokens; }

  static uint64_t addr(const void* p) { return uint64_t(reinterpret_cast<uintptr_t>(p)); }

  void trace(uint64_t v) {
    fingerprint_ ^= v;
    fingerprint_ *= 1099511628211ull;
  }

  // Every launch of every op goes through here, so none can skip a step: the op's name and
  // arguments join the fingerprint of a captured or replayed decode step (a replay launches
  // nothing: the graph holds the launch), the launch is timed when op timing is on, and a launch
  // error (bad configuration, missing kernel image, a sticky fault) becomes the op's Status.
  // `run` issues the launch(es) on stream_. Host-side bookkeeping (note_write, produce_shadow)
  // is the caller's, before the call: it runs in every mode.
  template <typename Run>
  Status launch(const char* op, std::span<const uint64_t> args, Run&& run) {
    if (mode_ != Mode::eager) {
      trace(addr(op));
      for (uint64_t v : args) trace(v);
      if (mode_ == Mode::replay) return Status::ok();
    }
    const auto timer = time_op(op);
    KS_RETURN_IF_ERROR(run());
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      return cuda_error(op, "launch", cudaGetErrorString(err), __FILE__, __LINE__);
    }
    return Status::ok();
  }
  template <typename Run>
  Status launch(const char* op, std::initializer_list<uint64_t> args, Run&& run) {
    return launch(op, std::span<const uint64_t>(args.begin(), args.size()), std::forward<Run>(run));
  }

  static uint64_t bits(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
  }

  // --- fp16 shadows -------------------------------------------------------------------------

  ShadowOut shadow_out(int buffer, int64_t rows, int64_t cols) const {
    const bool permuted = rows <= kMaxGemvBatchTokens;
    ShadowOut shadow;
    shadow.data = shadow_buffers_[buffer];
    shadow.row_stride = round_up(cols, kGroup);
    shadow.permuted = permuted;
    return shadow;
  }

  bool shadow_fits(Tensor t) const {
    return t.rows <= shadow_rows_ && round_up(t.cols, kGroup) <= shadow_cols_;
  }

  // The shadow `out`'s producer writes alongside it (none when `out` cannot be a matmul input).
  // Shadows alternate between two buffers, so a producer never overwrites the shadow its own
  // kernel may still be reading (the fused gate/up/swiglu GEMV).
  // With `halves` (the producer is a GEMV for which gemv_writes_halves holds, or a decode
  // attention for which attention_writes_halves does), the buffer's half-group quantization is
  // written too, and a one-token GEMV reading the shadow takes it.
  // With `tokens` (a producer that can write them, for a GEMV that reads them:
  // wants_token_halves), the rows' int8 half groups too (TokenHalvesOut), and the shadow holds the
  // values they stand for.
  ShadowOut produce_shadow(Tensor out, bool halves = false, bool tokens = false) {
    if (!shadow_fits(out)) return ShadowOut{};
    const int buffer = 1 - shadow_.buffer;
    halves = halves && out.rows == 1;
    tokens = tokens && out.rows <= token_rows_;
    shadow_ = ShadowState{out.data, out.rows, out.cols, out.rows <= kMaxGemvBatchTokens,
                          buffer,   halves,   tokens};
    ShadowOut shadow = shadow_out(buffer, out.rows, out.cols);
    if (halves) shadow.halves = half_buffers_[buffer];
    if (tokens) shadow.tokens = token_buffers_[buffer];
    return shadow;
  }

  // Whether the GEMV of `m` on x reads int8 half groups of its input (set_int8_activations on,
  // 9-64 tokens of sym_int4 on the mma path: gemv_reads_token_halves).
  bool wants_token_halves(const GemvCall& m, Tensor x, GemvEpilogue epilogue) const {
    return int8_activations_mode().load(std::memory_order_relaxed) >= 1 && !m.fp32 &&
           x.rows <= token_rows_ &&
           gemv_reads_token_halves(m.jobs, m.n_jobs, m.x_stride, int(x.rows), epilogue,
                                   props_.multiProcessorCount);
  }

  // The GEMV of `m` reads the current shadow of x (ensure_shadow first): its fp16 rows, the
  // one-token half groups its producer wrote, and the rows' int8 half groups where the GEMV
  // reads them, quantized in place here (a launch) in mode 2 where the producer did not.
  Status bind_shadow(GemvCall& m, Tensor x, GemvEpilogue epilogue) {
    m.x = shadow_buffers_[shadow_.buffer];
    m.halves = shadow_halves(x);
    m.tokens_in = TokenHalfGroups{};
    // (token_rows_ is at most kMaxGemvBatchTokens: such a shadow is permuted.)
    if (!wants_token_halves(m, x, epilogue)) return Status::ok();
    const TokenHalvesOut& t = token_buffers_[shadow_.buffer];
    if (!shadow_.tokens) {
      if (int8_activations_mode().load(std::memory_order_relaxed) < 2) return Status::ok();
      __half* data = shadow_buffers_[shadow_.buffer];
      KS_RETURN_IF_ERROR(launch("quantize (int8 half groups)",
                                {addr(data), uint64_t(x.rows), uint64_t(m.x_stride)}, [&] {
                                  int8_requantize_count.fetch_add(1, std::memory_order_relaxed);
                                  return requantize_token_half_groups(data, int(x.rows), m.x_stride,
                                                                      t.codes, t.scales, stream_);
                                }));
      shadow_.tokens = true;
    }
    m.tokens_in = input_of(t);
    return Status::ok();
  }

  // Whether the swiglu GEMV of `m` writes its output's half-group quantization (for the GEMV
  // that reads that output: set_gemv_half_groups). Read once a launch on the host, so a captured
  // graph's launches record the choice in their pointers.
  static bool writes_halves(const GemvCall& m) {
    return !m.fp32 && gemv_half_groups() &&
           gemv_writes_halves(m.jobs[0].w.format, m.n_tokens, m.jobs[0].w.cols);
  }

  // The norm weight a residual add `m` into `residual` prepares the next norm input for: the
  // decode composition's plan (decoder_layers), for one row of a dp4a GEMV, with the switch on;
  // null for none. Every residual add of a planned layer takes its turn in the plan.
  const float* planned_norm(const GemvCall& m, Tensor residual) {
    if (norm_plan_next_ >= 2) return nullptr;
    const PlannedNorm next = norm_plan_[norm_plan_next_++];
    if (next.w == nullptr || m.fp32 || !gemv_norm_halves() || residual.rows != 1 ||
        next.n != residual.cols || !gemv_fuses_norm(residual.cols, 1) || m.n_jobs != 1 ||
        !gemv_writes_norm_halves(m.jobs[0].w.format, 1, m.jobs[0].w.cols, residual.cols)) {
      return nullptr;
    }
    return next.w;
  }

  Result<PlannedNorm> planned(const Vector& norm) const {
    KS_ASSIGN_OR_RETURN(const float* w, vector_of(norm, "decoder layer"));
    return PlannedNorm{w, norm.n};
  }

  // The prepared input of a norm of x with `weight`, if x's last residual add prepared it.
  NormHalvesIn prepared_norm(Tensor x, const float* weight) const {
    if (norm_halves_.owner != x.data || norm_halves_.norm_w != weight || x.rows != 1) {
      return NormHalvesIn{};
    }
    const NormHalvesBuffer& b = norm_buffers_[norm_halves_.buffer];
    return NormHalvesIn{input_of(b.out), b.ss};
  }

  // The half-group input of a GEMV reading the current shadow (ensure_shadow first), if its
  // producer wrote one.
  HalfGroupInput shadow_halves(Tensor x) const {
    if (!shadow_.halves || x.rows != 1) return HalfGroupInput{};
    return input_of(half_buffers_[shadow_.buffer]);
  }

  Status ensure_shadow(Tensor x) {
    if (!shadow_fits(x)) {
      return Status::error("cuda matmul: input [" + std::to_string(x.rows) + ", " +
                           std::to_string(x.cols) + "] exceeds the reserved shadow");
    }
    const bool permuted = x.rows <= kMaxGemvBatchTokens;
    if (shadow_.owner == x.data && shadow_.rows == x.rows && shadow_.cols == x.cols &&
        shadow_.permuted == permuted) {
      return Status::ok();
    }
    const int buffer = 1 - shadow_.buffer;
    shadow_ = ShadowState{x.data, x.rows, x.cols, permuted, buffer};
    return launch(
        "shadow", {addr(x.data), uint64_t(x.rows), uint64_t(x.cols), uint64_t(buffer)}, [&] {
          return write_shadow(f32(x), x.rows, x.cols, shadow_out(buffer, x.rows, x.cols), stream_);
        });
  }

  // An op wrote `t` without refreshing the shadow: forget a shadow of memory it overlaps.
  void note_write(Tensor t) {
    const auto* begin = static_cast<const char*>(t.data);
    const auto* end = begin + t.rows * t.cols * int64_t(sizeof(float));
    if (norm_halves_.owner != nullptr) {
      // A residual of one row (the only kind prepared), at most shadow_cols_ wide.
      const auto* n_begin = static_cast<const char*>(norm_halves_.owner);
      if (begin < n_begin + shadow_cols_ * int64_t(sizeof(float)) && n_begin < end) {
        norm_halves_.owner = nullptr;
      }
    }
    if (shadow_.owner == nullptr) return;
    const auto* s_begin = static_cast<const char*>(shadow_.owner);
    const auto* s_end = s_begin + shadow_.rows * shadow_.cols * int64_t(sizeof(float));
    if (begin < s_end && s_begin < end) shadow_.owner = nullptr;
  }

  // --- the ops' launches ----------------------------------------------------------------------

  static bool overlap(Tensor a, Tensor b) {
    const auto* a0 = static_cast<const char*>(a.data);
    const auto* b0 = static_cast<const char*>(b.data);
    return a0 < b0 + b.rows * b.cols * int64_t(sizeof(float)) &&
           b0 < a0 + a.rows * a.cols * int64_t(sizeof(float));
  }

  // The device copy of a norm's weight, once out = rms_norm(x) · w is checked to fit.
  Result<const float*> norm_weight(Tensor out, Tensor x, const Vector& w, const char* op) const {
    KS_ASSIGN_OR_RETURN(const float* weight, vector_of(w, op));
    if (x.cols != w.n || out.rows != x.rows || out.cols != x.cols) {
      return Status::error(std::string("cuda ") + op + ": norm shapes do not match");
    }
    return weight;
  }

  // A fused norm's tensors are distinct (backend.h): at batch 1 block 0 of the GEMV writes
  // `normed` while the other blocks still read `x` for their own norm, and outputs are written
  // while `x` or `normed` may still be read.
  static Status check_norm_operands(const char* op, Tensor x, Tensor normed,
                                    std::span<const Tensor> outs) {
    bool clash = overlap(x, normed);
    for (const Tensor& out : outs) clash = clash || overlap(out, x) || overlap(out, normed);
    for (size_t i = 0; i < outs.size(); ++i) {
      for (size_t j = i + 1; j < outs.size(); ++j) clash = clash || overlap(outs[i], outs[j]);
    }
    if (!clash) return Status::ok();
    return Status::error(std::string("cuda ") + op +
                         ": x, normed and the outputs must not overlap one another");
  }

  // outs[i] = x · weights[i]ᵀ, checked: the jobs of one GEMV launch (or of one GEMM each).
  Result<GemvCall> gemv_call(std::span<const Tensor> outs, Tensor x,
                             std::span<const Linear* const> weights) const {
    if (outs.size() != weights.size() || outs.empty() || outs.size() > size_t(kMaxGemvJobs)) {
      return Status::error("cuda matmul: 1 to 3 weights per call, one output each");
    }
    KS_ASSIGN_OR_RETURN(const DeviceWeight* first, linear_of(*weights[0]));
    GemvCall m;
    m.n_jobs = int(outs.size());
    m.fp32 = first->format == WeightFormat::fp32;
    m.x_stride = round_up(x.cols, kGroup);
    m.n_tokens = int(x.rows);
    for (size_t i = 0; i < outs.size(); ++i) {
      KS_ASSIGN_OR_RETURN(const DeviceWeight* w, linear_of(*weights[i]));
      if (x.cols != w->cols || outs[i].cols != w->rows || outs[i].rows != x.rows) {
        return Status::error("cuda matmul: x [" + std::to_string(x.rows) + ", " +
                             std::to_string(x.cols) + "] · w [" + std::to_string(w->rows) + ", " +
                             std::to_string(w->cols) + "]ᵀ does not fit out [" +
                             std::to_string(outs[i].rows) + ", " + std::to_string(outs[i].cols) +
                             "]");
      }
      if (w->format != first->format) {
        return Status::error("cuda matmul: weights of one call differ in format");
      }
      m.jobs[i] = GemvJob{*w, f32(outs[i])};
      m.outs[i] = outs[i];
      m.slots[i] = weights[i]->backend_slot;
    }
    return m;
  }

  // The plain matmul of `m`'s jobs on x: the GEMV for at most 64 tokens (a launch per 16), a
  // GEMM per job beyond, cuBLAS fp32 GEMMs for fp32 weights.
  // `out`: what the prefill GEMMs do with their products; the GEMV and fp32 weights only store.
  Status launch_matmul(GemvCall m, Tensor x, GemmOut out = GemmOut::store) {
    if (out != GemmOut::store && (m.fp32 || x.rows <= kMaxGemvBatchTokens)) {
      return Status::error(
          "cuda matmul: only the prefill GEMM of fp16 or quantized weights accumulates or stores "
          "fp16");
    }
    if (m.fp32) return matmul_f32(m, x);
    KS_RETURN_IF_ERROR(ensure_shadow(x));
    for (int i = 0; i < m.n_jobs; ++i) note_write(m.outs[i]);
    if (x.rows <= kMaxGemvBatchTokens) {
      KS_RETURN_IF_ERROR(bind_shadow(m, x, GemvEpilogue::store));
      return launch_gemv(m, GemvEpilogue::store, ShadowOut{});
    }
    m.x = shadow_buffers_[shadow_.buffer];
    return launch_gemm(m, x.rows, out);
  }

  // x += in · wᵀ + bias inside the GEMM (prefill_layer; more than 64 tokens, no fp32 weights).
  Status matmul_accumulate(Tensor x, Tensor in, const Linear& w) {
    if (overlap(x, in)) return Status::error("cuda matmul_accumulate: x overlaps the input");
    const Tensor outs[] = {x};
    const Linear* const weights[] = {&w};
    KS_ASSIGN_OR_RETURN(GemvCall m, gemv_call(outs, in, weights));
    return launch_matmul(m, in, GemmOut::accumulate);
  }

  // The GEMMs of m's jobs (more than 64 tokens, m.x the input's natural shadow), each weight's
  // fp16 copy through ahead_.
  Status launch_gemm(const GemvCall& m, int64_t n, GemmOut out) {
    uint64_t args[3 + 2 * kMaxGemvJobs] = {addr(m.x), uint64_t(n), uint64_t(out)};
    for (int i = 0; i < m.n_jobs; ++i) {
      args[3 + 2 * i] = addr(m.jobs[i].y);
      args[4 + 2 * i] = addr(m.jobs[i].w.data);
    }
    return launch(
        out == GemmOut::accumulate   ? "matmul + add (prefill)"
        : out == GemmOut::store_fp16 ? "matmul (prefill, fp16)"
                                     : "matmul (prefill)",
        std::span<const uint64_t>(args, size_t(3 + 2 * m.n_jobs)), [&]() -> Status {
          for (int i = 0; i < m.n_jobs; ++i) {
            // Upload slots follow the forward pass (weights.h), so the weight after
            // this one's slot is the next GEMM's.
            const int next = m.slots[i] + 1;
            KS_RETURN_IF_ERROR(ahead_.gemm(m.jobs[i].w, m.slots[i], linear_at(next), next, m.x,
                                           m.x_stride, n, m.jobs[i].y, gemm_ws_, stream_, out));
          }
          return Status::ok();
        });
  }

  // The jobs of `m` on fp32 weights: cuBLAS fp32 GEMMs on the fp32 activation, at any token
  // count.
  Status matmul_f32(const GemvCall& m, Tensor x) {
    for (int i = 0; i < m.n_jobs; ++i) note_write(m.outs[i]);
    uint64_t args[2 + 2 * kMaxGemvJobs] = {addr(x.data), uint64_t(x.rows)};
    for (int i = 0; i < m.n_jobs; ++i) {
      args[2 + 2 * i] = addr(m.jobs[i].y);
      args[3 + 2 * i] = addr(m.jobs[i].w.data);
    }
    return launch("matmul (fp32)", std::span<const uint64_t>(args, size_t(2 + 2 * m.n_jobs)),
                  [&]() -> Status {
                    for (int i = 0; i < m.n_jobs; ++i) {
                      KS_RETURN_IF_ERROR(
                          gemm_f32(m.jobs[i].w, f32(x), x.rows, m.jobs[i].y, gemm_ws_, stream_));
                    }
                    return Status::ok();
                  });
  }

  // One decode GEMV launch: `m`'s jobs with the input stage (m.norm or the shadow m.x) and the
  // epilogue (store, residual add per job, swiglu) the caller chose.
  Status launch_gemv(const GemvCall& m, GemvEpilogue epilogue, ShadowOut shadow) {
    constexpr int kFixed = 15, kPerJob = 3;
    uint64_t args[kFixed + kPerJob * kMaxGemvJobs] = {
        addr(m.x),          uint64_t(m.n_tokens),    uint64_t(epilogue),       addr(shadow.data),
        addr(m.norm.x),     addr(m.norm.w),          addr(m.norm.out),         bits(m.norm.eps),
        addr(m.halves.q),   addr(shadow.halves.q),   addr(m.norm_halves.in.q), addr(m.norm_out.ss),
        addr(m.norm_out.w), addr(m.tokens_in.codes), addr(shadow.tokens.codes)};
    for (int i = 0; i < m.n_jobs; ++i) {
      args[kFixed + kPerJob * i] = addr(m.jobs[i].y);
      args[kFixed + kPerJob * i + 1] = addr(m.jobs[i].w.data);
      args[kFixed + kPerJob * i + 2] = addr(m.jobs[i].residual);
    }
    const bool norm = m.norm.x != nullptr;
    const char* op = epilogue == GemvEpilogue::swiglu
                         ? (norm ? "rms_norm + matmul + swiglu" : "matmul + swiglu")
                     : m.jobs[0].residual != nullptr ? "matmul + add"
                     : norm                          ? "rms_norm + matmul"
                                                     : "matmul";
    return launch(op, std::span<const uint64_t>(args, size_t(kFixed + kPerJob * m.n_jobs)), [&] {
      return gemv(m.jobs, m.n_jobs, m.x, m.x_stride, m.n_tokens, props_.multiProcessorCount,
                  stream_, epilogue, shadow, m.norm, m.halves, m.norm_halves, m.norm_out,
                  m.tokens_in);
    });
  }

  // out = rms_norm(x) · w, with out's fp16 shadow for the matmul that reads it; with
  // `shadow_only` (a shadow that fits), the shadow alone; with `tokens` (wants_token_halves of
  // that matmul), the shadow's int8 half groups too.
  Status launch_norm(Tensor out, Tensor x, const float* w, float eps, bool shadow_only = false,
                     bool tokens = false) {
    note_write(out);
    const ShadowOut shadow = produce_shadow(out, false, tokens);
    float* y = shadow_only && shadow.data != nullptr ? nullptr : f32(out);
    return launch(
        y == nullptr ? "rms_norm (shadow)" : "rms_norm",
        {addr(y), addr(x.data), uint64_t(x.rows), uint64_t(x.cols), addr(w), bits(eps),
         addr(shadow.data), addr(shadow.tokens.codes)},
        [&] { return cuda::rms_norm(y, f32(x), w, eps, x.rows, x.cols, shadow, stream_); });
  }

  Status launch_swiglu(Tensor out, Tensor gate, Tensor up) {
    note_write(out);
    const ShadowOut shadow = produce_shadow(out);
    return launch("swiglu",
                  {addr(out.data), addr(gate.data), addr(up.data), uint64_t(gate.rows),
                   uint64_t(gate.cols), addr(shadow.data)},
                  [&] {
                    return cuda::swiglu(f32(out), f32(gate), f32(up), gate.rows, gate.cols, shadow,
                                        stream_);
                  });
  }

  Status launch_add(Tensor x, Tensor y) {
    note_write(x);
    return launch("add", {addr(x.data), addr(y.data), uint64_t(x.rows * x.cols)},
                  [&] { return cuda::add(f32(x), f32(y), x.rows * x.cols, stream_); });
  }

  // The layer kernel's arguments when it takes these layers, cache layers first, first + 1, ...
  // (batch 1, one int4 format, fp16 cache, every layer of one shape; decode_layer_unsupported
  // says the rest), nothing when the fused ops should run instead.
  Result<std::optional<DecodeLayerArgs>> layer_kernel_args(Tensor x, const LayerScratch& s,
                                                           std::span<const LayerWeights> layers,
                                                           int64_t first, const RopeParams& p,
                                                           float eps) const {
    if (!layer_kernel_ || fp32_weights_ || x.rows != 1 || batch_.n_tokens != 1 ||
        cache_.type != KvType::f16 || layers.empty() || layers.size() > kMaxLaunchLayers ||
        first < 0 || first + int64_t(layers.size()) > config_.n_layers ||
        p.head_dim != config_.head_dim || p.n_heads != config_.n_heads ||
        p.n_kv_heads != config_.n_kv_heads) {
      return std::optional<DecodeLayerArgs>();
    }
    DecodeLayerArgs a;
    DeviceWeight* const shapes[kLayerWeights] = {&a.wq,     &a.wk,   &a.wv,    &a.wo,
                                                 &a.w_gate, &a.w_up, &a.w_down};
    for (size_t li = 0; li < layers.size(); ++li) {
      const LayerWeights& l = layers[li];
      const Linear* const linears[kLayerWeights] = {&l.wq,     &l.wk,   &l.wv,    &l.wo,
                                                    &l.w_gate, &l.w_up, &l.w_down};
      LayerPointers& lp = a.layers[li];
      for (int i = 0; i < kLayerWeights; ++i) {
        KS_ASSIGN_OR_RETURN(const DeviceWeight* w, linear_of(*linears[i]));
        if (li == 0) {
          *shapes[i] = *w;
        } else if (!same_shape(*w, *shapes[i])) {
          return std::optional<DecodeLayerArgs>();  // layers of different shapes
        }
        lp.data[i] = w->data;
        lp.scales[i] = w->scales;
        lp.mins[i] = w->mins;
        lp.bias[i] = w->bias;
      }
      KS_ASSIGN_OR_RETURN(lp.attn_norm, vector_of(l.attn_norm, "decoder layer"));
      KS_ASSIGN_OR_RETURN(lp.ffn_norm, vector_of(l.ffn_norm, "decoder layer"));
    }
    a.first_layer = first;
    a.n_layers = int(layers.size());
    // The tensors must be the layer's own: [1, width] each, distinct.
    const Tensor tensors[] = {x, s.q, s.k, s.v, s.attn, s.gate};
    const int64_t widths[] = {a.wq.cols, a.wq.rows, a.wk.rows, a.wv.rows, a.wo.cols, a.w_gate.rows};
    for (size_t i = 0; i < std::size(tensors); ++i) {
      if (tensors[i].rows != 1 || tensors[i].cols != widths[i])
        return std::optional<DecodeLayerArgs>();
      for (size_t j = 0; j < i; ++j) {
        if (overlap(tensors[i], tensors[j])) {
          return Status::error("cuda decoder layer: x and the scratch tensors must not overlap");
        }
      }
    }
    a.eps = eps;
    a.x = f32(x);
    a.q = f32(s.q);
    a.k = f32(s.k);
    a.v = f32(s.v);
    a.attn = f32(s.attn);
    a.act = f32(s.gate);
    a.split_o = decode_ws_.o;
    a.split_ml = decode_ws_.ml;
    a.max_splits = kMaxGemvTokens * decode_ws_.max_splits;  // the workspace holds 16 tokens' splits
    a.sync = layer_sync_;
    a.cache = cache_;
    a.n_heads = int(p.n_heads);
    a.positions = positions_device();
    a.seq_ids = seq_ids_device();
    a.inv_freq = inv_freq_;
    if (!decode_layer_unsupported(a, props_.multiProcessorCount, props_.sharedMemPerBlockOptin)
             .empty()) {
      return std::optional<DecodeLayerArgs>();
    }
    return std::optional<DecodeLayerArgs>(a);
  }

  Status check_rope(Tensor q, Tensor k, const RopeParams& p) const {
    if (q.rows != batch_.n_tokens || k.rows != batch_.n_tokens ||
        q.cols != p.n_heads * p.head_dim || k.cols != p.n_kv_heads * p.head_dim ||
        p.head_dim != config_.head_dim) {
      return Status::error("cuda rope: shapes do not match the batch and heads");
    }
    return Status::ok();
  }

  // The KV cache write of k and v (after rotating q and k in place, one launch, with `rotate`),
  // then attention: the split decode kernel for at most 64 tokens, a flash launch per run of
  // the batch beyond. With `rotate` in a decode batch of distinct sequences (rope_in_decode_)
  // there is no such launch: the split kernel rotates q and k and writes the cache, and its
  // merging split leaves q and k rotated (not inside a decoder layer: AttentionArgs::
  // keep_rotated).
  // q_bias, k_bias, v_bias: the projections' biases when the rope launch adds them
  // (prefill_layer; AttentionArgs).
  Status launch_attention(Tensor out, Tensor q, Tensor k, Tensor v, int64_t layer,
                          const RopeParams& p, bool rotate, const float* const* qkv_bias = nullptr,
                          const float* qkv = nullptr) {
    if (layer < 0 || layer >= config_.n_layers || p.head_dim != config_.head_dim ||
        p.n_kv_heads != config_.n_kv_heads || p.n_heads != config_.n_heads ||
        q.rows != batch_.n_tokens || out.cols != p.n_heads * p.head_dim ||
        k.cols != p.n_kv_heads * p.head_dim || v.cols != k.cols) {
      return Status::error("cuda attention: shapes do not match the reserved model");
    }
    // Up to 64 tokens (a serving step's decode tokens, short prompt chunks) the split kernel,
    // in slices of 16; beyond, the flash prefill kernel.
    const bool prefill =
        q.rows > kMaxGemvBatchTokens && tensor_core_attention(int(p.head_dim), cache_.type);
    if (prefill && round_up(out.cols, kGroup) != out.cols) {
      return Status::error("cuda attention: prefill output width not a multiple of 32");
    }
    // Only the rope launch before attention adds biases and reads a stacked product. (Checked
    // before any tensor's state is noted: a refused call leaves the shadows as they were.)
    if ((qkv_bias != nullptr || qkv != nullptr) && (!rotate || (!prefill && rope_in_decode_))) {
      return Status::error(
          "cuda attention: q/k/v biases or a stacked product need the prefill rope launch");
    }
    if (rotate) {
      note_write(q);
      note_write(k);
    }
    note_write(out);
    AttentionArgs args;
    args.q = f32(q);
    args.k = f32(k);
    args.v = f32(v);
    args.out = f32(out);
    args.n_tokens = q.rows;
    args.n_heads = int(p.n_heads);
    args.layer = layer;
    args.positions = positions_device();
    args.seq_ids = seq_ids_device();
    // One decode token: the merge writes the output's half groups too, for wo's GEMV
    // (set_attention_half_groups), where wo is an int4 weight (the dp4a GEMV that reads them).
    args.shadow =
        produce_shadow(out, !prefill && attention_half_groups() && is_tiled(weights_format_) &&
                                attention_writes_halves(int(p.head_dim), cache_.type, q.rows));
    if (qkv_bias != nullptr) {
      note_write(v);
      args.q_bias = qkv_bias[0];
      args.k_bias = qkv_bias[1];
      args.v_bias = qkv_bias[2];
    }
    if (qkv != nullptr) {
      args.qkv = qkv;
      args.qkv_stride = q.cols + k.cols + v.cols;
    }
    const std::initializer_list<uint64_t> cache_args = {
        addr(q.data),      addr(k.data),      addr(v.data),      uint64_t(layer), uint64_t(q.rows),
        addr(args.q_bias), addr(args.k_bias), addr(args.v_bias), addr(args.qkv)};
    // A decode batch of distinct sequences: the split kernel rotates q and k and writes the
    // cache itself (no token reads another's new row), one launch fewer a layer. Inside a
    // decoder layer nothing reads q and k after it, so they are not written back rotated (the
    // write-back cost the merge 0.7-0.9 us and tg128 2.2-2.6% at batch 1 on the H100: PERF.md,
    // twenty-second session).
    if (rotate && !prefill && rope_in_decode_) {
      args.inv_freq = inv_freq_;
      args.keep_rotated = !in_layer_;
    } else if (rotate) {
      KS_RETURN_IF_ERROR(launch("rope + cache write", cache_args, [&] {
        return rope_kv_cache_write(args, cache_, inv_freq_, stream_);
      }));
    } else {
      KS_RETURN_IF_ERROR(
          launch("cache write", cache_args, [&] { return kv_cache_write(args, cache_, stream_); }));
    }
    return launch("attention",
                  {addr(out.data), addr(q.data), addr(k.data), addr(v.data), uint64_t(layer),
                   uint64_t(q.rows), addr(args.shadow.data), addr(args.shadow.halves.q),
                   uint64_t(args.keep_rotated)},
                  [&]() -> Status {
                    if (!prefill) return attention_decode(args, cache_, decode_ws_, stream_);
                    // The flash kernel walks one sequence's keys per launch: one per run.
                    for (const auto& [begin, length] : runs_) {
                      AttentionArgs run = args;
                      run.q = args.q + begin * q.cols;
                      run.k = args.k + begin * k.cols;
                      run.v = args.v + begin * v.cols;
                      run.out = args.out + begin * out.cols;
                      if (run.shadow.data != nullptr) {
                        run.shadow.data += begin * run.shadow.row_stride;
                      }
                      run.n_tokens = length;
                      run.positions = args.positions + begin;
                      run.seq_ids = args.seq_ids + begin;
                      KS_RETURN_IF_ERROR(attention_prefill(run, cache_, stream_));
                    }
                    return Status::ok();
                  });
  }

  // --- graphs -------------------------------------------------------------------------------

  void abort_capture() {
    if (mode_ != Mode::capture || stream_ == nullptr) return;
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(stream_, &graph);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();  // the aborted capture's error is not the next call's
    mode_ = Mode::eager;
  }

  void clear_graphs() {
    for (auto& [key, g] : graphs_) cudaGraphExecDestroy(g.exec);
    graphs_.clear();
  }

  Status finish_graph() {
    const Mode mode = mode_;
    mode_ = Mode::eager;
    if (mode == Mode::capture) {
      cudaGraph_t graph = nullptr;
      KS_CUDA_CHECK("decode graph", cudaStreamEndCapture(stream_, &graph));
      cudaGraphExec_t exec = nullptr;
      const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
      cudaGraphDestroy(graph);
      KS_CUDA_CHECK("decode graph", err);
      graphs_[graph_key_] = StepGraph{exec, fingerprint_};
      ++stats_.captured;
      KS_CUDA_CHECK("decode graph", cudaGraphLaunch(exec, stream_));
    } else if (mode == Mode::replay) {
      const StepGraph& g = graphs_.at(graph_key_);
      if (g.fingerprint != fingerprint_) {
        return Status::error(
            "cuda decode graph: this call's ops differ from the captured step "
            "of the same shape");
      }
      ++stats_.replayed;
      KS_CUDA_CHECK("decode graph", cudaGraphLaunch(g.exec, stream_));
    }
    return Status::ok();
  }

  // --- per-op timing ------------------------------------------------------------------------

  struct PendingTiming {
    const char* op;
    cudaEvent_t start;
    cudaEvent_t end;
  };

  class ScopedTimer {
   public:
    ScopedTimer(CudaBackend* backend, const char* op) : backend_(backend), op_(op) {
      if (backend_ == nullptr) return;
      const size_t i = 2 * backend_->pending_.size();
      if (i + 1 >= backend_->timing_events_.size()) {
        backend_ = nullptr;
        return;
      }
      start_ = backend_->timing_events_[i];
      end_ = backend_->timing_events_[i + 1];
      cudaEventRecord(start_, backend_->stream_);
    }
    ~ScopedTimer() {
      if (backend_ == nullptr) return;
      cudaEventRecord(end_, backend_->stream_);
      backend_->pending_.push_back(PendingTiming{op_, start_, end_});
    }
    ScopedTimer(const ScopedTimer&) = delete;
    ScopedTimer& operator=(const ScopedTimer&) = delete;

   private:
    CudaBackend* backend_;
    const char* op_;
    cudaEvent_t start_ = nullptr;
    cudaEvent_t end_ = nullptr;
  };

  ScopedTimer time_op(const char* op) { return ScopedTimer(timing_ ? this : nullptr, op); }

  Status collect_timings() {
    for (const PendingTiming& p : pending_) {
      float ms = 0;
      KS_CUDA_CHECK("op timing", cudaEventElapsedTime(&ms, p.start, p.end));
      OpTime& t = op_times_[p.op];
      t.op = p.op;
      t.milliseconds += ms;
      ++t.calls;
    }
    pending_.clear();
    return Status::ok();
  }

  // --- memory -------------------------------------------------------------------------------

  Result<void*> allocate(size_t bytes, const std::string& what) {
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, std::max<size_t>(bytes, 16));
    if (err != cudaSuccess) {
      cudaGetLastError();
      return Status::error("cuda backend: cannot allocate " + std::to_string(bytes >> 20) +
                           " MiB for " + what + " (" + cudaGetErrorString(err) + "; " +
                           std::to_string(free_memory() >> 20) + " MiB free)");
    }
    allocations_[p] = bytes;
    in_use_ += bytes;
    peak_ = std::max(peak_, in_use_);
    return p;
  }

  Status free_device(void* p) {
    auto it = allocations_.find(p);
    if (it == allocations_.end()) return Status::ok();
    in_use_ -= it->second;
    allocations_.erase(it);
    KS_CUDA_CHECK("free", cudaFree(p));
    return Status::ok();
  }

  template <typename T>
  Result<T*> reserve_device(size_t bytes, const std::string& what) {
    KS_ASSIGN_OR_RETURN(void* p, allocate(bytes, what));
    reservation_.push_back(p);
    return static_cast<T*>(p);
  }

  template <typename T>
  Result<T*> pinned(size_t bytes) {
    void* p = nullptr;
    KS_CUDA_CHECK("reserve", cudaMallocHost(&p, std::max<size_t>(bytes, 16)));
    pinned_.push_back(p);
    return static_cast<T*>(p);
  }

  Status release_weights() {
    KS_CUDA_CHECK("upload", cudaStreamSynchronize(stream_));
    KS_RETURN_IF_ERROR(ahead_.drain());
    abort_capture();
    clear_graphs();
    for (void* p : weight_allocations_) KS_RETURN_IF_ERROR(free_device(p));
    weight_allocations_.clear();
    linears_.clear();
    vectors_.clear();
    embed_ = DeviceWeight{};
    embed_host_ = nullptr;
    output_norm_ = PlannedNorm{};
    fp32_weights_ = false;
    return Status::ok();
  }

  Result<void*> weight_memory(size_t bytes, const std::string& what) {
    KS_ASSIGN_OR_RETURN(void* p, allocate(bytes, what));
    weight_allocations_.push_back(p);
    return p;
  }

  // An int4 weight in the GEMV's tiles (int4_tiles.h): rearranged on the host, one copy up.
  Result<DeviceWeight> upload_tiled(const QuantWeight& w, DeviceWeight d, const std::string& what) {
    const TiledInt4 t = tile_int4(w);
    d.tiles = t.tiles;
    const size_t data_bytes = t.data.size();
    const size_t scale_bytes = t.scales.size() * sizeof(uint16_t);
    const size_t scale_at = size_t(round_up(int64_t(data_bytes), 256));
    const size_t min_at = scale_at + size_t(round_up(int64_t(scale_bytes), 256));
    KS_ASSIGN_OR_RETURN(void* mem, weight_memory(min_at + t.mins.size() * sizeof(uint16_t), what));
    auto* base = static_cast<uint8_t*>(mem);
    KS_CUDA_CHECK("upload", cudaMemcpy(base, t.data.data(), data_bytes, cudaMemcpyHostToDevice));
    KS_CUDA_CHECK("upload", cudaMemcpy(base + scale_at, t.scales.data(), scale_bytes,
                                       cudaMemcpyHostToDevice));
    if (!t.mins.empty()) {
      KS_CUDA_CHECK("upload",
                    cudaMemcpy(base + min_at, t.mins.data(), scale_bytes, cudaMemcpyHostToDevice));
      d.mins = reinterpret_cast<const __half*>(base + min_at);
    }
    d.data = base;
    d.scales = reinterpret_cast<const __half*>(base + scale_at);
    return d;
  }

  Result<DeviceWeight> upload_weight(const QuantWeight& w, const std::string& what) {
    DeviceWeight d;
    d.rows = w.rows;
    d.cols = w.cols;
    if (w.rows <= 0) return d;
    if (is_quantized(w.format)) {
      // A 64-wide block's scales are laid out for whole blocks: a row ending in half a block
      // (2080 columns) multiplied wrongly on every path, so it is refused like any other width.
      if (w.cols % kGroup != 0 || (w.block != 32 && w.block != 64) || w.cols % w.block != 0) {
        return Status::error("cuda upload " + what + ": quantized width " + std::to_string(w.cols) +
                             " / block " + std::to_string(w.block) + " unsupported");
      }
      d.format = w.format;
      d.block = w.block;
      if (is_tiled(w.format)) return upload_tiled(w, d, what);
      d.row_bytes = int64_t(w.data_row_bytes());
      const size_t data_bytes = w.data.size();
      const size_t scale_at = round_up(int64_t(data_bytes), 256);
      KS_ASSIGN_OR_RETURN(void* mem, weight_memory(scale_at + w.scales.size(), what));
      auto* base = static_cast<uint8_t*>(mem);
      KS_CUDA_CHECK("upload", cudaMemcpy(base, w.data.data(), data_bytes, cudaMemcpyHostToDevice));
      KS_CUDA_CHECK("upload", cudaMemcpy(base + scale_at, w.scales.data(), w.scales.size(),
                                         cudaMemcpyHostToDevice));
      d.data = base;
      d.scales = reinterpret_cast<const __half*>(base + scale_at);
      return d;
    }
    if (w.format == WeightFormat::fp32 && weights_format_ == WeightFormat::fp32) {
      // An fp32 model keeps its weights: one copy of the rows, which cuBLAS reads as they are.
      d.format = WeightFormat::fp32;
      fp32_weights_ = true;
      d.row_bytes = int64_t(w.data_row_bytes());
      KS_ASSIGN_OR_RETURN(void* mem, weight_memory(w.data.size(), what));
      KS_CUDA_CHECK("upload",
                    cudaMemcpy(mem, w.data.data(), w.data.size(), cudaMemcpyHostToDevice));
      d.data = static_cast<const uint8_t*>(mem);
      return d;
    }
    // Other float formats become fp16 rows padded to a multiple of 32 values (zeros), which the
    // GEMV reads in whole groups and cuBLAS reads with a leading dimension.
    d.format = WeightFormat::fp16;
    const int64_t padded = round_up(w.cols, kGroup);
    d.row_bytes = padded * int64_t(sizeof(uint16_t));
    std::vector<uint16_t> host(size_t(w.rows * padded), 0);
    for (int64_t r = 0; r < w.rows; ++r) {
      uint16_t* dst = host.data() + r * padded;
      const uint8_t* src = w.data.data() + size_t(r) * w.data_row_bytes();
      for (int64_t c = 0; c < w.cols; ++c) {
        switch (w.format) {
          case WeightFormat::fp16:
            std::memcpy(&dst[c], src + 2 * c, 2);
            break;
          case WeightFormat::bf16: {
            uint16_t b;
            std::memcpy(&b, src + 2 * c, 2);
            dst[c] = float_to_fp16(bf16_to_float(b));
            break;
          }
          default: {
            float f;
            std::memcpy(&f, src + 4 * c, 4);
            dst[c] = float_to_fp16(f);
            break;
          }
        }
      }
    }
    KS_ASSIGN_OR_RETURN(void* mem, weight_memory(host.size() * sizeof(uint16_t), what));
    KS_CUDA_CHECK("upload", cudaMemcpy(mem, host.data(), host.size() * sizeof(uint16_t),
                                       cudaMemcpyHostToDevice));
    d.data = static_cast<const uint8_t*>(mem);
    return d;
  }

  Status upload_linear(Linear& linear, const std::string& what) {
    KS_ASSIGN_OR_RETURN(DeviceWeight d, upload_weight(linear.w, what));
    if (!linear.bias.empty()) {
      KS_ASSIGN_OR_RETURN(void* mem, weight_memory(linear.bias.size(), what + ".bias"));
      KS_CUDA_CHECK("upload", cudaMemcpy(mem, linear.bias.data(), linear.bias.size(),
                                         cudaMemcpyHostToDevice));
      d.bias = static_cast<const float*>(mem);
    }
    linear.backend_slot = int(linears_.size());
    linears_.push_back(d);
    return Status::ok();
  }

  Status upload_vector(Vector& v, const std::string& what) {
    KS_ASSIGN_OR_RETURN(void* mem, weight_memory(v.data.size(), what));
    KS_CUDA_CHECK("upload", cudaMemcpy(mem, v.data.data(), v.data.size(), cudaMemcpyHostToDevice));
    v.backend_slot = int(vectors_.size());
    vectors_.push_back(static_cast<const float*>(mem));
    return Status::ok();
  }

  // The weight of upload slot `slot`, null past the last.
  const DeviceWeight* linear_at(int slot) const {
    return slot >= 0 && size_t(slot) < linears_.size() ? &linears_[size_t(slot)] : nullptr;
  }

  Result<const DeviceWeight*> linear_of(const Linear& l) const {
    if (l.backend_slot < 0 || size_t(l.backend_slot) >= linears_.size()) {
      return Status::error("cuda matmul: weight was not uploaded to this backend");
    }
    return &linears_[size_t(l.backend_slot)];
  }

  Result<const float*> vector_of(const Vector& v, const char* op) const {
    if (v.backend_slot < 0 || size_t(v.backend_slot) >= vectors_.size()) {
      return Status::error(std::string("cuda ") + op + ": weight was not uploaded to this backend");
    }
    return vectors_[size_t(v.backend_slot)];
  }

  cudaDeviceProp props_{};
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;

  std::unordered_map<void*, size_t> allocations_;
  size_t in_use_ = 0;
  size_t peak_ = 0;
  std::vector<void*> weight_allocations_;
  std::vector<void*> reservation_;
  std::vector<void*> pinned_;

  WeightFormat weights_format_ = WeightFormat::sym_int4;
  bool fp32_weights_ = false;  // some weight stayed fp32 (an fp32 model): gemm_f32 needs cuBLAS
  std::optional<Roofline> roofline_;
  const uint8_t* embed_host_ = nullptr;
  DeviceWeight embed_;
  std::vector<DeviceWeight> linears_;
  std::vector<const float*> vectors_;

  bool reserved_ = false;
  ModelConfig config_;
  RunShape shape_;
  KvCache cache_;
  float* arena_ = nullptr;
  size_t arena_floats_ = 0;
  size_t scratch_used_ = 0;
  __half* shadow_buffers_[2] = {nullptr, nullptr};
  HalfGroupOut half_buffers_[2];     // each shadow buffer's half-group quantization (one token)
  TokenHalvesOut token_buffers_[2];  // each shadow buffer's rows as int8 half groups
  int64_t token_rows_ = 0;
  NormHalvesBuffer norm_buffers_[2];
  NormHalvesState norm_halves_;
  // The norm weights the decode composition's two residual adds feed next (this layer's ffn_norm,
  // the next layer's attn_norm or the final norm), set by decoder_layers for each layer;
  // norm_plan_next_ counts the adds. A wrong guess costs nothing but the preparation: a norm
  // takes the prepared input only for its own residual and weight.
  PlannedNorm norm_plan_[2];
  PlannedNorm output_norm_;  // the model's final norm, from upload
  int norm_plan_next_ = 2;
  int64_t shadow_rows_ = 0;
  int64_t shadow_cols_ = 0;
  ShadowState shadow_;
  GemmWorkspace gemm_ws_;
  DequantAhead ahead_;
  // Prefill layers take prefill_layer unless KESTREL_CUDA_PREFILL_LAYER=0 (a measurement aid:
  // the fused ops' composition).
  bool prefill_layer_ = switch_on("KESTREL_CUDA_PREFILL_LAYER");
  // The prefill layer's q/k/v biases join in the rope launch unless
  // KESTREL_CUDA_PREFILL_BIAS_IN_ROPE=0 (a measurement aid: a bias launch after each GEMM).
  bool bias_in_rope_ = switch_on("KESTREL_CUDA_PREFILL_BIAS_IN_ROPE");
  // The prefill layer's q/k/v projections are one GEMM of the stacked weights unless
  // KESTREL_CUDA_PREFILL_STACK_QKV=0 (a measurement aid: three GEMMs).
  bool stack_qkv_ = switch_on("KESTREL_CUDA_PREFILL_STACK_QKV");
  // The prefill layer's gate and up products are fp16 unless KESTREL_CUDA_PREFILL_FP16_MLP=0 (a
  // measurement aid: fp32 products and SwiGLU over them).
  bool fp16_mlp_ = switch_on("KESTREL_CUDA_PREFILL_FP16_MLP");
  // Prefill dequantizes the next weight under the current GEMM (DequantAhead) unless
  // KESTREL_CUDA_DEQUANT_AHEAD=0 (a measurement aid: one copy, made before its GEMM).
  bool dequant_ahead_ = switch_on("KESTREL_CUDA_DEQUANT_AHEAD");
  DecodeWorkspace decode_ws_;
  unsigned* layer_sync_ = nullptr;  // the decoder layer kernel's counters
  // Whether this backend runs the batch-1 layer kernel (layer.cuh): set by create() only when
  // it is wanted (layer_kernel_wanted) and the device's claim was had, so the destructor
  // releases only a claim this backend holds.
  bool layer_kernel_ = false;
  // Layers one launch of the layer kernel runs: kMaxLaunchLayers, or
  // KESTREL_CUDA_LAYER_LAUNCH_LAYERS (1 to kMaxLaunchLayers; a measurement aid).
  int layers_per_launch_ = [] {
    const int n = env_int("KESTREL_CUDA_LAYER_LAUNCH_LAYERS", 0);
    return n >= 1 && n <= kMaxLaunchLayers ? n : kMaxLaunchLayers;
  }();
  // Rope and the cache write inside the decode attention kernel (tensor_core_attention) unless
  // KESTREL_CUDA_ROPE_IN_ATTENTION=0 (a measurement aid: the separate launch of before).
  bool rope_in_attention_ = switch_on("KESTREL_CUDA_ROPE_IN_ATTENTION");
  // [3, max_batch_tokens]: tokens, positions, sequence ids; then [max_seqs, blocks_per_seq]:
  // the KV cache block tables
  int32_t* meta_ = nullptr;
  int32_t* gather_rows_ = nullptr;       // [max rows]
  int32_t* argmax_out_ = nullptr;        // [max rows]
  int2* argmax_partials_ = nullptr;      // [kArgmaxSplitRows, kArgmaxMaxSlices] (sample.cuh)
  unsigned* argmax_counters_ = nullptr;  // [kArgmaxSplitRows]
  uint64_t* draw_work_ = nullptr;        // [kDrawRowsPerLaunch, vocab] (sample.cuh: draw_rows)
  size_t draw_work_cols_ = 0;
  float* inv_freq_ = nullptr;     // [head_dim / 2]
  int32_t* host_meta_ = nullptr;  // pinned twins of the above (meta_ and argmax_out_: several)
  int32_t* host_rows_ = nullptr;
  int32_t* host_argmax_ = nullptr;
  // begin_batch stages the metadata in host_meta_'s two copies in turn (meta_slot_, this call's),
  // each copy's transfer ending at its meta_copied_ event; start_argmax's rows land in
  // host_argmax_'s slots, each at its argmax_copied_ event.
  int64_t meta_slot_stride_ = 0;
  int meta_slot_ = 0;
  cudaEvent_t meta_copied_[2] = {};
  int64_t argmax_slot_stride_ = 0;
  int64_t argmax_rows_[kArgmaxInFlight] = {};
  cudaEvent_t argmax_copied_[kArgmaxInFlight] = {};
  float* host_read_ = nullptr;  // pinned [16, vocab]: decode logits come back through it
  size_t host_read_floats_ = 0;

  BatchView batch_;
  // [begin, length] of each run of the batch: one sequence at consecutive positions
  std::vector<std::pair<int64_t, int64_t>> runs_;
  bool rope_in_decode_ = false;  // this batch's decode attention rotates q and k (begin_batch)
  // Inside Backend::decoder_layer's composition (decoder_layers): scratch tensors are not read
  // after the layer, so decode attention leaves q and k unrotated in memory.
  bool in_layer_ = false;

  Mode mode_ = Mode::eager;
  std::vector<int32_t> graph_key_;  // n_tokens, rope_in_decode_, path_switches(), logit rows
  uint64_t fingerprint_ = 0;
  int device_ = 0;
  std::map<std::vector<int32_t>, StepGraph> graphs_;
  GraphStats stats_;

  bool timing_ = false;
  std::vector<cudaEvent_t> timing_events_;
  std::vector<PendingTiming> pending_;
  std::map<std::string, OpTime> op_times_;
};

CudaBackend* as_cuda(Backend& backend) {
  return dynamic_cast<CudaBackend*>(&backend);
}

}  // namespace

Status write_tensor(Backend& backend, Tensor t, const float* host) {
  CudaBackend* cuda = as_cuda(backend);
  if (cuda == nullptr) return Status::error("write_tensor: not a CUDA backend");
  return cuda->write(t, host);
}

bool set_plan_final_norm(bool on) {
  return std::exchange(plan_final_norm_flag(), on);
}

int set_int8_activations(int mode) {
  return int8_activations_mode().exchange(valid_int8_activations(mode));
}

uint64_t int8_requantize_launches() {
  return int8_requantize_count.load(std::memory_order_relaxed);
}

int set_smem_split(int mode) {
  return smem_split_mode().exchange(valid_smem_split(mode));
}

int set_l1_reader_carveout(int percent) {
  return l1_reader_carveout().exchange(valid_l1_reader_carveout(percent));
}

Status set_op_timing(Backend& backend, bool enabled) {
  CudaBackend* cuda = as_cuda(backend);
  if (cuda == nullptr) return Status::error("set_op_timing: not a CUDA backend");
  return cuda->set_timing(enabled);
}

std::vector<OpTime> op_times(Backend& backend) {
  CudaBackend* cuda = as_cuda(backend);
  return cuda != nullptr ? cuda->timings() : std::vector<OpTime>{};
}

GraphStats graph_stats(Backend& backend) {
  CudaBackend* cuda = as_cuda(backend);
  return cuda != nullptr ? cuda->graph_stats() : GraphStats{};
}

void* backend_stream(Backend& backend) {
  CudaBackend* cuda = as_cuda(backend);
  return cuda != nullptr ? static_cast<void*>(cuda->stream()) : nullptr;
}

Status delay_stream(Backend& backend, int microseconds) {
  CudaBackend* cuda = as_cuda(backend);
  if (cuda == nullptr) return Status::error("delay_stream: not a CUDA backend");
  return spin_stream(cuda->stream(), microseconds);
}

int64_t dequant_ahead_hits(Backend& backend) {
  CudaBackend* cuda = as_cuda(backend);
  return cuda != nullptr ? cuda->dequant_ahead_hits() : 0;
}

}  // namespace cuda

Result<std::unique_ptr<Backend>> make_cuda_backend() {
  return cuda::CudaBackend::create(0);
}

Result<std::unique_ptr<Backend>> make_cuda_backend_on(int device) {
  return cuda::CudaBackend::create(device);
}

}  // namespace kestrel
