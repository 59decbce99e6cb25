// tools/switchyard/stages.h: CPU stage-by-stage timing of the layer, the seed's baseline router, and the
// shape arithmetic (FLOPs, bytes, memory of intermediates) shared by `bench` and `profile`.
//
// time_cpu_stages runs MoELayer::forward on the CPU with a StageCallback that reads the host clock after each stage
// (router; plan; dispatch; gemm1 + activation + gemm2 = experts; shared expert; combine) and returns the median
// time of each stage over `reps` runs after `warmup` runs; their sum is the layer's forward.
// seed_router_cpu is the seed study's router: gate GEMM, softmax over E (fp32), top-k, then the one-hot
// dispatch and combine tensors [T, E, C] in the activation dtype (C = cfg.capacity(T), or when dropless the
// largest expert count, as src/baseline/dense.h does), zero-filled and scattered. Switchyard's counterpart
// is the router plus the routing plan (counts, offsets, rows), which is what switchyard_router_cpu times.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "switchyard/switchyard.h"

namespace switchyard {
namespace cli {

struct StageTimes {
    double router_ms = 0;    // decode x and gate, logits GEMM, scores, top-k
    double plan_ms = 0;      // counts, capacity/drops, offsets, rows
    double dispatch_ms = 0;  // gather of x rows into expert order
    double experts_ms = 0;   // GEMM1 + activation + GEMM2 of every routed expert
    double shared_ms = 0;    // shared expert MLP on every token
    double combine_ms = 0;   // weighted sum of slots (+ shared), rounded to the dtype
    double total_ms() const { return router_ms + plan_ms + dispatch_ms + experts_ms + shared_ms + combine_ms; }
};
// Runs at least `reps` times, and more while under budget_s seconds (median_ms_adaptive's rule).
StageTimes time_cpu_stages(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, int warmup, int reps,
                           double budget_s = 0);

// Median ms of Switchyard's CPU router (logits + top-k + plan) and of the seed's router (logits + softmax +
// top-k + one-hot dispatch/combine tensors). Also returns the seed router's dispatch+combine bytes and C.
struct RouterTimes {
    double switchyard_ms = 0;
    double seed_ms = 0;
    int64_t seed_capacity = 0;
    size_t seed_onehot_bytes = 0;  // dispatch + combine
    size_t switchyard_bytes = 0;   // logits + ids + weights + plan arrays
};
RouterTimes time_routers_cpu(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, int warmup, int reps,
                             double budget_s = 0);

// FLOPs of one forward (router GEMM + routed experts on the kept rows + shared expert); kept_rows = T*k when
// dropless.
double layer_flops(const MoEConfig& cfg, int64_t num_tokens, int64_t kept_rows);
// Bytes that must move at least once: weights of the experts that receive a row, router and shared weights,
// x read and y written (weights in weight_dtype, activations in cfg.dtype).
double layer_bytes(const MoEConfig& cfg, int64_t num_tokens, int64_t experts_hit, DType weight_dtype);

// DESIGN.md's GPU budget: T*k*(2H + 3F)*sizeof(dtype) (each unfused intermediate once), and the fused goal
// T*k*(H + F)*sizeof(dtype).
size_t gpu_budget_bytes(const MoEConfig& cfg, int64_t num_tokens);
size_t gpu_fused_goal_bytes(const MoEConfig& cfg, int64_t num_tokens);

// Probes of this host: OpenMP memcpy bandwidth (GB/s) and the CPU backend's GEMM rate (switchyard::grouped_gemm
// of one group, fp32, GFLOP/s).
double measure_host_bandwidth_gbs();
double measure_cpu_gemm_gflops();

std::string human_bytes(double bytes);

}  // namespace cli
}  // namespace switchyard
