// src/api/stages.cpp: the public stage functions (switchyard/stages.h): validation once, then the backend.
//
// Every function checks its arguments here (api/check.h: shapes, dtypes, devices, contiguity, workspace) and then
// calls the CPU backend (ref::stage, src/ref/stages_ref.cpp) or the CUDA backend (cuda::stage,
// src/cuda/stages_cuda.cpp, only in a build with SWITCHYARD_WITH_CUDA). The backends see checked input only.
#include "switchyard/stages.h"

#include <utility>
#include <vector>

#include "api/check.h"
#include "api/expert_chain.h"
#include "ref/stages_ref.h"
#include "switchyard/error.h"

#ifdef SWITCHYARD_WITH_CUDA
#include "cuda/stages_cuda.h"
#define SWITCHYARD_ON_CUDA(call) return cuda::stage::call
#else
#define SWITCHYARD_ON_CUDA(call) SWITCHYARD_FAIL("this build has no CUDA backend (built without CUDA)")
// Without the CUDA backend the stream, workspace and sizing arguments are read by the CUDA calls only.
#pragma GCC diagnostic ignored "-Wunused-parameter"
#endif

// Runs `cpu_call` for host tensors and `cuda_call` for CUDA tensors (dev is the call's device).
#define SWITCHYARD_DISPATCH(dev, cpu_call, cuda_call) \
    do {                                              \
        if ((dev) == Device::kCPU) {                  \
            ref::stage::cpu_call;                     \
            return;                                   \
        }                                             \
        SWITCHYARD_ON_CUDA(cuda_call);                \
    } while (0)

namespace switchyard {

using api::check_float_tensor;
using api::check_same_device;
using api::check_same_dtype;
using api::check_tensor;
using api::check_workspace;
using api::kAny;

namespace {

// logits [T, E] of fp32 (fp64 too on the CPU where allowed).
void check_logits(const TensorRef& logits, int64_t num_experts, bool allow_f64) {
    check_tensor(logits, "logits", {kAny, num_experts});
    const bool f64 = allow_f64 && logits.device == Device::kCPU && logits.dtype == DType::kF64;
    SWITCHYARD_CHECK(logits.dtype == DType::kF32 || f64, "logits dtype=", to_string(logits.dtype), ", expected fp32",
                     allow_f64 ? " (or fp64 on the cpu)" : "");
    api::check_backend(logits.device, "logits");
}

// A [rows, cols] fp32 (or fp64 on the CPU) routing-weight tensor on the logits' device.
void check_weights(const TensorRef& w, const char* name, int64_t rows, int64_t cols, const TensorRef& like) {
    check_tensor(w, name, {rows, cols});
    SWITCHYARD_CHECK(w.dtype == DType::kF32 || (w.device == Device::kCPU && w.dtype == DType::kF64), name, " dtype=",
                     to_string(w.dtype), ", expected fp32 (or fp64 on the cpu)");
    check_same_device(w, name, like, "logits");
}

void check_plan_tensor(const TensorRef& t, const char* name, int64_t d0, const TensorRef& like) {
    check_tensor(t, name, DType::kI32, {d0});
    check_same_device(t, name, like, "topk_ids");
}

// plan tensors for `rows` reserved rows of T tokens with `slots` slots each.
void check_plan(const MoEConfig& cfg, const RoutingPlan& plan, int64_t num_tokens, int64_t slots, int64_t rows,
                const TensorRef& like) {
    check_plan_tensor(plan.expert_counts, "plan.expert_counts", cfg.num_experts, like);
    check_plan_tensor(plan.expert_offsets, "plan.expert_offsets", cfg.num_experts + 1, like);
    check_tensor(plan.slot_row, "plan.slot_row", DType::kI32, {num_tokens, slots});
    check_same_device(plan.slot_row, "plan.slot_row", like, "topk_ids");
    check_plan_tensor(plan.row_token, "plan.row_token", rows, like);
    check_plan_tensor(plan.row_slot, "plan.row_slot", rows, like);
}

// offsets [E+1] int32 on the operands' device (optional where allowed).
void check_offsets(const TensorRef& offsets, int64_t num_groups, const TensorRef& like, const char* like_name) {
    check_tensor(offsets, "offsets", DType::kI32, {num_groups + 1});
    check_same_device(offsets, "offsets", like, like_name);
}

int64_t gemm_groups(const TensorRef& b) { return b.rank == 3 ? b.shape[0] : 1; }

// GroupedGemmOptions::row_index (optional) with a = x: int32 [R] on a's device, and on CUDA bf16 with x of at least
// one row (the gathered kernels). Returns the GEMM's rows R (a's without row_index).
int64_t check_row_index(const TensorRef& row_index, const TensorRef& a, const char* what) {
    if (!row_index.defined()) return a.shape[0];
    check_tensor(row_index, "row_index", DType::kI32, {kAny});
    check_same_device(row_index, "row_index", a, "a");
    if (a.device == Device::kCUDA) {
        SWITCHYARD_CHECK(a.dtype == DType::kBF16, what, ": a gathered A (row_index) on CUDA is bf16 only (a is ",
                         to_string(a.dtype), ")");
        SWITCHYARD_CHECK(a.shape[0] >= 1, what, ": a gathered A needs x with at least one row (x shape=",
                         a.shape_string(), ")");
    }
    return row_index.shape[0];
}
// A grouped GEMM's a [R, K], b [E, N, K] or [N, K] (named bn) and offsets [E+1] (undefined: one group); returns E.
int64_t check_gemm_operands(const TensorRef& a, const TensorRef& b, const char* bn, const TensorRef& offsets) {
    check_float_tensor(a, "a", {kAny, kAny});
    SWITCHYARD_CHECK(b.rank == 2 || b.rank == 3, bn, " shape=", b.shape_string(), ", expected [E, N, K] or [N, K]");
    if (b.rank == 3)
        check_float_tensor(b, bn, {kAny, kAny, a.shape[1]});
    else
        check_float_tensor(b, bn, {kAny, a.shape[1]});
    check_same_device(b, bn, a, "a");
    const int64_t groups = gemm_groups(b);
    if (offsets.defined())
        check_offsets(offsets, groups, a, "a");
    else
        SWITCHYARD_CHECK(groups == 1, "offsets are required for ", groups, " groups (undefined means one group)");
    return groups;
}

// The common head of every *_workspace_size: checks the token count and the backend; false means the CPU (no
// workspace), true that the CUDA backend sizes it.
bool cuda_workspace(Device device, int64_t num_tokens, const char* what) {
    SWITCHYARD_CHECK(num_tokens >= 0, what, ": num_tokens=", num_tokens, " must be >= 0");
    api::check_backend(device, what);
    return device == Device::kCUDA;
}

// GEMM operands on CUDA share one dtype (the CUTLASS and SIMT kernels take one element type).
void check_cuda_gemm_dtypes(const TensorRef& x, const char* xn, const TensorRef& y, const char* yn) {
    if (x.device == Device::kCUDA) check_same_dtype(y, yn, x, xn);
}

}  // namespace

// ---- router ----------------------------------------------------------------------------------------------------------

size_t router_gemm_workspace_size(Device device) {
    if (!cuda_workspace(device, 0, "router_gemm_workspace_size")) return 0;
    SWITCHYARD_ON_CUDA(router_gemm_workspace_size());
}

void router_gemm(const TensorRef& x, const TensorRef& gate, const TensorRef& logits, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream) {
    check_float_tensor(x, "x", {kAny, kAny});
    SWITCHYARD_CHECK(x.dtype != DType::kF64, "x dtype=fp64: router_gemm takes fp32, bf16 or fp16");
    check_float_tensor(gate, "gate", {kAny, x.shape[1]});
    check_same_device(gate, "gate", x, "x");
    check_tensor(logits, "logits", DType::kF32, {x.shape[0], gate.shape[0]});
    check_same_device(logits, "logits", x, "x");
    check_cuda_gemm_dtypes(x, "x", gate, "gate");
    api::check_backend(x.device, "router_gemm");
    check_workspace(workspace, workspace_bytes, router_gemm_workspace_size(x.device), "router_gemm");
    SWITCHYARD_DISPATCH(x.device, router_gemm(x, gate, logits),
                        router_gemm(x, gate, logits, workspace, workspace_bytes, stream));
}

size_t router_gemm_backward_workspace_size(Device device, DType dtype, int64_t num_tokens, int64_t num_experts,
                                           int64_t hidden) {
    if (!cuda_workspace(device, num_tokens, "router_gemm_backward_workspace_size")) return 0;
    SWITCHYARD_CHECK(num_experts >= 1 && hidden >= 0, "router_gemm_backward_workspace_size: num_experts=",
                     num_experts, " hidden=", hidden);
    SWITCHYARD_ON_CUDA(router_gemm_backward_workspace_size(dtype, num_tokens, num_experts, hidden));
}

void router_gemm_backward(const TensorRef& x, const TensorRef& gate, const TensorRef& d_logits, const TensorRef& dx,
                          const TensorRef& dgate, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    check_float_tensor(x, "x", {kAny, kAny});
    SWITCHYARD_CHECK(x.dtype != DType::kF64, "x dtype=fp64: router_gemm_backward takes fp32, bf16 or fp16");
    check_float_tensor(gate, "gate", {kAny, x.shape[1]});
    check_same_device(gate, "gate", x, "x");
    check_cuda_gemm_dtypes(x, "x", gate, "gate");
    const int64_t num_tokens = x.shape[0], num_experts = gate.shape[0], hidden = x.shape[1];
    SWITCHYARD_CHECK(num_experts >= 1, "router_gemm_backward: gate ", gate.shape_string(), " has no expert");
    check_tensor(d_logits, "d_logits", DType::kF32, {num_tokens, num_experts});
    check_same_device(d_logits, "d_logits", x, "x");
    if (dx.defined()) {
        check_tensor(dx, "dx", x.dtype, {num_tokens, hidden});
        check_same_device(dx, "dx", x, "x");
    }
    if (dgate.defined()) {
        check_tensor(dgate, "dgate", gate.dtype, {num_experts, hidden});
        check_same_device(dgate, "dgate", x, "x");
    }
    api::check_backend(x.device, "router_gemm_backward");
    check_workspace(workspace, workspace_bytes,
                    router_gemm_backward_workspace_size(x.device, x.dtype, num_tokens, num_experts, hidden),
                    "router_gemm_backward");
    SWITCHYARD_DISPATCH(x.device, router_gemm_backward(x, gate, d_logits, dx, dgate),
                        router_gemm_backward(x, gate, d_logits, dx, dgate, workspace, workspace_bytes, stream));
}

void route(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& score_bias, const TensorRef& topk_ids,
           const TensorRef& topk_weights, cudaStream_t stream) {
    cfg.validate();
    SWITCHYARD_CHECK(!cfg.expert_choice(), "route: routing=expert-choice takes route_expert_choice");
    check_logits(logits, cfg.num_experts, /*allow_f64=*/true);
    const int64_t num_tokens = logits.shape[0];
    if (cfg.use_score_bias) {
        check_tensor(score_bias, "score_bias", DType::kF32, {cfg.num_experts});
        check_same_device(score_bias, "score_bias", logits, "logits");
    } else {
        SWITCHYARD_CHECK(!score_bias.defined(), "score_bias ", score_bias.shape_string(),
                         " given but use_score_bias=false");
    }
    check_tensor(topk_ids, "topk_ids", DType::kI32, {num_tokens, cfg.top_k});
    check_same_device(topk_ids, "topk_ids", logits, "logits");
    check_weights(topk_weights, "topk_weights", num_tokens, cfg.top_k, logits);
    if (num_tokens == 0) return;
    SWITCHYARD_DISPATCH(logits.device, route(cfg, logits, score_bias, topk_ids, topk_weights),
                        route(cfg, logits, score_bias, topk_ids, topk_weights, stream));
}

size_t route_expert_choice_workspace_size(const MoEConfig& cfg, Device device, int64_t num_tokens) {
    if (!cuda_workspace(device, num_tokens, "route_expert_choice_workspace_size")) return 0;
    SWITCHYARD_ON_CUDA(route_expert_choice_workspace_size(cfg, num_tokens));
}

void route_expert_choice(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                         const TensorRef& topk_weights, const RoutingPlan& plan, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
    cfg.validate();
    SWITCHYARD_CHECK(cfg.expert_choice(), "route_expert_choice: the config's routing mode is ",
                     to_string(cfg.routing_mode));
    check_logits(logits, cfg.num_experts, /*allow_f64=*/false);
    const int64_t num_tokens = logits.shape[0], E = cfg.num_experts;
    check_tensor(topk_ids, "topk_ids", DType::kI32, {num_tokens, E});
    check_same_device(topk_ids, "topk_ids", logits, "logits");
    check_tensor(topk_weights, "topk_weights", DType::kF32, {num_tokens, E});
    check_same_device(topk_weights, "topk_weights", logits, "logits");
    check_plan(cfg, plan, num_tokens, E, E * cfg.expert_choice_capacity(num_tokens), topk_ids);
    check_workspace(workspace, workspace_bytes, route_expert_choice_workspace_size(cfg, logits.device, num_tokens),
                    "route_expert_choice");
    SWITCHYARD_DISPATCH(logits.device, route_expert_choice(cfg, logits, topk_ids, topk_weights, plan),
                        route_expert_choice(cfg, logits, topk_ids, topk_weights, plan, workspace, workspace_bytes,
                                            stream));
}

// ---- routing plan -------------------------------------------------------------------------------------------------

size_t plan_workspace_size(const MoEConfig& cfg, Device device, int64_t num_tokens) {
    if (!cuda_workspace(device, num_tokens, "plan_workspace_size")) return 0;
    SWITCHYARD_ON_CUDA(plan_workspace_size(cfg, num_tokens));
}

void build_plan(const MoEConfig& cfg, const TensorRef& topk_ids, const TensorRef& topk_weights,
                const RoutingPlan& plan, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    cfg.validate();
    SWITCHYARD_CHECK(!cfg.expert_choice(), "build_plan: routing=expert-choice builds its plan in route_expert_choice");
    check_tensor(topk_ids, "topk_ids", DType::kI32, {kAny, cfg.top_k});
    api::check_backend(topk_ids.device, "build_plan");
    const int64_t num_tokens = topk_ids.shape[0];
    check_tensor(topk_weights, "topk_weights", DType::kF32, {num_tokens, cfg.top_k});
    check_same_device(topk_weights, "topk_weights", topk_ids, "topk_ids");
    check_plan(cfg, plan, num_tokens, cfg.top_k, num_tokens * cfg.top_k, topk_ids);
    check_workspace(workspace, workspace_bytes, plan_workspace_size(cfg, topk_ids.device, num_tokens), "build_plan");
    SWITCHYARD_DISPATCH(topk_ids.device, build_plan(cfg, topk_ids, topk_weights, plan),
                        build_plan(cfg, topk_ids, topk_weights, plan, workspace, workspace_bytes, stream));
}

// ---- dispatch -----------------------------------------------------------------------------------------------------

void gather(const TensorRef& x, const TensorRef& row_token, const TensorRef& xp, cudaStream_t stream,
            const TensorRef& slot_row) {
    check_float_tensor(x, "x", {kAny, kAny});
    check_tensor(row_token, "row_token", DType::kI32, {kAny});
    check_same_device(row_token, "row_token", x, "x");
    check_tensor(xp, "xp", x.dtype, {row_token.shape[0], x.shape[1]});
    check_same_device(xp, "xp", x, "x");
    if (slot_row.defined()) {
        check_tensor(slot_row, "slot_row", DType::kI32, {x.shape[0], kAny});
        check_same_device(slot_row, "slot_row", x, "x");
        SWITCHYARD_CHECK(slot_row.shape[1] >= 1 && slot_row.shape[1] <= MoEConfig::kMaxTopK, "gather: slot_row has ",
                         slot_row.shape[1], " columns, top_k must be in [1, ", MoEConfig::kMaxTopK, "]");
    }
    api::check_backend(x.device, "gather");
    if (xp.numel() == 0) return;
    SWITCHYARD_DISPATCH(x.device, gather(x, row_token, xp, slot_row), gather(x, row_token, xp, stream, slot_row));
}

void gather_backward(const TensorRef& d_xp, const TensorRef& slot_row, const TensorRef& dx, cudaStream_t stream) {
    check_float_tensor(d_xp, "d_xp", {kAny, kAny});
    check_tensor(slot_row, "slot_row", DType::kI32, {kAny, kAny});
    check_same_device(slot_row, "slot_row", d_xp, "d_xp");
    check_tensor(dx, "dx", d_xp.dtype, {slot_row.shape[0], d_xp.shape[1]});
    check_same_device(dx, "dx", d_xp, "d_xp");
    api::check_backend(d_xp.device, "gather_backward");
    if (dx.numel() == 0) return;
    SWITCHYARD_DISPATCH(d_xp.device, gather_backward(d_xp, slot_row, dx),
                        gather_backward(d_xp, slot_row, dx, stream));
}

// ---- grouped GEMM -------------------------------------------------------------------------------------------------

size_t grouped_gemm_workspace_size(Device device, DType dtype, int64_t num_groups, int64_t n, int64_t k,
                                   int64_t max_rows) {
    SWITCHYARD_CHECK(num_groups >= 1 && n >= 0 && k >= 0 && max_rows >= 0, "grouped_gemm_workspace_size: num_groups=",
                     num_groups, " n=", n, " k=", k, " max_rows=", max_rows);
    if (!cuda_workspace(device, 0, "grouped_gemm_workspace_size")) return 0;
    SWITCHYARD_ON_CUDA(grouped_gemm_workspace_size(dtype, num_groups, n, k, max_rows));
}

void grouped_gemm(const TensorRef& a, const TensorRef& b, const TensorRef& offsets, const TensorRef& c,
                  void* workspace, size_t workspace_bytes, cudaStream_t stream, const GroupedGemmOptions& options) {
    const int64_t groups = check_gemm_operands(a, b, "b", offsets), n = b.shape[b.rank - 2];
    const int64_t rows = check_row_index(options.row_index, a, "grouped_gemm");
    check_float_tensor(c, "c", {rows, n});
    check_same_device(c, "c", a, "a");
    check_cuda_gemm_dtypes(a, "a", b, "b");
    check_cuda_gemm_dtypes(a, "a", c, "c");
    api::check_backend(a.device, "grouped_gemm");
    check_workspace(workspace, workspace_bytes,
                    grouped_gemm_workspace_size(a.device, a.dtype, groups, n, a.shape[1], rows), "grouped_gemm");
    SWITCHYARD_DISPATCH(a.device, grouped_gemm(a, b, offsets, c, options.zero_unowned_rows, options.row_index),
                        grouped_gemm(a, b, offsets, c, workspace, workspace_bytes, stream, options.zero_unowned_rows,
                                     options.row_index));
}

// ---- GEMM1 and the gated activation in one step --------------------------------------------------------------

size_t grouped_gemm_gated_workspace_size(Device device, DType dtype, int64_t num_groups, int64_t ffn, int64_t k,
                                         int64_t max_rows) {
    SWITCHYARD_CHECK(num_groups >= 1 && ffn >= 0 && k >= 0 && max_rows >= 0,
                     "grouped_gemm_gated_workspace_size: num_groups=", num_groups, " ffn=", ffn, " k=", k,
                     " max_rows=", max_rows);
    if (!cuda_workspace(device, 0, "grouped_gemm_gated_workspace_size")) return 0;
    SWITCHYARD_ON_CUDA(grouped_gemm_gated_workspace_size(dtype, num_groups, ffn, k, max_rows));
}

void grouped_gemm_gated(Activation act, const TensorRef& a, const TensorRef& w13i, const TensorRef& offsets,
                        const TensorRef& h, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                        const GroupedGemmOptions& options) {
    SWITCHYARD_CHECK(is_gated(act), "grouped_gemm_gated: activation=", static_cast<int>(act),
                     " is not a gated activation (SwiGLU, GeGLU)");
    const int64_t groups = check_gemm_operands(a, w13i, "w13i", offsets), n = w13i.shape[w13i.rank - 2];
    const TensorRef& row_index = options.row_index;
    const int64_t rows = check_row_index(row_index, a, "grouped_gemm_gated");
    SWITCHYARD_CHECK(n % 16 == 0, "w13i shape=", w13i.shape_string(), ": 2F must be a multiple of 16 (F of 8)");
    check_float_tensor(h, "h", {rows, n / 2});
    check_same_device(h, "h", a, "a");
    check_cuda_gemm_dtypes(a, "a", w13i, "w13i");
    check_cuda_gemm_dtypes(a, "a", h, "h");
    const TensorRef& gate_up = options.gate_up;
    if (gate_up.defined()) {
        check_tensor(gate_up, "gate_up", h.dtype, {rows, n});
        check_same_device(gate_up, "gate_up", a, "a");
        SWITCHYARD_CHECK(gate_up.data != h.data, "grouped_gemm_gated: gate_up and h must be different tensors");
        SWITCHYARD_CHECK(a.device == Device::kCPU || !row_index.defined(),
                         "grouped_gemm_gated: gate_up with row_index is not built on CUDA (gather first)");
    }
    api::check_backend(a.device, "grouped_gemm_gated");
    check_workspace(workspace, workspace_bytes,
                    grouped_gemm_gated_workspace_size(a.device, a.dtype, groups, n / 2, a.shape[1], rows),
                    "grouped_gemm_gated");
    SWITCHYARD_DISPATCH(a.device,
                        grouped_gemm_gated(act, a, w13i, offsets, h, options.zero_unowned_rows, row_index, gate_up),
                        grouped_gemm_gated(act, a, w13i, offsets, h, workspace, workspace_bytes, stream,
                                           options.zero_unowned_rows, row_index, gate_up));
}

void interleave_gate_up(const TensorRef& w13, const TensorRef& w13i, bool inverse, cudaStream_t stream) {
    SWITCHYARD_CHECK(w13.rank == 2 || w13.rank == 3, "w13 shape=", w13.shape_string(),
                     ", expected [E, 2F, K] or [2F, K]");
    const int64_t n = w13.shape[w13.rank - 2], k = w13.shape[w13.rank - 1];
    if (w13.rank == 3) {
        check_tensor(w13, "w13", {kAny, kAny, kAny});
        check_tensor(w13i, "w13i", w13.dtype, {w13.shape[0], n, k});
    } else {
        check_tensor(w13, "w13", {kAny, kAny});
        check_tensor(w13i, "w13i", w13.dtype, {n, k});
    }
    SWITCHYARD_CHECK(n % 16 == 0, "w13 shape=", w13.shape_string(), ": 2F must be a multiple of 16 (F of 8)");
    check_same_device(w13i, "w13i", w13, "w13");
    SWITCHYARD_CHECK(w13i.data != w13.data || w13.numel() == 0, "interleave_gate_up is out of place (w13i == w13)");
    api::check_backend(w13.device, "interleave_gate_up");
    SWITCHYARD_DISPATCH(w13.device, interleave_gate_up(w13, w13i, inverse),
                        interleave_gate_up(w13, w13i, inverse, stream));
}

// ---- FP8 grouped GEMM ---------------------------------------------------------------------------------------------

size_t grouped_gemm_fp8_workspace_size(Device device, QuantMode mode, int64_t num_groups, int64_t n, int64_t k,
                                       int64_t max_rows) {
    SWITCHYARD_CHECK(mode == QuantMode::kFP8Block || mode == QuantMode::kFP8Tensor,
                     "grouped_gemm_fp8_workspace_size: quant mode ", to_string(mode), " is not an FP8 mode");
    SWITCHYARD_CHECK(num_groups >= 1 && n >= 0 && k >= 0 && max_rows >= 0,
                     "grouped_gemm_fp8_workspace_size: num_groups=", num_groups, " n=", n, " k=", k,
                     " max_rows=", max_rows);
    if (!cuda_workspace(device, 0, "grouped_gemm_fp8_workspace_size")) return 0;
    SWITCHYARD_ON_CUDA(grouped_gemm_fp8_workspace_size(num_groups, n, k, max_rows));
}

void grouped_gemm_fp8(const TensorRef& a, const TensorRef& b, const TensorRef& b_scale, const TensorRef& input_scale,
                      const TensorRef& offsets, const TensorRef& c, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream, const Fp8GemmOptions& options) {
    const QuantMode mode = options.mode;
    SWITCHYARD_CHECK(mode == QuantMode::kFP8Block || mode == QuantMode::kFP8Tensor, "grouped_gemm_fp8: mode=",
                     to_string(mode), " is not an FP8 mode (fp8-block or fp8-tensor)");
    check_float_tensor(a, "a", {kAny, kAny});
    SWITCHYARD_CHECK(a.dtype != DType::kF64, "a dtype=fp64: grouped_gemm_fp8 takes fp32, bf16 or fp16");
    SWITCHYARD_CHECK(b.rank == 2 || b.rank == 3, "b shape=", b.shape_string(), ", expected [E, N, K] or [N, K]");
    if (b.rank == 3)
        check_tensor(b, "b", DType::kF8E4M3, {kAny, kAny, a.shape[1]});
    else
        check_tensor(b, "b", DType::kF8E4M3, {kAny, a.shape[1]});
    check_same_device(b, "b", a, "a");
    const int64_t groups = gemm_groups(b), n = b.shape[b.rank - 2], kk = a.shape[1], rows = a.shape[0];
    if (mode == QuantMode::kFP8Block) {
        if (b.rank == 3)
            check_tensor(b_scale, "b_scale", DType::kF32, {groups, fp8_blocks(n), fp8_blocks(kk)});
        else
            check_tensor(b_scale, "b_scale", DType::kF32, {fp8_blocks(n), fp8_blocks(kk)});
        SWITCHYARD_CHECK(!input_scale.defined(), "input_scale ", input_scale.shape_string(),
                         " given: a static input scale is a fp8-tensor option (fp8-block quantises activations "
                         "dynamically per 128 channels)");
    } else {
        check_tensor(b_scale, "b_scale", DType::kF32, {groups});
        if (input_scale.defined()) {
            check_tensor(input_scale, "input_scale", DType::kF32, {groups});
            check_same_device(input_scale, "input_scale", a, "a");
        }
    }
    check_same_device(b_scale, "b_scale", a, "a");
    if (offsets.defined())
        check_offsets(offsets, groups, a, "a");
    else
        SWITCHYARD_CHECK(groups == 1, "offsets are required for ", groups, " groups (undefined means one group)");
    check_tensor(c, "c", a.dtype, {rows, n});
    check_same_device(c, "c", a, "a");
    api::check_backend(a.device, "grouped_gemm_fp8");
#ifdef SWITCHYARD_WITH_CUDA
    // CUDA's shape limits (16-byte TMA rows) before the workspace check, so that their message comes first.
    if (a.device == Device::kCUDA) cuda::stage::check_fp8_gemm_shape("grouped_gemm_fp8", c.dtype, n, kk);
#endif
    check_workspace(workspace, workspace_bytes, grouped_gemm_fp8_workspace_size(a.device, mode, groups, n, kk, rows),
                    "grouped_gemm_fp8");
    SWITCHYARD_DISPATCH(a.device,
                        grouped_gemm_fp8(a, b, b_scale, input_scale, offsets, c, mode, options.zero_unowned_rows),
                        grouped_gemm_fp8(a, b, b_scale, input_scale, offsets, c, mode, workspace, workspace_bytes,
                                         stream, options.zero_unowned_rows));
}

size_t grouped_gemm_grad_workspace_size(Device device, DType dtype, int64_t num_groups, int64_t n, int64_t k,
                                        int64_t max_rows) {
    SWITCHYARD_CHECK(num_groups >= 1 && n >= 0 && k >= 0 && max_rows >= 0,
                     "grouped_gemm_grad_workspace_size: num_groups=", num_groups, " n=", n, " k=", k,
                     " max_rows=", max_rows);
    if (!cuda_workspace(device, 0, "grouped_gemm_grad_workspace_size")) return 0;
    SWITCHYARD_ON_CUDA(grouped_gemm_grad_workspace_size(dtype, num_groups, n, k, max_rows));
}

void grouped_gemm_dgrad(const TensorRef& dc, const TensorRef& b, const TensorRef& offsets, const TensorRef& da,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    check_float_tensor(dc, "dc", {kAny, kAny});
    check_float_tensor(b, "b", {kAny, dc.shape[1], kAny});
    check_same_device(b, "b", dc, "dc");
    check_offsets(offsets, b.shape[0], dc, "dc");
    check_float_tensor(da, "da", {dc.shape[0], b.shape[2]});
    check_same_device(da, "da", dc, "dc");
    check_cuda_gemm_dtypes(dc, "dc", b, "b");
    check_cuda_gemm_dtypes(dc, "dc", da, "da");
    api::check_backend(dc.device, "grouped_gemm_dgrad");
    check_workspace(workspace, workspace_bytes,
                    grouped_gemm_grad_workspace_size(dc.device, dc.dtype, b.shape[0], b.shape[1], b.shape[2],
                                                     dc.shape[0]),
                    "grouped_gemm_dgrad");
    SWITCHYARD_DISPATCH(dc.device, grouped_gemm_dgrad(dc, b, offsets, da),
                        grouped_gemm_dgrad(dc, b, offsets, da, workspace, workspace_bytes, stream));
}

void grouped_gemm_wgrad(const TensorRef& dc, const TensorRef& a, const TensorRef& offsets, const TensorRef& db,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    check_float_tensor(dc, "dc", {kAny, kAny});
    check_float_tensor(a, "a", {dc.shape[0], kAny});
    check_same_device(a, "a", dc, "dc");
    check_float_tensor(db, "db", {kAny, dc.shape[1], a.shape[1]});
    check_same_device(db, "db", dc, "dc");
    check_offsets(offsets, db.shape[0], dc, "dc");
    check_cuda_gemm_dtypes(dc, "dc", a, "a");
    check_cuda_gemm_dtypes(dc, "dc", db, "db");
    api::check_backend(dc.device, "grouped_gemm_wgrad");
    check_workspace(workspace, workspace_bytes,
                    grouped_gemm_grad_workspace_size(dc.device, dc.dtype, db.shape[0], db.shape[1], db.shape[2],
                                                     dc.shape[0]),
                    "grouped_gemm_wgrad");
    SWITCHYARD_DISPATCH(dc.device, grouped_gemm_wgrad(dc, a, offsets, db),
                        grouped_gemm_wgrad(dc, a, offsets, db, workspace, workspace_bytes, stream));
}

// ---- activation ---------------------------------------------------------------------------------------------------

namespace {
// The F of g [R, R13] under act (gated: R13 = 2F, so R13 must be even).
int64_t activation_width(Activation act, const TensorRef& g) {
    SWITCHYARD_CHECK(static_cast<int>(act) >= 0 && static_cast<int>(act) <= 3, "activation=", static_cast<int>(act),
                     " is not an Activation");
    if (!is_gated(act)) return g.shape[1];
    SWITCHYARD_CHECK(g.shape[1] % 2 == 0, "g shape=", g.shape_string(), ": a gated activation (", to_string(act),
                     ") needs an even width [R, 2F]");
    return g.shape[1] / 2;
}
// The interleaved gate/up layout (interleave_gate_up) exists for gated activations with F % 8 == 0.
void check_interleaved(Activation act, int64_t ffn, bool interleaved, const char* what) {
    if (!interleaved) return;
    SWITCHYARD_CHECK(is_gated(act), what, ": gate_up_interleaved with activation ", to_string(act),
                     ", which is not gated");
    SWITCHYARD_CHECK(ffn % 8 == 0, what, ": gate_up_interleaved needs F % 8 == 0 (F=", ffn, ")");
}
}  // namespace

void activation(Activation act, const TensorRef& g, const TensorRef& h, const TensorRef& num_rows,
                cudaStream_t stream, bool gate_up_interleaved) {
    check_float_tensor(g, "g", {kAny, kAny});
    const int64_t ffn = activation_width(act, g);
    check_interleaved(act, ffn, gate_up_interleaved, "activation");
    check_tensor(h, "h", g.dtype, {g.shape[0], ffn});
    check_same_device(h, "h", g, "g");
    if (num_rows.defined()) {
        check_tensor(num_rows, "num_rows", DType::kI32, {1});
        check_same_device(num_rows, "num_rows", g, "g");
    }
    api::check_backend(g.device, "activation");
    if (h.numel() == 0) return;
    SWITCHYARD_DISPATCH(g.device, activation(act, g, h, num_rows, gate_up_interleaved),
                        activation(act, g, h, num_rows, stream, gate_up_interleaved));
}

void activation_backward(Activation act, const TensorRef& g, const TensorRef& dh, const TensorRef& dg,
                         cudaStream_t stream, bool gate_up_interleaved) {
    check_float_tensor(g, "g", {kAny, kAny});
    const int64_t ffn = activation_width(act, g);
    check_interleaved(act, ffn, gate_up_interleaved, "activation_backward");
    check_tensor(dh, "dh", g.dtype, {g.shape[0], ffn});
    check_same_device(dh, "dh", g, "g");
    check_tensor(dg, "dg", g.dtype, {g.shape[0], g.shape[1]});
    check_same_device(dg, "dg", g, "g");
    api::check_backend(g.device, "activation_backward");
    if (dg.numel() == 0) return;
    SWITCHYARD_DISPATCH(g.device, activation_backward(act, g, dh, dg, gate_up_interleaved),
                        activation_backward(act, g, dh, dg, stream, gate_up_interleaved));
}

void grouped_gemm_dgrad_activation(Activation act, const TensorRef& dc, const TensorRef& w2, const TensorRef& offsets,
                                   const TensorRef& g, const TensorRef& dg, const TensorRef& h, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream, bool gate_up_interleaved) {
    SWITCHYARD_CHECK(is_gated(act), "grouped_gemm_dgrad_activation: a gated activation (SwiGLU, GeGLU) is required, "
                     "got ", to_string(act));
    check_float_tensor(dc, "dc", {kAny, kAny});
    check_float_tensor(w2, "w2", {kAny, dc.shape[1], kAny});
    check_same_device(w2, "w2", dc, "dc");
    check_offsets(offsets, w2.shape[0], dc, "dc");
    const int64_t rows = dc.shape[0], ffn = w2.shape[2];
    check_interleaved(act, ffn, gate_up_interleaved, "grouped_gemm_dgrad_activation");
    check_tensor(g, "g", dc.dtype, {rows, 2 * ffn});
    check_same_device(g, "g", dc, "dc");
    check_tensor(dg, "dg", dc.dtype, {rows, 2 * ffn});
    check_same_device(dg, "dg", dc, "dc");
    check_tensor(h, "h", dc.dtype, {rows, ffn});
    check_same_device(h, "h", dc, "dc");
    check_cuda_gemm_dtypes(dc, "dc", w2, "w2");
    api::check_backend(dc.device, "grouped_gemm_dgrad_activation");
    check_workspace(workspace, workspace_bytes,
                    grouped_gemm_grad_workspace_size(dc.device, dc.dtype, w2.shape[0], w2.shape[1], ffn, rows),
                    "grouped_gemm_dgrad_activation");
    if (rows == 0) return;
    SWITCHYARD_CHECK(dg.data != g.data && h.data != g.data && h.data != dg.data,
                     "grouped_gemm_dgrad_activation: g, dg and h must be distinct tensors");
    SWITCHYARD_DISPATCH(dc.device, grouped_gemm_dgrad_activation(act, dc, w2, offsets, g, dg, h, gate_up_interleaved),
                        grouped_gemm_dgrad_activation(act, dc, w2, offsets, g, dg, h, workspace, workspace_bytes,
                                                      stream, gate_up_interleaved));
}

// ---- combine ------------------------------------------------------------------------------------------------------

void combine(const TensorRef& expert_out, const TensorRef& slot_row, const TensorRef& weights,
             const TensorRef& shared, const TensorRef& y, cudaStream_t stream, const TensorRef& shared_gate) {
    check_float_tensor(expert_out, "expert_out", {kAny, kAny});
    check_tensor(slot_row, "slot_row", DType::kI32, {kAny, kAny});
    check_same_device(slot_row, "slot_row", expert_out, "expert_out");
    const int64_t num_tokens = slot_row.shape[0], k = slot_row.shape[1], hidden = expert_out.shape[1];
    check_tensor(weights, "weights", {num_tokens, k});
    SWITCHYARD_CHECK(weights.dtype == DType::kF32 || (weights.device == Device::kCPU && weights.dtype == DType::kF64),
                     "weights dtype=", to_string(weights.dtype), ", expected fp32 (or fp64 on the cpu)");
    check_same_device(weights, "weights", expert_out, "expert_out");
    if (shared.defined()) {
        check_tensor(shared, "shared", expert_out.dtype, {num_tokens, hidden});
        check_same_device(shared, "shared", expert_out, "expert_out");
    }
    if (shared_gate.defined()) {
        SWITCHYARD_CHECK(shared.defined(), "shared_gate given without a shared expert output");
        check_tensor(shared_gate, "shared_gate", DType::kF32, {num_tokens, 1});
        check_same_device(shared_gate, "shared_gate", expert_out, "expert_out");
    }
    check_tensor(y, "y", expert_out.dtype, {num_tokens, hidden});
    check_same_device(y, "y", expert_out, "expert_out");
    api::check_backend(expert_out.device, "combine");
    if (y.numel() == 0) return;
    SWITCHYARD_DISPATCH(expert_out.device, combine(expert_out, slot_row, weights, shared, shared_gate, y),
                        combine(expert_out, slot_row, weights, shared, shared_gate, y, stream));
}

void combine_backward(const TensorRef& dy, const TensorRef& expert_out, const TensorRef& slot_row,
                      const TensorRef& weights, const TensorRef& d_out, const TensorRef& d_weights,
                      cudaStream_t stream, const TensorRef& num_rows) {
    check_float_tensor(expert_out, "expert_out", {kAny, kAny});
    if (num_rows.defined()) {
        check_tensor(num_rows, "num_rows", DType::kI32, {1});
        check_same_device(num_rows, "num_rows", expert_out, "expert_out");
    }
    check_tensor(slot_row, "slot_row", DType::kI32, {kAny, kAny});
    check_same_device(slot_row, "slot_row", expert_out, "expert_out");
    const int64_t num_tokens = slot_row.shape[0], k = slot_row.shape[1], hidden = expert_out.shape[1];
    check_tensor(dy, "dy", expert_out.dtype, {num_tokens, hidden});
    check_same_device(dy, "dy", expert_out, "expert_out");
    check_tensor(weights, "weights", {num_tokens, k});
    check_same_device(weights, "weights", expert_out, "expert_out");
    check_tensor(d_out, "d_out", expert_out.dtype, {expert_out.shape[0], hidden});
    check_same_device(d_out, "d_out", expert_out, "expert_out");
    check_tensor(d_weights, "d_weights", weights.dtype, {num_tokens, k});
    check_same_device(d_weights, "d_weights", expert_out, "expert_out");
    SWITCHYARD_CHECK(weights.dtype == DType::kF32 || (weights.device == Device::kCPU && weights.dtype == DType::kF64),
                     "weights dtype=", to_string(weights.dtype), ", expected fp32 (or fp64 on the cpu)");
    api::check_backend(expert_out.device, "combine_backward");
    SWITCHYARD_DISPATCH(expert_out.device, combine_backward(dy, expert_out, slot_row, weights, d_out, d_weights),
                        combine_backward(dy, expert_out, slot_row, weights, d_out, d_weights, stream, num_rows));
}

// ---- router backward ----------------------------------------------------------------------------------------------

void route_backward(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                    const TensorRef& d_weights, const TensorRef& d_logits, cudaStream_t stream) {
    cfg.validate();
    check_logits(logits, cfg.num_experts, /*allow_f64=*/true);
    const int64_t num_tokens = logits.shape[0];
    check_tensor(topk_ids, "topk_ids", DType::kI32, {num_tokens, cfg.top_k});
    check_same_device(topk_ids, "topk_ids", logits, "logits");
    check_weights(d_weights, "d_weights", num_tokens, cfg.top_k, logits);
    check_tensor(d_logits, "d_logits", logits.dtype, {num_tokens, cfg.num_experts});
    check_same_device(d_logits, "d_logits", logits, "logits");
    if (num_tokens == 0) return;
    SWITCHYARD_DISPATCH(logits.device, route_backward(cfg, logits, topk_ids, d_weights, d_logits),
                        route_backward(cfg, logits, topk_ids, d_weights, d_logits, stream));
}

size_t router_losses_backward_workspace_size(const MoEConfig& cfg, Device device) {
    if (!cuda_workspace(device, 0, "router_losses_backward_workspace_size")) return 0;
    SWITCHYARD_ON_CUDA(router_losses_backward_workspace_size(cfg));
}

void router_losses_backward(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                            const TensorRef& d_losses, const TensorRef& d_logits, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream) {
    cfg.validate();
    SWITCHYARD_CHECK(!cfg.expert_choice(), "router_losses_backward: the aux losses are defined for token choice");
    check_logits(logits, cfg.num_experts, /*allow_f64=*/true);
    const int64_t num_tokens = logits.shape[0];
    check_tensor(topk_ids, "topk_ids", DType::kI32, {num_tokens, cfg.top_k});
    check_same_device(topk_ids, "topk_ids", logits, "logits");
    check_tensor(d_losses, "d_losses", logits.dtype, {2});
    check_same_device(d_losses, "d_losses", logits, "logits");
    check_tensor(d_logits, "d_logits", logits.dtype, {num_tokens, cfg.num_experts});
    check_same_device(d_logits, "d_logits", logits, "logits");
    check_workspace(workspace, workspace_bytes, router_losses_backward_workspace_size(cfg, logits.device),
                    "router_losses_backward");
    if (num_tokens == 0) return;
    SWITCHYARD_DISPATCH(logits.device, router_losses_backward(cfg, logits, topk_ids, d_losses, d_logits),
                        router_losses_backward(cfg, logits, topk_ids, d_losses, d_logits, workspace, workspace_bytes,
                                               stream));
}

// ---- load statistics -----------------------------------------------------------------------------------------------

size_t load_stats_workspace_size(const MoEConfig& cfg, Device device, int64_t num_tokens) {
    if (!cuda_workspace(device, num_tokens, "load_stats_workspace_size")) return 0;
    SWITCHYARD_ON_CUDA(load_stats_workspace_size(cfg, num_tokens));
}

void load_stats(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids, const RoutingPlan& plan,
                LoadStats& stats, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    cfg.validate();
    check_logits(logits, cfg.num_experts, /*allow_f64=*/false);
    const int64_t num_tokens = logits.shape[0], slots = cfg.route_slots();
    check_tensor(topk_ids, "topk_ids", DType::kI32, {num_tokens, slots});
    check_same_device(topk_ids, "topk_ids", logits, "logits");
    check_plan_tensor(plan.expert_counts, "plan.expert_counts", cfg.num_experts, topk_ids);
    check_plan_tensor(plan.expert_offsets, "plan.expert_offsets", cfg.num_experts + 1, topk_ids);
    if (cfg.expert_choice()) {
        check_tensor(plan.slot_row, "plan.slot_row", DType::kI32, {num_tokens, slots});
        check_same_device(plan.slot_row, "plan.slot_row", topk_ids, "topk_ids");
    }
    check_workspace(workspace, workspace_bytes, load_stats_workspace_size(cfg, logits.device, num_tokens),
                    "load_stats");
    SWITCHYARD_DISPATCH(logits.device, load_stats(cfg, logits, topk_ids, plan, stats),
                        load_stats(cfg, logits, topk_ids, plan, stats, workspace, workspace_bytes, stream));
}

// ---- the fused small-batch (decode) path --------------------------------------------------------------------------

namespace {

// The chain that experts_fused stands for, on the CPU backend (the specification), with host scratch; the expert
// GEMMs are MoELayer's (api/expert_chain.h).
void experts_chain_cpu(const MoEConfig& cfg, const TensorRef& x, const MoEWeights& w, const RoutingPlan& plan,
                       const TensorRef& topk_weights, const TensorRef& shared_gate_logits, const TensorRef& y) {
    const int64_t T = x.shape[0], H = cfg.hidden_size, R = plan.row_token.shape[0];
    const size_t es = dtype_size(x.dtype);
    auto host = [&](std::vector<char>& buf, int64_t rows, int64_t cols) {
        buf.assign(static_cast<size_t>(rows * cols) * es + 1, 0);
        return TensorRef(buf.data(), x.dtype, {rows, cols}, Device::kCPU, 0);
    };
    std::vector<char> xp_buf, g1_buf, h_buf, sg1_buf, sh_buf, so_buf;
    const TensorRef xp = host(xp_buf, R, H), h = host(h_buf, R, cfg.ffn_size);
    // GEMM1 with the activation in one step (an interleaved w13) stores no [R, R13] product
    const TensorRef g1 = api::uses_gated_gemm1(cfg, Device::kCPU) ? TensorRef() : host(g1_buf, R, cfg.w13_rows());
    const TensorRef used_rows(plan.expert_offsets.ptr<int32_t>() + cfg.num_experts, DType::kI32, {1}, Device::kCPU, 0);
    gather(x, plan.row_token, xp);
    api::gemm1_activation(cfg, xp, w, plan.expert_offsets, used_rows, g1, h, nullptr, 0, nullptr);
    api::expert_gemm(cfg, h, w.w2, w.w2_scale, w.w2_input_scale, plan.expert_offsets, xp, nullptr, 0, nullptr);
    TensorRef shared;
    if (w.shared_w13.defined()) {
        const TensorRef sg1 = host(sg1_buf, T, cfg.shared_w13_rows()), sh = host(sh_buf, T, cfg.shared_width());
        shared = host(so_buf, T, H);
        api::shared_expert(cfg, x, w, sg1, sh, shared, nullptr, 0, nullptr);
    }
    combine(xp, plan.slot_row, topk_weights, shared, y, nullptr, shared_gate_logits);
}

}  // namespace

bool fused_path_supported(const MoEConfig& cfg, Device device, int64_t num_tokens) {
    const int64_t align = cfg.quant_mode == QuantMode::kNone ? 8 : 16;
    return device == Device::kCUDA && (cfg.dtype == DType::kBF16 || cfg.dtype == DType::kF16) && num_tokens >= 1 &&
           num_tokens <= fused_path_max_tokens() && cfg.num_experts <= 512 && cfg.top_k <= 32 &&
           cfg.hidden_size % align == 0 && cfg.ffn_size % align == 0 && cfg.shared_width() % align == 0;
}

bool fused_path_preferred(const MoEConfig& cfg, Device device, int64_t num_tokens) {
    if (!fused_path_supported(cfg, device, num_tokens)) return false;
    const int64_t elem = cfg.quant_mode == QuantMode::kNone ? static_cast<int64_t>(dtype_size(cfg.dtype)) : 1;
    const int64_t H = cfg.hidden_size;
    const int64_t expert = (cfg.w13_rows() + cfg.ffn_size) * H * elem;
    const int64_t shared = (cfg.shared_w13_rows() + cfg.shared_width()) * H * elem;
    const int64_t experts = std::min(num_tokens * cfg.top_k, cfg.num_experts);
    return experts * expert + shared <= fused_path_auto_bytes(cfg.quant_mode);
}

bool gather_in_gemm1_preferred(const MoEConfig& cfg, Device device, int64_t num_tokens) {
    if (device != Device::kCUDA || !api::uses_gated_gemm1(cfg, device) || cfg.quant_mode != QuantMode::kNone ||
        num_tokens < 1 || cfg.num_experts < 1 || cfg.top_k < 1 || cfg.ffn_size < 1)
        return false;
    const int64_t E = cfg.num_experts;
    const int64_t rows = cfg.expert_choice() ? E * cfg.expert_choice_capacity(num_tokens) : num_tokens * cfg.top_k;
    const int64_t rows_per_expert = (rows + E - 1) / E;
    if (rows_per_expert <= gather_in_gemm1_max_rows()) return true;
    const int64_t x_bytes = num_tokens * cfg.hidden_size * static_cast<int64_t>(dtype_size(cfg.dtype));
    if (rows_per_expert <= 2 * gather_in_gemm1_max_rows() && x_bytes <= gather_in_gemm1_x_bytes()) return true;
    // The separate gather's time (x read, its rows written: (T + rows) * H * 2 bytes at 3.0 TB/s) over GEMM1's
    // (rows * 2F * H * 2 FLOP at 782 TFLOP/s); H cancels.
    constexpr double kFlopPerByte = 782e12 / 3.0e12;
    const double share = static_cast<double>(num_tokens + rows) * 2.0 * kFlopPerByte /
                         (4.0 * static_cast<double>(rows) * static_cast<double>(cfg.ffn_size));
    return share >= gather_in_gemm1_min_share();
}

size_t route_fused_workspace_size(const MoEConfig& cfg, Device device, int64_t num_tokens) {
    if (!cuda_workspace(device, num_tokens, "route_fused_workspace_size")) return 0;
    SWITCHYARD_ON_CUDA(route_fused_workspace_size(cfg, num_tokens));
}

void route_fused(const MoEConfig& cfg, const TensorRef& x, const TensorRef& gate, const TensorRef& score_bias,
                 const TensorRef& shared_gate, const TensorRef& logits, const TensorRef& topk_ids,
                 const TensorRef& topk_weights, const RoutingPlan& plan, const TensorRef& shared_gate_logits,
                 void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    cfg.validate();
    SWITCHYARD_CHECK(!cfg.expert_choice() && cfg.capacity_factor == 0.0,
                     "route_fused: token choice without capacity only (routing=", to_string(cfg.routing_mode),
                     ", capacity_factor=", cfg.capacity_factor, "); run route / route_expert_choice and build_plan");
    check_float_tensor(x, "x", {kAny, cfg.hidden_size});
    const int64_t T = x.shape[0];
    check_float_tensor(gate, "gate", {cfg.num_experts, cfg.hidden_size});
    check_same_device(gate, "gate", x, "x");
    check_cuda_gemm_dtypes(x, "x", gate, "gate");
    if (cfg.use_score_bias) {
        check_tensor(score_bias, "score_bias", DType::kF32, {cfg.num_experts});
        check_same_device(score_bias, "score_bias", x, "x");
    } else {
        SWITCHYARD_CHECK(!score_bias.defined(), "score_bias given but use_score_bias=false");
    }
    SWITCHYARD_CHECK(shared_gate.defined() == shared_gate_logits.defined(),
                     "route_fused: shared_gate and shared_gate_logits go together");
    if (shared_gate.defined()) {
        check_float_tensor(shared_gate, "shared_gate", {1, cfg.hidden_size});
        check_same_device(shared_gate, "shared_gate", x, "x");
        check_cuda_gemm_dtypes(x, "x", shared_gate, "shared_gate");
        check_tensor(shared_gate_logits, "shared_gate_logits", DType::kF32, {T, 1});
        check_same_device(shared_gate_logits, "shared_gate_logits", x, "x");
    }
    check_tensor(logits, "logits", DType::kF32, {T, cfg.num_experts});
    check_same_device(logits, "logits", x, "x");
    check_tensor(topk_ids, "topk_ids", DType::kI32, {T, cfg.top_k});
    check_same_device(topk_ids, "topk_ids", x, "x");
    check_tensor(topk_weights, "topk_weights", DType::kF32, {T, cfg.top_k});
    check_same_device(topk_weights, "topk_weights", x, "x");
    check_plan(cfg, plan, T, cfg.top_k, T * cfg.top_k, topk_ids);
    api::check_backend(x.device, "route_fused");
    check_workspace(workspace, workspace_bytes, route_fused_workspace_size(cfg, x.device, T), "route_fused");
    if (x.device == Device::kCPU) {
        router_gemm(x, gate, logits, nullptr, 0);
        route(cfg, logits, score_bias, topk_ids, topk_weights);
        build_plan(cfg, topk_ids, topk_weights, plan, nullptr, 0);
        if (shared_gate.defined()) router_gemm(x, shared_gate, shared_gate_logits, nullptr, 0);
        return;
    }
    SWITCHYARD_CHECK(fused_path_supported(cfg, x.device, T) || T == 0, "route_fused: the CUDA kernels take bf16/fp16 "
                     "layers of 1..", fused_path_max_tokens(), " tokens with E <= 512 and sizes multiple of 8 (T=", T,
                     ", dtype=", to_string(cfg.dtype), ")");
    SWITCHYARD_CHECK(x.dtype == cfg.dtype, "route_fused: x dtype=", to_string(x.dtype), " differs from the layer dtype ",
                     to_string(cfg.dtype));
    SWITCHYARD_ON_CUDA(route_fused(cfg, x, gate, score_bias, shared_gate, logits, topk_ids, topk_weights, plan,
                                   shared_gate_logits, workspace, workspace_bytes, stream));
}

size_t experts_fused_workspace_size(const MoEConfig& cfg, Device device, int64_t num_tokens) {
    if (!cuda_workspace(device, num_tokens, "experts_fused_workspace_size")) return 0;
    SWITCHYARD_ON_CUDA(experts_fused_workspace_size(cfg, num_tokens));
}

void experts_fused(const MoEConfig& cfg, const TensorRef& x, const MoEWeights& w, const RoutingPlan& plan,
                   const TensorRef& topk_weights, const TensorRef& shared_gate_logits, const TensorRef& y,
                   void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    cfg.validate();
    const int64_t E = cfg.num_experts, H = cfg.hidden_size, F = cfg.ffn_size, slots = cfg.route_slots();
    check_float_tensor(x, "x", {kAny, H});
    const int64_t T = x.shape[0];
    const int64_t R = cfg.expert_choice() ? E * cfg.expert_choice_capacity(T) : T * cfg.top_k;
    const bool fp8 = cfg.quant_mode != QuantMode::kNone;
    // A weight matrix: float of x's dtype on CUDA (any float dtype on the CPU), or fp8 e4m3 with its scales (the
    // shapes MoELayer's constructor checks; their values it checks there too).
    auto check_matrix = [&](const TensorRef& m, std::initializer_list<int64_t> dims, const char* name,
                            const TensorRef& scale, const char* scale_name, int64_t groups) {
        if (m.dtype == DType::kF8E4M3) {
            SWITCHYARD_CHECK(fp8, "experts_fused: ", name, " is fp8e4m3 but quant_mode=none");
            check_tensor(m, name, DType::kF8E4M3, dims);
            const int64_t rows = *(dims.end() - 2), cols = *(dims.end() - 1);
            if (cfg.quant_mode == QuantMode::kFP8Block) {
                if (groups > 0)
                    check_tensor(scale, scale_name, DType::kF32, {groups, fp8_blocks(rows), fp8_blocks(cols)});
                else
                    check_tensor(scale, scale_name, DType::kF32, {fp8_blocks(rows), fp8_blocks(cols)});
            } else {
                check_tensor(scale, scale_name, DType::kF32, {groups > 0 ? groups : 1});
            }
            check_same_device(scale, scale_name, x, "x");
        } else {
            check_float_tensor(m, name, dims);
            check_cuda_gemm_dtypes(x, "x", m, name);
            SWITCHYARD_CHECK(!scale.defined(), "experts_fused: ", scale_name, " given but ", name, " is not fp8");
        }
        check_same_device(m, name, x, "x");
    };
    check_matrix(w.w13, {E, cfg.w13_rows(), H}, "w13", w.w13_scale, "w13_scale", E);
    check_matrix(w.w2, {E, H, F}, "w2", w.w2_scale, "w2_scale", E);
    SWITCHYARD_CHECK(!fp8 || (w.w13.dtype == DType::kF8E4M3 && w.w2.dtype == DType::kF8E4M3),
                     "experts_fused: quant_mode=", to_string(cfg.quant_mode), " needs fp8e4m3 w13 and w2");
    SWITCHYARD_CHECK(!w.w13_input_scale.defined() && !w.w2_input_scale.defined() &&
                         !w.shared_w13_input_scale.defined() && !w.shared_w2_input_scale.defined(),
                     "experts_fused: static input scales are not supported (the staged path takes them)");
    check_tensor(topk_weights, "topk_weights", DType::kF32, {T, slots});
    check_same_device(topk_weights, "topk_weights", x, "x");
    check_plan(cfg, plan, T, slots, R, topk_weights);
    SWITCHYARD_CHECK(w.shared_w13.defined() == w.shared_w2.defined(),
                     "experts_fused: shared_w13 and shared_w2 go together");
    SWITCHYARD_CHECK(!shared_gate_logits.defined() || w.shared_w13.defined(),
                     "experts_fused: shared_gate_logits given without a shared expert");
    if (w.shared_w13.defined()) {
        SWITCHYARD_CHECK(cfg.shared_width() > 0, "experts_fused: shared expert weights given but the config has none");
        check_matrix(w.shared_w13, {cfg.shared_w13_rows(), H}, "shared_w13", w.shared_w13_scale, "shared_w13_scale", 0);
        check_matrix(w.shared_w2, {H, cfg.shared_width()}, "shared_w2", w.shared_w2_scale, "shared_w2_scale", 0);
        if (shared_gate_logits.defined()) {
            check_tensor(shared_gate_logits, "shared_gate_logits", DType::kF32, {T, 1});
            check_same_device(shared_gate_logits, "shared_gate_logits", x, "x");
        }
    }
    check_tensor(y, "y", x.dtype, {T, H});
    check_same_device(y, "y", x, "x");
    api::check_backend(x.device, "experts_fused");
    check_workspace(workspace, workspace_bytes, experts_fused_workspace_size(cfg, x.device, T), "experts_fused");
    if (x.device == Device::kCPU) {
        experts_chain_cpu(cfg, x, w, plan, topk_weights, shared_gate_logits, y);
        return;
    }
    SWITCHYARD_CHECK(fused_path_supported(cfg, x.device, T) || T == 0, "experts_fused: the CUDA kernels take "
                     "bf16/fp16 layers of 1..", fused_path_max_tokens(), " tokens with E <= 512 and sizes multiple "
                     "of 8 (16 for FP8) (T=", T, ", dtype=", to_string(cfg.dtype), ")");
    SWITCHYARD_CHECK(x.dtype == cfg.dtype, "experts_fused: x dtype=", to_string(x.dtype),
                     " differs from the layer dtype ", to_string(cfg.dtype));
    SWITCHYARD_CHECK(!fp8 || !w.shared_w13.defined() || w.shared_w13.dtype == DType::kF8E4M3,
                     "experts_fused: on CUDA a shared expert beside FP8 experts must be FP8 too (the staged path "
                     "takes a float one)");
    SWITCHYARD_ON_CUDA(experts_fused(cfg, x, w, plan, topk_weights, shared_gate_logits, y, workspace, workspace_bytes,
                                     stream));
}

}  // namespace switchyard
