// src/api/router.cpp: Router, the gate GEMM + scoring + top-k on its own (routing.h).
//
// Built on the public stages (switchyard/stages.h): router_gemm + route, and for statistics a dropless build_plan +
// load_stats. The workspace layout (RouterLayout) is computed once, for sizing and for the forward.
#include <memory>

#include "api/check.h"
#include "switchyard/error.h"
#include "switchyard/moe_layer.h"
#include "switchyard/routing.h"
#include "switchyard/stages.h"
#include "util/workspace.h"

namespace switchyard {
namespace {

// The router's scratch: logits (when the caller passes none), the gate GEMM's workspace, and the dropless plan and
// statistics scratch that LoadStats needs.
struct RouterLayout {
    float* logits;
    void* gemm_ws;
    size_t gemm_ws_bytes;
    int32_t* counts;
    int32_t* offsets;
    int32_t* slot_row;
    int32_t* row_token;
    int32_t* row_slot;
    void* plan_ws;
    size_t plan_ws_bytes;
    void* stats_ws;
    size_t stats_ws_bytes;
};

RouterLayout router_layout(const MoEConfig& cfg, Device dev, int64_t num_tokens, WorkspaceCarver& wc) {
    const int64_t T = num_tokens, E = cfg.num_experts, pairs = T * cfg.top_k;
    RouterLayout l{};
    l.logits = wc.take<float>(T * E);
    l.gemm_ws_bytes = router_gemm_workspace_size(dev);
    l.gemm_ws = wc.take_bytes(l.gemm_ws_bytes);
    l.counts = wc.take<int32_t>(E);
    l.offsets = wc.take<int32_t>(E + 1);
    l.slot_row = wc.take<int32_t>(pairs);
    l.row_token = wc.take<int32_t>(pairs);
    l.row_slot = wc.take<int32_t>(pairs);
    l.plan_ws_bytes = plan_workspace_size(cfg, dev, T);
    l.plan_ws = wc.take_bytes(l.plan_ws_bytes);
    l.stats_ws_bytes = load_stats_workspace_size(cfg, dev, T);
    l.stats_ws = wc.take_bytes(l.stats_ws_bytes);
    return l;
}

size_t router_bytes(const MoEConfig& cfg, Device dev, int64_t num_tokens) {
    WorkspaceCarver sizing;
    router_layout(cfg, dev, num_tokens, sizing);
    return sizing.used();
}

void check_router_output(const TensorRef& t, DType dtype, int64_t d0, int64_t d1, const char* name, Device dev) {
    api::check_tensor(t, name, dtype, {d0, d1});
    SWITCHYARD_CHECK(t.device == dev, name, " is on ", to_string(t.device), ", expected ", to_string(dev));
}

}  // namespace

Router::Router(const MoEConfig& cfg, const TensorRef& gate, const TensorRef& score_bias)
    : cfg_(cfg), gate_(gate), bias_(score_bias) {
    cfg_.validate();
    SWITCHYARD_CHECK(!cfg_.expert_choice(),
                     "Router: routing=expert-choice gives [T, E] routing arrays, not top-k ones; run it through MoELayer "
                     "(ForwardOutputs) instead");
    api::check_float_tensor(gate_, "gate", {cfg_.num_experts, cfg_.hidden_size});
    SWITCHYARD_CHECK(gate_.dtype != DType::kF64, "gate dtype=fp64: the router takes fp32, bf16 or fp16");
    SWITCHYARD_CHECK(gate_.data != nullptr, "gate has null data");
    if (cfg_.use_score_bias) {
        SWITCHYARD_CHECK(bias_.defined(), "score_bias is required when use_score_bias=true");
        api::check_tensor(bias_, "score_bias", DType::kF32, {cfg_.num_experts});
        api::check_same_device(bias_, "score_bias", gate_, "gate");
    } else {
        SWITCHYARD_CHECK(!bias_.defined(), "score_bias ", bias_.shape_string(), " given but use_score_bias=false");
    }
    api::check_backend(gate_.device, "Router gate");
}

size_t Router::workspace_size(int64_t num_tokens) const {
    SWITCHYARD_CHECK(num_tokens >= 0, "num_tokens=", num_tokens, " must be >= 0");
    return router_bytes(cfg_, gate_.device, num_tokens);
}

void Router::forward(const TensorRef& x, const TensorRef& topk_ids, const TensorRef& topk_weights,
                     const TensorRef& logits, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                     LoadStats* stats) const {
    const Device dev = gate_.device;
    validate_activation(cfg_, x, "x", dev);
    const int64_t num_tokens = x.shape[0];
    check_router_output(topk_ids, DType::kI32, num_tokens, cfg_.top_k, "topk_ids", dev);
    check_router_output(topk_weights, DType::kF32, num_tokens, cfg_.top_k, "topk_weights", dev);
    if (logits.defined()) check_router_output(logits, DType::kF32, num_tokens, cfg_.num_experts, "logits", dev);
    const size_t need = workspace_size(num_tokens);
    std::unique_ptr<char[]> host_scratch;
    if (dev == Device::kCPU && workspace == nullptr && need > 0) {  // CPU: scratch of our own when none is given
        host_scratch.reset(new char[need + kWorkspaceAlign]);
        workspace = reinterpret_cast<void*>(align_up(reinterpret_cast<uintptr_t>(host_scratch.get())));
        workspace_bytes = need;
    }
    api::check_workspace(workspace, workspace_bytes, need, "Router::forward");
    WorkspaceCarver wc(workspace, workspace_bytes);
    const RouterLayout l = router_layout(cfg_, dev, num_tokens, wc);
    const int64_t T = num_tokens, E = cfg_.num_experts, k = cfg_.top_k;
    auto view = [&](void* p, DType t, std::initializer_list<int64_t> dims) {
        return TensorRef(p, t, dims, dev, x.device_index);
    };
    const TensorRef lg = logits.defined() ? logits : view(l.logits, DType::kF32, {T, E});
    router_gemm(x, gate_, lg, l.gemm_ws, l.gemm_ws_bytes, stream);
    route(cfg_, lg, bias_, topk_ids, topk_weights, stream);
    if (stats == nullptr) return;
    // Statistics of the routing alone: a dropless plan gives the counts (nothing is dropped).
    MoEConfig dropless = cfg_;
    dropless.capacity_factor = 0.0;
    RoutingPlan plan;
    plan.expert_counts = view(l.counts, DType::kI32, {E});
    plan.expert_offsets = view(l.offsets, DType::kI32, {E + 1});
    plan.slot_row = view(l.slot_row, DType::kI32, {T, k});
    plan.row_token = view(l.row_token, DType::kI32, {T * k});
    plan.row_slot = view(l.row_slot, DType::kI32, {T * k});
    build_plan(dropless, topk_ids, topk_weights, plan, l.plan_ws, l.plan_ws_bytes, stream);
    load_stats(dropless, lg, topk_ids, plan, *stats, l.stats_ws, l.stats_ws_bytes, stream);
}

}  // namespace switchyard
