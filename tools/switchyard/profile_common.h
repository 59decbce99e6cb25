// tools/switchyard/profile_common.h: pieces of `switchyard profile` shared by the CPU report (profile.cpp), the GPU
// measurements (profile_gpu.cpp) and the GPU report renderer (profile_report.cpp).
//
// utilisation(): routing of T synthetic tokens by the library's CPU router (route, build_plan, load_stats of
// stages.h, through host_routing.h; the CUDA
// router follows the same rules bit for bit on the same logits), logits = log p_e + Gumbel noise so that the top-1
// expert follows p (uniform, or Zipf p_e ~ 1/(e+1)^s); per-expert counts, max/mean, cv, entropy, and the fraction
// of (token, slot) pairs dropped at capacity factors kCapacityFactors.
// utilisation_balanced(): the same after the selection-bias updates of aux-loss-free balancing.
// ProgressBar: one terminal line on stderr, redrawn in place when stderr is a terminal ("[#####.....] 12/40  35 s
// what"), plain lines otherwise (logs stay readable).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "switchyard/switchyard.h"

namespace switchyard {
namespace cli {

constexpr double kCapacityFactors[3] = {1.0, 1.25, 2.0};

struct UtilRow {
    std::string shape, dist;
    int64_t T = 0;
    double zipf_s = 0;
    LoadStats stats;
    double dropped_frac[3] = {0, 0, 0};
};
UtilRow utilisation(const std::string& shape, const MoEConfig& base, const std::string& dist, double zipf_s,
                    int64_t num_tokens, uint64_t seed);
// The effect of aux-loss-free balancing (DeepSeek-V3's selection bias, config.h bias_update_rate): `steps` batches
// of Zipf-skewed logits, after each score_bias[e] += rate * sign(mean load - load_e); the row is then measured on
// the same batch as utilisation(..., zipf_s, T, seed) with the learned bias used for selection.
UtilRow utilisation_balanced(const std::string& shape, const MoEConfig& base, double zipf_s, int64_t num_tokens,
                             uint64_t seed, int steps, double rate);

class ProgressBar {
 public:
    ProgressBar(int total_steps, double t_start);
    void step(const std::string& what);  // counts one step and redraws
    void note(const std::string& line);  // a line of its own (failures), then the bar again
    void finish();

 private:
    int total_, done_ = 0;
    double t0_;
    bool tty_;
    std::string last_;
    void draw();
};

std::string fmt_num(const char* f, double v);
std::string now_utc();

}  // namespace cli
}  // namespace switchyard
