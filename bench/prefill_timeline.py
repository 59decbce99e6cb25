#!/usr/bin/env python3
"""Where a switchyard.torch.MoE forward's wall time goes between its kernels (issue 11's module-vs-kernels gap).

For each model and T it measures the same layer four ways on one card, in alternation where it times:
  event     : CUDA events around one forward, synchronised after each (how compare_torch.py --prefill times);
  loop      : N forwards back to back between two events, divided by N (host launch latency hidden by the queue);
  graph     : the forward captured once in a CUDA graph and replayed (no host work at all);
  kernels   : torch.profiler's CUDA kernel records of one forward: the sum of kernel durations, the span from the
              first kernel's start to the last one's end, and the idle gaps between kernels with what follows them.
It also prints the host time of one forward (time.perf_counter around the launches, no synchronisation inside), and
where that host time goes: each torch.ops.switchyard op the forward calls, with the host time from the forward's
start to the op's return (the module's op table swapped for a recording proxy; no profiler), and the CUDA runtime
calls of one forward on the host (torch.profiler's CPU records: each launch or memset, when it started after the
first one, how long it took, and the host time between it and the previous call: where the host is slower than the
GPU's kernels, that gap is GPU idle time).

    python3 bench/prefill_timeline.py --torch-lib build/bindings/torch/_switchyard_torch.so [--models qwen3]
"""
import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from compare_torch import MODELS, bench_layer, load_switchyard_torch, time_interleaved  # noqa: E402


def loop_ms(fn, n=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def host_ms(fn, n=20):
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


class _OpClock:
    """Stands in for switchyard.torch's op table: forwards every call and records (op name, perf_counter at return)."""

    def __init__(self, ops):
        self._ops, self.marks = ops, []

    def __getattr__(self, name):
        op = getattr(self._ops, name)

        def call(*a, **k):
            out = op(*a, **k)
            self.marks.append((name, time.perf_counter()))
            return out
        return call


def host_breakdown(sy_torch, fn, n=20):
    """[(op name, median us from the forward's start to the op's return)] of one forward, and the median total."""
    real = sy_torch._ops
    clock = _OpClock(real)
    runs = []
    sy_torch._ops = clock
    try:
        for _ in range(n):
            torch.cuda.synchronize()
            clock.marks = []
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            runs.append([(name, (t - t0) * 1e6) for name, t in clock.marks] + [("(return)", (t1 - t0) * 1e6)])
    finally:
        sy_torch._ops = real
    torch.cuda.synchronize()
    first = runs[0]
    return [(name, statistics.median(r[i][1] for r in runs)) for i, (name, _) in enumerate(first)]


RUNTIME_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaMemsetAsync",
                 "cudaMemcpyAsync", "cudaLaunchKernelEx")


def host_api_timeline(fn):
    """[(name, start us after the first runtime call, duration us, host gap us since the previous call ended)]."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    calls = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU
                    and e.name in RUNTIME_CALLS), key=lambda e: e.time_range.start)
    out, prev_end = [], None
    t0 = calls[0].time_range.start if calls else 0
    for e in calls:
        gap = 0.0 if prev_end is None else e.time_range.start - prev_end
        out.append((e.name, e.time_range.start - t0, e.time_range.elapsed_us(), gap))
        prev_end = e.time_range.end
    return out


def kernel_timeline(fn):
    """(sum of kernel us, span us, [(gap us, next kernel name)] for gaps > 2 us, [(us, kernel name, idle us before
    it)]) of one call under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    if not kernels:
        return 0.0, 0.0, [], []
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    gaps, rows = [], []
    for prev, cur in zip(kernels, kernels[1:]):
        gap = cur.time_range.start - prev.time_range.end
        if gap > 2:
            gaps.append((gap, cur.name[:60]))
    for prev, e in zip([None] + kernels[:-1], kernels):
        idle = 0.0 if prev is None else max(0.0, e.time_range.start - prev.time_range.end)
        rows.append((e.time_range.elapsed_us(), e.name[:70], idle))
    return busy, span, gaps, rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torch-lib", default=None)
    p.add_argument("--models", default="qwen3,mixtral,deepseek")
    p.add_argument("--tokens", default="4096")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sy, why = load_switchyard_torch(args.torch_lib)
    if sy is None:
        sys.exit(f"switchyard.torch: {why}")
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"{'model':<9}{'T':>6} {'event ms':>9} {'loop ms':>9} {'graph ms':>9} {'host ms':>8} {'kern sum':>9} "
          f"{'kern span':>9}")
    torch.manual_seed(args.seed)
    details = []
    for m in args.models.split(","):
        moe, _ = bench_layer(sy, m, train=False)
        for t in [int(v) for v in args.tokens.split(",")]:
            x = torch.randn(t, MODELS[m][0], device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                fn = lambda: moe(x)  # noqa: E731
                fn()
                torch.cuda.synchronize()
                graph_ms = float("nan")
                try:
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        fn()
                    torch.cuda.current_stream().wait_stream(s)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        fn()
                    replay = g.replay
                except Exception as e:  # a host synchronisation inside the forward makes capture fail: say so
                    print(f"  {m} T={t}: graph capture failed: {type(e).__name__}: {str(e)[:120]}")
                    replay = None
                fns = [fn] + ([replay] if replay else [])
                ev = time_interleaved(fns, warmup=5, iters=20)
                event_ms = ev[0]
                if replay:
                    graph_ms = ev[1]
                lp = loop_ms(fn)
                hm = host_ms(fn)
                busy, span, gaps, rows = kernel_timeline(fn)
                marks = host_breakdown(sys.modules["switchyard.torch"], fn)
                api = host_api_timeline(fn)
            print(f"{m:<9}{t:>6} {event_ms:>9.3f} {lp:>9.3f} {graph_ms:>9.3f} {hm:>8.3f} {busy / 1e3:>9.3f} "
                  f"{span / 1e3:>9.3f}", flush=True)
            details.append((m, t, gaps, rows, marks, api))
            del fns, fn
            replay = g = None
            torch.cuda.synchronize()
    for m, t, gaps, rows, marks, api in details:
        print(f"\n{m} T={t}: host time from the forward's start to each op's return (us, median)")
        print("  " + ", ".join(f"{name} {us:.0f}" for name, us in marks))
        print(f"{m} T={t}: CUDA runtime calls of one forward on the host (start us, duration us, host gap before)")
        for name, start, dur, gap in api:
            print(f"  {start:8.1f} {dur:7.1f} {gap:7.1f}  {name}")
        print(f"{m} T={t}: kernels of one forward (us, name)")
        for us, name, _ in rows:
            print(f"  {us:9.1f}  {name}")
        print(f"  gaps > 2 us before: " + ", ".join(f"{g:.0f} us -> {n}" for g, n in gaps[:20]))


if __name__ == "__main__":
    main()
