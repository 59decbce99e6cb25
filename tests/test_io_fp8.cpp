// tests/test_io_fp8.cpp: FP8 checkpoints (issue 13): loading F8_E4M3 experts with their scale tensors
// (weight_scale_inv blocks, per-tensor weight_scale, input_scale) under both naming schemes, `forward` on them
// against a MoELayer built directly from the same fp8 tensors (bitwise), `quantize` round trips, and every
// malformed input refused with a message naming the tensor and no output file.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli_common.h"
#include "forward.h"
#include "io/file_util.h"
#include "io/npy.h"
#include "io/quantize.h"
#include "io/safetensors.h"
#include "io/weights.h"
#include "switchyard/error.h"
#include "switchyard/moe_layer.h"
#include "switchyard/stages.h"
#include "test_util.h"

using namespace switchyard;
using namespace switchyard::io;

namespace {

std::string temp_path(const std::string& name) {
    return testing::TempDir() + "switchyard_test_io_fp8_" + std::to_string(static_cast<long>(::getpid())) + "_" + name;
}

bool file_exists(const std::string& p) { return std::ifstream(p).good(); }

template <typename Fn>
void expect_error(Fn f, std::initializer_list<const char*> parts) {
    try {
        f();
        ADD_FAILURE() << "expected switchyard::Error containing '" << *parts.begin() << "'";
    } catch (const Error& e) {
        const std::string msg = e.what();
        for (const char* p : parts)
            EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nmissing: " << p;
    }
}

// A checkpoint as a map of tensors, so a test can break one entry and write the result.
struct Entry {
    DType dtype = DType::kF32;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
};
using Ckpt = std::map<std::string, Entry>;

Entry floats_entry(DType t, std::vector<int64_t> shape, const std::vector<float>& v) {
    Entry e{t, std::move(shape), std::vector<uint8_t>(v.size() * dtype_size(t))};
    for (size_t i = 0; i < v.size(); ++i) {
        if (t == DType::kF32) {
            std::memcpy(&e.bytes[4 * i], &v[i], 4);
        } else {
            const uint16_t h = t == DType::kBF16 ? float_to_bf16(v[i]) : float_to_half(v[i]);
            std::memcpy(&e.bytes[2 * i], &h, 2);
        }
    }
    return e;
}

std::vector<uint8_t> image(const Ckpt& c) {
    std::vector<SafetensorToWrite> ts;
    for (const auto& kv : c) ts.push_back({kv.first, kv.second.dtype, kv.second.shape, kv.second.bytes.data()});
    return encode_safetensors(ts);
}

void write_ckpt(const std::string& path, const Ckpt& c) {
    std::vector<SafetensorToWrite> ts;
    for (const auto& kv : c) ts.push_back({kv.first, kv.second.dtype, kv.second.shape, kv.second.bytes.data()});
    write_safetensors(path, ts);
}

std::vector<float> as_floats(const Entry& e) {
    const size_t n = e.bytes.size() / dtype_size(e.dtype);
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) {
        if (e.dtype == DType::kF32) {
            std::memcpy(&v[i], &e.bytes[4 * i], 4);
        } else {
            uint16_t h;
            std::memcpy(&h, &e.bytes[2 * i], 2);
            v[i] = e.dtype == DType::kBF16 ? bf16_to_float(h) : half_to_float(h);
        }
    }
    return v;
}

// One FP8 matrix of the test checkpoint: its codes and scales as written.
struct Fp8Matrix {
    std::vector<uint8_t> codes;
    std::vector<float> scales;  // block: [B(rows) * B(cols)]; tensor: [1]
    float input_scale = 0.0f;   // 0: none
};

// A layer's FP8 checkpoint (Qwen/DeepSeek or Mixtral names), with the matrices kept for the direct layer.
struct Fp8Layer {
    int64_t E = 4, H = 200, F = 128, S = 0;  // S: shared width (Qwen/DeepSeek names only)
    bool mixtral = false, gated = true, input_scales = false;
    QuantMode mode = QuantMode::kFP8Block;
    bool tensor_gate_up_differ = false;  // tensor mode: gate and up keep their own scales
    Ckpt ckpt;
    std::vector<Fp8Matrix> gate, up, down;  // per expert (gate empty when ungated)
    Fp8Matrix sgate, sup, sdown;
    std::vector<float> router;

    std::string name(int64_t e, int proj) const {  // proj 0 gate, 1 up, 2 down
        if (mixtral) {
            static const char* m[] = {"w1", "w3", "w2"};
            return "block_sparse_moe.experts." + std::to_string(e) + "." + m[proj] + ".";
        }
        static const char* q[] = {"gate_proj", "up_proj", "down_proj"};
        return e < 0 ? std::string("mlp.shared_experts.") + q[proj] + "."
                     : "mlp.experts." + std::to_string(e) + "." + q[proj] + ".";
    }

    // Quantises w [rows, cols] (given scale for tensor mode: shared by gate and up) and adds it under base.
    Fp8Matrix add(const std::string& base, const std::vector<float>& w, int64_t rows, int64_t cols, float tensor_scale,
                  float input_scale) {
        Fp8Matrix m;
        m.codes.resize(w.size());
        if (mode == QuantMode::kFP8Block) {
            m.scales.resize(static_cast<size_t>(fp8_blocks(rows) * fp8_blocks(cols)));
            quantize_fp8_block(w.data(), rows, cols, m.codes.data(), m.scales.data());
            ckpt[base + "weight_scale_inv"] = floats_entry(DType::kF32, {fp8_blocks(rows), fp8_blocks(cols)}, m.scales);
        } else {
            m.scales = {tensor_scale};
            quantize_fp8_with_scale(w.data(), static_cast<int64_t>(w.size()), tensor_scale, m.codes.data());
            ckpt[base + "weight_scale"] = floats_entry(DType::kF32, {}, m.scales);
            if (input_scale > 0.0f) {
                m.input_scale = input_scale;
                ckpt[base + "input_scale"] = floats_entry(DType::kF32, {1}, {input_scale});
            }
        }
        ckpt[base + "weight"] = Entry{DType::kF8E4M3, {rows, cols}, m.codes};
        return m;
    }

    static float amax(const std::vector<float>& v) {
        float a = 0;
        for (float x : v) a = std::max(a, std::fabs(x));
        return a;
    }

    void build(uint64_t seed) {
        const std::string blk = mixtral ? "block_sparse_moe." : "mlp.";
        router = test::random_uniform(static_cast<size_t>(E * H), seed, -0.2f, 0.2f);
        ckpt[blk + "gate.weight"] = floats_entry(DType::kBF16, {E, H}, router);
        if (!mixtral)
            ckpt["mlp.gate.e_score_correction_bias"] =
                floats_entry(DType::kF32, {E}, test::random_uniform(static_cast<size_t>(E), seed + 1, -0.1f, 0.1f));
        auto one = [&](int64_t e, int64_t width, Fp8Matrix* g, Fp8Matrix* u, Fp8Matrix* d, uint64_t s) {
            const float b1 = 1.0f / std::sqrt(static_cast<float>(H)), b2 = 1.0f / std::sqrt(static_cast<float>(width));
            std::vector<float> wg = test::random_uniform(static_cast<size_t>(width * H), s, -b1, b1);
            std::vector<float> wu = test::random_uniform(static_cast<size_t>(width * H), s + 1, -b1, b1);
            std::vector<float> wd = test::random_uniform(static_cast<size_t>(H * width), s + 2, -b2, b2);
            float sg = fp8_scale_for_amax(amax(wg)), su = fp8_scale_for_amax(amax(wu));
            if (!tensor_gate_up_differ) sg = su = std::max(sg, su);
            const float in1 = input_scales ? 0.01f * static_cast<float>(e + 2) : 0.0f;
            const float in_up = input_scales ? in1 * (e % 2 ? 1.5f : 1.0f) : 0.0f;  // odd experts: up's is larger
            if (gated) *g = add(name(e, 0), wg, width, H, sg, in1);
            // Ungated: the one input projection is Mixtral's w1 or up_proj (weights.h).
            *u = add(name(e, gated || !mixtral ? 1 : 0), wu, width, H, su, in_up);
            *d = add(name(e, 2), wd, H, width, fp8_scale_for_amax(amax(wd)), input_scales ? 0.02f : 0.0f);
        };
        gate.resize(static_cast<size_t>(E));
        up.resize(static_cast<size_t>(E));
        down.resize(static_cast<size_t>(E));
        for (int64_t e = 0; e < E; ++e)
            one(e, F, &gate[static_cast<size_t>(e)], &up[static_cast<size_t>(e)], &down[static_cast<size_t>(e)],
                seed + 10 + 3 * static_cast<uint64_t>(e));
        if (S > 0) one(-1, S, &sgate, &sup, &sdown, seed + 5);
    }
};

// MoEWeights built straight from the layer's fp8 matrices (the layout moe_layer.h documents), owning its buffers.
struct DirectWeights {
    OwnedWeights ow;
    MoEConfig cfg;
};

DirectWeights direct(const Fp8Layer& L, int64_t top_k) {
    DirectWeights d;
    MoEConfig& c = d.cfg;
    c.hidden_size = L.H;
    c.ffn_size = L.F;
    c.num_experts = L.E;
    c.top_k = top_k;
    c.activation = L.gated ? Activation::kSwiGLU : Activation::kGELU;
    c.quant_mode = L.mode;
    c.use_score_bias = !L.mixtral;
    c.num_shared_experts = L.S > 0 ? 1 : 0;
    c.shared_ffn_size = L.S;
    const bool block = L.mode == QuantMode::kFP8Block;
    const int64_t E = L.E, H = L.H, F = L.F, R13 = L.gated ? 2 * F : F;
    MoEWeights& w = d.ow.w;
    const std::string blk = L.mixtral ? "block_sparse_moe." : "mlp.";
    w.gate = d.ow.allocate(DType::kBF16, {E, H});
    std::memcpy(w.gate.data, L.ckpt.at(blk + "gate.weight").bytes.data(), w.gate.nbytes());
    if (!L.mixtral) {
        w.score_bias = d.ow.allocate(DType::kF32, {E});
        std::memcpy(w.score_bias.data, L.ckpt.at("mlp.gate.e_score_correction_bias").bytes.data(), 4 * E);
    }
    w.w13 = d.ow.allocate(DType::kF8E4M3, {E, R13, H});
    w.w2 = d.ow.allocate(DType::kF8E4M3, {E, H, F});
    const int64_t s13 = block ? fp8_blocks(R13) * fp8_blocks(H) : 1, s2 = block ? fp8_blocks(H) * fp8_blocks(F) : 1;
    w.w13_scale = block ? d.ow.allocate(DType::kF32, {E, fp8_blocks(R13), fp8_blocks(H)}) : d.ow.allocate(DType::kF32, {E});
    w.w2_scale = block ? d.ow.allocate(DType::kF32, {E, fp8_blocks(H), fp8_blocks(F)}) : d.ow.allocate(DType::kF32, {E});
    if (L.input_scales) {
        w.w13_input_scale = d.ow.allocate(DType::kF32, {E});
        w.w2_input_scale = d.ow.allocate(DType::kF32, {E});
    }
    auto put = [](uint8_t* dst, const std::vector<uint8_t>& v) { std::memcpy(dst, v.data(), v.size()); };
    auto putf = [](float* dst, const std::vector<float>& v) { std::memcpy(dst, v.data(), 4 * v.size()); };
    for (int64_t e = 0; e < E; ++e) {
        const size_t i = static_cast<size_t>(e);
        uint8_t* c13 = w.w13.ptr<uint8_t>() + e * R13 * H;
        float* sc13 = w.w13_scale.ptr<float>() + e * s13;
        if (L.gated) {
            put(c13, L.gate[i].codes);
            put(c13 + F * H, L.up[i].codes);
            if (block) {
                putf(sc13, L.gate[i].scales);
                putf(sc13 + L.gate[i].scales.size(), L.up[i].scales);
            } else {
                *sc13 = L.gate[i].scales[0];  // equal to up's (tensor_gate_up_differ false)
            }
        } else {
            put(c13, L.up[i].codes);
            putf(sc13, L.up[i].scales);
        }
        put(w.w2.ptr<uint8_t>() + e * H * F, L.down[i].codes);
        putf(w.w2_scale.ptr<float>() + e * s2, L.down[i].scales);
        if (L.input_scales) {
            w.w13_input_scale.ptr<float>()[e] = std::max(L.gated ? L.gate[i].input_scale : 0.0f, L.up[i].input_scale);
            w.w2_input_scale.ptr<float>()[e] = L.down[i].input_scale;
        }
    }
    if (L.S > 0) {
        const int64_t S = L.S, Rs = L.gated ? 2 * S : S;
        w.shared_w13 = d.ow.allocate(DType::kF8E4M3, {Rs, H});
        w.shared_w2 = d.ow.allocate(DType::kF8E4M3, {H, S});
        put(w.shared_w13.ptr<uint8_t>(), L.gated ? L.sgate.codes : L.sup.codes);
        if (L.gated) put(w.shared_w13.ptr<uint8_t>() + S * H, L.sup.codes);
        put(w.shared_w2.ptr<uint8_t>(), L.sdown.codes);
        if (block) {
            w.shared_w13_scale = d.ow.allocate(DType::kF32, {fp8_blocks(Rs), fp8_blocks(H)});
            w.shared_w2_scale = d.ow.allocate(DType::kF32, {fp8_blocks(H), fp8_blocks(S)});
            putf(w.shared_w13_scale.ptr<float>(), L.gated ? L.sgate.scales : L.sup.scales);
            if (L.gated) putf(w.shared_w13_scale.ptr<float>() + L.sgate.scales.size(), L.sup.scales);
        } else {
            w.shared_w13_scale = d.ow.allocate(DType::kF32, {1});
            w.shared_w2_scale = d.ow.allocate(DType::kF32, {1});
            w.shared_w13_scale.ptr<float>()[0] = L.sup.scales[0];
            if (L.input_scales) {
                w.shared_w13_input_scale = d.ow.allocate(DType::kF32, {1});
                w.shared_w2_input_scale = d.ow.allocate(DType::kF32, {1});
                w.shared_w13_input_scale.ptr<float>()[0] = std::max(L.gated ? L.sgate.input_scale : 0.0f, L.sup.input_scale);
                w.shared_w2_input_scale.ptr<float>()[0] = L.sdown.input_scale;
            }
        }
        putf(w.shared_w2_scale.ptr<float>(), L.sdown.scales);
    }
    return d;
}

void expect_same(const TensorRef& got, const TensorRef& want, const char* what) {
    ASSERT_EQ(got.defined(), want.defined()) << what;
    if (!want.defined()) return;
    ASSERT_EQ(got.dtype, want.dtype) << what;
    ASSERT_EQ(got.shape_string(), want.shape_string()) << what;
    EXPECT_EQ(std::memcmp(got.data, want.data, want.nbytes()), 0) << what << ": bytes differ";
}

std::vector<float> run_layer(const MoEConfig& cfg, const MoEWeights& w, const std::vector<float>& x) {
    const int64_t T = static_cast<int64_t>(x.size()) / cfg.hidden_size;
    std::vector<float> y(x.size());
    std::vector<float> xin = x;
    MoELayer layer(cfg, w);
    layer.forward(host_tensor(xin.data(), DType::kF32, {T, cfg.hidden_size}),
                  host_tensor(y.data(), DType::kF32, {T, cfg.hidden_size}));
    return y;
}

// `switchyard forward` in-process on a checkpoint file; returns y (fp32).
std::vector<float> cli_forward(const std::string& weights, const std::vector<float>& x, int64_t H, int64_t top_k,
                               const std::string& tag, const std::string& activation = "swiglu") {
    const std::string xp = temp_path(tag + "_x.npy"), yp = temp_path(tag + "_y.npy");
    const int64_t T = static_cast<int64_t>(x.size()) / H;
    write_npy(xp, DType::kF32, {T, H}, x.data());
    cli::ForwardOptions o;
    o.weights = weights;
    o.input = xp;
    o.output = yp;
    o.quiet = true;
    o.layer.top_k = top_k;
    o.layer.activation = activation;
    std::remove(yp.c_str());
    cli::run_forward(o);
    NpyArray y = read_npy(yp);
    std::vector<float> out(static_cast<size_t>(y.numel()));
    std::memcpy(out.data(), y.data.data(), 4 * out.size());
    std::remove(xp.c_str());
    std::remove(yp.c_str());
    return out;
}

void expect_bitwise(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    for (size_t i = 0; i < got.size(); ++i)
        ASSERT_EQ(float_bits(got[i]), float_bits(want[i])) << what << ": element " << i << " got " << got[i]
                                                           << " expected " << want[i];
}

double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
        den += static_cast<double>(b[i]) * b[i];
    }
    return std::sqrt(num / den);
}

// The loaded weights equal the direct ones tensor by tensor, and forward (library and CLI) equal bitwise.
void check_layer(const Fp8Layer& L, int64_t top_k, const std::string& tag) {
    SafetensorsFile f(image(L.ckpt), tag + ".safetensors");
    WeightLoadOptions lo;
    lo.activation = L.gated ? Activation::kSwiGLU : Activation::kGELU;
    LoadedWeights lw = load_moe_weights(f, lo);
    EXPECT_EQ(lw.quant_mode, L.mode);
    EXPECT_EQ(lw.expert_dtype, DType::kF8E4M3);
    DirectWeights d = direct(L, top_k);
    const MoEWeights &g = lw.owned.w, &w = d.ow.w;
    expect_same(g.gate, w.gate, "gate");
    expect_same(g.score_bias, w.score_bias, "score_bias");
    expect_same(g.w13, w.w13, "w13");
    expect_same(g.w2, w.w2, "w2");
    expect_same(g.w13_scale, w.w13_scale, "w13_scale");
    expect_same(g.w2_scale, w.w2_scale, "w2_scale");
    expect_same(g.w13_input_scale, w.w13_input_scale, "w13_input_scale");
    expect_same(g.w2_input_scale, w.w2_input_scale, "w2_input_scale");
    expect_same(g.shared_w13, w.shared_w13, "shared_w13");
    expect_same(g.shared_w2, w.shared_w2, "shared_w2");
    expect_same(g.shared_w13_scale, w.shared_w13_scale, "shared_w13_scale");
    expect_same(g.shared_w2_scale, w.shared_w2_scale, "shared_w2_scale");
    expect_same(g.shared_w13_input_scale, w.shared_w13_input_scale, "shared_w13_input_scale");
    expect_same(g.shared_w2_input_scale, w.shared_w2_input_scale, "shared_w2_input_scale");

    const std::vector<float> x = test::random_uniform(static_cast<size_t>(9 * L.H), 77, -1.0f, 1.0f);
    const std::vector<float> want = run_layer(d.cfg, w, x);
    const std::string path = temp_path(tag + ".safetensors");
    write_ckpt(path, L.ckpt);
    const std::vector<float> got = cli_forward(path, x, L.H, top_k, tag, L.gated ? "swiglu" : "gelu");
    expect_bitwise(got, want, "forward on the FP8 checkpoint vs the layer built from the same fp8 tensors");
    std::remove(path.c_str());
}

}  // namespace

// ---- safetensors: F8_E4M3 is a readable dtype; raw tensors copy through ---------------------------------------

TEST(Fp8Safetensors, F8E4M3ReadWriteAndRawCopy) {
    std::vector<uint8_t> codes(12);
    for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint8_t>(17 * i);
    const double d64[2] = {1.5, -2.0};
    std::vector<SafetensorToWrite> ts = {{"q", DType::kF8E4M3, {3, 4}, codes.data()}};
    SafetensorToWrite odd;
    odd.name = "odd";
    odd.shape = {2};
    odd.data = d64;
    odd.dtype_str = "F64";
    ts.push_back(odd);
    SafetensorsFile f(encode_safetensors(ts), "f8.st");
    EXPECT_EQ(f.info("q").dtype, DType::kF8E4M3);
    EXPECT_EQ(f.info("q").dtype_str, "F8_E4M3");
    EXPECT_EQ(std::memcmp(f.data("q"), codes.data(), codes.size()), 0);
    expect_error([&] { f.info("odd"); }, {"f8.st", "'odd'", "unsupported dtype F64"});
    EXPECT_EQ(f.raw_info("odd").dtype_str, "F64");
    EXPECT_EQ(std::memcmp(f.raw_data("odd"), d64, sizeof(d64)), 0);
    // The streaming writer gives the same bytes as the in-memory encoder.
    const std::string p = temp_path("f8.safetensors");
    write_safetensors(p, ts, {{"k", "v"}});
    EXPECT_EQ(read_file_bytes(p), encode_safetensors(ts, {{"k", "v"}}));
    std::remove(p.c_str());
}

// ---- loading ----------------------------------------------------------------------------------------------------

TEST(Fp8Load, BlockScaledDeepSeekNamesPartialBlocksSharedExpert) {
    Fp8Layer L;
    L.E = 4;
    L.H = 200;  // partial 128-column blocks in w13, partial 128-row blocks in w2
    L.F = 128;
    L.S = 128;
    L.build(1);
    check_layer(L, 2, "block_ds");
}

TEST(Fp8Load, BlockScaledUngatedPartialFfn) {
    Fp8Layer L;
    L.mixtral = true;
    L.gated = false;  // GELU: w13 = w1 alone, so F need not be a multiple of 128
    L.E = 3;
    L.H = 136;
    L.F = 136;
    L.build(2);
    check_layer(L, 2, "block_ungated");
}

TEST(Fp8Load, TensorScaledWithInputScalesAndSharedExpert) {
    Fp8Layer L;
    L.mode = QuantMode::kFP8Tensor;
    L.input_scales = true;  // odd experts' up input_scale is larger than gate's: GEMM1 takes the max
    L.E = 4;
    L.H = 96;
    L.F = 72;
    L.S = 40;
    L.build(3);
    check_layer(L, 2, "tensor_in");
}

TEST(Fp8Load, TensorScaledMixtralNames) {
    Fp8Layer L;
    L.mode = QuantMode::kFP8Tensor;
    L.mixtral = true;
    L.E = 4;
    L.H = 64;
    L.F = 48;
    L.build(4);
    check_layer(L, 2, "tensor_mixtral");
}

// Gate and up with different per-tensor scales: w13 takes the larger, the other matrix is requantised to it.
TEST(Fp8Load, TensorScaledGateUpScalesDifferAreFusedToTheMax) {
    Fp8Layer L;
    L.mode = QuantMode::kFP8Tensor;
    L.tensor_gate_up_differ = true;
    L.E = 2;
    L.H = 32;
    L.F = 16;
    L.build(5);
    SafetensorsFile f(image(L.ckpt), "differ.st");
    LoadedWeights lw = load_moe_weights(f, WeightLoadOptions{});
    ASSERT_EQ(lw.quant_mode, QuantMode::kFP8Tensor);
    bool any_note = false;
    for (const std::string& n : lw.notes) any_note = any_note || n.find("requantised") != std::string::npos;
    EXPECT_TRUE(any_note);
    for (int64_t e = 0; e < L.E; ++e) {
        const Fp8Matrix &g = L.gate[static_cast<size_t>(e)], &u = L.up[static_cast<size_t>(e)];
        ASSERT_NE(g.scales[0], u.scales[0]);
        const float s = std::max(g.scales[0], u.scales[0]);
        EXPECT_EQ(lw.owned.w.w13_scale.ptr<float>()[e], s);
        const uint8_t* c = lw.owned.w.w13.ptr<uint8_t>() + e * 2 * L.F * L.H;
        for (int part = 0; part < 2; ++part) {
            const Fp8Matrix& m = part == 0 ? g : u;
            for (int64_t j = 0; j < L.F * L.H; ++j) {
                const double v = static_cast<double>(fp8_e4m3_to_float(m.codes[static_cast<size_t>(j)])) * m.scales[0];
                // The matrix that had the larger scale is copied; the other holds e4m3(v / s).
                const uint8_t want = m.scales[0] == s ? m.codes[static_cast<size_t>(j)]
                                                      : float_to_fp8_e4m3(static_cast<float>(v / s));
                ASSERT_EQ(c[part * L.F * L.H + j], want) << "expert " << e << " part " << part << " element " << j;
            }
        }
    }
}

// Scales stored as BF16 (some compressed-tensors checkpoints) are read exactly into the fp32 scale tensors.
TEST(Fp8Load, Bf16ScalesAreReadExactly) {
    Fp8Layer L;
    L.E = 2;
    L.H = 160;
    L.F = 128;
    L.build(6);
    for (auto& kv : L.ckpt)
        if (kv.first.find("weight_scale_inv") != std::string::npos)
            kv.second = floats_entry(DType::kBF16, kv.second.shape, as_floats(kv.second));
    SafetensorsFile f(image(L.ckpt), "bf16_scales.st");
    LoadedWeights lw = load_moe_weights(f, WeightLoadOptions{});
    ASSERT_EQ(lw.quant_mode, QuantMode::kFP8Block);
    for (int64_t e = 0; e < L.E; ++e) {
        const std::vector<float> g = as_floats(L.ckpt.at("mlp.experts." + std::to_string(e) + ".gate_proj.weight_scale_inv"));
        const std::vector<float> u = as_floats(L.ckpt.at("mlp.experts." + std::to_string(e) + ".up_proj.weight_scale_inv"));
        const std::vector<float> d = as_floats(L.ckpt.at("mlp.experts." + std::to_string(e) + ".down_proj.weight_scale_inv"));
        ASSERT_EQ(g.size(), 2u);
        const float* s13 = lw.owned.w.w13_scale.ptr<float>() + e * 4;  // [B(2F) = 2, B(H) = 2]
        EXPECT_EQ(s13[0], g[0]);
        EXPECT_EQ(s13[1], g[1]);
        EXPECT_EQ(s13[2], u[0]);
        EXPECT_EQ(s13[3], u[1]);
        const float* s2 = lw.owned.w.w2_scale.ptr<float>() + e * 2;  // [B(H) = 2, B(F) = 1]
        EXPECT_EQ(s2[0], d[0]);
        EXPECT_EQ(s2[1], d[1]);
        EXPECT_GT(g[0], 0.0f);
    }
}

// ---- malformed FP8 checkpoints ----------------------------------------------------------------------------------

TEST(Fp8Load, BadInputsNameTheTensorAndWriteNothing) {
    Fp8Layer blk;
    blk.E = 2;
    blk.H = 64;
    blk.F = 128;
    blk.S = 128;
    blk.build(11);
    Fp8Layer ten;
    ten.mode = QuantMode::kFP8Tensor;
    ten.input_scales = true;
    ten.E = 2;
    ten.H = 64;
    ten.F = 32;
    ten.build(12);
    const std::string g0 = "mlp.experts.0.gate_proj.", u1 = "mlp.experts.1.up_proj.", d1 = "mlp.experts.1.down_proj.";
    struct Case {
        const char* what;
        Ckpt ckpt;
        std::vector<const char*> parts;
        const char* activation = "swiglu";
    };
    std::vector<Case> cases;
    auto add = [&](const char* what, Ckpt c, std::vector<const char*> parts) { cases.push_back({what, std::move(c), parts}); };
    {
        Ckpt c = blk.ckpt;
        c[g0 + "weight_scale_inv"] = floats_entry(DType::kF32, {2, 1}, {1.0f, 1.0f});
        add("block scale shape", c, {"'mlp.experts.0.gate_proj.weight_scale_inv'", "shape [2, 1]", "expected [1, 1]"});
    }
    {
        Ckpt c = blk.ckpt;
        c.erase(u1 + "weight_scale_inv");
        add("missing scale", c, {"'mlp.experts.1.up_proj.weight'", "has no scale", "weight_scale_inv"});
    }
    {
        Ckpt c = blk.ckpt;
        c[d1 + "weight_scale_inv"] = floats_entry(DType::kF32, {1, 1}, {std::nanf("")});
        add("NaN scale", c, {"'mlp.experts.1.down_proj.weight_scale_inv'", "non-finite scale"});
    }
    {
        Ckpt c = ten.ckpt;
        c[d1 + "weight_scale"] = floats_entry(DType::kF32, {}, {INFINITY});
        add("Inf scale", c, {"'mlp.experts.1.down_proj.weight_scale'", "non-finite scale"});
    }
    {
        Ckpt c = blk.ckpt;
        c[g0 + "weight"].bytes[5 * 64 + 3] = 0x7f;
        add("NaN code 0x7f", c, {"'mlp.experts.0.gate_proj.weight'", "NaN code 0x7f", "row 5, column 3"});
    }
    {
        Ckpt c = blk.ckpt;
        c["mlp.shared_experts.down_proj.weight"].bytes[0] = 0xff;
        add("NaN code 0xff", c, {"'mlp.shared_experts.down_proj.weight'", "NaN code 0xff", "row 0, column 0"});
    }
    {
        Ckpt c = blk.ckpt;  // expert 1 in bf16: mixed fp8 / float experts
        for (const char* p : {"gate_proj.", "up_proj.", "down_proj."}) {
            const std::string b = std::string("mlp.experts.1.") + p;
            const std::vector<int64_t> shape = c[b + "weight"].shape;
            c[b + "weight"] = floats_entry(DType::kBF16, shape, std::vector<float>(static_cast<size_t>(shape[0] * shape[1]), 0.01f));
            c.erase(b + "weight_scale_inv");
        }
        add("mixed experts", c, {"'mlp.experts.1.up_proj.weight'", "BF16", "F8_E4M3"});
    }
    {
        Ckpt c = blk.ckpt;  // a scale beside the (bf16) router weight
        c["mlp.gate.weight_scale_inv"] = floats_entry(DType::kF32, {1, 1}, {1.0f});
        add("scale beside the router", c, {"'mlp.gate.weight_scale_inv'"});
    }
    {
        Ckpt c;  // a float checkpoint with one scale tensor
        for (const auto& kv : blk.ckpt) {
            if (kv.first.find("scale") != std::string::npos) continue;
            c[kv.first] = kv.second.dtype == DType::kF8E4M3
                              ? floats_entry(DType::kBF16, kv.second.shape, std::vector<float>(kv.second.bytes.size(), 0.01f))
                              : kv.second;
        }
        c[d1 + "weight_scale_inv"] = floats_entry(DType::kF32, {1, 1}, {1.0f});
        add("scale beside a float weight", c,
            {"'mlp.experts.1.down_proj.weight_scale_inv'", "is a quantisation scale", "BF16, not F8_E4M3"});
    }
    {
        Ckpt c = blk.ckpt;
        c[g0 + "weight_scale"] = floats_entry(DType::kF32, {}, {1.0f});
        add("both scale kinds", c, {"'mlp.experts.0.gate_proj.weight'", "both", "weight_scale_inv", "weight_scale'"});
    }
    {
        Ckpt c = blk.ckpt;
        c[g0 + "input_scale"] = floats_entry(DType::kF32, {}, {1.0f});
        add("input scale with block scales", c, {"'mlp.experts.0.gate_proj.input_scale'", "per-tensor"});
    }
    {
        Ckpt c = ten.ckpt;  // expert 1's down projection block-scaled in a per-tensor layer
        c.erase(d1 + "weight_scale");
        c.erase(d1 + "input_scale");
        c[d1 + "weight_scale_inv"] = floats_entry(DType::kF32, {1, 1}, {0.001f});
        add("two schemes", c, {"'mlp.experts.1.down_proj.weight'", "block-scaled", "per-tensor", "one FP8 scheme"});
    }
    {
        Ckpt c = ten.ckpt;
        c[u1 + "weight_scale"] = floats_entry(DType::kF32, {32, 1}, std::vector<float>(32, 0.001f));
        add("per-channel scale", c, {"'mlp.experts.1.up_proj.weight_scale'", "shape [32, 1]", "per-channel"});
    }
    {
        Ckpt c = ten.ckpt;
        c.erase(d1 + "input_scale");
        add("input scales on some experts", c, {"'mlp.experts.0.down_proj.weight'", "has an input_scale",
                                                "'mlp.experts.1.down_proj.weight' has none"});
    }
    {
        Ckpt c = ten.ckpt;
        c[d1 + "input_scale"] = floats_entry(DType::kF32, {}, {0.0f});
        add("zero input scale", c, {"'mlp.experts.1.down_proj.input_scale'", "must be > 0"});
    }
    {
        Ckpt c = ten.ckpt;
        c[d1 + "weight_scale"] = floats_entry(DType::kF32, {}, {-0.5f});
        add("negative weight scale", c, {"'mlp.experts.1.down_proj.weight_scale'", "must be >= 0"});
    }
    {
        Ckpt c = ten.ckpt;
        c[d1 + "weight_scale"] = Entry{DType::kI32, {}, std::vector<uint8_t>(4, 0)};
        add("integer scale", c, {"'mlp.experts.1.down_proj.weight_scale'", "dtype I32"});
    }
    {
        Fp8Layer odd;  // block scales, gated, F = 136: gate's last row block would share a fused block with up's first
        odd.E = 2;
        odd.H = 64;
        odd.F = 136;
        odd.build(13);
        add("block gated F % 128", odd.ckpt, {"'mlp.experts.0.gate_proj.weight'", "136 rows", "multiple of 128"});
    }
    {
        Ckpt c;  // fp8 shared expert beside bf16 routed experts
        for (const auto& kv : blk.ckpt) {
            const bool routed = kv.first.rfind("mlp.experts.", 0) == 0;
            if (routed && kv.first.find("scale") != std::string::npos) continue;
            c[kv.first] = routed && kv.second.dtype == DType::kF8E4M3
                              ? floats_entry(DType::kBF16, kv.second.shape, std::vector<float>(kv.second.bytes.size(), 0.01f))
                              : kv.second;
        }
        add("fp8 shared, float routed", c, {"'mlp.shared_experts.down_proj.weight'", "F8_E4M3", "routed experts are BF16"});
    }
    for (size_t i = 0; i < cases.size(); ++i) {
        const Case& k = cases[i];
        SCOPED_TRACE(k.what);
        SafetensorsFile f(image(k.ckpt), "bad.st");
        expect_error([&] { load_moe_weights(f, WeightLoadOptions{}); }, std::initializer_list<const char*>{"bad.st"});
        try {
            load_moe_weights(f, WeightLoadOptions{});
        } catch (const Error& e) {
            const std::string msg = e.what();
            for (const char* p : k.parts) EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nmissing: " << p;
        }
        // The CLI: an error, no output file.
        const std::string w = temp_path("bad_" + std::to_string(i) + ".safetensors"), y = temp_path("bad_y.npy");
        write_ckpt(w, k.ckpt);
        std::remove(y.c_str());
        const std::vector<float> x(static_cast<size_t>(3 * 64), 0.5f);
        EXPECT_THROW(cli_forward(w, x, 64, 1, "bad"), Error);
        EXPECT_FALSE(file_exists(temp_path("bad_y.npy")));
        std::remove(w.c_str());
    }
}

// ---- quantize ---------------------------------------------------------------------------------------------------

namespace {

// A bf16 DeepSeek-style checkpoint with a shared expert, an attention tensor of an odd dtype, metadata, and one
// expert whose first 128x128 gate block is all zero. Values ~ N(0, 0.02)-like (uniform with that spread).
Ckpt float_checkpoint(int64_t E, int64_t H, int64_t F, int64_t S, uint64_t seed) {
    Ckpt c;
    c["model.layers.1.mlp.gate.weight"] =
        floats_entry(DType::kBF16, {E, H}, test::random_uniform(static_cast<size_t>(E * H), seed, -0.05f, 0.05f));
    c["model.layers.1.mlp.gate.e_score_correction_bias"] =
        floats_entry(DType::kF32, {E}, test::random_uniform(static_cast<size_t>(E), seed + 1, -0.1f, 0.1f));
    auto mlp = [&](const std::string& b, int64_t w, uint64_t s) {
        c[b + "gate_proj.weight"] = floats_entry(DType::kBF16, {w, H}, test::random_uniform(static_cast<size_t>(w * H), s, -0.035f, 0.035f));
        c[b + "up_proj.weight"] = floats_entry(DType::kBF16, {w, H}, test::random_uniform(static_cast<size_t>(w * H), s + 1, -0.035f, 0.035f));
        c[b + "down_proj.weight"] = floats_entry(DType::kBF16, {H, w}, test::random_uniform(static_cast<size_t>(H * w), s + 2, -0.035f, 0.035f));
    };
    for (int64_t e = 0; e < E; ++e) mlp("model.layers.1.mlp.experts." + std::to_string(e) + ".", F, seed + 10 + 3 * e);
    if (S > 0) mlp("model.layers.1.mlp.shared_experts.", S, seed + 5);
    Entry& g0 = c["model.layers.1.mlp.experts.0.gate_proj.weight"];
    for (int64_t r = 0; r < 128 && r < F; ++r) std::memset(&g0.bytes[static_cast<size_t>(2 * r * H)], 0, 2 * std::min<int64_t>(128, H));
    const double d64[3] = {1.0, 2.0, 3.0};
    c["model.layers.1.self_attn.rotary.inv_freq"] = Entry{DType::kF64, {3}, std::vector<uint8_t>(
        reinterpret_cast<const uint8_t*>(d64), reinterpret_cast<const uint8_t*>(d64) + sizeof(d64))};
    return c;
}

// Writes c; the F64 entry through dtype_str (the tests' Entry map only knows DTypes).
void write_float_checkpoint(const std::string& path, const Ckpt& c) {
    std::vector<SafetensorToWrite> ts;
    for (const auto& kv : c) {
        SafetensorToWrite t{kv.first, kv.second.dtype, kv.second.shape, kv.second.bytes.data()};
        if (kv.second.dtype == DType::kF64) t.dtype_str = "F64";
        ts.push_back(t);
    }
    write_safetensors(path, ts, {{"format", "pt"}, {"origin", "test"}});
}

}  // namespace

class Fp8Quantize : public testing::TestWithParam<QuantMode> {};

TEST_P(Fp8Quantize, RoundTripLoadsAndForwardsWithinFp8Error) {
    const QuantMode mode = GetParam();
    const bool block = mode == QuantMode::kFP8Block;
    const int64_t E = 8, H = 200, F = 128, S = 128;
    const Ckpt c = float_checkpoint(E, H, F, S, 21);
    const std::string in = temp_path(std::string("q_in_") + to_string(mode) + ".safetensors");
    const std::string out = temp_path(std::string("q_out_") + to_string(mode) + ".safetensors");
    write_float_checkpoint(in, c);
    std::remove(out.c_str());
    QuantizeOptions qo;
    qo.mode = mode;
    QuantizeSummary sum;
    {
        SafetensorsFile fin(in);
        sum = quantize_checkpoint(fin, out, qo);
    }
    EXPECT_EQ(sum.matrices, 3 * E + 3);
    EXPECT_EQ(sum.copied, 3);  // router gate, bias, the F64 tensor

    SafetensorsFile fq(out);
    // Untouched tensors: same dtype string, shape and bytes.
    SafetensorsFile fin(in);
    for (const char* n : {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                          "model.layers.1.self_attn.rotary.inv_freq"}) {
        EXPECT_EQ(fq.raw_info(n).dtype_str, fin.raw_info(n).dtype_str) << n;
        EXPECT_EQ(fq.raw_info(n).shape, fin.raw_info(n).shape) << n;
        EXPECT_EQ(std::memcmp(fq.raw_data(n), fin.raw_data(n), fin.raw_info(n).end - fin.raw_info(n).begin), 0) << n;
    }
    EXPECT_EQ(fq.metadata().at("origin"), "test");
    const nlohmann::json qc = nlohmann::json::parse(fq.metadata().at("quantization_config"));
    EXPECT_EQ(qc.at("quant_method"), "fp8");
    EXPECT_EQ(qc.contains("weight_block_size"), block);
    // Every projection: F8_E4M3 + F32 scale; the scale is amax / 448 (block or tensor; gate and up share the tensor
    // scale); the decoded weight is within e4m3's rounding of the original; the zero block is scale 0, codes 0.
    auto check_matrix = [&](const std::string& base, const std::string& partner) {
        const SafetensorInfo& wi = fq.info(base + "weight");
        ASSERT_EQ(wi.dtype, DType::kF8E4M3) << base;
        const std::vector<float> orig = as_floats(c.at(base + "weight"));
        const int64_t rows = wi.shape[0], cols = wi.shape[1];
        const uint8_t* q = fq.data(base + "weight");
        const SafetensorInfo& si = fq.info(base + (block ? "weight_scale_inv" : "weight_scale"));
        ASSERT_EQ(si.dtype, DType::kF32);
        const float* s = reinterpret_cast<const float*>(fq.data(si.name));
        if (block) {
            ASSERT_EQ(si.shape, (std::vector<int64_t>{fp8_blocks(rows), fp8_blocks(cols)})) << base;
        } else {
            ASSERT_TRUE(si.shape.empty()) << base;
        }
        float tensor_amax = 0;
        for (float v : orig) tensor_amax = std::max(tensor_amax, std::fabs(v));
        if (!partner.empty())
            for (float v : as_floats(c.at(partner + "weight"))) tensor_amax = std::max(tensor_amax, std::fabs(v));
        for (int64_t bi = 0; bi < (block ? fp8_blocks(rows) : 1); ++bi) {
            for (int64_t bj = 0; bj < (block ? fp8_blocks(cols) : 1); ++bj) {
                const int64_t r0 = block ? 128 * bi : 0, r1 = block ? std::min(rows, r0 + 128) : rows;
                const int64_t c0 = block ? 128 * bj : 0, c1 = block ? std::min(cols, c0 + 128) : cols;
                float a = 0;
                for (int64_t r = r0; r < r1; ++r)
                    for (int64_t cc = c0; cc < c1; ++cc) a = std::max(a, std::fabs(orig[static_cast<size_t>(r * cols + cc)]));
                const float sc = block ? s[bi * fp8_blocks(cols) + bj] : s[0];
                ASSERT_EQ(sc, (block ? a : tensor_amax) / 448.0f) << base << " block " << bi << "," << bj;
                for (int64_t r = r0; r < r1; ++r) {
                    for (int64_t cc = c0; cc < c1; ++cc) {
                        const size_t j = static_cast<size_t>(r * cols + cc);
                        const double dq = static_cast<double>(fp8_e4m3_to_float(q[j])) * sc;
                        // e4m3: 3 mantissa bits (half-ulp 2^-4 relative) above 2^-6, steps of 2^-9 below.
                        const double tol = std::fabs(orig[j]) * 0.0625 + sc * std::ldexp(1.0, -10) + 1e-30;
                        ASSERT_LE(std::fabs(dq - orig[j]), tol) << base << " element " << j;
                        if (sc == 0.0f) ASSERT_EQ(q[j], 0) << base << " element " << j;
                    }
                }
            }
        }
    };
    for (int64_t e = 0; e < E; ++e) {
        const std::string b = "model.layers.1.mlp.experts." + std::to_string(e) + ".";
        check_matrix(b + "gate_proj.", b + "up_proj.");
        check_matrix(b + "up_proj.", b + "gate_proj.");
        check_matrix(b + "down_proj.", "");
    }
    const std::string sb = "model.layers.1.mlp.shared_experts.";
    check_matrix(sb + "gate_proj.", sb + "up_proj.");
    check_matrix(sb + "up_proj.", sb + "gate_proj.");
    check_matrix(sb + "down_proj.", "");
    if (block) EXPECT_EQ(reinterpret_cast<const float*>(fq.data("model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"))[0], 0.0f);

    // The quantised checkpoint loads as FP8 with no requantisation and forwards close to the float one.
    WeightLoadOptions lo;
    lo.prefix = "model.layers.1.";
    LoadedWeights lw = load_moe_weights(fq, lo);
    EXPECT_EQ(lw.quant_mode, mode);
    for (const std::string& n : lw.notes) EXPECT_EQ(n.find("requantised"), std::string::npos) << n;
    const std::vector<float> x = test::random_uniform(static_cast<size_t>(16 * H), 5, -1.0f, 1.0f);
    auto fwd = [&](const std::string& w, const std::string& tag) {
        const std::string xp = temp_path(tag + "_x.npy"), yp = temp_path(tag + "_y.npy");
        write_npy(xp, DType::kF32, {16, H}, x.data());
        cli::ForwardOptions o;
        o.weights = w;
        o.prefix = "model.layers.1.";
        o.input = xp;
        o.output = yp;
        o.quiet = true;
        o.layer.top_k = 2;
        o.layer.score = "sigmoid";
        o.layer.renormalize = true;
        cli::run_forward(o);
        NpyArray y = read_npy(yp);
        std::vector<float> v(static_cast<size_t>(y.numel()));
        std::memcpy(v.data(), y.data.data(), 4 * v.size());
        std::remove(xp.c_str());
        std::remove(yp.c_str());
        return v;
    };
    const std::vector<float> y_float = fwd(in, "qf"), y_fp8 = fwd(out, "q8");
    const double err = rel_l2(y_fp8, y_float);
    EXPECT_GT(err, 0.0);
    EXPECT_LT(err, 0.08) << "FP8 vs float forward, relative L2";
    std::remove(in.c_str());
    std::remove(out.c_str());
}

INSTANTIATE_TEST_SUITE_P(Formats, Fp8Quantize, testing::Values(QuantMode::kFP8Block, QuantMode::kFP8Tensor),
                         [](const testing::TestParamInfo<QuantMode>& i) {
                             return i.param == QuantMode::kFP8Block ? std::string("Block") : std::string("Tensor");
                         });

TEST(Fp8QuantizeErrors, BadInputsWriteNothing) {
    const std::string in = temp_path("qe_in.safetensors"), out = temp_path("qe_out.safetensors");
    QuantizeOptions qo;
    auto run_bad = [&](const Ckpt& c, const QuantizeOptions& o, std::initializer_list<const char*> parts) {
        write_float_checkpoint(in, c);
        std::remove(out.c_str());
        SafetensorsFile f(in);
        expect_error([&] { quantize_checkpoint(f, out, o); }, parts);
        EXPECT_FALSE(file_exists(out));
    };
    const Ckpt good = float_checkpoint(2, 64, 32, 0, 31);
    {
        Ckpt c = good;
        c["model.layers.1.mlp.experts.1.up_proj.weight"].bytes[2 * (3 * 64 + 7)] = 0x80;
        c["model.layers.1.mlp.experts.1.up_proj.weight"].bytes[2 * (3 * 64 + 7) + 1] = 0x7f;  // bf16 +inf
        run_bad(c, qo, {"'model.layers.1.mlp.experts.1.up_proj.weight'", "non-finite", "row 3, column 7"});
    }
    {
        Ckpt c = good;
        Entry& e = c["model.layers.1.mlp.experts.0.down_proj.weight"];
        e = Entry{DType::kF8E4M3, e.shape, std::vector<uint8_t>(e.bytes.size() / 2, 0x38)};
        run_bad(c, qo, {"'model.layers.1.mlp.experts.0.down_proj.weight'", "already F8_E4M3"});
    }
    {
        Ckpt c = good;
        c["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"] = floats_entry(DType::kF32, {1, 1}, {1.0f});
        run_bad(c, qo, {"'model.layers.1.mlp.experts.0.down_proj.weight_scale_inv'", "already exists"});
    }
    {
        QuantizeOptions o = qo;
        o.prefix = "model.layers.7.";
        run_bad(good, o, {"no expert projection under prefix 'model.layers.7.'"});
    }
    std::remove(in.c_str());
}

// Block-scaled quantize of a gated layer with F % 128 != 0 writes a valid checkpoint (each matrix keeps its own
// blocks), but the loader cannot fuse it exactly and says so.
TEST(Fp8QuantizeErrors, BlockGatedFfnNotMultipleOf128IsRefusedByTheLoader) {
    const std::string in = temp_path("q136_in.safetensors"), out = temp_path("q136_out.safetensors");
    write_float_checkpoint(in, float_checkpoint(2, 64, 136, 0, 41));
    {
        SafetensorsFile f(in);
        QuantizeOptions qo;
        quantize_checkpoint(f, out, qo);
    }
    SafetensorsFile fq(out);
    WeightLoadOptions lo;
    lo.prefix = "model.layers.1.";
    expect_error([&] { load_moe_weights(fq, lo); }, {"136 rows", "multiple of 128"});
    lo.activation = Activation::kGELU;  // ungated: up_proj alone; gate_proj present is an error as for float weights
    expect_error([&] { load_moe_weights(fq, lo); }, {"gate_proj.weight", "ungated"});
    std::remove(in.c_str());
    std::remove(out.c_str());
}
