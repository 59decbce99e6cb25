// tools/switchyard/bench.cpp: `switchyard bench`: times the layer for given shapes and token counts.
//
// For each (shape, T): seeded random weights and inputs; the whole layer (MoELayer::forward) and each stage;
// the dense baseline when --impl dense|both (skipped, with the bytes it would need, past --dense-limit-gib).
// CPU: host wall clock, median of --reps runs after --warmup runs, stages from stages.h.
// CUDA (bench_cuda.h): weights generated on the GPU; CUDA events around each forward on inputs rotated past L2,
// median; the same forward replayed from a CUDA graph (--graph); the stage breakdown with an event after each
// stage (each stage is also an NVTX range for Nsight); the routing read back once for the floor; the workspace
// (all memory a forward uses beyond x, y and the weights) reported as the peak extra memory.
// Beside each time: the floor
// max(FLOPs / rate, bytes / bandwidth), FLOPs counting the kept rows and bytes the weights of the experts that
// receive a row plus x and y once (stages.h). Rates: --peak-tflops / --peak-gbps when given; otherwise
// measured on the CPU (ref::gemm_nt's rate and an OpenMP memcpy: "what this backend can reach", not the
// chip's peak), and DESIGN.md's H100 ceilings (785 TFLOP/s bf16, 3.0 TB/s) on CUDA.
// FP8 experts (--quant fp8-block|fp8-tensor, issue 13): the same random float weights (same seeds), quantised by the
// rules of `switchyard quantize` -- on the GPU (cuda/quantize_fill.h; the float copies freed, and the first and last
// matrix of each weight checked bit for bit against the host recipe unless --no-quant-check) or on the host (CPU) --
// and an FP8 MoELayer timed the same way. Its floor: bytes = the router gate in the layer dtype, e4m3 codes (1 byte an
// element) and fp32 scales of the experts hit and the shared expert, x and y; FLOPs = the router's at the bf16 rate
// plus the experts' at the FP8 rate: --peak-tflops-fp8 when given, else on CUDA a cuBLASLt FP8 GEMM of 8192^3
// measured in this run (the faster of fast accumulation off and on), else (CPU) the CPU GEMM rate. The JSON says
// which rate and where it came from (rate_tflops_fp8, rate_source_fp8).
// --json FILE writes every number.
#include <cmath>
#include <cstdio>
#include <memory>
#include <tuple>
#include <nlohmann/json.hpp>
#include <sstream>

#include "switchyard/baseline.h"
#include "bench_cuda.h"
#include "bench_quant.h"
#include "cli_common.h"
#include "commands.h"
#include "io/file_util.h"
#include "io/weights.h"
#include "shapes.h"
#include "stages.h"
#include "switchyard/error.h"

#ifdef SWITCHYARD_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/probe.h"
#endif

namespace switchyard {
namespace cli {

namespace {

struct BenchOptions {
    LayerFlags layer;
    std::string shape;  // named shape (shapes.h); else the layer flags
    std::vector<int64_t> tokens = {16, 64, 256};
    std::string device = "cpu";
    std::string impl = "sparse";
    int warmup = 1, reps = 5;
    double peak_tflops = 0, peak_gbps = 0;
    double dense_limit_gib = 4.0;
    std::string json;
    uint64_t seed = 1;
    bool graph = true;    // CUDA: also time graph replays
    bool stages = true;   // CUDA: also time each stage
    int64_t fused_max_tokens = -1;  // CUDA: MoELayer::set_fused_max_tokens (-1: automatic, the layer's default)
    std::string gather_in_gemm1 = "auto";  // MoELayer::set_gather_in_gemm1: auto | on | off
    std::string quant = "none";     // none | fp8-block | fp8-tensor: FP8 experts from the random float weights
    double peak_tflops_fp8 = 0;     // FP8 matrix rate of the floor (0: measured)
    bool quant_check = true;        // CUDA: check the GPU quantiser against the host recipe on sampled matrices
};

// The rates of the floors: bf16 (or the layer dtype's) matrix rate, FP8 matrix rate (FP8 layers), bandwidth.
struct Rates {
    double tflops = 0, tflops_fp8 = 0, gbps = 0;
};


void record_dense(const DenseResult& d, double ms, nlohmann::ordered_json& r) {
    r["dense_ran"] = d.ran;
    r["dense_bytes_needed"] = d.bytes_needed;
    r["dense_capacity"] = d.capacity;
    if (d.ran) {
        r["dense_ms"] = ms;
        std::printf("  dense  %10.3f ms  (arena %s, C=%lld)\n", ms, human_bytes(double(d.bytes_needed)).c_str(),
                    static_cast<long long>(d.capacity));
    } else {
        r["dense_reason"] = d.reason;
        std::printf("  dense  not run: %s\n", d.reason.c_str());
    }
}

// Floor of one run from the routing actually used: FLOPs over the kept rows, bytes of the experts hit. FP8 layers:
// the router's FLOPs at rates.tflops, the experts' (routed and shared) at rates.tflops_fp8; bytes fp8_layer_bytes.
nlohmann::ordered_json floor_entry(const MoEConfig& cfg, int64_t T, int64_t kept, int64_t hit, DType wdt,
                                   const Rates& rates, double* floor_ms) {
    const bool fp8 = cfg.quant_mode != QuantMode::kNone;
    const double flops = layer_flops(cfg, T, kept);
    const double router_flops = 2.0 * static_cast<double>(T) * static_cast<double>(cfg.hidden_size) *
                                static_cast<double>(cfg.num_experts);
    const double bytes = fp8 ? fp8_layer_bytes(cfg, T, hit) : layer_bytes(cfg, T, hit, wdt);
    const double compute_s = fp8 ? router_flops / (rates.tflops * 1e12) + (flops - router_flops) / (rates.tflops_fp8 * 1e12)
                                 : flops / (rates.tflops * 1e12);
    const double memory_s = bytes / (rates.gbps * 1e9);
    *floor_ms = std::max(compute_s, memory_s) * 1e3;
    nlohmann::ordered_json r;
    r["tokens"] = T;
    r["flops"] = flops;
    if (fp8) r["flops_fp8"] = flops - router_flops;  // of `flops`, those at the FP8 rate (all but the router's)
    r["bytes"] = bytes;
    r["kept_rows"] = kept;
    r["experts_hit"] = hit;
    r["floor_ms"] = *floor_ms;
    r["floor_bound"] = compute_s >= memory_s ? "compute" : "memory";
    std::printf("T=%-6lld floor %.4f ms (%.3g GFLOP, %s, %lld experts hit)\n", static_cast<long long>(T), *floor_ms,
                flops / 1e9, human_bytes(bytes).c_str(), static_cast<long long>(hit));
    return r;
}

void bench_cpu(const BenchOptions& o, const MoEConfig& cfg, const Rates& rates, nlohmann::ordered_json& j) {
    io::OwnedWeights w = io::random_weights(cfg, o.seed);
    if (!cfg.use_score_bias) w.w.score_bias = TensorRef();
    if (cfg.quant_mode != QuantMode::kNone) quantize_owned_weights(w, cfg.quant_mode);  // io/quantize.h's recipe
    for (int64_t T : o.tokens) {
        const int64_t H = cfg.hidden_size;
        std::vector<uint8_t> x = random_input(cfg.dtype, T, H, o.seed + static_cast<uint64_t>(T));
        std::vector<uint8_t> y(x.size());
        TensorRef xh = io::host_tensor(x.data(), cfg.dtype, {T, H}), yh = io::host_tensor(y.data(), cfg.dtype, {T, H});
        // Routing statistics (host reference) for the floor: kept rows and experts hit.
        LoadStats st;
        {
            ForwardOutputs out;
            out.stats = &st;
            MoELayer(cfg, w.w).forward(xh, yh, &out);
        }
        int64_t kept = 0, hit = 0;
        for (int64_t c : st.kept_counts) kept += c, hit += c > 0;
        double floor_ms = 0;
        nlohmann::ordered_json r = floor_entry(cfg, T, kept, hit, w.w.w13.dtype, rates, &floor_ms);
        if (o.impl != "dense") {
            MoELayer layer(cfg, w.w);
            const double ms = median_ms([&] { layer.forward(xh, yh); }, o.warmup, o.reps);
            StageTimes s = time_cpu_stages(cfg, w.w, xh, o.warmup, o.reps);
            r["stages_ms"] = {{"router", s.router_ms},   {"plan", s.plan_ms},     {"dispatch", s.dispatch_ms},
                              {"experts", s.experts_ms}, {"shared", s.shared_ms}, {"combine", s.combine_ms},
                              {"sum", s.total_ms()}};
            std::printf(
                "  sparse %10.3f ms  (%5.1f%% of floor)  stages: router %.3f, plan %.3f, dispatch %.3f, "
                "experts %.3f, shared %.3f, combine %.3f ms\n",
                ms, 100 * floor_ms / ms, s.router_ms, s.plan_ms, s.dispatch_ms, s.experts_ms, s.shared_ms,
                s.combine_ms);
            r["sparse_ms"] = ms;
            r["sparse_pct_of_floor"] = ms > 0 ? 100 * floor_ms / ms : 0.0;
        }
        if (o.impl != "sparse") {
            const size_t limit = static_cast<size_t>(o.dense_limit_gib * double(1ull << 30));
            DenseResult d = dense_forward_cpu(cfg, w.w, xh, yh, limit);  // once: refused runs are not repeated
            double ms = 0;
            if (d.ran) ms = median_ms([&] { d = dense_forward_cpu(cfg, w.w, xh, yh, limit); }, o.warmup, o.reps);
            record_dense(d, ms, r);
        }
        j["runs"].push_back(r);
    }
}

#ifdef SWITCHYARD_WITH_CUDA
GatherInGemm1 gather_mode(const std::string& mode) {
    return mode == "on" ? GatherInGemm1::kOn : mode == "off" ? GatherInGemm1::kOff : GatherInGemm1::kAuto;
}

// Returns false when the check of the GPU quantiser found a difference (the runs are still timed and recorded).
bool bench_cuda(const BenchOptions& o, const MoEConfig& cfg, const Rates& rates, nlohmann::ordered_json& j) {
    bool ok = true;
    DeviceWeights dw;
    if (cfg.quant_mode == QuantMode::kNone) {
        dw = random_device_weights(cfg, o.seed);
    } else {
        Fp8QuantCheck qc;
        const double t0 = now_seconds();
        dw = random_device_weights_fp8(cfg, o.seed, o.quant_check, &qc);
        nlohmann::ordered_json q;
        q["seconds"] = now_seconds() - t0;  // generation, quantisation and the host check
        q["checked"] = o.quant_check;
        if (o.quant_check) {
            q["matrices"] = qc.matrices;
            q["elements"] = qc.elements;
            q["code_mismatches"] = qc.code_mismatches;
            q["scale_mismatches"] = qc.scale_mismatches;
            q["ok"] = qc.ok();
            if (!qc.first_mismatch.empty()) q["first_mismatch"] = qc.first_mismatch;
            ok = qc.ok();
            std::printf("quantisation (%s, GPU) vs the host recipe on %lld matrices (%lld codes): %s%s%s\n",
                        to_string(cfg.quant_mode), static_cast<long long>(qc.matrices),
                        static_cast<long long>(qc.elements), ok ? "bit for bit equal" : "MISMATCH: ",
                        qc.first_mismatch.c_str(),
                        ok ? "" : (" (" + std::to_string(qc.code_mismatches) + " codes, " +
                                   std::to_string(qc.scale_mismatches) + " scales)").c_str());
        }
        j["quant_check"] = q;
    }
    for (int64_t T : o.tokens) {
        nlohmann::ordered_json r;
        double floor_ms = 0;
        if (o.impl != "dense") {
            const CudaLayerTiming t = time_cuda_layer(cfg, dw.w, T, o.warmup, o.reps, o.seed + T, o.graph, o.stages,
                                                      o.fused_max_tokens, gather_mode(o.gather_in_gemm1));
            r = floor_entry(cfg, T, t.kept_rows, t.experts_hit, dw.w.w13.dtype, rates, &floor_ms);
            r["sparse_ms"] = t.eager_ms;
            r["sparse_pct_of_floor"] = t.eager_ms > 0 ? 100 * floor_ms / t.eager_ms : 0.0;
            r["workspace_bytes"] = t.workspace_bytes;
            r["input_copies"] = t.input_copies;
            r["path"] = t.fused ? "fused" : "staged";
            r["gather_in_gemm1"] = t.gathered_in_gemm1;
            std::printf("  sparse %10.4f ms eager (%5.1f%% of floor, %s path%s)", t.eager_ms,
                        100 * floor_ms / t.eager_ms, t.fused ? "fused" : "staged",
                        t.gathered_in_gemm1 ? ", x gathered in GEMM1" : "");
            if (o.graph) {
                r["graph_ms"] = t.graph_ms;
                r["graph_pct_of_floor"] = t.graph_ms > 0 ? 100 * floor_ms / t.graph_ms : 0.0;
                std::printf(", %.4f ms graph (%5.1f%%)", t.graph_ms, 100 * floor_ms / t.graph_ms);
            }
            std::printf(", workspace %s\n", human_bytes(double(t.workspace_bytes)).c_str());
            if (!t.stages.empty()) {
                nlohmann::ordered_json sj;
                double sum = 0;
                std::printf("  stages:");
                for (const auto& [name, ms] : t.stages) {
                    sj[name] = ms;
                    sum += ms;
                    std::printf(" %s %.4f", name.c_str(), ms);
                }
                sj["sum"] = sum;
                std::printf(" ms\n");
                r["stages_ms"] = sj;
            }
        } else {
            r["tokens"] = T;
        }
        if (o.impl != "sparse") {
            const size_t limit = static_cast<size_t>(o.dense_limit_gib * double(1ull << 30));
            std::vector<DeviceBuffer> keep;
            const int64_t H = cfg.hidden_size;
            std::vector<uint8_t> x = random_input(cfg.dtype, T, H, o.seed + static_cast<uint64_t>(T));
            TensorRef xd = to_device(io::host_tensor(x.data(), cfg.dtype, {T, H}), keep);
            TensorRef yd = to_device(io::host_tensor(x.data(), cfg.dtype, {T, H}), keep);
            DenseResult d = dense_forward_cuda(cfg, dw.w, xd, yd, limit);
            double ms = 0;
            if (d.ran)
                ms = median_ms([&] { d = dense_forward_cuda(cfg, dw.w, xd, yd, limit); }, o.warmup, o.reps,
                               [] { device_synchronize(); });
            record_dense(d, ms, r);
        }
        j["runs"].push_back(r);
    }
    return ok;
}

// The FP8 matrix ceiling of this device: cuBLASLt FP8 GEMM 8192^3, fast accumulation off and on (the faster one is
// the ceiling). Throws when the probe fails.
double measure_fp8_tflops(nlohmann::ordered_json& probe) {
    const cuda::ProbeResult off = cuda::probe_fp8_gemm(8192, 20, false);
    const cuda::ProbeResult on = cuda::probe_fp8_gemm(8192, 20, true);
    probe["n"] = 8192;
    probe["fast_accum_off_tflops"] = off.rate;
    probe["fast_accum_on_tflops"] = on.rate;
    return std::max(off.rate, on.rate);
}
#endif

int run_bench(const BenchOptions& o) {
    const Device dev = parse_device(o.device);
    MoEConfig cfg = o.shape.empty() ? make_config(o.layer) : named_shape(o.shape, parse_activation_dtype(o.layer.dtype));
    cfg.gate_up_interleaved = o.layer.gate_up_interleaved;  // a named shape keeps the layout flag
    cfg.validate();
    SWITCHYARD_CHECK(o.impl == "sparse" || o.impl == "dense" || o.impl == "both",
                     "--impl must be sparse, dense or both, got '", o.impl, "'");
    SWITCHYARD_CHECK(!cfg.gate_up_interleaved || o.impl == "sparse",
                     "--gate-up-interleaved times the sparse layer only (the dense baseline reads the plain layout); "
                     "pass --impl sparse");
    SWITCHYARD_CHECK(o.reps > 0 && o.warmup >= 0, "--reps must be > 0 and --warmup >= 0");
    require_finite(o.peak_tflops, "--peak-tflops");
    require_finite(o.peak_gbps, "--peak-gbps");
    for (int64_t t : o.tokens) SWITCHYARD_CHECK(t >= 0, "--tokens entries must be >= 0, got ", t);
    require_finite(o.peak_tflops_fp8, "--peak-tflops-fp8");
    cfg.quant_mode = parse_quant_mode(o.quant);
    const bool fp8 = cfg.quant_mode != QuantMode::kNone;
    SWITCHYARD_CHECK(!fp8 || o.impl == "sparse", "--quant ", o.quant,
                     " times the sparse layer only (the dense baseline has no FP8 path): use --impl sparse");
    SWITCHYARD_CHECK(!fp8 || o.peak_tflops_fp8 >= 0, "--peak-tflops-fp8 must be >= 0");
    cfg.validate();

    double tflops = o.peak_tflops, gbps = o.peak_gbps;
    std::string rate_src;
    if (tflops <= 0 || gbps <= 0) {
        if (dev == Device::kCPU) {
            if (tflops <= 0) tflops = measure_cpu_gemm_gflops() / 1e3;
            if (gbps <= 0) gbps = measure_host_bandwidth_gbs();
            rate_src = "measured on this host (ref::gemm_nt rate, OpenMP memcpy)";
        } else {
            if (tflops <= 0) tflops = 785;
            if (gbps <= 0) gbps = 3000;
            rate_src = "DESIGN.md's H100 SXM ceilings";
#ifdef SWITCHYARD_WITH_CUDA
            cudaDeviceProp p;
            if (cudaGetDeviceProperties(&p, 0) == cudaSuccess && std::string(p.name).find("H100") == std::string::npos)
                rate_src +=
                    std::string("; this device is ") + p.name + ": pass --peak-tflops/--peak-gbps for its own ceilings";
#endif
        }
    } else {
        rate_src = "given by flags";
    }

    // FP8 layers: the FP8 matrix rate of the experts' FLOPs.
    double tflops_fp8 = 0;
    std::string rate_src_fp8;
    nlohmann::ordered_json fp8_probe;
    if (fp8) {
        if (o.peak_tflops_fp8 > 0) {
            tflops_fp8 = o.peak_tflops_fp8;
            rate_src_fp8 = "given by --peak-tflops-fp8";
        } else if (dev == Device::kCPU) {
            tflops_fp8 = tflops;
            rate_src_fp8 = "the CPU rate above (the CPU backend computes the FP8 recipe in floating point)";
        } else {
#ifdef SWITCHYARD_WITH_CUDA
            try {
                tflops_fp8 = measure_fp8_tflops(fp8_probe);
                rate_src_fp8 = "cuBLASLt FP8 (e4m3, per-tensor scales, bf16 out) GEMM 8192^3 measured in this run";
            } catch (const std::exception& e) {
                tflops_fp8 = 2 * tflops;
                rate_src_fp8 = std::string("2x the bf16 rate (the cuBLASLt FP8 probe failed: ") +
                               one_line_message(e) + "); pass --peak-tflops-fp8";
                fp8_probe["error"] = one_line_message(e);
            }
#endif
        }
    }

    std::printf("bench: %s on %s; rates %.3f TFLOP/s, %.1f GB/s (%s); median of %d after %d warm-up\n",
                cfg.to_string().c_str(), to_string(dev), tflops, gbps, rate_src.c_str(), o.reps, o.warmup);
    if (fp8) std::printf("bench: FP8 rate %.4g TFLOP/s (%s)\n", tflops_fp8, rate_src_fp8.c_str());
    nlohmann::ordered_json j;
    j["config"] = cfg.to_string();
    j["device"] = to_string(dev);
    j["rate_tflops"] = tflops;
    j["bandwidth_gbs"] = gbps;
    j["rate_source"] = rate_src;
    j["quant"] = to_string(cfg.quant_mode);
    if (fp8) {
        j["rate_tflops_fp8"] = tflops_fp8;
        j["rate_source_fp8"] = rate_src_fp8;
        if (!fp8_probe.empty()) j["fp8_probe"] = fp8_probe;
        j["floor_rule"] = "max(router FLOPs / rate_tflops + expert FLOPs / rate_tflops_fp8, bytes / bandwidth); "
                          "bytes: gate (layer dtype) + e4m3 codes and fp32 scales of the experts hit and the shared "
                          "expert + x + y";
    }
    j["warmup"] = o.warmup;
    j["reps"] = o.reps;
    j["runs"] = nlohmann::ordered_json::array();
    const Rates rates{tflops, tflops_fp8, gbps};
    bool ok = true;
    if (dev == Device::kCUDA) {
#ifdef SWITCHYARD_WITH_CUDA
        ok = bench_cuda(o, cfg, rates, j);
#endif
    } else {
        bench_cpu(o, cfg, rates, j);
    }
    if (!o.json.empty()) {
        std::string text = j.dump(1) + "\n";
        io::write_file_atomic(o.json, [&](std::ostream& os) { os << text; });
    }
    if (!ok) {
        std::fprintf(stderr, "switchyard: bench: the GPU quantisation differs from the host recipe (quant_check in "
                             "the JSON); the timings are recorded but the weights are not what `switchyard quantize` "
                             "would make\n");
        return kExitFailure;
    }
    return kExitOk;
}

}  // namespace

void add_bench(CLI::App& app, int* exit_code) {
    auto o = std::make_shared<BenchOptions>();
    // default layer: H, F, E, k
    std::tie(o->layer.hidden, o->layer.ffn, o->layer.experts, o->layer.top_k) = std::make_tuple(512, 1792, 8, 2);
    CLI::App* sub = app.add_subcommand("bench", "time the layer (and its CPU stages) beside its floor");
    sub->add_option("--shape", o->shape,
                    "named shape: mixtral | qwen3 | deepseek-v3 | small | small-many "
                    "(overrides the size/routing flags; --dtype still applies)");
    sub->add_option("--top-k", o->layer.top_k, "experts per token k")->capture_default_str();
    sub->add_option("--tokens", o->tokens, "token counts (space or comma separated)")
        ->delimiter(',')
        ->capture_default_str();
    sub->add_option("--device", o->device, "cpu | cuda")->capture_default_str();
    sub->add_option("--impl", o->impl, "sparse | dense | both")->capture_default_str();
    sub->add_option("--warmup", o->warmup, "warm-up runs")->capture_default_str();
    sub->add_option("--reps", o->reps, "timed runs (median reported)")->capture_default_str();
    sub->add_option("--peak-tflops", o->peak_tflops, "matrix rate for the floor (default: measured / DESIGN.md)");
    sub->add_option("--peak-gbps", o->peak_gbps, "memory bandwidth for the floor (default: measured / DESIGN.md)");
    sub->add_option("--quant", o->quant,
                    "none | fp8-block | fp8-tensor: FP8 experts (W8A8) quantised from the random float weights by "
                    "`switchyard quantize`'s rules (on the GPU with --device cuda)")
        ->capture_default_str();
    sub->add_option("--peak-tflops-fp8", o->peak_tflops_fp8,
                    "FP8 matrix rate of an FP8 layer's floor (default: cuBLASLt FP8 GEMM measured on CUDA, the CPU "
                    "rate on the CPU)");
    sub->add_flag("--quant-check,!--no-quant-check", o->quant_check,
                  "CUDA --quant: check the GPU quantiser bit for bit against the host recipe on the first and last "
                  "matrix of each weight (default on)");
    sub->add_option("--dense-limit-gib", o->dense_limit_gib, "memory limit of the dense baseline")
        ->capture_default_str();
    sub->add_option("--seed", o->seed, "seed of weights and inputs")->capture_default_str();
    sub->add_option("--json", o->json, "write every number to this JSON file");
    sub->add_flag("--graph,!--no-graph", o->graph, "CUDA: also time CUDA-graph replays (default on)");
    sub->add_flag("--stages,!--no-stages", o->stages, "CUDA: also time each stage with events (default on)");
    sub->add_option("--fused-max-tokens", o->fused_max_tokens,
                    "CUDA: the fused small-batch path: -1 automatic (the layer's default, stages.h "
                    "fused_path_preferred), 0 never, N whenever T <= N (at most 64)")
        ->capture_default_str();
    sub->add_option("--gather-in-gemm1", o->gather_in_gemm1,
                    "CUDA, interleaved gate/up layout: GEMM1 reads x's rows through the plan instead of a gathered "
                    "copy: auto (the layer's default, stages.h gather_in_gemm1_preferred: few rows per expert), on, "
                    "off (the separate gather)")
        ->check(CLI::IsMember({"auto", "on", "off"}))
        ->capture_default_str();
    add_layer_flags(sub, o->layer, /*random_weights=*/true);
    sub->callback([o, exit_code] { *exit_code = run_bench(*o); });
}

}  // namespace cli
}  // namespace switchyard
