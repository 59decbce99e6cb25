// tools/switchyard/cuda/random_fill.h: seeded random fills of device memory (host-only header).
//
// For benchmarks and the profile: weights of DeepSeek-V3's size (22 GB in bf16) are generated on the GPU in
// milliseconds instead of on the host in minutes. Element i of a fill gets uniform(lo, hi) from a counter-based
// hash of (seed, i), so a fill is reproducible and independent of the launch shape.
#pragma once

#include <cstdint>

#include "switchyard/dtype.h"
#include "switchyard/tensor.h"

namespace switchyard {
namespace cuda {

// data: n elements of dtype (fp32, bf16 or fp16) on the current device.
void fill_uniform(DType dtype, void* data, int64_t n, float lo, float hi, uint64_t seed, cudaStream_t stream);

}  // namespace cuda
}  // namespace switchyard
