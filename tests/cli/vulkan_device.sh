#!/usr/bin/env bash
# `--device vulkan`: with a usable Vulkan device (lavapipe on CI), greedy ids on an HF fixture
# agree with the CPU's, and `kestrel run` and `bench` work on a synthetic model; without one (or
# in a build without the Vulkan backend) the command fails with one line that says what is
# missing. A CPU run never loads the Vulkan loader; a device index past the last is refused.
set -uo pipefail
kestrel="$1"
src="$2"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

model="$src/tests/golden/models/llama3-scaled-bf16-sharded"
run() { "$kestrel" run -m "$model" --low-bit fp16 --ids 1,2,3,4 -n 8 --temp 0 --print-ids -q "$@"; }

LD_DEBUG=libs "$kestrel" run -m synthetic:tiny-qwen2 --ids 1,2,3 -n 2 -q >/dev/null 2>"$tmp/libs"
if grep -q 'libvulkan' "$tmp/libs"; then
  echo "FAIL a CPU run loaded the Vulkan loader"; exit 1
fi
echo "ok   a CPU run loads no Vulkan library"

"$kestrel" devices >"$tmp/devices" 2>&1 || { echo "FAIL kestrel devices:"; cat "$tmp/devices"; exit 1; }
grep -q '^cpu' "$tmp/devices" && grep -q '^vulkan' "$tmp/devices" ||
  { echo "FAIL kestrel devices lists no cpu or vulkan line:"; cat "$tmp/devices"; exit 1; }
echo "ok   kestrel devices:"; sed 's/^/       /' "$tmp/devices"

if "$kestrel" run -m synthetic:tiny-qwen2 --ids 1 -n 1 -q --device vulkan:999 2>"$tmp/bad.err"; then
  echo "FAIL --device vulkan:999 succeeded"; exit 1
fi
if [ "$(wc -l <"$tmp/bad.err")" -ne 1 ] || ! grep -qi 'vulkan' "$tmp/bad.err"; then
  echo "FAIL --device vulkan:999:"; cat "$tmp/bad.err"; exit 1
fi
echo "ok   --device vulkan:999: $(cat "$tmp/bad.err")"

cpu=$(run --device cpu 2>"$tmp/cpu.err") || { echo "FAIL cpu run:"; cat "$tmp/cpu.err"; exit 1; }
vk=$(run --device vulkan 2>"$tmp/vk.err")
status=$?
if [ "$status" -eq 0 ]; then
  # fp32 activations on both sides; a near-tie could flip a late token, the first ones must agree.
  if [ "$(echo "$vk" | cut -d' ' -f1-4)" != "$(echo "$cpu" | cut -d' ' -f1-4)" ]; then
    echo "FAIL vulkan ids differ from cpu: vulkan '$vk' cpu '$cpu'"; exit 1
  fi
  echo "ok   --device vulkan agrees with the cpu: $vk"
  "$kestrel" run -m synthetic:tiny-qwen2 --ids 1,2,3 -n 8 --temp 0 --device vulkan -q \
    >"$tmp/tiny.out" 2>"$tmp/tiny.err" || { echo "FAIL tiny-qwen2 on vulkan:"; cat "$tmp/tiny.err"; exit 1; }
  echo "ok   kestrel run -m synthetic:tiny-qwen2 --device vulkan"
  "$kestrel" bench -m synthetic:tiny-qwen2 -p 16 -n 2 --device vulkan -o csv \
    >"$tmp/bench.csv" 2>"$tmp/bench.err" || { echo "FAIL bench on vulkan:"; cat "$tmp/bench.err"; exit 1; }
  grep -q 'vulkan' "$tmp/bench.csv" || { echo "FAIL bench rows name no vulkan backend:"; cat "$tmp/bench.csv"; exit 1; }
  echo "ok   kestrel bench --device vulkan"
  exit 0
fi
lines=$(wc -l <"$tmp/vk.err")
if [ "$status" -ge 128 ] || [ "$lines" -ne 1 ] || ! grep -qi 'vulkan' "$tmp/vk.err"; then
  echo "FAIL --device vulkan without a usable device: exit $status, $lines line(s):"; cat "$tmp/vk.err"
  exit 1
fi
echo "kestrel vulkan: skipped: no usable Vulkan device: $(cat "$tmp/vk.err")"
