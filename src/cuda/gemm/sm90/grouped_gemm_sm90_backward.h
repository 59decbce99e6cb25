// src/cuda/gemm/sm90/grouped_gemm_sm90_backward.h: internal interface between the grouped GEMM gradient dispatcher
// (grouped_gemm_backward.cu) and the CUTLASS sm90 ptr-array instantiations of the two gradient layouts
// (grouped_gemm_sm90_{bf16,f16}_{dgrad,wgrad}.cu). Host-only header: no CUTLASS types here.
//
// Every instantiation implements one (dtype, layout) of grouped_gemm.h's gradient contract, as a grouped GEMM
// D_e[M, N] = sum_q A_e[M, q] * B_e[N, q] over per-group problem shapes (CUTLASS names):
//   dgrad: (M, N, K) = (rows_e, K, N);  A = dC_e [rows_e, N] row-major (K-major), B = B[e] [N, K] row-major read as
//          an N-major operand (CUTLASS RowMajor B), D = dA_e [rows_e, K] row-major.
//   wgrad: (M, N, K) = (N, K, rows_e);  A = dC_e^T (dC_e [rows_e, N] row-major is an M-major operand: CUTLASS
//          ColumnMajor A), B = A_e^T (A_e [rows_e, K] row-major is N-major: CUTLASS RowMajor B), D = dB[e] [N, K].
//          Groups with rows_e = 0 get M = 0 (no tiles: CUTLASS's mainloop leaves the accumulators unset when K = 0,
//          so such a group must not run); the dispatcher zeroes their dB[e] with a separate kernel.
// Workspace layout (caller's memory, 256-byte aligned pieces): the device arrays of grouped_gemm_sm90.h's layout
// (problem shapes, pointers, strides) then the CUTLASS workspace. A small kernel fills the arrays from the device
// offsets (no host synchronisation).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/gemm/grouped_gemm.h"
#include "cuda/gemm/sm90/grouped_gemm_sm90.h"

namespace switchyard {
namespace cuda {
namespace sm90 {

enum class GradLayout : int {
    kDgrad = 0,
    kWgrad = 1,
};

// wgrad's run does not zero the dB of empty groups (the dispatcher does).
using GradGemmOps = GemmOpsOf<GroupedGemmGradArgs>;

// One per translation unit: Cooperative 128x256x64 with the 2x1 cluster for both layouts, and for bf16 the dgrad
// without a cluster and with the 1x2 cluster (the forward's kCooperative128x256C1 / N2, for the same reason: dgrad's
// M is the expert's rows).
extern const GradGemmOps kBF16Dgrad;  // grouped_gemm_sm90_bf16_dgrad.cu
extern const GradGemmOps kBF16DgradN2;  // grouped_gemm_sm90_bf16_dgrad_n2.cu
extern const GradGemmOps kBF16DgradC1;  // grouped_gemm_sm90_bf16_dgrad_c1.cu
// kBF16DgradC1 with the other epilogues (GroupedGemmEpilogue): grouped_gemm_sm90_bf16_dgrad_c1_{e128,reg}.cu
extern const GradGemmOps kBF16DgradC1Epi128;
extern const GradGemmOps kBF16DgradC1Reg;
extern const GradGemmOps kF16Dgrad;   // grouped_gemm_sm90_f16_dgrad.cu
extern const GradGemmOps kBF16Wgrad;  // grouped_gemm_sm90_bf16_wgrad.cu
// kBF16Wgrad with the register store (GroupedGemmEpilogue::kRegisters): grouped_gemm_sm90_bf16_wgrad_reg.cu
extern const GradGemmOps kBF16WgradReg;
extern const GradGemmOps kF16Wgrad;   // grouped_gemm_sm90_f16_wgrad.cu

// The dgrad configurations of bf16 (fp16 has the 2x1 Cooperative one only).
enum class DgradConfig : int { kCluster2x1 = 0, kCluster1x2 = 1, kNoCluster = 2 };

// The no-cluster configuration with the epilogue given (resolved: not kAuto); the others have CUTLASS's only.
inline const GradGemmOps& dgrad_ops_for(DType dtype, DgradConfig config, GroupedGemmEpilogue epilogue) {
    if (dtype != DType::kBF16) return kF16Dgrad;
    switch (config) {
        case DgradConfig::kCluster1x2: return kBF16DgradN2;
        case DgradConfig::kNoCluster:
            return epilogue == GroupedGemmEpilogue::kRegisters ? kBF16DgradC1Reg
                   : epilogue == GroupedGemmEpilogue::kTma128  ? kBF16DgradC1Epi128
                                                               : kBF16DgradC1;
        default: return kBF16Dgrad;
    }
}

// The wgrad with the epilogue given (resolved: kTma32 or kRegisters).
inline const GradGemmOps& wgrad_ops_for(DType dtype, GroupedGemmEpilogue epilogue) {
    if (dtype != DType::kBF16) return kF16Wgrad;
    return epilogue == GroupedGemmEpilogue::kRegisters ? kBF16WgradReg : kBF16Wgrad;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
