// src/api/dtype.cpp: names of element types and devices, and their parsers (CLI spellings).
#include "switchyard/dtype.h"

#include <algorithm>
#include <cctype>
#include <string>

#include "switchyard/error.h"
#include "switchyard/tensor.h"

namespace switchyard {

const char* to_string(DType t) {
    switch (t) {
        case DType::kF32:
            return "fp32";
        case DType::kBF16:
            return "bf16";
        case DType::kF16:
            return "fp16";
        case DType::kI32:
            return "int32";
        case DType::kI64:
            return "int64";
        case DType::kF64:
            return "fp64";
        case DType::kF8E4M3:
            return "fp8e4m3";
    }
    return "unknown-dtype";
}

DType parse_dtype(const std::string& s) {
    std::string v = s;
    std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    if (v == "fp32" || v == "f32" || v == "float32" || v == "float") return DType::kF32;
    if (v == "bf16" || v == "bfloat16") return DType::kBF16;
    if (v == "fp16" || v == "f16" || v == "float16" || v == "half") return DType::kF16;
    if (v == "fp64" || v == "f64" || v == "float64" || v == "double") return DType::kF64;
    if (v == "int32" || v == "i32") return DType::kI32;
    if (v == "int64" || v == "i64") return DType::kI64;
    if (v == "fp8" || v == "fp8e4m3" || v == "f8_e4m3") return DType::kF8E4M3;
    SWITCHYARD_FAIL("dtype='", s, "' is not one of fp32|bf16|fp16|fp64|int32|int64|fp8e4m3");
}

const char* to_string(Device d) {
    switch (d) {
        case Device::kCPU:
            return "cpu";
        case Device::kCUDA:
            return "cuda";
    }
    return "unknown-device";
}

}  // namespace switchyard
