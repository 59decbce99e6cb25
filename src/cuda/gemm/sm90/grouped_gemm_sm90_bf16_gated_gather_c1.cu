// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_gated_gather_c1.cu: kBF16GatedCooperativeC1 (Cooperative 128x256x64, no
// cluster, the gated epilogue) with A's rows gathered from x (gather_mainloop.cuh). Dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GATED_GATHER_GEMM(kBF16GatedGatherCooperativeC1, cutlass::bfloat16_t, CooperativeC1Config,
                                         "sm90 bf16 cooperative 128x256x64 cluster 1x1x1, gathered A, gated epilogue")
