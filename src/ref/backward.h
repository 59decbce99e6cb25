// src/ref/backward.h: the CPU backend of training, the executable specification of every backward stage.
//
// The training path splits the layer into stages whose forward and backward are both written out here in
// double precision (inputs and outputs are double arrays; the torch binding converts fp32 / fp64 tensors):
//   logits [T, E]   = x . gate^T                          (a plain dense GEMM; the caller's framework owns it)
//   ids, w [T, k]   = route(logits, bias)                 ids from ref::route's rules; w differentiable in logits
//   aux, z          = router_losses(logits, ids)          Switch aux loss and z-loss (LoadStats definitions)
//   plan            = build_plan(ids, w)                  (no gradient: integer outputs)
//   xp [R, H]       = gather(x, row_token)                R = T*k rows; rows past offsets[E] are zero
//   c  [R, N]       = grouped_gemm(a [R, K], b [E, N, K])  per expert rows [offsets[e], offsets[e+1])
//   h  [R, F]       = act(g [R, R13])                      gated: gate cols [0, F), up cols [F, 2F)
//   y  [T, H]       = combine(out, slot_row, w) (+ shared) slots j = 0..k-1 in order
// Each *_backward takes the upstream gradient of its stage's outputs and returns the gradients of its
// differentiable inputs. Selection (top-k, groups, bias, capacity drops) is piecewise constant: held fixed,
// so the selection-only bias gets no gradient and a dropped (token, slot) pair gets zero weight gradient.
// Forward roundings to the layer dtype are treated as identity in the backward (straight-through).
// Every sum runs in a fixed order (rows in increasing order, slots in order j = 0..k-1), so the results are
// bitwise independent of the thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "switchyard/config.h"

namespace switchyard {
namespace ref {

// ---- router -------------------------------------------------------------------------------------------------
// Combine weights in double for a given selection: w[t, j] from the scores of logits[t] at ids[t, j] (softmax over
// all E, sigmoid, or softmax over the k chosen logits), then renormalisation (skipped when the sum is 0) and
// routed_scale. Equal to ref::route's weights before their final rounding to fp32.
void route_weights(const MoEConfig& cfg, const double* logits, const int32_t* topk_ids, int64_t num_tokens,
                   double* weights);
// d_logits [T, E] (overwritten) = d_weights [T, k] . d w / d logits for the fixed selection topk_ids.
void route_backward(const MoEConfig& cfg, const double* logits, const int32_t* topk_ids, const double* d_weights,
                    int64_t num_tokens, double* d_logits);

// aux = E * sum_e f_e * P_e, f_e = count_e / (T*k) from topk_ids (before drops; constant), P_e = mean_t prob[t, e]
// (softmax over E for softmax / top-k-softmax routing, s / sum_e s for sigmoid); z = mean_t logsumexp(logits[t])^2.
// Both are 0 when T = 0 (routing.h, LoadStats).
void router_losses(const MoEConfig& cfg, const double* logits, const int32_t* topk_ids, int64_t num_tokens,
                   double* aux_loss, double* z_loss);
// d_logits [T, E] += d_aux * d aux / d logits + d_z * d z / d logits.
void router_losses_backward(const MoEConfig& cfg, const double* logits, const int32_t* topk_ids,
                            int64_t num_tokens, double d_aux, double d_z, double* d_logits);

// ---- gather (dispatch) --------------------------------------------------------------------------------------
// xp [max_rows, H]: xp[r] = x[row_token[r]] for row_token[r] >= 0, else 0.
void gather_forward(const double* x, const int32_t* row_token, int64_t max_rows, int64_t hidden, double* xp);
// dx [T, H] (overwritten): dx[t] = sum over j = 0..k-1 (in slot order) with slot_row[t, j] >= 0 of d_xp[slot_row].
void gather_backward(const int32_t* slot_row, const double* d_xp, int64_t num_tokens, int64_t top_k, int64_t hidden,
                     double* dx);

// ---- grouped GEMM -------------------------------------------------------------------------------------------
// c [max_rows, N]: c[r, n] = sum_kk a[r, kk] * b[e, n, kk] for r in expert e's rows; rows at and past
// offsets[E] are 0. b is [E, N, K] (nn.Linear layout). offsets [E+1] (host).
void grouped_gemm_forward(const int32_t* offsets, int64_t num_experts, const double* a, const double* b,
                          int64_t max_rows, int64_t n, int64_t k, double* c);
// da [max_rows, K] (overwritten) = dc[r] . b[e] (rows past offsets[E]: 0); db [E, N, K] (overwritten) =
// sum over e's rows r (in increasing order) of dc[r]^T a[r]: a grouped GEMM whose K is the expert's row count.
// Either output may be null (not needed).
void grouped_gemm_backward(const int32_t* offsets, int64_t num_experts, const double* a, const double* b,
                           const double* dc, int64_t max_rows, int64_t n, int64_t k, double* da, double* db);

// ---- activation ---------------------------------------------------------------------------------------------
// h [rows, F] = act(g) (gated: act(g[:, f]) * g[:, F + f]; ungated: act(g[:, f])), ref::apply_activation.
void activation_forward(Activation act, const double* g, int64_t rows, int64_t ffn, double* h);
// dg [rows, R13] (overwritten) from dh [rows, F]. ReLU's derivative at 0 is 0.
void activation_backward(Activation act, const double* g, const double* dh, int64_t rows, int64_t ffn, double* dg);
// Derivatives of the elementwise functions (silu, tanh-approximated gelu) in double.
double silu_grad(double v);
double gelu_tanh_grad(double v);

// ---- combine ------------------------------------------------------------------------------------------------
// y [T, H] = sum_{j, slot_row[t,j] >= 0} w[t, j] * out[slot_row[t, j]] (j in order) (+ s_t * shared[t] when shared
// is not null; s_t = shared_scale[t], or 1 when shared_scale is null).
void combine_forward(const int32_t* slot_row, const double* weights, const double* expert_out, const double* shared,
                     int64_t num_tokens, int64_t top_k, int64_t hidden, double* y,
                     const double* shared_scale = nullptr);
// d_out [max_rows, H] (overwritten): d_out[slot_row[t,j]] = w[t,j] * dy[t]; rows no pair points at are 0.
// d_weights [T, k] (overwritten): dot(dy[t], out[slot_row[t,j]]) (h in increasing order), 0 for dropped pairs.
// The shared expert's gradient is dy itself. Either output may be null.
void combine_backward(const int32_t* slot_row, const double* weights, const double* expert_out, const double* dy,
                      int64_t num_tokens, int64_t top_k, int64_t hidden, int64_t max_rows, double* d_out,
                      double* d_weights);

}  // namespace ref
}  // namespace switchyard
