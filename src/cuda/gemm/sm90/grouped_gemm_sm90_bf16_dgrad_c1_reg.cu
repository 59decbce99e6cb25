// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_dgrad_c1_reg.cu: kBF16DgradC1's kernel (Cooperative 128x256x64, no cluster)
// with its epilogue storing from registers (register_epilogue.cuh); selected by GroupedGemmGradArgs::dgrad_epilogue
// (grouped_gemm.h). Template and layouts: grouped_gemm_sm90_backward.cuh; dispatcher: grouped_gemm_backward.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90_backward.cuh"

SWITCHYARD_DEFINE_SM90_GRAD_GEMM(kBF16DgradC1Reg, cutlass::bfloat16_t, CooperativeC1RegConfig, GradLayout::kDgrad,
                                 "sm90 bf16 dgrad cooperative 128x256x64 cluster 1x1x1, epilogue reg")
