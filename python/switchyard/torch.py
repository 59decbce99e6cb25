"""switchyard.torch: the Switchyard MoE layer as a PyTorch module, with autograd.

The layer runs as a chain of torch custom ops (``torch.ops.switchyard.*``, bindings/torch/ops.cpp), each with a
fake (meta) implementation for shape inference and an autograd formula that calls its backward op:

    logits [T, E]  = F.linear(x, gate)                      fp32 (fp64 when x is fp64); plain torch GEMM
    ids, w [T, k]  = route(logits, bias)                     backward: route_backward (selection held fixed)
    offsets, slot_row, row_token, counts = plan(ids, w)       integer outputs, no gradient
    g1 [T*k, R13]  = gathered_grouped_mm(x, row_token, w13)   = grouped_mm(gather(x, row_token), w13, offsets);
                                                             backward recomputes the gather (not saved), then
                                                             grouped_mm_wgrad, grouped_mm_dgrad, gather_backward
    out [T*k, H]   = activated_grouped_mm(g1, w2)            = grouped_mm(activation(g1), w2, offsets); backward
                                                             recomputes h = activation(g1) (not saved), then
                                                             grouped_mm_wgrad, grouped_mm_dgrad, activation_backward
    shared [T, H]  = F.linear(act(F.linear(x, shared_w13)), shared_w2)   (shared experts, when configured)
    y  [T, H]      = combine(out, slot_row, w, shared)       backward: combine_backward
    aux, z         = router_losses(logits, ids)              backward: router_losses_backward

Every output shape depends only on input shapes (T*k rows always, rows past offsets[E] are zero), so the chain
traces under ``torch.compile(fullgraph=True)`` and captures in CUDA graphs. CPU tensors run the CPU reference
(double accumulation; fp64 in gives fp64 results for gradcheck), CUDA tensors the CUDA kernels.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from switchyard import torch_library_path

torch.ops.load_library(torch_library_path())
_ops = torch.ops.switchyard

SCORE_FUNCTIONS = {"softmax": 0, "topk-softmax": 1, "sigmoid": 2}
DROP_POLICIES = {"position": 0, "probability": 1}
ACTIVATIONS = {"swiglu": 0, "geglu": 1, "gelu": 2, "relu": 3}

# ---- fake (meta) implementations: shapes and dtypes only -----------------------------------------------------


@torch.library.register_fake("switchyard::route")
def _route_fake(logits, bias, top_k, score_function, renormalize, routed_scale, num_groups, topk_groups):
    t = logits.shape[0]
    return logits.new_empty((t, top_k), dtype=torch.int32), logits.new_empty((t, top_k))


@torch.library.register_fake("switchyard::route_backward")
def _route_backward_fake(logits, topk_ids, d_weights, score_function, renormalize, routed_scale):
    return torch.empty_like(logits)


@torch.library.register_fake("switchyard::router_losses")
def _router_losses_fake(logits, topk_ids, score_function):
    return logits.new_empty((2,))


@torch.library.register_fake("switchyard::router_losses_backward")
def _router_losses_backward_fake(logits, topk_ids, d_losses, score_function):
    return torch.empty_like(logits)


@torch.library.register_fake("switchyard::plan")
def _plan_fake(topk_ids, topk_weights, num_experts, capacity_factor, min_capacity, drop_policy):
    t, k = topk_ids.shape
    i32 = dict(dtype=torch.int32)
    return (topk_ids.new_empty((num_experts + 1,), **i32), topk_ids.new_empty((t, k), **i32),
            topk_ids.new_empty((t * k,), **i32), topk_ids.new_empty((num_experts,), **i32))


@torch.library.register_fake("switchyard::gather")
def _gather_fake(x, row_token):
    return x.new_empty((row_token.shape[0], x.shape[1]))


@torch.library.register_fake("switchyard::gather_backward")
def _gather_backward_fake(d_xp, slot_row):
    return d_xp.new_empty((slot_row.shape[0], d_xp.shape[1]))


@torch.library.register_fake("switchyard::grouped_mm")
def _grouped_mm_fake(a, b, offsets):
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.register_fake("switchyard::grouped_mm_backward")
def _grouped_mm_backward_fake(dc, a, b, offsets):
    return torch.empty_like(a), torch.empty_like(b)


@torch.library.register_fake("switchyard::grouped_mm_dgrad")
def _grouped_mm_dgrad_fake(dc, b, offsets):
    return b.new_empty((dc.shape[0], b.shape[2]))


@torch.library.register_fake("switchyard::grouped_mm_wgrad")
def _grouped_mm_wgrad_fake(dc, a, offsets):
    return a.new_empty((offsets.shape[0] - 1, dc.shape[1], a.shape[1]))


@torch.library.register_fake("switchyard::activation")
def _activation_fake(g, activation):
    gated = activation in (0, 1)
    return g.new_empty((g.shape[0], g.shape[1] // 2 if gated else g.shape[1]))


@torch.library.register_fake("switchyard::activation_backward")
def _activation_backward_fake(g, dh, activation):
    return torch.empty_like(g)


@torch.library.register_fake("switchyard::combine")
def _combine_fake(expert_out, slot_row, weights, shared):
    return expert_out.new_empty((slot_row.shape[0], expert_out.shape[1]))


@torch.library.register_fake("switchyard::combine_backward")
def _combine_backward_fake(dy, expert_out, slot_row, weights):
    return torch.empty_like(expert_out), torch.empty_like(weights)


# ---- autograd ----------------------------------------------------------------------------------------------


def _route_setup(ctx, inputs, output):
    logits, _bias, _k, score_function, renormalize, routed_scale, _g, _tg = inputs
    ctx.save_for_backward(logits, output[0])
    ctx.cfg = (score_function, renormalize, routed_scale)


def _route_backward(ctx, d_ids, d_weights):
    logits, ids = ctx.saved_tensors
    if d_weights is None:
        return (None,) * 8
    d_logits = _ops.route_backward(logits, ids, d_weights.contiguous(), *ctx.cfg)
    return d_logits, None, None, None, None, None, None, None


torch.library.register_autograd("switchyard::route", _route_backward, setup_context=_route_setup)


def _losses_setup(ctx, inputs, output):
    logits, ids, score_function = inputs
    ctx.save_for_backward(logits, ids)
    ctx.score_function = score_function


def _losses_backward(ctx, d_losses):
    logits, ids = ctx.saved_tensors
    return _ops.router_losses_backward(logits, ids, d_losses.contiguous(), ctx.score_function), None, None


torch.library.register_autograd("switchyard::router_losses", _losses_backward, setup_context=_losses_setup)


def _gmm_setup(ctx, inputs, output):
    a, b, offsets = inputs
    ctx.save_for_backward(a, b, offsets)


def _gmm_backward(ctx, dc):
    a, b, offsets = ctx.saved_tensors
    da, db = _ops.grouped_mm_backward(dc.contiguous(), a, b, offsets)
    return da, db, None


torch.library.register_autograd("switchyard::grouped_mm", _gmm_backward, setup_context=_gmm_setup)


def _act_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.activation = inputs[1]


def _act_backward(ctx, dh):
    (g,) = ctx.saved_tensors
    return _ops.activation_backward(g, dh.contiguous(), ctx.activation), None


torch.library.register_autograd("switchyard::activation", _act_backward, setup_context=_act_setup)


def _combine_setup(ctx, inputs, output):
    expert_out, slot_row, weights, shared = inputs
    ctx.save_for_backward(expert_out, slot_row, weights)
    ctx.has_shared = shared is not None
    ctx.shared_dtype = shared.dtype if shared is not None else None


def _combine_backward(ctx, dy):
    expert_out, slot_row, weights = ctx.saved_tensors
    dy = dy.contiguous()
    d_out, d_w = _ops.combine_backward(dy, expert_out, slot_row, weights)
    d_shared = dy.to(ctx.shared_dtype) if ctx.has_shared else None
    return d_out, None, d_w, d_shared


torch.library.register_autograd("switchyard::combine", _combine_backward, setup_context=_combine_setup)

# gather + GEMM1 as one differentiable op whose backward recomputes the gathered rows from x instead of saving them:
# the saved activations per routed row drop from (H + 2F + F + H) to (2F + F + H) elements, the [T*k, H] gather
# being the largest single saving (1.9 GB of bf16 for DeepSeek-V3 at T=16384). x itself is saved, at no cost:
# it is the layer's input and alive anyway.
@torch.library.custom_op("switchyard::gathered_grouped_mm", mutates_args=())
def _gathered_grouped_mm(x: torch.Tensor, row_token: torch.Tensor, slot_row: torch.Tensor, b: torch.Tensor,
                         offsets: torch.Tensor) -> torch.Tensor:
    return _ops.grouped_mm(_ops.gather(x, row_token), b, offsets)


@_gathered_grouped_mm.register_fake
def _gathered_grouped_mm_fake(x, row_token, slot_row, b, offsets):
    return x.new_empty((row_token.shape[0], b.shape[1]))


def _ggmm_setup(ctx, inputs, output):
    x, row_token, slot_row, b, offsets = inputs
    ctx.save_for_backward(x, row_token, slot_row, b, offsets)


def _ggmm_backward(ctx, dc):
    x, row_token, slot_row, b, offsets = ctx.saved_tensors
    dc = dc.contiguous()
    dx = db = None
    # Weight gradient first, so that the recomputed rows are freed before the input gradient d_xp [T*k, H] is
    # allocated: the two never coexist, which lowers the backward's peak by T*k*H elements. A gradient nobody
    # needs (frozen experts, an input without grad) is not computed.
    if ctx.needs_input_grad[3]:
        xp = _ops.gather(x, row_token)  # recomputed: one pass over T*k rows of x
        db = _ops.grouped_mm_wgrad(dc, xp, offsets)
        del xp
    if ctx.needs_input_grad[0]:
        dx = _ops.gather_backward(_ops.grouped_mm_dgrad(dc, b, offsets), slot_row)
    return dx, None, None, db, None


_gathered_grouped_mm.register_autograd(_ggmm_backward, setup_context=_ggmm_setup)


# activation + GEMM2 as one differentiable op whose backward recomputes h = act(g) from the saved GEMM1 output g
# instead of saving h as well: T*k*F fewer saved elements (0.54 GB of bf16 for DeepSeek-V3 at T=16384, 0.94 GB for
# Mixtral), for one extra elementwise pass over g in the backward.
@torch.library.custom_op("switchyard::activated_grouped_mm", mutates_args=())
def _activated_grouped_mm(g: torch.Tensor, activation: int, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _ops.grouped_mm(_ops.activation(g, activation), b, offsets)


@_activated_grouped_mm.register_fake
def _activated_grouped_mm_fake(g, activation, b, offsets):
    return g.new_empty((g.shape[0], b.shape[1]))


def _agmm_setup(ctx, inputs, output):
    g, activation, b, offsets = inputs
    ctx.save_for_backward(g, b, offsets)
    ctx.activation = activation


def _agmm_backward(ctx, dc):
    g, b, offsets = ctx.saved_tensors
    dc = dc.contiguous()
    dg = db = None
    if ctx.needs_input_grad[2]:
        h = _ops.activation(g, ctx.activation)  # recomputed
        db = _ops.grouped_mm_wgrad(dc, h, offsets)  # first, so that h is freed before dh is allocated
        del h
    if ctx.needs_input_grad[0]:
        dg = _ops.activation_backward(g, _ops.grouped_mm_dgrad(dc, b, offsets), ctx.activation)
    return dg, None, db, None


_activated_grouped_mm.register_autograd(_agmm_backward, setup_context=_agmm_setup)

# ---- the module --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MoEConfig:
    """Every option of switchyard::MoEConfig (include/switchyard/config.h), with the same meaning."""
    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int
    score_function: str = "softmax"  # softmax | topk-softmax | sigmoid
    renormalize: bool = False
    routed_scale: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    use_score_bias: bool = False
    capacity_factor: float = 0.0  # 0 = dropless
    min_capacity: int = 0
    drop_policy: str = "position"  # position | probability
    activation: str = "swiglu"  # swiglu | geglu | gelu | relu
    num_shared_experts: int = 0
    shared_ffn_size: int = 0
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0

    def validate(self):
        for name, table in (("score_function", SCORE_FUNCTIONS), ("drop_policy", DROP_POLICIES),
                            ("activation", ACTIVATIONS)):
            if getattr(self, name) not in table:
                raise ValueError(f"switchyard: {name}={getattr(self, name)!r}, expected one of {sorted(table)}")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"switchyard: top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.num_groups < 1 or self.num_experts % self.num_groups != 0:
            raise ValueError(f"switchyard: num_groups={self.num_groups} must divide num_experts={self.num_experts}")

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def shared_width(self) -> int:
        return self.num_shared_experts * self.shared_ffn_size


@dataclasses.dataclass
class MoEOutput:
    """y [T, H]; in training also the weighted auxiliary loss (aux_loss_coef * aux + z_loss_coef * z, a scalar
    tensor to add to the model loss), the two losses, and the per-expert routed counts (before drops)."""
    y: torch.Tensor
    aux_loss: Optional[torch.Tensor] = None
    z_loss: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    expert_counts: Optional[torch.Tensor] = None
    kept_counts: Optional[torch.Tensor] = None


class MoE(nn.Module):
    """A Mixture-of-Experts layer with parameters in Hugging Face layout.

    Parameters: ``gate`` [E, H] (router, nn.Linear layout); ``score_bias`` [E] (buffer, selection only, when
    use_score_bias); ``w13`` [E, 2F, H] (gate_proj rows then up_proj rows; [E, F, H] for ungated activations);
    ``w2`` [E, H, F] (down_proj); ``shared_w13`` [2S, H] / [S, H] and ``shared_w2`` [H, S] with
    S = num_shared_experts * shared_ffn_size.

    forward(x [..., H]) returns ``y`` of x's shape in eval mode, and a :class:`MoEOutput` in training (y, losses,
    load statistics) unless ``return_stats`` says otherwise.
    """

    def __init__(self, config: MoEConfig, dtype: torch.dtype = torch.float32, device=None, return_stats=None):
        super().__init__()
        config.validate()
        self.config = config
        self.return_stats = return_stats
        c = config
        r13 = 2 * c.ffn_size if c.gated else c.ffn_size
        kw = dict(dtype=dtype, device=device)
        self.gate = nn.Parameter(torch.empty(c.num_experts, c.hidden_size, **kw))
        self.w13 = nn.Parameter(torch.empty(c.num_experts, r13, c.hidden_size, **kw))
        self.w2 = nn.Parameter(torch.empty(c.num_experts, c.hidden_size, c.ffn_size, **kw))
        if c.use_score_bias:
            self.register_buffer("score_bias", torch.zeros(c.num_experts, dtype=torch.float32, device=device))
        else:
            self.score_bias = None
        if c.shared_width > 0:
            s = c.shared_width
            self.shared_w13 = nn.Parameter(torch.empty(2 * s if c.gated else s, c.hidden_size, **kw))
            self.shared_w2 = nn.Parameter(torch.empty(c.hidden_size, s, **kw))
        else:
            self.shared_w13 = None
            self.shared_w2 = None
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            for p in self.parameters():
                nn.init.normal_(p, std=p.shape[-1] ** -0.5)

    # The routed experts, the shared expert and the combine; returns (y, logits, ids, plan).
    def _layer(self, x2: torch.Tensor):
        c = self.config
        logit_dtype = torch.float64 if x2.dtype == torch.float64 else torch.float32
        logits = F.linear(x2.to(logit_dtype), self.gate.to(logit_dtype))
        ids, w = _ops.route(logits, self.score_bias, c.top_k, SCORE_FUNCTIONS[c.score_function], c.renormalize,
                            float(c.routed_scale), c.num_groups, c.topk_groups)
        offsets, slot_row, row_token, counts = _ops.plan(ids, w.detach(), c.num_experts, float(c.capacity_factor),
                                                         c.min_capacity, DROP_POLICIES[c.drop_policy])
        act = ACTIVATIONS[c.activation]
        g = _gathered_grouped_mm(x2, row_token, slot_row, self.w13, offsets)
        out = _activated_grouped_mm(g, act, self.w2, offsets)
        shared = None
        if self.shared_w13 is not None:
            shared = F.linear(_ops.activation(F.linear(x2, self.shared_w13), act), self.shared_w2)
        y = _ops.combine(out, slot_row, w, shared)
        return y, logits, ids, offsets, counts

    def forward(self, x: torch.Tensor):
        c = self.config
        shape = x.shape
        x2 = x.reshape(-1, c.hidden_size).contiguous()
        y, logits, ids, offsets, counts = self._layer(x2)
        y = y.reshape(shape)
        want_stats = self.training if self.return_stats is None else self.return_stats
        if not want_stats:
            return y
        losses = _ops.router_losses(logits, ids, SCORE_FUNCTIONS[c.score_function])
        aux, z = losses[0], losses[1]
        return MoEOutput(y=y, aux_loss=aux, z_loss=z, loss=c.aux_loss_coef * aux + c.z_loss_coef * z,
                         expert_counts=counts, kept_counts=offsets[1:] - offsets[:-1])

    # ---- conversion from transformers MoE blocks ------------------------------------------------------------

    @classmethod
    def from_hf(cls, block: nn.Module, hf_config=None, dtype=None, device=None) -> "MoE":
        """Builds a MoE from a transformers Mixtral / Qwen3-MoE / DeepSeek-V3 sparse MoE block.

        Weights are COPIED: the per-expert nn.Linear weights (w1/w3/w2, or gate_proj/up_proj/down_proj) are stacked
        into w13 [E, 2F, H] and w2 [E, H, F] (newer transformers versions that already hold fused
        ``gate_up_proj`` [E, 2F, H] / ``down_proj`` [E, H, F] parameters are copied as they are). Later changes to
        the block do not reach the MoE, and the other way round. Routing options come from the block's attributes
        or from ``hf_config`` (Mixtral: softmax, renormalised top-k; Qwen3-MoE: softmax, renormalised when
        norm_topk_prob; DeepSeek-V3: sigmoid with e_score_correction_bias, groups, renormalisation, routed scale,
        shared experts).
        """
        cfg_src = hf_config if hf_config is not None else getattr(block, "config", None)

        def opt(name, default=None):
            for src in (block, getattr(block, "gate", None), cfg_src):
                if src is not None and hasattr(src, name):
                    return getattr(src, name)
            return default

        gate_mod = block.gate
        gate_w = gate_mod.weight if hasattr(gate_mod, "weight") else gate_mod
        num_experts, hidden = gate_w.shape
        experts = block.experts
        if hasattr(experts, "gate_up_proj"):  # fused layout
            w13 = experts.gate_up_proj.detach()
            w2 = experts.down_proj.detach()
            if w13.shape[1] == hidden:  # stored [E, H, 2F]: transpose into nn.Linear layout
                w13 = w13.transpose(1, 2)
            if w2.shape[1] != hidden:
                w2 = w2.transpose(1, 2)
        else:
            def lin(e, *names):
                for n in names:
                    if hasattr(e, n):
                        return getattr(e, n).weight.detach()
                raise AttributeError(f"switchyard.from_hf: expert has none of {names}")
            w13 = torch.stack([torch.cat([lin(e, "w1", "gate_proj"), lin(e, "w3", "up_proj")], 0) for e in experts])
            w2 = torch.stack([lin(e, "w2", "down_proj") for e in experts])
        ffn = w2.shape[2]
        bias = getattr(gate_mod, "e_score_correction_bias", None)
        is_deepseek = bias is not None or opt("n_group") is not None
        top_k = opt("top_k", None) or opt("num_experts_per_tok")
        shared = getattr(block, "shared_experts", None)
        c = MoEConfig(hidden_size=hidden, ffn_size=ffn, num_experts=num_experts, top_k=int(top_k))
        if is_deepseek:
            c.score_function = "sigmoid"
            c.use_score_bias = bias is not None
            c.num_groups = int(opt("n_group", 1))
            c.topk_groups = int(opt("topk_group", 1))
            c.renormalize = bool(opt("norm_topk_prob", True))
            c.routed_scale = float(opt("routed_scaling_factor", 1.0))
        else:
            c.score_function = "softmax"
            c.renormalize = bool(opt("norm_topk_prob", True))  # Mixtral always renormalises
        if shared is not None:
            s13 = torch.cat([shared.gate_proj.weight.detach(), shared.up_proj.weight.detach()], 0)
            c.num_shared_experts = 1
            c.shared_ffn_size = shared.down_proj.weight.shape[1]
        dtype = dtype or gate_w.dtype
        device = device or gate_w.device
        m = cls(c, dtype=dtype, device=device)
        with torch.no_grad():
            m.gate.copy_(gate_w.detach())
            m.w13.copy_(w13)
            m.w2.copy_(w2)
            if bias is not None:
                m.score_bias.copy_(bias.detach().float())
            if shared is not None:
                m.shared_w13.copy_(s13)
                m.shared_w2.copy_(shared.down_proj.weight.detach())
        return m


def reference_moe(module: MoE, x: torch.Tensor, ids: Optional[torch.Tensor] = None):
    """The same layer in plain PyTorch autograd (a loop over experts), for tests and the training comparison.

    Routing uses the Switchyard selection (``ids``, or the module's own route op when None) so that the two
    implementations compute the same function; everything differentiable (weights from the scores, the experts,
    the shared expert, the combine) is plain torch. Returns (y, logits, ids)."""
    c = module.config
    x2 = x.reshape(-1, c.hidden_size)
    logit_dtype = torch.float64 if x2.dtype == torch.float64 else torch.float32
    logits = F.linear(x2.to(logit_dtype), module.gate.to(logit_dtype))
    if ids is None:
        ids, _ = _ops.route(logits.detach(), module.score_bias, c.top_k, SCORE_FUNCTIONS[c.score_function],
                            c.renormalize, float(c.routed_scale), c.num_groups, c.topk_groups)
    ids_l = ids.long()
    if c.score_function == "softmax":
        w = torch.softmax(logits, -1).gather(1, ids_l)
    elif c.score_function == "sigmoid":
        w = torch.sigmoid(logits).gather(1, ids_l)
    else:
        w = torch.softmax(logits.gather(1, ids_l), -1)
    if c.renormalize:
        w = w / w.sum(-1, keepdim=True)
    w = w * c.routed_scale
    offsets, slot_row, _, _ = _ops.plan(ids, w.detach(), c.num_experts, float(c.capacity_factor), c.min_capacity,
                                        DROP_POLICIES[c.drop_policy])
    w = w * (slot_row >= 0).to(w.dtype)  # dropped pairs contribute nothing

    def act(g):
        if c.gated:
            gate, up = g.chunk(2, -1)
            f = F.silu(gate) if c.activation == "swiglu" else F.gelu(gate, approximate="tanh")
            return f * up
        return F.gelu(g, approximate="tanh") if c.activation == "gelu" else F.relu(g)

    y = torch.zeros(x2.shape[0], c.hidden_size, dtype=torch.float32 if x2.dtype != torch.float64 else x2.dtype,
                    device=x2.device)
    for e in range(c.num_experts):
        tok, slot = torch.nonzero(ids_l == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        out = F.linear(act(F.linear(x2[tok], module.w13[e])), module.w2[e])
        y = y.index_add(0, tok, (w[tok, slot].unsqueeze(1) * out.to(w.dtype)).to(y.dtype))
    if module.shared_w13 is not None:
        y = y + F.linear(act(F.linear(x2, module.shared_w13)), module.shared_w2).to(y.dtype)
    return y.to(x.dtype).reshape(x.shape), logits, ids
