#!/usr/bin/env bash
# AWQ / GPTQ directories (tests/golden/prequant, written by scripts/make_prequant_fixtures.py)
# through the CLI: one load line saying what happened, `convert` to a Kestrel directory that
# gives the same logits, and another --low-bit requantizing (said so on the load line).
set -uo pipefail
source "$(dirname "$0")/common.bash"
cli_setup "$@"
awq="$src/tests/golden/prequant/qwen2-tied.awq-g64"
gptq="$src/tests/golden/prequant/llama-tied-bias.gptq-sym-g32"
ids=1,5,9,33,2

load_line_ok() {
  "$kestrel" run -m "$awq" --ids "$ids" -n 4 -t 2 >"$tmp/run.out" 2>"$tmp/run.err" || return 1
  grep -q "14 AWQ matrices (group 64) -> asym_int4 block 32 (copied" "$tmp/run.err" &&
    [ "$(grep -c 'AWQ matrices' "$tmp/run.err")" -eq 1 ]
}
cli_check "run on an AWQ directory: one load line" load_line_ok

sym_ok() {
  "$kestrel" logits -m "$gptq" --ids "$ids" -t 2 -o "$tmp/g.f32" 2>"$tmp/g.err" &&
    grep -q "GPTQ matrices (group 32) -> sym_int4 block 32 (copied exactly)" "$tmp/g.err"
}
cli_check "GPTQ sym loads as sym_int4" sym_ok

convert_ok() {
  "$kestrel" convert -m "$awq" -o "$tmp/conv" -q -t 2 &&
    "$kestrel" logits -m "$awq" --ids "$ids" -t 2 -q -o "$tmp/a.f32" &&
    "$kestrel" logits -m "$tmp/conv" --ids "$ids" -t 2 -q -o "$tmp/b.f32" &&
    cmp -s "$tmp/a.f32" "$tmp/b.f32" && ! grep -q quantization_config "$tmp/conv/config.json"
}
cli_check "convert an AWQ directory: same logits, plain config" convert_ok

requant_ok() {
  "$kestrel" logits -m "$awq" --ids "$ids" -t 2 --low-bit sym_int8 -o "$tmp/c.f32" \
    2>"$tmp/c.err" && grep -q "sym_int8 block 32 (requantized: precision lost)" "$tmp/c.err"
}
cli_check "another --low-bit requantizes, and says so" requant_ok

cli_finish
