"""``xpack export`` end to end: source (+ adapters) -> artifact files -> card, Modelfile, manifest, atomically."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from xpack.errors import XpackError
from xpack.packager.cards import render as cards
from xpack.packager.export.calibrate.gguf_mix import calibrated_quantize
from xpack.packager.export.calibrate.mix import MixRequest
from xpack.packager.export.calibrate.text import read_calibration
from xpack.packager.export.card import write_gguf_card, write_onnx_card
from xpack.packager.export.gguf.modelfile import write_modelfile
from xpack.packager.export.gguf.writer import export_gguf, resolve_quant
from xpack.packager.export.onnx.pipeline import check_settings, default_block_size, export_onnx, onnx_calibration_gap
from xpack.packager.io.atomic import atomic_dir, check_destination
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.sources import Source, resolve
from xpack.packager.io.tensors import sha256_file
from xpack.packager.merge.lora import Adapter, parse_adapter_spec
from xpack.packager.merge.stream import MergeSettings, load_adapters
from xpack.runtimes.artifacts import read_manifest
from xpack.runtimes.integrity import require_intact, stamped_sha256

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # what --name may be: the stem of a file inside --out
FORMATS = ("gguf", "onnx")
CALIBRATED_BITS = (4, 8)  # --bits that give xpack's calibrated mix (GGUF's others are llama.cpp's plain types)


@dataclass(frozen=True)
class Calibration:
    """--calibrate / --calibration / --target-size / --max-kl as the export verb receives them."""

    text: Path | None = None  # None: the built-in calibration text
    target_bytes: int | None = None
    max_kl: float | None = None
    enabled: bool | None = None  # --calibrate / --no-calibrate; None: the format's default (see export)

    @property
    def given(self) -> bool:
        return self.text is not None or self.target_bytes is not None or self.max_kl is not None

    def wanted(self, default: bool) -> bool:
        if self.enabled is False and self.given:
            raise XpackError("--no-calibrate asks for the fixed scheme, and --calibration/--target-size/--max-kl for a calibrated mix; give one")
        return True if self.given else default if self.enabled is None else self.enabled


@dataclass
class _Inputs:
    """The resolved source checkpoint and adapters of one export, and how the adapters merge."""

    src: Source
    adapter_srcs: list[Source]
    adapters: list[Adapter]
    merge: MergeSettings

    @property
    def adapter_refs(self) -> list[str]:
        return [s.ref for s in self.adapter_srcs]

    def manifest_fields(self, ckpt: Checkpoint, source_manifest: dict) -> dict:
        """What every export's manifest says about where it came from (sha256 of every source file)."""
        return {
            "source": {**self.src.describe(), "files": {p.name: stamped_sha256(p) or sha256_file(p) for p in _source_files(ckpt)}},
            "source_manifest": {k: source_manifest.get(k) for k in ("kind", "base", "created")} if source_manifest else None,
            "adapters": [{**s.describe(), **a.summary()} for s, a in zip(self.adapter_srcs, self.adapters)],
            "qlora": self.merge.qlora.describe() if self.merge.qlora else None,  # the adapters' merge base: null is the 16-bit weights
        }


def export(model: str, fmt: str, out: Path, *, bits: int | None = None, quant: str | None = None, adapters=(),
           force: bool = False, name: str | None = None, threads: int = 0, allow_pickle: bool = False,
           block_size: int | None = None, keep_lm_head: bool = False, graph: str = "xpack", int4: str = "mixed",
           qlora_base: str | None = None, double_quant: bool = False, qlora_blocksize: int | None = None,
           calibration: Calibration | None = None) -> dict:
    """Export ``model`` (+ ``adapters`` merged on the fly, into their 4-bit base with ``qlora_base``) to ``out``
    as GGUF or ONNX; returns the manifest. ``bits`` 4 and 8 are xpack's calibrated mix (``calibration`` says on
    what text and to what target, or turns it off); GGUF ``quant`` is llama.cpp's plain type. An ONNX model the
    calibrated mix does not cover yet (vision, --graph optimum) gets the fixed scheme unless calibration is asked for."""
    out = Path(out)
    if fmt not in FORMATS:
        raise XpackError(f"unknown format {fmt}; choose one of {', '.join(FORMATS)}")
    if name is not None:
        check_name(name)
    merge = MergeSettings(allow_pickle=allow_pickle, qlora_base=qlora_base, double_quant=double_quant, qlora_blocksize=qlora_blocksize)
    if merge.qlora and not adapters:
        raise XpackError("--qlora-base says how to merge an --adapter, and there is none; give --adapter or drop --qlora-base")
    calibration = calibration or Calibration()
    if calibration.max_kl is not None and calibration.target_bytes is not None:
        raise XpackError("--target-size (lowest KL within a size) and --max-kl (smallest file within a KL) are two targets; give one")
    notes: list[str] = []
    if fmt == "onnx":
        if quant:
            raise XpackError(f"--quant {quant} names a llama.cpp type; ONNX exports take --bits (32, 16, 8 or 4)")
        fixed_block = block_size is not None  # --block-size is a setting of the fixed scheme
        block_size = block_size or default_block_size(bits)
        check_settings(bits, block_size, graph, int4)
        calibrate = bits in CALIBRATED_BITS and calibration.wanted(default=True)
        if calibrate and fixed_block and (calibration.enabled or calibration.given):
            raise XpackError("--block-size is a setting of the fixed scheme; the calibrated mix chooses each weight's block (drop --block-size, or add --no-calibrate)")
        if calibration.given and bits not in CALIBRATED_BITS:
            raise XpackError(f"--calibration, --target-size and --max-kl choose xpack's calibrated mix, which --bits 4 or 8 makes; --bits {bits} has no choice to make")
    else:
        fixed_block = False
        if graph != "xpack" or int4 != "mixed":
            raise XpackError("--graph and --int4 are ONNX settings; drop them or use --format onnx")
        if block_size is not None or keep_lm_head:
            raise XpackError("--block-size and --keep-lm-head are ONNX settings (llama.cpp quant types fix their own blocks); drop them or use --format onnx")
        if calibration.given and bits not in CALIBRATED_BITS:
            raise XpackError("--calibration, --target-size and --max-kl choose xpack's calibrated mix, which --bits 4 or 8 makes; "
                             + (f"--quant {quant} is llama.cpp's plain type" if quant else f"--bits {bits} is a plain type"))
        calibrate = bits in CALIBRATED_BITS and calibration.wanted(default=True)  # --bits and --quant never come together (the CLI refuses)
        quant = resolve_quant(bits, quant)
    check_destination(out, force)
    inputs = _resolve_inputs(model, adapters, merge)
    if fmt == "onnx" and calibrate and calibration.enabled is None and not calibration.given:  # the default: where the mix covers the model
        why = onnx_calibration_gap(inputs.src.path, graph, int4, keep_lm_head, fixed_block)
        if why:
            calibrate = False
            notes.append(f"the fixed {bits}-bit scheme, not xpack's calibrated mix: {why}")
    mix = MixRequest(int(bits), read_calibration(calibration.text), calibration.target_bytes, calibration.max_kl) if calibrate else None
    with atomic_dir(out, force) as tmp:
        if fmt == "onnx":
            data, hashes = _export_onnx(inputs, tmp, out.name, bits, block_size=block_size, keep_lm_head=keep_lm_head, threads=threads, graph=graph,
                                        int4=int4, mix=mix)
            data["notes"] = notes + data["notes"]
        else:
            data, hashes = _export_gguf(inputs, tmp, out.name, quant, name or _model_name(inputs.src.path), threads, mix)
        manifest = cards.write_manifest(tmp, data, hashes)
    manifest["out_dir"] = str(out)
    return manifest


def _resolve_inputs(model: str, adapters, merge: MergeSettings) -> _Inputs:
    src = resolve(model, "model")
    require_intact(src.path, "the source checkpoint")  # a folder xpack wrote: its files against its manifest
    specs = [parse_adapter_spec(a) for a in adapters]
    adapter_srcs = [resolve(ref, "adapter") for ref, _ in specs]
    loaded = load_adapters([(s.path, w) for s, (_, w) in zip(adapter_srcs, specs)], merge.allow_pickle)
    return _Inputs(src, adapter_srcs, loaded, merge)


def _export_gguf(inputs: _Inputs, tmp: Path, out_name: str, quant: str, name: str, threads: int, mix: MixRequest | None) -> tuple[dict, dict]:
    """``--format gguf``: the GGUF file(s), Modelfile and card in ``tmp``; returns the manifest data and file hashes."""
    mixer = None
    if mix is not None:
        def mixer(raw, final, work, reference):
            return calibrated_quantize(raw, final, reference, quant, mix, threads or 0, work)
    result = export_gguf(inputs.src.path, inputs.adapters, tmp, quant, name, threads, inputs.merge, mixer=mixer)
    hashes = {f: sha256_file(tmp / f) for f in result.files}
    ckpt = Checkpoint(inputs.src.path)
    source_manifest = read_manifest(inputs.src.path)
    gguf_file = next(f for f, i in result.files.items() if i["role"] == "text")
    mmproj = next((f for f, i in result.files.items() if i["role"] == "mmproj"), None)
    write_modelfile(tmp, gguf_file, ckpt)
    write_gguf_card(tmp, out_name, inputs.src, ckpt, source_manifest, inputs.adapter_refs, result, quant, hashes, gguf_file, mmproj)
    data = {
        "kind": "export",
        "format": "gguf",
        "quant": quant,
        "gguf_file": gguf_file,
        "mmproj_file": mmproj,
        "architecture": result.arch,
        **inputs.manifest_fields(ckpt, source_manifest),
        "artifacts": result.files,
        "vocab": result.vocab,
        "calibration": result.calibration,
        "notes": result.notes,
    }
    return data, hashes


ONNX_QUANT = {32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}


def _export_onnx(inputs: _Inputs, tmp: Path, out_name: str, bits: int, **settings) -> tuple[dict, dict]:
    """``--format onnx``: the graph(s) and card in ``tmp``; returns the manifest data and file hashes."""
    label = ONNX_QUANT[bits]
    result = export_onnx(inputs.src.path, inputs.adapters, tmp, bits, merge=inputs.merge, **settings)
    weights = [f for f in (result.onnx_file, result.data_file, result.embed_file, result.embed_data_file, *result.vision.get("files", ())) if f and (tmp / f).is_file()]
    hashes = {f: sha256_file(tmp / f) for f in weights}
    ckpt = Checkpoint(inputs.src.path)
    source_manifest = read_manifest(inputs.src.path)
    write_onnx_card(tmp, out_name, inputs.src, ckpt, source_manifest, inputs.adapter_refs, result, label, hashes)
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
        **inputs.manifest_fields(ckpt, source_manifest),
        "graph": result.graph,
        "max_length": result.graph_facts.get("max_length"),
        "embed_file": result.embed_file,
        "vision_file": result.vision.get("onnx_file"),
        "artifacts": _onnx_artifacts(tmp, result, label),
        "quantization": result.quantization,
        "calibration": result.quantization.get("calibration"),
        "validation": result.validation,
        "io": result.io,
        "timings": result.timings,
        "notes": result.notes,
    }
    return data, hashes


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
    if result.vision.get("cross_kv_file"):  # Llama 3.2 Vision: the cross-attention keys/values, once per image
        v = result.vision
        out[v["cross_kv_file"]] = {
            "role": "cross-attention keys/values", "quant": label, "data_file": v.get("cross_kv_data_file"),
            "tensor_types": v.get("cross_kv_node_types", {}), "bytes": size(v["cross_kv_file"], v.get("cross_kv_data_file")),
        }
    return out


def _source_files(ckpt: Checkpoint) -> list[Path]:
    return [*ckpt.weight_files, ckpt.path / "config.json", *ckpt.companion_files()]


def check_name(name: str) -> None:
    """``--name`` is the stem of files written inside ``--out``: a plain file name, never a path (issue #14: a
    ``--name /elsewhere/x`` wrote and overwrote files outside ``--out``)."""
    if not NAME.fullmatch(name) or name in (".", "..") or name.startswith("."):
        raise XpackError(f"--name {name!r} is not a file name stem: use letters, digits, '.', '_' and '-' "
                         "(no path; the files go into --out)")


def _model_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", path.name).strip("-") or "model"
