"""FP8 experts in PyTorch (issue 13 items 4 and 5): the grouped_mm_fp8 op, switchyard.torch.MoE with FP8 experts,
MoE.quantize_ and from_hf for fine-grained FP8 transformers blocks.

References written here, independent of the code under test: an fp8 e4m3 encoder that follows the bit rules of
switchyard's float_to_fp8_e4m3 (include/switchyard/dtype.h: nearest even, saturating to +-448) and a decoder from the
format's definition, both in NumPy; the weight recipe of `switchyard quantize` (per 128x128 block or matrix,
s = amax / 448 in fp32, q = e4m3(w / s), zero blocks s = 0) and the W8A8 GEMM recipe of stages.h (activations per
row and 128 channels, or per row, or a static scale; products in float64) in NumPy. quantize_ is also checked bit for
bit against the C++ quantiser itself (`switchyard quantize` on a safetensors file) when the CLI is built.

CPU tests run everywhere; the `gpu` ones (CUDA op and module against the CPU ones) skip without a CUDA device.
    SWITCHYARD_TORCH_LIB=build-cpu/bindings/torch/_switchyard_torch.so PYTHONPATH=python \\
        python3 -m pytest -q -m "not gpu" -o "markers=gpu: gpu" tests/python/test_torch_fp8.py
"""
import copy
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import switchyard.torch as sy

ROOT = Path(__file__).resolve().parents[2]
G = 128
FP8 = torch.float8_e4m3fn


# ---- NumPy references ------------------------------------------------------------------------------------------


def e4m3_encode(x):
    """float32 array -> uint8 codes, the rules of float_to_fp8_e4m3 (nearest even, saturate to +-448, NaN kept)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    sign = ((u >> 24) & 0x80).astype(np.uint32)
    a = u & 0x7FFFFFFF
    out = np.zeros(a.shape, np.uint32)
    nan = a > 0x7F800000
    sat = (a >= 0x43E00000) & ~nan
    sub = a < 0x3C800000  # below 2^-6: units of 2^-9
    norm = ~(nan | sat | sub)
    v = np.where(sub, a, 0).view(np.float32) * np.float32(512.0)  # exact for values below 2^-6
    q = np.floor(v).astype(np.uint32)
    rem = v - q.astype(np.float32)
    q = q + ((rem > 0.5) | ((rem == 0.5) & ((q & 1) == 1))).astype(np.uint32)
    out[sub] = q[sub]
    r = (a + 0x7FFFF + ((a >> 20) & 1)) >> 20
    out[norm] = (r[norm] - (120 << 3)) & 0xFF
    out[sat] = 0x7E
    out[nan] = 0x7F
    return (out | sign).astype(np.uint8)


def e4m3_decode(c):
    """uint8 codes -> float64 (OCP e4m3fn: bias 7, subnormals m * 2^-9, S.1111.111 NaN)."""
    c = np.asarray(c, np.uint8).astype(np.int64)
    s = np.where(c & 0x80, -1.0, 1.0)
    e, m = (c >> 3) & 0xF, c & 7
    mag = np.where(e == 0, m * 2.0 ** -9, (1.0 + m / 8.0) * np.exp2(e - 7.0))
    return np.where((e == 15) & (m == 7), np.nan, s * mag)


def recipe_quantize(w, mode):
    """`switchyard quantize` on one float32 matrix [N, K]: (codes uint8, scales float32)."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    if mode == "fp8-tensor":
        s = np.float32(np.abs(w).max()) / np.float32(448.0)
        q = np.zeros(w.shape, np.uint8) if s == 0 else e4m3_encode(w / s)
        return q, np.array([s], np.float32)
    bn, bk = -(-n // G), -(-k // G)
    q = np.zeros(w.shape, np.uint8)
    s = np.zeros((bn, bk), np.float32)
    for i in range(bn):
        for j in range(bk):
            blk = w[i * G:(i + 1) * G, j * G:(j + 1) * G]
            s[i, j] = np.float32(np.abs(blk).max()) / np.float32(448.0)
            if s[i, j] != 0:
                q[i * G:(i + 1) * G, j * G:(j + 1) * G] = e4m3_encode(blk / s[i, j])
    return q, s


def recipe_weight(codes, scale, mode):
    """dec(q) * s as float64 [N, K] (one matrix)."""
    w = e4m3_decode(codes)
    s = np.asarray(scale, np.float64)
    if mode == "fp8-tensor":
        return w * s.reshape(())
    return w * np.repeat(np.repeat(s, G, 0), G, 1)[:w.shape[0], :w.shape[1]]


def recipe_activations(a, mode, static=None):
    """The dequantised activations dec(q_a) * s_a (float64) of rows a [R, K] read as float32 exactly."""
    a = np.asarray(a, np.float32)
    out = np.zeros(a.shape, np.float64)
    width = G if mode == "fp8-block" else a.shape[1]
    for r in range(a.shape[0]):
        for j0 in range(0, a.shape[1], width):
            seg = a[r, j0:j0 + width]
            s = np.float32(static) if static is not None else np.float32(np.abs(seg).max()) / np.float32(448.0)
            if s != 0:
                out[r, j0:j0 + width] = e4m3_decode(e4m3_encode(seg / s)) * np.float64(s)
    return out


def recipe_gemm(a, codes, scales, offsets, mode, input_scale=None):
    """c [R, N] float64 of the W8A8 recipe: per group e, c = deq(a_e) . deq(w_e)^T; rows past offsets[E] are 0."""
    a = a.float().numpy()
    codes = codes.view(torch.uint8).numpy()
    scales = scales.numpy()
    e_count, n = codes.shape[0], codes.shape[1]
    c = np.zeros((a.shape[0], n))
    for e in range(e_count):
        r0, r1 = int(offsets[e]), int(offsets[e + 1])
        if r1 == r0:
            continue
        st = None if input_scale is None else float(input_scale[e])
        c[r0:r1] = recipe_activations(a[r0:r1], mode, st) @ recipe_weight(codes[e], scales[e], mode).T
    return torch.from_numpy(c)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def random_codes(shape, gen):
    """Random fp8 codes without NaN (0x7f / 0xff), as float8_e4m3fn."""
    c = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32)
    c = torch.where((c & 0x7F) == 0x7F, c - 1, c).to(torch.uint8)
    return c.view(FP8)


# ---- the conversion and the quantiser --------------------------------------------------------------------------


def test_e4m3_codes_follow_the_library_rules():
    """torch's float8_e4m3fn conversion after quantize_fp8's clamp gives float_to_fp8_e4m3's codes: every code
    value, every midpoint and its neighbours (ties to even), subnormals, signed zeros, saturation (448..464 rounds,
    past 464 torch alone would give NaN, +-inf), random values."""
    vals = e4m3_decode(np.arange(256, dtype=np.uint8))
    vals = vals[np.isfinite(vals)]
    pos = np.unique(np.abs(vals))
    mids = (pos[:-1] + pos[1:]) / 2
    x = np.concatenate([vals, mids, -mids, [449.0, 463.9, 464.0, 465.0, 480.0, 1e6, 3e38, -500.0, np.inf, -np.inf,
                                             0.0, -0.0, 2.0 ** -10, -(2.0 ** -10), 2.0 ** -11, 1e-30, -1e-30]]).astype(np.float32)
    x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))])
    rng = np.random.default_rng(0)
    x = np.concatenate([x, rng.standard_normal(200000).astype(np.float32) * np.float32(100),
                        rng.standard_normal(50000).astype(np.float32) * np.float32(0.01)]).astype(np.float32)
    got = sy._e4m3_codes(torch.from_numpy(x), torch.ones(())).view(torch.uint8).numpy()
    want = e4m3_encode(x)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, [(float(x[i]), hex(got[i]), hex(want[i])) for i in bad[:8]]
    # the decoder agrees with torch's own decoding of every non-NaN code
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    dec = codes.view(FP8).double().numpy()
    ref = e4m3_decode(codes.numpy())
    assert np.array_equal(np.isnan(dec), np.isnan(ref))
    assert np.array_equal(dec[~np.isnan(ref)], ref[~np.isnan(ref)])


def _special_weight(shape, seed, dtype=torch.bfloat16):
    """Random weights with an all-zero block, a block of tiny values (subnormal codes, a subnormal-range scale),
    a block with one huge value and a -0.0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[..., :G, G:] = 0.0  # a zero block (partial: the columns past 128)
    w[..., G:, :G] *= 1e-3
    w[..., G:G + 3, :5] = torch.tensor([3e-39, -1e-40, 5e-42, 0.0, 1.0]).repeat(3, 1)[:, :5]
    w[..., 1, 1] = 37.0
    w[..., 2, 2] = -0.0
    return w.to(dtype)


@pytest.mark.parametrize("mode", ["fp8-block", "fp8-tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_quantize_fp8_is_the_recipe(mode, dtype):
    w = _special_weight((3, 200, 136), seed=1, dtype=dtype)
    codes, scales = sy.quantize_fp8(w, mode)
    assert codes.dtype == FP8 and scales.dtype == torch.float32
    assert tuple(scales.shape) == ((3, 2, 2) if mode == "fp8-block" else (3,))
    for e in range(3):
        q, s = recipe_quantize(w[e].float().numpy(), mode)
        assert np.array_equal(codes[e].view(torch.uint8).numpy(), q), e
        assert np.array_equal(scales[e].numpy().reshape(s.shape).view(np.uint32), s.view(np.uint32)), e
    if mode == "fp8-block":
        assert (scales[:, 0, 1] == 0).all() and (codes[:, :G, G:].view(torch.uint8) == 0).all()
    # a 2-D matrix gives the same as one expert of a 3-D stack
    c2, s2 = sy.quantize_fp8(w[1], mode)
    assert torch.equal(c2.view(torch.uint8), codes[1].view(torch.uint8))
    assert torch.equal(s2, scales[1] if mode == "fp8-block" else scales[1:2])


def test_quantize_fp8_refuses_bad_weights():
    w = torch.randn(2, 8, 8)
    w[1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite value .* at \[1, 3, 4\]"):
        sy.quantize_fp8(w, "fp8-block", name="w13")
    with pytest.raises(ValueError, match="mode"):
        sy.quantize_fp8(torch.randn(8, 8), "fp8")
    with pytest.raises(ValueError, match="dtype"):
        sy.quantize_fp8(torch.randn(8, 8, dtype=torch.float64))


# ---- the op ---------------------------------------------------------------------------------------------------


def _op_case(mode, dtype, seed, n=136, k=200, offsets=(0, 5, 5, 19, 30), rows=33, zero_rows=True):
    g = torch.Generator().manual_seed(seed)
    e = len(offsets) - 1
    a = (torch.randn(rows, k, generator=g) * 3).to(dtype)
    if zero_rows:
        a[2, :G] = 0  # an all-zero activation group (scale 0)
        a[7] = 0  # an all-zero row
    b = random_codes((e, n, k), g)
    if mode == "fp8-block":
        s = torch.rand(e, -(-n // G), -(-k // G), generator=g) * 1e-2
        s[1, 0, 0] = 0.0  # a zero weight block
    else:
        s = torch.rand(e, generator=g) * 1e-2
    return a, b, s.float(), torch.tensor(offsets, dtype=torch.int32)


def _ulp_close(got, want, dtype, name):
    """got (stored in dtype) within one rounding of want (float64): |got - want| <= eps(dtype) * |want| + tiny."""
    eps = torch.finfo(dtype).eps
    tol = eps * want.abs() + eps * 1e-6 * want.abs().max()
    err = (got.double() - want).abs()
    assert bool((err <= tol).all()), f"{name}: max err {err.max():.3e}, at {int((err - tol).argmax())}"


@pytest.mark.parametrize("mode", ["fp8-block", "fp8-tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_op_is_the_recipe(mode, dtype):
    """Partial blocks (N = 136, K = 200), an empty group, rows past offsets[E], zero groups and a zero block."""
    a, b, s, off = _op_case(mode, dtype, seed=2)
    c = sy._ops.grouped_mm_fp8(a, b, s, None, off, sy.QUANT_MODES[mode])
    assert c.dtype == dtype and tuple(c.shape) == (33, 136)
    want = recipe_gemm(a, b, s, off, mode)
    _ulp_close(c, want, dtype, f"{mode} {dtype}")
    assert (c[30:] == 0).all()  # rows past offsets[E]
    # the check sees the activation recipe: without quantising a the result is far off
    plain = torch.zeros(33, 136, dtype=torch.float64)
    for e in range(4):
        r0, r1 = int(off[e]), int(off[e + 1])
        plain[r0:r1] = a[r0:r1].double() @ torch.from_numpy(recipe_weight(b[e].view(torch.uint8).numpy(),
                                                                          s[e].numpy(), mode)).T
    assert rel(plain, want) > 1e-2


def test_op_static_input_scale_and_one_group():
    a, b, s, off = _op_case("fp8-tensor", torch.bfloat16, seed=3)
    inp = torch.tensor([0.02, 0.5, 0.01, 0.03], dtype=torch.float32)  # small ones saturate: the scale is really used
    c = sy._ops.grouped_mm_fp8(a, b, s, inp, off, 2)
    _ulp_close(c, recipe_gemm(a, b, s, off, "fp8-tensor", inp), torch.bfloat16, "static")
    # b [N, K] without offsets: one group of every row
    c1 = sy._ops.grouped_mm_fp8(a, b[0], s[:1], None, None, 2)
    want = recipe_gemm(a, b[:1], s[:1], torch.tensor([0, 33]), "fp8-tensor")
    _ulp_close(c1, want, torch.bfloat16, "one group")


def test_op_errors():
    a, b, s, off = _op_case("fp8-block", torch.bfloat16, seed=4)
    with pytest.raises(RuntimeError, match="b_scale"):
        sy._ops.grouped_mm_fp8(a, b, s[:, :1], None, off, 1)  # [E, 1, 2] instead of [E, 2, 2]
    with pytest.raises(RuntimeError, match="b_scale"):
        sy._ops.grouped_mm_fp8(a, b, s.double(), None, off, 1)
    with pytest.raises(RuntimeError, match="input_scale"):
        sy._ops.grouped_mm_fp8(a, b, s, torch.ones(4), off, 1)  # static scales are fp8-tensor only
    with pytest.raises(RuntimeError, match="mode"):
        sy._ops.grouped_mm_fp8(a, b, s, None, off, 0)
    with pytest.raises(RuntimeError, match="fp8e4m3"):
        sy._ops.grouped_mm_fp8(a, b.float(), s, None, off, 1)
    with pytest.raises(RuntimeError, match="inference only"):
        sy._ops.grouped_mm_fp8(a.requires_grad_(), b, s, None, off, 1)
    with torch.no_grad():  # no gradient wanted: fine
        sy._ops.grouped_mm_fp8(a, b, s, None, off, 1)


def test_op_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        a = torch.empty(12, 200, dtype=torch.bfloat16)
        b = torch.empty(3, 136, 200, dtype=FP8)
        c = sy._ops.grouped_mm_fp8(a, b, torch.empty(3, 2, 2), None, torch.empty(4, dtype=torch.int32), 1)
        assert tuple(c.shape) == (12, 136) and c.dtype == torch.bfloat16


# ---- the module --------------------------------------------------------------------------------------------------


def _moe(dtype=torch.bfloat16, seed=0, **kw):
    cfg = dict(hidden_size=200, ffn_size=256, num_experts=6, top_k=2, renormalize=True)
    cfg.update(kw)
    torch.manual_seed(seed)
    return sy.MoE(sy.MoEConfig(**cfg), dtype=dtype).eval()


def _act(g, gated):
    if gated:
        gate, up = g.chunk(2, -1)
        return torch.nn.functional.silu(gate) * up
    return torch.nn.functional.relu(g)


def _layer_recipe(m, x):
    """The FP8 layer in float64 from the recipe: the module's routing, each value a stage stores rounded to x's
    dtype (GEMM1 output, h, expert outputs, shared output), activations quantised per the recipe."""
    c = m.config
    mode = c.quant_mode
    x2 = x.reshape(-1, c.hidden_size)
    ids, w = m._route(m._router_logits(x2).detach())
    dt = x.dtype

    def fp8_mm(a_rows, name, e=None):
        codes, s = getattr(m, name), getattr(m, f"{name}_scale")
        if e is not None:
            codes, s = codes[e], s[e]
        wt = recipe_weight(codes.view(torch.uint8).numpy(), s.numpy(), mode)
        out = recipe_activations(a_rows.float().numpy(), mode) @ wt.T
        return torch.from_numpy(out).to(dt)

    def expert(rows, name13, name2, e=None):
        g = fp8_mm(rows, name13, e)
        h = _act(g.double(), c.gated).to(dt)
        return fp8_mm(h, name2, e)

    y = torch.zeros(x2.shape[0], c.hidden_size, dtype=torch.float64)
    for t in range(x2.shape[0]):
        for j in range(c.top_k):
            e = int(ids[t, j])
            y[t] += float(w[t, j]) * expert(x2[t:t + 1], "w13", "w2", e)[0].double()
    if m.shared_w13 is not None:
        y += expert(x2, "shared_w13", "shared_w2").double()
    return y.reshape(x.shape)


@pytest.mark.parametrize("mode", ["fp8-block", "fp8-tensor"])
@pytest.mark.parametrize("kw", [dict(), dict(num_shared_experts=1, shared_ffn_size=128, activation="relu")],
                         ids=["routed", "shared-relu"])
def test_quantized_module_is_the_recipe_and_close_to_float(mode, kw):
    m = _moe(torch.float32, seed=5, **kw)
    x = torch.randn(24, 200) * 2
    with torch.no_grad():
        y_float = m(x)
        out_float = copy.deepcopy(m)
        out_float.return_stats = True
        counts_float = out_float(x).expert_counts
        assert m.quantize_(mode) is m
        y8 = m(x)
        m.return_stats = True
        counts8 = m(x).expert_counts
    assert m.quantized and m.config.quant_mode == mode and out_float.config.quant_mode == "none"
    assert m.w13.dtype == FP8 and m.w2.dtype == FP8 and isinstance(m.gate, nn.Parameter)
    assert sorted(n for n, _ in m.named_parameters()) == ["gate"]
    assert torch.equal(counts8, counts_float)  # the router is untouched: the same routing
    # the module computes the recipe (fp32 layer: tight) ...
    assert rel(y8, _layer_recipe(m, x)) < 1e-5
    # ... which is within FP8 error of the float layer it was quantised from (and really quantised)
    r = rel(y8, y_float)
    assert 1e-3 < r < 0.1, r


def test_bf16_module_vs_float_module():
    m = _moe(torch.bfloat16, seed=6, num_shared_experts=1, shared_ffn_size=128)
    x = torch.randn(64, 200, dtype=torch.bfloat16)
    with torch.no_grad():
        y = m(x)
        m.return_stats = True
        c0 = m(x).expert_counts
        m.quantize_("fp8-block")
        y8 = m(x).y
        c8 = m(x).expert_counts
    assert torch.equal(c0, c8)
    assert rel(y8, y) < 0.1  # W8A8 e4m3: ~2^-4 / sqrt(3) relative rounding per operand, two GEMMs
    # the recipe itself, through bf16 roundings (a stored value may round across an fp8 step: looser)
    assert rel(y8, _layer_recipe(m, x)) < 5e-3


def test_fp8_module_errors():
    m = _moe(seed=7)
    m.quantize_("fp8-block")
    x = torch.randn(4, 200, dtype=torch.bfloat16)
    m.train()
    with pytest.raises(RuntimeError, match="inference only"):
        m(x)
    m.eval()
    with pytest.raises(RuntimeError, match="inference only"):
        m(x.requires_grad_())  # a gradient wanted through the FP8 GEMMs
    with pytest.raises(ValueError, match="already quantised"):
        m.quantize_("fp8-tensor")
    with pytest.raises(ValueError, match="mode"):
        _moe(seed=7).quantize_("int8")
    with pytest.raises(ValueError, match="quant_mode"):
        sy.MoEConfig(hidden_size=8, ffn_size=8, num_experts=2, top_k=1, quant_mode="fp8").validate()
    with pytest.raises(ValueError, match=r"w13_scale shape \(6, 1, 2\), expected \(6, 4, 2\)"):
        m.set_fp8_weight("w13", m.w13, torch.ones(6, 1, 2))
    with pytest.raises(ValueError, match=r"w2 shape"):
        m.set_fp8_weight("w2", m.w13, m.w13_scale)
    with pytest.raises(ValueError, match="finite"):
        m.set_fp8_weight("w2", m.w2, torch.full_like(m.w2_scale, float("inf")))
    with pytest.raises(ValueError, match="input_scale"):
        m.set_fp8_weight("w2", m.w2, m.w2_scale, torch.ones(6))  # fp8-block takes no static scale
    nan = m.w2.view(torch.uint8).clone()
    nan[3, 4, 5] = 0xFF
    with pytest.raises(ValueError, match=r"NaN code at \[3, 4, 5\]"):
        m.set_fp8_weight("w2", nan.view(FP8), m.w2_scale)
    # a non-finite float weight is refused by name
    f = _moe(seed=7)
    with torch.no_grad():
        f.w2[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"w2 has a non-finite value"):
        f.quantize_()


def test_fp8_config_module_and_state_dict_round_trip():
    """MoE(config with quant_mode) builds FP8 buffers; a state_dict of a quantised module loads into it exactly;
    static input scales (fp8-tensor) are used by forward."""
    src = _moe(seed=8).quantize_("fp8-tensor")
    dst = sy.MoE(copy.deepcopy(src.config), dtype=torch.bfloat16).eval()
    assert dst.quantized and dst.w13.dtype == FP8 and tuple(dst.w13_scale.shape) == (6,)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(16, 200, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
        dst.set_fp8_weight("w13", src.w13, src.w13_scale, torch.full((6,), 1e-3))  # saturating static scale
        assert rel(dst(x), src(x)) > 1e-2


@pytest.mark.skipif(not (ROOT / "python").exists(), reason="source tree")
def test_quantize_matches_the_cli_quantizer(tmp_path):
    """MoE.quantize_ against `switchyard quantize` on the same bf16 weights (Qwen names, a shared expert, partial
    blocks in H = 200, zero and tiny blocks): the same fp8 codes and scales, bit for bit, in both formats."""
    sft = pytest.importorskip("safetensors.torch")
    cli = _cli()
    if cli is None:
        pytest.skip("switchyard CLI not built (build-cpu/switchyard; or set SWITCHYARD_CLI)")
    m = _moe(seed=9, num_shared_experts=1, shared_ffn_size=128)
    e, f, h, s = 6, 256, 200, 128
    with torch.no_grad():
        m.w13.copy_(_special_weight((e, 2 * f, h), seed=10))
        m.w2[:, :, :] = _special_weight((e, h, f), seed=11)
    p = "model.layers.0.mlp."
    t = {p + "gate.weight": m.gate.detach().clone()}
    for i in range(e):
        t[f"{p}experts.{i}.gate_proj.weight"] = m.w13[i, :f].detach().clone()
        t[f"{p}experts.{i}.up_proj.weight"] = m.w13[i, f:].detach().clone()
        t[f"{p}experts.{i}.down_proj.weight"] = m.w2[i].detach().clone()
    t[p + "shared_experts.gate_proj.weight"] = m.shared_w13[:s].detach().clone()
    t[p + "shared_experts.up_proj.weight"] = m.shared_w13[s:].detach().clone()
    t[p + "shared_experts.down_proj.weight"] = m.shared_w2.detach().clone()
    src = tmp_path / "in.safetensors"
    sft.save_file(t, str(src))
    for mode in ("fp8-block", "fp8-tensor"):
        out = tmp_path / f"{mode}.safetensors"
        r = subprocess.run([cli, "quantize", "--weights", str(src), "--out", str(out), "--format", mode],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        q = sft.load_file(str(out))
        mq = copy.deepcopy(m).quantize_(mode)
        sfx = "weight_scale_inv" if mode == "fp8-block" else "weight_scale"
        bf = f // G

        def same(name, codes, scale, cli_base):
            assert torch.equal(codes.view(torch.uint8), q[cli_base + "weight"].view(torch.uint8)), name
            want = q[cli_base + sfx].reshape(scale.shape)
            assert torch.equal(scale.view(torch.int32), want.view(torch.int32)), name

        for i in range(e):
            b = f"{p}experts.{i}."
            if mode == "fp8-block":
                same(f"gate {i}", mq.w13[i, :f], mq.w13_scale[i, :bf], b + "gate_proj.")
                same(f"up {i}", mq.w13[i, f:], mq.w13_scale[i, bf:], b + "up_proj.")
                same(f"down {i}", mq.w2[i], mq.w2_scale[i], b + "down_proj.")
            else:  # one scale for gate and up (the larger amax), as the CLI writes
                same(f"gate {i}", mq.w13[i, :f], mq.w13_scale[i], b + "gate_proj.")
                same(f"up {i}", mq.w13[i, f:], mq.w13_scale[i], b + "up_proj.")
                same(f"down {i}", mq.w2[i], mq.w2_scale[i], b + "down_proj.")
        b = p + "shared_experts."
        bs = s // G
        if mode == "fp8-block":
            same("shared gate", mq.shared_w13[:s], mq.shared_w13_scale[:bs], b + "gate_proj.")
            same("shared up", mq.shared_w13[s:], mq.shared_w13_scale[bs:], b + "up_proj.")
        else:
            same("shared gate", mq.shared_w13[:s], mq.shared_w13_scale, b + "gate_proj.")
            same("shared up", mq.shared_w13[s:], mq.shared_w13_scale, b + "up_proj.")
        same("shared down", mq.shared_w2, mq.shared_w2_scale, b + "down_proj.")
        assert torch.equal(q[p + "gate.weight"], t[p + "gate.weight"])


def _cli():
    cand = [os.environ.get("SWITCHYARD_CLI", "")]
    lib = os.environ.get("SWITCHYARD_TORCH_LIB", "")
    if lib:
        cand.append(str(Path(lib).resolve().parents[2] / "switchyard"))
    cand += [str(ROOT / "build-cpu" / "switchyard"), str(ROOT / "build" / "switchyard")]
    return next((c for c in cand if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


# ---- from_hf ------------------------------------------------------------------------------------------------------


def _ds3_block(ffn=128, shared=True, dtype=torch.float32, seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV3Config(
        hidden_size=160, intermediate_size=256, moe_intermediate_size=ffn, n_routed_experts=4,
        n_shared_experts=1 if shared else 0, num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, vocab_size=64, num_hidden_layers=2, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, head_dim=8)
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(cfg).to(dtype).eval()
    block = model.model.layers[1].mlp
    with torch.no_grad():
        block.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return block, cfg


def _fp8_block(block, cfg, quantize_shared=True):
    """(fp8 block: the block with transformers' FP8Experts / FP8Linear holding hand-made codes + scales from the
    NumPy recipe, float block: the same block with the dequantised weights)."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear
    wrap = nn.Module()
    wrap.mlp = copy.deepcopy(block)
    wrap.config = cfg
    replace_with_fp8_linear(wrap, modules_to_not_convert=["gate"],
                            quantization_config=FineGrainedFP8Config(weight_block_size=[128, 128]), pre_quantized=True)
    fb = wrap.mlp
    fb.to_empty(device="cpu")
    deq = copy.deepcopy(block)
    fb.gate.load_state_dict(block.gate.state_dict())
    ex, fx = block.experts, fb.experts
    f = ex.down_proj.shape[2]

    def q(w):
        c, s = recipe_quantize(w.detach().float().numpy(), "fp8-block")
        return torch.from_numpy(c).view(FP8), torch.from_numpy(s), torch.from_numpy(recipe_weight(c, s, "fp8-block"))

    with torch.no_grad():
        for e in range(ex.gate_up_proj.shape[0]):
            cg, sg, wg = q(ex.gate_up_proj[e, :f])  # gate and up quantised as separate matrices, as in a checkpoint
            cu, su, wu = q(ex.gate_up_proj[e, f:])
            cd, sd, wd = q(ex.down_proj[e])
            fx.gate_up_proj[e] = torch.cat([cg, cu])
            fx.gate_up_proj_scale_inv[e] = torch.cat([sg, su])
            fx.down_proj[e] = cd
            fx.down_proj_scale_inv[e] = sd
            deq.experts.gate_up_proj[e] = torch.cat([wg, wu]).to(deq.experts.gate_up_proj.dtype)
            deq.experts.down_proj[e] = wd.to(deq.experts.down_proj.dtype)
        if quantize_shared and hasattr(block, "shared_experts"):
            for n in ("gate_proj", "up_proj", "down_proj"):
                c, s, w = q(getattr(block.shared_experts, n).weight)
                getattr(fb.shared_experts, n).weight.copy_(c)
                getattr(fb.shared_experts, n).weight_scale_inv.copy_(s)
                getattr(deq.shared_experts, n).weight.copy_(w.to(getattr(deq.shared_experts, n).weight.dtype))
        elif hasattr(block, "shared_experts"):  # an FP8 checkpoint that kept the shared expert in bf16
            fb.shared_experts = copy.deepcopy(block.shared_experts)
    return fb, deq


@pytest.mark.parametrize("quantize_shared", [True, False], ids=["fp8-shared", "float-shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hf_fp8_block(quantize_shared, dtype):
    from switchyard import hf
    block, cfg = _ds3_block(dtype=dtype, seed=1)
    fb, deq = _fp8_block(block, cfg, quantize_shared)
    assert type(fb.experts).__name__ == "FP8Experts" and fb.experts.gate_up_proj.dtype == FP8
    m = sy.MoE.from_hf(fb)
    assert isinstance(m, hf.HFMoE) and m.config.quant_mode == "fp8-block" and m.quantized
    # the block's codes and scales, exactly (gate blocks stacked over up blocks, as the C++ loader stacks them)
    assert torch.equal(m.w13.view(torch.uint8), fb.experts.gate_up_proj.view(torch.uint8))
    assert torch.equal(m.w13_scale, fb.experts.gate_up_proj_scale_inv)
    assert torch.equal(m.w2.view(torch.uint8), fb.experts.down_proj.view(torch.uint8))
    assert torch.equal(m.w2_scale, fb.experts.down_proj_scale_inv)
    sh = fb.shared_experts
    if quantize_shared:
        assert m.shared_w13.dtype == FP8
        assert torch.equal(m.shared_w13_scale, torch.cat([sh.gate_proj.weight_scale_inv, sh.up_proj.weight_scale_inv]))
        assert torch.equal(m.shared_w2_scale, sh.down_proj.weight_scale_inv)
    else:
        assert m.shared_w13.dtype == dtype and m.shared_w13_scale is None
        assert torch.equal(m.shared_w13, torch.cat([sh.gate_proj.weight, sh.up_proj.weight]))
    # names and layout back
    sd = m.hf_state_dict()
    assert torch.equal(sd["experts.gate_up_proj_scale_inv"], fb.experts.gate_up_proj_scale_inv)
    if quantize_shared:
        assert torch.equal(sd["shared_experts.up_proj.weight_scale_inv"], sh.up_proj.weight_scale_inv)
    # forward: within FP8 activation error of the block's own forward on the dequantised weights
    x = torch.randn(2, 12, 160).to(dtype)
    with torch.no_grad():
        y = m(x)
        want = deq(x)
    r = rel(y, want)
    assert 1e-3 < r < 0.06, r
    # patch_model's conversion (the block's calling convention, tensors taken over) computes the same
    pm = hf.convert_block(copy.deepcopy(fb), copy=False, mimic_block=True)
    with torch.no_grad():
        assert torch.equal(pm(x), y)


def test_from_hf_fp8_refusals():
    from switchyard import hf
    block, cfg = _ds3_block(ffn=64, seed=2)  # F % 128 != 0: gate and up rows would share 128-row scale blocks
    fb, _ = _fp8_block(block, cfg)
    with pytest.raises(hf.UnsupportedBlock, match="multiple of 128, got 64"):
        sy.MoE.from_hf(fb)
    block, cfg = _ds3_block(seed=3)
    fb, _ = _fp8_block(block, cfg)
    bad = copy.deepcopy(fb)
    bad.experts.block_size = [64, 64]
    with pytest.raises(hf.UnsupportedBlock, match="block_size"):
        sy.MoE.from_hf(bad)
    bad = copy.deepcopy(fb)
    bad.experts.gate_up_proj_scale_inv = nn.Parameter(torch.ones(4, 1, 2), requires_grad=False)
    with pytest.raises(hf.UnsupportedBlock, match="gate_up_proj_scale_inv"):
        sy.MoE.from_hf(bad)
    bad = copy.deepcopy(fb)
    with torch.no_grad():
        bad.experts.down_proj_scale_inv[1, 0, 0] = float("nan")
    with pytest.raises(hf.UnsupportedBlock, match="finite"):
        sy.MoE.from_hf(bad)
    bad = copy.deepcopy(fb)  # FP8 shared expert beside float routed experts
    bad.experts = block.experts
    with pytest.raises(hf.UnsupportedBlock, match="FP8 shared expert beside float"):
        sy.MoE.from_hf(bad)


# ---- GPU ----------------------------------------------------------------------------------------------------------

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("mode", ["fp8-block", "fp8-tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_op_matches_cpu(mode, dtype):
    a, b, s, off = _op_case(mode, dtype, seed=20, n=192, k=256, offsets=(0, 40, 40, 97, 150), rows=160)
    cpu = sy._ops.grouped_mm_fp8(a, b, s, None, off, sy.QUANT_MODES[mode])
    dev = sy._ops.grouped_mm_fp8(a.cuda(), b.cuda(), s.cuda(), None, off.cuda(), sy.QUANT_MODES[mode])
    assert dev.dtype == dtype
    assert rel(dev.cpu(), cpu) < 1e-2
    assert (dev[150:] == 0).all()
    if mode == "fp8-tensor":
        inp = torch.tensor([0.02, 0.5, 0.01, 0.03])
        cpu = sy._ops.grouped_mm_fp8(a, b, s, inp, off, 2)
        dev = sy._ops.grouped_mm_fp8(a.cuda(), b.cuda(), s.cuda(), inp.cuda(), off.cuda(), 2)
        assert rel(dev.cpu(), cpu) < 1e-2


@pytest.mark.parametrize("mode", ["fp8-block", "fp8-tensor"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_module_matches_cpu(mode):
    m = _moe(torch.bfloat16, seed=21, hidden_size=256, num_shared_experts=1, shared_ffn_size=128).quantize_(mode)
    x = torch.randn(96, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        cpu = m(x)
        mc = copy.deepcopy(m).cuda()
        dev = mc(x.cuda())
        # quantize_ on the GPU gives the same codes and scales as on the CPU
        g = _moe(torch.bfloat16, seed=21, hidden_size=256, num_shared_experts=1, shared_ffn_size=128).cuda()
        g.quantize_(mode)
    assert rel(dev.cpu(), cpu) < 1e-2
    for n in ("w13", "w2", "shared_w13", "shared_w2"):
        assert torch.equal(getattr(g, n).view(torch.uint8).cpu(), getattr(m, n).view(torch.uint8)), n
        assert torch.equal(getattr(g, f"{n}_scale").cpu(), getattr(m, f"{n}_scale")), n
