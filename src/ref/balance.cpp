// src/ref/balance.cpp: load balancing and routing variants of the CPU backend (the specification of
// src/cuda/routing/balance.cu).
//
// update_score_bias   bias[e] = fp32(double(bias[e]) + rate * sign(N - E * counts[e])), N = sum_e counts[e]:
//                     sign(mean load - load_e) decided exactly in integers (sign(0) = 0, so a balanced expert
//                     keeps its bias). DeepSeek-V3's aux-loss-free balancing; counts are the routed pairs of the
//                     step before capacity drops.
// aux_probabilities   p[e] of one token: softmax over E (a NaN logit gets NaN and is left out of the normaliser,
//                     exp(v - max) is exactly 1 when v == max), or sigmoid normalised to sum 1. router_stats's rule.
// sequence_aux_loss   mean over non-empty sequences of E * sum_e f_e P_e (f from the sequence's top-k pairs, P the
//                     sequence's mean probability); all sums in double, in token / expert / sequence order.
// route_expert_choice expert-choice routing and its plan (ref.h states the rules); expert_choice_stats its stats.
// Layout of an expert-choice plan: every [T*k] array of HostPlan is [T*E] with slot e = expert e; rows
// (expert e's picked tokens, token order) fill [e*C, (e+1)*C); row_slot = t*E + e; nothing past E*C is used.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "ref/ref.h"
#include "ref/scoring.h"
#include "switchyard/error.h"

namespace switchyard {
namespace ref {

void update_score_bias(double rate, const int64_t* counts, int64_t num_experts, float* bias) {
    SWITCHYARD_CHECK(std::isfinite(rate) && rate >= 0.0, "update_score_bias: rate=", rate,
                     " must be finite and >= 0");
    int64_t total = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
        SWITCHYARD_CHECK(counts[e] >= 0, "update_score_bias: counts[", e, "]=", counts[e], " is negative");
        total += counts[e];
    }
    for (int64_t e = 0; e < num_experts; ++e) {
        const int64_t diff = total - num_experts * counts[e];  // E * (mean - load_e)
        const double sign = diff > 0 ? 1.0 : (diff < 0 ? -1.0 : 0.0);
        bias[e] = static_cast<float>(static_cast<double>(bias[e]) + rate * sign);
    }
}

void aux_probabilities(ScoreFunction score, const float* l, int64_t num_experts, double* p) {
    if (score == ScoreFunction::kSigmoid) {
        double s = 0.0;
        for (int64_t e = 0; e < num_experts; ++e) {
            p[e] = sigmoid(static_cast<double>(l[e]));
            s += p[e];
        }
        for (int64_t e = 0; e < num_experts; ++e) p[e] /= s;
    } else {
        softmax_skip_nan(l, num_experts, p);
    }
}

double sequence_aux_loss(const MoEConfig& cfg, const std::vector<float>& logits, const std::vector<int32_t>& topk_ids,
                         int64_t num_tokens, const std::vector<int64_t>& seq_lens) {
    const int64_t E = cfg.num_experts, k = cfg.top_k;
    SWITCHYARD_CHECK(!cfg.expert_choice(), "sequence_aux_loss: defined for token-choice routing only (routing=",
                     to_string(cfg.routing_mode), ")");
    SWITCHYARD_CHECK(static_cast<int64_t>(logits.size()) == num_tokens * E, "sequence_aux_loss: logits has ",
                     logits.size(), " elements, expected num_tokens*num_experts=", num_tokens * E);
    SWITCHYARD_CHECK(static_cast<int64_t>(topk_ids.size()) == num_tokens * k, "sequence_aux_loss: topk_ids has ",
                     topk_ids.size(), " elements, expected num_tokens*top_k=", num_tokens * k);
    int64_t total = 0;
    for (size_t s = 0; s < seq_lens.size(); ++s) {
        SWITCHYARD_CHECK(seq_lens[s] >= 0, "sequence_aux_loss: seq_lens[", s, "]=", seq_lens[s], " is negative");
        total += seq_lens[s];
    }
    SWITCHYARD_CHECK(total == num_tokens, "sequence_aux_loss: seq_lens sum to ", total, ", expected num_tokens=",
                     num_tokens);
    std::vector<double> p(static_cast<size_t>(E)), psum(static_cast<size_t>(E));
    std::vector<int64_t> count(static_cast<size_t>(E));
    double loss_sum = 0.0;
    int64_t nonempty = 0, begin = 0;
    for (int64_t len : seq_lens) {
        if (len == 0) continue;
        std::fill(psum.begin(), psum.end(), 0.0);
        std::fill(count.begin(), count.end(), 0);
        for (int64_t t = begin; t < begin + len; ++t) {
            aux_probabilities(cfg.score_function, logits.data() + t * E, E, p.data());
            for (int64_t e = 0; e < E; ++e) psum[e] += p[e];
            for (int64_t j = 0; j < k; ++j) {
                const int32_t id = topk_ids[t * k + j];
                SWITCHYARD_CHECK(id >= 0 && id < E, "sequence_aux_loss: topk_ids[", t * k + j, "]=", id,
                                 " outside [0, ", E, ")");
                ++count[id];
            }
        }
        double l = 0.0;
        for (int64_t e = 0; e < E; ++e)
            l += (static_cast<double>(count[e]) / static_cast<double>(len * k)) * (psum[e] / static_cast<double>(len));
        loss_sum += static_cast<double>(E) * l;
        ++nonempty;
        begin += len;
    }
    return nonempty > 0 ? loss_sum / static_cast<double>(nonempty) : 0.0;
}

HostPlan route_expert_choice(const MoEConfig& cfg, const std::vector<float>& logits, int64_t num_tokens) {
    const int64_t T = num_tokens, E = cfg.num_experts;
    SWITCHYARD_CHECK(cfg.expert_choice(), "route_expert_choice: routing_mode=", to_string(cfg.routing_mode));
    SWITCHYARD_CHECK(cfg.score_function != ScoreFunction::kTopkSoftmax,
                     "route_expert_choice: score_function=topk-softmax is not defined under expert choice");
    SWITCHYARD_CHECK(static_cast<int64_t>(logits.size()) == T * E, "route_expert_choice: logits has ", logits.size(),
                     " elements, expected num_tokens*num_experts=", T * E);
    SWITCHYARD_CHECK(T * E <= std::numeric_limits<int32_t>::max(), "route_expert_choice: num_tokens*num_experts=",
                     T * E, " exceeds int32 slot indices");
    const int64_t C = cfg.expert_choice_capacity(T);

    // Scores [T, E] in double.
    std::vector<double> score(static_cast<size_t>(T * E));
#pragma omp parallel for schedule(static) if (T * E >= (1 << 14))
    for (int64_t t = 0; t < T; ++t) {
        const float* l = logits.data() + t * E;
        double* s = score.data() + t * E;
        if (cfg.score_function == ScoreFunction::kSigmoid) {
            for (int64_t e = 0; e < E; ++e) s[e] = sigmoid(static_cast<double>(l[e]));
        } else {
            softmax_skip_nan(l, E, s);
        }
    }

    HostPlan plan;
    plan.num_tokens = T;
    plan.top_k = E;
    plan.num_experts = E;
    plan.capacity = C;
    plan.expert_choice = true;
    plan.topk_ids.assign(static_cast<size_t>(T * E), -1);
    plan.topk_weights.assign(static_cast<size_t>(T * E), 0.0f);
    plan.expert_counts.assign(static_cast<size_t>(E), static_cast<int32_t>(C));
    plan.expert_offsets.assign(static_cast<size_t>(E + 1), 0);
    for (int64_t e = 0; e < E; ++e) plan.expert_offsets[e + 1] = static_cast<int32_t>((e + 1) * C);
    plan.slot_row.assign(static_cast<size_t>(T * E), -1);
    plan.row_token.assign(static_cast<size_t>(T * E), -1);
    plan.row_slot.assign(static_cast<size_t>(T * E), -1);

    // Each expert's top-C tokens, then put back in token order.
    std::vector<char> picked(static_cast<size_t>(T * E), 0);
#pragma omp parallel if (T * E >= (1 << 14))
    {
        std::vector<int64_t> order(static_cast<size_t>(T));
#pragma omp for schedule(static)
        for (int64_t e = 0; e < E; ++e) {
            std::iota(order.begin(), order.end(), int64_t{0});
            auto better = [&](int64_t a, int64_t b) { return ranks_before(score[a * E + e], a, score[b * E + e], b); };
            std::partial_sort(order.begin(), order.begin() + C, order.end(), better);
            std::sort(order.begin(), order.begin() + C);
            for (int64_t i = 0; i < C; ++i) {
                const int64_t t = order[i], row = e * C + i;
                picked[t * E + e] = 1;
                plan.slot_row[t * E + e] = static_cast<int32_t>(row);
                plan.row_token[row] = static_cast<int32_t>(t);
                plan.row_slot[row] = static_cast<int32_t>(t * E + e);
            }
        }
    }

    // Weights per token: picked scores in expert order, optional renormalisation, then the routed scale.
    for (int64_t t = 0; t < T; ++t) {
        double sum = 0.0;
        for (int64_t e = 0; e < E; ++e)
            if (picked[t * E + e]) sum += score[t * E + e];
        for (int64_t e = 0; e < E; ++e) {
            if (!picked[t * E + e]) continue;
            double w = score[t * E + e];
            if (cfg.renormalize && sum != 0.0) w /= sum;
            plan.topk_ids[t * E + e] = static_cast<int32_t>(e);
            plan.topk_weights[t * E + e] = static_cast<float>(w * cfg.routed_scale);
        }
    }
    return plan;
}

void expert_choice_stats(const MoEConfig& cfg, const std::vector<float>& logits, const HostPlan& plan,
                         LoadStats& stats) {
    const int64_t T = plan.num_tokens, E = cfg.num_experts;
    SWITCHYARD_CHECK(plan.expert_choice && plan.num_experts == E, "expert_choice_stats: not an expert-choice plan");
    // mean_prob and z_loss do not depend on the selection: router_stats with any valid ids computes them.
    std::vector<int32_t> any_ids(static_cast<size_t>(T * cfg.top_k));
    for (int64_t i = 0; i < T * cfg.top_k; ++i) any_ids[i] = static_cast<int32_t>(i % cfg.top_k);
    router_stats(cfg, logits, any_ids, T, stats);
    for (int64_t e = 0; e < E; ++e) stats.expert_counts[e] = plan.expert_counts[e];
    stats.kept_counts = stats.expert_counts;
    stats.dropped = 0;
    stats.unrouted_tokens = 0;
    for (int64_t t = 0; t < T; ++t) {
        bool any = false;
        for (int64_t e = 0; e < E && !any; ++e) any = plan.slot_row[t * E + e] >= 0;
        if (!any) ++stats.unrouted_tokens;
    }
    finalize_load_stats(cfg, stats);
}

}  // namespace ref
}  // namespace switchyard
