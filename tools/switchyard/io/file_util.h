// tools/switchyard/io/file_util.h: whole-file reads and all-or-nothing writes for the I/O layer and the CLI.
//
// read_file_bytes: the file's bytes, or switchyard::Error naming the path and the OS reason.
// write_file_atomic: the writer fills a temporary file `<path>.tmp.<pid>.<n>` in the same folder; only when
// it returns and the data is flushed is the temporary renamed over `path` (rename is atomic on POSIX), so
// a failure (exception, full disk) never leaves a partial `path`; the temporary is removed on failure.
// AtomicFileSet: the same for several outputs that must appear together (e.g. y.npy and stats.json):
// every file is written to its temporary first and the renames happen only in commit().
#pragma once

#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

namespace switchyard {
namespace io {

std::vector<uint8_t> read_file_bytes(const std::string& path);

using StreamWriter = std::function<void(std::ostream&)>;

// Writes through a temporary file and renames it over `path`.
void write_file_atomic(const std::string& path, const StreamWriter& writer);

// Several outputs committed together: add() writes each to a temporary; commit() renames them all;
// the destructor removes temporaries that were not committed.
class AtomicFileSet {
 public:
    AtomicFileSet() = default;
    ~AtomicFileSet();
    AtomicFileSet(const AtomicFileSet&) = delete;
    AtomicFileSet& operator=(const AtomicFileSet&) = delete;

    void add(const std::string& path, const StreamWriter& writer);
    void commit();

 private:
    std::vector<std::pair<std::string, std::string>> pending_;  // (temporary, final)
};

}  // namespace io
}  // namespace switchyard
