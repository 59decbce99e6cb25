// bindings/torch/ops.cpp: schemas of the `switchyard` torch ops and their one implementation for CPU and CUDA.
//
// Each op converts its tensors to TensorRefs (made contiguous), allocates its outputs (and workspace) with torch's
// allocator on the inputs' device, and calls one public stage function (switchyard/stages.h, balance.h), which
// validates the call and runs the backend of that device. Only public headers are included here; ops.h says which
// stage each op is. Layouts: row-major contiguous; ids, slot_row, row_token, offsets, counts int32; router logits and
// weights fp32 (fp64 on the CPU for gradient checks).
#include "ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "switchyard/balance.h"
#include "switchyard/config.h"
#include "switchyard/error.h"
#include "switchyard/moe_layer.h"
#include "switchyard/stages.h"

namespace switchyard {
namespace torch_ops {
namespace {

DType dtype_of(const at::Tensor& t) {
    switch (t.scalar_type()) {
        case at::kFloat: return DType::kF32;
        case at::kBFloat16: return DType::kBF16;
        case at::kHalf: return DType::kF16;
        case at::kDouble: return DType::kF64;
        case at::kInt: return DType::kI32;
        case at::kLong: return DType::kI64;
        case at::kFloat8_e4m3fn: return DType::kF8E4M3;
        default: TORCH_CHECK(false, "switchyard: unsupported dtype ", t.scalar_type());
    }
}

// A TensorRef view of a contiguous tensor (callers pass .contiguous() results).
TensorRef ref(const at::Tensor& t) {
    TORCH_CHECK(t.is_contiguous(), "switchyard: internal: tensor must be contiguous");
    TORCH_CHECK(t.dim() >= 1 && t.dim() <= TensorRef::kMaxRank, "switchyard: tensors of rank 1..",
                TensorRef::kMaxRank, " expected, got ", t.sizes());
    TORCH_CHECK(t.is_cpu() || t.is_cuda(), "switchyard: tensors on the cpu or a CUDA device expected, got ",
                t.device());
    const Device dev = t.is_cuda() ? Device::kCUDA : Device::kCPU;
    std::vector<int64_t> dims(t.sizes().begin(), t.sizes().end());
    return TensorRef::contiguous(t.data_ptr(), dtype_of(t), dims.data(), static_cast<int>(dims.size()), dev,
                                 t.is_cuda() ? t.device().index() : 0);
}

TensorRef ref_or_none(const at::Tensor& t) { return t.defined() ? ref(t) : TensorRef(); }

// Scratch memory of `bytes` bytes on t's device (256-byte aligned, as the stages require).
struct Workspace {
    at::Tensor storage;
    void* ptr = nullptr;
    size_t bytes = 0;
};
Workspace workspace_like(const at::Tensor& t, size_t bytes) {
    Workspace w;
    w.bytes = bytes;
    if (bytes == 0) return w;
    w.storage = at::empty({static_cast<int64_t>(bytes + 256)}, t.options().dtype(at::kByte));
    const uintptr_t p = reinterpret_cast<uintptr_t>(w.storage.data_ptr());
    w.ptr = reinterpret_cast<void*>((p + 255) / 256 * 256);
    return w;
}

Device sy_device(const at::Tensor& t) { return t.is_cuda() ? Device::kCUDA : Device::kCPU; }

// Converts a switchyard::Error into a torch error (Python then sees RuntimeError with the message).
template <typename F>
auto guarded(F&& f) -> decltype(f()) {
    try {
        return f();
    } catch (const Error& e) {
        TORCH_CHECK(false, "switchyard: ", e.what());
    }
}

// The router part of a config from op arguments (the sizes only the router needs).
MoEConfig router_config(int64_t num_experts, int64_t top_k, int64_t score_function, bool renormalize,
                        double routed_scale, int64_t num_groups, int64_t topk_groups, bool use_bias) {
    SWITCHYARD_CHECK(score_function >= 0 && score_function <= 2, "score_function=", score_function,
                     " (0 softmax, 1 topk-softmax, 2 sigmoid)");
    MoEConfig c;
    c.hidden_size = c.ffn_size = 1;  // the router does not read them
    std::tie(c.num_experts, c.top_k, c.num_groups, c.topk_groups) =
        std::make_tuple(num_experts, top_k, num_groups, topk_groups);
    std::tie(c.score_function, c.renormalize, c.routed_scale, c.use_score_bias) =
        std::make_tuple(static_cast<ScoreFunction>(score_function), renormalize, routed_scale, use_bias);
    return c;
}

// Router logits as the stages take them: fp32, or fp64 on the CPU.
at::Tensor router_logits(const at::Tensor& logits) {
    TORCH_CHECK(logits.dim() == 2, "switchyard: logits must be [T, E], got ", logits.sizes());
    if (logits.is_cpu() && logits.scalar_type() == at::kDouble) return logits.contiguous();
    return logits.to(at::kFloat).contiguous();
}

Activation activation_of(int64_t act) {
    TORCH_CHECK(act >= 0 && act <= 3, "switchyard.activation: activation=", act, " (0 swiglu, 1 geglu, 2 gelu, 3 relu)");
    return static_cast<Activation>(act);
}

std::tuple<at::Tensor, at::Tensor> route_op(const at::Tensor& logits_in, const c10::optional<at::Tensor>& bias,
                                            int64_t top_k, int64_t score_function, bool renormalize,
                                            double routed_scale, int64_t num_groups, int64_t topk_groups) {
    return guarded([&] {
        const at::Tensor logits = router_logits(logits_in);
        const bool use_bias = bias.has_value() && bias->defined();
        const MoEConfig cfg = router_config(logits.size(1), top_k, score_function, renormalize, routed_scale,
                                            num_groups, topk_groups, use_bias);
        at::Tensor b;
        if (use_bias) b = bias->to(logits.device(), at::kFloat).contiguous();
        at::Tensor ids = at::empty({logits.size(0), top_k}, logits.options().dtype(at::kInt));
        at::Tensor w = at::empty({logits.size(0), top_k}, logits.options());
        route(cfg, ref(logits), ref_or_none(b), ref(ids), ref(w), stream_of(logits));
        return std::make_tuple(ids, w);
    });
}

at::Tensor route_backward_op(const at::Tensor& logits_in, const at::Tensor& ids_in, const at::Tensor& dw_in,
                             int64_t score_function, bool renormalize, double routed_scale) {
    return guarded([&] {
        const at::Tensor logits = router_logits(logits_in), ids = ids_in.contiguous();
        const at::Tensor dw = dw_in.to(logits.scalar_type()).contiguous();
        const MoEConfig cfg = router_config(logits.size(1), ids.size(1), score_function, renormalize, routed_scale,
                                            1, 1, false);
        at::Tensor dl = at::empty_like(logits);
        route_backward(cfg, ref(logits), ref(ids), ref(dw), ref(dl), stream_of(logits));
        return dl.to(logits_in.scalar_type());
    });
}

// {aux, z} [2] in the logits' dtype: balance.h's router_losses (fixed summation order, double accumulation).
at::Tensor router_losses_op(const at::Tensor& logits_in, const at::Tensor& ids_in, int64_t score_function) {
    return guarded([&] {
        const at::Tensor logits = router_logits(logits_in), ids = ids_in.contiguous();
        const MoEConfig cfg = router_config(logits.size(1), ids.size(1), score_function, false, 1.0, 1, 1, false);
        const Workspace ws =
            workspace_like(logits, router_losses_workspace_size(cfg, sy_device(logits), logits.size(0), 1));
        at::Tensor losses = at::empty({kNumLosses}, logits.options());
        router_losses(cfg, ref(logits), ref(ids), TensorRef(), ref(losses), ws.ptr, ws.bytes, stream_of(logits));
        return losses.narrow(0, 0, 2).to(logits_in.scalar_type()).clone();
    });
}

at::Tensor router_losses_backward_op(const at::Tensor& logits_in, const at::Tensor& ids_in,
                                     const at::Tensor& d_losses_in, int64_t score_function) {
    return guarded([&] {
        const at::Tensor logits = router_logits(logits_in), ids = ids_in.contiguous();
        const at::Tensor d_losses = d_losses_in.to(logits.scalar_type()).contiguous();
        TORCH_CHECK(d_losses.numel() == 2, "switchyard: d_losses must have 2 elements, got ", d_losses.numel());
        const MoEConfig cfg = router_config(logits.size(1), ids.size(1), score_function, false, 1.0, 1, 1, false);
        const Workspace ws = workspace_like(logits, router_losses_backward_workspace_size(cfg, sy_device(logits)));
        at::Tensor dl = at::empty_like(logits);
        router_losses_backward(cfg, ref(logits), ref(ids), ref(d_losses), ref(dl), ws.ptr, ws.bytes,
                               stream_of(logits));
        return dl.to(logits_in.scalar_type());
    });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_op(const at::Tensor& ids_in, const at::Tensor& w_in,
                                                                   int64_t num_experts, double capacity_factor,
                                                                   int64_t min_capacity, int64_t drop_policy) {
    return guarded([&] {
        const at::Tensor ids = ids_in.contiguous(), w = w_in.to(at::kFloat).contiguous();
        TORCH_CHECK(ids.dim() == 2, "switchyard.plan: topk_ids must be [T, k], got ", ids.sizes());
        const int64_t num_tokens = ids.size(0), k = ids.size(1);
        MoEConfig cfg = router_config(num_experts, k, 0, false, 1.0, 1, 1, false);
        cfg.capacity_factor = capacity_factor;
        cfg.min_capacity = min_capacity;
        SWITCHYARD_CHECK(drop_policy == 0 || drop_policy == 1, "drop_policy=", drop_policy,
                         " (0 position, 1 probability)");
        cfg.drop_policy = static_cast<DropPolicy>(drop_policy);
        const auto opt = ids.options().dtype(at::kInt);
        at::Tensor offsets = at::empty({num_experts + 1}, opt), slot_row = at::empty({num_tokens, k}, opt);
        at::Tensor row_token = at::empty({num_tokens * k}, opt), row_slot = at::empty({num_tokens * k}, opt);
        at::Tensor counts = at::empty({num_experts}, opt);
        RoutingPlan plan;
        plan.expert_counts = ref(counts);
        plan.expert_offsets = ref(offsets);
        plan.slot_row = ref(slot_row);
        plan.row_token = ref(row_token);
        plan.row_slot = ref(row_slot);
        const Workspace ws = workspace_like(ids, plan_workspace_size(cfg, sy_device(ids), num_tokens));
        build_plan(cfg, ref(ids), ref(w), plan, ws.ptr, ws.bytes, stream_of(ids));
        return std::make_tuple(offsets, slot_row, row_token, counts);
    });
}

at::Tensor router_gemm_op(const at::Tensor& x_in, const at::Tensor& gate_in) {
    return guarded([&] {
        const at::Tensor x = x_in.contiguous(), gate = gate_in.contiguous();
        TORCH_CHECK(x.dim() == 2 && gate.dim() == 2, "switchyard.router_gemm: x [T, H] and gate [E, H] expected, got ",
                    x.sizes(), " and ", gate.sizes());
        at::Tensor logits = at::empty({x.size(0), gate.size(0)}, x.options().dtype(at::kFloat));
        const Workspace ws = workspace_like(x, router_gemm_workspace_size(sy_device(x)));
        router_gemm(ref(x), ref(gate), ref(logits), ws.ptr, ws.bytes, stream_of(x));
        return logits;
    });
}

// The router GEMM's gradients (stages.h, router_gemm_backward); a gradient not asked for comes back empty ([0]).
std::tuple<at::Tensor, at::Tensor> router_gemm_backward_op(const at::Tensor& x_in, const at::Tensor& gate_in,
                                                           const at::Tensor& d_logits_in, bool need_dx,
                                                           bool need_dgate) {
    return guarded([&] {
        const at::Tensor x = x_in.contiguous(), gate = gate_in.contiguous(), d = d_logits_in.contiguous();
        TORCH_CHECK(x.dim() == 2 && gate.dim() == 2, "switchyard.router_gemm_backward: x [T, H] and gate [E, H] "
                    "expected, got ", x.sizes(), " and ", gate.sizes());
        at::Tensor dx = need_dx ? at::empty_like(x) : x.new_empty({0});
        at::Tensor dgate = need_dgate ? at::empty_like(gate) : gate.new_empty({0});
        const Workspace ws = workspace_like(x, router_gemm_backward_workspace_size(sy_device(x), dtype_of(x),
                                                                                   x.size(0), gate.size(0),
                                                                                   x.size(1)));
        router_gemm_backward(ref(x), ref(gate), ref(d), need_dx ? ref(dx) : TensorRef(),
                             need_dgate ? ref(dgate) : TensorRef(), ws.ptr, ws.bytes, stream_of(x));
        return std::make_tuple(dx, dgate);
    });
}

// slot_row (optional): the same plan's [T, k] slot_row; on CUDA x is then read once per token (stages.h, gather).
at::Tensor gather_op(const at::Tensor& x_in, const at::Tensor& row_token_in,
                     const c10::optional<at::Tensor>& slot_row_in) {
    return guarded([&] {
        const at::Tensor x = x_in.contiguous(), rt = row_token_in.contiguous();
        TORCH_CHECK(x.dim() == 2, "switchyard.gather: x must be [T, H], got ", x.sizes());
        at::Tensor sr;
        if (slot_row_in.has_value() && slot_row_in->defined()) sr = slot_row_in->contiguous();
        at::Tensor xp = at::empty({rt.numel(), x.size(1)}, x.options());  // rows past offsets[E] are written as 0
        gather(ref(x), ref(rt.view({-1})), ref(xp), stream_of(x), sr.defined() ? ref(sr) : TensorRef());
        return xp;
    });
}

at::Tensor gather_backward_op(const at::Tensor& d_xp_in, const at::Tensor& slot_row_in) {
    return guarded([&] {
        const at::Tensor g = d_xp_in.contiguous(), sr = slot_row_in.contiguous();
        TORCH_CHECK(g.dim() == 2 && sr.dim() == 2, "switchyard.gather_backward: d_xp [R, H] and slot_row [T, k] "
                    "expected, got ", g.sizes(), " and ", sr.sizes());
        at::Tensor dx = at::empty({sr.size(0), g.size(1)}, g.options());
        gather_backward(ref(g), ref(sr), ref(dx), stream_of(g));
        return dx;
    });
}

// The grouped GEMM ops' optional row_index (int32 [R], e.g. the plan's row_token): a is then x [T, K] and row r of the
// GEMM reads x[row_index[r]] in the GEMM's own loads (stages.h, GroupedGemmOptions::row_index). Sets opt.row_index
// (kept alive by *keep) and returns the GEMM's rows.
int64_t gathered_rows_option(const std::optional<at::Tensor>& row_index, const at::Tensor& a, at::Tensor* keep,
                             GroupedGemmOptions* opt, const char* what) {
    if (!row_index.has_value()) return a.size(0);
    *keep = row_index->contiguous();
    TORCH_CHECK(keep->dim() == 1, what, ": row_index must be [R], got ", keep->sizes());
    opt->row_index = ref(*keep);
    return keep->size(0);
}

at::Tensor grouped_mm_op(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& offsets_in,
                         const std::optional<at::Tensor>& row_index) {
    return guarded([&] {
        const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), off = offsets_in.contiguous();
        TORCH_CHECK(a.dim() == 2 && b.dim() == 3, "switchyard.grouped_mm: a [R, K] and b [E, N, K] expected, got a ",
                    a.sizes(), " b ", b.sizes());
        GroupedGemmOptions opt;
        at::Tensor ri;
        const int64_t rows = gathered_rows_option(row_index, a, &ri, &opt, "switchyard.grouped_mm");
        at::Tensor c = at::empty({rows, b.size(1)}, a.options());  // rows past offsets[E]: written as 0
        const Workspace ws = workspace_like(
            a, grouped_gemm_workspace_size(sy_device(a), dtype_of(a), b.size(0), b.size(1), b.size(2), rows));
        grouped_gemm(ref(a), ref(b), ref(off), ref(c), ws.ptr, ws.bytes, stream_of(a), opt);
        return c;
    });
}

// GEMM1 and the gated activation in one step (inference; no backward op): h [R, F] = grouped_gemm_gated(act, a,
// w13i, offsets) with w13i the interleaved layout of interleave_gate_up_op. row_index (optional, int32 [R], e.g. the
// plan's row_token): a is x [T, K] and row r of the GEMM reads x[row_index[r]] (stages.h, GroupedGemmOptions), the
// gather done in GEMM1's loads.
// keep: GEMM1's product g [R, 2F] (interleaved columns) returned too (GroupedGemmOptions::gate_up), else undefined.
std::tuple<at::Tensor, at::Tensor> gated_gemm(const at::Tensor& a_in, const at::Tensor& w13i_in,
                                              const at::Tensor& offsets_in, int64_t act,
                                              const std::optional<at::Tensor>& row_index_in, bool keep,
                                              const char* what) {
    const at::Tensor a = a_in.contiguous(), w = w13i_in.contiguous(), off = offsets_in.contiguous();
    TORCH_CHECK(a.dim() == 2 && w.dim() == 3 && w.size(1) % 2 == 0, what, ": a [R, K] and w13i [E, 2F, K] expected, "
                "got a ", a.sizes(), " w13i ", w.sizes());
    GroupedGemmOptions opt;
    at::Tensor ri, g;
    const int64_t rows = gathered_rows_option(row_index_in, a, &ri, &opt, what);
    at::Tensor h = at::empty({rows, w.size(1) / 2}, a.options());  // rows past offsets[E]: written as 0
    if (keep) {
        g = at::empty({rows, w.size(1)}, a.options());  // as h
        opt.gate_up = ref(g);
    }
    const Workspace ws = workspace_like(a, grouped_gemm_gated_workspace_size(sy_device(a), dtype_of(a), w.size(0),
                                                                             w.size(1) / 2, w.size(2), rows));
    grouped_gemm_gated(activation_of(act), ref(a), ref(w), ref(off), ref(h), ws.ptr, ws.bytes, stream_of(a), opt);
    return {h, g};
}

at::Tensor grouped_mm_gated_op(const at::Tensor& a, const at::Tensor& w13i, const at::Tensor& offsets, int64_t act,
                               const std::optional<at::Tensor>& row_index) {
    return guarded([&] {
        return std::get<0>(gated_gemm(a, w13i, offsets, act, row_index, false, "switchyard.grouped_mm_gated"));
    });
}

// (h, g): grouped_mm_gated's h and GEMM1's product g [R, 2F] in w13i's interleaved column order, from one kernel on
// CUDA (the training forward keeps g for the backward).
std::tuple<at::Tensor, at::Tensor> grouped_mm_gated_keep_op(const at::Tensor& a, const at::Tensor& w13i,
                                                            const at::Tensor& offsets, int64_t act) {
    return guarded([&] {
        return gated_gemm(a, w13i, offsets, act, std::nullopt, true, "switchyard.grouped_mm_gated_keep");
    });
}

// w13 [E, 2F, K] <-> the interleaved layout of grouped_mm_gated (a new tensor).
at::Tensor interleave_gate_up_op(const at::Tensor& w_in, bool inverse) {
    return guarded([&] {
        const at::Tensor w = w_in.contiguous();
        at::Tensor out = at::empty_like(w);
        interleave_gate_up(ref(w), ref(out), inverse, stream_of(w));
        return out;
    });
}

// FP8 grouped GEMM (inference; no backward op): c [R, N] in a's dtype = grouped_gemm_fp8(a, b fp8 e4m3, b_scale,
// input_scale, offsets) under mode 1 (fp8-block) or 2 (fp8-tensor), QuantMode's values. Scales are taken as given
// (fp32; the stage names a wrong dtype or shape); undefined offsets mean one group (b [N, K]).
at::Tensor grouped_mm_fp8_op(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& b_scale_in,
                             const c10::optional<at::Tensor>& input_scale, const c10::optional<at::Tensor>& offsets,
                             int64_t mode) {
    return guarded([&] {
        TORCH_CHECK(mode == static_cast<int64_t>(QuantMode::kFP8Block) ||
                        mode == static_cast<int64_t>(QuantMode::kFP8Tensor),
                    "switchyard.grouped_mm_fp8: mode=", mode, " (1 fp8-block, 2 fp8-tensor)");
        const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), bs = b_scale_in.contiguous();
        TORCH_CHECK(a.dim() == 2 && (b.dim() == 2 || b.dim() == 3), "switchyard.grouped_mm_fp8: a [R, K] and b "
                    "[E, N, K] or [N, K] expected, got a ", a.sizes(), " b ", b.sizes());
        at::Tensor is, off;
        if (input_scale.has_value() && input_scale->defined()) is = input_scale->contiguous();
        if (offsets.has_value() && offsets->defined()) off = offsets->contiguous();
        const int64_t groups = b.dim() == 3 ? b.size(0) : 1, n = b.size(-2), k = b.size(-1);
        Fp8GemmOptions opts;
        opts.mode = static_cast<QuantMode>(mode);
        at::Tensor c = at::empty({a.size(0), n}, a.options());  // rows past offsets[E]: written as 0
        const Workspace ws =
            workspace_like(a, grouped_gemm_fp8_workspace_size(sy_device(a), opts.mode, groups, n, k, a.size(0)));
        grouped_gemm_fp8(ref(a), ref(b), ref(bs), ref_or_none(is), ref_or_none(off), ref(c), ws.ptr, ws.bytes,
                         stream_of(a), opts);
        return c;
    });
}

// da [R, K] = dc . b per expert (rows past offsets[E] written as 0); dc is taken in b's dtype.
at::Tensor grouped_mm_dgrad_op(const at::Tensor& dc_in, const at::Tensor& b_in, const at::Tensor& offsets_in) {
    return guarded([&] {
        const at::Tensor b = b_in.contiguous(), off = offsets_in.contiguous();
        const at::Tensor dc = dc_in.to(b.scalar_type()).contiguous();
        TORCH_CHECK(b.dim() == 3 && dc.dim() == 2, "switchyard.grouped_mm_dgrad: dc [R, N] and b [E, N, K] expected, "
                    "got dc ", dc.sizes(), " b ", b.sizes());
        at::Tensor da = at::empty({dc.size(0), b.size(2)}, b.options());
        const Workspace ws = workspace_like(b, grouped_gemm_grad_workspace_size(sy_device(b), dtype_of(b), b.size(0),
                                                                                b.size(1), b.size(2), dc.size(0)));
        grouped_gemm_dgrad(ref(dc), ref(b), ref(off), ref(da), ws.ptr, ws.bytes, stream_of(b));
        return da;
    });
}

// (dg [R, 2F], h [R, F]) = (activation_backward(g, grouped_mm_dgrad(dc, b)), activation(g)): GEMM2's input
// gradient through the gated activation, with h recomputed for GEMM2's weight gradient (stages.h,
// grouped_gemm_dgrad_activation).
std::tuple<at::Tensor, at::Tensor> grouped_mm_dgrad_activation_op(const at::Tensor& dc_in, const at::Tensor& b_in,
                                                                  const at::Tensor& offsets_in, const at::Tensor& g_in,
                                                                  int64_t act, bool interleaved) {
    return guarded([&] {
        const at::Tensor b = b_in.contiguous(), off = offsets_in.contiguous();
        const at::Tensor dc = dc_in.to(b.scalar_type()).contiguous(), g = g_in.to(b.scalar_type()).contiguous();
        TORCH_CHECK(b.dim() == 3 && dc.dim() == 2 && g.dim() == 2, "switchyard.grouped_mm_dgrad_activation: dc [R, H], "
                    "b [E, H, F] and g [R, 2F] expected, got dc ", dc.sizes(), " b ", b.sizes(), " g ", g.sizes());
        at::Tensor dg = at::empty_like(g), h = at::empty({g.size(0), b.size(2)}, g.options());
        const Workspace ws = workspace_like(b, grouped_gemm_grad_workspace_size(sy_device(b), dtype_of(b), b.size(0),
                                                                                b.size(1), b.size(2), dc.size(0)));
        grouped_gemm_dgrad_activation(activation_of(act), ref(dc), ref(b), ref(off), ref(g), ref(dg), ref(h), ws.ptr,
                                      ws.bytes, stream_of(b), interleaved);
        return std::make_tuple(dg, h);
    });
}

// db [E, N, K] = dc^T . a per expert (experts without rows written as 0); E = offsets.numel() - 1.
at::Tensor grouped_mm_wgrad_op(const at::Tensor& dc_in, const at::Tensor& a_in, const at::Tensor& offsets_in) {
    return guarded([&] {
        const at::Tensor a = a_in.contiguous(), off = offsets_in.contiguous();
        const at::Tensor dc = dc_in.to(a.scalar_type()).contiguous();
        TORCH_CHECK(a.dim() == 2 && dc.dim() == 2 && off.numel() >= 2, "switchyard.grouped_mm_wgrad: dc [R, N], "
                    "a [R, K] and offsets [E+1] expected, got dc ", dc.sizes(), " a ", a.sizes());
        const int64_t num_experts = off.numel() - 1;
        at::Tensor db = at::empty({num_experts, dc.size(1), a.size(1)}, a.options());
        const Workspace ws = workspace_like(a, grouped_gemm_grad_workspace_size(sy_device(a), dtype_of(a),
                                                                                num_experts, dc.size(1), a.size(1),
                                                                                dc.size(0)));
        grouped_gemm_wgrad(ref(dc), ref(a), ref(off), ref(db), ws.ptr, ws.bytes, stream_of(a));
        return db;
    });
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_op(const at::Tensor& dc, const at::Tensor& a,
                                                          const at::Tensor& b, const at::Tensor& offsets) {
    return std::make_tuple(grouped_mm_dgrad_op(dc, b, offsets), grouped_mm_wgrad_op(dc, a, offsets));
}

at::Tensor activation_op(const at::Tensor& g_in, int64_t act, bool interleaved) {
    return guarded([&] {
        const at::Tensor g = g_in.contiguous();
        const Activation a = activation_of(act);
        TORCH_CHECK(g.dim() == 2 && (!is_gated(a) || g.size(1) % 2 == 0), "switchyard.activation: g must be [R, 2F] "
                    "(gated) or [R, F], got ", g.sizes());
        at::Tensor h = at::empty({g.size(0), is_gated(a) ? g.size(1) / 2 : g.size(1)}, g.options());
        activation(a, ref(g), ref(h), TensorRef(), stream_of(g), interleaved);
        return h;
    });
}

at::Tensor activation_backward_op(const at::Tensor& g_in, const at::Tensor& dh_in, int64_t act, bool interleaved) {
    return guarded([&] {
        const at::Tensor g = g_in.contiguous(), dh = dh_in.to(g.scalar_type()).contiguous();
        at::Tensor dg = at::empty_like(g);
        activation_backward(activation_of(act), ref(g), ref(dh), ref(dg), stream_of(g), interleaved);
        return dg;
    });
}

// Routing weights as combine takes them: fp32, or fp64 on the CPU.
at::Tensor combine_weights(const at::Tensor& w) {
    if (w.is_cpu() && w.scalar_type() == at::kDouble) return w.contiguous();
    return w.to(at::kFloat).contiguous();
}

// num_rows: not read by the forward; the backward's hint (stages.h, combine_backward), saved by the autograd formula.
at::Tensor combine_op(const at::Tensor& out_in, const at::Tensor& slot_row_in, const at::Tensor& w_in,
                      const c10::optional<at::Tensor>& shared, const c10::optional<at::Tensor>& /*num_rows*/) {
    return guarded([&] {
        const at::Tensor out = out_in.contiguous(), sr = slot_row_in.contiguous(), w = combine_weights(w_in);
        TORCH_CHECK(out.dim() == 2 && sr.dim() == 2, "switchyard.combine: expert_out [R, H] and slot_row [T, k] "
                    "expected, got ", out.sizes(), " and ", sr.sizes());
        at::Tensor s;
        if (shared.has_value() && shared->defined()) s = shared->to(out.scalar_type()).contiguous();
        at::Tensor y = at::empty({sr.size(0), out.size(1)}, out.options());
        combine(ref(out), ref(sr), ref(w), ref_or_none(s), ref(y), stream_of(out));
        return y;
    });
}

std::tuple<at::Tensor, at::Tensor> combine_backward_op(const at::Tensor& dy_in, const at::Tensor& out_in,
                                                       const at::Tensor& slot_row_in, const at::Tensor& w_in,
                                                       const c10::optional<at::Tensor>& num_rows) {
    return guarded([&] {
        const at::Tensor out = out_in.contiguous(), sr = slot_row_in.contiguous(), w = combine_weights(w_in);
        const at::Tensor dy = dy_in.to(out.scalar_type()).contiguous();
        TORCH_CHECK(out.dim() == 2 && sr.dim() == 2, "switchyard.combine_backward: expert_out [R, H] and slot_row "
                    "[T, k] expected, got ", out.sizes(), " and ", sr.sizes());
        at::Tensor d_out = at::empty_like(out);  // rows no pair points at are written as 0
        at::Tensor d_w = at::empty({sr.size(0), sr.size(1)}, w.options());
        at::Tensor nr;
        if (num_rows.has_value() && num_rows->defined()) nr = num_rows->contiguous();
        combine_backward(ref(dy), ref(out), ref(sr), ref(w), ref(d_out), ref(d_w), stream_of(out), ref_or_none(nr));
        return std::make_tuple(d_out, d_w.to(w_in.scalar_type()));
    });
}

// The layer of the whole-layer ops (moe_fused, moe_forward) from the module's tensors: its config (routing, sizes,
// activation, dtype of x, shared expert) and weight views; `hold` keeps the contiguous copies alive.
struct LayerArgs {
    MoEConfig cfg;
    MoEWeights w;
    std::vector<at::Tensor> hold;
};
LayerArgs layer_args(const char* op, const at::Tensor& x, const at::Tensor& gate_in,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& w13_in, const at::Tensor& w2_in,
                     const c10::optional<at::Tensor>& shared_w13, const c10::optional<at::Tensor>& shared_w2,
                     const c10::optional<at::Tensor>& shared_gate, int64_t top_k, int64_t score_function,
                     bool renormalize, double routed_scale, int64_t num_groups, int64_t topk_groups,
                     int64_t activation) {
    LayerArgs a;
    auto keep = [&](const at::Tensor& t) {
        a.hold.push_back(t.contiguous());
        return ref(a.hold.back());
    };
    TORCH_CHECK(x.dim() == 2 && gate_in.dim() == 2 && w13_in.dim() == 3 && w2_in.dim() == 3, "switchyard.", op,
                ": x [T, H], gate [E, H], w13 [E, R13, H], w2 [E, H, F] expected");
    const bool use_bias = bias.has_value() && bias->defined();
    a.cfg = router_config(gate_in.size(0), top_k, score_function, renormalize, routed_scale, num_groups, topk_groups,
                          use_bias);
    a.cfg.hidden_size = x.size(1);
    a.cfg.ffn_size = w2_in.size(2);
    a.cfg.activation = activation_of(activation);
    a.cfg.dtype = dtype_of(x);
    a.w.gate = keep(gate_in);
    a.w.w13 = keep(w13_in);
    a.w.w2 = keep(w2_in);
    if (use_bias) a.w.score_bias = keep(bias->to(x.device(), at::kFloat));
    if (shared_w13.has_value() && shared_w13->defined()) {
        TORCH_CHECK(shared_w2.has_value() && shared_w2->defined(), "switchyard.", op, ": shared_w13 without shared_w2");
        a.w.shared_w13 = keep(*shared_w13);
        a.w.shared_w2 = keep(*shared_w2);
        a.cfg.num_shared_experts = 1;
        a.cfg.shared_ffn_size = shared_w2->size(1);
        if (shared_gate.has_value() && shared_gate->defined()) {
            a.w.shared_gate = keep(*shared_gate);
            a.cfg.shared_expert_gate = true;
        }
    }
    return a;
}

// The fused small-batch path (route_fused + experts_fused): the whole layer for inference in one op (w13 in either
// layout: gate_up_interleaved).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_fused_op(
    const at::Tensor& x_in, const at::Tensor& gate_in, const c10::optional<at::Tensor>& bias,
    const at::Tensor& w13_in, const at::Tensor& w2_in, const c10::optional<at::Tensor>& shared_w13,
    const c10::optional<at::Tensor>& shared_w2, const c10::optional<at::Tensor>& shared_gate, int64_t top_k,
    int64_t score_function, bool renormalize, double routed_scale, int64_t num_groups, int64_t topk_groups,
    int64_t activation, bool gate_up_interleaved) {
    return guarded([&] {
        const at::Tensor x = x_in.contiguous();
        LayerArgs a = layer_args("moe_fused", x, gate_in, bias, w13_in, w2_in, shared_w13, shared_w2,
                                       shared_gate, top_k, score_function, renormalize, routed_scale, num_groups,
                                       topk_groups, activation);
        a.cfg.gate_up_interleaved = gate_up_interleaved;
        const MoEConfig& cfg = a.cfg;
        const int64_t T = x.size(0), E = cfg.num_experts, R = T * top_k;
        const auto i32 = x.options().dtype(at::kInt), f32 = x.options().dtype(at::kFloat);
        at::Tensor logits = at::empty({T, E}, f32), ids = at::empty({T, top_k}, i32), w = at::empty({T, top_k}, f32);
        at::Tensor counts = at::empty({E}, i32), offsets = at::empty({E + 1}, i32), slot_row = at::empty({T, top_k}, i32);
        at::Tensor row_token = at::empty({R}, i32), row_slot = at::empty({R}, i32), y = at::empty_like(x);
        at::Tensor sgl = cfg.shared_expert_gate ? at::empty({T, 1}, f32) : at::Tensor();
        RoutingPlan plan;
        plan.expert_counts = ref(counts);
        plan.expert_offsets = ref(offsets);
        plan.slot_row = ref(slot_row);
        plan.row_token = ref_or_none(row_token);
        plan.row_slot = ref_or_none(row_slot);
        const Device dev = sy_device(x);
        Workspace ws = workspace_like(x, std::max(route_fused_workspace_size(cfg, dev, T),
                                                  experts_fused_workspace_size(cfg, dev, T)));
        if (T > 0) {
            route_fused(cfg, ref(x), a.w.gate, a.w.score_bias, a.w.shared_gate, ref(logits), ref(ids), ref(w), plan,
                        ref_or_none(sgl), ws.ptr, ws.bytes, stream_of(x));
            experts_fused(cfg, ref(x), a.w, plan, ref(w), ref_or_none(sgl), ref(y), ws.ptr, ws.bytes, stream_of(x));
        }
        return std::make_tuple(y, logits, ids, counts);
    });
}

// The staged forward of the library's MoELayer (moe_layer.h: router .. combine, the fused small-batch path off) for
// inference in one op: one host call for the chain instead of one per stage, its workspace in one allocation.
// capacity_factor / min_capacity / drop_policy as MoEConfig; gate_up_interleaved: w13 in the interleaved layout
// (MoEConfig::gate_up_interleaved: GEMM1 with the activation in its epilogue where the backend has it);
// gather_in_gemm1: MoELayer::set_gather_in_gemm1 (GEMM1 reads x's rows through the plan where it is gated): -1 the
// automatic choice (stages.h: gather_in_gemm1_preferred), 0 off, 1 on.
// Returns y, logits [T, E] fp32, ids [T, k], expert counts [E] (before drops) and the plan's offsets [E+1].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_forward_op(
    const at::Tensor& x_in, const at::Tensor& gate_in, const c10::optional<at::Tensor>& bias,
    const at::Tensor& w13_in, const at::Tensor& w2_in, const c10::optional<at::Tensor>& shared_w13,
    const c10::optional<at::Tensor>& shared_w2, const c10::optional<at::Tensor>& shared_gate, int64_t top_k,
    int64_t score_function, bool renormalize, double routed_scale, int64_t num_groups, int64_t topk_groups,
    int64_t activation, double capacity_factor, int64_t min_capacity, int64_t drop_policy, bool gate_up_interleaved,
    int64_t gather_in_gemm1) {
    return guarded([&] {
        const at::Tensor x = x_in.contiguous();
        LayerArgs a = layer_args("moe_forward", x, gate_in, bias, w13_in, w2_in, shared_w13, shared_w2, shared_gate,
                                 top_k, score_function, renormalize, routed_scale, num_groups, topk_groups,
                                 activation);
        TORCH_CHECK(drop_policy == 0 || drop_policy == 1, "switchyard.moe_forward: drop_policy=", drop_policy,
                    " (0 position, 1 probability)");
        a.cfg.capacity_factor = capacity_factor;
        a.cfg.min_capacity = min_capacity;
        a.cfg.drop_policy = static_cast<DropPolicy>(drop_policy);
        a.cfg.gate_up_interleaved = gate_up_interleaved;
        MoELayer layer(a.cfg, a.w);
        layer.set_fused_max_tokens(0);
        TORCH_CHECK(gather_in_gemm1 >= -1 && gather_in_gemm1 <= 1, "switchyard.moe_forward: gather_in_gemm1=",
                    gather_in_gemm1, " (-1 automatic, 0 off, 1 on)");
        layer.set_gather_in_gemm1(gather_in_gemm1 < 0    ? GatherInGemm1::kAuto
                                  : gather_in_gemm1 == 0 ? GatherInGemm1::kOff
                                                         : GatherInGemm1::kOn);
        const int64_t T = x.size(0), E = a.cfg.num_experts;
        const auto i32 = x.options().dtype(at::kInt);
        at::Tensor y = at::empty_like(x), logits = at::empty({T, E}, x.options().dtype(at::kFloat));
        at::Tensor ids = at::empty({T, top_k}, i32), counts = at::empty({E}, i32), offsets = at::empty({E + 1}, i32);
        ForwardOutputs out;
        out.logits = ref(logits);
        out.topk_ids = ref(ids);
        out.expert_counts = ref(counts);
        out.expert_offsets = ref(offsets);
        Workspace ws = workspace_like(x, layer.workspace_size(T));
        layer.forward(ref(x), ref(y), ws.ptr, ws.bytes, stream_of(x), &out);
        return std::make_tuple(y, logits, ids, counts, offsets);
    });
}

// The layer shape the fused-path queries need (the routing options do not change them).
MoEConfig fused_query_config(int64_t hidden, int64_t ffn, int64_t num_experts, int64_t top_k, int64_t shared_width,
                             const at::Tensor& like) {
    MoEConfig c;
    std::tie(c.hidden_size, c.ffn_size, c.num_experts, c.top_k) = std::make_tuple(hidden, ffn, num_experts, top_k);
    c.num_shared_experts = shared_width > 0 ? 1 : 0;
    c.shared_ffn_size = shared_width;
    c.dtype = like.scalar_type() == at::kBFloat16 ? DType::kBF16 : like.scalar_type() == at::kHalf ? DType::kF16
                                                                                                   : DType::kF32;
    return c;
}

// Whether the fused op's CUDA kernels take this layer (stages.h: fused_path_supported), for the Python module.
bool fused_path_supported_op(int64_t num_tokens, int64_t hidden, int64_t ffn, int64_t num_experts, int64_t top_k,
                             int64_t shared_width, const at::Tensor& like) {
    return fused_path_supported(fused_query_config(hidden, ffn, num_experts, top_k, shared_width, like),
                                sy_device(like), num_tokens);
}

// The automatic choice (stages.h: fused_path_preferred), for the Python module's fused_max_tokens=None.
bool fused_path_preferred_op(int64_t num_tokens, int64_t hidden, int64_t ffn, int64_t num_experts, int64_t top_k,
                             int64_t shared_width, int64_t activation, const at::Tensor& like) {
    MoEConfig c = fused_query_config(hidden, ffn, num_experts, top_k, shared_width, like);
    c.activation = static_cast<Activation>(activation);
    return fused_path_preferred(c, sy_device(like), num_tokens);
}

// The automatic choice of GEMM1's gathered A loads (stages.h: gather_in_gemm1_preferred) for an interleaved w13 and
// token choice, for the Python module's gather_in_gemm1=None.
bool gather_in_gemm1_preferred_op(int64_t num_tokens, int64_t hidden, int64_t ffn, int64_t num_experts, int64_t top_k,
                                  const at::Tensor& like) {
    MoEConfig c = fused_query_config(hidden, ffn, num_experts, top_k, 0, like);
    c.gate_up_interleaved = true;
    return gather_in_gemm1_preferred(c, sy_device(like), num_tokens);
}

}  // namespace

#ifndef SWITCHYARD_TORCH_CUDA
cudaStream_t stream_of(const at::Tensor& t) {
    TORCH_CHECK(!t.is_cuda(), "switchyard: this binding was built without CUDA");
    return nullptr;
}
#endif

}  // namespace torch_ops
}  // namespace switchyard

TORCH_LIBRARY(switchyard, m) {
    m.def("route(Tensor logits, Tensor? bias, int top_k, int score_function, bool renormalize, float routed_scale, "
          "int num_groups, int topk_groups) -> (Tensor, Tensor)");
    m.def("route_backward(Tensor logits, Tensor topk_ids, Tensor d_weights, int score_function, bool renormalize, "
          "float routed_scale) -> Tensor");
    m.def("router_losses(Tensor logits, Tensor topk_ids, int score_function) -> Tensor");
    m.def("router_losses_backward(Tensor logits, Tensor topk_ids, Tensor d_losses, int score_function) -> Tensor");
    m.def("plan(Tensor topk_ids, Tensor topk_weights, int num_experts, float capacity_factor, int min_capacity, "
          "int drop_policy) -> (Tensor, Tensor, Tensor, Tensor)");
    m.def("router_gemm(Tensor x, Tensor gate) -> Tensor");
    m.def("router_gemm_backward(Tensor x, Tensor gate, Tensor d_logits, bool need_dx, bool need_dgate) "
          "-> (Tensor, Tensor)");
    m.def("gather(Tensor x, Tensor row_token, Tensor? slot_row=None) -> Tensor");
    m.def("gather_backward(Tensor d_xp, Tensor slot_row) -> Tensor");
    m.def("grouped_mm(Tensor a, Tensor b, Tensor offsets, Tensor? row_index=None) -> Tensor");
    m.def("grouped_mm_backward(Tensor dc, Tensor a, Tensor b, Tensor offsets) -> (Tensor, Tensor)");
    m.def("grouped_mm_dgrad(Tensor dc, Tensor b, Tensor offsets) -> Tensor");
    m.def("grouped_mm_dgrad_activation(Tensor dc, Tensor b, Tensor offsets, Tensor g, int activation, "
          "bool interleaved=False) -> (Tensor, Tensor)");
    m.def("grouped_mm_wgrad(Tensor dc, Tensor a, Tensor offsets) -> Tensor");
    m.def("grouped_mm_fp8(Tensor a, Tensor b, Tensor b_scale, Tensor? input_scale, Tensor? offsets, int mode) "
          "-> Tensor");
    m.def("grouped_mm_gated(Tensor a, Tensor w13i, Tensor offsets, int activation, Tensor? row_index=None) -> Tensor");
    m.def("grouped_mm_gated_keep(Tensor a, Tensor w13i, Tensor offsets, int activation) -> (Tensor, Tensor)");
    m.def("interleave_gate_up(Tensor w13, bool inverse) -> Tensor");
    m.def("activation(Tensor g, int activation, bool interleaved=False) -> Tensor");
    m.def("activation_backward(Tensor g, Tensor dh, int activation, bool interleaved=False) -> Tensor");
    m.def("combine(Tensor expert_out, Tensor slot_row, Tensor weights, Tensor? shared, Tensor? num_rows=None) -> "
          "Tensor");
    m.def("combine_backward(Tensor dy, Tensor expert_out, Tensor slot_row, Tensor weights, Tensor? num_rows=None) -> "
          "(Tensor, Tensor)");
    m.def("moe_fused(Tensor x, Tensor gate, Tensor? bias, Tensor w13, Tensor w2, Tensor? shared_w13, "
          "Tensor? shared_w2, Tensor? shared_gate, int top_k, int score_function, bool renormalize, "
          "float routed_scale, int num_groups, int topk_groups, int activation, bool gate_up_interleaved=False) -> "
          "(Tensor, Tensor, Tensor, Tensor)");
    m.def("moe_forward(Tensor x, Tensor gate, Tensor? bias, Tensor w13, Tensor w2, Tensor? shared_w13, "
          "Tensor? shared_w2, Tensor? shared_gate, int top_k, int score_function, bool renormalize, "
          "float routed_scale, int num_groups, int topk_groups, int activation, float capacity_factor, "
          "int min_capacity, int drop_policy, bool gate_up_interleaved, int gather_in_gemm1=-1) -> "
          "(Tensor, Tensor, Tensor, Tensor, Tensor)");
    m.def("fused_path_supported(int num_tokens, int hidden, int ffn, int num_experts, int top_k, int shared_width, "
          "Tensor like) -> bool");
    m.def("fused_path_preferred(int num_tokens, int hidden, int ffn, int num_experts, int top_k, int shared_width, "
          "int activation, Tensor like) -> bool");
    m.def("gather_in_gemm1_preferred(int num_tokens, int hidden, int ffn, int num_experts, int top_k, Tensor like) "
          "-> bool");
}

// One implementation per op serves both devices: the stage function runs the backend of the tensors' device.
#define SWITCHYARD_TORCH_IMPLS(m)                                             \
    using namespace switchyard::torch_ops;                                    \
    m.impl("route", &route_op);                                               \
    m.impl("route_backward", &route_backward_op);                             \
    m.impl("router_losses", &router_losses_op);                               \
    m.impl("router_losses_backward", &router_losses_backward_op);             \
    m.impl("plan", &plan_op);                                                 \
    m.impl("router_gemm", &router_gemm_op);                                   \
    m.impl("router_gemm_backward", &router_gemm_backward_op);                 \
    m.impl("gather", &gather_op);                                             \
    m.impl("gather_backward", &gather_backward_op);                           \
    m.impl("grouped_mm", &grouped_mm_op);                                     \
    m.impl("grouped_mm_backward", &grouped_mm_backward_op);                   \
    m.impl("grouped_mm_dgrad", &grouped_mm_dgrad_op);                         \
    m.impl("grouped_mm_dgrad_activation", &grouped_mm_dgrad_activation_op);   \
    m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_op);                         \
    m.impl("grouped_mm_fp8", &grouped_mm_fp8_op);                             \
    m.impl("grouped_mm_gated", &grouped_mm_gated_op);                         \
    m.impl("grouped_mm_gated_keep", &grouped_mm_gated_keep_op);               \
    m.impl("interleave_gate_up", &interleave_gate_up_op);                     \
    m.impl("activation", &activation_op);                                     \
    m.impl("activation_backward", &activation_backward_op);                   \
    m.impl("combine", &combine_op);                                           \
    m.impl("combine_backward", &combine_backward_op);                         \
    m.impl("moe_fused", &moe_fused_op);                                       \
    m.impl("moe_forward", &moe_forward_op);                                   \
    m.impl("fused_path_supported", &fused_path_supported_op);                 \
    m.impl("fused_path_preferred", &fused_path_preferred_op);                 \
    m.impl("gather_in_gemm1_preferred", &gather_in_gemm1_preferred_op)

TORCH_LIBRARY_IMPL(switchyard, CPU, m) { SWITCHYARD_TORCH_IMPLS(m); }
#ifdef SWITCHYARD_TORCH_CUDA
TORCH_LIBRARY_IMPL(switchyard, CUDA, m) { SWITCHYARD_TORCH_IMPLS(m); }
#endif
