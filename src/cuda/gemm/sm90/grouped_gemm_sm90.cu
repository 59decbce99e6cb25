// src/cuda/gemm/sm90/grouped_gemm_sm90.cu: the bf16 Cooperative 128x256x64 (cluster 2x1x1) sm90 grouped GEMM, the path for
// large per-expert row counts. Template and layouts: grouped_gemm_sm90.cuh; dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GROUPED_GEMM(kBF16Cooperative, cutlass::bfloat16_t, CooperativeConfig,
                                    "sm90 bf16 cooperative 128x256x64 cluster 2x1x1")
