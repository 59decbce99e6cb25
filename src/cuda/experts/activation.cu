// src/cuda/experts/activation.cu: the (gated) activation between the two expert GEMMs.
//
// Input:  in [rows, 2F] (gated: gate columns [0, F), up columns [F, 2F); or, interleaved, gate f at column
//         16 (f / 8) + f % 8 and up f 8 columns further: stages.h, interleave_gate_up) or [rows, F] (ungated), dtype.
// Output: out [rows, F], dtype: out = act(gate) * up (SwiGLU: silu, GeGLU: gelu_tanh) or act(up) (GELU, ReLU),
//         computed in fp32 from the stored inputs and rounded once to dtype (ref::apply_activation; 16-bit types with
//         the fast intrinsics of act_fn.cuh).
// Rows r >= *num_rows (device counter, e.g. expert_offsets[E]; may be null) or r >= max_rows are not touched.
// One block per row, 16-byte vectors of the three tensors when F allows.
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/dispatch.cuh"
#include "cuda/experts/act_fn.cuh"
#include "cuda/moe_stages.h"

namespace switchyard {
namespace cuda {
namespace {

constexpr int kActThreads = 128;

template <typename T, Activation kAct, bool kVec>
__global__ void __launch_bounds__(kActThreads)
    activation_kernel(const T* __restrict__ in, const int32_t* __restrict__ num_rows, int64_t ffn,
                      T* __restrict__ out, bool interleaved) {
    constexpr bool kGated = kAct == Activation::kSwiGLU || kAct == Activation::kGeGLU;
    const int64_t row = blockIdx.x;
    if (num_rows != nullptr && row >= *num_rows) return;
    const int64_t in_width = kGated ? 2 * ffn : ffn;
    const T* src = in + row * in_width;
    T* dst = out + row * ffn;
    if constexpr (kVec) {
        constexpr int kN = kVecElems<T>;  // 4 or 8: a vector never straddles a block of 8 of the interleaved layout
        const int64_t nvec = ffn / kN;
        for (int64_t i = threadIdx.x; i < nvec; i += kActThreads) {
            const int64_t f = i * kN;
            const int64_t gate_col = kGated ? gate_column(f, interleaved) : 0;
            const int64_t up_col = kGated ? up_column(f, ffn, interleaved) : f;
            Vec16<T> u = *reinterpret_cast<const Vec16<T>*>(src + up_col);
            Vec16<T> g;
            if constexpr (kGated) g = *reinterpret_cast<const Vec16<T>*>(src + gate_col);
            Vec16<T> r;
#pragma unroll
            for (int q = 0; q < kN; ++q) {
                const float h = kGated ? act_fn<kAct, kFastAct<T>>(to_f32(g.v[q])) * to_f32(u.v[q])
                                        : act_fn<kAct, kFastAct<T>>(to_f32(u.v[q]));
                r.v[q] = from_f32<T>(h);
            }
            reinterpret_cast<Vec16<T>*>(dst)[i] = r;
        }
    } else {
        for (int64_t i = threadIdx.x; i < ffn; i += kActThreads) {
            float h;
            if constexpr (kGated) {
                h = act_fn<kAct, kFastAct<T>>(to_f32(src[gate_column(i, interleaved)])) *
                    to_f32(src[up_column(i, ffn, interleaved)]);
            } else {
                h = act_fn<kAct, kFastAct<T>>(to_f32(src[i]));
            }
            dst[i] = from_f32<T>(h);
        }
    }
}

template <typename T, Activation kAct>
void launch_activation(const void* in, int64_t max_rows, const int32_t* num_rows, int64_t ffn, void* out,
                       bool interleaved, cudaStream_t stream) {
    const bool vec = ffn % kVecElems<T> == 0 && reinterpret_cast<uintptr_t>(in) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(out) % 16 == 0;
    const dim3 grid(static_cast<unsigned>(max_rows));
    if (vec) {
        activation_kernel<T, kAct, true><<<grid, kActThreads, 0, stream>>>(static_cast<const T*>(in), num_rows, ffn,
                                                                           static_cast<T*>(out), interleaved);
    } else {
        activation_kernel<T, kAct, false><<<grid, kActThreads, 0, stream>>>(static_cast<const T*>(in), num_rows,
                                                                            ffn, static_cast<T*>(out), interleaved);
    }
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

// One block per destination row: 16-byte copies when the row and both bases allow, else bytes.
template <typename V>
__global__ void interleave_rows_kernel(const char* __restrict__ src, char* __restrict__ dst, int64_t n,
                                       int64_t row_bytes, bool inverse) {
    const int64_t row = blockIdx.x;  // over groups * n rows
    const int64_t e = row / n, r = row % n, ffn = n / 2;
    const int64_t ir = gate_up_interleaved_row(r % ffn, r / ffn);
    const int64_t from = e * n + (inverse ? ir : r), to = e * n + (inverse ? r : ir);
    const V* s = reinterpret_cast<const V*>(src + from * row_bytes);
    V* d = reinterpret_cast<V*>(dst + to * row_bytes);
    for (int64_t i = threadIdx.x; i < row_bytes / static_cast<int64_t>(sizeof(V)); i += blockDim.x) d[i] = s[i];
}

}  // namespace

void activation_rows(Activation act, DType dtype, const void* in, int64_t max_rows, const int32_t* num_rows,
                     int64_t ffn, void* out, cudaStream_t stream, bool interleaved) {
    if (max_rows == 0 || ffn == 0) return;
    SWITCHYARD_CHECK(max_rows <= INT32_MAX, "activation: rows=", max_rows, " exceed the grid");
    dispatch_float_dtype(dtype, "activation", [&](auto tag) {
        using T = typename decltype(tag)::type;
        switch (act) {
            case Activation::kSwiGLU:
                launch_activation<T, Activation::kSwiGLU>(in, max_rows, num_rows, ffn, out, interleaved, stream);
                return;
            case Activation::kGeGLU:
                launch_activation<T, Activation::kGeGLU>(in, max_rows, num_rows, ffn, out, interleaved, stream);
                return;
            case Activation::kGELU:
                launch_activation<T, Activation::kGELU>(in, max_rows, num_rows, ffn, out, interleaved, stream);
                return;
            case Activation::kReLU:
                launch_activation<T, Activation::kReLU>(in, max_rows, num_rows, ffn, out, interleaved, stream);
                return;
        }
        SWITCHYARD_FAIL("activation: activation=", static_cast<int>(act), " is not supported");
    });
}

void interleave_gate_up_rows(const void* src, void* dst, int64_t groups, int64_t n, int64_t row_bytes, bool inverse,
                             cudaStream_t stream) {
    const int64_t rows = groups * n;
    if (rows == 0 || row_bytes == 0) return;
    SWITCHYARD_CHECK(rows <= INT32_MAX, "interleave_gate_up: ", rows, " rows exceed the grid");
    const bool vec = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(dst) % 16 == 0;
    const dim3 grid(static_cast<unsigned>(rows));
    if (vec) {
        interleave_rows_kernel<uint4><<<grid, kActThreads, 0, stream>>>(static_cast<const char*>(src),
                                                                        static_cast<char*>(dst), n, row_bytes, inverse);
    } else {
        interleave_rows_kernel<char><<<grid, kActThreads, 0, stream>>>(static_cast<const char*>(src),
                                                                       static_cast<char*>(dst), n, row_bytes, inverse);
    }
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
