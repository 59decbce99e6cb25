// src/ref/in_process_communicator.cpp: InProcessGroup (switchyard/expert_parallel.h), threads as ranks.
//
// The stand-in for NCCL in the CPU tests and on the CPU backend. Every collective is two barriers of the group:
//   1. each rank posts what it sends (a pointer to its send buffer and its chunk list) in its slot; barrier;
//   2. each rank copies what it receives straight from the senders' buffers (a pull: rank r's i-th receive chunk from
//      s is s's i-th send chunk to r, the order-matching rule of ExchangeChunk); barrier, after which the senders may
//      reuse their buffers.
// Every rank checks that all ranks entered the same collective with the same arguments (count length, row size) and
// that each pair's chunk lists match in number and length. A rank that finds a mismatch while copying still takes the
// closing barrier (the others may be reading its buffers), then every rank throws the first problem and the group is
// aborted. A rank that fails outside a collective calls InProcessGroup::abort, which wakes the others.
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "switchyard/error.h"
#include "switchyard/expert_parallel.h"

namespace switchyard {

namespace {

enum class Op : int { kNone = 0, kAllGather = 1, kAllToAllV = 2 };

const char* op_name(Op op) {
    switch (op) {
        case Op::kAllGather:
            return "all_gather_counts";
        case Op::kAllToAllV:
            return "all_to_all_v";
        case Op::kNone:
            break;
    }
    return "none";
}

struct Post {
    Op op = Op::kNone;
    const void* send = nullptr;
    const std::vector<ExchangeChunk>* sends = nullptr;
    int64_t n = 0;           // all_gather_counts: values per rank
    size_t row_bytes = 0;    // all_to_all_v
};

class InProcessCommunicator;

}  // namespace

struct InProcessGroup::State {
    int world = 0;
    std::mutex mu;
    std::condition_variable cv;
    int arrived = 0;
    uint64_t generation = 0;
    bool aborted = false;
    std::string reason;
    std::vector<Post> posts;
    std::vector<std::unique_ptr<Communicator>> comms;

    // Waits until every rank has arrived (or the group is aborted: then throws).
    void barrier() {
        std::unique_lock<std::mutex> lock(mu);
        SWITCHYARD_CHECK(!aborted, "in-process group aborted: ", reason);
        const uint64_t gen = generation;
        if (++arrived == world) {
            arrived = 0;
            ++generation;
            cv.notify_all();
            return;
        }
        cv.wait(lock, [&] { return generation != gen || aborted; });
        SWITCHYARD_CHECK(generation != gen, "in-process group aborted: ", reason);
    }
    void abort(const std::string& why) {
        std::lock_guard<std::mutex> lock(mu);
        if (!aborted) {
            aborted = true;
            reason = why;
        }
        cv.notify_all();
    }
    // A rank that finds a problem before posting anything: aborts the group with `msg` and throws it.
    [[noreturn]] void fail(int rank, const std::string& msg) {
        const std::string full = "rank " + std::to_string(rank) + ": " + msg;
        abort(full);
        SWITCHYARD_FAIL(full);
    }
    // The end of a collective's copy phase. A rank that found a problem there (`problem`, else empty) still waits for
    // the others: they may be reading its posted buffers, which must stay alive until the closing barrier. After it
    // every rank sees the first problem, aborts the group and throws it.
    void finish(int rank, const std::string& problem) {
        if (!problem.empty()) {
            std::lock_guard<std::mutex> lock(mu);
            if (error.empty()) error = "rank " + std::to_string(rank) + ": " + problem;
        }
        barrier();
        std::string e;
        {
            std::lock_guard<std::mutex> lock(mu);
            e = error;
        }
        if (!e.empty()) {
            abort(e);
            SWITCHYARD_FAIL(e);
        }
    }
    std::string error;  // first problem found in a copy phase
};

namespace {

class InProcessCommunicator : public Communicator {
 public:
    InProcessCommunicator(InProcessGroup::State* group, int rank) : g_(group), rank_(rank) {}
    int rank() const override { return rank_; }
    int world_size() const override { return g_->world; }
    Device device() const override { return Device::kCPU; }

    void all_gather_counts(const int32_t* send, int32_t* recv, int64_t n, cudaStream_t) override {
        if (n < 0) g_->fail(rank_, "all_gather_counts: n=" + std::to_string(n) + " must be >= 0");
        Post& mine = g_->posts[rank_];
        mine = Post{};
        mine.op = Op::kAllGather;
        mine.send = send;
        mine.n = n;
        g_->barrier();
        std::string problem = same_op_problem(Op::kAllGather);
        for (int s = 0; s < g_->world && problem.empty(); ++s) {
            const Post& p = g_->posts[s];
            if (p.n != n) {
                problem = "all_gather_counts: rank " + std::to_string(s) + " sends n=" + std::to_string(p.n) +
                          " values, this rank n=" + std::to_string(n);
                break;
            }
            if (n > 0) std::memcpy(recv + s * n, p.send, static_cast<size_t>(n) * sizeof(int32_t));
        }
        g_->finish(rank_, problem);
    }

    void all_to_all_v(const void* send_base, const std::vector<ExchangeChunk>& sends, void* recv_base,
                      const std::vector<ExchangeChunk>& recvs, size_t row_bytes, cudaStream_t) override {
        for (const auto* list : {&sends, &recvs})
            for (const ExchangeChunk& c : *list)
                if (c.peer < 0 || c.peer >= g_->world || c.rows <= 0 || c.row_offset < 0)
                    g_->fail(rank_, "all_to_all_v: chunk {peer=" + std::to_string(c.peer) + ", row_offset=" +
                                        std::to_string(c.row_offset) + ", rows=" + std::to_string(c.rows) +
                                        "} is not a chunk of a group of " + std::to_string(g_->world) + " ranks");
        Post& mine = g_->posts[rank_];
        mine = Post{};
        mine.op = Op::kAllToAllV;
        mine.send = send_base;
        mine.sends = &sends;
        mine.row_bytes = row_bytes;
        g_->barrier();
        const std::string problem = same_op_problem(Op::kAllToAllV);
        g_->finish(rank_, problem.empty() ? receive(recv_base, recvs, row_bytes) : problem);
    }

 private:
    // Copies what every rank sends to this one into recv_base; returns the first problem found (then stops), or "".
    std::string receive(void* recv_base, const std::vector<ExchangeChunk>& recvs, size_t row_bytes) {
        char* dst = static_cast<char*>(recv_base);
        for (int s = 0; s < g_->world; ++s) {
            const Post& p = g_->posts[s];
            if (p.row_bytes != row_bytes)
                return "all_to_all_v: rank " + std::to_string(s) + " sends rows of " + std::to_string(p.row_bytes) +
                       " bytes, this rank expects " + std::to_string(row_bytes);
            // The i-th chunk s sends to this rank lands in the i-th chunk this rank receives from s.
            std::vector<const ExchangeChunk*> in, out;
            for (const ExchangeChunk& c : *p.sends)
                if (c.peer == rank_) in.push_back(&c);
            for (const ExchangeChunk& c : recvs)
                if (c.peer == s) out.push_back(&c);
            if (in.size() != out.size())
                return "all_to_all_v: rank " + std::to_string(s) + " sends " + std::to_string(in.size()) +
                       " chunks to this rank, which receives " + std::to_string(out.size()) + " from it";
            const char* src = static_cast<const char*>(p.send);
            for (size_t i = 0; i < in.size(); ++i) {
                if (in[i]->rows != out[i]->rows)
                    return "all_to_all_v: chunk " + std::to_string(i) + " from rank " + std::to_string(s) + " has " +
                           std::to_string(in[i]->rows) + " rows, the receive chunk " + std::to_string(out[i]->rows);
                std::memcpy(dst + out[i]->row_offset * row_bytes, src + in[i]->row_offset * row_bytes,
                            static_cast<size_t>(in[i]->rows) * row_bytes);
            }
        }
        return "";
    }

 private:
    std::string same_op_problem(Op op) const {
        for (int s = 0; s < g_->world; ++s)
            if (g_->posts[s].op != op)
                return std::string("rank ") + std::to_string(s) + " entered " + op_name(g_->posts[s].op) +
                       " while this rank entered " + op_name(op);
        return "";
    }

    InProcessGroup::State* g_;
    int rank_;
};

}  // namespace

InProcessGroup::InProcessGroup(int world_size) : state_(new State) {
    SWITCHYARD_CHECK(world_size >= 1, "world_size=", world_size, " must be >= 1");
    state_->world = world_size;
    state_->posts.resize(static_cast<size_t>(world_size));
    for (int r = 0; r < world_size; ++r) state_->comms.emplace_back(new InProcessCommunicator(state_.get(), r));
}

InProcessGroup::~InProcessGroup() = default;

int InProcessGroup::world_size() const { return state_->world; }

Communicator& InProcessGroup::communicator(int rank) {
    SWITCHYARD_CHECK(rank >= 0 && rank < state_->world, "rank=", rank, " not in [0, world_size=", state_->world, ")");
    return *state_->comms[rank];
}

void InProcessGroup::abort(const std::string& reason) { state_->abort(reason); }

}  // namespace switchyard
