// tools/switchyard/cuda/float_types.cuh: the three float element types of the CLI's kernels (random fill, the seed's
// router), for .cu files only.
//   with_float_type(dtype, "what", [&](auto tag) { using T = typename decltype(tag)::type; ... })
//       calls the lambda with FloatTag<float>, FloatTag<__nv_bfloat16> or FloatTag<__half>; any other DType throws
//       switchyard::Error naming `what` and the dtype.
//   store_float<T>(v)  fp32 -> T, round to nearest even (as switchyard/dtype.h's host conversions).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "switchyard/dtype.h"
#include "switchyard/error.h"

namespace switchyard {
namespace cli_cuda {

template <typename T>
struct FloatTag {
    using type = T;
};

template <typename F>
void with_float_type(DType dtype, const char* what, F&& f) {
    switch (dtype) {
        case DType::kF32: f(FloatTag<float>{}); return;
        case DType::kBF16: f(FloatTag<__nv_bfloat16>{}); return;
        case DType::kF16: f(FloatTag<__half>{}); return;
        default: break;
    }
    SWITCHYARD_FAIL(what, ": dtype=", to_string(dtype), " is not supported (fp32, bf16, fp16)");
}

template <typename T>
__device__ __forceinline__ T store_float(float v);
template <>
__device__ __forceinline__ float store_float<float>(float v) {
    return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half store_float<__half>(float v) {
    return __float2half_rn(v);
}

}  // namespace cli_cuda
}  // namespace switchyard
