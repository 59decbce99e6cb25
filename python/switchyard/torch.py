"""switchyard.torch: the Switchyard MoE layer as a PyTorch module, with autograd.

The layer runs as a chain of torch custom ops (``torch.ops.switchyard.*``, bindings/torch/ops.cpp), each with a
fake (meta) implementation for shape inference and an autograd formula that calls its backward op:

    logits [T, E]  = router_gemm(x, gate)                    fp32: the library's router GEMM (fp32 accumulation,
                                                             tensor cores for 16-bit x); backward in torch, fp32
                                                             products (bf16 on CUDA: on the tensor cores, d_logits
                                                             in three bf16 parts); fp64 x (gradcheck): F.linear
    ids, w [T, k]  = route(logits, bias)                     backward: route_backward (selection held fixed)
    offsets, slot_row, row_token, counts = plan(ids, w)       integer outputs, no gradient
    g1 [T*k, R13]  = gathered_grouped_mm(x, row_token, w13)   = grouped_mm(gather(x, row_token), w13, offsets);
                                                             backward recomputes the gather (not saved), then
                                                             grouped_mm_wgrad, grouped_mm_dgrad, gather_backward
    out [T*k, H]   = activated_grouped_mm(g1, w2)            = grouped_mm(activation(g1), w2, offsets); backward
                                                             recomputes h = activation(g1) (not saved): gated, in
                                                             grouped_mm_dgrad_activation (dgrad, activation_backward
                                                             and h in one op), then grouped_mm_wgrad; else
                                                             activation, grouped_mm_wgrad, grouped_mm_dgrad,
                                                             activation_backward
    shared [T, H]  = F.linear(act(F.linear(x, shared_w13)), shared_w2)   (shared experts, when configured)
    y  [T, H]      = combine(out, slot_row, w, shared)       backward: combine_backward
    aux, z         = router_losses(logits, ids)              backward: router_losses_backward

FP8 experts (inference only; docs/fp8.md): with ``MoEConfig.quant_mode`` "fp8-block" or "fp8-tensor" (or after
``MoE.quantize_``), w13 / w2 (and the shared expert's) are float8_e4m3fn buffers with fp32 scale buffers, and the
two expert GEMMs are the op grouped_mm_fp8 (stages.h: grouped_gemm_fp8, W8A8 with activations quantised per token
and 128 channels); routing, activation and combine as above. grouped_mm_fp8 has no backward.

Inference (no gradient needed) of 1..64 tokens of a bf16/fp16 layer on CUDA runs instead one op, moe_fused
(stages.h: route_fused + experts_fused, four kernels that stream the weights of the experts hit once);
``MoE.fused_max_tokens`` chooses: None (the default) automatic, by the library's measured rule (stages.h:
fused_path_preferred: where the weights a batch can hit take under ~60 us to read, e.g. Qwen3-30B-A3B at 1-2
tokens); 0 never; N whenever T <= N. Any other inference call runs the library's MoELayer as one op, moe_forward
(moe_layer.h: the staged chain router .. combine in one host call instead of one per stage, its workspace in one
allocation; with an interleaved w13, GEMM1 with the activation in its epilogue). Under torch.compile the staged ops
run (they trace; the whole-layer ops are for eager calls and CUDA-graph capture). ``MoE.gather_in_gemm1`` has GEMM1 read
x's rows through the routing plan in its own loads instead of from a gathered copy [T*k, H] (the same result; CUDA
bf16 kernels, other dtypes gather first): None (the default) automatic where no gradient is needed, by the library's
measured rule (stages.h: gather_in_gemm1_preferred: an interleaved w13 and at most 128 rows per expert on average,
256 with x within 64 MiB, or small experts at any size), the separate gather under autograd and torch.compile; True
everywhere (autograd too); False never.

Every output shape depends only on input shapes (T*k rows always, rows past offsets[E] are zero), so the chain
traces under ``torch.compile(fullgraph=True)`` and captures in CUDA graphs. CPU tensors run the CPU reference
(double accumulation; fp64 in gives fp64 results for gradcheck), CUDA tensors the CUDA kernels.
"""
from __future__ import annotations

import dataclasses
import math
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
ROUTING_MODES = {"token-choice": 0, "expert-choice": 1}
GROUP_SCORES = {"top2-sum": 0, "max": 1}
QUANT_MODES = {"none": 0, "fp8-block": 1, "fp8-tensor": 2}  # switchyard::QuantMode
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_BLOCK = 128  # kFp8BlockSize: the side of a weight scale block and the activation group
_FLOAT_MAX = 3.4028234663852886e38

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


@torch.library.register_fake("switchyard::router_gemm")
def _router_gemm_fake(x, gate):
    return x.new_empty((x.shape[0], gate.shape[0]), dtype=torch.float32)


@torch.library.register_fake("switchyard::router_gemm_backward")
def _router_gemm_backward_fake(x, gate, d_logits, need_dx, need_dgate):
    return (x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
            gate.new_empty(gate.shape) if need_dgate else gate.new_empty((0,)))


@torch.library.register_fake("switchyard::gather")
def _gather_fake(x, row_token, slot_row=None):
    return x.new_empty((row_token.shape[0], x.shape[1]))


@torch.library.register_fake("switchyard::gather_backward")
def _gather_backward_fake(d_xp, slot_row):
    return d_xp.new_empty((slot_row.shape[0], d_xp.shape[1]))


@torch.library.register_fake("switchyard::grouped_mm")
def _grouped_mm_fake(a, b, offsets, row_index=None):
    rows = a.shape[0] if row_index is None else row_index.shape[0]
    return a.new_empty((rows, b.shape[1]))


@torch.library.register_fake("switchyard::grouped_mm_gated")
def _grouped_mm_gated_fake(a, w13i, offsets, activation, row_index=None):
    rows = a.shape[0] if row_index is None else row_index.shape[0]
    return a.new_empty((rows, w13i.shape[1] // 2))


@torch.library.register_fake("switchyard::grouped_mm_gated_keep")
def _grouped_mm_gated_keep_fake(a, w13i, offsets, activation):
    return a.new_empty((a.shape[0], w13i.shape[1] // 2)), a.new_empty((a.shape[0], w13i.shape[1]))


@torch.library.register_fake("switchyard::interleave_gate_up")
def _interleave_gate_up_fake(w13, inverse):
    return torch.empty_like(w13)


@torch.library.register_fake("switchyard::grouped_mm_fp8")
def _grouped_mm_fp8_fake(a, b, b_scale, input_scale, offsets, mode):
    return a.new_empty((a.shape[0], b.shape[-2]))


@torch.library.register_fake("switchyard::grouped_mm_backward")
def _grouped_mm_backward_fake(dc, a, b, offsets):
    return torch.empty_like(a), torch.empty_like(b)


@torch.library.register_fake("switchyard::grouped_mm_dgrad")
def _grouped_mm_dgrad_fake(dc, b, offsets):
    return b.new_empty((dc.shape[0], b.shape[2]))


@torch.library.register_fake("switchyard::grouped_mm_wgrad")
def _grouped_mm_wgrad_fake(dc, a, offsets):
    return a.new_empty((offsets.shape[0] - 1, dc.shape[1], a.shape[1]))


_GATED_ACTIVATIONS = (0, 1)  # Activation::kSwiGLU, kGeGLU (config.h)


@torch.library.register_fake("switchyard::grouped_mm_dgrad_activation")
def _grouped_mm_dgrad_activation_fake(dc, b, offsets, g, activation, interleaved=False):
    return torch.empty_like(g), g.new_empty((g.shape[0], b.shape[2]))


@torch.library.register_fake("switchyard::activation")
def _activation_fake(g, activation, interleaved=False):
    gated = activation in _GATED_ACTIVATIONS
    return g.new_empty((g.shape[0], g.shape[1] // 2 if gated else g.shape[1]))


@torch.library.register_fake("switchyard::activation_backward")
def _activation_backward_fake(g, dh, activation, interleaved=False):
    return torch.empty_like(g)


@torch.library.register_fake("switchyard::combine")
def _combine_fake(expert_out, slot_row, weights, shared, num_rows=None):
    return expert_out.new_empty((slot_row.shape[0], expert_out.shape[1]))


@torch.library.register_fake("switchyard::combine_backward")
def _combine_backward_fake(dy, expert_out, slot_row, weights, num_rows=None):
    return torch.empty_like(expert_out), torch.empty_like(weights)


@torch.library.register_fake("switchyard::moe_fused")
def _moe_fused_fake(x, gate, bias, w13, w2, shared_w13, shared_w2, shared_gate, top_k, score_function, renormalize,
                    routed_scale, num_groups, topk_groups, activation, gate_up_interleaved=False):
    t, e = x.shape[0], gate.shape[0]
    return (torch.empty_like(x), x.new_empty((t, e), dtype=torch.float32), x.new_empty((t, top_k), dtype=torch.int32),
            x.new_empty((e,), dtype=torch.int32))


@torch.library.register_fake("switchyard::moe_forward")
def _moe_forward_fake(x, gate, bias, w13, w2, shared_w13, shared_w2, shared_gate, top_k, score_function, renormalize,
                      routed_scale, num_groups, topk_groups, activation, capacity_factor, min_capacity, drop_policy,
                      gate_up_interleaved, gather_in_gemm1=-1):
    t, e = x.shape[0], gate.shape[0]
    return (torch.empty_like(x), x.new_empty((t, e), dtype=torch.float32), x.new_empty((t, top_k), dtype=torch.int32),
            x.new_empty((e,), dtype=torch.int32), x.new_empty((e + 1,), dtype=torch.int32))


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


# The router GEMM's gradients, as autograd takes them through F.linear(x.float(), gate.float()): d_logits is fp32,
# dx and dgate are sums of the exact products rounded once to their tensor's dtype, computed by the library's
# router_gemm_backward stage in one op (stages.h: on CUDA, for bf16 operands, d_logits split into three bf16 parts on
# the tensor cores; bench/NOTES.md, "Router backward").
def _router_gemm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _router_gemm_backward(ctx, d_logits):
    x, gate = ctx.saved_tensors
    need_dx, need_dgate = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dx or need_dgate):
        return None, None
    dx, dgate = _ops.router_gemm_backward(x, gate, d_logits.float(), need_dx, need_dgate)
    return (dx if need_dx else None), (dgate if need_dgate else None)


torch.library.register_autograd("switchyard::router_gemm", _router_gemm_backward, setup_context=_router_gemm_setup)


def _gmm_setup(ctx, inputs, output):
    a, b, offsets = inputs[:3]
    ctx.gathered = len(inputs) > 3 and inputs[3] is not None
    ctx.save_for_backward(a, b, offsets)


def _gmm_backward(ctx, dc):
    if ctx.gathered:
        # x's gradient through a row index needs the plan's slot_row for a fixed-order sum: the module's
        # gathered_grouped_mm has that backward (gather_backward); the bare op with row_index is forward-only.
        raise RuntimeError("switchyard::grouped_mm with row_index has no backward; differentiate through "
                           "switchyard::gathered_grouped_mm (x, row_token, slot_row, b, offsets) instead")
    a, b, offsets = ctx.saved_tensors
    da, db = _ops.grouped_mm_backward(dc.contiguous(), a, b, offsets)
    return da, db, None, None


torch.library.register_autograd("switchyard::grouped_mm", _gmm_backward, setup_context=_gmm_setup)


# grouped_mm_fp8 is inference only: its autograd formula refuses as soon as an input needs a gradient (setup_context
# runs in the forward, only when grad mode is on and some input requires grad), rather than at backward time.
def _gmm_fp8_no_grad(*_args, **_kwargs):
    raise RuntimeError("switchyard.grouped_mm_fp8 is inference only (FP8 weights have no backward), but an input "
                       "requires grad: run it under torch.no_grad() / torch.inference_mode(), or detach the input")


torch.library.register_autograd("switchyard::grouped_mm_fp8", _gmm_fp8_no_grad, setup_context=_gmm_fp8_no_grad)


def _act_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.activation = inputs[1]


def _act_backward(ctx, dh):
    (g,) = ctx.saved_tensors
    return _ops.activation_backward(g, dh.contiguous(), ctx.activation), None


torch.library.register_autograd("switchyard::activation", _act_backward, setup_context=_act_setup)


def _combine_setup(ctx, inputs, output):
    expert_out, slot_row, weights, shared, num_rows = inputs
    ctx.save_for_backward(expert_out, slot_row, weights, num_rows)
    ctx.has_shared = shared is not None
    ctx.shared_dtype = shared.dtype if shared is not None else None


def _combine_backward(ctx, dy):
    expert_out, slot_row, weights, num_rows = ctx.saved_tensors
    dy = dy.contiguous()
    d_out, d_w = _ops.combine_backward(dy, expert_out, slot_row, weights, num_rows)
    d_shared = dy.to(ctx.shared_dtype) if ctx.has_shared else None
    return d_out, None, d_w, d_shared, None


torch.library.register_autograd("switchyard::combine", _combine_backward, setup_context=_combine_setup)

# gather + GEMM1 as one differentiable op whose backward recomputes the gathered rows from x instead of saving them:
# the saved activations per routed row drop from (H + 2F + F + H) to (2F + F + H) elements, the [T*k, H] gather
# being the largest single saving (1.9 GB of bf16 for DeepSeek-V3 at T=16384). x itself is saved, at no cost:
# it is the layer's input and alive anyway.
# in_gemm: the forward's GEMM reads x's rows through row_token in its own loads (grouped_mm's row_index) instead of a
# gathered copy; the same result (stages.h, GroupedGemmOptions::row_index).
@torch.library.custom_op("switchyard::gathered_grouped_mm", mutates_args=())
def _gathered_grouped_mm(x: torch.Tensor, row_token: torch.Tensor, slot_row: torch.Tensor, b: torch.Tensor,
                         offsets: torch.Tensor, in_gemm: bool = False) -> torch.Tensor:
    if in_gemm:
        return _ops.grouped_mm(x, b, offsets, row_token)
    return _ops.grouped_mm(_ops.gather(x, row_token, slot_row), b, offsets)


@_gathered_grouped_mm.register_fake
def _gathered_grouped_mm_fake(x, row_token, slot_row, b, offsets, in_gemm=False):
    return x.new_empty((row_token.shape[0], b.shape[1]))


def _ggmm_setup(ctx, inputs, output):
    x, row_token, slot_row, b, offsets, _in_gemm = inputs
    ctx.save_for_backward(x, row_token, slot_row, b, offsets)


# The backward of gather + GEMM1 from GEMM1's output gradient dc: (dx or None, db or None) as asked.
def _gathered_backward(dc, x, row_token, slot_row, b, offsets, need_dx: bool, need_db: bool):
    dx = db = None
    # Weight gradient first, so that the recomputed rows are freed before the input gradient d_xp [T*k, H] is
    # allocated: the two never coexist, which lowers the backward's peak by T*k*H elements. A gradient nobody
    # needs (frozen experts, an input without grad) is not computed.
    if need_db:
        xp = _ops.gather(x, row_token, slot_row)  # recomputed: one pass over x, written to its T*k rows
        db = _ops.grouped_mm_wgrad(dc, xp, offsets)
        del xp
    if need_dx:
        dx = _ops.gather_backward(_ops.grouped_mm_dgrad(dc, b, offsets), slot_row)
    return dx, db


def _ggmm_backward(ctx, dc):
    x, row_token, slot_row, b, offsets = ctx.saved_tensors
    dx, db = _gathered_backward(dc.contiguous(), x, row_token, slot_row, b, offsets, ctx.needs_input_grad[0],
                                ctx.needs_input_grad[3])
    return dx, None, None, db, None, None


_gathered_grouped_mm.register_autograd(_ggmm_backward, setup_context=_ggmm_setup)


# activation + GEMM2 as one differentiable op whose backward recomputes h = act(g) from the saved GEMM1 output g
# instead of saving h as well: T*k*F fewer saved elements (0.54 GB of bf16 for DeepSeek-V3 at T=16384, 0.94 GB for
# Mixtral), for one extra elementwise pass over g in the backward. interleaved: g's gate and up columns as GEMM1
# makes them with w13 in the interleaved layout (MoE.interleave_gate_up_).
@torch.library.custom_op("switchyard::activated_grouped_mm", mutates_args=())
def _activated_grouped_mm(g: torch.Tensor, activation: int, b: torch.Tensor, offsets: torch.Tensor,
                          interleaved: bool = False) -> torch.Tensor:
    return _ops.grouped_mm(_ops.activation(g, activation, interleaved), b, offsets)


@_activated_grouped_mm.register_fake
def _activated_grouped_mm_fake(g, activation, b, offsets, interleaved=False):
    return g.new_empty((g.shape[0], b.shape[1]))


def _agmm_setup(ctx, inputs, output):
    g, activation, b, offsets, interleaved = inputs
    ctx.save_for_backward(g, b, offsets)
    ctx.activation = activation
    ctx.interleaved = interleaved


# The backward of activation + GEMM2 from GEMM2's output gradient dc: (dg or None, db or None) as asked.
def _activated_backward(dc, g, b, offsets, activation: int, interleaved: bool, need_dg: bool, need_db: bool):
    dg = db = None
    if need_dg and need_db and activation in _GATED_ACTIVATIONS:
        # one op for the dgrad, the activation's backward and the recomputed h (dh kept in h's memory): dg and h
        # [T*k, 3F] are live together as h and dh + dg were in the steps below.
        dg, h = _ops.grouped_mm_dgrad_activation(dc, b, offsets, g, activation, interleaved)
        db = _ops.grouped_mm_wgrad(dc, h, offsets)
        return dg, db
    if need_db:
        h = _ops.activation(g, activation, interleaved)  # recomputed
        db = _ops.grouped_mm_wgrad(dc, h, offsets)  # first, so that h is freed before dh is allocated
        del h
    if need_dg:
        dg = _ops.activation_backward(g, _ops.grouped_mm_dgrad(dc, b, offsets), activation, interleaved)
    return dg, db


def _agmm_backward(ctx, dc):
    g, b, offsets = ctx.saved_tensors
    dg, db = _activated_backward(dc.contiguous(), g, b, offsets, ctx.activation, ctx.interleaved,
                                 ctx.needs_input_grad[0], ctx.needs_input_grad[2])
    return dg, None, db, None, None


_activated_grouped_mm.register_autograd(_agmm_backward, setup_context=_agmm_setup)


# Training in the interleaved layout: gather + GEMM1 with the product kept, then GEMM2, as two differentiable ops.
# GEMM1's kernel stores its product g, which the backward needs, and h = act(g), GEMM2's input, together
# (grouped_mm_gated_keep; GroupedGemmOptions::gate_up), so the forward's separate activation pass over g goes away.
# Values, saved tensors (x and the weights by the first op, g by the second) and backward are those of
# _gathered_grouped_mm followed by _activated_grouped_mm: h is a non-differentiable cache of act(g) (the second op's
# backward gives g's whole gradient, through h, and none for h), and two autograd nodes let the engine free g and
# GEMM2's output gradient before GEMM1's backward runs, as it does for the staged ops.
@torch.library.custom_op("switchyard::gathered_gated_keep", mutates_args=())
def _gathered_gated_keep(x: torch.Tensor, row_token: torch.Tensor, slot_row: torch.Tensor, w13i: torch.Tensor,
                         offsets: torch.Tensor, activation: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _ops.grouped_mm_gated_keep(_ops.gather(x, row_token, slot_row), w13i, offsets, activation)


@_gathered_gated_keep.register_fake
def _gathered_gated_keep_fake(x, row_token, slot_row, w13i, offsets, activation):
    rows = row_token.shape[0]
    return x.new_empty((rows, w13i.shape[1] // 2)), x.new_empty((rows, w13i.shape[1]))


def _ggk_setup(ctx, inputs, output):
    x, row_token, slot_row, w13i, offsets, _activation = inputs
    ctx.save_for_backward(x, row_token, slot_row, w13i, offsets)
    ctx.mark_non_differentiable(output[0])  # h: its gradient reaches g through _gated_down_mm's backward
    ctx.set_materialize_grads(False)  # no zero-filled [T*k, F] / [T*k, 2F] gradients for unused outputs


def _ggk_backward(ctx, _dh, dg):
    # saved tensors and inputs in _gathered_grouped_mm's places: its backward
    return (None,) * 6 if dg is None else _ggmm_backward(ctx, dg)


_gathered_gated_keep.register_autograd(_ggk_backward, setup_context=_ggk_setup)


# GEMM2 on h = act(g) given with g (the interleaved layout's g, kept by _gathered_gated_keep): out = grouped_mm(h, w2).
# The gradient goes to g (dgrad, the activation's backward and h recomputed, as _activated_grouped_mm's) and w2.
@torch.library.custom_op("switchyard::gated_down_mm", mutates_args=())
def _gated_down_mm(h: torch.Tensor, g: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor,
                   activation: int) -> torch.Tensor:
    return _ops.grouped_mm(h, w2, offsets)


@_gated_down_mm.register_fake
def _gated_down_mm_fake(h, g, w2, offsets, activation):
    return h.new_empty((h.shape[0], w2.shape[1]))


def _gdm_setup(ctx, inputs, output):
    _h, g, w2, offsets, activation = inputs
    ctx.save_for_backward(g, w2, offsets)
    ctx.activation = activation


def _gdm_backward(ctx, d_out):
    g, w2, offsets = ctx.saved_tensors
    dg, dw2 = _activated_backward(d_out.contiguous(), g, w2, offsets, ctx.activation, True, ctx.needs_input_grad[1],
                                  ctx.needs_input_grad[2])
    return None, dg, dw2, None, None


_gated_down_mm.register_autograd(_gdm_backward, setup_context=_gdm_setup)

# ---- FP8 weights ---------------------------------------------------------------------------------------------


def _fp8_scale_shape(shape, mode: str):
    """Scale shape of an fp8 weight of `shape` ([E, N, K] or [N, K]) under `mode` (docs/fp8.md's table)."""
    lead, (n, k) = tuple(shape[:-2]), tuple(shape[-2:])
    if mode == "fp8-block":
        return lead + (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
    return lead or (1,)


def quantize_fp8(w: torch.Tensor, mode: str = "fp8-block", name: str = "weight"):
    """(codes float8_e4m3fn of w's shape, scales fp32) of a float weight w [E, N, K] (each w[e] a matrix) or [N, K],
    by the recipe of ``switchyard quantize`` (tools/switchyard/io/quantize.cpp), bit for bit:
    fp8-block: per 128x128 block (edge blocks partial) s = amax / 448 in fp32, scales [E, B(N), B(K)] ([B(N), B(K)]);
    fp8-tensor: s = amax / 448 per matrix, scales [E] ([1]); then q = e4m3(w / s) with an fp32 division, rounded to
    nearest even and saturated to +-448 (switchyard's float_to_fp8_e4m3: torch's own conversion rounds the same way
    but turns values past 464 into NaN, so values are clamped first); a block or matrix of zeros gets s = 0, q = 0.
    w is read exactly as fp32 (fp32, bf16 or fp16 weights; non-finite values are refused, naming the element)."""
    if mode not in ("fp8-block", "fp8-tensor"):
        raise ValueError(f"switchyard: quantize mode={mode!r}, expected 'fp8-block' or 'fp8-tensor'")
    if w.dim() not in (2, 3):
        raise ValueError(f"switchyard: {name} shape {tuple(w.shape)}: quantize takes [E, N, K] or [N, K]")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"switchyard: {name} dtype {w.dtype}: quantize takes float32, bfloat16 or float16 weights")
    if w.is_meta:
        return (torch.empty(w.shape, dtype=torch.float8_e4m3fn, device="meta"),
                torch.empty(_fp8_scale_shape(w.shape, mode), dtype=torch.float32, device="meta"))
    w32 = w.detach().to(torch.float32)
    bad = ~torch.isfinite(w32)
    if bool(bad.any()):
        at = bad.nonzero()[0].tolist()
        raise ValueError(f"switchyard: {name} has a non-finite value ({w32[tuple(at)].item()}) at {at}; only finite "
                         "weights can be quantised")
    w3 = w32 if w32.dim() == 3 else w32.unsqueeze(0)
    e, n, k = w3.shape
    if mode == "fp8-block":
        g = FP8_BLOCK
        bn, bk = -(-n // g), -(-k // g)
        padded = F.pad(w3, (0, bk * g - k, 0, bn * g - n)).view(e, bn, g, bk, g)  # zeros do not change an amax
        scale = _div_by_fp8_max(padded.abs().amax(dim=(2, 4)))  # [E, B(N), B(K)]
        codes = _e4m3_codes(padded, scale[:, :, None, :, None]).view(e, bn * g, bk * g)[:, :n, :k]
    else:
        scale = _div_by_fp8_max(w3.abs().amax(dim=(1, 2)))  # [E]
        codes = _e4m3_codes(w3, scale[:, None, None])
    if w32.dim() == 2:
        codes = codes[0]
        scale = scale[0] if mode == "fp8-block" else scale
    return codes.contiguous(), scale.contiguous()


def _div_by_fp8_max(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 as an fp32 division, correctly rounded on every device: CUDA's tensor / Python-scalar multiplies by
    the scalar's reciprocal (one unit off for some amax), a tensor divisor is divided by."""
    return torch.div(amax, torch.full_like(amax, FP8_MAX))


def _e4m3_codes(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    q = torch.where(s == 0, torch.zeros((), dtype=torch.float32, device=w.device), w / s)
    q = torch.where(q > FP8_MAX, FP8_MAX, torch.where(q < -FP8_MAX, -FP8_MAX, q))  # saturate (keeps -0.0)
    return q.to(torch.float8_e4m3fn)


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32):
    """The weight the recipe computes with, dec(q) * s per block or matrix (the product in fp64, then `dtype`)."""
    w = codes.to(torch.float64)
    s = scale.to(torch.float64)
    if mode == "fp8-block":
        n, k = w.shape[-2:]
        s = s.repeat_interleave(FP8_BLOCK, -2)[..., :n, :].repeat_interleave(FP8_BLOCK, -1)[..., :k]
    else:
        s = s.reshape(s.shape + (1, 1)) if w.dim() == 3 else s.reshape(1, 1)
    return (w * s).to(dtype)


# ---- the module --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MoEConfig:
    """Every option of switchyard::MoEConfig (include/switchyard/config.h), with the same meaning and the same
    validation, plus ``group_score`` (Python only, see below). The activation dtype is the module's ``dtype``.

    Options that the torch ops do not run yet are accepted here (so a config round-trips) and refused by
    :class:`MoE` with a message: ``routing_mode="expert-choice"`` (no expert-choice route op in bindings/torch).
    ``group_score`` picks how group-limited routing scores a group: ``"top2-sum"`` (DeepSeek-V3, the library's rule:
    the sum of the group's two best biased scores) or ``"max"`` (DeepSeek-V2's ``group_limited_greedy``: the group's
    best score). ``"max"`` is computed in Python before the route op (the library has no such option).
    ``shared_expert_gate`` (Qwen2-MoE) scales the shared expert's output by ``sigmoid(x . shared_gate)``, with
    ``shared_gate`` [1, H] a parameter of the module."""
    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int
    score_function: str = "softmax"  # softmax | topk-softmax | sigmoid
    renormalize: bool = False
    routed_scale: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "top2-sum"  # top2-sum (DeepSeek-V3, the library's) | max (DeepSeek-V2, Python only)
    use_score_bias: bool = False
    capacity_factor: float = 0.0  # 0 = dropless
    min_capacity: int = 0
    drop_policy: str = "position"  # position | probability
    eval_capacity_factor: float = -1.0  # capacity factor in eval mode; < 0: the same as capacity_factor
    routing_mode: str = "token-choice"  # token-choice | expert-choice
    bias_update_rate: float = 1e-3  # MoE.update_score_bias: score_bias += rate * sign(mean load - load)
    activation: str = "swiglu"  # swiglu | geglu | gelu | relu
    num_shared_experts: int = 0
    shared_ffn_size: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output * sigmoid(x . shared_gate)
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    quant_mode: str = "none"  # none | fp8-block | fp8-tensor: FP8 experts (inference only; docs/fp8.md)

    MAX_EXPERTS = 512  # MoEConfig::kMaxExperts
    MAX_TOP_K = 32  # MoEConfig::kMaxTopK

    def validate(self):
        """Raises ValueError naming the first bad option and its value (the checks of MoEConfig::validate)."""
        def bad(msg):
            raise ValueError(f"switchyard: {msg}")

        for name, table in (("score_function", SCORE_FUNCTIONS), ("drop_policy", DROP_POLICIES),
                            ("activation", ACTIVATIONS), ("routing_mode", ROUTING_MODES),
                            ("group_score", GROUP_SCORES), ("quant_mode", QUANT_MODES)):
            if getattr(self, name) not in table:
                bad(f"{name}={getattr(self, name)!r}, expected one of {sorted(table)}")
        for name in ("hidden_size", "ffn_size", "num_experts"):
            if int(getattr(self, name)) <= 0:
                bad(f"{name}={getattr(self, name)} must be positive")
        if self.num_experts > self.MAX_EXPERTS:
            bad(f"num_experts={self.num_experts} exceeds the kernel limit {self.MAX_EXPERTS}")
        if not 0 < self.top_k <= self.num_experts:
            bad(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.top_k > self.MAX_TOP_K:
            bad(f"top_k={self.top_k} exceeds the kernel limit {self.MAX_TOP_K}")
        if not math.isfinite(self.routed_scale) or abs(self.routed_scale) > _FLOAT_MAX:
            bad(f"routed_scale={self.routed_scale} must be finite in fp32")
        if self.num_groups < 1 or self.num_experts % self.num_groups != 0:
            bad(f"num_groups={self.num_groups} must be >= 1 and divide num_experts={self.num_experts}")
        if not 1 <= self.topk_groups <= self.num_groups:
            bad(f"topk_groups={self.topk_groups} must be in [1, num_groups={self.num_groups}]")
        if self.num_groups > 1 and self.top_k > self.topk_groups * (self.num_experts // self.num_groups):
            bad(f"top_k={self.top_k} exceeds the experts of the topk_groups={self.topk_groups} kept groups "
                f"({self.topk_groups * (self.num_experts // self.num_groups)})")
        if self.group_score == "max" and self.num_groups > 1 and self.use_score_bias:
            bad("group_score='max' (computed in Python) does not take use_score_bias=True")
        if not math.isfinite(self.capacity_factor) or self.capacity_factor < 0:
            bad(f"capacity_factor={self.capacity_factor} must be finite and >= 0 (0 = dropless)")
        if self.min_capacity < 0:
            bad(f"min_capacity={self.min_capacity} must be >= 0")
        if not math.isfinite(self.eval_capacity_factor):
            bad(f"eval_capacity_factor={self.eval_capacity_factor} must be finite (< 0: same as capacity_factor)")
        if not (math.isfinite(self.bias_update_rate) and 0 <= self.bias_update_rate <= _FLOAT_MAX):
            bad(f"bias_update_rate={self.bias_update_rate} must be finite in fp32 and >= 0")
        if self.routing_mode == "expert-choice":
            if self.score_function == "topk-softmax":
                bad("score_function=topk-softmax is not defined under expert-choice routing")
            if self.use_score_bias:
                bad("use_score_bias=True has no effect under expert-choice routing; turn it off")
            if self.num_groups != 1:
                bad(f"num_groups={self.num_groups}: expert-choice routing needs num_groups=1")
        if self.num_shared_experts < 0 or self.shared_ffn_size < 0:
            bad(f"num_shared_experts={self.num_shared_experts} and shared_ffn_size={self.shared_ffn_size} "
                "must be >= 0")
        if (self.num_shared_experts > 0) != (self.shared_ffn_size > 0):
            bad(f"shared_ffn_size={self.shared_ffn_size} and num_shared_experts={self.num_shared_experts} must be "
                "both positive or both 0")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            bad("shared_expert_gate=True needs a shared expert (num_shared_experts=0)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if not math.isfinite(getattr(self, name)):
                bad(f"{name}={getattr(self, name)} must be finite")

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def shared_width(self) -> int:
        return self.num_shared_experts * self.shared_ffn_size

    def capacity_factor_for(self, training: bool) -> float:
        """The capacity factor a forward in training (or eval) mode runs with."""
        if training or self.eval_capacity_factor < 0:
            return float(self.capacity_factor)
        return float(self.eval_capacity_factor)


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
    S = num_shared_experts * shared_ffn_size; ``shared_gate`` [1, H] when shared_expert_gate.

    forward(x [..., H]) returns ``y`` of x's shape in eval mode, and a :class:`MoEOutput` in training (y, losses,
    load statistics) unless ``return_stats`` says otherwise. Eval mode uses ``eval_capacity_factor`` when it is >= 0.
    """

    def __init__(self, config: MoEConfig, dtype: torch.dtype = torch.float32, device=None, return_stats=None):
        super().__init__()
        config.validate()
        if config.routing_mode != "token-choice":
            raise NotImplementedError(f"switchyard.torch.MoE: routing_mode={config.routing_mode!r} has no torch op "
                                      "yet (the C++ MoELayer runs it); use token-choice")
        self.config = config
        self.return_stats = return_stats
        # The fused inference path (moe_fused): None = automatic (stages.h: fused_path_preferred, the measured
        # crossover), 0 = never, N = whenever T <= N (at most 64).
        self.fused_max_tokens: Optional[int] = None
        self._fused_ok_cache = {}
        # w13 stored with gate/up rows interleaved in blocks of 8 (interleave_gate_up_): GEMM1 then applies the
        # gated activation in its epilogue.
        self.gate_up_interleaved = False
        # GEMM1 reads x's rows through the routing plan in its own loads instead of from a gathered copy [T*k, H]
        # (MoELayer::set_gather_in_gemm1; the CUDA kernels are bf16's, other dtypes gather first). The same result.
        # None = automatic where no gradient is needed (stages.h: gather_in_gemm1_preferred), off under autograd and
        # torch.compile; True = on (autograd too); False = off.
        self.gather_in_gemm1: Optional[bool] = None
        self.register_state_dict_post_hook(_w13_plain_in_state_dict)
        self.register_load_state_dict_pre_hook(_w13_interleaved_on_load)
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
        if c.shared_expert_gate:
            self.shared_gate = nn.Parameter(torch.empty(1, c.hidden_size, **kw))
        else:
            self.shared_gate = None
        for w in _FP8_MATRICES:  # fp32 scales of fp8 weights (None while a weight is float)
            self.register_buffer(f"{w}_scale", None)
            self.register_buffer(f"{w}_input_scale", None)
        self.reset_parameters()
        if c.quant_mode != "none":  # FP8 experts: the random init quantised (from_hf / load_state_dict replace it)
            self._quantize_weights(c.quant_mode)

    def reset_parameters(self):
        with torch.no_grad():
            for p in self.parameters():
                nn.init.normal_(p, std=p.shape[-1] ** -0.5)

    # ---- GEMM1 with the gated activation in its epilogue (prefill inference) ------------------------------------

    @torch.no_grad()
    def interleave_gate_up_(self, enabled: bool = True) -> "MoE":
        """Stores ``w13`` with its gate and up rows interleaved in blocks of 8 (in place; a transient copy of w13 while
        it converts), or back in the plain layout (``enabled=False``). In the interleaved layout a forward that needs
        no gradient runs GEMM1 and the gated activation as one kernel (``switchyard::grouped_mm_gated``: the
        activation in the GEMM's epilogue, the [T*k, 2F] product never written, the same values as the two separate
        steps; on CUDA bf16 and sm_90). Under autograd GEMM1's kernel stores its product, which the backward
        needs, beside h (``switchyard::grouped_mm_gated_keep``: no separate activation pass), and the activation's
        gradient reads the interleaved columns in place, so training works in either layout and ``w13.grad`` comes in
        the parameter's layout. The small-batch fused path (moe_fused, T <= 64) reads either
        layout; FP8 modules keep the plain layout. ``state_dict()`` saves, and
        ``load_state_dict()`` takes, the plain layout whatever this module's (the conversion hooks below)."""
        c = self.config
        if enabled == self.gate_up_interleaved:
            return self
        if enabled:
            if not c.gated:
                raise ValueError(f"switchyard.torch.MoE.interleave_gate_up_: activation={c.activation!r} is not gated")
            if self.quantized:
                raise ValueError("switchyard.torch.MoE.interleave_gate_up_: FP8 experts keep the plain layout")
            if c.ffn_size % 8 != 0:
                raise ValueError(f"switchyard.torch.MoE.interleave_gate_up_: ffn_size={c.ffn_size} must be a "
                                 "multiple of 8")
            if type(self)._layer is not MoE._layer:
                raise ValueError(f"switchyard.torch.MoE.interleave_gate_up_: {type(self).__name__} runs its own "
                                 "expert layer, which reads the plain layout")
        self.w13.copy_(_ops.interleave_gate_up(self.w13, not enabled))
        self.gate_up_interleaved = enabled
        return self

    def _needs_grad(self, x2: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x2.requires_grad or any(p.requires_grad for p in self.parameters()))

    # ---- FP8 experts (inference) ------------------------------------------------------------------------------

    @property
    def quantized(self) -> bool:
        """Whether the experts are FP8 (config.quant_mode fp8-block / fp8-tensor)."""
        return self.config.quant_mode != "none"

    @torch.no_grad()
    def quantize_(self, mode: str = "fp8-block") -> "MoE":
        """Converts this module's experts to FP8 in place, for inference: w13, w2 and a shared expert's shared_w13 /
        shared_w2 become float8_e4m3fn buffers with fp32 scale buffers (w13_scale, ...), by :func:`quantize_fp8` --
        the recipe of ``switchyard quantize``, bit for bit (fp8-block: the scales are those of w13's [R13, H]
        matrices, so for gated layers with F % 128 == 0 they are exactly the CLI's gate blocks stacked over its up
        blocks; with other F a 128-row block may hold gate and up rows, which the CLI's separate matrices cannot).
        The router (gate, score_bias, shared_gate) stays as it is. Returns self; config becomes a copy with
        quant_mode set. Forward then runs the grouped_mm_fp8 op and refuses training mode."""
        if mode not in ("fp8-block", "fp8-tensor"):
            raise ValueError(f"switchyard: quantize_ mode={mode!r}, expected 'fp8-block' or 'fp8-tensor'")
        if self.quantized:
            raise ValueError(f"switchyard: the experts are already quantised (quant_mode={self.config.quant_mode!r})")
        self._quantize_weights(mode)
        self.config = dataclasses.replace(self.config, quant_mode=mode)
        self._fused_ok_cache = {}
        return self

    def _quantize_weights(self, mode: str):
        if self.gate_up_interleaved:
            raise ValueError("switchyard.torch.MoE: quantize the plain layout (interleave_gate_up_(False) first)")
        for name in _FP8_MATRICES:
            w = getattr(self, name)
            if w is not None:
                codes, scale = quantize_fp8(w, mode, name=name)
                self._put_fp8(name, codes, scale, None)

    def _put_fp8(self, name, codes, scale, input_scale):
        delattr(self, name)  # the float Parameter (or the fp8 buffer being replaced)
        self.register_buffer(name, codes)
        setattr(self, f"{name}_scale", scale)
        setattr(self, f"{name}_input_scale", input_scale)

    @torch.no_grad()
    def set_fp8_weight(self, name: str, codes: torch.Tensor, scale: torch.Tensor,
                       input_scale: Optional[torch.Tensor] = None):
        """Sets one expert weight (w13, w2, shared_w13, shared_w2) of an FP8 module from fp8 codes and fp32 scales
        (e.g. a checkpoint's weight and weight_scale_inv), after the checks MoELayer makes: shapes and dtypes per
        docs/fp8.md (scales in another float dtype are converted exactly to fp32), finite scales >= 0, input
        scales (fp8-tensor only) finite and > 0, no fp8 NaN codes. A shared expert may stay float: pass a float
        ``codes`` tensor without scales. Tensors are copied to the device of ``gate``."""
        c = self.config
        if not self.quantized:
            raise ValueError("switchyard: set_fp8_weight needs an FP8 module (quant_mode fp8-block / fp8-tensor)")
        shapes = self._weight_shapes()
        if name not in shapes or shapes[name] is None:
            raise ValueError(f"switchyard: {name} is not an expert weight of this module ({sorted(k for k, v in shapes.items() if v)})")
        dev = self.gate.device
        want = shapes[name]
        if tuple(codes.shape) != want:
            raise ValueError(f"switchyard: {name} shape {tuple(codes.shape)}, expected {want}")
        if codes.dtype != torch.float8_e4m3fn:
            if not name.startswith("shared_") or scale is not None or input_scale is not None:
                raise ValueError(f"switchyard: {name} dtype {codes.dtype}: expected float8_e4m3fn with its scale "
                                 "(only a shared expert may stay float, without scales)")
            delattr(self, name)
            setattr(self, name, nn.Parameter(codes.detach().to(dev).clone(), requires_grad=False))
            setattr(self, f"{name}_scale", None)
            setattr(self, f"{name}_input_scale", None)
            return
        nan = (codes.view(torch.uint8) & 0x7F) == 0x7F
        if bool(nan.any()):
            at = nan.nonzero()[0].tolist()
            raise ValueError(f"switchyard: {name} holds an fp8 NaN code at {at}")
        want_s = _fp8_scale_shape(want, c.quant_mode)
        if scale is None or tuple(scale.shape) != want_s:
            raise ValueError(f"switchyard: {name}_scale shape {None if scale is None else tuple(scale.shape)}, "
                             f"expected {want_s} ({c.quant_mode})")
        scale = self._fp32_scale(f"{name}_scale", scale, positive=False).to(dev)
        if input_scale is not None:
            if c.quant_mode != "fp8-tensor":
                raise ValueError(f"switchyard: {name}_input_scale given: static input scales are a fp8-tensor option "
                                 "(fp8-block quantises activations dynamically)")
            if tuple(input_scale.shape) != want_s:
                raise ValueError(f"switchyard: {name}_input_scale shape {tuple(input_scale.shape)}, expected {want_s}")
            input_scale = self._fp32_scale(f"{name}_input_scale", input_scale, positive=True).to(dev)
        self._put_fp8(name, codes.detach().to(dev).clone(), scale, input_scale)
        self._fused_ok_cache = {}

    @staticmethod
    def _fp32_scale(name, t, positive):
        if not t.is_floating_point() or t.dtype == torch.float8_e4m3fn:
            raise ValueError(f"switchyard: {name} dtype {t.dtype}: scales are float32 (other float dtypes are read "
                             "exactly)")
        s = t.detach().to(torch.float32).clone()  # exact from bf16, fp16, e8m0 (power-of-two scales)
        if t.dtype == torch.float64 and bool(s.double().ne(t.detach()).any()):
            raise ValueError(f"switchyard: {name} ({t.dtype}) is not exactly representable in float32")
        ok = torch.isfinite(s) & ((s > 0) if positive else (s >= 0))
        if not bool(ok.all()):
            at = (~ok).nonzero()[0].tolist()
            raise ValueError(f"switchyard: {name}{at} = {s[tuple(at)].item()} must be finite and "
                             f"{'> 0' if positive else '>= 0'}")
        return s

    def _weight_shapes(self):
        c = self.config
        r13 = 2 * c.ffn_size if c.gated else c.ffn_size
        s = c.shared_width
        return {"w13": (c.num_experts, r13, c.hidden_size), "w2": (c.num_experts, c.hidden_size, c.ffn_size),
                "shared_w13": ((2 * s if c.gated else s), c.hidden_size) if s else None,
                "shared_w2": (c.hidden_size, s) if s else None}

    # c = grouped_mm_fp8(a, <name> with its scales) (offsets: None for a shared matrix), or F.linear for a float one.
    def _expert_mm(self, a, name, offsets):
        w = getattr(self, name)
        if w.dtype != torch.float8_e4m3fn:
            return F.linear(a, w)
        return _ops.grouped_mm_fp8(a, w, getattr(self, f"{name}_scale"), getattr(self, f"{name}_input_scale"),
                                   offsets, QUANT_MODES[self.config.quant_mode])

    @torch.no_grad()
    def update_score_bias(self, expert_counts: torch.Tensor, rate: Optional[float] = None):
        """Aux-loss-free balancing (DeepSeek-V3), switchyard::update_score_bias: score_bias[e] += rate *
        sign(mean load - load_e), rate = config.bias_update_rate unless given; expert_counts [E] (e.g.
        MoEOutput.expert_counts of the last step). Needs use_score_bias."""
        if self.score_bias is None:
            raise ValueError("switchyard.torch.MoE.update_score_bias: the config has use_score_bias=False")
        rate = self.config.bias_update_rate if rate is None else float(rate)
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"switchyard: update_score_bias rate={rate} must be finite and >= 0")
        counts = expert_counts.to(device=self.score_bias.device, dtype=torch.int64)
        diff = counts.sum() - counts.numel() * counts  # E * (mean - load_e), exact in integers
        self.score_bias.copy_((self.score_bias.double() + rate * torch.sign(diff).double()).float())

    # Router logits [T, E], fp32 (fp64 when x is fp64). Subclasses change where the GEMM is rounded. The library's
    # router_gemm stage (fp32 accumulation of the exact products, on the tensor cores for 16-bit x) when x and the
    # gate share a dtype and device: it computes what F.linear(x.float(), gate.float()) does (another summation
    # order) without the forward's fp32 copy of x and fp32 GEMM off the tensor cores (bench/NOTES.md, "Router and
    # plan"); its backward still runs in fp32 (_router_gemm_backward).
    def _router_logits(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.dtype != torch.float64 and self.gate.dtype == x2.dtype and self.gate.device == x2.device:
            return _ops.router_gemm(x2, self.gate)
        return _linear_logits(x2, self.gate)

    # Selection and combine weights: (ids [T, k] int32, w [T, k] differentiable in logits).
    def _route(self, logits: torch.Tensor):
        c = self.config
        if c.num_groups > 1 and c.group_score == "max":
            return self._route_group_max(logits)
        return _ops.route(logits, self.score_bias, c.top_k, SCORE_FUNCTIONS[c.score_function], c.renormalize,
                          float(c.routed_scale), c.num_groups, c.topk_groups)

    # DeepSeek-V2's group_limited_greedy: a group's score is its best score; the topk_groups best groups are kept
    # (computed here in torch: the library's groups score by the sum of the two best), the experts of the other
    # groups get -inf logits, and the route op selects top-k of what is left (its tie rule: lower index first).
    # The weights come from the unmasked scores in torch autograd, as transformers computes them.
    def _route_group_max(self, logits: torch.Tensor):
        c = self.config
        e, g = c.num_experts, c.num_groups
        with torch.no_grad():
            lg = logits.detach()
            scores = torch.sigmoid(lg) if c.score_function == "sigmoid" else \
                (torch.softmax(lg, -1) if c.score_function == "softmax" else lg)
            group_best = scores.view(-1, g, e // g).amax(-1)
            kept = torch.zeros_like(group_best, dtype=torch.bool)
            kept.scatter_(1, group_best.topk(c.topk_groups, -1).indices, True)
            masked = lg.masked_fill(~kept.repeat_interleave(e // g, 1), float("-inf"))
        ids, _ = _ops.route(masked, None, c.top_k, SCORE_FUNCTIONS[c.score_function], False, 1.0, 1, 1)
        return ids, _weights_of(c, logits, ids)

    # The routed experts, the shared expert and the combine; returns (y, logits, ids, offsets, counts).
    def _layer(self, x2: torch.Tensor):
        c = self.config
        if self.quantized and self.training:
            raise RuntimeError(f"switchyard.torch.MoE: FP8 experts (quant_mode={c.quant_mode!r}) are for inference "
                               "only (no backward through FP8 weights); call .eval() and run under torch.no_grad() "
                               "or torch.inference_mode()")
        logits = self._router_logits(x2)
        ids, w = self._route(logits)
        offsets, slot_row, row_token, counts = _ops.plan(ids, w.detach(), c.num_experts,
                                                         c.capacity_factor_for(self.training), c.min_capacity,
                                                         DROP_POLICIES[c.drop_policy])
        act = ACTIVATIONS[c.activation]
        kernels_take_dtype = not x2.is_cuda or x2.dtype == torch.bfloat16  # the CUDA gated / gathered GEMMs: bf16
        if self.quantized:
            g = self._expert_mm(_ops.gather(x2, row_token, slot_row), "w13", offsets)
            out = self._expert_mm(_ops.activation(g, act), "w2", offsets)
        elif self.gate_up_interleaved and not self._needs_grad(x2) and kernels_take_dtype:
            # GEMM1 and the activation in one kernel (inference: nothing is saved for a backward; other dtypes on CUDA
            # take the staged ops below)
            a, row_index = ((x2, row_token) if self._gather_in_gemm1_for(x2)
                            else (_ops.gather(x2, row_token, slot_row), None))
            h = _ops.grouped_mm_gated(a, self.w13, offsets, act, row_index)
            out = _ops.grouped_mm(h, self.w2, offsets)
        elif self.gate_up_interleaved and kernels_take_dtype and self.gather_in_gemm1 is not True:
            # training in the interleaved layout: GEMM1 stores g and h in one kernel (the gathered GEMM1 has no
            # such kernel: gather_in_gemm1=True takes the staged ops below)
            h, g = _gathered_gated_keep(x2, row_token, slot_row, self.w13, offsets, act)
            out = _gated_down_mm(h, g, self.w2, offsets, act)
            del h, g  # g lives on in the autograd graph only
        else:
            g = _gathered_grouped_mm(x2, row_token, slot_row, self.w13, offsets,
                                     self.gather_in_gemm1 is True and kernels_take_dtype)
            out = _activated_grouped_mm(g, act, self.w2, offsets, self.gate_up_interleaved)
        shared = None
        if self.shared_w13 is not None:
            shared = self._expert_mm(_ops.activation(self._expert_mm(x2, "shared_w13", None), act), "shared_w2", None)
            if self.shared_gate is not None:
                shared = torch.sigmoid(F.linear(x2, self.shared_gate)) * shared
        # offsets[E]: the plan's pairs point at exactly rows [0, offsets[E]), so combine_backward zeroes only the rest
        y = _ops.combine(out, slot_row, w, shared, offsets[-1:])
        return y, logits, ids, offsets, counts

    # Whether this call can run the fused inference op: not inside torch.compile (the choice reads the input's address
    # and asks the library on the host; compiled graphs keep the staged ops, which trace), no gradient wanted, token
    # choice without capacity, the library's router GEMM (not a subclass's), one 16-bit dtype on CUDA, and
    # moe_fused's kernels take the shape.
    def _use_fused(self, x2: torch.Tensor) -> bool:
        if torch.compiler.is_compiling():
            return False
        c, t = self.config, x2.shape[0]
        limit = 64 if self.fused_max_tokens is None else int(self.fused_max_tokens)
        if t < 1 or t > limit or not x2.is_cuda or x2.dtype not in (torch.bfloat16, torch.float16) or self.quantized:
            return False
        if x2.data_ptr() % 16 != 0:  # the fused kernels read 16-byte vectors
            return False
        if self._needs_grad(x2):
            return False
        if c.capacity_factor_for(self.training) > 0 or (c.num_groups > 1 and c.group_score == "max"):
            return False
        if type(self)._router_logits is not MoE._router_logits or not self._params_like(x2):
            return False
        automatic = self.fused_max_tokens is None
        key = (t, x2.dtype, x2.device, automatic)
        if key not in self._fused_ok_cache:
            if automatic:
                ok = _ops.fused_path_preferred(t, c.hidden_size, c.ffn_size, c.num_experts, c.top_k, c.shared_width,
                                               ACTIVATIONS[c.activation], x2)
            else:
                ok = _ops.fused_path_supported(t, c.hidden_size, c.ffn_size, c.num_experts, c.top_k, c.shared_width,
                                               x2)
            self._fused_ok_cache[key] = bool(ok)
        return self._fused_ok_cache[key]

    # Whether the staged inference path's gated GEMM1 reads x through the plan: gather_in_gemm1 if set, else the
    # library's rule (stages.h: gather_in_gemm1_preferred; a host call on integers, no cache: T varies without bound
    # in serving); under torch.compile the automatic choice is the separate gather (the graph cannot hold the call).
    def _gather_in_gemm1_for(self, x2: torch.Tensor) -> bool:
        if self.gather_in_gemm1 is not None:
            return bool(self.gather_in_gemm1)
        if torch.compiler.is_compiling():
            return False
        c = self.config
        return bool(_ops.gather_in_gemm1_preferred(x2.shape[0], c.hidden_size, c.ffn_size, c.num_experts, c.top_k, x2))

    # Whether this call runs the library's MoELayer in one op (moe_forward: the staged chain, one host call instead of
    # one per stage): no gradient wanted, not inside torch.compile (the staged ops trace), float experts, the
    # library's router GEMM, routing, group score and expert chain (not a subclass's, e.g. ExpertParallelMoE's; not
    # group_score="max"), fp32 / bf16 / fp16, and every parameter in x's dtype on x's device.
    def _use_layer_op(self, x2: torch.Tensor) -> bool:
        if torch.compiler.is_compiling() or self.quantized or self._needs_grad(x2):
            return False
        c = self.config
        if x2.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if c.num_groups > 1 and c.group_score == "max":
            return False
        if any(getattr(type(self), f) is not getattr(MoE, f) for f in ("_router_logits", "_route", "_layer")):
            return False
        return self._params_like(x2)

    # Every parameter of the layer in x's dtype on x's device (what the whole-layer ops take).
    def _params_like(self, x2: torch.Tensor) -> bool:
        params = (self.gate, self.w13, self.w2, self.shared_w13, self.shared_w2, self.shared_gate)
        return all(p is None or (p.dtype == x2.dtype and p.device == x2.device) for p in params)

    def _layer_op(self, x2: torch.Tensor):
        c = self.config
        return _ops.moe_forward(
            x2, self.gate, self.score_bias, self.w13, self.w2, self.shared_w13, self.shared_w2, self.shared_gate,
            c.top_k, SCORE_FUNCTIONS[c.score_function], c.renormalize, float(c.routed_scale), c.num_groups,
            c.topk_groups, ACTIVATIONS[c.activation], float(c.capacity_factor_for(self.training)), c.min_capacity,
            DROP_POLICIES[c.drop_policy], self.gate_up_interleaved,
            -1 if self.gather_in_gemm1 is None else int(bool(self.gather_in_gemm1)))

    def _fused_layer(self, x2: torch.Tensor):
        c = self.config
        y, logits, ids, counts = _ops.moe_fused(
            x2, self.gate, self.score_bias, self.w13, self.w2, self.shared_w13, self.shared_w2, self.shared_gate,
            c.top_k, SCORE_FUNCTIONS[c.score_function], c.renormalize, float(c.routed_scale), c.num_groups,
            c.topk_groups, ACTIVATIONS[c.activation], self.gate_up_interleaved)
        return y, logits, ids, counts

    def forward(self, x: torch.Tensor):
        c = self.config
        shape = x.shape
        x2 = x.reshape(-1, c.hidden_size).contiguous()
        if self._use_fused(x2):
            y, logits, ids, counts = self._fused_layer(x2)
            offsets = None  # the fused path is dropless: every routed pair is kept
        elif self._use_layer_op(x2):
            y, logits, ids, counts, offsets = self._layer_op(x2)
        else:
            y, logits, ids, offsets, counts = self._layer(x2)
        y = y.reshape(shape)
        want_stats = self.training if self.return_stats is None else self.return_stats
        if not want_stats:
            return y
        losses = _ops.router_losses(logits, ids, SCORE_FUNCTIONS[c.score_function])
        aux, z = losses[0], losses[1]
        kept = counts if offsets is None else offsets[1:] - offsets[:-1]
        return MoEOutput(y=y, aux_loss=aux, z_loss=z, loss=c.aux_loss_coef * aux + c.z_loss_coef * z,
                         expert_counts=counts, kept_counts=kept)

    # ---- conversion from transformers MoE blocks ------------------------------------------------------------

    @classmethod
    def from_hf(cls, block: nn.Module, hf_config=None, dtype=None, device=None) -> "MoE":
        """Builds a MoE from one transformers sparse-MoE block: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2,
        DeepSeek-V3 (switchyard.hf says what each reads from the block and its config).

        Weights are COPIED (later changes to the block do not reach the MoE, nor the other way round). The expert
        layout comes from the experts module's class: fused ``gate_up_proj`` parameters with transformers'
        ``is_transposed`` / ``is_concatenated`` flags, or per-expert nn.Linear modules (w1/w3/w2 or
        gate_proj/up_proj/down_proj); never from shapes. The result is a :class:`switchyard.hf.HFMoE` (a MoE) with
        the MoE calling convention (y in eval mode, MoEOutput in training); :func:`patch_model` builds the same
        module with the block's calling convention instead. Raises switchyard.hf.UnsupportedBlock for anything
        else."""
        from switchyard import hf
        return hf.convert_block(block, hf_config=hf_config, dtype=dtype, device=device, copy=True,
                                mimic_block=False)


def patch_model(model: nn.Module, **kwargs) -> int:
    """Replaces, in place, every supported sparse-MoE block of a transformers model with a Switchyard module that
    takes the block's input and returns what the block returned; returns how many were replaced. See
    :func:`switchyard.hf.patch_model`."""
    from switchyard import hf
    return hf.patch_model(model, **kwargs)


_FP8_MATRICES = ("w13", "w2", "shared_w13", "shared_w2")


def _plain_gate_up(w: torch.Tensor) -> torch.Tensor:
    """w13 [E, 2F, H] in the plain layout from the interleaved one (MoE.interleave_gate_up_), in torch: row
    16 (f // 8) + 8 half + f % 8 back to row half * F + f."""
    e, r13, h = w.shape
    return w.reshape(e, r13 // 16, 2, 8, h).transpose(1, 2).reshape(e, r13, h)


def _interleaved_gate_up(w: torch.Tensor) -> torch.Tensor:
    e, r13, h = w.shape
    return w.reshape(e, 2, r13 // 16, 8, h).transpose(1, 2).reshape(e, r13, h)


def _w13_plain_in_state_dict(module, state_dict, prefix, local_metadata):
    key = prefix + "w13"
    if getattr(module, "gate_up_interleaved", False) and key in state_dict:
        state_dict[key] = _plain_gate_up(state_dict[key])


def _w13_interleaved_on_load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                             error_msgs):
    key = prefix + "w13"
    if getattr(module, "gate_up_interleaved", False) and key in state_dict and \
            tuple(state_dict[key].shape) == tuple(module.w13.shape):
        state_dict[key] = _interleaved_gate_up(state_dict[key])


# Router logits in plain torch: F.linear on x and the gate both in fp32 (fp64 when x is fp64).
def _linear_logits(x2: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    logit_dtype = torch.float64 if x2.dtype == torch.float64 else torch.float32
    return F.linear(x2.to(logit_dtype), gate.to(logit_dtype))


# Combine weights [T, k] from logits and a selection, in torch autograd (config's score function, renormalisation
# and scale): what the route op computes for its weights, for code that selects in Python.
def _weights_of(c: MoEConfig, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    ids_l = ids.long()
    if c.score_function == "softmax":
        w = torch.softmax(logits, -1).gather(1, ids_l)
    elif c.score_function == "sigmoid":
        w = torch.sigmoid(logits).gather(1, ids_l)
    else:
        w = torch.softmax(logits.gather(1, ids_l), -1)
    if c.renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w * c.routed_scale


def reference_moe(module: MoE, x: torch.Tensor, ids: Optional[torch.Tensor] = None):
    """The same layer in plain PyTorch autograd (a loop over experts), for tests and the training comparison.

    Routing uses the Switchyard selection (``ids``, or the module's own routing when None) so that the two
    implementations compute the same function; everything differentiable (weights from the scores, the experts,
    the shared expert and its gate, the combine) is plain torch. Returns (y, logits, ids)."""
    c = module.config
    x2 = x.reshape(-1, c.hidden_size)
    # The base module's logits in plain torch (an independent check of its router_gemm op); a subclass's own rule
    # (switchyard.hf's logits in the input dtype, ...) as the subclass computes it.
    if type(module)._router_logits is MoE._router_logits:
        logits = _linear_logits(x2, module.gate)
    else:
        logits = module._router_logits(x2)
    if ids is None:
        ids, _ = module._route(logits.detach())
    ids_l = ids.long()
    w = _weights_of(c, logits, ids)
    offsets, slot_row, _, _ = _ops.plan(ids, w.detach(), c.num_experts, c.capacity_factor_for(module.training),
                                        c.min_capacity, DROP_POLICIES[c.drop_policy])
    w = w * (slot_row >= 0).to(w.dtype)  # dropped pairs contribute nothing

    def act(g):
        if c.gated:
            gate, up = g.chunk(2, -1)
            f = F.silu(gate) if c.activation == "swiglu" else F.gelu(gate, approximate="tanh")
            return f * up
        return F.gelu(g, approximate="tanh") if c.activation == "gelu" else F.relu(g)

    y = torch.zeros(x2.shape[0], c.hidden_size, dtype=torch.float32 if x2.dtype != torch.float64 else x2.dtype,
                    device=x2.device)
    w13 = _plain_gate_up(module.w13) if getattr(module, "gate_up_interleaved", False) else module.w13
    for e in range(c.num_experts):
        tok, slot = torch.nonzero(ids_l == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        out = F.linear(act(F.linear(x2[tok], w13[e])), module.w2[e])
        y = y.index_add(0, tok, (w[tok, slot].unsqueeze(1) * out.to(w.dtype)).to(y.dtype))
    if module.shared_w13 is not None:
        shared = F.linear(act(F.linear(x2, module.shared_w13)), module.shared_w2)
        if module.shared_gate is not None:
            shared = torch.sigmoid(F.linear(x2, module.shared_gate)) * shared
        y = y + shared.to(y.dtype)
    return y.to(x.dtype).reshape(x.shape), logits, ids
