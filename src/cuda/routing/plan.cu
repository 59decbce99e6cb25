// src/cuda/routing/plan.cu: the routing plan on the device, with no host synchronisation.
//
// Inputs:  topk_ids [T*k] int32 (pair i = t*k + j), topk_weights [T*k] fp32 (probability drop policy only),
//          capacity C (0 = dropless, computed on the host from T by MoEConfig::capacity).
// Outputs: expert_counts [E] (pairs per expert before drops), expert_offsets [E+1] (exclusive scan of the kept
//          counts min(count, C)), slot_row [T*k] (row of pair i or -1), row_token / row_slot [T*k] (token and
//          pair of each row, -1 at and past offsets[E]). Matches ref::build_plan exactly.
// Fast path (dropless and the position policy, E <= kFastMaxExperts): no sort. What the plan needs is the stable
//   rank of each pair inside its expert in pair (= token) order. The pairs are cut into chunks of consecutive
//   pairs (chunk size a function of n only); three launches:
//     1. chunk_hist_kernel: one block per chunk, a shared-memory histogram -> hist [chunks, E];
//     2. plan_scan_kernel (one block): per expert an exclusive scan of hist over chunks (in place: each chunk's
//        base rank inside the expert), the totals = expert_counts, and expert_offsets (scan of min(count, C));
//     3. plan_assign_kernel: one block per chunk walks its pairs in tiles of 256 in order; inside a warp
//        __match_any_sync groups equal experts (rank inside the warp = popc of the lower lanes of the group), a
//        per-warp [8][E] table of tagged group sizes gives the counts of the earlier warps of the tile, and a
//        running per-expert counter (seeded with the chunk base) carries the tile totals. kept = rank < C,
//        row = offsets[e] + rank, and rows at and past offsets[E] are set to -1 by the same kernel.
//   Integer arithmetic only: bitwise deterministic and exactly the order of the reference.
// Probability policy (and E > kFastMaxExperts): a stable radix sort of the pairs by expert (CUB; values = pair
//   index, so pairs of one expert stay in token order) gives each pair its rank inside its expert. Probability
//   policy: a second stable sort by (expert, weight descending) ranks the pairs by weight with ties to the lower
//   pair index (= lower token, since a token picks an expert at most once); kept = that rank < C; a NaN weight
//   ranks below every number. Kept rows stay in token order: row = exclusive scan of the kept flags taken in
//   expert-sorted order (dropless: row = sorted position).
// Every step is deterministic (integer histogram atomics only); all sizes are known on the host, so the whole
// plan can be captured in a CUDA graph. Out-of-range expert ids are not counted and get slot_row = -1.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "cuda/common.cuh"
#include "cuda/moe_stages.h"

namespace switchyard {
namespace cuda {
namespace {

int bits_for(int64_t n) {  // bits needed to hold values in [0, n)
    int b = 1;
    while ((int64_t(1) << b) < n) ++b;
    return b;
}

__global__ void count_experts_kernel(const int32_t* ids, int64_t n, int num_experts, int32_t* counts) {
    extern __shared__ int32_t hist[];
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const int e = ids[i];
        if (e >= 0 && e < num_experts) atomicAdd(&hist[e], 1);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x)
        if (hist[e]) atomicAdd(&counts[e], hist[e]);
}

// One block: count_offsets [E+1] (scan of counts), kept_offsets [E+1] (scan of min(count, C)).
__global__ void plan_offsets_kernel(const int32_t* counts, int num_experts, int capacity, int32_t* count_offsets,
                                    int32_t* kept_offsets) {
    __shared__ int32_t carry_c, carry_k;
    __shared__ int32_t buf_c[1024], buf_k[1024];
    if (threadIdx.x == 0) carry_c = carry_k = 0;
    __syncthreads();
    for (int base = 0; base < num_experts; base += blockDim.x) {
        const int e = base + threadIdx.x;
        const int32_t c = e < num_experts ? counts[e] : 0;
        const int32_t kc = capacity > 0 ? min(c, capacity) : c;
        buf_c[threadIdx.x] = c;
        buf_k[threadIdx.x] = kc;
        __syncthreads();
        // Hillis-Steele inclusive scan (integers: order does not matter for the result).
        for (int off = 1; off < blockDim.x; off <<= 1) {
            int32_t vc = threadIdx.x >= off ? buf_c[threadIdx.x - off] : 0;
            int32_t vk = threadIdx.x >= off ? buf_k[threadIdx.x - off] : 0;
            __syncthreads();
            buf_c[threadIdx.x] += vc;
            buf_k[threadIdx.x] += vk;
            __syncthreads();
        }
        if (e < num_experts) {
            count_offsets[e] = carry_c + buf_c[threadIdx.x] - c;
            kept_offsets[e] = carry_k + buf_k[threadIdx.x] - kc;
        }
        __syncthreads();
        if (threadIdx.x == blockDim.x - 1) {
            carry_c += buf_c[threadIdx.x];
            carry_k += buf_k[threadIdx.x];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        count_offsets[num_experts] = carry_c;
        kept_offsets[num_experts] = carry_k;
    }
}

__global__ void iota_kernel(int32_t* v, int64_t n) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        v[i] = static_cast<int32_t>(i);
}

// Key of the probability sort: expert in the high word, weight descending (NaN last) in the low word.
__global__ void prob_keys_kernel(const int32_t* ids, const float* weights, int64_t n, uint64_t* keys) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const float w = weights[i];
        uint32_t u = __float_as_uint(w);
        // Order-preserving map of floats to unsigned (ascending), NaN mapped below everything.
        uint32_t asc = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
        if (isnan(w)) asc = 0u;
        const uint32_t desc = ~asc;
        keys[i] = (static_cast<uint64_t>(static_cast<uint32_t>(ids[i])) << 32) | desc;
    }
}

// Probability policy: flag[pair] = rank by weight inside its expert < C.
__global__ void prob_keep_kernel(const uint64_t* sorted_keys, const int32_t* sorted_pairs, int64_t n,
                                 const int32_t* count_offsets, int capacity, int32_t* keep_by_pair) {
    for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n; p += int64_t(gridDim.x) * blockDim.x) {
        const int e = static_cast<int>(sorted_keys[p] >> 32);
        keep_by_pair[sorted_pairs[p]] = (p - count_offsets[e]) < capacity ? 1 : 0;
    }
}

// keep flag of each position of the expert-sorted order.
__global__ void keep_flags_kernel(const int32_t* sorted_experts, const int32_t* sorted_pairs, int64_t n,
                                  const int32_t* count_offsets, int capacity, const int32_t* keep_by_pair,
                                  int32_t* flags) {
    for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n; p += int64_t(gridDim.x) * blockDim.x) {
        if (keep_by_pair != nullptr) {
            flags[p] = keep_by_pair[sorted_pairs[p]];
        } else {
            flags[p] = (p - count_offsets[sorted_experts[p]]) < capacity ? 1 : 0;
        }
    }
}

// rows: exclusive scan of the flags (null when dropless: row = position).
__global__ void scatter_rows_kernel(const int32_t* sorted_pairs, const int32_t* flags, const int32_t* rows,
                                    int64_t n, int top_k, int32_t* slot_row, int32_t* row_token,
                                    int32_t* row_slot) {
    for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n; p += int64_t(gridDim.x) * blockDim.x) {
        const int32_t pair = sorted_pairs[p];
        const bool kept = flags == nullptr || flags[p] != 0;
        if (kept) {
            const int32_t row = rows != nullptr ? rows[p] : static_cast<int32_t>(p);
            slot_row[pair] = row;
            row_token[row] = pair / top_k;
            row_slot[row] = pair;
        } else {
            slot_row[pair] = -1;
        }
    }
}


// ---- fast path: chunk histograms + scan + ordered ranks (no sort) --------------------------------------------
constexpr int kFastMaxExperts = 1024;  // shared memory: 9 * E int32 in plan_assign_kernel (36 KB)
constexpr int kAssignThreads = 256;    // one tile = 256 consecutive pairs, 8 warps
constexpr int kAssignWarps = kAssignThreads / 32;
constexpr int kMaxChunks = 512;

// Chunk size (pairs): at least 1024, a multiple of the tile, and at most kMaxChunks chunks. A function of n only.
int64_t plan_chunk_size(int64_t n) {
    const int64_t per = ceil_div<int64_t>(n, kMaxChunks);
    const int64_t c = ceil_div<int64_t>(per, kAssignThreads) * kAssignThreads;
    return std::max<int64_t>(1024, c);
}
int64_t plan_num_chunks(int64_t n) { return n > 0 ? ceil_div<int64_t>(n, plan_chunk_size(n)) : 0; }

__global__ void __launch_bounds__(kAssignThreads)
    chunk_hist_kernel(const int32_t* ids, int64_t n, int64_t chunk, int num_experts, int32_t* hist) {
    extern __shared__ int32_t h[];
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) h[e] = 0;
    __syncthreads();
    const int64_t begin = blockIdx.x * chunk;
    const int64_t end = min(n, begin + chunk);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const int e = __ldg(ids + i);
        if (e >= 0 && e < num_experts) atomicAdd(&h[e], 1);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x)
        hist[static_cast<int64_t>(blockIdx.x) * num_experts + e] = h[e];
}

// One block of 1024 threads. hist [chunks, E] -> per-chunk base ranks (in place); counts; kept offsets.
// Thread e walks expert e's column in chunk order, kScanBatch loads in flight at a time (a warp's loads are one
// row segment of hist: coalesced), so the walk costs chunks / kScanBatch load latencies.
constexpr int kScanBatch = 8;
__global__ void __launch_bounds__(1024) plan_scan_kernel(int32_t* hist, int chunks, int num_experts, int capacity,
                                                         int32_t* counts, int32_t* offsets) {
    __shared__ int32_t buf[1024];
    const int e = threadIdx.x;
    int32_t c = 0;  // expert e's pairs: the sum of its column
    if (e < num_experts) {
        for (int c0 = 0; c0 < chunks; c0 += kScanBatch) {
            int32_t v[kScanBatch];
#pragma unroll
            for (int u = 0; u < kScanBatch; ++u)
                v[u] = c0 + u < chunks ? hist[static_cast<int64_t>(c0 + u) * num_experts + e] : 0;
#pragma unroll
            for (int u = 0; u < kScanBatch; ++u) {
                if (c0 + u < chunks) hist[static_cast<int64_t>(c0 + u) * num_experts + e] = c;  // exclusive
                c += v[u];
            }
        }
    }
    const int32_t kc = capacity > 0 ? min(c, capacity) : c;
    if (e < num_experts) counts[e] = c;
    buf[e] = kc;
    __syncthreads();
    for (int off = 1; off < 1024; off <<= 1) {  // Hillis-Steele inclusive scan (integers)
        const int32_t v = e >= off ? buf[e - off] : 0;
        __syncthreads();
        buf[e] += v;
        __syncthreads();
    }
    if (e < num_experts) offsets[e] = buf[e] - kc;
    if (e == 1023) offsets[num_experts] = buf[e];
}

__global__ void __launch_bounds__(kAssignThreads)
    plan_assign_kernel(const int32_t* ids, int64_t n, int64_t chunk, int num_experts, int top_k, int capacity,
                       const int32_t* chunk_base, const int32_t* offsets, int32_t* slot_row, int32_t* row_token,
                       int32_t* row_slot) {
    extern __shared__ int32_t sm[];
    int32_t* run = sm;                      // [E] running rank per expert
    int32_t* tag = sm + num_experts;        // [kAssignWarps][E]: (tile << 6) | group size
    const int E = num_experts;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int e = threadIdx.x; e < E; e += blockDim.x) run[e] = chunk_base[static_cast<int64_t>(blockIdx.x) * E + e];
    for (int e = threadIdx.x; e < kAssignWarps * E; e += blockDim.x) tag[e] = -1;
    const int32_t total_rows = offsets[E];
    __syncthreads();
    const int64_t begin = blockIdx.x * chunk;
    const int64_t end = min(n, begin + chunk);
    const unsigned lower = (1u << lane) - 1u;
    for (int tile = 0; begin + static_cast<int64_t>(tile) * kAssignThreads < end; ++tile) {
        const int64_t i = begin + static_cast<int64_t>(tile) * kAssignThreads + threadIdx.x;
        const bool in = i < end;
        const int e = in ? ids[i] : -1;
        const bool ok = in && e >= 0 && e < E;
        const int key = ok ? e : -1 - lane;  // unique negative keys for lanes without a pair
        const unsigned group = __match_any_sync(0xffffffffu, key);
        const int in_warp = __popc(group & lower);
        if (ok && in_warp == 0) tag[warp * E + e] = (tile << 6) | __popc(group);
        __syncthreads();
        int32_t rank = 0;
        bool last = false;
        if (ok) {
            int32_t prefix = 0;
            bool later = false;
#pragma unroll
            for (int w = 0; w < kAssignWarps; ++w) {
                const int32_t v = tag[w * E + e];
                if ((v >> 6) == tile) {
                    if (w < warp) prefix += v & 63;
                    if (w > warp) later = true;
                }
            }
            rank = run[e] + prefix + in_warp;
            last = !later && lane == 31 - __clz(group);
        }
        __syncthreads();
        if (ok && last) run[e] = rank + 1;
        if (in) {
            int32_t row = -1;
            if (ok && (capacity <= 0 || rank < capacity)) row = offsets[e] + rank;
            slot_row[i] = row;
            if (row >= 0) {
                row_token[row] = static_cast<int32_t>(i / top_k);
                row_slot[row] = static_cast<int32_t>(i);
            }
            if (i >= total_rows) {  // rows past offsets[E]: never written above (kept rows are < offsets[E])
                row_token[i] = -1;
                row_slot[i] = -1;
            }
        }
    }
}

struct PlanScratch {
    int32_t* count_offsets;
    int32_t* pairs_in;
    int32_t* experts_sorted;
    int32_t* pairs_sorted;
    uint64_t* keys64_in;
    uint64_t* keys64_sorted;
    int32_t* pairs_sorted2;
    int32_t* keep_by_pair;
    int32_t* flags;
    int32_t* rows;
    int32_t* chunk_hist;  // [chunks, E] (fast path)
    void* cub_temp;
    size_t cub_bytes;
};

size_t cub_temp_bytes(int64_t n, int64_t num_experts) {
    const int nn = static_cast<int>(n);
    size_t a = 0, b = 0, c = 0;
    SWITCHYARD_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, a, static_cast<const int32_t*>(nullptr),
                                                          static_cast<int32_t*>(nullptr),
                                                          static_cast<const int32_t*>(nullptr),
                                                          static_cast<int32_t*>(nullptr), nn, 0,
                                                          bits_for(num_experts)));
    SWITCHYARD_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, b, static_cast<const uint64_t*>(nullptr),
                                                          static_cast<uint64_t*>(nullptr),
                                                          static_cast<const int32_t*>(nullptr),
                                                          static_cast<int32_t*>(nullptr), nn, 0,
                                                          32 + bits_for(num_experts)));
    SWITCHYARD_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, c, static_cast<const int32_t*>(nullptr),
                                                        static_cast<int32_t*>(nullptr), nn));
    return std::max(a, std::max(b, c));
}

PlanScratch carve_plan(WorkspaceCarver& wc, int64_t n, int64_t num_experts) {
    PlanScratch s{};
    s.count_offsets = wc.take<int32_t>(num_experts + 1);
    s.pairs_in = wc.take<int32_t>(n);
    s.experts_sorted = wc.take<int32_t>(n);
    s.pairs_sorted = wc.take<int32_t>(n);
    s.keys64_in = wc.take<uint64_t>(n);
    s.keys64_sorted = wc.take<uint64_t>(n);
    s.pairs_sorted2 = wc.take<int32_t>(n);
    s.keep_by_pair = wc.take<int32_t>(n);
    s.flags = wc.take<int32_t>(n);
    s.rows = wc.take<int32_t>(n);
    s.chunk_hist = wc.take<int32_t>(static_cast<size_t>(plan_num_chunks(n)) * num_experts);
    s.cub_bytes = n > 0 ? cub_temp_bytes(n, num_experts) : 0;
    s.cub_temp = wc.take_bytes(s.cub_bytes);
    return s;
}

}  // namespace

void count_experts(const int32_t* topk_ids, int64_t n, int64_t num_experts, int32_t* expert_counts,
                   cudaStream_t stream) {
    SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(expert_counts, 0, sizeof(int32_t) * num_experts, stream));
    if (n == 0) return;
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(n, threads * 8), 264));
    count_experts_kernel<<<blocks, threads, sizeof(int32_t) * num_experts, stream>>>(
        topk_ids, n, static_cast<int>(num_experts), expert_counts);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

size_t plan_workspace_size(int64_t num_tokens, int64_t top_k, int64_t num_experts) {
    WorkspaceCarver wc;
    carve_plan(wc, num_tokens * top_k, num_experts);
    return wc.used();
}

void build_plan(const PlanArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    const int64_t n = a.num_tokens * a.top_k;
    const int64_t E = a.num_experts;
    SWITCHYARD_CHECK(n <= INT32_MAX / 2, "CUDA plan: num_tokens*top_k=", n, " exceeds int32 row indices");
    SWITCHYARD_CHECK(E >= 1 && E <= 1 << 20, "CUDA plan: num_experts=", E);
    SWITCHYARD_CHECK(a.capacity >= 0 && a.capacity <= INT32_MAX, "CUDA plan: capacity=", a.capacity);
    WorkspaceCarver wc(workspace, workspace_bytes);
    PlanScratch s = carve_plan(wc, n, E);

    const bool dropping = a.capacity > 0;
    const int cap = static_cast<int>(a.capacity);
    if (n > 0 && E <= kFastMaxExperts && (!dropping || a.drop_policy == DropPolicy::kPosition)) {
        const int64_t chunk = plan_chunk_size(n);
        const int chunks = static_cast<int>(plan_num_chunks(n));
        const int e32 = static_cast<int>(E);
        chunk_hist_kernel<<<chunks, kAssignThreads, sizeof(int32_t) * E, stream>>>(a.topk_ids, n, chunk, e32,
                                                                                  s.chunk_hist);
        SWITCHYARD_CUDA_CHECK_LAUNCH();
        plan_scan_kernel<<<1, 1024, 0, stream>>>(s.chunk_hist, chunks, e32, cap, a.expert_counts, a.expert_offsets);
        SWITCHYARD_CUDA_CHECK_LAUNCH();
        const size_t smem = sizeof(int32_t) * static_cast<size_t>(E) * (1 + kAssignWarps);
        plan_assign_kernel<<<chunks, kAssignThreads, smem, stream>>>(a.topk_ids, n, chunk, e32,
                                                                     static_cast<int>(a.top_k), cap, s.chunk_hist,
                                                                     a.expert_offsets, a.slot_row, a.row_token,
                                                                     a.row_slot);
        SWITCHYARD_CUDA_CHECK_LAUNCH();
        return;
    }

    // -1 everywhere first: rows past offsets[E] stay -1 (0xFF bytes are int32 -1).
    if (n > 0) {
        SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(a.row_token, 0xFF, sizeof(int32_t) * n, stream));
        SWITCHYARD_CUDA_CHECK(cudaMemsetAsync(a.row_slot, 0xFF, sizeof(int32_t) * n, stream));
    }
    count_experts(a.topk_ids, n, E, a.expert_counts, stream);
    plan_offsets_kernel<<<1, 1024, 0, stream>>>(a.expert_counts, static_cast<int>(E), cap, s.count_offsets,
                                                a.expert_offsets);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
    if (n == 0) return;

    const int threads = 256;
    const int blocks = grid_for(n, threads);
    const int nn = static_cast<int>(n);
    iota_kernel<<<blocks, threads, 0, stream>>>(s.pairs_in, n);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
    size_t temp = s.cub_bytes;
    SWITCHYARD_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(s.cub_temp, temp, a.topk_ids, s.experts_sorted,
                                                          s.pairs_in, s.pairs_sorted, nn, 0, bits_for(E), stream));
    if (!dropping) {
        scatter_rows_kernel<<<blocks, threads, 0, stream>>>(s.pairs_sorted, nullptr, nullptr, n,
                                                            static_cast<int>(a.top_k), a.slot_row, a.row_token,
                                                            a.row_slot);
        SWITCHYARD_CUDA_CHECK_LAUNCH();
        return;
    }
    const int32_t* keep_by_pair = nullptr;
    if (a.drop_policy == DropPolicy::kProbability) {
        prob_keys_kernel<<<blocks, threads, 0, stream>>>(a.topk_ids, a.topk_weights, n, s.keys64_in);
        SWITCHYARD_CUDA_CHECK_LAUNCH();
        temp = s.cub_bytes;
        SWITCHYARD_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(s.cub_temp, temp, s.keys64_in, s.keys64_sorted,
                                                              s.pairs_in, s.pairs_sorted2, nn, 0,
                                                              32 + bits_for(E), stream));
        prob_keep_kernel<<<blocks, threads, 0, stream>>>(s.keys64_sorted, s.pairs_sorted2, n, s.count_offsets, cap,
                                                         s.keep_by_pair);
        SWITCHYARD_CUDA_CHECK_LAUNCH();
        keep_by_pair = s.keep_by_pair;
    }
    keep_flags_kernel<<<blocks, threads, 0, stream>>>(s.experts_sorted, s.pairs_sorted, n, s.count_offsets, cap,
                                                      keep_by_pair, s.flags);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
    temp = s.cub_bytes;
    SWITCHYARD_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(s.cub_temp, temp, s.flags, s.rows, nn, stream));
    scatter_rows_kernel<<<blocks, threads, 0, stream>>>(s.pairs_sorted, s.flags, s.rows, n,
                                                        static_cast<int>(a.top_k), a.slot_row, a.row_token,
                                                        a.row_slot);
    SWITCHYARD_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
