#!/usr/bin/env python3
"""Where a kernel's instructions go, from Nsight Compute's per-instruction counts (gpu-ab's
`ncusource`, issue 10).

Reads exports of one Nsight Compute report of one kernel's launches:

  RAW      `ncu -i R --csv --page raw --print-units base [--print-kernel-base mangled]`: a row a
           launch (grid and block size, smsp__inst_executed.max)
  SASS     `ncu -i R --csv --page source --print-source sass`: a table a launch, a row an
           instruction (its address and "Instructions Executed", warp-level)
  LISTING  (optional) `nvdisasm -g -c` of the cubin holding the kernel: each instruction's offset
           under the `//## File "F", line N [inlined at "G", line M]` comment that precedes it

and prints lines for a Markdown table's cells, first the totals:

  instructions a launch: 63784; a warp launched: 997; the busiest SMSP: 2007 (12 launches, 64 warps)

then the code's regions (runs of adjacent instructions executed equally often: a straight stretch
of code, or a loop body at its trip count), the largest first, with their opcodes:

  region 0x03fc0-0x05340: 313 instructions x 32 a launch = 15.7%: FMUL 128, FFMA 64, ...

and with a LISTING the kernel's own source lines (the outermost frame of an inlined call: the line
of the kernel's body that made the call) the most instructions issue for, the text read from
the file under the repository (or --source-root), e.g.

  attention.cu:1443: 412.0 a launch's warp, 11.1%: r = rotate(q[...], ...)

Counts are summed over every launch and divided by the launches; "a warp launched" divides by
every warp of a launch, including warps that leave at once.

  scripts/ncu-source.py RAW SASS [--listing NVDISASM] [--top N] [--source-root DIR]
"""

import collections
import csv
import os
import re
import sys


def read_rows(path):
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return list(csv.reader(f))


def number(cell):
    try:
        return float(cell.replace(",", ""))
    except (ValueError, AttributeError):
        return None


def launches(raw_path):
    """([{warps, inst_max}] a launch, the kernel's name as the export gives it)."""
    header = None
    out = []
    name = ""
    for row in read_rows(raw_path):
        if header is None:
            if "launch__grid_size" in row and "launch__block_size" in row:
                header = {cell: i for i, cell in enumerate(row)}
            continue

        def get(metric):
            i = header.get(metric)
            return number(row[i]) if i is not None and i < len(row) else None

        grid, block = get("launch__grid_size"), get("launch__block_size")
        if grid is None or block is None:
            continue  # the units row
        out.append(
            {
                "warps": grid * block / 32.0,
                "inst_max": get("smsp__inst_executed.max"),
            }
        )
        if "Kernel Name" in header and not name:
            name = row[header["Kernel Name"]]
    return out, name


def sass_counts(sass_path):
    """({offset: summed count}, {offset: instruction text}, tables): offsets from each table's
    first address (the function's start)."""
    counts = collections.Counter()
    text = {}
    tables = 0
    current = None
    column = None
    for row in read_rows(sass_path):
        if not row:
            continue
        if row[0] == "Kernel Name":
            current = []
            tables += 1
            continue
        if row[0] == "Address":
            column = row.index("Instructions Executed") if "Instructions Executed" in row else None
            continue
        if current is None or column is None or len(row) <= column:
            continue
        if not row[0].startswith("0x"):
            continue
        current.append(row)
        if len(current) == 1:
            current_base = int(row[0], 16)
        offset = int(row[0], 16) - current_base
        counts[offset] += number(row[column]) or 0.0
        text[offset] = row[1].strip()
    return counts, text, tables


# A function's label (local labels, .L_x_N:, sit inside functions).
FUNCTION = re.compile(r"^\s*\.text\.([\w$.]+):\s*$")
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
FRAME = re.compile(r'"([^"]+)", line (\d+)')


def listing_lines(path, function):
    """{offset: (file, line)} of the function's instructions: the outermost frame of the line
    comment before each (the kernel's own line where a call was inlined)."""
    lines = {}
    inside = False
    frame = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            m = FUNCTION.match(raw)
            if m:
                inside = function is None or m.group(1) == function
                continue
            if not inside:
                continue
            if "//##" in raw:
                frames = FRAME.findall(raw)
                if frames:
                    frame = (frames[-1][0], int(frames[-1][1]))
                continue
            m = INSTRUCTION.search(raw)
            if m and frame is not None:
                lines[int(m.group(1), 16)] = frame
    return lines


def opcode(instruction):
    words = instruction.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def source_text(path, line, root, cache):
    if path not in cache:
        found = None
        for candidate in (path, os.path.join(root, os.path.relpath(path, "/")) if path.startswith("/") else ""):
            if candidate and os.path.isfile(candidate):
                found = candidate
                break
        if found is None:  # the device's path: find the file under the repository by its tail
            tail = path.split("/src/", 1)[-1]
            candidate = os.path.join(root, "src", tail)
            found = candidate if os.path.isfile(candidate) else None
        cache[path] = open(found, encoding="utf-8", errors="replace").read().splitlines() if found else []
    text = cache[path]
    return " ".join(text[line - 1].split()) if 0 < line <= len(text) else ""


def main(argv):
    args = argv[1:]
    top = 12
    listing = None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    positional = []
    i = 0
    while i < len(args):
        if args[i] == "--top":
            top = int(args[i + 1])
            i += 2
        elif args[i] == "--listing":
            listing = args[i + 1]
            i += 2
        elif args[i] == "--source-root":
            root = args[i + 1]
            i += 2
        else:
            positional.append(args[i])
            i += 1
    if len(positional) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    runs, name = launches(positional[0])
    counts, text, tables = sass_counts(positional[1])
    if not runs or not tables or not counts:
        print(
            f"ncu-source: {len(runs)} launches in {positional[0]}, {tables} SASS tables in {positional[1]}",
            file=sys.stderr,
        )
        return 1
    total = sum(counts.values()) / tables
    warps = sum(r["warps"] for r in runs) / len(runs)
    busiest = [r["inst_max"] for r in runs if r["inst_max"] is not None]
    print(
        f"instructions a launch: {total:.0f}; a warp launched: {total / warps:.0f}; the busiest SMSP: "
        f"{(sorted(busiest)[len(busiest) // 2] if busiest else float('nan')):.0f} "
        f"({len(runs)} launches, {warps:.0f} warps each)"
    )
    # Regions: runs of adjacent executed instructions with the same count a launch.
    regions = []
    for offset in sorted(text):
        per = counts[offset] / tables
        if regions and regions[-1]["per"] == per and regions[-1]["end"] == offset - 16:
            regions[-1]["end"] = offset
            regions[-1]["ops"][opcode(text[offset])] += 1
            regions[-1]["n"] += 1
        else:
            regions.append(
                {"per": per, "start": offset, "end": offset, "n": 1,
                 "ops": collections.Counter([opcode(text[offset])])}
            )
    executed = [r for r in regions if r["per"] > 0]
    for r in sorted(executed, key=lambda r: -r["per"] * r["n"])[:top]:
        ops = ", ".join(f"{op} {n}" for op, n in r["ops"].most_common(6))
        print(
            f"region {r['start']:#07x}-{r['end']:#07x}: {r['n']} instructions x {r['per']:g} a launch = "
            f"{100 * r['per'] * r['n'] / total:.1f}%: {ops}"
        )
    if listing:
        mangled = name if name.startswith("_Z") else None
        where = listing_lines(listing, mangled)
        if not where:
            print(f"no line information for {mangled or 'the kernel'} in {listing}")
            return 0
        by_line = collections.Counter()
        for offset, c in counts.items():
            by_line[where.get(offset, ("?", 0))] += c / tables
        cache = {}
        for (path, line), c in by_line.most_common(top):
            if c <= 0:
                break
            short = source_text(path, line, root, cache)
            if len(short) > 70:
                short = short[:67] + "..."
            short = short.replace("|", "/")  # the line goes into a Markdown table's cell
            print(f"{os.path.basename(path)}:{line}: {c / warps:.1f} a warp launched, {100 * c / total:.1f}%: {short}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
