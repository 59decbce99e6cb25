// src/api/balance.cpp: the validating front of switchyard/balance.h (bias update, router losses).
//
// CPU tensors go to the reference (src/ref/balance.cpp), CUDA tensors to src/cuda/routing/balance.cu (only in a build with
// SWITCHYARD_WITH_CUDA). Shapes, dtypes, devices and contiguity are checked here; the backends see checked input.
#include "switchyard/balance.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "api/check.h"
#include "ref/backward.h"
#include "ref/ref.h"
#include "switchyard/error.h"

#ifdef SWITCHYARD_WITH_CUDA
#include "cuda/routing/balance.h"
#endif

namespace switchyard {
namespace {

// [n] (n < 0: any length) of dtype, contiguous.
void check_vector(const TensorRef& t, DType dtype, int64_t n, const char* name) {
    api::check_tensor(t, name, dtype, {n < 0 ? api::kAny : n});
}

// [d0, d1] (d0 < 0: any) of dtype on dev.
void check_matrix(const TensorRef& t, DType dtype, int64_t d0, int64_t d1, const char* name, Device dev) {
    api::check_tensor(t, name, dtype, {d0 < 0 ? api::kAny : d0, d1});
    SWITCHYARD_CHECK(t.device == dev, name, " is on ", to_string(t.device), ", expected ", to_string(dev));
}

void check_rate(double rate) {
    SWITCHYARD_CHECK(std::isfinite(rate) && rate >= 0.0, "update_score_bias: rate=", rate, " must be finite and >= 0");
}

}  // namespace

void update_score_bias(double rate, const TensorRef& expert_counts, const TensorRef& score_bias, cudaStream_t stream) {
    check_rate(rate);
    check_vector(score_bias, DType::kF32, -1, "score_bias");
    const int64_t E = score_bias.shape[0];
    check_vector(expert_counts, DType::kI32, E, "expert_counts");
    SWITCHYARD_CHECK(expert_counts.device == score_bias.device && expert_counts.device_index == score_bias.device_index,
                     "expert_counts is on ", to_string(expert_counts.device), ":", expert_counts.device_index,
                     " but score_bias on ", to_string(score_bias.device), ":", score_bias.device_index);
    if (score_bias.device == Device::kCPU) {
        const int32_t* c = expert_counts.ptr<int32_t>();
        std::vector<int64_t> counts(c, c + E);
        ref::update_score_bias(rate, counts.data(), E, score_bias.ptr<float>());
        return;
    }
#ifdef SWITCHYARD_WITH_CUDA
    cuda::update_score_bias(rate, expert_counts.ptr<int32_t>(), E, score_bias.ptr<float>(), stream);
#else
    (void)stream;
    SWITCHYARD_FAIL("score_bias is on ", to_string(score_bias.device), " but this build has no CUDA backend");
#endif
}

void update_score_bias(double rate, const LoadStats& stats, const TensorRef& score_bias, cudaStream_t stream) {
    check_rate(rate);
    check_vector(score_bias, DType::kF32, -1, "score_bias");
    const int64_t E = score_bias.shape[0];
    SWITCHYARD_CHECK(static_cast<int64_t>(stats.expert_counts.size()) == E, "stats.expert_counts has ",
                     stats.expert_counts.size(), " entries, expected E=", E, " (the size of score_bias)");
    for (int64_t e = 0; e < E; ++e)
        SWITCHYARD_CHECK(stats.expert_counts[e] >= 0, "stats.expert_counts[", e, "]=", stats.expert_counts[e],
                         " is negative");
    if (score_bias.device == Device::kCPU) {
        ref::update_score_bias(rate, stats.expert_counts.data(), E, score_bias.ptr<float>());
        return;
    }
#ifdef SWITCHYARD_WITH_CUDA
    SWITCHYARD_CHECK(E <= cuda::kMaxBiasExperts, "update_score_bias from host stats: E=", E, " exceeds ",
                     cuda::kMaxBiasExperts, " (pass the device expert_counts instead)");
    cuda::update_score_bias_host_counts(rate, stats.expert_counts.data(), E, score_bias.ptr<float>(), stream);
#else
    (void)stream;
    SWITCHYARD_FAIL("score_bias is on ", to_string(score_bias.device), " but this build has no CUDA backend");
#endif
}

size_t router_losses_workspace_size(const MoEConfig& cfg, Device device, int64_t num_tokens, int64_t num_seqs) {
    SWITCHYARD_CHECK(num_tokens >= 0 && num_seqs >= 0, "router_losses_workspace_size: num_tokens=", num_tokens,
                     " num_seqs=", num_seqs);
    if (device == Device::kCPU) return 0;
#ifdef SWITCHYARD_WITH_CUDA
    return cuda::router_losses_workspace_size(num_tokens, cfg.num_experts, num_seqs);
#else
    (void)cfg;
    SWITCHYARD_FAIL("device=", to_string(device), ": built without CUDA");
#endif
}

void router_losses(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids, const TensorRef& seq_lens,
                   const TensorRef& losses, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    cfg.validate();
    SWITCHYARD_CHECK(!cfg.expert_choice(),
                     "router_losses: the aux losses are defined for token-choice routing (routing=expert-choice "
                     "balances by construction)");
    SWITCHYARD_CHECK(logits.defined(), "logits is required but undefined");
    const Device dev = logits.device;
    // fp32 logits; on the CPU fp64 too (exact double losses, for gradient checks), with losses of the same dtype.
    const DType ldt = (dev == Device::kCPU && logits.dtype == DType::kF64) ? DType::kF64 : DType::kF32;
    check_matrix(logits, ldt, -1, cfg.num_experts, "logits", dev);
    const int64_t T = logits.shape[0];
    check_matrix(topk_ids, DType::kI32, T, cfg.top_k, "topk_ids", dev);
    check_vector(losses, ldt, kNumLosses, "losses");
    SWITCHYARD_CHECK(losses.device == dev, "losses is on ", to_string(losses.device), ", expected ", to_string(dev));
    int64_t S = 1;
    if (seq_lens.defined()) {
        check_vector(seq_lens, DType::kI32, -1, "seq_lens");
        SWITCHYARD_CHECK(seq_lens.device == dev, "seq_lens is on ", to_string(seq_lens.device), ", expected ",
                         to_string(dev));
        S = seq_lens.shape[0];
    }
    if (dev == Device::kCPU) {
        const std::vector<float> l = ref::to_float(logits);
        const std::vector<int32_t> ids(topk_ids.ptr<int32_t>(), topk_ids.ptr<int32_t>() + T * cfg.top_k);
        std::vector<int64_t> lens(1, T);
        if (seq_lens.defined()) lens.assign(seq_lens.ptr<int32_t>(), seq_lens.ptr<int32_t>() + S);
        const double seq = ref::sequence_aux_loss(cfg, l, ids, T, lens);
        if (ldt == DType::kF64) {  // exact double losses from the double logits
            const std::vector<double> l64 = ref::to_double(logits);
            double* out = losses.ptr<double>();
            ref::router_losses(cfg, l64.data(), ids.data(), T, &out[kLossAux], &out[kLossZ]);
            out[kLossSeqAux] = seq;
            return;
        }
        LoadStats st;
        ref::router_stats(cfg, l, ids, T, st);
        float* out = losses.ptr<float>();
        out[kLossAux] = static_cast<float>(st.aux_loss);
        out[kLossZ] = static_cast<float>(st.z_loss);
        out[kLossSeqAux] = static_cast<float>(seq);
        return;
    }
#ifdef SWITCHYARD_WITH_CUDA
    const size_t need = cuda::router_losses_workspace_size(T, cfg.num_experts, S);
    SWITCHYARD_CHECK(workspace != nullptr || need == 0, "router_losses: workspace is null, ", need, " bytes needed");
    SWITCHYARD_CHECK(workspace_bytes >= need, "router_losses: workspace_bytes=", workspace_bytes, " is less than the ",
                     need, " bytes needed");
    cuda::router_losses(cfg, logits.ptr<float>(), topk_ids.ptr<int32_t>(), T,
                        seq_lens.defined() ? seq_lens.ptr<int32_t>() : nullptr, S, losses.ptr<float>(), nullptr,
                        workspace, workspace_bytes, stream);
#else
    (void)workspace;
    (void)workspace_bytes;
    (void)stream;
    SWITCHYARD_FAIL("logits are on ", to_string(dev), " but this build has no CUDA backend");
#endif
}

}  // namespace switchyard
