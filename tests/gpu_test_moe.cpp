// tests/gpu_test_moe.cpp: the CUDA stages (dispatch, activation, combine) and the whole CUDA MoE forward against
// the CPU reference, plus run-to-run determinism and CUDA-graph capture / replay.
//
// The whole-layer reference is ref::moe_forward's pipeline fed with the GPU's own fp32 logits (ref::route,
// ref::build_plan, ref::expert_mlp per expert, shared expert, ref::combine), so routing, plan and slot_row compare
// EXACTLY. The GPU stores the first GEMM's output g in the layer dtype: one rounding more than the layer contract
// (ref::expert_mlp keeps g in double). So y is compared (1) per element against the reference pipeline with the
// GPU's rounding points (g rounded too; double sums): |got - ref| <= rtol * (|ref| + rms(ref)) plus one rounding of
// each stored expert output weighted by w (y_close), rtol 1e-2 (bf16), 2e-3 (fp16), 1e-5 (fp32), and (2) normwise against the contract's pipeline, ||got - ref|| / ||ref|| <= the same
// rtol. A token routed to a wrong expert or row misses both by orders of magnitude.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "cuda/backward/backward.h"
#include "cuda/gemm/grouped_gemm.h"
#include "cuda/moe_stages.h"
#include "gpu_test_util.h"
#include "ref/ref.h"

namespace switchyard {
namespace {

using testing::all_close;
using testing::all_equal;
using testing::DeviceBuffer;

double dtype_rtol(DType t) { return t == DType::kBF16 ? 1e-2 : t == DType::kF16 ? 2e-3 : 1e-5; }
// One unit in the last place of the dtype, relative (bound of a single differing rounding).
double dtype_ulp(DType t) { return t == DType::kBF16 ? 1.0 / 128 : t == DType::kF16 ? 1.0 / 1024 : 2e-6; }

const DType kDtypes[] = {DType::kBF16, DType::kF16, DType::kF32};

// ---- stages ------------------------------------------------------------------------------------------------

TEST(GpuStages, PermuteGathersRowsExactly) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    for (DType dt : kDtypes) {
        for (int64_t H : {128, 2880, 4096, 100}) {
            const int64_t T = 129, rows = 300;
            const uint64_t seed = 11 + H;
            SCOPED_TRACE("seed=" + std::to_string(seed) + " dtype=" + to_string(dt) + " H=" + std::to_string(H));
            const auto x = testing::random_values(T * H, dt, -4.0f, 4.0f, seed);
            std::mt19937 rng(seed);
            std::vector<int32_t> row_token(rows);
            for (int64_t r = 0; r < rows; ++r) row_token[r] = r < 250 ? static_cast<int32_t>(rng() % T) : -1;
            DeviceBuffer d_x, d_rt, d_xp(rows * H * dtype_size(dt));
            testing::upload(d_x, x, dt);
            testing::upload_raw(d_rt, row_token);
            const auto xb = testing::encode(x, dt);
            const size_t rb = H * dtype_size(dt);
            for (bool zero_unowned : {false, true}) {  // unowned rows untouched, or written as 0
                SCOPED_TRACE(zero_unowned ? "zero_unowned" : "untouched");
                d_xp.poison();
                cuda::permute_rows(dt, d_x.get(), d_rt.get<int32_t>(), rows, H, d_xp.get(), nullptr, zero_unowned);
                GPU_CHECK(cudaDeviceSynchronize());
                const auto got = testing::download_raw<uint8_t>(d_xp.get(), rows * H * dtype_size(dt));
                const uint8_t fill = zero_unowned ? 0x00 : 0xFF;
                for (int64_t r = 0; r < rows; ++r) {
                    if (row_token[r] >= 0) {
                        ASSERT_EQ(std::memcmp(got.data() + r * rb, xb.data() + row_token[r] * rb, rb), 0) << "row " << r;
                    } else {
                        for (size_t b = 0; b < rb; ++b) ASSERT_EQ(got[r * rb + b], fill) << "unowned row " << r;
                    }
                }
            }
        }
    }
}

// A plan-like slot_row [T, k] and row_token [rows]: about a tenth of the pairs dropped, the kept ones in random rows
// of the first kept + gaps rows (so that `gaps` rows owned by nobody lie between owned ones), then `tail` more rows
// owned by nobody. Every row with row_token[r] >= 0 is pointed at by exactly one pair of its token.
struct TokenRows {
    std::vector<int32_t> slot_row, row_token;
    int64_t rows = 0;
};

TokenRows random_token_rows(int64_t T, int64_t k, int64_t gaps, int64_t tail, std::mt19937& rng) {
    std::vector<std::pair<int32_t, int32_t>> kept;
    for (int32_t t = 0; t < T; ++t)
        for (int32_t j = 0; j < k; ++j)
            if (rng() % 10 != 0) kept.emplace_back(t, j);
    std::vector<int32_t> where(kept.size() + gaps);
    std::iota(where.begin(), where.end(), 0);
    std::shuffle(where.begin(), where.end(), rng);
    TokenRows p;
    p.rows = static_cast<int64_t>(where.size()) + tail;
    p.slot_row.assign(T * k, -1);
    p.row_token.assign(p.rows, -1);
    for (size_t i = 0; i < kept.size(); ++i) {
        p.row_token[where[i]] = kept[i].first;
        p.slot_row[kept[i].first * k + kept[i].second] = where[i];
    }
    return p;
}

// The gather by token (stages.h gather with slot_row): a plan of T tokens x k pairs, a tenth dropped, kept pairs in
// random rows with 41 rows owned by nobody among them and 37 more past them; every owned row must hold its token's
// bits, every other 0 (written with 16-byte stores where the rows allow: H = 100 is scalar for the 16-bit dtypes,
// H = 98 for all).
TEST(GpuStages, ScatterByTokenWritesEveryRowOnce) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    for (DType dt : kDtypes) {
        for (int64_t H : {128, 2880, 100, 98, 7168}) {
            for (int64_t k : {1, 4, 8}) {
                const int64_t T = 129, gaps = 41, tail = 37;
                const uint64_t seed = 31 + H + 7 * k;
                SCOPED_TRACE("seed=" + std::to_string(seed) + " dtype=" + to_string(dt) + " H=" + std::to_string(H) +
                             " k=" + std::to_string(k));
                std::mt19937 rng(static_cast<uint32_t>(seed));
                const TokenRows p = random_token_rows(T, k, gaps, tail, rng);
                const int64_t rows = p.rows;
                const std::vector<int32_t>& row_token = p.row_token;
                // Rows owned by nobody between owned ones, not only in the tail.
                const auto owned_end =
                    std::find_if(row_token.rbegin(), row_token.rend(), [](int32_t v) { return v >= 0; }).base();
                ASSERT_GT(std::count(row_token.begin(), owned_end, -1), 0);
                ASSERT_GE(row_token.end() - owned_end, tail);
                const auto x = testing::random_values(T * H, dt, -4.0f, 4.0f, seed);
                DeviceBuffer d_x, d_rt, d_sr, d_xp(rows * H * dtype_size(dt));
                testing::upload(d_x, x, dt);
                testing::upload_raw(d_rt, row_token);
                testing::upload_raw(d_sr, p.slot_row);
                d_xp.poison();
                cuda::scatter_token_rows(dt, d_x.get(), d_sr.get<int32_t>(), T, k, d_rt.get<int32_t>(), rows, H,
                                         d_xp.get(), nullptr);
                GPU_CHECK(cudaDeviceSynchronize());
                const auto got = testing::download_raw<uint8_t>(d_xp.get(), rows * H * dtype_size(dt));
                const auto xb = testing::encode(x, dt);
                const size_t rb = H * dtype_size(dt);
                for (int64_t r = 0; r < rows; ++r) {
                    if (row_token[r] >= 0) {
                        ASSERT_EQ(std::memcmp(got.data() + r * rb, xb.data() + row_token[r] * rb, rb), 0)
                            << "row " << r;
                    } else {
                        for (size_t b = 0; b < rb; ++b) ASSERT_EQ(got[r * rb + b], 0) << "unowned row " << r;
                    }
                }
            }
        }
    }
}

// ---- slot_row entries past the rows -----------------------------------------------------------------------------
// Rows of 0xFF guard bytes after each buffer below: an entry of rows or rows + 5 lands in them.
constexpr int64_t kGuardRows = 8;

// b = `bytes` followed by kGuardRows rows of row_bytes, all 0xFF (NaN for the float dtypes), then `data` copied to
// its start: an output whose guard shows any write past it, or an input whose rows past its end read as NaN.
void guarded_buffer(DeviceBuffer& b, size_t bytes, size_t row_bytes, const std::vector<uint8_t>& data = {}) {
    b.reset(bytes + kGuardRows * row_bytes);
    b.poison();
    if (!data.empty()) GPU_CHECK(cudaMemcpy(b.get(), data.data(), data.size(), cudaMemcpyHostToDevice));
}

// Every byte of img from `from` on is still 0xFF.
::testing::AssertionResult guard_intact(const std::vector<uint8_t>& img, size_t from, const std::string& what) {
    for (size_t i = from; i < img.size(); ++i)
        if (img[i] != 0xFF)
            return ::testing::AssertionFailure() << what << ": guard byte " << i - from << " past the output written";
    return ::testing::AssertionSuccess();
}

// A slot_row entry >= the rows of the tensor it indexes (rows, rows + 5, INT32_MAX: a hint that is not the plan's)
// is a dropped pair on the device: scatter_token_rows, gather_backward_rows, combine_rows and combine_backward_rows
// give the bits of the same call with those entries -1 (both outputs poisoned first), those bits are the kernels'
// fp32 arithmetic done on the host, and nothing past an output is written (guard rows), nor read past an input
// (its guard rows are NaN). Entries past the rows replace every 4th kept pair and every 2nd dropped one. H = 128:
// 16-byte vectors; H = 100: scalar for the 16-bit dtypes; H = 98: scalar for all.
TEST(GpuStages, SlotRowPastTheRowsIsSkipped) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    for (DType dt : kDtypes) {
        for (int64_t H : {128, 100, 98}) {
            for (int64_t k : {1, 6}) {
                const int64_t T = 67;
                const uint64_t seed = 51 + H + 7 * k + 1000 * static_cast<uint64_t>(dt);
                SCOPED_TRACE("seed=" + std::to_string(seed) + " dtype=" + to_string(dt) + " H=" + std::to_string(H) +
                             " k=" + std::to_string(k));
                std::mt19937 rng(static_cast<uint32_t>(seed));
                const TokenRows p = random_token_rows(T, k, 9, 5, rng);
                const int64_t rows = p.rows;
                const size_t rb = H * dtype_size(dt);
                const int32_t past[] = {static_cast<int32_t>(rows), static_cast<int32_t>(rows + 5), INT32_MAX};
                std::vector<int32_t> bad = p.slot_row, clean = p.slot_row;
                std::vector<bool> orphan(rows, false);  // rows whose pair points past the rows (bad) or nowhere (clean)
                int64_t kept_seen = 0, dropped_seen = 0, kept_past = 0, dropped_past = 0;
                for (int64_t i = 0; i < T * k; ++i) {
                    const int32_t r = p.slot_row[i];
                    if (r >= 0 ? kept_seen++ % 4 != 0 : dropped_seen++ % 2 != 0) continue;
                    bad[i] = past[(kept_past + dropped_past) % 3];
                    clean[i] = -1;
                    if (r >= 0) {
                        orphan[r] = true;
                        ++kept_past;
                    } else {
                        ++dropped_past;
                    }
                }
                ASSERT_GE(kept_past, 3);
                ASSERT_GE(dropped_past, 1);
                const auto x = testing::random_values(T * H, dt, -4.0f, 4.0f, seed + 1);  // scatter's x, the dy
                const auto rv = testing::random_values(rows * H, dt, -2.0f, 2.0f, seed + 2);  // d_xp, expert_out
                const auto shared = testing::random_values(T * H, dt, -2.0f, 2.0f, seed + 3);
                const auto w = testing::random_values(T * k, DType::kF32, -1.0f, 1.0f, seed + 4);
                const auto xb = testing::encode(x, dt);
                DeviceBuffer d_x, d_rows, d_shared, d_w, d_rt, d_bad, d_clean;
                testing::upload(d_x, x, dt);
                guarded_buffer(d_rows, rows * rb, rb, testing::encode(rv, dt));
                testing::upload(d_shared, shared, dt);
                testing::upload_raw(d_w, w);
                testing::upload_raw(d_rt, p.row_token);
                testing::upload_raw(d_bad, bad);
                testing::upload_raw(d_clean, clean);
                const int32_t* const slot_rows[2] = {d_bad.get<int32_t>(), d_clean.get<int32_t>()};
                const char* const which[2] = {"entries past the rows", "entries -1"};
                // Each call twice (entries past the rows, then -1) on its outputs poisoned first; the byte images.
                auto images = [&](std::initializer_list<DeviceBuffer*> outs, auto&& launch) {
                    std::vector<std::vector<std::vector<uint8_t>>> img(2);
                    for (int v = 0; v < 2; ++v) {
                        for (DeviceBuffer* b : outs) b->poison();
                        launch(slot_rows[v]);
                        const cudaError_t err = cudaDeviceSynchronize();
                        EXPECT_EQ(err, cudaSuccess) << which[v] << ": " << cudaGetErrorString(err);
                        for (DeviceBuffer* b : outs)
                            img[v].push_back(testing::download_raw<uint8_t>(b->get(), b->bytes()));
                    }
                    return img;
                };
                {
                    SCOPED_TRACE("scatter_token_rows");
                    DeviceBuffer d_xp;
                    guarded_buffer(d_xp, rows * rb, rb);
                    const auto img = images({&d_xp}, [&](const int32_t* sr) {
                        cuda::scatter_token_rows(dt, d_x.get(), sr, T, k, d_rt.get<int32_t>(), rows, H, d_xp.get(),
                                                 nullptr);
                    });
                    // Every row but the orphans: its token's bits, or 0 (row_token < 0). An orphan (row_token >= 0, its
                    // pair past the rows or -1) is written by neither call, so it is not checked.
                    const std::vector<uint8_t> zero(rb, 0);
                    for (int v = 0; v < 2; ++v) {
                        EXPECT_TRUE(guard_intact(img[v][0], rows * rb, std::string("xp, ") + which[v]));
                        for (int64_t r = 0; r < rows; ++r) {
                            if (orphan[r]) continue;
                            const int32_t t = p.row_token[r];
                            const uint8_t* want = t >= 0 ? xb.data() + t * rb : zero.data();
                            ASSERT_EQ(std::memcmp(img[v][0].data() + r * rb, want, rb), 0) << which[v] << ": row " << r;
                        }
                    }
                }
                // The host's sums of each token's kept rows in slot order from 0, as the kernels chain them:
                // acc = fma(w_j or 1, row, acc) (fma with 1 is the plain sum's rounding), then + shared, rounded once.
                const auto slot_sums = [&](const float* wts, const float* extra) {
                    std::vector<float> out(T * H);
                    for (int64_t t = 0; t < T; ++t)
                        for (int64_t h = 0; h < H; ++h) {
                            float acc = 0.0f;
                            for (int64_t j = 0; j < k; ++j) {
                                const int32_t r = clean[t * k + j];
                                if (r >= 0) acc = std::fma(wts != nullptr ? wts[t * k + j] : 1.0f, rv[r * H + h], acc);
                            }
                            if (extra != nullptr) acc = std::fma(1.0f, extra[t * H + h], acc);
                            out[t * H + h] = round_to(dt, acc);
                        }
                    return out;
                };
                {
                    SCOPED_TRACE("gather_backward_rows");
                    DeviceBuffer d_dx;
                    guarded_buffer(d_dx, T * rb, rb);
                    const auto img = images({&d_dx}, [&](const int32_t* sr) {
                        cuda::gather_backward_rows(dt, d_rows.get(), sr, T, k, rows, H, d_dx.get(), nullptr);
                    });
                    // dx[t] = the fp32 sum, slots in order from 0, of its kept pairs' rows, rounded once.
                    const std::vector<float> want = slot_sums(nullptr, nullptr);
                    EXPECT_TRUE(guard_intact(img[0][0], T * rb, "dx"));
                    EXPECT_TRUE(testing::bitwise_equal(img[0][0], img[1][0], "dx, entries past the rows vs -1"));
                    const std::vector<uint8_t> got(img[0][0].begin(), img[0][0].begin() + T * rb);
                    EXPECT_TRUE(testing::bitwise_equal(got, testing::encode(want, dt), "dx vs the host's fp32 sums"));
                }
                {
                    const bool with_shared = k > 1;
                    SCOPED_TRACE(with_shared ? "combine_rows with shared" : "combine_rows");
                    DeviceBuffer d_y;
                    guarded_buffer(d_y, T * rb, rb);
                    const auto img = images({&d_y}, [&](const int32_t* sr) {
                        cuda::combine_rows(dt, d_rows.get(), sr, d_w.get<float>(),
                                           with_shared ? d_shared.get() : nullptr, T, k, rows, H, d_y.get(), nullptr);
                    });
                    // y[t] = fma chain over the kept pairs in slot order from 0 (then + shared), rounded once.
                    const std::vector<float> want = slot_sums(w.data(), with_shared ? shared.data() : nullptr);
                    EXPECT_TRUE(guard_intact(img[0][0], T * rb, "y"));
                    EXPECT_TRUE(testing::bitwise_equal(img[0][0], img[1][0], "y, entries past the rows vs -1"));
                    const std::vector<uint8_t> got(img[0][0].begin(), img[0][0].begin() + T * rb);
                    EXPECT_TRUE(testing::bitwise_equal(got, testing::encode(want, dt), "y vs the host's fp32 fmas"));
                }
                {
                    SCOPED_TRACE("combine_backward_rows");
                    DeviceBuffer d_out, d_dw;
                    guarded_buffer(d_out, rows * rb, rb);
                    guarded_buffer(d_dw, T * k * sizeof(float), k * sizeof(float));
                    const auto img = images({&d_out, &d_dw}, [&](const int32_t* sr) {
                        cuda::combine_backward_rows(dt, d_x.get(), d_rows.get(), sr, d_w.get<float>(), T, k, rows, H,
                                                    d_out.get(), d_dw.get<float>(), nullptr);
                    });
                    EXPECT_TRUE(guard_intact(img[0][0], rows * rb, "d_out"));
                    EXPECT_TRUE(guard_intact(img[0][1], T * k * sizeof(float), "d_weights"));
                    EXPECT_TRUE(testing::bitwise_equal(img[0][0], img[1][0], "d_out, entries past the rows vs -1"));
                    EXPECT_TRUE(testing::bitwise_equal(img[0][1], img[1][1], "d_weights, entries past the rows vs -1"));
                    // d_out: the kept pairs' rows dtype(w dy[t]) (one fp32 product, rounded once); the rows no kept
                    // pair points at are not written (still 0xFF). d_weights: 0 for the dropped pairs, else the dot
                    // product within the fp32 summation bound of H roundings.
                    std::vector<uint8_t> want_out(rows * rb, 0xFF);
                    std::vector<float> prod(H);
                    for (int64_t t = 0; t < T; ++t)
                        for (int64_t j = 0; j < k; ++j) {
                            const int32_t r = clean[t * k + j];
                            if (r < 0) continue;
                            for (int64_t h = 0; h < H; ++h) prod[h] = round_to(dt, w[t * k + j] * x[t * H + h]);
                            const auto bytes = testing::encode(prod, dt);
                            std::memcpy(want_out.data() + r * rb, bytes.data(), rb);
                        }
                    const std::vector<uint8_t> got_out(img[0][0].begin(), img[0][0].begin() + rows * rb);
                    EXPECT_TRUE(testing::bitwise_equal(got_out, want_out, "d_out vs the host's products"));
                    std::vector<float> dw(T * k);
                    std::memcpy(dw.data(), img[0][1].data(), T * k * sizeof(float));
                    for (int64_t i = 0; i < T * k; ++i) {
                        const int32_t r = clean[i];
                        if (r < 0) {
                            EXPECT_EQ(float_bits(dw[i]), 0u) << "d_weights[" << i << "] of a dropped pair";
                            continue;
                        }
                        double dot = 0.0, mag = 0.0;
                        for (int64_t h = 0; h < H; ++h) {
                            const double term = static_cast<double>(x[(i / k) * H + h]) * rv[r * H + h];
                            dot += term;
                            mag += std::fabs(term);
                        }
                        EXPECT_LE(std::fabs(dw[i] - dot), H * std::ldexp(1.0, -24) * mag) << "d_weights[" << i << "]";
                    }
                }
            }
        }
    }
}

TEST(GpuStages, ActivationMatchesReference) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    const Activation acts[] = {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGELU, Activation::kReLU};
    for (DType dt : kDtypes) {
        for (Activation act : acts) {
            for (int64_t F : {64, 768, 100}) {
                const int64_t rows = 77, live = 61;
                const int64_t width = is_gated(act) ? 2 * F : F;
                const uint64_t seed = 21 + F + static_cast<int>(act);
                SCOPED_TRACE("seed=" + std::to_string(seed) + " dtype=" + to_string(dt) + " act=" + to_string(act) +
                             " F=" + std::to_string(F));
                const auto in = testing::random_values(rows * width, dt, -6.0f, 6.0f, seed);
                DeviceBuffer d_in, d_out(rows * F * dtype_size(dt)), d_n;
                testing::upload(d_in, in, dt);
                testing::upload_raw(d_n, std::vector<int32_t>{static_cast<int32_t>(live)});
                d_out.poison();
                cuda::activation_rows(act, dt, d_in.get(), rows, d_n.get<int32_t>(), F, d_out.get(), nullptr);
                GPU_CHECK(cudaDeviceSynchronize());
                const auto got = testing::download(d_out.get(), rows * F, dt);
                std::vector<float> want(live * F), got_live(got.begin(), got.begin() + live * F);
                for (int64_t r = 0; r < live; ++r)
                    for (int64_t f = 0; f < F; ++f) {
                        const double g = is_gated(act) ? in[r * width + f] : 0.0;
                        const double u = is_gated(act) ? in[r * width + F + f] : in[r * width + f];
                        want[r * F + f] = round_to(dt, static_cast<float>(ref::apply_activation(act, g, u)));
                    }
                // fp32 math on the GPU vs double: at most one rounding of the dtype apart.
                EXPECT_TRUE(all_close(got_live, want, 1e-6, dtype_ulp(dt), "h", F));
                for (int64_t i = live * F; i < rows * F; ++i)
                    ASSERT_TRUE(std::isnan(got[i])) << "row " << i / F << " past num_rows was written";
            }
        }
    }
}

TEST(GpuStages, CombineMatchesReference) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    for (DType dt : kDtypes) {
        for (bool with_shared : {false, true}) {
            for (int64_t H : {128, 2880, 100}) {
                const int64_t T = 129, k = 6, E = 16;
                const uint64_t seed = 31 + H + with_shared;
                SCOPED_TRACE("seed=" + std::to_string(seed) + " dtype=" + to_string(dt) + " H=" + std::to_string(H) +
                             " shared=" + std::to_string(with_shared));
                // A real plan with drops, so slot_row has -1 entries.
                std::mt19937 rng(seed);
                std::vector<int32_t> ids(T * k);
                std::vector<float> w(T * k);
                for (int64_t t = 0; t < T; ++t)
                    for (int64_t j = 0; j < k; ++j) {
                        ids[t * k + j] = static_cast<int32_t>((t + j * 3 + (rng() % 2)) % E);
                        for (int64_t i = 0; i < j; ++i)
                            if (ids[t * k + i] == ids[t * k + j]) ids[t * k + j] = static_cast<int32_t>((ids[t * k + j] + 7 * (j + 1)) % E);
                        w[t * k + j] = static_cast<float>(rng() % 1000) / 1000.0f - 0.3f;
                    }
                bool distinct = true;
                for (int64_t t = 0; t < T; ++t)
                    for (int64_t j = 0; j < k; ++j)
                        for (int64_t i = 0; i < j; ++i) distinct &= ids[t * k + i] != ids[t * k + j];
                if (!distinct) {  // fall back to a fixed distinct pattern
                    for (int64_t t = 0; t < T; ++t)
                        for (int64_t j = 0; j < k; ++j) ids[t * k + j] = static_cast<int32_t>((t + j) % E);
                }
                MoEConfig cfg;
                cfg.hidden_size = H;
                cfg.ffn_size = 8;
                cfg.num_experts = E;
                cfg.top_k = k;
                cfg.capacity_factor = 0.75;
                const ref::HostPlan plan = ref::build_plan(cfg, T, ids, w);
                ASSERT_GT(plan.dropped(), 0);
                const int64_t rows = T * k;
                const auto out = testing::random_values(rows * H, dt, -2.0f, 2.0f, seed + 1);
                const auto shared = testing::random_values(T * H, dt, -2.0f, 2.0f, seed + 2);
                DeviceBuffer d_out, d_shared, d_slot, d_w, d_y(T * H * dtype_size(dt));
                testing::upload(d_out, out, dt);
                testing::upload(d_shared, shared, dt);
                testing::upload_raw(d_slot, plan.slot_row);
                testing::upload_raw(d_w, w);
                std::vector<std::vector<uint8_t>> runs;
                for (int run = 0; run < 2; ++run) {
                    d_y.poison();
                    cuda::combine_rows(dt, d_out.get(), d_slot.get<int32_t>(), d_w.get<float>(),
                                       with_shared ? d_shared.get() : nullptr, T, k, rows, H, d_y.get(), nullptr);
                    GPU_CHECK(cudaDeviceSynchronize());
                    runs.push_back(testing::download_raw<uint8_t>(d_y.get(), T * H * dtype_size(dt)));
                }
                EXPECT_TRUE(testing::bitwise_equal(runs[0], runs[1], "combine run to run"));
                std::vector<float> want(T * H);
                ref::combine(plan, out, with_shared ? shared.data() : nullptr, H, dt, want.data());
                // fp32 sums of <= 7 terms of size <= 2 vs double: atol covers cancellation, rtol one rounding.
                EXPECT_TRUE(all_close(testing::decode(runs[0], dt), want, 1e-5, dtype_ulp(dt), "y", H));
            }
        }
    }
}

// ---- whole layer -----------------------------------------------------------------------------------------

struct LayerCase {
    DType dtype;
    int64_t T, H, F, E, k;
    ScoreFunction score;
    bool renormalize;
    double scale;
    int64_t groups, topk_groups;
    bool bias;
    double capacity_factor;
    DropPolicy policy;
    Activation act;
    int64_t num_shared, shared_ffn;
};

std::string layer_name(const LayerCase& c) {
    std::ostringstream os;
    os << to_string(c.dtype) << "_T" << c.T << "_H" << c.H << "_F" << c.F << "_E" << c.E << "_k" << c.k << "_"
       << to_string(c.score) << "_" << to_string(c.act);
    if (c.groups > 1) os << "_G" << c.groups;
    if (c.bias) os << "_bias";
    if (c.capacity_factor > 0) os << "_cap_" << to_string(c.policy);
    if (c.num_shared > 0) os << "_shared";
    std::string s = os.str();
    for (auto& ch : s)
        if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
    return s;
}

MoEConfig layer_config(const LayerCase& c) {
    MoEConfig cfg;
    cfg.hidden_size = c.H;
    cfg.ffn_size = c.F;
    cfg.num_experts = c.E;
    cfg.top_k = c.k;
    cfg.score_function = c.score;
    cfg.renormalize = c.renormalize;
    cfg.routed_scale = c.scale;
    cfg.num_groups = c.groups;
    cfg.topk_groups = c.topk_groups;
    cfg.use_score_bias = c.bias;
    cfg.capacity_factor = c.capacity_factor;
    cfg.drop_policy = c.policy;
    cfg.activation = c.act;
    cfg.num_shared_experts = c.num_shared;
    cfg.shared_ffn_size = c.shared_ffn;
    cfg.dtype = c.dtype;
    return cfg;
}

// Host copies of a layer's inputs (values rounded to the dtype) and their device images.
struct Layer {
    MoEConfig cfg;
    std::vector<float> x, gate, bias, w13, w2, sw13, sw2;
    DeviceBuffer d_x, d_gate, d_bias, d_w13, d_w2, d_sw13, d_sw2;
    MoEWeights weights;

    Layer(const LayerCase& c, uint64_t seed) : cfg(layer_config(c)) {
        const DType dt = c.dtype;
        const int64_t R13 = cfg.w13_rows(), S = cfg.shared_width();
        const int64_t SR13 = is_gated(c.act) ? 2 * S : S;
        const float gh = 6.0f / std::sqrt(static_cast<float>(c.H));  // logits of std ~2
        const float ah = std::sqrt(3.0f / c.H), af = std::sqrt(3.0f / c.F);
        x = testing::random_values(c.T * c.H, dt, -1.0f, 1.0f, seed);
        gate = testing::random_values(c.E * c.H, dt, -gh, gh, seed + 1);
        bias = c.bias ? testing::random_values(c.E, DType::kF32, -0.1f, 0.1f, seed + 2) : std::vector<float>();
        w13 = testing::random_values(c.E * R13 * c.H, dt, -ah, ah, seed + 3);
        w2 = testing::random_values(c.E * c.H * c.F, dt, -af, af, seed + 4);
        testing::upload(d_x, x, dt);
        testing::upload(d_gate, gate, dt);
        testing::upload(d_w13, w13, dt);
        testing::upload(d_w2, w2, dt);
        weights.gate = TensorRef(d_gate.get(), dt, {c.E, c.H}, Device::kCUDA);
        weights.w13 = TensorRef(d_w13.get(), dt, {c.E, R13, c.H}, Device::kCUDA);
        weights.w2 = TensorRef(d_w2.get(), dt, {c.E, c.H, c.F}, Device::kCUDA);
        if (c.bias) {
            testing::upload(d_bias, bias, DType::kF32);
            weights.score_bias = TensorRef(d_bias.get(), DType::kF32, {c.E}, Device::kCUDA);
        }
        if (S > 0) {
            const float as = std::sqrt(3.0f / S);
            sw13 = testing::random_values(SR13 * c.H, dt, -ah, ah, seed + 5);
            sw2 = testing::random_values(c.H * S, dt, -as, as, seed + 6);
            testing::upload(d_sw13, sw13, dt);
            testing::upload(d_sw2, sw2, dt);
            weights.shared_w13 = TensorRef(d_sw13.get(), dt, {SR13, c.H}, Device::kCUDA);
            weights.shared_w2 = TensorRef(d_sw2.get(), dt, {c.H, S}, Device::kCUDA);
        }
    }
};

// One expert MLP with the GPU's rounding points: like ref::expert_mlp (double sums, h and out rounded to the
// dtype) but the first GEMM's output g is also rounded to the dtype, as the unfused GPU path stores it.
void mlp_gpu_rounding(Activation act, DType dt, const float* in, int64_t rows, int64_t H, int64_t F,
                      const ref::MatView& w13, const ref::MatView& w2, float* out) {
    const bool gated = is_gated(act);
    const int64_t R13 = gated ? 2 * F : F;
    std::vector<double> g(rows * R13), o(rows * H);
    ref::gemm_nt(in, rows, H, w13, g.data());
    std::vector<float> h(rows * F);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t f = 0; f < F; ++f) {
            const double gate = gated ? round_to(dt, static_cast<float>(g[r * R13 + f])) : 0.0;
            const double up = round_to(dt, static_cast<float>(g[r * R13 + (gated ? F : 0) + f]));
            h[r * F + f] = round_to(dt, static_cast<float>(ref::apply_activation(act, gate, up)));
        }
    ref::gemm_nt(h.data(), rows, F, w2, o.data());
    for (int64_t i = 0; i < rows * H; ++i) out[i] = round_to(dt, static_cast<float>(o[i]));
}

// The reference pipeline of ref::moe_forward, routed from the given fp32 logits. gpu_rounding: expert MLPs with
// the GPU's rounding points (mlp_gpu_rounding) instead of the layer contract's (ref::expert_mlp).
std::vector<float> reference_y(const Layer& L, int64_t T, const std::vector<float>& x, const std::vector<float>& logits,
                               ref::HostPlan& plan, bool gpu_rounding, std::vector<float>* expert_out_ret = nullptr,
                               std::vector<float>* shared_ret = nullptr) {
    const auto mlp = gpu_rounding ? mlp_gpu_rounding
                                  : static_cast<void (*)(Activation, DType, const float*, int64_t, int64_t, int64_t,
                                                         const ref::MatView&, const ref::MatView&, float*)>(
                                        ref::expert_mlp);
    const MoEConfig& cfg = L.cfg;
    const DType dt = cfg.dtype;
    const int64_t H = cfg.hidden_size, F = cfg.ffn_size, E = cfg.num_experts, R13 = cfg.w13_rows();
    std::vector<int32_t> ids;
    std::vector<float> w;
    ref::route(cfg, logits, L.bias, T, ids, w);
    plan = ref::build_plan(cfg, T, ids, w);
    const auto w13b = testing::encode(L.w13, dt), w2b = testing::encode(L.w2, dt);
    const size_t es = dtype_size(dt);
    std::vector<float> expert_out(plan.num_rows() * H), gathered;
    for (int64_t e = 0; e < E; ++e) {
        const int64_t begin = plan.expert_offsets[e], rows = plan.expert_offsets[e + 1] - begin;
        if (rows == 0) continue;
        gathered.resize(rows * H);
        for (int64_t r = 0; r < rows; ++r)
            std::memcpy(gathered.data() + r * H, x.data() + plan.row_token[begin + r] * H, H * sizeof(float));
        ref::MatView v13{w13b.data() + e * R13 * H * es, dt, R13, H};
        ref::MatView v2{w2b.data() + e * H * F * es, dt, H, F};
        mlp(cfg.activation, dt, gathered.data(), rows, H, F, v13, v2, expert_out.data() + begin * H);
    }
    std::vector<float> shared;
    const int64_t S = cfg.shared_width();
    if (S > 0 && T > 0) {
        const auto s13b = testing::encode(L.sw13, dt), s2b = testing::encode(L.sw2, dt);
        shared.resize(T * H);
        ref::MatView v13{s13b.data(), dt, is_gated(cfg.activation) ? 2 * S : S, H};
        ref::MatView v2{s2b.data(), dt, H, S};
        mlp(cfg.activation, dt, x.data(), T, H, S, v13, v2, shared.data());
    }
    std::vector<float> y(T * H);
    ref::combine(plan, expert_out, shared.empty() ? nullptr : shared.data(), H, dt, y.data());
    if (expert_out_ret != nullptr) *expert_out_ret = expert_out;
    if (shared_ret != nullptr) *shared_ret = shared;
    return y;
}

// ||got - want|| / ||want|| <= bound (the layer contract's reference: a normwise check that tolerates the GPU's
// extra rounding of the first GEMM output but not a wrong expert or row).
::testing::AssertionResult normwise_close(const std::vector<float>& got, const std::vector<float>& want, double bound) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < got.size(); ++i) {
        const double d = static_cast<double>(got[i]) - want[i];
        num += d * d;
        den += static_cast<double>(want[i]) * want[i];
    }
    const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
    if (rel <= bound) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "normwise relative error " << rel << " > " << bound;
}

// Per element: |got - want| <= rtol * (|want| + rms(want)) + sum_j |w_j| ulp(out[row_j, h]) + ulp(shared[t, h]):
// each stored expert output (and shared output) may sit one rounding away from the reference's when its fp32 sum
// and the reference's double sum fall on either side of a rounding boundary; that flip reaches y scaled by w_j.
::testing::AssertionResult y_close(const std::vector<float>& got, const std::vector<float>& want,
                                   const ref::HostPlan& plan, const std::vector<float>& expert_out,
                                   const std::vector<float>& shared, DType dt, int64_t H) {
    const double rtol = dtype_rtol(dt), base = rtol * testing::rms(want);
    const int64_t k = plan.top_k;
    for (int64_t t = 0; t < plan.num_tokens; ++t)
        for (int64_t h = 0; h < H; ++h) {
            double tol = base + rtol * std::fabs(want[t * H + h]);
            for (int64_t j = 0; j < k; ++j) {
                const int32_t r = plan.slot_row[t * k + j];
                if (r >= 0) tol += std::fabs(plan.topk_weights[t * k + j]) * testing::ulp_of(dt, expert_out[r * H + h]);
            }
            if (!shared.empty()) tol += testing::ulp_of(dt, shared[t * H + h]);
            const double g = got[t * H + h], w = want[t * H + h];
            if (!(std::fabs(g - w) <= tol))
                return ::testing::AssertionFailure() << "y[" << t << ", " << h << "]: got " << g << ", expected " << w
                                                     << " (tolerance " << tol << ")";
        }
    return ::testing::AssertionSuccess();
}

bool gemm_supported(const MoEConfig& cfg, int64_t T) {
    cuda::GroupedGemmArgs g;
    g.dtype = cfg.dtype;
    g.num_groups = cfg.num_experts;
    g.max_rows = T * cfg.top_k;
    g.n = cfg.w13_rows();
    g.k = cfg.hidden_size;
    bool ok = cuda::grouped_gemm_supported(g);
    g.n = cfg.hidden_size;
    g.k = cfg.ffn_size;
    return ok && cuda::grouped_gemm_supported(g);
}

class GpuMoE : public ::testing::TestWithParam<LayerCase> {};

TEST_P(GpuMoE, MatchesReferenceAndIsDeterministic) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    const LayerCase c = GetParam();
    const uint64_t seed = 9000 + static_cast<uint64_t>(c.T * 31 + c.H + c.E * 7 + c.k);
    SCOPED_TRACE("seed=" + std::to_string(seed) + " case=" + layer_name(c));
    Layer L(c, seed);
    ASSERT_TRUE(gemm_supported(L.cfg, c.T)) << "grouped_gemm does not support this shape";
    const int64_t T = c.T, H = c.H, E = c.E, k = c.k;
    const DType dt = c.dtype;
    MoELayer layer(L.cfg, L.weights);
    layer.set_fused_max_tokens(0);  // the staged chain (the fused path has gpu_test_fused.cpp)
    const size_t ws_bytes = layer.workspace_size(T);
    DeviceBuffer ws(ws_bytes), d_y(T * H * dtype_size(dt) + 16), d_logits(T * E * 4 + 4), d_ids(T * k * 4 + 4),
        d_w(T * k * 4 + 4), d_slot(T * k * 4 + 4);
    TensorRef tx(L.d_x.get(), dt, {T, H}, Device::kCUDA), ty(d_y.get(), dt, {T, H}, Device::kCUDA);
    ForwardOutputs out;
    out.logits = TensorRef(d_logits.get(), DType::kF32, {T, E}, Device::kCUDA);
    out.topk_ids = TensorRef(d_ids.get(), DType::kI32, {T, k}, Device::kCUDA);
    out.topk_weights = TensorRef(d_w.get(), DType::kF32, {T, k}, Device::kCUDA);
    out.slot_row = TensorRef(d_slot.get(), DType::kI32, {T, k}, Device::kCUDA);
    LoadStats stats;
    out.stats = &stats;
    cudaStream_t stream;
    GPU_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    std::vector<std::vector<uint8_t>> runs;
    for (int run = 0; run < 2; ++run) {
        for (DeviceBuffer* b : {&ws, &d_y, &d_logits, &d_ids, &d_w, &d_slot}) b->poison();
        GPU_CHECK(cudaDeviceSynchronize());
        layer.forward(tx, ty, ws.get(), ws_bytes, stream, &out);
        GPU_CHECK(cudaStreamSynchronize(stream));
        runs.push_back(testing::download_raw<uint8_t>(d_y.get(), T * H * dtype_size(dt)));
    }
    GPU_CHECK(cudaStreamDestroy(stream));
    EXPECT_TRUE(testing::bitwise_equal(runs[0], runs[1], "y run to run"));

    const auto logits = testing::download_raw<float>(d_logits.get(), T * E);
    EXPECT_TRUE(all_close(logits, ref::router_logits(L.x, L.gate, T, H, E), 2e-5, 1e-5, "logits", E));
    ref::HostPlan plan;
    std::vector<float> ref_out, ref_shared;
    const std::vector<float> want = reference_y(L, T, L.x, logits, plan, /*gpu_rounding=*/true, &ref_out, &ref_shared);
    const std::vector<float> contract = reference_y(L, T, L.x, logits, plan, /*gpu_rounding=*/false);
    EXPECT_TRUE(normwise_close(testing::decode(runs[0], dt), contract, dtype_rtol(dt))) << "vs the layer contract";
    EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_ids.get(), T * k), plan.topk_ids, "topk_ids", k));
    EXPECT_TRUE(all_close(testing::download_raw<float>(d_w.get(), T * k), plan.topk_weights, 1e-7, 1e-6,
                          "topk_weights", k));
    EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_slot.get(), T * k), plan.slot_row, "slot_row", k));
    EXPECT_TRUE(y_close(testing::decode(runs[0], dt), want, plan, ref_out, ref_shared, dt, H));

    LoadStats ref_stats;
    ref::router_stats(L.cfg, logits, plan.topk_ids, T, ref_stats);
    EXPECT_EQ(stats.expert_counts, ref_stats.expert_counts);
    std::vector<int64_t> kept(E);
    for (int64_t e = 0; e < E; ++e) kept[e] = plan.expert_offsets[e + 1] - plan.expert_offsets[e];
    EXPECT_EQ(stats.kept_counts, kept);
    EXPECT_EQ(stats.dropped, plan.dropped());
    ASSERT_EQ(stats.mean_prob.size(), static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e)
        EXPECT_NEAR(stats.mean_prob[e], ref_stats.mean_prob[e], 1e-12 + 1e-9 * std::fabs(ref_stats.mean_prob[e]))
            << "expert " << e;
    EXPECT_NEAR(stats.z_loss, ref_stats.z_loss, 1e-12 + 1e-9 * std::fabs(ref_stats.z_loss));
    EXPECT_NEAR(stats.aux_loss, ref_stats.aux_loss, 1e-12 + 1e-9 * std::fabs(ref_stats.aux_loss));
}

const LayerCase kLayerCases[] = {
    // dtype, T, H, F, E, k, score, renorm, scale, G, TG, bias, capacity, policy, act, shared experts, shared F
    {DType::kBF16, 129, 2880, 256, 60, 6, ScoreFunction::kSoftmax, true, 1.0, 1, 1, false, 0.0,
     DropPolicy::kPosition, Activation::kSwiGLU, 0, 0},
    {DType::kBF16, 4097, 4096, 128, 8, 2, ScoreFunction::kSoftmax, false, 1.0, 1, 1, false, 0.0,
     DropPolicy::kPosition, Activation::kSwiGLU, 0, 0},
    {DType::kBF16, 4097, 128, 64, 8, 2, ScoreFunction::kSoftmax, true, 1.0, 1, 1, false, 1.0,
     DropPolicy::kPosition, Activation::kSwiGLU, 0, 0},
    {DType::kBF16, 7, 4096, 128, 64, 8, ScoreFunction::kSigmoid, true, 2.5, 8, 4, true, 0.0,
     DropPolicy::kPosition, Activation::kSwiGLU, 2, 64},
    {DType::kBF16, 1, 128, 64, 256, 8, ScoreFunction::kSigmoid, true, 2.5, 8, 4, true, 0.0,
     DropPolicy::kPosition, Activation::kSwiGLU, 1, 64},
    {DType::kF16, 129, 128, 96, 128, 8, ScoreFunction::kTopkSoftmax, false, 1.0, 1, 1, false, 0.5,
     DropPolicy::kProbability, Activation::kGeGLU, 0, 0},
    {DType::kF32, 129, 128, 64, 8, 2, ScoreFunction::kSoftmax, false, 1.0, 1, 1, false, 0.0,
     DropPolicy::kPosition, Activation::kGELU, 1, 32},
    {DType::kF32, 7, 128, 40, 60, 6, ScoreFunction::kSoftmax, true, 1.0, 1, 1, true, 0.0,
     DropPolicy::kPosition, Activation::kReLU, 0, 0},
    {DType::kBF16, 0, 128, 64, 8, 2, ScoreFunction::kSoftmax, false, 1.0, 1, 1, false, 0.0,
     DropPolicy::kPosition, Activation::kSwiGLU, 1, 64},
};

INSTANTIATE_TEST_SUITE_P(Cases, GpuMoE, ::testing::ValuesIn(kLayerCases),
                         [](const ::testing::TestParamInfo<LayerCase>& info) { return layer_name(info.param); });

// Capture one forward in a CUDA graph, then replay it on NEW inputs copied into the captured buffers: the result
// must be bitwise equal to an eager forward on those inputs.
TEST(GpuMoEGraph, ReplayOnNewInputsMatchesEager) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    const LayerCase c{DType::kBF16, 129, 256, 64, 16, 4, ScoreFunction::kSigmoid, true, 1.5, 4, 2, true, 1.0,
                      DropPolicy::kProbability, Activation::kSwiGLU, 1, 64};
    const uint64_t seed = 4242;
    SCOPED_TRACE("seed=" + std::to_string(seed));
    Layer L(c, seed);
    const int64_t T = c.T, H = c.H;
    const size_t ybytes = T * H * 2;
    MoELayer layer(L.cfg, L.weights);
    layer.set_fused_max_tokens(0);  // the staged chain (the fused path has gpu_test_fused.cpp)
    const size_t ws_bytes = layer.workspace_size(T);
    DeviceBuffer ws(ws_bytes), d_y(ybytes), d_y_eager(ybytes), d_slot(T * c.k * 4);
    TensorRef tx(L.d_x.get(), c.dtype, {T, H}, Device::kCUDA), ty(d_y.get(), c.dtype, {T, H}, Device::kCUDA),
        ty_eager(d_y_eager.get(), c.dtype, {T, H}, Device::kCUDA);
    ForwardOutputs out;
    out.slot_row = TensorRef(d_slot.get(), DType::kI32, {T, c.k}, Device::kCUDA);
    cudaStream_t stream;
    GPU_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    // Warm-up (creates the cuBLAS handle, loads modules) outside the capture.
    layer.forward(tx, ty, ws.get(), ws_bytes, stream, &out);
    GPU_CHECK(cudaStreamSynchronize(stream));

    cudaGraph_t graph;
    cudaGraphExec_t exec;
    GPU_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    layer.forward(tx, ty, ws.get(), ws_bytes, stream, &out);
    GPU_CHECK(cudaStreamEndCapture(stream, &graph));
    GPU_CHECK(cudaGraphInstantiate(&exec, graph, 0));

    for (int round = 0; round < 2; ++round) {
        const auto x2 = testing::random_values(T * H, c.dtype, -1.0f, 1.0f, seed + 100 + round);
        const auto x2b = testing::encode(x2, c.dtype);
        GPU_CHECK(cudaMemcpy(L.d_x.get(), x2b.data(), x2b.size(), cudaMemcpyHostToDevice));
        d_y.poison();
        ws.poison();
        GPU_CHECK(cudaDeviceSynchronize());
        GPU_CHECK(cudaGraphLaunch(exec, stream));
        GPU_CHECK(cudaStreamSynchronize(stream));
        const auto replayed = testing::download_raw<uint8_t>(d_y.get(), ybytes);
        const auto slot_replayed = testing::download_raw<int32_t>(d_slot.get(), T * c.k);
        d_y_eager.poison();
        GPU_CHECK(cudaDeviceSynchronize());
        layer.forward(tx, ty_eager, ws.get(), ws_bytes, stream, &out);
        GPU_CHECK(cudaStreamSynchronize(stream));
        EXPECT_TRUE(testing::bitwise_equal(replayed, testing::download_raw<uint8_t>(d_y_eager.get(), ybytes),
                                           "graph replay vs eager, round " + std::to_string(round)));
        EXPECT_EQ(slot_replayed, testing::download_raw<int32_t>(d_slot.get(), T * c.k));
        // And the replay is right, not only repeatable: against the reference routed from eager logits.
        std::vector<float> logits(T * c.E);
        {
            DeviceBuffer d_logits(T * c.E * 4);
            ForwardOutputs o2;
            o2.logits = TensorRef(d_logits.get(), DType::kF32, {T, c.E}, Device::kCUDA);
            layer.forward(tx, ty_eager, ws.get(), ws_bytes, stream, &o2);
            GPU_CHECK(cudaStreamSynchronize(stream));
            logits = testing::download_raw<float>(d_logits.get(), T * c.E);
        }
        ref::HostPlan plan;
        std::vector<float> ref_out, ref_shared;
        const auto want = reference_y(L, T, x2, logits, plan, /*gpu_rounding=*/true, &ref_out, &ref_shared);
        EXPECT_TRUE(y_close(testing::decode(replayed, c.dtype), want, plan, ref_out, ref_shared, c.dtype, H));
    }
    GPU_CHECK(cudaGraphExecDestroy(exec));
    GPU_CHECK(cudaGraphDestroy(graph));
    GPU_CHECK(cudaStreamDestroy(stream));
}

}  // namespace
}  // namespace switchyard
