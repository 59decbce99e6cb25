// tools/switchyard/quantize.cpp: `switchyard quantize`: a float checkpoint's expert projections to FP8
// (io/quantize.h has the tensors it takes and the recipe; docs/fp8.md "Quantize").
//
//   switchyard quantize --weights in.safetensors --out out.safetensors --format fp8-block|fp8-tensor [--prefix P]
//
// Refused before anything is read: --weights not a regular file, --out in a missing folder or naming a folder,
// --out the same file as --weights (however spelled). The output appears atomically once every tensor is done.
#include <cstdio>
#include <memory>
#include <string>

#include "cli_common.h"
#include "commands.h"
#include "io/file_util.h"
#include "io/quantize.h"
#include "io/safetensors.h"
#include "switchyard/error.h"

namespace switchyard {
namespace cli {

namespace {

struct QuantizeCliOptions {
    std::string weights, out, prefix, format;
    bool quiet = false;
};

int run_quantize(const QuantizeCliOptions& o) {
    const QuantMode mode = parse_quant_mode(o.format);
    SWITCHYARD_CHECK(mode != QuantMode::kNone, "--format must be fp8-block or fp8-tensor, got '", io::printable(o.format),
                     "'");
    io::require_regular_file(o.weights, "--weights");
    io::check_output_path(o.out, "--out");
    SWITCHYARD_CHECK(!io::same_file(o.weights, o.out), "--out '", io::printable(o.out), "' is the same file as --weights '",
                     io::printable(o.weights), "'; the input is never overwritten");
    io::SafetensorsFile in(o.weights);
    io::QuantizeOptions qo;
    qo.prefix = o.prefix;
    qo.mode = mode;
    const io::QuantizeSummary s = io::quantize_checkpoint(in, o.out, qo);
    if (!o.quiet)
        std::fprintf(stderr,
                     "switchyard: quantize %s: %lld expert matrices (%.1f MiB -> %.1f MiB with scales), %lld tensors "
                     "copied, %s -> %s\n",
                     to_string(mode), static_cast<long long>(s.matrices), s.bytes_before / 1048576.0,
                     s.bytes_after / 1048576.0, static_cast<long long>(s.copied), o.weights.c_str(), o.out.c_str());
    return kExitOk;
}

}  // namespace

void add_quantize(CLI::App& app, int* exit_code) {
    auto o = std::make_shared<QuantizeCliOptions>();
    CLI::App* sub = app.add_subcommand(
        "quantize", "write a checkpoint whose expert projections are FP8 (F8_E4M3 + F32 scales); the router and "
                    "every other tensor are copied unchanged");
    sub->add_option("--weights", o->weights, "input safetensors file (F32/BF16/F16 experts, Hugging Face names)")
        ->required();
    sub->add_option("--out", o->out, "output safetensors file (never the input)")->required();
    sub->add_option("--format", o->format,
                    "fp8-block (128x128 blocks, weight_scale_inv; DeepSeek-V3 / Qwen3-FP8) | fp8-tensor (one "
                    "weight_scale per matrix; llm-compressor)")
        ->required();
    sub->add_option("--prefix", o->prefix, "only expert projections whose names start with this (default: all)");
    sub->add_flag("--quiet", o->quiet, "no summary line on stderr");
    sub->callback([o, exit_code] { *exit_code = run_quantize(*o); });
}

}  // namespace cli
}  // namespace switchyard
