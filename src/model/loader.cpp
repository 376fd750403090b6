#include "model/loader.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <type_traits>

#include "core/half.h"
#include "core/progress.h"
#include "io/safetensors.h"
#include "model/gguf_model.h"
#include "model/prequant.h"
#include "model/shard.h"
#include "tokenizer/gguf_tokenizer.h"

namespace kestrel {
namespace {

namespace fs = std::filesystem;

constexpr const char* kConvertedVersionKey = "kestrel.format_version";
constexpr const char* kConvertedVersion = "1";

Status check_all_shapes(const ModelConfig& c, WeightFormat format, int block) {
  if (!is_quantized(format)) return Status::ok();
  KS_RETURN_IF_ERROR(check_block(format, block));
  const std::pair<const char*, int64_t> widths[] = {{"hidden_size", c.hidden_size},
                                                    {"q_dim (heads x head_dim)", c.q_dim()},
                                                    {"intermediate_size", c.intermediate_size}};
  for (const auto& [what, cols] : widths) {
    if (cols % block != 0) {
      return Status::error(std::string(what) + " = " + std::to_string(cols) +
                           " is not a multiple of the " + format_name(format) + " block " +
                           std::to_string(block) + "; use the fp16 format or another block size");
    }
  }
  return Status::ok();
}

// Whether every one of `n` values of `dtype` at `data` is finite (fp16/bf16 by their exponent).
bool all_finite(DType dtype, const uint8_t* data, int64_t n) {
  if (dtype == DType::f32) {
    for (int64_t i = 0; i < n; ++i) {
      float v;
      std::memcpy(&v, data + 4 * i, 4);
      if (!std::isfinite(v)) return false;
    }
    return true;
  }
  const uint16_t exponent = dtype == DType::f16 ? 0x7c00 : 0x7f80;
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, data + 2 * i, 2);
    if ((h & exponent) == exponent) return false;
  }
  return true;
}

// Converts `rows` rows produced by `fill_row` into `format`, in parallel, with progress.
Result<QuantWeight> quantize_rows(WeightFormat format, int block, int64_t rows, int64_t cols,
                                  ThreadPool& pool, Progress& progress,
                                  const std::function<void(int64_t, float*)>& fill_row,
                                  const std::string& name) {
  KS_RETURN_IF_ERROR(check_weight_shape(format, rows, cols, block, name));
  QuantWeight w = allocate_weight(format, rows, cols, is_quantized(format) ? block : 0);
  std::atomic<int64_t> bad_row{rows};
  pool.parallel_for(rows, 8, [&](int64_t begin, int64_t end, int) {
    std::vector<float> row(static_cast<size_t>(cols));
    for (int64_t r = begin; r < end; ++r) {
      fill_row(r, row.data());
      // The conversion reads every value anyway; NaN or Inf would make every logit NaN.
      if (!all_finite(DType::f32, reinterpret_cast<const uint8_t*>(row.data()), cols)) {
        int64_t seen = bad_row.load();
        while (r < seen && !bad_row.compare_exchange_weak(seen, r)) {
        }
      }
      quantize_row(w, r, row.data());
    }
    progress.advance((end - begin) * cols);
  });
  if (bad_row.load() < rows) {
    return Status::error("tensor '" + name + "' holds NaN or Inf (row " +
                         std::to_string(bad_row.load()) + "); refusing to load it");
  }
  return w;
}

void to_f32(const TensorRef& t, int64_t offset, int64_t n, float* out) {
  switch (t.dtype) {
    case DType::f32:
      std::memcpy(out, t.data + size_t(offset) * 4, size_t(n) * 4);
      break;
    case DType::f16: {
      const uint8_t* p = t.data + size_t(offset) * 2;
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        out[i] = fp16_to_float(h);
      }
      break;
    }
    case DType::bf16: {
      const uint8_t* p = t.data + size_t(offset) * 2;
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        out[i] = bf16_to_float(h);
      }
      break;
    }
    default:
      break;  // rejected by check_hf_tensor
  }
}

// NaN or Inf in a weight turns every logit into NaN and every sampled id into 0, silently; the
// loader refuses it instead, naming the tensor. `rows` x `cols` values, scanned row-parallel.
Status check_finite(DType dtype, const uint8_t* data, int64_t rows, int64_t cols, ThreadPool& pool,
                    const std::string& where, const std::string& name) {
  std::atomic<int64_t> bad_row{rows};
  const size_t row_bytes = size_t(cols) * (dtype == DType::f32 ? 4 : 2);
  pool.parallel_for(rows, 64, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      if (!all_finite(dtype, data + size_t(r) * row_bytes, cols)) {
        int64_t seen = bad_row.load();
        while (r < seen && !bad_row.compare_exchange_weak(seen, r)) {
        }
        return;
      }
    }
    note_work_done((end - begin) * cols);  // reading a mapped file can be slow, not stalled
  });
  if (bad_row.load() == rows) return Status::ok();
  return Status::error(where + ": tensor '" + name + "' holds NaN or Inf (row " +
                       std::to_string(bad_row.load()) + "); refusing to load it");
}

Status check_hf_tensor(const TensorSource& source, const TensorRef& t,
                       const std::vector<int64_t>& shape) {
  if (t.dtype != DType::f32 && t.dtype != DType::f16 && t.dtype != DType::bf16) {
    return Status::error(source.where() + ": tensor '" + t.name + "' has dtype " +
                         dtype_name(t.dtype) + "; weights must be F32, F16 or BF16");
  }
  if (t.shape != shape) {
    std::string got = "[";
    for (size_t i = 0; i < t.shape.size(); ++i) got += (i ? ", " : "") + std::to_string(t.shape[i]);
    got += "]";
    std::string want = "[";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
    want += "]";
    return Status::error(source.where() + ": tensor '" + t.name + "' has shape " + got +
                         ", config.json implies " + want);
  }
  return Status::ok();
}

// A float HF matrix [rows, cols] converted row by row into `format`.
Result<QuantWeight> convert_hf_matrix(const TensorSource& source, const TensorRef& t,
                                      WeightFormat format, int block, int64_t rows, int64_t cols,
                                      ThreadPool& pool, Progress& progress) {
  Result<QuantWeight> w = quantize_rows(
      format, block, rows, cols, pool, progress,
      [&](int64_t r, float* out) { to_f32(t, r * cols, cols, out); }, t.name);
  if (!w.is_ok()) return w.status().with_context(source.where());
  return w;
}

// A float HF vector (norm or bias) as fp32, refused when not finite.
Result<Blob> load_hf_vector(const TensorSource& source, const TensorInfo& tensor,
                            ThreadPool& pool) {
  KS_ASSIGN_OR_RETURN(const TensorRef* t, source.get(tensor.hf_name));
  const int64_t n = tensor.rows;
  Blob b = Blob::allocate(size_t(n) * sizeof(float));
  to_f32(*t, 0, n, b.as_mutable<float>());
  KS_RETURN_IF_ERROR(check_finite(DType::f32, b.data(), 1, n, pool, source.where(), t->name));
  return b;
}

// With `plan`, only that rank's shard (shard_config) is built: each of its rows is converted
// from the rows and columns of the mapped file that shard_slice names, nothing else.
Result<ModelWeights> load_hf(const std::string& dir, const ModelConfig& config,
                             const LoadOptions& options, ThreadPool& pool,
                             const ShardPlan* plan = nullptr) {
  KS_ASSIGN_OR_RETURN(TensorSource source, TensorSource::open_dir(dir));
  KS_RETURN_IF_ERROR(check_all_shapes(config, options.format, options.block));
  // Every tensor's presence, dtype and shape first: a bad file fails before minutes of conversion.
  TensorMaker checker;
  checker.matrix = [&](const TensorInfo& tensor) -> Result<QuantWeight> {
    KS_ASSIGN_OR_RETURN(const TensorRef* t, source.get(tensor.hf_name));
    KS_RETURN_IF_ERROR(check_hf_tensor(source, *t, {tensor.rows, tensor.cols}));
    return QuantWeight();
  };
  checker.vector = [&](const TensorInfo& tensor) -> Result<Blob> {
    KS_ASSIGN_OR_RETURN(const TensorRef* t, source.get(tensor.hf_name));
    KS_RETURN_IF_ERROR(check_hf_tensor(source, *t, {tensor.rows}));
    return Blob();
  };
  KS_RETURN_IF_ERROR(build_weights(config, options.format, options.block, checker).status());

  const ModelConfig built = plan != nullptr ? shard_config(config, *plan) : config;
  Progress progress("convert to " + std::string(format_name(options.format)) +
                        (plan != nullptr ? " (rank " + std::to_string(plan->rank) + " of " +
                                               std::to_string(plan->world) + ")"
                                         : ""),
                    matrix_elements(built, true), options.progress);
  TensorMaker maker;
  maker.matrix = [&](const TensorInfo& tensor) -> Result<QuantWeight> {
    KS_ASSIGN_OR_RETURN(const TensorRef* t, source.get(tensor.hf_name));
    const int64_t rows = tensor.rows, cols = tensor.cols;
    if (plan != nullptr) {
      const ShardSlice s = shard_slice(tensor, config, *plan);
      const int64_t source_cols = t->shape[1];
      Result<QuantWeight> w = quantize_rows(
          options.format, options.block, rows, cols, pool, progress,
          [&](int64_t r, float* out) {
            const int64_t from = s.rows[size_t(r)];
            if (from < 0) {
              std::fill_n(out, cols, 0.0f);  // the vocabulary's zero row
            } else {
              to_f32(*t, from * source_cols + s.first_col, cols, out);
            }
          },
          t->name);
      if (!w.is_ok()) return w.status().with_context(source.where());
      return w;
    }
    const bool same_float = (options.format == WeightFormat::fp32 && t->dtype == DType::f32) ||
                            (options.format == WeightFormat::fp16 && t->dtype == DType::f16) ||
                            (options.format == WeightFormat::bf16 && t->dtype == DType::bf16);
    if (same_float) {
      // Already in the wanted layout: use the mapped bytes in place.
      QuantWeight w;
      w.format = options.format;
      w.rows = rows;
      w.cols = cols;
      w.data = t->blob();
      KS_RETURN_IF_ERROR(
          check_finite(t->dtype, t->data, rows, cols, pool, source.where(), t->name));
      progress.advance(rows * cols);
      return w;
    }
    return convert_hf_matrix(source, *t, options.format, options.block, rows, cols, pool, progress);
  };
  maker.vector = [&](const TensorInfo& tensor) -> Result<Blob> {
    if (plan == nullptr) return load_hf_vector(source, tensor, pool);
    KS_ASSIGN_OR_RETURN(const TensorRef* t, source.get(tensor.hf_name));
    TensorInfo whole = tensor;
    whole.rows = t->shape[0];
    KS_ASSIGN_OR_RETURN(const Blob values, load_hf_vector(source, whole, pool));
    return shard_vector(tensor, values.as<float>(), config, *plan);
  };
  Result<ModelWeights> weights = build_weights(built, options.format, options.block, maker);
  progress.finish();
  // Bias tensors the config does not ask for (looked up by the tensor list's own names).
  std::string unused_bias;
  if (weights.is_ok()) {
    (void)for_each_tensor(*weights, [&](const TensorInfo& t, const auto&) -> Status {
      if (unused_bias.empty() && t.is_matrix() && !t.bias && !t.tied &&
          source.find(t.bias_info().hf_name) != nullptr) {
        unused_bias = t.bias_info().hf_name;
      }
      return Status::ok();
    });
  }
  if (!unused_bias.empty() && !config.attention_bias) {
    weights->warnings.push_back(source.where() + ": has bias tensors (" + unused_bias +
                                ", ...) but config.json says attention_bias false; they are "
                                "ignored, as transformers ignores them");
  }
  return weights;
}

// The name of a matrix's quantized linear in an AWQ / GPTQ checkpoint: its HF name less ".weight".
std::string linear_prefix(const std::string& hf_name) {
  constexpr size_t kSuffix = 7;  // ".weight"
  return hf_name.size() > kSuffix ? hf_name.substr(0, hf_name.size() - kSuffix) : hf_name;
}

// An AWQ / GPTQ checkpoint (prequant.h says how each layout maps): quantized linears are copied
// into sym_int4 / asym_int4 block 32 code for code, or dequantized as their kernels compute them
// and requantized when another format is asked for; the float tensors (embeddings, lm_head,
// norms, biases) load as in an HF checkpoint.
Result<ModelWeights> load_prequant(const std::string& dir, const ModelConfig& config,
                                   const LoadOptions& options, ThreadPool& pool) {
  KS_ASSIGN_OR_RETURN(TensorSource source, TensorSource::open_dir(dir));
  const PrequantConfig& pq = config.prequant;
  const auto [format, block] =
      prequant_load_format(pq, options.format, options.format_explicit, options.block);
  const bool requested = format != prequant_format(pq) || block != 32;
  KS_RETURN_IF_ERROR(check_all_shapes(config, format, block).with_context(dir));
  int quantized = 0, floats = 0;
  TensorMaker checker;
  checker.matrix = [&](const TensorInfo& tensor) -> Result<QuantWeight> {
    const std::string prefix = linear_prefix(tensor.hf_name);
    if (PrequantTensor::present(source, prefix)) {
      KS_RETURN_IF_ERROR(
          PrequantTensor::open(source, pq, prefix, tensor.rows, tensor.cols).status());
      ++quantized;
      return QuantWeight();
    }
    KS_ASSIGN_OR_RETURN(const TensorRef* t, source.get(tensor.hf_name));
    KS_RETURN_IF_ERROR(check_hf_tensor(source, *t, {tensor.rows, tensor.cols}));
    if (!tensor.tied) ++floats;
    return QuantWeight();
  };
  checker.vector = [&](const TensorInfo& tensor) -> Result<Blob> {
    KS_ASSIGN_OR_RETURN(const TensorRef* t, source.get(tensor.hf_name));
    KS_RETURN_IF_ERROR(check_hf_tensor(source, *t, {tensor.rows}));
    return Blob();
  };
  KS_RETURN_IF_ERROR(build_weights(config, format, block, checker).status());
  if (quantized == 0) {
    return Status::error(dir + ": config.json has a quantization_config (" +
                         prequant_method_name(pq.method) + ") but no tensor has a .qweight");
  }

  Progress progress("load " + std::string(format_name(format)), matrix_elements(config, true),
                    options.progress);
  TensorMaker maker;
  maker.matrix = [&](const TensorInfo& tensor) -> Result<QuantWeight> {
    const std::string prefix = linear_prefix(tensor.hf_name);
    const int64_t rows = tensor.rows, cols = tensor.cols;
    if (!PrequantTensor::present(source, prefix)) {
      KS_ASSIGN_OR_RETURN(const TensorRef* t, source.get(tensor.hf_name));
      return convert_hf_matrix(source, *t, format, block, rows, cols, pool, progress);
    }
    KS_ASSIGN_OR_RETURN(const PrequantTensor q,
                        PrequantTensor::open(source, pq, prefix, rows, cols));
    const std::string name = prefix + ".qweight";
    if (requested) {
      Result<QuantWeight> w = quantize_rows(
          format, block, rows, cols, pool, progress,
          [&](int64_t r, float* out) { q.dequantize_row(r, out); }, name);
      if (!w.is_ok()) return w.status().with_context(source.where());
      return w;
    }
    QuantWeight w = allocate_weight(format, rows, cols, block);
    pool.parallel_for(rows, 8, [&](int64_t begin, int64_t end, int) {
      for (int64_t r = begin; r < end; ++r) q.copy_row(r, w);
      progress.advance((end - begin) * cols);
    });
    KS_RETURN_IF_ERROR(check_finite(DType::f16, w.scales.data(), rows, w.blocks_per_row(), pool,
                                    source.where(), prefix + ".scales"));
    if (!w.mins.empty()) {
      KS_RETURN_IF_ERROR(check_finite(DType::f16, w.mins.data(), rows, w.blocks_per_row(), pool,
                                      source.where(), prefix + ".scales (times the zeros)"));
    }
    return w;
  };
  maker.vector = [&](const TensorInfo& tensor) { return load_hf_vector(source, tensor, pool); };
  Result<ModelWeights> weights = build_weights(config, format, block, maker);
  progress.finish();
  if (weights.is_ok()) {
    const std::string method = pq.method == PrequantMethod::awq ? "AWQ" : "GPTQ";
    std::string copied = std::to_string(quantized) + " " + method + " matrices (group " +
                         std::to_string(pq.group_size) + ") -> " + format_name(format) + " block " +
                         std::to_string(block);
    if (requested && format == WeightFormat::fp32) {
      copied += " (dequantized exactly)";
    } else if (requested && !is_quantized(format)) {
      copied += " (dequantized, rounded)";
    } else if (requested) {
      copied += " (requantized: precision lost)";
    } else if (format == WeightFormat::sym_int4) {
      copied += " (copied exactly)";
    } else {
      copied += " (copied; mins -zero*scale rounded to fp16)";
    }
    // The float matrices: the embedding table and an untied lm_head, quantized like an HF model's.
    weights->notes.push_back(dir + ": " + copied + ", " + std::to_string(floats) + " float " +
                             (floats == 1 ? "matrix" : "matrices") + " -> " + format_name(format) +
                             (is_quantized(format) ? " (quantized)" : ""));
  }
  return weights;
}

// A GGUF file: tensors whose ggml type a Kestrel format holds block for block are copied
// (gguf_model.h says which, and where the arithmetic differs); the rest are dequantized with
// ggml's formulas and quantized into the load's format. One format per model, as for HF sources.
Result<ModelWeights> load_gguf(const std::string& path, const LoadOptions& options,
                               ThreadPool& pool) {
  KS_ASSIGN_OR_RETURN(GgufModel model, GgufModel::open(path));
  const ModelConfig& config = model.config();
  const auto [format, block] =
      model.load_format(options.format, options.format_explicit, options.block);
  KS_RETURN_IF_ERROR(check_all_shapes(config, format, block).with_context(path));
  TensorMaker checker;
  checker.matrix = [&](const TensorInfo& tensor) -> Result<QuantWeight> {
    KS_RETURN_IF_ERROR(model.tensor(tensor.name, tensor.rows, tensor.cols).status());
    return QuantWeight();
  };
  checker.vector = [&](const TensorInfo& tensor) -> Result<Blob> {
    KS_RETURN_IF_ERROR(model.tensor(tensor.name, 1, tensor.rows).status());
    return Blob();
  };
  KS_RETURN_IF_ERROR(build_weights(config, format, block, checker).status());

  Progress progress("load " + std::string(format_name(format)), matrix_elements(config, true),
                    options.progress);
  TensorMaker maker;
  maker.matrix = [&](const TensorInfo& tensor) -> Result<QuantWeight> {
    const std::string& name = tensor.name;
    const int64_t rows = tensor.rows, cols = tensor.cols;
    KS_ASSIGN_OR_RETURN(const GgufTensor* t, model.tensor(name, rows, cols));
    if (!GgufModel::copies_into(t->type, format, block)) {
      Result<QuantWeight> w = quantize_rows(
          format, block, rows, cols, pool, progress,
          [&](int64_t r, float* out) { model.dequantize_row(name, *t, r, out); }, t->name);
      if (!w.is_ok()) return w.status().with_context(path);
      return w;
    }
    QuantWeight w = allocate_weight(format, rows, cols, is_quantized(format) ? block : 0);
    pool.parallel_for(rows, 8, [&](int64_t begin, int64_t end, int) {
      for (int64_t r = begin; r < end; ++r) model.copy_row(name, *t, r, w);
      progress.advance((end - begin) * cols);
    });
    if (!is_quantized(format)) {
      const DType dtype = format == WeightFormat::fp32   ? DType::f32
                          : format == WeightFormat::fp16 ? DType::f16
                                                         : DType::bf16;
      KS_RETURN_IF_ERROR(check_finite(dtype, w.data.data(), rows, cols, pool, path, t->name));
    } else {
      KS_RETURN_IF_ERROR(check_finite(DType::f16, w.scales.data(), rows, w.blocks_per_row(), pool,
                                      path, t->name + " (scales)"));
      if (!w.mins.empty()) {
        KS_RETURN_IF_ERROR(check_finite(DType::f16, w.mins.data(), rows, w.blocks_per_row(), pool,
                                        path, t->name + " (mins)"));
      }
    }
    return w;
  };
  maker.vector = [&](const TensorInfo& tensor) -> Result<Blob> {
    const std::string& name = tensor.name;
    const int64_t n = tensor.rows;
    KS_ASSIGN_OR_RETURN(const GgufTensor* t, model.tensor(name, 1, n));
    Blob b = Blob::allocate(size_t(n) * sizeof(float));
    model.dequantize_row(name, *t, 0, b.as_mutable<float>());
    KS_RETURN_IF_ERROR(check_finite(DType::f32, b.data(), 1, n, pool, path, t->name));
    return b;
  };
  Result<ModelWeights> weights = build_weights(config, format, block, maker);
  progress.finish();
  if (weights.is_ok()) weights->notes.push_back(path + ": " + model.load_report(format, block));
  return weights;
}

// The dtype and shape each array of a weight has in a converted file.
struct StoredArray {
  DType dtype;
  std::vector<int64_t> shape;
};

StoredArray stored_data(const QuantWeight& w) {
  switch (w.format) {
    case WeightFormat::fp32:
      return {DType::f32, {w.rows, w.cols}};
    case WeightFormat::fp16:
      return {DType::f16, {w.rows, w.cols}};
    case WeightFormat::bf16:
      return {DType::bf16, {w.rows, w.cols}};
    case WeightFormat::sym_int8:
      return {DType::i8, {w.rows, w.cols}};
    case WeightFormat::sym_int4:
    case WeightFormat::asym_int4:
      return {DType::u8, {w.rows, w.cols / 2}};
  }
  return {DType::u8, {}};
}

Result<ModelWeights> load_converted(const std::string& dir, const TensorSource& source,
                                    const LoadOptions& options, ThreadPool& pool) {
  const auto& meta = source.metadata();
  auto get_meta = [&](const std::string& key) -> Result<std::string> {
    auto it = meta.find(key);
    if (it == meta.end()) {
      return Status::error(source.where() + ": converted model metadata lacks '" + key + "'");
    }
    return it->second;
  };
  KS_ASSIGN_OR_RETURN(std::string version, get_meta(kConvertedVersionKey));
  if (version != kConvertedVersion) {
    return Status::error(source.where() + ": converted format version " + version +
                         " is not supported (this build reads version " + kConvertedVersion + ")");
  }
  KS_ASSIGN_OR_RETURN(std::string format_text, get_meta("kestrel.low_bit"));
  KS_ASSIGN_OR_RETURN(WeightFormat format, parse_format(format_text));
  KS_ASSIGN_OR_RETURN(std::string block_text, get_meta("kestrel.block"));
  Result<int> block_parsed = parse_block(block_text, format);
  if (!block_parsed.is_ok()) {
    return block_parsed.status().with_context(source.where() + ": metadata kestrel.block");
  }
  const int block = *block_parsed;
  if (options.format_explicit && options.format != format) {
    return Status::error(dir + " is already converted to " + format_text + "; converting to " +
                         format_name(options.format) + " needs the original HF model");
  }
  KS_ASSIGN_OR_RETURN(ModelConfig config, load_model_config(dir));
  KS_RETURN_IF_ERROR(check_all_shapes(config, format, block));

  auto array = [&](const std::string& name, const StoredArray& want) -> Result<Blob> {
    KS_ASSIGN_OR_RETURN(const TensorRef* t, source.get(name));
    if (t->dtype != want.dtype || t->shape != want.shape) {
      return Status::error(source.where() + ": tensor '" + name + "' has dtype " +
                           dtype_name(t->dtype) + " and " + std::to_string(t->shape.size()) +
                           "-d shape that do not match the model's config and format");
    }
    return t->blob();
  };
  TensorMaker maker;
  maker.matrix = [&](const TensorInfo& tensor) -> Result<QuantWeight> {
    const std::string& name = tensor.name;
    const int64_t rows = tensor.rows, cols = tensor.cols;
    QuantWeight w;
    w.format = format;
    w.rows = rows;
    w.cols = cols;
    w.block = is_quantized(format) ? block : 0;
    const StoredArray data = stored_data(w);
    KS_ASSIGN_OR_RETURN(w.data, array(name + ".data", data));
    if (!is_quantized(format)) {
      KS_RETURN_IF_ERROR(check_finite(data.dtype, w.data.data(), rows, cols, pool, source.where(),
                                      name + ".data"));
    } else {
      const StoredArray scales{DType::f16, {rows, cols / block}};
      KS_ASSIGN_OR_RETURN(w.scales, array(name + ".scales", scales));
      KS_RETURN_IF_ERROR(check_finite(DType::f16, w.scales.data(), rows, cols / block, pool,
                                      source.where(), name + ".scales"));
      if (format == WeightFormat::asym_int4) {
        KS_ASSIGN_OR_RETURN(w.mins, array(name + ".mins", scales));
        KS_RETURN_IF_ERROR(check_finite(DType::f16, w.mins.data(), rows, cols / block, pool,
                                        source.where(), name + ".mins"));
      }
    }
    return w;
  };
  maker.vector = [&](const TensorInfo& tensor) -> Result<Blob> {
    const int64_t n = tensor.rows;
    KS_ASSIGN_OR_RETURN(Blob b, array(tensor.name, StoredArray{DType::f32, {n}}));
    KS_RETURN_IF_ERROR(check_finite(DType::f32, b.data(), 1, n, pool, source.where(), tensor.name));
    return b;
  };
  return build_weights(config, format, block, maker);
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t name_hash(const std::string& name) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char ch : name) h = (h ^ ch) * 1099511628211ull;
  return h;
}

// Approximately normal values (a sum of four uniforms), seeded by tensor name and row so that the
// weights do not depend on the thread count.
void random_row(const std::string& name, int64_t row, float mean, float stddev, float* out,
                int64_t n) {
  uint64_t state = name_hash(name) ^ (uint64_t(row) * 0x9e3779b97f4a7c15ull);
  constexpr float kScale = 1.7320508f / 65536.0f;  // sqrt(3) normalizes the Irwin-Hall variance
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t r = splitmix64(state);
    const float sum =
        float(r & 0xffff) + float((r >> 16) & 0xffff) + float((r >> 32) & 0xffff) + float(r >> 48);
    out[i] = mean + stddev * (sum - 2.0f * 65535.0f) * kScale;
  }
}

// With `plan`, only that rank's shard (shard_config) is built, each of its rows generated from
// the seeds of the whole model's row it comes from (shard_slice), so the shards hold exactly the
// whole model's values and the whole model is never in memory.
Result<ModelWeights> make_synthetic(const std::string& name, const LoadOptions& options,
                                    ThreadPool& pool, const ShardPlan* plan = nullptr) {
  KS_ASSIGN_OR_RETURN(ModelConfig config, synthetic_config(name));
  KS_RETURN_IF_ERROR(check_all_shapes(config, options.format, options.block));
  // The whole model's shapes: a split matrix keeps its whole fan-in's scale, and a rank's rows
  // and vectors are cut from whole ones.
  std::map<std::string, std::pair<int64_t, int64_t>> whole_shape;
  if (plan != nullptr) {
    const ModelWeights skeleton = weights_skeleton(config);
    (void)for_each_tensor(skeleton, [&](const TensorInfo& t, const auto&) -> Status {
      whole_shape[t.name] = {t.rows, t.cols};
      if (t.bias) whole_shape[t.bias_info().name] = {t.rows, 0};
      return Status::ok();
    });
  }
  const ModelConfig built = plan != nullptr ? shard_config(config, *plan) : config;
  Progress progress("build synthetic:" + name + " " + format_name(options.format) +
                        (plan != nullptr ? " (rank " + std::to_string(plan->rank) + " of " +
                                               std::to_string(plan->world) + ")"
                                         : ""),
                    matrix_elements(built, true), options.progress);
  TensorMaker maker;
  maker.matrix = [&](const TensorInfo& t) -> Result<QuantWeight> {
    const std::string& tensor = t.name;
    const int64_t rows = t.rows, cols = t.cols;
    const int64_t whole_cols = plan != nullptr ? whole_shape.at(tensor).second : cols;
    // Every matrix, the embedding included, has std 1/sqrt(fan_in): with tied embeddings a
    // larger table makes each token's own logit dominate and the model repeat its input.
    const float stddev = 1.0f / std::sqrt(float(whole_cols));
    if (plan == nullptr) {
      return quantize_rows(
          options.format, options.block, rows, cols, pool, progress,
          [&](int64_t r, float* out) { random_row(tensor, r, 0.0f, stddev, out, cols); }, tensor);
    }
    const ShardSlice slice = shard_slice(t, config, *plan);
    return quantize_rows(
        options.format, options.block, rows, cols, pool, progress,
        [&](int64_t r, float* out) {
          const int64_t from = slice.rows[size_t(r)];
          if (from < 0) {
            std::fill_n(out, cols, 0.0f);  // the vocabulary's zero row
          } else if (slice.first_col == 0) {
            random_row(tensor, from, 0.0f, stddev, out, cols);  // a row's values are a prefix
          } else {
            std::vector<float> row(size_t(slice.first_col + cols));
            random_row(tensor, from, 0.0f, stddev, row.data(), slice.first_col + cols);
            std::copy_n(row.data() + slice.first_col, cols, out);
          }
        },
        tensor);
  };
  maker.vector = [&](const TensorInfo& t) -> Result<Blob> {
    const int64_t n = plan != nullptr ? whole_shape.at(t.name).first : t.rows;
    Blob b = Blob::allocate(size_t(n) * sizeof(float));
    const bool is_bias = t.name.find(".bias") != std::string::npos;
    random_row(t.name, 0, is_bias ? 0.0f : 1.0f, 0.1f, b.as_mutable<float>(), n);
    if (plan == nullptr) return b;
    return shard_vector(t, b.as<float>(), config, *plan);
  };
  auto weights = build_weights(built, options.format, options.block, maker);
  progress.finish();
  return weights;
}

bool is_converted_dir(const TensorSource& source) {
  return source.metadata().count(kConvertedVersionKey) != 0;
}

constexpr const char* kSyntheticPrefix = "synthetic:";

}  // namespace

bool is_synthetic_source(const std::string& source) {
  return source.rfind(kSyntheticPrefix, 0) == 0;
}

std::vector<std::string> synthetic_names() {
  return {"tiny-qwen2", "tiny-llama",  "qwen2-0.5b",  "qwen2-1.5b",
          "qwen2-7b",   "llama3.2-1b", "llama3.1-8b", "llama3.1-70b"};
}

Result<ModelConfig> synthetic_config(const std::string& name) {
  ModelConfig c;
  // The shape every preset sets; the family lambdas add what their configs share.
  auto shape = [&](int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t kv,
                   int64_t vocab, bool tied) {
    c.hidden_size = hidden;
    c.intermediate_size = inter;
    c.n_layers = layers;
    c.n_heads = heads;
    c.n_kv_heads = kv;
    c.vocab_size = vocab;
    c.tie_word_embeddings = tied;
  };
  auto qwen2 = [&](int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t kv,
                   int64_t vocab, bool tied) {
    shape(hidden, inter, layers, heads, kv, vocab, tied);
    c.arch = Architecture::qwen2;
    c.attention_bias = true;
    c.rope_theta = 1000000.0;
    c.rms_norm_eps = 1e-6;
    c.max_position_embeddings = 32768;
    c.bos_token_id = 151643;
    c.eos_token_ids = {151643, 151645};
  };
  auto llama = [&](int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t kv,
                   int64_t vocab, bool tied, double factor) {
    shape(hidden, inter, layers, heads, kv, vocab, tied);
    c.arch = Architecture::llama;
    c.rope_theta = 500000.0;
    c.rms_norm_eps = 1e-5;
    c.max_position_embeddings = 131072;
    c.rope_scaling = RopeScaling{RopeType::llama3, factor, 1.0, 4.0, 8192};
    c.bos_token_id = 128000;
    c.eos_token_ids = {128001, 128008, 128009};
  };
  // The tiny presets keep their family's real vocabulary so they pair with the real tokenizers
  // (tests drive `run -p` and `chat` with them); everything else is small.
  if (name == "tiny-qwen2") {
    qwen2(128, 384, 2, 4, 2, 151936, true);
  } else if (name == "tiny-llama") {
    llama(128, 320, 2, 4, 1, 128256, false, 8.0);
    c.rope_scaling.original_max_position_embeddings = 64;
  } else if (name == "qwen2-0.5b") {
    qwen2(896, 4864, 24, 14, 2, 151936, true);
  } else if (name == "qwen2-1.5b") {
    qwen2(1536, 8960, 28, 12, 2, 151936, true);
  } else if (name == "qwen2-7b") {
    qwen2(3584, 18944, 28, 28, 4, 152064, false);
  } else if (name == "llama3.2-1b") {
    llama(2048, 8192, 16, 32, 8, 128256, true, 32.0);
  } else if (name == "llama3.1-8b") {
    llama(4096, 14336, 32, 32, 8, 128256, false, 8.0);
  } else if (name == "llama3.1-70b") {
    // 70.6B parameters, about 141 GB in bf16: the model that does not fit one GPU (issue 14).
    llama(8192, 28672, 80, 64, 8, 128256, false, 8.0);
  } else {
    std::string known;
    for (const auto& n : synthetic_names()) known += (known.empty() ? "" : ", ") + n;
    return Status::error("unknown synthetic model '" + name + "' (known: " + known + ")");
  }
  c.head_dim = c.hidden_size / c.n_heads;
  c.torch_dtype = "bfloat16";
  return c;
}

// A converted model is one model.safetensors carrying Kestrel's metadata.
std::string converted_file(const std::string& dir) {
  return (fs::path(dir) / "model.safetensors").string();
}
bool is_converted_source(const std::string& dir) {
  const std::string single = converted_file(dir);
  if (!fs::exists(single) || fs::exists(fs::path(dir) / "model.safetensors.index.json")) {
    return false;
  }
  Result<TensorSource> file = TensorSource::open_file(single);
  return file.is_ok() && is_converted_dir(*file);
}

Status check_model_source(const std::string& source) {
  std::error_code ec;
  if (fs::is_directory(source, ec)) return Status::ok();
  const std::string supported =
      "Kestrel loads a Hugging Face directory (config.json + safetensors), a directory written by "
      "kestrel convert, a GGUF file, or synthetic:NAME";
  if (!fs::exists(source, ec)) return Status::error(source + ": no such directory; " + supported);
  return Status::error(source + ": not a model directory; " + supported);
}

Result<ModelConfig> load_model_config_of(const std::string& source) {
  if (is_synthetic_source(source)) {
    return synthetic_config(source.substr(std::string(kSyntheticPrefix).size()));
  }
  if (is_gguf_source(source)) {
    KS_ASSIGN_OR_RETURN(GgufModel model, GgufModel::open(source));
    return model.config();
  }
  KS_RETURN_IF_ERROR(check_model_source(source));
  return load_model_config(source);
}

Result<ModelWeights> load_model(const std::string& source, const LoadOptions& options,
                                ThreadPool& pool) {
  if (is_synthetic_source(source)) {
    return make_synthetic(source.substr(std::string(kSyntheticPrefix).size()), options, pool);
  }
  if (is_gguf_source(source)) return load_gguf(source, options, pool);
  KS_RETURN_IF_ERROR(check_model_source(source));
  if (is_converted_source(source)) {
    KS_ASSIGN_OR_RETURN(TensorSource file, TensorSource::open_file(converted_file(source)));
    return load_converted(source, file, options, pool);
  }
  KS_ASSIGN_OR_RETURN(ModelConfig config, load_model_config(source));
  if (config.prequant.method != PrequantMethod::none) {
    return load_prequant(source, config, options, pool);
  }
  return load_hf(source, config, options, pool);
}

Result<ShardedModel> load_model_shards(const std::string& source, const LoadOptions& options,
                                       ThreadPool& pool, int world) {
  ShardedModel model;
  // Synthetic presets and HF checkpoints build each rank's shard alone (its rows generated, or
  // converted from the mapped file); any other source loads whole and is cut below.
  const bool synthetic = is_synthetic_source(source);
  const std::string synthetic_name =
      synthetic ? source.substr(std::string(kSyntheticPrefix).size()) : "";
  std::optional<ModelConfig> direct_config;
  if (synthetic) {
    KS_ASSIGN_OR_RETURN(direct_config, synthetic_config(synthetic_name));
  } else if (!is_gguf_source(source) && check_model_source(source).is_ok() &&
             !is_converted_source(source)) {
    KS_ASSIGN_OR_RETURN(ModelConfig config, load_model_config(source));
    if (config.prequant.method == PrequantMethod::none) direct_config = config;
  }
  if (direct_config) {
    const ModelConfig& config = *direct_config;
    KS_RETURN_IF_ERROR(
        check_tensor_parallel(config, world, options.format, options.block).with_context(source));
    for (int r = 0; r < world; ++r) {
      const ShardPlan plan = shard_plan(config, r, world);
      KS_ASSIGN_OR_RETURN(ModelWeights shard,
                          synthetic ? make_synthetic(synthetic_name, options, pool, &plan)
                                    : load_hf(source, config, options, pool, &plan));
      model.shards.push_back(std::move(shard));
    }
    model.whole = weights_skeleton(config);
    model.whole.format = options.format;
    model.whole.block = is_quantized(options.format) ? options.block : 0;
  } else {
    // Any other source loads whole (a converted or GGUF file is mapped, not copied, and
    // pre-quantized codes are copied as they are), then each rank copies its blocks out.
    KS_ASSIGN_OR_RETURN(ModelWeights full, load_model(source, options, pool));
    KS_RETURN_IF_ERROR(
        check_tensor_parallel(full.config, world, full.format, full.block).with_context(source));
    for (int r = 0; r < world; ++r) {
      KS_ASSIGN_OR_RETURN(ModelWeights shard,
                          shard_weights(full, shard_plan(full.config, r, world)));
      model.shards.push_back(std::move(shard));
    }
    model.whole = weights_skeleton(full.config);
    model.whole.format = full.format;
    model.whole.block = full.block;
  }
  model.whole.warnings = model.shards[0].warnings;
  model.whole.notes = model.shards[0].notes;
  return model;
}

namespace {

// Where a conversion to `out_dir` goes first: beside it, so the final rename stays on one file
// system, and hidden, so nobody mistakes it for a model.
fs::path partial_dir_of(const fs::path& out_dir) {
  const fs::path absolute = fs::absolute(out_dir).lexically_normal();
  fs::path name = absolute.filename();
  if (name.empty()) name = absolute.parent_path().filename();
  const fs::path parent =
      absolute.filename().empty() ? absolute.parent_path().parent_path() : absolute.parent_path();
  return parent / ("." + name.string() + ".kestrel-partial");
}

Status write_converted(const ModelWeights& weights, const std::string& source_dir,
                       const std::string& out_dir);

}  // namespace

Status check_convert_target(const std::string& source_dir, const std::string& out_dir,
                            bool replace_existing) {
  std::error_code ec;
  if (!fs::exists(out_dir, ec)) return Status::ok();
  if (!fs::is_directory(out_dir, ec)) {
    return Status::error(out_dir + ": exists and is not a directory");
  }
  if (!source_dir.empty() && fs::equivalent(source_dir, out_dir, ec)) {
    return Status::error(out_dir +
                         ": is the source model's own directory; converting into it would "
                         "overwrite the original weights (choose another output directory)");
  }
  if (!fs::is_empty(out_dir, ec) && !replace_existing) {
    return Status::error(out_dir +
                         ": directory is not empty (choose a new directory, or pass "
                         "--force to replace it)");
  }
  // Replacing OUT_DIR removes it whole: the source must not be inside it.
  if (!source_dir.empty()) {
    const fs::path out = fs::weakly_canonical(out_dir, ec);
    for (fs::path p = fs::weakly_canonical(source_dir, ec); !p.empty() && p != p.parent_path();
         p = p.parent_path()) {
      if (p == out) {
        return Status::error(out_dir + ": holds the source model " + source_dir +
                             "; replacing it would delete the original weights");
      }
    }
  }
  return Status::ok();
}

Status save_converted(const ModelWeights& weights, const std::string& source_dir,
                      const std::string& out_dir, bool replace_existing) {
  KS_RETURN_IF_ERROR(check_convert_target(source_dir, out_dir, replace_existing));
  const fs::path partial = partial_dir_of(out_dir);
  std::error_code ec;
  fs::remove_all(partial, ec);
  // An exception (a library's, an allocation's) must not leave the partial model behind either.
  Status status;
  try {
    status = write_converted(weights, source_dir, partial.string());
  } catch (const std::exception& e) {
    status = Status::error(out_dir + ": conversion failed: " + e.what());
  }
  if (status.is_ok() && fs::exists(out_dir, ec)) {
    // Only now, with the new model complete, does the old directory go.
    fs::remove_all(out_dir, ec);
    if (ec) status = Status::error(out_dir + ": cannot replace: " + ec.message());
  }
  if (status.is_ok()) {
    fs::rename(partial, out_dir, ec);
    if (ec) status = Status::error(out_dir + ": cannot rename into place: " + ec.message());
  }
  if (!status.is_ok()) fs::remove_all(partial, ec);
  return status;
}

namespace {

Status write_text(const fs::path& path, const std::string& text) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file << text;
  file.close();
  if (!file) return Status::error(path.string() + ": cannot write");
  return Status::ok();
}

Status write_converted(const ModelWeights& weights, const std::string& source_dir,
                       const std::string& out_dir) {
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return Status::error(out_dir + ": cannot create directory: " + ec.message());

  std::vector<TensorToWrite> tensors;
  auto add_blob = [&](const std::string& name, DType dtype, std::vector<int64_t> shape,
                      const Blob& blob) {
    tensors.push_back(TensorToWrite{name, dtype, std::move(shape), blob.data(), blob.size()});
  };
  auto add_matrix = [&](const std::string& name, const QuantWeight& w) {
    const StoredArray data = stored_data(w);
    add_blob(name + ".data", data.dtype, data.shape, w.data);
    if (is_quantized(w.format))
      add_blob(name + ".scales", DType::f16, {w.rows, w.blocks_per_row()}, w.scales);
    if (w.format == WeightFormat::asym_int4)
      add_blob(name + ".mins", DType::f16, {w.rows, w.blocks_per_row()}, w.mins);
  };
  KS_RETURN_IF_ERROR(for_each_tensor(weights, [&](const TensorInfo& t, const auto& m) -> Status {
    using Member = std::remove_cvref_t<decltype(m)>;
    if constexpr (std::is_same_v<Member, QuantWeight>) {
      add_matrix(t.name, m);
    } else if constexpr (std::is_same_v<Member, Linear>) {
      if (t.tied) return Status::ok();  // the embedding table, stored once
      add_matrix(t.name, m.w);
      if (!m.bias.empty()) add_blob(t.name + ".bias", DType::f32, {m.w.rows}, m.bias);
    } else {
      add_blob(t.name, DType::f32, {m.n}, m.data);
    }
    return Status::ok();
  }));

  const std::map<std::string, std::string> metadata = {
      {kConvertedVersionKey, kConvertedVersion},
      {"kestrel.low_bit", format_name(weights.format)},
      {"kestrel.block", std::to_string(weights.block)},
      {"format", "kestrel"},
  };
  KS_RETURN_IF_ERROR(
      write_safetensors((fs::path(out_dir) / "model.safetensors").string(), tensors, metadata));

  const std::string config_path = (fs::path(out_dir) / "config.json").string();
  std::ofstream config_file(config_path, std::ios::binary | std::ios::trunc);
  config_file << model_config_to_json(weights.config);
  if (!config_file) return Status::error(config_path + ": cannot write");
  config_file.close();
  // A GGUF file's tokenizer and chat template become tokenizer.json and tokenizer_config.json
  // (when the file has a tokenizer Kestrel reads; otherwise the model converts without one).
  if (!source_dir.empty() && has_gguf_magic(source_dir)) {
    KS_ASSIGN_OR_RETURN(const GgufFile gguf, GgufFile::open(source_dir));
    Result<std::string> tokenizer = gguf_tokenizer_json(gguf);
    if (tokenizer.is_ok()) {
      KS_RETURN_IF_ERROR(write_text(fs::path(out_dir) / "tokenizer.json", *tokenizer));
    }
    Result<ChatTemplateConfig> chat = gguf_chat_template(gguf);
    if (chat.is_ok()) {
      nlohmann::ordered_json config = chat->special_tokens;
      config["chat_template"] = chat->template_text;
      KS_RETURN_IF_ERROR(write_text(
          fs::path(out_dir) / "tokenizer_config.json",
          config.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n"));
    }
    return Status::ok();
  }
  // generation_config.json and the tokenizer travel unchanged when the source has them.
  if (!source_dir.empty()) {
    for (const char* name : {"generation_config.json", "tokenizer.json", "tokenizer_config.json",
                             "special_tokens_map.json"}) {
      const fs::path from = fs::path(source_dir) / name;
      if (!fs::exists(from)) continue;
      fs::copy_file(from, fs::path(out_dir) / name, fs::copy_options::overwrite_existing, ec);
      if (ec) return Status::error(from.string() + ": cannot copy: " + ec.message());
    }
  }
  return Status::ok();
}

}  // namespace

}  // namespace kestrel
