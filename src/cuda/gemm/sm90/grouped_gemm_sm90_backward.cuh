// src/cuda/gemm/sm90/grouped_gemm_sm90_backward.cuh: CUTLASS 4.2 sm90 ptr-array grouped GEMMs for the two gradient layouts of
// grouped_gemm.h (dgrad, wgrad), templated on element type, tile configuration and layout. Shares the problem shape
// type, tile configurations and device-array layout of grouped_gemm_sm90.cuh (the forward).
//
// Layouts per group (see grouped_gemm_sm90_backward.h for the derivation):
//   dgrad: (M, N, K) = (rows_e, K, N); A = dC_e RowMajor (K-major), B = B[e] RowMajor (N-major), D = dA_e RowMajor.
//   wgrad: (M, N, K) = (N, K, rows_e); A = dC_e ColumnMajor (M-major), B = A_e RowMajor (N-major), D = dB[e] RowMajor.
// 16-bit TMA loads take MN-major operands (GMMA reads them transposed from shared memory). The wgrad reduction
// length rows_e is arbitrary (1, 7, 129, ...): TMA zero-fills the K tile past rows_e (the tensor map of every group
// is rebuilt with its own extent). Each output tile is reduced by one CTA over the whole K in order (no split-K,
// no stream-K): bitwise reproducible run to run. Alignment: base pointers and strides are multiples of 16 bytes
// when N % 8 == 0 and K % 8 == 0 (checked by the dispatcher).
#pragma once

#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"
#include "cuda/gemm/sm90/grouped_gemm_sm90_backward.h"

namespace switchyard {
namespace cuda {
namespace sm90 {

template <GradLayout L>
struct GradLayouts;
template <>
struct GradLayouts<GradLayout::kDgrad> {
    using A = cutlass::layout::RowMajor;
    using B = cutlass::layout::RowMajor;
};
template <>
struct GradLayouts<GradLayout::kWgrad> {
    using A = cutlass::layout::ColumnMajor;
    using B = cutlass::layout::RowMajor;
};

template <typename Element, typename Config, GradLayout L>
using GradGemmKernel = PtrArrayKernel<Element, Config, typename GradLayouts<L>::A, typename GradLayouts<L>::B>;

// One thread per group. dgrad: ga = dC, gb = B, gd = dA. wgrad: ga = dC, gb = A, gd = dB.
// offsets are trusted to be non-decreasing with offsets[E] <= max_rows (the routing plan's contract).
template <GradLayout L, typename Element, typename Arrays>
__global__ void fill_grad_arrays_kernel(Arrays arrays, const Element* ga, const Element* gb, Element* gd,
                                        const int32_t* offsets, int num_groups, int n, int k) {
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= num_groups) return;
    const int row0 = offsets[e];
    const int m = offsets[e + 1] - row0;
    using SA = cute::remove_pointer_t<decltype(arrays.stride_a)>;
    using SB = cute::remove_pointer_t<decltype(arrays.stride_b)>;
    using SD = cute::remove_pointer_t<decltype(arrays.stride_d)>;
    if constexpr (L == GradLayout::kDgrad) {
        // (M, N, K) = (m, k, n): dA_e[m, k] = dC_e[m, n] . B_e[n, k]
        arrays.shapes[e] = UnderlyingShape(m, k, n);
        arrays.ptr_a[e] = ga + static_cast<int64_t>(row0) * n;
        arrays.ptr_b[e] = gb + static_cast<int64_t>(e) * n * k;
        arrays.ptr_d[e] = gd + static_cast<int64_t>(row0) * k;
        arrays.stride_a[e] = cutlass::make_cute_packed_stride(SA{}, {m, n, 1});
        arrays.stride_b[e] = cutlass::make_cute_packed_stride(SB{}, {k, n, 1});
        arrays.stride_d[e] = cutlass::make_cute_packed_stride(SD{}, {m, k, 1});
    } else {
        // (M, N, K) = (n, k, m): dB_e[n, k] = dC_e^T[n, m] . A_e[m, k]. An empty group gets M = 0: no tiles.
        arrays.shapes[e] = UnderlyingShape(m > 0 ? n : 0, k, m);
        arrays.ptr_a[e] = ga + static_cast<int64_t>(row0) * n;
        arrays.ptr_b[e] = gb + static_cast<int64_t>(row0) * k;
        arrays.ptr_d[e] = gd + static_cast<int64_t>(e) * n * k;
        const int mk = m > 0 ? m : 1;  // strides of an empty group are never used; keep them well formed
        arrays.stride_a[e] = cutlass::make_cute_packed_stride(SA{}, {n, mk, 1});
        arrays.stride_b[e] = cutlass::make_cute_packed_stride(SB{}, {k, mk, 1});
        arrays.stride_d[e] = cutlass::make_cute_packed_stride(SD{}, {n, k, 1});
    }
}

template <typename Element, typename Config, GradLayout L>
struct GradGemmRunner {
    using P = PtrArrayGemm<Element, GradGemmKernel<Element, Config, L>>;

    static size_t workspace_size(int64_t num_groups, int sm_count) { return P::workspace_size(num_groups, sm_count); }

    static void run(const GroupedGemmGradArgs& g, void* workspace, size_t workspace_bytes, int sm_count,
                    cudaStream_t stream) {
        const int num_groups = static_cast<int>(g.num_groups);
        const Element* ga = static_cast<const Element*>(g.dc);
        const Element* gb = static_cast<const Element*>(L == GradLayout::kDgrad ? g.b : g.a);
        Element* gd = static_cast<Element*>(L == GradLayout::kDgrad ? g.da : g.db);
        const char* what = L == GradLayout::kDgrad ? "grouped_gemm dgrad" : "grouped_gemm wgrad";
        P::run(g.num_groups, g.raster, workspace, workspace_bytes, sm_count, stream, what, [&](const auto& arr) {
            using Arrays = typename P::Arrays;
            fill_grad_arrays_kernel<L, Element, Arrays>
                <<<(num_groups + kFillThreads - 1) / kFillThreads, kFillThreads, 0, stream>>>(
                    arr, ga, gb, gd, g.offsets, num_groups, static_cast<int>(g.n), static_cast<int>(g.k));
        });
    }
};

}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard

// Defines `const GradGemmOps <var>` for one (element, config, layout) in one translation unit.
#define SWITCHYARD_DEFINE_SM90_GRAD_GEMM(var, element, config, layout, label)                 \
    namespace switchyard {                                                                    \
    namespace cuda {                                                                          \
    namespace sm90 {                                                                          \
    const GradGemmOps var = {label, &GradGemmRunner<element, config, layout>::workspace_size, \
                             &GradGemmRunner<element, config, layout>::run};                  \
    }                                                                                         \
    }                                                                                         \
    }
