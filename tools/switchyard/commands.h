// tools/switchyard/commands.h: the subcommands of the `switchyard` CLI. Each add_* registers its options on
// `app` and a callback that stores the command's exit code in *exit_code; errors propagate as exceptions
// (switchyard::Error, std::exception) to main(), which prints one line and exits with code 2.
#pragma once

#include <CLI/CLI.hpp>

namespace switchyard {
namespace cli {

void add_forward(CLI::App& app, int* exit_code);
void add_check(CLI::App& app, int* exit_code);
void add_bench(CLI::App& app, int* exit_code);
void add_profile(CLI::App& app, int* exit_code);
void add_balance(CLI::App& app, int* exit_code);
void add_quantize(CLI::App& app, int* exit_code);

}  // namespace cli
}  // namespace switchyard
