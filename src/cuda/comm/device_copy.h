// src/cuda/comm/device_copy.h: the host <-> device copies of an expert-parallel forward (src/api/expert_parallel.cpp).
//
// Small host-side values only: every rank's expert counts come to the host (to size NCCL's sends and receives and
// the local grouped GEMMs), the local expert offsets and the receive capacity go back. Host-only header.
#pragma once

#include <cstddef>

#include "switchyard/tensor.h"

namespace switchyard {
namespace cuda {
namespace comm {

// Copies `bytes` from device memory to host memory after the work enqueued on `stream`, and waits for it: the host
// synchronisation of the forward (cudaMemcpyAsync + cudaStreamSynchronize).
void copy_to_host_sync(void* dst, const void* src, size_t bytes, int device_index, cudaStream_t stream);
// Enqueues a copy of `bytes` host bytes to device memory on `stream`. The host buffer may be released on return (a
// pageable source is staged before cudaMemcpyAsync returns).
void copy_to_device_async(void* dst, const void* src, size_t bytes, int device_index, cudaStream_t stream);

}  // namespace comm
}  // namespace cuda
}  // namespace switchyard
