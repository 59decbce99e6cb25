// tools/switchyard/io/npy.h: NumPy .npy files (format versions 1.0, 2.0 and 3.0), read and write.
//
// Accepted on read (little-endian, C order only):
//   descr '<f4' -> DType::kF32     '<f2' -> kF16     '<i4' -> kI32     '<i8' -> kI64
//   '<u2', '<V2', '|V2' -> kBF16: bf16 has no NumPy type, so its bit patterns travel as uint16 (what
//   `x.view(np.uint16)` saves) or as a 2-byte void type (what ml_dtypes' bfloat16 saves).
//   '=' (native) and '|' (no order) prefixes are accepted where they mean the same bytes on a little-endian
//   host; big-endian ('>') data, 'fortran_order': True and any other descr are rejected.
// Written: version 1.0 (2.0 when the header does not fit 64 KiB, or when asked), header padded so the data
// starts at a multiple of 64 bytes; bf16 written as '<u2'. Writes are all-or-nothing (file_util.h).
// Every failure throws switchyard::Error naming the file and the problem (truncated data, bad magic,
// unparsable header, unsupported dtype, Fortran order, size mismatch).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "switchyard/dtype.h"

namespace switchyard {
namespace io {

struct NpyArray {
    DType dtype = DType::kF32;
    std::vector<int64_t> shape;  // empty = 0-d (one element)
    std::vector<uint8_t> data;   // numel * dtype_size bytes, C order, little-endian

    int64_t numel() const;
    template <typename T>
    const T* as() const {
        return reinterpret_cast<const T*>(data.data());
    }
    template <typename T>
    T* as() {
        return reinterpret_cast<T*>(data.data());
    }
};

// Parses a whole .npy file image; `name` appears in error messages.
NpyArray parse_npy(const uint8_t* bytes, size_t size, const std::string& name);
NpyArray read_npy(const std::string& path);

// Serialises to bytes (format 1.0 unless force_v2 or the header needs 2.0).
std::vector<uint8_t> encode_npy(DType dtype, const std::vector<int64_t>& shape, const void* data,
                                bool force_v2 = false);
void write_npy(const std::string& path, DType dtype, const std::vector<int64_t>& shape, const void* data,
               bool force_v2 = false);
inline void write_npy(const std::string& path, const NpyArray& a, bool force_v2 = false) {
    write_npy(path, a.dtype, a.shape, a.data.data(), force_v2);
}

std::string shape_to_string(const std::vector<int64_t>& shape);

}  // namespace io
}  // namespace switchyard
