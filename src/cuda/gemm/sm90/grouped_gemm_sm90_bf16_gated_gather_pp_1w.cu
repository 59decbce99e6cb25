// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_gated_gather_pp_1w.cu: kBF16GatedGatherPingpong with one producer warp
// copying A's gathered rows (gather_mainloop.cuh's ProducerWarps = 1, the form before two warps), selected by
// GroupedGemmArgs::gather_producer_warps = 1 for comparison. Dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GATED_GATHER_1W_GEMM(kBF16GatedGatherPingpong1W, cutlass::bfloat16_t, Pingpong64x256Config,
                                            "sm90 bf16 pingpong 64x256x64 cluster 1x1x1, gathered A "
                                            "(one producer warp), gated epilogue")
