// src/cuda/decode/decode_experts.cu: the expert part of a small-batch forward in two kernels (moe_stages.h,
// decode_experts): everything between the routing plan and y, for the routed experts and the shared expert.
//
//   up    h[r, :] = act(x[row_token[r]] . w13[e]^T) for every row r of every expert e with rows (the gather, the
//         first GEMM and the activation); shared_h[t, :] likewise with shared_w13 for every token.
//         Work unit: (expert with rows, 16 rows of F); the block's 4 warps split the hidden dimension and add their
//         partial tiles in warp order. Gated: the unit holds gate rows f0..f0+15 and up rows F+f0..F+f0+15 of the
//         same tokens; the epilogue rounds both to the layer dtype (as the stored g1 of the staged path), applies
//         act(gate) * up in fp32 (experts/act_fn.cuh) and rounds once more.
//   down  y[t, h0..h0+15] = sum over the rows r of token t of w[row_slot[r]] * (h[r] . w2[e][h0..h0+15]^T)
//         + s_t * (shared_h[t] . shared_w2[h0..h0+15]^T)   (s_t = sigmoid(shared gate logit) or 1)
//         (the second GEMM, the routing weight and the combine). One block per 16 rows of H; its 8 warps take
//         (expert, column slice) items in a fixed order, each adding into its own [T, 16] fp32 accumulator in shared
//         memory; the block sums the 8 accumulators in warp order and rounds once. No atomics: bitwise the same
//         every run.
// Both kernels read the plan on the device (no host synchronisation, capturable in CUDA graphs) and are launched
// with programmatic dependent launch so that each one's launch overlaps the previous kernel's tail.
// The expert outputs are not rounded to the layer dtype before the weighted sum (the staged path rounds them once
// when the second GEMM stores them): the sum here is the more exact one; both are within the dtype's rounding of
// the CPU specification.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/decode/skinny_mma.cuh"
#include "cuda/dispatch.cuh"
#include "cuda/experts/act_fn.cuh"
#include "cuda/moe_stages.h"

namespace switchyard {
namespace cuda {
namespace {

using decode::collect_hits;
using decode::griddep_launch_dependents;
using decode::griddep_wait;
using decode::launch_pdl;
using decode::skinny_mma;
using decode::zero_acc;

constexpr int kUpWarps = 4;
constexpr int kDownWarps = 8;
constexpr int kRowsPerTile = 16;

struct UpParams {
    const void* x;             // [T, H]
    const void* w13;           // [E, R13, H]
    const int32_t* offsets;    // [E + 1]
    const int32_t* row_token;  // [R]
    void* h;                   // [R, F]
    const void* shared_w13;    // [R13s, H] or null
    void* shared_h;            // [T, S]
    int num_tokens;
    int num_experts;
    int hidden;
    int ffn;
    int shared_ffn;  // S (0: no shared expert)
};

struct DownParams {
    const void* h;             // [R, F]
    const void* w2;            // [E, H, F]
    const int32_t* offsets;    // [E + 1]
    const int32_t* row_token;  // [R]
    const int32_t* row_slot;   // [R]
    const float* weights;      // [T * slots]
    const void* shared_h;      // [T, S] or null
    const void* shared_w2;     // [H, S] or null
    const float* shared_gate;  // [T] fp32 gate logits or null
    void* y;                   // [T, H]
    int num_tokens;
    int num_experts;
    int hidden;
    int ffn;
    int shared_ffn;
};

template <typename T, Activation kAct, int kGroups>
__global__ void __launch_bounds__(kUpWarps * 32) decode_up_kernel(UpParams p) {
    constexpr bool kGated = kAct == Activation::kSwiGLU || kAct == Activation::kGeGLU;
    constexpr int kTiles = kGated ? 2 : 1;
    constexpr int kTok = 8 * kGroups;
    constexpr int kUnroll = kGated ? 2 : 4;
    extern __shared__ int hits[];  // [E]
    __shared__ int warp_count[kUpWarps];
    __shared__ float red[kUpWarps][kTiles][kRowsPerTile][kTok + 1];
    griddep_wait();
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    const int nhit = collect_hits(p.offsets, p.num_experts, hits, warp_count);
    const int H = p.hidden, F = p.ffn, S = p.shared_ffn;
    const int tiles_f = (F + kRowsPerTile - 1) / kRowsPerTile;
    const int tiles_s = S > 0 ? (S + kRowsPerTile - 1) / kRowsPerTile : 0;
    const int units = nhit * tiles_f + tiles_s;
    const int chunks = (H + 31) / 32;
    const int per_warp = (chunks + kUpWarps - 1) / kUpWarps;
    const int c_begin = std::min(warp * per_warp, chunks) * 32, c_end = std::min((warp + 1) * per_warp, chunks) * 32;
    const T* x = static_cast<const T*>(p.x);

    for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const bool shared = u >= nhit * tiles_f;
        const T* W;
        int width, f0, rbeg, rend;
        T* out;
        if (!shared) {
            const int e = hits[u / tiles_f];
            width = F;
            f0 = (u % tiles_f) * kRowsPerTile;
            W = static_cast<const T*>(p.w13) + static_cast<int64_t>(e) * (kGated ? 2 : 1) * F * H;
            rbeg = p.offsets[e];
            rend = p.offsets[e + 1];
            out = static_cast<T*>(p.h);
        } else {
            width = S;
            f0 = (u - nhit * tiles_f) * kRowsPerTile;
            W = static_cast<const T*>(p.shared_w13);
            rbeg = 0;
            rend = p.num_tokens;
            out = static_cast<T*>(p.shared_h);
        }
        const T* w_lo[kTiles];
        const T* w_hi[kTiles];
#pragma unroll
        for (int i = 0; i < kTiles; ++i) {  // tile 0: gate (or the only) rows, tile 1: up rows
            const int base = i * width + f0;
            w_lo[i] = f0 + g < width ? W + static_cast<int64_t>(base + g) * H : nullptr;
            w_hi[i] = f0 + g + 8 < width ? W + static_cast<int64_t>(base + g + 8) * H : nullptr;
        }
        for (int r0 = rbeg; r0 < rend; r0 += kTok) {
            const T* x_row[kGroups];
#pragma unroll
            for (int gr = 0; gr < kGroups; ++gr) {
                const int r = r0 + 8 * gr + g;
                const int tok = r < rend ? (shared ? r : p.row_token[r]) : -1;
                x_row[gr] = tok >= 0 ? x + static_cast<int64_t>(tok) * H : nullptr;
            }
            float acc[kTiles][kGroups][4];
            zero_acc(acc);
            skinny_mma<T, kTiles, kGroups, kUnroll>(w_lo, w_hi, x_row, c_begin, c_end, H, acc);
            __syncthreads();  // the previous pass's epilogue has read red
#pragma unroll
            for (int i = 0; i < kTiles; ++i)
#pragma unroll
                for (int gr = 0; gr < kGroups; ++gr)
#pragma unroll
                    for (int v = 0; v < 4; ++v) red[warp][i][g + 8 * (v >> 1)][8 * gr + 2 * q + (v & 1)] = acc[i][gr][v];
            __syncthreads();
            // Epilogue: thread -> (activation row n, column i): consecutive threads store consecutive columns.
            for (int idx = threadIdx.x; idx < kTok * kRowsPerTile; idx += blockDim.x) {
                const int n = idx / kRowsPerTile, i = idx % kRowsPerTile;
                const int r = r0 + n;
                if (r >= rend || f0 + i >= width) continue;
                float v0 = 0.0f, v1 = 0.0f;
#pragma unroll
                for (int w = 0; w < kUpWarps; ++w) {
                    v0 += red[w][0][i][n];
                    if constexpr (kGated) v1 += red[w][kTiles - 1][i][n];
                }
                float hv;
                if constexpr (kGated)
                    hv = act_fn<kAct>(to_f32(from_f32<T>(v0))) * to_f32(from_f32<T>(v1));
                else
                    hv = act_fn<kAct>(to_f32(from_f32<T>(v0)));
                out[static_cast<int64_t>(r) * width + f0 + i] = from_f32<T>(hv);
            }
        }
    }
}

template <typename T, int kGroups>
__global__ void __launch_bounds__(kDownWarps * 32) decode_down_kernel(DownParams p) {
    constexpr int kTok = 8 * kGroups;
    constexpr int kUnroll = 4;
    extern __shared__ float smem[];  // [kDownWarps][T][16] accumulators, then hits [E] (int)
    __shared__ int warp_count[kDownWarps];
    const int T_ = p.num_tokens;
    float* acc_s = smem;
    int* hits = reinterpret_cast<int*>(smem + static_cast<size_t>(kDownWarps) * T_ * kRowsPerTile);
    griddep_wait();
    griddep_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    for (int i = threadIdx.x; i < kDownWarps * T_ * kRowsPerTile; i += blockDim.x) acc_s[i] = 0.0f;
    const int nhit = collect_hits(p.offsets, p.num_experts, hits, warp_count);  // its __syncthreads cover the zeroing
    const bool has_shared = p.shared_ffn > 0;
    const int groups = nhit + (has_shared ? 1 : 0);
    const int slices = groups >= kDownWarps || groups == 0 ? 1 : kDownWarps / groups;
    const int items = groups * slices;
    const int H = p.hidden, h0 = blockIdx.x * kRowsPerTile;
    float* my_acc = acc_s + static_cast<size_t>(warp) * T_ * kRowsPerTile;

    for (int it = warp; it < items; it += kDownWarps) {
        const int grp = it / slices, sl = it % slices;
        const bool shared = grp == nhit;
        const T* W;
        const T* A;
        int K, rbeg, rend;
        if (!shared) {
            const int e = hits[grp];
            K = p.ffn;
            W = static_cast<const T*>(p.w2) + static_cast<int64_t>(e) * H * K;
            A = static_cast<const T*>(p.h);
            rbeg = p.offsets[e];
            rend = p.offsets[e + 1];
        } else {
            K = p.shared_ffn;
            W = static_cast<const T*>(p.shared_w2);
            A = static_cast<const T*>(p.shared_h);
            rbeg = 0;
            rend = T_;
        }
        const int chunks = (K + 31) / 32;
        const int per = (chunks + slices - 1) / slices;
        const int c_begin = std::min(sl * per, chunks) * 32, c_end = std::min((sl + 1) * per, chunks) * 32;
        const T* w_lo[1] = {h0 + g < H ? W + static_cast<int64_t>(h0 + g) * K : nullptr};
        const T* w_hi[1] = {h0 + g + 8 < H ? W + static_cast<int64_t>(h0 + g + 8) * K : nullptr};
        for (int r0 = rbeg; r0 < rend; r0 += kTok) {
            const T* a_row[kGroups];
#pragma unroll
            for (int gr = 0; gr < kGroups; ++gr) {
                const int r = r0 + 8 * gr + g;
                a_row[gr] = r < rend ? A + static_cast<int64_t>(r) * K : nullptr;
            }
            float acc[1][kGroups][4];
            zero_acc(acc);
            skinny_mma<T, 1, kGroups, kUnroll>(w_lo, w_hi, a_row, c_begin, c_end, K, acc);
#pragma unroll
            for (int gr = 0; gr < kGroups; ++gr)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int r = r0 + 8 * gr + 2 * q + j;
                    if (r >= rend) continue;
                    int t;
                    float w;
                    if (!shared) {
                        t = p.row_token[r];
                        w = p.weights[p.row_slot[r]];
                    } else {
                        t = r;
                        w = p.shared_gate != nullptr ? 1.0f / (1.0f + expf(-p.shared_gate[t])) : 1.0f;
                    }
                    float* dst = my_acc + static_cast<size_t>(t) * kRowsPerTile;
                    dst[g] = fmaf(w, acc[0][gr][j], dst[g]);
                    dst[g + 8] = fmaf(w, acc[0][gr][2 + j], dst[g + 8]);
                }
            __syncwarp();
        }
    }
    __syncthreads();
    T* y = static_cast<T*>(p.y);
    for (int idx = threadIdx.x; idx < T_ * kRowsPerTile; idx += blockDim.x) {
        const int t = idx / kRowsPerTile, i = idx % kRowsPerTile;
        if (h0 + i >= H) continue;
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < kDownWarps; ++w) s += acc_s[(static_cast<size_t>(w) * T_ + t) * kRowsPerTile + i];
        y[static_cast<int64_t>(t) * H + h0 + i] = from_f32<T>(s);
    }
}


int sm_count() {
    int dev = 0, n = 0;
    SWITCHYARD_CUDA_CHECK(cudaGetDevice(&dev));
    SWITCHYARD_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
}

// Activation rows per pass: 8 * groups >= the rows one expert can have (at most T), capped at 32.
int token_groups(int64_t num_tokens) { return num_tokens <= 8 ? 1 : (num_tokens <= 16 ? 2 : 4); }

template <typename T, Activation kAct, int kGroups>
void launch_up(const UpParams& p, int64_t max_units, cudaStream_t stream) {
    const int blocks_per_sm = 8;
    const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_units, sm_count() * blocks_per_sm)));
    launch_pdl(decode_up_kernel<T, kAct, kGroups>, grid, kUpWarps * 32, sizeof(int) * p.num_experts, stream, p);
}

template <typename T, Activation kAct>
void launch_up_groups(const UpParams& p, int64_t max_units, cudaStream_t stream) {
    switch (token_groups(p.num_tokens)) {
        case 1: launch_up<T, kAct, 1>(p, max_units, stream); return;
        case 2: launch_up<T, kAct, 2>(p, max_units, stream); return;
        default: launch_up<T, kAct, 4>(p, max_units, stream); return;
    }
}

template <typename T>
void launch_down(const DownParams& p, cudaStream_t stream) {
    const int grid = (p.hidden + kRowsPerTile - 1) / kRowsPerTile;
    const size_t smem = sizeof(float) * kDownWarps * p.num_tokens * kRowsPerTile + sizeof(int) * p.num_experts;
    switch (token_groups(p.num_tokens)) {
        case 1: launch_pdl(decode_down_kernel<T, 1>, grid, kDownWarps * 32, smem, stream, p); return;
        case 2: launch_pdl(decode_down_kernel<T, 2>, grid, kDownWarps * 32, smem, stream, p); return;
        default: launch_pdl(decode_down_kernel<T, 4>, grid, kDownWarps * 32, smem, stream, p); return;
    }
}

}  // namespace

void decode_experts(const DecodeExpertsArgs& a, cudaStream_t stream) {
    const int64_t T = a.num_tokens;
    if (T == 0) return;
    SWITCHYARD_CHECK(T <= kDecodeMaxTokens, "decode experts: num_tokens=", T, " exceeds ", kDecodeMaxTokens);
    SWITCHYARD_CHECK(a.num_experts >= 1 && a.num_experts <= kDecodeMaxExperts, "decode experts: num_experts=",
                     a.num_experts, " must be in [1, ", kDecodeMaxExperts, "]");
    SWITCHYARD_CHECK(a.hidden % 8 == 0 && a.ffn % 8 == 0 && a.shared_ffn % 8 == 0, "decode experts: hidden_size=",
                     a.hidden, ", ffn_size=", a.ffn, " and the shared width ", a.shared_ffn,
                     " must be multiples of 8 (16-byte rows)");
    SWITCHYARD_CHECK(a.hidden <= INT32_MAX / 2 && a.ffn <= INT32_MAX / 2, "decode experts: sizes exceed int32");
    for (const void* p : std::initializer_list<const void*>{a.x, a.w13, a.w2, a.shared_w13, a.shared_w2, a.h,
                                                           a.shared_h})
        SWITCHYARD_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "decode experts: x, the weights and the scratch "
                         "must be 16-byte aligned (rows are read as 16-byte vectors)");
    UpParams up{};
    up.x = a.x;
    up.w13 = a.w13;
    up.offsets = a.expert_offsets;
    up.row_token = a.row_token;
    up.h = a.h;
    up.shared_w13 = a.shared_w13;
    up.shared_h = a.shared_h;
    up.num_tokens = static_cast<int>(T);
    up.num_experts = static_cast<int>(a.num_experts);
    up.hidden = static_cast<int>(a.hidden);
    up.ffn = static_cast<int>(a.ffn);
    up.shared_ffn = a.shared_w13 != nullptr ? static_cast<int>(a.shared_ffn) : 0;
    DownParams down{};
    down.h = a.h;
    down.w2 = a.w2;
    down.offsets = a.expert_offsets;
    down.row_token = a.row_token;
    down.row_slot = a.row_slot;
    down.weights = a.topk_weights;
    down.shared_h = a.shared_w13 != nullptr ? a.shared_h : nullptr;
    down.shared_w2 = a.shared_w13 != nullptr ? a.shared_w2 : nullptr;
    down.shared_gate = a.shared_gate;
    down.y = a.y;
    down.num_tokens = up.num_tokens;
    down.num_experts = up.num_experts;
    down.hidden = up.hidden;
    down.ffn = up.ffn;
    down.shared_ffn = up.shared_ffn;
    // Units of the up kernel: at most min(E, rows) experts have rows.
    const int64_t max_hits = std::min<int64_t>(a.num_experts, a.max_rows);
    const int64_t max_units = max_hits * ceil_div<int64_t>(a.ffn, kRowsPerTile) +
                              (up.shared_ffn > 0 ? ceil_div<int64_t>(up.shared_ffn, kRowsPerTile) : 0);
    const DType dt = a.dtype;
    SWITCHYARD_CHECK(dt == DType::kBF16 || dt == DType::kF16, "decode experts: dtype=", to_string(dt),
                     " (bf16 or fp16 only)");
    dispatch_float_dtype(dt, "decode experts", [&](auto tag) {
        using T_ = typename decltype(tag)::type;
        if constexpr (std::is_same<T_, float>::value) {
            SWITCHYARD_FAIL("decode experts: fp32 is not supported");
        } else {
            switch (a.activation) {
                case Activation::kSwiGLU: launch_up_groups<T_, Activation::kSwiGLU>(up, max_units, stream); break;
                case Activation::kGeGLU: launch_up_groups<T_, Activation::kGeGLU>(up, max_units, stream); break;
                case Activation::kGELU: launch_up_groups<T_, Activation::kGELU>(up, max_units, stream); break;
                case Activation::kReLU: launch_up_groups<T_, Activation::kReLU>(up, max_units, stream); break;
            }
            launch_down<T_>(down, stream);
        }
    });
}

}  // namespace cuda
}  // namespace switchyard
