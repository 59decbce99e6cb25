// src/api/check.cpp: the argument checks of src/api/check.h.
#include "api/check.h"

#include <string>

#include "switchyard/error.h"

namespace switchyard {
namespace api {
namespace {

std::string expected_shape(std::initializer_list<int64_t> dims) {
    std::string s = "[";
    int d = 0;
    for (int64_t v : dims) s += (d++ ? ", " : "") + (v == kAny ? std::string("*") : std::to_string(v));
    return s + "]";
}

}  // namespace

bool is_float_type(DType t, bool allow_f64) {
    return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16 || (allow_f64 && t == DType::kF64);
}

void check_tensor(const TensorRef& t, const char* name, std::initializer_list<int64_t> dims) {
    SWITCHYARD_CHECK(t.defined(), name, " is required but undefined");
    bool ok = t.rank == static_cast<int>(dims.size());
    int d = 0;
    for (int64_t v : dims) {
        if (ok && v != kAny && t.shape[d] != v) ok = false;
        ++d;
    }
    SWITCHYARD_CHECK(ok, name, " shape=", t.shape_string(), ", expected ", expected_shape(dims));
    SWITCHYARD_CHECK(t.is_contiguous(), name, " ", t.shape_string(), " must be contiguous");
    SWITCHYARD_CHECK(t.data != nullptr || t.numel() == 0, name, " has null data");
}

void check_tensor(const TensorRef& t, const char* name, DType dtype, std::initializer_list<int64_t> dims) {
    check_tensor(t, name, dims);
    SWITCHYARD_CHECK(t.dtype == dtype, name, " dtype=", to_string(t.dtype), ", expected ", to_string(dtype));
}

void check_float_tensor(const TensorRef& t, const char* name, std::initializer_list<int64_t> dims) {
    check_tensor(t, name, dims);
    const bool cpu = t.device == Device::kCPU;
    SWITCHYARD_CHECK(is_float_type(t.dtype, cpu), name, " dtype=", to_string(t.dtype), " must be fp32, bf16 or fp16",
                     cpu ? " (or fp64 on the cpu)" : "");
}

void check_same_device(const TensorRef& t, const char* name, const TensorRef& like, const char* like_name) {
    SWITCHYARD_CHECK(t.device == like.device && t.device_index == like.device_index, name, " is on ",
                     to_string(t.device), ":", t.device_index, " but ", like_name, " on ", to_string(like.device), ":",
                     like.device_index, " (all tensors of one call on one device)");
}

void check_device(const TensorRef& t, const char* name, Device dev, int dev_idx) {
    SWITCHYARD_CHECK(t.device == dev && t.device_index == dev_idx, name, " is on ", to_string(t.device), ":",
                     t.device_index, ", expected ", to_string(dev), ":", dev_idx, " (all on one device)");
}

void check_same_dtype(const TensorRef& t, const char* name, const TensorRef& like, const char* like_name) {
    SWITCHYARD_CHECK(t.dtype == like.dtype, name, " dtype=", to_string(t.dtype), " must equal ", like_name,
                     " dtype=", to_string(like.dtype));
}

void check_workspace(const void* workspace, size_t workspace_bytes, size_t need, const char* what) {
    if (need == 0) return;
    SWITCHYARD_CHECK(workspace != nullptr, what, ": workspace is null, ", need, " bytes needed");
    SWITCHYARD_CHECK(workspace_bytes >= need, what, ": workspace_bytes=", workspace_bytes, " is less than the ", need,
                     " bytes needed");
    SWITCHYARD_CHECK(reinterpret_cast<uintptr_t>(workspace) % 256 == 0, what, ": workspace=", workspace,
                     " is not 256-byte aligned");
}

void check_backend(Device dev, const char* what) {
#ifdef SWITCHYARD_WITH_CUDA
    (void)dev;
    (void)what;
#else
    SWITCHYARD_CHECK(dev == Device::kCPU, what, ": tensors are on ", to_string(dev),
                     " but this build has no CUDA backend (built without CUDA)");
#endif
}

}  // namespace api
}  // namespace switchyard
