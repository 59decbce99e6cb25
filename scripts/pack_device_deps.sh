#!/usr/bin/env bash
# Prepares the git-ignored folder .deps/ for the GPU machine, which has no package registry:
#   .deps/root/usr/...          Debian dev packages unpacked (GoogleTest, Google Benchmark, CLI11, nlohmann-json, fmt)
#   .deps/cutlass/include/...   CUTLASS headers from the pinned nvidia-cutlass wheel
# Carry `.deps` with the device call; `make` passes .deps/root/usr to CMake as a prefix path.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .deps/debs .deps/root
if [ ! -e .deps/root/usr/include/gtest/gtest.h ]; then
  (cd .deps/debs && apt-get download -qq libgtest-dev googletest libbenchmark-dev libbenchmark1debian \
      libcli11-dev nlohmann-json3-dev libfmt-dev libfmt9 >/dev/null)
  for f in .deps/debs/*.deb; do dpkg -x "$f" .deps/root; done
  rm -rf .deps/debs .deps/root/usr/share/doc .deps/root/usr/src
fi
if [ ! -e .deps/cutlass/include/cutlass/cutlass.h ]; then
  src=$(python3 -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))")
  mkdir -p .deps/cutlass
  cp -r "$src/include" .deps/cutlass/include
  mkdir -p .deps/cutlass/tools/util && cp -r "$src/tools/util/include" .deps/cutlass/tools/util/include
fi
du -sh .deps
