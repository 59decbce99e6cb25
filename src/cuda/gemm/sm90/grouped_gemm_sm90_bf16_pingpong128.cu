// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_pingpong128.cu: the bf16 Pingpong 128x128x64 sm90 grouped GEMM, for 33-64
// rows per expert (one warpgroup's epilogue overlaps the other's MMA). Template and layouts:
// grouped_gemm_sm90.cuh; dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GROUPED_GEMM(kBF16Pingpong128, cutlass::bfloat16_t, Pingpong128Config,
                                    "sm90 bf16 pingpong 128x128x64")
