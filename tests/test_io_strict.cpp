// tests/test_io_strict.cpp: issue 16 at the level of the I/O library: strict safetensors and .npy parsing, bounded
// printable messages, regular-file inputs (a FIFO never blocks), path identity, all-or-nothing output sets, and
// the weight loader's checks before allocation. (The CLI-level cases are in tests/python/test_cli_numpy.py.)
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <limits>
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

std::string tmp(const std::string& name) {
    return testing::TempDir() + "sy_strict_" + std::to_string(static_cast<long>(::getpid())) + "_" + name;
}

std::vector<uint8_t> bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

std::vector<uint8_t> st_raw(const std::string& header, size_t data) {
    std::string img(8, '\0');
    for (int i = 0; i < 8; ++i) img[i] = static_cast<char>(static_cast<uint64_t>(header.size()) >> (8 * i));
    return bytes(img + header + std::string(data, '\0'));
}

// The message of the Error f throws ("" and a test failure when none).
template <typename Fn>
std::string error_of(Fn f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    ADD_FAILURE() << "no switchyard::Error";
    return "";
}

void expect_printable_and_short(const std::string& m, size_t max_len) {
    EXPECT_LE(m.size(), max_len) << m.substr(0, 300);
    for (unsigned char c : m) ASSERT_TRUE(c >= 0x20 && c < 0x7f) << "byte " << int(c) << " in: " << m.substr(0, 300);
}

std::vector<uint8_t> npy_img(const std::string& dict_and_tail, int major = 1, int minor = 0, size_t data = 24) {
    std::string h = dict_and_tail;
    h.append((64 - (10 + h.size() + 1) % 64) % 64, ' ');
    h += '\n';
    std::string img = std::string("\x93NUMPY", 6) + static_cast<char>(major) + static_cast<char>(minor) +
                      static_cast<char>(h.size() & 0xff) + static_cast<char>(h.size() >> 8) + h + std::string(data, '\0');
    if (major != 1) img.insert(10, 2, '\0');  // 4-byte header length
    return bytes(img);
}

const char* kDict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";

}  // namespace

TEST(SafetensorsStrict, DeepNestingIsRefusedWithoutRecursion) {
    const int n = 200000;  // issue 16 item 1: a segfault in an -O2 build
    const std::string deep = std::string(n, '[') + std::string(n, ']');
    std::string m = error_of([&] {
        SafetensorsFile(st_raw("{\"t\":{\"dtype\":\"F32\",\"shape\":" + deep + ",\"data_offsets\":[0,0]}}", 0), "d.st");
    });
    EXPECT_NE(m.find("nests deeper"), std::string::npos) << m;
    m = error_of([&] {
        SafetensorsFile(st_raw("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[" + deep + ",0]}}", 0), "d.st");
    });
    EXPECT_NE(m.find("nests deeper"), std::string::npos) << m;
}

TEST(SafetensorsStrict, SpecViolationsAreRefused) {
    const std::string a = "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}";
    EXPECT_NO_THROW(SafetensorsFile(st_raw("{\"a\":" + a + "}   ", 4), "ok.st"));  // space padding is allowed
    struct Case {
        std::string header;
        size_t data;
        const char* want;
    } cases[] = {
        {"{\"a\":" + a + ",\"a\":" + a + "}", 4, "twice"},
        {"{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "twice"},
        {"{\"a\":" + a + "}" + std::string("\0\0\0", 3), 4, "NUL"},
        {" {\"a\":" + a + "}", 4, "start with"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "gap of 4 bytes"},
        {"{\"a\":" + a + "}", 12, "8 bytes after the last tensor"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", 4, "keys other than"},
        {"{\"a\":{\"dtype\":\"Q7\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "does not define"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "bad shape entry"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[9223372036854775808],\"data_offsets\":[0,4]}}", 4, "bad shape entry"},
    };
    for (const Case& c : cases) {
        const std::string m = error_of([&] { SafetensorsFile(st_raw(c.header, c.data), "s.st"); });
        EXPECT_NE(m.find(c.want), std::string::npos) << "header " << c.header.substr(0, 80) << "\nmessage " << m;
    }
    // Unsupported but defined dtypes still open; F64 of the wrong size does not.
    EXPECT_NO_THROW(SafetensorsFile(st_raw("{\"d\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,16]}}", 16), "f.st"));
    EXPECT_NE(error_of([&] {
                  SafetensorsFile(st_raw("{\"d\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8), "f.st");
              }).find("needs 16"),
              std::string::npos);
}

TEST(SafetensorsStrict, MessagesAreBoundedAndPrintable) {
    const std::string name = "\x1b[31m" + std::string(1 << 20, 'n') + "\x07";
    nlohmann::json h = {{name, {{"dtype", std::string(5000, '\x01')}, {"shape", {1}}, {"data_offsets", {0, 4}}}}};
    const std::string m = error_of([&] { SafetensorsFile(st_raw(h.dump(), 4), "b.st"); });
    expect_printable_and_short(m.substr(0, m.find(" [")), 600);
    // A thousand dimensions are not all printed.
    std::string dims = "1";
    for (int i = 0; i < 999; ++i) dims += ",1";
    const std::string m2 = error_of([&] {
        SafetensorsFile(st_raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[" + dims + "],\"data_offsets\":[0,8]}}", 8), "m.st");
    });
    EXPECT_LT(m2.size(), 600u) << m2.substr(0, 300);
    EXPECT_NE(m2.find("1000 dimensions"), std::string::npos) << m2;
}

TEST(NpyStrict, SpecViolationsAreRefused) {
    EXPECT_NO_THROW(parse_npy(npy_img(kDict).data(), npy_img(kDict).size(), "ok.npy"));
    EXPECT_NO_THROW(parse_npy(npy_img(kDict, 2).data(), npy_img(kDict, 2).size(), "ok2.npy"));
    EXPECT_NO_THROW(parse_npy(npy_img(kDict, 3).data(), npy_img(kDict, 3).size(), "ok3.npy"));
    struct Case {
        std::vector<uint8_t> img;
        const char* want;
    } cases[] = {
        {npy_img(std::string(kDict) + " junk"), "after the dict"},
        {npy_img(std::string(kDict) + std::string(1, '\0')), "byte 0x0"},
        {npy_img(kDict, 1, 1), "version 1.1"},
        {npy_img(kDict, 4, 0), "version 4.0"},
        {npy_img("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"), "twice"},
        {npy_img("{'descr': '<f4', 'fortran_order': False, 'shape': (6), }"), "not a tuple"},
        {npy_img("{'descr': '<f4', 'fortran_order': False, 'shape': (02, 3), }"), "leading zero"},
        {npy_img("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\xc3\xa9"), "byte 0xc3"},
    };
    for (const Case& c : cases) {
        const std::string m = error_of([&] { parse_npy(c.img.data(), c.img.size(), "n.npy"); });
        EXPECT_NE(m.find(c.want), std::string::npos) << m;
    }
    // An unknown key of a megabyte: the message stays short and printable.
    const std::string big = "{'" + std::string(1 << 16, '\x01') + "': 1}";
    const auto img = npy_img(big, 2);
    const std::string m = error_of([&] { parse_npy(img.data(), img.size(), "k.npy"); });
    expect_printable_and_short(m.substr(0, m.find(" [")), 600);
}

TEST(FileUtil, InputsMustBeRegularFilesAndAFifoNeverBlocks) {
    const std::string dir = tmp("dir"), fifo = tmp("fifo");
    ::mkdir(dir.c_str(), 0700);
    ::mkfifo(fifo.c_str(), 0600);
    EXPECT_NE(error_of([&] { read_file_bytes(dir); }).find("a directory"), std::string::npos);
    EXPECT_NE(error_of([&] { read_file_bytes(fifo); }).find("a FIFO"), std::string::npos);  // returns at once
    EXPECT_NE(error_of([&] { SafetensorsFile s(fifo); }).find("a FIFO"), std::string::npos);
    EXPECT_NE(error_of([&] { read_npy(dir); }).find("a directory"), std::string::npos);
    ::rmdir(dir.c_str());
    std::remove(fifo.c_str());
}

TEST(FileUtil, SameFileComparesIdentityNotSpelling) {
    const std::string a = tmp("same_a");
    std::ofstream(a) << "x";
    const std::string dir = a.substr(0, a.rfind('/')), base = a.substr(a.rfind('/') + 1);
    EXPECT_TRUE(same_file(a, dir + "/./" + base));
    const std::string link = tmp("same_link");
    ASSERT_EQ(::symlink(a.c_str(), link.c_str()), 0);
    EXPECT_TRUE(same_file(a, link));
    EXPECT_FALSE(same_file(a, tmp("same_b")));
    EXPECT_TRUE(same_file(tmp("not_yet"), dir + "/./" + tmp("not_yet").substr(tmp("not_yet").rfind('/') + 1)));
    EXPECT_FALSE(same_file(tmp("not_yet"), tmp("not_yet2")));
    std::remove(link.c_str());
    std::remove(a.c_str());
}

TEST(FileUtil, OutputSetCommitsAllOrNothing) {
    const std::string y = tmp("set_y"), s = tmp("set_s"), d = tmp("set_dir");
    ::mkdir(d.c_str(), 0700);
    auto content = [](const std::string& p) {
        std::ifstream is(p, std::ios::binary);
        return is.good() ? std::string(std::istreambuf_iterator<char>(is), {}) : std::string("<absent>");
    };
    auto writer = [](const char* text) { return [text](std::ostream& os) { os << text; }; };
    // A directory as the second output: refused before anything is renamed.
    {
        AtomicFileSet set;
        set.add(y, writer("new y"));
        EXPECT_NE(error_of([&] { set.add(d, writer("stats")); }).find("a directory"), std::string::npos);
    }
    EXPECT_EQ(content(y), "<absent>");
    // A failed second rename undoes the first: an existing y keeps its old bytes, a new s never appears.
    std::ofstream(y) << "old y";
    {
        AtomicFileSet set;
        set.add(y, writer("new y"));
        set.add(s, writer("new s"));
        set.fail_before_rename_for_testing(1);
        EXPECT_NE(error_of([&] { set.commit(); }).find("no output was written"), std::string::npos);
    }
    EXPECT_EQ(content(y), "old y");
    EXPECT_EQ(content(s), "<absent>");
    // ... and when y did not exist, it is removed again.
    std::remove(y.c_str());
    {
        AtomicFileSet set;
        set.add(y, writer("new y"));
        set.add(s, writer("new s"));
        set.fail_before_rename_for_testing(1);
        EXPECT_THROW(set.commit(), Error);
    }
    EXPECT_EQ(content(y), "<absent>");
    // The same output twice, spelled differently.
    {
        AtomicFileSet set;
        set.add(y, writer("a"));
        const std::string alias = y.substr(0, y.rfind('/')) + "/./" + y.substr(y.rfind('/') + 1);
        EXPECT_NE(error_of([&] { set.add(alias, writer("b")); }).find("given twice"), std::string::npos);
    }
    // Success: both appear, no temporaries or backups remain.
    std::ofstream(y) << "old y";
    {
        AtomicFileSet set;
        set.add(y, writer("new y"));
        set.add(s, writer("new s"));
        set.commit();
    }
    EXPECT_EQ(content(y), "new y");
    EXPECT_EQ(content(s), "new s");
    std::remove(y.c_str());
    std::remove(s.c_str());
    ::rmdir(d.c_str());
}

TEST(WeightsStrict, SizesAreCheckedBeforeAllocation) {
    // Issue 16 item 3, at a size a test can afford: E above the limit is refused from the router's shape alone,
    // and a router plus expert 0 (the rest missing) fails on the missing tensor, not after allocating E*2F*H.
    std::vector<uint8_t> g(600 * 2), w1(1 << 16);
    std::vector<SafetensorToWrite> ts = {{"block_sparse_moe.gate.weight", DType::kBF16, {600, 1}, g.data()},
                                         {"block_sparse_moe.experts.0.w1.weight", DType::kBF16, {8, 1}, w1.data()}};
    SafetensorsFile f(encode_safetensors(ts), "e.st");
    EXPECT_NE(error_of([&] { load_moe_weights(f, {}); }).find("exceed the limit of 512"), std::string::npos);
    ts = {{"block_sparse_moe.gate.weight", DType::kBF16, {512, 1}, g.data()},
          {"block_sparse_moe.experts.0.w1.weight", DType::kBF16, {1 << 15, 1}, w1.data()}};
    SafetensorsFile f2(encode_safetensors(ts), "f.st");
    EXPECT_NE(error_of([&] { load_moe_weights(f2, {}); }).find("experts.0.w3.weight' not found"), std::string::npos);
}

TEST(WeightsStrict, NonFiniteWeightsAreRefusedUnlessAllowed) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> gate = {0.5f, 0.25f}, w1 = {1.0f, nan}, w3 = {1.0f, 2.0f}, w2 = {1.0f, 2.0f};
    std::vector<SafetensorToWrite> ts = {{"block_sparse_moe.gate.weight", DType::kF32, {1, 2}, gate.data()},
                                         {"block_sparse_moe.experts.0.w1.weight", DType::kF32, {1, 2}, w1.data()},
                                         {"block_sparse_moe.experts.0.w3.weight", DType::kF32, {1, 2}, w3.data()},
                                         {"block_sparse_moe.experts.0.w2.weight", DType::kF32, {2, 1}, w2.data()}};
    SafetensorsFile f(encode_safetensors(ts), "n.st");
    const std::string m = error_of([&] { load_moe_weights(f, {}); });
    EXPECT_NE(m.find("experts.0.w1.weight' has a non-finite value"), std::string::npos) << m;
    EXPECT_NE(m.find("flat index 1"), std::string::npos) << m;
    WeightLoadOptions o;
    o.allow_non_finite = true;
    EXPECT_NO_THROW(load_moe_weights(f, o));
}
