// src/cuda/gemm/grouped_gemm_simt.cuh: the fp32 SIMT building blocks shared by the forward (grouped_gemm.cu) and the
// gradient (grouped_gemm_backward.cu) grouped GEMMs: a 64x64 output tile per 256-thread block, each thread a 4x4
// micro-tile accumulated in fp32 over the reduction index in increasing order (bitwise reproducible), operands staged
// through shared memory in slabs of 16 along the reduction with coalesced loads whichever index is contiguous, and
// the map from a block's linear row-tile index onto (group, rows) read from the device offsets.
#pragma once

#include <cstdint>

namespace switchyard {
namespace cuda {
namespace simt {

constexpr int kTile = 64;      // output tile rows and columns
constexpr int kSlab = 16;      // reduction slab
constexpr int kThreads = 256;  // 16 x 16 threads, each a 4x4 micro-tile

// Stages the 64 x 16 slab X(i, q0 + q) (i < 64, q < 16) of an operand into xs[q][i], zero outside i < i_len,
// q0 + q < q_len. kQContig: X(i, q) = x[i * ld + q]; otherwise X(i, q) = x[q * ld + i]. Threads walk the contiguous
// index fastest (coalesced loads).
template <bool kQContig>
__device__ __forceinline__ void load_slab(float (*xs)[kTile + 4], const float* x, int64_t ld, int i_len, int q0,
                                          int q_len) {
    static_assert(kTile * kSlab == 4 * kThreads, "each thread stages 4 elements per operand");
    const int tid = threadIdx.x;
    if (kQContig) {
        const int lq = tid % kSlab, li = tid / kSlab;
        const int q = q0 + lq;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const int i = li + 16 * t;
            xs[lq][i] = (i < i_len && q < q_len) ? x[static_cast<int64_t>(i) * ld + q] : 0.0f;
        }
    } else {
        const int li = tid % kTile, lq = tid / kTile;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const int q = lq + 4 * t;
            xs[q][li] = (li < i_len && q0 + q < q_len) ? x[static_cast<int64_t>(q0 + q) * ld + li] : 0.0f;
        }
    }
}

// c[i, j] = sum_{q < q_len} A(i, q) * B(j, q) for i < min(64, m_len), j < min(64, j_len) (c row-major, ldc).
template <bool kAQContig, bool kBQContig>
__device__ __forceinline__ void simt_tile(const float* a, int64_t lda, int m_len, const float* b, int64_t ldb,
                                          int j_len, int q_len, float* c, int64_t ldc) {
    __shared__ float as[kSlab][kTile + 4];
    __shared__ float bs[kSlab][kTile + 4];
    const int tx = threadIdx.x % 16;  // column micro-tile
    const int ty = threadIdx.x / 16;  // row micro-tile
    float acc[4][4] = {};
    for (int q0 = 0; q0 < q_len; q0 += kSlab) {
        load_slab<kAQContig>(as, a, lda, m_len, q0, q_len);
        load_slab<kBQContig>(bs, b, ldb, j_len, q0, q_len);
        __syncthreads();
#pragma unroll
        for (int q = 0; q < kSlab; ++q) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                av[i] = as[q][ty * 4 + i];
                bv[i] = bs[q][tx * 4 + i];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = ty * 4 + i;
        if (r >= m_len) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int cj = tx * 4 + j;
            if (cj < j_len) c[static_cast<int64_t>(r) * ldc + cj] = acc[i][j];
        }
    }
}

// Row tile `tile` of the groups' 64-row tiles (a group of m rows has ceil(m / 64) of them, in group order): its
// group (-1 past the last group), first row and row count. Thread 0 walks the offsets; the block shares the answer.
struct RowTile {
    int group;
    int row0;
    int rows;
};

__device__ __forceinline__ RowTile row_tile_of(int64_t tile, const int32_t* offsets, int num_groups) {
    __shared__ RowTile s_tile;
    if (threadIdx.x == 0) {
        RowTile t{-1, 0, 0};
        for (int e = 0; e < num_groups; ++e) {
            const int begin = offsets[e];
            const int m = offsets[e + 1] - begin;
            const int64_t tiles = (m + kTile - 1) / kTile;
            if (tile < tiles) {
                t.group = e;
                t.row0 = begin + static_cast<int>(tile) * kTile;
                t.rows = min(kTile, m - static_cast<int>(tile) * kTile);
                break;
            }
            tile -= tiles;
        }
        s_tile = t;
    }
    __syncthreads();
    return s_tile;
}

}  // namespace simt
}  // namespace cuda
}  // namespace switchyard
