// tests/test_dtype.cpp: element types: names/parsers and the exact bf16/fp16 conversions of switchyard/dtype.h.
//
// Known bit patterns (round to nearest even at ties, NaN quieting, fp16 subnormals and overflow), exhaustive
// round trips of every 16-bit pattern, and random fp32 patterns against independent references: F16C hardware
// conversion for fp16 (when this CPU has it) and a nearest-candidate search in double for both types.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "switchyard/config.h"
#include "switchyard/dtype.h"
#include "switchyard/error.h"
#include "switchyard/tensor.h"
#include "test_util.h"

namespace switchyard {
namespace {

TEST(DType, NamesAndSizes) {
    EXPECT_STREQ(to_string(DType::kF32), "fp32");
    EXPECT_STREQ(to_string(DType::kBF16), "bf16");
    EXPECT_STREQ(to_string(DType::kF16), "fp16");
    EXPECT_STREQ(to_string(DType::kI32), "int32");
    EXPECT_STREQ(to_string(DType::kI64), "int64");
    EXPECT_EQ(dtype_size(DType::kF32), 4u);
    EXPECT_EQ(dtype_size(DType::kBF16), 2u);
    EXPECT_EQ(dtype_size(DType::kF16), 2u);
    EXPECT_EQ(dtype_size(DType::kI32), 4u);
    EXPECT_EQ(dtype_size(DType::kI64), 8u);
    EXPECT_STREQ(to_string(Device::kCPU), "cpu");
    EXPECT_STREQ(to_string(Device::kCUDA), "cuda");
}

TEST(DType, ParseAcceptsCliSpellings) {
    for (const char* s : {"fp32", "f32", "float32"}) EXPECT_EQ(parse_dtype(s), DType::kF32) << s;
    for (const char* s : {"bf16", "bfloat16"}) EXPECT_EQ(parse_dtype(s), DType::kBF16) << s;
    for (const char* s : {"fp16", "f16", "float16"}) EXPECT_EQ(parse_dtype(s), DType::kF16) << s;
    EXPECT_EQ(parse_dtype("int32"), DType::kI32);
    EXPECT_EQ(parse_dtype("int64"), DType::kI64);
    for (DType t : {DType::kF32, DType::kBF16, DType::kF16, DType::kI32, DType::kI64})
        EXPECT_EQ(parse_dtype(to_string(t)), t);
}

TEST(DType, ParseRejectsAndNamesTheValue) {
    try {
        parse_dtype("fp4");
        FAIL() << "parse_dtype(fp4) did not throw";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("fp4"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("dtype"), std::string::npos) << e.what();
    }
    EXPECT_THROW(parse_dtype(""), Error);
}

TEST(BF16, KnownBitPatterns) {
    EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
    EXPECT_EQ(float_to_bf16(-2.0f), 0xc000);
    EXPECT_EQ(float_to_bf16(0.0f), 0x0000);
    EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
    // Ties go to even: 1 + 2^-8 is halfway between 0x3f80 and 0x3f81 -> 0x3f80; 0x3f818000 -> 0x3f82.
    EXPECT_EQ(float_to_bf16(bits_float(0x3f808000u)), 0x3f80);
    EXPECT_EQ(float_to_bf16(bits_float(0x3f818000u)), 0x3f82);
    EXPECT_EQ(float_to_bf16(bits_float(0x3f808001u)), 0x3f81);  // just above the tie
    EXPECT_EQ(float_to_bf16(bits_float(0x3f807fffu)), 0x3f80);  // just below
    // Infinities, overflow by rounding, NaN quieting with the sign kept.
    EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
    EXPECT_EQ(float_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
    EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);
    EXPECT_EQ(float_to_bf16(bits_float(0x7fc00000u)), 0x7fc0);
    EXPECT_EQ(float_to_bf16(bits_float(0x7f800001u)), 0x7fc0);  // signalling NaN whose payload is in low bits
    EXPECT_EQ(float_to_bf16(bits_float(0xffa00000u)), 0xffe0);
    // Subnormal fp32 values keep their bits (bf16 has fp32's exponent range).
    EXPECT_EQ(float_to_bf16(bits_float(0x00010000u)), 0x0001);
    EXPECT_EQ(bf16_to_float(0x3f80), 1.0f);
    EXPECT_EQ(bf16_to_float(0x0001), bits_float(0x00010000u));
    EXPECT_TRUE(std::isnan(bf16_to_float(0x7fc1)));
}

TEST(BF16, EveryPatternRoundTrips) {
    for (uint32_t h = 0; h < 0x10000u; ++h) {
        const float f = bf16_to_float(static_cast<uint16_t>(h));
        const uint16_t back = float_to_bf16(f);
        if (std::isnan(f)) {
            EXPECT_TRUE(std::isnan(bf16_to_float(back))) << "pattern " << h;
            EXPECT_EQ(back & 0x8000u, h & 0x8000u) << "pattern " << h;
        } else {
            ASSERT_EQ(back, h) << "pattern " << h;
        }
    }
}

// Nearest bf16 by comparing the two candidates (truncation and the next magnitude) in double; ties to even.
uint16_t bf16_reference(float f) {
    const uint16_t lo = static_cast<uint16_t>(float_bits(f) >> 16);
    const uint16_t hi = static_cast<uint16_t>(lo + 1);
    const double x = f, a = bf16_to_float(lo);
    const double b = std::isinf(bf16_to_float(hi)) ? std::copysign(std::ldexp(1.0, 128), x) : bf16_to_float(hi);
    const double da = std::fabs(x - a), db = std::fabs(x - b);
    if (da < db) return lo;
    if (db < da) return hi;
    return (lo & 1) ? hi : lo;
}

TEST(BF16, RandomPatternsMatchNearestSearch) {
    const uint64_t seed = 20261126;
    SCOPED_TRACE(test::seed_trace(seed));
    std::mt19937_64 gen(seed);
    for (int i = 0; i < 200000; ++i) {
        const float f = bits_float(static_cast<uint32_t>(gen()));
        if (!std::isfinite(f)) continue;
        ASSERT_EQ(float_to_bf16(f), bf16_reference(f)) << "input bits 0x" << std::hex << float_bits(f);
    }
}

TEST(FP16, KnownBitPatterns) {
    EXPECT_EQ(float_to_half(1.0f), 0x3c00);
    EXPECT_EQ(float_to_half(-2.0f), 0xc000);
    EXPECT_EQ(float_to_half(-0.0f), 0x8000);
    EXPECT_EQ(float_to_half(65504.0f), 0x7bff);   // largest finite
    EXPECT_EQ(float_to_half(65519.99f), 0x7bff);  // below the midpoint to 65536
    EXPECT_EQ(float_to_half(65520.0f), 0x7c00);   // the midpoint ties to even: inf
    EXPECT_EQ(float_to_half(1.0e6f), 0x7c00);
    EXPECT_EQ(float_to_half(-1.0e6f), 0xfc00);
    EXPECT_EQ(float_to_half(std::numeric_limits<float>::infinity()), 0x7c00);
    // Ties to even in the normal range: 1 + 2^-11 -> 1.0, 1 + 3 * 2^-11 -> 1 + 2^-9.
    EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
    EXPECT_EQ(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
    // Subnormals: unit 2^-24; 2^-25 ties to zero (even), 3 * 2^-26 rounds up to one unit, 3 * 2^-25 ties to 2.
    EXPECT_EQ(float_to_half(std::ldexp(1.0f, -24)), 0x0001);
    EXPECT_EQ(float_to_half(std::ldexp(1.0f, -25)), 0x0000);
    EXPECT_EQ(float_to_half(-std::ldexp(1.0f, -25)), 0x8000);
    EXPECT_EQ(float_to_half(3 * std::ldexp(1.0f, -26)), 0x0001);
    EXPECT_EQ(float_to_half(3 * std::ldexp(1.0f, -25)), 0x0002);
    EXPECT_EQ(float_to_half(1023 * std::ldexp(1.0f, -24)), 0x03ff);  // largest subnormal
    EXPECT_EQ(float_to_half(std::ldexp(1.0f, -14)), 0x0400);         // smallest normal
    EXPECT_EQ(float_to_half(std::ldexp(1.0f, -30)), 0x0000);
    EXPECT_EQ(float_to_half(std::numeric_limits<float>::denorm_min()), 0x0000);
    // NaN stays NaN with its sign.
    EXPECT_EQ(float_to_half(bits_float(0x7fc00000u)) & 0x7e00u, 0x7e00u);
    EXPECT_EQ(float_to_half(bits_float(0xffc00000u)) & 0xfe00u, 0xfe00u);
    // Decoding.
    EXPECT_EQ(half_to_float(0x0001), std::ldexp(1.0f, -24));
    EXPECT_EQ(half_to_float(0x03ff), 1023 * std::ldexp(1.0f, -24));
    EXPECT_EQ(half_to_float(0x8001), -std::ldexp(1.0f, -24));
    EXPECT_EQ(half_to_float(0x7bff), 65504.0f);
    EXPECT_EQ(half_to_float(0x7c00), std::numeric_limits<float>::infinity());
    EXPECT_EQ(half_to_float(0xfc00), -std::numeric_limits<float>::infinity());
    EXPECT_TRUE(std::isnan(half_to_float(0x7e00)));
    EXPECT_TRUE(std::isnan(half_to_float(0x7c01)));
}

TEST(FP16, EveryPatternRoundTrips) {
    for (uint32_t h = 0; h < 0x10000u; ++h) {
        const float f = half_to_float(static_cast<uint16_t>(h));
        const uint16_t back = float_to_half(f);
        if (std::isnan(f)) {
            EXPECT_TRUE(std::isnan(half_to_float(back))) << "pattern " << h;
        } else {
            ASSERT_EQ(back, h) << "pattern " << h;
        }
    }
}

// Nearest half by exhaustive search over the 0x7c00 finite magnitudes + inf (binary search on the sorted table).
uint16_t half_reference(float f) {
    static std::vector<double> mags = [] {
        std::vector<double> m(0x7c01);
        for (uint32_t h = 0; h <= 0x7c00u; ++h) m[h] = half_to_float(static_cast<uint16_t>(h));
        return m;
    }();
    const double x = std::fabs(static_cast<double>(f));
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    if (x >= 65520.0) return sign | 0x7c00;
    auto it = std::lower_bound(mags.begin(), mags.begin() + 0x7c00, x);
    uint32_t hi = static_cast<uint32_t>(it - mags.begin());
    if (hi < 0x7c00u && mags[hi] == x) return static_cast<uint16_t>(sign | hi);
    const uint32_t lo = hi - 1;
    const double dl = x - mags[lo], dh = (hi == 0x7c00u ? 65536.0 : mags[hi]) - x;
    if (dl < dh) return static_cast<uint16_t>(sign | lo);
    if (dh < dl) return static_cast<uint16_t>(sign | hi);
    return static_cast<uint16_t>(sign | ((lo & 1) ? hi : lo));
}

TEST(FP16, RandomPatternsMatchNearestSearch) {
    const uint64_t seed = 7;
    SCOPED_TRACE(test::seed_trace(seed));
    std::mt19937_64 gen(seed);
    for (int i = 0; i < 200000; ++i) {
        // Half the draws in the fp16 range (exponent 2^-26 .. 2^17), half anywhere.
        uint32_t u = static_cast<uint32_t>(gen());
        if (i % 2 == 0) u = (u & 0x807fffffu) | ((101u + static_cast<uint32_t>(gen() % 44)) << 23);
        const float f = bits_float(u);
        if (std::isnan(f)) continue;
        ASSERT_EQ(float_to_half(f), half_reference(f)) << "input bits 0x" << std::hex << u;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("f16c"))) uint16_t hardware_half(float f) {
    return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
__attribute__((target("f16c"))) float hardware_half_to_float(uint16_t h) { return _cvtsh_ss(h); }

TEST(FP16, MatchesF16CHardware) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("f16c")) GTEST_SKIP() << "this CPU has no F16C";
    for (uint32_t h = 0; h < 0x10000u; ++h) {
        const float a = half_to_float(static_cast<uint16_t>(h)), b = hardware_half_to_float(static_cast<uint16_t>(h));
        if (std::isnan(b))
            ASSERT_TRUE(std::isnan(a)) << h;
        else
            ASSERT_EQ(float_bits(a), float_bits(b)) << "pattern " << h;
    }
    const uint64_t seed = 11;
    SCOPED_TRACE(test::seed_trace(seed));
    std::mt19937_64 gen(seed);
    for (int i = 0; i < 500000; ++i) {
        uint32_t u = static_cast<uint32_t>(gen());
        if (i % 2 == 0) u = (u & 0x807fffffu) | ((100u + static_cast<uint32_t>(gen() % 46)) << 23);
        const float f = bits_float(u);
        if (std::isnan(f)) continue;
        ASSERT_EQ(float_to_half(f), hardware_half(f)) << "input bits 0x" << std::hex << u;
    }
}
#endif

TEST(RoundTo, IsStoreThenLoad) {
    EXPECT_EQ(round_to(DType::kF32, 1.1f), 1.1f);
    EXPECT_EQ(round_to(DType::kBF16, 1.1f), bf16_to_float(float_to_bf16(1.1f)));
    EXPECT_EQ(round_to(DType::kF16, 1.1f), half_to_float(float_to_half(1.1f)));
    EXPECT_NE(round_to(DType::kBF16, 1.1f), 1.1f);
    EXPECT_EQ(round_to(DType::kF16, 70000.0f), std::numeric_limits<float>::infinity());
    EXPECT_EQ(round_to(DType::kBF16, 70000.0f), 70144.0f);
}

}  // namespace
}  // namespace switchyard
