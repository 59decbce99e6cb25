// src/cuda/backward/backward.h: CUDA backward kernels of the training stages (host-only header; src/cuda/backward/backward.cu).
//
// Each launcher takes raw device pointers and a stream, allocates nothing, never synchronises with the host, and
// is deterministic: no float atomics, every sum in a fixed order. Each matches the CPU reference of the same name in
// src/ref/backward.h (fp32 arithmetic instead of double; values stored in the layer dtype rounded once).
// Layouts (row-major, contiguous): logits [T, E] fp32; topk_ids / slot_row [T, k] int32; weights [T, k] fp32;
// activations [rows, width] of `dtype` (fp32, bf16, fp16).
#pragma once

#include <cstdint>

#include "switchyard/config.h"
#include "switchyard/tensor.h"

namespace switchyard {
namespace cuda {

// d_logits [T, E] fp32 (overwritten) = d_weights . d w / d logits for the fixed selection (ref::route_backward).
// Uses cfg.num_experts, top_k, score_function, renormalize, routed_scale. One thread per token.
void route_backward(const MoEConfig& cfg, const float* logits, const int32_t* topk_ids, const float* d_weights,
                    int64_t num_tokens, float* d_logits, cudaStream_t stream);

// Router losses backward (ref::router_losses_backward): d_logits [T, E] fp32 (overwritten) =
// d_losses[0] * d aux / d logits + d_losses[1] * d z / d logits, for the Switch aux loss (E * sum_e f_e P_e, f from
// topk_ids [T, k]) and the z-loss (mean logsumexp^2). d_losses [2] fp32 is read on the device (no host sync); a zero
// coefficient skips its term, as the reference does. workspace: router_losses_backward_workspace_size(E) bytes
// (the per-expert aux coefficients, double). Uses cfg.num_experts (<= 1024), top_k, score_function.
size_t router_losses_backward_workspace_size(int64_t num_experts);
void router_losses_backward(const MoEConfig& cfg, const float* logits, const int32_t* topk_ids, int64_t num_tokens,
                            const float* d_losses, float* d_logits, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream);

// dx [T, H] (overwritten) = sum over j = 0..k-1 in slot order of d_xp[slot_row[t, j]] (skipping -1), fp32 sums,
// rounded once to dtype (ref::gather_backward). One block per token. num_rows: d_xp's rows (entries >= num_rows are
// skipped as dropped: the CPU backend refuses them, the device never reads out of range).
void gather_backward_rows(DType dtype, const void* d_xp, const int32_t* slot_row, int64_t num_tokens, int64_t top_k,
                          int64_t num_rows, int64_t hidden, void* dx, cudaStream_t stream);

// dg [rows, R13] (overwritten for rows < max_rows) from g [rows, R13] and dh [rows, F] (ref::activation_backward),
// fp32 arithmetic, rounded once to dtype. interleaved: g's and dg's gate and up columns as w13's rows after
// interleave_gate_up (gated activations, F % 8 == 0). h [rows, F] (may be dh itself; null: not written): the
// recomputed activation act(g), the bits activation_rows gives, in the same pass. num_rows (device counter, may be
// null): rows r >= *num_rows get dg = 0 and no h.
void activation_backward_rows(Activation act, DType dtype, const void* g, const void* dh, int64_t max_rows,
                              int64_t ffn, void* dg, cudaStream_t stream, bool interleaved = false, void* h = nullptr,
                              const int32_t* num_rows = nullptr);

// d_out [rows, H]: d_out[slot_row[t, j]] = dtype(w[t, j] * dy[t]) for every kept pair (rows no pair points at are
// not written: the caller zeroes them); d_weights [T, k] fp32 = <dy[t], out[slot_row[t, j]]> (0 for dropped pairs),
// each a fixed-order block reduction (ref::combine_backward). One block per token. num_rows: expert_out's and
// d_out's rows (an entry >= num_rows is a dropped pair: never read or written out of range).
void combine_backward_rows(DType dtype, const void* dy, const void* expert_out, const int32_t* slot_row,
                           const float* weights, int64_t num_tokens, int64_t top_k, int64_t num_rows, int64_t hidden,
                           void* d_out, float* d_weights, cudaStream_t stream);

}  // namespace cuda
}  // namespace switchyard
