#!/usr/bin/env bash
# The CLI end to end on an HF fixture: greedy ids equal HF's, `logits` writes HF-sized output,
# and a converted model reloads to bit-identical logits.
set -euo pipefail
kestrel="$1"
src="$2"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

grep -q "backends: cpu" <<< "$("$kestrel" --version)"

model="$src/tests/golden/models/llama3-scaled-bf16-sharded"
read -r prompt greedy < <(python3 -c "
import json; r = json.load(open('$model/reference.json'))
print(','.join(map(str, r['prompt'])), ' '.join(map(str, r['greedy'])).replace(' ', ','))")

got=$("$kestrel" run -m "$model" --low-bit fp32 --ids "$prompt" -n 32 --temp 0 --print-ids -q \
  2>"$tmp/run.err" | tr -s ' \n' ',' | sed 's/,$//')
if [ "$got" != "$greedy" ]; then
  echo "greedy ids differ from HF:"; echo " got  $got"; echo " want $greedy"; exit 1
fi
grep -q "tok/s" "$tmp/run.err"
echo "ok greedy ids equal HF's"

"$kestrel" logits -m "$model" --ids "$prompt" --low-bit sym_int4 -q -o "$tmp/direct.f32"
size=$(stat -c %s "$tmp/direct.f32")
want=$((48 * 384 * 4))
[ "$size" -eq "$want" ] || { echo "logits file is $size bytes, want $want"; exit 1; }

"$kestrel" convert -m "$model" --low-bit sym_int4 -q -o "$tmp/converted"
"$kestrel" logits -m "$tmp/converted" --ids "$prompt" -q -o "$tmp/reloaded.f32"
cmp "$tmp/direct.f32" "$tmp/reloaded.f32"
echo "ok converted model reloads bit-identically"

# Synthetic models run with no files at all.
"$kestrel" run -m synthetic:tiny-qwen2 --ids 1,2,3 -n 8 --print-ids -q >"$tmp/ids" 2>/dev/null
[ "$(wc -w <"$tmp/ids")" -eq 8 ]
echo "ok synthetic model generates"
