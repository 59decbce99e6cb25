// bindings/torch/ops.cpp: schemas of the `switchyard` torch ops and their CPU implementations.
//
// CPU tensors of fp32, fp64 (and bf16 / fp16) run the CPU reference stages of src/ref/backward.h: inputs are read
// as double, every sum runs in double in a fixed order, outputs are stored in the input's dtype. fp64 in gives the
// exact double result, which is what torch.autograd.gradcheck needs. Selection (top-k, groups, bias, capacity)
// uses ref::route / ref::build_plan on the logits rounded to fp32, exactly as the inference path selects.
// Layouts: row-major contiguous (inputs are made contiguous); ids, slot_row, row_token, offsets, counts int32.
#include "ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "ref/backward.h"
#include "ref/ref.h"
#include "switchyard/error.h"

namespace switchyard {
namespace torch_ops {

MoEConfig router_config(int64_t num_experts, int64_t top_k, int64_t score_function, bool renormalize,
                        double routed_scale, int64_t num_groups, int64_t topk_groups, bool use_bias) {
    SWITCHYARD_CHECK(score_function >= 0 && score_function <= 2, "score_function=", score_function,
                     " (0 softmax, 1 topk-softmax, 2 sigmoid)");
    MoEConfig c;
    c.hidden_size = 1;
    c.ffn_size = 1;
    c.num_experts = num_experts;
    c.top_k = top_k;
    c.score_function = static_cast<ScoreFunction>(score_function);
    c.renormalize = renormalize;
    c.routed_scale = routed_scale;
    c.num_groups = num_groups;
    c.topk_groups = topk_groups;
    c.use_score_bias = use_bias;
    return c;
}

namespace {

// Contiguous double copy of a tensor (on the CPU).
at::Tensor as_f64(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }
at::Tensor as_i32(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kInt, "switchyard: ", name, " must be int32, got ", t.scalar_type());
    return t.contiguous();
}
const double* dp(const at::Tensor& t) { return t.data_ptr<double>(); }
double* dpm(at::Tensor& t) { return t.data_ptr<double>(); }
const int32_t* ip(const at::Tensor& t) { return t.data_ptr<int32_t>(); }

// Converts a switchyard::Error into a torch error (so Python sees RuntimeError with the message).
template <typename F>
auto guarded(F&& f) -> decltype(f()) {
    try {
        return f();
    } catch (const Error& e) {
        TORCH_CHECK(false, "switchyard: ", e.what());
    }
}

std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& bias,
                                             int64_t top_k, int64_t score_function, bool renormalize,
                                             double routed_scale, int64_t num_groups, int64_t topk_groups) {
    return guarded([&] {
        TORCH_CHECK(logits.dim() == 2, "switchyard.route: logits must be [T, E], got ", logits.sizes());
        const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
        const bool use_bias = bias.has_value() && bias->defined();
        const MoEConfig cfg = router_config(num_experts, top_k, score_function, renormalize, routed_scale,
                                            num_groups, topk_groups, use_bias);
        cfg.validate();
        const at::Tensor l32 = logits.to(at::kFloat).contiguous();
        std::vector<float> lv(l32.data_ptr<float>(), l32.data_ptr<float>() + l32.numel());
        std::vector<float> bv;
        if (use_bias) {
            const at::Tensor b = bias->to(at::kFloat).contiguous();
            TORCH_CHECK(b.numel() == num_experts, "switchyard.route: bias must have E=", num_experts, " elements");
            bv.assign(b.data_ptr<float>(), b.data_ptr<float>() + b.numel());
        }
        std::vector<int32_t> ids;
        std::vector<float> w;
        ref::route(cfg, lv, bv, num_tokens, ids, w);
        at::Tensor ids_t = at::empty({num_tokens, top_k}, logits.options().dtype(at::kInt));
        if (!ids.empty()) std::memcpy(ids_t.data_ptr<int32_t>(), ids.data(), ids.size() * sizeof(int32_t));
        at::Tensor wd = at::empty({num_tokens, top_k}, logits.options().dtype(at::kDouble));
        const at::Tensor l64 = as_f64(logits);
        ref::route_weights(cfg, dp(l64), ids_t.data_ptr<int32_t>(), num_tokens, dpm(wd));
        return std::make_tuple(ids_t, wd.to(logits.scalar_type()));
    });
}

at::Tensor route_backward_cpu(const at::Tensor& logits, const at::Tensor& topk_ids, const at::Tensor& d_weights,
                              int64_t score_function, bool renormalize, double routed_scale) {
    return guarded([&] {
        const int64_t num_tokens = logits.size(0), num_experts = logits.size(1), k = topk_ids.size(1);
        const MoEConfig cfg = router_config(num_experts, k, score_function, renormalize, routed_scale, 1, 1, false);
        const at::Tensor l = as_f64(logits), ids = as_i32(topk_ids, "topk_ids"), g = as_f64(d_weights);
        at::Tensor dl = at::empty({num_tokens, num_experts}, l.options());
        ref::route_backward(cfg, dp(l), ip(ids), dp(g), num_tokens, dpm(dl));
        return dl.to(logits.scalar_type());
    });
}

at::Tensor router_losses_cpu(const at::Tensor& logits, const at::Tensor& topk_ids, int64_t score_function) {
    return guarded([&] {
        const int64_t num_tokens = logits.size(0), num_experts = logits.size(1), k = topk_ids.size(1);
        const MoEConfig cfg = router_config(num_experts, k, score_function, false, 1.0, 1, 1, false);
        const at::Tensor l = as_f64(logits), ids = as_i32(topk_ids, "topk_ids");
        at::Tensor out = at::empty({2}, l.options());
        ref::router_losses(cfg, dp(l), ip(ids), num_tokens, dpm(out), dpm(out) + 1);
        return out.to(logits.scalar_type());
    });
}

at::Tensor router_losses_backward_cpu(const at::Tensor& logits, const at::Tensor& topk_ids,
                                      const at::Tensor& d_losses, int64_t score_function) {
    return guarded([&] {
        const int64_t num_tokens = logits.size(0), num_experts = logits.size(1), k = topk_ids.size(1);
        const MoEConfig cfg = router_config(num_experts, k, score_function, false, 1.0, 1, 1, false);
        const at::Tensor l = as_f64(logits), ids = as_i32(topk_ids, "topk_ids"), g = as_f64(d_losses);
        at::Tensor dl = at::zeros({num_tokens, num_experts}, l.options());
        ref::router_losses_backward(cfg, dp(l), ip(ids), num_tokens, dp(g)[0], dp(g)[1], dpm(dl));
        return dl.to(logits.scalar_type());
    });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_cpu(const at::Tensor& topk_ids,
                                                                    const at::Tensor& topk_weights,
                                                                    int64_t num_experts, double capacity_factor,
                                                                    int64_t min_capacity, int64_t drop_policy) {
    return guarded([&] {
        const int64_t num_tokens = topk_ids.size(0), k = topk_ids.size(1);
        MoEConfig cfg = router_config(num_experts, k, 0, false, 1.0, 1, 1, false);
        cfg.capacity_factor = capacity_factor;
        cfg.min_capacity = min_capacity;
        SWITCHYARD_CHECK(drop_policy == 0 || drop_policy == 1, "drop_policy=", drop_policy,
                         " (0 position, 1 probability)");
        cfg.drop_policy = static_cast<DropPolicy>(drop_policy);
        const at::Tensor ids = as_i32(topk_ids, "topk_ids");
        const at::Tensor w = topk_weights.to(at::kFloat).contiguous();
        std::vector<int32_t> iv(ip(ids), ip(ids) + ids.numel());
        std::vector<float> wv(w.data_ptr<float>(), w.data_ptr<float>() + w.numel());
        const ref::HostPlan p = ref::build_plan(cfg, num_tokens, iv, wv);
        const auto opt = topk_ids.options().dtype(at::kInt);
        at::Tensor offsets = at::empty({num_experts + 1}, opt), slot_row = at::empty({num_tokens, k}, opt);
        at::Tensor row_token = at::empty({num_tokens * k}, opt), counts = at::empty({num_experts}, opt);
        auto copy = [](at::Tensor& dst, const std::vector<int32_t>& src) {
            if (!src.empty()) std::memcpy(dst.data_ptr<int32_t>(), src.data(), src.size() * sizeof(int32_t));
        };
        copy(offsets, p.expert_offsets);
        copy(slot_row, p.slot_row);
        copy(row_token, p.row_token);
        copy(counts, p.expert_counts);
        return std::make_tuple(offsets, slot_row, row_token, counts);
    });
}

at::Tensor gather_cpu(const at::Tensor& x, const at::Tensor& row_token) {
    return guarded([&] {
        TORCH_CHECK(x.dim() == 2, "switchyard.gather: x must be [T, H], got ", x.sizes());
        const int64_t rows = row_token.numel(), hidden = x.size(1);
        const at::Tensor xd = as_f64(x), rt = as_i32(row_token, "row_token");
        for (int64_t r = 0; r < rows; ++r)
            TORCH_CHECK(ip(rt)[r] < x.size(0), "switchyard.gather: row_token[", r, "]=", ip(rt)[r], " >= T");
        at::Tensor xp = at::empty({rows, hidden}, xd.options());
        ref::gather_forward(dp(xd), ip(rt), rows, hidden, dpm(xp));
        return xp.to(x.scalar_type());
    });
}

at::Tensor gather_backward_cpu(const at::Tensor& d_xp, const at::Tensor& slot_row) {
    return guarded([&] {
        const int64_t num_tokens = slot_row.size(0), k = slot_row.size(1), hidden = d_xp.size(1);
        const at::Tensor g = as_f64(d_xp), sr = as_i32(slot_row, "slot_row");
        at::Tensor dx = at::empty({num_tokens, hidden}, g.options());
        ref::gather_backward(ip(sr), dp(g), num_tokens, k, hidden, dpm(dx));
        return dx.to(d_xp.scalar_type());
    });
}

void check_grouped(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
    TORCH_CHECK(a.dim() == 2 && b.dim() == 3 && a.size(1) == b.size(2), "switchyard.grouped_mm: a [R, K] and b [E, N, K]"
                " expected, got a ", a.sizes(), " b ", b.sizes());
    TORCH_CHECK(offsets.numel() == b.size(0) + 1, "switchyard.grouped_mm: offsets must have E+1=", b.size(0) + 1,
                " elements, got ", offsets.numel());
}

at::Tensor grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
    return guarded([&] {
        check_grouped(a, b, offsets);
        const int64_t rows = a.size(0), n = b.size(1), k = b.size(2), num_experts = b.size(0);
        const at::Tensor ad = as_f64(a), bd = as_f64(b), off = as_i32(offsets, "offsets");
        at::Tensor c = at::empty({rows, n}, ad.options());
        ref::grouped_gemm_forward(ip(off), num_experts, dp(ad), dp(bd), rows, n, k, dpm(c));
        return c.to(a.scalar_type());
    });
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cpu(const at::Tensor& dc, const at::Tensor& a,
                                                           const at::Tensor& b, const at::Tensor& offsets) {
    return guarded([&] {
        check_grouped(a, b, offsets);
        const int64_t rows = a.size(0), n = b.size(1), k = b.size(2), num_experts = b.size(0);
        const at::Tensor ad = as_f64(a), bd = as_f64(b), g = as_f64(dc), off = as_i32(offsets, "offsets");
        at::Tensor da = at::empty({rows, k}, ad.options()), db = at::empty({num_experts, n, k}, ad.options());
        ref::grouped_gemm_backward(ip(off), num_experts, dp(ad), dp(bd), dp(g), rows, n, k, dpm(da), dpm(db));
        return std::make_tuple(da.to(a.scalar_type()), db.to(b.scalar_type()));
    });
}

// The two halves of grouped_mm_backward as separate ops, so that a backward can free one operand before it
// allocates the other gradient (python/switchyard/torch.py orders them to lower the peak memory).
at::Tensor grouped_mm_dgrad_cpu(const at::Tensor& dc, const at::Tensor& b, const at::Tensor& offsets) {
    return guarded([&] {
        TORCH_CHECK(dc.dim() == 2 && b.dim() == 3 && dc.size(1) == b.size(1), "switchyard.grouped_mm_dgrad: dc [R, N] "
                    "and b [E, N, K] expected, got dc ", dc.sizes(), " b ", b.sizes());
        TORCH_CHECK(offsets.numel() == b.size(0) + 1, "switchyard.grouped_mm_dgrad: offsets must have E+1 elements");
        const int64_t rows = dc.size(0), n = b.size(1), k = b.size(2), num_experts = b.size(0);
        const at::Tensor bd = as_f64(b), g = as_f64(dc), off = as_i32(offsets, "offsets");
        at::Tensor da = at::empty({rows, k}, bd.options());
        ref::grouped_gemm_backward(ip(off), num_experts, nullptr, dp(bd), dp(g), rows, n, k, dpm(da), nullptr);
        return da.to(b.scalar_type());
    });
}

at::Tensor grouped_mm_wgrad_cpu(const at::Tensor& dc, const at::Tensor& a, const at::Tensor& offsets) {
    return guarded([&] {
        TORCH_CHECK(dc.dim() == 2 && a.dim() == 2 && dc.size(0) == a.size(0), "switchyard.grouped_mm_wgrad: dc [R, N] "
                    "and a [R, K] expected, got dc ", dc.sizes(), " a ", a.sizes());
        TORCH_CHECK(offsets.numel() >= 1, "switchyard.grouped_mm_wgrad: offsets must have E+1 elements");
        const int64_t rows = a.size(0), n = dc.size(1), k = a.size(1), num_experts = offsets.numel() - 1;
        const at::Tensor ad = as_f64(a), g = as_f64(dc), off = as_i32(offsets, "offsets");
        at::Tensor db = at::empty({num_experts, n, k}, ad.options());
        ref::grouped_gemm_backward(ip(off), num_experts, dp(ad), nullptr, dp(g), rows, n, k, nullptr, dpm(db));
        return db.to(a.scalar_type());
    });
}

int64_t ffn_of(const at::Tensor& g, int64_t act) {
    TORCH_CHECK(act >= 0 && act <= 3, "switchyard.activation: activation=", act, " (0 swiglu, 1 geglu, 2 gelu, 3 relu)");
    const bool gated = is_gated(static_cast<Activation>(act));
    TORCH_CHECK(g.dim() == 2 && (!gated || g.size(1) % 2 == 0), "switchyard.activation: g must be [R, 2F] (gated) or"
                " [R, F], got ", g.sizes());
    return gated ? g.size(1) / 2 : g.size(1);
}

at::Tensor activation_cpu(const at::Tensor& g, int64_t act) {
    return guarded([&] {
        const int64_t ffn = ffn_of(g, act), rows = g.size(0);
        const at::Tensor gd = as_f64(g);
        at::Tensor h = at::empty({rows, ffn}, gd.options());
        ref::activation_forward(static_cast<Activation>(act), dp(gd), rows, ffn, dpm(h));
        return h.to(g.scalar_type());
    });
}

at::Tensor activation_backward_cpu(const at::Tensor& g, const at::Tensor& dh, int64_t act) {
    return guarded([&] {
        const int64_t ffn = ffn_of(g, act), rows = g.size(0);
        const at::Tensor gd = as_f64(g), d = as_f64(dh);
        at::Tensor dg = at::empty_like(gd);
        ref::activation_backward(static_cast<Activation>(act), dp(gd), dp(d), rows, ffn, dpm(dg));
        return dg.to(g.scalar_type());
    });
}

at::Tensor combine_cpu(const at::Tensor& expert_out, const at::Tensor& slot_row, const at::Tensor& weights,
                       const c10::optional<at::Tensor>& shared) {
    return guarded([&] {
        const int64_t num_tokens = slot_row.size(0), k = slot_row.size(1), hidden = expert_out.size(1);
        const at::Tensor o = as_f64(expert_out), sr = as_i32(slot_row, "slot_row"), w = as_f64(weights);
        for (int64_t i = 0; i < sr.numel(); ++i)
            TORCH_CHECK(ip(sr)[i] < expert_out.size(0), "switchyard.combine: slot_row[", i, "] out of range");
        at::Tensor s;
        if (shared.has_value() && shared->defined()) s = as_f64(*shared);
        at::Tensor y = at::empty({num_tokens, hidden}, o.options());
        ref::combine_forward(ip(sr), dp(w), dp(o), s.defined() ? dp(s) : nullptr, num_tokens, k, hidden, dpm(y));
        return y.to(expert_out.scalar_type());
    });
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cpu(const at::Tensor& dy, const at::Tensor& expert_out,
                                                        const at::Tensor& slot_row, const at::Tensor& weights) {
    return guarded([&] {
        const int64_t num_tokens = slot_row.size(0), k = slot_row.size(1), hidden = expert_out.size(1);
        const int64_t rows = expert_out.size(0);
        const at::Tensor o = as_f64(expert_out), sr = as_i32(slot_row, "slot_row"), w = as_f64(weights);
        const at::Tensor g = as_f64(dy);
        at::Tensor d_out = at::empty({rows, hidden}, o.options()), d_w = at::empty({num_tokens, k}, o.options());
        ref::combine_backward(ip(sr), dp(w), dp(o), dp(g), num_tokens, k, hidden, rows, dpm(d_out), dpm(d_w));
        return std::make_tuple(d_out.to(expert_out.scalar_type()), d_w.to(weights.scalar_type()));
    });
}

}  // namespace
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
    m.def("gather(Tensor x, Tensor row_token) -> Tensor");
    m.def("gather_backward(Tensor d_xp, Tensor slot_row) -> Tensor");
    m.def("grouped_mm(Tensor a, Tensor b, Tensor offsets) -> Tensor");
    m.def("grouped_mm_backward(Tensor dc, Tensor a, Tensor b, Tensor offsets) -> (Tensor, Tensor)");
    m.def("grouped_mm_dgrad(Tensor dc, Tensor b, Tensor offsets) -> Tensor");
    m.def("grouped_mm_wgrad(Tensor dc, Tensor a, Tensor offsets) -> Tensor");
    m.def("activation(Tensor g, int activation) -> Tensor");
    m.def("activation_backward(Tensor g, Tensor dh, int activation) -> Tensor");
    m.def("combine(Tensor expert_out, Tensor slot_row, Tensor weights, Tensor? shared) -> Tensor");
    m.def("combine_backward(Tensor dy, Tensor expert_out, Tensor slot_row, Tensor weights) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(switchyard, CPU, m) {
    using namespace switchyard::torch_ops;
    m.impl("route", &route_cpu);
    m.impl("route_backward", &route_backward_cpu);
    m.impl("router_losses", &router_losses_cpu);
    m.impl("router_losses_backward", &router_losses_backward_cpu);
    m.impl("plan", &plan_cpu);
    m.impl("gather", &gather_cpu);
    m.impl("gather_backward", &gather_backward_cpu);
    m.impl("grouped_mm", &grouped_mm_cpu);
    m.impl("grouped_mm_backward", &grouped_mm_backward_cpu);
    m.impl("grouped_mm_dgrad", &grouped_mm_dgrad_cpu);
    m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cpu);
    m.impl("activation", &activation_cpu);
    m.impl("activation_backward", &activation_backward_cpu);
    m.impl("combine", &combine_cpu);
    m.impl("combine_backward", &combine_backward_cpu);
}
