#!/usr/bin/env bash
# Installs what the build and the tests need, once; quiet and quick when everything is already there.
# Debian packages: compiler tool chain pieces and the C++ libraries (see README "Dependencies").
# PyPI: numpy (end-to-end tests, plots' data), nvidia-cutlass (CUTLASS headers, only when nvcc exists),
#       matplotlib (report plots).
# On a machine without a package registry (the GPU machine) missing pieces are reported, not fatal:
# there they come from the git-ignored .deps/ folder (scripts/pack_device_deps.sh).
set -uo pipefail

CUTLASS_PIN="nvidia-cutlass==4.2.0.0"
missing_debs=()
have_header() { [ -e "/usr/include/$1" ] || [ -e "$(pwd)/.deps/root/usr/include/$1" ]; }
command -v cmake >/dev/null || missing_debs+=(cmake)
command -v ninja >/dev/null || missing_debs+=(ninja-build)
command -v g++ >/dev/null || missing_debs+=(g++)
have_header gtest/gtest.h || missing_debs+=(libgtest-dev)
have_header benchmark/benchmark.h || missing_debs+=(libbenchmark-dev)
have_header CLI/CLI.hpp || missing_debs+=(libcli11-dev)
have_header nlohmann/json.hpp || missing_debs+=(nlohmann-json3-dev)
have_header fmt/core.h || missing_debs+=(libfmt-dev)
[ -e /usr/lib/gcc/x86_64-linux-gnu/12/include/omp.h ] || ls /usr/lib/gcc/*/*/include/omp.h >/dev/null 2>&1 || missing_debs+=(libgomp1)
command -v python3 >/dev/null || missing_debs+=(python3 python3-pip)
# `make test-sanitize` (CI): clang with AddressSanitizer/UBSan, libFuzzer and its OpenMP runtime.
command -v clang++-14 >/dev/null || missing_debs+=(clang-14)
ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 || missing_debs+=(libclang-rt-14-dev)
[ -e /usr/lib/llvm-14/lib/libomp.so ] || missing_debs+=(libomp-14-dev)

if [ ${#missing_debs[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${missing_debs[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing_debs[@]}") >/tmp/switchyard-apt.log 2>&1 || {
      echo "setup: apt-get failed (see /tmp/switchyard-apt.log); continuing with what is there" >&2; }
  else
    echo "setup: missing Debian packages (${missing_debs[*]}) and no root apt-get; continuing" >&2
  fi
fi

pip_install() {
  python3 -m pip install -q --disable-pip-version-check "$@" >/tmp/switchyard-pip.log 2>&1 ||
    python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@" >>/tmp/switchyard-pip.log 2>&1 ||
    echo "setup: pip install $* failed (see /tmp/switchyard-pip.log); continuing" >&2
}
py_has() { python3 -c "import $1" >/dev/null 2>&1; }
if ! py_has numpy; then echo "setup: pip install numpy"; pip_install "numpy>=1.24"; fi
if ! py_has matplotlib; then echo "setup: pip install matplotlib"; pip_install "matplotlib>=3.6"; fi
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  if [ ! -e .deps/cutlass/include/cutlass/cutlass.h ] && ! python3 -c \
      "import cutlass_library, importlib.metadata as m; assert m.version('nvidia-cutlass')=='4.2.0.0'" >/dev/null 2>&1; then
    echo "setup: pip install $CUTLASS_PIN (CUTLASS headers)"
    pip_install --no-deps "$CUTLASS_PIN"
  fi
fi
# ---- PyTorch binding (bindings/torch, tests/python/test_torch_*.py) ----------------------- [torch block begin]
# torch from PyPI, pinned: 2.11.0 is the cu130 build (the same CUDA 13.0 as nvcc here and on the GPU machine).
# Its Linux wheel pulls about 2.6 GB of NVIDIA runtime wheels (cuBLAS, cuDNN, NCCL, ...); measured on the 2-core
# machine: download 22 s, install 25 s, so CI stays well inside its budget. import torch needs those libraries even
# for CPU work, so they are installed rather than skipped. Set SWITCHYARD_NO_TORCH=1 to skip (binding then OFF).
TORCH_PIN="torch==2.11.0"
if [ "${SWITCHYARD_NO_TORCH:-0}" != 1 ]; then
  if ! python3 -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.11.0' else 1)" >/dev/null 2>&1; then
    echo "setup: pip install $TORCH_PIN (about 3 GB with its CUDA runtime wheels)"
    pip_install "$TORCH_PIN"
  fi
  if ! py_has pytest; then echo "setup: pip install pytest"; pip_install "pytest>=8"; fi
  # transformers, for switchyard.torch.patch_model's tests (tests/python/test_torch_hf.py, tiny random models built
  # from config objects: no model downloads) and examples/finetune_hf_moe.py. Pinned to the GPU machine's version:
  # switchyard.hf reads the MoE block classes of this release (5.x: fused gate_up_proj experts, router modules).
  TRANSFORMERS_PIN="transformers==5.17.0"
  if ! python3 -c "import transformers, sys; sys.exit(0 if transformers.__version__ == '5.17.0' else 1)" >/dev/null 2>&1; then
    echo "setup: pip install $TRANSFORMERS_PIN"
    pip_install "$TRANSFORMERS_PIN"
  fi
fi
# ------------------------------------------------------------------------------------------ [torch block end]
exit 0
