// src/api/expert_chain.h: the expert pieces every layer of the API layer chains the same way (MoELayer's staged
// forward, experts_fused on the CPU, ExpertParallelMoELayer), written once.
//
// expert_gemm    one expert GEMM through the public stages: grouped_gemm for a float weight, grouped_gemm_fp8 (the
//                W8A8 recipe of stages.h, cfg.quant_mode) for an fp8 one; rows past offsets[G] are not written.
// gemm1_activation  h [R, F] = act(a . w13^T) of the routed experts: grouped_gemm_gated (no [R, R13] product) when
//                uses_gated_gemm1, else expert_gemm into g1 then the activation (interleaved columns when
//                cfg.gate_up_interleaved); h's rows past offsets[G] (used_rows = offsets[G]) are not written.
//                stage_done (optional) is called with "gemm1" and "activation" as each is enqueued (both after the
//                gated kernel).
// shared_expert  out [T, H] = w2(act(w13(x))) of the shared expert (w.shared_w13 / w.shared_w2 and their scales),
//                with the caller's scratch g [T, R13s] and h [T, S].
#pragma once

#include <cstddef>
#include <functional>

#include "switchyard/config.h"
#include "switchyard/moe_layer.h"
#include "switchyard/tensor.h"

namespace switchyard {
namespace api {

void expert_gemm(const MoEConfig& cfg, const TensorRef& a, const TensorRef& b, const TensorRef& b_scale,
                 const TensorRef& input_scale, const TensorRef& offsets, const TensorRef& c, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream);

// Whether GEMM1 of the routed experts runs with the activation in its epilogue on `dev`: w13 interleaved
// (MoEConfig::gate_up_interleaved) and a backend with that kernel (the CPU; CUDA bf16). g1 is then not needed.
bool uses_gated_gemm1(const MoEConfig& cfg, Device dev);
// Workspace bytes of the largest GEMM of one forward's expert chain on `dev`: gemm1_activation's and GEMM2's over
// `groups` experts and up to `rows` rows, and (when cfg has a shared expert) shared_expert's two over `tokens` rows.
size_t expert_chain_workspace_size(const MoEConfig& cfg, Device dev, int64_t groups, int64_t rows, int64_t tokens);

// row_index (optional, uses_gated_gemm1 only): a is x [T, H] and GEMM1's rows are x[row_index[r]]
// (GroupedGemmOptions::row_index), the dispatch done in GEMM1's loads.
void gemm1_activation(const MoEConfig& cfg, const TensorRef& a, const MoEWeights& w, const TensorRef& offsets,
                      const TensorRef& used_rows, const TensorRef& g1, const TensorRef& h, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream,
                      const std::function<void(const char*)>& stage_done = {},
                      const TensorRef& row_index = TensorRef());

void shared_expert(const MoEConfig& cfg, const TensorRef& x, const MoEWeights& w, const TensorRef& g,
                   const TensorRef& h, const TensorRef& out, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream);

}  // namespace api
}  // namespace switchyard
