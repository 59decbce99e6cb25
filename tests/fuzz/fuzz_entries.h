// tests/fuzz/fuzz_entries.h: one entry point per parser of the CLI, shared by the libFuzzer targets
// (tests/fuzz/fuzz_*.cpp, built with SWITCHYARD_FUZZ=ON) and the corpus replay test (tests/test_fuzz_corpus.cpp,
// every build), so the plain build runs every committed corpus file through exactly the code the fuzzers test.
//
// Each entry returns 0. Expected failures (switchyard::Error, CLI11 parse errors) are caught; anything else
// (another exception type, std::bad_alloc from a size nobody checked, a sanitizer report, a broken property
// below) ends the process, which is what libFuzzer records as a crash.
// Properties checked beyond "no crash":
//   safetensors  every tensor's bytes are readable; a supported file re-encodes and parses to the same tensors.
//   npy          a parsed array re-encodes and parses to the same dtype, shape and bytes.
//   weights      a loaded layer's buffers hold no more bytes than the file; the sizes agree with the tensors.
//   cli          a failed run leaves no output file and no temporary, and never changes an input.
//   all          error messages are at most kMaxErrorBytes long.
#pragma once

#include <cstddef>
#include <cstdint>

namespace switchyard {
namespace fuzz {

constexpr size_t kMaxErrorBytes = 4096;

// A safetensors file image.
int fuzz_safetensors(const uint8_t* data, size_t size);
// A .npy file image.
int fuzz_npy(const uint8_t* data, size_t size);
// Byte 0: loader options (bits 0-1 activation, bit 2 use_score_bias, bits 3-4 num_shared_experts - 1,
// bit 5 prefix "model.layers.0.", bit 6 allow_non_finite); the rest: a safetensors file image.
int fuzz_weights(const uint8_t* data, size_t size);
// `switchyard forward` arguments separated by NUL bytes (without the program name). Paths are placeholders
// (@W Mixtral weights, @Q DeepSeek-style weights, @X fp32 input, @B bf16 input, @Y output, @S stats, @P the
// output spelled dir/./y.npy, @D a directory, @F a FIFO) replaced by files in a scratch folder; a run whose
// paths are anything else is skipped, so the fuzzer never writes outside that folder.
int fuzz_cli(const uint8_t* data, size_t size);

}  // namespace fuzz
}  // namespace switchyard
