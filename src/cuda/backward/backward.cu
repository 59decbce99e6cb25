// src/cuda/backward/backward.cu: backward kernels of the router weights, gather, activation and combine (src/cuda/backward/backward.h).
//
// route_backward   one warp per token, fp32 (ref::route_backward's formulas and NaN rule; the scores come from
//                  src/cuda/routing/scoring.cuh): lanes hold experts lane + 32 i; the softmax normaliser over E is
//                  the lanes' partial sums (each in index order) added by a fixed butterfly, the k slots' values
//                  are computed by every lane alike in slot order. Deterministic; its bits differ from a sum over E
//                  in index order in the normaliser's last place.
// router_losses_backward
//                  1. one block: per-expert top-k counts (shared-memory integer atomics: order-free, exact), then
//                     gp[e] = d_aux * E * (count_e / (T k)) / T (double), d aux / d prob[t, e] for every t.
//                  2. one warp per token, in double: max, softmax denominator (and sigmoid sum) and the dot products
//                     as fixed lane-strided sums + a shuffle tree (deterministic); each lane writes its experts.
// gather_backward  one block per token; each thread owns columns h (16-byte vectors where the rows allow) and adds
//                  the k slots j = 0..k-1 in order.
// activation_bwd   one block per row, 16-byte vectors where the rows allow; elementwise (act_fn.cuh's derivatives:
//                  silu' = s (1 + v (1 - s)), gelu_tanh' as in ref, relu' = [v > 0]), optionally with the recomputed
//                  activation h written over dh in the same pass (grouped_gemm_dgrad_activation: g and dh read once).
// combine_backward one block per token: d_out rows written by the single (t, j) that owns them (16-byte vectors where
//                  the rows allow); d_weights[t, j] is a block reduction of per-thread partial sums (thread i sums its
//                  columns in order), then a fixed xor tree per warp and the warps' sums in order: bitwise
//                  reproducible, no atomics.
#include "cuda/backward/backward.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/dispatch.cuh"
#include "cuda/experts/act_fn.cuh"
#include "cuda/routing/scoring.cuh"

namespace switchyard {
namespace cuda {
namespace {

constexpr int kBwdThreads = 128;
constexpr int kMaxTopK = 32;

struct RouteBwdParams {
    const float* logits;
    const int32_t* ids;
    const float* d_weights;
    float* d_logits;
    int64_t num_tokens;
    int num_experts;
    int top_k;
    int score_function;  // ScoreFunction
    bool renormalize;
    float routed_scale;
};

// One warp per token: lanes hold experts e = lane + 32 i, so the logits and d_logits rows move as whole lines. The k
// chosen slots' values are computed by every lane alike (k <= 32); the softmax normaliser over E is a lane-partial
// sum reduced by butterfly (a fixed order: the same bits every run).
__global__ void route_backward_kernel(RouteBwdParams p) {
    const int lane = threadIdx.x & 31;
    const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (t >= p.num_tokens) return;  // uniform across the warp
    const int num_experts = p.num_experts, k = p.top_k;
    const float* l = p.logits + t * num_experts;
    const int32_t* ids = p.ids + t * k;
    const float* g = p.d_weights + t * k;
    float* dl = p.d_logits + t * num_experts;
    float u[kMaxTopK], gu[kMaxTopK], lid[kMaxTopK];
    int32_t id[kMaxTopK];
    for (int j = 0; j < k; ++j) {
        id[j] = ids[j];
        lid[j] = l[id[j]];
    }
    // Softmax over all E (softmax) or over the k chosen (top-k-softmax), fp32, under ref::route_backward's NaN rule
    // (scoring.cuh: the max skips NaN, the normaliser does not, so a NaN logit makes the token's gradient NaN).
    const bool softmax = p.score_function == static_cast<int>(ScoreFunction::kSoftmax);
    const bool sig = p.score_function == static_cast<int>(ScoreFunction::kSigmoid);
    float m = -INFINITY, denom = 0.0f;
    if (softmax) {
        for (int e = lane; e < num_experts; e += 32) m = max_of(m, l[e]);
        m = lanes_max<32>(m);
        for (int e = lane; e < num_experts; e += 32) denom += exp_shifted(l[e], m);
        denom = lanes_sum<32>(denom);
        for (int j = 0; j < k; ++j) u[j] = exp_shifted(lid[j], m) / denom;
    } else if (sig) {
        for (int j = 0; j < k; ++j) u[j] = sigmoid(lid[j]);
    } else {
        softmax_norm_nan_poisons(k, [&](int j) { return lid[j]; }, m, denom);
        for (int j = 0; j < k; ++j) u[j] = exp_shifted(lid[j], m) / denom;
    }
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += u[j];
    if (p.renormalize && sum != 0.0f) {
        float dot = 0.0f;
        for (int j = 0; j < k; ++j) dot += g[j] * u[j];
        for (int j = 0; j < k; ++j) gu[j] = p.routed_scale * (g[j] / sum - dot / (sum * sum));
    } else {
        for (int j = 0; j < k; ++j) gu[j] = p.routed_scale * g[j];
    }
    float dot = 0.0f;
    if (!sig) {
        for (int j = 0; j < k; ++j) dot += gu[j] * u[j];
    }
    // softmax: -p_e * dot for every expert, plus gu_j u_j on the chosen ones (in slot order); sigmoid and
    // top-k-softmax: only the chosen experts (a repeated id: its last slot, as the slots are written in order).
    for (int e = lane; e < num_experts; e += 32) {
        float v = softmax ? -(exp_shifted(l[e], m) / denom) * dot : 0.0f;
        for (int j = 0; j < k; ++j) {
            if (id[j] != e) continue;
            if (softmax) v += gu[j] * u[j];
            else v = sig ? gu[j] * u[j] * (1.0f - u[j]) : u[j] * (gu[j] - dot);
        }
        dl[e] = v;
    }
}

constexpr int kMaxLossBwdExperts = 1024;
constexpr int kLossWarpsPerBlock = 4;

__global__ void loss_coeff_kernel(const int32_t* __restrict__ ids, int64_t n_ids, int num_experts, int64_t num_tokens,
                                  const float* __restrict__ d_losses, double* __restrict__ gp) {
    __shared__ int counts[kMaxLossBwdExperts];
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n_ids; i += blockDim.x) {
        const int32_t e = ids[i];
        if (e >= 0 && e < num_experts) atomicAdd(&counts[e], 1);
    }
    __syncthreads();
    const double d_aux = d_losses[0], t = static_cast<double>(num_tokens);
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x)
        gp[e] = d_aux * num_experts * (counts[e] / static_cast<double>(n_ids)) / t;
}

// Double arithmetic: the aux term p_e (gp_e - sum_i gp_i p_i) cancels almost completely when the loads are even
// (every gp_e close to the same value), which in fp32 would leave a relative error of ~1e-7 of gp, far above fp32
// rounding of the small result. The exp/log count is T*E, small next to the layer.
__global__ void __launch_bounds__(32 * kLossWarpsPerBlock)
    router_losses_backward_kernel(const float* __restrict__ logits, const double* __restrict__ gp,
                                  const float* __restrict__ d_losses, int64_t num_tokens, int num_experts, int use_sigmoid,
                                  float* __restrict__ d_logits) {
    const int lane = threadIdx.x & 31;
    const int64_t t = static_cast<int64_t>(blockIdx.x) * kLossWarpsPerBlock + (threadIdx.x >> 5);
    if (t >= num_tokens) return;  // whole warps leave together
    const double d_aux = d_losses[0], d_z = d_losses[1];
    const float* l = logits + t * num_experts;
    float* dl = d_logits + t * num_experts;
    float mf = -INFINITY;
    for (int e = lane; e < num_experts; e += 32) mf = fmaxf(mf, l[e]);
    mf = lanes_max<32>(mf);
    const double m = mf;
    // Backward NaN rule (scoring.cuh): NaN reaches the sums. exp_shifted's v == m is l[e] == mf (exact widening).
    auto ex = [&](int e) { return exp_shifted(static_cast<double>(l[e]), m); };
    auto sg = [&](int e) { return sigmoid(static_cast<double>(l[e])); };
    double denom = 0.0, ssum = 0.0;
    for (int e = lane; e < num_experts; e += 32) {
        denom += ex(e);
        if (use_sigmoid) ssum += sg(e);
    }
    denom = lanes_sum<32>(denom);
    ssum = lanes_sum<32>(ssum);
    const double zc = d_z * 2.0 * (m + log(denom)) / static_cast<double>(num_tokens);
    double dot = 0.0;  // sum_e gp_e * prob_e
    if (d_aux != 0.0) {
        for (int e = lane; e < num_experts; e += 32) dot += gp[e] * (use_sigmoid ? sg(e) / ssum : ex(e) / denom);
        dot = lanes_sum<32>(dot);
    }
    for (int e = lane; e < num_experts; e += 32) {
        const double p = ex(e) / denom;
        double g = 0.0;
        if (d_aux != 0.0) {
            if (use_sigmoid) {
                const double s = sg(e);
                g = (gp[e] - dot) / ssum * s * (1.0 - s);
            } else {
                g = p * (gp[e] - dot);
            }
        }
        if (d_z != 0.0) g += zc * p;
        dl[e] = static_cast<float>(g);
    }
}

// kVec: 16-byte vectors of d_xp's rows and dx (hidden % kVecElems<T> == 0, 16-byte aligned bases); each element's
// sum is the same fp32 chain either way (0, then the k slots in order), so the bits do not depend on it.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kBwdThreads)
    gather_backward_kernel(const T* __restrict__ d_xp, const int32_t* __restrict__ slot_row, int top_k,
                           int64_t num_rows, int64_t hidden, T* __restrict__ dx) {
    __shared__ int32_t rows_s[kMaxTopK];
    const int64_t t = blockIdx.x;
    if (threadIdx.x < top_k) rows_s[threadIdx.x] = slot_in_range(slot_row[t * top_k + threadIdx.x], num_rows);
    __syncthreads();
    if constexpr (kVec) {
        constexpr int kN = kVecElems<T>;
        for (int64_t i = threadIdx.x; i < hidden / kN; i += kBwdThreads) {
            float acc[kN];
#pragma unroll
            for (int q = 0; q < kN; ++q) acc[q] = 0.0f;
            add_slot_rows<T>(acc, d_xp, rows_s, nullptr, top_k, hidden, i);
            Vec16<T> o;
#pragma unroll
            for (int q = 0; q < kN; ++q) o.v[q] = from_f32<T>(acc[q]);
            reinterpret_cast<Vec16<T>*>(dx + t * hidden)[i] = o;
        }
    } else {
        for (int64_t h = threadIdx.x; h < hidden; h += kBwdThreads) {
            float acc = 0.0f;
            for (int j = 0; j < top_k; ++j) {
                const int32_t r = rows_s[j];
                if (r >= 0) acc += to_f32(d_xp[static_cast<int64_t>(r) * hidden + h]);
            }
            dx[t * hidden + h] = from_f32<T>(acc);
        }
    }
}

// kVec: 16-byte vectors of g, dh, dg (and h) (F % kVecElems<T> == 0, 16-byte aligned bases; a vector never straddles
// a block of 8 of the interleaved layout). h (may alias dh: each element is read, then written, by one thread): the
// recomputed activation of the row, the activation kernel's arithmetic (act_fn.cuh, kFastAct), so that its bits are
// activation_rows'; null: not written. num_rows (device counter, may be null): rows r >= *num_rows get dg = 0 and
// no h (the caller's h rows there are already 0).
template <typename T, Activation kAct, bool kVec>
__global__ void __launch_bounds__(kBwdThreads)
    activation_backward_kernel(const T* __restrict__ g, const T* dh, int64_t ffn, T* __restrict__ dg, T* h,
                               const int32_t* __restrict__ num_rows, bool interleaved) {
    constexpr bool kGated = kAct == Activation::kSwiGLU || kAct == Activation::kGeGLU;
    const int64_t row = blockIdx.x, width = kGated ? 2 * ffn : ffn;
    const T* gr = g + row * width;
    const T* d = dh + row * ffn;
    T* o = dg + row * width;
    T* hr = h != nullptr ? h + row * ffn : nullptr;
    if (num_rows != nullptr && row >= *num_rows) {
        for (int64_t c = threadIdx.x; c < width; c += kBwdThreads) o[c] = T{};
        return;
    }
    // One element: dg of its gate and up (or of v) and the recomputed h.
    auto element = [&](float dv, float a, float u, T& d_gate, T& d_up, T& hv) {
        if constexpr (kGated) {
            float dgate, dup;
            gated_activation_grad<kAct>(dv, a, u, dgate, dup);
            d_gate = from_f32<T>(dgate);
            d_up = from_f32<T>(dup);
            hv = from_f32<T>(act_fn<kAct, kFastAct<T>>(a) * u);
        } else {
            d_up = from_f32<T>(activation_grad<kAct>(dv, u));
            hv = from_f32<T>(act_fn<kAct, kFastAct<T>>(u));
        }
    };
    if constexpr (kVec) {
        constexpr int kN = kVecElems<T>;
        for (int64_t i = threadIdx.x; i < ffn / kN; i += kBwdThreads) {
            const int64_t f = i * kN;
            const int64_t uc = kGated ? up_column(f, ffn, interleaved) : f;
            const Vec16<T> dv = *reinterpret_cast<const Vec16<T>*>(d + f);
            const Vec16<T> uv = *reinterpret_cast<const Vec16<T>*>(gr + uc);
            Vec16<T> av = uv;
            if constexpr (kGated) av = *reinterpret_cast<const Vec16<T>*>(gr + gate_column(f, interleaved));
            Vec16<T> dgate, dup, hv;
#pragma unroll
            for (int q = 0; q < kN; ++q) {
                element(to_f32(dv.v[q]), to_f32(av.v[q]), to_f32(uv.v[q]), dgate.v[q], dup.v[q], hv.v[q]);
            }
            if constexpr (kGated) *reinterpret_cast<Vec16<T>*>(o + gate_column(f, interleaved)) = dgate;
            *reinterpret_cast<Vec16<T>*>(o + uc) = dup;
            if (hr != nullptr) *reinterpret_cast<Vec16<T>*>(hr + f) = hv;
        }
    } else {
        for (int64_t f = threadIdx.x; f < ffn; f += kBwdThreads) {
            const int64_t uc = kGated ? up_column(f, ffn, interleaved) : f;
            const float dv = to_f32(d[f]);
            const float u = to_f32(gr[uc]);
            const float a = kGated ? to_f32(gr[gate_column(f, interleaved)]) : u;
            T dgate{}, dup, hv;
            element(dv, a, u, dgate, dup, hv);
            if constexpr (kGated) o[gate_column(f, interleaved)] = dgate;
            o[uc] = dup;
            if (hr != nullptr) hr[f] = hv;
        }
    }
}

// kVec: 16-byte vectors of dy, expert_out and d_out (hidden % kVecElems<T> == 0, 16-byte aligned bases).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kBwdThreads)
    combine_backward_kernel(const T* __restrict__ dy, const T* __restrict__ expert_out,
                            const int32_t* __restrict__ slot_row, const float* __restrict__ weights, int top_k,
                            int64_t num_rows, int64_t hidden, T* __restrict__ d_out, float* __restrict__ d_weights) {
    constexpr int kWarps = kBwdThreads / 32;
    __shared__ float red[kWarps];
    const int64_t t = blockIdx.x;
    const T* g = dy + t * hidden;
    for (int j = 0; j < top_k; ++j) {
        const int32_t r = slot_in_range(slot_row[t * top_k + j], num_rows);  // uniform across the block
        if (r < 0) {
            if (threadIdx.x == 0) d_weights[t * top_k + j] = 0.0f;
            continue;
        }
        const float w = weights[t * top_k + j];
        const T* o = expert_out + static_cast<int64_t>(r) * hidden;
        T* d = d_out + static_cast<int64_t>(r) * hidden;
        float part = 0.0f;
        if constexpr (kVec) {
            // kUnroll vectors of dy and of the row loaded before any is used (more bytes in flight per thread); the
            // products still enter `part` in increasing column order.
            constexpr int kN = kVecElems<T>, kUnroll = 4;
            const int64_t nvec = hidden / kN;
            for (int64_t base = threadIdx.x; base < nvec; base += kBwdThreads * kUnroll) {
                Vec16<T> gv[kUnroll], ov[kUnroll];
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int64_t i = base + u * kBwdThreads;
                    if (i < nvec) {
                        gv[u] = reinterpret_cast<const Vec16<T>*>(g)[i];
                        ov[u] = reinterpret_cast<const Vec16<T>*>(o)[i];
                    }
                }
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int64_t i = base + u * kBwdThreads;
                    if (i >= nvec) break;
                    Vec16<T> dv;
#pragma unroll
                    for (int q = 0; q < kN; ++q) {
                        const float gq = to_f32(gv[u].v[q]);
                        part = fmaf(gq, to_f32(ov[u].v[q]), part);
                        dv.v[q] = from_f32<T>(w * gq);
                    }
                    reinterpret_cast<Vec16<T>*>(d)[i] = dv;
                }
            }
        } else {
            for (int64_t h = threadIdx.x; h < hidden; h += kBwdThreads) {
                const float gv = to_f32(g[h]);
                part = fmaf(gv, to_f32(o[h]), part);
                d[h] = from_f32<T>(w * gv);
            }
        }
        part = lanes_sum<32>(part);  // fixed xor tree, then the warps' sums in order: the same bits every run
        if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = part;
        __syncthreads();
        if (threadIdx.x == 0) {
            float sum = red[0];
            for (int i = 1; i < kWarps; ++i) sum += red[i];
            d_weights[t * top_k + j] = sum;
        }
        __syncthreads();
    }
}

void check_top_k(int64_t top_k, const char* what) {
    SWITCHYARD_CHECK(top_k >= 1 && top_k <= kMaxTopK, what, ": top_k=", top_k, " must be in [1, ", kMaxTopK, "]");
}

}  // namespace

void route_backward(const MoEConfig& cfg, const float* logits, const int32_t* topk_ids, const float* d_weights,
                    int64_t num_tokens, float* d_logits, cudaStream_t stream) {
    if (num_tokens == 0) return;
    check_top_k(cfg.top_k, "route_backward");
    RouteBwdParams p{logits, topk_ids, d_weights, d_logits, num_tokens, static_cast<int>(cfg.num_experts),
                     static_cast<int>(cfg.top_k), static_cast<int>(cfg.score_function), cfg.renormalize,
                     static_cast<float>(cfg.routed_scale)};
    constexpr int kWarps = kBwdThreads / 32;  // tokens per block
    route_backward_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(num_tokens, kWarps)), kBwdThreads, 0, stream>>>(
        p);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

size_t router_losses_backward_workspace_size(int64_t num_experts) {
    return static_cast<size_t>(std::max<int64_t>(num_experts, 0)) * sizeof(double);
}

void router_losses_backward(const MoEConfig& cfg, const float* logits, const int32_t* topk_ids, int64_t num_tokens,
                            const float* d_losses, float* d_logits, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
    const int64_t E = cfg.num_experts;
    SWITCHYARD_CHECK(E >= 1 && E <= kMaxLossBwdExperts, "router_losses_backward: num_experts=", E, " must be in [1, ",
                     kMaxLossBwdExperts, "]");
    SWITCHYARD_CHECK(workspace_bytes >= router_losses_backward_workspace_size(E),
                     "router_losses_backward: workspace of ", workspace_bytes, " bytes, need ",
                     router_losses_backward_workspace_size(E));
    if (num_tokens == 0) return;
    SWITCHYARD_CHECK(num_tokens <= INT32_MAX, "router_losses_backward: num_tokens=", num_tokens);
    auto* gp = static_cast<double*>(workspace);
    loss_coeff_kernel<<<1, 1024, 0, stream>>>(topk_ids, num_tokens * cfg.top_k, static_cast<int>(E), num_tokens,
                                              d_losses, gp);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
    const int sig = cfg.score_function == ScoreFunction::kSigmoid ? 1 : 0;
    router_losses_backward_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(num_tokens, kLossWarpsPerBlock)),
                                    32 * kLossWarpsPerBlock, 0, stream>>>(logits, gp, d_losses, num_tokens,
                                                                          static_cast<int>(E), sig, d_logits);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

void gather_backward_rows(DType dtype, const void* d_xp, const int32_t* slot_row, int64_t num_tokens, int64_t top_k,
                          int64_t num_rows, int64_t hidden, void* dx, cudaStream_t stream) {
    if (num_tokens == 0 || hidden == 0) return;
    check_top_k(top_k, "gather_backward");
    SWITCHYARD_CHECK(num_tokens <= INT32_MAX, "gather_backward: num_tokens=", num_tokens, " exceed the grid");
    dispatch_float_dtype(dtype, "gather_backward", [&](auto tag) {
        using T = typename decltype(tag)::type;
        const bool vec = hidden % kVecElems<T> == 0 && reinterpret_cast<uintptr_t>(d_xp) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(dx) % 16 == 0;
        const auto kernel = vec ? gather_backward_kernel<T, true> : gather_backward_kernel<T, false>;
        kernel<<<static_cast<unsigned>(num_tokens), kBwdThreads, 0, stream>>>(
            static_cast<const T*>(d_xp), slot_row, static_cast<int>(top_k), num_rows, hidden, static_cast<T*>(dx));
        SWITCHYARD_CUDA_CHECK_LAUNCH();
    });
}

void activation_backward_rows(Activation act, DType dtype, const void* g, const void* dh, int64_t max_rows,
                              int64_t ffn, void* dg, cudaStream_t stream, bool interleaved, void* h,
                              const int32_t* num_rows) {
    if (max_rows == 0 || ffn == 0) return;
    SWITCHYARD_CHECK(max_rows <= INT32_MAX, "activation_backward: rows=", max_rows, " exceed the grid");
    dispatch_float_dtype(dtype, "activation_backward", [&](auto tag) {
        using T = typename decltype(tag)::type;
        const auto* gp = static_cast<const T*>(g);
        const auto* dp = static_cast<const T*>(dh);
        auto* op = static_cast<T*>(dg);
        auto* hp = static_cast<T*>(h);
        const bool vec = ffn % kVecElems<T> == 0 && reinterpret_cast<uintptr_t>(g) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(dh) % 16 == 0 && reinterpret_cast<uintptr_t>(dg) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(h) % 16 == 0;
        const dim3 grid(static_cast<unsigned>(max_rows));
        auto launch = [&](auto act_tag) {
            constexpr Activation kAct = decltype(act_tag)::value;
            const auto kernel =
                vec ? activation_backward_kernel<T, kAct, true> : activation_backward_kernel<T, kAct, false>;
            kernel<<<grid, kBwdThreads, 0, stream>>>(gp, dp, ffn, op, hp, num_rows, interleaved);
        };
        switch (act) {
            case Activation::kSwiGLU: launch(std::integral_constant<Activation, Activation::kSwiGLU>{}); break;
            case Activation::kGeGLU: launch(std::integral_constant<Activation, Activation::kGeGLU>{}); break;
            case Activation::kGELU: launch(std::integral_constant<Activation, Activation::kGELU>{}); break;
            case Activation::kReLU: launch(std::integral_constant<Activation, Activation::kReLU>{}); break;
            default: SWITCHYARD_FAIL("activation_backward: activation=", static_cast<int>(act), " is not supported");
        }
        SWITCHYARD_CUDA_CHECK_LAUNCH();
    });
}

void combine_backward_rows(DType dtype, const void* dy, const void* expert_out, const int32_t* slot_row,
                           const float* weights, int64_t num_tokens, int64_t top_k, int64_t num_rows, int64_t hidden,
                           void* d_out, float* d_weights, cudaStream_t stream) {
    if (num_tokens == 0) return;
    check_top_k(top_k, "combine_backward");
    SWITCHYARD_CHECK(num_tokens <= INT32_MAX, "combine_backward: num_tokens=", num_tokens, " exceed the grid");
    dispatch_float_dtype(dtype, "combine_backward", [&](auto tag) {
        using T = typename decltype(tag)::type;
        const bool vec = hidden % kVecElems<T> == 0 && reinterpret_cast<uintptr_t>(dy) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(expert_out) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(d_out) % 16 == 0;
        const auto kernel = vec ? combine_backward_kernel<T, true> : combine_backward_kernel<T, false>;
        kernel<<<static_cast<unsigned>(num_tokens), kBwdThreads, 0, stream>>>(
            static_cast<const T*>(dy), static_cast<const T*>(expert_out), slot_row, weights, static_cast<int>(top_k),
            num_rows, hidden, static_cast<T*>(d_out), d_weights);
        SWITCHYARD_CUDA_CHECK_LAUNCH();
    });
}

}  // namespace cuda
}  // namespace switchyard
