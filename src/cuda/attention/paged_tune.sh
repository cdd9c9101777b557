#!/usr/bin/env bash
# Builds and runs paged_tune.cu on the device machine (sm_90a): this tree's
# paged_attention.cu against the one of commit dd71f16, which the caller puts
# beside this script first (the device copy has no git history):
#   git show dd71f16:src/cuda/paged_attention.cu > src/cuda/attention/paged_v2b.cu
# Output: $OUT/tune.txt (also printed).
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-/tmp/tk_out}
mkdir -p "$OUT"
F="-O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Iinclude -Isrc"
nvcc $F -Dpaged_attention=paged_attention_v2b \
  -Dpaged_attention_workspace_size=paged_attention_workspace_size_v2b \
  -c src/cuda/attention/paged_v2b.cu -o /tmp/paged_v2b.o || exit 1
nvcc $F src/cuda/attention/paged_tune.cu /tmp/paged_v2b.o -o /tmp/paged_tune || exit 1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader > "$OUT/tune.txt"
/tmp/paged_tune >> "$OUT/tune.txt" 2>&1
echo "paged_tune rc=$?" >> "$OUT/tune.txt"
cat "$OUT/tune.txt"
