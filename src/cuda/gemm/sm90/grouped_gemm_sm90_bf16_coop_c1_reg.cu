// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_coop_c1_reg.cu: kBF16CooperativeC1's kernel (Cooperative 128x256x64, no
// cluster) with its epilogue storing from registers (register_epilogue.cuh); selected by GroupedGemmArgs::epilogue
// (grouped_gemm.h). Template and layouts: grouped_gemm_sm90.cuh; dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GROUPED_GEMM(kBF16CooperativeC1Reg, cutlass::bfloat16_t, CooperativeC1RegConfig,
                                    "sm90 bf16 cooperative 128x256x64 cluster 1x1x1, epilogue reg")
