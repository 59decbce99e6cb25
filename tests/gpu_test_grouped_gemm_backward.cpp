// tests/gpu_test_grouped_gemm_backward.cpp: cuda::grouped_gemm_dgrad / grouped_gemm_wgrad (src/cuda/gemm/grouped_gemm.h)
// against a CPU double reference.
//
// For each case: random dC [max_rows, N], A [max_rows, K], B [E, N, K] (small integers, where fp32 accumulation is
// exact and the result must equal the reference rounded once to the dtype, bit for bit; or reals in [-1, 1) with a
// tolerance from the arithmetic: half an ulp of the output dtype (taken as one) plus the worst-case fp32
// accumulation error 2 * Q * 2^-24 * sum |terms| over a reduction of length Q (the factor 2 allows the tensor cores'
// truncating adds), plus half the fp16 subnormal step for fp16), per-expert row counts from {0, 1, 7, 129, 4097}
// and random ones, E in {1, 8, 60}, N and K multiples of 8 (any N, K for fp32), every dtype. Outputs are poisoned
// with NaN (0xFF bytes) first: dA rows past offsets[E] must come back 0, dB of experts without rows must come back
// 0, 16 guard bytes past each output must stay untouched. A second run must give the same bits; one variant replays
// a captured CUDA graph after the device offsets changed. Unsupported sizes are rejected with switchyard::Error.
// Every test skips without a CUDA device (and the 16-bit ones without an sm_90 GPU).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/gemm/grouped_gemm.h"
#include "gpu_test_util.h"
#include "switchyard/dtype.h"
#include "switchyard/error.h"

namespace switchyard {
namespace {

using cuda::GroupedGemmGradArgs;
using cuda::GemmRaster;
using cuda::GroupedGemmTile;
using testing::DeviceBuffer;

int gpu_major() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        cudaGetLastError();
        return -1;
    }
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
    return major;
}

#define SKIP_WITHOUT_GPU(dtype)                                                                              \
    do {                                                                                                     \
        const int major_ = gpu_major();                                                                      \
        if (major_ < 0) GTEST_SKIP() << "no CUDA device";                                                    \
        if ((dtype) != DType::kF32 && major_ != 9) GTEST_SKIP() << "16-bit grouped GEMM needs an sm_90 GPU"; \
    } while (0)

constexpr size_t kGuard = 16;  // poisoned bytes past each output that must stay untouched

struct Case {
    DType dtype = DType::kBF16;
    std::vector<int> counts;  // rows per expert
    int64_t n = 0;
    int64_t k = 0;
    int64_t slack_rows = 0;  // max_rows = sum(counts) + slack_rows
    bool integer_inputs = true;
    bool graph = false;  // run through a captured CUDA graph, offsets changed after capture
    GemmRaster raster = GemmRaster::kAuto;
    GroupedGemmTile dgrad_tile = GroupedGemmTile::kAuto;
    cuda::GroupedGemmEpilogue wgrad_epilogue = cuda::GroupedGemmEpilogue::kAuto;
    cuda::GroupedGemmEpilogue dgrad_epilogue = cuda::GroupedGemmEpilogue::kAuto;
    uint32_t seed = 1;
};

std::string describe(const Case& c) {
    std::ostringstream os;
    os << "dtype=" << to_string(c.dtype) << " E=" << c.counts.size() << " n=" << c.n << " k=" << c.k
       << " slack=" << c.slack_rows << (c.integer_inputs ? " integer" : " real") << (c.graph ? " graph" : "")
       << " dgrad_tile=" << static_cast<int>(c.dgrad_tile) << " wgrad_epilogue=" << static_cast<int>(c.wgrad_epilogue)
       << " dgrad_epilogue=" << static_cast<int>(c.dgrad_epilogue)
       << " seed=" << c.seed << " counts=[";
    for (size_t i = 0; i < c.counts.size() && i < 16; ++i) os << (i ? "," : "") << c.counts[i];
    if (c.counts.size() > 16) os << ",...";
    os << "]";
    return os.str();
}

std::vector<float> draw(size_t n, DType t, bool integer, std::mt19937& rng) {
    std::uniform_int_distribution<int> small_int(-3, 3);
    std::uniform_real_distribution<float> real(-1.0f, 1.0f);
    std::vector<float> v(n);
    for (auto& x : v) x = round_to(t, integer ? static_cast<float>(small_int(rng)) : real(rng));
    return v;
}

// Compares one output element; counts and reports the first mismatch.
struct Checker {
    DType dtype;
    bool integer;
    const char* what;
    int64_t bad = 0;
    void check(double got, double sum, double mag, int64_t q_len, const std::string& where) {
        bool ok;
        double expected;
        if (integer) {  // exact fp32 accumulation, then one rounding to the dtype
            expected = round_to(dtype, static_cast<float>(sum));
            ok = got == expected;
        } else {
            const double out_u = dtype == DType::kBF16  ? std::ldexp(1.0, -8)
                                 : dtype == DType::kF16 ? std::ldexp(1.0, -10)
                                                        : std::ldexp(1.0, -24);
            const double acc = 2.0 * static_cast<double>(q_len) * std::ldexp(1.0, -24) * mag;
            // fp16 results below 2^-14 are subnormal: their rounding step is absolute (2^-24; half of it taken).
            const double sub = dtype == DType::kF16 ? std::ldexp(1.0, -25) : 0.0;
            expected = sum;
            ok = std::fabs(got - sum) <= out_u * std::fabs(sum) + acc + sub;
        }
        if (!ok && bad++ == 0) {
            ADD_FAILURE() << what << ": first mismatch at " << where << ": got " << got << " expected " << expected
                          << " (sum |terms| = " << mag << ", reduction length " << q_len << ")";
        }
    }
};

void check_guard(const std::vector<uint8_t>& bytes, size_t payload, const char* what) {
    for (size_t i = payload; i < bytes.size(); ++i) {
        if (bytes[i] != 0xff) {
            ADD_FAILURE() << what << ": guard byte " << i - payload << " past the output was written";
            return;
        }
    }
}

void run_case(const Case& c) {
    SCOPED_TRACE(describe(c));
    const int64_t num_groups = static_cast<int64_t>(c.counts.size());
    std::vector<int32_t> offsets(num_groups + 1, 0);
    for (int64_t e = 0; e < num_groups; ++e) offsets[e + 1] = offsets[e] + c.counts[e];
    const int64_t used = offsets[num_groups];
    const int64_t max_rows = used + c.slack_rows;
    const int64_t n = c.n, k = c.k;

    std::mt19937 rng(c.seed);
    const std::vector<float> dc = draw(static_cast<size_t>(max_rows * n), c.dtype, c.integer_inputs, rng);
    const std::vector<float> a = draw(static_cast<size_t>(max_rows * k), c.dtype, c.integer_inputs, rng);
    const std::vector<float> b = draw(static_cast<size_t>(num_groups * n * k), c.dtype, c.integer_inputs, rng);

    const size_t esz = dtype_size(c.dtype);
    const size_t da_bytes = static_cast<size_t>(max_rows * k) * esz;
    const size_t db_bytes = static_cast<size_t>(num_groups * n * k) * esz;
    DeviceBuffer d_dc, d_a, d_b, d_off, d_da(da_bytes + kGuard), d_db(db_bytes + kGuard);
    testing::upload(d_dc, dc, c.dtype);
    testing::upload(d_a, a, c.dtype);
    testing::upload(d_b, b, c.dtype);
    // With c.graph the offsets first hold a different grouping (every row in the last expert) while capturing.
    std::vector<int32_t> capture_offsets(num_groups + 1, 0);
    capture_offsets[num_groups] = static_cast<int32_t>(used);
    testing::upload_raw(d_off, c.graph ? capture_offsets : offsets);

    GroupedGemmGradArgs args;
    args.dc = d_dc.get();
    args.a = d_a.get();
    args.b = d_b.get();
    args.da = d_da.get();
    args.db = d_db.get();
    args.dtype = c.dtype;
    args.num_groups = num_groups;
    args.n = n;
    args.k = k;
    args.max_rows = max_rows;
    args.offsets = d_off.get<const int32_t>();
    args.raster = c.raster;
    args.dgrad_tile = c.dgrad_tile;
    args.wgrad_epilogue = c.wgrad_epilogue;
    args.dgrad_epilogue = c.dgrad_epilogue;
    ASSERT_TRUE(cuda::grouped_gemm_grad_supported(args));
    const size_t ws_bytes = cuda::grouped_gemm_grad_workspace_size(args);
    DeviceBuffer d_ws(ws_bytes);
    cudaStream_t stream = nullptr;
    GPU_CHECK(cudaStreamCreate(&stream));

    cudaGraphExec_t exec = nullptr;
    if (c.graph) {
        // One eager call first (per-device one-time set-up such as the kernels' shared-memory attribute happens
        // outside the capture, as a training loop warms up before capturing).
        cuda::grouped_gemm_dgrad(args, d_ws.get(), ws_bytes, stream);
        cuda::grouped_gemm_wgrad(args, d_ws.get(), ws_bytes, stream);
        GPU_CHECK(cudaStreamSynchronize(stream));
        cudaGraph_t graph = nullptr;
        GPU_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        cuda::grouped_gemm_dgrad(args, d_ws.get(), ws_bytes, stream);
        cuda::grouped_gemm_wgrad(args, d_ws.get(), ws_bytes, stream);
        GPU_CHECK(cudaStreamEndCapture(stream, &graph));
        GPU_CHECK(cudaGraphInstantiate(&exec, graph, 0));
        GPU_CHECK(cudaGraphDestroy(graph));
        GPU_CHECK(cudaMemcpy(d_off.get(), offsets.data(), offsets.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
    }

    std::vector<uint8_t> got_da[2], got_db[2];
    for (int run = 0; run < 2; ++run) {
        GPU_CHECK(cudaMemset(d_da.get(), 0xff, da_bytes + kGuard));  // NaN in every dtype
        GPU_CHECK(cudaMemset(d_db.get(), 0xff, db_bytes + kGuard));
        if (c.graph) {
            GPU_CHECK(cudaGraphLaunch(exec, stream));
        } else {
            cuda::grouped_gemm_dgrad(args, d_ws.get(), ws_bytes, stream);
            cuda::grouped_gemm_wgrad(args, d_ws.get(), ws_bytes, stream);
        }
        GPU_CHECK(cudaStreamSynchronize(stream));
        got_da[run] = testing::download_raw<uint8_t>(d_da.get(), da_bytes + kGuard);
        got_db[run] = testing::download_raw<uint8_t>(d_db.get(), db_bytes + kGuard);
    }
    if (exec) GPU_CHECK(cudaGraphExecDestroy(exec));
    GPU_CHECK(cudaStreamDestroy(stream));
    EXPECT_TRUE(testing::bitwise_equal(got_da[0], got_da[1], "dA, second run (bitwise reproducibility)"));
    EXPECT_TRUE(testing::bitwise_equal(got_db[0], got_db[1], "dB, second run (bitwise reproducibility)"));
    check_guard(got_da[0], da_bytes, "dA");
    check_guard(got_db[0], db_bytes, "dB");
    const std::vector<float> da = testing::decode(
        std::vector<uint8_t>(got_da[0].begin(), got_da[0].begin() + static_cast<std::ptrdiff_t>(da_bytes)), c.dtype);
    const std::vector<float> db = testing::decode(
        std::vector<uint8_t>(got_db[0].begin(), got_db[0].begin() + static_cast<std::ptrdiff_t>(db_bytes)), c.dtype);

    // dgrad reference: dA[r, q] = sum_j dC[r, j] B[e, j, q], reduction length N.
    Checker cd{c.dtype, c.integer_inputs, "dA"};
    std::vector<double> sum(static_cast<size_t>(std::max(k, n * k))), mag(sum.size());
    for (int64_t e = 0; e < num_groups; ++e) {
        for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
            std::fill(sum.begin(), sum.begin() + k, 0.0);
            std::fill(mag.begin(), mag.begin() + k, 0.0);
            for (int64_t j = 0; j < n; ++j) {
                const double g = dc[r * n + j];
                const float* bj = &b[(e * n + j) * k];
                for (int64_t q = 0; q < k; ++q) {
                    const double p = g * bj[q];
                    sum[q] += p;
                    mag[q] += std::fabs(p);
                }
            }
            for (int64_t q = 0; q < k; ++q)
                cd.check(da[r * k + q], sum[q], mag[q], n,
                         "expert " + std::to_string(e) + " row " + std::to_string(r) + " col " + std::to_string(q));
        }
    }
    for (int64_t i = used * k; i < max_rows * k; ++i) {  // rows no expert owns: exactly 0
        if (!(da[i] == 0.0f) && cd.bad++ == 0)
            ADD_FAILURE() << "dA row " << i / k << " (past offsets[E] = " << used << ") col " << i % k << ": got "
                          << da[i] << " expected 0";
    }
    EXPECT_EQ(cd.bad, 0) << "mismatching dA elements";

    // wgrad reference: dB[e, j, q] = sum_{r in e} dC[r, j] A[r, q], reduction length rows_e (0: dB[e] = 0).
    Checker cw{c.dtype, c.integer_inputs, "dB"};
    for (int64_t e = 0; e < num_groups; ++e) {
        std::fill(sum.begin(), sum.begin() + n * k, 0.0);
        std::fill(mag.begin(), mag.begin() + n * k, 0.0);
        for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
            const float* ar = &a[r * k];
            for (int64_t j = 0; j < n; ++j) {
                const double g = dc[r * n + j];
                double* sj = &sum[j * k];
                double* mj = &mag[j * k];
                for (int64_t q = 0; q < k; ++q) {
                    const double p = g * ar[q];
                    sj[q] += p;
                    mj[q] += std::fabs(p);
                }
            }
        }
        const int64_t rows_e = offsets[e + 1] - offsets[e];
        for (int64_t i = 0; i < n * k; ++i)
            cw.check(db[e * n * k + i], sum[i], mag[i], rows_e,
                     "expert " + std::to_string(e) + " (" + std::to_string(rows_e) + " rows) n " +
                         std::to_string(i / k) + " k " + std::to_string(i % k));
    }
    EXPECT_EQ(cw.bad, 0) << "mismatching dB elements";
}

const DType kAllDtypes[] = {DType::kBF16, DType::kF16, DType::kF32};

// E = 8 with the listed row counts (0, 1, 7, 129 and a long 4097-row reduction for wgrad), rows past offsets[E],
// every dtype, both input kinds.
TEST(GpuGroupedGemmBackward, ListedRowCountsEveryDtype) {
    for (DType t : kAllDtypes) {
        SKIP_WITHOUT_GPU(t);
        for (bool integer : {true, false}) {
            Case c;
            c.dtype = t;
            c.counts = {0, 1, 7, 129, 4097, 0, 3, 64};
            c.n = 136;
            c.k = 200;
            c.slack_rows = 5;
            c.integer_inputs = integer;
            c.seed = 101 + 7 * static_cast<uint32_t>(t) + (integer ? 0 : 50);
            run_case(c);
        }
    }
}

// The same problems under both tile rasterisations of the CUTLASS scheduler (16-bit only; fp32 ignores it).
TEST(GpuGroupedGemmBackward, BothRasterOrders) {
    for (DType t : {DType::kBF16, DType::kF16}) {
        SKIP_WITHOUT_GPU(t);
        for (GemmRaster r : {GemmRaster::kAlongM, GemmRaster::kAlongN}) {
            Case c;
            c.dtype = t;
            c.counts = {0, 1, 7, 129, 300, 0, 3, 64};
            c.n = 264;
            c.k = 520;
            c.slack_rows = 3;
            c.integer_inputs = false;
            c.raster = r;
            c.seed = 151 + 7 * static_cast<uint32_t>(t) + static_cast<uint32_t>(r);
            run_case(c);
        }
    }
}

// bf16 dgrad under the Cooperative tile's three clusters (2x1 rounds each expert's M tiles up to a pair, 1x2 the N
// tiles: K = 520 has three 256-wide tiles, so the 1x2 cluster's last CTA runs past N; K = 1024 has four; none rounds
// nothing).
TEST(GpuGroupedGemmBackward, EveryDgradCluster) {
    SKIP_WITHOUT_GPU(DType::kBF16);
    for (GroupedGemmTile tile :
         {GroupedGemmTile::kLarge, GroupedGemmTile::kLargeClusterN, GroupedGemmTile::kLargeNoCluster}) {
        for (int64_t k : {520, 1024}) {
            for (bool integer : {true, false}) {
                Case c;
                c.dtype = DType::kBF16;
                c.counts = {0, 1, 7, 129, 300, 0, 3, 64, 257, 128};
                c.n = 264;
                c.k = k;
                c.slack_rows = 3;
                c.integer_inputs = integer;
                c.dgrad_tile = tile;
                c.seed = 171 + static_cast<uint32_t>(tile) * 5 + static_cast<uint32_t>(k) + (integer ? 0 : 1);
                run_case(c);
            }
        }
    }
}

// bf16 wgrad with each of its epilogues (kTma32, kRegisters) and the dgrad without a cluster with each of its
// (kTma32, kTma128, kRegisters; grouped_gemm.h, GroupedGemmEpilogue): the same values as the reference (bitwise for
// integer inputs), the whole dB and dA written (N = 264 and K = 520 leave partial tiles on both sides), nothing past
// them; the register store's 16-byte segments at the tiles' edges included. Combinations not built are refused.
TEST(GpuGroupedGemmBackward, EveryWgradAndDgradEpilogue) {
    SKIP_WITHOUT_GPU(DType::kBF16);
    using cuda::GroupedGemmEpilogue;
    for (GroupedGemmEpilogue e :
         {GroupedGemmEpilogue::kTma32, GroupedGemmEpilogue::kTma128, GroupedGemmEpilogue::kRegisters}) {
        for (bool integer : {true, false}) {
            Case c;
            c.dtype = DType::kBF16;
            c.counts = {0, 1, 7, 129, 300, 0, 3, 64, 257, 128};
            c.n = 264;
            c.k = 520;
            c.slack_rows = 3;
            c.integer_inputs = integer;
            c.wgrad_epilogue = e == GroupedGemmEpilogue::kTma128 ? GroupedGemmEpilogue::kTma32 : e;
            c.dgrad_tile = GroupedGemmTile::kLargeNoCluster;
            c.dgrad_epilogue = e;
            c.seed = 211 + 3 * static_cast<uint32_t>(e) + (integer ? 0 : 1);
            run_case(c);
        }
    }
    cuda::GroupedGemmGradArgs args;
    args.num_groups = 2;
    args.n = 256;
    args.k = 64;
    args.max_rows = 16;
    args.dgrad_tile = GroupedGemmTile::kLarge;
    args.dgrad_epilogue = GroupedGemmEpilogue::kRegisters;
    EXPECT_THROW(cuda::grouped_gemm_dgrad_kernel_name(args), Error);
    args.dgrad_tile = GroupedGemmTile::kAuto;
    args.dgrad_epilogue = GroupedGemmEpilogue::kAuto;
    args.wgrad_epilogue = GroupedGemmEpilogue::kTma128;
    EXPECT_THROW(cuda::grouped_gemm_wgrad_kernel_name(args), Error);
}

// A tile that is not a dgrad configuration is refused before anything runs.
TEST(GpuGroupedGemmBackward, RefusesTilesThatAreNoDgradConfiguration) {
    SKIP_WITHOUT_GPU(DType::kBF16);
    cuda::GroupedGemmGradArgs args;
    args.dtype = DType::kBF16;
    args.num_groups = 2;
    args.n = 64;
    args.k = 64;
    for (GroupedGemmTile tile : {GroupedGemmTile::kSmall, GroupedGemmTile::kMedium}) {
        args.dgrad_tile = tile;
        EXPECT_THROW(cuda::grouped_gemm_dgrad_kernel_name(args), Error);
    }
    args.dgrad_tile = GroupedGemmTile::kLargeNoCluster;
    EXPECT_NE(std::string(cuda::grouped_gemm_dgrad_kernel_name(args)).find("cluster 1x1x1"), std::string::npos);
}

// E = 1: 129 rows, no rows at all (dB all zero, dA all zero), one row.
TEST(GpuGroupedGemmBackward, SingleExpert) {
    for (DType t : kAllDtypes) {
        SKIP_WITHOUT_GPU(t);
        Case c;
        c.dtype = t;
        c.counts = {129};
        c.n = 264;
        c.k = 72;
        c.seed = 201 + static_cast<uint32_t>(t);
        run_case(c);
        c.counts = {0};
        c.slack_rows = 9;
        run_case(c);
        c.counts = {1};
        c.slack_rows = 0;
        c.integer_inputs = false;
        run_case(c);
    }
}

// E = 60: counts cycling through 0, 1, 7, 129 and random ones (a quarter empty), N and K not tile multiples.
TEST(GpuGroupedGemmBackward, SixtyExperts) {
    for (DType t : kAllDtypes) {
        SKIP_WITHOUT_GPU(t);
        for (bool integer : {true, false}) {
            Case c;
            c.dtype = t;
            c.seed = 301 + 11 * static_cast<uint32_t>(t) + (integer ? 0 : 5);
            std::mt19937 rng(c.seed);
            std::uniform_int_distribution<int> count(0, 200);
            const int listed[] = {0, 1, 7, 129};
            for (int e = 0; e < 60; ++e) c.counts.push_back(e < 16 ? listed[e % 4] : (e % 4 == 0 ? 0 : count(rng)));
            c.n = 264;
            c.k = 104;
            c.slack_rows = 3;
            c.integer_inputs = integer;
            run_case(c);
        }
    }
}

// N of one 8-wide block, K smaller than a K tile; and the forward's largest tile edge exceeded in both N and K.
TEST(GpuGroupedGemmBackward, SmallAndWideShapes) {
    for (DType t : kAllDtypes) {
        SKIP_WITHOUT_GPU(t);
        Case c;
        c.dtype = t;
        c.counts = {7, 0, 129, 1};
        c.n = 8;
        c.k = 24;
        c.seed = 401 + static_cast<uint32_t>(t);
        run_case(c);
        c.counts = {300, 0, 1, 40};
        c.n = 520;
        c.k = 392;
        c.integer_inputs = false;
        run_case(c);
    }
}

// fp32 takes any N and K (bounds-checked SIMT kernels).
TEST(GpuGroupedGemmBackward, Fp32OddSizes) {
    SKIP_WITHOUT_GPU(DType::kF32);
    Case c;
    c.dtype = DType::kF32;
    c.counts = {5, 0, 66, 1, 129};
    c.n = 67;
    c.k = 13;
    c.slack_rows = 2;
    c.seed = 501;
    run_case(c);
    c.integer_inputs = false;
    c.n = 5;
    c.k = 1;
    run_case(c);
}

// Both calls captured in one CUDA graph; the offsets change after capture and the replay follows them.
TEST(GpuGroupedGemmBackward, GraphCaptureFollowsDeviceOffsets) {
    for (DType t : kAllDtypes) {
        SKIP_WITHOUT_GPU(t);
        Case c;
        c.dtype = t;
        c.counts = {7, 0, 129, 1, 0, 64};
        c.n = 128;
        c.k = 64;
        c.slack_rows = 4;
        c.graph = true;
        c.seed = 601 + static_cast<uint32_t>(t);
        run_case(c);
    }
}

// N or K not a multiple of 8 is rejected for 16-bit types; so are unsupported dtypes and E = 0.
TEST(GpuGroupedGemmBackward, RejectsUnsupportedSizes) {
    for (DType t : {DType::kBF16, DType::kF16}) {
        for (auto nk : {std::pair<int64_t, int64_t>{128, 100}, std::pair<int64_t, int64_t>{12, 128}}) {
            GroupedGemmGradArgs args;
            args.dtype = t;
            args.num_groups = 4;
            args.n = nk.first;
            args.k = nk.second;
            args.max_rows = 64;
            SCOPED_TRACE(std::string(to_string(t)) + " n=" + std::to_string(args.n) + " k=" + std::to_string(args.k));
            EXPECT_FALSE(cuda::grouped_gemm_grad_supported(args));
            EXPECT_THROW(cuda::grouped_gemm_grad_workspace_size(args), Error);
            EXPECT_THROW(cuda::grouped_gemm_dgrad(args, nullptr, 0, nullptr), Error);
            EXPECT_THROW(cuda::grouped_gemm_wgrad(args, nullptr, 0, nullptr), Error);
        }
    }
    GroupedGemmGradArgs bad;
    bad.dtype = DType::kI32;
    bad.num_groups = 1;
    bad.n = bad.k = 8;
    EXPECT_FALSE(cuda::grouped_gemm_grad_supported(bad));
    bad.dtype = DType::kBF16;
    bad.num_groups = 0;
    EXPECT_FALSE(cuda::grouped_gemm_grad_supported(bad));
    bad.dtype = DType::kF32;
    bad.num_groups = 2;
    bad.n = 5;
    bad.k = 3;
    EXPECT_TRUE(cuda::grouped_gemm_grad_supported(bad));  // fp32: any N, K
}

}  // namespace
}  // namespace switchyard
