// tests/gpu_test_fp8.cpp: the CUDA FP8 expert path (issue 13) against the CPU specification (src/ref/stages_ref.cpp).
//
// 1. quantize_rows_fp8 (src/cuda/moe_stages.h) bit for bit against the recipe on the host (float_to_fp8_e4m3 of
//    x / (amax / 448), fp32 divisions): codes and scales in the GEMM's layout, block and tensor modes, static scales,
//    ties to even (a group with amax 448 has scale 1, so x / scale = x sits exactly on e4m3 midpoints), subnormal
//    codes, all-zero groups, empty groups; rows past offsets[E] stay poisoned.
// 2. The public grouped_gemm_fp8 stage on CUDA against the same stage on the CPU: random activations and e4m3
//    weights, random scales, group sizes with empty groups, outputs and workspace poisoned (0xFF = NaN) first, block
//    and tensor modes, static input scales, one group without offsets, partial 128-blocks in N and K, each output
//    dtype. The CPU sums in double; the GPU's FP8 tensor cores keep about 14 bits of the running sum inside each
//    128-wide k block (promoted to fp32 between blocks): per-element tolerance 2^-11 of sum_k |a_q b_q| plus one
//    rounding of the output dtype; a wrong scale or block is off by the size of the output itself.
// 3. A whole CUDA MoELayer with FP8 weights against the CPU MoELayer: routing compared exactly, y within relative
//    L2 1e-2 (issue 13's bar) for block and tensor modes, every routing option, shared experts (gated too).
// 4. Refusals: K not a multiple of 16 (TMA rows) is rejected with a message naming the limit.
// Every test skips without a CUDA device, and the GEMM / layer tests without an sm_90 GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/moe_stages.h"
#include "gpu_test_util.h"
#include "switchyard/moe_layer.h"
#include "switchyard/stages.h"
#include "test_util.h"

namespace switchyard {
namespace {

using test::HostTensor;
using testing::DeviceBuffer;

bool sm90() {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
    return major == 9;
}

#define SKIP_WITHOUT_SM90()                                                        \
    do {                                                                           \
        SWITCHYARD_SKIP_WITHOUT_GPU();                                             \
        if (!sm90()) GTEST_SKIP() << "the FP8 grouped GEMM needs an sm_90 GPU";  \
    } while (0)

int64_t blocks(int64_t n) { return (n + 127) / 128; }

// A host tensor's bytes in a fresh device buffer (16 spare bytes), as a CUDA TensorRef.
TensorRef on_device(DeviceBuffer& buf, const HostTensor& h) {
    if (!h.ref().defined()) return TensorRef();
    buf.reset(h.ref().nbytes() + 16);
    if (cudaMemcpy(buf.get(), h.ref().data, h.ref().nbytes(), cudaMemcpyHostToDevice) != cudaSuccess)
        throw std::runtime_error("cudaMemcpy failed");
    TensorRef r = h.ref();
    r.data = buf.get();
    r.device = Device::kCUDA;
    return r;
}

// Random e4m3 codes (no NaN codes) of values in [-448, 448].
HostTensor random_codes(std::vector<int64_t> shape, uint64_t seed) {
    HostTensor t(DType::kF8E4M3, shape);
    const std::vector<float> v = test::random_uniform(static_cast<size_t>(t.numel()), seed, -448.0f, 448.0f);
    for (int64_t i = 0; i < t.numel(); ++i) t.ptr<uint8_t>()[i] = float_to_fp8_e4m3(v[static_cast<size_t>(i)]);
    return t;
}

std::vector<int32_t> offsets_of(const std::vector<int32_t>& counts) {
    std::vector<int32_t> off(counts.size() + 1, 0);
    for (size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
    return off;
}

// ---- 1. the quantiser, bit for bit ------------------------------------------------------------------------------

// The recipe on the host: codes [R, K] and scales in the GEMM's layout ([Kb][M_e] per group at offsets[e] * Kb).
void quantize_on_host(const std::vector<float>& x, int64_t k, const std::vector<int32_t>& off, bool per_row,
                      const std::vector<float>& static_scale, std::vector<uint8_t>& q, std::vector<float>& sfa) {
    const int64_t kb = blocks(k);
    for (size_t e = 0; e + 1 < off.size(); ++e) {
        const int64_t row0 = off[e], m = off[e + 1] - off[e];
        for (int64_t r = row0; r < row0 + m; ++r) {
            const float* xr = x.data() + r * k;
            float row_scale = 0.0f;
            if (per_row) {
                if (!static_scale.empty()) {
                    row_scale = static_scale[e];
                } else {
                    float amax = 0.0f;
                    for (int64_t c = 0; c < k; ++c) amax = std::max(amax, std::fabs(xr[c]));
                    row_scale = amax / 448.0f;
                }
            }
            for (int64_t j = 0; j < kb; ++j) {
                const int64_t c0 = j * 128, c1 = std::min(k, c0 + 128);
                float scale = row_scale;
                if (!per_row) {
                    float amax = 0.0f;
                    for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(xr[c]));
                    scale = amax / 448.0f;
                }
                sfa[static_cast<size_t>(row0 * kb + j * m + (r - row0))] = scale;
                for (int64_t c = c0; c < c1; ++c)
                    q[static_cast<size_t>(r * k + c)] = scale == 0.0f ? 0 : float_to_fp8_e4m3(xr[c] / scale);
            }
        }
    }
}

TEST(GpuFp8, QuantizerMatchesTheRecipeBitForBit) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    const int64_t k = 400;  // 3 full groups of 128 and a partial one of 16
    const std::vector<int32_t> counts = {3, 0, 5, 0, 0, 4};
    const std::vector<int32_t> off = offsets_of(counts);
    const int64_t used = off.back(), R = used + 3;  // 3 rows past offsets[E]
    for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
        for (int mode = 0; mode < 3; ++mode) {  // block, tensor dynamic, tensor static
            SCOPED_TRACE(std::string(to_string(dt)) + " mode " + std::to_string(mode));
            const bool per_row = mode > 0;
            std::vector<float> x = test::rounded(test::random_uniform(static_cast<size_t>(R * k), 90 + mode, -3, 3), dt);
            // Row 0: amax 448 in every group, so (fp8-block) scale = 1 and x / scale = x: e4m3 midpoints (ties to
            // even: 1.0625, 1.1875, -2.125, 432, -304), subnormal ties (3 and 5 * 2^-10).
            const float ties[] = {448.0f, 1.0625f, 1.1875f, -2.125f, 3.0f * std::ldexp(1.0f, -10),
                                  5.0f * std::ldexp(1.0f, -10), 0.01f, -0.0f, 300.0f, 432.0f, -304.0f, 17.0f};
            for (int64_t c = 0; c < k; ++c) x[c] = round_to(dt, ties[c % 12]);
            for (int64_t c = 0; c < k; c += 128) x[c] = 448.0f;
            for (int64_t c = 128; c < 256; ++c) x[1 * k + c] = 0.0f;  // an all-zero group
            for (int64_t c = 0; c < k; ++c) x[4 * k + c] = 0.0f;      // an all-zero row
            for (int64_t c = 0; c < k; ++c) x[5 * k + c] = round_to(dt, x[5 * k + c] * 1e-3f);  // subnormal codes
            std::vector<float> stat;
            if (mode == 2) stat = {0.01f, 0.02f, 1.0f / 448, 0.5f, 0.25f, 3.0f / 448};
            std::vector<uint8_t> q_want(static_cast<size_t>(R * k), 0xFF);
            std::vector<float> s_want(static_cast<size_t>(R * blocks(k)));
            std::memset(s_want.data(), 0xFF, s_want.size() * sizeof(float));
            quantize_on_host(x, k, off, per_row, stat, q_want, s_want);

            DeviceBuffer dx, doff, dstat, dq(static_cast<size_t>(R * k)), ds(s_want.size() * sizeof(float));
            testing::upload(dx, x, dt);
            testing::upload_raw(doff, off);
            if (!stat.empty()) testing::upload_raw(dstat, stat);
            dq.poison();
            ds.poison();
            cuda::quantize_rows_fp8(dt, dx.get(), R, k, doff.get<int32_t>(), static_cast<int64_t>(counts.size()),
                                    per_row, stat.empty() ? nullptr : dstat.get<float>(), dq.get(), ds.get<float>(),
                                    nullptr);
            GPU_CHECK(cudaDeviceSynchronize());
            const std::vector<uint8_t> q = testing::download_raw<uint8_t>(dq.get(), static_cast<size_t>(R * k));
            const std::vector<float> s = testing::download_raw<float>(ds.get(), s_want.size());
            EXPECT_TRUE(testing::all_equal(q, q_want, "codes", k));
            std::vector<uint32_t> sb(s.size()), sb_want(s.size());
            std::memcpy(sb.data(), s.data(), s.size() * 4);
            std::memcpy(sb_want.data(), s_want.data(), s.size() * 4);
            EXPECT_TRUE(testing::all_equal(sb, sb_want, "scale bits"));
        }
    }
}

TEST(GpuFp8, NanCodeScan) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    std::vector<uint8_t> codes(100003, 0x3c);
    DeviceBuffer d;
    testing::upload_raw(d, codes);
    EXPECT_EQ(cuda::fp8_first_nan_code(d.get(), static_cast<int64_t>(codes.size())), -1);
    codes[77777] = 0xff;
    codes[90001] = 0x7f;
    testing::upload_raw(d, codes);
    EXPECT_EQ(cuda::fp8_first_nan_code(d.get(), static_cast<int64_t>(codes.size())), 77777);
    EXPECT_EQ(cuda::fp8_first_nan_code(d.get<uint8_t>() + 1, static_cast<int64_t>(codes.size()) - 1), 77776);
    EXPECT_EQ(cuda::fp8_first_nan_code(d.get<uint8_t>() + 80000, 20003), 10001);
    EXPECT_EQ(cuda::fp8_first_nan_code(d.get(), 77777), -1);
}

// ---- 2. the stage against the CPU stage -------------------------------------------------------------------------

struct StageCase {
    const char* name;
    QuantMode mode;
    DType dtype;
    int64_t n, k;
    std::vector<int32_t> counts;  // empty: one group without offsets ([N, K] weights)
    bool static_input = false;
    bool zero_unowned = true;
};

void run_stage_case(const StageCase& sc, uint64_t seed) {
    SCOPED_TRACE(std::string(sc.name) + " " + test::seed_trace(seed));
    const bool single = sc.counts.empty();
    const std::vector<int32_t> off = offsets_of(single ? std::vector<int32_t>{77} : sc.counts);
    const int64_t E = single ? 1 : static_cast<int64_t>(sc.counts.size()), N = sc.n, K = sc.k;
    const int64_t R = off.back() + (single ? 0 : 5);  // rows past offsets[E]
    const bool block = sc.mode == QuantMode::kFP8Block;
    HostTensor a = HostTensor::from_floats(test::rounded(test::random_uniform(R * K, seed, -2, 2), sc.dtype), sc.dtype,
                                           {R, K});
    for (int64_t c = 0; c < std::min<int64_t>(K, 128); ++c) a.set(2 * K + c, 0.0f);  // an all-zero group
    HostTensor b = single ? random_codes({N, K}, seed + 1) : random_codes({E, N, K}, seed + 1);
    const std::vector<int64_t> sshape =
        block ? (single ? std::vector<int64_t>{blocks(N), blocks(K)} : std::vector<int64_t>{E, blocks(N), blocks(K)})
              : std::vector<int64_t>{E};
    int64_t ns = 1;
    for (int64_t d : sshape) ns *= d;
    HostTensor bs = HostTensor::from_floats(test::random_uniform(ns, seed + 2, 1e-4f, 1e-3f), DType::kF32, sshape);
    HostTensor in = HostTensor::from_floats(test::random_uniform(E, seed + 3, 1.0f / 448, 3.0f / 448), DType::kF32, {E});
    HostTensor offs(DType::kI32, {E + 1});
    for (int64_t e = 0; e <= E; ++e) offs.ptr<int32_t>()[e] = off[e];
    HostTensor c_cpu(sc.dtype, {R, N});
    Fp8GemmOptions o;
    o.mode = sc.mode;
    o.zero_unowned_rows = sc.zero_unowned;
    const TensorRef in_ref = sc.static_input ? in.ref() : TensorRef();
    const TensorRef off_ref = single ? TensorRef() : offs.ref();
    // The CPU output starts poisoned too, so rows left untouched compare as NaN on both sides.
    std::memset(c_cpu.ref().data, 0xFF, c_cpu.ref().nbytes());
    grouped_gemm_fp8(a.ref(), b.ref(), bs.ref(), in_ref, off_ref, c_cpu.ref(), nullptr, 0, nullptr, o);

    DeviceBuffer da, db, dbs, din, doff, dc(static_cast<size_t>(R * N) * dtype_size(sc.dtype) + 16);
    const TensorRef ta = on_device(da, a), tb = on_device(db, b), tbs = on_device(dbs, bs);
    const TensorRef tin = sc.static_input ? on_device(din, in) : TensorRef();
    const TensorRef toff = single ? TensorRef() : on_device(doff, offs);
    const TensorRef tc(dc.get(), sc.dtype, {R, N}, Device::kCUDA);
    const size_t ws_bytes = grouped_gemm_fp8_workspace_size(Device::kCUDA, sc.mode, E, N, K, R);
    DeviceBuffer ws(ws_bytes);
    std::vector<uint8_t> first;
    for (int rep = 0; rep < 2; ++rep) {  // a second run gives the same bits
        dc.poison();
        ws.poison();
        grouped_gemm_fp8(ta, tb, tbs, tin, toff, tc, ws.get(), ws_bytes, nullptr, o);
        GPU_CHECK(cudaDeviceSynchronize());
        const std::vector<uint8_t> bytes =
            testing::download_raw<uint8_t>(dc.get(), static_cast<size_t>(R * N) * dtype_size(sc.dtype));
        if (rep == 0) first = bytes;
        else EXPECT_TRUE(testing::bitwise_equal(bytes, first, "second run"));
    }
    const std::vector<float> got = testing::download(dc.get(), static_cast<size_t>(R * N), sc.dtype);
    const std::vector<float> want = c_cpu.to_floats();
    std::vector<float> owned(want.begin(), want.begin() + off.back() * N);
    if (off.back() > 0) EXPECT_GT(testing::rms(owned), 0.0);
    // The accumulation allowance: sum_k |a_q b_q| of each output (the same CPU stage on |a| and on the weight codes
    // with their sign bit cleared: |a| has a's scales and, rounding being sign-symmetric, codes |q(a)|).
    std::vector<float> a_mag = a.to_floats();
    for (float& v : a_mag) v = std::fabs(v);
    const HostTensor a_abs = HostTensor::from_floats(a_mag, sc.dtype, {R, K});
    HostTensor b_abs = single ? HostTensor(DType::kF8E4M3, {N, K}) : HostTensor(DType::kF8E4M3, {E, N, K});
    for (int64_t i = 0; i < b.numel(); ++i) b_abs.ptr<uint8_t>()[i] = b.ptr<uint8_t>()[i] & 0x7F;
    HostTensor c_abs(sc.dtype, {R, N});  // the stage writes a's dtype; a tolerance needs no more precision
    grouped_gemm_fp8(a_abs.ref(), b_abs.ref(), bs.ref(), in_ref, off_ref, c_abs.ref(), nullptr, 0, nullptr, o);
    const std::vector<float> abs_sum = c_abs.to_floats();
    // Per element: |got - want| <= 2^-11 sum_k |a_q b_q| + one rounding of the output dtype. Hopper's FP8 MMA keeps
    // about 14 bits of the running sum inside each 128-wide k block (the GEMM promotes to fp32 between blocks), so
    // its error is a few units of 2^-14 of the sum of |terms|; 2^-11 allows 8. The CPU sums in double. A wrong
    // scale, block or group misses by the size of the output itself.
    const double ulp = sc.dtype == DType::kBF16 ? 1.0 / 128 : sc.dtype == DType::kF16 ? 1.0 / 1024 : 1e-6;
    int64_t bad = 0, first_bad = -1;
    double worst = 0.0;  // max |got - want| / sum |terms| over the owned rows
    for (int64_t i = 0; i < R * N; ++i) {
        const double g = got[static_cast<size_t>(i)], w = want[static_cast<size_t>(i)];
        const double acc = abs_sum[static_cast<size_t>(i)];
        if (std::isnan(w) || std::isnan(g)) {
            if (!(std::isnan(w) && std::isnan(g)) && bad++ == 0) first_bad = i;
            continue;
        }
        const double d = std::fabs(g - w);
        if (acc > 0) worst = std::max(worst, d / acc);
        if (!(d <= std::ldexp(acc, -11) + ulp * std::fabs(w) + 1e-30) && bad++ == 0) first_bad = i;
    }
    std::printf("[gpu fp8 stage] %-32s max |got - want| / sum|terms| = %.3g (2^%.1f)\n", sc.name, worst,
                worst > 0 ? std::log2(worst) : -INFINITY);
    EXPECT_EQ(bad, 0) << bad << " of " << R * N << " elements outside the tolerance; first_bad c[" << first_bad / N << ", "
                      << first_bad % N << "]: got " << (first_bad >= 0 ? got[static_cast<size_t>(first_bad)] : 0.0f)
                      << ", expected " << (first_bad >= 0 ? want[static_cast<size_t>(first_bad)] : 0.0f) << ", sum|terms| "
                      << (first_bad >= 0 ? abs_sum[static_cast<size_t>(first_bad)] : 0.0f);
}

TEST(GpuFp8, StageMatchesTheCpuStage) {
    SKIP_WITHOUT_SM90();
    const std::vector<int32_t> mixed = {0, 1, 130, 0, 257, 64, 0};
    const StageCase cases[] = {
        {"block bf16", QuantMode::kFP8Block, DType::kBF16, 256, 384, mixed},
        {"block fp16", QuantMode::kFP8Block, DType::kF16, 384, 256, mixed},
        {"block fp32", QuantMode::kFP8Block, DType::kF32, 256, 256, mixed},
        {"block bf16 partial blocks", QuantMode::kFP8Block, DType::kBF16, 200, 208, mixed},
        {"block fp32 partial blocks", QuantMode::kFP8Block, DType::kF32, 132, 144, {5, 0, 300}},
        {"block keep tail", QuantMode::kFP8Block, DType::kBF16, 128, 128, mixed, false, false},
        {"block one group", QuantMode::kFP8Block, DType::kBF16, 256, 512, {}},
        {"block all empty", QuantMode::kFP8Block, DType::kBF16, 128, 128, {0, 0, 0}},
        {"tensor bf16", QuantMode::kFP8Tensor, DType::kBF16, 256, 384, mixed},
        {"tensor fp32 partial", QuantMode::kFP8Tensor, DType::kF32, 200, 208, mixed},
        {"tensor static bf16", QuantMode::kFP8Tensor, DType::kBF16, 256, 384, mixed, true},
        {"tensor static fp16 one group", QuantMode::kFP8Tensor, DType::kF16, 128, 256, {}, true},
        {"many groups", QuantMode::kFP8Block, DType::kBF16, 256, 256,
         {3, 0, 0, 17, 1, 128, 129, 0, 2, 40, 0, 0, 0, 5, 300, 1, 0, 64, 9, 11}},
    };
    for (const StageCase& sc : cases) run_stage_case(sc, 5);
}

TEST(GpuFp8, StageRefusesUnalignedK) {
    SKIP_WITHOUT_SM90();
    DeviceBuffer da(64 * 200 * 2), db(256 * 200), dbs(64), dc(64 * 256 * 2), doff(8);
    const TensorRef a(da.get(), DType::kBF16, {64, 200}, Device::kCUDA);
    const TensorRef b(db.get(), DType::kF8E4M3, {256, 200}, Device::kCUDA);
    const TensorRef bs(dbs.get(), DType::kF32, {2, 2}, Device::kCUDA);
    const TensorRef c(dc.get(), DType::kBF16, {64, 256}, Device::kCUDA);
    test::expect_error([&] { grouped_gemm_fp8(a, b, bs, TensorRef(), TensorRef(), c, nullptr, 0, nullptr); },
                       {"k=200", "multiple of 16"});
}

// ---- 3. the layer -------------------------------------------------------------------------------------------------

struct LayerCase {
    const char* name;
    QuantMode mode;
    DType dtype;
    void (*tweak)(MoEConfig&);
    bool static_input = false;
    bool shared = true;
};

void no_tweak(MoEConfig&) {}

// An fp8 matrix stack with scales (block [G, B(N), B(K)] or [B(N), B(K)]; tensor [G] or [1]).
struct Fp8Weights {
    HostTensor codes, scale;
};
Fp8Weights make_fp8(QuantMode mode, int64_t g, int64_t n, int64_t k, uint64_t seed, bool shared) {
    Fp8Weights w;
    w.codes = shared ? random_codes({n, k}, seed) : random_codes({g, n, k}, seed);
    const bool block = mode == QuantMode::kFP8Block;
    const std::vector<int64_t> sshape = block ? (shared ? std::vector<int64_t>{blocks(n), blocks(k)}
                                                        : std::vector<int64_t>{g, blocks(n), blocks(k)})
                                              : std::vector<int64_t>{g};
    const int64_t ns = block ? g * blocks(n) * blocks(k) : g;
    // dequantised weights ~ 448 * 2e-4 / sqrt(k)-ish: keeps every intermediate O(1)
    w.scale = HostTensor::from_floats(test::random_uniform(ns, seed + 1, 1e-4f, 3e-4f), DType::kF32, sshape);
    return w;
}

double run_layer_case(const LayerCase& lc) {
    SCOPED_TRACE(lc.name);
    MoEConfig cfg;
    cfg.hidden_size = 256;
    cfg.ffn_size = 384;
    cfg.num_experts = 8;
    cfg.top_k = 2;
    cfg.dtype = lc.dtype;
    cfg.quant_mode = lc.mode;
    if (lc.shared) {
        cfg.num_shared_experts = 1;
        cfg.shared_ffn_size = 128;
    }
    lc.tweak(cfg);
    const int64_t T = 300, H = cfg.hidden_size, E = cfg.num_experts, F = cfg.ffn_size, S = cfg.shared_width();
    const int64_t R13 = cfg.w13_rows(), SR13 = is_gated(cfg.activation) ? 2 * S : S;
    // The router's weights in the layer dtype (CUDA takes one dtype); the CPU layer reads the same values.
    HostTensor gate = HostTensor::from_floats(test::rounded(test::random_uniform(E * H, 11, -0.2f, 0.2f), cfg.dtype),
                                              cfg.dtype, {E, H});
    HostTensor bias = HostTensor::from_floats(test::random_uniform(E, 12, -0.1f, 0.1f), DType::kF32, {E});
    HostTensor sgate = HostTensor::from_floats(test::rounded(test::random_uniform(H, 71, -0.1f, 0.1f), cfg.dtype),
                                               cfg.dtype, {1, H});
    const Fp8Weights w13 = make_fp8(lc.mode, E, R13, H, 21, false), w2 = make_fp8(lc.mode, E, H, F, 31, false);
    Fp8Weights s13, s2;
    if (S > 0) {
        s13 = make_fp8(lc.mode, 1, SR13, H, 41, true);
        s2 = make_fp8(lc.mode, 1, H, S, 51, true);
    }
    HostTensor in13 = HostTensor::from_floats(std::vector<float>(E, 0.8f / 448), DType::kF32, {E});
    HostTensor in2 = HostTensor::from_floats(std::vector<float>(E, 0.5f / 448), DType::kF32, {E});
    HostTensor sin13 = HostTensor::from_floats({0.9f / 448}, DType::kF32, {1});
    HostTensor sin2 = HostTensor::from_floats({0.4f / 448}, DType::kF32, {1});

    // The same weights, once as host tensors and once on the device.
    std::vector<DeviceBuffer> bufs(16);
    int next = 0;
    auto build = [&](bool cuda) {
        auto put = [&](const HostTensor& h) { return cuda ? on_device(bufs[next++], h) : h.ref(); };
        MoEWeights w;
        w.gate = put(gate);
        if (cfg.use_score_bias) w.score_bias = put(bias);
        w.w13 = put(w13.codes);
        w.w13_scale = put(w13.scale);
        w.w2 = put(w2.codes);
        w.w2_scale = put(w2.scale);
        if (S > 0) {
            w.shared_w13 = put(s13.codes);
            w.shared_w13_scale = put(s13.scale);
            w.shared_w2 = put(s2.codes);
            w.shared_w2_scale = put(s2.scale);
            if (cfg.shared_expert_gate) w.shared_gate = put(sgate);
        }
        if (lc.static_input) {
            w.w13_input_scale = put(in13);
            w.w2_input_scale = put(in2);
            if (S > 0) {
                w.shared_w13_input_scale = put(sin13);
                w.shared_w2_input_scale = put(sin2);
            }
        }
        return w;
    };
    std::vector<float> xv = test::rounded(test::random_uniform(T * H, 61), cfg.dtype);
    for (int64_t c = 0; c < H; ++c) xv[5 * H + c] = 0.0f;    // an all-zero token
    for (int64_t c = 128; c < H; ++c) xv[6 * H + c] = 0.0f;  // an all-zero group
    const HostTensor x = HostTensor::from_floats(xv, cfg.dtype, {T, H});
    const int64_t slots = cfg.route_slots();

    HostTensor y_cpu(cfg.dtype, {T, H}), ids_cpu(DType::kI32, {T, slots}), sr_cpu(DType::kI32, {T, slots});
    ForwardOutputs out_cpu;
    out_cpu.topk_ids = ids_cpu.ref();
    out_cpu.slot_row = sr_cpu.ref();
    MoELayer(cfg, build(false)).forward(x.ref(), y_cpu.ref(), &out_cpu);

    const MoEWeights wd = build(true);
    const MoELayer layer(cfg, wd);
    DeviceBuffer dx, dy(static_cast<size_t>(T * H) * dtype_size(cfg.dtype)), dids(T * slots * 4), dsr(T * slots * 4);
    const TensorRef tx = on_device(dx, x);
    DeviceBuffer ws(layer.workspace_size(T));
    dy.poison();
    ws.poison();
    ForwardOutputs out;
    out.topk_ids = TensorRef(dids.get(), DType::kI32, {T, slots}, Device::kCUDA);
    out.slot_row = TensorRef(dsr.get(), DType::kI32, {T, slots}, Device::kCUDA);
    layer.forward(tx, TensorRef(dy.get(), cfg.dtype, {T, H}, Device::kCUDA), ws.get(), ws.bytes(), nullptr, &out);
    if (cudaDeviceSynchronize() != cudaSuccess) {
        ADD_FAILURE() << "forward failed: " << cudaGetErrorString(cudaGetLastError());
        return 1.0;
    }
    const auto ids = testing::download_raw<int32_t>(dids.get(), T * slots);
    const auto sr = testing::download_raw<int32_t>(dsr.get(), T * slots);
    EXPECT_TRUE(testing::all_equal(ids, std::vector<int32_t>(ids_cpu.ptr<int32_t>(), ids_cpu.ptr<int32_t>() + T * slots),
                                   "topk_ids", slots));
    EXPECT_TRUE(testing::all_equal(sr, std::vector<int32_t>(sr_cpu.ptr<int32_t>(), sr_cpu.ptr<int32_t>() + T * slots),
                                   "slot_row", slots));
    const std::vector<float> got = testing::download(dy.get(), static_cast<size_t>(T * H), cfg.dtype);
    const std::vector<float> want = y_cpu.to_floats();
    double num = 0, den = 0;
    bool finite = true;
    for (size_t i = 0; i < got.size(); ++i) {
        finite = finite && std::isfinite(got[i]);
        num += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
        den += static_cast<double>(want[i]) * want[i];
    }
    EXPECT_TRUE(finite) << "y holds NaN or inf";
    EXPECT_GT(den, 0.0);
    const double rel = std::sqrt(num / std::max(den, 1e-300));
    std::printf("[gpu fp8] %-36s rel L2 = %.3e (rms y %.3e)\n", lc.name, rel, std::sqrt(den / got.size()));
    return finite ? rel : 1.0;
}

TEST(GpuFp8Layer, MatchesTheCpuLayer) {
    SKIP_WITHOUT_SM90();
    const LayerCase cases[] = {
        {"block softmax bf16", QuantMode::kFP8Block, DType::kBF16, no_tweak},
        {"block softmax fp16", QuantMode::kFP8Block, DType::kF16, no_tweak},
        {"block softmax fp32", QuantMode::kFP8Block, DType::kF32, no_tweak},
        {"block topk-softmax bf16", QuantMode::kFP8Block, DType::kBF16,
         [](MoEConfig& c) {
             c.score_function = ScoreFunction::kTopkSoftmax;
             c.renormalize = true;
         }},
        {"block sigmoid groups bias fp32", QuantMode::kFP8Block, DType::kF32,
         [](MoEConfig& c) {
             c.score_function = ScoreFunction::kSigmoid;
             c.num_groups = 4;
             c.topk_groups = 2;
             c.use_score_bias = true;
             c.renormalize = true;
             c.routed_scale = 2.5;
         }},
        {"block capacity position relu bf16", QuantMode::kFP8Block, DType::kBF16,
         [](MoEConfig& c) {
             c.capacity_factor = 0.5;
             c.activation = Activation::kReLU;
         }},
        {"block capacity probability fp32", QuantMode::kFP8Block, DType::kF32,
         [](MoEConfig& c) {
             c.capacity_factor = 0.6;
             c.drop_policy = DropPolicy::kProbability;
         }},
        {"block expert choice bf16", QuantMode::kFP8Block, DType::kBF16,
         [](MoEConfig& c) { c.routing_mode = RoutingMode::kExpertChoice; }},
        {"block gated shared expert bf16", QuantMode::kFP8Block, DType::kBF16,
         [](MoEConfig& c) { c.shared_expert_gate = true; }},
        {"block no shared fp16", QuantMode::kFP8Block, DType::kF16, no_tweak, false, false},
        {"tensor softmax bf16", QuantMode::kFP8Tensor, DType::kBF16, no_tweak},
        {"tensor sigmoid groups bias fp32", QuantMode::kFP8Tensor, DType::kF32,
         [](MoEConfig& c) {
             c.score_function = ScoreFunction::kSigmoid;
             c.num_groups = 2;
             c.topk_groups = 1;
             c.use_score_bias = true;
         }},
        {"tensor expert choice sigmoid bf16", QuantMode::kFP8Tensor, DType::kBF16,
         [](MoEConfig& c) {
             c.routing_mode = RoutingMode::kExpertChoice;
             c.score_function = ScoreFunction::kSigmoid;
             c.capacity_factor = 1.5;
         }},
        {"tensor static input fp32", QuantMode::kFP8Tensor, DType::kF32, no_tweak, true},
        {"tensor static input capacity bf16", QuantMode::kFP8Tensor, DType::kBF16,
         [](MoEConfig& c) { c.capacity_factor = 0.5; }, true},
    };
    double worst = 0;
    for (const LayerCase& lc : cases) {
        const double rel = run_layer_case(lc);
        EXPECT_LE(rel, 1e-2) << lc.name;
        worst = std::max(worst, rel);
    }
    std::printf("[gpu fp8] worst rel L2 over %zu cases = %.3e\n", sizeof(cases) / sizeof(cases[0]), worst);
}

TEST(GpuFp8Layer, RefusesUnalignedHiddenSize) {
    SKIP_WITHOUT_SM90();
    MoEConfig cfg;
    cfg.hidden_size = 200;
    cfg.ffn_size = 128;
    cfg.num_experts = 2;
    cfg.top_k = 1;
    cfg.dtype = DType::kBF16;
    cfg.quant_mode = QuantMode::kFP8Block;
    const Fp8Weights w13 = make_fp8(cfg.quant_mode, 2, 256, 200, 3, false), w2 = make_fp8(cfg.quant_mode, 2, 200, 128, 5, false);
    HostTensor gate = HostTensor::from_floats(std::vector<float>(2 * 200, 0.01f), DType::kBF16, {2, 200});
    std::vector<DeviceBuffer> bufs(5);
    MoEWeights w;
    w.gate = on_device(bufs[0], gate);
    w.w13 = on_device(bufs[1], w13.codes);
    w.w13_scale = on_device(bufs[2], w13.scale);
    w.w2 = on_device(bufs[3], w2.codes);
    w.w2_scale = on_device(bufs[4], w2.scale);
    test::expect_error([&] { MoELayer(cfg, w); }, {"w13", "k=200", "multiple of 16"});
}

}  // namespace
}  // namespace switchyard
