"""Gemma 3's vision tower (SigLIP) and multi-modal projector as an ONNX graph written by xpack from the checkpoint.

Why a graph of our own rather than ``torch.onnx.export`` (which xpack used before, issue #12): tracing needs the
float32 tower in memory, the traced copy of its weights and then the ONNX proto holding them all, and the traced eager
attention materializes heads x patches^2 floats per layer (MedGemma's 896x896 images: 16 x 4096^2 = 1.07 GB per
matrix, twice with the softmax). The export of Gemma 3 4B peaked at 6.9 GB there. Here the graph is built like the
decoder's (decoder_graph.py): each weight a placeholder whose recipe reads it from the safetensors when it is
written (pending.py), so the tower is never whole in memory, and attention is onnxruntime's fused
``MultiHeadAttention``, whose CPU kernel is a flash attention: measured on 4096 patches x 16 heads, 0.2 GB and 0.43 s
against 1.2 GB and 1.0 s for MatMul/Softmax/MatMul. The same graph is what the runtime runs, so image encoding on the
target machine gains the same.

``pixel_values`` float32 [num_images, channels, size, size] -> ``image_features`` float32
[num_images, mm_tokens_per_image, text_hidden_size], as ``Gemma3ForConditionalGeneration.get_image_features``
computes it in transformers 4.57:

- SiglipVisionEmbeddings: a Conv with stride = kernel = patch size, flattened to patches, plus the position table;
- per encoder layer: LayerNorm, q/k/v (one MatMul, biases added), attention with scale head_dim^-0.5 and no mask,
  out_proj, residual; LayerNorm, fc1, GELU (tanh), fc2, residual;
- post_layernorm;
- Gemma3MultiModalProjector: average pooling of the patch grid to mm_tokens_per_image tokens, Gemma's RMSNorm
  (``1 + w`` folded into the weight, computed in float32) and a MatMul by ``mm_input_projection_weight``
  ([vision_hidden, text_hidden], stored as the MatMul takes it).

Node names follow the module paths (``/vision_tower/layers.N/...``, ``/multi_modal_projector/...``) so the fp16 keep
list of gemma3_vision.py names the projector's norm.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from xpack.errors import XpackError
from xpack.packager.export.onnx.decoder_graph import OPSET, _Builder, _linear, _Weights
from xpack.packager.export.onnx.pending import PendingWeights, Recipe

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["build_vision", "INPUT_NAME", "OUTPUT_NAME", "BATCH_AXIS", "TOWER", "PROJECTOR"]

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_features"
BATCH_AXIS = "num_images"
TOWER = "model.vision_tower.vision_model."  # canonical names (archs/gemma3.json's key_aliases)
PROJECTOR = "model.multi_modal_projector."


def _config_int(config: dict, key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise XpackError(f"config.json: vision_config.{key} = {value!r} is not an integer; this is not a usable Gemma 3 checkpoint") from None


def build_vision(folder: Path, pending: PendingWeights | None = None) -> tuple["onnx.ModelProto", dict]:
    """The vision tower + projector of the Gemma 3 checkpoint in ``folder`` as an ONNX model (float32): weights inline,
    or with ``pending`` placeholders read from the checkpoint when they are written. Returns the model and its facts."""
    weights = _Weights(folder)
    if pending is not None:
        pending.on_close(weights.close)
        return _build(weights, pending)
    try:
        return _build(weights, None)
    finally:
        weights.close()


def _build(weights: _Weights, pending: PendingWeights | None) -> tuple["onnx.ModelProto", dict]:
    import numpy as np
    from onnx import TensorProto, helper

    config = weights.ckpt.config
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
    hidden = _config_int(vision, "hidden_size", 1152)
    heads = _config_int(vision, "num_attention_heads", 16)
    layers = _config_int(vision, "num_hidden_layers", 27)
    size = _config_int(vision, "image_size", 224)
    patch = _config_int(vision, "patch_size", 16)
    channels = _config_int(vision, "num_channels", 3)
    eps = float(vision.get("layer_norm_eps", 1e-6))
    text_hidden = _config_int(text, "hidden_size", 2304)
    side = size // patch
    tokens_side = round(int(config.get("mm_tokens_per_image", 256)) ** 0.5)
    if vision.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh" or vision.get("vision_use_head"):
        raise XpackError("xpack's vision graph writes SigLIP with a tanh GELU and no pooling head, as Gemma 3 has; this checkpoint differs")
    if hidden % heads:
        raise XpackError(f"config.json: the vision hidden size {hidden} is not a multiple of its {heads} heads")
    b = _Builder(pending)

    def tensor(name: str) -> str:
        return b.weight(name, weights.shape(name), Recipe(lambda: weights.get(name), source=name))

    def stacked(names: list[str], name: str) -> str:
        """Biases of q, k, v side by side, as the fused MatMul gives its output."""
        return b.weight(name, (sum(weights.shape(n)[0] for n in names),), Recipe(lambda: np.concatenate([weights.get(n) for n in names])))

    def linear(x: str, p: str, node: str) -> str:
        out = b.one("MatMul", [x, _linear(b, weights, [p + "weight"], p + "weight")], f"{node}/MatMul")
        return b.one("Add", [out, tensor(p + "bias")], f"{node}/Add")

    def layer_norm(x: str, p: str, node: str) -> str:
        return b.one("LayerNormalization", [x, tensor(p + "weight"), tensor(p + "bias")], f"{node}/LayerNormalization", axis=-1, epsilon=eps)

    # -- embeddings: patches [B, hidden, side, side] -> [B, side^2, hidden] + positions
    e = TOWER + "embeddings."
    x = b.one("Conv", [INPUT_NAME, tensor(e + "patch_embedding.weight"), tensor(e + "patch_embedding.bias")],
              "/vision_tower/embeddings/patch_embedding/Conv", kernel_shape=[patch, patch], strides=[patch, patch])
    x = b.one("Reshape", [x, b.const([0, hidden, -1], np.int64)], "/vision_tower/embeddings/Reshape")
    x = b.one("Transpose", [x], "/vision_tower/embeddings/Transpose", perm=[0, 2, 1])
    x = b.one("Add", [x, tensor(e + "position_embedding.weight")], "/vision_tower/embeddings/Add")

    for i in range(layers):
        p, n = f"{TOWER}encoder.layers.{i}.", f"/vision_tower/layers.{i}"
        a = p + "self_attn."
        normed = layer_norm(x, p + "layer_norm1.", f"{n}/layer_norm1")
        qkv_w = _linear(b, weights, [a + f"{t}_proj.weight" for t in "qkv"], a + "qkv_proj.weight")
        qkv = b.one("MatMul", [normed, qkv_w], f"{n}/self_attn/qkv_proj/MatMul")
        qkv = b.one("Add", [qkv, stacked([a + f"{t}_proj.bias" for t in "qkv"], a + "qkv_proj.bias")], f"{n}/self_attn/qkv_proj/Add")
        q, k, v = b.node("Split", [qkv, b.const([hidden] * 3, np.int64)], f"{n}/self_attn/Split", 3, axis=-1)
        attn = b.one("MultiHeadAttention", [q, k, v], f"{n}/self_attn/MultiHeadAttention", "com.microsoft",
                     num_heads=heads, scale=float((hidden // heads) ** -0.5))
        x = b.one("Add", [x, linear(attn, a + "out_proj.", f"{n}/self_attn/out_proj")], f"{n}/self_attn/residual/Add")
        h = linear(layer_norm(x, p + "layer_norm2.", f"{n}/layer_norm2"), p + "mlp.fc1.", f"{n}/mlp/fc1")
        h = b.one("Gelu", [h], f"{n}/mlp/act/Gelu", approximate="tanh")
        x = b.one("Add", [x, linear(h, p + "mlp.fc2.", f"{n}/mlp/fc2")], f"{n}/mlp/residual/Add")
    x = layer_norm(x, TOWER + "post_layernorm.", "/vision_tower/post_layernorm")

    # -- projector: [B, side^2, hidden] -> grid [B, hidden, side, side] -> pooled [B, tokens, hidden] -> text width
    m, kernel = "/multi_modal_projector", side // tokens_side
    x = b.one("Transpose", [x], f"{m}/Transpose", perm=[0, 2, 1])
    x = b.one("Reshape", [x, b.const([0, hidden, side, side], np.int64)], f"{m}/Reshape")
    x = b.one("AveragePool", [x], f"{m}/avg_pool/AveragePool", kernel_shape=[kernel, kernel], strides=[kernel, kernel])
    x = b.one("Reshape", [x, b.const([0, hidden, -1], np.int64)], f"{m}/Reshape_1")
    x = b.one("Transpose", [x], f"{m}/Transpose_1", perm=[0, 2, 1])
    norm = PROJECTOR + "mm_soft_emb_norm.weight"
    norm_w = b.weight(norm, weights.shape(norm), Recipe(lambda: (1.0 + weights.get(norm)).astype(np.float32)))
    x = b.one("SimplifiedLayerNormalization", [x, norm_w], f"{m}/mm_soft_emb_norm/SimplifiedLayerNorm", axis=-1, epsilon=eps, stash_type=1)
    proj = PROJECTOR + "mm_input_projection_weight"
    x = b.one("MatMul", [x, b.weight(proj, weights.shape(proj), Recipe(lambda: weights.get(proj), source=proj))], f"{m}/MatMul")
    b.nodes.append(helper.make_node("Identity", [x], [OUTPUT_NAME], name=f"/{OUTPUT_NAME}/Identity"))

    graph = helper.make_graph(
        b.nodes, "xpack-gemma3-vision",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_AXIS, channels, size, size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_AXIS, tokens_side * tokens_side, text_hidden])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)], producer_name="xpack")
    model.ir_version = 10
    return model, {"graph": "xpack", "layers": layers, "patches": side * side, "nodes": len(b.nodes)}
