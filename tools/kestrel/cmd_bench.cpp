// `kestrel bench`: the all-in-one benchmark's YAML and CSV (--config), or a llama-bench style
// quick run (-m MODEL -p 512 -n 128 -b 1,4 -o md|csv|json). Every configuration is planned
// before its weights are built, watched step by step, and written as it ends; see
// src/bench/runner.h.
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <set>
#include <sstream>
#include <thread>

#include "bench/config.h"
#include "bench/profile.h"
#include "bench/prompt.h"
#include "bench/report.h"
#include "bench/runner.h"
#include "commands.h"
#include "core/progress.h"
#include "model/shard.h"
#include "runtime/planner.h"
#include "tokenizer/gguf_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace kestrel::cli {

namespace {

std::atomic<bool> g_stop{false};

std::string executable_path() {
  std::error_code ec;
  const auto path = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string() : path.string();
}

// The commit of the source tree the binary sits in (build/kestrel), with -dirty when it has
// uncommitted changes; "unknown" outside a git checkout.
std::string source_commit(const std::string& executable) {
  if (executable.empty()) return "unknown";
  const std::string dir = std::filesystem::path(executable).parent_path().string();
  const std::string command =
      "git -C '" + dir + "' describe --always --dirty --abbrev=12 2>/dev/null";
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return "unknown";
  char buffer[128] = {};
  std::string text;
  if (std::fgets(buffer, sizeof(buffer), pipe) != nullptr) text = buffer;
  pclose(pipe);
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  return text.empty() ? "unknown" : text;
}

// "1,4,16" -> {1, 4, 16}; each a positive integer up to `max_value` (`why` says where that limit
// comes from), none given twice.
std::vector<int64_t> parse_counts(const std::string& text, const std::string& flag,
                                  int64_t max_value, const std::string& why = "") {
  std::vector<int64_t> values;
  std::set<int64_t> seen;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    size_t used = 0;
    long long value = 0;
    try {
      value = std::stoll(item, &used);
    } catch (...) {
      used = 0;
    }
    if (used == 0 || used != item.size() || value <= 0) {
      fail(flag + ": '" + item + "' is not a positive integer (expected e.g. 1,4,16)");
    }
    if (value > max_value) {
      fail(flag + ": " + item + " is past the limit of " + std::to_string(max_value) + why);
    }
    if (!seen.insert(value).second) fail(flag + ": " + item + " is given twice");
    values.push_back(value);
  }
  if (values.empty()) fail(flag + ": no values given");
  return values;
}

struct BenchFlags {
  std::string config;
  std::string model;
  std::string output;
  std::string device = "auto";
  std::string max_memory;
  std::string low_bit;
  std::string kv_cache = "auto";
  int block = 32;
  int threads = 0;
  int tensor_parallel = 1;
  std::string prompt_lengths = "512";
  std::string gen_lengths = "128";
  std::string batches = "1";
  int repetitions = 3;
  int64_t prefill_chunk = 0;
  double roofline_gbs = 0;
  double deadline_factor = 10;
  double step_timeout = 0;
  double hang_grace = 30;
  std::string prompt_file;
  std::string commit;
  bool quiet = false;
  bool max_memory_given = false;
  bool roofline_given = false;
  bool tensor_parallel_given = false;
};

class BenchCommand {
 public:
  explicit BenchCommand(const BenchFlags& flags) : flags_(flags) {}

  void run() {
    if (flags_.config.empty() == flags_.model.empty()) {
      fail("bench: give either --config FILE.yaml or -m MODEL");
    }
    // Reservations of 1 MiB and more come straight from mmap and go back to the system when
    // freed, so one configuration's buffers never linger in the next one's measured peak.
    mallopt(M_MMAP_THRESHOLD, 1 << 20);
    // Ctrl-C asks the run to stop before its next step; a second Ctrl-C ends it at once.
    catch_sigint(&g_stop, /*once=*/true);
    tty_ = isatty(STDERR_FILENO) != 0;
    if (flags_.config.empty()) {
      run_quick();
    } else {
      run_config();
    }
  }

 private:
  bench::RunnerOptions runner_options() {
    bench::RunnerOptions o;
    o.device = flags_.device == "auto" ? default_device() : flags_.device;
    check_range("-t", flags_.threads, 0, kMaxThreads);
    o.threads = flags_.threads;
    o.kv_cache = unwrap(parse_kv_cache(flags_.kv_cache), "--kv-cache");
    check_range("--tensor-parallel", flags_.tensor_parallel, 1, kMaxTensorParallel);
    o.tensor_parallel = flags_.tensor_parallel;
    if (flags_.max_memory_given) {
      o.max_memory = parse_max_memory(flags_.max_memory);
      o.max_memory_text = flags_.max_memory;
    }
    // 0 (the default): the device's own chunk.
    check_range("--prefill-chunk", double(flags_.prefill_chunk), 0, 1 << 20);
    // 0 (the default) means the device's own figure; given, it must be a bandwidth (a
    // denormal one printed "inf%").
    if (flags_.roofline_given) check_range("--roofline-gbs", flags_.roofline_gbs, 0.1, 1e6);
    check_range("--deadline-factor", flags_.deadline_factor, 0, 1e6, true);
    check_range("--step-timeout", flags_.step_timeout, 0, 1e7);
    check_range("--hang-grace", flags_.hang_grace, 0, 1e7, true);
    o.roofline_gbs = flags_.roofline_gbs;
    o.prefill_chunk = flags_.prefill_chunk;
    o.block = flags_.block;
    o.deadline_factor = flags_.deadline_factor;
    o.step_timeout_s = flags_.step_timeout;
    o.hang_grace_s = flags_.hang_grace;
    const std::string executable = executable_path();
    o.commit = flags_.commit.empty() ? source_commit(executable) : flags_.commit;
    const std::string prompt_path =
        flags_.prompt_file.empty() ? bench::default_prompt_path(executable) : flags_.prompt_file;
    o.prompt_text = unwrap(bench::load_prompt_text(prompt_path));
    // A model directory with a tokenizer gets real prompt tokens, with the special tokens its
    // tokenizer adds (Llama 3's <|begin_of_text|>), as the all-in-one benchmark encodes them.
    o.tokenizer_for = [](const std::string& source) -> Result<bench::Tokenize> {
      if (source.rfind("synthetic:", 0) == 0 ||
          (!gguf_has_tokenizer(source) &&
           !std::filesystem::exists(std::filesystem::path(source) / "tokenizer.json"))) {
        return bench::Tokenize();
      }
      KS_ASSIGN_OR_RETURN(Tokenizer tokenizer, Tokenizer::load(source));
      return bench::Tokenize([tokenizer](const std::string& text) {
        return tokenizer.encode(text, /*add_special_tokens=*/true);
      });
    };
    o.stop = &g_stop;
    return o;
  }

  void say(const std::string& line) {
    // On a terminal the progress bar owns the current line: clear it, print, let it redraw.
    std::fprintf(stderr, "%s%s\n", tty_ ? "\r\033[K" : "", line.c_str());
    std::fflush(stderr);
  }

  void say_roofline(const bench::Runner& runner) {
    if (flags_.quiet) return;
    const Roofline& r = runner.roofline();
    const MatrixRate& m = runner.matrix_rate();
    char text[512];
    std::snprintf(text, sizeof(text), "roofline: %.0f GB/s (%s)", r.bandwidth_gbs,
                  r.source.c_str());
    say(text);
    if (m.tflops > 0) {
      std::snprintf(text, sizeof(text), "matrix rate, integer formats: %.3g TFLOP/s (%s)", m.tflops,
                    m.source.c_str());
    } else {
      std::snprintf(text, sizeof(text), "matrix rate: unknown (%s); prompt rows print no %%",
                    m.source.empty() ? "none" : m.source.c_str());
    }
    say(text);
  }

  // A hung step cannot be cancelled: say so in one line and end the process at once.
  [[noreturn]] void report_hang(const bench::CaseResult& result, const std::string& note) {
    std::string status = result.status;
    if (status.rfind("error: ", 0) == 0) status.erase(0, 7);  // the CSV column's prefix
    say("kestrel: error: " + status + note);
    std::_Exit(3);
  }

  static std::string describe(const bench::CaseResult& r, double roofline_gbs) {
    char text[512];
    if (!r.ok) return r.status;
    if (!r.has_next_token) {
      std::snprintf(text, sizeof(text), "ok, first token %.1f ms, peak %s (planned %s)",
                    r.first_token_ms, format_bytes(r.peak_bytes).c_str(),
                    format_bytes(r.planned_bytes).c_str());
      return text;
    }
    std::snprintf(text, sizeof(text),
                  "ok, first token %.1f ms, next %.2f ms/token, %.2f tok/s, %.1f GB/s (%.1f%% of "
                  "%.0f GB/s), peak %s (planned %s)",
                  r.first_token_ms, r.next_token_ms, r.decode_tps, r.achieved_gbs, r.roofline_pct,
                  roofline_gbs, format_bytes(r.peak_bytes).c_str(),
                  format_bytes(r.planned_bytes).c_str());
    return text;
  }

  static std::string case_label(const bench::BenchCase& c) {
    return c.model + " " + bench::InOut{c.in_len, c.out_len}.text() + " batch " +
           std::to_string(c.batch_size) +
           (c.num_beams > 1 ? " beams " + std::to_string(c.num_beams) : "");
  }

  // Runs `cases` with a progress bar; `on_result` sees each result as it ends. Returns whether
  // Ctrl-C stopped the run.
  bool run_cases(bench::Runner& runner, const std::vector<bench::BenchCase>& cases,
                 const std::function<void(const bench::CaseResult&)>& on_result) {
    double total = 0;
    for (const auto& c : cases) total += runner.expected_seconds(c);
    // Progress counts expected milliseconds of the device profile, so the ETA weighs prefill
    // and decode by their cost.
    // Clamped: a run of huge rows (each refused later by its plan) would overflow the units.
    Progress progress("bench", int64_t(std::clamp(std::ceil(total * 1e3), 1.0, 1e15)),
                      !flags_.quiet);
    double carried = 0;
    progress_ = [&](double seconds) {
      carried += seconds * 1e3;
      const int64_t whole = int64_t(carried);
      carried -= double(whole);
      if (whole > 0) progress.advance(whole);
    };
    for (size_t i = 0; i < cases.size(); ++i) {
      if (g_stop.load()) return true;
      const std::string label = "[" + std::to_string(i + 1) + "/" + std::to_string(cases.size()) +
                                "] " + case_label(cases[i]);
      if (!tty_ && !flags_.quiet) say(label + ": running");
      const bench::CaseResult result = runner.run(cases[i]);
      on_result(result);
      say(label + ": " + describe(result, runner.roofline_gbs()));
      if (result.interrupted) return true;
    }
    progress.finish();
    return g_stop.load();
  }

  void run_config() {
    const bench::BenchConfig config = unwrap(bench::load_bench_config(flags_.config));
    for (const std::string& key : config.ignored_keys) {
      say("kestrel bench: note: " + flags_.config + ": '" + key +
          "' is an all-in-one benchmark key with no meaning here; ignored");
    }
    std::vector<std::string> excluded;
    const std::vector<bench::BenchCase> cases = bench::expand_cases(config, &excluded);
    for (const std::string& what : excluded) say("kestrel bench: excluded by the config: " + what);

    bench::RunnerOptions options = runner_options();
    if (config.tensor_parallel > 0) {
      if (flags_.tensor_parallel_given && flags_.tensor_parallel != config.tensor_parallel) {
        fail("bench: --tensor-parallel " + std::to_string(flags_.tensor_parallel) + " and " +
             flags_.config + "'s tensor_parallel: " + std::to_string(config.tensor_parallel) +
             " disagree");
      }
      options.tensor_parallel = config.tensor_parallel;
    }
    std::unique_ptr<bench::CsvWriter> writer = unwrap(bench::CsvWriter::open(flags_.output));
    bench::CsvWriter* csv = writer.get();
    options.on_progress = [this](double seconds) {
      if (progress_) progress_(seconds);
    };
    options.on_hang = [this, csv](const bench::CaseResult& result) {
      const Status written = csv->write(result);
      report_hang(result, written.is_ok() ? "" : " (" + written.message() + ")");
    };
    std::unique_ptr<bench::Runner> runner = unwrap(bench::Runner::create(std::move(options)));
    say_roofline(*runner);

    size_t failed = 0, written = 0;
    const bool stopped = run_cases(*runner, cases, [&](const bench::CaseResult& result) {
      check(csv->write(result));
      ++written;
      if (!result.ok) ++failed;
    });
    const std::string where = csv->path();
    if (stopped) {
      std::fprintf(stderr, "kestrel: error: interrupted; %zu of %zu configurations written to %s\n",
                   written, cases.size(), where.c_str());
      std::exit(130);
    }
    if (failed > 0) {
      fail(std::to_string(failed) + " of " + std::to_string(cases.size()) +
           " configurations failed (see the status column of " + where + ")");
    }
    say("kestrel bench: " + std::to_string(cases.size()) + " configurations written to " + where);
  }

  void run_quick() {
    const std::string format = flags_.output.empty() ? "md" : flags_.output;
    if (format != "md" && format != "csv" && format != "json") {
      fail("-o: with -m the output is a format: md, csv or json (got '" + format + "')");
    }
    check_range("-r", flags_.repetitions, 1, double(bench::kMaxTrials));
    // A ppN test is an N-1 pair, a tgN test a 1-(N+1) pair (below), held to the YAML's limit.
    const std::string positions = " (a test's prompt and generated tokens together are at most " +
                                  std::to_string(bench::kMaxPositions) + " positions)";
    const std::vector<int64_t> prompts =
        parse_counts(flags_.prompt_lengths, "-p", bench::kMaxPositions - 1, positions);
    const std::vector<int64_t> gens =
        parse_counts(flags_.gen_lengths, "-n", bench::kMaxPositions - 2, positions);
    const std::vector<int64_t> batches = parse_counts(flags_.batches, "-b", bench::kMaxBatchSize);
    unwrap(bench::count_cases({batches.size(), prompts.size() + gens.size()}, "-b x (-p + -n)"));
    bench::BenchCase base;
    base.model = flags_.model;
    base.source = flags_.model;
    if (!flags_.low_bit.empty()) {
      base.format = unwrap(parse_format(flags_.low_bit), "--low-bit");
      base.format_explicit = true;
    }
    base.warm_up = 1;
    base.num_trials = flags_.repetitions;
    // ppN: the prompt's prefill through the first token; tgN: N decode steps after a one-token
    // prompt, as llama-bench measures generation from an empty context.
    std::vector<bench::BenchCase> cases;
    std::vector<std::string> tests;
    for (int64_t batch : batches) {
      for (int64_t p : prompts) {
        bench::BenchCase c = base;
        c.batch_size = batch;
        c.in_len = p;
        c.out_len = 1;
        cases.push_back(c);
        tests.push_back("pp" + std::to_string(p));
      }
      for (int64_t n : gens) {
        bench::BenchCase c = base;
        c.batch_size = batch;
        c.in_len = 1;
        c.out_len = n + 1;
        cases.push_back(c);
        tests.push_back("tg" + std::to_string(n));
      }
    }

    bench::RunnerOptions options = runner_options();
    options.on_progress = [this](double seconds) {
      if (progress_) progress_(seconds);
    };
    options.on_hang = [this](const bench::CaseResult& result) { report_hang(result, ""); };
    std::unique_ptr<bench::Runner> runner = unwrap(bench::Runner::create(std::move(options)));
    say_roofline(*runner);
    const WeightSpec spec =
        unwrap(weight_spec_of(base.source, base.format, base.format_explicit, flags_.block));
    const ModelConfig& m = spec.config;
    const double params = double(layer_matrix_params(m)) + double(m.vocab_size * m.hidden_size) *
                                                               (m.tie_word_embeddings ? 1.0 : 2.0);
    const int threads = flags_.threads > 0 ? flags_.threads
                                           : int(std::max(1u, std::thread::hardware_concurrency()));

    std::vector<bench::QuickRow> rows;
    size_t failed = 0;
    const bool stopped = run_cases(*runner, cases, [&](const bench::CaseResult& r) {
      const size_t i = rows.size();
      bench::QuickRow row;
      row.model = flags_.model;
      row.low_bit = format_name(spec.format);
      row.size_gib = double(planned_weight_bytes(spec)) / double(1ull << 30);
      row.params_b = params / 1e9;
      row.backend = r.device;
      row.threads = runner->profile().device == "cpu" ? threads : 0;
      row.batch = r.bench_case.batch_size;
      row.test = tests[i];
      row.ok = r.ok;
      row.status = r.status;
      std::vector<double> rates;
      const bool prompt_test = row.test[0] == 'p';
      if (prompt_test) {
        for (double s : r.trial_first_token_s)
          rates.push_back(double(row.batch * r.bench_case.in_len) / s);
        if (r.ok && r.first_token_ms > 0) {
          const StepCost cost = prefill_cost(spec, r.bench_case.in_len, r.bench_case.in_len, 4);
          row.tflops = cost.flops * double(row.batch) / (r.first_token_ms / 1e3) / 1e12;
          // Against the device's matrix rate, where it has one (MatrixRate): the rate of the
          // integer formats' prefill arithmetic (the CPU's int8 kernels, CUDA's fp16 GEMMs of
          // dequantized weights), so float formats print none.
          const double matrix = runner->matrix_rate().tflops;
          if (matrix > 0 && is_quantized(spec.format))
            row.roofline_pct = row.tflops / matrix * 100.0;
        }
      } else {
        for (double s : r.trial_next_token_s) rates.push_back(double(row.batch) / s);
        if (r.ok) {
          row.gbs = r.achieved_gbs;
          row.roofline_pct = r.roofline_pct;
        }
      }
      double sum = 0, squares = 0;
      for (double v : rates) sum += v;
      row.tps_mean = rates.empty() ? 0 : sum / double(rates.size());
      for (double v : rates) squares += (v - row.tps_mean) * (v - row.tps_mean);
      row.tps_stddev = rates.size() > 1 ? std::sqrt(squares / double(rates.size() - 1)) : 0.0;
      if (!r.ok) ++failed;
      rows.push_back(row);
    });
    std::fputs(unwrap(bench::render_quick(rows, format)).c_str(), stdout);
    std::fflush(stdout);
    if (stopped) {
      std::fprintf(stderr, "kestrel: error: interrupted after %zu of %zu tests\n", rows.size(),
                   cases.size());
      std::exit(130);
    }
    if (failed > 0)
      fail(std::to_string(failed) + " of " + std::to_string(cases.size()) + " tests failed");
  }

  const BenchFlags& flags_;
  bool tty_ = false;
  std::function<void(double)> progress_;
};

}  // namespace

void add_bench_command(CLI::App& app, std::vector<Command>& commands) {
  auto flags = std::make_shared<BenchFlags>();
  CLI::App* bench = app.add_subcommand(
      "bench", "benchmark: --config FILE.yaml (all-in-one CSV) or -m MODEL (llama-bench style)");
  bench->add_option("--config", flags->config, "all-in-one style YAML configuration");
  bench->add_option("-m,--model", flags->model,
                    "quick mode: HF model dir, converted dir, GGUF file or synthetic:NAME");
  bench->add_option("-o,--output", flags->output,
                    "--config: the CSV file (default: standard output); -m: md, csv or json");
  bench
      ->add_option("--device", flags->device,
                   "cpu, cuda, vulkan[:N], or auto: cuda when built in and present, else cpu")
      ->capture_default_str();
  bench->add_option(
      "--max-memory", flags->max_memory,
      "memory a configuration may plan for, e.g. 24GB or 512MiB (default: free memory)");
  bench->add_option("--low-bit", flags->low_bit, "quick mode weight format (default sym_int4)");
  bench->add_option("--block", flags->block, "weights per scale for quantized formats (32 or 64)");
  bench
      ->add_option("--kv-cache", flags->kv_cache,
                   "KV cache entries on CUDA: fp16, fp8, fp32, or auto (fp32 for fp32 weights, "
                   "else fp16); the CPU and Vulkan keep fp32")
      ->capture_default_str();
  bench->add_option("-t,--threads", flags->threads, "CPU threads (0: all)");
  bench->add_option("--tensor-parallel", flags->tensor_parallel,
                    "(-tp N) split each model over N ranks (devices, or groups of CPU threads)");
  bench->add_option("-p,--n-prompt", flags->prompt_lengths,
                    "quick mode prompt lengths, e.g. 512 or 128,512");
  bench->add_option("-n,--n-gen", flags->gen_lengths, "quick mode generated tokens, e.g. 128");
  bench->add_option("-b,--batch-size", flags->batches,
                    "quick mode sequences decoded together (copies of the prompt), e.g. 1,4");
  bench->add_option("-r,--repetitions", flags->repetitions, "quick mode trials after one warm-up");
  bench->add_option("--prefill-chunk", flags->prefill_chunk,
                    "prompt tokens per forward call, several prompts packed into one (default: "
                    "16384 on CUDA, else 512); the planner halves it to fit memory");
  bench->add_option("--roofline-gbs", flags->roofline_gbs,
                    "memory bandwidth roofline in GB/s (default: measured once per run: the "
                    "CPU's read bandwidth with -t threads, a GPU's device copy; the prompt "
                    "rows' matrix rate is measured or known apart)");
  bench->add_option("--deadline-factor", flags->deadline_factor,
                    "watchdog: a step's deadline is this times its expected time plus a floor");
  bench->add_option("--step-timeout", flags->step_timeout,
                    "watchdog: a fixed deadline in seconds for every step instead");
  bench->add_option("--hang-grace", flags->hang_grace,
                    "watchdog: seconds past its deadline before a step counts as hung and the run "
                    "stops (its row written)");
  bench->add_option("--prompt-file", flags->prompt_file, "prompt text (default: bench/prompt.txt)");
  bench->add_option("--commit", flags->commit,
                    "the commit column (default: git describe of the build's tree)");
  bench->add_flag("-q,--quiet", flags->quiet, "no progress output");
  CLI::Option* max_memory = bench->get_option("--max-memory");
  CLI::Option* roofline = bench->get_option("--roofline-gbs");
  CLI::Option* tensor_parallel = bench->get_option("--tensor-parallel");
  commands.push_back({bench, [flags, max_memory, roofline, tensor_parallel] {
                        flags->max_memory_given = max_memory->count() > 0;
                        flags->roofline_given = roofline->count() > 0;
                        flags->tensor_parallel_given = tensor_parallel->count() > 0;
                        BenchCommand(*flags).run();
                      }});
}

}  // namespace kestrel::cli
