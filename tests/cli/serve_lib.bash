# Shared by the server tests (sourced; not a test itself): start and stop `kestrel serve` on the
# tiny synthetic model. Needs $kestrel and $tokenizer; appends started pids to $pids.

# serve_test_init KESTREL SRC: sets $kestrel, $src, $tokenizer (failing when the tokenizer data is
# missing), a scratch directory $work, and an exit trap that kills the started servers and
# removes $work.
serve_test_init() {
  kestrel="$1"
  src="$2"
  tokenizer="$src/.cache/tokenizers/qwen3/models"
  [ -f "$tokenizer/tokenizer.json" ] ||
    { echo "missing $tokenizer: run scripts/fetch_tokenizers.sh"; exit 1; }
  work=$(mktemp -d)
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
}

# start_server LOG ARGS...: starts the server on a free port; sets $port and $pid once it says
# it is ready (up to 120 s).
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

# wait_exit PID LOG: the server must exit with status 0 within 60 s.
wait_exit() {
  for _ in $(seq 600); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$1" 2>/dev/null; then echo "server did not exit:"; cat "$2"; exit 1; fi
  local rc=0
  wait "$1" || rc=$?
  [ "$rc" -eq 0 ] || { echo "server exited with $rc:"; cat "$2"; exit 1; }
}

# stop_server PID LOG: SIGTERM, then wait_exit.
stop_server() {
  kill -TERM "$1" 2>/dev/null || true
  wait_exit "$1" "$2"
}
