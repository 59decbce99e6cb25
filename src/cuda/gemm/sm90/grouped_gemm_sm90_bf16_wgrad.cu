// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_wgrad.cu: the bf16 sm90 grouped GEMM of the weight gradient dB[e] = dC_e^T . A_e:
// Cooperative 128x256x64, cluster 2x1x1 (the forward's largest tile; it beat the 128x128x64 tile used before on
// every training GEMM measured on an H100, bench/NOTES.md); both operands MN-major, reduction length rows_e.
// Template and layouts: grouped_gemm_sm90_backward.cuh; dispatcher: grouped_gemm_backward.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90_backward.cuh"

SWITCHYARD_DEFINE_SM90_GRAD_GEMM(kBF16Wgrad, cutlass::bfloat16_t, CooperativeConfig, GradLayout::kWgrad,
                                 "sm90 bf16 wgrad cooperative 128x256x64 cluster 2x1x1")
