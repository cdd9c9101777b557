#!/usr/bin/env bash
# One device call for the dense / int4 streaming kernels (dstream.cuh): the
# A/B harness (tune/ds_tune.cu) first, then tools/gpu_check.sh over the suites
# that reach them, and the matmul / fused_ffn bench rows. From the repo root:
#   TK_ARCHS=90a-real src/cuda/tune/ds_check.sh
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-/tmp/tk_out}
mkdir -p "$OUT"
nvcc -O3 -std=c++17 -arch=sm_90a --expt-relaxed-constexpr -Iinclude -Isrc src/cuda/tune/ds_tune.cu \
  src/cuda/tune/ds_tune_ffn.cu -o /tmp/ds_tune -lcublasLt > "$OUT/ds_tune_build.log" 2>&1 &
nvcc_pid=$!
tools/gpu_check.sh all 'Cuda/Matmul.*:Cuda/FusedFfn.*:Cuda/DecodeDense.*:Cuda/DecodeInt4.*:Cuda/QmatmulInt4.*:Cuda/Coverage.*:Cuda/AttnFront.*:Cuda/DecodeAttnFront.*:Cuda/BadInput.*' \
  'matmul|fused'
wait $nvcc_pid && timeout 120 /tmp/ds_tune > "$OUT/ds_tune.txt" 2>&1
echo "== ds_tune (rc=$?)"
grep -v check "$OUT/ds_tune.txt"
grep check "$OUT/ds_tune.txt" | sort | uniq -c
