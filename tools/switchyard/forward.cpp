// tools/switchyard/forward.cpp: `switchyard forward`: one MoE layer from a safetensors checkpoint.
//
// Inputs:  --weights F.safetensors (Hugging Face names, see src/io/weights.h) under --prefix P;
//          --input X.npy of shape [T, H] (or [..., H]; leading dims are flattened and restored) whose dtype
//          must equal --dtype (fp32 '<f4', fp16 '<f2', bf16 as '<u2' bits).
// Outputs: --output Y.npy, same shape and dtype as X; optional --stats S.json (routing statistics; the top-k
//          ids/weights in full when T <= 4096, else a summary). Both appear only when everything succeeded
//          (written to temporaries, renamed together at the end; a failure leaves no output and no change).
// Refused before anything is read: an input that is not a regular file (a directory, a FIFO), an output that is
// a directory or lies in a missing folder, and any output that is the same file as an input or the other output
// (forward.h). NaN/Inf in the input or the weights, or in the output (an overflow), is an error unless
// --allow-non-finite.
// Sizes H, F, E (and the shared width) come from the weights; --hidden/--ffn/--experts, when given, must agree.
// The selection bias mlp.gate.e_score_correction_bias is used automatically when present (--no-bias: not).
// Shared experts are used when their tensors are present (--shared-experts 0: not).
// FP8 experts: F8_E4M3 expert matrices with weight_scale_inv (128x128 blocks) or weight_scale (+ input_scale) beside
// them make an fp8-block / fp8-tensor layer (io/weights.h, docs/fp8.md "Loading"); the activations keep --dtype.
#include <cmath>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"
#include "forward.h"
#include "io/file_util.h"
#include "io/npy.h"
#include "io/safetensors.h"
#include "io/weights.h"
#include "switchyard/error.h"

namespace switchyard {
namespace cli {

namespace {

constexpr int64_t kFullTopkMaxTokens = 4096;

nlohmann::ordered_json stats_json(const MoEConfig& cfg, const LoadStats& s, const std::vector<int32_t>& ids,
                                  const std::vector<float>& w, int64_t T) {
    nlohmann::ordered_json j;
    j["config"] = cfg.to_string();
    j["num_tokens"] = T;
    j["top_k"] = cfg.top_k;
    j["num_experts"] = cfg.num_experts;
    j["capacity"] = cfg.capacity(T);
    j["expert_counts"] = s.expert_counts;
    j["kept_counts"] = s.kept_counts;
    j["dropped"] = s.dropped;
    j["dropped_fraction"] = s.dropped_fraction();
    j["routing"] = to_string(cfg.routing_mode);
    if (cfg.expert_choice()) {
        j["expert_choice_capacity"] = cfg.expert_choice_capacity(T);
        j["unrouted_tokens"] = s.unrouted_tokens;
    }
    j["aux_loss"] = s.aux_loss;
    j["z_loss"] = s.z_loss;
    j["weighted_loss"] = s.weighted_loss;
    j["max_load"] = s.max_load;
    j["mean_load"] = s.mean_load;
    j["max_over_mean"] = s.max_over_mean();
    j["cv"] = s.cv;
    j["entropy"] = s.entropy;
    j["max_entropy"] = cfg.num_experts > 0 ? std::log(static_cast<double>(cfg.num_experts)) : 0.0;
    j["mean_prob"] = s.mean_prob;
    const int64_t k = cfg.route_slots();  // top_k, or E under expert choice ([T, E] arrays, -1 / 0 where not picked)
    if (T <= kFullTopkMaxTokens) {
        nlohmann::ordered_json jid = nlohmann::ordered_json::array(), jw = nlohmann::ordered_json::array();
        for (int64_t t = 0; t < T; ++t) {
            jid.push_back(std::vector<int32_t>(ids.begin() + t * k, ids.begin() + (t + 1) * k));
            jw.push_back(std::vector<float>(w.begin() + t * k, w.begin() + (t + 1) * k));
        }
        j["topk_ids"] = jid;
        j["topk_weights"] = jw;
    } else {
        double mn = INFINITY, mx = -INFINITY, sum = 0;
        std::vector<double> slot_mean(static_cast<size_t>(k), 0.0);
        for (int64_t i = 0; i < T * k; ++i) {
            mn = std::min(mn, static_cast<double>(w[i]));
            mx = std::max(mx, static_cast<double>(w[i]));
            sum += w[i];
            slot_mean[i % k] += w[i] / static_cast<double>(T);
        }
        j["topk_summary"] = {{"note", "T > 4096: top-k ids/weights summarised"},
                             {"weight_min", mn},
                             {"weight_max", mx},
                             {"weight_mean", sum / static_cast<double>(T * k)},
                             {"weight_mean_per_slot", slot_mean},
                             {"first_token_ids", std::vector<int32_t>(ids.begin(), ids.begin() + k)}};
    }
    return j;
}


}  // namespace

void check_forward_paths(const ForwardOptions& o) {
    io::require_regular_file(o.weights, "--weights");
    io::require_regular_file(o.input, "--input");
    io::check_output_path(o.output, "--output");
    if (!o.stats.empty()) io::check_output_path(o.stats, "--stats");
    struct Named {
        const char* flag;
        const std::string* path;
    };
    const Named all[] = {{"--input", &o.input}, {"--weights", &o.weights}, {"--output", &o.output}, {"--stats", &o.stats}};
    for (size_t i = 0; i < 4; ++i) {
        for (size_t j = i + 1; j < 4; ++j) {
            if (all[i].path->empty() || all[j].path->empty() || j < 2) continue;  // two inputs may be one file
            SWITCHYARD_CHECK(!io::same_file(*all[i].path, *all[j].path), all[j].flag, " '", io::printable(*all[j].path),
                             "' is the same file as ", all[i].flag, " '", io::printable(*all[i].path),
                             "'; give each output its own file (inputs are never overwritten)");
        }
    }
}

int run_forward(const ForwardOptions& o) {
    const Device dev = parse_device(o.device);
    MoEConfig cfg = make_config(o.layer);  // flags first (checks the enum strings and finite values)
    SWITCHYARD_CHECK(o.layer.top_k > 0, "--top-k must be > 0, got ", o.layer.top_k);
    check_forward_paths(o);

    io::SafetensorsFile file(o.weights);
    io::WeightLoadOptions lo;
    lo.prefix = o.prefix;
    lo.activation = cfg.activation;
    lo.num_shared_experts = o.layer.shared_experts;
    lo.use_score_bias = !o.layer.no_bias;
    lo.allow_non_finite = o.allow_non_finite;
    io::LoadedWeights lw = io::load_moe_weights(file, lo);
    if (!o.quiet)
        for (const std::string& n : lw.notes) std::fprintf(stderr, "switchyard: note: %s\n", n.c_str());
    auto agree = [&](int64_t flag, int64_t got, const char* name, const char* what) {
        SWITCHYARD_CHECK(flag == 0 || flag == got, name, " ", flag, " disagrees with the weights (", what, " = ", got,
                         " in '", o.weights, "')");
    };
    agree(o.layer.hidden, lw.hidden_size, "--hidden", "hidden size");
    agree(o.layer.ffn, lw.ffn_size, "--ffn", "expert FFN width");
    agree(o.layer.experts, lw.num_experts, "--experts", "number of experts");
    lw.apply_to(cfg);
    SWITCHYARD_CHECK(cfg.top_k <= cfg.num_experts, "--top-k ", cfg.top_k, " exceeds the number of experts ",
                     cfg.num_experts, " in '", o.weights, "'");
    cfg.validate();

    io::NpyArray x = io::read_npy(o.input);
    SWITCHYARD_CHECK(
        x.dtype == cfg.dtype, o.input, ": input dtype ", to_string(x.dtype), " does not match --dtype ",
        to_string(cfg.dtype),
        x.dtype == DType::kBF16 || cfg.dtype == DType::kBF16 ? " (bf16 inputs are stored as '<u2' bit patterns)" : "");
    SWITCHYARD_CHECK(!x.shape.empty() && x.shape.back() == cfg.hidden_size, o.input, ": input shape ",
                     io::shape_to_string(x.shape), " must end in the hidden size ", cfg.hidden_size);
    const int64_t T = x.numel() / cfg.hidden_size;
    const int64_t H = cfg.hidden_size, k = cfg.route_slots();
    if (!o.allow_non_finite) {
        const int64_t bad = io::first_non_finite(x.data.data(), cfg.dtype, x.numel());
        SWITCHYARD_CHECK(bad < 0, io::printable(o.input), ": input has a non-finite value (NaN or Inf) at row ",
                         bad < 0 ? 0 : bad / H, ", column ", bad < 0 ? 0 : bad % H,
                         " (--allow-non-finite lets it through)");
    }

    std::vector<uint8_t> y(x.data.size());
    std::vector<int32_t> ids(static_cast<size_t>(T * k));
    std::vector<float> tw(static_cast<size_t>(T * k));
    LoadStats stats;
    TensorRef xh = io::host_tensor(x.data.data(), cfg.dtype, {T, H});
    TensorRef yh = io::host_tensor(y.data(), cfg.dtype, {T, H});
    TensorRef idh = io::host_tensor(ids.data(), DType::kI32, {T, k});
    TensorRef twh = io::host_tensor(tw.data(), DType::kF32, {T, k});
    if (dev == Device::kCPU) {
        MoELayer layer(cfg, lw.owned.w);
        ForwardOutputs out;
        out.topk_ids = idh;
        out.topk_weights = twh;
        out.stats = o.stats.empty() ? nullptr : &stats;
        layer.forward(xh, yh, &out);
    } else {
#ifdef SWITCHYARD_WITH_CUDA
        DeviceWeights dw = to_device(lw.owned.w);
        std::vector<DeviceBuffer> keep;
        TensorRef xd = to_device(xh, keep), yd = to_device(yh, keep);
        TensorRef idd = to_device(idh, keep), twd = to_device(twh, keep);
        MoELayer layer(cfg, dw.w);
        DeviceBuffer ws(layer.workspace_size(T));
        ForwardOutputs out;
        out.topk_ids = idd;
        out.topk_weights = twd;
        out.stats = o.stats.empty() ? nullptr : &stats;
        layer.forward(xd, yd, ws.get(), ws.size(), nullptr, &out);
        device_synchronize();
        copy_to_host(yd, y.data());
        copy_to_host(idd, ids.data());
        copy_to_host(twd, tw.data());
#endif
    }

    if (!o.allow_non_finite) {
        // Finite inputs, weights and config can still overflow inside the layer (fp16 especially): say so rather
        // than write Inf/NaN.
        const int64_t bad = io::first_non_finite(y.data(), cfg.dtype, T * H);
        SWITCHYARD_CHECK(bad < 0, "the layer's output has a non-finite value at row ", bad < 0 ? 0 : bad / H,
                         ", column ", bad < 0 ? 0 : bad % H, " although the input and the weights are finite (an ",
                         to_string(cfg.dtype), " overflow); nothing was written (--allow-non-finite writes it anyway)");
    }
    io::AtomicFileSet files;
    std::vector<uint8_t> ybytes = io::encode_npy(cfg.dtype, x.shape, y.data());
    files.add(o.output, [&](std::ostream& os) {
        os.write(reinterpret_cast<const char*>(ybytes.data()), static_cast<std::streamsize>(ybytes.size()));
    });
    if (!o.stats.empty()) {
        std::string text = stats_json(cfg, stats, ids, tw, T).dump(1) + "\n";
        files.add(o.stats, [&](std::ostream& os) { os << text; });
    }
    files.commit();
    if (!o.quiet)
        std::fprintf(stderr, "switchyard: forward %s: %lld tokens, %s weights (%s), %s -> %s\n", to_string(dev),
                     static_cast<long long>(T), io::to_string(lw.scheme), cfg.to_string().c_str(), o.input.c_str(),
                     o.output.c_str());
    return kExitOk;
}

void add_forward_options(CLI::App* sub, ForwardOptions& o) {
    sub->add_option("--weights", o.weights,
                    "safetensors file with the layer's weights (Hugging Face names; F8_E4M3 experts with their "
                    "weight_scale_inv / weight_scale tensors load as an FP8 layer)")
        ->required();
    sub->add_option("--prefix", o.prefix, "name prefix of the layer, e.g. model.layers.3.");
    sub->add_option("--input", o.input, "input .npy [T, H] of --dtype (bf16 as '<u2' bits)")->required();
    sub->add_option("--output", o.output, "output .npy, same shape and dtype as the input (never an input file)")
        ->required();
    sub->add_option("--stats", o.stats, "write routing statistics (JSON) here");
    sub->add_option("--device", o.device, "cpu | cuda")->capture_default_str();
    sub->add_option("--top-k", o.layer.top_k, "experts per token k (0 < k <= E)")->required();
    sub->add_flag("--quiet", o.quiet, "no notes or summary line on stderr");
    sub->add_flag("--allow-non-finite", o.allow_non_finite,
                  "accept NaN/Inf in the input and the weights (and write a non-finite output); by default any "
                  "is an error");
    add_layer_flags(sub, o.layer, /*random_weights=*/false);
}

void add_forward(CLI::App& app, int* exit_code) {
    auto o = std::make_shared<ForwardOptions>();
    CLI::App* sub = app.add_subcommand("forward", "run one MoE layer from safetensors weights on an .npy input");
    add_forward_options(sub, *o);
    sub->callback([o, exit_code] { *exit_code = run_forward(*o); });
}

}  // namespace cli
}  // namespace switchyard
