#!/usr/bin/env bash
# Runs every libFuzzer target of a SWITCHYARD_FUZZ=ON build for a bounded time, seeded with the committed corpus.
#   bash tests/fuzz/run_fuzzers.sh BUILD_DIR [SECONDS_PER_TARGET=60] [TARGETS...]
# New corpus entries go to BUILD_DIR/fuzz-corpus/<target>/ (the committed corpus is read, never written);
# a crash leaves BUILD_DIR/fuzz-artifacts/<target>-crash-* (replay: BUILD_DIR/tests/fuzz/fuzz_<target> FILE)
# and makes this script fail. Limits: 2 GB RSS, 1 GB per allocation (a larger one is a finding: the parsers
# must check sizes against the file first), 10 s per input.
set -euo pipefail
build=${1:?usage: run_fuzzers.sh BUILD_DIR [SECONDS] [TARGETS...]}
secs=${2:-60}
shift $(( $# >= 2 ? 2 : 1 ))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors npy weights cli)
here=$(cd "$(dirname "$0")" && pwd)
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:allocator_may_return_null=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
mkdir -p "$build/fuzz-artifacts"
for t in "${targets[@]}"; do
  bin="$build/tests/fuzz/fuzz_$t"
  [ -x "$bin" ] || { echo "run_fuzzers: $bin not built (configure with -DSWITCHYARD_FUZZ=ON)" >&2; exit 1; }
  mkdir -p "$build/fuzz-corpus/$t"
  start=$(date +%s)
  if ! "$bin" -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 -max_len=16384 \
       -print_final_stats=1 -artifact_prefix="$build/fuzz-artifacts/$t-" \
       "$build/fuzz-corpus/$t" "$here/corpus/$t" >"$build/fuzz-artifacts/$t.log" 2>&1; then
    tail -n 60 "$build/fuzz-artifacts/$t.log"
    echo "run_fuzzers: fuzz_$t FAILED (log: $build/fuzz-artifacts/$t.log)" >&2
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$build/fuzz-artifacts/$t.log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'cov: [0-9]*' "$build/fuzz-artifacts/$t.log" | tail -1 || true)
  echo "run_fuzzers: fuzz_$t passed: $runs inputs in $(( $(date +%s) - start )) s, $cov"
done
# The plain closing line CI reads: every target ran its time without a finding.
echo "fuzz: ${#targets[@]} passed, 0 failed"
