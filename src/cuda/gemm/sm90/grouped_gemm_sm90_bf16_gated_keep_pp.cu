// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_gated_keep_pp.cu: the bf16 Pingpong sm90 grouped GEMM with a 64x256x64
// tile per warpgroup (no cluster) and the gated activation in its epilogue, storing GEMM1's product g beside h
// (register_epilogue.cuh, KeepInput: the training forward). Dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GATED_KEEP_GEMM(kBF16GatedKeepPingpong, cutlass::bfloat16_t, Pingpong64x256Config,
                                       "sm90 bf16 pingpong 64x256x64 cluster 1x1x1, gated epilogue keeping g")
