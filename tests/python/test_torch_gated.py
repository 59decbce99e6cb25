"""switchyard.torch: GEMM1 with the gated activation in one step (switchyard::grouped_mm_gated,
switchyard::interleave_gate_up) and MoE.interleave_gate_up_.

On the CPU the op is its specification (grouped_mm into h's dtype, then the activation), so the interleaved module
must give the plain module's bits; on an sm_90 GPU the fused kernel rounds gate and up as the unfused path stores
them, so there too the bits must match (bf16). Under autograd the interleaved module takes GEMM1's product and h
from one kernel (grouped_mm_gated_keep), the activation and its gradient reading the interleaved columns in place,
and must train as the plain one and as its own staged ops. The layout conversion is checked against its definition, and
the module's state_dict keeps the plain layout both ways.
"""
import pytest
import torch

import switchyard.torch as st
from test_torch_layer_op import _Recorder  # records which switchyard ops a call ran

H, F, E, K, T = 16, 16, 8, 2, 13


def make(activation="swiglu", dtype=torch.float32, device="cpu", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = st.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=K, activation=activation, **kw)
    return st.MoE(cfg, dtype=dtype, device=device)


def test_interleave_gate_up_op_is_the_definition_and_inverts():
    w = torch.randn(3, 2 * F, 5)
    wi = torch.ops.switchyard.interleave_gate_up(w, False)
    for f in range(F):
        row = 16 * (f // 8) + f % 8
        assert torch.equal(wi[:, row], w[:, f])
        assert torch.equal(wi[:, row + 8], w[:, F + f])
    assert torch.equal(torch.ops.switchyard.interleave_gate_up(wi, True), w)


@pytest.mark.parametrize("act", [0, 1])  # SwiGLU, GeGLU
def test_grouped_mm_gated_equals_grouped_mm_then_activation(act):
    torch.manual_seed(3)
    counts = torch.tensor([3, 0, 5, 2], dtype=torch.int32)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).to(torch.int32)])
    a = torch.randn(12, H)  # rows 10, 11 owned by no expert
    w13 = torch.randn(4, 2 * F, H)
    want = torch.ops.switchyard.activation(torch.ops.switchyard.grouped_mm(a, w13, offsets), act)
    got = torch.ops.switchyard.grouped_mm_gated(a, torch.ops.switchyard.interleave_gate_up(w13, False), offsets, act)
    assert torch.equal(got, want)
    assert torch.equal(got[10:], torch.zeros(2, F))
    torch.library.opcheck(torch.ops.switchyard.grouped_mm_gated.default,
                          (a, torch.ops.switchyard.interleave_gate_up(w13, False), offsets, act),
                          test_utils=("test_schema", "test_faketensor"))


def _gathered_case(device, dtype, h=H):
    torch.manual_seed(11)
    counts = torch.tensor([3, 0, 5, 2], dtype=torch.int32)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).to(torch.int32)]).to(device)
    x = torch.randn(7, h, device=device).to(dtype)
    row_index = torch.tensor([6, 0, 3, 3, 1, 5, 2, 0, 4, 6, -1, -1], dtype=torch.int32, device=device)
    w13i = torch.ops.switchyard.interleave_gate_up(torch.randn(4, 2 * F, h, device=device).to(dtype), False)
    return x, row_index, offsets, w13i


def _check_gathered(device, dtype, act, h=H):
    x, row_index, offsets, w13i = _gathered_case(device, dtype, h)
    xp = torch.ops.switchyard.gather(x, row_index)
    want = torch.ops.switchyard.grouped_mm_gated(xp, w13i, offsets, act)
    got = torch.ops.switchyard.grouped_mm_gated(x, w13i, offsets, act, row_index)
    assert got.shape == want.shape == (12, F)
    assert torch.equal(got, want)  # the same products in the same order: the same bits
    assert torch.equal(got[10:], torch.zeros_like(got[10:]))
    assert got[:10].abs().mean() > 1e-3
    return x, row_index, offsets, w13i


@pytest.mark.parametrize("act", [0, 1])  # SwiGLU, GeGLU
def test_grouped_mm_gated_with_row_index_is_the_gathered_copys(act):
    """row_index: x's rows read through the index (the gather in GEMM1's loads) give the call on the gathered copy."""
    x, row_index, offsets, w13i = _check_gathered("cpu", torch.float32, act)
    torch.library.opcheck(torch.ops.switchyard.grouped_mm_gated.default, (x, w13i, offsets, act, row_index),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("act", [0, 1])
def test_grouped_mm_gated_with_row_index_is_the_gathered_copys_on_gpu(act):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the gated kernel needs an sm_90 GPU")
    _check_gathered("cuda", torch.bfloat16, act, h=64)


def _dgrad_activation_case(device, dtype, seed=5, h=H, f=F):
    torch.manual_seed(seed)
    counts = torch.tensor([3, 0, 5, 2], dtype=torch.int32)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).to(torch.int32)]).to(device)
    dc = torch.randn(12, h, device=device).to(dtype)  # rows 10, 11 owned by no expert
    w2 = torch.randn(4, h, f, device=device).to(dtype)
    g = (3 * torch.randn(12, 2 * f, device=device)).to(dtype)
    return dc, w2, offsets, g


def _dgrad_activation_three_ops(dc, w2, offsets, g, act, interleaved):
    ops = torch.ops.switchyard
    dg = ops.activation_backward(g, ops.grouped_mm_dgrad(dc, w2, offsets), act, interleaved)
    h = ops.activation(g, act, interleaved)
    dg[offsets[-1]:] = 0
    h[offsets[-1]:] = 0
    return dg, h


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("act", [0, 1])  # SwiGLU, GeGLU
def test_grouped_mm_dgrad_activation_equals_its_three_ops(act, interleaved):
    dc, w2, offsets, g = _dgrad_activation_case("cpu", torch.float32)
    dg, h = torch.ops.switchyard.grouped_mm_dgrad_activation(dc, w2, offsets, g, act, interleaved)
    want_dg, want_h = _dgrad_activation_three_ops(dc, w2, offsets, g, act, interleaved)
    assert torch.equal(dg, want_dg) and torch.equal(h, want_h)
    assert dg[:10].abs().mean() > 1e-3
    torch.library.opcheck(torch.ops.switchyard.grouped_mm_dgrad_activation.default,
                          (dc, w2, offsets, g, act, interleaved), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_interleaved_module_gives_the_same_bits_and_keeps_the_plain_state_dict(activation):
    m = make(activation).eval()
    plain_sd = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(T, H)
    with torch.no_grad():
        want = m(x)
        m.interleave_gate_up_()
        assert m.gate_up_interleaved
        got = m(x)
    assert torch.equal(got, want)
    sd = m.state_dict()
    assert torch.equal(sd["w13"], plain_sd["w13"])  # saved in the plain layout
    fresh = make(activation, seed=5).eval().interleave_gate_up_()
    fresh.load_state_dict(plain_sd)  # loaded from the plain layout
    assert torch.equal(fresh.w13, m.w13)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
        ref, _, _ = st.reference_moe(m, x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    m.interleave_gate_up_(False)
    assert torch.equal(m.w13, plain_sd["w13"])


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_interleaved_module_trains_as_the_plain_one(activation):
    """Under autograd the interleaved module runs the staged ops on the interleaved columns: the same y, x.grad and
    parameter gradients as the plain module (w13.grad in the interleaved layout), exactly in fp64 but for x.grad, which
    sums over w13's rows in another order; gradcheck passes."""
    plain = make(activation, dtype=torch.float64)
    inter = make(activation, dtype=torch.float64)
    inter.interleave_gate_up_()
    x = torch.randn(T, H, dtype=torch.float64)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [m(xx) for m, xx in zip((plain, inter), xs)]
    for o in outs:
        (o.y.square().sum() + o.aux_loss).backward()
    assert torch.equal(outs[0].y, outs[1].y)
    # x.grad sums over w13's rows, in another order in the interleaved layout: equal to double rounding
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(st._plain_gate_up(inter.w13.grad), plain.w13.grad)
    for name in ("gate", "w2"):
        assert torch.equal(getattr(inter, name).grad, getattr(plain, name).grad), name
    names = [n for n, _ in inter.named_parameters()]

    def fn(xx, *params):
        return torch.func.functional_call(inter, dict(zip(names, params)), (xx,)).y

    params = [p.detach().clone().requires_grad_(True) for p in inter.parameters()]
    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True), *params))


def _train_outputs_and_ops(m, x, monkeypatch):
    """_module_outputs(m, x, train=True) and the names of the switchyard ops it called."""
    rec = _Recorder(st._ops)
    monkeypatch.setattr(st, "_ops", rec)
    try:
        return _module_outputs(m, x, True), rec.names
    finally:
        monkeypatch.setattr(st, "_ops", rec._ops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_interleaved_training_keeps_gemm1s_product_from_one_kernel(activation, dtype, monkeypatch):
    """Training in the interleaved layout takes GEMM1's product g, which the backward needs, and h from one
    grouped_mm_gated_keep (switchyard::gathered_gated_keep, then switchyard::gated_down_mm for GEMM2), no separate
    activation pass. Its y, x.grad and every parameter gradient are the bits of the staged ops (gathered_grouped_mm
    then activated_grouped_mm, which gather_in_gemm1=True runs; on the CPU its in-GEMM gather is the gathered copy);
    h is not differentiable (its gradient reaches g through gated_down_mm); grouped_mm_gated_keep's h and g are
    grouped_mm_gated's h and grouped_mm's product with the interleaved weights."""
    m = make(activation, dtype=dtype).interleave_gate_up_()
    x = torch.randn(T, H, dtype=dtype)
    got, names = _train_outputs_and_ops(m, x, monkeypatch)
    assert "grouped_mm_gated_keep" in names and "activation" not in names, names
    m.gather_in_gemm1 = True
    want, staged = _train_outputs_and_ops(m, x, monkeypatch)
    assert "grouped_mm_gated_keep" not in staged and "activation" in staged, staged
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None and torch.equal(a, b), i
    assert got[0].float().abs().mean() > 1e-3 and m.w13.grad.float().abs().mean() > 1e-5

    act = st.ACTIVATIONS[activation]
    a = torch.randn(20, H, dtype=dtype)
    offsets = torch.tensor([0, 3, 3, 9, 17, 17, 17, 17, 17], dtype=torch.int32)  # rows 17..19 owned by nobody
    h, g = torch.ops.switchyard.grouped_mm_gated_keep(a, m.w13.detach(), offsets, act)
    assert torch.equal(h, torch.ops.switchyard.grouped_mm_gated(a, m.w13.detach(), offsets, act))
    assert torch.equal(g, torch.ops.switchyard.grouped_mm(a, m.w13.detach(), offsets))
    assert torch.equal(g[17:], torch.zeros_like(g[17:])) and g[:17].abs().mean() > 1e-3
    torch.library.opcheck(torch.ops.switchyard.grouped_mm_gated_keep.default, (a, m.w13.detach(), offsets, act))
    slot_row = torch.arange(T * K, dtype=torch.int32).reshape(T, K)  # token t's rows t*K..t*K+K-1
    rt = torch.arange(T * K, dtype=torch.int32) // K
    off = torch.tensor([0, 5, 5, 11, 20] + [T * K] * (E - 4), dtype=torch.int32)
    xg = x.clone().requires_grad_(True)
    h, g = torch.ops.switchyard.gathered_gated_keep(xg, rt, slot_row, m.w13.detach(), off, act)
    assert g.requires_grad and not h.requires_grad
    torch.library.opcheck(torch.ops.switchyard.gathered_gated_keep.default,
                          (x, rt, slot_row, m.w13.detach(), off, act), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.switchyard.gated_down_mm.default, (h.detach(), g.detach(), m.w2.detach(), off, act),
                          test_utils=("test_schema", "test_faketensor"))


def test_interleaved_training_under_torch_compile_gives_the_eager_bits():
    """torch.compile (fullgraph, aot_eager: the traced ops run as they are) traces gathered_gated_keep and
    gated_down_mm with their fake implementations and autograd: the same y and gradients as eager."""
    m = make().interleave_gate_up_()
    x = torch.randn(T, H)
    want = _module_outputs(m, x, True)
    got = _module_outputs(torch.compile(m, backend="aot_eager", fullgraph=True), x, True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), i


def test_interleave_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="not gated"):
        make("gelu").interleave_gate_up_()
    with pytest.raises(ValueError, match="multiple of 8"):
        st.MoE(st.MoEConfig(hidden_size=H, ffn_size=12, num_experts=E, top_k=K)).interleave_gate_up_()
    m = make().interleave_gate_up_()
    with pytest.raises(ValueError, match="plain layout"):
        m.quantize_()
    with pytest.raises(RuntimeError, match="interleaved"):
        torch.ops.switchyard.activation(torch.randn(4, 2 * F), 2, True)  # GELU is not gated


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the gated epilogue needs an sm_90 GPU")
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_gated_epilogue_on_cuda_gives_the_unfused_bits(activation):
    torch.manual_seed(7)
    cfg = st.MoEConfig(hidden_size=256, ffn_size=192, num_experts=16, top_k=4, activation=activation)
    m = st.MoE(cfg, dtype=torch.bfloat16, device="cuda").eval()
    m.fused_max_tokens = 0  # the staged path at every T, so that both layouts run the same stages
    for t in (1, 70, 1000):
        x = torch.randn(t, 256, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            want = m(x)
            m.interleave_gate_up_()
            got = m(x)
            m.interleave_gate_up_(False)
        assert torch.equal(got, want), f"T={t}: max |diff| {(got.float() - want.float()).abs().max().item()}"
        assert want.float().abs().mean() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the bf16 grouped GEMMs need an sm_90 GPU")
def test_interleaved_module_trains_as_the_plain_one_on_cuda():
    torch.manual_seed(9)
    cfg = st.MoEConfig(hidden_size=256, ffn_size=192, num_experts=16, top_k=4)
    plain = st.MoE(cfg, dtype=torch.bfloat16, device="cuda")
    inter = st.MoE(cfg, dtype=torch.bfloat16, device="cuda")
    inter.load_state_dict(plain.state_dict())
    inter.interleave_gate_up_()
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [m(xx) for m, xx in zip((plain, inter), xs)]
    for o in outs:
        o.y.float().square().mean().backward()
    assert torch.equal(outs[0].y, outs[1].y)  # the same GEMM1 columns, permuted, and the same activation
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(st._plain_gate_up(inter.w13.grad), plain.w13.grad, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(inter.w2.grad, plain.w2.grad, rtol=2e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the gated epilogue needs an sm_90 GPU")
@pytest.mark.parametrize("act", [0, 1])  # SwiGLU, GeGLU
def test_grouped_mm_gated_keep_on_cuda(act):
    """The kernels that keep GEMM1's product, at rows per expert that pick each tile (Pingpong 64x256 up to 256,
    Cooperative without a cluster to 1024, the 2x1 cluster above): h bitwise grouped_mm_gated's (the same tile without
    the product) and the interleaved activation of the kept g; g within bf16 rounding of grouped_mm's; rows past
    offsets[E] zero in both."""
    torch.manual_seed(21)
    e, f, k = 8, 192, 256
    w13i = torch.ops.switchyard.interleave_gate_up(
        torch.randn(e, 2 * f, k, device="cuda", dtype=torch.bfloat16) / 16, False)
    for per_expert in (100, 600, 1500):
        counts = torch.randint(per_expert // 2, per_expert * 3 // 2, (e,))
        counts[1] = 0
        offsets = torch.zeros(e + 1, dtype=torch.int32)
        offsets[1:] = counts.cumsum(0)
        rows = int(offsets[-1]) + 7
        offsets = offsets.cuda()
        a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        h, g = torch.ops.switchyard.grouped_mm_gated_keep(a, w13i, offsets, act)
        owned = rows - 7
        assert torch.equal(h, torch.ops.switchyard.grouped_mm_gated(a, w13i, offsets, act)), per_expert
        assert torch.equal(torch.ops.switchyard.activation(g, act, True)[:owned], h[:owned]), per_expert
        want = torch.ops.switchyard.grouped_mm(a, w13i, offsets)
        torch.testing.assert_close(g.float(), want.float(), rtol=2e-2, atol=1e-3)
        assert not g[owned:].any() and not h[owned:].any()
        assert g[:owned].float().abs().mean() > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the bf16 grouped GEMMs need an sm_90 GPU")
def test_interleaved_training_on_cuda_keeps_gemm1s_product_and_matches_the_staged_ops(monkeypatch):
    """On CUDA the interleaved module's training step runs grouped_mm_gated_keep and no activation pass; y and every
    gradient agree with its staged ops (gather_in_gemm1=True: the gathered plain GEMM1, then the activation) to bf16
    rounding (other kernels, possibly other tiles)."""
    torch.manual_seed(10)
    cfg = st.MoEConfig(hidden_size=256, ffn_size=192, num_experts=16, top_k=4)
    m = st.MoE(cfg, dtype=torch.bfloat16, device="cuda").interleave_gate_up_()
    x = torch.randn(1200, 256, device="cuda", dtype=torch.bfloat16)
    got, names = _train_outputs_and_ops(m, x, monkeypatch)
    assert "grouped_mm_gated_keep" in names and "activation" not in names, names
    m.gather_in_gemm1 = True
    want, staged = _train_outputs_and_ops(m, x, monkeypatch)
    assert "grouped_mm_gated_keep" not in staged, staged
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3, msg=lambda s, i=i: f"output {i}: {s}")
    assert got[0].float().abs().mean() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the bf16 grouped GEMMs need an sm_90 GPU")
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("act", [0, 1])  # SwiGLU, GeGLU
def test_dgrad_activation_op_on_cuda_gives_the_unfused_bits(act, interleaved):
    dc, w2, offsets, g = _dgrad_activation_case("cuda", torch.bfloat16, h=256, f=192)
    dg, h = torch.ops.switchyard.grouped_mm_dgrad_activation(dc, w2, offsets, g, act, interleaved)
    want_dg, want_h = _dgrad_activation_three_ops(dc, w2, offsets, g, act, interleaved)
    assert torch.equal(dg, want_dg) and torch.equal(h, want_h)
    assert dg[:10].float().abs().mean() > 1e-3


def _module_outputs(m, x, train):
    """y (and with train x.grad and the parameters' gradients) of one call of m, gradients cleared first."""
    m.zero_grad(set_to_none=True)
    if not train:
        with torch.no_grad():
            return [m(x)]
    xx = x.clone().requires_grad_(True)
    out = m(xx)
    (out.y.float().square().mean() + out.aux_loss).backward()
    return [out.y, xx.grad] + [p.grad for p in m.parameters()]


def _without_and_with_gather(m, x, train):
    """_module_outputs of m with gather_in_gemm1 off, then on (then back to what it was)."""
    m.train(train)
    before = m.gather_in_gemm1
    try:
        m.gather_in_gemm1 = False
        want = _module_outputs(m, x, train)
        m.gather_in_gemm1 = True
        got = _module_outputs(m, x, train)
    finally:
        m.gather_in_gemm1 = before
    assert len(got) == len(want)
    return want, got


@pytest.mark.parametrize("interleaved", [False, True])
def test_gather_in_gemm1_module_gives_the_gathered_copys_bits(interleaved):
    """MoE.gather_in_gemm1: GEMM1 reads x's rows through the plan, in inference (moe_forward and the staged ops) and in
    training (gathered_grouped_mm's forward); on the CPU the op gathers first, so every output is bitwise the same."""
    m = make()
    if interleaved:
        m.interleave_gate_up_()
    x = torch.randn(T, H)
    for train in (False, True):
        want, got = _without_and_with_gather(m, x, train)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), (train, i)
    m.eval()
    m.gather_in_gemm1 = True
    with torch.no_grad():  # the staged ops (what torch.compile traces), not moe_forward
        staged = m._layer(x)[0]
    assert torch.equal(staged, want_y := _module_outputs(m, x, False)[0]) and want_y.abs().mean() > 1e-3
    rt = torch.randint(-1, T, (T * K,), dtype=torch.int32)
    slot_row = torch.full((T, K), -1, dtype=torch.int32)  # unused by the in-GEMM forward
    offsets = torch.tensor([0, 5, 5, 11, 20] + [T * K] * (E - 4), dtype=torch.int32)
    args = (x, rt, slot_row, m.w13.detach(), offsets, True)
    torch.library.opcheck(torch.ops.switchyard.gathered_grouped_mm.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_gather_in_gemm1_is_automatic_by_default():
    """gather_in_gemm1=None asks the library's rule (stages.h: gather_in_gemm1_preferred), which picks the gathered
    loads on CUDA bf16 only: on the CPU the answer is no whatever the shape, and moe_forward takes -1 / 0 / 1 (on the
    CPU every mode gives the same bits; which one ran is checked on CUDA, test_gather_in_gemm1_automatic_choice_on_cuda)."""
    m = make()
    assert m.gather_in_gemm1 is None
    pref = torch.ops.switchyard.gather_in_gemm1_preferred
    for dt in (torch.float32, torch.bfloat16):
        assert not pref(64, 2048, 768, 128, 8, torch.empty(1, dtype=dt))
    m.interleave_gate_up_()
    m.eval()
    x = torch.randn(T, H)
    with torch.no_grad():
        auto = m(x)
        assert not m._gather_in_gemm1_for(x)
        m.gather_in_gemm1 = False
        off = m(x)
    assert torch.equal(auto, off)
    with pytest.raises(RuntimeError, match="gather_in_gemm1"):
        c = m.config
        torch.ops.switchyard.moe_forward(x, m.gate, None, m.w13, m.w2, None, None, None, c.top_k, 0, True, 1.0, 1, 1,
                                         0, 0.0, 0, 0, True, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the gathered GEMM kernels need an sm_90 GPU")
def test_gather_in_gemm1_automatic_choice_on_cuda():
    """On CUDA bf16 the rule (stages.h: gather_in_gemm1_preferred) picks the gathered loads up to 128 rows per expert,
    up to 256 where x is within 64 MiB (DeepSeek-V3's shape: T / 32 rows, x reaches 64 MiB at T = 4681), and beyond
    where the experts are small (the separate gather >= 0.15 of GEMM1's time: Qwen3's F = 768 at every T); the
    module's automatic choice gives the bits of either explicit one, and it is the rule's choice that runs: the
    separate gather's kernel (scatter_token_rows_kernel) is launched exactly where the rule says no, in moe_forward (-1)
    and in the staged ops."""
    like = torch.empty(1, dtype=torch.bfloat16, device="cuda")
    pref = torch.ops.switchyard.gather_in_gemm1_preferred
    assert pref(4681, 7168, 2048, 256, 8, like) and not pref(4682, 7168, 2048, 256, 8, like)
    assert pref(16384, 2048, 768, 128, 8, like) and not pref(16384, 7168, 2048, 256, 8, like)
    assert not pref(64, 2048, 768, 128, 8, like.half())
    torch.manual_seed(12)
    cfg = st.MoEConfig(hidden_size=256, ffn_size=1280, num_experts=16, top_k=4)
    m = st.MoE(cfg, dtype=torch.bfloat16, device="cuda").eval()
    m.fused_max_tokens = 0
    m.interleave_gate_up_()
    def gather_kernels(fn):  # launches of the separate gather's kernel in one call (as bench/prefill_timeline.py)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and "scatter_token_rows" in e.name)

    # 25 rows per expert on average: gathered; 275 (past 256) with F = 1280 (the gather 0.13 of GEMM1): not.
    for t in (100, 1100):
        x = torch.randn(t, 256, device="cuda", dtype=torch.bfloat16)
        gathers = t == 100
        assert pref(t, 256, 1280, 16, 4, like) == gathers
        assert m._gather_in_gemm1_for(x) == gathers
        with torch.no_grad():
            auto = m(x)
            assert (gather_kernels(lambda: m(x)) == 0) == gathers, t  # moe_forward with -1
            assert (gather_kernels(lambda: m._layer(x)) == 0) == gathers, t  # the staged ops
            m.gather_in_gemm1 = False
            off = m(x)
            assert gather_kernels(lambda: m(x)) > 0
            m.gather_in_gemm1 = True
            on = m(x)
            assert gather_kernels(lambda: m(x)) == 0
            m.gather_in_gemm1 = None
        assert torch.equal(auto, off) and torch.equal(auto, on), t


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the gathered GEMM kernels need an sm_90 GPU")
@pytest.mark.parametrize("interleaved", [False, True])
def test_gather_in_gemm1_module_on_cuda(interleaved):
    """bf16 on CUDA: inference gives the same bits (the gated GEMM1 runs the same tile with A gathered; the plain layout
    has no gather in GEMM1 there); training's plain GEMM1 may take another tile with its A gathered (grouped_gemm.cu:
    gather_ops), so there the bf16 tolerance."""
    torch.manual_seed(11)
    cfg = st.MoEConfig(hidden_size=256, ffn_size=192, num_experts=16, top_k=4)
    m = st.MoE(cfg, dtype=torch.bfloat16, device="cuda")
    m.fused_max_tokens = 0
    if interleaved:
        m.interleave_gate_up_()
    for t in (1, 70, 1000):
        x = torch.randn(t, 256, device="cuda", dtype=torch.bfloat16)
        for train in (False, True):
            want, got = _without_and_with_gather(m, x, train)
            assert want[0].float().abs().mean() > 1e-3
            for i, (a, b) in enumerate(zip(got, want)):
                if not train:
                    assert torch.equal(a, b), (t, i)
                else:
                    torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3, msg=f"T={t} train={train} output {i}")
