// src/ref/ref.h: the CPU backend, which is the executable specification of every stage.
//
// All functions here are host-only, take contiguous row-major arrays and never allocate on behalf of
// the caller except through the returned std::vectors. Products accumulate in double; a value that a
// stage stores in the layer dtype is rounded with switchyard::round_to (exactly as CUDA rounds).
// Multi-threaded with OpenMP over tokens / rows; results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "switchyard/config.h"
#include "switchyard/moe_layer.h"
#include "switchyard/routing.h"

namespace switchyard {
namespace ref {

// ---- dense products (every GEMM of the CPU backend goes through gemm_nt) ----------------------------

// Read-only view of a contiguous row-major matrix [rows, cols] of fp32, bf16 or fp16 (weights keep their
// checkpoint dtype; the GEMM converts them to double while packing, so nothing is converted twice).
struct MatView {
    const void* data = nullptr;
    DType dtype = DType::kF32;
    int64_t rows = 0;
    int64_t cols = 0;
};

// c[i, n] = sum_{kk < k} a[i, kk] * b[n, kk] for i < m, n < b.rows (b.cols must equal k); c is row-major
// [m, b.rows] double. Products of floats are exact in double and every c[i, n] is summed in increasing kk
// starting from 0.0, so the result is bitwise equal to the naive triple loop, whatever the kernel (AVX-512,
// AVX2, portable) and the thread count. Cache-blocked and OpenMP-parallel over column blocks.
void gemm_nt(const float* a, int64_t m, int64_t k, const MatView& b, double* c);
// Names of the micro-kernels this CPU can run, best first ("avx512", "avx2", "generic"), and gemm_nt with a
// named one (for tests that check every kernel against the naive loop). Throws on an unavailable name.
std::vector<std::string> available_gemm_kernels();
void gemm_nt_kernel(const std::string& kernel, const float* a, int64_t m, int64_t k, const MatView& b, double* c);

// Routing plan in host memory; same meaning as switchyard::RoutingPlan (routing.h).
struct HostPlan {
    int64_t num_tokens = 0, top_k = 0, num_experts = 0, capacity = 0;
    std::vector<int32_t> topk_ids;        // [T*k]
    std::vector<float> topk_weights;      // [T*k]
    std::vector<int32_t> expert_counts;   // [E]   before drops
    std::vector<int32_t> expert_offsets;  // [E+1] kept rows, exclusive scan
    std::vector<int32_t> slot_row;        // [T*k] row or -1
    std::vector<int32_t> row_token;       // [T*k] token of row r, -1 past offsets[E]
    std::vector<int32_t> row_slot;        // [T*k] t*k+j of row r, -1 past offsets[E]
    // Expert-choice plan (route_expert_choice): top_k holds E (slot e = expert e), topk_ids is -1 and slot_row -1
    // where expert e did not pick the token; nothing is ever dropped.
    bool expert_choice = false;
    int64_t num_rows() const { return expert_offsets.empty() ? 0 : expert_offsets.back(); }
    int64_t dropped() const { return expert_choice ? 0 : num_tokens * top_k - num_rows(); }
};

// Reads element i of a contiguous tensor of dtype t as float (bf16/fp16 decoded exactly).
float load_as_float(const void* data, DType t, int64_t i);
// Converts a whole contiguous tensor to float.
std::vector<float> to_float(const TensorRef& t);
// Element i as double (fp64 exactly; other types through load_as_float).
double load_as_double(const void* data, DType t, int64_t i);
// Stores v at element i: fp64 exactly; other types rounded to fp32 first, then to t (store_from_float).
void store_from_double(void* data, DType t, int64_t i, double v);
// A whole contiguous host tensor as doubles, and doubles stored into one (store_from_double each).
std::vector<double> to_double(const TensorRef& t);
void store_all(const std::vector<double>& v, const TensorRef& t);
// Stores v rounded to dtype t at element i.
void store_from_float(void* data, DType t, int64_t i, float v);

// logits [T, E] fp32 = x [T, H] . gate[E, H]^T, double accumulation, rounded once to fp32.
std::vector<float> router_logits(const std::vector<float>& x, const std::vector<float>& gate, int64_t num_tokens,
                                 int64_t hidden, int64_t num_experts);

// Top-k selection and weights for every token from fp32 logits (routing.h gives the rules; src/ref/router.cpp
// writes out the cases routing.h leaves open: a NaN logit gets probability NaN and is left out of the softmax
// normaliser, so the other experts keep finite weights; exp(v - max) is taken as 1 when v == max, so rows of
// -inf are uniform; scores, selection and renormalisation run in double, weights are rounded to fp32 last).
// bias: [E] or empty (only used when cfg.use_score_bias). Fills topk_ids/topk_weights of a fresh plan.
void route(const MoEConfig& cfg, const std::vector<float>& logits, const std::vector<float>& bias,
           int64_t num_tokens, std::vector<int32_t>& topk_ids, std::vector<float>& topk_weights);

// Router probabilities used by the aux loss (softmax over E; sigmoid normalised to sum 1) and z-loss.
// Fills stats.expert_counts (from topk_ids), stats.mean_prob, stats.z_loss, num_tokens, top_k, and the
// derived fields via finalize_load_stats.
void router_stats(const MoEConfig& cfg, const std::vector<float>& logits, const std::vector<int32_t>& topk_ids,
                  int64_t num_tokens, LoadStats& stats);

// Counts, capacity and drop policy, offsets, stable ranks (token order inside an expert).
HostPlan build_plan(const MoEConfig& cfg, int64_t num_tokens, const std::vector<int32_t>& topk_ids,
                    const std::vector<float>& topk_weights);

// Token-choice load statistics of a forward: router_stats, then the kept counts and drops of `plan`.
void plan_stats(const MoEConfig& cfg, const std::vector<float>& logits, const HostPlan& plan, LoadStats& stats);

// Elementwise activations in double (gelu is the tanh approximation, as in GeGLU / gelu_pytorch_tanh).
double silu(double v);
double gelu_tanh(double v);
// h = act(gate) * up (gated) or act(up), already rounded to dtype by the caller's choice.
double apply_activation(Activation a, double gate, double up);

// One expert MLP on `rows` rows: in [rows, H] -> out [rows, H], with w13 [R13, H], w2 [H, F] as floats.
// Intermediate h rounded to `dtype`, output rounded to `dtype`.
void expert_mlp(Activation act, DType dtype, const float* in, int64_t rows, int64_t hidden, int64_t ffn,
                const float* w13, const float* w2, float* out);

// expert_mlp with weights in their own dtype: w13 [R13, hidden], w2 [hidden, ffn] (R13 = 2*ffn gated, else ffn).
void expert_mlp(Activation act, DType dtype, const float* in, int64_t rows, int64_t hidden, int64_t ffn,
                const MatView& w13, const MatView& w2, float* out);

// y[t] = round_dtype( sum_j w[t,j] * expert_out[slot_row[t,j]] (+ shared[t]) ), j in order, in double.
// shared may be null.
void combine(const HostPlan& plan, const std::vector<float>& expert_out, const float* shared, int64_t hidden,
             DType dtype, float* y);

// ---- load balancing and routing variants (src/ref/balance.cpp; public forms in switchyard/balance.h) --------

// Aux-loss-free bias update (DeepSeek-V3): bias[e] = fp32(double(bias[e]) + rate * sign(N - E * counts[e])) with
// N = sum_e counts[e] (so sign(mean - load_e), decided exactly in integers; sign(0) = 0).
void update_score_bias(double rate, const int64_t* counts, int64_t num_experts, float* bias);

// Router probabilities of one token as the aux losses use them (router_stats): softmax over E with router.cpp's
// NaN rule (softmax, top-k-softmax) or sigmoid normalised to sum 1 (sigmoid). p has E entries.
void aux_probabilities(ScoreFunction score, const float* logits_row, int64_t num_experts, double* p);

// Sequence-level Switch loss (DeepSeek-V3's sequence-wise balance loss without its coefficient): tokens are split
// into consecutive sequences of seq_lens[s] tokens (sum = T); per non-empty sequence
//   L_s = E * sum_e f_e * P_e,  f_e = (pairs of the sequence on e) / (T_s * k),  P_e = mean_{t in s} p[t, e];
// the result is the mean of L_s over the non-empty sequences (0 when there is none). One sequence of T tokens
// gives LoadStats::aux_loss. Token-choice topk_ids [T*k]. Sums in double, tokens and sequences in order.
double sequence_aux_loss(const MoEConfig& cfg, const std::vector<float>& logits, const std::vector<int32_t>& topk_ids,
                         int64_t num_tokens, const std::vector<int64_t>& seq_lens);

// Expert-choice routing (Zhou et al., 2022), the specification of the GPU kernels:
//   score[t, e]  softmax over E (router.cpp's NaN rule) or sigmoid, in double; C = cfg.expert_choice_capacity(T).
//   each expert e picks the C tokens of largest score[:, e]; ties to the lower token, NaN below every number.
//   weights      score[t, e] for picked pairs; renormalize divides by the token's sum over its picked experts
//                (summed e = 0..E-1, skipped when 0); then * routed_scale; rounded to fp32 last.
//   plan         top_k = E slots per token (see HostPlan::expert_choice), expert_counts[e] = C, offsets e*C,
//                rows in expert order and, inside an expert, in token order; row_slot = t*E + e.
HostPlan route_expert_choice(const MoEConfig& cfg, const std::vector<float>& logits, int64_t num_tokens);

// LoadStats of an expert-choice plan: counts = kept = C per expert, dropped 0, unrouted_tokens, mean_prob and
// z_loss as router_stats computes them, derived fields by finalize_load_stats.
void expert_choice_stats(const MoEConfig& cfg, const std::vector<float>& logits, const HostPlan& plan,
                         LoadStats& stats);

}  // namespace ref
}  // namespace switchyard
