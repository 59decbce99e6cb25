// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_gated.cu: the bf16 Cooperative 128x256x64 sm90 grouped GEMM (cluster
// 2x1x1) with the gated activation in its epilogue (register_epilogue.cuh). Dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GATED_GEMM(kBF16GatedCooperative, cutlass::bfloat16_t, CooperativeConfig,
                                  "sm90 bf16 cooperative 128x256x64 cluster 2x1x1, gated epilogue")
