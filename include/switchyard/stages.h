// switchyard/stages.h: the stages of an MoE layer as public, framework-free functions.
//
// Every frontend is built on these functions: MoELayer::forward (moe_layer.h) strings them together, the PyTorch
// ops (bindings/torch) are one stage each with its backward, and the CLI times them one by one. Each function
// validates its arguments once (shapes, dtypes, devices, contiguity; a switchyard::Error names the bad argument),
// then runs on the device its tensors live on: the CPU backend (src/ref, the executable specification: products and
// sums in double, every stored value rounded once to its tensor's dtype) or the CUDA backend (src/cuda: fp32
// accumulation, no allocation, no host synchronisation, everything enqueued on `stream`, so a chain of stages can
// be captured in a CUDA graph). All tensors of one call must be on one device; `stream` is ignored on the CPU.
//
// Shapes (T tokens, H hidden, E experts, k routing slots per token, R = T*k rows in expert order, F expert width,
// R13 = 2F for gated activations, F otherwise). Tensors are contiguous row-major TensorRefs:
//   router_gemm     x [T, H], gate [E, H]                 -> logits [T, E] fp32
//   route           logits [T, E] fp32 (+ bias [E] fp32)   -> topk_ids [T, k] int32, topk_weights [T, k] fp32
//   route_expert_choice  logits                           -> ids / weights / slot_row [T, E] and the plan (E*C rows)
//   build_plan      topk_ids, topk_weights                 -> RoutingPlan (routing.h): counts, offsets, rows
//   gather          x [T, H], row_token [R]                -> xp [R, H] (x's rows in expert order, 0 where row_token<0)
//   grouped_gemm    a [R, K], b [E, N, K], offsets [E+1]   -> c [R, N], per expert c = a_e . b_e^T
//   grouped_gemm_fp8  the same with b fp8 e4m3 + scales and a quantised on the fly (W8A8)
//   activation      g [R, R13]                             -> h [R, F] = act(gate) * up (gated) or act(g)
//   grouped_gemm_gated  a [R, K], w13i [E, 2F, K], offsets -> h [R, F]: grouped_gemm then a gated activation in one
//                   step (w13i: w13 with gate/up rows interleaved, interleave_gate_up)
//   combine         out [R, H], slot_row [T, k], w [T, k] (+ shared [T, H], gate) -> y [T, H]
//   router_losses   (balance.h) logits, topk_ids           -> {aux, z, seq_aux}
//   route_fused / experts_fused  the router + plan, and gather .. combine, each in one step (the decode path)
// Backward (training; selection held fixed, forward roundings treated as identity):
//   route_backward, router_losses_backward, gather_backward, grouped_gemm_dgrad / _wgrad, activation_backward,
//   combine_backward, each the exact derivative of its forward in the arithmetic of its backend;
//   grouped_gemm_dgrad_activation: grouped_gemm_dgrad, activation_backward and the recomputed activation in one step.
//
// Element types: activations, GEMM operands and gradients are fp32, bf16 or fp16 on both backends; the CPU backend
// also takes fp64 (exact double results, what torch.autograd.gradcheck needs). On CUDA every operand of one GEMM
// shares one dtype; on the CPU weights may be of another float dtype than the activations. Routing weights and
// logits are fp32 (fp64 on the CPU too); ids, offsets and row arrays int32.
//
// Workspace: a function that needs scratch memory has a *_workspace_size(...) of its own and takes
// (workspace, workspace_bytes): memory on the tensors' device, 256-byte aligned, that the caller owns. Sizes are 0
// on the CPU unless said otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

#include "switchyard/config.h"
#include "switchyard/moe_layer.h"
#include "switchyard/routing.h"
#include "switchyard/tensor.h"

namespace switchyard {

// ---- router ---------------------------------------------------------------------------------------------------
// logits [T, E] fp32 = x [T, H] . gate [E, H]^T (CPU: double sums rounded once; CUDA: cuBLAS, fp32 accumulation,
// no TF32). x and gate share one dtype on CUDA.
size_t router_gemm_workspace_size(Device device);
void router_gemm(const TensorRef& x, const TensorRef& gate, const TensorRef& logits, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream = nullptr);

// The router GEMM's gradients for d_logits [T, E] fp32: dx [T, H] = d_logits . gate in x's dtype and dgate [E, H] =
// d_logits^T . x in gate's dtype, each element the sum of the exact products rounded once to its dtype (CPU: double
// sums, rounded through fp32 as every CPU stage stores; CUDA: fp32 sums in cuBLAS, for 16-bit operands on the
// tensor cores with d_logits split into three bf16 parts that carry its 24 bits; what autograd takes through
// F.linear(x.float(), gate.float()) up to the summation order). dx or dgate undefined: that gradient is not
// computed. x, gate, dx and dgate share one dtype on CUDA. CUDA workspace: 4 MiB for cuBLAS plus, bf16, the split
// [T, 3E] and the stacked gate [3E, H] in bf16 and dgate's parts [3E, H] in fp32; fp16, x and gate widened to fp32
// and fp32 dx [T, H] and dgate [E, H] (fp16 parts would underflow).
size_t router_gemm_backward_workspace_size(Device device, DType dtype, int64_t num_tokens, int64_t num_experts,
                                           int64_t hidden);
void router_gemm_backward(const TensorRef& x, const TensorRef& gate, const TensorRef& d_logits, const TensorRef& dx,
                          const TensorRef& dgate, void* workspace, size_t workspace_bytes,
                          cudaStream_t stream = nullptr);

// Token-choice scoring, selection and weights (routing.h states the rules: score function, selection-only bias,
// group-limited top-k, ties to the lower expert, NaN last, renormalise, routed scale). score_bias [E] fp32 is
// required when cfg.use_score_bias and must be undefined otherwise. topk_weights fp32 (CPU: fp32 or fp64; fp64
// weights are computed in double from the logits read as double, the selection from the logits rounded to fp32).
void route(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& score_bias, const TensorRef& topk_ids,
           const TensorRef& topk_weights, cudaStream_t stream = nullptr);

// Expert-choice routing (balance.h): every expert takes C = cfg.expert_choice_capacity(T) tokens. Writes
// topk_ids / topk_weights / plan.slot_row [T, E] and the rest of `plan` (E*C rows; plan tensors sized for E*C rows).
size_t route_expert_choice_workspace_size(const MoEConfig& cfg, Device device, int64_t num_tokens);
void route_expert_choice(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                         const TensorRef& topk_weights, const RoutingPlan& plan, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream = nullptr);

// ---- routing plan -----------------------------------------------------------------------------------------------
// From topk_ids [T, k] int32 and topk_weights [T, k] fp32 (read only for DropPolicy::kProbability) fills
// plan.expert_counts [E], expert_offsets [E+1], slot_row [T, k], row_token [T*k] and row_slot [T*k], with
// cfg.capacity(T) and cfg.drop_policy.
size_t plan_workspace_size(const MoEConfig& cfg, Device device, int64_t num_tokens);
void build_plan(const MoEConfig& cfg, const TensorRef& topk_ids, const TensorRef& topk_weights,
                const RoutingPlan& plan, void* workspace, size_t workspace_bytes, cudaStream_t stream = nullptr);

// ---- dispatch ---------------------------------------------------------------------------------------------------
// slot_row [T, k] int32, as every stage below takes it: the row of pair (t, j), or -1 for a dropped pair. An entry
// at or past the rows it indexes is an error: the CPU backend refuses it; the CUDA backend, which cannot read the
// device's values without a synchronisation, skips it as a dropped pair, so that no stage reads or writes outside
// its tensors.
// xp [R, H] = x [T, H] rows in expert order: xp[r] = x[row_token[r]], and 0 where row_token[r] < 0 (rows past the
// plan's offsets[E]). xp has x's dtype. slot_row [T, k] (optional; token choice, k <= 32): the same plan's slot_row.
// With it the CUDA backend reads each row of x once and writes it to its k rows (one pass over x instead of one per
// row; the result is the same); the CPU backend checks that it is the plan's (every row with row_token[r] >= 0 is
// pointed at by exactly one pair (t, j) with t = row_token[r], every pair at such a row) and refuses it otherwise.
void gather(const TensorRef& x, const TensorRef& row_token, const TensorRef& xp, cudaStream_t stream = nullptr,
            const TensorRef& slot_row = TensorRef());
// dx [T, H] = sum over j = 0..k-1 (in order, skipping slot_row < 0) of d_xp[slot_row[t, j]].
void gather_backward(const TensorRef& d_xp, const TensorRef& slot_row, const TensorRef& dx,
                     cudaStream_t stream = nullptr);

// ---- grouped GEMM -----------------------------------------------------------------------------------------------
// For every group e with rows [offsets[e], offsets[e+1]) of a: c[r, n] = sum_kk a[r, kk] * b[e, n, kk].
// a [R, K], b [E, N, K] (nn.Linear layout; [N, K] means E = 1), c [R, N]; offsets [E+1] int32 on the device of
// the operands, non-decreasing from 0 with offsets[E] <= R. Undefined offsets mean one group of all R rows (E = 1).
// Rows at and past offsets[E] are written as 0 when options.zero_unowned_rows (the default), else left untouched
// (the layer's forward never reads them). 16-bit CUDA GEMMs need N and K multiples of 8.
struct GroupedGemmOptions {
    bool zero_unowned_rows = true;
    // A's rows gathered. a is then x [T, K] and row_index int32 [R] (R = c's / h's rows, e.g. the routing plan's
    // row_token): GEMM row r < offsets[E] reads x[row_index[r]], a row of zeros where the index is outside [0, T).
    // The result is bitwise that of gather(x, row_index) into [R, K] then the call without it; on CUDA (bf16 only)
    // the gathered copy is never written (the rows go straight from x into the GEMM's shared memory).
    TensorRef row_index;
    // grouped_gemm_gated only: when defined, g [R, 2F] of h's dtype also receives GEMM1's product, its columns in
    // w13i's interleaved order (the tensor grouped_gemm(a, w13i) writes, which activation(..., gate_up_interleaved)
    // and activation_backward take): a training forward keeps g for the backward without a separate activation pass
    // over it. Rows at and past offsets[E] as h's. CUDA: not with row_index (refused).
    TensorRef gate_up;
};
size_t grouped_gemm_workspace_size(Device device, DType dtype, int64_t num_groups, int64_t n, int64_t k,
                                   int64_t max_rows);
void grouped_gemm(const TensorRef& a, const TensorRef& b, const TensorRef& offsets, const TensorRef& c,
                  void* workspace, size_t workspace_bytes, cudaStream_t stream = nullptr,
                  const GroupedGemmOptions& options = GroupedGemmOptions());
// Gradients, with dc [R, N]: dgrad da [R, K] = dc_e . b_e (rows past offsets[E]: 0); wgrad db [E, N, K] =
// sum over e's rows of dc[r]^T a[r] (an expert without rows: 0). One workspace size serves both.
size_t grouped_gemm_grad_workspace_size(Device device, DType dtype, int64_t num_groups, int64_t n, int64_t k,
                                        int64_t max_rows);
void grouped_gemm_dgrad(const TensorRef& dc, const TensorRef& b, const TensorRef& offsets, const TensorRef& da,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream = nullptr);
void grouped_gemm_wgrad(const TensorRef& dc, const TensorRef& a, const TensorRef& offsets, const TensorRef& db,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream = nullptr);

// ---- FP8 grouped GEMM (quantised experts) --------------------------------------------------------------------------
// A stage of its own rather than more options on grouped_gemm: it takes two more tensors (weight scales, an optional
// static input scale) and a quantisation mode, quantises its input, has no backward, and will be a different kernel
// on CUDA (FP8 tensor cores, blockwise scaling); grouped_gemm keeps its one-dtype contract and its gradients.
//
// The recipe (issue 13; DeepSeek-V3's W8A8 inference recipe for kFP8Block, per-tensor FP8 for kFP8Tensor). Here
// e4m3(v) = float_to_fp8_e4m3(v) (switchyard/dtype.h: nearest even, saturating to +-448), dec(q) its exact decoding,
// G = 128, and r a row of a in group e:
//   weights    w[n, kk] = dec(b[e, n, kk]) * s_w[...]        s_w = b_scale[e, n / G, kk / G]   (kFP8Block)
//                                                            s_w = b_scale[e]                  (kFP8Tensor)
//              (edge blocks partial; b_scale is a checkpoint's weight_scale_inv / weight_scale: it multiplies)
//   activations, dynamic: the fp32 input row a[r] (a's values read exactly) is cut into groups j of G channels
//              (kFP8Block; the last group partial) or taken as one group (kFP8Tensor, per token);
//              s_a[r, j] = amax_j / 448 (fp32 division), q_a[r, kk] = e4m3(a[r, kk] / s_a[r, j]) (fp32 division);
//              an all-zero group has s_a = 0 and q_a = 0.
//              static (kFP8Tensor with input_scale [E] defined): s_a[r] = input_scale[e] for every row of group e.
//   product    c[r, n] = sum_kk (dec(q_a[r, kk]) * s_a[r, kk / G]) * w[n, kk], every factor and product in double
//              (the CPU; fp32 accumulation on a GPU), stored once in c's dtype as grouped_gemm stores.
// Operands: a [R, K] fp32/bf16/fp16, b [E, N, K] (or [N, K]) fp8e4m3, c [R, N] of a's dtype, offsets as grouped_gemm.
// b_scale fp32: [E, ceil(N/128), ceil(K/128)] (or [ceil(N/128), ceil(K/128)]) for kFP8Block, [E] (or [1]) for
// kFP8Tensor. input_scale: fp32 [E] (or [1]), kFP8Tensor only, optional (undefined: dynamic per token).
// CUDA (sm_90 only): the activations are quantised by a kernel of their own (bit for bit the recipe: IEEE fp32
// divisions, round-to-nearest-even saturating e4m3), then a CUTLASS grouped GEMM on the FP8 tensor cores with
// blockwise scales (activation scales per row and 128 k, weight scales per 128 x 128 block; fp8-tensor runs the same
// kernel with its scales broadcast) sums each 128-k block in fp32 and adds it, scaled, to an fp32 accumulator; one
// rounding to c's dtype. K must be a multiple of 16 and N of 16 bytes of c's dtype (TMA rows); partial 128-blocks are
// exact. Workspace (grouped_gemm_fp8_workspace_size): the quantised a [R, K], its scales, the weight scales in the
// kernel's layout and the GEMM's arrays. No host synchronisation. Decode-sized batches run the same kernel.
// The values of scales and codes are not read here beyond the arithmetic; MoELayer checks them once (finite scales,
// positive input scales, no NaN codes).
struct Fp8GemmOptions {
    QuantMode mode = QuantMode::kFP8Block;  // kFP8Block or kFP8Tensor
    bool zero_unowned_rows = true;          // as GroupedGemmOptions
};
size_t grouped_gemm_fp8_workspace_size(Device device, QuantMode mode, int64_t num_groups, int64_t n, int64_t k,
                                       int64_t max_rows);
void grouped_gemm_fp8(const TensorRef& a, const TensorRef& b, const TensorRef& b_scale, const TensorRef& input_scale,
                      const TensorRef& offsets, const TensorRef& c, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream = nullptr, const Fp8GemmOptions& options = Fp8GemmOptions());
// The block size of kFP8Block scales, and the number of blocks that cover n elements.
constexpr int64_t kFp8BlockSize = 128;
inline int64_t fp8_blocks(int64_t n) { return (n + kFp8BlockSize - 1) / kFp8BlockSize; }

// ---- GEMM1 and the gated activation in one step --------------------------------------------------------------
// h [R, F] = the gated activation of grouped_gemm(a, w13) (activation(act, ...) below), computed from w13i, w13's
// rows interleaved in blocks of 8 (interleave_gate_up), without storing the [R, 2F] product: the same values as
// grouped_gemm(a, w13) into an [R, 2F] tensor of h's dtype followed by activation(act). act: kSwiGLU or kGeGLU.
// a [R, K], w13i [E, 2F, K] (or [2F, K]), h [R, F], offsets as grouped_gemm; F % 8 == 0. CPU: any float dtypes (the
// two steps of the specification); CUDA: bf16, sm_90 (the activation in the GEMM's epilogue). Rows at and past
// offsets[E]: 0 when options.zero_unowned_rows, else untouched. options.row_index: a is x [T, K], gathered (above).
// options.gate_up: the [R, 2F] product stored too (above).
size_t grouped_gemm_gated_workspace_size(Device device, DType dtype, int64_t num_groups, int64_t ffn, int64_t k,
                                         int64_t max_rows);
void grouped_gemm_gated(Activation act, const TensorRef& a, const TensorRef& w13i, const TensorRef& offsets,
                        const TensorRef& h, void* workspace, size_t workspace_bytes, cudaStream_t stream = nullptr,
                        const GroupedGemmOptions& options = GroupedGemmOptions());
// The interleaved layout of grouped_gemm_gated: w13i [E, 2F, K] from w13 [E, 2F, K] (gate rows [0, F), up rows
// [F, 2F); [2F, K] means E = 1) with gate row f at row 16 (f / 8) + f % 8 and up row f at row 16 (f / 8) + 8 + f % 8
// (F % 8 == 0); inverse: w13 from w13i. Out of place, same dtype and device (any dtype).
void interleave_gate_up(const TensorRef& w13, const TensorRef& w13i, bool inverse = false,
                        cudaStream_t stream = nullptr);

// ---- activation -------------------------------------------------------------------------------------------------
// h [R, F] = act(g[:, :F]) * g[:, F:] (gated, g [R, 2F]) or act(g) (g [R, F]); g and h share one dtype.
// num_rows: optional int32 [1] on the operands' device (e.g. a view of offsets[E]); rows r >= num_rows[0] are then
// left untouched. gate_up_interleaved: g's gate and up columns in the layout of a GEMM1 with interleaved weights
// (interleave_gate_up: gate f at column 16 (f / 8) + f % 8, up f eight columns further; gated, F % 8 == 0).
void activation(Activation act, const TensorRef& g, const TensorRef& h, const TensorRef& num_rows = TensorRef(),
                cudaStream_t stream = nullptr, bool gate_up_interleaved = false);
// dg [R, R13] from g and dh [R, F] (ReLU's derivative at 0 is 0); dg in g's column layout.
void activation_backward(Activation act, const TensorRef& g, const TensorRef& dh, const TensorRef& dg,
                         cudaStream_t stream = nullptr, bool gate_up_interleaved = false);

// ---- GEMM2's input gradient and the activation's backward in one step ---------------------------------------------
// The backward through h = act(g) and GEMM2 (out = grouped_gemm(h, w2)) up to g, with h recomputed for GEMM2's weight
// gradient (grouped_gemm_wgrad(dc, h, ...)) instead of saved:
//   dg [R, 2F] = activation_backward(act, g, grouped_gemm_dgrad(dc, w2, offsets))   (dh rounded to g's dtype first)
//   h  [R, F]  = activation(act, g)
// the values of those three stages; rows at and past offsets[E] of dg and h are 0. act: kSwiGLU or kGeGLU; g [R, 2F]
// in the plain or (gate_up_interleaved) interleaved column layout, dg in g's. dc [R, H], w2 [E, H, F]; one dtype.
// Workspace: grouped_gemm_grad_workspace_size(device, dtype, E, H, F, R). CPU and CUDA: any float dtype, the three
// stages' kernels in one call (dh kept in h's memory until h is written: no extra memory; a dgrad with the
// activation's backward in its epilogue measured slower than the three kernels on an H100: bench/NOTES.md).
void grouped_gemm_dgrad_activation(Activation act, const TensorRef& dc, const TensorRef& w2, const TensorRef& offsets,
                                   const TensorRef& g, const TensorRef& dg, const TensorRef& h, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream = nullptr,
                                   bool gate_up_interleaved = false);

// ---- combine ----------------------------------------------------------------------------------------------------
// y[t] = dtype( sum over j = 0..k-1 with slot_row[t, j] >= 0 of w[t, j] * out[slot_row[t, j]] (+ s_t * shared[t]) ),
// slots in order, no atomics: bitwise reproducible. out [R, H], slot_row [T, k] int32, weights [T, k] fp32,
// shared [T, H] optional (same dtype as out), y [T, H]. shared_gate [T, 1] fp32 optional (with shared): gate logits,
// s_t = sigmoid(shared_gate[t]) (1 without it).
void combine(const TensorRef& expert_out, const TensorRef& slot_row, const TensorRef& weights,
             const TensorRef& shared, const TensorRef& y, cudaStream_t stream = nullptr,
             const TensorRef& shared_gate = TensorRef());
// d_out [R, H]: d_out[slot_row[t, j]] = w[t, j] * dy[t], rows no pair points at are 0; d_weights [T, k] =
// <dy[t], out[slot_row[t, j]]> (0 for dropped pairs). The shared expert's gradient is dy itself.
// num_rows: optional int32 [1] on the operands' device, for a slot_row whose pairs point at exactly the rows
// [0, num_rows[0]) (a routing plan's, with num_rows = offsets[E], e.g. a view of the offsets): only rows
// [num_rows[0], R) are then zeroed, rather than all of d_out before the pairs' rows are written.
void combine_backward(const TensorRef& dy, const TensorRef& expert_out, const TensorRef& slot_row,
                      const TensorRef& weights, const TensorRef& d_out, const TensorRef& d_weights,
                      cudaStream_t stream = nullptr, const TensorRef& num_rows = TensorRef());

// ---- router backward ----------------------------------------------------------------------------------------------
// d_logits [T, E] (overwritten) = d_weights [T, k] . d w / d logits for the fixed selection topk_ids (uses
// cfg.score_function, renormalize, routed_scale; group limits and the bias only select, so they get no gradient).
void route_backward(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                    const TensorRef& d_weights, const TensorRef& d_logits, cudaStream_t stream = nullptr);
// d_logits [T, E] (overwritten) = d_losses[0] * d aux / d logits + d_losses[1] * d z / d logits (balance.h's aux and
// z losses; d_losses [2] fp32 on the logits' device, read there: no host synchronisation).
size_t router_losses_backward_workspace_size(const MoEConfig& cfg, Device device);
void router_losses_backward(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                            const TensorRef& d_losses, const TensorRef& d_logits, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream = nullptr);

// ---- load statistics ------------------------------------------------------------------------------------------------
// LoadStats (routing.h) of a forward from its logits [T, E] fp32 and its plan (topk_ids [T, slots], expert_counts,
// expert_offsets and, under expert choice, slot_row). Host output: on CUDA this synchronises `stream` (not for
// graph capture). Workspace on CUDA: load_stats_workspace_size.
size_t load_stats_workspace_size(const MoEConfig& cfg, Device device, int64_t num_tokens);
void load_stats(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids, const RoutingPlan& plan,
                LoadStats& stats, void* workspace, size_t workspace_bytes, cudaStream_t stream = nullptr);

// ---- the fused small-batch (decode) path ---------------------------------------------------------------------------
// Two stages that compute what chains of the stages above compute, in fewer launches on CUDA: for T <= 64 tokens of
// a bf16/fp16 layer (fused_path_supported) each is two kernels that stream their weights once over the whole card
// (tensor-core GEMVs, programmatic dependent launch, no host synchronisation, capturable, bitwise reproducible).
// The CPU backend runs the chains themselves (the specification); MoELayer chooses the path (moe_layer.h).
//
// route_fused = router_gemm(x, gate) -> logits, route -> topk_ids / topk_weights, build_plan -> plan, for token
// choice without capacity (cfg.capacity_factor == 0), plus, with shared_gate [1, H] defined, the gate logits of a
// gated shared expert shared_gate_logits [T, 1] fp32 = router_gemm(x, shared_gate). On CUDA the selection and the
// plan are those of route / build_plan on the logits it computes (another fp32 summation order than cuBLAS's).
size_t route_fused_workspace_size(const MoEConfig& cfg, Device device, int64_t num_tokens);
void route_fused(const MoEConfig& cfg, const TensorRef& x, const TensorRef& gate, const TensorRef& score_bias,
                 const TensorRef& shared_gate, const TensorRef& logits, const TensorRef& topk_ids,
                 const TensorRef& topk_weights, const RoutingPlan& plan, const TensorRef& shared_gate_logits,
                 void* workspace, size_t workspace_bytes, cudaStream_t stream = nullptr);
// experts_fused: y = combine(grouped_gemm(activation(grouped_gemm(gather(x, plan.row_token), w13)), w2), plan,
// topk_weights) + the shared expert when w.shared_w13 / w.shared_w2 are defined (scaled by
// sigmoid(shared_gate_logits) when that is defined), for any plan (capacity drops, expert choice). It reads w13, w2,
// shared_w13, shared_w2 of `w` and, for an FP8 layer (cfg.quant_mode), their scales: the expert GEMMs are then
// grouped_gemm_fp8 (W8A8, dynamic activation scales; static input scales are not taken here). Float weights have
// x's dtype; w13 in either layout (cfg.gate_up_interleaved). On CUDA the expert outputs are summed in fp32 before the one rounding of y (the chain rounds each expert
// output first).
size_t experts_fused_workspace_size(const MoEConfig& cfg, Device device, int64_t num_tokens);
void experts_fused(const MoEConfig& cfg, const TensorRef& x, const MoEWeights& w, const RoutingPlan& plan,
                   const TensorRef& topk_weights, const TensorRef& shared_gate_logits, const TensorRef& y,
                   void* workspace, size_t workspace_bytes, cudaStream_t stream = nullptr);
// Whether the CUDA kernels of the fused path take this layer for num_tokens tokens: bf16/fp16 activations,
// 1 <= T <= fused_path_max_tokens(), E <= 512, top_k <= 32, H, F and the shared width multiples of 8 (of 16 for an
// FP8 layer). (The CPU backend runs the fused stages for any layer.)
bool fused_path_supported(const MoEConfig& cfg, Device device, int64_t num_tokens);
constexpr int64_t fused_path_max_tokens() { return 64; }
// The automatic choice (MoELayer's default, switchyard.torch.MoE's too): the fused path where it is supported and
// the expert weights a batch of num_tokens tokens can stream -- min(T * top_k, E) routed experts plus the shared
// expert, at the weights' element size -- come to at most fused_path_auto_bytes(cfg.quant_mode). The thresholds are
// measured (bench/NOTES.md, "Fused small-batch path"; H100): the fused kernels reach 40-68% of the floor (weights of
// the experts hit over the copy rate), the staged chain 85-98% once the weights dominate but with a fixed cost of
// ~45-50 us of launches and small kernels (Qwen3-30B-A3B T = 1: 77 us for a 25 us floor, fused 64 us), so the fused
// path wins only where the weights take under ~60 us to read (Qwen3-30B-A3B at T = 1 and 2; not Mixtral or
// DeepSeek-V3 at any T). The staged FP8 chain adds two activation quantisers, and there the fused path won at T = 1
// for all three shapes (336 MiB for Mixtral and DeepSeek-V3's routed experts) and lost or tied at T = 16 (>= 576
// MiB). switchyard.torch.MoE runs quantised modules on the staged ops only, so the FP8 threshold is MoELayer's.
constexpr int64_t fused_path_auto_bytes(QuantMode mode) {
    return mode == QuantMode::kNone ? int64_t{160} << 20 : int64_t{512} << 20;
}
bool fused_path_preferred(const MoEConfig& cfg, Device device, int64_t num_tokens);

// GEMM1 reading x's rows through the plan (GroupedGemmOptions::row_index) instead of a gathered copy: MoELayer's
// automatic choice (set_gather_in_gemm1) and switchyard.torch.MoE's for inference. Considered where GEMM1 runs with
// the gated epilogue on CUDA (bf16, interleaved gate/up, float experts); with R rows per expert on average (T * top_k /
// E, rounded up; expert choice: its capacity), preferred where
//   R <= gather_in_gemm1_max_rows() (128), or
//   R <= 2 * gather_in_gemm1_max_rows() (256: the 64-row Pingpong tiles) and x's bytes <= gather_in_gemm1_x_bytes()
//   (64 MiB: x's rows are re-read from the L2 by every expert and N tile that takes them), or
//   the separate gather is a large share of GEMM1: its bytes ((T + T * top_k) * H * 2) at the copy bandwidth over
//   GEMM1's FLOPs (4 * T * top_k * F * H) at the matrix rate >= gather_in_gemm1_min_share() (0.15; the rates as
//   measured on an H100: 782 TFLOP/s, 3.0 TB/s). That is, small experts (Qwen3-30B-A3B: F = 768, 0.19; DeepSeek-V3
//   0.07, Mixtral 0.014), where the time the gather takes is more than the gathered A loads cost the 128-row tiles.
// Measured on an H100 with the A rows copied by two producer warps (bench/NOTES.md, "Session 12"; the CLI's layer with
// and without, alternated, two rounds): faster at 32-256 rows (Qwen3 T = 4096 -7%, Mixtral T = 1024 -5%, DeepSeek-V3
// T = 1024 -2%; DeepSeek-V3 T = 4096 tied, -1% / +2%, where one warp had measured -14%: not yet explained), DeepSeek-V3
// at 256 rows (x 112 MiB) tied or 1-3% slower; from 512 rows Qwen3 -3% (T = 8192 / 16384), Mixtral +4-7% (T = 4096
// / 16384), DeepSeek-V3 +12-15% (T = 16384). Decode sizes (T = 1-64): as fast or faster (run 39).
constexpr int64_t gather_in_gemm1_max_rows() { return 128; }
constexpr int64_t gather_in_gemm1_x_bytes() { return int64_t{64} << 20; }
constexpr double gather_in_gemm1_min_share() { return 0.15; }
bool gather_in_gemm1_preferred(const MoEConfig& cfg, Device device, int64_t num_tokens);

}  // namespace switchyard
