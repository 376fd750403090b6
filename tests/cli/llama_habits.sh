#!/usr/bin/env bash
# What llama.cpp users type (issue 9): its spellings work where Kestrel has the feature, the rest
# are refused by name; sampling seeds, --print-ids and --ids without a tokenizer behave as said.
set -uo pipefail
source "$(dirname "$0")/common.bash"
cli_setup "$@"
qwen_tok="$src/.cache/tokenizers/qwen3/models"
llama_tok="$src/.cache/tokenizers/llama3_1/models"
run_tiny=("$kestrel" run -m synthetic:tiny-qwen2 --tokenizer "$qwen_tok")

# --print-ids shows every generated id: 4 tokens, 4 ids (it used to drop the last one).
"$kestrel" run -m synthetic:tiny-llama --tokenizer "$llama_tok" -p hi -n 4 -q --print-ids \
  --ignore-eos >"$tmp/out" 2>"$tmp/err"
cli_check "--print-ids prints all 4 ids" [ "$(tail -n 1 "$tmp/out" | wc -w)" -eq 4 ]
grep -q "decode 3 tokens" "$tmp/err" || { echo "FAIL: not 4 tokens generated"; failures=$((failures + 1)); }

# --ids without a tokenizer prints the ids rather than nothing.
"$kestrel" run -m synthetic:tiny-qwen2 --ids 1,2,3 -n 5 -q >"$tmp/out" 2>/dev/null
cli_check "run --ids without a tokenizer prints 5 ids" [ "$(wc -w <"$tmp/out")" -eq 5 ]

# Spellings that CLI11 used to misread (-ngl as -n gl) or refuse.
cli_check "-ngl 0 runs on the CPU" "$kestrel" run -m synthetic:tiny-qwen2 --ids 1,2 -n 2 -ngl 0 -q
cli_check "--n-gpu-layers 0" "$kestrel" run -m synthetic:tiny-qwen2 --ids 1,2 -n 2 --n-gpu-layers 0 -q
if grep -q cuda <<< "$("$kestrel" --version)"; then
  echo "skip -ngl 99 without CUDA (this build has CUDA)"
else
  "$kestrel" run -m synthetic:tiny-qwen2 --ids 1,2 -n 2 -ngl 99 -q 2>"$tmp/err"
  cli_check "-ngl 99 asks for CUDA" grep -q "cuda" "$tmp/err"
fi
if [ -e /dev/nvidiactl ] || [ -e /proc/driver/nvidia/version ]; then
  echo "skip --device cuda without a GPU (this machine has an NVIDIA driver)"
else
  "$kestrel" run -m synthetic:tiny-qwen2 --ids 1,2 -n 2 --device cuda -q 2>"$tmp/err"
  cli_check "--device cuda without a GPU says so" grep -q "this machine has no CUDA device" "$tmp/err"
fi
cli_check "--ctx-size and -b" "$kestrel" run -m synthetic:tiny-qwen2 --ids 1,2 -n 2 --ctx-size 64 -b 8 -q
echo "Once upon a time" >"$tmp/prompt.txt"
a=$("${run_tiny[@]}" -f "$tmp/prompt.txt" -n 6 -q 2>/dev/null)
b=$(echo "Once upon a time" | "${run_tiny[@]}" -p - -n 6 -q 2>/dev/null)
c=$("${run_tiny[@]}" -p "Once upon a time
" -n 6 -q 2>/dev/null)
same=no
[ -n "$a" ] && [ "$a" = "$b" ] && [ "$b" = "$c" ] && same=yes
cli_check "-f FILE, -p - and -p TEXT give the same text" [ "$same" = yes ]
printf '/exit\n' | "${run_tiny[@]}" -cnv -n 2 -q >/dev/null 2>&1
cli_check "-cnv starts a chat" [ $? -eq 0 ]
printf '/exit\n' | "${run_tiny[@]}" -sys "Be brief." -n 2 -q >"$tmp/out" 2>&1
cli_check "-sys starts a chat" grep -q "^> " "$tmp/out"
printf '/exit\n' | "$kestrel" chat -m synthetic:tiny-qwen2 --tokenizer "$qwen_tok" -i -n 2 -q >/dev/null 2>&1
cli_check "chat -i" [ $? -eq 0 ]
printf '/help\n/exit\n' | "$kestrel" chat -m synthetic:tiny-qwen2 --tokenizer "$qwen_tok/tokenizer.json" \
  -n 2 -q >"$tmp/out" 2>&1
cli_check "chat --tokenizer FILE finds tokenizer_config.json beside it" grep -q "/reset clears" "$tmp/out"

for flag in -fa --flash-attn --mlock -ctk --no-mmap -r; do
  "$kestrel" run -m synthetic:tiny-qwen2 --ids 1 "$flag" -q >/dev/null 2>"$tmp/err"
  status=$?
  refused=no
  [ "$status" -ne 0 ] && [ "$(wc -l <"$tmp/err")" -eq 1 ] &&
    grep -qF -- "$flag is a llama.cpp flag" "$tmp/err" && refused=yes
  cli_check "$flag refused by name" [ "$refused" = yes ]
done
"$kestrel" run -m synthetic:tiny-qwen2 --ids 1 -ctk q8_0 -q 2>"$tmp/err"
cli_check "-ctk names --kv-cache" grep -q -- "--kv-cache" "$tmp/err"
# -s is llama.cpp's --seed: the same seed, the same text.
first=$("${run_tiny[@]}" -p hi -n 6 --temp 0.8 -s 7 -q 2>/dev/null)
again=$("${run_tiny[@]}" -p hi -n 6 --temp 0.8 --seed 7 -q 2>/dev/null)
same=no
[ -n "$first" ] && [ "$first" = "$again" ] && same=yes
cli_check "-s N is --seed N" [ "$same" = yes ]
# serve's -b is its --batch-tokens (llama-server's -b): below --parallel it is refused as that
# flag is, and a -b that disagrees with --batch-tokens is refused; -np is --parallel.
"$kestrel" serve -m synthetic:tiny-qwen2 --tokenizer "$qwen_tok" --port 0 -np 4 -b 2 -q 2>"$tmp/err"
cli_check "serve -b is --batch-tokens" grep -q -- "--batch-tokens must be at least --parallel" "$tmp/err"
"$kestrel" serve -m synthetic:tiny-qwen2 --tokenizer "$qwen_tok" --port 0 -b 64 --batch-tokens 128 \
  -q 2>"$tmp/err"
cli_check "serve -b and --batch-tokens disagreeing are refused" grep -q "disagree" "$tmp/err"
"$kestrel" run -m synthetic:tiny-qwen2 --ids 1 --reverse-prompt x -q 2>"$tmp/err"
cli_check "--reverse-prompt names --stop" grep -q -- "--stop" "$tmp/err"

# Seeds: -1 means random and the seed is printed; without --seed too; other negatives are errors.
"${run_tiny[@]}" -p hi -n 2 --temp 0.8 --seed -1 -q >/dev/null 2>"$tmp/err"
cli_check "--seed -1 draws and prints a seed" grep -q "sampling seed [0-9]" "$tmp/err"
"${run_tiny[@]}" -p hi -n 2 --temp 0.8 -q >/dev/null 2>"$tmp/err"
seed=$(sed -n 's/^sampling seed \([0-9]*\).*/\1/p' "$tmp/err")
cli_check "no --seed draws and prints a seed" [ -n "$seed" ]
first=$("${run_tiny[@]}" -p hi -n 6 --temp 0.8 --seed "$seed" -q 2>/dev/null)
again=$("${run_tiny[@]}" -p hi -n 6 --temp 0.8 --seed="$seed" -q 2>/dev/null)
cli_check "the printed seed repeats the run" [ "$first" = "$again" ]

# -c past the trained context is allowed, with a warning.
"$kestrel" run -m synthetic:tiny-qwen2 --ids 1 -n 1 -c 40000 -q 2>"$tmp/err" >/dev/null
cli_check "-c past max_position_embeddings warns (run)" grep -q "warning: -c 40000 is past the model's trained context" "$tmp/err"
"$kestrel" logits -m synthetic:tiny-qwen2 --ids 1 -c 40000 -q -o "$tmp/l.f32" 2>"$tmp/err"
cli_check "-c past max_position_embeddings warns (logits)" grep -q "warning: -c 40000 is past" "$tmp/err"

# The default device is CUDA when built in and present, else the CPU, and the load line says which.
# ctest sets KESTREL_DEVICE=cpu for the CLI tests; this check is about the default, so it unsets it.
env -u KESTREL_DEVICE "$kestrel" run -m synthetic:tiny-qwen2 --ids 1 -n 1 2>"$tmp/err" >/dev/null
if grep -q cuda <<< "$("$kestrel" --version)" && { [ -e /dev/nvidiactl ] || [ -e /proc/driver/nvidia/version ]; }; then
  cli_check "default device: cuda here" grep -q "loaded in .* on cuda" "$tmp/err"
else
  cli_check "default device: cpu here" grep -q "loaded in .* on cpu" "$tmp/err"
fi

# KESTREL_DEVICE says what --device auto means.
KESTREL_DEVICE=cpu "$kestrel" run -m synthetic:tiny-qwen2 --ids 1 -n 1 2>"$tmp/err" >/dev/null
cli_check "KESTREL_DEVICE=cpu picks the CPU" grep -q "loaded in .* on cpu" "$tmp/err"

# convert runs no model: a run-time flag there is refused, not ignored.
"$kestrel" convert -m synthetic:tiny-qwen2 -o "$tmp/conv" --device cpu -q 2>"$tmp/err"
cli_check "convert --device is refused" grep -q "not expected" "$tmp/err"
cli_check "convert wrote nothing then" [ ! -e "$tmp/conv/config.json" ]

# --help shows the defaults.
"$kestrel" run --help >"$tmp/help"
cli_check "--help shows defaults" grep -q -- "-n,--n-predict INT=128" "$tmp/help"
cli_check "--help shows the default device" grep -q -- "--device TEXT=auto" "$tmp/help"

cli_finish
