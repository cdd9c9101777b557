#!/usr/bin/env bash
# Run HERE (not on the GPU machine): the GPU machine reaches no package
# registry and has no Highway, so we unpack Debian's libhwy into .deps/hwy
# and carry it with the device call (carry: [".deps"]).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .deps/hwy/usr/lib/x86_64-linux-gnu/cmake/hwy ] && exit 0
mkdir -p .deps/tmp
(cd .deps/tmp && apt-get download libhwy-dev libhwy1)
for f in .deps/tmp/*.deb; do dpkg -x "$f" .deps/hwy; done
rm -rf .deps/tmp
