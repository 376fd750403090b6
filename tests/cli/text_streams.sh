#!/usr/bin/env bash
# Standard input as a stream: `kestrel tokenize` prints the ids of each complete line before the
# rest arrives, equal to the whole text's, and tokenizes more than it could ever hold; `kestrel
# chat` drops its oldest turns (keeping the system prompt) when the conversation outgrows the
# context, says so once, and goes on answering.
set -uo pipefail
source "$(dirname "$0")/common.bash"
cli_setup "$@"
tok="$src/.cache/tokenizers/qwen3/models"
[ -f "$tok/tokenizer.json" ] || { echo "missing $tok: run scripts/fetch_tokenizers.sh"; exit 1; }

# --- tokenize streams ---------------------------------------------------------------------------
mkfifo "$tmp/in"
"$kestrel" tokenize --tokenizer "$tok" <"$tmp/in" >"$tmp/streamed" 2>"$tmp/err" &
pid=$!
exec 3>"$tmp/in"
printf 'Hello world, this is the first line.\nAnd a second' >&3
# The first line's ids come out while standard input is still open (polled for up to 60 s).
seen=no
for _ in $(seq 600); do
  if grep -q '^\[[0-9]' "$tmp/streamed"; then seen=yes; break; fi
  sleep 0.1
done
cli_check "tokenize prints the first line's ids before the input ends" [ "$seen" = yes ]
printf ' one, which ends here.\n\n  Third: indented.' >&3
exec 3>&-
wait "$pid"
cli_check "tokenize exits 0 at the end of the stream" [ $? -eq 0 ]
text=$'Hello world, this is the first line.\nAnd a second one, which ends here.\n\n  Third: indented.'
python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$text" |
  "$kestrel" tokenize --tokenizer "$tok" --jsonl >"$tmp/whole"
cli_check "streamed ids equal the whole text's" cmp -s "$tmp/streamed" "$tmp/whole"

# More text than the 64 MiB a stretch may hold, in lines: memory holds one line at a time.
if [ -z "${KESTREL_TEST_SANITIZED:-}" ]; then
  yes 'The quick brown fox jumps over the lazy dog.' | head -c 70000000 |
    "$kestrel" tokenize --tokenizer "$tok" | tail -c 20 >"$tmp/big" 2>"$tmp/big.err"
  cli_check "tokenize streams 70 MB of lines (past the 64 MiB stretch limit)" \
    grep -q '[0-9]\]$' "$tmp/big"
fi

# --- chat context shift ------------------------------------------------------------------------
printf 'Tell me about the sea and its waves.\nNow tell me about mountains and rivers.\nAnd the sky at night, with its stars?\nFinally, the desert.\n' >"$tmp/turns"
timeout 300 "$kestrel" chat -m synthetic:tiny-qwen2 --tokenizer "$tok" -c 110 -n 8 \
  --system 'Be brief.' <"$tmp/turns" >"$tmp/chat.out" 2>"$tmp/chat.err"
status=$?
cli_check "chat past its context exits 0" [ "$status" -eq 0 ]
cli_check "chat says once per shift that the oldest turns were dropped" \
  grep -q "context full: the [0-9]* oldest messages were dropped to fit the context of 110 tokens; the system prompt stays" "$tmp/chat.out"
cli_check "chat answers every turn" [ "$(grep -c ' generated, ' "$tmp/chat.err")" -eq 4 ]
# After a shift the rendered conversation still begins with the system prompt, so the cached
# tokens of that prefix are reused.
last=$(grep ' generated, ' "$tmp/chat.err" | tail -1)
cli_check "the shifted conversation keeps the system prompt's cached prefix" \
  bash -c "echo '$last' | grep -Eq '\(([1-9][0-9]*) reused\)'"
if [ "$failures" -ne 0 ]; then
  echo "--- chat stdout"; cat "$tmp/chat.out"; echo "--- chat stderr"; cat "$tmp/chat.err"
fi
cli_finish
