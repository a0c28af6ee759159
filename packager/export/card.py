"""The model cards of ``xpack export`` (GGUF and ONNX): what the templates in packager/cards/ are filled with."""

from __future__ import annotations

import re
from pathlib import Path

from xpack import __version__
from xpack.packager.cards import render as cards
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.sources import Source
from xpack.packager.merge.job import EXAMPLE_PROMPT
from xpack.runtimes.artifacts import CARD_FILE, PREPROCESSOR_CONFIG, PROCESSOR_CONFIG, read_json
from xpack.runtimes.settings import GenerationSettings

QUANT_NOTES = {
    "F32": "32-bit float, lossless", "F16": "16-bit float", "BF16": "bfloat16", "Q8_0": "8-bit, blocks of 32",
    "Q6_K": "6-bit K-quant", "Q5_K_M": "5-bit K-quant, medium", "Q4_K_M": "4-bit K-quant, medium",
}


def write_gguf_card(tmp: Path, out_name: str, src: Source, ckpt: Checkpoint, source_manifest: dict, adapter_refs: list[str],
                    result, quant: str, hashes: dict[str, str], gguf_file: str, mmproj: str | None) -> None:
    base_name = _base_name(src, ckpt, source_manifest)
    fm = _front_matter(src, _base_hub_id(src, ckpt, source_manifest), "gguf", bool(mmproj), ["gguf", "llama.cpp", "xpack", quant.lower()])
    files = [
        {"name": f, "role": i["role"], "quant": i["quant"], "size": _size((tmp / f).stat().st_size), "sha256": hashes[f]}
        for f, i in result.files.items()
    ]
    text_info = result.files[gguf_file]
    pre = read_json(src.path / PREPROCESSOR_CONFIG) if mmproj else {}
    vision_cfg = ckpt.config.get("vision_config") or {}
    text = cards.render(
        "gguf_card.md.j2",
        **_common_fields(out_name, src, ckpt, source_manifest, adapter_refs, base_name, fm),
        files=files,
        quant=quant,
        quant_note=QUANT_NOTES.get(quant, "llama.cpp quant type"),
        tensor_types=", ".join(f"{k} x{v}" for k, v in sorted(text_info["tensor_types"].items())),
        fallbacks=", ".join(f"{k} x{v}" for k, v in sorted(text_info["fallbacks"].items())),
        vocab=result.vocab,
        mmproj=mmproj,
        image_size=vision_cfg.get("image_size"),
        image_mean=pre.get("image_mean"),
        image_std=pre.get("image_std"),
        gguf_file=gguf_file,
        calibration=_calibration_fields(result.calibration),
        ollama_name=re.sub(r"[^a-z0-9-]+", "-", out_name.lower()).strip("-") or "model",
    )
    (tmp / CARD_FILE).write_text(text)


def _calibration_fields(cal: dict | None) -> dict | None:
    if not cal:
        return None
    mix_types = ", ".join(f"{t} x{n}" for t, n in sorted(cal["mix"]["type_counts"].items()))
    budget = _size(cal["target"]["bytes"]) if cal["target"]["bytes"] else "the plain type's size + 5%"
    return {**cal, "mix_types": mix_types, "budget": budget, "mix_size": _size(cal["mix"]["bytes"]), "plain_size": _size(cal["plain"]["bytes"])}


def write_onnx_card(tmp: Path, out_name: str, src: Source, ckpt: Checkpoint, source_manifest: dict, adapter_refs: list[str],
                    result, label: str, hashes: dict[str, str]) -> None:
    base_name = _base_name(src, ckpt, source_manifest)
    fm = _front_matter(src, _base_hub_id(src, ckpt, source_manifest), "onnxruntime", bool(result.vision), ["onnx", "onnxruntime", "xpack", label])
    files = [{"name": f, "size": _size((tmp / f).stat().st_size), "sha256": h} for f, h in hashes.items()]
    total = sum((tmp / f).stat().st_size for f in hashes)
    art = result.validation.get("artifact") or {}
    text = cards.render(
        "onnx_card.md.j2",
        **_common_fields(out_name, src, ckpt, source_manifest, adapter_refs, base_name, fm),
        files=files,
        onnx_file=result.onnx_file,
        data_file=result.data_file,
        total_size=_size(total),
        label=label,
        q=result.quantization,
        io=result.io,
        opset=result.opset,
        export_check=result.validation["export"],
        artifact_check=result.validation["export"] if art.get("same_as") else art,
        exported_class=result.exported_class,
        vision_text_only=not result.vision and bool(ckpt.config.get("vision_config")),
        vision=_vision_card_facts(tmp, result),
        graph=result.graph,
        graph_facts=result.graph_facts,
        notes=result.notes,
    )
    (tmp / CARD_FILE).write_text(text)


def _common_fields(out_name: str, src: Source, ckpt: Checkpoint, source_manifest: dict, adapter_refs: list[str], base_name: str, fm: dict) -> dict:
    """What every export card says: the title, where it came from, how to prompt it."""
    return {
        "front_matter": cards.yaml_block(fm),
        "title": out_name,
        "out_name": out_name,
        "base_name": base_name,
        "adapters": [_public_name(a) for a in adapter_refs],
        "xpack_version": __version__,
        "source": _public_name(src.ref),
        "source_manifest": bool(source_manifest),
        "source_base": _public_name((source_manifest or {}).get("base", {}).get("ref")),
        "architecture": "/".join(ckpt.architectures) or ckpt.model_type,
        "example_prompt": EXAMPLE_PROMPT,
        "gen": GenerationSettings(),
    }


def _vision_card_facts(tmp: Path, result) -> dict:
    """What a vision export's card says about images: the files, the preprocessing, the image tokens."""
    if not result.vision:
        return {}
    pre, proc = read_json(tmp / PREPROCESSOR_CONFIG), read_json(tmp / PROCESSOR_CONFIG)
    size = pre.get("size") or {}
    checks = [v["max_abs_diff"] for v in (result.vision.get("validation") or {}).values() if isinstance(v, dict) and "max_abs_diff" in v]
    return {
        "vision_file": result.vision.get("onnx_file"),
        "vision_data_file": result.vision.get("data_file"),
        "cross_kv_file": result.vision.get("cross_kv_file"),
        "embed_file": result.embed_file,
        "precision": result.vision.get("precision"),
        "size": f"{size.get('height')}x{size.get('width')}" if size.get("height") else None,
        "max_tiles": pre.get("max_image_tiles"),
        "mean": pre.get("image_mean"),
        "std": pre.get("image_std"),
        "resample": {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(pre.get("resample"), pre.get("resample")),
        "tokens_per_image": proc.get("image_seq_length"),
        "validation": {"max_abs_diff": max(checks)} if checks else {},
    }


def _public_name(ref: str | None) -> str | None:
    """A model or adapter as a card may name it: its hub id, else its folder's name, never a path of this machine."""
    if not ref:
        return ref
    return cards.hub_id(ref) or Path(ref.rstrip("/")).name


def _base_hub_id(src, ckpt: Checkpoint, source_manifest: dict) -> str | None:
    """The base model's hub id, from what the source says of it (its manifest's base and adapters, the source itself,
    its config's ``_name_or_path``), never a path of this machine; None when nothing names one."""
    base = (source_manifest or {}).get("base") or {}
    adapters = (source_manifest or {}).get("adapters") or []
    return cards.hub_id(base.get("repo_id"), base.get("ref"), *[a.get("base_model_name_or_path") for a in adapters if isinstance(a, dict)],
                        src.repo_id, ckpt.config.get("_name_or_path"))


def _base_name(src, ckpt: Checkpoint, source_manifest: dict) -> str:
    """How the card's text names the base: its hub id, else the source folder's name (not its path)."""
    base = (source_manifest or {}).get("base") or {}
    return _base_hub_id(src, ckpt, source_manifest) or (Path(base["path"]).name if base.get("path") else src.path.name)


def _front_matter(src, base_id: str | None, library: str, vision: bool, tags: list[str]) -> dict:
    """The card's YAML front matter; the license is the source card's when it names one; ``base_model`` only when the
    base has a hub id."""
    src_card = src.path / CARD_FILE
    license_ = cards.front_matter(src_card.read_text(errors="replace")).get("license") if src_card.is_file() else None
    return {
        **({"base_model": base_id} if base_id else {}),
        "quantized_by": f"xpack {__version__}",
        "library_name": library,
        "pipeline_tag": "image-text-to-text" if vision else "text-generation",
        "tags": tags,
        "license": license_ or "other",
    }


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
