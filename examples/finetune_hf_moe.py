#!/usr/bin/env python3
"""examples/finetune_hf_moe.py: fine-tune a Hugging Face transformers MoE model with Switchyard's layer in one line,
beside the unpatched model from the same weights.

    import switchyard.torch as sy
    model = transformers.MixtralForCausalLM(config)     # or from_pretrained(...)
    sy.patch_model(model)                               # every sparse-MoE block now runs switchyard.torch.MoE

What it does (no download): builds a small random model of --family (mixtral, qwen2_moe, qwen3_moe, olmoe,
deepseek_v2, deepseek_v3) from a config object, deep-copies it and patches the copy, then trains both with AdamW on
the same batches of a synthetic language: a first-order Markov chain over --vocab symbols where each symbol is
followed by its successor succ[b] with probability 0.9 and by a uniform symbol otherwise (entropy
-(0.9 + 0.1/V) ln(0.9 + 0.1/V) - (V - 1)(0.1/V) ln(0.1/V), 0.73 nats for V = 64; a fresh model starts near
ln V = 4.16). Where the family has a load-balancing loss (Mixtral, Qwen, OLMoE) it is on (output_router_logits),
so the router logits Switchyard records feed transformers' own aux loss. Prints both loss curves side by side (raw
and smoothed, EMA over ~10 steps), the mean loss of the last 10% of steps, and on CUDA the step-time ratio
(Switchyard / transformers, forward + backward + optimizer step).

On the CPU both runs are fp32 and agree to rounding for the first ~200 steps (the CPU reference accumulates in
double, transformers in fp32); after that a routing decision that rounding flips makes the two trajectories drift
apart by a few 1e-2 nats per step, while both keep learning to the same level. On CUDA the default is bf16
parameters (AdamW on them), where the drift starts earlier.

Usage:
  SWITCHYARD_TORCH_LIB=build/bindings/torch/_switchyard_torch.so PYTHONPATH=python \\
      python3 examples/finetune_hf_moe.py                       # CPU, mixtral, 300 steps, well under a minute
  ... --family deepseek_v3 --device cuda --steps 300 --hidden 512 --ffn 256 --experts 16
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import torch

import switchyard.torch as sy

try:
    import transformers
except ImportError:  # pragma: no cover
    sys.exit("finetune_hf_moe.py needs transformers (pip install transformers; scripts/setup.sh pins the version)")


def build_model(family: str, vocab: int, hidden: int, ffn: int, experts: int, top_k: int, layers: int):
    """A small random CausalLM of the family, from a config object."""
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False, num_experts_per_tok=top_k)
    mla = dict(num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
               qk_nope_head_dim=hidden // 8, v_head_dim=hidden // 8, head_dim=8, first_k_dense_replace=1,
               num_hidden_layers=layers + 1, intermediate_size=2 * ffn, moe_intermediate_size=ffn,
               n_routed_experts=experts)
    table = {
        "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                    dict(intermediate_size=ffn, num_local_experts=experts, router_aux_loss_coef=0.01)),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                      dict(intermediate_size=2 * ffn, moe_intermediate_size=ffn, shared_expert_intermediate_size=ffn,
                           num_experts=experts, router_aux_loss_coef=0.01)),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      dict(intermediate_size=2 * ffn, moe_intermediate_size=ffn, num_experts=experts,
                           norm_topk_prob=True, head_dim=hidden // 4, router_aux_loss_coef=0.01)),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
                  dict(intermediate_size=ffn, num_experts=experts, router_aux_loss_coef=0.01)),
        "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                        dict(mla, n_shared_experts=1, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                             routed_scaling_factor=1.0)),
        "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                        dict(mla, n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                             norm_topk_prob=True)),
    }
    cfg_name, model_name, kw = table[family]
    cfg = getattr(transformers, cfg_name)(**{**common, **kw})
    return getattr(transformers, model_name)(cfg)


def markov_batches(vocab: int, batch: int, seq_len: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    succ = torch.randperm(vocab, generator=g)
    for _ in range(steps):
        x = torch.empty(batch, seq_len, dtype=torch.long)
        x[:, 0] = torch.randint(vocab, (batch,), generator=g)
        for t in range(1, seq_len):
            follow = torch.rand(batch, generator=g) < 0.9
            x[:, t] = torch.where(follow, succ[x[:, t - 1]], torch.randint(vocab, (batch,), generator=g))
        yield x


def chain_entropy(vocab: int) -> float:
    p_hi, p_lo = 0.9 + 0.1 / vocab, 0.1 / vocab
    return -(p_hi * math.log(p_hi) + (vocab - 1) * p_lo * math.log(p_lo))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="mixtral",
                   choices=["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--hidden", type=int, default=None, help="default: 32 on cpu, 256 on cuda")
    p.add_argument("--ffn", type=int, default=None, help="expert width F; default hidden / 2 (H = 2F, as OLMoE)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="default: 8 on cpu, 16 on cuda")
    p.add_argument("--seq-len", type=int, default=None, help="default: 32 on cpu, 256 on cuda")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-every", type=int, default=25)
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    a.dtype = a.dtype or ("bf16" if cuda else "fp32")
    a.hidden = a.hidden or (256 if cuda else 32)
    a.ffn = a.ffn or a.hidden // 2
    a.batch = a.batch or (16 if cuda else 8)
    a.seq_len = a.seq_len or (256 if cuda else 32)
    return a


def main(argv=None):
    a = parse_args(argv)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(a.seed)
    model_hf = build_model(a.family, a.vocab, a.hidden, a.ffn, a.experts, a.top_k, a.layers)
    model_hf = model_hf.to(device=a.device, dtype=dtype).train()
    model_sy = copy.deepcopy(model_hf)
    replaced = sy.patch_model(model_sy)  # <- the one line
    aux = getattr(model_hf.config, "router_aux_loss_coef", None) is not None
    runs = {"transformers": model_hf, "switchyard": model_sy}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=0.0) for k, m in runs.items()}
    losses = {k: [] for k in runs}
    times = {k: [] for k in runs}
    cuda = a.device.startswith("cuda")
    print(f"{a.family}: H={a.hidden} F={a.ffn} E={a.experts} k={a.top_k}, {a.layers} MoE layers, {a.dtype} on "
          f"{a.device}; patch_model replaced {replaced} blocks; aux loss {'on' if aux else 'n/a'}; "
          f"chain entropy {chain_entropy(a.vocab):.2f} nats, ln V = {math.log(a.vocab):.2f}")
    print(f"{'step':>6} {'transformers':>13} {'switchyard':>11} {'|diff|':>9}   {'smoothed: transformers':>22} "
          f"{'switchyard':>11}")
    ema = {k: None for k in runs}
    for step, x in enumerate(markov_batches(a.vocab, a.batch, a.seq_len, a.steps, a.seed + 1)):
        x = x.to(a.device)
        for name, model in runs.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            kw = dict(output_router_logits=True) if aux else {}
            loss = model(x, labels=x, **kw).loss
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            losses[name].append(loss.detach().item())
            ema[name] = losses[name][-1] if ema[name] is None else 0.9 * ema[name] + 0.1 * losses[name][-1]
        if step % a.print_every == 0 or step == a.steps - 1:
            lh, ls = losses["transformers"][-1], losses["switchyard"][-1]
            print(f"{step:>6} {lh:>13.4f} {ls:>11.4f} {abs(lh - ls):>9.2e}   {ema['transformers']:>22.4f} "
                  f"{ema['switchyard']:>11.4f}")
    diff = max(abs(p - q) for p, q in zip(losses["transformers"], losses["switchyard"]))
    tail = max(1, a.steps // 10)
    mean_tail = {k: sum(v[-tail:]) / tail for k, v in losses.items()}
    print(f"largest loss difference over {a.steps} steps: {diff:.2e}; mean loss of the last {tail} steps: "
          f"transformers {mean_tail['transformers']:.4f}, switchyard {mean_tail['switchyard']:.4f} "
          f"(first step {losses['transformers'][0]:.4f})")
    result = dict(replaced=replaced, losses_hf=losses["transformers"], losses_switchyard=losses["switchyard"],
                  max_abs_diff=diff)
    skip = min(5, a.steps - 1)  # first steps include warm-up
    t_hf = sum(times["transformers"][skip:]) / max(1, a.steps - skip)
    t_sy = sum(times["switchyard"][skip:]) / max(1, a.steps - skip)
    result.update(step_s_hf=t_hf, step_s_switchyard=t_sy)
    if cuda:
        print(f"step time: transformers {t_hf * 1e3:.2f} ms, switchyard {t_sy * 1e3:.2f} ms, "
              f"ratio switchyard / transformers = {t_sy / t_hf:.2f} ({torch.cuda.get_device_name()})")
    else:
        print(f"step time (CPU reference, not a performance number): transformers {t_hf * 1e3:.1f} ms, "
              f"switchyard {t_sy * 1e3:.1f} ms")
    return result


if __name__ == "__main__":
    main()
