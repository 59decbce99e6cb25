// src/api/version.cpp: which backends this build of the library holds.
#include "switchyard/version.h"

#ifdef SWITCHYARD_WITH_CUDA
#include "cuda/stages_cuda.h"
#endif

namespace switchyard {

bool has_cuda_backend() {
#ifdef SWITCHYARD_WITH_CUDA
    return true;
#else
    return false;
#endif
}

int cuda_device_count() {
#ifdef SWITCHYARD_WITH_CUDA
    try {
        return cuda::device_count();
    } catch (...) {
        return 0;  // no driver / no device: the CPU backend remains the default
    }
#else
    return 0;
#endif
}

}  // namespace switchyard
