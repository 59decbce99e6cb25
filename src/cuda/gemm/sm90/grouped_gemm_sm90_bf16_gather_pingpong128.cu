// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_gather_pingpong128.cu: the bf16 sm90 grouped GEMM (pingpong 128x128x64
// cluster 1x1x1, plain epilogue) with A's rows gathered from x through the routing plan's row_token
// (gather_mainloop.cuh). Dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GATHER_GEMM(kBF16GatherPingpong128, cutlass::bfloat16_t, Pingpong128Config,
                                   "sm90 bf16 pingpong 128x128x64 cluster 1x1x1, gathered A")
