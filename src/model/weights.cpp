#include "model/weights.h"

#include <type_traits>
#include <utility>

namespace kestrel {

namespace weights_detail {

TensorInfo tensor_info(const std::string& name, const std::string& hf_name, int64_t layer,
                       int64_t rows, int64_t cols, bool bias) {
  TensorInfo t;
  t.name = name;
  t.hf_name = hf_name + ".weight";
  t.layer = layer;
  t.rows = rows;
  t.cols = cols;
  t.bias = bias;
  return t;
}

}  // namespace weights_detail

TensorInfo TensorInfo::bias_info() const {
  TensorInfo b;
  b.name = name + ".bias";
  const std::string suffix = ".weight";
  b.hf_name = hf_name.substr(0, hf_name.size() - suffix.size()) + ".bias";
  b.layer = layer;
  b.rows = rows;
  return b;
}

namespace {

// The bytes a built tensor holds: data, scales and mins of a matrix, a linear's bias.
size_t built_bytes(const QuantWeight& w) {
  return w.total_bytes();
}
size_t built_bytes(const Linear& l) {
  return l.w.total_bytes() + l.bias.size();
}
size_t built_bytes(const Vector& v) {
  return v.data.size();
}

}  // namespace

size_t ModelWeights::decode_bytes() const {
  return count_weight_bytes(*this, [](const TensorInfo&, const auto& m) { return built_bytes(m); })
      .decode;
}

size_t ModelWeights::resident_bytes() const {
  return count_weight_bytes(*this, [](const TensorInfo&, const auto& m) { return built_bytes(m); })
      .resident;
}

ModelWeights weights_skeleton(const ModelConfig& config) {
  ModelWeights w;
  w.config = config;
  w.layers.resize(size_t(config.n_layers > 0 ? config.n_layers : 0));
  return w;
}

int64_t matrix_elements(const ModelConfig& config, bool with_head) {
  const ModelWeights skeleton = weights_skeleton(config);
  int64_t total = 0;
  (void)for_each_tensor(skeleton, [&](const TensorInfo& t, const auto&) -> Status {
    if (t.is_matrix() && !t.tied && (with_head || t.layer >= 0)) total += t.rows * t.cols;
    return Status::ok();
  });
  return total;
}

Result<ModelWeights> build_weights(const ModelConfig& config, WeightFormat format, int block,
                                   TensorMaker& maker) {
  ModelWeights w = weights_skeleton(config);
  w.format = format;
  w.block = is_quantized(format) ? block : 0;
  KS_RETURN_IF_ERROR(for_each_tensor(w, [&](const TensorInfo& t, auto& member) -> Status {
    using Member = std::remove_cvref_t<decltype(member)>;
    if constexpr (std::is_same_v<Member, QuantWeight>) {
      KS_ASSIGN_OR_RETURN(member, maker.matrix(t));
    } else if constexpr (std::is_same_v<Member, Linear>) {
      if (t.tied) {
        member.w = w.tok_embd;  // Blobs share storage
        return Status::ok();
      }
      KS_ASSIGN_OR_RETURN(member.w, maker.matrix(t));
      if (t.bias) {
        KS_ASSIGN_OR_RETURN(member.bias, maker.vector(t.bias_info()));
      }
    } else {
      member.n = t.rows;
      KS_ASSIGN_OR_RETURN(member.data, maker.vector(t));
    }
    return Status::ok();
  }));
  return w;
}

}  // namespace kestrel
