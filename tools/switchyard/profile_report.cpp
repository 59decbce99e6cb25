// tools/switchyard/profile_report.cpp: PROFILE.md of a GPU run from its profile.json object (profile_gpu.h).
//
// add_gpu_next_steps() derives the "next steps" from the measured gaps and stores them in the object; then
// render_gpu_report() writes the seed study's sections in the seed's order (Hardware Configuration; Performance
// Metrics: Router Performance, Full MoE Layer Performance; Memory Usage Patterns: Router, MoE Layer; Identified
// Bottlenecks: Computational, Memory; Expert Utilization Analysis; Next Steps), then Plots and Failures.
// Rule: every number printed comes from a value of the object (formatted; byte counts printed with binary units),
// so scripts/plot_profile.py --check can verify that each number of PROFILE.md is in profile.json.
// Missing values (a configuration that failed) print as "-" or as the recorded reason.
#include <algorithm>
#include <cmath>
#include <sstream>

#include "profile_common.h"
#include "profile_gpu.h"
#include "stages.h"

namespace switchyard {
namespace cli {

using J = nlohmann::ordered_json;

namespace {

bool num(const J& o, const char* key) { return o.is_object() && o.contains(key) && o[key].is_number(); }
double get(const J& o, const char* key, double dflt = 0) { return num(o, key) ? o[key].get<double>() : dflt; }
std::string str(const J& o, const char* key, const std::string& dflt = "") {
    return o.is_object() && o.contains(key) && o[key].is_string() ? o[key].get<std::string>() : dflt;
}
// A number of the object formatted, or "-".
std::string F(const J& o, const char* key, const char* f) { return num(o, key) ? fmt_num(f, o[key].get<double>()) : "-"; }
std::string Bytes(const J& o, const char* key) { return num(o, key) ? human_bytes(o[key].get<double>()) : "-"; }
std::string I(const J& o, const char* key) {
    return num(o, key) ? std::to_string(static_cast<long long>(std::llround(o[key].get<double>()))) : "-";
}
std::string one_line(std::string s) {
    for (char& c : s)
        if (c == '\n' || c == '\r' || c == '|') c = ' ';
    if (s.size() > 160) s = s.substr(0, 157) + "...";
    return s;
}

const J* find_stage(const J& L, const std::string& name) {
    if (!L.contains("stages")) return nullptr;
    for (const J& s : L["stages"])
        if (s.value("stage", "") == name) return &s;
    return nullptr;
}

// Rows of one shape, in the order measured (tokens ascending as given).
std::vector<const J*> rows_of(const J& arr, const std::string& shape) {
    std::vector<const J*> r;
    for (const J& x : arr)
        if (x.value("shape", "") == shape) r.push_back(&x);
    return r;
}

std::vector<std::string> shapes_of(const J& j) {
    std::vector<std::string> s;
    for (const J& x : j["layers"]) {
        const std::string n = x.value("shape", "");
        if (std::find(s.begin(), s.end(), n) == s.end()) s.push_back(n);
    }
    return s;
}

const char* kStageOrder[] = {"router", "plan",   "dispatch", "gemm1",  "activation",
                             "gemm2",  "shared", "combine",  "experts"};


// Title, run settings and the shapes profiled.
void render_gpu_header(const J& j, std::ostringstream& md) {
    md << "# MoE Router Baseline Profiling\n\n"
       << "This document contains profiling results and analysis for the seed study's baseline MoE router and layer "
          "(dense GShard dispatch/combine) beside Switchyard's sparse path and the PyTorch peers, all measured in one "
          "run by `switchyard profile` on "
       << str(j, "generated") << " (command: `" << str(j, "command") << "`). Device: CUDA; activation and weight "
       << "dtype " << str(j, "dtype") << "; times are medians of " << I(j, "reps") << " runs between CUDA events after "
       << I(j, "warmup") << " warm-up runs; random weights generated on the GPU (nn.Linear-style uniform init, seed "
       << I(j, "seed") << "), inputs uniform(-1, 1).\n\nShapes profiled:\n";
    for (const J& c : j["shape_configs"]) md << "- `" << str(c, "shape") << "`: " << str(c, "config") << "\n";
}

// Hardware Configuration: the GPU, CUDA versions, memory and the ceilings of this run.
void render_gpu_hardware(const J& j, std::ostringstream& md) {
    const J& hw = j["hardware"];
    md << "\n## Hardware Configuration\n"
       << "- GPU: " << str(hw, "gpu_name") << ", " << I(hw, "sm_count") << " SMs, compute capability "
       << str(hw, "compute_capability") << ", L2 " << F(hw, "l2_cache_mib", "%.0f") << " MiB\n"
       << "- CUDA Version: runtime " << str(hw, "runtime_cuda_version") << ", driver supports "
       << str(hw, "driver_cuda_version") << "\n"
       << "- Available Memory: " << F(hw, "memory_free_gib_at_start", "%.1f") << " GiB free of "
       << F(hw, "memory_total_gib", "%.1f") << " GiB on the GPU at the start of the run; host: "
       << str(hw, "cpu_model") << ", " << I(hw, "logical_cores") << " logical cores, "
       << F(hw, "host_mem_total_gib", "%.1f") << " GiB\n"
       << "- Ceilings (" << str(hw, "ceiling_source") << "): bf16 matrix product "
       << F(hw, "bf16_tflops", "%.1f") << " TFLOP/s (cuBLAS " << I(hw, "bf16_gemm_n") << "^3 in "
       << F(hw, "bf16_gemm_ms", "%.3f") << " ms); device copy " << F(hw, "copy_gbs", "%.1f") << " GB/s (bytes read + "
       << "written, " << Bytes(hw, "copy_bytes") << " in " << F(hw, "copy_ms", "%.3f") << " ms). The floor of any "
       << "measurement is max(FLOPs / matrix rate, bytes that must move / copy bandwidth).\n";
}

// Router Performance: Switchyard's router + plan vs the seed's router, per shape and T.
void render_gpu_router(const J& j, std::ostringstream& md) {
    const std::vector<std::string> shapes = shapes_of(j);
    md << "\n## Performance Metrics\n\n### Router Performance\nThe router is responsible for:\n"
       << "1. Computing routing probabilities using a linear layer\n"
       << "2. Selecting top-k experts for each token\n"
       << "3. Creating dispatch and combine tensors (the seed: one-hot [T, E, C]) / a routing plan of counts, offsets "
          "and row maps (Switchyard)\n\n"
       << "The seed's router here is its algorithm as separate GPU passes (gate GEMM, softmax over E, top-k of the "
          "probabilities, positions inside each expert, zero-filled dispatch and combine [T, E, C] with C = the largest "
          "expert count, the dense baseline's dropless capacity). Switchyard's is the fused router (gate GEMM + one "
          "scoring/top-k kernel) plus the device-side routing plan. The router floor counts the gate GEMM's FLOPs and "
          "the bytes of x and the gate read and of the top-k and plan arrays written.\n\n"
       << "| shape | T | Switchyard router + plan (ms) | achieved GB/s | floor (ms) | % of floor | bound | seed router "
          "(ms) | seed C | speed-up |\n|---|---|---|---|---|---|---|---|---|---|\n";
    double lo_sp = 0, hi_sp = 0;
    for (const J& r : j["router"]) {
        if (r.contains("error")) {
            md << "| " << str(r, "shape") << " | " << I(r, "tokens") << " | failed: " << one_line(str(r, "error"))
               << " | | | | | | | |\n";
            continue;
        }
        md << "| " << str(r, "shape") << " | " << I(r, "tokens") << " | " << F(r, "switchyard_ms", "%.4f") << " | "
           << F(r, "achieved_gbs", "%.1f") << " | " << F(r, "floor_ms", "%.4f") << " | "
           << F(r, "pct_of_floor", "%.1f") << "% | " << str(r, "bound") << " | "
           << (num(r, "seed_ms") ? F(r, "seed_ms", "%.4f") : "not run: " + one_line(str(r, "seed_error"))) << " | "
           << I(r, "seed_capacity") << " | " << F(r, "speedup", "%.2f") << "x |\n";
        if (num(r, "speedup")) {
            lo_sp = lo_sp == 0 ? get(r, "speedup") : std::min(lo_sp, get(r, "speedup"));
            hi_sp = std::max(hi_sp, get(r, "speedup"));
        }
    }
    md << "\nKey findings:\n";
    for (const std::string& sh : shapes) {
        std::vector<const J*> rs = rows_of(j["router"], sh);
        const J* big = nullptr;
        for (const J* r : rs)
            if (num(*r, "switchyard_ms")) big = r;
        if (!big) continue;
        md << "- `" << sh << "` at T=" << I(*big, "tokens") << ": Switchyard's router + plan takes "
           << F(*big, "switchyard_ms", "%.4f") << " ms (" << F(*big, "pct_of_floor", "%.1f")
           << "% of its floor), the seed's " << (num(*big, "seed_ms") ? F(*big, "seed_ms", "%.4f") + " ms" : "did not run")
           << (num(*big, "speedup") ? " (" + F(*big, "speedup", "%.2f") + "x)" : std::string()) << "; the seed's "
           << "one-hot tensors alone are " << Bytes(*big, "seed_onehot_bytes") << ".\n";
    }
    const J* r4096 = nullptr;
    for (const J& r : j["router"])
        if (num(r, "switchyard_ms") && get(r, "tokens") == 4096) r4096 = &r;
    if (r4096)
        md << "- At T=4096 (`" << str(*r4096, "shape") << "`) the router + plan takes "
           << F(*r4096, "switchyard_ms", "%.4f") << " ms against DESIGN.md's target of "
           << F(j["constants"], "router_target_us", "%.0f") << " us.\n";
    if (hi_sp > 0)
        md << "- Across the rows that ran both, Switchyard's router + plan is " << fmt_num("%.2f", lo_sp) << "x to "
           << fmt_num("%.2f", hi_sp) << "x faster than the seed's router.\n";
}

// Full MoE Layer Performance: Switchyard vs the dense baseline and the PyTorch peers, against the floor.
void render_gpu_layer(const J& j, std::ostringstream& md) {
    const std::vector<std::string> shapes = shapes_of(j);
    md << "\n### Full MoE Layer Performance\nThe MoE layer combines the router with expert feed-forward networks.\n\n"
       << "Floors use the ceilings above: FLOPs of the kept rows (router, experts, shared expert), bytes of the "
          "weights of every expert that receives a row plus x and y once. PyTorch peers are bench/compare_torch.py "
          "--layers in the same run (`sort` = sort + torch._grouped_mm, `loop` = Hugging Face loop over experts, "
          "`dense` = the seed's GShard code); their % of floor is against Switchyard's floor of the same row.\n\n"
       << "| shape | T | floor (ms) | bound | Switchyard (ms) | TFLOP/s | % of floor | dense baseline (ms) | dense / "
          "Switchyard | torch sort (ms) | torch loop (ms) | torch dense (ms) | best peer / Switchyard |\n"
       << "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (const J& L : j["layers"]) {
        md << "| " << str(L, "shape") << " | " << I(L, "tokens") << " | ";
        if (!L.contains("switchyard")) {
            md << "- | - | failed: "
               << one_line(str(L, "switchyard_error", str(L, "error", "not measured"))) << " | | | | | | | | |\n";
            continue;
        }
        const J& s = L["switchyard"];
        md << F(L, "floor_ms", "%.4f") << " | " << str(L, "bound") << " | " << F(s, "ms", "%.4f") << " | "
           << F(s, "tflops", "%.1f") << " | " << F(s, "pct_of_floor", "%.1f") << "% | ";
        const J d = L.value("dense", J::object());
        if (d.value("ran", false))
            md << F(d, "ms", "%.3f") << " | " << F(d, "switchyard_speedup", "%.2f") << "x | ";
        else
            md << "not run: " << one_line(str(d, "reason", "-")) << " | - | ";
        const J peers = L.value("torch", J::object());
        for (const char* impl : {"sort", "loop", "dense"}) {
            const J p = peers.value(impl, J::object());
            if (num(p, "ms"))
                md << F(p, "ms", "%.3f") << " | ";
            else
                md << (p.contains("note") ? one_line(str(p, "note")) : std::string("-")) << " | ";
        }
        md << (num(L, "speedup_vs_best_torch") ? F(L, "speedup_vs_best_torch", "%.2f") + "x" : "-") << " |\n";
    }
    md << "\nKey findings:\n";
    for (const std::string& sh : shapes) {
        std::vector<const J*> ok;
        for (const J* L : rows_of(j["layers"], sh))
            if (L->contains("switchyard")) ok.push_back(L);
        if (ok.empty()) {
            md << "- `" << sh << "`: no configuration ran (see Failures).\n";
            continue;
        }
        const J& lo = *ok.front();
        const J& hi = *ok.back();
        md << "- `" << sh << "`: Switchyard takes " << F(lo["switchyard"], "ms", "%.4f") << " ms at T=" << I(lo, "tokens")
           << " (" << F(lo["switchyard"], "pct_of_floor", "%.1f") << "% of floor) and " << F(hi["switchyard"], "ms", "%.4f")
           << " ms at T=" << I(hi, "tokens") << " (" << F(hi["switchyard"], "pct_of_floor", "%.1f") << "%, "
           << F(hi["switchyard"], "tflops", "%.1f") << " TFLOP/s)";
        const J* last_dense = nullptr;
        const J* first_refused = nullptr;
        for (const J* L : ok) {
            const J d = L->value("dense", J::object());
            if (d.value("ran", false)) last_dense = L;
            if (!d.value("ran", true) && !first_refused) first_refused = L;
        }
        if (last_dense)
            md << "; the dense baseline is " << F((*last_dense)["dense"], "switchyard_speedup", "%.2f")
               << "x slower at T=" << I(*last_dense, "tokens");
        if (first_refused)
            md << "; it does not fit from T=" << I(*first_refused, "tokens") << " ("
               << one_line(str((*first_refused)["dense"], "reason")) << ")";
        if (num(hi, "speedup_vs_best_torch"))
            md << "; the best PyTorch peer (" << str(hi, "best_torch_impl") << ") takes "
               << F(hi, "best_torch_ms", "%.3f") << " ms at T=" << I(hi, "tokens") << ", "
               << F(hi, "speedup_vs_best_torch", "%.2f") << "x Switchyard's time";
        md << ".\n";
    }
    const J& tj = j["torch"];
    if (!tj.value("available", false))
        md << "- PyTorch peers not measured: " << one_line(str(tj, "reason", "not run")) << ".\n";
    else
        md << "- PyTorch peers ran on " << str(tj, "device") << " (their own ceilings: "
           << F(tj, "ceiling_tflops", "%.1f") << " TFLOP/s, " << F(tj, "copy_tbps", "%.2f") << " TB/s).\n";
}

// Memory Usage Patterns: router memory, the layer workspace by stage, what fits on the card.
void render_gpu_memory(const J& j, std::ostringstream& md) {
    const std::vector<std::string> shapes = shapes_of(j);
    md << "\n## Memory Usage Patterns\n\n### Router Memory Usage\n"
       << "| shape | T | seed router workspace | of which one-hot dispatch + combine | of which probs | Switchyard "
          "router + plan workspace | of which plan |\n|---|---|---|---|---|---|---|\n";
    for (const J& r : j["router"]) {
        if (!num(r, "switchyard_bytes")) continue;
        md << "| " << str(r, "shape") << " | " << I(r, "tokens") << " | " << Bytes(r, "seed_bytes") << " | "
           << Bytes(r, "seed_onehot_bytes") << " | " << Bytes(r, "seed_probs_bytes") << " | "
           << Bytes(r, "switchyard_bytes") << " | " << Bytes(r, "switchyard_plan_bytes") << " |\n";
    }
    md << "\n- The seed's one-hot tensors grow as T x E x C = O(T^2 k) bytes (C ~ T k / E); Switchyard's plan grows "
          "as O(T k). Both workspaces include the gate GEMM's cuBLAS workspace.\n";
    md << "\n### MoE Layer Memory Usage\n"
       << "Switchyard's workspace is exact: one allocation carved into 256-byte aligned slices (src/cuda/moe_cuda.cu); "
          "the profile recounts it slice by slice, checks the sum against moe_workspace_size, and measures the "
          "allocation with cudaMemGetInfo. \"Stage peak\" is the most any one stage touches (what a stage-by-stage "
          "allocator would need). The dense baseline's need is its arena formula (src/baseline/dense.h) at the C of "
          "this routing; its measured peak is the arena it allocated.\n\n"
       << "| shape | T | workspace | measured allocation | recount matches | stage peak (stage) | DESIGN budget T k "
          "(2H+3F) a | fused goal T k (H+F) a | dense need | dense measured peak | dense need / workspace |\n"
       << "|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (const J& L : j["layers"]) {
        if (!L.contains("memory")) continue;
        const J& m = L["memory"];
        const J d = L.value("dense", J::object());
        md << "| " << str(L, "shape") << " | " << I(L, "tokens") << " | " << Bytes(m, "workspace_bytes") << " | "
           << Bytes(m, "workspace_measured_bytes") << " | " << (m.value("layout_check", false) ? "yes" : "no") << " | "
           << Bytes(m, "stage_peak_bytes") << " (" << str(m, "stage_peak_stage") << ") | "
           << Bytes(m, "design_budget_bytes") << " | " << Bytes(m, "fused_goal_bytes") << " | "
           << Bytes(d, "bytes_needed") << " | " << (d.value("ran", false) ? Bytes(d, "peak_bytes") : "not run")
           << " | " << F(L, "dense_over_workspace", "%.1f") << "x |\n";
    }
    md << "\nPeak bytes by stage (Switchyard, bytes each stage touches in the workspace), largest T per shape:\n\n"
       << "| shape | T |";
    for (const char* st : kStageOrder) md << " " << st << " |";
    md << "\n|---|---|";
    for (size_t i = 0; i < sizeof kStageOrder / sizeof *kStageOrder; ++i) md << "---|";
    md << "\n";
    for (const std::string& sh : shapes) {
        const J* big = nullptr;
        for (const J* L : rows_of(j["layers"], sh))
            if (L->contains("memory")) big = L;
        if (!big) continue;
        md << "| " << sh << " | " << I(*big, "tokens") << " |";
        for (const char* st : kStageOrder) {
            std::string cell = "-";
            for (const J& b : (*big)["memory"]["by_stage"])
                if (b.value("stage", "") == st) cell = Bytes(b, "live_bytes");
            md << " " << cell << " |";
        }
        md << "\n";
    }
    md << "\nLargest token count that fits on this card beside the layer's weights (Switchyard: workspace + x + y; "
          "dense baseline: its arena + x + y at capacity factor 1.0, its best case):\n\n"
       << "| shape | weights | free with weights resident | Switchyard max T | bytes per token | dense baseline max T |\n"
       << "|---|---|---|---|---|---|\n";
    for (const J& f : j["fits"]) {
        if (f.contains("error") && !num(f, "switchyard_max_tokens")) {
            md << "| " << str(f, "shape") << " | failed: " << one_line(str(f, "error")) << " | | | | |\n";
            continue;
        }
        md << "| " << str(f, "shape") << " | " << Bytes(f, "weight_bytes") << " | " << Bytes(f, "free_bytes_with_weights")
           << " | " << I(f, "switchyard_max_tokens") << " | " << F(f, "switchyard_bytes_per_token", "%.0f") << " | "
           << I(f, "dense_max_tokens") << " |\n";
    }
    md << "\n- Out of memory errors observed with larger configurations: ";
    {
        std::string first;
        for (const J& L : j["layers"]) {
            const J d = L.value("dense", J::object());
            if (!d.value("ran", true) && first.empty())
                first = "the dense baseline was refused first on `" + str(L, "shape") + "` at T=" + I(L, "tokens") +
                        " (" + one_line(str(d, "reason")) + ")";
        }
        md << (first.empty() ? std::string("none in this run's configurations") : first) << "; Switchyard ran every "
           << "configuration that is not listed under Failures.\n";
    }
    md << "- Primary memory bottleneck: the tensor multiplication `expert_outputs.unsqueeze(3) * combine_tensor` in "
          "the dense baseline's forward: its [T, E, C, H] product is ";
    {
        const J* pd = nullptr;
        for (const J& L : j["layers"])
            if (L.contains("dense") && num(L["dense"], "product_bytes")) pd = &L;
        if (pd)
            md << Bytes((*pd)["dense"], "product_bytes") << " of the " << Bytes((*pd)["dense"], "bytes_needed")
               << " the baseline needs on `" << str(*pd, "shape") << "` at T=" << I(*pd, "tokens") << ".\n";
        else
            md << "not measured in this run.\n";
    }
    md << "- Switchyard keeps no [T, E, C] or [T, E, C, H] tensor: its workspace is linear in T k.\n";
}

// Identified Bottlenecks: the stage breakdown, what bounds each stage, memory bottlenecks.
void render_gpu_bottlenecks(const J& j, std::ostringstream& md) {
    const std::vector<std::string> shapes = shapes_of(j);
    md << "\n## Identified Bottlenecks\n\n### Computational Bottlenecks\n"
       << "Stage breakdown of Switchyard's forward from CUDA events recorded between the stages (median ms; "
          "cuda::moe_forward_staged):\n\n| shape | T |";
    for (const char* st : kStageOrder) md << " " << st << " |";
    md << " sum | whole layer |\n|---|---|";
    for (size_t i = 0; i < sizeof kStageOrder / sizeof *kStageOrder + 2; ++i) md << "---|";
    md << "\n";
    for (const J& L : j["layers"]) {
        if (!L.contains("stages")) continue;
        md << "| " << str(L, "shape") << " | " << I(L, "tokens") << " |";
        for (const char* st : kStageOrder) {
            const J* s = find_stage(L, st);
            md << " " << (s ? F(*s, "ms", "%.4f") : std::string("-")) << " |";
        }
        md << " " << F(L, "stages_sum_ms", "%.4f") << " | " << F(L["switchyard"], "ms", "%.4f") << " |\n";
    }
    md << "\nWhat bounds each stage at the largest T of each shape (floor = max(FLOPs / matrix rate, bytes / copy "
          "bandwidth) with this run's ceilings):\n\n"
       << "| shape | T | stage | ms | floor (ms) | % of floor | bound | GFLOP | bytes | share of layer |\n"
       << "|---|---|---|---|---|---|---|---|---|---|\n";
    for (const std::string& sh : shapes) {
        const J* big = nullptr;
        for (const J* L : rows_of(j["layers"], sh))
            if (L->contains("stages")) big = L;
        if (!big) continue;
        for (const J& s : (*big)["stages"])
            md << "| " << sh << " | " << I(*big, "tokens") << " | " << str(s, "stage") << " | " << F(s, "ms", "%.4f")
               << " | " << F(s, "floor_ms", "%.4f") << " | " << F(s, "pct_of_floor", "%.1f") << "% | "
               << str(s, "bound") << " | " << fmt_num("%.3f", get(s, "gflop")) << " | " << Bytes(s, "bytes")
               << " | " << F(s, "share_pct", "%.1f") << "% |\n";
    }
    md << "\n";
    for (const J& st : j["next_steps"]) {
        if (str(st, "kind") != "layer" || !st.contains("stage")) continue;
        md << "- `" << str(st, "shape") << "` at T=" << I(st, "tokens") << ": the largest gap to its floor is "
           << str(st, "stage") << " (" << F(st, "stage_ms", "%.4f") << " ms against " << F(st, "stage_floor_ms", "%.4f")
           << " ms, " << str(st, "stage_bound") << "-bound, " << F(st, "stage_pct_of_floor", "%.1f")
           << "% of floor).\n";
    }
    const J& nc = j["ncu"];
    if (nc.value("ran", false)) {
        md << "\nNsight Compute on one forward (`" << str(nc, "shape") << "`, T=" << I(nc, "tokens")
           << "): per kernel duration, SM and DRAM throughput (% of peak), tensor pipe activity.\n\n"
           << "| kernel | us | SM % | DRAM % | tensor % |\n|---|---|---|---|---|\n";
        for (const J& k : nc["kernels"])
            md << "| `" << one_line(str(k, "name")) << "` | " << F(k, "time_us", "%.1f") << " | " << F(k, "sm_pct", "%.1f")
               << " | " << F(k, "dram_pct", "%.1f") << " | " << F(k, "tensor_pct", "%.1f") << " |\n";
    } else {
        md << "- Nsight Compute: not run (" << one_line(str(nc, "reason", "off")) << ").\n";
    }
    md << "\n### Memory Bottlenecks\n";
    for (const std::string& sh : shapes) {
        const J* big = nullptr;
        for (const J* L : rows_of(j["layers"], sh))
            if (L->contains("memory")) big = L;
        if (!big) continue;
        const J& m = (*big)["memory"];
        md << "- `" << sh << "` at T=" << I(*big, "tokens") << ": the workspace is " << Bytes(m, "workspace_bytes")
           << " (" << F(m, "workspace_over_budget", "%.2f") << "x DESIGN.md's budget of " << Bytes(m, "design_budget_bytes")
           << "), its largest slice being the expert rows (" << Bytes(m["slices"], "expert_rows")
           << ": the permuted rows and expert outputs " << Bytes(m["slices"], "xp") << " each, GEMM1's output "
           << Bytes(m["slices"], "g1") << " and the activation " << Bytes(m["slices"], "h")
           << ", placed so that what a stage no longer reads is overwritten); the busiest stage (" << str(m, "stage_peak_stage") << ") touches " << Bytes(m, "stage_peak_bytes")
           << ".\n";
        const J* bw = nullptr;
        if (big->contains("stages"))
            for (const J& s : (*big)["stages"])
                if (str(s, "bound") == "bandwidth" && (!bw || get(s, "gap_ms") > get(*bw, "gap_ms"))) bw = &s;
        if (bw)
            md << "  Bandwidth-bound stage with the largest gap: " << str(*bw, "stage") << " at "
               << F(*bw, "gbs", "%.1f") << " GB/s against the copy ceiling.\n";
    }
}

// Expert Utilization Analysis: synthetic routings and the timed runs' load.
void render_gpu_utilisation(const J& j, std::ostringstream& md) {
    md << "\n## Expert Utilization Analysis\n"
       << "Routing of synthetic tokens by the library's router (ref::route and ref::build_plan on the CPU; the CUDA "
          "router makes the same choices on the same logits) whose logits are log p_e + Gumbel noise, so that the top-1 "
          "expert follows p: uniform p, and Zipf p_e ~ 1/(e+1)^s. Balancing: the selection bias of aux-loss-free "
          "balancing learned over "
       << I(j["constants"], "balance_steps") << " batches at rate " << F(j["constants"], "balance_rate", "%.3f")
       << " (score_bias[e] += rate * sign(mean load - load_e)), measured on the same batch as the row above it.\n\n"
       << "| shape | logits | tokens | max/mean | cv | entropy / ln E | dropped @ cf 1.0 | @ 1.25 | @ 2.0 |\n"
       << "|---|---|---|---|---|---|---|---|---|\n";
    for (const J& u : j["utilisation"]) {
        const J& dp = u["dropped_pct"];
        md << "| " << str(u, "shape") << " | " << str(u, "logits") << " | " << I(u, "tokens") << " | "
           << F(u, "max_over_mean", "%.2f") << " | " << F(u, "cv", "%.3f") << " | "
           << F(u, "entropy_over_ln_e", "%.3f") << " | " << F(dp, "1.0", "%.1f") << "% | " << F(dp, "1.25", "%.1f")
           << "% | " << F(dp, "2.0", "%.1f") << "% |\n";
    }
    md << "\nLoad of the timed runs' router (random gate weights, uniform inputs), from the GPU forward's statistics:\n\n"
       << "| shape | T | experts hit | max/mean | cv | aux loss (1.0 = balanced) | dropped |\n|---|---|---|---|---|---|---|\n";
    for (const J& L : j["layers"]) {
        if (!L.contains("load")) continue;
        const J& ld = L["load"];
        md << "| " << str(L, "shape") << " | " << I(L, "tokens") << " | " << I(L, "experts_hit") << " | "
           << F(ld, "max_over_mean", "%.2f") << " | " << F(ld, "cv", "%.3f") << " | " << F(ld, "aux_loss", "%.4f")
           << " | " << I(ld, "dropped") << " |\n";
    }
    md << "\nPer-expert load histograms: `expert_load.png` (from the expert_counts in profile.json).\n";
}

// Next Steps: the measured gaps, largest first (add_gpu_next_steps).
void render_gpu_next_steps(const J& j, std::ostringstream& md) {
    md << "\n## Next Steps\n\nBased on the profiling results (largest measured gap first):\n\n";
    int n = 0;
    for (const J& st : j["next_steps"]) {
        const std::string kind = str(st, "kind");
        md << ++n << ". ";
        if (kind == "layer") {
            md << "`" << str(st, "shape") << "` at T=" << I(st, "tokens") << ": the layer takes " << F(st, "ms", "%.4f")
               << " ms against a floor of " << F(st, "floor_ms", "%.4f") << " ms (" << F(st, "pct_of_floor", "%.1f")
               << "%; gap " << F(st, "gap_ms", "%.4f") << " ms)";
            if (st.contains("stage"))
                md << "; work on " << str(st, "stage") << " first (" << F(st, "stage_gap_ms", "%.4f")
                   << " ms above its " << str(st, "stage_bound") << " floor)";
            if (num(st, "speedup_vs_best_torch"))
                md << "; the best PyTorch peer (" << str(st, "best_torch_impl") << ") is at "
                   << F(st, "speedup_vs_best_torch", "%.2f") << "x Switchyard's time";
            md << ".\n";
        } else if (kind == "router") {
            md << "Router + plan at T=" << I(st, "tokens") << " (`" << str(st, "shape") << "`): "
               << F(st, "ms", "%.4f") << " ms against the " << F(st, "target_ms", "%.3f") << " ms target (gap "
               << F(st, "gap_ms", "%.4f") << " ms): fuse the plan's histogram and scan into the routing kernel.\n";
        } else if (kind == "memory") {
            md << "Memory: the workspace of `" << str(st, "shape") << "` at T=" << I(st, "tokens") << " is "
               << Bytes(st, "workspace_bytes") << " while its busiest stage (" << str(st, "stage_peak_stage")
               << ") touches " << Bytes(st, "stage_peak_bytes") << ": aliasing dead slices would save "
               << Bytes(st, "saving_bytes") << "; fusing the gather and the activation into the GEMMs goes toward "
               << Bytes(st, "fused_goal_bytes") << ".\n";
        } else if (kind == "balance") {
            md << "Load balance: under " << str(st, "logits") << " logits on `" << str(st, "shape")
               << "` the busiest expert gets " << F(st, "max_over_mean", "%.2f") << "x the mean load and capacity "
               << "factor 1.0 drops " << F(st, "dropped_pct_1_0", "%.1f") << "% of the pairs ("
               << F(st, "dropped_pct_2_0", "%.1f") << "% at 2.0)";
            if (num(st, "balanced_max_over_mean"))
                md << "; the selection bias brings that to " << F(st, "balanced_max_over_mean", "%.2f") << "x and "
                   << F(st, "balanced_dropped_pct_1_0", "%.1f") << "%";
            md << ": keep dropless routing the default and use the bias rather than capacity.\n";
        }
    }
    if (n == 0) md << "1. No configuration produced a measurement (see Failures); fix those first.\n";
}

// Plots made from profile.json, and every failure recorded.
void render_gpu_plots_and_failures(const J& j, std::ostringstream& md) {
    md << "\n## Plots\nMade from profile.json by `python3 scripts/plot_profile.py " << "<this folder>`: "
       << "`time_vs_tokens.png`, `floor_pct_vs_tokens.png`, `stage_breakdown.png`, `memory_vs_tokens.png`, "
          "`expert_load.png`.\n";
    md << "\n## Failures\n";
    if (j["failures"].empty()) md << "None: every configuration ran.\n";
    for (const J& f : j["failures"]) md << "- " << one_line(str(f, "where")) << ": " << one_line(str(f, "error")) << "\n";
}

}  // namespace

void add_gpu_next_steps(J& j) {
    J steps = J::array();
    for (const std::string& shape : shapes_of(j)) {
        std::vector<const J*> rows;
        for (const J* L : rows_of(j["layers"], shape))
            if (L->contains("switchyard")) rows.push_back(L);
        if (rows.empty()) continue;
        std::vector<const J*> pick = {rows.back()};
        if (rows.front() != rows.back()) pick.insert(pick.begin(), rows.front());
        for (const J* L : pick) {
            const J& s = (*L)["switchyard"];
            J st = {{"kind", "layer"},
                    {"shape", shape},
                    {"tokens", (*L)["tokens"]},
                    {"ms", s["ms"]},
                    {"floor_ms", s["floor_ms"]},
                    {"pct_of_floor", s["pct_of_floor"]},
                    {"gap_ms", std::max(0.0, get(s, "ms") - get(s, "floor_ms"))}};
            const J* worst = nullptr;
            if (L->contains("stages"))
                for (const J& x : (*L)["stages"])
                    if (!worst || get(x, "gap_ms") > get(*worst, "gap_ms")) worst = &x;
            if (worst) {
                st["stage"] = (*worst)["stage"];
                st["stage_ms"] = (*worst)["ms"];
                st["stage_floor_ms"] = (*worst)["floor_ms"];
                st["stage_gap_ms"] = (*worst)["gap_ms"];
                st["stage_bound"] = (*worst)["bound"];
                st["stage_pct_of_floor"] = (*worst)["pct_of_floor"];
            }
            if (num(*L, "best_torch_ms")) {
                st["best_torch_impl"] = (*L)["best_torch_impl"];
                st["best_torch_ms"] = (*L)["best_torch_ms"];
                st["speedup_vs_best_torch"] = (*L)["speedup_vs_best_torch"];
            }
            steps.push_back(st);
        }
    }
    // The router at the T nearest 4096 against DESIGN.md's 15 us target.
    const J* rr = nullptr;
    for (const J& r : j["router"])
        if (num(r, "switchyard_ms") &&
            (!rr || std::abs(get(r, "tokens") - 4096) < std::abs(get(*rr, "tokens") - 4096)))
            rr = &r;
    const double target_ms = get(j["constants"], "router_target_us", 15) / 1e3;
    if (rr)
        steps.push_back({{"kind", "router"},
                         {"shape", (*rr)["shape"]},
                         {"tokens", (*rr)["tokens"]},
                         {"ms", (*rr)["switchyard_ms"]},
                         {"target_ms", target_ms},
                         {"gap_ms", std::max(0.0, get(*rr, "switchyard_ms") - target_ms)}});
    // Memory: the largest workspace against the bytes its busiest stage touches.
    const J* mem = nullptr;
    for (const J& L : j["layers"])
        if (L.contains("memory") &&
            (!mem || get(L["memory"], "workspace_bytes") > get((*mem)["memory"], "workspace_bytes")))
            mem = &L;
    if (mem) {
        const J& m = (*mem)["memory"];
        steps.push_back({{"kind", "memory"},
                         {"shape", (*mem)["shape"]},
                         {"tokens", (*mem)["tokens"]},
                         {"workspace_bytes", m["workspace_bytes"]},
                         {"stage_peak_bytes", m["stage_peak_bytes"]},
                         {"stage_peak_stage", m["stage_peak_stage"]},
                         {"saving_bytes", get(m, "workspace_bytes") - get(m, "stage_peak_bytes")},
                         {"design_budget_bytes", m["design_budget_bytes"]},
                         {"fused_goal_bytes", m["fused_goal_bytes"]},
                         {"gap_ms", 0.0}});
    }
    // Balance: the worst Zipf row, and what the selection bias did to it.
    const J* worst = nullptr;
    const J* balanced = nullptr;
    if (j.contains("utilisation")) {
        for (const J& u : j["utilisation"])
            if (get(u, "zipf_s") > 0 && !u.value("balanced", false) &&
                (!worst || get(u, "max_over_mean") > get(*worst, "max_over_mean")))
                worst = &u;
        if (worst)
            for (const J& u : j["utilisation"])
                if (u.value("balanced", false) && u["shape"] == (*worst)["shape"] &&
                    get(u, "zipf_s") == get(*worst, "zipf_s"))
                    balanced = &u;
    }
    if (worst) {
        J b = {{"kind", "balance"},
               {"shape", (*worst)["shape"]},
               {"logits", (*worst)["logits"]},
               {"max_over_mean", (*worst)["max_over_mean"]},
               {"dropped_pct_1_0", (*worst)["dropped_pct"]["1.0"]},
               {"dropped_pct_2_0", (*worst)["dropped_pct"]["2.0"]},
               {"gap_ms", 0.0}};
        if (balanced) {
            b["balanced_max_over_mean"] = (*balanced)["max_over_mean"];
            b["balanced_dropped_pct_1_0"] = (*balanced)["dropped_pct"]["1.0"];
        }
        steps.push_back(b);
    }
    std::stable_sort(steps.begin(), steps.end(),
                     [](const J& x, const J& y) { return get(x, "gap_ms") > get(y, "gap_ms"); });
    j["next_steps"] = steps;
}

std::string render_gpu_report(const J& j) {
    std::ostringstream md;
    render_gpu_header(j, md);
    render_gpu_hardware(j, md);
    render_gpu_router(j, md);
    render_gpu_layer(j, md);
    render_gpu_memory(j, md);
    render_gpu_bottlenecks(j, md);
    render_gpu_utilisation(j, md);
    render_gpu_next_steps(j, md);
    render_gpu_plots_and_failures(j, md);
    return md.str();
}

}  // namespace cli
}  // namespace switchyard
