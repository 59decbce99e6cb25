// tests/test_moe_ref.cpp: the CPU reference of the whole layer.
//   - gemm_nt: every micro-kernel this CPU runs is bitwise equal to the naive double loop (odd sizes that cross
//     every block boundary, fp32/bf16/fp16 weights);
//   - activations and expert MLPs by hand (small integers, each activation, each dtype's rounding);
//   - identity experts return the input exactly; dropped tokens get zeros (or the shared expert alone);
//   - MoELayer's CPU forward bitwise equal to a plain per-token implementation of the numerics contract
//     (moe_layer.h) over random configurations of every option, T = 0 and T = 1 included;
//   - results do not depend on the thread count;
//   - DISABLED_MixtralShape256Tokens: the timing of a Mixtral-shaped layer (run with
//     --gtest_also_run_disabled_tests --gtest_filter='*Mixtral*'); no timing assertion.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <limits>
#include <random>
#include <vector>

#include "ref/ref.h"
#include "switchyard/config.h"
#include "switchyard/error.h"
#include "switchyard/moe_layer.h"
#include "test_util.h"

namespace switchyard {
namespace {

using test::HostLayer;
using test::HostTensor;

// ---- gemm_nt ------------------------------------------------------------------------------------------------

TEST(GemmRef, EveryKernelMatchesTheNaiveLoopBitwise) {
    struct Shape {
        int64_t m, k, n;
    };
    const Shape shapes[] = {{1, 1, 1}, {7, 19, 13}, {33, 300, 50}, {250, 37, 200}, {9, 513, 25}, {3, 8, 400}};
    const auto kernels = ref::available_gemm_kernels();
    ASSERT_FALSE(kernels.empty());
    EXPECT_EQ(kernels.back(), "generic");
    uint64_t seed = 100;
    for (const Shape& s : shapes) {
        for (DType bt : {DType::kF32, DType::kBF16, DType::kF16}) {
            ++seed;
            SCOPED_TRACE(test::seed_trace(seed));
            SCOPED_TRACE("m=" + std::to_string(s.m) + " k=" + std::to_string(s.k) + " n=" + std::to_string(s.n) +
                         " b=" + to_string(bt));
            const auto a = test::random_uniform(s.m * s.k, seed, -2, 2);
            const HostTensor b =
                HostTensor::from_floats(test::random_uniform(s.n * s.k, seed + 1, -2, 2), bt, {s.n, s.k});
            const auto bf = b.to_floats();
            std::vector<double> want(s.m * s.n);
            for (int64_t i = 0; i < s.m; ++i)
                for (int64_t j = 0; j < s.n; ++j) {
                    double acc = 0.0;
                    for (int64_t kk = 0; kk < s.k; ++kk)
                        acc += static_cast<double>(a[i * s.k + kk]) * static_cast<double>(bf[j * s.k + kk]);
                    want[i * s.n + j] = acc;
                }
            for (const auto& kn : kernels) {
                SCOPED_TRACE("kernel " + kn);
                std::vector<double> got(s.m * s.n, -1.0);
                ref::gemm_nt_kernel(kn, a.data(), s.m, s.k, ref::MatView{b.data(), bt, s.n, s.k}, got.data());
                EXPECT_TRUE(test::all_equal(got, want, {s.m, s.n}));
            }
            std::vector<double> got(s.m * s.n);
            ref::gemm_nt(a.data(), s.m, s.k, ref::MatView{b.data(), bt, s.n, s.k}, got.data());
            EXPECT_TRUE(test::all_equal(got, want, {s.m, s.n}));
        }
    }
    EXPECT_THROW(ref::gemm_nt_kernel("no-such-kernel", nullptr, 0, 0, ref::MatView{}, nullptr), Error);
}

TEST(GemmRef, EmptySizes) {
    std::vector<double> c(6, 7.0);
    const std::vector<float> a(6, 1.0f);
    ref::gemm_nt(a.data(), 2, 0, ref::MatView{a.data(), DType::kF32, 3, 0}, c.data());  // k = 0: zeros
    EXPECT_EQ(c, std::vector<double>(6, 0.0));
    ref::gemm_nt(a.data(), 0, 3, ref::MatView{a.data(), DType::kF32, 2, 3}, nullptr);  // m = 0: nothing
}

// ---- activations and one expert ----------------------------------------------------------------------------

TEST(ActivationRef, Values) {
    EXPECT_EQ(ref::silu(0.0), 0.0);
    EXPECT_DOUBLE_EQ(ref::silu(1.0), 1.0 / (1.0 + std::exp(-1.0)));
    EXPECT_DOUBLE_EQ(ref::silu(-2.0), -2.0 / (1.0 + std::exp(2.0)));
    EXPECT_EQ(ref::gelu_tanh(0.0), 0.0);
    EXPECT_NEAR(ref::gelu_tanh(1.0), 0.8411919906082768, 1e-15);  // 0.5 (1 + tanh(sqrt(2/pi) 1.044715))
    EXPECT_NEAR(ref::gelu_tanh(-1.0), -0.15880800939172324, 1e-15);
    EXPECT_EQ(ref::apply_activation(Activation::kSwiGLU, 1.0, 3.0), 3.0 * ref::silu(1.0));
    EXPECT_EQ(ref::apply_activation(Activation::kGeGLU, 1.0, 3.0), 3.0 * ref::gelu_tanh(1.0));
    EXPECT_EQ(ref::apply_activation(Activation::kGELU, 5.0, 1.0), ref::gelu_tanh(1.0));  // gate ignored
    EXPECT_EQ(ref::apply_activation(Activation::kReLU, 5.0, -2.0), 0.0);
    EXPECT_EQ(ref::apply_activation(Activation::kReLU, 5.0, 2.5), 2.5);
}

// in = [1, 2]; gated w13 rows: gate {1,0}, {0,1}; up {1,1}, {2,-1} -> gate = [1, 2], up = [3, 0].
// w2 = [[1, 0], [2, 1]] -> out = [h0, 2 h0 + h1].
TEST(ExpertRef, GatedByHand) {
    const std::vector<float> in = {1, 2}, w13 = {1, 0, 0, 1, 1, 1, 2, -1}, w2 = {1, 0, 2, 1};
    for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
        for (Activation act : {Activation::kSwiGLU, Activation::kGeGLU}) {
            SCOPED_TRACE(std::string(to_string(act)) + " " + to_string(dt));
            std::vector<float> out(2);
            ref::expert_mlp(act, dt, in.data(), 1, 2, 2, w13.data(), w2.data(), out.data());
            const double g0 = act == Activation::kSwiGLU ? ref::silu(1.0) : ref::gelu_tanh(1.0);
            const float h0 = round_to(dt, static_cast<float>(g0 * 3.0));
            const float h1 = 0.0f;  // act(2) * 0
            EXPECT_EQ(out[0], round_to(dt, h0));
            EXPECT_EQ(out[1], round_to(dt, static_cast<float>(2.0 * h0 + h1)));
            EXPECT_NE(out[0], 0.0f);
        }
    }
}

// Ungated: w13 [[1, -1], [1, 1]] -> up = [-1, 3].
TEST(ExpertRef, UngatedByHand) {
    const std::vector<float> in = {1, 2}, w13 = {1, -1, 1, 1}, w2 = {1, 0, 2, 1};
    std::vector<float> out(2);
    ref::expert_mlp(Activation::kReLU, DType::kF32, in.data(), 1, 2, 2, w13.data(), w2.data(), out.data());
    EXPECT_EQ(out, (std::vector<float>{0.0f, 3.0f}));  // h = [0, 3]
    ref::expert_mlp(Activation::kGELU, DType::kBF16, in.data(), 1, 2, 2, w13.data(), w2.data(), out.data());
    const float h0 = round_to(DType::kBF16, static_cast<float>(ref::gelu_tanh(-1.0)));
    const float h1 = round_to(DType::kBF16, static_cast<float>(ref::gelu_tanh(3.0)));
    EXPECT_EQ(out[0], h0);
    EXPECT_EQ(out[1], round_to(DType::kBF16, static_cast<float>(2.0 * h0 + 1.0 * h1)));
}

TEST(ExpertRef, RejectsWrongWeightShapes) {
    std::vector<float> buf(64, 1.0f), out(8);
    EXPECT_THROW(ref::expert_mlp(Activation::kSwiGLU, DType::kF32, buf.data(), 1, 2, 2,
                                 ref::MatView{buf.data(), DType::kF32, 2, 2},
                                 ref::MatView{buf.data(), DType::kF32, 2, 2}, out.data()),
                 Error);  // gated needs 2F = 4 rows
}

// ---- whole layer ---------------------------------------------------------------------------------------------

// A plain per-token implementation of the contract in moe_layer.h (no gather, no blocking), sharing only the
// router selection and the plan, which test_router_ref / test_plan_ref check on their own.
struct NaiveOut {
    std::vector<float> y, logits, weights;
    std::vector<int32_t> ids, slot_row;
};

std::vector<float> naive_mlp(const MoEConfig& c, const float* x, const HostTensor& w13, const HostTensor& w2, int64_t e,
                             int64_t ffn) {
    const int64_t hidden = c.hidden_size;
    const bool gated = is_gated(c.activation);
    const int64_t r13 = gated ? 2 * ffn : ffn;
    std::vector<double> g(r13);
    for (int64_t r = 0; r < r13; ++r) {
        double acc = 0.0;
        for (int64_t h = 0; h < hidden; ++h)
            acc += static_cast<double>(x[h]) * static_cast<double>(w13.get((e * r13 + r) * hidden + h));
        g[r] = round_to(c.dtype, static_cast<float>(acc));  // GEMM1's outputs are stored in the layer dtype
    }
    std::vector<float> hv(ffn);
    for (int64_t f = 0; f < ffn; ++f) {
        double v;
        switch (c.activation) {
            case Activation::kSwiGLU:
                v = g[f] / (1.0 + std::exp(-g[f])) * g[ffn + f];
                break;
            case Activation::kGeGLU:
                v = ref::gelu_tanh(g[f]) * g[ffn + f];
                break;
            case Activation::kGELU:
                v = ref::gelu_tanh(g[f]);
                break;
            default:
                v = g[f] < 0 ? 0.0 : g[f];
                break;
        }
        hv[f] = round_to(c.dtype, static_cast<float>(v));
    }
    std::vector<float> out(hidden);
    for (int64_t h = 0; h < hidden; ++h) {
        double acc = 0.0;
        for (int64_t f = 0; f < ffn; ++f)
            acc += static_cast<double>(hv[f]) * static_cast<double>(w2.get((e * hidden + h) * ffn + f));
        out[h] = round_to(c.dtype, static_cast<float>(acc));
    }
    return out;
}

NaiveOut naive_forward(const HostLayer& L, const std::vector<float>& x, int64_t num_tokens) {
    const MoEConfig& c = L.cfg;
    const int64_t hidden = c.hidden_size, num_experts = c.num_experts, k = c.top_k;
    NaiveOut o;
    o.logits.resize(num_tokens * num_experts);
    for (int64_t t = 0; t < num_tokens; ++t)
        for (int64_t e = 0; e < num_experts; ++e) {
            double acc = 0.0;
            for (int64_t h = 0; h < hidden; ++h)
                acc += static_cast<double>(x[t * hidden + h]) * static_cast<double>(L.gate.get(e * hidden + h));
            o.logits[t * num_experts + e] = static_cast<float>(acc);
        }
    const std::vector<float> bias = c.use_score_bias ? L.score_bias.to_floats() : std::vector<float>();
    ref::route(c, o.logits, bias, num_tokens, o.ids, o.weights);
    const ref::HostPlan plan = ref::build_plan(c, num_tokens, o.ids, o.weights);
    o.slot_row = plan.slot_row;
    o.y.resize(num_tokens * hidden);
    for (int64_t t = 0; t < num_tokens; ++t) {
        std::vector<double> acc(hidden, 0.0);
        for (int64_t j = 0; j < k; ++j) {
            if (plan.slot_row[t * k + j] < 0) continue;
            const auto out = naive_mlp(c, x.data() + t * hidden, L.w13, L.w2, o.ids[t * k + j], c.ffn_size);
            for (int64_t h = 0; h < hidden; ++h)
                acc[h] += static_cast<double>(o.weights[t * k + j]) * static_cast<double>(out[h]);
        }
        if (c.num_shared_experts > 0) {
            const auto s = naive_mlp(c, x.data() + t * hidden, L.shared_w13, L.shared_w2, 0, c.shared_width());
            for (int64_t h = 0; h < hidden; ++h) acc[h] += static_cast<double>(s[h]);
        }
        for (int64_t h = 0; h < hidden; ++h) o.y[t * hidden + h] = round_to(c.dtype, static_cast<float>(acc[h]));
    }
    return o;
}

struct RefRun {
    std::vector<float> y, logits, weights;
    std::vector<int32_t> ids, slot_row;
    LoadStats stats;
    ref::HostPlan plan;
};

RefRun run_ref(const HostLayer& L, const HostTensor& x) {
    const MoEConfig& c = L.cfg;
    const int64_t num_tokens = x.shape()[0];
    HostTensor y(c.dtype, {num_tokens, c.hidden_size});
    HostTensor logits(DType::kF32, {num_tokens, c.num_experts}), ids(DType::kI32, {num_tokens, c.top_k}),
        w(DType::kF32, {num_tokens, c.top_k}), slot(DType::kI32, {num_tokens, c.top_k});
    RefRun r;
    ForwardOutputs out;
    out.logits = logits.ref();
    out.topk_ids = ids.ref();
    out.topk_weights = w.ref();
    out.slot_row = slot.ref();
    out.stats = &r.stats;
    // The product: MoELayer's CPU forward (the chain of public stages).
    const MoELayer layer(c, L.weights());
    layer.forward(x.ref(), y.ref(), &out);
    // The monolithic oracle gives the plan, and must agree bitwise.
    HostTensor y_oracle(c.dtype, {num_tokens, c.hidden_size});
    test::ref_moe_forward(c, L.weights(), x.ref(), y_oracle.ref(), nullptr, &r.plan);
    EXPECT_TRUE(test::all_equal(y.to_floats(), y_oracle.to_floats(), {num_tokens, c.hidden_size}));
    r.y = y.to_floats();
    r.logits = logits.to_floats();
    r.weights = w.to_floats();
    r.ids.assign(ids.ptr<int32_t>(), ids.ptr<int32_t>() + num_tokens * c.top_k);
    r.slot_row.assign(slot.ptr<int32_t>(), slot.ptr<int32_t>() + num_tokens * c.top_k);
    return r;
}

MoEConfig random_config(std::mt19937_64& gen) {
    MoEConfig c;
    c.hidden_size = 1 + static_cast<int64_t>(gen() % 24);
    c.ffn_size = 1 + static_cast<int64_t>(gen() % 20);
    const int64_t group_choices[] = {1, 1, 2, 4};
    c.num_groups = group_choices[gen() % 4];
    c.num_experts = c.num_groups * (1 + static_cast<int64_t>(gen() % 6));
    c.topk_groups = 1 + static_cast<int64_t>(gen() % c.num_groups);
    const int64_t reachable = c.num_groups > 1 ? c.topk_groups * (c.num_experts / c.num_groups) : c.num_experts;
    c.top_k = 1 + static_cast<int64_t>(gen() % std::min<int64_t>(reachable, 4));
    c.score_function = static_cast<ScoreFunction>(gen() % 3);
    c.renormalize = gen() % 2;
    c.routed_scale = (gen() % 3 == 0) ? 2.5 : 1.0;
    c.use_score_bias = gen() % 3 == 0;
    const double factors[] = {0.0, 0.0, 0.75, 1.0, 1.5};
    c.capacity_factor = factors[gen() % 5];
    c.min_capacity = static_cast<int64_t>(gen() % 2);
    c.drop_policy = static_cast<DropPolicy>(gen() % 2);
    c.activation = static_cast<Activation>(gen() % 4);
    c.num_shared_experts = static_cast<int64_t>(gen() % 3);
    c.shared_ffn_size = c.num_shared_experts > 0 ? 1 + static_cast<int64_t>(gen() % 8) : 0;
    c.aux_loss_coef = 0.01;
    c.z_loss_coef = 0.001;
    c.dtype = static_cast<DType>(gen() % 3);
    return c;
}

TEST(MoERef, RandomConfigsMatchThePlainImplementationBitwise) {
    for (uint64_t seed = 1; seed <= 60; ++seed) {
        SCOPED_TRACE(test::seed_trace(seed));
        std::mt19937_64 gen(seed);
        const MoEConfig c = random_config(gen);
        SCOPED_TRACE(c.to_string());
        ASSERT_NO_THROW(c.validate());
        const DType wdt = static_cast<DType>(gen() % 3);
        const int64_t token_choices[] = {0, 1, 2, 17, 40};
        const int64_t num_tokens = token_choices[gen() % 5];
        const HostLayer L = test::random_layer(c, seed, wdt);
        const HostTensor x = HostTensor::from_floats(
            test::random_uniform(num_tokens * c.hidden_size, seed + 500, -2, 2), c.dtype, {num_tokens, c.hidden_size});
        const RefRun r = run_ref(L, x);
        const NaiveOut n = naive_forward(L, x.to_floats(), num_tokens);
        EXPECT_TRUE(test::all_equal(r.logits, n.logits, {num_tokens, c.num_experts})) << "logits";
        EXPECT_TRUE(test::all_equal(r.ids, n.ids, {num_tokens, c.top_k})) << "topk_ids";
        EXPECT_TRUE(test::all_equal(r.weights, n.weights, {num_tokens, c.top_k})) << "topk_weights";
        EXPECT_TRUE(test::all_equal(r.slot_row, n.slot_row, {num_tokens, c.top_k})) << "slot_row";
        EXPECT_TRUE(test::all_equal(r.y, n.y, {num_tokens, c.hidden_size})) << "y";
        // Stats: counts before drops, kept counts from the plan, losses from their formulas.
        ASSERT_EQ(static_cast<int64_t>(r.stats.kept_counts.size()), c.num_experts);
        int64_t kept = 0;
        double aux = 0.0;
        for (int64_t e = 0; e < c.num_experts; ++e) {
            kept += r.stats.kept_counts[e];
            EXPECT_LE(r.stats.kept_counts[e], r.stats.expert_counts[e]);
            if (num_tokens > 0)
                aux += static_cast<double>(r.stats.expert_counts[e]) / (num_tokens * c.top_k) * r.stats.mean_prob[e];
        }
        EXPECT_EQ(kept + r.stats.dropped, num_tokens * c.top_k);
        EXPECT_EQ(r.stats.dropped, r.plan.dropped());
        EXPECT_NEAR(r.stats.aux_loss, c.num_experts * aux, 1e-12);
        EXPECT_NEAR(r.stats.weighted_loss, 0.01 * r.stats.aux_loss + 0.001 * r.stats.z_loss, 1e-12);
        if (HasFailure()) return;
    }
}

// Sizes that cross the GEMM blocks (240 rows, 256-deep k) inside the layer.
TEST(MoERef, LargeExpertBlocksMatchThePlainImplementation) {
    const uint64_t seed = 77;
    SCOPED_TRACE(test::seed_trace(seed));
    MoEConfig c;
    c.hidden_size = 37;
    c.ffn_size = 300;
    c.num_experts = 2;
    c.top_k = 2;  // every token on both experts: 300 rows each
    c.num_shared_experts = 1;
    c.shared_ffn_size = 270;
    c.dtype = DType::kBF16;
    const int64_t num_tokens = 300;
    const HostLayer L = test::random_layer(c, seed, DType::kBF16);
    const HostTensor x = HostTensor::from_floats(test::random_uniform(num_tokens * c.hidden_size, seed, -2, 2), c.dtype,
                                                 {num_tokens, c.hidden_size});
    const RefRun r = run_ref(L, x);
    const NaiveOut n = naive_forward(L, x.to_floats(), num_tokens);
    EXPECT_TRUE(test::all_equal(r.y, n.y, {num_tokens, c.hidden_size}));
}

TEST(MoERef, IndependentOfThreadCount) {
    const uint64_t seed = 5;
    SCOPED_TRACE(test::seed_trace(seed));
    MoEConfig c = test::tiny_config(DType::kBF16);
    c.hidden_size = 64;
    c.ffn_size = 96;
    c.num_experts = 8;
    c.top_k = 3;
    c.num_shared_experts = 1;
    c.shared_ffn_size = 32;
    const HostLayer L = test::random_layer(c, seed, DType::kBF16);
    const HostTensor x =
        HostTensor::from_floats(test::random_uniform(123 * c.hidden_size, seed), c.dtype, {123, c.hidden_size});
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    const RefRun one = run_ref(L, x);
    omp_set_num_threads(std::max(2, saved));
    const RefRun two = run_ref(L, x);
    omp_set_num_threads(saved);
    EXPECT_TRUE(test::all_equal(one.y, two.y, {123, c.hidden_size}));
}

// Identity experts: ReLU, F = H, w13 = w2 = I, positive inputs. With k = 1 and renormalisation the weight is
// exactly 1, so y == x bit for bit, in every dtype; a shared identity expert doubles it (exact).
HostLayer identity_layer(const MoEConfig& c, uint64_t seed) {
    HostLayer L = test::random_layer(c, seed, DType::kF32);
    const int64_t hidden = c.hidden_size;
    for (int64_t e = 0; e < c.num_experts; ++e)
        for (int64_t i = 0; i < hidden; ++i)
            for (int64_t j = 0; j < hidden; ++j) {
                L.w13.set((e * hidden + i) * hidden + j, i == j ? 1.0f : 0.0f);
                L.w2.set((e * hidden + i) * hidden + j, i == j ? 1.0f : 0.0f);
            }
    if (c.num_shared_experts > 0)
        for (int64_t i = 0; i < hidden; ++i)
            for (int64_t j = 0; j < hidden; ++j) {
                L.shared_w13.set(i * hidden + j, i == j ? 1.0f : 0.0f);
                L.shared_w2.set(i * hidden + j, i == j ? 1.0f : 0.0f);
            }
    return L;
}

TEST(MoERef, IdentityExpertsReturnTheInput) {
    for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
        for (int shared = 0; shared <= 1; ++shared) {
            const uint64_t seed = 40 + static_cast<uint64_t>(dt) * 2 + shared;
            SCOPED_TRACE(test::seed_trace(seed));
            SCOPED_TRACE(std::string(to_string(dt)) + (shared ? " with shared expert" : ""));
            MoEConfig c = test::tiny_config(dt);
            c.hidden_size = 16;
            c.ffn_size = 16;
            c.num_experts = 5;
            c.top_k = 1;
            c.renormalize = true;
            c.activation = Activation::kReLU;
            c.num_shared_experts = shared;
            c.shared_ffn_size = shared ? 16 : 0;
            const HostLayer L = identity_layer(c, seed);
            const int64_t num_tokens = 29;
            const HostTensor x =
                HostTensor::from_floats(test::random_uniform(num_tokens * 16, seed, 0.5f, 2.0f), dt, {num_tokens, 16});
            const RefRun r = run_ref(L, x);
            std::vector<float> want = x.to_floats();
            if (shared)
                for (auto& v : want) v = round_to(dt, 2.0f * v);
            EXPECT_TRUE(test::all_equal(r.y, want, {num_tokens, 16}));
        }
    }
}

TEST(MoERef, IdentityExpertsWithSeveralSlotsSumTheWeights) {
    const uint64_t seed = 9;
    SCOPED_TRACE(test::seed_trace(seed));
    MoEConfig c = test::tiny_config();
    c.hidden_size = 12;
    c.ffn_size = 12;
    c.num_experts = 6;
    c.top_k = 3;
    c.activation = Activation::kReLU;
    const HostLayer L = identity_layer(c, seed);
    const HostTensor x = HostTensor::from_floats(test::random_uniform(20 * 12, seed, 0.5f, 2.0f), c.dtype, {20, 12});
    const RefRun r = run_ref(L, x);
    const auto xf = x.to_floats();
    std::vector<float> want(xf.size());
    for (int64_t t = 0; t < 20; ++t) {
        double wsum = 0.0;
        for (int j = 0; j < 3; ++j) wsum += r.weights[t * 3 + j];
        for (int64_t h = 0; h < 12; ++h) want[t * 12 + h] = static_cast<float>(wsum * xf[t * 12 + h]);
    }
    EXPECT_TRUE(test::all_close(r.y, want, {20, 12}, 0.0, 1.2e-7));  // one fp32 rounding
}

// Gate rows steer every token: x > 0, gate row 2 = +1, others = -1 -> every token picks expert 2 first.
TEST(MoERef, AllTokensOnOneExpertAndEmptyExperts) {
    const uint64_t seed = 21;
    SCOPED_TRACE(test::seed_trace(seed));
    MoEConfig c = test::tiny_config();
    c.top_k = 1;
    c.renormalize = true;
    c.activation = Activation::kReLU;
    c.ffn_size = c.hidden_size;
    HostLayer L = identity_layer(c, seed);
    for (int64_t e = 0; e < c.num_experts; ++e)
        for (int64_t h = 0; h < c.hidden_size; ++h) L.gate.set(e * c.hidden_size + h, e == 2 ? 1.0f : -1.0f);
    const int64_t num_tokens = 10;
    const HostTensor x =
        HostTensor::from_floats(test::random_uniform(num_tokens * 8, seed, 0.5f, 2.0f), c.dtype, {num_tokens, 8});
    RefRun r = run_ref(L, x);
    EXPECT_EQ(r.plan.expert_counts, (std::vector<int32_t>{0, 0, 10, 0}));
    EXPECT_EQ(r.stats.max_load, 10.0);
    EXPECT_TRUE(test::all_equal(r.y, x.to_floats(), {num_tokens, 8}));
    // With a capacity of 4, tokens 4..9 are dropped: their output is zero.
    L.cfg.capacity_factor = 1.6;  // ceil(1.6 * 10 * 1 / 4) = 4
    r = run_ref(L, x);
    EXPECT_EQ(r.plan.capacity, 4);
    EXPECT_EQ(r.stats.dropped, 6);
    EXPECT_EQ(r.stats.kept_counts, (std::vector<int64_t>{0, 0, 4, 0}));
    std::vector<float> want = x.to_floats();
    for (size_t i = 4 * 8; i < want.size(); ++i) want[i] = 0.0f;
    EXPECT_TRUE(test::all_equal(r.y, want, {num_tokens, 8}));
}

TEST(MoERef, ZeroAndOneToken) {
    const uint64_t seed = 31;
    SCOPED_TRACE(test::seed_trace(seed));
    MoEConfig c = test::tiny_config(DType::kBF16);
    c.num_shared_experts = 1;
    c.shared_ffn_size = 4;
    c.capacity_factor = 1.0;
    const HostLayer L = test::random_layer(c, seed, DType::kBF16);
    const HostTensor x0(DType::kBF16, {0, c.hidden_size});
    const RefRun r0 = run_ref(L, x0);
    EXPECT_TRUE(r0.y.empty());
    EXPECT_EQ(r0.stats.num_tokens, 0);
    EXPECT_EQ(r0.stats.aux_loss, 0.0);
    const HostTensor x1 =
        HostTensor::from_floats(test::random_uniform(c.hidden_size, seed), DType::kBF16, {1, c.hidden_size});
    const RefRun r1 = run_ref(L, x1);
    const NaiveOut n1 = naive_forward(L, x1.to_floats(), 1);
    EXPECT_TRUE(test::all_equal(r1.y, n1.y, {1, c.hidden_size}));
    EXPECT_EQ(r1.plan.capacity, 1);  // ceil(1 * 1 * 2 / 4)
    EXPECT_EQ(r1.stats.dropped, 0);
}

// ---- timing (disabled by default): Mixtral shape, 256 tokens ---------------------------------------------------

void fill_fast(HostTensor& t, uint64_t seed, float scale) {
    const int64_t n = t.numel();
#pragma omp parallel
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        uint64_t s = seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(id) + 1;
        for (int64_t i = id; i < n; i += nt) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            const float u = static_cast<float>(s >> 40) / 16777216.0f * 2.0f - 1.0f;
            t.set(i, u * scale);
        }
    }
}

TEST(MoERefTiming, DISABLED_MixtralShape256Tokens) {
    for (DType dt : {DType::kBF16, DType::kF32}) {
        MoEConfig c;
        c.hidden_size = 4096;
        c.ffn_size = 14336;
        c.num_experts = 8;
        c.top_k = 2;
        c.renormalize = true;
        c.dtype = dt;
        const int64_t num_tokens = 256;
        HostLayer L;
        L.cfg = c;
        L.gate = HostTensor(dt, {8, 4096});
        L.w13 = HostTensor(dt, {8, 2 * 14336, 4096});
        L.w2 = HostTensor(dt, {8, 4096, 14336});
        fill_fast(L.gate, 1, 1.0f / 64);
        fill_fast(L.w13, 2, 1.0f / 64);
        fill_fast(L.w2, 3, 1.0f / 120);
        HostTensor x(dt, {num_tokens, 4096}), y(dt, {num_tokens, 4096});
        fill_fast(x, 4, 1.0f);
        for (int rep = 0; rep < 2; ++rep) {
            const std::clock_t c0 = std::clock();  // process CPU time of all threads
            const auto t0 = std::chrono::steady_clock::now();
            test::ref_moe_forward(c, L.weights(), x.ref(), y.ref(), nullptr);
            const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            const double cpu = static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
            const double flops = 2.0 * num_tokens * 2 * (2.0 * 14336 * 4096 + 4096.0 * 14336);
            std::printf(
                "[ timing ] Mixtral %s, 256 tokens, %d threads: %.2f s wall, %.2f s cpu (%.1f GFLOP/s wall, "
                "kernel %s)\n",
                to_string(dt), omp_get_max_threads(), s, cpu, flops / s / 1e9,
                ref::available_gemm_kernels().front().c_str());
        }
        const auto yf = y.to_floats();
        double norm = 0;
        for (float v : yf) norm += static_cast<double>(v) * v;
        EXPECT_TRUE(std::isfinite(norm));
        EXPECT_GT(norm, 0.0);
    }
}

}  // namespace
}  // namespace switchyard
