// src/api/moe_layer.cpp: MoELayer, the whole forward as one chain of the public stages (switchyard/stages.h).
//
// The constructor checks the config and every weight (shape, dtype, device, contiguity); forward() checks the
// activations, the optional outputs and the workspace, then runs the stages on the layer's device, the same code for
// the CPU backend (the specification) and the CUDA backend:
//   router      logits [T, E] fp32 = router_gemm(x, gate); ids / weights [T, k] = route (or, under expert choice,
//               route_expert_choice: ids / weights / slot_row [T, E] and the plan in one go)
//   plan        build_plan: counts, offsets, slot_row, row_token, row_slot
//   dispatch    xp [R, H] = gather(x, row_token)                       R = T*k (E*C under expert choice)
//               (with the gated GEMM1: no xp, GEMM1 reads x's rows through row_token; set_gather_in_gemm1)
//   gemm1       g1 [R, R13] = grouped_gemm(xp, w13, offsets)  (fp8 weights: grouped_gemm_fp8 with their scales)
//   activation  h [R, F] = act(g1), rows past offsets[E] skipped  (MoEConfig::gate_up_interleaved on a backend with
//               the kernel: gemm1 + activation are grouped_gemm_gated, no g1)
//   gemm2       out [R, H] = grouped_gemm(h, w2, offsets)       (xp, g1, h and out share one region: ForwardLayout)
//   shared      the shared expert on all T rows: grouped_gemm(x, shared_w13) -> activation -> grouped_gemm(., shared_w2)
//               (gated: + router_gemm(x, shared_gate) -> gate logits [T, 1])
//   combine     y = combine(out, slot_row, weights, shared, gate)
//   stats       load_stats (host statistics; synchronises on CUDA), only when asked for
// Small batches on CUDA (uses_fused_path: T <= fused_max_tokens, fused_path_supported) take the fused path instead:
//   route_fused (router GEMM, scoring, top-k, dropless plan; with capacity or expert choice the routing stages
//   above) -> experts_fused (gather .. combine, shared expert included): four kernels for the layer.
// The workspace layout (ForwardLayout) is computed once, here, for sizing, for the forward and for the profiler
// (workspace_layout()).
#include "switchyard/moe_layer.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "api/check.h"
#include "api/expert_chain.h"
#include "switchyard/error.h"
#include "switchyard/stages.h"
#include "util/workspace.h"

#ifdef SWITCHYARD_WITH_CUDA
#include "cuda/stages_cuda.h"
#endif

namespace switchyard {
namespace {


// Rows of expert work reserved in the plan: T*k, or E*C under expert choice.
int64_t expert_rows(const MoEConfig& cfg, int64_t num_tokens) {
    return cfg.expert_choice() ? cfg.num_experts * cfg.expert_choice_capacity(num_tokens) : num_tokens * cfg.top_k;
}

// Every buffer of a forward, as named slices of one workspace. `recorder`, when given, receives the slices.
struct ForwardLayout {
    float* logits;            // [T, E]
    int32_t* topk_ids;        // [T, slots]
    float* topk_weights;      // [T, slots]
    int32_t* expert_counts;   // [E]
    int32_t* expert_offsets;  // [E+1]
    int32_t* slot_row;        // [T, slots]
    int32_t* row_token;       // [R]
    int32_t* row_slot;        // [R]
    void* plan_ws;            // plan_workspace_size / route_expert_choice_workspace_size
    size_t plan_ws_bytes;
    void* xp;                 // [R, H]: gathered x          } four views of one region, "expert_rows", placed
    void* g1;                 // [R, R13] (null: gated GEMM1) } so that each stage's inputs and outputs are disjoint
    void* h;                  // [R, F]                       } and the region is as small as the chain allows
    void* expert_out;         // [R, H]                       } (expert_rows_layout)
    void* shared_g1;          // [T, R13s]
    void* shared_h;           // [T, S]
    void* shared_out;         // [T, H]
    float* shared_gate;       // [T, 1] fp32 gate logits of the gated shared expert
    void* gemm_ws;            // the largest of the four grouped GEMMs' workspaces (one GEMM at a time)
    size_t gemm_ws_bytes;
    void* router_ws;          // router_gemm_workspace_size
    size_t router_ws_bytes;
    void* stats_ws;           // load_stats_workspace_size: reuses the expert rows when it fits (dead by then)
    size_t stats_ws_bytes;
    void* fused_ws;           // route_fused / experts_fused scratch (the fused path only): aliases expert_rows when it fits
    size_t fused_ws_bytes;
    size_t bytes;             // the whole workspace (aliased slices counted once)
};

ForwardLayout forward_layout(const MoEConfig& cfg, Device dev, int64_t num_tokens, bool fused, void* base,
                             size_t capacity, std::vector<WorkspaceSlice>* recorder = nullptr) {
    WorkspaceCarver wc(base, capacity);
    auto take = [&](const char* name, size_t bytes) {
        const size_t at = wc.used();
        void* p = wc.take_bytes(bytes);
        if (recorder != nullptr) recorder->push_back({name, at, align_up(bytes), ""});
        return p;
    };
    const int64_t T = num_tokens, E = cfg.num_experts, H = cfg.hidden_size;
    const int64_t slots = T * cfg.route_slots(), rows = expert_rows(cfg, T);
    const size_t es = dtype_size(cfg.dtype), i4 = sizeof(int32_t);
    ForwardLayout l{};
    l.logits = static_cast<float*>(take("logits", sizeof(float) * T * E));
    l.topk_ids = static_cast<int32_t*>(take("topk_ids", i4 * slots));
    l.topk_weights = static_cast<float*>(take("topk_weights", sizeof(float) * slots));
    l.expert_counts = static_cast<int32_t*>(take("expert_counts", i4 * E));
    l.expert_offsets = static_cast<int32_t*>(take("expert_offsets", i4 * (E + 1)));
    l.slot_row = static_cast<int32_t*>(take("slot_row", i4 * slots));
    l.row_token = static_cast<int32_t*>(take("row_token", i4 * rows));
    l.row_slot = static_cast<int32_t*>(take("row_slot", i4 * rows));
    l.plan_ws_bytes = cfg.expert_choice() ? route_expert_choice_workspace_size(cfg, dev, T)
                                          : plan_workspace_size(cfg, dev, T);
    l.plan_ws = take("plan_scratch", l.plan_ws_bytes);
    // The expert rows: xp, g1, h and the expert outputs in one region. Each stage reads and writes disjoint views
    // while what is dead by then is overwritten, so the region holds only what a stage-by-stage allocator would:
    //   gated GEMM1 (api::uses_gated_gemm1: no g1)  xp [0, X), h [X, X+Hb), expert_out [0, X)     size X + Hb
    //   otherwise  xp [0, X), g1 [S-G, S), h [0, Hb) (xp dead), expert_out [Hb, Hb+X) (g1 dead),
    //              S = max(X + G, Hb + G, Hb + X)
    // (X, G, Hb: the aligned bytes of xp / expert_out, g1, h.)
    const size_t xb = align_up(rows * H * es), hb = align_up(rows * cfg.ffn_size * es);
    const size_t gb = api::uses_gated_gemm1(cfg, dev) ? 0 : align_up(rows * cfg.w13_rows() * es);
    const size_t region_bytes = gb == 0 ? xb + hb : std::max({xb + gb, hb + gb, hb + xb});
    const size_t region_offset = wc.used();
    char* region = static_cast<char*>(take("expert_rows", region_bytes));
    auto sub_slice = [&](const char* name, size_t at, size_t bytes) {
        if (recorder != nullptr && bytes > 0) recorder->push_back({name, region_offset + at, bytes, "expert_rows"});
        return region == nullptr ? nullptr : static_cast<void*>(region + at);  // null while sizing or when empty
    };
    l.xp = sub_slice("xp", 0, xb);
    if (gb == 0) {
        l.g1 = nullptr;
        l.h = sub_slice("h", xb, hb);
        l.expert_out = sub_slice("expert_out", 0, xb);
    } else {
        l.g1 = sub_slice("g1", region_bytes - gb, gb);
        l.h = sub_slice("h", 0, hb);
        l.expert_out = sub_slice("expert_out", hb, xb);
    }
    if (cfg.has_shared_expert()) {
        const int64_t s = cfg.shared_width();
        l.shared_g1 = take("shared_g1", T * cfg.shared_w13_rows() * es);
        l.shared_h = take("shared_h", T * s * es);
        l.shared_out = take("shared_out", T * H * es);
        if (cfg.shared_expert_gate) l.shared_gate = static_cast<float*>(take("shared_gate", sizeof(float) * T));
    }
    l.gemm_ws_bytes = api::expert_chain_workspace_size(cfg, dev, E, rows, T);  // one GEMM at a time
    l.gemm_ws = take("gemm_scratch", l.gemm_ws_bytes);
    l.router_ws_bytes = router_gemm_workspace_size(dev);
    l.router_ws = take("router_scratch", l.router_ws_bytes);
    l.stats_ws_bytes = load_stats_workspace_size(cfg, dev, T);
    if (l.stats_ws_bytes <= region_bytes) {  // the statistics run after the combine: the expert rows are dead
        l.stats_ws = region;
        if (recorder != nullptr && l.stats_ws_bytes > 0)
            recorder->push_back({"stats_scratch", region_offset, align_up(l.stats_ws_bytes), "expert_rows"});
    } else {
        l.stats_ws = take("stats_scratch", l.stats_ws_bytes);
    }
    // The fused path's scratch (route_fused's partial logits, then experts_fused's h and shared_h) in the memory of
    // the expert rows, which that path never touches, when it fits there.
    if (fused) {
        l.fused_ws_bytes = std::max(route_fused_workspace_size(cfg, dev, T), experts_fused_workspace_size(cfg, dev, T));
        if (l.fused_ws_bytes <= region_bytes) {
            l.fused_ws = region;
            if (recorder != nullptr && l.fused_ws_bytes > 0)
                recorder->push_back({"fused_scratch", region_offset, align_up(l.fused_ws_bytes), "expert_rows"});
        } else {
            l.fused_ws = take("fused_scratch", l.fused_ws_bytes);
        }
    }
    l.bytes = wc.used();
    return l;
}

// The constructor's FP8 weight checks read codes and scales on the host; CUDA weights are scanned on the device
// (one kernel and one synchronisation per matrix) and their scales copied to the host, once, at construction.
// The index of the first e4m3 NaN code (0x7f / 0xff) of t, or -1; *code receives it.
int64_t first_fp8_nan_code(const TensorRef& t, int* code) {
    if (t.device == Device::kCPU) {
        const uint8_t* codes = t.ptr<uint8_t>();
        for (int64_t i = 0; i < t.numel(); ++i)
            if ((codes[i] & 0x7fu) == 0x7fu) {
                *code = codes[i];
                return i;
            }
        return -1;
    }
#ifdef SWITCHYARD_WITH_CUDA
    const int64_t i = cuda::stage::fp8_first_nan_code(t);
    if (i >= 0) {
        uint8_t byte = 0;
        cuda::stage::copy_bytes_to_host(t, i, 1, &byte);
        *code = byte;
    }
    return i;
#else
    SWITCHYARD_FAIL("this build has no CUDA backend (built without CUDA)");
#endif
}

// An fp32 tensor's values on the host.
std::vector<float> host_f32(const TensorRef& t) {
    if (t.device == Device::kCPU) return std::vector<float>(t.ptr<float>(), t.ptr<float>() + t.numel());
#ifdef SWITCHYARD_WITH_CUDA
    return cuda::stage::copy_f32_to_host(t);
#else
    SWITCHYARD_FAIL("this build has no CUDA backend (built without CUDA)");
#endif
}

// A contiguous view of part of the forward's workspace, on the device of `like`.
TensorRef view(void* p, DType t, std::initializer_list<int64_t> dims, const TensorRef& like) {
    return TensorRef(p, t, dims, like.device, like.device_index);
}

// A defined caller output, else the workspace slice.
TensorRef either(const ForwardOutputs* out, const TensorRef ForwardOutputs::*field, const TensorRef& fallback) {
    return (out != nullptr && (out->*field).defined()) ? out->*field : fallback;
}

void check_output(const TensorRef& t, DType dtype, int64_t d0, int64_t d1, const char* name, Device dev) {
    api::check_tensor(t, name, dtype, {d0, d1});
    SWITCHYARD_CHECK(t.device == dev, name, " is on ", to_string(t.device), ", expected ", to_string(dev));
}

}  // namespace

void validate_activation(const MoEConfig& cfg, const TensorRef& x, const char* name, Device dev) {
    SWITCHYARD_CHECK(x.rank == 2, name, " rank=", x.rank, " shape=", x.shape_string(), ", expected [T, ",
                     cfg.hidden_size, "]");
    SWITCHYARD_CHECK(x.shape[1] == cfg.hidden_size, name, " shape=", x.shape_string(),
                     ", expected [T, hidden_size=", cfg.hidden_size, "]");
    SWITCHYARD_CHECK(x.dtype == cfg.dtype, name, " dtype=", to_string(x.dtype), ", expected the layer dtype ",
                     to_string(cfg.dtype));
    api::check_tensor(x, name, {x.shape[0], cfg.hidden_size});
    SWITCHYARD_CHECK(x.device == dev, name, " is on ", to_string(x.device), ", expected ", to_string(dev));
}

MoELayer::MoELayer(const MoEConfig& cfg, const MoEWeights& weights) : cfg_(cfg), w_(weights) {
    cfg_.validate();
    const int64_t hidden = cfg_.hidden_size, ffn = cfg_.ffn_size, num_experts = cfg_.num_experts;
    SWITCHYARD_CHECK(w_.w13.defined(), "w13 is required but undefined");
    const Device dev = w_.w13.device;
    const int dev_idx = w_.w13.device_index;
    api::check_backend(dev, "MoELayer weights");
    SWITCHYARD_CHECK(dev == Device::kCPU || cfg_.dtype != DType::kF64, "dtype=fp64 runs on the cpu only");
    // A weight: defined, float dtype, the given shape, contiguous, on the layer's device. On CUDA every weight has
    // the layer dtype (the GEMMs take one element type); the CPU reads weights of any float dtype.
    auto check_weight = [&](const TensorRef& t, std::initializer_list<int64_t> dims, const char* name) {
        api::check_float_tensor(t, name, dims);
        api::check_device(t, name, dev, dev_idx);
        SWITCHYARD_CHECK(t.dtype != DType::kF64 || dev == Device::kCPU, name, " dtype=fp64 runs on the cpu only");
        if (dev == Device::kCUDA)
            SWITCHYARD_CHECK(t.dtype == cfg_.dtype, "CUDA backend: ", name, " dtype=", to_string(t.dtype),
                             " must equal the layer dtype ", to_string(cfg_.dtype),
                             " (weights of another dtype are not supported on CUDA yet)");
    };
    const bool quantised = cfg_.quant_mode != QuantMode::kNone;
    // An expert matrix: fp8e4m3 (quantised layers) with its scales, else a float weight without any.
    auto check_matrix = [&](const TensorRef& t, std::initializer_list<int64_t> dims, const char* name,
                            const TensorRef& scale, const char* scale_name, const TensorRef& input_scale,
                            const char* input_scale_name, int64_t num_groups /* 0: a shared matrix */) {
        if (!t.defined() || t.dtype != DType::kF8E4M3) {
            check_weight(t, dims, name);
            SWITCHYARD_CHECK(!scale.defined(), scale_name, " ", scale.shape_string(), " given but ", name, " is ",
                             to_string(t.dtype), ", not fp8e4m3");
            SWITCHYARD_CHECK(!input_scale.defined(), input_scale_name, " ", input_scale.shape_string(), " given but ",
                             name, " is ", to_string(t.dtype), ", not fp8e4m3");
            return;
        }
        SWITCHYARD_CHECK(quantised, name, " dtype=fp8e4m3 needs quant_mode=fp8-block or fp8-tensor (quant_mode=none)");
        api::check_tensor(t, name, DType::kF8E4M3, dims);
        api::check_device(t, name, dev, dev_idx);
        int nan_code = 0;
        const int64_t nan_at = first_fp8_nan_code(t, &nan_code);
        SWITCHYARD_CHECK(nan_at < 0, name, " holds an fp8 NaN code (", nan_code, ") at element ", nan_at);
        const int64_t rows = *(dims.end() - 2), cols = *(dims.end() - 1);
#ifdef SWITCHYARD_WITH_CUDA
        // The CUDA FP8 GEMM's limits (16-byte TMA rows: K % 16, N aligned for the layer dtype), named here rather
        // than at the first forward.
        if (dev == Device::kCUDA) cuda::stage::check_fp8_gemm_shape(name, cfg_.dtype, rows, cols);
#endif
        SWITCHYARD_CHECK(scale.defined(), scale_name, " is required: ", name, " is fp8e4m3 (quant_mode=",
                         to_string(cfg_.quant_mode), ")");
        if (cfg_.quant_mode == QuantMode::kFP8Block) {
            if (num_groups > 0)
                api::check_tensor(scale, scale_name, DType::kF32, {num_groups, fp8_blocks(rows), fp8_blocks(cols)});
            else
                api::check_tensor(scale, scale_name, DType::kF32, {fp8_blocks(rows), fp8_blocks(cols)});
            SWITCHYARD_CHECK(!input_scale.defined(), input_scale_name, " ", input_scale.shape_string(),
                             " given: static input scales are a fp8-tensor option (quant_mode=fp8-block quantises "
                             "activations dynamically)");
        } else {
            api::check_tensor(scale, scale_name, DType::kF32, {num_groups > 0 ? num_groups : 1});
        }
        api::check_device(scale, scale_name, dev, dev_idx);
        const std::vector<float> sv = host_f32(scale);
        for (int64_t i = 0; i < scale.numel(); ++i)
            SWITCHYARD_CHECK(std::isfinite(sv[i]), scale_name, "[", i, "]=", sv[i], " is not finite");
        if (input_scale.defined()) {
            api::check_tensor(input_scale, input_scale_name, DType::kF32, {num_groups > 0 ? num_groups : 1});
            api::check_device(input_scale, input_scale_name, dev, dev_idx);
            const std::vector<float> iv = host_f32(input_scale);
            for (int64_t i = 0; i < input_scale.numel(); ++i)
                SWITCHYARD_CHECK(std::isfinite(iv[i]) && iv[i] > 0.0f, input_scale_name, "[", i, "]=", iv[i],
                                 " must be finite and positive");
        }
    };
    check_weight(w_.gate, {num_experts, hidden}, "gate");
    if (quantised) {
        for (const auto& m : {std::make_pair(&w_.w13, "w13"), std::make_pair(&w_.w2, "w2")})
            SWITCHYARD_CHECK(!m.first->defined() || m.first->dtype == DType::kF8E4M3, "quant_mode=",
                             to_string(cfg_.quant_mode), ": ", m.second, " dtype=", to_string(m.first->dtype),
                             ", expected fp8e4m3");
    }
    check_matrix(w_.w13, {num_experts, cfg_.w13_rows(), hidden}, "w13", w_.w13_scale, "w13_scale", w_.w13_input_scale,
                 "w13_input_scale", num_experts);
    check_matrix(w_.w2, {num_experts, hidden, ffn}, "w2", w_.w2_scale, "w2_scale", w_.w2_input_scale,
                 "w2_input_scale", num_experts);
    if (cfg_.use_score_bias) {
        SWITCHYARD_CHECK(w_.score_bias.defined(), "score_bias is required when use_score_bias=true");
        api::check_tensor(w_.score_bias, "score_bias", DType::kF32, {num_experts});
        api::check_device(w_.score_bias, "score_bias", dev, dev_idx);
    } else {
        SWITCHYARD_CHECK(!w_.score_bias.defined(), "score_bias ", w_.score_bias.shape_string(),
                         " given but use_score_bias=false");
    }
    if (cfg_.num_shared_experts > 0) {
        SWITCHYARD_CHECK(w_.shared_w13.defined(),
                         "shared_w13 is required when num_shared_experts=", cfg_.num_shared_experts);
        SWITCHYARD_CHECK(w_.shared_w2.defined(),
                         "shared_w2 is required when num_shared_experts=", cfg_.num_shared_experts);
        check_matrix(w_.shared_w13, {cfg_.shared_w13_rows(), hidden}, "shared_w13", w_.shared_w13_scale,
                     "shared_w13_scale", w_.shared_w13_input_scale, "shared_w13_input_scale", 0);
        check_matrix(w_.shared_w2, {hidden, cfg_.shared_width()}, "shared_w2", w_.shared_w2_scale, "shared_w2_scale",
                     w_.shared_w2_input_scale, "shared_w2_input_scale", 0);
        if (cfg_.shared_expert_gate) {
            SWITCHYARD_CHECK(w_.shared_gate.defined(), "shared_gate is required when shared_expert_gate=true");
            check_weight(w_.shared_gate, {1, hidden}, "shared_gate");
        }
    } else {
        SWITCHYARD_CHECK(!w_.shared_w13.defined(), "shared_w13 ", w_.shared_w13.shape_string(),
                         " given but num_shared_experts=0");
        SWITCHYARD_CHECK(!w_.shared_w2.defined(), "shared_w2 ", w_.shared_w2.shape_string(),
                         " given but num_shared_experts=0");
    }
    if (!cfg_.shared_expert_gate)
        SWITCHYARD_CHECK(!w_.shared_gate.defined(), "shared_gate ", w_.shared_gate.shape_string(),
                         " given but shared_expert_gate=false");
    if (cfg_.num_shared_experts == 0)
        for (const auto& m : {std::make_pair(&w_.shared_w13_scale, "shared_w13_scale"),
                              std::make_pair(&w_.shared_w2_scale, "shared_w2_scale"),
                              std::make_pair(&w_.shared_w13_input_scale, "shared_w13_input_scale"),
                              std::make_pair(&w_.shared_w2_input_scale, "shared_w2_input_scale")})
            SWITCHYARD_CHECK(!m.first->defined(), m.second, " ", m.first->shape_string(),
                             " given but num_shared_experts=0");
}

MoELayer::~MoELayer() = default;
MoELayer::MoELayer(MoELayer&&) noexcept = default;
MoELayer& MoELayer::operator=(MoELayer&&) noexcept = default;

size_t MoELayer::workspace_size(int64_t num_tokens) const {
    SWITCHYARD_CHECK(num_tokens >= 0, "num_tokens=", num_tokens, " must be >= 0");
    // A sizing pass only (no slice names recorded): forward() calls this every time, with nothing allocated.
    return forward_layout(cfg_, device(), num_tokens, uses_fused_path(num_tokens), nullptr, 0).bytes;
}

std::vector<WorkspaceSlice> MoELayer::workspace_layout(int64_t num_tokens) const {
    SWITCHYARD_CHECK(num_tokens >= 0, "num_tokens=", num_tokens, " must be >= 0");
    std::vector<WorkspaceSlice> slices;
    forward_layout(cfg_, device(), num_tokens, uses_fused_path(num_tokens), nullptr, 0, &slices);
    return slices;
}

void MoELayer::forward(const TensorRef& x, const TensorRef& y, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream, ForwardOutputs* out, const StageCallback& on_stage) const {
    const Device dev = device();
    validate_activation(cfg_, x, "x", dev);
    validate_activation(cfg_, y, "y", dev);
    const int64_t T = x.shape[0];
    SWITCHYARD_CHECK(y.shape[0] == T, "y shape=", y.shape_string(), ", expected [", T, ", ", cfg_.hidden_size,
                     "] like x");
    const int64_t E = cfg_.num_experts, H = cfg_.hidden_size, F = cfg_.ffn_size, slots = cfg_.route_slots();
    if (out != nullptr) {
        if (out->logits.defined()) check_output(out->logits, DType::kF32, T, E, "logits", dev);
        if (out->topk_ids.defined()) check_output(out->topk_ids, DType::kI32, T, slots, "topk_ids", dev);
        if (out->topk_weights.defined()) check_output(out->topk_weights, DType::kF32, T, slots, "topk_weights", dev);
        if (out->slot_row.defined()) check_output(out->slot_row, DType::kI32, T, slots, "slot_row", dev);
        for (auto [t, name, n] : {std::make_tuple(&out->expert_counts, "expert_counts", E),
                                  std::make_tuple(&out->expert_offsets, "expert_offsets", E + 1)}) {
            if (!t->defined()) continue;
            api::check_tensor(*t, name, DType::kI32, {n});
            SWITCHYARD_CHECK(t->device == dev, name, " is on ", to_string(t->device), ", expected ", to_string(dev));
        }
    }
    const size_t need = workspace_size(T);
    std::unique_ptr<char[]> host_scratch;
    if (dev == Device::kCPU && workspace == nullptr && need > 0) {  // CPU: scratch of our own when none is given
        host_scratch.reset(new char[need + kWorkspaceAlign]);
        workspace = reinterpret_cast<void*>(align_up(reinterpret_cast<uintptr_t>(host_scratch.get())));
        workspace_bytes = need;
    }
    api::check_workspace(workspace, workspace_bytes, need, "MoELayer::forward");

    // (x and y not 16-byte aligned: the staged chain, which the workspace layout of the fused path also holds.)
    const bool fused = uses_fused_path(T) && reinterpret_cast<uintptr_t>(x.data) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(y.data) % 16 == 0;
    const ForwardLayout l = forward_layout(cfg_, dev, T, fused, workspace, workspace_bytes);
    const bool ec = cfg_.expert_choice();
    const int64_t rows = expert_rows(cfg_, T);
    const TensorRef& like = x;
    const TensorRef logits = either(out, &ForwardOutputs::logits, view(l.logits, DType::kF32, {T, E}, like));
    const TensorRef ids = either(out, &ForwardOutputs::topk_ids, view(l.topk_ids, DType::kI32, {T, slots}, like));
    const TensorRef weights =
        either(out, &ForwardOutputs::topk_weights, view(l.topk_weights, DType::kF32, {T, slots}, like));
    RoutingPlan plan;
    plan.expert_counts = either(out, &ForwardOutputs::expert_counts, view(l.expert_counts, DType::kI32, {E}, like));
    plan.expert_offsets =
        either(out, &ForwardOutputs::expert_offsets, view(l.expert_offsets, DType::kI32, {E + 1}, like));
    plan.slot_row = either(out, &ForwardOutputs::slot_row, view(l.slot_row, DType::kI32, {T, slots}, like));
    plan.row_token = view(l.row_token, DType::kI32, {rows}, like);
    plan.row_slot = view(l.row_slot, DType::kI32, {rows}, like);
    const TensorRef used_rows =  // offsets[E]
        view(static_cast<int32_t*>(plan.expert_offsets.data) + E, DType::kI32, {1}, like);
    const TensorRef xp = view(l.xp, cfg_.dtype, {rows, H}, like);
    const TensorRef expert_out = view(l.expert_out, cfg_.dtype, {rows, H}, like);
    const TensorRef g1 =
        api::uses_gated_gemm1(cfg_, dev) ? TensorRef() : view(l.g1, cfg_.dtype, {rows, cfg_.w13_rows()}, like);
    const TensorRef h = view(l.h, cfg_.dtype, {rows, F}, like);
    auto stage_done = [&](const char* name) {
        if (on_stage) on_stage(name, stream);
    };

    auto route_and_plan = [&]() {
        router_gemm(x, w_.gate, logits, l.router_ws, l.router_ws_bytes, stream);
        if (ec)
            route_expert_choice(cfg_, logits, ids, weights, plan, l.plan_ws, l.plan_ws_bytes, stream);
        else
            route(cfg_, logits, w_.score_bias, ids, weights, stream);
        stage_done("router");
        if (!ec) build_plan(cfg_, ids, weights, plan, l.plan_ws, l.plan_ws_bytes, stream);
        stage_done("plan");  // under expert choice the plan was built with the routing
    };
    auto finish = [&]() {
        if (out != nullptr && out->stats != nullptr)
            load_stats(cfg_, logits, ids, plan, *out->stats, l.stats_ws, l.stats_ws_bytes, stream);
    };

    stage_done("begin");
    if (fused) {  // the small-batch path (stages.h): route_fused (or the routing chain) and experts_fused
        const bool gated_shared = cfg_.has_shared_expert() && cfg_.shared_expert_gate;
        const TensorRef shared_gate = gated_shared ? view(l.shared_gate, DType::kF32, {T, 1}, like) : TensorRef();
        if (!ec && cfg_.capacity_factor == 0.0) {
            route_fused(cfg_, x, w_.gate, w_.score_bias, gated_shared ? w_.shared_gate : TensorRef(), logits, ids,
                        weights, plan, shared_gate, l.fused_ws, l.fused_ws_bytes, stream);
            stage_done("router");
            stage_done("plan");
        } else {
            route_and_plan();
            if (gated_shared) router_gemm(x, w_.shared_gate, shared_gate, l.router_ws, l.router_ws_bytes, stream);
        }
        experts_fused(cfg_, x, w_, plan, weights, shared_gate, y, l.fused_ws, l.fused_ws_bytes, stream);
        stage_done("experts");
        finish();
        return;
    }
    route_and_plan();
    // token choice: by token, x read once (expert choice's slot_row is [T, E], one column per expert: by row)
    // With the gated GEMM1 the dispatch is GEMM1's A loads (set_gather_in_gemm1): x's rows through row_token.
    const bool gather_in_gemm1 = uses_gather_in_gemm1(T);
    if (!gather_in_gemm1) gather(x, plan.row_token, xp, stream, cfg_.expert_choice() ? TensorRef() : plan.slot_row);
    stage_done("dispatch");
    // A float weight runs grouped_gemm; an fp8 one grouped_gemm_fp8 (its input quantised per the recipe, stages.h);
    // interleaved gate/up rows grouped_gemm_gated where the backend has it (api::gemm1_activation).
    api::gemm1_activation(cfg_, gather_in_gemm1 ? x : xp, w_, plan.expert_offsets, used_rows, g1, h, l.gemm_ws,
                          l.gemm_ws_bytes, stream, stage_done, gather_in_gemm1 ? plan.row_token : TensorRef());
    api::expert_gemm(cfg_, h, w_.w2, w_.w2_scale, w_.w2_input_scale, plan.expert_offsets, expert_out, l.gemm_ws,
                     l.gemm_ws_bytes, stream);
    stage_done("gemm2");
    TensorRef shared, shared_gate;
    if (cfg_.has_shared_expert() && T > 0) {
        const TensorRef sg1 = view(l.shared_g1, cfg_.dtype, {T, cfg_.shared_w13_rows()}, like);
        const TensorRef sh = view(l.shared_h, cfg_.dtype, {T, cfg_.shared_width()}, like);
        shared = view(l.shared_out, cfg_.dtype, {T, H}, like);
        api::shared_expert(cfg_, x, w_, sg1, sh, shared, l.gemm_ws, l.gemm_ws_bytes, stream);
        if (cfg_.shared_expert_gate) {  // gate logits x . shared_gate^T [T, 1]; combine scales by their sigmoid
            shared_gate = view(l.shared_gate, DType::kF32, {T, 1}, like);
            router_gemm(x, w_.shared_gate, shared_gate, l.router_ws, l.router_ws_bytes, stream);
        }
        stage_done("shared");
    }
    combine(expert_out, plan.slot_row, weights, shared, y, stream, shared_gate);
    stage_done("combine");
    finish();
}

bool MoELayer::uses_fused_path(int64_t num_tokens) const {
    if (fused_max_tokens_ < 0 ? !fused_path_preferred(cfg_, device(), num_tokens)
                              : num_tokens > fused_max_tokens_ || !fused_path_supported(cfg_, device(), num_tokens))
        return false;
    // FP8 layers: dynamic activation scales only, and a shared expert (if any) in FP8 too.
    if (cfg_.quant_mode != QuantMode::kNone &&
        (w_.w13_input_scale.defined() || w_.w2_input_scale.defined() || w_.shared_w13_input_scale.defined() ||
         w_.shared_w2_input_scale.defined() || (w_.shared_w13.defined() && w_.shared_w13.dtype != DType::kF8E4M3)))
        return false;
    // The fused kernels read every row as 16-byte vectors.
    for (const TensorRef* t : {&w_.gate, &w_.w13, &w_.w2, &w_.shared_w13, &w_.shared_w2, &w_.shared_gate})
        if (t->defined() && reinterpret_cast<uintptr_t>(t->data) % 16 != 0) return false;
    return true;
}

bool MoELayer::uses_gather_in_gemm1(int64_t num_tokens) const {
    // (T = 0: nothing to read, and a gathered A needs x to have rows)
    if (num_tokens < 1 || !api::uses_gated_gemm1(cfg_, device()) || cfg_.quant_mode != QuantMode::kNone) return false;
    switch (gather_in_gemm1_) {
        case GatherInGemm1::kOn: return true;
        case GatherInGemm1::kOff: return false;
        case GatherInGemm1::kAuto: break;
    }
    return gather_in_gemm1_preferred(cfg_, device(), num_tokens);
}

void MoELayer::set_fused_max_tokens(int64_t max_tokens) {
    SWITCHYARD_CHECK(max_tokens >= -1 && max_tokens <= fused_path_max_tokens(), "fused_max_tokens=", max_tokens,
                     " must be -1 (automatic: fused_path_preferred), 0 (never) or at most ", fused_path_max_tokens());
    fused_max_tokens_ = max_tokens;
}

void MoELayer::forward(const TensorRef& x, const TensorRef& y, ForwardOutputs* out) const {
    SWITCHYARD_CHECK(device() == Device::kCPU, "the convenience forward(x, y) runs on cpu only; the layer is on ",
                     to_string(device()), ": pass a workspace of workspace_size(T) bytes and a stream");
    forward(x, y, nullptr, 0, nullptr, out);
}

}  // namespace switchyard
