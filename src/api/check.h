// src/api/check.h: the argument checks of the API layer (src/api), one set for every public entry point.
//
// Each check throws switchyard::Error naming the argument and what was wrong with it ("x shape=[3, 7], expected
// [T, 8]"). A size of -1 in an expected shape means "any"; names are the public parameter names.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "switchyard/config.h"
#include "switchyard/tensor.h"

namespace switchyard {
namespace api {

constexpr int64_t kAny = -1;

// fp32, bf16, fp16 (and fp64 where allow_f64).
bool is_float_type(DType t, bool allow_f64 = false);

// Defined, the given rank and sizes (kAny matches any size), contiguous, with data (unless empty).
void check_tensor(const TensorRef& t, const char* name, std::initializer_list<int64_t> dims);
// check_tensor and exactly this dtype.
void check_tensor(const TensorRef& t, const char* name, DType dtype, std::initializer_list<int64_t> dims);
// check_tensor and a float dtype: fp32/bf16/fp16, plus fp64 on the CPU.
void check_float_tensor(const TensorRef& t, const char* name, std::initializer_list<int64_t> dims);
// t on the same device (and device index) as `like`.
void check_same_device(const TensorRef& t, const char* name, const TensorRef& like, const char* like_name);
// t on exactly (dev, dev_idx).
void check_device(const TensorRef& t, const char* name, Device dev, int dev_idx);
// Same dtype as `like`.
void check_same_dtype(const TensorRef& t, const char* name, const TensorRef& like, const char* like_name);
// A caller's workspace of `need` bytes: non-null when need > 0, large enough, 256-byte aligned.
void check_workspace(const void* workspace, size_t workspace_bytes, size_t need, const char* what);
// The device is usable by this build (CUDA tensors need the CUDA backend).
void check_backend(Device dev, const char* what);

}  // namespace api
}  // namespace switchyard
