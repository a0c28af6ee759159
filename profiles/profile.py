"""Hardware profiles: what a target machine is (device, threads, dtype, context, memory) as TOML data.

Shipped profiles live in the ``xpack.profiles`` package (``profiles/*.toml`` in the repository):
``a100``, ``t4`` and ``cpu16``, with the seed model card's reference figures. A user profile is any
TOML file with the same keys; only ``device`` is required::

    device = "cpu"
    threads = 8

``load_profile`` validates every key (one clear line per problem); ``machine.py`` beside this file
says which shipped profile fits this machine and adapts a profile to the machine it runs on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from xpack.errors import XpackError

__all__ = [
    "Profile",
    "Reference",
    "load_profile",
    "list_profiles",
    "profile_names",
]

DEVICES = ("cuda", "cpu")
DTYPES = ("bfloat16", "float16", "float32")
FORMATS = ("gguf", "onnx", "torch")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Reference:
    """The seed model card's figures for this hardware (what a 4B fine-tune did there)."""

    hardware: str
    load_s: float
    tokens256_s: float  # seconds to generate 256 tokens
    memory_gb: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Profile:
    name: str
    device: str  # "cuda" | "cpu"
    description: str = ""
    threads: int = 0  # CPU threads; 0 = every core
    gpu_layers: int = 0  # layers offloaded to the GPU; -1 = all
    compute_dtype: str = "float32"
    n_ctx: int = 2048  # context length (prompt + answer)
    memory_budget_gb: float | None = None
    formats: tuple[str, ...] = FORMATS  # preferred artifact formats, best first
    reference: Reference | None = None
    source: str = field(default="", compare=False)  # the TOML file it was read from

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["formats"] = list(self.formats)
        return data


# key -> (accepted python types, the type as error messages name it)
_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "a string"),
    "description": ((str,), "a string"),
    "device": ((str,), "a string"),
    "threads": ((int,), "an integer"),
    "gpu_layers": ((int,), "an integer"),
    "compute_dtype": ((str,), "a string"),
    "n_ctx": ((int,), "an integer"),
    "memory_budget_gb": ((int, float), "a number"),
    "formats": ((list,), "a list of strings"),
    "reference": ((dict,), "a table ([reference])"),
}
_REFERENCE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "hardware": ((str,), "a string"),
    "load_s": ((int, float), "a number"),
    "tokens256_s": ((int, float), "a number"),
    "memory_gb": ((int, float), "a number"),
}


def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}.get(
        type(value), type(value).__name__
    )


def _check_types(where: str, data: dict, spec: dict, prefix: str = "") -> None:
    for key, value in data.items():
        if key not in spec:
            raise XpackError(f"{where}: unknown key '{prefix}{key}' (known: {', '.join(spec)})")
        types, expected = spec[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise XpackError(f"{where}: '{prefix}{key}' must be {expected}, got {_type_name(value)} {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # TOML has nan and inf, which pass every comparison check
            raise XpackError(f"{where}: '{prefix}{key}' must be a finite number, got {value}")


def _read_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise XpackError(f"profile {path} is not valid TOML ({exc}); fix the file") from None
    except UnicodeDecodeError as exc:
        raise XpackError(f"profile {path} is not UTF-8 text (byte {exc.start} cannot be read); save it as UTF-8") from None
    except OSError as exc:
        raise XpackError(f"cannot read profile {path} ({exc.strerror or exc})") from None


def profile_from_dict(data: dict, where: str, default_name: str) -> Profile:
    """Validate a parsed profile table; every problem is one line naming the key."""
    _check_types(where, data, _KEYS)
    data = dict(data)
    if "device" not in data:
        raise XpackError(f"{where}: missing key 'device' (\"cuda\" or \"cpu\")")
    device = data["device"]
    if device not in DEVICES:
        raise XpackError(f"{where}: 'device' must be \"cuda\" or \"cpu\", got {device!r}")
    name = data.get("name", default_name)
    if not _NAME.match(name):
        raise XpackError(f"{where}: 'name' must be letters, digits, '-', '_' or '.', got {name!r}")
    threads = data.get("threads", 0)
    if threads < 0:
        raise XpackError(f"{where}: 'threads' must be >= 0 (0 = all cores), got {threads}")
    gpu_layers = data.get("gpu_layers", -1 if device == "cuda" else 0)
    if gpu_layers < -1:
        raise XpackError(f"{where}: 'gpu_layers' must be -1 (all) or >= 0, got {gpu_layers}")
    if device == "cpu" and gpu_layers != 0:
        raise XpackError(f"{where}: 'gpu_layers' must be 0 when device is \"cpu\", got {gpu_layers}")
    dtype = data.get("compute_dtype", "float16" if device == "cuda" else "float32")
    if dtype not in DTYPES:
        raise XpackError(f"{where}: 'compute_dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}")
    n_ctx = data.get("n_ctx", 2048)
    if not 64 <= n_ctx <= 1_048_576:
        raise XpackError(f"{where}: 'n_ctx' must be between 64 and 1048576 tokens, got {n_ctx}")
    budget = data.get("memory_budget_gb")
    if budget is not None and budget <= 0:
        raise XpackError(f"{where}: 'memory_budget_gb' must be > 0, got {budget}")
    formats = data.get("formats", list(FORMATS))
    bad = [f for f in formats if not isinstance(f, str) or f not in FORMATS]
    if not formats or bad:
        raise XpackError(f"{where}: 'formats' must be a non-empty list drawn from {', '.join(FORMATS)}, got {formats!r}")
    if len(set(formats)) != len(formats):
        raise XpackError(f"{where}: 'formats' lists a format twice: {formats!r}")
    reference = None
    if "reference" in data:
        ref = data["reference"]
        _check_types(where, ref, _REFERENCE_KEYS, prefix="reference.")
        missing = [k for k in _REFERENCE_KEYS if k not in ref]
        if missing:
            raise XpackError(f"{where}: missing key 'reference.{missing[0]}' (the [reference] table needs {', '.join(_REFERENCE_KEYS)})")
        for key in ("load_s", "tokens256_s", "memory_gb"):
            if ref[key] <= 0:
                raise XpackError(f"{where}: 'reference.{key}' must be > 0, got {ref[key]}")
        reference = Reference(
            hardware=ref["hardware"], load_s=float(ref["load_s"]), tokens256_s=float(ref["tokens256_s"]), memory_gb=float(ref["memory_gb"])
        )
    return Profile(
        name=name,
        device=device,
        description=data.get("description", ""),
        threads=threads,
        gpu_layers=gpu_layers,
        compute_dtype=dtype,
        n_ctx=n_ctx,
        memory_budget_gb=float(budget) if budget is not None else None,
        formats=tuple(formats),
        reference=reference,
        source=where,
    )


def _shipped_dir():
    from importlib.resources import files

    return files("xpack.profiles")


def profile_names() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.name[: -len(".toml")] for p in _shipped_dir().iterdir() if p.name.endswith(".toml"))


def _load_file(path: Path, default_name: str) -> Profile:
    return profile_from_dict(_read_toml(path), str(path), default_name)


def load_profile(name_or_path: "str | os.PathLike") -> Profile:
    """A shipped profile by name (``cpu16``) or a user profile from a TOML file path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = text.endswith(".toml") or os.sep in text or "/" in text or path.is_file()
    if looks_like_path:
        if not path.is_file():
            raise XpackError(f"profile file {path} not found; pass a shipped profile ({', '.join(profile_names())}) or an existing TOML file")
        return _load_file(path, default_name=path.stem)
    names = profile_names()
    if text not in names:
        raise XpackError(f"unknown profile '{text}' (shipped: {', '.join(names)}); or pass the path of a TOML profile file")
    resource = _shipped_dir() / f"{text}.toml"
    with _as_path(resource) as file_path:
        profile = _load_file(Path(file_path), default_name=text)
    return dataclasses.replace(profile, source=f"shipped ({text}.toml)")


def _as_path(resource):
    from importlib.resources import as_file

    return as_file(resource)


def list_profiles() -> list[Profile]:
    """Every shipped profile, by name."""
    return [load_profile(n) for n in profile_names()]


# --------------------------------------------------------------------------------------------------
# This machine
# --------------------------------------------------------------------------------------------------
