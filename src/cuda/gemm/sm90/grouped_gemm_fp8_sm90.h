// src/cuda/gemm/sm90/grouped_gemm_fp8_sm90.h: internal interface between the FP8 grouped GEMM dispatcher
// (src/cuda/fp8/grouped_gemm_fp8.cpp) and its CUTLASS sm90 instantiations (grouped_gemm_fp8_sm90_*.cu), one per
// output dtype. Host-only header: no CUTLASS types here.
//
// Workspace layout of every instantiation (inside the caller's workspace, 256-byte aligned pieces):
//   [problem shapes [E]] [ptr A, B, D, SFA, SFB [E] each] [stride A, B, D [E] each] [CUTLASS workspace]
// A small kernel fills the arrays from the device offsets (no host synchronisation), then the persistent CUTLASS
// kernel runs with host problem shapes null (as the 16-bit grouped GEMM, grouped_gemm_sm90.h).
#pragma once

#include "cuda/gemm/grouped_gemm.h"
#include "cuda/gemm/sm90/grouped_gemm_sm90.h"

namespace switchyard {
namespace cuda {
namespace sm90 {

using Fp8GemmOps = GemmOpsOf<Fp8GroupedGemmArgs>;

extern const Fp8GemmOps kFp8BlockwiseBF16;  // grouped_gemm_fp8_sm90_bf16.cu
extern const Fp8GemmOps kFp8BlockwiseF16;   // grouped_gemm_fp8_sm90_f16.cu
extern const Fp8GemmOps kFp8BlockwiseF32;   // grouped_gemm_fp8_sm90_f32.cu

inline const Fp8GemmOps& fp8_ops_for(DType out_dtype) {
    switch (out_dtype) {
        case DType::kF16: return kFp8BlockwiseF16;
        case DType::kF32: return kFp8BlockwiseF32;
        default: return kFp8BlockwiseBF16;
    }
}

}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
