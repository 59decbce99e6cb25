// tests/gpu_test_baseline.cpp: the dense GShard baseline on CUDA (src/baseline/dense_cuda.cu) against the CPU
// dense baseline (src/baseline/dense_ref.cpp, itself checked against the sparse reference in test_baseline.cpp).
//
// Every test first checks for a GPU and skips with the reason when there is none.
// - Exact: small dyadic inputs (x in {-1, -0.5, 0, 0.5, 1}, weights in multiples of 1/4 up to 1/2), ReLU and
//   top-1 with top-k-softmax routing (weight exactly routed_scale): every sum is exact in fp32 in any order, so
//   logits, routing, h, expert outputs, products and y must be bitwise those of the CPU. Dropless, capacity
//   drops (both policies) and a shared expert.
// - Random: general configs (every activation and score function, k > 1, shared experts) against the CPU with
//   |gpu - cpu| <= (8u + 1e-5) * mag + 2u |cpu| (+ fp16 subnormal steps), mag = sum_j |w_j| sum_f |W2| |h| +
//   the same for the shared expert: up to 8 dtype roundings that may fall differently (combine weight, product,
//   h and expert output each on either side) plus fp32 accumulation-order differences of the cuBLAS GEMMs
//   (below 1e-5 of the absolute sums at these sizes).
// - Limit path (ran=false, y untouched), a case larger than the device (refused from cudaMemGetInfo, nothing
//   allocated), the caller's workspace path, statistics.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <sstream>
#include <vector>

#include "switchyard/baseline.h"
#include "ref/ref.h"
#include "switchyard/switchyard.h"

namespace switchyard {
namespace {

#define SKIP_WITHOUT_GPU()                                                                                      \
    do {                                                                                                        \
        int n_ = 0;                                                                                             \
        const cudaError_t e_ = cudaGetDeviceCount(&n_);                                                         \
        if (e_ != cudaSuccess || n_ == 0)                                                                       \
            GTEST_SKIP() << "no CUDA device: cudaGetDeviceCount -> " << n_ << " devices, "                      \
                         << cudaGetErrorString(e_);                                                             \
    } while (0)

#define ASSERT_CUDA(expr)                                                                   \
    do {                                                                                    \
        const cudaError_t e_ = (expr);                                                      \
        ASSERT_EQ(e_, cudaSuccess) << #expr << ": " << cudaGetErrorString(e_);              \
    } while (0)

// Host bytes + a device copy.
struct Tensor {
    std::vector<uint8_t> host;
    void* dev = nullptr;
    DType dtype = DType::kF32;
    std::vector<int64_t> dims;
    Tensor() = default;
    Tensor(DType t, std::initializer_list<int64_t> d) : dtype(t), dims(d) {
        host.assign(static_cast<size_t>(std::max<int64_t>(numel(), 1)) * dtype_size(t), 0);
    }
    Tensor(const Tensor&) = delete;
    Tensor& operator=(const Tensor&) = delete;
    Tensor(Tensor&& o) noexcept { *this = std::move(o); }
    Tensor& operator=(Tensor&& o) noexcept {
        std::swap(host, o.host);
        std::swap(dev, o.dev);
        dtype = o.dtype;
        dims = o.dims;
        return *this;
    }
    ~Tensor() {
        if (dev != nullptr) cudaFree(dev);
    }
    int64_t numel() const {
        int64_t n = 1;
        for (int64_t d : dims) n *= d;
        return n;
    }
    float get(int64_t i) const { return ref::load_as_float(host.data(), dtype, i); }
    void set(int64_t i, float v) { ref::store_from_float(host.data(), dtype, i, v); }
    TensorRef href() { return TensorRef::contiguous(host.data(), dtype, dims.data(), static_cast<int>(dims.size())); }
    TensorRef dref() {
        return TensorRef::contiguous(dev, dtype, dims.data(), static_cast<int>(dims.size()), Device::kCUDA, 0);
    }
    void upload() {
        if (dev == nullptr && cudaMalloc(&dev, host.size()) != cudaSuccess) throw Error("cudaMalloc failed in test");
        if (cudaMemcpy(dev, host.data(), host.size(), cudaMemcpyHostToDevice) != cudaSuccess)
            throw Error("cudaMemcpy H2D failed in test");
    }
    void download() {
        if (cudaMemcpy(host.data(), dev, host.size(), cudaMemcpyDeviceToHost) != cudaSuccess)
            throw Error("cudaMemcpy D2H failed in test");
    }
};

struct Layer {
    MoEConfig cfg;
    Tensor gate, bias, w13, w2, sw13, sw2;
    MoEWeights host_w() {
        MoEWeights w;
        w.gate = gate.href();
        w.w13 = w13.href();
        w.w2 = w2.href();
        if (cfg.use_score_bias) w.score_bias = bias.href();
        if (cfg.shared_width() > 0) {
            w.shared_w13 = sw13.href();
            w.shared_w2 = sw2.href();
        }
        return w;
    }
    MoEWeights dev_w() {
        MoEWeights w;
        w.gate = gate.dref();
        w.w13 = w13.dref();
        w.w2 = w2.dref();
        if (cfg.use_score_bias) w.score_bias = bias.dref();
        if (cfg.shared_width() > 0) {
            w.shared_w13 = sw13.dref();
            w.shared_w2 = sw2.dref();
        }
        return w;
    }
};

// Fills with uniform values in [-scale, scale] (random) or with multiples of `step` in [-2 step, 2 step] (dyadic).
void fill(Tensor& t, std::mt19937& rng, float scale, bool dyadic) {
    std::uniform_real_distribution<float> u(-scale, scale);
    std::uniform_int_distribution<int> q(-2, 2);
    for (int64_t i = 0; i < t.numel(); ++i) t.set(i, dyadic ? scale * 0.5f * q(rng) : u(rng));
}

void make_layer(Layer& L, std::mt19937& rng, bool dyadic) {
    const MoEConfig& c = L.cfg;
    const int64_t E = c.num_experts, H = c.hidden_size, F = c.ffn_size, S = c.shared_width();
    const DType dt = c.dtype;
    // Dyadic scales: x 1 (steps of 1/2), weights 1/2 (steps of 1/4): see the file comment.
    L.gate = Tensor(dt, {E, H});
    fill(L.gate, rng, dyadic ? 0.5f : 2.0f / std::sqrt(float(H)), dyadic);
    L.w13 = Tensor(dt, {E, c.w13_rows(), H});
    fill(L.w13, rng, dyadic ? 0.5f : 1.5f / std::sqrt(float(H)), dyadic);
    L.w2 = Tensor(dt, {E, H, F});
    fill(L.w2, rng, dyadic ? 0.5f : 1.5f / std::sqrt(float(F)), dyadic);
    L.gate.upload();
    L.w13.upload();
    L.w2.upload();
    if (c.use_score_bias) {
        L.bias = Tensor(DType::kF32, {E});
        fill(L.bias, rng, 0.5f, dyadic);
        L.bias.upload();
    }
    if (S > 0) {
        L.sw13 = Tensor(dt, {is_gated(c.activation) ? 2 * S : S, H});
        fill(L.sw13, rng, dyadic ? 0.5f : 1.5f / std::sqrt(float(H)), dyadic);
        L.sw2 = Tensor(dt, {H, S});
        fill(L.sw2, rng, dyadic ? 0.5f : 1.5f / std::sqrt(float(S)), dyadic);
        L.sw13.upload();
        L.sw2.upload();
    }
}

std::string describe(uint32_t seed, const MoEConfig& c, int64_t T) {
    std::ostringstream os;
    os << "seed " << seed << ", T=" << T << ", " << c.to_string();
    return os.str();
}

struct Outcome {
    DenseResult cpu, gpu;
    Tensor y_cpu, y_gpu;
    LoadStats s_cpu, s_gpu;
};

// Runs the CPU and the CUDA dense baselines on the same layer and input.
void run_both(Layer& L, Tensor& x, Outcome& o) {
    const int64_t T = x.dims[0], H = L.cfg.hidden_size;
    o.y_cpu = Tensor(L.cfg.dtype, {T, H});
    o.y_gpu = Tensor(L.cfg.dtype, {T, H});
    o.y_gpu.upload();
    o.cpu = dense_forward_cpu(L.cfg, L.host_w(), x.href(), o.y_cpu.href(), kDenseNoLimit, &o.s_cpu);
    o.gpu = dense_forward_cuda(L.cfg, L.dev_w(), x.dref(), o.y_gpu.dref(), kDenseNoLimit, nullptr, 0, nullptr,
                               &o.s_gpu);
    if (cudaStreamSynchronize(nullptr) != cudaSuccess) throw Error("stream sync failed after dense_forward_cuda");
    o.y_gpu.download();
}

void expect_same_bookkeeping(const Outcome& o, const std::string& what) {
    EXPECT_TRUE(o.cpu.ran) << what << ": " << o.cpu.reason;
    EXPECT_TRUE(o.gpu.ran) << what << ": " << o.gpu.reason;
    EXPECT_EQ(o.gpu.capacity, o.cpu.capacity) << what;
    EXPECT_EQ(o.gpu.dropped, o.cpu.dropped) << what;
    EXPECT_EQ(o.gpu.bytes_needed, o.cpu.bytes_needed) << what;
    EXPECT_EQ(o.gpu.peak_bytes, o.gpu.bytes_needed) << what;
    EXPECT_EQ(o.s_gpu.expert_counts, o.s_cpu.expert_counts) << what;
    EXPECT_EQ(o.s_gpu.kept_counts, o.s_cpu.kept_counts) << what;
    EXPECT_EQ(o.s_gpu.dropped, o.s_cpu.dropped) << what;
}

TEST(DenseBaselineCuda, BitwiseEqualToCpuOnDyadicInputs) {
    SKIP_WITHOUT_GPU();
    int cases = 0, dropped_cases = 0;
    for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
        for (uint32_t seed = 1; seed <= 6; ++seed) {
            std::mt19937 rng(seed * 31u + static_cast<uint32_t>(dt));
            Layer L;
            MoEConfig& c = L.cfg;
            c.dtype = dt;
            c.hidden_size = std::vector<int64_t>{16, 40, 64}[seed % 3];
            c.ffn_size = std::vector<int64_t>{8, 24, 64}[seed % 3];
            c.num_experts = std::vector<int64_t>{4, 8, 3}[seed % 3];
            c.top_k = 1;
            c.score_function = ScoreFunction::kTopkSoftmax;  // top-1: weight exactly 1 * routed_scale
            c.routed_scale = seed % 2 ? 1.0 : 2.5;
            c.activation = Activation::kReLU;
            if (seed % 3 == 0) {
                c.num_shared_experts = 1;
                c.shared_ffn_size = 16;
            }
            if (seed >= 4) {
                c.capacity_factor = seed == 4 ? 0.5 : 1.0;
                c.drop_policy = seed % 2 ? DropPolicy::kPosition : DropPolicy::kProbability;
            }
            make_layer(L, rng, true);
            const int64_t T = std::vector<int64_t>{37, 96, 1}[seed % 3];
            Tensor x(dt, {T, c.hidden_size});
            fill(x, rng, 1.0f, true);
            x.upload();
            const std::string what = describe(seed, c, T);
            SCOPED_TRACE(what);
            Outcome o;
            run_both(L, x, o);
            expect_same_bookkeeping(o, what);
            for (int64_t i = 0; i < x.numel(); ++i) {
                if (std::memcmp(&o.y_gpu.host[i * dtype_size(dt)], &o.y_cpu.host[i * dtype_size(dt)],
                                dtype_size(dt)) != 0) {
                    ADD_FAILURE() << what << ": first bitwise mismatch at token " << i / c.hidden_size << ", h "
                                  << i % c.hidden_size << ": gpu " << o.y_gpu.get(i) << ", cpu " << o.y_cpu.get(i);
                    break;
                }
            }
            ++cases;
            dropped_cases += o.cpu.dropped > 0;
        }
    }
    EXPECT_GT(dropped_cases, 0) << "no case dropped a pair: the drop path went untested";
    EXPECT_EQ(cases, 18);
}

// Absolute magnitudes of the combine: sum_j |w_j| sum_f |W2[e, h, f]| |h_f| + the shared expert's same sum,
// with h recomputed in double from the CPU plan (ref::build_plan on CPU logits).
std::vector<double> magnitudes(Layer& L, Tensor& x) {
    const MoEConfig& c = L.cfg;
    const int64_t T = x.dims[0], H = c.hidden_size, F = c.ffn_size, E = c.num_experts, k = c.top_k;
    const std::vector<float> xf = ref::to_float(x.href());
    const std::vector<float> g = ref::to_float(L.gate.href());
    const std::vector<float> logits = ref::router_logits(xf, g, T, H, E);
    std::vector<float> bias;
    if (c.use_score_bias) bias = ref::to_float(L.bias.href());
    std::vector<int32_t> ids;
    std::vector<float> wts;
    ref::route(c, logits, bias, T, ids, wts);
    const ref::HostPlan plan = ref::build_plan(c, T, ids, wts);
    const std::vector<float> w13 = ref::to_float(L.w13.href()), w2 = ref::to_float(L.w2.href());
    auto mlp_abs = [&](const float* xr, const float* a13, const float* a2, int64_t ffn, double scale, double* m) {
        const bool gated = is_gated(c.activation);
        for (int64_t f = 0; f < ffn; ++f) {
            double gate = 0, up = 0;
            for (int64_t h = 0; h < H; ++h) {
                up += double(xr[h]) * a13[((gated ? ffn : 0) + f) * H + h];
                if (gated) gate += double(xr[h]) * a13[f * H + h];
            }
            const double hv = std::fabs(ref::apply_activation(c.activation, gate, up));
            for (int64_t h = 0; h < H; ++h) m[h] += scale * std::fabs(double(a2[h * ffn + f])) * hv;
        }
    };
    std::vector<double> mag(static_cast<size_t>(T * H), 0.0);
    std::vector<float> s13, s2;
    if (c.shared_width() > 0) {
        s13 = ref::to_float(L.sw13.href());
        s2 = ref::to_float(L.sw2.href());
    }
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t j = 0; j < k; ++j) {
            if (plan.slot_row[t * k + j] < 0) continue;
            const int64_t e = ids[t * k + j];
            mlp_abs(xf.data() + t * H, w13.data() + e * c.w13_rows() * H, w2.data() + e * H * F, F,
                    std::fabs(double(wts[t * k + j])), mag.data() + t * H);
        }
        if (c.shared_width() > 0) mlp_abs(xf.data() + t * H, s13.data(), s2.data(), c.shared_width(), 1.0, mag.data() + t * H);
    }
    return mag;
}

TEST(DenseBaselineCuda, MatchesCpuOnRandomConfigs) {
    SKIP_WITHOUT_GPU();
    for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
        for (uint32_t seed = 1; seed <= 8; ++seed) {
            std::mt19937 rng(seed * 7877u + static_cast<uint32_t>(dt));
            Layer L;
            MoEConfig& c = L.cfg;
            c.dtype = dt;
            c.hidden_size = std::vector<int64_t>{24, 64, 48, 128}[seed % 4];
            c.ffn_size = std::vector<int64_t>{16, 40, 96}[seed % 3];
            c.num_experts = std::vector<int64_t>{8, 4, 6}[seed % 3];
            c.top_k = 1 + seed % 3;
            c.activation = static_cast<Activation>(seed % 4);
            c.score_function = static_cast<ScoreFunction>((seed / 2) % 3);
            c.renormalize = seed % 2 == 0;
            c.routed_scale = seed % 3 == 0 ? 2.5 : 1.0;
            if (c.score_function == ScoreFunction::kSigmoid) c.use_score_bias = seed % 2 == 1;
            if (c.num_experts == 8 && seed % 4 == 1) {
                c.num_groups = 4;
                c.topk_groups = 2;
            }
            if (seed % 3 == 1) {
                c.num_shared_experts = 2;
                c.shared_ffn_size = 16;
            }
            if (seed % 4 == 3) c.capacity_factor = 1.0;
            make_layer(L, rng, false);
            const int64_t T = std::vector<int64_t>{1, 19, 64, 133}[seed % 4];
            Tensor x(dt, {T, c.hidden_size});
            fill(x, rng, 1.0f, false);
            x.upload();
            const std::string what = describe(seed, c, T);
            SCOPED_TRACE(what);
            Outcome o;
            run_both(L, x, o);
            expect_same_bookkeeping(o, what);
            const std::vector<double> mag = magnitudes(L, x);
            const double u = dt == DType::kF32 ? std::ldexp(1.0, -24)
                                               : (dt == DType::kBF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11));
            const double eta = dt == DType::kF16 ? std::ldexp(1.0, -24) : 0.0;
            int64_t bad = 0;
            for (int64_t i = 0; i < x.numel(); ++i) {
                const double got = o.y_gpu.get(i), want = o.y_cpu.get(i);
                const double tol = (8 * u + 1e-5) * mag[i] + 2 * u * std::fabs(want) + eta * (c.top_k + 4);
                if (!(std::fabs(got - want) <= tol)) {
                    if (bad == 0)
                        ADD_FAILURE() << what << ": first mismatch at token " << i / c.hidden_size << ", h "
                                      << i % c.hidden_size << ": gpu " << got << ", cpu " << want << ", |diff| "
                                      << std::fabs(got - want) << " > tol " << tol << " (mag " << mag[i] << ")";
                    ++bad;
                }
            }
            EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << x.numel() << " elements outside the bound";
        }
    }
}

TEST(DenseBaselineCuda, LimitPathRefusesWithoutWriting) {
    SKIP_WITHOUT_GPU();
    const uint32_t seed = 12;
    std::mt19937 rng(seed);
    Layer L;
    MoEConfig& c = L.cfg;
    c.dtype = DType::kBF16;
    c.hidden_size = 32;
    c.ffn_size = 16;
    c.num_experts = 4;
    c.top_k = 2;
    make_layer(L, rng, false);
    const int64_t T = 40;
    Tensor x(DType::kBF16, {T, c.hidden_size});
    fill(x, rng, 1.0f, false);
    x.upload();
    for (double cf : {1.0, 0.0}) {
        c.capacity_factor = cf;
        SCOPED_TRACE(describe(seed, c, T));
        Outcome o;
        run_both(L, x, o);
        ASSERT_TRUE(o.gpu.ran) << o.gpu.reason;
        const size_t need = o.gpu.bytes_needed;
        Tensor y(DType::kBF16, {T, c.hidden_size});
        for (int64_t i = 0; i < y.numel(); ++i) y.set(i, 12288.0f);
        y.upload();
        const DenseResult r = dense_forward_cuda(c, L.dev_w(), x.dref(), y.dref(), need - 1);
        ASSERT_CUDA(cudaDeviceSynchronize());
        EXPECT_FALSE(r.ran);
        EXPECT_EQ(r.bytes_needed, need);
        EXPECT_NE(r.reason.find("needs " + std::to_string(need)), std::string::npos) << r.reason;
        EXPECT_EQ(r.peak_bytes, cf > 0 ? size_t(0) : dense_layout(c, T, 0).router_end);
        std::vector<uint8_t> before = y.host;
        y.download();
        EXPECT_EQ(y.host, before) << "y was written by a refused run";
        // At exactly the limit it runs and matches the unlimited run bit for bit.
        const DenseResult ok = dense_forward_cuda(c, L.dev_w(), x.dref(), y.dref(), need);
        ASSERT_CUDA(cudaDeviceSynchronize());
        EXPECT_TRUE(ok.ran) << ok.reason;
        y.download();
        EXPECT_EQ(y.host, o.y_gpu.host);
    }
}

// Larger than any device: refused from cudaMemGetInfo with no limit given, before anything big is allocated.
TEST(DenseBaselineCuda, LargerThanTheDeviceIsReportedNotCrashed) {
    SKIP_WITHOUT_GPU();
    std::mt19937 rng(4);
    Layer L;
    MoEConfig& c = L.cfg;
    c.dtype = DType::kF32;
    c.hidden_size = 1024;
    c.ffn_size = 8;
    c.num_experts = 8;
    c.top_k = 2;
    c.activation = Activation::kReLU;
    make_layer(L, rng, false);
    const int64_t T = 8192;  // product [T, E, C, H] fp32 with C ~ T*k/E: ~550 GB
    Tensor x(DType::kF32, {T, c.hidden_size});
    fill(x, rng, 1.0f, false);
    x.upload();
    Tensor y(DType::kF32, {T, c.hidden_size});
    y.upload();
    size_t free_before = 0, total = 0;
    ASSERT_CUDA(cudaMemGetInfo(&free_before, &total));
    for (double cf : {1.0, 0.0}) {
        c.capacity_factor = cf;
        SCOPED_TRACE(describe(4, c, T));
        const DenseResult r = dense_forward_cuda(c, L.dev_w(), x.dref(), y.dref());
        ASSERT_CUDA(cudaDeviceSynchronize());
        EXPECT_FALSE(r.ran);
        EXPECT_GT(r.bytes_needed, total) << "the case is meant to exceed the device";
        EXPECT_EQ(r.bytes_needed, dense_bytes_needed(c, T, r.capacity));
        EXPECT_NE(r.reason.find("free"), std::string::npos) << r.reason;
        EXPECT_EQ(r.peak_bytes, dense_layout(c, T, 0).router_end) << "only the router part may have been held";
        EXPECT_TRUE(r.routed);
    }
    ASSERT_CUDA(cudaGetLastError());  // no sticky error left behind
}

TEST(DenseBaselineCuda, CallerWorkspaceAllocatesNothing) {
    SKIP_WITHOUT_GPU();
    std::mt19937 rng(6);
    Layer L;
    MoEConfig& c = L.cfg;
    c.dtype = DType::kF16;
    c.hidden_size = 48;
    c.ffn_size = 32;
    c.num_experts = 6;
    c.top_k = 2;
    c.capacity_factor = 1.25;
    c.num_shared_experts = 1;
    c.shared_ffn_size = 8;
    make_layer(L, rng, false);
    const int64_t T = 50;
    Tensor x(DType::kF16, {T, c.hidden_size});
    fill(x, rng, 1.0f, false);
    x.upload();
    Outcome o;
    run_both(L, x, o);
    ASSERT_TRUE(o.gpu.ran) << o.gpu.reason;
    const size_t need = dense_bytes_needed(c, T);
    ASSERT_EQ(need, o.gpu.bytes_needed);
    void* ws = nullptr;
    ASSERT_CUDA(cudaMalloc(&ws, need));
    Tensor y(DType::kF16, {T, c.hidden_size});
    y.upload();
    const DenseResult r = dense_forward_cuda(c, L.dev_w(), x.dref(), y.dref(), kDenseNoLimit, ws, need);
    ASSERT_CUDA(cudaDeviceSynchronize());
    ASSERT_CUDA(cudaFree(ws));
    EXPECT_TRUE(r.ran) << r.reason;
    EXPECT_EQ(r.peak_bytes, need);
    y.download();
    EXPECT_EQ(y.host, o.y_gpu.host) << "workspace and allocating paths differ";
}

TEST(DenseBaselineCuda, RejectsMismatchedWeightDtype) {
    SKIP_WITHOUT_GPU();
    std::mt19937 rng(2);
    Layer L;
    L.cfg.dtype = DType::kBF16;
    L.cfg.hidden_size = 16;
    L.cfg.ffn_size = 8;
    L.cfg.num_experts = 2;
    L.cfg.top_k = 1;
    make_layer(L, rng, false);
    Tensor w13f(DType::kF32, {2, 16, 16});
    w13f.upload();
    MoEWeights w = L.dev_w();
    w.w13 = w13f.dref();
    Tensor x(DType::kBF16, {4, 16}), y(DType::kBF16, {4, 16});
    x.upload();
    y.upload();
    try {
        dense_forward_cuda(L.cfg, w, x.dref(), y.dref());
        ADD_FAILURE() << "expected switchyard::Error for fp32 w13 with a bf16 layer";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("w13"), std::string::npos) << e.what();
    }
}

}  // namespace
}  // namespace switchyard
