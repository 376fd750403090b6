#include "model/shard.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

namespace kestrel {
namespace {

std::string count_text(int64_t n) {
  return std::to_string(n);
}

// Bytes of `cols` packed weights of one row of `format` (block-aligned widths).
size_t packed_bytes(WeightFormat format, int64_t cols) {
  QuantWeight probe;
  probe.format = format;
  probe.cols = cols;
  return probe.data_row_bytes();
}

ShardSlice row_range(int64_t first, int64_t n, int64_t cols) {
  ShardSlice s;
  s.cols = cols;
  for (int64_t i = 0; i < n; ++i) s.rows.push_back(first + i);
  return s;
}

// A bias's TensorInfo names its matrix plus ".bias".
bool is_bias(const TensorInfo& t) {
  return t.name.ends_with(".bias");
}

// Rows `s.rows` and columns [s.first_col, s.first_col + s.cols) of `w`; zero rows where a row
// is -1. Quantized blocks and their scales are copied as they are.
QuantWeight slice_matrix(const QuantWeight& w, const ShardSlice& s) {
  const int64_t rows = int64_t(s.rows.size());
  QuantWeight out = allocate_weight(w.format, rows, s.cols, w.block);
  const size_t src_row = w.data_row_bytes(), dst_row = out.data_row_bytes();
  const size_t col_offset = packed_bytes(w.format, s.first_col);
  const int64_t src_blocks = w.blocks_per_row(), dst_blocks = out.blocks_per_row();
  const int64_t first_block = w.block > 0 ? s.first_col / w.block : 0;
  const std::vector<float> zeros(size_t(s.cols), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t from = s.rows[size_t(r)];
    if (from < 0) {
      quantize_row(out, r, zeros.data());
      continue;
    }
    std::memcpy(out.data.mutable_data() + size_t(r) * dst_row,
                w.data.data() + size_t(from) * src_row + col_offset, dst_row);
    Blob* const dst_tables[] = {&out.scales, &out.mins};
    const Blob* const src_tables[] = {&w.scales, &w.mins};
    for (int i = 0; i < 2; ++i) {
      if (src_tables[i]->empty()) continue;
      std::memcpy(dst_tables[i]->as_mutable<uint16_t>() + r * dst_blocks,
                  src_tables[i]->as<uint16_t>() + from * src_blocks + first_block,
                  size_t(dst_blocks) * sizeof(uint16_t));
    }
  }
  return out;
}

}  // namespace

ShardSlice shard_slice(const TensorInfo& t, const ModelConfig& full, const ShardPlan& p) {
  // A bias goes with its matrix's rows.
  std::string name = t.name;
  if (is_bias(t)) name.resize(name.size() - std::string(".bias").size());
  const std::string kind = name.substr(name.rfind('.') + 1);
  const int64_t hd = full.head_dim, h = full.hidden_size;
  if (kind == "tok_embd" || kind == "output") {
    ShardSlice s;
    s.cols = h;
    for (int64_t i = 0; i <= p.vocab; ++i) {
      s.rows.push_back(i < p.real_vocab ? p.first_token + i : -1);
    }
    return s;
  }
  if (kind == "wq") return row_range(p.rank * p.heads * hd, p.heads * hd, h);
  if (kind == "wk" || kind == "wv") return row_range(p.first_kv_head * hd, p.kv_heads * hd, h);
  if (kind == "w_gate" || kind == "w_up") {
    return row_range(p.rank * p.intermediate, p.intermediate, h);
  }
  if (kind == "wo") {
    ShardSlice s = row_range(0, h, p.heads * hd);
    s.first_col = p.rank * p.heads * hd;
    return s;
  }
  if (kind == "w_down") {
    ShardSlice s = row_range(0, h, p.intermediate);
    s.first_col = p.rank * p.intermediate;
    return s;
  }
  return row_range(0, t.rows, 0);  // norms: whole
}

Blob shard_vector(const TensorInfo& t, const float* full_values, const ModelConfig& full,
                  const ShardPlan& plan) {
  const ShardSlice s = shard_slice(t, full, plan);
  const bool zero = is_bias(t) && t.name.ends_with(".wo.bias") && plan.rank != 0;
  Blob out = Blob::allocate(s.rows.size() * sizeof(float));
  float* dst = out.as_mutable<float>();
  for (size_t i = 0; i < s.rows.size(); ++i) {
    dst[i] = zero || s.rows[i] < 0 ? 0.0f : full_values[s.rows[i]];
  }
  return out;
}

Status check_tensor_parallel(const ModelConfig& c, int world, WeightFormat format, int block) {
  if (world < 1 || world > kMaxTensorParallel) {
    return Status::error("tensor parallelism takes 1 to " + count_text(kMaxTensorParallel) +
                         " ranks, got " + count_text(world));
  }
  if (world == 1) return Status::ok();
  const std::string split = "cannot split over " + count_text(world) + " ranks: ";
  if (c.n_heads % world != 0) {
    return Status::error(split + "the " + count_text(c.n_heads) +
                         " attention heads are not divisible by " + count_text(world));
  }
  if (c.n_kv_heads % world != 0 && world % c.n_kv_heads != 0) {
    return Status::error(split + "the " + count_text(c.n_kv_heads) +
                         " KV heads neither divide into " + count_text(world) +
                         " parts nor divide " + count_text(world) + " (so each rank's query " +
                         "heads would need parts of several KV heads)");
  }
  if (c.intermediate_size % world != 0) {
    return Status::error(split + "the intermediate size " + count_text(c.intermediate_size) +
                         " is not divisible by " + count_text(world));
  }
  if (!is_quantized(format)) return Status::ok();
  // Row-parallel matrices split their columns: each rank's width must be whole blocks.
  const std::pair<const char*, int64_t> widths[] = {
      {"q_dim (heads x head_dim)", c.q_dim() / world},
      {"intermediate_size", c.intermediate_size / world}};
  for (const auto& [what, cols] : widths) {
    if (cols % block != 0) {
      return Status::error(split + "each rank's part of " + what + " (" + count_text(cols) +
                           ") is not a multiple of the " + format_name(format) + " block " +
                           count_text(block) + "; use fewer ranks, block 32 or a float format");
    }
  }
  return Status::ok();
}

ShardPlan shard_plan(const ModelConfig& c, int rank, int world) {
  ShardPlan p;
  p.rank = rank;
  p.world = world;
  p.heads = c.n_heads / world;
  p.kv_replicated = c.n_kv_heads % world != 0;
  if (p.kv_replicated) {
    // world / n_kv_heads consecutive ranks share one KV head; their query heads all use it.
    p.kv_heads = 1;
    p.first_kv_head = rank / (world / c.n_kv_heads);
  } else {
    p.kv_heads = c.n_kv_heads / world;
    p.first_kv_head = rank * p.kv_heads;
  }
  p.intermediate = c.intermediate_size / world;
  p.vocab = (c.vocab_size + world - 1) / world;
  p.first_token = rank * p.vocab;
  p.real_vocab = std::max<int64_t>(0, std::min(p.vocab, c.vocab_size - p.first_token));
  return p;
}

ModelConfig shard_config(const ModelConfig& c, const ShardPlan& p) {
  ModelConfig s = c;
  s.n_heads = p.heads;
  s.n_kv_heads = p.kv_heads;
  s.head_dim = c.head_dim;
  s.intermediate_size = p.intermediate;
  s.vocab_size = p.vocab + 1;
  return s;
}

Result<ModelWeights> shard_weights(const ModelWeights& full, const ShardPlan& plan) {
  // The whole model's tensors by canonical name.
  std::map<std::string, const QuantWeight*> matrices;
  std::map<std::string, const Blob*> vectors;
  KS_RETURN_IF_ERROR(for_each_tensor(full, [&](const TensorInfo& t, const auto& m) -> Status {
    using Member = std::remove_cvref_t<decltype(m)>;
    if constexpr (std::is_same_v<Member, QuantWeight>) {
      matrices[t.name] = &m;
    } else if constexpr (std::is_same_v<Member, Linear>) {
      matrices[t.name] = &m.w;
      if (!m.bias.empty()) vectors[t.bias_info().name] = &m.bias;
    } else {
      vectors[t.name] = &m.data;
    }
    return Status::ok();
  }));
  const ModelConfig config = shard_config(full.config, plan);
  TensorMaker maker;
  maker.matrix = [&](const TensorInfo& t) -> Result<QuantWeight> {
    const auto it = matrices.find(t.name);
    if (it == matrices.end()) return Status::error("shard: the model has no tensor " + t.name);
    const ShardSlice s = shard_slice(t, full.config, plan);
    if (s.cols != t.cols || int64_t(s.rows.size()) != t.rows) {
      return Status::error("shard: " + t.name + " does not match the split shape");
    }
    return slice_matrix(*it->second, s);
  };
  maker.vector = [&](const TensorInfo& t) -> Result<Blob> {
    const auto it = vectors.find(t.name);
    if (it == vectors.end()) return Status::error("shard: the model has no tensor " + t.name);
    return shard_vector(t, it->second->as<float>(), full.config, plan);
  };
  KS_ASSIGN_OR_RETURN(ModelWeights shard, build_weights(config, full.format, full.block, maker));
  shard.warnings = full.warnings;
  shard.notes = full.notes;
  return shard;
}

}  // namespace kestrel
