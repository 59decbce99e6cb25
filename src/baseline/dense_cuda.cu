// src/baseline/dense_cuda.cu: the dense GShard baseline on one CUDA device (cuBLAS + a few plain kernels).
//
// Inputs:  x [T, H] of cfg.dtype, weights (gate [E, H], w13 [E, R, H], w2 [E, H, F], shared [Rs, H], [H, S]) of
//          cfg.dtype, score_bias [E] fp32; all on the device of x. Output: y [T, H] of cfg.dtype.
// Must match dense_forward_cpu (src/baseline/dense_ref.cpp) and the formula in switchyard/baseline.h; the layout of the arena
// (one device allocation or the caller's workspace, slices per dense_layout) is the same as on the CPU:
//   logits [T, E] f32 | probs [T, E] f32 | ids [T, k] i32 | w [T, k] f32 | loc [T, k] i32   (router part)
//   dispatch [T, E, C] | combine [T, E, C] | expert_in [E, C, H] | pre [E, C, R] f32 | h [E, C, F] |
//   expert_out [E, C, H] | product [T, E, C, H] | shared_pre [T, Rs] f32 | shared_h [T, S] | shared_out [T, H] |
//   out [T, H]                                                    (dtype unless noted; row-major, contiguous)
// Steps: gate GEMM (cuBLAS, fp32 out) -> probs kernel -> logits copied to the host, routing and drops with
// ref::route / ref::build_plan (the sparse path's rules), ids / weights / locations copied back -> one-hot
// scatter -> the einsum 'tec,th->ech' and both expert GEMMs as strided-batched cuBLAS GEMMs over E (fp32
// accumulation, CUBLAS_COMPUTE_32F: no TF32) -> activation kernel (fp32 in, one rounding) -> the seed's
// broadcast multiply, materialised -> reduction over e then c in fp32, + shared, one rounding -> copy into y.
// The only host synchronisation is the routing; the arena is freed stream-ordered (cudaFreeAsync).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "switchyard/baseline.h"
#include "cuda/common.cuh"
#include "cuda/cublas_util.h"
#include "cuda/dispatch.cuh"
#include "baseline/dense_common.h"
#include "ref/ref.h"
#include "switchyard/error.h"

namespace switchyard {
namespace {

using cuda::from_f32;
using cuda::to_f32;

constexpr int kThreads = 256;

// ---- kernels ------------------------------------------------------------------------------------------------

// probs[t, e] = softmax over e of logits[t, :] (sigmoid(logits) when `sigmoid`); one thread per token.
__global__ void probs_kernel(const float* __restrict__ logits, int64_t num_tokens, int64_t num_experts, bool sigmoid,
                             float* __restrict__ probs) {
    const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (t >= num_tokens) return;
    const float* l = logits + t * num_experts;
    float* p = probs + t * num_experts;
    if (sigmoid) {
        for (int64_t e = 0; e < num_experts; ++e) p[e] = 1.0f / (1.0f + expf(-l[e]));
        return;
    }
    float mx = -INFINITY;
    for (int64_t e = 0; e < num_experts; ++e) mx = fmaxf(mx, l[e]);
    float sum = 0.0f;
    for (int64_t e = 0; e < num_experts; ++e) sum += expf(l[e] - mx);
    for (int64_t e = 0; e < num_experts; ++e) p[e] = expf(l[e] - mx) / sum;
}

// dispatch[t, ids, loc] = 1 and combine[t, ids, loc] = dtype(w) for every kept pair (the tensors are zeroed first).
template <typename T>
__global__ void scatter_onehot_kernel(const int32_t* __restrict__ ids, const float* __restrict__ weights,
                                      const int32_t* __restrict__ loc, int64_t num_pairs, int64_t top_k,
                                      int64_t num_experts, int64_t capacity, T* __restrict__ dispatch,
                                      T* __restrict__ combine) {
    const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i >= num_pairs || loc[i] < 0) return;
    const int64_t t = i / top_k;
    const int64_t at = (t * num_experts + ids[i]) * capacity + loc[i];
    dispatch[at] = from_f32<T>(1.0f);
    combine[at] = from_f32<T>(weights[i]);
}

__device__ __forceinline__ float gelu_tanh_f(float v) {
    const float kSqrt2OverPi = 0.7978845608028654f;
    return 0.5f * v * (1.0f + tanhf(kSqrt2OverPi * (v + 0.044715f * v * v * v)));
}

// h[r, f] = dtype(act(g) * u) (gated) or dtype(act(u)), g = dtype(pre[r, f]), u = dtype(pre[r, F + f]); pre fp32 [rows, R].
template <typename T>
__global__ void activation_kernel(const float* __restrict__ pre, int64_t rows, int64_t ffn, int act,
                                  T* __restrict__ h) {
    const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i >= rows * ffn) return;
    const int64_t r = i / ffn, f = i % ffn;
    const Activation a = static_cast<Activation>(act);
    const bool gated = a == Activation::kSwiGLU || a == Activation::kGeGLU;
    const int64_t R = gated ? 2 * ffn : ffn;
    // GEMM1's outputs are stored in the layer dtype (the sparse path's rounding point, src/ref/experts.cpp).
    auto stored = [](float v) { return to_f32(from_f32<T>(v)); };
    const float up = stored(pre[r * R + (gated ? ffn + f : f)]);
    float v;
    switch (a) {
        case Activation::kSwiGLU: {
            const float g = stored(pre[r * R + f]);
            v = g / (1.0f + expf(-g)) * up;
            break;
        }
        case Activation::kGeGLU: v = gelu_tanh_f(stored(pre[r * R + f])) * up; break;
        case Activation::kGELU: v = gelu_tanh_f(up); break;
        default: v = up < 0.0f ? 0.0f : up; break;  // ReLU; NaN stays NaN
    }
    h[i] = from_f32<T>(v);
}

// The seed's broadcast multiply, materialised: product[t, e, c, h] = dtype(combine[t, e, c] * expert_out[e, c, h]).
// One block per (t, e, c) row (grid-stride over rows), threads over h: coalesced, no per-element division.
// __fmul_rn keeps the compiler from fusing the product into a later add (the CPU rounds it on its own too).
template <typename T>
__global__ void product_kernel(const T* __restrict__ combine, const T* __restrict__ expert_out, int64_t num_rows,
                               int64_t ec_count, int64_t hidden, T* __restrict__ product) {
    for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
        const float cw = to_f32(combine[row]);
        const T* o = expert_out + (row % ec_count) * hidden;
        T* p = product + row * hidden;
        for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) p[h] = from_f32<T>(__fmul_rn(cw, to_f32(o[h])));
    }
}

// out[t, h] = dtype( sum_e sum_c product[t, e, c, h] (+ shared_out[t, h]) ), fp32, fixed order; one thread per (t, h).
template <typename T>
__global__ void reduce_kernel(const T* __restrict__ product, const T* __restrict__ shared_out, int64_t num_tokens,
                              int64_t ec_count, int64_t hidden, T* __restrict__ out) {
    const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i >= num_tokens * hidden) return;
    const int64_t t = i / hidden, h = i % hidden;
    const T* p = product + t * ec_count * hidden + h;
    float acc = 0.0f;
    for (int64_t ec = 0; ec < ec_count; ++ec) acc = __fadd_rn(acc, to_f32(p[ec * hidden]));
    if (shared_out != nullptr) acc = __fadd_rn(acc, to_f32(shared_out[i]));
    out[i] = from_f32<T>(acc);
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(std::max<int64_t>(1, (n + kThreads - 1) / kThreads)); }

// ---- cuBLAS -------------------------------------------------------------------------------------------------

int as_int(int64_t v, const char* what) {
    SWITCHYARD_CHECK(v >= 0 && v <= INT32_MAX, "dense baseline: ", what, "=", v, " exceeds cuBLAS's int range");
    return static_cast<int>(v);
}

// Column-major cuBLAS call C[m, n] = op(A)[m, k] . op(B)[k, n], batched with strides (elements), fp32 compute.
// Written for row-major callers: see each use for the mapping.
void gemm(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k,
          const void* a, DType at, int64_t lda, int64_t stride_a, const void* b, DType bt, int64_t ldb,
          int64_t stride_b, void* c, DType ct, int64_t ldc, int64_t stride_c, int64_t batch) {
    if (m == 0 || n == 0 || batch == 0) return;
    SWITCHYARD_CHECK(k > 0, "internal: gemm with k=0");
    const float alpha = 1.0f, beta = 0.0f;
    constexpr const char* kWhat = "dense baseline";
    SWITCHYARD_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        handle, ta, tb, as_int(m, "m"), as_int(n, "n"), as_int(k, "k"), &alpha, a, cuda::cuda_data_type(at, kWhat),
        as_int(lda, "lda"), stride_a, b, cuda::cuda_data_type(bt, kWhat), as_int(ldb, "ldb"), stride_b, &beta, c,
        cuda::cuda_data_type(ct, kWhat), as_int(ldc, "ldc"),
        stride_c, as_int(batch, "batch"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// ---- memory -------------------------------------------------------------------------------------------------

// Stream-ordered device allocation freed (stream-ordered) when it goes out of scope; null when borrowed.
struct DeviceArena {
    void* ptr = nullptr;
    cudaStream_t stream = nullptr;
    bool owned = false;
    DeviceArena() = default;
    DeviceArena(const DeviceArena&) = delete;
    DeviceArena& operator=(const DeviceArena&) = delete;
    ~DeviceArena() {
        if (owned && ptr != nullptr) cudaFreeAsync(ptr, stream);  // a destructor must not throw
    }
};

std::string bytes_str(size_t b) {
    std::ostringstream os;
    os << b << " bytes";
    if (b >= (size_t(1) << 30)) os << " (" << static_cast<double>(b) / double(size_t(1) << 30) << " GiB)";
    return os.str();
}

// Allocates `bytes` on `stream` after checking the device's free memory; on failure fills `reason`.
bool try_alloc(DeviceArena& arena, size_t bytes, size_t need_total, cudaStream_t stream, std::string& reason) {
    size_t free_b = 0, total_b = 0;
    SWITCHYARD_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    if (bytes > free_b) {
        reason = "needs " + bytes_str(need_total) + ", device has " + bytes_str(free_b) + " free of " +
                 bytes_str(total_b);
        return false;
    }
    void* p = nullptr;
    const cudaError_t err = cudaMallocAsync(&p, std::max<size_t>(bytes, 1), stream);
    if (err != cudaSuccess) {
        cudaGetLastError();  // clear the sticky-free allocation error
        reason = "needs " + bytes_str(need_total) + ": cudaMallocAsync of " + bytes_str(bytes) +
                 " failed: " + cudaGetErrorString(err);
        return false;
    }
    arena.ptr = p;
    arena.stream = stream;
    arena.owned = true;
    return true;
}

void check_device_weight(const TensorRef& t, const char* name, const MoEConfig& cfg, int device) {
    SWITCHYARD_CHECK(t.dtype == cfg.dtype, "dense baseline on CUDA: weights.", name, " dtype=", to_string(t.dtype),
                     " must equal cfg.dtype=", to_string(cfg.dtype), " (cuBLAS takes matching input types)");
    SWITCHYARD_CHECK(t.device_index == device, "weights.", name, " is on cuda:", t.device_index, ", x on cuda:",
                     device);
}

}  // namespace

DenseResult dense_forward_cuda(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, const TensorRef& y,
                               size_t memory_limit_bytes, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream, LoadStats* stats) {
    validate_dense_args(cfg, w, x, y, Device::kCUDA);
    const int device = x.device_index;
    SWITCHYARD_CHECK(y.device_index == device, "y is on cuda:", y.device_index, ", x on cuda:", device);
    check_device_weight(w.gate, "gate", cfg, device);
    check_device_weight(w.w13, "w13", cfg, device);
    check_device_weight(w.w2, "w2", cfg, device);
    const int64_t S = cfg.shared_width();
    if (S > 0) {
        check_device_weight(w.shared_w13, "shared_w13", cfg, device);
        check_device_weight(w.shared_w2, "shared_w2", cfg, device);
    }
    cuda::DeviceGuard guard(device);

    const int64_t T = x.shape[0], E = cfg.num_experts, k = cfg.top_k, H = cfg.hidden_size, F = cfg.ffn_size;
    const int64_t R = cfg.w13_rows(), Rs = is_gated(cfg.activation) ? 2 * S : S;
    const DType dt = cfg.dtype;
    const size_t a = dtype_size(dt);
    DenseResult res;
    auto refuse_limit = [&](size_t need, int64_t C) {
        res.ran = false;
        res.bytes_needed = need;
        res.capacity = C;
        res.reason = "needs " + bytes_str(need) + ", limit " + bytes_str(memory_limit_bytes);
    };

    if (cfg.capacity_factor > 0) {  // C and the whole need are known before anything runs
        const int64_t C = cfg.capacity(T);
        const size_t need = dense_bytes_needed(cfg, T, C);
        if (need > memory_limit_bytes) {
            refuse_limit(need, C);
            return res;
        }
    }

    // ---- router part ----
    const DenseLayout lr = dense_layout(cfg, T, 0);
    DeviceArena router_arena;
    char* rbase = nullptr;
    if (workspace != nullptr && workspace_bytes >= lr.router_end) {
        rbase = static_cast<char*>(workspace);
    } else {
        if (!try_alloc(router_arena, lr.router_end, lr.router_end, stream, res.reason)) return res;
        rbase = static_cast<char*>(router_arena.ptr);
    }
    res.peak_bytes = lr.router_end;
    float* d_logits = reinterpret_cast<float*>(rbase + lr.logits);
    float* d_probs = reinterpret_cast<float*>(rbase + lr.probs);
    int32_t* d_ids = reinterpret_cast<int32_t*>(rbase + lr.topk_ids);
    float* d_wts = reinterpret_cast<float*>(rbase + lr.topk_weights);
    int32_t* d_loc = reinterpret_cast<int32_t*>(rbase + lr.loc);

    // The device's shared cuBLAS handle (no TF32), held for the whole forward: its stream is per call.
    const cuda::CublasLease cublas(stream);
    cublasHandle_t handle = cublas.handle();

    // logits [T, E] = x [T, H] . gate [E, H]^T  (column-major: logits^T [E, T] = op_T(gate [H, E]) . x^T [H, T])
    std::vector<float> logits(static_cast<size_t>(T * E));
    if (T > 0) {
        gemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, E, T, H, w.gate.data, dt, H, 0, x.data, dt, H, 0, d_logits,
             DType::kF32, E, 0, 1);
        probs_kernel<<<blocks_for(T), kThreads, 0, stream>>>(d_logits, T, E,
                                                              cfg.score_function == ScoreFunction::kSigmoid, d_probs);
        SWITCHYARD_CUDA_CHECK_LAUNCH();
        SWITCHYARD_CUDA_CHECK(cudaMemcpyAsync(logits.data(), d_logits, logits.size() * sizeof(float),
                                              cudaMemcpyDeviceToHost, stream));
    }
    std::vector<float> bias;
    if (cfg.use_score_bias) {
        bias.resize(static_cast<size_t>(E));
        SWITCHYARD_CUDA_CHECK(
            cudaMemcpyAsync(bias.data(), w.score_bias.data, E * sizeof(float), cudaMemcpyDeviceToHost, stream));
    }
    SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(stream));  // routing runs on the host (the baseline's one sync)

    std::vector<int32_t> ids;
    std::vector<float> wts;
    ref::route(cfg, logits, bias, T, ids, wts);
    const ref::HostPlan plan = ref::build_plan(cfg, T, ids, wts);
    int64_t max_count = 0;
    for (int64_t e = 0; e < E; ++e) max_count = std::max<int64_t>(max_count, plan.expert_counts[e]);
    const int64_t C = cfg.capacity_factor > 0 ? cfg.capacity(T) : max_count;
    std::vector<int32_t> loc(static_cast<size_t>(T * k));
    for (int64_t i = 0; i < T * k; ++i) {
        const int32_t r = plan.slot_row[i];
        loc[i] = r < 0 ? -1 : r - plan.expert_offsets[ids[i]];
        SWITCHYARD_CHECK(loc[i] < C, "internal: location ", loc[i], " of pair ", i, " past capacity ", C);
    }
    if (T > 0) {  // pageable sources: each copy returns once the source has been staged
        SWITCHYARD_CUDA_CHECK(
            cudaMemcpyAsync(d_ids, ids.data(), ids.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
        SWITCHYARD_CUDA_CHECK(
            cudaMemcpyAsync(d_wts, wts.data(), wts.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
        SWITCHYARD_CUDA_CHECK(
            cudaMemcpyAsync(d_loc, loc.data(), loc.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
    }
    // ---- the rest of the arena ----
    DenseLayout l;
    if (!dense::record_routing(cfg, T, C, plan, logits, stats, memory_limit_bytes, res, l, refuse_limit)) return res;
    DeviceArena main_arena;
    char* base = nullptr;  // base + (offset - router_end) addresses the main part
    if (workspace != nullptr && workspace_bytes >= l.total && rbase == workspace) {
        base = static_cast<char*>(workspace) + l.router_end;
    } else {
        if (!try_alloc(main_arena, l.total - l.router_end, l.total, stream, res.reason)) return res;
        base = static_cast<char*>(main_arena.ptr);
    }
    res.peak_bytes = l.total;
    auto at = [&](size_t offset) { return base + (offset - l.router_end); };
    void* dispatch = at(l.dispatch);
    void* combine = at(l.combine);
    void* expert_in = at(l.expert_in);
    float* pre = reinterpret_cast<float*>(at(l.pre));
    void* hidden = at(l.hidden);
    void* expert_out = at(l.expert_out);
    void* product = at(l.product);
    float* shared_pre = reinterpret_cast<float*>(at(l.shared_pre));
    void* shared_h = at(l.shared_h);
    void* shared_out = at(l.shared_out);
    void* out = at(l.output);

    if (T > 0) {
        const int64_t tec = T * E * C;
        SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(dispatch, 0, static_cast<size_t>(tec) * a, stream));  // +0.0
        SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(combine, 0, static_cast<size_t>(tec) * a, stream));
        cuda::dispatch_float_dtype(dt, "dense baseline", [&](auto tag) {
            using Elem = typename decltype(tag)::type;
            scatter_onehot_kernel<Elem><<<blocks_for(T * k), kThreads, 0, stream>>>(
                d_ids, d_wts, d_loc, T * k, k, E, C, static_cast<Elem*>(dispatch), static_cast<Elem*>(combine));
            SWITCHYARD_CUDA_CHECK_LAUNCH();
        });
        // expert_in[e] [C, H] = dispatch[:, e, :]^T [C, T] . x [T, H]
        // column-major per e: expert_in^T [H, C] = x^T [H, T] . D_e [T, C], D_e = op_T(dispatch + e*C, ld E*C)
        gemm(handle, CUBLAS_OP_N, CUBLAS_OP_T, H, C, T, x.data, dt, H, 0, dispatch, dt, E * C, C, expert_in, dt, H,
             C * H, E);
        // pre[e] [C, R] = expert_in[e] [C, H] . w13[e] [R, H]^T  (column-major: pre^T = op_T(w13^T) . expert_in^T)
        gemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, R, C, H, w.w13.data, dt, H, R * H, expert_in, dt, H, C * H, pre,
             DType::kF32, R, C * R, E);
        cuda::dispatch_float_dtype(dt, "dense baseline", [&](auto tag) {
            using Elem = typename decltype(tag)::type;
            activation_kernel<Elem><<<blocks_for(E * C * F), kThreads, 0, stream>>>(
                pre, E * C, F, static_cast<int>(cfg.activation), static_cast<Elem*>(hidden));
            SWITCHYARD_CUDA_CHECK_LAUNCH();
        });
        // expert_out[e] [C, H] = h[e] [C, F] . w2[e] [H, F]^T
        gemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, H, C, F, w.w2.data, dt, F, H * F, hidden, dt, F, C * F, expert_out, dt,
             H, C * H, E);
        if (S > 0) {
            // shared_pre [T, Rs] = x . shared_w13^T; shared_h = act; shared_out [T, H] = shared_h . shared_w2^T
            gemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, Rs, T, H, w.shared_w13.data, dt, H, 0, x.data, dt, H, 0, shared_pre,
                 DType::kF32, Rs, 0, 1);
            cuda::dispatch_float_dtype(dt, "dense baseline", [&](auto tag) {
                using Elem = typename decltype(tag)::type;
                activation_kernel<Elem><<<blocks_for(T * S), kThreads, 0, stream>>>(
                    shared_pre, T, S, static_cast<int>(cfg.activation), static_cast<Elem*>(shared_h));
                SWITCHYARD_CUDA_CHECK_LAUNCH();
            });
            gemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, H, T, S, w.shared_w2.data, dt, S, 0, shared_h, dt, S, 0, shared_out,
                 dt, H, 0, 1);
        }
        cuda::dispatch_float_dtype(dt, "dense baseline", [&](auto tag) {
            using Elem = typename decltype(tag)::type;
            if (tec > 0) {
                const unsigned grid = static_cast<unsigned>(std::min<int64_t>(tec, int64_t(1) << 20));
                product_kernel<Elem><<<grid, kThreads, 0, stream>>>(static_cast<const Elem*>(combine),
                                                                    static_cast<const Elem*>(expert_out), tec, E * C,
                                                                    H, static_cast<Elem*>(product));
                SWITCHYARD_CUDA_CHECK_LAUNCH();
            }
            reduce_kernel<Elem><<<blocks_for(T * H), kThreads, 0, stream>>>(
                static_cast<const Elem*>(product), S > 0 ? static_cast<const Elem*>(shared_out) : nullptr, T, E * C,
                H, static_cast<Elem*>(out));
            SWITCHYARD_CUDA_CHECK_LAUNCH();
        });
        SWITCHYARD_CUDA_CHECK(
            cudaMemcpyAsync(y.data, out, static_cast<size_t>(T * H) * a, cudaMemcpyDeviceToDevice, stream));
    }
    res.ran = true;
    res.reason.clear();
    return res;  // the arenas are released stream-ordered after the work above
}

}  // namespace switchyard
