// tools/switchyard/io/quantize.h: FP8 quantisation of a checkpoint's expert projections (`switchyard quantize`,
// docs/fp8.md "Quantize").
//
// Which tensors: every `<P>block_sparse_moe.experts.{i}.{w1,w2,w3}.weight` (Mixtral names) and every
// `<P>mlp.experts.{i}.{gate,up,down}_proj.weight` / `<P>mlp.shared_experts.*` / `<P>mlp.shared_expert.*`
// (Qwen/DeepSeek names) whose name starts with the prefix (so an empty prefix takes every layer of a shard). Each
// must be a 2-D F32, BF16 or F16 matrix with finite values and no scale tensor beside it yet. Everything else (the
// router gate, the selection bias, Qwen2-MoE's shared_expert_gate, attention, norms, tensors of dtypes this
// reader cannot compute with) is copied byte for byte. Metadata is kept; `quantization_config` (the JSON of a
// Hugging Face config's quantization_config) and `switchyard_quantize` are set.
//
// The recipe (weights only; activations are quantised at run time, "activation_scheme": "dynamic"):
//   fp8-block:  per 128x128 block (edge blocks partial) s = amax / 448 in fp32, q = e4m3(w / s) (fp32 division,
//               round to nearest even); written as F8_E4M3 `<base>weight` + F32 `<base>weight_scale_inv`
//               [ceil(rows/128), ceil(cols/128)] (DeepSeek-V3's format; the scale multiplies).
//   fp8-tensor: one s per matrix, except that an expert's gate and up projections (w1 and w3) share
//               s = max(amax_gate, amax_up) / 448, so the fused w13 the loader builds needs no requantisation;
//               written as F8_E4M3 + F32 `<base>weight_scale` [] (llm-compressor's format, no input_scale).
//   An all-zero block or matrix gets s = 0 and codes 0 (as the activation recipe does), never 0/0.
// All computation happens before anything is written; the output appears atomically (file_util.h) or not at all.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "switchyard/config.h"

namespace switchyard {
namespace io {

struct QuantizeOptions {
    std::string prefix;                          // only expert projections whose names start with it
    QuantMode mode = QuantMode::kFP8Block;       // kFP8Block or kFP8Tensor
};

struct QuantizeSummary {
    int64_t matrices = 0;        // expert projections quantised
    int64_t copied = 0;          // tensors copied unchanged
    uint64_t bytes_before = 0;   // the quantised matrices' bytes in the input
    uint64_t bytes_after = 0;    // their codes and scales in the output
};

// Codes and scales of one [rows, cols] fp32 matrix. Block: scales [ceil(rows/128) * ceil(cols/128)], row-major.
// Tensor: scale is given (shared by gate and up); codes = e4m3(w / scale), or 0 when scale is 0.
void quantize_fp8_block(const float* w, int64_t rows, int64_t cols, uint8_t* codes, float* scales);
void quantize_fp8_with_scale(const float* w, int64_t n, float scale, uint8_t* codes);
// amax / 448 in fp32 (0 for amax 0).
float fp8_scale_for_amax(float amax);

// Quantises `in`'s expert projections under opts.prefix and writes the checkpoint to out_path. Throws
// switchyard::Error naming the file and the tensor (nothing written) on: no expert projection under the prefix,
// a projection already F8_E4M3 or of another non-float dtype, a non-2-D projection, a non-finite value, a scale
// tensor already beside a projection.
QuantizeSummary quantize_checkpoint(const SafetensorsFile& in, const std::string& out_path, const QuantizeOptions& opts);

}  // namespace io
}  // namespace switchyard
