// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_gated_gather.cu: kBF16GatedCooperative (Cooperative 128x256x64, 2x1
// cluster multicasting the weight tile, the gated epilogue) with A's rows gathered from x (gather_mainloop.cuh).
// Dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GATED_GATHER_GEMM(kBF16GatedGatherCooperative, cutlass::bfloat16_t, CooperativeConfig,
                                         "sm90 bf16 cooperative 128x256x64 cluster 2x1x1, gathered A, gated epilogue")
