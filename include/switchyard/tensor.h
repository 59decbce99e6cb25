// switchyard/tensor.h: a non-owning view of a strided tensor on the host or a CUDA device.
//
// The library never owns caller memory: every entry point takes TensorRefs. Shapes are in elements,
// strides in elements (not bytes). Most entry points require contiguous row-major tensors and say so.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "switchyard/dtype.h"

// Framework-free declaration of CUDA's stream handle (identical to the CUDA runtime's own typedef),
// so that the public headers do not need the CUDA toolkit.
typedef struct CUstream_st* cudaStream_t;

namespace switchyard {

enum class Device : int { kCPU = 0, kCUDA = 1 };
const char* to_string(Device d);

struct TensorRef {
    static constexpr int kMaxRank = 4;

    void* data = nullptr;
    DType dtype = DType::kF32;
    int rank = 0;
    int64_t shape[kMaxRank] = {0, 0, 0, 0};
    int64_t strides[kMaxRank] = {0, 0, 0, 0};
    Device device = Device::kCPU;
    int device_index = 0;

    TensorRef() = default;
    // Contiguous row-major view.
    TensorRef(void* ptr, DType t, std::initializer_list<int64_t> dims, Device dev = Device::kCPU, int dev_idx = 0);
    static TensorRef contiguous(void* ptr, DType t, const int64_t* dims, int ndim, Device dev = Device::kCPU,
                                int dev_idx = 0);

    // A default-constructed TensorRef (rank 0) means "not given" for optional arguments.
    bool defined() const { return rank > 0; }
    int64_t numel() const;
    int64_t size(int dim) const { return shape[dim]; }
    bool is_contiguous() const;
    size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
    std::string shape_string() const;  // "[4, 8]"

    template <typename T>
    T* ptr() const {
        return static_cast<T*>(data);
    }
};

}  // namespace switchyard
