#include "backend/vulkan/vulkan_backend.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>

#include "backend/vulkan/shader_table.h"
#include "backend/vulkan/vulkan_device.h"
#include "core/stats.h"
#include "model/rope.h"

namespace kestrel {
namespace {

using vulkan::DeviceInfo;
using vulkan::Functions;
using vulkan::result_name;

#define KS_VK(call)                                                                          \
  do {                                                                                       \
    const VkResult ks_vk_result = (call);                                                    \
    if (ks_vk_result != VK_SUCCESS) {                                                        \
      return Status::error(std::string("vulkan backend: ") + #call +                         \
                           " failed: " + result_name(ks_vk_result) + " (" + __FILE__ + ":" + \
                           std::to_string(__LINE__) + ")");                                  \
    }                                                                                        \
  } while (0)

// A submission that has not finished after this long is reported as a lost or hung device
// instead of being waited on forever. Generous: one submission is at most one forward call, and
// the CPU driver runs a large prefill chunk of a big model for minutes.
constexpr uint64_t kSubmitTimeoutSeconds = 600;
constexpr size_t kAlignment = 256;
// Single allocations stay at or below 2 GiB so that every word index in the shaders fits 32 bits.
constexpr size_t kMaxAllocationCap = size_t(2) << 30;
constexpr size_t kStagingBytes = size_t(16) << 20;
// Dispatches recorded into one command buffer before it is submitted without waiting: the
// device starts on a forward call (hundreds of dispatches) while the host records the rest.
constexpr int kDispatchesPerSubmission = 24;
// The shaders' grids put tokens and matmul row tiles in one dimension each: the guaranteed
// minimum of maxComputeWorkGroupCount.
constexpr int64_t kMaxGrid = 65535;
// matmul.comp's workgroup computes kMatvecRows rows x t tokens, t = 1, 2, 4 or 8 (more tokens
// take several workgroup rows of the grid, each reading the weights again).
constexpr int64_t kMatvecRows = 4;
constexpr int64_t kMatvecMaxTokens = 8;
// From this many tokens on, matmul_tiled.comp (64 x 64 tiles through shared memory) runs instead:
// below it the tiled grid has too few workgroups to fill a GPU (a 1536-row matrix makes 24) and
// most of each 64-token tile is padding, while matmul.comp reads the weights at most 4 times.
constexpr int64_t kTiledMatmulMinTokens = 32;
constexpr int64_t kTiledMatmulTile = 64;
constexpr int64_t kMaxHeadDim = 256;
// Decode attention splits each (token, head)'s keys over up to kMaxAttentionSplits workgroups of
// whole 64-key chunks when a call has at most kSplitAttentionMaxTokens tokens, aiming at
// kAttentionTargetWorkgroups workgroups (a few per compute unit of a large GPU).
constexpr int64_t kMaxAttentionSplits = 32;
constexpr int64_t kSplitAttentionMaxTokens = 16;
constexpr int64_t kAttentionTargetWorkgroups = 512;
constexpr int64_t kAttentionChunk = 64;

size_t align_up(size_t n, size_t a) {
  return (n + a - 1) / a * a;
}
uint32_t groups(int64_t n, int64_t per_group) {
  return uint32_t((n + per_group - 1) / per_group);
}
// A shader's specialization constants 0 and 1, as one pipeline cache key.
uint32_t spec_constants(uint32_t first, uint32_t second = 0) {
  return first | (second << 16);
}
uint64_t address_of(Tensor t) {
  return uint64_t(reinterpret_cast<uintptr_t>(t.data));
}

struct Buffer {
  VkBuffer buffer = VK_NULL_HANDLE;
  VkDeviceMemory memory = VK_NULL_HANDLE;
  VkDeviceAddress address = 0;
  uint8_t* mapped = nullptr;  // host pointer when the memory is host-visible
  size_t size = 0;
};

// One slice of rows of a weight matrix, each array in device memory.
struct WeightPart {
  int64_t row_begin = 0;
  int64_t rows = 0;
  VkDeviceAddress data = 0, scales = 0, mins = 0, bias = 0;
};

struct DeviceMatrix {
  WeightFormat format = WeightFormat::fp32;
  int64_t rows = 0;
  int64_t cols = 0;
  int block = 0;
  std::vector<WeightPart> parts;
};

// Push constants of each shader, member for member as the shader declares them.
struct MatmulParams {
  uint64_t x, out, data, scales, mins, bias;
  uint32_t n, rows, cols, block, row_offset, x_stride, out_stride;
};
struct EmbedParams {
  uint64_t out, data, scales, mins, tokens;
  uint32_t cols, block, row_begin, rows;
};
struct RmsNormParams {
  uint64_t out, x, w;
  uint32_t cols;
  float eps;
};
struct RopeShaderParams {
  uint64_t q, k, table;
  uint32_t q_stride, k_stride, n_heads, head_dim;
};
struct KvWriteParams {
  uint64_t k, v, k_cache, v_cache, positions, seq_ids, block_tables;
  uint32_t kv_dim, head_dim, n_kv_heads, table_stride;
};
struct AttentionParams {
  uint64_t out, q, k_cache, v_cache, positions, seq_ids, block_tables, partials;
  uint32_t q_stride, out_stride, head_dim, n_kv_heads, group, table_stride;
  float scale;
  uint32_t split_span, n_splits;
};
struct AttentionCombineParams {
  uint64_t out, partials;
  uint32_t out_stride, head_dim, n_splits;
};
struct ElementwiseParams {
  uint64_t out, a, b;
  uint32_t n;
};
struct GatherParams {
  uint64_t out, x, rows;
  uint32_t cols;
};
struct ArgmaxParams {
  uint64_t x, out;
  uint32_t cols;
};
struct CopyParams {
  uint64_t dst, src;
  uint32_t n;  // 16-byte elements
};
constexpr uint32_t kPushConstantBytes = 128;  // the minimum every device supports
constexpr uint32_t kOpSwiglu = 0, kOpAdd = 1;

// Where each array of the per-call host-written buffer lives (bytes).
struct BatchLayout {
  size_t tokens = 0, positions = 0, seq_ids = 0, tables = 0, rope = 0, gather = 0, argmax = 0;
  size_t total = 0;
  int64_t table_stride = 0;  // entries per slot: blocks_per_seq
  int64_t gather_capacity = 0;
  int64_t argmax_capacity = 0;
};

// Device-local bytes of decode attention's per-split partial results: [tokens, n_heads,
// kMaxAttentionSplits, head_dim + 2] floats.
size_t attention_partial_bytes(const ModelConfig& config, const RunShape& shape) {
  const int64_t tokens = std::min(shape.max_batch_tokens, kSplitAttentionMaxTokens);
  return size_t(tokens * config.n_heads * kMaxAttentionSplits * (config.head_dim + 2)) *
         sizeof(float);
}

BatchLayout batch_layout(const ModelConfig& config, const RunShape& shape) {
  BatchLayout l;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t offset = at;
    at = align_up(at + bytes, kAlignment);
    return offset;
  };
  const size_t n = size_t(shape.max_batch_tokens);
  l.table_stride = shape.blocks_per_seq();
  l.gather_capacity = std::max(shape.max_batch_tokens, shape.max_logit_rows);
  l.argmax_capacity = l.gather_capacity;
  l.tokens = take(n * 4);
  l.positions = take(n * 4);
  l.seq_ids = take(n * 4);
  l.tables = take(size_t(shape.max_seqs * l.table_stride) * 4);
  l.rope = take(n * size_t(config.head_dim) * 4);  // [n, 2, head_dim / 2]
  l.gather = take(size_t(l.gather_capacity) * 4);
  l.argmax = take(size_t(l.argmax_capacity) * 4);
  l.total = at;
  return l;
}

class VulkanBackend final : public Backend {
 public:
  VulkanBackend(std::shared_ptr<const vulkan::Instance> instance, VkPhysicalDevice physical,
                DeviceInfo info, const VulkanOptions& options)
      : instance_(std::move(instance)),
        vk_(instance_->vk()),
        physical_(physical),
        info_(std::move(info)),
        options_(options) {}

  ~VulkanBackend() override {
    // A lost or hung device may never go idle: waiting for it would hang the process, and
    // freeing what it may still run is unsafe, so its objects are deliberately leaked.
    if (device_ == VK_NULL_HANDLE || !lost_.empty()) return;
    vk_.vkDeviceWaitIdle(device_);
    release_reservation();
    for (Buffer& b : weight_pages_) destroy(b);
    destroy(staging_);
    for (auto& [key, pipeline] : pipelines_) vk_.vkDestroyPipeline(device_, pipeline, nullptr);
    if (layout_ != VK_NULL_HANDLE) vk_.vkDestroyPipelineLayout(device_, layout_, nullptr);
    if (fence_ != VK_NULL_HANDLE) vk_.vkDestroyFence(device_, fence_, nullptr);
    if (pool_ != VK_NULL_HANDLE) vk_.vkDestroyCommandPool(device_, pool_, nullptr);
    vk_.vkDestroyDevice(device_, nullptr);
  }

  Status init() {
    uint32_t n_families = 0;
    vk_.vkGetPhysicalDeviceQueueFamilyProperties(physical_, &n_families, nullptr);
    std::vector<VkQueueFamilyProperties> families(n_families);
    vk_.vkGetPhysicalDeviceQueueFamilyProperties(physical_, &n_families, families.data());
    // A compute-only family when there is one (it runs beside graphics work), else any compute.
    int family = -1;
    for (uint32_t i = 0; i < n_families; ++i) {
      const VkQueueFlags f = families[i].queueFlags;
      if ((f & VK_QUEUE_COMPUTE_BIT) && (family < 0 || (f & VK_QUEUE_GRAPHICS_BIT) == 0)) {
        family = int(i);
      }
    }
    if (family < 0) return Status::error("vulkan backend: " + info_.name + " has no compute queue");
    family_ = uint32_t(family);
    timestamp_bits_ = families[size_t(family)].timestampValidBits;

    const float priority = 1.0f;
    VkDeviceQueueCreateInfo queue_info{};
    queue_info.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO;
    queue_info.queueFamilyIndex = family_;
    queue_info.queueCount = 1;
    queue_info.pQueuePriorities = &priority;
    VkPhysicalDeviceVulkan12Features features12{};
    features12.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES;
    features12.bufferDeviceAddress = VK_TRUE;
    VkPhysicalDeviceFeatures2 features{};
    features.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2;
    features.pNext = &features12;
    features.features.shaderInt64 = VK_TRUE;
    std::vector<const char*> extensions;
    if (info_.has_memory_budget) extensions.push_back(VK_EXT_MEMORY_BUDGET_EXTENSION_NAME);
    VkDeviceCreateInfo device_info{};
    device_info.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO;
    device_info.pNext = &features;
    device_info.queueCreateInfoCount = 1;
    device_info.pQueueCreateInfos = &queue_info;
    device_info.enabledExtensionCount = uint32_t(extensions.size());
    device_info.ppEnabledExtensionNames = extensions.data();
    KS_VK(vk_.vkCreateDevice(physical_, &device_info, nullptr, &device_));
    vk_.vkGetDeviceQueue(device_, family_, 0, &queue_);

    VkPhysicalDeviceMaintenance3Properties maintenance3{};
    maintenance3.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES;
    VkPhysicalDeviceProperties2 props{};
    props.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2;
    props.pNext = &maintenance3;
    vk_.vkGetPhysicalDeviceProperties2(physical_, &props);
    timestamp_period_ns_ = double(props.properties.limits.timestampPeriod);
    max_allocation_ =
        std::min<size_t>(size_t(maintenance3.maxMemoryAllocationSize), kMaxAllocationCap);
    max_weight_allocation_ = max_allocation_;
    if (options_.max_weight_allocation_bytes > 0) {
      max_weight_allocation_ =
          std::min(max_allocation_, std::max(options_.max_weight_allocation_bytes, 8 * kAlignment));
    }
    KS_RETURN_IF_ERROR(choose_memory_types());

    VkCommandPoolCreateInfo pool_info{};
    pool_info.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO;
    pool_info.flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT;
    pool_info.queueFamilyIndex = family_;
    KS_VK(vk_.vkCreateCommandPool(device_, &pool_info, nullptr, &pool_));
    VkCommandBufferAllocateInfo cmd_info{};
    cmd_info.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO;
    cmd_info.commandPool = pool_;
    cmd_info.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
    cmd_info.commandBufferCount = 1;
    KS_VK(vk_.vkAllocateCommandBuffers(device_, &cmd_info, &cmd_));
    VkFenceCreateInfo fence_info{};
    fence_info.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO;
    KS_VK(vk_.vkCreateFence(device_, &fence_info, nullptr, &fence_));

    VkPushConstantRange range{};
    range.stageFlags = VK_SHADER_STAGE_COMPUTE_BIT;
    range.size = kPushConstantBytes;
    VkPipelineLayoutCreateInfo layout_info{};
    layout_info.sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO;
    layout_info.pushConstantRangeCount = 1;
    layout_info.pPushConstantRanges = &range;
    KS_VK(vk_.vkCreatePipelineLayout(device_, &layout_info, nullptr, &layout_));
    return Status::ok();
  }

  std::string name() const override {
    return "vulkan:" + std::to_string(info_.index) + " (" + info_.name + ")";
  }

  // --- weights -------------------------------------------------------------------------------

  Status upload(ModelWeights& weights) override {
    KS_RETURN_IF_ERROR(check_alive());
    Placement placement;
    placement.capacity = max_weight_allocation_;
    std::vector<std::pair<const uint8_t*, Placement::Item>> copies;
    auto place = [&](const uint8_t* src, size_t bytes) -> Result<size_t> {
      KS_ASSIGN_OR_RETURN(Placement::Item item, placement.place(bytes));
      copies.emplace_back(src, item);
      return copies.size() - 1;
    };
    // Index into `copies` of each part's arrays, resolved to addresses once the pages exist.
    struct PendingPart {
      size_t matrix;
      WeightPart part;
      int64_t data = -1, scales = -1, mins = -1, bias = -1;
    };
    std::vector<PendingPart> pending_parts;
    std::vector<std::pair<size_t, size_t>> pending_vectors;  // (vector slot, copy index)
    std::vector<DeviceMatrix> matrices;
    std::vector<VkDeviceAddress> vectors;
    int embedding = -1;

    auto add_matrix = [&](const QuantWeight& w, const Blob* bias,
                          const std::string& name) -> Result<int> {
      DeviceMatrix m;
      m.format = w.format;
      m.rows = w.rows;
      m.cols = w.cols;
      m.block = w.block;
      const size_t data_row = w.data_row_bytes();
      const size_t scale_row = size_t(w.blocks_per_row()) * 2;
      const size_t mins_row = w.mins.size() > 0 ? scale_row : 0;
      const size_t bias_row = bias != nullptr && bias->size() > 0 ? 4 : 0;
      const size_t row_bytes = data_row + scale_row + mins_row + bias_row;
      const size_t usable = placement.capacity - 4 * kAlignment;
      if (row_bytes > usable) {
        return Status::error("vulkan backend: one row of " + name + " takes " +
                             std::to_string(row_bytes) + " bytes, more than the " +
                             std::to_string(placement.capacity) + "-byte allocation limit");
      }
      const int64_t rows_per_part = std::min<int64_t>(
          int64_t(usable / std::max<size_t>(row_bytes, 1)), kMaxGrid * kMatvecRows);
      const size_t index = matrices.size();
      // An empty matrix (a tensor a test model leaves out) gets a slot and no parts.
      const int64_t n_rows = row_bytes > 0 ? w.rows : 0;
      for (int64_t r0 = 0; r0 < n_rows; r0 += rows_per_part) {
        PendingPart p;
        p.matrix = index;
        p.part.row_begin = r0;
        p.part.rows = std::min(rows_per_part, w.rows - r0);
        const size_t rows = size_t(p.part.rows);
        KS_ASSIGN_OR_RETURN(size_t data,
                            place(w.data.data() + size_t(r0) * data_row, rows * data_row));
        p.data = int64_t(data);
        if (scale_row > 0) {
          KS_ASSIGN_OR_RETURN(size_t s,
                              place(w.scales.data() + size_t(r0) * scale_row, rows * scale_row));
          p.scales = int64_t(s);
        }
        if (mins_row > 0) {
          KS_ASSIGN_OR_RETURN(size_t s,
                              place(w.mins.data() + size_t(r0) * mins_row, rows * mins_row));
          p.mins = int64_t(s);
        }
        if (bias_row > 0) {
          KS_ASSIGN_OR_RETURN(size_t s, place(bias->data() + size_t(r0) * 4, rows * 4));
          p.bias = int64_t(s);
        }
        pending_parts.push_back(p);
      }
      matrices.push_back(std::move(m));
      return int(index);
    };

    KS_RETURN_IF_ERROR(
        for_each_tensor(weights, [&](const TensorInfo& info, auto& member) -> Status {
          using Member = std::remove_cvref_t<decltype(member)>;
          if constexpr (std::is_same_v<Member, QuantWeight>) {
            KS_ASSIGN_OR_RETURN(embedding, add_matrix(member, nullptr, info.name));
          } else if constexpr (std::is_same_v<Member, Linear>) {
            if (info.tied) {
              member.backend_slot = embedding;  // the lm_head reads the embedding's storage
            } else {
              KS_ASSIGN_OR_RETURN(member.backend_slot,
                                  add_matrix(member.w, &member.bias, info.name));
            }
          } else {
            if (member.data.size() < size_t(member.n) * sizeof(float)) {
              return Status::error("vulkan backend: " + info.name + " holds fewer than " +
                                   std::to_string(member.n) + " floats");
            }
            KS_ASSIGN_OR_RETURN(size_t copy, place(member.data.data(), size_t(member.n) * 4));
            member.backend_slot = int(vectors.size());
            pending_vectors.emplace_back(vectors.size(), copy);
            vectors.push_back(0);
          }
          return Status::ok();
        }));

    // A model that does not fit fails here with the numbers, before any allocation (on an
    // integrated GPU the driver might otherwise page or fail deep inside a later call).
    const size_t available = free_memory();
    if (available > 0 && placement.total() > available) {
      return Status::error("vulkan backend: the weights need " + std::to_string(placement.total()) +
                           " bytes but " + info_.name + " has " + std::to_string(available) +
                           " bytes free (" + memory_source() + "); use a smaller model or format");
    }
    // Replace what an earlier upload held only once the new pages exist.
    KS_RETURN_IF_ERROR(flush());
    std::vector<Buffer> pages;
    for (size_t bytes : placement.page_bytes) {
      Buffer b;
      const Status s = create_buffer(bytes, device_type_, b);
      if (!s.is_ok()) {
        for (Buffer& p : pages) destroy(p);
        return s.with_context("uploading the weights (" + std::to_string(placement.total()) +
                              " bytes)");
      }
      pages.push_back(b);
    }
    auto address = [&](int64_t copy) -> VkDeviceAddress {
      if (copy < 0) return 0;
      const Placement::Item& item = copies[size_t(copy)].second;
      return pages[item.page].address + item.offset;
    };
    for (PendingPart& p : pending_parts) {
      p.part.data = address(p.data);
      p.part.scales = address(p.scales);
      p.part.mins = address(p.mins);
      p.part.bias = address(p.bias);
      matrices[p.matrix].parts.push_back(p.part);
    }
    for (const auto& [slot, copy] : pending_vectors) vectors[slot] = address(int64_t(copy));
    for (const auto& [src, item] : copies) {
      if (item.bytes == 0) continue;
      KS_RETURN_IF_ERROR(write_bytes(pages[item.page], item.offset, src, item.bytes));
    }
    KS_RETURN_IF_ERROR(flush());
    for (Buffer& b : weight_pages_) destroy(b);
    weight_pages_ = std::move(pages);
    matrices_ = std::move(matrices);
    vectors_ = std::move(vectors);
    embedding_ = embedding;
    return Status::ok();
  }

  // --- reservation -----------------------------------------------------------------------------

  WorkspaceTypes workspace_types() const {
    WorkspaceTypes types;
    types.kv_element_bytes = sizeof(float);
    types.activation_element_bytes = sizeof(float);
    types.score_rows = 0;  // attention keeps a running softmax; no score rows
    return types;
  }

  Result<WorkspaceLayout> reserve_layout(const ModelConfig& config,
                                         const RunShape& shape) const override {
    WorkspaceLayout layout = workspace_layout(config, shape, workspace_types());
    layout.kernel_scratch_bytes =
        batch_layout(config, shape).total + attention_partial_bytes(config, shape);
    return layout;
  }

  Status do_reserve(const ModelConfig& config, const RunShape& shape) override {
    KS_RETURN_IF_ERROR(check_alive());
    KS_RETURN_IF_ERROR(flush());
    release_reservation();
    if (config.head_dim > kMaxHeadDim || config.head_dim % 2 != 0) {
      return Status::error("vulkan backend: head_dim " + std::to_string(config.head_dim) +
                           " (the attention shader takes even head_dim up to 256)");
    }
    if (shape.max_batch_tokens > kMaxGrid || shape.max_logit_rows > kMaxGrid) {
      return Status::error("vulkan backend: " + std::to_string(shape.max_batch_tokens) +
                           " tokens a call (at most " + std::to_string(kMaxGrid) + ")");
    }
    config_ = config;
    shape_ = shape;
    inv_freq_ = rope_inv_freq(config);
    const WorkspaceLayout layout = workspace_layout(config, shape, workspace_types());
    batch_layout_ = batch_layout(config, shape);
    const size_t layer_bytes = layout.kv_cache_elements / size_t(config.n_layers) * sizeof(float);
    const size_t scratch_bytes = layout.scratch_bytes();
    auto too_big = [&](const char* what, size_t bytes) {
      return Status::error("vulkan backend: the " + std::string(what) +
                           " needs one allocation of " + std::to_string(bytes) +
                           " bytes, more than the device's limit of " +
                           std::to_string(max_allocation_) + " (use a shorter context or batch)");
    };
    if (layer_bytes > max_allocation_) return too_big("KV cache of one layer", layer_bytes);
    if (scratch_bytes > max_allocation_) return too_big("activation workspace", scratch_bytes);
    Status s = Status::ok();
    for (int64_t l = 0; l < config.n_layers && s.is_ok(); ++l) {
      Buffer k, v;
      s = create_buffer(layer_bytes, device_type_, k);
      if (s.is_ok()) {
        k_cache_.push_back(k);
        s = create_buffer(layer_bytes, device_type_, v);
        if (s.is_ok()) v_cache_.push_back(v);
      }
    }
    if (s.is_ok()) s = create_buffer(scratch_bytes, device_type_, scratch_);
    if (s.is_ok()) s = create_buffer(batch_layout_.total, host_type_, batch_);
    if (s.is_ok()) {
      s = create_buffer(attention_partial_bytes(config, shape), device_type_, attention_partials_);
    }
    if (!s.is_ok()) {
      release_reservation();
      return s.with_context("reserving " + std::to_string(layout.total_bytes()) + " bytes");
    }
    scratch_elements_ = layout.scratch_elements;
    scratch_used_ = 0;
    return Status::ok();
  }

  Status do_copy_kv_block(int32_t src, int32_t dst) override {
    KS_RETURN_IF_ERROR(check_alive());
    if (src == dst) return Status::ok();
    const size_t block = size_t(kKvBlockSize * config_.kv_dim()) * sizeof(float);
    KS_RETURN_IF_ERROR(begin_commands());
    barrier();
    VkBufferCopy region{};
    region.srcOffset = size_t(src) * block;
    region.dstOffset = size_t(dst) * block;
    region.size = block;
    for (size_t l = 0; l < k_cache_.size(); ++l) {
      vk_.vkCmdCopyBuffer(cmd_, k_cache_[l].buffer, k_cache_[l].buffer, 1, &region);
      vk_.vkCmdCopyBuffer(cmd_, v_cache_[l].buffer, v_cache_[l].buffer, 1, &region);
    }
    return Status::ok();
  }

  Status do_begin_batch(const BatchView& batch) override {
    KS_RETURN_IF_ERROR(check_alive());
    // Recorded work still reads the previous call's batch data.
    KS_RETURN_IF_ERROR(flush());
    const BatchLayout& l = batch_layout_;
    const size_t n = size_t(batch.n_tokens);
    std::memcpy(batch_.mapped + l.tokens, batch.tokens, n * 4);
    std::memcpy(batch_.mapped + l.positions, batch.positions, n * 4);
    std::memcpy(batch_.mapped + l.seq_ids, batch.seq_ids, n * 4);
    int32_t* tables = reinterpret_cast<int32_t*>(batch_.mapped + l.tables);
    for (int64_t s = 0; s < shape_.max_seqs; ++s) {
      std::memcpy(tables + s * l.table_stride, batch.block_tables + s * batch.block_table_stride,
                  size_t(l.table_stride) * 4);
    }
    // cos and sin of every (token, frequency), computed as the CPU backend does.
    const int64_t half = config_.head_dim / 2;
    float* rope = reinterpret_cast<float*>(batch_.mapped + l.rope);
    for (size_t t = 0; t < n; ++t) {
      const float pos = float(batch.positions[t]);
      for (int64_t i = 0; i < half; ++i) {
        const float angle = pos * inv_freq_[size_t(i)];
        rope[(t * 2) * size_t(half) + size_t(i)] = std::cos(angle);
        rope[(t * 2 + 1) * size_t(half) + size_t(i)] = std::sin(angle);
      }
    }
    n_tokens_ = batch.n_tokens;
    max_context_ = 0;
    for (size_t t = 0; t < n; ++t) {
      max_context_ = std::max<int64_t>(max_context_, batch.positions[t] + 1);
    }
    scratch_used_ = 0;
    gather_used_ = 0;
    return Status::ok();
  }

  Result<Tensor> scratch(int64_t rows, int64_t cols) override {
    const size_t n = (size_t(rows * cols) + 15) / 16 * 16;
    if (scratch_.buffer == VK_NULL_HANDLE || scratch_used_ + n > scratch_elements_) {
      return Status::error("vulkan backend: scratch workspace exhausted (planner bug)");
    }
    Tensor t{reinterpret_cast<void*>(uintptr_t(scratch_.address + scratch_used_ * sizeof(float))),
             rows, cols};
    scratch_used_ += n;
    return t;
  }

  // --- ops -----------------------------------------------------------------------------------

  Status embed(Tensor out, const QuantWeight& table) override {
    if (embedding_ < 0) return Status::error("vulkan backend: embed before upload");
    const DeviceMatrix& m = matrices_[size_t(embedding_)];
    if (table.rows != m.rows || table.cols != m.cols || out.cols != m.cols) {
      return Status::error("vulkan backend: embed of a table other than the uploaded one");
    }
    for (const WeightPart& part : m.parts) {
      EmbedParams p{address_of(out),
                    part.data,
                    part.scales,
                    part.mins,
                    batch_.address + batch_layout_.tokens,
                    uint32_t(m.cols),
                    uint32_t(m.block),
                    uint32_t(part.row_begin),
                    uint32_t(part.rows)};
      KS_RETURN_IF_ERROR(
          dispatch("embed", uint32_t(m.format), p, groups(m.cols, 256), uint32_t(n_tokens_)));
    }
    return Status::ok();
  }

  Status rms_norm(Tensor out, Tensor x, const Vector& w, float eps) override {
    KS_ASSIGN_OR_RETURN(VkDeviceAddress weight, vector_address(w, x.cols));
    RmsNormParams p{address_of(out), address_of(x), weight, uint32_t(x.cols), eps};
    return dispatch("rms_norm", 0, p, uint32_t(x.rows));
  }

  Status matmul(Tensor out, Tensor x, const Linear& w) override {
    if (w.backend_slot < 0 || size_t(w.backend_slot) >= matrices_.size()) {
      return Status::error("vulkan backend: matmul with a weight that was not uploaded");
    }
    const DeviceMatrix& m = matrices_[size_t(w.backend_slot)];
    if (x.cols != m.cols || out.cols != m.rows || out.rows != x.rows) {
      return Status::error("vulkan backend: matmul of [" + std::to_string(x.rows) + ", " +
                           std::to_string(x.cols) + "] with a [" + std::to_string(m.rows) + ", " +
                           std::to_string(m.cols) + "] weight into [" + std::to_string(out.rows) +
                           ", " + std::to_string(out.cols) + "]");
    }
    if (x.rows > kMaxGrid * kMatvecMaxTokens) {
      return Status::error("vulkan backend: matmul of " + std::to_string(x.rows) + " rows");
    }
    int64_t tile_tokens = 1;
    while (tile_tokens < std::min(x.rows, kMatvecMaxTokens)) tile_tokens *= 2;
    // 16-byte loads need every weight row and x row to start on 16 bytes: always for int4 and
    // int8 rows (multiples of 32 weights), for fp rows only when they are multiples of 16 bytes.
    const int64_t element_bytes = m.format == WeightFormat::fp32 ? 4 : 2;
    if (is_quantized(m.format) && address_of(x) % 16 != 0) {
      // The shader's 32-bit fallback reads float rows only: refuse rather than misread codes.
      return Status::error("vulkan backend: a matmul input for " +
                           std::string(format_name(m.format)) + " weights must start on 16 bytes");
    }
    const bool aligned =
        address_of(x) % 16 == 0 && (is_quantized(m.format) || (m.cols * element_bytes) % 16 == 0);
    const uint32_t shape = uint32_t(tile_tokens) | (aligned ? 16u : 0u);
    const bool independent = independent_;
    Status s = Status::ok();
    for (const WeightPart& part : m.parts) {
      // Parts read the same x and write disjoint columns of out.
      independent_ = independent || &part != &m.parts.front();
      MatmulParams p{address_of(x),
                     address_of(out),
                     part.data,
                     part.scales,
                     part.mins,
                     part.bias,
                     uint32_t(x.rows),
                     uint32_t(part.rows),
                     uint32_t(m.cols),
                     uint32_t(m.block),
                     uint32_t(part.row_begin),
                     uint32_t(x.cols),
                     uint32_t(out.cols)};
      s = x.rows >= kTiledMatmulMinTokens
              ? dispatch("matmul_tiled", spec_constants(uint32_t(m.format)), p,
                         groups(part.rows, kTiledMatmulTile), groups(x.rows, kTiledMatmulTile))
              : dispatch("matmul", spec_constants(uint32_t(m.format), shape), p,
                         groups(part.rows, kMatvecRows), groups(x.rows, tile_tokens));
      if (!s.is_ok()) break;
    }
    independent_ = independent;
    return s;
  }

  // One barrier before the first projection: the rest read the same x and write other outputs,
  // so they overlap on the device (unless an output overlaps x or another output).
  Status matmul_multi(std::span<const Tensor> outs, Tensor x,
                      std::span<const Linear* const> weights) override {
    if (outs.size() != weights.size()) return Status::error("matmul_multi: outputs != weights");
    auto bytes = [](Tensor t) { return uint64_t(t.rows * t.cols) * sizeof(float); };
    auto overlap = [&](Tensor a, Tensor b) {
      return address_of(a) < address_of(b) + bytes(b) && address_of(b) < address_of(a) + bytes(a);
    };
    bool disjoint = true;
    for (size_t i = 0; i < outs.size(); ++i) {
      disjoint = disjoint && !overlap(outs[i], x);
      for (size_t j = 0; j < i; ++j) disjoint = disjoint && !overlap(outs[i], outs[j]);
    }
    Status s = Status::ok();
    for (size_t i = 0; i < outs.size() && s.is_ok(); ++i) {
      independent_ = disjoint && i > 0;
      s = matmul(outs[i], x, *weights[i]);
    }
    independent_ = false;
    return s;
  }

  Status rope(Tensor q, Tensor k, const RopeParams& params) override {
    if (params.head_dim != config_.head_dim) {
      return Status::error("vulkan backend: rope head_dim differs from the reservation's");
    }
    RopeShaderParams p{address_of(q),
                       address_of(k),
                       batch_.address + batch_layout_.rope,
                       uint32_t(q.cols),
                       uint32_t(k.cols),
                       uint32_t(params.n_heads),
                       uint32_t(params.head_dim)};
    return dispatch("rope", 0, p, groups(params.head_dim / 2, 64),
                    uint32_t(params.n_heads + params.n_kv_heads), uint32_t(n_tokens_));
  }

  Status attention(Tensor out, Tensor q, Tensor k, Tensor v, int64_t layer,
                   const RopeParams& params) override {
    if (layer < 0 || layer >= int64_t(k_cache_.size()) || params.head_dim != config_.head_dim ||
        params.n_kv_heads != config_.n_kv_heads || params.n_kv_heads <= 0 ||
        params.n_heads % params.n_kv_heads != 0) {
      return Status::error("vulkan backend: attention arguments outside the reservation");
    }
    const uint64_t positions = batch_.address + batch_layout_.positions;
    const uint64_t seq_ids = batch_.address + batch_layout_.seq_ids;
    const uint64_t tables = batch_.address + batch_layout_.tables;
    const uint32_t table_stride = uint32_t(batch_layout_.table_stride);
    const Buffer& kc = k_cache_[size_t(layer)];
    const Buffer& vc = v_cache_[size_t(layer)];
    const int64_t kv_dim = params.n_kv_heads * params.head_dim;
    KvWriteParams w{address_of(k),
                    address_of(v),
                    kc.address,
                    vc.address,
                    positions,
                    seq_ids,
                    tables,
                    uint32_t(kv_dim),
                    uint32_t(params.head_dim),
                    uint32_t(params.n_kv_heads),
                    table_stride};
    KS_RETURN_IF_ERROR(dispatch("kv_write", 0, w, groups(kv_dim, 256), uint32_t(n_tokens_)));
    // Few tokens make few workgroups: split the keys so that the GPU fills, in whole chunks.
    int64_t splits = 1, span = 0;
    if (n_tokens_ <= kSplitAttentionMaxTokens) {
      const int64_t wanted = std::clamp<int64_t>(
          kAttentionTargetWorkgroups / std::max<int64_t>(n_tokens_ * params.n_heads, 1), 1,
          kMaxAttentionSplits);
      const int64_t chunks = (max_context_ + kAttentionChunk - 1) / kAttentionChunk;
      span = (chunks + wanted - 1) / wanted * kAttentionChunk;
      splits = span > 0 ? (max_context_ + span - 1) / span : 1;
    }
    AttentionParams a{address_of(out),
                      address_of(q),
                      kc.address,
                      vc.address,
                      positions,
                      seq_ids,
                      tables,
                      attention_partials_.address,
                      uint32_t(q.cols),
                      uint32_t(out.cols),
                      uint32_t(params.head_dim),
                      uint32_t(params.n_kv_heads),
                      uint32_t(params.n_heads / params.n_kv_heads),
                      table_stride,
                      1.0f / std::sqrt(float(params.head_dim)),
                      uint32_t(span),
                      uint32_t(splits)};
    const size_t partial_bytes =
        size_t(n_tokens_ * params.n_heads * splits * (params.head_dim + 2)) * sizeof(float);
    if (splits > 1 && partial_bytes > attention_partials_.size) splits = 1;
    a.n_splits = uint32_t(splits);
    KS_RETURN_IF_ERROR(dispatch("attention", 0, a, uint32_t(params.n_heads), uint32_t(n_tokens_),
                                uint32_t(splits)));
    if (splits == 1) return Status::ok();
    AttentionCombineParams c{address_of(out), attention_partials_.address, uint32_t(out.cols),
                             uint32_t(params.head_dim), uint32_t(splits)};
    return dispatch("attention_combine", 0, c, uint32_t(params.n_heads), uint32_t(n_tokens_));
  }

  Status swiglu(Tensor out, Tensor gate, Tensor up) override {
    return elementwise(kOpSwiglu, out, gate, up);
  }

  Status add(Tensor x, Tensor y) override { return elementwise(kOpAdd, x, x, y); }

  Status gather_rows(Tensor out, Tensor x, const int32_t* rows, int64_t n) override {
    if (n <= 0) return Status::ok();
    if (n > batch_layout_.gather_capacity) {
      return Status::error("vulkan backend: gather of " + std::to_string(n) + " rows");
    }
    for (int64_t i = 0; i < n; ++i) {
      if (rows[i] < 0 || rows[i] >= x.rows) {
        return Status::error("vulkan backend: gather row " + std::to_string(rows[i]) +
                             " outside [0, " + std::to_string(x.rows) + ")");
      }
    }
    // Recorded gathers still read their rows: a full area waits for them.
    if (gather_used_ + n > batch_layout_.gather_capacity) {
      KS_RETURN_IF_ERROR(flush());
      gather_used_ = 0;
    }
    const size_t offset = batch_layout_.gather + size_t(gather_used_) * 4;
    std::memcpy(batch_.mapped + offset, rows, size_t(n) * 4);
    gather_used_ += n;
    GatherParams p{address_of(out), address_of(x), batch_.address + offset, uint32_t(x.cols)};
    return dispatch("gather_rows", 0, p, groups(x.cols, 256), uint32_t(n));
  }

  Status read(Tensor t, float* host) override {
    KS_ASSIGN_OR_RETURN(size_t offset, scratch_offset(t));
    KS_RETURN_IF_ERROR(flush());
    return read_bytes(scratch_, offset, reinterpret_cast<uint8_t*>(host),
                      size_t(t.rows * t.cols) * sizeof(float));
  }

  // Only the rows asked for come back, a run of consecutive rows in one read.
  Status do_read_rows(Tensor t, std::span<const int32_t> rows, float* host) override {
    KS_ASSIGN_OR_RETURN(size_t offset, scratch_offset(t));
    KS_RETURN_IF_ERROR(flush());
    const size_t row_bytes = size_t(t.cols) * sizeof(float);
    for (size_t i = 0; i < rows.size();) {
      size_t run = 1;
      while (i + run < rows.size() && rows[i + run] == rows[i] + int32_t(run)) ++run;
      KS_RETURN_IF_ERROR(read_bytes(scratch_, offset + size_t(rows[i]) * row_bytes,
                                    reinterpret_cast<uint8_t*>(host + i * size_t(t.cols)),
                                    run * row_bytes));
      i += run;
    }
    return Status::ok();
  }

  Status write(Tensor t, const float* host) {
    KS_ASSIGN_OR_RETURN(size_t offset, scratch_offset(t));
    KS_RETURN_IF_ERROR(flush());
    KS_RETURN_IF_ERROR(write_bytes(scratch_, offset, reinterpret_cast<const uint8_t*>(host),
                                   size_t(t.rows * t.cols) * sizeof(float)));
    return flush();
  }

  Status argmax_rows(Tensor t, int32_t* out) override {
    if (t.rows <= 0) return Status::ok();
    if (t.rows > batch_layout_.argmax_capacity) {
      return Status::error("vulkan backend: argmax of " + std::to_string(t.rows) + " rows");
    }
    ArgmaxParams p{address_of(t), batch_.address + batch_layout_.argmax, uint32_t(t.cols)};
    KS_RETURN_IF_ERROR(dispatch("argmax", 0, p, uint32_t(t.rows)));
    KS_RETURN_IF_ERROR(flush());
    std::memcpy(out, batch_.mapped + batch_layout_.argmax, size_t(t.rows) * 4);
    return Status::ok();
  }

  // The device's memory bandwidth, measured once: copy.comp copying one device-local buffer to
  // another through the shader cores, as the model's shaders read (vkCmdCopyBuffer may run on
  // the copy engines, which on an H200 reach a fraction of it), bytes read + written per second
  // (as the CUDA backend counts its copy kernel), the median of kRooflineReps copies after one
  // warm-up, timed by the device's timestamps (or by the host's clock around each submission
  // where the queue has none). A copy that left wrong bytes fails the measurement.
  Roofline roofline() override {
    if (!roofline_) {
      Result<double> gbs = measure_copy_gbs();
      roofline_ = gbs.is_ok() ? Roofline{*gbs, "measured: compute-shader copy of " +
                                                   std::to_string(roofline_bytes_ >> 20) +
                                                   " MiB, read + write, median of " +
                                                   std::to_string(kRooflineReps) + " (" +
                                                   roofline_clock_ + ")"}
                              : Roofline{0, "measurement failed: " + gbs.status().message()};
    }
    return *roofline_;
  }

  size_t memory_in_use() const override { return in_use_; }
  size_t peak_memory() const override { return peak_; }

  // Where free_memory() comes from.
  std::string memory_source() const {
    return info_.has_memory_budget ? "VK_EXT_memory_budget" : "heap size less what Kestrel holds";
  }

  size_t free_memory() const override {
    VkPhysicalDeviceMemoryBudgetPropertiesEXT budget{};
    budget.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MEMORY_BUDGET_PROPERTIES_EXT;
    VkPhysicalDeviceMemoryProperties2 props{};
    props.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MEMORY_PROPERTIES_2;
    if (info_.has_memory_budget) props.pNext = &budget;
    vk_.vkGetPhysicalDeviceMemoryProperties2(physical_, &props);
    const uint32_t heap = props.memoryProperties.memoryTypes[device_type_].heapIndex;
    // At least 1 byte: 0 means "unknown" to the planner, which would then plan against the
    // host's memory instead of refusing.
    if (info_.has_memory_budget) {
      // The budget counts every process's use of the heap; usage includes ours.
      return budget.heapBudget[heap] > budget.heapUsage[heap]
                 ? size_t(budget.heapBudget[heap] - budget.heapUsage[heap])
                 : 1;
    }
    const size_t size = size_t(props.memoryProperties.memoryHeaps[heap].size);
    return size > in_use_ ? size - in_use_ : 1;
  }

 private:
  static constexpr int kRooflineReps = 7;
  // roofline()'s probe checks its copy at kCopyChecks 16-byte elements spread from the first to
  // the last, each given distinct words before the copies.
  static constexpr size_t kCopyChecks = 8;
  static uint32_t copy_check_word(size_t check, size_t word) {
    return uint32_t(0x9e3779b9u * uint32_t(4 * check + word + 1));
  }

  Result<double> measure_copy_gbs() {
    KS_RETURN_IF_ERROR(flush());
    // Large enough that the copy dwarfs its launch on a GPU (256 MiB each way), bounded by the
    // allocation limit and a small share of the free memory; 16 MiB on a CPU driver, where a
    // copy runs at host memory speed and CI pays for every millisecond.
    size_t bytes = info_.type == "CPU" ? size_t(16) << 20 : size_t(256) << 20;
    bytes = std::min(bytes, max_allocation_);
    const size_t free = free_memory();
    if (free > 1) bytes = std::min(bytes, free / 8);
    bytes = bytes / kAlignment * kAlignment;
    if (bytes < kAlignment) return Status::error("no memory for a copy measurement");
    roofline_bytes_ = bytes;
    const size_t peak = peak_;
    Buffer src, dst, probe;
    VkQueryPool pool = VK_NULL_HANDLE;
    Result<double> gbs = time_copies(bytes, src, dst, probe, pool);
    // A lost or hung device may still run the copies: their buffers are left to it (leaked).
    if (!lost_.empty()) return gbs;
    if (pool != VK_NULL_HANDLE) vk_.vkDestroyQueryPool(device_, pool, nullptr);
    destroy(src);
    destroy(dst);
    destroy(probe);
    peak_ = peak;  // the probe's buffers are not the model's memory
    return gbs;
  }

  // `probe` (host-visible) holds the check words going in and what the copies left coming out.
  Result<double> time_copies(size_t bytes, Buffer& src, Buffer& dst, Buffer& probe,
                             VkQueryPool& pool) {
    KS_RETURN_IF_ERROR(create_buffer(bytes, device_type_, src));
    KS_RETURN_IF_ERROR(create_buffer(bytes, device_type_, dst));
    KS_RETURN_IF_ERROR(create_buffer(2 * kCopyChecks * 16, host_type_, probe));
    const bool timestamps = timestamp_bits_ > 0 && timestamp_period_ns_ > 0;
    roofline_clock_ = timestamps ? "device timestamps" : "host clock";
    if (timestamps) {
      VkQueryPoolCreateInfo info{};
      info.sType = VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO;
      info.queryType = VK_QUERY_TYPE_TIMESTAMP;
      info.queryCount = 2 * kRooflineReps;
      KS_VK(vk_.vkCreateQueryPool(device_, &info, nullptr, &pool));
    }
    const size_t n = bytes / 16;
    std::vector<VkBufferCopy> marks(kCopyChecks), checks(kCopyChecks);
    for (size_t c = 0; c < kCopyChecks; ++c) {
      const size_t at = c * (n - 1) / (kCopyChecks - 1) * 16;
      marks[c] = VkBufferCopy{c * 16, at, 16};
      checks[c] = VkBufferCopy{at, (kCopyChecks + c) * 16, 16};
      for (size_t w = 0; w < 4; ++w) {
        const uint32_t word = copy_check_word(c, w);
        std::memcpy(probe.mapped + c * 16 + w * 4, &word, 4);
      }
    }
    const CopyParams params{dst.address, src.address, uint32_t(n)};
    const uint32_t grid = std::min<uint32_t>(groups(int64_t(n), 4 * 256), uint32_t(kMaxGrid));
    auto record_copy = [&]() {
      barrier();
      return dispatch("copy", 0, params, grid);
    };
    // Warm-up: the first touch of fresh pages (and the fills) stays out of the timings.
    KS_RETURN_IF_ERROR(begin_commands());
    vk_.vkCmdFillBuffer(cmd_, src.buffer, 0, VK_WHOLE_SIZE, 0x3f8ccccdu);
    vk_.vkCmdFillBuffer(cmd_, dst.buffer, 0, VK_WHOLE_SIZE, 0);
    barrier();
    vk_.vkCmdCopyBuffer(cmd_, probe.buffer, src.buffer, uint32_t(kCopyChecks), marks.data());
    KS_RETURN_IF_ERROR(record_copy());
    KS_RETURN_IF_ERROR(flush());
    std::vector<double> seconds;
    if (timestamps) {
      KS_RETURN_IF_ERROR(begin_commands());
      vk_.vkCmdResetQueryPool(cmd_, pool, 0, 2 * kRooflineReps);
      for (int i = 0; i < kRooflineReps; ++i) {
        // ALL_COMMANDS: written once every earlier command (the previous copy) has finished.
        barrier();
        vk_.vkCmdWriteTimestamp(cmd_, VK_PIPELINE_STAGE_ALL_COMMANDS_BIT, pool, uint32_t(2 * i));
        KS_RETURN_IF_ERROR(record_copy());
        vk_.vkCmdWriteTimestamp(cmd_, VK_PIPELINE_STAGE_ALL_COMMANDS_BIT, pool,
                                uint32_t(2 * i + 1));
      }
      KS_RETURN_IF_ERROR(flush());
      std::vector<uint64_t> ticks(2 * kRooflineReps);
      KS_VK(vk_.vkGetQueryPoolResults(
          device_, pool, 0, 2 * kRooflineReps, ticks.size() * sizeof(uint64_t), ticks.data(),
          sizeof(uint64_t), VK_QUERY_RESULT_64_BIT | VK_QUERY_RESULT_WAIT_BIT));
      const uint64_t mask =
          timestamp_bits_ >= 64 ? ~uint64_t(0) : (uint64_t(1) << timestamp_bits_) - 1;
      for (int i = 0; i < kRooflineReps; ++i) {
        const uint64_t delta = (ticks[size_t(2 * i + 1)] - ticks[size_t(2 * i)]) & mask;
        seconds.push_back(double(delta) * timestamp_period_ns_ * 1e-9);
      }
    } else {
      for (int i = 0; i < kRooflineReps; ++i) {
        KS_RETURN_IF_ERROR(begin_commands());
        KS_RETURN_IF_ERROR(record_copy());
        const auto start = std::chrono::steady_clock::now();
        KS_RETURN_IF_ERROR(flush());
        seconds.push_back(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
    }
    // The check words must have arrived where they were put.
    KS_RETURN_IF_ERROR(begin_commands());
    barrier();
    vk_.vkCmdCopyBuffer(cmd_, dst.buffer, probe.buffer, uint32_t(kCopyChecks), checks.data());
    KS_RETURN_IF_ERROR(flush());
    for (size_t c = 0; c < kCopyChecks; ++c) {
      for (size_t w = 0; w < 4; ++w) {
        uint32_t word = 0;
        std::memcpy(&word, probe.mapped + (kCopyChecks + c) * 16 + w * 4, 4);
        if (word != copy_check_word(c, w)) {
          return Status::error("the copy shader left wrong bytes at byte " +
                               std::to_string(checks[c].srcOffset + w * 4));
        }
      }
    }
    const double typical = median(seconds);
    if (!(typical > 0)) return Status::error("the copies took no measurable time");
    return 2.0 * double(bytes) / typical / 1e9;
  }

  // Packs arrays into pages of at most `capacity` bytes, each array 256-byte aligned.
  struct Placement {
    struct Item {
      size_t page = 0, offset = 0, bytes = 0;
    };
    size_t capacity = 0;
    std::vector<size_t> page_bytes;
    Result<Item> place(size_t bytes) {
      const size_t padded = align_up(std::max<size_t>(bytes, 4), kAlignment);
      if (padded > capacity) {
        return Status::error("vulkan backend: an array of " + std::to_string(bytes) +
                             " bytes exceeds the allocation limit of " + std::to_string(capacity));
      }
      if (page_bytes.empty() || page_bytes.back() + padded > capacity) page_bytes.push_back(0);
      Item item{page_bytes.size() - 1, page_bytes.back(), bytes};
      page_bytes.back() += padded;
      return item;
    }
    size_t total() const {
      size_t t = 0;
      for (size_t b : page_bytes) t += b;
      return t;
    }
  };

  Status check_alive() const {
    if (!lost_.empty()) return Status::error(lost_);
    return Status::ok();
  }

  Status choose_memory_types() {
    VkPhysicalDeviceMemoryProperties memory{};
    vk_.vkGetPhysicalDeviceMemoryProperties(physical_, &memory);
    // The largest device-local heap holds weights, KV cache and activations; a host-visible
    // type on it (unified memory, lavapipe, resizable BAR) is mapped and written in place,
    // otherwise uploads go through a host-visible staging buffer.
    int heap = -1;
    for (uint32_t h = 0; h < memory.memoryHeapCount; ++h) {
      if ((memory.memoryHeaps[h].flags & VK_MEMORY_HEAP_DEVICE_LOCAL_BIT) &&
          (heap < 0 || memory.memoryHeaps[h].size > memory.memoryHeaps[heap].size)) {
        heap = int(h);
      }
    }
    const VkMemoryPropertyFlags mapped =
        VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    int device = -1, host = -1;
    for (uint32_t i = 0; i < memory.memoryTypeCount; ++i) {
      const VkMemoryType& t = memory.memoryTypes[i];
      const bool on_heap = heap < 0 || int(t.heapIndex) == heap;
      if (on_heap && (heap < 0 || (t.propertyFlags & VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT))) {
        const bool is_mapped = (t.propertyFlags & mapped) == mapped;
        if (device < 0 ||
            (is_mapped && (memory.memoryTypes[device].propertyFlags & mapped) != mapped)) {
          device = int(i);
        }
      }
      if ((t.propertyFlags & mapped) == mapped &&
          (host < 0 ||
           ((t.propertyFlags & VK_MEMORY_PROPERTY_HOST_CACHED_BIT) &&
            !(memory.memoryTypes[host].propertyFlags & VK_MEMORY_PROPERTY_HOST_CACHED_BIT)))) {
        host = int(i);
      }
    }
    if (device < 0 || host < 0) {
      return Status::error("vulkan backend: " + info_.name +
                           " has no device-local or no host-visible coherent memory type");
    }
    device_type_ = uint32_t(device);
    host_type_ = uint32_t(host);
    return Status::ok();
  }

  Status create_buffer(size_t bytes, uint32_t type, Buffer& out) {
    bytes = align_up(std::max<size_t>(bytes, 4), kAlignment);
    Buffer b;
    b.size = bytes;
    VkBufferCreateInfo info{};
    info.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO;
    info.size = bytes;
    info.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
                 VK_BUFFER_USAGE_TRANSFER_DST_BIT | VK_BUFFER_USAGE_SHADER_DEVICE_ADDRESS_BIT;
    info.sharingMode = VK_SHARING_MODE_EXCLUSIVE;
    KS_VK(vk_.vkCreateBuffer(device_, &info, nullptr, &b.buffer));
    VkMemoryRequirements req{};
    vk_.vkGetBufferMemoryRequirements(device_, b.buffer, &req);
    if ((req.memoryTypeBits & (1u << type)) == 0) {
      vk_.vkDestroyBuffer(device_, b.buffer, nullptr);
      return Status::error("vulkan backend: storage buffers cannot use the chosen memory type");
    }
    VkMemoryAllocateFlagsInfo flags{};
    flags.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_FLAGS_INFO;
    flags.flags = VK_MEMORY_ALLOCATE_DEVICE_ADDRESS_BIT;
    VkMemoryAllocateInfo alloc{};
    alloc.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO;
    alloc.pNext = &flags;
    alloc.allocationSize = req.size;
    alloc.memoryTypeIndex = type;
    const VkResult r = vk_.vkAllocateMemory(device_, &alloc, nullptr, &b.memory);
    if (r != VK_SUCCESS) {
      vk_.vkDestroyBuffer(device_, b.buffer, nullptr);
      return Status::error("vulkan backend: cannot allocate " + std::to_string(bytes) + " bytes (" +
                           result_name(r) + "; " + std::to_string(in_use_) + " bytes held, " +
                           std::to_string(free_memory()) + " free)");
    }
    VkResult bind = vk_.vkBindBufferMemory(device_, b.buffer, b.memory, 0);
    VkPhysicalDeviceMemoryProperties memory{};
    vk_.vkGetPhysicalDeviceMemoryProperties(physical_, &memory);
    if (bind == VK_SUCCESS &&
        (memory.memoryTypes[type].propertyFlags & VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT)) {
      void* p = nullptr;
      bind = vk_.vkMapMemory(device_, b.memory, 0, VK_WHOLE_SIZE, 0, &p);
      b.mapped = static_cast<uint8_t*>(p);
    }
    if (bind != VK_SUCCESS) {
      vk_.vkDestroyBuffer(device_, b.buffer, nullptr);
      vk_.vkFreeMemory(device_, b.memory, nullptr);
      return Status::error("vulkan backend: binding or mapping a buffer failed: " +
                           result_name(bind));
    }
    VkBufferDeviceAddressInfo address{};
    address.sType = VK_STRUCTURE_TYPE_BUFFER_DEVICE_ADDRESS_INFO;
    address.buffer = b.buffer;
    b.address = vk_.vkGetBufferDeviceAddress(device_, &address);
    in_use_ += bytes;
    peak_ = std::max(peak_, in_use_);
    out = b;
    return Status::ok();
  }

  void destroy(Buffer& b) {
    if (b.buffer == VK_NULL_HANDLE) return;
    vk_.vkDestroyBuffer(device_, b.buffer, nullptr);
    vk_.vkFreeMemory(device_, b.memory, nullptr);  // unmaps
    in_use_ -= b.size;
    b = Buffer{};
  }

  void release_reservation() {
    for (Buffer& b : k_cache_) destroy(b);
    for (Buffer& b : v_cache_) destroy(b);
    k_cache_.clear();
    v_cache_.clear();
    destroy(scratch_);
    destroy(batch_);
    destroy(attention_partials_);
    scratch_elements_ = 0;
    scratch_used_ = 0;
  }

  Result<size_t> scratch_offset(Tensor t) const {
    const uint64_t a = address_of(t);
    const size_t bytes = size_t(t.rows * t.cols) * sizeof(float);
    if (scratch_.buffer == VK_NULL_HANDLE || a < scratch_.address ||
        a + bytes > scratch_.address + scratch_.size) {
      return Status::error("vulkan backend: a tensor outside the scratch workspace");
    }
    return size_t(a - scratch_.address);
  }

  Result<VkDeviceAddress> vector_address(const Vector& w, int64_t n) const {
    if (w.backend_slot < 0 || size_t(w.backend_slot) >= vectors_.size() || w.n != n) {
      return Status::error(
          "vulkan backend: a norm weight that was not uploaded or of another size");
    }
    return vectors_[size_t(w.backend_slot)];
  }

  Status staging() {
    if (staging_.buffer != VK_NULL_HANDLE) return Status::ok();
    return create_buffer(kStagingBytes, host_type_, staging_);
  }

  // Host -> buffer. Mapped buffers are written directly (the caller flushes first when the
  // device may still be using the bytes); others through the staging buffer.
  Status write_bytes(Buffer& dst, size_t offset, const uint8_t* src, size_t bytes) {
    if (dst.mapped != nullptr) {
      std::memcpy(dst.mapped + offset, src, bytes);
      return Status::ok();
    }
    KS_RETURN_IF_ERROR(staging());
    for (size_t done = 0; done < bytes;) {
      const size_t chunk = std::min(kStagingBytes, bytes - done);
      KS_RETURN_IF_ERROR(flush());  // the staging buffer is free again
      std::memcpy(staging_.mapped, src + done, chunk);
      KS_RETURN_IF_ERROR(copy(staging_, 0, dst, offset + done, chunk));
      done += chunk;
    }
    return flush();
  }

  Status read_bytes(Buffer& src, size_t offset, uint8_t* dst, size_t bytes) {
    if (src.mapped != nullptr) {
      std::memcpy(dst, src.mapped + offset, bytes);
      return Status::ok();
    }
    KS_RETURN_IF_ERROR(staging());
    for (size_t done = 0; done < bytes;) {
      const size_t chunk = std::min(kStagingBytes, bytes - done);
      KS_RETURN_IF_ERROR(copy(src, offset + done, staging_, 0, chunk));
      KS_RETURN_IF_ERROR(flush());
      std::memcpy(dst + done, staging_.mapped, chunk);
      done += chunk;
    }
    return Status::ok();
  }

  Status copy(const Buffer& src, size_t src_offset, const Buffer& dst, size_t dst_offset,
              size_t bytes) {
    KS_RETURN_IF_ERROR(begin_commands());
    barrier();
    VkBufferCopy region{src_offset, dst_offset, bytes};
    vk_.vkCmdCopyBuffer(cmd_, src.buffer, dst.buffer, 1, &region);
    return Status::ok();
  }

  Result<VkPipeline> pipeline(const std::string& shader, uint32_t spec) {
    const auto key = std::make_pair(shader, spec);
    if (auto it = pipelines_.find(key); it != pipelines_.end()) return it->second;
    const vulkan::ShaderCode* code = nullptr;
    for (const vulkan::ShaderCode& c : vulkan::shader_table()) {
      if (shader == c.name) code = &c;
    }
    if (code == nullptr) return Status::error("vulkan backend: no shader " + shader);
    VkShaderModuleCreateInfo module_info{};
    module_info.sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO;
    module_info.codeSize = code->n_words * sizeof(uint32_t);
    module_info.pCode = code->words;
    VkShaderModule module = VK_NULL_HANDLE;
    KS_VK(vk_.vkCreateShaderModule(device_, &module_info, nullptr, &module));
    // Constant 0 is the key's low 16 bits, constant 1 its high 16 (entries for constants a
    // shader does not declare are ignored).
    const uint32_t values[2] = {spec & 0xffffu, spec >> 16};
    const VkSpecializationMapEntry entries[2] = {{0, 0, sizeof(uint32_t)},
                                                 {1, sizeof(uint32_t), sizeof(uint32_t)}};
    VkSpecializationInfo spec_info{2, entries, sizeof(values), values};
    VkComputePipelineCreateInfo info{};
    info.sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO;
    info.stage.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO;
    info.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
    info.stage.module = module;
    info.stage.pName = "main";
    info.stage.pSpecializationInfo = &spec_info;
    info.layout = layout_;
    VkPipeline p = VK_NULL_HANDLE;
    const VkResult r = vk_.vkCreateComputePipelines(device_, VK_NULL_HANDLE, 1, &info, nullptr, &p);
    vk_.vkDestroyShaderModule(device_, module, nullptr);
    if (r != VK_SUCCESS) {
      return Status::error("vulkan backend: building shader " + shader +
                           " failed: " + result_name(r));
    }
    pipelines_[key] = p;
    return p;
  }

  Status begin_commands() {
    KS_RETURN_IF_ERROR(check_alive());
    if (recording_) return Status::ok();
    VkCommandBufferBeginInfo begin{};
    begin.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO;
    begin.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
    KS_VK(vk_.vkBeginCommandBuffer(cmd_, &begin));
    recording_ = true;
    return Status::ok();
  }

  // Every command waits for the writes of the commands before it: the ops form one chain.
  void barrier(VkPipelineStageFlags dst_stage = VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT |
                                                VK_PIPELINE_STAGE_TRANSFER_BIT,
               VkAccessFlags dst_access = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT |
                                          VK_ACCESS_TRANSFER_READ_BIT |
                                          VK_ACCESS_TRANSFER_WRITE_BIT) {
    VkMemoryBarrier b{};
    b.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER;
    b.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT;
    b.dstAccessMask = dst_access;
    vk_.vkCmdPipelineBarrier(cmd_,
                             VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT,
                             dst_stage, 0, 1, &b, 0, nullptr, 0, nullptr);
  }

  template <typename Params>
  Status dispatch(const std::string& shader, uint32_t spec, const Params& params, uint32_t gx,
                  uint32_t gy = 1, uint32_t gz = 1) {
    static_assert(sizeof(Params) <= kPushConstantBytes);
    KS_RETURN_IF_ERROR(check_alive());
    if (gx == 0 || gy == 0 || gz == 0) return Status::ok();
    if (gx > kMaxGrid || gy > kMaxGrid || gz > kMaxGrid) {
      return Status::error("vulkan backend: " + shader + " grid of " + std::to_string(gx) + " x " +
                           std::to_string(gy) + " x " + std::to_string(gz) + " workgroups");
    }
    KS_ASSIGN_OR_RETURN(VkPipeline p, pipeline(shader, spec));
    KS_RETURN_IF_ERROR(begin_commands());
    if (!independent_) barrier();
    vk_.vkCmdBindPipeline(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, p);
    vk_.vkCmdPushConstants(cmd_, layout_, VK_SHADER_STAGE_COMPUTE_BIT, 0, sizeof(Params), &params);
    vk_.vkCmdDispatch(cmd_, gx, gy, gz);
    const int per_submission = options_.dispatches_per_submission > 0
                                   ? options_.dispatches_per_submission
                                   : kDispatchesPerSubmission;
    if (++recorded_dispatches_ >= per_submission) return submit_recorded();
    return Status::ok();
  }

  // Submits what was recorded without waiting and continues in another command buffer; the next
  // flush() waits for it (its fence covers every earlier submission to the queue).
  Status submit_recorded() {
    recording_ = false;
    recorded_dispatches_ = 0;
    VkResult r = vk_.vkEndCommandBuffer(cmd_);
    if (r == VK_SUCCESS) {
      VkSubmitInfo submit{};
      submit.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO;
      submit.commandBufferCount = 1;
      submit.pCommandBuffers = &cmd_;
      r = vk_.vkQueueSubmit(queue_, 1, &submit, VK_NULL_HANDLE);
    }
    if (r == VK_SUCCESS) {
      submitted_.push_back(cmd_);
      if (!spare_commands_.empty()) {
        cmd_ = spare_commands_.back();
        spare_commands_.pop_back();
      } else {
        VkCommandBufferAllocateInfo info{};
        info.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO;
        info.commandPool = pool_;
        info.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
        info.commandBufferCount = 1;
        r = vk_.vkAllocateCommandBuffers(device_, &info, &cmd_);
      }
    }
    if (r != VK_SUCCESS) {
      // Submitted work may still be running: nothing it touches may be reused.
      lost_ = "vulkan backend: " + info_.name + " failed a submission: " + result_name(r);
      return Status::error(lost_);
    }
    return Status::ok();
  }

  Status elementwise(uint32_t op, Tensor out, Tensor a, Tensor b) {
    const int64_t n = a.rows * a.cols;
    if (b.rows * b.cols != n || out.rows * out.cols != n) {
      return Status::error("vulkan backend: elementwise op on tensors of different sizes");
    }
    ElementwiseParams p{address_of(out), address_of(a), address_of(b), uint32_t(n)};
    return dispatch("elementwise", op, p, uint32_t(std::min<int64_t>(groups(n, 256), 4096)));
  }

  // Submits what was recorded and waits for it, at most kSubmitTimeoutSeconds.
  Status flush() {
    KS_RETURN_IF_ERROR(check_alive());
    if (!recording_ && submitted_.empty()) return Status::ok();
    KS_RETURN_IF_ERROR(begin_commands());
    barrier(VK_PIPELINE_STAGE_HOST_BIT, VK_ACCESS_HOST_READ_BIT);
    recording_ = false;
    recorded_dispatches_ = 0;
    // Earlier partial submissions may be running: a failure from here on leaves the backend
    // unusable (lost_), never half-reset with work in flight.
    auto lose = [&](const char* what, VkResult result) {
      lost_ = "vulkan backend: " + info_.name + ": " + what + " failed: " + result_name(result);
      return Status::error(lost_);
    };
    if (const VkResult e = vk_.vkEndCommandBuffer(cmd_); e != VK_SUCCESS) {
      return lose("vkEndCommandBuffer", e);
    }
    VkSubmitInfo submit{};
    submit.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO;
    submit.commandBufferCount = 1;
    submit.pCommandBuffers = &cmd_;
    if (const VkResult e = vk_.vkQueueSubmit(queue_, 1, &submit, fence_); e != VK_SUCCESS) {
      return lose("vkQueueSubmit", e);
    }
    const VkResult r =
        vk_.vkWaitForFences(device_, 1, &fence_, VK_TRUE, kSubmitTimeoutSeconds * 1000000000ull);
    if (r != VK_SUCCESS) {
      // The device may still be running the work: nothing it touches may be reused.
      lost_ = "vulkan backend: " + info_.name +
              (r == VK_TIMEOUT ? " did not finish a submission within " +
                                     std::to_string(kSubmitTimeoutSeconds) + " s (hung device)"
                               : " failed a submission: " + result_name(r));
      return Status::error(lost_);
    }
    KS_VK(vk_.vkResetFences(device_, 1, &fence_));
    KS_VK(vk_.vkResetCommandBuffer(cmd_, 0));
    for (VkCommandBuffer c : submitted_) {
      KS_VK(vk_.vkResetCommandBuffer(c, 0));
      spare_commands_.push_back(c);
    }
    submitted_.clear();
    return Status::ok();
  }

  std::shared_ptr<const vulkan::Instance> instance_;
  const Functions& vk_;
  VkPhysicalDevice physical_;
  DeviceInfo info_;
  VulkanOptions options_;
  VkDevice device_ = VK_NULL_HANDLE;
  VkQueue queue_ = VK_NULL_HANDLE;
  uint32_t family_ = 0;
  uint32_t device_type_ = 0;          // memory type of weights, KV cache and activations
  uint32_t host_type_ = 0;            // host-visible coherent: per-call data, staging
  size_t max_allocation_ = 0;         // of any allocation
  size_t max_weight_allocation_ = 0;  // of weight pages: VulkanOptions
  VkCommandPool pool_ = VK_NULL_HANDLE;
  VkCommandBuffer cmd_ = VK_NULL_HANDLE;
  VkFence fence_ = VK_NULL_HANDLE;
  VkPipelineLayout layout_ = VK_NULL_HANDLE;
  std::map<std::pair<std::string, uint32_t>, VkPipeline> pipelines_;
  bool recording_ = false;
  int recorded_dispatches_ = 0;                  // in cmd_ since it was begun
  std::vector<VkCommandBuffer> submitted_;       // submitted, not yet waited for
  std::vector<VkCommandBuffer> spare_commands_;  // finished and reset
  // Set while recording dispatches that neither read nor write what the one before wrote (the
  // parts of one weight, the projections of matmul_multi): they skip the barrier and overlap.
  bool independent_ = false;
  std::string lost_;  // set when a submission failed or timed out: every later call fails

  std::vector<Buffer> weight_pages_;
  std::vector<DeviceMatrix> matrices_;    // Linear::backend_slot and the embedding index here
  std::vector<VkDeviceAddress> vectors_;  // Vector::backend_slot
  int embedding_ = -1;

  ModelConfig config_;
  RunShape shape_;
  std::vector<float> inv_freq_;
  std::vector<Buffer> k_cache_;  // per layer [pool_blocks, n_kv_heads, kKvBlockSize, head_dim]
  std::vector<Buffer> v_cache_;
  Buffer scratch_;  // the activation arena
  size_t scratch_elements_ = 0;
  size_t scratch_used_ = 0;
  Buffer batch_;  // host-written per call: batch_layout()
  BatchLayout batch_layout_;
  int64_t n_tokens_ = 0;
  int64_t max_context_ = 0;    // of the call's tokens: position + 1
  Buffer attention_partials_;  // attention_partial_bytes()
  int64_t gather_used_ = 0;
  Buffer staging_;
  size_t in_use_ = 0;
  size_t peak_ = 0;
  uint32_t timestamp_bits_ = 0;     // of the queue family; 0: no timestamps
  double timestamp_period_ns_ = 0;  // nanoseconds per timestamp tick
  std::optional<Roofline> roofline_;
  size_t roofline_bytes_ = 0;
  std::string roofline_clock_;
};

}  // namespace

Result<std::unique_ptr<Backend>> make_vulkan_backend(const std::string& device,
                                                     const VulkanOptions& options) {
  auto shared = vulkan::Instance::shared();
  if (!shared.is_ok()) return shared.status().with_context("device " + device);
  std::shared_ptr<const vulkan::Instance> instance = std::move(shared).value();
  const std::vector<VkPhysicalDevice> physical = instance->physical_devices();
  std::vector<DeviceInfo> infos;
  for (size_t i = 0; i < physical.size(); ++i) {
    infos.push_back(vulkan::describe_device(*instance, physical[i], int(i)));
  }
  KS_ASSIGN_OR_RETURN(int index, vulkan::parse_device_index(device, infos));
  auto backend = std::make_unique<VulkanBackend>(std::move(instance), physical[size_t(index)],
                                                 infos[size_t(index)], options);
  KS_RETURN_IF_ERROR(backend->init());
  return std::unique_ptr<Backend>(std::move(backend));
}

Result<std::vector<std::string>> describe_vulkan_devices() {
  KS_ASSIGN_OR_RETURN(std::vector<DeviceInfo> devices, vulkan::list_devices());
  std::vector<std::string> lines;
  for (const DeviceInfo& d : devices) {
    std::string line = "vulkan:" + std::to_string(d.index) + "  " + d.name + " (" + d.type +
                       ", Vulkan " + std::to_string(VK_API_VERSION_MAJOR(d.api_version)) + "." +
                       std::to_string(VK_API_VERSION_MINOR(d.api_version)) + ", " +
                       std::to_string(d.device_local_bytes >> 20) + " MiB device-local)";
    if (!d.unusable.empty()) line += ": cannot run Kestrel: " + d.unusable;
    lines.push_back(line);
  }
  return lines;
}

namespace vulkan {
Status write_tensor(Backend& backend, Tensor t, const float* host) {
  auto* vk = dynamic_cast<VulkanBackend*>(&backend);
  if (vk == nullptr) return Status::error(backend.name() + " is not a Vulkan backend");
  return vk->write(t, host);
}
}  // namespace vulkan

}  // namespace kestrel
