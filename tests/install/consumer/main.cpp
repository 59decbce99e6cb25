// One CPU forward of a small MoE layer through the installed package: builds, links and runs outside the
// Switchyard tree. Exits non-zero when the output is not finite, is all zero or differs between two runs.
#include <switchyard/switchyard.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace sy = switchyard;

static std::vector<float> random_vector(std::mt19937& rng, int64_t n, float scale) {
    std::uniform_real_distribution<float> u(-scale, scale);
    std::vector<float> v(static_cast<size_t>(n));
    for (float& f : v) f = u(rng);
    return v;
}

int main() {
    try {
#ifdef SWITCHYARD_EXPECT_CUDA
#ifdef SWITCHYARD_WITH_CUDA
        const bool defined_cuda = true;
        // A CUDA-only symbol: the consumer must link the CUDA part (cudart, cuBLAS) through the package.
        auto* volatile dense_cuda = &sy::dense_forward_cuda;
        if (dense_cuda == nullptr) return 1;
#else
        const bool defined_cuda = false;
#endif
        if (defined_cuda != static_cast<bool>(SWITCHYARD_EXPECT_CUDA) ||
            sy::has_cuda_backend() != static_cast<bool>(SWITCHYARD_EXPECT_CUDA)) {
            std::fprintf(stderr, "consumer: SWITCHYARD_WITH_CUDA defined=%d, has_cuda_backend()=%d, expected %d\n",
                         int(defined_cuda), int(sy::has_cuda_backend()), int(SWITCHYARD_EXPECT_CUDA));
            return 1;
        }
#endif
        sy::MoEConfig cfg;
        cfg.hidden_size = 32;
        cfg.ffn_size = 48;
        cfg.num_experts = 8;
        cfg.top_k = 2;
        cfg.renormalize = true;
        cfg.dtype = sy::DType::kF32;
        const int64_t T = 16, H = cfg.hidden_size, E = cfg.num_experts;

        std::mt19937 rng(1234);
        std::vector<float> gate = random_vector(rng, E * H, 0.5f);
        std::vector<float> w13 = random_vector(rng, E * cfg.w13_rows() * H, 0.2f);
        std::vector<float> w2 = random_vector(rng, E * H * cfg.ffn_size, 0.2f);
        std::vector<float> x = random_vector(rng, T * H, 1.0f);
        std::vector<float> y1(static_cast<size_t>(T * H), 0.0f), y2(y1.size(), 0.0f);

        sy::MoEWeights w;
        w.gate = sy::TensorRef(gate.data(), sy::DType::kF32, {E, H});
        w.w13 = sy::TensorRef(w13.data(), sy::DType::kF32, {E, cfg.w13_rows(), H});
        w.w2 = sy::TensorRef(w2.data(), sy::DType::kF32, {E, H, cfg.ffn_size});
        sy::MoELayer layer(cfg, w);

        const sy::TensorRef xr(x.data(), sy::DType::kF32, {T, H});
        layer.forward(xr, sy::TensorRef(y1.data(), sy::DType::kF32, {T, H}));
        layer.forward(xr, sy::TensorRef(y2.data(), sy::DType::kF32, {T, H}));

        bool finite = true, nonzero = false;
        for (float v : y1) {
            finite = finite && std::isfinite(v);
            nonzero = nonzero || v != 0.0f;
        }
        const bool same = std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)) == 0;
        std::printf("consumer: switchyard %d.%d.%d (CUDA backend %s), %s, y[0][0..2] = %g %g %g: finite %d, "
                    "non-zero %d, bitwise reproducible %d\n",
                    sy::kVersionMajor, sy::kVersionMinor, sy::kVersionPatch, sy::has_cuda_backend() ? "yes" : "no",
                    cfg.to_string().c_str(), y1[0], y1[1], y1[2], int(finite), int(nonzero), int(same));
        return finite && nonzero && same ? 0 : 1;
    } catch (const sy::Error& e) {
        std::fprintf(stderr, "consumer: switchyard::Error: %s\n", e.what());
        return 1;
    }
}
