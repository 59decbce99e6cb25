// src/cuda/fp8/quantize.cu: FP8 activation quantisation and weight-scale layout for the FP8 grouped GEMM
// (declarations and contracts: src/cuda/moe_stages.h, "FP8 activations and scales"; the recipe: switchyard/stages.h).
//
// quantize_rows_fp8: one thread block per row (rows past offsets[E] exit at once). fp8-block: a warp per group of
// 128 channels, 4 channels per lane (one 8- or 16-byte load, one 4-byte store of codes), the amax reduced with
// shuffles; fp8-tensor: the block reduces the row's amax (or reads the static scale), then quantises the row.
// Arithmetic as the CPU specification (src/ref/stages_ref.cpp, quantize_row_fp8): amax of |x| in fp32, scale =
// amax / 448 and x / scale as IEEE fp32 divisions (__fdiv_rn: correctly rounded whatever the fast-math flags), then
// cvt.rn.satfinite.e4m3 (round to nearest even, saturating to +-448, NaN kept: float_to_fp8_e4m3's rules).
#include <climits>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "cuda/common.cuh"
#include "cuda/dispatch.cuh"
#include "cuda/moe_stages.h"

namespace switchyard {
namespace cuda {
namespace {

constexpr int kQuantThreads = 256;
constexpr int kQuantWarps = kQuantThreads / 32;
constexpr int kFp8Group = 128;     // channels per activation scale in fp8-block mode (the recipe's G)
constexpr float kFp8Max = 448.0f;  // largest finite e4m3 value

// Four consecutive elements of a row as fp32 (p is 4-element aligned: k is a multiple of 16).
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float (&v)[4]) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
    v[0] = lo.x, v[1] = lo.y, v[2] = hi.x, v[3] = hi.y;
}
__device__ __forceinline__ void load4(const __half* p, float (&v)[4]) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
    const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
    v[0] = lo.x, v[1] = lo.y, v[2] = hi.x, v[3] = hi.y;
}

__device__ __forceinline__ float amax4(const float (&v)[4]) {
    return fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
    return x;
}

// The four e4m3 codes of v / scale, little-endian in one word (0 for a zero scale: the all-zero group).
__device__ __forceinline__ uint32_t quantize4(const float (&v)[4], float scale) {
    if (scale == 0.0f) return 0u;
    uint32_t out = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t q = __nv_cvt_float_to_fp8(__fdiv_rn(v[i], scale), __NV_SATFINITE, __NV_E4M3);
        out |= q << (8 * i);
    }
    return out;
}

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_rows_kernel(const T* a, int k, const int32_t* offsets, int num_groups, bool per_row,
                         const float* static_scale, uint8_t* q, float* sfa) {
    const int r = blockIdx.x;
    if (r >= offsets[num_groups]) return;  // no group owns the row (uniform over the block)
    // The row's group: the last e with offsets[e] <= r (empty groups before it share its start).
    int lo = 0, hi = num_groups - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (offsets[mid] <= r) lo = mid;
        else hi = mid - 1;
    }
    const int row0 = offsets[lo], m = offsets[lo + 1] - row0;
    const int kb = (k + kFp8Group - 1) / kFp8Group;
    float* sf = sfa + static_cast<int64_t>(row0) * kb + (r - row0);  // scale of k block j at sf[j * m]
    const T* x = a + static_cast<int64_t>(r) * k;
    uint32_t* qr = reinterpret_cast<uint32_t*>(q + static_cast<int64_t>(r) * k);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    if (!per_row) {  // fp8-block: a warp per group of 128 channels
        for (int j = warp; j < kb; j += kQuantWarps) {
            const int c = j * kFp8Group + lane * 4;
            float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (c < k) load4(x + c, v);
            const float scale = __fdiv_rn(warp_max(amax4(v)), kFp8Max);
            if (c < k) qr[c / 4] = quantize4(v, scale);
            if (lane == 0) sf[static_cast<int64_t>(j) * m] = scale;
        }
        return;
    }

    // fp8-tensor: one scale for the whole row
    float scale;
    if (static_scale != nullptr) {
        scale = static_scale[lo];
    } else {
        __shared__ float partial[kQuantWarps];
        float amax = 0.0f;
        for (int c = threadIdx.x * 4; c < k; c += kQuantThreads * 4) {
            float v[4];
            load4(x + c, v);
            amax = fmaxf(amax, amax4(v));
        }
        amax = warp_max(amax);
        if (lane == 0) partial[warp] = amax;
        __syncthreads();
        if (warp == 0) {
            amax = warp_max(lane < kQuantWarps ? partial[lane] : 0.0f);
            if (lane == 0) partial[0] = amax;
        }
        __syncthreads();
        scale = __fdiv_rn(partial[0], kFp8Max);
    }
    for (int c = threadIdx.x * 4; c < k; c += kQuantThreads * 4) {
        float v[4];
        load4(x + c, v);
        qr[c / 4] = quantize4(v, scale);
    }
    for (int j = threadIdx.x; j < kb; j += kQuantThreads) sf[static_cast<int64_t>(j) * m] = scale;
}

// sfb [E][Kb][Nb] from b_scale [E, Nb, Kb] (block) or [E] (tensor).
__global__ void weight_scales_kernel(const float* b_scale, bool per_tensor, int64_t total, int64_t nb, int64_t kb,
                                     float* sfb) {
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t per_expert = kb * nb, e = i / per_expert, rem = i % per_expert;
        const int64_t j = rem / nb, nn = rem % nb;
        sfb[i] = per_tensor ? b_scale[e] : b_scale[(e * nb + nn) * kb + j];
    }
}

// True for the bytes of w whose low 7 bits are all set (e4m3 NaN codes 0x7f / 0xff): bit 7 of each such byte.
__device__ __forceinline__ uint32_t nan_bytes(uint32_t w) {
    return ((w & 0x7f7f7f7fu) + 0x01010101u) & 0x80808080u;
}

// first[0] = min index of a NaN code in codes [n] (left at ULLONG_MAX when none). words: n / 4 when codes is
// 4-byte aligned (the tail bytes are scanned one by one), else 0.
__global__ void find_nan_code_kernel(const uint8_t* codes, int64_t n, int64_t words,
                                     unsigned long long* first) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    const uint32_t* w = reinterpret_cast<const uint32_t*>(codes);
    for (int64_t i = tid; i < words; i += stride) {
        const uint32_t hit = nan_bytes(w[i]);
        if (hit != 0u)
            atomicMin(first, static_cast<unsigned long long>(i * 4 + (__ffs(static_cast<int>(hit)) - 1) / 8));
    }
    for (int64_t i = words * 4 + tid; i < n; i += stride)
        if ((codes[i] & 0x7fu) == 0x7fu) atomicMin(first, static_cast<unsigned long long>(i));
}

}  // namespace

void quantize_rows_fp8(DType dtype, const void* a, int64_t max_rows, int64_t k, const int32_t* offsets,
                       int64_t num_groups, bool per_row, const float* static_scale, void* q, float* sfa,
                       cudaStream_t stream) {
    SWITCHYARD_CHECK(k >= 16 && k % 16 == 0 && k <= INT_MAX, "quantize_rows_fp8: k=", k,
                     " must be a positive multiple of 16");
    SWITCHYARD_CHECK(num_groups >= 1 && num_groups <= INT_MAX && max_rows >= 0 && max_rows <= INT_MAX,
                     "quantize_rows_fp8: num_groups=", num_groups, " max_rows=", max_rows);
    SWITCHYARD_CHECK(per_row || static_scale == nullptr,
                     "quantize_rows_fp8: a static scale is a per-row (fp8-tensor) option");
    if (max_rows == 0) return;
    dispatch_float_dtype(dtype, "quantize_rows_fp8", [&](auto tag) {
        using T = typename decltype(tag)::type;
        quantize_rows_kernel<T><<<static_cast<unsigned>(max_rows), kQuantThreads, 0, stream>>>(
            static_cast<const T*>(a), static_cast<int>(k), offsets, static_cast<int>(num_groups), per_row,
            static_scale, static_cast<uint8_t*>(q), sfa);
    });
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

void fp8_weight_scales_mn_major(const float* b_scale, bool per_tensor, int64_t num_groups, int64_t n_blocks,
                                int64_t k_blocks, float* sfb, cudaStream_t stream) {
    const int64_t total = num_groups * n_blocks * k_blocks;
    if (total == 0) return;
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>(ceil_div<int64_t>(total, threads), 4096);
    weight_scales_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(b_scale, per_tensor, total, n_blocks,
                                                                               k_blocks, sfb);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

int64_t fp8_first_nan_code(const void* codes, int64_t n) {
    if (n <= 0) return -1;
    // The weights may have been written on any stream: wait for the device before reading them.
    SWITCHYARD_CUDA_CHECK(cudaDeviceSynchronize());
    unsigned long long* first = nullptr;
    SWITCHYARD_CUDA_CHECK(cudaMalloc(&first, sizeof(unsigned long long)));
    unsigned long long host = ULLONG_MAX;
    cudaError_t err = cudaMemcpy(first, &host, sizeof(host), cudaMemcpyHostToDevice);
    if (err == cudaSuccess) {
        const bool aligned = (reinterpret_cast<uintptr_t>(codes) & 3u) == 0;
        const int64_t words = aligned ? n / 4 : 0;
        const int threads = 256;
        const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div<int64_t>(n / 4 + 1, threads), 8192));
        find_nan_code_kernel<<<static_cast<unsigned>(blocks), threads>>>(static_cast<const uint8_t*>(codes), n, words,
                                                                          first);
        err = cudaGetLastError();
        if (err == cudaSuccess) err = cudaMemcpy(&host, first, sizeof(host), cudaMemcpyDeviceToHost);
    }
    cudaFree(first);
    SWITCHYARD_CUDA_CHECK(err);
    return host == ULLONG_MAX ? -1 : static_cast<int64_t>(host);
}

}  // namespace cuda
}  // namespace switchyard
