// src/ref/backward.cpp: forward (double) and backward of every training stage of the CPU backend.
//
// The contract is in src/ref/backward.h. Formulas (per token t, selection ids fixed; g = upstream gradient):
//   weights   u_j = score(l)[id_j]; w_j = s * u_j / S with S = sum_j u_j (renormalize, S != 0) else s * u_j.
//             dL/du_i = s * (g_i / S - sum_j g_j u_j / S^2) (renormalised) or s * g_i.
//             softmax over E:     dl_e = sum_j gu_j p_{id_j} (delta(e, id_j) - p_e)
//             sigmoid:            dl_{id_j} = gu_j * sig_j * (1 - sig_j)
//             top-k then softmax: dl_{id_i} = u_i * (gu_i - sum_j gu_j u_j)
//   aux       aux = E * sum_e f_e P_e: dprob[t, e] = d_aux * E * f_e / T, then through softmax or s / sum s.
//   z         z = mean_t lse_t^2: dl[t, e] = d_z * 2 * lse_t * softmax(l_t)_e / T.
//   gemm      da[r] = dc[r] . b[e]; db[e] = sum_r dc[r]^T a[r] (r in increasing order).
//   act       silu'(v) = sig(v) (1 + v (1 - sig(v))); gelu_tanh'(v) = 0.5 (1 + th) + 0.5 v (1 - th^2) c (1 + 3a v^2),
//             th = tanh(c (v + a v^3)), c = sqrt(2/pi), a = 0.044715; relu'(v) = [v > 0].
//   combine   d_out[row(t,j)] = w[t,j] dy[t]; d_w[t,j] = <dy[t], out[row(t,j)]>.
//   gather    dx[t] = sum_j d_xp[row(t,j)], slots in order.
// OpenMP parallel over independent outputs only (tokens, rows, experts): results do not depend on thread count.
#include "ref/backward.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "ref/ref.h"
#include "switchyard/error.h"

namespace switchyard {
namespace ref {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Softmax of v [n] in double (max subtracted). NaN entries give NaN everywhere they reach, which is what
// a gradient through a NaN logit should give.
void softmax(const double* v, int64_t n, double* out) {
    double m = kNegInf;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, v[i]);
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        out[i] = v[i] == m ? 1.0 : std::exp(v[i] - m);
        sum += out[i];
    }
    for (int64_t i = 0; i < n; ++i) out[i] /= sum;
}

double logsumexp(const double* v, int64_t n) {
    double m = kNegInf;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, v[i]);
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += v[i] == m ? 1.0 : std::exp(v[i] - m);
    return m + std::log(sum);
}

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// Raw scores u [k] of one token (before renormalisation and scaling); p [E] receives the softmax over all E
// (softmax routing) or the sigmoids (sigmoid routing); unused for top-k-softmax.
void raw_weights(const MoEConfig& cfg, const double* l, const int32_t* ids, double* u, double* p) {
    const int64_t num_experts = cfg.num_experts, k = cfg.top_k;
    switch (cfg.score_function) {
        case ScoreFunction::kSoftmax:
            softmax(l, num_experts, p);
            for (int64_t j = 0; j < k; ++j) u[j] = p[ids[j]];
            break;
        case ScoreFunction::kSigmoid:
            for (int64_t e = 0; e < num_experts; ++e) p[e] = sigmoid(l[e]);
            for (int64_t j = 0; j < k; ++j) u[j] = p[ids[j]];
            break;
        case ScoreFunction::kTopkSoftmax: {
            std::vector<double> chosen(static_cast<size_t>(k));
            for (int64_t j = 0; j < k; ++j) chosen[j] = l[ids[j]];
            softmax(chosen.data(), k, u);
            break;
        }
    }
}

void check_ids(const MoEConfig& cfg, const int32_t* ids, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        SWITCHYARD_CHECK(ids[i] >= 0 && ids[i] < cfg.num_experts, "topk_ids[", i, "]=", ids[i],
                         " outside [0, num_experts=", cfg.num_experts, ")");
}

// Gradient of the router probabilities used by the aux loss: dl [E] += through prob = softmax(l) or s / sum s.
void prob_backward(const MoEConfig& cfg, const double* l, const double* gp, double* dl) {
    const int64_t num_experts = cfg.num_experts;
    std::vector<double> p(static_cast<size_t>(num_experts));
    if (cfg.score_function == ScoreFunction::kSigmoid) {
        double sum = 0.0;
        for (int64_t e = 0; e < num_experts; ++e) {
            p[e] = sigmoid(l[e]);
            sum += p[e];
        }
        double dot = 0.0;  // sum_i gp_i * prob_i
        for (int64_t e = 0; e < num_experts; ++e) dot += gp[e] * p[e] / sum;
        for (int64_t e = 0; e < num_experts; ++e) {
            const double ds = (gp[e] - dot) / sum;
            dl[e] += ds * p[e] * (1.0 - p[e]);
        }
    } else {
        softmax(l, num_experts, p.data());
        double dot = 0.0;
        for (int64_t e = 0; e < num_experts; ++e) dot += gp[e] * p[e];
        for (int64_t e = 0; e < num_experts; ++e) dl[e] += p[e] * (gp[e] - dot);
    }
}

}  // namespace

// ---- router -------------------------------------------------------------------------------------------------

void route_weights(const MoEConfig& cfg, const double* logits, const int32_t* topk_ids, int64_t num_tokens,
                   double* weights) {
    const int64_t num_experts = cfg.num_experts, k = cfg.top_k;
    check_ids(cfg, topk_ids, num_tokens * k);
#pragma omp parallel if (num_tokens * num_experts >= (1 << 14))
    {
        std::vector<double> p(static_cast<size_t>(num_experts)), u(static_cast<size_t>(k));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tokens; ++t) {
            raw_weights(cfg, logits + t * num_experts, topk_ids + t * k, u.data(), p.data());
            double sum = 0.0;
            for (int64_t j = 0; j < k; ++j) sum += u[j];
            const bool renorm = cfg.renormalize && sum != 0.0;
            for (int64_t j = 0; j < k; ++j) weights[t * k + j] = (renorm ? u[j] / sum : u[j]) * cfg.routed_scale;
        }
    }
}

void route_backward(const MoEConfig& cfg, const double* logits, const int32_t* topk_ids, const double* d_weights,
                    int64_t num_tokens, double* d_logits) {
    const int64_t num_experts = cfg.num_experts, k = cfg.top_k;
    check_ids(cfg, topk_ids, num_tokens * k);
#pragma omp parallel if (num_tokens * num_experts >= (1 << 14))
    {
        std::vector<double> p(static_cast<size_t>(num_experts)), u(static_cast<size_t>(k)), gu(static_cast<size_t>(k));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tokens; ++t) {
            const double* l = logits + t * num_experts;
            const int32_t* ids = topk_ids + t * k;
            const double* g = d_weights + t * k;
            double* dl = d_logits + t * num_experts;
            std::fill(dl, dl + num_experts, 0.0);
            raw_weights(cfg, l, ids, u.data(), p.data());
            double sum = 0.0;
            for (int64_t j = 0; j < k; ++j) sum += u[j];
            if (cfg.renormalize && sum != 0.0) {
                double gu_dot = 0.0;
                for (int64_t j = 0; j < k; ++j) gu_dot += g[j] * u[j];
                for (int64_t j = 0; j < k; ++j) gu[j] = cfg.routed_scale * (g[j] / sum - gu_dot / (sum * sum));
            } else {
                for (int64_t j = 0; j < k; ++j) gu[j] = cfg.routed_scale * g[j];
            }
            switch (cfg.score_function) {
                case ScoreFunction::kSoftmax: {
                    double dot = 0.0;  // sum_j gu_j p_{id_j}
                    for (int64_t j = 0; j < k; ++j) dot += gu[j] * u[j];
                    for (int64_t e = 0; e < num_experts; ++e) dl[e] = -p[e] * dot;
                    for (int64_t j = 0; j < k; ++j) dl[ids[j]] += gu[j] * u[j];
                    break;
                }
                case ScoreFunction::kSigmoid:
                    for (int64_t j = 0; j < k; ++j) dl[ids[j]] = gu[j] * u[j] * (1.0 - u[j]);
                    break;
                case ScoreFunction::kTopkSoftmax: {
                    double dot = 0.0;
                    for (int64_t j = 0; j < k; ++j) dot += gu[j] * u[j];
                    for (int64_t j = 0; j < k; ++j) dl[ids[j]] = u[j] * (gu[j] - dot);
                    break;
                }
            }
        }
    }
}

void router_losses(const MoEConfig& cfg, const double* logits, const int32_t* topk_ids, int64_t num_tokens,
                   double* aux_loss, double* z_loss) {
    const int64_t num_experts = cfg.num_experts, k = cfg.top_k;
    check_ids(cfg, topk_ids, num_tokens * k);
    *aux_loss = 0.0;
    *z_loss = 0.0;
    if (num_tokens == 0) return;
    std::vector<double> counts(static_cast<size_t>(num_experts), 0.0), mean_prob(static_cast<size_t>(num_experts), 0.0);
    for (int64_t i = 0; i < num_tokens * k; ++i) counts[topk_ids[i]] += 1.0;
    std::vector<double> p(static_cast<size_t>(num_experts));
    double z_sum = 0.0;
    for (int64_t t = 0; t < num_tokens; ++t) {  // sequential: one summation order
        const double* l = logits + t * num_experts;
        if (cfg.score_function == ScoreFunction::kSigmoid) {
            double s = 0.0;
            for (int64_t e = 0; e < num_experts; ++e) {
                p[e] = sigmoid(l[e]);
                s += p[e];
            }
            for (int64_t e = 0; e < num_experts; ++e) p[e] /= s;
        } else {
            softmax(l, num_experts, p.data());
        }
        for (int64_t e = 0; e < num_experts; ++e) mean_prob[e] += p[e];
        const double lse = logsumexp(l, num_experts);
        z_sum += lse * lse;
    }
    double aux = 0.0;
    for (int64_t e = 0; e < num_experts; ++e)
        aux += counts[e] / static_cast<double>(num_tokens * k) * (mean_prob[e] / static_cast<double>(num_tokens));
    *aux_loss = static_cast<double>(num_experts) * aux;
    *z_loss = z_sum / static_cast<double>(num_tokens);
}

void router_losses_backward(const MoEConfig& cfg, const double* logits, const int32_t* topk_ids,
                            int64_t num_tokens, double d_aux, double d_z, double* d_logits) {
    const int64_t num_experts = cfg.num_experts, k = cfg.top_k;
    check_ids(cfg, topk_ids, num_tokens * k);
    if (num_tokens == 0) return;
    const double inv_t = 1.0 / static_cast<double>(num_tokens);
    std::vector<double> gp(static_cast<size_t>(num_experts), 0.0);  // d loss / d prob[t, e], the same for every t
    for (int64_t i = 0; i < num_tokens * k; ++i) gp[topk_ids[i]] += 1.0;
    for (int64_t e = 0; e < num_experts; ++e)
        gp[e] = d_aux * static_cast<double>(num_experts) * (gp[e] / static_cast<double>(num_tokens * k)) * inv_t;
#pragma omp parallel if (num_tokens * num_experts >= (1 << 14))
    {
        std::vector<double> p(static_cast<size_t>(num_experts));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tokens; ++t) {
            const double* l = logits + t * num_experts;
            double* dl = d_logits + t * num_experts;
            if (d_aux != 0.0) prob_backward(cfg, l, gp.data(), dl);
            if (d_z != 0.0) {
                softmax(l, num_experts, p.data());
                const double c = d_z * 2.0 * logsumexp(l, num_experts) * inv_t;
                for (int64_t e = 0; e < num_experts; ++e) dl[e] += c * p[e];
            }
        }
    }
}

// ---- gather -------------------------------------------------------------------------------------------------

void gather_forward(const double* x, const int32_t* row_token, int64_t max_rows, int64_t hidden, double* xp) {
#pragma omp parallel for schedule(static) if (max_rows * hidden >= (1 << 16))
    for (int64_t r = 0; r < max_rows; ++r) {
        double* dst = xp + r * hidden;
        if (row_token[r] < 0)
            std::fill(dst, dst + hidden, 0.0);
        else
            std::memcpy(dst, x + static_cast<int64_t>(row_token[r]) * hidden, static_cast<size_t>(hidden) * 8);
    }
}

void gather_backward(const int32_t* slot_row, const double* d_xp, int64_t num_tokens, int64_t top_k, int64_t hidden,
                     double* dx) {
    // The sum over a token's slots in order is combine's with unit weights (1.0 * v == v exactly).
    const std::vector<double> ones(static_cast<size_t>(num_tokens * top_k), 1.0);
    combine_forward(slot_row, ones.data(), d_xp, nullptr, num_tokens, top_k, hidden, dx);
}

// ---- grouped GEMM -------------------------------------------------------------------------------------------

namespace {
void check_offsets(const int32_t* offsets, int64_t num_experts, int64_t max_rows) {
    SWITCHYARD_CHECK(offsets[0] == 0, "offsets[0]=", offsets[0], ", expected 0");
    for (int64_t e = 0; e < num_experts; ++e)
        SWITCHYARD_CHECK(offsets[e + 1] >= offsets[e], "offsets decrease at expert ", e, ": ", offsets[e], " > ",
                         offsets[e + 1]);
    SWITCHYARD_CHECK(offsets[num_experts] <= max_rows, "offsets[E]=", offsets[num_experts], " exceeds max_rows=",
                     max_rows);
}
}  // namespace

void grouped_gemm_forward(const int32_t* offsets, int64_t num_experts, const double* a, const double* b,
                          int64_t max_rows, int64_t n, int64_t k, double* c) {
    check_offsets(offsets, num_experts, max_rows);
    const int64_t used = offsets[num_experts];
    std::fill(c + used * n, c + max_rows * n, 0.0);
    for (int64_t e = 0; e < num_experts; ++e) {
        const double* be = b + e * n * k;
#pragma omp parallel for schedule(static) if ((offsets[e + 1] - offsets[e]) * n * k >= (1 << 16))
        for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
            const double* ar = a + r * k;
            for (int64_t j = 0; j < n; ++j) {
                const double* bj = be + j * k;
                double acc = 0.0;
                for (int64_t q = 0; q < k; ++q) acc += ar[q] * bj[q];
                c[r * n + j] = acc;
            }
        }
    }
}

void grouped_gemm_backward(const int32_t* offsets, int64_t num_experts, const double* a, const double* b,
                           const double* dc, int64_t max_rows, int64_t n, int64_t k, double* da, double* db) {
    check_offsets(offsets, num_experts, max_rows);
    const int64_t used = offsets[num_experts];
    if (da != nullptr) {
        std::fill(da + used * k, da + max_rows * k, 0.0);
        for (int64_t e = 0; e < num_experts; ++e) {
            const double* be = b + e * n * k;
#pragma omp parallel for schedule(static) if ((offsets[e + 1] - offsets[e]) * n * k >= (1 << 16))
            for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
                double* dar = da + r * k;
                std::fill(dar, dar + k, 0.0);
                for (int64_t j = 0; j < n; ++j) {  // da[r, q] = sum_j dc[r, j] b[e, j, q], j in increasing order
                    const double g = dc[r * n + j];
                    const double* bj = be + j * k;
                    for (int64_t q = 0; q < k; ++q) dar[q] += g * bj[q];
                }
            }
        }
    }
    if (db != nullptr) {
        for (int64_t e = 0; e < num_experts; ++e) {
            double* dbe = db + e * n * k;
#pragma omp parallel for schedule(static) if ((offsets[e + 1] - offsets[e] + 1) * n * k >= (1 << 16))
            for (int64_t j = 0; j < n; ++j) {  // db[e, j, q] = sum_r dc[r, j] a[r, q], r in increasing order
                double* dbj = dbe + j * k;
                std::fill(dbj, dbj + k, 0.0);
                for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
                    const double g = dc[r * n + j];
                    const double* ar = a + r * k;
                    for (int64_t q = 0; q < k; ++q) dbj[q] += g * ar[q];
                }
            }
        }
    }
}

// ---- activation ---------------------------------------------------------------------------------------------

double silu_grad(double v) {
    const double s = sigmoid(v);
    return s * (1.0 + v * (1.0 - s));
}

double gelu_tanh_grad(double v) {
    constexpr double kC = 0.79788456080286535587989211986876;  // sqrt(2 / pi)
    constexpr double kA = 0.044715;
    const double th = std::tanh(kC * (v + kA * v * v * v));
    return 0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * kC * (1.0 + 3.0 * kA * v * v);
}

void activation_forward(Activation act, const double* g, int64_t rows, int64_t ffn, double* h) {
    const bool gated = is_gated(act);
    const int64_t width = gated ? 2 * ffn : ffn;
#pragma omp parallel for schedule(static) if (rows * ffn >= (1 << 16))
    for (int64_t r = 0; r < rows; ++r) {
        const double* gr = g + r * width;
        for (int64_t f = 0; f < ffn; ++f)
            h[r * ffn + f] = gated ? apply_activation(act, gr[f], gr[ffn + f]) : apply_activation(act, 0.0, gr[f]);
    }
}

void activation_backward(Activation act, const double* g, const double* dh, int64_t rows, int64_t ffn, double* dg) {
    const bool gated = is_gated(act);
    const int64_t width = gated ? 2 * ffn : ffn;
#pragma omp parallel for schedule(static) if (rows * ffn >= (1 << 16))
    for (int64_t r = 0; r < rows; ++r) {
        const double* gr = g + r * width;
        const double* d = dh + r * ffn;
        double* o = dg + r * width;
        for (int64_t f = 0; f < ffn; ++f) {
            switch (act) {
                case Activation::kSwiGLU:
                    o[f] = d[f] * gr[ffn + f] * silu_grad(gr[f]);
                    o[ffn + f] = d[f] * silu(gr[f]);
                    break;
                case Activation::kGeGLU:
                    o[f] = d[f] * gr[ffn + f] * gelu_tanh_grad(gr[f]);
                    o[ffn + f] = d[f] * gelu_tanh(gr[f]);
                    break;
                case Activation::kGELU:
                    o[f] = d[f] * gelu_tanh_grad(gr[f]);
                    break;
                case Activation::kReLU:
                    o[f] = gr[f] > 0.0 ? d[f] : 0.0;
                    break;
            }
        }
    }
}

// ---- combine ------------------------------------------------------------------------------------------------

void combine_forward(const int32_t* slot_row, const double* weights, const double* expert_out, const double* shared,
                     int64_t num_tokens, int64_t top_k, int64_t hidden, double* y, const double* shared_scale) {
#pragma omp parallel for schedule(static) if (num_tokens * top_k * hidden >= (1 << 16))
    for (int64_t t = 0; t < num_tokens; ++t) {
        double* yt = y + t * hidden;
        std::fill(yt, yt + hidden, 0.0);
        for (int64_t j = 0; j < top_k; ++j) {
            const int32_t r = slot_row[t * top_k + j];
            if (r < 0) continue;
            const double w = weights[t * top_k + j];
            const double* o = expert_out + static_cast<int64_t>(r) * hidden;
            for (int64_t h = 0; h < hidden; ++h) yt[h] += w * o[h];
        }
        if (shared != nullptr) {
            const double st = shared_scale != nullptr ? shared_scale[t] : 1.0;
            for (int64_t h = 0; h < hidden; ++h) yt[h] += st * shared[t * hidden + h];
        }
    }
}

void combine_backward(const int32_t* slot_row, const double* weights, const double* expert_out, const double* dy,
                      int64_t num_tokens, int64_t top_k, int64_t hidden, int64_t max_rows, double* d_out,
                      double* d_weights) {
    for (int64_t i = 0; i < num_tokens * top_k; ++i)  // checked here: nothing may throw inside the parallel loop
        SWITCHYARD_CHECK(slot_row[i] < max_rows, "slot_row[", i, "]=", slot_row[i], " outside [-1, max_rows=",
                         max_rows, ")");
    if (d_out != nullptr) std::fill(d_out, d_out + max_rows * hidden, 0.0);
#pragma omp parallel for schedule(static) if (num_tokens * top_k * hidden >= (1 << 16))
    for (int64_t t = 0; t < num_tokens; ++t) {
        const double* g = dy + t * hidden;
        for (int64_t j = 0; j < top_k; ++j) {
            const int32_t r = slot_row[t * top_k + j];
            if (d_weights != nullptr) d_weights[t * top_k + j] = 0.0;
            if (r < 0) continue;
            const double* o = expert_out + static_cast<int64_t>(r) * hidden;
            if (d_weights != nullptr) {
                double acc = 0.0;
                for (int64_t h = 0; h < hidden; ++h) acc += g[h] * o[h];
                d_weights[t * top_k + j] = acc;
            }
            if (d_out != nullptr) {  // each row belongs to exactly one (t, j): no two writers
                const double w = weights[t * top_k + j];
                double* d = d_out + static_cast<int64_t>(r) * hidden;
                for (int64_t h = 0; h < hidden; ++h) d[h] = w * g[h];
            }
        }
    }
}

}  // namespace ref
}  // namespace switchyard
