// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_gated_gather_pp.cu: kBF16GatedPingpong (Pingpong 64x256x64, no cluster,
// the gated epilogue) with A's rows gathered from x through the routing plan's row_token (gather_mainloop.cuh).
// Dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GATED_GATHER_GEMM(kBF16GatedGatherPingpong, cutlass::bfloat16_t, Pingpong64x256Config,
                                         "sm90 bf16 pingpong 64x256x64 cluster 1x1x1, gathered A, gated epilogue")
