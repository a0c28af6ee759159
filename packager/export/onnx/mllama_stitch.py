"""Llama 3.2 Vision's vision graph with each encoder layer traced once per kind and repeated (issue #12).

torch.onnx's TorchScript tracer keeps every intermediate tensor of a trace alive until the trace ends. The vision
tower of Llama 3.2 11B Vision runs 40 encoder layers (32 local, 8 gated global) on 4 tiles of 1601 patches, and each
layer leaves about 265 MB behind (measured: 11.3 GB private for the whole tower, 3.4 GB for 10 layers), which is what
kept the 11B export from a 6 GB box. So the tower is traced with each encoder layer standing in as one node
``xpack.stitch::VisionLayer(hidden, mask)`` (:func:`stubbed_layers`: a view of its input, no memory), one layer of
each kind is traced on its own (:func:`layer_templates`: one layer's intermediates, about 265 MB), and
:func:`stitch` puts a renamed copy of its kind's template in place of each stand-in node, its parameters named after
that layer's weights. The graph computes what the whole trace computed, node for node; the export's check against
transformers (mllama.py ``_validate`` and ``_artifact_check``) covers it.

Why not ONNX local functions (one FunctionProto called 40 times): onnxruntime inlines them when it loads the graph,
and quantize.py's MatMulNBits rewrite works on the main graph's MatMul nodes and their initializers, which a
function's body would hide.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from xpack.errors import XpackError

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["DOMAIN", "LayerTemplate", "stubbed_layers", "layer_templates", "stitch"]

DOMAIN = "xpack.stitch"
OP = "VisionLayer"
# The encoder stacks of MllamaVisionModel whose layers are stand-ins in the trace: (attribute, kind). The kinds
# differ in their graph: the global layers are gated (tanh(gate) * attention, tanh(gate) * MLP).
STACKS = (("transformer", "local"), ("global_transformer", "global"))


@dataclass
class _Seen:
    """What the stand-ins saw during the trace: the input shapes of each kind's first call, and the layers' prefixes."""

    shapes: dict = field(default_factory=dict)  # kind -> (hidden shape, mask shape)
    prefixes: dict = field(default_factory=dict)  # kind -> [model prefix of each layer]


def _layer_node_class():
    import torch

    class _LayerNode(torch.autograd.Function):
        """One encoder layer as a single node of the trace; its forward hands its input on as a view (the trace only
        needs the shape, which a layer keeps)."""

        @staticmethod
        def forward(ctx, hidden, mask, prefix: str, kind: str):  # noqa: ARG004
            return hidden.view_as(hidden)

        @staticmethod
        def symbolic(g, hidden, mask, prefix: str, kind: str):
            out = g.op(f"{DOMAIN}::{OP}", hidden, mask, prefix_s=prefix, kind_s=kind)
            out.setType(hidden.type())
            return out

    return _LayerNode


@contextlib.contextmanager
def stubbed_layers(model):
    """For the trace of the vision graph: each encoder layer of ``model`` (MllamaForConditionalGeneration) answers as
    one ``VisionLayer`` node. Yields a :class:`_Seen` filled as the layers are called; restores the layers after."""
    node = _layer_node_class()
    seen = _Seen()
    vision = model.model.vision_model
    module_names = {id(m): name for name, m in model.named_modules()}
    patched = []
    for attr, kind in STACKS:
        for layer in getattr(vision, attr).layers:
            prefix = module_names[id(layer)]
            seen.prefixes.setdefault(kind, []).append(prefix)

            def forward(hidden_state, attention_mask=None, _prefix=prefix, _kind=kind):
                if attention_mask is None:
                    raise XpackError("the mllama vision layers were called without an attention mask; this transformers version is not supported, use 4.57")
                seen.shapes.setdefault(_kind, (tuple(hidden_state.shape), tuple(attention_mask.shape)))
                return node.apply(hidden_state, attention_mask, _prefix, _kind)

            layer.forward = forward
            patched.append(layer)
    try:
        yield seen
    finally:
        for layer in patched:
            del layer.forward  # the instance attribute goes; the class's forward answers again


@dataclass
class LayerTemplate:
    """One traced encoder layer: its graph (inputs ``hidden_state``, ``attention_mask`` and its parameters), and each
    parameter input -> its name relative to the layer (``self_attn.q_proj.weight``)."""

    graph: "onnx.ModelProto"
    params: dict[str, str]


def layer_templates(model, seen: _Seen, trace, work: Path) -> dict[str, LayerTemplate]:
    """The first layer of each kind that the stand-ins saw, traced on zeros of the shapes they saw. ``trace(module,
    args, scratch, inputs, outputs, axes)`` is mllama_trace.traced_graph with the opset bound."""
    import torch
    from torch import nn

    class _One(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, hidden_state, attention_mask):
            return self.layer(hidden_state=hidden_state, attention_mask=attention_mask)

    templates = {}
    for kind, (hidden_shape, mask_shape) in seen.shapes.items():
        prefix = seen.prefixes[kind][0]
        wrapper = _One(model.get_submodule(prefix)).eval()
        args = (torch.zeros(hidden_shape), torch.zeros(mask_shape))
        axes = {"hidden_state": {0: "batch"}, "attention_mask": {0: "batch"}, "layer_output": {0: "batch"}}
        graph = trace(wrapper, args, work / f".trace-vision-{kind}-layer", ["hidden_state", "attention_mask"], ["layer_output"], axes)
        params = {name: name.removeprefix("layer.") for name, _ in wrapper.named_parameters()}
        templates[kind] = LayerTemplate(graph, params)
    return templates


def stitch(model: "onnx.ModelProto", templates: dict[str, LayerTemplate]) -> dict[str, str]:
    """Each ``VisionLayer`` node of ``model`` replaced by its kind's template, every name inside the copy prefixed with
    the layer's, its parameters added as graph inputs named after the layer's weights. Returns {input: checkpoint name}
    of the inputs it added (mllama_trace.to_placeholders turns them into placeholders)."""
    import onnx

    graph = model.graph
    known = {i.name for i in graph.input}
    added: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: a.s.decode() for a in node.attribute}
        template = templates.get(attrs.get("kind", ""))
        if template is None:
            raise XpackError(f"the mllama vision trace has a layer of kind {attrs.get('kind')!r} with no template; this transformers version is not supported, use 4.57")
        prefix = attrs["prefix"]
        body = template.graph.graph
        data_inputs = [i.name for i in body.input if i.name not in template.params]
        rename = {data_inputs[0]: node.input[0], data_inputs[1]: node.input[1], body.output[0].name: node.output[0]}
        for inp in body.input:
            if inp.name in template.params:
                full = f"{prefix}.{template.params[inp.name]}"
                rename[inp.name] = full
                if full not in known:
                    known.add(full)
                    copy = onnx.ValueInfoProto()
                    copy.CopyFrom(inp)
                    copy.name = full
                    graph.input.append(copy)
                    added[full] = full
        for init in body.initializer:  # constants the tracer kept as initializers (small): one copy per layer
            copy = onnx.TensorProto()
            copy.CopyFrom(init)
            copy.name = rename.setdefault(init.name, f"/{prefix}{init.name if init.name.startswith('/') else '/' + init.name}")
            graph.initializer.append(copy)
        for inner in body.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in inner.attribute):
                raise XpackError(f"the traced mllama vision layer has a subgraph ({inner.op_type}); this transformers version is not supported, use 4.57")
            copy = onnx.NodeProto()
            copy.CopyFrom(inner)
            copy.name = f"/{prefix}{inner.name if inner.name.startswith('/') else '/' + inner.name}"
            copy.input[:] = [_renamed(x, prefix, rename) for x in inner.input]
            copy.output[:] = [_renamed(x, prefix, rename) for x in inner.output]
            nodes.append(copy)
    graph.ClearField("node")
    graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    model.ClearField("opset_import")
    model.opset_import.extend(kept)
    return added


def _renamed(name: str, prefix: str, rename: dict[str, str]) -> str:
    if not name:  # an optional input left out stays left out
        return name
    if name in rename:
        return rename[name]
    return f"/{prefix}{name if name.startswith('/') else '/' + name}"
