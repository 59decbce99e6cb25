// src/api/expert_chain.cpp: see expert_chain.h.
#include "api/expert_chain.h"

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
