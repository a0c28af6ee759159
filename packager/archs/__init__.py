"""Architecture knowledge as data: one JSON file per architecture (like mergekit's _data/architectures).

Each table names the architecture's model classes and types, how its tensor names moved between
transformers versions (``key_aliases``: regex -> replacement, applied to old names to get the
canonical ones), its embedding and output-head tensors, its vision parts and its usual LoRA targets.
Later steps (GGUF, ONNX) add their own fields to the same tables.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from xpack.errors import XpackError


@dataclass(frozen=True)
class Arch:
    name: str
    description: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    pipeline_tag: str
    auto_class: str
    vision: bool
    key_aliases: tuple[tuple[str, str], ...]
    embed_key: str
    lm_head_key: str
    vision_prefixes: tuple[str, ...]
    lora_targets: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def canonical(self, name: str) -> str:
        """A tensor or module name in the naming of current transformers."""
        for pattern, repl in self.key_aliases:
            name = re.sub(pattern, repl, name)
        return name

    def is_vision(self, canonical_name: str) -> bool:
        return any(canonical_name.startswith(p) for p in self.vision_prefixes)


GENERIC = Arch(
    name="generic",
    description="any other transformers model (merged by tensor name, no architecture quirks)",
    architectures=(),
    model_types=(),
    pipeline_tag="text-generation",
    auto_class="AutoModelForCausalLM",
    vision=False,
    key_aliases=(),
    embed_key="model.embed_tokens.weight",
    lm_head_key="lm_head.weight",
    vision_prefixes=(),
)

_FIELDS = {f for f in Arch.__dataclass_fields__ if f != "extra"}


def _from_json(data: dict) -> Arch:
    known = {k: v for k, v in data.items() if k in _FIELDS}
    known["architectures"] = tuple(known.get("architectures", ()))
    known["model_types"] = tuple(known.get("model_types", ()))
    known["key_aliases"] = tuple(tuple(p) for p in known.get("key_aliases", ()))
    known["vision_prefixes"] = tuple(known.get("vision_prefixes", ()))
    return Arch(**known, extra={k: v for k, v in data.items() if k not in _FIELDS})


@lru_cache(maxsize=1)
def all_archs() -> dict[str, Arch]:
    out = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            arch = _from_json(json.loads(entry.read_text()))
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
