// tools/switchyard/bench_quant.h: FP8 pieces of `switchyard bench --quant fp8-block|fp8-tensor` shared by the CPU
// path (bench.cpp) and the CUDA path (bench_cuda.cpp), header-only.
//
//   fp8_scale_shape        the scale tensor of M stacked [R, C] matrices (M = 0: one matrix, no leading dim) under a
//                          mode, as MoELayer wants it (docs/fp8.md): block [M, B(R), B(C)], tensor [M] (or [1]).
//   quantize_matrices_host M float matrices [R, C] (fp32, bf16, fp16 bytes) to e4m3 codes and fp32 scales by
//                          io/quantize.h's recipe (io::quantize_fp8_block; fp8-tensor: io::fp8_scale_for_amax of the
//                          matrix's amax, then io::quantize_fp8_with_scale): the CPU bench's weights, and the host
//                          side of the check of the GPU quantiser.
//   fp8_layer_bytes        the bytes floor of an FP8 layer: the router gate (cfg.dtype), the e4m3 codes (1 byte an
//                          element) and fp32 scales of every expert hit and of the shared expert, x and y once.
//   quantize_owned_weights replaces float w13 / w2 / shared_w13 / shared_w2 of host weights by their FP8 form.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cli_common.h"
#include "io/quantize.h"
#include "io/weights.h"
#include "switchyard/stages.h"  // fp8_blocks
#include "switchyard/switchyard.h"

namespace switchyard {
namespace cli {

inline std::vector<int64_t> fp8_scale_shape(QuantMode mode, int64_t num_matrices, int64_t rows, int64_t cols) {
    if (mode == QuantMode::kFP8Block) {
        if (num_matrices == 0) return {fp8_blocks(rows), fp8_blocks(cols)};
        return {num_matrices, fp8_blocks(rows), fp8_blocks(cols)};
    }
    return {num_matrices == 0 ? int64_t{1} : num_matrices};
}

inline int64_t numel_of(const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

// codes: M*R*C bytes; scales: numel_of(fp8_scale_shape(mode, M, R, C)) floats.
inline void quantize_matrices_host(DType dtype, const void* w, int64_t num_matrices, int64_t rows, int64_t cols,
                                   QuantMode mode, uint8_t* codes, float* scales) {
    SWITCHYARD_CHECK(mode == QuantMode::kFP8Block || mode == QuantMode::kFP8Tensor,
                     "quantize_matrices_host: mode=", to_string(mode));
    const int64_t M = std::max<int64_t>(num_matrices, 1), n = rows * cols;
    const int64_t per_scales = mode == QuantMode::kFP8Block ? fp8_blocks(rows) * fp8_blocks(cols) : 1;
    const size_t esz = dtype_size(dtype);
    for (int64_t m = 0; m < M; ++m) {
        const std::vector<float> f = to_floats(static_cast<const uint8_t*>(w) + static_cast<size_t>(m * n) * esz,
                                               dtype, n);
        if (mode == QuantMode::kFP8Block) {
            io::quantize_fp8_block(f.data(), rows, cols, codes + m * n, scales + m * per_scales);
        } else {
            float amax = 0.0f;
            for (float v : f) amax = std::max(amax, std::fabs(v));
            scales[m] = io::fp8_scale_for_amax(amax);
            io::quantize_fp8_with_scale(f.data(), n, scales[m], codes + m * n);
        }
    }
}

inline double fp8_layer_bytes(const MoEConfig& cfg, int64_t num_tokens, int64_t experts_hit) {
    const double H = static_cast<double>(cfg.hidden_size), F = static_cast<double>(cfg.ffn_size);
    const double E = static_cast<double>(cfg.num_experts), S = static_cast<double>(cfg.shared_width());
    const int64_t r13 = cfg.w13_rows(), rs = is_gated(cfg.activation) ? 2 * cfg.shared_width() : cfg.shared_width();
    const bool block = cfg.quant_mode == QuantMode::kFP8Block;
    const double as = static_cast<double>(dtype_size(cfg.dtype));
    auto scale_bytes = [&](int64_t r, int64_t c) {
        return 4.0 * static_cast<double>(block ? fp8_blocks(r) * fp8_blocks(c) : 1);
    };
    const double per_expert = static_cast<double>(r13) * H + H * F + scale_bytes(r13, cfg.hidden_size) +
                              scale_bytes(cfg.hidden_size, cfg.ffn_size);
    double shared = 0;
    if (cfg.shared_width() > 0)
        shared = static_cast<double>(rs) * H + H * S + scale_bytes(rs, cfg.hidden_size) +
                 scale_bytes(cfg.hidden_size, cfg.shared_width());
    return as * E * H + static_cast<double>(experts_hit) * per_expert + shared +
           as * 2 * static_cast<double>(num_tokens) * H;
}

// One float weight [M, R, C] (or [R, C]) of `w` -> its FP8 codes and scales, held by `w`'s buffers.
inline void quantize_owned_matrix(io::OwnedWeights& w, QuantMode mode, TensorRef& t, TensorRef& scale) {
    if (!t.defined()) return;
    const bool stacked = t.rank == 3;
    const int64_t M = stacked ? t.shape[0] : 0, R = t.shape[t.rank - 2], C = t.shape[t.rank - 1];
    std::vector<int64_t> shape(t.shape, t.shape + t.rank);
    TensorRef codes = w.allocate(DType::kF8E4M3, shape);
    TensorRef s = w.allocate(DType::kF32, fp8_scale_shape(mode, M, R, C));
    quantize_matrices_host(t.dtype, t.data, M, R, C, mode, codes.ptr<uint8_t>(), s.ptr<float>());
    t = codes;
    scale = s;
}

inline void quantize_owned_weights(io::OwnedWeights& w, QuantMode mode) {
    quantize_owned_matrix(w, mode, w.w.w13, w.w.w13_scale);
    quantize_owned_matrix(w, mode, w.w.w2, w.w.w2_scale);
    quantize_owned_matrix(w, mode, w.w.shared_w13, w.w.shared_w13_scale);
    quantize_owned_matrix(w, mode, w.w.shared_w2, w.w.shared_w2_scale);
}

}  // namespace cli
}  // namespace switchyard
