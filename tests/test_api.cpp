// tests/test_api.cpp: the public API layer: TensorRef, backend queries, MoELayer / Router validation (each rule
// throws and names the parameter), CPU dispatch equal to the reference, optional outputs and load statistics.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "ref/ref.h"
#include "switchyard/switchyard.h"
#include "test_util.h"

namespace switchyard {
namespace {

using test::HostLayer;
using test::HostTensor;

using test::expect_error;

TEST(TensorRefApi, ContiguousViews) {
    float buf[24];
    const TensorRef t(buf, DType::kF32, {2, 3, 4});
    EXPECT_TRUE(t.defined());
    EXPECT_EQ(t.rank, 3);
    EXPECT_EQ(t.numel(), 24);
    EXPECT_EQ(t.strides[0], 12);
    EXPECT_EQ(t.strides[1], 4);
    EXPECT_EQ(t.strides[2], 1);
    EXPECT_EQ(t.nbytes(), 96u);
    EXPECT_TRUE(t.is_contiguous());
    EXPECT_EQ(t.shape_string(), "[2, 3, 4]");
    EXPECT_EQ(t.device, Device::kCPU);
    const int64_t dims[2] = {6, 4};
    const TensorRef u = TensorRef::contiguous(buf, DType::kBF16, dims, 2, Device::kCUDA, 1);
    EXPECT_EQ(u.numel(), 24);
    EXPECT_EQ(u.nbytes(), 48u);
    EXPECT_EQ(u.device, Device::kCUDA);
    EXPECT_EQ(u.device_index, 1);
    EXPECT_FALSE(TensorRef().defined());
    EXPECT_EQ(TensorRef().numel(), 0);
}

TEST(TensorRefApi, StridedAndEmpty) {
    float buf[24];
    TensorRef t(buf, DType::kF32, {4, 3});
    t.strides[0] = 6;  // every other row of a [8, 3] buffer... rows 6 apart: not contiguous
    EXPECT_FALSE(t.is_contiguous());
    TensorRef col(buf, DType::kF32, {4, 1});
    col.strides[1] = 7;  // a size-1 dimension may have any stride
    EXPECT_TRUE(col.is_contiguous());
    const TensorRef empty(nullptr, DType::kF32, {0, 8});
    EXPECT_TRUE(empty.defined());
    EXPECT_EQ(empty.numel(), 0);
    EXPECT_TRUE(empty.is_contiguous());
    EXPECT_EQ(empty.shape_string(), "[0, 8]");
    expect_error([&] { TensorRef(buf, DType::kF32, {1, 2, 3, 4, 5}); }, {"rank=5"});
    expect_error([&] { TensorRef(buf, DType::kF32, {2, -1}); }, {"shape[1]=-1"});
}

TEST(VersionApi, BackendQueries) {
#ifdef SWITCHYARD_WITH_CUDA
    EXPECT_TRUE(has_cuda_backend());
    EXPECT_GE(cuda_device_count(), 0);
#else
    EXPECT_FALSE(has_cuda_backend());
    EXPECT_EQ(cuda_device_count(), 0);
#endif
    EXPECT_EQ(kVersionMajor, 0);
    EXPECT_EQ(kVersionMinor, 1);
}

TEST(StatsApi, FinalizeLoadStatsByHand) {
    MoEConfig c = test::tiny_config();  // E = 4, k = 2
    c.aux_loss_coef = 0.5;
    c.z_loss_coef = 2.0;
    LoadStats s;
    s.num_tokens = 2;
    s.top_k = 2;
    s.expert_counts = {3, 1, 0, 0};
    s.mean_prob = {0.4, 0.3, 0.2, 0.1};
    s.z_loss = 1.5;
    finalize_load_stats(c, s);
    EXPECT_EQ(s.mean_load, 1.0);
    EXPECT_EQ(s.max_load, 3.0);
    EXPECT_NEAR(s.cv, std::sqrt(6.0 / 4.0), 1e-15);
    EXPECT_NEAR(s.entropy, -(0.75 * std::log(0.75) + 0.25 * std::log(0.25)), 1e-15);
    EXPECT_NEAR(s.aux_loss, 4 * (0.75 * 0.4 + 0.25 * 0.3), 1e-15);
    EXPECT_NEAR(s.weighted_loss, 0.5 * s.aux_loss + 2.0 * 1.5, 1e-15);
    EXPECT_EQ(s.max_over_mean(), 3.0);
    s.expert_counts = {1, 1};
    expect_error([&] { finalize_load_stats(c, s); }, {"expert_counts", "num_experts=4"});
}

MoEConfig api_cfg() {
    MoEConfig c = test::tiny_config(DType::kBF16);
    c.num_shared_experts = 1;
    c.shared_ffn_size = 4;
    c.use_score_bias = true;
    c.score_function = ScoreFunction::kSigmoid;
    return c;
}

TEST(MoELayerApi, ValidConstructionAndMove) {
    const HostLayer L = test::random_layer(api_cfg(), 1, DType::kBF16);
    MoELayer layer(L.cfg, L.weights());
    EXPECT_EQ(layer.device(), Device::kCPU);
    // The CPU forward runs the same stages as CUDA, its intermediates in a host workspace: the sizes add up.
    size_t sum = 0;
    for (const WorkspaceSlice& slice : layer.workspace_layout(1000))
        if (slice.aliases.empty()) sum += slice.bytes;
    EXPECT_GT(layer.workspace_size(1000), 1000u * 8u * 2u);  // at least xp [T*k, H] bf16
    EXPECT_EQ(layer.workspace_size(1000), sum);
    EXPECT_EQ(layer.config().hidden_size, 8);
    MoELayer moved(std::move(layer));
    EXPECT_EQ(moved.config().num_experts, 4);
    expect_error([&] { moved.workspace_size(-1); }, {"num_tokens=-1"});
}

TEST(MoELayerApi, EveryWeightRuleThrows) {
    const MoEConfig cfg = api_cfg();
    const HostLayer L = test::random_layer(cfg, 2, DType::kF32);
    HostTensor wrong_gate(DType::kF32, {4, 9}), wrong_w13(DType::kF32, {4, 6, 8}), wrong_w2(DType::kF32, {4, 8, 5});
    HostTensor int_w13(DType::kI32, {4, 12, 8}), bf16_bias(DType::kBF16, {4}), wrong_bias(DType::kF32, {5});
    HostTensor wrong_shared13(DType::kF32, {4, 8}), wrong_shared2(DType::kF32, {8, 8}), scale(DType::kF32, {4, 1});
    struct Case {
        const char* name;
        std::function<void(MoEConfig&, MoEWeights&)> mutate;
        std::vector<std::string> parts;
    };
    const std::vector<Case> cases = {
        {"config", [](MoEConfig& c, MoEWeights&) { c.top_k = 0; }, {"top_k=0"}},
        {"gate shape", [&](MoEConfig&, MoEWeights& w) { w.gate = wrong_gate.ref(); }, {"gate", "[4, 9]", "[4, 8]"}},
        {"gate missing", [](MoEConfig&, MoEWeights& w) { w.gate = TensorRef(); }, {"gate", "undefined"}},
        {"w13 rows", [&](MoEConfig&, MoEWeights& w) { w.w13 = wrong_w13.ref(); }, {"w13", "[4, 6, 8]", "[4, 12, 8]"}},
        {"w13 rows ungated",
         [](MoEConfig& c, MoEWeights&) { c.activation = Activation::kReLU; },
         {"w13", "[4, 12, 8]", "[4, 6, 8]"}},
        {"w13 dtype", [&](MoEConfig&, MoEWeights& w) { w.w13 = int_w13.ref(); }, {"w13", "dtype=int32"}},
        {"w2 shape", [&](MoEConfig&, MoEWeights& w) { w.w2 = wrong_w2.ref(); }, {"w2", "[4, 8, 5]", "[4, 8, 6]"}},
        {"bias missing",
         [](MoEConfig&, MoEWeights& w) { w.score_bias = TensorRef(); },
         {"score_bias", "use_score_bias"}},
        {"bias unused",
         [](MoEConfig& c, MoEWeights&) { c.use_score_bias = false; },
         {"score_bias", "use_score_bias=false"}},
        {"bias dtype",
         [&](MoEConfig&, MoEWeights& w) { w.score_bias = bf16_bias.ref(); },
         {"score_bias", "dtype=bf16"}},
        {"bias shape", [&](MoEConfig&, MoEWeights& w) { w.score_bias = wrong_bias.ref(); }, {"score_bias", "[5]"}},
        {"shared missing",
         [](MoEConfig&, MoEWeights& w) { w.shared_w13 = TensorRef(); },
         {"shared_w13", "num_shared_experts=1"}},
        {"shared unused",
         [](MoEConfig& c, MoEWeights&) {
             c.num_shared_experts = 0;
             c.shared_ffn_size = 0;
         },
         {"shared_w13", "num_shared_experts=0"}},
        {"shared_w13 shape",
         [&](MoEConfig&, MoEWeights& w) { w.shared_w13 = wrong_shared13.ref(); },
         {"shared_w13", "[4, 8]", "[8, 8]"}},
        {"shared_w2 shape",
         [&](MoEConfig&, MoEWeights& w) { w.shared_w2 = wrong_shared2.ref(); },
         {"shared_w2", "[8, 8]", "[8, 4]"}},
        {"w13 scale",
         [&](MoEConfig&, MoEWeights& w) { w.w13_scale = scale.ref(); },
         {"w13_scale", "given but w13 is", "not fp8e4m3"}},
        {"w2 scale",
         [&](MoEConfig&, MoEWeights& w) { w.w2_scale = scale.ref(); },
         {"w2_scale", "given but w2 is", "not fp8e4m3"}},
        {"device mix",
         [](MoEConfig&, MoEWeights& w) { w.gate.device = Device::kCUDA; },
         {"gate", "cuda", "one device"}},
        {"not contiguous", [](MoEConfig&, MoEWeights& w) { w.w2.strides[2] = 2; }, {"w2", "contiguous"}},
    };
    for (const Case& k : cases) {
        SCOPED_TRACE(k.name);
        MoEConfig c = cfg;
        MoEWeights w = L.weights();
        k.mutate(c, w);
        expect_error([&] { MoELayer layer(c, w); }, k.parts);
    }
}

#ifndef SWITCHYARD_WITH_CUDA
TEST(MoELayerApi, CudaWeightsNeedACudaBuild) {
    const HostLayer L = test::random_layer(test::tiny_config(), 3);
    MoEWeights w = L.weights();
    for (TensorRef* t : {&w.gate, &w.w13, &w.w2}) t->device = Device::kCUDA;
    expect_error([&] { MoELayer layer(L.cfg, w); }, {"built without CUDA"});
    expect_error([&] { Router r(L.cfg, w.gate); }, {"built without CUDA"});
}
#endif

TEST(MoELayerApi, ForwardValidatesActivationsAndOutputs) {
    const HostLayer L = test::random_layer(api_cfg(), 4, DType::kBF16);
    const MoELayer layer(L.cfg, L.weights());
    HostTensor x(DType::kBF16, {3, 8}), y(DType::kBF16, {3, 8}), x32(DType::kF32, {3, 8}), xh(DType::kBF16, {3, 7});
    HostTensor y2(DType::kBF16, {2, 8}), ids_f(DType::kF32, {3, 2}), w_short(DType::kF32, {3, 1});
    expect_error([&] { layer.forward(x32.ref(), y.ref()); }, {"x", "dtype=fp32", "bf16"});
    expect_error([&] { layer.forward(xh.ref(), y.ref()); }, {"x", "[3, 7]", "hidden_size=8"});
    expect_error([&] { layer.forward(x.ref(), y2.ref()); }, {"y", "[2, 8]"});
    TensorRef strided = x.ref();
    strided.strides[0] = 16;
    expect_error([&] { layer.forward(strided, y.ref()); }, {"x", "contiguous"});
    ForwardOutputs out;
    out.topk_ids = ids_f.ref();
    expect_error([&] { layer.forward(x.ref(), y.ref(), &out); }, {"topk_ids", "dtype=fp32", "int32"});
    out = ForwardOutputs();
    out.topk_weights = w_short.ref();
    expect_error([&] { layer.forward(x.ref(), y.ref(), &out); }, {"topk_weights", "[3, 1]"});
    expect_error([&] { validate_activation(L.cfg, x.ref(), "hidden_states", Device::kCUDA); },
                 {"hidden_states", "cuda"});
}

TEST(MoELayerApi, CpuForwardIsTheReference) {
    for (uint64_t seed = 10; seed < 14; ++seed) {
        SCOPED_TRACE(test::seed_trace(seed));
        MoEConfig c = api_cfg();
        c.capacity_factor = seed % 2 ? 1.0 : 0.0;
        c.renormalize = seed % 2 == 0;
        c.aux_loss_coef = 0.1;
        const HostLayer L = test::random_layer(c, seed, DType::kBF16);
        const MoELayer layer(c, L.weights());
        const int64_t num_tokens = 13;
        const HostTensor x =
            HostTensor::from_floats(test::random_uniform(num_tokens * 8, seed), DType::kBF16, {num_tokens, 8});
        HostTensor y(DType::kBF16, {num_tokens, 8}), y_ref(DType::kBF16, {num_tokens, 8});
        HostTensor logits(DType::kF32, {num_tokens, 4}), ids(DType::kI32, {num_tokens, 2}),
            w(DType::kF32, {num_tokens, 2}), slot(DType::kI32, {num_tokens, 2});
        LoadStats stats;
        ForwardOutputs out;
        out.logits = logits.ref();
        out.topk_ids = ids.ref();
        out.topk_weights = w.ref();
        out.slot_row = slot.ref();
        out.stats = &stats;
        layer.forward(x.ref(), y.ref(), nullptr, 0, nullptr, &out);
        ref::HostPlan plan;
        LoadStats ref_stats;
        ForwardOutputs ref_out;
        ref_out.stats = &ref_stats;
        test::ref_moe_forward(c, L.weights(), x.ref(), y_ref.ref(), &ref_out, &plan);
        EXPECT_TRUE(test::all_equal(y.to_floats(), y_ref.to_floats(), {num_tokens, 8}));
        EXPECT_TRUE(test::all_equal(std::vector<int32_t>(ids.ptr<int32_t>(), ids.ptr<int32_t>() + 2 * num_tokens),
                                    plan.topk_ids, {num_tokens, 2}));
        EXPECT_TRUE(test::all_equal(std::vector<int32_t>(slot.ptr<int32_t>(), slot.ptr<int32_t>() + 2 * num_tokens),
                                    plan.slot_row, {num_tokens, 2}));
        EXPECT_TRUE(test::all_equal(w.to_floats(), plan.topk_weights, {num_tokens, 2}));
        EXPECT_EQ(stats.expert_counts, ref_stats.expert_counts);
        EXPECT_EQ(stats.kept_counts, ref_stats.kept_counts);
        EXPECT_EQ(stats.dropped, plan.dropped());
        EXPECT_EQ(stats.aux_loss, ref_stats.aux_loss);
        EXPECT_GT(stats.aux_loss, 0.0);
        // The convenience overload gives the same bits.
        HostTensor y2(DType::kBF16, {num_tokens, 8});
        layer.forward(x.ref(), y2.ref());
        EXPECT_TRUE(test::all_equal(y2.to_floats(), y.to_floats(), {num_tokens, 8}));
        // Output is not all zeros (the test could not tell a dead layer otherwise).
        double norm = 0;
        for (float v : y.to_floats()) norm += std::fabs(v);
        EXPECT_GT(norm, 0.0);
    }
}

TEST(MoELayerApi, ZeroTokens) {
    const HostLayer L = test::random_layer(api_cfg(), 5, DType::kBF16);
    const MoELayer layer(L.cfg, L.weights());
    const TensorRef x(nullptr, DType::kBF16, {0, 8}), y(nullptr, DType::kBF16, {0, 8});
    LoadStats stats;
    ForwardOutputs out;
    out.stats = &stats;
    EXPECT_NO_THROW(layer.forward(x, y, &out));
    EXPECT_EQ(stats.num_tokens, 0);
    EXPECT_EQ(stats.expert_counts, (std::vector<int64_t>{0, 0, 0, 0}));
}

TEST(RouterApi, CpuRouterIsTheReference) {
    const uint64_t seed = 8;
    SCOPED_TRACE(test::seed_trace(seed));
    MoEConfig c = api_cfg();
    c.num_experts = 8;
    c.top_k = 3;
    c.num_groups = 4;
    c.topk_groups = 2;
    c.renormalize = true;
    c.routed_scale = 2.5;
    const HostLayer L = test::random_layer(c, seed, DType::kBF16);
    const Router router(c, L.gate.ref(), L.score_bias.ref());
    EXPECT_GT(router.workspace_size(100), 100u * 8u * 4u);  // at least the logits [T, E] fp32
    const int64_t num_tokens = 21;
    const HostTensor x =
        HostTensor::from_floats(test::random_uniform(num_tokens * 8, seed), DType::kBF16, {num_tokens, 8});
    HostTensor ids(DType::kI32, {num_tokens, 3}), w(DType::kF32, {num_tokens, 3}), logits(DType::kF32, {num_tokens, 8});
    LoadStats stats;
    router.forward(x.ref(), ids.ref(), w.ref(), logits.ref(), nullptr, 0, nullptr, &stats);
    const auto want_logits = ref::router_logits(x.to_floats(), L.gate.to_floats(), num_tokens, 8, 8);
    std::vector<int32_t> want_ids;
    std::vector<float> want_w;
    ref::route(c, want_logits, L.score_bias.to_floats(), num_tokens, want_ids, want_w);
    EXPECT_TRUE(test::all_equal(logits.to_floats(), want_logits, {num_tokens, 8}));
    EXPECT_TRUE(test::all_equal(std::vector<int32_t>(ids.ptr<int32_t>(), ids.ptr<int32_t>() + 3 * num_tokens), want_ids,
                                {num_tokens, 3}));
    EXPECT_TRUE(test::all_equal(w.to_floats(), want_w, {num_tokens, 3}));
    int64_t total = 0;
    for (int64_t v : stats.expert_counts) total += v;
    EXPECT_EQ(total, num_tokens * 3);
    EXPECT_EQ(stats.kept_counts, stats.expert_counts);
    // Logits are optional.
    HostTensor ids2(DType::kI32, {num_tokens, 3}), w2(DType::kF32, {num_tokens, 3});
    router.forward(x.ref(), ids2.ref(), w2.ref(), TensorRef(), nullptr, 0);
    EXPECT_TRUE(test::all_equal(w2.to_floats(), want_w, {num_tokens, 3}));
}

TEST(RouterApi, Validation) {
    MoEConfig c = api_cfg();
    const HostLayer L = test::random_layer(c, 6, DType::kF32);
    HostTensor wrong_gate(DType::kF32, {3, 8});
    expect_error([&] { Router r(c, wrong_gate.ref(), L.score_bias.ref()); }, {"gate", "[3, 8]", "[4, 8]"});
    expect_error([&] { Router r(c, L.gate.ref()); }, {"score_bias", "use_score_bias"});
    c.use_score_bias = false;
    expect_error([&] { Router r(c, L.gate.ref(), L.score_bias.ref()); }, {"score_bias", "use_score_bias=false"});
    const Router router(c, L.gate.ref());
    HostTensor x(DType::kBF16, {2, 8}), ids(DType::kI32, {2, 2}), w(DType::kF32, {2, 2}), ids64(DType::kI64, {2, 2});
    expect_error([&] { router.forward(x.ref(), TensorRef(), w.ref(), TensorRef(), nullptr, 0); },
                 {"topk_ids", "undefined"});
    expect_error([&] { router.forward(x.ref(), ids64.ref(), w.ref(), TensorRef(), nullptr, 0); },
                 {"topk_ids", "dtype=int64"});
    HostTensor logits_bad(DType::kF32, {2, 5});
    expect_error([&] { router.forward(x.ref(), ids.ref(), w.ref(), logits_bad.ref(), nullptr, 0); },
                 {"logits", "[2, 5]"});
}

}  // namespace
}  // namespace switchyard
