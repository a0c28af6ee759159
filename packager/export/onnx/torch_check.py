"""The check of an exported decoder against the torch model: a fixed input run as a prefill and one
decode step with the cache, in transformers and in onnxruntime, compared as optimum's
``validate_model_outputs`` does (``np.allclose`` per output with the config's atol), with the
figures kept for the manifest."""

from __future__ import annotations

from pathlib import Path

from xpack.errors import XpackError
from xpack.packager.archs.onnx_spec import OnnxSpec
from xpack.packager.export.onnx.common import first_line
from xpack.packager.verify.parity import compare_logits
from xpack.paths import temp_dir
from xpack.runtimes.heap import map_large_allocations
from xpack.runtimes.onnx_base import open_session, session_options
from xpack.runtimes.onnx_decoder import attention_bias
from xpack.runtimes.torch_offload import concrete_class, lean_device_map, stored_tables, with_stored_tables

VALIDATION_TEXT = "FINDINGS: The lungs are clear. No pleural effusion or pneumothorax. IMPRESSION: No acute abnormality."
CPU = ("CPUExecutionProvider",)


def load_torch(src: Path, spec: OnnxSpec, lean: bool = False):
    """The checkpoint at ``src`` in transformers, float32, with the table's class and attention, in eval mode.
    ``lean``: the repeated layers stream from the safetensors files at each forward (runtimes/torch_offload.py's
    lean map) unless the whole model is at most twice what that holds, with the embedding and head held as the
    checkpoint stores them (16 bits) and computed in float32, so that the check of a 4B export holds its embedding
    (1.3 GB) and one layer, not 17 GB; the same float32 numbers, slower."""
    import logging
    import warnings

    import torch
    import transformers

    cls = getattr(transformers, spec.model_class)
    kwargs = {"dtype": torch.float32, "attn_implementation": spec.attn_implementation, "local_files_only": True}
    offload = None
    if lean:
        tables = stored_tables(src, torch.float32)
        device_map = lean_device_map(cls, src, torch.float32, tables)
        if device_map is not None:
            cls = cls if tables is None else with_stored_tables(concrete_class(cls, src), tables)
            map_large_allocations()
            logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)  # its "parameters on the meta device" is the plan
            offload = temp_dir("offload")  # safetensors sources are read in place
            kwargs.update(device_map=device_map, offload_folder=offload.name)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
            model = cls.from_pretrained(str(src), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        if offload is not None:
            offload.cleanup()
        raise XpackError(f"transformers could not load {src} for the ONNX export ({first_line(exc)})") from None
    model.xpack_offload_folder = offload  # removed with the model (what transformers could not read in place goes there)
    return model.eval()


def validation_ids(src: Path, vocab: int) -> list[int]:
    """The check's token ids: VALIDATION_TEXT through the checkpoint's tokenizer, or a fixed pattern without one."""
    from tokenizers import Tokenizer

    path = src / "tokenizer.json"
    if path.is_file():
        ids = Tokenizer.from_file(str(path)).encode(VALIDATION_TEXT).ids
        ids = [i for i in ids if i < vocab]
        if len(ids) >= 4:
            return ids[:48]
    return [(7 * i + 3) % vocab for i in range(24)]


def torch_steps(model, ids: list[int]) -> list[dict]:
    """Prefill ids[:-1], then decode ids[-1] with the cache: logits and the cache after each step, as numpy
    (copied at once: transformers updates the cache object in place)."""
    import torch

    def snapshot(out) -> dict:
        step = {"logits": out.logits[0].float().numpy().copy()}
        cache = out.past_key_values
        layers = getattr(cache, "layers", None)
        for i in range(len(layers) if layers is not None else len(cache)):
            k, v = (layers[i].keys, layers[i].values) if layers is not None else cache[i]
            step[f"present.{i}.key"] = k.float().numpy().copy()
            step[f"present.{i}.value"] = v.float().numpy().copy()
        return step

    with torch.no_grad():
        first = model(input_ids=torch.tensor([ids[:-1]]), use_cache=True)
        steps = [snapshot(first)]
        second = model(input_ids=torch.tensor([ids[-1:]]), past_key_values=first.past_key_values, use_cache=True)
        steps.append(snapshot(second))
    return steps


def ort_steps(path: Path, ids: list[int], threads: int, embed: Path | None = None, window: int | None = None, prepack: bool = True,
              cast_per_node: bool = False) -> list[dict]:
    """:func:`torch_steps` in onnxruntime on the decoder at ``path`` (its token embedding graph ``embed`` for a vision model);
    ``prepack=False``: the weights read from the mapped data file; ``cast_per_node``: an fp16 graph's weights cast to
    float32 one node at a time (onnx_base.session_options)."""
    import numpy as np

    options = session_options(threads, prepack=prepack, cast_per_node=cast_per_node)
    chunks = (ids[:-1], ids[-1:])
    embedded = None
    if embed:  # the embedding graph runs and is let go before the decoder loads: never both in memory
        embedder = open_session(embed, options, CPU)
        embedded = [embedder.run(None, {"input_ids": np.array([chunk], np.int64)})[0] for chunk in chunks]
        del embedder
    session = open_session(path, options, CPU)
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    np_types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    past = {n: np.zeros((1, i.shape[1], 0, i.shape[3]), np_types[i.type]) for n, i in inputs.items() if n.startswith("past_key_values.")}
    steps, start = [], 0
    for n, chunk in enumerate(chunks):
        first = {"inputs_embeds": embedded[n]} if embedded is not None else {"input_ids": np.array([chunk], np.int64)}
        feed = {**first, "attention_mask": np.ones((1, start + len(chunk)), np.int64), **past}
        if "attention_bias" in inputs:
            feed["attention_bias"] = attention_bias(start, len(chunk))
        if "attention_bias_sliding" in inputs:
            feed["attention_bias_sliding"] = attention_bias(start, len(chunk), window)
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(start, start + len(chunk), dtype=np.int64)[None]
        values = dict(zip(outputs, session.run(outputs, feed)))
        steps.append({k: v[0] if k == "logits" else v for k, v in values.items()})
        past = {k.replace("present.", "past_key_values."): v for k, v in values.items() if k.startswith("present.")}
        start += len(chunk)
    return steps


def prepacking_note(prepack: bool, cast_per_node: bool = False) -> dict:
    """What a check's manifest entry says about how onnxruntime held the weights (session_options' ``prepack`` and
    ``cast_per_node``)."""
    if cast_per_node:
        return {"onnxruntime_prepacking": False, "onnxruntime_graph_optimizations": False,
                "prepacking_note": "checked from the artifact's mapped files with onnxruntime's graph optimizations off (a large fp16 model): "
                                   "the CPU provider casts each fp16 weight to float32 as its node runs, where with optimizations on it "
                                   "would hold a float32 copy of every weight; the same kernels, unfused"}
    if prepack:
        return {"onnxruntime_prepacking": True}
    return {
        "onnxruntime_prepacking": False,
        "prepacking_note": "checked from the artifact's mapped files without onnxruntime's prepacking (a large model): MatMulNBits "
                           "dequantizes its weights and multiplies in float32 there, where `xpack run` prepacks them and may quantize "
                           "the activations to 8 bits (accuracy level); `xpack verify` measures the runtime's own path",
    }


def compare_steps(reference: list[dict], candidate: list[dict], atol: float, rtol: float = 1e-5) -> dict:
    """optimum's check (``np.allclose(ref, onnx, atol)`` per output) with its figures kept, plus logit parity."""
    import numpy as np

    max_diff: dict[str, float] = {}
    close = True
    finite = True
    for ref, got in zip(reference, candidate):
        for name, value in got.items():
            value = value.astype(np.float32)
            finite = finite and bool(np.isfinite(value).all())
            if name not in ref:
                continue
            expected = ref[name]
            if expected.ndim == 4 and value.ndim == 4 and expected.shape[2] < value.shape[2] and expected.shape[:2] + expected.shape[3:] == value.shape[:2] + value.shape[3:]:
                value = value[:, :, -expected.shape[2]:, :]  # a sliding-window layer: torch keeps only the last window
            if expected.shape != value.shape:
                continue
            diff = float(np.abs(expected - value).max()) if value.size else 0.0
            max_diff[name] = max(max_diff.get(name, 0.0), diff)
            close = close and bool(np.allclose(expected, value, atol=atol, rtol=rtol))
    ref_logits = np.concatenate([s["logits"] for s in reference])
    got_logits = np.concatenate([s["logits"].astype(np.float32) for s in candidate])
    parity = compare_logits(ref_logits, got_logits) if finite else {}
    kv = [v for k, v in max_diff.items() if k.startswith("present.")]
    return {
        "tokens": int(ref_logits.shape[0]),
        "atol": atol,
        "rtol": rtol,
        "within_tolerance": close and finite,
        "finite": finite,
        "max_abs_diff": {"logits": max_diff.get("logits"), "present (max over layers)": max(kv) if kv else None},
        "max_abs_diff_per_output": {k: float(f"{v:.3g}") for k, v in max_diff.items()},
        "logits": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in parity.items()},
    }
