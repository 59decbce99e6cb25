"""Switchyard: Mixture-of-Experts layers (C++17/CUDA) with a PyTorch binding.

``import switchyard.torch`` loads the torch custom ops (``torch.ops.switchyard.*``) from the compiled library
``_switchyard_torch.so`` and provides ``switchyard.torch.MoE``. The library is looked up, in order, at the path in
the environment variable ``SWITCHYARD_TORCH_LIB`` (tests run from a CMake build tree set it) and beside this file
(where ``pip install .`` puts it).
"""
import os as _os

__all__ = ["torch_library_path"]


def torch_library_path():
    """Path of the compiled torch binding, or raise FileNotFoundError naming the places searched."""
    candidates = []
    env = _os.environ.get("SWITCHYARD_TORCH_LIB")
    if env:
        candidates.append(env)
    candidates.append(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "_switchyard_torch.so"))
    for c in candidates:
        if _os.path.isfile(c):
            return c
    raise FileNotFoundError("switchyard: the torch binding _switchyard_torch.so was not found (looked at: "
                            + ", ".join(candidates) + "); build with SWITCHYARD_BUILD_TORCH=ON or `pip install .`")
