"""What an artifact folder holds and how it is read: the one home of its file names, its JSON files,
its manifest and its GGUF models. The packager writes these names; the runtimes read them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from xpack.errors import XpackError

# Every artifact folder (merge, export): sha256 of every file and how it was made; the model card.
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"
# GGUF exports: the ollama Modelfile beside the .gguf file(s).
MODELFILE = "Modelfile"
# ONNX exports of a decoder (+ Gemma 3's vision tower and token embedding), each graph with its weights beside it.
ONNX_MODEL_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx_data"
EMBED_FILE = "embed.onnx"
EMBED_DATA_FILE = "embed.onnx_data"
VISION_FILE = "vision.onnx"
VISION_DATA_FILE = "vision.onnx_data"
# ONNX exports of Llama 3.2 Vision (mllama): three graphs and the file that says how they fit together.
MLLAMA_CROSS_KV_FILE = "cross_kv.onnx"
MLLAMA_DECODER_FILE = "decoder.onnx"
MLLAMA_META_FILE = "mllama_onnx.json"
MLLAMA_FORMAT = "xpack-mllama-onnx"
# Image preprocessing settings, copied from the checkpoint into vision artifacts.
PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"

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
    """The artifact's manifest.json ({} when it has none); a broken one is a one-line error."""
    return read_json(folder / MANIFEST_FILE)


@dataclass(frozen=True)
class MainFile:
    """How a runtime finds an artifact's main file (the file itself, the one manifest.json names, or a
    folder's single one) and names it in its one-line errors."""

    suffix: str  # ".gguf"
    manifest_key: str  # the manifest.json key naming the file: "gguf_file"
    candidates: Callable[[Path], list[Path]]  # a folder's files of this kind
    a_file: str  # "a .gguf file"
    a_model: str  # "a GGUF model"
    writer: str  # what writes such a folder: "`xpack export`"
    none: str  # what a folder without one holds none of: "model .gguf file"
    several: str  # "several .gguf models"

    def find(self, path: "str | os.PathLike") -> Path:
        path = Path(path)
        if path.is_file():
            if path.suffix.lower() != self.suffix:
                raise XpackError(f"{path} is not {self.a_file}; pass {self.a_model} or the folder {self.writer} wrote")
            return path
        if not path.is_dir():
            raise XpackError(f"{path} does not exist; pass {self.a_file} or a folder holding one")
        named = read_manifest(path).get(self.manifest_key)
        if isinstance(named, str) and named:
            candidate = path / named
            if not candidate.is_file():
                raise XpackError(f"{path}/manifest.json names {self.manifest_key} {named}, which is missing; re-export the artifact")
            return candidate
        found = self.candidates(path)
        if len(found) == 1:
            return found[0]
        if not found:
            raise XpackError(f"{path} holds no {self.none}; pass {self.a_file} or the folder {self.writer} wrote")
        raise XpackError(f"{path} holds {self.several} ({', '.join(p.name for p in found)}); pass one of them as --artifact")

