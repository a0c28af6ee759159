"""A float32 ONNX graph at the precision of ``--bits``: fp16 conversion, onnxruntime's 8-bit block
quantizer, xpack's 4-bit one (quantize.py), and the manifest's account of what became of each weight.

What onnxruntime gives us and we use: its weight-only block quantizer (``MatMulNBitsQuantizer``:
MatMul -> ``MatMulNBits``, embedding Gather -> ``GatherBlockQuantized``) for 8 bits, its operators for
4 bits (the weights written by quantize.py: searched scales, llama.cpp-style 8-bit layers) and its
fp16 converter (``onnxruntime.transformers.float16``, after onnxruntime's symbolic shape inference,
which knows the contrib ops).

What we do ourselves, and why:
- Tied embeddings: the exported output head is ``MatMul(x, Transpose(embed_tokens))``, which the
  quantizer skips (its weight is not an initializer). The head is materialized as its own
  initializer ``lm_head.weight`` before quantizing, so that it is quantized like every other MatMul.
- 8 bits: ``MatMulNBits`` with bits=8 (weight-only, per block along K, asymmetric, rounded to
  nearest byte for byte as onnxruntime's quantizer does) and accuracy_level 4 (activations quantized
  per block to int8 in the kernel, as llama.cpp's Q8_0 does). The weights are quantized by quantize.py
  rather than by onnxruntime's quantizer because it works one weight at a time on a graph whose weights
  are not in memory (pending.py, issue #12); a tied embedding reads the head's packed weight, an untied
  one becomes an 8-bit ``GatherBlockQuantized`` (onnxruntime's quantizer does 4-bit Gathers only).
- 16 bits between kept nodes: the fp16 converter types every float tensor fp16, so a tensor that one
  float32 node hands to another makes an fp32 -> fp16 -> fp32 round trip. Where the architecture table
  says so (``onnx.fp16_keep_fp32.between_kept_nodes``: Gemma 3, whose residual stream passes fp16's
  65504) those tensors stay float32 (``keep_fp32_between``): the norms and the residual adds they fuse
  run in float32, the MatMuls and the attention in fp16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from xpack.packager.archs.onnx_spec import OnnxSpec
from xpack.packager.export.onnx.common import ACCURACY_LEVEL
from xpack.packager.export.onnx.pending import is_pending
from xpack.packager.export.onnx.quantize import EIGHT_BIT_BLOCK_SIZE, InMemory, quantize_matmuls, quantize_tables

if TYPE_CHECKING:  # pragma: no cover
    import onnx

SCHEMES = {
    32: "fp32",
    16: "fp16 weights and activations; numerically sensitive ops kept in fp32 (see fp16_fp32_ops / fp16_fp32_nodes)",
    8: "int8 weight-only, block-wise asymmetric (MatMulNBits bits=8, int8 activations in the kernel); embedding GatherBlockQuantized 8-bit (a tied one reads the head's packed weight)",
    4: "int4 weight-only, block-wise asymmetric with searched scales (MatMulNBits bits=4, int8 activations in the kernel); 8 bits (blocks of 64) for the output head, the attention projections and the MLP of llama.cpp's use_more_bits layers, as Q4_K_M spends 6 bits there; a tied embedding reads the head's packed weight",
}
# The precision of a vision tower's graph at each --bits: 4-bit vision towers lose too much for too
# few bytes (the tower is ~10% of a 4B model), so they get 8 bits.
VISION_DTYPE = {32: "float32", 16: "float16", 8: "int8", 4: "int8"}
VISION_INT8_BLOCK_SIZE = 32


# ---------------------------------------------------------------------------------------------
# onnxruntime's converters


def to_fp16(model: "onnx.ModelProto", keep_ops: Iterable[str] = (), keep_nodes: Sequence[str] = ()) -> "onnx.ModelProto":
    """onnxruntime's fp16 conversion with float32 inputs/outputs (casts at the graph edges); the op types
    ``keep_ops`` (besides onnxruntime's own block list) and the nodes ``keep_nodes`` stay float32."""
    import contextlib
    from unittest import mock

    from onnx import helper
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    ops = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_ops))
    # the converter learns an initializer's shape by reading its data (numpy_helper.to_array); the shape is its dims,
    # and the weights of a streamed graph (pending.py) are placeholders with no data to read
    shape_from_dims = mock.patch.object(float16, "make_value_info_from_tensor",
                                        lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    with shape_from_dims if any(t.external_data for t in model.graph.initializer) else contextlib.nullcontext():
        if any(n.domain == "com.microsoft" for n in model.graph.node):
            # onnx's shape inference does not know onnxruntime's contrib ops (the fused attention and
            # norms of xpack's graph), so their outputs would get no types and the converter no casts:
            # onnxruntime's symbolic shape inference knows them
            model = _infer_shapes(model)
            return convert_float_to_float16(model, keep_io_types=True, op_block_list=ops, node_block_list=list(keep_nodes), disable_shape_infer=True)
        return convert_float_to_float16(model, keep_io_types=True, op_block_list=ops, node_block_list=list(keep_nodes), disable_shape_infer=False)


def _infer_shapes(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """onnxruntime's symbolic shape inference. It reads the values of the initializers an Add or Mul takes (to follow
    integer shape arithmetic), which a placeholder (pending.py) does not have: those are given to it as graph inputs of
    their shape instead, and the types it finds are copied back into ``model``."""
    from onnx import helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    placeholders = [t for t in model.graph.initializer if is_pending(t)]
    if not placeholders:
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    probe = type(model)()
    probe.CopyFrom(model)  # placeholders hold no data: a small copy
    kept = [t for t in probe.graph.initializer if not is_pending(t)]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept)
    probe.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in placeholders)
    inferred = SymbolicShapeInference.infer_shapes(probe, auto_merge=True)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def keep_fp32_between(model: "onnx.ModelProto") -> int:
    """Drop the fp16 round trips of a converted graph: wherever a float32 tensor is cast to fp16 and cast
    back to float32 (onnxruntime's converter does so between two kept nodes, having typed every float
    tensor fp16), the float32 consumer reads the float32 tensor itself. Why: a value between two kept
    nodes may exceed fp16's range, as Gemma 3's residual stream does (see archs/onnx_spec.py Fp16Keep);
    fp16 consumers of the same tensor keep their cast. Returns the number of round trips dropped."""
    from onnx import TensorProto

    graph = model.graph
    fp32 = {v.name for v in [*graph.input, *graph.value_info] if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    outputs = {o.name for o in graph.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def cast_to(n) -> int | None:
        return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None

    rename: dict[str, str] = {}
    dropped: set[int] = set()
    for down in graph.node:
        if cast_to(down) != TensorProto.FLOAT16 or down.input[0] not in fp32:
            continue
        users = consumers.get(down.output[0], [])
        back = [u for u in users if cast_to(u) == TensorProto.FLOAT and u.output[0] not in outputs]
        for up in back:
            rename[up.output[0]] = down.input[0]
            dropped.add(id(up))
        if len(back) == len(users) and down.output[0] not in outputs:
            dropped.add(id(down))
    if not rename:
        return 0
    kept = [n for n in graph.node if id(n) not in dropped]
    for n in kept:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(kept)
    live = {name for n in kept for name in n.output}
    stale = [v for v in graph.value_info if v.name not in live]
    for v in stale:
        graph.value_info.remove(v)
    return len(rename)


# ---------------------------------------------------------------------------------------------
# graph surgery


def materialize_output_head(model: "onnx.ModelProto") -> list[str]:
    """Replace ``MatMul(x, Transpose(W))`` (a tied output head) with ``MatMul(x, W^T)``, W^T an initializer of its own."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    done = []
    for node in list(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in producer:
            continue
        t = producer[node.input[1]]
        if t.op_type != "Transpose" or t.input[0] not in inits or len(inits[t.input[0]].dims) != 2:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        weight = np.ascontiguousarray(np.transpose(numpy_helper.to_array(inits[t.input[0]]), perm))
        name = "lm_head.weight" if "lm_head.weight" not in inits else f"{node.name or 'head'}.weight"
        graph.initializer.append(numpy_helper.from_array(weight, name))
        node.input[1] = name
        if consumers[t.output[0]] == 1:
            graph.node.remove(t)
        done.append(node.name)
    return done


def weight_node_types(model: "onnx.ModelProto") -> dict[str, int]:
    """How the weights are stored: nodes that read a weight initializer, by type (float MatMul/Gather, MatMulNBits, ...)."""
    rank = {i.name: len(i.dims) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def is_weight(name: str) -> bool:
        node = producer.get(name)
        return rank.get(name, 0) == 2 or (node is not None and node.op_type == "Transpose" and rank.get(node.input[0], 0) == 2)

    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized") or (n.op_type == "MatMul" and is_weight(n.input[1])) or (
            n.op_type == "Gather" and rank.get(n.input[0], 0) == 2
        ):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------
# a decoder at --bits


# (the float32 decoder with its head materialized) -> (the quantized decoder, its account): calibrate/onnx_mix.py's
# calibrated mix, bound by the pipeline to the checkpoint and the calibration request.
Calibrate = Callable[["onnx.ModelProto"], tuple["onnx.ModelProto", dict]]


def quantize_graph(model: "onnx.ModelProto", bits: int, block_size: int, keep_lm_head: bool, spec: OnnxSpec, int4: str = "mixed",
                   calibrate: Calibrate | None = None, tensors: InMemory | None = None) -> tuple["onnx.ModelProto", dict]:
    """The float32 decoder (or embedding) graph at ``bits``, and the manifest's account of it; ``calibrate``
    (4 or 8 bits) replaces the fixed scheme with a calibrated mix. ``tensors``: how the weights are read and the
    quantized ones written (pending.py's streamed graph gives its own; the fixed scheme only)."""
    info: dict = {"bits": bits, "scheme": SCHEMES[bits]}
    if bits == 32:
        return model, info
    if bits == 16:
        return _fp16(model, spec, info)
    head = [n.name for n in model.graph.node if n.op_type == "MatMul" and spec.lm_head_node.search(n.name)]
    untied = [] if keep_lm_head else materialize_output_head(model)
    if calibrate is not None:
        return _calibrated(model, calibrate, block_size, head, untied, info)
    if bits == 4:
        return _quantize_int4(model, block_size, keep_lm_head, head, untied, info, mixed=int4 == "mixed", tensors=tensors)
    # round to nearest as onnxruntime's MatMulNBitsQuantizer does (the same bytes, tests/test_onnx_quant.py), one
    # weight at a time; a tied embedding reads the head's packed weight, an untied one is quantized alike
    model, q = quantize_matmuls(model, 8, block_size, mixed=False, search=False, exclude=head if keep_lm_head else (),
                                share_embedding=not keep_lm_head, tensors=tensors)
    gathers = [] if keep_lm_head else quantize_tables(model, 8, block_size, search=False, tensors=tensors)
    return _quantized_info(
        model, info, block_size, head, keep_lm_head, untied, "quantized", _embedding_label(keep_lm_head, q, gathers),
        quantizer=f"xpack (packager/export/onnx/quantize.py): round to nearest, as onnxruntime's MatMulNBitsQuantizer{' + 8-bit GatherBlockQuantized' if gathers else ''}",
    )


def _embedding_label(keep_lm_head: bool, q: dict, gathers: list[str]) -> str:
    if keep_lm_head:
        return "float (--keep-lm-head)"
    if q.get("shared_embedding"):
        return "quantized (reads the output head's packed weight)"
    return "quantized" if gathers else "float"


def _quantized_info(model, info: dict, block_size: int, head: list[str], keep_lm_head: bool, untied: list[str], head_label: str, embedding: str, **extra) -> tuple["onnx.ModelProto", dict]:
    """The manifest's account of a quantized graph: settings, what became of the head and the embedding, node types."""
    head_quantized = bool(head) and not keep_lm_head and not any(n.op_type == "MatMul" and n.name in head for n in model.graph.node)
    info.update(
        block_size=block_size,
        symmetric=False,
        accuracy_level=ACCURACY_LEVEL,
        **extra,
        lm_head=head_label if head_quantized else "float (--keep-lm-head)" if keep_lm_head else "float",
        lm_head_untied=bool(untied),
        embedding=embedding,
        node_types=weight_node_types(model),
    )
    return model, info


def _quantize_int4(model: "onnx.ModelProto", block_size: int, keep_lm_head: bool, head: list[str], untied: list[str], info: dict, mixed: bool = True,
                   tensors: InMemory | None = None) -> tuple["onnx.ModelProto", dict]:
    """4 bits as packager/export/onnx/quantize.py writes them: searched block scales and, when ``mixed``,
    llama.cpp-style 8-bit layers (on the demo model mean KL 0.046 for 1.23x the bytes of
    onnxruntime's plain int4, which measures 0.51; llama.cpp's Q4_K_M 0.076). ``mixed=False``
    (``--int4 plain``) keeps every weight at 4 bits: the smallest, fastest file (KL 0.42). An untied embedding is
    quantized to 4 bits in blocks of ``block_size`` with the same searched scales."""
    model, q = quantize_matmuls(model, 4, block_size, mixed=mixed, exclude=head if keep_lm_head else (), share_embedding=not keep_lm_head,
                                accuracy_level=ACCURACY_LEVEL, tensors=tensors)
    gathers = [] if keep_lm_head or q.get("shared_embedding") else quantize_tables(model, 4, block_size, tensors=tensors)
    return _quantized_info(
        model, info, block_size, head, keep_lm_head, untied, f"quantized ({8 if mixed else 4}-bit)", _embedding_label(keep_lm_head, q, gathers),
        quantizer=f"xpack (packager/export/onnx/quantize.py): searched block scales, {'mixed 4/8 bits' if mixed else 'every weight 4-bit (--int4 plain)'}",
        int4="mixed" if mixed else "plain",
        eight_bit_block_size=EIGHT_BIT_BLOCK_SIZE,
        eight_bit_nodes=len(q.get("eight_bit_nodes", [])),
        bit_widths=q.get("node_counts"),
    )


def _calibrated(model: "onnx.ModelProto", calibrate: Calibrate, block_size: int, head: list[str], untied: list[str], info: dict) -> tuple["onnx.ModelProto", dict]:
    """A calibrated mix (every MatMul its own width and block, the tied embedding read from the head); an untied
    embedding gets onnxruntime's 4-bit GatherBlockQuantized, as the fixed 4-bit scheme gives it."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model, q = calibrate(model)
    if not q.get("shared_embedding"):
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=False, accuracy_level=ACCURACY_LEVEL,
                                         op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
        quantizer.process()
        model = quantizer.model.model
    cal = q["calibration"]
    info["scheme"] = (f"calibrated mix (xpack): MatMulNBits {', '.join(f'{t} x{n}' for t, n in sorted(cal['mix']['type_counts'].items()))}, "
                      "int8 activations in the kernel, scales searched with the importance matrix")
    return _quantized_info(
        model, info, block_size, head, False, untied, "quantized (calibrated)",
        "quantized (reads the output head's packed weight)" if q.get("shared_embedding") else "quantized (4-bit)",
        quantizer="xpack (packager/export/calibrate/onnx_mix.py + onnx/quantize.py)", calibration=cal, bit_widths=q.get("node_counts"),
    )


def _fp16(model: "onnx.ModelProto", spec: OnnxSpec, info: dict) -> tuple["onnx.ModelProto", dict]:
    """fp16, with the op types and node-name patterns of the table's ``fp16_keep_fp32`` left in float32
    (and, with its ``between_kept_nodes``, the tensors passed between them: Gemma 3's residual stream)."""
    keep = spec.fp16_keep_fp32
    nodes = [n.name for n in model.graph.node if n.name and any(p.search(n.name) for p in keep.node_patterns)]
    model = to_fp16(model, keep.op_types, nodes)
    links = keep_fp32_between(model) if keep.between_kept_nodes else 0
    info.update(
        fp16_fp32_ops=list(keep.op_types),
        fp16_fp32_node_patterns=[p.pattern for p in keep.node_patterns],
        fp16_fp32_nodes=len(nodes),
        io_types="float32 (keep_io_types: logits and KV cache in fp32, cast at the graph edges)",
    )
    if keep.between_kept_nodes:
        info["fp16_fp32_links"] = links  # fp32 -> fp16 -> fp32 round trips between kept nodes dropped
    return model, info
