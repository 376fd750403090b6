#!/usr/bin/env bash
# scripts/ncu-summary.py (gpu-ab's `ncu` benchmark) on a hand-written `ncu --csv --page raw
# --print-units base` output after the profiled program's own lines: it skips the program's
# output, the units row and rows of the wrong length, groups launches by the kernel's short name
# (template arguments kept, namespaces and parameters dropped) and grid in first-launch order,
# takes medians (an outlier shows a mean), converts base units, prints "-" for a metric the run
# did not collect, names the three largest stall reasons, lists the columns with --columns, and
# refuses a file with no table or no kernel rows.
set -euo pipefail
script="$2/scripts/ncu-summary.py"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/ncu.csv" <<'CSV'
| model | test | tok/s |
==PROF== Disconnected from process 1234
"ID","Process ID","Process Name","Kernel Name","launch__grid_size","gpu__time_duration.sum","launch__shared_mem_config_size","launch__shared_mem_per_block_dynamic","launch__shared_mem_per_block_static","launch__occupancy_limit_shared_mem","l1tex__t_sector_hit_rate.pct","lts__t_sector_hit_rate.pct","dram__bytes.sum.per_second","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","smsp__average_warps_issue_stalled_selected_per_issue_active.ratio","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio"
"","","","","","nsecond","byte","byte","byte","block","%","%","byte/second","ratio","ratio","ratio","ratio","ratio"
"0","1234","kestrel","void kestrel::cuda::(anonymous namespace)::gemv_kernel<(kestrel::WeightFormat)4, 2, 2, false, false, 0, false, false, false, false>(kestrel::cuda::GemvParams)","264","38000","167936","72704","128","2","50.5","80","1,700,000,000,000","4.0","1.0","9.0","0.5","0.1"
"1","1234","kestrel","void kestrel::cuda::(anonymous namespace)::attention_split_kernel<128, (kestrel::cuda::KvType)0>(kestrel::cuda::AttentionArgs, int)","128","9000","233472","40960","0","5","10","90","500000000000","0.2","3.0","9.0","","1.5"
"2","1234","kestrel","void kestrel::cuda::(anonymous namespace)::gemv_kernel<(kestrel::WeightFormat)4, 2, 2, false, false, 0, false, false, false, false>(kestrel::cuda::GemvParams)","264","90000","167936","72704","128","2","49.5","82","1,800,000,000,000","6.0","1.2","9.0","0.7","0.1"
"3","1234","kestrel","void kestrel::cuda::(anonymous namespace)::gemv_kernel<(kestrel::WeightFormat)4, 2, 2, false, false, 0, false, false, false, false>(kestrel::cuda::GemvParams)","264","39000","167936","72704","128","2","","81","1,750,000,000,000","5.0","1.1","9.0","0.6","0.1"
"4","1234","kestrel","void kestrel::cuda::(anonymous namespace)::gemv_kernel<(kestrel::WeightFormat)4, 2, 2, false, false, 0, false, false, false, false>(kestrel::cuda::GemvParams)","128","20000","167936","72704","128","2","40","70","1,600,000,000,000","","","","",""
"5","1234","kestrel","truncated row"
==PROF== Report: a, b
CSV
python3 "$script" "$work/ncu.csv" >"$work/out.md"
cat "$work/out.md"
python3 - "$work/out.md" <<'PY'
import sys
rows = [[c.strip() for c in l.strip().strip("|").split("|")] for l in open(sys.argv[1])]
assert len(rows) == 3, rows
g, a, w = rows
assert g[0] == "gemv_kernel<(WeightFormat)4, 2, 2, false, false, 0, false, false, false, false>", g
# Grid 264: 3 launches; the median 39 us, not the mean (55.67); 164 KB config; 71.1 KB a block
# (72704 + 128 bytes); 2 blocks; no occupancy column; L1 the median of the two collected; L2 81;
# 1750 GB/s.
# Stalls: the three largest medians, "selected" (the issue itself) left out.
assert g[1:] == ["264", "3", "39.00", "164", "71.1", "2", "-", "50.0", "81.0", "1750",
                 "long_scoreboard 5.0, wait 1.1, barrier 0.6"], g
assert a[0] == "attention_split_kernel<128, (KvType)0>", a
# A stall reason with no value is left out; fewer than three are all shown.
assert a[1:] == ["128", "1", "9.00", "228", "40.0", "5", "-", "10.0", "90.0", "500",
                 "wait 3.0, mio_throttle 1.5, long_scoreboard 0.2"], a
# The same instantiation on another grid (another weight) is a row of its own; no stalls: "-".
assert w[0] == g[0] and w[1:4] == ["128", "1", "20.00"] and w[-1] == "-", w
PY
python3 "$script" "$work/ncu.csv" --columns >"$work/columns.txt"
grep -qx "launch__shared_mem_config_size" "$work/columns.txt"
printf 'no table here\n' >"$work/none.csv"
if python3 "$script" "$work/none.csv" 2>"$work/none.err"; then
  echo "a file without an ncu table should be refused"
  exit 1
fi
grep -q "no ncu CSV table" "$work/none.err"
head -4 "$work/ncu.csv" >"$work/empty.csv"
if python3 "$script" "$work/empty.csv" 2>"$work/empty.err"; then
  echo "a table without kernel rows should be refused"
  exit 1
fi
grep -q "no kernel rows" "$work/empty.err"
echo "ncu_summary: ok"
