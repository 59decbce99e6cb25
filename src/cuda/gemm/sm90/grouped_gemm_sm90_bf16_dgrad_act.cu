// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_dgrad_act.cu: the bf16 sm90 grouped GEMM of GEMM2's input gradient with the
// gated activation's backward in its epilogue (Cooperative 128x256x64, cluster 2x1x1, as the plain dgrad). Template:
// grouped_gemm_sm90_backward.cuh; epilogue: gated_epilogue.cuh; dispatcher: grouped_gemm_backward.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90_backward.cuh"

SWITCHYARD_DEFINE_SM90_DGRAD_ACTIVATION_GEMM(kBF16DgradActivation, cutlass::bfloat16_t, CooperativeConfig,
                                             "sm90 bf16 dgrad cooperative 128x256x64 cluster 2x1x1, activation "
                                             "backward epilogue")
