#!/usr/bin/env python3
"""bench/compare_torch.py: PyTorch peers beside Switchyard, measured in one run on the GPU machine.

Seven modes:

  GEMM mode (default): the expert GEMMs of the DESIGN.md shapes, Switchyard's grouped GEMM beside
  torch._grouped_mm on identical problems (same per-expert row counts, same N/K, random bf16 data).
      python3 bench/compare_torch.py --grouped-bench build/bench/grouped_gemm_bench --tokens 16,4096
  runs the Switchyard benchmark first (it writes JSON with the per-expert counts), then times
  torch._grouped_mm(a [rows,K], w.transpose(-2,-1) for w [E,N,K], offs=int32 cumulative row ends) on the same
  counts, and prints both with the floor. Without --grouped-bench (or with --gemm-json FILE from an earlier
  run of the benchmark) it uses that file, or routes on its own and shows PyTorch alone.

  Layer mode (--layers): whole MoE layers (router, experts with SwiGLU, combine) in PyTorch:
    dense : the seed study's GShard baseline: one-hot dispatch/combine tensors [T,E,C], combine by broadcast
            multiply, materialising [T,E,C,H]; an out-of-memory is caught and reported with the bytes needed;
    loop  : the Hugging Face style loop over experts (a host synchronisation per expert);
    sort  : sort by expert, permute, torch._grouped_mm, SwiGLU, torch._grouped_mm, weighted un-permute;
  and Switchyard's whole layer through run_switchyard_layer_bench() (the CLI's `bench --json`) when the CLI is
  present. Each is reported as ms, TFLOP/s, % of floor and peak extra memory (torch.cuda.max_memory_allocated
  beyond inputs and weights).

  Layer training mode (--train, implies --layers; tokens default 4096,16384): forward + backward of the whole
  layer (loss = y.float().square().mean(); gradients of x and every weight) for the sort path (autograd through
  torch._grouped_mm) and switchyard.torch.MoE (--torch-lib, default $SWITCHYARD_TORCH_LIB or
  build/bindings/torch/_switchyard_torch.so; the row says why when it cannot load), on the same parameters.
  Floor = 3x the forward floor (DESIGN.md). --check adds a relative-L2 comparison of y and the gradients.
      python3 bench/compare_torch.py --train --torch-lib build/bindings/torch/_switchyard_torch.so --check

  Training GEMM mode (--train-gemms; tokens default 4096,16384): each expert GEMM's three training products
  on random per-expert counts: forward C = A B_e^T, dgrad dA = dC B_e, wgrad dB_e = dC_e^T A_e, Switchyard's
  torch ops (grouped_mm, grouped_mm_dgrad, grouped_mm_wgrad: --torch-lib) beside torch._grouped_mm on the same
  tensors (for wgrad its 2-D x 2-D form grouped along the reduction), with the floor of each.
      python3 bench/compare_torch.py --train-gemms --torch-lib build/bindings/torch/_switchyard_torch.so

  Prefill mode (--prefill; tokens default 4096,16384; issue 11): the forward as a user runs it, switchyard.torch.MoE
  (eval, no_grad) beside the sort path and vLLM's Triton kernel on the module's weights, timed in alternation,
  with the floor, each one's peak extra memory and Switchyard's output checked against the sort path.
      python3 bench/compare_torch.py --prefill --torch-lib build/bindings/torch/_switchyard_torch.so

  Decode mode (--decode; tokens default 1,2,4,8,16,32,64; issue 12): whole layers at decode batch sizes, each
  timed eager and as a replayed CUDA graph (one call captured on a static x after warm-up):
    switchyard        : switchyard.torch.MoE (--torch-lib) in eval mode under no_grad, whose forward takes the fused
                        small-batch op for bf16 CUDA inputs of T <= 64 (MoE.fused_max_tokens = 64);
    switchyard-staged : the same weights with fused_max_tokens = 0 (the staged ops); a binding without the
                        attribute is reported as staged only;
    sort              : the layer mode's sort path;
    vllm              : vLLM's Triton fused_moe_kernel (bench/vllm_peer.py, needs .deps/vllm and triton).
  All share one copy of the weights (the switchyard modules wrap the same tensors) and one routing function:
  softmax over fp32 logits, top-k, no renormalisation. Implementations are alternated per measurement and the L2
  cache is flushed before every timed call. Floor per (shape, T): the bytes of the experts that x's routing hits,
  plus x and y, over the copy bandwidth. Each output is checked against the sort path (relative L2, flagged above
  2e-2). Prints a table per shape and the smallest T where the staged ops beat the fused op; --json has every
  number (null where not measured).
      python3 bench/compare_torch.py --decode --torch-lib build/bindings/torch/_switchyard_torch.so --json out.json

  FP8 mode (--fp8; tokens default 1,16,4096,16384; issue 13): W8A8 layers with 128x128 block-scaled e4m3 weights
  and activations quantised per token and 128 channels, for mixtral, qwen3 and deepseek (routed experts, softmax
  top-k, SwiGLU): Switchyard's CLI bench in bf16 and with --quant fp8-block (the CLI's random weights quantised on
  the GPU, checked there against the host recipe), eager and graph, speed-up fp8 over bf16 and % of the CLI's FP8
  floor; vLLM's fused_moe Triton kernel in its block-fp8 mode (vllm_peer.vllm_fp8_layer_fn) and switchyard.torch.MoE
  fp8 / bf16 on ONE torch weight copy quantised once by switchyard quantize's rule (quantize_fp8_block_torch), timed
  in alternation; the FP8 ceiling torch._scaled_mm 8192^3 (e4m3, per-tensor scales, the faster of use_fast_accum
  off/on) measured in the run and passed to the CLI (--peak-tflops-fp8); the output check at T=64 on the torch
  weights (switchyard.torch fp8 vs its bf16 output and vs vLLM fp8, same routing: softmax of fp32 logits). The
  correctness check uses switchyard.torch rather than the CLI's forward because DeepSeek-V3's weights would have to be
  written to a 11-22 GB safetensors file. Expected: about 2-3 minutes on an H100 (3 x 2 CLI calls, two Triton
  compiles per shape), well under 5.
      python3 bench/compare_torch.py --fp8 --switchyard-cli BUILD/switchyard --torch-lib BUILD/bindings/torch/_switchyard_torch.so --json fp8.json
  (.deps/vllm must travel with the call; --fp8-fused adds the CLI's fused path at T <= 64, --fp8-check-tokens N
  the check's T.) Seen on the CPU (toy layer H=256 F=128 E=8 k=2 T=16): switchyard's fp8 layer and a W8A8 loop of
  vLLM's recipe differ by 2.0e-2 relative L2 spread over every token while their bf16 layers agree to 4e-3, against
  6.4e-2 for fp8 vs bf16; the check therefore flags only a difference above half of fp8-vs-bf16.

Floors: max(FLOPs / measured bf16 ceiling, bytes / measured copy bandwidth); the ceiling is a torch 8192^3 bf16
matmul and the copy bandwidth a 1 GiB device copy, both measured in this run (the GEMM mode takes the
Switchyard benchmark's own measurements when it has them). Bytes: weights of every expert that receives a row,
plus activations read and written once. Timings: CUDA events, warm-up, median; a comparison is valid only within
one run (run-to-run spread on these machines reaches 20%).
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

try:  # vLLM's Triton fused-MoE kernel as layer impl `vllm` (bench/vllm_peer.py; needs .deps/vllm and triton)
    from vllm_peer import PeerUnavailable, vllm_fp8_layer_fn, vllm_layer_fn
except ImportError as _vllm_import_error:
    class PeerUnavailable(Exception):
        pass

    def vllm_layer_fn(*_args, _why=str(_vllm_import_error), **_kwargs):
        raise PeerUnavailable(f"bench/vllm_peer.py not importable: {_why}")

    vllm_fp8_layer_fn = vllm_layer_fn

MODELS = {
    # name: (hidden H, ffn F, experts E, top_k)
    "mixtral": (4096, 14336, 8, 2),
    "qwen3": (2048, 768, 128, 8),
    "deepseek": (7168, 2048, 256, 8),
}


def time_interleaved(fns, warmup=5, iters=20, before=None):
    """Median milliseconds of each fn between CUDA events, timed in alternation (fn0, fn1, ..., fn0, fn1, ...) after
    warm-up rounds of all of them, so that clock, power and cache drift over the measurement falls on every
    implementation alike. (Timed one after the other, the first implementation measured on a fresh problem read up
    to 13-20% slower on an H100: bench/NOTES.md, 2026-11-27.) before: called ahead of every timed call, outside
    the events, then the device is synchronised (the decode mode flushes the L2 cache there)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    torch.cuda.synchronize()
    times = [[] for _ in fns]
    for _ in range(iters):
        for i, fn in enumerate(fns):
            if before is not None:
                before()
                torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[i].append(start.elapsed_time(end))
    return [statistics.median(t) for t in times]


def time_cuda(fn, warmup=5, iters=20):
    """Median milliseconds of fn() between CUDA events, after warm-up."""
    return time_interleaved([fn], warmup, iters)[0]


def measure_ceilings():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_cuda(lambda: a @ b, warmup=5, iters=20)
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    del a, b
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), warmup=3, iters=12)
    tbps = 2 * src.numel() / (ms * 1e-3) / 1e12
    del src, dst
    torch.cuda.empty_cache()
    return tflops, tbps


def route_counts(experts, top_k, tokens, gen):
    """Each token picks top_k distinct experts uniformly at random; per-expert row counts."""
    scores = torch.rand(tokens, experts, generator=gen)
    ids = scores.topk(top_k, dim=1).indices
    return torch.bincount(ids.flatten(), minlength=experts).tolist()


# ---------------------------------------------------------------------------------------------------------------
# GEMM mode
# ---------------------------------------------------------------------------------------------------------------
def run_grouped_bench(path, models, tokens, iters, warmup):
    """Runs bench/grouped_gemm_bench with --json; returns its parsed output (or None when absent)."""
    if not path or not os.path.exists(path):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gg.json")
        cmd = [path, "--models", ",".join(models), "--tokens", ",".join(str(t) for t in tokens), "--iters",
               str(iters), "--warmup", str(warmup), "--json", out]
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def gemm_mode(args):
    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    sy = None
    if args.gemm_json:
        with open(args.gemm_json) as f:
            sy = json.load(f)
    else:
        sy = run_grouped_bench(args.grouped_bench, models, tokens, args.iters, args.warmup)
    if sy is not None:
        ceiling, copy_tbps = sy["bf16_ceiling_tflops"], sy["copy_tbps"]
        problems = [(r["model"], r["tokens"], r["gemm"], r["n"], r["k"], r["counts"], r) for r in sy["rows"]]
    else:
        ceiling, copy_tbps = measure_ceilings()
        gen = torch.Generator().manual_seed(args.seed)
        problems = []
        for m in models:
            h, f, e, k = MODELS[m]
            for t in tokens:
                counts = route_counts(e, k, t, gen)
                problems.append((m, t, "up", 2 * f, h, counts, None))
                problems.append((m, t, "down", h, f, counts, None))
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"ceilings: bf16 {ceiling:.0f} TFLOP/s, copy {copy_tbps:.2f} TB/s"
          + (" (from the Switchyard benchmark, same run)" if sy is not None else " (measured here)"))
    hdr = (f"{'model':<9}{'T':>6} {'gemm':<5}{'rows':>8}{'N':>7}{'K':>7} {'floor ms':>9} {'switchyard ms':>14}"
           f" {'%floor':>7} {'torch ms':>9} {'%floor':>7} {'sy/torch':>8}")
    print(hdr)
    print("-" * len(hdr))
    results = []
    for model, t, gemm, n, k, counts, syrow in problems:
        e = len(counts)
        rows = sum(counts)
        offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).cuda()
        # Rotate operand sets when one set is small against the L2 (the DESIGN shapes' weights are larger).
        set_bytes = 2 * (rows * k + e * n * k + rows * n)
        sets = max(1, min(64, math.ceil(4 * 50e6 / max(set_bytes, 1))))
        a_sets = [torch.empty(rows, k, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1) for _ in range(sets)]
        w_sets = [torch.empty(e, n, k, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1) for _ in range(sets)]
        state = {"i": 0}

        def call():
            i = state["i"] % sets
            state["i"] += 1
            return torch._grouped_mm(a_sets[i], w_sets[i].transpose(-2, -1), offs=offs)

        torch_ms = time_cuda(call, args.warmup, args.iters)
        flops = 2.0 * rows * n * k
        hit = sum(1 for c in counts if c > 0)
        bytes_ = hit * n * k * 2 + rows * k * 2 + rows * n * 2
        floor_ms = max(flops / (ceiling * 1e12), bytes_ / (copy_tbps * 1e12)) * 1e3
        sy_ms = syrow["ms"] if syrow else float("nan")
        print(f"{model:<9}{t:>6} {gemm:<5}{rows:>8}{n:>7}{k:>7} {floor_ms:>9.4f} {sy_ms:>14.4f} "
              f"{100 * floor_ms / sy_ms:>6.1f}% {torch_ms:>9.4f} {100 * floor_ms / torch_ms:>6.1f}% "
              f"{sy_ms / torch_ms:>8.3f}", flush=True)
        results.append(dict(model=model, tokens=t, gemm=gemm, rows=rows, n=n, k=k, floor_ms=floor_ms,
                            switchyard_ms=sy_ms, switchyard_kernel=syrow["kernel"] if syrow else None,
                            torch_ms=torch_ms))
        del a_sets, w_sets
        torch.cuda.empty_cache()
    return dict(mode="gemm", device=torch.cuda.get_device_name(), ceiling_tflops=ceiling, copy_tbps=copy_tbps,
                rows=results)


# ---------------------------------------------------------------------------------------------------------------
# Layer mode
# ---------------------------------------------------------------------------------------------------------------
def router(x, wg, top_k):
    logits = (x @ wg.t()).float()
    probs = logits.softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    return weights, ids


def layer_dense(x, wg, w13, w2, top_k, capacity_factor):
    """The seed's GShard baseline: one-hot dispatch/combine [T,E,C] and a broadcast-multiply combine."""
    t, h = x.shape
    e = w13.shape[0]
    f = w2.shape[2]
    weights, ids = router(x, wg, top_k)
    cap = max(1, math.ceil(capacity_factor * t * top_k / e))
    onehot = F.one_hot(ids, e).to(torch.int32)                   # [T, k, E]
    flat = onehot.permute(1, 0, 2).reshape(t * top_k, e)         # slot-major priority (GShard)
    pos = (flat.cumsum(0) - 1).reshape(top_k, t, e).permute(1, 0, 2)  # [T, k, E] position inside the expert
    pos_k = pos.gather(2, ids.unsqueeze(-1)).squeeze(-1)         # [T, k]
    keep = pos_k < cap
    tok = torch.arange(t, device=x.device)[:, None].expand(t, top_k)
    dispatch = torch.zeros(t, e, cap, device=x.device, dtype=x.dtype)  # one-hot [T, E, C]
    combine = torch.zeros(t, e, cap, device=x.device, dtype=x.dtype)   # weights [T, E, C]
    dispatch[tok[keep], ids[keep], pos_k[keep]] = 1
    combine[tok[keep], ids[keep], pos_k[keep]] = weights[keep].to(x.dtype)
    expert_in = torch.einsum("tec,th->ech", dispatch, x)         # [E, C, H]
    g = torch.bmm(expert_in, w13.transpose(1, 2))                # [E, C, 2F]
    act = F.silu(g[..., :f]) * g[..., f:]
    expert_out = torch.bmm(act, w2.transpose(1, 2))              # [E, C, H]
    y = (expert_out.unsqueeze(0) * combine.unsqueeze(-1)).sum(dim=(1, 2))  # materialises [T, E, C, H]
    return y


def layer_loop(x, wg, w13, w2, top_k):
    """Hugging Face style: loop over experts, index_add the weighted outputs (host sync per expert)."""
    t, h = x.shape
    e = w13.shape[0]
    f = w2.shape[2]
    weights, ids = router(x, wg, top_k)
    y = torch.zeros_like(x)
    mask = F.one_hot(ids, e).permute(2, 1, 0)  # [E, k, T]
    for ei in range(e):
        slot, tok = torch.where(mask[ei])
        if tok.numel() == 0:
            continue
        xi = x[tok]
        g = xi @ w13[ei].t()
        out = (F.silu(g[:, :f]) * g[:, f:]) @ w2[ei].t()
        y.index_add_(0, tok, (out * weights[tok, slot].unsqueeze(1)).to(x.dtype))
    return y


def layer_sort(x, wg, w13, w2, top_k, router_fn=router):
    """Sort by expert, permute, grouped GEMM, SwiGLU, grouped GEMM, weighted un-permute (no host sync)."""
    t, h = x.shape
    e = w13.shape[0]
    f = w2.shape[2]
    weights, ids = router_fn(x, wg, top_k)
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.zeros(e, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    xp = x[order // top_k]
    g = torch._grouped_mm(xp, w13.transpose(-2, -1), offs=offs)
    act = F.silu(g[:, :f]) * g[:, f:]
    out = torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs)
    unperm = torch.empty_like(out)
    unperm[order] = out
    y = (unperm.view(t, top_k, h).float() * weights[..., None]).sum(1).to(x.dtype)
    return y


def run_switchyard_layer_bench(cli, model, tokens, ceiling_tflops, copy_tbps, warmup=5, iters=20, dtype="bf16",
                               quant="none", fp8_tflops=None, fused_max_tokens=None, full=False):
    """Switchyard's whole layer through `<cli> bench --device cuda --json`, with the same shape and routing rule
    as the PyTorch peers (softmax over E, top-k, no renormalisation, SwiGLU) and the ceilings measured here.

    Returns the CLI's run entry: sparse_ms (CUDA events, inputs rotated past L2), graph_ms (CUDA-graph replay),
    stages_ms, workspace_bytes (the only memory a forward uses beyond x, y and weights), floor fields. None (and
    says why) when the CLI is missing or fails.
    tokens: one T, or a list (then one CLI call times them all on one weight copy). quant: "none" | "fp8-block" |
    "fp8-tensor" (`bench --quant`: the CLI's random bf16 weights quantised on the GPU); fp8_tflops: the FP8 ceiling of
    the FP8 floor (--peak-tflops-fp8; None: the CLI measures its own with cuBLASLt). fused_max_tokens: forwarded as
    --fused-max-tokens (None: the CLI's default, the automatic choice; 0 staged; 64 fused wherever supported). full: return the whole JSON document (runs,
    rates, quant_check) instead of the first run; a CLI exit of 1 with a JSON written (the GPU quantiser differed
    from the host recipe) still returns the document, whose quant_check says so.
    """
    if not cli or not os.path.exists(cli):
        print(f"  switchyard CLI not found at {cli}", file=sys.stderr)
        return None
    h, f, e, k = MODELS[model]
    tok = ",".join(str(t) for t in tokens) if isinstance(tokens, (list, tuple)) else str(tokens)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sy.json")
        cmd = [cli, "bench", "--hidden", str(h), "--ffn", str(f), "--experts", str(e), "--top-k", str(k),
               "--score", "softmax", "--activation", "swiglu", "--tokens", tok, "--dtype", dtype,
               "--device", "cuda", "--warmup", str(warmup), "--reps", str(iters),
               "--peak-tflops", f"{ceiling_tflops:.1f}", "--peak-gbps", f"{copy_tbps * 1e3:.1f}", "--json", out]
        if quant != "none":
            cmd += ["--quant", quant]
            if fp8_tflops:
                cmd += ["--peak-tflops-fp8", f"{fp8_tflops:.1f}"]
        if fused_max_tokens is not None:
            cmd += ["--fused-max-tokens", str(fused_max_tokens)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if r.returncode == 1 and full and os.path.exists(out):
                print(f"  switchyard bench: {r.stderr.strip()[-400:]}", file=sys.stderr)
            elif r.returncode != 0:
                raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
            with open(out) as fh:
                doc = json.load(fh)
            return doc if full else doc["runs"][0]
        except subprocess.CalledProcessError as err:
            print(f"  switchyard bench failed ({' '.join(cmd)}): {err.stderr.strip()[-400:]}", file=sys.stderr)
        except (subprocess.SubprocessError, OSError, ValueError, KeyError, IndexError) as err:
            print(f"  switchyard bench failed ({' '.join(cmd)}): {err}", file=sys.stderr)
        return None


def check_switchyard_output(cli, x, wg, w13, w2, top_k):
    """Runs `switchyard forward --device cuda` on the SAME weights and input as the PyTorch sort path (written as a
    Mixtral-named safetensors layer and an .npy input) and returns the relative L2 error of its output against
    layer_sort's, or None (with the reason printed) when that cannot run."""
    try:
        from safetensors.torch import save_file
        import numpy as np
    except ImportError as err:
        print(f"  output check skipped: {err}", file=sys.stderr)
        return None
    e, f = w13.shape[0], w2.shape[2]
    with tempfile.TemporaryDirectory() as tmp:
        tensors = {"block_sparse_moe.gate.weight": wg.contiguous()}
        for i in range(e):
            tensors[f"block_sparse_moe.experts.{i}.w1.weight"] = w13[i, :f].contiguous()
            tensors[f"block_sparse_moe.experts.{i}.w3.weight"] = w13[i, f:].contiguous()
            tensors[f"block_sparse_moe.experts.{i}.w2.weight"] = w2[i].contiguous()
        wpath, xpath, ypath = (os.path.join(tmp, n) for n in ("w.safetensors", "x.npy", "y.npy"))
        save_file(tensors, wpath)
        del tensors
        np.save(xpath, x.view(torch.uint16).cpu().numpy())  # bf16 as <u2, as the CLI reads it
        cmd = [cli, "forward", "--weights", wpath, "--input", xpath, "--output", ypath, "--device", "cuda",
               "--dtype", "bf16", "--top-k", str(top_k), "--score", "softmax", "--activation", "swiglu"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            print(f"  output check: switchyard forward failed: {r.stderr.strip()[-400:]}", file=sys.stderr)
            return None
        y_sy = torch.from_numpy(np.load(ypath).astype(np.int16)).view(torch.bfloat16).to(x.device).float()
    with torch.no_grad():
        y_ref = layer_sort(x, wg, w13, w2, top_k).float()
    return float((y_sy - y_ref).norm() / y_ref.norm())


def start_table(what, hdr):
    """Measures the ceilings, prints the device line (what: the mode, after the torch version), the ceilings and the
    table header; returns (bf16 TFLOP/s, copy TB/s)."""
    ceiling, copy_tbps = measure_ceilings()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}{what}")
    print(f"ceilings (measured here): bf16 {ceiling:.0f} TFLOP/s, copy {copy_tbps:.2f} TB/s")
    print(hdr)
    print("-" * len(hdr))
    return ceiling, copy_tbps


def layer_floor(x, wg, model, ceiling, copy_tbps):
    """The forward floor of a layer on x (the issue's definition): max(FLOPs incl. the router / bf16 ceiling,
    (weights of the experts x's routing hits + x + y) / copy bandwidth). Returns (experts hit, FLOPs, floor ms)."""
    t = x.shape[0]
    h, f, e, k = MODELS[model]
    with torch.no_grad():
        _, ids = router(x, wg, k)
    hit = int(torch.unique(ids).numel())
    flops = 2.0 * t * h * e + t * k * 6.0 * h * f
    bytes_ = hit * 3 * h * f * 2 + 2 * t * h * 2
    return hit, flops, max(flops / (ceiling * 1e12), bytes_ / (copy_tbps * 1e12)) * 1e3


def layer_mode(args):
    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    impls = args.impls.split(",")
    ceiling, copy_tbps = start_table(
        "", f"{'model':<9}{'T':>6} {'impl':<11}{'ms':>10}{'TFLOP/s':>9}{'%floor':>8}{'peak extra GB':>14}  note")
    results = []
    torch.manual_seed(args.seed)
    for m in models:
        h, f, e, k = MODELS[m]
        wg = torch.empty(e, h, device="cuda", dtype=torch.bfloat16).normal_(0, 1 / math.sqrt(h))
        w13 = torch.empty(e, 2 * f, h, device="cuda", dtype=torch.bfloat16).normal_(0, 1 / math.sqrt(h))
        w2 = torch.empty(e, h, f, device="cuda", dtype=torch.bfloat16).normal_(0, 1 / math.sqrt(f))
        for t in tokens:
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            hit, flops, floor_ms = layer_floor(x, wg, m, ceiling, copy_tbps)
            for impl in impls:
                note = ""
                extra = {}
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                ms = float("nan")
                peak = float("nan")
                with torch.no_grad():
                    try:
                        if impl == "dense":
                            fn = lambda: layer_dense(x, wg, w13, w2, k, args.capacity_factor)
                        elif impl == "loop":
                            fn = lambda: layer_loop(x, wg, w13, w2, k)
                        elif impl == "sort":
                            fn = lambda: layer_sort(x, wg, w13, w2, k)
                        elif impl == "switchyard":
                            fn = None
                        elif impl == "vllm":
                            fn, note = vllm_layer_fn(x, wg, w13, w2, k, router_fn=router)
                        else:
                            raise ValueError(f"unknown impl {impl}")
                        if fn is not None:
                            ms = time_cuda(fn, args.warmup, args.iters)
                            peak = (torch.cuda.max_memory_allocated() - base) / 1e9
                        else:
                            r = run_switchyard_layer_bench(args.switchyard_cli, m, t, ceiling, copy_tbps,
                                                           args.warmup, args.iters)
                            if r is None:
                                note = "switchyard CLI not present or failed"
                            else:
                                ms = float(r.get("sparse_ms", float("nan")))
                                peak = float(r.get("workspace_bytes", float("nan"))) / 1e9
                                st = r.get("stages_ms", {})
                                note = (f"graph {r.get('graph_ms', float('nan')):.3f} ms; stages " +
                                        " ".join(f"{n} {v:.3f}" for n, v in st.items() if n != "sum"))
                                if args.check and t == min(tokens) and m != "deepseek":
                                    err = check_switchyard_output(args.switchyard_cli, x, wg, w13, w2, k)
                                    note += f"; output vs sort path: rel L2 {err:.2e}" if err is not None else \
                                        "; output check failed to run"
                                extra = dict(graph_ms=r.get("graph_ms"), stages_ms=st,
                                             experts_hit=r.get("experts_hit"), floor_ms_cli=r.get("floor_ms"))
                    except PeerUnavailable as err:
                        note = f"vllm peer not run: {err}"
                    except torch.cuda.OutOfMemoryError:
                        cap = max(1, math.ceil(args.capacity_factor * t * k / e))
                        need = t * e * cap * h * 2
                        note = f"OOM: the [T,E,C,H] combine alone needs {need / 1e9:.1f} GB"
                        torch.cuda.empty_cache()
                tfl = flops / (ms * 1e-3) / 1e12 if ms == ms else float("nan")
                print(f"{m:<9}{t:>6} {impl:<14}{ms:>10.3f}{tfl:>9.1f}{100 * floor_ms / ms:>7.1f}%{peak:>14.3f}  "
                      f"{note}", flush=True)
                results.append(dict(model=m, tokens=t, impl=impl, ms=ms, tflops=tfl, floor_ms=floor_ms,
                                    peak_extra_gb=peak, note=note, **extra))
            del x
        del wg, w13, w2
        torch.cuda.empty_cache()
    return dict(mode="layers", device=torch.cuda.get_device_name(), ceiling_tflops=ceiling, copy_tbps=copy_tbps,
                rows=results)


# ---------------------------------------------------------------------------------------------------------------
# Prefill mode (--prefill; issue 11): the forward as a user runs it, alternated with the peers
# ---------------------------------------------------------------------------------------------------------------
def bench_layer(sy_torch, model, train):
    """The benchmark's layer weights for a model: a switchyard.torch.MoE (bf16, softmax top-k without
    renormalisation, SwiGLU, return_stats=False; train() or eval()) and its (gate, w13, w2) parameters, or, without
    the binding, plain tensors of the same initialisation (requires_grad when train). Returns (moe or None, params)."""
    h, f, e, k = MODELS[model]
    if sy_torch is not None:
        cfg = sy_torch.MoEConfig(hidden_size=h, ffn_size=f, num_experts=e, top_k=k, score_function="softmax",
                                 renormalize=False, activation="swiglu")
        moe = sy_torch.MoE(cfg, dtype=torch.bfloat16, device="cuda", return_stats=False).train(train)
        return moe, [moe.gate, moe.w13, moe.w2]
    params = [torch.empty(e, h, device="cuda", dtype=torch.bfloat16).normal_(0, 1 / math.sqrt(h)),
              torch.empty(e, 2 * f, h, device="cuda", dtype=torch.bfloat16).normal_(0, 1 / math.sqrt(h)),
              torch.empty(e, h, f, device="cuda", dtype=torch.bfloat16).normal_(0, 1 / math.sqrt(f))]
    for p_ in params:
        p_.requires_grad_(train)
    return None, params


def gated_twin(sy_torch, moe):
    """An eval-mode switchyard.torch.MoE sharing moe's router and w2 with an interleaved copy of its w13
    (interleave_gate_up_), built on the meta device first so that no second set of random weights is allocated."""
    twin = sy_torch.MoE(moe.config, dtype=moe.w13.dtype, device="meta", return_stats=False).eval()
    twin.gate, twin.w2 = moe.gate, moe.w2
    twin.w13 = torch.nn.Parameter(moe.w13.detach().clone(), requires_grad=False)
    twin.interleave_gate_up_()
    return twin


def gated_train_twin(sy_torch, moe):
    """A training switchyard.torch.MoE on moe's own parameter tensors (router, w13, w2) with its gate_up_interleaved
    flag set without permuting w13: it runs the interleaved layout's training path (switchyard::gathered_gated_keep:
    g and h from one GEMM1 kernel) on the same tensors, bytes and FLOPs as moe, but reads w13's rows as interleaved, so
    its y is another function of the weights and is not compared here (tests/python/test_torch_gated.py checks the
    op against the staged ops bit for bit). No second copy of the weights or their gradients."""
    twin = sy_torch.MoE(moe.config, dtype=moe.w13.dtype, device="meta", return_stats=moe.return_stats)
    twin.gate, twin.w13, twin.w2 = moe.gate, moe.w13, moe.w2
    twin.gate_up_interleaved = True
    return twin


def prefill_mode(args):
    """Forward of whole layers at prefill sizes (tokens default 4096,16384), eval mode under no_grad:

    switchyard : switchyard.torch.MoE (--torch-lib; bf16, softmax top-k without renormalisation, SwiGLU), the staged
                 torch ops a user gets for T > 64;
    sy-gated   : the same module after interleave_gate_up_() (GEMM1 with SwiGLU in its epilogue), as a twin sharing
                 the router and w2 with its own interleaved copy of w13 (so that every column reads one set of
                 weights in alternation); its y is compared with switchyard's (the same values expected);
    sort       : layer_sort (torch._grouped_mm), its router rounding the logits to bf16 as models do;
    vllm       : vLLM's Triton fused_moe_kernel with vLLM's config for T (bench/vllm_peer.py; .deps/vllm carried), or
                 with --vllm-best-of N the fastest of vLLM's own config and N launch configs of its tuning space,
                 each timed on the layer first (issue 11's "given its best launch config").
    All three use the module's weight tensors. Timed in alternation (time_interleaved) after each was run once
    alone for its peak extra memory (max_memory_allocated beyond x and the weights). Floor as the layer mode:
    max(FLOPs incl. the router / bf16 ceiling, (weights of the experts hit + x + y) / copy bandwidth), ceilings
    measured here. Check: Switchyard's y against the sort path with Switchyard's selection (softmax of fp32 logits),
    relative L2 over all rows, flagged above 1e-2."""
    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    impls = [i for i in args.impls.split(",") if i in ("switchyard", "sy-gated", "sort", "vllm")]
    sy_torch, sy_why = load_switchyard_torch(args.torch_lib)
    if sy_torch is None:
        print(f"switchyard: {sy_why}")
    ceiling, copy_tbps = start_table(
        "  (prefill forward, alternated)",
        f"{'model':<9}{'T':>6} {'floor ms':>9} " + "".join(f"{i + ' ms':>14}{'%floor':>8}" for i in impls) +
        f" {'sy/sort':>8} {'sy/vllm':>8}  peak extra GB / check")
    results = []
    torch.manual_seed(args.seed)
    for m in models:
        h, f, e, k = MODELS[m]
        moe, params = bench_layer(sy_torch, m, train=False)
        wg, w13, w2 = (p_.detach() for p_ in params)
        # Built before any peak is measured (its w13 copy is weights, not the forward's extra memory).
        gated = gated_twin(sy_torch, moe) if moe is not None and "sy-gated" in impls else None
        for t in tokens:
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            hit, flops, floor_ms = layer_floor(x, wg, m, ceiling, copy_tbps)
            fns, notes, peaks = {}, {}, {}
            with torch.no_grad():
                for impl in impls:
                    # The previous closure may hold the previous model's weights: drop it before the baseline (else
                    # they are freed during the measurement and the peak reads as 0).
                    fn = None
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    try:
                        if impl == "switchyard":
                            if moe is None:
                                notes[impl] = sy_why
                                continue
                            fn = lambda: moe(x)
                        elif impl == "sy-gated":
                            if moe is None:
                                notes[impl] = sy_why
                                continue
                            fn = lambda: gated(x)
                        elif impl == "sort":
                            fn = lambda: layer_sort(x, wg, w13, w2, k)
                        else:
                            fn, notes[impl] = vllm_layer_fn(
                                x, wg, w13, w2, k, router_fn=router, best_of=args.vllm_best_of,
                                time_fn=lambda f: time_cuda(f, warmup=2, iters=5))
                        for _ in range(2):
                            fn()
                        torch.cuda.synchronize()
                        peaks[impl] = (torch.cuda.max_memory_allocated() - base) / 1e9
                        fns[impl] = fn
                    except PeerUnavailable as err:
                        notes[impl] = f"not run: {err}"
                    except torch.cuda.OutOfMemoryError:
                        notes[impl] = "OOM"
                        torch.cuda.empty_cache()
                if "switchyard" in fns and "sort" in fns:
                    wg32 = wg.float()
                    fp32_router = lambda xx, _wg, kk: router_fp32(xx, wg32, kk)
                    want = layer_sort(x, wg, w13, w2, k, router_fn=fp32_router).float()
                    got = moe(x).float()
                    rel = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
                    notes["switchyard"] = f"y vs sort (same selection): rel L2 {rel:.1e}" + \
                        ("" if rel < 1e-2 else " (WRONG)")
                    del want, got, wg32
                if "switchyard" in fns and "sy-gated" in fns:
                    same = torch.equal(moe(x), gated(x))
                    notes["sy-gated"] = "y equal to switchyard's bitwise" if same else "y differs from switchyard's"
                names = list(fns)
                times = dict(zip(names, time_interleaved([fns[n] for n in names], args.warmup, args.iters)))
            row = dict(model=m, tokens=t, floor_ms=floor_ms, experts_hit=hit,
                       ms={i: times.get(i) for i in impls}, peak_extra_gb={i: peaks.get(i) for i in impls},
                       notes=notes)
            results.append(row)
            cells = "".join(f"{_fmt_ms(times.get(i), 14)}{_fmt_pct(100 * floor_ms / times[i] if i in times else None, 8)}"
                            for i in impls)
            sy = times.get("switchyard")
            ratio = lambda o: sy / times[o] if sy and o in times else None
            extra = " ".join(f"{i} {peaks[i]:.2f}" for i in impls if i in peaks)
            print(f"{m:<9}{t:>6} {floor_ms:>9.3f} {cells} {_fmt_x(ratio('sort'), 8)} {_fmt_x(ratio('vllm'), 8)}  "
                  f"{extra}; " + "; ".join(f"{i}: {n}" for i, n in notes.items()), flush=True)
            del x, fns
            torch.cuda.empty_cache()
        del wg, w13, w2, moe, params, gated
        torch.cuda.empty_cache()
    return dict(mode="prefill", device=torch.cuda.get_device_name(), ceiling_tflops=ceiling, copy_tbps=copy_tbps,
                rows=results)


# ---------------------------------------------------------------------------------------------------------------
# Layer training mode (--layers --train): forward + backward of the whole layer
# ---------------------------------------------------------------------------------------------------------------
def load_switchyard_torch(lib):
    """Imports switchyard.torch (python/ of this checkout on sys.path, SWITCHYARD_TORCH_LIB from --torch-lib when
    given). Returns (module, None) or (None, why)."""
    if lib:
        if not os.path.isfile(lib):
            return None, f"torch binding not found at --torch-lib {lib}"
        os.environ["SWITCHYARD_TORCH_LIB"] = os.path.abspath(lib)
    py_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
    if py_dir not in sys.path:
        sys.path.insert(0, py_dir)
    try:
        import switchyard.torch as sy_torch
        return sy_torch, None
    except (ImportError, OSError, RuntimeError) as err:  # FileNotFoundError is an OSError
        return None, f"switchyard.torch not loadable: {str(err)[:300]}"


def layer_train_mode(args):
    """Forward + backward of the whole layer, loss = y.float().square().mean(), gradients for x and every weight;
    rows "<impl> dy": the same step with an upstream gradient (y.backward(dy), dy fixed random) instead of the loss,
    i.e. the layer's own work, without the loss's element-wise kernels and their backward (which the floor does not
    count); their peak-memory column repeats the loss step's (not measured separately).

    switchyard : switchyard.torch.MoE (bf16, softmax top-k without renormalisation, SwiGLU; return_stats=False so
                 no aux loss, like the peer), CUDA kernels forward and backward;
    sy-gather  : (only when named in --impls) the same module with gather_in_gemm1 on (GEMM1 reads x's rows through
                 the plan; no gathered copy in the forward);
    sy-gated   : (only when named in --impls) the interleaved layout's training path (gated_train_twin: GEMM1 stores
                 its product and h in one kernel, no activation pass in the forward) on the same tensors; its y
                 and gradients are not compared with sort's (w13's rows read as interleaved);
    sort       : layer_sort above, autograd through torch._grouped_mm, on the SAME parameter tensors.
    Each timed call is one fresh step: gradients set to None, forward, backward (the new gradients are allocated
    inside the step, as in training with zero_grad(set_to_none=True)). The implementations are timed in alternation
    (time_interleaved). Peak extra memory = max_memory_allocated over two steps of one implementation alone, minus
    what was allocated before them (parameters and x, no gradients), so it includes
    the parameter gradients themselves (size in the note). Floor = 3 x the forward floor (DESIGN.md: forward,
    input-gradient and weight-gradient GEMMs each cost the forward's FLOPs; the weights are read twice and their
    gradients written once, 3x the forward's weight bytes).
    """
    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    impls = ([i for i in args.impls.split(",") if i in ("sort", "switchyard", "sy-gather", "sy-gated")]
             or ["sort", "switchyard"])
    sy_torch, sy_why = (load_switchyard_torch(args.torch_lib) if {"switchyard", "sy-gather", "sy-gated"} & set(impls)
                        else (None, None))
    ceiling, copy_tbps = start_table(
        "  (training: forward + backward)",
        f"{'model':<9}{'T':>6} {'impl':<14}{'ms':>10}{'TFLOP/s':>9}{'%floor':>8}{'peak extra GB':>14}  note")
    results = []
    torch.manual_seed(args.seed)
    for m in models:
        h, f, e, k = MODELS[m]
        moe, params = bench_layer(sy_torch, m, train=True)
        wg, w13, w2 = params
        twin = gated_train_twin(sy_torch, moe) if moe is not None and "sy-gated" in impls else None
        grad_gb = sum(p_.numel() * p_.element_size() for p_ in params) / 1e9
        for t in tokens:
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
            dy = torch.randn_like(x)
            hit, fwd_flops, fwd_floor_ms = layer_floor(x, wg, m, ceiling, copy_tbps)
            floor_ms = 3 * fwd_floor_ms
            check, steps, rows = {}, {}, {}
            for impl in impls:  # peak memory (and the --check tensors) per implementation, alone
                note, peak = f"param grads {grad_gb:.2f} GB", float("nan")
                if impl != "sort" and moe is None:
                    note = sy_why
                else:
                    def fwd_gather():
                        moe.gather_in_gemm1 = True
                        try:
                            return moe(x)
                        finally:
                            moe.gather_in_gemm1 = None  # the default (automatic; in training the separate gather)

                    fwd = {"sort": lambda: layer_sort(x, wg, w13, w2, k), "switchyard": lambda: moe(x),
                           "sy-gather": fwd_gather, "sy-gated": lambda: twin(x)}[impl]

                    def step(fwd=fwd):
                        for p_ in (x, *params):
                            p_.grad = None
                        y = fwd()
                        y.float().square().mean().backward()
                        return y

                    def step_dy(fwd=fwd):  # the layer's own work: an upstream gradient, no loss kernels
                        for p_ in (x, *params):
                            p_.grad = None
                        fwd().backward(dy)

                    torch.cuda.synchronize()
                    for p_ in (x, *params):
                        p_.grad = None
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    try:
                        for _ in range(2):
                            step()
                        torch.cuda.synchronize()
                        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
                        # dw2 of the first 8 experts only (memory); sy-gated computes another function
                        if args.check and t == min(tokens) and impl != "sy-gated":
                            y = step().detach().float()
                            check[impl] = (y, x.grad.float(), wg.grad.float(), w2.grad[:8].float())
                        steps[impl] = step
                        steps[impl + " dy"] = step_dy
                    except torch.cuda.OutOfMemoryError as err:
                        note = f"OOM: {str(err).splitlines()[0][:160]}"
                    except RuntimeError as err:  # e.g. a backward op not implemented for this shape
                        note = f"failed: {str(err).splitlines()[0][:200]}"
                    for p_ in (x, *params):
                        p_.grad = None
                    torch.cuda.empty_cache()
                rows[impl] = dict(note=note, peak=peak, ms=float("nan"))
                rows[impl + " dy"] = dict(note=note, peak=peak, ms=float("nan"))
            if steps:  # time the implementations that ran, in alternation
                # The caching allocator's retries (a failed cudaMalloc, then every cached block released, which
                # synchronises the device): near the card's memory the alternation of implementations with
                # different allocations can cause them, and they would show as host time in the steps.
                retries0 = torch.cuda.memory_stats().get("num_alloc_retries", 0)
                try:
                    for impl, ms in zip(steps, time_interleaved(list(steps.values()), args.warmup, args.iters)):
                        rows[impl]["ms"] = ms
                except (torch.cuda.OutOfMemoryError, RuntimeError) as err:  # the run goes on; the rows say why
                    for impl in steps:
                        rows[impl]["note"] = f"timing failed: {str(err).splitlines()[0][:160]}"
                retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries0
                if retries:
                    for impl in steps:
                        rows[impl]["note"] += f"; allocator retries while timing (all impls): {retries}"
                for p_ in (x, *params):
                    p_.grad = None
                torch.cuda.empty_cache()
            for impl in rows:
                ms, peak, note = rows[impl]["ms"], rows[impl]["peak"], rows[impl]["note"]
                tfl = 3 * fwd_flops / (ms * 1e-3) / 1e12 if ms == ms else float("nan")
                print(f"{m:<9}{t:>6} {impl:<14}{ms:>10.3f}{tfl:>9.1f}{100 * floor_ms / ms:>7.1f}%{peak:>14.3f}  "
                      f"{note}", flush=True)
                results.append(dict(model=m, tokens=t, impl=impl, ms=ms, tflops=tfl, floor_ms=floor_ms,
                                    peak_extra_gb=peak, param_grad_gb=grad_gb, note=note))
            for impl in [i for i in check if i != "sort" and "sort" in check]:
                # same weights and x; routing may differ on near-ties (bf16 vs fp32 logits)
                rel = {n: float((a - b).norm() / b.norm())
                       for n, a, b in zip(("y", "dx", "dgate", "dw2[:8]"), check[impl], check["sort"])}
                print(f"{m:<9}{t:>6} check      {impl} vs sort, rel L2: "
                      + " ".join(f"{n} {v:.2e}" for n, v in rel.items()), flush=True)
                next(r for r in reversed(results) if r["impl"] == impl)["check_rel_l2"] = rel
            del x, dy, check
        del moe, twin, params, wg, w13, w2
        torch.cuda.empty_cache()
    return dict(mode="layers-train", device=torch.cuda.get_device_name(), ceiling_tflops=ceiling,
                copy_tbps=copy_tbps, rows=results)


# ---------------------------------------------------------------------------------------------------------------
# Training GEMM mode (--train-gemms)
# ---------------------------------------------------------------------------------------------------------------
def train_gemm_mode(args):
    """Forward, dgrad and wgrad of both expert GEMMs: Switchyard's ops beside torch._grouped_mm, one run."""
    sy_torch, why = load_switchyard_torch(args.torch_lib)
    if sy_torch is None:
        print(f"compare_torch.py --train-gemms: {why}", file=sys.stderr)
        return dict(mode="train-gemms", error=why)
    ops = torch.ops.switchyard
    ceiling, copy_tbps = measure_ceilings()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  (training GEMMs, bf16)")
    print(f"ceilings (measured here): bf16 {ceiling:.0f} TFLOP/s, copy {copy_tbps:.2f} TB/s")
    hdr = (f"{'model':<9}{'T':>6} {'gemm':<6}{'pass':<6}{'rows':>8}{'N':>7}{'K':>7}{'floor ms':>10}"
           f"{'switchyard':>11}{'%floor':>7}{'torch':>9}{'%floor':>7}{'sy/torch':>9}")
    print(hdr)
    print("-" * len(hdr))
    gen = torch.Generator().manual_seed(args.seed)
    results = []
    for m in args.models.split(","):
        h, f, e, k = MODELS[m]
        for t in [int(x) for x in args.tokens.split(",")]:
            counts = route_counts(e, k, t, gen)
            rows = sum(counts)
            ends = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).cuda()
            offs = torch.cat([torch.zeros(1, dtype=torch.int32, device="cuda"), ends])
            hit = sum(1 for c in counts if c > 0)
            for gname, n, kk in (("up", 2 * f, h), ("down", h, f)):
                a = torch.randn(rows, kk, device="cuda", dtype=torch.bfloat16)
                b = torch.randn(e, n, kk, device="cuda", dtype=torch.bfloat16) * kk ** -0.5
                dc = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
                flops = 2.0 * rows * n * kk
                w_bytes, a_bytes, c_bytes = hit * n * kk * 2, rows * kk * 2, rows * n * 2
                passes = (("fwd", w_bytes + a_bytes + c_bytes, lambda: ops.grouped_mm(a, b, offs),
                           lambda: torch._grouped_mm(a, b.transpose(-2, -1), offs=ends)),
                          ("dgrad", w_bytes + c_bytes + a_bytes, lambda: ops.grouped_mm_dgrad(dc, b, offs),
                           lambda: torch._grouped_mm(dc, b, offs=ends)),
                          ("wgrad", e * n * kk * 2 + a_bytes + c_bytes, lambda: ops.grouped_mm_wgrad(dc, a, offs),
                           lambda: torch._grouped_mm(dc.t(), a, offs=ends)))
                for pname, nbytes, f_sy, f_torch in passes:
                    floor_ms = max(flops / (ceiling * 1e12), nbytes / (copy_tbps * 1e12)) * 1e3
                    ms_sy, ms_t = time_interleaved([f_sy, f_torch], args.warmup, args.iters)
                    print(f"{m:<9}{t:>6} {gname:<6}{pname:<6}{rows:>8}{n:>7}{kk:>7}{floor_ms:>10.3f}{ms_sy:>11.3f}"
                          f"{100 * floor_ms / ms_sy:>6.1f}%{ms_t:>9.3f}{100 * floor_ms / ms_t:>6.1f}%"
                          f"{ms_sy / ms_t:>9.3f}", flush=True)
                    results.append(dict(model=m, tokens=t, gemm=gname, **{"pass": pname}, rows=rows, n=n, k=kk,
                                        floor_ms=floor_ms, switchyard_ms=ms_sy, torch_ms=ms_t))
                del a, b, dc
                torch.cuda.empty_cache()
    return dict(mode="train-gemms", device=torch.cuda.get_device_name(), ceiling_tflops=ceiling,
                copy_tbps=copy_tbps, rows=results)


# ---------------------------------------------------------------------------------------------------------------
# Decode mode (--decode): small batches, eager and CUDA-graph replay (issue 12)
# ---------------------------------------------------------------------------------------------------------------
DECODE_IMPLS = ("switchyard", "switchyard-staged", "sort", "vllm")
DECODE_ROUTING = ("softmax over fp32 logits (x.float() @ gate.float().T), top-k, no renormalisation, the same for "
                  "every impl and shape (switchyard: MoEConfig score_function=softmax, renormalize=False; "
                  "Qwen3-30B-A3B itself renormalises, DeepSeek-V3 uses grouped sigmoid routing: not run here)")


def router_fp32(x, wg32, top_k):
    """The decode mode's router: softmax top-k of fp32 logits, no renormalisation. wg32: the gate in fp32 (converted
    once, outside the timed calls). This is what switchyard.torch.MoE computes (its router GEMM accumulates the exact
    products in fp32; another summation order), so
    every implementation selects the same experts; the layer mode's router() rounds the logits to bf16 first, which
    changes the selection on near-ties."""
    logits = x.float() @ wg32.t()
    return logits.softmax(dim=-1).topk(top_k, dim=-1)


def decode_floor_us(experts_hit, tokens, hidden, ffn, copy_tbps, elem_bytes=2):
    """Bytes of the weights of the experts hit (w13 [2F, H] and w2 [H, F] each) plus x and y [T, H], over the copy
    bandwidth, in microseconds. The router's gate [E, H] is left out (small beside the experts; the floor stays a
    lower bound)."""
    nbytes = experts_hit * 3 * hidden * ffn * elem_bytes + 2 * tokens * hidden * elem_bytes
    return nbytes / (copy_tbps * 1e12) * 1e6


def rel_l2(y, ref):
    y, ref = y.float(), ref.float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def capture_graph(fn, warmup=3):
    """Warms fn up on a side stream, captures one call in a CUDA graph; returns (graph.replay, the call's static
    output). Inputs are whatever fn closes over (static buffers)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph.replay, out


def decode_crossover(rows, mode):
    """Smallest T whose switchyard-staged time (mode 'graph' or 'eager') beats switchyard's fused path, among the T
    where the fused path ran; None when it never does. rows: {T: {impl: row}}."""
    for t in sorted(rows):
        fused, staged = rows[t].get("switchyard"), rows[t].get("switchyard-staged")
        if not fused or not staged or fused.get("path") != "fused":
            continue
        a, b = fused.get(f"{mode}_us"), staged.get(f"{mode}_us")
        if a is not None and b is not None and a == a and b == b and b < a:
            return t
    return None


def _fmt_us(v, width=9):
    return f"{'-':>{width}}" if v is None or v != v else f"{v:>{width}.1f}"


def _decode_switchyard_modules(sy_torch, h, f, e, k, wg, w13, w2, device):
    """Two switchyard.torch.MoE in eval mode on the SAME weight storage as the sort path (nn.Parameter around the
    existing tensors, no copy): (fused-or-automatic module, staged module or None, note). The modules are built on
    the meta device first so that their own parameters never take memory (DeepSeek-V3's experts are 22 GB)."""
    cfg = sy_torch.MoEConfig(hidden_size=h, ffn_size=f, num_experts=e, top_k=k, score_function="softmax",
                             renormalize=False, activation="swiglu")

    def build():
        try:
            m = sy_torch.MoE(cfg, dtype=torch.bfloat16, device="meta", return_stats=False)
        except Exception:  # noqa: BLE001 - a binding that cannot build on meta: build for real, then replace
            m = sy_torch.MoE(cfg, dtype=torch.bfloat16, device=device, return_stats=False)
        m.gate = torch.nn.Parameter(wg, requires_grad=False)
        m.w13 = torch.nn.Parameter(w13, requires_grad=False)
        m.w2 = torch.nn.Parameter(w2, requires_grad=False)
        return m.eval()

    fused = build()
    if not hasattr(fused, "fused_max_tokens"):
        return fused, None, "staged only (this binding's MoE has no fused_max_tokens)"
    fused.fused_max_tokens = 64  # the fused path for every bf16 CUDA input of T <= 64 (None: the automatic rule)
    staged = build()
    staged.fused_max_tokens = 0
    return fused, staged, ""


def _decode_path(moe, x):
    """'fused' or 'staged': which path moe(x) takes (MoE._use_fused where the binding has it)."""
    if getattr(moe, "fused_max_tokens", None) == 0 or not hasattr(moe, "_use_fused"):
        return "staged"
    try:
        return "fused" if moe._use_fused(x.reshape(-1, x.shape[-1]).contiguous()) else "staged"
    except Exception as err:  # noqa: BLE001
        return f"unknown ({type(err).__name__})"


def decode_mode(args, device="cuda"):
    """Decode-sized batches (T <= 64) of whole layers, eager and CUDA-graph replay, beside the floor.

    Implementations, all on ONE copy of the weights (gate, w13 [E, 2F, H], w2 [E, H, F]), the same x and the same
    routing function (DECODE_ROUTING):
      switchyard        switchyard.torch.MoE in eval mode under no_grad, fused_max_tokens=64 (the fused
                        small-batch op for bf16 CUDA inputs of T <= 64, when the binding has it);
      switchyard-staged the same weights with fused_max_tokens=0 (the staged ops);
      sort              layer_sort (sort + torch._grouped_mm);
      vllm              vllm_peer.vllm_layer_fn (vLLM's Triton fused_moe_kernel and its tuned config for T).
    Each runs eager and as a replayed CUDA graph (one call captured on the static x after warm-up); all 2 x 4
    callables of one (shape, T) are timed in alternation (time_interleaved) with the L2 cache flushed (a 256 MB
    read) and the device synchronised before every timed call, so no call finds the weights another left in L2
    (in a model, the other layers run in between). Floor: decode_floor_us on the experts hit by x's routing.
    Check: relative L2 of each output (eager and graph) against the sort path's eager output, flagged > 2e-2."""
    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    requested = [i for i in (args.impls or "").split(",") if i in DECODE_IMPLS]
    impls = [i for i in DECODE_IMPLS if i in requested] if requested else list(DECODE_IMPLS)
    want_sy = any(i.startswith("switchyard") for i in impls)
    sy_torch, sy_why = load_switchyard_torch(args.torch_lib) if want_sy else (None, None)
    on_cuda = str(device).startswith("cuda")
    ceiling, copy_tbps = measure_ceilings()
    device_name = torch.cuda.get_device_name() if on_cuda else str(device)
    print(f"device: {device_name}  torch {torch.__version__}  (decode: eager and CUDA-graph replay)")
    print(f"ceilings (measured here): bf16 {ceiling:.0f} TFLOP/s, copy {copy_tbps:.2f} TB/s")
    print(f"routing: {DECODE_ROUTING}")
    print("timing: median of CUDA events, impls alternated, L2 flushed before every timed call; floor = bytes of "
          "the experts hit + x + y over the copy bandwidth")
    if sy_torch is None and want_sy:
        print(f"switchyard: {sy_why}")
    scrub = torch.ones((64 << 20) if on_cuda else 1024, dtype=torch.float32, device=device)  # 256 MB > L2

    def flush_l2():
        scrub.sum()

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    results, crossover = [], {}
    torch.manual_seed(args.seed)
    for m in models:
        h, f, e, k = MODELS[m]
        wg = torch.empty(e, h, device=device, dtype=torch.bfloat16).normal_(0, 1 / math.sqrt(h))
        w13 = torch.empty(e, 2 * f, h, device=device, dtype=torch.bfloat16).normal_(0, 1 / math.sqrt(h))
        w2 = torch.empty(e, h, f, device=device, dtype=torch.bfloat16).normal_(0, 1 / math.sqrt(f))
        wg32 = wg.float()

        def route(x_, _wg, top_k, wg32=wg32):
            return router_fp32(x_, wg32, top_k)

        sy_fused = sy_staged = None
        sy_note = sy_why or ""
        if sy_torch is not None:
            try:
                sy_fused, sy_staged, sy_note = _decode_switchyard_modules(sy_torch, h, f, e, k, wg, w13, w2, device)
            except Exception as err:  # noqa: BLE001 - the row says why, the run goes on
                sy_note = f"switchyard.torch.MoE not built: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        weights_gb = (wg.numel() + w13.numel() + w2.numel()) * 2 / 1e9
        print(f"\n{m}: H={h} F={f} E={e} top_k={k}, weights {weights_gb:.1f} GB (one copy, shared by every impl)")
        hdr = (f"{'T':>4}{'hit':>5}{'floor us':>10} |{'sy graph':>10}{'%floor':>8}{'sy eager':>10} |"
               f"{'staged g':>10}{'sort g':>9}{'vllm g':>9} |{'staged e':>10}{'sort e':>9}{'vllm e':>9}")
        print(hdr)
        print("-" * len(hdr))
        by_t, notes, checks = {}, [], []
        with torch.no_grad():
            for t in tokens:
                x = torch.randn(t, h, device=device, dtype=torch.bfloat16)
                _, ids = route(x, wg, k)
                hit = int(torch.unique(ids).numel())
                floor_us = decode_floor_us(hit, t, h, f, copy_tbps)
                rows = {}
                eager_fns = {}
                y_ref = fn = y = moe = None
                for impl in impls:
                    row = dict(model=m, tokens=t, impl=impl, experts_hit=hit, floor_us=floor_us, graph_us=None,
                               eager_us=None, graph_pct_floor=None, eager_pct_floor=None, rel_l2_graph=None,
                               rel_l2_eager=None, path=None, note="")
                    rows[impl] = row
                    try:
                        if impl == "sort":
                            fn = (lambda x=x: layer_sort(x, wg, w13, w2, k, router_fn=route))
                            row["path"] = "sort + torch._grouped_mm"
                        elif impl == "vllm":
                            fn, row["note"] = vllm_layer_fn(x, wg, w13, w2, k, router_fn=route)
                            row["path"] = "vllm fused_moe_kernel"
                        else:
                            moe = sy_fused if impl == "switchyard" else sy_staged
                            if moe is None:
                                row["note"] = sy_note or "switchyard not available"
                                if impl == "switchyard-staged" and sy_fused is not None:
                                    row["note"] = "not measured: " + sy_note + " (the switchyard row is staged)"
                                continue
                            row["path"] = _decode_path(moe, x)
                            if impl == "switchyard" and sy_note:
                                row["note"] = sy_note
                            fn = (lambda x=x, moe=moe: moe(x))
                        y = fn()
                        sync()
                        eager_fns[impl] = fn
                        if impl == "sort":
                            y_ref = y.float()
                        rows[impl]["_y_eager"] = y
                    except PeerUnavailable as err:
                        row["note"] = f"vllm peer not run: {err}"
                    except torch.cuda.OutOfMemoryError as err:
                        row["note"] = f"OOM: {str(err).splitlines()[0][:160]}"
                    except Exception as err:  # noqa: BLE001 - e.g. an op missing from this build of the binding
                        row["note"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                graphs, graph_outs = {}, {}
                for impl, fn in eager_fns.items():
                    try:
                        graphs[impl], graph_outs[impl] = capture_graph(fn)
                    except Exception as err:  # noqa: BLE001 - the eager row still stands
                        rows[impl]["note"] = (rows[impl]["note"] + "; " if rows[impl]["note"] else "") + \
                            f"graph capture failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
                        sync()
                timed = [(impl, "graph", g) for impl, g in graphs.items()] + \
                        [(impl, "eager", fn) for impl, fn in eager_fns.items()]
                if timed:
                    try:
                        ms = time_interleaved([fn for _, _, fn in timed], args.warmup, args.iters, before=flush_l2)
                        for (impl, mode, _), v in zip(timed, ms):
                            rows[impl][f"{mode}_us"] = v * 1e3
                            rows[impl][f"{mode}_pct_floor"] = 100 * floor_us / (v * 1e3)
                    except Exception as err:  # noqa: BLE001 - the run goes on; the rows say why
                        for impl in eager_fns:
                            rows[impl]["note"] += f"; timing failed: {str(err).splitlines()[0][:160]}"
                for impl in impls:  # outputs against the sort path's eager output
                    row = rows[impl]
                    y = row.pop("_y_eager", None)
                    if y_ref is None:
                        continue
                    if y is not None:
                        row["rel_l2_eager"] = rel_l2(y, y_ref)
                    if impl in graph_outs:
                        row["rel_l2_graph"] = rel_l2(graph_outs[impl], y_ref)
                by_t[t] = rows
                r = {i: rows.get(i, {}) for i in DECODE_IMPLS}
                sy = r["switchyard"]
                pct = sy.get("graph_pct_floor")
                print(f"{t:>4}{hit:>5}{floor_us:>10.1f} |{_fmt_us(sy.get('graph_us'), 10)}"
                      f"{('-' if pct is None else f'{pct:.1f}%'):>8}{_fmt_us(sy.get('eager_us'), 10)} |"
                      f"{_fmt_us(r['switchyard-staged'].get('graph_us'), 10)}{_fmt_us(r['sort'].get('graph_us'))}"
                      f"{_fmt_us(r['vllm'].get('graph_us'))} |{_fmt_us(r['switchyard-staged'].get('eager_us'), 10)}"
                      f"{_fmt_us(r['sort'].get('eager_us'))}{_fmt_us(r['vllm'].get('eager_us'))}", flush=True)
                parts = []
                for impl in impls:
                    a, b = rows[impl]["rel_l2_graph"], rows[impl]["rel_l2_eager"]
                    if a is None and b is None:
                        continue
                    worst = max(v for v in (a, b) if v is not None)
                    parts.append(f"{impl} {_fmt_rel(a)}/{_fmt_rel(b)}" + (" (CHECK > 2e-2)" if worst > 2e-2 else ""))
                checks.append(f"  T={t:<3} " + ("; ".join(parts) if parts else "no output compared"))
                for impl in impls:
                    row = rows[impl]
                    bits = [row["note"]] if row["note"] else []
                    if impl == "switchyard" and row["path"] not in (None, "fused"):
                        bits.insert(0, f"ran the {row['path']} path, not the fused op")
                    if bits:
                        notes.append(f"  T={t:<3} {impl}: " + "; ".join(bits))
                    results.append(row)
                # drop every reference to this T's graphs (their memory pools), closures and outputs
                graphs = graph_outs = eager_fns = timed = fn = y = moe = x = y_ref = None
                sync()
                if on_cuda:
                    torch.cuda.empty_cache()
        print("rel L2 vs the sort path (graph/eager):")
        print("\n".join(checks))
        if notes:
            print("notes:")
            print("\n".join(notes))
        xg, xe = decode_crossover(by_t, "graph"), decode_crossover(by_t, "eager")
        crossover[m] = dict(graph=xg, eager=xe)
        print("crossover (smallest T where switchyard-staged beats switchyard's fused path): "
              f"graph {'none' if xg is None else f'T={xg}'}, eager {'none' if xe is None else f'T={xe}'}")
        del sy_fused, sy_staged, wg, w13, w2, wg32
        if on_cuda:
            torch.cuda.empty_cache()
    return dict(mode="decode", device=device_name, torch=torch.__version__, ceiling_tflops=ceiling,
                copy_tbps=copy_tbps, routing=DECODE_ROUTING, l2="flushed (256 MB read) before every timed call",
                crossover=crossover, rows=results)


# ---------------------------------------------------------------------------------------------------------------
# FP8 mode (--fp8; tokens default 1,16,4096,16384; issue 13)
# ---------------------------------------------------------------------------------------------------------------
FP8_IMPLS = ("vllm-fp8", "sy-torch-fp8", "sy-torch-bf16")
FP8_MAX = 448.0


def measure_fp8_ceiling(n=8192):
    """torch._scaled_mm on n^3 e4m3 operands (uniform(-1, 1) quantised with one amax/448 scale per tensor, so the
    codes spread like real weights), bf16 out, use_fast_accum off and on; TFLOP/s of each (None where _scaled_mm
    refuses). The FP8 ceiling is the faster of the two."""
    res = {}
    a32 = torch.empty(n, n, device="cuda").uniform_(-1, 1)
    sa = (a32.abs().amax() / FP8_MAX).float()
    a = (a32 / sa).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    a32.uniform_(-1, 1)
    sb = (a32.abs().amax() / FP8_MAX).float()
    b = (a32 / sb).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # [N, K] row-major: b.t() is column-major
    del a32
    for fast in (False, True):
        try:
            ms = time_cuda(lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                                    use_fast_accum=fast), warmup=5, iters=20)
            res[f"fast_accum_{'on' if fast else 'off'}_tflops"] = 2 * n ** 3 / (ms * 1e-3) / 1e12
        except (RuntimeError, TypeError) as err:
            res[f"fast_accum_{'on' if fast else 'off'}_error"] = str(err).splitlines()[0][:200]
    del a, b
    torch.cuda.empty_cache()
    rates = [v for k_, v in res.items() if k_.endswith("_tflops")]
    return (max(rates) if rates else None), res


def quantize_fp8_block_torch(w, g=128):
    """switchyard quantize's fp8-block rule (tools/switchyard/io/quantize.cpp) on w [E, N, K] (bf16/fp32), one expert
    at a time (bounded temporaries: DeepSeek-V3's w13 is 15 GB in bf16): per 128x128 block (edge blocks partial)
    s = amax / 448 in fp32; q = e4m3(w / s) with an fp32 division, saturated to +-448 and rounded to nearest even
    (torch's conversion); an all-zero block gets s = 0 and q = 0. Returns (codes float8_e4m3fn [E, N, K], scales fp32
    [E, ceil(N/128), ceil(K/128)]): vLLM's w1_scale / w2_scale layout and switchyard's w13_scale / w2_scale."""
    e, n, k = w.shape
    bn, bk = -(-n // g), -(-k // g)
    codes = torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=w.device)
    scales = torch.empty(e, bn, bk, dtype=torch.float32, device=w.device)
    for i in range(e):
        p = F.pad(w[i].float(), (0, bk * g - k, 0, bn * g - n)).view(bn, g, bk, g)
        s = p.abs().amax(dim=(1, 3))
        s = torch.div(s, torch.full_like(s, FP8_MAX))  # a true division (CUDA's tensor / scalar multiplies)
        s4 = s[:, None, :, None]
        q = torch.where(s4 == 0, torch.zeros((), device=w.device), p / s4).clamp_(-FP8_MAX, FP8_MAX)
        codes[i] = q.to(torch.float8_e4m3fn).view(bn * g, bk * g)[:n, :k]
        scales[i] = s
        del p, s, s4, q
    return codes, scales


def fp8_floor_ms(tokens, hit, h, f, e, k, ceiling, fp8_tflops, copy_tbps):
    """The CLI's FP8 floor for the torch rows (bench.cpp, bench_quant.h): router FLOPs at the bf16 ceiling, expert
    FLOPs at the FP8 ceiling; bytes = gate (bf16) + codes and 128x128 fp32 scales of the experts hit + x + y."""
    scale_bytes = 4 * ((-(-2 * f // 128)) * (-(-h // 128)) + (-(-h // 128)) * (-(-f // 128)))
    nbytes = 2 * e * h + hit * (3 * h * f + scale_bytes) + 2 * 2 * tokens * h
    compute = 2.0 * tokens * h * e / (ceiling * 1e12) + 6.0 * tokens * k * h * f / (fp8_tflops * 1e12)
    return max(compute, nbytes / (copy_tbps * 1e12)) * 1e3


def _sy_torch_modules(sy_torch, h, f, e, k, wg, w13, w2, q13, s13, q2, s2):
    """(bf16 module, fp8-block module) of switchyard.torch on the given tensors, in eval mode, built on the meta
    device (no random weights: DeepSeek-V3's are 22 GB): the bf16 one wraps wg / w13 / w2 without a copy; the fp8 one
    takes the codes and scales through MoE.set_fp8_weight (which copies them and checks them as MoELayer does)."""
    kw = dict(hidden_size=h, ffn_size=f, num_experts=e, top_k=k, score_function="softmax", renormalize=False,
              activation="swiglu")
    bf = sy_torch.MoE(sy_torch.MoEConfig(**kw), dtype=torch.bfloat16, device="meta", return_stats=False)
    bf.fused_max_tokens = 0  # the staged ops, as the fp8 module (quantised modules never take the fused op)
    bf.gate = torch.nn.Parameter(wg, requires_grad=False)
    bf.w13 = torch.nn.Parameter(w13, requires_grad=False)
    bf.w2 = torch.nn.Parameter(w2, requires_grad=False)
    q = sy_torch.MoE(sy_torch.MoEConfig(**kw, quant_mode="fp8-block"), dtype=torch.bfloat16, device="meta",
                     return_stats=False)
    q.gate = torch.nn.Parameter(wg, requires_grad=False)
    q.set_fp8_weight("w13", q13, s13)
    q.set_fp8_weight("w2", q2, s2)
    return bf.eval(), q.eval()


def _rotating(fns):
    """One callable that calls fns[0], fns[1], ... in turn (inputs rotated like the CLI's)."""
    state = {"i": 0}

    def call():
        i = state["i"] % len(fns)
        state["i"] += 1
        return fns[i]()
    return call


def fp8_mode(args):
    """FP8 (W8A8, 128x128 block scales) whole layers against Switchyard's bf16 layer and vLLM's FP8 Triton kernel.

    Per shape (mixtral, qwen3, deepseek: H, F, E, k of MODELS, softmax top-k without renormalisation, SwiGLU, no
    shared expert -- the routed-expert layer vLLM's fused_moe computes) and T:
      switchyard (CLI)  `switchyard bench --quant none` and `--quant fp8-block` (one call each for all T: the CLI's
                        random bf16 weights, then for fp8 the same values quantised on the GPU and checked against the
                        host recipe), eager (inputs rotated past L2) and CUDA-graph replay, with the stage times and
                        the CLI's floor, staged (--fused-max-tokens 0); --fp8-fused also runs both with
                        --fused-max-tokens 64 (the fused path for T <= 64);
      vllm-fp8          vLLM's fused_moe_kernel with use_fp8_w8a8 and block_shape [128, 128] (bench/vllm_peer.py),
                        activations quantised per token and 128 channels as vLLM's per_token_group_quant_fp8;
      sy-torch-fp8/-bf16 switchyard.torch.MoE (--torch-lib) on the SAME codes/scales and bf16 weights as vllm-fp8,
                        timed in alternation with it (same harness: the direct comparison with vLLM).
    The torch-side weights: bf16 N(0, 1/in) quantised once by quantize_fp8_block_torch (switchyard quantize's rule),
    the same codes and scales for vLLM and switchyard.torch. Their timing: eager and graph replay of each impl, all
    alternated (time_interleaved), x rotated over as many copies as the CLI uses (2 x L2 of inputs, at most 8).
    Floors: the CLI's own (FP8 rate: --peak-tflops-fp8 = the _scaled_mm ceiling measured here); fp8_floor_ms for
    the torch rows. Check (T = --fp8-check-tokens): relative L2 of switchyard.torch fp8 against its bf16 output
    and against vllm-fp8 (same routing: softmax over fp32 logits, as switchyard.torch computes it)."""
    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    impls = [i for i in (args.impls or ",".join(FP8_IMPLS)).split(",") if i in FP8_IMPLS]
    sy_torch, sy_why = load_switchyard_torch(args.torch_lib)
    ceiling, copy_tbps = measure_ceilings()
    fp8_tflops, fp8_probe = measure_fp8_ceiling()
    device_name = torch.cuda.get_device_name()
    print(f"device: {device_name}  torch {torch.__version__}  (FP8 W8A8, 128x128 block scales)")
    print(f"ceilings (measured here): bf16 {ceiling:.0f} TFLOP/s, FP8 "
          f"{'n/a' if fp8_tflops is None else f'{fp8_tflops:.0f}'} TFLOP/s (torch._scaled_mm 8192^3 e4m3, "
          + ", ".join(f"{k_} {v:.0f}" if isinstance(v, float) else f"{k_} {v}" for k_, v in fp8_probe.items())
          + f"), copy {copy_tbps:.2f} TB/s")
    if sy_torch is None:
        print(f"switchyard.torch: {sy_why} (no sy-torch rows, no output check)")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    results, summary = [], []
    gen_seed = args.seed
    for m in models:
        h, f, e, k = MODELS[m]
        print(f"\n{m}: H={h} F={f} E={e} top_k={k}")
        # ---- Switchyard CLI: bf16 and fp8-block, every T in one call each (staged; fused too with --fp8-fused)
        cli = {}
        for quant in ("none", "fp8-block"):
            for fused in ((0, 64) if args.fp8_fused else (0,)):  # staged; the fused path wherever supported
                doc = run_switchyard_layer_bench(args.switchyard_cli, m, tokens, ceiling, copy_tbps, args.warmup,
                                                 args.iters, quant=quant, fp8_tflops=fp8_tflops,
                                                 fused_max_tokens=fused, full=True)
                cli[(quant, fused)] = doc
                if doc and quant != "none":
                    qc = doc.get("quant_check", {})
                    print(f"  CLI fp8 weights: quantised on the GPU in {qc.get('seconds', float('nan')):.1f} s; "
                          f"check vs host recipe: {'ok' if qc.get('ok') else 'FAILED ' + str(qc.get('first_mismatch'))}"
                          f"; FP8 rate {doc.get('rate_tflops_fp8', float('nan')):.0f} TFLOP/s "
                          f"({doc.get('rate_source_fp8')})")
        # ---- torch side: one bf16 weight copy, quantised once
        torch.manual_seed(gen_seed)
        wg = torch.empty(e, h, device="cuda", dtype=torch.bfloat16).normal_(0, 1 / math.sqrt(h))
        w13 = torch.empty(e, 2 * f, h, device="cuda", dtype=torch.bfloat16).normal_(0, 1 / math.sqrt(h))
        w2 = torch.empty(e, h, f, device="cuda", dtype=torch.bfloat16).normal_(0, 1 / math.sqrt(f))
        q13, s13 = quantize_fp8_block_torch(w13)
        q2, s2 = quantize_fp8_block_torch(w2)
        wg32 = wg.float()

        def route(x_, _wg, top_k, wg32=wg32):
            return router_fp32(x_, wg32, top_k)

        sy_bf = sy_fp8 = None
        sy_note = sy_why or ""
        quant_same = None
        if sy_torch is not None:
            try:
                c0, s0 = sy_torch.quantize_fp8(w13[:1], "fp8-block")
                quant_same = bool(torch.equal(c0.view(torch.uint8), q13[:1].view(torch.uint8)) and torch.equal(s0, s13[:1]))
                del c0, s0
                sy_bf, sy_fp8 = _sy_torch_modules(sy_torch, h, f, e, k, wg, w13, w2, q13, s13, q2, s2)
                # the fp8 module holds its own copy of the codes: let vLLM read the same buffers, free ours
                q13, s13, q2, s2 = sy_fp8.w13, sy_fp8.w13_scale, sy_fp8.w2, sy_fp8.w2_scale
                torch.cuda.empty_cache()
            except Exception as err:  # noqa: BLE001 - the rows say why
                sy_note = f"switchyard.torch modules not built: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                sy_bf = sy_fp8 = None
        print(f"  torch weights: bf16 {(w13.numel() + w2.numel()) * 2 / 1e9:.1f} GB, fp8 "
              f"{(q13.numel() + q2.numel()) / 1e9:.1f} GB; quantiser == switchyard.torch.quantize_fp8 (expert 0): "
              f"{'n/a' if quant_same is None else quant_same}" + (f"; {sy_note}" if sy_note else ""))
        hdr = (f"{'T':>6} |{'sy bf16 e':>10}{'g':>8} |{'sy fp8 e':>9}{'g':>8} |{'x e':>6}{'x g':>6} |{'%fp8fl':>7} |"
               f"{'vllm8 e':>9}{'g':>8} |{'sy8/vllm8 g':>12} |{'syT8 g':>8}{'syT16 g':>8}")
        print(hdr)
        print("-" * len(hdr))
        with torch.no_grad():
            # ---- output check on the same weights (one T)
            check = {}
            tc = args.fp8_check_tokens
            if tc > 0:
                xc = torch.randn(tc, h, device="cuda", dtype=torch.bfloat16)
                try:
                    y_v = vllm_peer_fp8_output(xc, wg, q13, s13, q2, s2, k, route)
                except PeerUnavailable as err:
                    y_v, check["vllm_note"] = None, str(err)
                y_ref = layer_sort(xc, wg, w13, w2, k, router_fn=route)
                if sy_fp8 is not None:
                    y_8, y_16 = sy_fp8(xc), sy_bf(xc)
                    check["sy_fp8_vs_sy_bf16"] = rel_l2(y_8, y_16)
                    check["sy_bf16_vs_sort_bf16"] = rel_l2(y_16, y_ref)
                    if y_v is not None:
                        check["sy_fp8_vs_vllm_fp8"] = rel_l2(y_8, y_v)
                if y_v is not None:
                    check["vllm_fp8_vs_sort_bf16"] = rel_l2(y_v, y_ref)
                check["tokens"] = tc
                # Two W8A8 implementations differ where the SwiGLU output is rounded before its quantisation (one
                # bf16 ulp moves an e4m3 code now and then): flag only a difference that is not small against the
                # quantisation error itself.
                a_, b_ = check.get("sy_fp8_vs_vllm_fp8"), check.get("vllm_fp8_vs_sort_bf16")
                if a_ is not None and b_ is not None:
                    check["flag"] = bool(a_ > 0.5 * b_)
                del xc, y_ref
            for t in tokens:
                row = dict(model=m, tokens=t)
                for (quant, fused), doc in cli.items():
                    run = next((r for r in (doc or {}).get("runs", []) if r.get("tokens") == t), None)
                    tag = ("fp8" if quant != "none" else "bf16") + ("_fused" if fused else "")
                    if run is None:
                        continue
                    row[f"sy_{tag}_eager_ms"] = run.get("sparse_ms")
                    row[f"sy_{tag}_graph_ms"] = run.get("graph_ms")
                    row[f"sy_{tag}_floor_ms"] = run.get("floor_ms")
                    row[f"sy_{tag}_path"] = run.get("path")
                    row[f"sy_{tag}_stages_ms"] = run.get("stages_ms")
                    row[f"sy_{tag}_experts_hit"] = run.get("experts_hit")
                for mode_ in ("eager", "graph"):
                    for sfx in ("", "_fused"):
                        a, b = row.get(f"sy_bf16{sfx}_{mode_}_ms"), row.get(f"sy_fp8{sfx}_{mode_}_ms")
                        if a and b:
                            row[f"speedup{sfx}_{mode_}"] = a / b
                    fl, b = row.get(f"sy_fp8_floor_ms"), row.get(f"sy_fp8_{mode_}_ms")
                    if fl and b:
                        row[f"sy_fp8_{mode_}_pct_fp8_floor"] = 100 * fl / b
                # ---- torch-side impls, alternated
                x_bytes = t * h * 2
                copies = max(1, min(8, math.ceil(2 * l2 / max(x_bytes, 1))))
                xs = [torch.randn(t, h, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
                _, ids = route(xs[0], wg, k)
                hit = int(torch.unique(ids).numel())
                row["torch_floor_fp8_ms"] = fp8_floor_ms(t, hit, h, f, e, k, ceiling, fp8_tflops or 2 * ceiling,
                                                         copy_tbps)
                row["torch_input_copies"] = copies
                fns, notes = {}, []
                for impl in impls:
                    try:
                        if impl == "vllm-fp8":
                            per = []
                            for i, xi in enumerate(xs):
                                fn, note = vllm_fp8_layer_fn(xi, wg, q13, s13, q2, s2, k, router_fn=route,
                                                             check_tokens=64 if i == 0 else 0)
                                per.append(fn)
                                if i == 0:
                                    row["vllm_fp8_note"] = note
                        elif impl == "sy-torch-fp8" and sy_fp8 is not None:
                            per = [(lambda xi=xi: sy_fp8(xi)) for xi in xs]
                        elif impl == "sy-torch-bf16" and sy_bf is not None:
                            per = [(lambda xi=xi: sy_bf(xi)) for xi in xs]
                        else:
                            continue
                        for fn in per:
                            fn()
                        torch.cuda.synchronize()
                        fns[impl] = per
                    except PeerUnavailable as err:
                        notes.append(f"{impl} not run: {err}")
                    except Exception as err:  # noqa: BLE001 - e.g. OOM or an op missing from the binding
                        notes.append(f"{impl} failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                        torch.cuda.empty_cache()
                timed = []
                for impl, per in fns.items():
                    timed.append((impl, "eager", _rotating(per)))
                    try:
                        graphs = [capture_graph(fn)[0] for fn in per]
                        timed.append((impl, "graph", _rotating(graphs)))
                    except Exception as err:  # noqa: BLE001 - the eager row still stands
                        notes.append(f"{impl} graph capture failed: {type(err).__name__}: "
                                     f"{str(err).splitlines()[0][:160]}")
                        torch.cuda.synchronize()
                if timed:
                    try:
                        ms = time_interleaved([fn for _, _, fn in timed], args.warmup, args.iters)
                        for (impl, mode_, _), v in zip(timed, ms):
                            key = impl.replace("-", "_")
                            row[f"{key}_{mode_}_ms"] = v
                            if "fp8" in impl:
                                row[f"{key}_{mode_}_pct_fp8_floor"] = 100 * row["torch_floor_fp8_ms"] / v
                    except Exception as err:  # noqa: BLE001
                        notes.append(f"timing failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                for mode_ in ("eager", "graph"):
                    a, b = row.get(f"sy_fp8_{mode_}_ms"), row.get(f"vllm_fp8_{mode_}_ms")
                    if a and b:
                        row[f"sy_fp8_cli_over_vllm_{mode_}"] = a / b
                    a = row.get(f"sy_torch_fp8_{mode_}_ms")
                    if a and b:
                        row[f"sy_torch_fp8_over_vllm_{mode_}"] = a / b
                row["notes"] = notes
                if t == tokens[0]:
                    row["check"] = check
                results.append(row)
                g = row.get
                print(f"{t:>6} |{_fmt_ms(g('sy_bf16_eager_ms'), 10)}{_fmt_ms(g('sy_bf16_graph_ms'), 8)} |"
                      f"{_fmt_ms(g('sy_fp8_eager_ms'), 9)}{_fmt_ms(g('sy_fp8_graph_ms'), 8)} |"
                      f"{_fmt_x(g('speedup_eager'), 6)}{_fmt_x(g('speedup_graph'), 6)} |"
                      f"{_fmt_pct(g('sy_fp8_graph_pct_fp8_floor'), 7)} |"
                      f"{_fmt_ms(g('vllm_fp8_eager_ms'), 9)}{_fmt_ms(g('vllm_fp8_graph_ms'), 8)} |"
                      f"{_fmt_x(g('sy_fp8_cli_over_vllm_graph'), 12)} |"
                      f"{_fmt_ms(g('sy_torch_fp8_graph_ms'), 8)}{_fmt_ms(g('sy_torch_bf16_graph_ms'), 8)}", flush=True)
                if args.fp8_fused and g("speedup_fused_graph"):
                    print(f"{'':>6}   fused (T <= 64): bf16 {_fmt_ms(g('sy_bf16_fused_graph_ms'), 0)} ms, fp8 "
                          f"{_fmt_ms(g('sy_fp8_fused_graph_ms'), 0)} ms graph, x{g('speedup_fused_graph'):.2f}")
                for n_ in notes:
                    print(f"{'':>6}   {n_}")
                xs = fns = timed = per = None
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            if check:
                print("  check (T=%d, same weights, same routing): " % check.get("tokens", 0) + ", ".join(
                    f"{k_} {v:.2e}" for k_, v in check.items() if isinstance(v, float))
                    + (" (CHECK: the two fp8 layers differ by more than half of fp8's own error)"
                       if check.get("flag") else "")
                    + (f"; {check['vllm_note']}" if "vllm_note" in check else ""))
            vn = next((r.get("vllm_fp8_note") for r in results if r["model"] == m and r.get("vllm_fp8_note")), None)
            if vn:
                print(f"  vllm-fp8 (T={tokens[0]}): {vn}")
        summary.append(dict(model=m, quantiser_matches_switchyard_torch=quant_same, torch_note=sy_note))
        del sy_bf, sy_fp8, wg, w13, w2, q13, s13, q2, s2, wg32
        torch.cuda.empty_cache()
    print("\ncolumns: sy = switchyard CLI bench (bf16 / --quant fp8-block), e = eager, g = CUDA-graph replay; x = bf16 "
          "ms / fp8 ms; %fp8fl = the CLI's FP8 floor / fp8 graph ms; vllm8 = vLLM fused_moe fp8 block (Triton); "
          "sy8/vllm8 = CLI fp8 graph ms / vllm fp8 graph ms (< 1: Switchyard faster); syT8 / syT16 = switchyard.torch "
          "fp8 / bf16 on vLLM's weights, timed in alternation with vllm8")
    return dict(mode="fp8", device=device_name, torch=torch.__version__, ceiling_tflops=ceiling,
                fp8_ceiling_tflops=fp8_tflops, fp8_ceiling_probe=fp8_probe,
                fp8_ceiling_source="torch._scaled_mm 8192^3 e4m3 per-tensor scales, bf16 out, faster of "
                                   "use_fast_accum off/on, measured in this run (passed to the CLI as "
                                   "--peak-tflops-fp8)",
                copy_tbps=copy_tbps, routing="softmax top-k, no renormalisation, SwiGLU, no shared expert",
                models=summary, rows=results)


def vllm_peer_fp8_output(x, wg, q13, s13, q2, s2, k, route):
    fn, _ = vllm_fp8_layer_fn(x, wg, q13, s13, q2, s2, k, router_fn=route, check_tokens=0)
    return fn()


def _fmt_ms(v, width=9):
    return f"{'-':>{width}}" if v is None or v != v else f"{v:>{width}.3f}"


def _fmt_x(v, width=6):
    return f"{'-':>{width}}" if v is None or v != v else f"{v:>{width - 1}.2f}x"


def _fmt_pct(v, width=7):
    return f"{'-':>{width}}" if v is None or v != v else f"{v:>{width - 1}.1f}%"


def _fmt_rel(v):
    return "-" if v is None else f"{v:.1e}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mixtral,qwen3,deepseek")
    p.add_argument("--tokens", default=None,
                   help="default 16,256,4096,16384; with --train or --train-gemms 4096,16384; with --decode "
                        "1,2,4,8,16,32,64")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--grouped-bench", default="build/bench/grouped_gemm_bench",
                   help="Switchyard grouped GEMM benchmark binary (GEMM mode)")
    p.add_argument("--gemm-json", default="", help="read Switchyard's GEMM results from this file instead")
    p.add_argument("--layers", action="store_true", help="time whole-layer PyTorch peers instead of the GEMMs")
    p.add_argument("--impls", default=None,
                   help="layer mode: which implementations (default dense,loop,sort,switchyard); --decode: a subset "
                        "of " + ",".join(DECODE_IMPLS) + " (default all)")
    p.add_argument("--vllm-best-of", type=int, default=0,
                   help="--prefill: time vLLM's own config and this many launch configs of its tuning space "
                        "(bench/vllm_peer.py BEST_OF_CANDIDATES, at most 10) and use the fastest (default 0: vLLM's own)")
    p.add_argument("--capacity-factor", type=float, default=1.25, help="dense baseline capacity factor")
    p.add_argument("--switchyard-cli", default="build/switchyard", help="layer mode: Switchyard CLI")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--check", action="store_true",
                   help="layer mode: also check Switchyard's output against the sort path on the same weights "
                        "(smallest T of each model; DeepSeek-V3 skipped: its weights are 22 GB)")
    p.add_argument("--train", action="store_true",
                   help="layer mode: forward + backward of the layer (sort path and switchyard.torch.MoE)")
    p.add_argument("--torch-lib",
                   default=os.environ.get("SWITCHYARD_TORCH_LIB", "build/bindings/torch/_switchyard_torch.so"),
                   help="--train, --train-gemms, --decode: the torch binding _switchyard_torch.so")
    p.add_argument("--train-gemms", action="store_true",
                   help="forward, dgrad and wgrad of the expert GEMMs: switchyard ops vs torch._grouped_mm")
    p.add_argument("--fp8", action="store_true",
                   help="FP8 W8A8 (128x128 blocks; tokens default 1,16,4096,16384): switchyard bench bf16 and "
                        "--quant fp8-block, vLLM's fp8 Triton kernel, switchyard.torch fp8/bf16, FP8 ceiling, check")
    p.add_argument("--fp8-check-tokens", type=int, default=64,
                   help="--fp8: tokens of the output check (0: none)")
    p.add_argument("--fp8-fused", action="store_true",
                   help="--fp8: also run the CLI with --fused-max-tokens 64 (the fused path for T <= 64)")
    p.add_argument("--prefill", action="store_true",
                   help="issue 11's forward table (tokens default 4096,16384): switchyard.torch.MoE, sort path, vLLM, "
                        "alternated, with floor, peak extra memory and an output check")
    p.add_argument("--decode", action="store_true",
                   help="decode-sized batches (tokens default 1,2,4,8,16,32,64): switchyard.torch.MoE fused and "
                        "staged, sort path, vLLM peer; eager and CUDA-graph replay, with the floor")
    args = p.parse_args()
    args.layers = args.layers or args.train
    if args.decode:
        args.tokens = args.tokens or "1,2,4,8,16,32,64"
    if args.fp8:
        args.tokens = args.tokens or "1,16,4096,16384"
    if args.prefill:
        args.impls = args.impls or "switchyard,sy-gated,sort,vllm"
    args.tokens = args.tokens or ("4096,16384" if args.train or args.train_gemms or args.prefill
                                  else "16,256,4096,16384")
    if not args.decode and not args.fp8:
        args.impls = args.impls or "dense,loop,sort,switchyard"
    if not torch.cuda.is_available():
        print("compare_torch.py: no CUDA device", file=sys.stderr)
        return 1
    if args.fp8:
        res = fp8_mode(args)
    elif args.decode:
        res = decode_mode(args)
    elif args.train_gemms:
        res = train_gemm_mode(args)
    elif args.prefill:
        res = prefill_mode(args)
    else:
        res = (layer_train_mode(args) if args.train else layer_mode(args)) if args.layers else gemm_mode(args)
    if args.json:
        def finite(v):  # strict JSON: a value that could not be measured (NaN) is written as null
            if isinstance(v, float) and v != v:
                return None
            if isinstance(v, dict):
                return {k: finite(x) for k, x in v.items()}
            if isinstance(v, list):
                return [finite(x) for x in v]
            return v
        with open(args.json, "w") as f:
            json.dump(finite(res), f, indent=1, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
