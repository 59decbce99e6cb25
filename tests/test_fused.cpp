// tests/test_fused.cpp: the fused small-batch stages (stages.h: route_fused, experts_fused) on the CPU backend, their
// validation, and MoELayer's choice of path.
//
// On the CPU the fused stages are the chains they stand for (the specification the CUDA kernels are tested against in
// tests/gpu_test_fused.cpp), so the layer built from them must equal MoELayer::forward bitwise for every routing option
// (capacity drops, expert choice, shared experts with and without their gate).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "switchyard/moe_layer.h"
#include "switchyard/stages.h"
#include "io/quantize.h"
#include "test_util.h"

namespace switchyard {
namespace {

MoEConfig base_config() {
    MoEConfig c;
    c.hidden_size = 24;
    c.ffn_size = 16;
    c.num_experts = 8;
    c.top_k = 2;
    c.dtype = DType::kF32;
    return c;
}

// The layer through the fused stages (route_fused where it applies, else the routing stages).
void fused_forward(const MoEConfig& c, const MoEWeights& w, const test::HostTensor& x, test::HostTensor& y) {
    const int64_t T = x.ref().shape[0], E = c.num_experts, slots = c.route_slots();
    const int64_t R = c.expert_choice() ? E * c.expert_choice_capacity(T) : T * c.top_k;
    test::HostTensor logits(DType::kF32, {T, E}), ids(DType::kI32, {T, slots}), wt(DType::kF32, {T, slots});
    test::HostTensor sg(DType::kF32, {T, 1});
    test::PlanTensors pt(E, T, slots, R);
    const RoutingPlan& plan = pt.plan;
    const bool gated = c.shared_expert_gate && c.shared_width() > 0;
    if (!c.expert_choice() && c.capacity_factor == 0.0) {
        route_fused(c, x.ref(), w.gate, w.score_bias, gated ? w.shared_gate : TensorRef(), logits.ref(), ids.ref(),
                    wt.ref(), plan, gated ? sg.ref() : TensorRef(), nullptr, 0);
    } else {
        router_gemm(x.ref(), w.gate, logits.ref(), nullptr, 0);
        if (c.expert_choice()) {
            route_expert_choice(c, logits.ref(), ids.ref(), wt.ref(), plan, nullptr, 0);
        } else {
            route(c, logits.ref(), w.score_bias, ids.ref(), wt.ref());
            build_plan(c, ids.ref(), wt.ref(), plan, nullptr, 0);
        }
        if (gated) router_gemm(x.ref(), w.shared_gate, sg.ref(), nullptr, 0);
    }
    experts_fused(c, x.ref(), w, plan, wt.ref(), gated ? sg.ref() : TensorRef(), y.ref(), nullptr, 0);
}

struct Variant {
    const char* name;
    void (*apply)(MoEConfig&);
};

const Variant kVariants[] = {
    {"softmax", [](MoEConfig&) {}},
    {"sigmoid_bias_groups",
     [](MoEConfig& c) {
         c.score_function = ScoreFunction::kSigmoid;
         c.use_score_bias = true;
         c.num_groups = 4;
         c.topk_groups = 2;
         c.routed_scale = 2.5;
     }},
    {"topk_softmax_geglu",
     [](MoEConfig& c) {
         c.score_function = ScoreFunction::kTopkSoftmax;
         c.activation = Activation::kGeGLU;
     }},
    {"capacity_position",
     [](MoEConfig& c) {
         c.capacity_factor = 1.0;
         c.activation = Activation::kGELU;
     }},
    {"capacity_probability",
     [](MoEConfig& c) {
         c.capacity_factor = 0.5;
         c.drop_policy = DropPolicy::kProbability;
         c.activation = Activation::kReLU;
     }},
    {"expert_choice",
     [](MoEConfig& c) {
         c.routing_mode = RoutingMode::kExpertChoice;
         c.num_shared_experts = 1;
         c.shared_ffn_size = 12;
     }},
    {"shared", [](MoEConfig& c) {
         c.num_shared_experts = 2;
         c.shared_ffn_size = 8;
     }},
    {"gated_shared", [](MoEConfig& c) {
         c.num_shared_experts = 1;
         c.shared_ffn_size = 20;
         c.shared_expert_gate = true;
     }},
    // The fused stages on w13 interleaved (interleave_gate_up) against the layer on the plain w13.
    {"interleaved", [](MoEConfig& c) { c.gate_up_interleaved = true; }},
    {"interleaved_geglu_shared", [](MoEConfig& c) {
         c.gate_up_interleaved = true;
         c.activation = Activation::kGeGLU;
         c.num_shared_experts = 1;
         c.shared_ffn_size = 8;
     }},
};

TEST(FusedStages, EqualTheLayerBitwiseOnTheCpu) {
    for (const Variant& v : kVariants) {
        for (DType dt : {DType::kF32, DType::kBF16}) {
            for (int64_t T : {1, 3, 16, 33}) {
                const uint64_t seed = 700 + static_cast<uint64_t>(T);
                SCOPED_TRACE(std::string(v.name) + " " + to_string(dt) + " T=" + std::to_string(T) + " " +
                             test::seed_trace(seed));
                MoEConfig c = base_config();
                v.apply(c);
                c.dtype = dt;
                const test::HostLayer L = test::random_layer(c, seed, dt);
                const int64_t H = c.hidden_size;
                const test::HostTensor x = test::HostTensor::from_floats(test::random_uniform(T * H, seed + 1), dt, {T, H});
                test::HostTensor y_layer(dt, {T, H}), y_fused(dt, {T, H});
                MoEConfig plain = c;
                plain.gate_up_interleaved = false;
                const MoELayer layer(plain, L.weights());
                EXPECT_FALSE(layer.uses_fused_path(T)) << "the CPU backend always runs the staged chain";
                layer.forward(x.ref(), y_layer.ref());
                test::HostTensor w13i(dt, L.w13.shape());
                MoEWeights fw = L.weights();
                if (c.gate_up_interleaved) {
                    interleave_gate_up(L.w13.ref(), w13i.ref());
                    fw.w13 = w13i.ref();
                }
                fused_forward(c, fw, x, y_fused);
                EXPECT_EQ(std::memcmp(y_layer.data(), y_fused.data(), static_cast<size_t>(T * H) * dtype_size(dt)), 0)
                    << "y differs";
            }
        }
    }
}

TEST(FusedStages, RouteFusedRefusesWhatItDoesNotDo) {
    MoEConfig c = base_config();
    const test::HostLayer L = test::random_layer(c, 1);
    const int64_t T = 4, E = c.num_experts, H = c.hidden_size;
    const test::HostTensor x = test::HostTensor::from_floats(test::random_uniform(T * H, 2), DType::kF32, {T, H});
    test::HostTensor logits(DType::kF32, {T, E}), ids(DType::kI32, {T, 2}), wt(DType::kF32, {T, 2});
    test::PlanTensors pt(E, T, 2, T * 2);
    const RoutingPlan& plan = pt.plan;
    auto call = [&](const MoEConfig& cfg) {
        route_fused(cfg, x.ref(), L.gate.ref(), TensorRef(), TensorRef(), logits.ref(), ids.ref(), wt.ref(), plan,
                    TensorRef(), nullptr, 0);
    };
    EXPECT_NO_THROW(call(c));
    MoEConfig cap = c;
    cap.capacity_factor = 1.0;
    test::expect_error([&] { call(cap); }, {"token choice without capacity"});
    MoEConfig ec = c;
    ec.routing_mode = RoutingMode::kExpertChoice;
    test::expect_error([&] { call(ec); }, {"token choice without capacity"});
    // shared_gate and its logits go together
    test::HostTensor sg(DType::kF32, {T, 1});
    test::expect_error(
        [&] {
            route_fused(c, x.ref(), L.gate.ref(), TensorRef(), TensorRef(), logits.ref(), ids.ref(), wt.ref(), plan,
                        sg.ref(), nullptr, 0);
        },
        {"go together"});
    // a plan of the wrong size
    test::HostTensor short_rows(DType::kI32, {T});
    RoutingPlan bad = plan;
    bad.row_token = short_rows.ref();
    test::expect_error(
        [&] {
            route_fused(c, x.ref(), L.gate.ref(), TensorRef(), TensorRef(), logits.ref(), ids.ref(), wt.ref(), bad,
                        TensorRef(), nullptr, 0);
        },
        {"plan.row_token"});
}

TEST(FusedStages, ExpertsFusedValidatesItsArguments) {
    MoEConfig c = base_config();
    c.num_shared_experts = 1;
    c.shared_ffn_size = 8;
    const test::HostLayer L = test::random_layer(c, 3);
    const int64_t T = 2, E = c.num_experts, H = c.hidden_size;
    const test::HostTensor x = test::HostTensor::from_floats(test::random_uniform(T * H, 4), DType::kF32, {T, H});
    test::HostTensor wt(DType::kF32, {T, 2}), y(DType::kF32, {T, H});
    test::PlanTensors pt(E, T, 2, T * 2);
    const RoutingPlan& plan = pt.plan;
    MoEWeights half = L.weights();
    half.shared_w2 = TensorRef();
    test::expect_error([&] { experts_fused(c, x.ref(), half, plan, wt.ref(), TensorRef(), y.ref(), nullptr, 0); },
                       {"shared_w13 and shared_w2 go together"});
    MoEWeights swapped = L.weights();
    swapped.w13 = L.w2.ref();
    test::expect_error([&] { experts_fused(c, x.ref(), swapped, plan, wt.ref(), TensorRef(), y.ref(), nullptr, 0); },
                       {"w13"});
}

// The automatic choice (stages.h: fused_path_preferred): the bytes of the experts a batch can hit against the
// measured threshold, at the three model shapes (bf16 unless named) and the boundary itself.
TEST(FusedStages, AutomaticChoiceFollowsTheMeasuredThreshold) {
    auto shape = [](int64_t H, int64_t F, int64_t E, int64_t k, int64_t S) {
        MoEConfig c;
        c.hidden_size = H, c.ffn_size = F, c.num_experts = E, c.top_k = k;
        c.num_shared_experts = S > 0 ? 1 : 0, c.shared_ffn_size = S;
        c.dtype = DType::kBF16;
        return c;
    };
    const MoEConfig qwen3 = shape(2048, 768, 128, 8, 0), mixtral = shape(4096, 14336, 8, 2, 0),
                    deepseek = shape(7168, 2048, 256, 8, 2048);
    // Qwen3: 9.4 MB per expert: 8 experts (75 MB) at T = 1 and 16 (151 MB) at T = 2 are under 160 MiB, 32 are not.
    EXPECT_TRUE(fused_path_preferred(qwen3, Device::kCUDA, 1));
    EXPECT_TRUE(fused_path_preferred(qwen3, Device::kCUDA, 2));
    EXPECT_FALSE(fused_path_preferred(qwen3, Device::kCUDA, 4));
    EXPECT_FALSE(fused_path_preferred(qwen3, Device::kCPU, 1));
    for (int64_t T : {1, 2, 16, 64}) {
        EXPECT_FALSE(fused_path_preferred(mixtral, Device::kCUDA, T)) << T;
        EXPECT_FALSE(fused_path_preferred(deepseek, Device::kCUDA, T)) << T;
    }
    EXPECT_FALSE(fused_path_preferred(qwen3, Device::kCUDA, fused_path_max_tokens() + 1));  // never past the limit
    // FP8 weights are one byte and the threshold is 512 MiB (the staged FP8 chain has two more kernels): Qwen3 up to
    // T = 8 (64 experts, 302 MB), not T = 16 (all 128, 604 MB); Mixtral and DeepSeek-V3 (with its shared expert) at
    // T = 1 (352 / 396 MB), not T = 2 (704 / 748 MB).
    auto fp8 = [](MoEConfig c) {
        c.quant_mode = QuantMode::kFP8Block;
        return c;
    };
    EXPECT_TRUE(fused_path_preferred(fp8(qwen3), Device::kCUDA, 8));
    EXPECT_FALSE(fused_path_preferred(fp8(qwen3), Device::kCUDA, 16));
    EXPECT_TRUE(fused_path_preferred(fp8(mixtral), Device::kCUDA, 1));
    EXPECT_FALSE(fused_path_preferred(fp8(mixtral), Device::kCUDA, 2));
    EXPECT_TRUE(fused_path_preferred(fp8(deepseek), Device::kCUDA, 1));
    EXPECT_FALSE(fused_path_preferred(fp8(deepseek), Device::kCUDA, 2));
    // At the boundary: the most 6 MiB experts that fit under the threshold are taken, one token (two experts) more is
    // not.
    MoEConfig edge = shape(1024, 1024, 16, 2, 0);  // gated: 3 * 1024 * 1024 * 2 bytes = 6 MiB per expert
    const int64_t per_expert = 3 * 1024 * 1024 * 2, fits = fused_path_auto_bytes(QuantMode::kNone) / per_expert;
    edge.num_experts = 64;
    EXPECT_TRUE(fused_path_preferred(edge, Device::kCUDA, fits / 2));   // min(T * 2, 64) = fits experts
    EXPECT_FALSE(fused_path_preferred(edge, Device::kCUDA, fits / 2 + 1));
    // Exactly at the threshold (it is inclusive), non-gated: ReLU, (F + F) * H * 2 bytes = 5 MiB per expert, top-1:
    // 32 tokens stream 160 MiB, 33 do not; with E = 32 the experts a batch can hit stop at 32, so 64 tokens still
    // qualify. A shared expert's bytes count too.
    MoEConfig relu = shape(1024, 1280, 64, 1, 0);
    relu.activation = Activation::kReLU;
    EXPECT_TRUE(fused_path_preferred(relu, Device::kCUDA, 32));
    EXPECT_FALSE(fused_path_preferred(relu, Device::kCUDA, 33));
    relu.num_experts = 32;
    EXPECT_TRUE(fused_path_preferred(relu, Device::kCUDA, 64));
    relu.num_shared_experts = 1, relu.shared_ffn_size = 16;  // + 32 * 1024 * 2 bytes
    EXPECT_FALSE(fused_path_preferred(relu, Device::kCUDA, 64));
}

TEST(FusedStages, LayerPathChoice) {
    MoEConfig c = base_config();
    const test::HostLayer L = test::random_layer(c, 5);
    MoELayer layer(c, L.weights());
    EXPECT_EQ(layer.fused_max_tokens(), -1);  // automatic by default
    layer.set_fused_max_tokens(0);
    EXPECT_EQ(layer.fused_max_tokens(), 0);
    layer.set_fused_max_tokens(-1);
    EXPECT_FALSE(layer.uses_fused_path(1));  // the CPU backend
    test::expect_error([&] { layer.set_fused_max_tokens(fused_path_max_tokens() + 1); }, {"fused_max_tokens"});
    test::expect_error([&] { layer.set_fused_max_tokens(-2); }, {"fused_max_tokens"});
    // The rules of the CUDA kernels (no device needed to ask).
    MoEConfig b = c;
    b.dtype = DType::kBF16;
    b.hidden_size = 64;
    b.ffn_size = 32;
    EXPECT_TRUE(fused_path_supported(b, Device::kCUDA, 1));
    EXPECT_FALSE(fused_path_preferred(b, Device::kCPU, 1));
    EXPECT_TRUE(fused_path_supported(b, Device::kCUDA, fused_path_max_tokens()));
    EXPECT_FALSE(fused_path_supported(b, Device::kCUDA, 0));
    EXPECT_FALSE(fused_path_supported(b, Device::kCUDA, fused_path_max_tokens() + 1));
    EXPECT_FALSE(fused_path_supported(b, Device::kCPU, 1));
    MoEConfig f32 = b;
    f32.dtype = DType::kF32;
    EXPECT_FALSE(fused_path_supported(f32, Device::kCUDA, 1));
    MoEConfig odd = b;
    odd.ffn_size = 36;
    EXPECT_FALSE(fused_path_supported(odd, Device::kCUDA, 1));
    MoEConfig fp8 = b;  // FP8 layers: sizes multiple of 16 (16 fp8 bytes per row granule)
    fp8.quant_mode = QuantMode::kFP8Block;
    EXPECT_TRUE(fused_path_supported(fp8, Device::kCUDA, 1));
    fp8.ffn_size = 40;
    EXPECT_FALSE(fused_path_supported(fp8, Device::kCUDA, 1));
}

// FP8 experts (W8A8, fp8-block and fp8-tensor; routed and shared): the fused stages take the same grouped_gemm_fp8
// chain as MoELayer, bitwise.
struct Fp8Layer {
    std::vector<std::vector<uint8_t>> codes;
    std::vector<std::vector<float>> scales;
    MoEWeights w;
};

// Quantises float matrix [groups, rows, cols] (fp32 host tensor) into codes + scales in `mode` (the quantize
// command's rules, tools/switchyard/io/quantize.h).
void quantize_into(Fp8Layer& L, const test::HostTensor& m, int64_t groups, int64_t rows, int64_t cols, QuantMode mode,
                   TensorRef& codes_ref, TensorRef& scale_ref) {
    const float* src = m.ptr<float>();
    L.codes.emplace_back(static_cast<size_t>(groups * rows * cols) + 1);
    const int64_t rb = fp8_blocks(rows), cb = fp8_blocks(cols);
    L.scales.emplace_back(static_cast<size_t>(mode == QuantMode::kFP8Block ? groups * rb * cb : groups) + 1);
    std::vector<uint8_t>& c = L.codes.back();
    std::vector<float>& sc = L.scales.back();
    for (int64_t g = 0; g < groups; ++g) {
        const float* wg = src + g * rows * cols;
        if (mode == QuantMode::kFP8Block) {
            io::quantize_fp8_block(wg, rows, cols, c.data() + g * rows * cols, sc.data() + g * rb * cb);
        } else {
            float amax = 0.0f;
            for (int64_t i = 0; i < rows * cols; ++i) amax = std::max(amax, std::fabs(wg[i]));
            sc[g] = io::fp8_scale_for_amax(amax);
            io::quantize_fp8_with_scale(wg, rows * cols, sc[g], c.data() + g * rows * cols);
        }
    }
    const bool stacked = m.ref().rank == 3;
    codes_ref = stacked ? TensorRef(c.data(), DType::kF8E4M3, {groups, rows, cols})
                        : TensorRef(c.data(), DType::kF8E4M3, {rows, cols});
    if (mode == QuantMode::kFP8Block)
        scale_ref = stacked ? TensorRef(sc.data(), DType::kF32, {groups, rb, cb}) : TensorRef(sc.data(), DType::kF32, {rb, cb});
    else
        scale_ref = TensorRef(sc.data(), DType::kF32, {stacked ? groups : 1});
}

TEST(FusedStages, Fp8ExpertsEqualTheLayerBitwiseOnTheCpu) {
    for (QuantMode mode : {QuantMode::kFP8Block, QuantMode::kFP8Tensor}) {
        for (int64_t T : {1, 5, 33}) {
            const uint64_t seed = 900 + static_cast<uint64_t>(T);
            SCOPED_TRACE(std::string(to_string(mode)) + " T=" + std::to_string(T) + " " + test::seed_trace(seed));
            MoEConfig c = base_config();
            c.hidden_size = 160;  // partial 128-blocks in both directions
            c.ffn_size = 144;
            c.num_shared_experts = 1;
            c.shared_ffn_size = 48;
            c.dtype = DType::kBF16;
            const test::HostLayer F = test::random_layer(c, seed, DType::kF32);
            c.quant_mode = mode;
            Fp8Layer L;
            L.w = F.weights();
            test::HostTensor gate_bf16 = test::HostTensor::from_floats(  // the router in the layer dtype
                std::vector<float>(F.gate.ptr<float>(), F.gate.ptr<float>() + F.gate.numel()), DType::kBF16,
                {c.num_experts, c.hidden_size});
            L.w.gate = gate_bf16.ref();
            const int64_t E = c.num_experts, H = c.hidden_size;
            quantize_into(L, F.w13, E, c.w13_rows(), H, mode, L.w.w13, L.w.w13_scale);
            quantize_into(L, F.w2, E, H, c.ffn_size, mode, L.w.w2, L.w.w2_scale);
            quantize_into(L, F.shared_w13, 1, 2 * c.shared_width(), H, mode, L.w.shared_w13, L.w.shared_w13_scale);
            quantize_into(L, F.shared_w2, 1, H, c.shared_width(), mode, L.w.shared_w2, L.w.shared_w2_scale);
            const test::HostTensor x =
                test::HostTensor::from_floats(test::random_uniform(T * H, seed + 1), DType::kBF16, {T, H});
            test::HostTensor y_layer(DType::kBF16, {T, H}), y_fused(DType::kBF16, {T, H});
            MoELayer(c, L.w).forward(x.ref(), y_layer.ref());
            fused_forward(c, L.w, x, y_fused);
            EXPECT_EQ(std::memcmp(y_layer.data(), y_fused.data(), static_cast<size_t>(T * H) * 2), 0) << "y differs";
        }
    }
}

}  // namespace
}  // namespace switchyard
