// tests/gpu_test_dgrad_activation.cpp: grouped_gemm_dgrad_activation on CUDA: GEMM2's dgrad, the gated activation's
// backward and the recomputed activation in one call.
//
// It must give the bits of the three stages called one by one on the same card (grouped_gemm_dgrad into dh,
// activation_backward, activation), with the rows past offsets[E] of dg and h written as 0 (outputs poisoned first)
// and the same bits on a second run. Cases: groups of 0, 1 and 129 rows, an F that no 256-wide tile divides (F = 72),
// 128 experts with random counts and experts of > 256 rows, both activations and both column layouts of g; bf16 and
// fp32 against the CPU specification within their rounding. Skips without an sm_90 GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "switchyard/stages.h"
#include "test_util.h"

namespace switchyard {
namespace {

using testing::DeviceBuffer;
// gpu_test_util.h's helpers under this file's short names.
constexpr auto* sm90 = &testing::sm90_device;
constexpr auto* dev_ref = &testing::device_ref;
constexpr auto* random_counts = &testing::poisson_counts;

struct Case {
    std::string name;
    int64_t H, F;
    std::vector<int32_t> counts;  // rows per expert
    int64_t extra_rows;           // rows past offsets[E]
    Activation act;
    bool interleaved;
};

// Counts the elements of got that differ from want in rows < owned, and checks rows >= owned are 0.
void expect_bits(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want, int64_t owned, int64_t width,
                 const char* what) {
    int64_t differ = 0, first_bad = -1, nonzero = 0;
    for (int64_t i = 0; i < owned * width; ++i) {
        nonzero += (got[i] & 0x7FFF) != 0;
        if (got[i] != want[i]) {
            if (first_bad < 0) first_bad = i;
            ++differ;
        }
    }
    EXPECT_EQ(differ, 0) << what << ": " << differ << " of " << owned * width << " owned elements differ from the "
                         << "unfused path; first at row " << first_bad / width << " col " << first_bad % width << ": "
                         << (first_bad >= 0 ? bf16_to_float(got[first_bad]) : 0.0f) << " vs "
                         << (first_bad >= 0 ? bf16_to_float(want[first_bad]) : 0.0f);
    EXPECT_GT(nonzero, owned * width / 2) << what << ": the comparison must not be between zeros";
    for (int64_t i = owned * width; i < static_cast<int64_t>(got.size()); ++i)
        ASSERT_EQ(got[i], 0) << what << ": unowned row " << i / width << " must be 0";
}

void run_case(const Case& c) {
    SCOPED_TRACE(c.name + (c.interleaved ? " (interleaved g)" : " (plain g)") + " " + to_string(c.act));
    const DType bf = DType::kBF16;
    const int64_t E = static_cast<int64_t>(c.counts.size()), H = c.H, F = c.F, N = 2 * F;
    std::vector<int32_t> offsets(E + 1, 0);
    for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + c.counts[e];
    const int64_t owned = offsets[E], R = owned + c.extra_rows;

    const std::vector<float> dc = testing::random_values(R * H, bf, -1.0f, 1.0f, 301);
    const std::vector<float> w2 = testing::random_values(E * H * F, bf, -0.5f, 0.5f, 302);
    const std::vector<float> g = testing::random_values(R * N, bf, -4.0f, 4.0f, 303);
    DeviceBuffer ddc, dw2, dg_in, doff, ddh, ddg_want, dh_want, ddg, dh;
    testing::upload(ddc, dc, bf);
    testing::upload(dw2, w2, bf);
    testing::upload(dg_in, g, bf);
    testing::upload_raw(doff, offsets);
    for (DeviceBuffer* b : {&ddg_want, &ddg}) b->reset(R * N * 2);
    for (DeviceBuffer* b : {&ddh, &dh_want, &dh}) b->reset(R * F * 2);
    const TensorRef off = dev_ref(doff, DType::kI32, {E + 1});
    const size_t ws = grouped_gemm_grad_workspace_size(Device::kCUDA, bf, E, H, F, R);
    DeviceBuffer w(ws);

    // The unfused path: the three stages.
    grouped_gemm_dgrad(dev_ref(ddc, bf, {R, H}), dev_ref(dw2, bf, {E, H, F}), off, dev_ref(ddh, bf, {R, F}), w.get(),
                       ws);
    activation_backward(c.act, dev_ref(dg_in, bf, {R, N}), dev_ref(ddh, bf, {R, F}), dev_ref(ddg_want, bf, {R, N}),
                        nullptr, c.interleaved);
    activation(c.act, dev_ref(dg_in, bf, {R, N}), dev_ref(dh_want, bf, {R, F}), TensorRef(), nullptr, c.interleaved);
    GPU_CHECK(cudaDeviceSynchronize());
    std::vector<uint16_t> want_dg = testing::download_raw<uint16_t>(ddg_want.get(), R * N);
    std::vector<uint16_t> want_h = testing::download_raw<uint16_t>(dh_want.get(), R * F);

    // The stage twice: rows past offsets[E] zeroed, the same bits again.
    std::vector<uint16_t> first_dg, first_h;
    for (int run = 0; run < 2; ++run) {
        ddg.poison();
        dh.poison();
        grouped_gemm_dgrad_activation(c.act, dev_ref(ddc, bf, {R, H}), dev_ref(dw2, bf, {E, H, F}), off,
                                      dev_ref(dg_in, bf, {R, N}), dev_ref(ddg, bf, {R, N}), dev_ref(dh, bf, {R, F}),
                                      w.get(), ws, nullptr, c.interleaved);
        GPU_CHECK(cudaGetLastError());
        GPU_CHECK(cudaDeviceSynchronize());
        const std::vector<uint16_t> got_dg = testing::download_raw<uint16_t>(ddg.get(), R * N);
        const std::vector<uint16_t> got_h = testing::download_raw<uint16_t>(dh.get(), R * F);
        if (run == 1) {
            ASSERT_TRUE(got_dg == first_dg && got_h == first_h) << "a second run gave other bits";
            break;
        }
        first_dg = got_dg;
        first_h = got_h;
        expect_bits(got_dg, want_dg, owned, N, "dg (the stage)");
        expect_bits(got_h, want_h, owned, F, "h (the stage)");
    }
}

TEST(GpuDgradActivation, GivesTheBitsOfTheThreeStages) {
    if (!sm90()) GTEST_SKIP() << "the bf16 grouped GEMMs need an sm_90 GPU";
    const std::vector<Case> cases = {
        {"listed counts", 128, 64, {0, 1, 129, 300}, 5, Activation::kSwiGLU, false},
        {"F=72", 256, 72, {7, 0, 130, 256, 1}, 3, Activation::kGeGLU, false},
        {"128 experts ~200 rows", 512, 96, random_counts(128, 200, 7), 0, Activation::kSwiGLU, false},
        {"8 experts ~600 rows", 256, 128, random_counts(8, 600, 8), 9, Activation::kSwiGLU, false},
    };
    for (const auto& c : cases) {
        run_case(c);
        Case i = c;
        i.interleaved = true;
        i.act = c.act == Activation::kSwiGLU ? Activation::kGeGLU : Activation::kSwiGLU;
        run_case(i);
    }
}

// bf16 against the CPU specification (double sums, bf16 roundings of dh, dg and h), and fp32 on CUDA (the three
// stages) against the CPU's fp32 within fp32 rounding.
TEST(GpuDgradActivation, MatchesTheCpuSpecification) {
    if (!sm90()) GTEST_SKIP() << "the bf16 grouped GEMMs need an sm_90 GPU";
    const int64_t E = 5, H = 96, F = 40, N = 2 * F;
    const std::vector<int32_t> counts = {20, 0, 3, 64, 17};
    std::vector<int32_t> offsets(E + 1, 0);
    for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
    const int64_t owned = offsets[E], R = owned + 4;
    for (DType t : {DType::kBF16, DType::kF32}) {
        SCOPED_TRACE(to_string(t));
        using test::HostTensor;
        const HostTensor dc = HostTensor::from_floats(testing::random_values(R * H, t, -1, 1, 311), t, {R, H});
        const HostTensor w2 =
            HostTensor::from_floats(testing::random_values(E * H * F, t, -0.5f, 0.5f, 312), t, {E, H, F});
        const HostTensor g = HostTensor::from_floats(testing::random_values(R * N, t, -4, 4, 313), t, {R, N});
        test::HostTensor off(DType::kI32, {E + 1}), dg(t, {R, N}), h(t, {R, F});
        for (int64_t e = 0; e <= E; ++e) off.ptr<int32_t>()[e] = offsets[e];
        grouped_gemm_dgrad_activation(Activation::kSwiGLU, dc.ref(), w2.ref(), off.ref(), g.ref(), dg.ref(), h.ref(),
                                      nullptr, 0);
        DeviceBuffer ddc, dw2, dgi, doff, ddg, dh;
        testing::upload(ddc, dc.to_floats(), t);
        testing::upload(dw2, w2.to_floats(), t);
        testing::upload(dgi, g.to_floats(), t);
        testing::upload_raw(doff, offsets);
        ddg.reset(R * N * dtype_size(t));
        dh.reset(R * F * dtype_size(t));
        ddg.poison();
        dh.poison();
        const size_t ws = grouped_gemm_grad_workspace_size(Device::kCUDA, t, E, H, F, R);
        DeviceBuffer w(ws);
        grouped_gemm_dgrad_activation(Activation::kSwiGLU, dev_ref(ddc, t, {R, H}), dev_ref(dw2, t, {E, H, F}),
                                      dev_ref(doff, DType::kI32, {E + 1}), dev_ref(dgi, t, {R, N}),
                                      dev_ref(ddg, t, {R, N}), dev_ref(dh, t, {R, F}), w.get(), ws);
        GPU_CHECK(cudaDeviceSynchronize());
        const std::vector<float> got_dg = testing::download(ddg.get(), R * N, t);
        const std::vector<float> got_h = testing::download(dh.get(), R * F, t);
        const double tol = t == DType::kBF16 ? 2e-2 : 1e-5;
        EXPECT_TRUE(testing::all_close(got_dg, dg.to_floats(), tol, tol, "dg vs the CPU specification", N));
        EXPECT_TRUE(testing::all_close(got_h, h.to_floats(), tol, tol, "h vs the CPU specification", F));
        EXPECT_GT(testing::rms(dg.to_floats()), 1e-3) << "the reference must not be zeros";
    }
}

}  // namespace
}  // namespace switchyard
