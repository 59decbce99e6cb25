// tests/test_plan_ref.cpp: the routing plan of the CPU backend (ref::build_plan): hand-computed plans (dropless,
// both drop policies, ties, min_capacity, empty experts, T = 0, all tokens on one expert) and randomised
// invariants over many configurations and seeds.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "ref/ref.h"
#include "switchyard/config.h"
#include "switchyard/error.h"
#include "test_util.h"

namespace switchyard {
namespace {

using V = std::vector<int32_t>;

MoEConfig plan_cfg(int64_t num_experts, int64_t k) {
    MoEConfig c = test::tiny_config();
    c.num_experts = num_experts;
    c.top_k = k;
    return c;
}

// t0 -> {1, 0}, t1 -> {1, 2}, t2 -> {0, 1}: counts {2, 3, 1, 0}.
const V kIds = {1, 0, 1, 2, 0, 1};

TEST(PlanRef, DroplessByHand) {
    const MoEConfig c = plan_cfg(4, 2);
    const ref::HostPlan p = ref::build_plan(c, 3, kIds, {0.6f, 0.4f, 0.7f, 0.3f, 0.9f, 0.1f});
    EXPECT_EQ(p.capacity, 0);
    EXPECT_EQ(p.expert_counts, (V{2, 3, 1, 0}));
    EXPECT_EQ(p.expert_offsets, (V{0, 2, 5, 6, 6}));
    EXPECT_EQ(p.slot_row, (V{2, 0, 3, 5, 1, 4}));
    EXPECT_EQ(p.row_token, (V{0, 2, 0, 1, 2, 1}));
    EXPECT_EQ(p.row_slot, (V{1, 4, 0, 2, 5, 3}));
    EXPECT_EQ(p.num_rows(), 6);
    EXPECT_EQ(p.dropped(), 0);
    EXPECT_EQ(p.topk_ids, kIds);
}

TEST(PlanRef, DropByPosition) {
    MoEConfig c = plan_cfg(4, 2);
    c.capacity_factor = 1.0;  // ceil(1.0 * 3 * 2 / 4) = 2
    const ref::HostPlan p = ref::build_plan(c, 3, kIds, {0.2f, 0.4f, 0.5f, 0.3f, 0.9f, 0.5f});
    EXPECT_EQ(p.capacity, 2);
    EXPECT_EQ(p.expert_counts, (V{2, 3, 1, 0}));  // before drops
    EXPECT_EQ(p.expert_offsets, (V{0, 2, 4, 5, 5}));
    EXPECT_EQ(p.slot_row, (V{2, 0, 3, 4, 1, -1}));  // token 2's pair on expert 1 is the third: dropped
    EXPECT_EQ(p.row_token, (V{0, 2, 0, 1, 1, -1}));
    EXPECT_EQ(p.row_slot, (V{1, 4, 0, 2, 3, -1}));
    EXPECT_EQ(p.dropped(), 1);
}

TEST(PlanRef, DropByProbability) {
    MoEConfig c = plan_cfg(4, 2);
    c.capacity_factor = 1.0;
    c.drop_policy = DropPolicy::kProbability;
    // Expert 1 holds pairs 0 (w 0.2), 2 (w 0.5), 5 (w 0.5): the two 0.5 survive, kept rows stay in token order.
    ref::HostPlan p = ref::build_plan(c, 3, kIds, {0.2f, 0.4f, 0.5f, 0.3f, 0.9f, 0.5f});
    EXPECT_EQ(p.expert_offsets, (V{0, 2, 4, 5, 5}));
    EXPECT_EQ(p.slot_row, (V{-1, 0, 2, 4, 1, 3}));
    EXPECT_EQ(p.row_token, (V{0, 2, 1, 2, 1, -1}));
    EXPECT_EQ(p.row_slot, (V{1, 4, 2, 5, 3, -1}));
    // Equal weights: ties go to the lower token, so the result is the position policy's.
    p = ref::build_plan(c, 3, kIds, {0.5f, 0.4f, 0.5f, 0.3f, 0.9f, 0.5f});
    EXPECT_EQ(p.slot_row, (V{2, 0, 3, 4, 1, -1}));
    // The largest weight wins even when it belongs to the last token.
    p = ref::build_plan(c, 3, kIds, {0.3f, 0.4f, 0.2f, 0.3f, 0.9f, 0.8f});
    EXPECT_EQ(p.slot_row, (V{2, 0, -1, 4, 1, 3}));
}

TEST(PlanRef, MinCapacity) {
    MoEConfig c = plan_cfg(4, 2);
    c.capacity_factor = 0.1;  // ceil(0.15) = 1 ...
    c.min_capacity = 3;       // ... raised to 3: nothing dropped
    const ref::HostPlan p = ref::build_plan(c, 3, kIds, std::vector<float>(6, 0.5f));
    EXPECT_EQ(p.capacity, 3);
    EXPECT_EQ(p.dropped(), 0);
    EXPECT_EQ(p.slot_row, (V{2, 0, 3, 5, 1, 4}));
}

TEST(PlanRef, ZeroTokens) {
    MoEConfig c = plan_cfg(4, 2);
    c.capacity_factor = 1.0;
    const ref::HostPlan p = ref::build_plan(c, 0, {}, {});
    EXPECT_EQ(p.expert_counts, (V{0, 0, 0, 0}));
    EXPECT_EQ(p.expert_offsets, (V{0, 0, 0, 0, 0}));
    EXPECT_TRUE(p.slot_row.empty());
    EXPECT_EQ(p.num_rows(), 0);
    EXPECT_EQ(p.dropped(), 0);
}

TEST(PlanRef, AllTokensOnOneExpert) {
    MoEConfig c = plan_cfg(4, 1);
    const V ids(5, 3);
    ref::HostPlan p = ref::build_plan(c, 5, ids, std::vector<float>(5, 1.0f));
    EXPECT_EQ(p.expert_counts, (V{0, 0, 0, 5}));
    EXPECT_EQ(p.expert_offsets, (V{0, 0, 0, 0, 5}));
    EXPECT_EQ(p.slot_row, (V{0, 1, 2, 3, 4}));
    EXPECT_EQ(p.row_token, (V{0, 1, 2, 3, 4}));
    c.capacity_factor = 2.0;  // ceil(2 * 5 / 4) = 3
    p = ref::build_plan(c, 5, ids, std::vector<float>(5, 1.0f));
    EXPECT_EQ(p.capacity, 3);
    EXPECT_EQ(p.slot_row, (V{0, 1, 2, -1, -1}));
    EXPECT_EQ(p.row_token, (V{0, 1, 2, -1, -1}));
    EXPECT_EQ(p.dropped(), 2);
}

TEST(PlanRef, RejectsBadIds) {
    const MoEConfig c = plan_cfg(4, 2);
    EXPECT_THROW(ref::build_plan(c, 1, {0, 4}, {1, 1}), Error);   // out of range
    EXPECT_THROW(ref::build_plan(c, 1, {-1, 0}, {1, 1}), Error);  // negative
    EXPECT_THROW(ref::build_plan(c, 1, {2, 2}, {1, 1}), Error);   // twice in one token
    EXPECT_THROW(ref::build_plan(c, 2, {0, 1}, {1, 1}), Error);   // wrong length
}

// Checks every invariant of a plan (fatal gtest failure on the first broken one).
void check_invariants(const MoEConfig& c, int64_t num_tokens, const V& ids, const std::vector<float>& w,
                      const ref::HostPlan& p) {
    const int64_t k = c.top_k, num_experts = c.num_experts, pairs = num_tokens * k;
    const int64_t cap = c.capacity(num_tokens);
    ASSERT_EQ(p.capacity, cap);
    V counts(num_experts, 0);
    for (int32_t e : ids) ++counts[e];
    ASSERT_EQ(p.expert_counts, counts);
    ASSERT_EQ(static_cast<int64_t>(p.expert_offsets.size()), num_experts + 1);
    ASSERT_EQ(p.expert_offsets[0], 0);
    int64_t kept_total = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
        const int64_t kept = p.expert_offsets[e + 1] - p.expert_offsets[e];
        ASSERT_EQ(kept, cap > 0 ? std::min<int64_t>(counts[e], cap) : counts[e]) << "expert " << e;
        kept_total += kept;
    }
    ASSERT_EQ(p.num_rows(), kept_total);
    ASSERT_EQ(p.dropped(), pairs - kept_total);  // counts sum to T*k minus drops
    // Every kept pair appears exactly once, rows and slots agree, entries past the rows are -1.
    std::vector<int> seen(pairs, 0);
    for (int64_t r = 0; r < pairs; ++r) {
        if (r >= kept_total) {
            ASSERT_EQ(p.row_token[r], -1) << "row " << r;
            ASSERT_EQ(p.row_slot[r], -1) << "row " << r;
            continue;
        }
        const int32_t slot = p.row_slot[r];
        ASSERT_GE(slot, 0) << "row " << r;
        ASSERT_LT(slot, pairs) << "row " << r;
        ++seen[slot];
        ASSERT_EQ(p.slot_row[slot], r) << "row " << r;
        ASSERT_EQ(p.row_token[r], slot / k) << "row " << r;
        const int64_t e =
            std::upper_bound(p.expert_offsets.begin(), p.expert_offsets.end(), r) - p.expert_offsets.begin() - 1;
        ASSERT_EQ(ids[slot], e) << "row " << r << " sits in expert " << e << "'s block";
        if (r > p.expert_offsets[e]) ASSERT_LT(p.row_token[r - 1], p.row_token[r]) << "token order in expert " << e;
    }
    int64_t dropped = 0;
    for (int64_t s = 0; s < pairs; ++s) {
        if (p.slot_row[s] < 0) {
            ++dropped;
            ASSERT_EQ(seen[s], 0);
        } else {
            ASSERT_EQ(seen[s], 1) << "pair " << s;
        }
    }
    ASSERT_EQ(dropped, p.dropped());
    // The drop policy: which pairs survived.
    for (int64_t e = 0; e < num_experts && cap > 0; ++e) {
        std::vector<int64_t> kept, lost;
        for (int64_t s = 0; s < pairs; ++s)
            if (ids[s] == e) (p.slot_row[s] >= 0 ? kept : lost).push_back(s);
        for (int64_t a : kept)
            for (int64_t b : lost) {
                if (c.drop_policy == DropPolicy::kPosition)
                    ASSERT_LT(a, b) << "expert " << e;
                else
                    ASSERT_TRUE(w[a] > w[b] || (w[a] == w[b] && a < b))
                        << "expert " << e << " kept " << a << " over " << b;
            }
    }
}

TEST(PlanRef, RandomInvariants) {
    for (uint64_t seed = 1; seed <= 200; ++seed) {
        SCOPED_TRACE(test::seed_trace(seed));
        std::mt19937_64 gen(seed);
        MoEConfig c = plan_cfg(1 + static_cast<int64_t>(gen() % 16), 1);
        c.top_k = 1 + static_cast<int64_t>(gen() % std::min<int64_t>(c.num_experts, 6));
        const double factors[] = {0.0, 0.5, 1.0, 1.25, 2.0};
        c.capacity_factor = factors[gen() % 5];
        c.min_capacity = static_cast<int64_t>(gen() % 3);
        c.drop_policy = static_cast<DropPolicy>(gen() % 2);
        const int64_t num_tokens = static_cast<int64_t>(gen() % 50);
        // Skewed ids (half the tokens prefer expert 0) so capacities bite; distinct inside a token.
        V ids;
        for (int64_t t = 0; t < num_tokens; ++t) {
            std::vector<int32_t> perm(c.num_experts);
            std::iota(perm.begin(), perm.end(), 0);
            std::shuffle(perm.begin(), perm.end(), gen);
            if (gen() % 2) std::iter_swap(perm.begin(), std::find(perm.begin(), perm.end(), 0));
            ids.insert(ids.end(), perm.begin(), perm.begin() + c.top_k);
        }
        std::vector<float> w = test::random_ints(ids.size(), seed, 0, 4);  // many equal weights: ties
        for (auto& v : w) v *= 0.25f;
        const ref::HostPlan p = ref::build_plan(c, num_tokens, ids, w);
        check_invariants(c, num_tokens, ids, w, p);
        if (HasFatalFailure()) return;
    }
}

}  // namespace
}  // namespace switchyard
