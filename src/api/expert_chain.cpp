// src/api/expert_chain.cpp: see expert_chain.h.
#include "api/expert_chain.h"

#include <algorithm>

#include "switchyard/error.h"
#include "switchyard/stages.h"

namespace switchyard {
namespace api {

void expert_gemm(const MoEConfig& cfg, const TensorRef& a, const TensorRef& b, const TensorRef& b_scale,
                 const TensorRef& input_scale, const TensorRef& offsets, const TensorRef& c, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream) {
    if (b.dtype != DType::kF8E4M3) {
        GroupedGemmOptions keep_tail;
        keep_tail.zero_unowned_rows = false;  // rows past offsets[G] are never read (activation and combine skip them)
        grouped_gemm(a, b, offsets, c, workspace, workspace_bytes, stream, keep_tail);
        return;
    }
    Fp8GemmOptions o;
    o.mode = cfg.quant_mode;
    o.zero_unowned_rows = false;
    grouped_gemm_fp8(a, b, b_scale, input_scale, offsets, c, workspace, workspace_bytes, stream, o);
}

bool uses_gated_gemm1(const MoEConfig& cfg, Device dev) {
    return cfg.gate_up_interleaved && (dev == Device::kCPU || cfg.dtype == DType::kBF16);
}

size_t expert_chain_workspace_size(const MoEConfig& cfg, Device dev, int64_t groups, int64_t rows, int64_t tokens) {
    // expert_gemm's kernel for [n, k] matrices: an fp8 layer's routed experts run grouped_gemm_fp8; its shared expert
    // (routed = false) may be fp8 or float, so it is sized for both.
    const bool fp8 = cfg.quant_mode != QuantMode::kNone;
    auto gemm = [&](int64_t g, int64_t n, int64_t k, int64_t m, bool routed) {
        const size_t fp8_ws = fp8 ? grouped_gemm_fp8_workspace_size(dev, cfg.quant_mode, g, n, k, m) : 0;
        if (fp8 && routed) return fp8_ws;
        return std::max(fp8_ws, grouped_gemm_workspace_size(dev, cfg.dtype, g, n, k, m));
    };
    const int64_t H = cfg.hidden_size, F = cfg.ffn_size;
    const size_t gemm1 = uses_gated_gemm1(cfg, dev)
                             ? grouped_gemm_gated_workspace_size(dev, cfg.dtype, groups, F, H, rows)
                             : gemm(groups, cfg.w13_rows(), H, rows, true);
    size_t bytes = std::max(gemm1, gemm(groups, H, F, rows, true));
    if (cfg.has_shared_expert())
        bytes = std::max({bytes, gemm(1, cfg.shared_w13_rows(), H, tokens, false),
                          gemm(1, H, cfg.shared_width(), tokens, false)});
    return bytes;
}

void gemm1_activation(const MoEConfig& cfg, const TensorRef& a, const MoEWeights& w, const TensorRef& offsets,
                      const TensorRef& used_rows, const TensorRef& g1, const TensorRef& h, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream,
                      const std::function<void(const char*)>& stage_done, const TensorRef& row_index) {
    auto done = [&](const char* stage) {
        if (stage_done) stage_done(stage);
    };
    SWITCHYARD_CHECK(!row_index.defined() || uses_gated_gemm1(cfg, a.device),
                     "gemm1_activation: a gathered A (row_index) needs the gated GEMM1");
    if (uses_gated_gemm1(cfg, a.device)) {
        GroupedGemmOptions keep_tail;
        keep_tail.zero_unowned_rows = false;  // rows past offsets[G] are never read (GEMM2 and combine skip them)
        keep_tail.row_index = row_index;
        grouped_gemm_gated(cfg.activation, a, w.w13, offsets, h, workspace, workspace_bytes, stream, keep_tail);
        done("gemm1");
        done("activation");
        return;
    }
    expert_gemm(cfg, a, w.w13, w.w13_scale, w.w13_input_scale, offsets, g1, workspace, workspace_bytes, stream);
    done("gemm1");
    activation(cfg.activation, g1, h, used_rows, stream, cfg.gate_up_interleaved);
    done("activation");
}

void shared_expert(const MoEConfig& cfg, const TensorRef& x, const MoEWeights& w, const TensorRef& g,
                   const TensorRef& h, const TensorRef& out, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream) {
    expert_gemm(cfg, x, w.shared_w13, w.shared_w13_scale, w.shared_w13_input_scale, TensorRef(), g, workspace,
                workspace_bytes, stream);
    activation(cfg.activation, g, h, TensorRef(), stream);
    expert_gemm(cfg, h, w.shared_w2, w.shared_w2_scale, w.shared_w2_input_scale, TensorRef(), out, workspace,
                workspace_bytes, stream);
}

}  // namespace api
}  // namespace switchyard
