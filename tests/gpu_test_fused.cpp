// tests/gpu_test_fused.cpp: the fused small-batch path (stages.h: route_fused, experts_fused; MoELayer forced onto
// it with set_fused_max_tokens(64), whatever the automatic rule would pick) on CUDA against the CPU specification, for T in {1, 2, 3, 7, 16, 33, 64} and every routing
// option: softmax / sigmoid / top-k-softmax scores, selection bias, group-limited top-k, renormalisation, routed
// scale, capacity with both drop policies, expert choice, shared experts (gated or not), every activation.
//
// Method: the CUDA layer's own logits (ForwardOutputs) are routed again by the CPU stages, so the ids, weights and
// plan must be equal (weights to 1e-6: the same double arithmetic on the same fp32 logits); the CPU's experts_fused
// (the chain gather .. combine, double sums, each stored value rounded to the dtype) on those routes is the
// reference for y: normwise relative error <= the dtype's rounding (bf16 1e-2, fp16 2e-3) and every element within
// rtol * (|want| + rms(want)) plus one rounding of each weighted expert output and of the shared output (y_close). The logits themselves are compared with the CPU router GEMM (fp32 sums of H products
// vs double). Each forward runs twice on poisoned buffers and must be bitwise equal; a graph replay on new inputs
// must equal an eager forward bitwise.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <cstring>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "api/expert_chain.h"
#include "io/quantize.h"
#include "switchyard/moe_layer.h"
#include "switchyard/stages.h"
#include "test_util.h"

namespace switchyard {
namespace {

using testing::DeviceBuffer;

struct FusedCase {
    const char* name;
    DType dtype;
    int64_t H, F, E, k;
    ScoreFunction score;
    bool renormalize;
    double routed_scale;
    int64_t groups, topk_groups;
    bool bias;
    double capacity_factor;
    DropPolicy policy;
    RoutingMode mode;
    Activation act;
    int64_t num_shared, shared_ffn;
    bool shared_gate;
};

MoEConfig config_of(const FusedCase& c) {
    MoEConfig cfg;
    cfg.hidden_size = c.H;
    cfg.ffn_size = c.F;
    cfg.num_experts = c.E;
    cfg.top_k = c.k;
    cfg.score_function = c.score;
    cfg.renormalize = c.renormalize;
    cfg.routed_scale = c.routed_scale;
    cfg.num_groups = c.groups;
    cfg.topk_groups = c.topk_groups;
    cfg.use_score_bias = c.bias;
    cfg.capacity_factor = c.capacity_factor;
    cfg.drop_policy = c.policy;
    cfg.routing_mode = c.mode;
    cfg.activation = c.act;
    cfg.num_shared_experts = c.num_shared;
    cfg.shared_ffn_size = c.shared_ffn;
    cfg.shared_expert_gate = c.shared_gate;
    cfg.dtype = c.dtype;
    return cfg;
}

// One tensor on the host (values rounded to its dtype, and their bytes) and on the device.
struct Pair {
    std::vector<float> values;
    std::vector<uint8_t> bytes;
    DeviceBuffer dev;
    DType dtype = DType::kF32;
    std::vector<int64_t> shape;

    void make(std::vector<int64_t> dims, DType dt, float lo, float hi, uint64_t seed) {
        shape = std::move(dims);
        dtype = dt;
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        values = testing::random_values(static_cast<size_t>(n), dt, lo, hi, seed);
        bytes = testing::encode(values, dt);
        testing::upload(dev, values, dt);
    }
    TensorRef host() { return values.empty() ? TensorRef() : ref(bytes.data(), Device::kCPU); }
    TensorRef device() { return values.empty() ? TensorRef() : ref(dev.get(), Device::kCUDA); }

 private:
    TensorRef ref(void* p, Device d) const {
        switch (shape.size()) {
            case 1: return TensorRef(p, dtype, {shape[0]}, d, 0);
            case 2: return TensorRef(p, dtype, {shape[0], shape[1]}, d, 0);
            default: return TensorRef(p, dtype, {shape[0], shape[1], shape[2]}, d, 0);
        }
    }
};

struct Weights {
    Pair gate, bias, w13, w2, sw13, sw2, sgate;
    MoEWeights host() { return pick(true); }
    MoEWeights device() { return pick(false); }

    Weights(const MoEConfig& cfg, uint64_t seed) {
        const DType dt = cfg.dtype;
        const int64_t H = cfg.hidden_size, F = cfg.ffn_size, E = cfg.num_experts, S = cfg.shared_width();
        const float gh = 6.0f / std::sqrt(static_cast<float>(H)), ah = std::sqrt(3.0f / H), af = std::sqrt(3.0f / F);
        gate.make({E, H}, dt, -gh, gh, seed + 1);
        if (cfg.use_score_bias) bias.make({E}, DType::kF32, -0.1f, 0.1f, seed + 2);
        w13.make({E, cfg.w13_rows(), H}, dt, -ah, ah, seed + 3);
        w2.make({E, H, F}, dt, -af, af, seed + 4);
        if (S > 0) {
            const float as = std::sqrt(3.0f / S);
            sw13.make({is_gated(cfg.activation) ? 2 * S : S, H}, dt, -ah, ah, seed + 5);
            sw2.make({H, S}, dt, -as, as, seed + 6);
            if (cfg.shared_expert_gate) sgate.make({1, H}, dt, -gh, gh, seed + 7);
        }
    }

 private:
    MoEWeights pick(bool on_host) {
        auto t = [&](Pair& p) { return on_host ? p.host() : p.device(); };
        MoEWeights w;
        w.gate = t(gate);
        w.score_bias = t(bias);
        w.w13 = t(w13);
        w.w2 = t(w2);
        w.shared_w13 = t(sw13);
        w.shared_w2 = t(sw2);
        w.shared_gate = t(sgate);
        return w;
    }
};

TensorRef host_ref(void* p, DType dt, std::initializer_list<int64_t> dims) {
    return TensorRef(p, dt, dims, Device::kCPU, 0);
}

::testing::AssertionResult y_matches(const std::vector<float>& got, const std::vector<float>& want, DType dt) {
    const double rtol = dt == DType::kBF16 ? 1e-2 : 2e-3, scale = testing::rms(want);
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        const double d = double(got[i]) - want[i];
        num += d * d;
        den += double(want[i]) * want[i];
        if (!(std::fabs(d) <= rtol * (std::fabs(want[i]) + scale)))
            return ::testing::AssertionFailure() << "y[" << i << "]: got " << got[i] << ", expected " << want[i];
    }
    const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
    if (rel > rtol) return ::testing::AssertionFailure() << "normwise relative error " << rel << " > " << rtol;
    return ::testing::AssertionSuccess();
}

// The CPU chain's stored expert outputs out [R, H] and shared-expert output [T, H] (layer dtype, as floats): the
// terms the fused path sums in fp32 without rounding them first (decode_experts.cu), for y_close's allowance.
struct ChainTerms {
    std::vector<float> out, shared;
};
ChainTerms chain_terms(const MoEConfig& cfg, const TensorRef& x, const MoEWeights& w, const RoutingPlan& plan,
                       int64_t T, int64_t R) {
    const DType dt = cfg.dtype;
    const int64_t H = cfg.hidden_size, F = cfg.ffn_size, E = cfg.num_experts, R13 = cfg.w13_rows(),
                  S = cfg.shared_width(), sz = static_cast<int64_t>(dtype_size(dt));
    std::vector<uint8_t> xp(R * H * sz), g(R * R13 * sz), h(R * F * sz), out(R * H * sz);
    std::vector<uint8_t> ws(std::max(grouped_gemm_workspace_size(Device::kCPU, dt, E, R13, H, R),
                                     grouped_gemm_workspace_size(Device::kCPU, dt, E, H, F, R)) + 1);
    gather(x, plan.row_token, host_ref(xp.data(), dt, {R, H}));
    grouped_gemm(host_ref(xp.data(), dt, {R, H}), w.w13, plan.expert_offsets, host_ref(g.data(), dt, {R, R13}),
                 ws.data(), ws.size());
    activation(cfg.activation, host_ref(g.data(), dt, {R, R13}), host_ref(h.data(), dt, {R, F}));
    grouped_gemm(host_ref(h.data(), dt, {R, F}), w.w2, plan.expert_offsets, host_ref(out.data(), dt, {R, H}),
                 ws.data(), ws.size());
    ChainTerms terms;
    terms.out = testing::decode(out, dt);
    if (S > 0) {
        const int64_t R13s = cfg.shared_w13_rows();
        std::vector<uint8_t> sg(T * R13s * sz), sh(T * S * sz), so(T * H * sz);
        std::vector<uint8_t> sws(std::max(grouped_gemm_workspace_size(Device::kCPU, dt, 1, R13s, H, T),
                                          grouped_gemm_workspace_size(Device::kCPU, dt, 1, H, S, T)) + 1);
        api::shared_expert(cfg, x, w, host_ref(sg.data(), dt, {T, R13s}), host_ref(sh.data(), dt, {T, S}),
                           host_ref(so.data(), dt, {T, H}), sws.data(), sws.size(), nullptr);
        terms.shared = testing::decode(so, dt);
    }
    return terms;
}

// Per element: |got - want| <= rtol * (|want| + rms(want)) + sum_j |w_j| ulp(out[slot_row[t, j], h]) +
// ulp(shared[t, h]) (the staged GPU test's rule, gpu_test_moe.cpp): the CPU chain rounds each expert output and the
// shared output to the dtype before the weighted sum, the fused path does not, so y may differ by up to half a unit
// of each such term (weighted) besides the dtype's rounding; plus the normwise bound rtol. A wrong expert, row or
// weight misses both by orders of magnitude. On failure: how many elements, the worst, and the normwise error.
::testing::AssertionResult y_close(const std::vector<float>& got, const std::vector<float>& want,
                                   const std::vector<int32_t>& slot_row, const std::vector<float>& weights,
                                   int64_t slots, const ChainTerms& terms, DType dt, int64_t H) {
    const double rtol = dt == DType::kBF16 ? 1e-2 : 2e-3, base = rtol * testing::rms(want);
    const int64_t T = static_cast<int64_t>(want.size()) / H;
    int64_t bad = 0, worst_i = -1;
    double worst = 0.0, num = 0.0, den = 0.0, worst_tol = 0.0;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h) {
            const int64_t i = t * H + h;
            double tol = base + rtol * std::fabs(want[i]);
            for (int64_t j = 0; j < slots; ++j) {
                const int32_t r = slot_row[t * slots + j];
                if (r >= 0) tol += std::fabs(weights[t * slots + j]) * testing::ulp_of(dt, terms.out[r * H + h]);
            }
            if (!terms.shared.empty()) tol += testing::ulp_of(dt, terms.shared[i]);
            const double d = double(got[i]) - want[i];
            num += d * d;
            den += double(want[i]) * want[i];
            if (!(std::fabs(d) <= tol)) ++bad;
            if (!(std::fabs(d) <= worst * tol)) worst = std::fabs(d) / tol, worst_i = i, worst_tol = tol;
        }
    const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
    if (bad == 0 && rel <= rtol) return ::testing::AssertionSuccess();
    auto f = ::testing::AssertionFailure();
    f << bad << " of " << want.size() << " elements outside their tolerance, normwise relative error " << rel
      << " (bound " << rtol << ")";
    if (worst_i >= 0)
        f << "; worst y[" << worst_i / H << ", " << worst_i % H << "]: got " << got[worst_i] << ", expected "
          << want[worst_i] << ", tolerance " << worst_tol << " (" << worst << "x)";
    return f;
}

void run_case(const FusedCase& c, int64_t T) {
    const MoEConfig cfg = config_of(c);
    const uint64_t seed = 4242 + static_cast<uint64_t>(T * 131 + c.E * 7 + c.H);
    SCOPED_TRACE(std::string(c.name) + " T=" + std::to_string(T) + " seed=" + std::to_string(seed));
    Weights W(cfg, seed);
    MoELayer gpu(cfg, W.device());
    gpu.set_fused_max_tokens(fused_path_max_tokens());  // the fused path wherever supported (not the automatic rule)
    ASSERT_TRUE(gpu.uses_fused_path(T)) << "the fused path should take this layer";
    const DType dt = cfg.dtype;
    const int64_t H = c.H, E = c.E, slots = cfg.route_slots();
    Pair x;
    x.make({T, H}, dt, -1.0f, 1.0f, seed + 100);
    const size_t ws_bytes = gpu.workspace_size(T);
    DeviceBuffer ws(ws_bytes), d_y(T * H * dtype_size(dt) + 16), d_logits(T * E * 4 + 4), d_ids(T * slots * 4 + 4),
        d_w(T * slots * 4 + 4), d_slot(T * slots * 4 + 4), d_counts(E * 4 + 4);
    ForwardOutputs out;
    out.logits = TensorRef(d_logits.get(), DType::kF32, {T, E}, Device::kCUDA);
    out.topk_ids = TensorRef(d_ids.get(), DType::kI32, {T, slots}, Device::kCUDA);
    out.topk_weights = TensorRef(d_w.get(), DType::kF32, {T, slots}, Device::kCUDA);
    out.slot_row = TensorRef(d_slot.get(), DType::kI32, {T, slots}, Device::kCUDA);
    out.expert_counts = TensorRef(d_counts.get(), DType::kI32, {E}, Device::kCUDA);
    std::vector<std::vector<uint8_t>> runs;
    for (int run = 0; run < 2; ++run) {
        for (DeviceBuffer* b : {&ws, &d_y, &d_logits, &d_ids, &d_w, &d_slot, &d_counts}) b->poison();
        GPU_CHECK(cudaDeviceSynchronize());
        gpu.forward(x.device(), TensorRef(d_y.get(), dt, {T, H}, Device::kCUDA), ws.get(), ws_bytes, nullptr, &out);
        GPU_CHECK(cudaDeviceSynchronize());
        runs.push_back(testing::download_raw<uint8_t>(d_y.get(), T * H * dtype_size(dt)));
    }
    EXPECT_TRUE(testing::bitwise_equal(runs[0], runs[1], "y run to run"));

    // The CPU routes the GPU's logits again: the same decisions and plan.
    std::vector<float> logits = testing::download_raw<float>(d_logits.get(), T * E);
    std::vector<float> ref_logits(T * E);
    router_gemm(x.host(), W.gate.host(), host_ref(ref_logits.data(), DType::kF32, {T, E}), nullptr, 0);
    EXPECT_TRUE(testing::all_close(logits, ref_logits, 2e-5, 1e-5, "logits", E));
    const int64_t R = cfg.expert_choice() ? E * cfg.expert_choice_capacity(T) : T * c.k;
    std::vector<int32_t> ids(T * slots);
    std::vector<float> weights(T * slots);
    test::PlanTensors pt(E, T, slots, R);
    const RoutingPlan& plan = pt.plan;
    auto ints = [](const test::HostTensor& t) {
        return std::vector<int32_t>(t.ptr<int32_t>(), t.ptr<int32_t>() + t.numel());
    };
    const TensorRef lg = host_ref(logits.data(), DType::kF32, {T, E});
    const TensorRef id = host_ref(ids.data(), DType::kI32, {T, slots});
    const TensorRef wt = host_ref(weights.data(), DType::kF32, {T, slots});
    if (cfg.expert_choice()) {
        route_expert_choice(cfg, lg, id, wt, plan, nullptr, 0);
    } else {
        route(cfg, lg, W.bias.host(), id, wt);
        build_plan(cfg, id, wt, plan, nullptr, 0);
    }
    EXPECT_EQ(testing::download_raw<int32_t>(d_ids.get(), T * slots), ids);
    EXPECT_TRUE(testing::all_close(testing::download_raw<float>(d_w.get(), T * slots), weights, 1e-7, 1e-6,
                                   "topk_weights", slots));
    EXPECT_EQ(testing::download_raw<int32_t>(d_slot.get(), T * slots), ints(pt.slot_row));
    EXPECT_EQ(testing::download_raw<int32_t>(d_counts.get(), E), ints(pt.counts));

    // y: the CPU's experts_fused (the staged chain) on those routes.
    std::vector<float> sg_logits;
    TensorRef sg;
    if (cfg.shared_expert_gate) {
        sg_logits.resize(T);
        sg = host_ref(sg_logits.data(), DType::kF32, {T, 1});
        router_gemm(x.host(), W.sgate.host(), sg, nullptr, 0);
    }
    std::vector<uint8_t> want_bytes(T * H * dtype_size(dt) + 1);
    experts_fused(cfg, x.host(), W.host(), plan, wt, sg, host_ref(want_bytes.data(), dt, {T, H}), nullptr, 0);
    want_bytes.pop_back();
    const ChainTerms terms = chain_terms(cfg, x.host(), W.host(), plan, T, R);
    EXPECT_TRUE(y_close(testing::decode(runs[0], dt), testing::decode(want_bytes, dt), ints(pt.slot_row), weights,
                        slots, terms, dt, H));
}

constexpr ScoreFunction kSoft = ScoreFunction::kSoftmax, kSig = ScoreFunction::kSigmoid,
                        kTopkSoft = ScoreFunction::kTopkSoftmax;
constexpr RoutingMode kTC = RoutingMode::kTokenChoice, kEC = RoutingMode::kExpertChoice;
constexpr DropPolicy kPos = DropPolicy::kPosition, kProb = DropPolicy::kProbability;

const FusedCase kCases[] = {
    // name, dtype, H, F, E, k, score, renorm, scale, G, TG, bias, capacity, policy, mode, act, shared, S, gated
    {"mixtral_like", DType::kBF16, 256, 448, 8, 2, kSoft, true, 1.0, 1, 1, false, 0.0, kPos, kTC,
     Activation::kSwiGLU, 0, 0, false},
    {"qwen3_like", DType::kBF16, 512, 96, 128, 8, kSoft, true, 1.0, 1, 1, false, 0.0, kPos, kTC,
     Activation::kSwiGLU, 0, 0, false},
    {"deepseek_like", DType::kBF16, 384, 128, 64, 6, kSig, true, 2.5, 8, 3, true, 0.0, kPos, kTC,
     Activation::kSwiGLU, 1, 128, false},
    {"qwen2_gated_shared", DType::kBF16, 256, 64, 60, 4, kSoft, false, 1.0, 1, 1, false, 0.0, kPos, kTC,
     Activation::kSwiGLU, 1, 200, true},
    {"topk_softmax_fp16_geglu", DType::kF16, 128, 80, 16, 4, kTopkSoft, false, 1.0, 1, 1, false, 0.0, kPos, kTC,
     Activation::kGeGLU, 0, 0, false},
    {"capacity_position_gelu", DType::kBF16, 128, 64, 8, 2, kSoft, false, 1.0, 1, 1, false, 1.0, kPos, kTC,
     Activation::kGELU, 0, 0, false},
    {"capacity_probability_relu", DType::kF16, 136, 72, 32, 4, kSoft, true, 1.0, 1, 1, false, 0.5, kProb, kTC,
     Activation::kReLU, 2, 40, false},
    {"expert_choice", DType::kBF16, 128, 64, 16, 2, kSoft, false, 1.0, 1, 1, false, 0.0, kPos, kEC,
     Activation::kSwiGLU, 1, 64, false},
};

class GpuFused : public ::testing::TestWithParam<FusedCase> {};

TEST_P(GpuFused, MatchesTheCpuChainForEveryBatchSize) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    for (int64_t T : {1, 2, 3, 7, 16, 33, 64}) run_case(GetParam(), T);
}

INSTANTIATE_TEST_SUITE_P(Cases, GpuFused, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<FusedCase>& info) { return std::string(info.param.name); });

// Graph capture: replaying one captured fused forward on new inputs copied into its buffers equals an eager forward
// bitwise; the staged path (fused_max_tokens 0) gives the same routing and a y within the dtype's rounding.
TEST(GpuFusedGraph, ReplayEqualsEagerAndStagedAgrees) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    const FusedCase c = kCases[2];
    const MoEConfig cfg = config_of(c);
    const int64_t T = 16, H = c.H, E = c.E;
    Weights W(cfg, 77);
    MoELayer layer(cfg, W.device());
    layer.set_fused_max_tokens(fused_path_max_tokens());
    ASSERT_TRUE(layer.uses_fused_path(T));
    const DType dt = cfg.dtype;
    const size_t ws_bytes = layer.workspace_size(T);
    DeviceBuffer ws(ws_bytes), d_x(T * H * 2), d_y(T * H * 2), d_y2(T * H * 2);
    const TensorRef x(d_x.get(), dt, {T, H}, Device::kCUDA), y(d_y.get(), dt, {T, H}, Device::kCUDA);
    cudaStream_t s;
    GPU_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    GPU_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    layer.forward(x, y, ws.get(), ws_bytes, s);
    GPU_CHECK(cudaStreamEndCapture(s, &graph));
    GPU_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (uint64_t seed : {5u, 6u}) {
        const auto xv = testing::random_values(T * H, dt, -1.0f, 1.0f, seed);
        const auto xb = testing::encode(xv, dt);
        GPU_CHECK(cudaMemcpy(d_x.get(), xb.data(), xb.size(), cudaMemcpyHostToDevice));
        d_y.poison();
        GPU_CHECK(cudaGraphLaunch(exec, s));
        GPU_CHECK(cudaStreamSynchronize(s));
        const auto replay = testing::download_raw<uint8_t>(d_y.get(), T * H * 2);
        d_y.poison();
        layer.forward(x, y, ws.get(), ws_bytes, s);
        GPU_CHECK(cudaStreamSynchronize(s));
        EXPECT_TRUE(testing::bitwise_equal(replay, testing::download_raw<uint8_t>(d_y.get(), T * H * 2), "replay"));
        MoELayer staged(cfg, W.device());
        staged.set_fused_max_tokens(0);
        ASSERT_FALSE(staged.uses_fused_path(T));
        DeviceBuffer ws2(staged.workspace_size(T));
        staged.forward(x, TensorRef(d_y2.get(), dt, {T, H}, Device::kCUDA), ws2.get(), ws2.bytes(), s);
        GPU_CHECK(cudaStreamSynchronize(s));
        EXPECT_TRUE(y_matches(testing::decode(replay, dt), testing::download(d_y2.get(), T * H, dt), dt))
            << "fused vs staged";
    }
    (void)E;
    GPU_CHECK(cudaGraphExecDestroy(exec));
    GPU_CHECK(cudaGraphDestroy(graph));
    GPU_CHECK(cudaStreamDestroy(s));
}

// FP8 experts (W8A8, dynamic scales) on the fused path: the same method against the CPU chain, whose FP8 GEMMs are
// the recipe's specification; tolerance: the relative L2 1e-2 (the GPU's h may sit one bf16 rounding from the
// CPU's, which can move one fp8 code of h), elementwise 5e-2 of (|want| + rms). Also agrees with the staged CUDA FP8
// path at 1e-2.
struct HostFp8 {
    std::vector<uint8_t> codes;
    std::vector<float> scales;
    DeviceBuffer d_codes, d_scales;
    TensorRef host_codes, host_scales, dev_codes, dev_scales;
};

void quantize_matrix(HostFp8& q, const std::vector<float>& w, int64_t groups, int64_t rows, int64_t cols,
                     QuantMode mode) {
    const int64_t rb = fp8_blocks(rows), cb = fp8_blocks(cols);
    q.codes.assign(static_cast<size_t>(groups * rows * cols), 0);
    q.scales.assign(static_cast<size_t>(mode == QuantMode::kFP8Block ? groups * rb * cb : groups), 0.0f);
    for (int64_t g = 0; g < groups; ++g) {
        const float* wg = w.data() + g * rows * cols;
        if (mode == QuantMode::kFP8Block) {
            io::quantize_fp8_block(wg, rows, cols, q.codes.data() + g * rows * cols, q.scales.data() + g * rb * cb);
        } else {
            float amax = 0.0f;
            for (int64_t i = 0; i < rows * cols; ++i) amax = std::max(amax, std::fabs(wg[i]));
            q.scales[g] = io::fp8_scale_for_amax(amax);
            io::quantize_fp8_with_scale(wg, rows * cols, q.scales[g], q.codes.data() + g * rows * cols);
        }
    }
    q.d_codes.reset(q.codes.size());
    q.d_scales.reset(q.scales.size() * 4);
    if (cudaMemcpy(q.d_codes.get(), q.codes.data(), q.codes.size(), cudaMemcpyHostToDevice) != cudaSuccess ||
        cudaMemcpy(q.d_scales.get(), q.scales.data(), q.scales.size() * 4, cudaMemcpyHostToDevice) != cudaSuccess)
        throw std::runtime_error("cudaMemcpy failed");
    auto refs = [&](void* c, void* sc, Device d, TensorRef& cr, TensorRef& sr) {
        cr = groups > 1 ? TensorRef(c, DType::kF8E4M3, {groups, rows, cols}, d)
                                     : TensorRef(c, DType::kF8E4M3, {rows, cols}, d);
        if (mode == QuantMode::kFP8Block)
            sr = groups > 1 ? TensorRef(sc, DType::kF32, {groups, rb, cb}, d) : TensorRef(sc, DType::kF32, {rb, cb}, d);
        else
            sr = TensorRef(sc, DType::kF32, {groups}, d);
    };
    refs(q.codes.data(), q.scales.data(), Device::kCPU, q.host_codes, q.host_scales);
    refs(q.d_codes.get(), q.d_scales.get(), Device::kCUDA, q.dev_codes, q.dev_scales);
}

TEST(GpuFusedFp8, MatchesTheCpuChainAndTheStagedPath) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    for (QuantMode mode : {QuantMode::kFP8Block, QuantMode::kFP8Tensor}) {
        for (int64_t T : {1, 3, 16, 64}) {
            const uint64_t seed = 31 + static_cast<uint64_t>(T);
            SCOPED_TRACE(std::string(to_string(mode)) + " T=" + std::to_string(T) + " seed=" + std::to_string(seed));
            MoEConfig cfg;
            cfg.hidden_size = 384;
            cfg.ffn_size = 256;
            cfg.num_experts = 16;
            cfg.top_k = 4;
            cfg.score_function = ScoreFunction::kSigmoid;
            cfg.renormalize = true;
            cfg.num_shared_experts = 1;
            cfg.shared_ffn_size = 128;
            cfg.dtype = DType::kBF16;
            cfg.quant_mode = mode;
            const int64_t H = cfg.hidden_size, F = cfg.ffn_size, E = cfg.num_experts, S = cfg.shared_width();
            const DType dt = cfg.dtype;
            const float ah = std::sqrt(3.0f / H), af = std::sqrt(3.0f / F), as = std::sqrt(3.0f / S);
            Pair gate, x;
            gate.make({E, H}, dt, -0.3f, 0.3f, seed + 1);
            x.make({T, H}, dt, -1.0f, 1.0f, seed + 2);
            HostFp8 w13, w2, sw13, sw2;
            quantize_matrix(w13, testing::random_values(E * 2 * F * H, DType::kF32, -ah, ah, seed + 3), E, 2 * F, H,
                            mode);
            quantize_matrix(w2, testing::random_values(E * H * F, DType::kF32, -af, af, seed + 4), E, H, F, mode);
            quantize_matrix(sw13, testing::random_values(2 * S * H, DType::kF32, -ah, ah, seed + 5), 1, 2 * S, H, mode);
            quantize_matrix(sw2, testing::random_values(H * S, DType::kF32, -as, as, seed + 6), 1, H, S, mode);
            auto weights = [&](bool dev) {
                MoEWeights w;
                w.gate = dev ? gate.device() : gate.host();
                w.w13 = dev ? w13.dev_codes : w13.host_codes;
                w.w13_scale = dev ? w13.dev_scales : w13.host_scales;
                w.w2 = dev ? w2.dev_codes : w2.host_codes;
                w.w2_scale = dev ? w2.dev_scales : w2.host_scales;
                w.shared_w13 = dev ? sw13.dev_codes : sw13.host_codes;
                w.shared_w13_scale = dev ? sw13.dev_scales : sw13.host_scales;
                w.shared_w2 = dev ? sw2.dev_codes : sw2.host_codes;
                w.shared_w2_scale = dev ? sw2.dev_scales : sw2.host_scales;
                return w;
            };
            MoELayer gpu(cfg, weights(true));
            gpu.set_fused_max_tokens(fused_path_max_tokens());
            ASSERT_TRUE(gpu.uses_fused_path(T));
            const size_t ws_bytes = gpu.workspace_size(T);
            DeviceBuffer ws(ws_bytes), d_y(T * H * 2), d_y2(T * H * 2), d_logits(T * E * 4);
            ForwardOutputs out;
            out.logits = TensorRef(d_logits.get(), DType::kF32, {T, E}, Device::kCUDA);
            std::vector<std::vector<uint8_t>> runs;
            for (int run = 0; run < 2; ++run) {
                ws.poison();
                d_y.poison();
                gpu.forward(x.device(), TensorRef(d_y.get(), dt, {T, H}, Device::kCUDA), ws.get(), ws_bytes, nullptr,
                            &out);
                GPU_CHECK(cudaDeviceSynchronize());
                runs.push_back(testing::download_raw<uint8_t>(d_y.get(), T * H * 2));
            }
            EXPECT_TRUE(testing::bitwise_equal(runs[0], runs[1], "y run to run"));
            // The CPU chain on the GPU's routing.
            std::vector<float> logits = testing::download_raw<float>(d_logits.get(), T * E);
            const int64_t k = cfg.top_k, R = T * k;
            std::vector<int32_t> ids(R);
            std::vector<float> wts(R);
            test::PlanTensors pt(E, T, k, R);
            const RoutingPlan& plan = pt.plan;
            const TensorRef id = host_ref(ids.data(), DType::kI32, {T, k}), wt = host_ref(wts.data(), DType::kF32, {T, k});
            route(cfg, host_ref(logits.data(), DType::kF32, {T, E}), TensorRef(), id, wt);
            build_plan(cfg, id, wt, plan, nullptr, 0);
            std::vector<uint8_t> want(T * H * 2 + 1);
            experts_fused(cfg, x.host(), weights(false), plan, wt, TensorRef(), host_ref(want.data(), dt, {T, H}),
                          nullptr, 0);
            want.pop_back();
            const std::vector<float> got = testing::decode(runs[0], dt), ref = testing::decode(want, dt);
            const double scale = testing::rms(ref);
            double num = 0, den = 0;
            int64_t bad = 0;
            for (size_t i = 0; i < got.size(); ++i) {
                const double d = double(got[i]) - ref[i];
                num += d * d;
                den += double(ref[i]) * ref[i];
                bad += !(std::fabs(d) <= 5e-2 * (std::fabs(ref[i]) + scale));
            }
            const double rel = std::sqrt(num / den);
            std::printf("[gpu fused fp8] %s T=%lld rel L2 %.3g vs the CPU chain\n", to_string(mode),
                        static_cast<long long>(T), rel);
            EXPECT_LE(rel, 1e-2);
            EXPECT_EQ(bad, 0) << "elements off by more than 5e-2 * (|want| + rms)";
            // The staged CUDA FP8 path on the same inputs.
            MoELayer staged(cfg, weights(true));
            DeviceBuffer ws2(staged.workspace_size(T));
            staged.forward(x.device(), TensorRef(d_y2.get(), dt, {T, H}, Device::kCUDA), ws2.get(), ws2.bytes(),
                           nullptr);
            GPU_CHECK(cudaDeviceSynchronize());
            const std::vector<float> st = testing::download(d_y2.get(), T * H, dt);
            double n2 = 0, d2 = 0;
            for (size_t i = 0; i < got.size(); ++i) {
                n2 += (double(got[i]) - st[i]) * (double(got[i]) - st[i]);
                d2 += double(st[i]) * st[i];
            }
            EXPECT_LE(std::sqrt(n2 / d2), 1e-2) << "fused vs staged FP8";
        }
    }
}

}  // namespace
}  // namespace switchyard
