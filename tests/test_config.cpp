// tests/test_config.cpp: MoEConfig validation (every rule throws and names the parameter and its value),
// capacity, the enum names and parsers (CLI spellings), and to_string.
#include <gtest/gtest.h>

#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "switchyard/config.h"
#include "switchyard/error.h"
#include "test_util.h"

namespace switchyard {
namespace {

// Expects cfg.validate() to throw an Error whose message holds every one of `parts`.
void expect_invalid(const MoEConfig& cfg, const std::vector<std::string>& parts) {
    try {
        cfg.validate();
        ADD_FAILURE() << "validate() accepted " << cfg.to_string() << " (expected a message with '" << parts[0] << "')";
    } catch (const Error& e) {
        const std::string msg = e.what();
        for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "missing '" << p << "' in: " << msg;
    }
}

MoEConfig valid() {
    MoEConfig c = test::tiny_config();
    c.num_experts = 8;
    c.top_k = 2;
    return c;
}

TEST(Config, ValidConfigsPass) {
    EXPECT_NO_THROW(valid().validate());
    MoEConfig ds = valid();  // DeepSeek-V3-like
    ds.num_experts = 256;
    ds.top_k = 8;
    ds.num_groups = 8;
    ds.topk_groups = 4;
    ds.score_function = ScoreFunction::kSigmoid;
    ds.use_score_bias = true;
    ds.renormalize = true;
    ds.routed_scale = 2.5;
    ds.num_shared_experts = 1;
    ds.shared_ffn_size = 16;
    ds.dtype = DType::kBF16;
    EXPECT_NO_THROW(ds.validate());
    MoEConfig edge = valid();
    edge.num_experts = 512;
    edge.top_k = 32;
    edge.capacity_factor = 1.0;
    edge.min_capacity = 4;
    EXPECT_NO_THROW(edge.validate());
    MoEConfig single = valid();
    single.num_experts = 1;
    single.top_k = 1;
    EXPECT_NO_THROW(single.validate());
}

struct Rule {
    const char* name;
    std::function<void(MoEConfig&)> mutate;
    std::vector<std::string> message_parts;
};

TEST(Config, EveryRuleThrowsNamingParameterAndValue) {
    const double inf = std::numeric_limits<double>::infinity();
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const std::vector<Rule> rules = {
        {"hidden_size zero", [](MoEConfig& c) { c.hidden_size = 0; }, {"hidden_size=0"}},
        {"hidden_size negative", [](MoEConfig& c) { c.hidden_size = -3; }, {"hidden_size=-3"}},
        {"ffn_size zero", [](MoEConfig& c) { c.ffn_size = 0; }, {"ffn_size=0"}},
        {"num_experts zero", [](MoEConfig& c) { c.num_experts = 0; }, {"num_experts=0"}},
        {"num_experts above 512", [](MoEConfig& c) { c.num_experts = 513; }, {"num_experts=513", "512"}},
        {"top_k zero", [](MoEConfig& c) { c.top_k = 0; }, {"top_k=0"}},
        {"top_k above E", [](MoEConfig& c) { c.top_k = 9; }, {"top_k=9", "num_experts=8"}},
        {"top_k above 32",
         [](MoEConfig& c) {
             c.num_experts = 64;
             c.top_k = 33;
         },
         {"top_k=33", "32"}},
        {"routed_scale inf", [inf](MoEConfig& c) { c.routed_scale = inf; }, {"routed_scale=inf"}},
        {"routed_scale nan", [nan](MoEConfig& c) { c.routed_scale = nan; }, {"routed_scale=nan"}},
        {"capacity_factor negative", [](MoEConfig& c) { c.capacity_factor = -0.5; }, {"capacity_factor=-0.5"}},
        {"capacity_factor nan", [nan](MoEConfig& c) { c.capacity_factor = nan; }, {"capacity_factor=nan"}},
        {"capacity_factor inf", [inf](MoEConfig& c) { c.capacity_factor = inf; }, {"capacity_factor=inf"}},
        {"min_capacity negative", [](MoEConfig& c) { c.min_capacity = -1; }, {"min_capacity=-1"}},
        {"num_groups zero", [](MoEConfig& c) { c.num_groups = 0; }, {"num_groups=0"}},
        {"groups do not divide E",
         [](MoEConfig& c) {
             c.num_groups = 3;
             c.topk_groups = 1;
         },
         {"num_experts=8", "not a multiple of the group count", "num_groups=3"}},
        {"topk_groups zero",
         [](MoEConfig& c) {
             c.num_groups = 4;
             c.topk_groups = 0;
         },
         {"topk_groups=0"}},
        {"topk_groups above num_groups",
         [](MoEConfig& c) {
             c.num_groups = 4;
             c.topk_groups = 5;
         },
         {"topk_groups=5", "num_groups=4"}},
        {"topk_groups above 1 without groups", [](MoEConfig& c) { c.topk_groups = 2; }, {"topk_groups=2"}},
        {"top_k beyond the kept groups",
         [](MoEConfig& c) {
             c.num_groups = 4;  // groups of 2 experts
             c.topk_groups = 1;
             c.top_k = 3;
         },
         {"top_k=3", "topk_groups=1"}},
        {"shared experts without width",
         [](MoEConfig& c) { c.num_shared_experts = 2; },
         {"shared_ffn_size=0", "num_shared_experts=2"}},
        {"shared width without experts",
         [](MoEConfig& c) { c.shared_ffn_size = 16; },
         {"shared_ffn_size=16", "num_shared_experts=0"}},
        {"num_shared_experts negative",
         [](MoEConfig& c) {
             c.num_shared_experts = -1;
             c.shared_ffn_size = 4;
         },
         {"num_shared_experts=-1"}},
        {"shared_ffn_size negative",
         [](MoEConfig& c) {
             c.num_shared_experts = 1;
             c.shared_ffn_size = -4;
         },
         {"shared_ffn_size=-4"}},
        {"aux_loss_coef nan", [nan](MoEConfig& c) { c.aux_loss_coef = nan; }, {"aux_loss_coef=nan"}},
        {"z_loss_coef inf", [inf](MoEConfig& c) { c.z_loss_coef = -inf; }, {"z_loss_coef=-inf"}},
        {"dtype int32", [](MoEConfig& c) { c.dtype = DType::kI32; }, {"dtype=int32"}},
        {"dtype int64", [](MoEConfig& c) { c.dtype = DType::kI64; }, {"dtype=int64"}},
    };
    for (const Rule& r : rules) {
        SCOPED_TRACE(r.name);
        MoEConfig c = valid();
        r.mutate(c);
        expect_invalid(c, r.message_parts);
    }
}

TEST(Config, GroupedTopKBoundIsInclusive) {
    MoEConfig c = valid();
    c.num_groups = 4;  // 2 experts per group
    c.topk_groups = 2;
    c.top_k = 4;  // exactly the 4 experts of the 2 kept groups
    EXPECT_NO_THROW(c.validate());
    c.top_k = 5;
    expect_invalid(c, {"top_k=5"});
}

TEST(Config, Capacity) {
    MoEConfig c = valid();          // E = 8, k = 2
    EXPECT_EQ(c.capacity(256), 0);  // dropless
    c.capacity_factor = 1.25;
    EXPECT_EQ(c.capacity(256), 80);  // 1.25 * 256 * 2 / 8 = 80 exactly
    EXPECT_EQ(c.capacity(10), 4);    // ceil(3.125)
    EXPECT_EQ(c.capacity(1), 1);     // ceil(0.3125)
    EXPECT_EQ(c.capacity(0), 0);
    c.min_capacity = 6;
    EXPECT_EQ(c.capacity(10), 6);    // max(min_capacity, 4)
    EXPECT_EQ(c.capacity(100), 32);  // ceil(31.25) beats min_capacity
    EXPECT_EQ(c.capacity(0), 0);     // clamped to T: no expert can receive more pairs than there are tokens
    EXPECT_EQ(c.capacity(3), 3);     // min_capacity 6 > T = 3
    c.capacity_factor = 0.0;
    EXPECT_EQ(c.capacity(100), 0);  // capacity_factor 0 means dropless whatever min_capacity says
}

// Issue 16, item 6: capacity_factor 1e19 overflowed the double -> int64 conversion (undefined behaviour; it gave
// capacity 1 with --min-capacity 1, and 0 under expert choice). Now every huge or extreme factor gives T, the
// no-drop capacity, and the arithmetic never converts an out-of-range double.
TEST(Config, CapacityHugeFactorIsTheNoDropCapacity) {
    MoEConfig c = valid();  // E = 8, k = 2
    c.min_capacity = 1;
    for (double cf : {1e19, 1e300, std::numeric_limits<double>::max(), 9.3e18, 4.6e18}) {
        c.capacity_factor = cf;
        EXPECT_EQ(c.capacity(10), 10) << "capacity_factor " << cf;
        EXPECT_EQ(c.capacity(int64_t{1} << 40), int64_t{1} << 40) << "capacity_factor " << cf;
        EXPECT_EQ(c.expert_choice_capacity(10), 10) << "capacity_factor " << cf;
    }
    c.capacity_factor = 1e-300;  // tiny: ceil gives 1
    EXPECT_EQ(c.capacity(10), 1);
    c.min_capacity = std::numeric_limits<int64_t>::max();
    c.capacity_factor = 1.0;
    EXPECT_EQ(c.capacity(10), 10);
    EXPECT_EQ(c.expert_choice_capacity(10), 10);
}

// Issue 16, item 7: config values are finite in the dtype they are used in (routed_scale scales fp32 weights).
TEST(Config, RoutedScaleMustBeFiniteInFp32) {
    MoEConfig c = valid();
    c.routed_scale = 1e39;  // finite double, inf in fp32
    expect_invalid(c, {"routed_scale=1e+39", "fp32"});
    c.routed_scale = -1e39;
    expect_invalid(c, {"routed_scale"});
    c.routed_scale = static_cast<double>(std::numeric_limits<float>::max());
    EXPECT_NO_THROW(c.validate());
    c.routed_scale = 2.5;
    c.bias_update_rate = 1e39;
    expect_invalid(c, {"bias_update_rate"});
}

TEST(Config, WidthHelpers) {
    MoEConfig c = valid();
    EXPECT_EQ(c.w13_rows(), 2 * c.ffn_size);
    c.activation = Activation::kGeGLU;
    EXPECT_EQ(c.w13_rows(), 2 * c.ffn_size);
    c.activation = Activation::kGELU;
    EXPECT_EQ(c.w13_rows(), c.ffn_size);
    c.activation = Activation::kReLU;
    EXPECT_EQ(c.w13_rows(), c.ffn_size);
    c.num_shared_experts = 2;
    c.shared_ffn_size = 5;
    EXPECT_EQ(c.shared_width(), 10);
}

TEST(Config, EnumNamesRoundTrip) {
    for (auto s : {ScoreFunction::kSoftmax, ScoreFunction::kTopkSoftmax, ScoreFunction::kSigmoid})
        EXPECT_EQ(parse_score_function(to_string(s)), s);
    for (auto p : {DropPolicy::kPosition, DropPolicy::kProbability}) EXPECT_EQ(parse_drop_policy(to_string(p)), p);
    for (auto a : {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGELU, Activation::kReLU})
        EXPECT_EQ(parse_activation(to_string(a)), a);
    EXPECT_STREQ(to_string(ScoreFunction::kTopkSoftmax), "topk-softmax");
    EXPECT_EQ(parse_score_function("softmax"), ScoreFunction::kSoftmax);
    EXPECT_EQ(parse_score_function("topk-softmax"), ScoreFunction::kTopkSoftmax);
    EXPECT_EQ(parse_score_function("sigmoid"), ScoreFunction::kSigmoid);
    EXPECT_EQ(parse_drop_policy("position"), DropPolicy::kPosition);
    EXPECT_EQ(parse_drop_policy("probability"), DropPolicy::kProbability);
    EXPECT_EQ(parse_activation("swiglu"), Activation::kSwiGLU);
    EXPECT_EQ(parse_activation("geglu"), Activation::kGeGLU);
    EXPECT_EQ(parse_activation("gelu"), Activation::kGELU);
    EXPECT_EQ(parse_activation("relu"), Activation::kReLU);
    EXPECT_TRUE(is_gated(Activation::kSwiGLU));
    EXPECT_TRUE(is_gated(Activation::kGeGLU));
    EXPECT_FALSE(is_gated(Activation::kGELU));
    EXPECT_FALSE(is_gated(Activation::kReLU));
}

TEST(Config, ParsersNameTheBadValue) {
    const std::vector<std::pair<std::string, std::function<void()>>> cases = {
        {"tanh", [] { parse_activation("tanh"); }},
        {"softermax", [] { parse_score_function("softermax"); }},
        {"random", [] { parse_drop_policy("random"); }},
    };
    for (const auto& c : cases) {
        try {
            c.second();
            ADD_FAILURE() << c.first << " was accepted";
        } catch (const Error& e) {
            EXPECT_NE(std::string(e.what()).find(c.first), std::string::npos) << e.what();
        }
    }
}

TEST(Config, ToStringMentionsTheShape) {
    MoEConfig c = valid();
    c.dtype = DType::kBF16;
    c.activation = Activation::kGeGLU;
    const std::string s = c.to_string();
    for (const char* part : {"H=8", "F=6", "E=8", "k=2", "softmax", "geglu", "bf16", "dropless"})
        EXPECT_NE(s.find(part), std::string::npos) << part << " missing in " << s;
    c.capacity_factor = 1.5;
    c.drop_policy = DropPolicy::kProbability;
    EXPECT_NE(c.to_string().find("probability"), std::string::npos) << c.to_string();
}

}  // namespace
}  // namespace switchyard
