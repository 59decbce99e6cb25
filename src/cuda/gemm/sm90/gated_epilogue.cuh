// src/cuda/gemm/sm90/gated_epilogue.cuh: CUTLASS sm90 ptr-array epilogues that apply the gated activation of the
// expert MLP in registers:
//   GatedEpilogueArray           GEMM1's accumulators -> h = act(gate) * up, so that GEMM1's [rows, 2F] output is
//                                never written to memory (the activation kernel and half of GEMM1's stores go away);
//   DgradActivationEpilogueArray GEMM2's input gradient dh -> the activation's backward dg and the recomputed h
//                                (the backward's two activation passes go away: described at the class).
// Below, the layout contract of GatedEpilogueArray.
//
// Layout contract. B (w13) holds the gate and up rows interleaved in blocks of 8 (grouped_gemm.h,
// interleave_gate_up): output column n of the GEMM (a row of B) is a gate column when (n / 8) is even and the up
// column of the same f when odd, with f = (n / 16) * 8 + n % 8. The sm90 GMMA accumulator fragment of a thread is
// ((2, 2, V), MMA_M, MMA_N): value (c, r, v) sits at column 8 v + 2 (lane % 4) + c and row 8 r of the thread's
// rows. Blocks of 8 therefore put gate f (chunk 2v) and up f (chunk 2v + 1) into the same thread, four values
// apart, with c = 0 and 1 two adjacent f: each thread stores two adjacent h values (4 bytes) per pair of chunks.
//
// Rounding: gate and up are rounded to the output type before the activation, exactly as grouped_gemm followed by
// the activation kernel round them (D = 1.0 * acc stored, then act(gate) * up in fp32 with act_fn.cuh's 16-bit
// formulas, rounded once): the fused and the unfused paths produce the same values. Stores go straight from registers to global memory (no shared-memory
// staging): the output is half of what the plain epilogue would store, and the mainloop keeps the epilogue's shared
// memory for one more pipeline stage.
//
// The class implements the operator-style epilogue interface that CUTLASS's Sm90TmaWarpSpecializedAdapter wraps for
// the warp-specialized ptr-array kernels (the interface of cutlass/epilogue/collective/default_epilogue_array.hpp).
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/detail.hpp>
#include <cutlass/epilogue/dispatch_policy.hpp>

#include "cuda/experts/act_fn.cuh"

namespace switchyard {
namespace cuda {
namespace sm90 {

// What the register epilogues here share: the operator-style interface (types, arguments = params, no workspace, no
// source operand, no shared memory) that Sm90TmaWarpSpecializedAdapter wraps. Args: the derived class's arguments.
template <typename ElementD_, typename Args>
class RegisterEpilogueBase {
public:
    using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
    using DispatchPolicy = EpilogueSchedule;
    using ElementOutput = ElementD_;
    using ElementAccumulator = float;
    using ElementCompute = float;
    using ElementScalar = float;
    using ElementC = void;  // no source operand
    using ElementD = ElementD_;
    using InternalStrideC = cute::Stride<int64_t, cute::Int<1>, cute::Int<0>>;
    using StrideC = InternalStrideC*;
    using InternalStrideD = InternalStrideC;  // per-group row-major strides of the output
    using StrideD = InternalStrideD*;
    using GmemElementC = ElementD;
    using GmemTiledCopyC = void;
    using GmemTiledCopyD = void;

    // GemmUniversalAdapter names the epilogue's thread operator (a type only; the derived class applies its own).
    struct ThreadEpilogueOp {
        using ElementOutput = ElementD_;
        using ElementAccumulator = float;
        using ElementCompute = float;
    };

    struct SharedStorage {};
    using TensorMapStorage = SharedStorage;
    using Arguments = Args;
    using Params = Args;

    template <class ProblemShape>
    static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
        return args;
    }
    template <class ProblemShape>
    static size_t get_workspace_size(ProblemShape const&, Arguments const&, int) {
        return 0;
    }
    template <class ProblemShape>
    static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                                cutlass::CudaHostAdapter* = nullptr) {
        return cutlass::Status::kSuccess;
    }
    template <class ProblemShape>
    static bool can_implement(ProblemShape const&, Arguments const& args) {
        return is_gated(static_cast<Activation>(args.activation));
    }

    CUTLASS_HOST_DEVICE explicit RegisterEpilogueBase(Params const& p) : params_(p) {}

    CUTLASS_DEVICE bool is_source_needed() { return false; }

protected:
    // Checks the GMMA accumulator layout ((2, 2, V), MMA_M, MMA_N) the register epilogues rely on (value (c, r, v) at
    // column 8 v + 2 (lane % 4) + c, row 8 r of the thread's rows) and returns each accumulator's (row, column) in
    // the group's [M, N] problem, partitioned as the accumulators are.
    template <class FrgLayout, class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class TiledMma>
    CUTLASS_DEVICE static auto accumulator_coords(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                                  BlockCoordMNKL blk_coord_mnkl, TiledMma tiled_mma, int thread_idx) {
        using namespace cute;
        static_assert(is_static<FrgLayout>::value, "the accumulator layout must be static");
        static_assert(rank<0>(FrgLayout{}) == 3, "expected the GMMA accumulator value mode (2, 2, V)");
        static_assert(size<0, 0>(FrgLayout{}) == 2 && size<0, 1>(FrgLayout{}) == 2,
                      "expected the GMMA accumulator value mode (2, 2, V)");
        const int M = static_cast<int>(get<0>(problem_shape_mnkl));
        const int N = static_cast<int>(get<1>(problem_shape_mnkl));
        auto thr_mma = tiled_mma.get_thread_slice(thread_idx);
        Tensor tile_crd = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape_mnk),
                                     make_coord(get<0>(blk_coord_mnkl), get<1>(blk_coord_mnkl)));
        return thr_mma.partition_C(tile_crd);  // ((2, 2, V), MMA_M, MMA_N) -> (m, n)
    }

    Params params_;
};

template <typename ElementD>
struct GatedEpilogueArguments {
    ElementD** ptr_D = nullptr;                                         // per group: h of its first row
    cute::Stride<int64_t, cute::Int<1>, cute::Int<0>>* dD = nullptr;  // per group: (F, 1, 0)
    int activation = 0;                                                 // switchyard::Activation, gated
};

template <typename ElementD_>
class GatedEpilogueArray : public RegisterEpilogueBase<ElementD_, GatedEpilogueArguments<ElementD_>> {
    using Base = RegisterEpilogueBase<ElementD_, GatedEpilogueArguments<ElementD_>>;
    using Base::params_;

public:
    using typename Base::ElementD;
    using typename Base::Params;

    CUTLASS_HOST_DEVICE explicit GatedEpilogueArray(Params const& p) : Base(p) {}

    template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
              class TiledMma, class ResidueMNK>
    CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                   BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc,
                                   TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
        using namespace cute;
        Tensor t_crd = Base::template accumulator_coords<FrgLayout>(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl,
                                                                     tiled_mma, thread_idx);
        constexpr int kChunks = size<0, 2>(FrgLayout{});
        static_assert(kChunks % 2 == 0, "the MMA atom's N must hold whole gate/up blocks (a multiple of 16)");
        constexpr int kMmaM = size<1>(FrgLayout{});
        constexpr int kMmaN = size<2>(FrgLayout{});
        const int M = static_cast<int>(get<0>(problem_shape_mnkl));
        const int N = static_cast<int>(get<1>(problem_shape_mnkl));
        const auto l_coord = get<3>(blk_coord_mnkl);
        ElementD* d = params_.ptr_D[l_coord];
        const int64_t ldd = get<0>(params_.dD[l_coord]);
        const bool swiglu = params_.activation == static_cast<int>(Activation::kSwiGLU);

        CUTLASS_PRAGMA_UNROLL
        for (int mm = 0; mm < kMmaM; ++mm) {
            CUTLASS_PRAGMA_UNROLL
            for (int nn = 0; nn < kMmaN; ++nn) {
                CUTLASS_PRAGMA_UNROLL
                for (int r = 0; r < 2; ++r) {
                    CUTLASS_PRAGMA_UNROLL
                    for (int v = 0; v < kChunks; v += 2) {
                        const auto crd = t_crd(make_coord(make_coord(0, r, v), mm, nn));
                        const int row = get<0>(crd), col = get<1>(crd);
                        if (row >= M || col >= N) continue;
                        float h[2];
                        CUTLASS_PRAGMA_UNROLL
                        for (int c = 0; c < 2; ++c) {
                            const float gate = static_cast<float>(ElementD(acc(make_coord(make_coord(c, r, v), mm, nn))));
                            const float up =
                                static_cast<float>(ElementD(acc(make_coord(make_coord(c, r, v + 1), mm, nn))));
                            h[c] = (swiglu ? act_fn<Activation::kSwiGLU, kFastAct<ElementD>>(gate)
                                           : act_fn<Activation::kGeGLU, kFastAct<ElementD>>(gate)) *
                                   up;
                        }
                        cutlass::Array<ElementD, 2> out;
                        out[0] = ElementD(h[0]);
                        out[1] = ElementD(h[1]);
                        // gate f's column is gate_up_interleaved_row(f, 0) (config.h); f is even: col = 16q + 2j
                        const int64_t f = static_cast<int64_t>(col >> 4) * 8 + (col & 7);
                        *reinterpret_cast<cutlass::Array<ElementD, 2>*>(d + row * ldd + f) = out;
                    }
                }
            }
        }
    }
};

template <typename ElementD>
struct DgradActivationArguments {
    const int32_t* offsets = nullptr;  // [E + 1]: group e's rows start at offsets[e] of g, dg and h
    const ElementD* g = nullptr;       // [rows, 2F] GEMM1's output (gate and up)
    ElementD* dg = nullptr;            // [rows, 2F] its gradient, in g's column layout
    ElementD* h = nullptr;             // [rows, F] act(gate) * up, recomputed
    int64_t ffn = 0;                   // F (the dgrad's N)
    int activation = 0;                // switchyard::Activation, gated
    bool interleaved = false;          // g's gate / up columns interleaved in blocks of 8 (gate_up_interleaved_row)
};

// The input gradient of GEMM2 (dh = dC . w2[e], [rows, F]) with the gated activation's backward in its epilogue: dh
// is never stored; each thread rounds its dh values to the output type (as grouped_gemm_dgrad stores them), reads
// gate and up from g and writes dg (activation_backward's values, act_fn.cuh's gated_activation_grad) and the
// recomputed h = act(gate) * up (the activation kernel's values, kFastAct formulas) that the weight gradient of GEMM2
// reads. Values c = 0, 1 of a thread are the adjacent columns f, f + 1 (f even), so every load and store is a pair of
// 16-bit values (4 bytes), in both column layouts. Rows and columns past the group's problem are skipped.
template <typename ElementD_>
class DgradActivationEpilogueArray : public RegisterEpilogueBase<ElementD_, DgradActivationArguments<ElementD_>> {
    using Base = RegisterEpilogueBase<ElementD_, DgradActivationArguments<ElementD_>>;
    using Base::params_;

public:
    using typename Base::ElementD;
    using typename Base::Params;

    CUTLASS_HOST_DEVICE explicit DgradActivationEpilogueArray(Params const& p) : Base(p) {}

    template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
              class TiledMma, class ResidueMNK>
    CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                   BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc,
                                   TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
        if (params_.activation == static_cast<int>(Activation::kSwiGLU)) {
            apply<Activation::kSwiGLU>(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl, acc, tiled_mma,
                                       thread_idx);
        } else {
            apply<Activation::kGeGLU>(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl, acc, tiled_mma, thread_idx);
        }
    }

private:
    using Pair = cutlass::Array<ElementD, 2>;

    template <Activation kAct, class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
              class FrgLayout, class TiledMma>
    CUTLASS_DEVICE void apply(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                              BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc,
                              TiledMma tiled_mma, int thread_idx) {
        using namespace cute;
        Tensor t_crd = Base::template accumulator_coords<FrgLayout>(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl,
                                                                     tiled_mma, thread_idx);
        constexpr int kChunks = size<0, 2>(FrgLayout{});
        constexpr int kMmaM = size<1>(FrgLayout{});
        constexpr int kMmaN = size<2>(FrgLayout{});
        const int M = static_cast<int>(get<0>(problem_shape_mnkl));
        const int N = static_cast<int>(get<1>(problem_shape_mnkl));
        const int64_t row0 = params_.offsets[get<3>(blk_coord_mnkl)];
        const int64_t ffn = params_.ffn;
        const bool interleaved = params_.interleaved;
        const ElementD* g = params_.g + row0 * 2 * ffn;
        ElementD* dg = params_.dg + row0 * 2 * ffn;
        ElementD* h = params_.h + row0 * ffn;

        CUTLASS_PRAGMA_UNROLL
        for (int mm = 0; mm < kMmaM; ++mm) {
            CUTLASS_PRAGMA_UNROLL
            for (int nn = 0; nn < kMmaN; ++nn) {
                CUTLASS_PRAGMA_UNROLL
                for (int r = 0; r < 2; ++r) {
                    CUTLASS_PRAGMA_UNROLL
                    for (int v = 0; v < kChunks; ++v) {
                        const auto crd = t_crd(make_coord(make_coord(0, r, v), mm, nn));
                        const int64_t row = get<0>(crd);
                        const int f = get<1>(crd);  // even; f + 1 < N as N % 8 == 0
                        if (row >= M || f >= N) continue;
                        const int64_t gate_col = row * 2 * ffn + gate_column(f, interleaved);
                        const int64_t up_col = row * 2 * ffn + up_column(f, ffn, interleaved);
                        const Pair gate = *reinterpret_cast<const Pair*>(g + gate_col);
                        const Pair up = *reinterpret_cast<const Pair*>(g + up_col);
                        Pair d_gate, d_up, hv;
                        CUTLASS_PRAGMA_UNROLL
                        for (int c = 0; c < 2; ++c) {
                            const float dv = static_cast<float>(ElementD(acc(make_coord(make_coord(c, r, v), mm, nn))));
                            const float a = static_cast<float>(gate[c]), u = static_cast<float>(up[c]);
                            float dga, dup;
                            gated_activation_grad<kAct>(dv, a, u, dga, dup);
                            d_gate[c] = ElementD(dga);
                            d_up[c] = ElementD(dup);
                            hv[c] = ElementD(act_fn<kAct, kFastAct<ElementD>>(a) * u);
                        }
                        *reinterpret_cast<Pair*>(dg + gate_col) = d_gate;
                        *reinterpret_cast<Pair*>(dg + up_col) = d_up;
                        *reinterpret_cast<Pair*>(h + row * ffn + f) = hv;
                    }
                }
            }
        }
    }
};

}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
