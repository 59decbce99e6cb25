#!/usr/bin/env python3
"""Where one training step of a switchyard.torch.MoE layer (forward + backward) spends its GPU time, kernel by kernel
(issue 11's forward + backward targets).

For each model at T tokens (bf16, the layer of compare_torch.py --train): one step y = moe(x); y.backward(dy) timed
with CUDA events (median of 10 after warm-up), then one step under torch.profiler: every CUDA kernel in launch order
with its duration and the idle time before it, and the same kernels summed by name, largest first, with their share
of the kernel time.

Where the step's time goes besides its kernels, each timed with CUDA events (median of 10):
  dy step     y.backward(dy) with a fixed upstream gradient (the layer's own work);
  loss step   compare_torch.py --train's step: loss = y.float().square().mean(); loss.backward() (the loss's
              element-wise kernels and their backward are not the layer's);
  graph       the dy step captured once in a CUDA graph and replayed: no host launch cost, so graph vs dy step is
              the time the GPU waits for the host's launches (the profiler's kernel sum of one step can read lower
              than the replay: DeepSeek-V3 in run 30, bench/NOTES.md).

With --interleaved the layer runs its interleaved layout's training path (switchyard::gathered_gated_keep: GEMM1 stores
its product and h in one kernel) on the same random tensors read as interleaved (compare_torch.py's
gated_train_twin: the same bytes and FLOPs, other values).

    python3 bench/train_timeline.py --torch-lib build/bindings/torch/_switchyard_torch.so [--models qwen3] [--tokens N]
                                    [--interleaved]
"""
import argparse
import collections
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from compare_torch import MODELS, bench_layer, gated_train_twin, load_switchyard_torch, time_cuda  # noqa: E402
from prefill_timeline import kernel_timeline  # noqa: E402


def short(name):
    """The kernel's own name: no return type, namespaces, template or argument lists (CUTLASS's mangled names: one)."""
    if name.startswith("_ZN7cutlass"):
        return "cutlass gemm"
    name = name.replace("void ", "", 1).replace("(anonymous namespace)", "anon")
    for cut in ("<", "("):
        name = name.split(cut)[0]
    return name.split("::")[-1].strip()[:40]


def graph_step_ms(step):
    """Median ms of the step captured in one CUDA graph and replayed (nan, with the reason printed, if the capture
    fails): the step's GPU time without the host's launch cost."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return time_cuda(graph.replay, warmup=3, iters=10)
    except Exception as e:  # noqa: BLE001 (report and go on: the other columns stand without it)
        print(f"  (graph capture of the step failed: {type(e).__name__}: {str(e)[:200]})")
        return float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torch-lib", default=None)
    p.add_argument("--models", default="qwen3,mixtral,deepseek")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interleaved", action="store_true",
                   help="the interleaved layout's training path (GEMM1 keeping its product), on the same tensors")
    args = p.parse_args()
    sy, why = load_switchyard_torch(args.torch_lib)
    if sy is None:
        sys.exit(f"switchyard.torch: {why}")
    print(f"device: {torch.cuda.get_device_name()}")
    torch.manual_seed(args.seed)
    for m in args.models.split(","):
        moe, _ = bench_layer(sy, m, train=True)
        if args.interleaved:
            moe = gated_train_twin(sy, moe)
        x = torch.randn(args.tokens, MODELS[m][0], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)

        def step():
            moe.zero_grad(set_to_none=True)
            x.grad = None
            moe(x).backward(dy)

        def loss_step():
            moe.zero_grad(set_to_none=True)
            x.grad = None
            moe(x).float().square().mean().backward()

        retries0 = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        ms = time_cuda(step, warmup=3, iters=10)
        loss_ms = time_cuda(loss_step, warmup=3, iters=10)
        # a failed cudaMalloc makes the caching allocator release its cached blocks (synchronising) and retry
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries0
        graph_ms = graph_step_ms(step)
        busy, span, gaps, rows = kernel_timeline(step)
        layout = " (interleaved layout)" if args.interleaved else ""
        print(f"\n{m} T={args.tokens}{layout}: dy step {ms:.3f} ms, loss step {loss_ms:.3f} ms, graph replay of the dy step "
              f"{graph_ms:.3f} ms (events); under the profiler: kernels {busy / 1e3:.3f} ms, span {span / 1e3:.3f} ms, "
              f"idle in gaps > 2 us between kernels {sum(g for g, _ in gaps) / 1e3:.3f} ms; allocator retries while "
              f"the dy and loss steps were timed: {retries}")
        print("  kernel us  idle before us  kernel")
        for us, name, idle in rows:
            print(f"  {us:9.1f}  {idle:13.1f}  {name}")
        by_name = collections.defaultdict(lambda: [0.0, 0])
        for us, name, _ in rows:
            by_name[short(name)][0] += us
            by_name[short(name)][1] += 1
        print(f"{m} T={args.tokens}: kernels by name (us, launches, share of kernel time)")
        for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0]):
            print(f"  {us:9.1f} {n:4d} {100 * us / busy:5.1f}%  {name}")
        del moe, x, dy
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
