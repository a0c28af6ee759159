"""The ``qlora`` section of an architecture table: which tensors are 4-bit when transformers loads the
architecture with ``BitsAndBytesConfig(load_in_4bit=True)``, so that ``xpack merge --qlora-base``
(packager/merge/qlora.py) merges into dequant(quant(W)) exactly where the trained model had it.

transformers replaces every ``nn.Linear`` by bitsandbytes' ``Linear4bit``, except the output head
(``get_keys_to_not_convert``: the output embedding, or the weights tied to the input embedding) and
the modules in ``llm_int8_skip_modules``. Which checkpoint tensors are ``nn.Linear`` weights is the
per-architecture part (embeddings, convolutions and Gemma 3's projector matrix are not): ``linear``
lists them, as patterns over the canonical tensor names; the output head is left out everywhere.
tests/test_qlora.py checks each table against the modules bitsandbytes really quantizes in the twins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["QloraSpec"]


@dataclass(frozen=True)
class QloraSpec:
    linear: tuple[re.Pattern, ...]  # the nn.Linear weights transformers turns into Linear4bit

    def quantized(self, canonical_name: str, lm_head_key: str) -> bool:
        """Whether this tensor is a 4-bit weight in the model a QLoRA adapter was trained on."""
        return canonical_name != lm_head_key and any(p.search(canonical_name) for p in self.linear)
