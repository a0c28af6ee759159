"""Architecture knowledge as data: one JSON table per architecture (like mergekit's _data/architectures).

Each table (``*.json`` here) names the architecture's model classes and types, how its tensor names
moved between transformers versions, its embedding, output head and vision parts, its usual LoRA
targets, and a section per export step (``gguf``, ``onnx``). The tables load into the typed records
of schema.py / gguf_spec.py / onnx_spec.py; tests/test_archs.py loads every shipped table.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from xpack.errors import XpackError
from xpack.packager.archs.parse import parse
from xpack.packager.archs.schema import GENERIC, Arch

__all__ = ["Arch", "GENERIC", "all_archs", "find_arch", "require_arch"]


@lru_cache(maxsize=1)
def all_archs() -> dict[str, Arch]:
    out = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            arch = parse(Arch, json.loads(entry.read_text()), f"architecture table {entry.name}")
            out[arch.name] = arch
    return out


def find_arch(config: dict) -> Arch | None:
    """The table for a config.json (by model class, then model_type), or None when xpack has none."""
    archs = all_archs().values()
    for cls in config.get("architectures") or []:
        for arch in archs:
            if cls in arch.architectures:
                return arch
    model_type = config.get("model_type")
    for arch in archs:
        if model_type in arch.model_types:
            return arch
    return None


def require_arch(config: dict, what: str) -> Arch:
    """Like :func:`find_arch`, but an unknown architecture is a clear error naming the supported ones."""
    arch = find_arch(config)
    if arch is None:
        names = ", ".join(f"{a.name} ({'/'.join(a.architectures)})" for a in all_archs().values())
        got = "/".join(config.get("architectures") or []) or config.get("model_type") or "unknown"
        raise XpackError(f"{what} does not support architecture {got}; supported: {names}")
    return arch
