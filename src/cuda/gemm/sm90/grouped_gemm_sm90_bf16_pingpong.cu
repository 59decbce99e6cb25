// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_pingpong.cu: the bf16 Pingpong 64x128x128 sm90 grouped GEMM, the path for few
// rows per expert (decode). Template and layouts: grouped_gemm_sm90.cuh; dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GROUPED_GEMM(kBF16Pingpong, cutlass::bfloat16_t, PingpongConfig,
                                    "sm90 bf16 pingpong 64x128x128")
