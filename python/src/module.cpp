// kestrel._kestrel: the Python binding of Kestrel's public C++ API (include/kestrel/). It stays
// thin: argument names, defaults and input types in the transformers style are handled by the
// Python package (python/kestrel/); this file converts types, releases the GIL around model work
// and turns a failed Status into kestrel.KestrelError with the library's message.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kestrel/engine.h"
#include "kestrel/generate.h"
#include "kestrel/text.h"

namespace py = pybind11;

namespace {

// Created at import; every library error is raised as this type.
PyObject* g_kestrel_error = nullptr;

[[noreturn]] void raise(const kestrel::Status& status) {
  PyErr_SetString(g_kestrel_error, status.message().c_str());
  throw py::error_already_set();
}

void check(const kestrel::Status& status) {
  if (!status.is_ok()) raise(status);
}

template <typename T>
T unwrap(kestrel::Result<T> result) {
  if (!result.is_ok()) raise(result.status());
  return std::move(result).value();
}

// A float32 array [rows, cols] that owns `values` without copying them.
py::array_t<float> to_numpy(std::vector<float> values, int64_t rows, int64_t cols) {
  auto* owned = new std::vector<float>(std::move(values));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<float>*>(p); });
  return py::array_t<float>({rows, cols}, {cols * int64_t(sizeof(float)), int64_t(sizeof(float))},
                            owned->data(), owner);
}

class PyEngine {
 public:
  PyEngine(const std::string& model, const std::optional<std::string>& low_bit, int block,
           const std::string& device, int threads, int64_t max_context, int64_t max_seqs,
           int64_t prefill_chunk, bool progress, std::optional<bool> run_ahead, size_t max_memory,
           const std::string& max_memory_text) {
    kestrel::EngineOptions options;
    options.model = model;
    if (low_bit) options.format = unwrap(kestrel::parse_format(*low_bit));
    options.block = block;
    options.device = device;
    options.threads = threads;
    options.max_context = max_context;
    options.max_seqs = max_seqs;
    options.prefill_chunk = prefill_chunk;
    options.progress = progress;
    options.run_ahead = run_ahead;
    options.max_memory = max_memory;
    options.max_memory_text = max_memory_text;
    kestrel::Result<std::unique_ptr<kestrel::Engine>> engine = kestrel::Status::ok();
    {
      py::gil_scoped_release release;
      engine = kestrel::Engine::create(options);
    }
    engine_ = unwrap(std::move(engine));
  }

  py::dict info() const {
    const kestrel::ModelInfo i = engine_->info();
    py::dict d;
    d["architecture"] = i.architecture;
    d["vocab_size"] = i.vocab_size;
    d["hidden_size"] = i.hidden_size;
    d["num_hidden_layers"] = i.n_layers;
    d["num_attention_heads"] = i.n_heads;
    d["num_key_value_heads"] = i.n_kv_heads;
    d["head_dim"] = i.head_dim;
    d["max_position_embeddings"] = i.max_position_embeddings;
    d["intermediate_size"] = i.intermediate_size;
    d["rms_norm_eps"] = i.rms_norm_eps;
    d["rope_theta"] = i.rope_theta;
    d["tie_word_embeddings"] = i.tie_word_embeddings;
    d["bos_token_id"] = i.bos_token_id;
    d["eos_token_ids"] = i.eos_token_ids;
    d["low_bit"] = std::string(kestrel::format_name(i.format));
    d["weight_bytes"] = i.weight_bytes;
    d["backend"] = i.backend;
    return d;
  }

  // What the load went past or changed (the CLI prints them as "kestrel: warning: ..."): the
  // package gives each to Python's warnings.
  std::vector<std::string> load_warnings() const { return engine_->info().warnings; }

  int64_t max_context() const { return engine_->max_context(); }
  int64_t max_seqs() const { return engine_->run_shape().max_seqs; }
  bool runs_ahead() const { return engine_->runs_ahead(); }

  // Ctrl-C sets a flag that only the interpreter's main thread acts on: called between the
  // chunks of a long prompt and at every step (without the GIL), this asks for it, keeping the
  // KeyboardInterrupt.
  static kestrel::Status check_signals(std::optional<py::error_already_set>& error) {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() == 0) return kestrel::Status::ok();
    error.emplace();
    return kestrel::Status::error("stopped by Python");
  }

  // Makes room for `n` sequences decoded together (their KV cache slots and decode batch).
  void reserve_sequences(int64_t n) {
    kestrel::RunShape shape = engine_->run_shape();
    if (n <= shape.max_seqs && n <= shape.max_batch_tokens && n <= shape.max_logit_rows) return;
    shape.max_seqs = std::max(shape.max_seqs, n);
    shape.max_batch_tokens = std::max(shape.max_batch_tokens, n);
    shape.max_logit_rows = std::max(shape.max_logit_rows, n);
    kestrel::Status status;
    {
      py::gil_scoped_release release;
      status = engine_->reserve(shape);
    }
    check(status);
  }

  py::array_t<float> prompt_logits(const std::vector<int32_t>& ids) {
    kestrel::Result<std::vector<float>> logits = kestrel::Status::ok();
    std::optional<py::error_already_set> interrupted;
    {
      py::gil_scoped_release release;
      logits = engine_->prompt_logits(ids, 0, [&] { return check_signals(interrupted); });
    }
    if (interrupted) throw std::move(*interrupted);
    const int64_t vocab = engine_->info().vocab_size;
    return to_numpy(unwrap(std::move(logits)), int64_t(ids.size()), vocab);
  }

  // Returns (tokens per prompt, stop reason names, statistics). `on_step` (or None) is called
  // with each step's tokens (-1 for a finished prompt); Ctrl-C and an exception raised by it stop
  // generation and propagate.
  py::tuple generate(const std::vector<std::vector<int32_t>>& prompts, int64_t max_new_tokens,
                     int64_t min_new_tokens, float temperature, int top_k, float top_p, float min_p,
                     float repetition_penalty, uint64_t seed,
                     const std::vector<int32_t>& eos_token_ids, bool stop_at_eos,
                     const py::object& on_step) {
    kestrel::TokenGenerationParams params;
    params.sampling.temperature = temperature;
    params.sampling.top_k = top_k;
    params.sampling.top_p = top_p;
    params.sampling.min_p = min_p;
    params.sampling.repetition_penalty = repetition_penalty;
    params.sampling.seed = seed;
    params.max_new_tokens = max_new_tokens;
    params.min_new_tokens = min_new_tokens;
    params.eos_token_ids = eos_token_ids;
    params.stop_at_eos = stop_at_eos;

    std::optional<py::error_already_set> python_error;
    params.between_prefill_calls = [&] { return check_signals(python_error); };
    const bool has_callback = !on_step.is_none();
    auto step = [&](const std::vector<int32_t>& tokens) -> kestrel::Status {
      KS_RETURN_IF_ERROR(check_signals(python_error));
      if (!has_callback) return kestrel::Status::ok();
      py::gil_scoped_acquire gil;
      try {
        on_step(py::cast(tokens));
      } catch (py::error_already_set& e) {
        python_error.emplace(std::move(e));
        return kestrel::Status::error("stopped by Python");
      } catch (const std::exception& e) {
        // A conversion error of pybind11 itself: raised as a Python exception all the same,
        // since no C++ exception may unwind through the library.
        PyErr_SetString(PyExc_RuntimeError, e.what());
        python_error.emplace();
        return kestrel::Status::error("stopped by Python");
      }
      return kestrel::Status::ok();
    };
    std::optional<kestrel::Result<kestrel::TokenGenerationResult>> result;
    {
      py::gil_scoped_release release;
      result.emplace(kestrel::generate_tokens(*engine_, prompts, params, step));
    }
    if (python_error) throw std::move(*python_error);
    kestrel::TokenGenerationResult r = unwrap(std::move(*result));
    py::list reasons;
    for (kestrel::StopReason reason : r.stop_reasons) {
      reasons.append(kestrel::stop_reason_name(reason));
    }
    py::dict stats;
    stats["prefill_seconds"] = r.prefill_seconds;
    stats["decode_seconds"] = r.decode_seconds;
    stats["decode_steps"] = r.decode_steps;
    return py::make_tuple(py::cast(r.tokens), reasons, stats);
  }

  void save_converted(const std::string& out_dir, bool replace_existing) {
    kestrel::Status status;
    {
      py::gil_scoped_release release;
      status = kestrel::save_converted(*engine_, out_dir, replace_existing);
    }
    check(status);
  }

 private:
  std::unique_ptr<kestrel::Engine> engine_;
};

class PyTokenizer {
 public:
  explicit PyTokenizer(const std::string& path)
      : tokenizer_(unwrap(kestrel::TextTokenizer::load(path))) {}

  std::vector<int32_t> encode(const std::string& text, bool add_special_tokens) const {
    return unwrap(tokenizer_->encode(text, add_special_tokens));
  }

  std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string>& texts,
                                                 bool add_special_tokens) const {
    std::vector<std::vector<int32_t>> out;
    out.reserve(texts.size());
    for (const std::string& text : texts) out.push_back(encode(text, add_special_tokens));
    return out;
  }

  py::str decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
    const std::string text = tokenizer_->decode(ids, skip_special_tokens);
    // decode() gives valid UTF-8 (bad bytes become U+FFFD), so this cannot fail.
    return py::str(text);
  }

  int32_t token_to_id(const std::string& token) const { return tokenizer_->token_to_id(token); }
  std::optional<std::string> id_to_token(int32_t id) const {
    std::string token = tokenizer_->id_to_token(id);
    if (token.empty()) return std::nullopt;
    return token;
  }
  size_t size() const { return tokenizer_->vocab_size(); }
  bool is_special(int32_t id) const { return tokenizer_->is_special(id); }
  bool has_chat_template() const { return tokenizer_->has_chat_template(); }
  std::string render_chat_json(const std::string& messages_json, bool add_generation_prompt,
                               const std::string& extra_json) const {
    return unwrap(tokenizer_->render_chat_json(messages_json, add_generation_prompt, extra_json));
  }

 private:
  std::unique_ptr<kestrel::TextTokenizer> tokenizer_;
};

}  // namespace

PYBIND11_MODULE(_kestrel, m) {
  m.doc() = "Kestrel's C++ engine (use the kestrel package, not this module)";
  g_kestrel_error = PyErr_NewExceptionWithDoc(
      "kestrel.KestrelError", "An error reported by Kestrel's engine, with its message.",
      PyExc_RuntimeError, nullptr);
  m.add_object("KestrelError", py::handle(g_kestrel_error));

  py::class_<PyEngine>(m, "Engine")
      .def(py::init<const std::string&, const std::optional<std::string>&, int, const std::string&,
                    int, int64_t, int64_t, int64_t, bool, std::optional<bool>, size_t,
                    const std::string&>(),
           py::arg("model"), py::arg("low_bit"), py::arg("block"), py::arg("device"),
           py::arg("threads"), py::arg("max_context"), py::arg("max_seqs"),
           py::arg("prefill_chunk"), py::arg("progress"), py::arg("run_ahead") = py::none(),
           py::arg("max_memory") = 0, py::arg("max_memory_text") = "")
      .def("info", &PyEngine::info)
      .def_property_readonly("load_warnings", &PyEngine::load_warnings)
      .def_property_readonly("max_context", &PyEngine::max_context)
      .def_property_readonly("max_seqs", &PyEngine::max_seqs)
      .def_property_readonly("runs_ahead", &PyEngine::runs_ahead)
      .def("reserve_sequences", &PyEngine::reserve_sequences, py::arg("n"))
      .def("prompt_logits", &PyEngine::prompt_logits, py::arg("ids"))
      .def("generate", &PyEngine::generate, py::arg("prompts"), py::arg("max_new_tokens"),
           py::arg("min_new_tokens"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
           py::arg("min_p"), py::arg("repetition_penalty"), py::arg("seed"),
           py::arg("eos_token_ids"), py::arg("stop_at_eos"), py::arg("on_step"))
      .def("save_converted", &PyEngine::save_converted, py::arg("out_dir"),
           py::arg("replace_existing"));

  // For from_pretrained's checks: the device "auto" loads on, and max_memory's sizes read as the
  // CLI reads --max-memory (a ValueError with the library's words; the package names the
  // argument).
  m.def("default_device", &kestrel::default_device);
  m.def(
      "parse_max_memory",
      [](const std::string& text) {
        kestrel::Result<size_t> bytes = kestrel::parse_max_memory(text);
        if (!bytes.is_ok()) throw py::value_error(bytes.status().message());
        return bytes.value();
      },
      py::arg("text"));

  py::class_<PyTokenizer>(m, "Tokenizer")
      .def(py::init<const std::string&>(), py::arg("path"))
      .def("encode", &PyTokenizer::encode, py::arg("text"), py::arg("add_special_tokens"))
      .def("encode_batch", &PyTokenizer::encode_batch, py::arg("texts"),
           py::arg("add_special_tokens"))
      .def("decode", &PyTokenizer::decode, py::arg("ids"), py::arg("skip_special_tokens"))
      .def("token_to_id", &PyTokenizer::token_to_id, py::arg("token"))
      .def("id_to_token", &PyTokenizer::id_to_token, py::arg("id"))
      .def("__len__", &PyTokenizer::size)
      .def("is_special", &PyTokenizer::is_special, py::arg("id"))
      .def("has_chat_template", &PyTokenizer::has_chat_template)
      .def("render_chat_json", &PyTokenizer::render_chat_json, py::arg("messages_json"),
           py::arg("add_generation_prompt"), py::arg("extra_json"));
}
