// src/cuda/routing/router.cu: the router on the GPU: gate GEMM (cuBLAS) + one fused scoring / top-k / statistics
// kernel.
//
// Inputs:  x [T, H] and gate [E, H] of one dtype (fp32 / bf16 / fp16), row-major; bias [E] fp32 (optional).
// Outputs: logits [T, E] fp32; topk_ids [T, k] int32; topk_weights [T, k] fp32 (slot j = j-th choice);
//          optionally per-block partial sums of the router probabilities [blocks, E] fp64 and of
//          logsumexp(logits[t])^2 [blocks] fp64, reduced in a fixed order by reduce_router_stats.
// Rules (switchyard/routing.h, reference src/ref/router.cpp): scores and weights are computed in fp64 from the
// fp32 logits, so selection agrees with the reference on the same logits; ties go to the lower expert index; a
// NaN ranks below every number; an expert is never selected twice; group-limited routing keeps the topk_groups
// groups with the largest sum of their two best biased scores (ties: lower group index).
// Layout inside the kernel: one warp per token; lane l holds experts e = l + 32*i, i < kPerLane, in registers;
// after round r of the k warp-argmax rounds lane r holds slot r. Grouped routing stages the biased scores of the
// warp's token in shared memory ([E] fp64 per warp) so that one lane per group can find the group's best two.
// Determinism: no float atomics; each warp owns a fixed set of tokens (grid-stride with a grid that depends on T
// and on whether statistics are wanted, nothing else) and the block sums its warps' statistics in warp order.
// E <= 32 without group limit: route_seg_kernel, one token per segment of kW = pow2 >= max(E, 4) lanes, 32 / kW
// tokens per warp at once, log2(kW) shuffle rounds per reduction instead of 5. Exactness: the scoring is the same
// fp64 code on the same fp32 logits as route_topk_kernel<1>; lanes >= E contributed exact zeros (sums) or -inf
// (max) there, so the narrower butterflies give bitwise the same lmax / esum / weights; selection uses the same
// total order (class, value, index). Only the statistics partials are summed in another (still fixed) order.
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/cublas_util.h"
#include "cuda/dispatch.cuh"
#include "cuda/moe_stages.h"
#include "cuda/routing/route_token.cuh"
#include "cuda/routing/scoring.cuh"

namespace switchyard {
namespace cuda {
namespace {

constexpr int kRouterWarps = 4;        // warps (tokens in flight) per block
constexpr int kRouterMaxBlocks = 264;  // 2 blocks per H100 SM; bounds the statistics partials
constexpr int64_t kRouterMaxGridNoStats = 1 << 16;  // grid-stride beyond 2^18 tokens

// kPerLane: experts per lane (E <= 32 * kPerLane). kGrouped: group-limited routing (uses dynamic shared memory).
template <int kPerLane, bool kGrouped>
__global__ void __launch_bounds__(kRouterWarps * 32) route_topk_kernel(RouterParams p) {
    extern __shared__ double smem[];  // grouped: [warps][E] sel, [warps][G] group score, [warps][G] keep flag
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int E = p.num_experts;
    const bool stats = p.prob_partials != nullptr;

    double prob_acc[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) prob_acc[i] = 0.0;
    double z_acc = 0.0;

    for (int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterWarps + warp; t < p.num_tokens;
         t += static_cast<int64_t>(gridDim.x) * kRouterWarps) {
        route_token_warp<kPerLane, kGrouped>(p, static_cast<int>(t), smem, warp, kRouterWarps, stats, prob_acc,
                                             z_acc);
    }

    if (stats) {
        // Block partials in warp order: deterministic.
        __shared__ double red[kRouterWarps][kPerLane * 32];
        __shared__ double zred[kRouterWarps];
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) red[warp][lane + 32 * i] = prob_acc[i];
        if (lane == 0) zred[warp] = z_acc;
        __syncthreads();
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            double s = 0.0;
            for (int w2 = 0; w2 < kRouterWarps; ++w2) s += red[w2][e];
            p.prob_partials[static_cast<int64_t>(blockIdx.x) * E + e] = s;
        }
        if (threadIdx.x == 0) {
            double s = 0.0;
            for (int w2 = 0; w2 < kRouterWarps; ++w2) s += zred[w2];
            p.z_partials[blockIdx.x] = s;
        }
    }
}


// ---- segmented routing for E <= 32 (no group limit): one token per segment of kW lanes ----------------------
// kW = a power of two >= E; lane sub = expert sub; 32 / kW tokens per warp at once. The arithmetic is that of
// route_topk_kernel with kPerLane = 1 (same operations, same order: lanes >= E held zeros / -inf there, so a
// butterfly over kW lanes gives the same bits as one over 32), with kW / 2..1 shuffle rounds instead of 16..1.
// Routes token t (tok_ok: t < T) held by this lane's segment; lg = logit of expert `sub` (ignored if sub >= E).
// Called by every lane of the warp (shuffles use the full mask); writes ids / weights of valid tokens only.
template <int kW>
__device__ __forceinline__ void route_token_seg(const RouterParams& p, int t, bool tok_ok, int sub, float lg,
                                                double& prob_acc, double& z_acc) {
    const int lane = threadIdx.x & 31;
    const unsigned seg_mask = kW == 32 ? kFullMask : (((1u << kW) - 1u) << (lane & ~(kW - 1)));
    const int E = p.num_experts;
    const bool valid = tok_ok && sub < E;
    const double logit = valid ? static_cast<double>(lg) : 0.0;
    const bool is_nan = valid && isnan(logit);
    double lmax = (valid && !is_nan) ? logit : -INFINITY;
    lmax = lanes_max<kW>(lmax);
    const double ex = (valid && !is_nan) ? exp_shifted(logit, lmax) : 0.0;
    const double esum = lanes_sum<kW>(ex);
    const double score = score_of(p.score_function, logit, is_nan, ex, esum);
    if (p.prob_partials != nullptr) {
        const bool sig = p.score_function == static_cast<int>(ScoreFunction::kSigmoid);
        const bool any_nan = (__ballot_sync(kFullMask, is_nan) & seg_mask) != 0u;
        double ssum = sig && valid ? score : 0.0;
        if (sig) ssum = lanes_sum<kW>(ssum);
        if (valid) prob_acc += sig ? score / ssum : softmax_prob(is_nan, logit, ex, esum);
        if (tok_ok && sub == 0) {
            const double lse = logsumexp_fwd(lmax, esum, any_nan);
            z_acc += lse * lse;
        }
    }
    Cand c[1] = {make_cand(sub, valid, score, p.bias)};
    int my_id;
    double my_score;
    select_topk<kW>(c, p.top_k, sub, my_id, my_score);
    const bool active = sub < p.top_k;
    const double w = slot_weight<kW>(my_score, active, p.top_k, p.score_function == kTopkSoftmaxFn,
                                     p.renormalize != 0, p.routed_scale);
    if (tok_ok && active) {
        p.topk_ids[static_cast<int64_t>(t) * p.top_k + sub] = my_id;
        p.topk_weights[static_cast<int64_t>(t) * p.top_k + sub] = static_cast<float>(w);
    }
}

template <int kW>
__global__ void __launch_bounds__(kRouterWarps * 32) route_seg_kernel(RouterParams p) {
    constexpr int kS = 32 / kW;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int sub = lane & (kW - 1);
    const int q = lane / kW;
    const int E = p.num_experts;
    double prob_acc = 0.0, z_acc = 0.0;
    for (int64_t tg = static_cast<int64_t>(blockIdx.x) * kRouterWarps + warp; tg * kS < p.num_tokens;
         tg += static_cast<int64_t>(gridDim.x) * kRouterWarps) {
        const int64_t t = tg * kS + q;
        const bool tok_ok = t < p.num_tokens;
        float lg = 0.0f;
        if (tok_ok && sub < E) lg = p.logits[t * E + sub];
        route_token_seg<kW>(p, static_cast<int>(tok_ok ? t : 0), tok_ok, sub, lg, prob_acc, z_acc);
    }
    if (p.prob_partials != nullptr) {
        // Block partials in a fixed order (warp, then segment): deterministic.
        __shared__ double red[kRouterWarps][32];
        __shared__ double zred[kRouterWarps][32];
        red[warp][lane] = prob_acc;
        zred[warp][lane] = z_acc;
        __syncthreads();
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            double s = 0.0;
            for (int w2 = 0; w2 < kRouterWarps; ++w2)
                for (int q2 = 0; q2 < kS; ++q2) s += red[w2][q2 * kW + e];
            p.prob_partials[static_cast<int64_t>(blockIdx.x) * E + e] = s;
        }
        if (threadIdx.x == 0) {
            double s = 0.0;
            for (int w2 = 0; w2 < kRouterWarps; ++w2)
                for (int q2 = 0; q2 < kS; ++q2) s += zred[w2][q2 * kW];
            p.z_partials[blockIdx.x] = s;
        }
    }
}

int seg_width(int64_t num_experts) {  // power of two >= E, at least 4
    int w = 4;
    while (w < num_experts) w <<= 1;
    return w;
}

void launch_seg(const RouterParams& params, int blocks, cudaStream_t stream) {
    switch (seg_width(params.num_experts)) {
        case 4: route_seg_kernel<4><<<blocks, kRouterWarps * 32, 0, stream>>>(params); break;
        case 8: route_seg_kernel<8><<<blocks, kRouterWarps * 32, 0, stream>>>(params); break;
        case 16: route_seg_kernel<16><<<blocks, kRouterWarps * 32, 0, stream>>>(params); break;
        default: route_seg_kernel<32><<<blocks, kRouterWarps * 32, 0, stream>>>(params); break;
    }
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

__global__ void reduce_router_stats_kernel(const double* prob_partials, const double* z_partials, int blocks,
                                           int num_experts, double* prob_sum, double* z_sum) {
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
        double s = 0.0;
        for (int b = 0; b < blocks; ++b) s += prob_partials[static_cast<int64_t>(b) * num_experts + e];
        prob_sum[e] = s;
    }
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int b = 0; b < blocks; ++b) s += z_partials[b];
        *z_sum = s;
    }
}

template <int kPerLane>
void launch_route(const RouterParams& params, bool grouped, int blocks, cudaStream_t stream) {
    if (grouped) {
        const size_t smem = static_cast<size_t>(kRouterWarps) *
                            (static_cast<size_t>(params.num_experts + params.num_groups) * sizeof(double) +
                             static_cast<size_t>(params.num_groups) * sizeof(int));
        route_topk_kernel<kPerLane, true><<<blocks, kRouterWarps * 32, smem, stream>>>(params);
    } else {
        route_topk_kernel<kPerLane, false><<<blocks, kRouterWarps * 32, 0, stream>>>(params);
    }
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

}  // namespace

void router_gemm(DType dtype, const void* x, const void* gate, int64_t num_tokens, int64_t hidden,
                 int64_t num_experts, float* logits, void* cublas_workspace, cudaStream_t stream) {
    if (num_tokens == 0) return;
    SWITCHYARD_CHECK(num_tokens <= INT32_MAX && hidden <= INT32_MAX, "router GEMM: num_tokens=", num_tokens,
                     " hidden_size=", hidden, " exceed int32");
    const CublasLease cublas(stream);  // this device's handle, locked, on `stream`
    SWITCHYARD_CUBLAS_CHECK(cublasSetWorkspace(cublas.handle(), cublas_workspace, kCublasWorkspaceBytes));
    // Column-major view: logits^T [E, T] (ld E) = gate^T^T ... i.e. C(E x T) = op(A)(E x H) * B(H x T) where
    // A = gate stored [E, H] row-major (= col-major H x E, transposed), B = x stored [T, H] (= col-major H x T).
    const float alpha = 1.0f, beta = 0.0f;
    const cudaDataType_t t = cuda_data_type(dtype, "router gate GEMM");
    SWITCHYARD_CUBLAS_CHECK(cublasGemmEx(cublas.handle(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(num_experts),
                                         static_cast<int>(num_tokens), static_cast<int>(hidden), &alpha, gate, t,
                                         static_cast<int>(hidden), x, t, static_cast<int>(hidden), &beta, logits,
                                         CUDA_R_32F, static_cast<int>(num_experts), CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT));
}

int router_stat_blocks(int64_t num_tokens) {
    const int64_t b = ceil_div<int64_t>(num_tokens, kRouterWarps);
    return static_cast<int>(b < kRouterMaxBlocks ? b : kRouterMaxBlocks);
}


void route_topk(const MoEConfig& cfg, const float* logits, const float* bias, int64_t num_tokens,
                int32_t* topk_ids, float* topk_weights, double* prob_partials, double* z_partials,
                cudaStream_t stream) {
    const RouterParams params =
        make_router_params(cfg, logits, bias, num_tokens, topk_ids, topk_weights, prob_partials, z_partials);
    if (num_tokens == 0) return;
    const bool grouped = params.num_groups > 1;
    const int64_t E = cfg.num_experts;
    // With statistics the grid is capped (it sizes the partials, and their fixed summation order depends on it); a
    // token's ids and weights do not depend on which warp routes it, so without statistics every warp gets one
    // token (route_topk_kernel) or one segment group of 32 / seg_width(E) tokens (route_seg_kernel), up to
    // kRouterMaxGridNoStats blocks: the per-token chain (fp64 scoring, k warp-argmax rounds) is latency-bound, and
    // the capped grid left 8 warps per SM with several tokens each.
    const int64_t tokens_per_warp = E <= 32 && !grouped ? 32 / seg_width(E) : 1;
    const int64_t one_round = ceil_div<int64_t>(num_tokens, kRouterWarps * tokens_per_warp);
    const int blocks = prob_partials != nullptr
                           ? router_stat_blocks(num_tokens)
                           : static_cast<int>(one_round < kRouterMaxGridNoStats ? one_round : kRouterMaxGridNoStats);
    if (E <= 32 && !grouped) {
        launch_seg(params, blocks, stream);
    } else if (E <= 32) {
        launch_route<1>(params, grouped, blocks, stream);
    } else if (E <= 64) {
        launch_route<2>(params, grouped, blocks, stream);
    } else if (E <= 128) {
        launch_route<4>(params, grouped, blocks, stream);
    } else if (E <= 256) {
        launch_route<8>(params, grouped, blocks, stream);
    } else {
        launch_route<16>(params, grouped, blocks, stream);
    }
}

void reduce_router_stats(const double* prob_partials, const double* z_partials, int blocks, int64_t num_experts,
                         double* prob_sum, double* z_sum, cudaStream_t stream) {
    reduce_router_stats_kernel<<<1, 256, 0, stream>>>(prob_partials, z_partials, blocks,
                                                      static_cast<int>(num_experts), prob_sum, z_sum);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
