"""Expert-parallel benchmark (issue 15 item 5): switchyard.ep.ExpertParallelMoE over NCCL, one process per GPU.

    torchrun --nproc-per-node 4 bench/ep_bench.py                      # all shapes, T = 4096 and 16384 per GPU
    torchrun --nproc-per-node 1 bench/ep_bench.py --out bench/results/ep-w1.json   # the W = 1 baseline
    options: --shapes deepseek-v3,qwen3-30b-a3b  --tokens 4096,16384  --iters 20  --warmup 5  --backward  --out F

For every shape and T (tokens per GPU), bf16, random weights and inputs (roughly balanced routing), on each rank:
  layer       CUDA events around the layer's forward (no_grad; with --backward also forward + backward), median of
              --iters after --warmup; tokens/s = W * T / median (the whole group's tokens)
  exchange    the layer's own exchange sizes (recorded from its count exchange in one forward), replayed with
              dist.all_to_all_single on rows of H bf16 values: median time, and the achieved bandwidth
              = bytes this rank sends to other ranks / time (the slowest rank's time is what the layer waits for)
  nccl        NCCL's all_to_all_single with equal splits of the same total bytes per rank: median time, bandwidth
              by the same rule; exchange / nccl is the "% of NCCL's all-to-all" target (>= 80%, issue 15)
Rank 0 prints one line per measurement and writes the JSON (all ranks' numbers) to --out if given.
Not run yet (no GPU in the session that wrote it): py_compile only; docs/expert_parallel.md lists the runs.
"""
import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

SHAPES = {
    # DeepSeek-V3: 256 routed experts (k 8, sigmoid, 8 groups keep 4, bias, renormalise, scale 2.5), 1 shared expert
    "deepseek-v3": dict(hidden_size=7168, ffn_size=2048, num_experts=256, top_k=8, score_function="sigmoid",
                        use_score_bias=True, num_groups=8, topk_groups=4, renormalize=True, routed_scale=2.5,
                        num_shared_experts=1, shared_ffn_size=2048),
    # Qwen3-30B-A3B: 128 experts, k 8, softmax + renormalise, no shared expert
    "qwen3-30b-a3b": dict(hidden_size=2048, ffn_size=768, num_experts=128, top_k=8, renormalize=True),
}


def timed(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def bench_one(name, t, args, rank, world, dev):
    from switchyard.ep import ExpertParallelMoE
    from switchyard.torch import MoEConfig
    cfg = MoEConfig(**SHAPES[name])
    torch.manual_seed(1234)  # the same router and shared expert on every rank
    m = ExpertParallelMoE(cfg, dtype=torch.bfloat16, device=dev)
    m.eval()
    g = torch.Generator(device=dev).manual_seed(rank)
    x = torch.randn(t, cfg.hidden_size, device=dev, dtype=torch.bfloat16, generator=g)
    sizes = {}
    inner = m._exchange_counts

    def record(counts_p):  # the layer's split sizes of this forward
        send_rows, recv_rows, recv = inner(counts_p)
        sizes.update(send=send_rows, recv=recv_rows)
        return send_rows, recv_rows, recv

    m._exchange_counts = record
    with torch.no_grad():
        m(x)
    del m._exchange_counts
    row_bytes = cfg.hidden_size * 2
    res = dict(shape=name, tokens_per_rank=t, world_size=world, rank=rank,
               send_rows=sizes["send"], recv_rows=sizes["recv"])
    with torch.no_grad():
        res["forward_s"] = timed(lambda: m(x), args.iters, args.warmup)
    res["forward_tokens_per_s"] = world * t / res["forward_s"]
    if args.backward:
        m.train()
        m.return_stats = False
        xg = x.clone().requires_grad_(True)
        dy = torch.randn_like(x)

        def step():
            m(xg).backward(dy)
            m.zero_grad(set_to_none=True)

        res["forward_backward_s"] = timed(step, args.iters, args.warmup)
        res["forward_backward_tokens_per_s"] = world * t / res["forward_backward_s"]
        m.eval()
    send = torch.randn(sum(sizes["send"]), cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    recv = send.new_empty(sum(sizes["recv"]), cfg.hidden_size)
    res["exchange_s"] = timed(lambda: dist.all_to_all_single(recv, send, sizes["recv"], sizes["send"]),
                              args.iters, args.warmup)
    off_rank = (sum(sizes["send"]) - sizes["send"][rank]) * row_bytes
    res["exchange_bytes_off_rank"] = off_rank
    res["exchange_GBps"] = off_rank / res["exchange_s"] / 1e9
    n = t * cfg.top_k
    n -= n % world
    eq_send = torch.randn(n, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    eq_recv = torch.empty_like(eq_send)
    res["nccl_s"] = timed(lambda: dist.all_to_all_single(eq_recv, eq_send), args.iters, args.warmup)
    res["nccl_bytes_off_rank"] = n // world * (world - 1) * row_bytes
    res["nccl_GBps"] = res["nccl_bytes_off_rank"] / res["nccl_s"] / 1e9
    del m, x, send, recv, eq_send, eq_recv
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--out", default=None, help="JSON file (rank 0)")
    args = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=dev)
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; known: {sorted(SHAPES)}")
        for t in (int(v) for v in args.tokens.split(",")):
            res = bench_one(name, t, args, rank, world, dev)
            gathered = [None] * world
            dist.all_gather_object(gathered, res)
            rows.extend(gathered)
            if rank == 0:
                slow_ex = max(r["exchange_s"] for r in gathered)
                slow_nc = max(r["nccl_s"] for r in gathered)
                fwd = max(r["forward_s"] for r in gathered)
                ex_gbps = min(r["exchange_GBps"] for r in gathered)
                nc_gbps = min(r["nccl_GBps"] for r in gathered)
                line = (f"{name} T={t}/GPU W={world}: forward {fwd * 1e3:.2f} ms ({world * t / fwd:,.0f} tok/s)")
                if args.backward:
                    fb = max(r["forward_backward_s"] for r in gathered)
                    line += f", fwd+bwd {fb * 1e3:.2f} ms ({world * t / fb:,.0f} tok/s)"
                line += (f"; exchange {slow_ex * 1e3:.3f} ms, min {ex_gbps:.1f} GB/s; NCCL equal all_to_all "
                         f"{slow_nc * 1e3:.3f} ms, min {nc_gbps:.1f} GB/s")
                if world > 1:
                    line += f" ({100 * ex_gbps / nc_gbps:.0f}% of NCCL)"
                print(line, flush=True)
    if rank == 0 and args.out:
        meta = dict(torch=torch.__version__, device=torch.cuda.get_device_name(dev), world_size=world,
                    nccl=".".join(map(str, torch.cuda.nccl.version())))
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
