// src/api/stats.cpp: the derived load statistics shared by every backend.
//
// From expert_counts [E], mean_prob [E] (P_e), z_loss, num_tokens T and top_k k, with the routed pairs
// N = sum_e counts_e (= T*k under token choice, where every slot names an expert; E*C under expert choice):
//   mean_load = N / E;  max_load = max_e counts_e;  cv = population std(counts) / mean_load (0 if mean is 0);
//   entropy   = -sum_e q_e ln q_e, q_e = counts_e / N (terms with q_e = 0 are 0);
//   aux_loss  = E * sum_e f_e * P_e with f_e = counts_e / N  (0 when N = 0);
//   weighted_loss = aux_loss_coef * aux_loss + z_loss_coef * z_loss.
#include <algorithm>
#include <cmath>

#include "switchyard/error.h"
#include "switchyard/routing.h"

namespace switchyard {

void finalize_load_stats(const MoEConfig& cfg, LoadStats& stats) {
    const int64_t num_experts = static_cast<int64_t>(stats.expert_counts.size());
    SWITCHYARD_CHECK(num_experts == cfg.num_experts, "finalize_load_stats: expert_counts has ", num_experts,
                     " entries, expected num_experts=", cfg.num_experts);
    SWITCHYARD_CHECK(stats.mean_prob.empty() || static_cast<int64_t>(stats.mean_prob.size()) == num_experts,
                     "finalize_load_stats: mean_prob has ", stats.mean_prob.size(), " entries, expected ", num_experts);
    // Routed pairs: T*k under token choice (every slot names an expert), E*C under expert choice.
    double pairs = 0.0;
    for (int64_t c : stats.expert_counts) pairs += static_cast<double>(c);
    stats.mean_load = num_experts > 0 ? pairs / static_cast<double>(num_experts) : 0.0;
    stats.max_load = 0.0;
    double var = 0.0, entropy = 0.0, aux = 0.0;
    for (int64_t e = 0; e < num_experts; ++e) {
        const double c = static_cast<double>(stats.expert_counts[e]);
        stats.max_load = std::max(stats.max_load, c);
        var += (c - stats.mean_load) * (c - stats.mean_load);
        if (pairs > 0) {
            const double f = c / pairs;
            if (f > 0) entropy -= f * std::log(f);
            if (!stats.mean_prob.empty()) aux += f * stats.mean_prob[e];
        }
    }
    stats.cv = (num_experts > 0 && stats.mean_load > 0)
                   ? std::sqrt(var / static_cast<double>(num_experts)) / stats.mean_load
                   : 0.0;
    stats.entropy = entropy;
    stats.aux_loss = pairs > 0 ? static_cast<double>(num_experts) * aux : 0.0;
    if (stats.num_tokens == 0) stats.z_loss = 0.0;
    stats.weighted_loss = cfg.aux_loss_coef * stats.aux_loss + cfg.z_loss_coef * stats.z_loss;
}

}  // namespace switchyard
