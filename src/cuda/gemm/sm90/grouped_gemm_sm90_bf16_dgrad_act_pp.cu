// src/cuda/gemm/sm90/grouped_gemm_sm90_bf16_dgrad_act_pp.cu: the bf16 sm90 grouped GEMM of GEMM2's input gradient with
// the gated activation's backward in its epilogue, Pingpong 64x256x64 per warpgroup (no cluster): one warpgroup's
// epilogue overlaps the other's mainloop. Template: grouped_gemm_sm90_backward.cuh; dispatcher:
// grouped_gemm_backward.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90_backward.cuh"

SWITCHYARD_DEFINE_SM90_DGRAD_ACTIVATION_GEMM(kBF16DgradActivationPingpong, cutlass::bfloat16_t, Pingpong64x256Config,
                                             "sm90 bf16 dgrad pingpong 64x256x64 cluster 1x1x1, activation backward "
                                             "epilogue")
