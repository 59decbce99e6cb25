// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_wgrad_reg.cu: kBF16Wgrad's kernel (Cooperative 128x256x64, cluster 2x1x1)
// with its epilogue storing from registers (register_epilogue.cuh); selected by GroupedGemmGradArgs::wgrad_epilogue
// (grouped_gemm.h). Template and layouts: grouped_gemm_sm90_backward.cuh; dispatcher: grouped_gemm_backward.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90_backward.cuh"

SWITCHYARD_DEFINE_SM90_GRAD_GEMM(kBF16WgradReg, cutlass::bfloat16_t, CooperativeRegConfig, GradLayout::kWgrad,
                                 "sm90 bf16 wgrad cooperative 128x256x64 cluster 2x1x1, epilogue reg")
