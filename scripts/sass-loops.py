#!/usr/bin/env python3
"""Counts the SASS instructions of each kernel's hottest loop (issue 10: where the batch-16 GEMV's
instructions go).

    scripts/sass-loops.py SASS_FILE|CUBIN [--match SUBSTRING ...] [--top N] [--opcodes TABLE]
    scripts/sass-loops.py SASS_FILE --write-opcodes TABLE

SASS_FILE is `cuobjdump -sass OBJECT` output (or `-` for standard input); the GPU machine has
cuobjdump. The development machine has none, so the script also reads a cubin itself (`nvcc
-cubin -arch=sm_90 ... -o F.cubin`, an ELF of machine EM_CUDA): each instruction's opcode is the
low 12 bits of its first word, named from TABLE (default scripts/sass-opcodes.json, written with
--write-opcodes from a cuobjdump listing of the same architecture; an opcode it lacks shows as
?0xNNN), and a BRA's target is decoded from its offset field. For each function whose mangled
name contains every --match substring, the loop is the span from a branch target to the branch
back to it that holds the most tensor-core instructions (HMMA, IMMA, HGMMA), the shortest such
span (the innermost loop); with none, the one with the most dp4a instructions (IDP: the batch-1
GEMVs' chunk loops, not their longer input stages), the shortest such; with neither, the longest
loop. The table gives the loop's length and
its instructions by opcode (the base opcode, modifiers dropped), the N most frequent, and the
demangled name where c++filt is installed.
"""
import argparse
import collections
import json
import os
import re
import shutil
import struct
import subprocess
import sys

OPCODES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sass-opcodes.json")
# The encoding comment after an instruction: /* 0x000fe20000000800 */ (its first 64-bit word).
ENCODING = re.compile(r";\s*/\*\s*0x([0-9a-f]{16})\s*\*/")
BRA_OPCODE = 0x947
EM_CUDA = 190
FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
# /*0a30*/  @!P0 BRA `(.L_x_12) ;   or   /*0a40*/  HMMA.16816.F32 R4, R8, R12, R4 ;
INSTRUCTION = re.compile(
    r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[^\s;]*)?(.*?);")
# nvdisasm names its targets (`(.L_x_12)); cuobjdump -sass gives their addresses (BRA P1, 0x930).
BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)|(0x[0-9a-f]+)\s*$")
TENSOR = {"HMMA", "IMMA", "HGMMA", "IGMMA", "QGMMA"}
DP4A = {"IDP"}  # IDP.4A: __dp4a


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


def write_opcodes(lines, path):
    """The table of opcode (low 12 bits of the first word) to name from a cuobjdump listing;
    an opcode that two names share is an error (the table would mislabel)."""
    names = collections.defaultdict(set)
    for line in lines:
        m = INSTRUCTION.match(line)
        e = ENCODING.search(line)
        if m and e:
            names[int(e.group(1), 16) & 0xFFF].add(m.group(2))
    clash = {f"0x{k:03x}": sorted(v) for k, v in names.items() if len(v) > 1}
    if clash:
        print(f"sass-loops: opcodes with two names: {clash}", file=sys.stderr)
        return 1
    if not names:
        print("sass-loops: no encoded instructions in the listing", file=sys.stderr)
        return 1
    table = {f"0x{k:03x}": next(iter(v)) for k, v in sorted(names.items())}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=0, sort_keys=True)
        f.write("\n")
    print(f"sass-loops: {len(table)} opcodes to {path}")
    return 0


def parse_cubin(data, table):
    """{mangled name: [("op", (name, operands, address))]} from a cubin's .text.NAME sections:
    16-byte instructions, the opcode in the low 12 bits, a BRA's signed offset (in 4-byte units,
    from the next instruction) in bits 16-23 and 34-81 of the instruction."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not a 64-bit ELF")
    (machine,) = struct.unpack_from("<H", data, 0x12)
    if machine != EM_CUDA:
        raise ValueError(f"an ELF of machine {machine}, not a cubin (nvcc -cubin makes one)")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff + shnum * shentsize > len(data) or shstrndx >= shnum:
        raise ValueError("section headers past the end of the file")
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    names_at = sections[shstrndx][4]

    def name_of(offset):
        end = data.index(b"\0", names_at + offset)
        return data[names_at + offset:end].decode("utf-8", "replace")

    functions = collections.OrderedDict()
    for sec in sections:
        name, offset, size = name_of(sec[0]), sec[4], sec[5]
        if not name.startswith(".text.") or offset + size > len(data):
            continue
        body = []
        for at in range(0, size - size % 16, 16):
            lo, hi = struct.unpack_from("<QQ", data, offset + at)
            opcode = lo & 0xFFF
            mnemonic = table.get(f"0x{opcode:03x}", f"?0x{opcode:03x}")
            operands = ""
            if opcode == BRA_OPCODE:  # named here: the loops are found by it, whatever the table
                mnemonic = "BRA"
                word = lo | (hi << 64)
                raw = ((word >> 16) & 0xFF) | (((word >> 34) & ((1 << 48) - 1)) << 8)
                if raw >> 55:
                    raw -= 1 << 56
                operands = f" 0x{at + 16 + 4 * raw:x}"
            body.append(("op", (mnemonic, operands, at)))
        functions[name[len(".text."):]] = body
    return functions


def hottest_loop(body):
    """The (label index, branch index) span with the most tensor-core instructions, the shortest
    of those (the innermost: a tile loop holds its chunk loop's instructions too); without any,
    likewise by dp4a instructions; without those either, the longest loop."""
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
        dp4a = sum(op in DP4A for op in ops)
        key = (tensor, dp4a, -len(ops) if tensor or dp4a else len(ops))
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
    ap.add_argument("--opcodes", default=OPCODES)
    ap.add_argument("--write-opcodes")
    # Kernel names are cut to this many characters (0: whole), so a table stays readable; the
    # last template arguments (e.g. gemv_kernel's kInt8B) need the whole name.
    ap.add_argument("--name-width", type=int, default=160)
    args = ap.parse_args()
    if args.sass != "-":
        with open(args.sass, "rb") as f:
            head = f.read(4)
    if args.sass != "-" and head == b"\x7fELF":
        if args.write_opcodes:
            print("sass-loops: --write-opcodes reads a cuobjdump listing, not a cubin",
                  file=sys.stderr)
            return 2
        try:
            with open(args.opcodes, encoding="utf-8") as f:
                table = json.load(f)
            with open(args.sass, "rb") as f:
                functions = parse_cubin(f.read(), table)
        except (OSError, ValueError, struct.error) as e:
            print(f"sass-loops: {args.sass}: {e}", file=sys.stderr)
            return 1
    else:
        source = (sys.stdin if args.sass == "-"
                  else open(args.sass, encoding="utf-8", errors="replace"))
        with source as f:
            if args.write_opcodes:
                return write_opcodes(f, args.write_opcodes)
            functions = parse(f)
    chosen = [n for n in functions if all(s in n for s in args.match)]
    if not chosen:
        print(f"sass-loops: no function matches {args.match} ({len(functions)} read)",
              file=sys.stderr)
        return 1
    names = demangle(chosen)

    def shown(name):
        return name if args.name_width <= 0 else name[:args.name_width]

    print("| kernel | instructions | loop | tensor-core | most frequent in the loop |")
    print("|---|---:|---:|---:|---|")
    for name in chosen:
        body = functions[name]
        total = sum(kind == "op" for kind, _ in body)
        span = hottest_loop(body)
        if span is None:
            print(f"| {shown(names[name])} | {total} | no loop | | |")
            continue
        ops = collections.Counter(v[0] for k, v in body[span[0]:span[1] + 1] if k == "op")
        loop = sum(ops.values())
        tensor = sum(c for op, c in ops.items() if op in TENSOR)
        ranked = sorted(ops.items(), key=lambda item: (-item[1], item[0]))  # ties by name
        common = ", ".join(f"{op} {c}" for op, c in ranked[:args.top])
        print(f"| {shown(names[name])} | {total} | {loop} | {tensor} | {common} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
