#!/usr/bin/env python3
"""tests/python/test_profile_report.py: `switchyard profile` reports against their data (CTest: profile_report).

1. GPU report renderer, without a GPU: a synthetic profile.json shaped like run_gpu_profile's output (rows that ran,
   a dense baseline refused for memory, a configuration that failed, PyTorch peers, ncu rows) is rendered with
   `switchyard profile --render-json`, and scripts/plot_profile.py --check must pass (seed sections in order, no
   "[To be filled", every number of PROFILE.md in profile.json); the failure and the refusal must be in the text.
   A number planted in PROFILE.md that is not in the JSON must make the check fail (the check can fail).
2. A tiny real CPU run (one small shape, one token count) must pass the same check.
Usage: test_profile_report.py --cli build/switchyard
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PLOT = os.path.join(ROOT, "scripts", "plot_profile.py")
STAGES = ["router", "plan", "dispatch", "gemm1", "activation", "gemm2", "shared", "combine"]


def synthetic(seed=5):
    rnd = random.Random(seed)
    j = {"generated": "2026-11-26 12:00 UTC", "command": "switchyard profile --out x --device cuda", "device": "cuda",
         "dtype": "bf16", "warmup": 5, "reps": 20, "seed": 1,
         "constants": {"capacity_factors": [1.0, 1.25, 2.0], "zipf_s": [1.0, 1.5], "router_target_us": 15,
                       "balance_steps": 300, "balance_tokens": 512, "balance_rate": 0.001},
         "shape_configs": [{"shape": "mixtral", "config": "H=4096 F=14336 E=8 k=2"},
                           {"shape": "qwen3", "config": "H=2048 F=768 E=128 k=8"}],
         "hardware": {"gpu_name": "NVIDIA H100 80GB HBM3", "sm_count": 132, "compute_capability": "9.0",
                      "memory_total_bytes": 85045379072, "memory_free_bytes_at_start": 84000000000,
                      "memory_total_gib": 79.2, "memory_free_gib_at_start": 78.2, "l2_cache_mib": 50.0,
                      "driver_cuda_version": "13.0", "runtime_cuda_version": "13.0", "cpu_model": "Xeon",
                      "logical_cores": 16, "host_mem_total_gib": 125.3, "ceiling_source": "measured in this run",
                      "bf16_gemm_n": 8192, "bf16_gemm_ms": 1.41, "bf16_tflops": 779.8, "copy_bytes": 1 << 30,
                      "copy_ms": 0.716, "copy_gbs": 2998.7}}
    j["router"], j["layers"], j["fits"] = [], [], []
    for shape, E, k in (("mixtral", 8, 2), ("qwen3", 128, 8)):
        j["fits"].append({"shape": shape, "free_bytes_with_weights": 7.1e10, "weight_bytes": 2.8e9,
                          "switchyard_max_tokens": 612345, "dense_max_tokens": 2222,
                          "switchyard_bytes_per_token": 98765.4})
        for T in (16, 4096):
            if shape == "qwen3" and T == 4096:
                j["router"].append({"shape": shape, "tokens": T, "error": "CUDA error: out of memory"})
                j["layers"].append({"shape": shape, "tokens": T, "error": "skipped"})
                continue
            sw = rnd.uniform(0.01, 0.05)
            seed_ms = sw * rnd.uniform(2, 9)
            j["router"].append({"shape": shape, "tokens": T, "switchyard_ms": sw, "switchyard_bytes": 4194304 + 1024 * T,
                                "switchyard_plan_bytes": 4096 + 64 * T, "seed_capacity": T * k // E + 3,
                                "seed_bytes": 9e6 + 1e3 * T * T, "seed_onehot_bytes": 1e3 * T * T,
                                "seed_probs_bytes": 4 * T * E, "seed_ms": seed_ms, "speedup": seed_ms / sw,
                                "floor_ms": sw / 3, "bytes_moved": 1e6, "achieved_gbs": 900.5,
                                "pct_of_floor": 33.3, "bound": "bandwidth"})
            ms = rnd.uniform(0.5, 9)
            L = {"shape": shape, "tokens": T, "config": "cfg", "kept_rows": T * k, "experts_hit": E,
                 "load": {"max_over_mean": 1.31, "cv": 0.12, "aux_loss": 1.0123, "dropped": 0,
                          "expert_counts": [T * k // E] * E},
                 "flops": 1e12, "bytes": 3e9, "floor_ms": ms * 0.6, "bound": "compute",
                 "switchyard": {"ms": ms, "floor_ms": ms * 0.6, "tflops": 512.3, "gbs": 1000.0,
                                "pct_of_floor": 60.0, "bound": "compute"}}
            stages = []
            for i, st in enumerate(STAGES):
                if st == "shared":
                    continue
                sms = ms * (0.3 if "gemm" in st else 0.05)
                stages.append({"ms": sms, "floor_ms": sms * 0.5, "tflops": 1.0, "gbs": 2.0, "pct_of_floor": 50.0,
                               "bound": "compute" if "gemm" in st else "bandwidth", "stage": st, "flops": 1e9 * i,
                               "bytes": 1e6 * (i + 1), "share_pct": 12.5, "gap_ms": sms * 0.5})
            L["stages"] = stages
            L["stages_sum_ms"] = sum(s["ms"] for s in stages)
            slices = {"logits": 256, "expert_rows": 3 << 28, "xp": 1 << 28, "g1": 1 << 29, "h": 1 << 27}
            L["memory"] = {"workspace_bytes": 9e8, "workspace_recounted_bytes": 9e8, "layout_check": True,
                           "workspace_measured_bytes": 9.01e8, "slices": slices,
                           "by_stage": [{"stage": s, "live_bytes": 1e8 * (i + 1)} for i, s in enumerate(STAGES)
                                        if s != "shared"],
                           "stage_peak_bytes": 7e8, "stage_peak_stage": "gemm2", "io_bytes": 4 * T * 4096,
                           "weight_bytes": 2.8e9, "design_budget_bytes": 8e8, "fused_goal_bytes": 3e8,
                           "workspace_over_budget": 1.125}
            if T == 16:
                L["dense"] = {"ran": True, "capacity": 9, "bytes_needed": 5e8, "peak_bytes": 5e8,
                              "product_bytes": 3e8, "onehot_bytes": 1e5, "ms": ms * 4, "floor_ms": ms * 0.6,
                              "tflops": 12.5, "gbs": 3.0, "pct_of_floor": 15.0, "bound": "compute",
                              "switchyard_speedup": 4.0}
                L["dense_over_workspace"] = 0.5556
            else:
                L["dense"] = {"ran": False, "capacity": 1100, "bytes_needed": 7.5e11, "peak_bytes": 2e6,
                              "product_bytes": 7.4e11, "onehot_bytes": 1e8,
                              "reason": "needs 698.5 GiB, device has 70.1 GiB free of 79.2 GiB"}
                L["dense_over_workspace"] = 833.3
            L["torch"] = {"sort": {"ok": True, "ms": ms * 1.4, "tflops": 300.1, "pct_of_floor_torch": 41.0,
                                   "pct_of_floor": 42.9, "switchyard_speedup": 1.4},
                          "loop": {"ok": True, "ms": ms * 2.5, "tflops": 150.2, "pct_of_floor_torch": 23.0,
                                   "pct_of_floor": 24.0, "switchyard_speedup": 2.5},
                          "dense": {"ok": False, "note": "OOM: the [T,E,C,H] combine alone needs 700.1 GB"}}
            L["best_torch_impl"] = "sort"
            L["best_torch_ms"] = ms * 1.4
            L["speedup_vs_best_torch"] = 1.4
            j["layers"].append(L)
    j["torch"] = {"available": True, "device": "NVIDIA H100 80GB HBM3", "ceiling_tflops": 771.2, "copy_tbps": 2.99,
                  "rows": []}
    j["ncu"] = {"ran": True, "shape": "mixtral", "tokens": 4096,
                "kernels": [{"name": "route_topk_kernel", "time_us": 12.5, "sm_pct": 20.1, "dram_pct": 30.2,
                             "tensor_pct": 0.0}]}
    j["failures"] = [{"where": "qwen3 T=4096 router", "error": "CUDA error: out of memory"}]
    j["utilisation"] = []
    for shape, E in (("mixtral", 8), ("qwen3", 128)):
        for name, s, bal in (("uniform", 0.0, False), ("Zipf s=1.0", 1.0, False),
                             ("Zipf s=1.0 + selection bias (300 steps)", 1.0, True)):
            j["utilisation"].append({"shape": shape, "logits": name, "zipf_s": s, "balanced": bal, "tokens": 4096,
                                     "expert_counts": [rnd.randint(100, 2000) for _ in range(E)],
                                     "max_over_mean": 1.0 + 3 * s * (0.3 if bal else 1), "cv": 0.25, "entropy": 2.0,
                                     "entropy_over_ln_e": 0.96,
                                     "dropped_fraction": {"1.0": 0.3, "1.25": 0.2, "2.0": 0.05},
                                     "dropped_pct": {"1.0": 30.0, "1.25": 20.0, "2.0": 5.0}})
    return j


def check(cli, folder):
    r = subprocess.run([sys.executable, PLOT, folder, "--check", "--no-plots"], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cli", required=True)
    args = p.parse_args()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.json")
        with open(src, "w") as f:
            json.dump(synthetic(), f)
        out = os.path.join(tmp, "gpu")
        r = subprocess.run([args.cli, "profile", "--render-json", src, "--out", out], capture_output=True, text=True)
        if r.returncode != 0:
            failures.append(f"--render-json failed ({r.returncode}): {r.stderr}")
        else:
            rc, text = check(args.cli, out)
            if rc != 0:
                failures.append("GPU report check failed: " + text)
            md = open(os.path.join(out, "PROFILE.md")).read()
            for must in ("qwen3 T=4096 router: CUDA error: out of memory", "needs 698.5 GiB", "NVIDIA H100 80GB HBM3",
                         "route_topk_kernel", "## Failures", "selection bias brings that to"):
                if must not in md:
                    failures.append(f"GPU report lacks {must!r}")
            # the check can fail: plant a number that is in no value of the JSON
            with open(os.path.join(out, "PROFILE.md"), "a") as f:
                f.write("\n- planted 12345.678 ms\n")
            rc, text = check(args.cli, out)
            if rc == 0 or "12345.678" not in text:
                failures.append("the check did not catch a planted number: " + text)
        cpu = os.path.join(tmp, "cpu")
        r = subprocess.run([args.cli, "profile", "--device", "cpu", "--shapes", "small", "--tokens", "8", "--reps", "1",
                            "--warmup", "0", "--budget", "0", "--out", cpu], capture_output=True, text=True)
        if r.returncode != 0:
            failures.append(f"CPU profile failed ({r.returncode}): {r.stderr[-2000:]}")
        else:
            rc, text = check(args.cli, cpu)
            if rc != 0:
                failures.append("CPU report check failed: " + text)
    for f in failures:
        print("FAIL:", f)
    print("profile report tests:", "FAILED" if failures else "passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
