#!/usr/bin/env python3
"""Per-kernel medians of an Nsight Compute run (gpu-ab's `ncu` benchmark, issue 10).

Reads what `ncu --csv --page raw --print-units base` printed (the profiled program's own output
may come before the table) and prints one Markdown row a kernel, in the order each kernel was
first launched:

  | kernel | launches | us | shared config KB | dynamic + static shared KB a block |
    blocks an SM (shared-memory limit) | achieved occupancy % | L1 hit % | L2 hit % | DRAM GB/s |

Values are medians over the kernel's launches; a metric the run did not collect prints as "?".
The kernel's name drops its return type, namespaces and parameter list and keeps its template
arguments (instances of one template are different kernels). With --columns, the raw metric
names the table held are listed instead (for choosing sections).

  scripts/ncu-summary.py NCU_OUTPUT [--columns]
"""

import csv
import re
import statistics
import sys

COLUMNS = {
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
    args = args.replace("kestrel::", "")
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
    body = [r for r in body if number(r[header.index("ID")]) is not None] if "ID" in header \
        else body
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
    kernels = {}  # short name -> {key: [values]}, in first-launch order
    for r in body:
        values = kernels.setdefault(short_name(r[name_at]), {"n": 0})
        values["n"] += 1
        for key, i in at.items():
            v = number(r[i])
            if v is not None:
                values.setdefault(key, []).append(v)

    def med(values, key, scale=1.0, digits=1):
        got = values.get(key)
        return f"{statistics.median(got) * scale:.{digits}f}" if got else "?"

    for name, values in kernels.items():
        shared = "?"
        if values.get("dynamic") or values.get("static"):
            total = statistics.median(values.get("dynamic", [0.0])) + \
                statistics.median(values.get("static", [0.0]))
            shared = f"{total / 1024:.1f}"
        print(f"| {name} | {values['n']} | {med(values, 'us', 1e-3, 2)} | "
              f"{med(values, 'config', 1 / 1024, 0)} | {shared} | {med(values, 'limit', 1, 0)} | "
              f"{med(values, 'occupancy')} | {med(values, 'l1')} | {med(values, 'l2')} | "
              f"{med(values, 'dram', 1e-9, 0)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
