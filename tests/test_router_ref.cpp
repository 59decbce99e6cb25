// tests/test_router_ref.cpp: the CPU router (ref::router_logits, ref::route, ref::router_stats) against
// hand-computed cases for every scoring option, ties, NaN and -inf logits, groups and bias, and against an
// independent brute-force router (iterative argmax) on random configurations.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ref/ref.h"
#include "switchyard/config.h"
#include "test_util.h"

namespace switchyard {
namespace {

const float kNaNf = std::numeric_limits<float>::quiet_NaN();
const float kInff = std::numeric_limits<float>::infinity();

struct Routed {
    std::vector<int32_t> ids;
    std::vector<float> weights;
};

Routed route(const MoEConfig& cfg, const std::vector<float>& logits, const std::vector<float>& bias = {}) {
    cfg.validate();
    Routed r;
    const int64_t num_tokens = static_cast<int64_t>(logits.size()) / cfg.num_experts;
    ref::route(cfg, logits, bias, num_tokens, r.ids, r.weights);
    return r;
}

MoEConfig cfg4(ScoreFunction s, int64_t k) {
    MoEConfig c = test::tiny_config();
    c.num_experts = 4;
    c.top_k = k;
    c.score_function = s;
    return c;
}

// Weights are fp32 roundings of double values: allow 2 ulp of fp32 against a formula evaluated in double.
void expect_weights(const std::vector<float>& got, const std::vector<double>& want) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t j = 0; j < want.size(); ++j) {
        if (std::isnan(want[j])) {
            EXPECT_TRUE(std::isnan(got[j])) << "slot " << j << ": got " << got[j] << ", expected NaN";
        } else {
            EXPECT_NEAR(got[j], want[j], 2.4e-7 * std::fabs(want[j]) + 1e-30) << "slot " << j;
        }
    }
}

double sig(double v) { return 1.0 / (1.0 + std::exp(-v)); }

TEST(RouteRef, SoftmaxTopK) {
    const MoEConfig c = cfg4(ScoreFunction::kSoftmax, 2);
    const Routed r = route(c, {1, 2, 3, 0});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{2, 1}));
    const double s = std::exp(1.0) + std::exp(2.0) + std::exp(3.0) + 1.0;
    expect_weights(r.weights, {std::exp(3.0) / s, std::exp(2.0) / s});
}

TEST(RouteRef, SoftmaxRenormalizeAndScale) {
    MoEConfig c = cfg4(ScoreFunction::kSoftmax, 2);
    c.renormalize = true;
    Routed r = route(c, {1, 2, 3, 0});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{2, 1}));
    const double a = 1.0 / (1.0 + std::exp(-1.0));
    expect_weights(r.weights, {a, 1.0 - a});
    c.routed_scale = 2.5;
    r = route(c, {1, 2, 3, 0});
    expect_weights(r.weights, {2.5 * a, 2.5 * (1.0 - a)});
    c.renormalize = false;  // scale without renormalisation
    r = route(c, {1, 2, 3, 0});
    const double s = std::exp(1.0) + std::exp(2.0) + std::exp(3.0) + 1.0;
    expect_weights(r.weights, {2.5 * std::exp(3.0) / s, 2.5 * std::exp(2.0) / s});
}

TEST(RouteRef, TopkThenSoftmax) {
    const MoEConfig c = cfg4(ScoreFunction::kTopkSoftmax, 2);
    const Routed r = route(c, {1, 2, 3, 0, /*token 1*/ -1, 5, 5, -2});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{2, 1, 1, 2}));
    const double a = 1.0 / (1.0 + std::exp(-1.0));
    expect_weights(r.weights, {a, 1.0 - a, 0.5, 0.5});
}

TEST(RouteRef, Sigmoid) {
    MoEConfig c = cfg4(ScoreFunction::kSigmoid, 2);
    Routed r = route(c, {0, 2, -1, 1});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 3}));
    expect_weights(r.weights, {sig(2), sig(1)});
    c.renormalize = true;
    r = route(c, {0, 2, -1, 1});
    expect_weights(r.weights, {sig(2) / (sig(2) + sig(1)), sig(1) / (sig(2) + sig(1))});
}

TEST(RouteRef, BiasSelectsButDoesNotWeigh) {
    MoEConfig c = cfg4(ScoreFunction::kSigmoid, 2);
    c.use_score_bias = true;
    // sel = {0.5, 0.881, 0.269 + 0.9, 0.731}: expert 2 first, its weight is the unbiased sigmoid(-1).
    Routed r = route(c, {0, 2, -1, 1}, {0.0f, 0.0f, 0.9f, 0.0f});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{2, 1}));
    expect_weights(r.weights, {sig(-1), sig(2)});
    // The same bias vector is ignored when use_score_bias is false.
    c.use_score_bias = false;
    r = route(c, {0, 2, -1, 1}, {0.0f, 0.0f, 0.9f, 0.0f});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 3}));
    // Bias with softmax scoring.
    MoEConfig s = cfg4(ScoreFunction::kSoftmax, 1);
    s.use_score_bias = true;
    r = route(s, {0, 1, 0, 0}, {0.0f, 0.0f, 0.0f, 1.0f});  // p1 = e/(e+3) < p3 + 1
    EXPECT_EQ(r.ids, (std::vector<int32_t>{3}));
    expect_weights(r.weights, {1.0 / (std::exp(1.0) + 3.0)});
}

TEST(RouteRef, GroupLimited) {
    MoEConfig c = test::tiny_config();
    c.num_experts = 8;
    c.top_k = 2;
    c.num_groups = 4;  // groups {0,1} {2,3} {4,5} {6,7}
    c.topk_groups = 2;
    c.score_function = ScoreFunction::kTopkSoftmax;  // scores are the logits: group sums by hand
    // Group scores: 0, 6, 5, 0. Expert 0 has the best logit but its group loses.
    Routed r = route(c, {5, -5, 3, 3, 4, 1, 0, 0});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{4, 2}));  // 4 (4.0), then the 3-3 tie goes to expert 2
    const double a = 1.0 / (1.0 + std::exp(-1.0));
    expect_weights(r.weights, {a, 1.0 - a});
    // Ties between group scores go to the lower group index: groups 0 and 1 both score 2.
    c.topk_groups = 1;
    r = route(c, {1, 1, 2, 0, 0, 0, -1, -1});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 1}));
    // The bias moves groups too: +3 on expert 7 makes group 3 (0 + 3) beat group 1 (2 + 0).
    c.use_score_bias = true;
    r = route(c, {1, 1, 2, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 3});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{7, 6}));
    expect_weights(r.weights, {0.5, 0.5});  // softmax of the unbiased logits {0, 0}
}

TEST(RouteRef, GroupsOfOneExpertUseTheSingleScore) {
    MoEConfig c = test::tiny_config();
    c.num_experts = 4;
    c.top_k = 2;
    c.num_groups = 4;
    c.topk_groups = 2;
    c.score_function = ScoreFunction::kSigmoid;
    const Routed r = route(c, {1, 4, 3, 2});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 2}));
    expect_weights(r.weights, {sig(4), sig(3)});
}

TEST(RouteRef, TiesGoToTheLowerExpert) {
    Routed r = route(cfg4(ScoreFunction::kSoftmax, 3), {0.5f, 0.5f, 0.5f, 0.5f});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 1, 2}));
    expect_weights(r.weights, {0.25, 0.25, 0.25});
    r = route(cfg4(ScoreFunction::kSigmoid, 3), {1, 3, 3, 1});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 2, 0}));
    r = route(cfg4(ScoreFunction::kTopkSoftmax, 4), {-2, 7, -2, 7});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 3, 0, 2}));
}

TEST(RouteRef, NaNRanksBelowEveryNumber) {
    // Softmax: NaN experts are left out of the normaliser and come last, in index order; never twice.
    Routed r = route(cfg4(ScoreFunction::kSoftmax, 4), {kNaNf, 1, kNaNf, 0});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 3, 0, 2}));
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double e = std::exp(1.0);
    expect_weights(r.weights, {e / (e + 1), 1 / (e + 1), nan, nan});
    r = route(cfg4(ScoreFunction::kSoftmax, 3), {kNaNf, 1, kNaNf, 0});  // k > number of numbers
    EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 3, 0}));
    r = route(cfg4(ScoreFunction::kSigmoid, 2), {kNaNf, kNaNf, kNaNf, kNaNf});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 1}));
    expect_weights(r.weights, {nan, nan});
    // -inf is a number: it ranks above NaN. Top-k-softmax over {0, -inf, NaN} gives {1, 0, NaN}.
    r = route(cfg4(ScoreFunction::kTopkSoftmax, 3), {kNaNf, -kInff, 0, kNaNf});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{2, 1, 0}));
    expect_weights(r.weights, {1.0, 0.0, nan});
    // A NaN in a group makes the group's score NaN: the group ranks last.
    MoEConfig g = cfg4(ScoreFunction::kTopkSoftmax, 2);
    g.num_groups = 2;
    g.topk_groups = 1;
    r = route(g, {kNaNf, 5, 0, 1});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{3, 2}));
}

TEST(RouteRef, RenormalizeSkipsAZeroSum) {
    MoEConfig c = cfg4(ScoreFunction::kSigmoid, 2);
    c.renormalize = true;
    const Routed r = route(c, {-kInff, -kInff, -kInff, -kInff});
    EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 1}));
    EXPECT_EQ(r.weights, (std::vector<float>{0.0f, 0.0f}));
}

TEST(RouteRef, ZeroTokens) {
    const Routed r = route(cfg4(ScoreFunction::kSoftmax, 2), {});
    EXPECT_TRUE(r.ids.empty());
    EXPECT_TRUE(r.weights.empty());
}

TEST(RouterLogitsRef, SmallIntegersAreExact) {
    const uint64_t seed = 3;
    SCOPED_TRACE(test::seed_trace(seed));
    const int64_t num_tokens = 37, hidden = 300, num_experts = 5;
    const auto x = test::random_ints(num_tokens * hidden, seed, -4, 4);
    const auto gate = test::random_ints(num_experts * hidden, seed + 1, -4, 4);
    const auto logits = ref::router_logits(x, gate, num_tokens, hidden, num_experts);
    std::vector<float> want(num_tokens * num_experts);
    for (int64_t t = 0; t < num_tokens; ++t)
        for (int64_t e = 0; e < num_experts; ++e) {
            int64_t acc = 0;
            for (int64_t h = 0; h < hidden; ++h)
                acc += static_cast<int64_t>(x[t * hidden + h]) * static_cast<int64_t>(gate[e * hidden + h]);
            want[t * num_experts + e] = static_cast<float>(acc);
        }
    EXPECT_TRUE(test::all_equal(logits, want, {num_tokens, num_experts}));
}

TEST(RouterStatsRef, SoftmaxByHand) {
    MoEConfig c = cfg4(ScoreFunction::kSoftmax, 1);
    c.aux_loss_coef = 0.01;
    c.z_loss_coef = 0.001;
    const float l3 = std::log(3.0f);
    const std::vector<float> logits = {0, 0, 0, 0, 0, l3, 0, 0};
    const Routed r = route(c, logits);
    ASSERT_EQ(r.ids, (std::vector<int32_t>{0, 1}));
    LoadStats st;
    ref::router_stats(c, logits, r.ids, 2, st);
    EXPECT_EQ(st.num_tokens, 2);
    EXPECT_EQ(st.top_k, 1);
    EXPECT_EQ(st.expert_counts, (std::vector<int64_t>{1, 1, 0, 0}));
    EXPECT_EQ(st.kept_counts, st.expert_counts);
    EXPECT_EQ(st.dropped, 0);
    const double e3 = std::exp(static_cast<double>(l3)), s1 = 3.0 + e3;
    const std::vector<double> p = {(0.25 + 1 / s1) / 2, (0.25 + e3 / s1) / 2, (0.25 + 1 / s1) / 2, (0.25 + 1 / s1) / 2};
    ASSERT_EQ(st.mean_prob.size(), 4u);
    for (int e = 0; e < 4; ++e) EXPECT_NEAR(st.mean_prob[e], p[e], 1e-15) << "expert " << e;
    const double aux = 4 * (0.5 * p[0] + 0.5 * p[1]);
    EXPECT_NEAR(st.aux_loss, aux, 1e-15);
    const double z = (std::pow(std::log(4.0), 2) + std::pow(std::log(s1), 2)) / 2;
    EXPECT_NEAR(st.z_loss, z, 1e-14);
    EXPECT_NEAR(st.weighted_loss, 0.01 * aux + 0.001 * z, 1e-15);
    EXPECT_EQ(st.max_load, 1.0);
    EXPECT_EQ(st.mean_load, 0.5);
    EXPECT_NEAR(st.cv, 1.0, 1e-15);  // counts {1,1,0,0}: std 0.5, mean 0.5
    EXPECT_NEAR(st.entropy, std::log(2.0), 1e-15);
    EXPECT_NEAR(st.max_over_mean(), 2.0, 1e-15);
}

TEST(RouterStatsRef, SigmoidProbabilitiesAreNormalisedScores) {
    MoEConfig c = cfg4(ScoreFunction::kSigmoid, 2);
    const std::vector<float> logits = {0, 2, -1, 1};
    const Routed r = route(c, logits);
    LoadStats st;
    ref::router_stats(c, logits, r.ids, 1, st);
    const double s = sig(0) + sig(2) + sig(-1) + sig(1);
    const std::vector<double> p = {sig(0) / s, sig(2) / s, sig(-1) / s, sig(1) / s};
    for (int e = 0; e < 4; ++e) EXPECT_NEAR(st.mean_prob[e], p[e], 1e-15);
    EXPECT_EQ(st.expert_counts, (std::vector<int64_t>{0, 1, 0, 1}));
    EXPECT_NEAR(st.aux_loss, 4 * (0.5 * p[1] + 0.5 * p[3]), 1e-15);
}

TEST(RouterStatsRef, ZeroTokens) {
    MoEConfig c = cfg4(ScoreFunction::kSoftmax, 2);
    c.aux_loss_coef = 1;
    c.z_loss_coef = 1;
    LoadStats st;
    ref::router_stats(c, {}, {}, 0, st);
    EXPECT_EQ(st.expert_counts, (std::vector<int64_t>{0, 0, 0, 0}));
    EXPECT_EQ(st.aux_loss, 0.0);
    EXPECT_EQ(st.z_loss, 0.0);
    EXPECT_EQ(st.weighted_loss, 0.0);
    EXPECT_EQ(st.cv, 0.0);
    EXPECT_EQ(st.entropy, 0.0);
    EXPECT_EQ(st.max_over_mean(), 0.0);
}

// ---- randomised: the sort-based router against a brute-force iterative argmax ----------------------------

bool before(double a, int64_t ia, double b, int64_t ib) {
    if (std::isnan(a)) return std::isnan(b) && ia < ib;
    if (std::isnan(b)) return true;
    return a > b || (a == b && ia < ib);
}

std::vector<double> softmax_ref(const std::vector<double>& v) {
    double m = -std::numeric_limits<double>::infinity();
    for (double x : v)
        if (!std::isnan(x)) m = std::max(m, x);
    std::vector<double> out(v.size());
    double s = 0;
    for (size_t i = 0; i < v.size(); ++i)
        if (!std::isnan(v[i])) s += (out[i] = (v[i] == m ? 1.0 : std::exp(v[i] - m)));
    for (size_t i = 0; i < v.size(); ++i) out[i] = std::isnan(v[i]) ? v[i] : out[i] / s;
    return out;
}

void brute_route(const MoEConfig& c, const float* l, const std::vector<float>& bias, int32_t* ids, double* w) {
    const int64_t num_experts = c.num_experts;
    std::vector<double> lv(l, l + num_experts), score(num_experts), sel(num_experts);
    if (c.score_function == ScoreFunction::kSoftmax)
        score = softmax_ref(lv);
    else if (c.score_function == ScoreFunction::kSigmoid)
        for (int64_t e = 0; e < num_experts; ++e) score[e] = sig(lv[e]);
    else
        score = lv;
    for (int64_t e = 0; e < num_experts; ++e) sel[e] = score[e] + (c.use_score_bias ? bias[e] : 0.0f);
    std::vector<bool> allowed(num_experts, true);
    if (c.num_groups > 1) {
        const int64_t gs = num_experts / c.num_groups;
        std::vector<double> gscore(c.num_groups);
        for (int64_t g = 0; g < c.num_groups; ++g) {
            std::vector<int64_t> members;
            for (int64_t e = g * gs; e < (g + 1) * gs; ++e) members.push_back(e);
            std::sort(members.begin(), members.end(),
                      [&](int64_t a, int64_t b) { return before(sel[a], a, sel[b], b); });
            gscore[g] = gs == 1 ? sel[members[0]] : sel[members[0]] + sel[members[1]];
        }
        std::vector<bool> kept(c.num_groups, false);
        for (int64_t i = 0; i < c.topk_groups; ++i) {
            int64_t best = -1;
            for (int64_t g = 0; g < c.num_groups; ++g)
                if (!kept[g] && (best < 0 || before(gscore[g], g, gscore[best], best))) best = g;
            kept[best] = true;
        }
        for (int64_t e = 0; e < num_experts; ++e) allowed[e] = kept[e / gs];
    }
    std::vector<double> chosen;
    for (int64_t j = 0; j < c.top_k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < num_experts; ++e)
            if (allowed[e] && (best < 0 || before(sel[e], e, sel[best], best))) best = e;
        allowed[best] = false;
        ids[j] = static_cast<int32_t>(best);
        chosen.push_back(c.score_function == ScoreFunction::kTopkSoftmax ? lv[best] : score[best]);
    }
    if (c.score_function == ScoreFunction::kTopkSoftmax) chosen = softmax_ref(chosen);
    double s = 0;
    for (double v : chosen) s += v;
    for (int64_t j = 0; j < c.top_k; ++j) w[j] = (c.renormalize && s != 0 ? chosen[j] / s : chosen[j]) * c.routed_scale;
}

TEST(RouteRef, RandomConfigsMatchBruteForce) {
    int checked = 0;
    for (uint64_t seed = 1; seed <= 60; ++seed) {
        SCOPED_TRACE(test::seed_trace(seed));
        std::mt19937_64 gen(seed);
        MoEConfig c = test::tiny_config();
        const int64_t group_choices[] = {1, 2, 4, 8};
        c.num_groups = group_choices[gen() % 4];
        c.num_experts = c.num_groups * (1 + static_cast<int64_t>(gen() % 8));
        c.topk_groups = 1 + static_cast<int64_t>(gen() % c.num_groups);
        const int64_t reachable = c.num_groups > 1 ? c.topk_groups * (c.num_experts / c.num_groups) : c.num_experts;
        c.top_k = 1 + static_cast<int64_t>(gen() % std::min<int64_t>(reachable, 32));
        c.score_function = static_cast<ScoreFunction>(gen() % 3);
        c.renormalize = gen() % 2;
        c.use_score_bias = gen() % 2;
        c.routed_scale = (gen() % 2) ? 1.0 : 2.5;
        ASSERT_NO_THROW(c.validate()) << c.to_string();
        const int64_t num_tokens = 1 + static_cast<int64_t>(gen() % 40);
        // Integer logits in a small range make exact ties common; some seeds add NaNs and infinities.
        std::vector<float> logits = (seed % 3 == 0) ? test::random_ints(num_tokens * c.num_experts, seed, -3, 3)
                                                    : test::random_uniform(num_tokens * c.num_experts, seed, -4, 4);
        if (seed % 4 == 0)
            for (auto& v : logits) {
                const uint64_t u = gen() % 10;
                if (u == 0) v = kNaNf;
                if (u == 1) v = -kInff;
            }
        const std::vector<float> bias = test::random_ints(c.num_experts, seed + 99, -1, 1);
        const Routed r = route(c, logits, bias);
        std::vector<int32_t> ids(c.top_k);
        std::vector<double> w(c.top_k);
        for (int64_t t = 0; t < num_tokens; ++t) {
            SCOPED_TRACE("token " + std::to_string(t) + " cfg " + c.to_string());
            brute_route(c, logits.data() + t * c.num_experts, bias, ids.data(), w.data());
            for (int64_t j = 0; j < c.top_k; ++j) {
                ASSERT_EQ(r.ids[t * c.top_k + j], ids[j]) << "slot " << j;
                const float got = r.weights[t * c.top_k + j];
                if (std::isnan(w[j]))
                    ASSERT_TRUE(std::isnan(got)) << "slot " << j;
                else
                    ASSERT_NEAR(got, w[j], 2.4e-7 * std::fabs(w[j]) + 1e-37) << "slot " << j;
            }
            std::vector<int32_t> sorted(r.ids.begin() + t * c.top_k, r.ids.begin() + (t + 1) * c.top_k);
            std::sort(sorted.begin(), sorted.end());
            ASSERT_TRUE(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end()) << "expert chosen twice";
            ++checked;
        }
    }
    EXPECT_GT(checked, 300);
}

}  // namespace
}  // namespace switchyard
