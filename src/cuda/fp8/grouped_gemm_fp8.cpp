// src/cuda/fp8/grouped_gemm_fp8.cpp: the entry points of the FP8 grouped GEMM (grouped_gemm.h, "FP8 grouped GEMM with
// blockwise scales"): validation, workspace sizing and the choice of the CUTLASS instantiation by output dtype
// (src/cuda/gemm/sm90/grouped_gemm_fp8_sm90_*.cu). Host code only.
#include <algorithm>
#include <climits>

#include "cuda/gemm/grouped_gemm.h"
#include "cuda/gemm/sm90/grouped_gemm_fp8_sm90.h"
#include "switchyard/error.h"

namespace switchyard {
namespace cuda {

void check_fp8_gemm_sizes(const char* what, DType out_dtype, int64_t num_groups, int64_t n, int64_t k,
                          int64_t max_rows) {
    SWITCHYARD_CHECK(out_dtype == DType::kF32 || is_16bit(out_dtype), what, ": output dtype=", to_string(out_dtype),
                     " is not supported (fp32, bf16, fp16)");
    SWITCHYARD_CHECK(num_groups >= 1 && num_groups <= INT_MAX, what, ": num_groups=", num_groups,
                     " must be in [1, 2^31)");
    SWITCHYARD_CHECK(n >= 1 && n <= INT_MAX, what, ": n=", n, " must be in [1, 2^31)");
    SWITCHYARD_CHECK(k >= 1 && k <= INT_MAX, what, ": k=", k, " must be in [1, 2^31)");
    SWITCHYARD_CHECK(max_rows >= 0 && max_rows <= INT_MAX, what, ": max_rows=", max_rows, " must be in [0, 2^31)");
    SWITCHYARD_CHECK(k % 16 == 0, what, ": k=", k,
                     " must be a multiple of 16 on CUDA (16-byte TMA rows of the fp8 operands; the CPU backend takes "
                     "any k)");
    const int64_t n_align = 16 / static_cast<int64_t>(dtype_size(out_dtype));
    SWITCHYARD_CHECK(n % n_align == 0, what, ": n=", n, " must be a multiple of ", n_align, " for ",
                     to_string(out_dtype), " output on CUDA (16-byte TMA rows; the CPU backend takes any n)");
}

size_t grouped_gemm_fp8_workspace_size(int64_t num_groups) {
    SWITCHYARD_CHECK(num_groups >= 1 && num_groups <= INT_MAX, "grouped_gemm_fp8_workspace_size: num_groups=",
                     num_groups, " must be in [1, 2^31)");
    const int sm_count = device_facts().sm_count;
    size_t bytes = 0;
    for (DType t : {DType::kBF16, DType::kF16, DType::kF32})
        bytes = std::max(bytes, sm90::fp8_ops_for(t).workspace_size(num_groups, sm_count));
    return bytes;
}

const char* grouped_gemm_fp8_kernel_name(DType out_dtype) { return sm90::fp8_ops_for(out_dtype).name; }

void grouped_gemm_fp8(const Fp8GroupedGemmArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    check_fp8_gemm_sizes("grouped_gemm_fp8", args.out_dtype, args.num_groups, args.n, args.k, args.max_rows);
    SWITCHYARD_CHECK(args.offsets != nullptr, "grouped_gemm_fp8: offsets is null");
    SWITCHYARD_CHECK(args.b != nullptr && args.sfb != nullptr, "grouped_gemm_fp8: b or its scales are null");
    if (args.max_rows == 0) return;  // offsets[E] <= max_rows: no rows, nothing to compute
    SWITCHYARD_CHECK(args.qa != nullptr && args.sfa != nullptr && args.d != nullptr,
                     "grouped_gemm_fp8: qa, sfa or d is null with max_rows=", args.max_rows);
    // check_16bit_call's device and workspace checks (sm_90, size, 16-byte aligned workspace) hold for FP8 too.
    const DeviceFacts facts = check_16bit_call("grouped_gemm_fp8", args.out_dtype, workspace, workspace_bytes,
                                               grouped_gemm_fp8_workspace_size(args.num_groups));
    SWITCHYARD_CHECK(aligned16(args.qa) && aligned16(args.b) && aligned16(args.d),
                     "grouped_gemm_fp8: qa, b and d must be 16-byte aligned for TMA (qa=", args.qa, ", b=", args.b,
                     ", d=", args.d, ")");
    sm90::fp8_ops_for(args.out_dtype).run(args, workspace, workspace_bytes, facts.sm_count, stream);
}

}  // namespace cuda
}  // namespace switchyard
