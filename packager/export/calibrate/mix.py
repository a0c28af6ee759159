"""What every calibrated mix shares, whatever the format: the request, the torch reference it is measured
against on the calibration text, the --max-kl search over file sizes, and the clock of its phases.

gguf_mix.py (llama.cpp's types) and onnx_mix.py (onnxruntime's MatMulNBits widths and blocks) plan with
plan.py on stats.py's statistics and measure here; everything measured here is on the calibration text,
and ``xpack verify`` measures on its own evaluation text.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from xpack.errors import XpackError
from xpack.packager.export.calibrate.plan import TensorOptions, solve
from xpack.packager.export.calibrate.stats import LayerStats
from xpack.packager.export.calibrate.text import CalibrationText
from xpack.packager.verify.parity import compare_logits
from xpack.profiles.machine import resolve_for_machine
from xpack.profiles.profile import load_profile
from xpack.runtimes.registry import load

SIZE_SLACK = 1.05  # --bits N: within the plain type's size + 5%
MAX_ROUNDS = 4
STATS_TOKENS = 2048
MEASURE_TOKENS = 512
SEQ_LEN = 512


@dataclass
class MixRequest:
    bits: int  # 4 or 8: which candidate types
    calibration: CalibrationText
    target_bytes: int | None = None  # --target-size (the whole file)
    max_kl: float | None = None  # --max-kl (mean KL on the calibration text)
    stats_tokens: int = STATS_TOKENS
    measure_tokens: int = MEASURE_TOKENS


def say(message: str) -> None:
    click.echo(f"[xpack calibrate] {message}", err=True)


class Clock:
    """Seconds per phase, for the manifest (where the calibration's time goes)."""

    def __init__(self):
        self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 2)
        self.last = now


def smallest_meeting(options: list[TensorOptions], max_kl: float, fixed: int, build) -> dict:
    """--max-kl: the smallest file whose measured KL meets it, by bisecting the file size with the budget knapsack
    (its choices rank well even where the predicted KL is off by 2-3x), starting where the prediction says."""
    smallest = sum(min(c.bytes for c in o.candidates) for o in options)
    largest = sum(max(c.bytes for c in o.candidates) for o in options)
    first = solve(options, max_kl=max_kl)
    size = sum(c.bytes for c in first.values())
    lo, hi, best, tried = smallest, largest, None, None
    for _ in range(MAX_ROUNDS):
        tried = build(solve(options, budget_bytes=max(size, smallest)))
        if tried["measured"]["kl_mean"] <= max_kl:
            hi, best = size, tried
        else:
            lo = size
        if best is not None and hi - lo <= 0.02 * hi:
            break
        if best is not None:
            size = int(math.sqrt(lo * hi))
        else:  # missed: grow by about sqrt(measured / target) (KL falls roughly with the square of the bytes added)
            growth = min(max(math.sqrt(tried["measured"]["kl_mean"] / max_kl), 1.05), 1.5)
            size = int(min(largest, size * growth))
    return best or tried


def in_parallel(fn: Callable, items, total: int, desc: str, workers: int = 0) -> list:
    """``[fn(item) for item in items]`` on ``workers`` threads (0: the cores), in order, with a progress bar; at most
    2 x workers items in flight, so a generator of weight matrices stays bounded in memory. Threads, not processes:
    the work is numpy and libggml (ctypes), which release the GIL."""
    import os
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    out, pending = [], deque()
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=total, desc=desc, unit="tensor", disable=None) as bar:
        for item in items:
            pending.append(pool.submit(fn, item))
            while len(pending) >= 2 * workers:
                out.append(pending.popleft().result())
                bar.update(1)
        while pending:
            out.append(pending.popleft().result())
            bar.update(1)
    return out


class Reference:
    """Teacher-forced logits of the torch reference on the calibration text (once), and the KL of a GGUF against them."""

    def __init__(self, model_dir: Path, calibration: CalibrationText, max_tokens: int, stats: LayerStats | None = None):
        """The logits come from the statistics' own pass when it kept them (collect_stats' ``keep_logits_tokens``:
        the same model in float32, eager attention), else from the torch runtime."""
        import numpy as np

        self._compare = compare_logits
        profile, _ = resolve_for_machine(load_profile("cpu16"))
        self.profile = dataclasses.replace(profile, n_ctx=SEQ_LEN + 16)
        if stats is not None and stats.reference:
            self.sequences = [ids for ids, _ in stats.reference]
            self.logits = [logits for _, logits in stats.reference]
        else:
            with load(model_dir, self.profile, runtime="torch") as ref:
                self.sequences, _ = calibration.tokenize(ref.tokenizer, SEQ_LEN, max_tokens)
                self.logits = [np.asarray(ref.logits(ids), dtype=np.float32) for ids in self.sequences]
        if not self.sequences:
            raise XpackError(f"the calibration text {calibration.source} has no tokens to measure on")

    def kl(self, logits_of: Callable[[list[int]], "object"]) -> dict:
        """KL and top-1 of a candidate's teacher-forced logits (``logits_of(ids)`` -> [len(ids), vocab]) against the reference's."""
        import numpy as np

        logits = [np.asarray(logits_of(ids), dtype=np.float32) for ids in self.sequences]
        return self._compare(np.concatenate(self.logits), np.concatenate(logits))

    def kl_of_gguf(self, gguf_path: Path) -> dict:
        with load(gguf_path, self.profile, runtime="llamacpp") as art:
            return self.kl(art.logits)
