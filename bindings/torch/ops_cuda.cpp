// bindings/torch/ops_cuda.cpp: the CUDA part of the binding (built when the library has its CUDA backend): the
// stream the ops enqueue on is torch's current stream of the tensor's device. The ops themselves (ops.cpp) are the
// same for CPU and CUDA tensors: the public stage functions dispatch on the tensors' device.
#include <ATen/cuda/CUDAContext.h>

#include "ops.h"

namespace switchyard {
namespace torch_ops {

cudaStream_t stream_of(const at::Tensor& t) {
    if (!t.is_cuda()) return nullptr;
    return at::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

}  // namespace torch_ops
}  // namespace switchyard
