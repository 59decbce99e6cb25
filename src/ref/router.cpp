// src/ref/router.cpp: the router of the CPU backend, the executable form of switchyard/routing.h.
//
// router_logits: logits [T, E] fp32 = x [T, H] . gate [E, H]^T, summed in double (gemm_nt), rounded once.
// route:         per token, in double:
//   scores    softmax over all E | sigmoid(l) = 1 / (1 + exp(-l)) | (top-k-softmax) the logits themselves.
//             softmax(v)_e = exp(v_e - m) / sum_{non-NaN} exp(v_i - m), m = max of the non-NaN entries, with
//             exp(v_e - m) taken as exactly 1 when v_e == m (so all -inf rows are uniform and +inf entries share
//             the mass); a NaN entry has probability NaN and is left out of the sum, so one NaN logit does not
//             poison the other experts of the token.
//   selection sel = score + bias[e] (use_score_bias). Ranking: larger first, ties to the lower index, NaN below
//             every number (-inf included), NaNs among themselves by index; so each expert is chosen at most once
//             and k choices always exist. Groups (num_groups > 1): group score = sum of the two best sel of the
//             group by that ranking (the best one when a group has one expert); the topk_groups best groups
//             (same ranking over group scores) are the only candidates.
//   weights   score[id_j] (softmax, sigmoid) or softmax over the k chosen logits (top-k-softmax, same NaN rule),
//             then w /= sum_j w (renormalize; the sum runs j = 0..k-1 and the division is skipped when it is 0),
//             then w *= routed_scale, then rounded to fp32.
// router_stats: counts from topk_ids; P_e = mean_t prob[t, e] with prob = softmax over E (softmax, top-k-softmax)
//             or s / sum_e s (sigmoid); z_loss = mean_t logsumexp(logits[t])^2 (NaN when a logit is NaN).
// Tokens run in parallel (OpenMP); each token's result depends on that token alone.
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
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kNegInf = -std::numeric_limits<double>::infinity();


// Routes one token: logits l [E] -> ids [k], weights [k]. scratch holds 3E doubles and E+G int64.
void route_token(const MoEConfig& cfg, const float* l, const float* bias, int32_t* ids, float* weights,
                 std::vector<double>& score, std::vector<double>& sel, std::vector<int64_t>& order,
                 std::vector<double>& gscore, std::vector<int64_t>& gorder) {
    const int64_t num_experts = cfg.num_experts, k = cfg.top_k;
    std::vector<double> lv(l, l + num_experts);
    switch (cfg.score_function) {
        case ScoreFunction::kSoftmax:
            softmax_skip_nan(lv.data(), num_experts, score.data());
            break;
        case ScoreFunction::kSigmoid:
            for (int64_t e = 0; e < num_experts; ++e) score[e] = sigmoid(lv[e]);
            break;
        case ScoreFunction::kTopkSoftmax:
            score = lv;
            break;
    }
    for (int64_t e = 0; e < num_experts; ++e)
        sel[e] = score[e] + ((cfg.use_score_bias && bias != nullptr) ? static_cast<double>(bias[e]) : 0.0);

    // Candidate experts: all of them, or those of the topk_groups best groups (in expert index order).
    order.clear();
    if (cfg.num_groups > 1) {
        const int64_t group_size = num_experts / cfg.num_groups;
        for (int64_t g = 0; g < cfg.num_groups; ++g) {
            int64_t best = -1, second = -1;
            for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) {
                if (best < 0 || ranks_before(sel[e], e, sel[best], best)) {
                    second = best;
                    best = e;
                } else if (second < 0 || ranks_before(sel[e], e, sel[second], second)) {
                    second = e;
                }
            }
            gscore[g] = second < 0 ? sel[best] : sel[best] + sel[second];
        }
        gorder.resize(static_cast<size_t>(cfg.num_groups));
        std::iota(gorder.begin(), gorder.end(), int64_t{0});
        std::sort(gorder.begin(), gorder.end(),
                  [&](int64_t a, int64_t b) { return ranks_before(gscore[a], a, gscore[b], b); });
        std::vector<char> keep(static_cast<size_t>(cfg.num_groups), 0);
        for (int64_t i = 0; i < cfg.topk_groups; ++i) keep[gorder[i]] = 1;
        for (int64_t e = 0; e < num_experts; ++e)
            if (keep[e / group_size]) order.push_back(e);
    } else {
        for (int64_t e = 0; e < num_experts; ++e) order.push_back(e);
    }
    SWITCHYARD_CHECK(static_cast<int64_t>(order.size()) >= k, "route: only ", order.size(),
                     " candidate experts for top_k=", k);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int64_t a, int64_t b) { return ranks_before(sel[a], a, sel[b], b); });

    double w[64];  // top_k <= 32 (MoEConfig::validate)
    SWITCHYARD_CHECK(k <= 64, "route: top_k=", k, " exceeds 64");
    if (cfg.score_function == ScoreFunction::kTopkSoftmax) {
        double chosen[64];
        for (int64_t j = 0; j < k; ++j) chosen[j] = lv[order[j]];
        softmax_skip_nan(chosen, k, w);
    } else {
        for (int64_t j = 0; j < k; ++j) w[j] = score[order[j]];
    }
    if (cfg.renormalize) {
        double sum = 0.0;
        for (int64_t j = 0; j < k; ++j) sum += w[j];
        if (sum != 0.0)
            for (int64_t j = 0; j < k; ++j) w[j] /= sum;
    }
    for (int64_t j = 0; j < k; ++j) {
        ids[j] = static_cast<int32_t>(order[j]);
        weights[j] = static_cast<float>(w[j] * cfg.routed_scale);
    }
}

}  // namespace

std::vector<float> router_logits(const std::vector<float>& x, const std::vector<float>& gate, int64_t num_tokens,
                                 int64_t hidden, int64_t num_experts) {
    SWITCHYARD_CHECK(static_cast<int64_t>(x.size()) == num_tokens * hidden, "router_logits: x has ", x.size(),
                     " elements, expected num_tokens*hidden=", num_tokens * hidden);
    SWITCHYARD_CHECK(static_cast<int64_t>(gate.size()) == num_experts * hidden, "router_logits: gate has ", gate.size(),
                     " elements, expected num_experts*hidden=", num_experts * hidden);
    std::vector<double> acc(static_cast<size_t>(num_tokens * num_experts));
    MatView g{gate.data(), DType::kF32, num_experts, hidden};
    gemm_nt(x.data(), num_tokens, hidden, g, acc.data());
    std::vector<float> logits(acc.size());
    for (size_t i = 0; i < acc.size(); ++i) logits[i] = static_cast<float>(acc[i]);
    return logits;
}

void route(const MoEConfig& cfg, const std::vector<float>& logits, const std::vector<float>& bias, int64_t num_tokens,
           std::vector<int32_t>& topk_ids, std::vector<float>& topk_weights) {
    const int64_t num_experts = cfg.num_experts, k = cfg.top_k;
    SWITCHYARD_CHECK(static_cast<int64_t>(logits.size()) == num_tokens * num_experts, "route: logits has ",
                     logits.size(), " elements, expected num_tokens*num_experts=", num_tokens * num_experts);
    SWITCHYARD_CHECK(!cfg.use_score_bias || static_cast<int64_t>(bias.size()) == num_experts, "route: score_bias has ",
                     bias.size(), " elements, expected num_experts=", num_experts);
    topk_ids.assign(static_cast<size_t>(num_tokens * k), 0);
    topk_weights.assign(static_cast<size_t>(num_tokens * k), 0.0f);
    const float* b = cfg.use_score_bias ? bias.data() : nullptr;
#pragma omp parallel if (num_tokens * num_experts >= (1 << 14))
    {
        std::vector<double> score(static_cast<size_t>(num_experts)), sel(static_cast<size_t>(num_experts));
        std::vector<double> gscore(static_cast<size_t>(cfg.num_groups));
        std::vector<int64_t> order, gorder;
        order.reserve(static_cast<size_t>(num_experts));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tokens; ++t)
            route_token(cfg, logits.data() + t * num_experts, b, topk_ids.data() + t * k, topk_weights.data() + t * k,
                        score, sel, order, gscore, gorder);
    }
}

void router_stats(const MoEConfig& cfg, const std::vector<float>& logits, const std::vector<int32_t>& topk_ids,
                  int64_t num_tokens, LoadStats& stats) {
    const int64_t num_experts = cfg.num_experts, k = cfg.top_k;
    SWITCHYARD_CHECK(static_cast<int64_t>(logits.size()) == num_tokens * num_experts, "router_stats: logits has ",
                     logits.size(), " elements, expected ", num_tokens * num_experts);
    SWITCHYARD_CHECK(static_cast<int64_t>(topk_ids.size()) == num_tokens * k, "router_stats: topk_ids has ",
                     topk_ids.size(), " elements, expected ", num_tokens * k);
    stats = LoadStats();
    stats.num_tokens = num_tokens;
    stats.top_k = k;
    stats.expert_counts.assign(static_cast<size_t>(num_experts), 0);
    for (int32_t id : topk_ids) {
        SWITCHYARD_CHECK(id >= 0 && id < num_experts, "router_stats: expert id ", id, " outside [0, ", num_experts,
                         ")");
        ++stats.expert_counts[id];
    }
    stats.kept_counts = stats.expert_counts;
    stats.dropped = 0;
    stats.mean_prob.assign(static_cast<size_t>(num_experts), 0.0);

    // Sequential over tokens so the sums have one order; E*T exp() calls are cheap next to the GEMMs.
    std::vector<double> lv(static_cast<size_t>(num_experts)), p(static_cast<size_t>(num_experts));
    double z_sum = 0.0;
    for (int64_t t = 0; t < num_tokens; ++t) {
        const float* l = logits.data() + t * num_experts;
        bool any_nan = false;
        double m = kNegInf;
        for (int64_t e = 0; e < num_experts; ++e) {
            lv[e] = l[e];
            if (std::isnan(lv[e]))
                any_nan = true;
            else
                m = std::max(m, lv[e]);
        }
        if (cfg.score_function == ScoreFunction::kSigmoid) {
            double s = 0.0;
            for (int64_t e = 0; e < num_experts; ++e) {
                p[e] = sigmoid(lv[e]);
                s += p[e];
            }
            for (int64_t e = 0; e < num_experts; ++e) p[e] /= s;
        } else {
            softmax_skip_nan(lv.data(), num_experts, p.data());
        }
        for (int64_t e = 0; e < num_experts; ++e) stats.mean_prob[e] += p[e];
        double sum = 0.0;
        for (int64_t e = 0; e < num_experts; ++e) sum += lv[e] == m ? 1.0 : std::exp(lv[e] - m);
        const double lse = any_nan ? kNaN : m + std::log(sum);
        z_sum += lse * lse;
    }
    if (num_tokens > 0) {
        for (double& v : stats.mean_prob) v /= static_cast<double>(num_tokens);
        stats.z_loss = z_sum / static_cast<double>(num_tokens);
    }
    finalize_load_stats(cfg, stats);
}

}  // namespace ref
}  // namespace switchyard
