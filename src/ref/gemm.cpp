// src/ref/gemm.cpp: the CPU backend's one dense product, c = a · b^T in double.
//
// Inputs:  a [m, k] fp32 row-major (activations, already decoded), b [n, k] row-major of fp32/bf16/fp16
//          (a weight in nn.Linear layout [out, in]).
// Output:  c [m, n] double row-major.
// Rule:    c[i, n] = ((0.0 + a[i,0]*b[n,0]) + a[i,1]*b[n,1]) + ...  in increasing k. A product of two floats
//          is exact in double, so an FMA and a multiply-then-add round identically: every micro-kernel below
//          gives the naive loop's bits, whatever the thread count (no split-k, no reassociation).
//
// Blocking (Goto style): rows of a in blocks of kMc, packed once per block as double panels
//   ap[mp][kk][MR]  (MR rows side by side for every kk; rows past m are zero);
// columns of b in blocks of kNcPanels * NR, one block per OpenMP work item; for each k block of kKc the
// block is converted (from its own dtype) and packed as
//   bp[np][kk][NR]  (NR columns side by side; columns past n are zero);
// the micro-kernel keeps an MR x NR tile of c in registers for kc steps (broadcast a, vector load b, FMA)
// and accumulates into a per-thread double tile [MC, NC] that is written out after the last k block.
// With AVX-512 the b panels are packed 8 rows x 8 k at a time (decode, 8x8 register transpose, widen to
// double); the portable packer decodes one row at a time. Tiny products (under kMinParallelFlops) stay on the
// calling thread.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// GCC 12 reports its own _mm512_cvtps_pd (an _mm512_undefined_pd inside the header) as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "ref/ref.h"
#include "switchyard/error.h"

namespace switchyard {
namespace ref {
namespace {

constexpr int64_t kKc = 256;                   // k block (a micro-panel of b: kKc * NR doubles stays in L1/L2)
constexpr int64_t kMc = 240;                   // rows of a per outer block (multiple of every MR below)
constexpr int64_t kNcPanels = 8;               // NR-wide panels per column block (one OpenMP work item)
constexpr double kMinParallelFlops = 1 << 18;  // below this a product runs on the calling thread

// c tile [MR, NR] at c (row stride ldc) += ap[kc][MR] x bp[kc][NR]; starts from zero when !load_c.
using MicroFn = void (*)(int64_t kc, const double* ap, const double* bp, double* c, int64_t ldc, bool load_c);

// Packs b rows [n0, n0 + rows) (rows <= nr; the rest of the panel is zero), columns [k0, k0 + kc), into
// panel[kk][nr] as double. Null: the portable packer below.
using PackFn = void (*)(const MatView& b, int64_t n0, int64_t rows, int64_t k0, int64_t kc, double* panel, int64_t nr);

struct Kernel {
    const char* name;
    int64_t mr;
    int64_t nr;
    MicroFn fn;
    PackFn pack;
};

template <int64_t MR, int64_t NR>
void micro_generic(int64_t kc, const double* ap, const double* bp, double* c, int64_t ldc, bool load_c) {
    double acc[MR][NR];
    for (int64_t i = 0; i < MR; ++i)
        for (int64_t j = 0; j < NR; ++j) acc[i][j] = load_c ? c[i * ldc + j] : 0.0;
    for (int64_t p = 0; p < kc; ++p) {
        for (int64_t i = 0; i < MR; ++i) {
            const double av = ap[i];
            for (int64_t j = 0; j < NR; ++j) acc[i][j] += av * bp[j];
        }
        ap += MR;
        bp += NR;
    }
    for (int64_t i = 0; i < MR; ++i)
        for (int64_t j = 0; j < NR; ++j) c[i * ldc + j] = acc[i][j];
}

#if defined(__x86_64__) && defined(__GNUC__)
#define SWITCHYARD_REF_X86 1

// 4 rows x 12 columns: 12 accumulators + 3 b vectors + 1 broadcast = the 16 ymm registers.
__attribute__((target("avx2,fma"))) void micro_avx2(int64_t kc, const double* ap, const double* bp, double* c,
                                                    int64_t ldc, bool load_c) {
    __m256d acc[4][3];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
#pragma GCC unroll 3
        for (int j = 0; j < 3; ++j) acc[i][j] = load_c ? _mm256_loadu_pd(c + i * ldc + 4 * j) : _mm256_setzero_pd();
    for (int64_t p = 0; p < kc; ++p) {
        const __m256d b0 = _mm256_loadu_pd(bp);
        const __m256d b1 = _mm256_loadu_pd(bp + 4);
        const __m256d b2 = _mm256_loadu_pd(bp + 8);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
            const __m256d av = _mm256_broadcast_sd(ap + i);
            acc[i][0] = _mm256_fmadd_pd(av, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_pd(av, b1, acc[i][1]);
            acc[i][2] = _mm256_fmadd_pd(av, b2, acc[i][2]);
        }
        ap += 4;
        bp += 12;
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
#pragma GCC unroll 3
        for (int j = 0; j < 3; ++j) _mm256_storeu_pd(c + i * ldc + 4 * j, acc[i][j]);
}

// 8 rows x 24 columns: 24 accumulators + 3 b vectors + 1 broadcast of the 32 zmm registers.
__attribute__((target("avx512f"))) void micro_avx512(int64_t kc, const double* ap, const double* bp, double* c,
                                                     int64_t ldc, bool load_c) {
    __m512d acc[8][3];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
#pragma GCC unroll 3
        for (int j = 0; j < 3; ++j) acc[i][j] = load_c ? _mm512_loadu_pd(c + i * ldc + 8 * j) : _mm512_setzero_pd();
    for (int64_t p = 0; p < kc; ++p) {
        const __m512d b0 = _mm512_loadu_pd(bp);
        const __m512d b1 = _mm512_loadu_pd(bp + 8);
        const __m512d b2 = _mm512_loadu_pd(bp + 16);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
            const __m512d av = _mm512_set1_pd(ap[i]);
            acc[i][0] = _mm512_fmadd_pd(av, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_pd(av, b1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_pd(av, b2, acc[i][2]);
        }
        ap += 8;
        bp += 24;
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
#pragma GCC unroll 3
        for (int j = 0; j < 3; ++j) _mm512_storeu_pd(c + i * ldc + 8 * j, acc[i][j]);
}

// 8 x 8 float transpose: r[j][t] -> r[t][j].
__attribute__((target("avx2"))) inline void transpose8(__m256 r[8]) {
    __m256 t[8], s[8];
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {  // h = 0: rows 0-3, h = 1: rows 4-7
        s[4 * h + 0] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], 0x44);
        s[4 * h + 1] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], 0xEE);
        s[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
        s[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x20);
        r[4 + i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x31);
    }
}

// Eight consecutive elements of b from element offset i, decoded exactly to float (F16C's conversion is exact
// and equals half_to_float; bf16 is a shift).
__attribute__((target("avx512f,avx2,f16c"))) inline __m256 load8(const MatView& b, int64_t i) {
    switch (b.dtype) {
        case DType::kBF16: {
            const __m128i h =
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(b.data) + i));
            return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        }
        case DType::kF16:
            return _mm256_cvtph_ps(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(b.data) + i)));
        default:
            return _mm256_loadu_ps(static_cast<const float*>(b.data) + i);
    }
}

// Vectorised packer for panels whose width is a multiple of 8: 8 rows x 8 k at a time, transposed in registers.
__attribute__((target("avx512f,avx2,f16c"))) void pack_avx512(const MatView& b, int64_t n0, int64_t rows, int64_t k0,
                                                              int64_t kc, double* panel, int64_t nr) {
    const int64_t k = b.cols;
    for (int64_t j0 = 0; j0 < nr; j0 += 8) {
        int64_t kk = 0;
        for (; kk + 8 <= kc; kk += 8) {
            __m256 r[8];
            for (int j = 0; j < 8; ++j)
                r[j] = (j0 + j < rows) ? load8(b, (n0 + j0 + j) * k + k0 + kk) : _mm256_setzero_ps();
            transpose8(r);
            for (int t = 0; t < 8; ++t) _mm512_storeu_pd(panel + (kk + t) * nr + j0, _mm512_cvtps_pd(r[t]));
        }
        for (; kk < kc; ++kk)
            for (int64_t j = 0; j < 8; ++j) {
                double v = 0.0;
                if (j0 + j < rows) {
                    const int64_t i = (n0 + j0 + j) * k + k0 + kk;
                    v = b.dtype == DType::kBF16  ? bf16_to_float(static_cast<const uint16_t*>(b.data)[i])
                        : b.dtype == DType::kF16 ? half_to_float(static_cast<const uint16_t*>(b.data)[i])
                                                 : static_cast<const float*>(b.data)[i];
                }
                panel[kk * nr + j0 + j] = v;
            }
    }
}
#endif

std::vector<Kernel> kernels_for_this_cpu() {
    std::vector<Kernel> out;
#ifdef SWITCHYARD_REF_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
        out.push_back({"avx512", 8, 24, micro_avx512, pack_avx512});
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        out.push_back({"avx2", 4, 12, micro_avx2, nullptr});
#endif
    out.push_back({"generic", 4, 8, micro_generic<4, 8>, nullptr});
    return out;
}

const std::vector<Kernel>& all_kernels() {
    static const std::vector<Kernel> k = kernels_for_this_cpu();
    return k;
}

// dst[i] = (double) src element (offset + i), i < len. Exact decoding; loops the compiler vectorises.
void decode_row(const MatView& b, int64_t offset, int64_t len, double* dst) {
    switch (b.dtype) {
        case DType::kF32: {
            const float* p = static_cast<const float*>(b.data) + offset;
            for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<double>(p[i]);
            break;
        }
        case DType::kBF16: {
            const uint16_t* p = static_cast<const uint16_t*>(b.data) + offset;
            for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<double>(bf16_to_float(p[i]));
            break;
        }
        case DType::kF16: {
            const uint16_t* p = static_cast<const uint16_t*>(b.data) + offset;
            for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<double>(half_to_float(p[i]));
            break;
        }
        default:
            SWITCHYARD_FAIL("gemm_nt: unsupported weight dtype ", to_string(b.dtype));
    }
}

void gemm_run(const Kernel& kn, const float* a, int64_t m, int64_t k, const MatView& b, double* c) {
    const int64_t n = b.rows;
    SWITCHYARD_CHECK(m >= 0 && k >= 0 && n >= 0, "gemm_nt: negative size m=", m, " k=", k, " n=", n);
    SWITCHYARD_CHECK(b.cols == k, "gemm_nt: b has ", b.cols, " columns, expected k=", k);
    if (m == 0 || n == 0) return;
    if (k == 0) {
        std::fill(c, c + m * n, 0.0);
        return;
    }
    SWITCHYARD_CHECK(a != nullptr && b.data != nullptr && c != nullptr, "gemm_nt: null pointer");
    const int64_t mr = kn.mr, nr = kn.nr;
    const int64_t nc_max = kNcPanels * nr;
    const int64_t num_nb = (n + nc_max - 1) / nc_max;
    const int64_t mc_max = std::min(kMc, (m + mr - 1) / mr * mr);
    std::vector<double> ap(static_cast<size_t>(mc_max * k));

    for (int64_t m0 = 0; m0 < m; m0 += kMc) {
        const int64_t mc = std::min(kMc, m - m0);
        const int64_t mpn = (mc + mr - 1) / mr;
        const bool parallel =
            static_cast<double>(mc) * static_cast<double>(n) * static_cast<double>(k) >= kMinParallelFlops;
#pragma omp parallel if (parallel)
        {
#pragma omp for schedule(static)
            for (int64_t mp = 0; mp < mpn; ++mp) {
                double* dst = ap.data() + mp * k * mr;
                for (int64_t i = 0; i < mr; ++i) {
                    const int64_t row = m0 + mp * mr + i;
                    if (row < m) {
                        const float* src = a + row * k;
                        for (int64_t kk = 0; kk < k; ++kk) dst[kk * mr + i] = static_cast<double>(src[kk]);
                    } else {
                        for (int64_t kk = 0; kk < k; ++kk) dst[kk * mr + i] = 0.0;
                    }
                }
            }
            // Per-thread buffers: one packed b block and the c tile of the current column block.
            std::vector<double> bp(static_cast<size_t>(nc_max * std::min(kKc, k)));
            std::vector<double> ctile(static_cast<size_t>(mpn * mr * nc_max));
            std::vector<double> row(static_cast<size_t>(std::min(kKc, k)));
#pragma omp for schedule(dynamic, 1)
            for (int64_t nb = 0; nb < num_nb; ++nb) {
                const int64_t n0 = nb * nc_max;
                const int64_t nc = std::min(nc_max, n - n0);
                const int64_t npn = (nc + nr - 1) / nr;
                for (int64_t k0 = 0; k0 < k; k0 += kKc) {
                    const int64_t kc = std::min(kKc, k - k0);
                    for (int64_t np = 0; np < npn; ++np) {
                        double* panel = bp.data() + np * kc * nr;
                        if (kn.pack != nullptr &&
                            (b.dtype == DType::kF32 || b.dtype == DType::kBF16 || b.dtype == DType::kF16)) {
                            kn.pack(b, n0 + np * nr, std::min(nr, n - n0 - np * nr), k0, kc, panel, nr);
                            continue;
                        }
                        for (int64_t j = 0; j < nr; ++j) {
                            const int64_t col = n0 + np * nr + j;
                            if (col < n) {
                                decode_row(b, col * k + k0, kc, row.data());
                                for (int64_t kk = 0; kk < kc; ++kk) panel[kk * nr + j] = row[kk];
                            } else {
                                for (int64_t kk = 0; kk < kc; ++kk) panel[kk * nr + j] = 0.0;
                            }
                        }
                    }
                    for (int64_t np = 0; np < npn; ++np)
                        for (int64_t mp = 0; mp < mpn; ++mp)
                            kn.fn(kc, ap.data() + mp * k * mr + k0 * mr, bp.data() + np * kc * nr,
                                  ctile.data() + mp * mr * nc_max + np * nr, nc_max, k0 > 0);
                }
                for (int64_t i = 0; i < mc; ++i)
                    std::memcpy(c + (m0 + i) * n + n0, ctile.data() + i * nc_max, static_cast<size_t>(nc) * 8);
            }
        }
    }
}

}  // namespace

void gemm_nt(const float* a, int64_t m, int64_t k, const MatView& b, double* c) {
    gemm_run(all_kernels().front(), a, m, k, b, c);
}

std::vector<std::string> available_gemm_kernels() {
    std::vector<std::string> names;
    for (const Kernel& kn : all_kernels()) names.emplace_back(kn.name);
    return names;
}

void gemm_nt_kernel(const std::string& kernel, const float* a, int64_t m, int64_t k, const MatView& b, double* c) {
    for (const Kernel& kn : all_kernels())
        if (kernel == kn.name) return gemm_run(kn, a, m, k, b, c);
    SWITCHYARD_FAIL("gemm_nt_kernel: kernel=", kernel, " is not available on this CPU");
}

}  // namespace ref
}  // namespace switchyard
