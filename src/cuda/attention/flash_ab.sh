#!/usr/bin/env bash
# One device call for the sm_90a flash kernel: tools/gpu_check.sh (build, the
# flash tests normal / portable / memcheck / racecheck, the bench rows with
# the defaults), the Hopper flash tests once more under a forced schedule
# group, then the bench rows again under the A/B switches of
# flash_attention_sm90.cu (TK_FLASH_SM90_GROUP, TK_FLASH_SM90_GRID), each
# variant twice, interleaved. Prints a table last. Carry .deps; see
# attention/flash_NOTES.md for the runs so far.
#   src/cuda/attention/flash_ab.sh [all|bench]
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-/tmp/tk_out}
MODE=${1:-all}
ROWS='flash_attention B(4 H32 S4096|1 H32 S512|4 Hq32 Hkv8 S4096)'
LONG='flash_attention B1 H32 S16384'
TK_ARCHS=${TK_ARCHS:-90a-real} tools/gpu_check.sh "$MODE" 'Cuda/*Flash*' "$ROWS|$LONG" > "$OUT/check.txt" 2>&1
cat "$OUT/check.txt" | grep -v "^flash_attention\|^bench rc" | tail -20
T=build-gpu/tests/tk_tests
B=build-gpu/bench/tiny-kernel
if [[ $MODE == all ]]; then
  TK_FLASH_SM90_GROUP=7 $T --gtest_filter='Cuda/FlashAttentionSm90*' --gtest_brief=1 > "$OUT/group7.txt" 2>&1
  echo "Sm90 tests under TK_FLASH_SM90_GROUP=7: rc=$? $(grep -E 'PASSED|FAILED' "$OUT/group7.txt" | tr '\n' ' ')"
fi
bench() {  # name, filter, env...
  local name=$1 filter=$2; shift 2
  env "$@" $B bench --backend cuda --filter "$filter" 2>/dev/null | grep -E '^(flash_attention|Compute:)' |
    sed "s/^/$name /" >> "$OUT/ab.txt"
}
: > "$OUT/ab.txt"
grep -E '^(flash_attention|Compute:)' "$OUT/check.txt" | sed 's/^/new0 /' >> "$OUT/ab.txt"
# heads: the tile order head by head (as before the head groups); tiles: one CTA per tile.
for i in 1 2; do
  bench heads$i "$ROWS|$LONG" TK_FLASH_SM90_GROUP=1
  bench tiles$i "$LONG" TK_FLASH_SM90_GRID=tiles
  bench new$i "$ROWS|$LONG"
done
echo "== A/B (H100, $(date -u +%F)) =="
grep 'Compute:' "$OUT/ab.txt"  # each bench run's cuBLAS roof: compare cards by it
grep -v 'Compute:' "$OUT/ab.txt" | sort -s -k3,3 -k4,4 -k5,5 -k6,6
