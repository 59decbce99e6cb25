// tests/test_backward_ref.cpp: the CPU reference backward (src/ref/backward.h) against central finite differences.
//
// Every stage is checked the same way: a random upstream gradient G (fixed seed) defines L(x) = <G, stage(x)>; the
// analytical gradient from the stage's *_backward must match (L(x + eps e_i) - L(x - eps e_i)) / (2 eps) for every
// input element i. Everything is double: with eps = 1e-6 on smooth functions of O(1) inputs the truncation error is
// ~1e-12 and the cancellation error ~1e-10, so |got - fd| <= 1e-7 + 1e-6 |fd| holds with a wide margin and a wrong
// formula (a missing term, a wrong sign, a slot mix-up) fails it by orders of magnitude.
// The selection (top-k, groups, bias, capacity) is held fixed, as the backward contract says; inputs are drawn so
// that no perturbation of 1e-6 can flip it (distinct logits, ReLU inputs away from 0).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <vector>

#include "ref/backward.h"
#include "ref/ref.h"
#include "switchyard/stages.h"
#include "test_util.h"

namespace switchyard {
namespace {

using test::random_uniform;
using test::seed_trace;

std::vector<double> random_doubles(size_t n, uint64_t seed, double lo = -1.0, double hi = 1.0) {
    const std::vector<float> f = random_uniform(n, seed, static_cast<float>(lo), static_cast<float>(hi));
    std::vector<double> d(f.begin(), f.end());
    // Add a second, finer random component so values are not float-representable (a double-only path is tested).
    const std::vector<float> g = random_uniform(n, seed ^ 0x9e3779b97f4a7c15ull, -1.0f, 1.0f);
    for (size_t i = 0; i < n; ++i) d[i] += 1e-9 * g[i];
    return d;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
    double s = 0.0;
    for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
    return s;
}

// Checks grad (analytical dL/dx) against central differences of L(x) = loss(x).
void expect_fd_gradient(const std::function<double(const std::vector<double>&)>& loss, std::vector<double> x,
                        const std::vector<double>& grad, const char* what, double atol = 1e-7, double rtol = 1e-6) {
    ASSERT_EQ(x.size(), grad.size()) << what;
    constexpr double kEps = 1e-6;
    int64_t bad = 0, first_bad = -1;
    double first_got = 0.0, first_want = 0.0;
    for (size_t i = 0; i < x.size(); ++i) {
        const double x0 = x[i];
        x[i] = x0 + kEps;
        const double lp = loss(x);
        x[i] = x0 - kEps;
        const double lm = loss(x);
        x[i] = x0;
        const double fd = (lp - lm) / (2.0 * kEps);
        if (!(std::fabs(grad[i] - fd) <= atol + rtol * std::fabs(fd))) {
            if (bad++ == 0) {
                first_bad = static_cast<int64_t>(i);
                first_got = grad[i];
                first_want = fd;
            }
        }
    }
    EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << x.size() << " gradient elements differ; first at [" << first_bad
                      << "]: got " << first_got << ", finite difference " << first_want;
}

MoEConfig router_config(ScoreFunction s, int64_t num_experts, int64_t k) {
    MoEConfig c;
    c.hidden_size = 8;
    c.ffn_size = 8;
    c.num_experts = num_experts;
    c.top_k = k;
    c.score_function = s;
    return c;
}

struct RouterCase {
    const char* name;
    MoEConfig cfg;
};

std::vector<RouterCase> router_cases() {
    std::vector<RouterCase> cases;
    cases.push_back({"softmax", router_config(ScoreFunction::kSoftmax, 6, 2)});
    cases.push_back({"topk-softmax", router_config(ScoreFunction::kTopkSoftmax, 6, 3)});
    cases.push_back({"sigmoid", router_config(ScoreFunction::kSigmoid, 5, 2)});
    MoEConfig c = router_config(ScoreFunction::kSoftmax, 7, 3);
    c.renormalize = true;
    cases.push_back({"softmax-renorm", c});
    c = router_config(ScoreFunction::kSoftmax, 4, 1);
    c.routed_scale = 2.5;
    cases.push_back({"softmax-k1-scale", c});
    c = router_config(ScoreFunction::kSigmoid, 8, 3);  // DeepSeek-V3 style
    c.use_score_bias = true;
    c.num_groups = 4;
    c.topk_groups = 2;
    c.renormalize = true;
    c.routed_scale = 2.5;
    cases.push_back({"sigmoid-bias-groups-renorm-scale", c});
    c = router_config(ScoreFunction::kTopkSoftmax, 8, 2);
    c.renormalize = true;  // a no-op on weights that already sum to 1: still a valid chain rule
    c.routed_scale = 0.5;
    cases.push_back({"topk-softmax-renorm-scale", c});
    return cases;
}

// Logits with well separated values (no near ties that a 1e-6 step could flip).
std::vector<double> separated_logits(int64_t num_tokens, int64_t num_experts, uint64_t seed) {
    std::vector<double> l = random_doubles(static_cast<size_t>(num_tokens * num_experts), seed, -2.0, 2.0);
    for (int64_t t = 0; t < num_tokens; ++t)
        for (int64_t e = 0; e < num_experts; ++e) l[t * num_experts + e] += 0.05 * static_cast<double>((e * 5 + t) % 7);
    return l;
}

void route_fixed(const MoEConfig& cfg, const std::vector<double>& logits, const std::vector<float>& bias,
                 int64_t num_tokens, std::vector<int32_t>& ids, std::vector<float>& weights) {
    std::vector<float> lf(logits.begin(), logits.end());
    ref::route(cfg, lf, bias, num_tokens, ids, weights);
}

TEST(BackwardRef, RouteWeightsEqualRouteBeforeRounding) {
    const int64_t num_tokens = 9;
    for (const auto& rc : router_cases()) {
        SCOPED_TRACE(rc.name);
        const uint64_t seed = 101;
        SCOPED_TRACE(seed_trace(seed));
        const MoEConfig& cfg = rc.cfg;
        std::vector<float> lf = random_uniform(static_cast<size_t>(num_tokens * cfg.num_experts), seed, -3.0f, 3.0f);
        std::vector<double> ld(lf.begin(), lf.end());
        std::vector<float> bias = random_uniform(static_cast<size_t>(cfg.num_experts), seed + 1, -0.3f, 0.3f);
        std::vector<int32_t> ids;
        std::vector<float> weights;
        ref::route(cfg, lf, bias, num_tokens, ids, weights);
        std::vector<double> wd(ids.size());
        ref::route_weights(cfg, ld.data(), ids.data(), num_tokens, wd.data());
        for (size_t i = 0; i < ids.size(); ++i)
            ASSERT_EQ(static_cast<float>(wd[i]), weights[i]) << "slot " << i << ": route_weights " << wd[i]
                                                              << " vs route " << weights[i];
    }
}

TEST(BackwardRef, RouteBackwardMatchesFiniteDifferences) {
    const int64_t num_tokens = 5;
    for (const auto& rc : router_cases()) {
        SCOPED_TRACE(rc.name);
        const uint64_t seed = 202;
        SCOPED_TRACE(seed_trace(seed));
        const MoEConfig& cfg = rc.cfg;
        const int64_t k = cfg.top_k, num_experts = cfg.num_experts;
        const std::vector<double> logits = separated_logits(num_tokens, num_experts, seed);
        const std::vector<float> bias = random_uniform(static_cast<size_t>(num_experts), seed + 1, -0.3f, 0.3f);
        std::vector<int32_t> ids;
        std::vector<float> wf;
        route_fixed(cfg, logits, bias, num_tokens, ids, wf);
        const std::vector<double> g = random_doubles(static_cast<size_t>(num_tokens * k), seed + 2);
        std::vector<double> d_logits(logits.size(), 123.0);  // poisoned: route_backward must overwrite every entry
        ref::route_backward(cfg, logits.data(), ids.data(), g.data(), num_tokens, d_logits.data());
        auto loss = [&](const std::vector<double>& l) {
            std::vector<double> w(static_cast<size_t>(num_tokens * k));
            ref::route_weights(cfg, l.data(), ids.data(), num_tokens, w.data());
            return dot(g, w);
        };
        expect_fd_gradient(loss, logits, d_logits, "d_logits");
    }
}

TEST(BackwardRef, RouterLossesMatchLoadStatsAndFiniteDifferences) {
    const int64_t num_tokens = 7;
    for (const auto& rc : router_cases()) {
        SCOPED_TRACE(rc.name);
        const uint64_t seed = 303;
        SCOPED_TRACE(seed_trace(seed));
        const MoEConfig& cfg = rc.cfg;
        const std::vector<double> logits = separated_logits(num_tokens, cfg.num_experts, seed);
        const std::vector<float> bias = random_uniform(static_cast<size_t>(cfg.num_experts), seed + 1, -0.3f, 0.3f);
        std::vector<int32_t> ids;
        std::vector<float> wf;
        route_fixed(cfg, logits, bias, num_tokens, ids, wf);

        // Same definitions as the forward's LoadStats (computed from the fp32-rounded logits there).
        std::vector<float> lf(logits.begin(), logits.end());
        std::vector<double> lfd(lf.begin(), lf.end());
        LoadStats stats;
        ref::router_stats(cfg, lf, ids, num_tokens, stats);
        double aux = 0.0, z = 0.0;
        ref::router_losses(cfg, lfd.data(), ids.data(), num_tokens, &aux, &z);
        EXPECT_NEAR(aux, stats.aux_loss, 1e-12 * (1.0 + std::fabs(stats.aux_loss)));
        EXPECT_NEAR(z, stats.z_loss, 1e-12 * (1.0 + std::fabs(stats.z_loss)));

        const double d_aux = 0.7, d_z = -1.3;
        std::vector<double> d_logits(logits.size(), 0.0);
        ref::router_losses_backward(cfg, logits.data(), ids.data(), num_tokens, d_aux, d_z, d_logits.data());
        auto loss = [&](const std::vector<double>& l) {
            double a = 0.0, zz = 0.0;
            ref::router_losses(cfg, l.data(), ids.data(), num_tokens, &a, &zz);
            return d_aux * a + d_z * zz;
        };
        expect_fd_gradient(loss, logits, d_logits, "d_logits (aux + z)");
    }
}

TEST(BackwardRef, RouterLossesOfZeroTokensAreZero) {
    const MoEConfig cfg = router_config(ScoreFunction::kSoftmax, 4, 2);
    double aux = 1.0, z = 1.0;
    ref::router_losses(cfg, nullptr, nullptr, 0, &aux, &z);
    EXPECT_EQ(aux, 0.0);
    EXPECT_EQ(z, 0.0);
}

// A plan with capacity drops, an empty expert and rows past offsets[E] (so every edge of the row bookkeeping is hit).
ref::HostPlan dropping_plan(int64_t num_tokens, uint64_t seed, MoEConfig* cfg_out) {
    MoEConfig cfg = router_config(ScoreFunction::kSoftmax, 5, 2);
    cfg.capacity_factor = 0.8;
    cfg.drop_policy = DropPolicy::kProbability;
    std::vector<float> logits = random_uniform(static_cast<size_t>(num_tokens * cfg.num_experts), seed, -2.0f, 2.0f);
    for (int64_t t = 0; t < num_tokens; ++t) {
        logits[t * cfg.num_experts + 0] += 3.0f;  // expert 0 overloaded: drops
        logits[t * cfg.num_experts + 4] -= 9.0f;  // expert 4 empty
    }
    std::vector<int32_t> ids;
    std::vector<float> w;
    ref::route(cfg, logits, {}, num_tokens, ids, w);
    ref::HostPlan plan = ref::build_plan(cfg, num_tokens, ids, w);
    *cfg_out = cfg;
    return plan;
}

TEST(BackwardRef, GatherBackwardIsTheAdjointAndSumsSlots) {
    const int64_t num_tokens = 6, hidden = 5;
    const uint64_t seed = 404;
    SCOPED_TRACE(seed_trace(seed));
    MoEConfig cfg;
    const ref::HostPlan plan = dropping_plan(num_tokens, seed, &cfg);
    ASSERT_GT(plan.dropped(), 0) << "the plan must drop pairs for this test to mean anything";
    ASSERT_EQ(plan.expert_offsets[4], plan.expert_offsets[5]) << "expert 4 must be empty";
    const int64_t max_rows = num_tokens * cfg.top_k;
    const std::vector<double> x = random_doubles(static_cast<size_t>(num_tokens * hidden), seed + 1);
    const std::vector<double> g = random_doubles(static_cast<size_t>(max_rows * hidden), seed + 2);
    std::vector<double> dx(x.size(), 55.0);
    ref::gather_backward(plan.slot_row.data(), g.data(), num_tokens, cfg.top_k, hidden, dx.data());
    auto loss = [&](const std::vector<double>& xx) {
        std::vector<double> xp(static_cast<size_t>(max_rows * hidden), 77.0);
        ref::gather_forward(xx.data(), plan.row_token.data(), max_rows, hidden, xp.data());
        return dot(g, xp);
    };
    expect_fd_gradient(loss, x, dx, "dx");
    // Rows past offsets[E] are zero in the forward.
    std::vector<double> xp(static_cast<size_t>(max_rows * hidden), 77.0);
    ref::gather_forward(x.data(), plan.row_token.data(), max_rows, hidden, xp.data());
    for (int64_t i = plan.num_rows() * hidden; i < max_rows * hidden; ++i) ASSERT_EQ(xp[i], 0.0) << "xp[" << i << "]";
}

TEST(BackwardRef, GroupedGemmBackwardMatchesFiniteDifferences) {
    const int64_t n = 5, k = 4, num_experts = 4, max_rows = 9;
    const std::vector<int32_t> offsets = {0, 3, 3, 4, 7};  // expert 1 empty; rows 7, 8 unused
    const uint64_t seed = 505;
    SCOPED_TRACE(seed_trace(seed));
    const std::vector<double> a = random_doubles(static_cast<size_t>(max_rows * k), seed);
    const std::vector<double> b = random_doubles(static_cast<size_t>(num_experts * n * k), seed + 1);
    const std::vector<double> g = random_doubles(static_cast<size_t>(max_rows * n), seed + 2);
    std::vector<double> da(a.size(), 9.0), db(b.size(), 9.0);
    ref::grouped_gemm_backward(offsets.data(), num_experts, a.data(), b.data(), g.data(), max_rows, n, k, da.data(),
                               db.data());
    auto loss_a = [&](const std::vector<double>& aa) {
        std::vector<double> c(static_cast<size_t>(max_rows * n), 5.0);
        ref::grouped_gemm_forward(offsets.data(), num_experts, aa.data(), b.data(), max_rows, n, k, c.data());
        return dot(g, c);
    };
    auto loss_b = [&](const std::vector<double>& bb) {
        std::vector<double> c(static_cast<size_t>(max_rows * n), 5.0);
        ref::grouped_gemm_forward(offsets.data(), num_experts, a.data(), bb.data(), max_rows, n, k, c.data());
        return dot(g, c);
    };
    expect_fd_gradient(loss_a, a, da, "da");
    expect_fd_gradient(loss_b, b, db, "db");
    for (int64_t i = 7 * k; i < max_rows * k; ++i) EXPECT_EQ(da[i], 0.0) << "da of an unused row, [" << i << "]";
    for (int64_t i = n * k; i < 2 * n * k; ++i) EXPECT_EQ(db[i], 0.0) << "db of the empty expert, [" << i << "]";
}

TEST(BackwardRef, ActivationBackwardMatchesFiniteDifferences) {
    const int64_t rows = 4, ffn = 6;
    for (Activation act : {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGELU, Activation::kReLU}) {
        SCOPED_TRACE(to_string(act));
        const uint64_t seed = 606 + static_cast<uint64_t>(act);
        SCOPED_TRACE(seed_trace(seed));
        const int64_t width = is_gated(act) ? 2 * ffn : ffn;
        std::vector<double> gin = random_doubles(static_cast<size_t>(rows * width), seed, -3.0, 3.0);
        for (double& v : gin)
            if (std::fabs(v) < 0.01) v += 0.05;  // ReLU's kink stays out of reach of the step
        const std::vector<double> g = random_doubles(static_cast<size_t>(rows * ffn), seed + 1);
        std::vector<double> dg(gin.size(), 3.0);
        ref::activation_backward(act, gin.data(), g.data(), rows, ffn, dg.data());
        auto loss = [&](const std::vector<double>& x) {
            std::vector<double> h(static_cast<size_t>(rows * ffn));
            ref::activation_forward(act, x.data(), rows, ffn, h.data());
            return dot(g, h);
        };
        expect_fd_gradient(loss, gin, dg, "dg");
    }
}

TEST(BackwardRef, ActivationForwardMatchesExpertMlpDefinition) {
    // activation_forward is ref::apply_activation elementwise: pin it so the two cannot drift apart.
    const int64_t rows = 3, ffn = 4;
    const std::vector<double> gin = random_doubles(static_cast<size_t>(rows * 2 * ffn), 7);
    std::vector<double> h(static_cast<size_t>(rows * ffn));
    ref::activation_forward(Activation::kSwiGLU, gin.data(), rows, ffn, h.data());
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t f = 0; f < ffn; ++f)
            ASSERT_EQ(h[r * ffn + f], ref::apply_activation(Activation::kSwiGLU, gin[r * 2 * ffn + f],
                                                            gin[r * 2 * ffn + ffn + f]));
}

TEST(BackwardRef, CombineBackwardMatchesFiniteDifferences) {
    const int64_t num_tokens = 6, hidden = 4;
    const uint64_t seed = 707;
    SCOPED_TRACE(seed_trace(seed));
    MoEConfig cfg;
    const ref::HostPlan plan = dropping_plan(num_tokens, seed, &cfg);
    ASSERT_GT(plan.dropped(), 0);
    const int64_t k = cfg.top_k, max_rows = num_tokens * k;
    const std::vector<double> w = random_doubles(static_cast<size_t>(num_tokens * k), seed + 1);
    const std::vector<double> out = random_doubles(static_cast<size_t>(max_rows * hidden), seed + 2);
    const std::vector<double> shared = random_doubles(static_cast<size_t>(num_tokens * hidden), seed + 3);
    const std::vector<double> g = random_doubles(static_cast<size_t>(num_tokens * hidden), seed + 4);
    std::vector<double> d_out(out.size(), 8.0), d_w(w.size(), 8.0);
    ref::combine_backward(plan.slot_row.data(), w.data(), out.data(), g.data(), num_tokens, k, hidden, max_rows,
                          d_out.data(), d_w.data());
    auto y_of = [&](const std::vector<double>& ww, const std::vector<double>& oo) {
        std::vector<double> y(static_cast<size_t>(num_tokens * hidden));
        ref::combine_forward(plan.slot_row.data(), ww.data(), oo.data(), shared.data(), num_tokens, k, hidden,
                             y.data());
        return dot(g, y);
    };
    expect_fd_gradient([&](const std::vector<double>& ww) { return y_of(ww, out); }, w, d_w, "d_weights");
    expect_fd_gradient([&](const std::vector<double>& oo) { return y_of(w, oo); }, out, d_out, "d_expert_out");
    for (int64_t i = 0; i < num_tokens * k; ++i)
        if (plan.slot_row[i] < 0) EXPECT_EQ(d_w[i], 0.0) << "dropped pair " << i;

    // combine_forward in double equals ref::combine before its rounding (same order of the same products).
    std::vector<float> of(out.begin(), out.end()), sf(shared.begin(), shared.end());
    ref::HostPlan p2 = plan;
    std::vector<double> wd(plan.topk_weights.begin(), plan.topk_weights.end()), od(of.begin(), of.end()),
        sd(sf.begin(), sf.end()), y(static_cast<size_t>(num_tokens * hidden));
    ref::combine_forward(plan.slot_row.data(), wd.data(), od.data(), sd.data(), num_tokens, k, hidden, y.data());
    std::vector<float> yf(y.size());
    ref::combine(p2, of, sf.data(), hidden, DType::kF32, yf.data());
    for (size_t i = 0; i < y.size(); ++i) ASSERT_EQ(static_cast<float>(y[i]), yf[i]) << "y[" << i << "]";
}

// The stages chained into a whole layer (routed experts, shared expert, router losses), checked end to end: the
// gradient of x, gate, w13, w2 assembled from the stage backwards against finite differences of the composed
// forward (selection and plan fixed by the unperturbed inputs).
TEST(BackwardRef, ComposedLayerMatchesFiniteDifferences) {
    const int64_t num_tokens = 5, hidden = 4, ffn = 3, num_experts = 4, k = 2;
    const uint64_t seed = 808;
    SCOPED_TRACE(seed_trace(seed));
    MoEConfig cfg = router_config(ScoreFunction::kSoftmax, num_experts, k);
    cfg.hidden_size = hidden;
    cfg.ffn_size = ffn;
    cfg.renormalize = true;
    cfg.capacity_factor = 0.75;
    cfg.activation = Activation::kSwiGLU;
    const int64_t r13 = 2 * ffn, max_rows = num_tokens * k;
    const std::vector<double> x = random_doubles(static_cast<size_t>(num_tokens * hidden), seed);
    const std::vector<double> gate = random_doubles(static_cast<size_t>(num_experts * hidden), seed + 1, -2.0, 2.0);
    const std::vector<double> w13 = random_doubles(static_cast<size_t>(num_experts * r13 * hidden), seed + 2);
    const std::vector<double> w2 = random_doubles(static_cast<size_t>(num_experts * hidden * ffn), seed + 3);
    const std::vector<double> gy = random_doubles(static_cast<size_t>(num_tokens * hidden), seed + 4);
    const double c_aux = 0.3, c_z = 0.2;

    auto logits_of = [&](const std::vector<double>& xx, const std::vector<double>& gg) {
        std::vector<double> l(static_cast<size_t>(num_tokens * num_experts), 0.0);
        for (int64_t t = 0; t < num_tokens; ++t)
            for (int64_t e = 0; e < num_experts; ++e)
                for (int64_t h = 0; h < hidden; ++h) l[t * num_experts + e] += xx[t * hidden + h] * gg[e * hidden + h];
        return l;
    };
    const std::vector<double> l0 = logits_of(x, gate);
    std::vector<float> l0f(l0.begin(), l0.end());
    std::vector<int32_t> ids;
    std::vector<float> wf;
    ref::route(cfg, l0f, {}, num_tokens, ids, wf);
    const ref::HostPlan plan = ref::build_plan(cfg, num_tokens, ids, wf);
    ASSERT_GT(plan.dropped(), 0) << "capacity must drop pairs here";
    const int32_t* off = plan.expert_offsets.data();

    auto loss = [&](const std::vector<double>& xx, const std::vector<double>& gg, const std::vector<double>& a13,
                    const std::vector<double>& a2) {
        const std::vector<double> l = logits_of(xx, gg);
        std::vector<double> w(static_cast<size_t>(num_tokens * k)), xp(static_cast<size_t>(max_rows * hidden)),
            g1(static_cast<size_t>(max_rows * r13)), h(static_cast<size_t>(max_rows * ffn)),
            o(static_cast<size_t>(max_rows * hidden)), y(static_cast<size_t>(num_tokens * hidden));
        ref::route_weights(cfg, l.data(), ids.data(), num_tokens, w.data());
        ref::gather_forward(xx.data(), plan.row_token.data(), max_rows, hidden, xp.data());
        ref::grouped_gemm_forward(off, num_experts, xp.data(), a13.data(), max_rows, r13, hidden, g1.data());
        ref::activation_forward(cfg.activation, g1.data(), max_rows, ffn, h.data());
        ref::grouped_gemm_forward(off, num_experts, h.data(), a2.data(), max_rows, hidden, ffn, o.data());
        ref::combine_forward(plan.slot_row.data(), w.data(), o.data(), nullptr, num_tokens, k, hidden, y.data());
        double aux = 0.0, z = 0.0;
        ref::router_losses(cfg, l.data(), ids.data(), num_tokens, &aux, &z);
        return dot(gy, y) + c_aux * aux + c_z * z;
    };

    // Backward, stage by stage.
    std::vector<double> w(static_cast<size_t>(num_tokens * k)), xp(static_cast<size_t>(max_rows * hidden)),
        g1(static_cast<size_t>(max_rows * r13)), h(static_cast<size_t>(max_rows * ffn)),
        o(static_cast<size_t>(max_rows * hidden));
    ref::route_weights(cfg, l0.data(), ids.data(), num_tokens, w.data());
    ref::gather_forward(x.data(), plan.row_token.data(), max_rows, hidden, xp.data());
    ref::grouped_gemm_forward(off, num_experts, xp.data(), w13.data(), max_rows, r13, hidden, g1.data());
    ref::activation_forward(cfg.activation, g1.data(), max_rows, ffn, h.data());
    ref::grouped_gemm_forward(off, num_experts, h.data(), w2.data(), max_rows, hidden, ffn, o.data());
    std::vector<double> d_o(o.size()), d_w(w.size()), d_h(h.size()), d_w2(w2.size()), d_g1(g1.size()),
        d_xp(xp.size()), d_w13(w13.size()), dx(x.size()), d_l(l0.size());
    ref::combine_backward(plan.slot_row.data(), w.data(), o.data(), gy.data(), num_tokens, k, hidden, max_rows,
                          d_o.data(), d_w.data());
    ref::grouped_gemm_backward(off, num_experts, h.data(), w2.data(), d_o.data(), max_rows, hidden, ffn, d_h.data(),
                               d_w2.data());
    ref::activation_backward(cfg.activation, g1.data(), d_h.data(), max_rows, ffn, d_g1.data());
    ref::grouped_gemm_backward(off, num_experts, xp.data(), w13.data(), d_g1.data(), max_rows, r13, hidden,
                               d_xp.data(), d_w13.data());
    ref::gather_backward(plan.slot_row.data(), d_xp.data(), num_tokens, k, hidden, dx.data());
    ref::route_backward(cfg, l0.data(), ids.data(), d_w.data(), num_tokens, d_l.data());
    ref::router_losses_backward(cfg, l0.data(), ids.data(), num_tokens, c_aux, c_z, d_l.data());
    std::vector<double> d_gate(gate.size(), 0.0);
    for (int64_t t = 0; t < num_tokens; ++t)
        for (int64_t e = 0; e < num_experts; ++e)
            for (int64_t hh = 0; hh < hidden; ++hh) {
                dx[t * hidden + hh] += d_l[t * num_experts + e] * gate[e * hidden + hh];
                d_gate[e * hidden + hh] += d_l[t * num_experts + e] * x[t * hidden + hh];
            }

    expect_fd_gradient([&](const std::vector<double>& v) { return loss(v, gate, w13, w2); }, x, dx, "dx");
    expect_fd_gradient([&](const std::vector<double>& v) { return loss(x, v, w13, w2); }, gate, d_gate, "d_gate");
    expect_fd_gradient([&](const std::vector<double>& v) { return loss(x, gate, v, w2); }, w13, d_w13, "d_w13");
    expect_fd_gradient([&](const std::vector<double>& v) { return loss(x, gate, w13, v); }, w2, d_w2, "d_w2");
}

// The router GEMM's gradients on the CPU (the router_gemm_backward stage): dx = d . gate and dgate = d^T . x, each
// element the double sum of the exact products stored through fp32 (as every CPU stage stores), for fp32 and bf16
// operands; one gradient alone leaves the other untouched; shapes, dtypes and fp64 x are refused.
TEST(BackwardRef, RouterGemmBackwardIsTheExactSums) {
    const int64_t T = 37, H = 24, E = 5;
    for (DType t : {DType::kF32, DType::kBF16}) {
        SCOPED_TRACE(to_string(t));
        using test::HostTensor;
        const HostTensor x = HostTensor::from_floats(random_uniform(T * H, 91, -2.0f, 2.0f), t, {T, H});
        const HostTensor gate = HostTensor::from_floats(random_uniform(E * H, 92, -1.0f, 1.0f), t, {E, H});
        const HostTensor d = HostTensor::from_floats(random_uniform(T * E, 93, -3.0f, 3.0f), DType::kF32, {T, E});
        const std::vector<float> xf = x.to_floats(), gf = gate.to_floats(), df = d.to_floats();
        HostTensor dx(t, {T, H}), dg(t, {E, H});
        router_gemm_backward(x.ref(), gate.ref(), d.ref(), dx.ref(), dg.ref(), nullptr, 0);
        const std::vector<float> got_dx = dx.to_floats(), got_dg = dg.to_floats();
        for (int64_t i = 0; i < T; ++i)
            for (int64_t h = 0; h < H; ++h) {
                double s = 0.0;
                for (int64_t e = 0; e < E; ++e) s += static_cast<double>(df[i * E + e]) * gf[e * H + h];
                ASSERT_EQ(got_dx[i * H + h], round_to(t, static_cast<float>(s))) << "dx[" << i << ", " << h << "]";
            }
        for (int64_t e = 0; e < E; ++e)
            for (int64_t h = 0; h < H; ++h) {
                double s = 0.0;
                for (int64_t i = 0; i < T; ++i) s += static_cast<double>(df[i * E + e]) * xf[i * H + h];
                ASSERT_EQ(got_dg[e * H + h], round_to(t, static_cast<float>(s))) << "dgate[" << e << ", " << h << "]";
            }
        HostTensor dx_only(t, {T, H});
        router_gemm_backward(x.ref(), gate.ref(), d.ref(), dx_only.ref(), TensorRef(), nullptr, 0);
        EXPECT_EQ(dx_only.to_floats(), got_dx);
    }
    using test::HostTensor;
    const HostTensor x(DType::kF32, {T, H}), gate(DType::kF32, {E, H}), d(DType::kF32, {T, E});
    HostTensor dx(DType::kF32, {T, H}), dg(DType::kF32, {E, H});
    test::expect_error([&] {
        router_gemm_backward(x.ref(), gate.ref(), HostTensor(DType::kF32, {T, E + 1}).ref(), dx.ref(), dg.ref(),
                             nullptr, 0);
    }, {"d_logits"});
    test::expect_error([&] {
        router_gemm_backward(x.ref(), gate.ref(), d.ref(), HostTensor(DType::kBF16, {T, H}).ref(), dg.ref(), nullptr,
                             0);
    }, {"dx"});
    test::expect_error([&] {
        router_gemm_backward(x.ref(), HostTensor(DType::kF32, {0, H}).ref(), HostTensor(DType::kF32, {T, 0}).ref(),
                             dx.ref(), TensorRef(), nullptr, 0);
    }, {"no expert"});
    test::expect_error([&] {
        const HostTensor x64(DType::kF64, {T, H});
        router_gemm_backward(x64.ref(), gate.ref(), d.ref(), TensorRef(), dg.ref(), nullptr, 0);
    }, {"fp64"});
}

}  // namespace
}  // namespace switchyard
