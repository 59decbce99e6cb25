// tests/gpu_test_expert_parallel.cpp: ExpertParallelMoELayer over NCCL (issue 15) against the single-GPU MoELayer.
//
// One process, one thread per GPU, the communicators from ncclCommInitAll over every visible GPU (W = their number).
// Built only where CMake found NCCL (SWITCHYARD_WITH_NCCL). Inputs and router weights are small integers, so every
// router logit is exact in fp32 whatever the GEMM's summation order: the routing of each token is the same in the
// expert-parallel and the single-GPU run, and the outputs differ only by the expert GEMMs' bf16 roundings.
//   W1BitwiseOnOneGpu           one rank (a 1-GPU NCCL communicator): y, ids and weights bitwise the single-GPU layer's
//   MatchesSingleGpuOnEveryGpu  W = all GPUs (skipped below 2): every rank's y within bf16 tolerance of its rows of
//                               the single-GPU layer's y over all ranks' tokens, ids and weights exact
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <nccl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "gpu_test_util.h"
#include "switchyard/expert_parallel.h"
#include "switchyard/moe_layer.h"
#include "test_util.h"

namespace switchyard {
namespace {

using testing::DeviceBuffer;
using test::HostTensor;

MoEConfig ep_config() {
    MoEConfig c;
    c.hidden_size = 256;
    c.ffn_size = 128;
    c.num_experts = 16;
    c.top_k = 4;
    c.score_function = ScoreFunction::kSigmoid;
    c.renormalize = true;
    c.num_groups = 4;
    c.topk_groups = 2;
    c.num_shared_experts = 1;
    c.shared_ffn_size = 64;
    c.dtype = DType::kBF16;
    return c;
}

// Host weights: gate and x small integers (exact logits), experts random (bf16).
test::HostLayer ep_layer(const MoEConfig& cfg, uint64_t seed) {
    test::HostLayer L = test::random_layer(cfg, seed, DType::kBF16);
    L.gate = HostTensor::from_floats(test::random_ints(cfg.num_experts * cfg.hidden_size, seed + 1, -1, 1),
                                     DType::kBF16, {cfg.num_experts, cfg.hidden_size});
    return L;
}

// A device copy of a host tensor on GPU `dev`, and its TensorRef.
struct DeviceTensor {
    DeviceBuffer buf;
    TensorRef ref;
};
void to_device(const HostTensor& h, int dev, DeviceTensor& d) {
    if (!h.defined()) return;
    cudaSetDevice(dev);
    d.buf.reset(static_cast<size_t>(h.numel()) * dtype_size(h.dtype()) + 1);
    cudaMemcpy(d.buf.get(), h.data(), static_cast<size_t>(h.numel()) * dtype_size(h.dtype()), cudaMemcpyHostToDevice);
    d.ref = TensorRef::contiguous(d.buf.get(), h.dtype(), h.shape().data(), static_cast<int>(h.shape().size()),
                                  Device::kCUDA, dev);
}
HostTensor to_host(const TensorRef& t, DType dtype, std::vector<int64_t> shape) {
    HostTensor h(dtype, std::move(shape));
    cudaMemcpy(h.data(), t.data, static_cast<size_t>(h.numel()) * dtype_size(dtype), cudaMemcpyDeviceToHost);
    return h;
}

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

struct RankResult {
    HostTensor y, ids, weights;
    std::string error;
};

// The single-GPU layer on GPU 0 over all tokens: y, ids, weights.
RankResult single_gpu(const MoEConfig& cfg, const test::HostLayer& L, const HostTensor& x) {
    const int64_t T = x.shape()[0], H = cfg.hidden_size, k = cfg.top_k;
    DeviceTensor gate, w13, w2, sw13, sw2, dx, dy, dids, dw;
    to_device(L.gate, 0, gate);
    to_device(L.w13, 0, w13);
    to_device(L.w2, 0, w2);
    to_device(L.shared_w13, 0, sw13);
    to_device(L.shared_w2, 0, sw2);
    to_device(x, 0, dx);
    to_device(HostTensor(cfg.dtype, {T, H}), 0, dy);
    to_device(HostTensor(DType::kI32, {T, k}), 0, dids);
    to_device(HostTensor(DType::kF32, {T, k}), 0, dw);
    MoEWeights w;
    w.gate = gate.ref;
    w.w13 = w13.ref;
    w.w2 = w2.ref;
    w.shared_w13 = sw13.ref;
    w.shared_w2 = sw2.ref;
    const MoELayer layer(cfg, w);
    DeviceBuffer ws(layer.workspace_size(T));
    ForwardOutputs out;
    out.topk_ids = dids.ref;
    out.topk_weights = dw.ref;
    layer.forward(dx.ref, dy.ref, ws.get(), ws.bytes(), nullptr, &out);
    cudaDeviceSynchronize();
    return {to_host(dy.ref, cfg.dtype, {T, H}), to_host(dids.ref, DType::kI32, {T, k}),
            to_host(dw.ref, DType::kF32, {T, k}), ""};
}

// The expert-parallel layer on GPUs 0..W-1 (one thread each), rank r with split[r] tokens starting at begin[r].
std::vector<RankResult> expert_parallel(const MoEConfig& cfg, const test::HostLayer& L, const HostTensor& x,
                                        const ExpertPlacement& placement, const std::vector<int64_t>& split) {
    const int W = placement.world_size();
    std::vector<ncclComm_t> comms(static_cast<size_t>(W));
    std::vector<int> devs(static_cast<size_t>(W));
    std::iota(devs.begin(), devs.end(), 0);
    std::vector<RankResult> results(static_cast<size_t>(W));
    if (ncclCommInitAll(comms.data(), W, devs.data()) != ncclSuccess) {
        for (auto& r : results) r.error = "ncclCommInitAll failed";
        return results;
    }
    const int64_t H = cfg.hidden_size, k = cfg.top_k;
    const int64_t max_tokens = *std::max_element(split.begin(), split.end());
    std::vector<int64_t> begin(static_cast<size_t>(W), 0);
    for (int r = 1; r < W; ++r) begin[r] = begin[r - 1] + split[r - 1];
    std::vector<std::thread> threads;
    for (int rank = 0; rank < W; ++rank)
        threads.emplace_back([&, rank] {
            try {
                cudaSetDevice(rank);
                const int64_t t = split[rank];
                DeviceTensor gate, w13, w2, sw13, sw2, dx, dy, dids, dw;
                to_device(L.gate, rank, gate);
                to_device(shard(L.w13, placement, rank), rank, w13);
                to_device(shard(L.w2, placement, rank), rank, w2);
                to_device(L.shared_w13, rank, sw13);
                to_device(L.shared_w2, rank, sw2);
                to_device(rows_of(x, begin[rank], t), rank, dx);
                to_device(HostTensor(cfg.dtype, {t, H}), rank, dy);
                to_device(HostTensor(DType::kI32, {t, k}), rank, dids);
                to_device(HostTensor(DType::kF32, {t, k}), rank, dw);
                MoEWeights w;
                w.gate = gate.ref;
                w.w13 = w13.ref;
                w.w2 = w2.ref;
                w.shared_w13 = sw13.ref;
                w.shared_w2 = sw2.ref;
                const std::unique_ptr<Communicator> comm = make_nccl_communicator(comms[rank]);
                ExpertParallelOptions opt;
                opt.max_tokens_per_rank = max_tokens;
                const ExpertParallelMoELayer layer(cfg, placement, w, *comm, opt);
                DeviceBuffer ws(layer.workspace_size(t));
                cudaStream_t stream;
                cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
                ForwardOutputs out;
                out.topk_ids = dids.ref;
                out.topk_weights = dw.ref;
                layer.forward(dx.ref, dy.ref, ws.get(), ws.bytes(), stream, &out);
                cudaStreamSynchronize(stream);
                cudaStreamDestroy(stream);
                results[rank] = {to_host(dy.ref, cfg.dtype, {t, H}), to_host(dids.ref, DType::kI32, {t, k}),
                                 to_host(dw.ref, DType::kF32, {t, k}), ""};
            } catch (const std::exception& e) {
                results[rank].error = e.what();
            }
        });
    for (auto& th : threads) th.join();
    for (ncclComm_t c : comms) ncclCommDestroy(c);
    return results;
}

TEST(GpuExpertParallel, W1BitwiseOnOneGpu) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    if (!nccl_available()) GTEST_SKIP() << "this build has no NCCL";
    const MoEConfig cfg = ep_config();
    const test::HostLayer L = ep_layer(cfg, 21);
    const int64_t T = 300;
    const HostTensor x = HostTensor::from_floats(test::random_ints(T * cfg.hidden_size, 22, -2, 2), cfg.dtype,
                                                 {T, cfg.hidden_size});
    const RankResult want = single_gpu(cfg, L, x);
    const auto got = expert_parallel(cfg, L, x, ExpertPlacement::contiguous(cfg.num_experts, 1), {T});
    ASSERT_EQ(got[0].error, "");
    EXPECT_TRUE(test::all_equal(got[0].ids.to_floats(), want.ids.to_floats(), {T, cfg.top_k}));
    EXPECT_TRUE(test::all_equal(got[0].weights.to_floats(), want.weights.to_floats(), {T, cfg.top_k}));
    EXPECT_TRUE(test::all_equal(got[0].y.to_floats(), want.y.to_floats(), {T, cfg.hidden_size}));
}

TEST(GpuExpertParallel, MatchesSingleGpuOnEveryGpu) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    int W = 0;
    cudaGetDeviceCount(&W);
    if (W < 2) GTEST_SKIP() << "needs at least 2 GPUs (found " << W << ")";
    if (!nccl_available()) GTEST_SKIP() << "this build has no NCCL";
    const MoEConfig cfg = ep_config();
    const test::HostLayer L = ep_layer(cfg, 31);
    for (bool scattered : {false, true}) {
        // Uneven token counts, one rank without tokens (W > 2).
        std::vector<int64_t> split;
        for (int r = 0; r < W; ++r) split.push_back(r == 1 && W > 2 ? 0 : 97 + 61 * r);
        const int64_t T = std::accumulate(split.begin(), split.end(), int64_t{0});
        const HostTensor x = HostTensor::from_floats(test::random_ints(T * cfg.hidden_size, 32, -2, 2), cfg.dtype,
                                                     {T, cfg.hidden_size});
        std::vector<std::vector<int32_t>> lists(static_cast<size_t>(W));
        for (int32_t e = 0; e < cfg.num_experts; ++e) lists[(e * 7 + 3) % W].push_back(e);
        const ExpertPlacement placement = scattered ? ExpertPlacement::from_lists(cfg.num_experts, lists)
                                                    : ExpertPlacement::contiguous(cfg.num_experts, W);
        SCOPED_TRACE(placement.to_string());
        const RankResult want = single_gpu(cfg, L, x);
        const auto got = expert_parallel(cfg, L, x, placement, split);
        int64_t begin = 0;
        for (int r = 0; r < W; ++r) {
            SCOPED_TRACE("rank " + std::to_string(r));
            ASSERT_EQ(got[r].error, "");
            const int64_t t = split[r];
            EXPECT_TRUE(test::all_equal(got[r].ids.to_floats(), rows_of(want.ids, begin, t).to_floats(),
                                        {t, cfg.top_k}));
            EXPECT_TRUE(test::all_equal(got[r].weights.to_floats(), rows_of(want.weights, begin, t).to_floats(),
                                        {t, cfg.top_k}));
            // Same routing; the expert GEMMs may tile other row counts differently: a few bf16 ulps.
            EXPECT_TRUE(test::all_close(got[r].y.to_floats(), rows_of(want.y, begin, t).to_floats(),
                                        {t, cfg.hidden_size}, 2e-2, 1.6e-2));
            begin += t;
        }
    }
}

}  // namespace
}  // namespace switchyard
