// tools/switchyard/bench_cuda.cpp: see bench_cuda.h.
#ifdef SWITCHYARD_WITH_CUDA
#include "bench_cuda.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>

#include "cuda/random_fill.h"
#include "switchyard/cuda_check.h"
#include "switchyard/error.h"
#include "timing.h"

namespace switchyard {
namespace cli {
namespace {

TensorRef random_device_tensor(DType dt, std::initializer_list<int64_t> shape, float bound, uint64_t seed,
                               std::vector<DeviceBuffer>& keep) {
    TensorRef t(nullptr, dt, shape, Device::kCUDA);
    keep.emplace_back(t.nbytes());
    t.data = keep.back().get();
    SWITCHYARD_CUDA_CHECK(cudaGetDevice(&t.device_index));
    cuda::fill_uniform(dt, t.data, t.numel(), -bound, bound, seed, nullptr);
    return t;
}

// Median ms of `reps` launches of fn(i) on `s`, an event pair around each (all enqueued, then one synchronise).
template <typename Fn>
double median_of_runs(Fn&& fn, int reps, cudaStream_t s) {
    EventPool ev;
    for (int i = 0; i < reps; ++i) {
        SWITCHYARD_CUDA_CHECK(cudaEventRecord(ev.at(2 * i), s));
        fn(i);
        SWITCHYARD_CUDA_CHECK(cudaEventRecord(ev.at(2 * i + 1), s));
    }
    SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(s));
    std::vector<double> t;
    for (int i = 0; i < reps; ++i) t.push_back(ev.ms(2 * i, 2 * i + 1));
    return median(t);
}

// One CUDA graph of fn(i) per input copy, captured on `s`.
template <typename Fn>
std::vector<cudaGraphExec_t> capture_graphs(Fn&& fn, int copies, cudaStream_t s) {
    std::vector<cudaGraphExec_t> execs;
    for (int i = 0; i < copies; ++i) {
        cudaGraph_t g = nullptr;
        SWITCHYARD_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        try {
            fn(i);
        } catch (...) {
            cudaStreamEndCapture(s, &g);
            if (g) cudaGraphDestroy(g);
            for (auto e : execs) cudaGraphExecDestroy(e);
            throw;
        }
        SWITCHYARD_CUDA_CHECK(cudaStreamEndCapture(s, &g));
        cudaGraphExec_t e = nullptr;
        SWITCHYARD_CUDA_CHECK(cudaGraphInstantiate(&e, g, 0));
        cudaGraphDestroy(g);
        execs.push_back(e);
    }
    return execs;
}

}  // namespace

DeviceWeights random_device_weights(const MoEConfig& cfg, uint64_t seed) {
    DeviceWeights d;
    d.bufs.reserve(8);
    const int64_t E = cfg.num_experts, H = cfg.hidden_size, F = cfg.ffn_size, S = cfg.shared_width();
    const DType dt = cfg.dtype;
    const float bh = 1.0f / std::sqrt(static_cast<float>(H)), bf = 1.0f / std::sqrt(static_cast<float>(F));
    d.w.gate = random_device_tensor(dt, {E, H}, bh, seed * 16 + 1, d.bufs);
    if (cfg.use_score_bias) d.w.score_bias = random_device_tensor(DType::kF32, {E}, 0.1f, seed * 16 + 2, d.bufs);
    d.w.w13 = random_device_tensor(dt, {E, cfg.w13_rows(), H}, bh, seed * 16 + 3, d.bufs);
    d.w.w2 = random_device_tensor(dt, {E, H, F}, bf, seed * 16 + 4, d.bufs);
    if (S > 0) {
        const float bs = 1.0f / std::sqrt(static_cast<float>(S));
        d.w.shared_w13 = random_device_tensor(dt, {is_gated(cfg.activation) ? 2 * S : S, H}, bh, seed * 16 + 5, d.bufs);
        d.w.shared_w2 = random_device_tensor(dt, {H, S}, bs, seed * 16 + 6, d.bufs);
    }
    SWITCHYARD_CUDA_CHECK(cudaDeviceSynchronize());  // random weights ready
    return d;
}

CudaLayerTiming time_cuda_layer(const MoEConfig& cfg, const MoEWeights& w, int64_t T, int warmup, int reps,
                                uint64_t seed, bool graph, bool stages, int64_t fused_max_tokens) {
    SWITCHYARD_CHECK(reps > 0 && warmup >= 0, "time_cuda_layer: reps=", reps, " warmup=", warmup);
    CudaLayerTiming r;
    r.num_tokens = T;
    const int64_t H = cfg.hidden_size;
    MoELayer layer(cfg, w);
    layer.set_fused_max_tokens(fused_max_tokens);
    r.fused = layer.uses_fused_path(T);
    CudaStream st;

    // Inputs rotated past L2: enough copies that the x reads of consecutive runs exceed 2 x L2 (at most 8).
    int dev = 0, l2 = 0;
    SWITCHYARD_CUDA_CHECK(cudaGetDevice(&dev));
    SWITCHYARD_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
    const double x_bytes = static_cast<double>(T) * H * dtype_size(cfg.dtype);
    r.input_copies = x_bytes > 0 ? static_cast<int>(std::clamp(std::ceil(2.0 * l2 / x_bytes), 1.0, 8.0)) : 1;
    std::vector<DeviceBuffer> keep;
    std::vector<TensorRef> xs;
    for (int i = 0; i < r.input_copies; ++i)
        xs.push_back(random_device_tensor(cfg.dtype, {T, H}, 1.0f, seed * 1000 + 17 * i + 7, keep));
    TensorRef y(nullptr, cfg.dtype, {T, H}, Device::kCUDA, dev);
    keep.emplace_back(y.nbytes());
    y.data = keep.back().get();
    r.workspace_bytes = layer.workspace_size(T);
    DeviceBuffer ws(r.workspace_bytes);
    SWITCHYARD_CUDA_CHECK(cudaDeviceSynchronize());  // inputs ready

    auto fwd = [&](int i) { layer.forward(xs[i % r.input_copies], y, ws.get(), ws.size(), st.get(), nullptr); };
    // Warm-up, then the routing of the first input read back for the floor (synchronises: outside timing).
    for (int i = 0; i < std::max(warmup, 1); ++i) fwd(i);
    {
        ForwardOutputs out;
        out.stats = &r.stats;
        layer.forward(xs[0], y, ws.get(), ws.size(), st.get(), &out);
        for (int64_t c : r.stats.kept_counts) r.kept_rows += c, r.experts_hit += c > 0;
    }

    // Eager: an event pair around every forward.
    r.eager_ms = median_of_runs(fwd, reps, st.get());

    // Graph replay: one captured forward per input copy.
    if (graph) {
        std::vector<cudaGraphExec_t> execs = capture_graphs(fwd, r.input_copies, st.get());
        try {
            for (int i = 0; i < std::max(warmup, 1); ++i)
                SWITCHYARD_CUDA_CHECK(cudaGraphLaunch(execs[i % execs.size()], st.get()));
            r.graph_ms = median_of_runs(
                [&](int i) { SWITCHYARD_CUDA_CHECK(cudaGraphLaunch(execs[i % execs.size()], st.get())); }, reps,
                st.get());
        } catch (...) {
            for (auto e : execs) cudaGraphExecDestroy(e);
            throw;
        }
        for (auto e : execs) cudaGraphExecDestroy(e);
    }

    // Stage breakdown: an event after each stage of MoELayer::forward (its StageCallback).
    if (stages) {
        EventPool pool;
        StageEvents marks(pool);
        StageSamples samples;
        for (int i = 0; i < reps; ++i) {
            layer.forward(xs[i % r.input_copies], y, ws.get(), ws.size(), st.get(), nullptr, marks.callback());
            SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(st.get()));
            marks.add_to(samples);
        }
        r.stages = samples.medians();
    }
    return r;
}

}  // namespace cli
}  // namespace switchyard
#endif
