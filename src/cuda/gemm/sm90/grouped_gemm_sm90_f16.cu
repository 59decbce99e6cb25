// src/cuda/gemm/sm90/grouped_gemm_sm90_f16.cu: the fp16 Cooperative 128x256x64 (cluster 2x1x1) sm90 grouped GEMM.
// Template and layouts: grouped_gemm_sm90.cuh; dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GROUPED_GEMM(kF16Cooperative, cutlass::half_t, CooperativeConfig,
                                    "sm90 fp16 cooperative 128x256x64 cluster 2x1x1")
