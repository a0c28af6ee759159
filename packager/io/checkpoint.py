"""A Hugging Face checkpoint folder as data: config, weight files, tensor headers, companion files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from xpack.errors import XpackError
from xpack.packager.io.tensors import TensorSpec, read_header
from xpack.runtimes.artifacts import CARD_FILE, MANIFEST_FILE

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".onnx_data", ".h5", ".msgpack")
# Files a merged checkpoint rewrites itself instead of copying.
REWRITTEN = {"config.json", CARD_FILE, MANIFEST_FILE, "model.safetensors.index.json", "pytorch_model.bin.index.json"}


@dataclass(frozen=True)
class Checkpoint:
    path: Path

    @cached_property
    def config(self) -> dict:
        path = self.path / "config.json"
        if not path.is_file():
            raise XpackError(f"{self.path} has no config.json; pass a Hugging Face model folder or hub id as --base")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise XpackError(f"cannot read {path}: {exc}") from None

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    def text_config(self) -> dict:
        return self.config.get("text_config") or self.config

    @property
    def tie_word_embeddings(self) -> bool:
        """Transformers' default is True when the config does not say; the text config may say for multimodal models."""
        for cfg in (self.config, self.config.get("text_config") or {}):
            if "tie_word_embeddings" in cfg:
                return bool(cfg["tie_word_embeddings"])
        return True

    @cached_property
    def weight_files(self) -> list[Path]:
        """The safetensors files, in shard order. Pickle weights are listed by :meth:`pickle_files`."""
        idx = self.path / "model.safetensors.index.json"
        if idx.is_file():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise XpackError(f"cannot read {idx}: {exc}") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise XpackError(f"{self.path} is missing shard {missing[0]} named in its index; download the checkpoint again")
            return [self.path / f for f in files]
        single = self.path / "model.safetensors"
        return [single] if single.is_file() else []

    def pickle_files(self) -> list[Path]:
        idx = self.path / "pytorch_model.bin.index.json"
        if idx.is_file():
            return [self.path / f for f in sorted(set(json.loads(idx.read_text())["weight_map"].values()))]
        single = self.path / "pytorch_model.bin"
        return [single] if single.is_file() else []

    @cached_property
    def headers(self) -> dict[Path, dict[str, TensorSpec]]:
        if not self.weight_files:
            if self.pickle_files():
                raise XpackError(
                    f"{self.path} holds pickle weights (pytorch_model.bin) only; convert them to safetensors "
                    "(load and save_pretrained) first: pickle files can run code when loaded"
                )
            raise XpackError(f"{self.path} has no model.safetensors (or index); pass a Hugging Face model folder")
        return {f: read_header(f)[0] for f in self.weight_files}

    @cached_property
    def specs(self) -> dict[str, TensorSpec]:
        out: dict[str, TensorSpec] = {}
        for specs in self.headers.values():
            out.update(specs)
        return out

    def companion_files(self) -> list[Path]:
        """Tokenizer, processor, chat template, generation config, license...: everything but weights and rewritten files."""
        out = []
        for p in sorted(self.path.iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.name not in REWRITTEN and not p.name.endswith(WEIGHT_SUFFIXES):
                out.append(p)
        return out

    def quantization(self) -> dict | None:
        for cfg in (self.config, self.config.get("text_config") or {}):
            if cfg.get("quantization_config"):
                return cfg["quantization_config"]
        return None

    def check_not_packed(self) -> None:
        """A bitsandbytes/GPTQ/AWQ checkpoint stores packed integer weights that LoRA cannot be added to."""
        q = self.quantization()
        packed = [n for n, s in self.specs.items() if s.dtype in {"U8", "I32", "I8"} and n.endswith(".weight")]
        if q and packed:
            method = q.get("quant_method", "quantized")
            raise XpackError(
                f"base {self.path} is a {method} checkpoint with packed weights ({packed[0]}); merge into the "
                "full-precision base the adapter was trained from (e.g. google/gemma-3-4b-it instead of a -bnb-4bit repo)"
            )


def load_tokenizer(folder: Path):
    """``AutoTokenizer.from_pretrained(folder)`` without transformers' warnings.

    transformers 4.57.4-4.57.6 warn "incorrect regex pattern ... fix_mistral_regex=True" for every local
    folder whose config.json was written by them, Mistral or not (every checkpoint xpack merges), and
    change nothing: the warning is noise on each verify, calibration and materialization.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(verbosity)
