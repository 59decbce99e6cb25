// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_dgrad_n2.cu: the bf16 sm90 grouped GEMM of the input gradient dA = dC . B[e]
// with a 1x2 cluster (Cooperative 128x256x64; the dgrad's M is the expert's rows, so the 2x1 cluster rounds them up
// as in the forward). Template and layouts: grouped_gemm_sm90_backward.cuh; dispatcher: grouped_gemm_backward.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90_backward.cuh"

SWITCHYARD_DEFINE_SM90_GRAD_GEMM(kBF16DgradN2, cutlass::bfloat16_t, CooperativeN2Config, GradLayout::kDgrad,
                                 "sm90 bf16 dgrad cooperative 128x256x64 cluster 1x2x1")
