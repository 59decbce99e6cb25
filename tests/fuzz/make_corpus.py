#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (tests/fuzz/corpus/<target>/): small real-looking files, plus the
crashers of issue 16 (scaled down to a few KB where the original was large) as regression inputs that
tests/test_fuzz_corpus.cpp replays in every build. Deterministic: running it again rewrites the same bytes.
Pure Python (struct, json): no NumPy needed.   Usage: python3 tests/fuzz/make_corpus.py [--out DIR]
"""
import argparse
import json
import os
import random
import shutil
import struct

DT = {"F32": ("<f", 4), "F16": ("<e", 2), "BF16": (None, 2), "I32": ("<i", 4), "I64": ("<q", 8)}


def values(dtype, n, rng):
    if dtype == "BF16":
        return b"".join(struct.pack("<H", struct.unpack("<I", struct.pack("<f", rng.uniform(-1, 1)))[0] >> 16)
                        for _ in range(n))
    fmt, _ = DT[dtype]
    if dtype in ("I32", "I64"):
        return b"".join(struct.pack(fmt, rng.randint(-100, 100)) for _ in range(n))
    return b"".join(struct.pack(fmt, rng.uniform(-1, 1)) for _ in range(n))


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def safetensors(tensors, metadata=None, rng=None):
    """tensors: list of (name, dtype, shape) or (name, dtype, shape, raw bytes)."""
    rng = rng or random.Random(0)
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for t in tensors:
        name, dt, shape = t[:3]
        data = t[3] if len(t) > 3 else values(dt, numel(shape), rng)
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def st_raw(header_bytes, data=b""):
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def npy(descr, shape, data, major=1, minor=0, tail=""):
    shp = "(" + "".join(f"{d}, " for d in shape).rstrip(" ") + ")" if len(shape) != 1 else f"({shape[0]},)"
    if len(shape) > 1:
        shp = "(" + ", ".join(str(d) for d in shape) + ")"
    d = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }%s" % (descr, shp, tail)
    lenb = 2 if major == 1 else 4
    pad = (64 - (6 + 2 + lenb + len(d) + 1) % 64) % 64
    h = (d + " " * pad + "\n").encode()
    return b"\x93NUMPY" + bytes([major, minor]) + (struct.pack("<H", len(h)) if lenb == 2 else struct.pack("<I", len(h))) + h + data


def mixtral(E, H, F, dt="F32", prefix="", gated=True, extra=()):
    ts = [(prefix + "block_sparse_moe.gate.weight", dt, [E, H])]
    for e in range(E):
        p = f"{prefix}block_sparse_moe.experts.{e}."
        ts.append((p + "w1.weight", dt, [F, H]))
        if gated:
            ts.append((p + "w3.weight", dt, [F, H]))
        ts.append((p + "w2.weight", dt, [H, F]))
    return ts + list(extra)


def deepseek(E, H, F, S=0, dt="F32", prefix="", bias=True, shared="shared_experts", gated=True):
    ts = [(prefix + "mlp.gate.weight", dt, [E, H])]
    if bias:
        ts.append((prefix + "mlp.gate.e_score_correction_bias", "F32", [E]))
    for e in range(E):
        p = f"{prefix}mlp.experts.{e}."
        if gated:
            ts.append((p + "gate_proj.weight", dt, [F, H]))
        ts.append((p + "up_proj.weight", dt, [F, H]))
        ts.append((p + "down_proj.weight", dt, [H, F]))
    if S:
        p = f"{prefix}mlp.{shared}."
        if gated:
            ts.append((p + "gate_proj.weight", dt, [S, H]))
        ts.append((p + "up_proj.weight", dt, [S, H]))
        ts.append((p + "down_proj.weight", dt, [H, S]))
    return ts


def fp8_codes(n, rng):
    """n F8_E4M3 codes, none of them a NaN code (0x7f, 0xff)."""
    return bytes(c if (c & 0x7F) != 0x7F else c ^ 1 for c in (rng.randrange(256) for _ in range(n)))


def f32s(*v):
    return struct.pack("<%df" % len(v), *v)


def fp8_layer(E, H, F, S=0, block=True, prefix="", mixtral_names=False, input_scales=False, rng=None):
    """An FP8 layer (docs/fp8.md, "Loading"): F8_E4M3 expert matrices with weight_scale_inv blocks or per-tensor
    weight_scale (+ input_scale) beside them; a float router."""
    B = lambda n: (n + 127) // 128
    if mixtral_names:
        ts = [(prefix + "block_sparse_moe.gate.weight", "BF16", [E, H])]
        mats = [(f"{prefix}block_sparse_moe.experts.{e}.{w}.", shape) for e in range(E)
                for w, shape in (("w1", [F, H]), ("w3", [F, H]), ("w2", [H, F]))]
    else:
        ts = [(prefix + "mlp.gate.weight", "BF16", [E, H]), (prefix + "mlp.gate.e_score_correction_bias", "F32", [E])]
        mats = [(f"{prefix}mlp.experts.{e}.{w}.", shape) for e in range(E)
                for w, shape in (("gate_proj", [F, H]), ("up_proj", [F, H]), ("down_proj", [H, F]))]
        if S:
            mats += [(f"{prefix}mlp.shared_experts.{w}.", shape)
                     for w, shape in (("gate_proj", [S, H]), ("up_proj", [S, H]), ("down_proj", [H, S]))]
    for base, shape in mats:
        ts.append((base + "weight", "F8_E4M3", shape, fp8_codes(numel(shape), rng)))
        if block:
            sb = [B(shape[0]), B(shape[1])]
            ts.append((base + "weight_scale_inv", "F32", sb, f32s(*[rng.uniform(1e-4, 1e-2) for _ in range(numel(sb))])))
        else:
            ts.append((base + "weight_scale", "F32", [], f32s(rng.uniform(1e-4, 1e-2))))
            if input_scales:
                ts.append((base + "input_scale", "F32", [1], f32s(rng.uniform(1e-3, 1e-1))))
    return ts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus"))
    out = ap.parse_args().out
    rng = random.Random(16)
    files = {"safetensors": {}, "npy": {}, "weights": {}, "cli": {}}

    # ---- safetensors: valid files, then the hostile ones.
    S = files["safetensors"]
    S["mixtral_f32"] = safetensors(mixtral(2, 4, 3), {"format": "pt"}, rng)
    S["mixtral_bf16"] = safetensors(mixtral(2, 4, 2, "BF16"), None, rng)
    S["every_dtype"] = safetensors([("a", "F32", [2, 2]), ("b", "F16", [3]), ("c", "BF16", [1, 2]),
                                    ("d", "I32", [2]), ("e", "I64", [1])], {"k": "v"}, rng)
    S["empty_and_scalar"] = safetensors([("empty", "F32", [0, 4]), ("scalar", "F32", []), ("x", "F16", [2])])
    S["unsupported_dtype_f64"] = safetensors([("d", "F64", [2], b"\0" * 16), ("f", "F32", [1])])
    S["metadata_only"] = st_raw(b'{"__metadata__":{"format":"pt"}}')
    n = 3000  # issue 16 item 1: 3000 levels overflowed the stack under ASan (200000 in an -O2 build)
    S["crash_deep_shape"] = st_raw(b'{"t":{"dtype":"F32","shape":' + b"[" * n + b"]" * n + b',"data_offsets":[0,0]}}')
    S["crash_deep_offsets"] = st_raw(b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[' + b"[" * n + b"]" * n + b",0]}}")
    S["crash_deep_metadata"] = st_raw(b'{"__metadata__":{"a":' + b"[" * n + b"]" * n + b"}}")
    good = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    S["loose_duplicate_key"] = st_raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                      b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4)
    S["loose_duplicate_inner_key"] = st_raw(b'{"a":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}',
                                            b"\0" * 4)
    S["loose_nul_end"] = st_raw(good + b"\0\0\0", b"\0" * 4)
    S["loose_gap"] = st_raw(json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode(),
                            b"\0" * 8)
    S["loose_trailing"] = st_raw(good, b"\0" * 12)
    S["loose_overlap"] = st_raw(json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode(),
                                b"\0" * 8)
    S["bad_control_bytes_name"] = st_raw(json.dumps({"\u0001\u001b[31m" + "n" * 2000: {
        "dtype": "\u0007" * 500, "shape": [1], "data_offsets": [0, 4]}}).encode(), b"\0" * 4)
    S["bad_huge_shape"] = st_raw(b'{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}',
                                 b"\0" * 4)
    S["bad_many_dims"] = st_raw(b'{"a":{"dtype":"F32","shape":[' + b",".join([b"1"] * 1000) +
                                b'],"data_offsets":[0,4]}}', b"\0" * 4)
    S["bad_negative_offset"] = st_raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}', b"\0" * 4)
    S["bad_header_length"] = struct.pack("<Q", 1 << 62) + b"{}"

    # ---- npy.
    N = files["npy"]
    f4 = values("F32", 6, rng)
    N["f4_2x3"] = npy("<f4", [2, 3], f4)
    N["f2_4"] = npy("<f2", [4], values("F16", 4, rng))
    N["i4_3"] = npy("<i4", [3], values("I32", 3, rng))
    N["i8_2x1"] = npy("<i8", [2, 1], values("I64", 2, rng))
    N["u2_bf16"] = npy("<u2", [2, 2], values("BF16", 4, rng))
    N["v2_bf16"] = npy("|V2", [3], values("BF16", 3, rng))
    N["scalar"] = npy("<f4", [], values("F32", 1, rng))
    N["empty"] = npy("<f4", [0, 5], b"")
    N["v2_header"] = npy("<f4", [2, 3], f4, major=2)
    N["v3_header"] = npy("<f4", [2, 3], f4, major=3)
    N["loose_text_after_dict"] = npy("<f4", [2, 3], f4, tail=" junk")
    N["loose_minor_version_1"] = npy("<f4", [2, 3], f4, minor=1)
    N["loose_version_4"] = npy("<f4", [2, 3], f4, major=4)
    N["loose_nul_in_header"] = npy("<f4", [2, 3], f4, tail="\0")
    N["loose_duplicate_key"] = npy("<f4", [2, 3], f4).replace(b"'fortran_order': False,",
                                                              b"'shape': (2,), 'fortran_order': False,")
    N["bad_fortran"] = npy("<f4", [2, 3], f4).replace(b"False", b"True ")
    N["bad_big_endian"] = npy(">f4", [2, 3], f4)
    N["bad_huge_shape"] = npy("<f4", [1 << 40, 1 << 40], b"")
    N["bad_truncated"] = npy("<f4", [2, 3], f4)[:-5]

    # ---- weights (byte 0: loader options, fuzz_entries.h).
    W = files["weights"]
    W["mixtral_swiglu"] = b"\x00" + safetensors(mixtral(2, 4, 3), None, rng)
    W["mixtral_relu_ungated"] = b"\x03" + safetensors(mixtral(2, 4, 3, gated=False), None, rng)
    W["mixtral_prefix_bf16"] = b"\x20" + safetensors(mixtral(3, 4, 2, "BF16", prefix="model.layers.0."), None, rng)
    W["deepseek_bias_shared"] = b"\x04" + safetensors(deepseek(4, 4, 2, S=4), None, rng)
    W["deepseek_two_shared"] = b"\x14" + safetensors(deepseek(2, 4, 2, S=4), None, rng)
    W["qwen2_shared_expert_gelu"] = b"\x02" + safetensors(
        deepseek(2, 4, 3, S=3, bias=False, shared="shared_expert", gated=False) +
        [("mlp.shared_expert_gate.weight", "F32", [1, 4])], None, rng)
    # Issue 16 item 3, scaled down: router and expert 0 only (the loader allocated E*2F*H before checking the
    # others), and E above the 512 limit.
    W["crash_alloc_before_check"] = b"\x00" + safetensors([("block_sparse_moe.gate.weight", "BF16", [512, 1]),
                                                           ("block_sparse_moe.experts.0.w1.weight", "BF16", [1024, 1])])
    W["crash_too_many_experts"] = b"\x00" + safetensors([("block_sparse_moe.gate.weight", "BF16", [600, 1]),
                                                         ("block_sparse_moe.experts.0.w1.weight", "BF16", [8, 1])])
    W["ignored_second_scheme"] = b"\x00" + safetensors(mixtral(2, 4, 2) + [("mlp.gate.weight", "F32", [2, 4])])
    W["ignored_expert_beyond_e"] = b"\x00" + safetensors(mixtral(2, 4, 2) +
                                                         [("block_sparse_moe.experts.5.w2.weight", "F32", [4, 2])])
    W["ignored_shared_without_down"] = b"\x04" + safetensors(
        deepseek(2, 4, 2) + [("mlp.shared_experts.gate_proj.weight", "F32", [2, 4]),
                             ("mlp.shared_experts.up_proj.weight", "F32", [2, 4])])
    nan = struct.pack("<f", float("nan"))
    W["nonfinite_weight"] = b"\x00" + safetensors(mixtral(1, 2, 1)[:1] + [
        ("block_sparse_moe.experts.0.w1.weight", "F32", [1, 2], nan * 2),
        ("block_sparse_moe.experts.0.w3.weight", "F32", [1, 2]), ("block_sparse_moe.experts.0.w2.weight", "F32", [2, 1])])
    W["nonfinite_weight_allowed"] = b"\x40" + W["nonfinite_weight"][1:]
    # FP8 experts (issue 13): block scales with a shared expert (F = S = 128: gated block mode needs multiples of
    # 128), per-tensor scales with static input scales (Mixtral names), and malformed ones.
    frng = random.Random(13)
    W["fp8_block_shared"] = b"\x04" + safetensors(fp8_layer(2, 4, 128, S=128, rng=frng))
    W["fp8_tensor_input_scales"] = b"\x00" + safetensors(
        fp8_layer(2, 4, 3, block=False, mixtral_names=True, input_scales=True, rng=frng))
    bad = fp8_layer(2, 4, 3, block=False, rng=frng)
    W["fp8_nan_code"] = b"\x04" + safetensors([t if t[0] != "mlp.experts.1.up_proj.weight" else
                                               (t[0], t[1], t[2], b"\x7f" + t[3][1:]) for t in bad])
    W["fp8_missing_scale"] = b"\x04" + safetensors([t for t in bad if t[0] != "mlp.experts.0.down_proj.weight_scale"])
    W["fp8_block_scale_shape"] = b"\x04" + safetensors([t if t[0] != "mlp.experts.0.gate_proj.weight_scale_inv" else
                                                        (t[0], "F32", [2, 1], f32s(1.0, 1.0))
                                                        for t in fp8_layer(1, 4, 128, rng=frng)])
    S["fp8_e4m3_with_scale"] = safetensors([("w.weight", "F8_E4M3", [3, 5], fp8_codes(15, frng)),
                                            ("w.weight_scale_inv", "F32", [1, 1], f32s(0.5))], {"format": "pt"})

    # ---- cli: forward's arguments, NUL-separated, paths as placeholders (fuzz_entries.h).
    C = files["cli"]
    base = ["--weights", "@W", "--input", "@X", "--output", "@Y", "--top-k", "2"]
    def cli(*a):
        return "\0".join(a).encode()
    C["mixtral"] = cli(*base)
    C["mixtral_stats"] = cli(*base, "--stats", "@S")
    C["deepseek"] = cli("--weights", "@Q", "--input", "@X", "--output", "@Y", "--top-k", "2", "--score", "sigmoid",
                        "--renormalize", "--routed-scale", "2.5", "--groups", "2", "--topk-groups", "1", "--stats", "@S")
    C["bf16"] = cli("--weights", "@W", "--input", "@B", "--output", "@Y", "--top-k", "1", "--dtype", "bf16")
    C["capacity"] = cli(*base, "--capacity-factor", "1.0", "--drop-policy", "probability", "--stats", "@S")
    C["expert_choice"] = cli(*base, "--routing", "expert-choice", "--capacity-factor", "2", "--stats", "@S")
    C["crash_capacity_1e19"] = cli(*base, "--capacity-factor", "1e19", "--min-capacity", "1", "--stats", "@S")
    C["crash_expert_choice_1e19"] = cli(*base, "--routing", "expert-choice", "--capacity-factor", "1e19")
    C["crash_routed_scale_1e39"] = cli(*base, "--routed-scale", "1e39")
    C["crash_shared_experts_negative"] = cli("--weights", "@Q", "--input", "@X", "--output", "@Y", "--top-k", "2",
                                             "--shared-experts", "-5")
    C["crash_input_directory"] = cli("--weights", "@W", "--input", "@D", "--output", "@Y", "--top-k", "2")
    C["crash_weights_fifo"] = cli("--weights", "@F", "--input", "@X", "--output", "@Y", "--top-k", "2")
    C["crash_stats_directory"] = cli(*base, "--stats", "@D")
    C["crash_output_alias_stats"] = cli("--weights", "@W", "--input", "@X", "--output", "@P", "--stats", "@Y",
                                        "--top-k", "2")
    C["crash_output_is_input"] = cli("--weights", "@W", "--input", "@X", "--output", "@X", "--top-k", "2")
    C["crash_stats_is_weights"] = cli(*base, "--stats", "@W")
    C["dtype_fp64"] = cli(*base, "--dtype", "fp64")
    C["help"] = cli("--help")
    C["bad_flag"] = cli(*base, "--no-such-flag", "1")

    if os.path.isdir(out):
        shutil.rmtree(out)
    total = 0
    for target, fs in files.items():
        os.makedirs(os.path.join(out, target))
        for name, data in sorted(fs.items()):
            with open(os.path.join(out, target, name), "wb") as f:
                f.write(data)
            total += len(data)
    print(f"make_corpus: {sum(len(v) for v in files.values())} files, {total} bytes in {out}")


if __name__ == "__main__":
    main()
