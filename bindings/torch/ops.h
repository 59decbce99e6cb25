// bindings/torch/ops.h: the torch custom ops of Switchyard (namespace `switchyard`), shared by the CPU and CUDA
// implementation files of the binding. The only place besides bindings/torch/*.cpp where torch headers appear.
//
// Op set (schemas in ops.cpp). The MoE layer is split into stages so that every stage has a forward and a backward
// op, torch.library autograd glues them (python/switchyard/torch.py), and every output shape depends on input
// shapes only (T*k rows always; rows past offsets[E] are zero), so torch.compile(fullgraph=True) traces them and
// CUDA graphs capture them:
//   route / route_backward                 logits [T, E] -> topk_ids [T, k] int32, topk_weights [T, k]
//   router_losses / router_losses_backward logits, ids -> [2] = (Switch aux loss, z-loss)
//   plan                                   ids, weights -> offsets [E+1], slot_row [T, k], row_token [T*k], counts [E]
//   gather / gather_backward               x [T, H] -> xp [T*k, H] in expert order
//   grouped_mm / grouped_mm_backward       a [T*k, K], b [E, N, K] -> c [T*k, N]
//   activation / activation_backward       g [R, 2F or F] -> h [R, F]
//   combine / combine_backward             out [T*k, H], slot_row, weights (+ shared [T, H]) -> y [T, H]
// CPU tensors run the CPU reference (src/ref, double accumulation); CUDA tensors run the CUDA kernels (src/cuda).
#pragma once

#include <torch/library.h>

#include "switchyard/config.h"

namespace switchyard {
namespace torch_ops {

// Router configuration from op arguments (sizes that only the router needs).
MoEConfig router_config(int64_t num_experts, int64_t top_k, int64_t score_function, bool renormalize,
                        double routed_scale, int64_t num_groups, int64_t topk_groups, bool use_bias);

}  // namespace torch_ops
}  // namespace switchyard
