// switchyard/dtype.h: element types and exact host-side conversions.
//
// The conversions below are bit-exact with CUDA's __float2bfloat16_rn / __float2half_rn and
// __bfloat162float / __half2float: round to nearest, ties to even; overflow to +-inf for fp16
// (bf16 has fp32's exponent range, so only rounding can overflow it); NaN stays NaN (quiet, sign kept).
// The CPU reference uses them wherever a stage stores a value in the layer's dtype.
//
// fp8 e4m3 (kF8E4M3, the OCP "e4m3fn" format of F8_E4M3 checkpoints): 1 sign, 4 exponent (bias 7), 3 mantissa bits;
// no infinities; S.1111.111 is NaN (0x7f, 0xff); the largest finite value is 448 (S.1111.110); subnormals
// m * 2^-9 (exponent field 0). fp8_e4m3_to_float is exact; float_to_fp8_e4m3 rounds to nearest, ties to even, and
// saturates to +-448 (inf included: the convention of DeepSeek-V3's and vLLM's quantisers), NaN stays NaN (sign kept).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace switchyard {

// kF64 is a CPU-backend type (exact double results for gradient checks); the CUDA backend rejects it.
// kF8E4M3 is a weight type of quantised experts (docs/fp8.md), for now on the CPU backend only.
enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kI32 = 3, kI64 = 4, kF64 = 5, kF8E4M3 = 6 };

inline size_t dtype_size(DType t) {
    switch (t) {
        case DType::kF32: return 4;
        case DType::kBF16: return 2;
        case DType::kF16: return 2;
        case DType::kI32: return 4;
        case DType::kI64: return 8;
        case DType::kF64: return 8;
        case DType::kF8E4M3: return 1;
    }
    return 0;
}

const char* to_string(DType t);
// Parses "fp32"/"f32"/"float32", "bf16"/"bfloat16", "fp16"/"f16"/"float16", "fp64"/"float64", "int32", "int64",
// "fp8"/"fp8e4m3"/"f8_e4m3"; throws on others.
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

// fp8 e4m3fn -> float, exact (NaN codes give a quiet NaN of the code's sign).
inline float fp8_e4m3_to_float(uint8_t c) {
    const uint32_t sign = static_cast<uint32_t>(c & 0x80u) << 24;
    const uint32_t exp = (c >> 3) & 0xfu, man = c & 0x7u;
    if (exp == 0xfu && man == 0x7u) return bits_float(sign | 0x7fc00000u);
    if (exp == 0) {  // subnormal or zero: man * 2^-9 (exact in float)
        const float v = static_cast<float>(man) * 0.001953125f;
        return sign ? -v : v;
    }
    return bits_float(sign | ((exp + 120u) << 23) | (man << 20));  // rebias 7 -> 127
}

// float -> fp8 e4m3fn: round to nearest even, saturate to +-448 (also +-inf), NaN -> NaN (0x7f / 0xff).
inline uint8_t float_to_fp8_e4m3(float f) {
    const uint32_t u = float_bits(f);
    const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
    const uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return static_cast<uint8_t>(sign | 0x7fu);  // NaN
    if (abs >= 0x43e00000u) return static_cast<uint8_t>(sign | 0x7eu);  // >= 448 (and inf): saturate
    if (abs < 0x3c800000u) {  // below 2^-6, the smallest normal: units of 2^-9, ties to even (8 units = 2^-6)
        const float v = bits_float(abs) * 512.0f;  // exact: a power-of-two scaling of a value < 2^-6
        uint32_t q = static_cast<uint32_t>(v);     // floor (v >= 0)
        const float rem = v - static_cast<float>(q);  // exact (v < 8)
        if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
        return static_cast<uint8_t>(sign | q);
    }
    // Normal: keep 3 mantissa bits, round to nearest even at bit 20 (a carry moves into the exponent; values below
    // 448 round to at most 448), then rebias 127 -> 7.
    const uint32_t r = (abs + 0x7ffffu + ((abs >> 20) & 1u)) >> 20;
    return static_cast<uint8_t>(sign | (r - (120u << 3)));
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
