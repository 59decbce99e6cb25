// tests/gpu_test_dgrad_activation.cpp: grouped_gemm_dgrad_activation on CUDA: GEMM2's dgrad, the gated activation's
// backward and the recomputed activation in one call.
//
// It must give the bits of the three stages called one by one on the same card (grouped_gemm_dgrad into dh,
// activation_backward, activation), with the rows past offsets[E] of dg and h written as 0 (outputs poisoned first)
// and the same bits on a second run. Cases: groups of 0, 1 and 129 rows, an F that no 256-wide tile divides (F = 72),
// 128 experts with random counts and experts of > 256 rows, both activations and both column layouts of g, the
// activation kernels' 16-byte vector rows and their scalar path (fp32's F = 42; g and dg not 16-byte aligned); bf16
// and fp32 against the CPU specification within their rounding (the specification's double arithmetic promises no
// bits to fp32 sums). The bf16 tests skip without an sm_90 GPU (CUTLASS grouped GEMMs), the fp32 ones (SIMT grouped
// GEMMs) without a CUDA GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <initializer_list>
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
    DType dtype = DType::kBF16;
    bool misaligned = false;  // g and dg one element past a 16-byte boundary: the activation kernels' scalar path
};

// n elements of dtype t placed `shift` elements into b (shift 1: not 16-byte aligned), the whole buffer poisoned
// first, then v copied there when given; *at = the elements' address.
void place(DeviceBuffer& b, int64_t n, DType t, int64_t shift, void** at, const std::vector<float>& v = {}) {
    const size_t es = dtype_size(t);
    b.reset((n + shift) * es);
    b.poison();
    *at = b.get<char>() + shift * es;
    if (v.empty()) return;
    const std::vector<uint8_t> bytes = testing::encode(v, t);
    GPU_CHECK(cudaMemcpy(*at, bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
}

// A CUDA TensorRef (device 0) at p.
TensorRef at_ptr(void* p, DType t, std::initializer_list<int64_t> dims) {
    return TensorRef(p, t, dims, Device::kCUDA, 0);
}

// Counts the elements of got whose bits differ from want's in rows < owned, and checks rows >= owned are +0. Values
// decoded from their dtype (an exact widening, so equal bits in the dtype are equal bits here).
void expect_bits(const std::vector<float>& got, const std::vector<float>& want, int64_t owned, int64_t width,
                 const char* what) {
    int64_t differ = 0, first_bad = -1, nonzero = 0;
    for (int64_t i = 0; i < owned * width; ++i) {
        nonzero += (float_bits(got[i]) & 0x7FFFFFFFu) != 0;
        if (float_bits(got[i]) != float_bits(want[i])) {
            if (first_bad < 0) first_bad = i;
            ++differ;
        }
    }
    EXPECT_EQ(differ, 0) << what << ": " << differ << " of " << owned * width << " owned elements differ from the "
                         << "unfused path; first at row " << first_bad / width << " col " << first_bad % width << ": "
                         << (first_bad >= 0 ? got[first_bad] : 0.0f) << " vs "
                         << (first_bad >= 0 ? want[first_bad] : 0.0f);
    EXPECT_GT(nonzero, owned * width / 2) << what << ": the comparison must not be between zeros";
    for (int64_t i = owned * width; i < static_cast<int64_t>(got.size()); ++i)
        ASSERT_EQ(float_bits(got[i]), 0u) << what << ": unowned row " << i / width << " must be 0";
}

void run_case(const Case& c) {
    const DType dt = c.dtype;
    SCOPED_TRACE(c.name + " " + to_string(dt) + (c.interleaved ? " (interleaved g)" : " (plain g)") + " " +
                 to_string(c.act) + (c.misaligned ? " (g, dg not 16-byte aligned)" : ""));
    const int64_t E = static_cast<int64_t>(c.counts.size()), H = c.H, F = c.F, N = 2 * F;
    std::vector<int32_t> offsets(E + 1, 0);
    for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + c.counts[e];
    const int64_t owned = offsets[E], R = owned + c.extra_rows, shift = c.misaligned ? 1 : 0;

    const std::vector<float> dc = testing::random_values(R * H, dt, -1.0f, 1.0f, 301);
    const std::vector<float> w2 = testing::random_values(E * H * F, dt, -0.5f, 0.5f, 302);
    const std::vector<float> g = testing::random_values(R * N, dt, -4.0f, 4.0f, 303);
    DeviceBuffer ddc, dw2, dg_in, doff, ddh, ddg_want, dh_want, ddg, dh;
    testing::upload(ddc, dc, dt);
    testing::upload(dw2, w2, dt);
    testing::upload_raw(doff, offsets);
    void *gp = nullptr, *dg_want_p = nullptr, *dgp = nullptr;  // g, dg and the unfused dg, `shift` elements in
    place(dg_in, R * N, dt, shift, &gp, g);
    place(ddg_want, R * N, dt, shift, &dg_want_p);
    place(ddg, R * N, dt, shift, &dgp);
    for (DeviceBuffer* b : {&ddh, &dh_want, &dh}) b->reset(R * F * dtype_size(dt));
    const TensorRef off = dev_ref(doff, DType::kI32, {E + 1});
    const size_t ws = grouped_gemm_grad_workspace_size(Device::kCUDA, dt, E, H, F, R);
    DeviceBuffer w(ws);

    // The unfused path: the three stages.
    grouped_gemm_dgrad(dev_ref(ddc, dt, {R, H}), dev_ref(dw2, dt, {E, H, F}), off, dev_ref(ddh, dt, {R, F}), w.get(),
                       ws);
    activation_backward(c.act, at_ptr(gp, dt, {R, N}), dev_ref(ddh, dt, {R, F}), at_ptr(dg_want_p, dt, {R, N}),
                        nullptr, c.interleaved);
    activation(c.act, at_ptr(gp, dt, {R, N}), dev_ref(dh_want, dt, {R, F}), TensorRef(), nullptr, c.interleaved);
    GPU_CHECK(cudaDeviceSynchronize());
    const std::vector<float> want_dg = testing::download(dg_want_p, R * N, dt);
    const std::vector<float> want_h = testing::download(dh_want.get(), R * F, dt);

    // The stage twice: rows past offsets[E] zeroed, the same bits again.
    std::vector<uint8_t> first_dg, first_h;
    for (int run = 0; run < 2; ++run) {
        ddg.poison();
        dh.poison();
        grouped_gemm_dgrad_activation(c.act, dev_ref(ddc, dt, {R, H}), dev_ref(dw2, dt, {E, H, F}), off,
                                      at_ptr(gp, dt, {R, N}), at_ptr(dgp, dt, {R, N}), dev_ref(dh, dt, {R, F}),
                                      w.get(), ws, nullptr, c.interleaved);
        GPU_CHECK(cudaGetLastError());
        GPU_CHECK(cudaDeviceSynchronize());
        const std::vector<uint8_t> got_dg = testing::download_raw<uint8_t>(dgp, R * N * dtype_size(dt));
        const std::vector<uint8_t> got_h = testing::download_raw<uint8_t>(dh.get(), R * F * dtype_size(dt));
        if (run == 1) {
            ASSERT_TRUE(got_dg == first_dg && got_h == first_h) << "a second run gave other bits";
            break;
        }
        first_dg = got_dg;
        first_h = got_h;
        expect_bits(testing::decode(got_dg, dt), want_dg, owned, N, "dg (the stage)");
        expect_bits(testing::decode(got_h, dt), want_h, owned, F, "h (the stage)");
    }
}

// Each case as listed, then with the other activation: on g's interleaved columns where F allows (F % 8 == 0), else
// on the plain ones again.
void run_cases(const std::vector<Case>& cases) {
    for (const auto& c : cases) {
        run_case(c);
        Case i = c;
        i.interleaved = c.F % 8 == 0;
        i.act = c.act == Activation::kSwiGLU ? Activation::kGeGLU : Activation::kSwiGLU;
        run_case(i);
    }
}

TEST(GpuDgradActivation, GivesTheBitsOfTheThreeStages) {
    if (!sm90()) GTEST_SKIP() << "the bf16 grouped GEMMs need an sm_90 GPU";
    run_cases({
        {"listed counts", 128, 64, {0, 1, 129, 300}, 5, Activation::kSwiGLU, false},
        {"F=72", 256, 72, {7, 0, 130, 256, 1}, 3, Activation::kGeGLU, false},
        {"128 experts ~200 rows", 512, 96, random_counts(128, 200, 7), 0, Activation::kSwiGLU, false},
        {"8 experts ~600 rows", 256, 128, random_counts(8, 600, 8), 9, Activation::kSwiGLU, false},
        // bf16's F is a multiple of 8 (the GEMMs' TMA rows): the scalar activation path through the alignment of g.
        {"listed counts", 128, 64, {5, 0, 130, 33}, 4, Activation::kGeGLU, false, DType::kBF16, true},
    });
}

// fp32: the SIMT grouped GEMMs (any CUDA GPU), and F = 42 (F % 4 != 0: the activation kernels' scalar path).
TEST(GpuDgradActivation, Fp32GivesTheBitsOfTheThreeStages) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    const DType f32 = DType::kF32;
    run_cases({
        {"listed counts", 128, 64, {0, 1, 129, 300}, 5, Activation::kSwiGLU, false, f32},
        {"F=42", 96, 42, {7, 0, 130, 256, 1}, 3, Activation::kGeGLU, false, f32},
        {"F=72", 256, 72, {7, 0, 130, 256, 1}, 3, Activation::kGeGLU, false, f32},
        {"8 experts ~600 rows", 256, 128, random_counts(8, 600, 8), 9, Activation::kSwiGLU, false, f32},
        {"listed counts", 128, 40, {5, 0, 130, 33}, 4, Activation::kSwiGLU, false, f32, true},
    });
}

struct SpecCase {
    Activation act;
    int64_t F;
    bool interleaved;
    bool misaligned;  // g and dg one element past a 16-byte boundary on the device
};

// The CUDA stage against the CPU specification (double sums and arithmetic, dh, dg and h each rounded once to t) on
// the same inputs: bf16 within 2e-2 (GEMM sums in fp32 and one bf16 rounding of dh that may fall the other way), fp32
// within 1e-5 (fp32 sums and activation arithmetic); the rows past offsets[E] 0 on both (outputs poisoned first).
void match_cpu_spec(DType t, const SpecCase& s) {
    SCOPED_TRACE(std::string(to_string(t)) + " " + to_string(s.act) + " F=" + std::to_string(s.F) +
                 (s.interleaved ? " interleaved" : "") + (s.misaligned ? " (g, dg not 16-byte aligned)" : ""));
    const int64_t E = 5, H = 96, F = s.F, N = 2 * F, shift = s.misaligned ? 1 : 0;
    const std::vector<int32_t> counts = {20, 0, 3, 64, 17};
    std::vector<int32_t> offsets(E + 1, 0);
    for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
    const int64_t owned = offsets[E], R = owned + 4;
    using test::HostTensor;
    const HostTensor dc = HostTensor::from_floats(testing::random_values(R * H, t, -1, 1, 311), t, {R, H});
    const HostTensor w2 = HostTensor::from_floats(testing::random_values(E * H * F, t, -0.5f, 0.5f, 312), t, {E, H, F});
    const HostTensor g = HostTensor::from_floats(testing::random_values(R * N, t, -4, 4, 313), t, {R, N});
    test::HostTensor off(DType::kI32, {E + 1}), dg(t, {R, N}), h(t, {R, F});
    for (int64_t e = 0; e <= E; ++e) off.ptr<int32_t>()[e] = offsets[e];
    grouped_gemm_dgrad_activation(s.act, dc.ref(), w2.ref(), off.ref(), g.ref(), dg.ref(), h.ref(), nullptr, 0,
                                  nullptr, s.interleaved);
    DeviceBuffer ddc, dw2, dgi, doff, ddg, dh;
    testing::upload(ddc, dc.to_floats(), t);
    testing::upload(dw2, w2.to_floats(), t);
    testing::upload_raw(doff, offsets);
    void *gp = nullptr, *dgp = nullptr;
    place(dgi, R * N, t, shift, &gp, g.to_floats());
    place(ddg, R * N, t, shift, &dgp);
    dh.reset(R * F * dtype_size(t));
    dh.poison();
    const size_t ws = grouped_gemm_grad_workspace_size(Device::kCUDA, t, E, H, F, R);
    DeviceBuffer w(ws);
    grouped_gemm_dgrad_activation(s.act, dev_ref(ddc, t, {R, H}), dev_ref(dw2, t, {E, H, F}),
                                  dev_ref(doff, DType::kI32, {E + 1}), at_ptr(gp, t, {R, N}), at_ptr(dgp, t, {R, N}),
                                  dev_ref(dh, t, {R, F}), w.get(), ws, nullptr, s.interleaved);
    GPU_CHECK(cudaDeviceSynchronize());
    const std::vector<float> got_dg = testing::download(dgp, R * N, t);
    const std::vector<float> got_h = testing::download(dh.get(), R * F, t);
    const double tol = t == DType::kBF16 ? 2e-2 : 1e-5;
    EXPECT_TRUE(testing::all_close(got_dg, dg.to_floats(), tol, tol, "dg vs the CPU specification", N));
    EXPECT_TRUE(testing::all_close(got_h, h.to_floats(), tol, tol, "h vs the CPU specification", F));
    EXPECT_GT(testing::rms(dg.to_floats()), 1e-3) << "the reference must not be zeros";
}

// bf16: the CUTLASS grouped GEMMs (sm_90); the activation kernels' vector rows, and their scalar path through g's
// alignment (bf16's F is a multiple of 8).
TEST(GpuDgradActivation, MatchesTheCpuSpecification) {
    if (!sm90()) GTEST_SKIP() << "the bf16 grouped GEMMs need an sm_90 GPU";
    for (const SpecCase& s : {SpecCase{Activation::kSwiGLU, 40, false, false},
                              SpecCase{Activation::kGeGLU, 40, true, false},
                              SpecCase{Activation::kSwiGLU, 40, false, true}})
        match_cpu_spec(DType::kBF16, s);
}

// fp32: the SIMT grouped GEMMs (any CUDA GPU); F = 42 (F % 4 != 0) and a misaligned g take the activation kernels'
// scalar path, F = 40 their 16-byte vectors.
TEST(GpuDgradActivation, Fp32MatchesTheCpuSpecification) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    for (const SpecCase& s : {SpecCase{Activation::kSwiGLU, 40, false, false},
                              SpecCase{Activation::kSwiGLU, 42, false, false},
                              SpecCase{Activation::kGeGLU, 42, false, false},
                              SpecCase{Activation::kGeGLU, 40, true, false},
                              SpecCase{Activation::kSwiGLU, 40, false, true}})
        match_cpu_spec(DType::kF32, s);
}

}  // namespace
}  // namespace switchyard
