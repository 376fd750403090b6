#!/usr/bin/env bash
# `--tensor-parallel N` (-tp N) on the CPU stand-in: logits of a split HF fixture equal the
# unsplit ones within fp32 rounding, `run` gives HF's greedy ids split 2 ways, and splits that
# do not divide are refused with one line naming the flag's problem.
set -euo pipefail
source "$(dirname "$0")/common.bash"
cli_setup "$@"

model="$src/tests/golden/models/llama3-scaled-bf16-sharded"
read -r prompt greedy < <(python3 -c "
import json; r = json.load(open('$model/reference.json'))
print(','.join(map(str, r['prompt'])), ','.join(map(str, r['greedy'])))")

"$kestrel" logits -m "$model" --ids "$prompt" --low-bit fp32 --device cpu -q -o "$tmp/whole.f32"
for n in 2 4; do
  "$kestrel" logits -m "$model" --ids "$prompt" --low-bit fp32 --device cpu -tp "$n" -q \
    -o "$tmp/split$n.f32"
done
close() {
  python3 - "$tmp/whole.f32" "$@" <<'PY'
import struct, sys
def floats(p):
    b = open(p, "rb").read()
    return struct.unpack("<%df" % (len(b) // 4), b)
whole = floats(sys.argv[1])
vocab = 384
for path in sys.argv[2:]:
    split = floats(path)
    assert len(split) == len(whole), (path, len(split), len(whole))
    for row in range(len(whole) // vocab):
        a = whole[row * vocab:(row + 1) * vocab]
        b = split[row * vocab:(row + 1) * vocab]
        diff = sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5
        norm = sum(x * x for x in a) ** 0.5
        assert diff <= 1e-5 * norm, (path, row, diff / norm)
PY
}
cli_check "logits split 2 and 4 ways equal unsplit" close "$tmp/split2.f32" "$tmp/split4.f32"

run_split() {
  local got
  got=$("$kestrel" run -m "$model" --low-bit fp32 --device cpu --tensor-parallel 2 \
    --ids "$prompt" -n 32 --temp 0 --print-ids -q 2>"$tmp/run.err" | tr -s ' \n' ',' |
    sed 's/,$//')
  [ "$got" = "$greedy" ] || { echo "got $got, want $greedy"; return 1; }
  grep -q "tok/s" "$tmp/run.err"
}
cli_check "run -tp 2 gives HF's greedy ids" run_split

# The benchmark runs a split model, names it in the backend column and plans every rank.
bench_split() {
  "$kestrel" bench -m synthetic:tiny-qwen2 -p 16 -n 4 -r 1 --device cpu -tp 2 -o csv \
    >"$tmp/bench.csv" 2>"$tmp/bench.err" || { cat "$tmp/bench.err"; return 1; }
  [ "$(grep -c ' x2,.*,ok$' "$tmp/bench.csv")" -eq 2 ] || { cat "$tmp/bench.csv"; return 1; }
  grep -q "planned" "$tmp/bench.err"
}
cli_check "bench -tp 2 runs both tests" bench_split

# Refusals: one line, non-zero exit, the reason named.
refused() {
  local want="$1"
  shift
  if "$kestrel" "$@" -q >"$tmp/out" 2>"$tmp/err"; then echo "accepted: $*"; return 1; fi
  [ "$(wc -l <"$tmp/err")" -eq 1 ] || { cat "$tmp/err"; return 1; }
  grep -q -- "$want" "$tmp/err" || { cat "$tmp/err"; return 1; }
}
cli_check "-tp 0 refused" refused "--tensor-parallel" run -m synthetic:tiny-qwen2 --ids 1,2 -n 1 \
  --device cpu -tp 0
cli_check "-tp 3 refused: heads" refused "attention heads" run -m synthetic:tiny-qwen2 --ids 1,2 \
  -n 1 --device cpu -tp 3
cli_check "-tp 4 refused: blocks" refused "block 32" run -m synthetic:tiny-llama --ids 1,2 -n 1 \
  --device cpu -tp 4
cli_finish
