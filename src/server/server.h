// The HTTP side of `kestrel serve`: routes, authentication, limits and the server's lifecycle.
// The server listens before the model is loaded (GET /health answers 503 "loading" meanwhile);
// attach() makes the generation routes live. Thread-safe: HTTP workers call into the Scheduler,
// which owns the engine.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "core/status.h"
#include "kestrel/engine.h"
#include "server/metrics.h"
#include "server/scheduler.h"
#include "template/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kestrel::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;         // 0: any free port (bound_port() says which)
  std::string api_key;     // empty: no authentication
  std::string model_name;  // what GET /v1/models lists
  size_t max_body_bytes = 4u << 20;
  int64_t max_tokens = 4096;       // the most one request may generate
  int64_t max_queue = 64;          // requests waiting for a slot before 429
  int64_t slots = 1;               // sequences generated together (sizes the HTTP worker pool)
  int read_timeout_seconds = 30;   // per read of a request (headers and body)
  int write_timeout_seconds = 30;  // per write of a response
  int http_threads = 0;            // 0: slots + max_queue + 8 (room for probes)
};

// What the routes need once the model is loaded; all of it outlives the Server's use of it.
struct ServingModel {
  Engine* engine = nullptr;
  const Tokenizer* tokenizer = nullptr;
  const ChatTemplateConfig* chat_template = nullptr;  // null: /v1/chat/completions answers 400
  Scheduler* scheduler = nullptr;
};

class Server {
 public:
  Server(ServerOptions options, Metrics& metrics);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds the address and starts answering on a background thread.
  Status start();
  int bound_port() const { return port_; }

  // The model is ready: generation routes go live and /health turns 200.
  void attach(const ServingModel& model);
  // New requests get 503 from now on (in-flight ones are the scheduler's to end).
  void begin_shutdown() { shutting_down_.store(true); }
  // Closes the listening socket and waits for the HTTP workers to finish.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::atomic<bool> shutting_down_{false};
  int port_ = 0;
};

// Compares two secrets in time that depends only on their lengths, not on where they differ.
bool constant_time_equal(const std::string& a, const std::string& b);

}  // namespace kestrel::server
