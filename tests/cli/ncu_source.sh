#!/usr/bin/env bash
# scripts/ncu-source.py (gpu-ab's `ncusource` benchmark) on hand-written exports of two launches
# of one kernel: the raw page's totals (instructions a launch, a warp launched, the busiest
# SMSP's median), the SASS page's regions (adjacent instructions run equally often, the largest
# first, a gap in the addresses ending a region), the nvdisasm listing's line table (an inlined
# call counted on the kernel's own line, the outermost frame; another function's labels ignored)
# with the line's text read under --source-root, and refusals of exports with no launch or no
# SASS table.
set -euo pipefail
script="$2/scripts/ncu-source.py"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
kernel=_Z6kernelv
cat >"$work/raw.csv" <<CSV
"ID","Kernel Name","launch__block_size","launch__grid_size","smsp__inst_executed.sum","smsp__inst_executed.max"
"","","","","inst","inst"
"0","$kernel","64","2","1,120","300"
"1","$kernel","64","2","1,120","310"
CSV
# A launch's SASS counts: the prologue by all 4 warps (4 each), three instructions by 2 warps, a
# branch never taken, a store and the exit by all (apart: two regions), a loop of two
# instructions run 50 times by 2 warps (100 each); 222 in all.
table() {
  cat <<CSV
"Kernel Name","void kernel()",
"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","Thread Instructions Executed"
"0x7f0000001000","      LDC R1, c[0x0][0x28]","1","4","128"
"0x7f0000001010","      S2R R2, SR_TID.X","0","4","128"
"0x7f0000001020","      IMAD R3, R2, 0x4, RZ","0","2","64"
"0x7f0000001030","      @P0 LDG.E R4, desc[UR4][R2.64]","0","2","64"
"0x7f0000001040","      FFMA R5, R4, R4, R5","0","2","64"
"0x7f0000001050","      BRA 0x7f0000001090","0","0","0"
"0x7f0000001060","      STG.E desc[UR4][R2.64], R5","0","4","128"
"0x7f0000001070","      HMMA.16816.F32 R8, R12, R16, R8","0","100","3200"
"0x7f0000001080","      @!P1 BRA 0x7f0000001070","0","100","3200"
"0x7f0000001090","      EXIT","0","4","128"
CSV
}
{
  table
  table | sed 's/0x7f00000010/0x7f00000090/'
} >"$work/sass.csv"
mkdir -p "$work/root/src/backend/cuda"
printf '%s\n' 'int a;' 'int b;' 'float x = y * y + x;  // the multiply-add' 'out = x;' \
  'acc = mma(acc);' >"$work/root/src/backend/cuda/k.cu"
cat >"$work/listing.txt" <<'LST'
	.section	.text._Z6kernelv,"ax",@progbits
.text._Z6kernelv:
        //## File "/elsewhere/src/backend/cuda/k.cu", line 1
        /*0000*/                   LDC R1, c[0x0][0x28] ;                  /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R2, SR_TID.X ;
        //## File "/elsewhere/src/backend/cuda/common.cuh", line 40 inlined at "/elsewhere/src/backend/cuda/k.cu", line 3
        /*0020*/                   IMAD R3, R2, 0x4, RZ ;
        /*0030*/                   @P0 LDG.E R4, desc[UR4][R2.64] ;
        /*0040*/                   FFMA R5, R4, R4, R5 ;
        //## File "/elsewhere/src/backend/cuda/k.cu", line 4
        /*0050*/                   BRA 0x90 ;
        /*0060*/                   STG.E desc[UR4][R2.64], R5 ;
.L_x_1:
        //## File "/elsewhere/src/backend/cuda/mma.cuh", line 9 inlined at "/elsewhere/src/backend/cuda/helper.cuh", line 2 inlined at "/elsewhere/src/backend/cuda/k.cu", line 5
        /*0070*/                   HMMA.16816.F32 R8, R12, R16, R8 ;
        /*0080*/                   @!P1 BRA 0x70 ;
        //## File "/elsewhere/src/backend/cuda/k.cu", line 4
        /*0090*/                   EXIT ;
	.section	.text._Z5otherv,"ax",@progbits
.text._Z5otherv:
        //## File "/elsewhere/src/backend/cuda/k.cu", line 2
        /*0070*/                   NOP ;
LST
python3 "$script" "$work/raw.csv" "$work/sass.csv" --listing "$work/listing.txt" \
  --source-root "$work/root" >"$work/out.txt"
cat "$work/out.txt"
python3 - "$work/out.txt" <<'PY'
import sys
lines = open(sys.argv[1]).read().splitlines()
def check(cond, what):
    if not cond:
        sys.exit(f"ncu_source: {what}:\n" + "\n".join(lines))
check(lines[0] == "instructions a launch: 222; a warp launched: 56; the busiest SMSP: 310 "
      "(2 launches, 4 warps each)", "totals")
regions = [l for l in lines if l.startswith("region ")]
check(regions[0].startswith("region 0x00070-0x00080: 2 instructions x 100 a launch = 90.1%: "),
      "the loop first")
check("HMMA 1, BRA 1" in regions[0], "the loop's opcodes")
check(any(r.startswith("region 0x00020-0x00040: 3 instructions x 2 a launch = 2.7%: IMAD 1, "
                       "LDG 1, FFMA 1") for r in regions), "a predicated opcode read past its guard")
check(any(r.startswith("region 0x00000-0x00010: 2 instructions x 4 a launch") for r in regions),
      "the prologue")
check(not any(r.startswith("region 0x00050") for r in regions), "a region never run")
# 0x0060 and 0x0090 run 4 times each but are not adjacent: two regions.
check(sum(r.startswith("region 0x00060-0x00060") or r.startswith("region 0x00090-0x00090")
          for r in regions) == 2, "the store and the exit apart")
src = [l for l in lines if l.startswith("k.cu:")]
check(src[0] == "k.cu:5: 50.0 a warp launched, 90.1%: acc = mma(acc);", "an inlined call's line")
check("k.cu:3: 1.5 a warp launched, 2.7%: float x = y * y + x; // the multiply-add" in src,
      "the multiply-add's line")
check(any(l.startswith("k.cu:4: 2.0 a warp launched") for l in src), "a line of two regions")
check(any(l.startswith("k.cu:1: 2.0 a warp launched") for l in src), "the prologue's line")
check(not any(l.startswith("k.cu:2:") for l in src), "another function's line")
PY
# Refused: no launch rows, no SASS table.
head -2 "$work/raw.csv" >"$work/empty.csv"
if python3 "$script" "$work/empty.csv" "$work/sass.csv" 2>"$work/err"; then
  echo "ncu_source: accepted a raw page with no launch"
  exit 1
fi
grep -q "0 launches" "$work/err"
if python3 "$script" "$work/raw.csv" "$work/empty.csv" 2>"$work/err"; then
  echo "ncu_source: accepted no SASS table"
  exit 1
fi
grep -q "0 SASS tables" "$work/err"
echo "ncu_source: ok"
