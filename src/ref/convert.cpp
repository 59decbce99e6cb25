// src/ref/convert.cpp: element access of host tensors in any supported dtype, as float.
//
// Decoding (bf16/fp16 -> float) is exact; encoding rounds to nearest even through switchyard/dtype.h, so a
// value stored here reads back exactly as CUDA's __float2bfloat16_rn / __float2half_rn would give it.
// Integer dtypes convert through static_cast (used only for index tensors in tests and tools).
#include <cstring>
#include <vector>

#include "ref/ref.h"
#include "switchyard/error.h"

namespace switchyard {
namespace ref {

float load_as_float(const void* data, DType t, int64_t i) {
    switch (t) {
        case DType::kF32:
            return static_cast<const float*>(data)[i];
        case DType::kBF16:
            return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
        case DType::kF16:
            return half_to_float(static_cast<const uint16_t*>(data)[i]);
        case DType::kI32:
            return static_cast<float>(static_cast<const int32_t*>(data)[i]);
        case DType::kI64:
            return static_cast<float>(static_cast<const int64_t*>(data)[i]);
        case DType::kF64:
            return static_cast<float>(static_cast<const double*>(data)[i]);
        case DType::kF8E4M3:
            return fp8_e4m3_to_float(static_cast<const uint8_t*>(data)[i]);
    }
    SWITCHYARD_FAIL("load_as_float: unknown dtype ", static_cast<int>(t));
}

void store_from_float(void* data, DType t, int64_t i, float v) {
    switch (t) {
        case DType::kF32:
            static_cast<float*>(data)[i] = v;
            return;
        case DType::kBF16:
            static_cast<uint16_t*>(data)[i] = float_to_bf16(v);
            return;
        case DType::kF16:
            static_cast<uint16_t*>(data)[i] = float_to_half(v);
            return;
        case DType::kI32:
            static_cast<int32_t*>(data)[i] = static_cast<int32_t>(v);
            return;
        case DType::kI64:
            static_cast<int64_t*>(data)[i] = static_cast<int64_t>(v);
            return;
        case DType::kF64:
            static_cast<double*>(data)[i] = v;
            return;
        case DType::kF8E4M3:
            static_cast<uint8_t*>(data)[i] = float_to_fp8_e4m3(v);
            return;
    }
    SWITCHYARD_FAIL("store_from_float: unknown dtype ", static_cast<int>(t));
}

double load_as_double(const void* data, DType t, int64_t i) {
    if (t == DType::kF64) return static_cast<const double*>(data)[i];
    return static_cast<double>(load_as_float(data, t, i));
}

void store_from_double(void* data, DType t, int64_t i, double v) {
    if (t == DType::kF64) {
        static_cast<double*>(data)[i] = v;
        return;
    }
    store_from_float(data, t, i, static_cast<float>(v));  // to fp32 (nearest even), then to t: as a GPU stores it
}

std::vector<double> to_double(const TensorRef& t) {
    const int64_t n = t.defined() ? t.numel() : 0;
    std::vector<double> out(static_cast<size_t>(n));
#pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) out[i] = load_as_double(t.data, t.dtype, i);
    return out;
}

void store_all(const std::vector<double>& v, const TensorRef& t) {
    const int64_t n = static_cast<int64_t>(v.size());
#pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) store_from_double(t.data, t.dtype, i, v[i]);
}

std::vector<float> to_float(const TensorRef& t) {
    SWITCHYARD_CHECK(t.device == Device::kCPU, "to_float: tensor ", t.shape_string(), " is on ", to_string(t.device),
                     ", expected cpu");
    SWITCHYARD_CHECK(t.is_contiguous(), "to_float: tensor ", t.shape_string(), " is not contiguous");
    const int64_t n = t.defined() ? t.numel() : 0;
    std::vector<float> out(static_cast<size_t>(n));
    if (n == 0) return out;
    SWITCHYARD_CHECK(t.data != nullptr, "to_float: tensor ", t.shape_string(), " has null data");
    if (t.dtype == DType::kF32) {
        std::memcpy(out.data(), t.data, static_cast<size_t>(n) * sizeof(float));
        return out;
    }
#pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) out[i] = load_as_float(t.data, t.dtype, i);
    return out;
}

}  // namespace ref
}  // namespace switchyard
