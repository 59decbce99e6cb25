"""An independent NumPy (float64) implementation of one Switchyard MoE layer, plus the two file formats.

Written from DESIGN.md and the comments of include/switchyard/{config,routing,moe_layer}.h; it does not call
Switchyard. Used by test_cli_numpy.py to check `switchyard forward` end to end.

Layer (T tokens, H hidden, E experts, k slots, F expert width, S shared width):
  logits = x . gate^T (exact products, stored as fp32)
  scores: softmax over E | sigmoid | (topk-softmax: the logits themselves)
  sel = scores + bias (when the selection bias is used); with G > 1 groups a group's score is the sum of its two
  best sel (its best one for one-expert groups); the M best groups survive; top-k of sel, ties to the lower index
  weights from the unbiased scores (softmax: p, sigmoid: s, topk-softmax: softmax over the k chosen logits),
  then renormalise (skipped when the sum is 0), then * routed_scale; stored as fp32
  capacity C = max(min_capacity, ceil(cf * T * k / E)) when cf > 0: position keeps the first C pairs of an
  expert in token order, probability keeps the C largest weights (ties: lower token index)
  expert(a) = W2 . act(W13 . a); act(gate, up) = silu(gate) * up | gelu_tanh(gate) * up | gelu_tanh(up) | relu(up)
  y[t] = sum_j w[t, j] * expert_{id[t, j]}(x[t]) (dropped pairs contribute nothing) + shared(x[t])
Rounding points of the contract (moe_layer.h): h, every expert output row, the shared output and y are
stored in the layer dtype; `round_to` below emulates that for bf16/fp16 (identity-to-fp32 for fp32).
"""
import json
import math
import struct

import numpy as np

# ---- dtypes -------------------------------------------------------------------------------------------------


def f32_to_bf16_bits(a):
    """Round-to-nearest-even fp32 -> bf16, as uint16 bit patterns (NaN kept quiet)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def bf16_bits_to_f32(b):
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to(a, dtype):
    """The value a stage stores in `dtype` and reads back, as float64."""
    a = np.asarray(a, dtype=np.float64)
    if dtype == "fp32":
        return a.astype(np.float32).astype(np.float64)
    if dtype == "bf16":
        return bf16_bits_to_f32(f32_to_bf16_bits(a.astype(np.float32))).astype(np.float64)
    if dtype == "fp16":
        return a.astype(np.float16).astype(np.float64)
    raise ValueError(dtype)


def encode(a, dtype):
    """float array -> (safetensors dtype name, raw array in that dtype)."""
    if dtype == "fp32":
        return "F32", np.ascontiguousarray(a, dtype="<f4")
    if dtype == "bf16":
        return "BF16", f32_to_bf16_bits(np.asarray(a, dtype=np.float32)).astype("<u2")
    if dtype == "fp16":
        return "F16", np.ascontiguousarray(a, dtype="<f2")
    raise ValueError(dtype)


def decode(raw, dtype):
    if dtype == "bf16":
        return bf16_bits_to_f32(raw).astype(np.float64)
    return np.asarray(raw).astype(np.float64)


# ---- files --------------------------------------------------------------------------------------------------


def write_safetensors(path, tensors, metadata=None):
    """tensors: dict name -> (dtype name 'F32'|'BF16'|'F16'|'I32'|'I64', contiguous little-endian array)."""
    header = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    blobs, offset = [], 0
    for name, (dt, arr) in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


# ---- the layer ----------------------------------------------------------------------------------------------


def silu(v):
    return v / (1.0 + np.exp(-v))


def gelu_tanh(v):
    return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


def activation(name, gate, up):
    if name == "swiglu":
        return silu(gate) * up
    if name == "geglu":
        return gelu_tanh(gate) * up
    if name == "gelu":
        return gelu_tanh(up)
    if name == "relu":
        return np.maximum(up, 0.0)
    raise ValueError(name)


def gated(name):
    return name in ("swiglu", "geglu")


def mlp(a, w13, w2, act, dtype):
    """a [n, H]; w13 [2F or F, H]; w2 [H, F]: output [n, H] with GEMM1's outputs, h and the output rounded to dtype."""
    pre = round_to(a @ w13.T, dtype)  # GEMM1's outputs are stored in the layer dtype
    f = w2.shape[1]
    h = activation(act, pre[:, :f], pre[:, f:]) if gated(act) else activation(act, None, pre)
    h = round_to(h, dtype)
    return round_to(h @ w2.T, dtype)


def route(cfg, logits, bias):
    """logits [T, E] (fp32 values) -> ids [T, k] int, weights [T, k] float64 (fp32 values)."""
    T, E = logits.shape
    k = cfg["top_k"]
    score = cfg.get("score", "softmax")
    if score == "softmax":
        z = logits - logits.max(axis=1, keepdims=True)
        s = np.exp(z)
        s = s / s.sum(axis=1, keepdims=True)
    elif score == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-logits))
    elif score == "topk-softmax":
        s = logits.copy()
    else:
        raise ValueError(score)
    sel = s + bias[None, :] if bias is not None else s.copy()
    G, M = cfg.get("groups", 1), cfg.get("topk_groups", 1)
    if G > 1:
        per = E // G
        g = sel.reshape(T, G, per)
        top2 = -np.sort(-g, axis=2)[:, :, : min(2, per)]
        gscore = top2.sum(axis=2)
        order = np.argsort(-gscore, axis=1, kind="stable")
        keep = np.zeros((T, G), dtype=bool)
        np.put_along_axis(keep, order[:, :M], True, axis=1)
        sel = np.where(np.repeat(keep, per, axis=1), sel, -np.inf)
    ids = np.argsort(-sel, axis=1, kind="stable")[:, :k]
    if score == "topk-softmax":
        chosen = np.take_along_axis(logits, ids, axis=1)
        e = np.exp(chosen - chosen.max(axis=1, keepdims=True))
        w = e / e.sum(axis=1, keepdims=True)
    else:
        w = np.take_along_axis(s, ids, axis=1)
    if cfg.get("renormalize", False):
        tot = w.sum(axis=1, keepdims=True)
        w = np.where(tot != 0, w / np.where(tot != 0, tot, 1.0), w)
    w = w * cfg.get("routed_scale", 1.0)
    return ids, w.astype(np.float32).astype(np.float64)


def keep_mask(cfg, ids, w):
    """Which (t, j) pairs survive the capacity (all when dropless)."""
    T, k = ids.shape
    E = cfg["num_experts"]
    cf = cfg.get("capacity_factor", 0.0)
    keep = np.ones((T, k), dtype=bool)
    if cf <= 0:
        return keep
    C = max(cfg.get("min_capacity", 0), int(math.ceil(cf * T * k / E)))
    policy = cfg.get("drop_policy", "position")
    for e in range(E):
        pairs = [(t, j) for t in range(T) for j in range(k) if ids[t, j] == e]
        if len(pairs) <= C:
            continue
        if policy == "position":
            dropped = pairs[C:]
        else:  # largest weights kept, ties to the lower token index
            ranked = sorted(pairs, key=lambda p: (-w[p], p[0]))
            dropped = ranked[C:]
        for p in dropped:
            keep[p] = False
    return keep


def moe_forward(cfg, x, weights):
    """cfg: dict (top_k, num_experts, score, renormalize, routed_scale, groups, topk_groups, use_bias,
    capacity_factor, min_capacity, drop_policy, activation, dtype); x [T, H] float64 (values of the dtype);
    weights: dict gate [E, H], bias [E] or None, w13 [E, R, H], w2 [E, H, F], shared_w13, shared_w2 or None,
    shared_gate [1, H] or None (the shared output of token t is then scaled by sigmoid(x[t] . shared_gate)).
    Returns y [T, H] float64 (values of the dtype), ids, w, keep."""
    dtype = cfg.get("dtype", "fp32")
    act = cfg.get("activation", "swiglu")
    logits = (x @ weights["gate"].T).astype(np.float32).astype(np.float64)
    bias = weights.get("bias") if cfg.get("use_bias", False) else None
    ids, w = route(cfg, logits, bias)
    keep = keep_mask(cfg, ids, w)
    T, H = x.shape
    y = np.zeros((T, H))
    for t in range(T):
        for j in range(ids.shape[1]):
            if keep[t, j]:
                e = ids[t, j]
                y[t] += w[t, j] * mlp(x[t : t + 1], weights["w13"][e], weights["w2"][e], act, dtype)[0]
    if weights.get("shared_w13") is not None:
        shared = mlp(x, weights["shared_w13"], weights["shared_w2"], act, dtype)
        if weights.get("shared_gate") is not None:  # Qwen2-MoE: sigmoid(x . g) per token, g from fp32 logits
            g = (x @ weights["shared_gate"].T).astype(np.float32).astype(np.float64)
            shared = shared / (1.0 + np.exp(-g))
        y += shared
    return round_to(y, dtype), ids, w, keep
