// src/ref/combine.cpp: the combine (un-permute + weighted sum) of the CPU backend.
//
//   y[t, h] = round_dtype(float( (sum_{j = 0..k-1, row(t,j) >= 0} double(w[t,j]) * double(out[row(t,j), h]))
//                                + double(shared[t, h]) ))
// The slots are added in order j = 0, 1, ..., k-1 starting from 0.0 (dropped slots add nothing), then the
// shared expert's (already rounded) output. No [T, E, C, H] tensor; tokens in parallel, one order per token.
#include <algorithm>
#include <vector>

#include "ref/ref.h"
#include "switchyard/error.h"

namespace switchyard {
namespace ref {

void combine(const HostPlan& plan, const std::vector<float>& expert_out, const float* shared, int64_t hidden,
             DType dtype, float* y) {
    const int64_t num_tokens = plan.num_tokens, k = plan.top_k;
    SWITCHYARD_CHECK(static_cast<int64_t>(expert_out.size()) >= plan.num_rows() * hidden, "combine: expert_out has ",
                     expert_out.size(), " elements, expected at least rows*hidden=", plan.num_rows() * hidden);
#pragma omp parallel if (num_tokens * k * hidden >= (1 << 16))
    {
        std::vector<double> acc(static_cast<size_t>(hidden));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tokens; ++t) {
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t j = 0; j < k; ++j) {
                const int32_t row = plan.slot_row[t * k + j];
                if (row < 0) continue;
                const double w = plan.topk_weights[t * k + j];
                const float* o = expert_out.data() + static_cast<int64_t>(row) * hidden;
                for (int64_t h = 0; h < hidden; ++h) acc[h] += w * static_cast<double>(o[h]);
            }
            if (shared != nullptr) {
                const float* s = shared + t * hidden;
                for (int64_t h = 0; h < hidden; ++h) acc[h] += static_cast<double>(s[h]);
            }
            float* yt = y + t * hidden;
            for (int64_t h = 0; h < hidden; ++h) yt[h] = round_to(dtype, static_cast<float>(acc[h]));
        }
    }
}

}  // namespace ref
}  // namespace switchyard
