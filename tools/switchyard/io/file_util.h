// tools/switchyard/io/file_util.h: whole-file reads, path identity and all-or-nothing writes for the I/O layer and
// the CLI.
//
// read_file_bytes: the file's bytes, or switchyard::Error naming the path and the OS reason. Only regular files
// are read: the path is stat'ed before it is opened (a directory or a FIFO is refused without opening it, so a
// FIFO never blocks) and fstat'ed again after (the file cannot be swapped in between).
// require_regular_file: the same check alone, for inputs another reader opens (safetensors memory-maps).
// same_file / resolve_output_path: outputs are compared with inputs and with each other by identity, not by
// spelling: st_dev/st_ino when the file exists, else realpath(parent) + "/" + name.
// write_file_atomic: the writer fills a temporary file `<path>.tmp.<pid>.<n>` in the same folder; only when
// it returns and the data is flushed is the temporary renamed over `path` (rename is atomic on POSIX), so
// a failure (exception, full disk) never leaves a partial `path`; the temporary is removed on failure.
// AtomicFileSet: the same for several outputs that must appear together (e.g. y.npy and stats.json):
// every file is written to its temporary first and the renames happen only in commit(); when one rename
// fails, the ones already done are undone (a file that existed before is restored from a hard link taken
// before the first rename), so either every output appears or none changes.
// printable: a bounded, printable rendering of bytes from a file (names, dtype strings) for error messages.
#pragma once

#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

namespace switchyard {
namespace io {

// `what` names the role in messages ("input", "weights"); empty: no role.
std::vector<uint8_t> read_file_bytes(const std::string& path);
void require_regular_file(const std::string& path, const char* what = "");
// require_regular_file, then open(2) for reading (never blocking) and a second check on the open descriptor;
// returns the descriptor (the caller closes it) and the file's size in *size.
int open_regular_file(const std::string& path, size_t* size);

// True when a and b name the same file (or, for paths that do not exist yet, the same entry of the same folder).
bool same_file(const std::string& a, const std::string& b);
// Checks an output path before anything is written: not empty, its folder exists, and the path is not a
// folder or another non-regular file.
void check_output_path(const std::string& path, const char* flag);

// Control bytes, non-ASCII bytes and quotes as \xNN escapes; longer than max_len: cut, with "...(N bytes)".
std::string printable(const std::string& s, size_t max_len = 96);

using StreamWriter = std::function<void(std::ostream&)>;

// Writes through a temporary file and renames it over `path`.
void write_file_atomic(const std::string& path, const StreamWriter& writer);

// Several outputs committed together: add() writes each to a temporary; commit() renames them all (or none);
// the destructor removes temporaries that were not committed.
class AtomicFileSet {
 public:
    AtomicFileSet() = default;
    ~AtomicFileSet();
    AtomicFileSet(const AtomicFileSet&) = delete;
    AtomicFileSet& operator=(const AtomicFileSet&) = delete;

    void add(const std::string& path, const StreamWriter& writer);
    void commit();
    // Test hook: commit() fails (as a failed rename would) before the rename of output number n (0-based).
    void fail_before_rename_for_testing(int n) { fail_at_ = n; }

 private:
    std::vector<std::pair<std::string, std::string>> pending_;  // (temporary, final)
    int fail_at_ = -1;
};

}  // namespace io
}  // namespace switchyard
