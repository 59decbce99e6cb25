// src/cuda/common.cuh: error checking and small helpers shared by every CUDA source of the backend.
//
// SWITCHYARD_CUDA_CHECK(expr)    wraps every CUDA runtime call; on failure throws switchyard::Error with
//                                "<expr>: <cudaGetErrorName>: <cudaGetErrorString> [CUDA error at file:line]".
// SWITCHYARD_CUDA_CHECK_LAUNCH() after every kernel launch (checks cudaGetLastError, never synchronises).
// SWITCHYARD_CUBLAS_CHECK(expr)  wraps every cuBLAS call, same message shape with cublasGetStatusString.
// WorkspaceCarver (src/util/workspace.h) hands out 256-byte aligned slices of the caller's workspace in a fixed order;
// run with a null base it only counts bytes, so one function both sizes and partitions a workspace.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "switchyard/cuda_check.h"
#include "switchyard/error.h"
#include "util/workspace.h"

// SWITCHYARD_CUDA_CHECK / SWITCHYARD_CUDA_CHECK_LAUNCH: the public switchyard/cuda_check.h (included above).
#define SWITCHYARD_CUBLAS_CHECK(expr)                                                                    \
    do {                                                                                                 \
        cublasStatus_t switchyard_cublas_st_ = (expr);                                                   \
        if (switchyard_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                              \
            ::switchyard::detail::throw_error("cuBLAS error", __FILE__, __LINE__, #expr, ": ",           \
                                              cublasGetStatusString(switchyard_cublas_st_));             \
    } while (0)

namespace switchyard {
namespace cuda {

// Workspace slicing and alignment (src/util/workspace.h), shared with the host-side API layer.
using switchyard::align_up;
using switchyard::kWorkspaceAlign;
using switchyard::WorkspaceCarver;

template <typename T>
constexpr T ceil_div(T a, T b) {
    return (a + b - 1) / b;
}

// Blocks of `threads` for n elements: at least 1, at most 65535 (the kernels launched with it loop grid-stride).
inline int grid_for(int64_t n, int threads) {
    const int64_t b = ceil_div<int64_t>(n, threads);
    return static_cast<int>(b < 1 ? 1 : (b > 65535 ? 65535 : b));
}

// Makes `device` current for the scope and restores the previous device afterwards.
class DeviceGuard {
 public:
    explicit DeviceGuard(int device) {
        SWITCHYARD_CUDA_CHECK(cudaGetDevice(&prev_));
        if (prev_ != device) SWITCHYARD_CUDA_CHECK(cudaSetDevice(device));
        changed_ = prev_ != device;
    }
    ~DeviceGuard() {
        if (changed_) cudaSetDevice(prev_);  // a destructor must not throw
    }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
    int prev_ = 0;
    bool changed_ = false;
};

}  // namespace cuda
}  // namespace switchyard
