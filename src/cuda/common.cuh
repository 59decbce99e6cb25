// src/cuda/common.cuh: error checking and small helpers shared by every CUDA source of the backend.
//
// SWITCHYARD_CUDA_CHECK(expr)    wraps every CUDA runtime call; on failure throws switchyard::Error with
//                                "<expr>: <cudaGetErrorName>: <cudaGetErrorString> [CUDA error at file:line]".
// SWITCHYARD_CUDA_CHECK_LAUNCH() after every kernel launch (checks cudaGetLastError, never synchronises).
// SWITCHYARD_CUBLAS_CHECK(expr)  wraps every cuBLAS call, same message shape with cublasGetStatusString.
// WorkspaceCarver hands out 256-byte aligned slices of the caller's workspace in a fixed order; run with a
// null base it only counts bytes, so one function both sizes and partitions a workspace.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "switchyard/cuda_check.h"
#include "switchyard/error.h"

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

constexpr size_t kWorkspaceAlign = 256;

inline size_t align_up(size_t v, size_t a = kWorkspaceAlign) { return (v + a - 1) / a * a; }
template <typename T>
constexpr T ceil_div(T a, T b) {
    return (a + b - 1) / b;
}

// Bump allocator over a caller-owned workspace. With base == nullptr it only sums sizes (sizing pass).
class WorkspaceCarver {
 public:
    explicit WorkspaceCarver(void* base = nullptr, size_t capacity = 0)
        : base_(static_cast<char*>(base)), capacity_(capacity) {}

    template <typename T>
    T* take(size_t count) {
        return static_cast<T*>(take_bytes(count * sizeof(T)));
    }
    void* take_bytes(size_t bytes) {
        size_t at = used_;
        used_ += align_up(bytes);
        if (base_ == nullptr) return nullptr;
        SWITCHYARD_CHECK(used_ <= capacity_, "workspace_bytes=", capacity_, " is too small: need at least ", used_,
                         " bytes so far");
        return base_ + at;
    }
    size_t used() const { return used_; }
    bool sizing() const { return base_ == nullptr; }

 private:
    char* base_;
    size_t capacity_;
    size_t used_ = 0;
};

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
