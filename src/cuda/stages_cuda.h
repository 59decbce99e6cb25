// src/cuda/stages_cuda.h: the CUDA backend of the public stage functions (switchyard/stages.h) on TensorRefs.
//
// Called by src/api/stages.cpp after validation (every tensor checked, contiguous, on one CUDA device). Each function
// makes the tensors' device current, passes raw pointers to the launchers of src/cuda/moe_stages.h,
// src/cuda/routing/balance.h, src/cuda/gemm/grouped_gemm.h and src/cuda/backward/backward.h, and enqueues on
// `stream`: no allocation, no host synchronisation (load_stats excepted: it returns host statistics).
// Host-only header.
#pragma once

#include <cstddef>
#include <vector>

#include "switchyard/routing.h"
#include "switchyard/stages.h"

namespace switchyard {
namespace cuda {

int device_count();

namespace stage {

size_t router_gemm_workspace_size();
size_t router_gemm_backward_workspace_size(DType dtype, int64_t num_tokens, int64_t num_experts, int64_t hidden);
void router_gemm_backward(const TensorRef& x, const TensorRef& gate, const TensorRef& d_logits, const TensorRef& dx,
                          const TensorRef& dgate, void* workspace, size_t workspace_bytes, cudaStream_t stream);
void router_gemm(const TensorRef& x, const TensorRef& gate, const TensorRef& logits, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream);
void route(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& score_bias, const TensorRef& topk_ids,
           const TensorRef& topk_weights, cudaStream_t stream);
size_t route_expert_choice_workspace_size(const MoEConfig& cfg, int64_t num_tokens);
void route_expert_choice(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                         const TensorRef& topk_weights, const RoutingPlan& plan, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream);
size_t plan_workspace_size(const MoEConfig& cfg, int64_t num_tokens);
void build_plan(const MoEConfig& cfg, const TensorRef& topk_ids, const TensorRef& topk_weights,
                const RoutingPlan& plan, void* workspace, size_t workspace_bytes, cudaStream_t stream);
void gather(const TensorRef& x, const TensorRef& row_token, const TensorRef& xp, cudaStream_t stream,
            const TensorRef& slot_row);
void gather_backward(const TensorRef& d_xp, const TensorRef& slot_row, const TensorRef& dx, cudaStream_t stream);
// Workspace of the grouped GEMMs: CUTLASS's, plus the two offsets of a one-group call (undefined offsets).
size_t grouped_gemm_workspace_size(DType dtype, int64_t num_groups, int64_t n, int64_t k, int64_t max_rows);
// row_index (optional): a is x, its rows gathered in the GEMM's A loads (GroupedGemmArgs::a_row_index; bf16).
void grouped_gemm(const TensorRef& a, const TensorRef& b, const TensorRef& offsets, const TensorRef& c,
                  void* workspace, size_t workspace_bytes, cudaStream_t stream, bool zero_unowned_rows,
                  const TensorRef& row_index = TensorRef());
// GEMM1 with the gated activation in its epilogue (grouped_gemm.h, GroupedGemmArgs::gated); interleave_gate_up:
// one kernel copying rows.
size_t grouped_gemm_gated_workspace_size(DType dtype, int64_t num_groups, int64_t ffn, int64_t k, int64_t max_rows);
// row_index (optional): as grouped_gemm's; gate_up (optional, not with row_index): GEMM1's product stored too.
void grouped_gemm_gated(Activation act, const TensorRef& a, const TensorRef& w13i, const TensorRef& offsets,
                        const TensorRef& h, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                        bool zero_unowned_rows, const TensorRef& row_index = TensorRef(),
                        const TensorRef& gate_up = TensorRef());
void interleave_gate_up(const TensorRef& w13, const TensorRef& w13i, bool inverse, cudaStream_t stream);
// FP8 grouped GEMM (stages.h's recipe): quantise a (quantize_rows_fp8), lay the weight scales out for the GEMM, run
// the blockwise-scaled FP8 GEMM (grouped_gemm.h). Workspace: the one-group offsets, q [R, K] e4m3, the activation
// scales [R * Kb], the weight scales [E * Kb * Nb] and the GEMM's arrays (grouped_gemm_fp8_layout in the .cpp).
size_t grouped_gemm_fp8_workspace_size(int64_t num_groups, int64_t n, int64_t k, int64_t max_rows);
void grouped_gemm_fp8(const TensorRef& a, const TensorRef& b, const TensorRef& b_scale, const TensorRef& input_scale,
                      const TensorRef& offsets, const TensorRef& c, QuantMode mode, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream, bool zero_unowned_rows);
// Throws what grouped_gemm_fp8 would throw for these sizes on CUDA (K % 16, N alignment of the output dtype).
void check_fp8_gemm_shape(const char* what, DType out_dtype, int64_t n, int64_t k);
// MoELayer's one-off checks of FP8 weights on the device (synchronous): the index of the first e4m3 NaN code of
// `codes`, or -1; and a host copy of an fp32 tensor (the scales, read on the host).
int64_t fp8_first_nan_code(const TensorRef& codes);
std::vector<float> copy_f32_to_host(const TensorRef& t);
void copy_bytes_to_host(const TensorRef& t, int64_t offset, int64_t bytes, void* dst);
size_t grouped_gemm_grad_workspace_size(DType dtype, int64_t num_groups, int64_t n, int64_t k, int64_t max_rows);
void grouped_gemm_dgrad(const TensorRef& dc, const TensorRef& b, const TensorRef& offsets, const TensorRef& da,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream);
void grouped_gemm_wgrad(const TensorRef& dc, const TensorRef& a, const TensorRef& offsets, const TensorRef& db,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream);
void activation(Activation act, const TensorRef& g, const TensorRef& h, const TensorRef& num_rows,
                cudaStream_t stream, bool gate_up_interleaved = false);
void activation_backward(Activation act, const TensorRef& g, const TensorRef& dh, const TensorRef& dg,
                         cudaStream_t stream, bool gate_up_interleaved = false);
void grouped_gemm_dgrad_activation(Activation act, const TensorRef& dc, const TensorRef& w2, const TensorRef& offsets,
                                   const TensorRef& g, const TensorRef& dg, const TensorRef& h, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream, bool gate_up_interleaved);
void combine(const TensorRef& expert_out, const TensorRef& slot_row, const TensorRef& weights,
             const TensorRef& shared, const TensorRef& shared_gate, const TensorRef& y, cudaStream_t stream);
void combine_backward(const TensorRef& dy, const TensorRef& expert_out, const TensorRef& slot_row,
                      const TensorRef& weights, const TensorRef& d_out, const TensorRef& d_weights,
                      cudaStream_t stream, const TensorRef& num_rows);
void route_backward(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                    const TensorRef& d_weights, const TensorRef& d_logits, cudaStream_t stream);
size_t router_losses_backward_workspace_size(const MoEConfig& cfg);
void router_losses_backward(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                            const TensorRef& d_losses, const TensorRef& d_logits, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream);
size_t load_stats_workspace_size(const MoEConfig& cfg, int64_t num_tokens);
void load_stats(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids, const RoutingPlan& plan,
                LoadStats& stats, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// The fused small-batch path (decode/decode_route.cu, decode/decode_experts.cu). Workspace: the router's partial
// logits; h [R, F] and shared_h [T, S] of the layer dtype, and for FP8 layers the quantised x, h, shared_h and their
// scales (carve_decode_fp8).
size_t route_fused_workspace_size(const MoEConfig& cfg, int64_t num_tokens);
void route_fused(const MoEConfig& cfg, const TensorRef& x, const TensorRef& gate, const TensorRef& score_bias,
                 const TensorRef& shared_gate, const TensorRef& logits, const TensorRef& topk_ids,
                 const TensorRef& topk_weights, const RoutingPlan& plan, const TensorRef& shared_gate_logits,
                 void* workspace, size_t workspace_bytes, cudaStream_t stream);
size_t experts_fused_workspace_size(const MoEConfig& cfg, int64_t num_tokens);
void experts_fused(const MoEConfig& cfg, const TensorRef& x, const MoEWeights& w, const RoutingPlan& plan,
                   const TensorRef& topk_weights, const TensorRef& shared_gate_logits, const TensorRef& y,
                   void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace stage
}  // namespace cuda
}  // namespace switchyard
