// tests/fuzz/fuzz_entries.cpp: see fuzz_entries.h.
#include "fuzz_entries.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "forward.h"
#include "io/file_util.h"
#include "io/npy.h"
#include "io/safetensors.h"
#include "io/weights.h"
#include "switchyard/error.h"

namespace switchyard {
namespace fuzz {

namespace {

// A broken property: report and abort (libFuzzer saves the input as a crash).
[[noreturn]] void property_failed(const char* what, const std::string& detail) {
    std::fprintf(stderr, "fuzz property failed: %s: %s\n", what, detail.substr(0, 2000).c_str());
    std::abort();
}

void check_message(const std::exception& e) {
    const size_t n = std::strlen(e.what());
    if (n > kMaxErrorBytes) property_failed("error message longer than kMaxErrorBytes", e.what());
}

}  // namespace

int fuzz_safetensors(const uint8_t* data, size_t size) {
    try {
        io::SafetensorsFile f(std::vector<uint8_t>(data, data + size), "fuzz.safetensors");
        std::vector<io::SafetensorToWrite> again;
        volatile uint8_t sink = 0;
        for (const std::string& name : f.names()) {
            const io::SafetensorInfo* info = nullptr;
            try {
                info = &f.info(name);
            } catch (const Error& e) {  // an unsupported dtype is refused by name
                check_message(e);
                continue;
            }
            const uint8_t* p = f.data(name);
            for (uint64_t i = 0; i < info->end - info->begin; ++i) sink = sink ^ p[i];  // every byte readable (ASan)
            again.push_back({name, info->dtype, info->shape, p});
        }
        // All tensors supported: the re-encoded file parses to the same tensors.
        if (again.size() == f.names().size() && !again.empty()) {
            io::SafetensorsFile g(io::encode_safetensors(again, f.metadata()), "again.safetensors");
            if (g.names() != f.names()) property_failed("safetensors round trip", "names differ");
            for (const auto& t : again) {
                const auto& gi = g.info(t.name);
                if (gi.shape != t.shape || gi.dtype != t.dtype ||
                    std::memcmp(g.data(t.name), t.data, gi.end - gi.begin) != 0)
                    property_failed("safetensors round trip", io::printable(t.name));
            }
        }
    } catch (const Error& e) {
        check_message(e);
    }
    return 0;
}

int fuzz_npy(const uint8_t* data, size_t size) {
    try {
        io::NpyArray a = io::parse_npy(data, size, "fuzz.npy");
        std::vector<uint8_t> bytes = io::encode_npy(a.dtype, a.shape, a.data.data());
        io::NpyArray b = io::parse_npy(bytes.data(), bytes.size(), "again.npy");
        if (b.dtype != a.dtype || b.shape != a.shape || b.data != a.data)
            property_failed("npy round trip", io::shape_to_string(a.shape));
    } catch (const Error& e) {
        check_message(e);
    }
    return 0;
}

int fuzz_weights(const uint8_t* data, size_t size) {
    if (size < 1) return 0;
    const uint8_t flags = data[0];
    io::WeightLoadOptions o;
    const Activation acts[] = {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGELU, Activation::kReLU};
    o.activation = acts[flags & 3];
    o.use_score_bias = (flags >> 2) & 1;
    o.num_shared_experts = static_cast<int64_t>((flags >> 3) & 3) - 1;
    o.prefix = (flags >> 5) & 1 ? "model.layers.0." : "";
    o.allow_non_finite = (flags >> 6) & 1;
    try {
        io::SafetensorsFile f(std::vector<uint8_t>(data + 1, data + size), "fuzz.safetensors");
        io::LoadedWeights w = io::load_moe_weights(f, o);
        size_t held = 0;
        for (const auto& b : w.owned.buffers) held += b.size();
        // Buffers: copies of tensors in the file (the bias converted to fp32: at most 2x its bytes).
        if (held > 2 * size + 64) property_failed("weights larger than the file", std::to_string(held));
        if (w.owned.w.w13.shape[0] != w.num_experts || w.owned.w.w2.shape[2] != w.ffn_size ||
            w.owned.w.gate.shape[1] != w.hidden_size || w.num_experts > MoEConfig::kMaxExperts)
            property_failed("weights sizes", std::to_string(w.num_experts));
    } catch (const Error& e) {
        check_message(e);
    }
    return 0;
}

namespace {

// The scratch folder of the CLI target and its fixture files, made once per process.
struct CliFixture {
    std::string dir;
    std::map<std::string, std::string> paths;        // placeholder -> path
    std::map<std::string, std::vector<uint8_t>> inputs;  // path -> bytes it must keep

    CliFixture() {
        const char* t = std::getenv("TMPDIR");
        std::string tmpl = std::string(t && *t ? t : "/tmp") + "/switchyard_fuzz_cli_XXXXXX";
        std::vector<char> buf(tmpl.begin(), tmpl.end());
        buf.push_back('\0');
        if (::mkdtemp(buf.data()) == nullptr) property_failed("fixture", "mkdtemp failed");
        dir = buf.data();
        const int64_t H = 8, F = 4, E = 4, T = 5, S = 4;
        auto vals = [](int64_t n, uint64_t seed) { return io::random_values(DType::kF32, n, -1.0, 1.0, seed); };
        std::vector<std::vector<uint8_t>> keep;
        auto add = [&](std::vector<io::SafetensorToWrite>& ts, const std::string& name, std::vector<int64_t> shape,
                       uint64_t seed) {
            int64_t n = 1;
            for (int64_t d : shape) n *= d;
            keep.push_back(vals(n, seed));
            ts.push_back({name, DType::kF32, shape, keep.back().data()});
        };
        std::vector<io::SafetensorToWrite> mix, ds;
        add(mix, "block_sparse_moe.gate.weight", {E, H}, 1);
        for (int64_t e = 0; e < E; ++e) {
            const std::string p = "block_sparse_moe.experts." + std::to_string(e) + ".";
            add(mix, p + "w1.weight", {F, H}, 10 + e);
            add(mix, p + "w3.weight", {F, H}, 20 + e);
            add(mix, p + "w2.weight", {H, F}, 30 + e);
        }
        add(ds, "mlp.gate.weight", {E, H}, 2);
        add(ds, "mlp.gate.e_score_correction_bias", {E}, 3);
        for (int64_t e = 0; e < E; ++e) {
            const std::string p = "mlp.experts." + std::to_string(e) + ".";
            add(ds, p + "gate_proj.weight", {F, H}, 40 + e);
            add(ds, p + "up_proj.weight", {F, H}, 50 + e);
            add(ds, p + "down_proj.weight", {H, F}, 60 + e);
        }
        add(ds, "mlp.shared_experts.gate_proj.weight", {S, H}, 70);
        add(ds, "mlp.shared_experts.up_proj.weight", {S, H}, 71);
        add(ds, "mlp.shared_experts.down_proj.weight", {H, S}, 72);
        paths["@W"] = dir + "/w.safetensors";
        paths["@Q"] = dir + "/q.safetensors";
        paths["@X"] = dir + "/x.npy";
        paths["@B"] = dir + "/xb.npy";
        paths["@Y"] = dir + "/y.npy";
        paths["@S"] = dir + "/stats.json";
        paths["@P"] = dir + "/./y.npy";
        paths["@D"] = dir + "/folder";
        paths["@F"] = dir + "/fifo";
        io::write_safetensors(paths["@W"], mix);
        io::write_safetensors(paths["@Q"], ds);
        std::vector<uint8_t> x = vals(T * H, 5);
        io::write_npy(paths["@X"], DType::kF32, {T, H}, x.data());
        std::vector<uint8_t> xb = io::random_values(DType::kBF16, T * H, -1.0, 1.0, 6);
        io::write_npy(paths["@B"], DType::kBF16, {T, H}, xb.data());
        ::mkdir(paths["@D"].c_str(), 0700);
        ::mkfifo(paths["@F"].c_str(), 0600);
        for (const char* k : {"@W", "@Q", "@X", "@B"}) inputs[paths[k]] = io::read_file_bytes(paths[k]);
    }
    ~CliFixture() {
        for (const char* k : {"@W", "@Q", "@X", "@B", "@Y", "@S", "@F"}) std::remove(paths[k].c_str());
        ::rmdir(paths["@D"].c_str());
        ::rmdir(dir.c_str());
    }
    bool allowed(const std::string& p) const {
        if (p.empty()) return true;
        for (const auto& kv : paths)
            if (kv.second == p) return true;
        return false;
    }
    std::string substitute(const std::string& arg) const {
        std::string out;
        for (size_t i = 0; i < arg.size(); ++i) {
            if (arg[i] == '@' && i + 1 < arg.size()) {
                auto it = paths.find(arg.substr(i, 2));
                if (it != paths.end()) {
                    out += it->second;
                    ++i;
                    continue;
                }
            }
            out += arg[i];
        }
        return out;
    }
    // Outputs and leftovers of the previous run.
    void clean() const {
        std::remove(paths.at("@Y").c_str());
        std::remove(paths.at("@S").c_str());
    }
};

CliFixture& fixture() {
    static CliFixture f;
    return f;
}

bool has_temporaries(const std::string& dir) {
    std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir(dir.c_str()), ::closedir);
    if (!d) return false;
    while (dirent* e = ::readdir(d.get())) {
        const std::string n = e->d_name;
        if (n.find(".tmp.") != std::string::npos || n.find(".bak.") != std::string::npos) return true;
    }
    return false;
}

}  // namespace

int fuzz_cli(const uint8_t* data, size_t size) {
    if (size > 4096) return 0;
    CliFixture& fx = fixture();
    std::vector<std::string> args;
    std::string cur;
    for (size_t i = 0; i < size; ++i) {
        if (data[i] == 0) {
            args.push_back(fx.substitute(cur));
            cur.clear();
        } else {
            cur.push_back(static_cast<char>(data[i]));
        }
    }
    if (!cur.empty()) args.push_back(fx.substitute(cur));
    if (args.size() > 64) return 0;

    CLI::App app{"fuzz"};
    cli::ForwardOptions o;
    cli::add_forward_options(&app, o);
    try {
        std::vector<std::string> rev(args.rbegin(), args.rend());  // CLI11 parses a reversed vector
        app.parse(rev);
    } catch (const CLI::Error&) {
        return 0;  // bad flags: CLI11's own error (exit 2 in main)
    }
    if (!fx.allowed(o.weights) || !fx.allowed(o.input) || !fx.allowed(o.output) || !fx.allowed(o.stats)) return 0;
    for (const std::string* out : {&o.output, &o.stats})  // an input of another run is not this run's input
        if (fx.inputs.count(*out) && *out != o.weights && *out != o.input) return 0;
    if (o.device != "cpu") return 0;  // a CUDA run is not what this target tests
    o.quiet = true;
    fx.clean();
    bool failed = false;
    const bool verbose = std::getenv("SWITCHYARD_FUZZ_VERBOSE") != nullptr;  // one line per run, for corpus work
    try {
        cli::run_forward(o);
        if (verbose) std::fprintf(stderr, "fuzz_cli: forward ok\n");
    } catch (const Error& e) {
        failed = true;
        if (verbose) std::fprintf(stderr, "fuzz_cli: %s\n", cli::one_line_message(e).c_str());
        check_message(e);
        const std::string line = cli::one_line_message(e);
        if (line.size() > cli::kMaxMessageBytes + 64) property_failed("error line not bounded", line);
        for (unsigned char c : line)
            if (c < 0x20 || c == 0x7f) property_failed("error line not printable", line);
    }
    for (const auto& kv : fx.inputs)
        if (io::read_file_bytes(kv.first) != kv.second) property_failed("an input file changed", kv.first);
    if (failed) {
        struct stat st;
        if (::stat(fx.paths.at("@Y").c_str(), &st) == 0 || ::stat(fx.paths.at("@S").c_str(), &st) == 0)
            property_failed("a failed run left an output", o.output + " " + o.stats);
    }
    if (has_temporaries(fx.dir)) property_failed("a temporary file was left behind", fx.dir);
    fx.clean();
    return 0;
}

}  // namespace fuzz
}  // namespace switchyard
