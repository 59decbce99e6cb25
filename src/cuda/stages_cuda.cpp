// src/cuda/stages_cuda.cpp: the CUDA backend of switchyard/stages.h (declared in src/cuda/stages_cuda.h).
//
// Adapters from checked TensorRefs to the raw-pointer launchers; each makes the tensors' device current for the
// call (DeviceGuard) and enqueues on the caller's stream. Workspace layouts are carved here with WorkspaceCarver,
// the same function sizing and partitioning them.
#include "cuda/stages_cuda.h"

#include <tuple>
#include <vector>

#include "cuda/backward/backward.h"
#include "cuda/common.cuh"
#include "cuda/gemm/grouped_gemm.h"
#include "cuda/moe_stages.h"
#include "cuda/routing/balance.h"

namespace switchyard {
namespace cuda {

int device_count() {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
        cudaGetLastError();  // clear the error so later calls start clean
        return 0;
    }
    SWITCHYARD_CUDA_CHECK(err);
    return n;
}

namespace stage {
namespace {

template <typename T>
T* ptr_or_null(const TensorRef& t) {
    return t.defined() ? static_cast<T*>(t.data) : nullptr;
}

// GroupedGemmArgs or GroupedGemmGradArgs with the sizes set (operand pointers left to the caller).
template <typename Args>
Args sized(DType dtype, int64_t num_groups, int64_t n, int64_t k, int64_t max_rows, const int32_t* offsets = nullptr) {
    Args g;
    std::tie(g.dtype, g.num_groups, g.n, g.k, g.max_rows, g.offsets) =
        std::make_tuple(dtype, num_groups, n, k, max_rows, offsets);
    return g;
}

// The two gradient GEMMs: dgrad (operand = b [E, N, K], out = da) or wgrad (operand = a, out = db [E, N, K]).
void run_grad(bool dgrad, const TensorRef& dc, const TensorRef& operand, const TensorRef& offsets,
              const TensorRef& out, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    DeviceGuard guard(dc.device_index);
    const TensorRef& enk = dgrad ? operand : out;
    auto g = sized<GroupedGemmGradArgs>(dc.dtype, enk.shape[0], enk.shape[1], enk.shape[2], dc.shape[0],
                                        offsets.ptr<int32_t>());
    g.dc = dc.data;
    (dgrad ? g.b : g.a) = operand.data;
    if (dgrad) {
        g.da = out.data;
        cuda::grouped_gemm_dgrad(g, workspace, workspace_bytes, stream);
    } else {
        g.db = out.data;
        cuda::grouped_gemm_wgrad(g, workspace, workspace_bytes, stream);
    }
}

// Statistics scratch of load_stats: ids / weights of a token-choice routing pass (its partial sums are what is
// wanted), per-block partials and the reduced sums.
struct StatsLayout {
    int32_t* ids;
    float* weights;
    double* prob_partials;  // [blocks, E]
    double* z_partials;     // [blocks]
    double* sums;           // [E + 1]: prob sums, then the z sum
};

StatsLayout stats_layout(WorkspaceCarver& wc, const MoEConfig& cfg, int64_t num_tokens) {
    StatsLayout l{};
    const int64_t E = cfg.num_experts;
    l.ids = wc.take<int32_t>(num_tokens * cfg.top_k);
    l.weights = wc.take<float>(num_tokens * cfg.top_k);
    const int blocks = router_stat_blocks(num_tokens);
    l.prob_partials = wc.take<double>(static_cast<size_t>(blocks) * E);
    l.z_partials = wc.take<double>(blocks);
    l.sums = wc.take<double>(E + 1);
    return l;
}

}  // namespace

size_t router_gemm_workspace_size() { return kCublasWorkspaceBytes; }

void router_gemm(const TensorRef& x, const TensorRef& gate, const TensorRef& logits, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream) {
    (void)workspace_bytes;
    DeviceGuard guard(x.device_index);
    cuda::router_gemm(x.dtype, x.data, gate.data, x.shape[0], x.shape[1], gate.shape[0], logits.ptr<float>(),
                      workspace, stream);
}

size_t router_gemm_backward_workspace_size(DType dtype, int64_t num_tokens, int64_t num_experts, int64_t hidden) {
    return cuda::router_gemm_backward_workspace_size(dtype, num_tokens, num_experts, hidden);
}

void router_gemm_backward(const TensorRef& x, const TensorRef& gate, const TensorRef& d_logits, const TensorRef& dx,
                          const TensorRef& dgate, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    DeviceGuard guard(x.device_index);
    cuda::router_gemm_backward(x.dtype, x.data, gate.data, d_logits.ptr<float>(), x.shape[0], x.shape[1],
                               gate.shape[0], ptr_or_null<void>(dx), ptr_or_null<void>(dgate), workspace,
                               workspace_bytes, stream);
}

void route(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& score_bias, const TensorRef& topk_ids,
           const TensorRef& topk_weights, cudaStream_t stream) {
    DeviceGuard guard(logits.device_index);
    route_topk(cfg, logits.ptr<float>(), cfg.use_score_bias ? score_bias.ptr<float>() : nullptr, logits.shape[0],
               topk_ids.ptr<int32_t>(), topk_weights.ptr<float>(), nullptr, nullptr, stream);
}

size_t route_expert_choice_workspace_size(const MoEConfig& cfg, int64_t num_tokens) {
    return expert_choice_workspace_size(num_tokens, cfg.num_experts);
}

void route_expert_choice(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                         const TensorRef& topk_weights, const RoutingPlan& plan, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
    DeviceGuard guard(logits.device_index);
    ExpertChoiceArgs ea;
    ea.num_tokens = logits.shape[0];
    ea.logits = logits.ptr<float>();
    ea.topk_ids = topk_ids.ptr<int32_t>();
    ea.topk_weights = topk_weights.ptr<float>();
    ea.expert_counts = plan.expert_counts.ptr<int32_t>();
    ea.expert_offsets = plan.expert_offsets.ptr<int32_t>();
    ea.slot_row = plan.slot_row.ptr<int32_t>();
    ea.row_token = plan.row_token.ptr<int32_t>();
    ea.row_slot = plan.row_slot.ptr<int32_t>();
    expert_choice_plan(cfg, ea, workspace, workspace_bytes, stream);
}

size_t plan_workspace_size(const MoEConfig& cfg, int64_t num_tokens) {
    return cuda::plan_workspace_size(num_tokens, cfg.top_k, cfg.num_experts);
}

void build_plan(const MoEConfig& cfg, const TensorRef& topk_ids, const TensorRef& topk_weights,
                const RoutingPlan& plan, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    DeviceGuard guard(topk_ids.device_index);
    const int64_t num_tokens = topk_ids.shape[0];
    PlanArgs pa;
    pa.num_tokens = num_tokens;
    pa.top_k = cfg.top_k;
    pa.num_experts = cfg.num_experts;
    pa.capacity = cfg.capacity(num_tokens);
    pa.drop_policy = cfg.drop_policy;
    pa.topk_ids = topk_ids.ptr<int32_t>();
    pa.topk_weights = topk_weights.ptr<float>();
    pa.expert_counts = plan.expert_counts.ptr<int32_t>();
    pa.expert_offsets = plan.expert_offsets.ptr<int32_t>();
    pa.slot_row = plan.slot_row.ptr<int32_t>();
    pa.row_token = plan.row_token.ptr<int32_t>();
    pa.row_slot = plan.row_slot.ptr<int32_t>();
    cuda::build_plan(pa, workspace, workspace_bytes, stream);
}

void gather(const TensorRef& x, const TensorRef& row_token, const TensorRef& xp, cudaStream_t stream,
            const TensorRef& slot_row) {
    DeviceGuard guard(x.device_index);
    if (slot_row.defined()) {
        scatter_token_rows(x.dtype, x.data, slot_row.ptr<int32_t>(), x.shape[0], slot_row.shape[1],
                           row_token.ptr<int32_t>(), xp.shape[0], x.shape[1], xp.data, stream);
        return;
    }
    permute_rows(x.dtype, x.data, row_token.ptr<int32_t>(), xp.shape[0], x.shape[1], xp.data, stream,
                 /*zero_unowned=*/true);
}

void gather_backward(const TensorRef& d_xp, const TensorRef& slot_row, const TensorRef& dx, cudaStream_t stream) {
    DeviceGuard guard(d_xp.device_index);
    gather_backward_rows(d_xp.dtype, d_xp.data, slot_row.ptr<int32_t>(), slot_row.shape[0], slot_row.shape[1],
                         d_xp.shape[0], d_xp.shape[1], dx.data, stream);
}

size_t grouped_gemm_workspace_size(DType dtype, int64_t num_groups, int64_t n, int64_t k, int64_t max_rows) {
    return cuda::grouped_gemm_workspace_size(sized<GroupedGemmArgs>(dtype, num_groups, n, k, max_rows)) +
           align_up(2 * sizeof(int32_t));
}

namespace {

// A's rows read through row_index (optional; GroupedGemmOptions::row_index): a is then x, of a.shape[0] rows.
void gather_a_rows(GroupedGemmArgs& g, const TensorRef& a, const TensorRef& row_index) {
    if (!row_index.defined()) return;
    g.a_row_index = row_index.ptr<int32_t>();
    g.a_rows = a.shape[0];
}

// cuda::grouped_gemm for g (operands and sizes set; max_rows = a's rows) with the plan's offsets or, undefined, one
// group of all rows (written into the front of the workspace); then c's rows past offsets[E] ([max_rows, c_cols])
// zeroed when asked.
void run_grouped_gemm(GroupedGemmArgs g, const TensorRef& offsets, int64_t c_cols, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream, bool zero_unowned_rows) {
    WorkspaceCarver wc(workspace, workspace_bytes);
    int32_t* single = wc.take<int32_t>(2);
    if (offsets.defined()) {
        g.offsets = offsets.ptr<int32_t>();
    } else {
        write_single_group_offsets(single, g.max_rows, stream);
        g.offsets = single;
    }
    if (g.max_rows == 0) return;
    const size_t gemm_bytes = cuda::grouped_gemm_workspace_size(g);
    cuda::grouped_gemm(g, wc.take_bytes(gemm_bytes), gemm_bytes, stream);
    if (!zero_unowned_rows) return;
    zero_rows_past_groups(g.c, g.dtype, g.offsets, g.num_groups, c_cols, g.max_rows, stream);
    if (g.gate_up_out != nullptr) {  // the gated epilogue's kept product, [max_rows, N]
        zero_rows_past_groups(g.gate_up_out, g.dtype, g.offsets, g.num_groups, g.n, g.max_rows, stream);
    }
}

}  // namespace

void grouped_gemm(const TensorRef& a, const TensorRef& b, const TensorRef& offsets, const TensorRef& c,
                  void* workspace, size_t workspace_bytes, cudaStream_t stream, bool zero_unowned_rows,
                  const TensorRef& row_index) {
    DeviceGuard guard(a.device_index);
    const int64_t groups = b.rank == 3 ? b.shape[0] : 1, n = b.shape[b.rank - 2], k = b.shape[b.rank - 1];
    auto g = sized<GroupedGemmArgs>(a.dtype, groups, n, k, c.shape[0]);
    gather_a_rows(g, a, row_index);
    g.a = a.data;
    g.b = b.data;
    g.c = c.data;
    run_grouped_gemm(g, offsets, n, workspace, workspace_bytes, stream, zero_unowned_rows);
}

size_t grouped_gemm_gated_workspace_size(DType dtype, int64_t num_groups, int64_t ffn, int64_t k, int64_t max_rows) {
    auto g = sized<GroupedGemmArgs>(dtype, num_groups, 2 * ffn, k, max_rows);
    g.gated = true;
    return cuda::grouped_gemm_workspace_size(g) + align_up(2 * sizeof(int32_t));
}

void grouped_gemm_gated(Activation act, const TensorRef& a, const TensorRef& w13i, const TensorRef& offsets,
                        const TensorRef& h, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                        bool zero_unowned_rows, const TensorRef& row_index, const TensorRef& gate_up) {
    DeviceGuard guard(a.device_index);
    const int64_t groups = w13i.rank == 3 ? w13i.shape[0] : 1, n = w13i.shape[w13i.rank - 2];
    auto g = sized<GroupedGemmArgs>(a.dtype, groups, n, w13i.shape[w13i.rank - 1], h.shape[0]);
    g.gated = true;
    gather_a_rows(g, a, row_index);
    g.activation = act;
    g.a = a.data;
    g.b = w13i.data;
    g.c = h.data;
    g.gate_up_out = gate_up.defined() ? gate_up.data : nullptr;
    run_grouped_gemm(g, offsets, n / 2, workspace, workspace_bytes, stream, zero_unowned_rows);
}

void interleave_gate_up(const TensorRef& w13, const TensorRef& w13i, bool inverse, cudaStream_t stream) {
    DeviceGuard guard(w13.device_index);
    const int64_t groups = w13.rank == 3 ? w13.shape[0] : 1;
    interleave_gate_up_rows(w13.data, w13i.data, groups, w13.shape[w13.rank - 2],
                            w13.shape[w13.rank - 1] * static_cast<int64_t>(dtype_size(w13.dtype)), inverse, stream);
}

namespace {

// The FP8 GEMM's workspace: one function sizes (null base) and partitions it.
struct Fp8Layout {
    int32_t* single;  // [2] offsets {0, R} of a one-group call (undefined offsets)
    void* q;          // [R, K] e4m3
    float* sfa;       // [R * Kb]
    float* sfb;       // [E * Kb * Nb]
    void* gemm;       // grouped_gemm_fp8's arrays and CUTLASS workspace
    size_t gemm_bytes;
};

Fp8Layout grouped_gemm_fp8_layout(WorkspaceCarver& wc, int64_t groups, int64_t n, int64_t k, int64_t rows) {
    Fp8Layout l{};
    const int64_t kb = fp8_blocks(k), nb = fp8_blocks(n);
    l.single = wc.take<int32_t>(2);
    l.q = wc.take_bytes(static_cast<size_t>(rows * k));
    l.sfa = wc.take<float>(rows * kb);
    l.sfb = wc.take<float>(groups * kb * nb);
    l.gemm_bytes = cuda::grouped_gemm_fp8_workspace_size(groups);
    l.gemm = wc.take_bytes(l.gemm_bytes);
    return l;
}

}  // namespace

size_t grouped_gemm_fp8_workspace_size(int64_t num_groups, int64_t n, int64_t k, int64_t max_rows) {
    WorkspaceCarver wc;
    grouped_gemm_fp8_layout(wc, num_groups, n, k, max_rows);
    return wc.used();
}

void check_fp8_gemm_shape(const char* what, DType out_dtype, int64_t n, int64_t k) {
    check_fp8_gemm_sizes(what, out_dtype, 1, n, k, 0);
}

void grouped_gemm_fp8(const TensorRef& a, const TensorRef& b, const TensorRef& b_scale, const TensorRef& input_scale,
                      const TensorRef& offsets, const TensorRef& c, QuantMode mode, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream, bool zero_unowned_rows) {
    DeviceGuard guard(a.device_index);
    const int64_t groups = b.rank == 3 ? b.shape[0] : 1, n = b.shape[b.rank - 2], k = b.shape[b.rank - 1];
    const int64_t rows = a.shape[0];
    check_fp8_gemm_sizes("grouped_gemm_fp8", c.dtype, groups, n, k, rows);  // before anything is enqueued
    const bool per_tensor = mode == QuantMode::kFP8Tensor;
    WorkspaceCarver wc(workspace, workspace_bytes);
    const Fp8Layout l = grouped_gemm_fp8_layout(wc, groups, n, k, rows);
    const int32_t* offs = offsets.defined() ? offsets.ptr<int32_t>() : l.single;
    if (!offsets.defined()) write_single_group_offsets(l.single, rows, stream);
    if (rows == 0) return;
    quantize_rows_fp8(a.dtype, a.data, rows, k, offs, groups, per_tensor, ptr_or_null<const float>(input_scale), l.q,
                      l.sfa, stream);
    fp8_weight_scales_mn_major(b_scale.ptr<float>(), per_tensor, groups, fp8_blocks(n), fp8_blocks(k), l.sfb, stream);
    Fp8GroupedGemmArgs g;
    g.qa = l.q;
    g.sfa = l.sfa;
    g.b = b.data;
    g.sfb = l.sfb;
    g.d = c.data;
    g.out_dtype = c.dtype;
    std::tie(g.num_groups, g.n, g.k, g.max_rows, g.offsets) = std::make_tuple(groups, n, k, rows, offs);
    cuda::grouped_gemm_fp8(g, l.gemm, l.gemm_bytes, stream);
    if (zero_unowned_rows) zero_rows_past_groups(c.data, c.dtype, offs, groups, n, rows, stream);
}

int64_t fp8_first_nan_code(const TensorRef& codes) {
    DeviceGuard guard(codes.device_index);
    return cuda::fp8_first_nan_code(codes.data, codes.numel());
}

std::vector<float> copy_f32_to_host(const TensorRef& t) {
    DeviceGuard guard(t.device_index);
    std::vector<float> host(static_cast<size_t>(t.numel()));
    if (!host.empty()) {
        SWITCHYARD_CUDA_CHECK(cudaDeviceSynchronize());  // written on any stream: wait for the device
        SWITCHYARD_CUDA_CHECK(cudaMemcpy(host.data(), t.data, sizeof(float) * host.size(), cudaMemcpyDeviceToHost));
    }
    return host;
}

void copy_bytes_to_host(const TensorRef& t, int64_t offset, int64_t bytes, void* dst) {
    DeviceGuard guard(t.device_index);
    SWITCHYARD_CUDA_CHECK(cudaDeviceSynchronize());
    SWITCHYARD_CUDA_CHECK(cudaMemcpy(dst, static_cast<const char*>(t.data) + offset, static_cast<size_t>(bytes),
                                     cudaMemcpyDeviceToHost));
}

size_t grouped_gemm_grad_workspace_size(DType dtype, int64_t num_groups, int64_t n, int64_t k, int64_t max_rows) {
    return cuda::grouped_gemm_grad_workspace_size(sized<GroupedGemmGradArgs>(dtype, num_groups, n, k, max_rows));
}

void grouped_gemm_dgrad(const TensorRef& dc, const TensorRef& b, const TensorRef& offsets, const TensorRef& da,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    run_grad(true, dc, b, offsets, da, workspace, workspace_bytes, stream);
}

void grouped_gemm_wgrad(const TensorRef& dc, const TensorRef& a, const TensorRef& offsets, const TensorRef& db,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    run_grad(false, dc, a, offsets, db, workspace, workspace_bytes, stream);
}

void activation(Activation act, const TensorRef& g, const TensorRef& h, const TensorRef& num_rows,
                cudaStream_t stream, bool gate_up_interleaved) {
    DeviceGuard guard(g.device_index);
    activation_rows(act, g.dtype, g.data, g.shape[0], ptr_or_null<const int32_t>(num_rows), h.shape[1], h.data,
                    stream, gate_up_interleaved);
}

void activation_backward(Activation act, const TensorRef& g, const TensorRef& dh, const TensorRef& dg,
                         cudaStream_t stream, bool gate_up_interleaved) {
    DeviceGuard guard(g.device_index);
    activation_backward_rows(act, g.dtype, g.data, dh.data, g.shape[0], dh.shape[1], dg.data, stream,
                             gate_up_interleaved);
}

void grouped_gemm_dgrad_activation(Activation act, const TensorRef& dc, const TensorRef& w2, const TensorRef& offsets,
                                   const TensorRef& g, const TensorRef& dg, const TensorRef& h, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream, bool gate_up_interleaved) {
    DeviceGuard guard(dc.device_index);
    const int64_t rows = dc.shape[0], groups = w2.shape[0], ffn = w2.shape[2];
    // The dgrad into h (dh held there), then one element-wise pass that reads g and dh once and writes dg and the
    // recomputed h over dh (a dgrad with the activation's backward in its epilogue measured 1.2-2.8x slower than
    // the separate kernels on an H100: bench/NOTES.md, "The backward's element-wise passes"). Rows past
    // offsets[E] (num_rows): dg written as 0, h left as the dgrad's zeros.
    const int32_t* owned = offsets.ptr<int32_t>() + groups;
    run_grad(true, dc, w2, offsets, h, workspace, workspace_bytes, stream);
    activation_backward_rows(act, g.dtype, g.data, h.data, rows, ffn, dg.data, stream, gate_up_interleaved, h.data,
                             owned);
}

void combine(const TensorRef& expert_out, const TensorRef& slot_row, const TensorRef& weights,
             const TensorRef& shared, const TensorRef& shared_gate, const TensorRef& y, cudaStream_t stream) {
    DeviceGuard guard(expert_out.device_index);
    combine_rows(expert_out.dtype, expert_out.data, slot_row.ptr<int32_t>(), weights.ptr<float>(),
                 ptr_or_null<const void>(shared), slot_row.shape[0], slot_row.shape[1], expert_out.shape[0],
                 expert_out.shape[1], y.data, stream, ptr_or_null<const float>(shared_gate));
}

void combine_backward(const TensorRef& dy, const TensorRef& expert_out, const TensorRef& slot_row,
                      const TensorRef& weights, const TensorRef& d_out, const TensorRef& d_weights,
                      cudaStream_t stream, const TensorRef& num_rows) {
    DeviceGuard guard(dy.device_index);
    // Rows no pair points at get a zero gradient: the kernel writes only the rows pairs point at. With num_rows those
    // are the rows past num_rows[0].
    if (num_rows.defined()) {
        zero_rows_past_groups(d_out.data, d_out.dtype, num_rows.ptr<int32_t>(), 0, d_out.shape[1], d_out.shape[0],
                              stream);
    } else if (d_out.numel() > 0) {
        SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(d_out.data, 0, d_out.nbytes(), stream));
    }
    combine_backward_rows(expert_out.dtype, dy.data, expert_out.data, slot_row.ptr<int32_t>(), weights.ptr<float>(),
                          slot_row.shape[0], slot_row.shape[1], expert_out.shape[0], expert_out.shape[1], d_out.data,
                          d_weights.ptr<float>(), stream);
}

void route_backward(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                    const TensorRef& d_weights, const TensorRef& d_logits, cudaStream_t stream) {
    DeviceGuard guard(logits.device_index);
    cuda::route_backward(cfg, logits.ptr<float>(), topk_ids.ptr<int32_t>(), d_weights.ptr<float>(), logits.shape[0],
                         d_logits.ptr<float>(), stream);
}

size_t router_losses_backward_workspace_size(const MoEConfig& cfg) {
    return cuda::router_losses_backward_workspace_size(cfg.num_experts);
}

void router_losses_backward(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                            const TensorRef& d_losses, const TensorRef& d_logits, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream) {
    DeviceGuard guard(logits.device_index);
    cuda::router_losses_backward(cfg, logits.ptr<float>(), topk_ids.ptr<int32_t>(), logits.shape[0],
                                 d_losses.ptr<float>(), d_logits.ptr<float>(), workspace, workspace_bytes, stream);
}

size_t load_stats_workspace_size(const MoEConfig& cfg, int64_t num_tokens) {
    WorkspaceCarver wc;
    stats_layout(wc, cfg, num_tokens);
    return wc.used();
}

void load_stats(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids, const RoutingPlan& plan,
                LoadStats& stats, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    (void)topk_ids;
    DeviceGuard guard(logits.device_index);
    const int64_t T = logits.shape[0], E = cfg.num_experts, slots = cfg.route_slots();
    WorkspaceCarver wc(workspace, workspace_bytes);
    const StatsLayout l = stats_layout(wc, cfg, T);
    // mean_prob and the z-loss do not depend on the selection: a token-choice routing pass over the same logits
    // computes their per-block partials (its ids and weights go to scratch).
    MoEConfig tc = cfg;
    tc.routing_mode = RoutingMode::kTokenChoice;
    tc.use_score_bias = false;
    route_topk(tc, logits.ptr<float>(), nullptr, T, l.ids, l.weights, l.prob_partials, l.z_partials, stream);
    reduce_router_stats(l.prob_partials, l.z_partials, router_stat_blocks(T), E, l.sums, l.sums + E, stream);
    std::vector<int32_t> counts(E), offsets(E + 1);
    std::vector<double> sums(E + 1);
    SWITCHYARD_CUDA_CHECK(cudaMemcpyAsync(counts.data(), plan.expert_counts.data, sizeof(int32_t) * E,
                                          cudaMemcpyDeviceToHost, stream));
    SWITCHYARD_CUDA_CHECK(cudaMemcpyAsync(offsets.data(), plan.expert_offsets.data, sizeof(int32_t) * (E + 1),
                                          cudaMemcpyDeviceToHost, stream));
    SWITCHYARD_CUDA_CHECK(
        cudaMemcpyAsync(sums.data(), l.sums, sizeof(double) * (E + 1), cudaMemcpyDeviceToHost, stream));
    std::vector<int32_t> slot_row;
    if (cfg.expert_choice() && T > 0) {
        slot_row.resize(static_cast<size_t>(T * slots));
        SWITCHYARD_CUDA_CHECK(cudaMemcpyAsync(slot_row.data(), plan.slot_row.data, sizeof(int32_t) * T * slots,
                                              cudaMemcpyDeviceToHost, stream));
    }
    SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(stream));
    stats = LoadStats();
    stats.num_tokens = T;
    stats.top_k = cfg.top_k;
    stats.expert_counts.assign(counts.begin(), counts.end());
    stats.kept_counts.resize(E);
    for (int64_t e = 0; e < E; ++e) stats.kept_counts[e] = offsets[e + 1] - offsets[e];
    stats.mean_prob.assign(E, 0.0);
    if (T > 0) {
        for (int64_t e = 0; e < E; ++e) stats.mean_prob[e] = sums[e] / static_cast<double>(T);
        stats.z_loss = sums[E] / static_cast<double>(T);
    }
    if (cfg.expert_choice()) {  // nothing is dropped; count the tokens no expert took
        stats.dropped = 0;
        for (int64_t t = 0; t < T; ++t) {
            bool any = false;
            for (int64_t e = 0; e < slots && !any; ++e) any = slot_row[t * slots + e] >= 0;
            if (!any) ++stats.unrouted_tokens;
        }
    } else {
        stats.dropped = T * cfg.top_k - offsets[E];
    }
    finalize_load_stats(cfg, stats);
}

// ---- the fused small-batch path -------------------------------------------------------------------------------------

namespace {

int64_t fused_rows(const MoEConfig& cfg, int64_t num_tokens) {
    return cfg.expert_choice() ? cfg.num_experts * cfg.expert_choice_capacity(num_tokens) : num_tokens * cfg.top_k;
}

struct FusedScratch {
    void* h;
    void* shared_h;
    DecodeFp8Scratch fp8;
};

FusedScratch carve_fused(WorkspaceCarver& wc, const MoEConfig& cfg, int64_t num_tokens) {
    const size_t es = dtype_size(cfg.dtype);
    const int64_t rows = fused_rows(cfg, num_tokens);
    FusedScratch s{};
    s.h = wc.take_bytes(static_cast<size_t>(rows * cfg.ffn_size) * es);
    s.shared_h = wc.take_bytes(static_cast<size_t>(num_tokens * cfg.shared_width()) * es);
    if (cfg.quant_mode != QuantMode::kNone)
        s.fp8 = carve_decode_fp8(wc, num_tokens, cfg.hidden_size, cfg.ffn_size, rows, cfg.shared_width());
    return s;
}

}  // namespace

size_t route_fused_workspace_size(const MoEConfig& cfg, int64_t num_tokens) {
    const int64_t rows = cfg.num_experts + (cfg.shared_expert_gate && cfg.shared_width() > 0 ? 1 : 0);
    return decode_route_workspace_size(num_tokens, rows, cfg.hidden_size);
}

void route_fused(const MoEConfig& cfg, const TensorRef& x, const TensorRef& gate, const TensorRef& score_bias,
                 const TensorRef& shared_gate, const TensorRef& logits, const TensorRef& topk_ids,
                 const TensorRef& topk_weights, const RoutingPlan& plan, const TensorRef& shared_gate_logits,
                 void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    DeviceGuard guard(x.device_index);
    DecodeRouteArgs a;
    a.dtype = x.dtype;
    a.x = x.data;
    a.gate = gate.data;
    a.shared_gate = ptr_or_null<const void>(shared_gate);
    a.bias = ptr_or_null<const float>(score_bias);
    a.num_tokens = x.shape[0];
    a.hidden = x.shape[1];
    a.logits = logits.ptr<float>();
    a.shared_gate_logits = shared_gate_logits.defined() ? shared_gate_logits.ptr<float>() : nullptr;
    a.topk_ids = topk_ids.ptr<int32_t>();
    a.topk_weights = topk_weights.ptr<float>();
    a.expert_counts = plan.expert_counts.ptr<int32_t>();
    a.expert_offsets = plan.expert_offsets.ptr<int32_t>();
    a.slot_row = plan.slot_row.ptr<int32_t>();
    a.row_token = plan.row_token.ptr<int32_t>();
    a.row_slot = plan.row_slot.ptr<int32_t>();
    // The partial logits need as many bytes as the size function says for this gate (with or without the shared row).
    const int64_t rows = cfg.num_experts + (shared_gate.defined() ? 1 : 0);
    SWITCHYARD_CHECK(workspace_bytes >= decode_route_workspace_size(x.shape[0], rows, cfg.hidden_size),
                     "route_fused: workspace of ", workspace_bytes, " bytes is too small");
    decode_route(cfg, a, workspace, workspace_bytes, stream);
}

size_t experts_fused_workspace_size(const MoEConfig& cfg, int64_t num_tokens) {
    WorkspaceCarver wc;
    carve_fused(wc, cfg, num_tokens);
    return wc.used();
}

void experts_fused(const MoEConfig& cfg, const TensorRef& x, const MoEWeights& w, const RoutingPlan& plan,
                   const TensorRef& topk_weights, const TensorRef& shared_gate_logits, const TensorRef& y,
                   void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    DeviceGuard guard(x.device_index);
    const int64_t T = x.shape[0];
    WorkspaceCarver wc(workspace, workspace_bytes);
    const FusedScratch s = carve_fused(wc, cfg, T);
    DecodeExpertsArgs a;
    a.dtype = x.dtype;
    a.quant_mode = cfg.quant_mode;
    a.activation = cfg.activation;
    a.num_tokens = T;
    a.num_experts = cfg.num_experts;
    a.hidden = cfg.hidden_size;
    a.ffn = cfg.ffn_size;
    a.shared_ffn = w.shared_w13.defined() ? cfg.shared_width() : 0;
    a.max_rows = fused_rows(cfg, T);
    a.x = x.data;
    a.w13 = w.w13.data;
    a.gate_up_interleaved = cfg.gate_up_interleaved;
    a.w2 = w.w2.data;
    a.expert_offsets = plan.expert_offsets.ptr<int32_t>();
    a.row_token = plan.row_token.ptr<int32_t>();
    a.row_slot = plan.row_slot.ptr<int32_t>();
    a.topk_weights = topk_weights.ptr<float>();
    a.shared_w13 = ptr_or_null<const void>(w.shared_w13);
    a.shared_w2 = ptr_or_null<const void>(w.shared_w2);
    a.shared_gate = shared_gate_logits.defined() ? shared_gate_logits.ptr<float>() : nullptr;
    a.h = s.h;
    a.shared_h = s.shared_h;
    a.y = y.data;
    a.w13_scale = ptr_or_null<const float>(w.w13_scale);
    a.w2_scale = ptr_or_null<const float>(w.w2_scale);
    a.shared_w13_scale = ptr_or_null<const float>(w.shared_w13_scale);
    a.shared_w2_scale = ptr_or_null<const float>(w.shared_w2_scale);
    a.fp8 = s.fp8;
    decode_experts(a, stream);
}

}  // namespace stage
}  // namespace cuda
}  // namespace switchyard
