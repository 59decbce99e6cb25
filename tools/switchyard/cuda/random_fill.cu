// tools/switchyard/cuda/random_fill.cu: see random_fill.h.
// out[i] = dtype(lo + (hi - lo) * u(seed, i)), u in [0, 1) from the top 24 bits of splitmix64(seed ^ mix(i)).
// Grid-stride loop, one element per thread per step (a fill is bandwidth-bound either way).
#include "cuda/random_fill.h"

#include <algorithm>

#include "cuda/float_types.cuh"
#include "switchyard/cuda_check.h"

namespace switchyard {
namespace cuda {
namespace {

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

template <typename T>
__global__ void fill_uniform_kernel(T* __restrict__ out, int64_t n, float lo, float span, uint64_t seed) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
        const uint64_t r = splitmix64(seed ^ splitmix64(static_cast<uint64_t>(i)));
        const float u = static_cast<float>(r >> 40) * (1.0f / 16777216.0f);
        out[i] = cli_cuda::store_float<T>(lo + span * u);
    }
}

}  // namespace

void fill_uniform(DType dtype, void* data, int64_t n, float lo, float hi, uint64_t seed, cudaStream_t stream) {
    SWITCHYARD_CHECK(n >= 0, "fill_uniform: n=", n);
    if (n == 0) return;
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65536));
    cli_cuda::with_float_type(dtype, "fill_uniform", [&](auto tag) {
        using T = typename decltype(tag)::type;
        fill_uniform_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<T*>(data), n, lo, hi - lo, seed);
    });
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
