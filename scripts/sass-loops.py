#!/usr/bin/env python3
"""Counts the SASS instructions of each kernel's hottest loop (issue 10: where the batch-16 GEMV's
instructions go; the development machine has no cuobjdump, the GPU machine has).

    scripts/sass-loops.py SASS_FILE [--match SUBSTRING ...] [--top N]

SASS_FILE is `cuobjdump -sass OBJECT` output (or `-` for standard input). For each function
whose mangled name contains every --match substring, the loop is the span from a label to the
branch back to it that holds the most tensor-core instructions (HMMA, IMMA, HGMMA), the shortest
such span (the innermost loop); with none, the longest loop. The table gives the loop's length
and its instructions by opcode (the base opcode, modifiers dropped), the N most frequent, and the
demangled name where c++filt is installed.
"""
import argparse
import collections
import re
import shutil
import subprocess
import sys

FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
# /*0a30*/  @!P0 BRA `(.L_x_12) ;   or   /*0a40*/  HMMA.16816.F32 R4, R8, R12, R4 ;
INSTRUCTION = re.compile(
    r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[^\s;]*)?(.*?);")
# nvdisasm names its targets (`(.L_x_12)); cuobjdump -sass gives their addresses (BRA P1, 0x930).
BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)|(0x[0-9a-f]+)\s*$")
TENSOR = {"HMMA", "IMMA", "HGMMA", "IGMMA", "QGMMA"}


def parse(lines):
    """{mangled name: [(kind, value)]}: kind 'label' (name) or 'op' (opcode, operands, address)."""
    functions = collections.OrderedDict()
    body = None
    for line in lines:
        m = FUNCTION.match(line)
        if m:
            body = functions.setdefault(m.group(1), [])
            continue
        if body is None:
            continue
        m = LABEL.match(line)
        if m:
            body.append(("label", m.group(1)))
            continue
        m = INSTRUCTION.match(line)
        if m:
            body.append(("op", (m.group(2), m.group(4), int(m.group(1), 16))))
    return functions


def hottest_loop(body):
    """The (label index, branch index) span with the most tensor-core instructions, the shortest
    of those (the innermost: a tile loop holds its chunk loop's instructions too)."""
    where = {value: i for i, (kind, value) in enumerate(body) if kind == "label"}
    where.update({value[2]: i for i, (kind, value) in enumerate(body) if kind == "op"})
    best = None
    for j, (kind, value) in enumerate(body):
        if kind != "op" or value[0] != "BRA":
            continue
        m = BRANCH_TARGET.search(value[1].strip())
        target = m and (m.group(1) or int(m.group(2), 16))
        if not m or target not in where or where[target] >= j:
            continue
        i = where[target]
        ops = [v[0] for k, v in body[i:j + 1] if k == "op"]
        tensor = sum(op in TENSOR for op in ops)
        key = (tensor, -len(ops) if tensor else len(ops))
        if best is None or key > best[0]:
            best = (key, i, j)
    return None if best is None else (best[1], best[2])


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=False).stdout.split("\n")
    return {n: (out[k] if k < len(out) and out[k] else n) for k, n in enumerate(names)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sass")
    ap.add_argument("--match", action="append", default=[])
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    with (sys.stdin if args.sass == "-" else open(args.sass, encoding="utf-8", errors="replace")) as f:
        functions = parse(f)
    chosen = [n for n in functions if all(s in n for s in args.match)]
    if not chosen:
        print(f"sass-loops: no function matches {args.match} ({len(functions)} read)", file=sys.stderr)
        return 1
    names = demangle(chosen)
    print("| kernel | instructions | loop | tensor-core | most frequent in the loop |")
    print("|---|---:|---:|---:|---|")
    for name in chosen:
        body = functions[name]
        total = sum(kind == "op" for kind, _ in body)
        span = hottest_loop(body)
        if span is None:
            print(f"| {names[name][:160]} | {total} | no loop | | |")
            continue
        ops = collections.Counter(v[0] for k, v in body[span[0]:span[1] + 1] if k == "op")
        loop = sum(ops.values())
        tensor = sum(c for op, c in ops.items() if op in TENSOR)
        ranked = sorted(ops.items(), key=lambda item: (-item[1], item[0]))  # ties by name
        common = ", ".join(f"{op} {c}" for op, c in ranked[:args.top])
        print(f"| {names[name][:160]} | {total} | {loop} | {tensor} | {common} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
