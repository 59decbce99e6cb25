// src/cuda/experts/permute.cu: dispatch, i.e. gather rows of x into expert order.
//
// Inputs:  x [T, H] (dtype), row_token [max_rows] int32 (token of each row, -1 for rows past offsets[E]).
// Output:  xp [max_rows, H] (dtype): xp[r, :] = x[row_token[r], :] for every row with row_token[r] >= 0; other
//          rows are not written (no later stage reads them), or written as 0 with zero_unowned (the torch op, whose
//          output is a tensor of its own). Matches the gather inside ref::moe_forward.
// One block per row; 16-byte vector copies when H * sizeof(dtype) and both base pointers allow, else scalar.
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/dispatch.cuh"
#include "cuda/moe_stages.h"

namespace switchyard {
namespace cuda {
namespace {

constexpr int kPermuteThreads = 128;
constexpr int kPermuteUnroll = 4;

template <typename T, bool kVec>
__global__ void __launch_bounds__(kPermuteThreads)
    permute_rows_kernel(const T* __restrict__ x, const int32_t* __restrict__ row_token, int64_t hidden,
                        T* __restrict__ xp, bool zero_unowned) {
    const int64_t row = blockIdx.x;
    const int32_t tok = row_token[row];
    if (tok < 0) {
        if (zero_unowned) {
            T* dst = xp + row * hidden;
            for (int64_t i = threadIdx.x; i < hidden; i += kPermuteThreads) dst[i] = T{};
        }
        return;
    }
    const T* src = x + static_cast<int64_t>(tok) * hidden;
    T* dst = xp + row * hidden;
    if constexpr (kVec) {
        // All of a thread's loads (up to kPermuteUnroll 16-byte vectors) are issued before its stores, so that a row
        // of up to kPermuteThreads * kPermuteUnroll vectors (8 KB: H = 4096 in bf16) is in flight at once.
        const int64_t nvec = hidden / kVecElems<T>;
        const uint4* s = reinterpret_cast<const uint4*>(src);
        uint4* d = reinterpret_cast<uint4*>(dst);
        for (int64_t base = threadIdx.x; base < nvec; base += kPermuteThreads * kPermuteUnroll) {
            uint4 v[kPermuteUnroll];
#pragma unroll
            for (int u = 0; u < kPermuteUnroll; ++u) {
                const int64_t i = base + u * kPermuteThreads;
                if (i < nvec) v[u] = s[i];
            }
#pragma unroll
            for (int u = 0; u < kPermuteUnroll; ++u) {
                const int64_t i = base + u * kPermuteThreads;
                if (i < nvec) d[i] = v[u];
            }
        }
    } else {
        for (int64_t i = threadIdx.x; i < hidden; i += kPermuteThreads) dst[i] = src[i];
    }
}

}  // namespace

void permute_rows(DType dtype, const void* x, const int32_t* row_token, int64_t max_rows, int64_t hidden, void* xp,
                  cudaStream_t stream, bool zero_unowned) {
    if (max_rows == 0 || hidden == 0) return;
    SWITCHYARD_CHECK(max_rows <= INT32_MAX, "permute: rows=", max_rows, " exceed the grid");
    dispatch_float_dtype(dtype, "permute", [&](auto tag) {
        using T = typename decltype(tag)::type;
        const bool vec = hidden % kVecElems<T> == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(xp) % 16 == 0;
        const dim3 grid(static_cast<unsigned>(max_rows));
        if (vec) {
            permute_rows_kernel<T, true><<<grid, kPermuteThreads, 0, stream>>>(
                static_cast<const T*>(x), row_token, hidden, static_cast<T*>(xp), zero_unowned);
        } else {
            permute_rows_kernel<T, false><<<grid, kPermuteThreads, 0, stream>>>(
                static_cast<const T*>(x), row_token, hidden, static_cast<T*>(xp), zero_unowned);
        }
        SWITCHYARD_CUDA_CHECK_LAUNCH();
    });
}

}  // namespace cuda
}  // namespace switchyard
