"""The typed record of one architecture table (``packager/archs/*.json``); each export step's
section is a dataclass of its own (``gguf``: gguf_spec.py, ``onnx``: onnx_spec.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from xpack.packager.archs.gguf_spec import GgufSpec
from xpack.packager.archs.onnx_spec import OnnxSpec
from xpack.packager.archs.qlora_spec import QloraSpec


@dataclass(frozen=True)
class Arch:
    """One architecture: its model classes and types, how its tensor names moved between transformers
    versions (``key_aliases``: regex -> replacement applied to old names), its embedding, output head
    and vision parts, its usual LoRA targets, what each export step needs (``gguf``, ``onnx``), and
    which tensors bitsandbytes quantizes when the base is loaded 4-bit for QLoRA (``qlora``).

    ``fp16_overflows``: the model's activations pass float16's 65504 (Gemma 3's residual stream:
    1.04e5 on gemma-3-270m), so float16 gives inf/NaN logits. The torch reference then runs another
    dtype (runtimes/torch_ref.py reads this key from the JSON table) and the ONNX fp16 conversion
    keeps the residual stream in float32 (``onnx.fp16_keep_fp32``)."""

    name: str
    description: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    pipeline_tag: str
    auto_class: str
    vision: bool
    key_aliases: tuple[tuple[str, str], ...]
    embed_key: str
    lm_head_key: str
    vision_prefixes: tuple[str, ...]
    fp16_overflows: bool = False
    lora_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    gguf: GgufSpec | None = None
    onnx: OnnxSpec | None = None
    qlora: QloraSpec | None = None

    def canonical(self, name: str) -> str:
        """A tensor or module name in the naming of current transformers."""
        for pattern, repl in self.key_aliases:
            name = re.sub(pattern, repl, name)
        return name

    def is_vision(self, canonical_name: str) -> bool:
        return any(canonical_name.startswith(p) for p in self.vision_prefixes)


GENERIC = Arch(
    name="generic",
    description="any other transformers model (merged by tensor name, no architecture quirks)",
    architectures=(),
    model_types=(),
    pipeline_tag="text-generation",
    auto_class="AutoModelForCausalLM",
    vision=False,
    key_aliases=(),
    embed_key="model.embed_tokens.weight",
    lm_head_key="lm_head.weight",
    vision_prefixes=(),
)
