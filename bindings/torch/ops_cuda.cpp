// bindings/torch/ops_cuda.cpp: CUDA implementations of the `switchyard` torch ops (schemas in ops.cpp).
//
// Every op runs on the tensor's device and torch's current stream, allocates its outputs (and any workspace) with
// the caching allocator, and never synchronises with the host, so forward and backward capture in CUDA graphs.
// Kernels: route_topk (router.cu), build_plan (plan.cu), permute_rows (permute.cu), grouped_gemm (grouped_gemm.h),
// activation_rows (activation.cu), combine_rows (combine.cu), and the backward kernels of src/cuda/backward/backward.h.
// Router losses: router_losses (balance.h) forward, router_losses_backward (backward.h) for the gradient.
// GEMM gradients: grouped_gemm_dgrad (input gradient, B read N-major) and grouped_gemm_wgrad (weight gradient,
// per-expert reduction over the expert's rows) of grouped_gemm.h, every dtype, device-side offsets, no host sync.
// dtypes: activations fp32 / bf16 / fp16; logits and routing weights fp32; ids and plan arrays int32.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/backward/backward.h"
#include "cuda/routing/balance.h"
#include "cuda/gemm/grouped_gemm.h"
#include "cuda/moe_stages.h"
#include "ops.h"
#include "switchyard/error.h"

namespace switchyard {
namespace torch_ops {
namespace {

template <typename F>
auto guarded(F&& f) -> decltype(f()) {
    try {
        return f();
    } catch (const Error& e) {
        TORCH_CHECK(false, "switchyard: ", e.what());
    }
}

DType dtype_of(const at::Tensor& t, const char* name) {
    switch (t.scalar_type()) {
        case at::kFloat: return DType::kF32;
        case at::kBFloat16: return DType::kBF16;
        case at::kHalf: return DType::kF16;
        default: TORCH_CHECK(false, "switchyard: ", name, " must be fp32, bf16 or fp16 on CUDA, got ", t.scalar_type());
    }
}

void check_cuda(const at::Tensor& t, const char* name, at::ScalarType want = at::ScalarType::Undefined) {
    TORCH_CHECK(t.is_cuda() && t.is_contiguous(), "switchyard: ", name, " must be a contiguous CUDA tensor");
    if (want != at::ScalarType::Undefined)
        TORCH_CHECK(t.scalar_type() == want, "switchyard: ", name, " must be ", want, ", got ", t.scalar_type());
}

cudaStream_t stream_of(const at::Tensor& t) { return at::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& logits_in, const c10::optional<at::Tensor>& bias,
                                              int64_t top_k, int64_t score_function, bool renormalize,
                                              double routed_scale, int64_t num_groups, int64_t topk_groups) {
    return guarded([&] {
        const at::Tensor logits = logits_in.contiguous();
        check_cuda(logits, "logits", at::kFloat);
        c10::cuda::CUDAGuard guard(logits.device());
        const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
        const bool use_bias = bias.has_value() && bias->defined();
        const MoEConfig cfg = router_config(num_experts, top_k, score_function, renormalize, routed_scale,
                                            num_groups, topk_groups, use_bias);
        cfg.validate();
        at::Tensor b;
        if (use_bias) {
            b = bias->to(at::kFloat).contiguous();
            check_cuda(b, "score_bias", at::kFloat);
        }
        at::Tensor ids = at::empty({num_tokens, top_k}, logits.options().dtype(at::kInt));
        at::Tensor w = at::empty({num_tokens, top_k}, logits.options());
        if (num_tokens > 0)
            cuda::route_topk(cfg, logits.data_ptr<float>(), use_bias ? b.data_ptr<float>() : nullptr, num_tokens,
                             ids.data_ptr<int32_t>(), w.data_ptr<float>(), nullptr, nullptr, stream_of(logits));
        return std::make_tuple(ids, w);
    });
}

at::Tensor route_backward_cuda(const at::Tensor& logits_in, const at::Tensor& ids_in, const at::Tensor& dw_in,
                               int64_t score_function, bool renormalize, double routed_scale) {
    return guarded([&] {
        const at::Tensor logits = logits_in.contiguous(), ids = ids_in.contiguous();
        const at::Tensor dw = dw_in.to(at::kFloat).contiguous();
        check_cuda(logits, "logits", at::kFloat);
        check_cuda(ids, "topk_ids", at::kInt);
        c10::cuda::CUDAGuard guard(logits.device());
        const MoEConfig cfg = router_config(logits.size(1), ids.size(1), score_function, renormalize, routed_scale, 1,
                                            1, false);
        at::Tensor dl = at::empty_like(logits);
        cuda::route_backward(cfg, logits.data_ptr<float>(), ids.data_ptr<int32_t>(), dw.data_ptr<float>(),
                             logits.size(0), dl.data_ptr<float>(), stream_of(logits));
        return dl;
    });
}

// logits [T, E] fp32 and topk_ids [T, k] int32 on one device.
void check_logits_ids(const at::Tensor& logits, const at::Tensor& ids) {
    check_cuda(logits, "logits", at::kFloat);
    check_cuda(ids, "topk_ids", at::kInt);
    TORCH_CHECK(logits.dim() == 2 && ids.dim() == 2 && ids.size(0) == logits.size(0) &&
                    logits.device() == ids.device(),
                "switchyard: logits [T, E] and topk_ids [T, k] on one device expected, got logits ", logits.sizes(),
                " on ", logits.device(), " and topk_ids ", ids.sizes(), " on ", ids.device());
}

// {aux, z} fp32 [2]: the balance kernels' router_losses (fixed summation order, double accumulation, no host sync).
at::Tensor router_losses_cuda(const at::Tensor& logits_in, const at::Tensor& ids_in, int64_t score_function) {
    return guarded([&] {
        const at::Tensor logits = logits_in.contiguous(), ids = ids_in.contiguous();
        check_logits_ids(logits, ids);
        c10::cuda::CUDAGuard guard(logits.device());
        const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
        const MoEConfig cfg = router_config(num_experts, ids.size(1), score_function, false, 1.0, 1, 1, false);
        const size_t ws_bytes = cuda::router_losses_workspace_size(num_tokens, num_experts, 1);
        at::Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(ws_bytes, 1))}, logits.options().dtype(at::kByte));
        at::Tensor losses = at::empty({3}, logits.options());
        cuda::router_losses(cfg, logits.data_ptr<float>(), ids.data_ptr<int32_t>(), num_tokens, nullptr, 0,
                            losses.data_ptr<float>(), nullptr, ws.data_ptr(), ws_bytes, stream_of(logits));
        return losses.narrow(0, 0, 2).clone();
    });
}

at::Tensor router_losses_backward_cuda(const at::Tensor& logits_in, const at::Tensor& ids_in,
                                       const at::Tensor& d_losses_in, int64_t score_function) {
    return guarded([&] {
        const at::Tensor logits = logits_in.contiguous(), ids = ids_in.contiguous();
        const at::Tensor d_losses = d_losses_in.to(at::kFloat).contiguous();
        check_logits_ids(logits, ids);
        check_cuda(d_losses, "d_losses", at::kFloat);
        TORCH_CHECK(d_losses.numel() == 2, "switchyard: d_losses must have 2 elements, got ", d_losses.numel());
        c10::cuda::CUDAGuard guard(logits.device());
        const int64_t num_experts = logits.size(1);
        const MoEConfig cfg = router_config(num_experts, ids.size(1), score_function, false, 1.0, 1, 1, false);
        const size_t ws_bytes = cuda::router_losses_backward_workspace_size(num_experts);
        at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
        at::Tensor dl = at::empty_like(logits);
        cuda::router_losses_backward(cfg, logits.data_ptr<float>(), ids.data_ptr<int32_t>(), logits.size(0),
                                     d_losses.data_ptr<float>(), dl.data_ptr<float>(), ws.data_ptr(), ws_bytes,
                                     stream_of(logits));
        return dl;
    });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_cuda(const at::Tensor& ids_in,
                                                                     const at::Tensor& w_in, int64_t num_experts,
                                                                     double capacity_factor, int64_t min_capacity,
                                                                     int64_t drop_policy) {
    return guarded([&] {
        const at::Tensor ids = ids_in.contiguous(), w = w_in.to(at::kFloat).contiguous();
        check_cuda(ids, "topk_ids", at::kInt);
        c10::cuda::CUDAGuard guard(ids.device());
        const int64_t num_tokens = ids.size(0), k = ids.size(1);
        MoEConfig cfg = router_config(num_experts, k, 0, false, 1.0, 1, 1, false);
        cfg.capacity_factor = capacity_factor;
        cfg.min_capacity = min_capacity;
        SWITCHYARD_CHECK(drop_policy == 0 || drop_policy == 1, "drop_policy=", drop_policy);
        const auto opt = ids.options();
        at::Tensor offsets = at::empty({num_experts + 1}, opt), slot_row = at::empty({num_tokens, k}, opt);
        at::Tensor row_token = at::empty({num_tokens * k}, opt), row_slot = at::empty({num_tokens * k}, opt);
        at::Tensor counts = at::empty({num_experts}, opt);
        cuda::PlanArgs a;
        a.num_tokens = num_tokens;
        a.top_k = k;
        a.num_experts = num_experts;
        a.capacity = cfg.capacity(num_tokens);
        a.drop_policy = static_cast<DropPolicy>(drop_policy);
        a.topk_ids = ids.data_ptr<int32_t>();
        a.topk_weights = w.data_ptr<float>();
        a.expert_counts = counts.data_ptr<int32_t>();
        a.expert_offsets = offsets.data_ptr<int32_t>();
        a.slot_row = slot_row.data_ptr<int32_t>();
        a.row_token = row_token.data_ptr<int32_t>();
        a.row_slot = row_slot.data_ptr<int32_t>();
        const size_t ws_bytes = cuda::plan_workspace_size(num_tokens, k, num_experts);
        at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes) + 256}, opt.dtype(at::kByte));
        cuda::build_plan(a, ws.data_ptr(), ws_bytes, stream_of(ids));
        return std::make_tuple(offsets, slot_row, row_token, counts);
    });
}

at::Tensor gather_cuda(const at::Tensor& x_in, const at::Tensor& row_token_in) {
    return guarded([&] {
        const at::Tensor x = x_in.contiguous(), rt = row_token_in.contiguous();
        check_cuda(rt, "row_token", at::kInt);
        c10::cuda::CUDAGuard guard(x.device());
        const int64_t rows = rt.numel(), hidden = x.size(1);
        at::Tensor xp = at::empty({rows, hidden}, x.options());  // rows past offsets[E] are written as 0
        cuda::permute_rows(dtype_of(x, "x"), x.data_ptr(), rt.data_ptr<int32_t>(), rows, hidden, xp.data_ptr(),
                           stream_of(x), /*zero_unowned=*/true);
        return xp;
    });
}

at::Tensor gather_backward_cuda(const at::Tensor& d_xp_in, const at::Tensor& slot_row_in) {
    return guarded([&] {
        const at::Tensor g = d_xp_in.contiguous(), sr = slot_row_in.contiguous();
        check_cuda(sr, "slot_row", at::kInt);
        c10::cuda::CUDAGuard guard(g.device());
        at::Tensor dx = at::empty({sr.size(0), g.size(1)}, g.options());
        cuda::gather_backward_rows(dtype_of(g, "d_xp"), g.data_ptr(), sr.data_ptr<int32_t>(), sr.size(0), sr.size(1),
                                   g.size(1), dx.data_ptr(), stream_of(g));
        return dx;
    });
}

at::Tensor grouped_mm_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& offsets_in) {
    return guarded([&] {
        const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), off = offsets_in.contiguous();
        check_cuda(off, "offsets", at::kInt);
        TORCH_CHECK(a.dim() == 2 && b.dim() == 3 && a.size(1) == b.size(2) && a.scalar_type() == b.scalar_type(),
                    "switchyard.grouped_mm: a [R, K] and b [E, N, K] of one dtype expected, got a ", a.sizes(), " b ",
                    b.sizes());
        TORCH_CHECK(off.numel() == b.size(0) + 1, "switchyard.grouped_mm: offsets must have E+1 elements");
        c10::cuda::CUDAGuard guard(a.device());
        at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options());  // rows past offsets[E]: zeroed below
        cuda::GroupedGemmArgs g;
        g.a = a.data_ptr();
        g.b = b.data_ptr();
        g.c = c.data_ptr();
        g.dtype = dtype_of(a, "a");
        g.num_groups = b.size(0);
        g.n = b.size(1);
        g.k = b.size(2);
        g.max_rows = a.size(0);
        g.offsets = off.data_ptr<int32_t>();
        SWITCHYARD_CHECK(cuda::grouped_gemm_supported(g), "grouped_mm: unsupported sizes N=", g.n, " K=", g.k,
                         " for dtype ", to_string(g.dtype), " (16-bit types need N and K multiples of 8)");
        if (a.size(0) == 0) return c;
        const size_t ws_bytes = cuda::grouped_gemm_workspace_size(g);
        at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes) + 256}, a.options().dtype(at::kByte));
        cuda::grouped_gemm(g, ws.data_ptr(), ws_bytes, stream_of(a));
        cuda::zero_rows_past_groups(g.c, g.dtype, g.offsets, g.num_groups, g.n, g.max_rows, stream_of(a));
        return c;
    });
}

// da [R, K]: da[r] = dc[r] . b[e] for the rows of expert e, 0 for rows past offsets[E];
// db [E, N, K]: db[e] = dc_e^T . a_e over the expert's rows (0 for an expert without rows).
// Gradient arguments for E groups of [rows_e, N] x [N, K]; the caller sets the operand pointers it needs.
cuda::GroupedGemmGradArgs grad_args(const at::Tensor& dc, const at::Tensor& off, int64_t num_experts, int64_t n,
                                    int64_t k) {
    check_cuda(off, "offsets", at::kInt);
    TORCH_CHECK(off.numel() == num_experts + 1, "switchyard.grouped_mm gradient: offsets must have E+1=",
                num_experts + 1, " elements, got ", off.numel());
    TORCH_CHECK(dc.dim() == 2 && dc.size(1) == n, "switchyard.grouped_mm gradient: dc must be [R, ", n, "], got ",
                dc.sizes());
    cuda::GroupedGemmGradArgs g;
    g.dc = dc.data_ptr();
    g.dtype = dtype_of(dc, "dc");
    g.num_groups = num_experts;
    g.n = n;
    g.k = k;
    g.max_rows = dc.size(0);
    g.offsets = off.data_ptr<int32_t>();
    SWITCHYARD_CHECK(cuda::grouped_gemm_grad_supported(g), "grouped_mm gradient: unsupported sizes E=", g.num_groups,
                     " N=", g.n, " K=", g.k, " for dtype ", to_string(g.dtype),
                     " (16-bit types need N and K multiples of 8)");
    return g;
}

// Runs one gradient GEMM (cuda::grouped_gemm_dgrad or _wgrad) on `like`'s stream with a workspace from the caching
// allocator.
void run_grad(void (*gemm)(const cuda::GroupedGemmGradArgs&, void*, size_t, cudaStream_t),
              const cuda::GroupedGemmGradArgs& g, const at::Tensor& like) {
    const size_t bytes = cuda::grouped_gemm_grad_workspace_size(g);
    at::Tensor ws = at::empty({static_cast<int64_t>(bytes) + 256}, like.options().dtype(at::kByte));
    gemm(g, ws.data_ptr(), bytes, stream_of(like));
}

// da [R, K] = dc . b per expert (rows past offsets[E] written as 0).
at::Tensor grouped_mm_dgrad_cuda(const at::Tensor& dc_in, const at::Tensor& b_in, const at::Tensor& offsets_in) {
    return guarded([&] {
        const at::Tensor b = b_in.contiguous(), off = offsets_in.contiguous();
        const at::Tensor dc = dc_in.to(b.scalar_type()).contiguous();
        check_cuda(b, "b");
        check_cuda(dc, "dc");
        TORCH_CHECK(b.dim() == 3 && b.device() == dc.device() && b.device() == off.device(),
                    "switchyard.grouped_mm_dgrad: b [E, N, K] on the device of dc and offsets expected, got ",
                    b.sizes(), " on ", b.device());
        c10::cuda::CUDAGuard guard(b.device());
        cuda::GroupedGemmGradArgs g = grad_args(dc, off, b.size(0), b.size(1), b.size(2));
        at::Tensor da = at::empty({dc.size(0), b.size(2)}, b.options());
        g.b = b.data_ptr();
        g.da = da.data_ptr();
        run_grad(&cuda::grouped_gemm_dgrad, g, b);
        return da;
    });
}

// db [E, N, K] = dc^T . a per expert (experts without rows written as 0); E = offsets.numel() - 1.
at::Tensor grouped_mm_wgrad_cuda(const at::Tensor& dc_in, const at::Tensor& a_in, const at::Tensor& offsets_in) {
    return guarded([&] {
        const at::Tensor a = a_in.contiguous(), off = offsets_in.contiguous();
        const at::Tensor dc = dc_in.to(a.scalar_type()).contiguous();
        check_cuda(a, "a");
        check_cuda(dc, "dc");
        TORCH_CHECK(a.dim() == 2 && a.size(0) == dc.size(0) && a.device() == dc.device() && a.device() == off.device(),
                    "switchyard.grouped_mm_wgrad: a must be [R, K] with the rows of dc, on their device, got a ",
                    a.sizes(), " on ", a.device(), ", dc ", dc.sizes());
        c10::cuda::CUDAGuard guard(a.device());
        const int64_t num_experts = off.numel() - 1;
        cuda::GroupedGemmGradArgs g = grad_args(dc, off, num_experts, dc.size(1), a.size(1));
        at::Tensor db = at::empty({num_experts, dc.size(1), a.size(1)}, a.options());
        g.a = a.data_ptr();
        g.db = db.data_ptr();
        run_grad(&cuda::grouped_gemm_wgrad, g, a);
        return db;
    });
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cuda(const at::Tensor& dc, const at::Tensor& a,
                                                            const at::Tensor& b, const at::Tensor& offsets) {
    TORCH_CHECK(a.dim() == 2 && b.dim() == 3 && a.size(1) == b.size(2) && a.scalar_type() == b.scalar_type(),
                "switchyard.grouped_mm_backward: a [R, K] and b [E, N, K] of one dtype expected, got a ", a.sizes(),
                " b ", b.sizes());
    return std::make_tuple(grouped_mm_dgrad_cuda(dc, b, offsets), grouped_mm_wgrad_cuda(dc, a, offsets));
}

int64_t ffn_of(const at::Tensor& g, int64_t act) {
    TORCH_CHECK(act >= 0 && act <= 3, "switchyard.activation: activation=", act);
    return is_gated(static_cast<Activation>(act)) ? g.size(1) / 2 : g.size(1);
}

at::Tensor activation_cuda(const at::Tensor& g_in, int64_t act) {
    return guarded([&] {
        const at::Tensor g = g_in.contiguous();
        c10::cuda::CUDAGuard guard(g.device());
        const int64_t ffn = ffn_of(g, act);
        at::Tensor h = at::empty({g.size(0), ffn}, g.options());
        cuda::activation_rows(static_cast<Activation>(act), dtype_of(g, "g"), g.data_ptr(), g.size(0), nullptr, ffn,
                              h.data_ptr(), stream_of(g));
        return h;
    });
}

at::Tensor activation_backward_cuda(const at::Tensor& g_in, const at::Tensor& dh_in, int64_t act) {
    return guarded([&] {
        const at::Tensor g = g_in.contiguous(), dh = dh_in.to(g.scalar_type()).contiguous();
        c10::cuda::CUDAGuard guard(g.device());
        at::Tensor dg = at::empty_like(g);
        cuda::activation_backward_rows(static_cast<Activation>(act), dtype_of(g, "g"), g.data_ptr(), dh.data_ptr(),
                                       g.size(0), ffn_of(g, act), dg.data_ptr(), stream_of(g));
        return dg;
    });
}

at::Tensor combine_cuda(const at::Tensor& out_in, const at::Tensor& slot_row_in, const at::Tensor& w_in,
                        const c10::optional<at::Tensor>& shared) {
    return guarded([&] {
        const at::Tensor out = out_in.contiguous(), sr = slot_row_in.contiguous(), w = w_in.contiguous();
        check_cuda(sr, "slot_row", at::kInt);
        check_cuda(w, "weights", at::kFloat);
        c10::cuda::CUDAGuard guard(out.device());
        at::Tensor s;
        if (shared.has_value() && shared->defined()) s = shared->to(out.scalar_type()).contiguous();
        at::Tensor y = at::empty({sr.size(0), out.size(1)}, out.options());
        cuda::combine_rows(dtype_of(out, "expert_out"), out.data_ptr(), sr.data_ptr<int32_t>(), w.data_ptr<float>(),
                           s.defined() ? s.data_ptr() : nullptr, sr.size(0), sr.size(1), out.size(1), y.data_ptr(),
                           stream_of(out));
        return y;
    });
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cuda(const at::Tensor& dy_in, const at::Tensor& out_in,
                                                         const at::Tensor& slot_row_in, const at::Tensor& w_in) {
    return guarded([&] {
        const at::Tensor out = out_in.contiguous(), sr = slot_row_in.contiguous(), w = w_in.contiguous();
        const at::Tensor dy = dy_in.to(out.scalar_type()).contiguous();
        check_cuda(w, "weights", at::kFloat);
        c10::cuda::CUDAGuard guard(out.device());
        at::Tensor d_out = at::zeros_like(out);  // rows no pair points at get zero gradient
        at::Tensor d_w = at::empty({sr.size(0), sr.size(1)}, w.options());
        cuda::combine_backward_rows(dtype_of(out, "expert_out"), dy.data_ptr(), out.data_ptr(),
                                    sr.data_ptr<int32_t>(), w.data_ptr<float>(), sr.size(0), sr.size(1), out.size(1),
                                    d_out.data_ptr(), d_w.data_ptr<float>(), stream_of(out));
        return std::make_tuple(d_out, d_w);
    });
}

}  // namespace
}  // namespace torch_ops
}  // namespace switchyard

TORCH_LIBRARY_IMPL(switchyard, CUDA, m) {
    using namespace switchyard::torch_ops;
    m.impl("route", &route_cuda);
    m.impl("route_backward", &route_backward_cuda);
    m.impl("router_losses", &router_losses_cuda);
    m.impl("router_losses_backward", &router_losses_backward_cuda);
    m.impl("plan", &plan_cuda);
    m.impl("gather", &gather_cuda);
    m.impl("gather_backward", &gather_backward_cuda);
    m.impl("grouped_mm", &grouped_mm_cuda);
    m.impl("grouped_mm_backward", &grouped_mm_backward_cuda);
    m.impl("grouped_mm_dgrad", &grouped_mm_dgrad_cuda);
    m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cuda);
    m.impl("activation", &activation_cuda);
    m.impl("activation_backward", &activation_backward_cuda);
    m.impl("combine", &combine_cuda);
    m.impl("combine_backward", &combine_backward_cuda);
}
