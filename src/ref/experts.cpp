// src/ref/experts.cpp: one expert MLP of the CPU backend (routed or shared).
//
//   g   [rows, R13] = round_dtype(float(in [rows, H] . w13 [R13, H]^T))   double (gemm_nt), R13 = 2F gated, F otherwise
//   h   [rows, F]   = round_dtype(float(act(gate, up)))    gated: gate = g[:, f], up = g[:, F + f]
//                                                         ungated: up = g[:, f]
//   out [rows, H]   = round_dtype(float(h . w2 [H, F]^T))  double (gemm_nt)
// GEMM1's outputs are stored in the layer dtype (as a grouped GEMM writing bf16 does, and as PyTorch's
// grouped_mm path does); act is evaluated in double on those stored values. "round_dtype(float(v))" means v is
// first rounded to fp32 (nearest even) and then to the layer dtype with switchyard::round_to, exactly as a GPU
// kernel that holds the value in fp32 and stores it in the layer dtype.
#include <cmath>
#include <vector>

#include "ref/ref.h"
#include "switchyard/error.h"

namespace switchyard {
namespace ref {

double silu(double v) { return v / (1.0 + std::exp(-v)); }

double gelu_tanh(double v) {
    constexpr double kSqrt2OverPi = 0.79788456080286535587989211986876;  // sqrt(2 / pi)
    return 0.5 * v * (1.0 + std::tanh(kSqrt2OverPi * (v + 0.044715 * v * v * v)));
}

double apply_activation(Activation a, double gate, double up) {
    switch (a) {
        case Activation::kSwiGLU:
            return silu(gate) * up;
        case Activation::kGeGLU:
            return gelu_tanh(gate) * up;
        case Activation::kGELU:
            return gelu_tanh(up);
        case Activation::kReLU:
            return up < 0.0 ? 0.0 : up;  // NaN stays NaN
    }
    SWITCHYARD_FAIL("apply_activation: unknown activation ", static_cast<int>(a));
}

void expert_mlp(Activation act, DType dtype, const float* in, int64_t rows, int64_t hidden, int64_t ffn,
                const MatView& w13, const MatView& w2, float* out) {
    const bool gated = is_gated(act);
    const int64_t r13 = gated ? 2 * ffn : ffn;
    SWITCHYARD_CHECK(w13.rows == r13 && w13.cols == hidden, "expert_mlp: w13 is [", w13.rows, ", ", w13.cols,
                     "], expected [", r13, ", ", hidden, "]");
    SWITCHYARD_CHECK(w2.rows == hidden && w2.cols == ffn, "expert_mlp: w2 is [", w2.rows, ", ", w2.cols,
                     "], expected [", hidden, ", ", ffn, "]");
    if (rows == 0) return;
    std::vector<double> g(static_cast<size_t>(rows * r13));
    gemm_nt(in, rows, hidden, w13, g.data());
    std::vector<float> h(static_cast<size_t>(rows * ffn));
#pragma omp parallel for schedule(static) if (rows * ffn >= (1 << 16))
    for (int64_t r = 0; r < rows; ++r) {
        const double* gr = g.data() + r * r13;
        auto stored = [&](int64_t n) { return static_cast<double>(round_to(dtype, static_cast<float>(gr[n]))); };
        for (int64_t f = 0; f < ffn; ++f) {
            const double v =
                gated ? apply_activation(act, stored(f), stored(ffn + f)) : apply_activation(act, 0.0, stored(f));
            h[r * ffn + f] = round_to(dtype, static_cast<float>(v));
        }
    }
    std::vector<double> o(static_cast<size_t>(rows * hidden));
    gemm_nt(h.data(), rows, ffn, w2, o.data());
#pragma omp parallel for schedule(static) if (rows * hidden >= (1 << 16))
    for (int64_t i = 0; i < rows * hidden; ++i) out[i] = round_to(dtype, static_cast<float>(o[i]));
}

void expert_mlp(Activation act, DType dtype, const float* in, int64_t rows, int64_t hidden, int64_t ffn,
                const float* w13, const float* w2, float* out) {
    const int64_t r13 = is_gated(act) ? 2 * ffn : ffn;
    expert_mlp(act, dtype, in, rows, hidden, ffn, MatView{w13, DType::kF32, r13, hidden},
               MatView{w2, DType::kF32, hidden, ffn}, out);
}

}  // namespace ref
}  // namespace switchyard
