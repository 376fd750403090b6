#!/usr/bin/env bash
# scripts/sass-loops.py (gpu-ab's `sass` benchmark) on a hand-written cuobjdump listing: it finds
# each kernel's innermost loop with the most tensor-core instructions (not the tile loop around
# it), counts that loop's opcodes, reads predicated branches and encoding lines right, takes
# branch targets as labels (nvdisasm) or addresses (cuobjdump -sass), and a filter that matches
# nothing is an error.
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
assert len(rows) == 3, rows
cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
gemv, copy, dumped = cells
# gemv<2>: 11 instructions; the inner loop (.L_x_2 .. its branch) is 6, two of them HMMA.
assert gemv[0].endswith("gemv<2>()") or gemv[0] == "_Z4gemvILi2EEvv", gemv
assert gemv[1:4] == ["11", "6", "2"], gemv
assert gemv[4] == "HMMA 2, LOP3 2, BRA 1", gemv  # ties by name
# copy: no tensor-core loop, the longest loop instead (the forward branch is not a loop).
assert copy[1:4] == ["6", "3", "0"], copy
assert copy[4] == "BRA 1, LDG 1, STG 1", copy
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
echo "sass_loops: ok"
