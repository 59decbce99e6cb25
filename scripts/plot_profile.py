#!/usr/bin/env python3
"""scripts/plot_profile.py: plots of a `switchyard profile` report, and a check of the report against its data.

    python3 scripts/plot_profile.py REPORT_DIR            # PNGs from REPORT_DIR/profile.json into REPORT_DIR
    python3 scripts/plot_profile.py REPORT_DIR --check    # also verify PROFILE.md (exit 1 on a problem)

Plots (GPU report; the CPU report gets the same where it has the data):
  time_vs_tokens.png       ms against tokens per implementation (Switchyard, dense baseline, PyTorch peers), floor
  floor_pct_vs_tokens.png  % of floor against tokens per implementation
  stage_breakdown.png      stacked stage times (router, plan, dispatch, GEMM1, activation, GEMM2, shared, combine)
  memory_vs_tokens.png     Switchyard workspace and dense baseline need against tokens, the card's memory, and the
                           dense baseline's out-of-memory point
  expert_load.png          per-expert load histograms (uniform, Zipf-skewed, balanced)
Without matplotlib the plots are skipped with a message and the exit status stays 0 (the check still runs).

--check: no "[To be filled" blank; the seed study's headings present and in the seed's order; every number of
PROFILE.md found in profile.json (as a value printed with the same decimals, a byte count printed in KiB/MiB/GiB/TiB,
or a number inside one of the JSON's strings, such as the command line or the date).
"""
import argparse
import json
import math
import os
import re
import sys

SEED_HEADINGS = [
    "# MoE Router Baseline Profiling",
    "## Hardware Configuration",
    "## Performance Metrics",
    "### Router Performance",
    "### Full MoE Layer Performance",
    "## Memory Usage Patterns",
    "### Router Memory Usage",
    "### MoE Layer Memory Usage",
    "## Identified Bottlenecks",
    "### Computational Bottlenecks",
    "### Memory Bottlenecks",
    "## Expert Utilization Analysis",
    "## Next Steps",
]
STAGES = ["router", "plan", "dispatch", "gemm1", "activation", "gemm2", "shared", "combine"]
CPU_STAGES = ["router", "plan", "dispatch", "experts", "shared", "combine"]
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4, "PiB": 1024**5}
NUM_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\d])(?:\s?(KiB|MiB|GiB|TiB|PiB|B)\b)?(\w?)")


# ---------------------------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------------------------
def json_numbers(obj, nums, strings):
    if isinstance(obj, bool):
        nums.append(float(obj))
    elif isinstance(obj, (int, float)):
        if math.isfinite(obj):
            nums.append(float(obj))
    elif isinstance(obj, str):
        strings.append(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            strings.append(str(k))
            json_numbers(v, nums, strings)
    elif isinstance(obj, list):
        for v in obj:
            json_numbers(v, nums, strings)


def check_report(md, data):
    problems = []
    if "[To be filled" in md:
        problems.append("an unfilled '[To be filled' blank remains")
    lines = md.splitlines()
    pos = -1
    for h in SEED_HEADINGS:
        try:
            i = lines.index(h)
        except ValueError:
            problems.append(f"seed heading missing: {h!r}")
            continue
        if i < pos:
            problems.append(f"seed heading out of order: {h!r}")
        pos = max(pos, i)
    nums, strings = [], []
    json_numbers(data, nums, strings)
    string_tokens = set()
    for s in strings:
        for m in re.finditer(r"\d+(?:\.\d+)?", s):
            string_tokens.add(m.group(0))
    formatted = {}  # decimals -> set of strings
    for d in range(0, 6):
        formatted[d] = {f"{v:.{d}f}" for v in nums}
    scaled = {}
    for unit, div in UNITS.items():
        if div == 1:
            continue
        scaled[unit] = {d: {f"{v / div:.{d}f}" for v in nums} for d in range(0, 4)}
    bad = []
    for m in NUM_RE.finditer(md):
        tok, unit, tail = m.group(1), m.group(2), m.group(3)
        if tail and tail != "x":  # part of an identifier such as 30B or 2x1x1
            continue
        d = len(tok.split(".")[1]) if "." in tok else 0
        ok = tok in string_tokens or tok in formatted.get(d, set())
        if not ok and unit and unit in scaled:
            ok = tok in scaled[unit].get(d, set())
        if not ok:
            line = md.count("\n", 0, m.start()) + 1
            bad.append(f"line {line}: {tok}{(' ' + unit) if unit else ''}")
    if bad:
        problems.append(f"{len(bad)} number(s) of PROFILE.md not in profile.json: " + "; ".join(bad[:20]))
    return problems


# ---------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------
def series_gpu(data):
    """{shape: {impl: [(T, ms, pct_of_floor)]}} and floors."""
    out = {}
    for L in data.get("layers", []):
        shape, t = L["shape"], L["tokens"]
        s = out.setdefault(shape, {})
        if "floor_ms" in L:
            s.setdefault("floor", []).append((t, L["floor_ms"], 100.0))
        if "switchyard" in L:
            s.setdefault("switchyard", []).append((t, L["switchyard"]["ms"], L["switchyard"]["pct_of_floor"]))
        d = L.get("dense", {})
        if d.get("ran"):
            s.setdefault("dense baseline", []).append((t, d["ms"], d.get("pct_of_floor", float("nan"))))
        for impl, p in L.get("torch", {}).items():
            if "ms" in p:
                s.setdefault("torch " + impl, []).append((t, p["ms"], p.get("pct_of_floor", float("nan"))))
    return out


def series_cpu(data):
    out = {}
    for L in data.get("layers", []):
        shape, t = L["shape"], L["tokens"]
        s = out.setdefault(shape, {})
        s.setdefault("floor", []).append((t, L["floor_ms"], 100.0))
        s.setdefault("switchyard (CPU)", []).append((t, L["sparse_ms"], 100.0 * L["floor_ms"] / max(L["sparse_ms"], 1e-12)))
        if L.get("dense_ran"):
            s.setdefault("dense baseline (CPU)", []).append(
                (t, L["dense_ms"], 100.0 * L["floor_ms"] / max(L["dense_ms"], 1e-12)))
    return out


def make_plots(data, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = data.get("device") == "cuda"
    series = series_gpu(data) if gpu else series_cpu(data)
    shapes = list(series)
    written = []
    if shapes:
        for what, fname, ylabel in (("ms", "time_vs_tokens.png", "ms (median)"),
                                    ("pct", "floor_pct_vs_tokens.png", "% of floor")):
            fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
            for ax, shape in zip(axes[0], shapes):
                for impl, pts in series[shape].items():
                    if what == "pct" and impl == "floor":
                        continue
                    pts = sorted(pts)
                    xs = [p[0] for p in pts]
                    ys = [p[1] if what == "ms" else p[2] for p in pts]
                    style = "k--" if impl == "floor" else "o-"
                    ax.plot(xs, ys, style, label=impl)
                ax.set_xscale("log", base=2)
                if what == "ms":
                    ax.set_yscale("log")
                ax.set_title(shape)
                ax.set_xlabel("tokens")
                ax.set_ylabel(ylabel)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, fname), dpi=120)
            plt.close(fig)
            written.append(fname)

    # stacked stage breakdown
    bars = []
    for L in data.get("layers", []):
        if gpu and "stages" in L:
            st = {s["stage"]: s["ms"] for s in L["stages"]}
            bars.append((f"{L['shape']}\nT={L['tokens']}", [st.get(n, 0.0) for n in STAGES]))
        elif not gpu and "stages_ms" in L:
            bars.append((f"{L['shape']}\nT={L['tokens']}", [L["stages_ms"].get(n, 0.0) for n in CPU_STAGES]))
    if bars:
        names = STAGES if gpu else CPU_STAGES
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars)), 4.5))
        # shares of each bar (times span orders of magnitude), with the absolute total on top
        bottoms = [0.0] * len(bars)
        for i, n in enumerate(names):
            vals = [100.0 * b[1][i] / max(sum(b[1]), 1e-12) for b in bars]
            ax.bar(range(len(bars)), vals, bottom=bottoms, label=n)
            bottoms = [x + y for x, y in zip(bottoms, vals)]
        for i, b in enumerate(bars):
            ax.text(i, 101, f"{sum(b[1]):.3g} ms", ha="center", fontsize=6, rotation=90, va="bottom")
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([b[0] for b in bars], fontsize=6)
        ax.set_ylabel("% of the summed stage time")
        ax.set_ylim(0, 125)
        ax.legend(fontsize=7, ncol=4, loc="upper left")
        ax.set_title("stage breakdown" + (" (CUDA events)" if gpu else " (CPU backend)"))
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "stage_breakdown.png"), dpi=120)
        plt.close(fig)
        written.append("stage_breakdown.png")

    # memory against tokens
    mem = {}
    for L in data.get("layers", []):
        m = mem.setdefault(L["shape"], {"sw": [], "dense": [], "oom": None})
        if gpu:
            if "memory" in L:
                m["sw"].append((L["tokens"], L["memory"]["workspace_bytes"]))
            d = L.get("dense", {})
            if d.get("bytes_needed"):
                m["dense"].append((L["tokens"], d["bytes_needed"]))
                if not d.get("ran") and m["oom"] is None:
                    m["oom"] = (L["tokens"], d["bytes_needed"])
        else:
            m["sw"].append((L["tokens"], L["memory"]["sparse_cpu_intermediates"]))
            m["dense"].append((L["tokens"], L["memory"]["dense_total"]))
            if not L.get("dense_ran") and m["oom"] is None:
                m["oom"] = (L["tokens"], L["memory"]["dense_total"])
    if mem:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for shape, m in mem.items():
            if m["sw"]:
                xs, ys = zip(*sorted(m["sw"]))
                ax.plot(xs, [y / 2**30 for y in ys], "o-", label=f"{shape}: Switchyard workspace")
            if m["dense"]:
                xs, ys = zip(*sorted(m["dense"]))
                ax.plot(xs, [y / 2**30 for y in ys], "s--", label=f"{shape}: dense baseline need")
            if m["oom"]:
                ax.plot([m["oom"][0]], [m["oom"][1] / 2**30], "rx", markersize=12)
                ax.annotate(f"{shape}: dense OOM", (m["oom"][0], m["oom"][1] / 2**30), fontsize=7)
        total = data.get("hardware", {}).get("memory_total_bytes")
        if total:
            ax.axhline(total / 2**30, color="k", lw=0.8, ls=":", label="GPU memory")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("GiB")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
        ax.set_title("peak memory against tokens")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "memory_vs_tokens.png"), dpi=120)
        plt.close(fig)
        written.append("memory_vs_tokens.png")

    util = data.get("utilisation", [])
    ushapes = []
    for u in util:
        if u["shape"] not in ushapes:
            ushapes.append(u["shape"])
    if ushapes:
        rows_per = max(len([u for u in util if u["shape"] == s]) for s in ushapes)
        fig, axes = plt.subplots(len(ushapes), rows_per, figsize=(3.2 * rows_per, 2.4 * len(ushapes)), squeeze=False)
        for r, shape in enumerate(ushapes):
            us = [u for u in util if u["shape"] == shape]
            for c in range(rows_per):
                ax = axes[r][c]
                if c >= len(us):
                    ax.axis("off")
                    continue
                counts = us[c]["expert_counts"]
                mean = sum(counts) / max(len(counts), 1)
                ax.bar(range(len(counts)), counts, width=1.0)
                ax.axhline(mean, color="k", lw=0.8, ls="--")
                ax.set_title(f"{shape}: {us[c]['logits']}\nmax/mean {us[c]['max_over_mean']:.2f}", fontsize=7)
                ax.tick_params(labelsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "expert_load.png"), dpi=110)
        plt.close(fig)
        written.append("expert_load.png")
    return written


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report_dir")
    p.add_argument("--check", action="store_true", help="verify PROFILE.md against profile.json")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args()
    with open(os.path.join(args.report_dir, "profile.json")) as f:
        data = json.load(f)
    status = 0
    if args.check:
        with open(os.path.join(args.report_dir, "PROFILE.md")) as f:
            md = f.read()
        problems = check_report(md, data)
        for pr in problems:
            print(f"plot_profile: check: {pr}", file=sys.stderr)
        if problems:
            status = 1
        else:
            print("plot_profile: check passed (seed sections in order, no blanks, every number in profile.json)")
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("plot_profile: plots skipped: matplotlib is not installed (pip install matplotlib)")
            return status
        written = make_plots(data, args.report_dir)
        print("plot_profile: wrote " + ", ".join(os.path.join(args.report_dir, w) for w in written))
    return status


if __name__ == "__main__":
    sys.exit(main())
