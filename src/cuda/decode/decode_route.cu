// src/cuda/decode/decode_route.cu: router GEMM, scoring, top-k and the dropless routing plan for a small batch, in
// two kernels (moe_stages.h, decode_route).
//
//   partials   The gate GEMV on the tensor cores (skinny_mma.cuh): warp (row tile, split) multiplies 16 gate rows
//              (plus the shared expert's gate row as row E when there is one) by every token over one slice of the
//              hidden dimension and stores fp32 partial logits [split][T][rows]. The split count is a function of
//              (T, rows, H) only, so the summation order, and the logits, do not depend on the card.
//   route+plan One block: sums the partials in split order into logits [T, E] (and the shared gate logits), routes
//              every token with route_token_warp (routing/route_token.cuh: the same code and precision as the
//              router kernel, one warp per token), then builds the plan of dropless token choice: counts, offsets,
//              and rows in expert order with the pairs of an expert in (t, j) order -- build_plan's order.
// Both are launched with programmatic dependent launch (the first waits for whatever wrote x).
#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/decode/skinny_mma.cuh"
#include "cuda/dispatch.cuh"
#include "cuda/gemm/sm90/grouped_gemm_sm90.h"
#include "cuda/moe_stages.h"
#include "cuda/routing/route_token.cuh"

namespace switchyard {
namespace cuda {
namespace {

using decode::griddep_launch_dependents;
using decode::griddep_wait;
using decode::launch_pdl;
using decode::skinny_mma;
using decode::zero_acc;

constexpr int kPartialWarps = 4;
constexpr int kRoutePlanWarps = 16;
constexpr int64_t kTargetWarps = 512;           // about 4 warps per SM of an H100
constexpr int64_t kMaxPartialFloats = 1 << 16;  // what the one routing block sums (256 KiB)

struct PartialsParams {
    const void* x;
    const void* gate;
    const void* shared_gate;
    float* partials;  // [splits][T][rows]
    int num_tokens;
    int hidden;
    int num_experts;
    int rows;
    int splits;
};

template <typename T, int kGroups>
__global__ void __launch_bounds__(kPartialWarps * 32) router_partials_kernel(PartialsParams p) {
    constexpr int kTok = 8 * kGroups;
    griddep_wait();
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int wg = blockIdx.x * kPartialWarps + (threadIdx.x >> 5);
    const int tiles = (p.rows + 15) / 16;
    if (wg >= tiles * p.splits) return;
    const int tile = wg / p.splits, sp = wg % p.splits;
    const int H = p.hidden;
    const T* gate = static_cast<const T*>(p.gate);
    auto row_ptr = [&](int row) -> const T* {
        if (row < p.num_experts) return gate + static_cast<int64_t>(row) * H;
        if (row < p.rows) return static_cast<const T*>(p.shared_gate);
        return nullptr;
    };
    const T* w_lo[1] = {row_ptr(tile * 16 + g)};
    const T* w_hi[1] = {row_ptr(tile * 16 + g + 8)};
    const int chunks = (H + 31) / 32;
    const int per = (chunks + p.splits - 1) / p.splits;
    const int c_begin = std::min(sp * per, chunks) * 32, c_end = std::min((sp + 1) * per, chunks) * 32;
    const T* x = static_cast<const T*>(p.x);
    for (int r0 = 0; r0 < p.num_tokens; r0 += kTok) {
        const T* x_row[kGroups];
#pragma unroll
        for (int gr = 0; gr < kGroups; ++gr) {
            const int r = r0 + 8 * gr + g;
            x_row[gr] = r < p.num_tokens ? x + static_cast<int64_t>(r) * H : nullptr;
        }
        float acc[1][kGroups][4];
        zero_acc(acc);
        skinny_mma<T, 1, kGroups, 4>(w_lo, w_hi, x_row, c_begin, c_end, H, acc);
#pragma unroll
        for (int gr = 0; gr < kGroups; ++gr)
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const int t = r0 + 8 * gr + 2 * q + (v & 1);
                const int row = tile * 16 + g + 8 * (v >> 1);
                if (t < p.num_tokens && row < p.rows)
                    p.partials[(static_cast<int64_t>(sp) * p.num_tokens + t) * p.rows + row] = acc[0][gr][v];
            }
    }
}

struct RoutePlanParams {
    RouterParams router;  // logits (written here), bias, topk_ids, topk_weights, rules
    const float* partials;
    float* shared_gate_logits;
    int32_t* expert_counts;
    int32_t* expert_offsets;
    int32_t* slot_row;
    int32_t* row_token;
    int32_t* row_slot;
    int rows;
    int splits;
};

template <int kPerLane, bool kGrouped>
__global__ void __launch_bounds__(kRoutePlanWarps * 32) route_plan_kernel(RoutePlanParams q) {
    extern __shared__ double route_smem[];  // grouped routing scratch (route_token_warp)
    __shared__ int counts[kDecodeMaxExperts];
    __shared__ int cursor[kDecodeMaxExperts];
    griddep_wait();
    griddep_launch_dependents();
    const RouterParams& p = q.router;
    const int T = p.num_tokens, E = p.num_experts, k = p.top_k, rows = q.rows;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* logits = const_cast<float*>(p.logits);
    for (int idx = threadIdx.x; idx < T * rows; idx += blockDim.x) {
        const int t = idx / rows, e = idx % rows;
        float s = 0.0f;
        for (int sp = 0; sp < q.splits; ++sp) s += q.partials[(static_cast<int64_t>(sp) * T + t) * rows + e];
        if (e < E)
            logits[static_cast<int64_t>(t) * E + e] = s;
        else
            q.shared_gate_logits[t] = s;
    }
    for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    double prob_acc[kPerLane] = {};
    double z_acc = 0.0;
    for (int t = warp; t < T; t += kRoutePlanWarps)
        route_token_warp<kPerLane, kGrouped>(p, t, route_smem, warp, kRoutePlanWarps, false, prob_acc, z_acc);
    __syncthreads();
    const int n = T * k;
    for (int i = threadIdx.x; i < n; i += blockDim.x) atomicAdd(&counts[p.topk_ids[i]], 1);
    __syncthreads();
    if (warp == 0) {  // exclusive scan of the counts: lane l sums a contiguous segment, then a warp scan
        const int seg = (E + 31) / 32;
        const int lo = std::min(lane * seg, E), hi = std::min(lo + seg, E);
        int local = 0;
        for (int e = lo; e < hi; ++e) local += counts[e];
        int incl = local;
        for (int d = 1; d < 32; d <<= 1) {
            const int v = __shfl_up_sync(0xffffffffu, incl, d);
            if (lane >= d) incl += v;
        }
        int run = incl - local;
        for (int e = lo; e < hi; ++e) {
            q.expert_counts[e] = counts[e];
            q.expert_offsets[e] = run;
            cursor[e] = run;
            run += counts[e];
        }
        if (lane == 31) q.expert_offsets[E] = incl;
        __syncwarp();
        // Rows in pair order within each expert: 32 pairs at a time, ranked among the lanes with the same expert.
        for (int base = 0; base < n; base += 32) {
            const int pr = base + lane;
            const bool valid = pr < n;
            const int e = valid ? p.topk_ids[pr] : E + lane;  // distinct keys for the idle lanes
            const unsigned peers = __match_any_sync(0xffffffffu, e);
            const int rank = __popc(peers & ((1u << lane) - 1u));
            if (valid) {
                const int pos = cursor[e] + rank;
                q.slot_row[pr] = pos;
                q.row_token[pos] = pr / k;
                q.row_slot[pos] = pr;
            }
            __syncwarp();
            if (valid && rank == 0) cursor[e] += __popc(peers);
            __syncwarp();
        }
    }
}


template <int kPerLane>
void launch_route_plan(const RoutePlanParams& q, cudaStream_t stream) {
    const RouterParams& p = q.router;
    if (p.num_groups > 1) {
        const size_t smem = static_cast<size_t>(kRoutePlanWarps) *
                            (static_cast<size_t>(p.num_experts + p.num_groups) * sizeof(double) +
                             static_cast<size_t>(p.num_groups) * sizeof(int));
        if (smem > 48 * 1024)
            SWITCHYARD_CUDA_CHECK(cudaFuncSetAttribute(route_plan_kernel<kPerLane, true>,
                                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                       static_cast<int>(smem)));
        launch_pdl(route_plan_kernel<kPerLane, true>, 1, kRoutePlanWarps * 32, smem, stream, q);
    } else {
        launch_pdl(route_plan_kernel<kPerLane, false>, 1, kRoutePlanWarps * 32, 0, stream, q);
    }
}

}  // namespace

int decode_router_splits(int64_t num_tokens, int64_t rows, int64_t hidden) {
    const int64_t tiles = ceil_div<int64_t>(rows, 16);
    const int64_t chunks = ceil_div<int64_t>(hidden, 32);
    int64_t splits = ceil_div<int64_t>(kTargetWarps, tiles);
    splits = std::min(splits, std::max<int64_t>(1, chunks / 4));  // at least 128 columns per warp
    splits = std::min(splits, std::max<int64_t>(1, kMaxPartialFloats / std::max<int64_t>(1, num_tokens * rows)));
    return static_cast<int>(std::max<int64_t>(1, splits));
}

size_t decode_route_workspace_size(int64_t num_tokens, int64_t rows, int64_t hidden) {
    return sizeof(float) * static_cast<size_t>(decode_router_splits(num_tokens, rows, hidden)) * num_tokens * rows;
}

void decode_route(const MoEConfig& cfg, const DecodeRouteArgs& a, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream) {
    const int64_t T = a.num_tokens, E = cfg.num_experts, H = a.hidden;
    if (T == 0) return;
    SWITCHYARD_CHECK(T <= kDecodeMaxTokens, "decode route: num_tokens=", T, " exceeds ", kDecodeMaxTokens);
    SWITCHYARD_CHECK(E <= kDecodeMaxExperts, "decode route: num_experts=", E, " exceeds ", kDecodeMaxExperts);
    SWITCHYARD_CHECK(H % 8 == 0 && aligned16(a.x) && aligned16(a.gate) && aligned16(a.shared_gate),
                     "decode route: hidden_size=", H, " must be a multiple of 8 and x / gate 16-byte aligned");
    const int64_t rows = E + (a.shared_gate != nullptr ? 1 : 0);
    const int splits = decode_router_splits(T, rows, H);
    const size_t need = decode_route_workspace_size(T, rows, H);
    SWITCHYARD_CHECK(workspace != nullptr && workspace_bytes >= need, "decode route: workspace of ", workspace_bytes,
                     " bytes, needs ", need);
    RoutePlanParams q{};
    q.router = make_router_params(cfg, a.logits, a.bias, T, a.topk_ids, a.topk_weights, nullptr, nullptr);
    q.partials = static_cast<const float*>(workspace);
    q.shared_gate_logits = a.shared_gate_logits;
    q.expert_counts = a.expert_counts;
    q.expert_offsets = a.expert_offsets;
    q.slot_row = a.slot_row;
    q.row_token = a.row_token;
    q.row_slot = a.row_slot;
    q.rows = static_cast<int>(rows);
    q.splits = splits;
    PartialsParams pp{};
    pp.x = a.x;
    pp.gate = a.gate;
    pp.shared_gate = a.shared_gate;
    pp.partials = static_cast<float*>(workspace);
    pp.num_tokens = static_cast<int>(T);
    pp.hidden = static_cast<int>(H);
    pp.num_experts = static_cast<int>(E);
    pp.rows = static_cast<int>(rows);
    pp.splits = splits;
    const int warps = static_cast<int>(ceil_div<int64_t>(rows, 16)) * splits;
    const int grid = (warps + kPartialWarps - 1) / kPartialWarps;
    dispatch_float_dtype(a.dtype, "decode route", [&](auto tag) {
        using T_ = typename decltype(tag)::type;
        if constexpr (std::is_same<T_, float>::value) {
            SWITCHYARD_FAIL("decode route: fp32 is not supported (bf16, fp16)");
        } else {
            if (T <= 8)
                launch_pdl(router_partials_kernel<T_, 1>, grid, kPartialWarps * 32, 0, stream, pp);
            else if (T <= 16)
                launch_pdl(router_partials_kernel<T_, 2>, grid, kPartialWarps * 32, 0, stream, pp);
            else
                launch_pdl(router_partials_kernel<T_, 4>, grid, kPartialWarps * 32, 0, stream, pp);
        }
    });
    if (E <= 32)
        launch_route_plan<1>(q, stream);
    else if (E <= 64)
        launch_route_plan<2>(q, stream);
    else if (E <= 128)
        launch_route_plan<4>(q, stream);
    else if (E <= 256)
        launch_route_plan<8>(q, stream);
    else
        launch_route_plan<16>(q, stream);
}

}  // namespace cuda
}  // namespace switchyard
