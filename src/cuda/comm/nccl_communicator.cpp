// src/cuda/comm/nccl_communicator.cpp: the NCCL Communicator (switchyard/expert_parallel.h), built when CMake finds
// NCCL (SWITCHYARD_NCCL=AUTO|ON).
//
//   all_gather_counts  ncclAllGather of n int32 per rank into [W, n] (device memory of the communicator's GPU)
//   all_to_all_v       one ncclGroupStart / ncclGroupEnd around an ncclSend per send chunk and an ncclRecv per
//                      receive chunk, in list order, as bytes (ncclUint8). NCCL matches the sends and receives of one
//                      pair of ranks in the order they are posted inside the group, which is ExchangeChunk's rule;
//                      chunks to and from this rank itself are legal NCCL point-to-point operations.
// Everything is enqueued on the caller's stream; no host synchronisation. The ncclComm_t stays the caller's.
#include <nccl.h>

#include <memory>
#include <vector>

#include "cuda/common.cuh"
#include "switchyard/error.h"
#include "switchyard/expert_parallel.h"

#define SWITCHYARD_NCCL_CHECK(expr)                                                                             \
    do {                                                                                                        \
        ncclResult_t switchyard_nccl_res_ = (expr);                                                             \
        if (switchyard_nccl_res_ != ncclSuccess)                                                                \
            ::switchyard::detail::throw_error("NCCL error", __FILE__, __LINE__, #expr, ": ",                     \
                                              ncclGetErrorString(switchyard_nccl_res_));                        \
    } while (0)

namespace switchyard {
namespace {

class NcclCommunicator : public Communicator {
 public:
    explicit NcclCommunicator(ncclComm_t comm) : comm_(comm) {
        SWITCHYARD_CHECK(comm != nullptr, "make_nccl_communicator: comm is null");
        SWITCHYARD_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
        SWITCHYARD_NCCL_CHECK(ncclCommCount(comm_, &world_));
        SWITCHYARD_NCCL_CHECK(ncclCommCuDevice(comm_, &device_));
    }
    int rank() const override { return rank_; }
    int world_size() const override { return world_; }
    Device device() const override { return Device::kCUDA; }
    int device_index() const override { return device_; }

    void all_gather_counts(const int32_t* send, int32_t* recv, int64_t n, cudaStream_t stream) override {
        SWITCHYARD_CHECK(n >= 0, "all_gather_counts: n=", n, " must be >= 0");
        if (n == 0) return;
        cuda::DeviceGuard guard(device_);
        SWITCHYARD_NCCL_CHECK(ncclAllGather(send, recv, static_cast<size_t>(n), ncclInt32, comm_, stream));
    }

    void all_to_all_v(const void* send_base, const std::vector<ExchangeChunk>& sends, void* recv_base,
                      const std::vector<ExchangeChunk>& recvs, size_t row_bytes, cudaStream_t stream) override {
        for (const auto* list : {&sends, &recvs})
            for (const ExchangeChunk& c : *list)
                SWITCHYARD_CHECK(c.peer >= 0 && c.peer < world_ && c.rows > 0 && c.row_offset >= 0,
                                 "all_to_all_v: chunk {peer=", c.peer, ", row_offset=", c.row_offset, ", rows=", c.rows,
                                 "} is not a chunk of a communicator of ", world_, " ranks");
        if (sends.empty() && recvs.empty()) return;
        cuda::DeviceGuard guard(device_);
        const char* src = static_cast<const char*>(send_base);
        char* dst = static_cast<char*>(recv_base);
        SWITCHYARD_NCCL_CHECK(ncclGroupStart());
        // On an error inside the group, end it before throwing so the communicator stays usable for the caller.
        try {
            for (const ExchangeChunk& c : sends)
                SWITCHYARD_NCCL_CHECK(ncclSend(src + c.row_offset * row_bytes, static_cast<size_t>(c.rows) * row_bytes,
                                               ncclUint8, c.peer, comm_, stream));
            for (const ExchangeChunk& c : recvs)
                SWITCHYARD_NCCL_CHECK(ncclRecv(dst + c.row_offset * row_bytes, static_cast<size_t>(c.rows) * row_bytes,
                                               ncclUint8, c.peer, comm_, stream));
        } catch (...) {
            ncclGroupEnd();
            throw;
        }
        SWITCHYARD_NCCL_CHECK(ncclGroupEnd());
    }

 private:
    ncclComm_t comm_;
    int rank_ = 0;
    int world_ = 1;
    int device_ = 0;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(ncclComm_t comm) {
    return std::unique_ptr<Communicator>(new NcclCommunicator(comm));
}

bool nccl_available() { return true; }

}  // namespace switchyard
