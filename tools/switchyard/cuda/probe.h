// tools/switchyard/cuda/probe.h: measurement helpers for `switchyard profile` (host-only header; implementation probe.cu).
//
// Not part of the hot path: the ceiling probes allocate and synchronise. Everything else takes raw device
// pointers and a stream, allocates nothing and never synchronises, like the backend's stage launchers.
//   probe_bf16_gemm      cuBLAS bf16 GEMM n x n x n (fp32 accumulation), median ms of `reps` runs between CUDA
//                        events after 3 warm-up runs; TFLOP/s = 2 n^3 / time. The matrix ceiling of the floors.
//   probe_fp8_gemm       cuBLASLt FP8 GEMM n x n x n: e4m3 A and B (random, quantised per tensor), fp32 scale
//                        pointers (1.0) for A and B, fp32 accumulation, bf16 D; the TN layout cuBLASLt requires for
//                        FP8; fast_accum sets CUBLASLT_MATMUL_DESC_FAST_ACCUM (torch._scaled_mm's use_fast_accum).
//                        Median ms as probe_bf16_gemm. The FP8 matrix ceiling of `bench --quant`'s floors.
//   probe_copy           device-to-device cudaMemcpyAsync of `bytes`, median ms; GB/s counts bytes read + written
//                        (2 * bytes / time). The bandwidth ceiling of the floors.
//   seed router          the seed study's router as separate passes, as its PyTorch code runs them:
//                        logits [T, E] fp32 = x . gate^T (switchyard::router_gemm), probs [T, E] fp32 = softmax over
//                        E (one pass, always softmax: the seed's router), top-k of probs (ties: lower index;
//                        weights = probs of the chosen), positions of each pair inside its expert (switchyard::
//                        build_plan, dropless: GShard's cumsum over the one-hot mask, token order), then
//                        dispatch [T, E, C] and combine [T, E, C] of the layer dtype zero-filled and scattered
//                        (1 and the weight at (t, e, c)). C is the caller's (the dense baseline's dropless C is
//                        the largest expert count: run once with C = 0 to count, read the counts, then time).
//   sparse router        Switchyard's router + routing plan through the public stages (stages.h): router_gemm +
//                        route + build_plan, no [T, E, C] tensor at all.
// Workspace layouts: seed_router_layout / sparse_router_layout in probe.cu, 256-byte aligned slices in a fixed
// order; the *_workspace_size functions count them, and the *_bytes structs give the parts for reports.
#pragma once

#include <cstddef>
#include <cstdint>

#include "switchyard/config.h"
#include "switchyard/tensor.h"

namespace switchyard {
namespace cuda {

// ---- ceilings --------------------------------------------------------------------------------------------
struct ProbeResult {
    double ms = 0;    // median time of one run
    double rate = 0;  // TFLOP/s (GEMM) or GB/s (copy)
};
ProbeResult probe_bf16_gemm(int64_t n, int reps);
ProbeResult probe_fp8_gemm(int64_t n, int reps, bool fast_accum);
ProbeResult probe_copy(size_t bytes, int reps);

// ---- the seed's router and Switchyard's router + plan ----------------------------------------------------
struct RouterBytes {
    size_t logits = 0;    // [T, E] fp32
    size_t probs = 0;     // [T, E] fp32 (seed only)
    size_t topk = 0;      // ids + weights [T, k]
    size_t plan = 0;      // counts, offsets, slot_row, row_token, row_slot and the plan's scratch
    size_t onehot = 0;    // dispatch + combine [T, E, C] (seed only)
    size_t cublas = 0;    // cuBLAS workspace of the gate GEMM
    size_t total = 0;     // the whole workspace (sum of the 256-byte aligned slices)
};
RouterBytes seed_router_bytes(const MoEConfig& cfg, int64_t num_tokens, int64_t capacity);
RouterBytes sparse_router_bytes(const MoEConfig& cfg, int64_t num_tokens);

// x [T, H], gate [E, H] of cfg.dtype on the current device. capacity C >= 0 (0: counts and positions only, no
// one-hot tensors). expert_counts (optional, device int32 [E] out): a pointer into the workspace holding the
// per-expert pair counts after the call.
void seed_router_forward(const MoEConfig& cfg, const void* x, const void* gate, int64_t num_tokens, int64_t capacity,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream,
                         const int32_t** expert_counts = nullptr);
// bias: [E] fp32 or null (used when cfg.use_score_bias).
void sparse_router_forward(const MoEConfig& cfg, const void* x, const void* gate, const float* bias,
                           int64_t num_tokens, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace switchyard
