// tools/switchyard/host_routing.h: one token-choice routing on the CPU through the public stages (stages.h), with
// host vectors for every array (header-only: the CLI and the tests both use it).
//
//   route(logits, bias)  switchyard::route: topk_ids [T, k] int32, topk_weights [T, k] fp32 from logits [T, E] fp32
//                        (bias [E] fp32 used when cfg.use_score_bias, else ignored)
//   build_plan()         switchyard::build_plan with cfg's capacity and drop policy: counts, offsets, row maps
//   load_stats(logits)   switchyard::load_stats of that routing (counts, kept, dropped, cv, entropy, aux, z)
// `switchyard balance`, the profile's utilisation rows and the CPU router timings all route through this.
#pragma once

#include <cstdint>
#include <vector>

#include "switchyard/config.h"
#include "switchyard/routing.h"
#include "switchyard/stages.h"
#include "switchyard/tensor.h"

namespace switchyard {
namespace cli {

class HostRouting {
 public:
    HostRouting(const MoEConfig& cfg, int64_t num_tokens)
        : cfg_(cfg),
          T_(num_tokens),
          ids_(static_cast<size_t>(num_tokens * cfg.top_k)),
          weights_(ids_.size()),
          counts_(static_cast<size_t>(cfg.num_experts)),
          offsets_(static_cast<size_t>(cfg.num_experts + 1)),
          slot_row_(ids_.size()),
          row_token_(ids_.size()),
          row_slot_(ids_.size()) {}

    const MoEConfig& config() const { return cfg_; }
    MoEConfig& config() { return cfg_; }
    int64_t num_tokens() const { return T_; }

    void route(const std::vector<float>& logits, std::vector<float>* bias = nullptr) {
        TensorRef b;
        if (cfg_.use_score_bias) b = TensorRef(bias->data(), DType::kF32, {cfg_.num_experts});
        switchyard::route(cfg_, logits_ref(logits), b, ids_ref(), weights_ref());
    }
    void build_plan() { switchyard::build_plan(cfg_, ids_ref(), weights_ref(), plan(), nullptr, 0); }
    LoadStats load_stats(const std::vector<float>& logits) {
        LoadStats st;
        switchyard::load_stats(cfg_, logits_ref(logits), ids_ref(), plan(), st, nullptr, 0);
        return st;
    }

    const std::vector<int32_t>& topk_ids() const { return ids_; }
    const std::vector<float>& topk_weights() const { return weights_; }
    const std::vector<int32_t>& expert_counts() const { return counts_; }
    const std::vector<int32_t>& expert_offsets() const { return offsets_; }
    const std::vector<int32_t>& slot_row() const { return slot_row_; }
    // Bytes of logits, ids, weights and the plan's arrays.
    size_t bytes() const {
        return 4 * static_cast<size_t>(T_ * cfg_.num_experts) +
               4 * (ids_.size() + weights_.size() + counts_.size() + offsets_.size() + 3 * slot_row_.size());
    }

    RoutingPlan plan() {
        const int64_t E = cfg_.num_experts, n = T_ * cfg_.top_k;
        RoutingPlan p;
        p.expert_counts = TensorRef(counts_.data(), DType::kI32, {E});
        p.expert_offsets = TensorRef(offsets_.data(), DType::kI32, {E + 1});
        p.slot_row = TensorRef(slot_row_.data(), DType::kI32, {T_, cfg_.top_k});
        p.row_token = TensorRef(row_token_.data(), DType::kI32, {n});
        p.row_slot = TensorRef(row_slot_.data(), DType::kI32, {n});
        return p;
    }

 private:
    TensorRef logits_ref(const std::vector<float>& l) const {
        return TensorRef(const_cast<float*>(l.data()), DType::kF32, {T_, cfg_.num_experts});
    }
    TensorRef ids_ref() { return TensorRef(ids_.data(), DType::kI32, {T_, cfg_.top_k}); }
    TensorRef weights_ref() { return TensorRef(weights_.data(), DType::kF32, {T_, cfg_.top_k}); }

    MoEConfig cfg_;
    int64_t T_;
    std::vector<int32_t> ids_;
    std::vector<float> weights_;
    std::vector<int32_t> counts_, offsets_, slot_row_, row_token_, row_slot_;
};

}  // namespace cli
}  // namespace switchyard
