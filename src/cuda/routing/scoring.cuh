// src/cuda/routing/scoring.cuh: the routing and scoring rules on the device, written once for every kernel that
// scores or ranks experts: the router (router.cu: route_topk_kernel, route_seg_kernel), the balance kernels
// (balance.cu: aux-loss probabilities and z-loss, expert-choice scores and sort keys) and the backward kernels
// (backward.cu: route_backward, router_losses_backward).
//
// Rules (switchyard/routing.h). CPU reference: ref::ranks_before, ref::softmax_skip_nan, ref::sigmoid
// (src/ref/scoring.h), ref::route / route_token and ref::router_stats (src/ref/router.cpp), ref::route_weights,
// ref::route_backward and ref::router_losses_backward with their softmax / logsumexp (src/ref/backward.cpp).
//   exp_shifted    exp(v - m) is taken as exactly 1 when v == m (m = the row's max), so a row of -inf is uniform and
//                  +inf entries share the mass.
//   sigmoid        1 / (1 + exp(-v)).
//   forward softmax (router scores, aux-loss probabilities, expert choice; ref::softmax_skip_nan): m = max of the
//                  non-NaN entries; the normaliser sums exp_shifted over the non-NaN entries; a NaN entry's
//                  probability is NaN (softmax_prob), so one NaN logit does not poison the token's other experts.
//                  logsumexp (z-loss) is NaN when any logit of the token is NaN (ref::router_stats).
//   backward softmax (route_backward; ref backward.cpp's softmax, used by route_weights / route_backward): the max
//                  skips NaN (fmax) but the normaliser does not, so a NaN logit makes its token's whole softmax and
//                  gradient NaN (softmax_norm_nan_poisons over the k chosen; over all E, route_backward takes the
//                  same max and sum across a warp's lanes with lanes_max / lanes_sum).
//   ranking        (ref::ranks_before) larger value first; a NaN ranks below every number (-inf included); ties go
//                  to the lower index. A device candidate (Cand) also carries a class, kNumber > kNaN > kMasked >
//                  kTaken: kMasked = outside the kept groups, kTaken = already selected or no expert (lanes past E),
//                  so no expert is selected twice and k choices always exist. rank_key_desc is the same order as an
//                  unsigned sort key (expert choice; a stable sort then breaks ties by token index).
//   group score    sum of the two best selection values of a group by that ranking; the best alone for a group of
//                  one (ref route_token).
//   weights        from the unbiased scores: score[id_j] or, top-k-softmax, the forward softmax over the k chosen
//                  logits; renormalise w / sum_j w (sum in slot order) skipped when the sum is 0 (renormalized);
//                  then * routed_scale (slot_weight).
// Precision: forward scoring is double arithmetic on fp32 logits, so selection agrees with the reference on the same
// logits; route_backward is fp32 (the float overloads), router_losses_backward double. Keep every expression here
// as it is: the GPU tests compare exact decisions and the forward kernels' results must not change by a bit.
// Lane groups: kW lanes (a power of two, 4..32) hold one token; lanes_sum / lanes_max / lanes_best reduce over those
// kW lanes with an xor butterfly kW/2, ..., 1 (kW = 32: the whole warp) and must be called by every lane of the warp.
#pragma once

#include <cmath>

#include <cuda_runtime.h>

namespace switchyard {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- scores --------------------------------------------------------------------------------------------------

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }
__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }   // a NaN argument is skipped
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }  // a NaN argument is skipped

template <typename T>
__device__ __forceinline__ T exp_shifted(T v, T m) {
    return v == m ? T(1) : exp_of(v - m);
}

template <typename T>
__device__ __forceinline__ T sigmoid(T v) {
    return T(1) / (T(1) + exp_of(-v));
}

// Forward softmax probability of v from its exp_shifted value ex and the non-NaN normaliser sum (v_is_nan:
// isnan(v), where the caller has it already).
template <typename T>
__device__ __forceinline__ T softmax_prob(bool v_is_nan, T v, T ex, T sum) {
    return v_is_nan ? v : ex / sum;
}
template <typename T>
__device__ __forceinline__ T softmax_prob(T v, T ex, T sum) {
    return softmax_prob(static_cast<bool>(isnan(v)), v, ex, sum);
}

// logsumexp of a token under the forward rule (NaN when any logit is NaN).
__device__ __forceinline__ double logsumexp_fwd(double m, double esum, bool any_nan) {
    return any_nan ? static_cast<double>(NAN) : m + log(esum);
}

// Forward softmax normaliser of one row l [n] fp32, by one thread in index order (double).
// ex_out (may be null): exp_shifted of each entry, 0 for NaN entries.
struct RowSoftmax {
    double max;    // of the non-NaN entries (-inf when there are none)
    double sum;    // sum of exp_shifted over the non-NaN entries
    bool any_nan;
};
__device__ __forceinline__ RowSoftmax row_softmax_fwd(const float* l, int n, double* ex_out = nullptr) {
    RowSoftmax r{-INFINITY, 0.0, false};
    for (int e = 0; e < n; ++e) {
        const double v = l[e];
        if (isnan(v))
            r.any_nan = true;
        else
            r.max = fmax(r.max, v);
    }
    for (int e = 0; e < n; ++e) {
        const double v = l[e];
        if (isnan(v)) {
            if (ex_out != nullptr) ex_out[e] = 0.0;
            continue;
        }
        const double x = exp_shifted(v, r.max);
        if (ex_out != nullptr) ex_out[e] = x;
        r.sum += x;
    }
    return r;
}

// Backward softmax normaliser over n values value(i), i = 0..n-1 in order: max (skips NaN), sum of exp_shifted
// (a NaN value makes it NaN).
template <typename T, typename Value>
__device__ __forceinline__ void softmax_norm_nan_poisons(int n, Value value, T& max, T& sum) {
    max = -INFINITY;
    sum = T(0);
    for (int i = 0; i < n; ++i) max = max_of(max, value(i));
    for (int i = 0; i < n; ++i) sum += exp_shifted(value(i), max);
}

// ---- reductions over the kW lanes of a token -------------------------------------------------------------------

template <int kW, typename T>
__device__ __forceinline__ T lanes_sum(T v) {
#pragma unroll
    for (int m = kW / 2; m >= 1; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
    return v;
}
template <int kW, typename T>
__device__ __forceinline__ T lanes_max(T v) {
#pragma unroll
    for (int m = kW / 2; m >= 1; m >>= 1) v = max_of(v, __shfl_xor_sync(kFullMask, v, m));
    return v;
}

// ---- ranking ---------------------------------------------------------------------------------------------------

// Candidate order: class first (kNumber > kNaN > kMasked > kTaken), then value (larger first), then index.
constexpr int kTaken = 0, kMasked = 1, kNaN = 2, kNumber = 3;

struct Cand {
    int cls;
    int idx;
    double v;      // selection value
    double score;  // unbiased score (or logit for top-k softmax)
};

__device__ __forceinline__ bool better(const Cand& a, const Cand& b) {
    if (a.cls != b.cls) return a.cls > b.cls;
    if (a.cls == kNumber && a.v != b.v) return a.v > b.v;
    return a.idx < b.idx;
}

// Expert idx (valid: idx < E) with unbiased score `score`; its selection value adds bias[idx] when bias is set.
__device__ __forceinline__ Cand make_cand(int idx, bool valid, double score, const float* bias) {
    Cand c;
    c.idx = idx;
    c.score = score;
    c.v = (bias != nullptr && valid) ? score + static_cast<double>(bias[idx]) : score;
    c.cls = !valid ? kTaken : (isnan(c.v) ? kNaN : kNumber);
    return c;
}

__device__ __forceinline__ Cand shfl_xor_cand(const Cand& c, int mask) {
    Cand o;
    o.cls = __shfl_xor_sync(kFullMask, c.cls, mask);
    o.idx = __shfl_xor_sync(kFullMask, c.idx, mask);
    o.v = __shfl_xor_sync(kFullMask, c.v, mask);
    o.score = __shfl_xor_sync(kFullMask, c.score, mask);
    return o;
}

// Every lane of the kW-lane group returns the group's best candidate.
template <int kW>
__device__ __forceinline__ Cand lanes_best(Cand c) {
#pragma unroll
    for (int m = kW / 2; m >= 1; m >>= 1) {
        Cand o = shfl_xor_cand(c, m);
        if (better(o, c)) c = o;
    }
    return c;
}

// Ascending order of the key = descending order of v; NaN after every number.
__device__ __forceinline__ unsigned long long rank_key_desc(double v) {
    const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(v));
    unsigned long long asc = (u >> 63) ? ~u : (u | (1ull << 63));
    if (isnan(v)) asc = 0ull;
    return ~asc;
}

// Score of group [first, first + size) of the selection values sel (one thread).
__device__ __forceinline__ double group_score(const double* sel, int first, int size) {
    Cand b1{kTaken, 0, 0.0, 0.0}, b2{kTaken, 0, 0.0, 0.0};
    for (int q = 0; q < size; ++q) {
        const int e = first + q;
        const double v = sel[e];
        Cand x{isnan(v) ? kNaN : kNumber, e, v, 0.0};
        if (better(x, b1)) {
            b2 = b1;
            b1 = x;
        } else if (better(x, b2)) {
            b2 = x;
        }
    }
    return size == 1 ? b1.v : b1.v + b2.v;
}

// top_k rounds of argmax over the kW lanes of a token, each lane holding kPerLane candidates c. The lane whose
// slot (its index inside the group) is r receives round r's expert id and unbiased score; every chosen candidate
// becomes kTaken. Lanes with slot >= top_k keep id = -1, score = 0.
template <int kW, int kPerLane>
__device__ __forceinline__ void select_topk(Cand (&c)[kPerLane], int top_k, int slot, int& id, double& score) {
    id = -1;
    score = 0.0;
    for (int r = 0; r < top_k; ++r) {
        Cand best = c[0];
#pragma unroll
        for (int i = 1; i < kPerLane; ++i)
            if (better(c[i], best)) best = c[i];
        best = lanes_best<kW>(best);
        if (slot == r) {
            id = best.idx;
            score = best.score;
        }
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
            if (c[i].idx == best.idx) c[i].cls = kTaken;
    }
}

// ---- weights ---------------------------------------------------------------------------------------------------

// Renormalisation of one weight by the sum of its token's weights: skipped when the sum is 0.
__device__ __forceinline__ double renormalized(double w, double sum) { return sum != 0.0 ? w / sum : w; }

// Combine weight of this lane's slot (active: slot < top_k) from its unbiased score (the chosen logit under
// top-k-softmax). Slot sums run in slot order (lanes 0..top_k-1 of the group), as the reference sums.
template <int kW>
__device__ __forceinline__ double slot_weight(double my_score, bool active, int top_k, bool topk_softmax,
                                              bool renormalize, double routed_scale) {
    double w = my_score;
    if (topk_softmax) {
        double m = active && !isnan(my_score) ? my_score : -INFINITY;
        m = lanes_max<kW>(m);
        const double ew = !active ? 0.0 : exp_shifted(my_score, m);
        double s = 0.0;
        for (int j = 0; j < top_k; ++j) {
            const double v = __shfl_sync(kFullMask, ew, j, kW);
            if (!isnan(v)) s += v;
        }
        w = softmax_prob(my_score, ew, s);
    }
    if (renormalize) {
        double s = 0.0;
        for (int j = 0; j < top_k; ++j) s += __shfl_sync(kFullMask, w, j, kW);
        w = renormalized(w, s);
    }
    return w * routed_scale;
}

}  // namespace cuda
}  // namespace switchyard
