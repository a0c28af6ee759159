"""Parity figures between a reference's logits and an artifact's, token by token (numpy only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


# compare_logits works on this many logits at a time (rows x vocabulary): 32 MB of float64 per temporary
ROW_CHUNK_VALUES = 1 << 22


def log_softmax(x: "np.ndarray") -> "np.ndarray":
    import numpy as np  # lazy: `xpack --help` imports this module and must not pay for numpy

    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(reference: "np.ndarray", candidate: "np.ndarray", tie_tolerance: float = 1e-3) -> dict:
    """Top-1 agreement, KL(reference || candidate) mean / p99 / max, and max absolute logit error.

    ``top1_agreement`` is strict. ``top1_agreement_tie_aware`` also accepts a candidate whose top token
    is, in the reference, within ``tie_tolerance`` of the reference's best logit (a near-tie that
    float rounding may break either way, common in random-weight test models).

    Both arrays are [tokens, vocab]; a candidate with a larger vocabulary (padding rows) is cut to
    the reference's, and the reverse is an error: the two do not share a vocabulary.
    """
    import numpy as np

    if reference.ndim != 2 or candidate.ndim != 2 or reference.shape[0] != candidate.shape[0]:
        raise ValueError(f"logits of shapes {reference.shape} and {candidate.shape} cannot be compared")
    v = reference.shape[1]
    if candidate.shape[1] < v:
        raise ValueError(f"candidate vocabulary {candidate.shape[1]} is smaller than the reference's {v}")
    candidate = candidate[:, :v]
    # a few rows at a time, every figure per row: the float64 temporaries of 513 rows of Gemma 3's 262208 logits
    # are 1.1 GB each, and five of them at once made a 17M-parameter verify peak at 5.7 GB
    step = max(1, ROW_CHUNK_VALUES // max(v, 1))
    kl, error = [], 0.0
    for start in range(0, reference.shape[0], step):
        ref, cand = reference[start:start + step], candidate[start:start + step]
        lp, lq = log_softmax(ref), log_softmax(cand)
        kl.append((np.exp(lp) * (lp - lq)).sum(axis=-1))
        error = max(error, float(np.abs(ref.astype(np.float64) - cand).max()))
    kl = np.concatenate(kl)
    ref_top, cand_top = reference.argmax(-1), candidate.argmax(-1)
    rows = np.arange(reference.shape[0])
    near = reference.max(-1) - reference[rows, cand_top] <= tie_tolerance
    return {
        "tokens": int(reference.shape[0]),
        "top1_agreement": float((ref_top == cand_top).mean()),
        "top1_agreement_tie_aware": float(((ref_top == cand_top) | near).mean()),
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "max_abs_logit_error": error,
        "reference_logit_range": float(np.abs(reference).max()),
    }
