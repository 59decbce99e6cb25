// tools/switchyard/profile_common.cpp: see profile_common.h.
#include "profile_common.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>

#include "cli_common.h"
#include "host_routing.h"
#include "io/weights.h"
#include "switchyard/balance.h"

namespace switchyard {
namespace cli {

namespace {

// logits [T, E] = log p_e + Gumbel noise, p uniform (s = 0) or Zipf p_e ~ (e + 1)^-s.
std::vector<float> skewed_logits(int64_t E, double zipf_s, int64_t T, uint64_t seed) {
    std::vector<double> logp(static_cast<size_t>(E));
    double z = 0;
    for (int64_t e = 0; e < E; ++e) z += std::pow(static_cast<double>(e + 1), -zipf_s);
    for (int64_t e = 0; e < E; ++e) logp[e] = std::log(std::pow(static_cast<double>(e + 1), -zipf_s) / z);
    io::SplitMix64 rng(seed);
    std::vector<float> logits(static_cast<size_t>(T * E));
    for (int64_t i = 0; i < T * E; ++i) {
        double u = std::max(rng.uniform(), 1e-300);
        logits[i] = static_cast<float>(logp[i % E] - std::log(-std::log(u)));
    }
    return logits;
}

void fill_row(UtilRow& r, const MoEConfig& cfg, const std::vector<float>& logits, std::vector<float>& bias,
              int64_t T) {
    HostRouting routing(cfg, T);
    routing.route(logits, &bias);
    routing.build_plan();
    r.stats = routing.load_stats(logits);
    for (int i = 0; i < 3; ++i) {
        routing.config().capacity_factor = kCapacityFactors[i];
        routing.build_plan();
        r.dropped_frac[i] = static_cast<double>(routing.load_stats(logits).dropped) / static_cast<double>(T * cfg.top_k);
    }
}

}  // namespace

UtilRow utilisation(const std::string& shape, const MoEConfig& base, const std::string& dist, double zipf_s,
                    int64_t T, uint64_t seed) {
    MoEConfig cfg = base;
    cfg.use_score_bias = false;
    cfg.capacity_factor = 0;
    UtilRow r;
    r.shape = shape;
    r.dist = dist;
    r.T = T;
    r.zipf_s = zipf_s;
    std::vector<float> no_bias;
    fill_row(r, cfg, skewed_logits(cfg.num_experts, zipf_s, T, seed), no_bias, T);
    return r;
}

UtilRow utilisation_balanced(const std::string& shape, const MoEConfig& base, double zipf_s, int64_t T,
                             uint64_t seed, int steps, double rate) {
    MoEConfig cfg = base;
    cfg.use_score_bias = true;
    cfg.capacity_factor = 0;
    const int64_t E = cfg.num_experts;
    std::vector<float> bias(static_cast<size_t>(E), 0.0f);
    HostRouting routing(cfg, T);
    for (int s = 0; s < steps; ++s) {
        const std::vector<float> logits = skewed_logits(E, zipf_s, T, seed + 1000 + static_cast<uint64_t>(s));
        routing.route(logits, &bias);
        routing.build_plan();
        // The library's aux-loss-free update (balance.h) from the step's per-expert loads.
        update_score_bias(rate, routing.load_stats(logits), TensorRef(bias.data(), DType::kF32, {E}));
    }
    UtilRow r;
    r.shape = shape;
    r.dist = "Zipf s=" + fmt_num("%.1f", zipf_s) + " + selection bias (" + std::to_string(steps) + " steps)";
    r.T = T;
    r.zipf_s = zipf_s;
    fill_row(r, cfg, skewed_logits(E, zipf_s, T, seed), bias, T);  // the same batch as the unbalanced row
    return r;
}

ProgressBar::ProgressBar(int total_steps, double t_start)
    : total_(std::max(1, total_steps)), t0_(t_start), tty_(::isatty(2) != 0) {}

void ProgressBar::draw() {
    const int width = 30;
    const int fill = std::min(width, done_ * width / total_);
    std::string bar(static_cast<size_t>(fill), '#');
    bar += std::string(static_cast<size_t>(width - fill), '.');
    std::string what = last_;
    if (tty_ && what.size() > 70) what = what.substr(0, 67) + "...";
    if (tty_)
        std::fprintf(stderr, "\r\033[Kprofile: [%s] %d/%d %4.0f s  %s", bar.c_str(), done_, total_,
                     now_seconds() - t0_, what.c_str());
    else
        std::fprintf(stderr, "profile: [%d/%d] %s (%.0f s)\n", done_, total_, what.c_str(), now_seconds() - t0_);
    std::fflush(stderr);
}

void ProgressBar::step(const std::string& what) {
    done_ = std::min(total_, done_ + 1);
    last_ = what;
    draw();
}

void ProgressBar::note(const std::string& line) {
    if (tty_) std::fprintf(stderr, "\r\033[K");
    std::fprintf(stderr, "profile: %s\n", line.c_str());
    if (tty_) draw();
}

void ProgressBar::finish() {
    if (tty_) std::fprintf(stderr, "\n");
}

std::string fmt_num(const char* f, double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, f, v);
    return buf;
}

std::string now_utc() {
    std::time_t t = std::time(nullptr);
    char buf[64];
    std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M UTC", std::gmtime(&t));
    return buf;
}

}  // namespace cli
}  // namespace switchyard
