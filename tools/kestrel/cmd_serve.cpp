// `kestrel serve`: the OpenAI-compatible HTTP server (src/server/). It listens first, so
// /health answers 503 while the model loads, then serves until SIGTERM or SIGINT: new requests
// get 503, running ones may finish within --shutdown-grace, the rest end with a final event,
// and the process exits 0.
#include <pthread.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "backend/backend.h"
#include "commands.h"
#include "server/metrics.h"
#include "server/scheduler.h"
#if defined(KESTREL_HAVE_SERVER)
#include "server/server.h"
#endif
#include "io/config.h"
#include "runtime/planner.h"
#include "runtime/tensor_parallel.h"
#include "template/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kestrel::cli {

namespace {

struct ServeFlags {
  ModelFlags model;
  std::string tokenizer;
  std::string alias;
  std::string host = "127.0.0.1";
  int port = 8080;
  int64_t parallel = 4;
  int64_t batch_tokens = 512;
  bool batch_given = false;         // -b (llama-server's spelling of --batch-tokens) was given
  bool batch_tokens_given = false;  // --batch-tokens was given
  int64_t max_queue = 64;
  int64_t kv_blocks = 0;
  double kv_memory_fraction = -1;  // unset: 0.9 on a device, 0 (kv_blocks) on the CPU
  int64_t max_tokens = 4096;
  size_t max_body = 4u << 20;
  int timeout = 30;
  double shutdown_grace = 5;
  std::string api_key;
};

void run_serve(ServeFlags flags) {
#if !defined(KESTREL_HAVE_SERVER)
  (void)flags;
  fail(
      "this build has no HTTP server: cpp-httplib (Debian's libcpp-httplib-dev) was not found "
      "when it was configured");
#else
  // Each running or queued request holds an HTTP worker thread, so --parallel and --max-queue
  // are threads as well as slots; --batch-tokens sizes the workspace (at most 2^20). -b is its
  // llama-server spelling: the model flags' -b (run's prompt tokens a call) would be ignored here.
  if (flags.batch_given) {
    if (flags.batch_tokens_given && flags.model.batch != flags.batch_tokens) {
      fail("-b " + std::to_string(flags.model.batch) + " and --batch-tokens " +
           std::to_string(flags.batch_tokens) + " disagree (serve's -b is --batch-tokens)");
    }
    flags.batch_tokens = flags.model.batch;
  }
  check_range("--parallel", double(flags.parallel), 1, 4096);
  check_range("--batch-tokens", double(flags.batch_tokens), 1, 1 << 20);
  if (flags.batch_tokens < flags.parallel) {
    fail("--batch-tokens must be at least --parallel (every running sequence decodes each step)");
  }
  check_range("--max-queue", double(flags.max_queue), 0, 4096);
  check_range("--kv-blocks", double(flags.kv_blocks), 0, double(INT32_MAX));
  if (flags.kv_memory_fraction != -1) {
    check_range("--kv-memory-fraction", flags.kv_memory_fraction, 0, 1);
  }
  if (flags.max_tokens <= 0) fail("--max-tokens must be positive");
  // httplib waits with poll() in milliseconds of an int: a day at most.
  check_range("--timeout", double(flags.timeout), 1, 86400);
  check_range("--shutdown-grace", flags.shutdown_grace, 0, 86400);
  if (flags.port < 0 || flags.port > 65535) fail("--port must be in [0, 65535]");
  std::string tokenizer_source = flags.tokenizer;
  if (tokenizer_source.empty()) {
    if (flags.model.model.rfind("synthetic:", 0) == 0) {
      fail("synthetic models have no tokenizer: pass --tokenizer FILE|DIR");
    }
    tokenizer_source = flags.model.model;
  }

  // Signals are taken by one thread with sigwait; every thread started after this inherits the
  // mask, so SIGTERM never interrupts a worker. A client that hangs up must not kill the server.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  const Tokenizer tokenizer = unwrap(Tokenizer::load(tokenizer_source));
  std::unique_ptr<ChatTemplateConfig> chat_template;
  if (auto loaded = load_chat_template(tokenizer_source); loaded.is_ok()) {
    chat_template = std::make_unique<ChatTemplateConfig>(std::move(loaded).value());
  } else {
    std::fprintf(stderr, "kestrel serve: no chat template (%s); /v1/chat/completions answers 400\n",
                 loaded.status().message().c_str());
  }

  // The model flags are checked (fail() exits) before the server listens: after, the exit would
  // run under its workers, as a failed load's does (below).
  EngineOptions engine_options = flags.model.engine_options();
  engine_options.max_seqs = flags.parallel;
  engine_options.prefill_chunk = flags.batch_tokens;
  engine_options.progress = false;
  engine_options.kv_blocks = flags.kv_blocks;
  // A GPU's memory is there to be used: the pool takes what the weights leave. On the CPU the
  // host's memory is shared with everything else, so the pool holds every slot's full context,
  // unless --max-memory says how much of it the server may take.
  const bool pool_from_memory = engine_options.device != "cpu" || engine_options.max_memory > 0;
  engine_options.kv_memory_fraction = flags.kv_memory_fraction >= 0 ? flags.kv_memory_fraction
                                      : flags.kv_blocks == 0 && pool_from_memory ? 0.9
                                                                                 : 0.0;
  // The backend too is made before the server listens, and a --max-memory the model cannot fit
  // is found from the source's config (Engine::create checks the same before loading).
  std::unique_ptr<Backend> backend =
      unwrap(make_backend(engine_options.device, threads_per_rank(engine_options.threads,
                                                                  engine_options.tensor_parallel)));
  check(check_max_memory(engine_options, *backend));

  server::Metrics metrics;
  server::ServerOptions options;
  options.host = flags.host;
  options.port = flags.port;
  options.api_key = flags.api_key;
  options.model_name = !flags.alias.empty()
                           ? flags.alias
                           : std::filesystem::path(flags.model.model).filename().string();
  if (options.model_name.empty()) options.model_name = flags.model.model;
  options.max_body_bytes = flags.max_body;
  options.max_tokens = flags.max_tokens;
  options.max_queue = flags.max_queue;
  options.slots = flags.parallel;
  options.read_timeout_seconds = flags.timeout;
  options.write_timeout_seconds = flags.timeout;
  server::Server http(options, metrics);
  check(http.start());
  std::fprintf(stderr, "kestrel serve: listening on http://%s:%d (loading %s)\n",
               flags.host.c_str(), http.bound_port(), flags.model.model.c_str());
  std::fflush(stderr);

  auto created = Engine::create(engine_options, std::move(backend));
  if (!created.is_ok()) {
    // fail() exits, and exit() destroys httplib's static objects while its workers may be
    // answering a request (/health, 503 "loading"): they read freed memory (ThreadSanitizer saw
    // it with requests arriving during a load that fails). Stop the workers first.
    http.begin_shutdown();
    http.stop();
    fail(created.status().message());
  }
  auto engine = std::move(created).value();
  print_load_warnings(*engine);
  server::SchedulerOptions scheduler_options;
  scheduler_options.max_queue = flags.max_queue;
  server::Scheduler scheduler(*engine, tokenizer, metrics, scheduler_options);
  scheduler.start();
  server::ServingModel serving;
  serving.engine = engine.get();
  serving.tokenizer = &tokenizer;
  serving.chat_template = chat_template.get();
  serving.scheduler = &scheduler;
  http.attach(serving);
  const std::string within =
      engine_options.max_memory > 0 ? " within " + max_memory_name(engine_options) : "";
  std::fprintf(
      stderr,
      "kestrel serve: ready: %s on %s, %lld slots of up to %lld positions, KV cache of %lld "
      "blocks of %lld positions%s, model name '%s'\n",
      flags.model.model.c_str(), engine->backend().name().c_str(), (long long)flags.parallel,
      (long long)engine->max_context(), (long long)engine->run_shape().pool_blocks(),
      (long long)kKvBlockSize, within.c_str(), options.model_name.c_str());
  std::fflush(stderr);

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  std::fprintf(stderr, "kestrel serve: %s: stopping\n",
               signal_number == SIGINT ? "SIGINT" : "SIGTERM");
  http.begin_shutdown();
  scheduler.shutdown(std::chrono::milliseconds(int64_t(flags.shutdown_grace * 1000)));
  http.stop();
  std::fprintf(stderr, "kestrel serve: stopped\n");
#endif
}

}  // namespace

void add_serve_command(CLI::App& app, std::vector<Command>& commands) {
  auto flags = std::make_shared<ServeFlags>();
  CLI::App* serve =
      app.add_subcommand("serve", "OpenAI-compatible HTTP server with continuous batching");
  flags->model.add_to(serve);
  serve->add_option("--tokenizer", flags->tokenizer,
                    "tokenizer.json or a directory with it (default: the model directory)");
  serve->add_option("--host", flags->host, "address to listen on (default 127.0.0.1)");
  serve->add_option("--port", flags->port, "port (default 8080; 0: any free port)");
  serve->add_option("--parallel", flags->parallel, "sequences generated together (default 4)");
  serve->add_option("--kv-blocks", flags->kv_blocks,
                    "KV cache blocks of 16 positions shared by all requests (default on the "
                    "CPU without --max-memory: every slot's full context)");
  serve->add_option("--kv-memory-fraction", flags->kv_memory_fraction,
                    "size the KV cache to this fraction of the memory the weights leave "
                    "(default 0.9 on a GPU: CUDA or Vulkan; and with --max-memory)");
  CLI::Option* batch_tokens =
      serve->add_option("--batch-tokens", flags->batch_tokens,
                        "tokens per step: decode tokens plus prompt chunks (default 512)");
  serve->get_option("--max-memory")
      ->description(
          "memory the weights, KV cache and workspace may take, e.g. 8GB or 512MiB; the KV cache "
          "takes --kv-memory-fraction of what the weights leave of it, on the CPU too (default: "
          "free device memory, or the host's available memory on the CPU)");
  CLI::Option* batch = serve->get_option("-b");
  batch->description("(llama-server habit) the same as --batch-tokens");
  serve->add_option("--max-queue", flags->max_queue,
                    "requests waiting for a slot before the server answers 429 (default 64)");
  serve->add_option("--max-tokens", flags->max_tokens,
                    "the most tokens one request may generate (default 4096)");
  serve->add_option("--max-body", flags->max_body, "largest request body in bytes (default 4 MiB)");
  serve->add_option("--timeout", flags->timeout,
                    "seconds a read or write of a connection may take (default 30)");
  serve->add_option("--shutdown-grace", flags->shutdown_grace,
                    "seconds running requests may go on after SIGTERM (default 5)");
  serve->add_option("--api-key", flags->api_key, "require Authorization: Bearer KEY");
  serve->add_option("-a,--alias", flags->alias, "model name for /v1/models (default: its path)");
  commands.push_back({serve, [flags, batch, batch_tokens] {
                        flags->batch_given = batch->count() > 0;
                        flags->batch_tokens_given = batch_tokens->count() > 0;
                        run_serve(*flags);
                      }});
}

}  // namespace kestrel::cli
