// switchyard/balance.h: load balancing and routing variants (aux-loss-free bias updates, auxiliary losses,
// expert-choice routing). The CPU reference (src/ref/balance.cpp) is the specification; the CUDA versions
// (src/cuda/routing/balance.cu) match it exactly for integers and within fp32 rounding for losses.
//
// Aux-loss-free balancing (DeepSeek-V3). After a step with per-expert loads load_e (pairs routed to e before drops,
// e.g. ForwardOutputs::expert_counts or LoadStats::expert_counts):
//     score_bias[e] += rate * sign(mean_load - load_e)          (sign(0) = 0; computed in double, stored fp32)
// The bias only changes which experts are selected (routing.h); the combine weights never see it.
// On CUDA the update is one kernel on the caller's stream: no host synchronisation, graph-capturable.
//
// Auxiliary losses of the router (values of the forward; their gradients come with the backward):
//     aux      Switch load-balancing loss E * sum_e f_e P_e, f_e = counts_e / (T*k), P_e = mean_t p[t, e]
//     z        mean_t logsumexp(logits[t])^2
//     seq_aux  the Switch loss per sequence (consecutive tokens, lengths seq_lens), averaged over the non-empty
//              sequences (DeepSeek-V3's sequence-wise balance loss without its coefficient); one sequence of T
//              tokens gives aux.
// p[t, e] is the softmax over E (softmax, topk-softmax) or the sigmoid normalised to sum 1 (sigmoid).
//
// Expert-choice routing (MoEConfig::routing_mode = RoutingMode::kExpertChoice; Zhou et al., 2022): each expert
// takes the C = MoEConfig::expert_choice_capacity(T) tokens with the largest score[t, e] (softmax over E or
// sigmoid; ties to the lower token index, NaN last), so every expert computes exactly C rows and a token gets
// 0..E experts. Weight = score (renormalised over the token's experts when cfg.renormalize) * routed_scale.
// Layout: the per-token routing arrays (ForwardOutputs::topk_ids / topk_weights / slot_row) are [T, E] with slot e
// = expert e (id -1, weight 0, row -1 where e did not take t); rows are in expert order ([e*C, (e+1)*C), token
// order inside an expert), so the experts and the combine run the token-choice code unchanged. LoadStats then
// has counts = C per expert, dropped = 0 and unrouted_tokens = tokens that no expert took.
#pragma once

#include <cstddef>
#include <cstdint>

#include "switchyard/config.h"
#include "switchyard/routing.h"
#include "switchyard/tensor.h"

namespace switchyard {

// score_bias [E] fp32 += rate * sign(mean - counts_e); expert_counts [E] int32 on the same device as the bias.
// CUDA: one kernel on `stream`, no host synchronisation. Throws when rate is negative or not finite.
void update_score_bias(double rate, const TensorRef& expert_counts, const TensorRef& score_bias,
                       cudaStream_t stream = nullptr);
// The same from host statistics (stats.expert_counts); the bias may be on the host or a CUDA device (the counts
// then travel as kernel parameters: no allocation, no host synchronisation).
void update_score_bias(double rate, const LoadStats& stats, const TensorRef& score_bias, cudaStream_t stream = nullptr);
// With the rate from the config (MoEConfig::bias_update_rate).
inline void update_score_bias(const MoEConfig& cfg, const TensorRef& expert_counts, const TensorRef& score_bias,
                              cudaStream_t stream = nullptr) {
    update_score_bias(cfg.bias_update_rate, expert_counts, score_bias, stream);
}

// Indices into the losses tensor of router_losses.
constexpr int kLossAux = 0;
constexpr int kLossZ = 1;
constexpr int kLossSeqAux = 2;
constexpr int kNumLosses = 3;

// Workspace bytes of router_losses on `device` (0 on the CPU).
size_t router_losses_workspace_size(const MoEConfig& cfg, Device device, int64_t num_tokens, int64_t num_seqs);

// losses [3] fp32 = {aux, z, seq_aux} (computed in double, rounded once) from logits [T, E] fp32 and token-choice
// topk_ids [T, k] int32; seq_lens [S] int32 optional (undefined: one sequence of T tokens). All on one device.
// CPU: throws when seq_lens do not sum to T. CUDA: no host synchronisation, so a bad seq_lens (negative, or a sum
// other than T) is reported as seq_aux = NaN instead. T = 0 gives zeros.
void router_losses(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids, const TensorRef& seq_lens,
                   const TensorRef& losses, void* workspace = nullptr, size_t workspace_bytes = 0,
                   cudaStream_t stream = nullptr);

}  // namespace switchyard
