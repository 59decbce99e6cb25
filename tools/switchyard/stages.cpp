// tools/switchyard/stages.cpp: see stages.h.
#include "stages.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "cli_common.h"
#include "io/weights.h"
#include "ref/ref.h"
#include "switchyard/error.h"

namespace switchyard {
namespace cli {

namespace {

ref::MatView expert_view(const TensorRef& t, int64_t e, int64_t rows, int64_t cols) {
    const char* base = static_cast<const char*>(t.data);
    return ref::MatView{base + static_cast<size_t>(e * rows * cols) * dtype_size(t.dtype), t.dtype, rows, cols};
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    size_t n = v.size();
    return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

}  // namespace

StageTimes time_cpu_stages(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, int warmup, int reps,
                           double budget_s) {
    const int64_t T = x.shape[0], H = cfg.hidden_size, E = cfg.num_experts, F = cfg.ffn_size;
    const int64_t r13 = cfg.w13_rows();
    std::vector<double> s[6];
    std::vector<float> yf(static_cast<size_t>(T * H));
    std::vector<uint8_t> y(static_cast<size_t>(T * H) * dtype_size(cfg.dtype));
    double spent = 0;
    for (int it = 0; it < warmup + reps || (spent < budget_s && it < warmup + kMaxAdaptiveReps); ++it) {
        double t0 = now_seconds();
        const std::vector<float> xf = ref::to_float(x);
        const std::vector<float> gate = ref::to_float(w.gate);
        const std::vector<float> logits = ref::router_logits(xf, gate, T, H, E);
        std::vector<float> bias;
        if (cfg.use_score_bias) bias = ref::to_float(w.score_bias);
        std::vector<int32_t> ids;
        std::vector<float> tw;
        ref::route(cfg, logits, bias, T, ids, tw);
        double t1 = now_seconds();
        ref::HostPlan plan = ref::build_plan(cfg, T, ids, tw);
        double t2 = now_seconds();
        const int64_t rows = plan.num_rows();
        std::vector<float> gathered(static_cast<size_t>(rows * H));
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < rows; ++r)
            std::memcpy(gathered.data() + r * H, xf.data() + static_cast<int64_t>(plan.row_token[r]) * H,
                        static_cast<size_t>(H) * sizeof(float));
        double t3 = now_seconds();
        std::vector<float> expert_out(static_cast<size_t>(rows * H));
        for (int64_t e = 0; e < E; ++e) {
            const int64_t b = plan.expert_offsets[e], n = plan.expert_offsets[e + 1] - b;
            if (n == 0) continue;
            ref::expert_mlp(cfg.activation, cfg.dtype, gathered.data() + b * H, n, H, F, expert_view(w.w13, e, r13, H),
                            expert_view(w.w2, e, H, F), expert_out.data() + b * H);
        }
        double t4 = now_seconds();
        std::vector<float> shared;
        if (cfg.num_shared_experts > 0 && T > 0) {
            const int64_t S = cfg.shared_width();
            shared.resize(static_cast<size_t>(T * H));
            ref::expert_mlp(cfg.activation, cfg.dtype, xf.data(), T, H, S,
                            expert_view(w.shared_w13, 0, is_gated(cfg.activation) ? 2 * S : S, H),
                            expert_view(w.shared_w2, 0, H, S), shared.data());
        }
        double t5 = now_seconds();
        ref::combine(plan, expert_out, shared.empty() ? nullptr : shared.data(), H, cfg.dtype, yf.data());
        for (int64_t i = 0; i < T * H; ++i) ref::store_from_float(y.data(), cfg.dtype, i, yf[i]);
        double t6 = now_seconds();
        if (it >= warmup) {
            const double ts[7] = {t0, t1, t2, t3, t4, t5, t6};
            for (int k = 0; k < 6; ++k) s[k].push_back((ts[k + 1] - ts[k]) * 1e3);
            spent += t6 - t0;
        }
    }
    StageTimes r;
    r.router_ms = median(s[0]);
    r.plan_ms = median(s[1]);
    r.dispatch_ms = median(s[2]);
    r.experts_ms = median(s[3]);
    r.shared_ms = median(s[4]);
    r.combine_ms = median(s[5]);
    return r;
}

RouterTimes time_routers_cpu(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, int warmup, int reps,
                             double budget_s) {
    const int64_t T = x.shape[0], H = cfg.hidden_size, E = cfg.num_experts, k = cfg.top_k;
    RouterTimes r;
    const size_t a = dtype_size(cfg.dtype);
    r.switchyard_ms = median_ms_adaptive(
        [&] {
            const std::vector<float> xf = ref::to_float(x);
            const std::vector<float> gate = ref::to_float(w.gate);
            const std::vector<float> logits = ref::router_logits(xf, gate, T, H, E);
            std::vector<float> bias;
            if (cfg.use_score_bias) bias = ref::to_float(w.score_bias);
            std::vector<int32_t> ids;
            std::vector<float> tw;
            ref::route(cfg, logits, bias, T, ids, tw);
            ref::HostPlan plan = ref::build_plan(cfg, T, ids, tw);
            if (plan.num_rows() < 0) std::abort();
        },
        warmup, reps, budget_s);
    // logits, ids, weights, and the plan (counts, offsets, slot_row, row_token, row_slot).
    r.switchyard_bytes = static_cast<size_t>(4 * T * E + 4 * T * k * 2 + 4 * E + 4 * (E + 1) + 3 * 4 * T * k);

    std::vector<uint8_t> dispatch, combine;
    r.seed_ms = median_ms_adaptive(
        [&] {
            const std::vector<float> xf = ref::to_float(x);
            const std::vector<float> gate = ref::to_float(w.gate);
            const std::vector<float> logits = ref::router_logits(xf, gate, T, H, E);
            // probs [T, E]: the seed's softmax (sigmoid for sigmoid routing), fp32
            std::vector<float> probs(logits.size());
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
            std::vector<float> bias;
            if (cfg.use_score_bias) bias = ref::to_float(w.score_bias);
            std::vector<int32_t> ids;
            std::vector<float> tw;
            ref::route(cfg, logits, bias, T, ids, tw);
            ref::HostPlan plan = ref::build_plan(cfg, T, ids, tw);  // gives each pair's location c
            int64_t C = cfg.capacity(T);
            if (C == 0)
                for (int32_t c : plan.expert_counts) C = std::max<int64_t>(C, c);
            r.seed_capacity = C;
            const size_t n = static_cast<size_t>(T * E * C) * a;
            dispatch.assign(n, 0);
            combine.assign(n, 0);
            const uint16_t one16 = cfg.dtype == DType::kBF16 ? float_to_bf16(1.0f) : float_to_half(1.0f);
            for (int64_t t = 0; t < T; ++t)
                for (int64_t j = 0; j < k; ++j) {
                    const int32_t row = plan.slot_row[t * k + j];
                    if (row < 0) continue;
                    const int32_t e = ids[t * k + j];
                    const int64_t c = row - plan.expert_offsets[e];
                    const size_t idx = static_cast<size_t>((t * E + e) * C + c);
                    if (cfg.dtype == DType::kF32) {
                        const float one = 1.0f;
                        std::memcpy(&dispatch[4 * idx], &one, 4);
                    } else {
                        std::memcpy(&dispatch[2 * idx], &one16, 2);
                    }
                    ref::store_from_float(combine.data(), cfg.dtype, static_cast<int64_t>(idx), tw[t * k + j]);
                }
        },
        warmup, reps, budget_s);
    r.seed_onehot_bytes = 2 * static_cast<size_t>(T * E * r.seed_capacity) * a;
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

size_t cpu_sparse_intermediate_bytes(const MoEConfig& cfg, int64_t T, int64_t max_rows) {
    const int64_t H = cfg.hidden_size, E = cfg.num_experts, k = cfg.top_k, F = cfg.ffn_size;
    const int64_t rows = T * k;
    size_t b = 0;
    b += 4 * T * H;                       // x as floats
    b += 4 * E * H;                       // gate as floats
    b += 4 * T * E;                       // logits
    b += 2 * 4 * T * k;                   // ids, weights
    b += 4 * (2 * E + 1) + 3 * 4 * rows;  // counts, offsets, slot_row, row_token, row_slot
    b += 4 * max_rows * H;                // gathered rows of one expert
    b += 4 * rows * H;                    // expert outputs (expert order)
    b += (8 + 4) * max_rows * cfg.w13_rows() + 8 * max_rows * H + 4 * max_rows * F;  // GEMM accumulators, h
    if (cfg.num_shared_experts > 0) b += 4 * T * H;
    b += 4 * T * H;  // y as floats
    return b;
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
    std::vector<double> c(static_cast<size_t>(m * nn));
    ref::MatView b{bw.data(), DType::kF32, nn, kk};
    double ms = median_ms([&] { ref::gemm_nt(reinterpret_cast<const float*>(a.data()), m, kk, b, c.data()); }, 1, 5);
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
