#!/usr/bin/env python3
"""bench/test_bench_quant.py: CPU checks of `switchyard bench --quant` (issue 13's FP8 benchmark), no GPU needed.

    python3 bench/test_bench_quant.py --cli build-cpu/switchyard

Runs the CLI's bench on the CPU backend on a small shape and checks its option handling and the FP8 floor it writes:
  - --quant fp8-block / fp8-tensor: the JSON says which mode ran, where the FP8 rate came from (the CPU rate, or
    --peak-tflops-fp8 when given) and the floor rule; bytes = router gate (bf16) + e4m3 codes (1 byte an element) and
    fp32 scales of every expert hit (block: one per 128x128 block; tensor: one per matrix) + x + y, recomputed here;
    flops_fp8 = flops minus the router's; floor_ms = max(router / bf16 rate + experts / FP8 rate, bytes / bandwidth)
    with the rates given on the command line;
  - --quant none keeps the bf16 floor (2 bytes per weight) and writes no FP8 fields;
  - refusals exit 2 with one error line: an unknown mode, --quant with the dense baseline, a negative FP8 rate.
The GPU side (the quantiser kernel bit for bit against the host recipe) checks itself in every CUDA run: the JSON's
quant_check.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

H, F, E, K = 256, 192, 64, 8  # --shape small-many (shapes.h)


def run(cli, *args):
    return subprocess.run([cli, "bench", "--device", "cpu", "--shape", "small-many", "--dtype", "bf16", "--warmup", "0",
                           "--reps", "1", *args], capture_output=True, text=True, timeout=600)


def bench_json(cli, tmp, *args):
    out = os.path.join(tmp, "b.json")
    if os.path.exists(out):
        os.remove(out)
    r = run(cli, *args, "--json", out)
    assert r.returncode == 0, f"bench {' '.join(args)} exited {r.returncode}: {r.stderr}"
    with open(out) as f:
        return json.load(f)


def blocks(n):
    return -(-n // 128)


def expected_bytes(mode, tokens, hit):
    gate = 2 * E * H
    codes = 2 * F * H + H * F
    if mode == "fp8-block":
        scales = 4 * (blocks(2 * F) * blocks(H) + blocks(H) * blocks(F))
    elif mode == "fp8-tensor":
        scales = 8
    else:
        return gate + hit * 2 * codes + 2 * tokens * H * 2
    return gate + hit * (codes + scales) + 2 * tokens * H * 2


def close(a, b, rel=1e-9):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cli", default="build-cpu/switchyard")
    args = p.parse_args()
    cli = args.cli
    failures = []

    def check(cond, what):
        print(("ok   " if cond else "FAIL ") + what)
        if not cond:
            failures.append(what)

    with tempfile.TemporaryDirectory() as tmp:
        tflops, tflops_fp8, gbps = 0.5, 2.0, 40.0
        for mode in ("fp8-block", "fp8-tensor"):
            j = bench_json(cli, tmp, "--quant", mode, "--tokens", "8,32")
            check(j["quant"] == mode and "quant=" + mode in j["config"], f"{mode}: JSON quant and config")
            check(j["rate_tflops_fp8"] > 0 and "CPU" in j["rate_source_fp8"], f"{mode}: CPU FP8 rate and its source")
            check("floor_rule" in j, f"{mode}: floor rule recorded")
            for r in j["runs"]:
                t, hit = r["tokens"], r["experts_hit"]
                check(r["bytes"] == expected_bytes(mode, t, hit),
                      f"{mode} T={t}: bytes {r['bytes']} == {expected_bytes(mode, t, hit)} (gate, codes, scales, x, y)")
                check(close(r["flops"] - r["flops_fp8"], 2.0 * t * H * E), f"{mode} T={t}: flops_fp8 = flops - router")
                check(r["sparse_ms"] > 0, f"{mode} T={t}: timed")
            j = bench_json(cli, tmp, "--quant", mode, "--tokens", "16", "--peak-tflops", str(tflops),
                           "--peak-tflops-fp8", str(tflops_fp8), "--peak-gbps", str(gbps))
            r = j["runs"][0]
            check(j["rate_tflops_fp8"] == tflops_fp8 and "--peak-tflops-fp8" in j["rate_source_fp8"],
                  f"{mode}: --peak-tflops-fp8 used and named")
            router = 2.0 * 16 * H * E
            want = max(router / (tflops * 1e12) + r["flops_fp8"] / (tflops_fp8 * 1e12), r["bytes"] / (gbps * 1e9)) * 1e3
            check(close(r["floor_ms"], want), f"{mode}: floor_ms {r['floor_ms']:.6g} == {want:.6g}")

        j = bench_json(cli, tmp, "--tokens", "8")
        r = j["runs"][0]
        check(j["quant"] == "none" and "rate_tflops_fp8" not in j and "flops_fp8" not in r, "none: no FP8 fields")
        check(r["bytes"] == expected_bytes("none", 8, r["experts_hit"]), "none: bf16 bytes unchanged")

        for bad, why in ((("--quant", "fp8"), "unknown mode"), (("--quant", "fp8-block", "--impl", "both"), "dense"),
                         (("--quant", "fp8-block", "--peak-tflops-fp8", "-1"), "negative rate")):
            r = run(cli, *bad, "--tokens", "8")
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            check(r.returncode == 2 and len(lines) == 1 and lines[0].startswith("switchyard: error:"),
                  f"refused ({why}): exit {r.returncode}, {lines[-1] if lines else ''}")

    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
