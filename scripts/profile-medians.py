#!/usr/bin/env python3
"""Medians of decode attention's phase times (KESTREL_CUDA_ATTENTION_PROFILE lines on stdin).

Prints "wait q tiles partials arrive merge (steps)" in microseconds, or "none" when no line
was printed. Used by scripts/gpu-ab's profile benchmark.
"""
import re
import statistics
import sys

PHASES = ("wait", "q", "tiles", "partials", "arrive", "merge")


def main() -> int:
    rows = []
    for line in sys.stdin:
        if "attention profile" not in line:
            continue
        values = [re.search(rf"\b{p} ([0-9.]+)", line) for p in PHASES]
        if all(values):
            rows.append([float(v.group(1)) for v in values])
    if not rows:
        print("none")
        return 0
    medians = [statistics.median(column) for column in zip(*rows)]
    print(" ".join(f"{m:.2f}" for m in medians) + f" ({len(rows)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
