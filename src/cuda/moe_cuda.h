// src/cuda/moe_cuda.h: the CUDA backend's entry points as the API layer (src/api) calls them.
// Host-only header (no CUDA types beyond cudaStream_t, declared in switchyard/tensor.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include "switchyard/moe_layer.h"
#include "switchyard/routing.h"

namespace switchyard {
namespace cuda {

int device_count();

// Workspace bytes for a forward of num_tokens tokens.
size_t moe_workspace_size(const MoEConfig& cfg, int64_t num_tokens);
// The whole layer. Arguments already validated by the API layer (shapes, dtypes, devices).
void moe_forward(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, const TensorRef& y,
                 void* workspace, size_t workspace_bytes, cudaStream_t stream, ForwardOutputs* out);

size_t router_workspace_size(const MoEConfig& cfg, int64_t num_tokens);
void router_forward(const MoEConfig& cfg, const TensorRef& gate, const TensorRef& bias, const TensorRef& x,
                    const TensorRef& topk_ids, const TensorRef& topk_weights, const TensorRef& logits,
                    void* workspace, size_t workspace_bytes, cudaStream_t stream, LoadStats* stats);

}  // namespace cuda
}  // namespace switchyard
