// src/util/workspace.h: carving a caller-owned workspace into aligned slices (host-only, no CUDA types).
//
// WorkspaceCarver hands out kWorkspaceAlign-aligned slices of one buffer in a fixed order; constructed with a null
// base it only counts bytes, so one function both sizes and partitions a workspace (the sizing pass and the real
// pass take the same slices). Used by the API layer (the forward's layout) and the CUDA backend (stage scratch).
#pragma once

#include <cstddef>
#include <cstdint>

#include "switchyard/error.h"

namespace switchyard {

constexpr size_t kWorkspaceAlign = 256;

inline size_t align_up(size_t v, size_t a = kWorkspaceAlign) { return (v + a - 1) / a * a; }

class WorkspaceCarver {
 public:
    explicit WorkspaceCarver(void* base = nullptr, size_t capacity = 0)
        : base_(static_cast<char*>(base)), capacity_(capacity) {}

    template <typename T>
    T* take(size_t count) {
        return static_cast<T*>(take_bytes(count * sizeof(T)));
    }
    void* take_bytes(size_t bytes) {
        const size_t at = used_;
        used_ += align_up(bytes);
        if (base_ == nullptr) return nullptr;
        SWITCHYARD_CHECK(used_ <= capacity_, "workspace_bytes=", capacity_, " is too small: need at least ", used_,
                         " bytes so far");
        return base_ + at;
    }
    size_t used() const { return used_; }
    bool sizing() const { return base_ == nullptr; }

 private:
    char* base_;
    size_t capacity_;
    size_t used_ = 0;
};

}  // namespace switchyard
