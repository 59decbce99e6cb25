// src/baseline/dense_common.h: what the CPU and CUDA dense baselines share (host-only, internal).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ref/ref.h"
#include "switchyard/baseline.h"

namespace switchyard {
namespace dense {

// After routing: records the capacity C, the drops and (optionally) the statistics in res, then sizes the whole arena
// for C into l. Returns false, with res refused by refuse(bytes, C) and its peak bytes kept, when the arena is over
// memory_limit_bytes.
template <typename Refuse>
bool record_routing(const MoEConfig& cfg, int64_t num_tokens, int64_t capacity, const ref::HostPlan& plan,
                    const std::vector<float>& logits, LoadStats* stats, size_t memory_limit_bytes, DenseResult& res,
                    DenseLayout& l, Refuse&& refuse) {
    res.routed = true;
    res.capacity = capacity;
    res.dropped = plan.dropped();
    if (stats != nullptr) ref::plan_stats(cfg, logits, plan, *stats);
    l = dense_layout(cfg, num_tokens, capacity);
    res.bytes_needed = l.total;
    if (l.total <= memory_limit_bytes) return true;
    const size_t held = res.peak_bytes;
    refuse(l.total, capacity);
    res.peak_bytes = held;
    return false;
}

}  // namespace dense
}  // namespace switchyard
