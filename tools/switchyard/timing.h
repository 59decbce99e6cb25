// tools/switchyard/timing.h: the timing helpers every measurement of the CLI shares (header-only: the CLI and its
// support library, e.g. cuda/probe.cu, both use them).
//
//   median(v)            median of samples (mean of the two middle ones for an even count; 0 when empty)
//   StageSamples         per-stage samples of a staged forward, stages in first-seen order; medians() per stage
//   host_stage_clock     a StageCallback (moe_layer.h) that reads the host's steady clock at each stage; on the CPU a
//                        stage has finished when its callback runs, so the differences are the stage times
// CUDA builds only:
//   CudaStream           owns a non-blocking stream
//   EventPool            CUDA events created on first use and reused run after run
//   cuda_median_ms       median ms between events recorded around fn on a stream, one run at a time
//   StageEvents          a StageCallback that records an event of the pool after each stage on the layer's stream
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "switchyard/moe_layer.h"

#ifdef SWITCHYARD_WITH_CUDA
#include "switchyard/cuda_check.h"
#endif

namespace switchyard {
namespace cli {

inline double median(std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Samples (ms) of each stage of a staged forward, over runs; stage names in the order first seen.
class StageSamples {
 public:
    void add(const std::string& stage, double ms) {
        auto it = std::find(names_.begin(), names_.end(), stage);
        if (it == names_.end()) {
            names_.push_back(stage);
            samples_.emplace_back();
            it = names_.end() - 1;
        }
        samples_[static_cast<size_t>(it - names_.begin())].push_back(ms);
    }
    const std::vector<std::string>& names() const { return names_; }
    double median_of(const std::string& stage) const {
        auto it = std::find(names_.begin(), names_.end(), stage);
        return it == names_.end() ? 0.0 : median(samples_[static_cast<size_t>(it - names_.begin())]);
    }
    // (stage, median ms) in forward order.
    std::vector<std::pair<std::string, double>> medians() const {
        std::vector<std::pair<std::string, double>> r;
        for (size_t i = 0; i < names_.size(); ++i) r.emplace_back(names_[i], median(samples_[i]));
        return r;
    }

 private:
    std::vector<std::string> names_;
    std::vector<std::vector<double>> samples_;
};

// Host clock marks of one staged forward ("begin", then one per stage); add_to() adds each stage's time.
class HostStageClock {
 public:
    StageCallback callback() {
        marks_.clear();
        return [this](const char* stage, cudaStream_t) {
            marks_.emplace_back(stage, std::chrono::steady_clock::now());
        };
    }
    void add_to(StageSamples& s) const {
        for (size_t i = 1; i < marks_.size(); ++i)
            s.add(marks_[i].first,
                  std::chrono::duration<double, std::milli>(marks_[i].second - marks_[i - 1].second).count());
    }

 private:
    std::vector<std::pair<std::string, std::chrono::steady_clock::time_point>> marks_;
};

#ifdef SWITCHYARD_WITH_CUDA
class CudaStream {
 public:
    CudaStream() { SWITCHYARD_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
    ~CudaStream() { cudaStreamDestroy(s_); }
    CudaStream(const CudaStream&) = delete;
    CudaStream& operator=(const CudaStream&) = delete;
    cudaStream_t get() const { return s_; }

 private:
    cudaStream_t s_ = nullptr;
};

// Events reused run after run (the stream is synchronised after each run).
class EventPool {
 public:
    EventPool() = default;
    EventPool(const EventPool&) = delete;
    EventPool& operator=(const EventPool&) = delete;
    ~EventPool() {
        for (cudaEvent_t e : ev_) cudaEventDestroy(e);
    }
    cudaEvent_t at(size_t i) {
        while (ev_.size() <= i) {
            cudaEvent_t e;
            SWITCHYARD_CUDA_CHECK(cudaEventCreate(&e));
            ev_.push_back(e);
        }
        return ev_[i];
    }
    double ms(size_t a, size_t b) {
        float v = 0;
        SWITCHYARD_CUDA_CHECK(cudaEventElapsedTime(&v, at(a), at(b)));
        return v;
    }

 private:
    std::vector<cudaEvent_t> ev_;
};

// Median ms between events recorded around fn on `s`, one run at a time, after `warmup` runs.
template <typename Fn>
double cuda_median_ms(Fn&& fn, int warmup, int reps, cudaStream_t s, EventPool& ev,
                      std::vector<double>* samples = nullptr) {
    for (int i = 0; i < warmup; ++i) fn();
    SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(s));
    std::vector<double> t;
    for (int i = 0; i < reps; ++i) {
        SWITCHYARD_CUDA_CHECK(cudaEventRecord(ev.at(0), s));
        fn();
        SWITCHYARD_CUDA_CHECK(cudaEventRecord(ev.at(1), s));
        SWITCHYARD_CUDA_CHECK(cudaEventSynchronize(ev.at(1)));
        t.push_back(ev.ms(0, 1));
    }
    if (samples) *samples = t;
    return median(t);
}

// Events of one staged forward: callback() records events first..first+n of the pool on the layer's stream ("begin",
// then one per stage); after the stream is synchronised, add_to() adds each stage's time.
class StageEvents {
 public:
    StageEvents(EventPool& pool, size_t first = 0) : pool_(pool), first_(first) {}
    StageCallback callback() {
        names_.clear();
        return [this](const char* stage, cudaStream_t s) {
            SWITCHYARD_CUDA_CHECK(cudaEventRecord(pool_.at(first_ + names_.size()), s));
            names_.emplace_back(stage);
        };
    }
    void add_to(StageSamples& s) {
        for (size_t i = 1; i < names_.size(); ++i) s.add(names_[i], pool_.ms(first_ + i - 1, first_ + i));
    }

 private:
    EventPool& pool_;
    size_t first_;
    std::vector<std::string> names_;
};
#endif

}  // namespace cli
}  // namespace switchyard
