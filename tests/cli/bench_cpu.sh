#!/usr/bin/env bash
# `kestrel bench` on the CPU with tiny synthetic models: the all-in-one CSV with exactly its
# columns, planned memory within 10% of measured for every completed row; a too-small
# --max-memory fails its rows within seconds, before any weights are built (a 7B model would take
# minutes to build), and the run goes on to the next row; unknown keys, stalls (the watchdog) and
# Ctrl-C end as errors; the quick mode prints its table.
set -euo pipefail
kestrel="$1"
src="$2"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"  # the binary finds bench/prompt.txt from its own location, not the working directory

header='model,1st token avg latency (ms),2+ avg latency (ms/token),encoder time (ms),input/output tokens,batch_size,actual input/output tokens,num_beams,low_bit,model loading time (s),peak mem (GB),decode tok/s,achieved GB/s,roofline %,planned mem (GB),status,device,commit'


# check_csv FILE ROWS STATUS_REGEX: the header, ROWS rows, every status matching STATUS_REGEX.
check_csv() {
  python3 - "$@" "$header" <<'PY'
import csv, re, sys
path, rows, pattern, header = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
with open(path, newline="") as f:
    lines = f.read().splitlines()
if lines[0] != header:
    sys.exit(f"{path}: header\n  {lines[0]}\nwant\n  {header}")
table = list(csv.DictReader(open(path, newline="")))
if len(table) != rows:
    sys.exit(f"{path}: {len(table)} rows, want {rows}")
for r in table:
    if not re.search(pattern, r["status"]):
        sys.exit(f"{path}: status {r['status']!r} does not match {pattern!r}")
PY
}

# 1. Completed rows: numbers present, exact token counts, plan within 10% of the measured peak.
#    A 1024-token chunk makes the workspace large enough (~8 MB) that the process's own
#    sub-megabyte noise stays well inside the 10%.
cat >"$tmp/tiny.yaml" <<'EOF'
repo_id: ['synthetic:tiny-qwen2']
warm_up: 0
num_trials: 1
num_beams: 1
low_bit: 'sym_int4'
batch_size: [1, 4]
in_out_pairs: ['1024-8']
test_api: ['transformer_int4_gpu']
EOF
"$kestrel" bench --config "$tmp/tiny.yaml" --prefill-chunk 1024 -q -o "$tmp/ok.csv" 2>"$tmp/ok.err"
check_csv "$tmp/ok.csv" 2 '^ok$'
grep -q "'test_api' is an all-in-one benchmark key" "$tmp/ok.err"
python3 - "$tmp/ok.csv" <<'PY'
import csv, os, sys
for r in csv.DictReader(open(sys.argv[1], newline="")):
    where = f"batch {r['batch_size']}"
    assert r["actual input/output tokens"] == "1024-8", where
    for column in ["1st token avg latency (ms)", "2+ avg latency (ms/token)", "decode tok/s",
                   "achieved GB/s", "roofline %", "model loading time (s)"]:
        assert float(r[column]) > 0, f"{where}: {column} = {r[column]!r}"
    assert r["device"].startswith("cpu"), r["device"]
    assert r["commit"], "empty commit column"
    planned, peak = float(r["planned mem (GB)"]), float(r["peak mem (GB)"])
    # AddressSanitizer's shadow memory and quarantine inflate the measured peak; the plan
    # cannot know them (scripts/sanitize sets KESTREL_TEST_SANITIZED).
    if os.environ.get("KESTREL_TEST_SANITIZED"):
        assert planned > 0 and peak > 0, f"{where}: planned {planned} GB, measured {peak} GB"
    else:
        assert abs(planned - peak) <= 0.10 * peak, f"{where}: planned {planned} GB, measured {peak} GB"
    print(f"ok {where}: planned {planned * 1e3:.1f} MB, measured {peak * 1e3:.1f} MB")
PY

# 2. Beam search and the CSV on standard output.
cat >"$tmp/beams.yaml" <<'EOF'
repo_id: synthetic:tiny-llama
warm_up: 1
num_trials: 2
num_beams: 3
batch_size: 2
in_out_pairs: ['16-8']
EOF
"$kestrel" bench --config "$tmp/beams.yaml" -q >"$tmp/beams.csv" 2>/dev/null
check_csv "$tmp/beams.csv" 1 '^ok$'
grep -q '^synthetic:tiny-llama,.*,16-8,2,16-8,3,sym_int4,' "$tmp/beams.csv"
echo "ok beam search row"

# 3. --max-memory too small for the 7B rows, enough for the tiny ones: the 7B rows fail at once
#    with the planner's numbers and the flag, the run goes on, the exit status is non-zero.
cat >"$tmp/mixed.yaml" <<'EOF'
repo_id: ['synthetic:qwen2-7b', 'synthetic:tiny-qwen2']
warm_up: 0
num_trials: 1
in_out_pairs: ['32-8', '64-8']
EOF
status=0
"$kestrel" bench --config "$tmp/mixed.yaml" --max-memory 64MB -q -o "$tmp/mixed.csv" \
  2>"$tmp/mixed.err" || status=$?
[ "$status" -ne 0 ] || { echo "exit status 0 although rows failed"; exit 1; }
check_csv "$tmp/mixed.csv" 4 '^(ok|error: needs .* but --max-memory 64MB allows 64\.0 MB; raise --max-memory.*)$'
python3 - "$tmp/mixed.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="")))
assert [r["status"] == "ok" for r in rows] == [False, False, True, True], [r["status"] for r in rows]
for r in rows[:2]:
    assert "weights 4." in r["status"], r["status"]  # the 7B model's ~4.5 GB of sym_int4
    # Failed at the plan: no weights were built (no loading time), nothing ran (no peak).
    assert r["peak mem (GB)"] == "" and float(r["planned mem (GB)"]) > 4, r
    assert r["model loading time (s)"] in ("", "0", "0.00", "0.000"), r
PY
grep -q "2 of 4 configurations failed" "$tmp/mixed.err"
echo "ok too-small --max-memory fails the 7B rows before building them and the run goes on"

# 4. Unknown keys are errors that name the key; nothing runs.
printf "repo_id: [synthetic:tiny-qwen2]\nin_out_pairs: ['8-8']\nbatch: 4\n" >"$tmp/bad.yaml"
if "$kestrel" bench --config "$tmp/bad.yaml" -o "$tmp/bad.csv" 2>"$tmp/bad.err"; then
  echo "unknown key accepted"; exit 1
fi
grep -q "unknown key 'batch'" "$tmp/bad.err"
[ ! -e "$tmp/bad.csv" ]
echo "ok unknown key"

# 5. A step past its deadline becomes an error row naming the step; the run goes on.
status=0
"$kestrel" bench --config "$tmp/tiny.yaml" --step-timeout 0.000001 -q -o "$tmp/late.csv" \
  2>/dev/null || status=$?
[ "$status" -ne 0 ]
check_csv "$tmp/late.csv" 2 '^error: watchdog: synthetic:tiny-qwen2 1024-8 batch [14], trial 1, prefill chunk 1 of [0-9]+ \([0-9]+ tokens\) ran .* past its deadline of 0\.00 s$'
echo "ok watchdog errors name the step"

# 6. A step that outlives its deadline by the grace period is a hang: its row is written, naming
#    the step, and the run stops with status 3 (a stuck device call cannot be cancelled).
status=0
"$kestrel" bench --config "$tmp/tiny.yaml" --prefill-chunk 1024 --step-timeout 0.001 \
  --hang-grace 0.001 -q -o "$tmp/hang.csv" 2>"$tmp/hang.err" || status=$?
[ "$status" -eq 3 ] || { echo "exit status $status after a hang, want 3"; cat "$tmp/hang.err"; exit 1; }
check_csv "$tmp/hang.csv" 1 '^error: watchdog: synthetic:tiny-qwen2 1024-8 batch 1, trial 1, prefill chunk 1 of 1 \(1024 tokens\) still running after .* \(deadline 0\.00 s\); the run was stopped$'
grep -q "still running" "$tmp/hang.err"
echo "ok a hung step is written and stops the run"

# 7. Ctrl-C stops between steps, keeps the rows written, exits 130.
cat >"$tmp/long.yaml" <<'EOF'
repo_id: ['synthetic:tiny-qwen2']
warm_up: 0
num_trials: 1
batch_size: [1, 2, 3, 4, 5, 6, 7, 8]
in_out_pairs: ['256-256']
EOF
"$kestrel" bench --config "$tmp/long.yaml" -q -o "$tmp/long.csv" 2>"$tmp/long.err" &
pid=$!
for _ in $(seq 1 600); do
  [ -f "$tmp/long.csv" ] && [ "$(wc -l <"$tmp/long.csv")" -ge 2 ] && break
  sleep 0.05
done
kill -INT "$pid"
status=0
wait "$pid" || status=$?
[ "$status" -eq 130 ] || { echo "exit status $status after Ctrl-C, want 130"; cat "$tmp/long.err"; exit 1; }
rows=$(($(wc -l <"$tmp/long.csv") - 1))
[ "$rows" -ge 1 ] && [ "$rows" -lt 8 ] || { echo "$rows rows after Ctrl-C"; exit 1; }
grep -q "interrupted" "$tmp/long.err"
echo "ok Ctrl-C kept $rows rows"

# 8. Quick mode: pp and tg rows per batch size, in each format.
"$kestrel" bench -m synthetic:tiny-qwen2 -p 16 -n 8 -b 1,2 -r 2 -o json -q >"$tmp/quick.json" 2>/dev/null
python3 - "$tmp/quick.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
assert [(r["batch_size"], r["test"]) for r in rows] == [(1, "pp16"), (1, "tg8"), (2, "pp16"), (2, "tg8")], rows
for r in rows:
    assert r["status"] == "ok" and r["tokens_per_second"] > 0, r
    if r["test"].startswith("tg"):
        assert r["achieved_gbs"] > 0 and r["roofline_percent"] > 0, r
    else:
        # The prompt rows against the CPU's measured int8 multiply-add rate.
        assert r["achieved_tflops"] > 0 and r["roofline_percent"] > 0, r
PY
grep -q '^| synthetic:tiny-qwen2 .* | *tg8 |' <<< "$("$kestrel" bench -m synthetic:tiny-qwen2 -p 16 -n 8 -r 1 -q 2>/dev/null)"
# Both rooflines are measured here and say so (issue 10: honest rooflines).
"$kestrel" bench -m synthetic:tiny-qwen2 -p 16 -n 4 -r 1 2>"$tmp/roof.err" >/dev/null
grep -q '^roofline: [0-9]* GB/s (measured: [0-9]* MiB read by [0-9]* threads, fastest of 7 passes)$' "$tmp/roof.err"
grep -q '^matrix rate, integer formats: [0-9.e+]* TFLOP/s (measured: avx[0-9a-z-]* int8 multiply-adds on [0-9]* threads' "$tmp/roof.err"
"$kestrel" bench -m synthetic:tiny-qwen2 -p 16 -n 4 -r 1 --roofline-gbs 31 2>"$tmp/given.err" >/dev/null
grep -q '^roofline: 31 GB/s (given)$' "$tmp/given.err"
grep -q '^matrix rate, integer formats: ' "$tmp/given.err"
# A float format's prompt rows have no matrix rate to be compared with (the rate is the int8
# kernels'), its generation rows still a bandwidth.
"$kestrel" bench -m synthetic:tiny-qwen2 --low-bit fp32 -p 16 -n 4 -r 1 -o json -q >"$tmp/fp32.json" 2>/dev/null
python3 - "$tmp/fp32.json" <<'PY'
import json, sys
rows = {r["test"]: r for r in json.load(open(sys.argv[1]))}
assert "roofline_percent" not in rows["pp16"] and rows["pp16"]["achieved_tflops"] > 0, rows
assert rows["tg4"]["roofline_percent"] > 0, rows
PY
echo "ok quick mode"
