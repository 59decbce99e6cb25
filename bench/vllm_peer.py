#!/usr/bin/env python3
"""bench/vllm_peer.py: vLLM's Triton fused-MoE kernel as a whole-layer benchmark peer, without installing vLLM.

No vLLM code lives in this repository. The peer reads vLLM's kernel source at run time from the git-ignored folder
.deps/vllm/ (or $SWITCHYARD_VLLM_DEPS), which must hold:

  .deps/vllm/fused_moe.py   vllm/model_executor/layers/fused_moe/fused_moe.py, verbatim (the peer was written
                            against commit 13cb3e44373beb1c8b9d2c017f565af6f7a1b601, 78176 bytes);
  .deps/vllm/configs/*.json the tuned configs from vllm/model_executor/layers/fused_moe/configs/ for the shapes run,
                            named as vLLM names them: E={experts},N={ffn per expert},device_name={GPU}.json (bf16 has
                            no dtype suffix), e.g. E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json;
  .deps/vllm/SOURCE.txt     where each file came from (commit, size, sha256).

They were obtained with the project's search tool (read_file of the public repository vllm-project/vllm, paging
through the file) and written there by hand, because the GPU machine has no network; .deps/ travels to it with the
working tree. To refresh: read the same paths again and overwrite the files; nothing else needs to change as long
as the kernel keeps its argument names (the launch below binds arguments by name from the kernel's signature).

What runs, per layer call (mirrors vLLM's fused_experts_impl for unquantized bf16):
  router      softmax top-k over fp32 logits, identical to compare_torch.router (no renormalisation);
  align       moe_align_block_size in PyTorch (vLLM uses a compiled CUDA op): sort (token, slot) pairs by expert,
              pad each expert's segment to a multiple of BLOCK_SIZE_M, expert id per block, padded total; no host
              synchronisation, about 20 small launches (vLLM's op is one or two);
  GEMM 1      fused_moe_kernel: x[token] @ w13[e]^T for each routed pair -> cache1 [T, k, 2F];
  SwiGLU      silu(gate) * up in PyTorch (vLLM uses its silu_and_mul op; same math, 3 launches instead of 1);
  GEMM 2      fused_moe_kernel with MUL_ROUTED_WEIGHT -> cache3 [T, k, H] (cache1 and cache3 share memory as
              in vLLM);
  combine     cache3.sum(1) -> y [T, H] bf16 (vLLM's moe_sum).
Config: vLLM's rule: the tuned file for (E, N=F, device) if present, the entry whose batch-size key is nearest to T;
else vLLM's get_default_config. SWITCHYARD_VLLM_SIBLING_CONFIGS=1 also accepts the other Hopper's file (H100 <-> H200)
before falling back (vLLM itself does not). Not mirrored: vLLM's chunking of T above VLLM_FUSED_MOE_CHUNK_SIZE.

FP8 block-quantised mode (vllm_fp8_layer_fn, compare_torch.py --fp8; mirrors fused_experts_impl with
use_fp8_w8a8=True, block_shape=[128, 128], as vLLM runs DeepSeek-V3 / Qwen3-FP8 checkpoints on Hopper with the Triton
backend):
  weights     e4m3 codes w13 [E, 2F, H], w2 [E, H, F] with fp32 scales w1_scale [E, 2F/128, H/128], w2_scale
              [E, H/128, F/128] (vLLM's names; they multiply: checkpoints' weight_scale_inv), given by the caller;
  activations per_token_group_quant_fp8 in PyTorch, the math of vLLM's kernel (fp8_utils.per_token_group_quant_fp8,
              group 128, row-major scales as moe_kernel_quantize_input asks): per token and 128 channels,
              s = max(amax, 1e-10) / 448 (fp32), q = e4m3(clamp(x / s, -448, 448)) rounded to nearest even; x before
              GEMM 1, the SwiGLU output (bf16) before GEMM 2. vLLM runs this as one CUDA kernel per GEMM, the peer as
              about 8 PyTorch launches: the peer's time is an upper bound of vLLM's at small T (graph replay, which
              compare_torch.py --fp8 also reports, removes most of the launch cost);
  GEMMs       fused_moe_kernel with use_fp8_w8a8, group_n = group_k = 128, a_scale/b_scale and their strides as
              invoke_fused_moe_kernel passes them, BLOCK_SIZE_K = min(config's, 128);
  config      vLLM's rule with dtype "fp8_w8a8" and block_shape [128,128]: the tuned file
              E={E},N={F},device_name={GPU},dtype=fp8_w8a8,block_shape=[128,128].json if present, else vLLM's
              get_default_config for block fp8: BLOCK_SIZE_M 64, BLOCK_SIZE_N 128, BLOCK_SIZE_K 128, GROUP_SIZE_M 32,
              num_warps 4, num_stages 3.

Use from compare_torch.py's layer mode as impl `vllm`; vllm_layer_fn() compiles and checks once, then returns the
closure to time (vllm_fp8_layer_fn for the FP8 mode). Self-check on CPU (no GPU): python3 bench/test_vllm_peer_align.py
"""
import ast
import json
import math
import os

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
DEPS_DIR = os.environ.get("SWITCHYARD_VLLM_DEPS", os.path.join(os.path.dirname(HERE), ".deps", "vllm"))
KERNEL_NAME = "fused_moe_kernel"


class PeerUnavailable(Exception):
    """The vLLM peer cannot run here (files or Triton missing, kernel failed to compile or run); says why."""


# ---------------------------------------------------------------------------------------------------------------
# Loading the kernel out of vLLM's file without importing vLLM
# ---------------------------------------------------------------------------------------------------------------
def _is_triton_jit(dec):
    """@triton.jit or @triton.jit(...)."""
    if isinstance(dec, ast.Call):
        dec = dec.func
    return isinstance(dec, ast.Attribute) and dec.attr == "jit" and isinstance(dec.value, ast.Name) \
        and dec.value.id == "triton"


def _jit_defs(tree):
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and any(_is_triton_jit(d)
                                                                                    for d in n.decorator_list)}


def _free_names(fn):
    """Names a function body loads that it neither binds nor takes as arguments."""
    a = fn.args
    bound = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
    bound |= {x.arg for x in (a.vararg, a.kwarg) if x is not None}
    loads = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Name):
            (loads if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg) and node is not None:
            bound.add(node.arg)
    # annotations and decorators are evaluated at definition time, in the module namespace: count them too
    return loads - bound


def extract_jit_sources(path=None, root=KERNEL_NAME):
    """Parses vLLM's fused_moe.py; returns (tree, [FunctionDef nodes needed by root, callees first], module-level
    constant assignments they need). Raises PeerUnavailable when the file or the kernel is missing."""
    path = path or os.path.join(DEPS_DIR, "fused_moe.py")
    if not os.path.exists(path):
        raise PeerUnavailable(f"{path} missing (see bench/vllm_peer.py's header for how to obtain it)")
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    jits = _jit_defs(tree)
    if root not in jits:
        raise PeerUnavailable(f"no @triton.jit {root} in {path}")
    consts = {}
    for node in tree.body:  # simple module-level constants (NAME = literal) a kernel might read
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                ast.literal_eval(node.value)
                consts[node.targets[0].id] = node
            except ValueError:
                pass
    order, seen = [], set()

    def visit(name):
        if name in seen:
            return
        seen.add(name)
        for dep in sorted(_free_names(jits[name])):
            if dep in jits:
                visit(dep)
        order.append(jits[name])

    visit(root)
    needed_consts = sorted({n for fn in order for n in _free_names(fn) if n in consts})
    return tree, order, [consts[n] for n in needed_consts]


def kernel_arg_names(path=None, root=KERNEL_NAME):
    """The kernel's parameter names in order, read with ast (no Triton needed)."""
    _, order, _ = extract_jit_sources(path, root)
    fn = order[-1]
    return [a.arg for a in fn.args.posonlyargs + fn.args.args]


_LOADED = {}


def load_jit_functions(path=None, root=KERNEL_NAME):
    """Execs the kernel and the @triton.jit helpers it calls in a namespace holding only triton, tl and the constants
    they read; returns {name: JITFunction}. Compiled against the real file name with the original line numbers, so
    Triton's inspect.getsource() finds the source. Cached per path."""
    path = os.path.abspath(path or os.path.join(DEPS_DIR, "fused_moe.py"))
    key = (path, root)
    if key in _LOADED:
        return _LOADED[key]
    try:
        import triton
        import triton.language as tl
    except ImportError as err:
        raise PeerUnavailable(f"triton not importable: {err}") from err
    _, order, consts = extract_jit_sources(path, root)
    ns = {"triton": triton, "tl": tl, "__name__": "switchyard_vllm_peer_kernels", "__file__": path}
    module = ast.Module(body=list(consts) + list(order), type_ignores=[])
    exec(compile(module, path, "exec"), ns)  # noqa: S102 - vLLM's own kernel source, read from .deps
    import builtins
    missing = sorted(n for fn in order for n in _free_names(fn) if n not in ns and not hasattr(builtins, n))
    if missing:
        raise PeerUnavailable(f"{root} needs names the peer does not provide: {', '.join(missing)}")
    funcs = {fn.name: ns[fn.name] for fn in order}
    _LOADED[key] = funcs
    return funcs


# ---------------------------------------------------------------------------------------------------------------
# Configs (vLLM's get_config_file_name / get_moe_configs / get_default_config / try_get_optimal_moe_config)
# ---------------------------------------------------------------------------------------------------------------
def vllm_device_name(name=None):
    if name is None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    name = name.replace(" ", "_")
    if "H200" in name.split("_"):
        name = "NVIDIA_H200"
    return name


FP8_DTYPE = "fp8_w8a8"      # vLLM's dtype selector of fp8 W8A8 configs
FP8_BLOCK = [128, 128]      # vLLM's block_shape of block-quantised fp8 (DeepSeek-V3 / Qwen3-FP8)
FP8_MAX = 448.0             # torch.finfo(torch.float8_e4m3fn).max
FP8_EPS = 1e-10             # per_token_group_quant_fp8's eps


def config_file_name(e, n, device_name, dtype=None, block_shape=None):
    """vLLM's get_config_file_name: bf16/fp16 have no dtype selector and no block shape."""
    sel = f",dtype={dtype}" if dtype else ""
    if block_shape and all(block_shape):
        sel += f",block_shape={list(block_shape)}".replace(" ", "")
    return f"E={e},N={n},device_name={device_name}{sel}.json"


def default_config(m, e, dtype=None, block_shape=None):
    """vLLM's get_default_config (not batch-invariant mode) for unquantized weights and for block-quantised fp8."""
    if dtype == FP8_DTYPE and block_shape is not None:
        return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": block_shape[0], "BLOCK_SIZE_K": block_shape[1], "GROUP_SIZE_M": 32,
                "SPLIT_K": 1, "num_warps": 4, "num_stages": 3}
    if m <= e:
        return {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "SPLIT_K": 1}
    return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8, "SPLIT_K": 1}


_SIBLINGS = {"NVIDIA_H100_80GB_HBM3": "NVIDIA_H200", "NVIDIA_H200": "NVIDIA_H100_80GB_HBM3"}


def get_config(m, e, n, device_name=None, deps_dir=None, allow_sibling=None, dtype=None, block_shape=None):
    """(config dict, human-readable source). m: tokens in the batch; e: experts; n: ffn size per expert (vLLM's N
    in the file name is w2.shape[2], the per-expert intermediate size); dtype / block_shape: vLLM's selectors
    (FP8_DTYPE and FP8_BLOCK for block-quantised fp8, None for bf16)."""
    deps_dir = deps_dir or DEPS_DIR
    device_name = vllm_device_name(device_name)
    if allow_sibling is None:
        allow_sibling = os.environ.get("SWITCHYARD_VLLM_SIBLING_CONFIGS", "") == "1"
    candidates = [(device_name, "tuned")]
    if allow_sibling and device_name in _SIBLINGS:
        candidates.append((_SIBLINGS[device_name], "tuned for the other Hopper"))
    for dev, kind in candidates:
        p = os.path.join(deps_dir, "configs", config_file_name(e, n, dev, dtype, block_shape))
        if os.path.exists(p):
            with open(p) as f:
                table = json.load(f)
            table.pop("triton_version", None)
            table = {int(k): v for k, v in table.items()}
            key = min(table.keys(), key=lambda x: abs(x - m))
            what = f"E={e},N={n},{dev}" + (f",{dtype},block {list(block_shape)}" if dtype else "")
            return dict(table[key]), f"{kind} {what} key {key}"
    return (default_config(m, e, dtype, block_shape),
            f"vLLM default (no {config_file_name(e, n, device_name, dtype, block_shape)})")


# Launch configurations tried by the "best of" mode (vllm_layer_fn(best_of=N)): issue 11 compares against vLLM's
# kernel given its best launch config. These are points of vLLM's own tuning space (benchmarks/kernels/
# benchmark_moe.py: BLOCK_SIZE_M 16-256, BLOCK_SIZE_N 32-256, BLOCK_SIZE_K 64-256, GROUP_SIZE_M 1-64, 4 or 8 warps,
# 2-5 stages) that its shipped Hopper files pick for prefill-sized batches; vLLM's own choice for the shape (its
# tuned file or get_default_config) is always tried as well.
BEST_OF_CANDIDATES = [
    dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=256, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, GROUP_SIZE_M=16, num_warps=8, num_stages=3),
    dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=256, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=8, num_stages=4),
    dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=256, BLOCK_SIZE_K=64, GROUP_SIZE_M=16, num_warps=8, num_stages=3),
    dict(BLOCK_SIZE_M=256, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=3),
    dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, GROUP_SIZE_M=32, num_warps=4, num_stages=4),
]


def pick_best_config(own, candidates, time_fn):
    """(best config, its ms, [(config, ms or None)]) over vLLM's own config and the candidates (duplicates of own
    dropped). time_fn(config) returns milliseconds or raises (a config the compiler or the card refuses: skipped)."""
    tried, seen = [], []
    for cfg in [own] + list(candidates):
        if cfg in seen:
            continue
        seen.append(cfg)
        try:
            tried.append((cfg, float(time_fn(cfg))))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001 - a refused config is a data point, not a failure of the run
            tried.append((cfg, None))
    ok = [(c, ms) for c, ms in tried if ms is not None]
    if not ok:
        raise PeerUnavailable("no launch config ran")
    best, best_ms = min(ok, key=lambda cm: cm[1])
    return best, best_ms, tried


def describe_config(cfg):
    s = f"BM{cfg['BLOCK_SIZE_M']} BN{cfg['BLOCK_SIZE_N']} BK{cfg['BLOCK_SIZE_K']} G{cfg.get('GROUP_SIZE_M', 1)}"
    if "num_warps" in cfg:
        s += f" w{cfg['num_warps']}"
    if "num_stages" in cfg:
        s += f" s{cfg['num_stages']}"
    return s


# ---------------------------------------------------------------------------------------------------------------
# Alignment (vLLM's moe_align_block_size, in PyTorch, no host synchronisation)
# ---------------------------------------------------------------------------------------------------------------
def moe_align_block_size_torch(topk_ids, block_size, num_experts):
    """Returns (sorted_token_ids int32 [numel + E*(bs-1)], expert_ids int32 [cdiv(that, bs)],
    num_tokens_post_padded int32 [1]) with vLLM's layout: flat (token*k + slot) indices grouped by expert in
    ascending expert order, each expert's segment padded with the value numel to a multiple of block_size; expert_ids
    holds each block's expert; blocks at or past num_tokens_post_padded are never read by the kernel (they hold the
    last expert here, 0 in vLLM). Within an expert, indices are in ascending order (vLLM's op does not promise an
    order)."""
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    numel = flat.numel()
    max_padded = numel + num_experts * (block_size - 1)
    max_blocks = (max_padded + block_size - 1) // block_size
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + (block_size - 1)) // block_size * block_size
    pad_end = padded.cumsum(0)
    pad_start = pad_end - padded
    start = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    pos = pad_start[sorted_e] - start[sorted_e] + torch.arange(numel, device=dev)
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, pos, order.to(torch.int32))
    block_start = torch.arange(max_blocks, device=dev, dtype=torch.int64) * block_size
    expert_ids = torch.searchsorted(pad_end, block_start, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    num_post = pad_end[-1:].to(torch.int32)
    return sorted_ids, expert_ids, num_post


# ---------------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------------
def router(x, wg, top_k):
    """Same as compare_torch.router: softmax over fp32 logits, top-k, no renormalisation."""
    logits = (x @ wg.t()).float()
    probs = logits.softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    return weights, ids


_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _tl_dtype(dtype):
    import triton.language as tl
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def invoke_kernel(kernel, arg_names, a, b, c, topk_weights, sorted_ids, expert_ids, num_post, mul_routed_weight,
                  top_k, config, compute_type, a_scale=None, b_scale=None, block_shape=None):
    """vLLM's invoke_fused_moe_kernel for unquantized weights, or (a_scale, b_scale and block_shape given) for
    block-quantised fp8 W8A8, binding arguments by the kernel's own names.
    a [M, K]; b [E, N, K]; c [M', top_k, N] written at rows sorted_ids (flat index); rows of a are index // top_k.
    fp8: a and b float8_e4m3fn, a_scale [M, K/gk] fp32, b_scale [E, N/gn, K/gk] fp32, block_shape [gn, gk]."""
    fp8 = block_shape is not None
    if fp8:
        assert a_scale is not None and b_scale is not None and b_scale.dim() == 3 and a_scale.dim() == 2
        assert -(-b.size(-2) // block_shape[0]) == b_scale.size(-2) and -(-b.size(-1) // block_shape[1]) == \
            b_scale.size(-1), (tuple(b.shape), tuple(b_scale.shape), block_shape)
    em = sorted_ids.size(0)
    if a.size(0) < config["BLOCK_SIZE_M"]:  # vLLM's small-batch cut of the grid
        em = min(em, a.size(0) * top_k * config["BLOCK_SIZE_M"])
    n_out = b.size(1)
    values = dict(
        a_ptr=a, b_ptr=b, c_ptr=c, b_bias_ptr=None, a_scale_ptr=None, b_scale_ptr=None,
        topk_weights_ptr=topk_weights, sorted_token_ids_ptr=sorted_ids, expert_ids_ptr=expert_ids,
        num_tokens_post_padded_ptr=num_post, N=n_out, K=b.size(2), EM=em, num_valid_tokens=a.size(0) * top_k,
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_be=b.stride(0), stride_bk=b.stride(2),
        stride_bn=b.stride(1), stride_cm=c.stride(1), stride_cn=c.stride(2), stride_asm=0, stride_ask=0,
        stride_bse=0, stride_bsk=0, stride_bsn=0, stride_bbe=0, stride_bbn=0, group_n=0, group_k=0,
        MUL_ROUTED_WEIGHT=mul_routed_weight, top_k=top_k, compute_type=compute_type, use_fp8_w8a8=False,
        use_int8_w8a8=False, use_int8_w8a16=False, per_channel_quant=False, HAS_BIAS=False, SPLIT_K=1,
    )
    if fp8:  # invoke_fused_moe_kernel's strides for 2-D a_scale and 3-D b_scale, and its group sizes
        values.update(a_scale_ptr=a_scale, b_scale_ptr=b_scale, stride_asm=a_scale.stride(0),
                      stride_ask=a_scale.stride(1), stride_bse=b_scale.stride(0), stride_bsk=b_scale.stride(2),
                      stride_bsn=b_scale.stride(1), group_n=block_shape[0], group_k=block_shape[1], use_fp8_w8a8=True)
    opts = {}
    for k, v in config.items():
        if k in _LAUNCH_OPTIONS:
            opts[k] = v
        elif k in arg_names:
            values[k] = v
    if fp8 and "BLOCK_SIZE_K" in values:  # vLLM: BLOCK_SIZE_K = min(BLOCK_SIZE_K, min(block_shape))
        values["BLOCK_SIZE_K"] = min(values["BLOCK_SIZE_K"], min(block_shape))
    values["even_Ks"] = b.size(2) % values.get("BLOCK_SIZE_K", config["BLOCK_SIZE_K"]) == 0  # older vLLM kernels
    missing = [n for n in arg_names if n not in values]
    if missing:
        raise PeerUnavailable(f"{KERNEL_NAME} takes arguments this peer does not know: {', '.join(missing)}")
    kwargs = {n: values[n] for n in arg_names}
    bm, bn = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"]
    grid = (((em + bm - 1) // bm) * ((n_out + bn - 1) // bn),)
    kernel[grid](**kwargs, **opts)


class _Kernel:
    """The loaded JIT kernel plus its argument names (an emulator with the same two attributes can stand in)."""

    def __init__(self, fn, arg_names):
        self.fn = fn
        self.arg_names = arg_names

    def __getitem__(self, grid):
        return self.fn[grid]


def load_kernel(path=None):
    funcs = load_jit_functions(path)
    fn = funcs[KERNEL_NAME]
    names = list(getattr(fn, "arg_names", None) or kernel_arg_names(path))
    return _Kernel(fn, names)


def vllm_fused_moe_layer(x, wg, w13, w2, top_k, config=None, kernel=None, router_fn=None, compute_type=None):
    """y [T, H] (x.dtype) = sum_k w_k * (silu(x W_gate^T) * (x W_up^T)) W_down^T with vLLM's fused_moe_kernel.
    x [T, H]; wg [E, H]; w13 [E, 2F, H] (gate rows then up rows, vLLM's w13 layout); w2 [E, H, F]."""
    t, h = x.shape
    e, two_f, _ = w13.shape
    f = w2.shape[2]
    if kernel is None:
        kernel = load_kernel()
    if config is None:
        config, _ = get_config(t, e, f)
    if compute_type is None:
        compute_type = _tl_dtype(x.dtype)
    weights, ids = (router_fn or router)(x, wg, top_k)
    weights = weights.contiguous()
    sorted_ids, expert_ids, num_post = moe_align_block_size_torch(ids, config["BLOCK_SIZE_M"], e)
    cache13 = torch.empty(t * top_k * max(two_f, h), device=x.device, dtype=x.dtype)
    cache1 = cache13[: t * top_k * two_f].view(t, top_k, two_f)
    cache3 = cache13[: t * top_k * h].view(t, top_k, h)
    invoke_kernel(kernel, kernel.arg_names, x, w13, cache1, weights, sorted_ids, expert_ids, num_post, False, top_k,
                  config, compute_type)
    g = cache1.view(t * top_k, two_f)
    act = F.silu(g[:, :f]) * g[:, f:]
    invoke_kernel(kernel, kernel.arg_names, act, w2, cache3, weights, sorted_ids, expert_ids, num_post, True, 1,
                  config, compute_type)
    return cache3.sum(dim=1)


def reference_layer(x, wg, w13, w2, top_k, router_fn=None):
    """fp32 loop over the experts hit (for checking only)."""
    f = w2.shape[2]
    weights, ids = (router_fn or router)(x, wg, top_k)
    y = torch.zeros(x.shape[0], w2.shape[1], device=x.device, dtype=torch.float32)
    xf = x.float()
    for ei in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == ei)
        g = xf[tok] @ w13[ei].float().t()
        out = (F.silu(g[:, :f]) * g[:, f:]) @ w2[ei].float().t()
        y.index_add_(0, tok, out * weights[tok, slot].unsqueeze(1))
    return y


def vllm_layer_fn(x, wg, w13, w2, top_k, router_fn=None, check_tokens=64, best_of=0, time_fn=None):
    """For compare_torch's layer mode: loads the kernel, picks vLLM's config for T, runs the layer once (compiles),
    checks the first check_tokens rows against an fp32 loop, and returns (closure to time, note). Raises
    PeerUnavailable (with the reason) when it cannot run; a CUDA out-of-memory passes through unchanged.
    best_of=N (> 0): vLLM's own config and the first N of BEST_OF_CANDIDATES are each timed on this layer with
    time_fn(closure) -> ms (compare_torch's time_cuda), and the fastest is used (the note names it and vLLM's own)."""
    t = x.shape[0]
    e, f = w13.shape[0], w2.shape[2]
    try:
        kernel = load_kernel()
        config, source = get_config(t, e, f)
        if best_of > 0:
            if time_fn is None:
                raise ValueError("vllm_layer_fn: best_of needs time_fn")
            own = config

            def time_config(cfg):
                return time_fn(lambda: vllm_fused_moe_layer(x, wg, w13, w2, top_k, config=cfg, kernel=kernel,
                                                            router_fn=router_fn))

            config, _, tried = pick_best_config(own, BEST_OF_CANDIDATES[:best_of], time_config)
            ran = sum(ms is not None for _, ms in tried)
            source = (f"best of {ran} launch configs ({len(tried) - ran} refused; vLLM's own, {source}: "
                      f"{describe_config(own)})")
        y = vllm_fused_moe_layer(x, wg, w13, w2, top_k, config=config, kernel=kernel, router_fn=router_fn)
        torch.cuda.synchronize()
    except PeerUnavailable:
        raise
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # Triton compile or launch failure: report it in the row, keep the run going
        raise PeerUnavailable(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    note = f"cfg {source}: {describe_config(config)}"
    if check_tokens:
        n = min(t, check_tokens)
        ref = reference_layer(x[:n], wg, w13, w2, top_k, router_fn)
        err = ((y[:n].float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        note += f"; rel err {err:.1e}" + (" (WRONG)" if not err < 2e-2 else "")
        del ref
    del y
    # The check's fp32 copies of expert weights are not part of the layer: restart the caller's peak-memory count so
    # it measures the timed calls only (their warm-up allocates what the layer needs).
    torch.cuda.reset_peak_memory_stats()

    def fn():
        return vllm_fused_moe_layer(x, wg, w13, w2, top_k, config=config, kernel=kernel, router_fn=router_fn)

    return fn, note


# ---------------------------------------------------------------------------------------------------------------
# FP8 block-quantised mode (use_fp8_w8a8=True, block_shape [128, 128])
# ---------------------------------------------------------------------------------------------------------------
def per_token_group_quant_fp8_torch(x, group_size=FP8_BLOCK[1], eps=FP8_EPS):
    """vLLM's per_token_group_quant_fp8 (column_major_scales=False, no ue8m0) in PyTorch: x [M, K] (K a multiple of
    group_size) -> (q float8_e4m3fn [M, K], s fp32 [M, K / group_size]) with, per row and group of group_size
    channels, s = max(eps, amax |x|) / 448 (fp32 division) and q = e4m3(clamp(x / s, -448, 448)) (fp32 division,
    round to nearest even: torch's conversion, as c10's Float8_e4m3fn that vLLM's kernel uses)."""
    m, k = x.shape
    if k % group_size:
        raise ValueError(f"per_token_group_quant_fp8: last dimension {k} is not a multiple of {group_size}")
    xg = x.float().view(m, k // group_size, group_size)
    s = xg.abs().amax(dim=-1).clamp_min(eps) / FP8_MAX
    q = (xg / s.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(m, k), s


def vllm_fused_moe_fp8_layer(x, wg, w13, w13_scale, w2, w2_scale, top_k, config=None, kernel=None, router_fn=None,
                             compute_type=None, block_shape=None):
    """vllm_fused_moe_layer's pipeline in vLLM's block-quantised fp8 mode: x [T, H] (bf16) quantised per token and 128
    channels, GEMM 1 on w13 [E, 2F, H] e4m3 with w13_scale [E, 2F/128, H/128] (vLLM's w1_scale), SwiGLU in x.dtype,
    the result quantised the same way, GEMM 2 on w2 [E, H, F] e4m3 with w2_scale [E, H/128, F/128] (the routed
    weight applied in its epilogue), sum over the k slots. Returns y [T, H] of x.dtype."""
    block_shape = list(block_shape or FP8_BLOCK)
    t, h = x.shape
    e, two_f, _ = w13.shape
    f = w2.shape[2]
    if kernel is None:
        kernel = load_kernel()
    if config is None:
        config, _ = get_config(t, e, f, dtype=FP8_DTYPE, block_shape=block_shape)
    if compute_type is None:
        compute_type = _tl_dtype(x.dtype)
    weights, ids = (router_fn or router)(x, wg, top_k)
    weights = weights.contiguous()
    sorted_ids, expert_ids, num_post = moe_align_block_size_torch(ids, config["BLOCK_SIZE_M"], e)
    cache13 = torch.empty(t * top_k * max(two_f, h), device=x.device, dtype=x.dtype)
    cache1 = cache13[: t * top_k * two_f].view(t, top_k, two_f)
    cache3 = cache13[: t * top_k * h].view(t, top_k, h)
    qx, sx = per_token_group_quant_fp8_torch(x, block_shape[1])
    invoke_kernel(kernel, kernel.arg_names, qx, w13, cache1, weights, sorted_ids, expert_ids, num_post, False, top_k,
                  config, compute_type, a_scale=sx, b_scale=w13_scale, block_shape=block_shape)
    g = cache1.view(t * top_k, two_f)
    act = F.silu(g[:, :f]) * g[:, f:]
    qa, sa = per_token_group_quant_fp8_torch(act, block_shape[1])
    invoke_kernel(kernel, kernel.arg_names, qa, w2, cache3, weights, sorted_ids, expert_ids, num_post, True, 1,
                  config, compute_type, a_scale=sa, b_scale=w2_scale, block_shape=block_shape)
    return cache3.sum(dim=1)


def dequantize_block(codes, scale, block_shape=None):
    """fp32 weights dec(q) * s of e4m3 codes [..., N, K] with block scales [..., N/bn, K/bk] (edge blocks partial)."""
    bn, bk = block_shape or FP8_BLOCK
    n, k = codes.shape[-2:]
    s = scale.float().repeat_interleave(bn, -2)[..., :n, :].repeat_interleave(bk, -1)[..., :k]
    return codes.float() * s


def reference_fp8_layer(x, wg, w13, w13_scale, w2, w2_scale, top_k, router_fn=None, block_shape=None):
    """fp32 loop over the experts hit of the same W8A8 recipe (activations quantised per token and 128 channels as
    above, weights dequantised per block, fp32 products, the SwiGLU output rounded to x.dtype before its
    quantisation): checks the peer's wiring (scales, strides, groups), not vLLM."""
    bs = list(block_shape or FP8_BLOCK)
    f = w2.shape[2]
    weights, ids = (router_fn or router)(x, wg, top_k)
    qx, sx = per_token_group_quant_fp8_torch(x, bs[1])
    xd = (qx.float().view(x.shape[0], -1, bs[1]) * sx.unsqueeze(-1)).view(x.shape)
    y = torch.zeros(x.shape[0], w2.shape[1], device=x.device, dtype=torch.float32)
    for ei in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == ei)
        g = (xd[tok] @ dequantize_block(w13[ei], w13_scale[ei], bs).t()).to(x.dtype)
        act = F.silu(g[:, :f]) * g[:, f:]
        qa, sa = per_token_group_quant_fp8_torch(act, bs[1])
        ad = (qa.float().view(act.shape[0], -1, bs[1]) * sa.unsqueeze(-1)).view(act.shape)
        out = ad @ dequantize_block(w2[ei], w2_scale[ei], bs).t()
        y.index_add_(0, tok, out * weights[tok, slot].unsqueeze(1))
    return y


def vllm_fp8_layer_fn(x, wg, w13, w13_scale, w2, w2_scale, top_k, router_fn=None, check_tokens=64):
    """vllm_layer_fn for the fp8 block-quantised mode: loads the kernel, picks vLLM's fp8 config for T, runs the layer
    once (compiles), checks the first check_tokens rows against reference_fp8_layer, returns (closure, note).
    Raises PeerUnavailable when it cannot run; a CUDA out-of-memory passes through unchanged."""
    t = x.shape[0]
    e, f = w13.shape[0], w2.shape[2]
    try:
        kernel = load_kernel()
        config, source = get_config(t, e, f, dtype=FP8_DTYPE, block_shape=FP8_BLOCK)
        y = vllm_fused_moe_fp8_layer(x, wg, w13, w13_scale, w2, w2_scale, top_k, config=config, kernel=kernel,
                                     router_fn=router_fn)
        torch.cuda.synchronize()
    except PeerUnavailable:
        raise
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # Triton compile or launch failure: report it in the row, keep the run going
        raise PeerUnavailable(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    note = f"cfg {source}: {describe_config(config)}"
    if check_tokens:
        n = min(t, check_tokens)
        ref = reference_fp8_layer(x[:n], wg, w13, w13_scale, w2, w2_scale, top_k, router_fn)
        err = float((y[:n].float() - ref).norm() / ref.norm().clamp_min(1e-30))
        note += f"; rel L2 vs fp32 W8A8 loop {err:.1e}" + (" (WRONG)" if not err < 2e-2 else "")
        del ref
    del y
    torch.cuda.reset_peak_memory_stats()

    def fn():
        return vllm_fused_moe_fp8_layer(x, wg, w13, w13_scale, w2, w2_scale, top_k, config=config, kernel=kernel,
                                        router_fn=router_fn)

    return fn, note
