"""``llama_cpp``, imported so that torch can still be imported after it in the same process.

Measured on an NVIDIA H200 (torch 2.11+cu130; llama-cpp-python 0.3.36 built with CUDA 13 against the cuBLAS of the
pip wheels torch loads; benchmarks/gpu_check.py's device run): ``import llama_cpp`` and then ``import torch``
segfaults inside torch's import, while the other order works. ``xpack verify`` (the torch reference beside a GGUF)
and the calibrated exports (llama.cpp's quantizer beside the torch statistics) use both in one process, and the first
to be imported is not always torch. So where the llama.cpp build has a CUDA backend and torch is installed, torch is
imported first; CPU builds, and machines without torch (an edge box with ``xpack[llama]`` alone), pay nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def cuda_build() -> bool:
    """Whether the installed llama-cpp-python carries a CUDA backend (its ggml-cuda library), without importing it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(any((Path(folder) / "lib").glob("*ggml-cuda*")) for folder in spec.submodule_search_locations)


def load_llama_cpp():
    """``import llama_cpp`` (ImportError as usual when it is not installed), torch first where the order matters."""
    if "llama_cpp" not in sys.modules and "torch" not in sys.modules and cuda_build() and importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401  (the import order; see the module docstring)
    import llama_cpp

    return llama_cpp
