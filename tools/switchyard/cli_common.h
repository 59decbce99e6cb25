// tools/switchyard/cli_common.h: pieces shared by the CLI's subcommands (forward, check, bench, profile).
//
// LayerFlags holds the layer options every subcommand takes (routing, capacity, activation, dtype, sizes) and
// turns them into a validated MoEConfig. Errors are switchyard::Error; main() turns them into exit code 2 and
// one line `switchyard: error: ...`. Timing helpers report the median of N runs after warm-up.
// DeviceBuffer / device copies exist only in CUDA builds (SWITCHYARD_WITH_CUDA); elsewhere asking for
// --device cuda is an error that says the build has no CUDA backend.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "io/weights.h"
#include "switchyard/switchyard.h"

namespace switchyard {
namespace cli {

// Exit codes.
constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;   // a check failed (numbers disagree)
constexpr int kExitBadInput = 2;  // bad input, bad flags, any error

struct LayerFlags {
    int64_t hidden = 0, ffn = 0, experts = 0, top_k = 0;
    std::string score = "softmax";
    bool renormalize = false;
    double routed_scale = 1.0;
    int64_t groups = 1, topk_groups = 1;
    int64_t shared_experts = -1;  // -1: not given
    int64_t shared_ffn = 0;       // width of one shared expert (random weights only; 0: = ffn)
    double capacity_factor = 0.0;
    int64_t min_capacity = 0;
    std::string drop_policy = "position";
    std::string activation = "swiglu";
    std::string dtype = "fp32";
    bool no_bias = false;
    bool use_bias = false;  // random weights: use the (random) selection bias
    double aux_loss_coef = 0.0, z_loss_coef = 0.0;
    std::string routing = "token-choice";  // token-choice | expert-choice
    double eval_capacity_factor = -1.0;    // < 0: same as --capacity-factor
    bool eval = false;                     // use the evaluation capacity factor
    bool gate_up_interleaved = false;      // random weights: w13 read in the interleaved layout
};

// Adds the layer flags to a subcommand. with_sizes: --hidden/--ffn/--experts; sizes_default: whether they have
// defaults (check/bench) or come from the weights (forward). random_weights: --shared-ffn, --use-bias and
// --gate-up-interleaved.
void add_layer_flags(CLI::App* app, LayerFlags& f, bool random_weights);

// The config from the flags alone (sizes as given; forward overrides them from the weights first).
MoEConfig make_config(const LayerFlags& f);

// --dtype: fp32 | bf16 | fp16 (and their aliases float32, bfloat16, float16, ...); anything else is an error that
// lists only those three.
DType parse_activation_dtype(const std::string& s);

// Throws unless v is finite.
void require_finite(double v, const char* flag);

// The message of an exception as one line, without the " [check ... at file:line]" suffix unless
// SWITCHYARD_DEBUG is set in the environment; control bytes escaped, at most kMaxMessageBytes (+ a note).
constexpr size_t kMaxMessageBytes = 600;
std::string one_line_message(const std::exception& e);

// Device argument: "cpu" | "cuda"; throws when cuda is asked and not available.
Device parse_device(const std::string& s);

// Median wall-clock milliseconds of fn over `reps` runs after `warmup` runs; `sync` is called after each run
// (the CUDA stream synchronise) before the clock stops. All samples returned in *samples when not null.
double median_ms(const std::function<void()>& fn, int warmup, int reps, const std::function<void()>& sync = {},
                 std::vector<double>* samples = nullptr);
// Like median_ms, but after the first `reps` runs keeps running until `budget_s` seconds of timed runs have
// passed (at most kMaxAdaptiveReps runs): cheap measurements get many samples, so a median survives the
// scheduling noise of a shared host; expensive ones cost only `reps` runs.
constexpr int kMaxAdaptiveReps = 101;
double median_ms_adaptive(const std::function<void()>& fn, int warmup, int reps, double budget_s,
                          const std::function<void()>& sync = {}, std::vector<double>* samples = nullptr);
double now_seconds();

// Host memory info for reports.
struct HostInfo {
    std::string cpu_model;
    int logical_cores = 0;
    int omp_threads = 0;
    double mem_total_gib = 0, mem_available_gib = 0;
};
HostInfo host_info();

// Largest |a - b| and relative error between two float vectors (relative to max |b|), plus the first index
// where |a-b| > atol + rtol*|b| (-1 when none).
struct Compare {
    double max_abs = 0, max_rel = 0, ref_max = 0;
    int64_t first_bad = -1;
    int64_t num_bad = 0;
    bool nonfinite = false;
};
Compare compare(const std::vector<float>& got, const std::vector<float>& ref, double atol, double rtol);

// Host tensor of T x H in cfg.dtype filled uniform(-1, 1) from seed (bytes), and its float view.
std::vector<uint8_t> random_input(DType dtype, int64_t tokens, int64_t hidden, uint64_t seed);
std::vector<float> to_floats(const void* data, DType dtype, int64_t n);

#ifdef SWITCHYARD_WITH_CUDA
// Owns a cudaMalloc'ed block.
class DeviceBuffer {
 public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t bytes);
    ~DeviceBuffer();
    DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), n_(o.n_) {
        o.p_ = nullptr;
        o.n_ = 0;
    }
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    void* get() const { return p_; }
    size_t size() const { return n_; }

 private:
    void* p_ = nullptr;
    size_t n_ = 0;
};

// Copies of host weights on the current CUDA device (the views in `w` point into `bufs`).
struct DeviceWeights {
    MoEWeights w;
    std::vector<DeviceBuffer> bufs;
};
DeviceWeights to_device(const MoEWeights& host);
TensorRef to_device(const TensorRef& host, std::vector<DeviceBuffer>& keep);
void copy_to_host(const TensorRef& dev, void* host);
void device_synchronize();
#endif

}  // namespace cli
}  // namespace switchyard
