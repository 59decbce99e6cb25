// src/ref/scoring.h: the ranking and scoring rules of include/switchyard/routing.h, in one place for every CPU stage
// that ranks or scores (the router, expert-choice routing, the balance simulation).
//   ranks_before: larger value first; a NaN ranks below every number (-inf included); ties go to the lower index.
//   softmax_skip_nan: NaN entries get NaN and are left out of the normaliser, so the others keep finite weights;
//                     exp(v - max) is exactly 1 at the maximum (a row of -inf comes out uniform).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace switchyard {
namespace ref {

inline bool ranks_before(double a, int64_t ia, double b, int64_t ib) {
    const bool na = std::isnan(a), nb = std::isnan(b);
    if (na != nb) return nb;
    if (!na && a != b) return a > b;
    return ia < ib;
}

// out[i] = softmax over the non-NaN entries of v (float or double input), accumulated in double.
template <typename T>
void softmax_skip_nan(const T* v, int64_t n, double* out) {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n; ++i)
        if (!std::isnan(v[i])) m = std::max(m, static_cast<double>(v[i]));
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const double x = static_cast<double>(v[i]);
        if (std::isnan(x)) continue;
        out[i] = x == m ? 1.0 : std::exp(x - m);
        sum += out[i];
    }
    for (int64_t i = 0; i < n; ++i) out[i] = std::isnan(v[i]) ? std::numeric_limits<double>::quiet_NaN() : out[i] / sum;
}

inline double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

}  // namespace ref
}  // namespace switchyard
