// src/cuda/gemm/sm90/gather_mainloop.cuh: the sm90 ptr-array mainloop with A's rows gathered (issue 11: the gather
// of token rows into GEMM1's A loads, so that xp = x[row_token] is never written to memory and read back).
//
// What changes against CUTLASS's MainloopSm90ArrayTmaGmmaWarpSpecialized collective (which this one derives from and
// whose shared memory layout, MMA and tensor-map handling it keeps): the producer warps load an A tile with cp.async
// instead of one TMA copy. Row i of group g's M tile m is row r = offsets[g] + m * BLK_M + i of the grouped problem; it
// is read from x [x_rows, K] at x row row_index[r]. Each k tile of a row is 128 bytes, eight 16-byte chunks: lane l of
// a warp copies chunk l % 8 of rows l / 8, l / 8 + 4, ... of the warp's 32-row groups (the tile's row indices are read
// once per tile and passed between lanes by shuffle), to the address the 128-byte swizzle gives it (chunk XOR the row
// within 8: address bits 4-6 ^= bits 7-9, what TMA writes and GMMA reads). Two producer warps share the rows (by
// default): warp 0, the kernel's mainloop producer, which also issues B's TMA copy (lane 0, first), and warp 1, which
// CUTLASS's ptr-array kernels run through load_auxiliary when the dispatch policy has an auxiliary load
// (GatherTwoWarpPolicy). A stage is full when the leader's arrive (with B's bytes as the transaction count) and every
// producer lane's cp.async arrival (cp.async.mbarrier.arrive.noinc, once its copies land) have come: the full barrier
// counts 1 + 32 per producer warp arrivals (NumProducerThreadEvents).
//
// Measured first (bench/NOTES.md, "Gather in GEMM1's loads"): one TMA copy per row and k tile (box 1 x 64, 128-byte
// swizzle) gave the same bits but ran GEMM1 about 4x slower: a 128-byte box costs the TMA unit about as much as a
// whole tile, and a tile needs BLK_M of them per k step.
//
// Rows past the group's M, a row index outside [0, x_rows) and the chunks of a last k tile past K are zero-filled
// (cp.async with source size 0, no global read): never an out-of-range read; the products of rows past M are never
// stored. There is no proxy fence between the cp.async writes and the consumers' wgmma reads, as in CUTLASS's own
// cp.async GMMA mainloops (sm90_mma_multistage_gmma_ss_warpspecialized.hpp). Layout contract (static_asserts below): A
// K-major with the 128-byte swizzle atom (8 rows x 64 16-bit values), BLK_K = 64. The A-multicast clusters (1x2) are
// not supported (A is per CTA here).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/dispatch_policy.hpp>

namespace switchyard {
namespace cuda {
namespace sm90 {

// The dispatch policy of a gathered mainloop with a second producer warp: CUTLASS's ptr-array kernels run their
// producer warpgroup's warp 1 (ProducerWarpRole::MainloopAux) through the collective's load_auxiliary, over the same
// tiles and pipeline stages as warp 0, when HasAuxiliaryLoad holds for the mainloop's dispatch policy (as CUTLASS's
// blockwise-scaled FP8 mainloop uses it for its scale copies). Everything else is the base policy's.
template <class Policy>
struct GatherTwoWarpPolicy : Policy {};

// Two producer warps copy A's rows (one warp alone was 14-20% slower at 128-256 rows per expert: bench/NOTES.md,
// "Session 13", run 45).
template <class Base>
struct GatherAMainloop : Base {
    using typename Base::ElementA;
    using typename Base::MainloopPipeline;
    using typename Base::PipelineState;
    using typename Base::SmemLayoutA;
    using typename Base::SmemLayoutAtomA;
    using typename Base::SmemLayoutB;
    using typename Base::TensorStorage;
    using typename Base::TileShape;
    static constexpr int kProducerWarps = 2;  // warp 0 and the auxiliary warp
    using DispatchPolicy = GatherTwoWarpPolicy<typename Base::DispatchPolicy>;
    using BaseArguments = typename Base::Arguments;
    using BaseParams = typename Base::Params;

    static constexpr int kBlkM = cute::size<0>(TileShape{});
    static constexpr int kBlkK = cute::size<2>(TileShape{});
    static constexpr int kRowBytes = kBlkK * static_cast<int>(sizeof(ElementA));
    static_assert(sizeof(ElementA) == 2, "the gathered A is a 16-bit type");
    static_assert(kRowBytes == 128, "one 128-byte swizzle row per row and k tile (BLK_K = 64 16-bit values)");
    static_assert(std::is_same_v<SmemLayoutAtomA, decltype(cute::GMMA::Layout_K_SW128_Atom<ElementA>{})>,
                  "A's shared memory atom must be the K-major 128-byte swizzle atom (8 rows x 64 values)");
    static_assert(cute::size<1>(typename DispatchPolicy::ClusterShape{}) == 1,
                  "the gathered A is loaded per CTA: no A multicast (cluster N extent 1)");
    static_assert(cute::cosize_v<SmemLayoutA> == kBlkM * kBlkK * DispatchPolicy::Stages,
                  "A's stages are dense BLK_M x BLK_K buffers");

    // The full barrier's producer arrivals: the leader's (with B's transaction bytes) and each producer warp's 32
    // lanes' cp.async ones.
    static constexpr int NumProducerThreadEvents = 1 + 32 * kProducerWarps;
    static constexpr int kChunksPerRow = kRowBytes / 16;  // 8
    static constexpr int kRowsPerPass = 32 / kChunksPerRow;  // rows one warp instruction covers: 4
    static_assert(kBlkM % (32 * kProducerWarps) == 0, "the tile's rows split into whole 32-row groups per warp");
    // A warp's row groups: warp w copies rows (w + kProducerWarps * j) * 32 + [0, 32), j < kIdxRegs; their indices
    // are held one per lane and register.
    static constexpr int kIdxRegs = kBlkM / 32 / kProducerWarps;
    static_assert(kRowsPerPass == 4, "a lane's rows alternate between two rows of the 8-row swizzle atom");
    static constexpr int kShflBatch = 4;  // row indices fetched from their lanes ahead of the copies
    static_assert((32 / kRowsPerPass) % kShflBatch == 0, "whole batches per 32 rows");
    static constexpr uint32_t kTxBytesB = static_cast<uint32_t>(
        cute::size<0>(SmemLayoutB{}) * cute::size<1>(SmemLayoutB{}) * sizeof(typename Base::ElementB));

    struct Arguments : BaseArguments {
        const void* x = nullptr;             // [x_rows, K] row-major, 16-byte aligned, K % 8 == 0
        int64_t x_rows = 0;
        int64_t k = 0;
        const int32_t* row_index = nullptr;  // device [rows]: x row of each grouped row
        const int32_t* offsets = nullptr;    // device [groups + 1]: the groups' first rows
    };

    struct Params : BaseParams {
        const ElementA* x;
        int64_t x_rows;
        int64_t k;
        const int32_t* row_index;
        const int32_t* offsets;
    };

    template <class ProblemShape>
    static Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args, void* workspace) {
        Params p;
        static_cast<BaseParams&>(p) = Base::to_underlying_arguments(problem_shapes, args, workspace);
        p.tma_transaction_bytes = kTxBytesB;  // A arrives by cp.async, counted as arrivals, not bytes
        p.x = static_cast<const ElementA*>(args.x);
        p.x_rows = args.x_rows;
        p.k = args.k;
        p.row_index = args.row_index;
        p.offsets = args.offsets;
        return p;
    }

    // The kernel keeps what load_init returns and renews it with tensors_perform_update when the group changes (the
    // auxiliary warp keeps its own copy); the load needs the group (the kernel passes l = 0 in its block coordinate)
    // and its row count.
    template <class ProblemShape_MNKL>
    CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& p) const {
        auto t = Base::load_init(problem_shape_MNKL, p);
        return cute::make_tuple(cute::get<0>(t), cute::get<1>(t), int32_t(0), int32_t(0));
    }

    template <class InputTensors, class ProblemShape_MNKL>
    CUTLASS_DEVICE InputTensors tensors_perform_update(InputTensors const& in, Params const&,
                                                       ProblemShape_MNKL problem_shape_mnkl, int32_t next_batch) {
        return cute::make_tuple(cute::get<0>(in), cute::get<1>(in), next_batch,
                                static_cast<int32_t>(cute::get<0>(problem_shape_mnkl)));
    }

    // Producer warp 0 (the kernel's mainloop producer warp; lane = thread_idx): B by TMA, then its share of A's rows.
    template <class LoadInputs, class TensorMapA, class TensorMapB, class KTileIterator, class BlockCoord>
    CUTLASS_DEVICE void load(Params const& p, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                             LoadInputs const& load_inputs,
                             cute::tuple<TensorMapA, TensorMapB> const& input_tensormaps, BlockCoord const& blk_coord,
                             KTileIterator k_tile_iter, int k_tile_count, int lane, uint32_t block_rank_in_cluster,
                             TensorStorage& shared_tensors) {
        using namespace cute;
        auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
        // B as CUTLASS's collective loads it (multicast to the cluster's M tiles where the cluster has them).
        Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)
        constexpr uint32_t cluster_shape_x = get<0>(typename DispatchPolicy::ClusterShape());
        const uint2 cluster_local_block_id = {block_rank_in_cluster % cluster_shape_x,
                                              block_rank_in_cluster / cluster_shape_x};
        Tensor gB_nkl = get<1>(load_inputs);
        auto block_tma_b = p.tma_load_b.get_slice(cluster_local_block_id.x);
        Tensor gB = gB_nkl(_, _, n_coord, _, l_coord);  // (BLK_N,BLK_K,k)
        Tensor tBgB = block_tma_b.partition_S(gB);      // (TMA,TMA_N,TMA_K,k)
        Tensor tBsB = block_tma_b.partition_D(sB);      // (TMA,TMA_N,TMA_K,PIPE)
        uint16_t mcast_mask_b = 0;
        if constexpr (cute::is_same_v<typename Base::GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
            auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{};  // (m,n) -> block_id
            for (int m = 0; m < size<0>(block_layout); ++m)
                mcast_mask_b |= (uint16_t(1) << block_layout(m, cluster_local_block_id.y, Int<0>{}));
        }
        auto load_b = [&](auto* barrier, int stage, int k_tile) {
            if (lane == 0) {
                copy(p.tma_load_b.with(get<1>(input_tensormaps), *barrier, mcast_mask_b), tBgB(_, _, _, k_tile),
                     tBsB(_, _, _, stage));
            }
        };
        load_rows(p, pipeline, smem_pipe_write, load_inputs, static_cast<int>(m_coord), k_tile_iter, k_tile_count,
                  lane, 0, shared_tensors, load_b);
    }

    // Producer warp 1 (ProducerWarpRole::MainloopAux, with two producer warps): the other share of A's rows, over
    // the same tiles and stages as warp 0.
    template <class LoadInputs, class KTileIterator, class BlockCoord>
    CUTLASS_DEVICE void load_auxiliary(Params const& p, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                                       LoadInputs const& load_inputs, BlockCoord const& blk_coord,
                                       KTileIterator k_tile_iter, int k_tile_count, int lane, uint32_t,
                                       TensorStorage& shared_tensors) {
        auto no_b = [](auto*, int, int) {};
        load_rows(p, pipeline, smem_pipe_write, load_inputs, static_cast<int>(cute::get<0>(blk_coord)),
                  k_tile_iter, k_tile_count, lane, 1, shared_tensors, no_b);
    }

  private:
    // One producer warp's part of each k tile: acquire the stage, issue B (warp 0's lane 0, through load_b), copy the
    // warp's rows of A, arrive on the stage's full barrier when the copies land.
    template <class LoadInputs, class KTileIterator, class LoadB>
    CUTLASS_DEVICE void load_rows(Params const& p, MainloopPipeline& pipeline, PipelineState smem_pipe_write,
                                  LoadInputs const& load_inputs, int m_tile, KTileIterator k_tile_iter,
                                  int k_tile_count, int lane, int warp, TensorStorage& shared_tensors,
                                  LoadB const& load_b) {
        using namespace cute;
        const int group = get<2>(load_inputs);
        const int rows = get<3>(load_inputs);
        const int32_t* tile_index = p.row_index + p.offsets[group];  // the group's rows' x rows
        const int m0 = m_tile * kBlkM;
        const int chunk = lane % kChunksPerRow, row_in_pass = lane / kChunksPerRow;

        // The warp's x rows, read once per tile: lane l holds rows (warp + kProducerWarps * j) * 32 + l, -1 where the
        // row is past M or its index is outside x. The k loop takes them by shuffle: no memory access between a
        // stage's acquire and its copies (reading the index there put a dependent global load before every k tile's
        // copies); issued first, these loads overlap the first stage's acquire.
        int32_t tile_rows[kIdxRegs];
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kIdxRegs; ++j) {
            const int i = m0 + (warp + kProducerWarps * j) * 32 + lane;
            const int32_t x_row = i < rows ? __ldg(tile_index + i) : -1;  // past M: zeros, never stored
            tile_rows[j] = x_row >= 0 && x_row < p.x_rows ? x_row : -1;
        }

        // Per lane, the shared memory offsets of its chunk in its rows: rows r = row_in_pass + 4 * pass alternate
        // between r % 8 = row_in_pass and row_in_pass + 4, so the swizzled chunk (chunk XOR r % 8; the stages are
        // 1024-byte aligned, whole swizzle atoms) takes one of two values.
        const uint32_t smem_a = cast_smem_ptr_to_uint(shared_tensors.smem_A.data());
        const uint32_t lane_dst[2] = {
            static_cast<uint32_t>(row_in_pass * kRowBytes + ((chunk ^ row_in_pass) * 16)),
            static_cast<uint32_t>(row_in_pass * kRowBytes + ((chunk ^ (row_in_pass + kRowsPerPass)) * 16))};
        const uint32_t row_bytes = static_cast<uint32_t>(p.k * static_cast<int64_t>(sizeof(ElementA)));  // < 2^31
        CUTLASS_PRAGMA_NO_UNROLL
        for (; k_tile_count > 0; --k_tile_count) {
            pipeline.producer_acquire(smem_pipe_write);  // every lane waits for the stage; the leader arms B's bytes
            auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
            const int stage = smem_pipe_write.index();
            const int k_tile = *k_tile_iter;
            load_b(barrier, stage, k_tile);  // B first: the larger copy, one TMA request
            const int64_t col = static_cast<int64_t>(k_tile) * kBlkK + chunk * 8;
            const int full = col < p.k ? 16 : 0;  // a last k tile's chunks past K: zeros
            // Every source address lies inside x, also where nothing is read (size 0): row 0 for an index of -1,
            // column 0 for a chunk past K.
            const char* x_col = reinterpret_cast<const char*>(full ? p.x + col : p.x);
            const uint32_t stage_a = smem_a + static_cast<uint32_t>(stage * kBlkM * kRowBytes);
            CUTLASS_PRAGMA_UNROLL
            for (int j = 0; j < kIdxRegs; ++j) {
                const int q = warp + kProducerWarps * j;  // the 32-row group
                CUTLASS_PRAGMA_UNROLL
                for (int pass0 = 0; pass0 < 32 / kRowsPerPass; pass0 += kShflBatch) {
                    // kShflBatch shuffles in flight before their copies: the shuffle's latency paid once per batch.
                    int32_t x_rows[kShflBatch];
                    CUTLASS_PRAGMA_UNROLL
                    for (int b = 0; b < kShflBatch; ++b)
                        x_rows[b] = __shfl_sync(0xffffffffu, tile_rows[j], row_in_pass + (pass0 + b) * kRowsPerPass);
                    CUTLASS_PRAGMA_UNROLL
                    for (int b = 0; b < kShflBatch; ++b) {
                        const int pass = pass0 + b;
                        const int size = x_rows[b] >= 0 ? full : 0;  // -1: past M or outside x, zeros
                        const char* src =  // one 32 x 32 -> 64-bit multiply-add per row
                            x_col + static_cast<uint64_t>(static_cast<uint32_t>(max(x_rows[b], 0))) * row_bytes;
                        const uint32_t dst =
                            stage_a + static_cast<uint32_t>((q * 32 + pass * kRowsPerPass) * kRowBytes) +
                            lane_dst[pass & 1];
                        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                                     "r"(size));
                    }
                }
            }
            cutlass::arch::cpasync_barrier_arrive_noinc(barrier);
            ++k_tile_iter;
            ++smem_pipe_write;
        }
    }
};

}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard

// The second producer warp of a gathered mainloop (GatherTwoWarpPolicy): the kernel runs load_auxiliary in warp 1.
namespace cutlass {
namespace gemm {
namespace kernel {
namespace detail {
template <class Policy>
struct HasAuxiliaryLoad<switchyard::cuda::sm90::GatherTwoWarpPolicy<Policy>> : cute::true_type {};
}  // namespace detail
}  // namespace kernel
}  // namespace gemm
}  // namespace cutlass
