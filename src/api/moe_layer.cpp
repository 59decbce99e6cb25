// src/api/moe_layer.cpp: MoELayer, the validating front of both backends.
//
// The constructor checks the config and every weight (shape, dtype, device, contiguity); forward() checks the
// activations, the optional outputs and the workspace, then dispatches on the layer's device:
//   Device::kCPU  -> ref::moe_forward (the reference; workspace unused, workspace_size = 0)
//   Device::kCUDA -> cuda::moe_forward (only in a build with SWITCHYARD_WITH_CUDA; otherwise an Error)
#include "switchyard/moe_layer.h"

#include <cstdint>
#include <vector>

#include "ref/ref.h"
#include "switchyard/error.h"

#ifdef SWITCHYARD_WITH_CUDA
#include "cuda/moe_cuda.h"
#endif

namespace switchyard {
namespace {

bool is_float_type(DType t) { return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16; }

void check_shape(const TensorRef& t, std::initializer_list<int64_t> dims, const char* name) {
    bool ok = t.rank == static_cast<int>(dims.size());
    int d = 0;
    for (int64_t v : dims) {
        if (ok && t.shape[d] != v) ok = false;
        ++d;
    }
    if (!ok) {
        std::string want = "[";
        d = 0;
        for (int64_t v : dims) want += (d++ ? ", " : "") + std::to_string(v);
        SWITCHYARD_FAIL(name, " shape=", t.shape_string(), ", expected ", want, "]");
    }
}

// A weight: defined, float dtype, the given shape, contiguous, on dev, with data.
void check_weight(const TensorRef& t, std::initializer_list<int64_t> dims, const char* name, Device dev, int dev_idx) {
    SWITCHYARD_CHECK(t.defined(), name, " is required but undefined");
    SWITCHYARD_CHECK(is_float_type(t.dtype), name, " dtype=", to_string(t.dtype), " must be fp32, bf16 or fp16");
    check_shape(t, dims, name);
    SWITCHYARD_CHECK(t.is_contiguous(), name, " ", t.shape_string(), " must be contiguous");
    SWITCHYARD_CHECK(t.device == dev && t.device_index == dev_idx, name, " is on ", to_string(t.device), ":",
                     t.device_index, ", expected ", to_string(dev), ":", dev_idx, " (all weights on one device)");
    SWITCHYARD_CHECK(t.data != nullptr || t.numel() == 0, name, " has null data");
}

void check_output(const TensorRef& t, DType dtype, int64_t d0, int64_t d1, const char* name, Device dev) {
    SWITCHYARD_CHECK(t.dtype == dtype, name, " dtype=", to_string(t.dtype), ", expected ", to_string(dtype));
    check_shape(t, {d0, d1}, name);
    SWITCHYARD_CHECK(t.is_contiguous(), name, " must be contiguous");
    SWITCHYARD_CHECK(t.device == dev, name, " is on ", to_string(t.device), ", expected ", to_string(dev));
    SWITCHYARD_CHECK(t.data != nullptr || d0 * d1 == 0, name, " has null data");
}

}  // namespace

void validate_activation(const MoEConfig& cfg, const TensorRef& x, const char* name, Device dev) {
    SWITCHYARD_CHECK(x.rank == 2, name, " rank=", x.rank, " shape=", x.shape_string(), ", expected [T, ",
                     cfg.hidden_size, "]");
    SWITCHYARD_CHECK(x.shape[1] == cfg.hidden_size, name, " shape=", x.shape_string(),
                     ", expected [T, hidden_size=", cfg.hidden_size, "]");
    SWITCHYARD_CHECK(x.shape[0] >= 0, name, " has ", x.shape[0], " tokens");
    SWITCHYARD_CHECK(x.dtype == cfg.dtype, name, " dtype=", to_string(x.dtype), ", expected the layer dtype ",
                     to_string(cfg.dtype));
    SWITCHYARD_CHECK(x.is_contiguous(), name, " ", x.shape_string(), " must be contiguous");
    SWITCHYARD_CHECK(x.device == dev, name, " is on ", to_string(x.device), ", expected ", to_string(dev));
    SWITCHYARD_CHECK(x.data != nullptr || x.numel() == 0, name, " has null data");
}

MoELayer::MoELayer(const MoEConfig& cfg, const MoEWeights& weights) : cfg_(cfg), w_(weights) {
    cfg_.validate();
    const int64_t hidden = cfg_.hidden_size, ffn = cfg_.ffn_size, num_experts = cfg_.num_experts;
    SWITCHYARD_CHECK(w_.w13.defined(), "w13 is required but undefined");
    const Device dev = w_.w13.device;
    const int dev_idx = w_.w13.device_index;
    check_weight(w_.gate, {num_experts, hidden}, "gate", dev, dev_idx);
    check_weight(w_.w13, {num_experts, cfg_.w13_rows(), hidden}, "w13", dev, dev_idx);
    check_weight(w_.w2, {num_experts, hidden, ffn}, "w2", dev, dev_idx);
    if (cfg_.use_score_bias) {
        SWITCHYARD_CHECK(w_.score_bias.defined(), "score_bias is required when use_score_bias=true");
        check_weight(w_.score_bias, {num_experts}, "score_bias", dev, dev_idx);
        SWITCHYARD_CHECK(w_.score_bias.dtype == DType::kF32, "score_bias dtype=", to_string(w_.score_bias.dtype),
                         " must be fp32");
    } else {
        SWITCHYARD_CHECK(!w_.score_bias.defined(), "score_bias ", w_.score_bias.shape_string(),
                         " given but use_score_bias=false");
    }
    if (cfg_.num_shared_experts > 0) {
        const int64_t width = cfg_.shared_width();
        const int64_t rows = is_gated(cfg_.activation) ? 2 * width : width;
        SWITCHYARD_CHECK(w_.shared_w13.defined(),
                         "shared_w13 is required when num_shared_experts=", cfg_.num_shared_experts);
        SWITCHYARD_CHECK(w_.shared_w2.defined(),
                         "shared_w2 is required when num_shared_experts=", cfg_.num_shared_experts);
        check_weight(w_.shared_w13, {rows, hidden}, "shared_w13", dev, dev_idx);
        check_weight(w_.shared_w2, {hidden, width}, "shared_w2", dev, dev_idx);
    } else {
        SWITCHYARD_CHECK(!w_.shared_w13.defined(), "shared_w13 ", w_.shared_w13.shape_string(),
                         " given but num_shared_experts=0");
        SWITCHYARD_CHECK(!w_.shared_w2.defined(), "shared_w2 ", w_.shared_w2.shape_string(),
                         " given but num_shared_experts=0");
    }
    SWITCHYARD_CHECK(!w_.w13_scale.defined(), "w13_scale ", w_.w13_scale.shape_string(),
                     " given: quantised experts are not supported yet");
    SWITCHYARD_CHECK(!w_.w2_scale.defined(), "w2_scale ", w_.w2_scale.shape_string(),
                     " given: quantised experts are not supported yet");
#ifndef SWITCHYARD_WITH_CUDA
    SWITCHYARD_CHECK(dev == Device::kCPU, "weights are on ", to_string(dev),
                     " but this build has no CUDA backend (built without CUDA)");
#endif
}

MoELayer::~MoELayer() = default;
MoELayer::MoELayer(MoELayer&&) noexcept = default;
MoELayer& MoELayer::operator=(MoELayer&&) noexcept = default;

size_t MoELayer::workspace_size(int64_t num_tokens) const {
    SWITCHYARD_CHECK(num_tokens >= 0, "num_tokens=", num_tokens, " must be >= 0");
    if (device() == Device::kCPU) return 0;  // the reference allocates its own host buffers
#ifdef SWITCHYARD_WITH_CUDA
    return cuda::moe_workspace_size(cfg_, num_tokens);
#else
    SWITCHYARD_FAIL("device=", to_string(device()), ": built without CUDA");
#endif
}

void MoELayer::forward(const TensorRef& x, const TensorRef& y, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream, ForwardOutputs* out) const {
    const Device dev = device();
    validate_activation(cfg_, x, "x", dev);
    validate_activation(cfg_, y, "y", dev);
    const int64_t num_tokens = x.shape[0];
    SWITCHYARD_CHECK(y.shape[0] == num_tokens, "y shape=", y.shape_string(), ", expected [", num_tokens, ", ",
                     cfg_.hidden_size, "] like x");
    if (out != nullptr) {
        if (out->logits.defined()) check_output(out->logits, DType::kF32, num_tokens, cfg_.num_experts, "logits", dev);
        const int64_t slots = cfg_.route_slots();  // top_k, or E under expert-choice routing
        if (out->topk_ids.defined()) check_output(out->topk_ids, DType::kI32, num_tokens, slots, "topk_ids", dev);
        if (out->topk_weights.defined())
            check_output(out->topk_weights, DType::kF32, num_tokens, slots, "topk_weights", dev);
        if (out->slot_row.defined()) check_output(out->slot_row, DType::kI32, num_tokens, slots, "slot_row", dev);
        if (out->expert_counts.defined()) {
            const TensorRef& c = out->expert_counts;
            SWITCHYARD_CHECK(c.dtype == DType::kI32 && c.rank == 1 && c.shape[0] == cfg_.num_experts && c.device == dev,
                             "expert_counts ", c.shape_string(), " ", to_string(c.dtype), " on ", to_string(c.device),
                             ", expected [", cfg_.num_experts, "] int32 on ", to_string(dev));
            SWITCHYARD_CHECK(c.data != nullptr, "expert_counts has null data");
        }
    }
    const size_t need = workspace_size(num_tokens);
    if (need > 0) {
        SWITCHYARD_CHECK(workspace != nullptr, "workspace is null, ", need, " bytes needed");
        SWITCHYARD_CHECK(workspace_bytes >= need, "workspace_bytes=", workspace_bytes, " is less than the ", need,
                         " bytes needed for num_tokens=", num_tokens);
        SWITCHYARD_CHECK(reinterpret_cast<uintptr_t>(workspace) % 256 == 0, "workspace=", workspace,
                         " is not 256-byte aligned");
    }
    if (dev == Device::kCPU) {
        ref::moe_forward(cfg_, w_, x, y, out);
        return;
    }
#ifdef SWITCHYARD_WITH_CUDA
    cuda::moe_forward(cfg_, w_, x, y, workspace, workspace_bytes, stream, out);
#else
    (void)stream;
    SWITCHYARD_FAIL("device=", to_string(dev), ": built without CUDA");
#endif
}

void MoELayer::forward(const TensorRef& x, const TensorRef& y, ForwardOutputs* out) const {
    SWITCHYARD_CHECK(device() == Device::kCPU, "the convenience forward(x, y) runs on cpu only; the layer is on ",
                     to_string(device()), ": pass a workspace of workspace_size(T) bytes and a stream");
    forward(x, y, nullptr, 0, nullptr, out);
}

}  // namespace switchyard
