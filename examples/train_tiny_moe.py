#!/usr/bin/env python3
"""examples/train_tiny_moe.py: train a small MoE language model twice -- Switchyard's MoE layer and plain PyTorch --
from the same initial weights on the same data, and check that both learn and that their loss curves agree.

Model: a pre-norm causal transformer (token + position embeddings, --layers blocks of [LayerNorm, multi-head causal
self-attention, LayerNorm, MoE FFN], final LayerNorm, LM head). Every FFN is a Mixture-of-Experts layer: softmax
router over --experts experts, top-k (renormalised), SwiGLU experts of width --ffn, Switch aux loss (coefficient
0.01) and z-loss (0.001) added to the loss. Two FFN implementations with identical parameters (gate [E, H] fp32,
w13 [E, 2F, H], w2 [E, H, F]):
  switchyard : switchyard.torch.MoE (torch custom ops; CPU reference on CPU tensors, CUDA kernels on CUDA tensors);
  torch      : plain PyTorch -- fp32 router, top-k, sort by expert, torch._grouped_mm, SwiGLU, torch._grouped_mm,
               weighted un-permute; the same aux/z-loss formulas (src/ref/backward.h), autograd throughout.
The torch model's weights are copied from the Switchyard model's after initialisation, so both start equal.

Precision: parameters stay fp32 (master weights, AdamW). With --dtype bf16 the attention/LM-head matmuls run under
torch.autocast(bf16); the MoE FFN runs with autocast off and casts explicitly: router logits in fp32 from the fp32
gate, experts in bf16 (x, w13, w2 cast to bf16; their gradients flow back to the fp32 masters). --dtype fp32 runs
everything in fp32 (the CPU smoke test).

Data (generated here, no downloads): a synthetic "language" over --vocab symbols, a second-order Markov chain with a
first-order skeleton: each symbol b has 4 successors succ[b, 0..3]; the next symbol after (a, b) is
succ[b, a % 4] with probability 0.75, otherwise one of the 4 uniformly. Entropies: order 0 ~ ln(V) (4.16 nats for
V = 64, where a fresh model starts), order 1 ln 4 = 1.39, the true order-2 entropy
-(0.8125 ln 0.8125 + 3 * 0.0625 ln 0.0625) = 0.69. Both runs see the same batches (one generator, fixed seed).

Printed: loss every --log-every steps for both, the per-expert load max/mean (from MoEOutput.expert_counts for
Switchyard, the same bincount for torch; the worst layer, and the mean over layers), time per step. At the end a
verdict (evaluated when steps >= 50):
  learns   : for each run, final < 0.7 x initial, where initial = mean raw loss of the first 5 steps and final =
             mean raw loss of the last 10% of steps;
  agree    : mean |smoothed_sy - smoothed_torch| over the last 20% of steps < threshold. smoothed = EMA (alpha 0.1,
             a ~10-step window). Both runs see the same batches, so batch-to-batch noise is common to both curves
             and cancels in the difference; what remains is trajectory divergence from rounding (bf16 GEMMs, other
             summation orders, an occasional different top-k choice). Threshold = max(0.02 nats,
             0.005 x (initial - final of the torch run)), 0.02 for this task. Calibration (CPU, bf16, 2 layers,
             d_model 64, F 128, batch 8 x 64, 300 steps): the correct pair differs by 0.007; the same pair with
             the torch run's router gradient cut (combine weights detached, a subtle gradient bug that still
             trains to 0.98 instead of 0.92) differs by 0.045. Coarser bugs (a missing term in the expert
             gradients, wrong rows) stall or lag the curve by far more.
Held-out evaluation with FP8 experts (issue 13): after training, each run's mean LM loss on --eval-batches held-out
batches of the same chain (another sample stream, the same for every run) in eval mode; then the Switchyard model's
MoE layers are quantised in place with MoE.quantize_(--fp8: fp8-block, 128x128 weight blocks, or fp8-tensor; the
recipe of `switchyard quantize`; router, attention and embeddings untouched) and the same loss is evaluated again
with FP8 experts (W8A8: activations quantised per token and 128 channels, the grouped_mm_fp8 op). Printed: both
losses and FP8 - float; --fp8 none skips it. The experts are quantised from their weights in the compute dtype (what
a saved bf16 / fp32 checkpoint holds).
Exit status: 0 when the verdict passes or is not evaluated, 1 when it fails, 2 on bad arguments.

Usage:
  SWITCHYARD_TORCH_LIB=build/bindings/torch/_switchyard_torch.so PYTHONPATH=python \
      python3 examples/train_tiny_moe.py --steps 400 --device cuda --dtype bf16 --json train.json
  ... --steps 5 --device cpu           (CPU smoke test: fp32, smaller batch by default)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import switchyard.torch as st

AUX_COEF = 0.01
Z_COEF = 0.001
SUCCESSORS = 4
P_FOLLOW = 0.75


# ---- data --------------------------------------------------------------------------------------------------------
class MarkovData:
    """Batches [B, S+1] of the second-order chain described in the module docstring, from a seeded CPU generator."""

    def __init__(self, vocab: int, seed: int):
        self.vocab = vocab
        self.gen = torch.Generator().manual_seed(seed)
        # succ[b] = 4 distinct successors of symbol b
        self.succ = torch.stack([torch.randperm(vocab, generator=self.gen)[:SUCCESSORS] for _ in range(vocab)])

    def batch(self, batch: int, seq: int) -> torch.Tensor:
        g = self.gen
        out = torch.empty(batch, seq + 1, dtype=torch.long)
        out[:, 0] = torch.randint(self.vocab, (batch,), generator=g)
        out[:, 1] = self.succ[out[:, 0], torch.randint(SUCCESSORS, (batch,), generator=g)]
        follow = torch.rand(batch, seq + 1, generator=g) < P_FOLLOW
        rand_slot = torch.randint(SUCCESSORS, (batch, seq + 1), generator=g)
        for i in range(2, seq + 1):
            a, b = out[:, i - 2], out[:, i - 1]
            slot = torch.where(follow[:, i], a % SUCCESSORS, rand_slot[:, i])
            out[:, i] = self.succ[b, slot]
        return out


# ---- the two MoE FFNs (same parameter names: moe.gate, moe.w13, moe.w2) -----------------------------------------
class SwitchyardFFN(nn.Module):
    def __init__(self, cfg: st.MoEConfig, compute_dtype: torch.dtype):
        super().__init__()
        self.moe = st.MoE(cfg, dtype=torch.float32, return_stats=True)
        self.compute_dtype = compute_dtype

    @torch.no_grad()
    def quantize_(self, mode: str):
        """FP8 experts for inference: w13 / w2 rounded to the compute dtype, then MoE.quantize_(mode)."""
        for name in ("w13", "w2"):
            setattr(self.moe, name, nn.Parameter(getattr(self.moe, name).to(self.compute_dtype), requires_grad=False))
        self.moe.quantize_(mode)

    def forward(self, x):
        """x [T, H] -> (y [T, H] in x's dtype, aux-weighted loss, expert counts [E])."""
        with torch.autocast(x.device.type, enabled=False):
            cd = self.compute_dtype
            if self.moe.quantized:  # FP8 experts (inference): the module's own fp8 buffers
                out = self.moe(x.to(cd))
                return out.y.to(x.dtype), out.loss, out.expert_counts
            params = {"gate": self.moe.gate, "w13": self.moe.w13.to(cd), "w2": self.moe.w2.to(cd)}
            out = torch.func.functional_call(self.moe, params, (x.to(cd),))
            return out.y.to(x.dtype), out.loss, out.expert_counts


class TorchFFN(nn.Module):
    """Plain PyTorch: the same function as switchyard.torch.MoE for softmax routing, renormalised top-k, SwiGLU."""

    def __init__(self, cfg: st.MoEConfig, compute_dtype: torch.dtype):
        super().__init__()
        self.moe = nn.Module()
        e, h, f = cfg.num_experts, cfg.hidden_size, cfg.ffn_size
        self.moe.gate = nn.Parameter(torch.empty(e, h))
        self.moe.w13 = nn.Parameter(torch.empty(e, 2 * f, h))
        self.moe.w2 = nn.Parameter(torch.empty(e, h, f))
        self.cfg = cfg
        self.compute_dtype = compute_dtype

    def forward(self, x):
        c = self.cfg
        e, k, f = c.num_experts, c.top_k, c.ffn_size
        with torch.autocast(x.device.type, enabled=False):
            cd = self.compute_dtype
            xc = x.to(cd)
            t = xc.shape[0]
            logits = F.linear(xc.float(), self.moe.gate)  # [T, E] fp32
            probs = logits.softmax(-1)
            ids = logits.topk(k, dim=-1).indices  # same order as probs' top-k
            w = probs.gather(1, ids)
            w = w / w.sum(-1, keepdim=True)
            flat = ids.flatten()
            order = flat.argsort(stable=True)
            counts = torch.bincount(flat, minlength=e)
            offs = counts.cumsum(0).to(torch.int32)
            xp = xc[order // k]
            g = torch._grouped_mm(xp, self.moe.w13.to(cd).transpose(-2, -1), offs=offs)
            hidden = F.silu(g[:, :f]) * g[:, f:]
            out = torch._grouped_mm(hidden, self.moe.w2.to(cd).transpose(-2, -1), offs=offs)
            unperm = out[order.argsort()]  # slot-major rows back to [T*k] in (token, slot) order
            y = (unperm.view(t, k, -1).float() * w.unsqueeze(-1)).sum(1).to(cd)
            # Switch aux loss and z-loss, as src/ref/backward.h defines them
            frac = counts.to(torch.float32) / (t * k)
            aux = e * (frac * probs.mean(0)).sum()
            z = torch.logsumexp(logits, -1).square().mean()
            return y.to(x.dtype), AUX_COEF * aux + Z_COEF * z, counts


# ---- the model -------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = ffn
        self.heads = heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        y, loss, counts = self.ffn(self.ln2(x).reshape(b * s, d))
        return x + y.view(b, s, d), loss, counts


class TinyMoELM(nn.Module):
    def __init__(self, args, impl: str, compute_dtype: torch.dtype):
        super().__init__()
        d = args.d_model
        cfg = st.MoEConfig(hidden_size=d, ffn_size=args.ffn, num_experts=args.experts, top_k=args.top_k,
                           renormalize=True, activation="swiglu", aux_loss_coef=AUX_COEF, z_loss_coef=Z_COEF)
        ffn_cls = SwitchyardFFN if impl == "switchyard" else TorchFFN
        self.tok = nn.Embedding(args.vocab, d)
        self.pos = nn.Embedding(args.seq_len, d)
        self.blocks = nn.ModuleList([Block(d, args.heads, ffn_cls(cfg, compute_dtype)) for _ in range(args.layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, args.vocab, bias=False)

    def init_weights(self, num_layers):
        """GPT-2 style for the dense parts; the MoE layers keep switchyard.torch.MoE.reset_parameters' init."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if ".moe." in name or p.dim() < 2:
                    continue
                std = 0.02 / math.sqrt(2 * num_layers) if name.endswith("proj.weight") else 0.02
                p.normal_(0.0, std)

    def forward(self, idx, targets):
        b, s = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(s, device=idx.device))
        aux_total = 0.0
        counts = []
        for blk in self.blocks:
            x, aux, c = blk(x)
            aux_total = aux_total + aux
            counts.append(c)
        logits = self.head(self.ln_f(x))
        lm = F.cross_entropy(logits.float().view(b * s, -1), targets.reshape(-1))
        return lm, aux_total, counts


# ---- training ----------------------------------------------------------------------------------------------------
def lr_at(step, args):
    warm = max(1, min(20, args.steps // 10))
    if step < warm:
        return args.lr * (step + 1) / warm
    frac = (step - warm) / max(1, args.steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(model, batches, args, device, compute_dtype, label):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    use_autocast = compute_dtype != torch.float32
    losses, times, loads = [], [], []
    for step, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=compute_dtype, enabled=use_autocast):
            lm, aux, counts = model(batch[:, :-1], batch[:, 1:])
        (lm + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm_v = lm.item()  # synchronises
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        cnt = torch.stack([c.to(torch.float64) for c in counts]).cpu()  # [layers, E]
        ratio = (cnt.max(1).values / cnt.mean(1)).tolist()
        if step == 0:
            first_counts = cnt.to(torch.int64).tolist()
        losses.append(lm_v)
        loads.append(ratio)
        if not math.isfinite(lm_v):
            print(f"[{label}] step {step}: loss is {lm_v}, stopping", flush=True)
            break
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"[{label:>10}] step {step:5d}  loss {lm_v:.4f}  aux+z {float(aux.detach()):.4f}  "
                  f"load max/mean worst {max(ratio):.2f} mean {statistics.mean(ratio):.2f}  {times[-1]:.1f} ms",
                  flush=True)
    return dict(losses=losses, step_ms=times, load_max_over_mean=loads, first_step_counts=first_counts,
                median_step_ms=statistics.median(times[min(3, len(times) - 1):]) if times else float("nan"))


@torch.no_grad()
def evaluate(model, batches, device, compute_dtype):
    """Mean LM loss (no aux losses) over held-out batches, in eval mode."""
    was = model.training
    model.eval()
    total = 0.0
    for batch in batches:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            lm, _aux, _counts = model(batch[:, :-1], batch[:, 1:])
        total += lm.item()
    model.train(was)
    return total / max(1, len(batches))


def ema(values, alpha=0.1):
    out, s = [], None
    for v in values:
        s = v if s is None else (1 - alpha) * s + alpha * v
        out.append(s)
    return out


def verdict(runs, steps):
    res = dict(evaluated=steps >= 50)
    if not res["evaluated"]:
        res["reason"] = f"fewer than 50 steps ({steps}): not evaluated"
        return res
    for name, r in runs.items():
        ls = r["losses"]
        if len(ls) < steps:
            res.update(passed=False, reason=f"{name} stopped after {len(ls)} steps (non-finite loss)")
            return res
        initial = statistics.mean(ls[:5])
        final = statistics.mean(ls[-max(1, steps // 10):])
        res[name] = dict(initial=initial, final=final, ratio=final / initial, learns=final < 0.7 * initial)
    a, b = ema(runs["switchyard"]["losses"]), ema(runs["torch"]["losses"])
    tail = max(1, steps // 5)
    mad = statistics.mean(abs(x - y) for x, y in zip(a[-tail:], b[-tail:]))
    threshold = max(0.02, 0.005 * (res["torch"]["initial"] - res["torch"]["final"]))
    res.update(mean_abs_diff_smoothed=mad, threshold=threshold, agree=mad < threshold)
    res["passed"] = bool(res["switchyard"]["learns"] and res["torch"]["learns"] and res["agree"])
    return res


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--json", default="", help="write losses, timings, loads and the verdict here")
    p.add_argument("--impls", default="switchyard,torch", help="which runs (the verdict needs both)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ffn", type=int, default=512, help="expert FFN width F")
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--batch", type=int, default=None, help="default: 32 on cuda, 4 on cpu")
    p.add_argument("--seq-len", type=int, default=None, help="default: 256 on cuda, 64 on cpu")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-every", type=int, default=None, help="default: steps / 20")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches for the final evaluation (0: none)")
    p.add_argument("--fp8", choices=["fp8-block", "fp8-tensor", "none"], default="fp8-block",
                   help="after training, evaluate the Switchyard model again with its experts quantised this way")
    args = p.parse_args(argv)
    cpu = args.device.startswith("cpu")
    args.dtype = args.dtype or ("fp32" if cpu else "bf16")
    args.batch = args.batch or (4 if cpu else 32)
    args.seq_len = args.seq_len or (64 if cpu else 256)
    args.log_every = args.log_every or max(1, args.steps // 20)
    if args.eval_batches < 0:
        p.error(f"--eval-batches={args.eval_batches} must be >= 0")
    if args.steps < 1 or args.d_model % args.heads != 0:
        p.error(f"--steps={args.steps} must be >= 1 and --heads={args.heads} must divide --d-model={args.d_model}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    compute_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    impls = args.impls.split(",")
    info = f"torch {torch.__version__}, " + (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    print(f"train_tiny_moe: {info}; {args.layers} layers, d_model {args.d_model}, {args.experts} experts top-"
          f"{args.top_k}, SwiGLU F={args.ffn}, vocab {args.vocab}, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.steps} steps, {args.dtype}", flush=True)

    data = MarkovData(args.vocab, args.seed)
    batches = [data.batch(args.batch, args.seq_len) for _ in range(args.steps)]
    held = MarkovData(args.vocab, args.seed)  # the same chain (successor table), another sample stream
    held.gen.manual_seed(args.seed + 1_000_003)
    eval_batches = [held.batch(args.batch, args.seq_len) for _ in range(args.eval_batches)]

    torch.manual_seed(args.seed)
    ref = TinyMoELM(args, "switchyard", compute_dtype)
    ref.init_weights(args.layers)
    init_state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    del ref

    runs = {}
    for impl in impls:
        model = TinyMoELM(args, impl, compute_dtype)
        model.load_state_dict(init_state, strict=True)  # same start for both
        model.to(device).train()
        torch.manual_seed(args.seed + 1)
        runs[impl] = train(model, batches, args, device, compute_dtype, impl)
        if eval_batches:
            r = runs[impl]
            r["eval_loss"] = evaluate(model, eval_batches, device, compute_dtype)
            print(f"[{impl:>10}] held-out loss ({len(eval_batches)} batches): {r['eval_loss']:.4f} ({args.dtype} "
                  "experts)", flush=True)
            if impl == "switchyard" and args.fp8 != "none":
                for blk in model.blocks:
                    blk.ffn.quantize_(args.fp8)
                r["eval_loss_fp8"] = evaluate(model, eval_batches, device, compute_dtype)
                r["fp8_mode"] = args.fp8
                print(f"[{impl:>10}] held-out loss ({len(eval_batches)} batches): {r['eval_loss_fp8']:.4f} "
                      f"({args.fp8} experts), FP8 - {args.dtype} = {r['eval_loss_fp8'] - r['eval_loss']:+.4f}",
                      flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("summary:")
    for impl, r in runs.items():
        ls = r["losses"]
        last_load = r["load_max_over_mean"][-1] if r["load_max_over_mean"] else []
        print(f"  {impl:>10}: loss {ls[0]:.4f} -> {ls[-1]:.4f}, median {r['median_step_ms']:.2f} ms/step, "
              f"final load max/mean worst layer {max(last_load):.2f}")
        if "eval_loss" in r:
            fp8 = (f"; {r['fp8_mode']} experts {r['eval_loss_fp8']:.4f} (difference "
                   f"{r['eval_loss_fp8'] - r['eval_loss']:+.4f})") if "eval_loss_fp8" in r else ""
            print(f"  {impl:>10}: held-out loss {args.dtype} experts {r['eval_loss']:.4f}{fp8}")
    if "switchyard" in runs and "torch" in runs:
        n = min(len(runs["switchyard"]["losses"]), len(runs["torch"]["losses"]))
        d0 = abs(runs["switchyard"]["losses"][0] - runs["torch"]["losses"][0])
        print(f"  step-0 loss difference (same weights, same batch): {d0:.3e}; steps compared: {n}")
        print(f"  speed: switchyard / torch step time = "
              f"{runs['switchyard']['median_step_ms'] / runs['torch']['median_step_ms']:.3f}")
        v = verdict(runs, args.steps)
    else:
        v = dict(evaluated=False, reason="needs both impls")
    if v["evaluated"]:
        for impl in ("switchyard", "torch"):
            s = v[impl]
            print(f"  {impl:>10}: initial {s['initial']:.4f} final {s['final']:.4f} ratio {s['ratio']:.3f} "
                  f"({'falls' if s['learns'] else 'does NOT fall'} below 0.7x)")
        print(f"  curves: mean |smoothed diff| over the last 20% = {v['mean_abs_diff_smoothed']:.4f} "
              f"(threshold {v['threshold']:.4f})")
        print(f"verdict: {'PASS' if v['passed'] else 'FAIL'}")
    else:
        print(f"verdict: {v['reason']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(config=vars(args), device=info, runs=runs, verdict=v), fh, indent=1)
    return 1 if v.get("evaluated") and not v.get("passed") else 0


if __name__ == "__main__":
    sys.exit(main())
