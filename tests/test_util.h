// tests/test_util.h: header-only helpers shared by every test (CPU and GPU suites).
//
// What is here (all in namespace switchyard::test):
//   random_uniform(n, seed, lo, hi)   fixed-seed uniform floats (std::mt19937_64; same values on every platform
//                                     because the float is built from the raw 64-bit draws, not <random>'s
//                                     distributions, whose output is implementation-defined)
//   random_ints(n, seed, lo, hi)      small integers in [lo, hi] as floats (exact products and sums)
//   rounded(v, dtype)                 each value rounded to dtype (what storing it in that dtype keeps)
//   HostTensor                        owns host bytes of any DType with a shape; ref() gives a TensorRef,
//                                     from_floats() encodes (rounding to nearest even), to_floats() decodes
//   all_close(got, want, shape, atol, rtol)
//                                     every element |got - want| <= atol + rtol * |want| (NaN matches only NaN,
//                                     inf matches only the same inf); on failure the message gives the number of
//                                     bad elements and the first bad coordinate with got / expected
//   all_equal(got, want, shape)       exact equality (floats compared bitwise, so -0 != +0 and NaN == same NaN)
//   coord_string(flat, shape)         "[t, h]" for a flat index
//   tiny_config(dtype)                H=8, F=6, E=4, k=2, softmax, SwiGLU: a layer small enough to reason about
//   HostLayer / random_layer(cfg, seed, weight_dtype)
//                                     owning host weights for a config (random, fixed seed) and their MoEWeights
// Use SCOPED_TRACE(seed_trace(seed)) in every randomised test so a failure prints its seed.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "ref/ref.h"
#include "switchyard/config.h"
#include "switchyard/error.h"
#include "switchyard/dtype.h"
#include "switchyard/moe_layer.h"
#include "switchyard/routing.h"
#include "switchyard/tensor.h"

namespace switchyard {
namespace test {

inline std::string seed_trace(uint64_t seed) { return "seed=" + std::to_string(seed); }

// Uniform floats in [lo, hi) from the top 24 bits of each 64-bit draw (platform-independent).
inline std::vector<float> random_uniform(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
    std::mt19937_64 gen(seed);
    std::vector<float> v(n);
    for (auto& x : v) {
        const double u = static_cast<double>(gen() >> 40) / 16777216.0;  // [0, 1), 24 bits
        x = static_cast<float>(lo + (hi - lo) * u);
    }
    return v;
}

// Integers in [lo, hi] as floats (platform-independent).
inline std::vector<float> random_ints(size_t n, uint64_t seed, int lo, int hi) {
    std::mt19937_64 gen(seed);
    std::vector<float> v(n);
    const uint64_t span = static_cast<uint64_t>(hi - lo + 1);
    for (auto& x : v) x = static_cast<float>(lo + static_cast<int>(gen() % span));
    return v;
}

inline std::vector<float> rounded(std::vector<float> v, DType t) {
    for (auto& x : v) x = round_to(t, x);
    return v;
}

// Host memory of any dtype with a shape; the TensorRef it hands out stays valid while the object lives.
class HostTensor {
 public:
    HostTensor() = default;
    HostTensor(DType t, std::vector<int64_t> shape) : dtype_(t), shape_(std::move(shape)) {
        bytes_.assign(static_cast<size_t>(numel()) * dtype_size(t) + 1, 0);  // +1: data() is never null
    }
    static HostTensor from_floats(const std::vector<float>& v, DType t, std::vector<int64_t> shape) {
        HostTensor h(t, std::move(shape));
        EXPECT_EQ(static_cast<int64_t>(v.size()), h.numel()) << "HostTensor::from_floats: size mismatch";
        for (int64_t i = 0; i < h.numel() && i < static_cast<int64_t>(v.size()); ++i) h.set(i, v[i]);
        return h;
    }
    bool defined() const { return !shape_.empty(); }
    int64_t numel() const {
        int64_t n = 1;
        for (int64_t d : shape_) n *= d;
        return shape_.empty() ? 0 : n;
    }
    DType dtype() const { return dtype_; }
    const std::vector<int64_t>& shape() const { return shape_; }
    void* data() { return bytes_.data(); }
    const void* data() const { return bytes_.data(); }
    template <typename T>
    T* ptr() {
        return reinterpret_cast<T*>(bytes_.data());
    }
    template <typename T>
    const T* ptr() const {
        return reinterpret_cast<const T*>(bytes_.data());
    }
    // TensorRef view (undefined TensorRef when this HostTensor is empty).
    TensorRef ref() const {
        if (shape_.empty()) return TensorRef();
        return TensorRef::contiguous(const_cast<unsigned char*>(bytes_.data()), dtype_, shape_.data(),
                                     static_cast<int>(shape_.size()));
    }
    float get(int64_t i) const {
        switch (dtype_) {
            case DType::kF32:
                return ptr<float>()[i];
            case DType::kBF16:
                return bf16_to_float(ptr<uint16_t>()[i]);
            case DType::kF16:
                return half_to_float(ptr<uint16_t>()[i]);
            case DType::kI32:
                return static_cast<float>(ptr<int32_t>()[i]);
            case DType::kI64:
                return static_cast<float>(ptr<int64_t>()[i]);
            case DType::kF64:
                return static_cast<float>(ptr<double>()[i]);
            case DType::kF8E4M3:
                return fp8_e4m3_to_float(ptr<uint8_t>()[i]);
        }
        return 0.0f;
    }
    void set(int64_t i, float v) {
        switch (dtype_) {
            case DType::kF32:
                ptr<float>()[i] = v;
                break;
            case DType::kBF16:
                ptr<uint16_t>()[i] = float_to_bf16(v);
                break;
            case DType::kF16:
                ptr<uint16_t>()[i] = float_to_half(v);
                break;
            case DType::kI32:
                ptr<int32_t>()[i] = static_cast<int32_t>(v);
                break;
            case DType::kI64:
                ptr<int64_t>()[i] = static_cast<int64_t>(v);
                break;
            case DType::kF64:
                ptr<double>()[i] = v;
                break;
            case DType::kF8E4M3:
                ptr<uint8_t>()[i] = float_to_fp8_e4m3(v);
                break;
        }
    }
    std::vector<float> to_floats() const {
        std::vector<float> v(static_cast<size_t>(numel()));
        for (int64_t i = 0; i < numel(); ++i) v[i] = get(i);
        return v;
    }

 private:
    DType dtype_ = DType::kF32;
    std::vector<int64_t> shape_;
    std::vector<unsigned char> bytes_;
};

inline std::string coord_string(int64_t flat, const std::vector<int64_t>& shape) {
    std::vector<int64_t> idx(shape.size(), 0);
    for (size_t d = shape.size(); d-- > 0;) {
        const int64_t s = shape[d] > 0 ? shape[d] : 1;
        idx[d] = flat % s;
        flat /= s;
    }
    std::ostringstream os;
    os << "[";
    for (size_t d = 0; d < idx.size(); ++d) os << (d ? ", " : "") << idx[d];
    os << "]";
    return os.str();
}

inline ::testing::AssertionResult all_close(const float* got, const float* want, const std::vector<int64_t>& shape,
                                            double atol, double rtol) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    int64_t bad = 0, first = -1;
    double worst = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const double g = got[i], w = want[i];
        bool ok;
        if (std::isnan(w) || std::isnan(g))
            ok = std::isnan(w) && std::isnan(g);
        else if (std::isinf(w) || std::isinf(g))
            ok = g == w;
        else {
            const double err = std::fabs(g - w);
            ok = err <= atol + rtol * std::fabs(w);
            if (!ok) worst = std::max(worst, err);
        }
        if (!ok) {
            if (first < 0) first = i;
            ++bad;
        }
    }
    if (bad == 0) return ::testing::AssertionSuccess();
    std::ostringstream os;
    os.precision(9);
    os << bad << " of " << n << " elements differ (atol=" << atol << ", rtol=" << rtol << ", max abs err=" << worst
       << "); first at " << coord_string(first, shape) << ": got " << got[first] << ", expected " << want[first];
    return ::testing::AssertionFailure() << os.str();
}

inline ::testing::AssertionResult all_close(const std::vector<float>& got, const std::vector<float>& want,
                                            const std::vector<int64_t>& shape, double atol, double rtol) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    if (static_cast<int64_t>(got.size()) != n || static_cast<int64_t>(want.size()) != n)
        return ::testing::AssertionFailure() << "size mismatch: got " << got.size() << ", expected " << want.size()
                                             << ", shape has " << n << " elements";
    return all_close(got.data(), want.data(), shape, atol, rtol);
}

namespace detail {
template <typename T>
bool same(const T& a, const T& b) {
    return a == b;
}
inline bool same(const float& a, const float& b) { return float_bits(a) == float_bits(b); }
inline bool same(const double& a, const double& b) { return std::memcmp(&a, &b, sizeof(double)) == 0; }
}  // namespace detail

// Exact element-wise equality (bitwise for floating point).
template <typename T>
::testing::AssertionResult all_equal(const std::vector<T>& got, const std::vector<T>& want,
                                     const std::vector<int64_t>& shape) {
    if (got.size() != want.size())
        return ::testing::AssertionFailure() << "size mismatch: got " << got.size() << ", expected " << want.size();
    int64_t bad = 0, first = -1;
    for (size_t i = 0; i < got.size(); ++i) {
        if (!detail::same(got[i], want[i])) {
            if (first < 0) first = static_cast<int64_t>(i);
            ++bad;
        }
    }
    if (bad == 0) return ::testing::AssertionSuccess();
    std::ostringstream os;
    os.precision(17);
    os << bad << " of " << got.size() << " elements differ; first at " << coord_string(first, shape) << ": got "
       << got[first] << ", expected " << want[first];
    return ::testing::AssertionFailure() << os.str();
}

// A layer small enough to compute by hand: H=8, F=6, E=4, k=2, softmax, SwiGLU, dropless.
inline MoEConfig tiny_config(DType dtype = DType::kF32) {
    MoEConfig c;
    c.hidden_size = 8;
    c.ffn_size = 6;
    c.num_experts = 4;
    c.top_k = 2;
    c.dtype = dtype;
    return c;
}

// Host buffers of a routing plan (E experts, T tokens with `slots` slots each, R reserved rows) and the RoutingPlan
// that views them (routing.h). Not copyable: the plan points into the buffers.
struct PlanTensors {
    HostTensor counts, offsets, slot_row, row_token, row_slot;
    RoutingPlan plan;
    PlanTensors(int64_t E, int64_t T, int64_t slots, int64_t R)
        : counts(DType::kI32, {E}), offsets(DType::kI32, {E + 1}), slot_row(DType::kI32, {T, slots}),
          row_token(DType::kI32, {R}), row_slot(DType::kI32, {R}) {
        plan.expert_counts = counts.ref();
        plan.expert_offsets = offsets.ref();
        plan.slot_row = slot_row.ref();
        plan.row_token = row_token.ref();
        plan.row_slot = row_slot.ref();
    }
    PlanTensors(const PlanTensors&) = delete;
    PlanTensors& operator=(const PlanTensors&) = delete;
};

// Owning host weights of a layer and the MoEWeights that view them.
struct HostLayer {
    MoEConfig cfg;
    HostTensor gate, score_bias, w13, w2, shared_w13, shared_w2, shared_gate;
    MoEWeights weights() const {
        MoEWeights w;
        w.gate = gate.ref();
        w.score_bias = score_bias.ref();
        w.w13 = w13.ref();
        w.w2 = w2.ref();
        w.shared_w13 = shared_w13.ref();
        w.shared_w2 = shared_w2.ref();
        w.shared_gate = shared_gate.ref();
        return w;
    }
};

// Random weights (uniform in [-1, 1) scaled by 1/sqrt(fan_in), so activations stay O(1)); the score bias (when
// cfg.use_score_bias) is uniform in [-0.1, 0.1). Deterministic in seed.
inline HostLayer random_layer(const MoEConfig& cfg, uint64_t seed, DType weight_dtype = DType::kF32) {
    HostLayer l;
    l.cfg = cfg;
    const int64_t hidden = cfg.hidden_size, ffn = cfg.ffn_size, num_experts = cfg.num_experts;
    auto scaled = [](std::vector<float> v, double fan_in) {
        const float s = static_cast<float>(1.0 / std::sqrt(fan_in));
        for (auto& x : v) x *= s;
        return v;
    };
    const int64_t r13 = cfg.w13_rows();
    l.gate = HostTensor::from_floats(scaled(random_uniform(num_experts * hidden, seed * 7 + 1), hidden), weight_dtype,
                                     {num_experts, hidden});
    l.w13 = HostTensor::from_floats(scaled(random_uniform(num_experts * r13 * hidden, seed * 7 + 2), hidden),
                                    weight_dtype, {num_experts, r13, hidden});
    l.w2 = HostTensor::from_floats(scaled(random_uniform(num_experts * hidden * ffn, seed * 7 + 3), ffn), weight_dtype,
                                   {num_experts, hidden, ffn});
    if (cfg.use_score_bias)
        l.score_bias =
            HostTensor::from_floats(random_uniform(num_experts, seed * 7 + 4, -0.1f, 0.1f), DType::kF32, {num_experts});
    if (cfg.num_shared_experts > 0) {
        const int64_t s = cfg.shared_width();
        const int64_t rows = is_gated(cfg.activation) ? 2 * s : s;
        l.shared_w13 = HostTensor::from_floats(scaled(random_uniform(rows * hidden, seed * 7 + 5), hidden),
                                               weight_dtype, {rows, hidden});
        l.shared_w2 =
            HostTensor::from_floats(scaled(random_uniform(hidden * s, seed * 7 + 6), s), weight_dtype, {hidden, s});
        if (cfg.shared_expert_gate)
            l.shared_gate = HostTensor::from_floats(scaled(random_uniform(hidden, seed * 7 + 8), hidden), weight_dtype,
                                                    {1, hidden});
    }
    return l;
}

// Expects f() to throw switchyard::Error whose message contains every one of parts.
inline void expect_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
    try {
        f();
        ADD_FAILURE() << "no Error thrown (expected a message with '" << parts[0] << "')";
    } catch (const Error& e) {
        const std::string msg = e.what();
        for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "missing '" << p << "' in: " << msg;
    }
}

// The CPU forward as one monolithic function (tests/ref_pipeline.cpp): the oracle MoELayer's CPU forward, a chain
// of the public stages, must equal bitwise. plan_out receives the routing plan when not null.
void ref_moe_forward(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, const TensorRef& y,
                     ForwardOutputs* out, ref::HostPlan* plan_out = nullptr);

}  // namespace test
}  // namespace switchyard
