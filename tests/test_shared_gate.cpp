// tests/test_shared_gate.cpp: the gated shared expert (Qwen2-MoE: y += sigmoid(x . shared_gate) * Shared(x)) on the
// CPU backend, and its validation.
//
// The expectation is built from the public stages and the ungated layer: with fp32 activations,
//   y_gated[t] = fp32( R_t + s_t * S_t ),   y_plain[t] = fp32( R_t + S_t )
// where R_t is the routed sum (double), S_t the shared expert's stored output and s_t = sigmoid(x[t] . g). A layer
// without the shared expert gives fp32(R_t), so |y_gated - (y_routed + s_t * S_t)| <= 2 fp32 roundings of
// |R_t| + |s_t S_t| (the tolerance below, from that arithmetic).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "switchyard/moe_layer.h"
#include "switchyard/stages.h"
#include "test_util.h"

namespace switchyard {
namespace {

MoEConfig gated_config() {
    MoEConfig c;
    c.hidden_size = 24;
    c.ffn_size = 16;
    c.num_experts = 6;
    c.top_k = 2;
    c.score_function = ScoreFunction::kSoftmax;
    c.num_shared_experts = 1;
    c.shared_ffn_size = 20;
    c.shared_expert_gate = true;
    c.dtype = DType::kF32;
    return c;
}

TEST(SharedGate, ScalesTheSharedExpertBySigmoidOfItsGate) {
    for (uint64_t seed : {3u, 4u, 5u}) {
        SCOPED_TRACE(test::seed_trace(seed));
        const MoEConfig c = gated_config();
        const test::HostLayer L = test::random_layer(c, seed);
        const int64_t T = 37, H = c.hidden_size;
        const test::HostTensor x =
            test::HostTensor::from_floats(test::random_uniform(T * H, seed + 100), DType::kF32, {T, H});

        test::HostTensor y_gated(DType::kF32, {T, H}), y_routed(DType::kF32, {T, H});
        MoELayer(c, L.weights()).forward(x.ref(), y_gated.ref());
        MoEConfig routed_only = c;  // the same routed experts, no shared expert
        routed_only.num_shared_experts = 0;
        routed_only.shared_ffn_size = 0;
        routed_only.shared_expert_gate = false;
        MoEWeights wr = L.weights();
        wr.shared_w13 = wr.shared_w2 = wr.shared_gate = TensorRef();
        MoELayer(routed_only, wr).forward(x.ref(), y_routed.ref());

        // S = the shared MLP through the public stages (the layer stores exactly these values), s_t from the gate.
        const int64_t S = c.shared_width();
        test::HostTensor g1(DType::kF32, {T, 2 * S}), h(DType::kF32, {T, S}), shared(DType::kF32, {T, H});
        test::HostTensor gate_logits(DType::kF32, {T, 1});
        grouped_gemm(x.ref(), L.shared_w13.ref(), TensorRef(), g1.ref(), nullptr, 0);
        activation(c.activation, g1.ref(), h.ref());
        grouped_gemm(h.ref(), L.shared_w2.ref(), TensorRef(), shared.ref(), nullptr, 0);
        router_gemm(x.ref(), L.shared_gate.ref(), gate_logits.ref(), nullptr, 0);

        const std::vector<float> yg = y_gated.to_floats(), yr = y_routed.to_floats(), sh = shared.to_floats(),
                                 gl = gate_logits.to_floats();
        const double u = std::ldexp(1.0, -24);
        int64_t changed = 0;
        for (int64_t t = 0; t < T; ++t) {
            const double st = 1.0 / (1.0 + std::exp(-static_cast<double>(gl[t])));
            EXPECT_GT(st, 0.0);
            EXPECT_LT(st, 1.0);
            for (int64_t i = 0; i < H; ++i) {
                const double want = static_cast<double>(yr[t * H + i]) + st * sh[t * H + i];
                const double tol = 3 * u * (std::fabs(yr[t * H + i]) + std::fabs(st * sh[t * H + i])) + 1e-30;
                ASSERT_LE(std::fabs(yg[t * H + i] - want), tol) << "t=" << t << " h=" << i << " got " << yg[t * H + i]
                                                                << " expected " << want;
                if (std::fabs(st - 1.0) * std::fabs(sh[t * H + i]) > 10 * tol) ++changed;
            }
        }
        EXPECT_GT(changed, T * H / 2) << "the gate must change most outputs";
    }
}

TEST(SharedGate, Validation) {
    MoEConfig c = gated_config();
    const test::HostLayer L = test::random_layer(c, 1);
    MoEWeights w = L.weights();
    w.shared_gate = TensorRef();
    test::expect_error([&] { MoELayer(c, w); }, {"shared_gate is required"});
    MoEConfig plain = c;
    plain.shared_expert_gate = false;
    test::expect_error([&] { MoELayer(plain, L.weights()); }, {"shared_gate", "shared_expert_gate=false"});
    MoEConfig no_shared = c;
    no_shared.num_shared_experts = 0;
    no_shared.shared_ffn_size = 0;
    test::expect_error([&] { no_shared.validate(); }, {"shared_expert_gate=true needs a shared expert"});
    const test::HostTensor bad(DType::kF32, {2, c.hidden_size});
    w = L.weights();
    w.shared_gate = bad.ref();
    test::expect_error([&] { MoELayer(c, w); }, {"shared_gate shape=[2, 24]"});
}

}  // namespace
}  // namespace switchyard
