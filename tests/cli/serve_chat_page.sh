#!/usr/bin/env bash
# The chat page at GET /, in headless Chromium (Debian's chromium, from scripts/setup): the test
# types a message, presses Enter and reads the streamed answer from the page; it must equal the
# API's own greedy answer to the same message. The page itself needs no API key; its requests do.
set -euo pipefail
# shellcheck source=tests/cli/serve_lib.bash
source "$2/tests/cli/serve_lib.bash"
serve_test_init "$1" "$2"
chromium=$(command -v chromium || true)
[ -n "$chromium" ] || { echo "chromium is not installed: run scripts/setup"; exit 1; }

start_server "$work/server.log" --parallel 2 -c 512 --api-key page-key
page=$(curl -s -w '\n%{http_code} %{content_type}' "http://127.0.0.1:$port/")
grep -q '^200 text/html' <<< "$(tail -1 <<< "$page")" || { echo "GET / is not a page:"; echo "$page" | tail -1; exit 1; }
grep -q '/v1/chat/completions' <<< "$page" || { echo "the page does not talk to the API"; exit 1; }

message="Tell me about kestrels."
expected=$(curl -s -H 'Authorization: Bearer page-key' -H 'Content-Type: application/json' \
  "http://127.0.0.1:$port/v1/chat/completions" \
  -d "{\"messages\": [{\"role\": \"user\", \"content\": \"$message\"}], \"temperature\": 0, \"max_tokens\": 24}" |
  python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["choices"][0]["message"]["content"]))')
python3 "$src/tests/cli/chat_page_browser.py" "$chromium" "http://127.0.0.1:$port/" "$message" \
  page-key >"$work/result.json" || { cat "$work/server.log"; exit 1; }
python3 - "$work/result.json" "$expected" "$message" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
expected = json.loads(sys.argv[2])
assert result["state"] == "done", result
assert result["user"] == sys.argv[3], result
assert expected, "the API answered with no text"
assert result["answer"] == expected, f"page {result['answer']!r} != API {expected!r}"
print(f"ok the page streamed {len(expected)} characters (seen at {result['lengths_seen']} "
      "lengths), equal to the API's answer")
PY

# Without the key the page still loads and shows the API's 401 in the conversation.
python3 "$src/tests/cli/chat_page_browser.py" "$chromium" "http://127.0.0.1:$port/" "$message" \
  >"$work/nokey.json" || { cat "$work/server.log"; exit 1; }
python3 - "$work/nokey.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
assert result["state"] == "error" and "API key" in result["answer"], result
print("ok without the key the page shows the 401 error")
PY
stop_server "$pid" "$work/server.log"
