// src/cuda/grouped_gemm_sm90_bf16_wgrad.cu: the bf16 sm90 grouped GEMM of the weight gradient dB[e] = dC_e^T . A_e
// (Cooperative 128x128x64, cluster 1x1x1; both operands MN-major, reduction length rows_e). Template and layouts:
// grouped_gemm_sm90_backward.cuh; dispatcher: grouped_gemm_backward.cu.
#include "cuda/grouped_gemm_sm90_backward.cuh"

SWITCHYARD_DEFINE_SM90_GRAD_GEMM(kBF16Wgrad, cutlass::bfloat16_t, Cooperative128x128Config, GradLayout::kWgrad,
                                 "sm90 bf16 wgrad cooperative 128x128x64 cluster 1x1x1")
