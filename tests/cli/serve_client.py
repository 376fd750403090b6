#!/usr/bin/env python3
"""A small OpenAI-API client (Python standard library only) that drives `kestrel serve` for
tests/cli/serve.sh. `main PORT KEY` checks the routes, errors, streaming, stop strings, a client
disconnect, determinism under concurrency and a 64-client load test; `busy PORT PID` checks the full queue (429) and the
shutdown on SIGTERM. Every wait is bounded; any failed check exits non-zero with a message."""
import gzip
import http.client
import json
import os
import re
import signal
import socket
import sys
import threading
import time

TIMEOUT = 120  # seconds any one socket operation may take before the test fails


def fail(message):
    print("FAIL: " + message, flush=True)
    os._exit(1)


def check(condition, message):
    if not condition:
        fail(message)


class Client:
    def __init__(self, port, key=None):
        self.port = port
        self.key = key

    def headers(self, extra=None):
        h = {"Content-Type": "application/json"}
        if self.key:
            h["Authorization"] = "Bearer " + self.key
        h.update(extra or {})
        return h

    def request(self, method, path, body=None, raw=None, headers=None):
        """Returns (status, headers, parsed JSON or text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        conn.request(method, path, body=data, headers=self.headers(headers))
        resp = conn.getresponse()
        text = resp.read().decode("utf-8")
        conn.close()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return resp.status, dict(resp.getheaders()), parsed

    def post(self, path, body):
        return self.request("POST", path, body)

    def stream(self, path, body, on_event=None):
        """Posts with stream: true; returns the list of decoded events (the string "[DONE]" for
        the terminator). on_event(conn, event) may return False to hang up."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        conn.request("POST", path, body=json.dumps(body), headers=self.headers())
        resp = conn.getresponse()
        if resp.status != 200:
            fail(f"stream {path}: status {resp.status}: {resp.read()[:300]}")
        check(resp.getheader("Content-Type", "").startswith("text/event-stream"),
              "stream: not text/event-stream")
        events = []
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.decode("utf-8").rstrip("\r\n")
            if not line:
                continue
            check(line.startswith("data: "), f"stream: not an SSE data line: {line!r}")
            payload = line[len("data: "):]
            event = "[DONE]" if payload == "[DONE]" else json.loads(payload)
            events.append(event)
            if on_event is not None and on_event(conn, event) is False:
                conn.close()
                return events
            if event == "[DONE]":
                break
        conn.close()
        return events


def metrics(client):
    status, _, text = client.request("GET", "/metrics")
    check(status == 200, "/metrics: status %d" % status)
    return text


def metric_value(text, name):
    m = re.search("^" + re.escape(name) + r" ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def wait_for(what, predicate, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    fail("timed out waiting for " + what)


def chat_body(content, **kw):
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}]}
    body.update(kw)
    return body


def stream_text(events, field):
    """Concatenated text of a stream's choice chunks, the finish reason and the usage chunk."""
    check(events and events[-1] == "[DONE]", "stream does not end with data: [DONE]")
    text, reason, usage = "", None, None
    for e in events[:-1]:
        check("error" not in e, f"stream carried an error: {e}")
        if e.get("usage"):
            usage = e["usage"]
        for c in e["choices"]:
            if field == "delta":
                text += c["delta"].get("content", "")
            else:
                text += c["text"]
            if c.get("finish_reason"):
                reason = c["finish_reason"]
    return text, reason, usage


def expect_error(client, status, method, path, body=None, raw=None, contains=(), headers=None):
    got, hdrs, parsed = client.request(method, path, body, raw, headers)
    check(got == status, f"{method} {path}: expected {status}, got {got}: {parsed}")
    check(isinstance(parsed, dict) and "error" in parsed and "message" in parsed["error"],
          f"{method} {path}: not an OpenAI error object: {parsed}")
    for word in contains:
        check(word in parsed["error"]["message"],
              f"{method} {path}: error does not mention {word!r}: {parsed['error']['message']}")
    return hdrs


def run_main(port, key):
    client = Client(port, key)
    anonymous = Client(port)

    check(anonymous.request("GET", "/health")[0] == 200, "/health without a key")
    expect_error(anonymous, 401, "GET", "/v1/models")
    expect_error(Client(port, key + "x"), 401, "POST", "/v1/completions", {"prompt": "a"})
    status, _, models = client.request("GET", "/v1/models")
    check(status == 200 and models["data"][0]["id"] == "tiny-test", f"/v1/models: {models}")
    print("ok health, auth, models", flush=True)

    # Chat, not streamed and streamed: the same greedy text, usage, finish reasons.
    status, _, whole = client.post("/v1/chat/completions",
                                   chat_body("Hello there", max_tokens=8, temperature=0))
    check(status == 200, f"chat: {status} {whole}")
    check(whole["object"] == "chat.completion", "chat: object")
    choice = whole["choices"][0]
    check(choice["finish_reason"] == "length", f"chat: finish_reason {choice['finish_reason']}")
    check(choice["message"]["role"] == "assistant", "chat: role")
    usage = whole["usage"]
    check(usage["completion_tokens"] == 8 and usage["prompt_tokens"] > 0 and
          usage["total_tokens"] == usage["prompt_tokens"] + 8, f"chat: usage {usage}")
    events = client.stream("/v1/chat/completions",
                           chat_body("Hello there", max_tokens=8, temperature=0, stream=True,
                                     stream_options={"include_usage": True}))
    check(events[0]["choices"][0]["delta"].get("role") == "assistant", "stream: first delta role")
    text, reason, s_usage = stream_text(events, "delta")
    check(text == choice["message"]["content"],
          f"streamed {text!r} != not streamed {choice['message']['content']!r}")
    check(reason == "length", f"stream: finish_reason {reason}")
    check(s_usage == usage, f"stream usage {s_usage} != {usage}")
    check(events[-2]["choices"] == [], "stream: the usage chunk has choices")
    plain = client.stream("/v1/chat/completions",
                          chat_body("Hello there", max_tokens=8, temperature=0, stream=True))
    check(all("usage" not in e for e in plain[:-1]), "stream without include_usage has usage")
    print("ok chat streamed and not: same text, usage, [DONE]", flush=True)

    # Completions: text prompt, token-id prompt, max_completion_tokens.
    status, _, comp = client.post("/v1/completions",
                                  {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0})
    check(status == 200 and comp["object"] == "text_completion", f"completions: {comp}")
    full = comp["choices"][0]["text"]
    check(comp["usage"]["completion_tokens"] == 16, f"completions usage {comp['usage']}")
    events = client.stream("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 16,
                                               "temperature": 0, "stream": True})
    check(stream_text(events, "text")[0] == full, "completions streamed != not streamed")
    status, _, by_ids = client.post("/v1/completions", {"prompt": [9707, 1879], "temperature": 0,
                                                        "max_completion_tokens": 3})
    check(status == 200 and by_ids["usage"] == {"prompt_tokens": 2, "completion_tokens": 3,
                                                "total_tokens": 5}, f"ids prompt: {by_ids}")
    print("ok completions: text and token-id prompts", flush=True)

    # Stop strings: a piece of the greedy text ends the output just before it.
    stop = None
    for start in range(2, len(full) - 3):
        candidate = full[start:start + 3]
        if candidate.strip() and full.find(candidate) == start:
            stop = candidate
            break
    check(stop is not None, f"no usable stop string in {full!r}")
    expected = full[:full.find(stop)]
    for streamed in (False, True):
        body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0,
                "stop": ["\u0000never", stop], "stream": streamed}
        if streamed:
            text, reason, _ = stream_text(client.stream("/v1/completions", body), "text")
        else:
            status, _, r = client.post("/v1/completions", body)
            check(status == 200, f"stop: {r}")
            text, reason = r["choices"][0]["text"], r["choices"][0]["finish_reason"]
        check(text == expected and reason == "stop",
              f"stop {stop!r} (stream={streamed}): got {text!r} / {reason}, want {expected!r}")
    print("ok stop strings, streamed and not", flush=True)

    # Every error status the client can cause.
    expect_error(client, 400, "POST", "/v1/chat/completions", raw="{not json", contains=["JSON"])
    expect_error(client, 400, "POST", "/v1/chat/completions", {"model": "x"},
                 contains=["messages"])
    expect_error(client, 400, "POST", "/v1/chat/completions",
                 chat_body("hi", temperature="hot"), contains=["temperature"])
    expect_error(client, 400, "POST", "/v1/chat/completions", chat_body("hi", n=2),
                 contains=["n must be 1"])
    expect_error(client, 400, "POST", "/v1/chat/completions",
                 {"messages": [{"role": "wizard", "content": "x"}]}, contains=["messages[0].role"])
    expect_error(client, 400, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0},
                 contains=["max_tokens"])
    expect_error(client, 400, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 401},
                 contains=["401", "400"])
    expect_error(client, 400, "POST", "/v1/completions",
                 {"prompt": list(range(200)), "max_tokens": 400}, contains=["512", "600", "200"])
    expect_error(client, 400, "POST", "/v1/completions", {"prompt": [5, 999999999]},
                 contains=["prompt[1]"])
    expect_error(client, 400, "POST", "/v1/completions", {"prompt": "hi", "logprobs": 6},
                 contains=["logprobs"])
    expect_error(client, 404, "GET", "/v2/nothing", contains=["/v2/nothing"])
    expect_error(client, 413, "POST", "/v1/completions",
                 raw=json.dumps({"prompt": "x" * 70000}), contains=["65536"])
    print("ok errors: 400 (json, fields, context with numbers), 401, 404, 413", flush=True)

    # The body limit holds for every framing: chunked and gzip bodies are counted as read
    # (inflated), and a JSON body with curl -d's form Content-Type is still JSON, past httplib's
    # 8 KiB form limit.
    big = json.dumps({"prompt": "x" * 200000, "max_tokens": 1}).encode()
    framed = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 8192]), big[i:i + 8192])
                      for i in range(0, len(big), 8192)) + b"0\r\n\r\n"
    expect_error(client, 413, "POST", "/v1/completions", raw=framed,
                 headers={"Transfer-Encoding": "chunked"}, contains=["65536"])
    bomb = gzip.compress(json.dumps({"prompt": "x" * 3000000, "max_tokens": 1}).encode())
    check(len(bomb) < 65536, "the gzip body is under the limit on the wire")
    expect_error(client, 413, "POST", "/v1/completions", raw=bomb,
                 headers={"Content-Encoding": "gzip"}, contains=["65536"])
    small = gzip.compress(json.dumps({"prompt": "Hello", "max_tokens": 2}).encode())
    status, _, r = client.request("POST", "/v1/completions", raw=small,
                                  headers={"Content-Encoding": "gzip"})
    check(status == 200, f"a gzip body within the limit: {status} {r}")
    form = json.dumps({"prompt": "Hello", "max_tokens": 2, "user": "u" * 20000})
    status, _, r = client.request("POST", "/v1/completions", raw=form,
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    check(status == 200, f"a 20 KB JSON body sent as a form: {status} {r}")
    # A refused body is never read as the next request: one answer, then the connection closes
    # (a request hidden in a multipart body, or sent without the key, is not answered).
    hidden = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    for auth in (f"Authorization: Bearer {key}\r\n".encode(), b""):
        conn = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth +
                     b"Content-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(hidden), hidden))
        answer = b""
        while True:
            data = conn.recv(65536)
            if not data:
                break
            answer += data
        conn.close()
        check(answer.count(b"HTTP/1.1 ") == 1 and (b" 415 " in answer or b" 401 " in answer),
              f"a refused body was read as a request: {answer[:400]!r}")
    # Range is ignored: one whole response, not one part a range.
    status, hdrs, page = client.request("GET", "/", headers={"Range": "bytes=" + "0-," * 200 + "0-"})
    check(status == 200 and "multipart" not in hdrs.get("Content-Type", ""),
          f"GET / with ranges: {status} {hdrs.get('Content-Type')}")
    print("ok the body limit holds for chunked and gzip bodies; form bodies; ranges ignored",
          flush=True)

    # Fields that would change the answer are honoured or refused, never dropped.
    for extra, word in (({"logit_bias": {"5": -100}}, "logit_bias"),
                        ({"response_format": {"type": "json_object"}}, "response_format"),
                        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                        ({"tool_choice": "required"}, "tool_choice"),
                        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens")):
        expect_error(client, 400, "POST", "/v1/chat/completions", chat_body("hi", **extra),
                     contains=[word])
    expect_error(client, 400, "POST", "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": None,
                                "tool_calls": [{"id": "1", "type": "function",
                                                "function": {"name": "f", "arguments": "{}"}}]}]},
                 contains=["messages[1].tool_calls"])
    status, _, r = client.post("/v1/chat/completions",
                               chat_body("hi", logit_bias={}, response_format={"type": "text"},
                                         tools=[], tool_choice="none", min_tokens=2, max_tokens=4))
    check(status == 200, f"the fields' neutral values: {status} {r}")
    # repetition_penalty reaches the sampler: the tiny model's greedy text repeats a token
    # ("uristicuristic"), which a large penalty forbids.
    plain = {"prompt": "Hello", "max_tokens": 12, "temperature": 0}
    status, _, base = client.post("/v1/completions", plain)
    status2, _, penalized = client.post("/v1/completions", dict(plain, repetition_penalty=50))
    check(status == 200 and status2 == 200 and
          base["choices"][0]["text"] != penalized["choices"][0]["text"],
          f"repetition_penalty changes nothing: {base} / {penalized}")
    expect_error(client, 400, "POST", "/v1/completions", dict(plain, repetition_penalty=0),
                 contains=["repetition_penalty"])
    print("ok unsupported fields refused; repetition_penalty and min_tokens honoured", flush=True)

    # Logprobs: one entry per generated token; greedy picks the most likely alternative.
    lp_body = chat_body("Hello there", max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    status, _, r = client.post("/v1/chat/completions", lp_body)
    check(status == 200, f"logprobs: {r}")
    content = r["choices"][0]["logprobs"]["content"]
    check(len(content) == 6, f"logprobs: {len(content)} entries for 6 tokens")
    for entry in content:
        check(entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2, f"logprobs: {entry}")
        check(entry["top_logprobs"][0]["logprob"] == entry["logprob"] and
              entry["top_logprobs"][0]["token"] == entry["token"] and
              entry["top_logprobs"][1]["logprob"] <= entry["logprob"],
              f"greedy token is not the top alternative: {entry}")
    events = client.stream("/v1/chat/completions", dict(lp_body, stream=True))
    streamed = [x for e in events[:-1] for c in e["choices"] if c.get("logprobs")
                for x in c["logprobs"]["content"]]
    check(streamed == content, "streamed logprobs differ from the whole response's")
    status, _, r = client.post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4,
                                                   "temperature": 0, "logprobs": 1})
    lp = r["choices"][0]["logprobs"]
    check(status == 200 and len(lp["tokens"]) == 4 and len(lp["token_logprobs"]) == 4 and
          lp["text_offset"][0] == 0, f"completion logprobs: {r}")
    print("ok logprobs: chat and completions, streamed and not", flush=True)

    status, _, tok = client.post("/tokenize", {"content": "Hello world"})
    check(status == 200 and tok["tokens"], f"/tokenize: {tok}")
    status, _, detok = client.post("/detokenize", {"tokens": tok["tokens"]})
    check(status == 200 and detok["content"] == "Hello world", f"/detokenize: {detok}")
    expect_error(client, 400, "POST", "/detokenize", {"tokens": [-1]}, contains=["tokens[0]"])
    print("ok tokenize / detokenize round trip", flush=True)

    # A client that hangs up mid-stream frees its slot: the request ends as "abort", not by
    # running to its 400 tokens.
    seen = []

    def hang_up(conn, event):
        seen.append(event)
        return len(seen) < 3

    client.stream("/v1/completions", {"prompt": "Tell a long story", "max_tokens": 400,
                                      "temperature": 0, "stream": True}, hang_up)
    wait_for("the disconnected request to be aborted",
             lambda: (metric_value(metrics(client),
                                   'kestrel_requests_finished_total{reason="abort"}') or 0) >= 1)
    wait_for("no running requests", lambda: metric_value(metrics(client),
                                                         "kestrel_requests_running") == 0)
    print("ok a disconnected stream is aborted and frees its slot", flush=True)

    # Determinism: each request alone, then all at once (more than the 4 slots, so some queue
    # and join mid-flight, and prompt chunks share steps with decode tokens). Greedy output must
    # not change. Seeded sampling must repeat alone; under load its agreement is reported, not
    # asserted: the CPU matmul's accumulation order depends on a step's token count
    # (docs/ARCHITECTURE.md), which can flip a draw that falls near a boundary.
    bodies = []
    for i in range(10):
        extra = {"temperature": 0} if i < 8 else {"temperature": 0.9, "top_p": 0.95,
                                                  "seed": 100 + i}
        bodies.append(chat_body(f"Question number {i}: " + "why? " * (i * 7), max_tokens=24,
                                **extra))
    # Greedy requests take the device's argmax (no logit row read back); sampled ones pick on
    # the host from the whole row.
    def picks(where):
        return metric_value(metrics(client), f'kestrel_tokens_picked_total{{where="{where}"}}') or 0
    # On the CPU the server's steps go in turn: a step run ahead would be computed before the
    # one before it is streamed (Engine::argmax_on_device; the unit tests force run ahead).
    def steps_ahead():
        return metric_value(metrics(client), 'kestrel_steps_total{queued="ahead"}') or 0
    alone = []
    for i, body in enumerate(bodies):
        device, host, ahead = picks("device"), picks("host"), steps_ahead()
        status, _, r = client.post("/v1/chat/completions", body)
        check(status == 200, f"alone: {r}")
        alone.append(r["choices"][0]["message"]["content"])
        n = r["usage"]["completion_tokens"]
        want = (n, 0) if i < 8 else (0, n)
        got = (picks("device") - device, picks("host") - host)
        check(got == want, f"alone {i}: tokens picked (device, host) {got}, expected {want}")
        ran_ahead = steps_ahead() - ahead
        check(ran_ahead == 0, f"alone {i}: {ran_ahead} steps run ahead on the CPU")
    # Greedy with a penalty, or with logprobs, needs the row: picked on the host.
    for extra in ({"presence_penalty": 0.5}, {"logprobs": True, "top_logprobs": 1}):
        device, host = picks("device"), picks("host")
        status, _, r = client.post("/v1/chat/completions", chat_body(
            "Question number 1: why?", max_tokens=5, temperature=0, **extra))
        check(status == 200, f"greedy {extra}: {r}")
        got = (picks("device") - device, picks("host") - host)
        check(got == (0, r["usage"]["completion_tokens"]),
              f"greedy {extra}: tokens picked (device, host) {got}")
    for i in (8, 9):
        status, _, r = client.post("/v1/chat/completions", bodies[i])
        check(r["choices"][0]["message"]["content"] == alone[i],
              f"request {i}: the same seed gave different text alone")
    together = [None] * len(bodies)

    def worker(i):
        if i % 3 == 0:
            text, _, _ = stream_text(client.stream("/v1/chat/completions",
                                                   dict(bodies[i], stream=True)), "delta")
            together[i] = text
        else:
            status, _, r = client.post("/v1/chat/completions", bodies[i])
            together[i] = r["choices"][0]["message"]["content"] if status == 200 else r

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    for i in range(8):
        check(together[i] == alone[i],
              f"greedy request {i}: concurrent output {together[i]!r} != alone {alone[i]!r}")
    agree = sum(together[i] == alone[i] for i in (8, 9))
    print(f"ok 8 concurrent greedy requests equal their single runs (seeded sampling under "
          f"load: {agree} of 2 equal)", flush=True)

    run_load(client)

    text = metrics(client)
    for needle in ['kestrel_http_responses_total{status="200"}',
                   'kestrel_http_responses_total{status="401"}',
                   'kestrel_http_responses_total{status="404"}',
                   'kestrel_http_responses_total{status="413"}',
                   "kestrel_time_to_first_token_seconds_count",
                   "kestrel_time_per_output_token_seconds_bucket",
                   "kestrel_requests_waiting 0", "kestrel_prompt_tokens_total"]:
        check(needle in text, f"/metrics lacks {needle}")
    check((metric_value(text, "kestrel_generation_tokens_total") or 0) > 100,
          "generation tokens not counted")
    print("ok /metrics", flush=True)


def run_load(client):
    """64 concurrent streaming clients, 192 requests over 16 prompts: every response arrives,
    complete and equal to its prompt's single-run output (greedy), and the server is healthy
    after."""
    prompts = [f"Load test prompt {i}: " + "more " * (i * 3) for i in range(16)]
    alone = {}
    for p in prompts:
        status, _, r = client.post("/v1/completions", {"prompt": p, "max_tokens": 8,
                                                       "temperature": 0})
        check(status == 200, f"load alone: {r}")
        alone[p] = r["choices"][0]["text"]
    jobs = [prompts[i % len(prompts)] for i in range(192)]
    results = [None] * len(jobs)
    lock = threading.Lock()
    next_job = [0]

    def client_thread():
        while True:
            with lock:
                i = next_job[0]
                next_job[0] += 1
            if i >= len(jobs):
                return
            events = client.stream("/v1/completions", {"prompt": jobs[i], "max_tokens": 8,
                                                       "temperature": 0, "stream": True,
                                                       "stream_options": {"include_usage": True}})
            text, reason, usage = stream_text(events, "text")
            results[i] = (text, reason, usage["completion_tokens"] if usage else None)

    threads = [threading.Thread(target=client_thread) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    for i, job in enumerate(jobs):
        check(results[i] is not None, f"load: request {i} got no response")
        text, reason, completion_tokens = results[i]
        check(text == alone[job], f"load: request {i}: {text!r} != alone {alone[job]!r}")
        check(reason in ("length", "stop") and completion_tokens is not None,
              f"load: request {i}: finish {reason}, usage {completion_tokens}")
    check(client.request("GET", "/health")[0] == 200, "load: /health after the load test")
    wait_for("no running requests after the load test",
             lambda: metric_value(metrics(client), "kestrel_requests_running") == 0)
    print("ok load: 64 concurrent streaming clients, 192 requests, all complete and equal to "
          "their single runs", flush=True)


def run_busy(port, pid):
    """Server with 1 slot and a queue of 1: a long stream runs, one request waits, the next is
    refused with 429; then SIGTERM ends the stream with a final event and the waiter with 503."""
    client = Client(port)

    # A client that sends half its headers and stalls is dropped after --timeout (3 s here), not
    # held forever; TIMEOUT bounds the wait.
    slow = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    try:
        while slow.recv(4096):
            pass
    except socket.timeout:
        fail(f"the server held a stalled client for {TIMEOUT} s")
    except ConnectionResetError:
        pass
    slow.close()
    print("ok a client that stalls mid-headers is dropped", flush=True)

    # Clients that hang up on requests that are not streamed, one running and one queued, free
    # the slot and the queue: both end as "abort", neither runs its 8000 tokens ("length").
    def abandoned(prompt):
        conn = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        body = json.dumps({"prompt": prompt, "max_tokens": 8000, "temperature": 0,
                           "ignore_eos": True}).encode()
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return conn

    def count(name):
        return metric_value(metrics(client), name) or 0

    aborts = count('kestrel_requests_finished_total{reason="abort"}')
    lengths = count('kestrel_requests_finished_total{reason="length"}')
    running = abandoned("Go on")
    wait_for("the request to start", lambda: count("kestrel_requests_running") == 1)
    queued = abandoned("Wait")
    wait_for("the request to queue", lambda: count("kestrel_requests_waiting") == 1)
    running.close()
    queued.close()
    wait_for("both abandoned requests to be aborted",
             lambda: count('kestrel_requests_finished_total{reason="abort"}') == aborts + 2)
    check(count('kestrel_requests_finished_total{reason="length"}') == lengths,
          "an abandoned request ran to its max_tokens")
    wait_for("an idle server", lambda: count("kestrel_requests_running") == 0 and
             count("kestrel_requests_waiting") == 0)
    print("ok clients that hang up on requests not streamed free the slot and the queue",
          flush=True)

    long_events = []
    started = threading.Event()

    def long_stream():
        def note(conn, event):
            long_events.append(event)
            started.set()
            return True
        client.stream("/v1/completions", {"prompt": "Go on", "max_tokens": 8000,
                                          "temperature": 0, "stream": True}, note)

    waiter_result = []

    def waiter():
        waiter_result.append(client.post("/v1/completions", {"prompt": "Wait", "max_tokens": 4}))

    t_long = threading.Thread(target=long_stream)
    t_long.start()
    check(started.wait(TIMEOUT), "the long stream never started")
    t_wait = threading.Thread(target=waiter)
    t_wait.start()
    wait_for("one waiting request",
             lambda: metric_value(metrics(client), "kestrel_requests_waiting") == 1)
    hdrs = expect_error(client, 429, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2},
                        contains=["busy"])
    check(hdrs.get("Retry-After") == "1", f"429 without Retry-After: {hdrs}")
    print("ok a full queue answers 429 with Retry-After", flush=True)

    os.kill(pid, signal.SIGTERM)
    wait_for("/health to say shutting down",
             lambda: client.request("GET", "/health")[0] == 503, seconds=10)
    expect_error(client, 503, "POST", "/v1/completions", {"prompt": "late", "max_tokens": 2},
                 contains=["shutting down"])
    t_wait.join(TIMEOUT)
    t_long.join(TIMEOUT)
    check(waiter_result and waiter_result[0][0] == 503, f"queued request: {waiter_result}")
    check(long_events[-1] == "[DONE]", f"the running stream did not end with [DONE]: {long_events[-2:]} ({len(long_events)} events)")
    check("error" in long_events[-2] and long_events[-2]["error"]["code"] == 503,
          f"the running stream's last event is not the shutdown error: {long_events[-2]}")
    print("ok SIGTERM: 503 for new and queued requests, running stream ends with an event",
          flush=True)


def run_paged(port):
    """Server whose KV cache pool holds one full context (--kv-blocks 16, -c 256): a repeated
    prompt reuses its cached blocks (fewer prompt tokens prefilled, the same greedy output), and
    requests that together need more blocks than the pool has wait for them instead of failing:
    every one completes with its single-run output."""
    client = Client(port)
    prompt = "The paged cache keeps blocks of sixteen positions. " * 6
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    before = metrics(client)
    status, _, first = client.post("/v1/completions", body)
    check(status == 200, f"paged: first request: {first}")
    middle = metrics(client)
    status, _, second = client.post("/v1/completions", body)
    check(status == 200, f"paged: second request: {second}")
    after = metrics(client)
    n_prompt = first["usage"]["prompt_tokens"]
    check(n_prompt > 40, f"paged: prompt of only {n_prompt} tokens")
    check(second["choices"][0]["text"] == first["choices"][0]["text"],
          f"paged: cached prefix changed the output: {second['choices'][0]['text']!r} != "
          f"{first['choices'][0]['text']!r}")

    def delta(a, b, name):
        return (metric_value(b, name) or 0) - (metric_value(a, name) or 0)
    first_prefill = delta(before, middle, "kestrel_prompt_tokens_total")
    second_prefill = delta(middle, after, "kestrel_prompt_tokens_total")
    hits = delta(middle, after, "kestrel_prefix_cache_hits_total")
    check(first_prefill == n_prompt, f"paged: first request prefilled {first_prefill} of {n_prompt}")
    check(hits == (n_prompt - 1) // 16, f"paged: {hits} prefix cache hits for {n_prompt} tokens")
    check(second_prefill == n_prompt - 16 * hits,
          f"paged: second request prefilled {second_prefill} tokens, {hits} blocks cached")
    check(metric_value(after, "kestrel_kv_blocks_cached") >= hits, "paged: no cached blocks")
    print(f"ok prefix cache: the repeated prompt prefilled {int(second_prefill)} of {n_prompt} "
          "tokens, same output", flush=True)

    # Each request can need 240 / 16 = 15 of the 16 blocks: one runs at a time, the rest wait.
    prompts = [f"Request {i} waits for blocks." for i in range(3)]
    alone = []
    for p in prompts:
        status, _, r = client.post("/v1/completions", {"prompt": p, "max_tokens": 225,
                                                       "temperature": 0})
        check(status == 200, f"paged alone: {r}")
        alone.append(r["choices"][0]["text"])
    results = [None] * len(prompts)
    started = threading.Event()

    def worker(i):
        def note(conn, event):
            started.set()
            return True
        events = client.stream("/v1/completions",
                               {"prompt": prompts[i], "max_tokens": 225, "temperature": 0,
                                "stream": True}, note if i == 0 else None)
        results[i] = stream_text(events, "text")[0]

    threads = [threading.Thread(target=worker, args=(0,))]
    threads[0].start()
    check(started.wait(TIMEOUT), "paged: the first stream never started")
    threads += [threading.Thread(target=worker, args=(i,)) for i in (1, 2)]
    for t in threads[1:]:
        t.start()
    waited = [False]

    def one_runs_others_wait():
        text = metrics(client)
        if (metric_value(text, "kestrel_requests_waiting") or 0) >= 1:
            waited[0] = True
            check(metric_value(text, "kestrel_requests_running") <= 1,
                  "paged: two requests run in a pool that holds one")
        return all(r is not None for r in results)
    wait_for("the requests that wait for blocks", one_runs_others_wait, seconds=TIMEOUT * 3)
    for t in threads:
        t.join(TIMEOUT)
    for i in range(len(prompts)):
        check(results[i] == alone[i], f"paged: request {i}: {results[i]!r} != alone {alone[i]!r}")
    check(waited[0], "paged: no request was seen waiting for blocks")
    check(metric_value(metrics(client), "kestrel_kv_blocks_used") == 0,
          "paged: blocks still used after every request ended")
    print("ok a pool too small for every request at once queues them; all complete", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "main":
        run_main(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "busy":
        run_busy(int(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1] == "paged":
        run_paged(int(sys.argv[2]))
    else:
        fail("usage: serve_client.py main PORT KEY | busy PORT PID | paged PORT")
