"""The table of runtimes and how an artifact finds its runtime.

Runtimes are named by lazy "module:Class" strings, so picking one never imports the others' libraries."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from xpack.errors import XpackError
from xpack.profiles.machine import resolve_for_machine
from xpack.runtimes.artifacts import PATH_KINDS, gguf_models, read_manifest
from xpack.runtimes.integrity import require_intact

if TYPE_CHECKING:  # pragma: no cover
    from xpack.profiles.profile import Profile
    from xpack.runtimes.base import Runtime

# Lazy "module:Class" strings: importing this module never imports a runtime's libraries.
RUNTIMES: dict[str, str] = {
    "torch": "xpack.runtimes.torch_ref:TorchRuntime",
    "llamacpp": "xpack.runtimes.llamacpp:LlamaCppRuntime",
    "onnx": "xpack.runtimes.onnxrt:OnnxRuntime",
}

# Artifact format (as in manifest.json "format" and Profile.formats) -> the runtime that runs it.
FORMAT_RUNTIMES: dict[str, str] = {"gguf": "llamacpp", "onnx": "onnx", "torch": "torch"}


def get_runtime(name: str) -> type[Runtime]:
    """The runtime class registered as ``name`` (imported on demand)."""
    target = RUNTIMES.get(name)
    if target is None:
        raise XpackError(f"unknown runtime: {name} (known: {', '.join(sorted(RUNTIMES))})")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = {"llamacpp": "pip install 'xpack[llama]'", "torch": "pip install 'xpack[pack]'", "onnx": "pip install 'xpack[onnx]'"}.get(name, "reinstall xpack")
        raise XpackError(f"the {name} runtime cannot start: {exc}; install what it needs ({hint})") from None
    return getattr(module, class_name)




def _runtime_of_format(fmt: str, path: Path) -> str:
    name = FORMAT_RUNTIMES.get(fmt)
    if name is None:
        raise XpackError(f"{path} holds a '{fmt}' artifact, which no runtime runs (formats: {', '.join(sorted(FORMAT_RUNTIMES))})")
    if name not in RUNTIMES:
        raise XpackError(f"{path} holds a {fmt} artifact, but the {name} runtime is not available in this xpack version")
    return name


def artifact_formats(path: "str | os.PathLike") -> list[str]:
    """The formats found at ``path`` (several when a folder holds e.g. both a GGUF and safetensors)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            if path.name.lower().startswith("mmproj"):
                raise XpackError(f"{path} is a vision projector (mmproj), not a model; pass the model .gguf or its folder")
            return ["gguf"]
        if path.suffix.lower() == ".onnx":
            return ["onnx"]
        if path.name.lower().endswith(".onnx_data"):
            raise XpackError(f"{path} holds the weights of an ONNX model, not the model; pass its .onnx file or its folder")
        return []
    if not path.is_dir():
        return []
    manifest_format = read_manifest(path).get("format")
    found = [manifest_format.lower()] if isinstance(manifest_format, str) and manifest_format else []  # first: what the folder says it is
    if gguf_models(path):
        found.append("gguf")
    if any(path.glob("*.onnx")) or any(path.glob("onnx/*.onnx")):
        found.append("onnx")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        found.append("torch")
    return list(dict.fromkeys(found))  # every format the folder holds: the profile's preference picks (runtime_for)


def runtime_for(path: "str | os.PathLike", profile: "Profile | None" = None) -> str:
    """The name of the runtime that runs the artifact at ``path``.

    A folder holding several formats is run in the first of ``profile.formats`` it has.
    """
    path = Path(path)
    if not path.exists():
        raise XpackError(f"{path} does not exist; pass {PATH_KINDS}")
    formats = artifact_formats(path)
    if not formats:
        raise XpackError(f"cannot tell how to run {path}: pass {PATH_KINDS}")
    if len(formats) > 1 and profile is not None:  # without a profile: the manifest's format, else gguf, onnx, torch
        order = list(profile.formats)
        formats.sort(key=lambda f: order.index(f) if f in order else len(order))
    return _runtime_of_format(formats[0], path)


def load(path: "str | os.PathLike", profile: "Profile", runtime: str | None = None, check: bool = True, **options) -> Runtime:
    """Load the artifact at ``path`` on ``profile`` with ``runtime`` (default: the one ``runtime_for`` picks).

    ``check``: first compare the artifact's files with the sha256 its manifest.json holds (runtimes/integrity.py).
    ``options`` go to the runtime's constructor (the torch runtime's ``peft``: adapters over a base).

    The profile is first adapted to this machine (``resolve_for_machine``: threads clamped to the
    cores here, an error for a GPU profile without a GPU); its notes end up in ``runtime.notes``.
    """
    path = Path(path)
    name = runtime or runtime_for(path, profile)
    cls = get_runtime(name)
    if not path.exists():
        raise XpackError(f"{path} does not exist; pass {PATH_KINDS}")
    cls.locate(path)
    if check:  # files against their manifest (a stamp makes a repeat free); runtimes/integrity.py
        require_intact(path)
    profile, notes = resolve_for_machine(profile)
    rt = cls(path, profile, **options)
    rt.notes.extend(notes)
    return rt
