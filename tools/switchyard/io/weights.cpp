// tools/switchyard/io/weights.cpp: loading one MoE layer's weights by Hugging Face names, and seeded random weights.
// See weights.h for the naming schemes, the w13 layout and the dtype rules.
#include "io/weights.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include "io/file_util.h"
#include "io/npy.h"
#include "switchyard/error.h"
#include "switchyard/stages.h"

namespace switchyard {
namespace io {

TensorRef host_tensor(void* data, DType dtype, const std::vector<int64_t>& shape) {
    SWITCHYARD_CHECK(!shape.empty() && shape.size() <= static_cast<size_t>(TensorRef::kMaxRank), "tensor rank ",
                     shape.size(), " is not in [1, ", TensorRef::kMaxRank, "]");
    TensorRef t;
    t.data = data;
    t.dtype = dtype;
    t.rank = static_cast<int>(shape.size());
    int64_t stride = 1;
    for (int i = t.rank - 1; i >= 0; --i) {
        t.shape[i] = shape[i];
        t.strides[i] = stride;
        stride *= shape[i];
    }
    t.device = Device::kCPU;
    return t;
}

TensorRef OwnedWeights::allocate(DType dtype, const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    buffers.emplace_back(static_cast<size_t>(n) * dtype_size(dtype), 0);
    return host_tensor(buffers.back().data(), dtype, shape);
}

const char* to_string(NamingScheme s) {
    switch (s) {
        case NamingScheme::kMixtral:
            return "mixtral";
        case NamingScheme::kQwenDeepSeek:
            return "qwen/deepseek";
    }
    return "?";
}

// First non-finite element of n float values of dtype dt (exponent bits all ones: Inf or NaN), or -1.
int64_t first_non_finite(const void* data, DType dt, int64_t n) {
    const uint8_t* p = static_cast<const uint8_t*>(data);
    for (int64_t i = 0; i < n; ++i) {
        if (dt == DType::kF32) {
            uint32_t v;
            std::memcpy(&v, p + 4 * i, 4);
            if ((v & 0x7f800000u) == 0x7f800000u) return i;
        } else {
            uint16_t v;
            std::memcpy(&v, p + 2 * i, 2);
            const uint16_t e = dt == DType::kBF16 ? 0x7f80 : 0x7c00;
            if ((v & e) == e) return i;
        }
    }
    return -1;
}

void LoadedWeights::apply_to(MoEConfig& cfg) const {
    cfg.hidden_size = hidden_size;
    cfg.ffn_size = ffn_size;
    cfg.num_experts = num_experts;
    cfg.num_shared_experts = num_shared_experts;
    cfg.shared_ffn_size = shared_ffn_size;
    cfg.shared_expert_gate = has_shared_gate;
    cfg.use_score_bias = has_score_bias;
    cfg.quant_mode = quant_mode;
}

namespace {


bool is_float(DType t) { return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16; }

// Element i of a float tensor (fp32, bf16, fp16) as fp32 (exact).
float float_at(const uint8_t* src, DType dt, int64_t i) {
    if (dt == DType::kF32) {
        float v;
        std::memcpy(&v, src + 4 * i, 4);
        return v;
    }
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    return dt == DType::kBF16 ? bf16_to_float(h) : half_to_float(h);
}

// First fp8 e4m3 NaN code (0x7f, 0xff) among n codes, or -1.
int64_t first_fp8_nan(const uint8_t* codes, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        if ((codes[i] & 0x7fu) == 0x7fu) return i;
    return -1;
}

class Loader {
 public:
    Loader(const SafetensorsFile& f, const WeightLoadOptions& o) : f_(f), o_(o) {}

    std::string full(const std::string& n) const { return o_.prefix + n; }
    bool has(const std::string& n) const { return f_.has(full(n)); }

    // Info of a required float tensor (or, with allow_fp8, an expert matrix in F8_E4M3) with the expected shape.
    const SafetensorInfo& need(const std::string& n, const std::vector<int64_t>& shape, bool allow_fp8 = false) const {
        std::string name = full(n);
        SWITCHYARD_CHECK(f_.has(name), f_.path(), ": tensor '", printable(name), "' not found");
        const SafetensorInfo& i = f_.info(name);
        SWITCHYARD_CHECK(is_float(i.dtype) || (allow_fp8 && i.dtype == DType::kF8E4M3), f_.path(), ": tensor '",
                         printable(name), "' has dtype ", i.dtype_str,
                         allow_fp8 ? "; expert weights must be F32, BF16, F16 or F8_E4M3 (with scales)"
                                   : "; weights must be F32, BF16 or F16");
        SWITCHYARD_CHECK(i.shape == shape, f_.path(), ": tensor '", printable(name), "' has shape ", shape_to_string(i.shape),
                         ", expected ", shape_to_string(shape));
        return i;
    }
    void same_dtype(const SafetensorInfo& i, DType want, const char* group) const {
        SWITCHYARD_CHECK(i.dtype == want, f_.path(), ": tensor '", printable(i.name), "' has dtype ", i.dtype_str, " but the ",
                         group, " tensors are ", safetensors_dtype_name(want), "; use one dtype for them");
    }
    const uint8_t* data(const SafetensorInfo& i) const { return f_.data(i.name); }

    const SafetensorsFile& f_;
    const WeightLoadOptions& o_;
};

// Lists the prefixes under which a router weight of either scheme exists (for the "not found" message).
std::string candidate_prefixes(const SafetensorsFile& f) {
    const std::string keys[] = {"block_sparse_moe.gate.weight", "mlp.gate.weight"};
    std::string out;
    int count = 0;
    for (const std::string& n : f.names()) {
        for (const std::string& k : keys) {
            if (n.size() >= k.size() && n.compare(n.size() - k.size(), k.size(), k) == 0) {
                if (count < 4) out += (count ? ", '" : "'") + printable(n.substr(0, n.size() - k.size())) + "'";
                ++count;
            }
        }
    }
    if (count > 4) out += ", ...";
    return count ? "; prefixes with a router weight in this file: " + out : "; the file holds no MoE router weight";
}

}  // namespace

namespace {


// Parses "<digits>" (no sign, no leading zero unless "0") into *out; false otherwise.
bool parse_index(const std::string& s, int64_t* out) {
    if (s.empty() || s.size() > 18 || (s.size() > 1 && s[0] == '0')) return false;
    int64_t v = 0;
    for (char c : s) {
        if (c < '0' || c > '9') return false;
        v = v * 10 + (c - '0');
    }
    *out = v;
    return true;
}

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// The scale tensors beside one F8_E4M3 matrix of the file (null for a float matrix).
struct MatrixScales {
    const SafetensorInfo* w = nullptr;      // weight_scale_inv [B(rows), B(cols)] or weight_scale (scalar)
    const SafetensorInfo* input = nullptr;  // input_scale (scalar, per-tensor only)
};

}  // namespace

LoadedWeights load_moe_weights(const SafetensorsFile& file, const WeightLoadOptions& opts) {
    Loader L(file, opts);
    LoadedWeights out;
    const std::string& path = file.path();
    std::string gate_name, expert_fmt_pre, block;
    std::string g_name, u_name, d_name;  // per-expert tensor names
    const bool has_mixtral = L.has("block_sparse_moe.gate.weight"), has_qwen = L.has("mlp.gate.weight");
    SWITCHYARD_CHECK(!(has_mixtral && has_qwen), path, ": both '", printable(L.full("block_sparse_moe.gate.weight")),
                     "' and '", printable(L.full("mlp.gate.weight")),
                     "' exist: two MoE layers under one prefix (one would be ignored); give a --prefix that selects one");
    if (has_mixtral) {
        out.scheme = NamingScheme::kMixtral;
        block = "block_sparse_moe.";
        gate_name = "block_sparse_moe.gate.weight";
        expert_fmt_pre = "block_sparse_moe.experts.";
        g_name = ".w1.weight";
        u_name = ".w3.weight";
        d_name = ".w2.weight";
    } else if (has_qwen) {
        out.scheme = NamingScheme::kQwenDeepSeek;
        block = "mlp.";
        gate_name = "mlp.gate.weight";
        expert_fmt_pre = "mlp.experts.";
        g_name = ".gate_proj.weight";
        u_name = ".up_proj.weight";
        d_name = ".down_proj.weight";
    } else {
        SWITCHYARD_FAIL(path, ": no MoE router weight under prefix '", printable(opts.prefix), "' (looked for '",
                        printable(opts.prefix), "block_sparse_moe.gate.weight' and '", printable(opts.prefix),
                        "mlp.gate.weight')", candidate_prefixes(file));
    }
    std::set<std::string> used;  // full names of the tensors the layer takes (or that were reported)
    auto finite = [&](const SafetensorInfo& i) {
        if (i.dtype == DType::kF8E4M3) {  // the layer never takes NaN codes (e4m3fn has no infinities)
            const int64_t bad = first_fp8_nan(L.data(i), i.numel());
            const int64_t cols = i.shape.empty() ? 1 : i.shape.back();
            SWITCHYARD_CHECK(bad < 0, path, ": tensor '", printable(i.name), "' (F8_E4M3) holds the NaN code ",
                             bad < 0 ? "" : (L.data(i)[bad] == 0x7f ? "0x7f" : "0xff"), " at row ",
                             bad < 0 ? 0 : bad / cols, ", column ", bad < 0 ? 0 : bad % cols,
                             "; FP8 weights must be finite (--allow-non-finite does not apply to them)");
            return;
        }
        if (opts.allow_non_finite) return;
        const int64_t bad = first_non_finite(L.data(i), i.dtype, i.numel());
        SWITCHYARD_CHECK(bad < 0, path, ": tensor '", printable(i.name), "' has a non-finite value (NaN or Inf) at flat index ",
                         bad, " (--allow-non-finite lets it through)");
    };

    // ---- 1. Validate every tensor's presence, dtype and shape; nothing is allocated before this passes, so a
    // small file cannot make the loader reserve more than the bytes its tensors really hold.
    const SafetensorInfo* gi = &file.info(L.full(gate_name));
    SWITCHYARD_CHECK(is_float(gi->dtype), path, ": tensor '", printable(gi->name), "' has dtype ", gi->dtype_str,
                     "; weights must be F32, BF16 or F16");
    SWITCHYARD_CHECK(gi->shape.size() == 2 && gi->shape[0] > 0 && gi->shape[1] > 0, path, ": tensor '",
                     printable(gi->name), "' has shape ", shape_to_string(gi->shape),
                     ", expected [num_experts, hidden_size]");
    out.num_experts = gi->shape[0];
    out.hidden_size = gi->shape[1];
    const int64_t E = out.num_experts, H = out.hidden_size;
    SWITCHYARD_CHECK(E <= MoEConfig::kMaxExperts, path, ": tensor '", printable(gi->name), "' has shape ",
                     shape_to_string(gi->shape), ": ", E, " experts exceed the limit of ", MoEConfig::kMaxExperts);
    used.insert(gi->name);

    // Selection bias (Qwen/DeepSeek naming only), converted to fp32.
    const std::string bias_name = "mlp.gate.e_score_correction_bias";
    const SafetensorInfo* bi = nullptr;
    if (out.scheme == NamingScheme::kQwenDeepSeek && L.has(bias_name)) {
        used.insert(L.full(bias_name));
        if (opts.use_score_bias)
            bi = &L.need(bias_name, {E});
        else
            out.notes.push_back("'" + printable(L.full(bias_name)) + "' present but not used (bias disabled)");
    }

    // Routed experts.
    const bool gated = is_gated(opts.activation);
    auto ename = [&](int64_t i, const std::string& suffix) { return expert_fmt_pre + std::to_string(i) + suffix; };
    // With an ungated activation, the one input projection is w1 (Mixtral) or up_proj (Qwen/DeepSeek).
    const std::string in_name = out.scheme == NamingScheme::kMixtral ? g_name : u_name;
    const std::string other_name = out.scheme == NamingScheme::kMixtral ? u_name : g_name;
    {
        std::string first = gated ? ename(0, g_name) : ename(0, in_name);
        SWITCHYARD_CHECK(L.has(first), path, ": tensor '", printable(L.full(first)), "' not found (expert 0 of ", E, ")");
        const SafetensorInfo& fi = file.info(L.full(first));
        SWITCHYARD_CHECK(fi.shape.size() == 2 && fi.shape[1] == H && fi.shape[0] > 0, path, ": tensor '",
                         printable(fi.name), "' has shape ", shape_to_string(fi.shape), ", expected [ffn_size, ", H, "]");
        out.ffn_size = fi.shape[0];
        SWITCHYARD_CHECK(is_float(fi.dtype) || fi.dtype == DType::kF8E4M3, path, ": tensor '", printable(fi.name),
                         "' has dtype ", fi.dtype_str, "; expert weights must be F32, BF16, F16 or F8_E4M3 (with scales)");
        out.expert_dtype = fi.dtype;
    }
    const int64_t F = out.ffn_size;
    const DType edt = out.expert_dtype;
    struct ExpertTensors {
        const SafetensorInfo *in0 = nullptr, *in1 = nullptr, *down = nullptr;
        MatrixScales s_in0, s_in1, s_down;  // F8_E4M3 only
    };
    std::vector<ExpertTensors> experts(static_cast<size_t>(E));
    for (int64_t i = 0; i < E; ++i) {
        ExpertTensors& t = experts[static_cast<size_t>(i)];
        if (gated) {
            t.in0 = &L.need(ename(i, g_name), {F, H}, true);
            t.in1 = &L.need(ename(i, u_name), {F, H}, true);
            L.same_dtype(*t.in1, edt, "expert");
        } else {
            SWITCHYARD_CHECK(!L.has(ename(i, other_name)), path, ": tensor '", printable(L.full(ename(i, other_name))),
                             "' is present but activation ", to_string(opts.activation),
                             " is ungated (use swiglu or geglu for gated experts)");
            t.in0 = &L.need(ename(i, in_name), {F, H}, true);
        }
        L.same_dtype(*t.in0, edt, "expert");
        t.down = &L.need(ename(i, d_name), {H, F}, true);
        L.same_dtype(*t.down, edt, "expert");
        for (const SafetensorInfo* x : {t.in0, t.in1, t.down})
            if (x) used.insert(x->name);
    }
    // Expert tensors beyond E (or with an index that is not a number) mean the router and the experts disagree.
    const std::string expert_pre = L.full(expert_fmt_pre);
    for (const std::string& n : file.names()) {
        if (!starts_with(n, expert_pre)) continue;
        const size_t dot = n.find('.', expert_pre.size());
        int64_t idx = -1;
        const bool numeric = dot != std::string::npos && parse_index(n.substr(expert_pre.size(), dot - expert_pre.size()), &idx);
        SWITCHYARD_CHECK(numeric && idx < E, path, ": tensor '", printable(n), "' is not an expert of the ", E,
                         "-expert router ('", printable(gi->name), "' has shape ", shape_to_string(gi->shape), ")");
    }

    // Shared experts (Qwen/DeepSeek naming): mlp.shared_experts.* (DeepSeek) or mlp.shared_expert.* (Qwen2-MoE).
    const SafetensorInfo *sg = nullptr, *su = nullptr, *sd = nullptr;
    const SafetensorInfo* sgate = nullptr;  // Qwen2-MoE: mlp.shared_expert_gate.weight [1, H]
    int64_t n_shared = 0, S = 0;
    if (out.scheme == NamingScheme::kQwenDeepSeek) {
        std::string sp;
        for (const char* cand : {"mlp.shared_experts.", "mlp.shared_expert."}) {
            bool any = false;
            for (const char* part : {"gate_proj.weight", "up_proj.weight", "down_proj.weight"})
                any = any || L.has(std::string(cand) + part);
            if (!any) continue;
            SWITCHYARD_CHECK(sp.empty(), path, ": both '", printable(L.full("mlp.shared_experts.")), "*' and '",
                             printable(L.full("mlp.shared_expert.")), "*' tensors exist; one would be ignored");
            sp = cand;
        }
        if (!sp.empty())
            SWITCHYARD_CHECK(L.has(sp + "down_proj.weight"), path, ": shared-expert tensors under '",
                             printable(L.full(sp)), "' but no '", printable(L.full(sp + "down_proj.weight")),
                             "' (an incomplete shared expert)");
        n_shared = opts.num_shared_experts;
        SWITCHYARD_CHECK(n_shared >= -1, "--shared-experts must be >= 0, got ", n_shared);
        if (n_shared < 0) n_shared = sp.empty() ? 0 : 1;
        if (n_shared > 0) {
            SWITCHYARD_CHECK(!sp.empty(), path, ": ", n_shared, " shared experts requested but tensor '",
                             printable(L.full("mlp.shared_experts.down_proj.weight")),
                             "' (or mlp.shared_expert.*) not found");
            const SafetensorInfo& d0 = file.info(L.full(sp + "down_proj.weight"));
            SWITCHYARD_CHECK(d0.shape.size() == 2 && d0.shape[0] == H && d0.shape[1] > 0, path, ": tensor '",
                             printable(d0.name), "' has shape ", shape_to_string(d0.shape), ", expected [", H,
                             ", shared width]");
            S = d0.shape[1];
            SWITCHYARD_CHECK(S % n_shared == 0, path, ": shared width ", S, " of '", printable(d0.name),
                             "' is not a multiple of the number of shared experts ", n_shared);
            sd = &L.need(sp + "down_proj.weight", {H, S}, true);
            if (gated) {
                sg = &L.need(sp + "gate_proj.weight", {S, H}, true);
                su = &L.need(sp + "up_proj.weight", {S, H}, true);
                L.same_dtype(*sg, sd->dtype, "shared expert");
            } else {
                SWITCHYARD_CHECK(!L.has(sp + "gate_proj.weight"), path, ": tensor '",
                                 printable(L.full(sp + "gate_proj.weight")), "' is present but activation ",
                                 to_string(opts.activation), " is ungated");
                su = &L.need(sp + "up_proj.weight", {S, H}, true);
            }
            L.same_dtype(*su, sd->dtype, "shared expert");
            // Qwen2-MoE scales its shared expert by sigmoid(x . shared_expert_gate) (MoEConfig::shared_expert_gate).
            // It is never quantised: with an F8_E4M3 shared expert it keeps its own float dtype.
            if (L.has("mlp.shared_expert_gate.weight")) {
                sgate = &L.need("mlp.shared_expert_gate.weight", {1, H});
                if (sd->dtype != DType::kF8E4M3) L.same_dtype(*sgate, sd->dtype, "shared expert");
            }
            for (const SafetensorInfo* x : {sg, su, sd, sgate})
                if (x) used.insert(x->name);
        } else if (!sp.empty()) {
            for (const char* proj : {"gate_proj.", "up_proj.", "down_proj."})
                for (const char* part : {"weight", "weight_scale_inv", "weight_scale", "input_scale"})
                    if (L.has(sp + proj + part)) used.insert(L.full(sp + proj + part));
            if (L.has("mlp.shared_expert_gate.weight")) used.insert(L.full("mlp.shared_expert_gate.weight"));
            out.notes.push_back("shared-expert tensors under '" + printable(L.full(sp)) + "' present but not used");
        }
    } else {
        SWITCHYARD_CHECK(opts.num_shared_experts <= 0, path, ": ", opts.num_shared_experts,
                         " shared experts requested but Mixtral-named weights have none");
    }

    // FP8 experts: an F8_E4M3 matrix <base>weight has its scale beside it (<base>weight_scale_inv: 128x128 blocks;
    // <base>weight_scale: one per tensor; optional <base>input_scale, per tensor only); a float matrix has none (the
    // router included). One scheme per layer.
    const SafetensorInfo* mode_from = nullptr;  // the first F8_E4M3 matrix (names the scheme in messages)
    auto scheme_name = [](QuantMode m) {
        return m == QuantMode::kFP8Block ? "block-scaled (weight_scale_inv)" : "per-tensor scaled (weight_scale)";
    };
    auto scales_of = [&](const SafetensorInfo& wt) {
        MatrixScales ms;
        const std::string base = wt.name.substr(0, wt.name.size() - std::string("weight").size());
        const std::string n_inv = base + "weight_scale_inv", n_ts = base + "weight_scale", n_in = base + "input_scale";
        if (wt.dtype != DType::kF8E4M3) {
            for (const std::string& n : {n_inv, n_ts, n_in})
                SWITCHYARD_CHECK(!file.has(n), path, ": tensor '", printable(n), "' is a quantisation scale but '",
                                 printable(wt.name), "' is ", wt.dtype_str, ", not F8_E4M3");
            return ms;
        }
        const bool has_inv = file.has(n_inv), has_ts = file.has(n_ts);
        SWITCHYARD_CHECK(has_inv || has_ts, path, ": tensor '", printable(wt.name), "' is F8_E4M3 but has no scale ('",
                         printable(n_inv), "' for 128x128 blocks or '", printable(n_ts), "' per tensor)");
        SWITCHYARD_CHECK(!(has_inv && has_ts), path, ": tensor '", printable(wt.name), "' has both '", printable(n_inv),
                         "' (block) and '", printable(n_ts), "' (per-tensor) scales");
        const QuantMode m = has_inv ? QuantMode::kFP8Block : QuantMode::kFP8Tensor;
        if (mode_from == nullptr) {
            out.quant_mode = m;
            mode_from = &wt;
        }
        SWITCHYARD_CHECK(m == out.quant_mode, path, ": tensor '", printable(wt.name), "' is ", scheme_name(m), " but '",
                         printable(mode_from->name), "' is ", scheme_name(out.quant_mode),
                         "; one layer uses one FP8 scheme");
        // want empty: a scalar ([] or [1]); input: an input scale (> 0; weight scales may be 0, an all-zero block).
        auto scale_tensor = [&](const std::string& n, const std::vector<int64_t>& want, bool input) {
            const SafetensorInfo& si = file.info(n);
            SWITCHYARD_CHECK(is_float(si.dtype), path, ": tensor '", printable(n), "' has dtype ", si.dtype_str,
                             "; scales must be F32 (BF16 and F16 are read exactly)");
            const bool scalar = want.empty();
            const bool ok = scalar ? si.shape.empty() || si.shape == std::vector<int64_t>{1} : si.shape == want;
            const std::string expected =
                scalar ? "a scalar ([] or [1]; per-channel scales are not supported)"
                       : shape_to_string(want) + " (one per 128x128 block of '" + printable(wt.name) + "' " +
                             shape_to_string(wt.shape) + ")";
            SWITCHYARD_CHECK(ok, path, ": tensor '", printable(n), "' has shape ", shape_to_string(si.shape),
                             ", expected ", expected);
            const uint8_t* p = L.data(si);
            for (int64_t i = 0; i < si.numel(); ++i) {
                const float v = float_at(p, si.dtype, i);
                SWITCHYARD_CHECK(std::isfinite(v), path, ": tensor '", printable(n), "' has a non-finite scale ", v,
                                 " at flat index ", i);
                SWITCHYARD_CHECK(v > 0.0f || (!input && v == 0.0f), path, ": tensor '", printable(n), "' has the scale ",
                                 v, " at flat index ", i,
                                 input ? "; input scales must be > 0" : "; weight scales must be >= 0");
            }
            used.insert(n);
            return &si;
        };
        if (m == QuantMode::kFP8Block) {
            ms.w = scale_tensor(n_inv, {fp8_blocks(wt.shape[0]), fp8_blocks(wt.shape[1])}, false);
            SWITCHYARD_CHECK(!file.has(n_in), path, ": tensor '", printable(n_in),
                             "' is a static input scale, which only per-tensor FP8 (weight_scale) takes; '",
                             printable(wt.name), "' is block-scaled (its activations are quantised per token and 128 "
                             "channels)");
        } else {
            ms.w = scale_tensor(n_ts, {}, false);
            if (file.has(n_in)) ms.input = scale_tensor(n_in, {}, true);
        }
        return ms;
    };
    for (ExpertTensors& t : experts) {
        t.s_in0 = scales_of(*t.in0);
        if (t.in1) t.s_in1 = scales_of(*t.in1);
        t.s_down = scales_of(*t.down);
    }
    MatrixScales ssg, ssu, ssd;  // shared expert
    if (sd) {
        SWITCHYARD_CHECK(sd->dtype != DType::kF8E4M3 || edt == DType::kF8E4M3, path, ": shared-expert tensor '",
                         printable(sd->name), "' is F8_E4M3 but the routed experts are ", safetensors_dtype_name(edt),
                         "; FP8 layers need F8_E4M3 routed experts (a float shared expert beside them is fine)");
        if (sg) ssg = scales_of(*sg);
        ssu = scales_of(*su);
        ssd = scales_of(*sd);
    }
    // The router (and Qwen2-MoE's shared-expert gate) is never quantised: a scale beside it is an error too.
    scales_of(*gi);
    if (sgate) scales_of(*sgate);
    // Block scales cover 128-row blocks of the fused w13 [2F, H] (gate rows, then up rows): with F % 128 != 0 the
    // last gate block and the first up block would share rows, and one scale, so the checkpoint's two scales could
    // not be kept. Real block-scaled checkpoints have F % 128 == 0 (DeepSeek-V3 2048, Qwen3-30B-A3B 768).
    if (out.quant_mode == QuantMode::kFP8Block && gated) {
        SWITCHYARD_CHECK(F % kFp8BlockSize == 0, path, ": block-scaled FP8 experts with a gated activation need an FFN "
                         "width that is a multiple of 128 ('", printable(experts[0].in0->name), "' has ", F,
                         " rows): the fused [gate; up] matrix would put rows of both in one 128x128 scale block");
        SWITCHYARD_CHECK(!sd || sd->dtype != DType::kF8E4M3 || S % kFp8BlockSize == 0, path,
                         ": block-scaled FP8 shared experts with a gated activation need a width that is a multiple of "
                         "128 ('", printable(sd ? sd->name : ""), "' has ", S, " columns)");
    }
    // Static input scales: for every matrix of a group or for none (the layer takes one per expert and GEMM).
    auto all_or_none = [&](const std::vector<std::pair<const SafetensorInfo*, const MatrixScales*>>& group) {
        const SafetensorInfo *with = nullptr, *without = nullptr;  // the first matrix with / without one
        for (const auto& g : group) {
            if (g.first == nullptr || g.first->dtype != DType::kF8E4M3) continue;
            const SafetensorInfo*& slot = g.second->input ? with : without;
            if (slot == nullptr) slot = g.first;
        }
        SWITCHYARD_CHECK(!(with && without), path, ": tensor '", printable(with ? with->name : ""),
                         "' has an input_scale but '", printable(without ? without->name : ""),
                         "' has none; give static input scales for every expert of a projection or for none");
    };
    {
        std::vector<std::pair<const SafetensorInfo*, const MatrixScales*>> g13, g2;
        for (const ExpertTensors& t : experts) {
            g13.push_back({t.in0, &t.s_in0});
            g13.push_back({t.in1, &t.s_in1});
            g2.push_back({t.down, &t.s_down});
        }
        all_or_none(g13);
        all_or_none(g2);
        all_or_none({{sg, &ssg}, {su, &ssu}});
    }

    // Every other tensor of the MoE block is reported: it is not part of the layer and was ignored.
    {
        const std::string block_pre = L.full(block);
        std::vector<std::string> ignored;
        for (const std::string& n : file.names())
            if (starts_with(n, block_pre) && !used.count(n)) ignored.push_back(n);
        const size_t kShow = 8;
        for (size_t i = 0; i < ignored.size() && i < kShow; ++i)
            out.notes.push_back("'" + printable(ignored[i]) + "' is not part of the MoE layer and was ignored");
        if (ignored.size() > kShow)
            out.notes.push_back("... and " + std::to_string(ignored.size() - kShow) + " more ignored tensors under '" +
                                printable(block_pre) + "'");
    }

    // Non-finite weights (rejected unless allowed).
    finite(*gi);
    if (bi) finite(*bi);
    for (const ExpertTensors& t : experts)
        for (const SafetensorInfo* x : {t.in0, t.in1, t.down})
            if (x) finite(*x);
    for (const SafetensorInfo* x : {sg, su, sd, sgate})
        if (x) finite(*x);

    // ---- 2. Allocate and copy (every size here was checked against tensors that exist in the file).
    out.owned.w.gate = out.owned.allocate(gi->dtype, gi->shape);
    std::memcpy(out.owned.w.gate.data, L.data(*gi), out.owned.w.gate.nbytes());
    if (bi) {
        out.owned.w.score_bias = out.owned.allocate(DType::kF32, {E});
        float* dst = out.owned.w.score_bias.ptr<float>();
        const uint8_t* src = L.data(*bi);
        for (int64_t e = 0; e < E; ++e) {
            if (bi->dtype == DType::kF32) {
                std::memcpy(&dst[e], src + 4 * e, 4);
            } else {
                uint16_t h;
                std::memcpy(&h, src + 2 * e, 2);
                dst[e] = bi->dtype == DType::kBF16 ? bf16_to_float(h) : half_to_float(h);
            }
        }
        out.has_score_bias = true;
    }
    const size_t es = dtype_size(edt);
    const int64_t R13 = gated ? 2 * F : F;
    out.owned.w.w13 = out.owned.allocate(edt, {E, R13, H});
    out.owned.w.w2 = out.owned.allocate(edt, {E, H, F});
    uint8_t* w13 = static_cast<uint8_t*>(out.owned.w.w13.data);
    uint8_t* w2 = static_cast<uint8_t*>(out.owned.w.w2.data);
    const size_t block_bytes = static_cast<size_t>(F * H) * es;
    for (int64_t i = 0; i < E; ++i) {
        const ExpertTensors& t = experts[static_cast<size_t>(i)];
        uint8_t* dst13 = w13 + static_cast<size_t>(i) * (gated ? 2 : 1) * block_bytes;
        std::memcpy(dst13, L.data(*t.in0), block_bytes);
        if (gated) std::memcpy(dst13 + block_bytes, L.data(*t.in1), block_bytes);
        std::memcpy(w2 + static_cast<size_t>(i) * block_bytes, L.data(*t.down), block_bytes);
    }
    if (sd) {
        const DType sdt = sd->dtype;
        const size_t sblock = static_cast<size_t>(S * H) * dtype_size(sdt);
        out.owned.w.shared_w13 = out.owned.allocate(sdt, {gated ? 2 * S : S, H});
        out.owned.w.shared_w2 = out.owned.allocate(sdt, {H, S});
        uint8_t* s13 = static_cast<uint8_t*>(out.owned.w.shared_w13.data);
        if (gated) {
            std::memcpy(s13, L.data(*sg), sblock);
            std::memcpy(s13 + sblock, L.data(*su), sblock);
        } else {
            std::memcpy(s13, L.data(*su), sblock);
        }
        std::memcpy(out.owned.w.shared_w2.data, L.data(*sd), sblock);
        if (sgate != nullptr) {
            out.owned.w.shared_gate = out.owned.allocate(sdt, {1, H});
            std::memcpy(out.owned.w.shared_gate.data, L.data(*sgate), static_cast<size_t>(H) * dtype_size(sdt));
            out.has_shared_gate = true;
        }
        out.num_shared_experts = n_shared;
        out.shared_ffn_size = S / n_shared;
    }
    // ---- 3. FP8 scales (fp32). Block: each matrix's [B(rows), B(cols)] blocks as stored, w13's gate blocks over its
    // up blocks (F % 128 == 0, checked above, so they line up with the fused rows). Tensor: one scale per fused w13;
    // when gate and up have different scales, w13 takes the larger and the other matrix's codes are requantised to it
    // (e4m3(dec(q) * s / s_max), as vLLM does for the same checkpoints: the one lossy step of the loader).
    // Static input scales: GEMM1's is the larger of gate's and up's (llm-compressor / vLLM), GEMM2's down's.
    if (out.quant_mode != QuantMode::kNone) {
        const bool block = out.quant_mode == QuantMode::kFP8Block;
        auto scale_value = [&](const SafetensorInfo* si) { return float_at(L.data(*si), si->dtype, 0); };
        auto copy_scales = [&](const SafetensorInfo* si, float* dst) {
            for (int64_t j = 0; j < si->numel(); ++j) dst[j] = float_at(L.data(*si), si->dtype, j);
        };
        int64_t requantised = 0, input_max = 0;
        // Fuses gate's and up's per-tensor scales for the [gate; up] codes at w13 (n codes each); returns the scale.
        auto fuse_tensor_scales = [&](uint8_t* w13, int64_t n, float sg, float su) {
            const float s = std::max(sg, su);
            if (sg != su) {
                uint8_t* codes = sg < su ? w13 : w13 + n;
                const double ratio = static_cast<double>(std::min(sg, su)) / static_cast<double>(s);
                for (int64_t j = 0; j < n; ++j)
                    codes[j] = float_to_fp8_e4m3(static_cast<float>(fp8_e4m3_to_float(codes[j]) * ratio));
                ++requantised;
            }
            return s;
        };
        auto fused_input = [&](const MatrixScales& g, const MatrixScales& u) {
            const float a = scale_value(g.input), b = scale_value(u.input);
            if (a != b) ++input_max;
            return std::max(a, b);
        };
        const int64_t R13 = gated ? 2 * F : F;
        if (block) {
            const int64_t bh = fp8_blocks(H), bf = fp8_blocks(F);
            out.owned.w.w13_scale = out.owned.allocate(DType::kF32, {E, fp8_blocks(R13), bh});
            out.owned.w.w2_scale = out.owned.allocate(DType::kF32, {E, bh, bf});
            for (int64_t i = 0; i < E; ++i) {
                const ExpertTensors& t = experts[static_cast<size_t>(i)];
                float* d13 = out.owned.w.w13_scale.ptr<float>() + i * fp8_blocks(R13) * bh;
                copy_scales(t.s_in0.w, d13);
                if (gated) copy_scales(t.s_in1.w, d13 + bf * bh);
                copy_scales(t.s_down.w, out.owned.w.w2_scale.ptr<float>() + i * bh * bf);
            }
        } else {
            out.owned.w.w13_scale = out.owned.allocate(DType::kF32, {E});
            out.owned.w.w2_scale = out.owned.allocate(DType::kF32, {E});
            const bool in13 = experts[0].s_in0.input != nullptr, in2 = experts[0].s_down.input != nullptr;
            if (in13) out.owned.w.w13_input_scale = out.owned.allocate(DType::kF32, {E});
            if (in2) out.owned.w.w2_input_scale = out.owned.allocate(DType::kF32, {E});
            for (int64_t i = 0; i < E; ++i) {
                const ExpertTensors& t = experts[static_cast<size_t>(i)];
                uint8_t* codes = w13 + static_cast<size_t>(i * R13 * H);
                out.owned.w.w13_scale.ptr<float>()[i] =
                    gated ? fuse_tensor_scales(codes, F * H, scale_value(t.s_in0.w), scale_value(t.s_in1.w))
                          : scale_value(t.s_in0.w);
                out.owned.w.w2_scale.ptr<float>()[i] = scale_value(t.s_down.w);
                if (in13)
                    out.owned.w.w13_input_scale.ptr<float>()[i] =
                        gated ? fused_input(t.s_in0, t.s_in1) : scale_value(t.s_in0.input);
                if (in2) out.owned.w.w2_input_scale.ptr<float>()[i] = scale_value(t.s_down.input);
            }
        }
        if (sd && sd->dtype == DType::kF8E4M3) {
            const int64_t Rs = gated ? 2 * S : S;
            if (block) {
                const int64_t bh = fp8_blocks(H);
                out.owned.w.shared_w13_scale = out.owned.allocate(DType::kF32, {fp8_blocks(Rs), bh});
                out.owned.w.shared_w2_scale = out.owned.allocate(DType::kF32, {bh, fp8_blocks(S)});
                float* d13 = out.owned.w.shared_w13_scale.ptr<float>();
                if (gated) {
                    copy_scales(ssg.w, d13);
                    copy_scales(ssu.w, d13 + fp8_blocks(S) * bh);
                } else {
                    copy_scales(ssu.w, d13);
                }
                copy_scales(ssd.w, out.owned.w.shared_w2_scale.ptr<float>());
            } else {
                out.owned.w.shared_w13_scale = out.owned.allocate(DType::kF32, {1});
                out.owned.w.shared_w2_scale = out.owned.allocate(DType::kF32, {1});
                uint8_t* codes = static_cast<uint8_t*>(out.owned.w.shared_w13.data);
                out.owned.w.shared_w13_scale.ptr<float>()[0] =
                    gated ? fuse_tensor_scales(codes, S * H, scale_value(ssg.w), scale_value(ssu.w))
                          : scale_value(ssu.w);
                out.owned.w.shared_w2_scale.ptr<float>()[0] = scale_value(ssd.w);
                if (ssu.input) {
                    out.owned.w.shared_w13_input_scale = out.owned.allocate(DType::kF32, {1});
                    out.owned.w.shared_w13_input_scale.ptr<float>()[0] =
                        gated ? fused_input(ssg, ssu) : scale_value(ssu.input);
                }
                if (ssd.input) {
                    out.owned.w.shared_w2_input_scale = out.owned.allocate(DType::kF32, {1});
                    out.owned.w.shared_w2_input_scale.ptr<float>()[0] = scale_value(ssd.input);
                }
            }
        }
        if (requantised > 0)
            out.notes.push_back(std::to_string(requantised) +
                                " fused gate/up pair(s) have different per-tensor weight scales: w13 takes the larger "
                                "and the other matrix's codes were requantised to it (as vLLM does)");
        if (input_max > 0)
            out.notes.push_back(std::to_string(input_max) +
                                " gate/up pair(s) have different input scales: GEMM1 uses the larger (llm-compressor / "
                                "vLLM convention)");
    }
    return out;
}

std::vector<uint8_t> random_values(DType dtype, int64_t n, double lo, double hi, uint64_t seed) {
    SWITCHYARD_CHECK(is_float(dtype), "random values need a float dtype, got ", to_string(dtype));
    SWITCHYARD_CHECK(n >= 0, "random values: negative count ", n);
    std::vector<uint8_t> out(static_cast<size_t>(n) * dtype_size(dtype));
    SplitMix64 rng(seed);
    for (int64_t i = 0; i < n; ++i) {
        float v = static_cast<float>(lo + (hi - lo) * rng.uniform());
        if (dtype == DType::kF32) {
            std::memcpy(&out[4 * i], &v, 4);
        } else {
            uint16_t h = dtype == DType::kBF16 ? float_to_bf16(v) : float_to_half(v);
            std::memcpy(&out[2 * i], &h, 2);
        }
    }
    return out;
}

OwnedWeights random_weights(const MoEConfig& cfg, uint64_t seed) {
    const int64_t E = cfg.num_experts, H = cfg.hidden_size, F = cfg.ffn_size;
    SWITCHYARD_CHECK(E > 0 && H > 0 && F > 0, "random weights need positive sizes: num_experts=", E, " hidden_size=", H,
                     " ffn_size=", F);
    const DType dt = cfg.dtype;
    OwnedWeights ow;
    // Each tensor gets its own stream derived from (seed, tensor index), so adding one never shifts another.
    auto fill = [&](TensorRef& t, double bound, uint64_t idx) {
        std::vector<uint8_t> v =
            random_values(t.dtype, t.numel(), -bound, bound, seed * 0x100000001b3ull + idx * 0x9e3779b97f4a7c15ull + 1);
        std::memcpy(t.data, v.data(), v.size());
    };
    ow.w.gate = ow.allocate(dt, {E, H});
    fill(ow.w.gate, 1.0 / std::sqrt(static_cast<double>(H)), 1);
    ow.w.score_bias = ow.allocate(DType::kF32, {E});
    fill(ow.w.score_bias, 0.1, 2);
    ow.w.w13 = ow.allocate(dt, {E, cfg.w13_rows(), H});
    fill(ow.w.w13, 1.0 / std::sqrt(static_cast<double>(H)), 3);
    ow.w.w2 = ow.allocate(dt, {E, H, F});
    fill(ow.w.w2, 1.0 / std::sqrt(static_cast<double>(F)), 4);
    const int64_t S = cfg.shared_width();
    if (S > 0) {
        ow.w.shared_w13 = ow.allocate(dt, {is_gated(cfg.activation) ? 2 * S : S, H});
        fill(ow.w.shared_w13, 1.0 / std::sqrt(static_cast<double>(H)), 5);
        ow.w.shared_w2 = ow.allocate(dt, {H, S});
        fill(ow.w.shared_w2, 1.0 / std::sqrt(static_cast<double>(S)), 6);
    }
    return ow;
}

}  // namespace io
}  // namespace switchyard
