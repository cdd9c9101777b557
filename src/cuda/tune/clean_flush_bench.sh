#!/usr/bin/env bash
# Scratch: builds bench/tiny-kernel-clean (the bench with flush_shim.h: L2 flush
# = memset + read pass, so no dirty lines are written back inside timed
# kernels) next to an existing build, then runs it with the given arguments.
#   src/cuda/tune/clean_flush_bench.sh BUILD_DIR bench --backend cuda --filter ...
set -euo pipefail
B=$(cd "$1" && pwd); shift
T=$(cd "$(dirname "$0")" && pwd)
cd "$B"
cmd=$(ninja -t commands bench/tiny-kernel | grep -- "-c .*bench/cuda_device.cu")
cmd=${cmd//-o bench\/CMakeFiles\/tiny-kernel.dir\/cuda_device.cu.o/-o clean_dev.o}
eval "$cmd -include $T/flush_shim.h"
nvcc -O3 -arch=sm_90a -c "$T/flush_shim.cu" -o clean_shim.o
link=$(ninja -t commands bench/tiny-kernel | tail -1)
link=${link//bench\/CMakeFiles\/tiny-kernel.dir\/cuda_device.cu.o/clean_dev.o clean_shim.o}
link=${link//-o bench\/tiny-kernel/-o bench\/tiny-kernel-clean}
eval "$link"
bench/tiny-kernel-clean "$@"
