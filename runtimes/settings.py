"""Generation settings (the seed card's defaults, their only home) and the measured result of a generation."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Sequence

from xpack.errors import XpackError

TokenCallback = Callable[[str], Any]


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings; the defaults are the seed model card's and the only place they are written.

    ``temperature == 0`` means greedy decoding (top_p/top_k are then ignored). ``top_k == 0`` turns
    top-k filtering off. ``seed=None`` draws a fresh seed per call. ``ignore_eos`` generates exactly
    ``max_tokens`` tokens (benchmarks: "time to generate 256 tokens"), end-of-turn tokens included.
    """

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        checks = (
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (_is_number(self.temperature) and self.temperature >= 0, "temperature must be >= 0 (0 means greedy)"),
            (_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 turns it off)"),
            (_is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 turns it off)"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**32), "seed must be an integer in [0, 2**32)"),
        )
        for ok, message in checks:
            if not ok:
                raise XpackError(f"bad generation setting: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_overrides(self, **overrides: Any) -> "GenerationSettings":
        """A copy with the given fields replaced; ``None`` values are ignored (so CLI defaults can be None)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown generation setting(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class GenerationResult:
    """What one ``generate`` call produced and how fast.

    ``completion_tokens`` counts the tokens in ``text`` (the end-of-turn token that stopped the
    generation is not counted). ``ttft_s`` is the time from the start of the prompt's prefill to
    the first sampled token; ``prompt_tok_s = prompt_tokens / ttft_s``; ``decode_tok_s`` is the
    rate of the sampling steps after the first one. ``total_s`` excludes ``load_s``.
    ``peak_rss_mb`` is the process's peak resident memory while loading and generating;
    ``peak_gpu_mb`` is None without a GPU. ``image_encode_s`` is the part of ``ttft_s`` spent
    encoding the image (vision tower + projector); None without an image, or where the runtime
    cannot time it apart from the prefill.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    load_s: float
    ttft_s: float
    decode_tok_s: float
    prompt_tok_s: float
    total_s: float
    peak_rss_mb: float
    peak_gpu_mb: float | None
    finish_reason: str  # "stop" (end of turn) or "length" (max_tokens or the context is full)
    runtime: str
    artifact: str
    profile: str
    settings: dict = dataclasses.field(default_factory=dict)
    image_encode_s: float | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)  # the completion's token ids

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def timing_fields(
    *, text: str, prompt_tokens: int, completion_tokens: int, steps: int, start: float, first: float | None, end: float, finish_reason: str,
    token_ids: Sequence[int] | None = None,
) -> dict:
    """The measured fields of a GenerationResult from raw clock readings.

    ``steps`` is the number of tokens sampled (including a final end-of-turn token); ``first`` is
    the clock when the first one was sampled.
    """
    first = end if first is None else first
    ttft = max(first - start, 1e-9)
    decode_s = end - first
    return {
        "text": text,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "ttft_s": ttft,
        "decode_tok_s": (steps - 1) / decode_s if steps > 1 and decode_s > 0 else 0.0,
        "prompt_tok_s": prompt_tokens / ttft,
        "total_s": end - start,
        "finish_reason": finish_reason,
        "token_ids": list(token_ids or []),
    }


@dataclass
class TokenRun:
    """What a generation's token loop counted: the kept ids, the tokens sampled (a final end-of-turn one
    included), the clock when the first was sampled, and why it stopped."""

    ids: list[int] = dataclasses.field(default_factory=list)
    steps: int = 0
    first: float | None = None
    finish: str = "length"  # "stop" (an end-of-turn token) or "length" (``limit`` ids kept)


def take_tokens(tokens: Iterable[int], stop_ids: Collection[int], limit: int, on_id: Callable[[int], None], run: TokenRun | None = None) -> TokenRun:
    """Draw sampled ids from ``tokens`` until one of ``stop_ids`` (not kept) or ``limit`` kept ids; ``on_id``
    sees each kept id once it is in ``run.ids`` (pass ``run`` when the sampler reads those ids)."""
    run = run if run is not None else TokenRun()
    for token in tokens:
        run.steps += 1
        if run.first is None:
            run.first = time.perf_counter()
        if token in stop_ids:
            run.finish = "stop"
            break
        run.ids.append(token)
        on_id(token)
        if len(run.ids) >= limit:
            break
    return run
