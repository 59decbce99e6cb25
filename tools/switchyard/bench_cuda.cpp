// tools/switchyard/bench_cuda.cpp: see bench_cuda.h.
#ifdef SWITCHYARD_WITH_CUDA
#include "bench_cuda.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "bench_quant.h"
#include "cuda/quantize_fill.h"
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

namespace {

// One float weight [M, R, C] (M = 0: a single [R, C] matrix) generated on the device as random_device_tensor does
// (uniform(-bound, bound) in dt from `seed`), quantised into codes and scales owned by d.bufs; the float copy is
// freed on return. Checks the first and last matrix against the host recipe when `check`.
void quantized_random_weight(QuantMode mode, DType dt, int64_t M, int64_t R, int64_t C, float bound, uint64_t seed,
                             const char* name, DeviceWeights& d, TensorRef* codes, TensorRef* scale, bool check,
                             Fp8QuantCheck* qc) {
    int dev = 0;
    SWITCHYARD_CUDA_CHECK(cudaGetDevice(&dev));
    const int64_t mats = std::max<int64_t>(M, 1), n = R * C;
    const std::vector<int64_t> sshape = fp8_scale_shape(mode, M, R, C);
    const int64_t per_scales = numel_of(sshape) / mats;
    DeviceBuffer fw(static_cast<size_t>(mats * n) * dtype_size(dt));
    cuda::fill_uniform(dt, fw.get(), mats * n, -bound, bound, seed, nullptr);
    d.bufs.emplace_back(static_cast<size_t>(mats * n));
    uint8_t* q = static_cast<uint8_t*>(d.bufs.back().get());
    d.bufs.emplace_back(static_cast<size_t>(numel_of(sshape)) * sizeof(float));
    float* s = static_cast<float*>(d.bufs.back().get());
    if (mode == QuantMode::kFP8Block)
        cuda::quantize_fp8_block(dt, fw.get(), mats, R, C, q, s, nullptr);
    else
        cuda::quantize_fp8_tensor(dt, fw.get(), mats, R, C, q, s, nullptr);
    SWITCHYARD_CUDA_CHECK(cudaDeviceSynchronize());  // codes ready before the float copy is freed
    *codes = M > 0 ? TensorRef(q, DType::kF8E4M3, {M, R, C}, Device::kCUDA, dev)
                   : TensorRef(q, DType::kF8E4M3, {R, C}, Device::kCUDA, dev);
    *scale = TensorRef::contiguous(s, DType::kF32, sshape.data(), static_cast<int>(sshape.size()), Device::kCUDA, dev);
    if (!check) return;
    const size_t esz = dtype_size(dt);
    for (int64_t m : {int64_t{0}, mats - 1}) {
        std::vector<uint8_t> wf(static_cast<size_t>(n) * esz), got(static_cast<size_t>(n)), want(static_cast<size_t>(n));
        std::vector<float> got_s(static_cast<size_t>(per_scales)), want_s(static_cast<size_t>(per_scales));
        SWITCHYARD_CUDA_CHECK(cudaMemcpy(wf.data(), static_cast<const uint8_t*>(fw.get()) + static_cast<size_t>(m * n) * esz,
                                         wf.size(), cudaMemcpyDeviceToHost));
        SWITCHYARD_CUDA_CHECK(cudaMemcpy(got.data(), q + m * n, got.size(), cudaMemcpyDeviceToHost));
        SWITCHYARD_CUDA_CHECK(cudaMemcpy(got_s.data(), s + m * per_scales, got_s.size() * sizeof(float),
                                         cudaMemcpyDeviceToHost));
        quantize_matrices_host(dt, wf.data(), 1, R, C, mode, want.data(), want_s.data());
        ++qc->matrices;
        qc->elements += n;
        for (int64_t i = 0; i < n; ++i) {
            if (got[i] == want[i]) continue;
            if (qc->first_mismatch.empty()) {
                std::ostringstream os;
                os << name << "[" << m << "] code at (" << i / C << ", " << i % C << "): GPU 0x" << std::hex
                   << int(got[i]) << ", host 0x" << int(want[i]);
                qc->first_mismatch = os.str();
            }
            ++qc->code_mismatches;
        }
        for (int64_t i = 0; i < per_scales; ++i) {
            if (std::memcmp(&got_s[i], &want_s[i], sizeof(float)) == 0) continue;
            if (qc->first_mismatch.empty()) {
                std::ostringstream os;
                os.precision(9);
                os << name << "[" << m << "] scale " << i << ": GPU " << got_s[i] << ", host " << want_s[i];
                qc->first_mismatch = os.str();
            }
            ++qc->scale_mismatches;
        }
        if (mats == 1) break;
    }
}

}  // namespace

DeviceWeights random_device_weights_fp8(const MoEConfig& cfg, uint64_t seed, bool check, Fp8QuantCheck* qc) {
    SWITCHYARD_CHECK(cfg.quant_mode == QuantMode::kFP8Block || cfg.quant_mode == QuantMode::kFP8Tensor,
                     "random_device_weights_fp8: quant_mode=", to_string(cfg.quant_mode));
    Fp8QuantCheck local;
    if (!qc) qc = &local;
    DeviceWeights d;
    d.bufs.reserve(16);
    const int64_t E = cfg.num_experts, H = cfg.hidden_size, F = cfg.ffn_size, S = cfg.shared_width();
    const DType dt = cfg.dtype;
    const QuantMode mode = cfg.quant_mode;
    const float bh = 1.0f / std::sqrt(static_cast<float>(H)), bf = 1.0f / std::sqrt(static_cast<float>(F));
    // Same seeds and bounds as random_device_weights: the FP8 layer quantises the bf16 layer's weights.
    d.w.gate = random_device_tensor(dt, {E, H}, bh, seed * 16 + 1, d.bufs);
    if (cfg.use_score_bias) d.w.score_bias = random_device_tensor(DType::kF32, {E}, 0.1f, seed * 16 + 2, d.bufs);
    quantized_random_weight(mode, dt, E, cfg.w13_rows(), H, bh, seed * 16 + 3, "w13", d, &d.w.w13, &d.w.w13_scale,
                            check, qc);
    quantized_random_weight(mode, dt, E, H, F, bf, seed * 16 + 4, "w2", d, &d.w.w2, &d.w.w2_scale, check, qc);
    if (S > 0) {
        const float bs = 1.0f / std::sqrt(static_cast<float>(S));
        quantized_random_weight(mode, dt, 0, is_gated(cfg.activation) ? 2 * S : S, H, bh, seed * 16 + 5, "shared_w13",
                                d, &d.w.shared_w13, &d.w.shared_w13_scale, check, qc);
        quantized_random_weight(mode, dt, 0, H, S, bs, seed * 16 + 6, "shared_w2", d, &d.w.shared_w2,
                                &d.w.shared_w2_scale, check, qc);
    }
    SWITCHYARD_CUDA_CHECK(cudaDeviceSynchronize());
    return d;
}

CudaLayerTiming time_cuda_layer(const MoEConfig& cfg, const MoEWeights& w, int64_t T, int warmup, int reps,
                                uint64_t seed, bool graph, bool stages, int64_t fused_max_tokens,
                                GatherInGemm1 gather_in_gemm1) {
    SWITCHYARD_CHECK(reps > 0 && warmup >= 0, "time_cuda_layer: reps=", reps, " warmup=", warmup);
    CudaLayerTiming r;
    r.num_tokens = T;
    const int64_t H = cfg.hidden_size;
    MoELayer layer(cfg, w);
    layer.set_fused_max_tokens(fused_max_tokens);
    layer.set_gather_in_gemm1(gather_in_gemm1);
    r.fused = layer.uses_fused_path(T);
    r.gathered_in_gemm1 = !r.fused && layer.uses_gather_in_gemm1(T);
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
