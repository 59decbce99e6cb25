// src/cuda/routing/balance.cu: load balancing and routing variants on the GPU (launchers declared in src/cuda/routing/balance.h).
//
// update_score_bias     bias [E] fp32 += rate * sign(N - E * counts[e]), N = sum counts (int64, exact), in double,
//                       stored fp32: bitwise equal to ref::update_score_bias. One block; integer atomics only.
// router_losses         {aux, z, seq_aux} from logits [T, E] fp32 and topk_ids [T, k] int32, in double:
//   1. token_norms      one thread per token: m = max of the non-NaN logits, esum = sum_{non-NaN} exp(l - m)
//                       (exactly 1 where l == m), ssum = sum sigmoid(l), lse^2 (NaN when any logit is NaN), all in
//                       expert order as ref::router_stats / ref::aux_probabilities compute them.
//   2. chunk_partials   block b sums p[t, e] and the top-k counts of tokens [b*kChunk, (b+1)*kChunk) per expert
//                       (thread per expert, tokens in order) and the chunk's lse^2: [blocks, E] partials.
//   3. seq_losses       block s: the sequence's E * sum_e f_e P_e (thread per expert, tokens in order; then the
//                       expert terms summed in order by one thread). A sequence past T or of negative length: NaN.
//   4. finish           one block: P_e and counts from the partials in block order, aux = E * sum_e f_e P_e,
//                       z = sum lse^2 / T, seq_aux = mean over non-empty sequences (NaN if sum(seq_lens) != T).
//   Every sum has one fixed order: deterministic run to run; vs the reference (other orders) within a few ulps
//   of double, far inside the fp32 rounding of the outputs.
// expert_choice_plan    expert-choice routing (ref::route_expert_choice), no host synchronisation:
//   1. ec_scores        one thread per token: score[t, e] in double (softmax with ref's NaN rule, sums in expert
//                       order, or sigmoid) -> scores [T, E]; sort keys [E, T] (expert-major) = score mapped to an
//                       order-reversing uint64 (NaN last), values = token index.
//   2. a stable segmented sort per expert (CUB DeviceSegmentedSort::StableSortPairs): the first C of segment e are
//      e's picks, ties in token order (stable) as the reference's lower-token rule.
//   3. picked flags [E, T], exclusive scan -> row of each pick (expert order, token order inside an expert).
//   4. scatter: slot_row / topk_ids per slot t*E + e, row_token / row_slot per row; weights per token (one thread:
//      renormalisation sum over picked experts in expert order, then routed_scale); counts = C, offsets = e*C.
// Workspace layouts: carve_losses / carve_ec below (WorkspaceCarver, 256-byte aligned slices, fixed order).
#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_sort.cuh>

#include <cmath>

#include "cuda/routing/balance.h"
#include "cuda/common.cuh"
#include "cuda/routing/scoring.cuh"

namespace switchyard {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 128;          // tokens per block of the loss partials
constexpr int kMaxLossExperts = 512;  // the expert terms of one block live in shared memory

// ---- bias update ----------------------------------------------------------------------------------------------
struct HostCounts {
    int32_t counts[kMaxBiasExperts];
};

__device__ __forceinline__ void apply_bias_update(double rate, long long total, int64_t num_experts, int e,
                                                  int32_t count, float* bias) {
    const long long diff = total - static_cast<long long>(num_experts) * count;  // E * (mean - load_e)
    const double sign = diff > 0 ? 1.0 : (diff < 0 ? -1.0 : 0.0);
    bias[e] = static_cast<float>(static_cast<double>(bias[e]) + rate * sign);
}

__global__ void bias_update_kernel(double rate, const int32_t* counts, int64_t num_experts, float* bias) {
    __shared__ unsigned long long total;
    if (threadIdx.x == 0) total = 0ull;
    __syncthreads();
    unsigned long long mine = 0;
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) mine += static_cast<unsigned long long>(counts[e]);
    atomicAdd(&total, mine);  // integers: the sum does not depend on the order
    __syncthreads();
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x)
        apply_bias_update(rate, static_cast<long long>(total), num_experts, static_cast<int>(e), counts[e], bias);
}

__global__ void bias_update_host_kernel(double rate, HostCounts c, long long total, int num_experts, float* bias) {
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x)
        apply_bias_update(rate, total, num_experts, e, c.counts[e], bias);
}

// ---- router losses --------------------------------------------------------------------------------------------
struct TokenNorm {
    double m;     // max of the non-NaN logits
    double norm;  // softmax: sum_{non-NaN} exp(l - m); sigmoid: sum sigmoid(l)
    double lse2;  // logsumexp^2 (NaN if any logit is NaN)
};

__global__ void token_norms_kernel(const float* logits, int64_t num_tokens, int num_experts, int use_sigmoid,
                                   TokenNorm* out) {
    for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < num_tokens;
         t += int64_t(gridDim.x) * blockDim.x) {
        const float* l = logits + t * num_experts;
        const RowSoftmax r = row_softmax_fwd(l, num_experts);
        double ssum = 0.0;
        if (use_sigmoid)
            for (int e = 0; e < num_experts; ++e) ssum += sigmoid(static_cast<double>(l[e]));
        const double lse = logsumexp_fwd(r.max, r.sum, r.any_nan);
        out[t] = TokenNorm{r.max, use_sigmoid ? ssum : r.sum, lse * lse};
    }
}

// p[t, e] from the token's norm (ref::aux_probabilities).
__device__ __forceinline__ double aux_prob(float logit, const TokenNorm& n, int use_sigmoid) {
    const double v = logit;
    if (use_sigmoid) return sigmoid(v) / n.norm;
    if (isnan(v)) return v;
    return exp_shifted(v, n.m) / n.norm;
}

__global__ void chunk_partials_kernel(const float* logits, const int32_t* topk_ids, const TokenNorm* norms,
                                      int64_t num_tokens, int num_experts, int top_k, int sigmoid, double* part_p,
                                      int32_t* part_c, double* part_z) {
    const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
    const int64_t end = begin + kChunk < num_tokens ? begin + kChunk : num_tokens;
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
        double ps = 0.0;
        int32_t c = 0;
        for (int64_t t = begin; t < end; ++t) {
            ps += aux_prob(logits[t * num_experts + e], norms[t], sigmoid);
            for (int j = 0; j < top_k; ++j) c += topk_ids[t * top_k + j] == e ? 1 : 0;
        }
        part_p[static_cast<int64_t>(blockIdx.x) * num_experts + e] = ps;
        part_c[static_cast<int64_t>(blockIdx.x) * num_experts + e] = c;
    }
    if (threadIdx.x == 0) {
        double z = 0.0;
        for (int64_t t = begin; t < end; ++t) z += norms[t].lse2;
        part_z[blockIdx.x] = z;
    }
}

__global__ void seq_losses_kernel(const float* logits, const int32_t* topk_ids, const TokenNorm* norms,
                                  int64_t num_tokens, int num_experts, int top_k, int sigmoid, const int32_t* seq_lens,
                                  double* seq_loss) {
    __shared__ long long begin_s;
    __shared__ double term[kMaxLossExperts];
    const int s = blockIdx.x;
    if (threadIdx.x == 0) {
        long long b = 0;
        for (int i = 0; i < s; ++i) b += seq_lens[i];
        begin_s = b;
    }
    __syncthreads();
    const long long begin = begin_s, len = seq_lens[s];
    if (len < 0 || begin < 0 || begin + len > num_tokens) {  // bad lengths: reported, never read out of bounds
        if (threadIdx.x == 0) seq_loss[s] = static_cast<double>(NAN);
        return;
    }
    if (len == 0) {
        if (threadIdx.x == 0) seq_loss[s] = 0.0;
        return;
    }
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
        double ps = 0.0;
        long long c = 0;
        for (long long t = begin; t < begin + len; ++t) {
            ps += aux_prob(logits[t * num_experts + e], norms[t], sigmoid);
            for (int j = 0; j < top_k; ++j) c += topk_ids[t * top_k + j] == e ? 1 : 0;
        }
        term[e] = (static_cast<double>(c) / static_cast<double>(len * top_k)) * (ps / static_cast<double>(len));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double l = 0.0;
        for (int e = 0; e < num_experts; ++e) l += term[e];
        seq_loss[s] = static_cast<double>(num_experts) * l;
    }
}

__global__ void losses_finish_kernel(const double* part_p, const int32_t* part_c, const double* part_z, int blocks,
                                     int64_t num_tokens, int num_experts, int top_k, const int32_t* seq_lens,
                                     const double* seq_loss, int num_seqs, float* losses, double* losses64) {
    __shared__ double term[kMaxLossExperts];
    const double T = static_cast<double>(num_tokens);
    const double pairs = T * top_k;
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
        double ps = 0.0;
        long long c = 0;
        for (int b = 0; b < blocks; ++b) {
            ps += part_p[static_cast<int64_t>(b) * num_experts + e];
            c += part_c[static_cast<int64_t>(b) * num_experts + e];
        }
        term[e] = num_tokens > 0 ? (static_cast<double>(c) / pairs) * (ps / T) : 0.0;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    double aux = 0.0;
    for (int e = 0; e < num_experts; ++e) aux += term[e];
    aux = num_tokens > 0 ? static_cast<double>(num_experts) * aux : 0.0;
    double z = 0.0;
    for (int b = 0; b < blocks; ++b) z += part_z[b];
    z = num_tokens > 0 ? z / T : 0.0;
    double seq;
    if (seq_lens == nullptr) {
        seq = aux;
    } else {
        long long total = 0;
        bool bad = false;
        double sum = 0.0;
        int nonempty = 0;
        for (int s = 0; s < num_seqs; ++s) {
            bad |= seq_lens[s] < 0;
            total += seq_lens[s];
            if (seq_lens[s] > 0) {
                sum += seq_loss[s];
                ++nonempty;
            }
        }
        seq = (bad || total != num_tokens) ? static_cast<double>(NAN) : (nonempty > 0 ? sum / nonempty : 0.0);
    }
    losses[0] = static_cast<float>(aux);
    losses[1] = static_cast<float>(z);
    losses[2] = static_cast<float>(seq);
    if (losses64 != nullptr) {
        losses64[0] = aux;
        losses64[1] = z;
        losses64[2] = seq;
    }
}

struct LossScratch {
    TokenNorm* norms;  // [T]
    double* part_p;    // [blocks, E]
    int32_t* part_c;   // [blocks, E]
    double* part_z;    // [blocks]
    double* seq_loss;  // [S]
};

LossScratch carve_losses(WorkspaceCarver& wc, int64_t num_tokens, int64_t num_experts, int64_t num_seqs) {
    const int64_t blocks = ceil_div<int64_t>(num_tokens, kChunk);
    LossScratch s{};
    s.norms = wc.take<TokenNorm>(num_tokens);
    s.part_p = wc.take<double>(blocks * num_experts);
    s.part_c = wc.take<int32_t>(blocks * num_experts);
    s.part_z = wc.take<double>(blocks);
    s.seq_loss = wc.take<double>(num_seqs);
    return s;
}

// ---- expert choice --------------------------------------------------------------------------------------------
__global__ void ec_scores_kernel(const float* logits, int64_t num_tokens, int num_experts, int use_sigmoid,
                                 double* scores, unsigned long long* keys, int32_t* vals) {
    for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < num_tokens;
         t += int64_t(gridDim.x) * blockDim.x) {
        const float* l = logits + t * num_experts;
        double* s = scores + t * num_experts;
        if (use_sigmoid) {
            for (int e = 0; e < num_experts; ++e) s[e] = sigmoid(static_cast<double>(l[e]));
        } else {
            const RowSoftmax r = row_softmax_fwd(l, num_experts, s);  // s[e] = exp_shifted, 0 for NaN
            for (int e = 0; e < num_experts; ++e) s[e] = softmax_prob(static_cast<double>(l[e]), s[e], r.sum);
        }
        for (int e = 0; e < num_experts; ++e) {
            keys[static_cast<int64_t>(e) * num_tokens + t] = rank_key_desc(s[e]);
            vals[static_cast<int64_t>(e) * num_tokens + t] = static_cast<int32_t>(t);
        }
    }
}

__global__ void ec_segments_kernel(int64_t num_tokens, int num_experts, int64_t capacity, int64_t* seg_offsets,
                                   int32_t* counts, int32_t* offsets) {
    for (int e = threadIdx.x; e <= num_experts; e += blockDim.x) {
        seg_offsets[e] = static_cast<int64_t>(e) * num_tokens;
        offsets[e] = static_cast<int32_t>(e * capacity);
        if (e < num_experts) counts[e] = static_cast<int32_t>(capacity);
    }
}

__global__ void ec_pick_kernel(const int32_t* sorted_tokens, int64_t num_tokens, int64_t capacity, int64_t n_picks,
                               int32_t* flags) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_picks; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t e = i / capacity, r = i % capacity;
        flags[e * num_tokens + sorted_tokens[e * num_tokens + r]] = 1;
    }
}

__global__ void ec_scatter_kernel(const int32_t* flags, const int32_t* rows, int64_t num_tokens, int num_experts,
                                  int32_t* slot_row, int32_t* topk_ids, int32_t* row_token, int32_t* row_slot) {
    const int64_t n = num_tokens * num_experts;
    for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n; p += int64_t(gridDim.x) * blockDim.x) {
        const int64_t e = p / num_tokens, t = p % num_tokens;
        const int64_t slot = t * num_experts + e;
        if (flags[p]) {
            const int32_t row = rows[p];
            slot_row[slot] = row;
            topk_ids[slot] = static_cast<int32_t>(e);
            row_token[row] = static_cast<int32_t>(t);
            row_slot[row] = static_cast<int32_t>(slot);
        } else {
            slot_row[slot] = -1;
            topk_ids[slot] = -1;
        }
    }
}

__global__ void ec_weights_kernel(const double* scores, const int32_t* slot_row, int64_t num_tokens, int num_experts,
                                  int renormalize, double routed_scale, float* weights) {
    for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < num_tokens;
         t += int64_t(gridDim.x) * blockDim.x) {
        const double* s = scores + t * num_experts;
        const int32_t* sr = slot_row + t * num_experts;
        double sum = 0.0;
        for (int e = 0; e < num_experts; ++e)
            if (sr[e] >= 0) sum += s[e];
        for (int e = 0; e < num_experts; ++e) {
            float w = 0.0f;
            if (sr[e] >= 0) {
                const double v = renormalize ? renormalized(s[e], sum) : s[e];
                w = static_cast<float>(v * routed_scale);
            }
            weights[t * num_experts + e] = w;
        }
    }
}

struct EcScratch {
    double* scores;                   // [T, E]
    unsigned long long* keys;         // [E, T]
    unsigned long long* keys_sorted;  // [E, T]
    int32_t* vals;                    // [E, T]
    int32_t* vals_sorted;             // [E, T]
    int64_t* seg_offsets;             // [E + 1]
    int32_t* flags;                   // [E, T]
    int32_t* rows;                    // [E, T]
    void* cub_temp;
    size_t cub_bytes;
};

size_t ec_cub_bytes(int64_t n, int64_t num_experts) {
    size_t a = 0, b = 0;
    SWITCHYARD_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairs(
        nullptr, a, static_cast<const unsigned long long*>(nullptr), static_cast<unsigned long long*>(nullptr),
        static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), n, num_experts,
        static_cast<const int64_t*>(nullptr), static_cast<const int64_t*>(nullptr)));
    SWITCHYARD_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, b, static_cast<const int32_t*>(nullptr),
                                                        static_cast<int32_t*>(nullptr), static_cast<int>(n)));
    return std::max(a, b);
}

EcScratch carve_ec(WorkspaceCarver& wc, int64_t num_tokens, int64_t num_experts) {
    const int64_t n = num_tokens * num_experts;
    EcScratch s{};
    s.scores = wc.take<double>(n);
    s.keys = wc.take<unsigned long long>(n);
    s.keys_sorted = wc.take<unsigned long long>(n);
    s.vals = wc.take<int32_t>(n);
    s.vals_sorted = wc.take<int32_t>(n);
    s.seg_offsets = wc.take<int64_t>(num_experts + 1);
    s.flags = wc.take<int32_t>(n);
    s.rows = wc.take<int32_t>(n);
    s.cub_bytes = n > 0 ? ec_cub_bytes(n, num_experts) : 0;
    s.cub_temp = wc.take_bytes(s.cub_bytes);
    return s;
}

}  // namespace

// ---- launchers ------------------------------------------------------------------------------------------------

void update_score_bias(double rate, const int32_t* counts, int64_t num_experts, float* bias, cudaStream_t stream) {
    SWITCHYARD_CHECK(std::isfinite(rate) && rate >= 0.0, "CUDA update_score_bias: rate=", rate);
    SWITCHYARD_CHECK(num_experts >= 0 && num_experts <= INT32_MAX, "CUDA update_score_bias: num_experts=",
                     num_experts);
    if (num_experts == 0) return;
    bias_update_kernel<<<1, kThreads, 0, stream>>>(rate, counts, num_experts, bias);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

void update_score_bias_host_counts(double rate, const int64_t* host_counts, int64_t num_experts, float* bias,
                                   cudaStream_t stream) {
    SWITCHYARD_CHECK(std::isfinite(rate) && rate >= 0.0, "CUDA update_score_bias: rate=", rate);
    SWITCHYARD_CHECK(num_experts >= 0 && num_experts <= kMaxBiasExperts, "CUDA update_score_bias: num_experts=",
                     num_experts, " must be in [0, ", kMaxBiasExperts, "]");
    if (num_experts == 0) return;
    HostCounts c{};
    long long total = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
        SWITCHYARD_CHECK(host_counts[e] >= 0 && host_counts[e] <= INT32_MAX, "CUDA update_score_bias: counts[", e,
                         "]=", host_counts[e]);
        c.counts[e] = static_cast<int32_t>(host_counts[e]);
        total += host_counts[e];
    }
    bias_update_host_kernel<<<1, kThreads, 0, stream>>>(rate, c, total, static_cast<int>(num_experts), bias);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

size_t router_losses_workspace_size(int64_t num_tokens, int64_t num_experts, int64_t num_seqs) {
    WorkspaceCarver wc;
    carve_losses(wc, num_tokens, num_experts, num_seqs);
    return wc.used();
}

void router_losses(const MoEConfig& cfg, const float* logits, const int32_t* topk_ids, int64_t num_tokens,
                   const int32_t* seq_lens, int64_t num_seqs, float* losses, double* losses64, void* workspace,
                   size_t workspace_bytes, cudaStream_t stream) {
    const int64_t E = cfg.num_experts;
    SWITCHYARD_CHECK(E >= 1 && E <= kMaxLossExperts, "CUDA router_losses: num_experts=", E, " must be in [1, ",
                     kMaxLossExperts, "]");
    SWITCHYARD_CHECK(num_tokens >= 0 && num_tokens <= INT32_MAX, "CUDA router_losses: num_tokens=", num_tokens);
    SWITCHYARD_CHECK(num_seqs >= 0 && num_seqs <= 65535 * 64, "CUDA router_losses: num_seqs=", num_seqs);
    WorkspaceCarver wc(workspace, workspace_bytes);
    const LossScratch s = carve_losses(wc, num_tokens, E, seq_lens != nullptr ? num_seqs : 1);
    const int sig = cfg.score_function == ScoreFunction::kSigmoid ? 1 : 0;
    const int k = static_cast<int>(cfg.top_k);
    const int blocks = static_cast<int>(ceil_div<int64_t>(num_tokens, kChunk));
    if (num_tokens > 0) {
        token_norms_kernel<<<grid_for(num_tokens, 128), 128, 0, stream>>>(logits, num_tokens, static_cast<int>(E), sig,
                                                                          s.norms);
        SWITCHYARD_CUDA_CHECK_LAUNCH();
        chunk_partials_kernel<<<blocks, kThreads, 0, stream>>>(logits, topk_ids, s.norms, num_tokens,
                                                               static_cast<int>(E), k, sig, s.part_p, s.part_c,
                                                               s.part_z);
        SWITCHYARD_CUDA_CHECK_LAUNCH();
    }
    if (seq_lens != nullptr && num_seqs > 0) {
        seq_losses_kernel<<<static_cast<unsigned>(num_seqs), kThreads, 0, stream>>>(
            logits, topk_ids, s.norms, num_tokens, static_cast<int>(E), k, sig, seq_lens, s.seq_loss);
        SWITCHYARD_CUDA_CHECK_LAUNCH();
    }
    losses_finish_kernel<<<1, kThreads, 0, stream>>>(s.part_p, s.part_c, s.part_z, blocks, num_tokens,
                                                     static_cast<int>(E), k, seq_lens, s.seq_loss,
                                                     static_cast<int>(num_seqs), losses, losses64);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

size_t expert_choice_workspace_size(int64_t num_tokens, int64_t num_experts) {
    WorkspaceCarver wc;
    carve_ec(wc, num_tokens, num_experts);
    return wc.used();
}

void expert_choice_plan(const MoEConfig& cfg, const ExpertChoiceArgs& a, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream) {
    const int64_t T = a.num_tokens, E = cfg.num_experts;
    SWITCHYARD_CHECK(cfg.expert_choice(), "CUDA expert_choice_plan: routing_mode=", to_string(cfg.routing_mode));
    SWITCHYARD_CHECK(cfg.score_function != ScoreFunction::kTopkSoftmax,
                     "CUDA expert_choice_plan: score_function=topk-softmax is not defined under expert choice");
    SWITCHYARD_CHECK(E >= 1 && T >= 0 && T * E <= INT32_MAX, "CUDA expert_choice_plan: num_tokens*num_experts=",
                     T * E, " exceeds int32 slot indices");
    const int64_t C = cfg.expert_choice_capacity(T);
    const int64_t n = T * E;
    WorkspaceCarver wc(workspace, workspace_bytes);
    const EcScratch s = carve_ec(wc, T, E);

    ec_segments_kernel<<<1, kThreads, 0, stream>>>(T, static_cast<int>(E), C, s.seg_offsets, a.expert_counts,
                                                   a.expert_offsets);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
    if (n == 0) return;
    SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(a.row_token, 0xFF, sizeof(int32_t) * n, stream));
    SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(a.row_slot, 0xFF, sizeof(int32_t) * n, stream));
    SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(s.flags, 0, sizeof(int32_t) * n, stream));
    const int sig = cfg.score_function == ScoreFunction::kSigmoid ? 1 : 0;
    ec_scores_kernel<<<grid_for(T, 128), 128, 0, stream>>>(a.logits, T, static_cast<int>(E), sig, s.scores, s.keys,
                                                           s.vals);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
    size_t temp = s.cub_bytes;
    SWITCHYARD_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairs(s.cub_temp, temp, s.keys, s.keys_sorted, s.vals,
                                                                    s.vals_sorted, n, E, s.seg_offsets,
                                                                    s.seg_offsets + 1, stream));
    if (C > 0) {
        ec_pick_kernel<<<grid_for(E * C, kThreads), kThreads, 0, stream>>>(s.vals_sorted, T, C, E * C, s.flags);
        SWITCHYARD_CUDA_CHECK_LAUNCH();
    }
    temp = s.cub_bytes;
    SWITCHYARD_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(s.cub_temp, temp, s.flags, s.rows, static_cast<int>(n), stream));
    ec_scatter_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(s.flags, s.rows, T, static_cast<int>(E),
                                                                      a.slot_row, a.topk_ids, a.row_token, a.row_slot);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
    ec_weights_kernel<<<grid_for(T, 128), 128, 0, stream>>>(s.scores, a.slot_row, T, static_cast<int>(E),
                                                            cfg.renormalize ? 1 : 0, cfg.routed_scale, a.topk_weights);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
