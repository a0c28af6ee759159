"""Generation settings (the seed card's defaults, their only home) and the measured result of a generation."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Sequence

from xpack.errors import XpackError

TokenCallback = Callable[[str], Any]
MAX_STOP_STRINGS = 4  # OpenAI's limit


class StopGeneration(Exception):
    """Raised by an ``on_token`` callback to end the generation after the current token: a stop string was written
    (``reason`` "stop") or the caller went away (a server's client disconnected: "cancelled")."""

    def __init__(self, reason: str = "stop"):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings; the defaults are the seed model card's and the only place they are written.

    ``temperature == 0`` means greedy decoding (top_p/top_k are then ignored). ``top_k == 0`` turns
    top-k filtering off. ``seed=None`` draws a fresh seed per call. ``ignore_eos`` generates exactly
    ``max_tokens`` tokens (benchmarks: "time to generate 256 tokens"), end-of-turn tokens included.
    ``stop``: strings that end the answer where they first appear (not included in it), as OpenAI's ``stop``.
    ``frequency_penalty`` / ``presence_penalty``: OpenAI's, subtracted from a token's logit per time the answer has
    generated it / once if it has (runtimes/penalties.py, the same on every backend); 0 turns them off.
    """

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self):
        checks = (
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (_is_number(self.temperature) and self.temperature >= 0, "temperature must be >= 0 (0 means greedy)"),
            (_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 turns it off)"),
            (_is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 turns it off)"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**32), "seed must be an integer in [0, 2**32)"),
            (isinstance(self.stop, tuple) and len(self.stop) <= MAX_STOP_STRINGS and all(isinstance(t, str) and t for t in self.stop),
             f"stop must be at most {MAX_STOP_STRINGS} non-empty strings"),
            (_is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2] (0 turns it off)"),
            (_is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2] (0 turns it off)"),
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
        values = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(values.get("stop"), (list, str)):
            values["stop"] = (values["stop"],) if isinstance(values["stop"], str) else tuple(values["stop"])
        return dataclasses.replace(self, **values)

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
        try:
            on_id(token)
        except StopGeneration as stop:
            run.finish = stop.reason
            break
        if len(run.ids) >= limit:
            break
    return run


class StopTexts:
    """The ``on_token`` every runtime's generation gets (Runtime.generate wraps the caller's): it holds back text
    that may be the start of a stop string, hands the rest on, and ends the generation (:class:`StopGeneration`) at the
    first stop string, which the answer does not include. After the generation ends, later calls are ignored: the
    runtimes flush their decoder's tail once more."""

    def __init__(self, stops: Sequence[str], on_token: TokenCallback | None):
        self.stops = tuple(stops)
        self.on_token = on_token
        self.text = ""  # everything generated so far
        self.sent = 0  # how much of it the caller has
        self.cut: int | None = None  # where the first stop string starts
        self.ended: str | None = None

    def __call__(self, piece: str) -> None:
        if self.ended is not None:
            return
        self.text += piece
        hits = [i for i in (self.text.find(stop, max(0, self.sent - len(stop) + 1)) for stop in self.stops) if i >= 0]
        if hits:
            self.cut = min(hits)
            self._send(self.cut)
            self.ended = "stop"
            raise StopGeneration("stop")
        held = max((self._partial(stop) for stop in self.stops), default=0)
        self._send(len(self.text) - held)

    def _partial(self, stop: str) -> int:
        """The length of the longest end of the text that begins ``stop``."""
        for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
            if self.text.endswith(stop[:n]):
                return n
        return 0

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            piece, self.sent = self.text[self.sent : upto], upto
            if self.on_token is not None:
                try:
                    self.on_token(piece)
                except StopGeneration as stop:
                    self.ended = stop.reason
                    raise

    def finish(self, measured: dict) -> dict:
        """The runtime's result with the answer cut at the first stop string and the held-back text handed on."""
        text = measured["text"]
        cuts = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if cuts:
            measured = {**measured, "text": text[: min(cuts)], "finish_reason": "stop"}
        elif self.ended is None:
            self.text, self.ended = text, "done"
            if len(text) > self.sent and self.on_token is not None:
                self.on_token(text[self.sent :])
        return measured
