"""switchyard.ep: expert parallelism for switchyard.torch.MoE through a torch.distributed process group.

:class:`ExpertParallelMoE` is a :class:`switchyard.torch.MoE` whose E experts are spread over the W ranks of a process
group; each rank holds the router (``gate``, ``score_bias``) and the shared experts (replicated) and the weights of
its own L experts only (``w13`` [L, R13, H], ``w2`` [L, H, F], in the placement's local order). Forward and backward
are the existing switchyard ops plus torch.distributed collectives, so any backend that has ``all_to_all_single``
with split sizes runs it (NCCL on GPUs, gloo on the CPU, where the tests run). A separate class rather than a
``process_group`` argument of MoE: the parameter shapes differ ([L, ...] instead of [E, ...]), and MoE's fused
inference path, FP8 experts and capacity dropping do not apply, so none of MoE's code paths change.

Forward on rank r for its own T_r tokens (docs/expert_parallel.md, "PyTorch"):

    logits, ids, w   router + route at home (as MoE)
    plan             plan of ids renumbered in placement order (rank 0's experts in local order, then rank 1's, ...),
                     so that the rows for each destination rank are contiguous, in its local-expert order
    xs [T_r*k, H]    gather(x, row_token)                                   autograd: gather_backward(., slot_row)
    counts           all_to_all_single of the [W, L_max] rows-per-(destination, local expert) int32 matrix, then ONE
                     device->host copy of the send and received counts: the host synchronisation of the forward
                     (the variable all-to-all's split sizes are host lists); the backward has none
    xr_src           all_to_all_single(xs) with those split sizes (torch.distributed.nn.functional: its backward is
                     the reverse exchange); rows arrive grouped by source rank, then local expert, then token order
    g                gathered_grouped_mm(xr_src, perm, ...): the gather by perm regroups the rows by local expert
                     (for local expert l: rows from rank 0, then rank 1, ...: the C++ plan's receive order), then
                     GEMM1 over the L local experts; its backward scatters the input gradient back by the inverse
                     permutation (gather_backward)
    out              activated_grouped_mm(g, w2)                            as MoE
    ret [T_r*k, H]   out.index_select(inverse perm), then the reverse all_to_all_single: every output row returns to
                     the row of xs its input left from, so the plan's slot_row addresses it
    y                combine(ret, slot_row, w, shared) at home; shared expert at home (as MoE)

Gradients: the local experts' ``w13`` / ``w2`` get their full gradient on their owner rank (the rows of every rank
meet there), i.e. the gradient of the SUM of all ranks' losses; ``gate``, ``shared_*`` get this rank's tokens'
contribution only: sum them over the group as data parallelism does (:meth:`ExpertParallelMoE.all_reduce_replicated_grads`;
not DDP, which averages and would average w13 / w2 too). x's gradient is complete (its tokens stay on its rank).

Collective rules: every rank of the group calls forward (and backward) together, with the same config and placement,
grad mode and ``requires_grad`` settings of the parameters (whether an exchange has a backward must agree on every
rank); a rank may have zero tokens.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F

from switchyard.torch import (ACTIVATIONS, DROP_POLICIES, MoE, MoEConfig, _activated_grouped_mm,
                              _gathered_grouped_mm, _ops)

__all__ = ["ExpertPlacement", "ExpertParallelMoE"]


class ExpertPlacement:
    """Which rank holds each of E experts and its index among that rank's local experts (the order of the rank's
    w13 / w2 rows): the rule of switchyard::ExpertPlacement (include/switchyard/expert_parallel.h)."""

    def __init__(self, num_experts: int, experts_of_rank: Sequence[Sequence[int]], contiguous: bool = False):
        e = int(num_experts)
        if e <= 0:
            raise ValueError(f"switchyard: placement num_experts={num_experts} must be positive")
        lists = [[int(i) for i in lst] for lst in experts_of_rank]
        if not lists:
            raise ValueError("switchyard: placement needs at least one rank")
        rank_of = [-1] * e
        for r, lst in enumerate(lists):
            if not lst:
                raise ValueError(f"switchyard: placement rank {r} holds no expert (every rank needs at least one)")
            for i in lst:
                if not 0 <= i < e:
                    raise ValueError(f"switchyard: placement rank {r} lists expert {i}, outside [0, {e})")
                if rank_of[i] >= 0:
                    raise ValueError(f"switchyard: placement lists expert {i} twice (ranks {rank_of[i]} and {r})")
                rank_of[i] = r
        missing = [i for i in range(e) if rank_of[i] < 0]
        if missing:
            raise ValueError(f"switchyard: placement leaves expert {missing[0]} on no rank")
        self.num_experts = e
        self.experts_of_rank = lists
        self.rank_of = rank_of
        self._contiguous = contiguous

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> "ExpertPlacement":
        """Rank r holds a contiguous block; the first E % W ranks one expert more (E = 10, W = 4: 3 3 2 2)."""
        e, w = int(num_experts), int(world_size)
        if not 1 <= w <= e:
            raise ValueError(f"switchyard: contiguous placement needs 1 <= world_size={w} <= num_experts={e}")
        base, extra = divmod(e, w)
        lists, first = [], 0
        for r in range(w):
            n = base + (1 if r < extra else 0)
            lists.append(list(range(first, first + n)))
            first += n
        return cls(e, lists, contiguous=True)

    @classmethod
    def from_lists(cls, num_experts: int, experts_of_rank: Sequence[Sequence[int]]) -> "ExpertPlacement":
        """Explicit: experts_of_rank[r] lists rank r's experts (global ids) in local order; every expert once."""
        return cls(num_experts, experts_of_rank)

    @property
    def world_size(self) -> int:
        return len(self.experts_of_rank)

    def local_experts(self, rank: int) -> List[int]:
        return list(self.experts_of_rank[rank])

    def num_local(self, rank: int) -> int:
        return len(self.experts_of_rank[rank])

    def max_local(self) -> int:
        return max(len(lst) for lst in self.experts_of_rank)

    def order(self) -> List[int]:
        """The experts in placement order: rank 0's in local order, then rank 1's, ..."""
        return [i for lst in self.experts_of_rank for i in lst]

    def __eq__(self, other) -> bool:
        return isinstance(other, ExpertPlacement) and (self.num_experts, self.experts_of_rank) == \
            (other.num_experts, other.experts_of_rank)

    def __repr__(self) -> str:
        if self._contiguous:
            return f"contiguous(E={self.num_experts}, W={self.world_size})"
        return f"map(E={self.num_experts}, W={self.world_size}: " + " ".join(
            "[" + " ".join(map(str, lst)) + "]" for lst in self.experts_of_rank) + ")"


def check_expert_parallel_config(config: MoEConfig):
    """Raises for the options expert parallelism does not run (the C++ layer's refusals), naming them."""
    config.validate()
    if config.routing_mode != "token-choice":
        raise NotImplementedError(f"switchyard.ep: routing_mode={config.routing_mode!r}: expert-choice routing picks "
                                  "each expert's top-C tokens of the whole batch, which no rank sees; use token-choice")
    if config.capacity_factor > 0 or config.eval_capacity_factor > 0:
        raise NotImplementedError(
            f"switchyard.ep: capacity_factor={config.capacity_factor}, eval_capacity_factor="
            f"{config.eval_capacity_factor}: capacity is a per-expert limit over the whole batch (applied per rank it "
            "would drop other pairs than the single-device layer); expert parallelism is dropless only (0)")
    if config.quant_mode != "none":
        raise NotImplementedError(f"switchyard.ep: quant_mode={config.quant_mode!r}: FP8 experts are not supported "
                                  "in expert-parallel mode yet")


# gather with the library's backward (gather_backward sums a token's k rows in slot order, as the single-device
# gathered_grouped_mm does, so x's gradient from the experts is bitwise the single-device one on the CPU).
class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_token, slot_row):
        ctx.save_for_backward(slot_row)
        return _ops.gather(x, row_token)

    @staticmethod
    def backward(ctx, d_xs):
        (slot_row,) = ctx.saved_tensors
        return _ops.gather_backward(d_xs.contiguous(), slot_row), None, None


def _exclusive_cumsum(t: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(t, 0) - t


class ExpertParallelMoE(MoE):
    """switchyard.torch.MoE with its experts spread over the ranks of ``process_group`` (default: the world group).

    ``placement``: None (contiguous blocks: the first E % W ranks one expert more), an :class:`ExpertPlacement`, or
    a list of W lists of global expert ids (rank r's experts in local order). Parameters: ``gate``, ``score_bias``,
    ``shared_*`` as MoE (replicated: keep them equal on every rank); ``w13`` [L, R13, H] and ``w2`` [L, H, F] of this
    rank's experts ``local_experts`` (freshly initialised here; :meth:`from_moe` copies a full MoE's weights).

    forward(x [..., H]) is collective (module docstring); it returns what MoE returns, for this rank's tokens:
    ``MoEOutput.expert_counts`` / ``kept_counts`` count this rank's pairs per global expert (all_reduce them for the
    batch's; :meth:`update_score_bias` does, so that the bias stays the same on every rank), and the auxiliary
    losses are those of this rank's tokens. One host synchronisation per forward (the exchanged row counts are read
    on the host to size the variable all-to-all); none in the backward. Not capturable in a CUDA graph, and
    torch.compile breaks the graph at the exchanges.

    Refused (constructor): capacity_factor / eval_capacity_factor > 0 (dropless only), expert-choice routing, FP8.
    """

    def __init__(self, config: MoEConfig, process_group=None, placement=None, dtype: torch.dtype = torch.float32,
                 device=None, return_stats=None):
        check_expert_parallel_config(config)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("switchyard.ep.ExpertParallelMoE: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        group = process_group if process_group is not None else dist.group.WORLD
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if placement is None:
            placement = ExpertPlacement.contiguous(config.num_experts, world)
        elif not isinstance(placement, ExpertPlacement):
            placement = ExpertPlacement.from_lists(config.num_experts, placement)
        if placement.num_experts != config.num_experts or placement.world_size != world:
            raise ValueError(f"switchyard.ep: placement {placement} does not fit num_experts={config.num_experts}, "
                             f"world size {world}")
        # MoE's constructor on the meta device (no [E, ...] expert weights are allocated), then local shapes.
        super().__init__(config, dtype=dtype, device="meta", return_stats=return_stats)
        c, n_local = config, placement.num_local(rank)
        r13 = 2 * c.ffn_size if c.gated else c.ffn_size
        self.w13 = nn.Parameter(torch.empty(n_local, r13, c.hidden_size, dtype=dtype, device="meta"))
        self.w2 = nn.Parameter(torch.empty(n_local, c.hidden_size, c.ffn_size, dtype=dtype, device="meta"))
        self.to_empty(device=torch.device("cpu") if device is None else device)
        with torch.no_grad():
            if self.score_bias is not None:
                self.score_bias.zero_()
        self.reset_parameters()
        self.process_group = group
        self.placement = placement
        self.rank, self.world_size = rank, world
        self.local_experts = placement.local_experts(rank)
        dev = self.gate.device
        order = placement.order()
        position = [0] * c.num_experts  # expert -> its index in placement order
        for p, e in enumerate(order):
            position[e] = p
        lmax = placement.max_local()
        pad_index = [r * lmax + l for r in range(world) for l in range(placement.num_local(r))]  # noqa: E741
        self._identity_order = order == list(range(c.num_experts))
        self.register_buffer("_position", torch.tensor(position, dtype=torch.int32, device=dev), persistent=False)
        self.register_buffer("_pad_index", torch.tensor(pad_index, dtype=torch.int64, device=dev), persistent=False)

    @classmethod
    def from_moe(cls, moe: MoE, process_group=None, placement=None) -> "ExpertParallelMoE":
        """This rank's share of a full MoE: the router and shared experts copied, w13 / w2 rows of the local experts
        copied (same dtype and device as moe.gate; mode and return_stats copied)."""
        if isinstance(moe, ExpertParallelMoE):
            raise ValueError("switchyard.ep.from_moe: the module is already expert-parallel")
        m = cls(dataclasses.replace(moe.config), process_group=process_group, placement=placement,
                dtype=moe.gate.dtype, device=moe.gate.device, return_stats=moe.return_stats)
        idx = torch.tensor(m.local_experts, dtype=torch.int64, device=moe.w13.device)
        with torch.no_grad():
            for name in ("gate", "shared_w13", "shared_w2", "shared_gate", "score_bias"):
                src = getattr(moe, name)
                if src is not None:
                    getattr(m, name).copy_(src)
            m.w13.copy_(moe.w13.index_select(0, idx))
            m.w2.copy_(moe.w2.index_select(0, idx))
        m.train(moe.training)
        return m

    def replicated_parameters(self):
        """(name, parameter) of the replicated parameters: every one but the local experts' w13 / w2."""
        return [(n, p) for n, p in self.named_parameters() if n not in ("w13", "w2")]

    @torch.no_grad()
    def all_reduce_replicated_grads(self):
        """Sums the replicated parameters' gradients over the group (collective), so that every gradient of this
        module is that of the SUM of all ranks' losses, as the local experts' already are (their rows from every
        rank meet on the owner). DDP instead AVERAGES: wrapping this module in DDP would also average (and need
        equal shapes of) w13 / w2 and leave the experts' gradients W times the replicated ones' scale, so use this
        (or divide everything by W for the mean). A parameter without a gradient on this rank contributes zeros."""
        for _, p in self.replicated_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.process_group)

    @torch.no_grad()
    def update_score_bias(self, expert_counts: torch.Tensor, rate=None, all_reduce: bool = True):
        """Aux-loss-free balancing on the group's load (collective unless all_reduce=False): expert_counts [E], this
        rank's counts (MoEOutput.expert_counts), are summed over the group first, then every rank applies
        MoE.update_score_bias to the sum, so the replicated bias stays bitwise the same on every rank, equal to a
        single process's update on the whole batch. all_reduce=False: expert_counts are already the group's."""
        if self.score_bias is None:  # checked before the collective, so that every rank raises alike
            raise ValueError("switchyard.ep.update_score_bias: the config has use_score_bias=False")
        counts = expert_counts.detach().to(device=self.score_bias.device, dtype=torch.int64).clone()
        if all_reduce:
            dist.all_reduce(counts, group=self.process_group)
        super().update_score_bias(counts, rate)

    def quantize_(self, mode: str = "fp8-block"):
        raise NotImplementedError("switchyard.ep: FP8 experts are not supported in expert-parallel mode yet")

    def _use_fused(self, x2: torch.Tensor) -> bool:
        return False

    def _weight_shapes(self):
        shapes = super()._weight_shapes()
        n_local = len(self.local_experts)
        shapes["w13"] = (n_local,) + shapes["w13"][1:]
        shapes["w2"] = (n_local,) + shapes["w2"][1:]
        return shapes

    # The exchange's sizes: per-(destination, local expert) send counts from counts_p (this rank's pairs per expert
    # in placement order), exchanged with all_to_all_single; returns (send rows per destination [W] and receive
    # rows per source [W] as host lists, the received [W, L] counts on the device).
    def _exchange_counts(self, counts_p: torch.Tensor):
        w, lmax, n_local = self.world_size, self.placement.max_local(), len(self.local_experts)
        send = torch.zeros(w * lmax, dtype=torch.int32, device=counts_p.device)
        send.index_copy_(0, self._pad_index, counts_p)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.process_group)
        host = torch.cat([send, recv]).cpu().view(2, w, lmax)  # THE host synchronisation of the forward
        send_rows = host[0].sum(1).tolist()
        recv_rows = host[1, :, :n_local].sum(1).tolist()
        return send_rows, recv_rows, recv.view(w, lmax)[:, :n_local]

    # The routed experts through the group, the shared expert and the combine; returns what MoE._layer returns:
    # (y, logits, ids, offsets, counts), offsets being the cumulated per-expert counts of this rank's pairs (dropless:
    # MoEOutput.kept_counts = expert_counts).
    def _layer(self, x2: torch.Tensor):
        c = self.config
        h = c.hidden_size
        logits = self._router_logits(x2)
        ids, w = self._route(logits)
        ids_p = ids if self._identity_order else self._position[ids.long()]
        _, slot_row, row_token, counts_p = _ops.plan(ids_p, w.detach(), c.num_experts, 0.0, 0,
                                                     DROP_POLICIES[c.drop_policy])
        counts = counts_p if self._identity_order else counts_p[self._position.long()]
        xs = _Gather.apply(x2, row_token, slot_row)
        if torch.is_grad_enabled() and not xs.requires_grad and any(p.requires_grad for p in self.parameters()):
            # Both exchanges must have a backward on every rank or on none: make the dispatch differentiable even
            # where x needs no gradient (its gradient lands in this temporary leaf).
            xs = xs.detach().requires_grad_()
        send_rows, recv_rows, recv_counts = self._exchange_counts(counts_p)
        n_recv, n_send = sum(recv_rows), sum(send_rows)
        xr_src = dist_fn.all_to_all_single(xs.new_empty((n_recv, h)), xs, recv_rows, send_rows,
                                           group=self.process_group)
        # Regroup by local expert: perm[i] = the xr_src row of receive row i, where receive rows run over local
        # experts l, then source ranks s, then the sender's row order (all on the device: no second synchronisation).
        cnt = recv_counts.to(torch.int64)  # [W, L]
        src_start = _exclusive_cumsum(cnt.reshape(-1)).view_as(cnt)
        seg_cnt = cnt.t().reshape(-1)  # segments in (l, s) order
        seg_src = src_start.t().reshape(-1)
        seg_dst = _exclusive_cumsum(seg_cnt)
        arange = torch.arange(n_recv, dtype=torch.int64, device=x2.device)
        perm = torch.repeat_interleave(seg_src - seg_dst, seg_cnt, output_size=n_recv) + arange
        inv_perm = torch.empty_like(perm).index_copy_(0, perm, arange)
        local_offsets = torch.cat([cnt.new_zeros(1), torch.cumsum(cnt.sum(0), 0)]).to(torch.int32)
        act = ACTIVATIONS[c.activation]
        g = _gathered_grouped_mm(xr_src, perm.to(torch.int32), inv_perm.to(torch.int32).view(-1, 1), self.w13,
                                 local_offsets)
        out = _activated_grouped_mm(g, act, self.w2, local_offsets)
        ret = dist_fn.all_to_all_single(out.new_empty((n_send, h)), out.index_select(0, inv_perm), send_rows,
                                        recv_rows, group=self.process_group)
        shared = None
        if self.shared_w13 is not None:
            shared = F.linear(_ops.activation(F.linear(x2, self.shared_w13), act), self.shared_w2)
            if self.shared_gate is not None:
                shared = torch.sigmoid(F.linear(x2, self.shared_gate)) * shared
        y = _ops.combine(ret, slot_row, w, shared)
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0, dtype=torch.int32)])
        return y, logits, ids, offsets, counts
