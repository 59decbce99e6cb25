// tests/gpu_test_shared_gate.cpp: the gated shared expert (MoEConfig::shared_expert_gate, Qwen2-MoE) on CUDA against
// the CPU layer (itself checked in tests/test_shared_gate.cpp). fp32 layer: the CUDA GEMMs accumulate in fp32 over
// K <= 64 terms (relative error a few 1e-6), the CPU in double; routing decisions compared exactly (random logits, no
// near-ties at these sizes and seeds).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <vector>

#include "gpu_test_util.h"
#include "switchyard/moe_layer.h"
#include "test_util.h"

namespace switchyard {
namespace {

using testing::DeviceBuffer;

TensorRef on_device(DeviceBuffer& buf, const test::HostTensor& h) {
    if (!h.ref().defined()) return TensorRef();
    buf.reset(h.ref().nbytes() + 16);
    if (cudaMemcpy(buf.get(), h.ref().data, h.ref().nbytes(), cudaMemcpyHostToDevice) != cudaSuccess)
        throw std::runtime_error("cudaMemcpy failed");
    TensorRef r = h.ref();
    r.data = buf.get();
    r.device = Device::kCUDA;
    return r;
}

TEST(GpuSharedGate, MatchesTheCpuLayer) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    for (uint64_t seed : {11u, 12u}) {
        SCOPED_TRACE(test::seed_trace(seed));
        MoEConfig c;
        c.hidden_size = 64;
        c.ffn_size = 32;
        c.num_experts = 8;
        c.top_k = 2;
        c.num_shared_experts = 1;
        c.shared_ffn_size = 48;
        c.shared_expert_gate = true;
        c.dtype = DType::kF32;
        const test::HostLayer L = test::random_layer(c, seed);
        const int64_t T = 37, H = c.hidden_size, k = c.top_k;
        const test::HostTensor x =
            test::HostTensor::from_floats(test::random_uniform(T * H, seed + 7), DType::kF32, {T, H});
        test::HostTensor y_cpu(DType::kF32, {T, H}), ids_cpu(DType::kI32, {T, k});
        ForwardOutputs out_cpu;
        out_cpu.topk_ids = ids_cpu.ref();
        MoELayer(c, L.weights()).forward(x.ref(), y_cpu.ref(), &out_cpu);

        DeviceBuffer d_gate, d_w13, d_w2, d_sw13, d_sw2, d_sg, d_x, d_y(T * H * 4), d_ids(T * k * 4);
        MoEWeights w;
        w.gate = on_device(d_gate, L.gate);
        w.w13 = on_device(d_w13, L.w13);
        w.w2 = on_device(d_w2, L.w2);
        w.shared_w13 = on_device(d_sw13, L.shared_w13);
        w.shared_w2 = on_device(d_sw2, L.shared_w2);
        w.shared_gate = on_device(d_sg, L.shared_gate);
        const TensorRef tx = on_device(d_x, x);
        const MoELayer layer(c, w);
        DeviceBuffer ws(layer.workspace_size(T));
        d_y.poison();
        ws.poison();
        ForwardOutputs out;
        out.topk_ids = TensorRef(d_ids.get(), DType::kI32, {T, k}, Device::kCUDA);
        layer.forward(tx, TensorRef(d_y.get(), DType::kF32, {T, H}, Device::kCUDA), ws.get(), ws.bytes(), nullptr,
                      &out);
        GPU_CHECK(cudaDeviceSynchronize());
        const std::vector<int32_t> ids = testing::download_raw<int32_t>(d_ids.get(), T * k);
        ASSERT_EQ(ids, std::vector<int32_t>(ids_cpu.ptr<int32_t>(), ids_cpu.ptr<int32_t>() + T * k));
        const std::vector<float> ref = y_cpu.to_floats();
        const double scale = testing::rms(ref);
        EXPECT_TRUE(testing::all_close(testing::download(d_y.get(), T * H, DType::kF32), ref, 2e-5 * scale, 2e-5,
                                       "y", H));
    }
}

}  // namespace
}  // namespace switchyard
