// src/ref/stages_ref.h: the CPU backend of the public stage functions (switchyard/stages.h) on TensorRefs.
//
// Called by src/api/stages.cpp after validation: every tensor is a checked, contiguous host tensor. Each function
// reads its inputs as double (fp64 exactly, fp32/bf16/fp16 decoded exactly), computes with the double-precision
// specification functions of ref.h / backward.h, and stores each output once: fp64 as is, other dtypes rounded to
// fp32 and then to the dtype (as a GPU that holds fp32 and stores the dtype). GEMMs of 16/32-bit operands run the
// blocked gemm_nt, bitwise equal to the naive double loop, so every stage here is deterministic and thread-count
// independent.
#pragma once

#include "switchyard/routing.h"
#include "switchyard/stages.h"

namespace switchyard {
namespace ref {
namespace stage {

void router_gemm(const TensorRef& x, const TensorRef& gate, const TensorRef& logits);
void router_gemm_backward(const TensorRef& x, const TensorRef& gate, const TensorRef& d_logits, const TensorRef& dx,
                          const TensorRef& dgate);
void route(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& score_bias, const TensorRef& topk_ids,
           const TensorRef& topk_weights);
void route_expert_choice(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                         const TensorRef& topk_weights, const RoutingPlan& plan);
void build_plan(const MoEConfig& cfg, const TensorRef& topk_ids, const TensorRef& topk_weights,
                const RoutingPlan& plan);
void gather(const TensorRef& x, const TensorRef& row_token, const TensorRef& xp, const TensorRef& slot_row);
void gather_backward(const TensorRef& d_xp, const TensorRef& slot_row, const TensorRef& dx);
// row_index (optional): a = x [T, K] gathered into [R, K] first (rows with an index outside [0, T): zeros).
void grouped_gemm(const TensorRef& a, const TensorRef& b, const TensorRef& offsets, const TensorRef& c,
                  bool zero_unowned_rows, const TensorRef& row_index = TensorRef());
// The FP8 recipe of stages.h (grouped_gemm_fp8); mode is kFP8Block or kFP8Tensor.
void grouped_gemm_fp8(const TensorRef& a, const TensorRef& b, const TensorRef& b_scale, const TensorRef& input_scale,
                      const TensorRef& offsets, const TensorRef& c, QuantMode mode, bool zero_unowned_rows);
void grouped_gemm_dgrad(const TensorRef& dc, const TensorRef& b, const TensorRef& offsets, const TensorRef& da);
void grouped_gemm_wgrad(const TensorRef& dc, const TensorRef& a, const TensorRef& offsets, const TensorRef& db);
void activation(Activation act, const TensorRef& g, const TensorRef& h, const TensorRef& num_rows,
                bool gate_up_interleaved = false);
// grouped_gemm_gated's specification: grouped_gemm into g [R, 2F] of h's dtype (gate_up when defined, else a
// temporary), then the activation of its interleaved columns. row_index (optional): as grouped_gemm's.
void grouped_gemm_gated(Activation act, const TensorRef& a, const TensorRef& w13i, const TensorRef& offsets,
                        const TensorRef& h, bool zero_unowned_rows, const TensorRef& row_index = TensorRef(),
                        const TensorRef& gate_up = TensorRef());
void interleave_gate_up(const TensorRef& w13, const TensorRef& w13i, bool inverse);
void activation_backward(Activation act, const TensorRef& g, const TensorRef& dh, const TensorRef& dg,
                         bool gate_up_interleaved = false);
// grouped_gemm_dgrad_activation's specification: dgrad into h (dh, of h's shape and dtype), activation_backward,
// activation into h, rows past offsets[E] zeroed.
void grouped_gemm_dgrad_activation(Activation act, const TensorRef& dc, const TensorRef& w2, const TensorRef& offsets,
                                   const TensorRef& g, const TensorRef& dg, const TensorRef& h,
                                   bool gate_up_interleaved);
void combine(const TensorRef& expert_out, const TensorRef& slot_row, const TensorRef& weights,
             const TensorRef& shared, const TensorRef& shared_gate, const TensorRef& y);
void combine_backward(const TensorRef& dy, const TensorRef& expert_out, const TensorRef& slot_row,
                      const TensorRef& weights, const TensorRef& d_out, const TensorRef& d_weights);
void route_backward(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                    const TensorRef& d_weights, const TensorRef& d_logits);
void router_losses_backward(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                            const TensorRef& d_losses, const TensorRef& d_logits);
void load_stats(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids, const RoutingPlan& plan,
                LoadStats& stats);

}  // namespace stage
}  // namespace ref
}  // namespace switchyard
