// src/cuda/moe_cuda.cu: the CUDA backend's entry points (src/cuda/moe_cuda.h): workspace sizing and the
// orchestration of a whole MoE forward and of the router alone.
//
// Stages (each in an NVTX range of the same name, all on the caller's stream, no allocation, no host sync):
//   router     logits [T, E] fp32 (cuBLAS; or router_fused: one kernel for E <= 16), ids / weights [T, k]
//              (route_topk), statistics partials if asked
//   plan       expert_counts, expert_offsets, slot_row, row_token, row_slot (build_plan)
//   dispatch   xp [T*k, H] = x rows in expert order
//   gemm1      g1 [T*k, R13] = xp . w13[e]^T per expert (grouped_gemm, device offsets)
//   activation h [T*k, F] = act(g1)
//   gemm2      out [T*k, H] = h . w2[e]^T per expert (out reuses xp's memory: xp is dead after gemm1)
//   shared     shared expert on all T rows, as one group: x . shared_w13^T -> act -> . shared_w2^T
//   combine    y [T, H] = sum_j w[t,j] * out[slot_row[t,j]] + shared[t], rounded once
// Numerics vs the reference (src/ref/moe_ref.cpp): identical routing on identical logits; the GEMMs accumulate in
// fp32 and store g1 in the layer dtype (one rounding more than the reference, which keeps g1 in double before the
// activation); h, expert outputs, shared output and y are rounded once to the layer dtype as in the reference.
// Workspace layout: forward_layout() below, every slice 256-byte aligned, in one fixed order.
// Expert-choice routing (cfg.routing_mode, src/cuda/routing/balance.cu): the router stage computes the logits and
// expert_choice_plan builds ids / weights / slot_row [T, E] and the plan (E*C rows) in one go; the plan stage is then
// empty and every later stage runs unchanged with E slots per token.
#include <nvtx3/nvToolsExt.h>

#include <vector>

#include "cuda/routing/balance.h"
#include "cuda/common.cuh"
#include "cuda/gemm/grouped_gemm.h"
#include "cuda/moe_cuda.h"
#include "cuda/moe_stages.h"

namespace switchyard {
namespace cuda {
namespace {

class NvtxRange {
 public:
    explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
    ~NvtxRange() { nvtxRangePop(); }
    NvtxRange(const NvtxRange&) = delete;
    NvtxRange& operator=(const NvtxRange&) = delete;
};

bool has_shared(const MoEConfig& cfg) { return cfg.num_shared_experts > 0 && cfg.shared_ffn_size > 0; }

// The four GEMMs of a forward (A/B/C pointers left null: only the sizes matter for the workspace).
GroupedGemmArgs gemm1_args(const MoEConfig& cfg, int64_t rows) {
    GroupedGemmArgs g;
    g.dtype = cfg.dtype;
    g.num_groups = cfg.num_experts;
    g.n = cfg.w13_rows();
    g.k = cfg.hidden_size;
    g.max_rows = rows;
    return g;
}
GroupedGemmArgs gemm2_args(const MoEConfig& cfg, int64_t rows) {
    GroupedGemmArgs g;
    g.dtype = cfg.dtype;
    g.num_groups = cfg.num_experts;
    g.n = cfg.hidden_size;
    g.k = cfg.ffn_size;
    g.max_rows = rows;
    return g;
}
GroupedGemmArgs shared1_args(const MoEConfig& cfg, int64_t num_tokens) {
    GroupedGemmArgs g;
    g.dtype = cfg.dtype;
    g.num_groups = 1;
    g.n = is_gated(cfg.activation) ? 2 * cfg.shared_width() : cfg.shared_width();
    g.k = cfg.hidden_size;
    g.max_rows = num_tokens;
    return g;
}
GroupedGemmArgs shared2_args(const MoEConfig& cfg, int64_t num_tokens) {
    GroupedGemmArgs g;
    g.dtype = cfg.dtype;
    g.num_groups = 1;
    g.n = cfg.hidden_size;
    g.k = cfg.shared_width();
    g.max_rows = num_tokens;
    return g;
}

struct ForwardLayout {
    float* logits;            // [T, E]
    int32_t* topk_ids;        // [T*k]
    float* topk_weights;      // [T*k]
    int32_t* expert_counts;   // [E]
    int32_t* expert_offsets;  // [E+1]
    int32_t* slot_row;        // [T*k]
    int32_t* row_token;       // [T*k]
    int32_t* row_slot;        // [T*k]
    void* plan_ws;
    size_t plan_ws_bytes;
    void* xp_out;             // [T*k, H] dtype: permuted x, later the expert outputs
    void* g1;                 // [T*k, R13] dtype
    void* h;                  // [T*k, F] dtype
    int32_t* shared_offsets;  // [2]
    void* shared_g1;          // [T, R13s] dtype
    void* shared_h;           // [T, S] dtype
    void* shared_out;         // [T, H] dtype
    void* gemm_ws;
    size_t gemm_ws_bytes;
    void* cublas_ws;          // kCublasWorkspaceBytes
    double* prob_partials;    // [blocks, E]
    double* z_partials;       // [blocks]
    double* stat_sums;        // [E + 1]: prob sums, then the z sum
};

ForwardLayout forward_layout(WorkspaceCarver& wc, const MoEConfig& cfg, int64_t num_tokens) {
    const int64_t T = num_tokens, k = cfg.top_k, E = cfg.num_experts, H = cfg.hidden_size;
    // slots: (token, slot) pairs of the routing arrays; rows: expert rows computed (E*C under expert choice).
    const int64_t slots = T * cfg.route_slots();
    const int64_t rows = cfg.expert_choice() ? E * cfg.expert_choice_capacity(T) : T * k;
    const size_t es = dtype_size(cfg.dtype);
    ForwardLayout l{};
    l.logits = wc.take<float>(T * E);
    l.topk_ids = wc.take<int32_t>(slots);
    l.topk_weights = wc.take<float>(slots);
    l.expert_counts = wc.take<int32_t>(E);
    l.expert_offsets = wc.take<int32_t>(E + 1);
    l.slot_row = wc.take<int32_t>(slots);
    l.row_token = wc.take<int32_t>(slots);
    l.row_slot = wc.take<int32_t>(slots);
    l.plan_ws_bytes = cfg.expert_choice() ? expert_choice_workspace_size(T, E) : plan_workspace_size(T, k, E);
    l.plan_ws = wc.take_bytes(l.plan_ws_bytes);
    l.xp_out = wc.take_bytes(rows * H * es);
    l.g1 = wc.take_bytes(rows * cfg.w13_rows() * es);
    l.h = wc.take_bytes(rows * cfg.ffn_size * es);
    size_t gemm_ws = std::max(grouped_gemm_workspace_size(gemm1_args(cfg, rows)),
                              grouped_gemm_workspace_size(gemm2_args(cfg, rows)));
    if (has_shared(cfg)) {
        const int64_t s = cfg.shared_width();
        l.shared_offsets = wc.take<int32_t>(2);
        l.shared_g1 = wc.take_bytes(T * (is_gated(cfg.activation) ? 2 * s : s) * es);
        l.shared_h = wc.take_bytes(T * s * es);
        l.shared_out = wc.take_bytes(T * H * es);
        gemm_ws = std::max(gemm_ws, std::max(grouped_gemm_workspace_size(shared1_args(cfg, T)),
                                             grouped_gemm_workspace_size(shared2_args(cfg, T))));
    }
    l.gemm_ws_bytes = gemm_ws;
    l.gemm_ws = wc.take_bytes(gemm_ws);
    l.cublas_ws = wc.take_bytes(kCublasWorkspaceBytes);
    const int blocks = router_stat_blocks(T);
    l.prob_partials = wc.take<double>(static_cast<size_t>(blocks) * E);
    l.z_partials = wc.take<double>(blocks);
    l.stat_sums = wc.take<double>(E + 1);
    return l;
}

struct RouterLayout {
    float* logits;
    int32_t* expert_counts;
    void* cublas_ws;
    double* prob_partials;
    double* z_partials;
    double* stat_sums;
};

RouterLayout router_layout(WorkspaceCarver& wc, const MoEConfig& cfg, int64_t num_tokens) {
    RouterLayout l{};
    const int64_t E = cfg.num_experts;
    l.logits = wc.take<float>(num_tokens * E);
    l.expert_counts = wc.take<int32_t>(E);
    l.cublas_ws = wc.take_bytes(kCublasWorkspaceBytes);
    const int blocks = router_stat_blocks(num_tokens);
    l.prob_partials = wc.take<double>(static_cast<size_t>(blocks) * E);
    l.z_partials = wc.take<double>(blocks);
    l.stat_sums = wc.take<double>(E + 1);
    return l;
}

void check_same_dtype(const MoEConfig& cfg, const TensorRef& t, const char* name) {
    SWITCHYARD_CHECK(t.dtype == cfg.dtype, "CUDA backend: ", name, " dtype=", to_string(t.dtype),
                     " must equal the layer dtype ", to_string(cfg.dtype),
                     " (weights of another dtype are not supported on CUDA yet)");
}

// Sums the statistics partials, copies counts / offsets / sums to the host, synchronises and fills `stats`.
void fill_stats(const MoEConfig& cfg, int64_t num_tokens, const int32_t* counts, const int32_t* offsets,
                const double* prob_partials, const double* z_partials, double* stat_sums, cudaStream_t stream,
                LoadStats& stats) {
    const int64_t E = cfg.num_experts;
    reduce_router_stats(prob_partials, z_partials, router_stat_blocks(num_tokens), E, stat_sums, stat_sums + E,
                        stream);
    std::vector<int32_t> h_counts(E), h_offsets(offsets ? E + 1 : 0);
    std::vector<double> h_sums(E + 1);
    SWITCHYARD_CUDA_CHECK(
        cudaMemcpyAsync(h_counts.data(), counts, sizeof(int32_t) * E, cudaMemcpyDeviceToHost, stream));
    if (offsets != nullptr)
        SWITCHYARD_CUDA_CHECK(cudaMemcpyAsync(h_offsets.data(), offsets, sizeof(int32_t) * (E + 1),
                                              cudaMemcpyDeviceToHost, stream));
    SWITCHYARD_CUDA_CHECK(
        cudaMemcpyAsync(h_sums.data(), stat_sums, sizeof(double) * (E + 1), cudaMemcpyDeviceToHost, stream));
    SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(stream));
    stats = LoadStats();
    stats.num_tokens = num_tokens;
    stats.top_k = cfg.top_k;
    stats.expert_counts.assign(h_counts.begin(), h_counts.end());
    stats.kept_counts = stats.expert_counts;
    if (offsets != nullptr)
        for (int64_t e = 0; e < E; ++e) stats.kept_counts[e] = h_offsets[e + 1] - h_offsets[e];
    stats.dropped = offsets != nullptr ? num_tokens * cfg.top_k - h_offsets[E] : 0;
    stats.mean_prob.assign(E, 0.0);
    if (num_tokens > 0) {
        for (int64_t e = 0; e < E; ++e) stats.mean_prob[e] = h_sums[e] / static_cast<double>(num_tokens);
        stats.z_loss = h_sums[E] / static_cast<double>(num_tokens);
    }
    finalize_load_stats(cfg, stats);
}

template <typename T>
T* out_or(const TensorRef* t, T* fallback) {
    return (t != nullptr && t->defined()) ? static_cast<T*>(t->data) : fallback;
}

}  // namespace

int device_count() {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
        cudaGetLastError();  // clear the sticky-free error so later calls start clean
        return 0;
    }
    SWITCHYARD_CUDA_CHECK(err);
    return n;
}

size_t moe_workspace_size(const MoEConfig& cfg, int64_t num_tokens) {
    WorkspaceCarver wc;
    forward_layout(wc, cfg, num_tokens);
    return wc.used();
}

size_t router_workspace_size(const MoEConfig& cfg, int64_t num_tokens) {
    WorkspaceCarver wc;
    router_layout(wc, cfg, num_tokens);
    return wc.used();
}

void moe_forward_staged(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, const TensorRef& y,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream, ForwardOutputs* out,
                        const StageCallback& on_stage) {
    const int64_t T = x.shape[0], k = cfg.route_slots(), E = cfg.num_experts, H = cfg.hidden_size,
                  F = cfg.ffn_size;
    const bool ec = cfg.expert_choice();
    const int64_t rows = ec ? E * cfg.expert_choice_capacity(T) : T * k;
    check_same_dtype(cfg, x, "x");
    check_same_dtype(cfg, w.gate, "gate");
    check_same_dtype(cfg, w.w13, "w13");
    check_same_dtype(cfg, w.w2, "w2");
    if (has_shared(cfg)) {
        check_same_dtype(cfg, w.shared_w13, "shared_w13");
        check_same_dtype(cfg, w.shared_w2, "shared_w2");
    }
    DeviceGuard guard(x.device_index);
    WorkspaceCarver wc(workspace, workspace_bytes);
    const ForwardLayout l = forward_layout(wc, cfg, T);
    const bool want_stats = out != nullptr && out->stats != nullptr;
    float* logits = out_or(out ? &out->logits : nullptr, l.logits);
    int32_t* ids = out_or(out ? &out->topk_ids : nullptr, l.topk_ids);
    float* weights = out_or(out ? &out->topk_weights : nullptr, l.topk_weights);
    int32_t* slot_row = out_or(out ? &out->slot_row : nullptr, l.slot_row);
    int32_t* counts = out_or(out ? &out->expert_counts : nullptr, l.expert_counts);
    auto stage_done = [&](const char* name) {
        if (on_stage) on_stage(name, stream);
    };
    stage_done("begin");
    {
        NvtxRange r("router");
        const float* sbias = cfg.use_score_bias ? w.score_bias.ptr<float>() : nullptr;
        // cuBLAS gate GEMM + the routing kernel; router_fused is not used here (moe_stages.h says why).
        router_gemm(cfg.dtype, x.data, w.gate.data, T, H, E, logits, l.cublas_ws, stream);
        if (!ec) {
            route_topk(cfg, logits, sbias, T, ids, weights, want_stats ? l.prob_partials : nullptr, l.z_partials,
                       stream);
        } else {
            if (want_stats) {  // mean_prob / z partials from the top-k router (its ids are overwritten below)
                MoEConfig tc = cfg;
                tc.routing_mode = RoutingMode::kTokenChoice;
                route_topk(tc, logits, nullptr, T, ids, weights, l.prob_partials, l.z_partials, stream);
            }
            ExpertChoiceArgs ea;
            ea.num_tokens = T;
            ea.logits = logits;
            ea.topk_ids = ids;
            ea.topk_weights = weights;
            ea.expert_counts = counts;
            ea.expert_offsets = l.expert_offsets;
            ea.slot_row = slot_row;
            ea.row_token = l.row_token;
            ea.row_slot = l.row_slot;
            expert_choice_plan(cfg, ea, l.plan_ws, l.plan_ws_bytes, stream);
        }
        stage_done("router");
    }
    if (!ec) {
        NvtxRange r("plan");
        PlanArgs pa;
        pa.num_tokens = T;
        pa.top_k = k;
        pa.num_experts = E;
        pa.capacity = cfg.capacity(T);
        pa.drop_policy = cfg.drop_policy;
        pa.topk_ids = ids;
        pa.topk_weights = weights;
        pa.expert_counts = counts;
        pa.expert_offsets = l.expert_offsets;
        pa.slot_row = slot_row;
        pa.row_token = l.row_token;
        pa.row_slot = l.row_slot;
        build_plan(pa, l.plan_ws, l.plan_ws_bytes, stream);
        stage_done("plan");
    } else {
        stage_done("plan");  // built with the routing above
    }
    {
        NvtxRange r("dispatch");
        permute_rows(cfg.dtype, x.data, l.row_token, rows, H, l.xp_out, stream);
        stage_done("dispatch");
    }
    {
        NvtxRange r("gemm1");
        GroupedGemmArgs g = gemm1_args(cfg, rows);
        g.a = l.xp_out;
        g.b = w.w13.data;
        g.c = l.g1;
        g.offsets = l.expert_offsets;
        grouped_gemm(g, l.gemm_ws, l.gemm_ws_bytes, stream);
        stage_done("gemm1");
    }
    {
        NvtxRange r("activation");
        activation_rows(cfg.activation, cfg.dtype, l.g1, rows, l.expert_offsets + E, F, l.h, stream);
        stage_done("activation");
    }
    {
        NvtxRange r("gemm2");
        GroupedGemmArgs g = gemm2_args(cfg, rows);
        g.a = l.h;
        g.b = w.w2.data;
        g.c = l.xp_out;
        g.offsets = l.expert_offsets;
        grouped_gemm(g, l.gemm_ws, l.gemm_ws_bytes, stream);
        stage_done("gemm2");
    }
    const void* shared_out = nullptr;
    if (has_shared(cfg) && T > 0) {
        NvtxRange r("shared");
        write_single_group_offsets(l.shared_offsets, T, stream);
        GroupedGemmArgs g1 = shared1_args(cfg, T);
        g1.a = x.data;
        g1.b = w.shared_w13.data;
        g1.c = l.shared_g1;
        g1.offsets = l.shared_offsets;
        grouped_gemm(g1, l.gemm_ws, l.gemm_ws_bytes, stream);
        activation_rows(cfg.activation, cfg.dtype, l.shared_g1, T, nullptr, cfg.shared_width(), l.shared_h, stream);
        GroupedGemmArgs g2 = shared2_args(cfg, T);
        g2.a = l.shared_h;
        g2.b = w.shared_w2.data;
        g2.c = l.shared_out;
        g2.offsets = l.shared_offsets;
        grouped_gemm(g2, l.gemm_ws, l.gemm_ws_bytes, stream);
        shared_out = l.shared_out;
        stage_done("shared");
    }
    {
        NvtxRange r("combine");
        combine_rows(cfg.dtype, l.xp_out, slot_row, weights, shared_out, T, k, H, y.data, stream);
        stage_done("combine");
    }
    if (want_stats) {
        fill_stats(cfg, T, counts, l.expert_offsets, l.prob_partials, l.z_partials, l.stat_sums, stream,
                   *out->stats);
        if (ec) {  // nothing is dropped; count the tokens no expert took (fill_stats synchronised already)
            std::vector<int32_t> h_slot(static_cast<size_t>(T * k));
            if (T > 0)
                SWITCHYARD_CUDA_CHECK(cudaMemcpy(h_slot.data(), slot_row, sizeof(int32_t) * T * k,
                                                 cudaMemcpyDeviceToHost));
            LoadStats& st = *out->stats;
            st.dropped = 0;
            st.unrouted_tokens = 0;
            for (int64_t t = 0; t < T; ++t) {
                bool any = false;
                for (int64_t e = 0; e < k && !any; ++e) any = h_slot[t * k + e] >= 0;
                if (!any) ++st.unrouted_tokens;
            }
            finalize_load_stats(cfg, st);
        }
    }
}

void moe_forward(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, const TensorRef& y,
                 void* workspace, size_t workspace_bytes, cudaStream_t stream, ForwardOutputs* out) {
    moe_forward_staged(cfg, w, x, y, workspace, workspace_bytes, stream, out, StageCallback());
}

void router_forward(const MoEConfig& cfg, const TensorRef& gate, const TensorRef& bias, const TensorRef& x,
                    const TensorRef& topk_ids, const TensorRef& topk_weights, const TensorRef& logits,
                    void* workspace, size_t workspace_bytes, cudaStream_t stream, LoadStats* stats) {
    const int64_t T = x.shape[0];
    check_same_dtype(cfg, x, "x");
    check_same_dtype(cfg, gate, "gate");
    DeviceGuard guard(x.device_index);
    WorkspaceCarver wc(workspace, workspace_bytes);
    const RouterLayout l = router_layout(wc, cfg, T);
    float* lg = logits.defined() ? logits.ptr<float>() : l.logits;
    NvtxRange r("router");
    const float* sbias = cfg.use_score_bias ? bias.ptr<float>() : nullptr;
    router_gemm(cfg.dtype, x.data, gate.data, T, cfg.hidden_size, cfg.num_experts, lg, l.cublas_ws, stream);
    route_topk(cfg, lg, sbias, T, topk_ids.ptr<int32_t>(), topk_weights.ptr<float>(),
               stats ? l.prob_partials : nullptr, l.z_partials, stream);
    if (stats != nullptr) {
        count_experts(topk_ids.ptr<int32_t>(), T * cfg.top_k, cfg.num_experts, l.expert_counts, stream);
        fill_stats(cfg, T, l.expert_counts, nullptr, l.prob_partials, l.z_partials, l.stat_sums, stream, *stats);
    }
}

}  // namespace cuda
}  // namespace switchyard
