"""Gemma 3 / MedGemma vision tower + multi-modal projector -> ``vision.onnx`` for onnxruntime.

Why we write this ourselves: optimum(-onnx) exports only Gemma 3's text part (its ``gemma3`` export
config is a text decoder; there is no image-text-to-text config for Gemma 3 and no vision-encoder
config for its SigLIP tower + projector), so an ONNX artifact of a fine-tuned MedGemma would have no
way to read images. The image side is small and has no cache or control flow, so one graph does it:

``vision.onnx`` (+ ``vision.onnx_data``, every weight)
    ``pixel_values`` float32 [num_images, 3, H, W] -> ``image_features`` float32
    [num_images, mm_tokens_per_image, text_hidden_size], exactly
    ``Gemma3ForConditionalGeneration.get_image_features(pixel_values)`` (transformers 4.57): the SigLIP
    tower's last hidden state, average-pooled to ``mm_tokens_per_image`` tokens, RMS-normed and
    projected to the text width. H = W = ``vision_config.image_size`` (the graph takes that size only;
    ``xpack.runtimes.images.Gemma3ImagePreprocessor`` resizes to it); the batch axis is dynamic. The
    rows replace the embeddings of the image tokens (``xpack.runtimes.images.gemma3_image_tokens``).

The graph is xpack's own (vision_graph.py): built with a placeholder per weight and written to
``vision.onnx_data`` one weight at a time, attention as onnxruntime's fused ``MultiHeadAttention`` (a flash
attention on CPU). It replaced ``torch.onnx.export`` of the tower, which held the model several times over and
peaked at 6.9 GB for Gemma 3 4B (issue #12). The torch model of the check is the vision tower alone, float32,
with transformers' SDPA attention (also flash on CPU), freed before the graph is written.

The weights are always written to ``vision.onnx_data``, whatever their size, so an artifact always has the
same two files.

Precisions (``dtype``):
- ``float32``: as built.
- ``float16``: onnxruntime's ``convert_float_to_float16`` with float32 inputs/outputs (casts at the
  graph edges); LayerNormalization, the attention and the projector's RMSNorm stay in float32.
- ``int8``: weight-only MatMulNBits (bits=8, block 32, asymmetric, round to nearest: the bytes of
  onnxruntime's ``MatMulNBitsQuantizer``, accuracy_level 4: activations quantized to int8 per block inside
  the kernel) on every MatMul with a weight (q/k/v, out_proj, fc1/fc2, the projector); the patch-embedding
  Conv and the norms stay float32.

The graph is checked against the torch model as optimum's ``validate_model_outputs`` does (``np.allclose``
with an absolute tolerance): on a fixed random ``pixel_values`` batch of 2 and on a synthetic image
made into ``pixel_values`` by the checkpoint's own transformers image processor. The tolerance is
``TOLERANCE[dtype] * max(1, max |torch output|)`` (the features of a real model are not of order 1).
The numpy preprocessing of the runtime is checked against the transformers processor on the same image.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xpack.errors import XpackError
from xpack.packager.archs import require_arch
from xpack.packager.export.onnx.common import (
    ACCURACY_LEVEL,
    VISION_COMPANIONS,
    first_line,
    graph_io,
    quiet,
    read_config,
    require_libraries,
)
from xpack.packager.export.onnx.decoder_graph import OPSET
from xpack.packager.export.onnx.pending import DataFile, PendingWeights, save_graph
from xpack.packager.export.onnx.precision import VISION_INT8_BLOCK_SIZE, to_fp16
from xpack.packager.export.onnx.quantize import quantize_matmuls
from xpack.packager.export.onnx.vision_graph import INPUT_NAME, OUTPUT_NAME, build_vision
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.tensors import Reader
from xpack.runtimes.artifacts import PREPROCESSOR_CONFIG, VISION_DATA_FILE, VISION_FILE
from xpack.runtimes.images import Gemma3ImagePreprocessor
from xpack.runtimes.onnx_base import open_session, session_options
from xpack.runtimes.torch_offload import return_freed_memory

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = [
    "export_gemma3_vision",
    "load_gemma3",
    "vision_spec",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "DTYPES",
    "TOLERANCE",
]

DTYPES = ("float32", "float16", "int8")
_DTYPE_ALIASES = {32: "float32", 16: "float16", 8: "int8", "fp32": "float32", "fp16": "float16", "f32": "float32", "f16": "float16", "q8": "int8"}
# Export gate, relative to the scale of the features: |onnx - torch| <= TOLERANCE * max(1, max |torch|).
# Measured on the gemma3_vision twin (features of scale ~0.4): float32 2e-7, float16 3e-4, int8 5e-3.
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "int8": 5e-2}
# Node names of the projector's RMSNorm (kept in float32 by the fp16 conversion).
_FP16_KEEP_NODES = "/multi_modal_projector/mm_soft_emb_norm/"
_FP16_KEEP_OPS = ("LayerNormalization", "MultiHeadAttention")
SCHEMES = {
    "float32": "float32 as built",
    "float16": "float16 weights and activations, float32 inputs/outputs; LayerNormalization, the attention and the projector RMSNorm in float32",
    "int8": f"int8 weight-only MatMulNBits (bits=8, block {VISION_INT8_BLOCK_SIZE}, asymmetric, accuracy_level {ACCURACY_LEVEL}); Conv and norms float32",
}


# ---------------------------------------------------------------------------------------------
# checkpoint


def vision_spec(model_dir: "str | Path") -> dict:
    """The vision graph's shapes from ``config.json``; a one-line error for anything but a Gemma 3 vision checkpoint."""
    model_dir = Path(model_dir)
    config = read_config(model_dir, "a Gemma 3 vision model")
    vision, text = config.get("vision_config"), config.get("text_config")
    if config.get("model_type") != "gemma3" or not isinstance(vision, dict):
        kind = config.get("model_type") or (config.get("architectures") or ["?"])[0]
        raise XpackError(
            f"{model_dir} is a {kind} checkpoint without a Gemma 3 vision tower; the vision export takes "
            "Gemma 3 / MedGemma image-text checkpoints (Gemma3ForConditionalGeneration)"
        )
    text = text if isinstance(text, dict) else {}
    try:
        image_size = int(vision.get("image_size", 224))
        patch = int(vision.get("patch_size", 16))
        mm_tokens = int(config.get("mm_tokens_per_image", 256))
        channels = int(vision.get("num_channels", 3))
        hidden = int(text.get("hidden_size", 2304))
    except (TypeError, ValueError):
        raise XpackError(f"{model_dir}/config.json has non-integer vision sizes; it is not a usable Gemma 3 checkpoint") from None
    side = round(mm_tokens**0.5)
    if image_size % patch or side * side != mm_tokens or (image_size // patch) % side:
        raise XpackError(
            f"{model_dir}/config.json: image_size {image_size}, patch_size {patch} and mm_tokens_per_image {mm_tokens} "
            "do not pool evenly; this is not a Gemma 3 vision layout"
        )
    return {"image_size": image_size, "patch_size": patch, "num_channels": channels, "mm_tokens_per_image": mm_tokens, "hidden_size": hidden}


def load_gemma3(model_dir: "str | Path", vision_only: bool = False):
    """``Gemma3ForConditionalGeneration`` in float32, from a local folder, in eval mode: eager attention, or with
    ``vision_only`` transformers' SDPA (a flash attention on CPU: eager holds 1.07 GB per attention matrix for
    MedGemma's 4096 patches x 16 heads).
    ``vision_only``: only the vision tower and projector are read (the architecture table's ``vision_prefixes``);
    the language model stays on the meta device, never read, which ``get_image_features`` does not touch: 1.7 GB
    for Gemma 3 4B instead of 17 GB (from_pretrained with the language model offloaded still peaked at 6.9 GB)."""
    import torch
    import transformers

    try:
        if vision_only:
            model = _vision_parts(Path(model_dir))
        else:
            model = transformers.AutoModelForImageTextToText.from_pretrained(
                str(model_dir), dtype=torch.float32, attn_implementation="eager", local_files_only=True
            )
    except (OSError, ValueError, KeyError) as exc:
        raise XpackError(f"transformers could not load {model_dir} for the vision export ({first_line(exc)})") from None
    if not hasattr(model, "get_image_features"):
        raise XpackError(f"{model_dir} loads as {type(model).__name__}, which has no vision tower to export")
    return model.eval()


def _vision_parts(model_dir: Path):
    """The model built on the meta device from its config, then the vision tensors alone read from the safetensors
    (canonical names, float32) into it; a vision tensor the checkpoint lacks is a one-line error."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    arch = require_arch(read_config(model_dir, "vision export"), "the vision export")
    config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with init_empty_weights():
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    state = {}
    ckpt = Checkpoint(model_dir)
    for path, specs in ckpt.headers.items():
        with Reader(path) as reader:
            for name in specs:
                canon = arch.canonical(name)
                if arch.is_vision(canon):
                    state[canon] = torch.from_numpy(reader.get_float32(name))
    wanted = {n for n, _ in model.named_parameters() if arch.is_vision(n)}
    missing = sorted(wanted - set(state))
    if missing:
        raise XpackError(f"{model_dir} has no {missing[0]} ({len(missing)} vision tensors missing); re-save the checkpoint with transformers")
    model.load_state_dict(state, strict=False, assign=True)
    return model


# ---------------------------------------------------------------------------------------------
# export


def _topological_sort(model: "onnx.ModelProto") -> None:
    """Put the nodes in dependency order (the fp16 converter appends its input casts at the end; the
    ONNX checker, unlike onnxruntime, insists on the order)."""
    graph = model.graph
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise XpackError("the converted vision graph has a cycle or a dangling input; report the checkpoint")
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        for n in ready:
            ordered.append(n)
            known.update(n.output)
    copies = [type(n)() for n in ordered]
    for copy, n in zip(copies, ordered):
        copy.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _to_fp16(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """float16 with the LayerNorms, the attention and the projector's RMSNorm kept in float32, nodes in dependency order."""
    keep = [n.name for n in model.graph.node if n.name.startswith(_FP16_KEEP_NODES)]
    model = to_fp16(model, _FP16_KEEP_OPS, keep)
    _topological_sort(model)
    return model


def _write(model_dir: Path, out_dir: Path, dtype: str) -> dict:
    """``vision.onnx`` + ``vision.onnx_data`` in ``dtype``, each weight read, converted and appended one at a time.
    No onnx.checker here: it does not know onnxruntime's SimplifiedLayerNormalization (the decoder's graph is not
    run through it either); the graph is checked by running it against torch."""
    for name in (VISION_FILE, VISION_DATA_FILE):
        (out_dir / name).unlink(missing_ok=True)
    pending = PendingWeights()
    try:
        graph, facts = build_vision(model_dir, pending)
        if dtype == "float16":
            graph = _to_fp16(graph)
        with DataFile(out_dir, VISION_DATA_FILE) as out:
            pending.out = out
            if dtype == "int8":  # round to nearest: onnxruntime's MatMulNBitsQuantizer's bytes (quantize.py)
                graph, _ = quantize_matmuls(graph, 8, VISION_INT8_BLOCK_SIZE, search=False, tensors=pending)
            pending.write_all(graph)
        save_graph(graph, out_dir / VISION_FILE)
    finally:
        pending.out = None
        pending.close()
    # the data file is created owner-only by some umasks; give it the graph file's permissions
    os.chmod(out_dir / VISION_DATA_FILE, (out_dir / VISION_FILE).stat().st_mode & 0o777)
    return facts


# ---------------------------------------------------------------------------------------------
# validation


def _synthetic_image(size: tuple[int, int]):
    """A deterministic RGB picture (gradient + a bright disc + noise), not square, so that the processor resizes it."""
    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx / max(w - 1, 1) * 180 + yy / max(h - 1, 1) * 60).astype(np.float32)
    base[((xx - w * 0.6) ** 2 + (yy - h * 0.4) ** 2) < (min(w, h) * 0.2) ** 2] = 250.0
    img = np.stack([base, base * 0.9, base * 0.8], axis=-1) + rng.normal(0, 5, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


def _validation_inputs(model_dir: Path, spec: dict) -> tuple[dict, dict]:
    """{name: pixel_values} for the check, and the preprocessing figures (numpy preprocessing vs transformers)."""
    import numpy as np
    import transformers


    size = spec["image_size"]
    rng = np.random.default_rng(0)
    inputs = {"random": rng.standard_normal((2, spec["num_channels"], size, size)).astype(np.float32)}
    if not (model_dir / PREPROCESSOR_CONFIG).is_file():
        return inputs, {"preprocess": f"not checked: no {PREPROCESSOR_CONFIG}"}
    image = _synthetic_image((size + size // 4 + 1, size))
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True, use_fast=False)
        reference = np.asarray(processor(images=[image], return_tensors="np")["pixel_values"], dtype=np.float32)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise XpackError(f"transformers could not read {model_dir}/{PREPROCESSOR_CONFIG} ({first_line(exc)})") from None
    inputs["image"] = reference
    figures: dict[str, Any] = {"preprocess_image_size": list(image.size)}
    try:
        ours = Gemma3ImagePreprocessor.from_folder(model_dir)(image)
    except XpackError as exc:  # e.g. pan-and-scan on: the runtime refuses it; the graph itself is fine
        figures["preprocess"] = f"not checked: {exc}"
        return inputs, figures
    if ours.shape != reference.shape:
        raise XpackError(f"xpack's image preprocessing gives {list(ours.shape)}, transformers' {list(reference.shape)}; check {PREPROCESSOR_CONFIG}")
    figures["preprocess_max_abs_diff"] = float(np.abs(ours - reference).max())
    if reference.shape[-2:] != (size, size):
        raise XpackError(f"{PREPROCESSOR_CONFIG} resizes to {list(reference.shape[-2:])}, but the vision tower takes {size}x{size}")
    return inputs, figures


def _torch_outputs(model, inputs: dict) -> dict:
    import torch

    with torch.no_grad():
        return {k: model.get_image_features(torch.from_numpy(v)).float().numpy() for k, v in inputs.items()}


def _ort_outputs(path: Path, inputs: dict, threads: int | None) -> dict:
    session = open_session(path, session_options(threads), ["CPUExecutionProvider"])
    return {k: session.run([OUTPUT_NAME], {INPUT_NAME: v})[0] for k, v in inputs.items()}


def _check_features(reference: dict, candidate: dict, tolerance: float, dtype: str) -> dict:
    """The graph's features against torch's, per input: figures, or a one-line error past the tolerance."""
    import numpy as np

    figures: dict[str, Any] = {"tolerance": tolerance, "rule": "max|onnx - torch| <= tolerance * max(1, max|torch|)"}
    for name, ref in reference.items():
        out = candidate[name]
        if out.shape != ref.shape:
            raise XpackError(f"vision.onnx gives {OUTPUT_NAME} of shape {list(out.shape)} for the {name} input; torch gives {list(ref.shape)}")
        scale = max(1.0, float(np.abs(ref).max()))
        atol = tolerance * scale
        diff = float(np.abs(out.astype(np.float32) - ref).max())
        figures[name] = {"max_abs_diff": diff, "torch_max_abs": float(np.abs(ref).max()), "atol": atol, "shape": list(ref.shape)}
        if not np.isfinite(out).all() or not np.allclose(out, ref, atol=atol, rtol=0):
            raise XpackError(
                f"the {dtype} vision.onnx differs from torch on the {name} input by {diff:.3g} (> {atol:.3g}); "
                "the export is not faithful, try float32 or report the checkpoint"
            )
    return figures


# ---------------------------------------------------------------------------------------------
# entry point


def _normalize_dtype(dtype: "str | int") -> str:
    name = _DTYPE_ALIASES.get(dtype.lower() if isinstance(dtype, str) else dtype, dtype)
    if name not in DTYPES:
        raise XpackError(f"vision export dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return name


def export_gemma3_vision(
    model_dir: "str | Path",
    out_dir: "str | Path",
    *,
    dtype: "str | int" = "float32",
    tolerance: float | None = None,
    validate: bool = True,
    copy_companions: bool = True,
    threads: int | None = None,
) -> dict:
    """Write ``vision.onnx`` + ``vision.onnx_data`` for the Gemma 3 checkpoint at ``model_dir`` into ``out_dir``.

    ``dtype``: ``float32`` (default), ``float16`` or ``int8`` (see the module docstring; 32/16/8 work too).
    ``tolerance``: the export gate relative to the features' scale (default ``TOLERANCE[dtype]``).
    ``copy_companions``: also copy ``preprocessor_config.json`` and ``processor_config.json`` (what the runtime
    needs to make pixel values and the prompt). ``threads``: onnxruntime threads for the check (None: its default).
    An adapter must be merged into ``model_dir`` first (``xpack merge``): LoRA on the vision layers then
    reaches the graph.

    The phases never overlap in memory: torch's features for the check (the vision tower alone, then freed), the
    graph written weight by weight, onnxruntime's features. Returns the figures: files written, graph
    inputs/outputs and opset, the settings, timings, and under ``validation`` the max |onnx - torch| on a random
    batch of 2 and on a processor-made image, with the tolerance, plus ``preprocess_max_abs_diff`` (numpy
    preprocessing vs transformers). Raises :class:`XpackError` when the graph is off by more than the tolerance
    (and removes the files).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    dtype = _normalize_dtype(dtype)
    tolerance = TOLERANCE[dtype] if tolerance is None else float(tolerance)
    spec = vision_spec(model_dir)
    require_libraries("the vision export", ("torch", "transformers", "onnx", "onnxruntime", "PIL"))

    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    inputs, pre_figures, reference = {}, {}, {}
    if validate:
        clock = time.perf_counter()
        with quiet():
            inputs, pre_figures = _validation_inputs(model_dir, spec)
            model = load_gemma3(model_dir, vision_only=True)
            reference = _torch_outputs(model, inputs)
        del model
        return_freed_memory()
        timings["torch_s"] = round(time.perf_counter() - clock, 2)
    start = time.perf_counter()
    facts = _write(model_dir, out_dir, dtype)
    timings["write_s"] = round(time.perf_counter() - start, 2)
    validation: dict[str, Any] = {"checked": False}
    if validate:
        start = time.perf_counter()
        try:
            validation = {"checked": True, **_check_features(reference, _ort_outputs(out_dir / VISION_FILE, inputs, threads), tolerance, dtype), **pre_figures}
        except XpackError:  # leave no unfaithful graph behind
            for name in (VISION_FILE, VISION_DATA_FILE):
                (out_dir / name).unlink(missing_ok=True)
            raise
        timings["validate_s"] = round(time.perf_counter() - start, 2)
    copied = []
    if copy_companions:
        for name in VISION_COMPANIONS:
            if (model_dir / name).is_file() and model_dir.resolve() != out_dir.resolve():
                shutil.copy2(model_dir / name, out_dir / name)
                copied.append(name)
    io = graph_io(out_dir / VISION_FILE)
    return {
        "file": VISION_FILE,
        "data_file": VISION_DATA_FILE,
        "files": {name: (out_dir / name).stat().st_size for name in (VISION_FILE, VISION_DATA_FILE)},
        "companions": copied,
        "exporter": "xpack's graph (vision_graph.py), weights streamed from the safetensors",
        "graph_facts": facts,
        "opset": OPSET,
        "dtype": dtype,
        "scheme": SCHEMES[dtype],
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "image_size": spec["image_size"],
        "mm_tokens_per_image": spec["mm_tokens_per_image"],
        "hidden_size": spec["hidden_size"],
        "io": io,
        "validation": validation,
        "timings": timings,
    }
