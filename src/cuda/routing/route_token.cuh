// src/cuda/routing/route_token.cuh: one token's routing by one warp, written once for the router kernel
// (router.cu: route_topk_kernel, every T) and the fused small-batch router (decode/decode_route.cu). The rules and
// their precision are scoring.cuh's; this file only arranges them per token.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/routing/scoring.cuh"
#include "switchyard/config.h"
#include "switchyard/error.h"

namespace switchyard {
namespace cuda {

struct RouterParams {
    const float* logits;   // [T, E]
    const float* bias;     // [E] or null
    int32_t* topk_ids;     // [T, k]
    float* topk_weights;   // [T, k]
    double* prob_partials; // [gridDim.x, E] or null (no statistics)
    double* z_partials;    // [gridDim.x]
    int num_tokens;
    int num_experts;
    int top_k;
    int num_groups;
    int topk_groups;
    int group_size;
    int score_function;  // ScoreFunction
    int renormalize;
    double routed_scale;
};

constexpr int kMaxExperts = 512;  // experts a router kernel ranks (16 per lane)
constexpr int kMaxTopK = 32;

constexpr int kTopkSoftmaxFn = static_cast<int>(ScoreFunction::kTopkSoftmax);

// The unbiased score of one expert (scoring.cuh): softmax over E, sigmoid, or the logit itself (top-k-softmax).
__device__ __forceinline__ double score_of(int score_function, double logit, bool is_nan, double ex, double esum) {
    double score;
    if (score_function == static_cast<int>(ScoreFunction::kSoftmax)) {
        score = softmax_prob(is_nan, logit, ex, esum);
    } else if (score_function == static_cast<int>(ScoreFunction::kSigmoid)) {
        score = sigmoid(logit);
    } else {
        score = logit;
    }
    return score;
}

// Routes token t with the whole warp (every lane calls it): scores, selection-only bias, group-limited top-k, top-k
// and weights; writes p.topk_ids / p.topk_weights [t, :] and, when stats, adds the token's router probabilities to
// prob_acc (lane l holds experts l + 32 i) and logsumexp^2 to z_acc (lane 0). kGrouped: smem holds
// [num_warps][E] fp64 selection values, [num_warps][G] fp64 group scores, [num_warps][G] int keep flags (the
// dynamic shared memory of the calling kernel; `warp` is this warp's index among num_warps).
template <int kPerLane, bool kGrouped>
__device__ __forceinline__ void route_token_warp(const RouterParams& p, int t, double* smem, int warp, int num_warps,
                                                 bool stats, double (&prob_acc)[kPerLane], double& z_acc) {
    const int lane = threadIdx.x & 31;
    const int E = p.num_experts;
    (void)warp;
    (void)num_warps;
    const float* lrow = p.logits + static_cast<int64_t>(t) * E;
    double logit[kPerLane];
    bool valid[kPerLane], isnan_[kPerLane];
    double lmax = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        const int e = lane + 32 * i;
        valid[i] = e < E;
        logit[i] = valid[i] ? static_cast<double>(lrow[e]) : 0.0;
        isnan_[i] = valid[i] && isnan(logit[i]);
        if (valid[i] && !isnan_[i]) lmax = fmax(lmax, logit[i]);
    }
    lmax = lanes_max<32>(lmax);
    // Softmax over all E (NaN logits excluded: their probability is NaN, the others sum to 1).
    // lmax = +inf or all -inf/NaN is handled by the reference's rules: exp(-inf - -inf) = NaN etc.
    double ex[kPerLane];
    double esum = 0.0;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        // exp(l - m) is exactly 1 when l == m, so rows of -inf are uniform and +inf entries share the mass.
        ex[i] = (valid[i] && !isnan_[i]) ? exp_shifted(logit[i], lmax) : 0.0;
        esum += ex[i];
    }
    esum = lanes_sum<32>(esum);

    double score[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) score[i] = score_of(p.score_function, logit[i], isnan_[i], ex[i], esum);

    if (stats) {
        // Router probabilities for the aux loss: softmax over E (a NaN logit's probability is NaN), or
        // sigmoid normalised to sum 1 (a NaN logit makes the token's whole row NaN), as ref::router_stats.
        const bool sig = p.score_function == static_cast<int>(ScoreFunction::kSigmoid);
        double ssum = 0.0;
        bool any_nan = false;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            any_nan |= isnan_[i];
            if (sig && valid[i]) ssum += score[i];
        }
        any_nan = __any_sync(kFullMask, any_nan);
        if (sig) ssum = lanes_sum<32>(ssum);
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            if (!valid[i]) continue;
            prob_acc[i] += sig ? score[i] / ssum : softmax_prob(isnan_[i], logit[i], ex[i], esum);
        }
        if (lane == 0) {
            const double lse = logsumexp_fwd(lmax, esum, any_nan);
            z_acc += lse * lse;
        }
    }

    // Selection values and classes.
    Cand c[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) c[i] = make_cand(lane + 32 * i, valid[i], score[i], p.bias);

    if constexpr (kGrouped) {
        const int G = p.num_groups;
        double* sel_s = smem + static_cast<size_t>(warp) * E;
        double* gscore_s = smem + static_cast<size_t>(num_warps) * E + static_cast<size_t>(warp) * G;
        int* keep_s = reinterpret_cast<int*>(smem + static_cast<size_t>(num_warps) * (E + G)) + warp * G;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
            if (c[i].cls != kTaken) sel_s[c[i].idx] = c[i].v;
        __syncwarp();
        // Group score: sum of the two best selection values (NaN ranks lowest), or the best for size 1.
        for (int g = lane; g < G; g += 32) {
            gscore_s[g] = group_score(sel_s, g * p.group_size, p.group_size);
            keep_s[g] = 0;
        }
        __syncwarp();
        for (int r = 0; r < p.topk_groups; ++r) {
            Cand best{kTaken, 0x7fffffff, 0.0, 0.0};
            for (int g = lane; g < G; g += 32) {
                if (keep_s[g]) continue;
                const double v = gscore_s[g];
                Cand x{isnan(v) ? kNaN : kNumber, g, v, 0.0};
                if (better(x, best)) best = x;
            }
            best = lanes_best<32>(best);
            __syncwarp();
            if (lane == 0 && best.cls != kTaken) keep_s[best.idx] = 1;
            __syncwarp();
        }
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
            if (c[i].cls != kTaken && !keep_s[c[i].idx / p.group_size]) c[i].cls = kMasked;
        __syncwarp();  // shared memory is reused by the next token of this warp
    }

    // k rounds of warp argmax; lane r keeps slot r. Weights from the unbiased scores.
    int my_id;
    double my_score;
    select_topk<32>(c, p.top_k, lane, my_id, my_score);
    const bool active = lane < p.top_k;
    const double w = slot_weight<32>(my_score, active, p.top_k, p.score_function == kTopkSoftmaxFn,
                                     p.renormalize != 0, p.routed_scale);
    if (active) {
        p.topk_ids[static_cast<int64_t>(t) * p.top_k + lane] = my_id;
        p.topk_weights[static_cast<int64_t>(t) * p.top_k + lane] = static_cast<float>(w);
    }
}

// The kernel parameters of cfg's routing, checked (host).
inline RouterParams make_router_params(const MoEConfig& cfg, const float* logits, const float* bias, int64_t num_tokens,
                                int32_t* topk_ids, float* topk_weights, double* prob_partials,
                                double* z_partials) {
    SWITCHYARD_CHECK(cfg.num_experts >= 1 && cfg.num_experts <= kMaxExperts, "CUDA router: num_experts=",
                     cfg.num_experts, " must be in [1, ", kMaxExperts, "]");
    SWITCHYARD_CHECK(cfg.top_k >= 1 && cfg.top_k <= kMaxTopK && cfg.top_k <= cfg.num_experts, "CUDA router: top_k=",
                     cfg.top_k, " must be in [1, min(", kMaxTopK, ", num_experts=", cfg.num_experts, ")]");
    SWITCHYARD_CHECK(num_tokens <= INT32_MAX, "CUDA router: num_tokens=", num_tokens, " exceeds int32");
    const bool grouped = cfg.num_groups > 1;
    if (grouped) {
        SWITCHYARD_CHECK(cfg.num_experts % cfg.num_groups == 0, "CUDA router: num_groups=", cfg.num_groups,
                         " must divide num_experts=", cfg.num_experts);
        SWITCHYARD_CHECK(cfg.topk_groups >= 1 && cfg.topk_groups <= cfg.num_groups, "CUDA router: topk_groups=",
                         cfg.topk_groups, " must be in [1, num_groups=", cfg.num_groups, "]");
    }
    SWITCHYARD_CHECK(!cfg.use_score_bias || bias != nullptr, "CUDA router: use_score_bias=true but bias is null");
    RouterParams params{};
    params.logits = logits;
    params.bias = cfg.use_score_bias ? bias : nullptr;
    params.topk_ids = topk_ids;
    params.topk_weights = topk_weights;
    params.prob_partials = prob_partials;
    params.z_partials = z_partials;
    params.num_tokens = static_cast<int>(num_tokens);
    params.num_experts = static_cast<int>(cfg.num_experts);
    params.top_k = static_cast<int>(cfg.top_k);
    params.num_groups = grouped ? static_cast<int>(cfg.num_groups) : 1;
    params.topk_groups = grouped ? static_cast<int>(cfg.topk_groups) : 1;
    params.group_size = static_cast<int>(cfg.num_experts / params.num_groups);
    params.score_function = static_cast<int>(cfg.score_function);
    params.renormalize = cfg.renormalize ? 1 : 0;
    params.routed_scale = cfg.routed_scale;
    return params;
}

}  // namespace cuda
}  // namespace switchyard
