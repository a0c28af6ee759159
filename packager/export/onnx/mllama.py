"""Llama 3.2 Vision (mllama, ``MllamaForConditionalGeneration``) -> three ONNX graphs for onnxruntime.

Why we write this ourselves: no tool exports mllama to ONNX. optimum(-onnx) has no ``mllama`` export
config (its image-text-to-text tasks cover none of the cross-attention VLMs), llama.cpp has no mllama
support at all (no converter, no mmproj), and a plain ``torch.onnx.export`` of
``MllamaForConditionalGeneration`` cannot work: its forward keeps the cross-attention keys/values in a
``Cache`` object, chooses at run time whether to skip the cross-attention layers, and builds its masks
from Python lists in the processor. So the model is cut into three graphs, each a small torch module
that reuses the Hugging Face modules' weights (projections, norms, tanh gates, MLPs, rotary
embedding) and passes every key/value explicitly:

``vision.onnx``
    ``pixel_values`` [B, 1, max_tiles, C, H, W] float32, ``aspect_ratio_ids`` [B, 1] int64,
    ``aspect_ratio_mask`` [B, 1, max_tiles] int64 -> ``cross_attention_states`` [B, V, hidden]
    (V = max_tiles * (patches per tile + 1 class token)): ``multi_modal_projector(vision_model(...))``
    reshaped as ``MllamaModel.forward`` does ([B * tiles, tokens per tile, hidden]) and then flattened
    per batch row, which is what the cross-attention's ``view(bsz, -1, heads, head_dim)`` does anyway.
``cross_kv.onnx``
    ``cross_attention_states`` [B, V, hidden] -> ``cross_key_values.{L}.key`` / ``.value``
    [B, kv_heads, V, head_dim] for every cross-attention layer L (``k_norm(k_proj(x))`` and
    ``v_proj(x)``): computed once per image, fed to every decoding step.
``decoder.onnx``
    ``input_ids`` [B, S] int64, ``attention_mask`` [B, P + S] int64, ``position_ids`` [B, S] int64,
    ``cross_attention_mask`` [B, 1, S, V] float32 (additive: 0 attends, float32 min does not),
    ``full_text_row_masked_out_mask`` [B, 1, S, 1] float32, ``past_key_values.{L}.key/value``
    [B, kv_heads, P, head_dim] for every self-attention layer L and ``cross_key_values.{L}.key/value``
    for every cross-attention layer L -> ``logits`` [B, S, vocab] and ``present.{L}.key/value``
    [B, kv_heads, P + S, head_dim]. L is the layer's index in ``language_model.layers`` (the twin's
    self-attention layers are 0 and 2, its cross-attention layer 1).

Text without an image runs the same decoder: transformers skips the cross-attention layers then, and
the graph reproduces that exactly with one all-zero cross key/value (V = 1) and a zero row mask: the
attention output is ``o_proj(0) = 0`` and the MLP branch is multiplied by 0, so the layer is the
identity. The masks are computed in numpy by ``xpack.runtimes.onnx_mllama`` exactly as
``MllamaProcessor`` (``get_cross_attention_token_mask``) and ``_prepare_cross_attention_mask`` do;
note that transformers (4.57) masks only the MLP branch of the rows before the ``<|image|>`` token,
while their attention branch attends uniformly to every vision token (padding tiles included): the
graph does the same.

The wrapper modules are checked against ``MllamaForConditionalGeneration`` in torch before anything is
exported, and the exported graphs (run by the numpy/onnxruntime pipeline of
``xpack.runtimes.onnx_mllama``) against it afterwards, on a prefill with an image and one decoding
step: :func:`export_mllama` returns those figures and raises :class:`XpackError` beyond tolerance.
Exporter: torch.onnx's TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, deprecated but
still in torch 2.13, and what optimum-onnx uses too) with ``dynamic_axes`` for the batch, sequence,
past and vision-token axes; the decoder is traced with a non-empty past and several new tokens so
that no size is frozen. The torch.export-based exporter (``dynamo=True``, torch's default) needs the
``onnxscript`` package, which is not among xpack's dependencies (``No module named 'onnxscript'``).
Weights go inline into each .onnx, or into one ``<graph>.onnx.data`` beside it past 1 GiB.

``xpack export --format onnx`` of an mllama checkpoint (:func:`export_mllama_artifact`) merges the
adapter into the whole checkpoint first (it reaches the vision layers too), exports the graphs and,
below 32 bits, quantizes the decoder and cross K/V graphs at ``--bits`` and the vision graph at 8 bits,
checked against the fp32 graphs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from xpack.errors import XpackError
from xpack.packager.archs.onnx_spec import OnnxSpec
from xpack.packager.export.onnx.common import (
    DEFAULT_OPSET,
    VISION_COMPANIONS,
    OnnxExport,
    decoder_io,
    first_line,
    quiet,
    read_config,
    require_libraries,
)
from xpack.packager.export.onnx.mllama_modules import wrap_mllama
from xpack.packager.export.onnx.precision import SCHEMES, VISION_DTYPE, quantize_graph, vision_int8, weight_node_types
from xpack.packager.io.atomic import atomic_dir
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.merge.lora import Adapter
from xpack.packager.merge.stream import MergeSettings, run_merge
from xpack.packager.verify.parity import compare_logits
from xpack.paths import temp_dir
from xpack.runtimes.artifacts import MLLAMA_CROSS_KV_FILE, MLLAMA_DECODER_FILE, MLLAMA_FORMAT, MLLAMA_META_FILE, VISION_FILE
from xpack.runtimes.onnx_mllama import MllamaOnnx, cross_attention_masks

__all__ = ["export_mllama", "export_mllama_artifact", "load_mllama"]

FORMAT_VERSION = 1
# Export gate: max |logit error| of the graphs against torch, relative to the logits' scale
# (tolerance = LOGIT_RTOL * max(1, max |torch logit|)). Measured on the twin: <= 2.4e-7 (see the tests).
LOGIT_RTOL = 1e-3
# The torch wrappers against transformers, before exporting (same rule; measured on the twin: <= 1.2e-7).
WRAPPER_RTOL = 1e-4
EXTERNAL_DATA_BYTES = 1 << 30  # weights past this go to <graph>.onnx.data (protobuf's limit is 2 GiB)
# What the output folder gets from the checkpoint besides the graphs.
COMPANIONS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    *VISION_COMPANIONS,
)


# ---------------------------------------------------------------------------------------------
# loading, export, validation


@contextlib.contextmanager
def _native_stderr_silenced():
    """libtorch's tracer prints "In-place op on output of tensor.shape" to fd 2 directly (the vision tower's
    ``num_patches += 1``, harmless: those sizes are static); python-level errors still raise as usual."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest's capture, notebooks: nothing to silence
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, fd)
    finally:
        os.close(saved)


def _read_config(model_dir: Path) -> dict:
    config = read_config(model_dir, "Llama 3.2 Vision (mllama)")
    if config.get("model_type") != "mllama":
        raise XpackError(f"{model_dir} is a {config.get('model_type', 'unknown')!r} checkpoint, not Llama 3.2 Vision (mllama); use the plain ONNX export for it")
    return config


def load_mllama(model_dir: "str | Path"):
    """``MllamaForConditionalGeneration`` in fp32, eager attention, eval mode (the reference the export is checked against)."""
    import torch
    import transformers

    model_dir = Path(model_dir)
    _read_config(model_dir)
    with quiet():
        try:
            model = transformers.MllamaForConditionalGeneration.from_pretrained(
                str(model_dir), dtype=torch.float32, attn_implementation="eager", local_files_only=True
            )
        except (OSError, ValueError, KeyError) as exc:
            raise XpackError(f"transformers could not load {model_dir} ({first_line(exc)})") from None
    return model.eval()


def _layout(model) -> dict:
    text = model.config.text_config
    vision = model.config.vision_config
    lm = model.model.language_model
    cross = [int(i) for i in lm.cross_attention_layers]
    return {
        "self_attention_layers": [i for i in range(len(lm.layers)) if i not in cross],
        "cross_attention_layers": cross,
        "num_key_value_heads": int(text.num_key_value_heads),
        "head_dim": int(text.hidden_size // text.num_attention_heads),
        "hidden_size": int(text.hidden_size),
        "vocab_size": int(model.lm_head.weight.shape[0]),
        "image_token_id": int(model.config.image_token_index),
        "max_num_tiles": int(vision.max_num_tiles),
        "tokens_per_tile": int(model.model.vision_model.num_patches),
        "image_size": int(vision.image_size),
        "num_channels": int(vision.num_channels),
        "supported_aspect_ratios": [list(r) for r in vision.supported_aspect_ratios],
    }


def _io_names(layout: dict) -> dict:
    past = [f"past_key_values.{i}.{kv}" for i in layout["self_attention_layers"] for kv in ("key", "value")]
    cross = [f"cross_key_values.{i}.{kv}" for i in layout["cross_attention_layers"] for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in layout["self_attention_layers"] for kv in ("key", "value")]
    return {"past": past, "cross": cross, "present": present}


def _validation_inputs(layout: dict, seed: int = 0) -> dict:
    """A fixed synthetic case: random pixels, a one-tile aspect ratio (so padding tiles exist), text before and after <|image|>."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    tiles, channels, size = layout["max_num_tiles"], layout["num_channels"], layout["image_size"]
    pixel_values = torch.randn((1, 1, tiles, channels, size, size), generator=gen)
    ratios = [tuple(r) for r in layout["supported_aspect_ratios"]]
    ratio = (1, 2) if (1, 2) in ratios else ratios[0]
    ratio_id = ratios.index(ratio) + 1
    used = ratio[0] * ratio[1]
    pixel_values[:, :, used:] = 0  # as the image processor pads
    aspect_ratio_mask = torch.zeros((1, 1, tiles), dtype=torch.long)
    aspect_ratio_mask[..., :used] = 1
    special = {layout["image_token_id"]}
    vocab = layout["vocab_size"]
    ids = [int(t) for t in torch.randint(0, min(vocab, 32000), (24,), generator=gen) if int(t) not in special][:20]
    input_ids = ids[:3] + [layout["image_token_id"]] + ids[3:]
    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": torch.tensor([[ratio_id]]),
        "aspect_ratio_mask": aspect_ratio_mask,
        "input_ids": input_ids,
        "num_tiles": used,
    }


def _hf_logits(model, input_ids: list[int], image: dict | None, num_tiles: int | None = None):
    """transformers' logits [S, vocab] for ``input_ids`` (with the image and the processor's cross_attention_mask, if given)."""
    import torch

    ids = torch.tensor([input_ids])
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if image is not None:
        tiles = image["aspect_ratio_mask"].shape[-1]
        mask = torch.zeros((1, len(input_ids), 1, tiles), dtype=torch.long)
        start = input_ids.index(model.config.image_token_index)
        mask[:, start:, :, :num_tiles] = 1
        kwargs.update(
            pixel_values=image["pixel_values"],
            aspect_ratio_ids=image["aspect_ratio_ids"],
            aspect_ratio_mask=image["aspect_ratio_mask"],
            cross_attention_mask=mask,
        )
    with torch.no_grad():
        return model(**kwargs).logits[0].float().numpy()


def _check_wrappers(model, wraps: dict, layout: dict, case: dict) -> float:
    """(max |logit diff|, max |logit|) of the torch wrappers against MllamaForConditionalGeneration on ``case``
    (a prefill of all but the last token, then that token as a cached step)."""
    import numpy as np
    import torch

    ids = case["input_ids"]
    ref = _hf_logits(model, ids, case, case["num_tiles"])
    with torch.no_grad():
        states = wraps["vision"](case["pixel_values"], case["aspect_ratio_ids"], case["aspect_ratio_mask"])
        cross = wraps["cross_kv"](states)
        cmask, rmask = cross_attention_masks(ids, layout["image_token_id"], case["num_tiles"], layout["max_num_tiles"], layout["tokens_per_tile"])
        cmask, rmask = torch.from_numpy(cmask), torch.from_numpy(rmask)
        empty = tuple(torch.zeros((1, layout["num_key_value_heads"], 0, layout["head_dim"])) for _ in _io_names(layout)["past"])
        n = len(ids) - 1
        first = wraps["decoder"](
            torch.tensor([ids[:n]]), torch.ones((1, n), dtype=torch.long), torch.arange(n)[None], cmask[:, :, :n], rmask[:, :, :n], empty, cross
        )
        step = wraps["decoder"](
            torch.tensor([ids[n:]]), torch.ones((1, n + 1), dtype=torch.long), torch.tensor([[n]]), cmask[:, :, n:], rmask[:, :, n:], tuple(first[1:]), cross
        )
    got = np.concatenate([first[0][0].numpy(), step[0][0].numpy()])
    return float(np.abs(got - ref).max()), float(np.abs(ref).max())


def _export_graph(module, args, path: Path, input_names, output_names, dynamic_axes, opset: int, output_shapes: dict | None = None) -> None:
    """torch.onnx's TorchScript exporter into a scratch folder, then saved as ``path`` alone (weights inline), or with
    one ``<name>.data`` file beside it when they pass 1 GiB (the exporter itself writes one file per tensor past 2 GiB)."""
    import onnx
    import torch

    scratch = path.parent / f".{path.stem}-export"
    scratch.mkdir()
    try:
        with quiet(), _native_stderr_silenced(), torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(scratch / path.name),
                dynamo=False,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
            )
        model = onnx.load(str(scratch / path.name), load_external_data=True)
        for output in model.graph.output:  # the tracer names derived sizes after its nodes ("Reshape..._dim_2"): state them
            for i, size in enumerate((output_shapes or {}).get(output.name, ())):
                dim = output.type.tensor_type.shape.dim[i]
                if isinstance(size, str):
                    dim.dim_param = size
                else:
                    dim.dim_value = int(size)
        if sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _export_all(model, wraps: dict, layout: dict, case: dict, folder: Path, opset: int) -> None:
    import torch

    names = _io_names(layout)
    kvh, hd = layout["num_key_value_heads"], layout["head_dim"]
    # vision
    vision_args = (case["pixel_values"], case["aspect_ratio_ids"], case["aspect_ratio_mask"])
    vision_in = ["pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"]
    batch = {0: "batch"}
    _export_graph(
        wraps["vision"], vision_args, folder / VISION_FILE, vision_in, ["cross_attention_states"],
        {n: batch for n in vision_in + ["cross_attention_states"]}, opset,
        {"cross_attention_states": ("batch", layout["max_num_tiles"] * layout["tokens_per_tile"], layout["hidden_size"])},
    )
    # cross keys/values
    with torch.no_grad():
        states = wraps["vision"](*vision_args)
        cross = tuple(wraps["cross_kv"](states))
    kv_axes = {0: "batch", 2: "vision_tokens"}
    _export_graph(
        wraps["cross_kv"], (states,), folder / MLLAMA_CROSS_KV_FILE, ["cross_attention_states"], names["cross"],
        {"cross_attention_states": {0: "batch", 1: "vision_tokens"}, **{n: kv_axes for n in names["cross"]}}, opset,
        {n: ("batch", kvh, "vision_tokens", hd) for n in names["cross"]},
    )
    # decoder: traced with a non-empty past and several new tokens, so that no size is taken for a constant
    past_len, seq = 3, 4
    gen = torch.Generator().manual_seed(1)
    past = tuple(torch.randn((1, kvh, past_len, hd), generator=gen) for _ in names["past"])
    ids = torch.tensor([case["input_ids"][past_len : past_len + seq]])
    vision_tokens = layout["max_num_tiles"] * layout["tokens_per_tile"]
    decoder_args = (
        ids,
        torch.ones((1, past_len + seq), dtype=torch.long),
        torch.arange(past_len, past_len + seq)[None],
        torch.zeros((1, 1, seq, vision_tokens)),
        torch.ones((1, 1, seq, 1)),
        past,
        cross,
    )
    decoder_in = ["input_ids", "attention_mask", "position_ids", "cross_attention_mask", "full_text_row_masked_out_mask"]
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "cross_attention_mask": {0: "batch", 2: "sequence", 3: "vision_tokens"},
        "full_text_row_masked_out_mask": {0: "batch", 2: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
        **{n: {0: "batch", 2: "past_sequence"} for n in names["past"]},
        **{n: kv_axes for n in names["cross"]},
        **{n: {0: "batch", 2: "total_sequence"} for n in names["present"]},
    }
    _export_graph(
        wraps["decoder"], decoder_args, folder / MLLAMA_DECODER_FILE, decoder_in + names["past"] + names["cross"], ["logits"] + names["present"], axes, opset,
        {"logits": ("batch", "sequence", layout["vocab_size"]), **{n: ("batch", kvh, "total_sequence", hd) for n in names["present"]}},
    )


def _validate(model, folder: Path, layout: dict, case: dict) -> dict:
    """The graphs (through the runtime's pipeline) against torch: a prefill with the image, one cached decoding step, text only."""
    import numpy as np

    pipe = MllamaOnnx(folder)
    ids = case["input_ids"]
    n = len(ids) - 1
    ref = _hf_logits(model, ids, case, case["num_tiles"])  # full forward: its last row is what a cached step must give
    image = pipe.encode_image(case["pixel_values"].numpy(), case["aspect_ratio_ids"].numpy(), case["aspect_ratio_mask"].numpy())
    cmask, rmask = pipe.masks(ids, image)
    prefill, past = pipe.run(ids[:n], pipe.empty_past(), image.cross_kv, cmask[:, :, :n], rmask[:, :, :n], 0)
    step, _ = pipe.run(ids[n:], past, image.cross_kv, cmask[:, :, n:], rmask[:, :, n:], n)
    text_ids = [t for t in ids if t != layout["image_token_id"]]
    text_ref = _hf_logits(model, text_ids, None)
    text = pipe.logits(text_ids)
    scale = float(max(np.abs(ref).max(), np.abs(text_ref).max()))
    return {
        "prefill_max_abs_diff": float(np.abs(prefill - ref[:n]).max()),
        "decode_step_max_abs_diff": float(np.abs(step - ref[n:]).max()),
        "text_only_max_abs_diff": float(np.abs(text - text_ref).max()),
        "prefill_top1_agreement": float((prefill.argmax(-1) == ref[:n].argmax(-1)).mean()),
        "logit_scale": scale,
        "prefill_tokens": n,
        "image_tiles": case["num_tiles"],
    }


def export_mllama(model_dir: "str | Path", out_dir: "str | Path", *, opset: int | None = None, force: bool = False, atol: float | None = None) -> dict:
    """Export a Llama 3.2 Vision checkpoint (merge an adapter first) to ``vision.onnx``, ``cross_kv.onnx``, ``decoder.onnx``.

    ``out_dir`` gets the three graphs, ``mllama_onnx.json`` (layout, files, figures) and the checkpoint's
    tokenizer, processor and generation files; it is written atomically (refused if it exists, unless
    ``force``). Returns the metadata written to ``mllama_onnx.json``; its ``validation`` holds the max
    |logit difference| against torch of a prefill with an image, of one cached decoding step and of a
    text-only prefill. Raises :class:`XpackError` when one is above ``atol`` (default:
    ``LOGIT_RTOL * max(1, max |torch logit|)``).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    require_libraries("the mllama ONNX export", ("torch", "transformers", "onnx", "onnxruntime", "numpy"))
    import onnx
    import torch
    import transformers

    _read_config(model_dir)
    started = time.perf_counter()
    opset = int(opset or DEFAULT_OPSET)
    model = load_mllama(model_dir)
    layout = _layout(model)
    wraps = wrap_mllama(model)
    case = _validation_inputs(layout)
    wrapper_diff, scale = _check_wrappers(model, wraps, layout, case)
    wrapper_tolerance = WRAPPER_RTOL * max(1.0, scale)
    if not wrapper_diff <= wrapper_tolerance:
        raise XpackError(
            f"the mllama export wrapper differs from transformers {transformers.__version__} by {wrapper_diff:.3g} in the logits "
            f"(tolerance {wrapper_tolerance:.3g}); this transformers version is not supported, use 4.57"
        )
    with atomic_dir(out_dir, force=force) as tmp:
        try:
            _export_all(model, wraps, layout, case, tmp, opset)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise XpackError(f"torch.onnx could not export the mllama graphs ({first_line(exc)})") from None
        for name in COMPANIONS:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        meta = {
            "format": MLLAMA_FORMAT,
            "format_version": FORMAT_VERSION,
            "files": {"vision": VISION_FILE, "cross_kv": MLLAMA_CROSS_KV_FILE, "decoder": MLLAMA_DECODER_FILE},
            **layout,
            "eos_token_ids": _eos_ids(model),
            "bos_token_id": model.config.text_config.bos_token_id,
            "dtype": "float32",
            "opset": opset,
            "exporter": f"torch.onnx.export(dynamo=False) (TorchScript), torch {torch.__version__}, onnx {onnx.__version__}",
            "transformers": transformers.__version__,
            "source": str(model_dir),
        }
        (tmp / MLLAMA_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        figures = _validate(model, tmp, layout, case)
        tolerance = float(atol if atol is not None else LOGIT_RTOL * max(1.0, figures["logit_scale"]))
        worst = max(figures["prefill_max_abs_diff"], figures["decode_step_max_abs_diff"], figures["text_only_max_abs_diff"])
        figures.update(wrapper_max_abs_diff=wrapper_diff, atol=tolerance, passed=worst <= tolerance)
        if not worst <= tolerance:
            raise XpackError(f"the exported mllama graphs differ from torch by {worst:.3g} in the logits (tolerance {tolerance:.3g}); nothing was written")
        meta["validation"] = figures
        meta["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / MLLAMA_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _eos_ids(model) -> list[int]:
    ids: list[int] = []
    for source in (model.generation_config.eos_token_id, model.config.text_config.eos_token_id):
        for value in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(value, int) and value not in ids:
                ids.append(value)
    return ids


# ---------------------------------------------------------------------------------------------
# the artifact of `xpack export --format onnx`


def export_mllama_artifact(
    ckpt: Checkpoint, adapters: list[Adapter], tmp_out: Path, bits: int, spec: OnnxSpec, block_size: int, keep_lm_head: bool, int4: str,
    merge: MergeSettings,
) -> OnnxExport:
    """The three graphs of ``ckpt`` (adapters merged first, as ``merge`` says) at ``bits`` in ``tmp_out``, and the export's account."""
    if bits not in spec.bits:
        raise XpackError(
            f"--bits {bits} is not available for Llama 3.2 Vision (mllama) ONNX yet (fp16 of its traced graphs is not checked); "
            f"use --bits {', '.join(str(b) for b in spec.bits)}"
        )
    result = OnnxExport(arch="mllama", graph="xpack-mllama", onnx_file=MLLAMA_DECODER_FILE, data_file=None, exported_class="MllamaForConditionalGeneration")
    clock = time.perf_counter()
    with temp_dir("onnx", dir=tmp_out.parent) as work_dir, quiet():
        work = Path(work_dir)
        source = ckpt.path
        if adapters:  # the adapter reaches the vision layers too: merge the whole checkpoint first
            (work / "merged").mkdir()
            result.notes += list(run_merge(ckpt, adapters, work / "merged", merge).plan.notes)
            source = work / "merged"
        meta = export_mllama(source, work / "mllama")
        if bits != 32:
            result.quantization, result.validation["artifact"] = _quantize_graphs(work / "mllama", work / "fp32", bits, spec, block_size, keep_lm_head, int4)
        for path in (work / "mllama").iterdir():
            shutil.move(str(path), tmp_out / path.name)
    for name in (f"{MLLAMA_DECODER_FILE}.data", f"{MLLAMA_DECODER_FILE}_data"):
        if (tmp_out / name).is_file():
            result.data_file = name
    result.validation["export"] = _export_check(meta.get("validation") or {})
    result.validation.setdefault("artifact", {"same_as": "export"})
    result.vision = {"onnx_file": VISION_FILE, "cross_kv_file": MLLAMA_CROSS_KV_FILE, "precision": VISION_DTYPE[bits],
                     "files": [VISION_FILE, f"{VISION_FILE}.data", MLLAMA_CROSS_KV_FILE, f"{MLLAMA_CROSS_KV_FILE}.data"]}
    result.quantization = result.quantization or {"bits": 32, "scheme": SCHEMES[32], "node_types": {}}
    result.io = decoder_io(tmp_out / MLLAMA_DECODER_FILE)
    result.opset = int(result.io["opset"].get("ai.onnx", 0))
    result.timings["total_s"] = round(time.perf_counter() - clock, 2)
    return result


def _export_check(figures: dict) -> dict:
    """export_mllama's figures (prefill with an image, one cached step, text only) as the manifest's export check."""
    worst = max(figures.get(k, 0.0) for k in ("prefill_max_abs_diff", "decode_step_max_abs_diff", "text_only_max_abs_diff"))
    return {
        "tokens": figures.get("tokens"), "atol": figures.get("atol"), "rtol": 0.0, "within_tolerance": bool(figures.get("passed")),
        "finite": True, "max_abs_diff": {"logits": worst, "present (max over layers)": None},
        "figures": figures, "reference": "transformers fp32 (eager attention): prefill with an image, one cached step, text only",
    }


def _quantize_graphs(folder: Path, keep: Path, bits: int, spec: OnnxSpec, block_size: int, keep_lm_head: bool, int4: str) -> tuple[dict, dict]:
    """Quantize the three graphs in ``folder`` (decoder and cross K/V at ``bits``, vision at 8 bits),
    then compare them with the fp32 graphs (kept in ``keep``; those matched torch within 1e-6)."""
    import onnx

    shutil.copytree(folder, keep)
    info: dict = {}
    for name in (MLLAMA_DECODER_FILE, MLLAMA_CROSS_KV_FILE, VISION_FILE):
        model = onnx.load(str(folder / name))
        opset = {o.domain: o.version for o in model.opset_import}.get("", None)
        if name == VISION_FILE:
            model, part = vision_int8(model), {"bits": 8}
        else:
            model, part = quantize_graph(model, bits, block_size, keep_lm_head, spec, int4)
        for o in model.opset_import:  # the quantizer raises the opset; the traced graph's ops (ReduceMean axes) are of its own
            if o.domain in ("", "ai.onnx") and opset is not None:
                o.version = opset
        for stale in folder.glob(f"{name}*"):
            stale.unlink()
        onnx.save_model(model, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{name}.data", size_threshold=1024)
        info[name] = part.get("node_types") or weight_node_types(model)
        if name == MLLAMA_DECODER_FILE:
            decoder_part = part
    quantization = {**decoder_part, "graphs": info, "vision": "int8 weight-only (MatMulNBits bits=8)"}
    check = _compare_graphs(MllamaOnnx(keep, threads=1), MllamaOnnx(folder, threads=1))
    if not check["finite"]:
        raise XpackError(f"the {bits}-bit mllama graphs give non-finite logits; export with --bits 32")
    return quantization, check


def _compare_graphs(reference: MllamaOnnx, candidate: MllamaOnnx) -> dict:
    """The candidate graphs' logits against the reference graphs' on a synthetic image and a prompt around the image token."""
    import numpy as np

    shape = [int(d) for d in reference.sessions["vision"].get_inputs()[0].shape[2:]]
    pixels = np.random.default_rng(0).standard_normal([1, 1, *shape]).astype(np.float32)
    ratio_ids, ratio_mask = np.array([[1]], np.int64), np.array([[[1] + [0] * (shape[0] - 1)]], np.int64)
    ids = [(7 * i + 3) % reference.vocab_size for i in range(12)] + [reference.image_token_id] + [(5 * i + 11) % reference.vocab_size for i in range(20)]
    ids = [t if t != reference.image_token_id or i == 12 else 0 for i, t in enumerate(ids)]
    expected = reference.logits(ids, reference.encode_image(pixels, ratio_ids, ratio_mask))
    got = candidate.logits(ids, candidate.encode_image(pixels, ratio_ids, ratio_mask))
    figures = compare_logits(expected, got)
    return {
        "tokens": len(ids), "finite": bool(np.isfinite(got).all()), "max_abs_diff": {"logits": figures.get("max_abs_logit_error")},
        "logits": figures, "reference": "the fp32 graphs (within 1e-6 of torch), a synthetic one-tile image and 32 tokens around the image token",
    }
