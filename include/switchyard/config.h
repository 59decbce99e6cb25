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

enum class Activation : int {
    kSwiGLU = 0,  // silu(gate) * up   (gated: W13 holds gate rows then up rows)
    kGeGLU = 1,   // gelu_tanh(gate) * up
    kGELU = 2,    // gelu_tanh(up)     (not gated: W13 holds only F rows)
    kReLU = 3,    // relu(up)
};

const char* to_string(ScoreFunction s);
const char* to_string(DropPolicy p);
const char* to_string(Activation a);
ScoreFunction parse_score_function(const std::string& s);  // softmax | topk-softmax | sigmoid
DropPolicy parse_drop_policy(const std::string& s);        // position | probability
Activation parse_activation(const std::string& s);         // swiglu | geglu | gelu | relu
inline bool is_gated(Activation a) { return a == Activation::kSwiGLU || a == Activation::kGeGLU; }

struct MoEConfig {
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

    // Capacity: 0 = dropless. Otherwise capacity = max(min_capacity, ceil(capacity_factor * T * k / E)).
    double capacity_factor = 0.0;
    int64_t min_capacity = 0;
    DropPolicy drop_policy = DropPolicy::kPosition;

    Activation activation = Activation::kSwiGLU;

    // Shared (always-on) experts: num_shared_experts experts of width shared_ffn_size, stored as one MLP
    // of width num_shared_experts * shared_ffn_size (as DeepSeek-V3 checkpoints store them).
    int64_t num_shared_experts = 0;
    int64_t shared_ffn_size = 0;

    double aux_loss_coef = 0.0;  // weight of the Switch load-balancing loss in LoadStats::weighted_loss
    double z_loss_coef = 0.0;    // weight of the router z-loss in LoadStats::weighted_loss

    DType dtype = DType::kF32;  // activations (x, y, intermediates); weights carry their own dtype

    // Throws switchyard::Error naming the first bad parameter and its value.
    void validate() const;
    int64_t shared_width() const { return num_shared_experts * shared_ffn_size; }
    int64_t w13_rows() const { return is_gated(activation) ? 2 * ffn_size : ffn_size; }
    // Capacity per expert for a batch of num_tokens tokens (0 when dropless).
    int64_t capacity(int64_t num_tokens) const;
    std::string to_string() const;  // one line, for logs and reports
};

}  // namespace switchyard
