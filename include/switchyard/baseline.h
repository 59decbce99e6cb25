// switchyard/baseline.h: the seed study's dense GShard MoE baseline (`--impl dense`), CPU and CUDA.
//
// The seed (DESIGN.md, first section) profiled a PyTorch MoE whose dispatch and combine are dense one-hot
// tensors. This baseline runs that algorithm faithfully, giant intermediate included, so that reports can
// show it beside the sparse path:
//   logits   [T, E] fp32   = x . gate^T                     (router, as ref::router_logits)
//   probs    [T, E] fp32   = softmax(logits) (sigmoid(logits) for ScoreFunction::kSigmoid)
//   ids, w   [T, k]        = top-k selection and weights    (ref::route: the same routing as the sparse path)
//   loc      [T, k] int32  = position c of pair (t, j) inside its expert, -1 when dropped (ref::build_plan)
//   dispatch [T, E, C]     = one-hot: 1 at (t, ids[t,j], loc[t,j])         (activation dtype)
//   combine  [T, E, C]     = w[t,j] at the same places, rounded to dtype    (activation dtype)
//   expert_in  [E, C, H]   = einsum('tec,th->ech', dispatch, x)            (dtype; exact: one term per sum)
//   pre        [E, C, R]   = expert_in . W13_e^T  (R = 2F gated, F otherwise; fp32: the activation reads
//                            unrounded accumulators, as the sparse path does)
//   h          [E, C, F]   = act(pre)                                       (dtype)
//   expert_out [E, C, H]   = h . W2_e^T                                      (dtype)
//   product    [T, E, C, H]= expert_out.unsqueeze(...) * combine.unsqueeze(3) (dtype) <- the seed's OOM
//   shared (when S = num_shared_experts * shared_ffn_size > 0):
//     shared_pre [T, Rs] fp32 (Rs = 2S gated, else S), shared_h [T, S] dtype, shared_out [T, H] dtype
//   out        [T, H]      = dtype( sum_e sum_c product[t, e, c, :] + shared_out[t, :] )
// and finally out is copied into the caller's y.
//
// Capacity C: cfg.capacity(T) when cfg.capacity_factor > 0 (pairs past capacity are dropped by
// cfg.drop_policy exactly as ref::build_plan drops them, and contribute nothing). When dropless
// (capacity_factor == 0) the dense baseline uses C = max over experts of the routed count, the smallest
// capacity that drops nothing; it is known only after routing.
//
// Numerics: the same rounding points as the sparse path (ref::moe_forward): h, expert_out and y are rounded
// to the dtype, pre-activations are not. Two roundings are the seed's own and the sparse path has none:
// the combine weight is stored in the dtype and each product term combine * expert_out is rounded to the
// dtype (both exact in fp32 for the weight; one fp32 rounding per term). The sum runs over e then c (the
// sparse path sums slots j in order), so the two agree to dtype rounding, not bitwise:
//   |dense - sparse| <= (2u + u^2) * sum_j |w_j * out_j| + u(1 + u) (|dense| + |sparse|),  u = unit roundoff.
// CPU: products accumulate in double (ref::gemm_nt), so expert outputs are bitwise those of the sparse path.
// CUDA: cuBLAS batched GEMMs with fp32 accumulation (no TF32), fp32 reduction of the product.
//
// Memory: every tensor above lives in one arena allocated before the run, each slice rounded up to 256
// bytes. dense_memory() gives the formula (a = dtype_size(cfg.dtype), pad() = round up to 256):
//   router     = pad(4TE) + pad(4TE) + pad(4Tk) + pad(4Tk) + pad(4Tk)        logits, probs, ids, w, loc
//   dispatch   = pad(a T E C)            combine  = pad(a T E C)
//   expert_in  = pad(a E C H)            pre      = pad(4 E C R)          h = pad(a E C F)
//   expert_out = pad(a E C H)            product  = pad(a T E C H)
//   shared     = pad(4 T Rs) + pad(a T S) + pad(a T H)                      (0 when S = 0)
//   output     = pad(a T H)
//   total      = the sum (saturating at SIZE_MAX).
// The router part is allocated first; for dropless configs the rest is checked against the limit after
// routing (C is not known before), so a refused dropless run has held the router part only.
// Past memory_limit_bytes (or, on CUDA, the device's free memory) a forward returns ran=false with the bytes
// it would have needed, writes nothing to y and allocates nothing more. Not for production use: it
// synchronises with the host (routing runs on the CPU from copied logits on CUDA too) and allocates.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "switchyard/config.h"
#include "switchyard/moe_layer.h"
#include "switchyard/routing.h"
#include "switchyard/tensor.h"

namespace switchyard {

constexpr size_t kDenseNoLimit = std::numeric_limits<size_t>::max();
constexpr size_t kDenseAlign = 256;

// The terms of the memory formula above, in bytes, for T tokens and capacity C.
struct DenseMemory {
    int64_t num_tokens = 0;
    int64_t capacity = 0;
    size_t router = 0;      // logits, probs, topk ids, topk weights, locations
    size_t dispatch = 0;    // [T, E, C]
    size_t combine = 0;     // [T, E, C]
    size_t expert_in = 0;   // [E, C, H]
    size_t pre = 0;         // [E, C, R] fp32
    size_t hidden = 0;      // [E, C, F]
    size_t expert_out = 0;  // [E, C, H]
    size_t product = 0;     // [T, E, C, H]
    size_t shared = 0;      // shared expert pre, h, out
    size_t output = 0;      // [T, H]
    size_t total = 0;
};

// Result of one dense forward.
struct DenseResult {
    bool ran = false;        // true: y holds the output
    size_t bytes_needed = 0; // the formula's total for the capacity used
    size_t peak_bytes = 0;   // arena bytes actually allocated (== bytes_needed when ran; router part or 0 if not)
    int64_t capacity = 0;    // C used (or that would have been used)
    int64_t dropped = 0;     // (token, slot) pairs dropped by capacity
    bool routed = false;     // routing ran (capacity, dropped and stats are valid)
    std::string reason;      // when !ran: "needs N bytes, limit L" (or the device's free memory, or alloc failure)
};

// Byte offsets of every tensor in the arena (the order of the formula); the router part is [0, router_end).
struct DenseLayout {
    size_t logits = 0, probs = 0, topk_ids = 0, topk_weights = 0, loc = 0, router_end = 0;
    size_t dispatch = 0, combine = 0, expert_in = 0, pre = 0, hidden = 0, expert_out = 0, product = 0;
    size_t shared_pre = 0, shared_h = 0, shared_out = 0, output = 0;
    size_t total = 0;  // SIZE_MAX when the sizes overflow
};
DenseLayout dense_layout(const MoEConfig& cfg, int64_t num_tokens, int64_t capacity);

DenseMemory dense_memory(const MoEConfig& cfg, int64_t num_tokens, int64_t capacity);
size_t dense_bytes_needed(const MoEConfig& cfg, int64_t num_tokens, int64_t capacity);
// Capacity known before routing: cfg.capacity(T) when capacity_factor > 0; when dropless the upper bound
// C = T (every token on one expert), so this is an upper bound of what a dropless forward needs.
size_t dense_bytes_needed(const MoEConfig& cfg, int64_t num_tokens);

// Checks the config, x and y ([T, H] of cfg.dtype, contiguous, on `dev`) and the weights' shapes (on `dev`).
void validate_dense_args(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, const TensorRef& y,
                         Device dev);

// CPU: x, y and the weights on the host (weights in any of fp32/bf16/fp16). Besides the limit, a run larger than
// the host's available memory (/proc/meminfo MemAvailable) is refused the same way. stats (optional): routing
// statistics, kept counts and drops (filled whenever routing ran, also when the arena was refused).
DenseResult dense_forward_cpu(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, const TensorRef& y,
                              size_t memory_limit_bytes = kDenseNoLimit, LoadStats* stats = nullptr);

#ifdef SWITCHYARD_WITH_CUDA
// CUDA: x, y and the weights on one CUDA device; gate, w13, w2 (and the shared weights) of cfg.dtype
// (cuBLAS GEMMs take matching input types); score_bias fp32 (copied to the host for routing).
// workspace: optional device memory; when it holds at least bytes_needed bytes it is used and nothing is
// allocated, else the arena comes from cudaMallocAsync on `stream` after a cudaMemGetInfo check.
// Synchronises `stream` once (routing on the host); the rest is stream-ordered (y is ready when the stream
// reaches the end of the enqueued work).
DenseResult dense_forward_cuda(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, const TensorRef& y,
                               size_t memory_limit_bytes = kDenseNoLimit, void* workspace = nullptr,
                               size_t workspace_bytes = 0, cudaStream_t stream = nullptr,
                               LoadStats* stats = nullptr);
#endif

}  // namespace switchyard
