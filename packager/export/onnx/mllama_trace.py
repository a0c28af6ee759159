"""Llama 3.2 Vision's three graphs traced from a model that holds no weights, each weight a placeholder (issue #12).

The graphs are what torch.onnx's TorchScript exporter traces from the wrappers of mllama_modules.py (mllama.py says
what each takes and returns). Traced as before, the exporter needs the float32 model in memory and writes its weights
into the proto: 43 GB and more for Llama 3.2 11B Vision. Here the model is built from its config alone and every
parameter is a one-element tensor expanded to the parameter's shape (no memory behind it), so the trace computes on
real shapes with stand-in values, and ``export_params=False`` makes each parameter a graph input named for it instead
of an initializer. :func:`to_placeholders` then turns those inputs into pending.py's placeholders, whose recipes read
the checkpoint's tensors when the graph is written, one at a time: the linear layers' ``Transpose(W)`` becomes a
placeholder holding W transposed (the ``MatMul(x, W^T)`` that constant folding used to give, and that quantize.py
turns into MatMulNBits). Constant folding is off (a folded weight would lose its name); onnxruntime folds what is
left when it loads the graph.

Why stand-in values are distinct per parameter: the exporter merges parameters it finds equal into one input, which
would tie weights that the checkpoint keeps apart. Why not torch's own fake-tensor export (``torch.onnx.enable_fake_mode``):
it needs the dynamo exporter and its ``onnxscript``, which xpack does not depend on (mllama.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from xpack.errors import XpackError
from xpack.packager.export.onnx.common import first_line, quiet
from xpack.packager.export.onnx.decoder_graph import _Weights
from xpack.packager.export.onnx.pending import PendingWeights, Recipe
from xpack.runtimes.torch_offload import chunk_vision_attention

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["weightless_model", "parameter_names", "to_placeholders", "traced_graph"]


def weightless_model(folder: Path):
    """``MllamaForConditionalGeneration`` of the checkpoint's config, float32, eager attention, eval mode, with every
    parameter a distinct one-element tensor expanded to its shape; buffers (the rotary table) are real."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig, MllamaForConditionalGeneration

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with quiet(), init_empty_weights():
        model = MllamaForConditionalGeneration._from_config(config, attn_implementation="eager", dtype=torch.float32)
    for i, (name, param) in enumerate(list(model.named_parameters())):
        owner, _, attr = name.rpartition(".")
        stand_in = torch.full((1,), (i + 1) * 1e-4, dtype=torch.float32).expand(param.shape)
        setattr(model.get_submodule(owner), attr, torch.nn.Parameter(stand_in, requires_grad=False))
    chunk_vision_attention(model)  # the vision graph attends one head at a time (onnxruntime: 165 MB of scores, not 2.6 GB at 11B)
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise XpackError(f"{folder / 'generation_config.json'} could not be read ({first_line(exc)})") from None
    return model.eval()


def parameter_names(module, model) -> dict[str, str]:
    """Each parameter of ``module`` (a wrapper around ``model``'s modules) by the name the wrapper gives it -> the
    model's own name for it (transformers' canonical name, as archs/*.json's key_aliases make the checkpoint's)."""
    full = {id(p): name for name, p in model.named_parameters()}
    return {name: full[id(p)] for name, p in module.named_parameters()}


def traced_graph(module, args, scratch: Path, input_names, output_names, dynamic_axes, opset: int, output_shapes: dict | None = None) -> "onnx.ModelProto":
    """``module`` traced by torch.onnx's TorchScript exporter with its parameters as inputs (no weights in the proto)."""
    import onnx
    import torch

    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "graph.onnx"
    try:
        with quiet(), native_stderr_silenced(), torch.no_grad(), without_graph_shape_inference():
            torch.onnx.export(
                module, args, str(path), dynamo=False, export_params=False, do_constant_folding=False,
                input_names=list(input_names), output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=opset,
            )
        model = onnx.load(str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for output in model.graph.output:  # the tracer names derived sizes after its nodes ("Reshape..._dim_2"): state them
        for i, size in enumerate((output_shapes or {}).get(output.name, ())):
            dim = output.type.tensor_type.shape.dim[i]
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = int(size)
    return model


def to_placeholders(model: "onnx.ModelProto", names: dict[str, str], weights: _Weights, pending: PendingWeights) -> int:
    """Every parameter input of ``model`` (``names``: input -> checkpoint name) made an initializer placeholder whose
    recipe reads it from ``weights``; a parameter read only through ``Transpose(perm=[1, 0])`` (a linear layer's weight)
    is held transposed and the Transpose nodes dropped. Returns how many weights the graph holds."""
    graph = model.graph
    params = [i for i in graph.input if i.name in names]
    consumers: dict[str, list] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    for inp in params:
        source = names[inp.name]
        shape = tuple(weights.shape(source))
        used = consumers.get(inp.name, [])
        transposed = len(shape) == 2 and used and all(n.op_type == "Transpose" and _perm(n) == [1, 0] for n in used)
        if transposed:
            placeholder = pending.placeholder(source, shape[::-1], Recipe(_transposed(weights, source), source=source, transposed=True))
            for node in used:
                _rename_uses(graph, node.output[0], source)
                graph.node.remove(node)
        else:
            rows = (lambda a, z, s=source: weights.rows(s, a, z)) if len(shape) == 2 else None
            placeholder = pending.placeholder(source, shape, Recipe(_reader(weights, source), source=source, rows=rows))
            _rename_uses(graph, inp.name, source)
        graph.initializer.append(placeholder)
        graph.input.remove(inp)
    _name_layer_matmuls(graph)
    return len(params)


LANGUAGE_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.+)\.weight$")


def _name_layer_matmuls(graph) -> None:
    """The MatMul of each language-layer weight named ``/model/layers.N/<module path>/MatMul``, as optimum's and xpack's
    own decoder graphs name theirs. The tracer names a module called straight from the wrapper by itself
    (``/q_proj/MatMul_12``), which hid the layer from quantize.py's mixed int4 (its 8-bit self-attention and
    more_bits MLP layers, found by these names): every layer was 4-bit."""
    taken = {n.name for n in graph.node}
    for node in graph.node:
        m = LANGUAGE_LAYER.match(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if m is None:
            continue
        name = f"/model/layers.{m.group(1)}/{m.group(2).replace('.', '/')}/MatMul"
        if name not in taken:
            taken.add(name)
            node.name = name


@contextlib.contextmanager
def without_graph_shape_inference():
    """torch.onnx's TorchScript exporter without its last whole-graph pass, ONNX shape inference over the exported graph
    (``_jit_pass_onnx_graph_shape_type_inference``). That pass hands the parameters to ONNX as constant tensors, so
    every stand-in parameter, a one-element tensor expanded to its shape, is made whole in memory: Llama 3.2 11B
    Vision's decoder trace peaked at 7.4 GB with it and 3.4 GB without (issue #12). The pass only annotates the graph's
    intermediate shapes (each node's own inference during the export stays); the outputs' shapes are stated by
    :func:`traced_graph`, onnxruntime infers the rest when it loads the graph, and the export checks the graphs
    against transformers as before. torch has no switch for it on the public API (``_export``'s
    ``onnx_shape_inference``), hence the swap of the function torch.onnx looks up at call time."""
    import torch

    saved = torch._C._jit_pass_onnx_graph_shape_type_inference
    torch._C._jit_pass_onnx_graph_shape_type_inference = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = saved


@contextlib.contextmanager
def native_stderr_silenced():
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


def _perm(node) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _rename_uses(graph, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x == old:
                node.input[i] = new
    for out in graph.output:
        if out.name == old:
            raise XpackError(f"the traced mllama graph returns its weight {new} as an output; this transformers version is not supported, use 4.57")


def _reader(weights: _Weights, name: str):
    return lambda: weights.get(name)


def _transposed(weights: _Weights, name: str):
    import numpy as np

    return lambda: np.ascontiguousarray(weights.get(name).T)
