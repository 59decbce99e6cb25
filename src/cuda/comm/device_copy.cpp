// src/cuda/comm/device_copy.cpp: see device_copy.h.
#include "cuda/comm/device_copy.h"

#include "cuda/common.cuh"

namespace switchyard {
namespace cuda {
namespace comm {

void copy_to_host_sync(void* dst, const void* src, size_t bytes, int device_index, cudaStream_t stream) {
    if (bytes == 0) return;
    DeviceGuard guard(device_index);
    SWITCHYARD_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
    SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void copy_to_device_async(void* dst, const void* src, size_t bytes, int device_index, cudaStream_t stream) {
    if (bytes == 0) return;
    DeviceGuard guard(device_index);
    SWITCHYARD_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
}

}  // namespace comm
}  // namespace cuda
}  // namespace switchyard
