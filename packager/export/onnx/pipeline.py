"""Hugging Face checkpoint (+ optional LoRA, merged first) -> ONNX decoder with a KV cache, for onnxruntime.

The decoder graph is xpack's (``onnx_graph.py``: onnxruntime's fused GroupQueryAttention, ~10 nodes
per layer) unless ``graph="optimum"``; both take and return the same tensors. Gemma 3 with vision
adds ``vision.onnx`` (``onnx_vision.py``) and ``embed.onnx``, its decoder taking ``inputs_embeds``;
Llama 3.2 Vision is written as three graphs by ``onnx_mllama.py`` (``_export_mllama``).

What optimum-onnx and onnxruntime give us and we use: optimum's exporter (``onnx_export_from_model``,
task ``text-generation-with-past``: one graph taking ``past_key_values.*`` and returning ``logits``
and ``present.*``) for ``--graph optimum``, onnxruntime's weight-only block quantizer
(``MatMulNBitsQuantizer``: MatMul -> ``MatMulNBits``, embedding Gather -> ``GatherBlockQuantized``)
for 8 bits, its operators for 4 bits (the weights written by ``onnx_quant.py``: searched scales,
llama.cpp-style 8-bit layers) and its fp16 converter (``onnxruntime.transformers.float16``, after
onnxruntime's symbolic shape inference, which knows the contrib ops).

What we do ourselves, and why:
- An adapter is merged into a temporary checkpoint first (``merge.run_merge``): optimum exports a
  transformers model, not a streaming merge.
- Gemma 3 with a vision tower: optimum exports no image-text-to-text decoder, so the language
  model's tensors are streamed (merged with the adapter on the way) into a temporary text-only
  ``Gemma3ForCausalLM`` checkpoint, and that is exported. The names and the class are data in
  ``archs/gemma3.json`` (``onnx.text_model``).
- Tied embeddings: the exported output head is ``MatMul(x, Transpose(embed_tokens))``, which the
  quantizer skips (its weight is not an initializer). The head is materialized as its own
  initializer ``lm_head.weight`` before quantizing, so that it is quantized like every other MatMul.
- 8 bits: ``MatMulNBits`` with bits=8 (weight-only, per block along K, asymmetric) and
  accuracy_level 4 (activations quantized per block to int8 in the kernel, as llama.cpp's Q8_0
  does); the embedding table becomes an 8-bit ``GatherBlockQuantized`` (the quantizer does 4-bit
  Gathers only, so that one is written here).
- The export is checked against the torch model on a fixed input (a prefill and one decode step),
  as optimum's ``validate_model_outputs`` does (``np.allclose`` with the config's atol), and the
  quantized file again; both sets of figures go into the manifest.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from xpack.errors import XpackError
from xpack.packager.archs import all_archs, Arch, require_arch
from xpack.packager.export.onnx.common import quiet
from xpack.packager.export.onnx.decoder_graph import build_decoder, build_embedding
from xpack.packager.export.onnx.gemma3_vision import _to_int8, export_gemma3_vision
from xpack.packager.export.onnx.mllama import CROSS_KV_FILE, DECODER_FILE, export_mllama, VISION_FILE
from xpack.packager.export.onnx.quantize import EIGHT_BIT_BLOCK_SIZE, quantize_matmuls
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.tensors import plan_shards, ShardedWriter, TensorSpec
from xpack.packager.merge.lora import Adapter
from xpack.packager.merge.stream import apply_op, MergeSettings, plan_merge, run_merge, stream_base
from xpack.packager.verify.parity import compare_logits
from xpack.runtimes.onnx_mllama import MllamaOnnx
from xpack.runtimes.onnxrt import attention_bias

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import onnx

BITS = (32, 16, 8, 4)
# Weights per quantization block, by bits. 8 bits uses 16: on the demo model (300 tokens against torch
# fp32) blocks of 16 give mean KL 0.0022 / top-1 98.7% where 32 gives 0.0040 / 98.0%, level with
# llama.cpp's Q8_0 (0.0041 / 97.3%) rather than better, for 13% more bytes and the same speed.
DEFAULT_BLOCK_SIZE = {4: 32, 8: 16}
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
TASK = "text-generation-with-past"
# "xpack": the decoder graph xpack writes with onnxruntime's fused operators (packager/export/onnx/decoder_graph.py);
# "optimum": optimum-onnx's traced export. Both have the same inputs and outputs.
GRAPHS = ("xpack", "optimum")
# --int4: "mixed" (8 bits where Q4_K_M spends more, the default) or "plain" (every weight 4-bit)
INT4_SCHEMES = ("mixed", "plain")
EMBED_FILE = "embed.onnx"
EMBED_DATA_FILE = "embed.onnx_data"
# Files a vision export needs beside the graphs: the image processor's settings and the processor's
# prompt layout (image tokens per image, begin/end-of-image tokens).
VISION_COMPANIONS = ("preprocessor_config.json", "processor_config.json")
VISION_DTYPE = {32: "float32", 16: "float16", 8: "int8", 4: "int8"}
# The fused kernels sum in another order than torch's eager attention: measured <= 1e-6 on the twins
# and ~1e-4 on the demo model; optimum's own per-model atol is 1e-5 for its traced graph.
XPACK_GRAPH_ATOL = 1e-3
# accuracy_level of MatMulNBits: 4 = the activations are quantized to int8 per block inside the kernel.
# Without it, onnxruntime 1.32's CPU kernel has no fast path for 8-bit weights (2.5 tok/s against
# 57 tok/s on the demo model) and its int4 path is 1.4x slower, for a KL difference of 0.003.
ACCURACY_LEVEL = 4
SCHEMES = {
    32: "fp32",
    16: "fp16 weights and activations; numerically sensitive ops kept in fp32 (see fp16_fp32_ops / fp16_fp32_nodes)",
    8: "int8 weight-only, block-wise asymmetric (MatMulNBits bits=8, int8 activations in the kernel); embedding GatherBlockQuantized 8-bit",
    4: "int4 weight-only, block-wise asymmetric with searched scales (MatMulNBits bits=4, int8 activations in the kernel); 8 bits (blocks of 64) for the output head, the attention projections and the MLP of llama.cpp's use_more_bits layers, as Q4_K_M spends 6 bits there; a tied embedding reads the head's packed weight",
}
# What the output folder gets from the checkpoint besides the graph (tokenizer, chat template, generation defaults).
COMPANIONS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
VALIDATION_TEXT = "FINDINGS: The lungs are clear. No pleural effusion or pneumothorax. IMPRESSION: No acute abnormality."


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


def onnx_spec(arch: Arch) -> dict:
    """The ``onnx`` section of an architecture table; an architecture without one is a clear error."""
    spec = arch.extra.get("onnx")
    supported = ", ".join(sorted(a.name for a in all_archs().values() if "unsupported" not in (a.extra.get("onnx") or {"unsupported": 1})))
    if not spec:
        raise XpackError(f"ONNX export of {arch.name} is not supported by xpack; supported: {supported}")
    if "unsupported" in spec:
        raise XpackError(f"{spec['unsupported']} (ONNX export supports: {supported})")
    return spec


@dataclass
class OnnxExport:
    onnx_file: str = ONNX_FILE
    data_file: str | None = DATA_FILE
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


# ---------------------------------------------------------------------------------------------
# the checkpoint optimum exports


def _copy_companions(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in COMPANIONS:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _text_config(ckpt: Checkpoint, text: dict, untied: bool) -> dict:
    """config.json of the text-only model: the text config plus what the text class needs from the top level."""
    top = ckpt.config
    cfg = json.loads(json.dumps(top.get(text["config_key"]) or {}))
    cfg["architectures"] = [text["architecture"]]
    cfg["model_type"] = text["model_type"]
    cfg["tie_word_embeddings"] = False if untied else ckpt.tie_word_embeddings
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype"):
        if cfg.get(key) is None and top.get(key) is not None:
            cfg[key] = top[key]
    cfg.pop("quantization_config", None)
    return cfg


def _write_text_checkpoint(ckpt: Checkpoint, adapters: list[Adapter], arch: Arch, text: dict, out: Path) -> list[str]:
    """Stream the language model's tensors (adapters merged on the way) into a text-only checkpoint."""
    from tqdm import tqdm

    plan = plan_merge(ckpt, adapters, MergeSettings())
    keep = [re.compile(p) for p in text["keep"]]
    names: dict[int, str] = {}
    ops = []
    for op in plan.ops:
        canon = arch.canonical(op.out_name)
        if not any(p.search(canon) for p in keep):
            continue
        name = canon
        for pattern, repl in text["rename"]:
            name = re.sub(pattern, repl, name)
        names[id(op)] = name
        ops.append(op)
    if not ops:
        raise XpackError(f"{ckpt.path} has no language-model tensors under the names xpack's {arch.name} table expects; re-save the checkpoint with transformers")
    out.mkdir(parents=True)
    specs = [TensorSpec(names[id(op)], op.spec.dtype, op.spec.shape) for op in ops]
    writer = ShardedWriter(out, plan_shards(specs, 2 * 10**9))
    for op, base, dtype in tqdm(stream_base(ckpt, ops), total=len(ops), desc="text model", unit="tensor", disable=None):
        writer.write(names[id(op)], apply_op(op, base, dtype))
    writer.close()
    (out / "config.json").write_text(json.dumps(_text_config(ckpt, text, plan.untied), indent=2) + "\n")
    _copy_companions(ckpt.path, out)
    return plan.notes


def _prepare_source(ckpt: Checkpoint, adapters: list[Adapter], arch: Arch, spec: dict, work: Path) -> tuple[Path, list[str]]:
    """The checkpoint folder optimum exports: the source itself, its merge with the adapters, or its text model."""
    if "text_model" in spec:
        out = work / "text-model"
        return out, _write_text_checkpoint(ckpt, adapters, arch, spec["text_model"], out)
    if adapters:
        out = work / "merged"
        out.mkdir()
        result = run_merge(ckpt, adapters, out, MergeSettings())
        return out, list(result.plan.notes)
    return ckpt.path, []


# ---------------------------------------------------------------------------------------------
# optimum


def _require_libraries(graph: str) -> None:
    missing = []
    for module in ("optimum.exporters.onnx", "onnx", "onnxruntime", "onnx_ir")[graph == "xpack":]:
        try:
            __import__(module)
        except ImportError:
            missing.append(module.split(".")[0])
    if missing:
        raise XpackError(f"ONNX export needs {', '.join(missing)}; install them with `pip install 'xpack[pack]'`")


def _load_torch(src: Path, spec: dict):
    import torch
    import transformers

    cls = getattr(transformers, spec.get("model_class", "AutoModelForCausalLM"))
    try:
        model = cls.from_pretrained(str(src), dtype=torch.float32, attn_implementation=spec.get("attn_implementation", "eager"), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise XpackError(f"transformers could not load {src} for the ONNX export ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return model.eval()


def _optimum_export(model, out: Path, opset: int | None) -> float:
    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(exporter="onnx", model=model, task=TASK, library_name="transformers")
    atol = constructor(model.config, task=TASK).ATOL_FOR_VALIDATION
    try:
        onnx_export_from_model(model, output=out, task=TASK, opset=opset, do_validation=False, preprocessors=[])
    except (ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise XpackError(f"optimum could not export {model.config.model_type} to ONNX ({first}); supported: llama, gemma2, gemma3") from None
    return float(atol if not isinstance(atol, dict) else atol.get("text-generation", 1e-5))


# ---------------------------------------------------------------------------------------------
# graph surgery and quantization


def _initializers(graph) -> dict:
    return {i.name: i for i in graph.initializer}


def materialize_output_head(model: "onnx.ModelProto") -> list[str]:
    """Replace ``MatMul(x, Transpose(W))`` (a tied output head) with ``MatMul(x, W^T)``, W^T an initializer of its own."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = _initializers(graph)
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


def _quantize_gather_8bit(model: "onnx.ModelProto", block_size: int) -> list[str]:
    """Embedding Gathers -> 8-bit ``GatherBlockQuantized`` (uint8, blocks along the hidden axis, asymmetric)."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = _initializers(graph)
    done = []
    for node in list(graph.node):
        if node.op_type != "Gather" or node.input[0] not in inits or len(inits[node.input[0]].dims) != 2:
            continue
        w = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        rows, cols = w.shape
        n_blocks = -(-cols // block_size)
        blocks = np.pad(w, ((0, 0), (0, n_blocks * block_size - cols))).reshape(rows, n_blocks, block_size)
        lo = np.minimum(blocks.min(-1), 0.0)
        hi = np.maximum(blocks.max(-1), 0.0)
        scale = (hi - lo) / 255.0
        scale[scale == 0] = 1.0
        zero = np.clip(np.round(-lo / scale), 0, 255).astype(np.uint8)
        q = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, 255).astype(np.uint8)
        base = node.input[0]
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(q.reshape(rows, -1)[:, :cols]), f"{base}_Q8"),
            numpy_helper.from_array(scale.astype(np.float32), f"{base}_scales"),
            numpy_helper.from_array(zero, f"{base}_zero_points"),
        ])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        new = helper.make_node(
            "GatherBlockQuantized", [f"{base}_Q8", node.input[1], f"{base}_scales", f"{base}_zero_points"], list(node.output),
            name=f"{node.name or base}_Q8", domain="com.microsoft", gather_axis=axis, quantize_axis=1, block_size=block_size, bits=8,
        )
        position = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(position, new)
        done.append(new.name)
    if done:
        used = {i for n in graph.node for i in n.input}
        kept = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
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


def _lm_head_nodes(model: "onnx.ModelProto", spec: dict) -> list[str]:
    pattern = re.compile(spec.get("lm_head_node", r"^/lm_head/"))
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and pattern.search(n.name)]


def _quantize(model: "onnx.ModelProto", bits: int, block_size: int, keep_lm_head: bool, spec: dict, int4: str = "mixed") -> tuple["onnx.ModelProto", dict]:
    info: dict = {"bits": bits, "scheme": SCHEMES[bits]}
    if bits == 32:
        return model, info
    if bits == 16:
        return _to_fp16(model, spec, info)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    head = _lm_head_nodes(model, spec)
    untied = [] if keep_lm_head else materialize_output_head(model)
    if bits == 4:
        return _quantize_int4(model, block_size, keep_lm_head, head, untied, info, mixed=int4 == "mixed")
    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=block_size, is_symmetric=False, accuracy_level=ACCURACY_LEVEL,
        nodes_to_exclude=head if keep_lm_head else [], op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),),
    )
    quantizer.process()
    model = quantizer.model.model
    gathers = [] if keep_lm_head else _quantize_gather_8bit(model, block_size)
    return _quantized_info(
        model, info, block_size, head, keep_lm_head, untied, "quantized", "float (--keep-lm-head)" if keep_lm_head else "quantized",
        quantizer=f"onnxruntime MatMulNBitsQuantizer (RTN){' + xpack 8-bit GatherBlockQuantized' if gathers else ''}",
    )


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


def _quantize_int4(model: "onnx.ModelProto", block_size: int, keep_lm_head: bool, head: list[str], untied: list[str], info: dict, mixed: bool = True) -> tuple["onnx.ModelProto", dict]:
    """4 bits as packager/export/onnx/quantize.py writes them: searched block scales and, when ``mixed``,
    llama.cpp-style 8-bit layers (on the demo model mean KL 0.046 for 1.23x the bytes of
    onnxruntime's plain int4, which measures 0.51; llama.cpp's Q4_K_M 0.076). ``mixed=False``
    (``--int4 plain``) keeps every weight at 4 bits: the smallest, fastest file (KL 0.42)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer


    model, q = quantize_matmuls(model, 4, block_size, mixed=mixed, exclude=head if keep_lm_head else (), share_embedding=not keep_lm_head, accuracy_level=ACCURACY_LEVEL)
    embedding = "float (--keep-lm-head)"
    if not keep_lm_head:
        embedding = "quantized (reads the output head's packed weight)" if q.get("shared_embedding") else "quantized"
        if not q.get("shared_embedding"):  # an untied embedding: onnxruntime's 4-bit GatherBlockQuantized
            quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=False, accuracy_level=ACCURACY_LEVEL,
                                             op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
            quantizer.process()
            model = quantizer.model.model
    return _quantized_info(
        model, info, block_size, head, keep_lm_head, untied, f"quantized ({8 if mixed else 4}-bit)", embedding,
        quantizer=f"xpack (packager/export/onnx/quantize.py): searched block scales, {'mixed 4/8 bits' if mixed else 'every weight 4-bit (--int4 plain)'}",
        int4="mixed" if mixed else "plain",
        eight_bit_block_size=EIGHT_BIT_BLOCK_SIZE,
        eight_bit_nodes=len(q.get("eight_bit_nodes", [])),
        bit_widths=q.get("node_counts"),
    )


def _to_fp16(model: "onnx.ModelProto", spec: dict, info: dict) -> tuple["onnx.ModelProto", dict]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep = spec.get("fp16_keep_fp32") or {}
    ops = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep.get("op_types", [])))
    patterns = [re.compile(p) for p in keep.get("node_patterns", [])]
    nodes = [n.name for n in model.graph.node if n.name and any(p.search(n.name) for p in patterns)]
    if any(n.domain == "com.microsoft" for n in model.graph.node):
        # onnx's shape inference does not know onnxruntime's contrib ops (the fused attention and
        # norms of xpack's graph), so their outputs would get no types and the converter no casts:
        # onnxruntime's symbolic shape inference knows them
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        model = convert_float_to_float16(model, keep_io_types=True, op_block_list=ops, node_block_list=nodes, disable_shape_infer=True)
    else:
        model = convert_float_to_float16(model, keep_io_types=True, op_block_list=ops, node_block_list=nodes, disable_shape_infer=False)
    info.update(
        fp16_fp32_ops=keep.get("op_types", []),
        fp16_fp32_node_patterns=keep.get("node_patterns", []),
        fp16_fp32_nodes=len(nodes),
        io_types="float32 (keep_io_types: logits and KV cache in fp32, cast at the graph edges)",
    )
    return model, info


def save_model(model: "onnx.ModelProto", folder: Path, name: str = ONNX_FILE, data: str = DATA_FILE) -> None:
    """``model.onnx`` (the graph) + ``model.onnx_data`` (every weight), whatever the model's size."""
    import onnx

    onnx.save_model(
        model, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data, size_threshold=0, convert_attribute=False,
    )


# ---------------------------------------------------------------------------------------------
# the check against torch


def graph_io(path: Path) -> dict:
    """Inputs, outputs, KV-cache layout and opset of an exported decoder (from the graph, not the config)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    elem = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64"}

    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    inputs = {i.name: {"shape": shape(i), "dtype": elem.get(i.type.tensor_type.elem_type, str(i.type.tensor_type.elem_type))} for i in m.graph.input}
    outputs = {o.name: {"shape": shape(o), "dtype": elem.get(o.type.tensor_type.elem_type, str(o.type.tensor_type.elem_type))} for o in m.graph.output}
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
        "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
    }


def _validation_ids(src: Path, vocab: int) -> list[int]:
    from tokenizers import Tokenizer

    path = src / "tokenizer.json"
    if path.is_file():
        ids = Tokenizer.from_file(str(path)).encode(VALIDATION_TEXT).ids
        ids = [i for i in ids if i < vocab]
        if len(ids) >= 4:
            return ids[:48]
    return [(7 * i + 3) % vocab for i in range(24)]


def _torch_steps(model, ids: list[int]) -> list[dict]:
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


def _ort_steps(path: Path, ids: list[int], threads: int, embed: Path | None = None, window: int | None = None) -> list[dict]:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    embedder = ort.InferenceSession(str(embed), options, providers=["CPUExecutionProvider"]) if embed else None
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    np_types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    past = {n: np.zeros((1, i.shape[1], 0, i.shape[3]), np_types[i.type]) for n, i in inputs.items() if n.startswith("past_key_values.")}
    steps, start = [], 0
    for chunk in (ids[:-1], ids[-1:]):
        tokens = np.array([chunk], np.int64)
        first = {"inputs_embeds": embedder.run(None, {"input_ids": tokens})[0]} if embedder else {"input_ids": tokens}
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


def _compare(reference: list[dict], candidate: list[dict], atol: float, rtol: float = 1e-5) -> dict:
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


# ---------------------------------------------------------------------------------------------
# the export


def _xpack_graph(src: Path, raw: Path, inputs_embeds: bool) -> dict:
    """Write xpack's fused decoder graph (and, for a vision model, the embedding graph) into ``raw``."""
    raw.mkdir()
    model, facts = build_decoder(src, inputs_embeds=inputs_embeds)
    save_model(model, raw)
    del model
    if inputs_embeds:
        save_model(build_embedding(src), raw, EMBED_FILE, EMBED_DATA_FILE)
    return facts


def _export_vision(model_dir: Path, out: Path, bits: int, threads: int) -> dict:
    """The vision tower + projector as ``vision.onnx`` (packager/export/onnx/gemma3_vision.py), checked against torch there."""
    # 4-bit vision towers lose too much for too few bytes (the tower is ~10% of a 4B model): 8 bits there
    dtype = VISION_DTYPE[bits]
    figures = export_gemma3_vision(model_dir, out, dtype=dtype, threads=threads, copy_companions=False)
    return {**figures, "onnx_file": figures["file"], "precision": dtype}


def _export_mllama(ckpt: Checkpoint, adapters: list[Adapter], tmp_out: Path, bits: int, spec: dict, block_size: int, keep_lm_head: bool, int4: str) -> OnnxExport:
    """Llama 3.2 Vision: three graphs (vision, cross-attention K/V, decoder) written by packager/export/onnx/mllama.py."""
    if bits not in spec.get("bits", [32]):
        raise XpackError(
            f"--bits {bits} is not available for Llama 3.2 Vision (mllama) ONNX yet (fp16 of its traced graphs is not checked); "
            f"use --bits {', '.join(str(b) for b in spec.get('bits', [32]))}"
        )
    result = OnnxExport(arch="mllama", graph="xpack-mllama", onnx_file=DECODER_FILE, data_file=None, exported_class="MllamaForConditionalGeneration")
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=tmp_out.parent, prefix=".xpack-onnx-") as work_dir, quiet():
        work = Path(work_dir)
        source = ckpt.path
        if adapters:  # the adapter reaches the vision layers too: merge the whole checkpoint first
            (work / "merged").mkdir()
            result.notes += list(run_merge(ckpt, adapters, work / "merged", MergeSettings()).plan.notes)
            source = work / "merged"
        meta = export_mllama(source, work / "mllama")
        if bits != 32:
            result.quantization, result.validation["artifact"] = _quantize_mllama(work / "mllama", work / "fp32", bits, spec, block_size, keep_lm_head, int4)
        for path in (work / "mllama").iterdir():
            shutil.move(str(path), tmp_out / path.name)
    for name in (f"{DECODER_FILE}.data", f"{DECODER_FILE}_data"):
        if (tmp_out / name).is_file():
            result.data_file = name
    figures = meta.get("validation") or {}
    worst = max(figures.get(k, 0.0) for k in ("prefill_max_abs_diff", "decode_step_max_abs_diff", "text_only_max_abs_diff"))
    result.validation["export"] = {
        "tokens": figures.get("tokens"), "atol": figures.get("atol"), "rtol": 0.0, "within_tolerance": bool(figures.get("passed")),
        "finite": True, "max_abs_diff": {"logits": worst, "present (max over layers)": None},
        "figures": figures, "reference": "transformers fp32 (eager attention): prefill with an image, one cached step, text only",
    }
    result.validation.setdefault("artifact", {"same_as": "export"})
    result.vision = {"onnx_file": VISION_FILE, "cross_kv_file": CROSS_KV_FILE, "precision": VISION_DTYPE[bits],
                     "files": [VISION_FILE, f"{VISION_FILE}.data", CROSS_KV_FILE, f"{CROSS_KV_FILE}.data"]}
    result.quantization = result.quantization or {"bits": 32, "scheme": SCHEMES[32], "node_types": {}}
    result.io = graph_io(tmp_out / DECODER_FILE)
    result.opset = int(result.io["opset"].get("ai.onnx", 0))
    result.timings["total_s"] = round(time.perf_counter() - clock, 2)
    return result


def _quantize_mllama(folder: Path, keep: Path, bits: int, spec: dict, block_size: int, keep_lm_head: bool, int4: str) -> tuple[dict, dict]:
    """Quantize the three mllama graphs in ``folder`` (decoder and cross K/V at ``bits``, vision at 8
    bits), then compare them with the fp32 graphs (kept in ``keep``; those matched torch within 1e-6)
    on a synthetic image and a prompt around the image token."""
    import numpy as np
    import onnx


    shutil.copytree(folder, keep)
    info: dict = {}
    for name in (DECODER_FILE, CROSS_KV_FILE, VISION_FILE):
        model = onnx.load(str(folder / name))
        opset = {o.domain: o.version for o in model.opset_import}.get("", None)
        if name == VISION_FILE:
            model, part = _to_int8(model), {"bits": 8}
        else:
            model, part = _quantize(model, bits, block_size, keep_lm_head, spec, int4)
        for o in model.opset_import:  # the quantizer raises the opset; the traced graph's ops (ReduceMean axes) are of its own
            if o.domain in ("", "ai.onnx") and opset is not None:
                o.version = opset
        for stale in folder.glob(f"{name}*"):
            stale.unlink()
        onnx.save_model(model, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{name}.data", size_threshold=1024)
        info[name] = part.get("node_types") or weight_node_types(model)
        if name == DECODER_FILE:
            decoder_part = part
    quantization = {**decoder_part, "graphs": info, "vision": "int8 weight-only (MatMulNBits bits=8)"}
    reference, candidate = MllamaOnnx(keep, threads=1), MllamaOnnx(folder, threads=1)
    shape = [int(d) for d in reference.sessions["vision"].get_inputs()[0].shape[2:]]
    pixels = np.random.default_rng(0).standard_normal([1, 1, *shape]).astype(np.float32)
    ratio_ids, ratio_mask = np.array([[1]], np.int64), np.array([[[1] + [0] * (shape[0] - 1)]], np.int64)
    ids = [(7 * i + 3) % reference.vocab_size for i in range(12)] + [reference.image_token_id] + [(5 * i + 11) % reference.vocab_size for i in range(20)]
    ids = [t if t != reference.image_token_id or i == 12 else 0 for i, t in enumerate(ids)]
    expected = reference.logits(ids, reference.encode_image(pixels, ratio_ids, ratio_mask))
    got = candidate.logits(ids, candidate.encode_image(pixels, ratio_ids, ratio_mask))
    figures = compare_logits(expected, got)
    check = {
        "tokens": len(ids), "finite": bool(np.isfinite(got).all()), "max_abs_diff": {"logits": figures.get("max_abs_logit_error")},
        "logits": figures, "reference": "the fp32 graphs (within 1e-6 of torch), a synthetic one-tile image and 32 tokens around the image token",
    }
    if not check["finite"]:
        raise XpackError(f"the {bits}-bit mllama graphs give non-finite logits; export with --bits 32")
    return quantization, check


def export_onnx(
    model_dir: Path, adapters: list[Adapter], tmp_out: Path, bits: int, *, block_size: int | None = None,
    keep_lm_head: bool = False, threads: int = 0, graph: str = "xpack", int4: str = "mixed",
) -> OnnxExport:
    """Write ``model.onnx`` + ``model.onnx_data`` and the tokenizer/config files into ``tmp_out``
    (plus ``embed.onnx`` and ``vision.onnx`` for a vision model with xpack's graph)."""
    import os

    block_size = block_size or default_block_size(bits)
    check_settings(bits, block_size, graph, int4)
    ckpt = Checkpoint(model_dir)
    arch = require_arch(ckpt.config, "ONNX export")
    spec = onnx_spec(arch)
    ckpt.check_not_packed()
    _require_libraries(graph)
    import onnx

    threads = threads or min(os.cpu_count() or 1, 8)
    if spec.get("pipeline") == "mllama":
        if graph != "xpack":
            raise XpackError("optimum-onnx cannot export Llama 3.2 Vision (mllama); drop --graph optimum (xpack writes its vision, cross-attention and decoder graphs)")
        return _export_mllama(ckpt, adapters, tmp_out, bits, spec, block_size, keep_lm_head, int4)
    result = OnnxExport(arch=arch.name, graph=graph)
    vision = graph == "xpack" and arch.vision
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=tmp_out.parent, prefix=".xpack-onnx-") as work_dir, quiet():
        work = Path(work_dir)
        full = ckpt
        if vision and adapters:  # the vision tower takes the adapter too: merge the whole checkpoint once
            (work / "merged").mkdir()
            result.notes += list(run_merge(ckpt, adapters, work / "merged", MergeSettings()).plan.notes)
            full, adapters = Checkpoint(work / "merged"), []
        src, notes = _prepare_source(full, adapters, arch, spec, work)
        result.notes += notes
        result.timings["prepare_s"] = round(time.perf_counter() - clock, 2)
        model = _load_torch(src, spec)
        result.exported_class = type(model).__name__
        raw = work / "raw"
        ids = _validation_ids(src, int(model.config.vocab_size))
        window = getattr(model.config, "sliding_window", None)
        reference = _torch_steps(model, ids)
        start = time.perf_counter()
        if graph == "optimum":
            atol = _optimum_export(model, raw, spec.get("opset"))
            result.timings["optimum_export_s"] = round(time.perf_counter() - start, 2)
            del model
        else:
            # the torch model is let go before the graph is built: the two never share the memory
            del model
            gc.collect()
            atol = XPACK_GRAPH_ATOL
            result.graph_facts = _xpack_graph(src, raw, vision)
            result.timings["graph_s"] = round(time.perf_counter() - start, 2)
        embed_raw = raw / EMBED_FILE if vision else None
        result.validation["export"] = _compare(reference, _ort_steps(raw / ONNX_FILE, ids, threads, embed_raw, window), atol)
        result.validation["export"]["reference"] = "transformers fp32 (eager attention), prefill + 1 decode step"
        if not result.validation["export"]["within_tolerance"]:
            result.notes.append(
                f"the fp32 export differs from torch by more than atol {atol:g} (max |logit diff| "
                f"{result.validation['export']['max_abs_diff']['logits']:.3g}); check `xpack verify` figures before use"
            )
        start = time.perf_counter()
        decoder = onnx.load(str(raw / ONNX_FILE))
        decoder, result.quantization = _quantize(decoder, bits, block_size, keep_lm_head, spec, int4)
        result.quantization.setdefault("node_types", weight_node_types(decoder))
        save_model(decoder, tmp_out)
        del decoder
        if vision:
            embed, embed_info = _quantize(onnx.load(str(raw / EMBED_FILE)), bits, block_size, keep_lm_head, spec)
            result.quantization["embed_node_types"] = embed_info.get("node_types") or weight_node_types(embed)
            save_model(embed, tmp_out, EMBED_FILE, EMBED_DATA_FILE)
            result.embed_file, result.embed_data_file = EMBED_FILE, EMBED_DATA_FILE
            del embed
        result.timings["quantize_s"] = round(time.perf_counter() - start, 2)
        if vision:
            start = time.perf_counter()
            result.vision = _export_vision(full.path, tmp_out, bits, threads)
            result.timings["vision_s"] = round(time.perf_counter() - start, 2)
            shutil.copy2(ckpt.path / "config.json", tmp_out / "config.json")  # the full config: image token, tokens per image
            for name in VISION_COMPANIONS:
                if (ckpt.path / name).is_file():
                    shutil.copy2(ckpt.path / name, tmp_out / name)
        else:
            shutil.copy2((raw if graph == "optimum" else src) / "config.json", tmp_out / "config.json")
        _copy_companions(src, tmp_out)
        if not (tmp_out / "generation_config.json").is_file() and (raw / "generation_config.json").is_file():
            shutil.copy2(raw / "generation_config.json", tmp_out / "generation_config.json")
        embed_out = tmp_out / EMBED_FILE if vision else None
        if bits == 32:
            result.validation["artifact"] = {"same_as": "export"}
        else:
            check = _compare(reference, _ort_steps(tmp_out / ONNX_FILE, ids, threads, embed_out, window), atol)
            if not check["finite"]:
                raise XpackError(
                    f"the {bits}-bit ONNX file of {arch.name} gives non-finite logits (fp16 overflow or a broken quantization); "
                    "export with --bits 32 or --bits 8 instead"
                )
            check["reference"] = "transformers fp32, the same input"
            result.validation["artifact"] = check
    result.io = graph_io(tmp_out / ONNX_FILE)
    result.opset = int(result.io["opset"].get("ai.onnx", 0))
    result.timings["total_s"] = round(time.perf_counter() - clock, 2)
    return result
