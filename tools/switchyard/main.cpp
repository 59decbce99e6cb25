// tools/switchyard/main.cpp: the `switchyard` command line (CLI11).
//
//   switchyard forward  one layer from safetensors weights on an .npy input -> .npy output (+ stats JSON)
//   switchyard check    one random config through every available backend against the CPU reference
//   switchyard bench    timings (median of N after warm-up) beside the shape's floor
//   switchyard profile  report/PROFILE.md + report/profile.json from measurements of this run
//   switchyard balance  load-balancing simulation under a skewed router (JSON + plot)
//   switchyard quantize a float checkpoint's expert projections -> FP8 (F8_E4M3 + scales) safetensors
// Exit codes: 0 success, 1 a check failed, 2 bad input or any error (one line `switchyard: error: ...` on
// stderr; no partial output files).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <new>

#include "cli_common.h"
#include "commands.h"
#include "switchyard/error.h"
#include "switchyard/version.h"

int main(int argc, char** argv) {
    using namespace switchyard;
    int exit_code = cli::kExitOk;
    CLI::App app{"switchyard: Mixture-of-Experts layers on CPU and NVIDIA Hopper GPUs"};
    app.set_version_flag("--version", std::to_string(kVersionMajor) + "." + std::to_string(kVersionMinor) + "." +
                                          std::to_string(kVersionPatch));
    app.require_subcommand(1);
    try {
        cli::add_forward(app, &exit_code);
        cli::add_check(app, &exit_code);
        cli::add_bench(app, &exit_code);
        cli::add_profile(app, &exit_code);
        cli::add_balance(app, &exit_code);
        cli::add_quantize(app, &exit_code);
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        std::fprintf(stderr, "switchyard: error: %s (see --help)\n", cli::one_line_message(e).c_str());
        return cli::kExitBadInput;
    } catch (const std::bad_alloc&) {
        std::fprintf(stderr, "switchyard: error: out of host memory\n");
        return cli::kExitBadInput;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "switchyard: error: %s\n", cli::one_line_message(e).c_str());
        return cli::kExitBadInput;
    } catch (...) {
        std::fprintf(stderr, "switchyard: error: unknown exception\n");
        return cli::kExitBadInput;
    }
    return exit_code;
}
