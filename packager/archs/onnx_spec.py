"""The ``onnx`` section of an architecture table: what the ONNX export (packager/export/onnx/) needs to
know about an architecture. Parsed by the tables' one parser (parse.py): an unknown key or a wrong
type is refused with one line naming the table and the key."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Fp16Keep", "GraphSpec", "OnnxSpec", "TextModelSpec"]

NORMS = ("pre", "sandwich")
ACTIVATIONS = ("silu", "gelu_tanh")
PIPELINES = ("mllama",)


@dataclass(frozen=True)
class GraphSpec:
    """``onnx.graph``: how xpack writes the decoder graph itself (packager/export/onnx/decoder_graph.py)."""

    norms: str  # "pre": input_layernorm / post_attention_layernorm (Llama); "sandwich": Gemma's four norms
    activation: str  # "silu" or "gelu_tanh"
    norm_shift: float = 0.0  # Gemma stores RMSNorm weights as w - 1
    embed_scale: bool = False  # Gemma multiplies the embeddings by sqrt(hidden_size)
    qk_norm: bool = False  # Gemma 3: RMSNorm over each head of q and k before the rotary embedding
    attn_scale_key: str | None = None  # config key: attention scale = key ** -0.5 (Gemma's query_pre_attn_scalar)
    attn_softcap_key: str | None = None
    final_softcap_key: str | None = None
    local_rope_base_key: str | None = None  # Gemma 3: sliding layers use this rotary base, unscaled

    def __post_init__(self):
        if self.norms not in NORMS:
            raise ValueError(f"graph.norms is {self.norms!r}; choose one of {', '.join(NORMS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"graph.activation is {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True)
class TextModelSpec:
    """``onnx.text_model``: the text-only checkpoint a vision model's language model is streamed into
    (optimum exports no image-text-to-text decoder), and under which class it is written."""

    architecture: str  # config.json "architectures" of the text checkpoint, e.g. Gemma3ForCausalLM
    model_type: str
    config_key: str  # the top-level config key holding the text config
    keep: tuple[re.Pattern, ...]  # canonical tensor names that belong to the language model
    rename: tuple[tuple[str, str], ...] = ()  # regex -> replacement, canonical name -> text checkpoint name


@dataclass(frozen=True)
class Fp16Keep:
    """``onnx.fp16_keep_fp32``: what the fp16 conversion leaves in float32.

    ``between_kept_nodes``: a tensor that one float32 node hands to another stays float32 too.
    onnxruntime's converter makes every float tensor fp16 and puts casts around the kept nodes, so
    without it such a tensor makes an fp16 round trip (fp32 -> fp16 -> fp32). That is harmless where
    values stay small, but Gemma 3's residual stream (summed in float32 by the kept
    SkipSimplifiedLayerNormalization nodes) passes fp16's 65504 (1.04e5 on gemma-3-270m from layer 7
    on) and comes back inf: with it the residual stream and the norms' inputs stay float32, while the
    MatMuls and the attention run fp16. (optimum's graph adds the residual with plain Adds,
    ``/model/layers.N/Add`` and ``Add_1``, which the Gemma 3 tables name in ``node_patterns``.)
    """

    op_types: tuple[str, ...] = ()
    node_patterns: tuple[re.Pattern, ...] = ()  # searched in node names
    between_kept_nodes: bool = False


@dataclass(frozen=True)
class OnnxSpec:
    model_class: str = "AutoModelForCausalLM"  # the transformers class the torch reference (and optimum) loads
    attn_implementation: str = "eager"
    lm_head_node: re.Pattern = re.compile(r"^/lm_head/")  # the output head's MatMul, searched in node names
    fp16_keep_fp32: Fp16Keep = Fp16Keep()
    graph: GraphSpec | None = None  # None: xpack writes no decoder graph for it (--graph optimum only)
    text_model: TextModelSpec | None = None
    pipeline: str | None = None  # "mllama": three traced graphs (packager/export/onnx/mllama.py)
    bits: tuple[int, ...] = (32,)  # the --bits the mllama pipeline exports
    opset: int | None = None  # optimum's export opset (None: optimum's default)
    unsupported: str | None = None  # why the ONNX export refuses this architecture (the whole error line)

    def __post_init__(self):
        if self.pipeline is not None and self.pipeline not in PIPELINES:
            raise ValueError(f"pipeline is {self.pipeline!r}; choose one of {', '.join(PIPELINES)} or leave it out")
