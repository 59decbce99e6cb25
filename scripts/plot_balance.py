#!/usr/bin/env python3
"""Plot the output of `switchyard balance` (its --json file): max/mean expert load per step for every balancing
mode, with the target ratio, plus the coefficient of variation, on two panels of one PNG.

Usage: python3 scripts/plot_balance.py balance.json balance.png
"""
import json
import sys


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(argv[1]) as f:
        data = json.load(f)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for name, mode in data["modes"].items():
        steps = range(len(mode["max_over_mean"]))
        ax1.plot(steps, mode["max_over_mean"], label=f"{name} (last 10%: {mode['tail_mean']:.3f})", linewidth=1.2)
        ax2.plot(steps, mode["cv"], label=name, linewidth=1.2)
    ax1.axhline(data["target"], color="gray", linestyle="--", linewidth=0.8, label=f"target {data['target']}")
    ax1.axhline(1.0, color="black", linewidth=0.5)
    ax1.set_ylabel("max / mean expert load")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title(
        f"E={data['experts']} k={data['top_k']} tokens/step={data['tokens_per_step']} zipf={data['zipf']} "
        f"noise={data['noise']} score={data['score']} bias_rate={data['bias_rate']} aux_lr={data['aux_lr']}",
        fontsize=9,
    )
    ax2.set_ylabel("coefficient of variation of loads")
    ax2.set_xlabel("step")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(argv[2], dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
