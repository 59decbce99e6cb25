// src/api/tensor.cpp: TensorRef, a non-owning strided view (shapes and strides in elements, row-major).
//
// Contiguity follows PyTorch's rule: strides must be the row-major ones, except that a dimension of size 1
// may have any stride; a tensor with no elements is contiguous.
#include "switchyard/tensor.h"

#include <sstream>
#include <string>
#include <tuple>

#include "switchyard/error.h"

namespace switchyard {

TensorRef::TensorRef(void* ptr, DType t, std::initializer_list<int64_t> dims, Device dev, int dev_idx) {
    SWITCHYARD_CHECK(dims.size() >= 1 && dims.size() <= static_cast<size_t>(kMaxRank), "TensorRef: rank=", dims.size(),
                     " outside [1, ", kMaxRank, "]");
    *this = contiguous(ptr, t, dims.begin(), static_cast<int>(dims.size()), dev, dev_idx);
}

TensorRef TensorRef::contiguous(void* ptr, DType t, const int64_t* dims, int ndim, Device dev, int dev_idx) {
    SWITCHYARD_CHECK(ndim >= 1 && ndim <= kMaxRank, "TensorRef: rank=", ndim, " outside [1, ", kMaxRank, "]");
    TensorRef r;
    std::tie(r.data, r.dtype, r.rank, r.device, r.device_index) = std::make_tuple(ptr, t, ndim, dev, dev_idx);
    int64_t stride = 1;
    for (int d = ndim - 1; d >= 0; --d) {
        SWITCHYARD_CHECK(dims[d] >= 0, "TensorRef: shape[", d, "]=", dims[d], " is negative");
        r.shape[d] = dims[d];
        r.strides[d] = stride;
        stride *= dims[d] > 0 ? dims[d] : 1;
    }
    return r;
}

int64_t TensorRef::numel() const {
    if (rank == 0) return 0;
    int64_t n = 1;
    for (int d = 0; d < rank; ++d) n *= shape[d];
    return n;
}

bool TensorRef::is_contiguous() const {
    if (numel() == 0) return true;
    int64_t expected = 1;
    for (int d = rank - 1; d >= 0; --d) {
        if (shape[d] != 1 && strides[d] != expected) return false;
        expected *= shape[d];
    }
    return true;
}

std::string TensorRef::shape_string() const {
    std::ostringstream os;
    os << "[";
    for (int d = 0; d < rank; ++d) os << (d ? ", " : "") << shape[d];
    os << "]";
    return os.str();
}

}  // namespace switchyard
