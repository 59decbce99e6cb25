// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_coop_n2.cu: the bf16 Cooperative 128x256x64 sm90 grouped GEMM with a 1x2
// cluster (neighbouring N tiles of one expert share the A tile), for experts of a few M tiles each: no M tile is
// rounded up to a cluster pair. Template and layouts: grouped_gemm_sm90.cuh; dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GROUPED_GEMM(kBF16CooperativeN2, cutlass::bfloat16_t, CooperativeN2Config,
                                    "sm90 bf16 cooperative 128x256x64 cluster 1x2x1")
