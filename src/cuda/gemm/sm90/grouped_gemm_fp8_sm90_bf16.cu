// src/cuda/gemm/sm90/grouped_gemm_fp8_sm90_bf16.cu: the e4m3 x e4m3 blockwise-scaled sm90 grouped GEMM with bf16 output
// (Cooperative 128x128x128, cluster 1x2x1). Template and layouts: grouped_gemm_fp8_sm90.cuh; dispatcher:
// src/cuda/fp8/grouped_gemm_fp8.cpp.
#include "cuda/gemm/sm90/grouped_gemm_fp8_sm90.cuh"

SWITCHYARD_DEFINE_SM90_FP8_GROUPED_GEMM(kFp8BlockwiseBF16, cutlass::bfloat16_t,
                                        "sm90 fp8e4m3 blockwise-scaled cooperative 128x128x128 cluster 1x2x1 -> bf16")
