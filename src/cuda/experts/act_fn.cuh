// src/cuda/experts/act_fn.cuh: the activation functions of the expert MLP on the device, written once for the
// activation kernel (activation.cu) and the fused decode kernels (decode/decode_experts.cu).
// fp32 in, fp32 out, as ref::apply_activation: SiLU v / (1 + exp(-v)) (SwiGLU), tanh-approximated GELU (GeGLU,
// GELU), ReLU.
#pragma once

#include <cuda_runtime.h>

#include "switchyard/config.h"

namespace switchyard {
namespace cuda {

template <Activation kAct>
__device__ __forceinline__ float act_fn(float v) {
    if constexpr (kAct == Activation::kSwiGLU) {
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
