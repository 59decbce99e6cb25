// src/cuda/gemm/sm90/grouped_gemm_sm90.h: internal interface between the grouped GEMM dispatcher (grouped_gemm.cu) and the
// CUTLASS sm90 ptr-array instantiations (grouped_gemm_sm90*.cu). Host-only header: no CUTLASS types here, so the
// dispatcher compiles quickly and each CUTLASS instantiation lives in its own translation unit (they compile in
// parallel; each takes 60-90 s and ~3.4 GB).
//
// Every instantiation implements the contract of grouped_gemm.h for one (dtype, tile config):
//   workspace layout (all inside the caller's workspace, 256-byte aligned pieces):
//     [problem shapes int32 [E][3]] [ptr A [E]] [ptr B [E]] [ptr C [E]] [stride A [E]] [stride B [E]] [stride C [E]]
//     [CUTLASS workspace (tile scheduler + per-SM tensor maps)]
//   A small kernel fills the arrays from the device offsets (no host synchronisation), then the persistent CUTLASS
//   kernel runs with host problem shapes null. Nothing is allocated; the SM count comes from the caller (cached).
#pragma once

#include <cstddef>
#include <cstdint>
#include <sstream>

#include <cuda_runtime.h>

#include "cuda/gemm/grouped_gemm.h"
#include "switchyard/error.h"
#include "util/workspace.h"

// Throws switchyard::Error naming the failing runtime call (local to the grouped GEMM files).
#define SWITCHYARD_GG_CUDA_CHECK(expr)                                                      \
    do {                                                                                    \
        cudaError_t sy_gg_err_ = (expr);                                                    \
        if (sy_gg_err_ != cudaSuccess) {                                                    \
            SWITCHYARD_FAIL("CUDA error in `" #expr "`: ", cudaGetErrorString(sy_gg_err_)); \
        }                                                                                   \
    } while (0)

namespace switchyard {
namespace cuda {
namespace sm90 {

// Tile configurations (the heuristic in grouped_gemm.cu picks one from the average rows per expert).
enum class TileConfig : int {
    kCooperative128x256 = 0,  // KernelPtrArrayTmaWarpSpecializedCooperative, tile 128x256x64, cluster 2x1x1
    kPingpong64x128 = 1,      // KernelPtrArrayTmaWarpSpecializedPingpong, tile 64x128x128, cluster 1x1x1
    kPingpong128x128 = 2,     // KernelPtrArrayTmaWarpSpecializedPingpong, tile 128x128x64, cluster 1x1x1 (bf16)
    kCooperative128x256N2 = 3,  // as kCooperative128x256 with cluster 1x2x1 (bf16)
    kCooperative128x256C1 = 4,  // as kCooperative128x256 with cluster 1x1x1 (bf16)
};

// The entry points of one compiled CUTLASS configuration; Args is GroupedGemmArgs (forward) or GroupedGemmGradArgs
// (grouped_gemm_sm90_backward.h).
template <typename Args>
struct GemmOpsOf {
    const char* name;
    // Bytes of workspace (device arrays + CUTLASS workspace) for num_groups groups on sm_count SMs.
    size_t (*workspace_size)(int64_t num_groups, int sm_count);
    // Runs the grouped GEMM. args validated by the caller; workspace_bytes >= workspace_size(...).
    void (*run)(const Args& args, void* workspace, size_t workspace_bytes, int sm_count, cudaStream_t stream);
};
using GemmOps = GemmOpsOf<GroupedGemmArgs>;

// One per translation unit.
extern const GemmOps kBF16Cooperative;  // grouped_gemm_sm90.cu
extern const GemmOps kBF16Pingpong;     // grouped_gemm_sm90_bf16_pingpong.cu
extern const GemmOps kBF16Pingpong128;  // grouped_gemm_sm90_bf16_pingpong128.cu
extern const GemmOps kBF16CooperativeN2;  // grouped_gemm_sm90_bf16_coop_n2.cu
extern const GemmOps kBF16CooperativeC1;  // grouped_gemm_sm90_bf16_coop_c1.cu
// kBF16CooperativeC1 with the other epilogues (GroupedGemmEpilogue): grouped_gemm_sm90_bf16_coop_c1_{e128,reg}.cu
extern const GemmOps kBF16CooperativeC1Epi128;
extern const GemmOps kBF16CooperativeC1Reg;
extern const GemmOps kBF16GatedCooperative;    // grouped_gemm_sm90_bf16_gated.cu (the gated epilogue, cluster 2x1)
extern const GemmOps kBF16GatedCooperativeC1;  // grouped_gemm_sm90_bf16_gated_c1.cu (the gated epilogue, no cluster)
extern const GemmOps kBF16GatedPingpong;  // grouped_gemm_sm90_bf16_gated_pp.cu (the gated epilogue, Pingpong 64x256)
// The three gated kernels storing GEMM1's product g too (GroupedGemmArgs::gate_up_out; the training forward):
// grouped_gemm_sm90_bf16_gated_keep{,_c1,_pp}.cu
extern const GemmOps kBF16GatedKeepCooperative;
extern const GemmOps kBF16GatedKeepCooperativeC1;
extern const GemmOps kBF16GatedKeepPingpong;
// With A's rows gathered (GroupedGemmArgs::a_row_index; gather_mainloop.cuh): the plain forward's tiles whose k
// tile is 64 wide, and the three gated ones.
extern const GemmOps kBF16GatherCooperative;    // grouped_gemm_sm90_bf16_gather_coop.cu
extern const GemmOps kBF16GatherCooperativeC1;  // grouped_gemm_sm90_bf16_gather_coop_c1.cu
extern const GemmOps kBF16GatherPingpong128;    // grouped_gemm_sm90_bf16_gather_pingpong128.cu
extern const GemmOps kBF16GatedGatherCooperative;    // grouped_gemm_sm90_bf16_gated_gather.cu
extern const GemmOps kBF16GatedGatherCooperativeC1;  // grouped_gemm_sm90_bf16_gated_gather_c1.cu
extern const GemmOps kBF16GatedGatherPingpong;       // grouped_gemm_sm90_bf16_gated_gather_pp.cu
extern const GemmOps kF16Cooperative;   // grouped_gemm_sm90_f16.cu
extern const GemmOps kF16Pingpong;      // grouped_gemm_sm90_f16_pingpong.cu

inline const GemmOps& ops_for(DType dtype, TileConfig tile) {
    if (dtype == DType::kBF16) {
        switch (tile) {
            case TileConfig::kPingpong64x128: return kBF16Pingpong;
            case TileConfig::kPingpong128x128: return kBF16Pingpong128;
            case TileConfig::kCooperative128x256N2: return kBF16CooperativeN2;
            case TileConfig::kCooperative128x256C1: return kBF16CooperativeC1;
            default: return kBF16Cooperative;
        }
    }
    return tile == TileConfig::kPingpong64x128 ? kF16Pingpong : kF16Cooperative;  // fp16: two configurations
}

}  // namespace sm90

// ---- host helpers shared by the two dispatchers (grouped_gemm.cu, grouped_gemm_backward.cu) ------------------

struct DeviceFacts {
    int sm_count;
    int cc_major;
};

// The current device's SM count and compute capability, read once per device (graph capture and the hot path then
// only launch). Defined in grouped_gemm.cu.
DeviceFacts device_facts();

inline bool is_16bit(DType t) { return t == DType::kBF16 || t == DType::kF16; }
inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Throws unless dtype is fp32/bf16/fp16, 1 <= num_groups <= max_groups, 1 <= n, k < 2^31, 0 <= max_rows < 2^31,
// and (16-bit types) n and k are multiples of 8 (16-byte TMA rows). `what` names the caller in the message.
void check_gemm_sizes(const char* what, DType dtype, int64_t num_groups, int64_t max_groups, int64_t n, int64_t k,
                      int64_t max_rows);

// The forward's Cooperative 128x256 tile runs without a cluster up to this many rows per expert on average, with
// the 2x1 cluster above (grouped_gemm.cu, choose_tile). CUTLASS's group scheduler rounds a group's M tiles up to the
// cluster's M extent and runs the rounded-up tiles on zeros, so the 2x1 cluster costs up to one 128-row tile of MMA
// per expert; where experts are large that is little, and the weight multicast pays for it.
constexpr int64_t kNoClusterMaxRows = 1024;

// GroupedGemmEpilogue::kAuto resolved (grouped_gemm.h), measured on an H100 (bench/NOTES.md, "Session 13", run 45,
// every epilogue alternated on the DESIGN.md shapes):
// - the forward on the Cooperative tile without a cluster: reduction length k (the GEMM's K) up to
//   kRegisterEpilogueMaxK the register store (Qwen3's GEMMs, K = 768-2048: 4-13% faster than CUTLASS's 128x32
//   subtiles; the tiles' mainloops are short, so the epilogue's barriers are a large share), longer the 128x128
//   subtiles (DeepSeek-V3 and Mixtral, K = 4096-14336: 0-4% faster, never slower);
// - the wgrad (its reduction is the expert's rows): the register store from kRegisterEpilogueMinWgradRows to
//   kNoClusterMaxRows rows per expert on average (Qwen3 8-18%, DeepSeek-V3 at 512 rows 5-10%, Mixtral at 1024 rows
//   2-5% faster), CUTLASS's subtiles otherwise (at 128 rows per expert DeepSeek-V3's wgrads write 7.5-15 GB of
//   dB at ~2 TB/s and the register store was 7-10% slower; at 4096 rows, Mixtral, they tie).
constexpr int64_t kRegisterEpilogueMaxK = 2048;
constexpr int64_t kRegisterEpilogueMinWgradRows = 256;
inline GroupedGemmEpilogue resolve_epilogue(GroupedGemmEpilogue e, int64_t k) {
    if (e != GroupedGemmEpilogue::kAuto) return e;
    return k <= kRegisterEpilogueMaxK ? GroupedGemmEpilogue::kRegisters : GroupedGemmEpilogue::kTma128;
}
// - the dgrad without a cluster (its reduction is the forward's N): the forward's rule by its reduction length
//   (run 48, alternated: Qwen3's four dgrads, reduction 1536-2048, 6-8% faster with the register store than with
//   CUTLASS's 128x32 subtiles; the long ones of DeepSeek-V3 and Mixtral, 4096-28672, 0-9% faster with the 128x128
//   subtiles and never slower: bench/NOTES.md, "Session 16").
inline GroupedGemmEpilogue resolve_dgrad_epilogue(GroupedGemmEpilogue e, int64_t reduction) {
    return resolve_epilogue(e, reduction);
}
inline GroupedGemmEpilogue resolve_wgrad_epilogue(GroupedGemmEpilogue e, int64_t avg_rows) {
    if (e != GroupedGemmEpilogue::kAuto) return e;
    return avg_rows >= kRegisterEpilogueMinWgradRows && avg_rows <= kNoClusterMaxRows
               ? GroupedGemmEpilogue::kRegisters
               : GroupedGemmEpilogue::kTma32;
}

// GemmRaster::kAuto resolved (grouped_gemm.h says why it is kAlongM).
inline GemmRaster resolve_raster(GemmRaster r) { return r == GemmRaster::kAuto ? GemmRaster::kAlongM : r; }

// For a 16-bit call: throws unless the device is sm_90 and the workspace holds `need` bytes, 16-byte aligned.
// Returns the device facts.
DeviceFacts check_16bit_call(const char* what, DType dtype, const void* workspace, size_t workspace_bytes,
                             size_t need);
}  // namespace cuda
}  // namespace switchyard
