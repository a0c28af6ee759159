"""One small interface for every runtime.

Importing this module is cheap (standard library only): the CLI reads the generation defaults from
here at start-up, and runtimes are named by lazy import strings so that picking one never imports
the others' libraries. Only ``runtimes/torch_ref.py`` imports torch/transformers.

    settings = GenerationSettings().with_overrides(temperature=0, max_tokens=32)
    with load("model.gguf", load_profile("cpu16")) as rt:
        result = rt.generate("Describe the findings.", settings, on_token=print)
"""

from __future__ import annotations

import abc
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Sequence

from xpack.errors import XpackError
from xpack.runtimes.memory import PeakMemory
from xpack.runtimes.messages import attach_image, fold_system, load_image, to_messages
from xpack.runtimes.settings import GenerationResult, GenerationSettings, StopTexts, TokenCallback

if TYPE_CHECKING:  # pragma: no cover
    import numpy
    import PIL.Image

    from xpack.profiles.profile import Profile


def context_room(n_prompt: int, n_ctx: int, profile_name: str) -> int:
    """How many tokens may follow a prompt of ``n_prompt`` tokens in a context of ``n_ctx`` (the profile's): one rule
    and one message for every runtime (issue #14: the torch runtime ran a 100k-character prompt until it was killed)."""
    room = n_ctx - n_prompt
    if room < 1:
        raise XpackError(
            f"the prompt is {n_prompt} tokens, more than the context of {n_ctx} (profile {profile_name}'s n_ctx); "
            "shorten it or use a profile with a larger n_ctx"
        )
    return room


class Runtime(abc.ABC):
    """Loads one artifact on one hardware profile; renders chats, tokenizes, generates, scores.

    Subclasses implement ``locate``, ``_load``, ``render_chat``, ``tokenize``, ``_generate``,
    ``logits``, ``vocab_size`` and ``close``; the base class times the load, builds the
    conversation, checks image input, measures peak memory and fills in the result.
    """

    name: ClassVar[str] = ""
    formats: ClassVar[tuple[str, ...]] = ()

    def __init__(self, artifact: "str | os.PathLike", profile: "Profile"):
        self.artifact = Path(artifact)
        self.profile = profile
        self.notes: list[str] = []
        self.accepts_images = False
        # Reuse the KV cache of the previous prompt's common prefix (llama.cpp only): a server's repeated system
        # prompt is not prefilled again. Off by default: a fresh prefill makes the same input give the same output
        # bit for bit, while a reused prefix evaluates the new part in a batch of its own (the last bits can differ).
        self.prompt_cache = False
        with PeakMemory() as mem:
            start = time.perf_counter()
            self._load()
            self.load_s = time.perf_counter() - start
        self.load_peak_rss_mb = mem.peak_mb

    # -- to implement ------------------------------------------------------------------------------

    @staticmethod
    @abc.abstractmethod
    def locate(path: "str | os.PathLike") -> Path:
        """The artifact's main file or folder under ``path``, or a one-line XpackError saying why this
        runtime cannot run it (cheap: looks at names, not weights)."""

    @classmethod
    def can_run(cls, path: "str | os.PathLike") -> bool:
        """Whether ``locate`` finds an artifact of this runtime at ``path``."""
        try:
            cls.locate(path)
        except XpackError:
            return False
        return True

    @abc.abstractmethod
    def _load(self) -> None:
        """Load ``self.artifact`` on ``self.profile`` (called, and timed, by ``__init__``)."""

    @abc.abstractmethod
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it."""

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, special tokens parsed; BOS added as the model's tokenizer does, unless ``text`` starts with it."""

    @abc.abstractmethod
    def _generate(self, text: str, settings: GenerationSettings, image, on_token: TokenCallback | None) -> dict:
        """Generate from the rendered prompt ``text``; returns the measured fields of a GenerationResult."""

    @abc.abstractmethod
    def logits(self, token_ids: Sequence[int]) -> "numpy.ndarray":
        """Teacher-forced next-token logits, float32 of shape [len(token_ids), vocab_size]."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def has_chat_template(self) -> bool:
        return True

    def close(self) -> None:
        """Free the model (idempotent)."""

    def peak_gpu_mb(self) -> float | None:
        """Peak GPU memory of the last generation, None without a GPU."""
        return None

    def logits_with_image(self, prompt: "str | Sequence[dict]", image, continuation_ids: Sequence[int] | None = None) -> tuple["numpy.ndarray", list[int]]:
        """Teacher-forced logits of the chat ``prompt`` with ``image`` (and ``continuation_ids`` after it):
        float32 [tokens, vocab] and the token ids they score. Vision runtimes override this."""
        raise XpackError(self.image_refusal())

    def image_refusal(self, flag: str = "--image") -> str:
        """Why this loaded artifact cannot take an image (one line)."""
        return f"{flag} given but artifact {self.artifact} is text-only; drop {flag} or run a vision model's artifact"

    # -- shared ------------------------------------------------------------------------------------

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.artifact)!r}, profile={self.profile.name!r})"

    def _checked_ids(self, token_ids: Sequence[int]) -> list[int]:
        """``token_ids`` as ints; one outside the vocabulary is a one-line error."""
        ids = [int(t) for t in token_ids]
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise XpackError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return ids

    def prompt_text(self, prompt: "str | Sequence[dict]", image=None) -> str:
        """What ``generate`` feeds the model: the chat-templated conversation (a plain string prompt
        is used as-is when the artifact has no chat template)."""
        if isinstance(prompt, str) and not self.has_chat_template:
            return prompt
        messages = to_messages(prompt)
        if image is not None:
            messages = attach_image(messages)
        try:
            return self.render_chat(messages, add_generation_prompt=True)
        except XpackError:
            folded = fold_system(messages)
            if folded is None:
                raise
            # Gemma's templates refuse a system turn: its text opens the first user turn instead.
            return self.render_chat(folded, add_generation_prompt=True)

    def parallel(self, slots: int) -> None:
        """Run up to ``slots`` generations at once, generate() then being called from several threads (the llamacpp
        runtime's continuous batching); a runtime that holds one sequence says so."""
        if slots > 1:
            raise XpackError(f"the {self.name} runtime runs one sequence at a time on one loaded model")

    def generate(
        self,
        prompt: "str | Sequence[dict]",
        settings: GenerationSettings | None = None,
        image: "str | os.PathLike | PIL.Image.Image | None" = None,
        on_token: TokenCallback | None = None,
        raw: bool = False,
    ) -> GenerationResult:
        """Generate the assistant's answer to ``prompt`` (a user message, or a list of chat messages
        that may start with a system message), streaming each new piece of text to ``on_token``.

        ``raw``: ``prompt`` is a string fed as written, without the chat template (a base model's fine-tune prompted
        as "### Symptoms: ... ### Diagnosis:", or turns written by hand); BOS is added as the tokenizer's config says.
        ``on_token`` may raise :class:`StopGeneration` to end the generation (a server's client went away)."""
        settings = settings or GenerationSettings()
        picture = None
        if raw and not isinstance(prompt, str):
            raise XpackError("a raw prompt is one string, written as the model reads it; pass chat messages without raw")
        if image is not None:
            if not self.accepts_images:
                raise XpackError(self.image_refusal())
            if raw:
                raise XpackError("a raw prompt cannot take an image yet (the image's place in the text is the chat template's); use the chat form")
            picture = image if hasattr(image, "convert") else load_image(image)  # a decoded PIL image (the server's) or a file
        text = prompt if raw else self.prompt_text(prompt, image=picture)
        stops = StopTexts(settings.stop, on_token)
        with PeakMemory() as mem:
            measured = stops.finish(self._generate(text, settings, picture, stops))
        return GenerationResult(
            **measured,
            load_s=self.load_s,
            peak_rss_mb=max(mem.peak_mb, self.load_peak_rss_mb),
            peak_gpu_mb=self.peak_gpu_mb(),
            runtime=self.name,
            artifact=str(self.artifact),
            profile=self.profile.name,
            settings=settings.to_dict(),
        )

