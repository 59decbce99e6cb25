// tools/switchyard/profile_gpu.h: the GPU half of `switchyard profile --device cuda`.
//
// run_gpu_profile() measures, in one run on device 0, and returns everything as one JSON object (the schema is
// written out in profile_gpu.cpp's header); render_gpu_report() (profile_report.cpp) turns that object into
// PROFILE.md using only values stored in it, so every number of the text is in profile.json.
// A failure of one configuration (out of memory, unsupported option, a CUDA error) is recorded in the object's
// "failures" list and in the row it belongs to, and the run goes on. In a build without the CUDA backend
// run_gpu_profile throws switchyard::Error; render_gpu_report is always built (a CPU test renders a stored
// report).
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "switchyard/switchyard.h"

namespace switchyard {
namespace cli {

struct GpuProfileOptions {
    std::vector<std::string> shapes;  // named shapes (shapes.h)
    std::vector<int64_t> tokens;
    DType dtype = DType::kBF16;
    int warmup = 5, reps = 20;
    uint64_t seed = 1;
    bool quick = false;
    bool ncu = false;          // run Nsight Compute on one forward when `ncu` is on PATH
    std::string torch = "auto";  // auto | off: PyTorch peers through bench/compare_torch.py
    std::string repo_root;     // where bench/compare_torch.py lives (default: the current directory)
    std::string self_exe;      // this binary (ncu runs it again with --ncu-child)
    std::string out_dir;       // raw outputs of the PyTorch and ncu runs go here
    int64_t util_tokens = 4096;
    std::string command;       // the command line, for the report
};

// Steps run_gpu_profile() reports through `progress` (for the progress bar's total).
int gpu_profile_steps(const GpuProfileOptions& o);

nlohmann::ordered_json run_gpu_profile(const GpuProfileOptions& o, const std::function<void(const std::string&)>& progress,
                                       const std::function<void(const std::string&)>& note);

// The ncu child: one forward of `shape` at `tokens` tokens on device 0 between cudaProfilerStart/Stop.
int run_ncu_child(const std::string& shape, int64_t tokens, DType dtype, uint64_t seed);

// Derives j["next_steps"] from the measured gaps (largest first); needs j["utilisation"] and j["constants"].
void add_gpu_next_steps(nlohmann::ordered_json& j);
// PROFILE.md from run_gpu_profile's object (after add_gpu_next_steps).
std::string render_gpu_report(const nlohmann::ordered_json& j);

}  // namespace cli
}  // namespace switchyard
