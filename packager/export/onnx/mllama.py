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
The graphs are traced from a model that holds no weights and written one weight at a time
(mllama_trace.py, pending.py), and the torch reference streams its layers from the safetensors when
the model is large (runtimes/torch_offload.py), so Llama 3.2 11B Vision (43 GB in float32) exports
within a few GB (issue #12). Each graph's weights go into ``<graph>.onnx.data`` beside it.

``xpack export --format onnx`` of an mllama checkpoint (:func:`export_mllama_artifact`) merges the
adapter into the whole checkpoint first (it reaches the vision layers too), checks the float32
graphs against torch where they are small enough to run, and below 32 bits writes the decoder and
cross K/V graphs at ``--bits`` and the vision graph at 8 bits (at ``--bits 16`` all three in fp16, the ops and
nodes of the table's ``fp16_keep_fp32`` in float32), checked against torch; a large fp16 artifact's check casts its
weights a node at a time (onnx_base.session_options' ``cast_per_node``)."""


from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from xpack.errors import XpackError
from xpack.packager.archs import require_arch
from xpack.packager.archs.onnx_spec import OnnxSpec
from xpack.packager.export.onnx.common import DEFAULT_OPSET, VISION_COMPANIONS, OnnxExport, decoder_io, first_line, quiet, read_config, require_libraries
from xpack.packager.export.onnx.decoder_graph import _Weights
from xpack.packager.export.onnx.mllama_modules import wrap_mllama
from xpack.packager.export.onnx.mllama_stitch import layer_templates, stitch, stubbed_layers
from xpack.packager.export.onnx.mllama_trace import parameter_names, to_placeholders, traced_graph, weightless_model
from xpack.packager.export.onnx.pending import DataFile, PendingWeights, save_graph
from xpack.packager.export.onnx.precision import SCHEMES, VISION_DTYPE, VISION_INT8_BLOCK_SIZE, quantize_graph, weight_node_types
from xpack.packager.export.onnx.quantize import quantize_matmuls
from xpack.packager.export.onnx.torch_check import load_torch, prepacking_note
from xpack.packager.io.atomic import atomic_dir
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.merge.lora import Adapter
from xpack.packager.merge.stream import MergeSettings, run_merge
from xpack.packager.verify.parity import compare_logits
from xpack.paths import temp_dir
from xpack.runtimes.artifacts import MLLAMA_CROSS_KV_FILE, MLLAMA_DECODER_FILE, MLLAMA_FORMAT, MLLAMA_META_FILE, VISION_FILE
from xpack.runtimes.onnx_mllama import MllamaOnnx, cross_attention_masks
from xpack.runtimes.torch_offload import chunk_vision_attention, return_freed_memory

__all__ = ["export_mllama", "export_mllama_artifact", "load_mllama"]

FORMAT_VERSION = 1
# Export gate: max |logit error| of the graphs against torch, relative to the logits' scale
# (tolerance = LOGIT_RTOL * max(1, max |torch logit|)). Measured on the twin: <= 2.4e-7 (see the tests).
LOGIT_RTOL = 1e-3
# What --bits 16 makes of all three graphs (the table's fp16_keep_fp32 says which ops and nodes stay float32).
FP16_DTYPE = "float16 weights and activations; softmax, tanh gates and norms in float32; float32 inputs/outputs"
# The torch wrappers against transformers, before exporting (same rule; measured on the twin: <= 1.2e-7).
WRAPPER_RTOL = 1e-4
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
# the torch reference


def _read_config(model_dir: Path) -> dict:
    config = read_config(model_dir, "Llama 3.2 Vision (mllama)")
    if config.get("model_type") != "mllama":
        raise XpackError(f"{model_dir} is a {config.get('model_type', 'unknown')!r} checkpoint, not Llama 3.2 Vision (mllama); use the plain ONNX export for it")
    return config


def _spec(model_dir: Path) -> OnnxSpec:
    spec = require_arch(_read_config(model_dir), "ONNX export").onnx
    if spec is None:
        raise XpackError(f"{model_dir}: the mllama architecture table has no onnx section")
    return spec


def load_mllama(model_dir: "str | Path", lean: bool = False):
    """``MllamaForConditionalGeneration`` in fp32, eager attention, eval mode (the reference the export is checked
    against); ``lean``: its repeated layers stream from the safetensors when the model is large (torch_check.load_torch)."""
    model_dir = Path(model_dir)
    return load_torch(model_dir, _spec(model_dir), lean=lean)


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


def _check_wrappers(model, wraps: dict, layout: dict, case: dict) -> tuple[float, float]:
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


@dataclass
class _Reference:
    """transformers' logits on the check's case, computed before any graph is built (the model let go since)."""

    case: dict
    image_logits: "object"  # [S, vocab]: the prompt around <|image|>, with the image
    text_ids: list[int]
    text_logits: "object"  # [S - 1, vocab]: the same tokens without <|image|> and without the image
    figures: dict = field(default_factory=dict)


def _torch_reference(model_dir: Path) -> _Reference:
    """The torch model's logits on the check's case, with the image and text only. Its layers stream from the
    safetensors when the model is large (torch_check.load_torch's lean map); a model held whole also runs the export
    wrappers against transformers (a difference is a one-line error: an unsupported transformers version)."""
    import transformers

    start = time.perf_counter()
    model = load_mllama(model_dir, lean=True)
    streamed = getattr(model, "xpack_offload_folder", None) is not None
    layout = _layout(model)
    case = _validation_inputs(layout)
    if streamed:  # its vision tower attends one head at a time: the same numbers, 165 MB of scores instead of 2.6 GB at 11B
        chunk_vision_attention(model)
    image = _hf_logits(model, case["input_ids"], case, case["num_tiles"])
    text_ids = [t for t in case["input_ids"] if t != layout["image_token_id"]]
    text = _hf_logits(model, text_ids, None)
    figures: dict = {"torch_layers_streamed": streamed}
    if not streamed:
        wrapper_diff, scale = _check_wrappers(model, wrap_mllama(model), layout, case)
        tolerance = WRAPPER_RTOL * max(1.0, scale)
        if not wrapper_diff <= tolerance:
            raise XpackError(
                f"the mllama export wrapper differs from transformers {transformers.__version__} by {wrapper_diff:.3g} in the logits "
                f"(tolerance {tolerance:.3g}); this transformers version is not supported, use 4.57"
            )
        figures["wrapper_max_abs_diff"] = wrapper_diff
    del model
    return_freed_memory()
    figures["torch_s"] = round(time.perf_counter() - start, 2)
    return _Reference(case, image, text_ids, text, figures)


# ---------------------------------------------------------------------------------------------
# the graphs


def _trace_all(model_dir: Path, pending: PendingWeights, work: Path, opset: int) -> tuple[dict, dict]:
    """The three graphs of ``model_dir`` with placeholder weights (mllama_trace.py): ({file: graph}, the meta file's facts)."""
    import onnx
    import torch
    import transformers

    model = weightless_model(model_dir)
    layout = _layout(model)
    wraps = wrap_mllama(model)
    case = _validation_inputs(layout)
    weights = _Weights(model_dir)
    pending.on_close(weights.close)
    names = _io_names(layout)
    kvh, hd = layout["num_key_value_heads"], layout["head_dim"]
    graphs: dict = {}

    def trace(key: str, file: str, args, inputs, outputs, axes, shapes, stitched: bool = False) -> None:
        """``stitched``: each vision encoder layer a stand-in node in the trace, then one traced layer per kind put in
        its place (mllama_stitch.py: the tracer would keep every layer's intermediates alive)."""
        names = parameter_names(wraps[key], model)
        try:
            with stubbed_layers(model) if stitched else contextlib.nullcontext() as seen:
                graph = traced_graph(wraps[key], args, work / f".trace-{key}", inputs, outputs, axes, opset, shapes)
            if stitched:
                names.update(stitch(graph, layer_templates(model, seen, lambda *a: traced_graph(*a, opset), work)))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise XpackError(f"torch.onnx could not export the mllama {key} graph ({first_line(exc)})") from None
        to_placeholders(graph, names, weights, pending)
        graphs[file] = graph

    vision_in = ["pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"]
    trace("vision", VISION_FILE, tuple(case[n] for n in vision_in), vision_in, ["cross_attention_states"],
          {n: {0: "batch"} for n in vision_in + ["cross_attention_states"]},
          {"cross_attention_states": ("batch", layout["max_num_tiles"] * layout["tokens_per_tile"], layout["hidden_size"])},
          stitched=True)
    # cross keys/values: traced on stand-in states of the real shape (the trace does not depend on their values)
    vision_tokens = layout["max_num_tiles"] * layout["tokens_per_tile"]
    states = torch.zeros((1, vision_tokens, layout["hidden_size"]))
    with torch.no_grad():
        cross = tuple(wraps["cross_kv"](states))
    kv_axes = {0: "batch", 2: "vision_tokens"}
    trace("cross_kv", MLLAMA_CROSS_KV_FILE, (states,), ["cross_attention_states"], names["cross"],
          {"cross_attention_states": {0: "batch", 1: "vision_tokens"}, **{n: kv_axes for n in names["cross"]}},
          {n: ("batch", kvh, "vision_tokens", hd) for n in names["cross"]})
    # decoder: traced with a non-empty past and several new tokens, so that no size is taken for a constant
    past_len, seq = 3, 4
    gen = torch.Generator().manual_seed(1)
    past = tuple(torch.randn((1, kvh, past_len, hd), generator=gen) for _ in names["past"])
    ids = torch.tensor([case["input_ids"][past_len : past_len + seq]])
    decoder_args = (ids, torch.ones((1, past_len + seq), dtype=torch.long), torch.arange(past_len, past_len + seq)[None],
                    torch.zeros((1, 1, seq, vision_tokens)), torch.ones((1, 1, seq, 1)), past, cross)
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
    trace("decoder", MLLAMA_DECODER_FILE, decoder_args, decoder_in + names["past"] + names["cross"], ["logits"] + names["present"], axes,
          {"logits": ("batch", "sequence", layout["vocab_size"]), **{n: ("batch", kvh, "total_sequence", hd) for n in names["present"]}})
    meta = {
        "format": MLLAMA_FORMAT,
        "format_version": FORMAT_VERSION,
        "files": {"vision": VISION_FILE, "cross_kv": MLLAMA_CROSS_KV_FILE, "decoder": MLLAMA_DECODER_FILE},
        **layout,
        "eos_token_ids": _eos_ids(model),
        "bos_token_id": model.config.text_config.bos_token_id,
        "dtype": "float32",
        "opset": opset,
        "exporter": f"torch.onnx.export(dynamo=False, export_params=False) (TorchScript) of a weightless model, the weights written by xpack; "
                    f"torch {torch.__version__}, onnx {onnx.__version__}",
        "transformers": transformers.__version__,
    }
    return graphs, meta


def _write_graphs(graphs: dict, pending: PendingWeights, folder: Path, quantize=None) -> dict:
    """Each graph into ``folder`` as ``<file>`` + ``<file>.data``, its weights made and written one at a time;
    ``quantize(file, graph) -> (graph, account)`` first when given. Returns the accounts by file."""
    accounts = {}
    for file, graph in list(graphs.items()):
        opset = {o.domain: o.version for o in graph.opset_import}.get("", None)
        with DataFile(folder, f"{file}.data") as out:
            pending.out = out
            if quantize is not None:
                graph, accounts[file] = quantize(file, graph)
                for o in graph.opset_import:  # the quantizer raises the opset; the traced graph's ops (ReduceMean axes) are of its own
                    if o.domain in ("", "ai.onnx") and opset is not None:
                        o.version = opset
            pending.write_all(graph)
        pending.out = None
        save_graph(graph, folder / file)
    return accounts


def _write_meta(folder: Path, meta: dict, source: Path) -> None:
    """``mllama_onnx.json`` and the checkpoint's tokenizer, processor and generation files."""
    for name in COMPANIONS:
        if (source / name).is_file() and not (folder / name).exists():
            shutil.copy2(source / name, folder / name)
    (folder / MLLAMA_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# the checks


def _run_graphs(folder: Path, reference: _Reference, prepack: bool = True, cast_per_node: bool = False) -> tuple:
    """The graphs of ``folder`` through the runtime's pipeline on the reference's case: (prefill, step, text) logits;
    ``prepack=False``: onnxruntime reads the weights from the mapped data files, ``cast_per_node``: casts each fp16 weight
    as its node runs (onnx_base.session_options)."""
    case = reference.case
    pipe = MllamaOnnx(folder, prepack=prepack, cast_per_node=cast_per_node)
    ids = case["input_ids"]
    n = len(ids) - 1
    image = pipe.encode_image(case["pixel_values"].numpy(), case["aspect_ratio_ids"].numpy(), case["aspect_ratio_mask"].numpy())
    cmask, rmask = pipe.masks(ids, image)
    prefill, past = pipe.run(ids[:n], pipe.empty_past(), image.cross_kv, cmask[:, :, :n], rmask[:, :, :n], 0)
    step, _ = pipe.run(ids[n:], past, image.cross_kv, cmask[:, :, n:], rmask[:, :, n:], n)
    del image, past
    text = pipe.logits(reference.text_ids)
    return prefill, step, text


def _validate(folder: Path, reference: _Reference, atol: float | None = None) -> dict:
    """The float32 graphs against torch: a prefill with the image, one cached decoding step, text only; beyond the
    tolerance a one-line error."""
    import numpy as np

    prefill, step, text = _run_graphs(folder, reference)
    ref, n = reference.image_logits, len(reference.case["input_ids"]) - 1
    scale = float(max(np.abs(ref).max(), np.abs(reference.text_logits).max()))
    figures = {
        "prefill_max_abs_diff": float(np.abs(prefill - ref[:n]).max()),
        "decode_step_max_abs_diff": float(np.abs(step - ref[n:]).max()),
        "text_only_max_abs_diff": float(np.abs(text - reference.text_logits).max()),
        "prefill_top1_agreement": float((prefill.argmax(-1) == ref[:n].argmax(-1)).mean()),
        "logit_scale": scale,
        "prefill_tokens": n,
        "image_tiles": reference.case["num_tiles"],
        **reference.figures,
    }
    tolerance = float(atol if atol is not None else LOGIT_RTOL * max(1.0, scale))
    worst = max(figures["prefill_max_abs_diff"], figures["decode_step_max_abs_diff"], figures["text_only_max_abs_diff"])
    figures.update(atol=tolerance, passed=worst <= tolerance)
    if not worst <= tolerance:
        raise XpackError(f"the exported mllama graphs differ from torch by {worst:.3g} in the logits (tolerance {tolerance:.3g}); nothing was written")
    return figures


def _artifact_check(folder: Path, reference: _Reference, bits: int, prepack: bool = True, cast_per_node: bool = False) -> dict:
    """The graphs at ``bits`` against torch on the same case (KL, top-1, max logit error); non-finite logits refuse.
    ``prepack=False`` (a large model): the weights stay in the artifact's mapped files instead of private copies;
    ``cast_per_node`` (a large fp16 model): onnxruntime casts each fp16 weight as its node runs (onnx_base.session_options)."""
    import numpy as np

    prefill, step, text = _run_graphs(folder, reference, prepack, cast_per_node)
    got = np.concatenate([prefill, step, text])
    if not np.isfinite(got).all():
        raise XpackError(f"the {bits}-bit mllama graphs give non-finite logits; export with --bits 32")
    expected = np.concatenate([reference.image_logits, reference.text_logits])
    figures = compare_logits(expected, got)
    return {
        "tokens": int(len(got)), "finite": True, "max_abs_diff": {"logits": figures.get("max_abs_logit_error")}, "logits": figures,
        "reference": "transformers fp32 (eager attention): a synthetic image, a prefill around <|image|> + one cached step, and the text alone",
        **prepacking_note(prepack, cast_per_node),
    }


def _export_check(figures: dict) -> dict:
    """The float32 graphs' figures (prefill with an image, one cached step, text only) as the manifest's export check."""
    worst = max(figures.get(k, 0.0) for k in ("prefill_max_abs_diff", "decode_step_max_abs_diff", "text_only_max_abs_diff"))
    return {
        "tokens": figures.get("prefill_tokens", 0) + 1, "atol": figures.get("atol"), "rtol": 0.0, "within_tolerance": bool(figures.get("passed")),
        "finite": True, "max_abs_diff": {"logits": worst, "present (max over layers)": None},
        "figures": figures, "reference": "transformers fp32 (eager attention): prefill with an image, one cached step, text only",
    }


def _eos_ids(model) -> list[int]:
    ids: list[int] = []
    for source in (model.generation_config.eos_token_id, model.config.text_config.eos_token_id):
        for value in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(value, int) and value not in ids:
                ids.append(value)
    return ids


# ---------------------------------------------------------------------------------------------
# entry points


def export_mllama(model_dir: "str | Path", out_dir: "str | Path", *, opset: int | None = None, force: bool = False, atol: float | None = None) -> dict:
    """Export a Llama 3.2 Vision checkpoint (merge an adapter first) to ``vision.onnx``, ``cross_kv.onnx``, ``decoder.onnx``
    in float32.

    ``out_dir`` gets the three graphs (weights in ``<graph>.data``), ``mllama_onnx.json`` (layout, files, figures) and
    the checkpoint's tokenizer, processor and generation files; it is written atomically (refused if it exists, unless
    ``force``). Returns the metadata written to ``mllama_onnx.json``; its ``validation`` holds the max |logit
    difference| against torch of a prefill with an image, of one cached decoding step and of a text-only prefill.
    Raises :class:`XpackError` when one is above ``atol`` (default: ``LOGIT_RTOL * max(1, max |torch logit|)``).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    require_libraries("the mllama ONNX export", ("torch", "transformers", "onnx", "onnxruntime", "numpy"))
    _read_config(model_dir)
    started = time.perf_counter()
    with atomic_dir(out_dir, force=force) as tmp:
        pending = PendingWeights()
        try:
            graphs, meta = _trace_all(model_dir, pending, tmp, int(opset or DEFAULT_OPSET))  # before the reference: see export_mllama_artifact
            return_freed_memory()
            reference = _torch_reference(model_dir)
            _write_graphs(graphs, pending, tmp)
        finally:
            pending.close()
        meta["source"] = str(model_dir)
        _write_meta(tmp, meta, model_dir)
        meta["validation"] = _validate(tmp, reference, atol)
        meta["seconds"] = round(time.perf_counter() - started, 2)
        _write_meta(tmp, meta, model_dir)
    return meta


def export_mllama_artifact(
    ckpt: Checkpoint, adapters: list[Adapter], tmp_out: Path, bits: int, spec: OnnxSpec, block_size: int, keep_lm_head: bool, int4: str,
    merge: MergeSettings, check_fp32: bool = True,
) -> OnnxExport:
    """The three graphs of ``ckpt`` (adapters merged first, as ``merge`` says) at ``bits`` in ``tmp_out``, and the export's
    account. ``check_fp32``: below 32 bits, also write the float32 graphs and check them against torch (the pipeline
    turns it off for a model whose float32 graphs onnxruntime could not hold); the artifact is checked either way, from
    its mapped files without ``check_fp32`` (onnx_base.session_options' ``prepack``)."""
    if bits not in spec.bits:
        raise XpackError(f"--bits {bits} is not available for Llama 3.2 Vision (mllama) ONNX; use --bits {', '.join(str(b) for b in spec.bits)}")
    result = OnnxExport(arch="mllama", graph="xpack-mllama", onnx_file=MLLAMA_DECODER_FILE, data_file=f"{MLLAMA_DECODER_FILE}.data",
                        exported_class="MllamaForConditionalGeneration")
    clock = time.perf_counter()
    with temp_dir("onnx", dir=tmp_out.parent) as work_dir, quiet():
        work = Path(work_dir)
        source = ckpt.path
        if adapters:  # the adapter reaches the vision layers too: merge the whole checkpoint first
            (work / "merged").mkdir()
            result.notes += list(run_merge(ckpt, adapters, work / "merged", merge).plan.notes)
            source = work / "merged"
        result.timings["prepare_s"] = round(time.perf_counter() - clock, 2)
        pending = PendingWeights()
        try:
            # the graphs first, in a process the torch reference has not run in yet: traced after it, the decoder's
            # trace of Llama 3.2 11B Vision climbed past 6 GB at its end, where it takes 2.9 GB traced first (issue #12)
            start = time.perf_counter()
            graphs, meta = _trace_all(source, pending, work, spec.opset or DEFAULT_OPSET)
            meta["source"] = ckpt.path.name
            result.timings["graph_s"] = round(time.perf_counter() - start, 2)
            return_freed_memory()
            reference = _torch_reference(source)
            result.timings["torch_check_s"] = reference.figures["torch_s"]
            if bits == 32 or check_fp32:
                fp32 = tmp_out if bits == 32 else work / "fp32"
                fp32.mkdir(exist_ok=True)
                _write_graphs(graphs if bits == 32 else copy.deepcopy(graphs), pending, fp32)  # placeholders: no weights are copied
                _write_meta(fp32, meta, source)
                meta["validation"] = _validate(fp32, reference)
                result.validation["export"] = _export_check(meta["validation"])
            else:
                result.validation["export"] = {
                    "skipped": "the float32 graphs are not written: the export streams one weight at a time and checks the artifact against torch "
                               "(above pipeline.py FP32_CHECK_BYTES)",
                }
            if bits != 32:
                start = time.perf_counter()
                meta["dtype"] = FP16_DTYPE if bits == 16 else f"{bits}-bit weights (MatMulNBits), vision 8-bit"

                def quantize(file: str, graph):
                    if file == VISION_FILE and bits != 16:  # round to nearest: onnxruntime's MatMulNBitsQuantizer's bytes (quantize.py)
                        graph, _ = quantize_matmuls(graph, 8, VISION_INT8_BLOCK_SIZE, search=False, share_embedding=False, tensors=pending)
                        return graph, {"bits": 8, "node_types": weight_node_types(graph)}
                    return quantize_graph(graph, bits, block_size, keep_lm_head, spec, int4, tensors=pending)

                accounts = _write_graphs(graphs, pending, tmp_out, quantize)
                result.timings["quantize_s"] = round(time.perf_counter() - start, 2)
        finally:
            pending.close()
        del graphs
        _write_meta(tmp_out, meta, source)
        if bits != 32:
            start = time.perf_counter()
            # a large fp16 artifact: its weights cast a node at a time, not all folded into float32 copies at load
            result.validation["artifact"] = _artifact_check(tmp_out, reference, bits, prepack=check_fp32, cast_per_node=bits == 16 and not check_fp32)
            result.timings["artifact_check_s"] = round(time.perf_counter() - start, 2)
            result.quantization = {**accounts[MLLAMA_DECODER_FILE], "graphs": {f: a.get("node_types") or {} for f, a in accounts.items()},
                                   "vision": FP16_DTYPE if bits == 16 else "int8 weight-only (MatMulNBits bits=8)"}
    result.validation.setdefault("artifact", {"same_as": "export"})
    graphs_types = (result.quantization or {}).get("graphs", {})
    files = {"onnx_file": VISION_FILE, "data_file": f"{VISION_FILE}.data",
             "cross_kv_file": MLLAMA_CROSS_KV_FILE, "cross_kv_data_file": f"{MLLAMA_CROSS_KV_FILE}.data"}
    result.vision = {**files, "files": list(files.values()), "precision": VISION_DTYPE[bits],
                     "node_types": graphs_types.get(VISION_FILE, {}), "cross_kv_node_types": graphs_types.get(MLLAMA_CROSS_KV_FILE, {})}
    result.quantization = result.quantization or {"bits": 32, "scheme": SCHEMES[32], "node_types": {}}
    result.io = decoder_io(tmp_out / MLLAMA_DECODER_FILE)
    result.opset = int(result.io["opset"].get("ai.onnx", 0))
    result.timings["total_s"] = round(time.perf_counter() - clock, 2)
    return result
