"""A decoder graph written by xpack from the checkpoint's tensors, with onnxruntime's fused operators.

Why we write a graph ourselves instead of only exporting with optimum: optimum traces the transformers
forward, so every layer is ~100 small ONNX nodes (rotary embedding, repeat_kv, masks, softmax, cache
concatenation) that onnxruntime dispatches one by one at every decoded token. onnxruntime's own
generator (onnxruntime-genai's ``builder.py``) writes the same model as ~10 nodes per layer around
its fused ``GroupQueryAttention`` (rotary, KV cache append, causal/sliding mask, softcap and GQA in
one kernel) and ``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm); that builder needs
transformers 5 and its own runtime, so xpack writes the graph the same way here, from the
architecture tables (``archs/*.json``: ``onnx.graph``, read as archs/onnx_spec.py's GraphSpec), with the interface optimum's graphs have, so
one runtime runs both:

  inputs   input_ids [batch, seq] (or inputs_embeds [batch, seq, hidden] for a vision model's decoder),
           attention_mask [batch, past + seq], past_key_values.{i}.key/value [batch, kv_heads, past, head_dim]
  outputs  logits [batch, seq, vocab], present.{i}.key/value [batch, kv_heads, past + seq, head_dim]

Numerics follow transformers' eager forward in float32: RMSNorm weights get Gemma's ``1 + w`` folded
in, the rotary tables come from transformers' own ``ROPE_INIT_FUNCTIONS`` (so llama3/linear/yarn
scaling and Gemma 3's local/global bases are exactly the reference's), the embedding scale of Gemma
is ``sqrt(hidden_size)``, softcapping and sliding windows are attributes of the attention kernel.
The graph is checked against torch like optimum's export is (``packager/export/onnx/torch_check.py``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from xpack.errors import XpackError
from xpack.packager.archs import require_arch
from xpack.packager.archs.onnx_spec import GraphSpec
from xpack.packager.export.onnx.pending import PendingWeights, Recipe
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.tensors import FLOAT_DTYPES, Reader

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import onnx

OPSET = 21
# Rotary tables are written for this many positions at most (the checkpoint's max_position_embeddings
# when smaller): 8192 x head_dim/2 floats x 2 tables x (local, global) stays a few MB, where Gemma 3's
# 131072 positions would put 256 MB of tables into every export. The runtime refuses longer contexts.
MAX_LENGTH = 8192


def graph_spec_of(config: dict) -> GraphSpec:
    """The ``onnx.graph`` section of the checkpoint's architecture table; none is a one-line error."""
    arch = require_arch(config, "ONNX export")
    spec = arch.onnx
    if spec is None or spec.graph is None:
        raise XpackError(f"xpack writes no ONNX decoder graph for {arch.name}; export with --graph optimum")
    return spec.graph


class _Weights:
    """The checkpoint's tensors as float32 numpy arrays, by name (every shard opened once)."""

    def __init__(self, folder: Path):
        self.ckpt = Checkpoint(folder)
        self.arch = require_arch(self.ckpt.config, "ONNX export")
        self.where: dict[str, tuple[Path, str, str, tuple[int, ...]]] = {}
        for path, specs in self.ckpt.headers.items():
            for name, spec in specs.items():
                self.where[self.arch.canonical(name)] = (path, name, spec.dtype, tuple(spec.shape))
        self.readers: dict[Path, Reader] = {}

    def has(self, name: str) -> bool:
        return name in self.where

    def _entry(self, name: str) -> tuple[Path, str, str, tuple[int, ...]]:
        if name not in self.where:
            raise XpackError(f"{self.ckpt.path} has no tensor {name}; re-save the checkpoint with transformers")
        return self.where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the safetensors header (nothing read)."""
        return self._entry(name)[3]

    def get(self, name: str) -> "np.ndarray":
        path, raw, dtype, _ = self._entry(name)
        if dtype not in FLOAT_DTYPES:
            raise XpackError(f"{self.ckpt.path}: tensor {name} is stored as {dtype}, not a float; xpack's ONNX graph reads float checkpoints (merge a quantized one first)")
        if path not in self.readers:
            self.readers[path] = Reader(path)
        return self.readers[path].get_float32(raw)

    def rows(self, name: str, start: int, stop: int) -> "np.ndarray":
        """Rows ``start:stop`` of a float tensor as float32 (quantize.py's row-wise table)."""
        path, raw, dtype, _ = self._entry(name)
        if dtype not in FLOAT_DTYPES:
            raise XpackError(f"{self.ckpt.path}: tensor {name} is stored as {dtype}, not a float; xpack's ONNX graph reads float checkpoints (merge a quantized one first)")
        if path not in self.readers:
            self.readers[path] = Reader(path)
        return self.readers[path].get_float32_rows(raw, start, stop)

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def rotary_tables(folder: Path, length: int, local: bool):
    """cos/sin [length, rotary_dim/2] (attention scaling folded in) as transformers computes them."""
    import copy

    import numpy as np
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    config = getattr(config, "text_config", None) or config
    if local:  # as Gemma3TextModel builds its rotary_emb_local
        config = copy.deepcopy(config)
        config.rope_theta = config.rope_local_base_freq
        config.rope_scaling = {"rope_type": "default"}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise XpackError(f"rotary scaling {rope_type} is not one xpack's ONNX graph supports (known: {', '.join(ROPE_INIT_FUNCTIONS)}); export with --graph optimum")
    if rope_type == "dynamic":
        raise XpackError("dynamic NTK rotary scaling changes with the sequence length, which a fixed ONNX table cannot hold; export with --graph optimum")
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    positions = torch.arange(length, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq.float())
    cos = (freqs.cos() * attention_scaling).numpy().astype(np.float32)
    sin = (freqs.sin() * attention_scaling).numpy().astype(np.float32)
    return cos, sin


class _Builder:
    """Accumulates nodes and initializers; names follow optimum's (/model/layers.N/...) so the
    fp16 keep-lists and lm_head patterns of the architecture tables apply to both graphs. With ``pending``
    (pending.py) every weight is a placeholder with its recipe, read only when it is written; without, in the graph."""

    def __init__(self, pending: PendingWeights | None = None):
        self.nodes: list = []
        self.inits: list = []
        self._consts: dict = {}
        self.pending = pending

    def init(self, name: str, array) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], recipe: Recipe) -> str:
        """A weight initializer of ``shape`` made by ``recipe``: a placeholder when pending, else its values."""
        import numpy as np

        if self.pending is not None:
            self.inits.append(self.pending.placeholder(name, shape, recipe))
            return name
        return self.init(name, np.ascontiguousarray(recipe.make()))

    def const(self, value, dtype) -> str:
        import numpy as np
        from onnx import helper, numpy_helper

        key = (repr(value), np.dtype(dtype).str)
        if key not in self._consts:
            # a Constant node, not an initializer: the export moves every initializer to the external
            # data file, and onnxruntime's shape inference must read axes and shapes from the graph
            name = f"/const/{len(self._consts)}"
            tensor = numpy_helper.from_array(np.array(value, dtype=dtype), name)
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}/Constant", value=tensor))
            self._consts[key] = name
        return self._consts[key]

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        outs = [f"{name}/output_{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        return self.node(op, inputs, name, 1, domain, **attrs)[0]


def _norm_weight(w: "np.ndarray", spec: GraphSpec) -> "np.ndarray":
    return (w + spec.norm_shift).astype("float32") if spec.norm_shift else w


def _norm(b: _Builder, weights: _Weights, spec: GraphSpec, name: str) -> str:
    """A norm's weight (Gemma's 1 + w folded in)."""
    return b.weight(name, weights.shape(name), Recipe(lambda: _norm_weight(weights.get(name), spec)))


def _linear(b: _Builder, weights: _Weights, names: list[str], name: str) -> str:
    """The MatMul weight [K, N] of the checkpoint's linear weights ``names`` ([N_i, K] each, stacked along N)."""
    import numpy as np

    shapes = [weights.shape(n) for n in names]
    shape = (shapes[0][1], sum(s[0] for s in shapes))
    if len(names) == 1:
        return b.weight(name, shape, Recipe(lambda: weights.get(names[0]).T, source=names[0], transposed=True))
    return b.weight(name, shape, Recipe(lambda: np.concatenate([weights.get(n) for n in names], axis=0).T))


def _head_norm(b: _Builder, x: str, heads: int, head_dim: int, weight_name: str, node: str, weights: _Weights, spec: GraphSpec, eps: float) -> str:
    import numpy as np

    w = _norm(b, weights, spec, weight_name)
    shape = b.one("Shape", [x], f"{node}/Shape")
    per_head = b.one("Reshape", [x, b.const([0, 0, heads, head_dim], np.int64)], f"{node}/Reshape")
    normed = b.one("SimplifiedLayerNormalization", [per_head, w], f"{node}/SimplifiedLayerNorm", axis=-1, epsilon=eps, stash_type=1)
    return b.one("Reshape", [normed, shape], f"{node}/Reshape_1")


def _layer_types(cfg: dict) -> list[str]:
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == n:
        return list(types)
    if cfg.get("sliding_window") and cfg.get("sliding_window_pattern"):  # older Gemma 3 configs
        p = int(cfg["sliding_window_pattern"])
        return ["full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(n)]
    return ["full_attention"] * n


def build_decoder(folder: Path, *, inputs_embeds: bool = False, max_length: int = MAX_LENGTH,
                  pending: PendingWeights | None = None) -> tuple["onnx.ModelProto", dict]:
    """The decoder of the text checkpoint in ``folder`` as an ONNX model (float32): weights inline, or with
    ``pending`` placeholders whose recipes read the checkpoint when the weights are written (pending.py).

    ``inputs_embeds=True`` writes the decoder of a vision model: it takes ``inputs_embeds`` (text
    embeddings with the image features put in at the image tokens) and the attention masks as
    additive biases, ``attention_bias`` [batch, 1, seq, past + seq] and, with sliding layers,
    ``attention_bias_sliding``: Gemma 3 lets the tokens of one image see each other both ways
    (transformers' token_type_ids mask), which a causal kernel cannot express, so attention runs
    with causal=0 and the runtime writes the masks (causal, sliding window, image blocks).
    """
    weights = _Weights(folder)
    cfg = weights.ckpt.config.get("text_config") or weights.ckpt.config
    spec = graph_spec_of(weights.ckpt.config)
    if pending is not None:  # the recipes read the checkpoint until the weights are written
        pending.on_close(weights.close)
        return _build(weights, cfg, spec, folder, inputs_embeds, max_length, pending)
    try:
        return _build(weights, cfg, spec, folder, inputs_embeds, max_length, None)
    finally:
        weights.close()


def _build(weights: _Weights, cfg: dict, spec: GraphSpec, folder: Path, inputs_embeds: bool, max_length: int,
           pending: PendingWeights | None) -> tuple["onnx.ModelProto", dict]:
    import numpy as np
    from onnx import TensorProto, helper

    b = _Builder(pending)
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    layers = int(cfg["num_hidden_layers"])
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    length = min(int(cfg.get("max_position_embeddings") or max_length), max_length)
    types = _layer_types(cfg)
    window = int(cfg.get("sliding_window") or 0)
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise XpackError("xpack's ONNX graph has no attention/MLP biases; export this checkpoint with --graph optimum")
    scale = float(cfg[spec.attn_scale_key]) ** -0.5 if spec.attn_scale_key else head_dim**-0.5
    attn_softcap = float(cfg.get(spec.attn_softcap_key) or 0.0) if spec.attn_softcap_key else 0.0
    final_softcap = float(cfg.get(spec.final_softcap_key) or 0.0) if spec.final_softcap_key else 0.0

    graph_inputs = []
    if inputs_embeds:
        graph_inputs.append(helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch_size", "sequence_length", hidden]))
    else:
        graph_inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
    graph_inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]))
    biased = inputs_embeds
    if biased:
        graph_inputs.append(helper.make_tensor_value_info("attention_bias", TensorProto.FLOAT, ["batch_size", 1, "sequence_length", "total_sequence_length"]))
        if window and "sliding_attention" in types:
            graph_inputs.append(helper.make_tensor_value_info("attention_bias_sliding", TensorProto.FLOAT, ["batch_size", 1, "sequence_length", "total_sequence_length"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", None])]

    # -- embeddings
    vocab = weights.shape("model.embed_tokens.weight")[0]
    if inputs_embeds:
        x = "inputs_embeds"
    else:
        x = b.one("Gather", [_embedding(b, weights), "input_ids"], "/model/embed_tokens/Gather")
        if spec.embed_scale:
            x = b.one("Mul", [x, b.const(np.float32(math.sqrt(hidden)), np.float32)], "/model/embed_tokens/Mul")

    # -- what every attention node shares: cache lengths from the mask, rotary tables
    mask_sum = b.one("ReduceSum", ["attention_mask", b.const([1], np.int64)], "/model/attn_mask_reformat/ReduceSum", keepdims=0)
    seqlens = b.one("Cast", [b.one("Sub", [mask_sum, b.const(1, np.int64)], "/model/attn_mask_reformat/Sub")], "/model/attn_mask_reformat/Cast", to=TensorProto.INT32)
    mask_shape = b.one("Shape", ["attention_mask"], "/model/attn_mask_reformat/Shape")
    total = b.one("Cast", [b.one("Gather", [mask_shape, b.const(1, np.int64)], "/model/attn_mask_reformat/Gather", axis=0)], "/model/attn_mask_reformat/Cast_1", to=TensorProto.INT32)
    cos, sin = rotary_tables(folder, length, local=False)
    rope = {"global": (b.init("cos_cache", cos), b.init("sin_cache", sin))}
    if spec.local_rope_base_key and cfg.get(spec.local_rope_base_key) and "sliding_attention" in types:
        cos, sin = rotary_tables(folder, length, local=True)
        rope["local"] = (b.init("cos_cache_local", cos), b.init("sin_cache_local", sin))

    def matmul(inp: str, weight_name: str, node: str) -> str:
        return b.one("MatMul", [inp, _linear(b, weights, [weight_name], weight_name)], node)

    def rmsnorm(inp: str, weight_name: str, node: str) -> str:
        w = _norm(b, weights, spec, weight_name)
        return b.one("SimplifiedLayerNormalization", [inp, w], node, axis=-1, epsilon=eps, stash_type=1)

    def skip_norm(inp: str, skip: str, weight_name: str, node: str) -> tuple[str, str]:
        w = _norm(b, weights, spec, weight_name)
        out, _, _, total_sum = b.node("SkipSimplifiedLayerNormalization", [inp, skip, w], node, 4, "com.microsoft", epsilon=eps)
        return out, total_sum

    residual = None
    normed = None
    for i in range(layers):
        p = f"model.layers.{i}."
        n = f"/model/layers.{i}"
        # input norm (fused with the previous layer's residual add)
        if residual is None:
            normed, residual = rmsnorm(x, p + "input_layernorm.weight", f"{n}/input_layernorm/SimplifiedLayerNorm"), x
        else:
            normed, residual = skip_norm(x, residual, p + "input_layernorm.weight", f"{n}/input_layernorm/SkipSimplifiedLayerNorm")
        # q, k, v in one MatMul (one bigger GEMV per token instead of three)
        qkv_w = _linear(b, weights, [p + f"self_attn.{t}_proj.weight" for t in "qkv"], p + "self_attn.qkv_proj.weight")
        qkv = b.one("MatMul", [normed, qkv_w], f"{n}/attn/qkv_proj/MatMul")
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        for name in (past_k, past_v):
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size", kv_heads, "past_sequence_length", head_dim]))
        for name in (f"present.{i}.key", f"present.{i}.value"):
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size", kv_heads, "total_sequence_length", head_dim]))
        sliding = types[i] == "sliding_attention" and window > 0
        cos_name, sin_name = rope["local" if sliding and "local" in rope else "global"]
        if spec.qk_norm:
            # per-head RMSNorm of q and k before the rotary embedding. GroupQueryAttention's own
            # q_norm_weight/k_norm_weight inputs would fuse this, but onnxruntime 1.32 implements
            # them on CUDA and WebGPU only, so the graph does it: split, view as heads, norm, view back.
            q, k, v = b.node("Split", [qkv, b.const([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], np.int64)], f"{n}/attn/qkv_proj/Split", 3, axis=-1)
            q = _head_norm(b, q, heads, head_dim, p + "self_attn.q_norm.weight", f"{n}/attn/q_norm", weights, spec, eps)
            k = _head_norm(b, k, kv_heads, head_dim, p + "self_attn.k_norm.weight", f"{n}/attn/k_norm", weights, spec, eps)
            gqa_inputs = [q, k, v]
        else:
            gqa_inputs = [qkv, "", ""]  # packed q|k|v: the kernel splits it
        gqa_inputs += [past_k, past_v, seqlens, total, cos_name, sin_name]
        attrs = dict(num_heads=heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1, rotary_interleaved=0)
        if attn_softcap:
            attrs["softcap"] = attn_softcap
        if biased:  # the masks come in as biases (see build_decoder)
            gqa_inputs += ["", "attention_bias_sliding" if sliding else "attention_bias"]
            attrs["causal"] = 0
        elif sliding:
            # the kernel's window equals transformers' sliding_window (checked against torch on a
            # sequence 5x the window in tests/test_onnx.py; window - 1 or + 1 gives top-1 ~50%)
            attrs["local_window_size"] = window
        attn, _, _ = b.node("GroupQueryAttention", gqa_inputs, f"{n}/attn/GroupQueryAttention", [f"{n}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"], "com.microsoft", **attrs)
        attn = matmul(attn, p + "self_attn.o_proj.weight", f"{n}/attn/o_proj/MatMul")
        if spec.norms == "sandwich":
            attn = rmsnorm(attn, p + "post_attention_layernorm.weight", f"{n}/post_attention_layernorm/SimplifiedLayerNorm")
            normed, residual = skip_norm(attn, residual, p + "pre_feedforward_layernorm.weight", f"{n}/pre_feedforward_layernorm/SkipSimplifiedLayerNorm")
        else:
            normed, residual = skip_norm(attn, residual, p + "post_attention_layernorm.weight", f"{n}/post_attention_layernorm/SkipSimplifiedLayerNorm")
        gate = matmul(normed, p + "mlp.gate_proj.weight", f"{n}/mlp/gate_proj/MatMul")
        up = matmul(normed, p + "mlp.up_proj.weight", f"{n}/mlp/up_proj/MatMul")
        if spec.activation == "silu":
            act = b.one("Mul", [gate, b.one("Sigmoid", [gate], f"{n}/mlp/act_fn/Sigmoid")], f"{n}/mlp/act_fn/Mul")
        else:
            act = b.one("Gelu", [gate], f"{n}/mlp/act_fn/Gelu", approximate="tanh")
        x = matmul(b.one("Mul", [act, up], f"{n}/mlp/Mul"), p + "mlp.down_proj.weight", f"{n}/mlp/down_proj/MatMul")
        if spec.norms == "sandwich":
            x = rmsnorm(x, p + "post_feedforward_layernorm.weight", f"{n}/post_feedforward_layernorm/SimplifiedLayerNorm")

    final, _ = skip_norm(x, residual, "model.norm.weight", "/model/norm/SkipSimplifiedLayerNorm")
    head = "lm_head.weight" if weights.has("lm_head.weight") else "model.embed_tokens.weight"  # tied: the embedding, transposed
    logits = b.one("MatMul", [final, _linear(b, weights, [head], "lm_head.weight")], "/lm_head/MatMul")
    if final_softcap:
        logits = b.one("Div", [logits, b.const(np.float32(final_softcap), np.float32)], "/Div")
        logits = b.one("Tanh", [logits], "/Tanh")
        logits = b.one("Mul", [logits, b.const(np.float32(final_softcap), np.float32)], "/Mul")
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits/Identity"))

    graph = helper.make_graph(b.nodes, "xpack-decoder", graph_inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)], producer_name="xpack")
    model.ir_version = 10
    facts = {
        "graph": "xpack",
        "max_length": length,
        "layers": layers,
        "sliding_layers": sum(1 for t in types if t == "sliding_attention") if window else 0,
        "vocab": int(vocab),
        "inputs_embeds": inputs_embeds,
        "sliding_window": window if "sliding_attention" in types else None,
        "nodes": len(b.nodes),
    }
    return model, facts


def _embedding(b: _Builder, weights: _Weights) -> str:
    name = "model.embed_tokens.weight"
    return b.weight(name, weights.shape(name), Recipe(lambda: weights.get(name), source=name, rows=lambda a, z: weights.rows(name, a, z)))


def build_embedding(folder: Path, pending: PendingWeights | None = None) -> "onnx.ModelProto":
    """input_ids -> inputs_embeds (scaled as the model scales them): the text side of a vision model's prompt
    (``pending``: the table as a placeholder, see :func:`build_decoder`)."""
    import numpy as np
    from onnx import TensorProto, helper

    weights = _Weights(folder)
    if pending is not None:
        pending.on_close(weights.close)
    try:
        spec = graph_spec_of(weights.ckpt.config)
        cfg = weights.ckpt.config.get("text_config") or weights.ckpt.config
        b = _Builder(pending)
        hidden = weights.shape("model.embed_tokens.weight")[1]
        x = b.one("Gather", [_embedding(b, weights), "input_ids"], "/model/embed_tokens/Gather")
        if spec.embed_scale:
            x = b.one("Mul", [x, b.const(np.float32(math.sqrt(int(cfg["hidden_size"]))), np.float32)], "/model/embed_tokens/Mul")
        b.nodes.append(helper.make_node("Identity", [x], ["inputs_embeds"], name="/inputs_embeds/Identity"))
        graph = helper.make_graph(
            b.nodes, "xpack-embedding",
            [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
            [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch_size", "sequence_length", hidden])],
            initializer=b.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="xpack")
        model.ir_version = 10
        return model
    finally:
        if pending is None:
            weights.close()
