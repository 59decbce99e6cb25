// src/cuda/moe_stages.h: the stages of the CUDA forward as separate host-callable launchers (host-only header).
//
// Every function takes raw device pointers and a stream, allocates nothing, never synchronises with the host
// and checks each launch. The public stages (switchyard/stages.h) reach them through src/cuda/stages_cuda.cpp.
// Layouts (row-major, contiguous): logits [T, E] fp32; topk_ids [T, k] int32; topk_weights [T, k] fp32;
// plan arrays as switchyard::RoutingPlan; activations [rows, width] of the layer dtype.
#pragma once

#include <cstddef>
#include <cstdint>

#include "switchyard/config.h"
#include "switchyard/moe_layer.h"
#include "switchyard/routing.h"
#include "util/workspace.h"

namespace switchyard {
namespace cuda {

// ---- router (router.cu) ---------------------------------------------------------------------------------
// Bytes of cuBLAS workspace reserved for the gate GEMM (set with cublasSetWorkspace: graph capture safe).
constexpr size_t kCublasWorkspaceBytes = size_t(4) << 20;

// logits [T, E] fp32 = x [T, H] . gate [E, H]^T with cuBLAS (fp32 accumulation, no TF32 for fp32 inputs).
// x and gate share `dtype`. cublas_workspace: kCublasWorkspaceBytes bytes of device memory.
void router_gemm(DType dtype, const void* x, const void* gate, int64_t num_tokens, int64_t hidden,
                 int64_t num_experts, float* logits, void* cublas_workspace, cudaStream_t stream);

// The gate GEMM's gradients (router_backward.cu): dx [T, H] = d_logits . gate, dgate [E, H] = d_logits^T . x, each an
// fp32 sum of the exact products rounded once to `dtype` (x's and gate's); dx or dgate null: not computed. workspace:
// router_gemm_backward_workspace_size bytes.
size_t router_gemm_backward_workspace_size(DType dtype, int64_t num_tokens, int64_t num_experts, int64_t hidden);
void router_gemm_backward(DType dtype, const void* x, const void* gate, const float* d_logits, int64_t num_tokens,
                          int64_t hidden, int64_t num_experts, void* dx, void* dgate, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream);

// Number of per-block partial rows the router kernel writes for the statistics (a function of T only).
int router_stat_blocks(int64_t num_tokens);

// Scores, selection-only bias, group-limited top-k, top-k, weights (routing.h), one warp per token.
// bias: [E] fp32 or null. When prob_partials is not null, also writes per-block partial sums of the router
// probabilities prob_partials [router_stat_blocks(T), E] fp64 and of logsumexp^2 z_partials [blocks] fp64.
void route_topk(const MoEConfig& cfg, const float* logits, const float* bias, int64_t num_tokens,
                int32_t* topk_ids, float* topk_weights, double* prob_partials, double* z_partials,
                cudaStream_t stream);

// Sums the partials over blocks in a fixed order: prob_sum [E] fp64, z_sum [1] fp64 (deterministic).
void reduce_router_stats(const double* prob_partials, const double* z_partials, int blocks, int64_t num_experts,
                         double* prob_sum, double* z_sum, cudaStream_t stream);

// ---- routing plan (plan.cu) -------------------------------------------------------------------------------
struct PlanArgs {
    int64_t num_tokens = 0;
    int64_t top_k = 0;
    int64_t num_experts = 0;
    int64_t capacity = 0;  // 0 = dropless
    DropPolicy drop_policy = DropPolicy::kPosition;
    const int32_t* topk_ids = nullptr;      // [T*k]
    const float* topk_weights = nullptr;    // [T*k] (read only for DropPolicy::kProbability)
    int32_t* expert_counts = nullptr;       // [E]   out: pairs per expert before drops
    int32_t* expert_offsets = nullptr;      // [E+1] out: exclusive scan of kept counts
    int32_t* slot_row = nullptr;            // [T*k] out: row of pair (t, j) or -1
    int32_t* row_token = nullptr;           // [T*k] out: -1 past offsets[E]
    int32_t* row_slot = nullptr;            // [T*k] out: -1 past offsets[E]
};
size_t plan_workspace_size(int64_t num_tokens, int64_t top_k, int64_t num_experts);
void build_plan(const PlanArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// expert_counts [E] int32 of topk_ids [n] (zeroes the counts first).
void count_experts(const int32_t* topk_ids, int64_t n, int64_t num_experts, int32_t* expert_counts,
                   cudaStream_t stream);

// ---- dispatch, activation, combine (permute.cu, activation.cu, combine.cu) ----------------------------------
// xp[r, :] = x[row_token[r], :] for r < max_rows with row_token[r] >= 0; other rows are left untouched, or written
// as 0 with zero_unowned.
void permute_rows(DType dtype, const void* x, const int32_t* row_token, int64_t max_rows, int64_t hidden,
                  void* xp, cudaStream_t stream, bool zero_unowned = false);
// The same xp (zero_unowned) written by token: x[t, :] read once and stored to the rows slot_row[t, j] >= 0
// (j < top_k); rows with row_token[r] < 0 written as 0. slot_row and row_token must be one plan's (every row with
// row_token[r] >= 0 pointed at by exactly one pair of its token): trusted here, checked by the CPU backend, except
// that a slot_row entry >= max_rows is skipped (never written out of range).
void scatter_token_rows(DType dtype, const void* x, const int32_t* slot_row, int64_t num_tokens, int64_t top_k,
                        const int32_t* row_token, int64_t max_rows, int64_t hidden, void* xp, cudaStream_t stream);

// out [rows, F] = act(in[:, :F]) * in[:, F:2F] (gated, in [rows, 2F]) or act(in) (in [rows, F]); computed in
// fp32, rounded once to dtype. Rows r >= *num_rows (when num_rows is not null) or r >= max_rows are skipped.
// Rows of bytes [groups, n, row_bytes] from src to dst with w13's row r of each group at row 16 (f / 8) + 8 h + f % 8,
// h = r / (n / 2), f = r % (n / 2) (stages.h, interleave_gate_up), or the inverse. n % 16 == 0; src != dst.
void interleave_gate_up_rows(const void* src, void* dst, int64_t groups, int64_t n, int64_t row_bytes, bool inverse,
                             cudaStream_t stream);
// interleaved: gate and up columns as w13's rows after interleave_gate_up (gated activations, F % 8 == 0).
void activation_rows(Activation act, DType dtype, const void* in, int64_t max_rows, const int32_t* num_rows,
                     int64_t ffn, void* out, cudaStream_t stream, bool interleaved = false);

// y[t] = dtype( (sum_{j=0..k-1, 0 <= slot_row[t,j] < num_rows} w[t,j] * expert_out[slot_row[t,j]]) + s_t * shared[t] ),
// fp32 (num_rows: expert_out's rows; a slot_row entry outside them counts as dropped, never read out of range).
// shared [T, H] of dtype or null; shared_gate [T] fp32 gate logits or null (s_t = sigmoid(shared_gate[t]), else 1).
// One block per token, no atomics: bitwise reproducible.
void combine_rows(DType dtype, const void* expert_out, const int32_t* slot_row, const float* topk_weights,
                  const void* shared, int64_t num_tokens, int64_t top_k, int64_t num_rows, int64_t hidden,
                  void* y, cudaStream_t stream, const float* shared_gate = nullptr);

// Writes offsets = {0, n} (device int32 [2]), the one-group offsets of the shared expert GEMMs.
void write_single_group_offsets(int32_t* offsets, int64_t n, cudaStream_t stream);

// ---- FP8 activations and scales (fp8/quantize.cu; issue 13, the recipe of switchyard/stages.h) ----------------------
// Quantises a [max_rows, k] (dtype fp32/bf16/fp16) rows r < offsets[E] for the FP8 grouped GEMM (grouped_gemm.h's
// Fp8GroupedGemmArgs): q [max_rows, k] e4m3 and sfa in the GEMM's layout (group e's scales at sfa + offsets[e] * Kb
// as [Kb][M_e], Kb = ceil(k / 128)). per_row false (fp8-block): each row's groups of 128 channels (the last one
// partial) get scale amax / 448; per_row true (fp8-tensor): the whole row gets one scale, written to all Kb slots;
// static_scale [E] (per_row only, may be null): the scale of every row of group e. q = e4m3(x / scale) with IEEE
// fp32 divisions and round-to-nearest-even saturating conversion (cvt.rn.satfinite: what float_to_fp8_e4m3 does on
// the host); a zero scale gives q = 0. Rows at and past offsets[E] are not written. k must be a multiple of 16.
void quantize_rows_fp8(DType dtype, const void* a, int64_t max_rows, int64_t k, const int32_t* offsets,
                       int64_t num_groups, bool per_row, const float* static_scale, void* q, float* sfa,
                       cudaStream_t stream);

// The weight scales in the GEMM's SFB layout [E][Kb][Nb]: from a checkpoint's block scales b_scale [E, Nb, Kb]
// (per_tensor false) or from one scale per expert b_scale [E] (per_tensor true: every block of expert e gets it).
void fp8_weight_scales_mn_major(const float* b_scale, bool per_tensor, int64_t num_groups, int64_t n_blocks,
                                int64_t k_blocks, float* sfb, cudaStream_t stream);

// The index of the first e4m3 NaN code (0x7f / 0xff) in codes [n] on the current device, or -1. Synchronous (a
// one-off check of MoELayer's constructor): allocates 8 bytes of device memory and waits for the scan.
int64_t fp8_first_nan_code(const void* codes, int64_t n);


// ---- the small-batch (decode) path (decode/decode_route.cu, decode/decode_experts.cu) ----------------------------
// For T <= kDecodeMaxTokens tokens of a bf16/fp16 layer: the router GEMM, scoring, top-k and the dropless plan in
// two kernels, and the expert MLPs with the combine in two more, each streaming its weights once over the whole
// card (tensor-core GEMVs, skinny_mma.cuh), launched with programmatic dependent launch; no host synchronisation.
constexpr int64_t kDecodeMaxTokens = 64;
constexpr int64_t kDecodeMaxExperts = 512;

// Split-K factor of the router GEMV for T tokens, `rows` gate rows (E, + 1 with a gated shared expert) and hidden
// size H (a function of the shape only), and the bytes of fp32 partial logits it writes.
int decode_router_splits(int64_t num_tokens, int64_t rows, int64_t hidden);
size_t decode_route_workspace_size(int64_t num_tokens, int64_t rows, int64_t hidden);

struct DecodeRouteArgs {
    DType dtype = DType::kBF16;
    const void* x = nullptr;            // [T, H]
    const void* gate = nullptr;         // [E, H]
    const void* shared_gate = nullptr;  // [1, H] or null: its logit goes to shared_gate_logits
    const float* bias = nullptr;        // [E] or null
    int64_t num_tokens = 0;
    int64_t hidden = 0;
    float* logits = nullptr;              // [T, E] out
    float* shared_gate_logits = nullptr;  // [T] out (with shared_gate)
    int32_t* topk_ids = nullptr;          // [T, k] out
    float* topk_weights = nullptr;        // [T, k] out
    int32_t* expert_counts = nullptr;     // [E] out
    int32_t* expert_offsets = nullptr;    // [E + 1] out
    int32_t* slot_row = nullptr;          // [T, k] out
    int32_t* row_token = nullptr;         // [T k] out
    int32_t* row_slot = nullptr;          // [T k] out
};
// Token choice without capacity (cfg.capacity_factor == 0 for this call): the same ids, weights and plan as
// router_gemm + route_topk + build_plan on the same logits; the logits themselves come from another summation order
// than cuBLAS's (fp32, within rounding).
void decode_route(const MoEConfig& cfg, const DecodeRouteArgs& args, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream);

// Scratch of the FP8 decode path: the one-group offsets {0, T}, x / h / shared_h in e4m3 and their scales
// (quantize_rows_fp8's layouts).
struct DecodeFp8Scratch {
    int32_t* one_group = nullptr;
    void* xq = nullptr;
    float* xs = nullptr;
    void* hq = nullptr;
    float* hs = nullptr;
    void* sq = nullptr;
    float* ss = nullptr;
};
DecodeFp8Scratch carve_decode_fp8(WorkspaceCarver& wc, int64_t num_tokens, int64_t hidden, int64_t ffn,
                                  int64_t max_rows, int64_t shared_ffn);

struct DecodeExpertsArgs {
    DType dtype = DType::kBF16;
    QuantMode quant_mode = QuantMode::kNone;  // FP8: w13 / w2 (and the shared expert's) e4m3 with their scales
    Activation activation = Activation::kSwiGLU;
    int64_t num_tokens = 0;
    int64_t num_experts = 0;
    int64_t hidden = 0;
    int64_t ffn = 0;
    int64_t shared_ffn = 0;              // S = the shared expert's width (with shared_w13)
    int64_t max_rows = 0;                // R: rows the plan reserves (T k, or E C under expert choice)
    const void* x = nullptr;             // [T, H]
    const void* w13 = nullptr;           // [E, R13, H]
    bool gate_up_interleaved = false;    // w13's gate/up rows interleaved (MoEConfig::gate_up_interleaved)
    const void* w2 = nullptr;            // [E, H, F]
    const int32_t* expert_offsets = nullptr;  // [E + 1]
    const int32_t* row_token = nullptr;       // [R]
    const int32_t* row_slot = nullptr;        // [R]
    const float* topk_weights = nullptr;      // [T, slots]
    const void* shared_w13 = nullptr;    // [R13s, H] or null
    const void* shared_w2 = nullptr;     // [H, S]
    const float* shared_gate = nullptr;  // [T] fp32 gate logits or null
    void* h = nullptr;                   // [R, F] scratch
    void* shared_h = nullptr;            // [T, S] scratch
    void* y = nullptr;                   // [T, H] out
    // FP8 (W8A8, dynamic activation scales): the weight scales as MoEWeights holds them, and the scratch.
    const float* w13_scale = nullptr;
    const float* w2_scale = nullptr;
    const float* shared_w13_scale = nullptr;
    const float* shared_w2_scale = nullptr;
    DecodeFp8Scratch fp8;
};
// y = combine(w2-GEMM(act(w13-GEMM(gather(x))))) + the shared expert, for any plan (capacity, expert choice).
// FP8 layers add three quantisation launches (x, h, shared h: quantize_rows_fp8) between the two kernels' inputs.
void decode_experts(const DecodeExpertsArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace switchyard
