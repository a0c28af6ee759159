"""OpenAI's frequency and presence penalties, one definition for every runtime.

OpenAI subtracts ``count * frequency_penalty + (count > 0) * presence_penalty`` from the logit of each token the
answer has generated so far (the prompt does not count). llama.cpp has both in its penalties sampler, but that
sampler shares one window with the repetition penalty, which xpack fills with the prompt too (transformers'
semantics for the seed card's ``repetition_penalty``: llamacpp.py's ``_penalize_prompt``); so the llama.cpp runtime
applies these two through this function as a logits processor instead, and the ONNX runtimes and the torch
reference apply the same arithmetic, so every backend means the same by them.
"""

from __future__ import annotations

from typing import Sequence


def penalize(logits, generated: Sequence[int], frequency: float, presence: float):
    """``logits`` (a numpy row over the vocabulary, changed in place and returned) with OpenAI's penalties for the
    ``generated`` token ids."""
    import numpy as np

    if not generated or (frequency == 0 and presence == 0):
        return logits
    ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    keep = ids < logits.shape[-1]
    ids, counts = ids[keep], counts[keep]
    logits[ids] -= (counts * frequency + presence).astype(logits.dtype)
    return logits
