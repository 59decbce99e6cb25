#!/usr/bin/env python3
"""FP8 vs bf16 accuracy of one MoE layer through the CLI (docs/fp8.md, "Accuracy").

For each shape: random bf16 weights (normal, std 0.02; router too; DeepSeek's selection bias normal std 0.02) in a
Hugging Face-named safetensors file, `switchyard quantize` to fp8-block and fp8-tensor, then `switchyard forward
--dtype bf16` (CPU backend) of the same random bf16 input x ~ N(0, 1) [T, H] on the three files. Prints, per shape
and format, the relative L2 error ||y_fp8 - y_bf16|| / ||y_bf16|| (in fp64 over the bf16 outputs) and writes JSON.

  python3 scripts/fp8_accuracy.py --cli build-cpu/switchyard --work /tmp/fp8acc --tokens 16

--deepseek-experts reduces DeepSeek-V3's E (default 32, 8 groups of 4) so the bf16 file and the loaded copies fit
in memory; H, F, k, groups, scoring and the shared expert are the model's.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np


def bf16_bits(a):
    """float32 array -> bf16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bits_to_f32(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path, tensors):
    """tensors: list of (name, dtype string, shape, generator of byte chunks)."""
    header, off = {}, 0
    for name, dt, shape, nbytes, _ in tensors:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for _, _, _, _, make in tensors:
            f.write(make())


def layer_tensors(rng_seed, H, F, E, shared, bias):
    """The layer's tensors, each generated when written (std 0.02 normal, bf16)."""
    out = []

    def mat(name, shape, idx):
        def make():
            g = np.random.default_rng([rng_seed, idx])
            return bf16_bits(g.standard_normal(shape, dtype=np.float32) * 0.02).tobytes()
        out.append((name, "BF16", shape, 2 * shape[0] * shape[1], make))

    p = "model.layers.0.mlp."
    mat(p + "gate.weight", (E, H), 0)
    if bias:
        def make_bias():
            g = np.random.default_rng([rng_seed, 1])
            return (g.standard_normal(E, dtype=np.float32) * 0.02).astype(np.float32).tobytes()
        out.append((p + "gate.e_score_correction_bias", "F32", (E,), 4 * E, make_bias))
    for e in range(E):
        q = p + "experts.%d." % e
        mat(q + "gate_proj.weight", (F, H), 10 + 3 * e)
        mat(q + "up_proj.weight", (F, H), 11 + 3 * e)
        mat(q + "down_proj.weight", (H, F), 12 + 3 * e)
    if shared:
        mat(p + "shared_experts.gate_proj.weight", (shared, H), 2)
        mat(p + "shared_experts.up_proj.weight", (shared, H), 3)
        mat(p + "shared_experts.down_proj.weight", (H, shared), 4)
    return out


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("failed: %s\n%s" % (" ".join(cmd), r.stderr))
    return r.stderr.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cli", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shapes", default="mixtral,qwen3,deepseek-v3")
    ap.add_argument("--deepseek-experts", type=int, default=32)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    shapes = {
        "mixtral": dict(H=4096, F=14336, E=8, k=2, shared=0, bias=False, flags=["--renormalize"]),
        "qwen3": dict(H=2048, F=768, E=128, k=8, shared=0, bias=False, flags=["--renormalize"]),
        "deepseek-v3": dict(H=7168, F=2048, E=a.deepseek_experts, k=8, shared=2048, bias=True,
                            flags=["--score", "sigmoid", "--groups", "8", "--topk-groups", "4", "--renormalize",
                                   "--routed-scale", "2.5", "--shared-experts", "1"]),
    }
    results = []
    for name in a.shapes.split(","):
        s = shapes[name]
        w = os.path.join(a.work, name + "_bf16.safetensors")
        write_safetensors(w, layer_tensors(a.seed, s["H"], s["F"], s["E"], s["shared"], s["bias"]))
        g = np.random.default_rng([a.seed, 99])
        x = bf16_bits(g.standard_normal((a.tokens, s["H"]), dtype=np.float32))
        xp = os.path.join(a.work, name + "_x.npy")
        np.save(xp, x)
        common = ["--prefix", "model.layers.0.", "--input", xp, "--top-k", str(s["k"]), "--dtype", "bf16",
                  "--quiet"] + s["flags"]
        yb = os.path.join(a.work, name + "_y_bf16.npy")
        run([a.cli, "forward", "--weights", w, "--output", yb] + common)
        y_ref = bits_to_f32(np.load(yb)).astype(np.float64)
        for fmt in ("fp8-block", "fp8-tensor"):
            q = os.path.join(a.work, "%s_%s.safetensors" % (name, fmt))
            run([a.cli, "quantize", "--weights", w, "--out", q, "--format", fmt, "--quiet"])
            yq = os.path.join(a.work, "%s_y_%s.npy" % (name, fmt))
            run([a.cli, "forward", "--weights", q, "--output", yq] + common)
            y = bits_to_f32(np.load(yq)).astype(np.float64)
            err = float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))
            row = dict(shape=name, format=fmt, H=s["H"], F=s["F"], E=s["E"], k=s["k"], shared=s["shared"],
                       tokens=a.tokens, rel_l2=err)
            results.append(row)
            print("%-12s %-10s H=%d F=%d E=%d k=%d shared=%d T=%d  rel L2 %.4e" %
                  (name, fmt, s["H"], s["F"], s["E"], s["k"], s["shared"], a.tokens, err), flush=True)
            os.remove(q)
        os.remove(w)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
