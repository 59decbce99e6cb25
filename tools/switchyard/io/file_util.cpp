// tools/switchyard/io/file_util.cpp: see file_util.h.
#include "io/file_util.h"

#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>
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

std::string temp_name(const std::string& path, const char* kind) {
    static std::atomic<int> counter{0};
    return path + kind + std::to_string(static_cast<long>(::getpid())) + "." + std::to_string(counter++);
}

const char* kind_of(mode_t m) {
    if (S_ISDIR(m)) return "a directory";
    if (S_ISFIFO(m)) return "a FIFO";
    if (S_ISCHR(m)) return "a character device";
    if (S_ISBLK(m)) return "a block device";
    if (S_ISSOCK(m)) return "a socket";
    return "not a regular file";
}

std::string role(const char* what) { return (what && *what) ? std::string(what) + " " : std::string(); }

// Folder part and name part of a path ("a/b" -> "a", "b"; "b" -> ".", "b"; "/b" -> "/", "b").
void split_path(const std::string& path, std::string& dir, std::string& name) {
    size_t slash = path.find_last_of('/');
    if (slash == std::string::npos) {
        dir = ".";
        name = path;
    } else {
        dir = slash == 0 ? "/" : path.substr(0, slash);
        name = path.substr(slash + 1);
    }
}

// Writes `writer`'s bytes to a fresh temporary next to `path`; returns the temporary's name.
std::string write_temp(const std::string& path, const StreamWriter& writer) {
    SWITCHYARD_CHECK(!path.empty(), "output path is empty");
    std::string tmp = temp_name(path, ".tmp.");
    try {
        std::ofstream os(tmp, std::ios::binary | std::ios::trunc);
        SWITCHYARD_CHECK(os.good(), "cannot open '", printable(path), "' for writing: ", std::strerror(errno));
        writer(os);
        os.flush();
        SWITCHYARD_CHECK(os.good(), "write to '", printable(path), "' failed: ", std::strerror(errno));
        os.close();
        SWITCHYARD_CHECK(!os.fail(), "closing '", printable(path), "' failed: ", std::strerror(errno));
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
        SWITCHYARD_FAIL("cannot create '", printable(path), "': ", std::strerror(err));
    }
}

}  // namespace

std::string printable(const std::string& s, size_t max_len) {
    static const char kHex[] = "0123456789abcdef";
    std::string out;
    const size_t n = s.size() > max_len ? max_len : s.size();
    for (size_t i = 0; i < n; ++i) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        if (c < 0x20 || c >= 0x7f || c == '\'' || c == '"' || c == '\\') {
            out += "\\x";
            out += kHex[c >> 4];
            out += kHex[c & 15];
        } else {
            out += static_cast<char>(c);
        }
    }
    if (s.size() > max_len) out += "...(" + std::to_string(s.size()) + " bytes)";
    return out;
}

void require_regular_file(const std::string& path, const char* what) {
    SWITCHYARD_CHECK(!path.empty(), role(what), "path is empty");
    struct stat st;
    SWITCHYARD_CHECK(::stat(path.c_str(), &st) == 0, "cannot open ", role(what), "'", printable(path), "': ",
                     std::strerror(errno));
    SWITCHYARD_CHECK(S_ISREG(st.st_mode), "cannot read ", role(what), "'", printable(path), "': it is ",
                     kind_of(st.st_mode), ", not a regular file");
}

int open_regular_file(const std::string& path, size_t* size) {
    require_regular_file(path);  // before open(): opening a FIFO would block
    int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    SWITCHYARD_CHECK(fd >= 0, "cannot open '", printable(path), "': ", std::strerror(errno));
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        SWITCHYARD_FAIL("cannot read '", printable(path), "': not a regular file");
    }
    *size = static_cast<size_t>(st.st_size);
    return fd;
}

std::vector<uint8_t> read_file_bytes(const std::string& path) {
    size_t size = 0;
    const int fd = open_regular_file(path, &size);
    std::vector<uint8_t> bytes;
    try {
        bytes.resize(size);
    } catch (...) {
        ::close(fd);
        throw;
    }
    size_t got = 0;
    while (got < bytes.size()) {
        ssize_t r = ::read(fd, bytes.data() + got, bytes.size() - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            int err = errno;
            ::close(fd);
            SWITCHYARD_FAIL("read of '", printable(path), "' failed after ", got, " of ", bytes.size(), " bytes",
                            r < 0 ? std::string(": ") + std::strerror(err) : std::string(" (file shrank)"));
        }
        got += static_cast<size_t>(r);
    }
    ::close(fd);
    return bytes;
}

bool same_file(const std::string& a, const std::string& b) {
    struct stat sa, sb;
    const bool ea = ::stat(a.c_str(), &sa) == 0, eb = ::stat(b.c_str(), &sb) == 0;
    if (ea && eb) return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
    if (ea != eb) return false;
    // Neither exists: the same name in the same (resolved) folder.
    std::string da, na, db, nb;
    split_path(a, da, na);
    split_path(b, db, nb);
    if (na != nb) return false;
    char ra[PATH_MAX], rb[PATH_MAX];
    if (::realpath(da.c_str(), ra) == nullptr || ::realpath(db.c_str(), rb) == nullptr) return da == db;
    return std::strcmp(ra, rb) == 0;
}

void check_output_path(const std::string& path, const char* flag) {
    SWITCHYARD_CHECK(!path.empty(), flag, " is empty");
    std::string dir, name;
    split_path(path, dir, name);
    SWITCHYARD_CHECK(!name.empty() && name != "." && name != "..", flag, " '", printable(path),
                     "' names a directory, not a file");
    struct stat st;
    SWITCHYARD_CHECK(::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode), flag, " '", printable(path),
                     "': folder '", printable(dir), "' does not exist");
    if (::stat(path.c_str(), &st) == 0) {
        SWITCHYARD_CHECK(S_ISREG(st.st_mode), flag, " '", printable(path), "' is ", kind_of(st.st_mode),
                         "; give a file name");
    }
}

void write_file_atomic(const std::string& path, const StreamWriter& writer) {
    std::string tmp = write_temp(path, writer);
    rename_or_throw(tmp, path);
}

AtomicFileSet::~AtomicFileSet() {
    for (auto& p : pending_) std::remove(p.first.c_str());
}

void AtomicFileSet::add(const std::string& path, const StreamWriter& writer) {
    for (auto& p : pending_)
        SWITCHYARD_CHECK(p.second != path && !same_file(p.second, path), "output '", printable(path),
                         "' given twice");
    check_output_path(path, "output");
    pending_.emplace_back(write_temp(path, writer), path);
}

void AtomicFileSet::commit() {
    // 1. Every target must still be a regular file or absent (a folder there would fail the rename midway).
    for (auto& p : pending_) check_output_path(p.second, "output");
    // 2. Hard links to the files that will be replaced, so a failed later rename can put them back.
    std::vector<std::string> backup(pending_.size());
    auto drop_backups = [&] {
        for (auto& b : backup)
            if (!b.empty()) ::unlink(b.c_str());
    };
    for (size_t i = 0; i < pending_.size(); ++i) {
        struct stat st;
        if (::lstat(pending_[i].second.c_str(), &st) != 0) continue;
        std::string b = temp_name(pending_[i].second, ".bak.");
        if (::link(pending_[i].second.c_str(), b.c_str()) == 0) backup[i] = b;
    }
    // 3. The renames; on failure undo the ones done (restore the old file or remove the new one).
    for (size_t i = 0; i < pending_.size(); ++i) {
        int err = 0;
        if (static_cast<int>(i) == fail_at_)
            err = EIO;
        else if (std::rename(pending_[i].first.c_str(), pending_[i].second.c_str()) != 0)
            err = errno;
        if (err == 0) continue;
        for (size_t j = 0; j < i; ++j) {
            if (!backup[j].empty())
                std::rename(backup[j].c_str(), pending_[j].second.c_str());
            else
                ::unlink(pending_[j].second.c_str());
            backup[j].clear();
        }
        drop_backups();
        const std::string failed = pending_[i].second;
        // The destructor removes the temporaries of i and later; those of j < i were consumed by the renames.
        pending_.erase(pending_.begin(), pending_.begin() + static_cast<std::ptrdiff_t>(i));
        SWITCHYARD_FAIL("cannot create '", printable(failed), "': ", std::strerror(err),
                        "; no output was written");
    }
    drop_backups();
    pending_.clear();
}

}  // namespace io
}  // namespace switchyard
