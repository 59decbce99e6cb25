// src/api/config.cpp: MoEConfig validation, capacity, and the enum names / parsers (CLI spellings).
//
// validate() checks every rule of DESIGN.md and throws switchyard::Error naming the first bad parameter and
// its value; kernels rely on these bounds (E <= kMaxExperts, top_k <= kMaxTopK).
#include "switchyard/config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>

#include "switchyard/error.h"

namespace switchyard {
namespace {

constexpr int64_t kMaxExperts = MoEConfig::kMaxExperts;
constexpr int64_t kMaxTopK = MoEConfig::kMaxTopK;
constexpr double kFloatMax = static_cast<double>(std::numeric_limits<float>::max());

// ceil(x) as an int64 clamped to [0, limit]: the comparison happens in double, before any conversion, so a huge
// or non-finite x never reaches a float-to-int conversion (undefined behaviour when out of range).
int64_t ceil_clamped(double x, int64_t limit) {
    const double c = std::ceil(x);
    if (!(c < static_cast<double>(limit))) return limit;  // also NaN and +inf
    if (!(c > 0.0)) return 0;
    return static_cast<int64_t>(c);
}

std::string lower(const std::string& s) {
    std::string v = s;
    std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return v;
}

}  // namespace

const char* to_string(ScoreFunction s) {
    switch (s) {
        case ScoreFunction::kSoftmax:
            return "softmax";
        case ScoreFunction::kTopkSoftmax:
            return "topk-softmax";
        case ScoreFunction::kSigmoid:
            return "sigmoid";
    }
    return "unknown-score-function";
}

const char* to_string(DropPolicy p) {
    switch (p) {
        case DropPolicy::kPosition:
            return "position";
        case DropPolicy::kProbability:
            return "probability";
    }
    return "unknown-drop-policy";
}

const char* to_string(Activation a) {
    switch (a) {
        case Activation::kSwiGLU:
            return "swiglu";
        case Activation::kGeGLU:
            return "geglu";
        case Activation::kGELU:
            return "gelu";
        case Activation::kReLU:
            return "relu";
    }
    return "unknown-activation";
}

const char* to_string(RoutingMode m) {
    switch (m) {
        case RoutingMode::kTokenChoice:
            return "token-choice";
        case RoutingMode::kExpertChoice:
            return "expert-choice";
    }
    return "unknown-routing-mode";
}

const char* to_string(QuantMode q) {
    switch (q) {
        case QuantMode::kNone:
            return "none";
        case QuantMode::kFP8Block:
            return "fp8-block";
        case QuantMode::kFP8Tensor:
            return "fp8-tensor";
    }
    return "unknown-quant-mode";
}

QuantMode parse_quant_mode(const std::string& s) {
    const std::string v = lower(s);
    if (v == "none") return QuantMode::kNone;
    if (v == "fp8-block" || v == "fp8_block") return QuantMode::kFP8Block;
    if (v == "fp8-tensor" || v == "fp8_tensor") return QuantMode::kFP8Tensor;
    SWITCHYARD_FAIL("quant_mode='", s, "' is not one of none|fp8-block|fp8-tensor");
}

RoutingMode parse_routing_mode(const std::string& s) {
    const std::string v = lower(s);
    if (v == "token-choice" || v == "token_choice" || v == "token") return RoutingMode::kTokenChoice;
    if (v == "expert-choice" || v == "expert_choice" || v == "expert") return RoutingMode::kExpertChoice;
    SWITCHYARD_FAIL("routing='", s, "' is not one of token-choice|expert-choice");
}

ScoreFunction parse_score_function(const std::string& s) {
    const std::string v = lower(s);
    if (v == "softmax") return ScoreFunction::kSoftmax;
    if (v == "topk-softmax" || v == "topk_softmax") return ScoreFunction::kTopkSoftmax;
    if (v == "sigmoid") return ScoreFunction::kSigmoid;
    SWITCHYARD_FAIL("score_function='", s, "' is not one of softmax|topk-softmax|sigmoid");
}

DropPolicy parse_drop_policy(const std::string& s) {
    const std::string v = lower(s);
    if (v == "position") return DropPolicy::kPosition;
    if (v == "probability") return DropPolicy::kProbability;
    SWITCHYARD_FAIL("drop_policy='", s, "' is not one of position|probability");
}

Activation parse_activation(const std::string& s) {
    const std::string v = lower(s);
    if (v == "swiglu") return Activation::kSwiGLU;
    if (v == "geglu") return Activation::kGeGLU;
    if (v == "gelu") return Activation::kGELU;
    if (v == "relu") return Activation::kReLU;
    SWITCHYARD_FAIL("activation='", s, "' is not one of swiglu|geglu|gelu|relu");
}

void MoEConfig::validate() const {
    SWITCHYARD_CHECK(hidden_size > 0, "hidden_size=", hidden_size, " must be positive");
    SWITCHYARD_CHECK(ffn_size > 0, "ffn_size=", ffn_size, " must be positive");
    SWITCHYARD_CHECK(num_experts > 0, "num_experts=", num_experts, " must be positive");
    SWITCHYARD_CHECK(num_experts <= kMaxExperts, "num_experts=", num_experts, " exceeds the kernel limit ",
                     kMaxExperts);
    SWITCHYARD_CHECK(top_k > 0 && top_k <= num_experts, "top_k=", top_k, " must be in [1, num_experts=", num_experts,
                     "]");
    SWITCHYARD_CHECK(top_k <= kMaxTopK, "top_k=", top_k, " exceeds the kernel limit ", kMaxTopK);
    SWITCHYARD_CHECK(static_cast<int>(score_function) >= 0 && static_cast<int>(score_function) <= 2,
                     "score_function=", static_cast<int>(score_function), " is not a ScoreFunction");
    // routed_scale multiplies the fp32 routing weights: it must be finite as an fp32 value too (1e39 is inf there).
    SWITCHYARD_CHECK(std::isfinite(routed_scale) && std::fabs(routed_scale) <= kFloatMax, "routed_scale=",
                     routed_scale, " must be finite in fp32 (|value| <= ", kFloatMax, ")");
    SWITCHYARD_CHECK(num_groups >= 1, "num_groups=", num_groups, " must be >= 1");
    SWITCHYARD_CHECK(num_experts % num_groups == 0, "num_experts=", num_experts,
                     " is not a multiple of the group count num_groups=", num_groups);
    SWITCHYARD_CHECK(topk_groups >= 1 && topk_groups <= num_groups, "topk_groups=", topk_groups,
                     " must be in [1, num_groups=", num_groups, "]");
    if (num_groups > 1) {
        const int64_t reachable = topk_groups * (num_experts / num_groups);
        SWITCHYARD_CHECK(top_k <= reachable, "top_k=", top_k, " exceeds the experts of the topk_groups=", topk_groups,
                         " kept groups (", reachable, " = topk_groups * num_experts / num_groups)");
    }
    SWITCHYARD_CHECK(std::isfinite(capacity_factor), "capacity_factor=", capacity_factor, " must be finite");
    SWITCHYARD_CHECK(capacity_factor >= 0.0, "capacity_factor=", capacity_factor, " must be >= 0 (0 = dropless)");
    SWITCHYARD_CHECK(min_capacity >= 0, "min_capacity=", min_capacity, " must be >= 0");
    SWITCHYARD_CHECK(static_cast<int>(drop_policy) >= 0 && static_cast<int>(drop_policy) <= 1,
                     "drop_policy=", static_cast<int>(drop_policy), " is not a DropPolicy");
    SWITCHYARD_CHECK(std::isfinite(eval_capacity_factor), "eval_capacity_factor=", eval_capacity_factor,
                     " must be finite (< 0: same as capacity_factor)");
    SWITCHYARD_CHECK(std::isfinite(bias_update_rate) && bias_update_rate >= 0.0 && bias_update_rate <= kFloatMax,
                     "bias_update_rate=", bias_update_rate, " must be finite in fp32 (the bias is fp32) and >= 0");
    SWITCHYARD_CHECK(static_cast<int>(routing_mode) >= 0 && static_cast<int>(routing_mode) <= 1,
                     "routing_mode=", static_cast<int>(routing_mode), " is not a RoutingMode");
    if (routing_mode == RoutingMode::kExpertChoice) {
        SWITCHYARD_CHECK(score_function != ScoreFunction::kTopkSoftmax,
                         "score_function=topk-softmax is not defined under expert-choice routing (use softmax or "
                         "sigmoid)");
        SWITCHYARD_CHECK(!use_score_bias,
                         "use_score_bias=true has no effect under expert-choice routing (a per-expert bias does not "
                         "change which tokens an expert ranks first); turn it off");
        SWITCHYARD_CHECK(num_groups == 1, "num_groups=", num_groups,
                         ": group-limited routing is a token-choice option; expert-choice routing needs num_groups=1");
    }
    SWITCHYARD_CHECK(static_cast<int>(activation) >= 0 && static_cast<int>(activation) <= 3,
                     "activation=", static_cast<int>(activation), " is not an Activation");
    SWITCHYARD_CHECK(num_shared_experts >= 0, "num_shared_experts=", num_shared_experts, " must be >= 0");
    SWITCHYARD_CHECK(shared_ffn_size >= 0, "shared_ffn_size=", shared_ffn_size, " must be >= 0");
    SWITCHYARD_CHECK(num_shared_experts == 0 || shared_ffn_size > 0, "shared_ffn_size=", shared_ffn_size,
                     " must be positive when num_shared_experts=", num_shared_experts);
    SWITCHYARD_CHECK(num_shared_experts > 0 || shared_ffn_size == 0, "shared_ffn_size=", shared_ffn_size,
                     " given but num_shared_experts=0");
    SWITCHYARD_CHECK(!shared_expert_gate || num_shared_experts > 0,
                     "shared_expert_gate=true needs a shared expert (num_shared_experts=", num_shared_experts, ")");
    SWITCHYARD_CHECK(std::isfinite(aux_loss_coef), "aux_loss_coef=", aux_loss_coef, " must be finite");
    SWITCHYARD_CHECK(std::isfinite(z_loss_coef), "z_loss_coef=", z_loss_coef, " must be finite");
    SWITCHYARD_CHECK(dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16,
                     "dtype=", switchyard::to_string(dtype), " must be fp32, bf16 or fp16");
    SWITCHYARD_CHECK(static_cast<int>(quant_mode) >= 0 && static_cast<int>(quant_mode) <= 2,
                     "quant_mode=", static_cast<int>(quant_mode), " is not a QuantMode");
    if (gate_up_interleaved) {
        SWITCHYARD_CHECK(is_gated(activation), "gate_up_interleaved=true needs a gated activation (swiglu, geglu), got ",
                         switchyard::to_string(activation));
        SWITCHYARD_CHECK(quant_mode == QuantMode::kNone, "gate_up_interleaved=true is for unquantised experts (quant_mode=",
                         switchyard::to_string(quant_mode), ")");
        SWITCHYARD_CHECK(ffn_size % 8 == 0, "gate_up_interleaved=true needs ffn_size a multiple of 8 (the blocks of 8 "
                         "rows), got ", ffn_size);
    }
}

int64_t MoEConfig::capacity(int64_t num_tokens) const {
    if (capacity_factor <= 0.0) return 0;
    // Evaluated left to right in double, as written in config.h: ceil(capacity_factor * T * k / E), then clamped
    // to T (an expert never receives more than T pairs, so a larger capacity drops nothing more) before the
    // conversion to int64 (capacity_factor 1e19 would overflow it).
    const int64_t T = std::max<int64_t>(num_tokens, 0);
    const int64_t c = ceil_clamped(capacity_factor * static_cast<double>(T) * static_cast<double>(top_k) /
                                       static_cast<double>(num_experts),
                                   T);
    return std::min(T, std::max(min_capacity, c));
}

int64_t MoEConfig::expert_choice_capacity(int64_t num_tokens) const {
    const double per_token = capacity_factor > 0.0 ? capacity_factor : static_cast<double>(top_k);
    const int64_t T = std::max<int64_t>(num_tokens, 0);
    const int64_t c = ceil_clamped(per_token * static_cast<double>(T) / static_cast<double>(num_experts), T);
    return std::min(T, std::max(min_capacity, c));
}

MoEConfig MoEConfig::eval_config() const {
    MoEConfig c = *this;
    if (eval_capacity_factor >= 0.0) c.capacity_factor = eval_capacity_factor;
    return c;
}

std::string MoEConfig::to_string() const {
    std::ostringstream os;
    os << "H=" << hidden_size << " F=" << ffn_size << " E=" << num_experts << " k=" << top_k
       << " score=" << switchyard::to_string(score_function) << " renorm=" << (renormalize ? 1 : 0)
       << " scale=" << routed_scale;
    if (num_groups > 1) os << " groups=" << topk_groups << "/" << num_groups;
    if (use_score_bias) os << " bias=1";
    if (routing_mode == RoutingMode::kExpertChoice)
        os << " routing=expert-choice capacity_factor=" << capacity_factor << " min_capacity=" << min_capacity;
    else if (capacity_factor > 0)
        os << " capacity_factor=" << capacity_factor << " min_capacity=" << min_capacity
           << " drop=" << switchyard::to_string(drop_policy);
    else
        os << " dropless";
    if (eval_capacity_factor >= 0) os << " eval_capacity_factor=" << eval_capacity_factor;
    os << " act=" << switchyard::to_string(activation);
    if (num_shared_experts > 0) os << " shared=" << num_shared_experts << "x" << shared_ffn_size;
    if (shared_expert_gate) os << " shared_gate=sigmoid";
    if (aux_loss_coef != 0 || z_loss_coef != 0) os << " aux_coef=" << aux_loss_coef << " z_coef=" << z_loss_coef;
    os << " dtype=" << switchyard::to_string(dtype);
    if (quant_mode != QuantMode::kNone) os << " quant=" << switchyard::to_string(quant_mode);
    if (gate_up_interleaved) os << " w13=interleaved";
    return os.str();
}

}  // namespace switchyard
