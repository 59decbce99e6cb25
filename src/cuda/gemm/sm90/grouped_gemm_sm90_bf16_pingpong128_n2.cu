// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_pingpong128_n2.cu: the bf16 Pingpong 128x128x64 sm90 grouped GEMM with a
// 1x2 cluster (neighbouring N tiles of one expert share the A tile): the 128x128 tile's operand traffic from the L2
// per MMA is the highest of the tiles here, and the multicast takes a quarter of it away without rounding any M tile
// up. Template and layouts: grouped_gemm_sm90.cuh; dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GROUPED_GEMM(kBF16Pingpong128N2, cutlass::bfloat16_t, Pingpong128N2Config,
                                    "sm90 bf16 pingpong 128x128x64 cluster 1x2x1")
