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

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based exporter. The torch.export
(dynamo) exporter, the default since torch 2.9, needs ``onnxscript``, which ``xpack[pack]`` does not
pull in; the TorchScript one gives a clean graph here (Conv, MatMul, LayerNormalization, Softmax, tanh
GELU, AveragePool; no custom ops) that onnxruntime's CPU provider loads as is. Opset 17 by default
(the first with LayerNormalization; the TorchScript exporter goes up to 20, where GELU is one op).
The torch model is loaded in float32 with eager attention.

The weights are always written to ``vision.onnx_data`` (as ``common.save_model`` writes the decoder's),
whatever their size, so an artifact always has the same two files.

Precisions (``dtype``):
- ``float32``: as exported.
- ``float16``: onnxruntime's ``convert_float_to_float16`` with float32 inputs/outputs (casts at the
  graph edges); LayerNormalization, Softmax and the projector's RMSNorm stay in float32.
- ``int8``: weight-only, onnxruntime's ``MatMulNBitsQuantizer`` (bits=8, block 32, asymmetric,
  accuracy_level 4: activations quantized to int8 per block inside the kernel) on every MatMul with a
  weight initializer (q/k/v/out_proj, fc1/fc2, the projector); the patch-embedding Conv and the norms
  stay float32.

The graph is checked against the torch model as optimum's ``validate_model_outputs`` does (``np.allclose``
with an absolute tolerance): on a fixed random ``pixel_values`` batch of 2 and on a synthetic image
made into ``pixel_values`` by the checkpoint's own transformers image processor. The tolerance is
``TOLERANCE[dtype] * max(1, max |torch output|)`` (the features of a real model are not of order 1).
The numpy preprocessing of the runtime is checked against the transformers processor on the same image.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xpack.errors import XpackError
from xpack.packager.archs import require_arch
from xpack.packager.export.onnx.common import (
    ACCURACY_LEVEL,
    DEFAULT_OPSET,
    VISION_COMPANIONS,
    first_line,
    graph_io,
    quiet,
    read_config,
    require_libraries,
    save_model,
)
from xpack.packager.export.onnx.precision import VISION_INT8_BLOCK_SIZE, to_fp16, vision_int8
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.tensors import Reader
from xpack.runtimes.artifacts import PREPROCESSOR_CONFIG, VISION_DATA_FILE, VISION_FILE
from xpack.runtimes.images import Gemma3ImagePreprocessor
from xpack.runtimes.onnx_base import open_session, session_options

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

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_features"
BATCH_AXIS = "num_images"
# the check runs a random batch of 2 images when the tower sees at most this many patches per image (_check_batch)
BATCH_CHECK_TOKENS = 1024
MIN_OPSET, MAX_OPSET = 14, 20  # the TorchScript exporter's range that onnxruntime runs this graph with
DTYPES = ("float32", "float16", "int8")
_DTYPE_ALIASES = {32: "float32", 16: "float16", 8: "int8", "fp32": "float32", "fp16": "float16", "f32": "float32", "f16": "float16", "q8": "int8"}
# Export gate, relative to the scale of the features: |onnx - torch| <= TOLERANCE * max(1, max |torch|).
# Measured on the gemma3_vision twin (features of scale ~0.4): float32 2e-7, float16 3e-4, int8 5e-3.
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "int8": 5e-2}
# Node names of the projector's RMSNorm (kept in float32 by the fp16 conversion).
_FP16_KEEP_NODES = "/multi_modal_projector/mm_soft_emb_norm/"
_FP16_KEEP_OPS = ("LayerNormalization", "Softmax")
SCHEMES = {
    "float32": "float32 as exported",
    "float16": "float16 weights and activations, float32 inputs/outputs; LayerNormalization, Softmax and the projector RMSNorm in float32",
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
    """``Gemma3ForConditionalGeneration`` in float32 with eager attention, from a local folder, in eval mode.
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
    config._attn_implementation = "eager"
    with init_empty_weights():
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
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


def _image_features_module(model):
    import torch

    class ImageFeatures(torch.nn.Module):
        """``get_image_features`` as transformers 4.57 writes it (Gemma3Model), over the vision modules alone: the
        exporter reads every parameter of the module it is given, and the language model's are not loaded."""

        def __init__(self, inner):
            super().__init__()
            self.vision_tower = inner.vision_tower
            self.multi_modal_projector = inner.multi_modal_projector

        def forward(self, pixel_values):
            return self.multi_modal_projector(self.vision_tower(pixel_values=pixel_values).last_hidden_state)

    return ImageFeatures(model).eval()


def _torch_export(model, spec: dict, path: Path, opset: int) -> None:
    import torch

    size = spec["image_size"]
    # one image: the batch axis is dynamic (the check runs a batch of 2 where it is cheap, _check_batch), and tracing
    # runs the eager forward, whose attention holds 1 GB per image for MedGemma's 896x896
    example = torch.randn(1, spec["num_channels"], size, size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            torch.onnx.export(
                _image_features_module(model), (example,), str(path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
                do_constant_folding=True,
            )
    except (RuntimeError, ValueError, TypeError) as exc:
        raise XpackError(f"torch.onnx could not export the Gemma 3 vision tower ({first_line(exc)})") from None


def _set_output_shape(model: "onnx.ModelProto", spec: dict) -> None:
    """The exporter leaves the token axis of the output unnamed-symbolic; it is fixed by the config."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, (BATCH_AXIS, spec["mm_tokens_per_image"], spec["hidden_size"])):
        dim.Clear()
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value


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
    """float16 with the LayerNorms, Softmax and the projector's RMSNorm kept in float32, nodes in dependency order."""
    keep = [n.name for n in model.graph.node if n.name.startswith(_FP16_KEEP_NODES)]
    model = to_fp16(model, _FP16_KEEP_OPS, keep)
    _topological_sort(model)
    return model


def _save(model: "onnx.ModelProto", folder: Path) -> None:
    import onnx

    for name in (VISION_FILE, VISION_DATA_FILE):  # onnx appends to an existing data file
        (folder / name).unlink(missing_ok=True)
    save_model(model, folder, VISION_FILE, VISION_DATA_FILE)
    onnx.checker.check_model(str(folder / VISION_FILE))
    # onnx writes the data file owner-only (0600); give it the graph file's permissions
    os.chmod(folder / VISION_DATA_FILE, (folder / VISION_FILE).stat().st_mode & 0o777)


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


def _check_batch(spec: dict) -> int:
    """Images in the random batch of the check: 2, which exercises the dynamic batch axis, unless the tower sees more
    than BATCH_CHECK_TOKENS patches per image. Eager attention holds heads x patches^2 floats per image and layer:
    MedGemma's 896x896 images (4096 patches, 16 heads) 1.07 GB each, so a batch of 2 would double a 3 GB check."""
    patches = (spec["image_size"] // spec["patch_size"]) ** 2
    return 2 if patches <= BATCH_CHECK_TOKENS else 1


def _validation_inputs(model_dir: Path, spec: dict) -> tuple[dict, dict]:
    """{name: pixel_values} for the check, and the preprocessing figures (numpy preprocessing vs transformers)."""
    import numpy as np
    import transformers


    size = spec["image_size"]
    rng = np.random.default_rng(0)
    inputs = {"random": rng.standard_normal((_check_batch(spec), spec["num_channels"], size, size)).astype(np.float32)}
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
    opset: int | None = None,
    tolerance: float | None = None,
    validate: bool = True,
    copy_companions: bool = True,
    threads: int | None = None,
) -> dict:
    """Write ``vision.onnx`` + ``vision.onnx_data`` for the Gemma 3 checkpoint at ``model_dir`` into ``out_dir``.

    ``dtype``: ``float32`` (default), ``float16`` or ``int8`` (see the module docstring; 32/16/8 work too).
    ``opset``: ONNX opset, 14-20 (default 17). ``tolerance``: the export gate relative to the features'
    scale (default ``TOLERANCE[dtype]``). ``copy_companions``: also copy ``preprocessor_config.json`` and
    ``processor_config.json`` (what the runtime needs to make pixel values and the prompt).
    ``threads``: onnxruntime threads for the check (None: its default).
    An adapter must be merged into ``model_dir`` first (``xpack merge``): LoRA on the vision layers then
    reaches the graph.

    Returns the figures: files written, graph inputs/outputs and opset, the settings, timings, and under
    ``validation`` the max |onnx - torch| on a random batch of 2 and on a processor-made image, with the
    tolerance, plus ``preprocess_max_abs_diff`` (numpy preprocessing vs transformers). Raises
    :class:`XpackError` when the graph is off by more than the tolerance (and removes the files).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    dtype = _normalize_dtype(dtype)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise XpackError(f"opset {opset} is not supported for the vision export; choose {MIN_OPSET}-{MAX_OPSET} (default {DEFAULT_OPSET})")
    tolerance = TOLERANCE[dtype] if tolerance is None else float(tolerance)
    spec = vision_spec(model_dir)
    require_libraries("the vision export", ("torch", "transformers", "onnx", "onnxruntime", "PIL"))
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    with quiet():
        model = load_gemma3(model_dir, vision_only=True)
        timings["load_s"] = round(time.perf_counter() - clock, 2)
        inputs, pre_figures = _validation_inputs(model_dir, spec) if validate else ({}, {})
        reference = _torch_outputs(model, inputs) if validate else {}
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".xpack-vision-") as work_dir:
            raw = Path(work_dir) / VISION_FILE
            start = time.perf_counter()
            _torch_export(model, spec, raw, opset)
            del model
            timings["export_s"] = round(time.perf_counter() - start, 2)
            graph = onnx.load(str(raw))  # with its weights, wherever the exporter put them
        _set_output_shape(graph, spec)
        start = time.perf_counter()
        if dtype == "float16":
            graph = _to_fp16(graph)
        elif dtype == "int8":
            graph = vision_int8(graph)
        if dtype != "float32":
            timings["convert_s"] = round(time.perf_counter() - start, 2)
        _save(graph, out_dir)
        del graph
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
        "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
        "opset": opset,
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
