#include "server/server.h"

#include <httplib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <ctime>
#include <random>

#include "core/quote.h"
#include "io/config.h"
#include "server/api.h"
#include "server/chat_page.h"
#include "server/peer.h"

namespace kestrel::server {

using nlohmann::json;

namespace {

void send_json(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(json_text(body), "application/json");
}

void send_error(httplib::Response& res, int status, const std::string& message) {
  send_json(res, status, error_json(status, message));
}

// An error for a request whose body was not read to its end: after the response the connection
// closes, or httplib would read the rest of the body as the next request (and answer a request
// hidden in it). A route cannot ask httplib to close; a content provider that has written the
// whole body and then reports failure ends its keep-alive loop.
void send_error_and_close(httplib::Response& res, int status, const std::string& message) {
  auto body = std::make_shared<std::string>(json_text(error_json(status, message)));
  res.status = status;
  res.set_header("Connection", "close");
  res.set_content_provider(body->size(), "application/json",
                           [body](size_t offset, size_t length, httplib::DataSink& sink) {
                             sink.write(body->data() + offset, length);
                             return false;
                           });
}

std::string random_id(const char* prefix) {
  static std::atomic<uint64_t> counter{0};
  thread_local std::mt19937_64 rng{std::random_device{}()};
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%s%016llx%04llx", prefix, (unsigned long long)rng(),
                (unsigned long long)(counter.fetch_add(1) & 0xffff));
  return buf;
}

// Parses a request body as JSON; the error names where the JSON broke.
Result<json> parse_body(const std::string& body) {
  try {
    return json::parse(body);
  } catch (const json::parse_error& e) {
    return Status::error(std::string("the request body is not valid JSON: ") + e.what());
  }
}

}  // namespace

// Counts a generation request from its admission until its response object is gone. httplib
// stops writing a chunked response as soon as the listening socket closes, so stop() waits for
// this count to reach zero first: the final event of every stream gets out.
class InFlight {
 public:
  explicit InFlight(std::atomic<int64_t>& count) : count_(count) { count_.fetch_add(1); }
  ~InFlight() { count_.fetch_sub(1); }
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;

 private:
  std::atomic<int64_t>& count_;
};

struct Server::Impl {
  ServerOptions options;
  std::atomic<int64_t> in_flight{0};
  Metrics& metrics;
  httplib::Server http;
  std::thread thread;                        // listens and answers (httplib's listen_after_bind)
  std::atomic<bool> listen_returned{false};  // set by `thread` when listen_after_bind returns
  std::atomic<bool> ready{false};
  ServingModel model;
  Server* owner = nullptr;
  int listen_socket = -1;  // the listening socket, once bound

  Impl(ServerOptions o, Metrics& m) : options(std::move(o)), metrics(m) {}

  bool authorized(const httplib::Request& req) const {
    if (options.api_key.empty()) return true;
    const std::string header = req.get_header_value("Authorization");
    const std::string prefix = "Bearer ";
    if (header.compare(0, prefix.size(), prefix) != 0) return false;
    return constant_time_equal(header.substr(prefix.size()), options.api_key);
  }

  // 503 unless the model is loaded and the server is not stopping; true when it answered.
  bool unavailable(httplib::Response& res) const {
    if (owner->shutting_down_.load()) {
      send_error(res, 503, "the server is shutting down");
      return true;
    }
    if (!ready.load()) {
      send_error(res, 503, "the model is loading");
      res.set_header("Retry-After", "1");
      return true;
    }
    return false;
  }

  void routes();
  std::optional<std::string> read_body(const httplib::Request& req, httplib::Response& res,
                                       const httplib::ContentReader& reader);
  void generate(const httplib::Request& req, const std::string& body_text, httplib::Response& res,
                Endpoint endpoint);
  void tokenize(const std::string& body_text, httplib::Response& res);
  void detokenize(const std::string& body_text, httplib::Response& res);
};

// A POST body, read by the route itself (a content reader) so that the server's limit holds for
// every framing: httplib 0.11 checks its payload limit against Content-Length alone, so a
// chunked body, one without a length, or a compressed one (the reader gets it inflated) would
// otherwise be read whole, whatever its size. The route also skips httplib's own 8 KiB limit on
// form-encoded bodies (curl -d's default Content-Type): the body is JSON whatever the header
// says. A refused body closes the connection after the error (send_error_and_close). Past the
// limit the reader first reads, and drops, up to kDrainBytes more: a client still sending when
// the socket closes with unread data gets a reset, which can discard the 413 before it is read.
std::optional<std::string> Server::Impl::read_body(const httplib::Request& req,
                                                   httplib::Response& res,
                                                   const httplib::ContentReader& reader) {
  if (req.is_multipart_form_data()) {
    send_error_and_close(res, 415,
                         "the request body must be JSON (Content-Type: application/json)");
    return std::nullopt;
  }
  constexpr size_t kDrainBytes = 1u << 20;
  const size_t limit = options.max_body_bytes;
  std::string body;
  size_t dropped = 0;
  const bool read = reader([&](const char* data, size_t n) {
    if (dropped == 0 && n <= limit - body.size()) {
      body.append(data, n);
      return true;
    }
    dropped += n;
    return dropped <= kDrainBytes;
  });
  // httplib sets 413 itself for a Content-Length past its own limit (the same one).
  if (dropped > 0 || (!read && res.status == 413)) {
    send_error_and_close(
        res, 413,
        "the request body exceeds the server's limit of " + std::to_string(limit) + " bytes");
    return std::nullopt;
  }
  if (!read) {
    send_error_and_close(
        res, 400,
        "the request body could not be read (a malformed chunked or compressed encoding, "
        "or the connection closed)");
    return std::nullopt;
  }
  return body;
}

void Server::Impl::routes() {
  http.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    // Range requests are ignored (a server may: RFC 9110, 14.2): httplib would build one part
    // of the response per range in memory, thousands of copies for one short header. The
    // request object is httplib's own, not a constant, so clearing its parsed ranges is sound.
    const_cast<httplib::Request&>(req).ranges.clear();
    // /health and /metrics stay open so probes and scrapers need no secret; so does the chat
    // page, which holds none (it asks for the key and sends it with each request).
    const bool open = req.path == "/health" || req.path == "/metrics" || req.path == "/";
    if (open || authorized(req)) return httplib::Server::HandlerResponse::Unhandled;
    // The body (if any) is not read: the connection closes after the answer.
    send_error_and_close(res, 401, "missing or wrong API key (Authorization: Bearer KEY)");
    res.set_header("WWW-Authenticate", "Bearer");
    return httplib::Server::HandlerResponse::Handled;
  });
  // httplib's own refusals (no route, body too large, malformed request) arrive without a body.
  http.set_error_handler(httplib::Server::HandlerWithResponse(
      [this](const httplib::Request& req, httplib::Response& res) {
        // A body of our own (or one a content provider writes: send_error_and_close) stands.
        if (!res.body.empty() || res.content_length_ > 0) {
          return httplib::Server::HandlerResponse::Unhandled;
        }
        std::string message = "request failed";
        if (res.status == 404) {
          message = "no route " + req.method + " " + quote_untrusted(req.path);
        } else if (res.status == 413) {
          message = "the request body exceeds the server's limit of " +
                    std::to_string(options.max_body_bytes) + " bytes";
        } else if (res.status == 400) {
          message = "malformed HTTP request";
        } else if (res.status == 405) {
          message = "method " + req.method + " is not allowed on " + quote_untrusted(req.path);
        }
        send_error(res, res.status, message);
        return httplib::Server::HandlerResponse::Handled;
      }));
  http.set_exception_handler(
      [](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "unknown error";
        try {
          if (ep) std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        send_error(res, 500, "internal error: " + what);
      });
  http.set_logger([this](const httplib::Request&, const httplib::Response& res) {
    metrics.record_response(res.status);
  });

  http.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(chat_page_html(), "text/html; charset=utf-8");
  });
  http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    if (owner->shutting_down_.load()) {
      send_json(res, 503, {{"status", "shutting down"}});
    } else if (!ready.load()) {
      send_json(res, 503, {{"status", "loading"}});
    } else {
      send_json(res, 200, {{"status", "ok"}});
    }
  });
  http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics.render(), "text/plain; version=0.0.4");
  });
  http.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    if (unavailable(res)) return;
    json entry = {{"id", options.model_name},
                  {"object", "model"},
                  {"created", int64_t(std::time(nullptr))},
                  {"owned_by", "kestrel"},
                  {"max_model_len", model.engine->max_context()}};
    send_json(res, 200, {{"object", "list"}, {"data", json::array({entry})}});
  });
  // Every POST route reads its own body (read_body).
  auto post = [this](const char* path, auto handle) {
    http.Post(path, [this, handle](const httplib::Request& req, httplib::Response& res,
                                   const httplib::ContentReader& reader) {
      if (auto body = read_body(req, res, reader)) handle(req, *body, res);
    });
  };
  post("/v1/chat/completions",
       [this](const httplib::Request& req, const std::string& body, httplib::Response& res) {
         generate(req, body, res, Endpoint::chat);
       });
  post("/v1/completions",
       [this](const httplib::Request& req, const std::string& body, httplib::Response& res) {
         generate(req, body, res, Endpoint::completion);
       });
  post("/tokenize", [this](const httplib::Request&, const std::string& body,
                           httplib::Response& res) { tokenize(body, res); });
  post("/detokenize", [this](const httplib::Request&, const std::string& body,
                             httplib::Response& res) { detokenize(body, res); });
}

void Server::Impl::tokenize(const std::string& body_text, httplib::Response& res) {
  if (unavailable(res)) return;
  auto body = parse_body(body_text);
  if (!body.is_ok()) return send_error(res, 400, body.status().message());
  if (!body->is_object()) return send_error(res, 400, "the request body must be a JSON object");
  // llama.cpp names the text "content", vLLM "prompt"; both are accepted.
  const char* key = body->contains("content") ? "content" : "prompt";
  auto text = body->find(key);
  if (text == body->end() || !text->is_string()) {
    return send_error(res, 400, "content must be a string");
  }
  bool add_special = false;
  if (auto a = body->find("add_special"); a != body->end() && !a->is_null()) {
    if (!a->is_boolean()) return send_error(res, 400, "add_special must be true or false");
    add_special = a->get<bool>();
  }
  auto ids = model.tokenizer->encode(text->get<std::string>(), add_special);
  if (!ids.is_ok()) return send_error(res, 400, "content: " + ids.status().message());
  send_json(
      res, 200,
      {{"tokens", *ids}, {"count", ids->size()}, {"max_model_len", model.engine->max_context()}});
}

void Server::Impl::detokenize(const std::string& body_text, httplib::Response& res) {
  if (unavailable(res)) return;
  auto body = parse_body(body_text);
  if (!body.is_ok()) return send_error(res, 400, body.status().message());
  if (!body->is_object()) return send_error(res, 400, "the request body must be a JSON object");
  auto tokens = body->find("tokens");
  if (tokens == body->end() || !tokens->is_array()) {
    return send_error(res, 400, "tokens must be a list of token ids");
  }
  std::vector<int32_t> ids;
  const int64_t vocab = int64_t(model.tokenizer->vocab_size());
  for (size_t i = 0; i < tokens->size(); ++i) {
    const json& v = (*tokens)[i];
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= vocab) {
      return send_error(
          res, 400,
          "tokens[" + std::to_string(i) + "] is not a token id below " + std::to_string(vocab));
    }
    ids.push_back(int32_t(v.get<int64_t>()));
  }
  send_json(res, 200, {{"content", model.tokenizer->decode(ids)}});
}

void Server::Impl::generate(const httplib::Request& req, const std::string& body_text,
                            httplib::Response& res, Endpoint endpoint) {
  if (unavailable(res)) return;
  auto body = parse_body(body_text);
  if (!body.is_ok()) return send_error(res, 400, body.status().message());
  auto parsed =
      endpoint == Endpoint::chat ? parse_chat_request(*body) : parse_completion_request(*body);
  if (!parsed.is_ok()) return send_error(res, 400, parsed.status().message());
  GenerationRequest& request = *parsed;

  std::vector<int32_t> prompt;
  if (endpoint == Endpoint::chat) {
    if (model.chat_template == nullptr) {
      return send_error(res, 400, "the model has no chat template: use /v1/completions");
    }
    // The template may reject a conversation (roles out of order): the client's to fix.
    auto rendered = render_chat_template(*model.chat_template, request.messages, true);
    if (!rendered.is_ok()) {
      return send_error(res, 400, "messages: " + rendered.status().message());
    }
    auto ids = model.tokenizer->encode(*rendered, false);
    if (!ids.is_ok()) return send_error(res, 400, "messages: " + ids.status().message());
    prompt = std::move(*ids);
  } else if (request.prompt_is_ids) {
    prompt = request.prompt_ids;
    const int64_t vocab = model.engine->config().vocab_size;
    for (size_t i = 0; i < prompt.size(); ++i) {
      if (prompt[i] >= vocab) {
        return send_error(res, 400,
                          "prompt[" + std::to_string(i) + "] = " + std::to_string(prompt[i]) +
                              " is outside the model's vocabulary of " + std::to_string(vocab));
      }
    }
  } else {
    auto ids = model.tokenizer->encode(request.prompt_text, true);
    if (!ids.is_ok()) return send_error(res, 400, "prompt: " + ids.status().message());
    prompt = std::move(*ids);
  }
  if (prompt.empty()) return send_error(res, 400, "the prompt encodes to no tokens");

  const int64_t context = model.engine->max_context();
  const int64_t n_prompt = int64_t(prompt.size());
  int64_t max_tokens = 0;
  if (request.max_tokens) {
    max_tokens = *request.max_tokens;
    if (max_tokens > options.max_tokens) {
      return send_error(res, 400,
                        "max_tokens " + std::to_string(max_tokens) +
                            " exceeds the server's limit of " + std::to_string(options.max_tokens));
    }
    // Written as a difference, and the total unsigned: --max-tokens may be any int64.
    if (max_tokens > context - n_prompt) {
      return send_error(res, 400,
                        "this model's context is " + std::to_string(context) +
                            " tokens, but the request needs " +
                            std::to_string(uint64_t(n_prompt) + uint64_t(max_tokens)) + " (" +
                            std::to_string(n_prompt) + " in the prompt + " +
                            std::to_string(max_tokens) + " max_tokens)");
    }
  } else {
    max_tokens = std::min(options.max_tokens, context - n_prompt);
    if (max_tokens <= 0) {
      return send_error(res, 400,
                        "this model's context is " + std::to_string(context) +
                            " tokens, but the prompt alone has " + std::to_string(n_prompt) +
                            " (no room to generate)");
    }
  }
  if (!request.seed_given) request.sampling.seed = std::random_device{}();

  auto in_flight_guard = std::make_shared<InFlight>(in_flight);
  auto channel = std::make_shared<RequestChannel>();
  ScheduledRequest scheduled;
  scheduled.prompt = std::move(prompt);
  scheduled.max_tokens = max_tokens;
  scheduled.sampling = request.sampling;
  scheduled.stop = request.stop;
  scheduled.ignore_eos = request.ignore_eos;
  scheduled.min_tokens = request.min_tokens;
  scheduled.top_logprobs = request.top_logprobs;
  scheduled.channel = channel;
  switch (model.scheduler->submit(std::move(scheduled))) {
    case Scheduler::Admission::queued:
      break;
    case Scheduler::Admission::queue_full:
      res.set_header("Retry-After", "1");
      return send_error(res, 429,
                        "the server is busy: " + std::to_string(options.max_queue) +
                            " requests are already waiting; retry later");
    case Scheduler::Admission::shutting_down:
      return send_error(res, 503, "the server is shutting down");
  }

  ResponseHeader header;
  header.id = random_id(endpoint == Endpoint::chat ? "chatcmpl-" : "cmpl-");
  header.model = request.model.empty() ? options.model_name : request.model;
  header.created = int64_t(std::time(nullptr));

  const Tokenizer* tokenizer = model.tokenizer;
  const TokenText token_text = [tokenizer](int32_t id) { return tokenizer->decode({id}); };
  const bool logprobs = request.top_logprobs >= 0;
  if (!request.stream) {
    // The scheduler always ends a request with finished or failed, so this wait is bounded by
    // the request's own max_tokens (or the shutdown grace period). A client that hangs up
    // cancels it (a stream notices at its next write; this wait looks at the connection every
    // half second), so abandoned requests do not hold slots and the queue until max_tokens.
    std::string text;
    std::vector<TokenLogprob> tokens;
    constexpr auto kLook = std::chrono::milliseconds(500);
    int socket = -2;  // the connection's, looked up at the first look
    auto next_look = std::chrono::steady_clock::now() + kLook;
    for (;;) {
      auto event = channel->pop(kLook);
      if (std::chrono::steady_clock::now() >= next_look) {
        next_look = std::chrono::steady_clock::now() + kLook;
        if (socket == -2) {
          socket =
              find_connection(req.local_addr, req.local_port, req.remote_addr, req.remote_port);
        }
        if (connection_closed(socket)) {
          channel->cancel();
          return send_error(res, 499, "the client closed the connection");
        }
      }
      if (!event) continue;
      tokens.insert(tokens.end(), event->logprobs.begin(), event->logprobs.end());
      if (event->kind == StreamEvent::Kind::text) {
        text += event->text;
      } else if (event->kind == StreamEvent::Kind::finished) {
        return send_json(
            res, 200,
            completion_response(endpoint, header, text, event->reason, event->usage,
                                logprobs_json(endpoint, tokens, token_text, 0, logprobs)));
      } else {
        return send_error(res, event->status, event->message);
      }
    }
  }

  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  const bool include_usage = request.include_usage;
  auto first = std::make_shared<bool>(true);
  auto offset = std::make_shared<size_t>(0);  // completions' text_offset of the next token
  res.set_chunked_content_provider(
      "text/event-stream",
      [channel, header, endpoint, include_usage, first, offset, token_text, logprobs,
       in_flight_guard](size_t, httplib::DataSink& sink) {
        auto chunk_logprobs = [&](const StreamEvent& e) {
          json out = logprobs_json(endpoint, e.logprobs, token_text, *offset, logprobs);
          for (const TokenLogprob& t : e.logprobs) *offset += token_text(t.token).size();
          return out;
        };
        auto send = [&](const std::string& data) {
          if (sink.write(data.data(), data.size())) return true;
          channel->cancel();  // the client is gone: free the slot at the next step
          return false;
        };
        for (;;) {
          auto event = channel->pop(std::chrono::milliseconds(200));
          if (!event) {
            if (!sink.is_writable()) {
              channel->cancel();
              return false;
            }
            continue;
          }
          if (event->kind == StreamEvent::Kind::text) {
            const bool was_first = *first;
            *first = false;
            return send(
                sse_event(stream_chunk(endpoint, header, was_first, event->text, std::nullopt,
                                       include_usage, chunk_logprobs(*event))));
          }
          if (event->kind == StreamEvent::Kind::finished) {
            std::string out = sse_event(stream_chunk(endpoint, header, *first, "", event->reason,
                                                     include_usage, chunk_logprobs(*event)));
            if (include_usage) out += sse_event(stream_usage_chunk(endpoint, header, event->usage));
            out += "data: [DONE]\n\n";
            if (!send(out)) return false;
          } else {
            // The status line is long sent; the error travels as the stream's last event.
            std::string out = sse_event(error_json(event->status, event->message));
            out += "data: [DONE]\n\n";
            if (!send(out)) return false;
          }
          sink.done();
          return true;
        }
      },
      [channel](bool success) {
        if (!success) channel->cancel();
      });
}

Server::Server(ServerOptions options, Metrics& metrics)
    : impl_(std::make_unique<Impl>(std::move(options), metrics)) {
  impl_->owner = this;
}

Server::~Server() {
  stop();
}

Status Server::start() {
  ServerOptions& o = impl_->options;
  httplib::Server& http = impl_->http;
  // Every running or queued request holds a worker while it waits for its tokens.
  const size_t threads =
      o.http_threads > 0 ? size_t(o.http_threads) : size_t(o.slots + o.max_queue + 8);
  // httplib starts its workers in the listening thread, where a thread the system refuses ends
  // the process (std::system_error, and joinable threads destroyed): refuse a count past the
  // process limit here instead (root is not held to it).
  struct rlimit process_limit {};
  if (::geteuid() != 0 && ::getrlimit(RLIMIT_NPROC, &process_limit) == 0 &&
      process_limit.rlim_cur != RLIM_INFINITY && threads + 64 > process_limit.rlim_cur) {
    return Status::error("the server needs " + std::to_string(threads) +
                         " HTTP threads (--parallel + --max-queue + 8) and more for the engine, "
                         "but the process limit (ulimit -u) is " +
                         std::to_string(process_limit.rlim_cur));
  }
  http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  http.set_payload_max_length(o.max_body_bytes);
  http.set_read_timeout(o.read_timeout_seconds, 0);
  http.set_write_timeout(o.write_timeout_seconds, 0);
  http.set_keep_alive_timeout(5);
  // cpp-httplib (a compiled library here, its constant baked in) listens with a backlog of 5.
  // A burst of clients connecting at once (the CLI test's 64) overflows queues that short: the
  // kernel answers with SYN cookies and drops completed connections it cannot queue, and a
  // client whose request was already sent gets a reset instead of a response (CI saw one on a
  // busy machine). The listening socket is kept here, and listen() called on it again after
  // the bind sets a real backlog (Linux caps it at net.core.somaxconn).
  http.set_socket_options([impl = impl_.get()](socket_t sock) {
    httplib::default_socket_options(sock);
    impl->listen_socket = int(sock);
  });
  impl_->routes();
  if (o.port == 0) {
    port_ = http.bind_to_any_port(o.host);
    if (port_ < 0) return Status::error("cannot bind " + o.host + " to any port");
  } else {
    if (!http.bind_to_port(o.host, o.port)) {
      return Status::error("cannot bind " + o.host + ":" + std::to_string(o.port) +
                           " (in use, or not an address of this machine)");
    }
    port_ = o.port;
  }
  constexpr int kListenBacklog = 1024;
  if (impl_->listen_socket >= 0 && ::listen(impl_->listen_socket, kListenBacklog) != 0) {
    return Status::error("cannot listen on " + o.host + ":" + std::to_string(port_) +
                         " with a backlog of " + std::to_string(kListenBacklog));
  }
  impl_->thread = std::thread([impl = impl_.get()] {
    impl->http.listen_after_bind();
    impl->listen_returned.store(true);
  });
  return Status::ok();
}

void Server::attach(const ServingModel& model) {
  impl_->model = model;
  impl_->ready.store(true);
}

void Server::stop() {
  if (!impl_) return;
  // Responses still being written get their last bytes out first; a client that stopped
  // reading is cut off by the write timeout.
  const auto limit = std::chrono::steady_clock::now() +
                     std::chrono::seconds(impl_->options.write_timeout_seconds + 1);
  while (impl_->in_flight.load() > 0 && std::chrono::steady_clock::now() < limit) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (!impl_->thread.joinable()) return;
  // httplib 0.11's stop() does nothing until the listening thread has marked the server running,
  // the first thing listen_after_bind() does: a stop() that came sooner (right after start(), the
  // thread not yet scheduled) left that thread in accept() for ever and the join below with it.
  // Wait until the thread runs, or has returned by itself, before asking it to stop.
  while (!impl_->http.is_running() && !impl_->listen_returned.load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (impl_->http.is_running()) impl_->http.stop();
  impl_->thread.join();
}

}  // namespace kestrel::server
