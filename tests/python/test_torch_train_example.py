"""CPU smoke test of examples/train_tiny_moe.py: 3 fp32 training steps of a small MoE language model, once with
switchyard.torch.MoE and once with the plain-PyTorch MoE, from the same weights on the same batches.

Runs the example as a subprocess (as a user would), with the environment CTest sets (SWITCHYARD_TORCH_LIB,
PYTHONPATH); by hand:
    SWITCHYARD_TORCH_LIB=build/bindings/torch/_switchyard_torch.so PYTHONPATH=python \
        pytest tests/python/test_torch_train_example.py
Checks: exit status 0; three finite losses per run; identical routing at step 0 (per-layer expert counts, each
summing to tokens * top_k); step-0 losses equal to fp32 rounding (rtol 1e-5: the CPU ops accumulate in double,
plain torch in fp32, through a few layers of depth -- a few ulps of 6e-8); steps 1-2 within rtol 1e-3. The looser
bound after an optimiser step: AdamW's first update is ~lr * sign(grad) per element, so a gradient element that is
zero up to rounding may move by +-lr in one run and the other way in the other, a difference of order
lr = 2e-3 in a few weights whose effect on the loss stays well below 1e-3 relative; a wrong gradient (missing term,
wrong expert rows) moves the loss by far more than that after one step at this learning rate.
Then the held-out evaluation: float losses of both runs, and the Switchyard model's with FP8 experts (quantize_).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_tiny_moe.py"
STEPS, BATCH, SEQ, TOP_K, LAYERS, SEED = 3, 2, 32, 2, 2, 1234


@pytest.mark.skipif(not EXAMPLE.exists(), reason=f"{EXAMPLE} missing")
def test_train_example_cpu_smoke(tmp_path):
    out = tmp_path / "train.json"
    cmd = [sys.executable, str(EXAMPLE), "--steps", str(STEPS), "--device", "cpu", "--dtype", "fp32",
           "--layers", str(LAYERS), "--d-model", "64", "--heads", "4", "--experts", "8", "--top-k", str(TOP_K),
           "--ffn", "96", "--batch", str(BATCH), "--seq-len", str(SEQ), "--seed", str(SEED), "--json", str(out)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "python"), env.get("PYTHONPATH", "")) if p)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"seed {SEED}: {' '.join(cmd)}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert "verdict: fewer than 50 steps" in r.stdout, r.stdout[-2000:]
    res = json.loads(out.read_text())
    sy, pt = res["runs"]["switchyard"], res["runs"]["torch"]
    for name, run in (("switchyard", sy), ("torch", pt)):
        assert len(run["losses"]) == STEPS, f"seed {SEED}: {name} ran {len(run['losses'])} steps"
        assert all(math.isfinite(v) for v in run["losses"]), f"seed {SEED}: {name} losses {run['losses']}"
        # a fresh model predicts ~uniformly over the 64 symbols: loss near ln 64 = 4.16
        assert 3.0 < run["losses"][0] < 5.5, f"seed {SEED}: {name} initial loss {run['losses'][0]}"
        counts = run["first_step_counts"]
        assert len(counts) == LAYERS
        for layer, c in enumerate(counts):
            assert sum(c) == BATCH * SEQ * TOP_K, f"seed {SEED}: {name} layer {layer} counts {c}"
    assert sy["first_step_counts"] == pt["first_step_counts"], \
        f"seed {SEED}: routing differs at step 0: switchyard {sy['first_step_counts']} torch {pt['first_step_counts']}"
    for step, (a, b) in enumerate(zip(sy["losses"], pt["losses"])):
        rtol = 1e-5 if step == 0 else 1e-3
        assert abs(a - b) <= rtol * abs(b), f"seed {SEED}: step {step} loss switchyard {a} torch {b} (rtol {rtol})"
    # Held-out evaluation: both trained models agree as their last training losses do; the Switchyard model with its
    # experts quantised to fp8-block gives a finite loss that differs from the float one (it really ran FP8 experts)
    # by no more than FP8 rounding can move a loss near ln 64 (measured: 8e-4 for this run).
    assert abs(sy["eval_loss"] - pt["eval_loss"]) <= 1e-3 * abs(pt["eval_loss"]), (sy["eval_loss"], pt["eval_loss"])
    assert sy["fp8_mode"] == "fp8-block" and "eval_loss_fp8" not in pt
    assert math.isfinite(sy["eval_loss_fp8"]) and sy["eval_loss_fp8"] != sy["eval_loss"]
    assert abs(sy["eval_loss_fp8"] - sy["eval_loss"]) < 0.05, (sy["eval_loss_fp8"], sy["eval_loss"])
    assert "held-out loss fp32 experts" in r.stdout and "fp8-block experts" in r.stdout
