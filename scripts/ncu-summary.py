#!/usr/bin/env python3
"""Per-kernel medians of an Nsight Compute run (gpu-ab's `ncu` benchmark, issue 10).

Reads what `ncu --csv --page raw --print-units base` printed (the profiled program's own output
may come before the table) and prints one Markdown row a kernel, in the order each kernel was
first launched:

  | kernel | grid | launches | us | shared config KB | dynamic + static shared KB a block |
    blocks an SM (shared-memory limit) | achieved occupancy % | L1 hit % | L2 hit % | DRAM GB/s |
    stalls |

"stalls" are the three largest stall reasons of the WarpStateStats section (cycles a warp spent
stalled on each, per instruction issued: `smsp__average_warps_issue_stalled_REASON_per_issue_
active.ratio`), e.g. "long_scoreboard 4.1, wait 1.2, barrier 0.6"; "selected" (the issue itself)
and "not_selected" (eligible, another warp issued) are not stalls.

A row is one kernel at one grid size and dynamic shared memory (one instantiation serves weights
of different shapes: wo and w_down share one). Values are medians over its launches; a metric the
run did not collect prints as "-". The kernel's name drops its return type, namespaces (in its
template arguments too) and parameter list and keeps its template arguments (instances of one
template are different kernels). With --columns, the raw metric names the table held are listed
instead (for choosing sections).

  scripts/ncu-summary.py NCU_OUTPUT [--columns]
"""

import csv
import re
import statistics
import sys

COLUMNS = {
    "grid": "launch__grid_size",
    "us": "gpu__time_duration.sum",  # ns in base units
    "config": "launch__shared_mem_config_size",  # bytes
    "dynamic": "launch__shared_mem_per_block_dynamic",
    "static": "launch__shared_mem_per_block_static",
    "limit": "launch__occupancy_limit_shared_mem",
    "occupancy": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "l1": "l1tex__t_sector_hit_rate.pct",
    "l2": "lts__t_sector_hit_rate.pct",
    "dram": "dram__bytes.sum.per_second",  # bytes a second in base units
}


STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")


def short_name(name):
    """`void ns::(anonymous namespace)::k<A, B>(P)` -> `k<A, B>`."""
    name = re.sub(r"^void ", "", name.strip())
    # The parameter list: the last top-level parenthesis group.
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        c = name[i]
        if c == ")":
            depth += 1
        elif c == "(":
            depth -= 1
            if depth == 0:
                if i > 0 and name[i - 1] not in "<, ":
                    name = name[:i]
                break
    # Namespaces before the template name (not inside its arguments).
    head, sep, args = name.partition("<")
    head = head.split("::")[-1]
    args = re.sub(r"(?:\(anonymous namespace\)|\w+)::", "", args)
    return head + sep + args


def number(text):
    text = text.strip().replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def read_table(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines)
                  if line.startswith('"') and '"Kernel Name"' in line), None)
    if start is None:
        return None, []
    rows = list(csv.reader(lines[start:]))
    header = rows[0]
    body = [r for r in rows[1:] if len(r) == len(header)]
    # The units row (base units: "nsecond", "byte", "%") has no ID.
    if "ID" in header:
        body = [r for r in body if number(r[header.index("ID")]) is not None]
    return header, body


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if len(argv) >= 2 else 2
    header, body = read_table(argv[1])
    if header is None:
        print(f"ncu-summary: no ncu CSV table (a \"Kernel Name\" header) in {argv[1]}",
              file=sys.stderr)
        return 1
    if "--columns" in argv[2:]:
        print("\n".join(header))
        return 0
    if not body:
        print(f"ncu-summary: the ncu table in {argv[1]} has no kernel rows", file=sys.stderr)
        return 1
    name_at = header.index("Kernel Name")
    at = {key: header.index(col) for key, col in COLUMNS.items() if col in header}
    for i, col in enumerate(header):
        stall = STALL.match(col)
        if stall and stall.group(1) not in ("selected", "not_selected"):
            at["stall:" + stall.group(1)] = i
    # (short name, grid, dynamic shared bytes) -> {key: [values]}, in first-launch order
    kernels = {}
    for r in body:
        kernel = (short_name(r[name_at]),) + tuple(
            r[at[k]].strip() if k in at else "" for k in ("grid", "dynamic"))
        values = kernels.setdefault(kernel, {"n": 0})
        values["n"] += 1
        for key, i in at.items():
            v = number(r[i])
            if v is not None:
                values.setdefault(key, []).append(v)

    def med(values, key, scale=1.0, digits=1):
        got = values.get(key)
        return f"{statistics.median(got) * scale:.{digits}f}" if got else "-"

    def stalls(values):
        reasons = [(statistics.median(v), k[len("stall:"):]) for k, v in values.items()
                   if k.startswith("stall:") and v]
        reasons.sort(key=lambda r: -r[0])
        return ", ".join(f"{reason} {v:.1f}" for v, reason in reasons[:3]) or "-"

    for (name, _, _), values in kernels.items():
        shared = "-"
        if values.get("dynamic") or values.get("static"):
            total = statistics.median(values.get("dynamic", [0.0])) + \
                statistics.median(values.get("static", [0.0]))
            shared = f"{total / 1024:.1f}"
        print(f"| {name} | {med(values, 'grid', 1, 0)} | {values['n']} | "
              f"{med(values, 'us', 1e-3, 2)} | {med(values, 'config', 1 / 1024, 0)} | {shared} | "
              f"{med(values, 'limit', 1, 0)} | "
              f"{med(values, 'occupancy')} | {med(values, 'l1')} | {med(values, 'l2')} | "
              f"{med(values, 'dram', 1e-9, 0)} | {stalls(values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
