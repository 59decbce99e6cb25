// src/api/expert_parallel.cpp: ExpertPlacement, the exchange plan and ExpertParallelMoELayer
// (switchyard/expert_parallel.h; docs/expert_parallel.md).
//
// The layer's forward is a chain of the public stages (stages.h), the same code for the CPU and the CUDA backend,
// with two exchanges and one counts collective of the caller's Communicator between them:
//   router -> plan -> gather (send buffer xs, expert order) -> all_gather_counts -> [host: exchange plan] ->
//   all_to_all_v (xs -> xr, grouped by local expert) -> grouped_gemm / activation / grouped_gemm over the local
//   experts (xr -> g1 -> h -> xr) -> all_to_all_v back (xr -> xs) -> shared expert -> combine (xs, slot_row, weights)
// Workspace: a part that depends on the rank's token count T (routing, plan, send buffer, shared expert, router and
// statistics scratch) followed by the receive part, sized for C rows (xr, g1, h and the GEMM scratch). C is
// max_recv_rows() for a caller's workspace; the CPU convenience forward allocates the receive part once the counts are
// known (C = the rows actually received).
#include "switchyard/expert_parallel.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <sstream>
#include <utility>
#include <vector>

#include "api/check.h"
#include "api/expert_chain.h"
#include "switchyard/error.h"
#include "switchyard/stages.h"
#include "util/workspace.h"

#ifdef SWITCHYARD_WITH_CUDA
#include "cuda/comm/device_copy.h"
#endif

namespace switchyard {

// ---- placement ------------------------------------------------------------------------------------------------------

ExpertPlacement ExpertPlacement::contiguous(int64_t num_experts, int world_size) {
    SWITCHYARD_CHECK(world_size >= 1, "world_size=", world_size, " must be >= 1");
    SWITCHYARD_CHECK(num_experts >= world_size && num_experts <= MoEConfig::kMaxExperts, "num_experts=", num_experts,
                     " must be in [world_size=", world_size, ", ", MoEConfig::kMaxExperts,
                     "]: every rank holds at least one expert");
    std::vector<std::vector<int32_t>> lists(static_cast<size_t>(world_size));
    const int64_t base = num_experts / world_size, extra = num_experts % world_size;
    int32_t e = 0;
    for (int r = 0; r < world_size; ++r)
        for (int64_t i = 0; i < base + (r < extra ? 1 : 0); ++i) lists[r].push_back(e++);
    ExpertPlacement p = from_lists(num_experts, lists);
    p.contiguous_ = true;
    return p;
}

ExpertPlacement ExpertPlacement::from_lists(int64_t num_experts,
                                            const std::vector<std::vector<int32_t>>& experts_of_rank) {
    const int64_t world = static_cast<int64_t>(experts_of_rank.size());
    SWITCHYARD_CHECK(world >= 1, "experts_of_rank has ", world, " ranks, expected at least 1");
    SWITCHYARD_CHECK(num_experts >= world && num_experts <= MoEConfig::kMaxExperts, "num_experts=", num_experts,
                     " must be in [world_size=", world, ", ", MoEConfig::kMaxExperts,
                     "]: every rank holds at least one expert");
    ExpertPlacement p;
    p.rank_of_.assign(static_cast<size_t>(num_experts), -1);
    p.local_idx_.assign(static_cast<size_t>(num_experts), -1);
    for (int64_t r = 0; r < world; ++r) {
        const auto& list = experts_of_rank[r];
        SWITCHYARD_CHECK(!list.empty(), "experts_of_rank[", r, "] is empty: every rank holds at least one expert");
        for (size_t l = 0; l < list.size(); ++l) {
            const int32_t e = list[l];
            SWITCHYARD_CHECK(e >= 0 && e < num_experts, "experts_of_rank[", r, "][", l, "]=", e,
                             " is not an expert id in [0, num_experts=", num_experts, ")");
            SWITCHYARD_CHECK(p.rank_of_[e] < 0, "expert ", e, " is placed twice: experts_of_rank[", p.rank_of_[e],
                             "][", p.local_idx_[e], "] and experts_of_rank[", r, "][", l, "]");
            p.rank_of_[e] = static_cast<int32_t>(r);
            p.local_idx_[e] = static_cast<int32_t>(l);
        }
    }
    for (int64_t e = 0; e < num_experts; ++e)
        SWITCHYARD_CHECK(p.rank_of_[e] >= 0, "expert ", e, " is on no rank (experts_of_rank must list each of the ",
                         num_experts, " experts once)");
    p.experts_of_rank_ = experts_of_rank;
    return p;
}

int ExpertPlacement::rank_of(int64_t expert) const {
    SWITCHYARD_CHECK(expert >= 0 && expert < num_experts(), "expert=", expert, " not in [0, ", num_experts(), ")");
    return rank_of_[expert];
}

int64_t ExpertPlacement::local_index(int64_t expert) const {
    SWITCHYARD_CHECK(expert >= 0 && expert < num_experts(), "expert=", expert, " not in [0, ", num_experts(), ")");
    return local_idx_[expert];
}

const std::vector<int32_t>& ExpertPlacement::local_experts(int rank) const {
    SWITCHYARD_CHECK(rank >= 0 && rank < world_size(), "rank=", rank, " not in [0, world_size=", world_size(), ")");
    return experts_of_rank_[rank];
}

int64_t ExpertPlacement::num_local(int rank) const { return static_cast<int64_t>(local_experts(rank).size()); }

int32_t ExpertPlacement::global_expert(int rank, int64_t local_idx) const {
    const auto& list = local_experts(rank);
    SWITCHYARD_CHECK(local_idx >= 0 && local_idx < static_cast<int64_t>(list.size()), "local_idx=", local_idx,
                     " not in [0, ", list.size(), ") for rank ", rank);
    return list[local_idx];
}

int64_t ExpertPlacement::max_local() const {
    size_t m = 0;
    for (const auto& l : experts_of_rank_) m = std::max(m, l.size());
    return static_cast<int64_t>(m);
}

std::string ExpertPlacement::to_string() const {
    std::ostringstream os;
    if (contiguous_) {
        os << "contiguous(E=" << num_experts() << ", W=" << world_size() << ")";
        return os.str();
    }
    os << "map(E=" << num_experts() << ", W=" << world_size() << ":";
    for (const auto& l : experts_of_rank_) {
        os << " [";
        for (size_t i = 0; i < l.size(); ++i) os << (i ? " " : "") << l[i];
        os << "]";
    }
    os << ")";
    return os.str();
}

// ---- exchange plan --------------------------------------------------------------------------------------------------

ExchangePlan make_exchange_plan(const ExpertPlacement& placement, int rank, const std::vector<int32_t>& all_counts) {
    const int W = placement.world_size();
    const int64_t E = placement.num_experts();
    SWITCHYARD_CHECK(W >= 1, "placement is empty");
    SWITCHYARD_CHECK(rank >= 0 && rank < W, "rank=", rank, " not in [0, world_size=", W, ")");
    SWITCHYARD_CHECK(static_cast<int64_t>(all_counts.size()) == W * E, "all_counts has ", all_counts.size(),
                     " entries, expected world_size*num_experts=", W * E);
    for (size_t i = 0; i < all_counts.size(); ++i)
        SWITCHYARD_CHECK(all_counts[i] >= 0, "all_counts[", i, "] (rank ", i / E, ", expert ", i % E,
                         ")=", all_counts[i], " is negative");
    ExchangePlan p;
    p.rank = rank;
    p.world_size = W;
    p.send_rows_per_peer.assign(W, 0);
    p.recv_rows_per_peer.assign(W, 0);
    const int32_t* mine = all_counts.data() + static_cast<int64_t>(rank) * E;
    // This rank's rows in expert order: expert e's rows start at the exclusive scan of its counts.
    std::vector<int64_t> expert_offset(static_cast<size_t>(E) + 1, 0);
    for (int64_t e = 0; e < E; ++e) expert_offset[e + 1] = expert_offset[e] + mine[e];
    p.send_rows = expert_offset[E];
    for (int d = 0; d < W; ++d)
        for (int32_t e : placement.local_experts(d)) {
            if (mine[e] == 0) continue;
            p.sends.push_back({d, expert_offset[e], mine[e]});
            p.send_rows_per_peer[d] += mine[e];
        }
    // Receive buffer grouped by local expert, then by source rank.
    const std::vector<int32_t>& local = placement.local_experts(rank);
    const int64_t L = static_cast<int64_t>(local.size());
    p.local_offsets.assign(static_cast<size_t>(L) + 1, 0);
    std::vector<int64_t> at(static_cast<size_t>(L) * W);  // first row of (local expert l, source s)
    int64_t row = 0;
    for (int64_t l = 0; l < L; ++l) {
        for (int s = 0; s < W; ++s) {
            at[l * W + s] = row;
            row += all_counts[static_cast<int64_t>(s) * E + local[l]];
        }
        SWITCHYARD_CHECK(row <= INT32_MAX, "rank ", rank, " would receive ", row, " rows: more than int32 offsets hold");
        p.local_offsets[l + 1] = static_cast<int32_t>(row);
    }
    p.recv_rows = row;
    // Per source in local-expert order: the order in which that source sends to this rank.
    for (int s = 0; s < W; ++s)
        for (int64_t l = 0; l < L; ++l) {
            const int32_t n = all_counts[static_cast<int64_t>(s) * E + local[l]];
            if (n == 0) continue;
            p.recvs.push_back({s, at[l * W + s], n});
            p.recv_rows_per_peer[s] += n;
        }
    return p;
}

#ifndef SWITCHYARD_WITH_NCCL
std::unique_ptr<Communicator> make_nccl_communicator(ncclComm_t) {
    SWITCHYARD_FAIL("make_nccl_communicator: this build has no NCCL (configure with CUDA and SWITCHYARD_NCCL=AUTO/ON "
                    "where nccl.h and libnccl are installed)");
}
bool nccl_available() { return false; }
#endif

// ---- the layer ------------------------------------------------------------------------------------------------------
namespace {


// The part of the workspace that depends on the rank's token count.
struct HomeSlices {
    float* logits;            // [T, E]
    int32_t* topk_ids;        // [T, k]
    float* topk_weights;      // [T, k]
    int32_t* counts;          // [E+1]: the plan's expert_counts, then this rank's receive capacity (sent together)
    int32_t* all_counts;      // [W, E+1]: every rank's counts
    int32_t* expert_offsets;  // [E+1]
    int32_t* slot_row;        // [T, k]
    int32_t* row_token;       // [T*k]
    int32_t* row_slot;        // [T*k]
    void* plan_ws;
    size_t plan_ws_bytes;
    void* xs;                 // [T*k, H]: gathered x in expert order (sent), later the returned expert outputs
    int32_t* local_offsets;   // [L+1]
    void* shared_g1;          // [T, R13s]
    void* shared_h;           // [T, S]
    void* shared_out;         // [T, H]
    float* shared_gate;       // [T, 1]
    void* router_ws;
    size_t router_ws_bytes;
    void* stats_ws;
    size_t stats_ws_bytes;
};

// The receive part, for `rows` received rows.
struct RecvSlices {
    void* xr;  // [rows, H]: received rows grouped by local expert, later their expert outputs
    void* g1;  // [rows, R13]
    void* h;   // [rows, F]
    void* gemm_ws;
    size_t gemm_ws_bytes;
};

using Take = std::function<void*(const char*, size_t)>;

Take taker(WorkspaceCarver& wc, std::vector<WorkspaceSlice>* recorder) {
    return [&wc, recorder](const char* name, size_t bytes) {
        const size_t at = wc.used();
        void* p = wc.take_bytes(bytes);
        if (recorder != nullptr) recorder->push_back({name, at, align_up(bytes), ""});
        return p;
    };
}

HomeSlices home_slices(const MoEConfig& cfg, Device dev, int world, int64_t num_local, int64_t num_tokens,
                       const Take& take) {
    const int64_t T = num_tokens, E = cfg.num_experts, H = cfg.hidden_size, pairs = T * cfg.top_k;
    const size_t es = dtype_size(cfg.dtype), i4 = sizeof(int32_t);
    HomeSlices s{};
    s.logits = static_cast<float*>(take("logits", sizeof(float) * T * E));
    s.topk_ids = static_cast<int32_t*>(take("topk_ids", i4 * pairs));
    s.topk_weights = static_cast<float*>(take("topk_weights", sizeof(float) * pairs));
    s.counts = static_cast<int32_t*>(take("expert_counts", i4 * (E + 1)));
    s.all_counts = static_cast<int32_t*>(take("all_counts", i4 * world * (E + 1)));
    s.expert_offsets = static_cast<int32_t*>(take("expert_offsets", i4 * (E + 1)));
    s.slot_row = static_cast<int32_t*>(take("slot_row", i4 * pairs));
    s.row_token = static_cast<int32_t*>(take("row_token", i4 * pairs));
    s.row_slot = static_cast<int32_t*>(take("row_slot", i4 * pairs));
    s.plan_ws_bytes = plan_workspace_size(cfg, dev, T);
    s.plan_ws = take("plan_scratch", s.plan_ws_bytes);
    s.xs = take("send_rows", pairs * H * es);
    s.local_offsets = static_cast<int32_t*>(take("local_offsets", i4 * (num_local + 1)));
    if (cfg.has_shared_expert()) {
        s.shared_g1 = take("shared_g1", T * cfg.shared_w13_rows() * es);
        s.shared_h = take("shared_h", T * cfg.shared_width() * es);
        s.shared_out = take("shared_out", T * H * es);
        if (cfg.shared_expert_gate) s.shared_gate = static_cast<float*>(take("shared_gate", sizeof(float) * T));
    }
    s.router_ws_bytes = router_gemm_workspace_size(dev);
    s.router_ws = take("router_scratch", s.router_ws_bytes);
    s.stats_ws_bytes = load_stats_workspace_size(cfg, dev, T);
    s.stats_ws = take("stats_scratch", s.stats_ws_bytes);
    return s;
}

RecvSlices recv_slices(const MoEConfig& cfg, Device dev, int64_t num_local, int64_t num_tokens, int64_t rows,
                       const Take& take) {
    const int64_t H = cfg.hidden_size, T = num_tokens;
    const size_t es = dtype_size(cfg.dtype);
    RecvSlices s{};
    s.xr = take("recv_rows", rows * H * es);
    s.g1 = api::uses_gated_gemm1(cfg, dev) ? nullptr : take("g1", rows * cfg.w13_rows() * es);
    s.h = take("h", rows * cfg.ffn_size * es);
    // The largest scratch of the GEMMs of one forward: the local experts' (rows rows) and the shared expert's (T).
    s.gemm_ws_bytes = api::expert_chain_workspace_size(cfg, dev, num_local, rows, T);
    s.gemm_ws = take("gemm_scratch", s.gemm_ws_bytes);
    return s;
}

TensorRef view(void* p, DType t, std::initializer_list<int64_t> dims, const TensorRef& like) {
    return TensorRef(p, t, dims, like.device, like.device_index);
}

TensorRef either(const ForwardOutputs* out, const TensorRef ForwardOutputs::*field, const TensorRef& fallback) {
    return (out != nullptr && (out->*field).defined()) ? out->*field : fallback;
}

void check_output(const TensorRef& t, DType dtype, std::initializer_list<int64_t> dims, const char* name,
                  const TensorRef& like) {
    api::check_tensor(t, name, dtype, dims);
    api::check_same_device(t, name, like, "x");
}

// Host <-> device copies of the small host-side values of a forward (counts, offsets). The CUDA copy to the host
// synchronises the stream: the forward's one host synchronisation.
void copy_to_host(void* dst, const void* src, size_t bytes, Device dev, int dev_idx, cudaStream_t stream) {
    if (dev == Device::kCPU) {
        if (bytes > 0) std::memcpy(dst, src, bytes);
        return;
    }
#ifdef SWITCHYARD_WITH_CUDA
    cuda::comm::copy_to_host_sync(dst, src, bytes, dev_idx, stream);
#else
    (void)dev_idx;
    (void)stream;
    SWITCHYARD_FAIL("this build has no CUDA backend (built without CUDA)");
#endif
}

void copy_to_device(void* dst, const void* src, size_t bytes, Device dev, int dev_idx, cudaStream_t stream) {
    if (dev == Device::kCPU) {
        if (bytes > 0) std::memcpy(dst, src, bytes);
        return;
    }
#ifdef SWITCHYARD_WITH_CUDA
    cuda::comm::copy_to_device_async(dst, src, bytes, dev_idx, stream);
#else
    (void)dev_idx;
    (void)stream;
    SWITCHYARD_FAIL("this build has no CUDA backend (built without CUDA)");
#endif
}

}  // namespace

struct ExpertParallelMoELayer::Impl {
    MoEWeights w;
    Communicator* comm = nullptr;
    ExpertParallelOptions options;
    int rank = 0;
    int world = 1;
    int64_t num_local = 0;

    void forward(const MoEConfig& cfg, const ExpertPlacement& placement, const TensorRef& x, const TensorRef& y,
                 void* workspace, size_t workspace_bytes, bool exact_recv, cudaStream_t stream, ForwardOutputs* out,
                 const StageCallback& on_stage) const;
};

ExpertParallelMoELayer::ExpertParallelMoELayer(const MoEConfig& cfg, const ExpertPlacement& placement,
                                               const MoEWeights& weights, Communicator& comm,
                                               const ExpertParallelOptions& options)
    : cfg_(cfg), placement_(placement), impl_(new Impl) {
    cfg_.validate();
    SWITCHYARD_CHECK(!cfg_.expert_choice(), "routing_mode=", to_string(cfg_.routing_mode),
                     " is not supported with expert parallelism (each expert picks its tokens from the whole batch)");
    SWITCHYARD_CHECK(cfg_.capacity_factor == 0.0, "capacity_factor=", cfg_.capacity_factor,
                     " is not supported with expert parallelism: capacity is a per-expert limit over the whole batch "
                     "and per rank would drop other pairs than the single-device layer (use 0, dropless)");
    SWITCHYARD_CHECK(placement_.world_size() >= 1, "placement is empty (use ExpertPlacement::contiguous or from_lists)");
    SWITCHYARD_CHECK(placement_.num_experts() == cfg_.num_experts, "placement has num_experts=",
                     placement_.num_experts(), ", expected cfg.num_experts=", cfg_.num_experts);
    SWITCHYARD_CHECK(comm.world_size() == placement_.world_size(), "comm world_size=", comm.world_size(),
                     " differs from the placement's world_size=", placement_.world_size());
    SWITCHYARD_CHECK(comm.rank() >= 0 && comm.rank() < comm.world_size(), "comm rank=", comm.rank(),
                     " not in [0, world_size=", comm.world_size(), ")");
    SWITCHYARD_CHECK(options.max_tokens_per_rank >= 0, "max_tokens_per_rank=", options.max_tokens_per_rank,
                     " must be >= 0");
    Impl& m = *impl_;
    m.w = weights;
    m.comm = &comm;
    m.options = options;
    m.rank = comm.rank();
    m.world = comm.world_size();
    m.num_local = placement_.num_local(m.rank);
    // The router (gate [E, H], score bias [E]) as MoELayer checks it.
    SWITCHYARD_CHECK(weights.w13.defined(), "w13 is required but undefined");
    const Device dev = weights.w13.device;
    SWITCHYARD_CHECK(comm.device() == dev, "comm works on ", to_string(comm.device()), " memory, the weights are on ",
                     to_string(dev));
    if (dev == Device::kCUDA)
        SWITCHYARD_CHECK(comm.device_index() == weights.w13.device_index, "comm is on cuda:", comm.device_index(),
                         ", w13 on cuda:", weights.w13.device_index);
    api::check_float_tensor(weights.gate, "gate", {cfg_.num_experts, cfg_.hidden_size});
    api::check_device(weights.gate, "gate", dev, weights.w13.device_index);
    if (dev == Device::kCUDA)
        SWITCHYARD_CHECK(weights.gate.dtype == cfg_.dtype, "CUDA backend: gate dtype=", to_string(weights.gate.dtype),
                         " must equal the layer dtype ", to_string(cfg_.dtype));
    if (cfg_.use_score_bias) {
        SWITCHYARD_CHECK(weights.score_bias.defined(), "score_bias is required when use_score_bias=true");
        api::check_tensor(weights.score_bias, "score_bias", DType::kF32, {cfg_.num_experts});
        api::check_device(weights.score_bias, "score_bias", dev, weights.w13.device_index);
    } else {
        SWITCHYARD_CHECK(!weights.score_bias.defined(), "score_bias ", weights.score_bias.shape_string(),
                         " given but use_score_bias=false");
    }
    // The expert shards and the shared expert: MoELayer's checks for a layer of the L local experts (its router is a
    // view of the first L gate rows, checked above; its routing settings do not matter here).
    MoEConfig local = cfg_;
    local.num_experts = m.num_local;
    local.top_k = 1;
    local.num_groups = 1;
    local.topk_groups = 1;
    local.use_score_bias = false;
    MoEWeights lw = weights;
    lw.gate = TensorRef(weights.gate.data, weights.gate.dtype, {m.num_local, cfg_.hidden_size}, dev,
                        weights.gate.device_index);
    lw.score_bias = TensorRef();
    try {
        MoELayer check(local, lw);
    } catch (const Error& e) {
        SWITCHYARD_FAIL("rank ", m.rank, " of ", placement_.to_string(), " holds num_local_experts=", m.num_local,
                        ": ", e.what());
    }
}

ExpertParallelMoELayer::~ExpertParallelMoELayer() = default;
ExpertParallelMoELayer::ExpertParallelMoELayer(ExpertParallelMoELayer&&) noexcept = default;
ExpertParallelMoELayer& ExpertParallelMoELayer::operator=(ExpertParallelMoELayer&&) noexcept = default;

int ExpertParallelMoELayer::rank() const { return impl_->rank; }
int64_t ExpertParallelMoELayer::num_local_experts() const { return impl_->num_local; }
Device ExpertParallelMoELayer::device() const { return impl_->w.w13.device; }

int64_t ExpertParallelMoELayer::max_recv_rows() const {
    return static_cast<int64_t>(impl_->world) * impl_->options.max_tokens_per_rank *
           std::min(cfg_.top_k, impl_->num_local);
}

std::vector<WorkspaceSlice> ExpertParallelMoELayer::workspace_layout(int64_t num_tokens) const {
    SWITCHYARD_CHECK(impl_->options.max_tokens_per_rank > 0,
                     "workspace_layout needs ExpertParallelOptions::max_tokens_per_rank > 0 (it sizes the receive "
                     "buffers)");
    SWITCHYARD_CHECK(num_tokens >= 0 && num_tokens <= impl_->options.max_tokens_per_rank, "num_tokens=", num_tokens,
                     " not in [0, max_tokens_per_rank=", impl_->options.max_tokens_per_rank, "]");
    std::vector<WorkspaceSlice> slices;
    WorkspaceCarver wc;
    const Take take = taker(wc, &slices);
    home_slices(cfg_, device(), impl_->world, impl_->num_local, num_tokens, take);
    recv_slices(cfg_, device(), impl_->num_local, num_tokens, max_recv_rows(), take);
    return slices;
}

size_t ExpertParallelMoELayer::workspace_size(int64_t num_tokens) const {
    size_t bytes = 0;
    for (const WorkspaceSlice& s : workspace_layout(num_tokens)) bytes = std::max(bytes, s.offset + s.bytes);
    return bytes;
}

void ExpertParallelMoELayer::forward(const TensorRef& x, const TensorRef& y, void* workspace, size_t workspace_bytes,
                                     cudaStream_t stream, ForwardOutputs* out, const StageCallback& on_stage) const {
    impl_->forward(cfg_, placement_, x, y, workspace, workspace_bytes, false, stream, out, on_stage);
}

void ExpertParallelMoELayer::forward(const TensorRef& x, const TensorRef& y, ForwardOutputs* out) const {
    SWITCHYARD_CHECK(device() == Device::kCPU, "the convenience forward(x, y) runs on cpu only; the layer is on ",
                     to_string(device()), ": pass a workspace of workspace_size(T) bytes and a stream");
    impl_->forward(cfg_, placement_, x, y, nullptr, 0, true, nullptr, out, StageCallback());
}

void ExpertParallelMoELayer::Impl::forward(const MoEConfig& cfg, const ExpertPlacement& placement, const TensorRef& x,
                                           const TensorRef& y, void* workspace, size_t workspace_bytes,
                                           bool exact_recv, cudaStream_t stream, ForwardOutputs* out,
                                           const StageCallback& on_stage) const {
    const Device dev = w.w13.device;
    const int dev_idx = w.w13.device_index;
    validate_activation(cfg, x, "x", dev);
    validate_activation(cfg, y, "y", dev);
    api::check_device(x, "x", dev, dev_idx);
    const int64_t T = x.shape[0];
    SWITCHYARD_CHECK(y.shape[0] == T, "y shape=", y.shape_string(), ", expected [", T, ", ", cfg.hidden_size,
                     "] like x");
    const int64_t E = cfg.num_experts, H = cfg.hidden_size, F = cfg.ffn_size, k = cfg.top_k, L = num_local;
    if (out != nullptr) {
        if (out->logits.defined()) check_output(out->logits, DType::kF32, {T, E}, "logits", x);
        if (out->topk_ids.defined()) check_output(out->topk_ids, DType::kI32, {T, k}, "topk_ids", x);
        if (out->topk_weights.defined()) check_output(out->topk_weights, DType::kF32, {T, k}, "topk_weights", x);
        if (out->slot_row.defined()) check_output(out->slot_row, DType::kI32, {T, k}, "slot_row", x);
        if (out->expert_counts.defined()) check_output(out->expert_counts, DType::kI32, {E}, "expert_counts", x);
        SWITCHYARD_CHECK(!out->expert_offsets.defined(), "expert_offsets: the expert-parallel layer's plan is per "
                         "rank (its local experts' offsets); it does not fill ForwardOutputs::expert_offsets");
    }
    // The home part of the workspace (and, for a caller's workspace, the receive part right after it).
    std::unique_ptr<char[]> home_scratch, recv_scratch;
    auto host_buffer = [](std::unique_ptr<char[]>& owner, size_t bytes) {
        owner.reset(new char[bytes + kWorkspaceAlign]);
        return reinterpret_cast<void*>(align_up(reinterpret_cast<uintptr_t>(owner.get())));
    };
    int64_t capacity = INT32_MAX;  // rows this rank can receive (exact_recv: sized once the counts are known)
    if (exact_recv) {
        WorkspaceCarver sizing;
        home_slices(cfg, dev, world, L, T, taker(sizing, nullptr));
        workspace_bytes = sizing.used();
        workspace = host_buffer(home_scratch, workspace_bytes);
    } else {
        SWITCHYARD_CHECK(options.max_tokens_per_rank > 0,
                         "forward with a caller's workspace needs ExpertParallelOptions::max_tokens_per_rank > 0 (it "
                         "sizes the receive buffers); the CPU convenience forward(x, y) needs none");
        SWITCHYARD_CHECK(T <= options.max_tokens_per_rank, "x has T=", T, " tokens, more than max_tokens_per_rank=",
                         options.max_tokens_per_rank);
        capacity = static_cast<int64_t>(world) * options.max_tokens_per_rank * std::min(k, L);
        SWITCHYARD_CHECK(capacity <= INT32_MAX, "max_tokens_per_rank=", options.max_tokens_per_rank,
                         ": the receive bound ", capacity, " rows exceeds int32 offsets");
    }
    WorkspaceCarver wc(workspace, workspace_bytes);
    const HomeSlices s = home_slices(cfg, dev, world, L, T, taker(wc, nullptr));
    RecvSlices r{};
    if (!exact_recv) {
        // Sized for the bound; the check names the whole requirement rather than the first slice that overflows.
        WorkspaceCarver sizing;
        home_slices(cfg, dev, world, L, T, taker(sizing, nullptr));
        recv_slices(cfg, dev, L, T, capacity, taker(sizing, nullptr));
        api::check_workspace(workspace, workspace_bytes, sizing.used(), "ExpertParallelMoELayer::forward");
        r = recv_slices(cfg, dev, L, T, capacity, taker(wc, nullptr));
    }

    const TensorRef& like = x;
    const TensorRef logits = either(out, &ForwardOutputs::logits, view(s.logits, DType::kF32, {T, E}, like));
    const TensorRef ids = either(out, &ForwardOutputs::topk_ids, view(s.topk_ids, DType::kI32, {T, k}, like));
    const TensorRef weights =
        either(out, &ForwardOutputs::topk_weights, view(s.topk_weights, DType::kF32, {T, k}, like));
    RoutingPlan plan;
    plan.expert_counts = view(s.counts, DType::kI32, {E}, like);  // first E entries of the counts sent
    plan.expert_offsets = view(s.expert_offsets, DType::kI32, {E + 1}, like);
    plan.slot_row = either(out, &ForwardOutputs::slot_row, view(s.slot_row, DType::kI32, {T, k}, like));
    plan.row_token = view(s.row_token, DType::kI32, {T * k}, like);
    plan.row_slot = view(s.row_slot, DType::kI32, {T * k}, like);
    const TensorRef xs = view(s.xs, cfg.dtype, {T * k, H}, like);
    const size_t row_bytes = static_cast<size_t>(H) * dtype_size(cfg.dtype);
    auto stage_done = [&](const char* name) {
        if (on_stage) on_stage(name, stream);
    };

    stage_done("begin");
    router_gemm(x, w.gate, logits, s.router_ws, s.router_ws_bytes, stream);
    route(cfg, logits, w.score_bias, ids, weights, stream);
    stage_done("router");
    build_plan(cfg, ids, weights, plan, s.plan_ws, s.plan_ws_bytes, stream);
    stage_done("plan");
    gather(x, plan.row_token, xs, stream, plan.slot_row);
    stage_done("dispatch");

    // Counts: every rank's expert_counts and receive capacity, read on the host (the host synchronisation).
    const int32_t cap32 = static_cast<int32_t>(capacity);
    copy_to_device(s.counts + E, &cap32, sizeof(int32_t), dev, dev_idx, stream);
    comm->all_gather_counts(s.counts, s.all_counts, E + 1, stream);
    std::vector<int32_t> gathered(static_cast<size_t>(world) * (E + 1));
    copy_to_host(gathered.data(), s.all_counts, gathered.size() * sizeof(int32_t), dev, dev_idx, stream);
    std::vector<int32_t> all_counts(static_cast<size_t>(world) * E);
    for (int q = 0; q < world; ++q)
        std::copy(gathered.begin() + q * (E + 1), gathered.begin() + q * (E + 1) + E, all_counts.begin() + q * E);
    // Every rank checks every rank's receive size against that rank's capacity, so all of them throw together.
    for (int q = 0; q < world; ++q) {
        int64_t incoming = 0;
        for (int32_t e : placement.local_experts(q))
            for (int src = 0; src < world; ++src) incoming += all_counts[static_cast<size_t>(src) * E + e];
        const int32_t cap_q = gathered[static_cast<size_t>(q) * (E + 1) + E];
        SWITCHYARD_CHECK(incoming <= cap_q, "rank ", q, " would receive ", incoming, " rows, more than its workspace's ",
                         cap_q, " (max_tokens_per_rank=", options.max_tokens_per_rank,
                         " on this rank: every rank must pass at most max_tokens_per_rank tokens, the same value "
                         "everywhere)");
    }
    const ExchangePlan ep = make_exchange_plan(placement, rank, all_counts);
    const int64_t R = ep.recv_rows;
    if (exact_recv) {
        WorkspaceCarver sizing;
        recv_slices(cfg, dev, L, T, R, taker(sizing, nullptr));
        void* base = host_buffer(recv_scratch, sizing.used());
        WorkspaceCarver rc(base, sizing.used());
        r = recv_slices(cfg, dev, L, T, R, taker(rc, nullptr));
    }
    copy_to_device(s.local_offsets, ep.local_offsets.data(), ep.local_offsets.size() * sizeof(int32_t), dev, dev_idx,
                   stream);
    if (out != nullptr && out->expert_counts.defined())
        copy_to_device(out->expert_counts.data, all_counts.data() + static_cast<size_t>(rank) * E,
                       sizeof(int32_t) * E, dev, dev_idx, stream);
    stage_done("counts");

    const TensorRef xr = view(r.xr, cfg.dtype, {R, H}, like);
    comm->all_to_all_v(s.xs, ep.sends, r.xr, ep.recvs, row_bytes, stream);
    stage_done("exchange");

    const TensorRef local_offsets = view(s.local_offsets, DType::kI32, {L + 1}, like);
    const TensorRef used_rows = view(s.local_offsets + L, DType::kI32, {1}, like);
    auto expert_gemm = [&](const TensorRef& a, const TensorRef& b, const TensorRef& b_scale,
                           const TensorRef& input_scale, const TensorRef& c) {
        api::expert_gemm(cfg, a, b, b_scale, input_scale, local_offsets, c, r.gemm_ws, r.gemm_ws_bytes, stream);
    };
    const TensorRef g1 =
        api::uses_gated_gemm1(cfg, dev) ? TensorRef() : view(r.g1, cfg.dtype, {R, cfg.w13_rows()}, like);
    const TensorRef h = view(r.h, cfg.dtype, {R, F}, like);
    api::gemm1_activation(cfg, xr, w, local_offsets, used_rows, g1, h, r.gemm_ws, r.gemm_ws_bytes, stream, stage_done);
    expert_gemm(h, w.w2, w.w2_scale, w.w2_input_scale, xr);  // xr's inputs are dead after gemm1
    stage_done("gemm2");

    comm->all_to_all_v(r.xr, ep.recvs, s.xs, ep.sends, row_bytes, stream);
    stage_done("return");

    TensorRef shared, shared_gate;
    if (cfg.has_shared_expert() && T > 0) {
        const TensorRef sg1 = view(s.shared_g1, cfg.dtype, {T, cfg.shared_w13_rows()}, like);
        const TensorRef sh = view(s.shared_h, cfg.dtype, {T, cfg.shared_width()}, like);
        shared = view(s.shared_out, cfg.dtype, {T, H}, like);
        api::shared_expert(cfg, x, w, sg1, sh, shared, r.gemm_ws, r.gemm_ws_bytes, stream);
        if (cfg.shared_expert_gate) {
            shared_gate = view(s.shared_gate, DType::kF32, {T, 1}, like);
            router_gemm(x, w.shared_gate, shared_gate, s.router_ws, s.router_ws_bytes, stream);
        }
        stage_done("shared");
    }
    combine(xs, plan.slot_row, weights, shared, y, stream, shared_gate);
    stage_done("combine");
    if (out != nullptr && out->stats != nullptr)
        load_stats(cfg, logits, ids, plan, *out->stats, s.stats_ws, s.stats_ws_bytes, stream);
}

}  // namespace switchyard
