// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_coop_c1_e64.cu: kBF16CooperativeC1's kernel (Cooperative 128x256x64, no
// cluster) with its epilogue's tile staged through shared memory in 128x64 subtiles (CUTLASS's choice: 128x32);
// selected by GroupedGemmArgs::epilogue (grouped_gemm.h). Template and layouts: grouped_gemm_sm90.cuh; dispatcher:
// grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GROUPED_GEMM(kBF16CooperativeC1Epi64, cutlass::bfloat16_t, CooperativeC1Epi64Config,
                                    "sm90 bf16 cooperative 128x256x64 cluster 1x1x1, epilogue e64")
