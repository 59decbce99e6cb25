// tools/switchyard/io/safetensors.cpp: safetensors read/write (see safetensors.h for the layout and the checks).
#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

#include "io/file_util.h"
#include "io/npy.h"
#include "switchyard/error.h"

namespace switchyard {
namespace io {

namespace {

// Headers larger than this are refused (the reference implementation uses 100 MB too).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

bool parse_dtype_str(const std::string& s, DType& out) {
    if (s == "F32")
        out = DType::kF32;
    else if (s == "BF16")
        out = DType::kBF16;
    else if (s == "F16")
        out = DType::kF16;
    else if (s == "I32")
        out = DType::kI32;
    else if (s == "I64")
        out = DType::kI64;
    else if (s == "F8_E4M3")
        out = DType::kF8E4M3;
    else
        return false;
    return true;
}

}  // namespace

const char* safetensors_dtype_name(DType t) {
    switch (t) {
        case DType::kF32:
            return "F32";
        case DType::kBF16:
            return "BF16";
        case DType::kF16:
            return "F16";
        case DType::kI32:
            return "I32";
        case DType::kI64:
            return "I64";
        case DType::kF64:
            return "F64";
        case DType::kF8E4M3:
            return "F8_E4M3";
    }
    return "?";
}

int64_t SafetensorInfo::numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
    const int fd = open_regular_file(path, &size_);
    if (size_ > 0) {
        void* m = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            int err = errno;
            ::close(fd);
            SWITCHYARD_FAIL("cannot map '", printable(path), "': ", std::strerror(err));
        }
        map_ = m;
        base_ = static_cast<const uint8_t*>(m);
    }
    ::close(fd);
    try {
        parse();
    } catch (...) {
        if (map_) ::munmap(map_, size_);
        map_ = nullptr;
        throw;
    }
}

SafetensorsFile::SafetensorsFile(std::vector<uint8_t> bytes, const std::string& name)
    : path_(name), owned_(std::move(bytes)) {
    base_ = owned_.data();
    size_ = owned_.size();
    parse();
}

SafetensorsFile::~SafetensorsFile() {
    if (map_) ::munmap(map_, size_);
}

namespace {

// Nesting allowed in a safetensors header: the top object, a tensor entry (or __metadata__), its shape or
// data_offsets array. Deeper values are rejected while parsing, so nothing later recurses over a deep value.
constexpr size_t kMaxHeaderDepth = 3;

// Checks, while nlohmann parses, the two rules its DOM parser does not: no key twice in one object (the
// format forbids it; the DOM would keep the last) and no nesting beyond kMaxHeaderDepth.
struct HeaderGuard {
    const std::string& path;
    std::vector<std::vector<std::string>> keys;  // per open container: the keys seen (arrays: none)
    bool operator()(int, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
        using E = nlohmann::json::parse_event_t;
        switch (ev) {
            case E::object_start:
            case E::array_start:
                SWITCHYARD_CHECK(keys.size() < kMaxHeaderDepth, path, ": safetensors header nests deeper than ",
                                 kMaxHeaderDepth, " levels (tensor entries are {dtype, shape, data_offsets})");
                keys.emplace_back();
                break;
            case E::object_end:
            case E::array_end:
                if (!keys.empty()) keys.pop_back();
                break;
            case E::key: {
                const std::string& k = parsed.get_ref<const std::string&>();
                auto& seen = keys.back();
                for (const std::string& s : seen)
                    SWITCHYARD_CHECK(s != k, path, ": safetensors header has the key '", printable(k),
                                     "' twice (duplicate keys are not allowed)");
                seen.push_back(k);
                break;
            }
            case E::value:
                break;
        }
        return true;
    }
};

// Byte size of each dtype of the safetensors specification (0: not known here).
size_t spec_dtype_size(const std::string& s) {
    if (s == "BOOL" || s == "U8" || s == "I8" || s == "F8_E5M2" || s == "F8_E4M3" || s == "F8_E8M0") return 1;
    if (s == "I16" || s == "U16" || s == "F16" || s == "BF16") return 2;
    if (s == "I32" || s == "U32" || s == "F32") return 4;
    if (s == "I64" || s == "U64" || s == "F64") return 8;
    return 0;
}

// A short printable rendering of a JSON value for messages (the value is at most kMaxHeaderDepth deep).
std::string show(const nlohmann::json& v) { return printable(v.dump(), 48); }

}  // namespace

void SafetensorsFile::parse() {
    SWITCHYARD_CHECK(size_ >= 8, path_, ": truncated safetensors file (", size_, " bytes, no header length)");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | base_[i];
    SWITCHYARD_CHECK(n <= kMaxHeaderBytes, path_, ": safetensors header length ", n, " is implausible (> 100 MB)");
    SWITCHYARD_CHECK(n <= size_ - 8, path_, ": truncated safetensors file: header needs ", n + 8, " bytes, file has ",
                     size_);
    data_start_ = 8 + static_cast<size_t>(n);
    const uint64_t data_size = size_ - data_start_;

    // The header is UTF-8 JSON that starts with '{' and may be padded at the end with spaces (0x20) only.
    const char* h = reinterpret_cast<const char*>(base_ + 8);
    SWITCHYARD_CHECK(n >= 2 && h[0] == '{', path_, ": safetensors header does not start with '{'");
    size_t hlen = static_cast<size_t>(n);
    while (hlen > 0 && h[hlen - 1] == ' ') --hlen;
    for (size_t i = 0; i < hlen; ++i)
        SWITCHYARD_CHECK(h[i] != '\0', path_, ": safetensors header has a NUL byte at offset ", i);

    nlohmann::json j;
    try {
        HeaderGuard guard{path_, {}};
        j = nlohmann::json::parse(h, h + hlen, std::ref(guard));
    } catch (const nlohmann::json::exception& e) {
        SWITCHYARD_FAIL(path_, ": safetensors header is not valid JSON: ", printable(e.what(), 160));
    }
    SWITCHYARD_CHECK(j.is_object(), path_, ": safetensors header is not a JSON object");

    for (auto it = j.begin(); it != j.end(); ++it) {
        const std::string& name = it.key();
        const std::string pname = printable(name);
        const auto& v = it.value();
        if (name == "__metadata__") {
            SWITCHYARD_CHECK(v.is_object(), path_, ": __metadata__ is not an object");
            for (auto m = v.begin(); m != v.end(); ++m) {
                SWITCHYARD_CHECK(m.value().is_string(), path_, ": __metadata__ value of '", printable(m.key()),
                                 "' is not a string");
                metadata_[m.key()] = m.value().get<std::string>();
            }
            continue;
        }
        SWITCHYARD_CHECK(v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"),
                         path_, ": tensor '", pname, "' lacks dtype, shape or data_offsets");
        SWITCHYARD_CHECK(v.size() == 3, path_, ": tensor '", pname,
                         "' has keys other than dtype, shape and data_offsets");
        SafetensorInfo info;
        info.name = name;
        SWITCHYARD_CHECK(v["dtype"].is_string(), path_, ": tensor '", pname, "' has a non-string dtype");
        info.dtype_str = v["dtype"].get<std::string>();
        info.dtype_ok = parse_dtype_str(info.dtype_str, info.dtype);
        const size_t esize = info.dtype_ok ? dtype_size(info.dtype) : spec_dtype_size(info.dtype_str);
        SWITCHYARD_CHECK(esize > 0, path_, ": tensor '", pname, "' has dtype '", printable(info.dtype_str, 24),
                         "', which the safetensors format does not define");
        const auto& shape = v["shape"];
        SWITCHYARD_CHECK(shape.is_array(), path_, ": tensor '", pname, "' has a non-array shape");
        uint64_t numel = 1;
        for (const auto& d : shape) {
            SWITCHYARD_CHECK(d.is_number_unsigned() &&
                                 d.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
                             path_, ": tensor '", pname, "' has a bad shape entry ", show(d));
            const uint64_t dim = d.get<uint64_t>();
            SWITCHYARD_CHECK(dim == 0 || numel <= (std::numeric_limits<uint64_t>::max() >> 4) / dim, path_,
                             ": tensor '", pname, "' shape overflows");
            numel *= dim;
            info.shape.push_back(static_cast<int64_t>(dim));
        }
        const auto& off = v["data_offsets"];
        SWITCHYARD_CHECK(
            off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(), path_,
            ": tensor '", pname, "' has bad data_offsets ", show(off));
        info.begin = off[0].get<uint64_t>();
        info.end = off[1].get<uint64_t>();
        SWITCHYARD_CHECK(info.begin <= info.end, path_, ": tensor '", pname, "' has data_offsets [", info.begin, ", ",
                         info.end, "] with begin > end");
        SWITCHYARD_CHECK(info.end <= data_size, path_, ": tensor '", pname, "' data_offsets [", info.begin, ", ",
                         info.end, "] run past the end of the file's data (", data_size, " bytes; truncated file?)");
        const uint64_t want = numel * esize;
        SWITCHYARD_CHECK(info.end - info.begin == want, path_, ": tensor '", pname, "' has ", info.end - info.begin,
                         " bytes but shape ", shape_to_string(info.shape), " of ", printable(info.dtype_str, 24),
                         " needs ", want);
        tensors_[name] = std::move(info);
    }

    // The data region is covered exactly: tensors in offset order, each starting where the previous one ended,
    // the last ending at the end of the file (no gaps, no overlaps, no trailing bytes; empty tensors sit at a
    // boundary).
    std::vector<const SafetensorInfo*> order;
    for (auto& kv : tensors_) order.push_back(&kv.second);
    std::sort(order.begin(), order.end(), [](const SafetensorInfo* a, const SafetensorInfo* b) {
        return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    uint64_t pos = 0;
    const SafetensorInfo* prev = nullptr;
    for (const SafetensorInfo* t : order) {
        SWITCHYARD_CHECK(t->begin >= pos, path_, ": tensors '", printable(prev ? prev->name : ""), "' and '",
                         printable(t->name), "' overlap in the data region");
        SWITCHYARD_CHECK(t->begin == pos, path_, ": the data region has a gap of ", t->begin - pos,
                         " bytes before tensor '", printable(t->name), "' (offset ", pos, ")");
        pos = t->end;
        prev = t;
    }
    SWITCHYARD_CHECK(pos == data_size, path_, ": the data region has ", data_size - pos,
                     " bytes after the last tensor (offset ", pos, " of ", data_size, ")");
}

const SafetensorInfo& SafetensorsFile::info(const std::string& name) const {
    auto it = tensors_.find(name);
    SWITCHYARD_CHECK(it != tensors_.end(), path_, ": tensor '", printable(name), "' not found");
    SWITCHYARD_CHECK(it->second.dtype_ok, path_, ": tensor '", printable(name), "' has unsupported dtype ",
                     printable(it->second.dtype_str, 24),
                     " (supported: F32, BF16, F16, I32, I64, F8_E4M3)");
    return it->second;
}

const SafetensorInfo& SafetensorsFile::raw_info(const std::string& name) const {
    auto it = tensors_.find(name);
    SWITCHYARD_CHECK(it != tensors_.end(), path_, ": tensor '", printable(name), "' not found");
    return it->second;
}

const uint8_t* SafetensorsFile::raw_data(const std::string& name) const {
    return base_ + data_start_ + raw_info(name).begin;
}

const uint8_t* SafetensorsFile::data(const std::string& name) const {
    const SafetensorInfo& i = info(name);
    return base_ + data_start_ + i.begin;
}

std::vector<std::string> SafetensorsFile::names() const {
    std::vector<std::string> out;
    for (auto& kv : tensors_) out.push_back(kv.first);
    return out;
}

namespace {

// Bytes of one tensor to write: its dtype string (verbatim when given, else the DType's name) and its size.
std::string write_dtype_name(const SafetensorToWrite& t) {
    return t.dtype_str.empty() ? std::string(safetensors_dtype_name(t.dtype)) : t.dtype_str;
}

uint64_t write_nbytes(const SafetensorToWrite& t) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
        SWITCHYARD_CHECK(d >= 0, "tensor '", t.name, "' has a negative dimension");
        numel *= static_cast<uint64_t>(d);
    }
    const size_t esize = t.dtype_str.empty() ? dtype_size(t.dtype) : spec_dtype_size(t.dtype_str);
    SWITCHYARD_CHECK(esize > 0, "tensor '", t.name, "' has dtype '", printable(t.dtype_str, 24),
                     "', which the safetensors format does not define");
    return numel * esize;
}

// The 8-byte length and the JSON header (padded with spaces to a multiple of 8); *data_bytes gets the data size.
std::string encode_header(const std::vector<SafetensorToWrite>& tensors, const std::map<std::string, std::string>& metadata,
                          uint64_t* data_bytes) {
    nlohmann::ordered_json j = nlohmann::ordered_json::object();
    if (!metadata.empty()) {
        nlohmann::ordered_json m = nlohmann::ordered_json::object();
        for (auto& kv : metadata) m[kv.first] = kv.second;
        j["__metadata__"] = m;
    }
    uint64_t offset = 0;
    for (const auto& t : tensors) {
        SWITCHYARD_CHECK(!t.name.empty() && t.name != "__metadata__", "bad safetensors tensor name '", t.name, "'");
        SWITCHYARD_CHECK(!j.contains(t.name), "safetensors tensor '", t.name, "' given twice");
        const uint64_t nbytes = write_nbytes(t);
        SWITCHYARD_CHECK(t.data != nullptr || nbytes == 0, "tensor '", t.name, "' has no data");
        j[t.name] = {{"dtype", write_dtype_name(t)}, {"shape", t.shape}, {"data_offsets", {offset, offset + nbytes}}};
        offset += nbytes;
    }
    std::string header = j.dump();
    header.append((8 - header.size() % 8) % 8, ' ');
    std::string out(8, '\0');
    const uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>(static_cast<uint8_t>(n >> (8 * i)));
    *data_bytes = offset;
    return out + header;
}

}  // namespace

std::vector<uint8_t> encode_safetensors(const std::vector<SafetensorToWrite>& tensors,
                                        const std::map<std::string, std::string>& metadata) {
    uint64_t data_bytes = 0;
    const std::string head = encode_header(tensors, metadata, &data_bytes);
    std::vector<uint8_t> out;
    out.reserve(head.size() + data_bytes);
    out.insert(out.end(), head.begin(), head.end());
    for (const auto& t : tensors) {
        const uint64_t nbytes = write_nbytes(t);
        const uint8_t* p = static_cast<const uint8_t*>(t.data);
        if (nbytes) out.insert(out.end(), p, p + nbytes);
    }
    return out;
}

// Streams the header and each tensor's bytes into the temporary (no second copy of the data in memory).
void write_safetensors(const std::string& path, const std::vector<SafetensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
    uint64_t data_bytes = 0;
    const std::string head = encode_header(tensors, metadata, &data_bytes);
    write_file_atomic(path, [&](std::ostream& os) {
        os.write(head.data(), static_cast<std::streamsize>(head.size()));
        for (const auto& t : tensors) {
            const uint64_t nbytes = write_nbytes(t);
            if (nbytes) os.write(static_cast<const char*>(t.data), static_cast<std::streamsize>(nbytes));
        }
    });
}

}  // namespace io
}  // namespace switchyard
