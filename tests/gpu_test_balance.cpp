// tests/gpu_test_balance.cpp: the GPU side of load balancing and routing variants (src/cuda/routing/balance.cu and the
// expert-choice / capacity paths of src/cuda/moe_cuda.cu) against the CPU reference (src/ref/balance.cpp).
//
//   - bias update (device counts and host counts): bitwise equal to ref::update_score_bias, skewed, balanced
//     (sign 0) and single-expert cases; an aux-loss-free loop of forwards + device updates with no host sync in
//     between matches the same loop on the CPU step by step (bias bitwise, selections exactly);
//   - router losses {aux, z, seq_aux}: within fp32 rounding (2 ulp) of the CPU values, every score function, empty
//     sequences, bad sequence lengths (NaN), T = 0 (zeros);
//   - expert-choice plan: every array EXACT vs ref::route_expert_choice on the same logits (weights within one fp32
//     ulp), random / identical tokens (ties) / every token preferring one expert / NaN logits / C >= T / T = 1;
//   - whole layer: expert choice and capacity drops (train and eval capacity) through MoELayer on the GPU: ids,
//     slot_row, expert_counts, dropped EXACT vs the reference fed with the GPU's logits; y normwise within the dtype.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/routing/balance.h"
#include "gpu_test_util.h"
#include "ref/ref.h"
#include "switchyard/balance.h"
#include "switchyard/moe_layer.h"

namespace switchyard {
namespace {

using testing::all_close;
using testing::all_equal;
using testing::DeviceBuffer;

// ---- bias update -------------------------------------------------------------------------------------------------

TEST(GpuBalance, BiasUpdateMatchesReferenceBitwise) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    for (int64_t E : {1, 7, 64, 256, 512}) {
        for (int variant = 0; variant < 3; ++variant) {  // 0 random, 1 all equal (sign 0), 2 all on one expert
            const uint64_t seed = 100 + E * 3 + variant;
            SCOPED_TRACE("seed=" + std::to_string(seed) + " E=" + std::to_string(E) + " variant=" + std::to_string(variant));
            std::mt19937_64 rng(seed);
            std::vector<int32_t> counts(E);
            for (int64_t e = 0; e < E; ++e)
                counts[e] = variant == 0 ? static_cast<int32_t>(rng() % 1000) : variant == 1 ? 17 : (e == E / 2 ? 4096 : 0);
            const auto bias0 = testing::random_values(E, DType::kF32, -0.3f, 0.3f, seed);
            std::vector<int64_t> c64(counts.begin(), counts.end());
            std::vector<float> want = bias0;
            ref::update_score_bias(0.00123, c64.data(), E, want.data());

            DeviceBuffer d_c, d_b1, d_b2;
            testing::upload_raw(d_c, counts);
            testing::upload_raw(d_b1, bias0);
            testing::upload_raw(d_b2, bias0);
            TensorRef b1(d_b1.get(), DType::kF32, {E}, Device::kCUDA), c(d_c.get(), DType::kI32, {E}, Device::kCUDA);
            update_score_bias(0.00123, c, b1, nullptr);  // device counts
            LoadStats st;
            st.expert_counts = c64;
            update_score_bias(0.00123, st, TensorRef(d_b2.get(), DType::kF32, {E}, Device::kCUDA), nullptr);
            GPU_CHECK(cudaDeviceSynchronize());
            const auto got1 = testing::download_raw<float>(d_b1.get(), E);
            const auto got2 = testing::download_raw<float>(d_b2.get(), E);
            ASSERT_TRUE(testing::bitwise_equal(testing::encode(got1, DType::kF32), testing::encode(want, DType::kF32),
                                               "bias (device counts)"));
            ASSERT_TRUE(testing::bitwise_equal(testing::encode(got2, DType::kF32), testing::encode(want, DType::kF32),
                                               "bias (host counts)"));
        }
    }
}

// ---- router losses -----------------------------------------------------------------------------------------------

TEST(GpuBalance, RouterLossesMatchReference) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    const ScoreFunction sfs[] = {ScoreFunction::kSoftmax, ScoreFunction::kSigmoid, ScoreFunction::kTopkSoftmax};
    struct Case {
        int64_t T, E, k;
        std::vector<int32_t> lens;  // empty: no seq_lens (one sequence)
    };
    const std::vector<Case> cases = {{1000, 64, 6, {100, 0, 400, 1, 499}},
                                     {257, 8, 2, {}},
                                     {4096, 256, 8, {2048, 2048}},
                                     {33, 512, 32, {33}},
                                     {5, 3, 1, {0, 5, 0}}};
    for (ScoreFunction sf : sfs) {
        for (const Case& c : cases) {
            const uint64_t seed = 200 + c.T + c.E + static_cast<int>(sf);
            SCOPED_TRACE("seed=" + std::to_string(seed) + " score=" + to_string(sf) + " T=" + std::to_string(c.T) +
                         " E=" + std::to_string(c.E));
            MoEConfig cfg;
            cfg.hidden_size = 8;
            cfg.ffn_size = 8;
            cfg.num_experts = c.E;
            cfg.top_k = c.k;
            cfg.score_function = sf;
            auto logits = testing::random_values(c.T * c.E, DType::kF32, -4.0f, 4.0f, seed);
            for (int64_t t = 0; t < c.T; ++t) logits[t * c.E + t % 5] += 3.0f;  // skew
            std::vector<int32_t> ids;
            std::vector<float> w;
            ref::route(cfg, logits, {}, c.T, ids, w);
            std::vector<float> want(3);
            std::vector<int32_t> lens = c.lens;
            router_losses(cfg, TensorRef(logits.data(), DType::kF32, {c.T, c.E}),
                          TensorRef(ids.data(), DType::kI32, {c.T, c.k}),
                          lens.empty() ? TensorRef() : TensorRef(lens.data(), DType::kI32, {int64_t(lens.size())}),
                          TensorRef(want.data(), DType::kF32, {3}));
            DeviceBuffer d_l, d_i, d_s, d_out(3 * sizeof(float));
            testing::upload_raw(d_l, logits);
            testing::upload_raw(d_i, ids);
            if (!lens.empty()) testing::upload_raw(d_s, lens);
            d_out.poison();
            const int64_t S = lens.empty() ? 1 : static_cast<int64_t>(lens.size());
            DeviceBuffer ws(router_losses_workspace_size(cfg, Device::kCUDA, c.T, S));
            router_losses(cfg, TensorRef(d_l.get(), DType::kF32, {c.T, c.E}, Device::kCUDA),
                          TensorRef(d_i.get(), DType::kI32, {c.T, c.k}, Device::kCUDA),
                          lens.empty() ? TensorRef() : TensorRef(d_s.get(), DType::kI32, {S}, Device::kCUDA),
                          TensorRef(d_out.get(), DType::kF32, {3}, Device::kCUDA), ws.get(), ws.bytes(), nullptr);
            GPU_CHECK(cudaDeviceSynchronize());
            const auto got = testing::download_raw<float>(d_out.get(), 3);
            // Double sums in another order, then one rounding to fp32: at most one fp32 ulp apart (2 allowed).
            EXPECT_TRUE(all_close(got, want, 0.0, 2.4e-7, "losses {aux, z, seq_aux}"));
            EXPECT_GT(want[0], 0.0f);
        }
    }
}

TEST(GpuBalance, RouterLossesDegenerate) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    MoEConfig cfg;
    cfg.hidden_size = 8;
    cfg.ffn_size = 8;
    cfg.num_experts = 4;
    cfg.top_k = 2;
    const int64_t T = 6;
    const std::vector<float> logits = testing::random_values(T * 4, DType::kF32, -1.f, 1.f, 7);
    std::vector<int32_t> ids;
    std::vector<float> w;
    ref::route(cfg, logits, {}, T, ids, w);
    DeviceBuffer d_l, d_i, d_s, d_out(12);
    testing::upload_raw(d_l, logits);
    testing::upload_raw(d_i, ids);
    for (const std::vector<int32_t>& bad : {std::vector<int32_t>{3, 2}, std::vector<int32_t>{7, -1}}) {
        testing::upload_raw(d_s, bad);
        DeviceBuffer ws(router_losses_workspace_size(cfg, Device::kCUDA, T, 2));
        router_losses(cfg, TensorRef(d_l.get(), DType::kF32, {T, 4}, Device::kCUDA),
                      TensorRef(d_i.get(), DType::kI32, {T, 2}, Device::kCUDA),
                      TensorRef(d_s.get(), DType::kI32, {2}, Device::kCUDA),
                      TensorRef(d_out.get(), DType::kF32, {3}, Device::kCUDA), ws.get(), ws.bytes(), nullptr);
        GPU_CHECK(cudaDeviceSynchronize());
        const auto got = testing::download_raw<float>(d_out.get(), 3);
        EXPECT_TRUE(std::isnan(got[2])) << "seq_lens {" << bad[0] << ", " << bad[1] << "} must give seq_aux = NaN";
        EXPECT_FALSE(std::isnan(got[0]));
    }
    // T = 0: zeros.
    DeviceBuffer ws0(router_losses_workspace_size(cfg, Device::kCUDA, 0, 1) + 256);
    d_out.poison();
    router_losses(cfg, TensorRef(d_l.get(), DType::kF32, {0, 4}, Device::kCUDA),
                  TensorRef(d_i.get(), DType::kI32, {0, 2}, Device::kCUDA), TensorRef(),
                  TensorRef(d_out.get(), DType::kF32, {3}, Device::kCUDA), ws0.get(), ws0.bytes(), nullptr);
    GPU_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(all_equal(testing::download_raw<float>(d_out.get(), 3), std::vector<float>{0.f, 0.f, 0.f}, "T=0"));
}

// ---- expert-choice plan ------------------------------------------------------------------------------------------

struct EcCase {
    int64_t T, E;
    double cf;
    ScoreFunction sf;
    bool renorm;
    int pattern;  // 0 random, 1 identical tokens, 2 all prefer expert 1, 3 some NaN logits
};

TEST(GpuBalance, ExpertChoicePlanMatchesReferenceExactly) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    const EcCase cases[] = {{1000, 64, 0.0, ScoreFunction::kSoftmax, false, 0}, {333, 8, 1.0, ScoreFunction::kSigmoid, true, 0},
                            {64, 16, 2.0, ScoreFunction::kSoftmax, true, 1},    {257, 6, 1.0, ScoreFunction::kSigmoid, false, 2},
                            {100, 10, 1.0, ScoreFunction::kSoftmax, false, 3},  {5, 4, 8.0, ScoreFunction::kSoftmax, false, 0},
                            {1, 7, 0.0, ScoreFunction::kSigmoid, false, 0},     {4096, 256, 0.0, ScoreFunction::kSigmoid, false, 0},
                            {0, 4, 1.0, ScoreFunction::kSoftmax, false, 0}};
    for (const EcCase& c : cases) {
        const uint64_t seed = 300 + c.T * 5 + c.E + c.pattern;
        SCOPED_TRACE("seed=" + std::to_string(seed) + " T=" + std::to_string(c.T) + " E=" + std::to_string(c.E) +
                     " cf=" + std::to_string(c.cf) + " pattern=" + std::to_string(c.pattern));
        MoEConfig cfg;
        cfg.hidden_size = 8;
        cfg.ffn_size = 8;
        cfg.num_experts = c.E;
        cfg.top_k = std::min<int64_t>(2, c.E);
        cfg.routing_mode = RoutingMode::kExpertChoice;
        cfg.capacity_factor = c.cf;
        cfg.score_function = c.sf;
        cfg.renormalize = c.renorm;
        cfg.routed_scale = 2.5;
        cfg.validate();
        const int64_t T = c.T, E = c.E, n = T * E;
        auto logits = testing::random_values(n, DType::kF32, -3.0f, 3.0f, seed);
        for (int64_t t = 0; t < T; ++t)
            for (int64_t e = 0; e < E; ++e) {
                if (c.pattern == 1) logits[t * E + e] = logits[e];  // every token the same: ties everywhere
                if (c.pattern == 2 && e == 1) logits[t * E + e] = 8.0f;
                if (c.pattern == 3 && (t * 7 + e) % 13 == 0) logits[t * E + e] = std::numeric_limits<float>::quiet_NaN();
            }
        const ref::HostPlan want = ref::route_expert_choice(cfg, logits, T);
        DeviceBuffer d_l, d_ids(n * 4 + 4), d_w(n * 4 + 4), d_cnt(E * 4), d_off((E + 1) * 4), d_slot(n * 4 + 4),
            d_rt(n * 4 + 4), d_rs(n * 4 + 4);
        testing::upload_raw(d_l, logits);
        for (DeviceBuffer* b : {&d_ids, &d_w, &d_cnt, &d_off, &d_slot, &d_rt, &d_rs}) b->poison();
        DeviceBuffer ws(cuda::expert_choice_workspace_size(T, E));
        cuda::ExpertChoiceArgs a;
        a.num_tokens = T;
        a.logits = d_l.get<float>();
        a.topk_ids = d_ids.get<int32_t>();
        a.topk_weights = d_w.get<float>();
        a.expert_counts = d_cnt.get<int32_t>();
        a.expert_offsets = d_off.get<int32_t>();
        a.slot_row = d_slot.get<int32_t>();
        a.row_token = d_rt.get<int32_t>();
        a.row_slot = d_rs.get<int32_t>();
        cuda::expert_choice_plan(cfg, a, ws.get(), ws.bytes(), nullptr);
        GPU_CHECK(cudaDeviceSynchronize());
        EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_cnt.get(), E), want.expert_counts, "expert_counts"));
        EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_off.get(), E + 1), want.expert_offsets, "expert_offsets"));
        EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_ids.get(), n), want.topk_ids, "topk_ids [T, E]", E));
        EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_slot.get(), n), want.slot_row, "slot_row [T, E]", E));
        EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_rt.get(), n), want.row_token, "row_token"));
        EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_rs.get(), n), want.row_slot, "row_slot"));
        // Weights: double exp on both sides, rounded to fp32: within one fp32 ulp.
        EXPECT_TRUE(all_close(testing::download_raw<float>(d_w.get(), n), want.topk_weights, 0.0, 1.2e-7,
                              "topk_weights [T, E]", E));
    }
}

// ---- whole layer -------------------------------------------------------------------------------------------------

struct DeviceLayer {
    std::vector<float> gate, w13, w2, bias;
    DeviceBuffer d_gate, d_w13, d_w2, d_bias;
    MoEWeights w;
};

void make_layer(const MoEConfig& cfg, uint64_t seed, DeviceLayer& L) {
    const int64_t E = cfg.num_experts, H = cfg.hidden_size, F = cfg.ffn_size, R = cfg.w13_rows();
    const DType dt = cfg.dtype;
    L.gate = testing::random_values(E * H, dt, -0.1f, 0.1f, seed);  // logits of O(0.5): a mild, random skew
    L.w13 = testing::random_values(E * R * H, dt, -0.2f, 0.2f, seed + 1);
    L.w2 = testing::random_values(E * H * F, dt, -0.2f, 0.2f, seed + 2);
    testing::upload(L.d_gate, L.gate, dt);
    testing::upload(L.d_w13, L.w13, dt);
    testing::upload(L.d_w2, L.w2, dt);
    L.w.gate = TensorRef(L.d_gate.get(), dt, {E, H}, Device::kCUDA);
    L.w.w13 = TensorRef(L.d_w13.get(), dt, {E, R, H}, Device::kCUDA);
    L.w.w2 = TensorRef(L.d_w2.get(), dt, {E, H, F}, Device::kCUDA);
    if (cfg.use_score_bias) {
        L.bias = testing::random_values(E, DType::kF32, -0.05f, 0.05f, seed + 3);
        testing::upload_raw(L.d_bias, L.bias);
        L.w.score_bias = TensorRef(L.d_bias.get(), DType::kF32, {E}, Device::kCUDA);
    }
}

// Reference y from the GPU's logits: the plan (token or expert choice), ref::expert_mlp per expert, ref::combine.
std::vector<float> ref_y(const MoEConfig& cfg, const DeviceLayer& L, const std::vector<float>& x,
                         const std::vector<float>& logits, int64_t T, ref::HostPlan& plan) {
    const int64_t H = cfg.hidden_size, F = cfg.ffn_size, R = cfg.w13_rows();
    if (cfg.expert_choice()) {
        plan = ref::route_expert_choice(cfg, logits, T);
    } else {
        std::vector<int32_t> ids;
        std::vector<float> w;
        ref::route(cfg, logits, L.bias, T, ids, w);
        plan = ref::build_plan(cfg, T, ids, w);
    }
    std::vector<float> out(plan.num_rows() * H), in;
    for (int64_t e = 0; e < cfg.num_experts; ++e) {
        const int64_t b = plan.expert_offsets[e], rows = plan.expert_offsets[e + 1] - b;
        if (rows == 0) continue;
        in.resize(rows * H);
        for (int64_t r = 0; r < rows; ++r)
            std::memcpy(in.data() + r * H, x.data() + plan.row_token[b + r] * H, H * sizeof(float));
        ref::expert_mlp(cfg.activation, cfg.dtype, in.data(), rows, H, F, L.w13.data() + e * R * H,
                        L.w2.data() + e * H * F, out.data() + b * H);
    }
    std::vector<float> y(T * H);
    ref::combine(plan, out, nullptr, H, cfg.dtype, y.data());
    return y;
}

double rel_norm_err(const std::vector<float>& got, const std::vector<float>& want) {
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
        den += double(want[i]) * want[i];
    }
    return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

struct LayerCase {
    RoutingMode mode;
    double cf, eval_cf;
    bool eval;
    DropPolicy policy;
    DType dtype;
    int64_t T;
    int64_t E = 8;  // expert choice gives every token E slots: E > 32 exercises the combine's wide-slot path
};

TEST(GpuBalance, LayerExpertChoiceAndCapacityMatchReference) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    const LayerCase cases[] = {
        {RoutingMode::kExpertChoice, 0.0, -1, false, DropPolicy::kPosition, DType::kBF16, 300},
        {RoutingMode::kExpertChoice, 1.0, -1, false, DropPolicy::kPosition, DType::kF32, 77},
        {RoutingMode::kTokenChoice, 1.0, 2.0, false, DropPolicy::kPosition, DType::kBF16, 512},
        {RoutingMode::kTokenChoice, 1.0, 2.0, true, DropPolicy::kPosition, DType::kBF16, 512},
        {RoutingMode::kTokenChoice, 0.5, -1, false, DropPolicy::kProbability, DType::kF16, 257},
        {RoutingMode::kExpertChoice, 2.0, -1, false, DropPolicy::kPosition, DType::kBF16, 513, 128},
    };
    for (const LayerCase& c : cases) {
        const uint64_t seed = 400 + c.T + static_cast<int>(c.mode) * 7 + c.eval;
        SCOPED_TRACE("seed=" + std::to_string(seed) + " routing=" + to_string(c.mode) + " cf=" + std::to_string(c.cf) +
                     " eval=" + std::to_string(c.eval) + " dtype=" + to_string(c.dtype) + " E=" + std::to_string(c.E));
        MoEConfig cfg;
        cfg.hidden_size = 128;
        cfg.ffn_size = 64;
        cfg.num_experts = c.E;
        cfg.top_k = 2;
        cfg.routing_mode = c.mode;
        cfg.capacity_factor = c.cf;
        cfg.eval_capacity_factor = c.eval_cf;
        cfg.drop_policy = c.policy;
        cfg.dtype = c.dtype;
        if (c.eval) cfg = cfg.eval_config();
        const int64_t T = c.T, H = cfg.hidden_size, E = cfg.num_experts, S = cfg.route_slots();
        DeviceLayer L;
        make_layer(cfg, seed, L);
        auto x = testing::random_values(T * H, c.dtype, -1.0f, 1.0f, seed + 9);
        DeviceBuffer d_x, d_y(T * H * dtype_size(c.dtype)), d_lg(T * E * 4), d_ids(T * S * 4), d_w(T * S * 4),
            d_slot(T * S * 4), d_cnt(E * 4);
        testing::upload(d_x, x, c.dtype);
        MoELayer layer(cfg, L.w);
        DeviceBuffer ws(layer.workspace_size(T));
        LoadStats st;
        ForwardOutputs out;
        out.logits = TensorRef(d_lg.get(), DType::kF32, {T, E}, Device::kCUDA);
        out.topk_ids = TensorRef(d_ids.get(), DType::kI32, {T, S}, Device::kCUDA);
        out.topk_weights = TensorRef(d_w.get(), DType::kF32, {T, S}, Device::kCUDA);
        out.slot_row = TensorRef(d_slot.get(), DType::kI32, {T, S}, Device::kCUDA);
        out.expert_counts = TensorRef(d_cnt.get(), DType::kI32, {E}, Device::kCUDA);
        out.stats = &st;
        layer.forward(TensorRef(d_x.get(), c.dtype, {T, H}, Device::kCUDA),
                      TensorRef(d_y.get(), c.dtype, {T, H}, Device::kCUDA), ws.get(), ws.bytes(), nullptr, &out);
        GPU_CHECK(cudaDeviceSynchronize());
        const auto logits = testing::download_raw<float>(d_lg.get(), T * E);
        ref::HostPlan plan;
        const auto want = ref_y(cfg, L, x, logits, T, plan);
        EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_ids.get(), T * S), plan.topk_ids, "topk_ids", S));
        EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_slot.get(), T * S), plan.slot_row, "slot_row", S));
        EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_cnt.get(), E), plan.expert_counts, "expert_counts"));
        EXPECT_EQ(st.dropped, plan.dropped());
        if (c.mode == RoutingMode::kTokenChoice && !c.eval && c.cf <= 1.0) EXPECT_GT(plan.dropped(), 0);
        if (c.mode == RoutingMode::kTokenChoice)
            EXPECT_EQ(plan.capacity, c.eval ? 2 * (T * 2 / 8) : MoEConfig(cfg).capacity(T)) << "eval uses its own factor";
        if (c.mode == RoutingMode::kExpertChoice) {
            LoadStats rs;
            ref::expert_choice_stats(cfg, logits, plan, rs);
            EXPECT_EQ(st.unrouted_tokens, rs.unrouted_tokens);
            EXPECT_EQ(st.expert_counts, rs.expert_counts);
            EXPECT_NEAR(st.z_loss, rs.z_loss, 1e-9 * std::fabs(rs.z_loss));
        }
        const auto got = testing::download(d_y.get(), T * H, c.dtype);
        const double tol = c.dtype == DType::kBF16 ? 1e-2 : c.dtype == DType::kF16 ? 2e-3 : 1e-5;
        EXPECT_LE(rel_norm_err(got, want), tol) << "y, normwise";
    }
}

TEST(GpuBalance, AuxFreeLoopOnDeviceMatchesCpu) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    MoEConfig cfg;
    cfg.hidden_size = 64;
    cfg.ffn_size = 32;
    cfg.num_experts = 16;
    cfg.top_k = 4;
    cfg.score_function = ScoreFunction::kSigmoid;
    cfg.use_score_bias = true;
    cfg.bias_update_rate = 0.01;
    cfg.dtype = DType::kF32;
    const int64_t T = 512, H = 64, E = 16, k = 4, steps = 8;
    const uint64_t seed = 500;
    SCOPED_TRACE("seed=" + std::to_string(seed));
    DeviceLayer L;
    make_layer(cfg, seed, L);
    std::vector<float> cpu_bias = L.bias;
    cudaStream_t stream;
    GPU_CHECK(cudaStreamCreate(&stream));
    MoELayer layer(cfg, L.w);
    DeviceBuffer ws(layer.workspace_size(T)), d_y(T * H * 4), d_x, d_lg(T * E * 4), d_ids(T * k * 4), d_cnt(E * 4);
    int moved = 0;
    for (int64_t s = 0; s < steps; ++s) {
        auto x = testing::random_values(T * H, DType::kF32, -1.0f, 1.0f, seed + 10 + s);
        testing::upload(d_x, x, DType::kF32);
        ForwardOutputs out;
        out.logits = TensorRef(d_lg.get(), DType::kF32, {T, E}, Device::kCUDA);
        out.topk_ids = TensorRef(d_ids.get(), DType::kI32, {T, k}, Device::kCUDA);
        out.expert_counts = TensorRef(d_cnt.get(), DType::kI32, {E}, Device::kCUDA);
        layer.forward(TensorRef(d_x.get(), DType::kF32, {T, H}, Device::kCUDA),
                      TensorRef(d_y.get(), DType::kF32, {T, H}, Device::kCUDA), ws.get(), ws.bytes(), stream, &out);
        update_score_bias(cfg, out.expert_counts, L.w.score_bias, stream);  // no host sync in between
        GPU_CHECK(cudaStreamSynchronize(stream));
        // CPU: the same step from the GPU's logits with the CPU's own bias.
        const auto logits = testing::download_raw<float>(d_lg.get(), T * E);
        std::vector<int32_t> ids;
        std::vector<float> w;
        ref::route(cfg, logits, cpu_bias, T, ids, w);
        ASSERT_TRUE(all_equal(testing::download_raw<int32_t>(d_ids.get(), T * k), ids, "topk_ids at step " + std::to_string(s), k));
        std::vector<int64_t> counts(E, 0);
        for (int32_t id : ids) ++counts[id];
        const std::vector<float> before = cpu_bias;
        ref::update_score_bias(cfg.bias_update_rate, counts.data(), E, cpu_bias.data());
        for (int64_t e = 0; e < E; ++e) moved += cpu_bias[e] != before[e];
        const auto gpu_bias = testing::download_raw<float>(L.d_bias.get(), E);
        ASSERT_TRUE(testing::bitwise_equal(testing::encode(gpu_bias, DType::kF32), testing::encode(cpu_bias, DType::kF32),
                                           "bias after step " + std::to_string(s)));
    }
    EXPECT_GT(moved, 0);
    GPU_CHECK(cudaStreamDestroy(stream));
}

}  // namespace
}  // namespace switchyard
