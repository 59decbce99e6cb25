// tools/switchyard/io/npy.cpp: .npy reading and writing (see npy.h for what is accepted).
//
// File layout: "\x93NUMPY", major, minor, header length (uint16 LE for 1.0, uint32 LE for 2.0/3.0), then an
// ASCII (3.0: UTF-8) Python dict literal {'descr': ..., 'fortran_order': ..., 'shape': (...), } padded with
// spaces and ending in '\n', then the raw array bytes.
#include "io/npy.h"

#include <cctype>
#include <cstring>
#include <limits>
#include <sstream>

#include "io/file_util.h"
#include "switchyard/error.h"

namespace switchyard {
namespace io {


std::string shape_to_string(const std::vector<int64_t>& shape) {
    std::ostringstream os;
    // For messages: at most 12 dimensions are written (a hostile file may declare thousands).
    constexpr size_t kMaxShown = 12;
    os << "[";
    for (size_t i = 0; i < shape.size() && i < kMaxShown; ++i) os << (i ? ", " : "") << shape[i];
    if (shape.size() > kMaxShown) os << ", ... (" << shape.size() << " dimensions)";
    os << "]";
    return os.str();
}

int64_t NpyArray::numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;

// A tiny parser for the header dict: string keys, values that are strings, True/False, or int tuples.
class HeaderParser {
 public:
    HeaderParser(const std::string& text, const std::string& name) : s_(text), name_(name) {}

    void parse(std::string& descr, bool& fortran, std::vector<int64_t>& shape) {
        bool have_descr = false, have_fortran = false, have_shape = false;
        skip_ws();
        expect('{');
        while (true) {
            skip_ws();
            if (peek() == '}') {
                ++i_;
                break;
            }
            std::string key = parse_string();
            skip_ws();
            expect(':');
            skip_ws();
            bool* seen = key == "descr" ? &have_descr
                         : key == "fortran_order" ? &have_fortran
                         : key == "shape" ? &have_shape
                                          : nullptr;
            SWITCHYARD_CHECK(seen != nullptr, name_, ": .npy header has an unknown key '", printable(key), "'");
            SWITCHYARD_CHECK(!*seen, name_, ": .npy header has the key '", key, "' twice");
            *seen = true;
            if (key == "descr") {
                descr = parse_string();
            } else if (key == "fortran_order") {
                fortran = parse_bool();
            } else {
                shape = parse_tuple();
            }
            skip_ws();
            if (peek() == ',') {
                ++i_;
                continue;
            }
            skip_ws();
            expect('}');
            break;
        }
        // The format: the dict, then spaces, then one '\n' that ends the header.
        while (i_ < s_.size() && s_[i_] == ' ') ++i_;
        SWITCHYARD_CHECK(i_ + 1 == s_.size() && s_[i_] == '\n', name_, ": malformed .npy header: ",
                         i_ < s_.size() ? "unexpected '" + printable(s_.substr(i_, 16)) + "' after the dict"
                                        : std::string("no '\\n' at the end"),
                         " (the header is a dict padded with spaces and ended by a newline)");
        SWITCHYARD_CHECK(have_descr && have_fortran && have_shape, name_,
                         ": .npy header lacks one of 'descr', 'fortran_order', 'shape'");
    }

 private:
    char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
    void skip_ws() {
        while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
    }
    void expect(char c) {
        SWITCHYARD_CHECK(peek() == c, name_, ": malformed .npy header: expected '", c, "' at offset ", i_,
                         " of header \"", printable(s_, 80), "\"");
        ++i_;
    }
    std::string parse_string() {
        char q = peek();
        SWITCHYARD_CHECK(q == '\'' || q == '"', name_, ": malformed .npy header: expected a string at offset ", i_);
        ++i_;
        size_t start = i_;
        while (i_ < s_.size() && s_[i_] != q) ++i_;
        SWITCHYARD_CHECK(i_ < s_.size(), name_, ": malformed .npy header: unterminated string");
        std::string out = s_.substr(start, i_ - start);
        ++i_;
        return out;
    }
    bool parse_bool() {
        if (s_.compare(i_, 4, "True") == 0) {
            i_ += 4;
            return true;
        }
        if (s_.compare(i_, 5, "False") == 0) {
            i_ += 5;
            return false;
        }
        SWITCHYARD_FAIL(name_, ": malformed .npy header: fortran_order is neither True nor False");
    }
    // A Python tuple of non-negative ints: (), (3,), (3, 4), (3, 4,); one element needs its comma.
    std::vector<int64_t> parse_tuple() {
        std::vector<int64_t> out;
        bool trailing_comma = false;
        expect('(');
        while (true) {
            skip_ws();
            if (peek() == ')') {
                ++i_;
                break;
            }
            SWITCHYARD_CHECK(std::isdigit(static_cast<unsigned char>(peek())), name_,
                             ": malformed .npy header: bad shape entry at offset ", i_);
            SWITCHYARD_CHECK(!(peek() == '0' && i_ + 1 < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_ + 1]))),
                             name_, ": malformed .npy header: shape entry with a leading zero at offset ", i_);
            int64_t v = 0;
            while (std::isdigit(static_cast<unsigned char>(peek()))) {
                SWITCHYARD_CHECK(v < std::numeric_limits<int64_t>::max() / 10 - 10, name_, ": .npy shape too large");
                v = v * 10 + (s_[i_] - '0');
                ++i_;
            }
            if (peek() == 'L') ++i_;  // Python 2 long suffix
            out.push_back(v);
            skip_ws();
            trailing_comma = peek() == ',';
            if (trailing_comma) {
                ++i_;
            } else {
                skip_ws();
                expect(')');
                break;
            }
        }
        SWITCHYARD_CHECK(out.size() != 1 || trailing_comma, name_,
                         ": malformed .npy header: shape (", out[0], ") is not a tuple (write (", out[0], ",))");
        return out;
    }

    const std::string& s_;
    const std::string& name_;
    size_t i_ = 0;
};

DType parse_descr(const std::string& descr, const std::string& name) {
    SWITCHYARD_CHECK(descr.size() >= 2, name, ": unsupported .npy dtype '", printable(descr, 32), "'");
    char order = descr[0];
    std::string kind = descr.substr(1);
    SWITCHYARD_CHECK(order != '>', name, ": big-endian .npy data ('", printable(descr, 32),
                     "') is not supported; save little-endian (e.g. x.astype('<f4'))");
    bool le = order == '<' || order == '=' || order == '|';
    if (le) {
        if (kind == "f4" && order != '|') return DType::kF32;
        if (kind == "f2" && order != '|') return DType::kF16;
        if (kind == "i4" && order != '|') return DType::kI32;
        if (kind == "i8" && order != '|') return DType::kI64;
        if (kind == "u2" && order != '|') return DType::kBF16;
        if (kind == "V2") return DType::kBF16;
    }
    SWITCHYARD_FAIL(name, ": unsupported .npy dtype '", printable(descr, 32),
                    "' (accepted: <f4, <f2, <i4, <i8, and bf16 bits as <u2 or |V2)");
}

const char* descr_of(DType t) {
    switch (t) {
        case DType::kF32:
            return "<f4";
        case DType::kF16:
            return "<f2";
        case DType::kI32:
            return "<i4";
        case DType::kI64:
            return "<i8";
        case DType::kBF16:
            return "<u2";
        case DType::kF64:  // not a CLI dtype (the library takes fp64 on the CPU for gradient checks only)
            return "";
        case DType::kF8E4M3:  // no numpy type; FP8 weights come from safetensors
            return "";
    }
    return "";
}

uint32_t read_le(const uint8_t* p, int n) {
    uint32_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}

}  // namespace

NpyArray parse_npy(const uint8_t* bytes, size_t size, const std::string& name) {
    SWITCHYARD_CHECK(size >= kMagicLen + 2 && std::memcmp(bytes, kMagic, kMagicLen) == 0, name,
                     ": not a .npy file (bad magic string; file is ", size, " bytes)");
    int major = bytes[6], minor = bytes[7];
    SWITCHYARD_CHECK(major >= 1 && major <= 3 && minor == 0, name, ": unsupported .npy format version ", major, ".",
                     minor, " (supported: 1.0, 2.0, 3.0)");
    size_t len_bytes = major == 1 ? 2 : 4;
    size_t prefix = kMagicLen + 2 + len_bytes;
    SWITCHYARD_CHECK(size >= prefix, name, ": truncated .npy file (", size, " bytes, header length missing)");
    size_t header_len = read_le(bytes + kMagicLen + 2, static_cast<int>(len_bytes));
    SWITCHYARD_CHECK(size >= prefix + header_len, name, ": truncated .npy file: header needs ", prefix + header_len,
                     " bytes, file has ", size);
    std::string header(reinterpret_cast<const char*>(bytes + prefix), header_len);
    // 1.0 and 2.0 headers are ASCII, 3.0 UTF-8; no version allows control bytes (a NUL, say) except the final '\n'.
    for (size_t i = 0; i < header.size(); ++i) {
        const unsigned char c = static_cast<unsigned char>(header[i]);
        SWITCHYARD_CHECK((c >= 0x20 && c != 0x7f && (c < 0x80 || major == 3)) || (c == '\n' && i + 1 == header.size()),
                         name, ": malformed .npy header: byte 0x", std::hex, static_cast<int>(c), std::dec,
                         " at offset ", i, " (headers are ", major == 3 ? "UTF-8" : "ASCII",
                         " text ended by one newline)");
    }

    NpyArray a;
    std::string descr;
    bool fortran = false;
    HeaderParser(header, name).parse(descr, fortran, a.shape);
    a.dtype = parse_descr(descr, name);
    SWITCHYARD_CHECK(!fortran || a.shape.size() <= 1, name,
                     ": Fortran-order .npy arrays are not supported; save a C-order array (np.ascontiguousarray)");

    size_t numel = 1;
    for (int64_t d : a.shape) {
        SWITCHYARD_CHECK(
            d >= 0 && (d == 0 || numel <= std::numeric_limits<size_t>::max() / 16 / static_cast<size_t>(d)), name,
            ": .npy shape ", shape_to_string(a.shape), " is too large");
        numel *= static_cast<size_t>(d);
    }
    size_t nbytes = numel * dtype_size(a.dtype);
    size_t avail = size - prefix - header_len;
    SWITCHYARD_CHECK(avail >= nbytes, name, ": truncated .npy file: shape ", shape_to_string(a.shape), " of ",
                     to_string(a.dtype), " needs ", nbytes, " data bytes, file has ", avail);
    SWITCHYARD_CHECK(avail == nbytes, name, ": .npy file has ", avail - nbytes,
                     " unexpected bytes after the data (shape ", shape_to_string(a.shape), ")");
    a.data.assign(bytes + prefix + header_len, bytes + prefix + header_len + nbytes);
    return a;
}

NpyArray read_npy(const std::string& path) {
    std::vector<uint8_t> bytes = read_file_bytes(path);
    return parse_npy(bytes.data(), bytes.size(), path);
}

std::vector<uint8_t> encode_npy(DType dtype, const std::vector<int64_t>& shape, const void* data, bool force_v2) {
    SWITCHYARD_CHECK(*descr_of(dtype) != '\0', "cannot write ", to_string(dtype), " as .npy");
    std::ostringstream h;
    h << "{'descr': '" << descr_of(dtype) << "', 'fortran_order': False, 'shape': (";
    size_t numel = 1;
    for (size_t i = 0; i < shape.size(); ++i) {
        SWITCHYARD_CHECK(shape[i] >= 0, "npy shape has a negative dimension: ", shape_to_string(shape));
        h << shape[i] << (shape.size() == 1 ? "," : (i + 1 < shape.size() ? ", " : ""));
        numel *= static_cast<size_t>(shape[i]);
    }
    h << "), }";
    std::string header = h.str();
    bool v2 = force_v2 || header.size() + 1 + kMagicLen + 4 > 65535;
    size_t prefix = kMagicLen + 2 + (v2 ? 4 : 2);
    size_t total = prefix + header.size() + 1;
    size_t pad = (64 - total % 64) % 64;
    header.append(pad, ' ');
    header.push_back('\n');

    size_t nbytes = numel * dtype_size(dtype);
    std::vector<uint8_t> out(prefix + header.size() + nbytes);
    uint8_t* p = out.data();
    std::memcpy(p, kMagic, kMagicLen);
    p[kMagicLen] = v2 ? 2 : 1;
    p[kMagicLen + 1] = 0;
    const uint32_t hl = static_cast<uint32_t>(header.size());
    for (size_t i = 0; i < (v2 ? 4u : 2u); ++i) p[kMagicLen + 2 + i] = static_cast<uint8_t>(hl >> (8 * i));
    std::memcpy(p + prefix, header.data(), header.size());
    if (nbytes) std::memcpy(p + prefix + header.size(), data, nbytes);
    return out;
}

void write_npy(const std::string& path, DType dtype, const std::vector<int64_t>& shape, const void* data,
               bool force_v2) {
    std::vector<uint8_t> bytes = encode_npy(dtype, shape, data, force_v2);
    write_file_atomic(path, [&](std::ostream& os) {
        os.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    });
}

}  // namespace io
}  // namespace switchyard
