// tests/test_balance.cpp: load balancing and routing variants on the CPU (src/ref/balance.cpp, src/api/balance.cpp,
// the config fields of routing variants).
//
//   - config: expert-choice restrictions, E not a multiple of the group count, eval capacity factor, C formula;
//   - aux-loss-free bias update: by hand (exact), through both public overloads, rate validation; the bias never
//     changes combine weights;
//   - sequence-level aux loss: one sequence = LoadStats::aux_loss; several = mean of per-sequence router_stats
//     (an independent path); bad lengths rejected;
//   - router_losses (public API) = router_stats / sequence_aux_loss;
//   - expert-choice routing: brute-force check of every pick (scores recomputed here), rows, weights, stats; ties to
//     the lower token; a layer forward equal to a per-pair recomputation (exact: same double arithmetic);
//   - capacity in training vs evaluation, and every token preferring one expert (drops counted);
//   - the balance simulation: aux-loss-free updates bring max/mean from its skewed start to within 1.1.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "ref/ref.h"
#include "switchyard/balance.h"
#include "switchyard/error.h"
#include "switchyard/moe_layer.h"
#include "test_util.h"

namespace switchyard {
namespace {

using test::HostTensor;

void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
    try {
        fn();
        ADD_FAILURE() << "expected switchyard::Error";
    } catch (const Error& e) {
        const std::string msg = e.what();
        for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "message '" << msg << "' lacks '" << p << "'";
    }
}

MoEConfig ec_config(int64_t E = 6, double cf = 0.0) {
    MoEConfig c = test::tiny_config();
    c.num_experts = E;
    c.top_k = 2;
    c.routing_mode = RoutingMode::kExpertChoice;
    c.capacity_factor = cf;
    return c;
}

// ---- config ------------------------------------------------------------------------------------------------------

TEST(BalanceConfig, ExpertChoiceRestrictionsAndGroups) {
    MoEConfig c = ec_config();
    c.validate();
    MoEConfig bad = c;
    bad.score_function = ScoreFunction::kTopkSoftmax;
    expect_error([&] { bad.validate(); }, {"topk-softmax", "expert-choice"});
    bad = c;
    bad.use_score_bias = true;
    expect_error([&] { bad.validate(); }, {"use_score_bias", "expert-choice"});
    bad = test::tiny_config();
    bad.num_experts = 10;
    bad.num_groups = 4;
    expect_error([&] { bad.validate(); }, {"num_experts=10", "not a multiple of the group count", "num_groups=4"});
    bad = test::tiny_config();
    bad.bias_update_rate = -1;
    expect_error([&] { bad.validate(); }, {"bias_update_rate=-1"});
    bad = test::tiny_config();
    bad.eval_capacity_factor = std::numeric_limits<double>::infinity();
    expect_error([&] { bad.validate(); }, {"eval_capacity_factor"});
    EXPECT_EQ(parse_routing_mode("expert-choice"), RoutingMode::kExpertChoice);
    EXPECT_EQ(parse_routing_mode("token-choice"), RoutingMode::kTokenChoice);
    expect_error([] { parse_routing_mode("both"); }, {"routing='both'"});
}

TEST(BalanceConfig, CapacitiesAndEvalConfig) {
    MoEConfig c = ec_config(6, 0.0);               // c = top_k = 2
    EXPECT_EQ(c.expert_choice_capacity(10), 4);    // ceil(2 * 10 / 6)
    c.capacity_factor = 1.0;
    EXPECT_EQ(c.expert_choice_capacity(10), 2);    // ceil(10 / 6)
    c.min_capacity = 3;
    EXPECT_EQ(c.expert_choice_capacity(10), 3);
    c.min_capacity = 50;
    EXPECT_EQ(c.expert_choice_capacity(10), 10);   // never more than T
    EXPECT_EQ(c.expert_choice_capacity(0), 0);
    EXPECT_EQ(c.route_slots(), 6);
    MoEConfig t = test::tiny_config();  // E=4, k=2
    t.capacity_factor = 1.0;
    t.eval_capacity_factor = 2.0;
    EXPECT_EQ(t.capacity(8), 4);
    EXPECT_EQ(t.eval_config().capacity(8), 8);
    t.eval_capacity_factor = -1.0;
    EXPECT_EQ(t.eval_config().capacity(8), 4);
    t.eval_capacity_factor = 0.0;  // dropless evaluation
    EXPECT_EQ(t.eval_config().capacity(8), 0);
    EXPECT_EQ(t.route_slots(), 2);
}

// ---- bias update -------------------------------------------------------------------------------------------------

TEST(BiasUpdate, ByHandExact) {
    const std::vector<int64_t> counts = {5, 1, 3, 3, 0, 6};  // mean 3
    std::vector<float> bias = {0.25f, -0.5f, 1.0f, 0.0f, 0.125f, -2.0f};
    ref::update_score_bias(0.0625, counts.data(), 6, bias.data());
    const std::vector<float> want = {0.1875f, -0.4375f, 1.0f, 0.0f, 0.1875f, -2.0625f};
    EXPECT_TRUE(test::all_equal(bias, want, {6}));
}

TEST(BiasUpdate, PublicOverloadsAgreeAndValidate) {
    const uint64_t seed = 11;
    SCOPED_TRACE(test::seed_trace(seed));
    const int64_t E = 37;
    std::vector<float> b0 = test::random_uniform(E, seed, -0.1f, 0.1f);
    std::vector<int32_t> c32(E);
    LoadStats st;
    st.expert_counts.resize(E);
    const std::vector<float> r = test::random_ints(E, seed + 1, 0, 9);
    for (int64_t e = 0; e < E; ++e) c32[e] = static_cast<int32_t>(r[e]), st.expert_counts[e] = c32[e];
    std::vector<float> b1 = b0, b2 = b0, b3 = b0;
    update_score_bias(1e-3, TensorRef(c32.data(), DType::kI32, {E}), TensorRef(b1.data(), DType::kF32, {E}));
    update_score_bias(1e-3, st, TensorRef(b2.data(), DType::kF32, {E}));
    ref::update_score_bias(1e-3, st.expert_counts.data(), E, b3.data());
    EXPECT_TRUE(test::all_equal(b1, b3, {E}));
    EXPECT_TRUE(test::all_equal(b2, b3, {E}));
    int64_t total = 0;
    for (int32_t c : c32) total += c;
    int changed = 0;
    for (int64_t e = 0; e < E; ++e) {
        const double expect = total > E * c32[e] ? 1e-3 : (total < E * c32[e] ? -1e-3 : 0.0);
        EXPECT_EQ(b3[e], static_cast<float>(static_cast<double>(b0[e]) + expect)) << "expert " << e;
        changed += b3[e] != b0[e];
    }
    EXPECT_GT(changed, 0);
    expect_error([&] { update_score_bias(-1.0, st, TensorRef(b2.data(), DType::kF32, {E})); }, {"rate=-1"});
    expect_error([&] { update_score_bias(1e-3, TensorRef(c32.data(), DType::kI32, {E - 1}), TensorRef(b1.data(), DType::kF32, {E})); },
                 {"expert_counts", "[37]"});
}

TEST(BiasUpdate, BiasChangesSelectionNotWeights) {
    const uint64_t seed = 12;
    SCOPED_TRACE(test::seed_trace(seed));
    MoEConfig c = test::tiny_config();
    c.num_experts = 8;
    c.top_k = 3;
    c.score_function = ScoreFunction::kSigmoid;
    c.use_score_bias = true;
    const int64_t T = 64, E = 8;
    const std::vector<float> logits = test::random_uniform(T * E, seed, -2.f, 2.f);
    std::vector<float> bias = test::random_uniform(E, seed + 1, -0.5f, 0.5f);
    std::vector<int32_t> ids;
    std::vector<float> w;
    ref::route(c, logits, bias, T, ids, w);
    int moved = 0;
    std::vector<int32_t> ids0;
    std::vector<float> w0;
    MoEConfig nb = c;
    nb.use_score_bias = false;
    ref::route(nb, logits, {}, T, ids0, w0);
    for (int64_t i = 0; i < T * 3; ++i) {
        const double s = 1.0 / (1.0 + std::exp(-static_cast<double>(logits[(i / 3) * E + ids[i]])));
        ASSERT_EQ(w[i], static_cast<float>(s)) << "pair " << i << ": weight must be the unbiased sigmoid score";
        moved += ids[i] != ids0[i];
    }
    EXPECT_GT(moved, 0) << "the bias should change some selections (else this test sees nothing)";
}

// ---- sequence aux loss / router_losses -------------------------------------------------------------------------

struct Routed {
    std::vector<float> logits;
    std::vector<int32_t> ids;
    std::vector<float> w;
};

Routed route_random(const MoEConfig& c, int64_t T, uint64_t seed) {
    Routed r;
    r.logits = test::random_uniform(T * c.num_experts, seed, -3.f, 3.f);
    for (int64_t t = 0; t < T; ++t) r.logits[t * c.num_experts + (t % 3)] += 2.0f;  // a skew
    ref::route(c, r.logits, {}, T, r.ids, r.w);
    return r;
}

TEST(SequenceAuxLoss, MatchesPerSequenceRouterStats) {
    for (ScoreFunction sf : {ScoreFunction::kSoftmax, ScoreFunction::kSigmoid, ScoreFunction::kTopkSoftmax}) {
        const uint64_t seed = 20 + static_cast<uint64_t>(sf);
        SCOPED_TRACE(test::seed_trace(seed));
        MoEConfig c = test::tiny_config();
        c.num_experts = 7;
        c.top_k = 2;
        c.score_function = sf;
        const int64_t T = 50, E = 7, k = 2;
        const Routed r = route_random(c, T, seed);
        LoadStats all;
        ref::router_stats(c, r.logits, r.ids, T, all);
        EXPECT_NEAR(ref::sequence_aux_loss(c, r.logits, r.ids, T, {T}), all.aux_loss, 1e-14 * all.aux_loss);
        const std::vector<int64_t> lens = {13, 0, 1, 30, 6};
        double want = 0;
        int64_t begin = 0, n = 0;
        for (int64_t len : lens) {
            if (len == 0) continue;
            std::vector<float> l(r.logits.begin() + begin * E, r.logits.begin() + (begin + len) * E);
            std::vector<int32_t> id(r.ids.begin() + begin * k, r.ids.begin() + (begin + len) * k);
            LoadStats s;
            ref::router_stats(c, l, id, len, s);
            want += s.aux_loss;
            ++n;
            begin += len;
        }
        want /= static_cast<double>(n);
        const double got = ref::sequence_aux_loss(c, r.logits, r.ids, T, lens);
        EXPECT_NEAR(got, want, 1e-14 * want);
        EXPECT_GT(std::fabs(got - all.aux_loss), 1e-6) << "sequences should differ from the batch loss here";
        expect_error([&] { ref::sequence_aux_loss(c, r.logits, r.ids, T, {10, 10}); }, {"sum to 20", "num_tokens=50"});
        EXPECT_EQ(ref::sequence_aux_loss(c, {}, {}, 0, {0, 0}), 0.0);

        // The public API (CPU tensors): {aux, z, seq_aux} rounded to fp32.
        std::vector<float> losses(3, -1.f);
        std::vector<int32_t> lens32(lens.begin(), lens.end());
        router_losses(c, TensorRef(const_cast<float*>(r.logits.data()), DType::kF32, {T, E}),
                      TensorRef(const_cast<int32_t*>(r.ids.data()), DType::kI32, {T, k}),
                      TensorRef(lens32.data(), DType::kI32, {5}), TensorRef(losses.data(), DType::kF32, {3}));
        EXPECT_EQ(losses[kLossAux], static_cast<float>(all.aux_loss));
        EXPECT_EQ(losses[kLossZ], static_cast<float>(all.z_loss));
        EXPECT_EQ(losses[kLossSeqAux], static_cast<float>(got));
    }
}

// ---- expert choice -----------------------------------------------------------------------------------------------

// Scores as the test computes them (softmax or sigmoid in double, straightforward formulas).
std::vector<double> ec_scores(const MoEConfig& c, const std::vector<float>& logits, int64_t T) {
    const int64_t E = c.num_experts;
    std::vector<double> s(T * E);
    for (int64_t t = 0; t < T; ++t) {
        if (c.score_function == ScoreFunction::kSigmoid) {
            for (int64_t e = 0; e < E; ++e) s[t * E + e] = 1.0 / (1.0 + std::exp(-static_cast<double>(logits[t * E + e])));
        } else {
            double m = -INFINITY, z = 0;
            for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<double>(logits[t * E + e]));
            for (int64_t e = 0; e < E; ++e) z += std::exp(logits[t * E + e] - m);
            for (int64_t e = 0; e < E; ++e) s[t * E + e] = std::exp(logits[t * E + e] - m) / z;
        }
    }
    return s;
}

// Checks a plan against the definition; returns the number of tokens no expert took.
int64_t check_ec_plan(const MoEConfig& c, const std::vector<float>& logits, int64_t T, const ref::HostPlan& p) {
    const int64_t E = c.num_experts, C = c.expert_choice_capacity(T);
    const std::vector<double> s = ec_scores(c, logits, T);
    EXPECT_TRUE(p.expert_choice);
    EXPECT_EQ(p.top_k, E);
    EXPECT_EQ(p.capacity, C);
    EXPECT_EQ(p.dropped(), 0);
    EXPECT_EQ(p.num_rows(), E * C);
    for (int64_t e = 0; e < E; ++e) {
        EXPECT_EQ(p.expert_counts[e], C) << "expert " << e;
        EXPECT_EQ(p.expert_offsets[e], e * C) << "expert " << e;
        // The picked tokens are the C best by (score desc, token asc), listed in token order.
        std::vector<int64_t> order(T);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s[a * E + e] > s[b * E + e]; });
        std::vector<int64_t> best(order.begin(), order.begin() + C);
        std::sort(best.begin(), best.end());
        for (int64_t i = 0; i < C; ++i) {
            const int64_t row = e * C + i, t = best[i];
            EXPECT_EQ(p.row_token[row], t) << "expert " << e << " pick " << i;
            EXPECT_EQ(p.row_slot[row], t * E + e) << "expert " << e << " pick " << i;
            EXPECT_EQ(p.slot_row[t * E + e], row) << "token " << t << " expert " << e;
        }
    }
    for (int64_t r = E * C; r < T * E; ++r) EXPECT_EQ(p.row_token[r], -1) << "row " << r;
    int64_t unrouted = 0;
    for (int64_t t = 0; t < T; ++t) {
        double sum = 0;
        int n = 0;
        for (int64_t e = 0; e < E; ++e)
            if (p.slot_row[t * E + e] >= 0) sum += s[t * E + e], ++n;
        unrouted += n == 0;
        for (int64_t e = 0; e < E; ++e) {
            const bool picked = p.slot_row[t * E + e] >= 0;
            EXPECT_EQ(p.topk_ids[t * E + e], picked ? e : -1) << "token " << t << " expert " << e;
            double w = picked ? s[t * E + e] : 0.0;
            if (picked && c.renormalize) w /= sum;
            w *= picked ? c.routed_scale : 1.0;
            EXPECT_NEAR(p.topk_weights[t * E + e], w, 1e-6 * std::fabs(w) + 1e-30) << "token " << t << " expert " << e;
        }
    }
    return unrouted;
}

TEST(ExpertChoice, PlanMatchesDefinition) {
    struct Case {
        int64_t T, E;
        double cf;
        ScoreFunction sf;
        bool renorm;
    };
    const Case cases[] = {{40, 6, 0.0, ScoreFunction::kSoftmax, false},
                          {33, 8, 1.0, ScoreFunction::kSigmoid, true},
                          {7, 5, 3.0, ScoreFunction::kSoftmax, true},
                          {1, 4, 0.0, ScoreFunction::kSigmoid, false},
                          {64, 16, 0.5, ScoreFunction::kSoftmax, false}};
    for (const Case& k : cases) {
        const uint64_t seed = 40 + k.T * 7 + k.E;
        SCOPED_TRACE(test::seed_trace(seed) + " T=" + std::to_string(k.T) + " E=" + std::to_string(k.E));
        MoEConfig c = ec_config(k.E, k.cf);
        c.score_function = k.sf;
        c.renormalize = k.renorm;
        c.routed_scale = 1.5;
        std::vector<float> logits = test::random_uniform(k.T * k.E, seed, -3.f, 3.f);
        for (int64_t t = 0; t < k.T; ++t) logits[t * k.E] += 1.5f;  // expert 0 favoured: some tokens get nothing
        const ref::HostPlan p = ref::route_expert_choice(c, logits, k.T);
        const int64_t unrouted = check_ec_plan(c, logits, k.T, p);
        LoadStats st;
        ref::expert_choice_stats(c, logits, p, st);
        EXPECT_EQ(st.unrouted_tokens, unrouted);
        EXPECT_EQ(st.dropped, 0);
        EXPECT_EQ(st.num_pairs(), k.E * c.expert_choice_capacity(k.T));
        EXPECT_DOUBLE_EQ(st.max_over_mean(), k.T > 0 ? 1.0 : 0.0);
        EXPECT_EQ(st.cv, 0.0);
    }
}

TEST(ExpertChoice, IdenticalTokensTieToLowerIndex) {
    MoEConfig c = ec_config(4, 1.0);  // C = ceil(12 / 4) = 3
    const int64_t T = 12, E = 4;
    std::vector<float> logits(T * E);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t e = 0; e < E; ++e) logits[t * E + e] = e == 2 ? 3.0f : 0.5f;  // every token prefers expert 2
    const ref::HostPlan p = ref::route_expert_choice(c, logits, T);
    for (int64_t e = 0; e < E; ++e)
        for (int64_t i = 0; i < 3; ++i) EXPECT_EQ(p.row_token[e * 3 + i], i) << "expert " << e;  // tokens 0, 1, 2
    EXPECT_EQ(check_ec_plan(c, logits, T, p), T - 3);
}

TEST(ExpertChoice, LayerForwardEqualsPerPairRecomputation) {
    for (DType dt : {DType::kF32, DType::kBF16}) {
        const uint64_t seed = 60 + static_cast<uint64_t>(dt);
        SCOPED_TRACE(test::seed_trace(seed) + " dtype=" + to_string(dt));
        MoEConfig c = ec_config(6, 1.5);
        c.dtype = dt;
        c.hidden_size = 16;
        c.ffn_size = 12;
        c.num_shared_experts = 1;
        c.shared_ffn_size = 8;
        const int64_t T = 21, H = 16, E = 6;
        const test::HostLayer L = test::random_layer(c, seed);
        const std::vector<float> xf = test::rounded(test::random_uniform(T * H, seed + 9), dt);
        const HostTensor x = HostTensor::from_floats(xf, dt, {T, H});
        HostTensor y(dt, {T, H}), ids(DType::kI32, {T, E}), w(DType::kF32, {T, E}), slot(DType::kI32, {T, E}),
            counts(DType::kI32, {E});
        LoadStats st;
        ForwardOutputs out;
        out.topk_ids = ids.ref();
        out.topk_weights = w.ref();
        out.slot_row = slot.ref();
        out.expert_counts = counts.ref();
        out.stats = &st;
        MoELayer layer(c, L.weights());
        layer.forward(x.ref(), y.ref(), &out);

        // Independent recomputation: every picked (token, expert) through expert_mlp alone, summed in expert order.
        ref::HostPlan p = ref::route_expert_choice(
            c, ref::router_logits(xf, L.gate.to_floats(), T, H, E), T);
        EXPECT_TRUE(test::all_equal(std::vector<int32_t>(ids.ptr<int32_t>(), ids.ptr<int32_t>() + T * E), p.topk_ids,
                                    {T, E}));
        const int64_t C = c.expert_choice_capacity(T);
        for (int64_t e = 0; e < E; ++e) EXPECT_EQ(counts.ptr<int32_t>()[e], C);
        const std::vector<float> w13 = L.w13.to_floats(), w2 = L.w2.to_floats();
        const std::vector<float> sw13 = L.shared_w13.to_floats(), sw2 = L.shared_w2.to_floats();
        std::vector<float> want(T * H), one(H), sh(H);
        for (int64_t t = 0; t < T; ++t) {
            std::vector<double> acc(H, 0.0);
            for (int64_t e = 0; e < E; ++e) {
                if (p.slot_row[t * E + e] < 0) continue;
                ref::expert_mlp(c.activation, dt, xf.data() + t * H, 1, H, c.ffn_size,
                                w13.data() + e * 2 * c.ffn_size * H, w2.data() + e * H * c.ffn_size, one.data());
                for (int64_t h = 0; h < H; ++h) acc[h] += static_cast<double>(p.topk_weights[t * E + e]) * one[h];
            }
            ref::expert_mlp(c.activation, dt, xf.data() + t * H, 1, H, 8, sw13.data(), sw2.data(), sh.data());
            for (int64_t h = 0; h < H; ++h) want[t * H + h] = round_to(dt, static_cast<float>(acc[h] + sh[h]));
        }
        EXPECT_TRUE(test::all_equal(y.to_floats(), want, {T, H}));
        EXPECT_EQ(st.dropped, 0);
        EXPECT_EQ(st.expert_counts, std::vector<int64_t>(E, C));
    }
}

// ---- capacity ----------------------------------------------------------------------------------------------------

TEST(Capacity, EveryTokenPrefersOneExpertTrainVsEval) {
    MoEConfig c = test::tiny_config();  // E=4, k=2
    c.capacity_factor = 1.0;            // C = ceil(T*2/4) = T/2
    c.eval_capacity_factor = 4.0;       // C = 2T: nothing dropped in evaluation
    const int64_t T = 16, E = 4, k = 2;
    std::vector<float> logits(T * E);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t e = 0; e < E; ++e) logits[t * E + e] = e == 1 ? 4.0f : (e == 3 ? 2.0f : static_cast<float>(t % 3) * 0.1f);
    std::vector<int32_t> ids;
    std::vector<float> w;
    ref::route(c, logits, {}, T, ids, w);
    for (int64_t t = 0; t < T; ++t) ASSERT_EQ(ids[t * k], 1) << "token " << t;
    for (DropPolicy dp : {DropPolicy::kPosition, DropPolicy::kProbability}) {
        c.drop_policy = dp;
        const ref::HostPlan train = ref::build_plan(c, T, ids, w);
        EXPECT_EQ(train.capacity, 8);
        EXPECT_EQ(train.dropped(), 16) << "experts 1 and 3 get 16 pairs each, capacity 8";
        const ref::HostPlan eval = ref::build_plan(c.eval_config(), T, ids, w);
        EXPECT_EQ(eval.capacity, T);  // ceil(4 * 16 * 2 / 4) = 32, clamped to T (no expert gets more than T pairs)
        EXPECT_EQ(eval.dropped(), 0);
    }
    LoadStats st;
    st.num_tokens = T;
    st.top_k = k;
    st.expert_counts = {0, 16, 0, 16};
    st.dropped = 16;
    finalize_load_stats(c, st);
    EXPECT_EQ(st.dropped_fraction(), 0.5);
    EXPECT_EQ(st.max_over_mean(), 2.0);
    (void)E;
}

}  // namespace
}  // namespace switchyard
