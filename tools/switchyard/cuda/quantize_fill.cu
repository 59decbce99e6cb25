// tools/switchyard/cuda/quantize_fill.cu: see quantize_fill.h.
//
// fp8-block: one thread block of 256 threads per 128x128 block (grid = matrices x B(rows) x B(cols), 1-D); each
// thread holds 64 elements of the block in registers (element i*256 + tid: row (i*256 + tid) / 128, column
// (i*256 + tid) % 128, so a warp reads 32 consecutive elements of one row), the block's amax is reduced with warp
// shuffles and shared memory, thread 0 writes the scale, and every thread converts and stores its 64 codes.
// fp8-tensor: (1) scales zeroed, then a grid-stride amax per matrix (grid.y = matrix) folded into scales[m] with
// atomicMax on the bit pattern (|w| >= 0, for which the unsigned order of the bits is the float order; a max in any
// order is the same number); (2) scales[m] = amax / 448 in place; (3) codes, grid-stride per matrix.
#include "cuda/quantize_fill.h"

#include <cuda_fp8.h>

#include <algorithm>

#include "cuda/float_types.cuh"
#include "switchyard/cuda_check.h"
#include "switchyard/error.h"

namespace switchyard {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlock = 128;                                // the recipe's block edge (kFp8BlockSize)
constexpr int kPerThread = kBlock * kBlock / kThreads;     // 64 elements of a block per thread
constexpr float kFp8Max = 448.0f;

template <typename T>
__device__ __forceinline__ float load_float(const T* p);
template <>
__device__ __forceinline__ float load_float<float>(const float* p) {
    return *p;
}
template <>
__device__ __forceinline__ float load_float<__nv_bfloat16>(const __nv_bfloat16* p) {
    return __bfloat162float(*p);
}
template <>
__device__ __forceinline__ float load_float<__half>(const __half* p) {
    return __half2float(*p);
}

// e4m3 code of v / s (0 for s == 0: the all-zero block or matrix), as float_to_fp8_e4m3(w / s) on the host.
__device__ __forceinline__ uint8_t code_of(float v, float s) {
    if (s == 0.0f) return 0;
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(__fdiv_rn(v, s), __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float block_max(float v, float* smem) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < kThreads / 32 ? smem[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) smem[0] = v;
    }
    __syncthreads();
    return smem[0];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_block_kernel(const T* __restrict__ w, int64_t rows, int64_t cols, int64_t br, int64_t bc,
                          uint8_t* __restrict__ codes, float* __restrict__ scales) {
    __shared__ float smem[kThreads / 32];
    const int64_t b = blockIdx.x;  // (matrix, block row, block column), row-major like the scales
    const int64_t m = b / (br * bc), bi = (b / bc) % br, bj = b % bc;
    const int64_t r0 = bi * kBlock, c0 = bj * kBlock;
    const int64_t base = m * rows * cols;
    float v[kPerThread];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        const int idx = i * kThreads + static_cast<int>(threadIdx.x);
        const int64_t r = r0 + (idx >> 7), c = c0 + (idx & (kBlock - 1));
        v[i] = (r < rows && c < cols) ? load_float<T>(w + base + r * cols + c) : 0.0f;
        amax = fmaxf(amax, fabsf(v[i]));
    }
    amax = block_max(amax, smem);
    const float s = __fdiv_rn(amax, kFp8Max);
    if (threadIdx.x == 0) scales[b] = s;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        const int idx = i * kThreads + static_cast<int>(threadIdx.x);
        const int64_t r = r0 + (idx >> 7), c = c0 + (idx & (kBlock - 1));
        if (r < rows && c < cols) codes[base + r * cols + c] = code_of(v[i], s);
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    amax_kernel(const T* __restrict__ w, int64_t n, float* __restrict__ amax_bits) {
    __shared__ float smem[kThreads / 32];
    const T* p = w + static_cast<int64_t>(blockIdx.y) * n;
    float a = 0.0f;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n; i += stride)
        a = fmaxf(a, fabsf(load_float<T>(p + i)));
    a = block_max(a, smem);
    if (threadIdx.x == 0)
        atomicMax(reinterpret_cast<unsigned int*>(amax_bits) + blockIdx.y, __float_as_uint(a));
}

__global__ void scale_from_amax_kernel(float* __restrict__ scales, int64_t num_matrices) {
    const int64_t m = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (m < num_matrices) scales[m] = __fdiv_rn(scales[m], kFp8Max);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_tensor_kernel(const T* __restrict__ w, int64_t n, const float* __restrict__ scales,
                           uint8_t* __restrict__ codes) {
    const int64_t off = static_cast<int64_t>(blockIdx.y) * n;
    const float s = scales[blockIdx.y];
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n; i += stride)
        codes[off + i] = code_of(load_float<T>(w + off + i), s);
}

void check_args(const char* what, const void* w, int64_t num_matrices, int64_t rows, int64_t cols,
                const uint8_t* codes, const float* scales) {
    SWITCHYARD_CHECK(num_matrices >= 0 && rows >= 0 && cols >= 0, what, ": matrices=", num_matrices, " rows=", rows,
                     " cols=", cols);
    SWITCHYARD_CHECK(num_matrices * rows * cols == 0 || (w && codes && scales), what, ": null pointer");
}

}  // namespace

void quantize_fp8_block(DType dtype, const void* w, int64_t num_matrices, int64_t rows, int64_t cols, uint8_t* codes,
                        float* scales, cudaStream_t stream) {
    check_args("quantize_fp8_block", w, num_matrices, rows, cols, codes, scales);
    if (num_matrices * rows * cols == 0) return;
    const int64_t br = (rows + kBlock - 1) / kBlock, bc = (cols + kBlock - 1) / kBlock;
    const int64_t blocks = num_matrices * br * bc;
    SWITCHYARD_CHECK(blocks <= 0x7fffffff, "quantize_fp8_block: ", blocks, " blocks exceed one grid");
    cli_cuda::with_float_type(dtype, "quantize_fp8_block", [&](auto tag) {
        using T = typename decltype(tag)::type;
        quantize_block_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            static_cast<const T*>(w), rows, cols, br, bc, codes, scales);
    });
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

void quantize_fp8_tensor(DType dtype, const void* w, int64_t num_matrices, int64_t rows, int64_t cols,
                         uint8_t* codes, float* scales, cudaStream_t stream) {
    check_args("quantize_fp8_tensor", w, num_matrices, rows, cols, codes, scales);
    if (num_matrices == 0) return;
    SWITCHYARD_CHECK(num_matrices <= 65535, "quantize_fp8_tensor: ", num_matrices, " matrices (at most 65535)");
    const int64_t n = rows * cols;
    SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(scales, 0, static_cast<size_t>(num_matrices) * sizeof(float), stream));
    if (n > 0) {
        const dim3 grid(static_cast<unsigned>(std::min<int64_t>((n + kThreads * 16 - 1) / (kThreads * 16), 1024)),
                        static_cast<unsigned>(num_matrices));
        cli_cuda::with_float_type(dtype, "quantize_fp8_tensor", [&](auto tag) {
            using T = typename decltype(tag)::type;
            amax_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(w), n, scales);
            SWITCHYARD_CUDA_CHECK_LAUNCH();
            scale_from_amax_kernel<<<static_cast<unsigned>((num_matrices + kThreads - 1) / kThreads), kThreads, 0,
                                     stream>>>(scales, num_matrices);
            SWITCHYARD_CUDA_CHECK_LAUNCH();
            quantize_tensor_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(w), n, scales, codes);
        });
        SWITCHYARD_CUDA_CHECK_LAUNCH();
    }
}

}  // namespace cuda
}  // namespace switchyard
