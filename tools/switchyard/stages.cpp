// tools/switchyard/stages.cpp: see stages.h.
#include "stages.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "cli_common.h"
#include "host_routing.h"
#include "io/weights.h"
#include "switchyard/error.h"
#include "switchyard/stages.h"
#include "timing.h"

namespace switchyard {
namespace cli {

namespace {

// Adds one staged forward's stage times to the six columns of StageTimes (gemm1 + activation + gemm2 = experts).
void add_run(const StageSamples& run, std::vector<double> (&cols)[6]) {
    double v[6] = {0, 0, 0, 0, 0, 0};
    for (const auto& [name, ms] : run.medians()) {
        const int c = name == "router" ? 0 : name == "plan" ? 1 : name == "dispatch" ? 2 : name == "shared" ? 4
                    : name == "combine" ? 5 : 3;
        v[c] += ms;
    }
    for (int c = 0; c < 6; ++c) cols[c].push_back(v[c]);
}

// logits [T, E] fp32 of x through the public router GEMM (CPU).
void router_logits(const MoEWeights& w, const TensorRef& x, std::vector<float>& logits) {
    const int64_t T = x.shape[0], E = w.gate.shape[0];
    logits.resize(static_cast<size_t>(T * E));
    router_gemm(x, w.gate, TensorRef(logits.data(), DType::kF32, {T, E}), nullptr, 0);
}

std::vector<float> score_bias_of(const MoEConfig& cfg, const MoEWeights& w) {
    if (!cfg.use_score_bias) return {};
    const float* b = w.score_bias.ptr<float>();
    return std::vector<float>(b, b + cfg.num_experts);
}

// The seed's probabilities [T, E] fp32: softmax over E (sigmoid for sigmoid routing).
void seed_probs(const MoEConfig& cfg, const std::vector<float>& logits, int64_t T, std::vector<float>& probs) {
    const int64_t E = cfg.num_experts;
    probs.resize(logits.size());
    for (int64_t t = 0; t < T; ++t) {
        const float* l = logits.data() + t * E;
        float* p = probs.data() + t * E;
        if (cfg.score_function == ScoreFunction::kSigmoid) {
            for (int64_t e = 0; e < E; ++e) p[e] = 1.0f / (1.0f + std::exp(-l[e]));
        } else {
            float m = -INFINITY;
            for (int64_t e = 0; e < E; ++e) m = std::max(m, l[e]);
            float sum = 0;
            for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - m));
            for (int64_t e = 0; e < E; ++e) p[e] /= sum;
        }
    }
}

// One element of the activation dtype.
void store_value(std::vector<uint8_t>& buf, DType dt, size_t idx, float v) {
    if (dt == DType::kF32) {
        std::memcpy(&buf[4 * idx], &v, 4);
    } else {
        const uint16_t h = dt == DType::kBF16 ? float_to_bf16(v) : float_to_half(v);
        std::memcpy(&buf[2 * idx], &h, 2);
    }
}

// The seed's zero-filled one-hot dispatch and combine tensors [T, E, C] of a routing (C = cfg.capacity(T), or the
// largest expert count when dropless); returns C.
int64_t seed_onehot(const MoEConfig& cfg, const HostRouting& r, std::vector<uint8_t>& dispatch,
                    std::vector<uint8_t>& combine) {
    const int64_t T = r.num_tokens(), E = cfg.num_experts, k = cfg.top_k;
    int64_t C = cfg.capacity(T);
    if (C == 0)
        for (int32_t c : r.expert_counts()) C = std::max<int64_t>(C, c);
    const size_t n = static_cast<size_t>(T * E * C) * dtype_size(cfg.dtype);
    dispatch.assign(n, 0);
    combine.assign(n, 0);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < k; ++j) {
            const int32_t row = r.slot_row()[t * k + j];
            if (row < 0) continue;
            const int32_t e = r.topk_ids()[t * k + j];
            const size_t idx = static_cast<size_t>((t * E + e) * C + (row - r.expert_offsets()[e]));
            store_value(dispatch, cfg.dtype, idx, 1.0f);
            store_value(combine, cfg.dtype, idx, r.topk_weights()[t * k + j]);
        }
    return C;
}

}  // namespace

StageTimes time_cpu_stages(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, int warmup, int reps,
                           double budget_s) {
    const int64_t T = x.shape[0], H = cfg.hidden_size;
    MoELayer layer(cfg, w);
    // Host workspace, 256-byte aligned as forward() requires, allocated once outside the timed runs.
    const size_t ws_bytes = layer.workspace_size(T);
    std::vector<uint8_t> ws_buf(ws_bytes + 256);
    void* ws = ws_buf.data() + (256 - reinterpret_cast<uintptr_t>(ws_buf.data()) % 256) % 256;
    std::vector<uint8_t> y(static_cast<size_t>(T * H) * dtype_size(cfg.dtype));
    const TensorRef yh = io::host_tensor(y.data(), cfg.dtype, {T, H});
    std::vector<double> cols[6];
    HostStageClock clock;
    double spent = 0;
    for (int it = 0; it < warmup + reps || (spent < budget_s && it < warmup + kMaxAdaptiveReps); ++it) {
        const double t0 = now_seconds();
        layer.forward(x, yh, ws, ws_bytes, nullptr, nullptr, clock.callback());
        if (it < warmup) continue;
        spent += now_seconds() - t0;
        StageSamples run;
        clock.add_to(run);
        add_run(run, cols);
    }
    StageTimes r;
    r.router_ms = median(cols[0]);
    r.plan_ms = median(cols[1]);
    r.dispatch_ms = median(cols[2]);
    r.experts_ms = median(cols[3]);
    r.shared_ms = median(cols[4]);
    r.combine_ms = median(cols[5]);
    return r;
}

RouterTimes time_routers_cpu(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, int warmup, int reps,
                             double budget_s) {
    const int64_t T = x.shape[0];
    RouterTimes r;
    std::vector<float> bias = score_bias_of(cfg, w), logits, probs;
    HostRouting routing(cfg, T);
    r.switchyard_ms = median_ms_adaptive(
        [&] {
            router_logits(w, x, logits);
            routing.route(logits, &bias);
            routing.build_plan();
        },
        warmup, reps, budget_s);
    // logits, ids, weights, and the plan (counts, offsets, slot_row, row_token, row_slot).
    r.switchyard_bytes = routing.bytes();

    std::vector<uint8_t> dispatch, combine;
    r.seed_ms = median_ms_adaptive(
        [&] {
            router_logits(w, x, logits);
            seed_probs(cfg, logits, T, probs);
            routing.route(logits, &bias);
            routing.build_plan();  // gives each pair's location c
            r.seed_capacity = seed_onehot(cfg, routing, dispatch, combine);
        },
        warmup, reps, budget_s);
    r.seed_onehot_bytes = 2 * static_cast<size_t>(T * cfg.num_experts * r.seed_capacity) * dtype_size(cfg.dtype);
    return r;
}

double layer_flops(const MoEConfig& cfg, int64_t T, int64_t kept_rows) {
    const double H = static_cast<double>(cfg.hidden_size), F = static_cast<double>(cfg.ffn_size);
    const double E = static_cast<double>(cfg.num_experts), S = static_cast<double>(cfg.shared_width());
    const double r13 = static_cast<double>(cfg.w13_rows());
    const double rs = is_gated(cfg.activation) ? 2 * S : S;
    const double t = static_cast<double>(T);
    return 2 * t * H * E + 2 * static_cast<double>(kept_rows) * (H * r13 + F * H) + 2 * t * (H * rs + S * H);
}

double layer_bytes(const MoEConfig& cfg, int64_t T, int64_t experts_hit, DType wdt) {
    const double H = static_cast<double>(cfg.hidden_size), F = static_cast<double>(cfg.ffn_size);
    const double E = static_cast<double>(cfg.num_experts), S = static_cast<double>(cfg.shared_width());
    const double r13 = static_cast<double>(cfg.w13_rows());
    const double rs = is_gated(cfg.activation) ? 2 * S : S;
    const double ws = static_cast<double>(dtype_size(wdt)), as = static_cast<double>(dtype_size(cfg.dtype));
    return ws * (E * H + static_cast<double>(experts_hit) * (r13 * H + H * F) + rs * H + H * S) +
           as * 2 * static_cast<double>(T) * H;
}

size_t gpu_budget_bytes(const MoEConfig& cfg, int64_t T) {
    return static_cast<size_t>(T * cfg.top_k * (2 * cfg.hidden_size + 3 * cfg.ffn_size)) * dtype_size(cfg.dtype);
}
size_t gpu_fused_goal_bytes(const MoEConfig& cfg, int64_t T) {
    return static_cast<size_t>(T * cfg.top_k * (cfg.hidden_size + cfg.ffn_size)) * dtype_size(cfg.dtype);
}

double measure_host_bandwidth_gbs() {
    const size_t n = size_t(128) << 20;
    std::vector<char> a(n, 1), b(n, 0);
    double ms = median_ms(
        [&] {
#pragma omp parallel
            {
                const int nt = omp_get_num_threads(), id = omp_get_thread_num();
                const size_t chunk = (n + nt - 1) / nt, lo = std::min(n, chunk * id), hi = std::min(n, lo + chunk);
                if (hi > lo) std::memcpy(b.data() + lo, a.data() + lo, hi - lo);
            }
        },
        1, 5);
    return 2.0 * static_cast<double>(n) / (ms * 1e-3) / 1e9;  // read + write
}

double measure_cpu_gemm_gflops() {
    const int64_t m = 256, kk = 1024, nn = 1024;
    std::vector<uint8_t> a = io::random_values(DType::kF32, m * kk, -1, 1, 7);
    std::vector<uint8_t> bw = io::random_values(DType::kF32, nn * kk, -1, 1, 8);
    std::vector<float> c(static_cast<size_t>(m * nn));
    const TensorRef at(a.data(), DType::kF32, {m, kk}), bt(bw.data(), DType::kF32, {nn, kk}),
        ct(c.data(), DType::kF32, {m, nn});
    double ms = median_ms([&] { grouped_gemm(at, bt, TensorRef(), ct, nullptr, 0); }, 1, 5);
    return 2.0 * static_cast<double>(m * nn * kk) / (ms * 1e-3) / 1e9;
}

std::string human_bytes(double b) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    int u = 0;
    while (b >= 1024 && u < 5) {
        b /= 1024;
        ++u;
    }
    char buf[64];
    std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.2f %s", b, units[u]);
    return buf;
}

}  // namespace cli
}  // namespace switchyard
