#!/usr/bin/env bash
# `kestrel serve` on a tiny synthetic model, driven over HTTP by tests/cli/serve_client.py: the
# OpenAI routes streamed and not, stop strings, usage, every error status, a client that hangs
# up, greedy and seeded output under 8 concurrent requests against single runs, a load test (64
# concurrent streaming clients, 192 requests), then a second server for a stalled client, the
# full queue (429) and SIGTERM (503, final stream event, exit 0), and /health while loading; a
# server with a small KV pool for the prefix cache and requests that wait for blocks.
set -euo pipefail
# shellcheck source=tests/cli/serve_lib.bash
source "$2/tests/cli/serve_lib.bash"
serve_test_init "$1" "$2"
client="$src/tests/cli/serve_client.py"

start_server "$work/main.log" --api-key secret-key --parallel 4 -c 512 --max-body 65536 \
  --max-tokens 400 --batch-tokens 64
grep -q '"ok"' <<< "$(curl -sf "http://127.0.0.1:$port/health")" || { echo "curl /health failed"; exit 1; }
python3 "$client" main "$port" secret-key || { cat "$work/main.log"; exit 1; }
stop_server "$pid" "$work/main.log"
echo "ok server exits 0 on SIGTERM"

start_server "$work/paged.log" --parallel 4 -c 256 --kv-blocks 16 --max-tokens 240
python3 "$client" paged "$port" || { cat "$work/paged.log"; exit 1; }
stop_server "$pid" "$work/paged.log"
echo "ok paged KV cache: prefix reuse and waiting for blocks"

# --max-memory sizes the pool on the CPU too: 90% of what the 11.2 MB of weights leave of 24 MB,
# less the workspace, is fewer blocks than the 8 x 16 of every slot's full context.
start_server "$work/capped.log" --parallel 8 -c 256 --batch-tokens 16 --max-memory 24MB
blocks=$(sed -n 's|.*KV cache of \([0-9]*\) blocks of 16 positions within --max-memory 24MB.*|\1|p' \
  "$work/capped.log")
[ -n "$blocks" ] && [ "$blocks" -ge 16 ] && [ "$blocks" -lt 128 ] ||
  { echo "serve --max-memory 24MB: want 16 to 127 blocks named with the cap:"; cat "$work/capped.log"; exit 1; }
code=$(curl -s -o /dev/null -w '%{http_code}' -d '{"prompt": "hi", "max_tokens": 4}' \
  "http://127.0.0.1:$port/v1/completions")
[ "$code" = 200 ] || { echo "completion under --max-memory: $code"; cat "$work/capped.log"; exit 1; }
stop_server "$pid" "$work/capped.log"
echo "ok serve --max-memory sizes the KV pool from the cap ($blocks blocks)"

# A cap that the default 512 tokens a call does not fit (their logit rows alone are 19 MB of the
# tiny model's 151936-word vocabulary a row at 32 tokens): the engine halves the chunk until the
# pool holds a context beside it, says so, and a prompt longer than the chunk runs in several
# calls.
start_server "$work/shrunk.log" --parallel 2 -c 512 --max-memory 36MB
chunk=$(sed -n 's|.*prefill chunk 512 -> \([0-9]*\) tokens per call to fit --max-memory 36MB.*|\1|p' \
  "$work/shrunk.log")
[ -n "$chunk" ] && [ "$chunk" -ge 16 ] && [ "$chunk" -lt 512 ] ||
  { echo "serve --max-memory 36MB: want a shrunk prefill chunk named in a warning:"; cat "$work/shrunk.log"; exit 1; }
prompt=$(printf 'word %.0s' $(seq 120))
body=$(curl -s -w ' %{http_code}' -d "{\"prompt\": \"$prompt\", \"max_tokens\": 4}" \
  "http://127.0.0.1:$port/v1/completions")
[ "${body##* }" = 200 ] && grep -q '"prompt_tokens":1[0-9][0-9]' <<< "$body" ||
  { echo "a 120-word prompt at chunk $chunk: $body"; cat "$work/shrunk.log"; exit 1; }
stop_server "$pid" "$work/shrunk.log"
echo "ok serve shrinks the prefill chunk to fit --max-memory (512 -> $chunk) and runs longer prompts"

start_server "$work/busy.log" --parallel 1 --max-queue 1 -c 8192 --max-tokens 8000 \
  --shutdown-grace 1 --timeout 3
python3 "$client" busy "$port" "$pid" || { cat "$work/busy.log"; exit 1; }
wait_exit "$pid" "$work/busy.log"
grep -q "kestrel serve: stopped" "$work/busy.log" || { cat "$work/busy.log"; exit 1; }
echo "ok busy server drained and exited 0"

# While the model loads, the server already answers: /health and generation say 503 "loading".
# (qwen2-0.5b takes seconds to build; the check runs as soon as the server has bound its port.)
"$kestrel" serve -m synthetic:qwen2-0.5b --tokenizer "$tokenizer" --port 0 --parallel 1 -c 64 \
  >"$work/load.log" 2>&1 &
pid=$!
pids+=("$pid")
for _ in $(seq 600); do grep -q "listening on" "$work/load.log" && break; sleep 0.05; done
port=$(sed -n 's|.*listening on http://127.0.0.1:\([0-9]*\).*|\1|p' "$work/load.log" | head -1)
[ -n "$port" ] || { echo "no port:"; cat "$work/load.log"; exit 1; }
health=$(curl -s -w ' %{http_code}' "http://127.0.0.1:$port/health")
[ "$health" = '{"status":"loading"} 503' ] || { echo "/health while loading: $health"; exit 1; }
early=$(curl -s -o /dev/null -w '%{http_code}' -d '{"prompt": "x"}' "http://127.0.0.1:$port/v1/completions")
[ "$early" = 503 ] || { echo "completion while loading: $early"; exit 1; }
for _ in $(seq 1200); do grep -q "ready:" "$work/load.log" && break; sleep 0.1; done
[ "$(curl -s -w ' %{http_code}' "http://127.0.0.1:$port/health")" = '{"status":"ok"} 200' ] ||
  { echo "/health after loading is not 200:"; cat "$work/load.log"; exit 1; }
stop_server "$pid" "$work/load.log"
echo "ok /health says 503 loading, then 200"

# A load that fails (a KV pool smaller than one context) while requests arrive: the server stops
# its HTTP workers, then exits 1 with the error (exit() used to destroy httplib's static objects
# under workers answering 503 "loading", which ThreadSanitizer reported as reads of freed memory).
"$kestrel" serve -m synthetic:qwen2-0.5b --tokenizer "$tokenizer" --port 0 --parallel 1 -c 64 \
  --kv-blocks 1 >"$work/fail.log" 2>&1 &
pid=$!
pids+=("$pid")
for _ in $(seq 600); do grep -q "listening on" "$work/fail.log" && break; sleep 0.05; done
port=$(sed -n 's|.*listening on http://127.0.0.1:\([0-9]*\).*|\1|p' "$work/fail.log" | head -1)
[ -n "$port" ] || { echo "no port:"; cat "$work/fail.log"; exit 1; }
pollers=()
for _ in 1 2 3 4; do
  (while kill -0 "$pid" 2>/dev/null; do
    curl -s -o /dev/null "http://127.0.0.1:$port/health" || true
    curl -s -o /dev/null -d '{"prompt": "x"}' "http://127.0.0.1:$port/v1/completions" || true
    sleep 0.02
  done) &
  pollers+=("$!")
done
rc=0
wait "$pid" || rc=$?
wait "${pollers[@]}"
[ "$rc" -eq 1 ] && grep -q "cannot hold one full context" "$work/fail.log" ||
  { echo "a failed load under requests exited $rc:"; cat "$work/fail.log"; exit 1; }
echo "ok a load that fails under requests exits 1 with the error"

# The defaults bind the loopback address only.
grep -q "127.0.0.1" <<< "$("$kestrel" serve --help)" || { echo "serve --help does not show the default host"; exit 1; }
