"""CPU tests of switchyard.ep.ExpertParallelMoE: expert parallelism through torch.distributed (gloo), W in {1, 2, 4}.

Each group of W ranks is spawned once (torch.multiprocessing, OMP_NUM_THREADS=1, a file:// rendezvous in a temporary
directory, so no port can clash) and runs every case; each rank writes its y, input gradient, parameter gradients
and counts to the temporary directory, and the test process compares them with the single-process MoE run on the
concatenation of all ranks' tokens (rank 0's first) with the same full weights.

What is exact and why: the CPU ops compute every row on its own (double accumulation, naive increasing-k sums), the
combine and gather backward sum a token's k rows in slot order, and the weight gradient of an expert sums its rows
in receive order (rank 0's rows, then rank 1's, ... each in token order), which is the single-process order of the
concatenated batch. So y, the input gradient's expert part and the local experts' weight gradients are bitwise the
single-process ones, provided the torch GEMMs at home (router logits, shared expert: F.linear through MKL) give each
row the same bits whatever the other rows. MKL does here except for a one-row matrix (its matrix-vector path rounds
differently), so `exact` is decided per case by checking those GEMMs on the ranks' slices; when it does not hold
(the case with a one-token rank) the comparison is to fp64 1e-10 / fp32 1e-5 instead. The router and shared
gradients are sums of per-rank GEMM reductions against one whole-batch reduction: equal to 1e-10 (fp64) / 1e-5 (fp32).
"""
import datetime
import os
import sys
import tempfile
import traceback

import pytest
import torch
import torch.nn.functional as F

import switchyard.torch as st

H, FF, E, K = 8, 6, 8, 2

# name -> (config overrides, dtype, tokens per rank for W = 1 / 2 / 4, placement per W or None, x requires grad)
CASES = {
    "softmax-fp32": (dict(), torch.float32, {1: [9], 2: [5, 4], 4: [3, 2, 4, 2]}, None, True),
    "softmax-fp64": (dict(), torch.float64, {1: [9], 2: [5, 4], 4: [3, 2, 4, 2]}, None, True),
    "sigmoid-bias-groups-fp32": (dict(score_function="sigmoid", use_score_bias=True, num_groups=4, topk_groups=2,
                                      renormalize=True, routed_scale=2.5), torch.float32,
                                 {1: [8], 2: [3, 6], 4: [2, 3, 0, 4]}, None, True),
    "sigmoid-bias-groups-fp64": (dict(score_function="sigmoid", use_score_bias=True, num_groups=4, topk_groups=2,
                                      renormalize=True, routed_scale=2.5), torch.float64,
                                 {1: [8], 2: [3, 6], 4: [2, 3, 0, 4]}, None, True),
    "shared-experts-gate-geglu-fp64": (dict(num_shared_experts=2, shared_ffn_size=3, shared_expert_gate=True,
                                            activation="geglu"), torch.float64,
                                       {1: [7], 2: [0, 7], 4: [2, 0, 3, 2]}, None, True),
    # scattered placement, experts in non-sorted local order, top-k softmax, relu
    "scattered-topk-softmax-fp64": (dict(score_function="topk-softmax", top_k=3, activation="relu"), torch.float64,
                                    {1: [6], 2: [4, 2], 4: [2, 2, 2, 3]},
                                    {1: [[7, 6, 5, 4, 3, 2, 1, 0]], 2: [[6, 0, 3, 5], [7, 2, 1, 4]],
                                     4: [[5, 0], [3, 6], [1, 7], [4, 2]]}, True),
    # E = 10 over 4 ranks: 3 3 2 2 experts; a rank with one token (the router GEMM's M = 1 path: not bitwise)
    "uneven-placement-one-token-fp64": (dict(num_experts=10, top_k=3, renormalize=True), torch.float64,
                                        {1: [7], 2: [1, 6], 4: [2, 1, 0, 4]}, None, True),
    # skewed load: the bias sends every token to experts 0 and 1 (rank 0's at W = 4): other ranks receive no row
    "skewed-load-fp64": (dict(score_function="sigmoid", use_score_bias=True), torch.float64,
                         {1: [6], 2: [3, 3], 4: [2, 2, 0, 2]}, None, True),
    # x needs no gradient: only the expert weights do (the dispatch exchange still gets its backward on every rank)
    "frozen-input-groups-max-fp64": (dict(num_groups=2, topk_groups=1, group_score="max"), torch.float64,
                                     {1: [6], 2: [2, 4], 4: [2, 2, 2, 0]}, None, False),
}


def make_full(name, seed=5):
    kw, dtype, _, _, _ = CASES[name]
    cfg = dict(hidden_size=H, ffn_size=FF, num_experts=E, top_k=K)
    cfg.update(kw)
    torch.manual_seed(seed)
    m = st.MoE(st.MoEConfig(**cfg), dtype=dtype, return_stats=True)
    if m.score_bias is not None:
        with torch.no_grad():
            if name.startswith("skewed"):
                m.score_bias.zero_()
                m.score_bias[:2] = 10.0
            else:
                m.score_bias.uniform_(-0.2, 0.2)
    m.train()
    return m


def inputs(name, world):
    _, dtype, tokens, _, _ = CASES[name]
    g = torch.Generator().manual_seed(17 + world)
    t = sum(tokens[world])
    x = torch.randn(t, H, generator=g, dtype=torch.float64).to(dtype)
    gy = torch.randn(t, H, generator=g, dtype=torch.float64).to(dtype)
    bounds = [0]
    for n in tokens[world]:
        bounds.append(bounds[-1] + n)
    return x, gy, [slice(bounds[r], bounds[r + 1]) for r in range(world)]


def _run_case(name, rank, world, ep):
    _, _, _, placements, x_grad = CASES[name]
    full = make_full(name)
    placement = placements[world] if placements else None
    m = ep.ExpertParallelMoE.from_moe(full, placement=placement)
    x_all, gy_all, slices = inputs(name, world)
    x = x_all[slices[rank]].clone().requires_grad_(x_grad)
    out = m(x)
    (out.y * gy_all[slices[rank]]).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.all_reduce_replicated_grads()
    reduced = {n: p.grad.clone() for n, p in m.replicated_parameters()}
    with torch.no_grad():
        y_nograd = m(x)  # inference: no backward graph, same exchanges
    m.eval()
    y_eval = m(x.detach())
    bias = None
    if m.score_bias is not None:  # last: the update moves the routing
        m.update_score_bias(out.expert_counts, rate=0.125)  # collective: the group's counts
        bias = m.score_bias.clone()
    return dict(y=out.y.detach(), y_nograd=y_nograd.y, y_eval=y_eval.y.detach(), expert_counts=out.expert_counts,
                bias=bias,
                kept_counts=out.kept_counts, x_grad=None if x.grad is None else x.grad.clone(),
                grads=grads, reduced=reduced,
                local_experts=m.local_experts, shapes={n: tuple(p.shape) for n, p in m.named_parameters()})


def _worker(rank, world, init_file, out_dir, names):
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):  # gloo's pairs over loopback: no dependence on the hostname resolving
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.distributed as dist
    from switchyard import ep
    try:
        dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        for name in names:
            torch.save(_run_case(name, rank, world, ep), os.path.join(out_dir, f"{name}.{rank}.pt"))
        dist.barrier()
    except BaseException:
        with open(os.path.join(out_dir, f"error.{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    # Every rank's results are on disk and every rank has passed the barrier: leave without tearing gloo down.
    # A CI run saw one rank of four abort at exit with "terminate called without an active exception" (a gloo
    # thread still joinable when the process group is destroyed), after its results were written; the test checks
    # the results, not torch's teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_group(world, names, deadline_s=240):
    """Spawns `world` ranks running `names`; returns {(name, rank): result}. Fails (never hangs) on a timeout."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            ctx = mp.start_processes(_worker, args=(world, os.path.join(tmp, "rendezvous"), tmp, names),
                                     nprocs=world, join=False, start_method="spawn")
        finally:
            if old is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = old
        end = datetime.datetime.now() + datetime.timedelta(seconds=deadline_s)
        try:
            while not ctx.join(timeout=1):
                if datetime.datetime.now() > end:
                    raise TimeoutError(f"W={world}: ranks still running after {deadline_s} s")
        except Exception as exc:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            errors = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)) if f.startswith("error")]
            raise AssertionError(f"W={world} failed: {exc}\n" + "\n".join(errors)) from None
        return {(n, r): torch.load(os.path.join(tmp, f"{n}.{r}.pt"), weights_only=False)
                for n in names for r in range(world)}


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"W{w}")
def group_results(request):
    return request.param, run_group(request.param, list(CASES))


def reference(name, world):
    m = make_full(name)
    x_all, gy_all, slices = inputs(name, world)
    x = x_all.clone().requires_grad_(True)
    out = m(x)
    (out.y * gy_all).sum().backward()
    # exact: the home GEMMs (router, shared expert) give every rank's rows the bits of the whole-batch GEMM. The
    # router of fp32 x is the library's router_gemm (on the CPU each logit a double sum rounded once: row-invariant);
    # F.linear runs it for fp64 x only.
    mats = [p for p in (m.gate if x_all.dtype == torch.float64 else None, m.shared_w13, m.shared_gate)
            if p is not None]
    xd = x.detach()
    exact = all(torch.equal(F.linear(xd[s], w.to(xd.dtype)), F.linear(xd, w.to(xd.dtype))[s])
                for s in slices for w in mats)
    return m, x, out, slices, exact


def close(a, b, exact, what):
    if exact:
        assert torch.equal(a, b), f"{what}: not bitwise equal, max diff {(a - b).abs().max().item()}"
    else:
        tol = 1e-10 if a.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process(group_results, name):
    world, results = group_results
    m, x, out, slices, exact = reference(name, world)
    cfg, _, tokens, _, _ = CASES[name]
    if 1 in tokens[world]:
        assert not exact, "the one-token rank should take MKL's matrix-vector path (else it tests nothing new)"
    elif not cfg.get("shared_expert_gate"):  # the [1, H] shared gate is a matrix-vector product too
        assert exact, "router / shared GEMM rows are not batch-invariant on this machine"
    _, _, _, placements, x_grad = CASES[name]
    owner = {}
    summed = {}
    for r in range(world):
        res = results[(name, r)]
        s = slices[r]
        close(res["y"], out.y.detach()[s], exact, f"rank {r} y")
        assert torch.equal(res["y_nograd"], res["y"]), "no_grad forward differs"
        assert torch.equal(res["y_eval"], res["y"]), "eval forward differs"
        experts = res["local_experts"]
        want = placements[world][r] if placements else None
        if want is not None:
            assert experts == want
        idx = torch.tensor(experts)
        assert res["shapes"]["w13"][0] == len(experts) and res["shapes"]["w2"][0] == len(experts)
        for e in experts:
            assert e not in owner, f"expert {e} on ranks {owner[e]} and {r}"
            owner[e] = r
        for pname in ("w13", "w2"):
            close(res["grads"][pname], getattr(m, pname).grad[idx], exact, f"rank {r} {pname} grad")
        if x_grad:
            close(res["x_grad"], x.grad[s], exact, f"rank {r} x grad")
        else:
            assert res["x_grad"] is None
        assert sorted(res["reduced"]) == sorted(n for n, _ in m.named_parameters() if n not in ("w13", "w2"))
        for pname, g in res["reduced"].items():  # all_reduce_replicated_grads: the whole batch's gradient
            tol = 1e-10 if g.dtype == torch.float64 else 1e-5
            torch.testing.assert_close(g, dict(m.named_parameters())[pname].grad, rtol=tol, atol=tol)
        for pname, g in res["grads"].items():
            if pname not in ("w13", "w2"):
                summed[pname] = g if pname not in summed else summed[pname] + g
        for key in ("expert_counts", "kept_counts"):
            summed[key] = res[key].long() if key not in summed else summed[key] + res[key].long()
    assert sorted(owner) == list(range(m.config.num_experts))
    for pname, p in m.named_parameters():
        if pname in ("w13", "w2"):
            continue
        tol = 1e-10 if p.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(summed[pname], p.grad, rtol=tol, atol=tol, msg=lambda s: f"{pname} grad: {s}")
    assert torch.equal(summed["expert_counts"], out.expert_counts.long())
    assert torch.equal(summed["kept_counts"], out.expert_counts.long())
    if name.startswith("skewed") and world == 4:
        assert out.expert_counts[2:].sum() == 0, "the skewed case should leave ranks 1..3 without rows"
    if m.score_bias is not None:  # update_score_bias on the group's counts: the single process's update, every rank
        before = m.score_bias.clone()
        m.update_score_bias(out.expert_counts, rate=0.125)
        assert not torch.equal(m.score_bias, before), "the update should move some bias"
        for r in range(world):
            assert torch.equal(results[(name, r)]["bias"], m.score_bias), f"rank {r} score_bias after the update"


def test_placement_contiguous_and_lists():
    from switchyard.ep import ExpertPlacement
    p = ExpertPlacement.contiguous(10, 4)
    assert p.experts_of_rank == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert p.order() == list(range(10)) and p.max_local() == 3 and repr(p) == "contiguous(E=10, W=4)"
    assert ExpertPlacement.contiguous(8, 8).experts_of_rank == [[i] for i in range(8)]
    q = ExpertPlacement.from_lists(4, [[3, 0], [2, 1]])
    assert q.rank_of == [0, 1, 1, 0] and q.order() == [3, 0, 2, 1] and repr(q) == "map(E=4, W=2: [3 0] [2 1])"
    for bad, match in (((4, [[0, 1], [1, 2, 3]]), "twice"), ((4, [[0, 1], [2]]), "expert 3 on no rank"),
                       ((4, [[0, 1, 2, 3], []]), "rank 1 holds no expert"), ((4, [[0, 4], [1, 2, 3]]), "outside")):
        with pytest.raises(ValueError, match=match):
            ExpertPlacement.from_lists(*bad)
    with pytest.raises(ValueError, match="world_size=5"):
        ExpertPlacement.contiguous(4, 5)


@pytest.mark.parametrize("kw,match", [
    (dict(capacity_factor=1.25), "dropless only"),
    (dict(eval_capacity_factor=2.0), "dropless only"),
    (dict(routing_mode="expert-choice"), "expert-choice"),
    (dict(quant_mode="fp8-block"), "FP8"),
])
def test_refusals_before_any_collective(kw, match):
    from switchyard.ep import ExpertParallelMoE
    cfg = st.MoEConfig(hidden_size=H, ffn_size=FF, num_experts=E, top_k=K, **kw)
    with pytest.raises(NotImplementedError, match=match):
        ExpertParallelMoE(cfg)


def test_needs_an_initialised_process_group():
    import torch.distributed as dist
    from switchyard.ep import ExpertParallelMoE
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialised"):
        ExpertParallelMoE(st.MoEConfig(hidden_size=H, ffn_size=FF, num_experts=E, top_k=K))
