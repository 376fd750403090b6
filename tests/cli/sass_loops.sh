#!/usr/bin/env bash
# scripts/sass-loops.py (gpu-ab's `sass` benchmark) on a hand-written cuobjdump listing: it finds
# each kernel's innermost loop with the most tensor-core instructions (not the tile loop around it),
# or without any the one with the most dp4a instructions (not a longer input stage), counts that
# loop's opcodes, reads predicated branches and encoding lines right, takes branch targets as labels
# (nvdisasm) or addresses (cuobjdump -sass), and a filter that matches nothing is an error. Then a
# hand-built cubin read directly with an opcode table written from a listing (branch offsets
# decoded), its name cut by --name-width, a host object refused, and a table with a clash refused.
set -euo pipefail
script="$2/scripts/sass-loops.py"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/gemv.sass" <<'SASS'

	code for sm_90
		Function : _Z4gemvILi2EEvv
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
                                                                               /* 0x000fe40000000800 */
.L_x_1:
        /*0010*/                   IMAD.WIDE R2, R0, 0x4, R2 ;
.L_x_2:
        /*0020*/                   LDS.128 R4, [R2] ;
        /*0030*/                   LOP3.LUT R8, R4, 0xf000f, RZ, 0xc0, !PT ;
        /*0040*/                   LOP3.LUT R9, R5, 0xf000f, RZ, 0xc0, !PT ;
        /*0050*/                   HMMA.16816.F32 R12, R8, R16, R12 ;
        /*0060*/                   HMMA.16816.F32 R20, R8, R18, R20 ;
        /*0070*/              @!P0 BRA `(.L_x_2) ;
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0090*/               @P1 BRA `(.L_x_1) ;
        /*00a0*/                   EXIT ;
		Function : _Z4copyv
.L_x_7:
        /*0000*/                   LDG.E.128 R4, [R2.64] ;
        /*0010*/                   STG.E.128 [R6.64], R4 ;
        /*0020*/               @P0 BRA `(.L_x_7) ;
        /*0030*/                   EXIT ;
        /*0040*/                   BRA `(.L_x_8) ;
.L_x_8:
        /*0050*/                   EXIT ;
		Function : _Z4dp4av
.L_x_20:
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   FMNMX R1, R1, R2, !PT ;
        /*0020*/                   FMNMX R1, R1, R3, !PT ;
        /*0030*/                   FMUL R1, R1, R4 ;
        /*0040*/                   F2I.S8 R5, R1 ;
        /*0050*/                   PRMT R6, R5, 0x3340, R6 ;
        /*0060*/               @P0 BRA `(.L_x_20) ;
.L_x_21:
        /*0070*/                   LDS.128 R8, [R2] ;
        /*0080*/                   IDP.4A.S8.S8 R12, R8, R4, R12 ;
        /*0090*/                   IDP.4A.S8.S8 R13, R9, R5, R13 ;
        /*00a0*/               @P1 BRA `(.L_x_21) ;
        /*00b0*/                   EXIT ;
		Function : _Z6dumpedv
        /*0000*/                   S2R R0, SR_TID.X ;                          /* 0x0000000000007919 */
                                                                               /* 0x000e220000002100 */
        /*0010*/                   HMMA.16816.F32 R12, R8, R16, R12 ;
        /*0020*/                   LDS.128 R4, [R2] ;
        /*0030*/                   HMMA.16816.F32 R12, R8, R16, R12 ;
        /*0040*/                   HMMA.16816.F32 R20, R8, R18, R20 ;
        /*0050*/               @P5 BRA P1, 0x20 ;                              /* 0x0000000000105947 */
        /*0060*/                   BRA 0x80 ;
        /*0070*/                   NOP ;
        /*0080*/                   EXIT ;
SASS
python3 "$script" "$work/gemv.sass" --top 3 >"$work/out.md"
cat "$work/out.md"
python3 - "$work/out.md" <<'PY'
import sys
rows = [l for l in open(sys.argv[1]) if l.startswith("| ") and not l.startswith("| kernel")]
assert len(rows) == 4, rows
cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
gemv, copy, dp4a, dumped = cells
# gemv<2>: 11 instructions; the inner loop (.L_x_2 .. its branch) is 6, two of them HMMA.
assert gemv[0].endswith("gemv<2>()") or gemv[0] == "_Z4gemvILi2EEvv", gemv
assert gemv[1:4] == ["11", "6", "2"], gemv
assert gemv[4] == "HMMA 2, LOP3 2, BRA 1", gemv  # ties by name
# copy: no tensor-core loop, the longest loop instead (the forward branch is not a loop).
assert copy[1:4] == ["6", "3", "0"], copy
assert copy[4] == "BRA 1, LDG 1, STG 1", copy
# dp4a: no tensor-core loop; the dp4a loop (.L_x_21, 4 instructions), not the longer input
# stage before it (7).
assert dp4a[1:4] == ["12", "4", "0"], dp4a
assert dp4a[4] == "IDP 2, BRA 1, LDS 1", dp4a
# dumped: branches to addresses; the loop is 0x20 .. 0x50 (the forward BRA 0x80 is none).
assert dumped[1:4] == ["9", "4", "2"], dumped
assert dumped[4] == "HMMA 2, BRA 1, LDS 1", dumped
PY
if python3 "$script" "$work/gemv.sass" --match nothing >"$work/none.out" 2>"$work/none.err"; then
  echo "a filter that matches nothing should fail"
  exit 1
fi
grep -q "no function matches" "$work/none.err"
python3 "$script" "$work/gemv.sass" --match gemv | grep -c '^| ' | grep -qx 2  # header and gemv

# A cubin read directly (the development machine has no cuobjdump): a hand-built ELF of machine
# EM_CUDA with one .text.NAME section of 16-byte instructions, named from a table written from a
# listing. The loop's backward BRA offset (in 4-byte units from the next instruction) is split
# over bits 16-23 and 34+ of the instruction, as on sm_90; a forward BRA is no loop.
cat >"$work/codes.sass" <<'SASS'
        /*0000*/                   LDS.128 R4, [R2] ;                          /* 0x0000000002047984 */
        /*0010*/                   HMMA.16816.F32 R12, R8, R16, R12 ;          /* 0x000000100c0c723c */
        /*0020*/               @P0 BRA 0x10 ;                                  /* 0x0000000000000947 */
        /*0030*/                   EXIT ;                                      /* 0x000000000000794d */
SASS
python3 "$script" "$work/codes.sass" --write-opcodes "$work/codes.json"
python3 - "$work" <<'PY'
import json, struct, sys
work = sys.argv[1]
table = json.load(open(f"{work}/codes.json"))
assert table == {"0x984": "LDS", "0x23c": "HMMA", "0x947": "BRA", "0x94d": "EXIT"}, table
def bra(at, target):
    raw = (target - (at + 16)) // 4 & ((1 << 56) - 1)
    word = 0x947 | (raw & 0xFF) << 16 | (raw >> 8) << 34
    return struct.pack("<QQ", word & (1 << 64) - 1, word >> 64)
def op(code):
    return struct.pack("<QQ", code, 0)
# 0x000 LDS; 0x010..0x2e0: a loop of 3 HMMA, an LDS and 41 of an opcode the table lacks, closed
# by a BRA back 0x2e0 bytes (the offset past 8 bits); a forward BRA to 0x310; EXIT at 0x310.
text = op(0x984) + op(0x23c) * 3 + op(0x984) + op(0x111) * 41 + bra(0x2E0, 0x10)
text += bra(0x2F0, 0x310) + op(0x111) + op(0x94D)
names = b"\0.shstrtab\0.text._Z4loopv\0"
shoff = 64 + len(text) + len(names)
elf = bytearray(b"\x7fELF" + bytes([2, 1, 1]) + bytes(9))
elf += struct.pack("<HHIQQQIHHHHHH", 2, 190, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 1)
elf += text + names
elf += bytes(64)  # the null section
elf += struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, 64 + len(text), len(names), 0, 0, 1, 0)
elf += struct.pack("<IIQQQQIIQQ", 11, 1, 6, 0, 64, len(text), 0, 0, 16, 0)
open(f"{work}/k.cubin", "wb").write(bytes(elf))
elf[0x12] = 62  # x86-64: a host object, not a cubin
open(f"{work}/host.o", "wb").write(bytes(elf))
PY
python3 "$script" "$work/k.cubin" --opcodes "$work/codes.json" --top 3 >"$work/cubin.md"
cat "$work/cubin.md"
python3 - "$work/cubin.md" <<'PY'
import sys
rows = [l for l in open(sys.argv[1]) if l.startswith("| ") and not l.startswith("| kernel")]
assert len(rows) == 1, rows
cells = [c.strip() for c in rows[0].strip().strip("|").split("|")]
# loop(), from its section's name; 50 instructions; the loop is 0x010 .. the BRA at 0x2e0: 46,
# three of them HMMA.
assert cells[0] in ("loop()", "_Z4loopv"), cells
assert cells[1:4] == ["50", "46", "3"], cells
assert cells[4] == "?0x111 41, HMMA 3, BRA 1", cells
PY
# --name-width cuts the kernel's name (0 keeps it whole).
python3 "$script" "$work/k.cubin" --opcodes "$work/codes.json" --name-width 3 >"$work/cut.md"
grep -qE '^\| (loo|_Z4) \| 50 \|' "$work/cut.md"
python3 "$script" "$work/k.cubin" --opcodes "$work/codes.json" --name-width 0 >"$work/whole.md"
grep -qE '^\| (loop\(\)|_Z4loopv) \| 50 \|' "$work/whole.md"
if python3 "$script" "$work/host.o" --opcodes "$work/codes.json" 2>"$work/host.err"; then
  echo "a host object should be refused"
  exit 1
fi
grep -q "not a cubin" "$work/host.err"
printf '        /*0000*/ IADD3 R1, R1, 0x1, RZ ; /* 0x0000000101017810 */\n        /*0010*/ LOP3.LUT R1, R1, 0x1, RZ, 0xc0, !PT ; /* 0x0000000101017810 */\n' \
  >"$work/clash.sass"
if python3 "$script" "$work/clash.sass" --write-opcodes "$work/clash.json" 2>"$work/clash.err"; then
  echo "two names for one opcode should be refused"
  exit 1
fi
grep -q "two names" "$work/clash.err"
echo "sass_loops: ok"
