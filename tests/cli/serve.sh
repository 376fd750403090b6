#!/usr/bin/env bash
# `kestrel serve` on a tiny synthetic model, driven over HTTP by tests/cli/serve_client.py: the
# OpenAI routes streamed and not, stop strings, usage, every error status, a client that hangs
# up, greedy and seeded output under 8 concurrent requests against single runs, then a second
# server for the full queue (429) and SIGTERM (503, final stream event, exit 0).
set -euo pipefail
kestrel="$1"
src="$2"
tokenizer="$src/.cache/tokenizers/qwen3/models"
[ -f "$tokenizer/tokenizer.json" ] || { echo "missing $tokenizer: run scripts/fetch_tokenizers.sh"; exit 1; }
client="$src/tests/cli/serve_client.py"
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# start_server LOG ARGS...: starts the server on a free port; sets $port and $pid once it is
# ready (up to 120 s).
start_server() {
  local log="$1"
  shift
  "$kestrel" serve -m synthetic:tiny-qwen2 --tokenizer "$tokenizer" --port 0 -a tiny-test "$@" \
    >"$log" 2>&1 &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 1200); do
    grep -q "ready:" "$log" && break
    kill -0 "$pid" 2>/dev/null || { echo "server died:"; cat "$log"; exit 1; }
    sleep 0.1
  done
  grep -q "ready:" "$log" || { echo "server never became ready:"; cat "$log"; exit 1; }
  port=$(sed -n 's|.*listening on http://127.0.0.1:\([0-9]*\).*|\1|p' "$log" | head -1)
  [ -n "$port" ] || { echo "no port in the log:"; cat "$log"; exit 1; }
}

# stop_server PID LOG: SIGTERM, then the exit status must be 0 within 60 s.
stop_server() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 600); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$1" 2>/dev/null; then echo "server ignored SIGTERM:"; cat "$2"; exit 1; fi
  local rc=0
  wait "$1" || rc=$?
  [ "$rc" -eq 0 ] || { echo "server exited with $rc:"; cat "$2"; exit 1; }
}

start_server "$work/main.log" --api-key secret-key --parallel 4 -c 512 --max-body 65536 \
  --max-tokens 400 --batch-tokens 64
curl -sf "http://127.0.0.1:$port/health" | grep -q '"ok"' || { echo "curl /health failed"; exit 1; }
python3 "$client" main "$port" secret-key || { cat "$work/main.log"; exit 1; }
stop_server "$pid" "$work/main.log"
echo "ok server exits 0 on SIGTERM"

start_server "$work/busy.log" --parallel 1 --max-queue 1 -c 8192 --max-tokens 8000 \
  --shutdown-grace 1
python3 "$client" busy "$port" "$pid" || { cat "$work/busy.log"; exit 1; }
for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
rc=0
wait "$pid" || rc=$?
[ "$rc" -eq 0 ] || { echo "busy server exited with $rc:"; cat "$work/busy.log"; exit 1; }
grep -q "kestrel serve: stopped" "$work/busy.log" || { cat "$work/busy.log"; exit 1; }
echo "ok busy server drained and exited 0"

# The defaults bind the loopback address only.
"$kestrel" serve --help | grep -q "127.0.0.1" || { echo "serve --help does not show the default host"; exit 1; }
