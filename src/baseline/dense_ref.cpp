// src/baseline/dense_ref.cpp: the dense GShard baseline on the CPU, its memory formula and argument checks.
//
// Inputs:  x [T, H] of cfg.dtype (host, contiguous); weights as MoEWeights (host, fp32/bf16/fp16 each).
// Output:  y [T, H] of cfg.dtype, written only when the run fits memory_limit_bytes.
// Every tensor of the seed's algorithm (dense.h lists them) is materialised in one host arena laid out by
// dense_layout(), in the layer dtype (fp32 for logits, probs, weights and pre-activations, int32 for ids and
// locations). Routing is ref::router_logits + ref::route + ref::build_plan, i.e. the sparse path's routing and
// drops. Products accumulate in double through ref::gemm_nt (bitwise the naive loop), so h and the expert
// outputs are bitwise those of ref::moe_forward; the combine adds the seed's two roundings (dense.h).
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>
#include <limits>
#include <new>
#include <sstream>
#include <vector>

#include "switchyard/baseline.h"
#include "baseline/dense_common.h"
#include "ref/ref.h"
#include "switchyard/error.h"

namespace switchyard {
namespace {

// The arena's tensors past the router part (DenseLayout offsets >= router_end), as pointers into the main slice,
// which starts at layout offset router_end.
struct DenseBuffers {
    uint8_t *dispatch, *combine, *expert_in;
    float* pre;
    uint8_t *hidden, *expert_out, *product;
    float* shared_pre;
    uint8_t *shared_h, *shared_out, *output;
};
inline DenseBuffers dense_buffers(const DenseLayout& l, void* main_slice) {
    uint8_t* base = static_cast<uint8_t*>(main_slice);
    auto at = [&](size_t offset) { return base + (offset - l.router_end); };
    return DenseBuffers{at(l.dispatch),   at(l.combine),    at(l.expert_in),
                        reinterpret_cast<float*>(at(l.pre)),
                        at(l.hidden),     at(l.expert_out), at(l.product),
                        reinterpret_cast<float*>(at(l.shared_pre)),
                        at(l.shared_h),   at(l.shared_out), at(l.output)};
}


// Loops with less work than this stay on one thread (a parallel region costs more than they do).
constexpr int64_t kParallelMin = int64_t(1) << 16;

size_t sat_mul(size_t a, size_t b) {
    if (a != 0 && b > std::numeric_limits<size_t>::max() / a) return std::numeric_limits<size_t>::max();
    return a * b;
}
size_t sat_add(size_t a, size_t b) {
    return a > std::numeric_limits<size_t>::max() - b ? std::numeric_limits<size_t>::max() : a + b;
}
size_t pad(size_t v) {
    if (v > std::numeric_limits<size_t>::max() - (kDenseAlign - 1)) return std::numeric_limits<size_t>::max();
    return (v + kDenseAlign - 1) / kDenseAlign * kDenseAlign;
}
// Padded bytes of a tensor with these dims and element size.
size_t tensor_bytes(size_t elem, std::initializer_list<int64_t> dims) {
    size_t r = elem;
    for (int64_t d : dims) r = sat_mul(r, static_cast<size_t>(d));
    return pad(r);
}

// Bump placement of the arena's slices (sizes already padded).
struct Placer {
    size_t at = 0;
    size_t place(size_t bytes) {
        size_t here = at;
        at = sat_add(at, bytes);
        return here;
    }
};

std::string fmt_bytes(size_t b) {
    std::ostringstream os;
    os << b << " bytes";
    if (b >= (size_t(1) << 30)) os << " (" << static_cast<double>(b) / double(size_t(1) << 30) << " GiB)";
    return os.str();
}

void check_weight(const TensorRef& t, const char* name, std::initializer_list<int64_t> dims, Device dev) {
    SWITCHYARD_CHECK(t.defined(), "weights.", name, " is required (expected shape of ", dims.size(), " dims)");
    SWITCHYARD_CHECK(t.rank == static_cast<int>(dims.size()), "weights.", name, " has shape ", t.shape_string(),
                     ", expected rank ", dims.size());
    int i = 0;
    for (int64_t d : dims) {
        SWITCHYARD_CHECK(t.shape[i] == d, "weights.", name, " has shape ", t.shape_string(), ": dim ", i,
                         " should be ", d);
        ++i;
    }
    SWITCHYARD_CHECK(t.is_contiguous(), "weights.", name, " ", t.shape_string(), " must be contiguous");
    SWITCHYARD_CHECK(t.device == dev, "weights.", name, " is on ", to_string(t.device), ", expected ",
                     to_string(dev));
    SWITCHYARD_CHECK(t.dtype == DType::kF32 || t.dtype == DType::kBF16 || t.dtype == DType::kF16, "weights.",
                     name, " dtype=", to_string(t.dtype), " is not supported (fp32, bf16, fp16)");
    SWITCHYARD_CHECK(t.data != nullptr || t.numel() == 0, "weights.", name, " has null data");
}

// Element i of a host tensor slice of dtype t.
inline float ld(const uint8_t* base, DType t, int64_t i) { return ref::load_as_float(base, t, i); }
inline void st(uint8_t* base, DType t, int64_t i, float v) { ref::store_from_float(base, t, i, v); }
// A value computed in double, stored in the dtype (through fp32, as every CPU stage stores).
inline float round_double(DType t, double v) { return round_to(t, static_cast<float>(v)); }

// Router probabilities the seed materialises: softmax over E (sigmoid for ScoreFunction::kSigmoid), double math.
void router_probs(const MoEConfig& cfg, const std::vector<float>& logits, int64_t num_tokens, float* probs) {
    const int64_t E = cfg.num_experts;
#pragma omp parallel for schedule(static) if (num_tokens * E > kParallelMin)
    for (int64_t t = 0; t < num_tokens; ++t) {
        const float* l = logits.data() + t * E;
        float* p = probs + t * E;
        if (cfg.score_function == ScoreFunction::kSigmoid) {
            for (int64_t e = 0; e < E; ++e) p[e] = static_cast<float>(1.0 / (1.0 + std::exp(-double(l[e]))));
            continue;
        }
        double mx = -INFINITY;
        for (int64_t e = 0; e < E; ++e) mx = std::max(mx, double(l[e]));
        double sum = 0.0;
        for (int64_t e = 0; e < E; ++e) sum += std::exp(double(l[e]) - mx);
        for (int64_t e = 0; e < E; ++e) p[e] = static_cast<float>(std::exp(double(l[e]) - mx) / sum);
    }
}

// One MLP over `rows` rows of `in_bytes` (dtype dt, [rows, hidden]); pre [rows, R] fp32, h [rows, ffn] dt,
// out [rows, hidden] dt. Products in double (ref::gemm_nt); h from the double accumulators.
void dense_mlp(Activation act, DType dt, const uint8_t* in_bytes, int64_t rows, int64_t hidden, int64_t ffn,
               const ref::MatView& w13, const ref::MatView& w2, float* pre, uint8_t* h, uint8_t* out) {
    if (rows == 0) return;
    const int64_t R = w13.rows;
    const bool gated = is_gated(act);
    std::vector<float> a(static_cast<size_t>(rows * std::max(hidden, ffn)));
    for (int64_t i = 0; i < rows * hidden; ++i) a[i] = ld(in_bytes, dt, i);
    std::vector<double> acc(static_cast<size_t>(rows * std::max(R, hidden)));
    ref::gemm_nt(a.data(), rows, hidden, w13, acc.data());
#pragma omp parallel for schedule(static) if (rows * R > kParallelMin)
    for (int64_t r = 0; r < rows; ++r) {
        // GEMM1's outputs are stored in the layer dtype, as in the sparse path (src/ref/experts.cpp).
        for (int64_t n = 0; n < R; ++n) pre[r * R + n] = round_double(dt, acc[r * R + n]);
        for (int64_t f = 0; f < ffn; ++f) {
            const double up = pre[r * R + (gated ? ffn + f : f)];
            const double gate = gated ? pre[r * R + f] : 0.0;
            const float hv = round_double(dt, ref::apply_activation(act, gate, up));
            st(h, dt, r * ffn + f, hv);
            a[r * ffn + f] = hv;
        }
    }
    ref::gemm_nt(a.data(), rows, ffn, w2, acc.data());
#pragma omp parallel for schedule(static) if (rows * hidden > kParallelMin)
    for (int64_t i = 0; i < rows * hidden; ++i) st(out, dt, i, round_double(dt, acc[i]));
}

ref::MatView mat(const TensorRef& t, int64_t offset_elems, int64_t rows, int64_t cols) {
    ref::MatView v;
    v.data = static_cast<const uint8_t*>(t.data) + static_cast<size_t>(offset_elems) * dtype_size(t.dtype);
    v.dtype = t.dtype;
    v.rows = rows;
    v.cols = cols;
    return v;
}

// Host memory the kernel says is available (MemAvailable; MemFree-based sysconf when /proc is absent).
size_t host_available_bytes() {
    std::ifstream meminfo("/proc/meminfo");
    std::string key;
    size_t kib = 0;
    std::string unit;
    while (meminfo >> key >> kib >> unit) {
        if (key == "MemAvailable:") return sat_mul(kib, 1024);
    }
    const long pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) return sat_mul(static_cast<size_t>(pages), static_cast<size_t>(page));
    return std::numeric_limits<size_t>::max();
}

struct FreeDeleter {
    void operator()(uint8_t* p) const { ::operator delete[](p, std::nothrow); }
};
using HostBuf = std::unique_ptr<uint8_t[], FreeDeleter>;
HostBuf host_alloc(size_t bytes) {
    return HostBuf(static_cast<uint8_t*>(::operator new[](std::max<size_t>(bytes, 1), std::nothrow)));
}

}  // namespace

DenseLayout dense_layout(const MoEConfig& cfg, int64_t num_tokens, int64_t capacity) {
    SWITCHYARD_CHECK(num_tokens >= 0, "num_tokens=", num_tokens, " must be >= 0");
    SWITCHYARD_CHECK(capacity >= 0, "capacity=", capacity, " must be >= 0");
    const size_t a = dtype_size(cfg.dtype);
    const int64_t T = num_tokens, C = capacity, E = cfg.num_experts, k = cfg.top_k, H = cfg.hidden_size;
    const int64_t F = cfg.ffn_size, R = cfg.w13_rows(), S = cfg.shared_width();
    const int64_t Rs = is_gated(cfg.activation) ? 2 * S : S;
    DenseLayout l;
    Placer p;
    l.logits = p.place(tensor_bytes(4, {T, E}));
    l.probs = p.place(tensor_bytes(4, {T, E}));
    l.topk_ids = p.place(tensor_bytes(4, {T, k}));
    l.topk_weights = p.place(tensor_bytes(4, {T, k}));
    l.loc = p.place(tensor_bytes(4, {T, k}));
    l.router_end = p.at;
    l.dispatch = p.place(tensor_bytes(a, {T, E, C}));
    l.combine = p.place(tensor_bytes(a, {T, E, C}));
    l.expert_in = p.place(tensor_bytes(a, {E, C, H}));
    l.pre = p.place(tensor_bytes(4, {E, C, R}));
    l.hidden = p.place(tensor_bytes(a, {E, C, F}));
    l.expert_out = p.place(tensor_bytes(a, {E, C, H}));
    l.product = p.place(tensor_bytes(a, {T, E, C, H}));
    l.shared_pre = p.place(S > 0 ? tensor_bytes(4, {T, Rs}) : 0);
    l.shared_h = p.place(S > 0 ? tensor_bytes(a, {T, S}) : 0);
    l.shared_out = p.place(S > 0 ? tensor_bytes(a, {T, H}) : 0);
    l.output = p.place(tensor_bytes(a, {T, H}));
    l.total = p.at;
    return l;
}

DenseMemory dense_memory(const MoEConfig& cfg, int64_t num_tokens, int64_t capacity) {
    const DenseLayout l = dense_layout(cfg, num_tokens, capacity);
    DenseMemory m;
    m.num_tokens = num_tokens;
    m.capacity = capacity;
    m.router = l.router_end;
    m.dispatch = l.combine - l.dispatch;
    m.combine = l.expert_in - l.combine;
    m.expert_in = l.pre - l.expert_in;
    m.pre = l.hidden - l.pre;
    m.hidden = l.expert_out - l.hidden;
    m.expert_out = l.product - l.expert_out;
    m.product = l.shared_pre - l.product;
    m.shared = l.output - l.shared_pre;
    m.output = l.total - l.output;
    m.total = l.total;
    if (l.total == std::numeric_limits<size_t>::max()) {  // saturated: the differences are meaningless
        m.product = l.total;
    }
    return m;
}

size_t dense_bytes_needed(const MoEConfig& cfg, int64_t num_tokens, int64_t capacity) {
    return dense_layout(cfg, num_tokens, capacity).total;
}

size_t dense_bytes_needed(const MoEConfig& cfg, int64_t num_tokens) {
    const int64_t C = cfg.capacity_factor > 0 ? cfg.capacity(num_tokens) : num_tokens;
    return dense_bytes_needed(cfg, num_tokens, C);
}

void validate_dense_args(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, const TensorRef& y,
                         Device dev) {
    cfg.validate();
    const int64_t E = cfg.num_experts, H = cfg.hidden_size, F = cfg.ffn_size, S = cfg.shared_width();
    for (const TensorRef* t : {&x, &y}) {
        const char* name = t == &x ? "x" : "y";
        SWITCHYARD_CHECK(t->rank == 2 && t->shape[1] == H, name, " has shape ", t->shape_string(),
                         ", expected [T, hidden_size=", H, "]");
        SWITCHYARD_CHECK(t->dtype == cfg.dtype, name, " dtype=", to_string(t->dtype), ", expected cfg.dtype=",
                         to_string(cfg.dtype));
        SWITCHYARD_CHECK(t->is_contiguous(), name, " ", t->shape_string(), " must be contiguous");
        SWITCHYARD_CHECK(t->device == dev, name, " is on ", to_string(t->device), ", expected ", to_string(dev));
        SWITCHYARD_CHECK(t->data != nullptr || t->numel() == 0, name, " has null data");
    }
    SWITCHYARD_CHECK(y.shape[0] == x.shape[0], "y has shape ", y.shape_string(), ", x has ", x.shape_string());
    check_weight(w.gate, "gate", {E, H}, dev);
    check_weight(w.w13, "w13", {E, cfg.w13_rows(), H}, dev);
    check_weight(w.w2, "w2", {E, H, F}, dev);
    if (S > 0) {
        check_weight(w.shared_w13, "shared_w13", {is_gated(cfg.activation) ? 2 * S : S, H}, dev);
        check_weight(w.shared_w2, "shared_w2", {H, S}, dev);
    }
    if (cfg.use_score_bias) {
        SWITCHYARD_CHECK(w.score_bias.defined() && w.score_bias.rank == 1 && w.score_bias.shape[0] == E &&
                             w.score_bias.dtype == DType::kF32 && w.score_bias.device == dev,
                         "weights.score_bias must be [E=", E, "] fp32 on ", to_string(dev),
                         " when use_score_bias (got ", w.score_bias.shape_string(), ")");
    }
    SWITCHYARD_CHECK(!w.w13_scale.defined() && !w.w2_scale.defined(),
                     "weights.w13_scale / w2_scale: quantised experts are not supported by the dense baseline");
    SWITCHYARD_CHECK(!cfg.gate_up_interleaved,
                     "gate_up_interleaved=true: the dense baseline reads w13 in the plain layout (gate rows, then up)");
}

DenseResult dense_forward_cpu(const MoEConfig& cfg, const MoEWeights& w, const TensorRef& x, const TensorRef& y,
                              size_t memory_limit_bytes, LoadStats* stats) {
    validate_dense_args(cfg, w, x, y, Device::kCPU);
    const int64_t T = x.shape[0], E = cfg.num_experts, k = cfg.top_k, H = cfg.hidden_size, F = cfg.ffn_size;
    const int64_t R = cfg.w13_rows(), S = cfg.shared_width();
    const int64_t Rs = is_gated(cfg.activation) ? 2 * S : S;
    const DType dt = cfg.dtype;
    DenseResult res;

    auto refuse = [&](size_t need, int64_t C) {
        res.ran = false;
        res.bytes_needed = need;
        res.capacity = C;
        std::ostringstream os;
        os << "needs " << fmt_bytes(need) << ", limit " << fmt_bytes(memory_limit_bytes);
        res.reason = os.str();
        return res;
    };

    // With a capacity factor, C and so the whole need are known before anything runs.
    if (cfg.capacity_factor > 0) {
        const int64_t C = cfg.capacity(T);
        const size_t need = dense_bytes_needed(cfg, T, C);
        if (need > memory_limit_bytes) return refuse(need, C);
    }

    // ---- router part: logits, probs, top-k, locations (host arena slice [0, router_end)) ----
    const DenseLayout lr = dense_layout(cfg, T, 0);
    HostBuf router = host_alloc(lr.router_end);
    if (!router) {
        res.reason = "host allocation of " + fmt_bytes(lr.router_end) + " for the router failed";
        return res;
    }
    res.peak_bytes = lr.router_end;
    const std::vector<float> xf = ref::to_float(x);
    const std::vector<float> gf = ref::to_float(w.gate);
    const std::vector<float> logits = ref::router_logits(xf, gf, T, H, E);
    std::vector<float> bias;
    if (cfg.use_score_bias) bias = ref::to_float(w.score_bias);
    std::vector<int32_t> ids;
    std::vector<float> wts;
    ref::route(cfg, logits, bias, T, ids, wts);
    const ref::HostPlan plan = ref::build_plan(cfg, T, ids, wts);

    float* a_logits = reinterpret_cast<float*>(router.get() + lr.logits);
    float* a_probs = reinterpret_cast<float*>(router.get() + lr.probs);
    int32_t* a_ids = reinterpret_cast<int32_t*>(router.get() + lr.topk_ids);
    float* a_wts = reinterpret_cast<float*>(router.get() + lr.topk_weights);
    int32_t* a_loc = reinterpret_cast<int32_t*>(router.get() + lr.loc);
    if (T > 0) {
        std::memcpy(a_logits, logits.data(), logits.size() * sizeof(float));
        std::memcpy(a_ids, ids.data(), ids.size() * sizeof(int32_t));
        std::memcpy(a_wts, wts.data(), wts.size() * sizeof(float));
    }
    router_probs(cfg, logits, T, a_probs);
    int64_t max_count = 0;
    for (int64_t e = 0; e < E; ++e) max_count = std::max<int64_t>(max_count, plan.expert_counts[e]);
    const int64_t C = cfg.capacity_factor > 0 ? cfg.capacity(T) : max_count;
    for (int64_t i = 0; i < T * k; ++i) {
        const int32_t r = plan.slot_row[i];
        a_loc[i] = r < 0 ? -1 : r - plan.expert_offsets[ids[i]];
        SWITCHYARD_CHECK(a_loc[i] < C, "internal: location ", a_loc[i], " of pair ", i, " past capacity ", C);
    }
    // ---- the rest of the arena, now that C is known ----
    DenseLayout l;
    if (!dense::record_routing(cfg, T, C, plan, logits, stats, memory_limit_bytes, res, l, refuse)) return res;
    // As the CUDA version checks free device memory: refuse rather than let the kernel's OOM killer decide.
    const size_t avail = host_available_bytes();
    if (l.total - l.router_end > avail) {
        res.reason = "needs " + fmt_bytes(l.total) + ", host has " + fmt_bytes(avail) + " available";
        return res;
    }
    HostBuf main = host_alloc(l.total - l.router_end);
    if (!main) {
        res.reason = "host allocation of " + fmt_bytes(l.total - l.router_end) + " failed (needs " +
                     fmt_bytes(l.total) + " in all)";
        return res;
    }
    res.peak_bytes = l.total;
    // The main slice holds [router_end, total) of the layout.
    const DenseBuffers buf = dense_buffers(l, main.get());
    const size_t a = dtype_size(dt);

    // dispatch / combine [T, E, C]: one-hot, and the combine weight in the dtype.
    std::memset(buf.dispatch, 0, static_cast<size_t>(T * E * C) * a);  // +0.0 in every float dtype
    std::memset(buf.combine, 0, static_cast<size_t>(T * E * C) * a);
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t j = 0; j < k; ++j) {
            const int32_t c = a_loc[t * k + j];
            if (c < 0) continue;
            const int64_t at = (t * E + a_ids[t * k + j]) * C + c;
            st(buf.dispatch, dt, at, 1.0f);
            st(buf.combine, dt, at, round_to(dt, a_wts[t * k + j]));
        }
    }

    // expert_in [E, C, H] = einsum('tec,th->ech', dispatch, x): the dense contraction over every token.
#pragma omp parallel for schedule(static) if (T * E * C * H > kParallelMin)
    for (int64_t ec = 0; ec < E * C; ++ec) {
        const int64_t e = ec / C, c = ec % C;
        std::vector<double> acc(static_cast<size_t>(H), 0.0);
        for (int64_t t = 0; t < T; ++t) {
            const double d = ld(buf.dispatch, dt, (t * E + e) * C + c);
            const float* xr = xf.data() + t * H;
            for (int64_t h = 0; h < H; ++h) acc[h] += d * xr[h];
        }
        for (int64_t h = 0; h < H; ++h) st(buf.expert_in, dt, ec * H + h, round_double(dt, acc[h]));
    }

    // Expert FFNs on [E, C, H] (empty capacity slots hold zero rows and give zero rows).
    for (int64_t e = 0; e < E; ++e) {
        dense_mlp(cfg.activation, dt, buf.expert_in + static_cast<size_t>(e * C * H) * a, C, H, F,
                  mat(w.w13, e * R * H, R, H), mat(w.w2, e * H * F, H, F), buf.pre + e * C * R,
                  buf.hidden + static_cast<size_t>(e * C * F) * a, buf.expert_out + static_cast<size_t>(e * C * H) * a);
    }

    // The seed's broadcast multiply: product[t, e, c, h] = combine[t, e, c] * expert_out[e, c, h].
#pragma omp parallel for schedule(static) if (T * E * C * H > kParallelMin)
    for (int64_t tec = 0; tec < T * E * C; ++tec) {
        const int64_t ec = tec % (E * C);
        const float cw = ld(buf.combine, dt, tec);
        for (int64_t h = 0; h < H; ++h) {
            // Both factors are dtype values: their fp32 product is exact for bf16/fp16 and one fp32 rounding
            // for fp32, then one rounding to the dtype (as CUDA's __fmul_rn + conversion).
            st(buf.product, dt, tec * H + h, round_to(dt, cw * ld(buf.expert_out, dt, ec * H + h)));
        }
    }

    // Shared experts on every token, as the sparse path adds them.
    if (S > 0) {
        dense_mlp(cfg.activation, dt, static_cast<const uint8_t*>(x.data), T, H, S, mat(w.shared_w13, 0, Rs, H),
                  mat(w.shared_w2, 0, H, S), buf.shared_pre, buf.shared_h,
                  buf.shared_out);
    }

    // out[t, h] = dtype( sum_e sum_c product[t, e, c, h] + shared_out[t, h] ), double accumulation.
#pragma omp parallel for schedule(static) if (T * E * C * H > kParallelMin)
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t h = 0; h < H; ++h) {
            double acc = 0.0;
            for (int64_t e = 0; e < E; ++e)
                for (int64_t c = 0; c < C; ++c) acc += ld(buf.product, dt, ((t * E + e) * C + c) * H + h);
            if (S > 0) acc += ld(buf.shared_out, dt, t * H + h);
            st(buf.output, dt, t * H + h, round_double(dt, acc));
        }
    }
    if (T > 0) std::memcpy(y.data, buf.output, static_cast<size_t>(T * H) * a);
    res.ran = true;
    res.reason.clear();
    return res;
}

}  // namespace switchyard
