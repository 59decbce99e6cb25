// src/cuda/grouped_gemm_sm90_backward.cuh: CUTLASS 4.2 sm90 ptr-array grouped GEMMs for the two gradient layouts of
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

#include "cuda/grouped_gemm_sm90.cuh"
#include "cuda/grouped_gemm_sm90_backward.h"

namespace switchyard {
namespace cuda {
namespace sm90 {

struct Cooperative128x128Config {
    using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
    using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
    using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
    using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
};

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
struct GradGemmKernel {
    using LayoutA = typename GradLayouts<L>::A;
    using LayoutB = typename GradLayouts<L>::B;
    using LayoutD = cutlass::layout::RowMajor;
    static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16 bytes

    using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::TileShape, typename Config::ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignment, Element, LayoutD*,
        kAlignment, typename Config::EpilogueSchedule,
        cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;

    using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element, LayoutB*,
        kAlignment, float, typename Config::TileShape, typename Config::ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
            sizeof(typename CollectiveEpilogue::SharedStorage))>,
        typename Config::KernelSchedule>::CollectiveOp;

    using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
    using Arguments = typename Gemm::Arguments;
    using Params = typename Kernel::Params;
    using StrideA = typename Kernel::InternalStrideA;
    using StrideB = typename Kernel::InternalStrideB;
    using StrideD = typename Kernel::InternalStrideD;
};

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
    using K = GradGemmKernel<Element, Config, L>;
    using Arrays = DeviceArrays<Element, typename K::StrideA, typename K::StrideB, typename K::StrideD>;

    // Arguments for the CUTLASS kernel; pointers may be null when only sizing the workspace.
    static typename K::Arguments make_arguments(const Arrays& arr, int num_groups, int sm_count, int device) {
        typename K::Arguments args;
        args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
        args.problem_shape = {num_groups, arr.shapes, nullptr};  // host problem shapes: none
        args.mainloop.ptr_A = arr.ptr_a;
        args.mainloop.dA = arr.stride_a;
        args.mainloop.ptr_B = arr.ptr_b;
        args.mainloop.dB = arr.stride_b;
        auto& fusion = args.epilogue.thread;
        fusion.alpha = 1.0f;
        fusion.beta = 0.0f;
        fusion.alpha_ptr = nullptr;
        fusion.beta_ptr = nullptr;
        fusion.alpha_ptr_array = nullptr;
        fusion.beta_ptr_array = nullptr;
        fusion.dAlpha = {cute::_0{}, cute::_0{}, 0};
        fusion.dBeta = {cute::_0{}, cute::_0{}, 0};
        args.epilogue.ptr_C = nullptr;
        args.epilogue.dC = nullptr;
        args.epilogue.ptr_D = arr.ptr_d;
        args.epilogue.dD = arr.stride_d;
        args.hw_info.device_id = device;
        args.hw_info.sm_count = sm_count;
        args.hw_info.max_active_clusters = 0;  // the scheduler then sizes the persistent grid from sm_count
        return args;
    }

    static size_t cutlass_workspace(int64_t num_groups, int sm_count) {
        Arrays none{};
        auto args = make_arguments(none, static_cast<int>(num_groups), sm_count, 0);
        return K::Gemm::get_workspace_size(args);
    }

    static size_t workspace_size(int64_t num_groups, int sm_count) {
        return align_up(Arrays::bytes(num_groups), 256) + align_up(cutlass_workspace(num_groups, sm_count), 256);
    }

    // Sets the kernel's dynamic shared memory limit once per device (before any launch, so that calls under graph
    // capture only launch).
    static void ensure_smem_attribute(int device) {
        static std::mutex mu;
        static uint64_t done_mask = 0;  // bit per device index (< 64)
        std::lock_guard<std::mutex> lock(mu);
        uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
        if (bit != 0 && (done_mask & bit)) return;
        int smem = static_cast<int>(K::Kernel::SharedStorageSize);
        if (smem >= (48 << 10)) {
            SWITCHYARD_GG_CUDA_CHECK(cudaFuncSetAttribute(cutlass::device_kernel<typename K::Kernel>,
                                                          cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        }
        done_mask |= bit;
    }

    static void run(const GroupedGemmGradArgs& g, void* workspace, size_t workspace_bytes, int sm_count,
                    cudaStream_t stream) {
        const int num_groups = static_cast<int>(g.num_groups);
        const size_t need = workspace_size(g.num_groups, sm_count);
        SWITCHYARD_CHECK(workspace_bytes >= need, "grouped_gemm ", L == GradLayout::kDgrad ? "dgrad" : "wgrad",
                         ": workspace_bytes=", workspace_bytes, " is less than the required ", need);
        int device = 0;
        SWITCHYARD_GG_CUDA_CHECK(cudaGetDevice(&device));
        ensure_smem_attribute(device);

        Arrays arr = Arrays::carve(workspace, g.num_groups);
        void* cutlass_ws = static_cast<char*>(workspace) + align_up(Arrays::bytes(g.num_groups), 256);

        const Element* ga = static_cast<const Element*>(g.dc);
        const Element* gb = static_cast<const Element*>(L == GradLayout::kDgrad ? g.b : g.a);
        Element* gd = static_cast<Element*>(L == GradLayout::kDgrad ? g.da : g.db);
        constexpr int kThreads = 128;
        fill_grad_arrays_kernel<L, Element, Arrays><<<(num_groups + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
            arr, ga, gb, gd, g.offsets, num_groups, static_cast<int>(g.n), static_cast<int>(g.k));
        SWITCHYARD_GG_CUDA_CHECK(cudaGetLastError());

        auto args = make_arguments(arr, num_groups, sm_count, device);
        cutlass::Status st = K::Kernel::initialize_workspace(args, cutlass_ws, stream);
        SWITCHYARD_CHECK(st == cutlass::Status::kSuccess,
                         "grouped_gemm gradient: CUTLASS initialize_workspace failed: ", cutlassGetStatusString(st));
        typename K::Params params = K::Kernel::to_underlying_arguments(args, cutlass_ws);
        st = K::Gemm::run(params, stream);
        SWITCHYARD_CHECK(st == cutlass::Status::kSuccess,
                         "grouped_gemm gradient: CUTLASS launch failed: ", cutlassGetStatusString(st));
        SWITCHYARD_GG_CUDA_CHECK(cudaGetLastError());
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
