// tools/switchyard/profile_gpu.cpp: the measurements of `switchyard profile --device cuda` (profile_gpu.h).
//
// One run on device 0, one non-blocking stream, CUDA events around every timed region (median of `reps` after
// `warmup`). Weights and inputs are generated on the device (cuda/random_fill.h: nn.Linear-style
// uniform(-1/sqrt(in), 1/sqrt(in)) weights, score bias uniform(-0.1, 0.1), x uniform(-1, 1)), so a 22 GB DeepSeek-V3
// layer needs no host copy. Everything below is stored in the returned JSON object:
//   hardware     GPU name, SMs, memory, driver/runtime versions, and the two ceilings of this run: cuBLAS bf16
//                8192^3 (TFLOP/s) and a 1 GiB device copy (GB/s, bytes read + written) (cuda/probe.h)
//   router[]     per (shape, T): Switchyard's router + plan vs the seed's router (gate GEMM, softmax, top-k,
//                one-hot dispatch/combine [T, E, C], C = largest expert count = the dense baseline's dropless C):
//                ms, speed-up, achieved GB/s over the bytes that must move, % of the router's floor, workspace bytes
//   layers[]     per (shape, T): floor (FLOPs of the kept rows / measured TFLOP/s vs bytes of the experts hit + x + y
//                / measured GB/s), Switchyard's whole layer (ms, TFLOP/s, % of floor), the dense baseline
//                (dense_forward_cuda: ms or "needs N bytes"), the PyTorch peers of bench/compare_torch.py (when
//                torch and CUDA are there), speed-ups; the stage breakdown from CUDA events recorded by
//                MoELayer::forward's StageCallback, each with its FLOPs, bytes, floor and what bounds it; memory: the
//                workspace by slice (MoELayer::workspace_layout, aliased slices listed in slice_aliases and counted
//                once; the sum checked against workspace_size), the bytes live at each stage, cudaMemGetInfo's
//                measure of the workspace allocation, the dense arena's need and measured peak
//   fits[]       per shape: free memory with the weights resident, largest T for Switchyard (binary search on
//                MoELayer::workspace_size + x + y) and for the dense baseline (dense_bytes_needed at capacity factor 1.0,
//                its best case)
//   utilisation  CPU-routed synthetic logits (profile_common.h) for uniform and Zipf-skewed routers, drops at
//                capacity factors 1.0/1.25/2.0; the load of the timed runs' random router (from the GPU forward)
//   torch, ncu   raw results of the peers and of Nsight Compute (or why they did not run)
//   next_steps   measured gaps, largest first
//   failures[]   {where, error} for every configuration that failed; the run goes on after each.
#include "profile_gpu.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>

#include "cli_common.h"
#include "profile_common.h"
#include "shapes.h"
#include "stages.h"
#include "switchyard/error.h"

#ifdef SWITCHYARD_WITH_CUDA
#include <cuda_profiler_api.h>
#include <cuda_runtime_api.h>

#include "cuda/probe.h"
#include "cuda/random_fill.h"
#include "switchyard/baseline.h"
#include "switchyard/cuda_check.h"
#include "timing.h"
#endif

namespace switchyard {
namespace cli {

using J = nlohmann::ordered_json;

int gpu_profile_steps(const GpuProfileOptions& o) {
    return 2 + static_cast<int>(o.shapes.size() * (1 + o.tokens.size())) + 1 + (o.torch != "off") + o.ncu;
}

#ifndef SWITCHYARD_WITH_CUDA

J run_gpu_profile(const GpuProfileOptions&, const std::function<void(const std::string&)>&,
                  const std::function<void(const std::string&)>&) {
    SWITCHYARD_FAIL("--device cuda: this build has no CUDA backend (rebuild with nvcc)");
}
int run_ncu_child(const std::string&, int64_t, DType, uint64_t) {
    SWITCHYARD_FAIL("--ncu-child: this build has no CUDA backend");
}

#else

namespace {

// Clears a non-sticky error after a failed configuration; says whether the context is still usable.
bool context_ok(std::string* why) {
    cudaError_t e = cudaGetLastError();
    e = cudaDeviceSynchronize();
    if (e == cudaSuccess) return true;
    if (why) *why = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    cudaGetLastError();
    return cudaDeviceSynchronize() == cudaSuccess;
}

size_t free_bytes() {
    size_t f = 0, t = 0;
    SWITCHYARD_CUDA_CHECK(cudaMemGetInfo(&f, &t));
    return f;
}


struct GpuLayer {
    MoEWeights w;
    std::vector<DeviceBuffer> bufs;
    size_t weight_bytes = 0;
};

std::unique_ptr<GpuLayer> make_weights(const MoEConfig& cfg, uint64_t seed, cudaStream_t s) {
    auto g = std::make_unique<GpuLayer>();
    g->bufs.reserve(8);
    int dev = 0;
    SWITCHYARD_CUDA_CHECK(cudaGetDevice(&dev));
    const int64_t E = cfg.num_experts, H = cfg.hidden_size, F = cfg.ffn_size, S = cfg.shared_width();
    uint64_t idx = 0;
    auto make = [&](DType dt, std::initializer_list<int64_t> dims, double bound) {
        int64_t n = 1;
        for (int64_t d : dims) n *= d;
        const size_t bytes = static_cast<size_t>(n) * dtype_size(dt);
        g->bufs.emplace_back(bytes);
        g->weight_bytes += bytes;
        TensorRef t(g->bufs.back().get(), dt, dims, Device::kCUDA, dev);
        cuda::fill_uniform(dt, t.data, n, static_cast<float>(-bound), static_cast<float>(bound),
                           seed * 0x100000001b3ull + (++idx), s);
        return t;
    };
    const DType dt = cfg.dtype;
    g->w.gate = make(dt, {E, H}, 1.0 / std::sqrt(double(H)));
    if (cfg.use_score_bias) g->w.score_bias = make(DType::kF32, {E}, 0.1);
    g->w.w13 = make(dt, {E, cfg.w13_rows(), H}, 1.0 / std::sqrt(double(H)));
    g->w.w2 = make(dt, {E, H, F}, 1.0 / std::sqrt(double(F)));
    if (S > 0) {
        g->w.shared_w13 = make(dt, {is_gated(cfg.activation) ? 2 * S : S, H}, 1.0 / std::sqrt(double(H)));
        g->w.shared_w2 = make(dt, {H, S}, 1.0 / std::sqrt(double(S)));
    }
    SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(s));  // weights ready
    return g;
}

// Slices of MoELayer::workspace_layout each stage reads or writes (what a stage-by-stage allocator would have to hold
// at that moment).
const std::vector<std::pair<const char*, std::vector<const char*>>>& stage_slices() {
    static const std::vector<std::pair<const char*, std::vector<const char*>>> m = {
        {"router", {"logits", "topk_ids", "topk_weights", "router_scratch", "stats_scratch"}},
        {"plan",
         {"topk_ids", "topk_weights", "expert_counts", "expert_offsets", "slot_row", "row_token", "row_slot",
          "plan_scratch"}},
        {"dispatch", {"topk_weights", "expert_offsets", "slot_row", "row_token", "xp"}},
        {"gemm1", {"topk_weights", "expert_offsets", "slot_row", "xp", "g1", "gemm_scratch"}},
        {"activation", {"topk_weights", "expert_offsets", "slot_row", "g1", "h"}},
        {"gemm2", {"topk_weights", "expert_offsets", "slot_row", "h", "expert_out", "gemm_scratch"}},
        {"shared", {"topk_weights", "slot_row", "expert_out", "shared_g1", "shared_h", "shared_out", "gemm_scratch"}},
        {"combine", {"topk_weights", "slot_row", "expert_out", "shared_out"}},
        // The fused small-batch path (T <= 64): gather .. combine in one stage.
        {"experts", {"topk_weights", "expert_offsets", "slot_row", "row_token", "row_slot", "shared_gate",
                     "fused_scratch"}},
    };
    return m;
}


// FLOPs and bytes each stage must move at least once (bytes of weights of the experts hit).
struct StageWork {
    double flops = 0, bytes = 0;
};
StageWork stage_work(const std::string& st, const MoEConfig& cfg, int64_t T, int64_t kept, int64_t hit) {
    const double a = double(dtype_size(cfg.dtype)), H = double(cfg.hidden_size), E = double(cfg.num_experts);
    const double F = double(cfg.ffn_size), R = double(cfg.w13_rows()), k = double(cfg.top_k), t = double(T);
    const double rows = double(kept), S = double(cfg.shared_width());
    const double Rs = is_gated(cfg.activation) ? 2 * S : S;
    StageWork w;
    if (st == "router") {
        w.flops = 2 * t * E * H;
        w.bytes = a * (t * H + E * H) + 4 * t * E * 2 + 8 * t * k;  // x, gate; logits out and in; ids + weights
    } else if (st == "plan") {
        w.bytes = 4 * t * k + 3 * 4 * t * k + 8 * E;  // ids in; slot_row, row_token, row_slot out; counts, offsets
    } else if (st == "dispatch") {
        w.bytes = 2 * a * rows * H + 4 * rows;
    } else if (st == "gemm1") {
        w.flops = 2 * rows * H * R;
        w.bytes = a * (double(hit) * R * H + rows * H + rows * R);
    } else if (st == "activation") {
        w.bytes = a * rows * (R + F);
    } else if (st == "gemm2") {
        w.flops = 2 * rows * F * H;
        w.bytes = a * (double(hit) * H * F + rows * F + rows * H);
    } else if (st == "shared") {
        w.flops = 2 * t * H * Rs + 2 * t * S * H;
        w.bytes = a * (Rs * H + H * S + t * H + t * Rs + t * S + t * H);
    } else if (st == "combine") {
        w.bytes = a * (rows * H + t * H + (S > 0 ? t * H : 0)) + 8 * t * k;
    } else if (st == "experts") {  // the fused path: both GEMMs of the experts hit and the shared expert, x in, y out
        w.flops = 2 * rows * H * R + 2 * rows * F * H + (S > 0 ? 2 * t * H * Rs + 2 * t * S * H : 0);
        w.bytes = a * (double(hit) * (R * H + H * F) + (S > 0 ? Rs * H + H * S : 0) + 2 * t * H) + 8 * rows;
    }
    return w;
}

J rate_fields(double ms, double flops, double bytes, double tflops, double gbs) {
    const double floor_ms = std::max(flops / (tflops * 1e12), bytes / (gbs * 1e9)) * 1e3;
    J r;
    r["ms"] = ms;
    r["floor_ms"] = floor_ms;
    r["tflops"] = ms > 0 ? flops / (ms * 1e-3) / 1e12 : 0.0;
    r["gbs"] = ms > 0 ? bytes / (ms * 1e-3) / 1e9 : 0.0;
    r["pct_of_floor"] = ms > 0 ? 100.0 * floor_ms / ms : 0.0;
    r["bound"] = flops / (tflops * 1e12) >= bytes / (gbs * 1e9) ? "compute" : "bandwidth";
    return r;
}

std::string shell_quote(const std::string& s) {
    std::string r = "'";
    for (char c : s) r += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return r + "'";
}

std::string read_text(const std::string& path, size_t max_bytes = 1 << 20) {
    std::ifstream f(path);
    std::stringstream ss;
    ss << f.rdbuf();
    std::string s = ss.str();
    return s.size() > max_bytes ? s.substr(s.size() - max_bytes) : s;
}

std::string last_lines(const std::string& s, int n) {
    size_t pos = s.size();
    for (int i = 0; i < n && pos > 0; ++i) {
        pos = s.rfind('\n', pos - 1);
        if (pos == std::string::npos) return s;
    }
    std::string r = s.substr(pos + 1);
    for (char& c : r)
        if (c == '\n' || c == '\r' || c == '|') c = ' ';
    return r;
}

// exit status of a shell command (-1 when it could not run)
int run_shell(const std::string& cmd) {
    int rc = std::system(cmd.c_str());
    if (rc == -1) return -1;
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + (WIFSIGNALED(rc) ? WTERMSIG(rc) : 0);
}

std::vector<std::string> split_csv(const std::string& line) {
    std::vector<std::string> out;
    std::string cur;
    bool q = false;
    for (char c : line) {
        if (c == '"') {
            q = !q;
        } else if (c == ',' && !q) {
            out.push_back(cur);
            cur.clear();
        } else {
            cur += c;
        }
    }
    out.push_back(cur);
    return out;
}

double parse_number(std::string s) {
    s.erase(std::remove(s.begin(), s.end(), ','), s.end());
    try {
        return std::stod(s);
    } catch (...) {
        return NAN;
    }
}

// ---- PyTorch peers ----------------------------------------------------------------------------------------
J run_torch(const GpuProfileOptions& o) {
    J t;
    t["available"] = false;
    const std::string root = o.repo_root.empty() ? "." : o.repo_root;
    const std::string script = root + "/bench/compare_torch.py";
    struct stat st;
    if (::stat(script.c_str(), &st) != 0) {
        t["reason"] = "bench/compare_torch.py not found under " + root;
        return t;
    }
    if (run_shell("python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)' >/dev/null 2>&1") !=
        0) {
        t["reason"] = "PyTorch with CUDA is not importable by python3 on this machine";
        return t;
    }
    std::vector<std::string> models;
    for (const std::string& s : o.shapes) {
        if (s == "mixtral" || s == "qwen3") models.push_back(s);
        if (s == "deepseek-v3") models.push_back("deepseek");
    }
    if (models.empty()) {
        t["reason"] = "none of the shapes is one of compare_torch.py's models (mixtral, qwen3, deepseek-v3)";
        return t;
    }
    std::string m, tk;
    for (const auto& s : models) m += (m.empty() ? "" : ",") + s;
    for (int64_t T : o.tokens) tk += (tk.empty() ? "" : ",") + std::to_string(T);
    const std::string json_path = o.out_dir + "/torch_layers.json", log_path = o.out_dir + "/torch_layers.log";
    std::remove(json_path.c_str());
    const std::string cmd = "timeout " + std::to_string(o.quick ? 180 : 300) + " python3 " + shell_quote(script) +
                            " --layers --impls dense,loop,sort,vllm --models " + m + " --tokens " + tk + " --iters " +
                            std::to_string(o.quick ? 10 : 20) + " --warmup " + std::to_string(o.quick ? 2 : 5) +
                            " --json " + shell_quote(json_path) + " >" + shell_quote(log_path) + " 2>&1";
    t["command"] = cmd;
    const int rc = run_shell(cmd);
    t["exit_code"] = rc;
    std::ifstream f(json_path);
    if (rc != 0 || !f) {
        t["reason"] = "compare_torch.py failed (exit " + std::to_string(rc) +
                      (rc == 124 ? ", timed out" : "") + "): " + last_lines(read_text(log_path), 2);
        return t;
    }
    try {
        J r = J::parse(f);
        t["available"] = true;
        t["device"] = r.value("device", "");
        t["ceiling_tflops"] = r.value("ceiling_tflops", 0.0);
        t["copy_tbps"] = r.value("copy_tbps", 0.0);
        t["rows"] = r.value("rows", J::array());
    } catch (const std::exception& e) {
        t["reason"] = std::string("compare_torch.py wrote unreadable JSON: ") + e.what();
    }
    return t;
}

// ---- Nsight Compute ----------------------------------------------------------------------------------------
J run_ncu(const GpuProfileOptions& o, const std::string& shape, int64_t T) {
    J n;
    n["ran"] = false;
    n["shape"] = shape;
    n["tokens"] = T;
    if (run_shell("command -v ncu >/dev/null 2>&1") != 0) {
        n["reason"] = "ncu is not on PATH";
        return n;
    }
    const std::string csv = o.out_dir + "/ncu.csv", log = o.out_dir + "/ncu.log";
    const std::string metrics =
        "gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,"
        "dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_"
        "sustained_active";
    const std::string cmd = "timeout 300 ncu --profile-from-start off --csv --metrics " + metrics + " " +
                            shell_quote(o.self_exe) + " profile --ncu-child " + shape + " --ncu-tokens " +
                            std::to_string(T) + " --dtype " + to_string(o.dtype) + " >" + shell_quote(csv) + " 2>" +
                            shell_quote(log);
    n["command"] = cmd;
    const int rc = run_shell(cmd);
    const std::string text = read_text(csv);
    std::istringstream is(text);
    std::string line;
    std::vector<std::string> hdr;
    std::map<std::string, J> kernels;  // by ID
    std::vector<std::string> order;
    while (std::getline(is, line)) {
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (hdr.empty()) {
            if (line.find("\"Kernel Name\"") != std::string::npos && line.find("\"Metric Name\"") != std::string::npos)
                hdr = split_csv(line);
            continue;
        }
        std::vector<std::string> f = split_csv(line);
        if (f.size() != hdr.size()) continue;
        auto col = [&](const char* name) -> std::string {
            for (size_t i = 0; i < hdr.size(); ++i)
                if (hdr[i] == name) return f[i];
            return "";
        };
        const std::string id = col("ID");
        if (!kernels.count(id)) {
            order.push_back(id);
            std::string kn = col("Kernel Name");
            if (kn.size() > 90) kn = kn.substr(0, 87) + "...";
            kernels[id]["name"] = kn;
        }
        const std::string metric = col("Metric Name"), unit = col("Metric Unit");
        double v = parse_number(col("Metric Value"));
        if (metric == "gpu__time_duration.sum") {
            if (unit == "nsecond" || unit == "ns") v /= 1e3;
            if (unit == "msecond" || unit == "ms") v *= 1e3;
            if (unit == "second" || unit == "s") v *= 1e6;
            kernels[id]["time_us"] = v;
        } else if (metric.rfind("sm__throughput", 0) == 0) {
            kernels[id]["sm_pct"] = v;
        } else if (metric.rfind("dram__throughput", 0) == 0) {
            kernels[id]["dram_pct"] = v;
        } else if (metric.rfind("sm__pipe_tensor", 0) == 0) {
            kernels[id]["tensor_pct"] = v;
        }
    }
    if (order.empty()) {
        n["reason"] = "ncu exit " + std::to_string(rc) + ", no kernel rows: " + last_lines(read_text(log), 2);
        return n;
    }
    n["ran"] = true;
    n["exit_code"] = rc;
    n["kernels"] = J::array();
    for (const auto& id : order) n["kernels"].push_back(kernels[id]);
    return n;
}

// State of one GPU profile run shared by its steps: the options, progress callbacks, failures so far, whether the
// CUDA context survived, the ceilings of this run, the stream and its events.
struct GpuRun {
    const GpuProfileOptions& o;
    const std::function<void(const std::string&)>& progress;
    const std::function<void(const std::string&)>& note;
    J failures = J::array();
    bool ctx_dead = false;
    double tflops = 785, gbs = 3000;
    CudaStream stream;
    EventPool ev;

    GpuRun(const GpuProfileOptions& opt, const std::function<void(const std::string&)>& prog,
           const std::function<void(const std::string&)>& nt)
        : o(opt), progress(prog), note(nt) {}
    void fail(const std::string& where, const std::string& err) {
        failures.push_back({{"where", where}, {"error", err}});
        note("failed: " + where + ": " + err);
    }
    void after_failure(const std::string& where) {
        std::string why;
        if (!context_ok(&why)) {
            ctx_dead = true;
            fail(where, "the CUDA context is unusable after this failure (" + why + "); later GPU steps are skipped");
        }
    }
};

// GPU and host description, and the two ceilings of this run (cuBLAS bf16 GEMM, device copy).
J probe_gpu_hardware(GpuRun& run) {
    run.progress("GPU hardware and ceilings (bf16 GEMM, device copy)");
    J hw;
    cudaDeviceProp p;
    SWITCHYARD_CUDA_CHECK(cudaGetDeviceProperties(&p, 0));
    SWITCHYARD_CUDA_CHECK(cudaSetDevice(0));
    int drv = 0, rt = 0;
    cudaDriverGetVersion(&drv);
    cudaRuntimeGetVersion(&rt);
    size_t fr = 0, tot = 0;
    SWITCHYARD_CUDA_CHECK(cudaMemGetInfo(&fr, &tot));
    hw["gpu_name"] = p.name;
    hw["sm_count"] = p.multiProcessorCount;
    hw["compute_capability"] = std::to_string(p.major) + "." + std::to_string(p.minor);
    hw["memory_total_bytes"] = tot;
    hw["memory_free_bytes_at_start"] = fr;
    hw["memory_total_gib"] = double(tot) / double(1ull << 30);
    hw["memory_free_gib_at_start"] = double(fr) / double(1ull << 30);
    hw["l2_cache_mib"] = double(p.l2CacheSize) / double(1 << 20);
    hw["driver_cuda_version"] = std::to_string(drv / 1000) + "." + std::to_string((drv % 1000) / 10);
    hw["runtime_cuda_version"] = std::to_string(rt / 1000) + "." + std::to_string((rt % 1000) / 10);
    const HostInfo hi = host_info();
    hw["cpu_model"] = hi.cpu_model;
    hw["logical_cores"] = hi.logical_cores;
    hw["host_mem_total_gib"] = hi.mem_total_gib;
    hw["ceiling_source"] = "measured in this run";
    try {
        const cuda::ProbeResult g = cuda::probe_bf16_gemm(8192, run.o.quick ? 10 : 20);
        const cuda::ProbeResult c = cuda::probe_copy(size_t(1) << 30, run.o.quick ? 6 : 12);
        run.tflops = g.rate;
        run.gbs = c.rate;
        hw["bf16_gemm_n"] = 8192;
        hw["bf16_gemm_ms"] = g.ms;
        hw["bf16_tflops"] = g.rate;
        hw["copy_bytes"] = size_t(1) << 30;
        hw["copy_ms"] = c.ms;
        hw["copy_gbs"] = c.rate;
    } catch (const std::exception& e) {
        run.fail("ceilings", e.what());
        hw["ceiling_source"] = "DESIGN.md's H100 figures (the probes failed)";
        hw["bf16_tflops"] = run.tflops;
        hw["copy_gbs"] = run.gbs;
        run.after_failure("ceilings");
    }
    return hw;
}

// Largest T in [1, hi] with ok(T) (0 when not even 1), by binary search; ok must be monotone.
int64_t largest_fitting(const std::function<bool(int64_t)>& ok, int64_t hi) {
    if (!ok(1)) return 0;
    int64_t lo = 1;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo + 1) / 2;
        if (ok(mid))
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

// Largest T that fits beside the weights: workspace + x + y (Switchyard, MoELayer::workspace_size); arena + x + y
// (dense, at capacity factor 1.0, its best case; dropless runs need more).
void measure_fits(const MoEConfig& cfg, const GpuLayer& g, J& fit) {
    const size_t fr = free_bytes();
    const int64_t H = cfg.hidden_size;
    const size_t a = dtype_size(cfg.dtype);
    const MoELayer layer(cfg, g.w);
    auto fits_sparse = [&](int64_t T) { return layer.workspace_size(T) + 2 * size_t(T * H) * a <= fr; };
    MoEConfig c1 = cfg;
    c1.capacity_factor = 1.0;
    auto fits_dense = [&](int64_t T) {
        const size_t need = dense_bytes_needed(c1, T, c1.capacity(T));
        return need != SIZE_MAX && need + 2 * size_t(T * H) * a <= fr;
    };
    const int64_t cap = std::min<int64_t>(int64_t(1) << 30, (int64_t(INT32_MAX) / 2) / cfg.top_k);
    fit["free_bytes_with_weights"] = fr;
    fit["weight_bytes"] = g.weight_bytes;
    fit["switchyard_max_tokens"] = largest_fitting(fits_sparse, cap);
    fit["dense_max_tokens"] = largest_fitting(fits_dense, cap);
    const int64_t T1 = 4096;
    fit["switchyard_bytes_per_token"] =
        double(layer.workspace_size(2 * T1) - layer.workspace_size(T1)) / double(T1) + 2.0 * double(H * a);
}

// Switchyard's router + plan vs the seed's router (probe.h) at T tokens, with the router's floor.
void measure_routers(GpuRun& run, const MoEConfig& cfg, const GpuLayer& g, const TensorRef& x, int64_t T, J& rr) {
    const GpuProfileOptions& o = run.o;
    const cudaStream_t s = run.stream.get();
    const int64_t H = cfg.hidden_size, E = cfg.num_experts, k = cfg.top_k;
    const size_t a = dtype_size(cfg.dtype);
    const cuda::RouterBytes sb = cuda::sparse_router_bytes(cfg, T);
    DeviceBuffer ws(sb.total);
    rr["switchyard_ms"] = cuda_median_ms(
        [&] {
            cuda::sparse_router_forward(cfg, x.data, g.w.gate.data, g.w.score_bias.ptr<float>(), T, ws.get(),
                                        ws.size(), s);
        },
        o.warmup, o.reps, s, run.ev);
    rr["switchyard_bytes"] = sb.total;
    rr["switchyard_plan_bytes"] = sb.plan;
    // Seed: count first (C = 0), C = the largest count, then time with the one-hot tensors.
    const cuda::RouterBytes c0 = cuda::seed_router_bytes(cfg, T, 0);
    int64_t C = 0;
    {
        DeviceBuffer w0(c0.total);
        const int32_t* counts = nullptr;
        cuda::seed_router_forward(cfg, x.data, g.w.gate.data, T, 0, w0.get(), w0.size(), s, &counts);
        std::vector<int32_t> hc(static_cast<size_t>(E));
        SWITCHYARD_CUDA_CHECK(cudaMemcpyAsync(hc.data(), counts, 4 * E, cudaMemcpyDeviceToHost, s));
        SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(s));
        for (int32_t c : hc) C = std::max<int64_t>(C, c);
    }
    const cuda::RouterBytes sd = cuda::seed_router_bytes(cfg, T, C);
    rr["seed_capacity"] = C;
    rr["seed_bytes"] = sd.total;
    rr["seed_onehot_bytes"] = sd.onehot;
    rr["seed_probs_bytes"] = sd.probs;
    if (sd.total + (size_t(256) << 20) > free_bytes()) {
        rr["seed_error"] = "needs " + human_bytes(double(sd.total)) + ", the device has " +
                           human_bytes(double(free_bytes())) + " free";
    } else {
        DeviceBuffer wsd(sd.total);
        rr["seed_ms"] = cuda_median_ms(
            [&] { cuda::seed_router_forward(cfg, x.data, g.w.gate.data, T, C, wsd.get(), wsd.size(), s); },
            o.warmup, o.reps, s, run.ev);
        rr["speedup"] = rr["seed_ms"].get<double>() / std::max(rr["switchyard_ms"].get<double>(), 1e-9);
    }
    // The router's floor: gate GEMM FLOPs; x and gate read, ids / weights and the plan's row maps written.
    const double flops = 2.0 * double(T) * double(E) * double(H);
    const double bytes = double(a) * double(T * H + E * H) + 4.0 * double(T * k) * 5 + 8.0 * double(E);
    J rf = rate_fields(rr["switchyard_ms"].get<double>(), flops, bytes, run.tflops, run.gbs);
    rr["floor_ms"] = rf["floor_ms"];
    rr["bytes_moved"] = bytes;
    rr["achieved_gbs"] = rf["gbs"];
    rr["pct_of_floor"] = rf["pct_of_floor"];
    rr["bound"] = rf["bound"];
}

// Stage breakdown: events recorded by MoELayer::forward's StageCallback after each stage, median per stage, each with
// its FLOPs, bytes, floor and what bounds it. Returns the stage names measured (forward order).
std::vector<std::string> measure_stages(GpuRun& run, const MoELayer& layer, const TensorRef& x, const TensorRef& y,
                                        const DeviceBuffer& ws, int64_t T, int64_t kept, int64_t hit, J& L) {
    const GpuProfileOptions& o = run.o;
    const MoEConfig& cfg = layer.config();
    StageEvents marks(run.ev, 2);
    StageSamples samples;
    const int sreps = std::max(3, o.reps / 2);
    for (int it = 0; it < o.warmup + sreps; ++it) {
        layer.forward(x, y, ws.get(), ws.size(), run.stream.get(), nullptr, marks.callback());
        SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(run.stream.get()));
        if (it >= o.warmup) marks.add_to(samples);
    }
    J stages = J::array();
    double sum = 0;
    for (const auto& [n, ms] : samples.medians()) sum += ms;
    for (const auto& [n, ms] : samples.medians()) {
        const StageWork w = stage_work(n, cfg, T, kept, hit);
        J sj = rate_fields(ms, w.flops, w.bytes, run.tflops, run.gbs);
        sj["stage"] = n;
        sj["flops"] = w.flops;
        sj["gflop"] = w.flops / 1e9;  // the unit the report's stage table prints
        sj["bytes"] = w.bytes;
        sj["share_pct"] = sum > 0 ? 100.0 * ms / sum : 0.0;
        sj["gap_ms"] = std::max(0.0, sj["ms"].get<double>() - sj["floor_ms"].get<double>());
        stages.push_back(sj);
    }
    L["stages"] = stages;
    L["stages_sum_ms"] = sum;
    return samples.names();
}

// Memory of the layer at T tokens: the workspace by slice (MoELayer::workspace_layout; aliased slices reuse another's
// memory and are not counted twice), live bytes per stage, the measured allocation, the budgets.
J workspace_memory(const MoELayer& layer, const GpuLayer& g, int64_t T, const std::vector<std::string>& stages_run,
                   size_t measured_bytes) {
    const MoEConfig& cfg = layer.config();
    const size_t wsb = layer.workspace_size(T);
    size_t counted = 0;
    J sl = J::object(), aliases = J::object();
    for (const WorkspaceSlice& x : layer.workspace_layout(T)) {
        sl[x.name] = x.bytes;
        if (x.aliases.empty())
            counted += x.bytes;
        else
            aliases[x.name] = x.aliases;
    }
    J by_stage = J::array();
    size_t stage_peak = 0;
    std::string stage_peak_name;
    for (const auto& st : stage_slices()) {
        if (std::find(stages_run.begin(), stages_run.end(), st.first) == stages_run.end()) continue;
        size_t live = 0;
        for (const char* n : st.second)
            if (sl.contains(n)) live += sl[n].get<size_t>();
        // GEMM1 with the activation in its epilogue (no g1 slice) writes h.
        if (st.first == std::string("gemm1") && !sl.contains("g1") && sl.contains("h")) live += sl["h"].get<size_t>();
        by_stage.push_back({{"stage", st.first}, {"live_bytes", live}});
        if (live > stage_peak) stage_peak = live, stage_peak_name = st.first;
    }
    const int64_t H = cfg.hidden_size;
    J mem;
    mem["workspace_bytes"] = wsb;
    mem["workspace_recounted_bytes"] = counted;
    mem["layout_check"] = counted == wsb;
    mem["workspace_measured_bytes"] = measured_bytes;
    mem["slices"] = sl;
    mem["slice_aliases"] = aliases;
    mem["by_stage"] = by_stage;
    mem["stage_peak_bytes"] = stage_peak;
    mem["stage_peak_stage"] = stage_peak_name;
    mem["io_bytes"] = 2 * size_t(T * H) * dtype_size(cfg.dtype);
    mem["weight_bytes"] = g.weight_bytes;
    mem["design_budget_bytes"] = gpu_budget_bytes(cfg, T);
    mem["fused_goal_bytes"] = gpu_fused_goal_bytes(cfg, T);
    mem["workspace_over_budget"] = double(wsb) / double(std::max<size_t>(1, gpu_budget_bytes(cfg, T)));
    return mem;
}

// Switchyard's layer at T tokens: its load (from the forward's statistics), floor, whole-layer time, stage breakdown
// and memory.
void measure_switchyard_layer(GpuRun& run, const MoEConfig& cfg, const GpuLayer& g, const TensorRef& x,
                              const TensorRef& y, int64_t T, J& L) {
    const GpuProfileOptions& o = run.o;
    const cudaStream_t s = run.stream.get();
    MoELayer layer(cfg, g.w);
    const size_t before = free_bytes();
    DeviceBuffer ws(layer.workspace_size(T));
    const size_t after = free_bytes();
    LoadStats st;
    ForwardOutputs out;
    out.stats = &st;
    layer.forward(x, y, ws.get(), ws.size(), s, &out);
    SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(s));
    int64_t kept = 0, hit = 0;
    for (int64_t c : st.kept_counts) kept += c, hit += c > 0;
    L["kept_rows"] = kept;
    L["experts_hit"] = hit;
    L["load"] = {{"max_over_mean", st.max_over_mean()}, {"cv", st.cv}, {"aux_loss", st.aux_loss},
                 {"dropped", st.dropped}, {"expert_counts", st.expert_counts}};
    const double flops = layer_flops(cfg, T, kept), bytes = layer_bytes(cfg, T, hit, cfg.dtype);
    L["flops"] = flops;
    L["bytes"] = bytes;
    const double floor_ms = std::max(flops / (run.tflops * 1e12), bytes / (run.gbs * 1e9)) * 1e3;
    L["floor_ms"] = floor_ms;
    L["bound"] = flops / (run.tflops * 1e12) >= bytes / (run.gbs * 1e9) ? "compute" : "bandwidth";
    const double ms =
        cuda_median_ms([&] { layer.forward(x, y, ws.get(), ws.size(), s, nullptr); }, o.warmup, o.reps, s, run.ev);
    L["switchyard"] = rate_fields(ms, flops, bytes, run.tflops, run.gbs);
    const std::vector<std::string> names = measure_stages(run, layer, x, y, ws, T, kept, hit, L);
    L["memory"] = workspace_memory(layer, g, T, names, before >= after ? before - after : 0);
}

// The dense GShard baseline at T tokens: its need, measured peak and time (or why it did not run).
void measure_dense(GpuRun& run, const MoEConfig& cfg, const GpuLayer& g, const TensorRef& x, const TensorRef& y,
                   int64_t T, J& L) {
    const GpuProfileOptions& o = run.o;
    const cudaStream_t s = run.stream.get();
    DenseResult d = dense_forward_cuda(cfg, g.w, x, y, kDenseNoLimit, nullptr, 0, s, nullptr);
    SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(s));
    J dj;
    dj["ran"] = d.ran;
    dj["capacity"] = d.capacity;
    dj["bytes_needed"] = d.bytes_needed;
    dj["peak_bytes"] = d.peak_bytes;
    if (d.routed) {
        const DenseMemory dm = dense_memory(cfg, T, d.capacity);
        dj["product_bytes"] = dm.product;
        dj["onehot_bytes"] = dm.dispatch + dm.combine;
    }
    if (d.ran) {
        const int dreps = std::max(3, std::min(o.reps, 5));
        const double ms = cuda_median_ms(
            [&] { d = dense_forward_cuda(cfg, g.w, x, y, kDenseNoLimit, nullptr, 0, s, nullptr); },
            std::min(o.warmup, 1), dreps, s, run.ev);
        J r = rate_fields(ms, L.value("flops", 0.0), L.value("bytes", 0.0), run.tflops, run.gbs);
        for (auto it = r.begin(); it != r.end(); ++it) dj[it.key()] = it.value();
        if (L.contains("switchyard")) dj["switchyard_speedup"] = ms / L["switchyard"]["ms"].get<double>();
    } else {
        dj["reason"] = d.reason;
    }
    if (L.contains("memory") && d.bytes_needed > 0 && d.bytes_needed != SIZE_MAX)
        L["dense_over_workspace"] =
            double(d.bytes_needed) / double(std::max<size_t>(1, L["memory"]["workspace_bytes"].get<size_t>()));
    L["dense"] = dj;
}

// One (shape, T): inputs on the device, then routers, Switchyard's layer and the dense baseline, each recording its
// failure and going on.
void measure_point(GpuRun& run, const std::string& shape, const MoEConfig& cfg, const GpuLayer* g, int64_t T,
                   J& routers, J& layers) {
    const std::string where = shape + " T=" + std::to_string(T);
    run.progress("router, layer, stages, dense baseline: " + where);
    J rr = {{"shape", shape}, {"tokens", T}};
    J L = {{"shape", shape}, {"tokens", T}, {"config", cfg.to_string()}};
    if (!g || run.ctx_dead) {
        rr["error"] = L["error"] = run.ctx_dead ? "skipped: CUDA context lost earlier" : "no weights";
        routers.push_back(rr);
        layers.push_back(L);
        return;
    }
    const int64_t H = cfg.hidden_size;
    const DType dt = cfg.dtype;
    std::unique_ptr<DeviceBuffer> xb, yb;
    TensorRef x, y;
    try {
        xb = std::make_unique<DeviceBuffer>(size_t(T * H) * dtype_size(dt));
        yb = std::make_unique<DeviceBuffer>(size_t(T * H) * dtype_size(dt));
        cuda::fill_uniform(dt, xb->get(), T * H, -1.0f, 1.0f, run.o.seed * 1000 + uint64_t(T), run.stream.get());
        x = TensorRef(xb->get(), dt, {T, H}, Device::kCUDA, 0);
        y = TensorRef(yb->get(), dt, {T, H}, Device::kCUDA, 0);
    } catch (const std::exception& e) {
        run.fail(where + " inputs", e.what());
        rr["error"] = L["error"] = std::string("inputs: ") + e.what();
        routers.push_back(rr);
        layers.push_back(L);
        run.after_failure(where);
        return;
    }
    try {
        measure_routers(run, cfg, *g, x, T, rr);
    } catch (const std::exception& e) {
        rr["error"] = e.what();
        run.fail(where + " router", e.what());
        run.after_failure(where + " router");
    }
    routers.push_back(rr);
    if (!run.ctx_dead) {
        try {
            measure_switchyard_layer(run, cfg, *g, x, y, T, L);
        } catch (const std::exception& e) {
            L["switchyard_error"] = e.what();
            run.fail(where + " switchyard layer", e.what());
            run.after_failure(where + " switchyard layer");
        }
    }
    if (!run.ctx_dead) {
        try {
            measure_dense(run, cfg, *g, x, y, T, L);
        } catch (const std::exception& e) {
            L["dense"] = {{"ran", false}, {"reason", std::string("error: ") + e.what()}};
            run.fail(where + " dense baseline", e.what());
            run.after_failure(where + " dense baseline");
        }
    }
    layers.push_back(L);
}

// One shape: its weights on the GPU, what fits beside them, then every token count.
void measure_shape(GpuRun& run, size_t si, J& routers, J& layers, J& fits) {
    const std::string& shape = run.o.shapes[si];
    MoEConfig cfg;
    try {
        cfg = named_shape(shape, run.o.dtype);
        cfg.validate();
    } catch (const std::exception& e) {
        run.fail(shape, e.what());
        return;
    }
    run.progress("weights of " + shape + " on the GPU");
    std::unique_ptr<GpuLayer> g;
    J fit = {{"shape", shape}};
    if (!run.ctx_dead) {
        try {
            g = make_weights(cfg, run.o.seed + si, run.stream.get());
        } catch (const std::exception& e) {
            run.fail(shape + " weights", e.what());
            run.after_failure(shape + " weights");
        }
    }
    if (g) {
        try {
            measure_fits(cfg, *g, fit);
        } catch (const std::exception& e) {
            run.fail(shape + " fits", e.what());
        }
    } else {
        fit["error"] = "weights could not be placed on the GPU";
    }
    fits.push_back(fit);
    for (int64_t T : run.o.tokens) measure_point(run, shape, cfg, g.get(), T, routers, layers);
}

// The PyTorch peers of each layer row (times, % of floor, speed-ups, the best non-dense peer).
void attach_torch_peers(J& layers, const J& t) {
    for (J& L : layers) {
        const std::string model = L["shape"] == "deepseek-v3" ? "deepseek" : L["shape"].get<std::string>();
        J peers = J::object();
        double best = 0;
        std::string best_impl;
        for (const J& r : t["rows"]) {
            if (r.value("model", "") != model || r.value("tokens", int64_t(-1)) != L["tokens"].get<int64_t>())
                continue;
            J p;
            const double ms = r["ms"].is_number() ? r["ms"].get<double>() : NAN;
            p["ok"] = std::isfinite(ms);
            if (std::isfinite(ms)) {
                p["ms"] = ms;
                p["tflops"] = r.value("tflops", 0.0);
                p["pct_of_floor_torch"] = 100.0 * r.value("floor_ms", 0.0) / ms;
                if (r["peak_extra_gb"].is_number() && std::isfinite(r["peak_extra_gb"].get<double>()))
                    p["peak_extra_gb"] = r["peak_extra_gb"];
                if (L.contains("floor_ms")) p["pct_of_floor"] = 100.0 * L["floor_ms"].get<double>() / ms;
                if (L.contains("switchyard")) p["switchyard_speedup"] = ms / L["switchyard"]["ms"].get<double>();
                if (r.value("impl", "") != "dense" && (best == 0 || ms < best)) best = ms, best_impl = r.value("impl", "");
            } else {
                p["note"] = r.value("note", std::string("failed"));
            }
            peers[r.value("impl", std::string("?"))] = p;
        }
        L["torch"] = peers;
        if (best > 0) {
            L["best_torch_impl"] = best_impl;
            L["best_torch_ms"] = best;
            if (L.contains("switchyard")) L["speedup_vs_best_torch"] = best / L["switchyard"]["ms"].get<double>();
        }
    }
}

}  // namespace

int run_ncu_child(const std::string& shape, int64_t T, DType dtype, uint64_t seed) {
    MoEConfig cfg = named_shape(shape, dtype);
    cfg.validate();
    CudaStream s;
    auto g = make_weights(cfg, seed, s.get());
    const int64_t H = cfg.hidden_size;
    DeviceBuffer xb(static_cast<size_t>(T * H) * dtype_size(dtype)), yb(xb.size());
    cuda::fill_uniform(dtype, xb.get(), T * H, -1.0f, 1.0f, seed + 99, s.get());
    TensorRef x(xb.get(), dtype, {T, H}, Device::kCUDA, 0), y(yb.get(), dtype, {T, H}, Device::kCUDA, 0);
    MoELayer layer(cfg, g->w);
    DeviceBuffer ws(layer.workspace_size(T));
    layer.forward(x, y, ws.get(), ws.size(), s.get(), nullptr);  // warm (cuBLAS handle, CUTLASS setup)
    SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(s.get()));
    SWITCHYARD_CUDA_CHECK(cudaProfilerStart());
    layer.forward(x, y, ws.get(), ws.size(), s.get(), nullptr);
    SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(s.get()));
    SWITCHYARD_CUDA_CHECK(cudaProfilerStop());
    return kExitOk;
}

J run_gpu_profile(const GpuProfileOptions& o, const std::function<void(const std::string&)>& progress,
                  const std::function<void(const std::string&)>& note) {
    GpuRun run(o, progress, note);
    J j;
    j["hardware"] = probe_gpu_hardware(run);
    J routers = J::array(), layers = J::array(), fits = J::array();
    for (size_t si = 0; si < o.shapes.size(); ++si) measure_shape(run, si, routers, layers, fits);
    j["router"] = routers;
    j["layers"] = layers;
    j["fits"] = fits;

    // ---- PyTorch peers (after our buffers are freed) ----
    if (o.torch != "off") {
        progress("PyTorch peers (bench/compare_torch.py --layers)");
        J t = run_torch(o);
        if (!t["available"].get<bool>()) note("PyTorch peers: " + t.value("reason", std::string("not run")));
        j["torch"] = t;
        if (t["available"].get<bool>()) attach_torch_peers(j["layers"], t);
    } else {
        j["torch"] = {{"available", false}, {"reason", "--torch off"}};
    }

    // ---- ncu ----
    if (o.ncu) {
        progress("Nsight Compute on one forward");
        const std::string shape = o.shapes.front();
        int64_t T = o.tokens.front();
        for (int64_t t : o.tokens)
            if (t <= 4096) T = std::max(T, t);
        j["ncu"] = run_ncu(o, shape, T);
        if (!j["ncu"]["ran"].get<bool>()) note("ncu: " + j["ncu"].value("reason", std::string()));
    } else {
        j["ncu"] = {{"ran", false}, {"reason", "off (pass --ncu to run Nsight Compute on one forward)"}};
    }
    j["failures"] = run.failures;
    return j;
}


#endif  // SWITCHYARD_WITH_CUDA

}  // namespace cli
}  // namespace switchyard
