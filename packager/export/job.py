"""``xpack export`` end to end: source (+ adapters) -> artifact files -> card, Modelfile, manifest, atomically."""

from __future__ import annotations

import json
import re
from pathlib import Path

from xpack import __version__
from xpack.errors import XpackError
from xpack.packager.cards import render as cards
from xpack.packager.export.gguf.writer import export_gguf, resolve_quant
from xpack.packager.export.onnx.pipeline import check_settings, default_block_size, export_onnx
from xpack.packager.io.atomic import atomic_dir, check_destination
from xpack.packager.io.checkpoint import Checkpoint
from xpack.runtimes.artifacts import CARD_FILE, read_manifest
from xpack.packager.io.sources import resolve
from xpack.packager.io.tensors import sha256_file
from xpack.packager.merge.job import EXAMPLE_PROMPT
from xpack.packager.merge.lora import parse_adapter_spec
from xpack.packager.merge.stream import load_adapters
from xpack.runtimes.settings import GenerationSettings

FORMATS = ("gguf", "onnx")
QUANT_NOTES = {
    "F32": "32-bit float, lossless", "F16": "16-bit float", "BF16": "bfloat16", "Q8_0": "8-bit, blocks of 32",
    "Q6_K": "6-bit K-quant", "Q5_K_M": "5-bit K-quant, medium", "Q4_K_M": "4-bit K-quant, medium",
}


def export(model: str, fmt: str, out: Path, *, bits: int | None = None, quant: str | None = None, adapters=(),
           force: bool = False, name: str | None = None, threads: int = 0, allow_pickle: bool = False,
           block_size: int | None = None, keep_lm_head: bool = False, graph: str = "xpack", int4: str = "mixed") -> dict:
    out = Path(out)
    if fmt not in FORMATS:
        raise XpackError(f"unknown format {fmt}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        return _export_onnx(model, out, bits=bits, quant=quant, adapters=adapters, force=force, threads=threads,
                            allow_pickle=allow_pickle, block_size=block_size, keep_lm_head=keep_lm_head, graph=graph, int4=int4)
    if graph != "xpack" or int4 != "mixed":
        raise XpackError("--graph and --int4 are ONNX settings; drop them or use --format onnx")
    if block_size is not None or keep_lm_head:
        raise XpackError("--block-size and --keep-lm-head are ONNX settings (llama.cpp quant types fix their own blocks); drop them or use --format onnx")
    check_destination(out, force)
    src = resolve(model, "model")
    specs = [parse_adapter_spec(a) for a in adapters]
    adapter_srcs = [resolve(ref, "adapter") for ref, _ in specs]
    loaded = load_adapters([(s.path, w) for s, (_, w) in zip(adapter_srcs, specs)], allow_pickle)

    quant = resolve_quant(bits, quant)
    name = name or _model_name(src.path)
    with atomic_dir(out, force) as tmp:
        result = export_gguf(src.path, loaded, tmp, quant, name, threads)
        hashes = {f: sha256_file(tmp / f) for f in result.files}
        ckpt = Checkpoint(src.path)
        source_manifest = read_manifest(src.path)
        gguf_file = next(f for f, i in result.files.items() if i["role"] == "text")
        mmproj = next((f for f, i in result.files.items() if i["role"] == "mmproj"), None)
        _write_modelfile(tmp, gguf_file, ckpt)
        _write_card(tmp, out.name, src, ckpt, source_manifest, [s.ref for s in adapter_srcs], result, quant, hashes, gguf_file, mmproj)
        data = {
            "kind": "export",
            "format": "gguf",
            "quant": quant,
            "gguf_file": gguf_file,
            "mmproj_file": mmproj,
            "architecture": result.arch,
            "source": {**src.describe(), "files": {p.name: sha256_file(p) for p in _source_files(ckpt)}},
            "source_manifest": {k: source_manifest.get(k) for k in ("kind", "base", "created")} if source_manifest else None,
            "adapters": [{**s.describe(), **a.summary()} for s, a in zip(adapter_srcs, loaded)],
            "artifacts": result.files,
            "vocab": result.vocab,
            "notes": result.notes,
        }
        manifest = cards.write_manifest(tmp, data, hashes)
    manifest["out_dir"] = str(out)
    return manifest


ONNX_QUANT = {32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}


def _export_onnx(model: str, out: Path, *, bits, quant, adapters, force, threads, allow_pickle, block_size, keep_lm_head, graph, int4) -> dict:
    """``--format onnx``: optimum's export (+ onnxruntime's quantizer) of the checkpoint, with its card and manifest."""
    if quant:
        raise XpackError(f"--quant {quant} names a llama.cpp type; ONNX exports take --bits (32, 16, 8 or 4)")
    block_size = block_size or default_block_size(bits)
    check_settings(bits, block_size, graph, int4)
    check_destination(out, force)
    src = resolve(model, "model")
    specs = [parse_adapter_spec(a) for a in adapters]
    adapter_srcs = [resolve(ref, "adapter") for ref, _ in specs]
    loaded = load_adapters([(s.path, w) for s, (_, w) in zip(adapter_srcs, specs)], allow_pickle)
    label = ONNX_QUANT[bits]
    with atomic_dir(out, force) as tmp:
        result = export_onnx(src.path, loaded, tmp, bits, block_size=block_size, keep_lm_head=keep_lm_head, threads=threads, graph=graph, int4=int4)
        weights = [f for f in (result.onnx_file, result.data_file, result.embed_file, result.embed_data_file, *result.vision.get("files", ())) if f and (tmp / f).is_file()]
        hashes = {f: sha256_file(tmp / f) for f in weights}
        ckpt = Checkpoint(src.path)
        source_manifest = read_manifest(src.path)
        _write_onnx_card(tmp, out.name, src, ckpt, source_manifest, [s.ref for s in adapter_srcs], result, label, hashes)
        data = {
            "kind": "export",
            "format": "onnx",
            "quant": label,
            "bits": bits,
            "onnx_file": result.onnx_file,
            "onnx_data_file": result.data_file,
            "opset": result.opset,
            "architecture": result.arch,
            "exported_class": result.exported_class,
            "source": {**src.describe(), "files": {p.name: sha256_file(p) for p in _source_files(ckpt)}},
            "source_manifest": {k: source_manifest.get(k) for k in ("kind", "base", "created")} if source_manifest else None,
            "adapters": [{**s.describe(), **a.summary()} for s, a in zip(adapter_srcs, loaded)],
            "graph": result.graph,
            "max_length": result.graph_facts.get("max_length"),
            "embed_file": result.embed_file,
            "vision_file": result.vision.get("onnx_file"),
            "artifacts": _onnx_artifacts(tmp, result, label),
            "quantization": result.quantization,
            "validation": result.validation,
            "io": result.io,
            "timings": result.timings,
            "notes": result.notes,
        }
        manifest = cards.write_manifest(tmp, data, hashes)
    manifest["out_dir"] = str(out)
    return manifest


def _onnx_artifacts(tmp: Path, result, label: str) -> dict:
    """One entry per graph of the export: what it holds, its data file, weight types and bytes."""

    def size(*files) -> int:
        return sum((tmp / f).stat().st_size for f in files if f and (tmp / f).is_file())

    out = {
        result.onnx_file: {
            "role": "decoder (takes inputs_embeds)" if result.embed_file else "text", "quant": label, "data_file": result.data_file,
            "tensor_types": result.quantization.get("node_types", {}), "bytes": size(result.onnx_file, result.data_file),
        },
    }
    if result.embed_file:
        out[result.embed_file] = {
            "role": "token embedding", "quant": label, "data_file": result.embed_data_file,
            "tensor_types": result.quantization.get("embed_node_types", {}), "bytes": size(result.embed_file, result.embed_data_file),
        }
    if result.vision.get("onnx_file"):
        v = result.vision
        out[v["onnx_file"]] = {
            "role": "vision tower + projector", "quant": v.get("precision", "fp32"), "data_file": v.get("data_file"),
            "tensor_types": v.get("node_types", {}), "bytes": size(v["onnx_file"], v.get("data_file")),
        }
    return out


def _write_onnx_card(tmp, out_name, src, ckpt, source_manifest, adapter_refs, result, label, hashes):
    base_name = _base_name(src, ckpt, source_manifest)
    fm = _front_matter(src, base_name, "onnxruntime", bool(result.vision), ["onnx", "onnxruntime", "xpack", label])
    files = [{"name": f, "size": _size((tmp / f).stat().st_size), "sha256": h} for f, h in hashes.items()]
    total = sum((tmp / f).stat().st_size for f in hashes)
    q = result.quantization
    art = result.validation.get("artifact") or {}
    check = result.validation["export"] if art.get("same_as") else art
    text = cards.render(
        "onnx_card.md.j2",
        front_matter=cards.yaml_block(fm),
        title=out_name,
        base_name=base_name,
        adapters=adapter_refs,
        xpack_version=__version__,
        files=files,
        total_size=_size(total),
        label=label,
        q=q,
        io=result.io,
        opset=result.opset,
        export_check=result.validation["export"],
        artifact_check=check,
        exported_class=result.exported_class,
        vision_text_only=not result.vision and bool(ckpt.config.get("vision_config")),
        vision=_vision_card_facts(tmp, result),
        graph=result.graph,
        graph_facts=result.graph_facts,
        source=src.ref,
        source_manifest=bool(source_manifest),
        source_base=(source_manifest or {}).get("base", {}).get("ref"),
        architecture="/".join(ckpt.architectures) or ckpt.model_type,
        out_name=out_name,
        example_prompt=EXAMPLE_PROMPT,
        gen=_generation(),
        notes=result.notes,
    )
    (tmp / CARD_FILE).write_text(text)


def _vision_card_facts(tmp: Path, result) -> dict:
    """What a vision export's card says about images: the files, the preprocessing, the image tokens."""
    if not result.vision:
        return {}
    def read(name: str) -> dict:
        return json.loads((tmp / name).read_text()) if (tmp / name).is_file() else {}

    pre, proc = read("preprocessor_config.json"), read("processor_config.json")
    size = pre.get("size") or {}
    checks = [v["max_abs_diff"] for v in (result.vision.get("validation") or {}).values() if isinstance(v, dict) and "max_abs_diff" in v]
    return {
        "vision_file": result.vision.get("onnx_file"),
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


def _source_files(ckpt: Checkpoint) -> list[Path]:
    return [*ckpt.weight_files, ckpt.path / "config.json", *ckpt.companion_files()]


def _model_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", path.name).strip("-") or "model"


def _base_name(src, ckpt: Checkpoint, source_manifest: dict | None) -> str:
    if source_manifest and source_manifest.get("base"):
        b = source_manifest["base"]
        return b.get("repo_id") or b.get("ref") or src.ref
    return src.repo_id or ckpt.config.get("_name_or_path") or src.path.name


def _generation():
    return GenerationSettings()


def _stop_tokens(ckpt: Checkpoint) -> list[str]:
    import json

    path = ckpt.path / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    found = []
    for tok in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
        if any(v.get("content") == tok for v in (cfg.get("added_tokens_decoder") or {}).values()):
            found.append(tok)
    return found


def _write_modelfile(tmp: Path, gguf_file: str, ckpt: Checkpoint) -> None:
    gen = _generation()
    lines = [
        f"# ollama Modelfile written by xpack {__version__}",
        f"FROM ./{gguf_file}",
        f"PARAMETER temperature {gen.temperature}",
        f"PARAMETER top_p {gen.top_p}",
        f"PARAMETER top_k {gen.top_k}",
        f"PARAMETER repeat_penalty {gen.repetition_penalty}",
        f"PARAMETER num_predict {gen.max_tokens}",
        *[f'PARAMETER stop "{t}"' for t in _stop_tokens(ckpt)],
    ]
    (tmp / "Modelfile").write_text("\n".join(lines) + "\n")


def _front_matter(src, base_name: str, library: str, vision: bool, tags: list[str]) -> dict:
    """The card's YAML front matter; the license is the source card's when it names one."""
    src_card = src.path / "README.md"
    license_ = cards.front_matter(src_card.read_text(errors="replace")).get("license") if src_card.is_file() else None
    return {
        "base_model": base_name,
        "quantized_by": f"xpack {__version__}",
        "library_name": library,
        "pipeline_tag": "image-text-to-text" if vision else "text-generation",
        "tags": tags,
        "license": license_ or "other",
    }


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _write_card(tmp, out_name, src, ckpt, source_manifest, adapter_refs, result, quant, hashes, gguf_file, mmproj):
    import json

    base_name = _base_name(src, ckpt, source_manifest)
    fm = _front_matter(src, base_name, "gguf", bool(mmproj), ["gguf", "llama.cpp", "xpack", quant.lower()])
    files = [
        {"name": f, "role": i["role"], "quant": i["quant"], "size": _size((tmp / f).stat().st_size), "sha256": hashes[f]}
        for f, i in result.files.items()
    ]
    text_info = result.files[gguf_file]
    pre = {}
    if mmproj and (src.path / "preprocessor_config.json").is_file():
        pre = json.loads((src.path / "preprocessor_config.json").read_text())
    vision_cfg = ckpt.config.get("vision_config") or {}
    text = cards.render(
        "gguf_card.md.j2",
        front_matter=cards.yaml_block(fm),
        title=out_name,
        base_name=base_name,
        adapters=adapter_refs,
        xpack_version=__version__,
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
        source=src.ref,
        source_manifest=bool(source_manifest),
        source_base=(source_manifest or {}).get("base", {}).get("ref"),
        architecture="/".join(ckpt.architectures) or ckpt.model_type,
        out_name=out_name,
        example_prompt=EXAMPLE_PROMPT,
        gguf_file=gguf_file,
        gen=_generation(),
        ollama_name=re.sub(r"[^a-z0-9-]+", "-", out_name.lower()).strip("-") or "model",
    )
    (tmp / CARD_FILE).write_text(text)
