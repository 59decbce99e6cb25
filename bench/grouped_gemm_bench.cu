// bench/grouped_gemm_bench.cu: times cuda::grouped_gemm (bf16) on the expert GEMMs of the DESIGN.md shapes.
//
// Run:  grouped_gemm_bench [--tokens 16,256,4096,16384] [--models mixtral,qwen3,deepseek] [--iters 20]
//                          [--warmup 5] [--seed 1] [--json out.json] [--all-tiles] [--backward] [--gated]
//                          [--epilogues] [--rounds 2]
// For each model (H, F, E, k) and token count T: T*k rows are routed uniformly at random (each token picks k
// distinct experts), giving per-expert row counts; the two expert GEMMs are timed:
//   up   : [rows, H] x W13[E, 2F, H]^T -> [rows, 2F]      down : [rows, F] x W2[E, H, F]^T -> [rows, H]
// Inputs are random bf16 in [-1, 1) (not small integers: those run faster than real data). Each timed call is
// bracketed by CUDA events; warm-up first; the median is reported. Operand sets are rotated so that one call's
// working set plus the next is past the L2 (only matters for sets smaller than 4x L2; the DESIGN shapes' weights
// alone are larger). In the same run the bf16 ceiling is measured with cuBLAS on 8192^3 and the copy bandwidth
// with a 1 GiB device-to-device copy; the floor of a GEMM is max(FLOPs / ceiling, bytes / bandwidth) where the
// bytes are the weights of every expert that receives a row plus A read and C written once.
// --all-tiles also times every tile configuration (large / medium / small / large-n2 / large-c1: grouped_gemm.h)
// besides the automatic choice.
// --backward adds the two gradient GEMMs of each (cuda::grouped_gemm_dgrad / _wgrad: dA = dC . B_e and
// dB_e = dC_e^T . A_e, same FLOPs as the forward); with --all-tiles each is also timed with both tile
// rasterisations (raster-m / raster-n), and dgrad with each cluster (large = 2x1, large-n2 = 1x2, large-c1 = none).
// --gated adds, after each up GEMM, GEMM1 followed by the SwiGLU activation two ways, timed in alternation (two
// rounds each, the second reported): "up+act" (grouped_gemm then the activation kernel, [rows, 2F] stored and read
// back) and "up gated" (the gated epilogue, GroupedGemmArgs::gated: h [rows, F] stored directly), and "up keep"
// (the gated epilogue storing GEMM1's product too, GroupedGemmArgs::gate_up_out: the training forward's kernel, to
// be read against "up+act", which also leaves the product in memory); floors: weights hit + A read + h written,
// plus the product written for "up keep".
// --epilogues times each GEMM on the Cooperative tile without a cluster, and (with --backward) each wgrad and each
// dgrad without a cluster, with every epilogue built for it (GroupedGemmEpilogue: epi-tma32 = CUTLASS's 128x32
// subtiles, epi-tma128 (not for wgrad), epi-reg = the register store), alternated with the automatic choice
// ("auto": its tile, cluster and epilogue), in --rounds rounds (default 2): the first warms every variant on the
// problem, and each variant's result is the median over the later rounds of its per-round medians (identical
// kernels read up to 9% apart within one two-round alternation on an H100 at Mixtral's shapes: more rounds for
// decisions of a few percent).
// --json writes every row (with the per-expert counts) for bench/compare_torch.py, which times torch._grouped_mm
// on the identical problems.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/gemm/grouped_gemm.h"
#include "cuda/moe_stages.h"
#include "switchyard/error.h"

namespace {

#define BENCH_CUDA(expr)                                                                                 \
    do {                                                                                                 \
        cudaError_t e_ = (expr);                                                                         \
        if (e_ != cudaSuccess) {                                                                         \
            std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, \
                         #expr);                                                                         \
            std::exit(1);                                                                                \
        }                                                                                                \
    } while (0)

struct Model {
    std::string name;
    int64_t hidden, ffn, experts, top_k;
};

const Model kModels[] = {
    {"mixtral", 4096, 14336, 8, 2},
    {"qwen3", 2048, 768, 128, 8},
    {"deepseek", 7168, 2048, 256, 8},
};

struct Options {
    std::vector<int64_t> tokens = {16, 256, 4096, 16384};
    std::vector<std::string> models = {"mixtral", "qwen3", "deepseek"};
    int iters = 20;
    int warmup = 5;
    uint32_t seed = 1;
    std::string json;
    bool all_tiles = false;
    bool backward = false;
    bool gated = false;
    bool epilogues = false;
    int rounds = 2;
};

std::vector<std::string> split(const std::string& s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ',')) out.push_back(item);
    return out;
}

Options parse(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "missing value for %s\n", a.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--tokens") {
            o.tokens.clear();
            for (auto& t : split(next())) o.tokens.push_back(std::stoll(t));
        } else if (a == "--models") {
            o.models = split(next());
        } else if (a == "--iters") {
            o.iters = std::stoi(next());
        } else if (a == "--warmup") {
            o.warmup = std::stoi(next());
        } else if (a == "--seed") {
            o.seed = static_cast<uint32_t>(std::stoul(next()));
        } else if (a == "--json") {
            o.json = next();
        } else if (a == "--all-tiles") {
            o.all_tiles = true;
        } else if (a == "--gated") {
            o.gated = true;
        } else if (a == "--epilogues") {
            o.epilogues = true;
        } else if (a == "--rounds") {
            o.rounds = std::max(2, std::stoi(next()));
        } else if (a == "--backward") {
            o.backward = true;
        } else {
            std::printf(
                "usage: grouped_gemm_bench [--tokens 16,256,4096,16384] [--models mixtral,qwen3,deepseek]\n"
                "                          [--iters 20] [--warmup 5] [--seed 1] [--json out.json] [--all-tiles]\n"
                "                          [--backward] [--gated] [--epilogues] [--rounds 2]\n");
            std::exit(a == "--help" ? 0 : 2);
        }
    }
    return o;
}

// Deterministic pseudo-random bf16 in [-1, 1) from a hash of the index.
__global__ void fill_random_bf16(__nv_bfloat16* p, int64_t n, uint32_t seed) {
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        uint64_t x = static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull + seed;
        x ^= x >> 31;
        x *= 0xBF58476D1CE4E5B9ull;
        x ^= x >> 29;
        float u = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);  // [0, 1)
        p[i] = __float2bfloat16(2.0f * u - 1.0f);
    }
}

void fill(void* p, int64_t n, uint32_t seed) {
    if (n == 0) return;
    fill_random_bf16<<<1024, 256>>>(static_cast<__nv_bfloat16*>(p), n, seed);
    BENCH_CUDA(cudaGetLastError());
}

double median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
}

// Each token picks top_k distinct experts uniformly at random.
std::vector<int32_t> route_counts(const Model& m, int64_t tokens, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<int32_t> counts(m.experts, 0);
    std::vector<int> perm(m.experts);
    for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t j = 0; j < m.top_k; ++j) {  // partial Fisher-Yates
            std::uniform_int_distribution<int64_t> d(j, m.experts - 1);
            int64_t r = d(rng);
            if (j == 0) {
                for (int64_t e = 0; e < m.experts; ++e) perm[e] = static_cast<int>(e);
            }
            std::swap(perm[j], perm[r]);
            ++counts[perm[j]];
        }
    }
    return counts;
}

struct Ceilings {
    double bf16_tflops;
    double copy_tbps;
};

Ceilings measure_ceilings() {
    const int n = 8192;
    void *a, *b, *c;
    BENCH_CUDA(cudaMalloc(&a, size_t(n) * n * 2));
    BENCH_CUDA(cudaMalloc(&b, size_t(n) * n * 2));
    BENCH_CUDA(cudaMalloc(&c, size_t(n) * n * 2));
    fill(a, int64_t(n) * n, 7);
    fill(b, int64_t(n) * n, 8);
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
        std::fprintf(stderr, "cublasCreate failed\n");
        std::exit(1);
    }
    float alpha = 1.0f, beta = 0.0f;
    cudaEvent_t e0, e1;
    BENCH_CUDA(cudaEventCreate(&e0));
    BENCH_CUDA(cudaEventCreate(&e1));
    std::vector<float> times;
    for (int it = 0; it < 25; ++it) {
        BENCH_CUDA(cudaEventRecord(e0));
        cublasStatus_t st = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF, n, b,
                                         CUDA_R_16BF, n, &beta, c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT);
        BENCH_CUDA(cudaEventRecord(e1));
        BENCH_CUDA(cudaEventSynchronize(e1));
        if (st != CUBLAS_STATUS_SUCCESS) {
            std::fprintf(stderr, "cublasGemmEx failed: %d\n", static_cast<int>(st));
            std::exit(1);
        }
        float ms;
        BENCH_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        if (it >= 5) times.push_back(ms);
    }
    Ceilings out;
    out.bf16_tflops = 2.0 * n * double(n) * n / (median(times) * 1e-3) / 1e12;
    cublasDestroy(h);
    BENCH_CUDA(cudaFree(a));
    BENCH_CUDA(cudaFree(b));
    BENCH_CUDA(cudaFree(c));

    const size_t bytes = size_t(1) << 30;
    void *src, *dst;
    BENCH_CUDA(cudaMalloc(&src, bytes));
    BENCH_CUDA(cudaMalloc(&dst, bytes));
    BENCH_CUDA(cudaMemset(src, 1, bytes));
    times.clear();
    for (int it = 0; it < 15; ++it) {
        BENCH_CUDA(cudaEventRecord(e0));
        BENCH_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice));
        BENCH_CUDA(cudaEventRecord(e1));
        BENCH_CUDA(cudaEventSynchronize(e1));
        float ms;
        BENCH_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        if (it >= 3) times.push_back(ms);
    }
    out.copy_tbps = 2.0 * bytes / (median(times) * 1e-3) / 1e12;  // read + write
    BENCH_CUDA(cudaFree(src));
    BENCH_CUDA(cudaFree(dst));
    BENCH_CUDA(cudaEventDestroy(e0));
    BENCH_CUDA(cudaEventDestroy(e1));
    return out;
}

struct Row {
    std::string model, gemm, kernel;
    int64_t tokens, experts, n, k, rows, hit_experts;
    double ms, tflops, floor_ms;
    std::vector<std::pair<std::string, double>> tiles;  // --all-tiles: (tile, ms)
    std::vector<int32_t> counts;
};

// Times call(set) for rotating operand sets s = it % sets; returns the median ms.
double time_calls(const std::function<void(size_t)>& call, size_t sets, const Options& o) {
    cudaEvent_t e0, e1;
    BENCH_CUDA(cudaEventCreate(&e0));
    BENCH_CUDA(cudaEventCreate(&e1));
    std::vector<float> times;
    for (int it = 0; it < o.warmup + o.iters; ++it) {
        BENCH_CUDA(cudaEventRecord(e0));
        call(static_cast<size_t>(it) % sets);
        BENCH_CUDA(cudaEventRecord(e1));
        BENCH_CUDA(cudaEventSynchronize(e1));
        float ms;
        BENCH_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        if (it >= o.warmup) times.push_back(ms);
    }
    BENCH_CUDA(cudaEventDestroy(e0));
    BENCH_CUDA(cudaEventDestroy(e1));
    return median(times);
}

// Times one grouped GEMM problem; returns the median ms.
double time_gemm(switchyard::cuda::GroupedGemmArgs args, const std::vector<void*>& a_sets,
                 const std::vector<void*>& b_sets, const std::vector<void*>& c_sets, void* ws, size_t ws_bytes,
                 const Options& o) {
    return time_calls(
        [&](size_t s) {
            args.a = a_sets[s];
            args.b = b_sets[s];
            args.c = c_sets[s];
            switchyard::cuda::grouped_gemm(args, ws, ws_bytes, nullptr);
        },
        a_sets.size(), o);
}

// Times dgrad (wgrad = false) or wgrad of one problem: dC from c_sets, B from b_sets, A from a_sets; the outputs
// go to da / db (one buffer each: only the inputs rotate).
double time_grad(switchyard::cuda::GroupedGemmGradArgs g, bool wgrad, const std::vector<void*>& a_sets,
                 const std::vector<void*>& b_sets, const std::vector<void*>& c_sets, void* da, void* db, void* ws,
                 size_t ws_bytes, const Options& o) {
    return time_calls(
        [&](size_t s) {
            g.dc = c_sets[s];
            g.a = a_sets[s];
            g.b = b_sets[s];
            g.da = da;
            g.db = db;
            if (wgrad)
                switchyard::cuda::grouped_gemm_wgrad(g, ws, ws_bytes, nullptr);
            else
                switchyard::cuda::grouped_gemm_dgrad(g, ws, ws_bytes, nullptr);
        },
        a_sets.size(), o);
}

// Times each variant's call in alternation, o.rounds rounds over all of them; the first round warms every variant
// on this problem (the first one timed on a fresh problem reads slow). Returns, per variant, the median over the
// later rounds of that round's median.
std::vector<double> time_alternated(const std::vector<std::function<void(size_t)>>& calls, size_t sets,
                                    const Options& o) {
    std::vector<std::vector<float>> per_round(calls.size());
    for (int round = 0; round < o.rounds; ++round) {
        for (size_t v = 0; v < calls.size(); ++v) {
            const double ms = time_calls(calls[v], sets, o);
            if (round > 0) per_round[v].push_back(static_cast<float>(ms));
        }
    }
    std::vector<double> ms(calls.size(), 0.0);
    for (size_t v = 0; v < calls.size(); ++v) ms[v] = median(per_round[v]);
    return ms;
}

// --epilogues' variants: "auto" = the automatic choice (tile, cluster and epilogue as a caller gets them); the others
// force the Cooperative tile without a cluster (forward, dgrad) with that epilogue.
const std::pair<const char*, switchyard::cuda::GroupedGemmEpilogue> kEpilogues[] = {
    {"auto", switchyard::cuda::GroupedGemmEpilogue::kAuto},
    {"epi-tma32", switchyard::cuda::GroupedGemmEpilogue::kTma32},
    {"epi-tma128", switchyard::cuda::GroupedGemmEpilogue::kTma128},
    {"epi-reg", switchyard::cuda::GroupedGemmEpilogue::kRegisters}};

void print_row(const Row& r, double ceiling_tflops) {
    std::printf("%-8s T=%-6lld %-10s rows=%-7lld N=%-6lld K=%-6lld %-50s %9.4f ms %6.1f TFLOP/s "
                "%5.1f%% ceil  floor %8.4f ms  %5.1f%% of floor",
                r.model.c_str(), (long long)r.tokens, r.gemm.c_str(), (long long)r.rows, (long long)r.n,
                (long long)r.k, r.kernel.c_str(), r.ms, r.tflops, 100.0 * r.tflops / ceiling_tflops, r.floor_ms,
                100.0 * r.floor_ms / r.ms);
    for (const auto& t : r.tiles) std::printf("  %s %.4f", t.first.c_str(), t.second);
    std::printf("\n");
    std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
    Options o = parse(argc, argv);
    cudaDeviceProp prop;
    BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
    const Ceilings ceil = measure_ceilings();
    std::printf("device: %s, %d SMs, L2 %d MiB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
    std::printf("measured ceilings: bf16 cuBLAS 8192^3 %.0f TFLOP/s, device copy %.2f TB/s\n", ceil.bf16_tflops,
                ceil.copy_tbps);

    std::vector<Row> rows;
    try {
        for (const auto& mname : o.models) {
            const Model* mp = nullptr;
            for (const auto& m : kModels) {
                if (m.name == mname) mp = &m;
            }
            if (!mp) {
                std::fprintf(stderr, "unknown model %s\n", mname.c_str());
                return 2;
            }
            const Model& m = *mp;
            for (int64_t tokens : o.tokens) {
                std::vector<int32_t> counts = route_counts(m, tokens, o.seed + static_cast<uint32_t>(tokens));
                std::vector<int32_t> offsets(m.experts + 1, 0);
                int64_t hit = 0;
                for (int64_t e = 0; e < m.experts; ++e) {
                    offsets[e + 1] = offsets[e] + counts[e];
                    hit += counts[e] > 0;
                }
                const int64_t total = offsets[m.experts];
                int32_t* d_off;
                BENCH_CUDA(cudaMalloc(&d_off, offsets.size() * 4));
                BENCH_CUDA(cudaMemcpy(d_off, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));
                struct G {
                    const char* name;
                    int64_t n, k;
                } gemms[] = {{"up", 2 * m.ffn, m.hidden}, {"down", m.hidden, m.ffn}};
                for (const auto& g : gemms) {
                    const size_t a_bytes = size_t(total) * g.k * 2, b_bytes = size_t(m.experts) * g.n * g.k * 2,
                                 c_bytes = size_t(total) * g.n * 2;
                    const size_t set_bytes = a_bytes + b_bytes + c_bytes;
                    const size_t l2 = static_cast<size_t>(prop.l2CacheSize);
                    const size_t sets = std::min<size_t>(64, std::max<size_t>(1, (4 * l2 + set_bytes - 1) / set_bytes));
                    std::vector<void*> as(sets), bs(sets), cs(sets);
                    for (size_t s = 0; s < sets; ++s) {
                        BENCH_CUDA(cudaMalloc(&as[s], a_bytes + 16));
                        BENCH_CUDA(cudaMalloc(&bs[s], b_bytes));
                        BENCH_CUDA(cudaMalloc(&cs[s], c_bytes + 16));
                        fill(as[s], total * g.k, 100 + static_cast<uint32_t>(s));
                        fill(bs[s], m.experts * g.n * g.k, 200 + static_cast<uint32_t>(s));
                    }
                    switchyard::cuda::GroupedGemmArgs args;
                    args.dtype = switchyard::DType::kBF16;
                    args.num_groups = m.experts;
                    args.n = g.n;
                    args.k = g.k;
                    args.max_rows = total;
                    args.offsets = d_off;
                    const size_t ws_bytes = switchyard::cuda::grouped_gemm_workspace_size(args);
                    void* ws = nullptr;
                    BENCH_CUDA(cudaMalloc(&ws, std::max<size_t>(ws_bytes, 256)));
                    Row r;
                    r.model = m.name;
                    r.gemm = g.name;
                    r.tokens = tokens;
                    r.experts = m.experts;
                    r.n = g.n;
                    r.k = g.k;
                    r.rows = total;
                    r.hit_experts = hit;
                    r.counts = counts;
                    r.kernel = switchyard::cuda::grouped_gemm_kernel_name(args);
                    r.ms = time_gemm(args, as, bs, cs, ws, ws_bytes, o);
                    const double flops = 2.0 * total * g.n * g.k;
                    r.tflops = flops / (r.ms * 1e-3) / 1e12;
                    const double bytes = double(hit) * g.n * g.k * 2 + double(a_bytes) + double(c_bytes);
                    r.floor_ms = std::max(flops / (ceil.bf16_tflops * 1e12), bytes / (ceil.copy_tbps * 1e12)) * 1e3;
                    if (o.all_tiles) {
                        const std::pair<const char*, switchyard::cuda::GroupedGemmTile> all[] = {
                            {"large", switchyard::cuda::GroupedGemmTile::kLarge},
                            {"medium", switchyard::cuda::GroupedGemmTile::kMedium},
                            {"small", switchyard::cuda::GroupedGemmTile::kSmall},
                            {"large-n2", switchyard::cuda::GroupedGemmTile::kLargeClusterN},
                            {"large-c1", switchyard::cuda::GroupedGemmTile::kLargeNoCluster}};
                        // Every configuration is timed afresh, the automatic one included: on an H100 the first
                        // configuration timed on a new problem read up to 13% slower than the same one re-timed
                        // later (2026-11-27), so the automatic row's own time is not reused for the comparison.
                        for (const auto& t : all) {
                            args.tile = t.second;
                            r.tiles.emplace_back(t.first, time_gemm(args, as, bs, cs, ws, ws_bytes, o));
                        }
                        args.tile = switchyard::cuda::GroupedGemmTile::kAuto;
                        args.raster = switchyard::cuda::GemmRaster::kAlongN;  // kAuto is kAlongM
                        r.tiles.emplace_back("raster-n", time_gemm(args, as, bs, cs, ws, ws_bytes, o));
                        args.raster = switchyard::cuda::GemmRaster::kAuto;
                    }
                    if (o.epilogues && switchyard::cuda::grouped_gemm_supported(args)) {
                        // The automatic choice, then the Cooperative tile without a cluster with each epilogue,
                        // alternated (--rounds).
                        std::vector<std::function<void(size_t)>> calls;
                        for (const auto& e : kEpilogues) {
                            calls.push_back([&, e](size_t s) {
                                switchyard::cuda::GroupedGemmArgs x = args;
                                x.a = as[s];
                                x.b = bs[s];
                                x.c = cs[s];
                                if (e.second != switchyard::cuda::GroupedGemmEpilogue::kAuto) {
                                    x.tile = switchyard::cuda::GroupedGemmTile::kLargeNoCluster;
                                    x.epilogue = e.second;
                                }
                                switchyard::cuda::grouped_gemm(x, ws, ws_bytes, nullptr);
                            });
                        }
                        const std::vector<double> ms = time_alternated(calls, sets, o);
                        for (size_t v = 0; v < ms.size(); ++v) r.tiles.emplace_back(kEpilogues[v].first, ms[v]);
                    }
                    rows.push_back(r);
                    print_row(r, ceil.bf16_tflops);
                    if (o.gated && g.n == 2 * m.ffn) {
                        // GEMM1 + SwiGLU: unfused (c then the activation kernel into h) and the gated epilogue
                        // (h directly; b read as interleaved: random weights either way), alternated twice.
                        std::vector<void*> hs(sets);
                        for (size_t s = 0; s < sets; ++s) BENCH_CUDA(cudaMalloc(&hs[s], size_t(total) * m.ffn * 2 + 16));
                        switchyard::cuda::GroupedGemmArgs gated = args;
                        gated.gated = true;
                        gated.activation = switchyard::Activation::kSwiGLU;
                        const size_t gws_bytes = switchyard::cuda::grouped_gemm_workspace_size(gated);
                        void* gws = nullptr;
                        BENCH_CUDA(cudaMalloc(&gws, std::max<size_t>(gws_bytes, 256)));
                        auto unfused = [&](size_t s) {
                            args.a = as[s];
                            args.b = bs[s];
                            args.c = cs[s];
                            switchyard::cuda::grouped_gemm(args, ws, ws_bytes, nullptr);
                            switchyard::cuda::activation_rows(switchyard::Activation::kSwiGLU,
                                                              switchyard::DType::kBF16, cs[s], total,
                                                              d_off + m.experts, m.ffn, hs[s], nullptr);
                        };
                        // keep: the training forward's kernel, GEMM1's product stored into cs[s] beside h
                        auto fused_with = [&](switchyard::cuda::GroupedGemmTile tile, bool keep) {
                            return [&, tile, keep](size_t s) {
                                gated.a = as[s];
                                gated.b = bs[s];
                                gated.c = hs[s];
                                gated.tile = tile;
                                gated.gate_up_out = keep ? cs[s] : nullptr;
                                switchyard::cuda::grouped_gemm(gated, gws, gws_bytes, nullptr);
                            };
                        };
                        using switchyard::cuda::GroupedGemmTile;
                        const std::pair<const char*, GroupedGemmTile> variants[] = {
                            {"auto", GroupedGemmTile::kAuto},
                            {"coop-2x1", GroupedGemmTile::kLarge},
                            {"coop-c1", GroupedGemmTile::kLargeNoCluster},
                            {"pingpong-64x256", GroupedGemmTile::kMedium}};
                        // Alternated: the unfused chain, then every gated kernel, then every one keeping g, twice
                        // over; the second round counts.
                        double t_unfused = 0;
                        std::vector<double> t_fused(4, 0.0), t_keep(4, 0.0);
                        for (int round = 0; round < 2; ++round) {
                            t_unfused = time_calls(unfused, sets, o);
                            for (int v = 0; v < 4; ++v)
                                t_fused[v] = time_calls(fused_with(variants[v].second, false), sets, o);
                            for (int v = 0; v < 4; ++v)
                                t_keep[v] = time_calls(fused_with(variants[v].second, true), sets, o);
                        }
                        gated.tile = GroupedGemmTile::kAuto;
                        // Floors: weights hit + A read + h written; "up keep" (the training forward, whose backward
                        // needs the product) writes g [rows, 2F] too.
                        const double gbytes = double(hit) * g.n * g.k * 2 + double(a_bytes) + double(total) * m.ffn * 2;
                        const double kbytes = gbytes + double(total) * g.n * 2;
                        for (int row = 0; row < 3; ++row) {  // up+act, up gated, up keep
                            Row x = r;
                            x.tiles.clear();
                            x.gemm = row == 0 ? "up+act" : row == 1 ? "up gated" : "up keep";
                            gated.gate_up_out = row == 2 ? cs[0] : nullptr;
                            x.kernel = row ? switchyard::cuda::grouped_gemm_kernel_name(gated)
                                           : std::string(r.kernel) + " + activation";
                            const std::vector<double>& t = row == 1 ? t_fused : t_keep;
                            x.ms = row ? t[0] : t_unfused;
                            if (row)
                                for (int v = 1; v < 4; ++v) x.tiles.emplace_back(variants[v].first, t[v]);
                            x.tflops = flops / (x.ms * 1e-3) / 1e12;
                            x.floor_ms = std::max(flops / (ceil.bf16_tflops * 1e12),
                                                  (row == 2 ? kbytes : gbytes) / (ceil.copy_tbps * 1e12)) * 1e3;
                            rows.push_back(x);
                            print_row(x, ceil.bf16_tflops);
                        }
                        gated.gate_up_out = nullptr;
                        BENCH_CUDA(cudaFree(gws));
                        for (size_t s = 0; s < sets; ++s) BENCH_CUDA(cudaFree(hs[s]));
                    }
                    if (o.backward) {
                        using switchyard::cuda::GemmRaster;
                        for (size_t s = 0; s < sets; ++s) fill(cs[s], total * g.n, 300 + static_cast<uint32_t>(s));
                        void *da = nullptr, *db = nullptr, *gws = nullptr;
                        BENCH_CUDA(cudaMalloc(&da, a_bytes + 16));
                        BENCH_CUDA(cudaMalloc(&db, b_bytes));
                        switchyard::cuda::GroupedGemmGradArgs ga;
                        ga.dtype = switchyard::DType::kBF16;
                        ga.num_groups = m.experts;
                        ga.n = g.n;
                        ga.k = g.k;
                        ga.max_rows = total;
                        ga.offsets = d_off;
                        const size_t gws_bytes = switchyard::cuda::grouped_gemm_grad_workspace_size(ga);
                        BENCH_CUDA(cudaMalloc(&gws, std::max<size_t>(gws_bytes, 256)));
                        for (bool wgrad : {false, true}) {
                            Row b = r;
                            b.gemm = std::string(g.name) + (wgrad ? " wgrad" : " dgrad");
                            b.tiles.clear();
                            b.kernel = wgrad ? switchyard::cuda::grouped_gemm_wgrad_kernel_name(ga)
                                             : switchyard::cuda::grouped_gemm_dgrad_kernel_name(ga);
                            b.ms = time_grad(ga, wgrad, as, bs, cs, da, db, gws, gws_bytes, o);
                            b.tflops = flops / (b.ms * 1e-3) / 1e12;
                            // dgrad reads dC and the hit experts' B, writes dA; wgrad reads dC and A, writes all dB.
                            const double gbytes = wgrad ? double(c_bytes) + double(a_bytes) + double(b_bytes)
                                                        : double(c_bytes) + double(hit) * g.n * g.k * 2 + a_bytes;
                            b.floor_ms =
                                std::max(flops / (ceil.bf16_tflops * 1e12), gbytes / (ceil.copy_tbps * 1e12)) * 1e3;
                            if (o.epilogues) {  // each epilogue, alternated (--rounds); dgrad without a cluster
                                std::vector<std::function<void(size_t)>> calls;
                                std::vector<const char*> names;
                                for (const auto& e : kEpilogues) {
                                    using switchyard::cuda::GroupedGemmEpilogue;
                                    if (wgrad && e.second == GroupedGemmEpilogue::kTma128) continue;  // not built
                                    const bool forced = e.second != GroupedGemmEpilogue::kAuto;
                                    names.push_back(e.first);
                                    calls.push_back([&, e, forced](size_t s) {
                                        switchyard::cuda::GroupedGemmGradArgs x = ga;
                                        x.dc = cs[s];
                                        if (wgrad) {
                                            x.a = as[s];
                                            x.db = db;
                                            if (forced) x.wgrad_epilogue = e.second;
                                            switchyard::cuda::grouped_gemm_wgrad(x, gws, gws_bytes, nullptr);
                                        } else {
                                            x.b = bs[s];
                                            x.da = da;
                                            if (forced) {
                                                x.dgrad_tile = switchyard::cuda::GroupedGemmTile::kLargeNoCluster;
                                                x.dgrad_epilogue = e.second;
                                            }
                                            switchyard::cuda::grouped_gemm_dgrad(x, gws, gws_bytes, nullptr);
                                        }
                                    });
                                }
                                const std::vector<double> ms = time_alternated(calls, sets, o);
                                for (size_t v = 0; v < ms.size(); ++v) b.tiles.emplace_back(names[v], ms[v]);
                            }
                            if (o.all_tiles) {
                                for (auto rs : {std::make_pair("raster-m", GemmRaster::kAlongM),
                                                std::make_pair("raster-n", GemmRaster::kAlongN)}) {
                                    ga.raster = rs.second;
                                    b.tiles.emplace_back(rs.first,
                                                         time_grad(ga, wgrad, as, bs, cs, da, db, gws, gws_bytes, o));
                                }
                                ga.raster = GemmRaster::kAuto;
                                using switchyard::cuda::GroupedGemmTile;
                                if (!wgrad) {  // dgrad's M is the expert's rows: the three clusters, as the forward
                                    for (auto dt : {std::make_pair("large", GroupedGemmTile::kLarge),
                                                    std::make_pair("large-n2", GroupedGemmTile::kLargeClusterN),
                                                    std::make_pair("large-c1", GroupedGemmTile::kLargeNoCluster)}) {
                                        ga.dgrad_tile = dt.second;
                                        b.tiles.emplace_back(
                                            dt.first, time_grad(ga, wgrad, as, bs, cs, da, db, gws, gws_bytes, o));
                                    }
                                    ga.dgrad_tile = GroupedGemmTile::kAuto;
                                }
                            }
                            rows.push_back(b);
                            print_row(b, ceil.bf16_tflops);
                        }
                        BENCH_CUDA(cudaFree(da));
                        BENCH_CUDA(cudaFree(db));
                        BENCH_CUDA(cudaFree(gws));
                    }
                    BENCH_CUDA(cudaFree(ws));
                    for (size_t s = 0; s < sets; ++s) {
                        BENCH_CUDA(cudaFree(as[s]));
                        BENCH_CUDA(cudaFree(bs[s]));
                        BENCH_CUDA(cudaFree(cs[s]));
                    }
                }
                BENCH_CUDA(cudaFree(d_off));
            }
        }
    } catch (const switchyard::Error& e) {
        std::fprintf(stderr, "switchyard error: %s\n", e.what());
        return 1;
    }

    if (!o.json.empty()) {
        FILE* f = std::fopen(o.json.c_str(), "w");
        if (!f) {
            std::fprintf(stderr, "cannot write %s\n", o.json.c_str());
            return 1;
        }
        std::fprintf(f, "{\n  \"device\": \"%s\",\n  \"bf16_ceiling_tflops\": %.2f,\n  \"copy_tbps\": %.4f,\n",
                     prop.name, ceil.bf16_tflops, ceil.copy_tbps);
        std::fprintf(f, "  \"rows\": [\n");
        for (size_t i = 0; i < rows.size(); ++i) {
            const Row& r = rows[i];
            std::fprintf(f,
                         "    {\"model\": \"%s\", \"gemm\": \"%s\", \"tokens\": %lld, \"experts\": %lld, \"n\": %lld, "
                         "\"k\": %lld, \"rows\": %lld, \"hit_experts\": %lld, \"kernel\": \"%s\", \"ms\": %.5f, "
                         "\"tflops\": %.2f, \"floor_ms\": %.5f, \"tiles\": {",
                         r.model.c_str(), r.gemm.c_str(), (long long)r.tokens, (long long)r.experts, (long long)r.n,
                         (long long)r.k, (long long)r.rows, (long long)r.hit_experts, r.kernel.c_str(), r.ms,
                         r.tflops, r.floor_ms);
            for (size_t t = 0; t < r.tiles.size(); ++t) {
                std::fprintf(f, "%s\"%s\": %.5f", t ? ", " : "", r.tiles[t].first.c_str(), r.tiles[t].second);
            }
            std::fprintf(f, "}, \"counts\": [");
            for (size_t e = 0; e < r.counts.size(); ++e) std::fprintf(f, "%s%d", e ? "," : "", r.counts[e]);
            std::fprintf(f, "]}%s\n", i + 1 < rows.size() ? "," : "");
        }
        std::fprintf(f, "  ]\n}\n");
        std::fclose(f);
    }
    return 0;
}
