// tests/test_balance_sim.cpp: the `switchyard balance` simulation (tools/switchyard/balance_sim.h, CLI-only code
// built on the public CPU stages): aux-loss-free updates balance a skewed router on the defaults, no balancing stays
// skewed, the aux loss helps, bad options name themselves.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "balance_sim.h"
#include "switchyard/error.h"
#include "test_util.h"

namespace switchyard {
namespace {

using cli::BalanceMode;
using cli::BalanceSimOptions;
using cli::BalanceSimResult;
using cli::simulate_balance;

TEST(BalanceSimulation, AuxFreeConvergesOnDefaults) {
    BalanceSimOptions o;  // the defaults of `switchyard balance`
    SCOPED_TRACE(test::seed_trace(o.seed));
    const BalanceSimResult r = simulate_balance(o, BalanceMode::kAuxFree);
    ASSERT_EQ(static_cast<int64_t>(r.max_over_mean.size()), o.steps);
    EXPECT_GT(r.max_over_mean.front(), 2.0) << "the skew should start far from balanced";
    double tail = 0;
    const int64_t n = o.steps / 10;
    for (int64_t i = o.steps - n; i < o.steps; ++i) tail += r.max_over_mean[i] / static_cast<double>(n);
    EXPECT_LE(tail, 1.1) << "mean max/mean over the last " << n << " steps";
    EXPECT_GT(r.final_bias.back(), r.final_bias.front()) << "the least preferred expert should gain bias";
}

TEST(BalanceSimulation, NoBalancingStaysSkewedAndAuxLossHelps) {
    BalanceSimOptions o;
    o.steps = 60;
    o.tokens = 1024;
    SCOPED_TRACE(test::seed_trace(o.seed));
    const BalanceSimResult none = simulate_balance(o, BalanceMode::kNone);
    const BalanceSimResult aux = simulate_balance(o, BalanceMode::kAuxLoss);
    EXPECT_GT(none.max_over_mean.back(), 2.0);
    EXPECT_LT(aux.max_over_mean.back(), 0.6 * none.max_over_mean.back());
    BalanceSimOptions b = o;
    b.top_k = 40;
    try {
        simulate_balance(b, BalanceMode::kNone);
        ADD_FAILURE() << "expected switchyard::Error";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("top_k=40"), std::string::npos) << e.what();
    }
}

}  // namespace
}  // namespace switchyard
