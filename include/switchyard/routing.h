// switchyard/routing.h: the router, the routing plan and the load statistics.
//
// Router semantics (the CPU reference in src/ref/router.cpp is the executable form of this text):
//   logits[t, e] = sum_h x[t, h] * gate[e, h], accumulated exactly (double on the CPU, fp32 on the GPU),
//                  stored as fp32.
//   score:       softmax over all E | sigmoid | (top-k then softmax: the logits themselves are the scores).
//   selection:   sel[t, e] = score[t, e] + bias[e] when use_score_bias, else score[t, e].
//                With num_groups > 1, group g's score is the sum of the two largest sel in the group; the
//                topk_groups best groups survive and experts of other groups cannot be selected.
//                The top_k largest sel are chosen, in descending order of sel. Ties go to the lower expert
//                index. A NaN ranks below every number (-inf included); no expert is selected twice.
//                A tie is equality of the computed values. Scores that differ only in their last bits because
//                exp() or a sum was rounded differently (softmax on the CPU vs the GPU; two different sums that are
//                equal in exact arithmetic) may rank differently between backends: the selection of each backend is
//                exact for its own computed scores, and the GPU tests compare decisions on identical fp32 logits.
//   weights:     from the unbiased scores: p[sel] (softmax), s[sel] (sigmoid), or softmax over the k chosen
//                logits (top-k then softmax). Then, when renormalize, w /= sum_j w (skipped when the sum
//                is 0). Then w *= routed_scale.
//   outputs:     topk_ids [T, k] int32 and topk_weights [T, k] fp32, slot j holding the j-th choice.
#pragma once

#include <cstdint>
#include <vector>

#include "switchyard/config.h"
#include "switchyard/tensor.h"

namespace switchyard {

// The routing plan: where each (token, slot) pair's row lives in expert order (switchyard::build_plan and
// route_expert_choice in stages.h fill it). int32 tensors on the device of the forward. Rows are (token, slot)
// pairs in expert order: expert 0's rows first, in token order, then expert 1's... R = T*k rows are reserved
// (E*C under expert choice); offsets[E] of them are used.
struct RoutingPlan {
    TensorRef expert_counts;  // [E]    pairs routed to each expert, before drops
    TensorRef expert_offsets; // [E+1]  exclusive scan of the kept counts; offsets[E] = number of kept rows
    TensorRef slot_row;       // [T, k] row of pair (t, j) in expert order, -1 when dropped
    TensorRef row_token;      // [R]    token of each row; entries at and past offsets[E] are -1
    TensorRef row_slot;       // [R]    t*k + j of each row; -1 at and past offsets[E]
};

// Load statistics of one forward (host-side copy).
struct LoadStats {
    int64_t num_tokens = 0;
    int64_t top_k = 0;
    std::vector<int64_t> expert_counts;  // [E] routed pairs before drops
    std::vector<int64_t> kept_counts;    // [E] rows actually computed
    std::vector<double> mean_prob;       // [E] P_e: mean over tokens of the router probability of e
                                         //      (softmax over all E; for sigmoid, s / sum_e s)
    int64_t dropped = 0;                 // (token, slot) pairs dropped by capacity
    double aux_loss = 0.0;   // Switch load-balancing loss E * sum_e f_e * P_e, f_e = counts_e / (T*k); 0 if T=0
    double z_loss = 0.0;     // mean over tokens of logsumexp(logits[t])^2; 0 if T=0
    double weighted_loss = 0.0;  // aux_loss_coef * aux_loss + z_loss_coef * z_loss
    double max_load = 0.0;       // max_e expert_counts
    double mean_load = 0.0;      // routed pairs / E (T*k / E under token choice, C under expert choice)
    double cv = 0.0;             // coefficient of variation of expert_counts (population std / mean)
    double entropy = 0.0;        // entropy (nats) of the distribution counts_e / (routed pairs)
    double max_over_mean() const { return mean_load > 0 ? max_load / mean_load : 0.0; }
    // Expert choice: tokens that no expert picked (their routed output is zero). 0 under token choice.
    int64_t unrouted_tokens = 0;
    // Routed pairs: sum_e expert_counts (T*k under token choice, E*C under expert choice).
    int64_t num_pairs() const {
        int64_t n = 0;
        for (int64_t c : expert_counts) n += c;
        return n;
    }
    // dropped / routed pairs (0 when nothing was routed).
    double dropped_fraction() const {
        const int64_t n = num_pairs();
        return n > 0 ? static_cast<double>(dropped) / static_cast<double>(n) : 0.0;
    }
};

// Fills the derived fields (max_load, mean_load, cv, entropy, aux_loss, weighted_loss) from
// expert_counts, mean_prob, z_loss and the config. Shared by every backend.
void finalize_load_stats(const MoEConfig& cfg, LoadStats& stats);

}  // namespace switchyard

namespace switchyard {

// The router alone: gate GEMM + scoring + top-k (+ load statistics), on the device of its weights.
class Router {
 public:
    // gate [E, H]; score_bias [E] fp32 (required when cfg.use_score_bias, else may be undefined).
    Router(const MoEConfig& cfg, const TensorRef& gate, const TensorRef& score_bias = TensorRef());

    size_t workspace_size(int64_t num_tokens) const;

    // x [T, H] of cfg.dtype -> topk_ids [T, k] int32, topk_weights [T, k] fp32; logits [T, E] fp32 optional.
    // stats (host) optional: counts, mean_prob, z_loss and the derived fields (no capacity applied).
    void forward(const TensorRef& x, const TensorRef& topk_ids, const TensorRef& topk_weights,
                 const TensorRef& logits, void* workspace, size_t workspace_bytes, cudaStream_t stream = nullptr,
                 LoadStats* stats = nullptr) const;

    const MoEConfig& config() const { return cfg_; }

 private:
    MoEConfig cfg_;
    TensorRef gate_;
    TensorRef bias_;
};

}  // namespace switchyard
