#!/usr/bin/env python3
"""bench/sustained_ceiling.py: the bf16 matrix rate a dense cuBLAS GEMM sustains at the MoE layers' GEMM shapes.

Issue 11's floors divide FLOPs by one ceiling: torch's 8192^3 bf16 GEMM, timed for 20 calls of ~1.4 ms. The layers'
GEMMs at T = 16384 run 7-14 ms each, back to back. This script asks what a dense GEMM of the same total shape reaches
on the same card, so that a grouped GEMM's rate can be read against what the card gives at that size and duration:

  ceiling    torch 8192^3, as compare_torch.py measures it (5 warm-up, median of 20 between CUDA events);
  per shape  torch.mm(A [rows, K], B [K, N]) with rows = T * top_k (every routed row against one weight matrix: the
             MMA work of the grouped GEMM, without its tile tails and with 1/E of its weight bytes, so an upper bound
             for the compute-bound rows only), N and K of GEMM1 (N = 2F, K = H) and GEMM2 (N = H, K = F);
             "median": median of ITERS calls each between events; "sustained": REPEAT calls back to back in one
             event pair (the card's clocks under a long load), per call;
  clocks     the SM clock and board power that nvidia-smi reports, sampled every 100 ms during each shape (read
             only: clocks and limits are left as they are).

Usage: python3 bench/sustained_ceiling.py [--tokens 4096,16384] [--models mixtral,qwen3,deepseek-v3] [--json F]
"""
import argparse
import json
import statistics
import subprocess
import threading
import time

import torch

MODELS = {  # H, F, E, k (the shapes)
    "mixtral": (4096, 14336, 8, 2),
    "qwen3": (2048, 768, 128, 8),
    "deepseek-v3": (7168, 2048, 256, 8),
}


class SmiSampler:
    """Samples SM clock (MHz) and power (W) with nvidia-smi while active (queries only)."""

    def __init__(self, period_s=0.1):
        self.period_s, self.samples, self._stop = period_s, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout.strip()
                clk, pwr = (float(v) for v in out.split(",")[:2])
                self.samples.append((clk, pwr))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            time.sleep(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self):
        if not self.samples:
            return None
        clk = [c for c, _ in self.samples]
        pwr = [p for _, p in self.samples]
        return dict(sm_mhz_median=statistics.median(clk), sm_mhz_min=min(clk), power_w_median=statistics.median(pwr),
                    power_w_max=max(pwr), samples=len(self.samples))


def time_gemm(a, b, out, iters, repeat):
    """(median ms per call over `iters` single calls, ms per call over `repeat` back-to-back calls)."""
    for _ in range(5):
        torch.mm(a, b, out=out)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.mm(a, b, out=out)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(repeat):
        torch.mm(a, b, out=out)
    e.record()
    e.synchronize()
    return statistics.median(times), s.elapsed_time(e) / repeat


def measure(name, rows, n, k, iters, min_sustain_ms):
    a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    flops = 2.0 * rows * n * k
    # Enough back-to-back calls for >= min_sustain_ms of load (the estimate from one timed call).
    one = time_gemm(a, b, out, 3, 1)[0]
    repeat = max(10, int(min_sustain_ms / max(one, 1e-3)))
    with SmiSampler() as smi:
        med, sus = time_gemm(a, b, out, iters, repeat)
    del a, b, out
    torch.cuda.empty_cache()
    row = dict(name=name, rows=rows, n=n, k=k, gflop=flops / 1e9, median_ms=med, median_tflops=flops / med / 1e9,
               sustained_ms=sus, sustained_tflops=flops / sus / 1e9, repeat=repeat, clocks=smi.summary())
    c = row["clocks"] or {}
    print(f"{name:28s} {rows:7d} x {n:6d} x {k:6d} {row['gflop']:9.1f} GFLOP  median {med:8.3f} ms "
          f"{row['median_tflops']:6.0f} TFLOP/s  sustained({repeat:4d}) {sus:8.3f} ms {row['sustained_tflops']:6.0f} "
          f"TFLOP/s  SM {c.get('sm_mhz_median', float('nan')):.0f} MHz (min {c.get('sm_mhz_min', float('nan')):.0f}) "
          f"{c.get('power_w_median', float('nan')):.0f} W", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--models", default="mixtral,qwen3,deepseek-v3")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sustain-ms", type=float, default=1500.0, help="back-to-back load per shape (ms)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = [measure("ceiling 8192^3", 8192, 8192, 8192, args.iters, args.sustain_ms)]
    for model in args.models.split(","):
        h, f, e, k = MODELS[model]
        for t in (int(v) for v in args.tokens.split(",")):
            rows.append(measure(f"{model} T={t} GEMM1 (2F x H)", t * k, 2 * f, h, args.iters, args.sustain_ms))
            rows.append(measure(f"{model} T={t} GEMM2 (H x F)", t * k, h, f, args.iters, args.sustain_ms))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
