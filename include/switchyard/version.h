#pragma once
namespace switchyard {
constexpr int kVersionMajor = 0;
constexpr int kVersionMinor = 1;
constexpr int kVersionPatch = 0;
// True when this build of the library contains the CUDA backend.
bool has_cuda_backend();
// Number of CUDA devices visible (0 when built without CUDA or no GPU is present).
int cuda_device_count();
}  // namespace switchyard
