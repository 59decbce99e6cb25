#!/usr/bin/env bash
# scripts/gpu_decode.sh: the small-batch table of issue 12 from one build: `switchyard bench` with the fused
# small-batch path (automatic choice) and with the staged path only (--fused-max-tokens 0), alternated on every
# (shape, T) and round (the order flips each round), eager and CUDA-graph replay.
#   bash scripts/gpu_decode.sh BUILD [ROUNDS]
# Floors are the CLI's: bytes of the weights of the experts the batch hits + x + y over the copy bandwidth it
# measures (or FLOPs over the matrix rate, whichever is larger). Raw JSON goes to $OUT/decode/ (or ./gpu-out/decode/).
set -uo pipefail
BUILD=${1:?build folder}
ROUNDS=${2:-2}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT/decode"
SHAPES=${SHAPES:-mixtral qwen3 deepseek-v3}
TOKENS=${TOKENS:-1 2 4 8 16 32 64}
for round in $(seq 1 "$ROUNDS"); do
  for shape in $SHAPES; do
    for t in $TOKENS; do
      order="fused staged"
      [ $((round % 2)) = 0 ] && order="staged fused"
      for which in $order; do
        limit=64  # the fused path wherever supported (-1 would be the automatic rule)
        [ "$which" = staged ] && limit=0
        "$BUILD/switchyard" bench --shape "$shape" --tokens "$t" --device cuda --dtype bf16 --no-stages \
          --fused-max-tokens "$limit" --warmup 5 --reps 30 \
          --json "$OUT/decode/$which-$shape-$t-$round.json" >/dev/null 2>>"$OUT/decode/errors.log" ||
          echo "bench failed: $which $shape T=$t round $round" | tee -a "$OUT/decode/errors.log"
      done
    done
  done
done
python3 - "$OUT/decode" <<'PY'
import glob, json, os, statistics, sys
d = sys.argv[1]
rows = {}
for f in glob.glob(os.path.join(d, "*.json")):
    which, rest = os.path.basename(f)[:-5].split("-", 1)
    shape, t, _round = rest.rsplit("-", 2)
    run = json.load(open(f))["runs"][0]
    r = rows.setdefault((shape, int(t)), {"fused": ([], []), "staged": ([], []), "floor": [], "hit": run.get("experts_hit"), "path": set()})
    r[which][0].append(run.get("sparse_ms", float("nan")))
    r[which][1].append(run.get("graph_ms", float("nan")))
    r["floor"].append(run.get("floor_ms", float("nan")))
    r["path"].add((which, run.get("path", "?")))
med = lambda v: statistics.median(v) if v else float("nan")
us = lambda ms: 1000 * ms
print(f"{'shape':12} {'T':>3} {'hit':>4} {'floor us':>9} | {'fused graph':>11} {'%floor':>6} {'staged graph':>12} {'%floor':>6} | {'fused eager':>11} {'staged eager':>12} | paths")
for (shape, t) in sorted(rows, key=lambda k: (k[0], k[1])):
    r = rows[(shape, t)]
    fl = med(r["floor"])
    fe, fg, se, sg = med(r["fused"][0]), med(r["fused"][1]), med(r["staged"][0]), med(r["staged"][1])
    print(f"{shape:12} {t:3d} {r['hit']:>4} {us(fl):9.1f} | {us(fg):11.1f} {100*fl/fg:6.1f} {us(sg):12.1f} {100*fl/sg:6.1f} | {us(fe):11.1f} {us(se):12.1f} | {sorted(r['path'])}")
PY
