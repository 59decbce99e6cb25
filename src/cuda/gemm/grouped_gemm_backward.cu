// src/cuda/gemm/grouped_gemm_backward.cu: the gradient entry points of grouped_gemm.h (grouped_gemm_dgrad / _wgrad):
// validation, workspace sizing, the zeroing kernels, and the fp32 path (tiled SIMT kernels). The 16-bit path runs
// the CUTLASS sm90 instantiations of grouped_gemm_sm90_backward.cuh.
//
// Contract (per expert e with rows [offsets[e], offsets[e+1]), all tensors row-major):
//   dgrad: dA[r, k] = sum_n dC[r, n] * B[e, n, k]; rows r >= offsets[E] of dA [max_rows, K] are written as 0.
//   wgrad: dB[e, n, k] = sum_{r in e} dC[r, n] * A[r, k]; an expert with no rows gets dB[e] = 0.
// Empty experts in the 16-bit wgrad: CUTLASS's sm90 mainloop leaves the accumulators unset when a group's K (here
// rows_e) is 0, so those groups are given M = 0 (no tiles) and zero_empty_groups_kernel writes their dB[e]. It is a
// persistent grid-stride kernel over all experts that reads the device offsets (no host synchronisation); with no
// empty expert it costs one short launch. dgrad's unused rows are zeroed the same way (zero_tail_rows_kernel).
//
// fp32 kernels: one 64x64 output tile per thread block, each thread a 4x4 micro-tile accumulated in fp32 over the
// reduction index in increasing order (bitwise reproducible), operands staged through shared memory in slabs of 16
// along the reduction with coalesced loads whichever index is contiguous in memory. dgrad numbers its blocks over
// all groups' 64-row tiles (grid sized from max_rows + E, as the forward's fp32 kernel); wgrad has one grid slice
// per expert (blockIdx.z), its reduction running over the expert's rows (none: the tile is written as 0).
// Reference: products accumulated in double (src/ref/backward.cpp grouped_gemm_backward), rounded to the dtype.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda/gemm/grouped_gemm.h"
#include "cuda/gemm/sm90/grouped_gemm_sm90.h"
#include "cuda/gemm/sm90/grouped_gemm_sm90_backward.h"
#include "cuda/gemm/grouped_gemm_simt.cuh"
#include "switchyard/error.h"

namespace switchyard {
namespace cuda {
namespace {

using simt::kThreads;
using simt::kTile;
using simt::simt_tile;
constexpr int kZeroThreads = 256;

struct F32Params {
    const float* dc;
    const float* a;
    const float* b;
    float* da;
    float* db;
    const int32_t* offsets;
    int num_groups;
    int n;
    int k;
};

// dA tile (row tile blockIdx.x over all groups, column tile blockIdx.y over K): A' = dC_e rows (reduction over n
// contiguous), B'(j, q) = B[e, q, j] (j contiguous).
__global__ void __launch_bounds__(kThreads) dgrad_f32_kernel(F32Params p) {
    const simt::RowTile t = simt::row_tile_of(blockIdx.x, p.offsets, p.num_groups);
    if (t.group < 0) return;
    const int col0 = blockIdx.y * kTile;
    simt_tile<true, false>(p.dc + static_cast<int64_t>(t.row0) * p.n, p.n, t.rows,
                           p.b + static_cast<int64_t>(t.group) * p.n * p.k + col0, p.k, p.k - col0, p.n,
                           p.da + static_cast<int64_t>(t.row0) * p.k + col0, p.k);
}

// dB[e] tile (blockIdx.y over N, blockIdx.x over K, blockIdx.z = e): A'(i, r) = dC[row0 + r, n0 + i],
// B'(j, r) = A[row0 + r, k0 + j]; both contiguous along i / j. The reduction runs over the expert's rows.
__global__ void __launch_bounds__(kThreads) wgrad_f32_kernel(F32Params p) {
    const int e = blockIdx.z;
    const int row0 = p.offsets[e];
    const int rows = p.offsets[e + 1] - row0;
    const int n0 = blockIdx.y * kTile, k0 = blockIdx.x * kTile;
    simt_tile<false, false>(p.dc + static_cast<int64_t>(row0) * p.n + n0, p.n, p.n - n0,
                            p.a + static_cast<int64_t>(row0) * p.k + k0, p.k, p.k - k0, rows,
                            p.db + (static_cast<int64_t>(e) * p.n + n0) * p.k + k0, p.k);
}

// Zeroes units [offsets[E] * units_per_row, max_rows * units_per_row) of base (rows no expert owns).
template <typename T>
__global__ void zero_tail_rows_kernel(T* base, const int32_t* offsets, int num_groups, int64_t units_per_row,
                                      int64_t max_rows) {
    const int64_t used = offsets[num_groups];  // clamped: a malformed offsets array never writes out of range
    const int64_t begin = (used < 0 ? 0 : (used > max_rows ? max_rows : used)) * units_per_row;
    const int64_t end = max_rows * units_per_row;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end; i += stride)
        base[i] = T{};
}

// Zeroes the units_per_group units of every group e with offsets[e + 1] == offsets[e]: blockIdx.y is the group, the
// gridDim.x blocks of an empty group share its units, those of a non-empty one return after reading two offsets.
template <typename T>
__global__ void zero_empty_groups_kernel(T* base, const int32_t* offsets, int64_t units_per_group) {
    const int e = blockIdx.y;
    if (offsets[e + 1] != offsets[e]) return;
    T* g = base + static_cast<int64_t>(e) * units_per_group;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < units_per_group; i += stride)
        g[i] = T{};
}

// Blocks per group of zero_empty_groups_kernel: enough to zero one group's units at a few units per thread, at most
// 16 (empty groups are rare; a non-empty group's blocks only read its two offsets).
unsigned empty_group_blocks(int64_t units_per_group) {
    const int64_t b = (units_per_group + 4 * kZeroThreads - 1) / (4 * kZeroThreads);
    return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(b, 1), 16));
}

void check_sizes(const GroupedGemmGradArgs& g) {
    check_gemm_sizes("grouped_gemm gradient", g.dtype, g.num_groups, 65535, g.n, g.k, g.max_rows);
    for (GroupedGemmEpilogue e : {g.wgrad_epilogue, g.dgrad_epilogue}) {
        SWITCHYARD_CHECK(static_cast<int>(e) >= 0 && e <= GroupedGemmEpilogue::kRegisters,
                         "grouped_gemm gradient: epilogue=", static_cast<int>(e), " is not a GroupedGemmEpilogue");
        SWITCHYARD_CHECK(g.dtype == DType::kBF16 || e == GroupedGemmEpilogue::kAuto,
                         "grouped_gemm gradient: an epilogue other than kAuto is bf16 only (dtype=", to_string(g.dtype),
                         ")");
    }
    SWITCHYARD_CHECK(g.wgrad_epilogue != GroupedGemmEpilogue::kTma128, "grouped_gemm gradient: wgrad_epilogue kTma128 "
                     "is not built (kAuto, kTma32 or kRegisters)");
}

// Checks the workspace and device for a 16-bit call; returns the device facts.
// The checks of a 16-bit gradient call: dtype, workspace, and 16-byte alignment (TMA) of dC and the two operands the
// layout reads or writes (dgrad: B and dA; wgrad: A and dB).
DeviceFacts check_grad_16bit_call(const GroupedGemmGradArgs& g, void* workspace, size_t workspace_bytes,
                                  const char* what) {
    const bool dgrad = g.da != nullptr;
    const void* in = dgrad ? g.b : g.a;
    const void* out = dgrad ? g.da : g.db;
    SWITCHYARD_CHECK(aligned16(g.dc) && aligned16(in) && aligned16(out), what, ": dc, ", dgrad ? "b and da" : "a and db",
                     " must be 16-byte aligned for TMA (dc=", g.dc, ", ", dgrad ? "b=" : "a=", in, ", ",
                     dgrad ? "da=" : "db=", out, ")");
    return check_16bit_call(what, g.dtype, workspace, workspace_bytes, grouped_gemm_grad_workspace_size(g));
}

// Grid for a grid-stride zeroing kernel over `units` units: enough blocks to cover them, at most 4 per SM.
unsigned zero_grid(int64_t units, int sm_count) {
    const int64_t blocks = (units + kZeroThreads - 1) / kZeroThreads;
    return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 4 * int64_t{sm_count})));
}

// Zeroes rows [offsets[E], max_rows) of a [max_rows, width] tensor of dtype t.
void zero_tail_rows(void* base, DType t, const int32_t* offsets, int64_t num_groups, int64_t width, int64_t max_rows,
                    int sm_count, cudaStream_t stream) {
    const int64_t row_bytes = width * static_cast<int64_t>(dtype_size(t));
    if (row_bytes % 16 == 0 && aligned16(base)) {
        const int64_t units = row_bytes / 16;
        zero_tail_rows_kernel<uint4><<<zero_grid(units * max_rows, sm_count), kZeroThreads, 0, stream>>>(
            static_cast<uint4*>(base), offsets, static_cast<int>(num_groups), units, max_rows);
    } else if (row_bytes % 4 == 0) {  // e.g. fp32 rows
        const int64_t units = row_bytes / 4;
        zero_tail_rows_kernel<uint32_t><<<zero_grid(units * max_rows, sm_count), kZeroThreads, 0, stream>>>(
            static_cast<uint32_t*>(base), offsets, static_cast<int>(num_groups), units, max_rows);
    } else {  // 16-bit rows of odd width
        const int64_t units = row_bytes / 2;
        zero_tail_rows_kernel<uint16_t><<<zero_grid(units * max_rows, sm_count), kZeroThreads, 0, stream>>>(
            static_cast<uint16_t*>(base), offsets, static_cast<int>(num_groups), units, max_rows);
    }
    SWITCHYARD_GG_CUDA_CHECK(cudaGetLastError());
}

// The fp32 kernels' parameters (unused pointers of the other layout are passed along unread).
F32Params f32_params(const GroupedGemmGradArgs& g) {
    F32Params p;
    p.dc = static_cast<const float*>(g.dc);
    p.a = static_cast<const float*>(g.a);
    p.b = static_cast<const float*>(g.b);
    p.da = static_cast<float*>(g.da);
    p.db = static_cast<float*>(g.db);
    p.offsets = g.offsets;
    p.num_groups = static_cast<int>(g.num_groups);
    p.n = static_cast<int>(g.n);
    p.k = static_cast<int>(g.k);
    return p;
}

}  // namespace

void zero_rows_past_groups(void* base, DType dtype, const int32_t* offsets, int64_t num_groups, int64_t width,
                           int64_t max_rows, cudaStream_t stream) {
    SWITCHYARD_CHECK(num_groups >= 0 && width >= 0 && max_rows >= 0, "zero_rows_past_groups: num_groups=", num_groups,
                     " width=", width, " max_rows=", max_rows);
    if (max_rows == 0 || width == 0) return;
    zero_tail_rows(base, dtype, offsets, num_groups, width, max_rows, device_facts().sm_count, stream);
}

bool grouped_gemm_grad_supported(const GroupedGemmGradArgs& args) {
    try {
        check_sizes(args);
    } catch (const Error&) {
        return false;
    }
    return true;
}

size_t grouped_gemm_grad_workspace_size(const GroupedGemmGradArgs& args) {
    check_sizes(args);
    if (!is_16bit(args.dtype)) return 0;
    const int sm_count = device_facts().sm_count;
    size_t bytes = 0;
    for (auto e : {GroupedGemmEpilogue::kTma32, GroupedGemmEpilogue::kRegisters}) {
        bytes = std::max(bytes, sm90::wgrad_ops_for(args.dtype, e).workspace_size(args.num_groups, sm_count));
    }
    for (auto c : {sm90::DgradConfig::kCluster2x1, sm90::DgradConfig::kCluster1x2, sm90::DgradConfig::kNoCluster}) {
        for (auto e : {GroupedGemmEpilogue::kTma32, GroupedGemmEpilogue::kTma128, GroupedGemmEpilogue::kRegisters}) {
            bytes = std::max(bytes, sm90::dgrad_ops_for(args.dtype, c, e).workspace_size(args.num_groups, sm_count));
        }
    }
    return bytes;
}

namespace {

int64_t avg_rows_per_group(const GroupedGemmGradArgs& g) { return g.max_rows / std::max<int64_t>(g.num_groups, 1); }

// dgrad's configuration. Its M is the expert's rows, as the forward's, and kAuto follows the forward's rule
// (grouped_gemm.cu, choose_tile): no cluster up to kNoClusterMaxRows rows per expert, where the 2x1 cluster rounds
// an expert's M tiles up to a pair (with ~512 +- 23 rows per expert, DeepSeek-V3 at T = 16384, about half the experts
// run 6 tiles for 5), the 2x1 cluster's weight multicast above. The 1x2 cluster only on request: measured on an H100
// (bench/NOTES.md, "Cluster shape and M padding") it was 26-55% slower than the 2x1 on DeepSeek-V3's shapes.
sm90::DgradConfig dgrad_config(const GroupedGemmGradArgs& g) {
    switch (g.dgrad_tile) {
        case GroupedGemmTile::kLarge: return sm90::DgradConfig::kCluster2x1;
        case GroupedGemmTile::kLargeClusterN: return sm90::DgradConfig::kCluster1x2;
        case GroupedGemmTile::kLargeNoCluster: return sm90::DgradConfig::kNoCluster;
        case GroupedGemmTile::kAuto:
            return avg_rows_per_group(g) <= kNoClusterMaxRows ? sm90::DgradConfig::kNoCluster
                                                               : sm90::DgradConfig::kCluster2x1;
        default: break;
    }
    SWITCHYARD_FAIL("grouped_gemm dgrad: dgrad_tile=", static_cast<int>(g.dgrad_tile),
                    " is not a dgrad configuration (kAuto, kLarge, kLargeClusterN or kLargeNoCluster)");
}

// dgrad's epilogue: the no-cluster configuration has three, the others CUTLASS's only. kAuto: grouped_gemm_sm90.h,
// resolve_dgrad_epilogue, by the dgrad's reduction length (the forward's N).
GroupedGemmEpilogue dgrad_epilogue(const GroupedGemmGradArgs& g, sm90::DgradConfig config) {
    if (config == sm90::DgradConfig::kNoCluster && g.dtype == DType::kBF16) {
        return resolve_dgrad_epilogue(g.dgrad_epilogue, g.n);
    }
    SWITCHYARD_CHECK(g.dgrad_epilogue == GroupedGemmEpilogue::kAuto, "grouped_gemm dgrad: dgrad_epilogue=",
                     static_cast<int>(g.dgrad_epilogue), " needs the bf16 dgrad without a cluster");
    return GroupedGemmEpilogue::kTma32;
}

// wgrad's epilogue (kAuto: grouped_gemm_sm90.h, resolve_wgrad_epilogue, by the rows per expert; check_sizes refused
// kTma128).
GroupedGemmEpilogue wgrad_epilogue(const GroupedGemmGradArgs& g) {
    return resolve_wgrad_epilogue(g.wgrad_epilogue, avg_rows_per_group(g));
}

}  // namespace

const char* grouped_gemm_dgrad_kernel_name(const GroupedGemmGradArgs& args) {
    check_sizes(args);
    if (!is_16bit(args.dtype)) return "simt fp32 dgrad 64x64x16";
    const sm90::DgradConfig config = dgrad_config(args);
    return sm90::dgrad_ops_for(args.dtype, config, dgrad_epilogue(args, config)).name;
}

const char* grouped_gemm_wgrad_kernel_name(const GroupedGemmGradArgs& args) {
    check_sizes(args);
    if (!is_16bit(args.dtype)) return "simt fp32 wgrad 64x64x16";
    return sm90::wgrad_ops_for(args.dtype, wgrad_epilogue(args)).name;
}

void grouped_gemm_dgrad(const GroupedGemmGradArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    check_sizes(args);
    SWITCHYARD_CHECK(args.offsets != nullptr, "grouped_gemm dgrad: offsets is null");
    SWITCHYARD_CHECK(args.b != nullptr, "grouped_gemm dgrad: b is null");
    if (args.max_rows == 0) return;  // dA has no rows
    SWITCHYARD_CHECK(args.dc != nullptr, "grouped_gemm dgrad: dc is null with max_rows=", args.max_rows);
    SWITCHYARD_CHECK(args.da != nullptr, "grouped_gemm dgrad: da is null with max_rows=", args.max_rows);

    if (args.dtype == DType::kF32) {
        zero_tail_rows(args.da, args.dtype, args.offsets, args.num_groups, args.k, args.max_rows,
                       device_facts().sm_count, stream);
        const F32Params p = f32_params(args);
        const int64_t row_tiles = (args.max_rows + kTile - 1) / kTile + args.num_groups;
        const int64_t col_tiles = (args.k + kTile - 1) / kTile;
        SWITCHYARD_CHECK(row_tiles <= INT_MAX && col_tiles <= 65535,
                         "grouped_gemm dgrad: fp32 grid too large (row "
                         "tiles ",
                         row_tiles, ", column tiles ", col_tiles, ")");
        dgrad_f32_kernel<<<dim3(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles)), kThreads, 0,
                           stream>>>(p);
        SWITCHYARD_GG_CUDA_CHECK(cudaGetLastError());
        return;
    }

    const DeviceFacts facts = check_grad_16bit_call(args, workspace, workspace_bytes, "grouped_gemm dgrad");
    const sm90::DgradConfig config = dgrad_config(args);  // validates dgrad_tile before anything is enqueued
    const GroupedGemmEpilogue epilogue = dgrad_epilogue(args, config);  // and dgrad_epilogue
    zero_tail_rows(args.da, args.dtype, args.offsets, args.num_groups, args.k, args.max_rows, facts.sm_count, stream);
    GroupedGemmGradArgs a = args;
    a.raster = resolve_raster(args.raster);
    sm90::dgrad_ops_for(args.dtype, config, epilogue).run(a, workspace, workspace_bytes, facts.sm_count, stream);
}

void grouped_gemm_wgrad(const GroupedGemmGradArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    check_sizes(args);
    SWITCHYARD_CHECK(args.offsets != nullptr, "grouped_gemm wgrad: offsets is null");
    SWITCHYARD_CHECK(args.db != nullptr, "grouped_gemm wgrad: db is null");
    const size_t db_bytes = static_cast<size_t>(args.num_groups * args.n * args.k) * dtype_size(args.dtype);
    if (args.max_rows == 0) {  // offsets[E] <= 0: every expert is empty
        SWITCHYARD_GG_CUDA_CHECK(cudaMemsetAsync(args.db, 0, db_bytes, stream));
        return;
    }
    SWITCHYARD_CHECK(args.dc != nullptr, "grouped_gemm wgrad: dc is null with max_rows=", args.max_rows);
    SWITCHYARD_CHECK(args.a != nullptr, "grouped_gemm wgrad: a is null with max_rows=", args.max_rows);

    if (args.dtype == DType::kF32) {  // empty experts: the kernel's reduction is empty and writes 0
        const F32Params p = f32_params(args);
        const int64_t k_tiles = (args.k + kTile - 1) / kTile;
        const int64_t n_tiles = (args.n + kTile - 1) / kTile;
        SWITCHYARD_CHECK(k_tiles <= INT_MAX && n_tiles <= 65535, "grouped_gemm wgrad: fp32 grid too large (k tiles ",
                         k_tiles, ", n tiles ", n_tiles, ")");
        wgrad_f32_kernel<<<dim3(static_cast<unsigned>(k_tiles), static_cast<unsigned>(n_tiles),
                                static_cast<unsigned>(args.num_groups)),
                           kThreads, 0, stream>>>(p);
        SWITCHYARD_GG_CUDA_CHECK(cudaGetLastError());
        return;
    }

    GroupedGemmGradArgs w = args;
    w.da = nullptr;  // the wgrad layout (check_grad_16bit_call reads which operands from da)
    const DeviceFacts facts = check_grad_16bit_call(w, workspace, workspace_bytes, "grouped_gemm wgrad");
    // N * K is a multiple of 64 elements here: every expert's dB is a whole number of 16-byte units.
    const int64_t units = args.n * args.k * static_cast<int64_t>(dtype_size(args.dtype)) / 16;
    zero_empty_groups_kernel<uint4>
        <<<dim3(empty_group_blocks(units), static_cast<unsigned>(args.num_groups)), kZeroThreads, 0, stream>>>(
            static_cast<uint4*>(args.db), args.offsets, units);
    SWITCHYARD_GG_CUDA_CHECK(cudaGetLastError());
    GroupedGemmGradArgs a = args;
    a.raster = resolve_raster(args.raster);
    sm90::wgrad_ops_for(args.dtype, wgrad_epilogue(args)).run(a, workspace, workspace_bytes, facts.sm_count, stream);
}

}  // namespace cuda
}  // namespace switchyard
