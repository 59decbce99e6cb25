"""switchyard.torch: inference through the library's MoELayer in one op (switchyard::moe_forward).

Without a gradient to compute, MoE.forward runs the whole staged chain (router .. combine) as one op, the C++
MoELayer::forward, instead of one op per stage. It must compute what the staged ops compute: on the CPU the same
stage functions run in the same order, so y, the logits, the selection and the statistics must be the same bits for
every routing option the module has (softmax / sigmoid, groups, selection bias, renormalisation and scale,
capacity with either drop policy and the eval capacity factor, ungated activations, the interleaved w13). With a
shared expert the module's staged path runs it through F.linear (torch's GEMM, another summation order) while the
layer runs the library's grouped GEMM, so there y agrees to fp32 rounding. The op is chosen only where it applies:
not under autograd, torch.compile, FP8 experts, group_score="max", mixed dtypes or a subclass's own chain. On CUDA
(gpu marker) bf16 must give the staged ops' bits.
"""
import pytest
import torch

import switchyard.torch as st

H, F, E, K, T = 16, 16, 8, 2, 37
# the bf16 grouped GEMMs and the decode kernels of the CUDA tests below are sm_90's
SM90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                          reason="needs an sm_90 GPU (H100 / H200)")


class _Recorder:
    """Stands in for switchyard.torch's op table and records which ops a forward called."""

    def __init__(self, ops):
        self._ops, self.names = ops, []

    def __getattr__(self, name):
        self.names.append(name)
        return getattr(self._ops, name)


def _ops_called(monkeypatch, fn):
    rec = _Recorder(st._ops)
    monkeypatch.setattr(st, "_ops", rec)
    fn()
    monkeypatch.setattr(st, "_ops", rec._ops)
    return rec.names


CASES = {
    "softmax": dict(),
    "deepseek": dict(score_function="sigmoid", num_groups=4, topk_groups=2, use_score_bias=True, renormalize=True,
                     routed_scale=2.5),
    "topk-softmax-geglu": dict(score_function="topk-softmax", activation="geglu"),
    "capacity-position": dict(capacity_factor=0.6, min_capacity=2),
    "capacity-probability-eval": dict(capacity_factor=0.6, drop_policy="probability", eval_capacity_factor=0.8),
    "relu": dict(activation="relu"),
    "gelu": dict(activation="gelu"),
}


def make(case, dtype=torch.float32, device="cpu", seed=0, **extra):
    torch.manual_seed(seed)
    m = st.MoE(st.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=K, **CASES.get(case, {}), **extra),
               dtype=dtype, device=device)
    if m.score_bias is not None:
        with torch.no_grad():
            m.score_bias.uniform_(-0.1, 0.1)
    return m


def staged(m, x):
    """The module's staged ops on x (a gradient wanted keeps the one-op path off)."""
    xg = x.detach().clone().requires_grad_()
    out = m(xg)
    return out.y.detach() if isinstance(out, st.MoEOutput) else out.detach()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_op_gives_the_staged_ops_bits(case, dtype, monkeypatch):
    m = make(case, dtype).eval()
    x = torch.randn(T, H, dtype=dtype)
    with torch.no_grad():
        names = _ops_called(monkeypatch, lambda: m(x))
        got = m(x)
    assert "moe_forward" in names and "grouped_mm" not in names, names
    want = staged(m, x)
    assert got.dtype == dtype and got.shape == x.shape
    assert got.abs().sum() > 0
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["softmax", "capacity-probability-eval", "deepseek"])
def test_layer_op_statistics_equal_the_staged_ops(case):
    m = make(case)
    m.train()
    m.return_stats = True
    x = torch.randn(T, H)
    with torch.no_grad():
        got = m(x)
    want = m(x.clone().requires_grad_())
    assert torch.equal(got.y, want.y.detach())
    for name in ("aux_loss", "z_loss", "loss", "expert_counts", "kept_counts"):
        assert torch.equal(getattr(got, name), getattr(want, name).detach()), name
    if case != "softmax":  # capacity (training uses capacity_factor 0.6) or none: the kept counts tell
        assert int(got.kept_counts.sum()) <= T * K


@pytest.mark.parametrize("gate", [False, True])
def test_layer_op_with_a_shared_expert_agrees_to_fp32_rounding(gate):
    m = make("softmax", num_shared_experts=1, shared_ffn_size=8, shared_expert_gate=gate).eval()
    x = torch.randn(T, H)
    with torch.no_grad():
        got = m(x)
    want = staged(m, x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item()), (got - want).abs().max()


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_interleaved_layer_op_gives_the_plain_modules_bits(activation, monkeypatch):
    m = make("softmax", activation=activation).eval()
    x = torch.randn(T, H)
    with torch.no_grad():
        want = m(x)
        m.interleave_gate_up_()
        names = _ops_called(monkeypatch, lambda: m(x))
        got = m(x)
    assert "moe_forward" in names and "grouped_mm_gated" not in names, names
    assert torch.equal(got, want)


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_the_staged_interleaved_path_gives_the_layer_ops_bits(activation, monkeypatch):
    """The per-stage no-grad path of an interleaved module (grouped_mm_gated; what torch.compile and subclasses run)
    against the one-op path."""
    m = make("softmax", activation=activation).eval()
    m.interleave_gate_up_()
    x = torch.randn(T, H)
    with torch.no_grad():
        want = m(x)
        monkeypatch.setattr(st.MoE, "_use_layer_op", lambda self, x2: False)
        names = _ops_called(monkeypatch, lambda: m(x))
        got = m(x)
    assert "grouped_mm_gated" in names and "moe_forward" not in names, names
    assert torch.equal(got, want)


def test_the_staged_ops_run_where_the_layer_op_does_not_apply(monkeypatch):
    x = torch.randn(T, H)
    m = make("softmax").eval()
    names = _ops_called(monkeypatch, lambda: m(x.clone().requires_grad_()))  # autograd
    assert "moe_forward" not in names and "grouped_mm" in names
    with torch.no_grad():
        g = make("softmax", num_groups=4, topk_groups=2, group_score="max").eval()  # Python-only group score
        assert "moe_forward" not in _ops_called(monkeypatch, lambda: g(x))
        mixed = make("softmax").eval()
        mixed.gate.data = mixed.gate.data.double()  # a parameter in another dtype than x
        assert "moe_forward" not in _ops_called(monkeypatch, lambda: mixed(x))

        class OwnRouter(st.MoE):
            def _router_logits(self, x2):
                return super()._router_logits(x2) * 2

        sub = OwnRouter(m.config).eval()
        assert "moe_forward" not in _ops_called(monkeypatch, lambda: sub(x))
        assert "moe_forward" in _ops_called(monkeypatch, lambda: m(x))


def test_layer_op_schema_and_fake():
    m = make("deepseek", num_shared_experts=1, shared_ffn_size=8).eval()
    c = m.config
    x = torch.randn(T, H)
    args = (x, m.gate, m.score_bias, m.w13, m.w2, m.shared_w13, m.shared_w2, None, c.top_k, 2, True, 2.5,
            c.num_groups, c.topk_groups, 0, 0.0, 0, 0, False)
    torch.library.opcheck(torch.ops.switchyard.moe_forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    y, logits, ids, counts, offsets = torch.ops.switchyard.moe_forward(*args)
    assert offsets.shape == (E + 1,) and int(offsets[-1]) == T * K and torch.equal(offsets.diff(), counts)
    assert logits.dtype == torch.float32 and ids.shape == (T, K)


def test_layer_op_refuses_what_the_layer_refuses():
    m = make("softmax").eval()
    c = m.config
    x = torch.randn(T, H)
    with pytest.raises(RuntimeError, match="gate_up_interleaved"):  # ReLU has no gate/up halves
        torch.ops.switchyard.moe_forward(x, m.gate, None, m.w13[:, :F].contiguous(), m.w2, None, None, None,
                                         c.top_k, 0, False, 1.0, 1, 1, 3, 0.0, 0, 0, True)
    with pytest.raises(RuntimeError, match="drop_policy"):
        torch.ops.switchyard.moe_forward(x, m.gate, None, m.w13, m.w2, None, None, None, c.top_k, 0, False, 1.0, 1, 1,
                                         0, 0.0, 0, 7, False)


@pytest.mark.gpu
@SM90
@pytest.mark.parametrize("case", ["softmax", "deepseek", "capacity-position"])
def test_layer_op_gives_the_staged_ops_bits_on_cuda(case, monkeypatch):
    hh, ff, ee = 256, 128, 16
    torch.manual_seed(1)
    m = st.MoE(st.MoEConfig(hidden_size=hh, ffn_size=ff, num_experts=ee, top_k=4, **CASES[case]),
               dtype=torch.bfloat16, device="cuda").eval()
    x = torch.randn(300, hh, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        names = _ops_called(monkeypatch, lambda: m(x))
        got = m(x)
    assert "moe_forward" in names, names
    want = staged(m, x)
    assert torch.equal(got, want)
    with torch.no_grad():
        m.interleave_gate_up_()
        assert torch.equal(m(x), want)  # the gated kernel through the layer


@pytest.mark.gpu
@SM90
def test_layer_op_captures_in_a_cuda_graph():
    torch.manual_seed(2)
    m = st.MoE(st.MoEConfig(hidden_size=256, ffn_size=128, num_experts=16, top_k=4), dtype=torch.bfloat16,
               device="cuda").eval()
    m.fused_max_tokens = 0
    x = torch.randn(200, 256, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        want = m(x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            m(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = m(x)
        g.replay()
        torch.cuda.synchronize()
    assert torch.equal(y, want)


@pytest.mark.parametrize("act", [0, 1])  # SwiGLU, GeGLU
def test_moe_fused_reads_either_layout(act):
    m = make("softmax", activation="geglu" if act else "swiglu").eval()
    c = m.config
    x = torch.randn(5, H)
    w13i = torch.ops.switchyard.interleave_gate_up(m.w13.detach(), False)
    args = (m.gate, None, None, m.w2, None, None, None, c.top_k, 0, False, 1.0, 1, 1, act)

    def fused(w13, interleaved):
        a = list(args)
        a[2] = w13
        return torch.ops.switchyard.moe_fused(x, *a, interleaved)[0]

    with torch.no_grad():
        want = fused(m.w13.detach(), False)
        assert torch.equal(fused(w13i, True), want)
        assert not torch.equal(fused(w13i, False), want)  # the flag is what makes the interleaved rows right


@pytest.mark.gpu
@SM90
def test_interleaved_module_keeps_the_fused_decode_path_on_cuda(monkeypatch):
    torch.manual_seed(3)
    m = st.MoE(st.MoEConfig(hidden_size=256, ffn_size=128, num_experts=16, top_k=4), dtype=torch.bfloat16,
               device="cuda").eval()
    m.fused_max_tokens = 64
    xs = [torch.randn(t, 256, dtype=torch.bfloat16, device="cuda") for t in (1, 5, 33)]
    with torch.no_grad():
        want = [m(x) for x in xs]
        m.interleave_gate_up_()
        for x, w in zip(xs, want):
            names = _ops_called(monkeypatch, lambda: m(x))
            assert "moe_fused" in names and "moe_forward" not in names, names
            assert torch.equal(m(x), w)
