"""Reading an artifact folder: its JSON files, its manifest and its GGUF models."""

from __future__ import annotations

import json
from pathlib import Path

from xpack.errors import XpackError

# What `xpack run --artifact` and `xpack verify` take, for error messages.
PATH_KINDS = (
    "a .gguf file, a folder from `xpack export` (manifest.json with a format), "
    "or a Hugging Face checkpoint folder (config.json + *.safetensors, e.g. from `xpack merge`)"
)


def gguf_models(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.gguf") if p.is_file() and not p.name.lower().startswith("mmproj"))


def read_json(path: Path) -> dict:
    """A JSON object file of an artifact ({} when the file is missing); a broken one is a one-line error."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XpackError(f"{path} is not valid JSON ({exc}); re-export the artifact") from None
    return data if isinstance(data, dict) else {}


def read_manifest(folder: Path) -> dict:
    return read_json(folder / "manifest.json")

