// tools/switchyard/cuda/probe.cu: ceilings, device-side random fill and the two routers that `switchyard profile` times
// (probe.h has the contracts).
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
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/dispatch.cuh"
#include "cuda/moe_stages.h"
#include "cuda/probe.h"
#include "cuda/random_fill.h"

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
        dispatch[at] = from_f32<T>(1.0f);
        combine[at] = from_f32<T>(weights[i]);
    }
}

int grid_for(int64_t work, int per_block) {
    int dev = 0, sms = 132;
    if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    const int64_t want = (work + per_block - 1) / per_block;
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, static_cast<int64_t>(sms) * 16)));
}

struct RouterLayout {
    float* logits = nullptr;
    float* probs = nullptr;
    int32_t* ids = nullptr;
    float* weights = nullptr;
    int32_t* counts = nullptr;
    int32_t* offsets = nullptr;
    int32_t* slot_row = nullptr;
    int32_t* row_token = nullptr;
    int32_t* row_slot = nullptr;
    void* plan_ws = nullptr;
    size_t plan_ws_bytes = 0;
    void* dispatch = nullptr;
    void* combine = nullptr;
    void* cublas_ws = nullptr;
    RouterBytes bytes;
};

// seed = true: the seed's layout (probs and one-hot tensors); false: Switchyard's router + plan.
RouterLayout router_layout(WorkspaceCarver& wc, const MoEConfig& cfg, int64_t T, int64_t C, bool seed) {
    const int64_t E = cfg.num_experts, k = cfg.top_k, n = T * k;
    const size_t a = dtype_size(cfg.dtype);
    RouterLayout l;
    size_t at = wc.used();
    l.logits = wc.take<float>(T * E);
    l.bytes.logits = wc.used() - at;
    at = wc.used();
    if (seed) l.probs = wc.take<float>(T * E);
    l.bytes.probs = wc.used() - at;
    at = wc.used();
    l.ids = wc.take<int32_t>(n);
    l.weights = wc.take<float>(n);
    l.bytes.topk = wc.used() - at;
    at = wc.used();
    l.counts = wc.take<int32_t>(E);
    l.offsets = wc.take<int32_t>(E + 1);
    l.slot_row = wc.take<int32_t>(n);
    l.row_token = wc.take<int32_t>(n);
    l.row_slot = wc.take<int32_t>(n);
    l.plan_ws_bytes = plan_workspace_size(T, k, E);
    l.plan_ws = wc.take_bytes(l.plan_ws_bytes);
    l.bytes.plan = wc.used() - at;
    at = wc.used();
    if (seed && C > 0) {
        l.dispatch = wc.take_bytes(static_cast<size_t>(T * E * C) * a);
        l.combine = wc.take_bytes(static_cast<size_t>(T * E * C) * a);
    }
    l.bytes.onehot = wc.used() - at;
    at = wc.used();
    l.cublas_ws = wc.take_bytes(kCublasWorkspaceBytes);
    l.bytes.cublas = wc.used() - at;
    l.bytes.total = wc.used();
    return l;
}

void run_plan(const MoEConfig& cfg, const RouterLayout& l, int64_t T, int64_t capacity, DropPolicy policy,
              cudaStream_t stream) {
    PlanArgs pa;
    pa.num_tokens = T;
    pa.top_k = cfg.top_k;
    pa.num_experts = cfg.num_experts;
    pa.capacity = capacity;
    pa.drop_policy = policy;
    pa.topk_ids = l.ids;
    pa.topk_weights = l.weights;
    pa.expert_counts = l.counts;
    pa.expert_offsets = l.offsets;
    pa.slot_row = l.slot_row;
    pa.row_token = l.row_token;
    pa.row_slot = l.row_slot;
    build_plan(pa, l.plan_ws, l.plan_ws_bytes, stream);
}

class Events {
 public:
    Events() {
        SWITCHYARD_CUDA_CHECK(cudaEventCreate(&a_));
        SWITCHYARD_CUDA_CHECK(cudaEventCreate(&b_));
    }
    ~Events() {
        cudaEventDestroy(a_);
        cudaEventDestroy(b_);
    }
    Events(const Events&) = delete;
    Events& operator=(const Events&) = delete;
    template <typename Fn>
    double median_ms(Fn&& fn, int warmup, int reps, cudaStream_t stream) {
        for (int i = 0; i < warmup; ++i) fn();
        SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(stream));
        std::vector<float> t;
        for (int i = 0; i < reps; ++i) {
            SWITCHYARD_CUDA_CHECK(cudaEventRecord(a_, stream));
            fn();
            SWITCHYARD_CUDA_CHECK(cudaEventRecord(b_, stream));
            SWITCHYARD_CUDA_CHECK(cudaEventSynchronize(b_));
            float ms = 0;
            SWITCHYARD_CUDA_CHECK(cudaEventElapsedTime(&ms, a_, b_));
            t.push_back(ms);
        }
        std::sort(t.begin(), t.end());
        const size_t n = t.size();
        return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
    }

 private:
    cudaEvent_t a_ = nullptr, b_ = nullptr;
};

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
    SWITCHYARD_CUBLAS_CHECK(cublasCreate(&h));
    struct HandleGuard {
        cublasHandle_t h;
        ~HandleGuard() { cublasDestroy(h); }
    } guard{h};
    SWITCHYARD_CUBLAS_CHECK(cublasSetStream(h, nullptr));
    const float alpha = 1.0f, beta = 0.0f;
    const int ni = static_cast<int>(n);
    Events ev;
    ProbeResult r;
    r.ms = ev.median_ms(
        [&] {
            SWITCHYARD_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, ni, ni, ni, &alpha, a.p, CUDA_R_16BF, ni,
                                                 b.p, CUDA_R_16BF, ni, &beta, c.p, CUDA_R_16BF, ni,
                                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        },
        3, reps, nullptr);
    r.rate = 2.0 * static_cast<double>(n) * n * n / (r.ms * 1e-3) / 1e12;
    return r;
}

ProbeResult probe_copy(size_t bytes, int reps) {
    SWITCHYARD_CHECK(bytes > 0 && reps > 0, "probe_copy: bytes=", bytes, " reps=", reps);
    ProbeAlloc src(bytes), dst(bytes);
    SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(src.p, 1, bytes, nullptr));
    Events ev;
    ProbeResult r;
    r.ms = ev.median_ms(
        [&] { SWITCHYARD_CUDA_CHECK(cudaMemcpyAsync(dst.p, src.p, bytes, cudaMemcpyDeviceToDevice, nullptr)); }, 2, reps,
        nullptr);
    r.rate = 2.0 * static_cast<double>(bytes) / (r.ms * 1e-3) / 1e9;
    return r;
}

RouterBytes seed_router_bytes(const MoEConfig& cfg, int64_t num_tokens, int64_t capacity) {
    WorkspaceCarver wc;
    return router_layout(wc, cfg, num_tokens, capacity, true).bytes;
}

RouterBytes sparse_router_bytes(const MoEConfig& cfg, int64_t num_tokens) {
    WorkspaceCarver wc;
    return router_layout(wc, cfg, num_tokens, 0, false).bytes;
}

void seed_router_forward(const MoEConfig& cfg, const void* x, const void* gate, int64_t T, int64_t C,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream,
                         const int32_t** expert_counts) {
    const int64_t E = cfg.num_experts, k = cfg.top_k, H = cfg.hidden_size;
    SWITCHYARD_CHECK(E >= 1 && E <= 1024, "seed router: num_experts=", E, " (at most 1024)");
    SWITCHYARD_CHECK(k >= 1 && k <= E, "seed router: top_k=", k);
    SWITCHYARD_CHECK(C >= 0, "seed router: capacity=", C);
    WorkspaceCarver wc(workspace, workspace_bytes);
    const RouterLayout l = router_layout(wc, cfg, T, C, true);
    if (expert_counts) *expert_counts = l.counts;
    router_gemm(cfg.dtype, x, gate, T, H, E, l.logits, l.cublas_ws, stream);
    if (T > 0) {
        const int blocks = grid_for(T, kWarpsPerBlock);
        softmax_kernel<<<blocks, kThreads, 0, stream>>>(l.logits, T, E, l.probs);
        SWITCHYARD_CUDA_CHECK_LAUNCH();
        seed_topk_kernel<<<blocks, kThreads, 0, stream>>>(l.probs, T, E, static_cast<int>(k), l.ids, l.weights);
        SWITCHYARD_CUDA_CHECK_LAUNCH();
    }
    // Positions inside each expert in token order (GShard's cumsum of the one-hot mask); nothing dropped here:
    // pairs at c >= C are left out of the one-hot tensors below, as the seed's capacity does.
    run_plan(cfg, l, T, 0, DropPolicy::kPosition, stream);
    if (C > 0 && T > 0) {
        const size_t onehot = static_cast<size_t>(T * E * C) * dtype_size(cfg.dtype);
        SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(l.dispatch, 0, onehot, stream));
        SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(l.combine, 0, onehot, stream));
        dispatch_float_dtype(cfg.dtype, "seed router one-hot", [&](auto tag) {
            using Tt = typename decltype(tag)::type;
            onehot_scatter_kernel<Tt><<<grid_for(T * k, kThreads), kThreads, 0, stream>>>(
                l.ids, l.weights, l.slot_row, l.offsets, T * k, static_cast<int>(k), E, C,
                static_cast<Tt*>(l.dispatch), static_cast<Tt*>(l.combine));
            SWITCHYARD_CUDA_CHECK_LAUNCH();
        });
    }
}

void sparse_router_forward(const MoEConfig& cfg, const void* x, const void* gate, const float* bias, int64_t T,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    WorkspaceCarver wc(workspace, workspace_bytes);
    const RouterLayout l = router_layout(wc, cfg, T, 0, false);
    router_gemm(cfg.dtype, x, gate, T, cfg.hidden_size, cfg.num_experts, l.logits, l.cublas_ws, stream);
    route_topk(cfg, l.logits, cfg.use_score_bias ? bias : nullptr, T, l.ids, l.weights, nullptr, nullptr, stream);
    run_plan(cfg, l, T, cfg.capacity(T), cfg.drop_policy, stream);
}

}  // namespace cuda
}  // namespace switchyard
