// tools/switchyard/balance.cpp: `switchyard balance`: a simulation of routing over many steps under a persistent
// per-expert skew, with no balancing, with the aux loss acting on a logit bias, and with aux-loss-free bias
// updates (the model is written out in balance_sim.h; it routes with the library's public CPU stages).
//
// Prints max/mean load every --print-every steps per mode and a summary (start, mean and max of the last 10% of
// steps, first step whose 10-step window averages within --target; a mode "ends balanced" when the mean of its
// last 10% of steps is within --target); writes --json (every step of every mode) and, with
// --plot, a PNG through scripts/plot_balance.py (matplotlib). Exit code 0; 1 when --require-converged is given and
// the aux-loss-free mode does not end balanced.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "cli_common.h"
#include "commands.h"
#include "balance_sim.h"
#include "io/file_util.h"
#include "switchyard/error.h"

namespace switchyard {
namespace cli {
namespace {

struct BalanceOptions {
    BalanceSimOptions sim;
    std::string score = "sigmoid";
    std::string modes = "none,aux-loss,aux-free";
    std::string json = "balance.json";
    std::string plot;
    std::string plot_script = "scripts/plot_balance.py";
    int64_t print_every = 25;
    double target = 1.1;
    bool require_converged = false;
};

BalanceMode parse_mode(const std::string& s) {
    if (s == "none") return BalanceMode::kNone;
    if (s == "aux-loss" || s == "aux") return BalanceMode::kAuxLoss;
    if (s == "aux-free" || s == "aux-loss-free" || s == "bias") return BalanceMode::kAuxFree;
    SWITCHYARD_FAIL("--modes: '", s, "' is not one of none|aux-loss|aux-free");
}

struct Summary {
    double start = 0, tail_mean = 0, tail_max = 0;
    int64_t converged_at = -1;  // first step whose 10-step window averages <= target (-1: never)
};

Summary summarise(const std::vector<double>& r, double target) {
    Summary s;
    const size_t n = r.size();
    s.start = r.front();
    const size_t tail = std::max<size_t>(1, n / 10);
    for (size_t i = n - tail; i < n; ++i) {
        s.tail_mean += r[i] / static_cast<double>(tail);
        s.tail_max = std::max(s.tail_max, r[i]);
    }
    const size_t window = std::min<size_t>(10, n);
    for (size_t i = 0; i + window <= n && s.converged_at < 0; ++i) {
        double m = 0;
        for (size_t q = i; q < i + window; ++q) m += r[q] / static_cast<double>(window);
        if (m <= target) s.converged_at = static_cast<int64_t>(i);
    }
    return s;
}

int run_balance(BalanceOptions o) {
    o.sim.score = parse_score_function(o.score);
    SWITCHYARD_CHECK(o.print_every >= 1, "--print-every must be >= 1, got ", o.print_every);
    require_finite(o.target, "--target");
    std::vector<BalanceMode> modes;
    std::stringstream ss(o.modes);
    for (std::string m; std::getline(ss, m, ',');)
        if (!m.empty()) modes.push_back(parse_mode(m));
    SWITCHYARD_CHECK(!modes.empty(), "--modes is empty");

    std::printf("balance: E=%lld k=%lld tokens/step=%lld steps=%lld zipf=%g noise=%g score=%s bias_rate=%g aux_lr=%g "
                "seed=%llu\n",
                static_cast<long long>(o.sim.num_experts), static_cast<long long>(o.sim.top_k),
                static_cast<long long>(o.sim.tokens), static_cast<long long>(o.sim.steps), o.sim.zipf, o.sim.noise,
                to_string(o.sim.score), o.sim.bias_rate, o.sim.aux_lr, static_cast<unsigned long long>(o.sim.seed));
    nlohmann::ordered_json j;
    j["experts"] = o.sim.num_experts;
    j["top_k"] = o.sim.top_k;
    j["tokens_per_step"] = o.sim.tokens;
    j["steps"] = o.sim.steps;
    j["zipf"] = o.sim.zipf;
    j["noise"] = o.sim.noise;
    j["score"] = to_string(o.sim.score);
    j["bias_rate"] = o.sim.bias_rate;
    j["aux_lr"] = o.sim.aux_lr;
    j["seed"] = o.sim.seed;
    j["target"] = o.target;
    j["modes"] = nlohmann::ordered_json::object();
    bool aux_free_ok = true;
    for (BalanceMode m : modes) {
        const double t0 = now_seconds();
        const BalanceSimResult r = simulate_balance(o.sim, m);
        const double secs = now_seconds() - t0;
        const Summary s = summarise(r.max_over_mean, o.target);
        std::printf("\n%-8s step:", to_string(m));
        for (int64_t i = 0; i < o.sim.steps; i += o.print_every) std::printf(" %6lld", static_cast<long long>(i));
        std::printf("\n%-8s max/mean:", "");
        for (int64_t i = 0; i < o.sim.steps; i += o.print_every) std::printf(" %6.3f", r.max_over_mean[i]);
        std::printf("\n  start %.3f -> last 10%% of steps: mean %.3f, max %.3f; ", s.start, s.tail_mean, s.tail_max);
        if (s.converged_at >= 0)
            std::printf("10-step mean first within %.2f at step %lld; ", o.target,
                        static_cast<long long>(s.converged_at));
        std::printf("%s", s.tail_mean <= o.target ? "ends balanced" : "ends unbalanced");
        std::printf(" (%.1f s)\n", secs);
        if (m == BalanceMode::kAuxFree && s.tail_mean > o.target) aux_free_ok = false;
        nlohmann::ordered_json jm;
        jm["max_over_mean"] = r.max_over_mean;
        jm["cv"] = r.cv;
        jm["aux_loss"] = r.aux_loss;
        jm["final_bias"] = r.final_bias;
        jm["start"] = s.start;
        jm["tail_mean"] = s.tail_mean;
        jm["tail_max"] = s.tail_max;
        jm["converged_at"] = s.converged_at;
        j["modes"][to_string(m)] = jm;
    }
    io::AtomicFileSet files;
    const std::string text = j.dump(1) + "\n";
    files.add(o.json, [&](std::ostream& os) { os << text; });
    files.commit();
    std::printf("\nwrote %s\n", o.json.c_str());
    if (!o.plot.empty()) {
        const std::string cmd = "python3 '" + o.plot_script + "' '" + o.json + "' '" + o.plot + "'";
        const int rc = std::system(cmd.c_str());
        SWITCHYARD_CHECK(rc == 0, "--plot: '", cmd, "' failed with status ", rc,
                         " (needs python3 with matplotlib; the JSON was written)");
        std::printf("wrote %s\n", o.plot.c_str());
    }
    return (o.require_converged && !aux_free_ok) ? kExitFailure : kExitOk;
}

}  // namespace

void add_balance(CLI::App& app, int* exit_code) {
    auto o = std::make_shared<BalanceOptions>();
    CLI::App* sub = app.add_subcommand(
        "balance", "simulate routing under a skewed router: no balancing vs aux loss vs aux-loss-free bias updates");
    sub->add_option("--experts", o->sim.num_experts, "number of experts E")->capture_default_str();
    sub->add_option("--top-k", o->sim.top_k, "experts per token k")->capture_default_str();
    sub->add_option("--tokens", o->sim.tokens, "tokens per step")->capture_default_str();
    sub->add_option("--steps", o->sim.steps, "steps")->capture_default_str();
    sub->add_option("--zipf", o->sim.zipf, "skew: expert e's logits are shifted by -zipf*ln(e+1)")
        ->capture_default_str();
    sub->add_option("--noise", o->sim.noise, "standard deviation of the per-token logit noise")->capture_default_str();
    sub->add_option("--score", o->score, "router score function: softmax | sigmoid")->capture_default_str();
    sub->add_option("--bias-rate", o->sim.bias_rate, "aux-loss-free update rate (b_e += rate*sign(mean-load_e))")
        ->capture_default_str();
    sub->add_option("--aux-lr", o->sim.aux_lr, "aux-loss mode: step size of the gradient step on the logit bias")
        ->capture_default_str();
    sub->add_option("--seed", o->sim.seed, "random seed")->capture_default_str();
    sub->add_option("--modes", o->modes, "comma-separated: none,aux-loss,aux-free")->capture_default_str();
    sub->add_option("--json", o->json, "write every step's statistics here")->capture_default_str();
    sub->add_option("--plot", o->plot, "also write a PNG plot here (python3 + matplotlib)");
    sub->add_option("--plot-script", o->plot_script, "the plotting script")->capture_default_str();
    sub->add_option("--print-every", o->print_every, "print every N-th step")->capture_default_str();
    sub->add_option("--target", o->target, "max/mean ratio that counts as balanced")->capture_default_str();
    sub->add_flag("--require-converged", o->require_converged,
                  "exit with code 1 unless the aux-free mode ends balanced (last 10% mean <= --target)");
    sub->callback([o, exit_code] { *exit_code = run_balance(*o); });
}

}  // namespace cli
}  // namespace switchyard
