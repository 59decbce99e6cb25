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
#include "cuda/gemm/sm90/grouped_gemm_sm90.h"
#include "cuda/experts/act_fn.cuh"
#include "cuda/moe_stages.h"
#include "switchyard/stages.h"

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

// FP8 layers (W8A8): the quantised activation rows and their scales (quantize_rows_fp8's layout: the scale of row r
// and 128-column block j at a_scale[j * a_rows + r] for one group of a_rows rows), and the weight scales.
struct Fp8Operands {
    bool per_tensor = false;        // fp8-tensor: one weight scale per matrix
    const uint8_t* xq = nullptr;    // [T, H] x in e4m3 (up) / h in e4m3 [R, F] (down)
    const float* xs = nullptr;      // up: [B(H)][T]; down: per expert group e at offsets[e] * B(F), [B(F)][rows_e]
    const uint8_t* sq = nullptr;    // down: shared_h in e4m3 [T, S]
    const float* ss = nullptr;      // down: its scales [B(S)][T]
    const float* w_scale = nullptr;         // w13_scale [E, B(R13), B(H)] (up) / w2_scale [E, B(H), B(F)] (down), or [E]
    const float* shared_w_scale = nullptr;  // shared_w13_scale [B(R13s), B(H)] / shared_w2_scale [B(H), B(S)], or [1]
};

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
    bool gate_up_interleaved;  // routed experts' w13 rows interleaved (config.h gate_up_interleaved_row); gated only
    Fp8Operands fp8;  // FP8 layers only: x quantised, the weight scales
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
    Fp8Operands fp8;
};

// The weight / activation element of a path: the layer dtype, or e4m3 codes (bytes) for FP8 layers.
template <typename T, bool kFp8>
using Elem = typename std::conditional<kFp8, uint8_t, T>::type;

// This warp's share [begin, end) of the K dimension in granules: 32-column chunks (16-bit operands) or 128-column
// scale blocks (fp8: a block's partial is scaled as a whole).
struct Slice {
    int begin, end;
};
__device__ __forceinline__ Slice k_slice(int K, bool fp8, int part, int parts) {
    const int gran = fp8 ? 128 : 32;
    const int n = (K + gran - 1) / gran, per = (n + parts - 1) / parts;
    return {std::min(part * per, n), std::min((part + 1) * per, n)};
}

// acc += W tiles x activation rows over slice sl, for either operand type.
template <typename T, bool kFp8, int kTiles, int kGroups, int kUnroll>
__device__ __forceinline__ void tile_mma(const Elem<T, kFp8>* const (&w_lo)[kTiles],
                                         const Elem<T, kFp8>* const (&w_hi)[kTiles],
                                         const Elem<T, kFp8>* const (&a_row)[kGroups], Slice sl, int K,
                                         const decode::Fp8Scales<kTiles, kGroups>& sc,
                                         float (&acc)[kTiles][kGroups][4]) {
    if constexpr (kFp8) {
        decode::skinny_mma_fp8<kTiles, kGroups>(w_lo, w_hi, a_row, sl.begin, sl.end, K, sc, acc);
    } else {
        (void)sc;
        skinny_mma<T, kTiles, kGroups, kUnroll>(w_lo, w_hi, a_row, sl.begin * 32, sl.end * 32, K, acc);
    }
}

inline __device__ int blocks128(int n) { return (n + 127) / 128; }

template <typename T, Activation kAct, int kGroups, bool kFp8>
__global__ void __launch_bounds__(kUpWarps * 32) decode_up_kernel(UpParams p) {
    using E8 = Elem<T, kFp8>;
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
    const int H = p.hidden, F = p.ffn, S = p.shared_ffn, T_ = p.num_tokens;
    const int tiles_f = (F + kRowsPerTile - 1) / kRowsPerTile;
    const int tiles_s = S > 0 ? (S + kRowsPerTile - 1) / kRowsPerTile : 0;
    const int units = nhit * tiles_f + tiles_s;
    const Slice sl = k_slice(H, kFp8, warp, kUpWarps);
    const E8* x = kFp8 ? reinterpret_cast<const E8*>(p.fp8.xq) : static_cast<const E8*>(p.x);

    for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const bool shared = u >= nhit * tiles_f;
        const E8* W;
        int width, f0, rbeg, rend, e = 0;
        T* out;
        if (!shared) {
            e = hits[u / tiles_f];
            width = F;
            f0 = (u % tiles_f) * kRowsPerTile;
            W = static_cast<const E8*>(p.w13) + static_cast<int64_t>(e) * (kGated ? 2 : 1) * F * H;
            rbeg = p.offsets[e];
            rend = p.offsets[e + 1];
            out = static_cast<T*>(p.h);
        } else {
            width = S;
            f0 = (u - nhit * tiles_f) * kRowsPerTile;
            W = static_cast<const E8*>(p.shared_w13);
            rbeg = 0;
            rend = T_;
            out = static_cast<T*>(p.shared_h);
        }
        const E8* w_lo[kTiles];
        const E8* w_hi[kTiles];
        decode::Fp8Scales<kTiles, kGroups> sc{};
        // The rows of gate / up f = f0 + g and f0 + g + 8: i * width + f, or in a routed expert's interleaved w13
        // gate_up_interleaved_row(f, i) (kRowsPerTile = 16 rows of f: two blocks of 8).
        const bool interleaved = kGated && !shared && p.gate_up_interleaved;
#pragma unroll
        for (int i = 0; i < kTiles; ++i) {  // tile 0: gate (or the only) rows, tile 1: up rows
            const int base = i * width + f0;
            const int64_t row_lo = interleaved ? gate_up_interleaved_row(f0 + g, i) : base + g;
            const int64_t row_hi = interleaved ? gate_up_interleaved_row(f0 + g + 8, i) : base + g + 8;
            w_lo[i] = f0 + g < width ? W + row_lo * H : nullptr;
            w_hi[i] = f0 + g + 8 < width ? W + row_hi * H : nullptr;
            if constexpr (kFp8) {  // the weight scale row of the tile's 128-row block (or the matrix's one scale)
                const int rows_b = blocks128(kTiles * width), kb = blocks128(H);
                if (p.fp8.per_tensor)
                    sc.w[i] = shared ? p.fp8.shared_w_scale : p.fp8.w_scale + e;
                else
                    sc.w[i] = (shared ? p.fp8.shared_w_scale
                                      : p.fp8.w_scale + static_cast<int64_t>(e) * rows_b * kb) +
                              static_cast<int64_t>(base / 128) * kb;
            }
        }
        sc.w_stride = p.fp8.per_tensor ? 0 : 1;
        sc.a_stride = T_;
        for (int r0 = rbeg; r0 < rend; r0 += kTok) {
            const E8* x_row[kGroups];
#pragma unroll
            for (int gr = 0; gr < kGroups; ++gr) {
                const int r = r0 + 8 * gr + g;
                const int tok = r < rend ? (shared ? r : p.row_token[r]) : -1;
                x_row[gr] = tok >= 0 ? x + static_cast<int64_t>(tok) * H : nullptr;
                if constexpr (kFp8) {  // the activation scales of this lane's accumulator rows 2q, 2q + 1
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        const int ra = r0 + 8 * gr + 2 * q + j;
                        const int ta = ra < rend ? (shared ? ra : p.row_token[ra]) : -1;
                        sc.a[gr][j] = ta >= 0 ? p.fp8.xs + ta : nullptr;
                    }
                }
            }
            float acc[kTiles][kGroups][4];
            zero_acc(acc);
            tile_mma<T, kFp8, kTiles, kGroups, kUnroll>(w_lo, w_hi, x_row, sl, H, sc, acc);
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
                    hv = act_fn<kAct, kFastAct<T>>(to_f32(from_f32<T>(v0))) * to_f32(from_f32<T>(v1));
                else
                    hv = act_fn<kAct, kFastAct<T>>(to_f32(from_f32<T>(v0)));
                out[static_cast<int64_t>(r) * width + f0 + i] = from_f32<T>(hv);
            }
        }
    }
}

template <typename T, int kGroups, bool kFp8>
__global__ void __launch_bounds__(kDownWarps * 32) decode_down_kernel(DownParams p) {
    using E8 = Elem<T, kFp8>;
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
        const E8* W;
        const E8* A;
        int K, rbeg, rend, e = 0;
        decode::Fp8Scales<1, kGroups> sc{};
        if (!shared) {
            e = hits[grp];
            K = p.ffn;
            W = static_cast<const E8*>(p.w2) + static_cast<int64_t>(e) * H * K;
            A = kFp8 ? reinterpret_cast<const E8*>(p.fp8.xq) : static_cast<const E8*>(p.h);
            rbeg = p.offsets[e];
            rend = p.offsets[e + 1];
        } else {
            K = p.shared_ffn;
            W = static_cast<const E8*>(p.shared_w2);
            A = kFp8 ? reinterpret_cast<const E8*>(p.fp8.sq) : static_cast<const E8*>(p.shared_h);
            rbeg = 0;
            rend = T_;
        }
        if constexpr (kFp8) {
            const int kb = blocks128(K);
            if (p.fp8.per_tensor)
                sc.w[0] = shared ? p.fp8.shared_w_scale : p.fp8.w_scale + e;
            else
                sc.w[0] = (shared ? p.fp8.shared_w_scale
                                  : p.fp8.w_scale + static_cast<int64_t>(e) * blocks128(H) * kb) +
                          static_cast<int64_t>(h0 / 128) * kb;
            sc.w_stride = p.fp8.per_tensor ? 0 : 1;
            sc.a_stride = rend - rbeg;  // the scales of a group of rows: [blocks][rows of the group]
        }
        const Slice ks = k_slice(K, kFp8, sl, slices);
        const E8* w_lo[1] = {h0 + g < H ? W + static_cast<int64_t>(h0 + g) * K : nullptr};
        const E8* w_hi[1] = {h0 + g + 8 < H ? W + static_cast<int64_t>(h0 + g + 8) * K : nullptr};
        for (int r0 = rbeg; r0 < rend; r0 += kTok) {
            const E8* a_row[kGroups];
#pragma unroll
            for (int gr = 0; gr < kGroups; ++gr) {
                const int r = r0 + 8 * gr + g;
                a_row[gr] = r < rend ? A + static_cast<int64_t>(r) * K : nullptr;
                if constexpr (kFp8) {
                    const float* base = shared ? p.fp8.ss : p.fp8.xs + static_cast<int64_t>(rbeg) * blocks128(K);
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        const int ra = r0 + 8 * gr + 2 * q + j;
                        sc.a[gr][j] = ra < rend ? base + (ra - rbeg) : nullptr;
                    }
                }
            }
            float acc[1][kGroups][4];
            zero_acc(acc);
            tile_mma<T, kFp8, 1, kGroups, kUnroll>(w_lo, w_hi, a_row, ks, K, sc, acc);
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

// Activation rows per pass: 8 * groups >= the rows one expert can have (at most T), capped at 32.
int token_groups(int64_t num_tokens) { return num_tokens <= 8 ? 1 : (num_tokens <= 16 ? 2 : 4); }

template <typename T, Activation kAct, int kGroups, bool kFp8>
void launch_up(const UpParams& p, int64_t max_units, cudaStream_t stream) {
    const int blocks_per_sm = 8;
    const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_units, device_facts().sm_count * blocks_per_sm)));
    launch_pdl(decode_up_kernel<T, kAct, kGroups, kFp8>, grid, kUpWarps * 32, sizeof(int) * p.num_experts, stream,
               p);
}

template <typename T, Activation kAct, bool kFp8>
void launch_up_groups(const UpParams& p, int64_t max_units, cudaStream_t stream) {
    switch (token_groups(p.num_tokens)) {
        case 1: launch_up<T, kAct, 1, kFp8>(p, max_units, stream); return;
        case 2: launch_up<T, kAct, 2, kFp8>(p, max_units, stream); return;
        default: launch_up<T, kAct, 4, kFp8>(p, max_units, stream); return;
    }
}

template <typename T, bool kFp8>
void launch_up_act(Activation act, const UpParams& p, int64_t max_units, cudaStream_t stream) {
    switch (act) {
        case Activation::kSwiGLU: launch_up_groups<T, Activation::kSwiGLU, kFp8>(p, max_units, stream); return;
        case Activation::kGeGLU: launch_up_groups<T, Activation::kGeGLU, kFp8>(p, max_units, stream); return;
        case Activation::kGELU: launch_up_groups<T, Activation::kGELU, kFp8>(p, max_units, stream); return;
        case Activation::kReLU: launch_up_groups<T, Activation::kReLU, kFp8>(p, max_units, stream); return;
    }
    SWITCHYARD_FAIL("decode experts: activation=", static_cast<int>(act), " is not supported");
}

template <typename T, bool kFp8>
void launch_down(const DownParams& p, cudaStream_t stream) {
    const int grid = (p.hidden + kRowsPerTile - 1) / kRowsPerTile;
    const size_t smem = sizeof(float) * kDownWarps * p.num_tokens * kRowsPerTile + sizeof(int) * p.num_experts;
    switch (token_groups(p.num_tokens)) {
        case 1: launch_pdl(decode_down_kernel<T, 1, kFp8>, grid, kDownWarps * 32, smem, stream, p); return;
        case 2: launch_pdl(decode_down_kernel<T, 2, kFp8>, grid, kDownWarps * 32, smem, stream, p); return;
        default: launch_pdl(decode_down_kernel<T, 4, kFp8>, grid, kDownWarps * 32, smem, stream, p); return;
    }
}

}  // namespace

DecodeFp8Scratch carve_decode_fp8(WorkspaceCarver& wc, int64_t num_tokens, int64_t hidden, int64_t ffn,
                                  int64_t max_rows, int64_t shared_ffn) {
    DecodeFp8Scratch s;
    s.one_group = wc.take<int32_t>(2);
    s.xq = wc.take_bytes(static_cast<size_t>(num_tokens * hidden));
    s.xs = wc.take<float>(static_cast<size_t>(fp8_blocks(hidden) * num_tokens));
    s.hq = wc.take_bytes(static_cast<size_t>(max_rows * ffn));
    s.hs = wc.take<float>(static_cast<size_t>(fp8_blocks(ffn) * max_rows));
    s.sq = wc.take_bytes(static_cast<size_t>(num_tokens * shared_ffn));
    s.ss = wc.take<float>(static_cast<size_t>(fp8_blocks(shared_ffn) * num_tokens));
    return s;
}

void decode_experts(const DecodeExpertsArgs& a, cudaStream_t stream) {
    const int64_t T = a.num_tokens;
    if (T == 0) return;
    const bool fp8 = a.quant_mode != QuantMode::kNone;
    const int64_t align = fp8 ? 16 : 8;  // elements per 16-byte row granule (fp8: also the 16-row tiles' blocks)
    SWITCHYARD_CHECK(T <= kDecodeMaxTokens, "decode experts: num_tokens=", T, " exceeds ", kDecodeMaxTokens);
    SWITCHYARD_CHECK(a.num_experts >= 1 && a.num_experts <= kDecodeMaxExperts, "decode experts: num_experts=",
                     a.num_experts, " must be in [1, ", kDecodeMaxExperts, "]");
    SWITCHYARD_CHECK(a.hidden % align == 0 && a.ffn % align == 0 && a.shared_ffn % align == 0,
                     "decode experts: hidden_size=", a.hidden, ", ffn_size=", a.ffn, " and the shared width ",
                     a.shared_ffn, " must be multiples of ", align, " (16-byte rows)");
    SWITCHYARD_CHECK(a.hidden <= INT32_MAX / 2 && a.ffn <= INT32_MAX / 2, "decode experts: sizes exceed int32");
    SWITCHYARD_CHECK(!a.gate_up_interleaved || (is_gated(a.activation) && a.quant_mode == QuantMode::kNone),
                     "decode experts: an interleaved w13 needs a gated activation and float weights");
    for (const void* p : std::initializer_list<const void*>{a.x, a.w13, a.w2, a.shared_w13, a.shared_w2, a.h,
                                                           a.shared_h})
        SWITCHYARD_CHECK(aligned16(p), "decode experts: x, the weights and the scratch "
                         "must be 16-byte aligned (rows are read as 16-byte vectors)");
    const bool shared = a.shared_w13 != nullptr;
    if (fp8)
        SWITCHYARD_CHECK(a.w13_scale != nullptr && a.w2_scale != nullptr &&
                             (!shared || (a.shared_w13_scale != nullptr && a.shared_w2_scale != nullptr)),
                         "decode experts: FP8 weights need their scales (a float shared expert beside FP8 experts "
                         "takes the staged path)");
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
    up.shared_ffn = shared ? static_cast<int>(a.shared_ffn) : 0;
    up.gate_up_interleaved = a.gate_up_interleaved;
    DownParams down{};
    down.h = a.h;
    down.w2 = a.w2;
    down.offsets = a.expert_offsets;
    down.row_token = a.row_token;
    down.row_slot = a.row_slot;
    down.weights = a.topk_weights;
    down.shared_h = shared ? a.shared_h : nullptr;
    down.shared_w2 = shared ? a.shared_w2 : nullptr;
    down.shared_gate = a.shared_gate;
    down.y = a.y;
    down.num_tokens = up.num_tokens;
    down.num_experts = up.num_experts;
    down.hidden = up.hidden;
    down.ffn = up.ffn;
    down.shared_ffn = up.shared_ffn;
    if (fp8) {
        const bool per_tensor = a.quant_mode == QuantMode::kFP8Tensor;
        const DecodeFp8Scratch& s = a.fp8;
        up.fp8.per_tensor = down.fp8.per_tensor = per_tensor;
        up.fp8.xq = static_cast<const uint8_t*>(s.xq);
        up.fp8.xs = s.xs;
        up.fp8.w_scale = a.w13_scale;
        up.fp8.shared_w_scale = a.shared_w13_scale;
        down.fp8.xq = static_cast<const uint8_t*>(s.hq);
        down.fp8.xs = s.hs;
        down.fp8.sq = static_cast<const uint8_t*>(s.sq);
        down.fp8.ss = s.ss;
        down.fp8.w_scale = a.w2_scale;
        down.fp8.shared_w_scale = a.shared_w2_scale;
    }
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
        } else if (!fp8) {
            launch_up_act<T_, false>(a.activation, up, max_units, stream);
            launch_down<T_, false>(down, stream);
        } else {
            // W8A8 (the recipe): x quantised per token (and 128 channels in block mode) as one group of T rows,
            // the up kernel, then h (per expert group of rows) and the shared expert's h quantised the same way.
            const bool per_row = a.quant_mode == QuantMode::kFP8Tensor;
            const DecodeFp8Scratch& s = a.fp8;
            write_single_group_offsets(s.one_group, T, stream);
            quantize_rows_fp8(dt, a.x, T, a.hidden, s.one_group, 1, per_row, nullptr, s.xq, s.xs, stream);
            launch_up_act<T_, true>(a.activation, up, max_units, stream);
            quantize_rows_fp8(dt, a.h, a.max_rows, a.ffn, a.expert_offsets, a.num_experts, per_row, nullptr, s.hq,
                              s.hs, stream);
            if (shared)
                quantize_rows_fp8(dt, a.shared_h, T, a.shared_ffn, s.one_group, 1, per_row, nullptr, s.sq, s.ss,
                                  stream);
            launch_down<T_, true>(down, stream);
        }
    });
}

}  // namespace cuda
}  // namespace switchyard
