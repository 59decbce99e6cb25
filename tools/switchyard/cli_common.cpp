// tools/switchyard/cli_common.cpp: see cli_common.h.
#include "cli_common.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "io/file_util.h"
#include "io/npy.h"
#include "switchyard/error.h"

#ifdef SWITCHYARD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace switchyard {
namespace cli {

void add_layer_flags(CLI::App* app, LayerFlags& f, bool random_weights) {
    app->add_option("--hidden", f.hidden,
                    "hidden size H" + std::string(random_weights ? "" : " (default: from the weights; must agree)"));
    app->add_option(
        "--ffn", f.ffn,
        "expert FFN width F" + std::string(random_weights ? "" : " (default: from the weights; must agree)"));
    app->add_option(
        "--experts", f.experts,
        "number of routed experts E" + std::string(random_weights ? "" : " (default: from the weights; must agree)"));
    app->add_option("--score", f.score, "router score function: softmax | topk-softmax | sigmoid")
        ->capture_default_str();
    app->add_flag("--renormalize", f.renormalize, "divide the k routing weights by their sum");
    app->add_option("--routed-scale", f.routed_scale, "multiply the routing weights by S (DeepSeek-V3: 2.5)")
        ->capture_default_str();
    app->add_option("--groups", f.groups, "expert groups G for group-limited routing (1 = off)")->capture_default_str();
    app->add_option("--topk-groups", f.topk_groups, "groups M kept per token (group-limited routing)")
        ->capture_default_str();
    app->add_option("--shared-experts", f.shared_experts,
                    random_weights ? "number of shared (always-on) experts"
                                   : "shared experts N (default: 1 when shared_expert(s) tensors exist, else 0; "
                                     "0 ignores them; the shared width must be a multiple of N)")
        ->check(CLI::NonNegativeNumber);  // -1 is the "not given" default; an explicit negative is an error
    app->add_option("--capacity-factor", f.capacity_factor,
                    "capacity = ceil(C * T * k / E) rows per expert (0 = dropless)")
        ->capture_default_str();
    app->add_option("--min-capacity", f.min_capacity, "lower bound of the capacity")
        ->capture_default_str()
        ->check(CLI::NonNegativeNumber);
    app->add_option("--drop-policy", f.drop_policy, "which pairs past capacity are dropped: position | probability")
        ->capture_default_str();
    app->add_option("--activation", f.activation, "expert activation: swiglu | geglu | gelu | relu")
        ->capture_default_str();
    app->add_option("--dtype", f.dtype, "activation dtype: fp32 | bf16 | fp16")->capture_default_str();
    app->add_option("--aux-loss-coef", f.aux_loss_coef, "weight of the load-balancing loss in weighted_loss");
    app->add_option("--z-loss-coef", f.z_loss_coef, "weight of the router z-loss in weighted_loss");
    app->add_option("--routing", f.routing,
                    "token-choice (top-k experts per token) | expert-choice (top-C tokens per expert, "
                    "C = ceil(capacity_factor * T / E), capacity_factor 0 meaning top_k)")
        ->capture_default_str();
    app->add_option("--eval-capacity-factor", f.eval_capacity_factor,
                    "capacity factor of evaluation forwards (< 0: same as --capacity-factor)");
    app->add_flag("--eval", f.eval, "run as an evaluation forward (uses --eval-capacity-factor)");
    if (random_weights) {
        app->add_option("--shared-ffn", f.shared_ffn, "width of one shared expert (default: --ffn)")
            ->check(CLI::NonNegativeNumber);
        app->add_flag("--use-bias", f.use_bias, "use the (random) per-expert selection bias");
        app->add_flag("--gate-up-interleaved", f.gate_up_interleaved,
                      "read the (random) w13 with gate and up rows interleaved in blocks of 8 "
                      "(MoEConfig::gate_up_interleaved): GEMM1 runs with the gated activation in its epilogue");
    } else {
        app->add_flag("--no-bias", f.no_bias,
                      "do not use mlp.gate.e_score_correction_bias (it is used by default when present)");
    }
}

DType parse_activation_dtype(const std::string& s) {
    // The library's parse_dtype also knows fp64 and the integer types; the CLI's activations are float only, and
    // its message names only what --dtype accepts.
    DType t = DType::kI32;
    try {
        t = parse_dtype(s);
    } catch (const Error&) {
    }
    SWITCHYARD_CHECK(t == DType::kF32 || t == DType::kBF16 || t == DType::kF16, "--dtype must be fp32, bf16 or fp16, got '",
                     io::printable(s, 32), "'");
    return t;
}

void require_finite(double v, const char* flag) {
    SWITCHYARD_CHECK(std::isfinite(v), flag, " must be a finite number, got ", v);
}

MoEConfig make_config(const LayerFlags& f) {
    require_finite(f.routed_scale, "--routed-scale");
    require_finite(f.capacity_factor, "--capacity-factor");
    require_finite(f.aux_loss_coef, "--aux-loss-coef");
    require_finite(f.z_loss_coef, "--z-loss-coef");
    MoEConfig c;
    c.hidden_size = f.hidden;
    c.ffn_size = f.ffn;
    c.num_experts = f.experts;
    c.top_k = f.top_k;
    c.score_function = parse_score_function(f.score);
    c.renormalize = f.renormalize;
    c.routed_scale = f.routed_scale;
    c.num_groups = f.groups;
    c.topk_groups = f.topk_groups;
    c.capacity_factor = f.capacity_factor;
    c.min_capacity = f.min_capacity;
    c.drop_policy = parse_drop_policy(f.drop_policy);
    c.activation = parse_activation(f.activation);
    c.dtype = parse_activation_dtype(f.dtype);
    c.aux_loss_coef = f.aux_loss_coef;
    c.z_loss_coef = f.z_loss_coef;
    c.use_score_bias = f.use_bias;
    c.gate_up_interleaved = f.gate_up_interleaved;
    require_finite(f.eval_capacity_factor, "--eval-capacity-factor");
    c.routing_mode = parse_routing_mode(f.routing);
    c.eval_capacity_factor = f.eval_capacity_factor;
    if (f.eval) c = c.eval_config();
    if (f.shared_experts > 0) {
        c.num_shared_experts = f.shared_experts;
        c.shared_ffn_size = f.shared_ffn > 0 ? f.shared_ffn : f.ffn;
    }
    return c;
}

std::string one_line_message(const std::exception& e) {
    std::string m = e.what();
    if (std::getenv("SWITCHYARD_DEBUG") == nullptr) {
        // Error messages end in " [check `...` failed at file:line]" or " [error at file:line]".
        size_t pos = m.rfind(" [");
        if (pos != std::string::npos && m.back() == ']' &&
            (m.compare(pos, 8, " [check ") == 0 || m.compare(pos, 11, " [error at ") == 0))
            m.erase(pos);
    }
    // One printable, bounded line whatever the message holds (a path or a value from the command line):
    // newlines become spaces, other control bytes \xNN escapes; UTF-8 text passes; cut at kMaxMessageBytes.
    static const char kHex[] = "0123456789abcdef";
    std::string out;
    for (char ch : m) {
        const unsigned char c = static_cast<unsigned char>(ch);
        if (c == '\n' || c == '\r' || c == '\t') {
            out += ' ';
        } else if (c < 0x20 || c == 0x7f) {
            out += "\\x";
            out += kHex[c >> 4];
            out += kHex[c & 15];
        } else {
            out += ch;
        }
    }
    if (out.size() > kMaxMessageBytes) {
        size_t cut = kMaxMessageBytes;
        while (cut > 0 && (static_cast<unsigned char>(out[cut]) & 0xc0) == 0x80) --cut;  // UTF-8 boundary
        out = out.substr(0, cut) + "... (message cut at " + std::to_string(kMaxMessageBytes) + " bytes)";
    }
    return out;
}

Device parse_device(const std::string& s) {
    if (s == "cpu") return Device::kCPU;
    if (s == "cuda" || s == "gpu") {
        SWITCHYARD_CHECK(has_cuda_backend(), "--device cuda: this build has no CUDA backend (rebuild with nvcc)");
        SWITCHYARD_CHECK(cuda_device_count() > 0, "--device cuda: no CUDA device is visible");
        return Device::kCUDA;
    }
    SWITCHYARD_FAIL("--device must be cpu or cuda, got '", s, "'");
}

double now_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median_ms(const std::function<void()>& fn, int warmup, int reps, const std::function<void()>& sync,
                 std::vector<double>* samples) {
    SWITCHYARD_CHECK(reps > 0 && warmup >= 0, "reps must be > 0 and warmup >= 0, got reps=", reps, " warmup=", warmup);
    for (int i = 0; i < warmup; ++i) {
        fn();
        if (sync) sync();
    }
    std::vector<double> t(static_cast<size_t>(reps));
    for (int i = 0; i < reps; ++i) {
        double t0 = now_seconds();
        fn();
        if (sync) sync();
        t[i] = (now_seconds() - t0) * 1e3;
    }
    if (samples) *samples = t;
    std::sort(t.begin(), t.end());
    return reps % 2 ? t[reps / 2] : 0.5 * (t[reps / 2 - 1] + t[reps / 2]);
}

double median_ms_adaptive(const std::function<void()>& fn, int warmup, int reps, double budget_s,
                          const std::function<void()>& sync, std::vector<double>* samples) {
    SWITCHYARD_CHECK(reps > 0 && warmup >= 0, "reps must be > 0 and warmup >= 0, got reps=", reps, " warmup=", warmup);
    for (int i = 0; i < warmup; ++i) {
        fn();
        if (sync) sync();
    }
    std::vector<double> t;
    double spent = 0;
    while (static_cast<int>(t.size()) < reps || (spent < budget_s && static_cast<int>(t.size()) < kMaxAdaptiveReps)) {
        double t0 = now_seconds();
        fn();
        if (sync) sync();
        double dt = now_seconds() - t0;
        spent += dt;
        t.push_back(dt * 1e3);
    }
    if (samples) *samples = t;
    std::sort(t.begin(), t.end());
    const size_t n = t.size();
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

HostInfo host_info() {
    HostInfo h;
    std::ifstream cpu("/proc/cpuinfo");
    std::string line;
    while (std::getline(cpu, line)) {
        if (h.cpu_model.empty() && line.rfind("model name", 0) == 0) {
            size_t c = line.find(':');
            if (c != std::string::npos) h.cpu_model = line.substr(c + 2);
        }
    }
    if (h.cpu_model.empty()) h.cpu_model = "unknown";
    h.logical_cores = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
    h.omp_threads = omp_get_max_threads();
    std::ifstream mem("/proc/meminfo");
    while (std::getline(mem, line)) {
        std::istringstream is(line);
        std::string key;
        double kb = 0;
        is >> key >> kb;
        if (key == "MemTotal:") h.mem_total_gib = kb / (1024.0 * 1024.0);
        if (key == "MemAvailable:") h.mem_available_gib = kb / (1024.0 * 1024.0);
    }
    return h;
}

Compare compare(const std::vector<float>& got, const std::vector<float>& ref, double atol, double rtol) {
    Compare c;
    SWITCHYARD_CHECK(got.size() == ref.size(), "compare: sizes differ (", got.size(), " vs ", ref.size(), ")");
    for (float r : ref) c.ref_max = std::max(c.ref_max, static_cast<double>(std::fabs(r)));
    for (size_t i = 0; i < got.size(); ++i) {
        double g = got[i], r = ref[i];
        if (!std::isfinite(g) || !std::isfinite(r)) {
            c.nonfinite = true;
            if (c.first_bad < 0) c.first_bad = static_cast<int64_t>(i);
            ++c.num_bad;
            continue;
        }
        double d = std::fabs(g - r);
        c.max_abs = std::max(c.max_abs, d);
        if (d > atol + rtol * std::fabs(r)) {
            if (c.first_bad < 0) c.first_bad = static_cast<int64_t>(i);
            ++c.num_bad;
        }
    }
    c.max_rel = c.ref_max > 0 ? c.max_abs / c.ref_max : c.max_abs;
    return c;
}

std::vector<uint8_t> random_input(DType dtype, int64_t tokens, int64_t hidden, uint64_t seed) {
    return io::random_values(dtype, tokens * hidden, -1.0, 1.0, seed);
}

std::vector<float> to_floats(const void* data, DType dtype, int64_t n) {
    std::vector<float> out(static_cast<size_t>(n));
    const uint8_t* p = static_cast<const uint8_t*>(data);
    for (int64_t i = 0; i < n; ++i) {
        if (dtype == DType::kF32) {
            std::memcpy(&out[i], p + 4 * i, 4);
        } else {
            uint16_t h;
            std::memcpy(&h, p + 2 * i, 2);
            out[i] = dtype == DType::kBF16 ? bf16_to_float(h) : half_to_float(h);
        }
    }
    return out;
}

#ifdef SWITCHYARD_WITH_CUDA
namespace {
void cuda_check(cudaError_t e, const char* what) {
    SWITCHYARD_CHECK(e == cudaSuccess, what, " failed: ", cudaGetErrorString(e));
}
}  // namespace

DeviceBuffer::DeviceBuffer(size_t bytes) : n_(bytes) {
    if (bytes) cuda_check(cudaMalloc(&p_, bytes), "cudaMalloc");
}
DeviceBuffer::~DeviceBuffer() {
    if (p_) cudaFree(p_);
}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
        if (p_) cudaFree(p_);
        p_ = o.p_;
        n_ = o.n_;
        o.p_ = nullptr;
        o.n_ = 0;
    }
    return *this;
}

TensorRef to_device(const TensorRef& host, std::vector<DeviceBuffer>& keep) {
    if (!host.defined()) return host;
    keep.emplace_back(host.nbytes());
    TensorRef d = host;
    d.data = keep.back().get();
    d.device = Device::kCUDA;
    int dev = 0;
    cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
    d.device_index = dev;
    if (host.nbytes()) cuda_check(cudaMemcpy(d.data, host.data, host.nbytes(), cudaMemcpyHostToDevice), "cudaMemcpy");
    return d;
}

DeviceWeights to_device(const MoEWeights& h) {
    DeviceWeights d;
    d.bufs.reserve(8);
    d.w.gate = to_device(h.gate, d.bufs);
    d.w.score_bias = to_device(h.score_bias, d.bufs);
    d.w.w13 = to_device(h.w13, d.bufs);
    d.w.w2 = to_device(h.w2, d.bufs);
    d.w.shared_w13 = to_device(h.shared_w13, d.bufs);
    d.w.shared_w2 = to_device(h.shared_w2, d.bufs);
    d.w.shared_gate = to_device(h.shared_gate, d.bufs);
    // FP8 experts' scales (undefined ones stay undefined): the layer checks them on the weights' device.
    for (auto m : {&MoEWeights::w13_scale, &MoEWeights::w2_scale, &MoEWeights::shared_w13_scale,
                   &MoEWeights::shared_w2_scale, &MoEWeights::w13_input_scale, &MoEWeights::w2_input_scale,
                   &MoEWeights::shared_w13_input_scale, &MoEWeights::shared_w2_input_scale})
        d.w.*m = to_device(h.*m, d.bufs);
    return d;
}

void copy_to_host(const TensorRef& dev, void* host) {
    if (dev.nbytes()) cuda_check(cudaMemcpy(host, dev.data, dev.nbytes(), cudaMemcpyDeviceToHost), "cudaMemcpy");
}

void device_synchronize() { cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }
#endif

}  // namespace cli
}  // namespace switchyard
