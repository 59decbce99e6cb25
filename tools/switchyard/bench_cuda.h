// tools/switchyard/bench_cuda.h: timing of the CUDA layer with CUDA events (CUDA builds only).
//
// time_cuda_layer runs MoELayer::forward on a private stream: `warmup` runs, then `reps` runs each between two
// events (median reported), over `copies` input buffers rotated so that the inputs read exceed twice the L2;
// then the same forward captured in CUDA graphs (one per input copy) and replayed (median); then, when asked,
// the stage breakdown from MoELayer::forward's StageCallback with an event after each stage (median per stage). The routing that the
// timed forwards use is read back once (LoadStats) for the floor: kept rows and experts actually hit.
#pragma once

#ifdef SWITCHYARD_WITH_CUDA
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cli_common.h"
#include "switchyard/switchyard.h"

namespace switchyard {
namespace cli {

struct CudaLayerTiming {
    int64_t num_tokens = 0;
    double eager_ms = 0;  // median over reps, CUDA events around each forward
    double graph_ms = 0;  // median over reps of one graph replay (0 when not measured)
    std::vector<std::pair<std::string, double>> stages;  // median ms per stage, in forward order
    size_t workspace_bytes = 0;  // all the memory a forward uses beyond x, y and the weights
    int64_t kept_rows = 0;
    int64_t experts_hit = 0;
    int input_copies = 1;
    bool fused = false;  // the forward took the fused small-batch path
    bool gathered_in_gemm1 = false;  // the staged chain's GEMM1 read x through the plan (uses_gather_in_gemm1)
    LoadStats stats;
};

// nn.Linear-like random weights generated on the current device: uniform(-1/sqrt(in), 1/sqrt(in)) in the
// config's dtype, score bias uniform(-0.1, 0.1) fp32 when cfg.use_score_bias.
DeviceWeights random_device_weights(const MoEConfig& cfg, uint64_t seed);

// What the check of the GPU quantiser found: the first and last matrix of w13 and of w2 (and the shared expert's
// matrices) copied back and quantised again on the host by io/quantize.h's recipe (bench_quant.h), codes and
// scales compared bit for bit.
struct Fp8QuantCheck {
    int64_t matrices = 0;          // matrices compared
    int64_t elements = 0;          // codes compared
    int64_t code_mismatches = 0;   // codes that differ from the host recipe's
    int64_t scale_mismatches = 0;  // scales that differ (bits)
    std::string first_mismatch;    // where the first difference is ("" when none)
    bool ok() const { return matrices > 0 && code_mismatches == 0 && scale_mismatches == 0; }
};

// FP8 weights for cfg.quant_mode (fp8-block or fp8-tensor): the float weights random_device_weights generates (same
// seeds and bounds, so the same values in cfg.dtype), with w13, w2, shared_w13 and shared_w2 quantised on the GPU
// (cuda/quantize_fill.h, the rules of `switchyard quantize`) one tensor at a time, each float copy freed before the
// next is generated (DeepSeek-V3's experts are 22.5 GB in bf16; the peak is one float tensor plus the codes).
// Router gate and score bias stay as random_device_weights makes them. check: fill *check_result (see above).
DeviceWeights random_device_weights_fp8(const MoEConfig& cfg, uint64_t seed, bool check, Fp8QuantCheck* check_result);

// fused_max_tokens: MoELayer::set_fused_max_tokens (-1 automatic, 0 the staged path only); gather_in_gemm1:
// MoELayer::set_gather_in_gemm1 (kAuto: the layer's default).
CudaLayerTiming time_cuda_layer(const MoEConfig& cfg, const MoEWeights& device_weights, int64_t num_tokens,
                                int warmup, int reps, uint64_t seed, bool graph, bool stages,
                                int64_t fused_max_tokens = 0,
                                GatherInGemm1 gather_in_gemm1 = GatherInGemm1::kAuto);

}  // namespace cli
}  // namespace switchyard
#endif
