#!/usr/bin/env python3
"""End-to-end test of `switchyard forward` against moe_numpy.py, an independent float64 NumPy implementation.

For each case: seeded random weights (uniform(+-1/sqrt(in)), like nn.Linear) written by this script as a
safetensors file with Hugging Face names, a random input .npy, one `switchyard forward` run via subprocess,
and an element-wise check |y - ref| <= atol * max|ref| + rtol * |ref| with tolerances from the dtype
(fp32: 1e-5; bf16: 2^-7, two units of bf16 rounding, with the reference emulating the contract's rounding
points). Cases: Mixtral-style (softmax, top-2, SwiGLU, Mixtral names), DeepSeek-style (sigmoid,
e_score_correction_bias, groups, renormalise, routed scale, shared experts, prefix model.layers.3.),
Qwen2 spelling with an ungated activation, bf16, capacity with drops under both policies, the stats JSON,
and the error paths (exit code 2, one line `switchyard: error: ...`, no output file); `switchyard quantize` to
fp8-block and fp8-tensor and `forward` on its output (relative L2 < 0.1 against the float reference), and the
FP8 / quantize error paths.
Usage: test_cli_numpy.py --cli path/to/switchyard [--device cuda]      Prints 'N passed, N failed'; exit 1 on any failure.
"""
import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_numpy as mn  # noqa: E402

RESULTS = {"passed": 0, "failed": 0}
DEVICE = ["cpu"]  # --device: where `switchyard forward` runs the layer


def check(name, ok, detail=""):
    if ok:
        RESULTS["passed"] += 1
        print(f"PASS {name}")
    else:
        RESULTS["failed"] += 1
        print(f"FAIL {name}: {detail}")


def uniform(rng, shape, fan_in):
    b = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-b, b, size=shape)


def make_layer(seed, H, F, E, dtype, act="swiglu", S=0, bias=False, shared_gate=False):
    """Random weights as the dtype's values (float64 arrays)."""
    rng = np.random.default_rng(seed)
    r = 2 * F if mn.gated(act) else F
    w = {
        "gate": uniform(rng, (E, H), H),
        "w13": uniform(rng, (E, r, H), H),
        "w2": uniform(rng, (E, H, F), F),
        "bias": rng.uniform(-0.1, 0.1, size=E).astype(np.float32).astype(np.float64) if bias else None,
        "shared_w13": None,
        "shared_w2": None,
        "shared_gate": None,
    }
    if S:
        w["shared_w13"] = uniform(rng, (2 * S if mn.gated(act) else S, H), H)
        w["shared_w2"] = uniform(rng, (H, S), S)
        if shared_gate:
            w["shared_gate"] = uniform(rng, (1, H), H)
    for key in ("gate", "w13", "w2", "shared_w13", "shared_w2", "shared_gate"):
        if w[key] is not None:
            w[key] = mn.round_to(w[key], dtype)
    return w


def hf_tensors(w, scheme, prefix, dtype, act="swiglu", shared_name="shared_experts"):
    """Hugging Face names for the layer (Mixtral: w1 gate, w3 up, w2 down; Qwen/DeepSeek: *_proj)."""
    t = {}
    E, r, H = w["w13"].shape
    F = w["w2"].shape[2]
    # Unrelated tensors a real shard holds next to the MoE block.
    t[prefix + "self_attn.o_proj.weight"] = mn.encode(np.ones((H, H)), dtype)
    t[prefix + "input_layernorm.weight"] = mn.encode(np.ones(H), dtype)
    if scheme == "mixtral":
        t[prefix + "block_sparse_moe.gate.weight"] = mn.encode(w["gate"], dtype)
        for e in range(E):
            q = f"{prefix}block_sparse_moe.experts.{e}."
            if mn.gated(act):
                t[q + "w1.weight"] = mn.encode(w["w13"][e, :F], dtype)
                t[q + "w3.weight"] = mn.encode(w["w13"][e, F:], dtype)
            else:
                t[q + "w1.weight"] = mn.encode(w["w13"][e], dtype)
            t[q + "w2.weight"] = mn.encode(w["w2"][e], dtype)
    else:
        t[prefix + "mlp.gate.weight"] = mn.encode(w["gate"], dtype)
        if w["bias"] is not None:
            t[prefix + "mlp.gate.e_score_correction_bias"] = ("F32", w["bias"].astype("<f4"))
        for e in range(E):
            q = f"{prefix}mlp.experts.{e}."
            if mn.gated(act):
                t[q + "gate_proj.weight"] = mn.encode(w["w13"][e, :F], dtype)
                t[q + "up_proj.weight"] = mn.encode(w["w13"][e, F:], dtype)
            else:
                t[q + "up_proj.weight"] = mn.encode(w["w13"][e], dtype)
            t[q + "down_proj.weight"] = mn.encode(w["w2"][e], dtype)
        if w["shared_w13"] is not None:
            S = w["shared_w2"].shape[1]
            q = f"{prefix}mlp.{shared_name}."
            if mn.gated(act):
                t[q + "gate_proj.weight"] = mn.encode(w["shared_w13"][:S], dtype)
                t[q + "up_proj.weight"] = mn.encode(w["shared_w13"][S:], dtype)
            else:
                t[q + "up_proj.weight"] = mn.encode(w["shared_w13"], dtype)
            t[q + "down_proj.weight"] = mn.encode(w["shared_w2"], dtype)
            if w.get("shared_gate") is not None:
                t[f"{prefix}mlp.shared_expert_gate.weight"] = mn.encode(w["shared_gate"], dtype)
    return t


def save_input(path, x, dtype):
    np.save(path, mn.encode(x, dtype)[1])


def load_output(path, dtype):
    a = np.load(path)
    if dtype == "bf16":
        assert a.dtype == np.uint16, a.dtype
    return mn.decode(a, dtype)


def run_cli(cli, args):
    p = subprocess.run([cli] + args, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def compare(name, got, ref, rtol, atol_frac):
    if got.shape != ref.shape:
        check(name, False, f"shape {got.shape} != {ref.shape}")
        return
    amax = float(np.abs(ref).max()) if ref.size else 0.0
    bad = np.abs(got - ref) > atol_frac * amax + rtol * np.abs(ref)
    bad |= ~np.isfinite(got)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        check(name, False, f"{int(bad.sum())} bad elements; first at {idx}: got {got[idx]!r} expected {ref[idx]!r}")
    else:
        err = float(np.abs(got - ref).max()) / max(amax, 1e-300)
        check(name, True)
        print(f"     max |y - ref| / max|ref| = {err:.3e} (max|ref| = {amax:.4g})")


# fp32 on the GPU accumulates in fp32 (DESIGN.md), not exactly: 1e-4 there (K <= 64 terms per sum here).
TOL = {"fp32": (1e-5, 1e-5), "bf16": (2.0 ** -7, 2.0 ** -7)}
TOL_CUDA = {"fp32": (1e-4, 1e-4), "bf16": (2.0 ** -7, 2.0 ** -7)}


def forward_case(cli, tmp, name, cfg, w, x, scheme, prefix="", extra=(), shared_name="shared_experts",
                 stats_check=None):
    dtype = cfg.get("dtype", "fp32")
    wpath = os.path.join(tmp, name + ".safetensors")
    mn.write_safetensors(wpath, hf_tensors(w, scheme, prefix, dtype, cfg.get("activation", "swiglu"), shared_name),
                         {"format": "pt"})
    xpath, ypath, spath = (os.path.join(tmp, name + s) for s in ("_x.npy", "_y.npy", "_stats.json"))
    save_input(xpath, x, dtype)
    args = ["forward", "--weights", wpath, "--input", xpath, "--output", ypath, "--stats", spath,
            "--top-k", str(cfg["top_k"]), "--dtype", dtype, "--quiet", "--device", DEVICE[0]]
    if prefix:
        args += ["--prefix", prefix]
    args += list(extra)
    rc, out, err = run_cli(cli, args)
    if rc != 0:
        check(name, False, f"exit code {rc}: {err.strip()}")
        return
    ref, ids, wts, keep = mn.moe_forward(cfg, x, w)
    rtol, atol = (TOL_CUDA if DEVICE[0] == "cuda" else TOL)[dtype]
    compare(name, load_output(ypath, dtype), ref, rtol, atol)
    with open(spath) as f:
        st = json.load(f)
    T, k = ids.shape
    ok_ids = np.array_equal(np.array(st["topk_ids"]).reshape(T, k), ids)
    ok_w = np.allclose(np.array(st["topk_weights"]).reshape(T, k), wts, rtol=1e-6, atol=1e-7)
    counts = np.bincount(ids.reshape(-1), minlength=cfg["num_experts"])
    ok_counts = st["expert_counts"] == counts.tolist() and sum(st["kept_counts"]) == int(keep.sum())
    ok_drop = st["dropped"] == int((~keep).sum())
    check(name + " stats (top-k ids, weights, counts, drops)", ok_ids and ok_w and ok_counts and ok_drop,
          f"ids {ok_ids} weights {ok_w} counts {ok_counts} dropped {st['dropped']} vs {int((~keep).sum())}")
    if stats_check:
        stats_check(st, keep)


def expect_error(cli, tmp, name, args, must_contain, out_path):
    if os.path.exists(out_path):
        os.remove(out_path)
    rc, out, err = run_cli(cli, args)
    lines = [l for l in err.splitlines() if l.strip()]
    ok = (rc == 2 and len(lines) == 1 and lines[0].startswith("switchyard: error: ")
          and must_contain.lower() in lines[0].lower() and not os.path.exists(out_path)
          and not any(f.startswith(os.path.basename(out_path) + ".tmp") for f in os.listdir(os.path.dirname(out_path))))
    check("error: " + name, ok, f"rc={rc} stderr={err.strip()!r} output exists={os.path.exists(out_path)}")

def file_digest(path):
    """Bytes of a file (None when absent) to prove a failed run left it untouched."""
    if not os.path.exists(path) or os.path.isdir(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def expect_clean_error(cli, name, args, must_contain, outputs, inputs, cwd=None, timeout=60, max_line=700):
    """Exit 2, exactly one printable bounded `switchyard: error:` line, no output file or temporary left behind
    (outputs that existed before keep their bytes), every input byte-for-byte unchanged."""
    before_out = {p: file_digest(p) for p in outputs}
    before_in = {p: file_digest(p) for p in inputs}
    try:
        p = subprocess.run([cli] + args, capture_output=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        check("robust: " + name, False, f"timed out after {timeout} s")
        return
    err = p.stderr.decode("utf-8", "replace")
    lines = [l for l in err.splitlines() if l.strip()]
    problems = []
    if p.returncode != 2:
        problems.append(f"rc={p.returncode}")
    if len(lines) != 1 or not lines[0].startswith("switchyard: error: "):
        problems.append(f"{len(lines)} stderr lines")
    elif must_contain.lower() not in lines[0].lower():
        problems.append(f"message lacks {must_contain!r}")
    if lines and (len(lines[0]) > max_line or any(ord(c) < 0x20 or ord(c) == 0x7f for c in lines[0])):
        problems.append(f"line not bounded/printable ({len(lines[0])} chars)")
    for o in outputs:
        if file_digest(o) != before_out[o] or (before_out[o] is None and os.path.isfile(o)):
            problems.append(f"output {os.path.basename(o)} changed")
        d = os.path.dirname(o) or "."
        if os.path.isdir(d) and any(".tmp." in f or ".bak." in f for f in os.listdir(d)):
            problems.append("temporary left behind")
    for i in inputs:
        if file_digest(i) != before_in[i]:
            problems.append(f"input {os.path.basename(i)} changed")
    check("robust: " + name, not problems, "; ".join(problems) + f"; stderr={err.strip()[:300]!r}")


def st_raw(path, header_bytes, data=b""):
    """A safetensors file from raw header bytes (no validation here: these are the hostile files)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


def robustness_cases(cli, tmp):
    """Issue 16: what fuzzing found. Each case: exit 2, one readable line, no output, inputs untouched."""
    H, F, E, T = 16, 8, 4, 10
    w = make_layer(21, H, F, E, "fp32")
    wpath = os.path.join(tmp, "rb_w.safetensors")
    mn.write_safetensors(wpath, hf_tensors(w, "mixtral", "", "fp32"))
    x = np.random.default_rng(22).uniform(-1, 1, size=(T, H)).astype(np.float32)
    xpath = os.path.join(tmp, "rb_x.npy")
    np.save(xpath, x)
    y, st = os.path.join(tmp, "rb_y.npy"), os.path.join(tmp, "rb_stats.json")
    outs = [y, st]
    ins = [wpath, xpath]

    def fwd(weights=wpath, inp=xpath, out=y, stats=st, extra=()):
        a = ["forward", "--weights", weights, "--input", inp, "--output", out, "--top-k", "2", "--quiet"]
        if stats:
            a += ["--stats", stats]
        return a + list(extra)

    # 1. Deeply nested JSON values in a header entry (stack overflow in the error path before).
    deep = os.path.join(tmp, "rb_deep.safetensors")
    n = 200000
    st_raw(deep, b'{"t":{"dtype":"F32","shape":' + b"[" * n + b"]" * n + b',"data_offsets":[0,0]}}')
    expect_clean_error(cli, "1 deeply nested shape (200000 levels)", fwd(weights=deep), "nests deeper", outs,
                       ins + [deep])
    deep2 = os.path.join(tmp, "rb_deep2.safetensors")
    st_raw(deep2, b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[' + b"[" * n + b"]" * n + b',0]}}')
    expect_clean_error(cli, "1 deeply nested data_offsets element", fwd(weights=deep2), "nests deeper", outs,
                       ins + [deep2])

    # 2. Inputs that are not regular files: a directory (was "out of host memory") and a FIFO (blocked forever).
    d = os.path.join(tmp, "rb_dir")
    os.makedirs(d, exist_ok=True)
    expect_clean_error(cli, "2 --input is a directory", fwd(inp=d), "directory", outs, ins)
    expect_clean_error(cli, "2 --weights is a directory", fwd(weights=d), "directory", outs, ins)
    fifo = os.path.join(tmp, "rb_fifo")
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    expect_clean_error(cli, "2 --input is a FIFO", fwd(inp=fifo), "FIFO", outs, ins, timeout=20)
    expect_clean_error(cli, "2 --weights is a FIFO", fwd(weights=fifo), "FIFO", outs, ins, timeout=20)

    # 3. Allocation sized by the header before the tensors were checked: 800 KB file -> 80 GB; 8 MB -> 8 GB.
    big = os.path.join(tmp, "rb_800k.safetensors")
    mn.write_safetensors(big, {"block_sparse_moe.gate.weight": ("F32", np.zeros((100000, 1), "<f4")),
                               "block_sparse_moe.experts.0.w1.weight": ("F32", np.zeros((100000, 1), "<f4"))})
    x1 = os.path.join(tmp, "rb_x1.npy")
    np.save(x1, np.ones((3, 1), "<f4"))
    expect_clean_error(cli, "3 800 KB file asking for 80 GB (E = 100000)", fwd(weights=big, inp=x1),
                       "exceed the limit of 512", outs, [big, x1], timeout=30)
    big2 = os.path.join(tmp, "rb_8m.safetensors")
    mn.write_safetensors(big2, {"block_sparse_moe.gate.weight": ("F32", np.zeros((512, 1), "<f4")),
                                "block_sparse_moe.experts.0.w1.weight": ("F32", np.zeros((1 << 21, 1), "<f4"))})
    expect_clean_error(cli, "3 8 MB file asking for 8 GB (E = 512, F = 2^21)", fwd(weights=big2, inp=x1),
                       "not found", outs, [big2, x1], timeout=30)

    # 4. --stats naming a directory after y.npy was already renamed into place.
    expect_clean_error(cli, "4 --stats is a directory", fwd(stats=d), "directory", [y], ins)
    # ... and an existing y.npy keeps its bytes when the run fails late.
    with open(y, "wb") as f:
        f.write(b"old y")
    expect_clean_error(cli, "4 --stats is a directory, y.npy existed", fwd(stats=d), "directory", [y], ins)
    os.remove(y)

    # 5. Outputs compared by identity, not spelling.
    expect_clean_error(cli, "5 --output ./rb_y.npy --stats rb_y.npy",
                       fwd(out="./rb_y.npy", stats="rb_y.npy", weights="rb_w.safetensors", inp="rb_x.npy"),
                       "same file", outs, ins, cwd=tmp)
    expect_clean_error(cli, "5 --output equal to --input", fwd(out=xpath), "same file", outs, ins)
    expect_clean_error(cli, "5 --output is the input through another spelling",
                       fwd(out=os.path.join(tmp, ".", "rb_x.npy")), "same file", outs, ins)
    expect_clean_error(cli, "5 --stats equal to --weights", fwd(stats=wpath), "same file", outs, ins)
    link = os.path.join(tmp, "rb_link.npy")
    if not os.path.lexists(link):
        os.symlink(xpath, link)
    expect_clean_error(cli, "5 --output is a symlink to the input", fwd(out=link), "same file", outs, ins)
    expect_clean_error(cli, "5 --output in a missing folder", fwd(out=os.path.join(tmp, "nope", "y.npy")),
                       "does not exist", outs, ins)

    # 6. capacity_factor 1e19: exactly the no-drop result (it dropped 7 of 10 pairs / gave all zeros before).
    ref_y, ref_s = os.path.join(tmp, "rb_ref_y.npy"), os.path.join(tmp, "rb_ref_s.json")
    rc0, _, e0 = run_cli(cli, fwd(out=ref_y, stats=ref_s))
    rc1, _, e1 = run_cli(cli, fwd(extra=["--capacity-factor", "1e19", "--min-capacity", "1"]))
    ok = rc0 == 0 and rc1 == 0
    if ok:
        with open(st) as f:
            s1 = json.load(f)
        ok = np.array_equal(np.load(y), np.load(ref_y)) and s1["dropped"] == 0 and s1["capacity"] == T
    check("robust: 6 --capacity-factor 1e19 --min-capacity 1 gives the dropless output bit for bit", ok,
          f"rc {rc0} {rc1} {e0.strip()} {e1.strip()}")
    ec = ["--routing", "expert-choice"]
    rc0, _, e0 = run_cli(cli, fwd(out=ref_y, stats=ref_s, extra=ec + ["--capacity-factor", str(E)]))
    rc1, _, e1 = run_cli(cli, fwd(extra=ec + ["--capacity-factor", "1e19"]))
    ok = rc0 == 0 and rc1 == 0
    if ok:
        with open(st) as f:
            s1 = json.load(f)
        a, b = np.load(y), np.load(ref_y)
        ok = np.array_equal(a, b) and s1["expert_choice_capacity"] == T and bool(np.abs(a).max() > 0)
    check("robust: 6 expert choice --capacity-factor 1e19 = every expert takes all T tokens (non-zero output)", ok,
          f"rc {rc0} {rc1} {e0.strip()} {e1.strip()}")
    for p in (y, st, ref_y, ref_s):
        if os.path.exists(p):
            os.remove(p)

    # 7. Non-finite values: rejected by default, let through with --allow-non-finite.
    xn = os.path.join(tmp, "rb_xnan.npy")
    xb = x.copy()
    xb[3, 5] = np.nan
    np.save(xn, xb)
    expect_clean_error(cli, "7 NaN in the input", fwd(inp=xn), "row 3, column 5", outs, ins + [xn])
    xi = os.path.join(tmp, "rb_xinf.npy")
    xb = x.copy()
    xb[0, 0] = np.inf
    np.save(xi, xb)
    expect_clean_error(cli, "7 Inf in the input", fwd(inp=xi), "non-finite", outs, ins + [xi])
    rc, _, err = run_cli(cli, fwd(inp=xn, extra=["--allow-non-finite"]))
    check("robust: 7 --allow-non-finite lets a NaN input through", rc == 0 and np.isnan(np.load(y)).any(),
          err.strip())
    for p in (y, st):
        if os.path.exists(p):
            os.remove(p)
    wn = os.path.join(tmp, "rb_wnan.safetensors")
    t = hf_tensors(w, "mixtral", "", "fp32")
    bad = t["block_sparse_moe.experts.2.w2.weight"][1].copy()
    bad[1, 1] = np.inf
    t["block_sparse_moe.experts.2.w2.weight"] = ("F32", bad)
    mn.write_safetensors(wn, t)
    expect_clean_error(cli, "7 Inf in a weight", fwd(weights=wn), "experts.2.w2.weight", outs, [wn, xpath])
    rc, _, err = run_cli(cli, fwd(weights=wn, extra=["--allow-non-finite"]))
    check("robust: 7 --allow-non-finite lets a non-finite weight through", rc == 0, err.strip())
    for p in (y, st):
        if os.path.exists(p):
            os.remove(p)
    expect_clean_error(cli, "7 --routed-scale 1e39 (inf in fp32)", fwd(extra=["--routed-scale", "1e39"]),
                       "routed_scale", outs, ins)
    expect_clean_error(cli, "7 --shared-experts -5", fwd(extra=["--shared-experts", "-5"]), "shared-experts", outs,
                       ins)

    # Loose parsing, now strict.
    good_h = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    cases = [
        ("duplicate JSON key", b'{"block_sparse_moe.gate.weight":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]},'
                               b'"block_sparse_moe.gate.weight":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]}}',
         b"\0" * 4, "twice"),
        ("NUL byte ending the header", good_h + b"\0\0\0", b"\0" * 4, "NUL"),
        ("gap in the data region", json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode(),
         b"\0" * 8, "gap"),
        ("trailing bytes after the data", good_h, b"\0" * 12, "after the last tensor"),
        ("header not starting with '{'", b" " + good_h, b"\0" * 4, "start with"),
    ]
    for i, (name, header, data, want) in enumerate(cases):
        pth = os.path.join(tmp, f"rb_strict{i}.safetensors")
        st_raw(pth, header, data)
        expect_clean_error(cli, "safetensors " + name, fwd(weights=pth), want, outs, [pth, xpath])
    raw = open(xpath, "rb").read()
    hl = struct.unpack("<H", raw[8:10])[0]
    hdr = raw[10:10 + hl]
    cut = hdr.rindex(b"}") + 1
    junk = hdr[:cut] + b" junk" + b" " * (len(hdr) - cut - 6) + b"\n"
    npy_cases = [
        ("text after the header dict", raw[:10] + junk + raw[10 + hl:], "after the dict"),
        ("minor version 1", raw[:7] + b"\x01" + raw[8:], "version 1.1"),
        ("NUL in the header", raw[:10] + hdr[:cut] + b"\0" + hdr[cut + 1:] + raw[10 + hl:], "0x0"),
    ]
    for i, (name, img, want) in enumerate(npy_cases):
        pth = os.path.join(tmp, f"rb_strict{i}.npy")
        with open(pth, "wb") as f:
            f.write(img)
        expect_clean_error(cli, ".npy " + name, fwd(inp=pth), want, outs, [pth, wpath])

    # Tensors the loader used to ignore silently: rejected (a second scheme, experts beyond E, a shared expert
    # without down_proj) or reported as a note (anything else under the MoE block).
    t = hf_tensors(w, "mixtral", "", "fp32")
    t2 = dict(t)
    t2["mlp.gate.weight"] = t["block_sparse_moe.gate.weight"]
    t3 = dict(t)
    t3["block_sparse_moe.experts.7.w1.weight"] = t["block_sparse_moe.experts.0.w1.weight"]
    tq = hf_tensors(w, "qwen", "", "fp32")
    tq["mlp.shared_experts.gate_proj.weight"] = ("F32", np.zeros((8, H), "<f4"))
    tq["mlp.shared_experts.up_proj.weight"] = ("F32", np.zeros((8, H), "<f4"))
    for i, (name, tens, want) in enumerate([("both naming schemes", t2, "both"),
                                            ("an expert beyond E", t3, "experts.7.w1.weight"),
                                            ("a shared expert without down_proj", tq, "down_proj")]):
        pth = os.path.join(tmp, f"rb_ignored{i}.safetensors")
        mn.write_safetensors(pth, tens)
        expect_clean_error(cli, "loader: " + name, fwd(weights=pth), want, outs, [pth, xpath])
    t4 = dict(t)
    t4["block_sparse_moe.experts.0.w1.bias"] = ("F32", np.zeros(F, "<f4"))
    pth = os.path.join(tmp, "rb_note.safetensors")
    mn.write_safetensors(pth, t4)
    a = [v for v in fwd(weights=pth) if v != "--quiet"]
    rc, _, err = run_cli(cli, a)
    check("robust: an unused tensor under the MoE block is reported", rc == 0 and
          "note: 'block_sparse_moe.experts.0.w1.bias' is not part of the MoE layer" in err, err.strip())
    for p in (y, st):
        if os.path.exists(p):
            os.remove(p)

    # Error lines: bounded and printable whatever the file or the command line holds (long names, control bytes).
    long_name = "model.\x1b[31m\x07" + "x" * 100000 + "."  # argv strings stop at 128 KiB
    pth = os.path.join(tmp, "rb_longname.safetensors")
    mn.write_safetensors(pth, hf_tensors(w, "mixtral", long_name, "fp32"))
    expect_clean_error(cli, "100 KB prefix with control bytes in the message",
                       fwd(weights=pth, extra=["--prefix", long_name[:-1] + "y."]), "no MoE router weight", outs,
                       [pth, xpath])
    longtype = os.path.join(tmp, "rb_longdtype.safetensors")
    st_raw(longtype, json.dumps({"a\u0001b": {"dtype": "\u0007" * 5000, "shape": [1],
                                              "data_offsets": [0, 4]}}).encode(), b"\0" * 4)
    expect_clean_error(cli, "5000-byte dtype string with control bytes", fwd(weights=longtype), "dtype", outs,
                       [longtype, xpath])
    # --dtype fp64: the message offers only what --dtype accepts.
    p = subprocess.run([cli] + fwd(extra=["--dtype", "fp64"]), capture_output=True, text=True, timeout=60)
    check("robust: --dtype fp64 is refused without offering int32",
          p.returncode == 2 and "fp32, bf16 or fp16" in p.stderr and "int32" not in p.stderr, p.stderr.strip())


def fp8_cases(cli, tmp):
    """Issue 13: `switchyard quantize` writes a checkpoint `forward` runs (within FP8 error of the float64 reference),
    and bad FP8 / quantize inputs are clean errors (exit 2, one line, no output, inputs unchanged)."""
    H, F, E, T = 64, 128, 4, 16  # F a multiple of 128: fp8-block with SwiGLU fuses gate and up exactly
    cfg = {"top_k": 2, "num_experts": E, "score": "softmax", "activation": "swiglu", "dtype": "fp32"}
    w = make_layer(41, H, F, E, "fp32")
    src = os.path.join(tmp, "fp8_src.safetensors")
    mn.write_safetensors(src, hf_tensors(w, "mixtral", "model.layers.0.", "fp32"))
    x = np.random.default_rng(42).uniform(-1, 1, size=(T, H)).astype(np.float32)
    xpath = os.path.join(tmp, "fp8_x.npy")
    np.save(xpath, x)
    ref = mn.moe_forward(cfg, x.astype(np.float64), w)[0]
    for fmt in ("fp8-block", "fp8-tensor"):
        q = os.path.join(tmp, f"fp8_{fmt}.safetensors")
        rc, _, err = run_cli(cli, ["quantize", "--weights", src, "--out", q, "--format", fmt])
        check(f"quantize {fmt}", rc == 0 and os.path.isfile(q) and "quantize" in err, err.strip()[:300])
        if rc != 0:
            continue
        leftovers = [f for f in os.listdir(tmp) if ".tmp." in f]
        check(f"quantize {fmt}: no temporary left", not leftovers, str(leftovers))
        y = os.path.join(tmp, f"fp8_{fmt}_y.npy")
        # On the CPU backend (the FP8 specification) whatever --device says: this case tests the file formats.
        rc, _, err = run_cli(cli, ["forward", "--weights", q, "--prefix", "model.layers.0.", "--input", xpath,
                                   "--output", y, "--top-k", "2"])
        ok = rc == 0 and f"quant={fmt}" in err
        rel = float(np.linalg.norm(np.load(y) - ref) / np.linalg.norm(ref)) if ok else float("nan")
        check(f"forward on the {fmt} checkpoint: relative L2 vs the float64 reference < 0.1", ok and 0 < rel < 0.1,
              f"rc={rc} rel={rel} stderr={err.strip()[:300]!r}")
    blk = os.path.join(tmp, "fp8_fp8-block.safetensors")
    out = os.path.join(tmp, "fp8_err.safetensors")
    y = os.path.join(tmp, "fp8_err_y.npy")
    q_base = ["quantize", "--weights", src, "--out", out]
    expect_clean_error(cli, "quantize: --out is --weights", ["quantize", "--weights", src, "--out", src, "--format",
                                                             "fp8-block"], "same file", [src], [src])
    expect_clean_error(cli, "quantize: unknown format", q_base + ["--format", "fp4"], "fp8-block", [out], [src])
    expect_clean_error(cli, "quantize: prefix without experts", q_base + ["--format", "fp8-block", "--prefix",
                                                                         "model.layers.9."], "no expert projection",
                       [out], [src])
    if os.path.isfile(blk):
        expect_clean_error(cli, "quantize: already FP8", ["quantize", "--weights", blk, "--out", out, "--format",
                                                          "fp8-tensor"], "already F8_E4M3", [out], [blk])
        # An fp8 NaN code in one expert matrix: forward refuses it by name.
        with open(blk, "rb") as f:
            data = bytearray(f.read())
        n = struct.unpack("<Q", data[:8])[0]
        name = "model.layers.0.block_sparse_moe.experts.2.w3.weight"
        begin = json.loads(data[8:8 + n])[name]["data_offsets"][0]
        data[8 + n + begin + 5] = 0xFF
        nan_w = os.path.join(tmp, "fp8_nan.safetensors")
        with open(nan_w, "wb") as f:
            f.write(data)
        expect_clean_error(cli, "forward: fp8 NaN code", ["forward", "--weights", nan_w, "--prefix", "model.layers.0.",
                                                          "--input", xpath, "--output", y, "--top-k", "2"],
                           "NaN code 0xff", [y], [nan_w, xpath])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cli", required=True, help="path to the switchyard binary")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where forward runs the layer")
    a = ap.parse_args()
    DEVICE[0] = a.device
    cli = os.path.abspath(a.cli)

    with tempfile.TemporaryDirectory(prefix="switchyard_e2e_") as tmp:
        # (a) Mixtral-style: softmax, top-2, SwiGLU.
        H, F, E, T = 64, 48, 8, 37
        cfg = {"top_k": 2, "num_experts": E, "score": "softmax", "activation": "swiglu", "dtype": "fp32"}
        w = make_layer(1, H, F, E, "fp32")
        x = np.random.default_rng(2).uniform(-1, 1, size=(T, H)).astype(np.float32).astype(np.float64)
        forward_case(cli, tmp, "mixtral_fp32", cfg, w, x, "mixtral", prefix="model.layers.0.")

        # (b) DeepSeek-style: sigmoid + e_score_correction_bias, 4 groups keep 2, renormalise, scale 2.5,
        #     two shared experts of width 24 (stored as one MLP of width 48), prefix model.layers.3.
        H, F, E, S, T = 64, 32, 16, 48, 41
        cfg = {"top_k": 4, "num_experts": E, "score": "sigmoid", "use_bias": True, "groups": 4, "topk_groups": 2,
               "renormalize": True, "routed_scale": 2.5, "activation": "swiglu", "dtype": "fp32"}
        w = make_layer(3, H, F, E, "fp32", S=S, bias=True)
        x = np.random.default_rng(4).uniform(-1, 1, size=(T, H)).astype(np.float32).astype(np.float64)
        forward_case(cli, tmp, "deepseek_fp32", cfg, w, x, "deepseek", prefix="model.layers.3.",
                     extra=["--score", "sigmoid", "--groups", "4", "--topk-groups", "2", "--renormalize",
                            "--routed-scale", "2.5", "--shared-experts", "2"])
        # The same checkpoint with --no-bias: selection without the bias (the reference agrees only if the
        # CLI really dropped it; the routing differs for this seed, checked below).
        cfg_nb = dict(cfg, use_bias=False)
        ids_b = mn.moe_forward(cfg, x, w)[1]
        ids_nb = mn.moe_forward(cfg_nb, x, w)[1]
        check("deepseek bias changes the routing for this seed", not np.array_equal(ids_b, ids_nb))
        forward_case(cli, tmp, "deepseek_fp32_nobias", cfg_nb, w, x, "deepseek", prefix="model.layers.3.",
                     extra=["--score", "sigmoid", "--groups", "4", "--topk-groups", "2", "--renormalize",
                            "--routed-scale", "2.5", "--no-bias"])

        # Qwen2-MoE spelling (mlp.shared_expert.*), top-k-then-softmax, ungated ReLU (up_proj only).
        H, F, E, S, T = 32, 40, 6, 40, 19
        cfg = {"top_k": 3, "num_experts": E, "score": "topk-softmax", "activation": "relu", "dtype": "fp32"}
        w = make_layer(5, H, F, E, "fp32", act="relu", S=S)
        x = np.random.default_rng(6).uniform(-1, 1, size=(T, H)).astype(np.float32).astype(np.float64)
        forward_case(cli, tmp, "qwen2_relu_fp32", cfg, w, x, "qwen", shared_name="shared_expert",
                     extra=["--score", "topk-softmax", "--activation", "relu"])

        # Qwen2-MoE's gated shared expert: mlp.shared_expert_gate.weight scales the shared output by its sigmoid.
        H, F, E, S, T = 32, 24, 6, 40, 23
        cfg = {"top_k": 2, "num_experts": E, "score": "softmax", "activation": "swiglu", "dtype": "fp32"}
        w = make_layer(11, H, F, E, "fp32", S=S, shared_gate=True)
        x = np.random.default_rng(12).uniform(-1, 1, size=(T, H)).astype(np.float32).astype(np.float64)
        y_plain = mn.moe_forward(cfg, x, dict(w, shared_gate=None))[0]
        check("qwen2 shared gate changes the output", np.abs(mn.moe_forward(cfg, x, w)[0] - y_plain).max() > 1e-3)
        forward_case(cli, tmp, "qwen2_shared_gate_fp32", cfg, w, x, "qwen", shared_name="shared_expert")

        # bf16: weights and input in bf16 (input .npy as '<u2' bits), Mixtral names.
        H, F, E, T = 64, 48, 8, 29
        cfg = {"top_k": 2, "num_experts": E, "score": "softmax", "renormalize": True, "activation": "swiglu",
               "dtype": "bf16"}
        w = make_layer(7, H, F, E, "bf16")
        x = mn.round_to(np.random.default_rng(8).uniform(-1, 1, size=(T, H)), "bf16")
        forward_case(cli, tmp, "mixtral_bf16", cfg, w, x, "mixtral", extra=["--renormalize"])

        # Capacity with drops, both policies (T*k/E = 8 rows per expert on average; capacity 8 or 6).
        H, F, E, T = 32, 24, 8, 32
        w = make_layer(9, H, F, E, "fp32")
        x = np.random.default_rng(10).uniform(-1, 1, size=(T, H)).astype(np.float32).astype(np.float64)
        for cf, policy in ((1.0, "position"), (0.75, "probability")):
            cfg = {"top_k": 2, "num_experts": E, "score": "softmax", "activation": "swiglu", "dtype": "fp32",
                   "capacity_factor": cf, "drop_policy": policy}
            keep = mn.moe_forward(cfg, x, w)[3]
            check(f"capacity {cf} {policy}: this seed drops pairs", (~keep).sum() > 0)
            forward_case(cli, tmp, f"capacity_{policy}", cfg, w, x, "mixtral",
                         extra=["--capacity-factor", str(cf), "--drop-policy", policy])

        # ---- error paths: exit code 2, one line, no output file ----
        good_w = os.path.join(tmp, "mixtral_fp32.safetensors")
        good_x = os.path.join(tmp, "mixtral_fp32_x.npy")
        out = os.path.join(tmp, "err_y.npy")
        base = ["forward", "--weights", good_w, "--prefix", "model.layers.0.", "--input", good_x, "--output", out]
        expect_error(cli, tmp, "missing weights file",
                     ["forward", "--weights", os.path.join(tmp, "nope.safetensors"), "--input", good_x, "--output",
                      out, "--top-k", "2"], "nope.safetensors", out)
        expect_error(cli, tmp, "missing input file",
                     base[:5] + ["--input", os.path.join(tmp, "nope.npy"), "--output", out, "--top-k", "2"],
                     "nope.npy", out)
        expect_error(cli, tmp, "k > E", base + ["--top-k", "9"], "top-k", out)
        expect_error(cli, tmp, "k = 0", base + ["--top-k", "0"], "top-k", out)
        expect_error(cli, tmp, "non-finite routed scale", base + ["--top-k", "2", "--routed-scale", "nan"],
                     "routed-scale", out)
        expect_error(cli, tmp, "wrong prefix", base[:3] + ["--prefix", "model.layers.7."] + base[5:] + ["--top-k", "2"],
                     "model.layers.0.", out)
        expect_error(cli, tmp, "hidden size disagrees", base + ["--top-k", "2", "--hidden", "65"], "--hidden", out)
        expect_error(cli, tmp, "dtype mismatch (fp32 input, --dtype bf16)", base + ["--top-k", "2", "--dtype", "bf16"],
                     "dtype", out)
        bad_shape = os.path.join(tmp, "bad_shape.npy")
        np.save(bad_shape, np.zeros((5, 63), dtype="<f4") + 0.5)
        expect_error(cli, tmp, "input shape", base[:5] + ["--input", bad_shape, "--output", out, "--top-k", "2"],
                     "hidden size", out)
        trunc = os.path.join(tmp, "trunc.safetensors")
        with open(good_w, "rb") as f:
            data = f.read()
        with open(trunc, "wb") as f:
            f.write(data[:-10])
        expect_error(cli, tmp, "truncated safetensors",
                     ["forward", "--weights", trunc, "--prefix", "model.layers.0.", "--input", good_x, "--output",
                      out, "--top-k", "2"], "trunc", out)
        trunc_x = os.path.join(tmp, "trunc_x.npy")
        with open(good_x, "rb") as f:
            data = f.read()
        with open(trunc_x, "wb") as f:
            f.write(data[:-3])
        expect_error(cli, tmp, "truncated npy", base[:5] + ["--input", trunc_x, "--output", out, "--top-k", "2"],
                     "truncated", out)
        expect_error(cli, tmp, "unknown score function", base + ["--top-k", "2", "--score", "softmaxx"], "softmaxx", out)
        # An existing output file is left untouched by a failed run.
        with open(out, "wb") as f:
            f.write(b"keep me")
        rc, _, _ = run_cli(cli, base + ["--top-k", "9"])
        with open(out, "rb") as f:
            check("failed run leaves an existing output untouched", rc == 2 and f.read() == b"keep me")
        os.remove(out)

        robustness_cases(cli, tmp)
        fp8_cases(cli, tmp)

    print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed")
    return 1 if RESULTS["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
