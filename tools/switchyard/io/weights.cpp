// tools/switchyard/io/weights.cpp: loading one MoE layer's weights by Hugging Face names, and seeded random weights.
// See weights.h for the naming schemes, the w13 layout and the dtype rules.
#include "io/weights.h"

#include <cmath>
#include <cstring>
#include <set>

#include "io/file_util.h"
#include "io/npy.h"
#include "switchyard/error.h"

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
}

namespace {


bool is_float(DType t) { return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16; }

class Loader {
 public:
    Loader(const SafetensorsFile& f, const WeightLoadOptions& o) : f_(f), o_(o) {}

    std::string full(const std::string& n) const { return o_.prefix + n; }
    bool has(const std::string& n) const { return f_.has(full(n)); }

    // Info of a required float tensor with the expected shape.
    const SafetensorInfo& need(const std::string& n, const std::vector<int64_t>& shape) const {
        std::string name = full(n);
        SWITCHYARD_CHECK(f_.has(name), f_.path(), ": tensor '", printable(name), "' not found");
        const SafetensorInfo& i = f_.info(name);
        SWITCHYARD_CHECK(is_float(i.dtype), f_.path(), ": tensor '", printable(name), "' has dtype ", i.dtype_str,
                         "; weights must be F32, BF16 or F16");
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
        SWITCHYARD_CHECK(is_float(fi.dtype), path, ": tensor '", printable(fi.name), "' has dtype ", fi.dtype_str,
                         "; weights must be F32, BF16 or F16");
        out.expert_dtype = fi.dtype;
    }
    const int64_t F = out.ffn_size;
    const DType edt = out.expert_dtype;
    struct ExpertTensors {
        const SafetensorInfo *in0 = nullptr, *in1 = nullptr, *down = nullptr;
    };
    std::vector<ExpertTensors> experts(static_cast<size_t>(E));
    for (int64_t i = 0; i < E; ++i) {
        ExpertTensors& t = experts[static_cast<size_t>(i)];
        if (gated) {
            t.in0 = &L.need(ename(i, g_name), {F, H});
            t.in1 = &L.need(ename(i, u_name), {F, H});
            L.same_dtype(*t.in1, edt, "expert");
        } else {
            SWITCHYARD_CHECK(!L.has(ename(i, other_name)), path, ": tensor '", printable(L.full(ename(i, other_name))),
                             "' is present but activation ", to_string(opts.activation),
                             " is ungated (use swiglu or geglu for gated experts)");
            t.in0 = &L.need(ename(i, in_name), {F, H});
        }
        L.same_dtype(*t.in0, edt, "expert");
        t.down = &L.need(ename(i, d_name), {H, F});
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
            sd = &L.need(sp + "down_proj.weight", {H, S});
            if (gated) {
                sg = &L.need(sp + "gate_proj.weight", {S, H});
                su = &L.need(sp + "up_proj.weight", {S, H});
                L.same_dtype(*sg, sd->dtype, "shared expert");
            } else {
                SWITCHYARD_CHECK(!L.has(sp + "gate_proj.weight"), path, ": tensor '",
                                 printable(L.full(sp + "gate_proj.weight")), "' is present but activation ",
                                 to_string(opts.activation), " is ungated");
                su = &L.need(sp + "up_proj.weight", {S, H});
            }
            L.same_dtype(*su, sd->dtype, "shared expert");
            // Qwen2-MoE scales its shared expert by sigmoid(x . shared_expert_gate) (MoEConfig::shared_expert_gate).
            if (L.has("mlp.shared_expert_gate.weight")) {
                sgate = &L.need("mlp.shared_expert_gate.weight", {1, H});
                L.same_dtype(*sgate, sd->dtype, "shared expert");
            }
            for (const SafetensorInfo* x : {sg, su, sd, sgate})
                if (x) used.insert(x->name);
        } else if (!sp.empty()) {
            for (const char* part : {"gate_proj.weight", "up_proj.weight", "down_proj.weight"})
                if (L.has(sp + part)) used.insert(L.full(sp + part));
            if (L.has("mlp.shared_expert_gate.weight")) used.insert(L.full("mlp.shared_expert_gate.weight"));
            out.notes.push_back("shared-expert tensors under '" + printable(L.full(sp)) + "' present but not used");
        }
    } else {
        SWITCHYARD_CHECK(opts.num_shared_experts <= 0, path, ": ", opts.num_shared_experts,
                         " shared experts requested but Mixtral-named weights have none");
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
