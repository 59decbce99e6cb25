// tools/switchyard/check.cpp: `switchyard check`: one seeded random config (weights uniform(+-1/sqrt(in)) in the
// layer dtype, inputs uniform(-1, 1)) through every backend this build and machine have, each compared with the
// CPU reference (MoELayer on the CPU backend, double accumulation):
//   cpu         MoELayer on the host (the API layer's validation and orchestration)
//   dense-cpu   the seed's dense GShard baseline on the host (src/baseline/dense.h)
//   cuda        MoELayer on the GPU (when built with CUDA and a device is visible)
// Tolerance per element: |got - ref| <= atol * max|ref| + rtol * |ref|, defaults from the dtype's unit roundoff
// u (fp32 2^-24, bf16 2^-8, fp16 2^-11): rtol = atol = 128u for fp32 on the host (products are exact in
// double there; what differs is the order of fp32 roundings), 1024u for fp32 on the GPU (fp32 accumulation
// over up to max(H, F) terms), and 4u for bf16/fp16 (a value stored in the dtype may land one unit away after
// a different-but-correct accumulation, plus the dense baseline's two extra roundings). --rtol/--atol override.
// Prints max abs / relative error and PASS/FAIL per backend; exit code 1 when any backend fails.
#include <cmath>
#include <cstdio>
#include <memory>
#include <tuple>

#include "switchyard/baseline.h"
#include "cli_common.h"
#include "commands.h"
#include "io/npy.h"
#include "io/weights.h"
#include "switchyard/error.h"

namespace switchyard {
namespace cli {

namespace {

struct CheckOptions {
    LayerFlags layer;
    int64_t tokens = 64;
    uint64_t seed = 1;
    double rtol = -1, atol = -1;
    double dense_limit_gib = 4.0;
    std::string only;  // run only this backend
};

double unit_roundoff(DType t) {
    switch (t) {
        case DType::kBF16:
            return std::ldexp(1.0, -8);
        case DType::kF16:
            return std::ldexp(1.0, -11);
        default:
            return std::ldexp(1.0, -24);
    }
}

struct Result {
    explicit Result(const char* n) : name(n) {}
    std::string name;
    double got_first_bad = 0;
    bool ran = false;
    std::string note;
    Compare cmp;
    double rtol = 0, atol = 0;
    double ms = 0;
};

// The table of backends against the reference, with the first element out of tolerance of each failure; true when
// every backend that ran passed.
bool print_results(const std::vector<Result>& results, const std::vector<float>& ref, double ref_ms, int64_t T,
                   int64_t H) {
    std::printf("  %-10s %12s %12s %10s %10s %9s  %s\n", "backend", "max_abs", "max_rel", "rtol", "atol*max", "ms",
                "result");
    std::printf("  %-10s %12s %12s %10s %10s %9.2f  %s\n", "reference", "-", "-", "-", "-", ref_ms,
                "(oracle, max|y| below)");
    bool ok = true;
    for (const Result& r : results) {
        if (!r.ran) {
            std::printf("  %-10s %12s %12s %10s %10s %9s  SKIP (%s)\n", r.name.c_str(), "-", "-", "-", "-", "-",
                        r.note.c_str());
            continue;
        }
        bool pass = r.cmp.num_bad == 0 && !r.cmp.nonfinite;
        ok = ok && pass;
        std::printf("  %-10s %12.3e %12.3e %10.2e %10.2e %9.2f  %s\n", r.name.c_str(), r.cmp.max_abs, r.cmp.max_rel,
                    r.rtol, r.atol * r.cmp.ref_max, r.ms, pass ? "PASS" : "FAIL");
        if (!pass) {
            int64_t i = r.cmp.first_bad;
            std::printf(
                "             %lld of %lld elements out of tolerance; first at [t=%lld, h=%lld]: got %.9g, expected "
                "%.9g\n",
                static_cast<long long>(r.cmp.num_bad), static_cast<long long>(T * H),
                static_cast<long long>(i / std::max<int64_t>(H, 1)),
                static_cast<long long>(i % std::max<int64_t>(H, 1)), r.got_first_bad, static_cast<double>(ref[i]));
        }
    }
    double ref_max = 0;
    for (float v : ref) ref_max = std::max(ref_max, static_cast<double>(std::fabs(v)));
    std::printf("  max|y_ref| = %.6g; %s\n", ref_max, ok ? "all backends PASS" : "FAILED");
    return ok;
}

int run_check(const CheckOptions& o) {
    MoEConfig cfg = make_config(o.layer);
    SWITCHYARD_CHECK(o.tokens >= 0, "--tokens must be >= 0, got ", o.tokens);
    cfg.validate();
    const int64_t T = o.tokens, H = cfg.hidden_size;
    io::OwnedWeights w = io::random_weights(cfg, o.seed);
    if (!cfg.use_score_bias) w.w.score_bias = TensorRef();
    std::vector<uint8_t> x = random_input(cfg.dtype, T, H, o.seed ^ 0x5eedull);
    TensorRef xh = io::host_tensor(x.data(), cfg.dtype, {T, H});

    std::printf("check: %s, T=%lld, seed=%llu\n", cfg.to_string().c_str(), static_cast<long long>(T),
                static_cast<unsigned long long>(o.seed));
    std::vector<uint8_t> yref(x.size());
    double t0 = now_seconds();
    MoELayer(cfg, w.w).forward(xh, io::host_tensor(yref.data(), cfg.dtype, {T, H}));
    double ref_ms = (now_seconds() - t0) * 1e3;
    const std::vector<float> ref = to_floats(yref.data(), cfg.dtype, T * H);

    const double u = unit_roundoff(cfg.dtype);
    auto tol_for = [&](bool gpu) {
        double t = cfg.dtype == DType::kF32 ? (gpu ? 1024 : 128) * u : 4 * u;
        return std::make_pair(o.atol >= 0 ? o.atol : t, o.rtol >= 0 ? o.rtol : t);
    };
    std::vector<Result> results;
    auto want = [&](const char* n) { return o.only.empty() || o.only == n; };
    auto finish = [&](Result& r, const std::vector<uint8_t>& y, bool gpu) {
        auto tl = tol_for(gpu);
        r.atol = tl.first;
        r.rtol = tl.second;
        double ref_max = 0;  // atol is a fraction of max|ref|
        for (float v : ref) ref_max = std::max(ref_max, static_cast<double>(std::fabs(v)));
        const std::vector<float> got = to_floats(y.data(), cfg.dtype, T * H);
        r.cmp = compare(got, ref, r.atol * ref_max, r.rtol);
        if (r.cmp.first_bad >= 0) r.got_first_bad = got[r.cmp.first_bad];
        r.ran = true;
    };

    if (want("cpu")) {
        Result r("cpu");
        std::vector<uint8_t> y(x.size());
        MoELayer layer(cfg, w.w);
        t0 = now_seconds();
        layer.forward(xh, io::host_tensor(y.data(), cfg.dtype, {T, H}));
        r.ms = (now_seconds() - t0) * 1e3;
        finish(r, y, false);
        results.push_back(r);
    }
    // The dense GShard baseline is token-choice only and reads w13 in the plain layout: under expert-choice routing or
    // with interleaved gate/up rows there is nothing to compare.
    const bool dense_ok = !cfg.expert_choice() && !cfg.gate_up_interleaved;
    if (want("dense-cpu") && dense_ok) {
        Result r("dense-cpu");
        std::vector<uint8_t> y(x.size());
        t0 = now_seconds();
        DenseResult d = dense_forward_cpu(cfg, w.w, xh, io::host_tensor(y.data(), cfg.dtype, {T, H}),
                                          static_cast<size_t>(o.dense_limit_gib * (1ull << 30)));
        r.ms = (now_seconds() - t0) * 1e3;
        if (d.ran) {
            finish(r, y, false);
        } else {
            r.note = "not run: " + d.reason;
        }
        results.push_back(r);
    }
#ifdef SWITCHYARD_WITH_CUDA
    if (cuda_device_count() > 0) {
        if (want("cuda")) {
            Result r("cuda");
            std::vector<uint8_t> y(x.size());
            DeviceWeights dw = to_device(w.w);
            std::vector<DeviceBuffer> keep;
            TensorRef xd = to_device(xh, keep), yd = to_device(io::host_tensor(y.data(), cfg.dtype, {T, H}), keep);
            MoELayer layer(cfg, dw.w);
            DeviceBuffer ws(layer.workspace_size(T));
            t0 = now_seconds();
            layer.forward(xd, yd, ws.get(), ws.size(), nullptr, nullptr);
            device_synchronize();
            r.ms = (now_seconds() - t0) * 1e3;
            copy_to_host(yd, y.data());
            finish(r, y, true);
            results.push_back(r);
        }
        if (want("dense-cuda") && dense_ok) {
            Result r("dense-cuda");
            std::vector<uint8_t> y(x.size());
            DeviceWeights dw = to_device(w.w);
            std::vector<DeviceBuffer> keep;
            TensorRef xd = to_device(xh, keep), yd = to_device(io::host_tensor(y.data(), cfg.dtype, {T, H}), keep);
            t0 = now_seconds();
            DenseResult d =
                dense_forward_cuda(cfg, dw.w, xd, yd, static_cast<size_t>(o.dense_limit_gib * (1ull << 30)));
            device_synchronize();
            r.ms = (now_seconds() - t0) * 1e3;
            if (d.ran) {
                copy_to_host(yd, y.data());
                finish(r, y, true);
            } else {
                r.note = "not run: " + d.reason;
            }
            results.push_back(r);
        }
    } else {
        std::printf("  (cuda: built with CUDA but no device visible; skipped)\n");
    }
#else
    std::printf("  (cuda: this build has no CUDA backend; skipped)\n");
#endif
    SWITCHYARD_CHECK(!results.empty(), "--only '", o.only,
                     "' names no available backend (cpu, dense-cpu, cuda, dense-cuda)");

    return print_results(results, ref, ref_ms, T, H) ? kExitOk : kExitFailure;
}

}  // namespace

void add_check(CLI::App& app, int* exit_code) {
    auto o = std::make_shared<CheckOptions>();
    // default layer: H, F, E, k
    std::tie(o->layer.hidden, o->layer.ffn, o->layer.experts, o->layer.top_k) = std::make_tuple(256, 512, 8, 2);
    CLI::App* sub = app.add_subcommand("check", "one random config through every backend against the CPU reference");
    sub->add_option("--top-k", o->layer.top_k, "experts per token k")->capture_default_str();
    sub->add_option("--tokens", o->tokens, "tokens T")->capture_default_str();
    sub->add_option("--seed", o->seed, "seed of the random weights and inputs")->capture_default_str();
    sub->add_option("--rtol", o->rtol, "relative tolerance (default: from the dtype, see the source header)");
    sub->add_option("--atol", o->atol, "absolute tolerance as a fraction of max|y_ref| (default: from the dtype)");
    sub->add_option("--dense-limit-gib", o->dense_limit_gib, "memory limit of the dense baseline")
        ->capture_default_str();
    sub->add_option("--only", o->only, "run only this backend: cpu | dense-cpu | cuda | dense-cuda");
    add_layer_flags(sub, o->layer, /*random_weights=*/true);
    sub->callback([o, exit_code] { *exit_code = run_check(*o); });
}

}  // namespace cli
}  // namespace switchyard
