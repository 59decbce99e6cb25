// src/api/router.cpp: Router, the gate GEMM + scoring + top-k on its own (routing.h).
//
// CPU: ref::router_logits + ref::route (+ ref::router_stats); CUDA: cuda::router_forward. Validation here;
// the backends see only checked arguments.
#include <cstring>
#include <vector>

#include "ref/ref.h"
#include "switchyard/error.h"
#include "switchyard/moe_layer.h"
#include "switchyard/routing.h"

#ifdef SWITCHYARD_WITH_CUDA
#include "cuda/moe_cuda.h"
#endif

namespace switchyard {
namespace {

void check_router_output(const TensorRef& t, DType dtype, int64_t d0, int64_t d1, const char* name, Device dev) {
    SWITCHYARD_CHECK(t.defined(), name, " is required but undefined");
    SWITCHYARD_CHECK(t.dtype == dtype, name, " dtype=", to_string(t.dtype), ", expected ", to_string(dtype));
    SWITCHYARD_CHECK(t.rank == 2 && t.shape[0] == d0 && t.shape[1] == d1, name, " shape=", t.shape_string(),
                     ", expected [", d0, ", ", d1, "]");
    SWITCHYARD_CHECK(t.is_contiguous(), name, " must be contiguous");
    SWITCHYARD_CHECK(t.device == dev, name, " is on ", to_string(t.device), ", expected ", to_string(dev));
    SWITCHYARD_CHECK(t.data != nullptr || d0 * d1 == 0, name, " has null data");
}

}  // namespace

Router::Router(const MoEConfig& cfg, const TensorRef& gate, const TensorRef& score_bias)
    : cfg_(cfg), gate_(gate), bias_(score_bias) {
    cfg_.validate();
    SWITCHYARD_CHECK(!cfg_.expert_choice(),
                     "Router: routing=expert-choice gives [T, E] routing arrays, not top-k ones; run it through MoELayer "
                     "(ForwardOutputs) instead");
    SWITCHYARD_CHECK(gate_.defined(), "gate is required but undefined");
    SWITCHYARD_CHECK(gate_.dtype == DType::kF32 || gate_.dtype == DType::kBF16 || gate_.dtype == DType::kF16,
                     "gate dtype=", to_string(gate_.dtype), " must be fp32, bf16 or fp16");
    SWITCHYARD_CHECK(gate_.rank == 2 && gate_.shape[0] == cfg_.num_experts && gate_.shape[1] == cfg_.hidden_size,
                     "gate shape=", gate_.shape_string(), ", expected [", cfg_.num_experts, ", ", cfg_.hidden_size,
                     "]");
    SWITCHYARD_CHECK(gate_.is_contiguous(), "gate must be contiguous");
    SWITCHYARD_CHECK(gate_.data != nullptr, "gate has null data");
    if (cfg_.use_score_bias) {
        SWITCHYARD_CHECK(bias_.defined(), "score_bias is required when use_score_bias=true");
        SWITCHYARD_CHECK(bias_.dtype == DType::kF32, "score_bias dtype=", to_string(bias_.dtype), " must be fp32");
        SWITCHYARD_CHECK(bias_.rank == 1 && bias_.shape[0] == cfg_.num_experts,
                         "score_bias shape=", bias_.shape_string(), ", expected [", cfg_.num_experts, "]");
        SWITCHYARD_CHECK(bias_.device == gate_.device && bias_.device_index == gate_.device_index, "score_bias is on ",
                         to_string(bias_.device), ", gate on ", to_string(gate_.device));
        SWITCHYARD_CHECK(bias_.data != nullptr, "score_bias has null data");
    } else {
        SWITCHYARD_CHECK(!bias_.defined(), "score_bias ", bias_.shape_string(), " given but use_score_bias=false");
    }
#ifndef SWITCHYARD_WITH_CUDA
    SWITCHYARD_CHECK(gate_.device == Device::kCPU, "gate is on ", to_string(gate_.device),
                     " but this build has no CUDA backend (built without CUDA)");
#endif
}

size_t Router::workspace_size(int64_t num_tokens) const {
    SWITCHYARD_CHECK(num_tokens >= 0, "num_tokens=", num_tokens, " must be >= 0");
    if (gate_.device == Device::kCPU) return 0;
#ifdef SWITCHYARD_WITH_CUDA
    return cuda::router_workspace_size(cfg_, num_tokens);
#else
    SWITCHYARD_FAIL("device=", to_string(gate_.device), ": built without CUDA");
#endif
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
    if (need > 0) {
        SWITCHYARD_CHECK(workspace != nullptr, "workspace is null, ", need, " bytes needed");
        SWITCHYARD_CHECK(workspace_bytes >= need, "workspace_bytes=", workspace_bytes, " is less than the ", need,
                         " bytes needed for num_tokens=", num_tokens);
    }
    if (dev == Device::kCPU) {
        const std::vector<float> xf = ref::to_float(x);
        const std::vector<float> g = ref::to_float(gate_);
        const std::vector<float> l = ref::router_logits(xf, g, num_tokens, cfg_.hidden_size, cfg_.num_experts);
        std::vector<float> bias;
        if (cfg_.use_score_bias) bias = ref::to_float(bias_);
        std::vector<int32_t> ids;
        std::vector<float> weights;
        ref::route(cfg_, l, bias, num_tokens, ids, weights);
        if (!ids.empty()) {
            std::memcpy(topk_ids.data, ids.data(), ids.size() * sizeof(int32_t));
            std::memcpy(topk_weights.data, weights.data(), weights.size() * sizeof(float));
        }
        if (logits.defined() && !l.empty()) std::memcpy(logits.data, l.data(), l.size() * sizeof(float));
        if (stats != nullptr) ref::router_stats(cfg_, l, ids, num_tokens, *stats);
        return;
    }
#ifdef SWITCHYARD_WITH_CUDA
    cuda::router_forward(cfg_, gate_, bias_, x, topk_ids, topk_weights, logits, workspace, workspace_bytes, stream,
                         stats);
#else
    (void)workspace;
    (void)workspace_bytes;
    (void)stream;
    SWITCHYARD_FAIL("device=", to_string(dev), ": built without CUDA");
#endif
}

}  // namespace switchyard
