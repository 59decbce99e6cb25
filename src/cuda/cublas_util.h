// src/cuda/cublas_util.h: the cuBLAS helpers of the CUDA sources that call cuBLAS (the router's gate GEMM in
// routing/router.cu and its gradients in routing/router_backward.cu, the dense baseline in
// src/baseline/dense_cuda.cu). Host-only.
//
// CublasLease      the current device's cuBLAS handle, held under its mutex for the lease's lifetime with the
//                  caller's stream set. One handle per device, created on first use with CUBLAS_DEFAULT_MATH (fp32
//                  inputs stay fp32: no TF32; 16-bit inputs use tensor cores) and never destroyed (destroying it at
//                  exit races the CUDA runtime's own teardown). cublasSetStream also resets the handle's workspace to
//                  cuBLAS's default pool, so no lease sees a workspace an earlier caller set with cublasSetWorkspace.
// cuda_data_type   DType -> cudaDataType_t for fp32 / bf16 / fp16; throws naming `what` otherwise.
#pragma once

#include <map>
#include <memory>
#include <mutex>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "switchyard/dtype.h"
#include "switchyard/error.h"

namespace switchyard {
namespace cuda {

class CublasLease {
 public:
    explicit CublasLease(cudaStream_t stream) {
        int device = 0;
        SWITCHYARD_CUDA_CHECK(cudaGetDevice(&device));
        Slot& slot = slot_of(device);
        lock_ = std::unique_lock<std::mutex>(slot.mu);
        if (slot.handle == nullptr) {
            SWITCHYARD_CUBLAS_CHECK(cublasCreate(&slot.handle));
            SWITCHYARD_CUBLAS_CHECK(cublasSetMathMode(slot.handle, CUBLAS_DEFAULT_MATH));
        }
        handle_ = slot.handle;
        SWITCHYARD_CUBLAS_CHECK(cublasSetStream(handle_, stream));
    }
    CublasLease(const CublasLease&) = delete;
    CublasLease& operator=(const CublasLease&) = delete;

    cublasHandle_t handle() const { return handle_; }

 private:
    struct Slot {
        std::mutex mu;
        cublasHandle_t handle = nullptr;
    };
    static Slot& slot_of(int device) {
        static std::mutex map_mu;
        static auto* slots = new std::map<int, std::unique_ptr<Slot>>();  // never destroyed (exit order)
        std::lock_guard<std::mutex> lock(map_mu);
        auto& slot = (*slots)[device];
        if (!slot) slot.reset(new Slot());
        return *slot;
    }

    std::unique_lock<std::mutex> lock_;
    cublasHandle_t handle_ = nullptr;
};

inline cudaDataType_t cuda_data_type(DType t, const char* what) {
    switch (t) {
        case DType::kF32: return CUDA_R_32F;
        case DType::kBF16: return CUDA_R_16BF;
        case DType::kF16: return CUDA_R_16F;
        default: break;
    }
    SWITCHYARD_FAIL(what, ": dtype=", to_string(t), " is not supported (fp32, bf16, fp16)");
}

}  // namespace cuda
}  // namespace switchyard
