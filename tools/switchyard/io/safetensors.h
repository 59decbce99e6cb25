// tools/switchyard/io/safetensors.h: the safetensors format, read (memory-mapped) and write.
//
// File layout: uint64 LE header length N, N bytes of JSON, then the data region. The JSON maps each tensor
// name to {"dtype": "F32"|"BF16"|"F16"|"I32"|"I64"|"F8_E4M3", "shape": [...], "data_offsets": [begin, end]} (offsets
// relative to the data region, end exclusive) and may hold "__metadata__": {string: string}.
// Checks on open (each failure throws switchyard::Error naming the file and, where it applies, the tensor;
// names and strings from the file appear escaped and cut short, file_util.h printable()):
// the header fits in the file, starts with '{', has no NUL byte, is padded at the end with spaces only and is
// a JSON object with no key twice and no nesting beyond tensor entries; each entry has exactly dtype, shape and
// data_offsets, a dtype the format defines, a shape of non-negative ints and offsets inside the data region;
// end - begin == numel * dtype size; the tensors cover the data region exactly (no overlap, no gap, no
// trailing bytes: the format forbids holes). Dtypes other than the six above (F64, F8_E5M2, BOOL, ...) are
// rejected when the tensor is opened by info()/data(), not at file open, so a checkpoint shard with an unused odd
// tensor loads; raw_info()/raw_data() give any tensor's entry and bytes as stored (copying it through unchanged).
// Writing: tensors in the given order, packed, header padded with spaces to a multiple of 8 bytes;
// all-or-nothing (file_util.h); write_safetensors streams each tensor's bytes into the temporary file.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "switchyard/dtype.h"

namespace switchyard {
namespace io {

struct SafetensorInfo {
    std::string name;
    std::string dtype_str;  // as written in the file
    bool dtype_ok = false;  // dtype_str is one of the supported ones
    DType dtype = DType::kF32;
    std::vector<int64_t> shape;
    uint64_t begin = 0, end = 0;  // offsets in the data region
    int64_t numel() const;
};

class SafetensorsFile {
 public:
    // Opens and validates the file (memory-maps it read-only).
    explicit SafetensorsFile(const std::string& path);
    // Parses an in-memory image (for tests); `name` is used in messages.
    SafetensorsFile(std::vector<uint8_t> bytes, const std::string& name);
    ~SafetensorsFile();
    SafetensorsFile(const SafetensorsFile&) = delete;
    SafetensorsFile& operator=(const SafetensorsFile&) = delete;

    const std::string& path() const { return path_; }
    bool has(const std::string& name) const { return tensors_.count(name) != 0; }
    // Throws Error "<file>: tensor '<name>' not found" when absent, or names an unsupported dtype.
    const SafetensorInfo& info(const std::string& name) const;
    // Pointer to the tensor's bytes (valid while this object lives); checks the dtype is supported.
    const uint8_t* data(const std::string& name) const;
    // Entry and bytes of any tensor the file holds, whatever its dtype (dtype_ok false: only dtype_str is known).
    const SafetensorInfo& raw_info(const std::string& name) const;
    const uint8_t* raw_data(const std::string& name) const;
    std::vector<std::string> names() const;  // sorted
    const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
    void parse();

    std::string path_;
    const uint8_t* base_ = nullptr;  // whole file
    size_t size_ = 0;
    size_t data_start_ = 0;
    void* map_ = nullptr;  // mmap'ed region, or null
    std::vector<uint8_t> owned_;
    std::map<std::string, SafetensorInfo> tensors_;
    std::map<std::string, std::string> metadata_;
};

struct SafetensorToWrite {
    std::string name;
    DType dtype = DType::kF32;
    std::vector<int64_t> shape;
    const void* data = nullptr;  // numel * dtype_size bytes
    std::string dtype_str;       // when not empty: written verbatim instead of dtype (any dtype the format defines,
                                 // e.g. a tensor copied through from raw_info)
};

std::vector<uint8_t> encode_safetensors(const std::vector<SafetensorToWrite>& tensors,
                                        const std::map<std::string, std::string>& metadata = {});
void write_safetensors(const std::string& path, const std::vector<SafetensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// DType::kF32 -> "F32" etc.
const char* safetensors_dtype_name(DType t);

}  // namespace io
}  // namespace switchyard
