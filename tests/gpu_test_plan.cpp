// tests/gpu_test_plan.cpp: the routing plan built on the device (src/cuda/routing/plan.cu) against ref::build_plan.
//
// Every plan array is compared EXACTLY (integers): expert_counts, expert_offsets, slot_row, row_token, row_slot,
// for dropless routing and for both drop policies over several capacities. Inputs: random distinct experts per
// token drawn from a skewed distribution (some experts get nothing, some most of the tokens), weights on a coarse
// grid (many exact ties) with a few NaNs; plus all tokens on one expert. Outputs are poisoned before each run.
// Paths covered: the sort-free chunked path (dropless and position drops, E <= 1024; one chunk, many chunks,
// chunks longer than 1024 pairs) and the CUB sort path (probability drops; every policy when E > 1024).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/moe_stages.h"
#include "gpu_test_util.h"
#include "ref/ref.h"

namespace switchyard {
namespace {

using testing::all_equal;
using testing::DeviceBuffer;

struct PlanCase {
    int64_t num_tokens, num_experts, top_k;
    bool all_on_one;
};

// Distinct experts per token from weights ~ (e + 1)^-1.5, with the last expert never chosen.
void make_routing(const PlanCase& c, uint64_t seed, std::vector<int32_t>& ids, std::vector<float>& w) {
    std::mt19937_64 rng(seed);
    const int64_t T = c.num_tokens, E = c.num_experts, k = c.top_k;
    std::vector<double> pw(E);
    for (int64_t e = 0; e < E; ++e) pw[e] = e == E - 1 && E > k ? 0.0 : std::pow(static_cast<double>(e + 1), -1.5);
    std::discrete_distribution<int> pick(pw.begin(), pw.end());
    ids.assign(T * k, 0);
    w.assign(T * k, 0.0f);
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t j = 0; j < k; ++j) {
            int32_t e;
            bool dup;
            do {
                e = c.all_on_one ? static_cast<int32_t>((3 + j) % E) : pick(rng);
                dup = false;
                for (int64_t i = 0; i < j; ++i) dup |= ids[t * k + i] == e;
            } while (dup);
            ids[t * k + j] = e;
            const int r = static_cast<int>(rng() % 64);
            w[t * k + j] = r == 0 ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(1 + r % 8) / 8.0f;
        }
    }
}

class GpuPlan : public ::testing::TestWithParam<PlanCase> {};

TEST_P(GpuPlan, MatchesReference) {
    SWITCHYARD_SKIP_WITHOUT_GPU();
    const PlanCase c = GetParam();
    const int64_t T = c.num_tokens, E = c.num_experts, k = c.top_k, n = T * k;
    const uint64_t seed = 500 + static_cast<uint64_t>(T * 3 + E * 5 + k);
    std::vector<int32_t> ids;
    std::vector<float> w;
    make_routing(c, seed, ids, w);
    DeviceBuffer d_ids, d_w, d_counts(E * 4), d_offsets((E + 1) * 4), d_slot(n * 4 + 4), d_tok(n * 4 + 4),
        d_rs(n * 4 + 4);
    testing::upload_raw(d_ids, ids);
    testing::upload_raw(d_w, w);
    const size_t ws_bytes = cuda::plan_workspace_size(T, k, E);
    DeviceBuffer ws(ws_bytes);

    struct Policy {
        double factor;
        int64_t min_capacity;
        DropPolicy policy;
    };
    const Policy policies[] = {{0.0, 0, DropPolicy::kPosition},     {1.0, 0, DropPolicy::kPosition},
                               {0.5, 0, DropPolicy::kProbability},  {1.25, 0, DropPolicy::kProbability},
                               {0.25, 3, DropPolicy::kPosition},    {1.0, 0, DropPolicy::kProbability},
                               {100.0, 0, DropPolicy::kProbability}};
    for (const Policy& p : policies) {
        MoEConfig cfg;
        cfg.hidden_size = 8;
        cfg.ffn_size = 8;
        cfg.num_experts = E;
        cfg.top_k = k;
        cfg.capacity_factor = p.factor;
        cfg.min_capacity = p.min_capacity;
        cfg.drop_policy = p.policy;
        SCOPED_TRACE("seed=" + std::to_string(seed) + " T=" + std::to_string(T) + " E=" + std::to_string(E) +
                     " k=" + std::to_string(k) + " capacity_factor=" + std::to_string(p.factor) + " min_capacity=" +
                     std::to_string(p.min_capacity) + " policy=" + to_string(p.policy));
        const ref::HostPlan ref = ref::build_plan(cfg, T, ids, w);
        for (int run = 0; run < 2; ++run) {
            // Poison with 0x7F bytes (a large positive int32, never a valid row and never -1).
            for (DeviceBuffer* b : {&d_counts, &d_offsets, &d_slot, &d_tok, &d_rs})
                GPU_CHECK(cudaMemset(b->get(), 0x7F, b->bytes()));
            ws.poison();
            cuda::PlanArgs a;
            a.num_tokens = T;
            a.top_k = k;
            a.num_experts = E;
            a.capacity = cfg.capacity(T);
            a.drop_policy = p.policy;
            a.topk_ids = d_ids.get<int32_t>();
            a.topk_weights = d_w.get<float>();
            a.expert_counts = d_counts.get<int32_t>();
            a.expert_offsets = d_offsets.get<int32_t>();
            a.slot_row = d_slot.get<int32_t>();
            a.row_token = d_tok.get<int32_t>();
            a.row_slot = d_rs.get<int32_t>();
            cuda::build_plan(a, ws.get(), ws_bytes, nullptr);
            GPU_CHECK(cudaDeviceSynchronize());
            EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_counts.get(), E), ref.expert_counts,
                                  "expert_counts"));
            EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_offsets.get(), E + 1), ref.expert_offsets,
                                  "expert_offsets"));
            EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_slot.get(), n), ref.slot_row, "slot_row", k));
            EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_tok.get(), n), ref.row_token, "row_token"));
            EXPECT_TRUE(all_equal(testing::download_raw<int32_t>(d_rs.get(), n), ref.row_slot, "row_slot"));
        }
        if (p.factor == 0.5 && T >= 129) {
            EXPECT_GT(ref.dropped(), 0) << "the case is meant to drop pairs";
        }
    }
}

const PlanCase kPlanCases[] = {
    {0, 8, 2, false},    {1, 8, 1, false},     {7, 60, 6, false},   {129, 64, 8, false},
    {129, 8, 2, false},  {4097, 256, 8, false}, {4097, 60, 6, false}, {4097, 8, 1, true},
    {129, 128, 2, true}, {16384, 128, 8, false},
    // fast path: chunks longer than 1024 pairs (n > 512 * 1024), a partial last tile and chunk
    {65537, 8, 8, false},
    // E > 1024: the CUB sort path for every policy
    {129, 1100, 2, false},
};

INSTANTIATE_TEST_SUITE_P(Cases, GpuPlan, ::testing::ValuesIn(kPlanCases),
                         [](const ::testing::TestParamInfo<PlanCase>& info) {
                             std::ostringstream os;
                             os << "T" << info.param.num_tokens << "_E" << info.param.num_experts << "_k"
                                << info.param.top_k << (info.param.all_on_one ? "_all_on_one" : "");
                             return os.str();
                         });

}  // namespace
}  // namespace switchyard
