#!/usr/bin/env python3
"""CPU checks of bench/vllm_peer.py (no GPU, no vLLM): python3 bench/test_vllm_peer_align.py

  1. moe_align_block_size_torch against a plain Python loop on random routings (vLLM's layout and sizes);
  2. the AST extraction of fused_moe_kernel and its @triton.jit helpers from .deps/vllm/fused_moe.py, and, where
     Triton imports, that exec'ing them gives JITFunction objects with the expected argument names;
  3. the config choice (vLLM's nearest batch-size key, default rule, sibling option);
  4. the whole layer wiring (argument names, strides, grid, top_k row mapping, routed weights, combine) with a
     PyTorch emulation of what fused_moe_kernel computes per block, against an fp32 loop over experts;
  5. the real fused_moe_kernel run by Triton's CPU interpreter (TRITON_INTERPRET=1, in a subprocess) in fp32 and
     fp16 through vllm_fused_moe_layer, against the fp32 loop. The interpreter's bf16 tl.dot is wrong on CPU (a
     16x16 bf16 dot gives garbage there too), so bf16 is left to the GPU run, whose rows report their own error.
     Skipped where the interpreter does not run (it fails under numpy >= 2.3: 'only 0-dimensional arrays');
  6. the fp8 block-quantised mode (compare_torch.py --fp8): vLLM's config file names and default fp8 config,
     per_token_group_quant_fp8_torch against a scalar recipe written here (nearest-even e4m3 from a table of the
     codes), and the fp8 layer wiring (a_scale / b_scale strides, group_n / group_k, BLOCK_SIZE_K = min(BK, 128))
     with the emulated kernel scaling each 128-k block as fused_moe_kernel does, against reference_fp8_layer.
Parts 2-4 are skipped (and say so) when .deps/vllm is absent. Ends with 'N passed, N failed'.
"""
import math
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vllm_peer  # noqa: E402

RESULTS = {"passed": 0, "failed": 0, "skipped": 0}


def check(name, fn):
    try:
        r = fn()
        if r == "skip":
            RESULTS["skipped"] += 1
            print(f"SKIP {name}")
        else:
            RESULTS["passed"] += 1
            print(f"ok   {name}")
    except Exception:
        RESULTS["failed"] += 1
        print(f"FAIL {name}")
        traceback.print_exc()


# ---------------------------------------------------------------------------------------------------------------
def align_loop(topk_ids, block_size, num_experts):
    """Plain-Python moe_align_block_size (vLLM's docstring example semantics, ascending order inside an expert)."""
    flat = topk_ids.reshape(-1).tolist()
    numel = len(flat)
    max_padded = numel + num_experts * (block_size - 1)
    sorted_ids, expert_ids = [], []
    for e in range(num_experts):
        seg = [i for i, x in enumerate(flat) if x == e]
        if not seg:
            continue
        pad = -len(seg) % block_size
        seg += [numel] * pad
        sorted_ids += seg
        expert_ids += [e] * (len(seg) // block_size)
    total = len(sorted_ids)
    return sorted_ids + [numel] * (max_padded - total), expert_ids, total, max_padded


def test_align_random():
    gen = torch.Generator().manual_seed(0)
    cases = [(1, 1, 1, 16), (1, 2, 8, 16), (3, 2, 8, 64), (16, 2, 8, 16), (16, 8, 128, 16), (100, 8, 256, 32),
             (257, 2, 8, 128), (4096, 8, 128, 64), (1000, 8, 256, 128), (64, 4, 4, 16)]
    for t, k, e, bs in cases:
        for trial in range(3):
            if trial == 2:  # skewed: everybody picks from the first k experts
                ids = torch.stack([torch.randperm(min(e, k), generator=gen)[:k] for _ in range(t)])
            else:
                ids = torch.rand(t, e, generator=gen).topk(k, dim=1).indices
            s, x, n = vllm_peer.moe_align_block_size_torch(ids, bs, e)
            rs, rx, rn, maxp = align_loop(ids, bs, e)
            assert s.dtype == torch.int32 and x.dtype == torch.int32 and n.dtype == torch.int32, (s.dtype, x.dtype)
            assert s.shape == (maxp,), (s.shape, maxp)
            assert x.shape == ((maxp + bs - 1) // bs,), (x.shape, maxp, bs)
            assert n.shape == (1,) and int(n[0]) == rn, (n, rn)
            assert s.tolist() == rs, f"sorted ids differ for t={t} k={k} e={e} bs={bs}"
            assert x[: rn // bs].tolist() == rx, f"expert ids differ for t={t} k={k} e={e} bs={bs}"
            assert rn % bs == 0


def test_align_properties():
    """Layout properties the kernel relies on, on a larger random case."""
    gen = torch.Generator().manual_seed(1)
    t, k, e, bs = 3000, 8, 128, 64
    ids = torch.rand(t, e, generator=gen).topk(k, dim=1).indices
    s, x, n = vllm_peer.moe_align_block_size_torch(ids, bs, e)
    numel, ntp = t * k, int(n[0])
    valid = s[:ntp][s[:ntp] < numel].long()
    assert sorted(valid.tolist()) == list(range(numel))           # each (token, slot) exactly once
    assert (s[ntp:] == numel).all()                               # nothing valid past the padded total
    flat = ids.reshape(-1)
    blocks = s[:ntp].view(-1, bs).long()
    for b in range(ntp // bs):                                    # every valid id in block b routes to x[b]
        row = blocks[b][blocks[b] < numel]
        assert row.numel() > 0 and (flat[row] == x[b]).all()
    assert (x[: ntp // bs].diff() >= 0).all()                     # experts ascending


# ---------------------------------------------------------------------------------------------------------------
def have_deps():
    return os.path.exists(os.path.join(vllm_peer.DEPS_DIR, "fused_moe.py"))


EXPECTED_ARGS_START = ["a_ptr", "b_ptr", "c_ptr"]


def test_ast_extraction():
    if not have_deps():
        return "skip"
    _, order, consts = vllm_peer.extract_jit_sources()
    names = [fn.name for fn in order]
    assert names[-1] == "fused_moe_kernel", names
    assert "write_zeros_to_output" in names, names
    args = vllm_peer.kernel_arg_names()
    assert args[:3] == EXPECTED_ARGS_START, args
    for needed in ("sorted_token_ids_ptr", "expert_ids_ptr", "num_tokens_post_padded_ptr", "MUL_ROUTED_WEIGHT",
                   "top_k", "compute_type", "BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M"):
        assert needed in args, needed
    print(f"     extracted {names} (+{len(consts)} constants); kernel takes {len(args)} arguments")


def test_jit_exec():
    if not have_deps():
        return "skip"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "skip"
    funcs = vllm_peer.load_jit_functions()
    from triton.runtime.jit import JITFunction
    for name, fn in funcs.items():
        assert isinstance(fn, JITFunction), (name, type(fn))
    k = vllm_peer.load_kernel()
    assert k.arg_names == vllm_peer.kernel_arg_names(), (k.arg_names, vllm_peer.kernel_arg_names())
    # the kernel's globals resolve the helper to the JIT object, as Triton's compiler will look it up
    assert funcs["fused_moe_kernel"].fn.__globals__["write_zeros_to_output"] is funcs["write_zeros_to_output"]
    print(f"     triton {triton.__version__}: {sorted(funcs)} are JITFunctions")


def test_configs():
    if not have_deps():
        return "skip"
    cfg, src = vllm_peer.get_config(16, 8, 14336, device_name="NVIDIA H200")
    assert cfg["BLOCK_SIZE_M"] == 16 and cfg["BLOCK_SIZE_N"] == 64 and cfg["BLOCK_SIZE_K"] == 256, cfg
    assert "key 16" in src, src
    cfg, src = vllm_peer.get_config(16384, 8, 14336, device_name="NVIDIA H200 NVL")   # H200 family -> NVIDIA_H200
    assert cfg["BLOCK_SIZE_M"] == 128 and "key 4096" in src, (cfg, src)
    cfg, src = vllm_peer.get_config(20, 128, 768, device_name="NVIDIA H100 80GB HBM3")  # nearest of 16/24 -> 16
    assert "key 16" in src and cfg["BLOCK_SIZE_K"] == 256, (cfg, src)
    cfg, src = vllm_peer.get_config(16, 8, 14336, device_name="NVIDIA H100 80GB HBM3", allow_sibling=False)
    assert src.startswith("vLLM default") and cfg["BLOCK_SIZE_M"] == 64, (cfg, src)        # M=16 > E=8
    cfg, src = vllm_peer.get_config(16, 8, 14336, device_name="NVIDIA H100 80GB HBM3", allow_sibling=True)
    assert "other Hopper" in src and cfg["BLOCK_SIZE_K"] == 256, (cfg, src)
    cfg, src = vllm_peer.get_config(16, 256, 2048, device_name="NVIDIA H100 80GB HBM3")
    assert src.startswith("vLLM default") and cfg["BLOCK_SIZE_M"] == 16, (cfg, src)        # M=16 <= E=256


# ---------------------------------------------------------------------------------------------------------------
class EmulatedKernel:
    """What fused_moe_kernel computes, block by block, read off the same keyword arguments (strides included)."""

    def __init__(self, arg_names):
        self.arg_names = arg_names
        self.launches = 0

    def __getitem__(self, grid):
        def run(**kw):
            opts = {k: kw.pop(k) for k in list(kw) if k in vllm_peer._LAUNCH_OPTIONS}
            assert set(kw) == set(self.arg_names), set(kw) ^ set(self.arg_names)
            assert all(isinstance(v, int) for v in opts.values()), opts
            a, b, c = kw["a_ptr"], kw["b_ptr"], kw["c_ptr"]
            n, k, em, nvalid, top_k = kw["N"], kw["K"], kw["EM"], kw["num_valid_tokens"], kw["top_k"]
            bm, bn = kw["BLOCK_SIZE_M"], kw["BLOCK_SIZE_N"]
            num_pid_m, num_pid_n = -(-em // bm), -(-n // bn)
            assert grid[0] == num_pid_m * num_pid_n, (grid, num_pid_m, num_pid_n)
            a2 = a.as_strided((a.shape[0], k), (kw["stride_am"], kw["stride_ak"]))
            b3 = b.as_strided((b.shape[0], n, k), (kw["stride_be"], kw["stride_bn"], kw["stride_bk"]))
            c2 = c.as_strided((nvalid, n), (kw["stride_cm"], kw["stride_cn"]))
            sorted_ids, expert_ids = kw["sorted_token_ids_ptr"], kw["expert_ids_ptr"]
            ntp = int(kw["num_tokens_post_padded_ptr"][0])
            w = kw["topk_weights_ptr"].reshape(-1)
            fp8 = kw["use_fp8_w8a8"]
            if fp8:  # block-quantised: scales per (row, 128-k group) and (expert, 128-n group, 128-k group)
                gn, gk, bk = kw["group_n"], kw["group_k"], kw["BLOCK_SIZE_K"]
                assert gn > 0 and gk > 0 and bk <= gk and gk % bk == 0, (gn, gk, bk)  # vLLM's min(BK, block) rule
                assert a.dtype == b.dtype == torch.float8_e4m3fn and a.is_contiguous() and b.is_contiguous()
                a, b = a.float(), b.float()  # same shapes and (contiguous) strides; CPU float8 cannot be indexed
                nk = -(-k // gk)
                a_s = kw["a_scale_ptr"].as_strided((a.shape[0], nk), (kw["stride_asm"], kw["stride_ask"]))
                b_s = kw["b_scale_ptr"].as_strided((b.shape[0], -(-n // gn), nk),
                                                   (kw["stride_bse"], kw["stride_bsn"], kw["stride_bsk"]))
            written = torch.zeros(nvalid, dtype=torch.int64)
            for pid_m in range(num_pid_m):
                if pid_m * bm >= ntp:
                    continue
                assert (pid_m + 1) * bm <= sorted_ids.numel() and pid_m < expert_ids.numel()
                offs = sorted_ids[pid_m * bm:(pid_m + 1) * bm].long()
                rows = offs[offs < nvalid]
                e = int(expert_ids[pid_m])
                if fp8:
                    a2 = a.as_strided((a.shape[0], k), (kw["stride_am"], kw["stride_ak"]))
                    b3 = b.as_strided((b.shape[0], n, k), (kw["stride_be"], kw["stride_bn"], kw["stride_bk"]))
                    acc = torch.zeros(rows.numel(), n)
                    for kb in range(nk):
                        ks = slice(kb * gk, min(k, (kb + 1) * gk))
                        part = a2[rows // top_k][:, ks] @ b3[e][:, ks].t()
                        acc += part * a_s[rows // top_k, kb][:, None] * b_s[e, torch.arange(n) // gn, kb][None, :]
                else:
                    acc = a2[rows // top_k].float() @ b3[e].float().t()
                if kw["MUL_ROUTED_WEIGHT"]:
                    acc = acc * w[rows].float()[:, None]
                c2[rows] = acc.to(c.dtype)
                written[rows] += 1
            assert (written == 1).all(), "some (token, slot) rows not written exactly once (grid or EM cut wrong)"
            self.launches += 1
        return run


def test_layer_wiring():
    if not have_deps():
        return "skip"
    gen = torch.Generator().manual_seed(2)
    kernel = EmulatedKernel(vllm_peer.kernel_arg_names())
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for t, h, f, e, k, bm in ((1, 64, 32, 8, 2, 16), (5, 64, 48, 8, 2, 16), (37, 96, 40, 16, 4, 16),
                                  (200, 64, 32, 32, 8, 64), (300, 32, 16, 4, 2, 128)):
            x = torch.randn(t, h, generator=gen).to(dtype)
            wg = torch.randn(e, h, generator=gen).to(dtype) / h ** 0.5
            w13 = torch.randn(e, 2 * f, h, generator=gen).to(dtype) / h ** 0.5
            w2 = torch.randn(e, h, f, generator=gen).to(dtype) / f ** 0.5
            cfg = {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "num_warps": 4,
                   "num_stages": 3}
            y = vllm_peer.vllm_fused_moe_layer(x, wg, w13, w2, k, config=cfg, kernel=kernel, compute_type="emul")
            ref = vllm_peer.reference_layer(x, wg, w13, w2, k)
            assert y.shape == (t, h) and y.dtype == dtype, (y.shape, y.dtype)
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            assert err < tol, f"{dtype} t={t} h={h} f={f} e={e} k={k} bm={bm}: rel err {err:.2e}"
    assert kernel.launches == 20, kernel.launches


def test_layer_matches_compare_torch_sort():
    """Same router as compare_torch (the module is imported only if it imports cleanly on this machine)."""
    try:
        import compare_torch
    except Exception:
        return "skip"
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 16, generator=gen)
    wg = torch.randn(8, 16, generator=gen)
    a = vllm_peer.router(x, wg, 2)
    b = compare_torch.router(x, wg, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------------------------
def test_fp8_configs():
    name = vllm_peer.config_file_name(128, 768, "NVIDIA_H200", vllm_peer.FP8_DTYPE, vllm_peer.FP8_BLOCK)
    assert name == "E=128,N=768,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json", name
    assert vllm_peer.config_file_name(8, 14336, "X") == "E=8,N=14336,device_name=X.json"
    d = vllm_peer.default_config(16, 256, vllm_peer.FP8_DTYPE, vllm_peer.FP8_BLOCK)
    assert d == {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 32, "SPLIT_K": 1,
                 "num_warps": 4, "num_stages": 3}, d
    cfg, src = vllm_peer.get_config(16, 256, 2048, device_name="NVIDIA H100 80GB HBM3", deps_dir="/nonexistent",
                                    dtype=vllm_peer.FP8_DTYPE, block_shape=vllm_peer.FP8_BLOCK)
    assert cfg == d and src.startswith("vLLM default") and "dtype=fp8_w8a8,block_shape=[128,128]" in src, src
    if not have_deps():
        return None
    p = os.path.join(vllm_peer.DEPS_DIR, "configs", name)
    if not os.path.exists(p):
        return None
    cfg, src = vllm_peer.get_config(16, 128, 768, device_name="NVIDIA H200", dtype=vllm_peer.FP8_DTYPE,
                                    block_shape=vllm_peer.FP8_BLOCK)
    assert src.startswith("tuned") and "fp8_w8a8" in src and "key 16" in src, src


E4M3_VALUES = None


def e4m3_table():
    """(values of the 126 positive finite e4m3 codes 0..125+126: code i -> value), from the format's definition."""
    global E4M3_VALUES
    if E4M3_VALUES is None:
        vals = []
        for c in range(0x7F):  # 0x7F is NaN
            e, m = c >> 3, c & 7
            vals.append(m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
        E4M3_VALUES = vals
    return E4M3_VALUES


def e4m3_round(v):
    """Nearest e4m3 value to a finite |v| <= 448 (ties to the even code), sign kept."""
    table = e4m3_table()
    a = abs(v)
    best = min(range(len(table)), key=lambda c: (abs(table[c] - a), c & 1))
    return math.copysign(table[best], v)


def test_fp8_group_quant():
    import numpy as np
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(5, 384, generator=gen) * torch.tensor([1e-3, 1.0, 30.0]).repeat_interleave(128)).to(torch.bfloat16)
    x[2, 128:256] = 0  # an all-zero group: scale eps / 448, codes 0
    x[3, 0] = 7.0      # exact amax: 7 / (7/448) = 448
    q, s = vllm_peer.per_token_group_quant_fp8_torch(x, 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.dtype == torch.float32 and s.shape == (5, 3)
    xf = x.float().numpy()
    qf = q.float().numpy()
    for r in range(5):
        for g in range(3):
            grp = xf[r, g * 128:(g + 1) * 128]
            want_s = np.float32(max(np.float32(np.abs(grp).max()), np.float32(1e-10))) / np.float32(448.0)
            assert np.float32(s[r, g].item()) == want_s, (r, g, s[r, g].item(), want_s)
            for j in range(0, 128, 7):
                v = float(np.clip(np.float32(grp[j]) / want_s, -448.0, 448.0))
                assert qf[r, g * 128 + j] == e4m3_round(v), (r, g, j, grp[j], qf[r, g * 128 + j], e4m3_round(v))
    assert (qf[2, 128:256] == 0).all()
    assert qf[3, 0] == 448.0


def test_fp8_layer_wiring():
    if not have_deps():
        return "skip"
    gen = torch.Generator().manual_seed(6)
    kernel = EmulatedKernel(vllm_peer.kernel_arg_names())
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for t, h, f, e, k, bm, bk in ((1, 256, 128, 8, 2, 16, 256), (7, 384, 256, 8, 2, 16, 128),
                                      (70, 256, 384, 16, 4, 64, 64), (130, 128, 128, 4, 2, 64, 128)):
            x = torch.randn(t, h, generator=gen).to(dtype)
            wg = torch.randn(e, h, generator=gen).to(dtype) / h ** 0.5
            w13 = torch.randn(e, 2 * f, h, generator=gen) / h ** 0.5
            w2 = torch.randn(e, h, f, generator=gen) / f ** 0.5
            q13, s13 = quantize_blocks(w13)
            q2, s2 = quantize_blocks(w2)
            cfg = {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 32, "num_warps": 4,
                   "num_stages": 3}
            y = vllm_peer.vllm_fused_moe_fp8_layer(x, wg, q13, s13, q2, s2, k, config=cfg, kernel=kernel,
                                                   compute_type="emul")
            ref = vllm_peer.reference_fp8_layer(x, wg, q13, s13, q2, s2, k)
            assert y.shape == (t, h) and y.dtype == dtype, (y.shape, y.dtype)
            err = float((y.float() - ref).norm() / ref.norm())
            assert err < tol, f"{dtype} t={t} h={h} f={f} e={e} k={k} bm={bm} bk={bk}: rel L2 {err:.2e}"
            # and W8A8 is close to the unquantised layer (a wiring slip in the scales would not be)
            full = vllm_peer.reference_layer(x, wg, vllm_peer.dequantize_block(q13, s13),
                                             vllm_peer.dequantize_block(q2, s2), k)
            err = float((y.float() - full).norm() / full.norm())
            assert err < 0.1, f"fp8 vs dequantised-weight layer rel L2 {err:.2e}"
    assert kernel.launches == 16, kernel.launches


def quantize_blocks(w, g=128):
    """[E, N, K] fp32 -> (e4m3 codes, fp32 scales [E, N/g, K/g]) by switchyard quantize's recipe (amax / 448)."""
    e, n, k = w.shape
    bn, bk = -(-n // g), -(-k // g)
    p = torch.nn.functional.pad(w, (0, bk * g - k, 0, bn * g - n)).view(e, bn, g, bk, g)
    s = p.abs().amax(dim=(2, 4)) / 448.0
    q = (p / s[:, :, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(e, bn * g, bk * g)[:, :n, :k]
    return q.contiguous(), s.contiguous()


INTERP_SCRIPT = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import torch, vllm_peer
import triton.language as tl
k = vllm_peer.load_kernel()
gen = torch.Generator().manual_seed(0)
for dtype, ct, tol in ((torch.float32, tl.float32, 1e-4), (torch.float16, tl.float16, 3e-3)):
    for t, h, f, e, topk, bm in ((1, 64, 32, 8, 2, 16), (37, 64, 48, 16, 4, 16), (70, 64, 32, 32, 8, 64)):
        x = torch.randn(t, h, generator=gen).to(dtype)
        wg = torch.randn(e, h, generator=gen).to(dtype) / h ** 0.5
        w13 = torch.randn(e, 2 * f, h, generator=gen).to(dtype) / h ** 0.5
        w2 = torch.randn(e, h, f, generator=gen).to(dtype) / f ** 0.5
        cfg = {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1, "num_warps": 4}
        y = vllm_peer.vllm_fused_moe_layer(x, wg, w13, w2, topk, config=cfg, kernel=k, compute_type=ct)
        ref = vllm_peer.reference_layer(x, wg, w13, w2, topk)
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        print(dtype, t, h, f, e, topk, bm, "rel err %.2e" % err)
        assert err < tol, err
print("INTERP-OK")
"""


def test_triton_interpreter():
    if not have_deps():
        return "skip"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "skip"
    import subprocess
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", INTERP_SCRIPT, os.path.dirname(os.path.abspath(__file__))], env=env,
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    if "INTERP-OK" in out:
        print("     " + "\n     ".join(l for l in r.stdout.splitlines() if "rel err" in l))
        return None
    if "only 0-dimensional arrays" in out:
        print("     Triton's interpreter does not run under this numpy (>= 2.3)")
        return "skip"
    raise AssertionError(out[-3000:])


def test_best_of_picks_the_fastest_and_skips_refused_configs():
    """pick_best_config: vLLM's own config is tried first and counted once, a config whose timing raises is skipped,
    the fastest of the rest wins; every candidate is a complete launch config of vLLM's tuning space."""
    own = dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=64, BLOCK_SIZE_K=32, GROUP_SIZE_M=8)
    cands = [own, dict(own, BLOCK_SIZE_N=128), dict(own, BLOCK_SIZE_N=256), dict(own, BLOCK_SIZE_M=128)]
    times = {64: 3.0, 128: 1.5}

    def time_fn(cfg):
        if cfg["BLOCK_SIZE_N"] == 256:
            raise RuntimeError("out of shared memory")
        return times[cfg["BLOCK_SIZE_N"]] + (0.7 if cfg["BLOCK_SIZE_M"] == 128 else 0.0)

    best, ms, tried = vllm_peer.pick_best_config(own, cands, time_fn)
    assert best == dict(own, BLOCK_SIZE_N=128) and ms == 1.5
    assert len(tried) == 4 and [c for c, t in tried if t is None] == [dict(own, BLOCK_SIZE_N=256)]
    try:
        vllm_peer.pick_best_config(own, [], lambda cfg: (_ for _ in ()).throw(RuntimeError("no")))
        raise AssertionError("no PeerUnavailable when no config ran")
    except vllm_peer.PeerUnavailable:
        pass
    assert len(vllm_peer.BEST_OF_CANDIDATES) == 10
    keys = {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages"}
    for cfg in vllm_peer.BEST_OF_CANDIDATES:
        assert set(cfg) == keys
        assert all(cfg[k] & (cfg[k] - 1) == 0 for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"))
        assert cfg["num_warps"] in (4, 8) and 2 <= cfg["num_stages"] <= 5
    assert len({tuple(sorted(c.items())) for c in vllm_peer.BEST_OF_CANDIDATES}) == 10


if __name__ == "__main__":
    check("align vs Python loop (random, skewed, tiny and large cases)", test_align_random)
    check("align layout properties", test_align_properties)
    check("AST extraction of fused_moe_kernel and helpers", test_ast_extraction)
    check("exec under triton.jit gives JITFunctions", test_jit_exec)
    check("config choice (nearest key, default rule, sibling)", test_configs)
    check("layer wiring with an emulated kernel vs fp32 loop", test_layer_wiring)
    check("router identical to compare_torch.router", test_layer_matches_compare_torch_sort)
    check("real fused_moe_kernel in Triton's CPU interpreter (fp32, fp16)", test_triton_interpreter)
    check("fp8: vLLM config names and default block-fp8 config", test_fp8_configs)
    check("fp8: per_token_group_quant_fp8_torch vs a scalar e4m3 recipe", test_fp8_group_quant)
    check("fp8: layer wiring (scales, strides, groups) with an emulated kernel vs fp32 W8A8 loop", test_fp8_layer_wiring)
    check("best-of launch configs: the fastest wins, refused configs are skipped", test_best_of_picks_the_fastest_and_skips_refused_configs)
    print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed, {RESULTS['skipped']} skipped")
    sys.exit(1 if RESULTS["failed"] else 0)
