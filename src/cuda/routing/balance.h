// src/cuda/routing/balance.h: the CUDA launchers of src/cuda/routing/balance.cu (host-only header; raw device pointers + stream).
//
// Every function allocates nothing, never synchronises with the host and checks each launch. Layouts and rules
// are those of switchyard/balance.h and of the reference functions named beside each launcher (src/ref/ref.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include "switchyard/config.h"

namespace switchyard {
namespace cuda {

// Largest E the bias update from host counts carries in its kernel parameters.
constexpr int kMaxBiasExperts = 512;

// bias [E] fp32 += rate * sign(sum(counts) - E * counts[e]); counts [E] int32 on the device (ref::update_score_bias).
void update_score_bias(double rate, const int32_t* counts, int64_t num_experts, float* bias, cudaStream_t stream);
// The same with host counts (copied into the kernel's parameters; E <= kMaxBiasExperts).
void update_score_bias_host_counts(double rate, const int64_t* host_counts, int64_t num_experts, float* bias,
                                   cudaStream_t stream);

// Router losses (ref::router_stats for aux and z, ref::sequence_aux_loss for seq_aux):
// losses [3] fp32 {aux, z, seq_aux}; losses64 [3] fp64 optional (the same before rounding).
// seq_lens [num_seqs] int32 or null (one sequence of T tokens).
size_t router_losses_workspace_size(int64_t num_tokens, int64_t num_experts, int64_t num_seqs);
void router_losses(const MoEConfig& cfg, const float* logits, const int32_t* topk_ids, int64_t num_tokens,
                   const int32_t* seq_lens, int64_t num_seqs, float* losses, double* losses64, void* workspace,
                   size_t workspace_bytes, cudaStream_t stream);

// Expert-choice routing and its plan (ref::route_expert_choice): from logits [T, E] fp32 writes
// topk_ids / topk_weights / slot_row [T*E] (slot t*E + e), expert_counts [E] (= C), expert_offsets [E+1] (e*C),
// row_token / row_slot [T*E] (-1 at and past E*C).
struct ExpertChoiceArgs {
    int64_t num_tokens = 0;
    const float* logits = nullptr;
    int32_t* topk_ids = nullptr;
    float* topk_weights = nullptr;
    int32_t* expert_counts = nullptr;
    int32_t* expert_offsets = nullptr;
    int32_t* slot_row = nullptr;
    int32_t* row_token = nullptr;
    int32_t* row_slot = nullptr;
};
size_t expert_choice_workspace_size(int64_t num_tokens, int64_t num_experts);
void expert_choice_plan(const MoEConfig& cfg, const ExpertChoiceArgs& args, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace switchyard
