"""Which model ``xpack verify`` measures an artifact against.

Two references, both run by the torch runtime (``runtimes/torch_ref.py``) with the same tokenizer, chat
template, greedy settings and logits:

- the merged checkpoint (``--reference``): what the artifact was exported from;
- the model as trained (``--reference-base`` + ``--reference-adapter`` [+ ``--reference-quant nf4|fp4``]):
  PEFT's PeftModel with the adapters unmerged over the base, the base loaded 4-bit by bitsandbytes with
  float32 compute for a QLoRA adapter, so any artifact is measured against what the user evaluated during
  training (issue #15). Without ``--reference-quant`` (or with ``none``) the base is the 16-bit one.

The options are checked here, before any model loads, each mistake one line.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from xpack.errors import XpackError
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.merge.lora import load_adapter
from xpack.packager.merge.stream import MergeSettings, plan_merge
from xpack.runtimes.torch_ref import PeftOnBase

MERGED_LABEL = "the merged checkpoint"


@dataclass(frozen=True)
class Reference:
    """The folder the reference loads (its tokenizer is the one the parity uses) and, for the model as trained, the adapters."""

    path: Path
    peft: PeftOnBase | None = None

    @property
    def kind(self) -> str:
        return "merged" if self.peft is None else "as-trained"

    @property
    def label(self) -> str:
        """One line for the report, the manifest and the card."""
        return f"{MERGED_LABEL} {self.path}" if self.peft is None else self.peft.describe(self.path)

    @property
    def runtime_options(self) -> dict:
        return {} if self.peft is None else {"peft": self.peft}


def _checkpoint_folder(path: Path, flag: str, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise XpackError(f"{flag} {path} is not a Hugging Face checkpoint folder (no config.json); pass {what}")
    return path


def merged_reference(path: Path) -> Reference:
    return Reference(_checkpoint_folder(path, "--reference", "the merged checkpoint"))


def choose_reference(reference: Path | None = None, base: Path | None = None, adapters: tuple[Path, ...] = (),
                     quant: str | None = None, double_quant: bool = False) -> Reference:
    """The reference the verify options describe; mixed or incomplete options are one line each."""
    quant = None if quant in (None, "none") else quant
    as_trained = base is not None or adapters or quant is not None or double_quant
    if reference is not None and as_trained:
        raise XpackError("--reference (a merged checkpoint) and --reference-base/--reference-adapter/--reference-quant "
                         "(the model as trained) are two references; give one of them")
    if reference is not None:
        return merged_reference(reference)
    if not as_trained:
        raise XpackError("no reference: give --reference MERGED, or --reference-base BASE --reference-adapter ADAPTER [--reference-quant nf4]")
    if base is None:
        given = "--reference-quant" if quant else "--reference-double-quant" if double_quant else "--reference-adapter"
        raise XpackError(f"{given} describes the as-trained reference, which needs --reference-base (the base the adapter was trained on)")
    if not adapters:
        raise XpackError("--reference-base needs --reference-adapter (the adapter trained on it; repeat it for several)")
    if double_quant and quant is None:
        raise XpackError("--reference-double-quant describes the 4-bit base of --reference-quant; add --reference-quant nf4|fp4 or drop it")
    base = _checkpoint_folder(base, "--reference-base", "the base model the adapter was trained on")
    _check_adapters_fit(base, adapters)
    if quant is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise XpackError(f"--reference-quant {quant} loads the base with bitsandbytes, which is not installed; pip install 'xpack[pack]'")
    return Reference(base, PeftOnBase(tuple(str(a) for a in adapters), quant, double_quant))


def _check_adapters_fit(base: Path, adapters: tuple[Path, ...]) -> None:
    """xpack's merge planner names the first module an adapter has and the base lacks (or shapes differently)."""
    try:
        plan_merge(Checkpoint(base), [load_adapter(Path(a)) for a in adapters], MergeSettings())
    except XpackError as exc:  # the planner's hint names merge's option; here the base is --reference-base
        raise XpackError(str(exc).replace(" as --base", " as --reference-base")) from None
