// src/cuda/gemm/sm90/register_epilogue.cuh: CUTLASS sm90 ptr-array epilogues that store the accumulators straight
// from registers to global memory (no shared-memory staging, no barriers between the consumer warps):
//   RegisterEpilogueArray<E, true>: applies the gated activation of the expert MLP to GEMM1's
//     accumulators and stores h = act(gate) * up, so that GEMM1's [rows, 2F] output is never written to memory
//     (issue 11: the activation kernel and half of GEMM1's stores go away);
//   RegisterEpilogueArray<E, false>: D = acc rounded once to E (the values of CUTLASS's LinearCombination epilogue
//     with alpha 1, beta 0), 16 bytes per store: the four lanes of a quad exchange their column pairs (two shuffle
//     rounds) so that each lane writes 8 adjacent columns of one row.
//   RegisterEpilogueArray<E, true, true>: the gated form that also stores GEMM1's product
//     g [rows, 2F] (the plain form's 16-byte stores, interleaved columns as the GEMM computes them) beside h: the
//     training forward, whose backward needs g, without the separate activation pass over g.
//
// Layout contract of the gated form. B (w13) holds the gate and up rows interleaved in blocks of 8 (grouped_gemm.h,
// interleave_gate_up): output column n of the GEMM (a row of B) is a gate column when (n / 8) is even and the up
// column of the same f when odd, with f = (n / 16) * 8 + n % 8. The sm90 GMMA accumulator fragment of a thread is
// ((2, 2, V), MMA_M, MMA_N): value (c, r, v) sits at column 8 v + 2 (lane % 4) + c and row 8 r of the thread's
// rows. Blocks of 8 therefore put gate f (chunk 2v) and up f (chunk 2v + 1) into the same thread, four values
// apart, with c = 0 and 1 two adjacent f: each thread stores two adjacent h values (4 bytes) per pair of chunks.
//
// Rounding: gate and up are rounded to the output type before the activation, exactly as grouped_gemm followed by
// the activation kernel round them (D = 1.0 * acc stored, then act(gate) * up in fp32 with act_fn.cuh's 16-bit
// formulas, rounded once): the fused and the unfused paths produce the same values. Without shared-memory staging
// the mainloop keeps the epilogue's shared memory for one more pipeline stage.
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

template <typename ElementD_, bool Gated, bool KeepInput = false>
class RegisterEpilogueArray {
    static_assert(Gated || !KeepInput, "only the gated form has an input to keep");

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
    using InternalStrideD = InternalStrideC;  // h's per-group [M_e, F] row-major strides
    using StrideD = InternalStrideD*;
    using GmemElementC = ElementD;
    using GmemTiledCopyC = void;
    using GmemTiledCopyD = void;

    // GemmUniversalAdapter names the epilogue's thread operator (a type only; this class applies its own).
    struct ThreadEpilogueOp {
        using ElementOutput = ElementD_;
        using ElementAccumulator = float;
        using ElementCompute = float;
    };

    struct SharedStorage {};
    using TensorMapStorage = SharedStorage;

    struct Arguments {
        ElementD** ptr_D = nullptr;  // per group: h of its first row
        StrideD dD = nullptr;        // per group: (F, 1, 0)
        int activation = 0;          // switchyard::Activation, gated (kSwiGLU or kGeGLU); unused when !Gated
        // KeepInput: GEMM1's product g [max_rows, N] row-major (group e's rows from offsets[e]); unused otherwise.
        ElementD* gate_up = nullptr;
        const int32_t* offsets = nullptr;
    };
    using Params = Arguments;

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
        return (!Gated || is_gated(static_cast<Activation>(args.activation))) &&
               (!KeepInput || (args.gate_up != nullptr && args.offsets != nullptr));
    }

    CUTLASS_HOST_DEVICE explicit RegisterEpilogueArray(Params const& p) : params_(p) {}

    CUTLASS_DEVICE bool is_source_needed() { return false; }

    template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
              class TiledMma, class ResidueMNK>
    CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                   BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc,
                                   TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
        using namespace cute;
        static_assert(is_static<FrgLayout>::value, "the accumulator layout must be static");
        static_assert(rank<0>(FrgLayout{}) == 3, "expected the GMMA accumulator value mode (2, 2, V)");
        static_assert(size<0, 0>(FrgLayout{}) == 2 && size<0, 1>(FrgLayout{}) == 2,
                      "expected the GMMA accumulator value mode (2, 2, V)");
        constexpr int kChunks = size<0, 2>(FrgLayout{});
        static_assert(!Gated || kChunks % 2 == 0, "the MMA atom's N must hold whole gate/up blocks (a multiple of 16)");
        static_assert((Gated && !KeepInput) || kChunks % 4 == 0,
                      "the plain store exchanges groups of four 8-column chunks");
        constexpr int kMmaM = size<1>(FrgLayout{});
        constexpr int kMmaN = size<2>(FrgLayout{});

        const int M = static_cast<int>(get<0>(problem_shape_mnkl));
        const int N = static_cast<int>(get<1>(problem_shape_mnkl));
        const auto m_coord = get<0>(blk_coord_mnkl);
        const auto n_coord = get<1>(blk_coord_mnkl);
        const auto l_coord = get<3>(blk_coord_mnkl);
        ElementD* d = params_.ptr_D[l_coord];
        const int64_t ldd = get<0>(params_.dD[l_coord]);
        // KeepInput: g of the group's first row ([rows, N] row-major); one load per tile, cached.
        ElementD* g = nullptr;
        if constexpr (KeepInput) g = params_.gate_up + static_cast<int64_t>(params_.offsets[l_coord]) * N;

        // Each accumulator's (row, column) in the group's [M, N] problem, partitioned as the accumulators are.
        auto thr_mma = tiled_mma.get_thread_slice(thread_idx);
        Tensor tile_crd = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape_mnk),
                                     make_coord(m_coord, n_coord));
        Tensor t_crd = thr_mma.partition_C(tile_crd);  // ((2, 2, V), MMA_M, MMA_N) -> (m, n)
        const bool swiglu = params_.activation == static_cast<int>(Activation::kSwiGLU);
        const int q = thread_idx & 3;  // the lane's place in its quad (lanes 4i..4i+3 share a row)
        // Chunks per step: a gate/up pair, or four for the quad's transpose (KeepInput: g's four, then h's two pairs).
        constexpr int kStep = Gated && !KeepInput ? 2 : 4;

        CUTLASS_PRAGMA_UNROLL
        for (int mm = 0; mm < kMmaM; ++mm) {
            CUTLASS_PRAGMA_UNROLL
            for (int nn = 0; nn < kMmaN; ++nn) {
                CUTLASS_PRAGMA_UNROLL
                for (int r = 0; r < 2; ++r) {
                    CUTLASS_PRAGMA_UNROLL
                    for (int v = 0; v < kChunks; v += kStep) {
                        const auto crd = t_crd(make_coord(make_coord(0, r, v), mm, nn));
                        const int row = get<0>(crd), col = get<1>(crd);
                        if constexpr (KeepInput) {
                            // g first: every lane of the quad takes part in store_quad's shuffles.
                            const int seg = col + 6 * q;
                            store_quad(acc, mm, nn, r, v, q, row < M && seg < N,
                                       g + row * static_cast<int64_t>(N) + seg);
                            if (row >= M || col >= N) continue;
                            // chunks (v, v + 1) hold gate and up of f, (v + 2, v + 3) those of f + 8, which lie
                            // past N when N is an odd multiple of 16
                            const int64_t f = static_cast<int64_t>(col >> 4) * 8 + (col & 7);
                            store_gated(acc, mm, nn, r, v, swiglu, d + row * ldd + f);
                            if (col + 16 < N) store_gated(acc, mm, nn, r, v + 2, swiglu, d + row * ldd + f + 8);
                        } else if constexpr (Gated) {
                            if (row >= M || col >= N) continue;
                            // gate f's column is gate_up_interleaved_row(f, 0) (config.h); f even: col = 16q + 2j
                            const int64_t f = static_cast<int64_t>(col >> 4) * 8 + (col & 7);
                            store_gated(acc, mm, nn, r, v, swiglu, d + row * ldd + f);
                        } else {
                            // This lane's pair of chunk v sits at column 8 v + 2q; chunk v + q starts at 8 (v + q).
                            const int seg = col + 6 * q;
                            store_quad(acc, mm, nn, r, v, q, row < M && seg < N, d + row * ldd + seg);
                        }
                    }
                }
            }
        }
    }

private:
    // h = act(gate) * up for the thread's two adjacent f of chunks (v, v + 1), gate and up rounded to ElementD
    // first; one 4-byte store.
    template <class Acc>
    CUTLASS_DEVICE static void store_gated(Acc const& acc, int mm, int nn, int r, int v, bool swiglu, ElementD* out) {
        using cute::make_coord;
        cutlass::Array<ElementD, 2> h;
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < 2; ++c) {
            const float gate = static_cast<float>(ElementD(acc(make_coord(make_coord(c, r, v), mm, nn))));
            const float up = static_cast<float>(ElementD(acc(make_coord(make_coord(c, r, v + 1), mm, nn))));
            h[c] = ElementD((swiglu ? act_fn<Activation::kSwiGLU, kFastAct<ElementD>>(gate)
                                    : act_fn<Activation::kGeGLU, kFastAct<ElementD>>(gate)) *
                            up);
        }
        *reinterpret_cast<cutlass::Array<ElementD, 2>*>(out) = h;
    }

    // D = acc rounded once for chunks v0..v0+3 of one row. Lane q of a quad holds the column pairs p[j] = columns
    // 8 (v0 + j) + 2q + {0, 1}; a 4x4 transpose of these 32-bit pairs across the quad (shuffles with lane ^ 1, then
    // lane ^ 2; every lane takes part) leaves lane q with chunk v0 + q's 8 columns: one 16-byte store where `store`.
    template <class Acc>
    CUTLASS_DEVICE static void store_quad(Acc const& acc, int mm, int nn, int r, int v0, int q, bool store,
                                          ElementD* out) {
        using cute::make_coord;
        const bool odd = q & 1, high = q & 2;
        uint32_t p[4];
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < 4; ++j) {
            cutlass::Array<ElementD, 2> two;
            two[0] = ElementD(acc(make_coord(make_coord(0, r, v0 + j), mm, nn)));
            two[1] = ElementD(acc(make_coord(make_coord(1, r, v0 + j), mm, nn)));
            p[j] = reinterpret_cast<uint32_t const&>(two);
        }
        // Round 1 (lane ^ 1): 2x2 blocks of pairs. Even lanes keep p0, p2, odd lanes p1, p3.
        uint32_t a = __shfl_xor_sync(0xffffffffu, odd ? p[0] : p[1], 1);
        uint32_t b = __shfl_xor_sync(0xffffffffu, odd ? p[2] : p[3], 1);
        if (odd) {
            p[0] = a;
            p[2] = b;
        } else {
            p[1] = a;
            p[3] = b;
        }
        // Round 2 (lane ^ 2): lanes 0, 1 keep p0, p1, lanes 2, 3 keep p2, p3.
        a = __shfl_xor_sync(0xffffffffu, high ? p[0] : p[2], 2);
        b = __shfl_xor_sync(0xffffffffu, high ? p[1] : p[3], 2);
        if (high) {
            p[0] = a;
            p[1] = b;
        } else {
            p[2] = a;
            p[3] = b;
        }
        if (store) *reinterpret_cast<uint4*>(out) = make_uint4(p[0], p[1], p[2], p[3]);
    }

    Params params_;
};

}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
