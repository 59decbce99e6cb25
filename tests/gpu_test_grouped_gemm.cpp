// tests/gpu_test_grouped_gemm.cpp: cuda::grouped_gemm (src/cuda/gemm/grouped_gemm.h) against a CPU double reference.
//
// For each case: random A [rows, K] and B [E, N, K] (small integers, where fp32 accumulation is exact and the
// result must match bit for bit, or reals in [-1, 1) with a tolerance from the arithmetic), random or listed
// per-group row counts (0, 1, 7, 129, 4097 rows; E in {1, 8, 60, 128}), C poisoned with NaN first (rows past
// offsets[E] must stay poisoned), every dtype and both 16-bit tile configurations; a second run must give the same
// bits; sizes the 16-bit path cannot take are rejected with switchyard::Error; the call is graph-capturable.
// Every test skips without a CUDA device (and the 16-bit ones without an sm_90 GPU).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "cuda/gemm/grouped_gemm.h"
#include "switchyard/dtype.h"
#include "switchyard/error.h"

namespace switchyard {
namespace {

using cuda::GroupedGemmArgs;
using cuda::GroupedGemmTile;
using cuda::GemmRaster;

#define GG_CUDA_OK(expr) ASSERT_EQ(cudaSuccess, (expr)) << #expr << ": " << cudaGetErrorString(cudaGetLastError())

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

#define SKIP_WITHOUT_GPU(dtype)                                                                               \
    do {                                                                                                      \
        int major_ = gpu_major();                                                                             \
        if (major_ < 0) GTEST_SKIP() << "no CUDA device";                                                     \
        if ((dtype) != DType::kF32 && major_ != 9) GTEST_SKIP() << "16-bit grouped GEMM needs an sm_90 GPU"; \
    } while (0)

// RAII device buffer.
struct DeviceBuffer {
    void* ptr = nullptr;
    size_t bytes = 0;
    explicit DeviceBuffer(size_t n) : bytes(n) {
        if (n > 0 && cudaMalloc(&ptr, n) != cudaSuccess) ptr = nullptr;
    }
    ~DeviceBuffer() {
        if (ptr) cudaFree(ptr);
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

uint32_t to_storage(DType t, float v) {
    switch (t) {
        case DType::kBF16: return float_to_bf16(v);
        case DType::kF16: return float_to_half(v);
        default: return float_bits(v);
    }
}
float from_storage(DType t, const std::vector<uint8_t>& buf, size_t i) {
    if (t == DType::kF32) {
        float f;
        std::memcpy(&f, buf.data() + 4 * i, 4);
        return f;
    }
    uint16_t h;
    std::memcpy(&h, buf.data() + 2 * i, 2);
    return t == DType::kBF16 ? bf16_to_float(h) : half_to_float(h);
}

// Host tensor in storage format plus its exact float values (the values the GPU sees).
struct HostTensor {
    DType dtype;
    std::vector<float> values;
    std::vector<uint8_t> storage;
    HostTensor(DType t, size_t n) : dtype(t), values(n), storage(n * dtype_size(t)) {}
    void set(size_t i, float v) {
        float r = round_to(dtype, v);
        values[i] = r;
        uint32_t s = to_storage(dtype, r);
        std::memcpy(storage.data() + i * dtype_size(dtype), &s, dtype_size(dtype));
    }
};

struct Case {
    DType dtype = DType::kBF16;
    std::vector<int> counts;  // rows per group
    int64_t n = 0;
    int64_t k = 0;
    int64_t slack_rows = 0;  // max_rows = sum(counts) + slack_rows: rows past offsets[E] stay untouched
    bool integer_inputs = true;
    GroupedGemmTile tile = GroupedGemmTile::kAuto;
    GemmRaster raster = GemmRaster::kAuto;
    cuda::GroupedGemmEpilogue epilogue = cuda::GroupedGemmEpilogue::kAuto;
    uint32_t seed = 1;
};

std::string describe(const Case& c) {
    std::ostringstream os;
    os << "dtype=" << to_string(c.dtype) << " E=" << c.counts.size() << " n=" << c.n << " k=" << c.k
       << " tile=" << static_cast<int>(c.tile) << " raster=" << static_cast<int>(c.raster)
       << " epilogue=" << static_cast<int>(c.epilogue) << (c.integer_inputs ? " integer" : " real")
       << " seed=" << c.seed
       << " counts=[";
    for (size_t i = 0; i < c.counts.size() && i < 12; ++i) os << (i ? "," : "") << c.counts[i];
    if (c.counts.size() > 12) os << ",...";
    os << "]";
    return os.str();
}

void run_case(const Case& c) {
    SCOPED_TRACE(describe(c));
    const int64_t num_groups = static_cast<int64_t>(c.counts.size());
    std::vector<int32_t> offsets(num_groups + 1, 0);
    for (int64_t e = 0; e < num_groups; ++e) offsets[e + 1] = offsets[e] + c.counts[e];
    const int64_t rows = offsets[num_groups];
    const int64_t max_rows = rows + c.slack_rows;

    std::mt19937 rng(c.seed);
    std::uniform_int_distribution<int> small_int(-3, 3);
    std::uniform_real_distribution<float> real(-1.0f, 1.0f);
    auto draw = [&]() { return c.integer_inputs ? static_cast<float>(small_int(rng)) : real(rng); };
    HostTensor a(c.dtype, static_cast<size_t>(max_rows * c.k));
    HostTensor b(c.dtype, static_cast<size_t>(num_groups * c.n * c.k));
    for (size_t i = 0; i < a.values.size(); ++i) a.set(i, draw());
    for (size_t i = 0; i < b.values.size(); ++i) b.set(i, draw());

    const size_t esz = dtype_size(c.dtype);
    const size_t c_bytes = static_cast<size_t>(max_rows * c.n) * esz;
    DeviceBuffer d_a(a.storage.size() + 16), d_b(b.storage.size()), d_c(c_bytes + 16),
        d_off(offsets.size() * sizeof(int32_t));
    ASSERT_TRUE(d_b.ptr && d_c.ptr && d_off.ptr && d_a.ptr);
    if (!a.storage.empty()) {
        GG_CUDA_OK(cudaMemcpy(d_a.ptr, a.storage.data(), a.storage.size(), cudaMemcpyHostToDevice));
    }
    GG_CUDA_OK(cudaMemcpy(d_b.ptr, b.storage.data(), b.storage.size(), cudaMemcpyHostToDevice));
    GG_CUDA_OK(cudaMemcpy(d_off.ptr, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));

    GroupedGemmArgs args;
    args.a = d_a.ptr;
    args.b = d_b.ptr;
    args.c = d_c.ptr;
    args.dtype = c.dtype;
    args.num_groups = num_groups;
    args.n = c.n;
    args.k = c.k;
    args.max_rows = max_rows;
    args.offsets = static_cast<const int32_t*>(d_off.ptr);
    args.tile = c.tile;
    args.raster = c.raster;
    args.epilogue = c.epilogue;
    ASSERT_TRUE(cuda::grouped_gemm_supported(args));
    const size_t ws_bytes = cuda::grouped_gemm_workspace_size(args);
    DeviceBuffer d_ws(ws_bytes);
    ASSERT_TRUE(ws_bytes == 0 || d_ws.ptr);
    cudaStream_t stream = nullptr;
    GG_CUDA_OK(cudaStreamCreate(&stream));

    std::vector<uint8_t> got[2];
    for (int run = 0; run < 2; ++run) {
        GG_CUDA_OK(cudaMemset(d_c.ptr, 0xff, c_bytes + 16));  // NaN in every dtype
        cuda::grouped_gemm(args, d_ws.ptr, ws_bytes, stream);
        GG_CUDA_OK(cudaStreamSynchronize(stream));
        got[run].resize(c_bytes + 16);
        GG_CUDA_OK(cudaMemcpy(got[run].data(), d_c.ptr, c_bytes + 16, cudaMemcpyDeviceToHost));
    }
    GG_CUDA_OK(cudaStreamDestroy(stream));
    ASSERT_EQ(0, std::memcmp(got[0].data(), got[1].data(), got[0].size())) << "second run differs (not bitwise "
                                                                               "reproducible)";

    // Reference: double accumulation, then rounding to the dtype. Tolerance for real inputs: the output rounding
    // (half an ulp of the dtype, taken as one ulp) plus fp32 accumulation error, bounded by 1e-5 * sum |a*b|.
    const double out_rtol = c.dtype == DType::kBF16 ? std::ldexp(1.0, -8)
                            : c.dtype == DType::kF16 ? std::ldexp(1.0, -10)
                                                     : 0.0;
    int64_t bad = 0;
    for (int64_t e = 0; e < num_groups; ++e) {
        for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
            const float* arow = &a.values[r * c.k];
            for (int64_t n = 0; n < c.n; ++n) {
                const float* brow = &b.values[(e * c.n + n) * c.k];
                double sum = 0.0, mag = 0.0;
                for (int64_t k = 0; k < c.k; ++k) {
                    double p = static_cast<double>(arow[k]) * brow[k];
                    sum += p;
                    mag += std::fabs(p);
                }
                const float g = from_storage(c.dtype, got[0], static_cast<size_t>(r * c.n + n));
                bool ok;
                double expected;
                if (c.integer_inputs) {
                    expected = round_to(c.dtype, static_cast<float>(sum));  // exact in fp32, one rounding
                    ok = g == expected;
                } else {
                    expected = sum;
                    ok = std::fabs(g - sum) <= out_rtol * std::fabs(sum) + 1e-5 * mag;
                }
                if (!ok && bad++ == 0) {
                    ADD_FAILURE() << "first mismatch at group " << e << " row " << r << " col " << n << ": got " << g
                                  << " expected " << expected << " (sum |a*b| = " << mag << ")";
                }
            }
        }
    }
    EXPECT_EQ(bad, 0) << "mismatching elements";
    // Rows past offsets[E] (the slack up to max_rows) and the 16 bytes past C must not be written.
    for (size_t i = static_cast<size_t>(rows * c.n) * esz; i < got[0].size(); ++i) {
        if (got[0][i] != 0xff) {
            ADD_FAILURE() << "byte " << i << " past the last routed row was written";
            break;
        }
    }
}

std::vector<int> random_counts(int num_groups, int total, uint32_t seed, double zero_fraction) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    std::vector<double> w(num_groups);
    for (auto& x : w) x = u(rng) < zero_fraction ? 0.0 : 0.5 + u(rng);
    double s = 0;
    for (double x : w) s += x;
    std::vector<int> counts(num_groups, 0);
    int assigned = 0;
    for (int e = 0; e < num_groups && s > 0; ++e) {
        counts[e] = static_cast<int>(w[e] / s * total);
        assigned += counts[e];
    }
    for (int e = 0; assigned < total; e = (e + 1) % num_groups) {
        if (w[e] > 0 || s == 0) {
            ++counts[e];
            ++assigned;
        }
    }
    return counts;
}

const DType kAllDtypes[] = {DType::kBF16, DType::kF16, DType::kF32};
const GroupedGemmTile kTiles16[] = {GroupedGemmTile::kLarge, GroupedGemmTile::kMedium, GroupedGemmTile::kSmall,
                                    GroupedGemmTile::kLargeClusterN, GroupedGemmTile::kLargeNoCluster};

// The listed row counts (0, 1, 7, 129, 4097) in one call with E = 8, every dtype and tile, both input kinds.
TEST(GpuGroupedGemm, ListedRowCountsEveryDtypeAndTile) {
    for (DType t : kAllDtypes) {
        SKIP_WITHOUT_GPU(t);
        for (bool integer : {true, false}) {
            for (GroupedGemmTile tile : kTiles16) {
                if (t == DType::kF32 && tile != GroupedGemmTile::kLarge) continue;  // tile ignored for fp32
                Case c;
                c.dtype = t;
                c.counts = {0, 1, 7, 129, 4097, 0, 3, 64};
                c.n = 136;
                c.k = 200;
                c.slack_rows = 5;
                c.integer_inputs = integer;
                c.tile = tile;
                c.seed = 11 + static_cast<uint32_t>(t) * 7 + (integer ? 0 : 100) + static_cast<uint32_t>(tile);
                run_case(c);
            }
        }
    }
}

// Every 16-bit tile under both tile rasterisations of the CUTLASS scheduler, groups spanning several M tiles.
TEST(GpuGroupedGemm, BothRasterOrders) {
    for (DType t : {DType::kBF16, DType::kF16}) {
        SKIP_WITHOUT_GPU(t);
        for (GroupedGemmTile tile : kTiles16) {
            for (GemmRaster r : {GemmRaster::kAlongM, GemmRaster::kAlongN}) {
                Case c;
                c.dtype = t;
                c.counts = {0, 1, 7, 129, 300, 0, 3, 64};
                c.n = 264;
                c.k = 520;
                c.slack_rows = 3;
                c.integer_inputs = false;
                c.tile = tile;
                c.raster = r;
                c.seed = 61 + 7 * static_cast<uint32_t>(t) + 3 * static_cast<uint32_t>(tile) + static_cast<uint32_t>(r);
                run_case(c);
            }
        }
    }
}

// The Cooperative tile without a cluster with each of its epilogues (grouped_gemm.h, GroupedGemmEpilogue): the
// reference's values (bitwise for integer inputs), partial M and N tiles (N = 264), rows past offsets[E] untouched;
// another kernel refuses an epilogue other than kAuto.
TEST(GpuGroupedGemm, EveryEpilogueOfTheCooperativeTileWithoutCluster) {
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
            c.tile = GroupedGemmTile::kLargeNoCluster;
            c.epilogue = e;
            c.seed = 91 + 3 * static_cast<uint32_t>(e) + (integer ? 0 : 1);
            run_case(c);
        }
    }
    GroupedGemmArgs args;
    args.num_groups = 2;
    args.n = 256;
    args.k = 64;
    args.max_rows = 16;
    args.tile = GroupedGemmTile::kLarge;
    args.epilogue = GroupedGemmEpilogue::kRegisters;
    EXPECT_THROW(cuda::grouped_gemm_kernel_name(args), Error);
}

// zero_rows_past_groups: rows [offsets[E], max_rows) become 0, rows below stay as they were, for 16-byte rows,
// 4-byte rows (fp32, odd width) and 2-byte rows (fp16, odd width); offsets[E] = max_rows writes nothing.
TEST(GpuGroupedGemm, ZeroRowsPastGroups) {
    SKIP_WITHOUT_GPU(DType::kF32);
    struct Z {
        DType t;
        int64_t width, max_rows, used;
    };
    for (const Z& z : {Z{DType::kBF16, 136, 50, 37}, Z{DType::kF32, 7, 40, 3}, Z{DType::kF16, 7, 33, 32},
                       Z{DType::kBF16, 64, 20, 20}, Z{DType::kF16, 9, 12, 0}}) {
        SCOPED_TRACE(std::string("dtype=") + to_string(z.t) + " width=" + std::to_string(z.width) + " rows=" +
                     std::to_string(z.max_rows) + " used=" + std::to_string(z.used));
        const std::vector<int32_t> offsets = {0, static_cast<int32_t>(z.used / 2), static_cast<int32_t>(z.used)};
        const size_t bytes = static_cast<size_t>(z.max_rows * z.width) * dtype_size(z.t);
        DeviceBuffer d(bytes), d_off(offsets.size() * 4);
        ASSERT_NE(d.ptr, nullptr);
        GG_CUDA_OK(cudaMemset(d.ptr, 0xFF, bytes));
        GG_CUDA_OK(cudaMemcpy(d_off.ptr, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));
        cuda::zero_rows_past_groups(d.ptr, z.t, static_cast<const int32_t*>(d_off.ptr), 2, z.width, z.max_rows,
                                    nullptr);
        GG_CUDA_OK(cudaDeviceSynchronize());
        std::vector<uint8_t> got(bytes);
        GG_CUDA_OK(cudaMemcpy(got.data(), d.ptr, bytes, cudaMemcpyDeviceToHost));
        const size_t row_bytes = static_cast<size_t>(z.width) * dtype_size(z.t);
        for (size_t b = 0; b < bytes; ++b) {
            const bool owned = b / row_bytes < static_cast<size_t>(z.used);
            ASSERT_EQ(got[b], owned ? 0xFF : 0x00) << "byte " << b << " of row " << b / row_bytes;
        }
    }
}

// E = 1: one large group, and one empty group (all rows dropped), every dtype.
TEST(GpuGroupedGemm, SingleGroup) {
    for (DType t : kAllDtypes) {
        SKIP_WITHOUT_GPU(t);
        Case c;
        c.dtype = t;
        c.counts = {4097};
        c.n = 264;
        c.k = 72;
        c.seed = 21 + static_cast<uint32_t>(t);
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

// E = 60 and E = 128 with random counts (a quarter of the groups empty), automatic tile choice, odd N and K.
TEST(GpuGroupedGemm, ManyGroupsRandomCounts) {
    for (DType t : kAllDtypes) {
        SKIP_WITHOUT_GPU(t);
        for (int num_groups : {60, 128}) {
            for (int total : {128, 3000}) {  // decode-like (kSmall) and prefill-like (kLarge) averages
                Case c;
                c.dtype = t;
                c.seed = 31 + static_cast<uint32_t>(num_groups) + static_cast<uint32_t>(total) +
                         100 * static_cast<uint32_t>(t);
                c.counts = random_counts(num_groups, total, c.seed, 0.25);
                c.n = total > 1000 ? 264 : 392;
                c.k = 104;
                c.integer_inputs = (total > 1000);
                run_case(c);
            }
        }
    }
}

// K smaller than one K-tile, N of one 8-wide column block, and a long K (accumulation over 4096 terms).
TEST(GpuGroupedGemm, ExtremeKAndN) {
    for (DType t : kAllDtypes) {
        SKIP_WITHOUT_GPU(t);
        Case c;
        c.dtype = t;
        c.counts = {7, 0, 129, 1};
        c.n = 8;
        c.k = 24;
        c.seed = 41 + static_cast<uint32_t>(t);
        run_case(c);
        c.counts = {100, 3, 0, 200};
        c.n = 128;
        c.k = 4096;
        c.integer_inputs = false;
        run_case(c);
        c.integer_inputs = true;
        c.tile = GroupedGemmTile::kSmall;
        run_case(c);
        c.tile = GroupedGemmTile::kMedium;
        run_case(c);
    }
}

// fp32 takes any N and K (bounds-checked SIMT kernel).
TEST(GpuGroupedGemm, Fp32OddSizes) {
    SKIP_WITHOUT_GPU(DType::kF32);
    Case c;
    c.dtype = DType::kF32;
    c.counts = {5, 0, 66, 1, 129};
    c.n = 67;
    c.k = 13;
    c.seed = 51;
    run_case(c);
    c.integer_inputs = false;
    c.n = 5;
    c.k = 1;
    run_case(c);
}

// K or N not a multiple of 8 is rejected for 16-bit types (grouped_gemm_supported false, grouped_gemm throws).
TEST(GpuGroupedGemm, RejectsUnalignedSizes) {
    for (DType t : {DType::kBF16, DType::kF16}) {
        for (auto nk : {std::pair<int64_t, int64_t>{128, 100}, std::pair<int64_t, int64_t>{12, 128}}) {
            GroupedGemmArgs args;
            args.dtype = t;
            args.num_groups = 4;
            args.n = nk.first;
            args.k = nk.second;
            args.max_rows = 64;
            SCOPED_TRACE(std::string(to_string(t)) + " n=" + std::to_string(args.n) + " k=" + std::to_string(args.k));
            EXPECT_FALSE(cuda::grouped_gemm_supported(args));
            EXPECT_THROW(cuda::grouped_gemm_workspace_size(args), Error);
            try {
                cuda::grouped_gemm(args, nullptr, 0, nullptr);
                ADD_FAILURE() << "no Error thrown";
            } catch (const Error& err) {
                EXPECT_NE(std::string(err.what()).find(args.k % 8 ? "k=" : "n="), std::string::npos) << err.what();
            }
        }
    }
    GroupedGemmArgs bad;
    bad.dtype = DType::kI32;
    bad.num_groups = 1;
    bad.n = bad.k = 8;
    EXPECT_FALSE(cuda::grouped_gemm_supported(bad));
    bad.dtype = DType::kBF16;
    bad.num_groups = 0;
    EXPECT_FALSE(cuda::grouped_gemm_supported(bad));
}

// The call can be captured in a CUDA graph; replaying it after the offsets change gives the new grouping.
TEST(GpuGroupedGemm, GraphCaptureFollowsDeviceOffsets) {
    SKIP_WITHOUT_GPU(DType::kBF16);
    const int64_t num_groups = 4, n = 128, k = 64, max_rows = 64;
    std::mt19937 rng(61);
    std::uniform_int_distribution<int> small_int(-3, 3);
    std::vector<uint16_t> a(max_rows * k), b(num_groups * n * k);
    std::vector<float> af(a.size()), bf(b.size());
    for (size_t i = 0; i < a.size(); ++i) a[i] = float_to_bf16(af[i] = static_cast<float>(small_int(rng)));
    for (size_t i = 0; i < b.size(); ++i) b[i] = float_to_bf16(bf[i] = static_cast<float>(small_int(rng)));
    DeviceBuffer d_a(a.size() * 2), d_b(b.size() * 2), d_c(max_rows * n * 2), d_off((num_groups + 1) * 4);
    GG_CUDA_OK(cudaMemcpy(d_a.ptr, a.data(), a.size() * 2, cudaMemcpyHostToDevice));
    GG_CUDA_OK(cudaMemcpy(d_b.ptr, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
    GroupedGemmArgs args;
    args.a = d_a.ptr;
    args.b = d_b.ptr;
    args.c = d_c.ptr;
    args.dtype = DType::kBF16;
    args.num_groups = num_groups;
    args.n = n;
    args.k = k;
    args.max_rows = max_rows;
    args.offsets = static_cast<const int32_t*>(d_off.ptr);
    const size_t ws_bytes = cuda::grouped_gemm_workspace_size(args);
    DeviceBuffer d_ws(ws_bytes);
    cudaStream_t stream;
    GG_CUDA_OK(cudaStreamCreate(&stream));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    GG_CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    cuda::grouped_gemm(args, d_ws.ptr, ws_bytes, stream);
    GG_CUDA_OK(cudaStreamEndCapture(stream, &graph));
    GG_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    const std::vector<std::vector<int32_t>> groupings = {{0, 10, 10, 40, 64}, {0, 0, 64, 64, 64}, {0, 1, 2, 3, 4}};
    for (const auto& off : groupings) {
        GG_CUDA_OK(cudaMemcpy(d_off.ptr, off.data(), off.size() * 4, cudaMemcpyHostToDevice));
        GG_CUDA_OK(cudaMemset(d_c.ptr, 0xff, max_rows * n * 2));
        GG_CUDA_OK(cudaGraphLaunch(exec, stream));
        GG_CUDA_OK(cudaStreamSynchronize(stream));
        std::vector<uint16_t> c(max_rows * n);
        GG_CUDA_OK(cudaMemcpy(c.data(), d_c.ptr, c.size() * 2, cudaMemcpyDeviceToHost));
        int64_t bad = 0;
        for (int64_t e = 0; e < num_groups; ++e) {
            for (int64_t r = off[e]; r < off[e + 1]; ++r) {
                for (int64_t j = 0; j < n; ++j) {
                    double s = 0;
                    for (int64_t q = 0; q < k; ++q) s += static_cast<double>(af[r * k + q]) * bf[(e * n + j) * k + q];
                    float expected = round_to(DType::kBF16, static_cast<float>(s));
                    float got = bf16_to_float(c[r * n + j]);
                    if (got != expected && bad++ == 0) {
                        ADD_FAILURE() << "grouping " << off[1] << "," << off[2] << "," << off[3] << ": group " << e
                                      << " row " << r << " col " << j << " got " << got << " expected " << expected;
                    }
                }
            }
        }
        EXPECT_EQ(bad, 0);
        for (int64_t i = off[num_groups] * n; i < max_rows * n; ++i) {
            if (c[i] != 0xffff) {
                ADD_FAILURE() << "element " << i << " past the routed rows was written";
                break;
            }
        }
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace switchyard
