// tests/test_gated_gemm.cpp: grouped_gemm_gated and interleave_gate_up (switchyard/stages.h) on the CPU backend.
//
// interleave_gate_up is checked row by row against its definition and inverted; grouped_gemm_gated must give the
// bits of its definition (grouped_gemm with the un-interleaved weights into h's dtype, then activation) for fp32
// and bf16, SwiGLU and GeGLU, groups of 0 and several rows, rows past offsets[E] zeroed or left untouched; calls
// the stage refuses are refused with errors that name the argument. A MoELayer with MoEConfig::gate_up_interleaved
// and interleaved w13 must give the bits of the plain layer (routing, capacity, shared expert alike), with a smaller
// workspace (no GEMM1 product) and the plan's offsets in ForwardOutputs.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "switchyard/baseline.h"
#include "switchyard/moe_layer.h"
#include "switchyard/stages.h"
#include "test_util.h"

namespace switchyard {
namespace {

using test::HostTensor;
using test::expect_error;
using test::random_uniform;

HostTensor iota_rows(int64_t groups, int64_t n, int64_t k) {
    HostTensor w(DType::kF32, {groups, n, k});
    for (int64_t e = 0; e < groups; ++e)
        for (int64_t r = 0; r < n; ++r)
            for (int64_t c = 0; c < k; ++c) w.set((e * n + r) * k + c, static_cast<float>(1000 * e + 10 * r + c));
    return w;
}

TEST(GatedGemm, InterleaveMovesBlocksOfEightRowsAndInverts) {
    const int64_t E = 2, F = 24, K = 3, N = 2 * F;
    const HostTensor w = iota_rows(E, N, K);
    HostTensor wi(DType::kF32, {E, N, K}), back(DType::kF32, {E, N, K});
    interleave_gate_up(w.ref(), wi.ref());
    for (int64_t e = 0; e < E; ++e) {
        for (int64_t f = 0; f < F; ++f) {
            const int64_t gate_row = 16 * (f / 8) + f % 8, up_row = gate_row + 8;
            for (int64_t c = 0; c < K; ++c) {
                ASSERT_EQ(wi.get((e * N + gate_row) * K + c), w.get((e * N + f) * K + c)) << "e=" << e << " f=" << f;
                ASSERT_EQ(wi.get((e * N + up_row) * K + c), w.get((e * N + F + f) * K + c)) << "e=" << e << " f=" << f;
            }
        }
    }
    interleave_gate_up(wi.ref(), back.ref(), /*inverse=*/true);
    for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(back.get(i), w.get(i)) << "i=" << i;
}

// h from grouped_gemm_gated(a, interleave(w13)) against grouped_gemm(a, w13) -> g [R, 2F] of h's dtype ->
// activation: the same bits; rows past offsets[E] zeroed, or untouched without zero_unowned_rows.
void check_matches_two_steps(DType dtype, Activation act, bool zero_unowned) {
    SCOPED_TRACE(std::string(to_string(dtype)) + " " + to_string(act) + (zero_unowned ? " zero" : " untouched"));
    const int64_t E = 4, F = 40, K = 24, N = 2 * F, R = 23;
    const std::vector<int32_t> offsets = {0, 5, 5, 17, 20};  // an empty group, rows 20..22 owned by nobody
    const HostTensor a = HostTensor::from_floats(random_uniform(R * K, 11), dtype, {R, K});
    const HostTensor w13 = HostTensor::from_floats(random_uniform(E * N * K, 12), dtype, {E, N, K});
    HostTensor off(DType::kI32, {E + 1});
    for (int64_t i = 0; i <= E; ++i) off.ptr<int32_t>()[i] = offsets[i];
    HostTensor w13i(dtype, {E, N, K}), g(dtype, {R, N}), want(dtype, {R, F}), h(dtype, {R, F});
    interleave_gate_up(w13.ref(), w13i.ref());
    grouped_gemm(a.ref(), w13.ref(), off.ref(), g.ref(), nullptr, 0);
    activation(act, g.ref(), want.ref());
    for (int64_t i = 0; i < h.numel(); ++i) h.set(i, 7.0f);
    GroupedGemmOptions opt;
    opt.zero_unowned_rows = zero_unowned;
    grouped_gemm_gated(act, a.ref(), w13i.ref(), off.ref(), h.ref(), nullptr, 0, nullptr, opt);
    int64_t nonzero = 0;
    for (int64_t r = 0; r < R; ++r) {
        for (int64_t f = 0; f < F; ++f) {
            const int64_t i = r * F + f;
            if (r >= offsets[E]) {
                ASSERT_EQ(h.get(i), zero_unowned ? 0.0f : 7.0f) << "unowned row " << r;
            } else {
                ASSERT_TRUE(float_bits(h.get(i)) == float_bits(want.get(i))) << "r=" << r << " f=" << f << ": " << h.get(i)
                                                                  << " vs " << want.get(i);
                nonzero += h.get(i) != 0.0f;
            }
        }
    }
    EXPECT_GT(nonzero, offsets[E] * F / 2) << "the comparison must not be between zeros";
}

TEST(GatedGemm, MatchesGroupedGemmThenActivation) {
    for (DType dtype : {DType::kF32, DType::kBF16})
        for (Activation act : {Activation::kSwiGLU, Activation::kGeGLU})
            for (bool zero_unowned : {true, false}) check_matches_two_steps(dtype, act, zero_unowned);
}

// options.gate_up: g [R, 2F] receives grouped_gemm(a, w13i)'s bits (the interleaved columns) and h is unchanged, so
// activation(g, interleaved) gives h again; rows past offsets[E] of g follow zero_unowned_rows as h's do; with
// row_index too (the CPU builds it) the gathered copy's g.
void check_keeps_gate_up(DType dtype, bool zero_unowned, bool gathered) {
    SCOPED_TRACE(std::string(to_string(dtype)) + (zero_unowned ? " zero" : " untouched") +
                 (gathered ? " gathered" : ""));
    const int64_t E = 4, F = 40, K = 24, N = 2 * F, R = 23, T = 9;
    const std::vector<int32_t> offsets = {0, 5, 5, 17, 20};  // an empty group, rows 20..22 owned by nobody
    const HostTensor x = HostTensor::from_floats(random_uniform(T * K, 31), dtype, {T, K});
    HostTensor a(dtype, {R, K}), idx(DType::kI32, {R});
    for (int64_t r = 0; r < R; ++r) {
        idx.ptr<int32_t>()[r] = static_cast<int32_t>((5 * r + 2) % T);
        for (int64_t c = 0; c < K; ++c) a.set(r * K + c, x.get(idx.ptr<int32_t>()[r] * K + c));
    }
    const HostTensor w13 = HostTensor::from_floats(random_uniform(E * N * K, 32), dtype, {E, N, K});
    HostTensor off(DType::kI32, {E + 1});
    for (int64_t i = 0; i <= E; ++i) off.ptr<int32_t>()[i] = offsets[i];
    HostTensor w13i(dtype, {E, N, K}), want_g(dtype, {R, N}), want_h(dtype, {R, F}), g(dtype, {R, N}),
        h(dtype, {R, F}), h_again(dtype, {R, F});
    interleave_gate_up(w13.ref(), w13i.ref());
    grouped_gemm(a.ref(), w13i.ref(), off.ref(), want_g.ref(), nullptr, 0);
    grouped_gemm_gated(Activation::kSwiGLU, a.ref(), w13i.ref(), off.ref(), want_h.ref(), nullptr, 0);
    for (int64_t i = 0; i < g.numel(); ++i) g.set(i, 5.0f);
    for (int64_t i = 0; i < h.numel(); ++i) h.set(i, 7.0f);
    GroupedGemmOptions opt;
    opt.zero_unowned_rows = zero_unowned;
    opt.gate_up = g.ref();
    if (gathered) opt.row_index = idx.ref();
    grouped_gemm_gated(Activation::kSwiGLU, (gathered ? x : a).ref(), w13i.ref(), off.ref(), h.ref(), nullptr, 0,
                       nullptr, opt);
    int64_t nonzero = 0;
    for (int64_t r = 0; r < R; ++r) {
        const bool owned = r < offsets[E];
        for (int64_t n = 0; n < N; ++n) {
            const int64_t i = r * N + n;
            if (!owned) {
                ASSERT_EQ(g.get(i), zero_unowned ? 0.0f : 5.0f) << "unowned row " << r;
                continue;
            }
            ASSERT_EQ(float_bits(g.get(i)), float_bits(want_g.get(i))) << "g r=" << r << " n=" << n;
            nonzero += g.get(i) != 0.0f;
        }
        for (int64_t f = 0; f < F; ++f) {
            const int64_t i = r * F + f;
            if (owned) {
                ASSERT_EQ(float_bits(h.get(i)), float_bits(want_h.get(i))) << "h r=" << r << " f=" << f;
            } else {
                ASSERT_EQ(h.get(i), zero_unowned ? 0.0f : 7.0f) << "unowned row " << r;
            }
        }
    }
    EXPECT_GT(nonzero, offsets[E] * N / 2) << "the comparison must not be between zeros";
    // h is the interleaved activation of the kept g
    activation(Activation::kSwiGLU, g.ref(), h_again.ref(), TensorRef(), nullptr, /*gate_up_interleaved=*/true);
    for (int64_t i = 0; i < offsets[E] * F; ++i) ASSERT_EQ(float_bits(h_again.get(i)), float_bits(h.get(i))) << i;
}

TEST(GatedGemm, KeepsGemm1sProductWhenAsked) {
    for (DType dtype : {DType::kF32, DType::kBF16})
        for (bool zero_unowned : {true, false})
            for (bool gathered : {false, true}) check_keeps_gate_up(dtype, zero_unowned, gathered);
}

// options.row_index: x's rows gathered by the stage give the bits of the call on the gathered copy (grouped_gemm_gated
// and grouped_gemm); an index outside x's rows (negative or past the end) reads zeros; rows past offsets[E] follow
// zero_unowned_rows.
TEST(GatedGemm, GatheredRowsMatchTheGatheredCopy) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
        SCOPED_TRACE(to_string(dtype));
        const int64_t E = 3, F = 16, K = 24, N = 2 * F, T = 9, R = 14;
        const std::vector<int32_t> offsets = {0, 4, 4, 12};  // an empty group, rows 12..13 owned by nobody
        const std::vector<int32_t> idx = {3, 0, 8, 3, 5, -1, 2, 9, 7, 1, 100, 4, 6, 6};
        const HostTensor x = HostTensor::from_floats(random_uniform(T * K, 31), dtype, {T, K});
        const HostTensor w13 = HostTensor::from_floats(random_uniform(E * N * K, 32), dtype, {E, N, K});
        HostTensor off(DType::kI32, {E + 1}), ri(DType::kI32, {R}), xp(dtype, {R, K});
        for (int64_t i = 0; i <= E; ++i) off.ptr<int32_t>()[i] = offsets[i];
        for (int64_t r = 0; r < R; ++r) {
            ri.ptr<int32_t>()[r] = idx[r];
            for (int64_t c = 0; c < K; ++c)
                xp.set(r * K + c, idx[r] >= 0 && idx[r] < T ? x.get(idx[r] * K + c) : 0.0f);
        }
        HostTensor w13i(dtype, {E, N, K}), want(dtype, {R, F}), h(dtype, {R, F});
        interleave_gate_up(w13.ref(), w13i.ref());
        for (bool zero_unowned : {true, false}) {
            GroupedGemmOptions opt;
            opt.zero_unowned_rows = zero_unowned;
            for (int64_t i = 0; i < h.numel(); ++i) {
                h.set(i, 7.0f);
                want.set(i, 7.0f);
            }
            grouped_gemm_gated(Activation::kSwiGLU, xp.ref(), w13i.ref(), off.ref(), want.ref(), nullptr, 0, nullptr,
                               opt);
            opt.row_index = ri.ref();
            grouped_gemm_gated(Activation::kSwiGLU, x.ref(), w13i.ref(), off.ref(), h.ref(), nullptr, 0, nullptr, opt);
            int64_t nonzero = 0;
            for (int64_t i = 0; i < h.numel(); ++i) {
                ASSERT_EQ(float_bits(h.get(i)), float_bits(want.get(i))) << "row " << i / F << " col " << i % F;
                nonzero += h.get(i) != 0.0f && h.get(i) != 7.0f;
            }
            EXPECT_GT(nonzero, offsets[E] * F / 2) << "the comparison must not be between zeros";
            EXPECT_EQ(h.get(12 * F), zero_unowned ? 0.0f : 7.0f) << "row past offsets[E]";
            EXPECT_EQ(h.get(5 * F), 0.0f) << "an index below 0 reads zeros (SwiGLU(0) * 0)";
        }
        // The plain grouped_gemm takes the same row_index: the bits of the call on the gathered copy.
        HostTensor g_want(dtype, {R, N}), g_got(dtype, {R, N});
        grouped_gemm(xp.ref(), w13.ref(), off.ref(), g_want.ref(), nullptr, 0);
        GroupedGemmOptions gopt;
        gopt.row_index = ri.ref();
        grouped_gemm(x.ref(), w13.ref(), off.ref(), g_got.ref(), nullptr, 0, nullptr, gopt);
        for (int64_t i = 0; i < g_got.numel(); ++i)
            ASSERT_EQ(float_bits(g_got.get(i)), float_bits(g_want.get(i))) << "grouped_gemm element " << i;
        // A row_index that is not int32 is refused.
        GroupedGemmOptions bad;
        HostTensor ri64(DType::kF32, {R});
        bad.row_index = ri64.ref();
        test::expect_error(
            [&] {
                grouped_gemm_gated(Activation::kSwiGLU, x.ref(), w13i.ref(), off.ref(), h.ref(), nullptr, 0, nullptr,
                                   bad);
            },
            {"row_index"});
    }
}

TEST(GatedGemm, OneGroupWithoutOffsets) {
    const int64_t F = 16, K = 8, N = 2 * F, R = 5;
    const HostTensor a = HostTensor::from_floats(random_uniform(R * K, 21), DType::kF32, {R, K});
    const HostTensor w13 = HostTensor::from_floats(random_uniform(N * K, 22), DType::kF32, {N, K});
    HostTensor w13i(DType::kF32, {N, K}), g(DType::kF32, {R, N}), want(DType::kF32, {R, F}), h(DType::kF32, {R, F});
    interleave_gate_up(w13.ref(), w13i.ref());
    grouped_gemm(a.ref(), w13.ref(), TensorRef(), g.ref(), nullptr, 0);
    activation(Activation::kSwiGLU, g.ref(), want.ref());
    grouped_gemm_gated(Activation::kSwiGLU, a.ref(), w13i.ref(), TensorRef(), h.ref(), nullptr, 0);
    for (int64_t i = 0; i < h.numel(); ++i) ASSERT_TRUE(float_bits(h.get(i)) == float_bits(want.get(i))) << "i=" << i;
}

// activation / activation_backward with gate_up_interleaved: the plain ones on the permuted columns (g [R, 2F] is
// permuted as interleave_gate_up permutes a [R, 2F, 1] tensor's rows), bit for bit, for fp64, fp32 and bf16.
TEST(GatedGemm, InterleavedActivationAndBackwardArePermutedPlainOnes) {
    const int64_t R = 5, F = 24, N = 2 * F;
    for (DType dtype : {DType::kF64, DType::kF32, DType::kBF16}) {
        for (Activation act : {Activation::kSwiGLU, Activation::kGeGLU}) {
            SCOPED_TRACE(std::string(to_string(dtype)) + " " + to_string(act));
            const HostTensor g = HostTensor::from_floats(random_uniform(R * N, 31, -3.0f, 3.0f), dtype, {R, N, 1});
            const HostTensor dh = HostTensor::from_floats(random_uniform(R * F, 32), dtype, {R, F});
            HostTensor gi(dtype, {R, N, 1});
            interleave_gate_up(g.ref(), gi.ref());
            const TensorRef g2 = TensorRef(const_cast<void*>(g.data()), dtype, {R, N});
            const TensorRef gi2 = TensorRef(gi.data(), dtype, {R, N});
            HostTensor h(dtype, {R, F}), hi(dtype, {R, F}), dg(dtype, {R, N, 1}), dgi(dtype, {R, N}),
                want(dtype, {R, N, 1});
            activation(act, g2, h.ref());
            activation(act, gi2, hi.ref(), TensorRef(), nullptr, /*gate_up_interleaved=*/true);
            for (int64_t i = 0; i < h.numel(); ++i) ASSERT_EQ(float_bits(hi.get(i)), float_bits(h.get(i))) << i;
            activation_backward(act, g2, dh.ref(), TensorRef(dg.data(), dtype, {R, N}));
            activation_backward(act, gi2, dh.ref(), dgi.ref(), nullptr, /*gate_up_interleaved=*/true);
            interleave_gate_up(dg.ref(), want.ref());
            for (int64_t i = 0; i < dgi.numel(); ++i) ASSERT_EQ(float_bits(dgi.get(i)), float_bits(want.get(i))) << i;
        }
    }
    HostTensor g(DType::kF32, {R, N}), h(DType::kF32, {R, F}), g12(DType::kF32, {R, 24}), h12(DType::kF32, {R, 12});
    expect_error([&] { activation(Activation::kGELU, h.ref(), HostTensor(DType::kF32, {R, F}).ref(), TensorRef(),
                                  nullptr, true); },
                 {"not gated"});
    expect_error([&] { activation(Activation::kSwiGLU, g12.ref(), h12.ref(), TensorRef(), nullptr, true); },
                 {"F % 8"});
}

TEST(GatedGemm, RefusesWhatItCannotCompute) {
    const int64_t E = 2, F = 16, K = 8, N = 2 * F, R = 6;
    HostTensor a(DType::kF32, {R, K}), w13i(DType::kF32, {E, N, K}), h(DType::kF32, {R, F});
    HostTensor off(DType::kI32, {E + 1});
    off.ptr<int32_t>()[1] = 3;
    off.ptr<int32_t>()[2] = 6;
    expect_error([&] { grouped_gemm_gated(Activation::kGELU, a.ref(), w13i.ref(), off.ref(), h.ref(), nullptr, 0); },
                 {"not a gated activation"});
    HostTensor odd(DType::kF32, {E, 24, K}), h12(DType::kF32, {R, 12});
    expect_error([&] { grouped_gemm_gated(Activation::kSwiGLU, a.ref(), odd.ref(), off.ref(), h12.ref(), nullptr, 0); },
                 {"w13i", "multiple of 16"});
    HostTensor wide(DType::kF32, {R, N});
    expect_error([&] { grouped_gemm_gated(Activation::kSwiGLU, a.ref(), w13i.ref(), off.ref(), wide.ref(), nullptr, 0); },
                 {"h shape"});
    expect_error([&] { grouped_gemm_gated(Activation::kSwiGLU, a.ref(), w13i.ref(), TensorRef(), h.ref(), nullptr, 0); },
                 {"offsets are required"});
    GroupedGemmOptions keep;
    HostTensor narrow(DType::kF32, {R, F}), g16(DType::kBF16, {R, N});
    keep.gate_up = narrow.ref();
    expect_error([&] { grouped_gemm_gated(Activation::kSwiGLU, a.ref(), w13i.ref(), off.ref(), h.ref(), nullptr, 0,
                                          nullptr, keep); },
                 {"gate_up shape"});
    keep.gate_up = g16.ref();
    expect_error([&] { grouped_gemm_gated(Activation::kSwiGLU, a.ref(), w13i.ref(), off.ref(), h.ref(), nullptr, 0,
                                          nullptr, keep); },
                 {"gate_up", "dtype"});
    HostTensor w13(DType::kF32, {E, N, K}), small(DType::kF32, {E, N - 16, K});
    expect_error([&] { interleave_gate_up(w13.ref(), small.ref()); }, {"w13i shape"});
    expect_error([&] { interleave_gate_up(w13.ref(), w13.ref()); }, {"out of place"});
    expect_error([&] { interleave_gate_up(odd.ref(), HostTensor(DType::kF32, {E, 24, K}).ref()); },
                 {"multiple of 16"});
}

// One forward of `layer` on x: y's bits, the plan's offsets and the expert counts.
struct LayerRun {
    std::vector<float> y;
    std::vector<int32_t> offsets, counts;
};
LayerRun run_layer(const MoELayer& layer, const HostTensor& x) {
    const MoEConfig& c = layer.config();
    const int64_t T = x.shape()[0], E = c.num_experts;
    HostTensor y(c.dtype, {T, c.hidden_size}), offsets(DType::kI32, {E + 1}), counts(DType::kI32, {E});
    ForwardOutputs out;
    out.expert_offsets = offsets.ref();
    out.expert_counts = counts.ref();
    layer.forward(x.ref(), y.ref(), &out);
    LayerRun r;
    for (int64_t i = 0; i < y.numel(); ++i) r.y.push_back(y.get(i));
    r.offsets.assign(offsets.ptr<int32_t>(), offsets.ptr<int32_t>() + E + 1);
    r.counts.assign(counts.ptr<int32_t>(), counts.ptr<int32_t>() + E);
    return r;
}

TEST(GatedGemm, InterleavedLayerGivesThePlainLayersBits) {
    for (DType dt : {DType::kF32, DType::kBF16}) {
        for (Activation act : {Activation::kSwiGLU, Activation::kGeGLU}) {
            // dropless; shared expert + groups + bias; capacity; expert choice
            for (int variant = 0; variant < 4; ++variant) {
                SCOPED_TRACE(std::string(to_string(dt)) + " " + to_string(act) + " variant " + std::to_string(variant));
                MoEConfig cfg;
                cfg.hidden_size = 24;
                cfg.ffn_size = 16;
                cfg.num_experts = 8;
                cfg.top_k = 2;
                cfg.activation = act;
                cfg.dtype = dt;
                if (variant == 1) {
                    cfg.score_function = ScoreFunction::kSigmoid;
                    cfg.num_groups = 4;
                    cfg.topk_groups = 2;
                    cfg.use_score_bias = true;
                    cfg.renormalize = true;
                    cfg.routed_scale = 2.5;
                    cfg.num_shared_experts = 1;
                    cfg.shared_ffn_size = 8;
                    cfg.shared_expert_gate = true;
                }
                if (variant == 2) {
                    cfg.capacity_factor = 0.75;
                    cfg.drop_policy = DropPolicy::kProbability;
                }
                if (variant == 3) cfg.routing_mode = RoutingMode::kExpertChoice;
                const int64_t T = 29, E = cfg.num_experts;
                const test::HostLayer plain = test::random_layer(cfg, 40 + variant, dt);
                MoEConfig icfg = cfg;
                icfg.gate_up_interleaved = true;
                HostTensor w13i(dt, plain.w13.shape());
                interleave_gate_up(plain.w13.ref(), w13i.ref());
                MoEWeights iw = plain.weights();
                iw.w13 = w13i.ref();
                const MoELayer a(cfg, plain.weights());
                // b: GEMM1 reads x's rows through the plan (set_gather_in_gemm1); b_unfused: the separate gather
                MoELayer b(icfg, iw), b_unfused(icfg, iw);
                ASSERT_EQ(b_unfused.gather_in_gemm1(), GatherInGemm1::kAuto) << "automatic by default";
                ASSERT_FALSE(b_unfused.uses_gather_in_gemm1(T)) << "the CPU backend gathers first";
                b.set_gather_in_gemm1(true);
                ASSERT_TRUE(b.uses_gather_in_gemm1(T));
                const HostTensor x = HostTensor::from_floats(random_uniform(T * cfg.hidden_size, 41), dt,
                                                             {T, cfg.hidden_size});
                const LayerRun want = run_layer(a, x), got = run_layer(b, x), got_unfused = run_layer(b_unfused, x);
                for (size_t i = 0; i < want.y.size(); ++i) {
                    ASSERT_EQ(float_bits(got.y[i]), float_bits(want.y[i])) << "y element " << i;
                    ASSERT_EQ(float_bits(got_unfused.y[i]), float_bits(want.y[i])) << "y element " << i << " (gather)";
                }
                EXPECT_EQ(got.offsets, want.offsets);
                EXPECT_EQ(got.counts, want.counts);
                if (!cfg.expert_choice())
                    EXPECT_EQ(want.offsets[E] == T * cfg.top_k, variant != 2) << "capacity drops pairs, dropless not";
                // No [R, 2F] GEMM1 product in the interleaved layer's workspace.
                EXPECT_LT(b.workspace_size(T), a.workspace_size(T));
                for (const WorkspaceSlice& s : b.workspace_layout(T)) EXPECT_NE(s.name, "g1");
            }
        }
    }
}

// The automatic choice of GEMM1's gathered A loads (stages.h: gather_in_gemm1_preferred): CUDA bf16 with the
// interleaved layout and float experts; at most 128 rows per expert on average, or 256 with x within 64 MiB, or where
// the separate gather is a large share of GEMM1 (small experts) (the measured crossovers: bench/NOTES.md, "Session
// 12"), at the three model shapes; and what MoELayer makes of its modes.
TEST(GatedGemm, GatherInGemm1AutomaticChoiceFollowsTheMeasuredCrossover) {
    auto shape = [](int64_t H, int64_t F, int64_t E, int64_t k) {
        MoEConfig c;
        c.hidden_size = H, c.ffn_size = F, c.num_experts = E, c.top_k = k;
        c.dtype = DType::kBF16;
        c.gate_up_interleaved = true;
        return c;
    };
    const MoEConfig qwen3 = shape(2048, 768, 128, 8), mixtral = shape(4096, 14336, 8, 2),
                    deepseek = shape(7168, 2048, 256, 8);
    ASSERT_EQ(gather_in_gemm1_max_rows(), 128);
    ASSERT_EQ(gather_in_gemm1_x_bytes(), int64_t{64} << 20);
    ASSERT_EQ(gather_in_gemm1_min_share(), 0.15);
    // Qwen3 (F = 768: the gather is 0.19 of GEMM1's time): T * 8 / 128 rows per expert, gathered at every T (measured
    // faster at 64-1024 rows: T = 1024-16384).
    for (int64_t T : {1, 64, 1024, 2048, 2049, 4096, 16384, 65536})
        EXPECT_TRUE(gather_in_gemm1_preferred(qwen3, Device::kCUDA, T)) << T;
    // DeepSeek-V3 (0.07): T / 32 rows: 128 at T = 4096 (faster), 256 at 8192 with x 112 MiB (tied), 512 at 16384
    // (slower); x reaches 64 MiB at T = 4681.
    EXPECT_TRUE(gather_in_gemm1_preferred(deepseek, Device::kCUDA, 4096));
    EXPECT_TRUE(gather_in_gemm1_preferred(deepseek, Device::kCUDA, 4681));
    EXPECT_FALSE(gather_in_gemm1_preferred(deepseek, Device::kCUDA, 4682));
    EXPECT_FALSE(gather_in_gemm1_preferred(deepseek, Device::kCUDA, 8192));
    EXPECT_FALSE(gather_in_gemm1_preferred(deepseek, Device::kCUDA, 16384));
    // Mixtral (0.014): T / 4 rows: 256 at T = 1024 with x 8 MiB (faster), 257 at 1025, 1024 at 4096 (slower).
    EXPECT_TRUE(gather_in_gemm1_preferred(mixtral, Device::kCUDA, 512));
    EXPECT_TRUE(gather_in_gemm1_preferred(mixtral, Device::kCUDA, 1024));
    EXPECT_FALSE(gather_in_gemm1_preferred(mixtral, Device::kCUDA, 1025));
    EXPECT_FALSE(gather_in_gemm1_preferred(mixtral, Device::kCUDA, 4096));
    // 256 rows with x past 64 MiB: DeepSeek-V3's shape at 256 rows but H = 16384 is not gathered at T = 8192 (256 MiB
    // of x); at H = 4096 (x 64 MiB) it is.
    MoEConfig wide = deepseek;
    wide.hidden_size = 16384;
    EXPECT_FALSE(gather_in_gemm1_preferred(wide, Device::kCUDA, 8192));
    wide.hidden_size = 4096;
    EXPECT_TRUE(gather_in_gemm1_preferred(wide, Device::kCUDA, 8192));
    // Only where the gathered CUDA kernels run: not on the CPU, not fp16 / fp32, not the plain layout, not FP8 experts.
    EXPECT_FALSE(gather_in_gemm1_preferred(qwen3, Device::kCPU, 64));
    EXPECT_FALSE(gather_in_gemm1_preferred(qwen3, Device::kCUDA, 0));
    MoEConfig none = qwen3;  // degenerate shapes answer no (no division by zero)
    none.num_experts = 0;
    EXPECT_FALSE(gather_in_gemm1_preferred(none, Device::kCUDA, 64));
    none = qwen3;
    none.top_k = 0;
    EXPECT_FALSE(gather_in_gemm1_preferred(none, Device::kCUDA, 64));
    MoEConfig c = qwen3;
    c.dtype = DType::kF16;
    EXPECT_FALSE(gather_in_gemm1_preferred(c, Device::kCUDA, 64));
    c = qwen3;
    c.gate_up_interleaved = false;
    EXPECT_FALSE(gather_in_gemm1_preferred(c, Device::kCUDA, 64));
    c = qwen3;
    c.quant_mode = QuantMode::kFP8Block;
    EXPECT_FALSE(gather_in_gemm1_preferred(c, Device::kCUDA, 64));
    // Expert choice: its capacity is the rows per expert (capacity_factor 1: ceil(T / E)), whatever top_k says, and
    // the gather's share counts E * capacity rows (about one per token: the share is about twice top_k = 1's).
    c = deepseek;
    c.routing_mode = RoutingMode::kExpertChoice;
    c.capacity_factor = 1.0;
    ASSERT_EQ(c.expert_choice_capacity(32768), 128);
    ASSERT_EQ(c.expert_choice_capacity(65536), 256);
    EXPECT_TRUE(gather_in_gemm1_preferred(c, Device::kCUDA, 32768));  // 128 rows
    EXPECT_FALSE(gather_in_gemm1_preferred(c, Device::kCUDA, 32769));  // 129 rows, x 448 MiB, share 0.13
    c = qwen3;  // share 0.34 at F = 768
    c.routing_mode = RoutingMode::kExpertChoice;
    c.capacity_factor = 1.0;
    ASSERT_EQ(c.expert_choice_capacity(16385), 129);
    EXPECT_TRUE(gather_in_gemm1_preferred(c, Device::kCUDA, 16385));
}

TEST(GatedGemm, InterleavedLayoutConfigIsChecked) {
    MoEConfig cfg;
    cfg.hidden_size = 8;
    cfg.ffn_size = 16;
    cfg.num_experts = 4;
    cfg.top_k = 2;
    cfg.gate_up_interleaved = true;
    cfg.validate();
    EXPECT_NE(cfg.to_string().find("w13=interleaved"), std::string::npos) << cfg.to_string();
    MoEConfig relu = cfg;
    relu.activation = Activation::kReLU;
    expect_error([&] { relu.validate(); }, {"gate_up_interleaved", "gated activation"});
    MoEConfig fp8 = cfg;
    fp8.quant_mode = QuantMode::kFP8Block;
    expect_error([&] { fp8.validate(); }, {"gate_up_interleaved", "unquantised"});
    MoEConfig narrow = cfg;
    narrow.ffn_size = 12;
    expect_error([&] { narrow.validate(); }, {"gate_up_interleaved", "multiple of 8"});
    // The dense baseline reads the plain layout: it refuses the interleaved one rather than misread it.
    const test::HostLayer L = test::random_layer(cfg, 5);
    const HostTensor x = HostTensor::from_floats(random_uniform(3 * cfg.hidden_size, 6), DType::kF32, {3, 8});
    HostTensor y(DType::kF32, {3, 8});
    expect_error([&] { dense_forward_cpu(cfg, L.weights(), x.ref(), y.ref(), size_t{1} << 30); },
                 {"gate_up_interleaved", "dense baseline"});
}

}  // namespace
}  // namespace switchyard
