// tools/switchyard/profile.cpp: `switchyard profile`: writes <out>/PROFILE.md and <out>/profile.json.
//
// PROFILE.md follows the seed study's template (/work/shared/seed, DESIGN.md) section by section, every blank
// filled with a number measured or computed in this run:
//   Hardware Configuration   CPU model, cores, OpenMP threads, memory (/proc), measured GEMM rate and memcpy
//                            bandwidth; CUDA backend and device (when built with CUDA)
//   Router Performance       Switchyard's router + routing plan vs the seed's router (gate GEMM, softmax, top-k,
//                            one-hot dispatch/combine [T, E, C]) on the CPU (stages.h)
//   Full MoE Layer           sparse layer vs the dense GShard baseline (src/baseline/dense.h), median of --reps
//   Memory Usage Patterns    bytes of each implementation's intermediates (computed from the formulas of
//                            stages.h and dense.h), and the dense baseline's need at full model sizes against
//                            an 80 GB GPU
//   Identified Bottlenecks   the CPU stage breakdown; the dense baseline's largest tensor
//   Expert Utilization       per-expert counts from the library's router on uniform and Zipf-skewed logits
//                            (Gumbel-max sampling), max/mean, cv, entropy, dropped fraction at capacity factors
//                            1.0, 1.25, 2.0; and the random-weights router of the timed runs
//   Next Steps               the seed's five steps, each with the numbers of this run that motivate it
// profile.json holds every number the text prints (scripts/plot_profile.py --check verifies it). That is the CPU
// report; --device cuda (or auto with a visible GPU) runs the GPU report instead: measurements in profile_gpu.cpp,
// text in profile_report.cpp, rendered from the JSON object only. --render-json re-renders a GPU report from its
// profile.json; --ncu-child is the process `ncu` profiles. Progress goes to stderr (ProgressBar, profile_common.h).
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "switchyard/baseline.h"
#include "cli_common.h"
#include "commands.h"
#include "io/file_util.h"
#include "io/weights.h"
#include "shapes.h"
#include "profile_common.h"
#include "profile_gpu.h"
#include "stages.h"
#include "switchyard/error.h"

#ifdef SWITCHYARD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace switchyard {
namespace cli {

namespace {

struct ProfileOptions {
    std::string out = "report";
    bool quick = false;
    std::vector<std::string> shapes = {"small", "small-many"};
    std::vector<int64_t> tokens = {16, 64, 256};
    std::string device = "auto";
    std::string dtype = "fp32";
    int warmup = 1, reps = 3;
    double dense_limit_gib = 4.0;
    double budget_s = 1.0;
    uint64_t seed = 1;
    bool ncu = false;
    std::string torch = "auto";
    std::string ncu_child;   // hidden: the process ncu profiles
    int64_t ncu_tokens = 0;
    std::string render_json;  // re-render PROFILE.md of a GPU profile.json
    // Which options the command line gave (GPU runs have their own defaults otherwise).
    bool shapes_given = false, tokens_given = false, dtype_given = false, reps_given = false, warmup_given = false;
};

// Aux-loss-free balancing in the utilisation section: batches of kBalanceTokens tokens, kBalanceSteps updates.
constexpr int kBalanceSteps = 300;
constexpr int64_t kBalanceTokens = 512;
constexpr double kBalanceRate = 1e-3;
constexpr double kRouterTargetUs = 15;  // DESIGN.md: router alone at 4096 tokens

std::vector<UtilRow> util_rows(const std::vector<std::string>& names, const std::vector<MoEConfig>& cfgs, int64_t T,
                               uint64_t seed) {
    std::vector<UtilRow> util;
    for (size_t si = 0; si < cfgs.size(); ++si) {
        util.push_back(utilisation(names[si], cfgs[si], "uniform", 0.0, T, seed + 77));
        util.push_back(utilisation(names[si], cfgs[si], "Zipf s=1.0", 1.0, T, seed + 78));
        MoEConfig c = cfgs[si];
        c.num_groups = 1;  // the bias balances experts; group limits would mask its effect
        c.topk_groups = 1;
        util.push_back(utilisation_balanced(names[si], c, 1.0, T, seed + 78, kBalanceSteps, kBalanceRate));
        util.push_back(utilisation(names[si], cfgs[si], "Zipf s=1.5", 1.5, T, seed + 79));
    }
    return util;
}

nlohmann::ordered_json util_json(const std::vector<UtilRow>& util) {
    nlohmann::ordered_json a = nlohmann::ordered_json::array();
    for (const UtilRow& u : util) {
        const double ln_e = std::log(static_cast<double>(std::max<size_t>(2, u.stats.expert_counts.size())));
        a.push_back({{"shape", u.shape},
                     {"logits", u.dist},
                     {"zipf_s", u.zipf_s},
                     {"balanced", u.dist.find("selection bias") != std::string::npos},
                     {"tokens", u.T},
                     {"expert_counts", u.stats.expert_counts},
                     {"max_over_mean", u.stats.max_over_mean()},
                     {"cv", u.stats.cv},
                     {"entropy", u.stats.entropy},
                     {"entropy_over_ln_e", u.stats.entropy / ln_e},
                     {"dropped_fraction",
                      {{"1.0", u.dropped_frac[0]}, {"1.25", u.dropped_frac[1]}, {"2.0", u.dropped_frac[2]}}},
                     {"dropped_pct",
                      {{"1.0", 100 * u.dropped_frac[0]}, {"1.25", 100 * u.dropped_frac[1]},
                       {"2.0", 100 * u.dropped_frac[2]}}}});
    }
    return a;
}

nlohmann::ordered_json constants_json() {
    return {{"capacity_factors", {kCapacityFactors[0], kCapacityFactors[1], kCapacityFactors[2]}},
            {"zipf_s", {1.0, 1.5}},
            {"router_target_us", kRouterTargetUs},
            {"balance_steps", kBalanceSteps},
            {"balance_tokens", kBalanceTokens},
            {"balance_rate", kBalanceRate},
            {"gpu_memory_reference_gb", 80},
            {"design_h100_tflops", 785},
            {"design_h100_tbps", 3.0},
            {"max_adaptive_reps", kMaxAdaptiveReps}};
}

void write_report(const std::string& out, const std::string& text, const std::string& jtext) {
    SWITCHYARD_CHECK(text.find("[To be filled") == std::string::npos, "internal: an unfilled template blank remains");
    io::AtomicFileSet files;
    files.add(out + "/PROFILE.md", [&](std::ostream& os) { os << text; });
    files.add(out + "/profile.json", [&](std::ostream& os) { os << jtext; });
    files.commit();
}

int run_profile_gpu(const ProfileOptions& o, const std::string& cmdline) {
    GpuProfileOptions g;
    g.shapes = o.shapes_given ? o.shapes : std::vector<std::string>{"mixtral", "qwen3", "deepseek-v3"};
    g.tokens = o.tokens_given ? o.tokens : std::vector<int64_t>{16, 256, 4096, 16384};
    if (o.quick && !o.tokens_given) g.tokens = {16, 4096};
    g.dtype = o.dtype_given ? parse_activation_dtype(o.dtype) : DType::kBF16;
    g.reps = o.reps_given ? o.reps : (o.quick ? 10 : 20);
    g.warmup = o.warmup_given ? o.warmup : (o.quick ? 2 : 5);
    g.seed = o.seed;
    g.quick = o.quick;
    g.ncu = o.ncu;
    g.torch = o.torch;
    g.out_dir = o.out;
    g.command = cmdline;
    g.util_tokens = o.quick ? 1024 : 4096;
    {
        char buf[4096];
        const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
        g.self_exe = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "switchyard";
    }
    SWITCHYARD_CHECK(!g.tokens.empty() && !g.shapes.empty(), "--tokens and --shapes must not be empty");
    for (int64_t t : g.tokens) SWITCHYARD_CHECK(t > 0, "--tokens entries must be > 0, got ", t);
    SWITCHYARD_CHECK(g.reps > 0 && g.warmup >= 0, "--reps must be > 0 and --warmup >= 0");
    std::vector<MoEConfig> cfgs;
    for (const auto& s : g.shapes) {
        cfgs.push_back(named_shape(s, g.dtype));
        cfgs.back().validate();
    }
    ProgressBar bar(gpu_profile_steps(g) + 1, now_seconds());
    nlohmann::ordered_json j;
    j["generated"] = now_utc();
    j["command"] = cmdline;
    j["device"] = "cuda";
    j["dtype"] = to_string(g.dtype);
    j["warmup"] = g.warmup;
    j["reps"] = g.reps;
    j["seed"] = g.seed;
    j["constants"] = constants_json();
    j["shape_configs"] = nlohmann::ordered_json::array();
    for (size_t i = 0; i < cfgs.size(); ++i)
        j["shape_configs"].push_back({{"shape", g.shapes[i]}, {"config", cfgs[i].to_string()}});
    nlohmann::ordered_json m = run_gpu_profile(
        g, [&](const std::string& w) { bar.step(w); }, [&](const std::string& w) { bar.note(w); });
    for (auto it = m.begin(); it != m.end(); ++it) j[it.key()] = it.value();
    bar.step("expert utilisation (uniform, Zipf-skewed, selection-bias balancing)");
    j["utilisation"] = util_json(util_rows(g.shapes, cfgs, g.util_tokens, o.seed));
    add_gpu_next_steps(j);
    write_report(o.out, render_gpu_report(j), j.dump(1) + "\n");
    bar.finish();
    std::fprintf(stderr, "profile: wrote %s/PROFILE.md and %s/profile.json (%zu failures recorded)\n", o.out.c_str(),
                 o.out.c_str(), j["failures"].size());
    return kExitOk;
}

std::string fmt(const char* f, double v) { return fmt_num(f, v); }

struct LayerRow {
    std::string shape;
    MoEConfig cfg;
    int64_t T = 0;
    double sparse_ms = 0, dense_ms = 0, floor_ms = 0, flops = 0, bytes = 0;
    bool dense_ran = false;
    std::string dense_reason;
    DenseMemory dense_mem;
    StageTimes stages;
    RouterTimes router;
    size_t sparse_bytes = 0, gpu_budget = 0, gpu_goal = 0;
    LoadStats stats;
};

// Memory of the dense baseline at full model sizes (computed, nothing allocated).
struct FullMem {
    std::string shape;
    int64_t T;
    DenseMemory dm;
    size_t budget, goal;
};
constexpr double kGpuMemoryReferenceBytes = 80e9;

struct HostHardware {
    HostInfo hi;
    std::string loadavg = "unknown";
    double gemm_gflops = 0, bw_gbs = 0;
    std::string gpu_line = "none used (CPU backend)", cuda_line;
    double gpu_mem_gib = 0;
};

// Everything a CPU report prints: the settings of the run and its measurements.
struct CpuProfile {
    const ProfileOptions& o;
    std::string cmdline;
    Device dev = Device::kCPU;
    std::vector<int64_t> tokens;
    int reps = 0, warmup = 0;
    double budget = 0;  // seconds of extra samples per cheap measurement
    std::vector<MoEConfig> cfgs;
    HostHardware hw;
    double tflops = 0, gbs = 0;  // rates of the floors
    std::vector<LayerRow> rows;
    const LayerRow* big = nullptr;  // largest T of the first shape: the headline numbers
    int64_t util_T = 0;
    std::vector<UtilRow> util;
    std::vector<FullMem> full;
};

void make_out_dir(const std::string& out) {
    ::mkdir(out.c_str(), 0755);
    struct stat st;
    SWITCHYARD_CHECK(::stat(out.c_str(), &st) == 0 && S_ISDIR(st.st_mode), "--out '", out,
                     "' is not a folder and cannot be created");
}

// Token counts, repetitions and shapes of a CPU run (--quick trims them).
void resolve_cpu_settings(CpuProfile& p) {
    const ProfileOptions& o = p.o;
    p.tokens = o.tokens;
    p.reps = o.reps;
    p.warmup = o.warmup;
    p.budget = o.quick ? 0.3 : o.budget_s;
    if (o.quick) {
        p.tokens = {16, 64};
        p.reps = std::min(p.reps, 3);
        p.warmup = std::min(p.warmup, 1);
    }
    SWITCHYARD_CHECK(!p.tokens.empty() && !o.shapes.empty(), "--tokens and --shapes must not be empty");
    for (int64_t t : p.tokens) SWITCHYARD_CHECK(t > 0, "--tokens entries must be > 0, got ", t);
    SWITCHYARD_CHECK(p.reps > 0 && p.warmup >= 0, "--reps must be > 0 and --warmup >= 0");
    const DType dtype = parse_activation_dtype(o.dtype);
    for (const auto& s : o.shapes) {
        p.cfgs.push_back(named_shape(s, dtype));
        p.cfgs.back().validate();
    }
}

// Host description, measured CPU GEMM rate and memcpy bandwidth, and the GPU (when the build has CUDA).
HostHardware probe_host_hardware(Device dev) {
    HostHardware h;
    h.hi = host_info();
    {
        std::ifstream la("/proc/loadavg");
        double l1 = 0, l5 = 0, l15 = 0;
        if (la >> l1 >> l5 >> l15) h.loadavg = fmt("%.2f", l1) + " / " + fmt("%.2f", l5) + " / " + fmt("%.2f", l15);
    }
    h.gemm_gflops = measure_cpu_gemm_gflops();
    h.bw_gbs = measure_host_bandwidth_gbs();
    if (!has_cuda_backend()) {
        h.cuda_line = "not built (no nvcc at configure time); CPU backend only";
    } else {
        h.cuda_line = "CUDA backend built; " + std::to_string(cuda_device_count()) + " device(s) visible";
    }
#ifdef SWITCHYARD_WITH_CUDA
    if (cuda_device_count() > 0) {
        cudaDeviceProp p;
        if (cudaGetDeviceProperties(&p, 0) == cudaSuccess) {
            h.gpu_mem_gib = static_cast<double>(p.totalGlobalMem) / double(1ull << 30);
            int rt = 0;
            cudaRuntimeGetVersion(&rt);
            h.gpu_line = std::string(p.name) + ", " + fmt("%.1f GiB", h.gpu_mem_gib) + ", sm_" +
                         std::to_string(p.major) + std::to_string(p.minor) +
                         (dev == Device::kCUDA ? " (full-layer timings below)" : " (not used: --device cpu)");
            h.cuda_line += ", runtime " + std::to_string(rt / 1000) + "." + std::to_string((rt % 1000) / 10);
        }
    }
#else
    (void)dev;
#endif
    return h;
}

// One (shape, T) of the CPU report: the layer's load, floor, sparse and dense times, the CPU stage breakdown, the
// two routers, and the memory of each implementation.
LayerRow measure_cpu_layer(const CpuProfile& p, const std::string& shape, const MoEConfig& cfg,
                           const io::OwnedWeights& w, int64_t T) {
    const ProfileOptions& o = p.o;
    LayerRow r;
    r.shape = shape;
    r.cfg = cfg;
    r.T = T;
    const int64_t H = cfg.hidden_size;
    std::vector<uint8_t> x = random_input(cfg.dtype, T, H, o.seed * 1000 + static_cast<uint64_t>(T));
    std::vector<uint8_t> y(x.size());
    TensorRef xh = io::host_tensor(x.data(), cfg.dtype, {T, H}), yh = io::host_tensor(y.data(), cfg.dtype, {T, H});
    MoELayer layer(cfg, w.w);
    {
        ForwardOutputs out;
        out.stats = &r.stats;
        layer.forward(xh, yh, &out);
    }
    int64_t kept = 0, hit = 0;
    for (int64_t c : r.stats.kept_counts) kept += c, hit += c > 0;
    r.flops = layer_flops(cfg, T, kept);
    r.bytes = layer_bytes(cfg, T, hit, w.w.w13.dtype);
    r.floor_ms = std::max(r.flops / (p.tflops * 1e12), r.bytes / (p.gbs * 1e9)) * 1e3;
    const size_t limit = static_cast<size_t>(o.dense_limit_gib * double(1ull << 30));
    r.sparse_ms = median_ms_adaptive([&] { layer.forward(xh, yh); }, p.warmup, p.reps, p.budget);
    DenseResult d = dense_forward_cpu(cfg, w.w, xh, yh, limit);
    if (d.ran)
        r.dense_ms = median_ms_adaptive([&] { d = dense_forward_cpu(cfg, w.w, xh, yh, limit); }, p.warmup, p.reps,
                                        p.budget);
    r.dense_ran = d.ran;
    r.dense_reason = d.reason;
    r.dense_mem = dense_memory(cfg, T, d.capacity);
    r.stages = time_cpu_stages(cfg, w.w, xh, p.warmup, p.reps, p.budget);
    r.router = time_routers_cpu(cfg, w.w, xh, p.warmup, p.reps, p.budget);
    r.sparse_bytes = layer.workspace_size(T);  // the CPU forward's host workspace (every intermediate)
    r.gpu_budget = gpu_budget_bytes(cfg, T);
    r.gpu_goal = gpu_fused_goal_bytes(cfg, T);
    return r;
}

// The dense baseline's need at full model sizes (bf16, capacity factor 1.0: its best case), and Switchyard's budget.
std::vector<FullMem> full_size_memory() {
    std::vector<FullMem> full;
    for (const char* s : {"mixtral", "qwen3", "deepseek-v3"}) {
        MoEConfig c = named_shape(s, DType::kBF16);
        for (int64_t T : {int64_t(16), int64_t(4096), int64_t(16384)}) {
            MoEConfig c1 = c;
            c1.capacity_factor = 1.0;  // the dense baseline's best case: capacity of a perfectly even routing
            full.push_back(
                {s, T, dense_memory(c1, T, c1.capacity(T)), gpu_budget_bytes(c, T), gpu_fused_goal_bytes(c, T)});
        }
    }
    return full;
}

void render_cpu_header(const CpuProfile& p, std::ostringstream& md) {
    const ProfileOptions& o = p.o;
    const std::string& cmdline = p.cmdline;
    const Device dev = p.dev;
    const int reps = p.reps;
    const int warmup = p.warmup;
    const double budget = p.budget;
    const std::vector<MoEConfig>& cfgs = p.cfgs;
    md << "# MoE Router Baseline Profiling\n\n"
       << "This document contains profiling results and analysis for the seed's baseline MoE router and layer "
          "(dense GShard dispatch/combine, `--impl dense`) beside Switchyard's sparse path, measured by "
          "`switchyard profile` on "
       << now_utc() << " (command: `" << cmdline << "`). Backend for the full-layer timings: " << to_string(dev)
       << "; router, stage and utilisation measurements: CPU backend. Activation dtype " << o.dtype
       << "; times are medians of at least " << reps << " runs (cheap measurements repeat until " << fmt("%.1f", budget)
       << " s of samples, at most " << kMaxAdaptiveReps << " runs) after " << warmup
       << " warm-up run(s); random weights "
       << "(nn.Linear-style init, seed " << o.seed << ") and inputs uniform(-1, 1).\n\n"
       << "Shapes profiled:\n";
    for (size_t si = 0; si < cfgs.size(); ++si) md << "- `" << o.shapes[si] << "`: " << cfgs[si].to_string() << "\n";
}

void render_cpu_hardware(const CpuProfile& p, std::ostringstream& md) {
    const Device dev = p.dev;
    const HostInfo& hi = p.hw.hi;
    const std::string& loadavg = p.hw.loadavg;
    const double gemm_gflops = p.hw.gemm_gflops;
    const double bw_gbs = p.hw.bw_gbs;
    const std::string& gpu_line = p.hw.gpu_line;
    const std::string& cuda_line = p.hw.cuda_line;
    const double gpu_mem_gib = p.hw.gpu_mem_gib;
    md << "\n## Hardware Configuration\n"
       << "- GPU: " << gpu_line << "\n"
       << "- CUDA Version: " << cuda_line << "\n"
       << "- Available Memory: " << fmt("%.1f", hi.mem_available_gib) << " GiB available of "
       << fmt("%.1f", hi.mem_total_gib) << " GiB host memory"
       << (gpu_mem_gib > 0 ? ", " + fmt("%.1f", gpu_mem_gib) + " GiB on the GPU" : std::string()) << "\n"
       << "- CPU: " << hi.cpu_model << ", " << hi.logical_cores << " logical cores, " << hi.omp_threads
       << " OpenMP threads; load average (1/5/15 min) at the start of this run: " << loadavg
       << " (other processes on the host share these cores and widen the spread of the timings)\n"
       << "- Measured on this host: CPU backend GEMM (switchyard::grouped_gemm, fp32, double accumulation) "
       << fmt("%.2f", gemm_gflops) << " GFLOP/s; memcpy bandwidth " << fmt("%.2f", bw_gbs) << " GB/s (read + write)."
       << (dev == Device::kCPU
               ? " These two rates define the floors below.\n\n"
               : " The GPU floors below use DESIGN.md's H100 ceilings (785 TFLOP/s bf16, 3.0 TB/s).\n\n");

}

void render_cpu_router(const CpuProfile& p, std::ostringstream& md) {
    const std::vector<LayerRow>& rows = p.rows;
    const LayerRow* big = p.big;
    md << "## Performance Metrics\n\n### Router Performance\nThe router is responsible for:\n"
       << "1. Computing routing probabilities using a linear layer\n2. Selecting top-k experts for each token\n"
       << "3. Creating dispatch and combine tensors (seed) / a routing plan of counts, offsets and rows "
          "(Switchyard)\n\n"
       << "| shape | T | Switchyard router + plan (ms) | seed router with one-hot tensors (ms) | speed-up | seed C | "
          "seed dispatch+combine bytes | Switchyard router+plan bytes |\n|---|---|---|---|---|---|---|---|\n";
    double worst_router_ratio = 1e300, best_router_ratio = 0;
    for (const LayerRow& r : rows) {
        double ratio = r.router.seed_ms / std::max(r.router.switchyard_ms, 1e-9);
        worst_router_ratio = std::min(worst_router_ratio, ratio);
        best_router_ratio = std::max(best_router_ratio, ratio);
        md << "| " << r.shape << " | " << r.T << " | " << fmt("%.3f", r.router.switchyard_ms) << " | "
           << fmt("%.3f", r.router.seed_ms) << " | " << fmt("%.2fx", ratio) << " | " << r.router.seed_capacity << " | "
           << human_bytes(double(r.router.seed_onehot_bytes)) << " | " << human_bytes(double(r.router.switchyard_bytes))
           << " |\n";
    }
    md << "\nKey findings:\n"
       << "- At T=" << big->T << " on `" << big->shape << "` the seed's router takes "
       << fmt("%.3f", big->router.seed_ms) << " ms against " << fmt("%.3f", big->router.switchyard_ms)
       << " ms for Switchyard's router and plan ("
       << fmt("%.2fx", big->router.seed_ms / std::max(big->router.switchyard_ms, 1e-9))
       << "); across all rows the ratio ranges " << fmt("%.2fx", worst_router_ratio) << " to "
       << fmt("%.2fx", best_router_ratio) << ". Both share the gate GEMM and the top-k; the difference is the "
       << "softmax pass and the zero-filled one-hot tensors.\n"
       << "- The seed's dispatch and combine tensors grow as T x E x C = O(T^2 k) bytes (C ~ T k / E): "
       << human_bytes(double(big->router.seed_onehot_bytes)) << " at T=" << big->T << ", against "
       << human_bytes(double(big->router.switchyard_bytes))
       << " for the whole Switchyard plan, which grows as O(T k).\n\n";

}

void render_cpu_layer(const CpuProfile& p, std::ostringstream& md) {
    const ProfileOptions& o = p.o;
    const Device dev = p.dev;
    const std::vector<MoEConfig>& cfgs = p.cfgs;
    const std::vector<LayerRow>& rows = p.rows;
    md << "### Full MoE Layer Performance\nThe MoE layer combines the router with expert feed-forward networks.\n\n"
       << "| shape | T | sparse (ms) | dense baseline (ms) | dense / sparse | floor (ms) | sparse % of floor | GFLOP "
          "|\n"
       << "|---|---|---|---|---|---|---|---|\n";
    for (const LayerRow& r : rows) {
        md << "| " << r.shape << " | " << r.T << " | " << fmt("%.3f", r.sparse_ms) << " | "
           << (r.dense_ran ? fmt("%.3f", r.dense_ms) : "not run: " + r.dense_reason) << " | "
           << (r.dense_ran ? fmt("%.2fx", r.dense_ms / std::max(r.sparse_ms, 1e-9)) : "-") << " | "
           << fmt("%.3f", r.floor_ms) << " | " << fmt("%.1f%%", 100 * r.floor_ms / std::max(r.sparse_ms, 1e-9)) << " | "
           << fmt("%.3f", r.flops / 1e9) << " |\n";
    }
    md << "\nKey findings:\n";
    for (size_t si = 0; si < cfgs.size(); ++si) {
        const LayerRow* lo = nullptr;
        const LayerRow* hi_row = nullptr;
        for (const LayerRow& r : rows)
            if (r.shape == o.shapes[si]) {
                if (!lo || r.T < lo->T) lo = &r;
                if (!hi_row || r.T > hi_row->T) hi_row = &r;
            }
        md << "- `" << o.shapes[si] << "`: the sparse layer takes " << fmt("%.3f", lo->sparse_ms)
           << " ms at T=" << lo->T << " and " << fmt("%.3f", hi_row->sparse_ms) << " ms at T=" << hi_row->T << " ("
           << fmt("%.1f%%", 100 * hi_row->floor_ms / std::max(hi_row->sparse_ms, 1e-9)) << " of its floor); the dense "
           << "baseline "
           << (hi_row->dense_ran
                   ? "takes " + fmt("%.3f", hi_row->dense_ms) + " ms at T=" + std::to_string(hi_row->T) + " (" +
                         fmt("%.2fx", hi_row->dense_ms / std::max(hi_row->sparse_ms, 1e-9)) + " the sparse time)"
                   : "was not run at T=" + std::to_string(hi_row->T) + ": " + hi_row->dense_reason)
           << ".\n";
    }
    if (dev == Device::kCPU)
        md << "- Floors use the measured CPU rates above (FLOPs of the kept rows; bytes of the experts hit plus x and "
              "y); the CPU reference accumulates in double, so its share of the floor measures the reference, not the "
              "GPU kernels of the performance targets.\n\n";
    else
        md << "- Floors use DESIGN.md's H100 ceilings (FLOPs of the kept rows; bytes of the experts hit plus x and y). "
              "GPU times are host-timed with a stream synchronisation per run, so launch latency weighs on these "
              "small shapes; the large-shape GPU report is a later issue.\n\n";

}

void render_cpu_memory(const CpuProfile& p, std::ostringstream& md) {
    const ProfileOptions& o = p.o;
    const std::vector<LayerRow>& rows = p.rows;
    const LayerRow* big = p.big;
    const std::vector<FullMem>& full = p.full;
    md << "## Memory Usage Patterns\n\n### Router Memory Usage\n";
    md << "- Seed router: logits and probabilities [T, E] fp32 plus one-hot dispatch and combine [T, E, C] in the "
          "activation dtype: "
       << human_bytes(double(big->dense_mem.router + big->router.seed_onehot_bytes)) << " at T=" << big->T << " on `"
       << big->shape << "` (C=" << big->router.seed_capacity << "), quadratic in T.\n"
       << "- Switchyard router: logits [T, E] fp32, top-k ids and weights [T, k], and the plan (counts, offsets, "
          "3 x [T k] row maps): "
       << human_bytes(double(big->router.switchyard_bytes)) << " at the same size, linear in T ("
       << fmt("%.1fx", double(big->router.seed_onehot_bytes + big->dense_mem.router) /
                           std::max(1.0, double(big->router.switchyard_bytes)))
       << " less).\n\n### MoE Layer Memory Usage\n"
       << "| shape | T | dense baseline arena | of which [T,E,C,H] product | Switchyard CPU intermediates | "
          "GPU budget T k (2H+3F) a | fused goal T k (H+F) a |\n|---|---|---|---|---|---|---|\n";
    for (const LayerRow& r : rows)
        md << "| " << r.shape << " | " << r.T << " | " << human_bytes(double(r.dense_mem.total)) << " | "
           << human_bytes(double(r.dense_mem.product)) << " | " << human_bytes(double(r.sparse_bytes)) << " | "
           << human_bytes(double(r.gpu_budget)) << " | " << human_bytes(double(r.gpu_goal)) << " |\n";
    md << "\nAt full model sizes (bf16, computed from dense.h's formula with capacity factor 1.0, the dense "
          "baseline's best case; nothing allocated):\n\n"
       << "| shape | T | dense baseline need | product tensor | vs 80 GB GPU | Switchyard GPU budget | fused goal |\n"
       << "|---|---|---|---|---|---|---|\n";
    std::string first_oom;
    for (const FullMem& f : full) {
        bool over = double(f.dm.total) > kGpuMemoryReferenceBytes;
        if (over && first_oom.empty())
            first_oom = f.shape + " at T=" + std::to_string(f.T) + " (" + human_bytes(double(f.dm.total)) + ")";
        md << "| " << f.shape << " | " << f.T << " | " << human_bytes(double(f.dm.total)) << " | "
           << human_bytes(double(f.dm.product)) << " | " << (over ? "exceeds" : "fits") << " | "
           << human_bytes(double(f.budget)) << " | " << human_bytes(double(f.goal)) << " |\n";
    }
    md << "\n- Out of memory errors observed with larger configurations: the dense baseline needs more than 80 GB "
          "first for "
       << (first_oom.empty() ? std::string("none of the shapes above") : first_oom) << "; runs past --dense-limit-gib ("
       << fmt("%.1f", o.dense_limit_gib) << " GiB here) are reported with the bytes they need, not run.\n"
       << "- Primary memory bottleneck: the tensor multiplication `expert_outputs.unsqueeze(3) * combine_tensor`: "
          "the [T, E, C, H] product is "
       << fmt("%.1f%%", 100.0 * double(big->dense_mem.product) / std::max(1.0, double(big->dense_mem.total)))
       << " of the dense arena at T=" << big->T << " on `" << big->shape << "`.\n"
       << "- Switchyard keeps no [T, E, C] or [T, E, C, H] tensor: its extra memory is linear in T k.\n\n";

}

void render_cpu_bottlenecks(const CpuProfile& p, std::ostringstream& md) {
    const Device dev = p.dev;
    const std::vector<LayerRow>& rows = p.rows;
    const LayerRow* big = p.big;
    const double tflops = p.tflops;
    const double gbs = p.gbs;
    md << "## Identified Bottlenecks\n\n### Computational Bottlenecks\n"
       << "CPU stage breakdown of the sparse layer (median ms per stage; stages.h):\n\n"
       << "| shape | T | router | plan | dispatch | experts | shared | combine | experts share |\n"
       << "|---|---|---|---|---|---|---|---|---|\n";
    for (const LayerRow& r : rows) {
        const StageTimes& s = r.stages;
        md << "| " << r.shape << " | " << r.T << " | " << fmt("%.3f", s.router_ms) << " | " << fmt("%.3f", s.plan_ms)
           << " | " << fmt("%.3f", s.dispatch_ms) << " | " << fmt("%.3f", s.experts_ms) << " | "
           << fmt("%.3f", s.shared_ms) << " | " << fmt("%.3f", s.combine_ms) << " | "
           << fmt("%.1f%%", 100 * s.experts_ms / std::max(s.total_ms(), 1e-9)) << " |\n";
    }
    const StageTimes& bs = big->stages;
    const double non_expert = bs.router_ms + bs.plan_ms + bs.dispatch_ms + bs.combine_ms;
    md << "\n- On `" << big->shape << "` at T=" << big->T << " the expert GEMMs take "
       << fmt("%.1f%%", 100 * bs.experts_ms / std::max(bs.total_ms(), 1e-9)) << " of the layer; routing, plan, "
       << "dispatch and combine together " << fmt("%.1f%%", 100 * non_expert / std::max(bs.total_ms(), 1e-9)) << ".\n"
       << "- The router's gate GEMM is " << fmt("%.1f%%", 100 * bs.router_ms / std::max(bs.total_ms(), 1e-9))
       << " of the layer there; in the seed's router the one-hot tensor construction adds "
       << fmt("%.3f", std::max(0.0, big->router.seed_ms - big->router.switchyard_ms)) << " ms on top.\n\n"
       << "### Memory Bottlenecks\n"
       << "- The dense baseline's arena at T=" << big->T << " on `" << big->shape << "` is "
       << human_bytes(double(big->dense_mem.total)) << " against " << human_bytes(double(big->sparse_bytes))
       << " of intermediates for the sparse CPU path ("
       << fmt("%.1fx", double(big->dense_mem.total) / std::max(1.0, double(big->sparse_bytes))) << ").\n"
       << "- Bytes that must move per forward (weights of the experts hit, x, y) are " << human_bytes(big->bytes)
       << " at T=" << big->T << "; at the smallest T the floor is set by "
       << (rows.front().flops / (tflops * 1e12) < rows.front().bytes / (gbs * 1e9) ? "bandwidth" : "compute")
       << (dev == Device::kCPU ? " on this host.\n\n" : " at the H100 ceilings.\n\n");

}

void render_cpu_utilisation(const CpuProfile& p, std::ostringstream& md) {
    const ProfileOptions& o = p.o;
    const LayerRow* big = p.big;
    const std::vector<UtilRow>& util = p.util;
    const int64_t util_T = p.util_T;
    md << "## Expert Utilization Analysis\n"
       << "Routing of " << util_T << " synthetic tokens by the library's router (switchyard::route, build_plan) whose "
       << "logits are log p_e + Gumbel noise (so the top-1 expert follows p): uniform p, and Zipf p_e ~ 1/(e+1)^s.\n\n"
       << "| shape | logits | max/mean | cv | entropy / ln E | dropped @ cf 1.0 | @ 1.25 | @ 2.0 |\n"
       << "|---|---|---|---|---|---|---|---|\n";
    for (const UtilRow& u : util) {
        double ln_e = std::log(static_cast<double>(u.stats.expert_counts.size()));
        md << "| " << u.shape << " | " << u.dist << " | " << fmt("%.2f", u.stats.max_over_mean()) << " | "
           << fmt("%.3f", u.stats.cv) << " | " << fmt("%.3f", ln_e > 0 ? u.stats.entropy / ln_e : 0.0) << " | "
           << fmt("%.1f%%", 100 * u.dropped_frac[0]) << " | " << fmt("%.1f%%", 100 * u.dropped_frac[1]) << " | "
           << fmt("%.1f%%", 100 * u.dropped_frac[2]) << " |\n";
    }
    md << "\nPer-expert counts (first shape, T=" << util_T << "):\n";
    for (const UtilRow& u : util) {
        if (u.shape != o.shapes.front()) continue;
        md << "- " << u.dist << ": ";
        for (size_t e = 0; e < u.stats.expert_counts.size() && e < 16; ++e)
            md << (e ? ", " : "") << u.stats.expert_counts[e];
        if (u.stats.expert_counts.size() > 16) md << ", ... (" << u.stats.expert_counts.size() << " experts)";
        md << "\n";
    }
    md << "- The random-weights router of the timed runs (`" << big->shape << "`, T=" << big->T << "): max/mean "
       << fmt("%.2f", big->stats.max_over_mean()) << ", cv " << fmt("%.3f", big->stats.cv) << ", aux loss "
       << fmt("%.4f", big->stats.aux_loss) << " (1.0 is perfectly balanced).\n\n";

}

void render_cpu_next_steps(const CpuProfile& p, std::ostringstream& md) {
    const ProfileOptions& o = p.o;
    const std::vector<LayerRow>& rows = p.rows;
    const LayerRow* big = p.big;
    const std::vector<UtilRow>& util = p.util;
    const std::vector<FullMem>& full = p.full;
    const StageTimes& bs = big->stages;
    const UtilRow* zipf = nullptr;
    for (const UtilRow& u : util)
        if (u.shape == o.shapes.front() && u.dist == "Zipf s=1.0") zipf = &u;
    const FullMem* mix4096 = nullptr;
    for (const FullMem& f : full)
        if (f.shape == "mixtral" && f.T == 4096) mix4096 = &f;
    md << "## Next Steps\n\nBased on the profiling results, the following optimizations are recommended:\n\n"
       << "1. Implement memory-efficient routing kernels: the seed's one-hot dispatch/combine tensors cost "
       << human_bytes(double(big->router.seed_onehot_bytes)) << " and "
       << fmt("%.3f", std::max(0.0, big->router.seed_ms - big->router.switchyard_ms))
       << " ms beyond the plan at T=" << big->T
       << "; a fused GPU router (GEMM + top-k + histogram/scan in one pass, DESIGN.md target <= 15 us at 4096 tokens) "
          "removes them.\n"
       << "2. Optimize the token-to-expert dispatch operations: gather and combine take "
       << fmt("%.1f%%", 100 * (bs.dispatch_ms + bs.combine_ms) / std::max(bs.total_ms(), 1e-9))
       << " of the CPU layer; on the GPU the gather belongs in the grouped GEMM's A loads and the combine in the "
          "second GEMM's epilogue.\n"
       << "3. Improve load balancing to ensure even expert utilization: under Zipf s=1.0 logits the busiest expert "
          "gets "
       << (zipf ? fmt("%.2f", zipf->stats.max_over_mean()) : std::string("-")) << "x the mean load and capacity "
       << "factor 1.0 drops " << (zipf ? fmt("%.1f%%", 100 * zipf->dropped_frac[0]) : std::string("-"))
       << " of the pairs (" << (zipf ? fmt("%.1f%%", 100 * zipf->dropped_frac[2]) : std::string("-"))
       << " at 2.0): keep dropless routing as the default and use the selection bias (aux-loss-free balancing) "
          "rather than capacity.\n"
       << "4. Explore quantization to reduce memory footprint: at T=" << rows.front().T << " on `" << rows.front().shape
       << "` the floor is " << human_bytes(rows.front().bytes)
       << " of mostly expert weights; FP8 weights halve that "
          "byte floor for decode.\n"
       << "5. Investigate more efficient expert output combining: the [T, E, C, H] product is "
       << human_bytes(double(big->dense_mem.product)) << " here and "
       << (mix4096 ? human_bytes(double(mix4096->dm.product)) : std::string("-"))
       << " for Mixtral at T=4096; Switchyard's combine reads k rows per token in a fixed order and never builds it.\n";
}

nlohmann::ordered_json cpu_layer_json(const LayerRow& r) {
    nlohmann::ordered_json l;
    l["shape"] = r.shape;
    l["config"] = r.cfg.to_string();
    l["tokens"] = r.T;
    l["sparse_ms"] = r.sparse_ms;
    l["dense_ran"] = r.dense_ran;
    l["dense_ms"] = r.dense_ms;
    l["dense_reason"] = r.dense_reason;
    l["floor_ms"] = r.floor_ms;
    l["flops"] = r.flops;
    l["gflop"] = r.flops / 1e9;
    l["bytes"] = r.bytes;
    // Derived numbers the text prints (so that every number of PROFILE.md is in this file).
    l["pct_of_floor"] = 100 * r.floor_ms / std::max(r.sparse_ms, 1e-9);
    if (r.dense_ran) l["dense_over_sparse"] = r.dense_ms / std::max(r.sparse_ms, 1e-9);
    {
        const StageTimes& s = r.stages;
        const double tot = std::max(s.total_ms(), 1e-9);
        l["stage_share_pct"] = {{"experts", 100 * s.experts_ms / tot},
                                {"router", 100 * s.router_ms / tot},
                                {"dispatch_combine", 100 * (s.dispatch_ms + s.combine_ms) / tot},
                                {"router_plan_dispatch_combine",
                                 100 * (s.router_ms + s.plan_ms + s.dispatch_ms + s.combine_ms) / tot}};
    }
    l["seed_router_extra_ms"] = std::max(0.0, r.router.seed_ms - r.router.switchyard_ms);
    l["dense_product_pct"] = 100.0 * double(r.dense_mem.product) / std::max(1.0, double(r.dense_mem.total));
    l["dense_over_sparse_bytes"] = double(r.dense_mem.total) / std::max(1.0, double(r.sparse_bytes));
    l["seed_router_bytes"] = r.dense_mem.router + r.router.seed_onehot_bytes;
    l["seed_over_switchyard_router_bytes"] =
        double(r.router.seed_onehot_bytes + r.dense_mem.router) / std::max(1.0, double(r.router.switchyard_bytes));
    l["stages_ms"] = {{"router", r.stages.router_ms},     {"plan", r.stages.plan_ms},
                      {"dispatch", r.stages.dispatch_ms}, {"experts", r.stages.experts_ms},
                      {"shared", r.stages.shared_ms},     {"combine", r.stages.combine_ms}};
    l["router"] = {{"switchyard_ms", r.router.switchyard_ms},
                   {"seed_ms", r.router.seed_ms},
                   {"seed_capacity", r.router.seed_capacity},
                   {"seed_onehot_bytes", r.router.seed_onehot_bytes},
                   {"switchyard_bytes", r.router.switchyard_bytes},
                   {"speedup", r.router.seed_ms / std::max(r.router.switchyard_ms, 1e-9)}};
    l["memory"] = {{"dense_total", r.dense_mem.total},
                   {"dense_product", r.dense_mem.product},
                   {"dense_router", r.dense_mem.router},
                   {"dense_capacity", r.dense_mem.capacity},
                   {"sparse_cpu_intermediates", r.sparse_bytes},
                   {"gpu_budget", r.gpu_budget},
                   {"gpu_fused_goal", r.gpu_goal}};
    l["load"] = {{"expert_counts", r.stats.expert_counts},
                 {"max_over_mean", r.stats.max_over_mean()},
                 {"cv", r.stats.cv},
                 {"entropy", r.stats.entropy},
                 {"aux_loss", r.stats.aux_loss},
                 {"z_loss", r.stats.z_loss}};
    return l;
}

nlohmann::ordered_json cpu_profile_json(const CpuProfile& p) {
    nlohmann::ordered_json j;
    j["generated"] = now_utc();
    j["command"] = p.cmdline;
    j["device"] = to_string(p.dev);
    j["dtype"] = p.o.dtype;
    j["warmup"] = p.warmup;
    j["reps"] = p.reps;
    j["budget_s"] = p.budget;
    j["hardware"] = {{"cpu_model", p.hw.hi.cpu_model},
                     {"logical_cores", p.hw.hi.logical_cores},
                     {"omp_threads", p.hw.hi.omp_threads},
                     {"mem_total_gib", p.hw.hi.mem_total_gib},
                     {"mem_available_gib", p.hw.hi.mem_available_gib},
                     {"cpu_gemm_gflops", p.hw.gemm_gflops},
                     {"memcpy_gbs", p.hw.bw_gbs},
                     {"gpu", p.hw.gpu_line},
                     {"cuda", p.hw.cuda_line},
                     {"loadavg_at_start", p.hw.loadavg}};
    j["layers"] = nlohmann::ordered_json::array();
    for (const LayerRow& r : p.rows) j["layers"].push_back(cpu_layer_json(r));
    j["utilisation"] = util_json(p.util);
    j["constants"] = constants_json();
    j["full_size_memory"] = nlohmann::ordered_json::array();
    for (const FullMem& f : p.full)
        j["full_size_memory"].push_back({{"shape", f.shape},
                                         {"tokens", f.T},
                                         {"dense_total", f.dm.total},
                                         {"dense_product", f.dm.product},
                                         {"exceeds_80GB", double(f.dm.total) > kGpuMemoryReferenceBytes},
                                         {"gpu_budget", f.budget},
                                         {"gpu_fused_goal", f.goal}});
    return j;
}

// The CPU report: hardware probes, every (shape, T), utilisation, full-size memory, then PROFILE.md and profile.json.
int run_cpu_profile(const ProfileOptions& o, const std::string& cmdline) {
    CpuProfile p{o, cmdline};
    resolve_cpu_settings(p);
    make_out_dir(o.out);
    const int total_steps = static_cast<int>(p.cfgs.size() * p.tokens.size()) + 3;
    ProgressBar bar(total_steps, now_seconds());

    bar.step("hardware probes");
    p.hw = probe_host_hardware(p.dev);
    // Rates of the floors: measured on the CPU; DESIGN.md's H100 ceilings on CUDA.
    p.tflops = p.dev == Device::kCPU ? p.hw.gemm_gflops / 1e3 : 785.0;
    p.gbs = p.dev == Device::kCPU ? p.hw.bw_gbs : 3000.0;

    for (size_t si = 0; si < p.cfgs.size(); ++si) {
        io::OwnedWeights w = io::random_weights(p.cfgs[si], o.seed + si);
        if (!p.cfgs[si].use_score_bias) w.w.score_bias = TensorRef();
        for (int64_t T : p.tokens) {
            bar.step("layer " + o.shapes[si] + " T=" + std::to_string(T));
            p.rows.push_back(measure_cpu_layer(p, o.shapes[si], p.cfgs[si], w, T));
        }
    }
    p.big = &p.rows.front();
    for (const LayerRow& r : p.rows)
        if (r.shape == p.rows.front().shape && r.T >= p.big->T) p.big = &r;

    bar.step("expert utilisation (uniform and Zipf-skewed logits)");
    p.util_T = o.quick ? 1024 : 4096;
    p.util = util_rows(o.shapes, p.cfgs, p.util_T, o.seed);
    bar.step("memory at full model sizes (computed)");
    p.full = full_size_memory();

    std::ostringstream md;
    render_cpu_header(p, md);
    render_cpu_hardware(p, md);
    render_cpu_router(p, md);
    render_cpu_layer(p, md);
    render_cpu_memory(p, md);
    render_cpu_bottlenecks(p, md);
    render_cpu_utilisation(p, md);
    render_cpu_next_steps(p, md);
    write_report(o.out, md.str(), cpu_profile_json(p).dump(1) + "\n");
    bar.finish();
    std::fprintf(stderr, "profile: wrote %s/PROFILE.md and %s/profile.json\n", o.out.c_str(), o.out.c_str());
    return kExitOk;
}

int run_profile(const ProfileOptions& o, const std::string& cmdline) {
    if (!o.ncu_child.empty()) return run_ncu_child(o.ncu_child, o.ncu_tokens, parse_activation_dtype(o.dtype), o.seed);
    if (!o.render_json.empty()) {
        std::ifstream f(o.render_json);
        SWITCHYARD_CHECK(f.good(), "--render-json: cannot read '", o.render_json, "'");
        nlohmann::ordered_json j = nlohmann::ordered_json::parse(f);
        SWITCHYARD_CHECK(j.value("device", "") == "cuda", "--render-json: only GPU reports re-render (device=",
                         j.value("device", ""), ")");
        ::mkdir(o.out.c_str(), 0755);
        add_gpu_next_steps(j);
        write_report(o.out, render_gpu_report(j), j.dump(1) + "\n");
        return kExitOk;
    }
    std::string device = o.device;
    if (device == "auto") device = has_cuda_backend() && cuda_device_count() > 0 ? "cuda" : "cpu";
    if (parse_device(device) == Device::kCUDA) {
        make_out_dir(o.out);
        return run_profile_gpu(o, cmdline);
    }
    return run_cpu_profile(o, cmdline);
}

}  // namespace

void add_profile(CLI::App& app, int* exit_code) {
    auto o = std::make_shared<ProfileOptions>();
    CLI::App* sub = app.add_subcommand("profile", "measure and write <out>/PROFILE.md and <out>/profile.json");
    sub->add_option("--out", o->out, "output folder")->capture_default_str();
    sub->add_flag("--quick", o->quick,
                  "fewer points: CPU T in {16, 64} and at most 3 runs; GPU T in {16, 4096}, 10 runs, shorter peers");
    auto* shapes = sub->add_option("--shapes", o->shapes,
                                   "named shapes (small, small-many, mixtral, qwen3, deepseek-v3); default: small,"
                                   "small-many on the CPU, mixtral,qwen3,deepseek-v3 on the GPU")
                       ->delimiter(',');
    auto* tokens =
        sub->add_option("--tokens", o->tokens, "token counts; default: 16,64,256 (CPU), 16,256,4096,16384 (GPU)")
            ->delimiter(',');
    sub->add_option("--device", o->device, "auto (cuda when a GPU is visible) | cpu | cuda")->capture_default_str();
    auto* dtype = sub->add_option("--dtype", o->dtype, "activation and weight dtype: fp32 | bf16 | fp16 (default: fp32 "
                                                       "on the CPU, bf16 on the GPU)");
    auto* reps = sub->add_option("--reps", o->reps, "timed runs per measurement (median; default 3 CPU, 20 GPU)");
    auto* warmup = sub->add_option("--warmup", o->warmup, "warm-up runs (default 1 CPU, 5 GPU)");
    sub->add_option("--dense-limit-gib", o->dense_limit_gib, "memory limit of the dense baseline runs (CPU)")
        ->capture_default_str();
    sub->add_option("--budget", o->budget_s,
                    "seconds per measurement: cheap ones repeat past --reps until this is spent (at most 101 runs; CPU)")
        ->capture_default_str();
    sub->add_option("--seed", o->seed, "seed of weights and inputs")->capture_default_str();
    sub->add_flag("--ncu", o->ncu, "GPU: run Nsight Compute (ncu) on one forward when ncu is on PATH");
    sub->add_option("--torch", o->torch,
                    "GPU: auto (PyTorch peers through bench/compare_torch.py when torch with CUDA imports) | off")
        ->capture_default_str();
    sub->add_option("--render-json", o->render_json, "re-render <out>/PROFILE.md from a GPU run's profile.json");
    sub->add_option("--ncu-child", o->ncu_child, "internal: the one forward ncu profiles")->group("");
    sub->add_option("--ncu-tokens", o->ncu_tokens, "internal: tokens of --ncu-child")->group("");
    sub->callback([o, exit_code, shapes, tokens, dtype, reps, warmup] {
        o->shapes_given = shapes->count() > 0;
        o->tokens_given = tokens->count() > 0;
        o->dtype_given = dtype->count() > 0;
        o->reps_given = reps->count() > 0;
        o->warmup_given = warmup->count() > 0;
        SWITCHYARD_CHECK(o->torch == "auto" || o->torch == "off", "--torch must be auto or off, got '", o->torch, "'");
        std::ostringstream c;
        c << "switchyard profile --out " << o->out << (o->quick ? " --quick" : "") << " --device " << o->device;
        if (o->dtype_given) c << " --dtype " << o->dtype;
        if (o->shapes_given) {
            c << " --shapes ";
            for (size_t i = 0; i < o->shapes.size(); ++i) c << (i ? "," : "") << o->shapes[i];
        }
        if (o->tokens_given) {
            c << " --tokens ";
            for (size_t i = 0; i < o->tokens.size(); ++i) c << (i ? "," : "") << o->tokens[i];
        }
        if (o->reps_given) c << " --reps " << o->reps;
        if (o->warmup_given) c << " --warmup " << o->warmup;
        if (o->ncu) c << " --ncu";
        if (o->torch != "auto") c << " --torch " << o->torch;
        *exit_code = run_profile(*o, c.str());
    });
}

}  // namespace cli
}  // namespace switchyard
