// src/cuda/grouped_gemm.h: grouped GEMM over experts with device-side group sizes (host-only header).
//
// For every expert e with rows [offsets[e], offsets[e+1]) of A:
//   C[r, n] = sum_k A[r, k] * B[e, n, k]      r in the expert's rows, n < N, k < K
// A: [total_rows, K] row-major (dtype), B: [E, N, K] row-major (nn.Linear layout, dtype),
// C: [total_rows, N] row-major (dtype). fp32 accumulation. offsets: device int32 [E+1].
// No host synchronisation: problem sizes and pointer arrays are built on the device from offsets.
// max_rows bounds offsets[E] (T*k); it sizes the workspace and the launch.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "switchyard/dtype.h"

namespace switchyard {
namespace cuda {

struct GroupedGemmArgs {
    const void* a = nullptr;
    const void* b = nullptr;
    void* c = nullptr;
    DType dtype = DType::kBF16;
    int64_t num_groups = 0;  // E
    int64_t n = 0;
    int64_t k = 0;
    int64_t max_rows = 0;
    const int32_t* offsets = nullptr;  // device [E+1]
};

// Workspace bytes for grouped_gemm with these sizes (device memory, 256-byte aligned).
size_t grouped_gemm_workspace_size(const GroupedGemmArgs& args);
// True when the dtype/sizes are supported by the CUTLASS path (K and N multiples of 8 for 16-bit types).
bool grouped_gemm_supported(const GroupedGemmArgs& args);
void grouped_gemm(const GroupedGemmArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace switchyard
