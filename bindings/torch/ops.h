// bindings/torch/ops.h: the torch custom ops of Switchyard (namespace `switchyard`). The only place besides
// bindings/torch/*.cpp where torch headers appear; the binding includes only the public API (include/switchyard).
//
// Op set (schemas in ops.cpp). The MoE layer is split into stages so that every stage has a forward and a backward
// op, torch.library autograd glues them (python/switchyard/torch.py), and every output shape depends on input
// shapes only (T*k rows always; rows past offsets[E] are zero), so torch.compile(fullgraph=True) traces them and
// CUDA graphs capture them. Each op is one public stage function of switchyard/stages.h (or balance.h), called on
// the tensors' device: CPU tensors run the CPU backend (double arithmetic; fp64 tensors give exact double results,
// what gradcheck needs), CUDA tensors the CUDA kernels on torch's current stream, with outputs and workspaces from
// torch's caching allocator (no host synchronisation).
//   router_gemm (backward in torch.py)     x [T, H], gate [E, H] -> logits [T, E] fp32 (fp32 accumulation; on CUDA
//                                          cuBLAS on x's dtype: bf16 x runs on the tensor cores, not cast to fp32)
//   route / route_backward                 logits [T, E] -> topk_ids [T, k] int32, topk_weights [T, k]
//   router_losses / router_losses_backward logits, ids -> [2] = (Switch aux loss, z-loss)
//   plan                                   ids, weights -> offsets [E+1], slot_row [T, k], row_token [T*k], counts [E]
//   gather / gather_backward               x [T, H] -> xp [T*k, H] in expert order
//   grouped_mm (+ _backward, _dgrad, _wgrad) a [T*k, K], b [E, N, K] -> c [T*k, N]
//   grouped_mm_fp8 (inference, no backward) a [T*k, K], b [E, N, K] fp8 e4m3 + b_scale (+ input_scale) -> c [T*k, N]
//                                          grouped_gemm_fp8 (W8A8, the recipe in stages.h); mode 1 fp8-block,
//                                          2 fp8-tensor; autograd raises if anything needs a gradient through it
//   activation / activation_backward       g [R, 2F or F] -> h [R, F]
//   grouped_mm_dgrad_activation            dc [T*k, H], w2, g [T*k, 2F] -> dg [T*k, 2F], h [T*k, F]: GEMM2's dgrad,
//                                          the gated activation's backward and h recomputed, in one op
//   combine / combine_backward             out [T*k, H], slot_row, weights (+ shared [T, H]) -> y [T, H]
//   moe_fused (inference, no backward)     x, gate, w13, w2 (+ shared) -> y, logits, ids, counts: route_fused +
//                                          experts_fused, the small-batch path in four kernels on CUDA
//   moe_forward (inference, no backward)   x, gate, w13, w2 (+ shared, capacity, interleaved w13) -> y, logits, ids,
//                                          counts, offsets: MoELayer::forward (moe_layer.h), the staged chain in one
//                                          host call (the fused small-batch path off)
//   grouped_mm_gated / interleave_gate_up  GEMM1 with the gated activation in its epilogue; w13's interleaved layout
//   grouped_mm_gated_keep                  a, w13i -> h [R, F], g [R, 2F]: the same kernel storing GEMM1's product
//                                          too (the training forward, whose backward needs g)
//   fused_path_supported                   whether moe_fused's CUDA kernels take a layer (stages.h)
#pragma once

#include <ATen/ATen.h>

#include "switchyard/tensor.h"

namespace switchyard {
namespace torch_ops {

// The torch stream of a tensor's device (ops_cuda.cpp in CUDA builds; nullptr for CPU tensors).
cudaStream_t stream_of(const at::Tensor& t);

}  // namespace torch_ops
}  // namespace switchyard
