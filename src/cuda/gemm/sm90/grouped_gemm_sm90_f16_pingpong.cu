// src/cuda/gemm/sm90/grouped_gemm_sm90_f16_pingpong.cu: the fp16 Pingpong 64x128x128 sm90 grouped GEMM (decode sizes).
// Template and layouts: grouped_gemm_sm90.cuh; dispatcher: grouped_gemm.cu.
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

SWITCHYARD_DEFINE_SM90_GROUPED_GEMM(kF16Pingpong, cutlass::half_t, PingpongConfig, "sm90 fp16 pingpong 64x128x128")
