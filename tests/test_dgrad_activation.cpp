// tests/test_dgrad_activation.cpp: grouped_gemm_dgrad_activation (switchyard/stages.h) on the CPU backend.
//
// The stage is specified as three stages: grouped_gemm_dgrad into dh of g's dtype, activation_backward, activation.
// Checked here: it gives the bits of those three stages called one by one (fp32 and bf16, SwiGLU and GeGLU, an
// empty group, rows past offsets[E] that must come back 0 in dg and h whatever was there); the interleaved column
// layout gives the plain layout's values at the permuted columns; dg is the derivative of the layer it belongs to
// (a central difference of sum(dc * (act(g) w2^T)) in fp64 agrees); and the calls it must refuse are refused with
// errors that name the argument.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "switchyard/stages.h"
#include "test_util.h"

namespace switchyard {
namespace {

using test::HostTensor;
using test::expect_error;
using test::random_uniform;

struct Problem {
    int64_t E = 4, H = 24, F = 16, R = 23;
    std::vector<int32_t> offsets = {0, 5, 5, 17, 20};  // an empty group; rows 20..22 owned by nobody
    DType dtype;
    HostTensor dc, w2, g, off;

    explicit Problem(DType t) : dtype(t), dc(t, {R, H}), w2(t, {E, H, F}), g(t, {R, 2 * F}), off(DType::kI32, {E + 1}) {
        dc = HostTensor::from_floats(random_uniform(R * H, 41), t, {R, H});
        w2 = HostTensor::from_floats(random_uniform(E * H * F, 42), t, {E, H, F});
        g = HostTensor::from_floats(random_uniform(R * 2 * F, 43, -3.0f, 3.0f), t, {R, 2 * F});
        for (int64_t i = 0; i <= E; ++i) off.ptr<int32_t>()[i] = offsets[i];
    }
};

// Runs the stage on outputs filled with 7 (so that rows it must zero are seen to be written).
void run_fused(Activation act, const Problem& p, const HostTensor& g, HostTensor& dg, HostTensor& h,
               bool interleaved = false) {
    for (int64_t i = 0; i < dg.numel(); ++i) dg.set(i, 7.0f);
    for (int64_t i = 0; i < h.numel(); ++i) h.set(i, 7.0f);
    grouped_gemm_dgrad_activation(act, p.dc.ref(), p.w2.ref(), p.off.ref(), g.ref(), dg.ref(), h.ref(), nullptr, 0,
                                  nullptr, interleaved);
}

TEST(DgradActivation, GivesTheBitsOfTheThreeStages) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
        for (Activation act : {Activation::kSwiGLU, Activation::kGeGLU}) {
            SCOPED_TRACE(std::string(to_string(dtype)) + " " + to_string(act));
            const Problem p(dtype);
            const int64_t R = p.R, F = p.F, owned = p.offsets.back();
            HostTensor dh(dtype, {R, F}), want_dg(dtype, {R, 2 * F}), want_h(dtype, {R, F});
            grouped_gemm_dgrad(p.dc.ref(), p.w2.ref(), p.off.ref(), dh.ref(), nullptr, 0);
            activation_backward(act, p.g.ref(), dh.ref(), want_dg.ref());
            activation(act, p.g.ref(), want_h.ref());
            HostTensor dg(dtype, {R, 2 * F}), h(dtype, {R, F});
            run_fused(act, p, p.g, dg, h);
            int64_t nonzero = 0;
            for (int64_t r = 0; r < R; ++r) {
                for (int64_t c = 0; c < 2 * F; ++c) {
                    const int64_t i = r * 2 * F + c;
                    if (r >= owned) {
                        ASSERT_EQ(dg.get(i), 0.0f) << "dg, unowned row " << r;
                        continue;
                    }
                    ASSERT_EQ(float_bits(dg.get(i)), float_bits(want_dg.get(i))) << "dg r=" << r << " c=" << c;
                    nonzero += dg.get(i) != 0.0f;
                }
                for (int64_t f = 0; f < F; ++f) {
                    const int64_t i = r * F + f;
                    if (r >= owned)
                        ASSERT_EQ(h.get(i), 0.0f) << "h, unowned row " << r;
                    else
                        ASSERT_EQ(float_bits(h.get(i)), float_bits(want_h.get(i))) << "h r=" << r << " f=" << f;
                }
            }
            EXPECT_GT(nonzero, owned * F) << "the comparison must not be between zeros";
        }
    }
}

TEST(DgradActivation, InterleavedLayoutIsThePlainOnePermuted) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
        SCOPED_TRACE(to_string(dtype));
        const Problem p(dtype);
        const int64_t R = p.R, F = p.F;
        // g's columns permuted as interleave_gate_up permutes the rows of a [R, 2F, 1] tensor.
        HostTensor g3(dtype, {R, 2 * F, 1}), gi(dtype, {R, 2 * F, 1});
        for (int64_t i = 0; i < g3.numel(); ++i) g3.set(i, p.g.get(i));
        interleave_gate_up(g3.ref(), gi.ref());
        const HostTensor gi2 = HostTensor::from_floats(gi.to_floats(), dtype, {R, 2 * F});
        HostTensor dg(dtype, {R, 2 * F}), h(dtype, {R, F}), dgi(dtype, {R, 2 * F}), hi(dtype, {R, F});
        run_fused(Activation::kSwiGLU, p, p.g, dg, h);
        run_fused(Activation::kSwiGLU, p, gi2, dgi, hi, /*interleaved=*/true);
        HostTensor dg3(dtype, {R, 2 * F, 1}), want(dtype, {R, 2 * F, 1});
        for (int64_t i = 0; i < dg.numel(); ++i) dg3.set(i, dg.get(i));
        interleave_gate_up(dg3.ref(), want.ref());
        for (int64_t i = 0; i < dgi.numel(); ++i) ASSERT_EQ(float_bits(dgi.get(i)), float_bits(want.get(i))) << i;
        for (int64_t i = 0; i < h.numel(); ++i) ASSERT_EQ(float_bits(hi.get(i)), float_bits(h.get(i))) << i;
    }
}

// dg against a central difference of L(g) = sum over owned rows r of dc[r] . (act(g[r]) w2[e(r)]^T) in fp64: the
// stage's dg is dL/dg (fp64 tensors: the specification's arithmetic without rounding).
TEST(DgradActivation, IsTheDerivativeOfTheLayer) {
    const Problem p(DType::kF64);
    const int64_t R = p.R, F = p.F, H = p.H, owned = p.offsets.back();
    HostTensor dg(DType::kF64, {R, 2 * F}), h(DType::kF64, {R, F});
    run_fused(Activation::kSwiGLU, p, p.g, dg, h);
    const double* w2 = p.w2.ptr<double>();
    const double* dc = p.dc.ptr<double>();
    auto loss = [&](const std::vector<double>& g) {
        double sum = 0.0;
        for (int64_t e = 0; e < p.E; ++e) {
            for (int64_t r = p.offsets[e]; r < p.offsets[e + 1]; ++r) {
                for (int64_t j = 0; j < H; ++j) {
                    double out = 0.0;
                    for (int64_t f = 0; f < F; ++f) {
                        const double a = g[r * 2 * F + f], u = g[r * 2 * F + F + f];
                        out += a / (1.0 + std::exp(-a)) * u * w2[(e * H + j) * F + f];
                    }
                    sum += dc[r * H + j] * out;
                }
            }
        }
        return sum;
    };
    std::vector<double> gp(p.g.ptr<double>(), p.g.ptr<double>() + R * 2 * F);
    const double eps = 1e-5;
    for (int64_t r : {int64_t{0}, int64_t{7}, owned - 1}) {
        for (int64_t c : {int64_t{0}, F - 1, F, 2 * F - 1}) {
            const int64_t i = r * 2 * F + c;
            const double v = gp[i];
            gp[i] = v + eps;
            const double up = loss(gp);
            gp[i] = v - eps;
            const double down = loss(gp);
            gp[i] = v;
            const double want = (up - down) / (2 * eps);
            EXPECT_NEAR(dg.ptr<double>()[i], want, 1e-7 * (1.0 + std::fabs(want))) << "r=" << r << " c=" << c;
        }
    }
}

TEST(DgradActivation, RefusesWhatItCannotCompute) {
    const Problem p(DType::kF32);
    const int64_t R = p.R, F = p.F;
    HostTensor dg(DType::kF32, {R, 2 * F}), h(DType::kF32, {R, F}), h_wide(DType::kF32, {R, F + 8});
    HostTensor g_bf(DType::kBF16, {R, 2 * F}), g12(DType::kF32, {R, 24});
    auto call = [&](Activation act, const TensorRef& g, const TensorRef& dgr, const TensorRef& hr, bool il = false) {
        grouped_gemm_dgrad_activation(act, p.dc.ref(), p.w2.ref(), p.off.ref(), g, dgr, hr, nullptr, 0, nullptr, il);
    };
    expect_error([&] { call(Activation::kGELU, p.g.ref(), dg.ref(), h.ref()); }, {"gated"});
    expect_error([&] { call(Activation::kSwiGLU, p.g.ref(), dg.ref(), h_wide.ref()); }, {"h"});
    expect_error([&] { call(Activation::kSwiGLU, g_bf.ref(), dg.ref(), h.ref()); }, {"g"});
    expect_error([&] { call(Activation::kSwiGLU, g12.ref(), dg.ref(), h.ref()); }, {"g"});
    expect_error([&] { call(Activation::kSwiGLU, p.g.ref(), p.g.ref(), h.ref()); }, {"distinct"});
    // F = 12: the interleaved layout needs F % 8 == 0.
    const HostTensor w2_12 = HostTensor::from_floats(random_uniform(p.E * p.H * 12, 44), DType::kF32, {p.E, p.H, 12});
    HostTensor h12(DType::kF32, {R, 12}), dg12(DType::kF32, {R, 24});
    expect_error([&] {
        grouped_gemm_dgrad_activation(Activation::kSwiGLU, p.dc.ref(), w2_12.ref(), p.off.ref(), g12.ref(),
                                      dg12.ref(), h12.ref(), nullptr, 0, nullptr, /*gate_up_interleaved=*/true);
    }, {"F % 8"});
}

}  // namespace
}  // namespace switchyard
