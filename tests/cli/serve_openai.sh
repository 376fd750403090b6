#!/usr/bin/env bash
# The official OpenAI JavaScript client (pinned, fetched by scripts/fetch_openai_client.sh)
# drives `kestrel serve` on a tiny synthetic model: tests/cli/serve_openai.mjs.
set -euo pipefail
kestrel="$1"
src="$2"
tokenizer="$src/.cache/tokenizers/qwen3/models"
openai="$src/.cache/npm/openai"
[ -f "$tokenizer/tokenizer.json" ] || { echo "missing $tokenizer: run scripts/fetch_tokenizers.sh"; exit 1; }
[ -f "$openai/index.mjs" ] || { echo "missing $openai: run scripts/fetch_openai_client.sh"; exit 1; }
command -v node >/dev/null || { echo "node is missing (scripts/setup installs it)"; exit 1; }
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
# shellcheck source=tests/cli/serve_lib.bash
source "$src/tests/cli/serve_lib.bash"
start_server "$work/server.log" --api-key test-key --parallel 4 -c 512 --max-body 65536 \
  --max-tokens 400
node "$src/tests/cli/serve_openai.mjs" "$openai" "$port" test-key || { cat "$work/server.log"; exit 1; }
stop_server "$pid" "$work/server.log"
echo "ok server exits 0 on SIGTERM"
