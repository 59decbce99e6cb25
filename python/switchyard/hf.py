"""switchyard.hf: Hugging Face transformers sparse-MoE blocks as switchyard.torch.MoE modules.

    import switchyard.torch as sy
    n = sy.patch_model(model)          # every supported MoE block of a transformers model, in place
    model.generate(...), model(...).loss.backward(), torch.compile(model) work as before

Each supported block is converted from its class and the options its forward reads (written against transformers
5.17, the version scripts/setup.sh pins; transformers itself is imported only for its output-capturing hook):

| block class              | routing (what the block's forward does)                                                    |
| ------------------------ | ------------------------------------------------------------------------------------------ |
| MixtralSparseMoeBlock    | softmax over E, top-k, always renormalised; router GEMM in the input dtype; jitter in      |
|                          | training (router_jitter_noise)                                                             |
| Qwen2MoeSparseMoeBlock   | softmax, top-k, renormalised iff norm_topk_prob; shared expert scaled by                   |
|                          | sigmoid(shared_expert_gate(x)) (MoEConfig.shared_expert_gate)                              |
| Qwen3MoeSparseMoeBlock   | softmax, top-k, renormalised iff norm_topk_prob                                            |
| OlmoeSparseMoeBlock      | softmax, top-k, renormalised iff norm_topk_prob                                            |
| DeepseekV2Moe            | softmax (fp32 GEMM), topk_method greedy or group_limited_greedy (group score = the group's |
|                          | best score: MoEConfig.group_score="max"), never renormalised (transformers' V2 router      |
|                          | ignores norm_topk_prob), times routed_scaling_factor; shared experts                       |
| DeepseekV3MoE            | sigmoid (fp32 GEMM) + e_score_correction_bias for selection, n_group/topk_group with the   |
|                          | sum of the two best biased scores per group (the library's rule), renormalised iff         |
|                          | norm_topk_prob, times routed_scaling_factor; shared experts                                |

Options are read from the block's router first (transformers 5 routers hold top_k, norm_topk_prob,
routed_scaling_factor, n_group, topk_group, topk_method, which their forward uses), then the block, then the
config. Expert weights: fused ``gate_up_proj`` / ``down_proj`` parameters laid out as transformers' experts
decorator says (``is_transposed``, ``is_concatenated``, ``has_bias``; [E, 2F, H] / [E, H, F] when absent), or
per-expert nn.Linear modules (w1/w3/w2 or gate_proj/up_proj/down_proj, transformers 4.x); the sizes come from
the experts module's attributes (num_experts, hidden_dim, intermediate_dim) or the Linear modules, and a tensor
whose shape disagrees with them is refused, never transposed on a guess.

FP8 blocks (transformers' fine-grained FP8, quantization_config quant_method "fp8" with weight_block_size
[128, 128], e.g. DeepSeek-V3 / Qwen3-*-FP8 checkpoints): the experts module (FP8Experts) holds float8_e4m3fn
``gate_up_proj`` / ``down_proj`` with fp32 ``gate_up_proj_scale_inv`` [E, B(2F), B(H)] / ``down_proj_scale_inv``
[E, B(H), B(F)] (B(n) = ceil(n / 128)), and nn.Linear projections become FP8Linear (``weight`` float8_e4m3fn,
``weight_scale_inv`` [B(out), B(in)]). Such blocks convert to an FP8 MoE (quant_mode "fp8-block", inference only)
holding the same codes and scales: w13's scales are gate's blocks stacked over up's, as switchyard's safetensors
loader stacks them (tools/switchyard/io/weights.cpp), which needs F % 128 == 0 for gated experts (and S % 128 == 0
for an FP8 shared expert). Refused with UnsupportedBlock: other block sizes and per-tensor FP8 (block_size None),
static activation scales, an FP8 router or shared-expert gate, FP8 and float routed experts mixed, an FP8 shared
expert beside float routed experts. A float shared expert beside FP8 routed experts stays float.
"""
from __future__ import annotations

import re
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from switchyard.torch import MoE, MoEConfig

__all__ = ["HFMoE", "UnsupportedBlock", "FAMILIES", "convert_block", "patch_model", "hf_state_dict"]


class UnsupportedBlock(ValueError):
    """A block (or a configuration of a supported block) that Switchyard cannot reproduce exactly."""


# Exact class names (transformers' modeling files) -> family.
FAMILIES = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "OlmoeSparseMoeBlock": "olmoe",
    "DeepseekV2Moe": "deepseek_v2",
    "DeepseekV2MoE": "deepseek_v2",
    "DeepseekV3MoE": "deepseek_v3",
}

_SWIGLU_ACTS = {"silu", "swish"}
_GEGLU_ACTS = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast"}  # all gelu(x) = 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))
_ACT_CLASSES = {"SiLU": "swiglu", "SiLUActivation": "swiglu", "GELUTanh": "geglu", "PytorchGELUTanh": "geglu",
                "NewGELUActivation": "geglu", "FastGELUActivation": "geglu"}


class _RouterLogits(nn.Identity):
    """Identity on the router logits [T, E] (in the dtype the block's router produced them): the point where
    transformers' output-capturing hook records ``router_logits`` (output_router_logits=True, the aux loss)."""


class HFMoE(MoE):
    """A :class:`switchyard.torch.MoE` converted from a transformers sparse-MoE block.

    With ``mimic_block`` (what :func:`patch_model` builds) forward takes the block's input and returns exactly what
    the block returned (the tensor of the input's shape, or (y, router_logits) for blocks that return both);
    without it (:meth:`MoE.from_hf`) the MoE calling convention holds. The routing variants a block needs and the
    library does not have are here: the router GEMM rounded in the input dtype as transformers' Mixtral / Qwen /
    OLMoE routers do (``logits_in_input_dtype``) and Mixtral's training jitter (``jitter_noise``).
    ``hf_state_dict()`` gives the tensors back under the block's own names and layout.
    """

    def __init__(self, config: MoEConfig, dtype: torch.dtype = torch.float32, device=None, *, family: str = "",
                 logits_in_input_dtype: bool = False, jitter_noise: float = 0.0, mimic_block: bool = True,
                 returns_router_logits: bool = False, hf_layout: Optional[dict] = None):
        super().__init__(config, dtype=dtype, device=device)
        self.family = family
        self.logits_in_input_dtype = bool(logits_in_input_dtype)
        self.jitter_noise = float(jitter_noise)
        self.mimic_block = bool(mimic_block)
        self.returns_router_logits = bool(returns_router_logits)
        self.hf_layout = dict(hf_layout or {})
        self.router_logits_probe = _RouterLogits()

    def extra_repr(self) -> str:
        c = self.config
        return (f"family={self.family}, H={c.hidden_size}, F={c.ffn_size}, E={c.num_experts}, k={c.top_k}, "
                f"score={c.score_function}, groups={c.num_groups}/{c.topk_groups} ({c.group_score}), "
                f"shared={c.shared_width}{' gated' if c.shared_expert_gate else ''}")

    def _router_logits(self, x2: torch.Tensor) -> torch.Tensor:
        if self.logits_in_input_dtype and x2.dtype != torch.float64:
            raw = F.linear(x2, self.gate)
        else:
            raw = super()._router_logits(x2)
        raw = self.router_logits_probe(raw)
        return raw if raw.dtype in (torch.float32, torch.float64) else raw.float()

    def forward(self, hidden_states: torch.Tensor):
        if not self.mimic_block:
            return super().forward(hidden_states)
        x = hidden_states
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x2 = x.reshape(-1, self.config.hidden_size).contiguous()
        y, logits, _ids, _offsets, _counts = self._layer(x2)
        y = y.reshape(hidden_states.shape)
        if self.returns_router_logits:
            return y, logits.to(hidden_states.dtype)  # the router's own values (fp32 holds them exactly)
        return y

    # ---- back to the block's names and layout ----------------------------------------------------------------

    def hf_state_dict(self, grads: bool = False) -> Dict[str, Optional[torch.Tensor]]:
        """{name in the original block: tensor in its layout}: the parameters (views where the layout is the
        same), or with ``grads`` their gradients (None where there is none); buffers only without ``grads``."""
        def val(t):
            if t is None:
                return None
            if grads:
                return None if t.grad is None else t.grad
            return t.detach()

        lay = self.hf_layout
        c = self.config
        out: Dict[str, Optional[torch.Tensor]] = {lay.get("gate", "gate.weight"): val(self.gate)}
        w13, w2 = val(self.w13), val(self.w2)
        f = c.ffn_size
        bf = -(-f // 128)  # FP8 (block-scaled, F % 128 == 0): the first bf scale rows of w13 are gate's
        s13 = None if grads or self.w13_scale is None else self.w13_scale.detach()
        s2 = None if grads or self.w2_scale is None else self.w2_scale.detach()
        if lay.get("experts") == "per_expert":
            g_name, u_name, d_name = lay["names"]
            for e in range(c.num_experts):
                out[f"experts.{e}.{g_name}.weight"] = None if w13 is None else w13[e, :f]
                out[f"experts.{e}.{u_name}.weight"] = None if w13 is None else w13[e, f:]
                out[f"experts.{e}.{d_name}.weight"] = None if w2 is None else w2[e]
                if s13 is not None:
                    out[f"experts.{e}.{g_name}.weight_scale_inv"] = s13[e, :bf]
                    out[f"experts.{e}.{u_name}.weight_scale_inv"] = s13[e, bf:]
                    out[f"experts.{e}.{d_name}.weight_scale_inv"] = s2[e]
        else:
            if w13 is not None and not lay.get("is_concatenated", True):  # back to gate0, up0, gate1, up1, ...
                w13 = torch.stack([w13[:, :f], w13[:, f:]], 2).reshape(w13.shape)
            if lay.get("is_transposed", False):
                w13 = None if w13 is None else w13.transpose(1, 2)
                w2 = None if w2 is None else w2.transpose(1, 2)
            out["experts.gate_up_proj"] = w13
            out["experts.down_proj"] = w2
            if s13 is not None:
                out["experts.gate_up_proj_scale_inv"] = s13
                out["experts.down_proj_scale_inv"] = s2
        if self.score_bias is not None and not grads:
            out[lay.get("score_bias", "gate.e_score_correction_bias")] = self.score_bias.detach()
        if self.shared_w13 is not None:
            prefix = lay.get("shared", "shared_experts")
            s13, s2 = val(self.shared_w13), val(self.shared_w2)
            s = c.shared_width
            out[f"{prefix}.gate_proj.weight"] = None if s13 is None else s13[:s]
            out[f"{prefix}.up_proj.weight"] = None if s13 is None else s13[s:]
            out[f"{prefix}.down_proj.weight"] = s2
            if not grads and self.shared_w13_scale is not None:
                bs = -(-s // 128)
                out[f"{prefix}.gate_proj.weight_scale_inv"] = self.shared_w13_scale[:bs]
                out[f"{prefix}.up_proj.weight_scale_inv"] = self.shared_w13_scale[bs:]
                out[f"{prefix}.down_proj.weight_scale_inv"] = self.shared_w2_scale
        if self.shared_gate is not None:
            out[lay.get("shared_gate", "shared_expert_gate.weight")] = val(self.shared_gate)
        return out


# ---- reading a block ------------------------------------------------------------------------------------------


def _router_of(block):
    for name in ("gate", "router"):
        r = getattr(block, name, None)
        if isinstance(r, nn.Module) and isinstance(getattr(r, "weight", None), torch.Tensor):
            return name, r
    raise UnsupportedBlock(f"{type(block).__name__}: no router module with a weight (gate / router)")


class _Options:
    """Looks an option up in the router, the block, the configs (block, experts, model), in that order."""

    def __init__(self, block, router, hf_config):
        experts = getattr(block, "experts", None)
        self.sources = [router, block]
        for src in (getattr(block, "config", None), getattr(experts, "config", None), hf_config):
            if src is not None:
                self.sources.append(src)

    def get(self, *names, default=None):
        for src in self.sources:
            for n in names:
                v = getattr(src, n, None)
                if v is not None:
                    return v
        return default

    def config_get(self, *names, default=None):  # configs only (not the modules)
        for src in self.sources[2:]:
            for n in names:
                v = getattr(src, n, None)
                if v is not None:
                    return v
        return default


def _activation(opts: _Options, experts) -> str:
    act = opts.config_get("hidden_act")
    if isinstance(act, str):
        if act in _SWIGLU_ACTS:
            return "swiglu"
        if act in _GEGLU_ACTS:
            return "geglu"
        raise UnsupportedBlock(f"hidden_act={act!r} (Switchyard runs silu / swish as SwiGLU and gelu_pytorch_tanh "
                               "/ gelu_new as GeGLU)")
    fn = getattr(experts, "act_fn", None)
    if fn is None and isinstance(experts, (nn.ModuleList, list)) and len(experts):
        fn = getattr(experts[0], "act_fn", None)
    name = type(fn).__name__ if fn is not None else None
    if name in _ACT_CLASSES:
        return _ACT_CLASSES[name]
    raise UnsupportedBlock(f"cannot tell the expert activation (hidden_act missing, act_fn {name})")


def _linear_weight(mod, names):
    for n in names:
        lin = getattr(mod, n, None)
        if isinstance(lin, nn.Linear):
            if lin.bias is not None:
                raise UnsupportedBlock(f"expert projection {n} has a bias")
            return n, lin.weight
    raise UnsupportedBlock(f"expert {type(mod).__name__} has none of {names} as nn.Linear")


_FP8 = torch.float8_e4m3fn
_BLOCK = 128


def _blocks(n: int) -> int:
    return -(-n // _BLOCK)


def _check_fp8_block_size(owner, what: str):
    """Refuses anything but 128x128 dynamic block scales (the one FP8 scheme from_hf reads)."""
    bs = getattr(owner, "block_size", None)
    if bs is None or tuple(bs) != (_BLOCK, _BLOCK):
        raise UnsupportedBlock(f"{what}: FP8 with block_size={bs} (Switchyard reads fine-grained FP8 with "
                               "weight_block_size [128, 128] only)")
    if getattr(owner, "activation_scheme", "dynamic") != "dynamic":
        raise UnsupportedBlock(f"{what}: FP8 activation_scheme={owner.activation_scheme!r} (block-scaled FP8 runs "
                               "with dynamic activation scales only)")


def _fp8_gated_rows(f: int, what: str):
    if f % _BLOCK:
        raise UnsupportedBlock(f"{what}: block-scaled FP8 with a gated activation needs a width that is a multiple "
                               f"of 128, got {f} (the fused [gate; up] matrix would put rows of both in one 128x128 "
                               "scale block)")


def _linear_fp8(lin, name: str, rows: int, cols: int):
    """(codes, scale_inv) of an FP8Linear-like module, or None for a float nn.Linear."""
    w = lin.weight
    if w.dtype != _FP8:
        return None
    _check_fp8_block_size(lin, name)
    s = getattr(lin, "weight_scale_inv", None)
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != (_blocks(rows), _blocks(cols)):
        raise UnsupportedBlock(f"{name}: FP8 weight {tuple(w.shape)} needs weight_scale_inv of shape "
                               f"{(_blocks(rows), _blocks(cols))}, got {None if s is None else tuple(s.shape)}")
    return w.detach(), s.detach()


def _expert_weights(experts, num_experts: int, hidden: int, ffn_hint: Optional[int]):
    """(w13 [E, 2F, H], w2 [E, H, F], layout dict, originals to take requires_grad from, fp8) with fp8 None for
    float experts, else {"w13_scale": [E, B(2F), B(H)], "w2_scale": [E, B(H), B(F)]} (w13 / w2 are then the codes)."""
    if isinstance(experts, (nn.ModuleList, list, tuple)):  # transformers 4.x: one MLP module per expert
        if len(experts) != num_experts:
            raise UnsupportedBlock(f"{len(experts)} expert modules for a router of {num_experts} experts")
        g_name, _ = _linear_weight(experts[0], ("w1", "gate_proj"))
        u_name, _ = _linear_weight(experts[0], ("w3", "up_proj"))
        d_name, _ = _linear_weight(experts[0], ("w2", "down_proj"))
        gs, us, ds = [], [], []
        for e in experts:
            gs.append(_linear_weight(e, (g_name,))[1])
            us.append(_linear_weight(e, (u_name,))[1])
            ds.append(_linear_weight(e, (d_name,))[1])
        f = gs[0].shape[0]
        for w, shape in ((gs[0], (f, hidden)), (us[0], (f, hidden)), (ds[0], (hidden, f))):
            if tuple(w.shape) != shape:
                raise UnsupportedBlock(f"expert weight of shape {tuple(w.shape)}, expected {shape}")
        w13 = torch.stack([torch.cat([g.detach(), u.detach()], 0) for g, u in zip(gs, us)])
        w2 = torch.stack([d.detach() for d in ds])
        layout = dict(experts="per_expert", names=(g_name, u_name, d_name))
        kinds = {w.dtype == _FP8 for w in gs + us + ds}
        if kinds == {False}:
            return w13, w2, layout, (gs[0], ds[0]), None
        if len(kinds) > 1:
            raise UnsupportedBlock("FP8 and float expert projections mixed in one block")
        _fp8_gated_rows(f, "experts")
        s13, s2 = [], []
        for i, mod in enumerate(experts):
            sg = _linear_fp8(getattr(mod, g_name), f"experts.{i}.{g_name}", f, hidden)[1]
            su = _linear_fp8(getattr(mod, u_name), f"experts.{i}.{u_name}", f, hidden)[1]
            s13.append(torch.cat([sg, su], 0))
            s2.append(_linear_fp8(getattr(mod, d_name), f"experts.{i}.{d_name}", hidden, f)[1])
        return w13, w2, layout, (gs[0], ds[0]), dict(w13_scale=torch.stack(s13), w2_scale=torch.stack(s2))
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise UnsupportedBlock(f"experts module {type(experts).__name__} has neither per-expert modules nor fused "
                               "gate_up_proj / down_proj parameters")
    if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
        raise UnsupportedBlock("experts with biases")
    if not getattr(experts, "has_gate", True):
        raise UnsupportedBlock("experts without a gate projection")
    transposed = bool(getattr(experts, "is_transposed", False))
    concatenated = bool(getattr(experts, "is_concatenated", True))
    f = getattr(experts, "intermediate_dim", None) or getattr(experts, "intermediate_size", None) or ffn_hint
    h = getattr(experts, "hidden_dim", None) or getattr(experts, "hidden_size", None) or hidden
    e = getattr(experts, "num_experts", None) or num_experts
    if f is None:
        raise UnsupportedBlock("cannot tell the expert width (no intermediate_dim on the experts, none in the config)")
    if h != hidden or e != num_experts:
        raise UnsupportedBlock(f"experts (E={e}, H={h}) do not match the router (E={num_experts}, H={hidden})")
    want13, want2 = ((e, h, 2 * f), (e, f, h)) if transposed else ((e, 2 * f, h), (e, h, f))
    if tuple(gate_up.shape) != want13 or tuple(down.shape) != want2:
        raise UnsupportedBlock(f"gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} do not have "
                               f"the layout the experts class declares (is_transposed={transposed}): "
                               f"{want13} / {want2}")
    fp8 = None
    if gate_up.dtype == _FP8 or down.dtype == _FP8:
        if gate_up.dtype != down.dtype:
            raise UnsupportedBlock(f"gate_up_proj {gate_up.dtype} and down_proj {down.dtype}: FP8 and float experts "
                                   "mixed")
        if transposed or not concatenated:
            raise UnsupportedBlock("FP8 experts in a transposed or interleaved layout (transformers' FP8Experts "
                                   "hold [E, 2F, H] / [E, H, F], gate rows then up rows)")
        _check_fp8_block_size(experts, "experts")
        _fp8_gated_rows(f, "experts")
        s13 = getattr(experts, "gate_up_proj_scale_inv", None)
        s2 = getattr(experts, "down_proj_scale_inv", None)
        want13, want2 = (e, _blocks(2 * f), _blocks(h)), (e, _blocks(h), _blocks(f))
        if not isinstance(s13, torch.Tensor) or not isinstance(s2, torch.Tensor) or \
                tuple(s13.shape) != want13 or tuple(s2.shape) != want2:
            raise UnsupportedBlock(f"FP8 experts need gate_up_proj_scale_inv {want13} and down_proj_scale_inv {want2}, "
                                   f"got {None if s13 is None else tuple(s13.shape)} and "
                                   f"{None if s2 is None else tuple(s2.shape)}")
        fp8 = dict(w13_scale=s13.detach(), w2_scale=s2.detach())
    w13 = gate_up.detach()
    w2 = down.detach()
    if transposed:
        w13 = w13.transpose(1, 2)
        w2 = w2.transpose(1, 2)
    if not concatenated:  # gate0, up0, gate1, up1, ... -> gate rows then up rows
        w13 = torch.cat([w13[:, 0::2], w13[:, 1::2]], 1)
    return w13, w2, dict(experts="fused", is_transposed=transposed, is_concatenated=concatenated), (gate_up, down), fp8


def _shared_mlp(mlp, hidden: int):
    """(w13 [2S, H], w2 [H, S], S, original, fp8) of a gated MLP with gate_proj / up_proj / down_proj and no biases;
    fp8 None for float projections, else {"shared_w13_scale": [B(2S), B(H)], "shared_w2_scale": [B(H), B(S)]}."""
    gn, g = _linear_weight(mlp, ("gate_proj", "w1"))
    un, u = _linear_weight(mlp, ("up_proj", "w3"))
    dn, d = _linear_weight(mlp, ("down_proj", "w2"))
    s = g.shape[0]
    if tuple(g.shape) != (s, hidden) or tuple(u.shape) != (s, hidden) or tuple(d.shape) != (hidden, s):
        raise UnsupportedBlock("shared expert weights do not match the hidden size")
    fp8 = None
    kinds = {w.dtype == _FP8 for w in (g, u, d)}
    if len(kinds) > 1:
        raise UnsupportedBlock("FP8 and float projections mixed in the shared expert")
    if kinds == {True}:
        _fp8_gated_rows(s, "shared expert")
        sg = _linear_fp8(getattr(mlp, gn), f"shared expert {gn}", s, hidden)[1]
        su = _linear_fp8(getattr(mlp, un), f"shared expert {un}", s, hidden)[1]
        sd = _linear_fp8(getattr(mlp, dn), f"shared expert {dn}", hidden, s)[1]
        fp8 = dict(shared_w13_scale=torch.cat([sg, su], 0), shared_w2_scale=sd)
    return torch.cat([g.detach(), u.detach()], 0), d.detach(), s, g, fp8


def _routing(family: str, block, router, opts: _Options, num_experts: int) -> dict:
    """MoEConfig routing options plus the HFMoE extras, from the family's semantics."""
    top_k = opts.get("top_k", "num_experts_per_tok")
    if top_k is None:
        raise UnsupportedBlock("no top_k / num_experts_per_tok")
    r = dict(top_k=int(top_k))
    if family == "mixtral":
        r.update(score_function="softmax", renormalize=True, logits_in_input_dtype=True,
                 jitter_noise=float(opts.get("jitter_noise", "router_jitter_noise", default=0.0)))
    elif family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        r.update(score_function="softmax", renormalize=bool(opts.get("norm_topk_prob", default=False)),
                 logits_in_input_dtype=True)
    elif family == "deepseek_v2":
        method = opts.get("topk_method", default="greedy")
        r.update(score_function="softmax", renormalize=False,
                 routed_scale=float(opts.get("routed_scaling_factor", default=1.0)))
        if method == "group_limited_greedy":
            r.update(num_groups=int(opts.get("num_group", "n_group")), topk_groups=int(opts.get("topk_group")),
                     group_score="max")
        elif method != "greedy":
            raise UnsupportedBlock(f"DeepSeek-V2 topk_method={method!r} (transformers' V2 router runs greedy and "
                                   "group_limited_greedy)")
    elif family == "deepseek_v3":
        r.update(score_function="sigmoid", use_score_bias=True,
                 renormalize=bool(opts.get("norm_topk_prob", default=True)),
                 routed_scale=float(opts.get("routed_scaling_factor", default=1.0)),
                 num_groups=int(opts.get("num_group", "n_group", default=1)),
                 topk_groups=int(opts.get("topk_group", default=1)))
        if r["num_groups"] > 1 and num_experts // r["num_groups"] < 2:
            raise UnsupportedBlock("DeepSeek-V3 groups of one expert (transformers takes the top 2 of each group)")
    else:
        raise UnsupportedBlock(f"unknown family {family!r}")
    return r


_EXTRAS = ("logits_in_input_dtype", "jitter_noise")


def _family_of(module) -> Optional[str]:
    return FAMILIES.get(type(module).__name__)


def _returns_tuple(block, hidden: int, dtype, device) -> bool:
    """Whether the block's forward returns (hidden_states, router_logits) (transformers 4.x) rather than the tensor
    alone (5.x): one forward of a single zero token through the original block, in eval mode."""
    was = block.training
    try:
        block.eval()
        with torch.no_grad():
            out = block(torch.zeros(1, 1, hidden, dtype=dtype, device=device))
        return isinstance(out, tuple)
    except Exception:  # noqa: BLE001 -- a block that cannot run a zero token keeps the 5.x convention
        return False
    finally:
        block.train(was)


def convert_block(block: nn.Module, hf_config=None, dtype=None, device=None, copy: bool = True,
                  mimic_block: bool = True) -> HFMoE:
    """An :class:`HFMoE` computing what ``block`` computes. ``copy=False`` lets the module take the block's tensors
    where the layout is the same (patch_model: the block is dropped); parameters keep their requires_grad."""
    family = _family_of(block)
    if family is None:
        raise UnsupportedBlock(f"{type(block).__name__} is not a supported block ({', '.join(sorted(FAMILIES))})")
    if hf_config is not None and hasattr(hf_config, "get_text_config"):
        hf_config = hf_config.get_text_config()
    router_name, router = _router_of(block)
    gate_w = router.weight
    if gate_w.dtype == _FP8:
        raise UnsupportedBlock(f"{type(block).__name__}: an FP8 router (Switchyard never quantises the router)")
    num_experts, hidden = gate_w.shape
    opts = _Options(block, router, hf_config)
    experts = getattr(block, "experts", None)
    if experts is None:
        raise UnsupportedBlock(f"{type(block).__name__} has no experts")
    ffn_key = "intermediate_size" if family in ("mixtral", "olmoe") else "moe_intermediate_size"
    w13, w2, layout, originals, fp8 = _expert_weights(experts, num_experts, hidden, opts.config_get(ffn_key))
    routing = _routing(family, block, router, opts, num_experts)
    extras = {k: routing.pop(k) for k in _EXTRAS if k in routing}
    cfg = MoEConfig(hidden_size=hidden, ffn_size=w2.shape[2], num_experts=num_experts,
                    activation=_activation(opts, experts), quant_mode="fp8-block" if fp8 else "none", **routing)
    fp8_tensors = dict(fp8 or {})  # name -> scale of each fp8 weight
    layout["gate"] = f"{router_name}.weight"
    tensors = {"gate": (gate_w.detach(), gate_w), "w13": (w13, originals[0]), "w2": (w2, originals[1])}

    bias = getattr(router, "e_score_correction_bias", None)
    if cfg.use_score_bias:
        if bias is None:
            raise UnsupportedBlock("DeepSeek-V3 router without e_score_correction_bias")
        layout["score_bias"] = f"{router_name}.e_score_correction_bias"
    shared_name = next((n for n in ("shared_experts", "shared_expert") if isinstance(getattr(block, n, None),
                                                                                   nn.Module)), None)
    if family in ("qwen2_moe", "deepseek_v2", "deepseek_v3") and shared_name is None:
        raise UnsupportedBlock(f"{type(block).__name__} without its shared expert")
    if shared_name is not None:
        s13, s2, width, s_orig, s_fp8 = _shared_mlp(getattr(block, shared_name), hidden)
        if s_fp8 and not fp8:
            raise UnsupportedBlock("an FP8 shared expert beside float routed experts")
        fp8_tensors.update(s_fp8 or {})
        if width > 0:
            n_shared = int(opts.config_get("n_shared_experts", default=1) or 1)
            if family == "qwen2_moe" or width % n_shared:
                n_shared = 1
            cfg.num_shared_experts, cfg.shared_ffn_size = n_shared, width // n_shared
            tensors["shared_w13"] = (s13, s_orig)
            tensors["shared_w2"] = (s2, s_orig)
            layout["shared"] = shared_name
            if family == "qwen2_moe":
                sg = getattr(block, "shared_expert_gate", None)
                if not isinstance(sg, nn.Linear) or sg.bias is not None or tuple(sg.weight.shape) != (1, hidden):
                    raise UnsupportedBlock("Qwen2-MoE shared_expert_gate is not a Linear(H, 1) without bias")
                if sg.weight.dtype == _FP8:
                    raise UnsupportedBlock("an FP8 shared_expert_gate (Switchyard never quantises the router; keep "
                                           "it in modules_to_not_convert)")
                cfg.shared_expert_gate = True
                tensors["shared_gate"] = (sg.weight.detach(), sg.weight)
                layout["shared_gate"] = "shared_expert_gate.weight"
    try:
        cfg.validate()
    except ValueError as e:
        raise UnsupportedBlock(str(e)) from None

    dtype = dtype or gate_w.dtype
    device = torch.device(device) if device is not None else gate_w.device
    returns = _returns_tuple(block, hidden, gate_w.dtype, gate_w.device) if mimic_block else False
    m = HFMoE(cfg, dtype=dtype, device="meta", family=family, mimic_block=mimic_block, returns_router_logits=returns,
              hf_layout=layout, **extras)
    for name, (t, orig) in tensors.items():
        if f"{name}_scale" in fp8_tensors:  # fp8 codes and their scales: exactly as the block holds them
            try:
                m.set_fp8_weight(name, t.to(device), fp8_tensors[f"{name}_scale"].to(device))
            except ValueError as err:
                raise UnsupportedBlock(str(err)) from None
            continue
        if name.startswith(("w13", "w2", "shared_w")):  # a float weight has no scales
            setattr(m, f"{name}_scale", None)
            setattr(m, f"{name}_input_scale", None)
        new = t.to(device=device, dtype=dtype)
        if copy or new.data_ptr() == 0 or not new.is_contiguous():
            new = new.clone(memory_format=torch.contiguous_format) if (copy or not new.is_contiguous()) else new
        setattr(m, name, nn.Parameter(new, requires_grad=orig.requires_grad))
    if cfg.use_score_bias:
        m.score_bias = bias.detach().to(device=device, dtype=torch.float32).clone()
    leftover = [n for n, t in list(m.named_parameters()) + list(m.named_buffers()) if t.is_meta]
    if leftover and not gate_w.is_meta:
        raise RuntimeError(f"switchyard.hf: internal: {leftover} not converted")
    m.train(block.training)
    return m


# ---- whole models ---------------------------------------------------------------------------------------------

_MOE_NAME = re.compile(r"(MoE|Moe|MoeBlock|MoELayer|MoeLayer|SparseMoeBlock|SparseMLP|MoeMLP)$")


def _looks_like_moe(module: nn.Module) -> bool:
    name = type(module).__name__
    if name.endswith("Experts") or isinstance(module, HFMoE):
        return False
    has_experts = isinstance(getattr(module, "experts", None), nn.Module)
    has_router = any(isinstance(getattr(module, n, None), nn.Module) for n in ("gate", "router"))
    return bool(_MOE_NAME.search(name)) or (has_experts and has_router)


def _recorder_specs(model: nn.Module) -> List[Tuple[str, type, int]]:
    """(key, target class, index) of every output transformers records with a hook (PreTrainedModel's
    _can_record_outputs, for the model and its sub-models)."""
    specs = []
    for pm in model.modules():
        table = getattr(type(pm), "_can_record_outputs", None)
        if not isinstance(table, dict):
            continue
        for key, layer_specs in table.items():
            for spec in layer_specs if isinstance(layer_specs, list) else [layer_specs]:
                if isinstance(spec, type):
                    specs.append((key, spec, 0 if "hidden_states" in key else 1))
                elif isinstance(getattr(spec, "target_class", None), type):
                    specs.append((key, spec.target_class, int(getattr(spec, "index", 0) or 0)))
    return specs


def _install_recorders(new: HFMoE, block: nn.Module, specs, problems: List[str]):
    """Records router logits (and anything recorded from the block's output) from the new module where
    transformers recorded them from the old block or its router."""
    router = getattr(block, "gate", None) or getattr(block, "router", None)
    done = set()
    for key, target, index in specs:
        if key in done:
            continue
        on_block = isinstance(block, target)
        on_router = router is not None and isinstance(router, target)
        if not (on_block or on_router):
            continue
        try:
            from transformers.utils.output_capturing import install_output_capuring_hook
        except ImportError:
            problems.append(f"{key} of {type(block).__name__} (no transformers output-capturing hook to install)")
            return
        if on_block:
            install_output_capuring_hook(new, key, index)
        elif index == 0:  # the router's first output is its logits
            install_output_capuring_hook(new.router_logits_probe, key, 0)
        else:
            problems.append(f"{key} (output {index} of {type(router).__name__}) is not recorded")
            continue
        done.add(key)


def patch_model(model: nn.Module, warn: bool = True, interleave_gate_up: bool = False) -> int:
    """Replaces, in place, every supported sparse-MoE block of ``model`` (a transformers model or any module
    holding such blocks) with an :class:`HFMoE` that takes the block's input and returns what it returned, and
    returns how many blocks were replaced. The new modules own the router, expert and shared-expert parameters
    (taken over from the block: same tensors where the layout is the same, same dtype, device and
    requires_grad; the block and its other parameters are dropped), so build optimizers after patching.
    Router logits that transformers records (output_router_logits=True, the load-balancing loss) are recorded
    from the new module. Blocks that are not supported, or whose configuration is not, are left untouched and
    named in one warning. ``interleave_gate_up=True`` also stores each new module's w13 in the interleaved layout
    (:meth:`MoE.interleave_gate_up_`: GEMM1 and the gated activation in one kernel for inference) where the module
    can hold it (a gated activation, float experts, an expert width that is a multiple of 8)."""
    hf_config = getattr(model, "config", None)
    targets, skipped, covered = [], {}, []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in covered):
            continue
        if isinstance(module, HFMoE):
            covered.append(name)
        elif _family_of(module) is not None:
            targets.append((name, module))
            covered.append(name)
        elif name and _looks_like_moe(module):
            skipped.setdefault(f"{type(module).__name__} (not a supported block)", []).append(name)
            covered.append(name)
    specs = _recorder_specs(model)
    problems: List[str] = []
    count = 0
    for name, block in targets:
        try:
            new = convert_block(block, hf_config=hf_config, copy=False, mimic_block=True)
        except UnsupportedBlock as e:
            skipped.setdefault(f"{type(block).__name__} ({e})", []).append(name)
            continue
        _install_recorders(new, block, specs, problems)
        c = new.config
        if interleave_gate_up and c.gated and not new.quantized and c.ffn_size % 8 == 0:
            new.interleave_gate_up_()
        if name:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
        else:
            raise ValueError("switchyard.patch_model: the model itself is a MoE block; use MoE.from_hf(block)")
        count += 1
    if warn and (skipped or problems):
        lines = [f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''} ({len(names)})"
                 for what, names in skipped.items()]
        lines += [f"not recorded: {p}" for p in problems]
        warnings.warn("switchyard.patch_model left these modules untouched: " + "; ".join(lines), stacklevel=2)
    return count


def hf_state_dict(model: nn.Module, grads: bool = False) -> Dict[str, Optional[torch.Tensor]]:
    """The model's state under the unpatched model's names and layouts (what ``model.state_dict()`` of the
    original transformers model holds, e.g. to save a fine-tuned patched model as a checkpoint), or with ``grads``
    the gradients of its parameters under those names."""
    patched = {n: m for n, m in model.named_modules() if isinstance(m, HFMoE)}
    out: Dict[str, Optional[torch.Tensor]] = {}
    items = model.named_parameters() if grads else model.state_dict(keep_vars=False).items()
    for n, t in items:
        if any(n.startswith(p + ".") for p in patched):
            continue
        out[n] = (t.grad if grads else t)
    for p, m in patched.items():
        for n, t in m.hf_state_dict(grads=grads).items():
            out[f"{p}.{n}"] = t
    return out
