#!/usr/bin/env bash
# scripts/gpu_run.sh: the GPU machine's part of the work, in one call (device time is scarce).
#   bash scripts/gpu_run.sh [BUILD_DIR] [STEPS]
# BUILD_DIR: a CUDA build (default build-cuda; configured and built here when its CLI is missing, using the
#            git-ignored .deps/ folder of scripts/pack_device_deps.sh for the libraries the machine lacks).
# STEPS: comma list, run in this order: fused,gemmtests,tests,torch,train,balance,layers,gemm,gemmtiles,epilogues,prefill,
#        trainfb,timeline,ceiling,traintimeline,gatedbench,gatherbench,ncugated,memcheck,racecheck,fusedsan,decode,decodepeers,fp8bench,ncudecode,ncuprefill,ncugather,profile
#        (default tests,torch,balance,layers,memcheck).
#        gemmtests: the grouped GEMM GPU tests alone (plain and gated); gemmtiles: grouped_gemm_bench --all-tiles --backward at
#        T=4096,16384 (what the tile heuristic picks and what every alternative measures); epilogues: grouped_gemm_bench
#        --backward --epilogues at T=4096,16384 (every epilogue of the Cooperative kernels without a cluster and of
#        the wgrad, alternated with the automatic choice; MODELS, TILE_TOKENS, ROUNDS); prefill: issue 11's
#        forward table (compare_torch.py --prefill: switchyard.torch.MoE, sort path, vLLM, alternated; VLLM_BEST_OF=10
#        gives vLLM its best of 10 launch configs);
#        trainfb: forward + backward at T=16384 (compare_torch.py --train; TRAIN_IMPLS, e.g. sort,switchyard,sy-gather
#        for the module with gather_in_gemm1 beside it); ncuprefill: Nsight Compute on the CLI's
#        layer at T=4096 for the three shapes (every kernel: time, DRAM bytes, throughputs; clocks untouched), in the
#        plain and the interleaved (--gate-up-interleaved --gather-in-gemm1 off) layout (NCU_LAYOUTS; `gathered`: on);
#        timeline: bench/prefill_timeline.py (the module timed per call, in a loop and as a CUDA graph, its kernels);
#        ceiling: bench/sustained_ceiling.py (dense cuBLAS bf16 at the layers' GEMM shapes, per call and back to back,
#        with the SM clock and power nvidia-smi reports: the matrix rate the card sustains at those sizes);
#        traintimeline: bench/train_timeline.py (one training step's kernels at TRAIN_TOKENS_FB, summed by name;
#        TIMELINE_INTERLEAVED=1: the interleaved layout's training path);
#        gatedbench: grouped_gemm_bench --gated (GEMM1 + SwiGLU unfused vs the gated epilogue) at T=4096,16384;
#        gatherbench: the CLI's layer (interleaved, bf16) with GEMM1 reading x through the plan vs the separate
#        gather, alternated, two rounds (GATHER_SHAPES, GATHER_TOKENS, GATHER_MODES: default `on off`, `auto` the rule);
#        ncugated: Nsight Compute on gatedbench's kernels at T=4096 (one call each: GEMM1, activation, gated kernels).
#        fused: the fused small-batch path's and the FP8 path's GPU tests (C++ and torch) first, on their own;
#        fusedsan: compute-sanitizer memcheck and racecheck on them; decode: scripts/gpu_decode.sh (issue 12's table);
#        decodepeers: compare_torch.py --decode (sort + _grouped_mm, vLLM; .deps/vllm carried); fp8bench: issue 13's
#        runs (bench/NOTES.md, "FP8 benchmark": the CLI bf16 / fp8-block / fp8-tensor on DeepSeek-V3, compare_torch --fp8);
#        ncudecode: Nsight Compute on the fused path's four kernels (time, DRAM bytes, achieved bandwidth, occupancy)
#        at Qwen3 T=1, Mixtral T=1 and DeepSeek-V3 T=16, clocks left as they are (--clock-control none).
#        ncugather: Nsight Compute's full set on GEMM1 at T=4096 (NCU_GATHER_SHAPES, default qwen3), on the gathered copy and
#        with --gather-in-gemm1 (warp states, stalls by SASS line).
# SAN_TIMEOUT (seconds, default 1800) bounds each compute-sanitizer run (rc 124 when it is cut off).
# Each step writes one log to $OUT (or ./gpu-out) as soon as it ends, so a step cut off by a time limit loses only
# itself; the profile report is packed into one archive. A short summary is printed last and kept in summary.txt.
set -uo pipefail
BUILD=${1:-build-cuda}
STEPS=${2:-tests,torch,balance,layers,memcheck}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
has() { [[ ",$STEPS," == *",$1,"* ]]; }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
note "card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
note "date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ ! -x "$BUILD/switchyard" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PWD/.deps/root/usr" \
    -DSWITCHYARD_CUTLASS_DIR="$PWD/.deps/cutlass/include" >"$OUT/build.log" 2>&1 &&
    cmake --build "$BUILD" -j16 >>"$OUT/build.log" 2>&1 || { note "build failed"; tail -30 "$OUT/build.log"; exit 1; }
fi
if has fused; then
  "$BUILD/tests/switchyard_gpu_tests" --gtest_filter='*GpuFused*:*GpuFp8*' >"$OUT/fused_tests.log" 2>&1
  note "fused/fp8 gpu tests: rc=$? $(grep -E '^\[  (PASSED|FAILED)  \]|tests? ran' "$OUT/fused_tests.log" | tr '\n' ' ')"
  grep -E "^\[  FAILED  \]|\[gpu (fused )?fp8\]" "$OUT/fused_tests.log" | head -40
  SWITCHYARD_TORCH_LIB="$BUILD/bindings/torch/_switchyard_torch.so" PYTHONPATH=python \
    python3 -m pytest -q -m gpu -k "fused or fp8" tests/python/test_torch_gpu.py tests/python/test_torch_fp8.py \
    >"$OUT/fused_torch.log" 2>&1
  note "fused/fp8 torch gpu tests: rc=$? $(tail -1 "$OUT/fused_torch.log")"
fi
if has gemmtests; then
  "$BUILD/tests/switchyard_gpu_tests" --gtest_filter='GpuGroupedGemm*:GpuGatedGemm*:GpuDgradActivation*' >"$OUT/gemm_tests.log" 2>&1
  note "grouped gemm gpu tests: rc=$? $(grep -E '^\[  (PASSED|FAILED)  \]|tests? ran' "$OUT/gemm_tests.log" | tr '\n' ' ')"
  grep -E "^\[  FAILED  \]" "$OUT/gemm_tests.log" | head -20
fi
if has tests; then
  "$BUILD/tests/switchyard_gpu_tests" >"$OUT/gpu_tests.log" 2>&1
  note "gpu tests: rc=$? $(grep -E '^\[  (PASSED|FAILED)  \]|tests? ran' "$OUT/gpu_tests.log" | tr '\n' ' ')"
  grep -E "^\[  FAILED  \]" "$OUT/gpu_tests.log" | head -20
fi
if has torch; then
  SWITCHYARD_TORCH_LIB="$BUILD/bindings/torch/_switchyard_torch.so" PYTHONPATH=python \
    python3 -m pytest -q -m gpu tests/python/test_torch_gpu.py tests/python/test_torch_hf.py \
    tests/python/test_torch_gated.py tests/python/test_torch_layer_op.py >"$OUT/torch_gpu.log" 2>&1
  note "torch gpu tests: rc=$? $(tail -1 "$OUT/torch_gpu.log")"
fi
if has train; then
  export SWITCHYARD_TORCH_LIB="$PWD/$BUILD/bindings/torch/_switchyard_torch.so" PYTHONPATH="$PWD/python"
  python3 examples/train_tiny_moe.py --steps "${TRAIN_STEPS:-400}" --device cuda --dtype bf16 \
    --json "$OUT/train_tiny_moe.json" >"$OUT/train.log" 2>&1
  note "train example: rc=$? $(grep -iE 'verdict|PASS|FAIL' "$OUT/train.log" | tail -2 | tr '\n' ' ')"
  python3 bench/compare_torch.py --train --torch-lib "$SWITCHYARD_TORCH_LIB" --check \
    --json "$OUT/train_bench.json" >>"$OUT/train.log" 2>&1
  note "train bench: rc=$?"
  python3 bench/compare_torch.py --train-gemms --torch-lib "$SWITCHYARD_TORCH_LIB" \
    --json "$OUT/train_gemms.json" >>"$OUT/train.log" 2>&1
  note "train gemms: rc=$?"
fi
if has balance; then
  {
    "$BUILD/switchyard" check --routing expert-choice --tokens 1000 --dtype bf16 && echo "check1 ok"
    "$BUILD/switchyard" check --routing expert-choice --score sigmoid --renormalize --capacity-factor 1.5 --tokens 777 && echo "check2 ok"
    "$BUILD/switchyard" check --capacity-factor 1 --eval-capacity-factor 2 --eval --drop-policy probability --tokens 4096 && echo "check3 ok"
    "$BUILD/switchyard" check --shape deepseek-v3 --dtype bf16 --tokens 129 2>/dev/null && echo "check4 ok" || true
    for extra in "" "--routing expert-choice" "--capacity-factor 1.25" "--use-bias"; do
      echo "== bench qwen3-like cost of option: '${extra:-none}'"
      "$BUILD/switchyard" bench --hidden 2048 --ffn 768 --experts 128 --top-k 8 --score sigmoid --dtype bf16 \
        --device cuda --tokens 4096 --no-stages $extra
    done
  } >"$OUT/balance.log" 2>&1
  note "balance/check: $(grep -cE '^check[0-9] ok' "$OUT/balance.log") checks ok; $(grep -E 'sparse' "$OUT/balance.log" | tr -s ' ' | cut -c1-60 | tr '\n' '|')"
fi
if has layers; then
  python3 bench/compare_torch.py --layers --check --switchyard-cli "$BUILD/switchyard" \
    --impls "${LAYER_IMPLS:-dense,loop,sort,vllm,switchyard}" --models "${MODELS:-mixtral,qwen3,deepseek}" \
    --tokens "${TOKENS:-16,256,4096,16384}" --json "$OUT/layers.json" >"$OUT/layers.log" 2>&1
  note "layers: rc=$?"
fi
if has gemm; then
  "$BUILD/bench/grouped_gemm_bench" --backward --json "$OUT/gemm.json" >"$OUT/gemm.log" 2>&1
  note "gemm bench: rc=$?"
fi
if has gemmtiles; then
  "$BUILD/bench/grouped_gemm_bench" --all-tiles --backward --tokens "${TILE_TOKENS:-4096,16384}" \
    --json "$OUT/gemm_tiles.json" >"$OUT/gemm_tiles.log" 2>&1
  note "gemm tiles bench: rc=$?"
  grep -E "T=(4096|16384)" "$OUT/gemm_tiles.log" | sed -E 's/ +/ /g' | cut -c1-400
fi
if has epilogues; then
  "$BUILD/bench/grouped_gemm_bench" --backward --epilogues --models "${MODELS:-qwen3,deepseek,mixtral}" \
    --tokens "${TILE_TOKENS:-4096,16384}" --iters 10 --warmup 3 --rounds "${ROUNDS:-2}" --json "$OUT/epilogues.json" \
    >"$OUT/epilogues.log" 2>&1
  note "epilogues bench: rc=$?"
  grep -E "T=(4096|16384)" "$OUT/epilogues.log" | sed -E 's/ +/ /g' | sed -E 's/sm90 bf16 //' | cut -c1-330
fi
if has prefill; then
  python3 bench/compare_torch.py --prefill --torch-lib "$BUILD/bindings/torch/_switchyard_torch.so" \
    --models "${MODELS:-mixtral,qwen3,deepseek}" --vllm-best-of "${VLLM_BEST_OF:-0}" --json "$OUT/prefill.json" \
    >"$OUT/prefill.log" 2>&1
  note "prefill table: rc=$?"
  tail -12 "$OUT/prefill.log"
fi
if has trainfb; then
  python3 bench/compare_torch.py --train --tokens "${TRAIN_TOKENS_FB:-16384}" --check --impls "${TRAIN_IMPLS:-sort,switchyard}" \
    --models "${MODELS:-mixtral,qwen3,deepseek}" \
    --torch-lib "$BUILD/bindings/torch/_switchyard_torch.so" --json "$OUT/trainfb.json" >"$OUT/trainfb.log" 2>&1
  note "train fwd+bwd table: rc=$?"
  tail -10 "$OUT/trainfb.log"
fi
if has gatedbench; then
  "$BUILD/bench/grouped_gemm_bench" --gated --models "${MODELS:-qwen3,mixtral,deepseek}" --tokens "${TOKENS:-4096,16384}" \
    --json "$OUT/gatedbench.json" >"$OUT/gatedbench.log" 2>&1
  note "gated bench: rc=$?"
  grep -E "up\+act|up gated|up keep" "$OUT/gatedbench.log" | cut -c1-40,100-280
fi
if has ncugated; then
  ncu --clock-control none --cache-control all --csv --kernel-name regex:'device_kernel|activation_kernel' \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed \
    "$BUILD/bench/grouped_gemm_bench" --gated --models "${MODELS:-qwen3,deepseek,mixtral}" --tokens 4096 --iters 1 \
    --warmup 0 >"$OUT/ncu_gated.csv" 2>&1
  note "ncu gated: rc=$? $(grep -c '"gpu__time_duration.sum"' "$OUT/ncu_gated.csv") kernels"
  python3 scripts/ncu_table.py "$OUT"/ncu_gated.csv 2>&1 | tee "$OUT/ncu_gated_table.txt" | tail -50
fi
if has gatherbench; then
  # GEMM1 reading x's rows through the plan against the separate gather, alternated (interleaved layout, bf16).
  for shape in ${GATHER_SHAPES:-qwen3 deepseek-v3 mixtral}; do
    for round in 1 2; do
      for mode in ${GATHER_MODES:-on off}; do
        echo "== $shape --gather-in-gemm1 $mode round $round"
        "$BUILD/switchyard" bench --shape "$shape" --tokens "${GATHER_TOKENS:-4096,16384}" --device cuda --dtype bf16 \
          --gate-up-interleaved --no-stages --no-graph --gather-in-gemm1 $mode --json "$OUT/gather_${shape}_${mode}_$round.json"
      done
    done
  done >"$OUT/gatherbench.log" 2>&1
  note "gather bench: rc=$?"
  grep -E "^== |sparse" "$OUT/gatherbench.log" | sed -E 's/, workspace.*//' | cut -c1-110
fi
if has timeline; then
  python3 bench/prefill_timeline.py --torch-lib "$BUILD/bindings/torch/_switchyard_torch.so" \
    --models "${MODELS:-qwen3,mixtral,deepseek}" --tokens "${TOKENS:-4096}" >"$OUT/timeline.log" 2>&1
  note "timeline: rc=$?"
  head -8 "$OUT/timeline.log"
fi
if has ceiling; then
  python3 bench/sustained_ceiling.py --json "$OUT/sustained_ceiling.json" >"$OUT/sustained_ceiling.log" 2>&1
  note "ceiling: rc=$?"
  cat "$OUT/sustained_ceiling.log"
fi
if has traintimeline; then
  python3 bench/train_timeline.py --torch-lib "$BUILD/bindings/torch/_switchyard_torch.so" \
    --models "${MODELS:-qwen3,mixtral,deepseek}" --tokens "${TRAIN_TOKENS_FB:-16384}" \
    ${TIMELINE_INTERLEAVED:+--interleaved} >"$OUT/train_timeline.log" 2>&1
  note "train timeline: rc=$?"
  grep -E "dy step|graph capture" "$OUT/train_timeline.log"
  grep -A14 "kernels by name" "$OUT/train_timeline.log" | head -60
fi
if has memcheck; then
  timeout "${SAN_TIMEOUT:-1800}" compute-sanitizer --tool memcheck --error-exitcode 3 "$BUILD/tests/switchyard_gpu_tests" \
    --gtest_filter="${MEMCHECK_FILTER:-*T7_*:*T129_*:*T1_*:*T0_*:*Graph*:*Kernel*:*Stage*:GpuBalance.*:GpuGroupedGemm.*Small*}" \
    >"$OUT/memcheck.log" 2>&1
  note "memcheck: rc=$? $(grep -E 'ERROR SUMMARY|^\[  PASSED|^\[  FAILED' "$OUT/memcheck.log" | tr '\n' ' ')"
fi
if has racecheck; then
  timeout "${SAN_TIMEOUT:-1800}" compute-sanitizer --tool racecheck "$BUILD/tests/switchyard_gpu_tests" \
    --gtest_filter="${RACECHECK_FILTER:-*T7_*:*Stage*}" >"$OUT/racecheck.log" 2>&1
  note "racecheck: rc=$? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY|^\[  PASSED' "$OUT/racecheck.log" | tr '\n' ' ')"
fi
if has fusedsan; then
  for tool in memcheck racecheck; do
    timeout "${SAN_TIMEOUT:-1800}" compute-sanitizer --tool $tool --error-exitcode 3 "$BUILD/tests/switchyard_gpu_tests" \
      --gtest_filter="${FUSED_SAN_FILTER:-*GpuFused.*qwen3*:*GpuFused.*expert_choice*:GpuFusedGraph.*:GpuFusedFp8.*}" \
      >"$OUT/fused_$tool.log" 2>&1
    note "fused $tool: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|^\[  PASSED|^\[  FAILED' "$OUT/fused_$tool.log" | tr '\n' ' ')"
  done
fi
if has decode; then
  OUT="$OUT" bash scripts/gpu_decode.sh "$BUILD" "${DECODE_ROUNDS:-2}" >"$OUT/decode.log" 2>&1
  note "decode table: rc=$?"
  tail -25 "$OUT/decode.log"
fi
if has decodepeers; then
  python3 bench/compare_torch.py --decode --torch-lib "$BUILD/bindings/torch/_switchyard_torch.so" \
    --json "$OUT/decode_peers.json" >"$OUT/decode_peers.log" 2>&1
  note "decode peers: rc=$?"
  tail -40 "$OUT/decode_peers.log"
fi
if has fp8bench; then
  {
    for q in none fp8-block; do
      "$BUILD/switchyard" bench --shape deepseek-v3 --dtype bf16 --device cuda --tokens "${FP8_TOKENS:-1,16,4096,16384}" \
        --quant "$q" --fused-max-tokens 0 --json "$OUT/ds-$q.json" || echo "bench --quant $q failed"
    done
    "$BUILD/switchyard" bench --shape deepseek-v3 --dtype bf16 --device cuda --tokens 16,4096 --quant fp8-tensor \
      --fused-max-tokens 0 --json "$OUT/ds-fp8-tensor.json" || echo "bench --quant fp8-tensor failed"
  } >"$OUT/fp8_cli.log" 2>&1
  note "fp8 cli bench (staged path): $(grep -c '^bench --quant .* failed$' "$OUT/fp8_cli.log") failures"
  python3 bench/compare_torch.py --fp8 --fp8-fused --switchyard-cli "$BUILD/switchyard" \
    --torch-lib "$BUILD/bindings/torch/_switchyard_torch.so" --json "$OUT/fp8.json" >"$OUT/fp8.log" 2>&1
  note "fp8 compare: rc=$?"
  tail -40 "$OUT/fp8.log"
fi
if has ncudecode; then
  for run in qwen3:1 mixtral:1 deepseek-v3:16; do
    ncu --clock-control none --cache-control all -k regex:'decode_|router_partials|route_plan' --launch-count 8 --csv \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__registers_per_thread,launch__occupancy_limit_registers \
      "$BUILD/switchyard" bench --shape "${run%%:*}" --tokens "${run##*:}" --device cuda --dtype bf16 --warmup 0 \
      --reps 1 --no-graph --no-stages --fused-max-tokens 64 --peak-tflops 790 --peak-gbps 3000 \
      >"$OUT/ncu_${run%%:*}_${run##*:}.csv" 2>&1
    note "ncu decode ${run}: rc=$? $(grep -cE 'decode_|route_plan|router_partials' "$OUT/ncu_${run%%:*}_${run##*:}.csv") metric rows"
  done
fi
if has ncuprefill; then
  metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed
  # the achieved matrix rate, where this ncu has the counter (ncu_table.py turns it into TFLOP/s)
  if ncu --query-metrics 2>/dev/null | grep -q '^sm__ops_path_tensor_src_bf16_dst_fp32 '; then
    metrics=$metrics,sm__ops_path_tensor_src_bf16_dst_fp32.sum
  fi
  # the L2's share: its throughput and the bytes it delivers to the SMs (the tensor cores' operand traffic)
  metrics=$metrics,lts__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sectors_srcunit_tex_op_read.sum
  for shape in ${NCU_SHAPES:-qwen3 deepseek-v3 mixtral}; do
    for layout in ${NCU_LAYOUTS:-plain interleaved}; do
      name=$shape; flag=""
      if [ "$layout" = interleaved ]; then name=${shape}_interleaved; flag="--gate-up-interleaved --gather-in-gemm1 off"; fi
      if [ "$layout" = gathered ]; then name=${shape}_gathered; flag="--gate-up-interleaved --gather-in-gemm1 on"; fi
      ncu --clock-control none --cache-control all --csv --metrics "$metrics" \
        "$BUILD/switchyard" bench --shape "$shape" --tokens 4096 --device cuda --dtype bf16 --warmup 0 --reps 1 \
        --no-graph --no-stages $flag >"$OUT/ncu_prefill_$name.csv" 2>&1
      note "ncu prefill $name: rc=$? $(grep -c '"gpu__time_duration.sum"' "$OUT/ncu_prefill_$name.csv") kernels"
    done
  done
  python3 scripts/ncu_table.py "$OUT"/ncu_prefill_*.csv 2>&1 | tee "$OUT/ncu_prefill_table.txt" | tail -60
fi
if has ncugather; then
  # GEMM1 alone (the layer's first CUTLASS launch) with Nsight Compute's full set, on the separate gather's copy and
  # with x's rows gathered in the producer: the warp states (where the producer and the consumers stall) and the
  # SASS lines that stall most, to compare the two mainloops.
  for shape in ${NCU_GATHER_SHAPES:-qwen3}; do
    for layout in interleaved gathered; do
      flag="--gate-up-interleaved --gather-in-gemm1 off"
      [ "$layout" = gathered ] && flag="--gate-up-interleaved --gather-in-gemm1 on"
      ncu --clock-control none --set full -k regex:device_kernel --launch-count 1 --print-details all \
        "$BUILD/switchyard" bench --shape "$shape" --tokens 4096 --device cuda --dtype bf16 --warmup 0 --reps 1 \
        --no-graph --no-stages $flag >"$OUT/ncu_gemm1_${shape}_$layout.txt" 2>&1
      note "ncu gemm1 full ${shape}_$layout: rc=$?"
      grep -E "Duration|Stall|Warp Cycles|Issued Ipc|Registers Per|Achieved Occupancy|DRAM Throughput" \
        "$OUT/ncu_gemm1_${shape}_$layout.txt" | head -40
    done
  done
fi
if has profile; then
  "$BUILD/switchyard" profile --device cuda --out "$OUT/report" ${PROFILE_ARGS:-} >"$OUT/profile.log" 2>&1
  note "profile: rc=$?"
  python3 scripts/plot_profile.py "$OUT/report" --check >>"$OUT/profile.log" 2>&1
  tar -czf "$OUT/report.tar.gz" -C "$OUT" report && rm -rf "$OUT/report"
fi
echo "================ summary"
cat "$OUT/summary.txt"
[ -f "$OUT/layers.log" ] && grep -vE "^\s*$" "$OUT/layers.log" | grep -vE " (dense|loop) " | tail -40
[ -f "$OUT/train.log" ] && grep -E "switchyard |sort |verdict|ceilings" "$OUT/train.log" | tail -16
# The device returns at most 8 files: keep the summary, pack the rest.
# The archive is written outside $OUT first (tar fails on a folder that changes while it reads it).
(cd "$OUT" && pack=$(mktemp /tmp/gpu_run_XXXXXX.tar.gz) && tar -czf "$pack" --exclude=summary.txt . &&
  find . -mindepth 1 ! -name summary.txt -delete && mv "$pack" all.tar.gz)
exit 0
