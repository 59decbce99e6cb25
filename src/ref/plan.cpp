// src/ref/plan.cpp: the routing plan of the CPU backend (switchyard::RoutingPlan in host vectors).
//
// Inputs:  topk_ids [T*k] int32 (each in [0, E)), topk_weights [T*k] fp32, the config (capacity, drop policy).
// Outputs: expert_counts [E]  pairs routed to e before drops;
//          capacity C = cfg.capacity(T) (0 = dropless); an expert with more than C pairs keeps C of them:
//            position    the first C in token order;
//            probability the C with the largest topk_weights, ties to the lower token index, NaN weights last;
//          expert_offsets [E+1] exclusive scan of the kept counts;
//          rows are (token, slot) pairs in expert order, each expert's kept rows in token order (an expert
//          appears at most once per token, so token order is a total order);
//          slot_row [T*k] row of pair t*k+j or -1 when dropped; row_token / row_slot [T*k] token and t*k+j of
//          each row, -1 at and past offsets[E].
#include <algorithm>
#include <cmath>
#include <vector>

#include "ref/ref.h"
#include "switchyard/error.h"

namespace switchyard {
namespace ref {

HostPlan build_plan(const MoEConfig& cfg, int64_t num_tokens, const std::vector<int32_t>& topk_ids,
                    const std::vector<float>& topk_weights) {
    const int64_t k = cfg.top_k, num_experts = cfg.num_experts, pairs = num_tokens * k;
    SWITCHYARD_CHECK(num_tokens >= 0, "build_plan: num_tokens=", num_tokens);
    SWITCHYARD_CHECK(static_cast<int64_t>(topk_ids.size()) == pairs, "build_plan: topk_ids has ", topk_ids.size(),
                     " elements, expected num_tokens*top_k=", pairs);
    SWITCHYARD_CHECK(static_cast<int64_t>(topk_weights.size()) == pairs, "build_plan: topk_weights has ",
                     topk_weights.size(), " elements, expected num_tokens*top_k=", pairs);
    HostPlan plan;
    plan.num_tokens = num_tokens;
    plan.top_k = k;
    plan.num_experts = num_experts;
    plan.capacity = cfg.capacity(num_tokens);
    plan.topk_ids = topk_ids;
    plan.topk_weights = topk_weights;

    // Pairs of every expert in token order (the stable bucket of a counting sort).
    std::vector<std::vector<int64_t>> bucket(static_cast<size_t>(num_experts));
    plan.expert_counts.assign(static_cast<size_t>(num_experts), 0);
    for (int64_t p = 0; p < pairs; ++p) {
        const int32_t e = topk_ids[p];
        SWITCHYARD_CHECK(e >= 0 && e < num_experts, "build_plan: topk_ids[", p, "]=", e,
                         " outside [0, num_experts=", num_experts, ")");
        ++plan.expert_counts[e];
        bucket[e].push_back(p);
    }
    for (int64_t t = 0; t < num_tokens; ++t)
        for (int64_t j = 0; j < k; ++j)
            for (int64_t i = 0; i < j; ++i)
                SWITCHYARD_CHECK(topk_ids[t * k + i] != topk_ids[t * k + j], "build_plan: token ", t,
                                 " selects expert ", topk_ids[t * k + j], " twice");

    // Apply the capacity: keep a subset of each bucket, still in token order.
    if (plan.capacity > 0) {
        const size_t cap = static_cast<size_t>(plan.capacity);
        for (auto& b : bucket) {
            if (b.size() <= cap) continue;
            if (cfg.drop_policy == DropPolicy::kPosition) {
                b.resize(cap);
            } else {
                std::vector<int64_t> by_weight = b;
                auto better = [&](int64_t a, int64_t c) {
                    const float wa = topk_weights[a], wc = topk_weights[c];
                    const bool na = std::isnan(wa), nc = std::isnan(wc);
                    if (na != nc) return nc;
                    if (!na && wa != wc) return wa > wc;
                    return a < c;  // pair index order is token order within one expert
                };
                std::partial_sort(by_weight.begin(), by_weight.begin() + static_cast<std::ptrdiff_t>(cap),
                                  by_weight.end(), better);
                by_weight.resize(cap);
                std::sort(by_weight.begin(), by_weight.end());
                b.swap(by_weight);
            }
        }
    }

    plan.expert_offsets.assign(static_cast<size_t>(num_experts + 1), 0);
    for (int64_t e = 0; e < num_experts; ++e)
        plan.expert_offsets[e + 1] = plan.expert_offsets[e] + static_cast<int32_t>(bucket[e].size());
    plan.slot_row.assign(static_cast<size_t>(pairs), -1);
    plan.row_token.assign(static_cast<size_t>(pairs), -1);
    plan.row_slot.assign(static_cast<size_t>(pairs), -1);
    for (int64_t e = 0; e < num_experts; ++e) {
        int32_t row = plan.expert_offsets[e];
        for (int64_t p : bucket[e]) {
            plan.slot_row[p] = row;
            plan.row_token[row] = static_cast<int32_t>(p / k);
            plan.row_slot[row] = static_cast<int32_t>(p);
            ++row;
        }
    }
    return plan;
}

void plan_stats(const MoEConfig& cfg, const std::vector<float>& logits, const HostPlan& plan, LoadStats& stats) {
    router_stats(cfg, logits, plan.topk_ids, plan.num_tokens, stats);
    stats.kept_counts.assign(static_cast<size_t>(plan.num_experts), 0);
    for (int64_t e = 0; e < plan.num_experts; ++e)
        stats.kept_counts[e] = plan.expert_offsets[e + 1] - plan.expert_offsets[e];
    stats.dropped = plan.dropped();
}

}  // namespace ref
}  // namespace switchyard
