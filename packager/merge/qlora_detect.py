"""Was an adapter trained on a 4-bit base? The common signs, and the one line that says which merge base
xpack uses and how to choose the other. The default never changes silently: a plain merge stays a
plain merge, with this note in the output, the manifest and the card.
"""

from __future__ import annotations

import re

from xpack.packager.merge.lora import Adapter
from xpack.packager.merge.qlora import QloraBase

# Unsloth publishes its 4-bit bases as <model>-bnb-4bit / <model>-unsloth-bnb-4bit; others say 4bit too.
_FOUR_BIT_NAME = re.compile(r"4bit", re.IGNORECASE)
# What Unsloth's load_in_4bit (and QLoRA's recipe) quantize with: NF4 with double quantization.
_USUAL_QLORA = QloraBase("nf4", double_quant=True)


def is_bnb_4bit(quantization_config: dict | None) -> bool:
    """A transformers quantization_config of a bitsandbytes 4-bit model."""
    q = quantization_config or {}
    return bool(q.get("load_in_4bit")) or (q.get("quant_method") == "bitsandbytes" and not q.get("load_in_8bit"))


def four_bit_evidence(adapter: Adapter, base_quantization: dict | None) -> str | None:
    """Why ``adapter`` looks trained on a 4-bit base (a few words), or None."""
    trained_on = str(adapter.config.get("base_model_name_or_path") or "")
    if _FOUR_BIT_NAME.search(trained_on):
        return trained_on
    if is_bnb_4bit(base_quantization):
        return "the base's config.json has a bitsandbytes 4-bit quantization_config"
    return None


def likely_qlora_base(base_quantization: dict | None) -> QloraBase:
    """The 4-bit base the adapter was most likely trained on: the base's quantization_config, else Unsloth's."""
    q = base_quantization if is_bnb_4bit(base_quantization) else {}
    quant_type = q.get("bnb_4bit_quant_type") or _USUAL_QLORA.quant_type
    return QloraBase(quant_type, bool(q.get("bnb_4bit_use_double_quant", _USUAL_QLORA.double_quant)))


def suggested_flags(base_quantization: dict | None) -> str:
    """The options that select the 4-bit base the adapter was most likely trained on."""
    likely = likely_qlora_base(base_quantization)
    return f"--qlora-base {likely.quant_type}" + (" --double-quant" if likely.double_quant else "")


def merge_base_notes(adapters: list[Adapter], base_quantization: dict | None, qlora: QloraBase | None) -> list[str]:
    """One line per adapter that looks 4-bit trained (or, with ``qlora``, per adapter): the merge base used, and the other."""
    notes = []
    for adapter in adapters:
        evidence = four_bit_evidence(adapter, base_quantization)
        if qlora is None:
            if evidence:
                notes.append(
                    f"adapter {adapter.path} was trained on a 4-bit base ({evidence}); merging into the 16-bit weights "
                    f"as asked; pass {suggested_flags(base_quantization)} to merge into the weights it was trained on"
                )
            continue
        why = (
            f"was trained on a 4-bit base ({evidence})"
            if evidence
            else f"does not name a 4-bit base ({adapter.config.get('base_model_name_or_path') or 'no base_model_name_or_path'})"
        )
        notes.append(
            f"adapter {adapter.path} {why}; merging into dequant(quant(W)) ({qlora.label}) as asked; "
            "drop --qlora-base to merge into the 16-bit weights"
        )
    return notes
