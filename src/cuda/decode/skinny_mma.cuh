// src/cuda/decode/skinny_mma.cuh: the inner loop of the small-batch (decode) kernels: a warp multiplies 16 rows of
// a weight matrix by up to 8 * kGroups activation rows ("tokens") on the tensor cores, streaming the weights once.
//
// C[16, 8 kGroups] += W[16 rows, columns] . X[8 kGroups rows, columns]^T, fp32 accumulation, with mma.sync
// m16n8k16 (bf16 or fp16 operands). The k index inside each 32-column chunk is permuted so that every lane reads
// 16 contiguous bytes of each operand (a dot product does not depend on the order of its k terms as long as A and
// B use the same one): lane l = 4 g + q reads columns [c + 8q, c + 8q + 8) of weight rows g and g + 8 and of
// activation row g of each group of 8. Its first mma takes columns 8q..8q+3 (fragment k = 2q, 2q+1, 2q+8, 2q+9),
// the second 8q+4..8q+7.
// Accumulator layout (mma.m16n8 C fragment): acc[i][gr][0], [1]: weight row g, activation rows 8 gr + 2q, 2q + 1;
// acc[i][gr][2], [3]: weight row g + 8, the same activation rows.
// A null row pointer reads zeros (rows past the matrix, activation slots past the last row of a group).
// Columns: chunks [c_begin, c_end) in steps of 32 (c_begin a multiple of 32), columns >= K read as zeros; K must be
// a multiple of 8 and every row 16-byte aligned (the launchers check). Also here: the PDL device controls, the
// list of experts with rows, and the host launch helper shared by decode_route.cu and decode_experts.cu.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "switchyard/cuda_check.h"

namespace switchyard {
namespace cuda {
namespace decode {

// Weights are read once per forward: bypass L1 (they would only evict the activation rows).
__device__ __forceinline__ uint4 load_weight16(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

// Activation rows are re-read by every row tile of the same expert: through L1.
__device__ __forceinline__ uint4 load_act16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        static_assert(std::is_same<T, __half>::value, "skinny_mma: bf16 or fp16 operands");
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}

template <int kTiles, int kGroups>
__device__ __forceinline__ void zero_acc(float (&acc)[kTiles][kGroups][4]) {
#pragma unroll
    for (int i = 0; i < kTiles; ++i)
#pragma unroll
        for (int g = 0; g < kGroups; ++g)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[i][g][v] = 0.0f;
}

// kTiles weight tiles share the activation rows (gate and up projections of a gated MLP); kUnroll chunks of 32
// columns are loaded before any of them is multiplied (the bytes in flight per lane).
// w_lo[i] / w_hi[i]: this lane's rows g and g + 8 of tile i; x_row[gr]: this lane's activation row of group gr.
template <typename T, int kTiles, int kGroups, int kUnroll>
__device__ __forceinline__ void skinny_mma(const T* const (&w_lo)[kTiles], const T* const (&w_hi)[kTiles],
                                           const T* const (&x_row)[kGroups], int c_begin, int c_end, int K,
                                           float (&acc)[kTiles][kGroups][4]) {
    const int q8 = (threadIdx.x & 3) * 8;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    for (int c = c_begin; c < c_end; c += 32 * kUnroll) {
        uint4 wl[kUnroll][kTiles], wh[kUnroll][kTiles], xv[kUnroll][kGroups];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int col = c + 32 * u + q8;
            const bool ok = c + 32 * u < c_end && col < K;
#pragma unroll
            for (int i = 0; i < kTiles; ++i) {
                wl[u][i] = (ok && w_lo[i] != nullptr) ? load_weight16(w_lo[i] + col) : zero;
                wh[u][i] = (ok && w_hi[i] != nullptr) ? load_weight16(w_hi[i] + col) : zero;
            }
#pragma unroll
            for (int g = 0; g < kGroups; ++g) xv[u][g] = (ok && x_row[g] != nullptr) ? load_act16(x_row[g] + col) : zero;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
            for (int i = 0; i < kTiles; ++i)
#pragma unroll
                for (int g = 0; g < kGroups; ++g) {
                    mma_m16n8k16<T>(acc[i][g], wl[u][i].x, wh[u][i].x, wl[u][i].y, wh[u][i].y, xv[u][g].x,
                                    xv[u][g].y);
                    mma_m16n8k16<T>(acc[i][g], wl[u][i].z, wh[u][i].z, wl[u][i].w, wh[u][i].w, xv[u][g].z,
                                    xv[u][g].w);
                }
    }
}

// ---- FP8 (W8A8, the recipe of switchyard/stages.h) --------------------------------------------------------------
// e4m3 weights and activations with fp32 scales per 128 columns: mma.m16n8k32 (e4m3 x e4m3 -> fp32) over each
// 128-column block into a partial, then acc += partial * s_w * s_a (the block's weight scale of the tile and the
// activation scale of the accumulator's row), as DeepSeek-V3's recipe promotes the FP8 products every 128 elements.
// The lane layout is the bf16 one with 16 fp8 bytes per lane: lane 4g + q reads columns [c + 16q, c + 16q + 16) of
// rows g, g + 8 and of activation row g; bytes 0-3 / 4-7 feed the first mma (fragment k 4q..4q+3 / 4q+16..4q+19),
// bytes 8-11 / 12-15 the second (CUTLASS's SM89_16x8x32 traits; the same register pattern as skinny_mma).
__device__ __forceinline__ void mma_m16n8k32_e4m3(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Scales of one 16-row weight tile (both rows of the lane lie in one 128-row block: tiles start at multiples of 16)
// and of the lane's two accumulator activation rows per group: value at block kb = ptr[kb * stride] (stride 0: one
// scale for every block, per-tensor weights). A null activation pointer stands for a row past the end (scale 0).
template <int kTiles, int kGroups>
struct Fp8Scales {
    const float* w[kTiles];
    int w_stride;
    const float* a[kGroups][2];
    int a_stride;
};

// acc[i][gr] += sum over the 128-column blocks kb in [kb_begin, kb_end) of s_w * s_a * (W_i[16 rows, kb] .
// X_gr[8 rows, kb]^T), fp8 operands (rows of K bytes, K a multiple of 16, 16-byte aligned; columns >= K read as 0).
template <int kTiles, int kGroups>
__device__ __forceinline__ void skinny_mma_fp8(const uint8_t* const (&w_lo)[kTiles],
                                               const uint8_t* const (&w_hi)[kTiles],
                                               const uint8_t* const (&x_row)[kGroups], int kb_begin, int kb_end,
                                               int K, const Fp8Scales<kTiles, kGroups>& sc,
                                               float (&acc)[kTiles][kGroups][4]) {
    const int q16 = (threadIdx.x & 3) * 16;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    // Both 64-column halves of a block in flight at once, unless that many registers would spill (gated tiles with
    // 32 activation rows): then one half at a time.
    constexpr int kInFlight = 2 * kTiles + kGroups > 6 ? 1 : 2;
    for (int kb = kb_begin; kb < kb_end; ++kb) {
        float part[kTiles][kGroups][4];
        zero_acc(part);
#pragma unroll
        for (int u0 = 0; u0 < 2; u0 += kInFlight) {
            uint4 wl[kInFlight][kTiles], wh[kInFlight][kTiles], xv[kInFlight][kGroups];
#pragma unroll
            for (int u = 0; u < kInFlight; ++u) {
                const int col = kb * 128 + 64 * (u0 + u) + q16;
                const bool ok = col < K;
#pragma unroll
                for (int i = 0; i < kTiles; ++i) {
                    wl[u][i] = (ok && w_lo[i] != nullptr) ? load_weight16(w_lo[i] + col) : zero;
                    wh[u][i] = (ok && w_hi[i] != nullptr) ? load_weight16(w_hi[i] + col) : zero;
                }
#pragma unroll
                for (int g = 0; g < kGroups; ++g)
                    xv[u][g] = (ok && x_row[g] != nullptr) ? load_act16(x_row[g] + col) : zero;
            }
#pragma unroll
            for (int u = 0; u < kInFlight; ++u)
#pragma unroll
                for (int i = 0; i < kTiles; ++i)
#pragma unroll
                    for (int g = 0; g < kGroups; ++g) {
                        mma_m16n8k32_e4m3(part[i][g], wl[u][i].x, wh[u][i].x, wl[u][i].y, wh[u][i].y, xv[u][g].x,
                                          xv[u][g].y);
                        mma_m16n8k32_e4m3(part[i][g], wl[u][i].z, wh[u][i].z, wl[u][i].w, wh[u][i].w, xv[u][g].z,
                                          xv[u][g].w);
                    }
        }
#pragma unroll
        for (int i = 0; i < kTiles; ++i) {
            const float sw = sc.w[i] != nullptr ? sc.w[i][kb * sc.w_stride] : 0.0f;
#pragma unroll
            for (int g = 0; g < kGroups; ++g)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const float sa = sc.a[g][j] != nullptr ? sc.a[g][j][kb * sc.a_stride] : 0.0f;
                    acc[i][g][j] = fmaf(part[i][g][j] * sw, sa, acc[i][g][j]);
                    acc[i][g][2 + j] = fmaf(part[i][g][2 + j] * sw, sa, acc[i][g][2 + j]);
                }
        }
    }
}

// Programmatic dependent launch (sm90): wait until the kernels this one depends on have finished and their memory
// is visible; let the next kernel in the stream start launching (it waits on its own griddep_wait before reading
// anything this kernel writes). Both are no-ops for a kernel launched without the PDL attribute.
__device__ __forceinline__ void griddep_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void griddep_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;"); }

// The experts with at least one row (offsets[e + 1] > offsets[e]), ascending, into hits (shared memory, >= E
// entries); returns their number. Every thread of the block calls it; warp_count: shared int[blockDim.x / 32].
__device__ __forceinline__ int collect_hits(const int32_t* __restrict__ offsets, int E, int* hits, int* warp_count) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int total = 0;
    for (int base = 0; base < E; base += blockDim.x) {
        const int e = base + threadIdx.x;
        const bool hit = e < E && offsets[e + 1] > offsets[e];
        const unsigned m = __ballot_sync(0xffffffffu, hit);
        if (lane == 0) warp_count[warp] = __popc(m);
        __syncthreads();
        int before = total;
        for (int w = 0; w < warp; ++w) before += warp_count[w];
        if (hit) hits[before + __popc(m & ((1u << lane) - 1u))] = e;
        for (int w = 0; w < warps; ++w) total += warp_count[w];
        __syncthreads();
    }
    return total;
}

// Host: launches kernel(params) with the programmatic-stream-serialization attribute (PDL); the decode kernels call
// griddep_wait before reading anything an earlier kernel wrote.
template <typename Kernel, typename Params>
inline void launch_pdl(Kernel kernel, int grid, int threads, size_t smem, cudaStream_t stream, const Params& params) {
    cudaLaunchConfig_t lc{};
    lc.gridDim = dim3(static_cast<unsigned>(grid));
    lc.blockDim = dim3(static_cast<unsigned>(threads));
    lc.dynamicSmemBytes = smem;
    lc.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    lc.attrs = attr;
    lc.numAttrs = 1;
    SWITCHYARD_CUDA_CHECK(cudaLaunchKernelEx(&lc, kernel, params));
}

}  // namespace decode
}  // namespace cuda
}  // namespace switchyard
