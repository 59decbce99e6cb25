// tests/test_fuzz_corpus.cpp: every file of the fuzz seed corpus (tests/fuzz/corpus/<target>/, made by
// tests/fuzz/make_corpus.py; the crashers of issue 16 among them as regression inputs) through the same entry
// points the libFuzzer targets call (tests/fuzz/fuzz_entries.h), so the plain build checks them too. An entry
// aborts the process on a broken property; a sanitizer build reports memory errors and undefined behaviour.
#include <dirent.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "fuzz/fuzz_entries.h"

namespace {

std::vector<std::string> corpus_files(const std::string& target) {
    const std::string dir = std::string(SWITCHYARD_FUZZ_CORPUS_DIR) + "/" + target;
    std::vector<std::string> out;
    if (DIR* d = ::opendir(dir.c_str())) {
        while (dirent* e = ::readdir(d))
            if (e->d_name[0] != '.') out.push_back(dir + "/" + e->d_name);
        ::closedir(d);
    }
    std::sort(out.begin(), out.end());
    return out;
}

std::vector<uint8_t> bytes_of(const std::string& path) {
    std::ifstream is(path, std::ios::binary);
    return std::vector<uint8_t>(std::istreambuf_iterator<char>(is), {});
}

void replay(const std::string& target, int (*entry)(const uint8_t*, size_t), size_t min_files) {
    const std::vector<std::string> files = corpus_files(target);
    ASSERT_GE(files.size(), min_files) << "corpus of " << target << " missing (run tests/fuzz/make_corpus.py)";
    for (const std::string& f : files) {
        SCOPED_TRACE(f);
        const std::vector<uint8_t> b = bytes_of(f);
        EXPECT_EQ(entry(b.data(), b.size()), 0);
    }
}

}  // namespace

TEST(FuzzCorpus, Safetensors) { replay("safetensors", switchyard::fuzz::fuzz_safetensors, 10); }
TEST(FuzzCorpus, Npy) { replay("npy", switchyard::fuzz::fuzz_npy, 10); }
TEST(FuzzCorpus, Weights) { replay("weights", switchyard::fuzz::fuzz_weights, 8); }
TEST(FuzzCorpus, Cli) { replay("cli", switchyard::fuzz::fuzz_cli, 10); }
