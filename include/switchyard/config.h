// switchyard/config.h: the configuration of one MoE layer.
#pragma once

#include <cstdint>
#include <string>

#include "switchyard/dtype.h"

namespace switchyard {

// How router logits become expert scores.
enum class ScoreFunction : int {
    kSoftmax = 0,      // p = softmax(logits over all E); select top-k of p (+ bias); weights = p[selected]
    kTopkSoftmax = 1,  // select top-k of logits (+ bias); weights = softmax over the k selected logits
    kSigmoid = 2,      // s = sigmoid(logits); select top-k of s (+ bias); weights = s[selected]
};

// Which (token, slot) pairs are dropped when an expert receives more than its capacity.
enum class DropPolicy : int {
    kPosition = 0,     // keep the first `capacity` tokens in token order
    kProbability = 1,  // keep the `capacity` pairs with the largest routing weight (ties: lower token index)
};

// How tokens and experts are matched (balance.h documents expert choice in full).
enum class RoutingMode : int {
    kTokenChoice = 0,   // each token picks its top_k experts (capacity may drop some of those pairs)
    kExpertChoice = 1,  // each expert picks its top-C tokens by score (Zhou et al., 2022); a token gets 0..E experts
};

enum class Activation : int {
    kSwiGLU = 0,  // silu(gate) * up   (gated: W13 holds gate rows then up rows)
    kGeGLU = 1,   // gelu_tanh(gate) * up
    kGELU = 2,    // gelu_tanh(up)     (not gated: W13 holds only F rows)
    kReLU = 3,    // relu(up)
};

// Quantised experts (docs/fp8.md; the recipe is written out in stages.h at grouped_gemm_fp8).
enum class QuantMode : int {
    kNone = 0,       // expert weights in a float dtype
    kFP8Block = 1,   // fp8 e4m3 weights, fp32 scales per 128x128 block; activations per token and 128 channels
    kFP8Tensor = 2,  // fp8 e4m3 weights, one fp32 scale per matrix; activations per token (or a static input scale)
};

const char* to_string(ScoreFunction s);
const char* to_string(DropPolicy p);
const char* to_string(Activation a);
const char* to_string(RoutingMode m);
const char* to_string(QuantMode q);
RoutingMode parse_routing_mode(const std::string& s);     // token-choice | expert-choice
QuantMode parse_quant_mode(const std::string& s);          // none | fp8-block | fp8-tensor
ScoreFunction parse_score_function(const std::string& s);  // softmax | topk-softmax | sigmoid
DropPolicy parse_drop_policy(const std::string& s);        // position | probability
Activation parse_activation(const std::string& s);         // swiglu | geglu | gelu | relu
inline bool is_gated(Activation a) { return a == Activation::kSwiGLU || a == Activation::kGeGLU; }
// w13's gate/up rows interleaved in blocks of 8 (stages.h: interleave_gate_up, grouped_gemm_gated): the row that gate
// row f (half = 0) or up row f (half = 1) of a gated w13 [2F, H] moves to; F % 8 == 0. Also the column of gate f /
// up f in GEMM1's output with such weights. constexpr: the CUDA kernels use it too.
constexpr int64_t gate_up_interleaved_row(int64_t f, int64_t half) { return 16 * (f / 8) + 8 * half + f % 8; }

struct MoEConfig {
    // Kernel limits validate() enforces (routing keeps one token's E scores in shared memory / registers).
    static constexpr int64_t kMaxExperts = 512;
    static constexpr int64_t kMaxTopK = 32;

    int64_t hidden_size = 0;  // H
    int64_t ffn_size = 0;     // F, one routed expert's intermediate width
    int64_t num_experts = 0;  // E
    int64_t top_k = 0;        // k, 0 < k <= E

    ScoreFunction score_function = ScoreFunction::kSoftmax;
    bool renormalize = false;    // divide the k weights by their sum (after selection, before scaling)
    double routed_scale = 1.0;   // multiply the final weights by this (DeepSeek-V3: 2.5)

    // Group-limited routing (DeepSeek-V3): E experts in num_groups equal groups; a group's score is the
    // sum of its two best (biased) scores (its best one if a group has one expert); the topk_groups best
    // groups are kept and top-k runs over their experts only. num_groups = 1 disables it.
    int64_t num_groups = 1;
    int64_t topk_groups = 1;

    // Per-expert bias added to the scores for selection only (aux-loss-free balancing). The bias values
    // live with the weights (MoEWeights::score_bias); this flag says whether to use them.
    bool use_score_bias = false;

    // Capacity: 0 = dropless. Otherwise capacity = min(T, max(min_capacity, ceil(capacity_factor * T * k / E))).
    double capacity_factor = 0.0;
    int64_t min_capacity = 0;
    DropPolicy drop_policy = DropPolicy::kPosition;
    // Capacity factor for evaluation (< 0: the same as capacity_factor). eval_config() gives the config an
    // evaluation forward runs with; the layer itself always uses capacity_factor.
    double eval_capacity_factor = -1.0;

    // Token choice (top_k per token, the default) or expert choice (top-C tokens per expert, where
    // C = expert_choice_capacity(T); capacity_factor is then the mean number of experts per token, 0 = top_k).
    // Expert choice takes softmax or sigmoid scores, no selection bias, no groups, no drop policy.
    RoutingMode routing_mode = RoutingMode::kTokenChoice;

    // Aux-loss-free balancing (DeepSeek-V3): after a step, score_bias[e] += bias_update_rate * sign(mean - load_e)
    // (switchyard::update_score_bias in balance.h). Not used inside forward().
    double bias_update_rate = 1e-3;

    Activation activation = Activation::kSwiGLU;

    // Shared (always-on) experts: num_shared_experts experts of width shared_ffn_size, stored as one MLP
    // of width num_shared_experts * shared_ffn_size (as DeepSeek-V3 checkpoints store them).
    int64_t num_shared_experts = 0;
    int64_t shared_ffn_size = 0;
    // Gated shared expert (Qwen2-MoE): the shared expert's output of token t is scaled by sigmoid(x[t] . g) with
    // g = MoEWeights::shared_gate [1, H] (the checkpoint's shared_expert_gate.weight). Needs num_shared_experts > 0.
    bool shared_expert_gate = false;

    double aux_loss_coef = 0.0;  // weight of the Switch load-balancing loss in LoadStats::weighted_loss
    double z_loss_coef = 0.0;    // weight of the router z-loss in LoadStats::weighted_loss

    DType dtype = DType::kF32;  // activations (x, y, intermediates); weights carry their own dtype

    // Routed experts' weights (w13, w2) in fp8 e4m3 with scale tensors (MoEWeights), or not quantised (kNone).
    // Shared experts may then be fp8 too (with their own scales) or of a float dtype. CPU backend only for now.
    QuantMode quant_mode = QuantMode::kNone;

    // Layout of the routed experts' w13 (MoEWeights::w13): false, gate rows [0, F) then up rows [F, 2F) (checkpoints'
    // layout); true, gate and up rows interleaved in blocks of 8 (stages.h interleave_gate_up,
    // gate_up_interleaved_row). The staged forward then runs GEMM1 with the gated activation in its epilogue
    // (grouped_gemm_gated: the [R, 2F] product is never stored) where the backend has that kernel (CPU; CUDA bf16), and
    // GEMM1 followed by the activation reading the interleaved columns otherwise (CUDA fp16 / fp32): the same values as
    // the plain layout either way. Gated activations and unquantised experts only; the shared expert keeps the plain
    // layout. The fused small-batch path (experts_fused) reads either layout.
    bool gate_up_interleaved = false;

    // Throws switchyard::Error naming the first bad parameter and its value.
    void validate() const;
    int64_t shared_width() const { return num_shared_experts * shared_ffn_size; }
    bool has_shared_expert() const { return num_shared_experts > 0 && shared_ffn_size > 0; }
    int64_t w13_rows() const { return is_gated(activation) ? 2 * ffn_size : ffn_size; }
    int64_t shared_w13_rows() const { return is_gated(activation) ? 2 * shared_width() : shared_width(); }
    // Capacity per expert for a batch of num_tokens tokens (0 when dropless), clamped to num_tokens (no expert
    // gets more pairs than tokens, so the clamp changes no result; it keeps huge factors from overflowing).
    // Token choice only.
    int64_t capacity(int64_t num_tokens) const;
    // Expert choice: tokens each expert takes, min(T, max(min_capacity, ceil(c * T / E))), c = capacity_factor
    // or top_k when capacity_factor is 0.
    int64_t expert_choice_capacity(int64_t num_tokens) const;
    bool expert_choice() const { return routing_mode == RoutingMode::kExpertChoice; }
    // Routing slots per token in the plan arrays (topk_ids, topk_weights, slot_row are [T, route_slots()]):
    // top_k under token choice, E under expert choice (slot e = expert e, -1 / 0 where e did not pick the token).
    int64_t route_slots() const { return expert_choice() ? num_experts : top_k; }
    // The config an evaluation forward uses: capacity_factor replaced by eval_capacity_factor when that is >= 0.
    MoEConfig eval_config() const;
    std::string to_string() const;  // one line, for logs and reports
};

}  // namespace switchyard
