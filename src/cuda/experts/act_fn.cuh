// src/cuda/experts/act_fn.cuh: the activation functions of the expert MLP on the device, written once for the
// activation kernel (activation.cu), the fused decode kernels (decode/decode_experts.cu) and GEMM1's gated epilogue
// (gemm/sm90/register_epilogue.cuh).
// fp32 in, fp32 out, as ref::apply_activation: SiLU v / (1 + exp(-v)) (SwiGLU), tanh-approximated GELU (GeGLU,
// GELU), ReLU.
// The derivatives (activation_grad, gated_activation_grad) are the accurate fp32 formulas of ref::activation_backward
// (activation_backward_kernel).
// kFast (the 16-bit paths: kFastAct<T>): the hardware exponential and an approximate division (__expf,
// __fdividef), and GELU written as v * sigmoid(2u) = v / (1 + exp(-2u)), u = sqrt(2/pi) (v + 0.044715 v^3), which is
// 0.5 v (1 + tanh(u)) without tanh's cancellation: relative error about 1e-6 for |v| < 10, far below a 16-bit
// rounding (2^-9 for bf16), at a third of the instructions. It matters in the gated epilogue, where the activation
// runs while the tensor cores wait. Every 16-bit path uses it, so the fused and unfused paths stay bitwise equal.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/routing/scoring.cuh"
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

// silu'(v) = s (1 + v (1 - s)) with s = sigmoid(v); the tanh-approximated GELU and its derivative.
__device__ __forceinline__ float silu_grad(float v) {
    const float s = sigmoid(v);
    return s * (1.0f + v * (1.0f - s));
}
__device__ __forceinline__ float gelu_tanh(float v) {
    constexpr float kC = 0.7978845608028654f;
    return 0.5f * v * (1.0f + tanhf(kC * (v + 0.044715f * v * v * v)));
}
__device__ __forceinline__ float gelu_tanh_grad(float v) {
    constexpr float kC = 0.7978845608028654f, kA = 0.044715f;
    const float th = tanhf(kC * (v + kA * v * v * v));
    return 0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * kC * (1.0f + 3.0f * kA * v * v);
}

// Gradients of h = act(gate) * up (kSwiGLU, kGeGLU) for dh = dv: d gate and d up, in fp32.
template <Activation kAct>
__device__ __forceinline__ void gated_activation_grad(float dv, float gate, float up, float& d_gate, float& d_up) {
    static_assert(kAct == Activation::kSwiGLU || kAct == Activation::kGeGLU, "a gated activation");
    if constexpr (kAct == Activation::kSwiGLU) {
        d_gate = dv * up * silu_grad(gate);
        d_up = dv * gate * sigmoid(gate);
    } else {
        d_gate = dv * up * gelu_tanh_grad(gate);
        d_up = dv * gelu_tanh(gate);
    }
}

// Gradient of h = act(v) (kGELU, kReLU; ReLU's derivative at 0 is 0) for dh = dv.
template <Activation kAct>
__device__ __forceinline__ float activation_grad(float dv, float v) {
    static_assert(kAct == Activation::kGELU || kAct == Activation::kReLU, "an ungated activation");
    if constexpr (kAct == Activation::kGELU) {
        return dv * gelu_tanh_grad(v);
    } else {
        return v > 0.0f ? dv : 0.0f;
    }
}

}  // namespace cuda
}  // namespace switchyard
