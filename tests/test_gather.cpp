// tests/test_gather.cpp: gather (switchyard/stages.h) with and without the plan's slot_row on the CPU backend.
//
// The hint changes how the CUDA backend writes xp (by token instead of by row), never what it writes; the CPU backend
// checks that the hint describes the same rows as row_token. Checked here: with a consistent slot_row (dropped pairs,
// rows past the plan's rows, two dtypes) the output has the bits of the call without it; a slot_row that points a
// pair at another token's row, points two pairs at one row, or leaves a row of row_token unpointed is refused, as are
// a slot_row of the wrong shape or dtype.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "switchyard/stages.h"
#include "test_util.h"

namespace switchyard {
namespace {

using test::expect_error;
using test::HostTensor;
using test::random_uniform;

// A plan of T tokens x k pairs: about a tenth of the pairs dropped (slot -1), the kept ones in a random row order,
// `tail` rows past them owned by no token.
struct Plan {
    int64_t T, k, R;
    HostTensor row_token, slot_row;

    Plan(int64_t t, int64_t kk, int64_t tail, uint32_t seed) : T(t), k(kk) {
        std::mt19937 rng(seed);
        std::vector<std::pair<int32_t, int32_t>> kept;  // (token, j)
        std::vector<int32_t> slots(static_cast<size_t>(T * k), -1);
        for (int32_t tok = 0; tok < T; ++tok)
            for (int32_t j = 0; j < k; ++j)
                if (rng() % 10 != 0) kept.emplace_back(tok, j);
        std::shuffle(kept.begin(), kept.end(), rng);
        R = static_cast<int64_t>(kept.size()) + tail;
        row_token = HostTensor(DType::kI32, {R});
        slot_row = HostTensor(DType::kI32, {T, k});
        for (int64_t r = 0; r < R; ++r) row_token.ptr<int32_t>()[r] = -1;
        for (size_t r = 0; r < kept.size(); ++r) {
            row_token.ptr<int32_t>()[r] = kept[r].first;
            slots[static_cast<size_t>(kept[r].first * k + kept[r].second)] = static_cast<int32_t>(r);
        }
        std::memcpy(slot_row.data(), slots.data(), slots.size() * sizeof(int32_t));
    }
};

HostTensor filled(DType t, std::vector<int64_t> shape, float v) {
    HostTensor h(t, std::move(shape));
    for (int64_t i = 0; i < h.numel(); ++i) h.set(i, v);
    return h;
}

TEST(Gather, SlotRowGivesTheSameBits) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
        SCOPED_TRACE(to_string(dtype));
        const int64_t T = 37, k = 3, H = 24;
        const Plan p(T, k, /*tail=*/5, 7);
        const HostTensor x = HostTensor::from_floats(random_uniform(T * H, 9), dtype, {T, H});
        HostTensor want = filled(dtype, {p.R, H}, 7.0f), got = filled(dtype, {p.R, H}, 7.0f);
        gather(x.ref(), p.row_token.ref(), want.ref());
        gather(x.ref(), p.row_token.ref(), got.ref(), nullptr, p.slot_row.ref());
        ASSERT_EQ(std::memcmp(want.data(), got.data(), static_cast<size_t>(p.R * H) * dtype_size(dtype)), 0);
        for (int64_t i = (p.R - 5) * H; i < p.R * H; ++i) ASSERT_EQ(got.get(i), 0.0f) << "tail element " << i;
    }
}

TEST(Gather, RefusesASlotRowOfAnotherPlan) {
    const int64_t T = 11, k = 2, H = 8;
    const Plan p(T, k, 2, 3);
    const HostTensor x = HostTensor::from_floats(random_uniform(T * H, 5), DType::kF32, {T, H});
    HostTensor xp(DType::kF32, {p.R, H});
    auto run = [&](const HostTensor& sr) { gather(x.ref(), p.row_token.ref(), xp.ref(), nullptr, sr.ref()); };
    // the first kept pair of token 0 and of token 1
    auto first_kept = [&](int32_t tok) {
        for (int64_t j = 0; j < k; ++j)
            if (p.slot_row.ptr<int32_t>()[tok * k + j] >= 0) return tok * k + j;
        return int64_t{-1};
    };
    const int64_t a = first_kept(0), b = first_kept(1);
    ASSERT_GE(a, 0);
    ASSERT_GE(b, 0);
    {  // token 0's pair pointed at token 1's row
        HostTensor sr = p.slot_row;
        sr.ptr<int32_t>()[a] = p.slot_row.ptr<int32_t>()[b];
        expect_error([&] { run(sr); }, {"slot_row[0, ", "is not a row of token 0"});
    }
    {  // a kept pair dropped: its row is pointed at by nobody
        HostTensor sr = p.slot_row;
        sr.ptr<int32_t>()[b] = -1;
        expect_error([&] { run(sr); }, {"is pointed at by no pair of slot_row"});
    }
    {  // a row past xp's rows, and one of the plan's tail rows (owned by no token)
        for (int64_t r : {p.R, p.R - 1}) {
            HostTensor sr = p.slot_row;
            sr.ptr<int32_t>()[a] = static_cast<int32_t>(r);
            expect_error([&] { run(sr); }, {"slot_row[0, ", "is not a row of token 0"});
        }
    }
    {  // two pairs of one token at one row
        HostTensor sr = p.slot_row;
        int64_t t = 0;
        while (t < T && (sr.ptr<int32_t>()[t * k] < 0 || sr.ptr<int32_t>()[t * k + 1] < 0)) ++t;
        ASSERT_LT(t, T) << "no token kept both pairs";
        sr.ptr<int32_t>()[t * k + 1] = sr.ptr<int32_t>()[t * k];
        expect_error([&] { run(sr); }, {"that no other pair points at"});
    }
    HostTensor wrong_rows(DType::kI32, {T + 1, k}), wrong_dtype(DType::kF32, {T, k});
    expect_error([&] { run(wrong_rows); }, {"slot_row"});
    expect_error([&] { run(wrong_dtype); }, {"slot_row"});
}

}  // namespace
}  // namespace switchyard
