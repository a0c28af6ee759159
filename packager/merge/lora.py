"""Read a PEFT (or Unsloth, which writes PEFT's format) LoRA adapter and do the LoRA math.

Why not PEFT itself: ``merge_and_unload`` needs the whole base model in memory. xpack merges one
base tensor at a time, so it needs the adapter as plain data (per-module A, B, scale, DoRA
magnitude) and the delta formula. The semantics (scaling, rsLoRA, rank/alpha patterns,
fan_in_fan_out, DoRA, embeddings, modules_to_save) follow PEFT and are tested against it.
Tensors are float32 numpy arrays: the merge needs no torch (only a pickle adapter does).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from xpack.errors import XpackError
from xpack.packager.io.sources import HUB_ID
from xpack.packager.io.tensors import read_all_f32

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

PEFT_PREFIX = "base_model.model."
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# Suffixes PEFT uses for the pieces of a LoRA module in a saved adapter.
_LORA_PARTS = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "B_bias",
    ".lora_embedding_A": "A_emb",
    ".lora_embedding_B": "B_emb",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}
# Config keys that mean "this adapter is not a plain LoRA xpack can merge".
_UNSUPPORTED_OPTIONS = {
    "use_qalora": "QA-LoRA",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``name`` is its path in the model (PEFT prefix removed)."""

    name: str
    A: "np.ndarray"
    B: "np.ndarray"
    scale: float
    embedding: bool = False
    magnitude: "np.ndarray | None" = None
    B_bias: "np.ndarray | None" = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, fan_in_fan_out: bool, weight: float = 1.0) -> "np.ndarray":
        """The weight delta in fp32 (times ``weight``), shaped like the base weight (up to its kernel dims)."""
        import numpy as np

        A = self.A.reshape(self.A.shape[0], -1)
        B = self.B.reshape(self.B.shape[0], -1) * np.float32(self.scale * weight)  # scale the small factor
        d = B @ A
        if self.embedding:
            # nn.Embedding weight is (num_embeddings, dim); PEFT's embedding delta is (B @ A).T.
            d = d.T
        elif fan_in_fan_out:
            d = d.T
        return d


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as data: its modules, its whole-tensor replacements and its config."""

    path: Path
    config: dict
    modules: dict[str, LoraModule]
    replacements: dict[str, "np.ndarray"]  # modules_to_save: module path + ".weight"/".bias" -> full tensor
    base_layers: dict[str, "np.ndarray"] = field(default_factory=dict)  # saved base weights LoRA applies on top of
    weight: float = 1.0
    dtype: str = "float32"
    files: list[Path] = field(default_factory=list)

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora", False))

    def summary(self) -> dict:
        """What a model card and a manifest say about this adapter."""
        c = self.config
        ranks = sorted({m.rank for m in self.modules.values()})
        targets = c.get("target_modules")
        return {
            "peft_type": c.get("peft_type", "LORA"),
            "base_model_name_or_path": c.get("base_model_name_or_path"),
            "r": c.get("r"),
            "lora_alpha": c.get("lora_alpha"),
            "lora_dropout": c.get("lora_dropout"),
            "ranks": ranks,
            "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "use_rslora": bool(c.get("use_rslora", False)),
            "use_dora": self.use_dora,
            "rank_pattern": c.get("rank_pattern") or {},
            "alpha_pattern": c.get("alpha_pattern") or {},
            "modules_to_save": c.get("modules_to_save") or [],
            "fan_in_fan_out": self.fan_in_fan_out,
            "adapted_modules": len(self.modules),
            "replaced_tensors": sorted(self.replacements),
            "weight": self.weight,
            "saved_dtype": self.dtype,
        }


def pattern_key(patterns: dict, module_name: str) -> str | None:
    """PEFT's rule for rank_pattern/alpha_pattern keys: a key matches a module path suffix (regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def module_scale(config: dict, module_name: str, rank: int) -> float:
    """LoRA scaling of one module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha_pattern = config.get("alpha_pattern") or {}
    rank_pattern = config.get("rank_pattern") or {}
    key = pattern_key(alpha_pattern, module_name)
    alpha = alpha_pattern[key] if key is not None else config.get("lora_alpha", 8)
    rkey = pattern_key(rank_pattern, module_name)
    r = rank_pattern[rkey] if rkey is not None else config.get("r", rank)
    if r != rank:
        raise XpackError(
            f"adapter module {module_name} has rank {rank} but its adapter_config.json says r={r}; "
            "the adapter files do not belong together"
        )
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise XpackError(f"{adapter_dir} has no adapter_config.json; pass the folder a PEFT/Unsloth adapter was saved to")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XpackError(f"cannot read {path}: {exc}; re-save the adapter with save_pretrained") from None
    if not isinstance(config, dict):
        raise XpackError(f"{path} is not a JSON object; re-save the adapter with save_pretrained")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise XpackError(
            f"adapter {adapter_dir} is of type {peft_type or 'unknown'}, not LORA; xpack merges LoRA adapters only"
        )
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise XpackError(f"adapter {adapter_dir} uses {what} ({key}), which xpack cannot merge yet")
    return config


def _weights_file(adapter_dir: Path, allow_pickle: bool) -> Path:
    st = adapter_dir / SAFETENSORS_NAME
    if st.is_file():
        return st
    pkl = adapter_dir / PICKLE_NAME
    if pkl.is_file():
        if not allow_pickle:
            raise XpackError(
                f"{pkl} is a pickle file, which can run code when loaded; convert it to safetensors "
                "or pass --allow-pickle if you trust its source"
            )
        return pkl
    raise XpackError(f"{adapter_dir} has no {SAFETENSORS_NAME}; pass the folder a PEFT/Unsloth adapter was saved to")


def _load_pickle(path: Path) -> tuple[dict, set[str]]:
    import torch

    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise XpackError(f"cannot read {path}: {exc.__class__.__name__}; the file is truncated or corrupt") from None
    dtypes = {str(t.dtype).replace("torch.", "") for t in tensors.values()}
    return {k: t.float().numpy() if t.is_floating_point() else t.numpy() for k, t in tensors.items()}, dtypes


def split_key(key: str) -> tuple[str, str | None]:
    """``base_model.model.x.lora_A.weight`` -> (``x``, ``"A"``); a plain tensor -> (its key, None)."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    for suffix, part in _LORA_PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return key, None


def _replacement_name(key: str) -> str:
    """Map a saved modules_to_save tensor to the base tensor it replaces.

    PEFT saves modules_to_save as ``<module>.weight`` (older versions: ``<module>.modules_to_save.<name>.weight``).
    """
    key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
    return re.sub(r"\.original_module\.", ".", key)


def load_adapter(adapter_dir: Path, *, weight: float = 1.0, allow_pickle: bool = False) -> Adapter:
    """Read an adapter folder into an :class:`Adapter` (tensors as saved, math later in fp32)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise XpackError(f"adapter folder {adapter_dir} does not exist")
    config = read_config(adapter_dir)
    wfile = _weights_file(adapter_dir, allow_pickle)
    tensors, dtypes = _load_pickle(wfile) if wfile.suffix == ".bin" else read_all_f32(wfile)
    if not tensors:
        raise XpackError(f"{wfile} holds no tensors; the adapter was not saved completely")

    parts: dict[str, dict[str, "np.ndarray"]] = {}
    replacements: dict[str, "np.ndarray"] = {}
    base_layers: dict[str, "np.ndarray"] = {}
    for key, tensor in tensors.items():
        name, part = split_key(key)
        if part is None and ".base_layer." in name:
            # save_embedding_layers=True: the embedding the LoRA was trained on, saved whole.
            base_layers[name.replace(".base_layer.", ".")] = tensor
        elif part is None:
            replacements[_replacement_name(name)] = tensor
        else:
            # Adapter names appear in keys only when saved unusually ("lora_A.default.weight"); PEFT strips them.
            parts.setdefault(name, {})[part] = tensor

    modules = {name: _make_module(adapter_dir, config, name, p) for name, p in parts.items()}
    return Adapter(
        path=adapter_dir,
        config=config,
        modules=modules,
        replacements=replacements,
        base_layers=base_layers,
        weight=weight,
        dtype=",".join(sorted(dtypes)),
        files=[adapter_dir / "adapter_config.json", wfile],
    )


def _make_module(adapter_dir: Path, config: dict, name: str, p: dict) -> LoraModule:
    embedding = "A_emb" in p
    A, B = (p.get("A_emb"), p.get("B_emb")) if embedding else (p.get("A"), p.get("B"))
    if A is None or B is None:
        missing = "lora_A" if A is None else "lora_B"
        raise XpackError(f"adapter {adapter_dir} has no {missing} for module {name}; the adapter file is incomplete")
    rank = int(A.shape[0])
    if int(B.shape[1]) != rank:
        raise XpackError(f"adapter module {name}: lora_A has rank {rank} but lora_B has {B.shape[1]}; the adapter is corrupt")
    if p.get("magnitude") is not None and not config.get("use_dora"):
        raise XpackError(f"adapter module {name} has a DoRA magnitude vector but use_dora is false in adapter_config.json")
    return LoraModule(
        name=name,
        A=A,
        B=B,
        scale=module_scale(config, name, rank),
        embedding=embedding,
        magnitude=p.get("magnitude"),
        B_bias=p.get("B_bias"),
    )


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """``PATH_OR_ID[:WEIGHT]`` -> (source, weight). A Windows drive letter or hub revision is not a weight; a weight
    that is no finite number after an existing folder or a hub id is a one-line error (issue #14: ``ad:abc`` blamed
    the path, ``ad:nan`` merged a NaN model)."""
    head, sep, tail = spec.rpartition(":")
    if not (sep and head):
        return spec, 1.0
    try:
        weight = float(tail)
    except ValueError:
        if Path(head).expanduser().is_dir() or HUB_ID.match(head):
            raise XpackError(f"the adapter weight in {spec!r} is {tail!r}, not a number; write PATH:WEIGHT, e.g. {head}:0.5") from None
        return spec, 1.0
    if not math.isfinite(weight):
        raise XpackError(f"the adapter weight in {spec!r} is {tail}, not a finite number; write PATH:WEIGHT, e.g. {head}:0.5")
    return head, weight
