// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_wgrad_pp.cu: the bf16 sm90 grouped GEMM of the weight gradient
// dB[e] = dC_e^T . A_e with the Pingpong schedule (128x128x64 per consumer warpgroup, cluster 2x1x1: the A_e^T tile
// multicast to two M tiles, i.e. two row blocks of the weight, which never round up: M is the weight's N). With a
// short reduction (an expert's rows: 512-1024 for DeepSeek-V3 and Qwen3 at T = 16384) the Cooperative tile's
// epilogue (the dB tile's store) stops the tensor cores for a large share of each tile; here one warpgroup's
// epilogue runs under the other's mainloop. Template and layouts: grouped_gemm_sm90_backward.cuh; dispatcher:
// grouped_gemm_backward.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90_backward.cuh"

SWITCHYARD_DEFINE_SM90_GRAD_GEMM(kBF16WgradPingpong, cutlass::bfloat16_t, Pingpong128M2Config, GradLayout::kWgrad,
                                 "sm90 bf16 wgrad pingpong 128x128x64 cluster 2x1x1")
