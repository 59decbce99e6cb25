// src/cuda/gemm/sm90/grouped_gemm_sm90.cuh: CUTLASS 4.2 sm90 ptr-array grouped GEMM with device-side problem shapes
// (the approach of CUTLASS example 57), templated on element type and tile configuration.
//
// Per group e (rows [offsets[e], offsets[e+1]) of A):  D_e[M_e, N] = A_e[M_e, K] * B_e[N, K]^T
//   A: [rows, K] row-major  -> CUTLASS "RowMajor" A (K-major)
//   B: [E, N, K] row-major  -> per group a K x N "ColumnMajor" B (K-major): both operands K-major (TN GEMM)
//   D: [rows, N] row-major  -> "RowMajor" D. No C operand (ElementC = void): D = 1.0 * acc, rounded once.
// fp32 accumulation. Each output tile is computed by one CTA over the whole K (no split-K, no stream-K), so results
// are bitwise reproducible run to run. Groups with 0 rows contribute no tiles (the group tile scheduler skips them).
// Alignment: TMA needs 16-byte aligned base pointers and row strides, hence K % 8 == 0 and N % 8 == 0 for 16-bit
// types (checked by the dispatcher, grouped_gemm.cu). Matches ref: a double-accumulated product rounded to dtype.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "cuda/gemm/sm90/register_epilogue.cuh"
#include "cuda/gemm/sm90/gather_mainloop.cuh"
#include "cuda/gemm/sm90/grouped_gemm_sm90.h"

namespace switchyard {
namespace cuda {
namespace sm90 {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // <M, N, K> per group
using UnderlyingShape = ProblemShape::UnderlyingProblemShape;

// Cooperative 128x256x64 with a cluster of ClusterM x ClusterN CTAs. The 2x1 cluster multicasts the weight (B)
// tile to two M tiles of one expert, the 1x2 cluster the A tile to two N tiles. CUTLASS's group scheduler rounds a
// group's M tiles up to a multiple of ClusterM (and its N tiles to ClusterN), and the rounded-up tiles still run
// the whole mainloop on TMA-filled zeros: with the 2x1 cluster an expert of 1-128 rows costs two M tiles of MMA.
//
// The epilogue (EpiN): CUTLASS's TMA-store epilogue stages the tile through shared memory in 128 x EpiN subtiles,
// each with two named barriers across both consumer warpgroups while the tensor cores wait; EpiN = 0 lets CUTLASS
// choose (128x32: eight subtiles per 128x256 tile); EpiN = 128 (the one built) takes two, their shared memory from
// the mainloop's stages. EpiN = kRegisterStoreEpilogue stores the accumulators from registers instead
// (register_epilogue.cuh: no shared memory, no barriers). GroupedGemmEpilogue (grouped_gemm.h) selects them.
constexpr int kRegisterStoreEpilogue = -1;

// What the configs without a choice of epilogue take: CUTLASS's TMA-store epilogue with its own subtile.
struct CutlassEpilogueDefaults {
    using EpilogueTile = cutlass::epilogue::collective::EpilogueTileAuto;
    static constexpr bool kRegisterStore = false;
};

template <int ClusterM, int ClusterN, int EpiN = 0>
struct CooperativeClusterConfig {
    using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
    using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
    using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
    using ClusterShape = cute::Shape<cute::Int<ClusterM>, cute::Int<ClusterN>, cute::_1>;
    using EpilogueTile = std::conditional_t<(EpiN > 0), cute::Shape<cute::_128, cute::Int<EpiN>>,
                                            cutlass::epilogue::collective::EpilogueTileAuto>;
    static constexpr bool kRegisterStore = EpiN == kRegisterStoreEpilogue;
};
using CooperativeConfig = CooperativeClusterConfig<2, 1>;
using CooperativeN2Config = CooperativeClusterConfig<1, 2>;
using CooperativeC1Config = CooperativeClusterConfig<1, 1>;
using CooperativeRegConfig = CooperativeClusterConfig<2, 1, kRegisterStoreEpilogue>;
using CooperativeC1Epi128Config = CooperativeClusterConfig<1, 1, 128>;
using CooperativeC1RegConfig = CooperativeClusterConfig<1, 1, kRegisterStoreEpilogue>;

struct PingpongConfig : CutlassEpilogueDefaults {
    using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
    using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
    using TileShape = cute::Shape<cute::_64, cute::_128, cute::_128>;
    using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
};

// Each consumer warpgroup owns a 64x256 tile: the MMA atom and the B-tile width of the Cooperative 128x256 tile,
// with one warpgroup's epilogue running while the other's mainloop keeps the tensor cores busy (what the gated
// epilogue's activation math needs: register_epilogue.cuh).
struct Pingpong64x256Config : CutlassEpilogueDefaults {
    using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
    using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
    using TileShape = cute::Shape<cute::_64, cute::_256, cute::_64>;
    using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
};

struct Pingpong128Config : CutlassEpilogueDefaults {
    using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
    using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
    using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
    using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
};

// The epilogue collective of a PtrArrayKernel: CUTLASS's (D = 1.0 * acc rounded once, TMA stores) or, where the
// config says so, the same values stored from registers (register_epilogue.cuh), unless one is given.
template <typename Element, typename Config, typename LayoutD, typename Given>
struct EpilogueOf {
    using type = Given;
};
template <typename Element, typename Config, typename LayoutD>
struct EpilogueOf<Element, Config, LayoutD, void> {
    static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
    using Built = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::TileShape,
        typename Config::ClusterShape, typename Config::EpilogueTile, float, float, void, LayoutD*, kAlignment,
        Element, LayoutD*, kAlignment, typename Config::EpilogueSchedule,
        cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;
    using type = std::conditional_t<
        Config::kRegisterStore,
        cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<RegisterEpilogueArray<Element, false>>,
        Built>;
};

// The CUTLASS kernel types of one ptr-array grouped GEMM: operand type, tile configuration and the A / B layouts
// (the forward is RowMajor A x ColumnMajor B, i.e. both K-major; the gradients use other layouts, see
// grouped_gemm_sm90_backward.cuh). D is always RowMajor, fp32 accumulation, D = 1.0 * acc rounded once, unless an
// epilogue collective is given (GEMM1's gated epilogue: GatedGroupedGemmKernel). The mainloop takes the shared
// memory the epilogue leaves (none for the gated epilogue: one more stage on the Pingpong tile). GatherA: A's rows
// read through a row index (gather_mainloop.cuh) instead of a contiguous A.
template <typename Element, typename Config, typename LayoutA_, typename LayoutB_, typename Epilogue_ = void,
          bool GatherA = false>
struct PtrArrayKernel {
    using LayoutA = LayoutA_;
    using LayoutB = LayoutB_;
    using LayoutD = cutlass::layout::RowMajor;
    static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16 bytes
    // An epilogue of our own (register_epilogue.cuh: the gated one, or the plain register store) takes its
    // arguments as RegisterEpilogueArray::Arguments; CUTLASS's takes LinearCombination's.
    static constexpr bool kOwnEpilogue = !std::is_void_v<Epilogue_> || Config::kRegisterStore;
    static constexpr bool kGatherA = GatherA;

    using CollectiveEpilogue = typename EpilogueOf<Element, Config, LayoutD, Epilogue_>::type;

    using BuiltMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element, LayoutB*,
        kAlignment, float, typename Config::TileShape, typename Config::ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
            sizeof(typename CollectiveEpilogue::SharedStorage))>,
        typename Config::KernelSchedule>::CollectiveOp;
    using CollectiveMainloop = std::conditional_t<GatherA, GatherAMainloop<BuiltMainloop>, BuiltMainloop>;

    using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
    using Arguments = typename Gemm::Arguments;
    using Params = typename Kernel::Params;
    using StrideA = typename Kernel::InternalStrideA;
    using StrideB = typename Kernel::InternalStrideB;
    using StrideD = typename Kernel::InternalStrideD;
};

template <typename Element, typename Config>
using GroupedGemmKernel = PtrArrayKernel<Element, Config, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;

// The forward GEMM1 with the gated activation in its epilogue (register_epilogue.cuh): the forward's operands, B
// with interleaved gate/up rows, D = h [rows, N / 2]; with GatherA, A's rows gathered from x (gather_mainloop.cuh);
// with KeepInput, GEMM1's product g [rows, N] stored too (the training forward).
template <typename Element, typename Config, bool GatherA = false, bool KeepInput = false>
using GatedGroupedGemmKernel =
    PtrArrayKernel<Element, Config, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor,
                   cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
                       RegisterEpilogueArray<Element, true, KeepInput>>,
                   GatherA>;

// The device arrays the CUTLASS kernel reads, carved from the front of the workspace.
template <typename Element, typename StrideA, typename StrideB, typename StrideD>
struct DeviceArrays {
    UnderlyingShape* shapes;
    const Element** ptr_a;
    const Element** ptr_b;
    Element** ptr_d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;

    // One function sizes (null base) and partitions the arrays, in one order, each slice 256-byte aligned.
    static DeviceArrays carve(WorkspaceCarver& wc, int64_t g) {
        DeviceArrays d;
        d.shapes = wc.take<UnderlyingShape>(g);
        d.ptr_a = wc.take<const Element*>(g);
        d.ptr_b = wc.take<const Element*>(g);
        d.ptr_d = wc.take<Element*>(g);
        d.stride_a = wc.take<StrideA>(g);
        d.stride_b = wc.take<StrideB>(g);
        d.stride_d = wc.take<StrideD>(g);
        return d;
    }
    static size_t bytes(int64_t g) {
        WorkspaceCarver sizing;
        carve(sizing, g);
        return sizing.used();
    }
};

// One thread per group: problem shape (M_e, N, K), operand pointers and (identical) packed strides; D has d_cols
// columns (N, or N / 2 for the gated epilogue).
// offsets are trusted to be non-decreasing with offsets[E] <= max_rows (the routing plan's contract).
// a_gathered: a is the gather source x (gather_mainloop.cuh), the same for every group (A's per-group tensor map is
// then never used for a load).
template <typename Element, typename Arrays>
__global__ void fill_group_arrays_kernel(Arrays arrays, const Element* a, const Element* b, Element* d,
                                         const int32_t* offsets, int num_groups, int n, int k, int d_cols,
                                         bool a_gathered) {
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= num_groups) return;
    int row0 = offsets[e];
    int m = offsets[e + 1] - row0;
    arrays.shapes[e] = UnderlyingShape(m, n, k);
    arrays.ptr_a[e] = a_gathered ? a : a + static_cast<int64_t>(row0) * k;
    arrays.ptr_b[e] = b + static_cast<int64_t>(e) * n * k;
    arrays.ptr_d[e] = d + static_cast<int64_t>(row0) * d_cols;
    using SA = cute::remove_pointer_t<decltype(arrays.stride_a)>;
    using SB = cute::remove_pointer_t<decltype(arrays.stride_b)>;
    using SD = cute::remove_pointer_t<decltype(arrays.stride_d)>;
    arrays.stride_a[e] = cutlass::make_cute_packed_stride(SA{}, {m, k, 1});
    arrays.stride_b[e] = cutlass::make_cute_packed_stride(SB{}, {n, k, 1});
    arrays.stride_d[e] = cutlass::make_cute_packed_stride(SD{}, {m, d_cols, 1});
}

// Arguments of CUTLASS's LinearCombination epilogue as every plain kernel here runs it (the FP8 kernel too): no C,
// D = 1.0 * acc, one alpha and beta for all groups.
template <typename EpilogueArguments, typename PtrD, typename StrideD>
void set_store_epilogue(EpilogueArguments& e, PtrD ptr_d, StrideD stride_d) {
    auto& fusion = e.thread;
    fusion.alpha = 1.0f;
    fusion.beta = 0.0f;
    fusion.alpha_ptr = nullptr;
    fusion.beta_ptr = nullptr;
    fusion.alpha_ptr_array = nullptr;
    fusion.beta_ptr_array = nullptr;
    fusion.dAlpha = {cute::_0{}, cute::_0{}, 0};
    fusion.dBeta = {cute::_0{}, cute::_0{}, 0};
    e.ptr_C = nullptr;
    e.dC = nullptr;
    e.ptr_D = ptr_d;
    e.dD = stride_d;
}

// What the gated epilogue that keeps its input stores besides h (register_epilogue.cuh, KeepInput): g [rows, N],
// group e's rows from offsets[e].
struct KeptInput {
    void* gate_up = nullptr;
    const int32_t* offsets = nullptr;
};

// The gathered A of a GatherA kernel (gather_mainloop.cuh): row r of the grouped problem is x[row_index[r]].
struct GatherSource {
    const void* x = nullptr;
    int64_t x_rows = 0;
    int64_t k = 0;
    const int32_t* row_index = nullptr;
    const int32_t* offsets = nullptr;
};

// The host side every ptr-array grouped GEMM here shares (forward and gradients): CUTLASS arguments from the
// device arrays, workspace sizing, the shared-memory attribute, and initialise + launch. K: a PtrArrayKernel.
template <typename Element, typename K>
struct PtrArrayGemm {
    using Arrays = DeviceArrays<Element, typename K::StrideA, typename K::StrideB, typename K::StrideD>;

    // Arguments for the CUTLASS kernel; pointers may be null when only sizing the workspace. activation: the gated
    // epilogue's (K::kOwnEpilogue with the gated form), ignored otherwise.
    static typename K::Arguments make_arguments(const Arrays& arr, int num_groups, int sm_count, int device,
                                                GemmRaster raster = GemmRaster::kAlongM, int activation = 0,
                                                const GatherSource& gather = GatherSource(),
                                                const KeptInput& kept = KeptInput()) {
        typename K::Arguments args;
        args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
        args.problem_shape = {num_groups, arr.shapes, nullptr};  // host problem shapes: none
        args.mainloop.ptr_A = arr.ptr_a;
        args.mainloop.dA = arr.stride_a;
        args.mainloop.ptr_B = arr.ptr_b;
        args.mainloop.dB = arr.stride_b;
        if constexpr (K::kGatherA) {
            args.mainloop.x = gather.x;
            args.mainloop.x_rows = gather.x_rows;
            args.mainloop.k = gather.k;
            args.mainloop.row_index = gather.row_index;
            args.mainloop.offsets = gather.offsets;
        }
        if constexpr (K::kOwnEpilogue) {
            args.epilogue.activation = activation;
            args.epilogue.ptr_D = arr.ptr_d;
            args.epilogue.dD = arr.stride_d;
            args.epilogue.gate_up = static_cast<Element*>(kept.gate_up);
            args.epilogue.offsets = kept.offsets;
        } else {
            set_store_epilogue(args.epilogue, arr.ptr_d, arr.stride_d);
        }
        args.hw_info.device_id = device;
        args.hw_info.sm_count = sm_count;
        args.hw_info.max_active_clusters = 0;  // the scheduler then sizes the persistent grid from sm_count
        using RasterOptions = cutlass::gemm::kernel::detail::RasterOrderOptions;
        args.scheduler.raster_order = raster == GemmRaster::kAlongN ? RasterOptions::AlongN : RasterOptions::AlongM;
        args.scheduler.max_swizzle_size = 1;
        return args;
    }

    static size_t workspace_size(int64_t num_groups, int sm_count) {
        Arrays none{};
        auto args = make_arguments(none, static_cast<int>(num_groups), sm_count, 0);
        return Arrays::bytes(num_groups) + align_up(K::Gemm::get_workspace_size(args), 256);
    }

    // Sets the kernel's dynamic shared memory limit once per device (not a stream operation; done before the
    // first launch on a device so that later calls, including those under graph capture, only launch).
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

    // Checks the workspace, prepares the device, carves the arrays, lets fill(arr) launch the kernel that writes
    // them (stream-ordered), then initialises CUTLASS's workspace and launches the GEMM. `what` names the caller.
    template <typename Fill>
    static void run(int64_t num_groups64, GemmRaster raster, void* workspace, size_t workspace_bytes, int sm_count,
                    cudaStream_t stream, const char* what, Fill&& fill, int activation = 0,
                    const GatherSource& gather = GatherSource(), const KeptInput& kept = KeptInput()) {
        const int num_groups = static_cast<int>(num_groups64);
        const size_t need = workspace_size(num_groups64, sm_count);
        SWITCHYARD_CHECK(workspace_bytes >= need, what, ": workspace_bytes=", workspace_bytes,
                         " is less than the required ", need);
        int device = 0;
        SWITCHYARD_GG_CUDA_CHECK(cudaGetDevice(&device));
        ensure_smem_attribute(device);

        WorkspaceCarver wc(workspace, workspace_bytes);
        Arrays arr = Arrays::carve(wc, num_groups64);
        void* cutlass_ws = static_cast<char*>(workspace) + wc.used();
        fill(arr);
        SWITCHYARD_GG_CUDA_CHECK(cudaGetLastError());

        auto args = make_arguments(arr, num_groups, sm_count, device, raster, activation, gather, kept);
        cutlass::Status st = K::Kernel::initialize_workspace(args, cutlass_ws, stream);
        SWITCHYARD_CHECK(st == cutlass::Status::kSuccess, what, ": CUTLASS initialize_workspace failed: ",
                         cutlassGetStatusString(st));
        typename K::Params params = K::Kernel::to_underlying_arguments(args, cutlass_ws);
        st = K::Gemm::run(params, stream);
        SWITCHYARD_CHECK(st == cutlass::Status::kSuccess, what, ": CUTLASS launch failed: ",
                         cutlassGetStatusString(st));
        SWITCHYARD_GG_CUDA_CHECK(cudaGetLastError());
    }
};

constexpr int kFillThreads = 128;  // threads per block of the kernels that fill the device arrays (one per group)

// The forward (GroupedGemmKernel) or, with kGated, GEMM1 with the gated activation in its epilogue
// (GatedGroupedGemmKernel; g.n = 2F interleaved rows of B, g.c = h [max_rows, F], g.activation); with kGather, A's
// rows gathered: g.a is x [g.a_rows, K] and row r reads x[g.a_row_index[r]]; with kKeep (gated), GEMM1's product
// stored into g.gate_up_out [max_rows, 2F] too.
template <typename Element, typename Config, bool kGated = false, bool kGather = false, bool kKeep = false>
struct GroupedGemmRunner {
    static_assert(kGated || !kKeep, "only the gated epilogue keeps its input");
    using K = std::conditional_t<kGated, GatedGroupedGemmKernel<Element, Config, kGather, kKeep>,
                                 PtrArrayKernel<Element, Config, cutlass::layout::RowMajor,
                                                cutlass::layout::ColumnMajor, void, kGather>>;
    using P = PtrArrayGemm<Element, K>;

    static size_t workspace_size(int64_t num_groups, int sm_count) { return P::workspace_size(num_groups, sm_count); }

    static void run(const GroupedGemmArgs& g, void* workspace, size_t workspace_bytes, int sm_count,
                    cudaStream_t stream) {
        const int num_groups = static_cast<int>(g.num_groups);
        P::run(g.num_groups, g.raster, workspace, workspace_bytes, sm_count, stream, "grouped_gemm",
               [&](const auto& arr) {
            using Arrays = typename P::Arrays;
            fill_group_arrays_kernel<Element, Arrays>
                <<<(num_groups + kFillThreads - 1) / kFillThreads, kFillThreads, 0, stream>>>(
                    arr, static_cast<const Element*>(g.a), static_cast<const Element*>(g.b),
                    static_cast<Element*>(g.c), g.offsets, num_groups, static_cast<int>(g.n), static_cast<int>(g.k),
                    static_cast<int>(kGated ? g.n / 2 : g.n), kGather);
        }, static_cast<int>(g.activation), GatherSource{g.a, g.a_rows, g.k, g.a_row_index, g.offsets},
               KeptInput{kKeep ? g.gate_up_out : nullptr, g.offsets});
    }
};

}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard

// Defines `const GemmOps <var>` for one (element, config) pair in one translation unit: the plain forward, or
// (..._GATED_GEMM) GEMM1 with the gated epilogue, (..._GATED_KEEP_GEMM) that epilogue storing GEMM1's product too.
#define SWITCHYARD_DEFINE_SM90_GEMM_OPS(var, element, config, gated, gather, keep, label)               \
    namespace switchyard {                                                                                \
    namespace cuda {                                                                                      \
    namespace sm90 {                                                                                      \
    const GemmOps var = {label, &GroupedGemmRunner<element, config, gated, gather, keep>::workspace_size, \
                         &GroupedGemmRunner<element, config, gated, gather, keep>::run};                  \
    }                                                                                                     \
    }                                                                                                     \
    }
#define SWITCHYARD_DEFINE_SM90_GROUPED_GEMM(var, element, config, label) \
    SWITCHYARD_DEFINE_SM90_GEMM_OPS(var, element, config, false, false, false, label)
#define SWITCHYARD_DEFINE_SM90_GATED_GEMM(var, element, config, label) \
    SWITCHYARD_DEFINE_SM90_GEMM_OPS(var, element, config, true, false, false, label)
#define SWITCHYARD_DEFINE_SM90_GATHER_GEMM(var, element, config, label) \
    SWITCHYARD_DEFINE_SM90_GEMM_OPS(var, element, config, false, true, false, label)
#define SWITCHYARD_DEFINE_SM90_GATED_GATHER_GEMM(var, element, config, label) \
    SWITCHYARD_DEFINE_SM90_GEMM_OPS(var, element, config, true, true, false, label)
#define SWITCHYARD_DEFINE_SM90_GATED_KEEP_GEMM(var, element, config, label) \
    SWITCHYARD_DEFINE_SM90_GEMM_OPS(var, element, config, true, false, true, label)
