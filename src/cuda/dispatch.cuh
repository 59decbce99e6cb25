// src/cuda/dispatch.cuh: the one place where a runtime DType becomes a compile-time element type.
//
//   dispatch_float_dtype(dtype, "name", [&](auto tag) { using T = typename decltype(tag)::type; ... });
// calls the lambda with TypeTag<float>, TypeTag<__nv_bfloat16> or TypeTag<__half> and throws
// switchyard::Error naming `what` and the dtype for any other DType. Conversions to and from fp32 for the
// three types are here too (round to nearest even, as the host conversions in switchyard/dtype.h).
#pragma once

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "switchyard/dtype.h"
#include "switchyard/error.h"

namespace switchyard {
namespace cuda {

template <typename T>
struct TypeTag {
    using type = T;
};

template <typename F>
void dispatch_float_dtype(DType dtype, const char* what, F&& f) {
    switch (dtype) {
        case DType::kF32: f(TypeTag<float>{}); return;
        case DType::kBF16: f(TypeTag<__nv_bfloat16>{}); return;
        case DType::kF16: f(TypeTag<__half>{}); return;
        default: break;
    }
    SWITCHYARD_FAIL(what, ": dtype=", to_string(dtype), " is not supported (fp32, bf16, fp16)");
}

// Element <-> fp32: exact widening; narrowing rounds to nearest even (switchyard/dtype.h does the same on the host).
template <typename T>
__device__ __forceinline__ float to_f32(T v) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) return __bfloat162float(v);
    else if constexpr (std::is_same<T, __half>::value) return __half2float(v);
    else return v;
}
template <typename T>
__device__ __forceinline__ T from_f32(float v) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16_rn(v);
    else if constexpr (std::is_same<T, __half>::value) return __float2half_rn(v);
    else return v;
}

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

// A slot_row entry as the kernels use it: a row below num_rows, or -1 (dropped). The CPU backend refuses entries
// >= num_rows; on the device they are skipped rather than read or written out of range.
__device__ __forceinline__ int32_t slot_in_range(int32_t r, int64_t num_rows) { return r < num_rows ? r : -1; }

// 16 bytes of T, loaded and stored as one uint4.
template <typename T>
struct alignas(16) Vec16 {
    T v[kVecElems<T>];
};

// acc[q] = fma(w[j], rows[r_j][i-th vector][q], acc[q]) over the slots j = 0..top_k-1 in order, skipping r_j < 0
// (r_j = slot_rows[j], a row of `hidden` elements of base). w null: weight 1 (fmaf(1, v, a) rounds v + a once: a plain
// sum's bits). The combine's weighted sum and gather_backward's sum of a token's rows.
template <typename T>
__device__ __forceinline__ void add_slot_rows(float (&acc)[kVecElems<T>], const T* base, const int32_t* slot_rows,
                                              const float* w, int top_k, int64_t hidden, int64_t i) {
    for (int j = 0; j < top_k; ++j) {
        const int32_t r = slot_rows[j];
        if (r < 0) continue;
        const float wj = w != nullptr ? w[j] : 1.0f;
        const Vec16<T> v = reinterpret_cast<const Vec16<T>*>(base + static_cast<int64_t>(r) * hidden)[i];
#pragma unroll
        for (int q = 0; q < kVecElems<T>; ++q) acc[q] = fmaf(wj, to_f32(v.v[q]), acc[q]);
    }
}

}  // namespace cuda
}  // namespace switchyard
