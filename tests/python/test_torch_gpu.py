"""GPU tests of the PyTorch binding: bf16 gradients against plain PyTorch autograd, backward kernels against the
CPU reference, determinism, and CUDA-graph capture of forward and backward. Marked `gpu`; each skips with the
reason when no CUDA device is visible. Run through CTest (test torch_pytest_gpu, label gpu) or by hand:
    SWITCHYARD_TORCH_LIB=build/bindings/torch/_switchyard_torch.so PYTHONPATH=python pytest tests/python -m gpu

Tolerances: bf16 keeps 8 significant bits (relative step 2^-8 = 0.0039); a value that passes through a few bf16
roundings (GEMM1 output, activation, GEMM2 output, y) carries a relative error of a few 1e-3, and gradients through
one more chain of the same. The plain-PyTorch reference runs the same bf16 weights with fp32 routing; we compare
with atol = rtol = 2e-2 against it, and fp32-vs-fp64 kernels with 1e-5 relative.
"""
import pytest
import torch

import switchyard.torch as st

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available())")]

H, F, E, K, T = 256, 128, 8, 2, 96


def _module(dtype=torch.bfloat16, seed=0, **kw):
    cfg = dict(hidden_size=H, ffn_size=F, num_experts=E, top_k=K, renormalize=True, aux_loss_coef=0.01,
               z_loss_coef=0.001)
    cfg.update(kw)
    torch.manual_seed(seed)
    return st.MoE(st.MoEConfig(**cfg), dtype=dtype, device="cuda")


def _close(name, got, want, atol, rtol):
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("kw", [dict(), dict(score_function="sigmoid", use_score_bias=True, num_groups=4,
                                             topk_groups=2, routed_scale=2.5),
                                dict(num_shared_experts=1, shared_ffn_size=128),
                                dict(capacity_factor=0.75, drop_policy="probability")],
                         ids=["softmax", "sigmoid-groups", "shared", "capacity"])
def test_bf16_grads_match_plain_pytorch(kw):
    m = _module(seed=1, **kw).train()
    torch.manual_seed(2)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    out = m(x)
    y_ref, _, _ = st.reference_moe(m, x)
    _close("y", out.y, y_ref, 2e-2, 2e-2)
    params = [x, *m.parameters()]
    g = torch.autograd.grad((out.y.float() * gy.float()).sum(), params)
    g_ref = torch.autograd.grad((y_ref.float() * gy.float()).sum(), params)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for n, a, b in zip(names, g, g_ref):
        scale = b.float().abs().max().item() + 1e-6
        _close(f"grad {n}", a / scale, b / scale, 2e-2, 2e-2)


@pytest.mark.parametrize("capacity", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_by_token_is_the_gather_by_row(dtype, capacity):
    """The gather op given the plan's slot_row (x read once per token, written to its k rows) against the gather by
    row: the same bits. With capacity 1.0 and skewed logits the plan drops pairs of the busy experts and leaves rows
    past offsets[E] (written as 0) for the idle ones. Each op's output takes a freed block of NaNs (torch's caching
    allocator hands it back for an allocation of the same size on the same stream), so that a zero row the op fails
    to write shows."""
    torch.manual_seed(5)
    tokens, experts, k, hidden = 1000, 16, 4, 7168
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    logits = torch.randn(tokens, experts, device="cuda") + torch.linspace(0, 2, experts, device="cuda")
    ids, w = torch.ops.switchyard.route(logits, None, k, 0, True, 1.0, 1, 1)
    offsets, slot_row, row_token, _ = torch.ops.switchyard.plan(ids, w, experts, capacity, 0, 0)

    def gather_into_nans(*args):
        nans = torch.full((row_token.numel(), hidden), float("nan"), device="cuda", dtype=dtype)
        address = nans.data_ptr()
        del nans
        out = torch.ops.switchyard.gather(x, row_token, *args)
        assert out.data_ptr() == address, "the output did not reuse the block of NaNs: its zero rows go unchecked"
        return out

    by_row = gather_into_nans()
    by_token = gather_into_nans(slot_row)
    assert torch.equal(by_token, by_row)
    used = int(offsets[-1])
    for name, out in (("by row", by_row), ("by token", by_token)):  # exactly +0: every byte
        assert not bool(out[used:].view(torch.uint8).any()), f"{name}: a row past offsets[E] is not +0"
    if capacity:
        assert used < row_token.numel(), "the capacity case must leave rows past offsets[E]"
        assert bool((slot_row < 0).any()), "the capacity case must drop pairs"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_router_gemm_on_cuda_is_the_fp32_linear(dtype):
    """The module's router on CUDA (the router_gemm op: cuBLAS on x's dtype, fp32 accumulation and output) against
    F.linear(x.float(), gate.float()): the same exact products, summed in another order (no TF32: fp32 rounding of a
    sum of 512 terms), and the gradients autograd takes through that F.linear."""
    torch.manual_seed(71)
    x = torch.randn(300, 512, device="cuda", dtype=dtype, requires_grad=True)
    gate = torch.randn(24, 512, device="cuda", dtype=dtype, requires_grad=True)
    got = torch.ops.switchyard.router_gemm(x, gate)
    x2 = x.detach().clone().requires_grad_(True)
    g2 = gate.detach().clone().requires_grad_(True)
    want = torch.nn.functional.linear(x2.double(), g2.double())
    mag = torch.nn.functional.linear(x2.detach().double().abs(), g2.detach().double().abs())
    assert got.dtype == torch.float32
    assert ((got.double() - want).abs() <= 512 * 2.0 ** -24 * mag + 1e-30).all()
    d = torch.randn_like(got)
    dx, dg = torch.autograd.grad(got, (x, gate), d)
    want_dx, want_dg = torch.autograd.grad(torch.nn.functional.linear(x2.float(), g2.float()), (x2, g2), d)
    # the same exact products as autograd's, summed in fp32 in another order, then one rounding to the dtype: both
    # within (K + 1) u sum|terms| (u = 2^-24) of the exact sum, plus the dtype's rounding (bf16: 2^-8 relative); K
    # counts the fp32 terms of the longer chain (bf16: the three parts, 3E for dx, T + 2 for dgate)
    dd, xd, gd = d.double(), x2.detach().double(), g2.detach().double()
    bf16 = dtype == torch.bfloat16
    rnd = 2.0 ** -8 if bf16 else 0.0
    for name, got_, want_, exact, mag_, k in (("dx", dx, want_dx, dd @ gd, dd.abs() @ gd.abs(), 72 if bf16 else 24),
                                              ("dgate", dg, want_dg, dd.t() @ xd, dd.abs().t() @ xd.abs(),
                                               302 if bf16 else 300)):
        bound = rnd * exact.abs() + (k + 1) * 2.0 ** -24 * mag_
        for who, v in (("switchyard", got_), ("autograd", want_)):
            err = (v.double() - exact).abs()
            assert (err <= bound).all(), f"{name} ({who}): {(err > bound).sum().item()} elements past the bound"


def test_router_gemm_backward_bf16_is_one_rounding_of_the_exact_sums():
    """bf16 router gradients on CUDA (d_logits split into three bf16 parts on the tensor cores, fp32 sums) against the
    exact sums (fp64): every element within one bf16 ulp of the exact value plus the error bound of fp32 products
    summed in fp32 ((K + 1) u sum|terms|, u = 2^-24), and at least 99% of them equal to the exact value rounded once
    to bf16; d_logits spread over six decades so that the low parts matter."""
    torch.manual_seed(72)
    t, h, e = 1000, 384, 32
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gate = torch.randn(e, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    d = torch.randn(t, e, device="cuda") * 10.0 ** torch.empty(t, e, device="cuda").uniform_(-3, 3)
    dx, dg = torch.autograd.grad(torch.ops.switchyard.router_gemm(x, gate), (x, gate), d)
    dd, gd, xd = d.double(), gate.detach().double(), x.detach().double()
    # K: the terms each fp32 sum adds (dx sums the three parts of E logits' gradients; dgate sums T tokens, then adds
    # the three parts' sums)
    checks = (("dx", dx, dd @ gd, dd.abs() @ gd.abs(), 3 * e),
              ("dgate", dg, dd.t() @ xd, dd.abs().t() @ xd.abs(), t + 2))
    for name, got, exact, mag, k in checks:
        assert got.dtype == torch.bfloat16
        bound = torch.finfo(torch.bfloat16).eps * exact.abs() + (k + 1) * 2.0 ** -24 * mag  # 2^-7|v| >= 1 bf16 ulp
        err = (got.double() - exact).abs()
        assert (err <= bound).all(), f"{name}: {(err > bound).sum().item()} elements off by more than the bound"
        assert (got.double() == exact.to(torch.bfloat16).double()).float().mean() > 0.99, name


def test_backward_kernels_match_cpu_reference_fp32():
    """Each CUDA backward op against the CPU op (double) on identical fp32 inputs."""
    torch.manual_seed(3)
    ops = torch.ops.switchyard
    logits = torch.randn(T, E)
    ids, w = ops.route(logits, None, K, 0, True, 1.0, 1, 1)
    offsets, slot_row, row_token, _ = ops.plan(ids, w, E, 0.75, 0, 1)
    dev = lambda t: t.cuda()
    dw = torch.randn(T, K)
    _close("route_backward", ops.route_backward(dev(logits), dev(ids), dev(dw), 0, True, 1.0).cpu(),
           ops.route_backward(logits, ids, dw, 0, True, 1.0), 1e-6, 1e-5)
    a, b = torch.randn(T * K, H), torch.randn(E, 2 * F, H)
    dc = torch.randn(T * K, 2 * F)
    da, db = ops.grouped_mm_dgrad(dev(dc), dev(b), dev(offsets)), ops.grouped_mm_wgrad(dev(dc), dev(a), dev(offsets))
    da_ref, db_ref = ops.grouped_mm_backward(dc, a, b, offsets)
    _close("grouped_mm_dgrad", da.cpu(), da_ref, 1e-4, 1e-5)
    _close("grouped_mm_wgrad", db.cpu(), db_ref, 1e-4, 1e-5)
    da2, db2 = ops.grouped_mm_backward(dev(dc), dev(a), dev(b), dev(offsets))
    assert torch.equal(da, da2) and torch.equal(db, db2), "the halves differ from grouped_mm_backward"
    d_xp = torch.randn(T * K, H)
    _close("gather_backward", ops.gather_backward(dev(d_xp), dev(slot_row)).cpu(),
           ops.gather_backward(d_xp, slot_row), 1e-6, 1e-5)
    for act in range(4):
        g = torch.randn(T * K, 2 * F if act < 2 else F)
        dh = torch.randn(T * K, F)
        _close(f"activation_backward[{act}]", ops.activation_backward(dev(g), dev(dh), act).cpu(),
               ops.activation_backward(g, dh, act), 1e-6, 1e-5)
    out = torch.randn(T * K, H)
    dy = torch.randn(T, H)
    d_out, d_w = ops.combine_backward(dev(dy), dev(out), dev(slot_row), dev(w))
    d_out_ref, d_w_ref = ops.combine_backward(dy, out, slot_row, w)
    _close("combine_backward d_out", d_out.cpu(), d_out_ref, 1e-6, 1e-5)
    _close("combine_backward d_weights", d_w.cpu(), d_w_ref, 1e-5, 1e-5)
    # The plan's hint: only rows past offsets[E] (the capacity drops some pairs here) are zeroed beforehand. A freed
    # block of NaNs of d_out's size first, so that the op's output is likely to reuse it.
    assert offsets[-1] < T * K
    del d_out
    torch.full((T * K, H), float("nan"), device="cuda")
    d_out_h, d_w_h = ops.combine_backward(dev(dy), dev(out), dev(slot_row), dev(w), dev(offsets)[-1:])
    _close("combine_backward d_out with num_rows", d_out_h.cpu(), d_out_ref, 1e-6, 1e-5)
    assert torch.equal(d_w_h, d_w)


@pytest.mark.parametrize("score_function", [0, 1, 2], ids=["softmax", "topk-softmax", "sigmoid"])
@pytest.mark.parametrize("experts", [8, 77, 256])
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_backward_matches_cpu_reference(score_function, experts, renormalize):
    """route_backward on CUDA (a warp per token: lanes over experts, the softmax normaliser a butterfly of lane sums)
    against the CPU reference (double) for every score function, E below, not a multiple of and above 32, 1003 tokens
    (a partial last block of 4 warps), a routed scale, and a NaN and an inf logit after routing (the token's gradient
    follows the reference's NaN rule on both). Tolerance: fp32 sums of E + k terms against double ones."""
    torch.manual_seed(21 + experts + 3 * score_function + int(renormalize))
    ops = torch.ops.switchyard
    tokens, k = 1003, 6
    logits = torch.randn(tokens, experts) * 3
    ids, _ = ops.route(logits, None, k, score_function, renormalize, 1.0, 1, 1)
    logits[5, 1], logits[9, 0] = float("nan"), float("inf")
    dw = torch.randn(tokens, k)
    got = ops.route_backward(logits.cuda(), ids.cuda(), dw.cuda(), score_function, renormalize, 1.5).cpu()
    want = ops.route_backward(logits, ids, dw, score_function, renormalize, 1.5)
    rtol = max(1e-5, 8 * (experts + 2 * k) * 2.0 ** -24)
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("score_function", [0, 1, 2], ids=["softmax", "topk-softmax", "sigmoid"])
@pytest.mark.parametrize("experts", [8, 256])
def test_router_losses_match_cpu_reference(score_function, experts):
    """Switchyard's CUDA aux/z-loss kernels (forward and backward) against the CPU reference (double)."""
    torch.manual_seed(11 + experts + score_function)
    ops = torch.ops.switchyard
    tokens, k = 1003, 6  # a partial last block in both kernels (4 tokens per block backward, 128 forward)
    logits = torch.randn(tokens, experts) * 3
    ids, _ = ops.route(logits, None, k, score_function, True, 1.0, 1, 1)
    logits[5, 1], logits[9, 0] = float("nan"), float("inf")  # after routing: the rows' losses follow the reference
    dev = lambda t: t.cuda()
    clean = torch.ones(tokens, dtype=torch.bool)
    clean[[5, 9]] = False
    got = ops.router_losses(dev(logits[clean]), dev(ids[clean]), score_function).cpu()
    want = ops.router_losses(logits[clean], ids[clean], score_function).float()
    _close("router_losses", got, want, 1e-6, 1e-5)
    for d in ([0.7, -0.2], [0.0, 1.3], [2.0, 0.0]):  # a zero coefficient skips its term on both sides
        dl = torch.tensor(d)
        got = ops.router_losses_backward(dev(logits), dev(ids), dev(dl), score_function).cpu()
        want = ops.router_losses_backward(logits, ids, dl, score_function)
        # the NaN / inf rows: non-finite exactly where the reference's are (NaN spreads over a NaN row; an inf
        # logit makes the z term inf * 0); every finite value within fp32 rounding of the largest finite one
        assert torch.equal(got.isfinite(), want.isfinite().to(torch.bool)), f"non-finite pattern differs for {d}"
        fin = want.isfinite()
        scale = want[fin].abs().max().item()
        _close(f"router_losses_backward{d}", got[fin] / scale, want[fin].float() / scale, 1e-6, 1e-5)


def test_backward_is_deterministic():
    m = _module(seed=4).train()
    torch.manual_seed(5)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for _ in range(2):
        out = m(x)
        grads.append(torch.autograd.grad(out.y.float().square().sum() + out.loss, [x, *m.parameters()]))
    for a, b in zip(*grads):
        assert torch.equal(a, b), "backward differs between two identical runs"


def test_cuda_graph_capture_forward_and_backward():
    m = _module(seed=6).train()
    torch.manual_seed(7)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = [x, *m.parameters()]

    def step():
        out = m(x)
        loss = out.y.float().square().mean() + out.loss
        return loss, torch.autograd.grad(loss, params)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up (allocator, lazy init) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_g, grads_g = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))  # new input, same buffers: the replay must follow it
    graph.replay()
    torch.cuda.synchronize()
    loss_e, grads_e = step()
    _close("loss", loss_g, loss_e, 0, 0)
    for a, b in zip(grads_g, grads_e):
        assert torch.equal(a, b), "graph replay differs from eager"


# The fused small-batch inference op (issue 12) against the staged ops on the same module, eager and in a CUDA graph.
@pytest.mark.parametrize("tokens", [1, 2, 7, 16, 33, 64])
@pytest.mark.parametrize("kw", [dict(), dict(score_function="sigmoid", use_score_bias=True, num_groups=4,
                                             topk_groups=2, routed_scale=2.5, num_shared_experts=1,
                                             shared_ffn_size=128),
                                dict(num_shared_experts=1, shared_ffn_size=64, shared_expert_gate=True)],
                         ids=["softmax", "deepseek-like", "gated-shared"])
def test_fused_inference_matches_staged(kw, tokens):
    m = _module(seed=8, **kw).eval()
    torch.manual_seed(9)
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        m.fused_max_tokens = 0
        staged = m(x)
        m.fused_max_tokens = 64  # wherever supported (None: the automatic rule)
        assert m._use_fused(x)
        fused = m(x)
        again = m(x)
    assert torch.equal(fused, again), "the fused path is not bitwise reproducible"
    rel = (fused.float() - staged.float()).norm() / staged.float().norm()
    assert rel < 1e-2, f"fused vs staged relative L2 {rel:.3g}"


def test_fused_inference_captures_in_a_cuda_graph():
    m = _module(seed=10).eval()
    m.fused_max_tokens = 64
    x = torch.randn(4, H, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            m(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = m(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, m(x)), "graph replay differs from eager"


def test_automatic_choice_and_torch_compile():
    """The default (fused_max_tokens=None) takes the fused op where the library's rule prefers it (this small layer's
    weights are far under the threshold) and the staged ops where it does not; under torch.compile(fullgraph=True)
    the staged ops run, so the compiled module traces and agrees with eager."""
    m = _module(seed=12).eval()
    assert m.fused_max_tokens is None
    x = torch.randn(2, H, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert m._use_fused(x)
        eager = m(x)
        m.fused_max_tokens = 0
        staged = m(x)
        m.fused_max_tokens = None
        compiled = torch.compile(m, fullgraph=True)(x)
    assert torch.equal(compiled, staged) or (compiled.float() - staged.float()).norm() / staged.float().norm() < 1e-2
    assert (eager.float() - staged.float()).norm() / staged.float().norm() < 1e-2
