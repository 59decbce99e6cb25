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
     Skipped where the interpreter does not run (it fails under numpy >= 2.3: 'only 0-dimensional arrays').
Parts 2-4 are skipped (and say so) when .deps/vllm is absent. Ends with 'N passed, N failed'.
"""
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
            written = torch.zeros(nvalid, dtype=torch.int64)
            for pid_m in range(num_pid_m):
                if pid_m * bm >= ntp:
                    continue
                assert (pid_m + 1) * bm <= sorted_ids.numel() and pid_m < expert_ids.numel()
                offs = sorted_ids[pid_m * bm:(pid_m + 1) * bm].long()
                rows = offs[offs < nvalid]
                e = int(expert_ids[pid_m])
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


if __name__ == "__main__":
    check("align vs Python loop (random, skewed, tiny and large cases)", test_align_random)
    check("align layout properties", test_align_properties)
    check("AST extraction of fused_moe_kernel and helpers", test_ast_extraction)
    check("exec under triton.jit gives JITFunctions", test_jit_exec)
    check("config choice (nearest key, default rule, sibling)", test_configs)
    check("layer wiring with an emulated kernel vs fp32 loop", test_layer_wiring)
    check("router identical to compare_torch.router", test_layer_matches_compare_torch_sort)
    check("real fused_moe_kernel in Triton's CPU interpreter (fp32, fp16)", test_triton_interpreter)
    print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed, {RESULTS['skipped']} skipped")
    sys.exit(1 if RESULTS["failed"] else 0)
