// switchyard/expert_parallel.h: one MoE layer whose experts are spread over W ranks (expert parallelism, issue 15).
//
// Every rank holds the router (gate, score bias) and the shared experts (replicated) and the weights of its own
// experts only. A forward on rank r, for its own T_r tokens (docs/expert_parallel.md has the whole data flow):
//   router      logits / topk_ids / topk_weights of the rank's tokens, as MoELayer computes them
//   plan        build_plan: the rank's rows in expert order (its send buffer order; dropless)
//   dispatch    xs [T_r*k, H] = gather(x, row_token)
//   counts      all_gather_counts of every rank's expert_counts [E] (+ its receive capacity): the one host
//               synchronisation of the forward (the counts are read on the host: NCCL's send/recv sizes are host
//               values, and they size the local grouped GEMMs)
//   exchange    all_to_all_v: each (destination rank, local expert) segment of xs is one chunk; the receive
//               buffer xr [R_recv, H] comes out grouped by local expert: for local expert l, the rows from rank 0,
//               then rank 1, ... (each in the sender's token order)
//   experts     grouped_gemm(xr, w13_local) -> activation -> grouped_gemm(., w2_local): the stages of MoELayer,
//               unchanged, over the L local experts
//   return      the reverse all_to_all_v: every output row goes back to the position its input row left from
//   shared      the shared expert on the rank's own tokens
//   combine     combine(returned rows, slot_row, topk_weights, shared) at home: the routing weights never travel
// The arithmetic of every row is that of MoELayer (a GEMM row does not depend on the other rows of its batch on
// the CPU backend), so y on every rank is bitwise the single-device layer's y for the same tokens on the CPU.
//
// Collective rules: every rank of the communicator calls forward() at the same time with a layer built on the same
// config and placement. Errors found before the first collective (bad arguments) throw on that rank only, as with
// any collective library: the other ranks then wait in the collective (the in-process communicator's group can be
// aborted to wake them: InProcessGroup::abort). Errors found from the exchanged counts (a rank whose receive
// buffer is too small) throw on every rank.
//
// Not supported in expert-parallel mode (the constructor refuses them): capacity-based dropping (capacity is a
// per-expert limit over the whole batch; per rank it would drop other pairs than the single-device layer) and
// expert-choice routing (each expert picks its top-C tokens of the whole batch).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "switchyard/config.h"
#include "switchyard/moe_layer.h"
#include "switchyard/tensor.h"

// Framework-free declaration of NCCL's communicator handle (identical to nccl.h's own typedef), so that this header
// does not need NCCL.
typedef struct ncclComm* ncclComm_t;

namespace switchyard {

// ---- placement ------------------------------------------------------------------------------------------------------
// Which rank holds each of E experts, and the expert's index among that rank's local experts (the order of the rank's
// w13 / w2 shards). Every rank holds at least one expert.
class ExpertPlacement {
 public:
    ExpertPlacement() = default;
    // Contiguous blocks: rank r holds experts [first(r), first(r+1)), the first E % W ranks one expert more than the
    // others (E = 256, W = 8: 32 each). Needs 1 <= W <= E.
    static ExpertPlacement contiguous(int64_t num_experts, int world_size);
    // An explicit map: experts_of_rank[r] lists rank r's experts (global ids) in local order. Every expert
    // 0..num_experts-1 must appear exactly once, and every rank must hold at least one.
    static ExpertPlacement from_lists(int64_t num_experts, const std::vector<std::vector<int32_t>>& experts_of_rank);

    int64_t num_experts() const { return static_cast<int64_t>(rank_of_.size()); }
    int world_size() const { return static_cast<int>(experts_of_rank_.size()); }
    int rank_of(int64_t expert) const;
    int64_t local_index(int64_t expert) const;
    int64_t num_local(int rank) const;
    // Global expert id of rank's local expert local_idx.
    int32_t global_expert(int rank, int64_t local_idx) const;
    const std::vector<int32_t>& local_experts(int rank) const;
    int64_t max_local() const;
    // "contiguous(E=8, W=4)" or "map(E=8, W=2: [0 3 5 6] [1 2 4 7])", for errors and logs.
    std::string to_string() const;

 private:
    std::vector<int32_t> rank_of_;      // [E]
    std::vector<int32_t> local_idx_;    // [E]
    std::vector<std::vector<int32_t>> experts_of_rank_;
    bool contiguous_ = false;
};

// ---- the exchange plan (pure host functions) --------------------------------------------------------------------------
// A run of rows of a buffer exchanged with one peer. Chunks exchanged between one pair of ranks are matched in
// order: the i-th chunk rank s sends to r lands in the i-th chunk r receives from s (they have the same length).
// Empty chunks are left out of the lists (both sides know the counts, so both leave out the same ones).
struct ExchangeChunk {
    int peer = 0;
    int64_t row_offset = 0;  // first row in the buffer
    int64_t rows = 0;        // > 0
};

// What rank `rank` sends and receives in one forward, from every rank's expert_counts (all_counts [W, E] row-major:
// all_counts[s*E + e] = rows rank s routes to expert e; its own row is its RoutingPlan's expert_counts).
//   sends: the rank's rows in expert order (its plan's order: expert e's rows at [offsets[e], offsets[e+1]), in
//          token order) cut at expert boundaries; for each destination d = 0..W-1, its local experts l = 0..L_d-1 in
//          local order: the rows of expert global(d, l).
//   recvs: for each source s = 0..W-1, each local expert l = 0..L-1: all_counts[s, global(rank, l)] rows, placed at
//          local_offsets[l] + (rows of local expert l from ranks 0..s-1). So the receive buffer holds local expert
//          0's rows (from rank 0, then rank 1, ...), then local expert 1's, ...; local_offsets [L+1] are the offsets
//          the local grouped GEMMs take.
//   The reverse exchange (expert outputs back home) swaps the two lists: output row i of the receive buffer returns
//   to the send-buffer row its input came from, so the plan's slot_row addresses the returned rows (the combine's
//   reverse mapping needs no table of its own).
struct ExchangePlan {
    int rank = 0;
    int world_size = 0;
    std::vector<ExchangeChunk> sends;
    std::vector<ExchangeChunk> recvs;
    std::vector<int64_t> send_rows_per_peer;  // [W]
    std::vector<int64_t> recv_rows_per_peer;  // [W]
    std::vector<int32_t> local_offsets;       // [L+1], local_offsets[L] = recv_rows
    int64_t send_rows = 0;                    // sum of all_counts[rank, :] (T*k when dropless)
    int64_t recv_rows = 0;
};
ExchangePlan make_exchange_plan(const ExpertPlacement& placement, int rank, const std::vector<int32_t>& all_counts);

// ---- communicator ---------------------------------------------------------------------------------------------------
// The collectives an expert-parallel forward needs, on buffers of the communicator's device (host memory for the
// in-process communicator, CUDA memory of device_index() for NCCL). Both calls are collective: every rank calls them
// in the same order. On CUDA they are enqueued on `stream` (no host synchronisation); on the CPU they return when the
// data has arrived.
class Communicator {
 public:
    virtual ~Communicator() = default;
    virtual int rank() const = 0;
    virtual int world_size() const = 0;
    virtual Device device() const = 0;
    virtual int device_index() const { return 0; }
    // recv [W*n] int32: recv[s*n + i] = rank s's send[i] (send [n]; n equal on every rank).
    virtual void all_gather_counts(const int32_t* send, int32_t* recv, int64_t n, cudaStream_t stream) = 0;
    // Sends the chunks of `sends` (rows of row_bytes bytes from send_base) and receives the chunks of `recvs` into
    // recv_base, matched per pair of ranks in order (ExchangeChunk). send and receive buffers must not overlap.
    virtual void all_to_all_v(const void* send_base, const std::vector<ExchangeChunk>& sends, void* recv_base,
                              const std::vector<ExchangeChunk>& recvs, size_t row_bytes, cudaStream_t stream) = 0;
};

// In-process ranks (threads as ranks, host memory): the stand-in collective of the CPU tests and of the CPU backend.
// One InProcessGroup is shared by W threads; thread r uses communicator(r). The collectives rendezvous on a barrier of
// the group; every rank checks that the others called the same collective and that the chunk lists match.
class InProcessGroup {
 public:
    explicit InProcessGroup(int world_size);
    ~InProcessGroup();
    int world_size() const;
    // Rank r's communicator (owned by the group; one thread per rank at a time).
    Communicator& communicator(int rank);
    // Wakes every rank waiting in (or later entering) a collective of this group with a switchyard::Error naming
    // `reason` (a rank that failed outside a collective calls it so the others do not wait for it forever).
    void abort(const std::string& reason);

    struct State;

 private:
    std::unique_ptr<State> state_;
};

// NCCL: grouped ncclSend / ncclRecv (inside ncclGroupStart / ncclGroupEnd) on the caller's communicator, which stays
// the caller's (not destroyed). CUDA memory of the communicator's device. Throws when this build has no NCCL
// (nccl_available()).
std::unique_ptr<Communicator> make_nccl_communicator(ncclComm_t comm);
bool nccl_available();

// ---- the layer ------------------------------------------------------------------------------------------------------
struct ExpertParallelOptions {
    // Most tokens any rank passes to one forward (the same value on every rank). It sizes the receive buffers of a
    // caller-owned workspace (workspace_size): a rank receives at most W * max_tokens_per_rank * min(k, L) rows.
    // 0: no bound; then only the CPU convenience forward(x, y), which sizes them from the exchanged counts, runs.
    int64_t max_tokens_per_rank = 0;
};

class ExpertParallelMoELayer {
 public:
    // cfg: the whole layer (E = all experts). weights: gate [E, H] and score_bias [E] (the router, replicated), the
    // shared expert (replicated), and this rank's experts only: w13 [L, R13, H], w2 [L, H, F] (and, for FP8 layers,
    // their scales [L, ...] / input scales [L]) in placement.local_experts(comm.rank()) order. comm is the caller's
    // and must outlive the layer. Throws switchyard::Error naming the first bad argument.
    ExpertParallelMoELayer(const MoEConfig& cfg, const ExpertPlacement& placement, const MoEWeights& weights,
                           Communicator& comm, const ExpertParallelOptions& options = ExpertParallelOptions());
    ~ExpertParallelMoELayer();
    ExpertParallelMoELayer(ExpertParallelMoELayer&&) noexcept;
    ExpertParallelMoELayer& operator=(ExpertParallelMoELayer&&) noexcept;

    const MoEConfig& config() const { return cfg_; }
    const ExpertPlacement& placement() const { return placement_; }
    int rank() const;
    int64_t num_local_experts() const;
    Device device() const;

    // Rows this rank can receive: W * max_tokens_per_rank * min(k, L).
    int64_t max_recv_rows() const;
    // Bytes of workspace forward() needs for num_tokens tokens (options.max_tokens_per_rank > 0; num_tokens <= it).
    size_t workspace_size(int64_t num_tokens) const;
    std::vector<WorkspaceSlice> workspace_layout(int64_t num_tokens) const;

    // x [T, H], y [T, H] of cfg.dtype on the layer's device, T this rank's token count (0 allowed). Collective.
    // out (optional): logits, topk_ids, topk_weights, slot_row (rows of this rank's send buffer), expert_counts [E]
    // (pairs this rank routed to each expert) and stats (LoadStats of this rank's tokens), as MoELayer::forward.
    // on_stage: begin, router, plan, dispatch, counts, exchange, gemm1, activation, gemm2, return, shared (with
    // shared experts), combine.
    void forward(const TensorRef& x, const TensorRef& y, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream = nullptr, ForwardOutputs* out = nullptr,
                 const StageCallback& on_stage = StageCallback()) const;
    // CPU convenience: host scratch of its own, the receive buffers sized from the exchanged counts.
    void forward(const TensorRef& x, const TensorRef& y, ForwardOutputs* out = nullptr) const;

    struct Impl;

 private:
    MoEConfig cfg_;
    ExpertPlacement placement_;
    std::unique_ptr<Impl> impl_;
};

}  // namespace switchyard
