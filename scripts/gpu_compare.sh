#!/usr/bin/env bash
# scripts/gpu_compare.sh: whole-layer timings of two builds of Switchyard on one GPU, alternated, in one call.
#   bash scripts/gpu_compare.sh BASE_BUILD NEW_BUILD [ROUNDS]
# Each build's CLI runs `switchyard bench --device cuda --dtype bf16 --no-stages` on the Mixtral, Qwen3-30B-A3B and
# DeepSeek-V3 shapes at T = 1, 16, 4096 and 16384 tokens; the two builds take turns on every (shape, T) and every round
# (the first implementation timed on a fresh problem reads slow, so the order flips each round). Prints one row per
# (shape, T): the median over rounds of each build's eager and CUDA-graph times and their ratio (new / base).
# Raw JSON per run goes to $OUT/compare/ (or ./gpu-out/compare/); runs already there (earlier rounds) are included.
set -uo pipefail
BASE=${1:?base build folder}
NEW=${2:?new build folder}
ROUNDS=${3:-3}
FIRST_ROUND=${FIRST_ROUND:-1}  # rounds FIRST_ROUND..FIRST_ROUND+ROUNDS-1 (to split the rounds over several calls)
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT/compare"
SHAPES=${SHAPES:-mixtral qwen3 deepseek-v3}
TOKENS=${TOKENS:-1 16 4096 16384}
for round in $(seq "$FIRST_ROUND" $((FIRST_ROUND + ROUNDS - 1))); do
  for shape in $SHAPES; do
    for t in $TOKENS; do
      order="base new"
      [ $((round % 2)) = 0 ] && order="new base"
      for which in $order; do
        build=$BASE
        [ "$which" = new ] && build=$NEW
        "$build/switchyard" bench --shape "$shape" --tokens "$t" --device cuda --dtype bf16 --no-stages \
          --json "$OUT/compare/$which-$shape-$t-$round.json" >/dev/null 2>>"$OUT/compare/errors.log" ||
          echo "bench failed: $which $shape T=$t round $round" | tee -a "$OUT/compare/errors.log"
      done
    done
  done
done
python3 - "$OUT/compare" <<'EOF'
import glob, json, os, statistics, sys
d = sys.argv[1]
rows = {}
for f in glob.glob(os.path.join(d, "*.json")):
    which, rest = os.path.basename(f)[:-5].split("-", 1)
    shape, t, _round = rest.rsplit("-", 2)
    run = json.load(open(f))["runs"][0]
    r = rows.setdefault((shape, int(t)), {"base": ([], []), "new": ([], [])})
    r[which][0].append(run.get("sparse_ms", float("nan")))
    r[which][1].append(run.get("graph_ms", float("nan")))
med = lambda v: statistics.median(v) if v else float("nan")
print(f"{'shape':12} {'T':>6} | {'base eager':>10} {'new eager':>10} {'new/base':>8} | {'base graph':>10} {'new graph':>10} {'new/base':>8}")
for (shape, t) in sorted(rows, key=lambda k: (k[0], k[1])):
    r = rows[(shape, t)]
    be, ne, bg, ng = med(r["base"][0]), med(r["new"][0]), med(r["base"][1]), med(r["new"][1])
    print(f"{shape:12} {t:6d} | {be:10.4f} {ne:10.4f} {ne / be:8.3f} | {bg:10.4f} {ng:10.4f} {ng / bg:8.3f}")
EOF
