#!/usr/bin/env bash
# `--device cuda` goes through the CUDA module (libkestrel_cuda.so, loaded at run time). With a
# GPU, the module's greedy ids on the HF fixture equal the CPU's; without one (or without the
# module or the CUDA libraries), the command fails cleanly with one line that says what is
# missing. The CPU path must not load the CUDA libraries at all.
set -uo pipefail
kestrel="$1"
src="$2"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

model="$src/tests/golden/models/llama3-scaled-bf16-sharded"
run() { "$kestrel" run -m "$model" --low-bit fp16 --ids 1,2,3,4 -n 8 --temp 0 --print-ids -q "$@"; }

# glibc's loader lists every library it opens.
LD_DEBUG=libs "$kestrel" run -m synthetic:tiny-qwen2 --ids 1,2,3 -n 2 -q >/dev/null 2>"$tmp/libs"
if grep -Eq 'libcudart|libcublas' "$tmp/libs"; then
  echo "FAIL a CPU run loaded CUDA libraries:"; grep -E 'libcudart|libcublas' "$tmp/libs" | head -3
  exit 1
fi
echo "ok   a CPU run loads no CUDA library"

cpu=$(run --device cpu 2>"$tmp/cpu.err") || { echo "FAIL cpu run:"; cat "$tmp/cpu.err"; exit 1; }
gpu=$(run --device cuda 2>"$tmp/gpu.err")
status=$?
if [ "$status" -eq 0 ]; then
  # fp16 weights on both sides; a near-tie could flip a late token, the first ones must agree.
  if [ "$(echo "$gpu" | cut -d' ' -f1-4)" != "$(echo "$cpu" | cut -d' ' -f1-4)" ]; then
    echo "FAIL cuda ids differ from cpu: cuda '$gpu' cpu '$cpu'"; exit 1
  fi
  echo "ok   --device cuda runs through the module: $gpu"
  exit 0
fi
lines=$(wc -l <"$tmp/gpu.err")
if [ "$status" -ge 128 ] || [ "$lines" -ne 1 ] || ! grep -Eq 'CUDA' "$tmp/gpu.err"; then
  echo "FAIL --device cuda without a usable GPU: exit $status, $lines line(s):"; cat "$tmp/gpu.err"
  exit 1
fi
echo "ok   --device cuda without a usable GPU: $(cat "$tmp/gpu.err")"
