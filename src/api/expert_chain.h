// src/api/expert_chain.h: the expert pieces every layer of the API layer chains the same way (MoELayer's staged
// forward, experts_fused on the CPU, ExpertParallelMoELayer), written once.
//
// expert_gemm    one expert GEMM through the public stages: grouped_gemm for a float weight, grouped_gemm_fp8 (the
//                W8A8 recipe of stages.h, cfg.quant_mode) for an fp8 one; rows past offsets[G] are not written.
// shared_expert  out [T, H] = w2(act(w13(x))) of the shared expert (w.shared_w13 / w.shared_w2 and their scales),
//                with the caller's scratch g [T, R13s] and h [T, S].
#pragma once

#include <cstddef>

#include "switchyard/config.h"
#include "switchyard/moe_layer.h"
#include "switchyard/tensor.h"

namespace switchyard {
namespace api {

void expert_gemm(const MoEConfig& cfg, const TensorRef& a, const TensorRef& b, const TensorRef& b_scale,
                 const TensorRef& input_scale, const TensorRef& offsets, const TensorRef& c, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream);

void shared_expert(const MoEConfig& cfg, const TensorRef& x, const MoEWeights& w, const TensorRef& g,
                   const TensorRef& h, const TensorRef& out, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream);

}  // namespace api
}  // namespace switchyard
