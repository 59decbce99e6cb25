// src/ref/stages_ref.cpp: the CPU backend of switchyard/stages.h (declared in src/ref/stages_ref.h).
//
// Thin adapters from checked host TensorRefs to the specification functions (ref.h, backward.h): inputs read as
// double, outputs stored once (store_from_double). The layer's forward chains these stages and so computes exactly
// what the numerical contract of moe_layer.h says: GEMM1 outputs, h, expert outputs, the shared output and y each
// rounded once to the layer dtype, products summed in double.
#include "ref/stages_ref.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ref/backward.h"
#include "ref/ref.h"
#include "switchyard/error.h"
#include "switchyard/stages.h"

namespace switchyard {
namespace ref {
namespace stage {
namespace {

template <typename T>
std::vector<T> copy_vector(const TensorRef& t) {
    const T* p = t.ptr<T>();
    return std::vector<T>(p, p + (t.defined() ? t.numel() : 0));
}

template <typename T>
void copy_out(const std::vector<T>& v, const TensorRef& t) {
    if (t.defined() && !v.empty()) std::memcpy(t.data, v.data(), v.size() * sizeof(T));
}

// Group offsets on the host: the given [E+1] int32 tensor, or one group of all rows when undefined. Checked: from 0,
// non-decreasing, offsets[E] <= rows.
std::vector<int32_t> host_offsets(const TensorRef& offsets, int64_t rows) {
    std::vector<int32_t> off =
        offsets.defined() ? copy_vector<int32_t>(offsets) : std::vector<int32_t>{0, static_cast<int32_t>(rows)};
    SWITCHYARD_CHECK(off.size() >= 1 && off[0] == 0, "offsets[0]=", off.empty() ? -1 : off[0], ", expected 0");
    for (size_t e = 0; e + 1 < off.size(); ++e)
        SWITCHYARD_CHECK(off[e + 1] >= off[e], "offsets decrease at group ", e, ": ", off[e], " > ", off[e + 1]);
    SWITCHYARD_CHECK(off.back() <= rows, "offsets[E]=", off.back(), " exceeds the ", rows, " rows of the operand");
    return off;
}

bool is_f64(const TensorRef& t) { return t.dtype == DType::kF64; }

// A [rows, cols] matrix of a 16/32-bit float tensor as gemm_nt reads it.
MatView mat_view(const TensorRef& t, int64_t index, int64_t rows, int64_t cols) {
    const char* base = static_cast<const char*>(t.data);
    return MatView{base + static_cast<size_t>(index * rows * cols) * dtype_size(t.dtype), t.dtype, rows, cols};
}

// Writes 0 to rows [from, rows) of a row-major [rows, width] tensor.
void zero_rows(const TensorRef& t, int64_t from, int64_t rows, int64_t width) {
    if (from >= rows) return;
    char* base = static_cast<char*>(t.data) + static_cast<size_t>(from * width) * dtype_size(t.dtype);
    std::memset(base, 0, static_cast<size_t>((rows - from) * width) * dtype_size(t.dtype));  // +0.0 in every dtype
}

// The routing plan as a HostPlan (for the statistics functions).
HostPlan host_plan(const MoEConfig& cfg, int64_t num_tokens, const TensorRef& topk_ids, const RoutingPlan& plan) {
    HostPlan p;
    p.num_tokens = num_tokens;
    p.top_k = cfg.route_slots();
    p.num_experts = cfg.num_experts;
    p.expert_choice = cfg.expert_choice();
    p.topk_ids = copy_vector<int32_t>(topk_ids);
    p.expert_counts = copy_vector<int32_t>(plan.expert_counts);
    p.expert_offsets = copy_vector<int32_t>(plan.expert_offsets);
    if (plan.slot_row.defined()) p.slot_row = copy_vector<int32_t>(plan.slot_row);
    return p;
}

}  // namespace

void router_gemm(const TensorRef& x, const TensorRef& gate, const TensorRef& logits) {
    const int64_t num_tokens = x.shape[0], hidden = x.shape[1], num_experts = gate.shape[0];
    copy_out(router_logits(to_float(x), to_float(gate), num_tokens, hidden, num_experts), logits);
}

// The router GEMM's backward is the grouped GEMM's with one group of all T rows (dc = d_logits [T, E], b = gate
// [1, E, H], a = x): the same double sums in increasing index, each stored through store_from_double.
void router_gemm_backward(const TensorRef& x, const TensorRef& gate, const TensorRef& d_logits, const TensorRef& dx,
                          const TensorRef& dgate) {
    const int64_t T = x.shape[0], H = x.shape[1], E = gate.shape[0];
    SWITCHYARD_CHECK(T <= INT32_MAX, "router_gemm_backward: num_tokens=", T, " exceeds int32");
    const int32_t offsets[2] = {0, static_cast<int32_t>(T)};
    const std::vector<double> d = to_double(d_logits);
    const std::vector<double> g = dx.defined() ? to_double(gate) : std::vector<double>();
    const std::vector<double> xs = dgate.defined() ? to_double(x) : std::vector<double>();
    std::vector<double> out_dx(dx.defined() ? static_cast<size_t>(T * H) : 0);
    std::vector<double> out_dg(dgate.defined() ? static_cast<size_t>(E * H) : 0);
    grouped_gemm_backward(offsets, 1, dgate.defined() ? xs.data() : nullptr, dx.defined() ? g.data() : nullptr,
                          d.data(), T, E, H, dx.defined() ? out_dx.data() : nullptr,
                          dgate.defined() ? out_dg.data() : nullptr);
    if (dx.defined()) store_all(out_dx, dx);
    if (dgate.defined()) store_all(out_dg, dgate);
}

void route(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& score_bias, const TensorRef& topk_ids,
           const TensorRef& topk_weights) {
    const int64_t num_tokens = logits.shape[0];
    // The selection always runs on fp32 logits (as the layer's router stores them).
    const std::vector<float> l32 = to_float(logits);
    std::vector<float> bias;
    if (cfg.use_score_bias) bias = to_float(score_bias);
    std::vector<int32_t> ids;
    std::vector<float> w;
    ref::route(cfg, l32, bias, num_tokens, ids, w);
    copy_out(ids, topk_ids);
    if (topk_weights.dtype == DType::kF32 && logits.dtype == DType::kF32) {
        copy_out(w, topk_weights);
        return;
    }
    // fp64 weights (or fp64 logits): the weights in double from the logits read as double (route_weights equals
    // route's weights before their final rounding).
    const std::vector<double> l64 = to_double(logits);
    std::vector<double> wd(static_cast<size_t>(num_tokens * cfg.top_k));
    route_weights(cfg, l64.data(), ids.data(), num_tokens, wd.data());
    store_all(wd, topk_weights);
}

void route_expert_choice(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                         const TensorRef& topk_weights, const RoutingPlan& plan) {
    const HostPlan p = ref::route_expert_choice(cfg, to_float(logits), logits.shape[0]);
    copy_out(p.topk_ids, topk_ids);
    copy_out(p.topk_weights, topk_weights);
    copy_out(p.expert_counts, plan.expert_counts);
    copy_out(p.expert_offsets, plan.expert_offsets);
    copy_out(p.slot_row, plan.slot_row);
    // row_token / row_slot are reserved for E*C rows; the HostPlan holds [T*E] entries (-1 past E*C).
    const size_t rows = static_cast<size_t>(plan.row_token.numel());
    std::vector<int32_t> rt(p.row_token.begin(), p.row_token.begin() + std::min(rows, p.row_token.size()));
    rt.resize(rows, -1);
    copy_out(rt, plan.row_token);
    std::vector<int32_t> rs(p.row_slot.begin(), p.row_slot.begin() + std::min(rows, p.row_slot.size()));
    rs.resize(rows, -1);
    copy_out(rs, plan.row_slot);
}

void build_plan(const MoEConfig& cfg, const TensorRef& topk_ids, const TensorRef& topk_weights,
                const RoutingPlan& plan) {
    const HostPlan p =
        ref::build_plan(cfg, topk_ids.shape[0], copy_vector<int32_t>(topk_ids), to_float(topk_weights));
    copy_out(p.expert_counts, plan.expert_counts);
    copy_out(p.expert_offsets, plan.expert_offsets);
    copy_out(p.slot_row, plan.slot_row);
    copy_out(p.row_token, plan.row_token);
    copy_out(p.row_slot, plan.row_slot);
}

void gather(const TensorRef& x, const TensorRef& row_token, const TensorRef& xp, const TensorRef& slot_row) {
    const int64_t rows = xp.shape[0];
    const size_t row_bytes = static_cast<size_t>(x.shape[1]) * dtype_size(x.dtype);
    const int32_t* rt = row_token.ptr<int32_t>();
    const int64_t num_tokens = x.shape[0];
    for (int64_t r = 0; r < rows; ++r)
        SWITCHYARD_CHECK(rt[r] < num_tokens, "row_token[", r, "]=", rt[r], " is not a token of x (T=", num_tokens, ")");
    if (slot_row.defined()) {  // the CUDA backend writes by pairs: the two maps must describe the same rows
        const int64_t k = slot_row.shape[1];
        const int32_t* sr = slot_row.ptr<int32_t>();
        std::vector<char> pointed(static_cast<size_t>(rows), 0);
        for (int64_t t = 0; t < num_tokens; ++t) {
            for (int64_t j = 0; j < k; ++j) {
                const int32_t r = sr[t * k + j];
                if (r < 0) continue;
                SWITCHYARD_CHECK(r < rows && rt[r] == t && !pointed[r], "gather: slot_row[", t, ", ", j, "]=", r,
                                 " is not a row of token ", t, " in row_token that no other pair points at");
                pointed[r] = 1;
            }
        }
        for (int64_t r = 0; r < rows; ++r)
            SWITCHYARD_CHECK(rt[r] < 0 || pointed[r], "gather: row ", r, " of token ", rt[r],
                             " is pointed at by no pair of slot_row");
    }
    char* dst = static_cast<char*>(xp.data);
    const char* src = static_cast<const char*>(x.data);
#pragma omp parallel for schedule(static) if (rows * static_cast<int64_t>(row_bytes) >= (1 << 20))
    for (int64_t r = 0; r < rows; ++r) {
        if (rt[r] < 0)
            std::memset(dst + r * row_bytes, 0, row_bytes);
        else
            std::memcpy(dst + r * row_bytes, src + static_cast<int64_t>(rt[r]) * row_bytes, row_bytes);
    }
}

void gather_backward(const TensorRef& d_xp, const TensorRef& slot_row, const TensorRef& dx) {
    const int64_t num_tokens = slot_row.shape[0], k = slot_row.shape[1], hidden = d_xp.shape[1];
    const std::vector<int32_t> sr = copy_vector<int32_t>(slot_row);
    for (size_t i = 0; i < sr.size(); ++i)
        SWITCHYARD_CHECK(sr[i] < d_xp.shape[0], "slot_row[", i, "]=", sr[i], " is not a row of d_xp");
    const std::vector<double> g = to_double(d_xp);
    std::vector<double> out(static_cast<size_t>(num_tokens * hidden));
    ref::gather_backward(sr.data(), g.data(), num_tokens, k, hidden, out.data());
    store_all(out, dx);
}

// A GEMM's A with its rows gathered (GroupedGemmOptions::row_index): xp [R, K] = x[row_index[r]] in `storage`, zeros
// for an index outside x's rows; x itself without row_index.
static TensorRef gathered_rows(const TensorRef& x, const TensorRef& row_index, std::vector<char>& storage) {
    if (!row_index.defined()) return x;
    const int64_t rows = row_index.shape[0], k = x.shape[1], x_rows = x.shape[0];
    const size_t row_bytes = static_cast<size_t>(k) * dtype_size(x.dtype);
    storage.assign(static_cast<size_t>(rows) * row_bytes, 0);
    const int32_t* idx = row_index.ptr<int32_t>();
    for (int64_t r = 0; r < rows; ++r) {
        if (idx[r] < 0 || idx[r] >= x_rows) continue;
        std::memcpy(storage.data() + r * row_bytes, static_cast<const char*>(x.data) + idx[r] * row_bytes, row_bytes);
    }
    return TensorRef(storage.data(), x.dtype, {rows, k});
}

void grouped_gemm(const TensorRef& a_in, const TensorRef& b, const TensorRef& offsets, const TensorRef& c,
                  bool zero_unowned_rows, const TensorRef& row_index) {
    std::vector<char> gathered;
    const TensorRef a = gathered_rows(a_in, row_index, gathered);
    const int64_t rows = a.shape[0], kk = a.shape[1];
    const int64_t groups = b.rank == 3 ? b.shape[0] : 1, n = b.shape[b.rank - 2];
    const std::vector<int32_t> off = host_offsets(offsets, rows);
    SWITCHYARD_CHECK(static_cast<int64_t>(off.size()) == groups + 1, "offsets has ", off.size(),
                     " entries, expected E+1=", groups + 1);
    if (!is_f64(a) && !is_f64(b) && !is_f64(c)) {
        // gemm_nt: exact float products summed in double, bitwise the naive loop; one rounding on store.
        const std::vector<float> af = to_float(a);
        std::vector<double> acc;
        for (int64_t e = 0; e < groups; ++e) {
            const int64_t begin = off[e], m = off[e + 1] - off[e];
            if (m == 0) continue;
            acc.resize(static_cast<size_t>(m * n));
            gemm_nt(af.data() + begin * kk, m, kk, mat_view(b, e, n, kk), acc.data());
            const int64_t base = begin * n;
#pragma omp parallel for schedule(static) if (m * n >= (1 << 16))
            for (int64_t i = 0; i < m * n; ++i) store_from_double(c.data, c.dtype, base + i, acc[i]);
        }
    } else {
        const std::vector<double> ad = to_double(a), bd = to_double(b);
        std::vector<double> cd(static_cast<size_t>(rows * n));
        grouped_gemm_forward(off.data(), groups, ad.data(), bd.data(), rows, n, kk, cd.data());
        const int64_t used = off.back() * n;
#pragma omp parallel for schedule(static) if (used >= (1 << 16))
        for (int64_t i = 0; i < used; ++i) store_from_double(c.data, c.dtype, i, cd[i]);
    }
    if (zero_unowned_rows) zero_rows(c, off.back(), rows, n);
}

namespace {

// One row of GEMM input quantised as stages.h's FP8 recipe says and read back: out[kk] = dec(q[kk]) * s, in double.
// Groups of `group` channels (the last one partial) each get scale amax / 448 (fp32), or *static_scale for all.
// A scale of 0 (an all-zero group) quantises the group to 0.
void quantize_row_fp8(const float* x, int64_t k, int64_t group, const float* static_scale, double* out) {
    for (int64_t g0 = 0; g0 < k; g0 += group) {
        const int64_t g1 = std::min(k, g0 + group);
        float scale;
        if (static_scale != nullptr) {
            scale = *static_scale;
        } else {
            float amax = 0.0f;
            for (int64_t i = g0; i < g1; ++i) amax = std::max(amax, std::fabs(x[i]));
            scale = amax / 448.0f;
        }
        if (scale == 0.0f) {
            std::fill(out + g0, out + g1, 0.0);
            continue;
        }
        for (int64_t i = g0; i < g1; ++i)
            out[i] = static_cast<double>(fp8_e4m3_to_float(float_to_fp8_e4m3(x[i] / scale))) * static_cast<double>(scale);
    }
}

}  // namespace

void grouped_gemm_fp8(const TensorRef& a, const TensorRef& b, const TensorRef& b_scale, const TensorRef& input_scale,
                      const TensorRef& offsets, const TensorRef& c, QuantMode mode, bool zero_unowned_rows) {
    const int64_t rows = a.shape[0], kk = a.shape[1];
    const int64_t groups = b.rank == 3 ? b.shape[0] : 1, n = b.shape[b.rank - 2];
    const std::vector<int32_t> off = host_offsets(offsets, rows);
    SWITCHYARD_CHECK(static_cast<int64_t>(off.size()) == groups + 1, "offsets has ", off.size(),
                     " entries, expected E+1=", groups + 1);
    const bool block = mode == QuantMode::kFP8Block;
    const int64_t G = kFp8BlockSize, nb = fp8_blocks(n), kb = fp8_blocks(kk);
    const std::vector<float> af = to_float(a), ws = to_float(b_scale);
    const std::vector<float> in = input_scale.defined() ? to_float(input_scale) : std::vector<float>();
    const uint8_t* bq = static_cast<const uint8_t*>(b.data);
    std::vector<double> w, aq;
    for (int64_t e = 0; e < groups; ++e) {
        const int64_t begin = off[e], m = off[e + 1] - off[e];
        if (m == 0) continue;
        w.resize(static_cast<size_t>(n * kk));  // dequantised weights of group e [N, K]
#pragma omp parallel for schedule(static) if (n * kk >= (1 << 16))
        for (int64_t nn = 0; nn < n; ++nn)
            for (int64_t k = 0; k < kk; ++k) {
                const float s = block ? ws[static_cast<size_t>((e * nb + nn / G) * kb + k / G)] : ws[e];
                w[nn * kk + k] = static_cast<double>(fp8_e4m3_to_float(bq[(e * n + nn) * kk + k])) *
                                 static_cast<double>(s);
            }
        aq.resize(static_cast<size_t>(m * kk));  // quantised-and-read-back activations of its rows
        const float* static_scale = in.empty() ? nullptr : &in[e];
#pragma omp parallel for schedule(static) if (m * kk >= (1 << 16))
        for (int64_t r = 0; r < m; ++r)
            quantize_row_fp8(af.data() + (begin + r) * kk, kk, block ? G : std::max<int64_t>(kk, 1), static_scale,
                             aq.data() + r * kk);
#pragma omp parallel for schedule(static) if (m * n * kk >= (1 << 18))
        for (int64_t i = 0; i < m * n; ++i) {
            const int64_t r = i / n, nn = i % n;
            const double* ar = aq.data() + r * kk;
            const double* wr = w.data() + nn * kk;
            double acc = 0.0;
            for (int64_t k = 0; k < kk; ++k) acc += ar[k] * wr[k];
            store_from_double(c.data, c.dtype, (begin + r) * n + nn, acc);
        }
    }
    if (zero_unowned_rows) zero_rows(c, off.back(), rows, n);
}

void grouped_gemm_dgrad(const TensorRef& dc, const TensorRef& b, const TensorRef& offsets, const TensorRef& da) {
    const int64_t rows = dc.shape[0], n = dc.shape[1], groups = b.shape[0], kk = b.shape[2];
    const std::vector<int32_t> off = host_offsets(offsets, rows);
    const std::vector<double> g = to_double(dc), bd = to_double(b);
    std::vector<double> out(static_cast<size_t>(rows * kk));
    grouped_gemm_backward(off.data(), groups, nullptr, bd.data(), g.data(), rows, n, kk, out.data(), nullptr);
    store_all(out, da);
}

void grouped_gemm_wgrad(const TensorRef& dc, const TensorRef& a, const TensorRef& offsets, const TensorRef& db) {
    const int64_t rows = dc.shape[0], n = dc.shape[1], groups = db.shape[0], kk = a.shape[1];
    const std::vector<int32_t> off = host_offsets(offsets, rows);
    const std::vector<double> g = to_double(dc), ad = to_double(a);
    std::vector<double> out(static_cast<size_t>(groups * n * kk));
    grouped_gemm_backward(off.data(), groups, ad.data(), nullptr, g.data(), rows, n, kk, nullptr, out.data());
    store_all(out, db);
}

namespace {
// Copies rows of [groups, 2F, width] elements of esz bytes from src to dst: row r of each group (gate rows [0, F),
// up rows [F, 2F)) goes to its row in the interleaved layout (config.h, gate_up_interleaved_row), or the inverse. With
// width 1 it permutes the columns of a [groups, 2F] GEMM1 output the same way.
void permute_gate_up_rows(const void* src_v, void* dst_v, int64_t groups, int64_t n, int64_t width, size_t esz,
                          bool inverse) {
    const char* src = static_cast<const char*>(src_v);
    char* dst = static_cast<char*>(dst_v);
    const size_t row_bytes = static_cast<size_t>(width) * esz;
    const int64_t ffn = n / 2;
    for (int64_t e = 0; e < groups; ++e) {
        for (int64_t r = 0; r < n; ++r) {
            const int64_t ir = gate_up_interleaved_row(r % ffn, r / ffn);
            const int64_t from = inverse ? ir : r, to = inverse ? r : ir;
            std::memcpy(dst + static_cast<size_t>(e * n + to) * row_bytes,
                        src + static_cast<size_t>(e * n + from) * row_bytes, row_bytes);
        }
    }
}

// g [rows, 2F] with its columns in w13's plain order: g itself, or (interleaved) a copy in `storage`.
TensorRef plain_columns(const TensorRef& g, bool interleaved, std::vector<char>& storage) {
    if (!interleaved) return g;
    storage.resize(g.nbytes());
    permute_gate_up_rows(g.data, storage.data(), g.shape[0], g.shape[1], 1, dtype_size(g.dtype), /*inverse=*/true);
    return TensorRef(storage.data(), g.dtype, {g.shape[0], g.shape[1]});
}
}  // namespace

void activation(Activation act, const TensorRef& g_in, const TensorRef& h, const TensorRef& num_rows,
                bool gate_up_interleaved) {
    std::vector<char> storage;  // the specification on the plain column order
    const TensorRef g = plain_columns(g_in, gate_up_interleaved, storage);
    const int64_t ffn = h.shape[1];
    int64_t rows = g.shape[0];
    if (num_rows.defined()) rows = std::min<int64_t>(rows, std::max<int32_t>(0, num_rows.ptr<int32_t>()[0]));
    const int64_t width = g.shape[1];
    std::vector<double> gd(static_cast<size_t>(rows * width));
    for (int64_t i = 0; i < rows * width; ++i) gd[i] = load_as_double(g.data, g.dtype, i);
    std::vector<double> hd(static_cast<size_t>(rows * ffn));
    activation_forward(act, gd.data(), rows, ffn, hd.data());
#pragma omp parallel for schedule(static) if (rows * ffn >= (1 << 16))
    for (int64_t i = 0; i < rows * ffn; ++i) store_from_double(h.data, h.dtype, i, hd[i]);
}

void grouped_gemm_gated(Activation act, const TensorRef& a_in, const TensorRef& w13i, const TensorRef& offsets,
                        const TensorRef& h, bool zero_unowned_rows, const TensorRef& row_index,
                        const TensorRef& gate_up) {
    std::vector<char> gathered;
    const TensorRef a = gathered_rows(a_in, row_index, gathered);
    const int64_t rows = a.shape[0], n = w13i.shape[w13i.rank - 2];
    std::vector<char> temp;
    if (!gate_up.defined()) temp.resize(static_cast<size_t>(rows * n) * dtype_size(h.dtype));
    const TensorRef gi = gate_up.defined() ? gate_up : TensorRef(temp.data(), h.dtype, {rows, n});
    // a kept g follows h's rule for the rows past offsets[E]; a temporary's are zeroed (the activation skips them)
    stage::grouped_gemm(a, w13i, offsets, gi, zero_unowned_rows || !gate_up.defined());
    const int32_t* off = offsets.defined() ? offsets.ptr<int32_t>() : nullptr;
    const int64_t groups = w13i.rank == 3 ? w13i.shape[0] : 1;
    int32_t owned = off != nullptr ? off[groups] : static_cast<int32_t>(rows);
    TensorRef num_rows;
    if (!zero_unowned_rows) num_rows = TensorRef(&owned, DType::kI32, {1});
    stage::activation(act, gi, h, num_rows, /*gate_up_interleaved=*/true);
}

void interleave_gate_up(const TensorRef& w13, const TensorRef& w13i, bool inverse) {
    const int64_t groups = w13.rank == 3 ? w13.shape[0] : 1, n = w13.shape[w13.rank - 2];
    permute_gate_up_rows(w13.data, w13i.data, groups, n, w13.shape[w13.rank - 1], dtype_size(w13.dtype), inverse);
}

void activation_backward(Activation act, const TensorRef& g_in, const TensorRef& dh, const TensorRef& dg,
                         bool gate_up_interleaved) {
    std::vector<char> storage;
    const TensorRef g = plain_columns(g_in, gate_up_interleaved, storage);
    const int64_t rows = g.shape[0], ffn = dh.shape[1];
    const std::vector<double> gd = to_double(g), d = to_double(dh);
    std::vector<double> out(gd.size());
    ref::activation_backward(act, gd.data(), d.data(), rows, ffn, out.data());
    if (!gate_up_interleaved) {
        store_all(out, dg);
        return;
    }
    std::vector<double> il(out.size());  // dg in g's (interleaved) column order
    permute_gate_up_rows(out.data(), il.data(), rows, 2 * ffn, 1, sizeof(double), /*inverse=*/false);
    store_all(il, dg);
}

void grouped_gemm_dgrad_activation(Activation act, const TensorRef& dc, const TensorRef& w2, const TensorRef& offsets,
                                   const TensorRef& g, const TensorRef& dg, const TensorRef& h,
                                   bool gate_up_interleaved) {
    const int64_t rows = dc.shape[0], ffn = h.shape[1];
    grouped_gemm_dgrad(dc, w2, offsets, h);  // dh, rounded to the dtype as the stage stores it
    activation_backward(act, g, h, dg, gate_up_interleaved);
    activation(act, g, h, TensorRef(), gate_up_interleaved);
    const int64_t owned = host_offsets(offsets, rows).back();
    zero_rows(dg, owned, rows, 2 * ffn);
    zero_rows(h, owned, rows, ffn);
}

void combine(const TensorRef& expert_out, const TensorRef& slot_row, const TensorRef& weights,
             const TensorRef& shared, const TensorRef& shared_gate, const TensorRef& y) {
    const int64_t num_tokens = slot_row.shape[0], k = slot_row.shape[1], hidden = expert_out.shape[1];
    const std::vector<int32_t> sr = copy_vector<int32_t>(slot_row);
    for (size_t i = 0; i < sr.size(); ++i)
        SWITCHYARD_CHECK(sr[i] < expert_out.shape[0], "slot_row[", i, "]=", sr[i], " is not a row of expert_out (",
                         expert_out.shape[0], " rows)");
    const std::vector<double> o = to_double(expert_out), w = to_double(weights);
    std::vector<double> s, scale;
    if (shared.defined()) s = to_double(shared);
    if (shared_gate.defined()) {  // s_t = sigmoid(gate logit), in double
        scale = to_double(shared_gate);
        for (double& v : scale) v = 1.0 / (1.0 + std::exp(-v));
    }
    std::vector<double> out(static_cast<size_t>(num_tokens * hidden));
    combine_forward(sr.data(), w.data(), o.data(), s.empty() ? nullptr : s.data(), num_tokens, k, hidden,
                    out.data(), scale.empty() ? nullptr : scale.data());
    store_all(out, y);
}

void combine_backward(const TensorRef& dy, const TensorRef& expert_out, const TensorRef& slot_row,
                      const TensorRef& weights, const TensorRef& d_out, const TensorRef& d_weights) {
    const int64_t num_tokens = slot_row.shape[0], k = slot_row.shape[1], hidden = expert_out.shape[1];
    const int64_t rows = expert_out.shape[0];
    const std::vector<int32_t> sr = copy_vector<int32_t>(slot_row);
    for (size_t i = 0; i < sr.size(); ++i)
        SWITCHYARD_CHECK(sr[i] < rows, "slot_row[", i, "]=", sr[i], " is not a row of expert_out");
    const std::vector<double> o = to_double(expert_out), w = to_double(weights), g = to_double(dy);
    std::vector<double> dout(static_cast<size_t>(rows * hidden)), dw(static_cast<size_t>(num_tokens * k));
    ref::combine_backward(sr.data(), w.data(), o.data(), g.data(), num_tokens, k, hidden, rows, dout.data(),
                          dw.data());
    store_all(dout, d_out);
    store_all(dw, d_weights);
}

void route_backward(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                    const TensorRef& d_weights, const TensorRef& d_logits) {
    const int64_t num_tokens = logits.shape[0];
    const std::vector<double> l = to_double(logits), g = to_double(d_weights);
    const std::vector<int32_t> ids = copy_vector<int32_t>(topk_ids);
    std::vector<double> out(l.size());
    ref::route_backward(cfg, l.data(), ids.data(), g.data(), num_tokens, out.data());
    store_all(out, d_logits);
}

void router_losses_backward(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids,
                            const TensorRef& d_losses, const TensorRef& d_logits) {
    const std::vector<double> l = to_double(logits);
    std::vector<double> out(l.size(), 0.0);  // the reference accumulates into d_logits
    ref::router_losses_backward(cfg, l.data(), copy_vector<int32_t>(topk_ids).data(), logits.shape[0],
                                load_as_double(d_losses.data, d_losses.dtype, 0),
                                load_as_double(d_losses.data, d_losses.dtype, 1), out.data());
    store_all(out, d_logits);
}

void load_stats(const MoEConfig& cfg, const TensorRef& logits, const TensorRef& topk_ids, const RoutingPlan& plan,
                LoadStats& stats) {
    const int64_t num_tokens = logits.shape[0];
    const HostPlan p = host_plan(cfg, num_tokens, topk_ids, plan);
    const std::vector<float> l = to_float(logits);
    if (cfg.expert_choice())
        expert_choice_stats(cfg, l, p, stats);
    else
        plan_stats(cfg, l, p, stats);
}

}  // namespace stage
}  // namespace ref
}  // namespace switchyard
