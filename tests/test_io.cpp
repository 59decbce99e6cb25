// tests/test_io.cpp: .npy and safetensors round trips (bit-exact, every dtype), rejection of malformed files
// with the right message, Hugging Face name detection (Mixtral and Qwen/DeepSeek schemes) and seeded random
// weights. Inputs are random bit patterns from a fixed seed (printed with SCOPED_TRACE).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/file_util.h"
#include "io/npy.h"
#include "io/safetensors.h"
#include "io/weights.h"
#include "switchyard/error.h"

using namespace switchyard;
using namespace switchyard::io;

namespace {

const DType kAllDtypes[] = {DType::kF32, DType::kBF16, DType::kF16, DType::kI32, DType::kI64};

std::vector<uint8_t> random_bytes(size_t n, uint64_t seed) {
    SplitMix64 rng(seed);
    std::vector<uint8_t> out(n);
    for (auto& b : out) b = static_cast<uint8_t>(rng.next() >> 56);
    return out;
}

// Unique per process: several build folders may run this suite at the same time.
std::string temp_path(const std::string& name) {
    return testing::TempDir() + "switchyard_test_io_" + std::to_string(static_cast<long>(::getpid())) + "_" + name;
}

bool file_exists(const std::string& p) { return std::ifstream(p).good(); }

void write_raw(const std::string& path, const std::vector<uint8_t>& bytes) {
    std::ofstream os(path, std::ios::binary);
    os.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// Runs f, expects a switchyard::Error whose message contains every one of `parts`.
template <typename Fn>
void expect_error(Fn f, std::initializer_list<const char*> parts) {
    try {
        f();
        ADD_FAILURE() << "expected switchyard::Error containing '" << *parts.begin() << "'";
    } catch (const Error& e) {
        std::string msg = e.what();
        for (const char* p : parts)
            EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nmissing: " << p;
    }
}

void expect_same_bytes(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
        if (got[i] != want[i]) {
            FAIL() << "first differing byte " << i << ": got " << int(got[i]) << " expected " << int(want[i]);
        }
    }
}

}  // namespace

// ---- .npy ------------------------------------------------------------------------------------------

TEST(Npy, RoundTripEveryDtypeAndShapeBitExact) {
    const std::vector<std::vector<int64_t>> shapes = {{}, {0}, {1}, {7}, {3, 5}, {2, 3, 4}, {1, 19, 3, 2}};
    uint64_t seed = 11;
    for (DType t : kAllDtypes) {
        for (const auto& shape : shapes) {
            for (bool v2 : {false, true}) {
                ++seed;
                SCOPED_TRACE(std::string(to_string(t)) + " shape " + shape_to_string(shape) + (v2 ? " v2" : " v1") +
                             " seed " + std::to_string(seed));
                int64_t n = 1;
                for (int64_t d : shape) n *= d;
                std::vector<uint8_t> data = random_bytes(static_cast<size_t>(n) * dtype_size(t), seed);
                std::string path = temp_path("rt.npy");
                write_npy(path, t, shape, data.data(), v2);
                NpyArray a = read_npy(path);
                EXPECT_EQ(a.dtype, t);
                EXPECT_EQ(a.shape, shape);
                expect_same_bytes(a.data, data);
                // Data starts at a multiple of 64 bytes and the version byte is what was asked.
                std::vector<uint8_t> raw = read_file_bytes(path);
                EXPECT_EQ(raw[6], v2 ? 2 : 1);
                EXPECT_EQ((raw.size() - data.size()) % 64, 0u);
                std::remove(path.c_str());
            }
        }
    }
}

// A header exactly as NumPy writes it (np.save of np.arange(6, dtype='<f4').reshape(2, 3)).
TEST(Npy, ReadsNumpyWrittenHeader) {
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
    header.append(128 - 10 - header.size() - 1, ' ');  // NumPy pads the whole prefix to 64-byte multiples
    header += '\n';
    std::string img = std::string("\x93NUMPY\x01\x00", 8) + static_cast<char>(header.size()) + '\0' + header;
    for (int i = 0; i < 6; ++i) {
        float v = static_cast<float>(i);
        img.append(reinterpret_cast<const char*>(&v), 4);
    }
    const std::vector<uint8_t> bytes(img.begin(), img.end());
    NpyArray a = parse_npy(bytes.data(), bytes.size(), "x.npy");
    ASSERT_EQ(a.shape, (std::vector<int64_t>{2, 3}));
    for (int i = 0; i < 6; ++i) EXPECT_EQ(a.as<float>()[i], static_cast<float>(i)) << "element " << i;
}

namespace {
std::vector<uint8_t> npy_with_header(const std::string& dict, size_t data_bytes) {
    std::string header = dict;
    header.append((64 - (10 + header.size() + 1) % 64) % 64, ' ');
    header += '\n';
    std::string img = std::string("\x93NUMPY\x01\x00", 8) + static_cast<char>(header.size() & 0xff) +
                      static_cast<char>(header.size() >> 8) + header + std::string(data_bytes, '\x3f');
    std::vector<uint8_t> bytes(img.begin(), img.end());
    return bytes;
}
}  // namespace

TEST(Npy, AcceptsBf16AsVoidAndNativeOrder) {
    auto b = npy_with_header("{'descr': '|V2', 'fortran_order': False, 'shape': (4,), }", 8);
    NpyArray a = parse_npy(b.data(), b.size(), "v.npy");
    EXPECT_EQ(a.dtype, DType::kBF16);
    b = npy_with_header("{'descr': '=f4', 'fortran_order': False, 'shape': (2,), }", 8);
    EXPECT_EQ(parse_npy(b.data(), b.size(), "n.npy").dtype, DType::kF32);
}

TEST(Npy, RejectsMalformedFilesNamingFileAndProblem) {
    auto ok = npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }", 48);
    // Truncated data.
    expect_error([&] { parse_npy(ok.data(), ok.size() - 1, "a.npy"); }, {"a.npy", "truncated", "needs 48"});
    // Truncated inside the header.
    expect_error([&] { parse_npy(ok.data(), 20, "b.npy"); }, {"b.npy", "truncated"});
    // Extra bytes.
    auto extra = npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }", 52);
    expect_error([&] { parse_npy(extra.data(), extra.size(), "c.npy"); }, {"c.npy", "unexpected bytes"});
    // Bad magic.
    auto bad = ok;
    bad[1] = 'X';
    expect_error([&] { parse_npy(bad.data(), bad.size(), "d.npy"); }, {"d.npy", "magic"});
    // Fortran order.
    auto fo = npy_with_header("{'descr': '<f4', 'fortran_order': True, 'shape': (3, 4), }", 48);
    expect_error([&] { parse_npy(fo.data(), fo.size(), "e.npy"); }, {"e.npy", "Fortran"});
    // Big-endian and unsupported dtypes.
    auto be = npy_with_header("{'descr': '>f4', 'fortran_order': False, 'shape': (3, 4), }", 48);
    expect_error([&] { parse_npy(be.data(), be.size(), "f.npy"); }, {"f.npy", "big-endian"});
    auto f8 = npy_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }", 24);
    expect_error([&] { parse_npy(f8.data(), f8.size(), "g.npy"); }, {"g.npy", "unsupported .npy dtype '<f8'"});
    // Garbage header.
    auto gh = npy_with_header("{'descr': '<f4', 'shape': [3]}", 12);
    expect_error([&] { parse_npy(gh.data(), gh.size(), "h.npy"); }, {"h.npy", "malformed"});
    // Missing file.
    expect_error([&] { read_npy(temp_path("does_not_exist.npy")); }, {"does_not_exist.npy", "cannot open"});
}

TEST(Npy, FailedWriteLeavesNoFile) {
    std::string path = temp_path("nofile.npy");
    std::remove(path.c_str());
    expect_error(
        [&] {
            write_file_atomic(path, [](std::ostream& os) {
                os << "partial";
                SWITCHYARD_FAIL("simulated failure");
            });
        },
        {"simulated failure"});
    EXPECT_FALSE(file_exists(path));
    // And nothing is created in a folder that does not exist.
    expect_error([&] { write_npy(temp_path("no_such_dir/x.npy"), DType::kF32, {1}, "abcd"); }, {"no_such_dir"});
}

// ---- safetensors -----------------------------------------------------------------------------------

TEST(Safetensors, RoundTripEveryDtypeBitExact) {
    uint64_t seed = 101;
    std::vector<std::vector<uint8_t>> payloads;
    std::vector<SafetensorToWrite> ts;
    const std::vector<std::vector<int64_t>> shapes = {{3, 5}, {7}, {2, 1, 3}, {0, 4}, {1}};
    int i = 0;
    for (DType t : kAllDtypes) {
        const auto& shape = shapes[i++];
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        payloads.push_back(random_bytes(static_cast<size_t>(n) * dtype_size(t), seed + i));
        ts.push_back({std::string("t.") + to_string(t), t, shape, payloads.back().data()});
    }
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::string path = temp_path("rt.safetensors");
    write_safetensors(path, ts, {{"format", "pt"}});
    SafetensorsFile f(path);
    EXPECT_EQ(f.names().size(), ts.size());
    EXPECT_EQ(f.metadata().at("format"), "pt");
    for (size_t k = 0; k < ts.size(); ++k) {
        SCOPED_TRACE(ts[k].name);
        const SafetensorInfo& info = f.info(ts[k].name);
        EXPECT_EQ(info.dtype, ts[k].dtype);
        EXPECT_EQ(info.shape, ts[k].shape);
        std::vector<uint8_t> got(f.data(ts[k].name), f.data(ts[k].name) + (info.end - info.begin));
        expect_same_bytes(got, payloads[k]);
    }
    // The header length is a multiple of 8 (data aligned for every dtype).
    std::vector<uint8_t> raw = read_file_bytes(path);
    uint64_t n = 0;
    for (int b = 7; b >= 0; --b) n = (n << 8) | raw[b];
    EXPECT_EQ(n % 8, 0u);
    std::remove(path.c_str());
}

namespace {
std::vector<uint8_t> st_image(const nlohmann::json& header, size_t data_bytes) {
    std::string h = header.dump();
    std::string img(8, '\0');
    for (int i = 0; i < 8; ++i) img[i] = static_cast<char>(static_cast<uint64_t>(h.size()) >> (8 * i));
    img += h + std::string(data_bytes, '\x11');
    std::vector<uint8_t> out(img.begin(), img.end());
    return out;
}
nlohmann::json entry(const char* dt, std::vector<int64_t> shape, uint64_t b, uint64_t e) {
    return {{"dtype", dt}, {"shape", shape}, {"data_offsets", {b, e}}};
}
}  // namespace

TEST(Safetensors, RejectsMalformedFilesNamingTheProblem) {
    nlohmann::json h = {{"a", entry("F32", {2, 2}, 0, 16)}, {"b", entry("BF16", {4}, 16, 24)}};
    auto good = st_image(h, 24);
    EXPECT_NO_THROW(SafetensorsFile(good, "good.st"));
    // Truncated data: offsets past the end.
    auto trunc = good;
    trunc.resize(trunc.size() - 3);
    expect_error([&] { SafetensorsFile(trunc, "t.st"); }, {"t.st", "'b'", "past the end"});
    // Truncated header and empty file.
    auto th = good;
    th.resize(20);
    expect_error([&] { SafetensorsFile(th, "th.st"); }, {"th.st", "truncated"});
    expect_error([&] { SafetensorsFile(std::vector<uint8_t>(3), "e.st"); }, {"e.st", "truncated"});
    // Size not equal to shape x dtype.
    nlohmann::json hs = {{"a", entry("F32", {2, 3}, 0, 16)}};
    expect_error([&] { SafetensorsFile(st_image(hs, 16), "s.st"); }, {"s.st", "'a'", "needs 24"});
    // Overlap.
    nlohmann::json ho = {{"a", entry("F32", {4}, 0, 16)}, {"b", entry("F32", {2}, 8, 16)}};
    expect_error([&] { SafetensorsFile(st_image(ho, 16), "o.st"); }, {"o.st", "overlap"});
    // begin > end.
    nlohmann::json hb = {{"a", entry("F32", {0}, 8, 4)}};
    expect_error([&] { SafetensorsFile(st_image(hb, 16), "b.st"); }, {"b.st", "begin > end"});
    // Not JSON.
    std::vector<uint8_t> nj = {5, 0, 0, 0, 0, 0, 0, 0, '{', 'x', 'y', 'z', '!'};
    expect_error([&] { SafetensorsFile(nj, "j.st"); }, {"j.st", "not valid JSON"});
    // Unsupported dtype: the file opens, the tensor is refused by name.
    nlohmann::json hf = {{"d", entry("F64", {2}, 0, 16)}};
    SafetensorsFile f(st_image(hf, 16), "f.st");
    expect_error([&] { f.info("d"); }, {"f.st", "'d'", "unsupported dtype F64"});
    expect_error([&] { f.info("zzz"); }, {"f.st", "'zzz'", "not found"});
    // Missing file.
    expect_error([&] { SafetensorsFile(temp_path("missing.safetensors")); }, {"missing.safetensors", "cannot open"});
}

// ---- weight loading by Hugging Face names -----------------------------------------------------------

namespace {

// A checkpoint image built tensor by tensor; element values encode (tensor id, index) so every copy is checked.
struct CheckpointBuilder {
    std::vector<std::vector<uint8_t>> data;
    std::vector<SafetensorToWrite> ts;
    // Element i of tensor `id` holds 16 * id + i % 16: small integers, exact in bf16 for id < 16.
    void add(const std::string& name, DType t, std::vector<int64_t> shape, int id) {
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        std::vector<uint8_t> buf(static_cast<size_t>(n) * dtype_size(t));
        for (int64_t i = 0; i < n; ++i) {
            float v = static_cast<float>(16 * id + i % 16);
            if (t == DType::kF32)
                std::memcpy(&buf[4 * i], &v, 4);
            else if (t == DType::kBF16) {
                uint16_t h = float_to_bf16(v);
                std::memcpy(&buf[2 * i], &h, 2);
            } else if (t == DType::kF16) {
                uint16_t h = float_to_half(v);
                std::memcpy(&buf[2 * i], &h, 2);
            } else {
                int32_t k = static_cast<int32_t>(v);
                std::memcpy(&buf[4 * i], &k, 4);
            }
        }
        data.push_back(std::move(buf));
        ts.push_back({name, t, shape, data.back().data()});
    }
    std::vector<uint8_t> image() const { return encode_safetensors(ts); }
};

float elem(const TensorRef& t, int64_t i) {
    if (t.dtype == DType::kF32) return t.ptr<float>()[i];
    uint16_t h = t.ptr<uint16_t>()[i];
    return t.dtype == DType::kBF16 ? bf16_to_float(h) : half_to_float(h);
}

void build_mixtral(CheckpointBuilder& b, const std::string& p, int64_t E, int64_t H, int64_t F, DType t) {
    b.add(p + "block_sparse_moe.gate.weight", t, {E, H}, 1);
    for (int64_t e = 0; e < E; ++e) {
        std::string q = p + "block_sparse_moe.experts." + std::to_string(e);
        b.add(q + ".w1.weight", t, {F, H}, static_cast<int>(2 + 3 * e));  // gate
        b.add(q + ".w3.weight", t, {F, H}, static_cast<int>(3 + 3 * e));  // up
        b.add(q + ".w2.weight", t, {H, F}, static_cast<int>(4 + 3 * e));  // down
    }
}

void build_deepseek(CheckpointBuilder& b, const std::string& p, int64_t E, int64_t H, int64_t F, int64_t S,
                    const std::string& shared = "shared_experts") {
    b.add(p + "mlp.gate.weight", DType::kBF16, {E, H}, 1);
    b.add(p + "mlp.gate.e_score_correction_bias", DType::kF32, {E}, 0);
    for (int64_t e = 0; e < E; ++e) {
        std::string q = p + "mlp.experts." + std::to_string(e);
        b.add(q + ".gate_proj.weight", DType::kBF16, {F, H}, static_cast<int>(2 + 3 * e));
        b.add(q + ".up_proj.weight", DType::kBF16, {F, H}, static_cast<int>(3 + 3 * e));
        b.add(q + ".down_proj.weight", DType::kBF16, {H, F}, static_cast<int>(4 + 3 * e));
    }
    if (S > 0) {  // fp32: ids past 15 stay exact
        b.add(p + "mlp." + shared + ".gate_proj.weight", DType::kF32, {S, H}, 20);
        b.add(p + "mlp." + shared + ".up_proj.weight", DType::kF32, {S, H}, 21);
        b.add(p + "mlp." + shared + ".down_proj.weight", DType::kF32, {H, S}, 22);
    }
    // An unrelated tensor of another layer and an attention weight must not confuse detection.
    b.add("model.layers.2.mlp.gate.weight", DType::kBF16, {E, H}, 15);
    b.add(p + "self_attn.q_proj.weight", DType::kBF16, {H, H}, 14);
}

}  // namespace

TEST(Weights, MixtralNamesGiveGateThenUpRows) {
    const int64_t E = 3, H = 5, F = 4;
    for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
        SCOPED_TRACE(to_string(t));
        CheckpointBuilder b;
        build_mixtral(b, "model.layers.0.", E, H, F, t);
        SafetensorsFile f(b.image(), "mixtral.st");
        WeightLoadOptions o;
        o.prefix = "model.layers.0.";
        LoadedWeights lw = load_moe_weights(f, o);
        EXPECT_EQ(lw.scheme, NamingScheme::kMixtral);
        EXPECT_EQ(lw.num_experts, E);
        EXPECT_EQ(lw.hidden_size, H);
        EXPECT_EQ(lw.ffn_size, F);
        EXPECT_FALSE(lw.has_score_bias);
        const MoEWeights& w = lw.owned.w;
        ASSERT_EQ(w.w13.rank, 3);
        EXPECT_EQ(w.w13.shape[1], 2 * F);
        EXPECT_EQ(w.w13.dtype, t);
        for (int64_t e = 0; e < E; ++e)
            for (int64_t r = 0; r < 2 * F; ++r)
                for (int64_t h = 0; h < H; ++h) {
                    int64_t i = r % F * H + h;
                    float want = 16.f * (2 + 3 * e + (r < F ? 0 : 1)) + static_cast<float>(i % 16);
                    ASSERT_EQ(elem(w.w13, (e * 2 * F + r) * H + h), want) << "w13[" << e << "," << r << "," << h << "]";
                }
        for (int64_t e = 0; e < E; ++e)
            for (int64_t i = 0; i < H * F; ++i)
                ASSERT_EQ(elem(w.w2, e * H * F + i), 16.f * (4 + 3 * e) + static_cast<float>(i % 16))
                    << "w2 expert " << e << " element " << i;
        EXPECT_EQ(elem(w.gate, 7), 23.f);
        EXPECT_FALSE(w.shared_w13.defined());
    }
}

TEST(Weights, MixtralUngatedUsesW1) {
    CheckpointBuilder b;
    b.add("block_sparse_moe.gate.weight", DType::kF32, {2, 3}, 0);
    for (int e = 0; e < 2; ++e) {
        std::string q = "block_sparse_moe.experts." + std::to_string(e);
        b.add(q + ".w1.weight", DType::kF32, {4, 3}, 2 * e + 1);
        b.add(q + ".w2.weight", DType::kF32, {3, 4}, 2 * e + 2);
    }
    SafetensorsFile f(b.image(), "ungated.st");
    WeightLoadOptions o;
    o.activation = Activation::kGELU;
    LoadedWeights lw = load_moe_weights(f, o);
    EXPECT_EQ(lw.owned.w.w13.shape[1], 4);
    EXPECT_EQ(elem(lw.owned.w.w13, 12), 48.f);  // expert 1 (id 3), element 0
    // Gated activation without w3: the missing tensor is named.
    o.activation = Activation::kSwiGLU;
    expect_error([&] { load_moe_weights(f, o); }, {"block_sparse_moe.experts.0.w3.weight", "not found"});
}

TEST(Weights, DeepSeekNamesWithPrefixBiasAndSharedExperts) {
    const int64_t E = 4, H = 6, F = 3, S = 4;
    for (const char* shared : {"shared_experts", "shared_expert"}) {
        SCOPED_TRACE(shared);
        CheckpointBuilder b;
        build_deepseek(b, "model.layers.3.", E, H, F, S, shared);
        SafetensorsFile f(b.image(), "ds.st");
        WeightLoadOptions o;
        o.prefix = "model.layers.3.";
        LoadedWeights lw = load_moe_weights(f, o);
        EXPECT_EQ(lw.scheme, NamingScheme::kQwenDeepSeek);
        EXPECT_EQ(lw.num_experts, E);
        EXPECT_EQ(lw.hidden_size, H);
        EXPECT_EQ(lw.ffn_size, F);
        EXPECT_TRUE(lw.has_score_bias);
        EXPECT_EQ(lw.num_shared_experts, 1);
        EXPECT_EQ(lw.shared_ffn_size, S);
        const MoEWeights& w = lw.owned.w;
        EXPECT_EQ(w.gate.dtype, DType::kBF16);
        EXPECT_EQ(elem(w.gate, 1), 17.f);
        ASSERT_TRUE(w.score_bias.defined());
        EXPECT_EQ(w.score_bias.dtype, DType::kF32);
        EXPECT_EQ(w.score_bias.ptr<float>()[3], 3.f);
        EXPECT_EQ(elem(w.w13, (1 * 2 * F + F) * H + 1), 16.f * 6 + 1);  // expert 1's up_proj (id 6), element 1
        ASSERT_TRUE(w.shared_w13.defined());
        EXPECT_EQ(w.shared_w13.shape[0], 2 * S);
        EXPECT_EQ(elem(w.shared_w13, S * H + 1), 16.f * 21 + 1);  // up rows follow gate rows
        EXPECT_EQ(elem(w.shared_w2, 2), 16.f * 22 + 2);
        MoEConfig cfg;
        lw.apply_to(cfg);
        EXPECT_EQ(cfg.shared_width(), S);
        EXPECT_TRUE(cfg.use_score_bias);

        // Two shared experts of width 2; shared experts switched off; bias switched off.
        o.num_shared_experts = 2;
        LoadedWeights two = load_moe_weights(f, o);
        EXPECT_EQ(two.shared_ffn_size, 2);
        o.num_shared_experts = 3;
        expect_error([&] { load_moe_weights(f, o); }, {"not a multiple"});
        o.num_shared_experts = 0;
        o.use_score_bias = false;
        LoadedWeights none = load_moe_weights(f, o);
        EXPECT_FALSE(none.owned.w.shared_w13.defined());
        EXPECT_FALSE(none.has_score_bias);
        EXPECT_FALSE(none.notes.empty());
    }
}

TEST(Weights, ErrorsNameTheTensor) {
    const int64_t E = 2, H = 4, F = 3;
    // Wrong prefix: the message suggests the prefixes that exist.
    {
        CheckpointBuilder b;
        build_deepseek(b, "model.layers.3.", E, H, F, 0);
        SafetensorsFile f(b.image(), "p.st");
        WeightLoadOptions o;
        o.prefix = "model.layers.4.";
        expect_error([&] { load_moe_weights(f, o); }, {"no MoE router weight", "model.layers.3."});
    }
    // Missing expert tensor.
    {
        CheckpointBuilder b;
        b.add("mlp.gate.weight", DType::kF32, {E, H}, 0);
        b.add("mlp.experts.0.gate_proj.weight", DType::kF32, {F, H}, 0);
        b.add("mlp.experts.0.up_proj.weight", DType::kF32, {F, H}, 0);
        b.add("mlp.experts.0.down_proj.weight", DType::kF32, {H, F}, 0);
        b.add("mlp.experts.1.gate_proj.weight", DType::kF32, {F, H}, 0);
        b.add("mlp.experts.1.up_proj.weight", DType::kF32, {F, H}, 0);
        SafetensorsFile f(b.image(), "m.st");
        expect_error([&] { load_moe_weights(f, {}); }, {"m.st", "mlp.experts.1.down_proj.weight", "not found"});
    }
    // Inconsistent shape.
    {
        CheckpointBuilder b;
        build_mixtral(b, "", E, H, F, DType::kF32);
        b.ts[4].shape = {H, F};  // expert 1 w1 given as [H, F] (same bytes)
        SafetensorsFile f(b.image(), "s.st");
        expect_error([&] { load_moe_weights(f, {}); },
                     {"block_sparse_moe.experts.1.w1.weight", "[4, 3]", "expected [3, 4]"});
    }
    // Wrong dtype (integer weights) and mixed expert dtypes.
    {
        CheckpointBuilder b;
        b.add("block_sparse_moe.gate.weight", DType::kI32, {E, H}, 0);
        SafetensorsFile f(b.image(), "d.st");
        expect_error([&] { load_moe_weights(f, {}); }, {"block_sparse_moe.gate.weight", "I32"});
    }
    {
        CheckpointBuilder b;
        build_mixtral(b, "", E, H, F, DType::kF32);
        b.ts.clear();
        b.data.clear();
        build_mixtral(b, "", E, H, F, DType::kBF16);
        b.ts[5].dtype = DType::kF16;  // expert 1 w3 as fp16 (same size)
        SafetensorsFile f(b.image(), "x.st");
        expect_error([&] { load_moe_weights(f, {}); }, {"block_sparse_moe.experts.1.w3.weight", "F16"});
    }
    // More experts than the router says.
    {
        CheckpointBuilder b;
        build_mixtral(b, "", E, H, F, DType::kF32);
        b.add("block_sparse_moe.experts.2.w1.weight", DType::kF32, {F, H}, 0);
        SafetensorsFile f(b.image(), "e.st");
        expect_error([&] { load_moe_weights(f, {}); }, {"experts.2.w1.weight", "is not an expert of the 2-expert router"});
    }
    // Gate tensor present with an ungated activation.
    {
        CheckpointBuilder b;
        build_deepseek(b, "", E, H, F, 0);
        SafetensorsFile f(b.image(), "u.st");
        WeightLoadOptions o;
        o.activation = Activation::kReLU;
        expect_error([&] { load_moe_weights(f, o); }, {"mlp.experts.0.gate_proj.weight", "ungated"});
    }
}

TEST(Weights, RandomWeightsAreSeededScaledAndInDtype) {
    MoEConfig cfg;
    cfg.hidden_size = 64;
    cfg.ffn_size = 32;
    cfg.num_experts = 4;
    cfg.top_k = 2;
    cfg.num_shared_experts = 1;
    cfg.shared_ffn_size = 16;
    cfg.dtype = DType::kBF16;
    OwnedWeights a = random_weights(cfg, 42), b = random_weights(cfg, 42), c = random_weights(cfg, 43);
    EXPECT_EQ(a.w.gate.dtype, DType::kBF16);
    EXPECT_EQ(a.w.w13.shape[1], 64);
    EXPECT_EQ(a.w.shared_w13.shape[0], 32);
    EXPECT_EQ(std::memcmp(a.w.w13.data, b.w.w13.data, a.w.w13.nbytes()), 0);
    EXPECT_NE(std::memcmp(a.w.w13.data, c.w.w13.data, a.w.w13.nbytes()), 0);
    // Bounds 1/sqrt(in): w13 in (-1/8, 1/8), w2 in (-1/sqrt(32), 1/sqrt(32)); not all equal.
    double max13 = 0, max2 = 0;
    for (int64_t i = 0; i < a.w.w13.numel(); ++i) max13 = std::max(max13, std::fabs(double(elem(a.w.w13, i))));
    for (int64_t i = 0; i < a.w.w2.numel(); ++i) max2 = std::max(max2, std::fabs(double(elem(a.w.w2, i))));
    EXPECT_LE(max13, 0.125 * (1 + 1.0 / 128));
    EXPECT_GT(max13, 0.1);
    EXPECT_LE(max2, (1 / std::sqrt(32.0)) * (1 + 1.0 / 128));
    EXPECT_GT(max2, 0.8 / std::sqrt(32.0));
    ASSERT_TRUE(a.w.score_bias.defined());
    EXPECT_NE(a.w.score_bias.ptr<float>()[0], a.w.score_bias.ptr<float>()[1]);
}
