#!/usr/bin/env bash
# scripts/gpu_run.sh: the GPU machine's part of the work, in one call (device time is scarce).
#   bash scripts/gpu_run.sh [BUILD_DIR] [STEPS]
# BUILD_DIR: a CUDA build (default build-cuda; built here when missing, with .deps/ for the libraries).
# STEPS: comma list of tests,memcheck,racecheck,layers,gemm,profile (default tests,memcheck,layers).
# Logs and JSON go to $OUT (or ./gpu-out); a short summary is printed last.
set -uo pipefail
BUILD=${1:-build-cuda}
STEPS=${2:-tests,memcheck,layers}
FINAL=${OUT:-$PWD/gpu-out}
OUT="$FINAL/work"   # everything lands here, then one archive comes back (the device returns at most 8 files)
mkdir -p "$OUT"
has() { [[ ",$STEPS," == *",$1,"* ]]; }
summary=()
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
card=$(head -1 "$OUT/card.txt")
if [ ! -x "$BUILD/switchyard" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PWD/.deps/root/usr" \
    -DSWITCHYARD_CUTLASS_DIR="$PWD/.deps/cutlass/include" >"$OUT/configure.log" 2>&1 &&
    cmake --build "$BUILD" -j16 >"$OUT/build.log" 2>&1 || { echo "build failed"; tail -30 "$OUT/build.log"; exit 1; }
fi
if has tests; then
  "$BUILD/tests/switchyard_gpu_tests" >"$OUT/gpu_tests.log" 2>&1
  summary+=("gpu tests: $(grep -E '^\[  (PASSED|FAILED)  \]|tests ran' "$OUT/gpu_tests.log" | tr '\n' ' ')")
  grep -E "^\[  FAILED  \]" "$OUT/gpu_tests.log" | head -20
fi
if has memcheck; then
  compute-sanitizer --tool memcheck --error-exitcode 3 "$BUILD/tests/switchyard_gpu_tests" \
    --gtest_filter="${MEMCHECK_FILTER:-*T7*:*T129*:*Small*:*Graph*:*Ties*:*Edge*:*Stage*}" >"$OUT/memcheck.log" 2>&1
  summary+=("memcheck: rc=$? $(grep -E 'ERROR SUMMARY|^\[  PASSED' "$OUT/memcheck.log" | tr '\n' ' ')")
fi
if has racecheck; then
  compute-sanitizer --tool racecheck "$BUILD/tests/switchyard_gpu_tests" \
    --gtest_filter="${RACECHECK_FILTER:-*T7*:*Stage*}" >"$OUT/racecheck.log" 2>&1
  summary+=("racecheck: rc=$? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY|^\[  PASSED' "$OUT/racecheck.log" | tr '\n' ' ')")
fi
if has layers; then
  python3 bench/compare_torch.py --layers --check --switchyard-cli "$BUILD/switchyard" \
    --impls "${LAYER_IMPLS:-dense,loop,sort,switchyard}" --models "${MODELS:-mixtral,qwen3,deepseek}" \
    --tokens "${TOKENS:-16,256,4096,16384}" --json "$OUT/layers.json" >"$OUT/layers.log" 2>&1
  summary+=("layers: rc=$?")
fi
if has gemm; then
  "$BUILD/bench/grouped_gemm_bench" --json "$OUT/gemm.json" >"$OUT/gemm.log" 2>&1
  summary+=("gemm bench: rc=$?")
fi
if has profile; then
  "$BUILD/switchyard" profile --device cuda --out "$OUT/report" ${PROFILE_ARGS:-} >"$OUT/profile.log" 2>&1
  summary+=("profile: rc=$?")
fi
echo "== $card"
printf '%s\n' "${summary[@]}"
[ -f "$OUT/layers.log" ] && grep -vE "^\s*$" "$OUT/layers.log" | tail -40
tar -czf "$FINAL/gpu-run.tar.gz" -C "$OUT" . && rm -rf "$OUT"
exit 0
