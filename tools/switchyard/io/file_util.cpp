// tools/switchyard/io/file_util.cpp: see file_util.h.
#include "io/file_util.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "switchyard/error.h"

namespace switchyard {
namespace io {

namespace {

std::string temp_name(const std::string& path) {
    static std::atomic<int> counter{0};
    return path + ".tmp." + std::to_string(static_cast<long>(::getpid())) + "." + std::to_string(counter++);
}

// Writes `writer`'s bytes to a fresh temporary next to `path`; returns the temporary's name.
std::string write_temp(const std::string& path, const StreamWriter& writer) {
    SWITCHYARD_CHECK(!path.empty(), "output path is empty");
    std::string tmp = temp_name(path);
    try {
        std::ofstream os(tmp, std::ios::binary | std::ios::trunc);
        SWITCHYARD_CHECK(os.good(), "cannot open '", path, "' for writing: ", std::strerror(errno));
        writer(os);
        os.flush();
        SWITCHYARD_CHECK(os.good(), "write to '", path, "' failed: ", std::strerror(errno));
        os.close();
        SWITCHYARD_CHECK(!os.fail(), "closing '", path, "' failed: ", std::strerror(errno));
    } catch (...) {
        std::remove(tmp.c_str());
        throw;
    }
    return tmp;
}

void rename_or_throw(const std::string& tmp, const std::string& path) {
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        int err = errno;
        std::remove(tmp.c_str());
        SWITCHYARD_FAIL("cannot create '", path, "': ", std::strerror(err));
    }
}

}  // namespace

std::vector<uint8_t> read_file_bytes(const std::string& path) {
    std::ifstream is(path, std::ios::binary | std::ios::ate);
    SWITCHYARD_CHECK(is.good(), "cannot open '", path, "': ", std::strerror(errno));
    std::streamoff size = is.tellg();
    SWITCHYARD_CHECK(size >= 0, "cannot read '", path, "' (not a regular file?)");
    std::vector<uint8_t> bytes(static_cast<size_t>(size));
    is.seekg(0);
    if (size > 0) is.read(reinterpret_cast<char*>(bytes.data()), size);
    SWITCHYARD_CHECK(is.good() || (size == 0), "read of '", path, "' failed after ", is.gcount(), " of ", size,
                     " bytes");
    return bytes;
}

void write_file_atomic(const std::string& path, const StreamWriter& writer) {
    std::string tmp = write_temp(path, writer);
    rename_or_throw(tmp, path);
}

AtomicFileSet::~AtomicFileSet() {
    for (auto& p : pending_) std::remove(p.first.c_str());
}

void AtomicFileSet::add(const std::string& path, const StreamWriter& writer) {
    for (auto& p : pending_) SWITCHYARD_CHECK(p.second != path, "output '", path, "' given twice");
    pending_.emplace_back(write_temp(path, writer), path);
}

void AtomicFileSet::commit() {
    for (auto& p : pending_) rename_or_throw(p.first, p.second);
    pending_.clear();
}

}  // namespace io
}  // namespace switchyard
