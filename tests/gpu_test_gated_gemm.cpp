// tests/gpu_test_gated_gemm.cpp: grouped_gemm_gated (GEMM1 with the gated activation in the CUTLASS epilogue) and
// interleave_gate_up on CUDA.
//
// The fused kernel rounds gate and up to bf16 before the activation, as the unfused path stores them, so on one
// card it must give the bits of the unfused path: grouped_gemm (w13, plain epilogue) into g [R, 2F] then the
// activation kernel. Every case also checks against the CPU specification (double sums) within bf16 rounding,
// poisons h first (rows past offsets[E] must come back 0, or stay poisoned without zero_unowned_rows), runs twice
// for the same bits, and covers groups of 0, 1 and 129 rows, an F whose 2F is no multiple of the 256-wide tile
// (F = 72), many experts with random counts, and experts large enough for the 2x1-cluster kernel (> 1024 rows on
// average). interleave_gate_up on the device must equal the CPU's. A CUDA MoELayer with MoEConfig::gate_up_interleaved
// must give the plain layer's bits: bf16 through the gated kernel, fp16 through GEMM1 and the interleaved activation
// kernel, and both through the fused small-batch path's kernels. Skips without an sm_90 GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/gemm/grouped_gemm.h"
#include "gpu_test_util.h"
#include "switchyard/moe_layer.h"
#include "switchyard/stages.h"
#include "test_util.h"

namespace switchyard {
namespace {

using testing::DeviceBuffer;
// gpu_test_util.h's helpers under this file's short names.
constexpr auto* sm90 = &testing::sm90_device;
constexpr auto* dev_ref = &testing::device_ref;
constexpr auto* random_counts = &testing::poisson_counts;

struct GatedCase {
    std::string name;
    int64_t F, K;
    std::vector<int32_t> counts;  // rows per expert
    int64_t extra_rows;           // rows past offsets[E]
    Activation act;
};


void run_case(const GatedCase& c, bool zero_unowned) {
    SCOPED_TRACE(c.name + (zero_unowned ? " (zero unowned rows)" : " (unowned rows untouched)"));
    const DType bf = DType::kBF16;
    const int64_t E = static_cast<int64_t>(c.counts.size()), F = c.F, K = c.K, N = 2 * F;
    std::vector<int32_t> offsets(E + 1, 0);
    for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + c.counts[e];
    const int64_t owned = offsets[E], R = owned + c.extra_rows;

    const std::vector<float> a = testing::random_values(R * K, bf, -1.0f, 1.0f, 101);
    const std::vector<float> w13 = testing::random_values(E * N * K, bf, -0.5f, 0.5f, 102);
    DeviceBuffer da, dw13, dw13i, doff, dg, dh_ref, dh;
    testing::upload(da, a, bf);
    testing::upload(dw13, w13, bf);
    testing::upload_raw(doff, offsets);
    dw13i.reset(dw13.bytes());
    dg.reset(R * N * 2);
    dh_ref.reset(R * F * 2);
    dh.reset(R * F * 2);

    // The interleaved weights: on the device, and the same bits as the CPU's.
    interleave_gate_up(dev_ref(dw13, bf, {E, N, K}), dev_ref(dw13i, bf, {E, N, K}));
    GPU_CHECK(cudaDeviceSynchronize());
    const test::HostTensor hw13 = test::HostTensor::from_floats(w13, bf, {E, N, K});
    test::HostTensor hw13i(bf, {E, N, K});
    interleave_gate_up(hw13.ref(), hw13i.ref());
    const std::vector<uint16_t> got_i = testing::download_raw<uint16_t>(dw13i.get(), E * N * K);
    for (int64_t i = 0; i < E * N * K; ++i) ASSERT_EQ(got_i[i], hw13i.ptr<uint16_t>()[i]) << "w13i element " << i;

    // The unfused path on the device: grouped_gemm with w13, then the activation kernel.
    {
        const size_t ws = grouped_gemm_workspace_size(Device::kCUDA, bf, E, N, K, R);
        DeviceBuffer w(ws);
        grouped_gemm(dev_ref(da, bf, {R, K}), dev_ref(dw13, bf, {E, N, K}), dev_ref(doff, DType::kI32, {E + 1}),
                     dev_ref(dg, bf, {R, N}), w.get(), ws);
        activation(c.act, dev_ref(dg, bf, {R, N}), dev_ref(dh_ref, bf, {R, F}));
        GPU_CHECK(cudaDeviceSynchronize());
    }
    const std::vector<uint16_t> want = testing::download_raw<uint16_t>(dh_ref.get(), R * F);

    // The fused kernel, twice on poisoned outputs.
    const size_t ws = grouped_gemm_gated_workspace_size(Device::kCUDA, bf, E, F, K, R);
    DeviceBuffer w(ws);
    GroupedGemmOptions opt;
    opt.zero_unowned_rows = zero_unowned;
    std::vector<uint16_t> first;
    for (int run = 0; run < 2; ++run) {
        dh.poison();
        grouped_gemm_gated(c.act, dev_ref(da, bf, {R, K}), dev_ref(dw13i, bf, {E, N, K}),
                           dev_ref(doff, DType::kI32, {E + 1}), dev_ref(dh, bf, {R, F}), w.get(), ws, nullptr, opt);
        GPU_CHECK(cudaGetLastError());
        GPU_CHECK(cudaDeviceSynchronize());
        const std::vector<uint16_t> got = testing::download_raw<uint16_t>(dh.get(), R * F);
        if (run == 1) {
            ASSERT_TRUE(got == first) << "a second run gave other bits";
            break;
        }
        first = got;
        int64_t differ = 0, first_bad = -1;
        for (int64_t i = 0; i < owned * F; ++i) {
            if (got[i] != want[i]) {
                if (first_bad < 0) first_bad = i;
                ++differ;
            }
        }
        EXPECT_EQ(differ, 0) << differ << " of " << owned * F << " owned elements differ from the unfused path; first "
                             << "at row " << first_bad / F << " col " << first_bad % F << ": "
                             << bf16_to_float(got[first_bad]) << " vs " << bf16_to_float(want[first_bad]);
        for (int64_t i = owned * F; i < R * F; ++i)
            ASSERT_EQ(got[i], zero_unowned ? 0 : 0xFFFF) << "unowned row " << i / F;
    }

    // The CPU specification (double sums): bf16 rounding of g, then of h.
    const test::HostTensor ha = test::HostTensor::from_floats(a, bf, {R, K});
    test::HostTensor hoff(DType::kI32, {E + 1}), hh(bf, {R, F});
    for (int64_t e = 0; e <= E; ++e) hoff.ptr<int32_t>()[e] = offsets[e];
    grouped_gemm_gated(c.act, ha.ref(), hw13i.ref(), hoff.ref(), hh.ref(), nullptr, 0);
    std::vector<float> got_f(owned * F), ref_f(owned * F);
    for (int64_t i = 0; i < owned * F; ++i) {
        got_f[i] = bf16_to_float(first[i]);
        ref_f[i] = hh.get(i);
    }
    EXPECT_TRUE(testing::all_close(got_f, ref_f, 2e-2, 2e-2, "h vs the CPU specification", F));
    EXPECT_GT(testing::rms(ref_f), 1e-3) << "the reference must not be zeros";
}

TEST(GpuGatedGemm, MatchesUnfusedPathAndSpecification) {
    if (!sm90()) GTEST_SKIP() << "the gated epilogue needs an sm_90 GPU";
    const std::vector<GatedCase> cases = {
        {"listed counts SwiGLU", 64, 128, {0, 1, 129, 300}, 5, Activation::kSwiGLU},
        {"listed counts GeGLU, F=72", 72, 256, {7, 0, 130, 256, 1}, 3, Activation::kGeGLU},
        {"128 experts ~256 rows", 96, 512, random_counts(128, 256, 7), 0, Activation::kSwiGLU},
        {"2x1 cluster (> 1024 rows per expert)", 128, 256, {1500, 1700}, 9, Activation::kSwiGLU},
    };
    for (const auto& c : cases)
        for (bool zero_unowned : {true, false}) run_case(c, zero_unowned);
}

// The bf16 grouped GEMM arguments of these tests (cuda::grouped_gemm called directly, a tile override).
cuda::GroupedGemmArgs bf16_args(const void* a, const void* b, void* c, int64_t E, int64_t N, int64_t K, int64_t R,
                                const int32_t* offsets, cuda::GroupedGemmTile tile, bool gated, Activation act) {
    cuda::GroupedGemmArgs g;
    g.a = a;
    g.b = b;
    g.c = c;
    g.dtype = DType::kBF16;
    g.num_groups = E;
    g.n = N;
    g.k = K;
    g.max_rows = R;
    g.offsets = offsets;
    g.tile = tile;
    g.gated = gated;
    g.activation = act;
    return g;
}

// Every gated kernel (the tile overrides of GroupedGemmArgs::gated) against the unfused path on the same card:
// within a few bf16 roundings of h (the kernels may sum a product's k-steps in another order than the unfused
// path's tile), rows past offsets[E] untouched (the stage zeroes them, not the kernel).
TEST(GpuGatedGemm, EveryGatedTileMatchesTheUnfusedPath) {
    if (!sm90()) GTEST_SKIP() << "the gated epilogue needs an sm_90 GPU";
    const DType bf = DType::kBF16;
    const std::vector<int32_t> counts = random_counts(8, 300, 11);
    const int64_t E = 8, F = 96, K = 256, N = 2 * F;
    std::vector<int32_t> offsets(E + 1, 0);
    for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
    const int64_t R = offsets[E] + 3;
    DeviceBuffer da, dw13, dw13i, doff, dg, dh_ref, dh;
    testing::upload(da, testing::random_values(R * K, bf, -1.0f, 1.0f, 201), bf);
    testing::upload(dw13, testing::random_values(E * N * K, bf, -0.5f, 0.5f, 202), bf);
    testing::upload_raw(doff, offsets);
    dw13i.reset(dw13.bytes());
    dg.reset(R * N * 2);
    dh_ref.reset(R * F * 2);
    dh.reset(R * F * 2);
    interleave_gate_up(dev_ref(dw13, bf, {E, N, K}), dev_ref(dw13i, bf, {E, N, K}));
    const size_t ws = grouped_gemm_workspace_size(Device::kCUDA, bf, E, N, K, R);
    DeviceBuffer w(ws);
    grouped_gemm(dev_ref(da, bf, {R, K}), dev_ref(dw13, bf, {E, N, K}), dev_ref(doff, DType::kI32, {E + 1}),
                 dev_ref(dg, bf, {R, N}), w.get(), ws);
    activation(Activation::kSwiGLU, dev_ref(dg, bf, {R, N}), dev_ref(dh_ref, bf, {R, F}));
    GPU_CHECK(cudaDeviceSynchronize());
    const std::vector<float> want = testing::download(dh_ref.get(), offsets[E] * F, bf);
    for (auto tile : {cuda::GroupedGemmTile::kLarge, cuda::GroupedGemmTile::kLargeNoCluster,
                      cuda::GroupedGemmTile::kMedium}) {
        const cuda::GroupedGemmArgs g =
            bf16_args(da.get(), dw13i.get(), dh.get(), E, N, K, R, doff.get<int32_t>(), tile, true, Activation::kSwiGLU);
        SCOPED_TRACE(cuda::grouped_gemm_kernel_name(g));
        const size_t gws = cuda::grouped_gemm_workspace_size(g);
        DeviceBuffer gw(gws);
        dh.poison();
        cuda::grouped_gemm(g, gw.get(), gws, nullptr);
        GPU_CHECK(cudaGetLastError());
        GPU_CHECK(cudaDeviceSynchronize());
        const std::vector<uint16_t> raw = testing::download_raw<uint16_t>(dh.get(), R * F);
        std::vector<float> got(offsets[E] * F);
        int64_t exact = 0;
        for (int64_t i = 0; i < offsets[E] * F; ++i) {
            got[i] = bf16_to_float(raw[i]);
            exact += got[i] == want[i];
        }
        EXPECT_TRUE(testing::all_close(got, want, 1e-3, 3e-2, "h vs the unfused path", F));
        std::printf("[gpu gated] %s: %lld of %lld elements bitwise equal to the unfused path\n",
                    cuda::grouped_gemm_kernel_name(g), static_cast<long long>(exact),
                    static_cast<long long>(offsets[E] * F));
        for (int64_t i = offsets[E] * F; i < R * F; ++i) ASSERT_EQ(raw[i], 0xFFFF) << "unowned row " << i / F;
    }
}

// A gathered A (GroupedGemmArgs::a_row_index; gather_mainloop.cuh) against the same tile on the gathered copy: the
// same products in the same order, so the same bits, for every gated and plain tile and kAuto. Rows repeat tokens (a token in
// up to three experts), the index runs past x's rows and below 0 (both read zeros), K = 200 ends in a partial k
// tile, groups of 0, 1, 31, 63-65, 129 and 300 rows put partial M tiles at every offset of the 32-row lanes and
// the 64 / 128-row tiles, and rows past offsets[E] must stay poisoned. Then the public stage (options.row_index)
// against the CPU specification.
TEST(GpuGatedGemm, GatheredAGivesTheGatheredCopysBits) {
    if (!sm90()) GTEST_SKIP() << "the gated epilogue needs an sm_90 GPU";
    const DType bf = DType::kBF16;
    const std::vector<int32_t> counts = {0, 1, 31, 63, 64, 65, 129, 300, 0, 2};
    const int64_t E = static_cast<int64_t>(counts.size()), F = 96, K = 200, N = 2 * F, T = 257;
    std::vector<int32_t> offsets(E + 1, 0);
    for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
    const int64_t owned = offsets[E], R = owned + 5;
    std::mt19937 rng(907);
    std::vector<int32_t> row_index(R, -1);
    for (int64_t r = 0; r < owned; ++r) row_index[r] = static_cast<int32_t>(rng() % T);
    row_index[3] = static_cast<int32_t>(T);      // past x's rows: zeros
    row_index[owned - 1] = T + 1000;             // far past x's rows
    row_index[40] = -1;                          // below 0: zeros
    row_index[owned - 7] = -5;
    const std::vector<float> x = testing::random_values(T * K, bf, -1.0f, 1.0f, 903);
    std::vector<float> xp(R * K, 0.0f);
    for (int64_t r = 0; r < R; ++r)
        if (row_index[r] >= 0 && row_index[r] < T)
            for (int64_t c = 0; c < K; ++c) xp[r * K + c] = x[row_index[r] * K + c];
    DeviceBuffer dx, dxp, dw13, dw13i, doff, didx, dh_ref, dh;
    testing::upload(dx, x, bf);
    testing::upload(dxp, xp, bf);
    testing::upload(dw13, testing::random_values(E * N * K, bf, -0.5f, 0.5f, 904), bf);
    testing::upload_raw(doff, offsets);
    testing::upload_raw(didx, row_index);
    dw13i.reset(dw13.bytes());
    dh_ref.reset(R * N * 2);  // h [R, F] of the gated kernels, c [R, N] of the plain ones
    dh.reset(R * N * 2);
    interleave_gate_up(dev_ref(dw13, bf, {E, N, K}), dev_ref(dw13i, bf, {E, N, K}));
    GPU_CHECK(cudaDeviceSynchronize());
    auto run = [&](bool gated, cuda::GroupedGemmTile tile, bool gathered, DeviceBuffer& out) -> std::string {
        cuda::GroupedGemmArgs g = bf16_args(gathered ? dx.get() : dxp.get(), gated ? dw13i.get() : dw13.get(),
                                            out.get(), E, N, K, R, doff.get<int32_t>(), tile, gated,
                                            Activation::kGeGLU);
        if (gathered) {
            g.a_row_index = didx.get<int32_t>();
            g.a_rows = T;
        }
        const size_t gws = cuda::grouped_gemm_workspace_size(g);
        DeviceBuffer gw(gws);
        out.poison();
        cuda::grouped_gemm(g, gw.get(), gws, nullptr);
        EXPECT_EQ(cudaGetLastError(), cudaSuccess);
        EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        return cuda::grouped_gemm_kernel_name(g);
    };
    using Tile = cuda::GroupedGemmTile;
    // (gated, tile of the gathered call, tile of the copy's call): the plain kSmall tile (Pingpong 64x128x128) runs
    // gathered as the Pingpong 128x128x64 tile, kMedium's.
    const std::vector<std::tuple<bool, Tile, Tile>> runs = {
        {true, Tile::kAuto, Tile::kAuto},     {true, Tile::kLarge, Tile::kLarge},
        {true, Tile::kLargeNoCluster, Tile::kLargeNoCluster}, {true, Tile::kMedium, Tile::kMedium},
        {false, Tile::kAuto, Tile::kAuto},    {false, Tile::kLarge, Tile::kLarge},
        {false, Tile::kLargeNoCluster, Tile::kLargeNoCluster}, {false, Tile::kMedium, Tile::kMedium},
        {false, Tile::kSmall, Tile::kMedium}, {false, Tile::kLargeClusterN, Tile::kLargeNoCluster}};
    for (const auto& [gated, tile, copy_tile] : runs) {
        const int64_t cols = gated ? F : N;
        const std::string plain = run(gated, copy_tile, false, dh_ref);
        const std::string name = run(gated, tile, true, dh);
        SCOPED_TRACE(name);
        EXPECT_NE(name.find("gathered A"), std::string::npos) << "the gathered kernel must run: " << name;
        const std::string tile_name = plain.substr(0, plain.find(','));  // e.g. "sm90 bf16 pingpong 128x128x64"
        EXPECT_EQ(name.rfind(tile_name, 0), 0u) << "same tile as " << plain;
        const std::vector<uint16_t> want = testing::download_raw<uint16_t>(dh_ref.get(), R * cols);
        const std::vector<uint16_t> got = testing::download_raw<uint16_t>(dh.get(), R * cols);
        int64_t differ = 0, first_bad = -1;
        for (int64_t i = 0; i < owned * cols; ++i)
            if (got[i] != want[i] && differ++ == 0) first_bad = i;
        EXPECT_EQ(differ, 0) << differ << " of " << owned * cols << " elements differ from the gathered copy's; first "
                             << "at row " << first_bad / cols << " col " << first_bad % cols;
        for (int64_t i = owned * cols; i < R * cols; ++i)
            ASSERT_EQ(got[i], 0xFFFF) << "row past offsets[E] " << i / cols;
        int64_t nonzero = 0;
        for (int64_t i = 0; i < owned * cols; ++i) nonzero += (want[i] & 0x7FFF) != 0;
        EXPECT_GT(nonzero, owned * cols / 2) << "the output is mostly zeros";
    }
    // The public stage with options.row_index: the CPU specification's values (bf16 roundings of g and of h).
    const size_t ws = grouped_gemm_gated_workspace_size(Device::kCUDA, bf, E, F, K, R);
    DeviceBuffer w(ws);
    GroupedGemmOptions opt;
    opt.row_index = dev_ref(didx, DType::kI32, {R});
    dh.poison();
    grouped_gemm_gated(Activation::kGeGLU, dev_ref(dx, bf, {T, K}), dev_ref(dw13i, bf, {E, N, K}),
                       dev_ref(doff, DType::kI32, {E + 1}), dev_ref(dh, bf, {R, F}), w.get(), ws, nullptr, opt);
    GPU_CHECK(cudaDeviceSynchronize());
    const test::HostTensor hx = test::HostTensor::from_floats(x, bf, {T, K});
    test::HostTensor hw13i(bf, {E, N, K}), hoff(DType::kI32, {E + 1}), hidx(DType::kI32, {R}), hh(bf, {R, F});
    interleave_gate_up(test::HostTensor::from_floats(testing::download(dw13.get(), E * N * K, bf), bf, {E, N, K}).ref(),
                       hw13i.ref());
    for (int64_t e = 0; e <= E; ++e) hoff.ptr<int32_t>()[e] = offsets[e];
    for (int64_t r = 0; r < R; ++r) hidx.ptr<int32_t>()[r] = row_index[r];
    GroupedGemmOptions hopt;
    hopt.row_index = hidx.ref();
    grouped_gemm_gated(Activation::kGeGLU, hx.ref(), hw13i.ref(), hoff.ref(), hh.ref(), nullptr, 0, nullptr, hopt);
    const std::vector<uint16_t> raw = testing::download_raw<uint16_t>(dh.get(), R * F);
    std::vector<float> got(R * F), want(R * F);
    for (int64_t i = 0; i < R * F; ++i) {
        got[i] = bf16_to_float(raw[i]);
        want[i] = hh.get(i);
    }
    EXPECT_TRUE(testing::all_close(got, want, 2e-2, 2e-2, "h (gathered A) vs the CPU specification", F));
    for (int64_t i = owned * F; i < R * F; ++i) ASSERT_EQ(raw[i], 0) << "the stage zeroes rows past offsets[E]";
}

// The gated kernels that keep GEMM1's product (GroupedGemmArgs::gate_up_out; the training forward), every tile:
// h bitwise the same tile's gated kernel without it (the same mainloop and epilogue arithmetic), the interleaved
// activation kernel on the kept g gives h's bits again (g holds exactly the rounded gate and up the epilogue used),
// g within bf16 rounding of the plain GEMM and of the CPU specification, rows past offsets[E] of both outputs left
// poisoned by the kernel, two runs the same bits. F = 72 makes 2F an odd multiple of 16 (the last gate/up pair of a
// four-chunk step lies past N); groups of 0, 1 and 129 rows leave partial M tiles. Then the public stage: rows past
// offsets[E] zeroed in g too, and the CUDA refusal of gate_up with row_index.
TEST(GpuGatedGemm, KeptProductIsTheGemmAndHItsActivation) {
    if (!sm90()) GTEST_SKIP() << "the gated epilogue needs an sm_90 GPU";
    const DType bf = DType::kBF16;
    using Tile = cuda::GroupedGemmTile;
    struct Shape {
        int64_t F, K;
        std::vector<int32_t> counts;
    };
    const std::vector<Shape> shapes = {{72, 256, {0, 1, 129, 300, 7}}, {96, 512, random_counts(16, 300, 13)},
                                       {128, 256, {1500, 1700}}};
    for (const Shape& sh : shapes) {
        const int64_t E = static_cast<int64_t>(sh.counts.size()), F = sh.F, K = sh.K, N = 2 * F;
        std::vector<int32_t> offsets(E + 1, 0);
        for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + sh.counts[e];
        const int64_t owned = offsets[E], R = owned + 5;
        const std::vector<float> a = testing::random_values(R * K, bf, -1.0f, 1.0f, 301 + F);
        const std::vector<float> w13 = testing::random_values(E * N * K, bf, -0.5f, 0.5f, 302 + F);
        DeviceBuffer da, dw13, dw13i, doff, dplain, dh_ref, dh, dg, dh_again;
        testing::upload(da, a, bf);
        testing::upload(dw13, w13, bf);
        testing::upload_raw(doff, offsets);
        dw13i.reset(dw13.bytes());
        dplain.reset(R * N * 2);
        dh_ref.reset(R * F * 2);
        dh.reset(R * F * 2);
        dg.reset(R * N * 2);
        dh_again.reset(R * F * 2);
        interleave_gate_up(dev_ref(dw13, bf, {E, N, K}), dev_ref(dw13i, bf, {E, N, K}));
        {  // the plain GEMM with the interleaved weights: g's values in its column order
            const size_t ws = grouped_gemm_workspace_size(Device::kCUDA, bf, E, N, K, R);
            DeviceBuffer w(ws);
            grouped_gemm(dev_ref(da, bf, {R, K}), dev_ref(dw13i, bf, {E, N, K}), dev_ref(doff, DType::kI32, {E + 1}),
                         dev_ref(dplain, bf, {R, N}), w.get(), ws);
            GPU_CHECK(cudaDeviceSynchronize());
        }
        const std::vector<float> plain = testing::download(dplain.get(), owned * N, bf);
        // The CPU specification of g: grouped_gemm in double, rounded once.
        const test::HostTensor ha = test::HostTensor::from_floats(a, bf, {R, K});
        test::HostTensor hw13i(bf, {E, N, K}), hoff(DType::kI32, {E + 1}), hg(bf, {R, N});
        interleave_gate_up(test::HostTensor::from_floats(w13, bf, {E, N, K}).ref(), hw13i.ref());
        for (int64_t e = 0; e <= E; ++e) hoff.ptr<int32_t>()[e] = offsets[e];
        grouped_gemm(ha.ref(), hw13i.ref(), hoff.ref(), hg.ref(), nullptr, 0);
        std::vector<float> spec(owned * N);
        for (int64_t i = 0; i < owned * N; ++i) spec[i] = hg.get(i);

        for (Tile tile : {Tile::kAuto, Tile::kLarge, Tile::kLargeNoCluster, Tile::kMedium}) {
            for (Activation act : {Activation::kSwiGLU, Activation::kGeGLU}) {
                cuda::GroupedGemmArgs gh = bf16_args(da.get(), dw13i.get(), dh_ref.get(), E, N, K, R,
                                                     doff.get<int32_t>(), tile, true, act);
                cuda::GroupedGemmArgs gk = gh;
                gk.c = dh.get();
                gk.gate_up_out = dg.get();
                const std::string name = cuda::grouped_gemm_kernel_name(gk);
                SCOPED_TRACE("F=" + std::to_string(F) + " " + name + " " + to_string(act));
                EXPECT_NE(name.find("keeping g"), std::string::npos) << name;
                const std::string gated_name = cuda::grouped_gemm_kernel_name(gh);
                EXPECT_EQ(name.rfind(gated_name.substr(0, gated_name.find(',')), 0), 0u)
                    << "same tile as " << gated_name;
                const size_t gws = std::max(cuda::grouped_gemm_workspace_size(gh), cuda::grouped_gemm_workspace_size(gk));
                DeviceBuffer gw(gws);
                dh_ref.poison();
                cuda::grouped_gemm(gh, gw.get(), gws, nullptr);
                GPU_CHECK(cudaGetLastError());
                std::vector<uint16_t> first_h, first_g;
                for (int run = 0; run < 2; ++run) {
                    dh.poison();
                    dg.poison();
                    cuda::grouped_gemm(gk, gw.get(), gws, nullptr);
                    GPU_CHECK(cudaGetLastError());
                    GPU_CHECK(cudaDeviceSynchronize());
                    const std::vector<uint16_t> h = testing::download_raw<uint16_t>(dh.get(), R * F);
                    const std::vector<uint16_t> g = testing::download_raw<uint16_t>(dg.get(), R * N);
                    if (run == 1) {
                        EXPECT_TRUE(h == first_h && g == first_g) << "a second run gave other bits";
                        break;
                    }
                    first_h = h;
                    first_g = g;
                }
                const std::vector<uint16_t> want_h = testing::download_raw<uint16_t>(dh_ref.get(), R * F);
                int64_t differ = 0, first_bad = -1;
                for (int64_t i = 0; i < owned * F; ++i)
                    if (first_h[i] != want_h[i] && differ++ == 0) first_bad = i;
                EXPECT_EQ(differ, 0) << differ << " of " << owned * F << " h elements differ from the gated kernel's; "
                                     << "first at row " << first_bad / F << " col " << first_bad % F;
                for (int64_t i = owned * F; i < R * F; ++i) ASSERT_EQ(first_h[i], 0xFFFF) << "h row " << i / F;
                for (int64_t i = owned * N; i < R * N; ++i) ASSERT_EQ(first_g[i], 0xFFFF) << "g row " << i / N;
                // h = the interleaved activation of the kept g, bit for bit
                activation(act, dev_ref(dg, bf, {owned, N}), dev_ref(dh_again, bf, {owned, F}), TensorRef(), nullptr,
                           /*gate_up_interleaved=*/true);
                GPU_CHECK(cudaDeviceSynchronize());
                const std::vector<uint16_t> h_again = testing::download_raw<uint16_t>(dh_again.get(), owned * F);
                differ = 0;
                for (int64_t i = 0; i < owned * F; ++i) differ += h_again[i] != first_h[i];
                EXPECT_EQ(differ, 0) << differ << " h elements differ from the activation of the kept g";
                std::vector<float> got_g(owned * N);
                for (int64_t i = 0; i < owned * N; ++i) got_g[i] = bf16_to_float(first_g[i]);
                EXPECT_TRUE(testing::all_close(got_g, plain, 1e-3, 3e-2, "g vs the plain GEMM", N));
                EXPECT_TRUE(testing::all_close(got_g, spec, 1e-3, 3e-2, "g vs the CPU specification", N));
                EXPECT_GT(testing::rms(spec), 1e-2) << "the reference must not be zeros";
            }
        }
        // The public stage: rows past offsets[E] of g zeroed as h's; gate_up with row_index refused on CUDA.
        const size_t ws = grouped_gemm_gated_workspace_size(Device::kCUDA, bf, E, F, K, R);
        DeviceBuffer w(ws);
        GroupedGemmOptions opt;
        opt.gate_up = dev_ref(dg, bf, {R, N});
        dg.poison();
        grouped_gemm_gated(Activation::kSwiGLU, dev_ref(da, bf, {R, K}), dev_ref(dw13i, bf, {E, N, K}),
                           dev_ref(doff, DType::kI32, {E + 1}), dev_ref(dh, bf, {R, F}), w.get(), ws, nullptr, opt);
        GPU_CHECK(cudaDeviceSynchronize());
        const std::vector<uint16_t> g = testing::download_raw<uint16_t>(dg.get(), R * N);
        for (int64_t i = owned * N; i < R * N; ++i) ASSERT_EQ(g[i], 0) << "the stage zeroes g's rows past offsets[E]";
        DeviceBuffer didx(R * 4);
        GPU_CHECK(cudaMemset(didx.get(), 0, R * 4));
        opt.row_index = dev_ref(didx, DType::kI32, {R});
        test::expect_error(
            [&] {
                grouped_gemm_gated(Activation::kSwiGLU, dev_ref(da, bf, {R, K}), dev_ref(dw13i, bf, {E, N, K}),
                                   dev_ref(doff, DType::kI32, {E + 1}), dev_ref(dh, bf, {R, F}), w.get(), ws, nullptr,
                                   opt);
            },
            {"gate_up", "row_index"});
    }
}

// The activation kernels with gate_up_interleaved: the plain kernels on the permuted columns, bit for bit (the
// same arithmetic per element), fp32 and bf16, vectorised (F % 8 == 0 rows) for both directions.
TEST(GpuGatedGemm, InterleavedActivationKernelsArePermutedPlainOnes) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    const int64_t R = 37, F = 40, N = 2 * F;
    for (DType dt : {DType::kF32, DType::kBF16}) {
        for (Activation act : {Activation::kSwiGLU, Activation::kGeGLU}) {
            SCOPED_TRACE(std::string(to_string(dt)) + " " + to_string(act));
            const std::vector<float> g = testing::random_values(R * N, dt, -3.0f, 3.0f, 301);
            const std::vector<float> dh = testing::random_values(R * F, dt, -1.0f, 1.0f, 302);
            const test::HostTensor hg = test::HostTensor::from_floats(g, dt, {R, N, 1});
            test::HostTensor hgi(dt, {R, N, 1});
            interleave_gate_up(hg.ref(), hgi.ref());  // g's columns permuted as w13's rows
            std::vector<float> gi(R * N);
            for (int64_t i = 0; i < R * N; ++i) gi[i] = hgi.get(i);
            DeviceBuffer dg_, dgi, ddh, h, hi, dgo, dgio;
            testing::upload(dg_, g, dt);
            testing::upload(dgi, gi, dt);
            testing::upload(ddh, dh, dt);
            h.reset(R * F * dtype_size(dt));
            hi.reset(R * F * dtype_size(dt));
            dgo.reset(R * N * dtype_size(dt));
            dgio.reset(R * N * dtype_size(dt));
            activation(act, dev_ref(dg_, dt, {R, N}), dev_ref(h, dt, {R, F}));
            activation(act, dev_ref(dgi, dt, {R, N}), dev_ref(hi, dt, {R, F}), TensorRef(), nullptr, true);
            activation_backward(act, dev_ref(dg_, dt, {R, N}), dev_ref(ddh, dt, {R, F}), dev_ref(dgo, dt, {R, N}));
            activation_backward(act, dev_ref(dgi, dt, {R, N}), dev_ref(ddh, dt, {R, F}), dev_ref(dgio, dt, {R, N}),
                                nullptr, true);
            GPU_CHECK(cudaDeviceSynchronize());
            const std::vector<float> hv = testing::download(h.get(), R * F, dt),
                                     hiv = testing::download(hi.get(), R * F, dt);
            for (int64_t i = 0; i < R * F; ++i) ASSERT_EQ(float_bits(hiv[i]), float_bits(hv[i])) << "h " << i;
            const test::HostTensor plain_dg =
                test::HostTensor::from_floats(testing::download(dgo.get(), R * N, dt), dt, {R, N, 1});
            test::HostTensor want(dt, {R, N, 1});
            interleave_gate_up(plain_dg.ref(), want.ref());
            const std::vector<float> got = testing::download(dgio.get(), R * N, dt);
            for (int64_t i = 0; i < R * N; ++i) ASSERT_EQ(float_bits(got[i]), float_bits(want.get(i))) << "dg " << i;
        }
    }
}

// A device copy of a host tensor; a TensorRef of it with the host tensor's dtype and shape.
struct DeviceCopy {
    DeviceBuffer buf;
    TensorRef ref;
};
void to_device(const test::HostTensor& h, DeviceCopy* d) {
    if (!h.defined()) return;
    const size_t bytes = static_cast<size_t>(h.numel()) * dtype_size(h.dtype());
    d->buf.reset(bytes);
    GPU_CHECK(cudaMemcpy(d->buf.get(), h.data(), bytes, cudaMemcpyHostToDevice));
    d->ref = TensorRef::contiguous(d->buf.get(), h.dtype(), h.shape().data(), static_cast<int>(h.shape().size()),
                                   Device::kCUDA, 0);
}

// y of one forward of a CUDA layer on x's first T rows (workspace and y poisoned first); fused: the small-batch path
// (experts_fused), else the staged chain (gather: MoELayer::set_gather_in_gemm1, kOn = GEMM1 reading x's rows
// through the plan wherever GEMM1 is gated; gathered, when given, receives uses_gather_in_gemm1(T)).
std::vector<uint8_t> cuda_layer_y(const MoEConfig& cfg, const MoEWeights& w, const DeviceBuffer& x, int64_t T,
                                  bool fused, GatherInGemm1 gather = GatherInGemm1::kOff, bool* gathered = nullptr) {
    MoELayer layer(cfg, w);
    layer.set_fused_max_tokens(fused ? fused_path_max_tokens() : 0);
    layer.set_gather_in_gemm1(gather);
    if (gathered != nullptr) *gathered = layer.uses_gather_in_gemm1(T);
    EXPECT_EQ(layer.uses_fused_path(T), fused) << "T=" << T;
    const size_t bytes = T * cfg.hidden_size * dtype_size(cfg.dtype), ws_bytes = layer.workspace_size(T);
    DeviceBuffer y(bytes), ws(ws_bytes);
    y.poison();
    ws.poison();
    layer.forward(dev_ref(x, cfg.dtype, {T, cfg.hidden_size}), dev_ref(y, cfg.dtype, {T, cfg.hidden_size}), ws.get(),
                  ws_bytes, nullptr);
    const cudaError_t err = cudaDeviceSynchronize();
    EXPECT_EQ(err, cudaSuccess) << cudaGetErrorString(err);
    return testing::download_raw<uint8_t>(y.get(), bytes);
}

TEST(GpuGatedGemm, InterleavedLayerGivesThePlainLayersBits) {
    if (!sm90()) GTEST_SKIP() << "needs an sm_90 GPU";
    for (DType dt : {DType::kBF16, DType::kF16}) {
        // dropless SwiGLU; GeGLU + shared expert + capacity; expert choice
        for (int variant = 0; variant < 3; ++variant) {
            SCOPED_TRACE(std::string(to_string(dt)) + " variant " + std::to_string(variant));
            MoEConfig cfg;
            cfg.hidden_size = 256;
            cfg.ffn_size = 136;
            cfg.num_experts = 16;
            cfg.top_k = 4;
            cfg.dtype = dt;
            if (variant == 1) {
                cfg.activation = Activation::kGeGLU;
                cfg.num_shared_experts = 1;
                cfg.shared_ffn_size = 64;
                cfg.capacity_factor = 0.9;
            }
            if (variant == 2) cfg.routing_mode = RoutingMode::kExpertChoice;
            const int64_t T = 300;
            const test::HostLayer h = test::random_layer(cfg, 70 + variant, dt);
            test::HostTensor w13i(dt, h.w13.shape());
            interleave_gate_up(h.w13.ref(), w13i.ref());
            DeviceCopy gate, w13, w13i_d, w2, sw13, sw2;
            for (auto [src, dst] : {std::make_pair(&h.gate, &gate), std::make_pair(&h.w13, &w13),
                                    std::make_pair(static_cast<const test::HostTensor*>(&w13i), &w13i_d),
                                    std::make_pair(&h.w2, &w2), std::make_pair(&h.shared_w13, &sw13),
                                    std::make_pair(&h.shared_w2, &sw2)})
                to_device(*src, dst);
            MoEWeights w;
            w.gate = gate.ref;
            w.w13 = w13.ref;
            w.w2 = w2.ref;
            w.shared_w13 = sw13.ref;
            w.shared_w2 = sw2.ref;
            DeviceBuffer x;
            testing::upload(x, testing::random_values(T * cfg.hidden_size, dt, -1.0f, 1.0f, 71), dt);
            MoEConfig icfg = cfg;
            icfg.gate_up_interleaved = true;
            MoEWeights wi = w;
            wi.w13 = w13i_d.ref;
            // The staged chain at T rows; the fused small-batch path (decode kernels) at 1, 7 and 40 rows.
            for (auto [rows, fused] : {std::make_pair(T, false), std::make_pair(int64_t{1}, true),
                                       std::make_pair(int64_t{7}, true), std::make_pair(int64_t{40}, true)}) {
                SCOPED_TRACE("T=" + std::to_string(rows) + (fused ? " fused path" : " staged chain"));
                const std::vector<uint8_t> want = cuda_layer_y(cfg, w, x, rows, fused);
                const std::vector<uint8_t> got = cuda_layer_y(icfg, wi, x, rows, fused);
                EXPECT_TRUE(testing::bitwise_equal(got, want, "y interleaved vs plain"));
                if (!fused) {  // the dispatch in GEMM1's loads (bf16: the gathered kernel; fp16: the separate gather)
                    bool gathered = false;
                    const std::vector<uint8_t> got_g =
                        cuda_layer_y(icfg, wi, x, rows, fused, GatherInGemm1::kOn, &gathered);
                    EXPECT_EQ(gathered, dt == DType::kBF16);
                    EXPECT_TRUE(testing::bitwise_equal(got_g, want, "y interleaved, gather in GEMM1, vs plain"));
                    // The automatic choice: at most 128 rows per expert on average here (token choice 300 * 4 / 16,
                    // expert choice its capacity), so bf16 gathers in GEMM1.
                    const std::vector<uint8_t> got_a =
                        cuda_layer_y(icfg, wi, x, rows, fused, GatherInGemm1::kAuto, &gathered);
                    EXPECT_EQ(gathered, dt == DType::kBF16);
                    EXPECT_TRUE(testing::bitwise_equal(got_a, want, "y interleaved, automatic gather, vs plain"));
                }
                size_t nonzero = 0;
                for (uint8_t b : want) nonzero += b != 0;
                EXPECT_GT(nonzero, want.size() / 2) << "y is mostly zero bytes";
            }
        }
    }
}

TEST(GpuGatedGemm, RefusesFp16OnCuda) {
    if (!sm90()) GTEST_SKIP() << "needs an sm_90 GPU";
    const int64_t E = 2, F = 16, K = 16, N = 2 * F, R = 4;
    DeviceBuffer a(R * K * 2), w(E * N * K * 2), off((E + 1) * 4), h(R * F * 2);
    const size_t ws = 1 << 20;
    DeviceBuffer work(ws);
    test::expect_error(
        [&] {
            grouped_gemm_gated(Activation::kSwiGLU, dev_ref(a, DType::kF16, {R, K}), dev_ref(w, DType::kF16, {E, N, K}),
                               dev_ref(off, DType::kI32, {E + 1}), dev_ref(h, DType::kF16, {R, F}), work.get(), ws);
        },
        {"bf16"});
}

}  // namespace
}  // namespace switchyard
