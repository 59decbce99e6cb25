// tests/gpu_test_util.h: helpers shared by the GPU tests (device buffers, random inputs, comparisons).
//
// SWITCHYARD_SKIP_WITHOUT_GPU() skips a test with "no CUDA device" when cudaGetDeviceCount fails or gives 0.
// DeviceBuffer owns cudaMalloc'ed bytes (poisoned with 0xFF bytes on request: NaN for fp32/bf16/fp16, -1 for
// int32). Host data are std::vector<float> holding values already rounded to the dtype they will be stored in;
// encode()/decode() convert exactly to and from the bytes of that dtype. Comparisons report the first bad
// coordinate with got / expected and the number of bad elements, and never pass on NaN unless both are NaN.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "switchyard/dtype.h"
#include "switchyard/tensor.h"

#define SWITCHYARD_SKIP_WITHOUT_GPU()                                                     \
    do {                                                                                  \
        int switchyard_ndev_ = 0;                                                         \
        if (cudaGetDeviceCount(&switchyard_ndev_) != cudaSuccess || switchyard_ndev_ == 0) { \
            cudaGetLastError();                                                           \
            GTEST_SKIP() << "no CUDA device";                                             \
        }                                                                                 \
    } while (0)

#define GPU_CHECK(expr)                                                                                  \
    do {                                                                                                 \
        cudaError_t gpu_check_err_ = (expr);                                                             \
        ASSERT_EQ(gpu_check_err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(gpu_check_err_);   \
    } while (0)

namespace switchyard {
namespace testing {

class DeviceBuffer {
 public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t bytes) { reset(bytes); }
    ~DeviceBuffer() {
        if (ptr_) cudaFree(ptr_);
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    void reset(size_t bytes) {
        if (ptr_) cudaFree(ptr_);
        ptr_ = nullptr;
        bytes_ = bytes;
        if (bytes > 0 && cudaMalloc(&ptr_, bytes) != cudaSuccess) {
            ptr_ = nullptr;
            throw std::runtime_error("cudaMalloc of " + std::to_string(bytes) + " bytes failed");
        }
    }
    void poison() {
        if (bytes_) cudaMemset(ptr_, 0xFF, bytes_);
    }
    template <typename T = void>
    T* get() const {
        return static_cast<T*>(ptr_);
    }
    size_t bytes() const { return bytes_; }

 private:
    void* ptr_ = nullptr;
    size_t bytes_ = 0;
};

// Values already rounded to `t` -> the bytes of dtype t.
inline std::vector<uint8_t> encode(const std::vector<float>& v, DType t) {
    std::vector<uint8_t> out(v.size() * dtype_size(t));
    for (size_t i = 0; i < v.size(); ++i) {
        if (t == DType::kF32) {
            std::memcpy(out.data() + 4 * i, &v[i], 4);
        } else {
            const uint16_t h = t == DType::kBF16 ? float_to_bf16(v[i]) : float_to_half(v[i]);
            std::memcpy(out.data() + 2 * i, &h, 2);
        }
    }
    return out;
}

inline std::vector<float> decode(const std::vector<uint8_t>& b, DType t) {
    const size_t n = b.size() / dtype_size(t);
    std::vector<float> out(n);
    for (size_t i = 0; i < n; ++i) {
        if (t == DType::kF32) {
            std::memcpy(&out[i], b.data() + 4 * i, 4);
        } else {
            uint16_t h;
            std::memcpy(&h, b.data() + 2 * i, 2);
            out[i] = t == DType::kBF16 ? bf16_to_float(h) : half_to_float(h);
        }
    }
    return out;
}

// Uniform values in [lo, hi) rounded to dtype t (never all zeros).
inline std::vector<float> random_values(size_t n, DType t, float lo, float hi, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v) x = round_to(t, d(rng));
    return v;
}

// Uploads floats as dtype t into a fresh device buffer.
inline void upload(DeviceBuffer& buf, const std::vector<float>& v, DType t) {
    const auto bytes = encode(v, t);
    buf.reset(bytes.size());
    if (!bytes.empty()) cudaMemcpy(buf.get(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice);
}
template <typename T>
void upload_raw(DeviceBuffer& buf, const std::vector<T>& v) {
    buf.reset(v.size() * sizeof(T));
    if (!v.empty()) cudaMemcpy(buf.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
}
template <typename T>
std::vector<T> download_raw(const void* dev, size_t n) {
    std::vector<T> v(n);
    if (n) {
        const cudaError_t e = cudaMemcpy(v.data(), dev, n * sizeof(T), cudaMemcpyDeviceToHost);
        if (e != cudaSuccess) throw std::runtime_error(std::string("cudaMemcpy D2H: ") + cudaGetErrorString(e));
    }
    return v;
}
inline std::vector<float> download(const void* dev, size_t n, DType t) {
    return decode(download_raw<uint8_t>(dev, n * dtype_size(t)), t);
}

inline double rms(const std::vector<float>& v) {
    double s = 0.0;
    for (float x : v) s += static_cast<double>(x) * x;
    return v.empty() ? 0.0 : std::sqrt(s / v.size());
}

// One unit in the last place of v stored in dtype dt (fp16: not below its smallest subnormal).
inline double ulp_of(DType dt, double v) {
    const int p = dt == DType::kBF16 ? 7 : dt == DType::kF16 ? 10 : 23;
    int e = 0;
    std::frexp(v == 0.0 ? 1e-30 : v, &e);
    return std::max(std::ldexp(1.0, e - 1 - p), dt == DType::kF16 ? std::ldexp(1.0, -24) : 0.0);
}

// Every element: |got - ref| <= atol + rtol * |ref| (NaN only where ref is NaN). Reports the first bad one.
inline ::testing::AssertionResult all_close(const std::vector<float>& got, const std::vector<float>& ref, double atol,
                                            double rtol, const std::string& what, int64_t row_width = 0) {
    if (got.size() != ref.size())
        return ::testing::AssertionFailure() << what << ": size " << got.size() << " vs " << ref.size();
    int64_t bad = 0, first = -1;
    double worst = 0.0;
    for (size_t i = 0; i < got.size(); ++i) {
        const double g = got[i], r = ref[i];
        bool ok;
        if (std::isnan(r) || std::isnan(g)) {
            ok = std::isnan(r) && std::isnan(g);
        } else if (std::isinf(r) || std::isinf(g)) {
            ok = g == r;
        } else {
            const double d = std::fabs(g - r);
            ok = d <= atol + rtol * std::fabs(r);
            worst = std::max(worst, d / (atol + rtol * std::fabs(r)));
        }
        if (!ok) {
            if (first < 0) first = static_cast<int64_t>(i);
            ++bad;
        }
    }
    if (bad == 0) return ::testing::AssertionSuccess();
    auto f = ::testing::AssertionFailure();
    f << what << ": " << bad << " of " << got.size() << " elements differ (atol " << atol << ", rtol " << rtol
      << "); first at index " << first;
    if (row_width > 0) f << " = [" << first / row_width << ", " << first % row_width << "]";
    f << ": got " << got[first] << ", expected " << ref[first];
    return f;
}

template <typename T>
::testing::AssertionResult all_equal(const std::vector<T>& got, const std::vector<T>& ref, const std::string& what,
                                     int64_t row_width = 0) {
    if (got.size() != ref.size())
        return ::testing::AssertionFailure() << what << ": size " << got.size() << " vs " << ref.size();
    int64_t bad = 0, first = -1;
    for (size_t i = 0; i < got.size(); ++i) {
        if (!(got[i] == ref[i])) {
            if (first < 0) first = static_cast<int64_t>(i);
            ++bad;
        }
    }
    if (bad == 0) return ::testing::AssertionSuccess();
    auto f = ::testing::AssertionFailure();
    f << what << ": " << bad << " of " << got.size() << " elements differ; first at index " << first;
    if (row_width > 0) f << " = [" << first / row_width << ", " << first % row_width << "]";
    f << ": got " << +got[first] << ", expected " << +ref[first];
    return f;
}

// Bitwise equality of two byte images (run-to-run determinism).
inline ::testing::AssertionResult bitwise_equal(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b,
                                                const std::string& what) {
    if (a.size() != b.size()) return ::testing::AssertionFailure() << what << ": sizes differ";
    for (size_t i = 0; i < a.size(); ++i)
        if (a[i] != b[i])
            return ::testing::AssertionFailure() << what << ": first differing byte " << i << " (" << +a[i] << " vs "
                                                 << +b[i] << ")";
    return ::testing::AssertionSuccess();
}

// Whether device 0 is an sm_90 GPU (the architecture of the CUTLASS kernels); false without a device.
inline bool sm90_device() {
    int count = 0, major = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        cudaGetLastError();
        return false;
    }
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
    return major == 9;
}

// A CUDA TensorRef (device 0) over a DeviceBuffer.
inline TensorRef device_ref(const DeviceBuffer& b, DType t, std::initializer_list<int64_t> dims) {
    return TensorRef(b.get(), t, dims, Device::kCUDA, 0);
}

// Rows per expert: Poisson(mean) for each of num_experts experts, expert 1 left empty.
inline std::vector<int32_t> poisson_counts(int num_experts, int mean, uint32_t seed) {
    std::mt19937 rng(seed);
    std::poisson_distribution<int> d(mean);
    std::vector<int32_t> c(num_experts);
    for (auto& v : c) v = d(rng);
    c[1] = 0;
    return c;
}

}  // namespace testing
}  // namespace switchyard
