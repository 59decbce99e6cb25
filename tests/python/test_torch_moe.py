"""CPU tests of the PyTorch binding (switchyard.torch): gradcheck, a plain-PyTorch reference, torch.compile, from_hf.

Run through CTest (test torch_pytest_cpu, which sets SWITCHYARD_TORCH_LIB and PYTHONPATH), or by hand:
    SWITCHYARD_TORCH_LIB=build/bindings/torch/_switchyard_torch.so PYTHONPATH=python pytest tests/python -m "not gpu"
Every random input comes from a fixed seed named in the test id; gradcheck runs in fp64 (the CPU ops compute in
double), so its default tolerances (atol 1e-5, rtol 1e-3 against central differences with eps 1e-6) apply unchanged.
"""
import types

import pytest
import torch
import torch.nn as nn

import switchyard.torch as st

H, F, E, K, T = 8, 6, 8, 2, 7

CONFIGS = {
    "softmax": dict(),
    "topk-softmax": dict(score_function="topk-softmax", top_k=3),
    "sigmoid-bias-groups": dict(score_function="sigmoid", use_score_bias=True, num_groups=4, topk_groups=2,
                                renormalize=True, routed_scale=2.5),
    "renormalize": dict(renormalize=True),
    "scale": dict(routed_scale=1.7),
    "capacity-position": dict(capacity_factor=0.5, drop_policy="position"),
    "capacity-probability": dict(capacity_factor=0.5, drop_policy="probability"),
    "shared-experts": dict(num_shared_experts=2, shared_ffn_size=3),
    "geglu": dict(activation="geglu"),
    "gelu": dict(activation="gelu"),
    "relu": dict(activation="relu"),
    "losses": dict(aux_loss_coef=0.3, z_loss_coef=0.05),
    "shared-gate": dict(num_shared_experts=1, shared_ffn_size=4, shared_expert_gate=True),  # Qwen2-MoE
    "groups-max": dict(num_groups=2, topk_groups=1, group_score="max", routed_scale=1.5),  # DeepSeek-V2
}


def make_module(name, dtype=torch.float64, seed=0):
    kw = dict(hidden_size=H, ffn_size=F, num_experts=E, top_k=K)
    kw.update(CONFIGS[name])
    torch.manual_seed(seed)
    m = st.MoE(st.MoEConfig(**kw), dtype=dtype)
    if m.score_bias is not None:
        with torch.no_grad():
            m.score_bias.uniform_(-0.2, 0.2)
    return m


def layer_fn(m):
    """(x, params...) -> concatenation of y and the two losses, for gradcheck over every input."""
    names = [n for n, _ in m.named_parameters()]

    def fn(x, *params):
        out = torch.func.functional_call(m, dict(zip(names, params)), (x,))
        return torch.cat([out.y.reshape(-1), out.aux_loss.reshape(1), out.z_loss.reshape(1)])

    return fn, [p.detach().clone().requires_grad_(True) for _, p in m.named_parameters()]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradcheck_fp64(name):
    m = make_module(name, seed=11)
    m.train()
    torch.manual_seed(12)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    fn, params = layer_fn(m)
    if "capacity" in name:  # the config must really drop pairs
        out = m(x)
        assert int(out.kept_counts.sum()) < T * m.config.top_k, "capacity config dropped nothing"
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_plain_pytorch_fp64(name):
    """Forward and every gradient against reference_moe (a loop over experts in plain torch autograd)."""
    m = make_module(name, seed=21)
    torch.manual_seed(22)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(T, H, dtype=torch.float64)
    m.train()
    y = m(x).y
    y_ref, _, _ = st.reference_moe(m, x)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad((y * gy).sum(), [x, *m.parameters()])
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), [x, *m.parameters()])
    for (pname, _), g, gr in zip([("x", None), *m.named_parameters()], grads, grads_ref):
        torch.testing.assert_close(g, gr, atol=1e-12, rtol=1e-10, msg=lambda s: f"grad of {pname}: {s}")


@pytest.mark.parametrize("frozen", [("w13", "w2"), ("gate",), ("w13",), ("w2",)])
def test_frozen_parameters_get_no_gradient_and_the_rest_are_unchanged(frozen):
    """Fine-tuning with some weights frozen: those get no gradient (the fused backwards skip their GEMMs), x and the
    others get exactly the gradients of the all-trainable layer; an input without grad works too."""
    m = make_module("softmax", seed=41)
    m.train()
    torch.manual_seed(42)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(T, H, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    full = dict(zip(["x", *names], torch.autograd.grad((m(x).y * gy).sum(), [x, *m.parameters()])))
    for n in frozen:
        getattr(m, n).requires_grad_(False)
    trainable = [n for n in names if n not in frozen]
    got = torch.autograd.grad((m(x).y * gy).sum(), [x, *[getattr(m, n) for n in trainable]])
    for n, g in zip(["x", *trainable], got):
        torch.testing.assert_close(g, full[n], atol=0, rtol=0, msg=lambda s: f"grad of {n}: {s}")
    x2 = x.detach()  # no input gradient wanted at all
    (m(x2).y * gy).sum().backward()
    for n in names:
        p = getattr(m, n)
        assert (p.grad is None) == (n in frozen), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, full[n], atol=0, rtol=0)


def test_fp32_close_to_fp64():
    m64 = make_module("shared-experts", seed=31)
    m32 = make_module("shared-experts", dtype=torch.float32, seed=31)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    torch.manual_seed(32)
    x = torch.randn(T, H, dtype=torch.float64)
    m64.eval()
    m32.eval()
    y64 = m64(x)
    y32 = m32(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=1e-5, rtol=1e-5)


def test_eval_returns_tensor_and_stats_are_consistent():
    m = make_module("capacity-probability", seed=41)
    torch.manual_seed(42)
    x = torch.randn(3, T, H, dtype=torch.float64)
    m.eval()
    y = m(x)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape
    m.train()
    out = m(x)
    assert int(out.expert_counts.sum()) == 3 * T * K
    assert bool((out.kept_counts <= out.expert_counts).all())
    assert out.aux_loss.item() > 0 and out.z_loss.item() > 0


def test_ops_reject_bad_input():
    with pytest.raises(RuntimeError, match="top_k"):
        torch.ops.switchyard.route(torch.randn(4, 3), None, 5, 0, False, 1.0, 1, 1)
    with pytest.raises(RuntimeError, match="offsets"):
        torch.ops.switchyard.grouped_mm(torch.randn(4, 8), torch.randn(2, 3, 8), torch.zeros(5, dtype=torch.int32))


def test_torch_compile_fullgraph():
    """A small model using the module, compiled with fullgraph=True: same output and gradients as eager."""
    torch.manual_seed(51)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(H, H)
            self.moe = st.MoE(st.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=K, renormalize=True,
                                           aux_loss_coef=0.1, num_shared_experts=1, shared_ffn_size=4))

        def forward(self, x):
            out = self.moe(torch.tanh(self.inp(x)))
            return out.y.square().mean() + out.loss

    model = Model().train()
    x = torch.randn(2, 5, H)
    loss_eager = model(x)
    g_eager = torch.autograd.grad(loss_eager, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    loss_c = compiled(x)
    g_c = torch.autograd.grad(loss_c, list(model.parameters()))
    torch.testing.assert_close(loss_c, loss_eager, atol=1e-5, rtol=1e-5)
    for g1, g2 in zip(g_c, g_eager):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_opcheck():
    """torch.library.opcheck: schema, fake implementation and autograd registration agree with the real op."""
    torch.manual_seed(61)
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    # route has an int32 output (ids): opcheck's AOT-dispatch test builds a float cotangent for it and fails to cast,
    # a limitation of that test utility, so route runs the other three checks.
    torch.library.opcheck(torch.ops.switchyard.route.default, (logits, None, K, 0, True, 1.0, 1, 1),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    ids, w = torch.ops.switchyard.route(logits.detach(), None, K, 0, True, 1.0, 1, 1)
    offsets, slot_row, row_token, _ = torch.ops.switchyard.plan(ids, w, E, 0.0, 0, 0)
    a = torch.randn(T * K, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, 2 * F, H, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.switchyard.grouped_mm.default, (a, b, offsets))
    dc = torch.randn(T * K, 2 * F, dtype=torch.float64)
    torch.library.opcheck(torch.ops.switchyard.grouped_mm_dgrad.default, (dc, b, offsets))
    torch.library.opcheck(torch.ops.switchyard.grouped_mm_wgrad.default, (dc, a, offsets))
    da, db = torch.ops.switchyard.grouped_mm_backward(dc, a, b, offsets)  # the halves equal the pair, bitwise
    assert torch.equal(torch.ops.switchyard.grouped_mm_dgrad(dc, b, offsets), da)
    assert torch.equal(torch.ops.switchyard.grouped_mm_wgrad(dc, a, offsets), db)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.switchyard.gathered_grouped_mm.default, (x, row_token, slot_row, b, offsets))
    xd = x.detach()
    torch.library.opcheck(torch.ops.switchyard.gather.default, (xd, row_token, slot_row))
    assert torch.equal(torch.ops.switchyard.gather(xd, row_token, slot_row), torch.ops.switchyard.gather(xd, row_token))
    g = torch.randn(T * K, 2 * F, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.switchyard.activation.default, (g, 0))
    w2 = torch.randn(E, H, F, dtype=torch.float64, requires_grad=True)
    for act in (0, 2):  # gated (g is [rows, 2F]) and plain (g is [rows, F])
        ga = g if act == 0 else g[:, :F].detach().clone().requires_grad_(True)
        torch.library.opcheck(torch.ops.switchyard.activated_grouped_mm.default, (ga, act, w2, offsets))
    out = torch.randn(T * K, H, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.switchyard.combine.default, (out, slot_row, w.requires_grad_(True), None))
    torch.library.opcheck(torch.ops.switchyard.router_losses.default, (logits, ids, 0))
    xr = torch.randn(T, H, requires_grad=True)  # router_gemm takes fp32 / bf16 / fp16 (its logits are fp32)
    gr = torch.randn(E, H, requires_grad=True)
    torch.library.opcheck(torch.ops.switchyard.router_gemm.default, (xr, gr))
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.switchyard.router_gemm_backward.default,
                              (xr.detach(), gr.detach(), torch.randn(T, E), *need))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_gemm_is_the_fp32_linear(dtype):
    """The module's router logits come from the router_gemm stage: the exact products summed (in double on the CPU,
    rounded once to fp32), and its gradients from the router_gemm_backward stage: on the CPU the exact sums (double)
    rounded through fp32 to each tensor's dtype, which is what autograd takes through
    torch.nn.functional.linear(x.float(), gate.float()) up to the fp32 summation's error."""
    torch.manual_seed(67)
    x = torch.randn(37, H, dtype=dtype, requires_grad=True)
    gate = torch.randn(E, H, dtype=dtype, requires_grad=True)
    logits = torch.ops.switchyard.router_gemm(x, gate)
    assert logits.dtype == torch.float32 and logits.shape == (37, E)
    assert torch.equal(logits, torch.nn.functional.linear(x.detach().double(), gate.detach().double()).float())
    d = torch.randn(37, E)
    dx, dg = torch.autograd.grad(logits, (x, gate), d)
    x2 = x.detach().clone().requires_grad_(True)
    g2 = gate.detach().clone().requires_grad_(True)
    want_dx, want_dg = torch.autograd.grad(torch.nn.functional.linear(x2.float(), g2.float()), (x2, g2), d)
    assert dx.dtype == dtype and dg.dtype == dtype
    exact_dx = d.double() @ gate.detach().double()
    exact_dg = d.double().t() @ x.detach().double()
    assert torch.equal(dx, exact_dx.float().to(dtype))
    assert torch.equal(dg, exact_dg.float().to(dtype))
    # autograd's fp32 sums: within one rounding of the dtype plus (K + 1) u sum|terms| of the exact value
    u = torch.finfo(dtype).eps
    for got, want, mag, k in ((dx, want_dx, d.abs().double() @ gate.detach().abs().double(), E),
                              (dg, want_dg, d.abs().double().t() @ x.detach().abs().double(), 37)):
        bound = u * want.double().abs() + (k + 1) * 2.0 ** -24 * mag
        assert ((got.double() - want.double()).abs() <= bound).all()
    dx0, dg0 = torch.ops.switchyard.router_gemm_backward(x.detach(), gate.detach(), d, True, False)
    assert torch.equal(dx0, dx) and dg0.numel() == 0
    cfg = st.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=K)
    m = st.MoE(cfg, dtype=dtype)
    xm = torch.randn(5, H, dtype=dtype)
    assert torch.equal(m._router_logits(xm), torch.ops.switchyard.router_gemm(xm, m.gate))


# ---- MoEConfig options beyond the route/plan arguments ---------------------------------------------------------


@pytest.mark.parametrize("bad", [dict(routing_mode="sideways"), dict(top_k=0), dict(top_k=9), dict(num_groups=3),
                                 dict(num_groups=4, topk_groups=5), dict(num_groups=4, topk_groups=1, top_k=3),
                                 dict(capacity_factor=-1.0), dict(eval_capacity_factor=float("nan")),
                                 dict(bias_update_rate=-1e-3), dict(shared_expert_gate=True),
                                 dict(num_shared_experts=1), dict(group_score="mean"), dict(routed_scale=1e39),
                                 dict(routing_mode="expert-choice", use_score_bias=True),
                                 dict(routing_mode="expert-choice", score_function="topk-softmax")])
def test_config_validation_names_the_option(bad):
    kw = dict(hidden_size=H, ffn_size=F, num_experts=E, top_k=K)
    kw.update(bad)
    with pytest.raises(ValueError, match="switchyard: "):
        st.MoEConfig(**kw).validate()


def test_expert_choice_config_is_valid_but_has_no_torch_op_yet():
    cfg = st.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=K, routing_mode="expert-choice")
    cfg.validate()
    with pytest.raises(NotImplementedError, match="expert-choice"):
        st.MoE(cfg)


def test_eval_capacity_factor_applies_in_eval_only():
    torch.manual_seed(51)
    m = st.MoE(st.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=K, capacity_factor=0.5,
                            eval_capacity_factor=0.0), dtype=torch.float64)
    x = torch.randn(4 * T, H, dtype=torch.float64)
    m.train()
    assert int(m(x).kept_counts.sum()) < 4 * T * K  # training: capacity 0.5 drops pairs
    m.eval()
    y_eval = m(x)
    m.return_stats = True
    assert int(m(x).kept_counts.sum()) == 4 * T * K  # eval: dropless
    m.return_stats = None
    y_ref, _, _ = st.reference_moe(m, x)
    torch.testing.assert_close(y_eval, y_ref, atol=1e-12, rtol=1e-12)


def test_update_score_bias_is_the_library_rule():
    m = make_module("sigmoid-bias-groups")
    m.config.bias_update_rate = 0.25
    before = m.score_bias.clone()
    counts = torch.tensor([4, 0, 2, 2, 2, 3, 1, 2], dtype=torch.int32)  # mean 2
    m.update_score_bias(counts)
    torch.testing.assert_close(m.score_bias, before + 0.25 * torch.tensor([-1., 1, 0, 0, 0, -1, 1, 0]))
    with pytest.raises(ValueError, match="use_score_bias"):
        make_module("softmax").update_score_bias(counts)


def test_group_score_max_keeps_the_groups_with_the_best_expert():
    """DeepSeek-V2's group_limited_greedy: groups ranked by their best score, top-k inside the kept groups."""
    m = make_module("groups-max", seed=61)
    torch.manual_seed(62)
    logits = torch.randn(50, E, dtype=torch.float64)
    ids, w = m._route(logits)
    p = torch.softmax(logits, -1)
    group_best = p.view(50, 2, 4).amax(-1)
    kept = torch.zeros(50, 2, dtype=torch.bool).scatter_(1, group_best.topk(1, -1).indices, True)
    want = p.masked_fill(~kept.repeat_interleave(4, 1), 0).topk(K, -1)
    assert torch.equal(ids.long().sort(-1).values, want.indices.sort(-1).values)
    torch.testing.assert_close(w, p.gather(1, ids.long()) * 1.5)
    assert not torch.equal(ids.long().sort(-1).values, p.topk(K, -1).indices.sort(-1).values)  # groups mattered


# ---- from_hf with stand-ins of transformers 4.x blocks (one nn.Linear module per expert, no transformers needed);
# tests/python/test_torch_hf.py converts the real transformers classes ------------------------------------------


def _linear(o, i):
    return nn.Linear(i, o, bias=False).double()


class _MixtralExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3, self.w2 = _linear(F, H), _linear(F, H), _linear(H, F)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class MixtralSparseMoeBlock(nn.Module):
    """Mixtral's sparse MoE block as transformers 4.x wrote it: softmax over E, top-k, renormalised, loop over
    experts (from_hf recognises blocks by class name)."""

    def __init__(self):
        super().__init__()
        self.top_k = K
        self.gate = _linear(E, H)
        self.experts = nn.ModuleList([_MixtralExpert() for _ in range(E)])

    def forward(self, x):
        p = torch.softmax(self.gate(x), -1)
        w, ids = p.topk(self.top_k, -1)
        w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(self.top_k):
                y[t] += w[t, j] * self.experts[int(ids[t, j])](x[t])
        return y


class _DSExpert(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = _linear(f, H), _linear(f, H), _linear(H, f)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _DSGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, H, dtype=torch.float64))
        self.e_score_correction_bias = torch.randn(E, dtype=torch.float64) * 0.1


class DeepseekV3MoE(nn.Module):
    """DeepSeek-V3's MoE: sigmoid scores, bias for selection, group-limited top-k, renormalise, scale, shared."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(num_experts_per_tok=K, n_group=4, topk_group=2, norm_topk_prob=True,
                                            routed_scaling_factor=2.5, hidden_act="silu")
        self.gate = _DSGate()
        self.experts = nn.ModuleList([_DSExpert(F) for _ in range(E)])
        self.shared_experts = _DSExpert(5)

    def forward(self, x):
        c = self.config
        s = torch.sigmoid(x @ self.gate.weight.T)
        sel = s + self.gate.e_score_correction_bias
        g = sel.view(x.shape[0], c.n_group, -1).topk(2, -1)[0].sum(-1)
        keep = torch.zeros_like(g).scatter_(1, g.topk(c.topk_group, -1)[1], 1.0)
        mask = keep.repeat_interleave(E // c.n_group, 1)
        ids = sel.masked_fill(mask == 0, float("-inf")).topk(K, -1)[1]
        w = s.gather(1, ids)
        w = w / w.sum(-1, keepdim=True) * c.routed_scaling_factor
        y = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(K):
                y[t] += w[t, j] * self.experts[int(ids[t, j])](x[t])
        return y + self.shared_experts(x)


@pytest.mark.parametrize("block_cls", [MixtralSparseMoeBlock, DeepseekV3MoE])
def test_from_hf_matches_block(block_cls):
    torch.manual_seed(71)
    block = block_cls()
    m = st.MoE.from_hf(block).eval()
    x = torch.randn(T, H, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), block(x), atol=1e-10, rtol=1e-10)
    # Copied, not shared: changing the block afterwards leaves the module alone.
    before = m.w2.detach().clone()
    with torch.no_grad():
        block.experts[0].w2.weight.add_(1.0) if hasattr(block.experts[0], "w2") else \
            block.experts[0].down_proj.weight.add_(1.0)
    assert torch.equal(m.w2.detach(), before)


# The fused inference op (moe_fused = route_fused + experts_fused): on CPU tensors it runs the CPU chains, so it must
# compute what the module's staged ops compute (logits from the library's router GEMM in double vs F.linear in fp32:
# the same selection on these seeds, y within fp32 rounding).
@pytest.mark.parametrize("name", ["softmax", "topk-softmax", "sigmoid-bias-groups", "renormalize", "scale",
                                  "shared-experts", "geglu", "gelu", "relu", "shared-gate"])
def test_moe_fused_op_on_cpu_matches_the_staged_module(name):
    m = make_module(name, dtype=torch.float32, seed=11).eval()
    c = m.config
    torch.manual_seed(12)
    x = torch.randn(T, H)
    with torch.no_grad():
        want = m(x)
        y, logits, ids, counts = torch.ops.switchyard.moe_fused(
            x, m.gate, m.score_bias, m.w13, m.w2, m.shared_w13, m.shared_w2, m.shared_gate, c.top_k,
            st.SCORE_FUNCTIONS[c.score_function], c.renormalize, float(c.routed_scale), c.num_groups, c.topk_groups,
            st.ACTIVATIONS[c.activation])
    want_ids, _ = m._route(m._router_logits(x))
    assert torch.equal(ids, want_ids)
    assert torch.equal(counts, torch.bincount(ids.reshape(-1).long(), minlength=E).int())
    torch.testing.assert_close(logits, m._router_logits(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-5)


def test_fused_path_is_automatic_by_default_and_cuda_only():
    m = make_module("softmax", dtype=torch.float32).eval()
    assert m.fused_max_tokens is None  # automatic: stages.h fused_path_preferred
    with torch.no_grad():
        assert not m._use_fused(torch.randn(3, H))  # CPU tensors: the staged ops
    assert not torch.ops.switchyard.fused_path_supported(1, 64, 32, 8, 2, 0, torch.empty(1))  # cpu
    assert not torch.ops.switchyard.fused_path_preferred(1, 64, 32, 8, 2, 0, 0, torch.empty(1))  # cpu
