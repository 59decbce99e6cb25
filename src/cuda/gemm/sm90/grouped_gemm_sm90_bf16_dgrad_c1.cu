// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_dgrad_c1.cu: the bf16 sm90 grouped GEMM of the input gradient dA = dC . B[e]
// without a cluster (Cooperative 128x256x64, cluster 1x1x1): the dgrad's M is the expert's rows, and the 2x1
// cluster rounds each expert's M tiles up to a pair, as in the forward (kCooperative128x256C1 there). Template and
// layouts: grouped_gemm_sm90_backward.cuh; dispatcher: grouped_gemm_backward.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90_backward.cuh"

SWITCHYARD_DEFINE_SM90_GRAD_GEMM(kBF16DgradC1, cutlass::bfloat16_t, CooperativeC1Config, GradLayout::kDgrad,
                                 "sm90 bf16 dgrad cooperative 128x256x64 cluster 1x1x1")
