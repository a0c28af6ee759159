"""``--runtime onnx``: the one registry entry for both kinds of ONNX artifact.

An ONNX folder holds either one decoder graph (``xpack export --format onnx`` of Llama, Gemma 2/3,
Gemma 3 with vision, or an optimum export: runtimes/onnx_decoder.py) or Llama 3.2 Vision's three
graphs, told apart by ``mllama_onnx.json`` beside them (runtimes/onnx_mllama.py). Constructing an
:class:`OnnxRuntime` builds the one its folder needs, as ``pathlib.Path(...)`` builds a PosixPath: the
registry, ``xpack run --runtime onnx`` and the artifact check (``locate``) stay one name.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from xpack.runtimes.artifacts import MLLAMA_META_FILE
from xpack.runtimes.onnx_base import OnnxRuntimeBase, onnx_file_of
from xpack.runtimes.onnx_decoder import OnnxDecoderRuntime
from xpack.runtimes.onnx_mllama import MllamaOnnxRuntime

if TYPE_CHECKING:  # pragma: no cover
    from xpack.profiles.profile import Profile

__all__ = ["OnnxRuntime", "onnx_runtime_class"]


def onnx_runtime_class(artifact: "str | os.PathLike") -> type[OnnxRuntimeBase]:
    """The runtime class of the ONNX artifact at ``artifact``: mllama's when its folder holds mllama_onnx.json."""
    folder = onnx_file_of(artifact).parent
    return MllamaOnnxRuntime if (folder / MLLAMA_META_FILE).is_file() else OnnxDecoderRuntime


class OnnxRuntime(OnnxRuntimeBase):
    """``OnnxRuntime(artifact, profile)`` is an :class:`OnnxDecoderRuntime` or a :class:`MllamaOnnxRuntime`
    (see the module docstring); its name, formats and ``locate`` are the ONNX runtimes' own."""

    def __new__(cls, artifact: "str | os.PathLike", profile: "Profile"):
        # the instance returned is not an OnnxRuntime, so Python does not run __init__ a second time
        return onnx_runtime_class(artifact)(artifact, profile)
