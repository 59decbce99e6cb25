// tests/test_fp8.cpp: fp8 e4m3 conversions (issue 13).
//
// switchyard/dtype.h's e4m3fn conversions against a table and an encoder written here from the format definition
// (nearest of the finite values, ties to the even code, saturation at 448).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "switchyard/config.h"
#include "switchyard/dtype.h"
#include "test_util.h"

namespace switchyard {
namespace {

using test::HostTensor;

// ---- an independent e4m3fn -------------------------------------------------------------------------------------
// Value of code c from the format definition: sign, 4-bit exponent (bias 7), 3-bit mantissa, S.1111.111 = NaN.
double e4m3_value(int c) {
    const int s = (c >> 7) & 1, e = (c >> 3) & 15, m = c & 7;
    if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
    const double mag = e == 0 ? std::ldexp(m, -9) : std::ldexp(8 + m, e - 10);  // (1 + m/8) 2^(e-7)
    return s ? -mag : mag;
}

// Nearest finite code (ties to the even code), saturating at 448; NaN -> 0x7f. A search over the 127 values.
int e4m3_encode(double v) {
    static const std::vector<double> table = [] {
        std::vector<double> t(0x7f);
        for (int c = 0; c < 0x7f; ++c) t[c] = e4m3_value(c);
        return t;
    }();
    if (std::isnan(v)) return 0x7f;
    const int sign = std::signbit(v) ? 0x80 : 0;
    const double a = std::min(std::fabs(v), 448.0);
    int best = 0;
    double best_d = std::fabs(a - table[0]);
    for (int c = 1; c <= 0x7e; ++c) {
        const double d = std::fabs(a - table[c]);
        if (d < best_d || (d == best_d && (c & 1) == 0 && (best & 1) == 1)) {
            best = c;
            best_d = d;
        }
    }
    return sign | best;
}

TEST(Fp8, DecodeEveryCode) {
    for (int c = 0; c < 256; ++c) {
        const float got = fp8_e4m3_to_float(static_cast<uint8_t>(c));
        const double want = e4m3_value(c);
        if (std::isnan(want)) {
            EXPECT_TRUE(std::isnan(got)) << "code " << c;
            continue;
        }
        EXPECT_EQ(static_cast<double>(got), want) << "code " << c;
        EXPECT_EQ(std::signbit(got), (c & 0x80) != 0) << "code " << c;
    }
    EXPECT_EQ(fp8_e4m3_to_float(0x7e), 448.0f);
    EXPECT_EQ(fp8_e4m3_to_float(0x01), std::ldexp(1.0f, -9));
    EXPECT_EQ(fp8_e4m3_to_float(0x08), std::ldexp(1.0f, -6));
    EXPECT_TRUE(std::isnan(fp8_e4m3_to_float(0xff)));
}

TEST(Fp8, EncodeRoundTripsEveryCode) {
    for (int c = 0; c < 256; ++c) {
        if ((c & 0x7f) == 0x7f) continue;
        EXPECT_EQ(float_to_fp8_e4m3(fp8_e4m3_to_float(static_cast<uint8_t>(c))), c) << "code " << c;
    }
}

TEST(Fp8, EncodeTiesToEvenAndNeighbours) {
    for (int c = 0; c < 0x7e; ++c) {
        for (int sign : {0, 0x80}) {
            const double lo = e4m3_value(c), hi = e4m3_value(c + 1);
            const float mid = static_cast<float>((lo + hi) / 2);  // exact in float
            ASSERT_EQ(static_cast<double>(mid), (lo + hi) / 2);
            const float s = sign ? -1.0f : 1.0f;
            const int even = (c & 1) == 0 ? c : c + 1;
            EXPECT_EQ(float_to_fp8_e4m3(s * mid), sign | even) << "midpoint of " << c << " and " << c + 1;
            EXPECT_EQ(float_to_fp8_e4m3(s * std::nextafter(mid, 0.0f)), sign | c) << "below midpoint " << c;
            EXPECT_EQ(float_to_fp8_e4m3(s * std::nextafter(mid, 1000.0f)), sign | (c + 1)) << "above midpoint " << c;
            EXPECT_EQ(float_to_fp8_e4m3(s * mid), e4m3_encode(s * mid));
        }
    }
    // Random values against the brute-force encoder.
    const std::vector<float> v = test::random_uniform(20000, 7, -500.0f, 500.0f);
    for (float x : v) {
        const float y = x * std::ldexp(1.0f, static_cast<int>(std::fabs(x)) % 24 - 16);
        EXPECT_EQ(float_to_fp8_e4m3(y), e4m3_encode(y)) << y;
    }
}

TEST(Fp8, EncodeSaturatesAndKeepsNaN) {
    const float inf = std::numeric_limits<float>::infinity();
    for (float v : {448.0f, 449.0f, 464.0f, 480.0f, 1e6f, 3e38f, inf}) {
        EXPECT_EQ(float_to_fp8_e4m3(v), 0x7e) << v;
        EXPECT_EQ(float_to_fp8_e4m3(-v), 0xfe) << -v;
    }
    EXPECT_EQ(float_to_fp8_e4m3(432.0f), 0x7e);      // tie between 416 (odd) and 448 (even)
    EXPECT_EQ(float_to_fp8_e4m3(431.99997f), 0x7d);  // below it: 416
    EXPECT_EQ(float_to_fp8_e4m3(std::nanf("")) & 0x7f, 0x7f);
    EXPECT_EQ(float_to_fp8_e4m3(-std::nanf("")), 0xff);
    EXPECT_EQ(float_to_fp8_e4m3(std::ldexp(1.0f, -10)), 0x00);  // half the smallest subnormal: tie to 0
    EXPECT_EQ(float_to_fp8_e4m3(std::ldexp(3.0f, -10)), 0x02);  // 1.5 units: tie to 2
    EXPECT_EQ(float_to_fp8_e4m3(std::ldexp(3.0f, -11)), 0x01);  // 0.75 units: 1
    EXPECT_EQ(float_to_fp8_e4m3(1e-30f), 0x00);
    EXPECT_EQ(float_to_fp8_e4m3(-0.0f), 0x80);
}

TEST(Fp8, DTypeNames) {
    EXPECT_EQ(dtype_size(DType::kF8E4M3), 1u);
    EXPECT_STREQ(to_string(DType::kF8E4M3), "fp8e4m3");
    for (const char* s : {"fp8", "fp8e4m3", "f8_e4m3", "F8_E4M3"}) EXPECT_EQ(parse_dtype(s), DType::kF8E4M3) << s;
    EXPECT_EQ(to_string(DType::kF8E4M3), std::string(to_string(parse_dtype(to_string(DType::kF8E4M3)))));
}

}  // namespace
}  // namespace switchyard
