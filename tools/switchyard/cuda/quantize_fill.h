// tools/switchyard/cuda/quantize_fill.h: FP8 weight quantisation on the GPU for `switchyard bench --quant` (host-only
// header; implementation quantize_fill.cu).
//
// The bench generates its random weights on the device (random_fill.h) and quantises them there, because
// DeepSeek-V3's experts (22.5 GB in bf16) would take minutes through the host. The rules are those of
// `switchyard quantize` (tools/switchyard/io/quantize.cpp), bit for bit:
//   fp8-block   per 128x128 block of each [R, C] matrix (edge blocks partial): s = amax / 448 in fp32,
//               codes = e4m3(w / s) (fp32 division, round to nearest even, saturating to +-448); an all-zero block
//               gets s = 0 and codes 0. scales: [E, ceil(R/128), ceil(C/128)], row-major.
//   fp8-tensor  one s = amax / 448 per [R, C] matrix (for a fused w13 [2F, H] that is max(amax_gate, amax_up) / 448,
//               the scale `switchyard quantize` gives gate and up), codes as above. scales: [E].
// amax is a max of |w| (exact in any order, so the result does not depend on the launch shape); the divisions are
// IEEE fp32 (__fdiv_rn) and the conversion is cvt.rn.satfinite.e4m3 (float_to_fp8_e4m3's rules: NaN stays NaN).
// Weights of dtype fp32, bf16 or fp16 on the current device; codes [E, R, C] uint8 and scales fp32 on the device.
// Asynchronous on `stream`; nothing is allocated (fp8-tensor reduces into `scales` itself).
#pragma once

#include <cstdint>

#include "switchyard/dtype.h"
#include "switchyard/tensor.h"

namespace switchyard {
namespace cuda {

void quantize_fp8_block(DType dtype, const void* w, int64_t num_matrices, int64_t rows, int64_t cols, uint8_t* codes,
                        float* scales, cudaStream_t stream);
void quantize_fp8_tensor(DType dtype, const void* w, int64_t num_matrices, int64_t rows, int64_t cols,
                         uint8_t* codes, float* scales, cudaStream_t stream);

}  // namespace cuda
}  // namespace switchyard
