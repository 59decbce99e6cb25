// tools/switchyard/cuda/probe.cu: ceilings and the two routers that `switchyard profile` times (probe.h has the
// contracts); the stages come from the public API (switchyard/stages.h), the kernels here are the seed's own passes.
//
// Kernels (all grid-stride or one warp per token, no atomics):
//   softmax_kernel        one warp per token: probs[t, :] = softmax(logits[t, :]) (max, sum, divide), fp32.
//   seed_topk_kernel      one warp per token: k rounds of a warp argmax over probs[t, :] (ties: lower expert
//                         index; an expert chosen once is skipped), ids [T, k] int32, weights [T, k] fp32.
//   onehot_scatter_kernel one thread per pair (t, j): c = slot_row[t*k+j] - offsets[e]; when kept and c < C,
//                         dispatch[t, e, c] = 1 and combine[t, e, c] = dtype(w).
// Workspace layouts (256-byte aligned slices, in this order):
//   seed:   logits [T,E] f32 | probs [T,E] f32 | ids [T,k] i32 | w [T,k] f32 | counts [E] | offsets [E+1] |
//           slot_row, row_token, row_slot [T*k] | plan scratch | dispatch [T,E,C] | combine [T,E,C] | cuBLAS ws
//   sparse: logits [T,E] f32 | ids [T,k] i32 | w [T,k] f32 | counts [E] | offsets [E+1] |
//           slot_row, row_token, row_slot [T*k] | plan scratch | cuBLAS ws
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <vector>

#include "cuda/float_types.cuh"
#include "cuda/probe.h"
#include "cuda/quantize_fill.h"
#include "cuda/random_fill.h"
#include "switchyard/cuda_check.h"
#include "switchyard/stages.h"
#include "timing.h"

namespace switchyard {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

__global__ void softmax_kernel(const float* __restrict__ logits, int64_t num_tokens, int64_t num_experts,
                               float* __restrict__ probs) {
    const int lane = threadIdx.x & 31;
    const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
    for (int64_t t = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + (threadIdx.x >> 5); t < num_tokens;
         t += warps) {
        const float* l = logits + t * num_experts;
        float mx = -INFINITY;
        for (int64_t e = lane; e < num_experts; e += 32) mx = fmaxf(mx, l[e]);
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float sum = 0.0f;
        for (int64_t e = lane; e < num_experts; e += 32) sum += expf(l[e] - mx);
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        float* p = probs + t * num_experts;
        for (int64_t e = lane; e < num_experts; e += 32) p[e] = expf(l[e] - mx) / sum;
    }
}

// E <= 32 * 32: each lane remembers which of its (at most 32) experts were chosen in a bit mask.
__global__ void seed_topk_kernel(const float* __restrict__ probs, int64_t num_tokens, int64_t num_experts, int top_k,
                                 int32_t* __restrict__ ids, float* __restrict__ weights) {
    const int lane = threadIdx.x & 31;
    const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
    for (int64_t t = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + (threadIdx.x >> 5); t < num_tokens;
         t += warps) {
        const float* p = probs + t * num_experts;
        uint32_t taken = 0;
        for (int j = 0; j < top_k; ++j) {
            float best = -INFINITY;
            int best_e = INT_MAX;
            for (int64_t e = lane, i = 0; e < num_experts; e += 32, ++i) {
                if (taken & (1u << i)) continue;
                const float v = p[e];
                // NaN never wins (the comparison is false); the first expert seen becomes the fallback.
                if (v > best || best_e == INT_MAX) best = v, best_e = static_cast<int>(e);
            }
            for (int o = 16; o > 0; o >>= 1) {
                const float ov = __shfl_xor_sync(0xffffffffu, best, o);
                const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
                if (ov > best || (ov == best && oe < best_e) || (best_e == INT_MAX && oe != INT_MAX)) {
                    best = ov;
                    best_e = oe;
                }
            }
            if (lane == (best_e & 31)) taken |= 1u << (best_e >> 5);
            if (lane == 0) {
                ids[t * top_k + j] = best_e;
                weights[t * top_k + j] = best;
            }
        }
    }
}

template <typename T>
__global__ void onehot_scatter_kernel(const int32_t* __restrict__ ids, const float* __restrict__ weights,
                                      const int32_t* __restrict__ slot_row, const int32_t* __restrict__ offsets,
                                      int64_t num_pairs, int top_k, int64_t num_experts, int64_t capacity,
                                      T* __restrict__ dispatch, T* __restrict__ combine) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < num_pairs; i += stride) {
        const int32_t row = slot_row[i];
        if (row < 0) continue;
        const int32_t e = ids[i];
        const int64_t c = row - offsets[e];
        if (c < 0 || c >= capacity) continue;
        const int64_t t = i / top_k;
        const int64_t at = (t * num_experts + e) * capacity + c;
        dispatch[at] = cli_cuda::store_float<T>(1.0f);
        combine[at] = cli_cuda::store_float<T>(weights[i]);
    }
}

int grid_for(int64_t work, int per_block) {
    int dev = 0, sms = 132;
    if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    const int64_t want = (work + per_block - 1) / per_block;
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, static_cast<int64_t>(sms) * 16)));
}

// 256-byte aligned slices of a caller's workspace, in order; with a null base it only counts bytes (sizing pass).
class Slicer {
 public:
    Slicer(void* base, size_t capacity) : base_(static_cast<char*>(base)), capacity_(capacity) {}
    void* take(size_t bytes) {
        const size_t at = used_;
        used_ += (bytes + 255) / 256 * 256;
        if (!base_) return nullptr;
        SWITCHYARD_CHECK(used_ <= capacity_, "router probe: workspace of ", capacity_, " bytes is too small (", used_,
                         " needed so far)");
        return base_ + at;
    }
    size_t used() const { return used_; }

 private:
    char* base_;
    size_t capacity_, used_ = 0;
};

struct RouterLayout {
    TensorRef logits, probs, ids, weights;
    RoutingPlan plan;
    void* plan_ws = nullptr;
    size_t plan_ws_bytes = 0;
    void* dispatch = nullptr;
    void* combine = nullptr;
    void* gemm_ws = nullptr;
    size_t gemm_ws_bytes = 0;
    RouterBytes bytes;
};

// seed = true: the seed's layout (probs and one-hot tensors); false: Switchyard's router + plan. Tensors on device
// `dev` of the current CUDA device's index.
RouterLayout router_layout(Slicer& wc, const MoEConfig& cfg, int64_t T, int64_t C, bool seed, int dev) {
    const int64_t E = cfg.num_experts, k = cfg.top_k, n = T * k;
    const size_t a = dtype_size(cfg.dtype);
    auto tensor = [&](DType dt, std::initializer_list<int64_t> dims) {
        TensorRef t(nullptr, dt, dims, Device::kCUDA, dev);
        t.data = wc.take(t.nbytes());
        return t;
    };
    RouterLayout l;
    size_t at = wc.used();
    l.logits = tensor(DType::kF32, {T, E});
    l.bytes.logits = wc.used() - at;
    at = wc.used();
    if (seed) l.probs = tensor(DType::kF32, {T, E});
    l.bytes.probs = wc.used() - at;
    at = wc.used();
    l.ids = tensor(DType::kI32, {T, k});
    l.weights = tensor(DType::kF32, {T, k});
    l.bytes.topk = wc.used() - at;
    at = wc.used();
    l.plan.expert_counts = tensor(DType::kI32, {E});
    l.plan.expert_offsets = tensor(DType::kI32, {E + 1});
    l.plan.slot_row = tensor(DType::kI32, {T, k});
    l.plan.row_token = tensor(DType::kI32, {n});
    l.plan.row_slot = tensor(DType::kI32, {n});
    l.plan_ws_bytes = plan_workspace_size(cfg, Device::kCUDA, T);
    l.plan_ws = wc.take(l.plan_ws_bytes);
    l.bytes.plan = wc.used() - at;
    at = wc.used();
    if (seed && C > 0) {
        l.dispatch = wc.take(static_cast<size_t>(T * E * C) * a);
        l.combine = wc.take(static_cast<size_t>(T * E * C) * a);
    }
    l.bytes.onehot = wc.used() - at;
    at = wc.used();
    l.gemm_ws_bytes = router_gemm_workspace_size(Device::kCUDA);
    l.gemm_ws = wc.take(l.gemm_ws_bytes);
    l.bytes.cublas = wc.used() - at;
    l.bytes.total = wc.used();
    return l;
}

int current_device() {
    int dev = 0;
    SWITCHYARD_CUDA_CHECK(cudaGetDevice(&dev));
    return dev;
}

// x [T, H], gate [E, H] of cfg.dtype as tensors on the current device.
TensorRef input_ref(const MoEConfig& cfg, const void* p, int64_t rows, int64_t cols, int dev) {
    return TensorRef(const_cast<void*>(p), cfg.dtype, {rows, cols}, Device::kCUDA, dev);
}

void cublas_check(cublasStatus_t st, const char* what) {
    SWITCHYARD_CHECK(st == CUBLAS_STATUS_SUCCESS, what, ": ", cublasGetStatusString(st));
}

// Frees on scope exit (the probes allocate; nothing else here does).
struct ProbeAlloc {
    void* p = nullptr;
    explicit ProbeAlloc(size_t bytes) { SWITCHYARD_CUDA_CHECK(cudaMalloc(&p, bytes)); }
    ~ProbeAlloc() {
        if (p) cudaFree(p);
    }
    ProbeAlloc(const ProbeAlloc&) = delete;
    ProbeAlloc& operator=(const ProbeAlloc&) = delete;
};

}  // namespace

ProbeResult probe_bf16_gemm(int64_t n, int reps) {
    SWITCHYARD_CHECK(n > 0 && n <= 32768 && reps > 0, "probe_bf16_gemm: n=", n, " reps=", reps);
    const size_t bytes = static_cast<size_t>(n * n) * 2;
    ProbeAlloc a(bytes), b(bytes), c(bytes);
    fill_uniform(DType::kBF16, a.p, n * n, -1, 1, 11, nullptr);
    fill_uniform(DType::kBF16, b.p, n * n, -1, 1, 12, nullptr);
    cublasHandle_t h = nullptr;
    cublas_check(cublasCreate(&h), "cublasCreate");
    struct HandleGuard {
        cublasHandle_t h;
        ~HandleGuard() { cublasDestroy(h); }
    } guard{h};
    cublas_check(cublasSetStream(h, nullptr), "cublasSetStream");
    const float alpha = 1.0f, beta = 0.0f;
    const int ni = static_cast<int>(n);
    cli::EventPool ev;
    ProbeResult r;
    r.ms = cli::cuda_median_ms(
        [&] {
            cublas_check(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, ni, ni, ni, &alpha, a.p, CUDA_R_16BF, ni, b.p,
                                      CUDA_R_16BF, ni, &beta, c.p, CUDA_R_16BF, ni, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT),
                         "cublasGemmEx");
        },
        3, reps, nullptr, ev);
    r.rate = 2.0 * static_cast<double>(n) * n * n / (r.ms * 1e-3) / 1e12;
    return r;
}

namespace {
// cuBLASLt objects of one probe, destroyed on scope exit.
struct LtProbe {
    cublasLtHandle_t h = nullptr;
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulPreference_t pref = nullptr;
    LtProbe() = default;
    LtProbe(const LtProbe&) = delete;
    LtProbe& operator=(const LtProbe&) = delete;
    ~LtProbe() {
        if (pref) cublasLtMatmulPreferenceDestroy(pref);
        if (d) cublasLtMatrixLayoutDestroy(d);
        if (b) cublasLtMatrixLayoutDestroy(b);
        if (a) cublasLtMatrixLayoutDestroy(a);
        if (op) cublasLtMatmulDescDestroy(op);
        if (h) cublasLtDestroy(h);
    }
};
}  // namespace

ProbeResult probe_fp8_gemm(int64_t n, int reps, bool fast_accum) {
    SWITCHYARD_CHECK(n > 0 && n <= 32768 && n % 16 == 0 && reps > 0, "probe_fp8_gemm: n=", n, " (a multiple of 16)",
                     " reps=", reps);
    const size_t elems = static_cast<size_t>(n * n);
    const size_t ws_bytes = size_t(32) << 20;
    ProbeAlloc src(elems * 2), a(elems), b(elems), d(elems * 2), scales(2 * sizeof(float)), ws(ws_bytes);
    // Random operands: uniform(-1, 1) bf16 quantised per tensor (amax / 448), so A and B hold the spread of codes a
    // real weight has (constant data would draw less power and read faster than real data).
    float* sa = static_cast<float*>(scales.p);
    float* sb = sa + 1;
    fill_uniform(DType::kBF16, src.p, n * n, -1, 1, 21, nullptr);
    quantize_fp8_tensor(DType::kBF16, src.p, 1, n, n, static_cast<uint8_t*>(a.p), sa, nullptr);
    fill_uniform(DType::kBF16, src.p, n * n, -1, 1, 22, nullptr);
    quantize_fp8_tensor(DType::kBF16, src.p, 1, n, n, static_cast<uint8_t*>(b.p), sb, nullptr);
    SWITCHYARD_CUDA_CHECK(cudaDeviceSynchronize());

    LtProbe lt;
    cublas_check(cublasLtCreate(&lt.h), "cublasLtCreate");
    cublas_check(cublasLtMatmulDescCreate(&lt.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
    // FP8 GEMMs take A transposed ("TN"): D [n x n] = op(A) B with A and B stored k-major, column-major layouts.
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const int8_t fast = fast_accum ? 1 : 0;
    auto set = [&](cublasLtMatmulDescAttributes_t attr, const void* v, size_t bytes, const char* what) {
        cublas_check(cublasLtMatmulDescSetAttribute(lt.op, attr, v, bytes), what);
    };
    set(CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta), "TRANSA");
    set(CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb), "TRANSB");
    set(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa, sizeof(sa), "A_SCALE_POINTER");
    set(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb, sizeof(sb), "B_SCALE_POINTER");
    set(CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast), "FAST_ACCUM");
    const uint64_t un = static_cast<uint64_t>(n);
    const int64_t ld = n;
    cublas_check(cublasLtMatrixLayoutCreate(&lt.a, CUDA_R_8F_E4M3, un, un, ld), "cublasLtMatrixLayoutCreate(A)");
    cublas_check(cublasLtMatrixLayoutCreate(&lt.b, CUDA_R_8F_E4M3, un, un, ld), "cublasLtMatrixLayoutCreate(B)");
    cublas_check(cublasLtMatrixLayoutCreate(&lt.d, CUDA_R_16BF, un, un, ld), "cublasLtMatrixLayoutCreate(D)");
    cublas_check(cublasLtMatmulPreferenceCreate(&lt.pref), "cublasLtMatmulPreferenceCreate");
    cublas_check(cublasLtMatmulPreferenceSetAttribute(lt.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                      sizeof(ws_bytes)),
                 "MAX_WORKSPACE_BYTES");
    cublasLtMatmulHeuristicResult_t algo{};
    int found = 0;
    cublas_check(cublasLtMatmulAlgoGetHeuristic(lt.h, lt.op, lt.a, lt.b, lt.d, lt.d, lt.pref, 1, &algo, &found),
                 "cublasLtMatmulAlgoGetHeuristic");
    SWITCHYARD_CHECK(found > 0, "probe_fp8_gemm: cuBLASLt has no FP8 (e4m3, TN, bf16 out) algorithm for n=", n);
    const float alpha = 1.0f, beta = 0.0f;
    cli::EventPool ev;
    ProbeResult r;
    r.ms = cli::cuda_median_ms(
        [&] {
            cublas_check(cublasLtMatmul(lt.h, lt.op, &alpha, a.p, lt.a, b.p, lt.b, &beta, d.p, lt.d, d.p, lt.d,
                                        &algo.algo, ws.p, ws_bytes, nullptr),
                         "cublasLtMatmul");
        },
        3, reps, nullptr, ev);
    r.rate = 2.0 * static_cast<double>(n) * n * n / (r.ms * 1e-3) / 1e12;
    return r;
}

ProbeResult probe_copy(size_t bytes, int reps) {
    SWITCHYARD_CHECK(bytes > 0 && reps > 0, "probe_copy: bytes=", bytes, " reps=", reps);
    ProbeAlloc src(bytes), dst(bytes);
    SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(src.p, 1, bytes, nullptr));
    cli::EventPool ev;
    ProbeResult r;
    r.ms = cli::cuda_median_ms(
        [&] { SWITCHYARD_CUDA_CHECK(cudaMemcpyAsync(dst.p, src.p, bytes, cudaMemcpyDeviceToDevice, nullptr)); }, 2, reps,
        nullptr, ev);
    r.rate = 2.0 * static_cast<double>(bytes) / (r.ms * 1e-3) / 1e9;
    return r;
}

RouterBytes seed_router_bytes(const MoEConfig& cfg, int64_t num_tokens, int64_t capacity) {
    Slicer wc(nullptr, 0);
    return router_layout(wc, cfg, num_tokens, capacity, true, 0).bytes;
}

RouterBytes sparse_router_bytes(const MoEConfig& cfg, int64_t num_tokens) {
    Slicer wc(nullptr, 0);
    return router_layout(wc, cfg, num_tokens, 0, false, 0).bytes;
}

void seed_router_forward(const MoEConfig& cfg, const void* x, const void* gate, int64_t T, int64_t C,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream,
                         const int32_t** expert_counts) {
    const int64_t E = cfg.num_experts, k = cfg.top_k, H = cfg.hidden_size;
    SWITCHYARD_CHECK(E >= 1 && E <= 1024, "seed router: num_experts=", E, " (at most 1024)");
    SWITCHYARD_CHECK(k >= 1 && k <= E, "seed router: top_k=", k);
    SWITCHYARD_CHECK(C >= 0, "seed router: capacity=", C);
    const int dev = current_device();
    Slicer wc(workspace, workspace_bytes);
    const RouterLayout l = router_layout(wc, cfg, T, C, true, dev);
    if (expert_counts) *expert_counts = l.plan.expert_counts.ptr<int32_t>();
    router_gemm(input_ref(cfg, x, T, H, dev), input_ref(cfg, gate, E, H, dev), l.logits, l.gemm_ws, l.gemm_ws_bytes,
                stream);
    if (T > 0) {
        const int blocks = grid_for(T, kWarpsPerBlock);
        softmax_kernel<<<blocks, kThreads, 0, stream>>>(l.logits.ptr<float>(), T, E, l.probs.ptr<float>());
        SWITCHYARD_CUDA_CHECK_LAUNCH();
        seed_topk_kernel<<<blocks, kThreads, 0, stream>>>(l.probs.ptr<float>(), T, E, static_cast<int>(k),
                                                          l.ids.ptr<int32_t>(), l.weights.ptr<float>());
        SWITCHYARD_CUDA_CHECK_LAUNCH();
    }
    // Positions inside each expert in token order (GShard's cumsum of the one-hot mask); nothing dropped here:
    // pairs at c >= C are left out of the one-hot tensors below, as the seed's capacity does.
    MoEConfig dropless = cfg;
    dropless.capacity_factor = 0;
    dropless.min_capacity = 0;
    dropless.drop_policy = DropPolicy::kPosition;
    build_plan(dropless, l.ids, l.weights, l.plan, l.plan_ws, l.plan_ws_bytes, stream);
    if (C > 0 && T > 0) {
        const size_t onehot = static_cast<size_t>(T * E * C) * dtype_size(cfg.dtype);
        SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(l.dispatch, 0, onehot, stream));
        SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(l.combine, 0, onehot, stream));
        cli_cuda::with_float_type(cfg.dtype, "seed router one-hot", [&](auto tag) {
            using Tt = typename decltype(tag)::type;
            onehot_scatter_kernel<Tt><<<grid_for(T * k, kThreads), kThreads, 0, stream>>>(
                l.ids.ptr<int32_t>(), l.weights.ptr<float>(), l.plan.slot_row.ptr<int32_t>(),
                l.plan.expert_offsets.ptr<int32_t>(), T * k, static_cast<int>(k), E, C, static_cast<Tt*>(l.dispatch),
                static_cast<Tt*>(l.combine));
            SWITCHYARD_CUDA_CHECK_LAUNCH();
        });
    }
}

void sparse_router_forward(const MoEConfig& cfg, const void* x, const void* gate, const float* bias, int64_t T,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    const int64_t E = cfg.num_experts, H = cfg.hidden_size;
    const int dev = current_device();
    Slicer wc(workspace, workspace_bytes);
    const RouterLayout l = router_layout(wc, cfg, T, 0, false, dev);
    router_gemm(input_ref(cfg, x, T, H, dev), input_ref(cfg, gate, E, H, dev), l.logits, l.gemm_ws, l.gemm_ws_bytes,
                stream);
    TensorRef b;
    if (cfg.use_score_bias) b = TensorRef(const_cast<float*>(bias), DType::kF32, {E}, Device::kCUDA, dev);
    route(cfg, l.logits, b, l.ids, l.weights, stream);
    build_plan(cfg, l.ids, l.weights, l.plan, l.plan_ws, l.plan_ws_bytes, stream);
}

}  // namespace cuda
}  // namespace switchyard
