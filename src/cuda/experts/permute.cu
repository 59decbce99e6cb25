// src/cuda/experts/permute.cu: dispatch, i.e. gather rows of x into expert order.
//
// Inputs:  x [T, H] (dtype), row_token [max_rows] int32 (token of each row, -1 for rows past offsets[E]).
// Output:  xp [max_rows, H] (dtype): xp[r, :] = x[row_token[r], :] for every row with row_token[r] >= 0; other
//          rows are not written (no later stage reads them), or written as 0 with zero_unowned (the torch op, whose
//          output is a tensor of its own). Matches the gather inside ref::moe_forward.
// One block per row; 16-byte vector copies when H * sizeof(dtype) and both base pointers allow, else scalar.
// scatter_token_rows: the same output written by token (one block per token: x's row is read once and stored to its
// k rows). The row-order gather reads x once per row, i.e. k times per token, from DRAM once x and xp no longer fit
// the L2 together (k x ~|x| of reads: 8 x 235 MB for DeepSeek-V3 at T = 16384); by token the reads are |x|.
// Blocks past the tokens zero the rows no pair points at (row_token < 0), kZeroRowsPerBlock rows each. A slot_row entry
// >= max_rows (a hint that is not the plan's: the CPU backend refuses it) is skipped, never written out of range.
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/dispatch.cuh"
#include "cuda/moe_stages.h"

namespace switchyard {
namespace cuda {
namespace {

constexpr int kPermuteThreads = 128;
constexpr int kPermuteUnroll = 4;

// A thread's vectors i = base + u * kPermuteThreads (u < kPermuteUnroll, i < nvec) of a row: all loaded before any is
// stored, so that a row of up to kPermuteThreads * kPermuteUnroll vectors (8 KB: H = 4096 in bf16) is in flight.
__device__ __forceinline__ void load_vectors(uint4 (&v)[kPermuteUnroll], const uint4* s, int64_t base, int64_t nvec) {
#pragma unroll
    for (int u = 0; u < kPermuteUnroll; ++u) {
        const int64_t i = base + u * kPermuteThreads;
        if (i < nvec) v[u] = s[i];
    }
}
__device__ __forceinline__ void store_vectors(uint4* d, const uint4 (&v)[kPermuteUnroll], int64_t base, int64_t nvec) {
#pragma unroll
    for (int u = 0; u < kPermuteUnroll; ++u) {
        const int64_t i = base + u * kPermuteThreads;
        if (i < nvec) d[i] = v[u];
    }
}

// Row `row` of xp (hidden elements) written as 0, 16-byte stores when kVec.
template <typename T, bool kVec>
__device__ __forceinline__ void zero_row(T* xp, int64_t row, int64_t hidden) {
    T* dst = xp + row * hidden;
    if constexpr (kVec) {
        const int64_t nvec = hidden / kVecElems<T>;
        for (int64_t i = threadIdx.x; i < nvec; i += kPermuteThreads) reinterpret_cast<uint4*>(dst)[i] = uint4{};
    } else {
        for (int64_t i = threadIdx.x; i < hidden; i += kPermuteThreads) dst[i] = T{};
    }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kPermuteThreads)
    permute_rows_kernel(const T* __restrict__ x, const int32_t* __restrict__ row_token, int64_t hidden,
                        T* __restrict__ xp, bool zero_unowned) {
    const int64_t row = blockIdx.x;
    const int32_t tok = row_token[row];
    if (tok < 0) {
        if (zero_unowned) zero_row<T, kVec>(xp, row, hidden);
        return;
    }
    const T* src = x + static_cast<int64_t>(tok) * hidden;
    T* dst = xp + row * hidden;
    if constexpr (kVec) {
        const int64_t nvec = hidden / kVecElems<T>;
        const uint4* s = reinterpret_cast<const uint4*>(src);
        uint4* d = reinterpret_cast<uint4*>(dst);
        for (int64_t base = threadIdx.x; base < nvec; base += kPermuteThreads * kPermuteUnroll) {
            uint4 v[kPermuteUnroll];
            load_vectors(v, s, base, nvec);
            store_vectors(d, v, base, nvec);
        }
    } else {
        for (int64_t i = threadIdx.x; i < hidden; i += kPermuteThreads) dst[i] = src[i];
    }
}

constexpr int kZeroRowsPerBlock = kPermuteThreads;

// Blocks [0, num_tokens): token t's row to its top_k rows. Blocks past them: rows [b * kZeroRowsPerBlock, ...) with
// row_token < 0 written as 0.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kPermuteThreads)
    scatter_token_rows_kernel(const T* __restrict__ x, const int32_t* __restrict__ slot_row, int top_k,
                              int64_t num_tokens, const int32_t* __restrict__ row_token, int64_t max_rows,
                              int64_t hidden, T* __restrict__ xp) {
    __shared__ int32_t rows_s[kPermuteThreads];
    __shared__ int num_s;
    if (blockIdx.x >= num_tokens) {
        const int64_t row0 = (static_cast<int64_t>(blockIdx.x) - num_tokens) * kZeroRowsPerBlock;
        if (threadIdx.x == 0) num_s = 0;
        __syncthreads();
        const int64_t r = row0 + threadIdx.x;
        if (r < max_rows && row_token[r] < 0) rows_s[atomicAdd(&num_s, 1)] = static_cast<int32_t>(r);
        __syncthreads();
        // which slot a row took does not matter: every one is written as 0
        for (int i = 0; i < num_s; ++i) zero_row<T, kVec>(xp, rows_s[i], hidden);
        return;
    }
    const int64_t t = blockIdx.x;
    if (threadIdx.x < top_k) rows_s[threadIdx.x] = slot_in_range(slot_row[t * top_k + threadIdx.x], max_rows);
    __syncthreads();
    const T* src = x + t * hidden;
    if constexpr (kVec) {
        const int64_t nvec = hidden / kVecElems<T>;
        const uint4* s = reinterpret_cast<const uint4*>(src);
        for (int64_t base = threadIdx.x; base < nvec; base += kPermuteThreads * kPermuteUnroll) {
            uint4 v[kPermuteUnroll];
            load_vectors(v, s, base, nvec);
            for (int j = 0; j < top_k; ++j) {
                const int32_t r = rows_s[j];
                if (r >= 0) {
                    store_vectors(reinterpret_cast<uint4*>(xp + static_cast<int64_t>(r) * hidden), v, base, nvec);
                }
            }
        }
    } else {
        for (int64_t c = threadIdx.x; c < hidden; c += kPermuteThreads) {
            const T v = src[c];
            for (int j = 0; j < top_k; ++j) {
                const int32_t r = rows_s[j];
                if (r >= 0) xp[static_cast<int64_t>(r) * hidden + c] = v;
            }
        }
    }
}

}  // namespace

void scatter_token_rows(DType dtype, const void* x, const int32_t* slot_row, int64_t num_tokens, int64_t top_k,
                        const int32_t* row_token, int64_t max_rows, int64_t hidden, void* xp, cudaStream_t stream) {
    if (max_rows == 0 || hidden == 0) return;
    SWITCHYARD_CHECK(top_k >= 1 && top_k <= kPermuteThreads, "scatter_token_rows: top_k=", top_k,
                     " must be in [1, ", kPermuteThreads, "]");
    const int64_t blocks = num_tokens + (max_rows + kZeroRowsPerBlock - 1) / kZeroRowsPerBlock;
    SWITCHYARD_CHECK(blocks <= INT32_MAX, "scatter_token_rows: T=", num_tokens, " and rows=", max_rows,
                     " exceed the grid");
    dispatch_float_dtype(dtype, "gather", [&](auto tag) {
        using T = typename decltype(tag)::type;
        const bool vec = hidden % kVecElems<T> == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(xp) % 16 == 0;
        const auto kernel = vec ? scatter_token_rows_kernel<T, true> : scatter_token_rows_kernel<T, false>;
        kernel<<<static_cast<unsigned>(blocks), kPermuteThreads, 0, stream>>>(
            static_cast<const T*>(x), slot_row, static_cast<int>(top_k), num_tokens, row_token, max_rows, hidden,
            static_cast<T*>(xp));
        SWITCHYARD_CUDA_CHECK_LAUNCH();
    });
}

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
