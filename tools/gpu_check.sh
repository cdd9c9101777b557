#!/usr/bin/env bash
# One device call: build with CUDA, run the GPU tests (also on the portable,
# non-Hopper path), compute-sanitizer memcheck + racecheck, then the bench.
# Prints a short table last. Logs go to $OUT.
#
#   tools/gpu_check.sh [all|test|sanitize|bench|profile] [gtest filter] [bench filter]
#
# profile: Nsight Compute (ncu, clocks left alone, caches flushed before each
# replay) over one launch of each kernel of the rows that miss their targets,
# beside the bench's own floor kernel for the same bytes; text reports go to
# $OUT/ncu_*.txt and one line per kernel to the summary. Not part of all.
#
# TK_BENCH_ARGS adds bench options (e.g. "--flush memset"), TK_BENCH_TAG suffixes its files.
# Run from the device tool with carry [".deps"] after tools/fetch_gpu_deps.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
FILTER=${2:-*Cuda*}
BENCH_FILTER=${3:-}
OUT=${OUT:-/tmp/tk_out}
mkdir -p "$OUT"
HWY=$PWD/.deps/hwy/usr/lib/x86_64-linux-gnu
[ -d "$HWY/cmake/hwy" ] && export LD_LIBRARY_PATH=$HWY:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DTK_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES="${TK_ARCHS:-80-real;90a-real}" \
  ${HWY:+-Dhwy_DIR=$HWY/cmake/hwy} > "$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build build-gpu -j16 > "$OUT/build.log" 2>&1 || { grep -E "error" -A3 "$OUT/build.log" | head -60; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
T=build-gpu/tests/tk_tests
B=build-gpu/bench/tiny-kernel
summary=()
run() {  # name, command...
  local name=$1; shift
  local t=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  local tail_line=$(grep -E "PASSED|FAILED|ERROR SUMMARY|tests from" "$OUT/$name.log" | tail -2 | tr '\n' ' ')
  summary+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$(( $(date +%s) - t ))" "$tail_line")")
  [ $rc -eq 0 ] || grep -E "FAILED|Failure|error|Error" "$OUT/$name.log" | head -25
}
if [[ $MODE == all || $MODE == test ]]; then
  run gtest_cuda $T --gtest_filter="$FILTER" --gtest_brief=1
  run gtest_portable env TK_CUDA_PORTABLE=1 $T --gtest_filter="$FILTER" --gtest_brief=1
fi
if [[ $MODE == all || $MODE == sanitize ]]; then
  run memcheck compute-sanitizer --tool memcheck --error-exitcode 9 $T --gtest_filter="$FILTER" --gtest_brief=1
  run racecheck compute-sanitizer --tool racecheck --error-exitcode 9 $T --gtest_filter="$FILTER" --gtest_brief=1
fi
if [[ $MODE == all || $MODE == bench ]]; then
  $B bench --backend cuda ${BENCH_FILTER:+--filter "$BENCH_FILTER"} ${TK_BENCH_ARGS:-} --json "$OUT/bench${TK_BENCH_TAG:-}.json" > "$OUT/bench${TK_BENCH_TAG:-}.txt" 2> "$OUT/bench${TK_BENCH_TAG:-}.err"
  echo "bench rc=$?"; cat "$OUT/bench${TK_BENCH_TAG:-}.txt"
  # The card's state after the rows: compute-bound rows move with its clocks.
  q=clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu
  { nvidia-smi --query-gpu=$q,clocks_event_reasons.active --format=csv 2>/dev/null ||
    nvidia-smi --query-gpu=$q --format=csv; } | tee -a "$OUT/gpu.txt"
fi
if [[ $MODE == profile ]]; then
  # row filter | kernel: the op's kernels, then the floor the bench prints beside it
  prof=(
    'rmsnorm \[32x4096\]|rmsnorm_kernel'
    'qmatmul_int4 \[1x4096\]|qstream_kernel' 'qmatmul_int4 \[1x4096\]|floor_read_kernel'
    'qmatmul_int4 \[8x4096\]|qstream_kernel'
    'fused_attn_front|dstream_kernel' 'fused_attn_front|floor_read_kernel'
    'paged_attention B1 |paged_decode_kernel' 'paged_attention B1 |paged_merge_kernel'
    'matmul \[1x4096\]|dstream_kernel' 'matmul \[1x4096\]|floor_read_kernel'
  )
  m=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,launch__registers_per_thread
  i=0; mkdir -p "$OUT/ncu"
  for pk in "${prof[@]}"; do
    f=${pk%%|*}; k=${pk##*|}; i=$((i + 1)); name=ncu/$(printf %02d $i)_$k
    t=$(date +%s)
    ncu --clock-control none --cache-control all -k "regex:^${k}" --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
      --section WarpStateStats --section SchedulerStats --section InstructionStats \
      --section SourceCounters --metrics $m \
      $B bench --backend cuda --quick --filter "$f" > "$OUT/$name.txt" 2>&1
    rc=$?
    dur=$(grep -E "^ +gpu__time_duration.sum" "$OUT/$name.txt" | awk '{print $(NF-1), $NF}' | head -1)
    dram=$(grep -E "^ +dram__throughput.avg.pct_of_peak_sustained_elapsed" "$OUT/$name.txt" | awk '{print $NF}' | head -1)
    rd=$(grep -E "^ +dram__bytes_read.sum" "$OUT/$name.txt" | awk '{print $(NF-1), $NF}' | head -1)
    summary+=("$(printf '%-30s rc=%-3s %3ss  %-28s %-20s dram %s%%  read %s' "$name" "$rc" "$(( $(date +%s) - t ))" "$f" "$k" "$dram" "$rd") $dur")
  done
  tar -czf "$OUT/ncu.tgz" -C "$OUT" ncu && rm -r "$OUT/ncu"
fi
echo "== summary =="
printf '%s\n' "${summary[@]}"
