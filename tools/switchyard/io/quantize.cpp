// tools/switchyard/io/quantize.cpp: FP8 quantisation of a checkpoint's expert projections (see quantize.h).
#include "io/quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>

#include "io/file_util.h"
#include "io/npy.h"
#include "switchyard/dtype.h"
#include "switchyard/error.h"
#include "switchyard/stages.h"

namespace switchyard {
namespace io {

namespace {

constexpr float kFp8Max = 448.0f;

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
    return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

enum class Role { kGate, kUp, kDown };

struct Projection {
    std::string name;   // the weight tensor
    std::string group;  // the expert it belongs to (the name up to the projection)
    Role role = Role::kGate;
};

// `head` + `tail` ends `s` with `tail` starting at a name component (head is empty or ends with '.').
bool component_suffix(const std::string& s, const std::string& tail) {
    return ends_with(s, tail) && (s.size() == tail.size() || s[s.size() - tail.size() - 1] == '.');
}

// parent ends in `<stem><digits>` at a component boundary.
bool indexed_suffix(const std::string& parent, const std::string& stem) {
    size_t d = parent.size();
    while (d > 0 && parent[d - 1] >= '0' && parent[d - 1] <= '9') --d;
    if (d == parent.size()) return false;
    return component_suffix(parent.substr(0, d), stem);
}

// An expert projection of either naming scheme (weights.h), or false.
bool match_projection(const std::string& name, const std::string& prefix, Projection* p) {
    if (!starts_with(name, prefix) || !ends_with(name, ".weight")) return false;
    const std::string stem = name.substr(0, name.size() - std::string(".weight").size());
    const size_t dot = stem.rfind('.');
    if (dot == std::string::npos) return false;
    const std::string proj = stem.substr(dot + 1), parent = stem.substr(0, dot);
    static const std::map<std::string, Role> mixtral = {{"w1", Role::kGate}, {"w3", Role::kUp}, {"w2", Role::kDown}};
    static const std::map<std::string, Role> hf = {
        {"gate_proj", Role::kGate}, {"up_proj", Role::kUp}, {"down_proj", Role::kDown}};
    if (mixtral.count(proj) && indexed_suffix(parent, "block_sparse_moe.experts.")) {
        p->role = mixtral.at(proj);
    } else if (hf.count(proj) && (indexed_suffix(parent, "mlp.experts.") || component_suffix(parent, "mlp.shared_experts") ||
                                  component_suffix(parent, "mlp.shared_expert"))) {
        p->role = hf.at(proj);
    } else {
        return false;
    }
    p->name = name;
    p->group = parent;
    return true;
}

// A float matrix as fp32 (exact); Error naming the tensor at its first non-finite value.
std::vector<float> read_matrix(const SafetensorsFile& f, const SafetensorInfo& i) {
    const int64_t n = i.numel(), cols = i.shape[1];
    std::vector<float> out(static_cast<size_t>(n));
    const uint8_t* src = f.data(i.name);
    for (int64_t j = 0; j < n; ++j) {
        float v;
        if (i.dtype == DType::kF32) {
            std::memcpy(&v, src + 4 * j, 4);
        } else {
            uint16_t h;
            std::memcpy(&h, src + 2 * j, 2);
            v = i.dtype == DType::kBF16 ? bf16_to_float(h) : half_to_float(h);
        }
        SWITCHYARD_CHECK(std::isfinite(v), f.path(), ": tensor '", printable(i.name), "' has a non-finite value (", v,
                         ") at row ", j / cols, ", column ", j % cols, "; only finite weights can be quantised");
        out[static_cast<size_t>(j)] = v;
    }
    return out;
}

float amax_of(const std::vector<float>& w) {
    float a = 0.0f;
    for (float v : w) a = std::max(a, std::fabs(v));
    return a;
}

}  // namespace

float fp8_scale_for_amax(float amax) { return amax / kFp8Max; }

void quantize_fp8_with_scale(const float* w, int64_t n, float scale, uint8_t* codes) {
    for (int64_t j = 0; j < n; ++j) codes[j] = scale == 0.0f ? uint8_t{0} : float_to_fp8_e4m3(w[j] / scale);
}

void quantize_fp8_block(const float* w, int64_t rows, int64_t cols, uint8_t* codes, float* scales) {
    const int64_t G = kFp8BlockSize, br = fp8_blocks(rows), bc = fp8_blocks(cols);
    for (int64_t bi = 0; bi < br; ++bi) {
        for (int64_t bj = 0; bj < bc; ++bj) {
            const int64_t r0 = bi * G, r1 = std::min(rows, r0 + G), c0 = bj * G, c1 = std::min(cols, c0 + G);
            float amax = 0.0f;
            for (int64_t r = r0; r < r1; ++r)
                for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
            const float s = fp8_scale_for_amax(amax);
            scales[bi * bc + bj] = s;
            for (int64_t r = r0; r < r1; ++r) quantize_fp8_with_scale(w + r * cols + c0, c1 - c0, s, codes + r * cols + c0);
        }
    }
}

QuantizeSummary quantize_checkpoint(const SafetensorsFile& in, const std::string& out_path, const QuantizeOptions& opts) {
    const std::string& path = in.path();
    SWITCHYARD_CHECK(opts.mode == QuantMode::kFP8Block || opts.mode == QuantMode::kFP8Tensor,
                     "quantize: format must be fp8-block or fp8-tensor, got ", to_string(opts.mode));
    const bool block = opts.mode == QuantMode::kFP8Block;

    // ---- 1. Find and check every projection (nothing is computed or written before this passes).
    std::vector<Projection> projs;
    for (const std::string& n : in.names()) {
        Projection p;
        if (!match_projection(n, opts.prefix, &p)) continue;
        const SafetensorInfo& ri = in.raw_info(n);
        SWITCHYARD_CHECK(ri.dtype_str != "F8_E4M3", path, ": tensor '", printable(n),
                         "' is already F8_E4M3 (quantize takes F32, BF16 or F16 checkpoints)");
        SWITCHYARD_CHECK(ri.dtype_ok && (ri.dtype == DType::kF32 || ri.dtype == DType::kBF16 || ri.dtype == DType::kF16),
                         path, ": tensor '", printable(n), "' has dtype ", printable(ri.dtype_str, 24),
                         "; expert weights to quantise must be F32, BF16 or F16");
        SWITCHYARD_CHECK(ri.shape.size() == 2 && ri.shape[0] > 0 && ri.shape[1] > 0, path, ": tensor '", printable(n),
                         "' has shape ", shape_to_string(ri.shape), ", expected a non-empty matrix [out, in]");
        const std::string base = n.substr(0, n.size() - std::string("weight").size());
        for (const char* s : {"weight_scale_inv", "weight_scale", "input_scale"})
            SWITCHYARD_CHECK(!in.has(base + s), path, ": tensor '", printable(base + s), "' already exists beside '",
                             printable(n), "' (a quantised checkpoint?)");
        projs.push_back(p);
    }
    SWITCHYARD_CHECK(!projs.empty(), path, ": no expert projection under prefix '", printable(opts.prefix),
                     "' (looked for '", printable(opts.prefix), "...block_sparse_moe.experts.N.w1.weight' and '",
                     printable(opts.prefix), "...mlp.experts.N.gate_proj.weight' / mlp.shared_experts.*)");

    // ---- 2. Quantise. Tensor mode: gate and up of one expert share max(amax) / 448.
    std::map<std::string, float> amax;  // per-tensor mode: tensor name -> amax
    std::map<std::string, float> group_amax;
    if (!block) {
        for (const Projection& p : projs) {
            const float a = amax_of(read_matrix(in, in.info(p.name)));
            amax[p.name] = a;
            if (p.role != Role::kDown) group_amax[p.group] = std::max(group_amax[p.group], a);
        }
    }
    struct Quantised {
        std::vector<uint8_t> codes;
        std::vector<float> scales;
        std::vector<int64_t> scale_shape;
    };
    std::map<std::string, Quantised> done;
    QuantizeSummary sum;
    for (const Projection& p : projs) {
        const SafetensorInfo& i = in.info(p.name);
        const std::vector<float> w = read_matrix(in, i);
        Quantised& q = done[p.name];
        q.codes.resize(w.size());
        if (block) {
            q.scale_shape = {fp8_blocks(i.shape[0]), fp8_blocks(i.shape[1])};
            q.scales.resize(static_cast<size_t>(q.scale_shape[0] * q.scale_shape[1]));
            quantize_fp8_block(w.data(), i.shape[0], i.shape[1], q.codes.data(), q.scales.data());
        } else {
            const float a = p.role == Role::kDown ? amax.at(p.name) : group_amax.at(p.group);
            q.scales = {fp8_scale_for_amax(a)};
            quantize_fp8_with_scale(w.data(), static_cast<int64_t>(w.size()), q.scales[0], q.codes.data());
        }
        ++sum.matrices;
        sum.bytes_before += i.end - i.begin;
        sum.bytes_after += q.codes.size() + 4 * q.scales.size();
    }

    // ---- 3. The output: every input tensor in the input's data order, each projection followed by its scale.
    std::vector<std::string> order = in.names();
    std::sort(order.begin(), order.end(), [&](const std::string& a, const std::string& b) {
        return in.raw_info(a).begin != in.raw_info(b).begin ? in.raw_info(a).begin < in.raw_info(b).begin : a < b;
    });
    const char* scale_suffix = block ? "weight_scale_inv" : "weight_scale";
    std::vector<SafetensorToWrite> tensors;
    for (const std::string& n : order) {
        const SafetensorInfo& ri = in.raw_info(n);
        auto it = done.find(n);
        if (it == done.end()) {
            SafetensorToWrite t;
            t.name = n;
            t.shape = ri.shape;
            t.data = in.raw_data(n);
            t.dtype_str = ri.dtype_str;
            tensors.push_back(t);
            ++sum.copied;
            continue;
        }
        tensors.push_back({n, DType::kF8E4M3, ri.shape, it->second.codes.data()});
        tensors.push_back({n.substr(0, n.size() - std::string("weight").size()) + scale_suffix, DType::kF32,
                           it->second.scale_shape, it->second.scales.data()});
    }
    std::map<std::string, std::string> meta = in.metadata();
    if (!meta.count("format")) meta["format"] = "pt";
    nlohmann::ordered_json qc = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"}};
    if (block)
        qc["weight_block_size"] = {kFp8BlockSize, kFp8BlockSize};
    else
        qc["weight_scheme"] = "per-tensor";
    qc["modules"] = "expert projections (routed and shared); router and everything else unquantised";
    meta["quantization_config"] = qc.dump();
    meta["switchyard_quantize"] = std::string("--format ") + to_string(opts.mode) + " --prefix '" + opts.prefix +
                                  "': " + std::to_string(sum.matrices) + " matrices";
    write_safetensors(out_path, tensors, meta);
    return sum;
}

}  // namespace io
}  // namespace switchyard
