// tools/switchyard/io/weights.h: owned host weights for one MoE layer: loaded from a Hugging Face safetensors shard, or
// seeded random.
//
// Naming schemes (names are `<prefix><name>`; the prefix is e.g. "model.layers.3."):
//   Mixtral:        block_sparse_moe.gate.weight [E, H];
//                   block_sparse_moe.experts.{i}.w1.weight [F, H] (gate), .w3.weight [F, H] (up),
//                   .w2.weight [H, F] (down)
//   Qwen/DeepSeek:  mlp.gate.weight [E, H]; optional mlp.gate.e_score_correction_bias [E];
//                   mlp.experts.{i}.gate_proj.weight [F, H], .up_proj.weight [F, H], .down_proj.weight [H, F];
//                   optional shared experts mlp.shared_experts.{gate_proj,up_proj,down_proj}.weight
//                   (DeepSeek) or mlp.shared_expert.* (Qwen2-MoE) with S rows ([S, H], [S, H], [H, S]).
// The scheme is detected from the router weight's name. E and H come from the router weight, F from the
// first expert; every other tensor must agree (Error naming the tensor and both shapes otherwise).
// w13 is built as [E, 2F, H]: gate rows [0, F) then up rows [F, 2F) (gated activations: SwiGLU, GeGLU).
// Ungated activations (GELU, ReLU) use the single input projection: Mixtral's w1 (w3 must be absent) or
// up_proj (gate_proj must be absent), giving w13 [E, F, H]; a gate tensor present with an ungated
// activation is an error (it would be silently ignored otherwise).
// Dtypes: weights F32, BF16 or F16, as stored (one dtype for all routed experts' tensors, one for the shared
// MLP; the router weight keeps its own); the selection bias is converted exactly to fp32.
// FP8 experts (docs/fp8.md, "Loading"): routed expert matrices in F8_E4M3 make an FP8 layer; each such matrix
// `<base>weight` needs its scale beside it: `<base>weight_scale_inv` [ceil(rows/128), ceil(cols/128)] (block
// scales, DeepSeek-V3 / Qwen3-FP8: quant_mode fp8-block) or `<base>weight_scale` [] or [1] (per tensor,
// llm-compressor: fp8-tensor), plus optionally `<base>input_scale` [] or [1] (static activation scale,
// fp8-tensor only). Scales may be F32, BF16 or F16 (read exactly into fp32 MoEWeights scale tensors); weight
// scales finite and >= 0, input scales finite and > 0. The shared expert may be F8_E4M3 (same scheme) or float;
// the router is never quantised. Block mode with a gated activation needs F % 128 == 0 (and S % 128 == 0 for an
// F8_E4M3 shared expert): w13 fuses [gate; up] and one 128-row scale block must not hold rows of both.
// Per-tensor mode fuses gate's and up's scales into one w13 scale: the larger, with the other matrix's codes
// requantised to it (a note says so; vLLM does the same); GEMM1's static input scale is the larger of gate's and
// up's. Errors name the tensor: a missing scale, both scale kinds, a scale beside a float weight, a shape
// mismatch, a non-finite or negative scale, an fp8 NaN code (0x7f / 0xff, always an error), F8_E4M3 mixed with
// float routed experts, two schemes in one layer, input scales on some experts only.
// Qwen2-MoE's mlp.shared_expert_gate.weight (a sigmoid gate on the shared expert) is not part of the layer
// contract: it is ignored and reported in LoadedWeights::notes, as is every other tensor under the MoE block's
// prefix (`block_sparse_moe.` or `mlp.`) that the layer does not use.
// Rejected rather than ignored: both schemes' router weights under one prefix, expert tensors with an index
// >= E (or not a number), shared-expert tensors without down_proj, both shared-expert spellings, more than
// MoEConfig::kMaxExperts experts, and (unless allow_non_finite) NaN/Inf in a used weight.
// Every tensor is checked (presence, dtype, shape) before anything is allocated, so the buffers never exceed
// the bytes the file's tensors hold.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "switchyard/config.h"
#include "switchyard/moe_layer.h"

namespace switchyard {
namespace io {

// Host buffers and the MoEWeights views into them. Movable (the views stay valid), not copyable.
struct OwnedWeights {
    MoEWeights w;
    std::vector<std::vector<uint8_t>> buffers;

    OwnedWeights() = default;
    OwnedWeights(OwnedWeights&&) = default;
    OwnedWeights& operator=(OwnedWeights&&) = default;
    OwnedWeights(const OwnedWeights&) = delete;
    OwnedWeights& operator=(const OwnedWeights&) = delete;

    // Allocates a zeroed buffer and returns a contiguous view of it.
    TensorRef allocate(DType dtype, const std::vector<int64_t>& shape);
};

enum class NamingScheme : int { kMixtral = 0, kQwenDeepSeek = 1 };
const char* to_string(NamingScheme s);

struct WeightLoadOptions {
    std::string prefix;  // prepended to every name
    Activation activation = Activation::kSwiGLU;
    int64_t num_shared_experts = -1;  // -1: 1 when shared tensors exist, else 0; 0: ignore them;
                                      // N > 0: they must exist and S must be a multiple of N
    bool use_score_bias = true;       // load e_score_correction_bias when present
    bool allow_non_finite = false;    // false: a NaN or Inf in any used weight is an error naming the tensor
};

struct LoadedWeights {
    NamingScheme scheme = NamingScheme::kMixtral;
    int64_t hidden_size = 0, ffn_size = 0, num_experts = 0;
    int64_t num_shared_experts = 0, shared_ffn_size = 0;  // shared width S = product
    bool has_score_bias = false;
    bool has_shared_gate = false;  // Qwen2-MoE's shared_expert_gate.weight was loaded (MoEConfig::shared_expert_gate)
    DType expert_dtype = DType::kF32;              // F8_E4M3 for FP8 experts
    QuantMode quant_mode = QuantMode::kNone;       // from the scale tensors beside F8_E4M3 experts
    std::vector<std::string> notes;  // tensors present but not used, etc.
    OwnedWeights owned;

    // Sets hidden/ffn/experts/shared sizes, shared_expert_gate, use_score_bias and quant_mode of cfg from the
    // weights.
    void apply_to(MoEConfig& cfg) const;
};

// Detects the scheme under opts.prefix and loads one layer. Errors name the file and the tensor.
LoadedWeights load_moe_weights(const SafetensorsFile& file, const WeightLoadOptions& opts);

// Seeded random weights for cfg (sizes, activation, shared experts), every weight in cfg.dtype (router gate
// too), values uniform(-1/sqrt(in), 1/sqrt(in)) like nn.Linear's init; score_bias [E] fp32 uniform(-0.1, 0.1)
// always filled. The same (cfg, seed) gives the same bits on every platform (own generator, no <random>).
OwnedWeights random_weights(const MoEConfig& cfg, uint64_t seed);

// First non-finite element (Inf or NaN) of n values of a float dtype (fp32, bf16, fp16) at data, or -1.
int64_t first_non_finite(const void* data, DType dt, int64_t n);

// n values uniform in [lo, hi) rounded to dtype (float dtypes only), as raw little-endian bytes.
std::vector<uint8_t> random_values(DType dtype, int64_t n, double lo, double hi, uint64_t seed);

// Deterministic 64-bit generator (splitmix64) shared by the random helpers and the CLI.
class SplitMix64 {
 public:
    explicit SplitMix64(uint64_t seed) : s_(seed) {}
    uint64_t next() {
        uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)

 private:
    uint64_t s_;
};

// Contiguous host TensorRef without the library's out-of-line constructor (keeps src/io self-contained).
TensorRef host_tensor(void* data, DType dtype, const std::vector<int64_t>& shape);

}  // namespace io
}  // namespace switchyard
