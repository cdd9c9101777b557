#!/usr/bin/env bash
# Installs what is missing (Debian / Ubuntu, via apt), builds, then runs the
# benchmark or the tests. The README's two commands:
#
#   tools/setup.sh bench [tiny-kernel bench options, e.g. --filter rmsnorm --json out.json]
#   tools/setup.sh test  [ctest options]
#
# Environment: BUILD_DIR (default build), TK_CUDA (AUTO: build the CUDA backend
# when nvcc is found; ON / OFF), JOBS (default: all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-}
case "$what" in
  bench | test | build) shift ;;
  *) echo "usage: tools/setup.sh bench|test|build [args...]" >&2; exit 2 ;;
esac

# 1. Packages: only those dpkg does not already hold.
packages=(cmake ninja-build g++ libhwy-dev libgtest-dev)
if command -v dpkg-query > /dev/null; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
else
  echo "setup: not a Debian system; assuming ${packages[*]} (or their equivalents) are present" >&2
fi

# 2. Build (Release; incremental when run again).
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTK_CUDA="${TK_CUDA:-AUTO}" > /dev/null
cmake --build "$BUILD_DIR" -j "${JOBS:-$(nproc)}"

# 3. Run.
case "$what" in
  bench) exec "$BUILD_DIR/bench/tiny-kernel" bench "$@" ;;
  test) exec ctest --test-dir "$BUILD_DIR" --output-on-failure --no-tests=error "$@" ;;
esac
