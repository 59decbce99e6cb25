// tools/switchyard/forward.h: `switchyard forward`'s options and its steps, callable in-process (the CLI fuzz target
// tests/fuzz/ parses and runs them without a subprocess).
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "cli_common.h"

namespace switchyard {
namespace cli {

struct ForwardOptions {
    LayerFlags layer;
    std::string weights, prefix, input, output, stats, device = "cpu";
    bool quiet = false;
    bool allow_non_finite = false;  // let NaN/Inf in the input and the weights through (and into the output)
};

// Registers forward's options on `sub` (no callback).
void add_forward_options(CLI::App* sub, ForwardOptions& o);

// Before anything is read or written: the inputs are regular files (a directory or a FIFO is refused without
// being opened); the outputs are file names in existing folders, and no two of --input, --weights, --output,
// --stats name the same file (compared by identity: st_dev/st_ino, or the resolved folder and name when the file
// does not exist yet, so ./y.npy and y.npy are one file).
void check_forward_paths(const ForwardOptions& o);

// The whole command; returns the exit code, throws switchyard::Error (exit 2 in main) on bad input.
int run_forward(const ForwardOptions& o);

}  // namespace cli
}  // namespace switchyard
