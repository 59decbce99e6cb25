// tests/test_fp8.cpp: fp8 e4m3 conversions and the CPU specification of FP8 experts (issue 13).
//
// The layer's CPU forward is checked against an implementation written here from the recipe's text (stages.h,
// grouped_gemm_fp8): its own e4m3 table and encoder (nearest of the finite values, ties to the even code,
// saturation), plain loops in double over dequantised weights and quantised-then-dequantised activations. The
// routing (ids, weights, slot_row) is taken from the layer's outputs: the router is not part of the FP8 recipe.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "switchyard/config.h"
#include "switchyard/dtype.h"
#include "switchyard/moe_layer.h"
#include "switchyard/stages.h"
#include "test_util.h"

namespace switchyard {
namespace {

using test::HostTensor;

// ---- an independent e4m3fn -------------------------------------------------------------------------------------
// Value of code c from the format definition: sign, 4-bit exponent (bias 7), 3-bit mantissa, S.1111.111 = NaN.
double e4m3_value(int c) {
    const int s = (c >> 7) & 1, e = (c >> 3) & 15, m = c & 7;
    if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
    const double mag = e == 0 ? std::ldexp(m, -9) : std::ldexp(8 + m, e - 10);  // (1 + m/8) 2^(e-7)
    return s ? -mag : mag;
}

// Nearest finite code (ties to the even code), saturating at 448; NaN -> 0x7f. A search over the 127 values.
int e4m3_encode(double v) {
    static const std::vector<double> table = [] {
        std::vector<double> t(0x7f);
        for (int c = 0; c < 0x7f; ++c) t[c] = e4m3_value(c);
        return t;
    }();
    if (std::isnan(v)) return 0x7f;
    const int sign = std::signbit(v) ? 0x80 : 0;
    const double a = std::min(std::fabs(v), 448.0);
    int best = 0;
    double best_d = std::fabs(a - table[0]);
    for (int c = 1; c <= 0x7e; ++c) {
        const double d = std::fabs(a - table[c]);
        if (d < best_d || (d == best_d && (c & 1) == 0 && (best & 1) == 1)) {
            best = c;
            best_d = d;
        }
    }
    return sign | best;
}

TEST(Fp8, DecodeEveryCode) {
    for (int c = 0; c < 256; ++c) {
        const float got = fp8_e4m3_to_float(static_cast<uint8_t>(c));
        const double want = e4m3_value(c);
        if (std::isnan(want)) {
            EXPECT_TRUE(std::isnan(got)) << "code " << c;
            continue;
        }
        EXPECT_EQ(static_cast<double>(got), want) << "code " << c;
        EXPECT_EQ(std::signbit(got), (c & 0x80) != 0) << "code " << c;
    }
    EXPECT_EQ(fp8_e4m3_to_float(0x7e), 448.0f);
    EXPECT_EQ(fp8_e4m3_to_float(0x01), std::ldexp(1.0f, -9));
    EXPECT_EQ(fp8_e4m3_to_float(0x08), std::ldexp(1.0f, -6));
    EXPECT_TRUE(std::isnan(fp8_e4m3_to_float(0xff)));
}

TEST(Fp8, EncodeRoundTripsEveryCode) {
    for (int c = 0; c < 256; ++c) {
        if ((c & 0x7f) == 0x7f) continue;
        EXPECT_EQ(float_to_fp8_e4m3(fp8_e4m3_to_float(static_cast<uint8_t>(c))), c) << "code " << c;
    }
}

TEST(Fp8, EncodeTiesToEvenAndNeighbours) {
    for (int c = 0; c < 0x7e; ++c) {
        for (int sign : {0, 0x80}) {
            const double lo = e4m3_value(c), hi = e4m3_value(c + 1);
            const float mid = static_cast<float>((lo + hi) / 2);  // exact in float
            ASSERT_EQ(static_cast<double>(mid), (lo + hi) / 2);
            const float s = sign ? -1.0f : 1.0f;
            const int even = (c & 1) == 0 ? c : c + 1;
            EXPECT_EQ(float_to_fp8_e4m3(s * mid), sign | even) << "midpoint of " << c << " and " << c + 1;
            EXPECT_EQ(float_to_fp8_e4m3(s * std::nextafter(mid, 0.0f)), sign | c) << "below midpoint " << c;
            EXPECT_EQ(float_to_fp8_e4m3(s * std::nextafter(mid, 1000.0f)), sign | (c + 1)) << "above midpoint " << c;
            EXPECT_EQ(float_to_fp8_e4m3(s * mid), e4m3_encode(s * mid));
        }
    }
    // Random values against the brute-force encoder.
    const std::vector<float> v = test::random_uniform(20000, 7, -500.0f, 500.0f);
    for (float x : v) {
        const float y = x * std::ldexp(1.0f, static_cast<int>(std::fabs(x)) % 24 - 16);
        EXPECT_EQ(float_to_fp8_e4m3(y), e4m3_encode(y)) << y;
    }
}

TEST(Fp8, EncodeSaturatesAndKeepsNaN) {
    const float inf = std::numeric_limits<float>::infinity();
    for (float v : {448.0f, 449.0f, 464.0f, 480.0f, 1e6f, 3e38f, inf}) {
        EXPECT_EQ(float_to_fp8_e4m3(v), 0x7e) << v;
        EXPECT_EQ(float_to_fp8_e4m3(-v), 0xfe) << -v;
    }
    EXPECT_EQ(float_to_fp8_e4m3(432.0f), 0x7e);      // tie between 416 (odd) and 448 (even)
    EXPECT_EQ(float_to_fp8_e4m3(431.99997f), 0x7d);  // below it: 416
    EXPECT_EQ(float_to_fp8_e4m3(std::nanf("")) & 0x7f, 0x7f);
    EXPECT_EQ(float_to_fp8_e4m3(-std::nanf("")), 0xff);
    EXPECT_EQ(float_to_fp8_e4m3(std::ldexp(1.0f, -10)), 0x00);  // half the smallest subnormal: tie to 0
    EXPECT_EQ(float_to_fp8_e4m3(std::ldexp(3.0f, -10)), 0x02);  // 1.5 units: tie to 2
    EXPECT_EQ(float_to_fp8_e4m3(std::ldexp(3.0f, -11)), 0x01);  // 0.75 units: 1
    EXPECT_EQ(float_to_fp8_e4m3(1e-30f), 0x00);
    EXPECT_EQ(float_to_fp8_e4m3(-0.0f), 0x80);
}

TEST(Fp8, DTypeNames) {
    EXPECT_EQ(dtype_size(DType::kF8E4M3), 1u);
    EXPECT_STREQ(to_string(DType::kF8E4M3), "fp8e4m3");
    for (const char* s : {"fp8", "fp8e4m3", "f8_e4m3", "F8_E4M3"}) EXPECT_EQ(parse_dtype(s), DType::kF8E4M3) << s;
    EXPECT_EQ(to_string(DType::kF8E4M3), std::string(to_string(parse_dtype(to_string(DType::kF8E4M3)))));
}

// ---- layers ------------------------------------------------------------------------------------------------------

TEST(Fp8Config, QuantMode) {
    EXPECT_EQ(parse_quant_mode("fp8-block"), QuantMode::kFP8Block);
    EXPECT_EQ(parse_quant_mode("fp8-tensor"), QuantMode::kFP8Tensor);
    EXPECT_EQ(parse_quant_mode("none"), QuantMode::kNone);
    EXPECT_STREQ(to_string(QuantMode::kFP8Block), "fp8-block");
    EXPECT_STREQ(to_string(QuantMode::kFP8Tensor), "fp8-tensor");
    test::expect_error([] { parse_quant_mode("int4"); }, {"quant_mode", "int4"});
    MoEConfig c = test::tiny_config();
    EXPECT_EQ(c.quant_mode, QuantMode::kNone);
    c.quant_mode = QuantMode::kFP8Block;
    EXPECT_NE(c.to_string().find("quant=fp8-block"), std::string::npos) << c.to_string();
    c.quant_mode = static_cast<QuantMode>(7);
    test::expect_error([&] { c.validate(); }, {"quant_mode=7"});
}

int64_t blocks(int64_t n) { return (n + 127) / 128; }

// An fp8 matrix stack [G, N, K] with its scales (block: [G, B(N), B(K)], tensor: [G]); the dequantised value is
// code value * scale, about 0.1 in magnitude.
struct Fp8Matrix {
    HostTensor codes, scale;
    std::vector<double> deq;  // [G, N, K]
};

Fp8Matrix make_fp8(QuantMode mode, int64_t g, int64_t n, int64_t k, uint64_t seed, bool shared) {
    Fp8Matrix m;
    std::vector<int64_t> cshape = shared ? std::vector<int64_t>{n, k} : std::vector<int64_t>{g, n, k};
    m.codes = HostTensor(DType::kF8E4M3, cshape);
    const bool block = mode == QuantMode::kFP8Block;
    std::vector<int64_t> sshape = block ? (shared ? std::vector<int64_t>{blocks(n), blocks(k)}
                                                  : std::vector<int64_t>{g, blocks(n), blocks(k)})
                                        : std::vector<int64_t>{g};
    const int64_t ns = block ? g * blocks(n) * blocks(k) : g;
    m.scale = HostTensor::from_floats(test::random_uniform(static_cast<size_t>(ns), seed + 1, 2e-4f, 6e-4f),
                                      DType::kF32, sshape);
    const std::vector<float> v = test::random_uniform(static_cast<size_t>(g * n * k), seed, -448.0f, 448.0f);
    m.deq.resize(v.size());
    for (int64_t e = 0; e < g; ++e)
        for (int64_t r = 0; r < n; ++r)
            for (int64_t c = 0; c < k; ++c) {
                const int64_t i = (e * n + r) * k + c;
                const int code = e4m3_encode(v[i]);
                m.codes.ptr<uint8_t>()[i] = static_cast<uint8_t>(code);
                const float s = block ? m.scale.get((e * blocks(n) + r / 128) * blocks(k) + c / 128) : m.scale.get(e);
                m.deq[i] = e4m3_value(code) * static_cast<double>(s);
            }
    return m;
}

// When set, activations are not quantised (weight-only FP8): the test's check that its tolerance can see the
// activation recipe at all.
bool g_skip_activation_quant = false;

// The recipe's activation quantisation of one row, read back in double.
std::vector<double> quant_row(const std::vector<float>& x, QuantMode mode, const float* static_scale) {
    const size_t k = x.size(), group = mode == QuantMode::kFP8Block ? 128 : k;
    if (g_skip_activation_quant) return std::vector<double>(x.begin(), x.end());
    std::vector<double> out(k, 0.0);
    for (size_t g0 = 0; g0 < k; g0 += group) {
        const size_t g1 = std::min(k, g0 + group);
        float amax = 0.0f;
        for (size_t i = g0; i < g1; ++i) amax = std::max(amax, std::fabs(x[i]));
        const float s = static_scale ? *static_scale : amax / 448.0f;
        if (s == 0.0f) continue;
        for (size_t i = g0; i < g1; ++i) out[i] = e4m3_value(e4m3_encode(x[i] / s)) * static_cast<double>(s);
    }
    return out;
}

double act_value(Activation a, double g, double u) {
    switch (a) {
        case Activation::kSwiGLU: return g / (1.0 + std::exp(-g)) * u;
        case Activation::kReLU: return u > 0 ? u : 0.0;
        default: ADD_FAILURE() << "activation not covered here"; return 0.0;
    }
}

// One FP8 expert (matrices index e of w13 / w2) on one row x, each stored value rounded to dtype as the layer does.
std::vector<float> ref_expert(const MoEConfig& cfg, const std::vector<float>& x, const Fp8Matrix& w13,
                              const Fp8Matrix& w2, int64_t e, int64_t width, const float* in13, const float* in2) {
    const int64_t H = cfg.hidden_size, R13 = is_gated(cfg.activation) ? 2 * width : width;
    const std::vector<double> a = quant_row(x, cfg.quant_mode, in13);
    std::vector<float> g(static_cast<size_t>(R13));
    for (int64_t n = 0; n < R13; ++n) {
        double acc = 0;
        for (int64_t k = 0; k < H; ++k) acc += a[k] * w13.deq[(e * R13 + n) * H + k];
        g[n] = round_to(cfg.dtype, static_cast<float>(acc));
    }
    std::vector<float> h(static_cast<size_t>(width));
    for (int64_t f = 0; f < width; ++f)
        h[f] = is_gated(cfg.activation) ? round_to(cfg.dtype, static_cast<float>(act_value(cfg.activation, g[f], g[width + f])))
                                        : round_to(cfg.dtype, static_cast<float>(act_value(cfg.activation, 0, g[f])));
    const std::vector<double> hq = quant_row(h, cfg.quant_mode, in2);
    std::vector<float> out(static_cast<size_t>(H));
    for (int64_t n = 0; n < H; ++n) {
        double acc = 0;
        for (int64_t k = 0; k < width; ++k) acc += hq[k] * w2.deq[(e * H + n) * width + k];
        out[n] = round_to(cfg.dtype, static_cast<float>(acc));
    }
    return out;
}

struct Fp8Case {
    const char* name;
    QuantMode mode;
    DType dtype;
    void (*tweak)(MoEConfig&);
    bool static_input = false;
    bool shared = true;
};

// Returns the rel L2 error of the layer against the reference (of the weight-only variant when g_skip_activation_quant).
double run_case(const Fp8Case& k) {
    SCOPED_TRACE(k.name);
    MoEConfig cfg;
    cfg.hidden_size = 200;  // partial blocks: 200 = 128 + 72, F = 136 = 128 + 8, 2F = 272
    cfg.ffn_size = 136;
    cfg.num_experts = 8;
    cfg.top_k = 2;
    cfg.dtype = k.dtype;
    cfg.quant_mode = k.mode;
    if (k.shared) {
        cfg.num_shared_experts = 1;
        cfg.shared_ffn_size = 72;
    }
    k.tweak(cfg);
    const int64_t T = 37, H = cfg.hidden_size, E = cfg.num_experts, F = cfg.ffn_size, S = cfg.shared_width();
    const int64_t R13 = cfg.w13_rows(), SR13 = is_gated(cfg.activation) ? 2 * S : S;
    HostTensor gate = HostTensor::from_floats(test::random_uniform(E * H, 11, -0.2f, 0.2f), DType::kF32, {E, H});
    HostTensor bias = HostTensor::from_floats(test::random_uniform(E, 12, -0.1f, 0.1f), DType::kF32, {E});
    Fp8Matrix w13 = make_fp8(k.mode, E, R13, H, 21, false), w2 = make_fp8(k.mode, E, H, F, 31, false);
    Fp8Matrix s13, s2;
    MoEWeights w;
    w.gate = gate.ref();
    if (cfg.use_score_bias) w.score_bias = bias.ref();
    w.w13 = w13.codes.ref();
    w.w13_scale = w13.scale.ref();
    w.w2 = w2.codes.ref();
    w.w2_scale = w2.scale.ref();
    if (S > 0) {
        s13 = make_fp8(k.mode, 1, SR13, H, 41, true);
        s2 = make_fp8(k.mode, 1, H, S, 51, true);
        w.shared_w13 = s13.codes.ref();
        w.shared_w13_scale = s13.scale.ref();
        w.shared_w2 = s2.codes.ref();
        w.shared_w2_scale = s2.scale.ref();
    }
    // Static input scales: 0.8 / 448 saturates |x| > 0.8 (x is in [-1, 1)); h is mostly below 0.5.
    HostTensor in13 = HostTensor::from_floats(std::vector<float>(E, 0.8f / 448), DType::kF32, {E});
    HostTensor in2 = HostTensor::from_floats(std::vector<float>(E, 0.5f / 448), DType::kF32, {E});
    HostTensor sin13 = HostTensor::from_floats({0.9f / 448}, DType::kF32, {1});
    HostTensor sin2 = HostTensor::from_floats({0.4f / 448}, DType::kF32, {1});
    HostTensor sgate = HostTensor::from_floats(test::random_uniform(H, 71, -0.1f, 0.1f), DType::kF32, {1, H});
    if (cfg.shared_expert_gate) w.shared_gate = sgate.ref();
    if (k.static_input) {
        w.w13_input_scale = in13.ref();
        w.w2_input_scale = in2.ref();
        if (S > 0) {
            w.shared_w13_input_scale = sin13.ref();
            w.shared_w2_input_scale = sin2.ref();
        }
    }
    std::vector<float> xv = test::rounded(test::random_uniform(T * H, 61), cfg.dtype);
    for (int64_t c = 0; c < H; ++c) xv[5 * H + c] = 0.0f;     // an all-zero token: scale 0, q = 0
    for (int64_t c = 128; c < H; ++c) xv[6 * H + c] = 0.0f;   // an all-zero partial group
    HostTensor x = HostTensor::from_floats(xv, cfg.dtype, {T, H}), y(cfg.dtype, {T, H});
    const int64_t slots = cfg.route_slots();
    HostTensor ids(DType::kI32, {T, slots}), wts(DType::kF32, {T, slots}), sr(DType::kI32, {T, slots});
    ForwardOutputs out;
    out.topk_ids = ids.ref();
    out.topk_weights = wts.ref();
    out.slot_row = sr.ref();
    MoELayer layer(cfg, w);
    layer.forward(x.ref(), y.ref(), &out);

    double num = 0, den = 0;
    int64_t pairs = 0;
    for (int64_t t = 0; t < T; ++t) {
        const std::vector<float> xt(xv.begin() + t * H, xv.begin() + (t + 1) * H);
        std::vector<double> acc(static_cast<size_t>(H), 0.0);
        for (int64_t j = 0; j < slots; ++j) {
            if (sr.ptr<int32_t>()[t * slots + j] < 0) continue;
            const int64_t e = ids.ptr<int32_t>()[t * slots + j];
            ++pairs;
            const std::vector<float> o = ref_expert(cfg, xt, w13, w2, e, F, k.static_input ? &in13.ptr<float>()[e] : nullptr,
                                                    k.static_input ? &in2.ptr<float>()[e] : nullptr);
            const double wt = wts.ptr<float>()[t * slots + j];
            for (int64_t c = 0; c < H; ++c) acc[c] += wt * o[c];
        }
        if (S > 0) {
            const std::vector<float> o = ref_expert(cfg, xt, s13, s2, 0, S, k.static_input ? sin13.ptr<float>() : nullptr,
                                                    k.static_input ? sin2.ptr<float>() : nullptr);
            double st = 1.0;  // gated shared expert: sigmoid of the fp32 gate logit x . g
            if (cfg.shared_expert_gate) {
                double logit = 0;
                for (int64_t c = 0; c < H; ++c) logit += static_cast<double>(xt[c]) * sgate.get(c);
                st = 1.0 / (1.0 + std::exp(-static_cast<double>(static_cast<float>(logit))));
            }
            for (int64_t c = 0; c < H; ++c) acc[c] += st * o[c];
        }
        for (int64_t c = 0; c < H; ++c) {
            const double want = round_to(cfg.dtype, static_cast<float>(acc[c]));
            const double got = y.get(t * H + c);
            num += (got - want) * (got - want);
            den += want * want;
        }
    }
    EXPECT_GT(den, 0.0);
    EXPECT_GT(pairs, 0);
    const double rel = std::sqrt(num / std::max(den, 1e-300));
    std::printf("[fp8] %-32s rel L2 = %.3e (%lld expert rows)%s\n", k.name, rel, static_cast<long long>(pairs),
                g_skip_activation_quant ? " [reference without activation quantisation]" : "");
    return rel;
}

void no_tweak(MoEConfig&) {}

TEST(Fp8Layer, CpuForwardMatchesIndependentRecipe) {
    const Fp8Case cases[] = {
        {"block softmax fp32", QuantMode::kFP8Block, DType::kF32, no_tweak},
        {"block topk-softmax bf16", QuantMode::kFP8Block, DType::kBF16,
         [](MoEConfig& c) {
             c.score_function = ScoreFunction::kTopkSoftmax;
             c.renormalize = true;
         }},
        {"block sigmoid groups bias fp16", QuantMode::kFP8Block, DType::kF16,
         [](MoEConfig& c) {
             c.score_function = ScoreFunction::kSigmoid;
             c.num_groups = 4;
             c.topk_groups = 2;
             c.use_score_bias = true;
             c.renormalize = true;
             c.routed_scale = 2.5;
         }},
        {"block capacity position relu", QuantMode::kFP8Block, DType::kF32,
         [](MoEConfig& c) {
             c.capacity_factor = 0.5;
             c.activation = Activation::kReLU;
         }},
        {"block capacity probability", QuantMode::kFP8Block, DType::kBF16,
         [](MoEConfig& c) {
             c.capacity_factor = 0.6;
             c.drop_policy = DropPolicy::kProbability;
         }},
        {"block expert choice", QuantMode::kFP8Block, DType::kF32,
         [](MoEConfig& c) { c.routing_mode = RoutingMode::kExpertChoice; }},
        {"tensor softmax fp32", QuantMode::kFP8Tensor, DType::kF32, no_tweak},
        {"tensor sigmoid groups bias bf16", QuantMode::kFP8Tensor, DType::kBF16,
         [](MoEConfig& c) {
             c.score_function = ScoreFunction::kSigmoid;
             c.num_groups = 2;
             c.topk_groups = 1;
             c.use_score_bias = true;
         }},
        {"tensor expert choice sigmoid", QuantMode::kFP8Tensor, DType::kF32,
         [](MoEConfig& c) {
             c.routing_mode = RoutingMode::kExpertChoice;
             c.score_function = ScoreFunction::kSigmoid;
             c.capacity_factor = 1.5;
         }},
        {"tensor static input scale", QuantMode::kFP8Tensor, DType::kF32, no_tweak, true},
        {"tensor static input capacity", QuantMode::kFP8Tensor, DType::kBF16,
         [](MoEConfig& c) { c.capacity_factor = 0.5; }, true},
        {"block gated shared expert bf16", QuantMode::kFP8Block, DType::kBF16,
         [](MoEConfig& c) { c.shared_expert_gate = true; }},
        {"block no shared", QuantMode::kFP8Block, DType::kF32, no_tweak, false, false},
    };
    double worst = 0;
    for (const Fp8Case& k : cases) {
        const double rel = run_case(k);
        EXPECT_LT(rel, 1e-2) << k.name;
        worst = std::max(worst, rel);
    }
    std::printf("[fp8] worst rel L2 over %zu cases = %.3e\n", sizeof(cases) / sizeof(cases[0]), worst);
    // The comparison sees the activation recipe: a reference that skips it (weight-only FP8) is visibly off.
    g_skip_activation_quant = true;
    for (const Fp8Case& k : {cases[0], cases[9]}) EXPECT_GT(run_case(k), 1e-3) << k.name;
    g_skip_activation_quant = false;
}

// ---- validation ----------------------------------------------------------------------------------------------------

TEST(Fp8Layer, Validation) {
    MoEConfig cfg;
    cfg.hidden_size = 200;
    cfg.ffn_size = 136;
    cfg.num_experts = 4;
    cfg.top_k = 2;
    cfg.num_shared_experts = 1;
    cfg.shared_ffn_size = 64;
    cfg.quant_mode = QuantMode::kFP8Block;
    const int64_t E = 4, H = 200, F = 136;
    HostTensor gate = HostTensor::from_floats(test::random_uniform(E * H, 1), DType::kF32, {E, H});
    Fp8Matrix w13 = make_fp8(cfg.quant_mode, E, 2 * F, H, 2, false), w2 = make_fp8(cfg.quant_mode, E, H, F, 3, false);
    Fp8Matrix s13 = make_fp8(cfg.quant_mode, 1, 128, H, 4, true), s2 = make_fp8(cfg.quant_mode, 1, H, 64, 5, true);
    MoEWeights good;
    good.gate = gate.ref();
    good.w13 = w13.codes.ref();
    good.w13_scale = w13.scale.ref();
    good.w2 = w2.codes.ref();
    good.w2_scale = w2.scale.ref();
    good.shared_w13 = s13.codes.ref();
    good.shared_w13_scale = s13.scale.ref();
    good.shared_w2 = s2.codes.ref();
    good.shared_w2_scale = s2.scale.ref();
    EXPECT_NO_THROW(MoELayer(cfg, good));

    HostTensor bad_shape(DType::kF32, {E, 2, 2});  // w2_scale must be [4, 2, 2]: B(200)=2, B(136)=2 -> ok; use [4,2,1]
    HostTensor w2_wrong(DType::kF32, {E, 2, 1});
    HostTensor nan_scale = HostTensor::from_floats(std::vector<float>(E * 3 * 2, 1e-3f), DType::kF32, {E, 3, 2});
    nan_scale.set(7, std::nanf(""));
    HostTensor nan_codes = w13.codes;
    nan_codes.ptr<uint8_t>()[1234] = 0xff;
    HostTensor in_scale = HostTensor::from_floats(std::vector<float>(E, 1.0f), DType::kF32, {E});
    HostTensor f32_w13 = HostTensor::from_floats(std::vector<float>(E * 2 * F * H, 0.0f), DType::kF32, {E, 2 * F, H});
    HostTensor shared_scale_wrong(DType::kF32, {2, 2});
    HostTensor scale_f16(DType::kF16, {E, 3, 2});

    struct Case {
        const char* name;
        std::function<void(MoEConfig&, MoEWeights&)> tweak;
        std::vector<std::string> parts;
    };
    const std::vector<Case> cases = {
        {"missing w13_scale", [](MoEConfig&, MoEWeights& w) { w.w13_scale = TensorRef(); },
         {"w13_scale is required", "fp8e4m3"}},
        {"missing shared_w2_scale", [](MoEConfig&, MoEWeights& w) { w.shared_w2_scale = TensorRef(); },
         {"shared_w2_scale is required"}},
        {"w2_scale shape", [&](MoEConfig&, MoEWeights& w) { w.w2_scale = w2_wrong.ref(); },
         {"w2_scale", "[4, 2, 1]", "[4, 2, 2]"}},
        {"shared_w13_scale shape", [&](MoEConfig&, MoEWeights& w) { w.shared_w13_scale = shared_scale_wrong.ref(); },
         {"shared_w13_scale", "[2, 2]", "[1, 2]"}},
        {"w13_scale dtype", [&](MoEConfig&, MoEWeights& w) { w.w13_scale = scale_f16.ref(); },
         {"w13_scale", "fp16", "fp32"}},
        {"NaN scale", [&](MoEConfig&, MoEWeights& w) { w.w13_scale = nan_scale.ref(); },
         {"w13_scale[7]", "not finite"}},
        {"NaN code", [&](MoEConfig&, MoEWeights& w) { w.w13 = nan_codes.ref(); },
         {"w13", "fp8 NaN code", "255", "element 1234"}},
        {"tensor-mode scale shape", [](MoEConfig& c, MoEWeights&) { c.quant_mode = QuantMode::kFP8Tensor; },
         {"w13_scale", "[4]"}},
        {"input scale in block mode", [&](MoEConfig&, MoEWeights& w) { w.w13_input_scale = in_scale.ref(); },
         {"w13_input_scale", "fp8-tensor"}},
        {"fp8 without quant mode", [](MoEConfig& c, MoEWeights&) { c.quant_mode = QuantMode::kNone; },
         {"w13", "fp8e4m3", "quant_mode"}},
        {"float w13 in fp8 mode", [&](MoEConfig&, MoEWeights& w) { w.w13 = f32_w13.ref(); },
         {"w13", "fp32", "expected fp8e4m3"}},
    };
    for (const Case& k : cases) {
        SCOPED_TRACE(k.name);
        MoEConfig c = cfg;
        MoEWeights w = good;
        k.tweak(c, w);
        test::expect_error([&] { MoELayer(c, w); }, k.parts);
    }
    // NaN / non-positive static input scale (tensor mode).
    MoEConfig ct = cfg;
    ct.quant_mode = QuantMode::kFP8Tensor;
    Fp8Matrix t13 = make_fp8(ct.quant_mode, E, 2 * F, H, 6, false), t2 = make_fp8(ct.quant_mode, E, H, F, 7, false);
    MoEWeights wt;
    wt.gate = gate.ref();
    wt.w13 = t13.codes.ref();
    wt.w13_scale = t13.scale.ref();
    wt.w2 = t2.codes.ref();
    wt.w2_scale = t2.scale.ref();
    ct.num_shared_experts = 0;
    ct.shared_ffn_size = 0;
    EXPECT_NO_THROW(MoELayer(ct, wt));
    HostTensor zero_in = HostTensor::from_floats(std::vector<float>(E, 0.0f), DType::kF32, {E});
    wt.w2_input_scale = zero_in.ref();
    test::expect_error([&] { MoELayer(ct, wt); }, {"w2_input_scale[0]", "finite and positive"});
}

TEST(Fp8Stage, ChecksArguments) {
    const int64_t R = 5, K = 130, N = 7;
    HostTensor a = HostTensor::from_floats(test::random_uniform(R * K, 1), DType::kF32, {R, K});
    HostTensor b(DType::kF8E4M3, {N, K}), c(DType::kF32, {R, N});
    HostTensor sb = HostTensor::from_floats({1e-3f, 1e-3f}, DType::kF32, {1, 2});
    HostTensor sb_wrong = HostTensor::from_floats({1e-3f}, DType::kF32, {1, 1});
    HostTensor b_f32(DType::kF32, {N, K});
    EXPECT_NO_THROW(grouped_gemm_fp8(a.ref(), b.ref(), sb.ref(), TensorRef(), TensorRef(), c.ref(), nullptr, 0));
    for (int64_t i = 0; i < R * N; ++i) EXPECT_EQ(c.get(i), 0.0f);  // all-zero weights
    test::expect_error(
        [&] { grouped_gemm_fp8(a.ref(), b.ref(), sb_wrong.ref(), TensorRef(), TensorRef(), c.ref(), nullptr, 0); },
        {"b_scale", "[1, 1]", "[1, 2]"});
    test::expect_error(
        [&] { grouped_gemm_fp8(a.ref(), b_f32.ref(), sb.ref(), TensorRef(), TensorRef(), c.ref(), nullptr, 0); },
        {"b", "fp32", "fp8e4m3"});
    Fp8GemmOptions none;
    none.mode = QuantMode::kNone;
    test::expect_error(
        [&] {
            grouped_gemm_fp8(a.ref(), b.ref(), sb.ref(), TensorRef(), TensorRef(), c.ref(), nullptr, 0, nullptr, none);
        },
        {"mode=none"});
}

}  // namespace
}  // namespace switchyard
