// src/cuda/gemm/sm90/grouped_gemm_fp8_sm90.cuh: CUTLASS 4.2 sm90 ptr-array grouped GEMM of e4m3 operands with
// blockwise scales (the kernel of CUTLASS example 68), device-side problem shapes, templated on the output type.
//
// Per group e (rows [offsets[e], offsets[e+1]) of QA), the contract of grouped_gemm.h's Fp8GroupedGemmArgs:
//   A: QA [rows, K] e4m3 row-major   -> CUTLASS "RowMajor" A (K-major)
//   B: [E, N, K] e4m3 row-major      -> per group a K x N "ColumnMajor" B (K-major): the TN GEMM FP8 wgmma needs
//   D: [rows, N] row-major           -> "RowMajor" D, no C operand: D = 1.0 * acc, rounded once to ElementD.
//   SFA: Sm90BlockwiseScaleConfig<1, 128, 128>: one scale per row and 128 k, M-major per group ([Kb][M_e]);
//   SFB: one scale per 128 x 128 block of B, N-major per group ([Kb][Nb]).
// The mainloop accumulates each 128-k block in fp32 on the tensor cores and adds it, scaled by SFA * SFB, to an fp32
// accumulator (scale promotion every 128 k). The kernel builds each group's scale tensors from its problem shape
// (tile_atom_to_shape_SFA/SFB of the shape the fill kernel writes), so only the scale pointers are passed per group.
// Scales are read with predicated cp.async (any row count), A and B with TMA (OOB zero fill: partial k / n blocks
// are exact).
#pragma once

#include <cutlass/detail/blockwise_scale_layout.hpp>

#include "cuda/gemm/sm90/grouped_gemm_fp8_sm90.h"
#include "cuda/gemm/sm90/grouped_gemm_sm90.cuh"

namespace switchyard {
namespace cuda {
namespace sm90 {

struct Fp8BlockwiseConfig {
    using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise;
    using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
    using TileShape = cute::Shape<cute::_128, cute::_128, cute::_128>;
    using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;
};

constexpr int kFp8ScaleBlock = 128;  // the k and n extent of one scale (the recipe's G)

template <typename ElementD, typename Config>
struct Fp8BlockwiseKernel {
    using ElementAB = cutlass::float_e4m3_t;
    using LayoutA = cutlass::layout::RowMajor;
    using LayoutB = cutlass::layout::ColumnMajor;
    using LayoutD = cutlass::layout::RowMajor;
    using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, kFp8ScaleBlock, kFp8ScaleBlock>;
    using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
    using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
    static constexpr int kAlignmentAB = 128 / cutlass::sizeof_bits<ElementAB>::value;  // 16 elements = 16 bytes
    static constexpr int kAlignmentD = 128 / cutlass::sizeof_bits<ElementD>::value;

    using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::TileShape,
        typename Config::ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto, float, float, void,
        LayoutD*, kAlignmentD, ElementD, LayoutD*, kAlignmentD, typename Config::EpilogueSchedule,
        cutlass::epilogue::fusion::LinearCombination<ElementD, float>>::CollectiveOp;

    using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, cute::tuple<LayoutA*, LayoutSFA*>,
        kAlignmentAB, ElementAB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignmentAB, float,
        typename Config::TileShape, typename Config::ClusterShape,
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

// The per-group device arrays, carved from the front of the workspace (one function sizes and partitions them).
template <typename ElementD, typename K>
struct Fp8DeviceArrays {
    using ElementAB = typename K::ElementAB;
    UnderlyingShape* shapes;
    const ElementAB** ptr_a;
    const ElementAB** ptr_b;
    ElementD** ptr_d;
    const float** ptr_sfa;
    const float** ptr_sfb;
    typename K::StrideA* stride_a;
    typename K::StrideB* stride_b;
    typename K::StrideD* stride_d;

    static Fp8DeviceArrays carve(WorkspaceCarver& wc, int64_t g) {
        Fp8DeviceArrays d;
        d.shapes = wc.take<UnderlyingShape>(g);
        d.ptr_a = wc.take<const ElementAB*>(g);
        d.ptr_b = wc.take<const ElementAB*>(g);
        d.ptr_d = wc.take<ElementD*>(g);
        d.ptr_sfa = wc.take<const float*>(g);
        d.ptr_sfb = wc.take<const float*>(g);
        d.stride_a = wc.take<typename K::StrideA>(g);
        d.stride_b = wc.take<typename K::StrideB>(g);
        d.stride_d = wc.take<typename K::StrideD>(g);
        return d;
    }
    static size_t bytes(int64_t g) {
        WorkspaceCarver sizing;
        carve(sizing, g);
        return sizing.used();
    }
};

// One thread per group: problem shape (M_e, N, K), operand and scale pointers, packed strides. offsets are trusted
// to be non-decreasing with offsets[E] <= max_rows (the routing plan's contract).
template <typename ElementD, typename K>
__global__ void fill_fp8_group_arrays_kernel(Fp8DeviceArrays<ElementD, K> arrays,
                                             const typename K::ElementAB* a, const float* sfa,
                                             const typename K::ElementAB* b, const float* sfb, ElementD* d,
                                             const int32_t* offsets, int num_groups, int n, int k) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= num_groups) return;
    const int row0 = offsets[e];
    const int m = offsets[e + 1] - row0;
    const int64_t kb = (k + kFp8ScaleBlock - 1) / kFp8ScaleBlock, nb = (n + kFp8ScaleBlock - 1) / kFp8ScaleBlock;
    arrays.shapes[e] = UnderlyingShape(m, n, k);
    arrays.ptr_a[e] = a + static_cast<int64_t>(row0) * k;
    arrays.ptr_b[e] = b + static_cast<int64_t>(e) * n * k;
    arrays.ptr_d[e] = d + static_cast<int64_t>(row0) * n;
    arrays.ptr_sfa[e] = sfa + static_cast<int64_t>(row0) * kb;
    arrays.ptr_sfb[e] = sfb + static_cast<int64_t>(e) * kb * nb;
    arrays.stride_a[e] = cutlass::make_cute_packed_stride(typename K::StrideA{}, {m, k, 1});
    arrays.stride_b[e] = cutlass::make_cute_packed_stride(typename K::StrideB{}, {n, k, 1});
    arrays.stride_d[e] = cutlass::make_cute_packed_stride(typename K::StrideD{}, {m, n, 1});
}

template <typename ElementD, typename Config>
struct Fp8GroupedGemmRunner {
    using K = Fp8BlockwiseKernel<ElementD, Config>;
    using Arrays = Fp8DeviceArrays<ElementD, K>;

    // Arguments for the CUTLASS kernel; pointers may be null when only sizing the workspace. The per-group scale
    // layouts are not read by the kernel (it derives them from each group's problem shape): null.
    static typename K::Arguments make_arguments(const Arrays& arr, int num_groups, int sm_count, int device) {
        typename K::Arguments args;
        args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
        args.problem_shape = {num_groups, arr.shapes, nullptr};  // host problem shapes: none
        args.mainloop.ptr_A = arr.ptr_a;
        args.mainloop.dA = arr.stride_a;
        args.mainloop.ptr_B = arr.ptr_b;
        args.mainloop.dB = arr.stride_b;
        args.mainloop.ptr_SFA = arr.ptr_sfa;
        args.mainloop.layout_SFA = nullptr;
        args.mainloop.ptr_SFB = arr.ptr_sfb;
        args.mainloop.layout_SFB = nullptr;
        set_store_epilogue(args.epilogue, arr.ptr_d, arr.stride_d);
        args.hw_info.device_id = device;
        args.hw_info.sm_count = sm_count;
        args.hw_info.max_active_clusters = 0;  // the scheduler sizes the persistent grid from sm_count
        args.scheduler.raster_order = cutlass::gemm::kernel::detail::RasterOrderOptions::AlongM;
        args.scheduler.max_swizzle_size = 1;
        return args;
    }

    static size_t workspace_size(int64_t num_groups, int sm_count) {
        Arrays none{};
        auto args = make_arguments(none, static_cast<int>(num_groups), sm_count, 0);
        return Arrays::bytes(num_groups) + align_up(K::Gemm::get_workspace_size(args), 256);
    }

    static void run(const Fp8GroupedGemmArgs& g, void* workspace, size_t workspace_bytes, int sm_count,
                    cudaStream_t stream) {
        const int num_groups = static_cast<int>(g.num_groups);
        const size_t need = workspace_size(g.num_groups, sm_count);
        SWITCHYARD_CHECK(workspace_bytes >= need, "grouped_gemm_fp8: workspace_bytes=", workspace_bytes,
                         " is less than the required ", need);
        int device = 0;
        SWITCHYARD_GG_CUDA_CHECK(cudaGetDevice(&device));
        PtrArrayGemm<ElementD, K>::ensure_smem_attribute(device);  // the 16-bit path's once-per-device helper

        WorkspaceCarver wc(workspace, workspace_bytes);
        const Arrays arr = Arrays::carve(wc, g.num_groups);
        void* cutlass_ws = static_cast<char*>(workspace) + wc.used();
        using AB = typename K::ElementAB;
        fill_fp8_group_arrays_kernel<ElementD, K>
            <<<(num_groups + kFillThreads - 1) / kFillThreads, kFillThreads, 0, stream>>>(
                arr, static_cast<const AB*>(g.qa), g.sfa, static_cast<const AB*>(g.b), g.sfb,
                static_cast<ElementD*>(g.d), g.offsets, num_groups, static_cast<int>(g.n), static_cast<int>(g.k));
        SWITCHYARD_GG_CUDA_CHECK(cudaGetLastError());

        auto args = make_arguments(arr, num_groups, sm_count, device);
        cutlass::Status st = K::Kernel::initialize_workspace(args, cutlass_ws, stream);
        SWITCHYARD_CHECK(st == cutlass::Status::kSuccess, "grouped_gemm_fp8: CUTLASS initialize_workspace failed: ",
                         cutlassGetStatusString(st));
        typename K::Params params = K::Kernel::to_underlying_arguments(args, cutlass_ws);
        st = K::Gemm::run(params, stream);
        SWITCHYARD_CHECK(st == cutlass::Status::kSuccess, "grouped_gemm_fp8: CUTLASS launch failed: ",
                         cutlassGetStatusString(st));
        SWITCHYARD_GG_CUDA_CHECK(cudaGetLastError());
    }
};

}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard

// Defines `const Fp8GemmOps <var>` for one output type in one translation unit.
#define SWITCHYARD_DEFINE_SM90_FP8_GROUPED_GEMM(var, element_d, label)                                    \
    namespace switchyard {                                                                                \
    namespace cuda {                                                                                      \
    namespace sm90 {                                                                                      \
    const Fp8GemmOps var = {label, &Fp8GroupedGemmRunner<element_d, Fp8BlockwiseConfig>::workspace_size,  \
                            &Fp8GroupedGemmRunner<element_d, Fp8BlockwiseConfig>::run};                   \
    }                                                                                                     \
    }                                                                                                     \
    }
