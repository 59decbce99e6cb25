// switchyard/moe_layer.h: one MoE layer, forward.
//
//   y[t] = sum_j w[t, j] * Expert_{id[t, j]}(x[t])  (+ s_t * Shared(x[t]), s_t = sigmoid(x[t] . shared_gate) when
//          MoEConfig::shared_expert_gate, else 1)
//   Expert_e(a) = W2_e · act(W13_e · a),  act per MoEConfig::activation
//
// Numerics (the contract every backend keeps, written out in src/ref/moe_ref.cpp):
// products accumulate exactly (double on the CPU, fp32 on the GPU); the values a stage stores are
// rounded to the layer dtype: GEMM1's outputs (gate and up), the activation output h = act(gate) * up,
// each expert output row, the shared expert's output, and y. Router logits and weights are fp32.
// The combine sums slots in order j = 0..k-1, then adds the shared expert: bitwise reproducible.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "switchyard/config.h"
#include "switchyard/routing.h"
#include "switchyard/tensor.h"

namespace switchyard {

// Weights in the layout checkpoints use (nn.Linear: [out, in]). Optional ones are left default.
// Every weight carries its own dtype (fp32, bf16, fp16). Quantised experts (MoEConfig::quant_mode != kNone; CPU only
// for now): w13 and w2 are fp8e4m3 with fp32 scales (the recipe: stages.h, grouped_gemm_fp8; docs/fp8.md), and
// shared_w13 / shared_w2 may be fp8e4m3 too (with their scales) or of a float dtype. Scale shapes, with B(n) =
// ceil(n / 128): fp8-block w13_scale [E, B(R13), B(H)], w2_scale [E, B(H), B(F)], shared_w13_scale [B(2S or S), B(H)],
// shared_w2_scale [B(H), B(S)]; fp8-tensor: [E] for experts, [1] for a shared matrix. Static input scales (fp8-tensor
// only, optional): w13_input_scale / w2_input_scale [E], shared_*_input_scale [1]. Scales must be finite, input
// scales positive, and fp8 weights free of NaN codes (checked once, by the constructor).
struct MoEWeights {
    TensorRef gate;        // [E, H]       router weight
    TensorRef score_bias;  // [E] fp32     selection-only bias (required when cfg.use_score_bias)
    TensorRef w13;         // [E, 2F, H]   gated: gate rows [0, F), up rows [F, 2F) (MoEConfig::gate_up_interleaved:
                           //              interleaved in blocks of 8); ungated: [E, F, H]
    TensorRef w2;          // [E, H, F]    down projection
    TensorRef shared_w13;  // [2S, H] or [S, H] with S = num_shared_experts * shared_ffn_size
    TensorRef shared_w2;   // [H, S]
    TensorRef shared_gate; // [1, H]       gated shared expert (cfg.shared_expert_gate): scale sigmoid(x . shared_gate)
    TensorRef w13_scale;   // fp32, fp8 w13's weight scales (checkpoints: weight_scale_inv / weight_scale)
    TensorRef w2_scale;    // fp32, fp8 w2's weight scales
    TensorRef shared_w13_scale;        // fp32, fp8 shared_w13's weight scales
    TensorRef shared_w2_scale;         // fp32, fp8 shared_w2's weight scales
    TensorRef w13_input_scale;         // [E] fp32, static activation scales of GEMM1 (fp8-tensor, optional)
    TensorRef w2_input_scale;          // [E] fp32, static activation scales of GEMM2 (fp8-tensor, optional)
    TensorRef shared_w13_input_scale;  // [1] fp32 (fp8-tensor, optional)
    TensorRef shared_w2_input_scale;   // [1] fp32 (fp8-tensor, optional)
};

// Optional outputs of a forward. Each defined TensorRef is filled; each non-null pointer too.
struct ForwardOutputs {
    TensorRef logits;        // [T, E] fp32
    TensorRef topk_ids;      // [T, k] int32
    TensorRef topk_weights;  // [T, k] fp32
    TensorRef slot_row;      // [T, k] int32 (see RoutingPlan)
    TensorRef expert_counts; // [E] int32: pairs routed to each expert before drops (stays on the device: the
                             //     input of update_score_bias, balance.h, with no host synchronisation)
    TensorRef expert_offsets;  // [E+1] int32: the plan's offsets (offsets[e+1] - offsets[e] = pairs expert e kept)
    // Under expert-choice routing (MoEConfig::routing_mode) topk_ids, topk_weights and slot_row are [T, E]
    // (MoEConfig::route_slots()): slot e is expert e, with id -1, weight 0 and row -1 where e did not pick t.
    LoadStats* stats = nullptr;  // host struct; on CUDA filling it synchronises the stream (not for graphs)
};

// Called on the host after the work of each stage of a forward has been enqueued on `stream` (e.g. to record an
// event or read a clock): "begin" before the first stage, then router, plan, dispatch, gemm1, activation, gemm2,
// shared (only with shared experts), combine, in that order; on the fused small-batch path begin, router, plan,
// experts (router and plan are one step there unless capacity or expert choice routes with the staged chain).
// On the CPU each stage has finished when it is called.
using StageCallback = std::function<void(const char* stage, cudaStream_t stream)>;

// One named slice of a forward's workspace (offset and size in bytes, 256-byte aligned). Slices may alias where
// their lifetimes do not overlap (aliases = the name of the slice whose memory it reuses, else empty).
struct WorkspaceSlice {
    std::string name;
    size_t offset = 0;
    size_t bytes = 0;
    std::string aliases;
};

// MoELayer::set_gather_in_gemm1's modes: the automatic choice (stages.h, gather_in_gemm1_preferred), always, never.
enum class GatherInGemm1 { kAuto, kOn, kOff };

class MoELayer {
 public:
    // Validates the config and every weight's shape, dtype and device; throws switchyard::Error.
    MoELayer(const MoEConfig& cfg, const MoEWeights& weights);
    ~MoELayer();
    MoELayer(MoELayer&&) noexcept;
    MoELayer& operator=(MoELayer&&) noexcept;

    const MoEConfig& config() const { return cfg_; }
    const MoEWeights& weights() const { return w_; }
    Device device() const { return w_.w13.device; }

    // Bytes of workspace forward() needs for num_tokens tokens on this layer's device (host memory for the CPU).
    size_t workspace_size(int64_t num_tokens) const;
    // The slices of that workspace, in order (their sizes add up to workspace_size(T), aliases not counted).
    std::vector<WorkspaceSlice> workspace_layout(int64_t num_tokens) const;

    // x [T, H] and y [T, H] of cfg.dtype, contiguous, on the layer's device. No allocation, no host
    // synchronisation (unless out->stats is set on CUDA). The workspace must hold workspace_size(T) bytes
    // on the same device (256-byte aligned); on the CPU it may be null (host scratch is then allocated).
    // on_stage (optional) is called after each stage (StageCallback).
    void forward(const TensorRef& x, const TensorRef& y, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream = nullptr, ForwardOutputs* out = nullptr,
                 const StageCallback& on_stage = StageCallback()) const;

    // The fused small-batch path (stages.h: route_fused, experts_fused) for a CUDA forward of T tokens.
    // max_tokens: -1 automatic, the default (stages.h: fused_path_preferred, the measured crossover); 0 never; N in
    // 1..fused_path_max_tokens(): whenever T <= N and fused_path_supported(config, device, T). The CPU backend always
    // runs the staged chain.
    void set_fused_max_tokens(int64_t max_tokens);
    int64_t fused_max_tokens() const { return fused_max_tokens_; }
    bool uses_fused_path(int64_t num_tokens) const;

    // The staged chain's dispatch inside GEMM1: where GEMM1 runs with the gated epilogue (interleaved gate/up
    // weights: bf16 on CUDA, any float dtype on the CPU; float experts), its A rows are read from x through the plan's
    // row_token (stages.h, GroupedGemmOptions::row_index) instead of a gathered copy xp. Same result, bit for bit.
    // kAuto (the default): where stages.h's gather_in_gemm1_preferred says so (CUDA; few rows per expert, or small
    // experts: measured faster there, slower for large experts with many rows); kOn / kOff: wherever GEMM1 is gated /
    // never. The CPU backend gathers either way.
    void set_gather_in_gemm1(GatherInGemm1 mode) { gather_in_gemm1_ = mode; }
    void set_gather_in_gemm1(bool on) { gather_in_gemm1_ = on ? GatherInGemm1::kOn : GatherInGemm1::kOff; }
    GatherInGemm1 gather_in_gemm1() const { return gather_in_gemm1_; }
    // Whether a staged forward of num_tokens tokens reads x through the plan in GEMM1 (the mode, the layer's config).
    bool uses_gather_in_gemm1(int64_t num_tokens) const;

    // Convenience for the CPU backend: allocates its own workspace.
    void forward(const TensorRef& x, const TensorRef& y, ForwardOutputs* out = nullptr) const;

 private:
    MoEConfig cfg_;
    MoEWeights w_;
    int64_t fused_max_tokens_ = -1;
    GatherInGemm1 gather_in_gemm1_ = GatherInGemm1::kAuto;
};

// Throws unless x is [T, H] of cfg.dtype, contiguous, on `dev`. Shared by every entry point.
void validate_activation(const MoEConfig& cfg, const TensorRef& x, const char* name, Device dev);

}  // namespace switchyard
