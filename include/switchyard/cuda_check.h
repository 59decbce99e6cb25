// switchyard/cuda_check.h: checks of CUDA runtime calls and kernel launches, for CUDA code built on Switchyard.
//
// Needs the CUDA runtime (<cuda_runtime.h>): only CUDA code includes it (the backend's .cu files through
// src/cuda/common.cuh, the CLI's .cu files); the rest of the public API stays free of CUDA headers.
// SWITCHYARD_CUDA_CHECK(expr)    wraps a CUDA runtime call; on failure throws switchyard::Error with
//                                "<expr>: <cudaGetErrorName>: <cudaGetErrorString> [CUDA error at file:line]".
// SWITCHYARD_CUDA_CHECK_LAUNCH() after a kernel launch (checks cudaGetLastError, never synchronises).
#pragma once

#include <cuda_runtime.h>

#include "switchyard/error.h"

#define SWITCHYARD_CUDA_CHECK(expr)                                                                      \
    do {                                                                                                 \
        cudaError_t switchyard_cuda_err_ = (expr);                                                       \
        if (switchyard_cuda_err_ != cudaSuccess)                                                         \
            ::switchyard::detail::throw_error("CUDA error", __FILE__, __LINE__, #expr, ": ",             \
                                              cudaGetErrorName(switchyard_cuda_err_), ": ",              \
                                              cudaGetErrorString(switchyard_cuda_err_));                 \
    } while (0)

#define SWITCHYARD_CUDA_CHECK_LAUNCH() SWITCHYARD_CUDA_CHECK(cudaGetLastError())
