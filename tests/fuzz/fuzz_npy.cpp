// tests/fuzz/fuzz_npy.cpp: libFuzzer target; the entry point and its checks are in fuzz_entries.h.
#include "fuzz_entries.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    return switchyard::fuzz::fuzz_npy(data, size);
}
