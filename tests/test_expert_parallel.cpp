// tests/test_expert_parallel.cpp: expert parallelism on the CPU (issue 15): the placement, the exchange plan, the
// in-process communicator (threads as ranks) and ExpertParallelMoELayer against the single-device MoELayer.
//
// The layer check is exact: on the CPU backend a GEMM row does not depend on the other rows of its batch (gemm_nt
// sums each element in increasing k, in double, whatever the blocking), routing is per token and the combine sums the
// slots of a token in order, so rank r's y must equal, bit for bit, the rows of its tokens in the single-device
// layer's y over all ranks' tokens, for any W and placement.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "switchyard/expert_parallel.h"
#include "switchyard/moe_layer.h"
#include "switchyard/stages.h"
#include "test_util.h"
#include "util/workspace.h"

namespace switchyard {
namespace {

using test::HostTensor;

// Runs fn(rank, comm) on W threads of one in-process group. A rank that throws aborts the group (so the others do not
// wait for it) and its message is returned in errors[rank] ("" when it returned normally).
std::vector<std::string> run_ranks(int world, const std::function<void(int, Communicator&)>& fn) {
    InProcessGroup group(world);
    std::vector<std::string> errors(static_cast<size_t>(world));
    std::vector<std::thread> threads;
    for (int r = 0; r < world; ++r)
        threads.emplace_back([&, r] {
            try {
                fn(r, group.communicator(r));
            } catch (const std::exception& e) {
                errors[r] = e.what();
                group.abort(std::string("rank ") + std::to_string(r) + " failed: " + e.what());
            }
        });
    for (auto& t : threads) t.join();
    return errors;
}

void expect_no_errors(const std::vector<std::string>& errors) {
    for (size_t r = 0; r < errors.size(); ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

// ---- placement ------------------------------------------------------------------------------------------------------

TEST(ExpertPlacement, ContiguousBlocks) {
    const ExpertPlacement p = ExpertPlacement::contiguous(8, 4);
    EXPECT_EQ(p.num_experts(), 8);
    EXPECT_EQ(p.world_size(), 4);
    EXPECT_EQ(p.max_local(), 2);
    for (int64_t e = 0; e < 8; ++e) {
        EXPECT_EQ(p.rank_of(e), e / 2) << "expert " << e;
        EXPECT_EQ(p.local_index(e), e % 2) << "expert " << e;
        EXPECT_EQ(p.global_expert(p.rank_of(e), p.local_index(e)), e);
    }
    EXPECT_EQ(p.to_string(), "contiguous(E=8, W=4)");
    // Uneven: the first E % W ranks hold one more.
    const ExpertPlacement q = ExpertPlacement::contiguous(10, 4);
    EXPECT_EQ(q.local_experts(0), (std::vector<int32_t>{0, 1, 2}));
    EXPECT_EQ(q.local_experts(1), (std::vector<int32_t>{3, 4, 5}));
    EXPECT_EQ(q.local_experts(2), (std::vector<int32_t>{6, 7}));
    EXPECT_EQ(q.local_experts(3), (std::vector<int32_t>{8, 9}));
    EXPECT_EQ(q.max_local(), 3);
    const ExpertPlacement one = ExpertPlacement::contiguous(5, 1);
    EXPECT_EQ(one.num_local(0), 5);
}

TEST(ExpertPlacement, ExplicitMap) {
    const ExpertPlacement p = ExpertPlacement::from_lists(6, {{4, 0, 2}, {5}, {1, 3}});
    EXPECT_EQ(p.world_size(), 3);
    EXPECT_EQ(p.rank_of(4), 0);
    EXPECT_EQ(p.local_index(4), 0);
    EXPECT_EQ(p.local_index(2), 2);
    EXPECT_EQ(p.rank_of(5), 1);
    EXPECT_EQ(p.rank_of(3), 2);
    EXPECT_EQ(p.local_index(3), 1);
    EXPECT_EQ(p.global_expert(2, 0), 1);
    EXPECT_EQ(p.to_string(), "map(E=6, W=3: [4 0 2] [5] [1 3])");
}

TEST(ExpertPlacement, Validation) {
    test::expect_error([] { ExpertPlacement::contiguous(8, 0); }, {"world_size=0"});
    test::expect_error([] { ExpertPlacement::contiguous(3, 4); }, {"num_experts=3", "at least one expert"});
    test::expect_error([] { ExpertPlacement::from_lists(4, {}); }, {"0 ranks"});
    test::expect_error([] { ExpertPlacement::from_lists(4, {{0, 1}, {2, 1}}); },
                       {"expert 1 is placed twice", "experts_of_rank[0][1]", "experts_of_rank[1][1]"});
    test::expect_error([] { ExpertPlacement::from_lists(4, {{0, 1}, {2}}); }, {"expert 3 is on no rank"});
    test::expect_error([] { ExpertPlacement::from_lists(4, {{0, 1, 2, 3}, {}}); }, {"experts_of_rank[1] is empty"});
    test::expect_error([] { ExpertPlacement::from_lists(4, {{0, 1}, {2, 4}}); },
                       {"experts_of_rank[1][1]=4", "not an expert id"});
    test::expect_error([] { ExpertPlacement::from_lists(4, {{0, 1}, {2, -1}}); }, {"experts_of_rank[1][1]=-1"});
    const ExpertPlacement p = ExpertPlacement::contiguous(4, 2);
    test::expect_error([&] { p.rank_of(4); }, {"expert=4"});
    test::expect_error([&] { p.local_experts(2); }, {"rank=2"});
    test::expect_error([&] { p.global_expert(1, 2); }, {"local_idx=2"});
}

// ---- exchange plan --------------------------------------------------------------------------------------------------

// A random placement of E experts over W ranks (each rank at least one), contiguous when `contiguous`.
ExpertPlacement random_placement(int64_t E, int W, std::mt19937_64& gen, bool contiguous) {
    if (contiguous) return ExpertPlacement::contiguous(E, W);
    std::vector<int32_t> perm(static_cast<size_t>(E));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), gen);
    std::vector<std::vector<int32_t>> lists(static_cast<size_t>(W));
    for (int r = 0; r < W; ++r) lists[r].push_back(perm[r]);  // one each, the rest anywhere
    for (int64_t i = W; i < E; ++i) lists[gen() % W].push_back(perm[i]);
    return ExpertPlacement::from_lists(E, lists);
}

// The label of row i of rank s's send buffer, and what the plan says about it: the rows of rank s are its plan's
// expert order (expert e's rows at the scan of its counts).
struct Label {
    int src;
    int64_t row;
    bool operator==(const Label& o) const { return src == o.src && row == o.row; }
};

int64_t expert_of_row(const std::vector<int32_t>& all_counts, int64_t E, int s, int64_t row) {
    int64_t begin = 0;
    for (int64_t e = 0; e < E; ++e) {
        const int64_t n = all_counts[s * E + e];
        if (row < begin + n) return e;
        begin += n;
    }
    return -1;
}

// Every chunk list tiles [0, total) exactly once.
void expect_tiles(const std::vector<ExchangeChunk>& chunks, int64_t total, const std::string& what) {
    std::vector<int> hits(static_cast<size_t>(total), 0);
    for (const ExchangeChunk& c : chunks) {
        ASSERT_GT(c.rows, 0) << what;
        ASSERT_GE(c.row_offset, 0) << what;
        ASSERT_LE(c.row_offset + c.rows, total) << what;
        for (int64_t i = c.row_offset; i < c.row_offset + c.rows; ++i) ++hits[i];
    }
    for (int64_t i = 0; i < total; ++i) ASSERT_EQ(hits[i], 1) << what << ": row " << i;
}

// Moves labels as the plans say (sends of s to r matched in order with r's receives from s); returns each rank's
// receive buffer.
std::vector<std::vector<Label>> simulate(const std::vector<ExchangePlan>& plans,
                                         const std::vector<std::vector<Label>>& send, bool reverse) {
    const int W = static_cast<int>(plans.size());
    std::vector<std::vector<Label>> recv(static_cast<size_t>(W));
    for (int r = 0; r < W; ++r)
        recv[r].assign(static_cast<size_t>(reverse ? plans[r].send_rows : plans[r].recv_rows), Label{-1, -1});
    for (int s = 0; s < W; ++s)
        for (int r = 0; r < W; ++r) {
            std::vector<ExchangeChunk> out, in;
            for (const ExchangeChunk& c : reverse ? plans[s].recvs : plans[s].sends)
                if (c.peer == r) out.push_back(c);
            for (const ExchangeChunk& c : reverse ? plans[r].sends : plans[r].recvs)
                if (c.peer == s) in.push_back(c);
            EXPECT_EQ(out.size(), in.size()) << "chunks " << s << " -> " << r;
            for (size_t i = 0; i < std::min(out.size(), in.size()); ++i) {
                EXPECT_EQ(out[i].rows, in[i].rows) << "chunk " << i << " of " << s << " -> " << r;
                for (int64_t j = 0; j < std::min(out[i].rows, in[i].rows); ++j)
                    recv[r][in[i].row_offset + j] = send[s][out[i].row_offset + j];
            }
        }
    return recv;
}

TEST(ExchangePlan, EveryRowOnceGroupedByLocalExpertAndBackHome) {
    std::mt19937_64 gen(15);
    for (int trial = 0; trial < 60; ++trial) {
        const int W = 1 + static_cast<int>(gen() % 5);
        const int64_t E = W + static_cast<int64_t>(gen() % 9);
        const ExpertPlacement placement = random_placement(E, W, gen, trial % 3 == 0);
        SCOPED_TRACE("trial " + std::to_string(trial) + " " + placement.to_string());
        // Uneven loads: some experts get nothing, some many rows; some ranks send nothing.
        std::vector<int32_t> counts(static_cast<size_t>(W * E));
        for (auto& c : counts) c = gen() % 3 == 0 ? 0 : static_cast<int32_t>(gen() % 7);
        if (W > 1) std::fill(counts.begin() + E, counts.begin() + 2 * E, 0);  // rank 1 routes nothing (T = 0)
        std::vector<ExchangePlan> plans;
        for (int r = 0; r < W; ++r) plans.push_back(make_exchange_plan(placement, r, counts));
        std::vector<std::vector<Label>> send(static_cast<size_t>(W));
        for (int s = 0; s < W; ++s) {
            const ExchangePlan& p = plans[s];
            int64_t mine = 0;
            for (int64_t e = 0; e < E; ++e) mine += counts[s * E + e];
            ASSERT_EQ(p.send_rows, mine);
            expect_tiles(p.sends, p.send_rows, "sends of rank " + std::to_string(s));
            expect_tiles(p.recvs, p.recv_rows, "recvs of rank " + std::to_string(s));
            // A send chunk is one expert's rows, sent to the expert's rank; to one peer in its local order.
            std::vector<int64_t> last_local(static_cast<size_t>(W), -1);
            for (const ExchangeChunk& c : p.sends) {
                const int64_t e = expert_of_row(counts, E, s, c.row_offset);
                ASSERT_GE(e, 0);
                EXPECT_EQ(expert_of_row(counts, E, s, c.row_offset + c.rows - 1), e);
                EXPECT_EQ(c.rows, counts[s * E + e]);
                EXPECT_EQ(c.peer, placement.rank_of(e));
                EXPECT_GT(placement.local_index(e), last_local[c.peer]);
                last_local[c.peer] = placement.local_index(e);
            }
            for (int d = 0; d < W; ++d) {
                int64_t n = 0;
                for (int32_t e : placement.local_experts(d)) n += counts[s * E + e];
                EXPECT_EQ(p.send_rows_per_peer[d], n);
                EXPECT_EQ(plans[d].recv_rows_per_peer[s], n);
            }
            const int64_t L = placement.num_local(s);
            ASSERT_EQ(static_cast<int64_t>(p.local_offsets.size()), L + 1);
            EXPECT_EQ(p.local_offsets[0], 0);
            EXPECT_EQ(p.local_offsets[L], p.recv_rows);
            for (int64_t l = 0; l < L; ++l) {
                int64_t n = 0;
                for (int q = 0; q < W; ++q) n += counts[q * E + placement.global_expert(s, l)];
                EXPECT_EQ(p.local_offsets[l + 1] - p.local_offsets[l], n) << "local expert " << l;
            }
            for (int64_t i = 0; i < p.send_rows; ++i) send[s].push_back({s, i});
        }
        // Forward: rank r's local expert l block holds exactly the rows routed to global(r, l), from rank 0 up,
        // each source's rows in its (token) order.
        const auto recv = simulate(plans, send, false);
        for (int r = 0; r < W; ++r)
            for (int64_t l = 0; l < placement.num_local(r); ++l) {
                const int64_t e = placement.global_expert(r, l);
                Label prev{-1, -1};
                for (int64_t i = plans[r].local_offsets[l]; i < plans[r].local_offsets[l + 1]; ++i) {
                    const Label& got = recv[r][i];
                    ASSERT_GE(got.src, 0) << "rank " << r << " row " << i << " received nothing";
                    EXPECT_EQ(expert_of_row(counts, E, got.src, got.row), e) << "rank " << r << " row " << i;
                    EXPECT_TRUE(got.src > prev.src || (got.src == prev.src && got.row > prev.row))
                        << "rank " << r << " row " << i << " out of order";
                    prev = got;
                }
            }
        // Back: every row returns to where it left from.
        const auto back = simulate(plans, recv, true);
        for (int s = 0; s < W; ++s)
            for (int64_t i = 0; i < plans[s].send_rows; ++i)
                ASSERT_TRUE(back[s][i] == (Label{s, i})) << "rank " << s << " row " << i;
    }
}

TEST(ExchangePlan, Validation) {
    const ExpertPlacement p = ExpertPlacement::contiguous(4, 2);
    test::expect_error([&] { make_exchange_plan(p, 2, std::vector<int32_t>(8, 1)); }, {"rank=2"});
    test::expect_error([&] { make_exchange_plan(p, 0, std::vector<int32_t>(7, 1)); },
                       {"all_counts has 7 entries", "world_size*num_experts=8"});
    std::vector<int32_t> c(8, 1);
    c[5] = -3;
    test::expect_error([&] { make_exchange_plan(p, 0, c); }, {"all_counts[5] (rank 1, expert 1)=-3"});
}

// ---- the in-process communicator --------------------------------------------------------------------------------------

TEST(InProcessCommunicator, ExchangeRoundTrip) {
    std::mt19937_64 gen(7);
    for (int W : {1, 2, 3, 4}) {
        const int64_t E = W + 3;
        const ExpertPlacement placement = random_placement(E, W, gen, W == 2);
        SCOPED_TRACE(placement.to_string());
        std::vector<std::vector<int32_t>> counts(static_cast<size_t>(W));
        for (auto& c : counts)
            for (int64_t e = 0; e < E; ++e) c.push_back(static_cast<int32_t>(gen() % 5));
        const size_t row_bytes = 3 * sizeof(int32_t);  // rows of (source rank, row, checksum)
        expect_no_errors(run_ranks(W, [&](int rank, Communicator& comm) {
            std::vector<int32_t> all(static_cast<size_t>(W * E));
            comm.all_gather_counts(counts[rank].data(), all.data(), E, nullptr);
            for (int s = 0; s < W; ++s)
                for (int64_t e = 0; e < E; ++e) ASSERT_EQ(all[s * E + e], counts[s][e]);
            const ExchangePlan p = make_exchange_plan(placement, rank, all);
            std::vector<int32_t> rows(static_cast<size_t>(3 * p.send_rows));
            for (int64_t i = 0; i < p.send_rows; ++i) {
                rows[3 * i] = rank;
                rows[3 * i + 1] = static_cast<int32_t>(i);
                rows[3 * i + 2] = rank * 1000 + static_cast<int32_t>(i);
            }
            std::vector<int32_t> recv(static_cast<size_t>(3 * p.recv_rows), -1);
            comm.all_to_all_v(rows.data(), p.sends, recv.data(), p.recvs, row_bytes, nullptr);
            for (int64_t l = 0; l < placement.num_local(rank); ++l)
                for (int64_t i = p.local_offsets[l]; i < p.local_offsets[l + 1]; ++i) {
                    const int src = recv[3 * i], row = recv[3 * i + 1];
                    ASSERT_TRUE(src >= 0 && src < W) << "row " << i;
                    EXPECT_EQ(recv[3 * i + 2], src * 1000 + row);
                    EXPECT_EQ(expert_of_row(all, E, src, row), placement.global_expert(rank, l)) << "row " << i;
                }
            std::vector<int32_t> back(rows.size(), -1);
            comm.all_to_all_v(recv.data(), p.recvs, back.data(), p.sends, row_bytes, nullptr);
            EXPECT_EQ(back, rows);
        }));
    }
}

TEST(InProcessCommunicator, MismatchedCallsFailOnEveryRank) {
    // Different count lengths: every rank sees the mismatch.
    auto errors = run_ranks(2, [](int rank, Communicator& comm) {
        std::vector<int32_t> send(3, rank), recv(6);
        comm.all_gather_counts(send.data(), recv.data(), rank == 0 ? 2 : 3, nullptr);
    });
    for (const auto& e : errors) EXPECT_NE(e.find("all_gather_counts: rank"), std::string::npos) << e;
    // Different collectives.
    errors = run_ranks(2, [](int rank, Communicator& comm) {
        std::vector<int32_t> send(2, rank), recv(4);
        if (rank == 0) comm.all_gather_counts(send.data(), recv.data(), 2, nullptr);
        else comm.all_to_all_v(send.data(), {}, recv.data(), {}, 4, nullptr);
    });
    for (const auto& e : errors) EXPECT_NE(e.find("entered"), std::string::npos) << e;
    // Chunk lists that do not match: the receiving rank finds it, and both ranks throw it once neither reads the
    // other's buffers any more.
    errors = run_ranks(2, [](int rank, Communicator& comm) {
        std::vector<int32_t> buf(8, rank), recv(8);
        std::vector<ExchangeChunk> sends, recvs;
        if (rank == 0) sends.push_back({1, 0, 3});
        if (rank == 1) recvs.push_back({0, 0, 2});
        comm.all_to_all_v(buf.data(), sends, recv.data(), recvs, 4, nullptr);
    });
    for (const auto& e : errors) EXPECT_NE(e.find("rank 1: all_to_all_v: chunk 0 from rank 0 has 3 rows, the receive chunk 2"), std::string::npos) << e;
    // A rank that fails outside a collective: the others are woken, not left waiting.
    errors = run_ranks(3, [](int rank, Communicator& comm) {
        if (rank == 2) SWITCHYARD_FAIL("bad input on rank 2");
        std::vector<int32_t> send(1, rank), recv(3);
        comm.all_gather_counts(send.data(), recv.data(), 1, nullptr);
    });
    EXPECT_NE(errors[0].find("bad input on rank 2"), std::string::npos) << errors[0];
    EXPECT_NE(errors[1].find("bad input on rank 2"), std::string::npos) << errors[1];
}

// ---- the layer ----------------------------------------------------------------------------------------------------

// Rank r's shard of an [E, ...] expert tensor: the rows of its local experts, in local order.
HostTensor shard(const HostTensor& t, const ExpertPlacement& p, int rank) {
    std::vector<int64_t> shape = t.shape();
    const size_t per = static_cast<size_t>(t.numel() / shape[0]) * dtype_size(t.dtype());
    shape[0] = p.num_local(rank);
    HostTensor s(t.dtype(), shape);
    for (int64_t l = 0; l < shape[0]; ++l)
        std::memcpy(static_cast<char*>(s.data()) + l * per,
                    static_cast<const char*>(t.data()) + p.global_expert(rank, l) * per, per);
    return s;
}

HostTensor rows_of(const HostTensor& t, int64_t begin, int64_t count) {
    std::vector<int64_t> shape = t.shape();
    const size_t per = static_cast<size_t>(shape[1]) * dtype_size(t.dtype());
    shape[0] = count;
    HostTensor s(t.dtype(), shape);
    if (count > 0) std::memcpy(s.data(), static_cast<const char*>(t.data()) + begin * per, count * per);
    return s;
}

struct EpCase {
    std::string name;
    MoEConfig cfg;
    bool explicit_map;
};

std::vector<EpCase> ep_cases(DType dtype) {
    std::vector<EpCase> cases;
    MoEConfig a;  // plain softmax top-2
    a.hidden_size = 16;
    a.ffn_size = 12;
    a.num_experts = 8;
    a.top_k = 2;
    a.dtype = dtype;
    cases.push_back({"softmax", a, false});
    MoEConfig b = a;  // DeepSeek-V3 style: sigmoid, bias, groups, renormalise, scale, a shared expert
    b.num_experts = 8;
    b.top_k = 3;
    b.score_function = ScoreFunction::kSigmoid;
    b.use_score_bias = true;
    b.num_groups = 4;
    b.topk_groups = 2;
    b.renormalize = true;
    b.routed_scale = 2.5;
    b.num_shared_experts = 1;
    b.shared_ffn_size = 10;
    cases.push_back({"sigmoid_groups_bias_shared", b, false});
    MoEConfig c = a;  // Qwen2-MoE style: top-k then softmax, gated shared expert, GeGLU, a scattered placement
    c.num_experts = 12;
    c.top_k = 4;
    c.score_function = ScoreFunction::kTopkSoftmax;
    c.activation = Activation::kGeGLU;
    c.num_shared_experts = 2;
    c.shared_ffn_size = 6;
    c.shared_expert_gate = true;
    cases.push_back({"topk_softmax_gated_shared_map", c, true});
    MoEConfig d = a;  // ungated, one expert per rank at W = 4, a bias that sends most pairs to expert 0
    d.num_experts = 4;
    d.top_k = 1;
    d.activation = Activation::kGELU;
    d.score_function = ScoreFunction::kSigmoid;
    d.use_score_bias = true;
    cases.push_back({"gelu_skewed_load", d, false});
    MoEConfig e = a;  // w13 in the interleaved layout on the ranks (MoEConfig::gate_up_interleaved), plain on the reference
    e.ffn_size = 16;
    e.gate_up_interleaved = true;
    cases.push_back({"interleaved_w13", e, true});
    return cases;
}

// Tokens of each rank for W ranks (one rank with none where W > 1).
std::vector<int64_t> token_split(int W, int variant) {
    if (W == 1) return {41};
    if (W == 2) return variant % 2 == 0 ? std::vector<int64_t>{0, 41} : std::vector<int64_t>{17, 24};
    return {13, 0, 21, 7};
}

// Runs the single-device layer on all tokens and the EP layer on W ranks, and compares every rank's outputs with the
// rows of its tokens, bit for bit. With cfg.gate_up_interleaved the ranks get w13 interleaved (interleave_gate_up) and
// the reference runs the plain layout.
void check_ep_against_single_device(const EpCase& ec, int W, DType weight_dtype, uint64_t seed, int variant,
                                    int64_t max_tokens_per_rank) {
    const MoEConfig& cfg = ec.cfg;
    test::HostLayer L = test::random_layer(cfg, seed, weight_dtype);
    if (cfg.use_score_bias && cfg.top_k == 1) {  // a skewed load: expert 0 wins most tokens
        std::vector<float> b = L.score_bias.to_floats();
        b[0] = 0.45f;
        L.score_bias = HostTensor::from_floats(b, DType::kF32, {cfg.num_experts});
    }
    const std::vector<int64_t> split = token_split(W, variant);
    const int64_t T = std::accumulate(split.begin(), split.end(), int64_t{0}), H = cfg.hidden_size, k = cfg.top_k;
    const HostTensor x = HostTensor::from_floats(test::random_uniform(T * H, seed * 31 + 9), cfg.dtype, {T, H});
    HostTensor y_ref(cfg.dtype, {T, H}), ids_ref(DType::kI32, {T, k}), w_ref(DType::kF32, {T, k});
    ForwardOutputs ref_out;
    ref_out.topk_ids = ids_ref.ref();
    ref_out.topk_weights = w_ref.ref();
    MoEConfig ref_cfg = cfg;
    ref_cfg.gate_up_interleaved = false;
    MoELayer(ref_cfg, L.weights()).forward(x.ref(), y_ref.ref(), &ref_out);
    HostTensor w13_ranks(L.w13.dtype(), L.w13.shape());
    if (cfg.gate_up_interleaved)
        interleave_gate_up(L.w13.ref(), w13_ranks.ref());
    else
        std::memcpy(w13_ranks.data(), L.w13.data(), static_cast<size_t>(L.w13.numel()) * dtype_size(L.w13.dtype()));

    std::mt19937_64 gen(seed);
    const ExpertPlacement placement = random_placement(cfg.num_experts, W, gen, !ec.explicit_map);
    SCOPED_TRACE(ec.name + " W=" + std::to_string(W) + " " + placement.to_string() + " " + test::seed_trace(seed) +
                 " max_tokens_per_rank=" + std::to_string(max_tokens_per_rank));
    std::vector<int64_t> begin(static_cast<size_t>(W), 0);
    for (int r = 1; r < W; ++r) begin[r] = begin[r - 1] + split[r - 1];
    std::vector<HostTensor> y(W), ids(W), wts(W), counts(W);
    std::vector<std::vector<std::string>> stages(W);
    expect_no_errors(run_ranks(W, [&](int rank, Communicator& comm) {
        const HostTensor w13 = shard(w13_ranks, placement, rank), w2 = shard(L.w2, placement, rank);
        MoEWeights w = L.weights();
        w.w13 = w13.ref();
        w.w2 = w2.ref();
        ExpertParallelOptions opt;
        opt.max_tokens_per_rank = max_tokens_per_rank;
        const ExpertParallelMoELayer layer(cfg, placement, w, comm, opt);
        EXPECT_EQ(layer.num_local_experts(), placement.num_local(rank));
        const int64_t t = split[rank];
        const HostTensor xr = rows_of(x, begin[rank], t);
        y[rank] = HostTensor(cfg.dtype, {t, H});
        ids[rank] = HostTensor(DType::kI32, {t, k});
        wts[rank] = HostTensor(DType::kF32, {t, k});
        counts[rank] = HostTensor(DType::kI32, {cfg.num_experts});
        ForwardOutputs out;
        out.topk_ids = ids[rank].ref();
        out.topk_weights = wts[rank].ref();
        out.expert_counts = counts[rank].ref();
        if (max_tokens_per_rank == 0) {
            layer.forward(xr.ref(), y[rank].ref(), &out);
            return;
        }
        std::vector<char> ws(layer.workspace_size(t) + 256);
        void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws.data()) + 255) / 256 * 256);
        layer.forward(xr.ref(), y[rank].ref(), aligned, layer.workspace_size(t), nullptr, &out,
                      [&](const char* stage, cudaStream_t) { stages[rank].push_back(stage); });
    }));
    for (int r = 0; r < W; ++r) {
        SCOPED_TRACE("rank " + std::to_string(r));
        const int64_t t = split[r];
        ASSERT_TRUE(test::all_equal(y[r].to_floats(), rows_of(y_ref, begin[r], t).to_floats(), {t, H}));
        EXPECT_TRUE(test::all_equal(ids[r].to_floats(), rows_of(ids_ref, begin[r], t).to_floats(), {t, k}));
        EXPECT_TRUE(test::all_equal(wts[r].to_floats(), rows_of(w_ref, begin[r], t).to_floats(), {t, k}));
        std::vector<float> want(static_cast<size_t>(cfg.num_experts), 0.0f);
        for (int64_t i = begin[r] * k; i < (begin[r] + t) * k; ++i) want[ids_ref.ptr<int32_t>()[i]] += 1.0f;
        EXPECT_TRUE(test::all_equal(counts[r].to_floats(), want, {cfg.num_experts}));
        if (max_tokens_per_rank > 0) {
            std::vector<std::string> expected = {"begin", "router", "plan", "dispatch", "counts", "exchange",
                                                 "gemm1", "activation", "gemm2", "return"};
            if (cfg.num_shared_experts > 0 && t > 0) expected.push_back("shared");
            expected.push_back("combine");
            EXPECT_EQ(stages[r], expected);
        }
    }
}

TEST(ExpertParallelLayer, MatchesSingleDeviceBitwise) {
    for (DType dtype : {DType::kF32, DType::kBF16})
        for (const EpCase& ec : ep_cases(dtype))
            for (int W : {1, 2, 4})
                for (int variant : {0, 1}) {
                    if (W == 1 && variant == 1) continue;
                    check_ep_against_single_device(ec, W, dtype, 100 + W * 10 + variant, variant, 0);
                }
}

TEST(ExpertParallelLayer, CallerWorkspaceMatchesSingleDeviceBitwise) {
    // A caller's workspace sized for max_tokens_per_rank (the CUDA path's sizing), and the stage callback's order.
    for (const EpCase& ec : ep_cases(DType::kBF16))
        for (int W : {1, 2, 4}) check_ep_against_single_device(ec, W, DType::kBF16, 7 + W, 1, 48);
}

TEST(ExpertParallelLayer, Fp16WeightsUnderFp32Activations) {
    // The CPU backend reads weights of another float dtype (MoELayer's rule), shards included.
    for (const EpCase& ec : ep_cases(DType::kF32)) check_ep_against_single_device(ec, 2, DType::kF16, 77, 1, 0);
}

TEST(ExpertParallelLayer, WorkspaceLayout) {
    const EpCase ec = ep_cases(DType::kBF16)[1];
    const test::HostLayer L = test::random_layer(ec.cfg, 3, DType::kBF16);
    const ExpertPlacement placement = ExpertPlacement::contiguous(ec.cfg.num_experts, 2);
    expect_no_errors(run_ranks(2, [&](int rank, Communicator& comm) {
        const HostTensor w13 = shard(L.w13, placement, rank), w2 = shard(L.w2, placement, rank);
        MoEWeights w = L.weights();
        w.w13 = w13.ref();
        w.w2 = w2.ref();
        ExpertParallelOptions opt;
        opt.max_tokens_per_rank = 40;
        const ExpertParallelMoELayer layer(ec.cfg, placement, w, comm, opt);
        EXPECT_EQ(layer.max_recv_rows(), 2 * 40 * 3);  // W * max_tokens * min(k = 3, L = 4)
        const auto slices = layer.workspace_layout(40);
        size_t end = 0;
        bool has_recv = false;
        for (const WorkspaceSlice& s : slices) {
            EXPECT_EQ(s.offset, end) << s.name;  // consecutive, 256-byte aligned
            EXPECT_EQ(s.offset % 256, 0u) << s.name;
            end = s.offset + s.bytes;
            if (s.name == "recv_rows") {
                has_recv = true;
                EXPECT_EQ(s.bytes, align_up(static_cast<size_t>(2 * 40 * 3 * ec.cfg.hidden_size * 2)));
            }
        }
        EXPECT_TRUE(has_recv);
        EXPECT_EQ(layer.workspace_size(40), end);
        test::expect_error([&] { layer.workspace_size(41); }, {"num_tokens=41", "max_tokens_per_rank=40"});
        // A workspace one byte short is refused before any collective (both ranks, same sizes).
        std::vector<char> ws(end + 256);
        void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws.data()) + 255) / 256 * 256);
        HostTensor x(DType::kBF16, {40, ec.cfg.hidden_size}), y(DType::kBF16, {40, ec.cfg.hidden_size});
        test::expect_error([&] { layer.forward(x.ref(), y.ref(), aligned, end - 1); }, {"workspace"});
    }));
}

TEST(ExpertParallelLayer, ReceiveOverflowFailsOnEveryRank) {
    // Rank 0 sizes its workspace for 2 tokens per rank, rank 1 for 32 and passes 20: rank 0 would receive more rows
    // than it has room for. Both ranks see every rank's capacity in the counts and throw together.
    const EpCase ec = ep_cases(DType::kF32)[0];
    const test::HostLayer L = test::random_layer(ec.cfg, 5);
    const ExpertPlacement placement = ExpertPlacement::contiguous(ec.cfg.num_experts, 2);
    const int64_t H = ec.cfg.hidden_size;
    const auto errors = run_ranks(2, [&](int rank, Communicator& comm) {
        const HostTensor w13 = shard(L.w13, placement, rank), w2 = shard(L.w2, placement, rank);
        MoEWeights w = L.weights();
        w.w13 = w13.ref();
        w.w2 = w2.ref();
        ExpertParallelOptions opt;
        opt.max_tokens_per_rank = rank == 0 ? 2 : 32;
        const ExpertParallelMoELayer layer(ec.cfg, placement, w, comm, opt);
        const int64_t t = rank == 0 ? 2 : 20;
        const HostTensor x = HostTensor::from_floats(test::random_uniform(t * H, 11 + rank), DType::kF32, {t, H});
        HostTensor y(DType::kF32, {t, H});
        std::vector<char> ws(layer.workspace_size(t) + 256);
        void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws.data()) + 255) / 256 * 256);
        layer.forward(x.ref(), y.ref(), aligned, layer.workspace_size(t));
    });
    for (int r = 0; r < 2; ++r)
        EXPECT_NE(errors[r].find("rank 0 would receive"), std::string::npos) << "rank " << r << ": " << errors[r];
}

TEST(ExpertParallelLayer, Validation) {
    MoEConfig cfg = ep_cases(DType::kF32)[0].cfg;
    const test::HostLayer L = test::random_layer(cfg, 9);
    const ExpertPlacement placement = ExpertPlacement::contiguous(cfg.num_experts, 2);
    InProcessGroup group(2);
    Communicator& comm = group.communicator(1);
    const HostTensor w13 = shard(L.w13, placement, 1), w2 = shard(L.w2, placement, 1);
    MoEWeights w = L.weights();
    w.w13 = w13.ref();
    w.w2 = w2.ref();
    EXPECT_NO_THROW(ExpertParallelMoELayer(cfg, placement, w, comm));
    // Full (unsharded) expert weights: MoELayer's check of the shard, with the rank named.
    test::expect_error([&] { ExpertParallelMoELayer(cfg, placement, L.weights(), comm); },
                       {"rank 1", "num_local_experts=4", "w13"});
    MoEConfig capped = cfg;
    capped.capacity_factor = 1.25;
    test::expect_error([&] { ExpertParallelMoELayer(capped, placement, w, comm); },
                       {"capacity_factor=1.25", "dropless"});
    MoEConfig ec = cfg;
    ec.routing_mode = RoutingMode::kExpertChoice;
    test::expect_error([&] { ExpertParallelMoELayer(ec, placement, w, comm); }, {"routing_mode=expert-choice"});
    test::expect_error(
        [&] { ExpertParallelMoELayer(cfg, ExpertPlacement::contiguous(cfg.num_experts, 4), w, comm); },
        {"comm world_size=2", "placement's world_size=4"});
    test::expect_error([&] { ExpertParallelMoELayer(cfg, ExpertPlacement::contiguous(6, 2), w, comm); },
                       {"num_experts=6", "cfg.num_experts=8"});
    MoEWeights no_gate = w;
    no_gate.gate = TensorRef();
    test::expect_error([&] { ExpertParallelMoELayer(cfg, placement, no_gate, comm); }, {"gate"});
    MoEWeights bias = w;
    bias.score_bias = L.gate.ref();
    test::expect_error([&] { ExpertParallelMoELayer(cfg, placement, bias, comm); }, {"use_score_bias=false"});
    const ExpertParallelMoELayer layer(cfg, placement, w, comm);
    HostTensor x(DType::kF32, {3, cfg.hidden_size}), y(DType::kF32, {3, cfg.hidden_size});
    test::expect_error([&] { layer.forward(x.ref(), y.ref(), nullptr, 0); }, {"max_tokens_per_rank > 0"});
    test::expect_error([&] { layer.workspace_size(3); }, {"max_tokens_per_rank > 0"});
    HostTensor bad(DType::kF32, {3, cfg.hidden_size + 1});
    test::expect_error([&] { layer.forward(bad.ref(), y.ref()); }, {"x shape=[3, 17]"});
    // The NCCL communicator: refused without NCCL in the build, else a null communicator is named.
    if (nccl_available())
        test::expect_error([] { make_nccl_communicator(nullptr); }, {"comm is null"});
    else
        test::expect_error([] { make_nccl_communicator(nullptr); }, {"this build has no NCCL"});
}

}  // namespace
}  // namespace switchyard
