// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_gated_keep.cu: the bf16 Cooperative 128x256x64 sm90 grouped GEMM (cluster
// 2x1x1) with the gated activation in its epilogue, storing GEMM1's product g beside h (register_epilogue.cuh,
// KeepInput: the training forward). Dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GATED_KEEP_GEMM(kBF16GatedKeepCooperative, cutlass::bfloat16_t, CooperativeConfig,
                                       "sm90 bf16 cooperative 128x256x64 cluster 2x1x1, gated epilogue keeping g")
