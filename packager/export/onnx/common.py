"""What the ONNX export modules share: the export's account (:class:`OnnxExport`), onnxruntime's
quantizer setting, the opset of the traced graphs, the library and checkpoint checks, saving a graph
with its weights beside it, describing a saved graph, and a quiet terminal while optimum, torch.onnx,
transformers and onnxruntime's quantizer run (they log or warn at every step of an export)."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from xpack.errors import XpackError
from xpack.runtimes.artifacts import ONNX_DATA_FILE, ONNX_MODEL_FILE, PREPROCESSOR_CONFIG, PROCESSOR_CONFIG

if TYPE_CHECKING:  # pragma: no cover
    import onnx

# accuracy_level of MatMulNBits: 4 = the activations are quantized to int8 per block inside the kernel.
# Without it, onnxruntime 1.32's CPU kernel has no fast path for 8-bit weights (2.5 tok/s against
# 57 tok/s on the demo model) and its int4 path is 1.4x slower, for a KL difference of 0.003.
ACCURACY_LEVEL = 4
# Opset of the graphs traced with torch.onnx's TorchScript exporter (Gemma 3's vision tower, mllama's
# three graphs): 17 is the first with LayerNormalization.
DEFAULT_OPSET = 17
# Files a vision export needs beside the graphs: the image processor's settings and the processor's
# prompt layout (image tokens per image, begin/end-of-image tokens).
VISION_COMPANIONS = (PREPROCESSOR_CONFIG, PROCESSOR_CONFIG)
# Loggers lowered to ERROR for the duration ("root": the root logger, which onnxruntime's quantizer uses).
LOGGERS = ("optimum", "onnxruntime", "onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer", "torch.onnx", "root")
_ELEMENT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64"}  # onnx.TensorProto data types


@dataclass
class OnnxExport:
    """What an ONNX export wrote and measured: the files, the graph, the quantization, the checks against torch."""

    onnx_file: str = ONNX_MODEL_FILE
    data_file: str | None = ONNX_DATA_FILE
    embed_file: str | None = None
    embed_data_file: str | None = None
    vision: dict = field(default_factory=dict)
    graph: str = "xpack"
    graph_facts: dict = field(default_factory=dict)
    arch: str = ""
    exported_class: str = ""
    opset: int = 0
    quantization: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    io: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception, for a one-line XpackError."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def require_libraries(what: str, modules: Sequence[str]) -> None:
    """A one-line error naming the pip packages of ``modules`` that do not import."""
    missing = []
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            missing.append("pillow" if module == "PIL" else module.split(".")[0])
    if missing:
        raise XpackError(f"{what} needs {', '.join(missing)}; install them with `pip install 'xpack[pack]'`")


def read_config(model_dir: Path, kind: str) -> dict:
    """``config.json`` of the checkpoint folder ``model_dir`` (which should hold ``kind``); a missing or broken one is a one-line error."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise XpackError(f"{model_dir} has no config.json; pass a Hugging Face checkpoint folder of {kind}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XpackError(f"{path} is unreadable ({exc}); pass a Hugging Face checkpoint folder") from None
    if not isinstance(config, dict):
        raise XpackError(f"{path} is not a JSON object; pass a Hugging Face checkpoint folder")
    return config


def save_model(model: "onnx.ModelProto", folder: Path, name: str = ONNX_MODEL_FILE, data: str = ONNX_DATA_FILE) -> None:
    """The graph as ``name`` and every weight in ``data`` beside it, whatever the model's size."""
    import onnx

    onnx.save_model(
        model, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data, size_threshold=0, convert_attribute=False,
    )


def graph_io(path: Path) -> dict:
    """A saved graph's inputs and outputs (shape, dtype), opsets and node counts by type, read without its weights."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def describe(v) -> dict:
        t = v.type.tensor_type
        return {"shape": [d.dim_param or d.dim_value for d in t.shape.dim], "dtype": _ELEMENT_TYPES.get(t.elem_type, str(t.elem_type))}

    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {
        "inputs": {i.name: describe(i) for i in m.graph.input},
        "outputs": {o.name: describe(o) for o in m.graph.output},
        "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
        "node_types": dict(sorted(ops.items())),
    }


def decoder_io(path: Path) -> dict:
    """Inputs, outputs, KV-cache layout and opset of an exported decoder (from the graph, not the config)."""
    io = graph_io(path)
    inputs, outputs = io["inputs"], io["outputs"]
    past = sorted((n for n in inputs if n.startswith("past_key_values.")), key=lambda n: (int(n.split(".")[1]), n))
    first = inputs[past[0]] if past else {"shape": [None, None, None, None], "dtype": None}
    return {
        "inputs": list(inputs),
        "outputs": list(outputs),
        "position_ids": "position_ids" in inputs,
        "layers": len(past) // 2,
        "kv_heads": first["shape"][1],
        "head_dim": first["shape"][3],
        "kv_dtype": first["dtype"],
        "vocab": outputs.get("logits", {}).get("shape", [None, None, None])[-1],
        "opset": io["opset"],
    }


@contextlib.contextmanager
def quiet(names: tuple[str, ...] = LOGGERS):
    """Python warnings off, the named loggers and transformers' verbosity at ERROR; restored on exit."""
    from transformers.utils import logging as hf_logging

    try:
        from optimum.utils import logging as optimum_logging

        optimum_logging.get_logger()  # optimum sets its logger's level when first asked for it: before ours, not after
    except ImportError:  # xpack's own graphs need no optimum
        pass
    loggers = {n: logging.getLogger(None if n == "root" else n) for n in names}
    saved = {n: lg.level for n, lg in loggers.items()}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    for lg in loggers.values():
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        for n, lg in loggers.items():
            lg.setLevel(saved[n])
