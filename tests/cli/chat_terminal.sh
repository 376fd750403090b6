#!/usr/bin/env bash
# `kestrel chat` driven in a real terminal (tmux) the way a person uses it: type a message, read
# the streamed reply, type another (the second turn reuses the first turn's KV cache), then quit.
# Also `run -p` streams text and ends with the speed line.
set -euo pipefail
kestrel="$1"
src="$2"
tokenizer="$src/.cache/tokenizers/qwen3/models"
[ -f "$tokenizer/tokenizer.json" ] || { echo "missing $tokenizer: run scripts/fetch_tokenizers.sh"; exit 1; }

out=$("$kestrel" run -m synthetic:tiny-qwen2 --tokenizer "$tokenizer" -p "Once upon a time" -n 12 \
  --temp 0.7 --seed 5 -q 2>&1)
grep -q "decode 11 tokens" <<< "$out" || { echo "run -p: no speed line:"; echo "$out"; exit 1; }
again=$("$kestrel" run -m synthetic:tiny-qwen2 --tokenizer "$tokenizer" -p "Once upon a time" \
  -n 12 --temp 0.7 --seed 5 -q 2>/dev/null)
[ "$again" = "$("$kestrel" run -m synthetic:tiny-qwen2 --tokenizer "$tokenizer" \
  -p "Once upon a time" -n 12 --temp 0.7 --seed 5 -q 2>/dev/null)" ] || { echo "same seed, different text"; exit 1; }
echo "ok run -p streams text; same seed gives the same text"

# Each part runs in its own tmux server (its own socket, -S): killing a server's last session
# makes that server exit, and a client that connects while it is exiting fails with "server
# exited unexpectedly" (this failed CI once). A fresh socket never meets a dying server.
session="kestrel-chat"
sockets=$(mktemp -d)
socket="$sockets/1"
tmux() { command tmux -S "$socket" "$@"; }
tmux new-session -d -s "$session" -x 200 -y 50 \
  "$kestrel chat -m synthetic:tiny-qwen2 --tokenizer $tokenizer -n 6 --system 'Be brief.'; echo CHAT-EXITED; sleep 30"
trap 'tmux kill-server 2>/dev/null || true; rm -rf "$sockets"' EXIT

# wait_for PATTERN: polls the pane for up to 120 s (a few seconds on an idle machine; CI's two
# cores may be shared with a build). -J joins wrapped lines: a long reply can wrap the terminal's
# 200 columns in the middle of "(stopped)". -J also keeps trailing spaces, so a pane is ~10 KB:
# it goes to grep -q as a here-string, never through a pipe, where grep's early exit would
# kill the writer with SIGPIPE and pipefail would fail a check that matched.
wait_for() {
  for _ in $(seq 1200); do
    grep -q -- "$1" <<< "$(tmux capture-pane -p -J -t "$session")" && return 0
    sleep 0.1
  done
  echo "terminal never showed '$1':"; tmux capture-pane -p -t "$session"; exit 1
}

# wait_for_count PATTERN N: until N lines of the pane match.
wait_for_count() {
  for _ in $(seq 1200); do
    [ "$(tmux capture-pane -p -J -t "$session" | grep -c -- "$1")" -ge "$2" ] && return 0
    sleep 0.1
  done
  echo "terminal never showed $2 x '$1':"; tmux capture-pane -p -t "$session"; exit 1
}

wait_for "^>"
tmux send-keys -t "$session" "Hello, who are you?" Enter
wait_for_count "6 generated" 1
tmux send-keys -t "$session" "Tell me more." Enter
wait_for_count "6 generated" 2
pane=$(tmux capture-pane -p -J -t "$session")
grep -q "Hello, who are you?" <<< "$pane" || { echo "typed text not echoed"; exit 1; }
# The second turn must reuse the first turn's cache: "(N reused)" with N > 0.
grep -Eq "\(([1-9][0-9]*) reused\)" <<< "$pane" || { echo "second turn reused nothing:"; echo "$pane"; exit 1; }
# Line editing and history (libedit): the up arrow brings back the last line, which is edited
# (Ctrl-A goes to its start) and sent as a third turn.
if ldd "$kestrel" 2>/dev/null | grep libedit >/dev/null; then
  tmux send-keys -t "$session" Up C-a "Again: "
  tmux send-keys -t "$session" Enter
  wait_for_count "6 generated" 3
  grep -q "Again: Tell me more." <<< "$(tmux capture-pane -p -J -t "$session")" ||
    { echo "history and editing: no 'Again: Tell me more.' line:"; tmux capture-pane -p -t "$session"; exit 1; }
  echo "ok chat recalls and edits the previous line (libedit)"
else
  echo "skip line editing: this kestrel is built without libedit"
fi
tmux send-keys -t "$session" "/exit" Enter
wait_for "CHAT-EXITED"
echo "ok chat in a terminal: two turns, cache reused, /exit quits"

# Ctrl-C stops a long reply and returns to the prompt; at an empty prompt, Ctrl-C twice quits.
tmux kill-server 2>/dev/null || true
socket="$sockets/2"
tmux new-session -d -s "$session" -x 200 -y 50 \
  "$kestrel chat -m synthetic:tiny-qwen2 --tokenizer $tokenizer -n 3000 --ignore-eos; echo CHAT-EXITED; sleep 30"
wait_for "^>"
tmux send-keys -t "$session" "Tell me a very long story." Enter
# Ctrl-C must land while the reply streams, not before chat has read the line (on a busy machine
# a fixed sleep is not enough): wait for 40 characters of reply after the typed line.
reply_started() {
  tmux capture-pane -p -J -t "$session" | awk '/Tell me a very long story\./ {on = 1; next} on' |
    tr -d '\n' | wc -c
}
for _ in $(seq 1200); do
  [ "$(reply_started)" -ge 40 ] && break
  sleep 0.1
done
[ "$(reply_started)" -ge 40 ] || { echo "the long reply never started:"; tmux capture-pane -p -t "$session"; exit 1; }
tmux send-keys -t "$session" C-c
wait_for "(stopped)"
wait_for "interrupted\]"
wait_for_count "^>" 2
tmux send-keys -t "$session" C-c
wait_for "Ctrl-C again quits"
tmux send-keys -t "$session" C-c
wait_for "CHAT-EXITED"
echo "ok Ctrl-C stops a reply, and twice at the prompt quits"
