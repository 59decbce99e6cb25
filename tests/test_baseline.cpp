// tests/test_baseline.cpp: the dense GShard baseline on the CPU (src/baseline/dense_ref.cpp).
//
// Checks: dense == sparse (ref::moe_forward) over random configs, dropless and with capacity drops (same
// drops, same policy), to the bound dense.h derives from the two roundings the seed's combine adds:
//   |dense - sparse| <= (2u + u^2) * sum_j |w_j o_j| + u (1 + u) (|dense| + |sparse|)  (+ fp16 subnormal steps)
// with the expert outputs o computed independently through ref::expert_mlp; the memory formula against a hand
// count; the limit path (ran=false, y untouched, nothing past the router allocated); statistics; validation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <sstream>
#include <vector>

#include "switchyard/baseline.h"
#include "test_util.h"
#include "ref/ref.h"
#include "switchyard/switchyard.h"

namespace switchyard {
namespace {

// A host tensor that owns its bytes.
struct HostTensor {
    std::vector<uint8_t> bytes;
    TensorRef ref;
    HostTensor() = default;
    HostTensor(DType t, std::initializer_list<int64_t> dims) {
        int64_t n = 1;
        for (int64_t d : dims) n *= d;
        bytes.assign(static_cast<size_t>(std::max<int64_t>(n, 1)) * dtype_size(t), 0);
        ref = TensorRef(bytes.data(), t, dims);
    }
    int64_t numel() const { return ref.numel(); }
    float get(int64_t i) const { return ref::load_as_float(bytes.data(), ref.dtype, i); }
    void set(int64_t i, float v) { ref::store_from_float(bytes.data(), ref.dtype, i, v); }
};

void fill_uniform(HostTensor& t, std::mt19937& rng, float scale) {
    std::uniform_real_distribution<float> u(-scale, scale);
    for (int64_t i = 0; i < t.numel(); ++i) t.set(i, u(rng));
}

struct Layer {
    MoEConfig cfg;
    HostTensor gate, bias, w13, w2, sw13, sw2;
    MoEWeights w;
};

// Random weights (scaled so that every stage stays O(1)) in wdtype.
void make_weights(Layer& L, DType wdtype, std::mt19937& rng) {
    const MoEConfig& c = L.cfg;
    const int64_t E = c.num_experts, H = c.hidden_size, F = c.ffn_size, S = c.shared_width();
    L.gate = HostTensor(wdtype, {E, H});
    fill_uniform(L.gate, rng, 2.0f / std::sqrt(float(H)));
    L.w13 = HostTensor(wdtype, {E, c.w13_rows(), H});
    fill_uniform(L.w13, rng, 1.5f / std::sqrt(float(H)));
    L.w2 = HostTensor(wdtype, {E, H, F});
    fill_uniform(L.w2, rng, 1.5f / std::sqrt(float(F)));
    L.w = MoEWeights();
    L.w.gate = L.gate.ref;
    L.w.w13 = L.w13.ref;
    L.w.w2 = L.w2.ref;
    if (c.use_score_bias) {
        L.bias = HostTensor(DType::kF32, {E});
        fill_uniform(L.bias, rng, 0.5f);
        L.w.score_bias = L.bias.ref;
    }
    if (S > 0) {
        L.sw13 = HostTensor(wdtype, {is_gated(c.activation) ? 2 * S : S, H});
        fill_uniform(L.sw13, rng, 1.5f / std::sqrt(float(H)));
        L.sw2 = HostTensor(wdtype, {H, S});
        fill_uniform(L.sw2, rng, 1.5f / std::sqrt(float(S)));
        L.w.shared_w13 = L.sw13.ref;
        L.w.shared_w2 = L.sw2.ref;
    }
}

// A random valid config (dropless unless the caller sets a capacity).
MoEConfig random_config(std::mt19937& rng, DType dtype) {
    auto pick = [&](std::initializer_list<int64_t> v) {
        std::vector<int64_t> vv(v);
        return vv[std::uniform_int_distribution<size_t>(0, vv.size() - 1)(rng)];
    };
    MoEConfig c;
    c.dtype = dtype;
    c.hidden_size = pick({8, 19, 32, 48});
    c.ffn_size = pick({4, 11, 24});
    c.num_experts = pick({1, 3, 4, 8});
    c.top_k = std::uniform_int_distribution<int64_t>(1, std::min<int64_t>(c.num_experts, 3))(rng);
    c.activation = static_cast<Activation>(std::uniform_int_distribution<int>(0, 3)(rng));
    c.score_function = static_cast<ScoreFunction>(std::uniform_int_distribution<int>(0, 2)(rng));
    c.renormalize = std::uniform_int_distribution<int>(0, 1)(rng) == 1;
    c.routed_scale = pick({1, 2}) == 1 ? 1.0 : 2.5;
    if (c.score_function == ScoreFunction::kSigmoid) c.use_score_bias = std::uniform_int_distribution<int>(0, 1)(rng);
    if (c.num_experts == 8 && std::uniform_int_distribution<int>(0, 2)(rng) == 0) {
        c.num_groups = 4;
        c.topk_groups = 2;
        c.top_k = std::min<int64_t>(c.top_k, 4);
    }
    if (std::uniform_int_distribution<int>(0, 2)(rng) == 0) {
        c.num_shared_experts = pick({1, 2});
        c.shared_ffn_size = pick({3, 8});
    }
    return c;
}

double unit_roundoff(DType t) {
    switch (t) {
        case DType::kBF16: return std::ldexp(1.0, -8);
        case DType::kF16: return std::ldexp(1.0, -11);
        default: return std::ldexp(1.0, -24);
    }
}
// Spacing of the subnormals (absolute rounding step near zero); only fp16 reaches it with O(1) data.
double subnormal_step(DType t) { return t == DType::kF16 ? std::ldexp(1.0, -24) : 0.0; }

// Per-element magnitudes of the sparse combine: mag = sum_j |w_j| |o_j|, osum = sum_j |o_j| (kept slots only),
// with the expert outputs o recomputed here with ref::expert_mlp from the plan.
void combine_magnitudes(const Layer& L, const HostTensor& x, const ref::HostPlan& plan, std::vector<double>& mag,
                        std::vector<double>& osum) {
    const MoEConfig& c = L.cfg;
    const int64_t T = plan.num_tokens, k = plan.top_k, H = c.hidden_size, F = c.ffn_size, R = c.w13_rows();
    const int64_t rows = plan.num_rows();
    std::vector<float> xf = ref::to_float(x.ref);
    std::vector<float> out(static_cast<size_t>(std::max<int64_t>(rows, 1) * H));
    for (int64_t e = 0; e < c.num_experts; ++e) {
        const int64_t r0 = plan.expert_offsets[e], n = plan.expert_offsets[e + 1] - r0;
        std::vector<float> in(static_cast<size_t>(std::max<int64_t>(n, 1) * H));
        for (int64_t r = 0; r < n; ++r)
            std::copy_n(xf.data() + plan.row_token[r0 + r] * H, H, in.data() + r * H);
        const size_t es = dtype_size(L.w13.ref.dtype);
        ref::MatView w13{L.w13.bytes.data() + static_cast<size_t>(e * R * H) * es, L.w13.ref.dtype, R, H};
        ref::MatView w2{L.w2.bytes.data() + static_cast<size_t>(e * H * F) * es, L.w2.ref.dtype, H, F};
        ref::expert_mlp(c.activation, c.dtype, in.data(), n, H, F, w13, w2, out.data() + r0 * H);
    }
    mag.assign(static_cast<size_t>(T * H), 0.0);
    osum.assign(static_cast<size_t>(T * H), 0.0);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < k; ++j) {
            const int32_t r = plan.slot_row[t * k + j];
            if (r < 0) continue;
            for (int64_t h = 0; h < H; ++h) {
                mag[t * H + h] += std::fabs(double(plan.topk_weights[t * k + j]) * out[r * H + h]);
                osum[t * H + h] += std::fabs(double(out[r * H + h]));
            }
        }
}

// Runs both paths on one layer and input and compares element by element. Returns the dense result.
DenseResult check_dense_vs_sparse(const Layer& L, const HostTensor& x, const std::string& what) {
    const MoEConfig& c = L.cfg;
    const int64_t T = x.ref.shape[0], H = c.hidden_size;
    HostTensor ys(c.dtype, {T, H}), yd(c.dtype, {T, H});
    ref::HostPlan plan;
    test::ref_moe_forward(c, L.w, x.ref, ys.ref, nullptr, &plan);
    LoadStats stats;
    const DenseResult res = dense_forward_cpu(c, L.w, x.ref, yd.ref, kDenseNoLimit, &stats);
    EXPECT_TRUE(res.ran) << what << ": " << res.reason;
    if (!res.ran) return res;
    EXPECT_TRUE(res.routed);
    EXPECT_EQ(res.dropped, plan.dropped()) << what;
    EXPECT_EQ(res.bytes_needed, dense_bytes_needed(c, T, res.capacity)) << what;
    EXPECT_EQ(res.peak_bytes, res.bytes_needed) << what;
    if (c.capacity_factor > 0) {
        EXPECT_EQ(res.capacity, c.capacity(T)) << what;
    } else {
        int64_t mx = 0;
        for (int32_t n : plan.expert_counts) mx = std::max<int64_t>(mx, n);
        EXPECT_EQ(res.capacity, mx) << what;
        EXPECT_EQ(res.dropped, 0) << what;
    }
    EXPECT_EQ(stats.dropped, plan.dropped()) << what;
    for (int64_t e = 0; e < c.num_experts; ++e) {
        EXPECT_EQ(stats.expert_counts[e], plan.expert_counts[e]) << what << " expert " << e;
        EXPECT_EQ(stats.kept_counts[e], plan.expert_offsets[e + 1] - plan.expert_offsets[e]) << what << " e=" << e;
    }

    std::vector<double> mag, osum;
    combine_magnitudes(L, x, plan, mag, osum);
    const double u = unit_roundoff(c.dtype), eta = subnormal_step(c.dtype);
    int64_t bad = 0;
    for (int64_t i = 0; i < T * H; ++i) {
        const double got = yd.get(i), want = ys.get(i);
        const double tol = (2 * u + u * u) * mag[i] + u * (1 + u) * (std::fabs(got) + std::fabs(want)) +
                           eta * (osum[i] / 2 + double(c.top_k) + 1);
        if (!(std::fabs(got - want) <= tol)) {
            if (bad == 0)
                ADD_FAILURE() << what << ": first mismatch at token " << i / H << ", h " << i % H << ": dense " << got
                              << ", sparse " << want << ", |diff| " << std::fabs(got - want) << " > tol " << tol
                              << " (sum_j |w o| = " << mag[i] << ")";
            ++bad;
        }
    }
    EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << T * H << " elements outside the bound";
    return res;
}

std::string describe(uint32_t seed, const MoEConfig& c, int64_t T) {
    std::ostringstream os;
    os << "seed " << seed << ", T=" << T << ", " << c.to_string();
    return os.str();
}

TEST(DenseBaseline, MatchesSparseDroplessRandomConfigs) {
    for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
        for (uint32_t seed = 1; seed <= 24; ++seed) {
            std::mt19937 rng(seed * 7919u + static_cast<uint32_t>(dt));
            Layer L;
            L.cfg = random_config(rng, dt);
            const int64_t T = std::vector<int64_t>{1, 7, 33, 64}[seed % 4];
            make_weights(L, dt, rng);
            HostTensor x(dt, {T, L.cfg.hidden_size});
            fill_uniform(x, rng, 1.0f);
            const std::string what = describe(seed, L.cfg, T);
            SCOPED_TRACE(what);
            check_dense_vs_sparse(L, x, what);
        }
    }
}

TEST(DenseBaseline, MatchesSparseWithFp32WeightsAndBf16Activations) {
    const uint32_t seed = 99;
    std::mt19937 rng(seed);
    Layer L;
    L.cfg = random_config(rng, DType::kBF16);
    L.cfg.num_experts = 4;
    L.cfg.top_k = 2;
    L.cfg.num_groups = L.cfg.topk_groups = 1;
    make_weights(L, DType::kF32, rng);
    HostTensor x(DType::kBF16, {40, L.cfg.hidden_size});
    fill_uniform(x, rng, 1.0f);
    const std::string what = describe(seed, L.cfg, 40);
    SCOPED_TRACE(what);
    check_dense_vs_sparse(L, x, what);
}

TEST(DenseBaseline, MatchesSparseWithCapacityDrops) {
    int64_t total_dropped = 0;
    for (DType dt : {DType::kF32, DType::kBF16}) {
        for (uint32_t seed = 1; seed <= 8; ++seed) {
            std::mt19937 rng(seed * 104729u + static_cast<uint32_t>(dt));
            Layer L;
            L.cfg = random_config(rng, dt);
            if (L.cfg.num_experts == 1) L.cfg.num_experts = 4;  // one expert never drops below factor 1
            L.cfg.num_groups = L.cfg.topk_groups = 1;
            L.cfg.top_k = std::min<int64_t>(L.cfg.top_k, L.cfg.num_experts);
            L.cfg.capacity_factor = std::vector<double>{0.5, 1.0, 1.25, 0.75}[seed % 4];
            L.cfg.min_capacity = seed % 3 == 0 ? 2 : 0;
            L.cfg.drop_policy = seed % 2 == 0 ? DropPolicy::kPosition : DropPolicy::kProbability;
            const int64_t T = std::vector<int64_t>{16, 37, 64}[seed % 3];
            make_weights(L, dt, rng);
            HostTensor x(dt, {T, L.cfg.hidden_size});
            fill_uniform(x, rng, 1.0f);
            const std::string what = describe(seed, L.cfg, T);
            SCOPED_TRACE(what);
            const DenseResult res = check_dense_vs_sparse(L, x, what);
            const int64_t C = L.cfg.capacity(T);
            if (res.ran && C * L.cfg.num_experts < T * L.cfg.top_k) {
                EXPECT_GT(res.dropped, 0) << what << ": total capacity " << C * L.cfg.num_experts << " < T*k";
            }
            total_dropped += res.dropped;
        }
    }
    EXPECT_GT(total_dropped, 0) << "the capacity cases dropped nothing: the test would not see a drop bug";
}

TEST(DenseBaseline, ZeroAndOneToken) {
    for (int64_t T : {0, 1}) {
        std::mt19937 rng(5);
        Layer L;
        L.cfg = random_config(rng, DType::kF32);
        make_weights(L, DType::kF32, rng);
        HostTensor x(DType::kF32, {T, L.cfg.hidden_size});
        fill_uniform(x, rng, 1.0f);
        const std::string what = describe(5, L.cfg, T);
        SCOPED_TRACE(what);
        const DenseResult res = check_dense_vs_sparse(L, x, what);
        if (T == 0) {
            EXPECT_EQ(res.capacity, 0);
        }
        if (T == 1) {
            EXPECT_EQ(res.capacity, 1);  // dropless: the one token's experts each receive exactly one pair
        }
    }
}

// Hand count of the formula in switchyard/baseline.h on two small cases (every slice padded to 256 bytes).
TEST(DenseBaseline, MemoryFormulaHandCount) {
    MoEConfig c;
    c.hidden_size = 32;
    c.ffn_size = 16;
    c.num_experts = 4;
    c.top_k = 2;
    c.activation = Activation::kSwiGLU;  // R = 32
    c.num_shared_experts = 1;
    c.shared_ffn_size = 8;  // S = 8, Rs = 16
    c.dtype = DType::kF32;
    // T = 16, C = 10:
    //   router: logits 4*16*4 = 256, probs 256, ids 4*16*2 = 128 -> 256, weights 256, loc 256    = 1280
    //   dispatch 4*16*4*10 = 2560, combine 2560, expert_in 4*4*10*32 = 5120, pre 4*4*10*32 = 5120,
    //   hidden 4*4*10*16 = 2560, expert_out 5120, product 4*16*4*10*32 = 81920,
    //   shared: pre 4*16*16 = 1024, h 4*16*8 = 512, out 4*16*32 = 2048; output 4*16*32 = 2048
    const DenseMemory m = dense_memory(c, 16, 10);
    EXPECT_EQ(m.router, 1280u);
    EXPECT_EQ(m.dispatch, 2560u);
    EXPECT_EQ(m.combine, 2560u);
    EXPECT_EQ(m.expert_in, 5120u);
    EXPECT_EQ(m.pre, 5120u);
    EXPECT_EQ(m.hidden, 2560u);
    EXPECT_EQ(m.expert_out, 5120u);
    EXPECT_EQ(m.product, 81920u);
    EXPECT_EQ(m.shared, 1024u + 512u + 2048u);
    EXPECT_EQ(m.output, 2048u);
    EXPECT_EQ(m.total, 111872u);
    EXPECT_EQ(dense_bytes_needed(c, 16, 10), 111872u);

    // bf16, T = 4, E = 2, k = 1, H = 8, F = 4, gated, no shared, capacity factor 1.5 -> C = ceil(1.5*4*1/2) = 3:
    //   router 5 * 256 = 1280; dispatch 2*4*2*3 = 48 -> 256; combine 256; expert_in 2*2*3*8 = 96 -> 256;
    //   pre 4*2*3*8 = 192 -> 256; hidden 2*2*3*4 = 48 -> 256; expert_out 256; product 2*4*2*3*8 = 384 -> 512;
    //   output 2*4*8 = 64 -> 256.  Total 1280 + 6*256 + 512 + 256 = 3584.
    MoEConfig b;
    b.hidden_size = 8;
    b.ffn_size = 4;
    b.num_experts = 2;
    b.top_k = 1;
    b.dtype = DType::kBF16;
    b.capacity_factor = 1.5;
    ASSERT_EQ(b.capacity(4), 3);
    EXPECT_EQ(dense_bytes_needed(b, 4), 3584u);
    EXPECT_EQ(dense_memory(b, 4, 3).product, 512u);
    // Dropless: the bound before routing uses C = T.
    b.capacity_factor = 0;
    EXPECT_EQ(dense_bytes_needed(b, 4), dense_bytes_needed(b, 4, 4));

    // The seed's failure: Mixtral shapes at 4096 tokens (bf16, capacity factor 1) need far more than an 80 GB GPU.
    MoEConfig mx;
    mx.hidden_size = 4096;
    mx.ffn_size = 14336;
    mx.num_experts = 8;
    mx.top_k = 2;
    mx.dtype = DType::kBF16;
    mx.capacity_factor = 1.0;
    const DenseMemory mm = dense_memory(mx, 4096, mx.capacity(4096));
    EXPECT_EQ(mm.capacity, 1024);
    EXPECT_EQ(mm.product, size_t(2) * 4096 * 8 * 1024 * 4096);  // 256 GiB for the broadcast product alone
    EXPECT_GT(mm.total, size_t(80) << 30);
    // Sizes past size_t saturate instead of wrapping.
    EXPECT_EQ(dense_bytes_needed(mx, int64_t(1) << 40, int64_t(1) << 40), std::numeric_limits<size_t>::max());
}

// Past the limit: ran=false with the bytes it would need, y untouched, nothing past the router allocated.
TEST(DenseBaseline, LimitPathRefusesWithoutWriting) {
    const uint32_t seed = 21;
    std::mt19937 rng(seed);
    Layer L;
    L.cfg = random_config(rng, DType::kBF16);
    L.cfg.num_experts = 4;
    L.cfg.top_k = 2;
    L.cfg.num_groups = L.cfg.topk_groups = 1;
    make_weights(L, DType::kBF16, rng);
    const int64_t T = 24, H = L.cfg.hidden_size;
    HostTensor x(DType::kBF16, {T, H});
    fill_uniform(x, rng, 1.0f);
    const float kSentinel = 12288.0f;  // 3 * 2^12: exactly representable in bf16
    for (double cf : {1.0, 0.0}) {
        L.cfg.capacity_factor = cf;
        SCOPED_TRACE(describe(seed, L.cfg, T));
        HostTensor y(DType::kBF16, {T, H});
        for (int64_t i = 0; i < T * H; ++i) y.set(i, kSentinel);
        // First run without a limit to learn the exact need.
        HostTensor y_ok(DType::kBF16, {T, H});
        const DenseResult full = dense_forward_cpu(L.cfg, L.w, x.ref, y_ok.ref);
        ASSERT_TRUE(full.ran) << full.reason;
        const size_t need = full.bytes_needed;
        const DenseResult r = dense_forward_cpu(L.cfg, L.w, x.ref, y.ref, need - 1);
        EXPECT_FALSE(r.ran);
        EXPECT_EQ(r.bytes_needed, need);
        EXPECT_GT(r.bytes_needed, need - 1);
        EXPECT_NE(r.reason.find("needs " + std::to_string(need)), std::string::npos) << r.reason;
        const size_t router_part = dense_layout(L.cfg, T, 0).router_end;
        if (cf > 0) {
            EXPECT_EQ(r.peak_bytes, 0u) << "capacity known up front: nothing may be allocated";
            EXPECT_FALSE(r.routed);
        } else {
            EXPECT_EQ(r.peak_bytes, router_part) << "dropless: only the router part may be held";
            EXPECT_TRUE(r.routed);
        }
        EXPECT_LT(r.peak_bytes, need);
        for (int64_t i = 0; i < T * H; ++i) {
            ASSERT_EQ(y.get(i), kSentinel) << "y written at element " << i << " on a refused run";
        }
        // Exactly at the limit it runs, and gives the unlimited run's bits.
        const DenseResult ok = dense_forward_cpu(L.cfg, L.w, x.ref, y.ref, need);
        EXPECT_TRUE(ok.ran) << ok.reason;
        EXPECT_EQ(std::memcmp(y.bytes.data(), y_ok.bytes.data(), y.bytes.size()), 0);
    }
}

// A case whose product tensor would be ~137 GB: refused from the formula alone, quickly, with nothing big held.
TEST(DenseBaseline, HugeCaseIsRefusedNotAllocated) {
    MoEConfig c;
    c.hidden_size = 1024;
    c.ffn_size = 8;
    c.num_experts = 8;
    c.top_k = 2;
    c.activation = Activation::kReLU;
    c.dtype = DType::kF32;
    std::mt19937 rng(3);
    Layer L;
    L.cfg = c;
    make_weights(L, DType::kF32, rng);
    const int64_t T = 4096;
    HostTensor x(DType::kF32, {T, c.hidden_size});
    fill_uniform(x, rng, 1.0f);
    HostTensor y(DType::kF32, {T, c.hidden_size});
    const size_t limit = size_t(1) << 30;
    for (double cf : {1.0, 0.0}) {
        L.cfg.capacity_factor = cf;
        SCOPED_TRACE(describe(3, L.cfg, T));
        LoadStats stats;
        const DenseResult r = dense_forward_cpu(L.cfg, L.w, x.ref, y.ref, limit, &stats);
        EXPECT_FALSE(r.ran);
        EXPECT_GT(r.bytes_needed, size_t(100) << 30);
        EXPECT_EQ(r.bytes_needed, dense_bytes_needed(L.cfg, T, r.capacity));
        EXPECT_LE(r.peak_bytes, dense_layout(L.cfg, T, 0).router_end);
        if (cf == 0) {  // dropless routing ran, so its statistics are there
            EXPECT_TRUE(r.routed);
            int64_t sum = 0;
            for (int64_t n : stats.expert_counts) sum += n;
            EXPECT_EQ(sum, T * c.top_k);
        }
    }
}

// With no limit, a case far larger than any host (~550 GB) is refused from the available memory, not allocated.
TEST(DenseBaseline, LargerThanTheHostIsReportedNotAllocated) {
    MoEConfig c;
    c.hidden_size = 1024;
    c.ffn_size = 8;
    c.num_experts = 8;
    c.top_k = 2;
    c.activation = Activation::kReLU;
    c.dtype = DType::kF32;
    c.capacity_factor = 1.0;
    std::mt19937 rng(11);
    Layer L;
    L.cfg = c;
    make_weights(L, DType::kF32, rng);
    const int64_t T = 8192;
    HostTensor x(DType::kF32, {T, c.hidden_size});
    fill_uniform(x, rng, 1.0f);
    HostTensor y(DType::kF32, {T, c.hidden_size});
    SCOPED_TRACE(describe(11, c, T));
    const DenseResult r = dense_forward_cpu(c, L.w, x.ref, y.ref);
    EXPECT_FALSE(r.ran);
    EXPECT_GT(r.bytes_needed, size_t(500) << 30);
    EXPECT_NE(r.reason.find("available"), std::string::npos) << r.reason;
    EXPECT_EQ(r.peak_bytes, dense_layout(c, T, 0).router_end);
}

TEST(DenseBaseline, ValidationNamesTheParameter) {
    std::mt19937 rng(8);
    Layer L;
    L.cfg = random_config(rng, DType::kF32);
    make_weights(L, DType::kF32, rng);
    HostTensor x(DType::kBF16, {4, L.cfg.hidden_size});  // wrong dtype
    HostTensor y(DType::kF32, {4, L.cfg.hidden_size});
    try {
        dense_forward_cpu(L.cfg, L.w, x.ref, y.ref);
        ADD_FAILURE() << "expected switchyard::Error for a bf16 x with an fp32 layer";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("x dtype=bf16"), std::string::npos) << e.what();
    }
    HostTensor x2(DType::kF32, {4, L.cfg.hidden_size + 1});  // wrong hidden size
    EXPECT_THROW(dense_forward_cpu(L.cfg, L.w, x2.ref, y.ref), Error);
    MoEWeights w = L.w;
    w.w2 = TensorRef();
    HostTensor x3(DType::kF32, {4, L.cfg.hidden_size});
    EXPECT_THROW(dense_forward_cpu(L.cfg, w, x3.ref, y.ref), Error);
}

}  // namespace
}  // namespace switchyard
