"""Hugging Face checkpoint (+ optional LoRA, merged first) -> ONNX decoder with a KV cache, for onnxruntime.

The steps, each in the module named for it:
1. source.py: the checkpoint folder to export (the source, its merge with the adapters, or the text
   model of Gemma 3 with vision);
2. torch_check.py: the torch model's logits and cache on a fixed input (a prefill and one decode step),
   computed and released before the graph is built (its layers streamed from disk when the model is large);
3. the float32 graph, xpack's (decoder_graph.py: onnxruntime's fused GroupQueryAttention, ~10 nodes per
   layer) unless ``graph="optimum"``; both take and return the same tensors. It is checked against torch as
   optimum's ``validate_model_outputs`` does (``np.allclose`` with the config's atol);
4. precision.py: the graph at ``--bits`` (fp16 conversion, quantize.py's 8 and 4 bits), checked against
   torch again; both sets of figures go into the manifest.
xpack's graph streams (pending.py, issue #12): it is built with a placeholder per weight, converted at
``--bits`` while it holds no weights, and each weight is then read, converted and written alone, so a
Gemma 3 4B export holds a few GB, not its 17 GB of float32 weights. Its float32 graph is written and checked
(step 3) only up to FP32_CHECK_BYTES of weights; a larger export checks the artifact against torch only.
optimum's graph and the calibrated mix need the whole float32 model in memory (raw_graph.py, calibrate/).
Gemma 3 with vision adds ``vision.onnx`` (gemma3_vision.py) and ``embed.onnx``, its decoder taking
``inputs_embeds``; Llama 3.2 Vision is written as three graphs by mllama.py (``export_mllama_artifact``).
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from xpack.errors import XpackError
from xpack.packager.archs import Arch, all_archs, require_arch
from xpack.packager.archs.onnx_spec import OnnxSpec
from xpack.packager.export.calibrate.mix import MixRequest
from xpack.packager.export.calibrate.onnx_mix import calibrated_matmuls
from xpack.packager.export.onnx.common import VISION_COMPANIONS, OnnxExport, decoder_io, quiet, require_libraries, save_model
from xpack.packager.export.onnx.decoder_graph import build_decoder, build_embedding
from xpack.packager.export.onnx.gemma3_vision import export_gemma3_vision
from xpack.packager.export.onnx.mllama import export_mllama_artifact
from xpack.packager.export.onnx.pending import DataFile, PendingWeights, save_graph
from xpack.packager.export.onnx.precision import VISION_DTYPE, quantize_graph, weight_node_types
from xpack.packager.export.onnx.raw_graph import optimum_graph, xpack_graph
from xpack.packager.export.onnx.source import copy_companions, prepare_source
from xpack.packager.export.onnx.torch_check import compare_steps, load_torch, ort_steps, prepacking_note, torch_steps, validation_ids
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.memory_need import FP32_CHECK_BYTES, check_onnx_export, float32_bytes
from xpack.packager.merge.lora import Adapter
from xpack.packager.merge.stream import MergeSettings, run_merge
from xpack.paths import temp_dir
from xpack.runtimes.artifacts import EMBED_DATA_FILE, EMBED_FILE, ONNX_DATA_FILE, ONNX_MODEL_FILE
from xpack.runtimes.torch_offload import return_freed_memory

BITS = (32, 16, 8, 4)
# Weights per quantization block, by bits. 8 bits uses 16: on the demo model (300 tokens against torch
# fp32) blocks of 16 give mean KL 0.0022 / top-1 98.7% where 32 gives 0.0040 / 98.0%, level with
# llama.cpp's Q8_0 (0.0041 / 97.3%) rather than better, for 13% more bytes and the same speed.
DEFAULT_BLOCK_SIZE = {4: 32, 8: 16}
# "xpack": the decoder graph xpack writes with onnxruntime's fused operators (packager/export/onnx/decoder_graph.py);
# "optimum": optimum-onnx's traced export. Both have the same inputs and outputs.
GRAPHS = ("xpack", "optimum")
# --int4: "mixed" (8 bits where Q4_K_M spends more, the default) or "plain" (every weight 4-bit)
INT4_SCHEMES = ("mixed", "plain")
# The fused kernels sum in another order than torch's eager attention: measured <= 1e-6 on the twins
# and ~1e-4 on the demo model; optimum's own per-model atol is 1e-5 for its traced graph.
XPACK_GRAPH_ATOL = 1e-3
# xpack's streamed export writes its float32 graph and checks it against torch (besides the artifact) up to
# FP32_CHECK_BYTES of float32 weights (memory_need.py, 2 GB): real Gemma 3 270M (1.07 GB), the demo model and every test
# twin; above, only the artifact is checked (onnxruntime would hold the whole float32 graph: 17 GB for Gemma 3 4B).
# What an export imports; xpack's own graph needs no optimum (the first entry).
LIBRARIES = ("optimum.exporters.onnx", "onnx", "onnxruntime", "onnx_ir")


def default_block_size(bits: int | None) -> int:
    return DEFAULT_BLOCK_SIZE.get(bits, 32)


def check_settings(bits: int | None, block_size: int, graph: str = "xpack", int4: str = "mixed") -> None:
    """The export settings, before any work: one line naming what is valid."""
    if graph not in GRAPHS:
        raise XpackError(f"unknown ONNX graph {graph}; choose one of {', '.join(GRAPHS)}")
    if int4 not in INT4_SCHEMES:
        raise XpackError(f"unknown --int4 scheme {int4}; choose one of {', '.join(INT4_SCHEMES)}")
    if int4 != "mixed" and bits != 4:
        raise XpackError(f"--int4 {int4} applies to 4-bit exports; drop it or export with --bits 4")
    if bits is None:
        raise XpackError(f"an ONNX export needs --bits: one of {', '.join(map(str, BITS))}")
    if bits not in BITS:
        raise XpackError(f"--bits {bits} is not available for ONNX; choose one of {', '.join(map(str, BITS))}")
    if block_size < 16 or block_size & (block_size - 1):
        raise XpackError(f"--block-size {block_size} is not valid; onnxruntime's MatMulNBits needs a power of two >= 16 (default: 32 for 4 bits, 16 for 8 bits)")


def _spec_of(arch: Arch) -> OnnxSpec:
    """The ``onnx`` section of an architecture table; an architecture without one, or one it refuses, is a clear error."""
    spec = arch.onnx
    supported = ", ".join(sorted(a.name for a in all_archs().values() if (s := a.onnx) is not None and s.unsupported is None))
    if spec is None:
        raise XpackError(f"ONNX export of {arch.name} is not supported by xpack; supported: {supported}")
    if spec.unsupported is not None:
        raise XpackError(f"{spec.unsupported} (ONNX export supports: {supported})")
    return spec


@dataclass(frozen=True)
class _Job:
    """One decoder export's checkpoint, table and settings, as its steps read them."""

    ckpt: Checkpoint
    arch: Arch
    spec: OnnxSpec
    tmp_out: Path
    bits: int
    block_size: int
    keep_lm_head: bool
    threads: int
    graph: str
    int4: str
    merge: MergeSettings  # how the adapters merge (the 16-bit weights or a QLoRA adapter's 4-bit base)
    mix: MixRequest | None = None  # a calibrated mix instead of the fixed scheme (calibrate/onnx_mix.py)

    @property
    def vision(self) -> bool:
        """Whether the artifact gets the vision tower (xpack's graph only: optimum's takes no inputs_embeds)."""
        return self.graph == "xpack" and self.arch.vision

    @property
    def large(self) -> bool:
        """Above FP32_CHECK_BYTES: no float32 graph is written, and the artifact is checked from its mapped files
        (onnxruntime without prepacking, torch_check.ort_steps) so that the check holds no private copy of its weights."""
        return float32_bytes(self.ckpt) > FP32_CHECK_BYTES


@dataclass(frozen=True)
class _Reference:
    """The torch model's steps on the check's input, and the tolerance of the check."""

    ids: list[int]
    window: int | None
    steps: list[dict]
    atol: float


def export_onnx(
    model_dir: Path, adapters: list[Adapter], tmp_out: Path, bits: int, *, block_size: int | None = None,
    keep_lm_head: bool = False, threads: int = 0, graph: str = "xpack", int4: str = "mixed", merge: MergeSettings | None = None,
    mix: MixRequest | None = None,
) -> OnnxExport:
    """Write ``model.onnx`` + ``model.onnx_data`` and the tokenizer/config files into ``tmp_out``
    (plus ``embed.onnx`` and ``vision.onnx`` for a vision model with xpack's graph); ``adapters`` merge as ``merge`` says.
    ``mix``: xpack's calibrated mix at 4 or 8 bits instead of the fixed scheme (text decoders in xpack's graph)."""
    merge = merge or MergeSettings()
    block_size = block_size or default_block_size(bits)
    check_settings(bits, block_size, graph, int4)
    ckpt = Checkpoint(model_dir)
    arch = require_arch(ckpt.config, "ONNX export")
    spec = _spec_of(arch)
    ckpt.check_not_packed()
    streamed = graph == "xpack" and mix is None
    # mllama's vision layers stream like its decoder's (mllama.py); Gemma 3's tower is checked in torch whole
    vision_prefixes = () if spec.pipeline == "mllama" else _checkpoint_prefixes(arch)
    check_onnx_export(ckpt, arch.name, bits, streamed=streamed, vision_prefixes=vision_prefixes,
                      gguf_supported=arch.gguf is None or not arch.gguf.unsupported)
    require_libraries("ONNX export", LIBRARIES[graph == "xpack":])
    threads = threads or min(os.cpu_count() or 1, 8)
    if mix is not None:
        _check_calibrated(arch, spec, bits, graph, int4, keep_lm_head)
    if spec.pipeline == "mllama":
        if graph != "xpack":
            raise XpackError("optimum-onnx cannot export Llama 3.2 Vision (mllama); drop --graph optimum (xpack writes its vision, cross-attention and decoder graphs)")
        return export_mllama_artifact(ckpt, adapters, tmp_out, bits, spec, block_size, keep_lm_head, int4, merge,
                                      check_fp32=float32_bytes(ckpt) <= FP32_CHECK_BYTES)
    return _export_decoder(_Job(ckpt, arch, spec, tmp_out, bits, block_size, keep_lm_head, threads, graph, int4, merge, mix), adapters)


def _checkpoint_prefixes(arch: Arch) -> tuple[str, ...]:
    """The vision parts' names as a checkpoint may spell them (canonical, and without the leading ``model.`` of older saves)."""
    return tuple({p for v in arch.vision_prefixes for p in (v, v.removeprefix("model."))})


def onnx_calibration_gap(model_dir: Path, graph: str, int4: str, keep_lm_head: bool, block_size_given: bool = False) -> str | None:
    """Why the calibrated mix cannot make this ONNX export (the fixed scheme then does), or None."""
    import importlib.util

    arch = require_arch(Checkpoint(Path(model_dir)).config, "ONNX export")
    if arch.vision or (arch.onnx is not None and arch.onnx.pipeline == "mllama"):
        return f"the calibrated mix of {arch.name} (a vision model) is not implemented yet"
    if graph != "xpack":
        return "the calibrated mix needs xpack's decoder graph (--graph xpack)"
    if keep_lm_head or int4 != "mixed" or block_size_given:
        return "--keep-lm-head, --int4 plain and --block-size choose the fixed scheme"
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python, which sizes the yardstick (llama.cpp's plain type), is not installed: pip install 'xpack[llama]', or give --target-size"
    return None


def _check_calibrated(arch: Arch, spec: OnnxSpec, bits: int, graph: str, int4: str, keep_lm_head: bool) -> None:
    """What a calibrated ONNX mix works on, before any work: one line naming what to change."""
    if bits not in (4, 8):
        raise XpackError(f"calibration (--calibration, --target-size, --max-kl) chooses 4- and 8-bit weights; --bits {bits} has none to choose")
    if spec.pipeline == "mllama" or arch.vision:
        raise XpackError(f"calibrated ONNX quantization of {arch.name} (a vision model) is not implemented yet; export it with --no-calibrate")
    if graph != "xpack":
        raise XpackError("calibrated ONNX quantization needs xpack's decoder graph; drop --graph optimum or export with --no-calibrate")
    if keep_lm_head or int4 != "mixed":
        raise XpackError("--keep-lm-head and --int4 plain choose a fixed scheme; drop them or export with --no-calibrate")


def _export_decoder(job: _Job, adapters: list[Adapter]) -> OnnxExport:
    result = OnnxExport(arch=job.arch.name, graph=job.graph)
    clock = time.perf_counter()
    with temp_dir("onnx", dir=job.tmp_out.parent) as work_dir, quiet():
        work = Path(work_dir)
        full = job.ckpt
        if job.vision and adapters:  # the vision tower takes the adapter too: merge the whole checkpoint once
            (work / "merged").mkdir()
            result.notes += list(run_merge(job.ckpt, adapters, work / "merged", job.merge).plan.notes)
            full, adapters = Checkpoint(work / "merged"), []
        src, notes = prepare_source(full, adapters, job.arch, job.spec, work, job.merge)
        result.notes += notes
        result.timings["prepare_s"] = round(time.perf_counter() - clock, 2)
        if job.graph == "xpack" and job.mix is None:
            reference = _torch_reference(job, src, result)
            _write_streamed(job, src, work / "raw", reference, result)
        else:
            reference = _export_fp32(job, src, work / "raw", result)
            _write_decoder(job, work / "raw", src, result)
        _write_companions(job, full, src, work / "raw", result)
        _check_artifact(job, reference, result)
    result.io = decoder_io(job.tmp_out / ONNX_MODEL_FILE)
    result.opset = int(result.io["opset"].get("ai.onnx", 0))
    result.timings["total_s"] = round(time.perf_counter() - clock, 2)
    return result


def _export_fp32(job: _Job, src: Path, raw: Path, result: OnnxExport) -> _Reference:
    """The torch reference, then the float32 graph in ``raw`` checked against it (the torch model is let
    go before xpack's graph is built: the two never share the memory)."""
    model = load_torch(src, job.spec)
    result.exported_class = type(model).__name__
    ids = validation_ids(src, int(model.config.vocab_size))
    window = getattr(model.config, "sliding_window", None)
    steps = torch_steps(model, ids)
    start = time.perf_counter()
    if job.graph == "optimum":
        atol = optimum_graph(model, raw, job.spec.opset)
        result.timings["optimum_export_s"] = round(time.perf_counter() - start, 2)
        del model
    else:
        del model
        gc.collect()
        atol = XPACK_GRAPH_ATOL
        result.graph_facts = xpack_graph(src, raw, job.vision)
        result.timings["graph_s"] = round(time.perf_counter() - start, 2)
    reference = _Reference(ids, window, steps, atol)
    _check_export(job, raw, raw / EMBED_FILE if job.vision else None, reference, result)
    return reference


def _check_export(job: _Job, raw: Path, embed: Path | None, reference: _Reference, result: OnnxExport) -> None:
    """The float32 graph in ``raw`` against torch, as optimum's ``validate_model_outputs`` checks its export."""
    check = compare_steps(reference.steps, ort_steps(raw / ONNX_MODEL_FILE, reference.ids, job.threads, embed, reference.window), reference.atol)
    check["reference"] = "transformers fp32 (eager attention), prefill + 1 decode step"
    result.validation["export"] = check
    if not check["within_tolerance"]:
        result.notes.append(
            f"the fp32 export differs from torch by more than atol {reference.atol:g} (max |logit diff| "
            f"{check['max_abs_diff']['logits']:.3g}); check `xpack verify` figures before use"
        )


def _torch_reference(job: _Job, src: Path, result: OnnxExport) -> _Reference:
    """The torch model's steps on the check's input (its layers streamed from disk when it is large), then let go."""
    start = time.perf_counter()
    model = load_torch(src, job.spec, lean=True)
    result.exported_class = type(model).__name__
    ids = validation_ids(src, int(model.config.vocab_size))
    window = getattr(model.config, "sliding_window", None)
    steps = torch_steps(model, ids)
    del model
    return_freed_memory()
    result.timings["torch_check_s"] = round(time.perf_counter() - start, 2)
    return _Reference(ids, window, steps, XPACK_GRAPH_ATOL)


def _write_streamed(job: _Job, src: Path, raw: Path, reference: _Reference, result: OnnxExport) -> None:
    """xpack's graph with pending weights (pending.py): the float32 graph checked against torch when it is small, then
    the decoder (and a vision model's embedding graph) at ``--bits`` written one weight at a time into the artifact."""
    start = time.perf_counter()
    pending = PendingWeights()
    try:
        decoder, result.graph_facts = build_decoder(src, inputs_embeds=job.vision, pending=pending)
        embed = build_embedding(src, pending) if job.vision else None
        result.timings["graph_s"] = round(time.perf_counter() - start, 2)
        if not job.large:
            _check_fp32(job, decoder, embed, pending, raw, reference, result)
        else:
            weights = float32_bytes(job.ckpt)
            result.validation["export"] = {
                "skipped": f"the float32 graph ({weights / 1e9:.1f} GB of weights) is not written: the export streams one weight at a time "
                           f"and checks the artifact against torch (above {FP32_CHECK_BYTES / 1e9:.0f} GB, pipeline.py FP32_CHECK_BYTES)",
            }
        start = time.perf_counter()
        graphs = [(decoder, ONNX_MODEL_FILE, ONNX_DATA_FILE, None)]
        if embed is not None:
            graphs.append((embed, EMBED_FILE, EMBED_DATA_FILE, "embed_node_types"))
        for model, name, data, key in graphs:
            with DataFile(job.tmp_out, data) as out:
                pending.out = out
                model, info = quantize_graph(model, job.bits, job.block_size, job.keep_lm_head, job.spec, job.int4, tensors=pending)
                pending.write_all(model)
            pending.out = None
            save_graph(model, job.tmp_out / name)
            if key is None:
                result.quantization = info
                result.quantization.setdefault("node_types", weight_node_types(model))
            else:
                result.quantization[key] = info.get("node_types") or weight_node_types(model)
            del model
        if embed is not None:
            result.embed_file, result.embed_data_file = EMBED_FILE, EMBED_DATA_FILE
        result.timings["quantize_s"] = round(time.perf_counter() - start, 2)
    finally:
        pending.close()


def _check_fp32(job: _Job, decoder, embed, pending: PendingWeights, raw: Path, reference: _Reference, result: OnnxExport) -> None:
    """The float32 graph (a copy of the placeholders, written into ``raw``) against torch (:func:`_check_export`)."""
    import copy

    raw.mkdir()
    for model, name, data in [(decoder, ONNX_MODEL_FILE, ONNX_DATA_FILE)] + ([(embed, EMBED_FILE, EMBED_DATA_FILE)] if embed is not None else []):
        model = copy.deepcopy(model)  # placeholders only: no weights are copied
        with DataFile(raw, data) as out:
            pending.out = out
            pending.write_all(model)
        pending.out = None
        save_graph(model, raw / name)
    _check_export(job, raw, raw / EMBED_FILE if embed is not None else None, reference, result)


def _write_decoder(job: _Job, raw: Path, src: Path, result: OnnxExport) -> None:
    """The decoder (and a vision model's embedding graph) at ``--bits`` into the artifact folder."""
    import onnx

    start = time.perf_counter()
    decoder = onnx.load(str(raw / ONNX_MODEL_FILE))
    calibrate = None
    if job.mix is not None:
        def calibrate(model):
            return calibrated_matmuls(model, src, job.mix, job.threads, share_embedding=True)
    decoder, result.quantization = quantize_graph(decoder, job.bits, job.block_size, job.keep_lm_head, job.spec, job.int4, calibrate)
    result.quantization.setdefault("node_types", weight_node_types(decoder))
    save_model(decoder, job.tmp_out)
    del decoder
    if job.vision:
        embed, embed_info = quantize_graph(onnx.load(str(raw / EMBED_FILE)), job.bits, job.block_size, job.keep_lm_head, job.spec)
        result.quantization["embed_node_types"] = embed_info.get("node_types") or weight_node_types(embed)
        save_model(embed, job.tmp_out, EMBED_FILE, EMBED_DATA_FILE)
        result.embed_file, result.embed_data_file = EMBED_FILE, EMBED_DATA_FILE
        del embed
    result.timings["quantize_s"] = round(time.perf_counter() - start, 2)


def _write_companions(job: _Job, full: Checkpoint, src: Path, raw: Path, result: OnnxExport) -> None:
    """The vision tower (``vision.onnx``, from the merged checkpoint ``full``), config and tokenizer files beside the decoder."""
    tmp_out, ckpt = job.tmp_out, job.ckpt
    if job.vision:
        start = time.perf_counter()
        result.vision = _export_vision(full.path, tmp_out, job.bits, job.threads)
        result.timings["vision_s"] = round(time.perf_counter() - start, 2)
        shutil.copy2(ckpt.path / "config.json", tmp_out / "config.json")  # the full config: image token, tokens per image
        for name in VISION_COMPANIONS:
            if (ckpt.path / name).is_file():
                shutil.copy2(ckpt.path / name, tmp_out / name)
    else:
        shutil.copy2((raw if job.graph == "optimum" else src) / "config.json", tmp_out / "config.json")
    copy_companions(src, tmp_out)
    if not (tmp_out / "generation_config.json").is_file() and (raw / "generation_config.json").is_file():
        shutil.copy2(raw / "generation_config.json", tmp_out / "generation_config.json")


def _export_vision(model_dir: Path, out: Path, bits: int, threads: int) -> dict:
    """The vision tower + projector as ``vision.onnx`` (packager/export/onnx/gemma3_vision.py), checked against torch there."""
    dtype = VISION_DTYPE[bits]
    figures = export_gemma3_vision(model_dir, out, dtype=dtype, threads=threads, copy_companions=False)
    return {**figures, "onnx_file": figures["file"], "precision": dtype}


def _check_artifact(job: _Job, reference: _Reference, result: OnnxExport) -> None:
    """The artifact's decoder at ``--bits`` against torch, on the input the fp32 graph was checked with."""
    if job.bits == 32 and "skipped" not in result.validation["export"]:
        result.validation["artifact"] = {"same_as": "export"}
        return
    embed = job.tmp_out / EMBED_FILE if job.vision else None
    cast_per_node = job.large and job.bits == 16  # the CPU provider's fp16 MatMuls would hold a float32 copy of every weight
    steps = ort_steps(job.tmp_out / ONNX_MODEL_FILE, reference.ids, job.threads, embed, reference.window, prepack=not job.large,
                      cast_per_node=cast_per_node)
    check = compare_steps(reference.steps, steps, reference.atol)
    if not check["finite"]:
        raise XpackError(
            f"the {job.bits}-bit ONNX file of {job.arch.name} gives non-finite logits (fp16 overflow or a broken quantization); "
            "export with --bits 32 or --bits 8 instead"
        )
    check["reference"] = "transformers fp32, the same input"
    check.update(prepacking_note(not job.large, cast_per_node))
    result.validation["artifact"] = check
