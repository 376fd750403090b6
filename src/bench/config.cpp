#include "bench/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/quote.h"
#include "io/config.h"
#include "model/shard.h"

namespace kestrel::bench {

namespace {

namespace fs = std::filesystem;

constexpr const char* kKnownKeys[] = {"repo_id",   "local_model_hub", "warm_up",    "num_trials",
                                      "num_beams", "low_bit",         "batch_size", "in_out_pairs",
                                      "exclude",   "tensor_parallel"};
// Keys of the all-in-one benchmark that select its Python APIs and options; Kestrel's device
// comes from --device and the rest has no counterpart.
constexpr const char* kAllInOneOnlyKeys[] = {"test_api",
                                             "cpu_embedding",
                                             "streaming",
                                             "use_fp16_torch_dtype",
                                             "task",
                                             "n_gpu",
                                             "group_size",
                                             "lookahead",
                                             "max_matching_ngram_size",
                                             "transpose_value_cache",
                                             "optimize_model",
                                             "save_model",
                                             "deepspeed_optimize_model"};

template <size_t N>
bool contains(const char* const (&list)[N], const std::string& key) {
  return std::find_if(std::begin(list), std::end(list), [&](const char* k) { return key == k; }) !=
         std::end(list);
}

std::string known_keys() {
  std::string text;
  for (const char* key : kKnownKeys) text += (text.empty() ? "" : ", ") + std::string(key);
  return text;
}

// Parses a whole decimal integer (no sign, no trailing text).
bool parse_count(const std::string& text, int64_t* value) {
  if (text.empty() || text.size() > 18) return false;
  int64_t v = 0;
  for (char ch : text) {
    if (ch < '0' || ch > '9') return false;
    v = v * 10 + (ch - '0');
  }
  *value = v;
  return true;
}

class KeyReader {
 public:
  KeyReader(const std::string& path, const std::string& key) : where_(path + ": " + key) {}

  Result<std::string> string(const YAML::Node& node) const {
    if (!node.IsScalar()) return Status::error(where_ + " must be a string");
    return node.Scalar();
  }

  Result<int64_t> integer(const YAML::Node& node, int64_t min_value, int64_t max_value) const {
    int64_t value = 0;
    if (!node.IsScalar() || !parse_count(node.Scalar(), &value) || value < min_value ||
        value > max_value) {
      return Status::error(where_ + " must be an integer from " + std::to_string(min_value) +
                           " to " + std::to_string(max_value) +
                           (node.IsScalar() ? ", got " + quote_untrusted(node.Scalar(), 40) : ""));
    }
    return value;
  }

  // A scalar or a list of scalars, as strings.
  Result<std::vector<std::string>> strings(const YAML::Node& node) const {
    std::vector<std::string> values;
    if (node.IsNull()) return values;
    if (node.IsScalar()) {
      values.push_back(node.Scalar());
      return values;
    }
    if (!node.IsSequence()) return Status::error(where_ + " must be a string or a list of them");
    for (const YAML::Node& item : node) {
      if (!item.IsScalar()) return Status::error(where_ + " must be a list of strings");
      values.push_back(item.Scalar());
    }
    return values;
  }

  const std::string& where() const { return where_; }

 private:
  std::string where_;
};

// A list that names an item twice would run (or exclude) it twice; the error names the first.
std::string twice(const std::string& where, const std::string& item) {
  return where + " lists " + quote_untrusted(item, 60) + " twice";
}

Status check_unique(const std::vector<std::string>& items, const std::string& where) {
  std::set<std::string> seen;
  for (const std::string& item : items) {
    if (!seen.insert(item).second) return Status::error(twice(where, item));
  }
  return Status::ok();
}

}  // namespace

std::string InOut::text() const {
  return std::to_string(in_len) + "-" + std::to_string(out_len);
}

Result<InOut> parse_in_out(const std::string& text) {
  const size_t dash = text.find('-');
  const std::string in = dash == std::string::npos ? text : text.substr(0, dash);
  const std::string out = dash == std::string::npos ? std::string() : text.substr(dash + 1);
  const auto digits = [](const std::string& s) {
    return !s.empty() &&
           std::all_of(s.begin(), s.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
  };
  const std::string too_long = quote_untrusted(text, 60) + ": IN + OUT must be at most " +
                               std::to_string(kMaxPositions) + " positions";
  // Counts of more digits than parse_count takes are far past the limit, not malformed.
  if (digits(in) && digits(out) && (in.size() > 18 || out.size() > 18)) {
    return Status::error(too_long);
  }
  InOut pair;
  if (dash == std::string::npos || !parse_count(in, &pair.in_len) ||
      !parse_count(out, &pair.out_len) || pair.in_len <= 0 || pair.out_len <= 0) {
    return Status::error(quote_untrusted(text, 60) +
                         " is not an IN-OUT pair of positive token counts, e.g. '1024-128'");
  }
  // Both are below 10^18: the sum cannot overflow.
  if (pair.in_len + pair.out_len > kMaxPositions) return Status::error(too_long);
  return pair;
}

Result<int64_t> count_cases(const std::vector<size_t>& sizes, const std::string& what) {
  int64_t count = 1;
  bool over = false;
  std::string product;
  for (size_t size : sizes) {
    product += (product.empty() ? "" : " x ") + std::to_string(size);
    int64_t next = 0;
    if (over || size > size_t(kMaxCases) || __builtin_mul_overflow(count, int64_t(size), &next) ||
        next > kMaxCases) {
      over = true;
    } else {
      count = next;
    }
  }
  if (over) {
    return Status::error(what + ": " + product + " configurations, past the limit of " +
                         std::to_string(kMaxCases));
  }
  return count;
}

Result<BenchConfig> parse_bench_config(const std::string& text, const std::string& path) {
  if (text.size() > kMaxBenchConfigBytes) {
    return Status::error(path + ": " + std::to_string(text.size()) + " bytes is larger than the " +
                         std::to_string(kMaxBenchConfigBytes >> 20) +
                         " MiB limit for a benchmark configuration");
  }
  std::vector<YAML::Node> documents;
  try {
    documents = YAML::LoadAll(text);
  } catch (const YAML::Exception& e) {
    return Status::error(path + ":" + std::to_string(e.mark.line + 1) + ":" +
                         std::to_string(e.mark.column + 1) + ": not valid YAML: " + e.msg);
  }
  // YAML::Load would read the first document and drop the rest without a word.
  if (documents.size() > 1) {
    return Status::error(path + ": holds " + std::to_string(documents.size()) +
                         " YAML documents (separated by ---); a benchmark configuration is one");
  }
  const YAML::Node root = documents.empty() ? YAML::Node() : documents[0];
  if (!root.IsMap()) return Status::error(path + ": expected a mapping of benchmark keys");

  BenchConfig config;
  bool has_in_out = false;
  std::set<std::string> seen;
  try {
    for (const auto& entry : root) {
      const std::string key = entry.first.as<std::string>();
      const YAML::Node& value = entry.second;
      const KeyReader read(path, key);
      // yaml-cpp keeps both entries of a repeated key; which one wins would be silent.
      if (!seen.insert(key).second) {
        return Status::error(path + ": key " + quote_untrusted(key, 60) + " is given twice");
      }
      if (key == "repo_id") {
        KS_ASSIGN_OR_RETURN(config.repo_ids, read.strings(value));
        KS_RETURN_IF_ERROR(check_unique(config.repo_ids, read.where()));
      } else if (key == "local_model_hub") {
        if (!value.IsNull()) {
          KS_ASSIGN_OR_RETURN(config.local_model_hub, read.string(value));
        }
      } else if (key == "warm_up") {
        KS_ASSIGN_OR_RETURN(int64_t v, read.integer(value, 0, kMaxTrials));
        config.warm_up = int(v);
      } else if (key == "num_trials") {
        KS_ASSIGN_OR_RETURN(int64_t v, read.integer(value, 1, kMaxTrials));
        config.num_trials = int(v);
      } else if (key == "num_beams") {
        KS_ASSIGN_OR_RETURN(int64_t v, read.integer(value, 1, kMaxBeams));
        config.num_beams = int(v);
      } else if (key == "low_bit") {
        KS_ASSIGN_OR_RETURN(std::string name, read.string(value));
        auto format = parse_format(name);
        if (!format.is_ok()) return format.status().with_context(read.where());
        config.low_bit = *format;
        config.low_bit_given = true;
      } else if (key == "batch_size") {
        config.batch_sizes.clear();
        if (value.IsSequence()) {
          std::set<int64_t> sizes;
          for (const YAML::Node& item : value) {
            KS_ASSIGN_OR_RETURN(int64_t v, read.integer(item, 1, kMaxBatchSize));
            if (!sizes.insert(v).second) return Status::error(twice(read.where(), item.Scalar()));
            config.batch_sizes.push_back(v);
          }
        } else {
          KS_ASSIGN_OR_RETURN(int64_t v, read.integer(value, 1, kMaxBatchSize));
          config.batch_sizes.push_back(v);
        }
        if (config.batch_sizes.empty()) return Status::error(read.where() + " is an empty list");
      } else if (key == "in_out_pairs") {
        KS_ASSIGN_OR_RETURN(std::vector<std::string> pairs, read.strings(value));
        std::set<std::pair<int64_t, int64_t>> distinct;
        for (const std::string& text : pairs) {
          auto pair = parse_in_out(text);
          if (!pair.is_ok()) return pair.status().with_context(read.where());
          if (!distinct.insert({pair->in_len, pair->out_len}).second) {
            return Status::error(twice(read.where(), text));
          }
          config.in_out_pairs.push_back(*pair);
        }
        has_in_out = true;
      } else if (key == "exclude") {
        KS_ASSIGN_OR_RETURN(config.exclude, read.strings(value));
        KS_RETURN_IF_ERROR(check_unique(config.exclude, read.where()));
      } else if (key == "tensor_parallel") {
        KS_ASSIGN_OR_RETURN(int64_t v, read.integer(value, 1, kMaxTensorParallel));
        config.tensor_parallel = int(v);
      } else if (contains(kAllInOneOnlyKeys, key)) {
        config.ignored_keys.push_back(key);
      } else {
        return Status::error(path + ": unknown key " + quote_untrusted(key, 60) +
                             " (known: " + known_keys() + ")");
      }
    }
  } catch (const YAML::Exception& e) {
    return Status::error(path + ":" + std::to_string(e.mark.line + 1) + ": " + e.msg);
  }
  if (config.repo_ids.empty()) return Status::error(path + ": repo_id lists no model");
  if (!has_in_out || config.in_out_pairs.empty()) {
    return Status::error(path + ": in_out_pairs lists no 'IN-OUT' pair");
  }
  auto count =
      count_cases({config.repo_ids.size(), config.batch_sizes.size(), config.in_out_pairs.size()},
                  "repo_id x batch_size x in_out_pairs");
  if (!count.is_ok()) return count.status().with_context(path);
  return config;
}

Result<BenchConfig> load_bench_config(const std::string& path) {
  KS_ASSIGN_OR_RETURN(const std::string text, read_text_file(path, kMaxBenchConfigBytes));
  return parse_bench_config(text, path);
}

std::string model_source(const std::string& repo_id, const std::string& local_model_hub) {
  if (repo_id.rfind("synthetic:", 0) == 0) return repo_id;
  const fs::path path(repo_id);
  std::error_code ec;
  if (path.is_absolute() || fs::is_directory(path, ec) || local_model_hub.empty()) return repo_id;
  // The all-in-one benchmark's rule: the hub folder holds models by their repository name.
  std::string name = repo_id;
  while (!name.empty() && name.back() == '/') name.pop_back();
  const size_t slash = name.rfind('/');
  if (slash != std::string::npos) name = name.substr(slash + 1);
  return (fs::path(local_model_hub) / name).string();
}

std::vector<BenchCase> expand_cases(const BenchConfig& config, std::vector<std::string>* excluded) {
  std::vector<BenchCase> cases;
  // A set: a long exclude list is not walked once per configuration.
  const std::set<std::string> rules(config.exclude.begin(), config.exclude.end());
  auto is_excluded = [&](const std::string& model, const InOut& pair, int64_t batch) {
    const std::string in = model + ":" + std::to_string(pair.in_len);
    const std::string in_batch = in + ":" + std::to_string(batch);
    return rules.count(model) > 0 || rules.count(in) > 0 || rules.count(in_batch) > 0;
  };
  for (const std::string& model : config.repo_ids) {
    for (int64_t batch : config.batch_sizes) {
      for (const InOut& pair : config.in_out_pairs) {
        if (is_excluded(model, pair, batch)) {
          if (excluded != nullptr) {
            excluded->push_back(model + " " + pair.text() + " batch " + std::to_string(batch));
          }
          continue;
        }
        BenchCase c;
        c.model = model;
        c.source = model_source(model, config.local_model_hub);
        c.format = config.low_bit;
        c.format_explicit = config.low_bit_given;
        c.in_len = pair.in_len;
        c.out_len = pair.out_len;
        c.batch_size = batch;
        c.num_beams = config.num_beams;
        c.warm_up = config.warm_up;
        c.num_trials = config.num_trials;
        cases.push_back(c);
      }
    }
  }
  return cases;
}

Result<size_t> parse_size(const std::string& text) {
  // The number: decimal digits with at most one point, nothing else (std::stod alone would take
  // hex, exponents, "inf", a sign and leading spaces).
  size_t used = 0;
  bool point = false, digit = false;
  for (; used < text.size(); ++used) {
    const char ch = text[used];
    if (ch >= '0' && ch <= '9') {
      digit = true;
    } else if (ch == '.' && !point) {
      point = true;
    } else {
      break;
    }
  }
  double value = -1;
  if (digit) {
    try {
      value = std::stod(text.substr(0, used));
    } catch (...) {
      used = 0;
    }
  } else {
    used = 0;
  }
  std::string unit = text.substr(used);
  while (!unit.empty() && unit.front() == ' ') unit.erase(unit.begin());
  std::transform(unit.begin(), unit.end(), unit.begin(),
                 [](unsigned char ch) { return char(std::tolower(ch)); });
  struct Unit {
    const char* name;
    double scale;
  };
  static const Unit kUnits[] = {{"", 1},
                                {"b", 1},
                                {"kb", 1e3},
                                {"mb", 1e6},
                                {"gb", 1e9},
                                {"tb", 1e12},
                                {"kib", 1024.0},
                                {"mib", 1048576.0},
                                {"gib", 1073741824.0},
                                {"tib", 1099511627776.0},
                                {"k", 1024.0},
                                {"m", 1048576.0},
                                {"g", 1073741824.0},
                                {"t", 1099511627776.0}};
  if (used > 0 && std::isfinite(value) && value >= 0) {
    for (const Unit& u : kUnits) {
      if (unit == u.name && value * u.scale < 1.8e19) return size_t(value * u.scale);
    }
  }
  return Status::error("'" + text +
                       "' is not a memory size (e.g. 24GB, 512MiB, 1.5G or a byte count)");
}

}  // namespace kestrel::bench
