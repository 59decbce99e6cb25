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
    }
    return "?";
}

int64_t SafetensorInfo::numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
    int fd = ::open(path.c_str(), O_RDONLY);
    SWITCHYARD_CHECK(fd >= 0, "cannot open '", path, "': ", std::strerror(errno));
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        SWITCHYARD_FAIL("cannot read '", path, "': not a regular file");
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
        void* m = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            int err = errno;
            ::close(fd);
            SWITCHYARD_FAIL("cannot map '", path, "': ", std::strerror(err));
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

void SafetensorsFile::parse() {
    SWITCHYARD_CHECK(size_ >= 8, path_, ": truncated safetensors file (", size_, " bytes, no header length)");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | base_[i];
    SWITCHYARD_CHECK(n <= kMaxHeaderBytes, path_, ": safetensors header length ", n, " is implausible (> 100 MB)");
    SWITCHYARD_CHECK(n <= size_ - 8, path_, ": truncated safetensors file: header needs ", n + 8, " bytes, file has ",
                     size_);
    data_start_ = 8 + static_cast<size_t>(n);
    const uint64_t data_size = size_ - data_start_;

    nlohmann::json j;
    try {
        j = nlohmann::json::parse(base_ + 8, base_ + 8 + n);
    } catch (const nlohmann::json::exception& e) {
        SWITCHYARD_FAIL(path_, ": safetensors header is not valid JSON: ", e.what());
    }
    SWITCHYARD_CHECK(j.is_object(), path_, ": safetensors header is not a JSON object");

    for (auto it = j.begin(); it != j.end(); ++it) {
        const std::string& name = it.key();
        const auto& v = it.value();
        if (name == "__metadata__") {
            SWITCHYARD_CHECK(v.is_object(), path_, ": __metadata__ is not an object");
            for (auto m = v.begin(); m != v.end(); ++m) {
                SWITCHYARD_CHECK(m.value().is_string(), path_, ": __metadata__ value of '", m.key(),
                                 "' is not a string");
                metadata_[m.key()] = m.value().get<std::string>();
            }
            continue;
        }
        SWITCHYARD_CHECK(v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"),
                         path_, ": tensor '", name, "' lacks dtype, shape or data_offsets");
        SafetensorInfo info;
        info.name = name;
        SWITCHYARD_CHECK(v["dtype"].is_string(), path_, ": tensor '", name, "' has a non-string dtype");
        info.dtype_str = v["dtype"].get<std::string>();
        info.dtype_ok = parse_dtype_str(info.dtype_str, info.dtype);
        const auto& shape = v["shape"];
        SWITCHYARD_CHECK(shape.is_array(), path_, ": tensor '", name, "' has a non-array shape");
        uint64_t numel = 1;
        for (const auto& d : shape) {
            SWITCHYARD_CHECK(d.is_number_integer() && d.get<int64_t>() >= 0, path_, ": tensor '", name,
                             "' has a bad shape entry ", d.dump());
            int64_t dim = d.get<int64_t>();
            SWITCHYARD_CHECK(dim == 0 || numel <= (std::numeric_limits<uint64_t>::max() >> 4) / dim, path_,
                             ": tensor '", name, "' shape overflows");
            numel *= static_cast<uint64_t>(dim);
            info.shape.push_back(dim);
        }
        const auto& off = v["data_offsets"];
        SWITCHYARD_CHECK(
            off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(), path_,
            ": tensor '", name, "' has bad data_offsets ", off.dump());
        info.begin = off[0].get<uint64_t>();
        info.end = off[1].get<uint64_t>();
        SWITCHYARD_CHECK(info.begin <= info.end, path_, ": tensor '", name, "' has data_offsets [", info.begin, ", ",
                         info.end, "] with begin > end");
        SWITCHYARD_CHECK(info.end <= data_size, path_, ": tensor '", name, "' data_offsets [", info.begin, ", ",
                         info.end, "] run past the end of the file's data (", data_size, " bytes; truncated file?)");
        if (info.dtype_ok) {
            uint64_t want = numel * dtype_size(info.dtype);
            SWITCHYARD_CHECK(info.end - info.begin == want, path_, ": tensor '", name, "' has ", info.end - info.begin,
                             " bytes but shape ", shape_to_string(info.shape), " of ", info.dtype_str, " needs ", want);
        }
        tensors_[name] = std::move(info);
    }

    // No overlaps: sort by begin and compare neighbours (empty tensors overlap nothing).
    std::vector<const SafetensorInfo*> order;
    for (auto& kv : tensors_)
        if (kv.second.end > kv.second.begin) order.push_back(&kv.second);
    std::sort(order.begin(), order.end(),
              [](const SafetensorInfo* a, const SafetensorInfo* b) { return a->begin < b->begin; });
    for (size_t i = 1; i < order.size(); ++i) {
        SWITCHYARD_CHECK(order[i]->begin >= order[i - 1]->end, path_, ": tensors '", order[i - 1]->name, "' and '",
                         order[i]->name, "' overlap in the data region");
    }
}

const SafetensorInfo& SafetensorsFile::info(const std::string& name) const {
    auto it = tensors_.find(name);
    SWITCHYARD_CHECK(it != tensors_.end(), path_, ": tensor '", name, "' not found");
    SWITCHYARD_CHECK(it->second.dtype_ok, path_, ": tensor '", name, "' has unsupported dtype ", it->second.dtype_str,
                     " (supported: F32, BF16, F16, I32, I64)");
    return it->second;
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

std::vector<uint8_t> encode_safetensors(const std::vector<SafetensorToWrite>& tensors,
                                        const std::map<std::string, std::string>& metadata) {
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
        uint64_t numel = 1;
        for (int64_t d : t.shape) {
            SWITCHYARD_CHECK(d >= 0, "tensor '", t.name, "' has a negative dimension");
            numel *= static_cast<uint64_t>(d);
        }
        uint64_t nbytes = numel * dtype_size(t.dtype);
        SWITCHYARD_CHECK(t.data != nullptr || nbytes == 0, "tensor '", t.name, "' has no data");
        j[t.name] = {{"dtype", safetensors_dtype_name(t.dtype)},
                     {"shape", t.shape},
                     {"data_offsets", {offset, offset + nbytes}}};
        offset += nbytes;
    }
    std::string header = j.dump();
    header.append((8 - header.size() % 8) % 8, ' ');
    std::vector<uint8_t> out;
    out.reserve(8 + header.size() + offset);
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(n >> (8 * i)));
    out.insert(out.end(), header.begin(), header.end());
    for (const auto& t : tensors) {
        uint64_t numel = 1;
        for (int64_t d : t.shape) numel *= static_cast<uint64_t>(d);
        const uint8_t* p = static_cast<const uint8_t*>(t.data);
        if (numel) out.insert(out.end(), p, p + numel * dtype_size(t.dtype));
    }
    return out;
}

void write_safetensors(const std::string& path, const std::vector<SafetensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
    std::vector<uint8_t> bytes = encode_safetensors(tensors, metadata);
    write_file_atomic(path, [&](std::ostream& os) {
        os.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    });
}

}  // namespace io
}  // namespace switchyard
