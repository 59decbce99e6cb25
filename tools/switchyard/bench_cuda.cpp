// tools/switchyard/bench_cuda.cpp: see bench_cuda.h.
#ifdef SWITCHYARD_WITH_CUDA
#include "bench_cuda.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>

#include "cuda/moe_stages.h"
#include "cuda/random_fill.h"
#include "switchyard/error.h"

namespace switchyard {
namespace cli {
namespace {

void check(cudaError_t e, const char* what) {
    SWITCHYARD_CHECK(e == cudaSuccess, what, ": ", cudaGetErrorString(e));
}

// Owns a stream and the events of one measurement.
struct Stream {
    cudaStream_t s = nullptr;
    Stream() { check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"); }
    ~Stream() { cudaStreamDestroy(s); }
};
struct Events {
    std::vector<cudaEvent_t> ev;
    explicit Events(size_t n) : ev(n) {
        for (auto& e : ev) check(cudaEventCreate(&e), "cudaEventCreate");
    }
    ~Events() {
        for (auto& e : ev) cudaEventDestroy(e);
    }
    float ms(size_t a, size_t b) const {
        float v = 0;
        check(cudaEventElapsedTime(&v, ev[a], ev[b]), "cudaEventElapsedTime");
        return v;
    }
};

TensorRef random_device_tensor(DType dt, std::initializer_list<int64_t> shape, float bound, uint64_t seed,
                               std::vector<DeviceBuffer>& keep) {
    TensorRef t(nullptr, dt, shape, Device::kCUDA);
    keep.emplace_back(t.nbytes());
    t.data = keep.back().get();
    check(cudaGetDevice(&t.device_index), "cudaGetDevice");
    cuda::fill_uniform(dt, t.data, t.numel(), -bound, bound, seed, nullptr);
    return t;
}

}  // namespace

double median_of(std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

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
    check(cudaDeviceSynchronize(), "random weights");
    return d;
}

CudaLayerTiming time_cuda_layer(const MoEConfig& cfg, const MoEWeights& w, int64_t T, int warmup, int reps,
                                uint64_t seed, bool graph, bool stages) {
    SWITCHYARD_CHECK(reps > 0 && warmup >= 0, "time_cuda_layer: reps=", reps, " warmup=", warmup);
    CudaLayerTiming r;
    r.num_tokens = T;
    const int64_t H = cfg.hidden_size;
    MoELayer layer(cfg, w);
    Stream st;

    // Inputs rotated past L2: enough copies that the x reads of consecutive runs exceed 2 x L2 (at most 8).
    int dev = 0, l2 = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev), "cudaDeviceGetAttribute");
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
    check(cudaDeviceSynchronize(), "inputs");

    auto fwd = [&](int i) { layer.forward(xs[i % r.input_copies], y, ws.get(), ws.size(), st.s, nullptr); };
    // Warm-up, then the routing of the first input read back for the floor (synchronises: outside timing).
    for (int i = 0; i < std::max(warmup, 1); ++i) fwd(i);
    {
        ForwardOutputs out;
        out.stats = &r.stats;
        layer.forward(xs[0], y, ws.get(), ws.size(), st.s, &out);
        for (int64_t c : r.stats.kept_counts) r.kept_rows += c, r.experts_hit += c > 0;
    }

    // Eager: an event pair around every forward.
    {
        Events ev(2 * static_cast<size_t>(reps));
        for (int i = 0; i < reps; ++i) {
            check(cudaEventRecord(ev.ev[2 * i], st.s), "cudaEventRecord");
            fwd(i);
            check(cudaEventRecord(ev.ev[2 * i + 1], st.s), "cudaEventRecord");
        }
        check(cudaStreamSynchronize(st.s), "eager runs");
        std::vector<double> t;
        for (int i = 0; i < reps; ++i) t.push_back(ev.ms(2 * i, 2 * i + 1));
        r.eager_ms = median_of(t);
    }

    // Graph replay: one captured forward per input copy.
    if (graph) {
        std::vector<cudaGraphExec_t> execs;
        for (int i = 0; i < r.input_copies; ++i) {
            cudaGraph_t g = nullptr;
            check(cudaStreamBeginCapture(st.s, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
            try {
                fwd(i);
            } catch (...) {
                cudaStreamEndCapture(st.s, &g);
                if (g) cudaGraphDestroy(g);
                throw;
            }
            check(cudaStreamEndCapture(st.s, &g), "cudaStreamEndCapture");
            cudaGraphExec_t e = nullptr;
            check(cudaGraphInstantiate(&e, g, 0), "cudaGraphInstantiate");
            cudaGraphDestroy(g);
            execs.push_back(e);
        }
        for (int i = 0; i < std::max(warmup, 1); ++i) check(cudaGraphLaunch(execs[i % execs.size()], st.s), "replay");
        Events ev(2 * static_cast<size_t>(reps));
        for (int i = 0; i < reps; ++i) {
            check(cudaEventRecord(ev.ev[2 * i], st.s), "cudaEventRecord");
            check(cudaGraphLaunch(execs[i % execs.size()], st.s), "cudaGraphLaunch");
            check(cudaEventRecord(ev.ev[2 * i + 1], st.s), "cudaEventRecord");
        }
        check(cudaStreamSynchronize(st.s), "graph replays");
        std::vector<double> t;
        for (int i = 0; i < reps; ++i) t.push_back(ev.ms(2 * i, 2 * i + 1));
        r.graph_ms = median_of(t);
        for (auto e : execs) cudaGraphExecDestroy(e);
    }

    // Stage breakdown: an event after each stage of moe_forward_staged.
    if (stages) {
        std::vector<std::string> names;
        std::vector<std::vector<double>> samples;
        for (int i = 0; i < reps; ++i) {
            Events ev(16);
            size_t n = 0;
            std::vector<std::string> seen;
            cuda::moe_forward_staged(cfg, w, xs[i % r.input_copies], y, ws.get(), ws.size(), st.s, nullptr,
                                     [&](const char* stage, cudaStream_t s) {
                                         SWITCHYARD_CHECK(n < ev.ev.size(), "too many stages");
                                         check(cudaEventRecord(ev.ev[n++], s), "cudaEventRecord");
                                         seen.emplace_back(stage);
                                     });
            check(cudaStreamSynchronize(st.s), "staged run");
            if (names.empty()) {
                names.assign(seen.begin() + 1, seen.end());  // seen[0] is "begin"
                samples.resize(names.size());
            }
            for (size_t s = 1; s < n; ++s) samples[s - 1].push_back(ev.ms(s - 1, s));
        }
        for (size_t s = 0; s < names.size(); ++s) r.stages.emplace_back(names[s], median_of(samples[s]));
    }
    return r;
}

}  // namespace cli
}  // namespace switchyard
#endif
