// src/cuda/gemm/grouped_gemm.h: grouped GEMM over experts with device-side group sizes (host-only header).
//
// For every expert e with rows [offsets[e], offsets[e+1]) of A:
//   C[r, n] = sum_k A[r, k] * B[e, n, k]      r in the expert's rows, n < N, k < K
// A: [total_rows, K] row-major (dtype), B: [E, N, K] row-major (nn.Linear layout, dtype),
// C: [total_rows, N] row-major (dtype). fp32 accumulation. offsets: device int32 [E+1].
// No host synchronisation: problem sizes and pointer arrays are built on the device from offsets.
// max_rows bounds offsets[E] (T*k); it sizes the workspace and the launch.
// Implementation: bf16/fp16 run a CUTLASS sm90 ptr-array grouped GEMM (grouped_gemm_sm90*.cu), fp32 a tiled SIMT
// kernel (grouped_gemm.cu). Each output element is computed by one thread block over the whole K: results are
// bitwise reproducible run to run. Empty groups are valid.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "switchyard/config.h"
#include "switchyard/dtype.h"

namespace switchyard {
namespace cuda {

// Tile configuration of the 16-bit path. kAuto picks from N, K and the average rows per group (max_rows / E)
// (grouped_gemm.cu, choose_tile, which says what each rule rests on). The overrides exist for tests and benchmarks.
// The cluster matters because CUTLASS's group scheduler rounds each group's M tiles up to a multiple of the
// cluster's M extent, and a rounded-up tile runs the whole mainloop on zeros: with the 2x1 cluster an expert of
// 129-256 rows costs 2 tiles but one of 257-384 rows costs 4.
enum class GroupedGemmTile : int {
    kAuto = 0,
    kLarge = 1,  // Cooperative 128x256x64, cluster 2x1x1 (the weight tile multicast to two M tiles)
    kSmall = 2,  // Pingpong 64x128x128, cluster 1x1x1
    kMedium = 3,  // Pingpong 128x128x64, cluster 1x1x1 (bf16; fp16 has no such instantiation and runs kLarge)
    kLargeClusterN = 4,  // Cooperative 128x256x64, cluster 1x2x1 (the A tile multicast to two N tiles; bf16, else kLarge)
    kLargeNoCluster = 5,  // Cooperative 128x256x64, cluster 1x1x1 (bf16, else kLarge)
};

// The epilogue of the bf16 Cooperative 128x256 kernels that have the choice (the forward and the dgrad without a
// cluster: all three; the wgrad: kTma32 and kRegisters): how the accumulator tile reaches memory. kTma32 (CUTLASS's
// default): staged through shared memory in 128x32 subtiles, each stored by TMA after two named barriers across
// both consumer warpgroups, while the tensor cores wait; kTma128: 128x128 subtiles, a quarter of the barriers, their
// 64 KB of shared memory taken from the mainloop (3 stages instead of 4); kRegisters: 16-byte stores straight from
// registers (register_epilogue.cuh), no shared memory, no barriers. (128x64 subtiles were measured too, run 45:
// never the fastest.)
// kAuto: by the reduction length (forward and dgrad) or the rows per expert (wgrad), measured on an H100
// (grouped_gemm_sm90.h: resolve_epilogue, resolve_dgrad_epilogue, resolve_wgrad_epilogue).
// grouped_gemm_bench --epilogues times every one. Same values in every case.
enum class GroupedGemmEpilogue : int {
    kAuto = 0,
    kTma32 = 1,
    kTma128 = 2,
    kRegisters = 3,
};

// Tile rasterisation of the persistent CUTLASS scheduler: the order in which consecutive CTAs take the output tiles
// of one group. kAlongM walks down M first, so a wave of CTAs covers a few N stripes at full height (B's tiles are
// streamed once, A_e is re-read once per stripe, from L2 when it fits); kAlongN is the transpose. kAuto = kAlongM
// (CUTLASS's grouped default): measured on an H100 (bench/NOTES.md, 2026-11-27) the other order is within a few
// percent on the training GEMMs with the large tile, either way, worse by up to 40% where an expert spans two M
// tiles of a long-K GEMM, and no faster on decode-sized GEMMs (an apparent 10-15% gain there was the benchmark's
// first-timed-configuration effect; whole layers measured the same with either order).
enum class GemmRaster : int {
    kAuto = 0,
    kAlongM = 1,
    kAlongN = 2,
};

struct GroupedGemmArgs {
    const void* a = nullptr;
    const void* b = nullptr;
    void* c = nullptr;
    DType dtype = DType::kBF16;
    int64_t num_groups = 0;  // E
    int64_t n = 0;
    int64_t k = 0;
    int64_t max_rows = 0;
    const int32_t* offsets = nullptr;  // device [E+1]
    GroupedGemmTile tile = GroupedGemmTile::kAuto;  // ignored for fp32
    GemmRaster raster = GemmRaster::kAuto;          // ignored for fp32
    // The gated activation in the epilogue (GEMM1 and the activation in one kernel; bf16 only): b's N = 2F rows hold
    // the gate and up rows interleaved in blocks of 8 (row 16j + i is gate row 8j + i, row 16j + 8 + i up row
    // 8j + i, i < 8; N % 16 == 0), and c is h [max_rows, N / 2]: h[r, f] = act(gate) * up of row r, each of gate and
    // up rounded to bf16 first, the product rounded once: the values grouped_gemm then the activation kernel give
    // with the un-interleaved b. activation: kSwiGLU or kGeGLU. Tiles (grouped_gemm.cu, gated_ops): kAuto picks by
    // the rows per expert; kMedium / kSmall Pingpong 64x256, kLarge Cooperative 128x256 with the 2x1 cluster,
    // kLargeNoCluster (and kLargeClusterN) Cooperative 128x256 without a cluster.
    bool gated = false;
    Activation activation = Activation::kSwiGLU;
    // With gated: also store GEMM1's product g [max_rows, N] (the N = 2F interleaved columns, rounded once: the bits
    // the plain grouped_gemm writes with this b) beside h, for a training forward whose backward needs g (16-byte
    // aligned; rows past offsets[E] untouched). The gated tiles and heuristic; not with a_row_index (not built).
    void* gate_up_out = nullptr;
    // A's rows gathered (bf16): a is x [a_rows, K] and the GEMM's row r reads x[a_row_index[r]] (device int32
    // [max_rows], e.g. the routing plan's row_token), so the gathered copy of x is never written. The result is the
    // one grouped_gemm gives with a = the gathered rows; an index outside [0, a_rows) reads a row of zeros. Rows past
    // offsets[E] are not read. The gated epilogue's tiles and heuristic; the plain GEMM's heuristic tile, except
    // that the Pingpong 64x128x128 tile runs as Pingpong 128x128x64 (grouped_gemm.cu, gather_ops).
    const int32_t* a_row_index = nullptr;
    int64_t a_rows = 0;
    // The epilogue where the kernel is the plain bf16 Cooperative 128x256 one without a cluster (kAuto elsewhere;
    // another choice for another kernel is refused).
    GroupedGemmEpilogue epilogue = GroupedGemmEpilogue::kAuto;
};

// Workspace bytes for grouped_gemm with these sizes (device memory, 256-byte aligned).
size_t grouped_gemm_workspace_size(const GroupedGemmArgs& args);
// True when the dtype/sizes are supported by the CUTLASS path (K and N multiples of 8 for 16-bit types).
bool grouped_gemm_supported(const GroupedGemmArgs& args);
void grouped_gemm(const GroupedGemmArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);
// The kernel grouped_gemm would run for these args (after the kAuto heuristic), for logs and benchmarks.
const char* grouped_gemm_kernel_name(const GroupedGemmArgs& args);
// Writes 0 to rows [offsets[E], max_rows) of a row-major [max_rows, width] tensor of dtype (the rows no expert owns:
// grouped_gemm leaves them untouched; offsets[0] = 0 as every routing plan has it). Reads offsets[E] on the device
// (clamped to [0, max_rows]): no host synchronisation. num_groups = 0 reads offsets[0]: a row count.
void zero_rows_past_groups(void* base, DType dtype, const int32_t* offsets, int64_t num_groups, int64_t width,
                           int64_t max_rows, cudaStream_t stream);

// ---- Gradients of the grouped GEMM (training backward) ----
// With the forward's layouts (A [max_rows, K], B [E, N, K], C [max_rows, N], all row-major) and dC [max_rows, N]
// row-major, for every expert e with rows [offsets[e], offsets[e+1]):
//   dgrad: dA[r, k]    = sum_n dC[r, n] * B[e, n, k]                  dA [max_rows, K]; B read N-major
//   wgrad: dB[e, n, k] = sum_{r in e} dC[r, n] * A[r, k]              dB [E, N, K]; reduction length rows_e
// dgrad writes every row of dA: rows r >= offsets[E] (no expert) are written as 0. wgrad writes all of dB: an
// expert with no rows gets dB[e] = 0. fp32 accumulation, one rounding to dtype; every output element is reduced by
// one thread block in a fixed order (no split-K, no atomics): bitwise reproducible. No host synchronisation, nothing
// allocated: graph-capturable. bf16/fp16: CUTLASS sm90 (Cooperative 128x256x64 with the 2x1 cluster; for bf16 the
// dgrad also without a cluster or with the 1x2 cluster: dgrad_tile; N and K multiples of 8, 16-byte aligned
// pointers); fp32: tiled SIMT kernels (any N, K). Implementation: grouped_gemm_backward.cu,
// grouped_gemm_sm90_backward.cuh.
struct GroupedGemmGradArgs {
    const void* dc = nullptr;  // [max_rows, N]
    const void* a = nullptr;   // [max_rows, K] (wgrad only)
    const void* b = nullptr;   // [E, N, K]     (dgrad only)
    void* da = nullptr;        // [max_rows, K] (dgrad output)
    void* db = nullptr;        // [E, N, K]     (wgrad output)
    DType dtype = DType::kBF16;
    int64_t num_groups = 0;  // E
    int64_t n = 0;
    int64_t k = 0;
    int64_t max_rows = 0;
    const int32_t* offsets = nullptr;  // device [E+1], non-decreasing, offsets[E] <= max_rows
    GemmRaster raster = GemmRaster::kAuto;  // 16-bit only
    // dgrad's tile (its M is the expert's rows, as the forward's): kAuto (by the rows per expert, as the forward:
    // grouped_gemm_backward.cu), kLarge (Cooperative 128x256, cluster 2x1), kLargeClusterN (cluster 1x2, bf16) or
    // kLargeNoCluster (no cluster, bf16); others are refused.
    GroupedGemmTile dgrad_tile = GroupedGemmTile::kAuto;
    // wgrad's epilogue (bf16: kTma32 or kRegisters; fp16 takes kAuto only), and dgrad's where it runs without a
    // cluster (bf16; with a cluster kAuto only).
    GroupedGemmEpilogue wgrad_epilogue = GroupedGemmEpilogue::kAuto;
    GroupedGemmEpilogue dgrad_epilogue = GroupedGemmEpilogue::kAuto;
};

// Workspace bytes for grouped_gemm_dgrad and grouped_gemm_wgrad with these sizes (the larger of the two, so one
// workspace serves both calls on one stream).
size_t grouped_gemm_grad_workspace_size(const GroupedGemmGradArgs& args);
// True when the dtype/sizes are supported (N and K multiples of 8 for 16-bit types).
bool grouped_gemm_grad_supported(const GroupedGemmGradArgs& args);
// dA from dC and B (reads dc, b; writes da).
void grouped_gemm_dgrad(const GroupedGemmGradArgs& args, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream);
// dB from dC and A (reads dc, a; writes db).
void grouped_gemm_wgrad(const GroupedGemmGradArgs& args, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream);
// The kernels the two calls run for these args, for logs and benchmarks.
const char* grouped_gemm_dgrad_kernel_name(const GroupedGemmGradArgs& args);
const char* grouped_gemm_wgrad_kernel_name(const GroupedGemmGradArgs& args);

}  // namespace cuda
}  // namespace switchyard

namespace switchyard {
namespace cuda {

// ---- FP8 grouped GEMM with blockwise scales (issue 13; the inference path of quantised experts) ----
// For every group e with rows [offsets[e], offsets[e+1]) of QA, with Kb = ceil(K / 128) and Nb = ceil(N / 128):
//   D[r, n] = sum_kb SFA(r, kb) * SFB(e, n / 128, kb) * sum_{k in block kb} dec(QA[r, k]) * dec(B[e, n, k])
// QA [max_rows, K] e4m3 row-major (activations already quantised: src/cuda/moe_stages.h, quantize_rows_fp8),
// B [E, N, K] e4m3 row-major (nn.Linear layout), D [max_rows, N] row-major of out_dtype (bf16, fp16 or fp32).
// Each block product is accumulated by the FP8 tensor cores in fp32 and promoted (scaled and added to an fp32
// accumulator) every 128 k; one rounding to out_dtype at the end. The scale layouts are CUTLASS's sm90 blockwise
// layouts (M- and N-major):
//   SFA: group e's scales at sfa + offsets[e] * Kb, as [Kb][M_e] (M_e = its rows): SFA(r, kb) at
//        sfa[offsets[e] * Kb + kb * M_e + (r - offsets[e])]. [max_rows * Kb] floats in all.
//   SFB: [E][Kb][Nb]: SFB(e, nb, kb) at sfb[(e * Kb + kb) * Nb + nb] (the checkpoint's [E, Nb, Kb] transposed
//        per expert: fp8_weight_scales_mn_major).
// Partial blocks are exact: TMA fills the k past K and the n past N with zeros. Alignment (16-byte TMA rows): K a
// multiple of 16, N a multiple of 8 (16-bit D) or 4 (fp32 D); base pointers 16-byte aligned. Empty groups are valid;
// rows past offsets[E] are left untouched. No host synchronisation, nothing allocated (graph-capturable). Each output
// tile is computed by one CTA over the whole K: bitwise reproducible. sm_90a only (CUTLASS
// KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise, tile 128x128x128, cluster 1x2x1).
struct Fp8GroupedGemmArgs {
    const void* qa = nullptr;   // [max_rows, K] e4m3
    const float* sfa = nullptr;  // [max_rows * Kb], layout above
    const void* b = nullptr;    // [E, N, K] e4m3
    const float* sfb = nullptr;  // [E * Kb * Nb], layout above
    void* d = nullptr;          // [max_rows, N] of out_dtype
    DType out_dtype = DType::kBF16;
    int64_t num_groups = 0;  // E
    int64_t n = 0;
    int64_t k = 0;
    int64_t max_rows = 0;
    const int32_t* offsets = nullptr;  // device [E+1], non-decreasing from 0, offsets[E] <= max_rows
};

// Throws unless out_dtype is bf16/fp16/fp32, 1 <= num_groups, 1 <= n, k < 2^31, 0 <= max_rows < 2^31, K % 16 == 0
// and N a multiple of 16 bytes of out_dtype. `what` names the caller in the message.
void check_fp8_gemm_sizes(const char* what, DType out_dtype, int64_t num_groups, int64_t n, int64_t k,
                          int64_t max_rows);
// Workspace bytes of grouped_gemm_fp8 (device arrays + CUTLASS's), the largest over the output dtypes (so it does
// not depend on out_dtype). Sizes are not checked here (the call checks them).
size_t grouped_gemm_fp8_workspace_size(int64_t num_groups);
void grouped_gemm_fp8(const Fp8GroupedGemmArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);
// The kernel grouped_gemm_fp8 runs for out_dtype, for logs and benchmarks.
const char* grouped_gemm_fp8_kernel_name(DType out_dtype);

}  // namespace cuda
}  // namespace switchyard
