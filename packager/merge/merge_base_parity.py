"""``xpack merge --measure-merge-base``: which merge base is closer to the model that was trained? (issue #15)

A QLoRA adapter learned to correct dequant(quant(W)); the merge can add it there (``--qlora-base``) or to the
16-bit weights W. At merge time both choices are measured, teacher-forced on the first tokens of verify's
evaluation text with the torch runtime, against two references run by the same runtime as ``xpack verify``
runs them (``PeftOnBase``): the model as trained (PeftModel on the bitsandbytes 4-bit base, fp32 compute) and
the 16-bit base + adapter (PeftModel on the stored base). The choice not written is merged into a temporary
sibling folder by the same streaming merge and removed afterwards.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from xpack.errors import XpackError
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.merge.lora import Adapter
from xpack.packager.merge.qlora import DEFAULT_BLOCKSIZE, QloraBase
from xpack.packager.merge.qlora_detect import four_bit_evidence, likely_qlora_base
from xpack.packager.merge.stream import MergeSettings, run_merge
from xpack.packager.verify.job import eval_text
from xpack.packager.verify.parity import compare_logits
from xpack.paths import temp_dir
from xpack.profiles.profile import load_profile
from xpack.runtimes.registry import load
from xpack.runtimes.torch_ref import PeftOnBase

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

MEASURE_TOKENS = 256
PROFILE = "cpu16"  # float32 on this machine's CPU: the as-trained reference's compute, as in verify
NEEDS = ("torch", "transformers", "peft", "bitsandbytes")
TEXT = "xpack's evaluation text (packager/verify/data/eval_medical.txt)"


def trained_base(settings: MergeSettings, adapters: list[Adapter], base_quantization: dict | None) -> QloraBase:
    """The 4-bit base of the model as trained. Each reason the measurement cannot run is one line, before any work."""
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise XpackError(f"--measure-merge-base runs the model as trained with {', '.join(NEEDS)}; "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: pip install 'xpack[pack]'")
    trained = settings.qlora
    if trained is None and any(four_bit_evidence(a, base_quantization) for a in adapters):
        trained = likely_qlora_base(base_quantization)
    if trained is None:
        raise XpackError("--measure-merge-base compares the two merge bases of an adapter trained on a 4-bit base, and this one "
                         "shows no sign of it; pass --qlora-base nf4|fp4 (the base it was trained on) or drop --measure-merge-base")
    if trained.blocksize != DEFAULT_BLOCKSIZE:
        raise XpackError(f"--measure-merge-base loads the 4-bit base with transformers, which quantizes in blocks of {DEFAULT_BLOCKSIZE}; "
                         f"drop --blocksize {trained.blocksize} or --measure-merge-base")
    weighted = next((a for a in adapters if a.weight != 1.0), None)
    if weighted is not None:
        raise XpackError(f"--measure-merge-base runs the adapters as PEFT does, at weight 1; drop :{weighted.weight:g} "
                         f"from {weighted.path} or --measure-merge-base")
    return trained


def measure(ckpt: Checkpoint, adapters: list[Adapter], written: Path, settings: MergeSettings, trained: QloraBase) -> dict:
    """The 2x2 figures (both merge bases against both references) for the manifest's ``merge.merge_base_parity``.

    ``written``: the folder holding the merge ``settings`` describe (a QLoRA merge, or a plain merge of an adapter
    detected as 4-bit trained); the other choice is merged next to it, with the same dtype, and removed."""
    qlora_written = settings.qlora is not None
    other = (replace(settings, qlora_base=None, double_quant=False, qlora_blocksize=None) if qlora_written
             else replace(settings, qlora_base=trained.quant_type, double_quant=trained.double_quant, qlora_blocksize=trained.blocksize))
    adapter_paths = tuple(str(a.path) for a in adapters)
    references = {"as_trained": PeftOnBase(adapter_paths, trained.quant_type, trained.double_quant), "base_16bit": PeftOnBase(adapter_paths)}
    profile = load_profile(PROFILE)
    text = eval_text(None)
    with temp_dir("merge-base", dir=written.parent) as folder:
        run_merge(ckpt, adapters, Path(folder), other)
        merges = {"qlora": written, "plain": Path(folder)} if qlora_written else {"qlora": Path(folder), "plain": written}
        scored = {key: _score(ckpt.path, profile, text, peft) for key, peft in references.items()}
        scored.update({key: _score(path, profile, text) for key, path in merges.items()})
    ids = {key: s[0] for key, s in scored.items()}
    if len({tuple(v) for v in ids.values()}) != 1:
        raise XpackError("the merges and the references tokenize the evaluation text differently; the merge-base measurement needs one tokenizer")
    labels = {"qlora": f"dequant(quant(W)), {trained.label}", "plain": "the 16-bit weights W"}
    return {
        "tokens": len(ids["as_trained"]),
        "text": TEXT,
        "profile": PROFILE,
        "written": "qlora" if qlora_written else "plain",
        "as_trained": references["as_trained"].describe(ckpt.path),
        "base_16bit": references["base_16bit"].describe(ckpt.path),
        "choices": [
            {"merge_base": key, "label": labels[key], "written": key == ("qlora" if qlora_written else "plain"),
             **{f"vs_{ref}": _figures(scored[ref][1], scored[key][1]) for ref in references}}
            for key in ("qlora", "plain")
        ],
    }


def _score(path: Path, profile, text: str, peft: PeftOnBase | None = None) -> tuple[list[int], np.ndarray]:
    """(token ids, teacher-forced logits) of the first MEASURE_TOKENS tokens of ``text``, by the torch runtime."""
    with load(path, profile, runtime="torch", **({"peft": peft} if peft else {})) as rt:
        ids = rt.tokenize(text)[:MEASURE_TOKENS]
        return ids, rt.logits(ids)


def _figures(reference: np.ndarray, candidate: np.ndarray) -> dict:
    figures = compare_logits(reference, candidate)
    return {key: figures[key] for key in ("kl_mean", "kl_max", "top1_agreement")}


def summary_lines(parity: dict) -> list[str]:
    """What ``xpack merge`` prints: one line per merge base, KL and top-1 against each reference."""
    lines = [(f"merge base measured on {parity['tokens']} tokens (mean KL, top-1) "
              "vs the model as trained (4-bit base + adapter) | vs the 16-bit base + adapter:")]
    for c in parity["choices"]:
        figures = " | ".join(f"{c[ref]['kl_mean']:.3g}, {c[ref]['top1_agreement']:.1%}" for ref in ("vs_as_trained", "vs_base_16bit"))
        lines.append(f"  {c['label']}{' (written)' if c['written'] else ''}: {figures}")
    return lines
