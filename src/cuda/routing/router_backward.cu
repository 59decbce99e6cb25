// src/cuda/routing/router_backward.cu: the gradients of the router's gate GEMM (router.cu, router_gemm).
//
// Inputs:  x [T, H] and gate [E, H] of one dtype (fp32 / bf16 / fp16); d_logits [T, E] fp32.
// Outputs: dx [T, H] = d_logits . gate and dgate [E, H] = d_logits^T . x in the operands' dtype (either may be null):
//          each element an fp32 sum of the exact products of the fp32 d_logits and the operands, rounded once to the
//          dtype (what autograd takes through F.linear(x.float(), gate.float()), in another summation order).
// fp32:  two cuBLAS GEMMs in fp32 (no TF32), written straight to dx and dgate.
// bf16:  d_logits split into three bf16 parts hi = bf16(d), mid = bf16(d - hi), lo = bf16(d - hi - mid), which carry
//        all 24 significant bits of the fp32 value, so [hi | mid | lo] [T, 3E] times [gate; gate; gate] [3E, H]
//        (dx) and times x (dgate: the three parts' sums [3E, H], added in order) are the same fp32 products on the
//        tensor cores at the bf16 rate, without an fp32 copy of x. cuBLAS rounds dx's fp32 sums to bf16 as it
//        stores them (no [T, H] fp32 round trip), with CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION set for that
//        call, so that a split-K reduction runs in fp32 rather than in bf16: one rounding.
//        One kernel writes the split and the stacked gate, one adds and rounds dgate's parts: four launches in all,
//        from one host call. A non-finite d (or one past bf16's largest value) keeps its hi part only: its products
//        are then +-inf or NaN as fp32 ones would be, not a NaN from inf - inf.
// fp16:  fp16 parts would underflow (5 exponent bits), so x and gate are widened to fp32 in the workspace and the
//        GEMMs run in fp32 as for fp32 inputs.
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/cublas_util.h"
#include "cuda/dispatch.cuh"
#include "cuda/moe_stages.h"

namespace switchyard {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// i < T*E: d[i]'s three bf16 parts to split[t, e], split[t, E + e], split[t, 2E + e]; the next 3*E*H indices: gate3
// = [gate; gate; gate].
__global__ void split_logit_grads_kernel(const float* __restrict__ d, int64_t num_tokens, int64_t num_experts,
                                         const __nv_bfloat16* __restrict__ gate, int64_t gate_elems,
                                         __nv_bfloat16* __restrict__ split, __nv_bfloat16* __restrict__ gate3) {
    const int64_t n_split = num_tokens * num_experts, n = n_split + 3 * gate_elems;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        if (i < n_split) {
            const float v = d[i];
            const __nv_bfloat16 hi = __float2bfloat16_rn(v);
            float rest = v - __bfloat162float(hi);
            if (!isfinite(rest)) rest = 0.0f;  // v or hi is +-inf or NaN: hi carries it
            const __nv_bfloat16 mid = __float2bfloat16_rn(rest);
            const __nv_bfloat16 lo = __float2bfloat16_rn(rest - __bfloat162float(mid));
            const int64_t t = i / num_experts, e = i - t * num_experts;
            __nv_bfloat16* row = split + t * 3 * num_experts;
            row[e] = hi;
            row[num_experts + e] = mid;
            row[2 * num_experts + e] = lo;
        } else {
            const int64_t j = i - n_split;
            gate3[j] = gate[j % gate_elems];
        }
    }
}

template <typename T>
__global__ void widen_kernel(const T* __restrict__ a, int64_t na, float* __restrict__ a32, const T* __restrict__ b,
                             int64_t nb, float* __restrict__ b32) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < na + nb;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        if (i < na) a32[i] = to_f32(a[i]);
        else b32[i - na] = to_f32(b[i - na]);
    }
}

// out[i] = T(((parts[0][i] + parts[1][i]) + ...)) for i < n (n_parts parts of n elements each; one part: a rounding).
template <typename T>
__global__ void add_router_grad_parts_kernel(const float* __restrict__ parts, int n_parts, int64_t n,
                                             T* __restrict__ out) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        float s = parts[i];
        for (int p = 1; p < n_parts; ++p) s += parts[p * n + i];
        out[i] = from_f32<T>(s);
    }
}

// The workspace's pieces after the cuBLAS workspace (sizes only when base is null).
struct BackwardScratch {
    void* cublas = nullptr;
    void* a = nullptr;      // bf16: split [T, 3E] bf16; fp16: x32 [T, H]
    void* b = nullptr;      // bf16: gate3 [3E, H] bf16; fp16: gate32 [E, H]
    float* dx32 = nullptr;  // fp16: [T, H] (bf16: dx is stored by the GEMM)
    float* dg32 = nullptr;  // bf16: parts [3E, H]; fp16: [E, H]
    size_t bytes = 0;
};

BackwardScratch carve(DType dtype, int64_t T, int64_t E, int64_t H, void* base, size_t capacity) {
    BackwardScratch s;
    WorkspaceCarver c(base, capacity);
    s.cublas = c.take_bytes(kCublasWorkspaceBytes);
    if (dtype == DType::kBF16) {
        s.a = c.take<__nv_bfloat16>(static_cast<size_t>(T * 3 * E));
        s.b = c.take<__nv_bfloat16>(static_cast<size_t>(3 * E * H));
        s.dg32 = c.take<float>(static_cast<size_t>(3 * E * H));
    } else if (dtype == DType::kF16) {
        s.a = c.take<float>(static_cast<size_t>(T * H));
        s.b = c.take<float>(static_cast<size_t>(E * H));
        s.dx32 = c.take<float>(static_cast<size_t>(T * H));
        s.dg32 = c.take<float>(static_cast<size_t>(E * H));
    }
    s.bytes = c.used();
    return s;
}

// C = A . op(B) in cuBLAS's column-major terms, fp32 accumulation (no TF32), C stored as c_type.
void gemm(cublasHandle_t h, cublasOperation_t op_b, int m, int n, int k, const void* a, int lda, const void* b,
          int ldb, cudaDataType_t t, void* c, cudaDataType_t c_type, int ldc) {
    const float alpha = 1.0f, beta = 0.0f;
    SWITCHYARD_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, op_b, m, n, k, &alpha, a, t, lda, b, t, ldb, &beta, c, c_type,
                                         ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

size_t router_gemm_backward_workspace_size(DType dtype, int64_t num_tokens, int64_t num_experts, int64_t hidden) {
    return carve(dtype, num_tokens, num_experts, hidden, nullptr, 0).bytes;
}

void router_gemm_backward(DType dtype, const void* x, const void* gate, const float* d_logits, int64_t num_tokens,
                          int64_t hidden, int64_t num_experts, void* dx, void* dgate, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream) {
    if (dx == nullptr && dgate == nullptr) return;
    const int64_t T = num_tokens, H = hidden, E = num_experts;
    SWITCHYARD_CHECK(T <= INT32_MAX && H <= INT32_MAX && 3 * E <= INT32_MAX,
                     "router_gemm_backward: num_tokens=", T, " hidden_size=", H, " num_experts=", E,
                     " exceed int32");
    const BackwardScratch s = carve(dtype, T, E, H, workspace, workspace_bytes);
    if (T == 0 || H == 0) {  // dx is empty; dgate is a sum of nothing (or empty)
        if (dgate != nullptr && E * H > 0) {
            SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(dgate, 0, static_cast<size_t>(E * H) * dtype_size(dtype), stream));
        }
        return;
    }
    const CublasLease cublas(stream);  // this device's handle, locked, on `stream`
    SWITCHYARD_CUBLAS_CHECK(cublasSetWorkspace(cublas.handle(), s.cublas, kCublasWorkspaceBytes));
    const int t = static_cast<int>(T), h = static_cast<int>(H), e = static_cast<int>(E);
    // Column-major views of the row-major tensors: dx^T [H, T] = gate^T [H, E] . d^T [E, T] and dgate^T [H, E] =
    // x^T [H, T] . d [T, E] (the row-major d read transposed).
    if (dtype == DType::kF32) {
        if (dx != nullptr) {
            gemm(cublas.handle(), CUBLAS_OP_N, h, t, e, gate, h, d_logits, e, CUDA_R_32F, dx, CUDA_R_32F, h);
        }
        if (dgate != nullptr) {
            gemm(cublas.handle(), CUBLAS_OP_T, h, e, t, x, h, d_logits, e, CUDA_R_32F, dgate, CUDA_R_32F, h);
        }
        return;
    }
    int n_parts = 1, k_dx = e;
    cudaDataType_t op_type = CUDA_R_32F;
    const void *a_dx = s.b, *b_dx = d_logits, *a_dg = s.a, *b_dg = d_logits;
    int ld_d = e;
    if (dtype == DType::kBF16) {
        const int64_t n = T * E + 3 * E * H;
        split_logit_grads_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(
            d_logits, T, E, static_cast<const __nv_bfloat16*>(gate), E * H, static_cast<__nv_bfloat16*>(s.a),
            static_cast<__nv_bfloat16*>(s.b));
        SWITCHYARD_CUDA_CHECK_LAUNCH();
        n_parts = 3;
        k_dx = 3 * e;
        op_type = CUDA_R_16BF;
        a_dx = s.b;  // gate3 [3E, H]
        b_dx = s.a;  // split [T, 3E]
        a_dg = x;
        b_dg = s.a;
        ld_d = 3 * e;
    } else {
        SWITCHYARD_CHECK(dtype == DType::kF16, "router_gemm_backward: dtype=", to_string(dtype),
                         " is not supported (fp32, bf16, fp16)");
        widen_kernel<__half><<<grid_for(T * H + E * H, kThreads), kThreads, 0, stream>>>(
            static_cast<const __half*>(x), dgate != nullptr ? T * H : 0, static_cast<float*>(s.a),
            static_cast<const __half*>(gate), E * H, static_cast<float*>(s.b));
        SWITCHYARD_CUDA_CHECK_LAUNCH();
    }
    // bf16: dx stored by the GEMM from its fp32 sums; fp16: dx32 in fp32, rounded below. dgate's n_parts sums
    // [n_parts * E, H] in fp32, then added and rounded in one pass.
    const cudaDataType_t out_type = cuda_data_type(dtype, "router_gemm_backward");
    if (dx != nullptr) {
        const bool direct = dtype == DType::kBF16;
        // A bf16 output: reductions (split-K) in fp32, as the one rounding needs; the handle's default mode is put
        // back when the call returns or throws.
        struct DefaultMathOnExit {
            cublasHandle_t h;
            ~DefaultMathOnExit() { cublasSetMathMode(h, CUBLAS_DEFAULT_MATH); }
        } restore{cublas.handle()};
        if (direct) {
            SWITCHYARD_CUBLAS_CHECK(cublasSetMathMode(
                cublas.handle(), static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH |
                                                           CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
        }
        gemm(cublas.handle(), CUBLAS_OP_N, h, t, k_dx, a_dx, h, b_dx, ld_d, op_type, direct ? dx : s.dx32,
             direct ? out_type : CUDA_R_32F, h);
        if (!direct) {  // fp16: one part, i.e. dx32 rounded
            add_router_grad_parts_kernel<__half><<<grid_for(T * H, kThreads), kThreads, 0, stream>>>(
                s.dx32, 1, T * H, static_cast<__half*>(dx));
            SWITCHYARD_CUDA_CHECK_LAUNCH();
        }
    }
    if (dgate != nullptr) {
        gemm(cublas.handle(), CUBLAS_OP_T, h, n_parts * e, t, a_dg, h, b_dg, ld_d, op_type, s.dg32, CUDA_R_32F, h);
        dispatch_float_dtype(dtype, "router_gemm_backward", [&](auto tag) {
            using T16 = typename decltype(tag)::type;
            add_router_grad_parts_kernel<T16><<<grid_for(E * H, kThreads), kThreads, 0, stream>>>(
                s.dg32, n_parts, E * H, static_cast<T16*>(dgate));
            SWITCHYARD_CUDA_CHECK_LAUNCH();
        });
    }
}

}  // namespace cuda
}  // namespace switchyard
