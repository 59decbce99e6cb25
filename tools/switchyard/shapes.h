// tools/switchyard/shapes.h: named layer shapes of DESIGN.md's performance table, for bench and profile.
//   mixtral      H=4096 F=14336 E=8   k=2  softmax, SwiGLU
//   qwen3        H=2048 F=768   E=128 k=8  softmax, renormalise, SwiGLU          (Qwen3-30B-A3B)
//   deepseek-v3  H=7168 F=2048  E=256 k=8  sigmoid + bias, 8 groups keep 4, renormalise, scale 2.5,
//                one shared expert of width 2048, SwiGLU
//   small        H=512  F=1792  E=8   k=2  Mixtral proportions scaled down (CPU default)
//   small-many   H=256  F=192   E=64  k=8  Qwen-like many small experts scaled down (CPU default)
#pragma once

#include <string>
#include <vector>

#include "switchyard/config.h"
#include "switchyard/error.h"

namespace switchyard {
namespace cli {

inline MoEConfig named_shape(const std::string& name, DType dtype) {
    MoEConfig c;
    c.dtype = dtype;
    c.activation = Activation::kSwiGLU;
    if (name == "mixtral") {
        c.hidden_size = 4096, c.ffn_size = 14336, c.num_experts = 8, c.top_k = 2;
    } else if (name == "qwen3") {
        c.hidden_size = 2048, c.ffn_size = 768, c.num_experts = 128, c.top_k = 8, c.renormalize = true;
    } else if (name == "deepseek-v3") {
        c.hidden_size = 7168, c.ffn_size = 2048, c.num_experts = 256, c.top_k = 8;
        c.score_function = ScoreFunction::kSigmoid, c.use_score_bias = true, c.num_groups = 8, c.topk_groups = 4;
        c.renormalize = true, c.routed_scale = 2.5, c.num_shared_experts = 1, c.shared_ffn_size = 2048;
    } else if (name == "small") {
        c.hidden_size = 512, c.ffn_size = 1792, c.num_experts = 8, c.top_k = 2;
    } else if (name == "small-many") {
        c.hidden_size = 256, c.ffn_size = 192, c.num_experts = 64, c.top_k = 8, c.renormalize = true;
    } else {
        SWITCHYARD_FAIL("unknown shape '", name, "' (mixtral, qwen3, deepseek-v3, small, small-many)");
    }
    return c;
}

inline std::vector<std::string> shape_names() { return {"mixtral", "qwen3", "deepseek-v3", "small", "small-many"}; }

}  // namespace cli
}  // namespace switchyard
