// tools/switchyard/balance_sim.h: the simulation behind `switchyard balance` (header-only: the CLI and its unit
// test both build it), on the library's public CPU routing (host_routing.h: switchyard::route, build_plan,
// load_stats) and its aux-loss-free update (balance.h: update_score_bias).
//
// Model: routing over many steps where the logits of token t are
//   l[t, e] = -zipf * ln(e + 1) + noise * z[t, e],  z ~ N(0, 1) i.i.d. (fresh tokens every step, fixed seed),
// i.e. a persistent Zipf-shaped preference for low expert indices. Per step the tokens are routed with top_k of
// `score` and one of three balancing modes acts on a per-expert bias b:
//   kNone     no balancing (b = 0);
//   kAuxLoss  b is a logit bias (selection and weights): after the step, b -= aux_lr * dL/db for the Switch loss
//             L = E sum_e f_e P_e with f held fixed (its usual straight-through treatment);
//   kAuxFree  b is the selection-only score bias, updated by update_score_bias(bias_rate, counts).
// Records max/mean load, the coefficient of variation and the aux loss of every step (the loads before the update).
// Random numbers: std::mt19937_64(seed), uniforms in (0, 1) from the top 53 bits, Box-Muller pairs in token-major
// order, so a seed gives the same run on every host.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "host_routing.h"
#include "switchyard/balance.h"
#include "switchyard/config.h"
#include "switchyard/error.h"

namespace switchyard {
namespace cli {

enum class BalanceMode : int { kNone = 0, kAuxLoss = 1, kAuxFree = 2 };

inline const char* to_string(BalanceMode m) {
    switch (m) {
        case BalanceMode::kNone:
            return "none";
        case BalanceMode::kAuxLoss:
            return "aux-loss";
        case BalanceMode::kAuxFree:
            return "aux-free";
    }
    return "unknown-balance-mode";
}

struct BalanceSimOptions {
    int64_t num_experts = 16;
    int64_t top_k = 4;
    int64_t tokens = 4096;  // tokens per step
    int64_t steps = 300;
    double zipf = 1.0;
    double noise = 1.0;
    ScoreFunction score = ScoreFunction::kSigmoid;
    double bias_rate = 0.002;
    double aux_lr = 1.0;
    uint64_t seed = 1;
};

struct BalanceSimResult {
    std::vector<double> max_over_mean, cv, aux_loss;  // [steps]
    std::vector<float> final_bias;                    // [E]
};

namespace balance_detail {

// p[e] of one token as the aux loss defines it (balance.h): softmax over E (NaN logits left out of the normaliser,
// exp(v - max) exactly 1 at the maximum), or the sigmoid normalised to sum 1.
inline void aux_probabilities(ScoreFunction score, const float* l, int64_t E, double* p) {
    if (score == ScoreFunction::kSigmoid) {
        double s = 0.0;
        for (int64_t e = 0; e < E; ++e) s += (p[e] = 1.0 / (1.0 + std::exp(-static_cast<double>(l[e]))));
        for (int64_t e = 0; e < E; ++e) p[e] /= s;
        return;
    }
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t e = 0; e < E; ++e)
        if (!std::isnan(l[e])) m = std::max(m, static_cast<double>(l[e]));
    double sum = 0.0;
    for (int64_t e = 0; e < E; ++e) {
        const double x = static_cast<double>(l[e]);
        if (std::isnan(x)) continue;
        p[e] = x == m ? 1.0 : std::exp(x - m);
        sum += p[e];
    }
    for (int64_t e = 0; e < E; ++e) p[e] = std::isnan(l[e]) ? std::numeric_limits<double>::quiet_NaN() : p[e] / sum;
}

inline void check_options(const BalanceSimOptions& o) {
    const int64_t E = o.num_experts, k = o.top_k, T = o.tokens;
    SWITCHYARD_CHECK(E >= 1 && E <= 512, "balance: experts=", E, " must be in [1, 512]");
    SWITCHYARD_CHECK(k >= 1 && k <= E && k <= 32, "balance: top_k=", k, " must be in [1, min(32, experts)]");
    SWITCHYARD_CHECK(T >= 1, "balance: tokens=", T, " must be >= 1");
    SWITCHYARD_CHECK(o.steps >= 1, "balance: steps=", o.steps, " must be >= 1");
    SWITCHYARD_CHECK(std::isfinite(o.zipf) && std::isfinite(o.noise) && o.noise >= 0, "balance: zipf=", o.zipf,
                     " noise=", o.noise, " must be finite (noise >= 0)");
    SWITCHYARD_CHECK(std::isfinite(o.bias_rate) && o.bias_rate >= 0, "balance: bias_rate=", o.bias_rate);
    SWITCHYARD_CHECK(std::isfinite(o.aux_lr) && o.aux_lr >= 0, "balance: aux_lr=", o.aux_lr);
    SWITCHYARD_CHECK(o.score != ScoreFunction::kTopkSoftmax, "balance: score must be softmax or sigmoid");
}

// One step's logits [T, E]: skew + logit bias + noise * N(0, 1), Box-Muller pairs in order.
template <typename Uniform>
void step_logits(const BalanceSimOptions& o, const std::vector<double>& skew, const std::vector<double>& logit_bias,
                 Uniform& uniform, std::vector<float>& logits) {
    const int64_t E = o.num_experts, n = o.tokens * E;
    for (int64_t i = 0; i < n; i += 2) {
        const double u1 = uniform(), u2 = uniform();
        const double rad = std::sqrt(-2.0 * std::log(u1)), ang = 6.283185307179586 * u2;
        const double z[2] = {rad * std::cos(ang), rad * std::sin(ang)};
        for (int64_t q = 0; q < 2 && i + q < n; ++q) {
            const int64_t e = (i + q) % E;
            logits[i + q] = static_cast<float>(skew[e] + logit_bias[e] + o.noise * z[q]);
        }
    }
}

// Aux-loss mode: logit_bias -= aux_lr * dL/db, dL/db_j = (E / T) sum_t g_tj (f_j - sum_e f_e p_te) with
// g = p (softmax) or s(1-s)/sum s (sigmoid), f_e = counts_e / (T k).
inline void aux_loss_step(const BalanceSimOptions& o, const std::vector<float>& logits,
                          const std::vector<int64_t>& counts, std::vector<double>& logit_bias) {
    const int64_t E = o.num_experts, k = o.top_k, T = o.tokens;
    std::vector<double> p(static_cast<size_t>(E)), grad(static_cast<size_t>(E), 0.0);
    for (int64_t t = 0; t < T; ++t) {
        const float* l = logits.data() + t * E;
        aux_probabilities(o.score, l, E, p.data());
        double fp = 0.0;
        for (int64_t e = 0; e < E; ++e) fp += static_cast<double>(counts[e]) / static_cast<double>(T * k) * p[e];
        double ssum = 0.0;
        if (o.score == ScoreFunction::kSigmoid)
            for (int64_t e = 0; e < E; ++e) ssum += 1.0 / (1.0 + std::exp(-static_cast<double>(l[e])));
        for (int64_t j = 0; j < E; ++j) {
            double g = p[j];
            if (o.score == ScoreFunction::kSigmoid) {
                const double s = 1.0 / (1.0 + std::exp(-static_cast<double>(l[j])));
                g = s * (1.0 - s) / ssum;
            }
            grad[j] += g * (static_cast<double>(counts[j]) / static_cast<double>(T * k) - fp);
        }
    }
    for (int64_t j = 0; j < E; ++j) logit_bias[j] -= o.aux_lr * static_cast<double>(E) / static_cast<double>(T) * grad[j];
}

}  // namespace balance_detail

inline BalanceSimResult simulate_balance(const BalanceSimOptions& o, BalanceMode mode) {
    balance_detail::check_options(o);
    const int64_t E = o.num_experts, T = o.tokens;
    MoEConfig cfg;
    cfg.hidden_size = 1;
    cfg.ffn_size = 1;
    cfg.num_experts = E;
    cfg.top_k = o.top_k;
    cfg.score_function = o.score;
    cfg.use_score_bias = mode == BalanceMode::kAuxFree;
    cfg.validate();

    std::vector<double> skew(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) skew[e] = -o.zipf * std::log(static_cast<double>(e + 1));
    std::vector<float> bias(static_cast<size_t>(E), 0.0f);      // aux-free: selection bias
    std::vector<double> logit_bias(static_cast<size_t>(E), 0.0);  // aux-loss: logit bias
    std::vector<float> logits(static_cast<size_t>(T * E));
    HostRouting routing(cfg, T);
    std::mt19937_64 gen(o.seed);
    auto uniform = [&]() { return (static_cast<double>(gen() >> 11) + 0.5) / 9007199254740992.0; };  // (0, 1)

    BalanceSimResult r;
    for (int64_t step = 0; step < o.steps; ++step) {
        balance_detail::step_logits(o, skew, logit_bias, uniform, logits);
        routing.route(logits, &bias);
        routing.build_plan();
        const LoadStats st = routing.load_stats(logits);
        r.max_over_mean.push_back(st.max_over_mean());
        r.cv.push_back(st.cv);
        r.aux_loss.push_back(st.aux_loss);
        if (mode == BalanceMode::kAuxFree)
            update_score_bias(o.bias_rate, st, TensorRef(bias.data(), DType::kF32, {E}));
        else if (mode == BalanceMode::kAuxLoss)
            balance_detail::aux_loss_step(o, logits, st.expert_counts, logit_bias);
    }
    r.final_bias.assign(bias.begin(), bias.end());
    if (mode == BalanceMode::kAuxLoss)
        for (int64_t e = 0; e < E; ++e) r.final_bias[e] = static_cast<float>(logit_bias[e]);
    return r;
}

}  // namespace cli
}  // namespace switchyard
