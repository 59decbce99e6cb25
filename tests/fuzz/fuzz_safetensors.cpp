// tests/fuzz/fuzz_safetensors.cpp: libFuzzer target; the entry point and its checks are in fuzz_entries.h.
#include "fuzz_entries.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    return switchyard::fuzz::fuzz_safetensors(data, size);
}
