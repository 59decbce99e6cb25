// src/cuda/gemm/grouped_gemm.cu: the grouped GEMM entry points of grouped_gemm.h: validation, workspace sizing, the
// tile heuristic for the 16-bit CUTLASS path (grouped_gemm_sm90*.cu), and the fp32 path (a tiled SIMT kernel).
//
// fp32 kernel layout: for group e with rows [offsets[e], offsets[e+1]) of A [rows, K] and B_e = B[e] [N, K]
// (both row-major, K contiguous), C[r, n] = sum_k A[r, k] * B_e[n, k], C [rows, N] row-major.
// Each 64x64 output tile is one thread block; blocks are numbered over all groups' row tiles (a group of m rows
// has ceil(m / 64) of them; at most ceil(max_rows / 64) + E in total), so the grid is sized from max_rows alone and
// the kernel reads the group sizes from the device offsets (no host synchronisation); the tile code is shared with
// the gradients (grouped_gemm_simt.cuh). Each thread accumulates a 4x4 micro-tile in fp32 over k = 0..K-1 in
// order: bitwise reproducible. Any N, K >= 1 (bounds-checked loads).
// Reference: a product accumulated in double (src/ref), rounded to fp32.
#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstdint>

#include "cuda/gemm/grouped_gemm.h"
#include "cuda/gemm/sm90/grouped_gemm_sm90.h"
#include "cuda/gemm/grouped_gemm_simt.cuh"
#include "switchyard/error.h"

namespace switchyard {
namespace cuda {
namespace {

struct SimtParams {
    const float* a;
    const float* b;
    float* c;
    const int32_t* offsets;
    int num_groups;
    int n;
    int k;
};

// One 64x64 tile of C: row tile blockIdx.x over all groups' row tiles, column tile blockIdx.y over N; both operands
// contiguous along K (simt::simt_tile<true, true>).
__global__ void __launch_bounds__(simt::kThreads) grouped_gemm_f32_kernel(SimtParams p) {
    const simt::RowTile t = simt::row_tile_of(blockIdx.x, p.offsets, p.num_groups);
    if (t.group < 0) return;
    const int col0 = blockIdx.y * simt::kTile;
    simt::simt_tile<true, true>(p.a + static_cast<int64_t>(t.row0) * p.k, p.k, t.rows,
                                p.b + (static_cast<int64_t>(t.group) * p.n + col0) * p.k, p.k, p.n - col0, p.k,
                                p.c + static_cast<int64_t>(t.row0) * p.n + col0, p.n);
}

void check_sizes(const GroupedGemmArgs& g) {
    check_gemm_sizes("grouped_gemm", g.dtype, g.num_groups, INT_MAX, g.n, g.k, g.max_rows);
    if (g.gated) {
        SWITCHYARD_CHECK(g.dtype == DType::kBF16, "grouped_gemm: the gated epilogue is bf16 only (dtype=",
                         to_string(g.dtype), ")");
        SWITCHYARD_CHECK(g.n % 16 == 0, "grouped_gemm: the gated epilogue needs N = 2F with F a multiple of 8 (N=", g.n,
                         ")");
        SWITCHYARD_CHECK(is_gated(g.activation), "grouped_gemm: the gated epilogue takes a gated activation (SwiGLU, "
                         "GeGLU), got ", to_string(g.activation));
        SWITCHYARD_CHECK(g.gate_up_out == nullptr || g.a_row_index == nullptr,
                         "grouped_gemm: gate_up_out with a gathered A (a_row_index) is not built");
    } else {
        SWITCHYARD_CHECK(g.gate_up_out == nullptr, "grouped_gemm: gate_up_out needs the gated epilogue (gated)");
    }
    if (g.a_row_index != nullptr) {
        SWITCHYARD_CHECK(g.dtype == DType::kBF16, "grouped_gemm: a gathered A (a_row_index) is bf16 only (dtype=",
                         to_string(g.dtype), ")");
        SWITCHYARD_CHECK(g.a_rows >= 1 && g.a_rows <= INT_MAX, "grouped_gemm: a_rows=", g.a_rows,
                         " must be in [1, 2^31) with a_row_index");
        SWITCHYARD_CHECK(g.k <= INT_MAX / 2, "grouped_gemm: k=", g.k,
                         " must be below 2^30 with a_row_index (a row's bytes are a 32-bit stride)");
    }
    SWITCHYARD_CHECK(static_cast<int>(g.epilogue) >= 0 && g.epilogue <= GroupedGemmEpilogue::kRegisters,
                     "grouped_gemm: epilogue=", static_cast<int>(g.epilogue), " is not a GroupedGemmEpilogue");
}

sm90::TileConfig choose_tile(const GroupedGemmArgs& g) {
    const bool bf16 = g.dtype == DType::kBF16;
    switch (g.tile) {
        case GroupedGemmTile::kLarge: return sm90::TileConfig::kCooperative128x256;
        case GroupedGemmTile::kSmall: return sm90::TileConfig::kPingpong64x128;
        case GroupedGemmTile::kMedium: return sm90::TileConfig::kPingpong128x128;
        case GroupedGemmTile::kLargeClusterN:
            return bf16 ? sm90::TileConfig::kCooperative128x256N2 : sm90::TileConfig::kCooperative128x256;
        case GroupedGemmTile::kLargeNoCluster:
            return bf16 ? sm90::TileConfig::kCooperative128x256C1 : sm90::TileConfig::kCooperative128x256;
        case GroupedGemmTile::kAuto: break;
    }
    // Measured on an H200 (bench/NOTES.md, change 2) and an H100 (2026-11-27) over the DESIGN.md expert shapes: with
    // few rows per group the 64-row Pingpong tile wastes the least MMA work and streams the weights fastest; up to 64
    // rows the 128x128 Pingpong tile, whose two warpgroups overlap one tile's epilogue with the other's MMA; otherwise
    // the Cooperative 128x256 tile (highest MMA rate), short K included (Qwen3's down GEMM, K = 768, on an H100: 7-12%
    // faster than the 128x128 Pingpong tile at T = 4096 and 16384, bench/NOTES.md "The training step's GEMM
    // epilogues"; the H200 had measured them even): without a cluster up to kNoClusterMaxRows rows per expert (no M
    // tile rounded up to a cluster pair: grouped_gemm_sm90.h), with the 2x1 cluster's weight multicast above.
    // Measured (bench/NOTES.md, "Cluster shape and M padding"; H200 and H100): from 128 to 1024 rows per expert no cluster took up to 19% less time than the
    // 2x1 cluster (H200; up to 13% on the H100) or tied within the runs' noise, except DeepSeek-V3's memory-bound
    // GEMM1 at 128 rows (T = 4096), which Nsight showed 5% slower on the H100 than the day before with 2x1: without
    // the multicast its weights are read 1.21x instead of 1.03x. The 1x2 cluster was no better, and on the H100
    // much slower on DeepSeek-V3. At Mixtral's 4096 rows they tie. fp16 has only the 2x1 Cooperative tile.
    const int64_t avg_rows = g.max_rows / std::max<int64_t>(g.num_groups, 1);
    if (avg_rows <= 32 || g.n <= 128) return sm90::TileConfig::kPingpong64x128;
    if (avg_rows <= 64) return bf16 ? sm90::TileConfig::kPingpong128x128 : sm90::TileConfig::kPingpong64x128;
    if (bf16 && avg_rows <= kNoClusterMaxRows) return sm90::TileConfig::kCooperative128x256C1;
    return sm90::TileConfig::kCooperative128x256;
}

// The gated epilogue's kernel for args. Overrides: kLarge = Cooperative 128x256 with the 2x1 cluster,
// kLargeNoCluster / kLargeClusterN = Cooperative 128x256 without a cluster, kMedium / kSmall = Pingpong 64x256.
// kAuto, measured on an H100 (bench/NOTES.md, "Gated epilogue"): up to kGatedPingpongMaxRows rows per expert the
// Pingpong 64x256 tile, whose second warpgroup keeps the tensor cores busy during the first one's epilogue and
// whose 64-row tiles round an expert's rows up less (Qwen3 and DeepSeek-V3 at T=4096: 7-18% faster than the
// Cooperative tiles); above, the Cooperative tile of the plain rule (its MMA rate wins where the GEMM is
// compute-bound: Pingpong was 16-22% slower on Mixtral, 4-11% at 512-1024 rows per expert).
constexpr int64_t kGatedPingpongMaxRows = 256;

// With a_row_index, the same tile with A's rows gathered; with gate_up_out, the same tile storing g too (the rule
// measured for h alone: the extra stores lengthen every tile's epilogue alike).
const sm90::GemmOps& gated_ops(const GroupedGemmArgs& g) {
    const bool gather = g.a_row_index != nullptr, keep = g.gate_up_out != nullptr;
    const sm90::GemmOps& coop = keep     ? sm90::kBF16GatedKeepCooperative
                                : gather ? sm90::kBF16GatedGatherCooperative
                                         : sm90::kBF16GatedCooperative;
    const sm90::GemmOps& coop_c1 = keep     ? sm90::kBF16GatedKeepCooperativeC1
                                   : gather ? sm90::kBF16GatedGatherCooperativeC1
                                            : sm90::kBF16GatedCooperativeC1;
    const sm90::GemmOps& pingpong = keep     ? sm90::kBF16GatedKeepPingpong
                                    : gather ? sm90::kBF16GatedGatherPingpong
                                             : sm90::kBF16GatedPingpong;
    switch (g.tile) {
        case GroupedGemmTile::kLarge: return coop;
        case GroupedGemmTile::kLargeNoCluster:
        case GroupedGemmTile::kLargeClusterN: return coop_c1;
        case GroupedGemmTile::kSmall:
        case GroupedGemmTile::kMedium: return pingpong;
        case GroupedGemmTile::kAuto: break;
    }
    if (g.max_rows / std::max<int64_t>(g.num_groups, 1) <= kGatedPingpongMaxRows) return pingpong;
    return choose_tile(g) == sm90::TileConfig::kCooperative128x256 ? coop : coop_c1;
}

// The plain forward with A's rows gathered: choose_tile's tile, the Pingpong 128x128 one where it picks the
// 64x128x128 tile (whose 128-wide k tile the gathered loads do not take: gather_mainloop.cuh).
const sm90::GemmOps& gather_ops(const GroupedGemmArgs& g) {
    switch (choose_tile(g)) {
        case sm90::TileConfig::kCooperative128x256: return sm90::kBF16GatherCooperative;
        case sm90::TileConfig::kCooperative128x256C1:
        case sm90::TileConfig::kCooperative128x256N2: return sm90::kBF16GatherCooperativeC1;
        default: return sm90::kBF16GatherPingpong128;
    }
}

// The plain bf16 Cooperative kernel without a cluster with the epilogue g.epilogue asks for, or kAuto's
// (grouped_gemm_sm90.h, resolve_epilogue: by the reduction length K); any other kernel takes kAuto only.
const sm90::GemmOps& with_epilogue(const GroupedGemmArgs& g, const sm90::GemmOps& ops) {
    if (&ops == &sm90::kBF16CooperativeC1) {
        switch (resolve_epilogue(g.epilogue, g.k)) {
            case GroupedGemmEpilogue::kTma128: return sm90::kBF16CooperativeC1Epi128;
            case GroupedGemmEpilogue::kRegisters: return sm90::kBF16CooperativeC1Reg;
            default: return ops;
        }
    }
    SWITCHYARD_CHECK(g.epilogue == GroupedGemmEpilogue::kAuto, "grouped_gemm: epilogue=", static_cast<int>(g.epilogue),
                     " is not built for ", ops.name,
                     " (only the plain bf16 Cooperative kernel without a cluster has the choice)");
    return ops;
}

// The kernel for 16-bit args: the gated epilogue's, the gathered plain one's, or choose_tile's.
const sm90::GemmOps& ops_of(const GroupedGemmArgs& g) {
    if (g.gated) return with_epilogue(g, gated_ops(g));
    if (g.a_row_index != nullptr) return with_epilogue(g, gather_ops(g));
    return with_epilogue(g, sm90::ops_for(g.dtype, choose_tile(g)));
}

}  // namespace

DeviceFacts device_facts() {
    static std::array<std::atomic<int>, 64> cached_sm{};
    static std::array<std::atomic<int>, 64> cached_cc{};
    int device = 0;
    SWITCHYARD_GG_CUDA_CHECK(cudaGetDevice(&device));
    if (device >= 0 && device < 64) {
        const int sm = cached_sm[device].load(std::memory_order_acquire);
        if (sm > 0) return {sm, cached_cc[device].load(std::memory_order_acquire)};
    }
    int sm = 0, major = 0;
    SWITCHYARD_GG_CUDA_CHECK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, device));
    SWITCHYARD_GG_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (device >= 0 && device < 64) {
        cached_cc[device].store(major, std::memory_order_release);
        cached_sm[device].store(sm, std::memory_order_release);
    }
    return {sm, major};
}

void check_gemm_sizes(const char* what, DType dtype, int64_t num_groups, int64_t max_groups, int64_t n, int64_t k,
                      int64_t max_rows) {
    SWITCHYARD_CHECK(dtype == DType::kF32 || is_16bit(dtype), what, ": dtype=", to_string(dtype),
                     " is not supported (fp32, bf16, fp16)");
    SWITCHYARD_CHECK(num_groups >= 1 && num_groups <= max_groups, what, ": num_groups=", num_groups,
                     " must be in [1, ", max_groups, "]");
    SWITCHYARD_CHECK(n >= 1 && n <= INT_MAX, what, ": n=", n, " must be in [1, 2^31)");
    SWITCHYARD_CHECK(k >= 1 && k <= INT_MAX, what, ": k=", k, " must be in [1, 2^31)");
    SWITCHYARD_CHECK(max_rows >= 0 && max_rows <= INT_MAX, what, ": max_rows=", max_rows, " must be in [0, 2^31)");
    if (is_16bit(dtype)) {
        SWITCHYARD_CHECK(k % 8 == 0, what, ": k=", k, " must be a multiple of 8 for ", to_string(dtype),
                         " (16-byte TMA row alignment)");
        SWITCHYARD_CHECK(n % 8 == 0, what, ": n=", n, " must be a multiple of 8 for ", to_string(dtype),
                         " (16-byte TMA row alignment)");
    }
}

DeviceFacts check_16bit_call(const char* what, DType dtype, const void* workspace, size_t workspace_bytes,
                             size_t need) {
    const DeviceFacts facts = device_facts();
    SWITCHYARD_CHECK(facts.cc_major == 9, what, ": the ", to_string(dtype),
                     " path needs an sm_90 GPU (H100/H200); this device has compute capability major ", facts.cc_major);
    SWITCHYARD_CHECK(workspace != nullptr || need == 0, what, ": workspace is null, need ", need, " bytes");
    SWITCHYARD_CHECK(workspace_bytes >= need, what, ": workspace_bytes=", workspace_bytes, " < required ", need);
    SWITCHYARD_CHECK(aligned16(workspace), what, ": workspace must be 16-byte aligned (got ", workspace, ")");
    return facts;
}

bool grouped_gemm_supported(const GroupedGemmArgs& args) {
    try {
        check_sizes(args);
    } catch (const Error&) {
        return false;
    }
    return true;
}

size_t grouped_gemm_workspace_size(const GroupedGemmArgs& args) {
    check_sizes(args);
    if (!is_16bit(args.dtype)) return 0;
    const int sm_count = device_facts().sm_count;
    // The largest over the tile configurations, so a caller may size once and let kAuto choose per call.
    size_t bytes = 0;
    for (auto tile : {sm90::TileConfig::kCooperative128x256, sm90::TileConfig::kPingpong64x128,
                      sm90::TileConfig::kPingpong128x128, sm90::TileConfig::kCooperative128x256N2,
                      sm90::TileConfig::kCooperative128x256C1}) {
        bytes = std::max(bytes, sm90::ops_for(args.dtype, tile).workspace_size(args.num_groups, sm_count));
    }
    if (args.dtype == DType::kBF16) {
        for (const sm90::GemmOps* ops :
             {&sm90::kBF16CooperativeC1Epi128, &sm90::kBF16CooperativeC1Reg}) {
            bytes = std::max(bytes, ops->workspace_size(args.num_groups, sm_count));
        }
    }
    if (args.gated) {
        for (const sm90::GemmOps* ops :
             {&sm90::kBF16GatedCooperative, &sm90::kBF16GatedCooperativeC1, &sm90::kBF16GatedPingpong,
              &sm90::kBF16GatedGatherCooperative, &sm90::kBF16GatedGatherCooperativeC1,
              &sm90::kBF16GatedGatherPingpong, &sm90::kBF16GatedKeepCooperative,
              &sm90::kBF16GatedKeepCooperativeC1, &sm90::kBF16GatedKeepPingpong}) {
            bytes = std::max(bytes, ops->workspace_size(args.num_groups, sm_count));
        }
    }
    if (args.a_row_index != nullptr && !args.gated) {
        for (const sm90::GemmOps* ops :
             {&sm90::kBF16GatherCooperative, &sm90::kBF16GatherCooperativeC1, &sm90::kBF16GatherPingpong128}) {
            bytes = std::max(bytes, ops->workspace_size(args.num_groups, sm_count));
        }
    }
    return bytes;
}

const char* grouped_gemm_kernel_name(const GroupedGemmArgs& args) {
    check_sizes(args);
    if (!is_16bit(args.dtype)) return "simt fp32 64x64x16";
    return ops_of(args).name;
}

void grouped_gemm(const GroupedGemmArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    check_sizes(args);
    SWITCHYARD_CHECK(args.offsets != nullptr, "grouped_gemm: offsets is null");
    SWITCHYARD_CHECK(args.b != nullptr, "grouped_gemm: b is null");
    if (args.max_rows > 0) {
        SWITCHYARD_CHECK(args.a != nullptr, "grouped_gemm: a is null with max_rows=", args.max_rows);
        SWITCHYARD_CHECK(args.c != nullptr, "grouped_gemm: c is null with max_rows=", args.max_rows);
    }
    if (args.max_rows == 0) return;  // offsets[E] <= max_rows: no rows, nothing to compute

    if (args.dtype == DType::kF32) {  // check_sizes refused gated fp32
        SimtParams p{static_cast<const float*>(args.a), static_cast<const float*>(args.b), static_cast<float*>(args.c),
                     args.offsets, static_cast<int>(args.num_groups), static_cast<int>(args.n),
                     static_cast<int>(args.k)};
        const int64_t row_tiles = (args.max_rows + simt::kTile - 1) / simt::kTile + args.num_groups;
        const int64_t col_tiles = (args.n + simt::kTile - 1) / simt::kTile;
        SWITCHYARD_CHECK(row_tiles <= INT_MAX && col_tiles <= 65535, "grouped_gemm: fp32 grid too large (row tiles ",
                         row_tiles, ", column tiles ", col_tiles, ")");
        dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
        grouped_gemm_f32_kernel<<<grid, simt::kThreads, 0, stream>>>(p);
        SWITCHYARD_GG_CUDA_CHECK(cudaGetLastError());
        return;
    }

    const DeviceFacts facts =
        check_16bit_call("grouped_gemm", args.dtype, workspace, workspace_bytes, grouped_gemm_workspace_size(args));
    SWITCHYARD_CHECK(aligned16(args.a) && aligned16(args.b) && aligned16(args.c),
                     "grouped_gemm: a, b and c must be 16-byte aligned for TMA (a=", args.a, ", b=", args.b,
                     ", c=", args.c, ")");
    SWITCHYARD_CHECK(aligned16(args.gate_up_out), "grouped_gemm: gate_up_out must be 16-byte aligned (got ",
                     args.gate_up_out, ")");
    SWITCHYARD_CHECK(args.gate_up_out == nullptr || args.c != args.gate_up_out,
                     "grouped_gemm: gate_up_out and c must not alias");
    GroupedGemmArgs a = args;
    a.raster = resolve_raster(args.raster);
    const sm90::GemmOps& ops = ops_of(args);
    ops.run(a, workspace, workspace_bytes, facts.sm_count, stream);
}

}  // namespace cuda
}  // namespace switchyard
