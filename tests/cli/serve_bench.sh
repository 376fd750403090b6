#!/usr/bin/env bash
# bench/serve_bench.py against `kestrel serve` on the tiny synthetic model: two concurrency
# levels of a small mix; every request completes with exactly its max_tokens (ignore_eos), the
# table, CSV and JSON carry every level, and a server that is not there is one clear error.
set -euo pipefail
# shellcheck source=tests/cli/serve_lib.bash
source "$2/tests/cli/serve_lib.bash"
serve_test_init "$1" "$2"
bench="$2/bench/serve_bench.py"

start_server "$work/server.log" --parallel 4 -c 256 --api-key k
python3 "$bench" --port "$port" --api-key k --concurrency 1,4 --requests 8 --roofline-gbs 31 \
  --input-lens 20,70 --output-lens 5,12 -o "$work/rows.csv" --json "$work/rows.json" \
  --markdown "$work/table.md" --svg "$work/plot.svg" >"$work/stdout" 2>"$work/stderr" ||
  { echo "serve_bench failed:"; cat "$work/stderr" "$work/server.log"; exit 1; }
cat "$work/stdout"
cmp -s "$work/stdout" "$work/table.md" || { echo "--markdown differs from stdout"; exit 1; }
[ "$(grep -c '^| [0-9]' "$work/table.md")" -eq 2 ] || { echo "expected 2 table rows"; exit 1; }
python3 - "$work/rows.csv" "$work/rows.json" "$work/plot.svg" <<'PY'
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1])))
assert [r["concurrency"] for r in rows] == ["1", "4"], rows
for r in rows:
    assert r["requests"] == "8" and r["errors"] == "0" and r["short"] == "0", r
    for key in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "output_tok_per_s"):
        assert float(r[key]) > 0, (key, r)
    assert float(r["ttft_p99_ms"]) >= float(r["ttft_p50_ms"]), r
    gbs = float(r["weight_gbs_at_tpot_p50"])
    assert gbs > 0 and abs(float(r["roofline_pct"]) - 100 * gbs / 31) <= 1e-9 * gbs, r
data = json.load(open(sys.argv[2]))
import xml.etree.ElementTree as ET
svg = ET.parse(sys.argv[3]).getroot()
lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
assert len(lines) == 5 and all(len(l.get("points").split()) == 2 for l in lines), "plot"
assert len(data["rows"]) == 2 and data["settings"]["input_lens"] == "20,70", data["settings"]
PY
# 8 requests x 2 levels + the warm-up request, each its exact output length.
metric() {
  curl -s -H 'Authorization: Bearer k' "http://127.0.0.1:$port/metrics" |
    awk -v name="$1" '$1 == name {print $2}'
}
# The weights' GB/s: the bytes /metrics publishes over the median TPOT.
python3 - "$work/rows.csv" "$(metric kestrel_decode_weight_bytes)" <<'PY'
import csv, sys
weights = float(sys.argv[2])
assert weights > 0, sys.argv[2]
for r in csv.DictReader(open(sys.argv[1])):
    want = weights / (float(r["tpot_p50_ms"]) / 1000) / 1e9
    assert abs(float(r["weight_gbs_at_tpot_p50"]) - want) <= 1e-9 * want, (r, want)
PY
tokens=$(metric kestrel_generation_tokens_total)
[ "$tokens" = $((2 * (2 * 5 + 2 * 12 + 2 * 5 + 2 * 12) + 4)) ] ||
  { echo "generated $tokens tokens, not the mix's"; exit 1; }
# Greedy by default: every token was the device's argmax. With a temperature every request
# samples on the host (4 requests and the warm-up's 4 tokens).
[ "$(metric 'kestrel_tokens_picked_total{where="device"}')" = "$tokens" ] ||
  { echo "greedy tokens not picked on the device"; exit 1; }
python3 "$bench" --port "$port" --api-key k --concurrency 2 --requests 4 --input-lens 20 \
  --output-lens 6 --temperature 0.9 --top-p 0.95 --top-k 40 >/dev/null 2>"$work/stderr" ||
  { echo "serve_bench with sampling failed:"; cat "$work/stderr"; exit 1; }
[ "$(metric 'kestrel_tokens_picked_total{where="host"}')" = $((4 * 6 + 4)) ] ||
  { echo "sampled tokens not picked on the host"; exit 1; }
python3 "$bench" --port "$port" --temperature 3 --concurrency 1 >/dev/null 2>&1 &&
  { echo "serve_bench took --temperature 3"; exit 1; }
stop_server "$pid" "$work/server.log"

# KESTREL_SERVER_HOST_PICKS=1 (gpu-ab's A/B of the greedy rows): greedy tokens picked on the host.
KESTREL_SERVER_HOST_PICKS=1 start_server "$work/server2.log" --parallel 2 -c 256 --api-key k
python3 "$bench" --port "$port" --api-key k --concurrency 2 --requests 2 --input-lens 20 \
  --output-lens 5 >/dev/null 2>"$work/stderr" ||
  { echo "serve_bench on the host-picks server failed:"; cat "$work/stderr"; exit 1; }
[ "$(metric 'kestrel_tokens_picked_total{where="host"}')" = $((2 * 5 + 4)) ] &&
  [ "$(metric 'kestrel_tokens_picked_total{where="device"}')" = 0 ] ||
  { echo "KESTREL_SERVER_HOST_PICKS=1 still picked on the device"; exit 1; }
stop_server "$pid" "$work/server2.log"
echo "ok serve_bench: two levels, exact output lengths, CSV, JSON, Markdown and the plot"

if python3 "$bench" --port "$port" --concurrency 1 >"$work/out" 2>&1; then
  echo "serve_bench succeeded without a server"; exit 1
fi
grep -q "did not answer" "$work/out" || { echo "unclear error:"; cat "$work/out"; exit 1; }
echo "ok serve_bench without a server fails with one line"
