// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_dgrad.cu: the bf16 sm90 grouped GEMM of the input gradient dA = dC . B[e]
// (Cooperative 128x256x64, cluster 2x1x1; B read N-major). Template and layouts: grouped_gemm_sm90_backward.cuh;
// dispatcher: grouped_gemm_backward.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90_backward.cuh"

SWITCHYARD_DEFINE_SM90_GRAD_GEMM(kBF16Dgrad, cutlass::bfloat16_t, CooperativeConfig, GradLayout::kDgrad,
                                 "sm90 bf16 dgrad cooperative 128x256x64 cluster 2x1x1")
