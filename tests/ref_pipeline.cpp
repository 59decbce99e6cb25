// tests/ref_pipeline.cpp: the whole layer on the CPU written as one monolithic function (one expert MLP call per
// expert), the pre-stage-API form of the CPU forward kept as a test oracle: MoELayer's CPU forward (a chain of the
// public stages) must equal it bitwise, and tests/test_moe_ref.cpp checks it against a per-token implementation.
//
// Stages (T tokens, H hidden, E experts, k slots; every stored value rounded as listed):
//   1. logits [T, E] fp32      router_logits (double sums of x . gate^T, rounded once to fp32)
//   2. ids/weights [T, k]      route (routing.h rules; weights fp32)
//   3. plan                    build_plan (counts, capacity and drop policy, offsets, rows in token order)
//      (expert-choice routing replaces 2 and 3 by route_expert_choice: ids/weights/slot_row [T, E])
//   4. experts                 for each expert with kept rows: gather its rows of x, expert_mlp
//   5. shared expert           one MLP of width S on all T rows
//   6. y [T, H] cfg.dtype      combine: slots j = 0..k-1 in double, then + shared, rounded once
#include <cstring>
#include <utility>
#include <vector>

#include "ref/ref.h"
#include "switchyard/error.h"
#include "test_util.h"

namespace switchyard {
namespace test {
using namespace ref;

namespace {

void check_host_out(const TensorRef& t, DType dtype, int64_t d0, int64_t d1, const char* name) {
    SWITCHYARD_CHECK(t.device == Device::kCPU, name, " is on ", to_string(t.device), ", expected cpu");
    SWITCHYARD_CHECK(t.dtype == dtype, name, " dtype=", to_string(t.dtype), ", expected ", to_string(dtype));
    SWITCHYARD_CHECK(t.rank == 2 && t.shape[0] == d0 && t.shape[1] == d1, name, " shape=", t.shape_string(),
                     ", expected [", d0, ", ", d1, "]");
    SWITCHYARD_CHECK(t.is_contiguous(), name, " must be contiguous");
    SWITCHYARD_CHECK(t.data != nullptr || d0 * d1 == 0, name, " has null data");
}

// The reference may be called directly (tests, tools): cheap checks that the weight covers what is read.
void check_host_weight(const TensorRef& t, int64_t numel, const char* name) {
    SWITCHYARD_CHECK(t.defined() && t.numel() == numel, name, " shape=", t.shape_string(), " must hold ", numel,
                     " elements");
    SWITCHYARD_CHECK(t.device == Device::kCPU && t.is_contiguous() && t.data != nullptr, name,
                     " must be a contiguous cpu tensor");
    SWITCHYARD_CHECK(t.dtype == DType::kF32 || t.dtype == DType::kBF16 || t.dtype == DType::kF16, name,
                     " dtype=", to_string(t.dtype), " must be fp32, bf16 or fp16");
}

MatView expert_view(const TensorRef& t, int64_t e, int64_t rows, int64_t cols) {
    const char* base = static_cast<const char*>(t.data);
    return MatView{base + static_cast<size_t>(e * rows * cols) * dtype_size(t.dtype), t.dtype, rows, cols};
}

}  // namespace

void ref_moe_forward(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, const TensorRef& y, ForwardOutputs* out,
                 HostPlan* plan_out) {
    const int64_t hidden = cfg.hidden_size, ffn = cfg.ffn_size, num_experts = cfg.num_experts;
    SWITCHYARD_CHECK(x.rank == 2 && x.shape[1] == hidden, "x shape=", x.shape_string(), ", expected [T, ", hidden, "]");
    const int64_t num_tokens = x.shape[0];
    check_host_out(x, cfg.dtype, num_tokens, hidden, "x");
    check_host_out(y, cfg.dtype, num_tokens, hidden, "y");

    check_host_weight(w.w13, num_experts * cfg.w13_rows() * hidden, "w13");
    check_host_weight(w.w2, num_experts * hidden * ffn, "w2");
    if (cfg.num_shared_experts > 0) {
        check_host_weight(w.shared_w13, (is_gated(cfg.activation) ? 2 : 1) * cfg.shared_width() * hidden, "shared_w13");
        check_host_weight(w.shared_w2, hidden * cfg.shared_width(), "shared_w2");
    }
    const std::vector<float> xf = to_float(x);
    const std::vector<float> gate = to_float(w.gate);
    SWITCHYARD_CHECK(static_cast<int64_t>(gate.size()) == num_experts * hidden, "gate shape=", w.gate.shape_string(),
                     ", expected [", num_experts, ", ", hidden, "]");
    const std::vector<float> logits = router_logits(xf, gate, num_tokens, hidden, num_experts);
    std::vector<float> bias;
    if (cfg.use_score_bias) bias = to_float(w.score_bias);
    std::vector<int32_t> ids;
    std::vector<float> weights;
    HostPlan plan;
    if (cfg.expert_choice()) {  // expert choice: [T, E] slots (balance.cpp), same experts / combine path
        plan = route_expert_choice(cfg, logits, num_tokens);
        ids = plan.topk_ids;
        weights = plan.topk_weights;
    } else {
        route(cfg, logits, bias, num_tokens, ids, weights);
        plan = build_plan(cfg, num_tokens, ids, weights);
    }
    const int64_t slots = cfg.route_slots();  // k, or E under expert choice

    // Routed experts: rows in expert order, each expert's block computed by one expert_mlp call.
    const int64_t r13 = cfg.w13_rows();
    std::vector<float> expert_out(static_cast<size_t>(plan.num_rows() * hidden));
    std::vector<float> gathered;
    for (int64_t e = 0; e < num_experts; ++e) {
        const int64_t begin = plan.expert_offsets[e], rows = plan.expert_offsets[e + 1] - begin;
        if (rows == 0) continue;
        gathered.resize(static_cast<size_t>(rows * hidden));
        for (int64_t r = 0; r < rows; ++r)
            std::memcpy(gathered.data() + r * hidden,
                        xf.data() + static_cast<int64_t>(plan.row_token[begin + r]) * hidden,
                        static_cast<size_t>(hidden) * sizeof(float));
        expert_mlp(cfg.activation, cfg.dtype, gathered.data(), rows, hidden, ffn, expert_view(w.w13, e, r13, hidden),
                   expert_view(w.w2, e, hidden, ffn), expert_out.data() + begin * hidden);
    }

    std::vector<float> shared;
    if (cfg.num_shared_experts > 0 && num_tokens > 0) {
        const int64_t width = cfg.shared_width();
        const int64_t shared_rows = is_gated(cfg.activation) ? 2 * width : width;
        shared.resize(static_cast<size_t>(num_tokens * hidden));
        expert_mlp(cfg.activation, cfg.dtype, xf.data(), num_tokens, hidden, width,
                   expert_view(w.shared_w13, 0, shared_rows, hidden), expert_view(w.shared_w2, 0, hidden, width),
                   shared.data());
    }

    std::vector<float> yf(static_cast<size_t>(num_tokens * hidden));
    combine(plan, expert_out, shared.empty() ? nullptr : shared.data(), hidden, cfg.dtype, yf.data());
    if (cfg.dtype == DType::kF32) {
        if (!yf.empty()) std::memcpy(y.data, yf.data(), yf.size() * sizeof(float));
    } else {
        for (int64_t i = 0; i < num_tokens * hidden; ++i) store_from_float(y.data, cfg.dtype, i, yf[i]);
    }

    if (out != nullptr) {
        if (out->logits.defined()) {
            check_host_out(out->logits, DType::kF32, num_tokens, num_experts, "logits");
            if (!logits.empty()) std::memcpy(out->logits.data, logits.data(), logits.size() * sizeof(float));
        }
        if (out->topk_ids.defined()) {
            check_host_out(out->topk_ids, DType::kI32, num_tokens, slots, "topk_ids");
            if (!ids.empty()) std::memcpy(out->topk_ids.data, ids.data(), ids.size() * sizeof(int32_t));
        }
        if (out->topk_weights.defined()) {
            check_host_out(out->topk_weights, DType::kF32, num_tokens, slots, "topk_weights");
            if (!weights.empty()) std::memcpy(out->topk_weights.data, weights.data(), weights.size() * sizeof(float));
        }
        if (out->slot_row.defined()) {
            check_host_out(out->slot_row, DType::kI32, num_tokens, slots, "slot_row");
            if (!plan.slot_row.empty())
                std::memcpy(out->slot_row.data, plan.slot_row.data(), plan.slot_row.size() * sizeof(int32_t));
        }
        if (out->expert_counts.defined()) {
            const TensorRef& c = out->expert_counts;
            SWITCHYARD_CHECK(c.device == Device::kCPU && c.dtype == DType::kI32 && c.numel() == num_experts &&
                                 c.data != nullptr,
                             "expert_counts ", c.shape_string(), " must be [", num_experts, "] int32 on the cpu");
            std::memcpy(c.data, plan.expert_counts.data(), plan.expert_counts.size() * sizeof(int32_t));
        }
        if (out->stats != nullptr) {
            if (cfg.expert_choice()) {
                expert_choice_stats(cfg, logits, plan, *out->stats);
            } else {
                plan_stats(cfg, logits, plan, *out->stats);
            }
        }
    }
    if (plan_out != nullptr) *plan_out = std::move(plan);
}

}  // namespace test
}  // namespace switchyard
