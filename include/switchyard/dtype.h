// switchyard/dtype.h: element types and exact host-side conversions.
//
// The conversions below are bit-exact with CUDA's __float2bfloat16_rn / __float2half_rn and
// __bfloat162float / __half2float: round to nearest, ties to even; overflow to +-inf for fp16
// (bf16 has fp32's exponent range, so only rounding can overflow it); NaN stays NaN (quiet, sign kept).
// The CPU reference uses them wherever a stage stores a value in the layer's dtype.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace switchyard {

// kF64 is a CPU-backend type (exact double results for gradient checks); the CUDA backend rejects it.
enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kI32 = 3, kI64 = 4, kF64 = 5 };

inline size_t dtype_size(DType t) {
    switch (t) {
        case DType::kF32: return 4;
        case DType::kBF16: return 2;
        case DType::kF16: return 2;
        case DType::kI32: return 4;
        case DType::kI64: return 8;
        case DType::kF64: return 8;
    }
    return 0;
}

const char* to_string(DType t);
// Parses "fp32"/"f32"/"float32", "bf16"/"bfloat16", "fp16"/"f16"/"float16", "fp64"/"float64", "int32", "int64";
// throws on others.
DType parse_dtype(const std::string& s);

inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
    uint32_t u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;
    return static_cast<uint16_t>(u >> 16);
}

inline float half_to_float(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t out;
    if (exp == 0) {
        if (man == 0) {
            out = sign;
        } else {  // subnormal: renormalise
            int e = -1;
            do {
                ++e;
                man <<= 1;
            } while ((man & 0x400u) == 0);
            out = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        out = sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0u);
    } else {
        out = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    return bits_float(out);
}

inline uint16_t float_to_half(float f) {
    uint32_t u = float_bits(f);
    uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));  // NaN
    if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (abs < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
        if (abs < 0x33000000u) return sign;  // < 2^-25 rounds to zero (2^-25 exactly ties to even: zero)
        uint32_t exp = abs >> 23;
        uint32_t man = (abs & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - exp;  // mantissa shift so that the result counts units of 2^-24
        uint32_t q = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) ++q;
        return static_cast<uint16_t>(sign | q);
    }
    uint32_t r = abs + 0xfffu + ((abs >> 13) & 1u);  // round to nearest even at bit 13
    r -= (112u << 23);                                // rebias 127 -> 15
    return static_cast<uint16_t>(sign | (r >> 13));
}

// Rounds a value to what storing it in `t` and reading it back gives (identity for fp32 beyond fp32 rounding).
inline float round_to(DType t, float v) {
    switch (t) {
        case DType::kBF16: return bf16_to_float(float_to_bf16(v));
        case DType::kF16: return half_to_float(float_to_half(v));
        default: return v;
    }
}

}  // namespace switchyard
