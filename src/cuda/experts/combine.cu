// src/cuda/experts/combine.cu: un-permute and weighted sum of the expert outputs, plus the shared expert.
//
// Inputs:  expert_out [rows, H] (dtype, rows in expert order), slot_row [T, k] int32 (-1 = dropped pair; an entry
//          >= rows is skipped as dropped, never read: dispatch.cuh, slot_in_range),
//          topk_weights [T, k] fp32, shared [T, H] (dtype, optional), shared_gate [T] fp32 gate logits (optional).
// Output:  y [T, H] (dtype): y[t, h] = dtype( fp32 sum over j = 0..k-1 of w[t,j] * out[slot_row[t,j], h],
//          then + s_t * shared[t, h] ), rounded once (ref::combine_forward); s_t = sigmoid(shared_gate[t]) (expf), or
//          1 without a gate (fmaf(1, s, acc) == acc + s, so ungated results are unchanged). Each element is computed by one thread in a fixed
//          order with no atomics, so y is bitwise reproducible. One block per token, 16-byte vectors when H allows.
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/dispatch.cuh"
#include "cuda/moe_stages.h"

namespace switchyard {
namespace cuda {
namespace {

constexpr int kCombineThreads = 128;
// Slots per token: top_k under token choice (<= 32), E under expert choice (<= 512).
constexpr int kCombineMaxTopK = 512;

template <typename T, bool kVec>
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(const T* __restrict__ expert_out, const int32_t* __restrict__ slot_row,
                   const float* __restrict__ weights, const T* __restrict__ shared,
                   const float* __restrict__ shared_gate, int top_k, int64_t num_rows, int64_t hidden,
                   T* __restrict__ y) {
    __shared__ int32_t rows_s[kCombineMaxTopK];
    __shared__ float w_s[kCombineMaxTopK];
    const int64_t t = blockIdx.x;
    for (int j = threadIdx.x; j < top_k; j += kCombineThreads) {
        rows_s[j] = slot_in_range(slot_row[t * top_k + j], num_rows);
        w_s[j] = weights[t * top_k + j];
    }
    __syncthreads();
    const float gate = shared_gate != nullptr ? 1.0f / (1.0f + expf(-shared_gate[t])) : 1.0f;
    T* dst = y + t * hidden;
    if constexpr (kVec) {
        constexpr int kN = kVecElems<T>;
        const int64_t nvec = hidden / kN;
        for (int64_t i = threadIdx.x; i < nvec; i += kCombineThreads) {
            float acc[kN];
#pragma unroll
            for (int q = 0; q < kN; ++q) acc[q] = 0.0f;
            add_slot_rows<T>(acc, expert_out, rows_s, w_s, top_k, hidden, i);
            if (shared != nullptr) {
                const Vec16<T> s = reinterpret_cast<const Vec16<T>*>(shared + t * hidden)[i];
#pragma unroll
                for (int q = 0; q < kN; ++q) acc[q] = fmaf(gate, to_f32(s.v[q]), acc[q]);
            }
            Vec16<T> o;
#pragma unroll
            for (int q = 0; q < kN; ++q) o.v[q] = from_f32<T>(acc[q]);
            reinterpret_cast<Vec16<T>*>(dst)[i] = o;
        }
    } else {
        for (int64_t i = threadIdx.x; i < hidden; i += kCombineThreads) {
            float acc = 0.0f;
            for (int j = 0; j < top_k; ++j) {
                const int32_t r = rows_s[j];
                if (r < 0) continue;
                acc = fmaf(w_s[j], to_f32(expert_out[static_cast<int64_t>(r) * hidden + i]), acc);
            }
            if (shared != nullptr) acc = fmaf(gate, to_f32(shared[t * hidden + i]), acc);
            dst[i] = from_f32<T>(acc);
        }
    }
}

__global__ void single_group_offsets_kernel(int32_t* offsets, int32_t n) {
    offsets[0] = 0;
    offsets[1] = n;
}

}  // namespace

void combine_rows(DType dtype, const void* expert_out, const int32_t* slot_row, const float* topk_weights,
                  const void* shared, int64_t num_tokens, int64_t top_k, int64_t num_rows, int64_t hidden,
                  void* y, cudaStream_t stream, const float* shared_gate) {
    if (num_tokens == 0 || hidden == 0) return;
    SWITCHYARD_CHECK(top_k >= 1 && top_k <= kCombineMaxTopK, "combine: top_k=", top_k, " must be in [1, ",
                     kCombineMaxTopK, "]");
    SWITCHYARD_CHECK(num_tokens <= INT32_MAX, "combine: num_tokens=", num_tokens, " exceed the grid");
    dispatch_float_dtype(dtype, "combine", [&](auto tag) {
        using T = typename decltype(tag)::type;
        const bool vec = hidden % kVecElems<T> == 0 && reinterpret_cast<uintptr_t>(expert_out) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(y) % 16 == 0 &&
                         (shared == nullptr || reinterpret_cast<uintptr_t>(shared) % 16 == 0);
        const dim3 grid(static_cast<unsigned>(num_tokens));
        if (vec) {
            combine_kernel<T, true><<<grid, kCombineThreads, 0, stream>>>(
                static_cast<const T*>(expert_out), slot_row, topk_weights, static_cast<const T*>(shared),
                shared_gate, static_cast<int>(top_k), num_rows, hidden, static_cast<T*>(y));
        } else {
            combine_kernel<T, false><<<grid, kCombineThreads, 0, stream>>>(
                static_cast<const T*>(expert_out), slot_row, topk_weights, static_cast<const T*>(shared),
                shared_gate, static_cast<int>(top_k), num_rows, hidden, static_cast<T*>(y));
        }
        SWITCHYARD_CUDA_CHECK_LAUNCH();
    });
}

void write_single_group_offsets(int32_t* offsets, int64_t n, cudaStream_t stream) {
    SWITCHYARD_CHECK(n <= INT32_MAX, "shared expert: rows=", n, " exceed int32");
    single_group_offsets_kernel<<<1, 1, 0, stream>>>(offsets, static_cast<int32_t>(n));
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
