// src/cuda/experts/act_fn.cuh: the activation functions of the expert MLP on the device, written once for the
// activation kernel (activation.cu), the fused decode kernels (decode/decode_experts.cu) and GEMM1's gated epilogue
// (gemm/sm90/gated_epilogue.cuh).
// fp32 in, fp32 out, as ref::apply_activation: SiLU v / (1 + exp(-v)) (SwiGLU), tanh-approximated GELU (GeGLU,
// GELU), ReLU.
// kFast (the 16-bit paths: kFastAct<T>): the hardware exponential and an approximate division (__expf,
// __fdividef), and GELU written as v * sigmoid(2u) = v / (1 + exp(-2u)), u = sqrt(2/pi) (v + 0.044715 v^3), which is
// 0.5 v (1 + tanh(u)) without tanh's cancellation: relative error about 1e-6 for |v| < 10, far below a 16-bit
// rounding (2^-9 for bf16), at a third of the instructions. It matters in the gated epilogue, where the activation
// runs while the tensor cores wait. Every 16-bit path uses it, so the fused and unfused paths stay bitwise equal.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "switchyard/config.h"

namespace switchyard {
namespace cuda {

template <typename T>
constexpr bool kFastAct = sizeof(T) == 2;

// Columns of gate f and up f in a gated [rows, 2F] GEMM1 output: plain (gate [0, F), up [F, 2F)) or with w13's rows
// interleaved in blocks of 8 (config.h, gate_up_interleaved_row).
__host__ __device__ __forceinline__ int64_t gate_column(int64_t f, bool interleaved) {
    return interleaved ? gate_up_interleaved_row(f, 0) : f;
}
__host__ __device__ __forceinline__ int64_t up_column(int64_t f, int64_t ffn, bool interleaved) {
    return interleaved ? gate_up_interleaved_row(f, 1) : ffn + f;
}

template <Activation kAct, bool kFast = false>
__device__ __forceinline__ float act_fn(float v) {
    if constexpr (kFast && kAct == Activation::kSwiGLU) {
        return __fdividef(v, 1.0f + __expf(-v));
    } else if constexpr (kFast && (kAct == Activation::kGeGLU || kAct == Activation::kGELU)) {
        constexpr float kTwoSqrt2OverPi = 1.5957691216057308f;
        return __fdividef(v, 1.0f + __expf(-kTwoSqrt2OverPi * (v + 0.044715f * v * v * v)));
    } else if constexpr (kAct == Activation::kSwiGLU) {
        return v / (1.0f + expf(-v));
    } else if constexpr (kAct == Activation::kGeGLU || kAct == Activation::kGELU) {
        constexpr float kSqrt2OverPi = 0.7978845608028654f;
        return 0.5f * v * (1.0f + tanhf(kSqrt2OverPi * (v + 0.044715f * v * v * v)));
    } else {
        return v > 0.0f ? v : 0.0f;
    }
}

}  // namespace cuda
}  // namespace switchyard
