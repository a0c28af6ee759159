"""One small interface for every runtime, the generation defaults, and the registry.

Importing this module is cheap (standard library only): the CLI reads the generation defaults from
here at start-up, and runtimes are named by lazy import strings so that picking one never imports
the others' libraries. Only ``runtimes/torch_ref.py`` imports torch/transformers.

    settings = GenerationSettings().with_overrides(temperature=0, max_tokens=32)
    with load("model.gguf", load_profile("cpu16")) as rt:
        result = rt.generate("Describe the findings.", settings, on_token=print)
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Sequence

from xpack.errors import XpackError

if TYPE_CHECKING:  # pragma: no cover
    import numpy

    from xpack.runtimes.profiles import Profile

__all__ = [
    "GenerationSettings",
    "GenerationResult",
    "Runtime",
    "PeakMemory",
    "RUNTIMES",
    "FORMAT_RUNTIMES",
    "END_OF_TURN_TOKENS",
    "get_runtime",
    "runtime_for",
    "load",
    "to_messages",
    "user_message",
    "load_image",
]

# Lazy "module:Class" strings: importing this module never imports a runtime's libraries.
RUNTIMES: dict[str, str] = {
    "torch": "xpack.runtimes.torch_ref:TorchRuntime",
    "llamacpp": "xpack.runtimes.llamacpp:LlamaCppRuntime",
    "onnx": "xpack.runtimes.onnxrt:OnnxRuntime",
}

# Artifact format (as in manifest.json "format" and Profile.formats) -> the runtime that runs it.
FORMAT_RUNTIMES: dict[str, str] = {"gguf": "llamacpp", "onnx": "onnx", "torch": "torch"}

# Tokens that end an assistant turn in the chat formats of the seed models (and common others);
# a runtime stops on the model's EOS and on any of these that its vocabulary has as one token.
END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<end_of_turn>",  # Gemma 2/3, MedGemma
    "<|eot_id|>",  # Llama 3.x
    "<|eom_id|>",  # Llama 3.x (end of a tool-call message)
    "<|im_end|>",  # ChatML (SmolLM2, Qwen)
    "<|end|>",  # Phi-3
    "<|endoftext|>",
    "<|end_of_text|>",
)


# --------------------------------------------------------------------------------------------------
# Settings and results
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak resident memory (MB) of this process over a ``with`` block.

    A daemon thread samples psutil's RSS every ``interval`` seconds; ``ru_maxrss`` (the kernel's
    exact high-water mark) is used too when it rose during the block, which catches spikes shorter
    than the sampling interval.
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_mb: float = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._maxrss_start = 0.0

    def __enter__(self) -> "PeakMemory":
        import psutil

        self._process = psutil.Process()
        self._maxrss_start = _ru_maxrss_mb()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="xpack-peak-memory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        try:
            rss = self._process.memory_info().rss / 2**20
        except Exception:  # noqa: BLE001 - a failed sample must never break generation
            return
        if rss > self.peak_mb:
            self.peak_mb = rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        maxrss_end = _ru_maxrss_mb()
        if maxrss_end > self._maxrss_start:  # a new all-time high was reached inside the block
            self.peak_mb = max(self.peak_mb, maxrss_end)


def _ru_maxrss_mb() -> float:
    try:
        import resource
        import sys

        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return value / 2**20 if sys.platform == "darwin" else value / 1024  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        return 0.0


# --------------------------------------------------------------------------------------------------
# Messages and images
# --------------------------------------------------------------------------------------------------


def user_message(text: str, with_image: bool = False) -> dict:
    """A user turn; with an image it has Hugging Face's content-parts form (image first, then text)."""
    if with_image:
        return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    return {"role": "user", "content": text}


def to_messages(prompt: "str | Sequence[dict]", system: str | None = None) -> list[dict]:
    """A string becomes one user message; a list of messages is checked and copied."""
    if isinstance(prompt, str):
        messages = [user_message(prompt)]
    else:
        messages = [dict(m) for m in prompt]
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or "content" not in m:
                raise XpackError(f"message {i} needs a 'role' and a 'content'; got keys {sorted(m)}")
    if not messages:
        raise XpackError("the conversation is empty; give at least one user message")
    if system is not None:
        if messages[0]["role"] == "system":
            raise XpackError("the conversation already starts with a system message; give the system text once")
        messages.insert(0, {"role": "system", "content": system})
    return messages


def has_image_part(messages: Iterable[dict]) -> bool:
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image" for p in content):
            return True
    return False


def attach_image(messages: list[dict]) -> list[dict]:
    """Make sure the conversation refers to the image: put an image part in the last user turn if none has one."""
    if has_image_part(messages):
        return messages
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m["role"] == "user":
            content = m["content"]
            text_parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            messages = list(messages)
            messages[i] = {**m, "content": [{"type": "image"}, *text_parts]}
            return messages
    raise XpackError("an image needs a user message to go with it")


def fold_system(messages: Sequence[dict]) -> list[dict] | None:
    """The conversation with a leading system message merged into the first user message (None if there is none)."""
    if not messages or messages[0].get("role") != "system" or len(messages) < 2 or messages[1].get("role") != "user":
        return None
    system, user = messages[0]["content"], messages[1]["content"]
    if isinstance(user, str):
        content = f"{system}\n\n{user}"
    else:
        content = [{"type": "text", "text": system + "\n\n"}, *user]
    return [{"role": "user", "content": content}, *messages[2:]]


def load_image(path: "str | os.PathLike", exif_transpose: bool = False):
    """Open an image file as an RGB ``PIL.Image``; one clear line when it is missing or unreadable.
    ``exif_transpose``: apply the EXIF orientation first, as transformers' ``load_image`` does for a path."""
    path = Path(path)
    if not path.is_file():
        raise XpackError(f"image {path} does not exist or is not a file")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise XpackError("reading --image needs Pillow; install it with `pip install pillow`") from None
    try:
        with Image.open(path) as probe:
            probe.verify()
        with Image.open(path) as img:
            if exif_transpose:
                from PIL import ImageOps

                return ImageOps.exif_transpose(img).convert("RGB")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise XpackError(f"{path} is not a readable image ({type(exc).__name__}); pass a PNG or JPEG file") from None


# --------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------

TokenCallback = Callable[[str], Any]


class Runtime(abc.ABC):
    """Loads one artifact on one hardware profile; renders chats, tokenizes, generates, scores.

    Subclasses implement ``locate`` (or ``can_load``), ``_load``, ``render_chat``, ``tokenize``, ``_generate``,
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
        with PeakMemory() as mem:
            start = time.perf_counter()
            self._load()
            self.load_s = time.perf_counter() - start
        self.load_peak_rss_mb = mem.peak_mb

    # -- to implement ------------------------------------------------------------------------------

    @staticmethod
    def locate(path: "str | os.PathLike") -> Path:
        """The artifact's main file under ``path``, or a one-line XpackError saying why there is none.
        Runtimes of one-file formats set this; the default refuses everything."""
        raise XpackError(f"no artifact file at {path}")

    @classmethod
    def can_load(cls, path: "str | os.PathLike") -> bool:
        """Whether this runtime can run the artifact at ``path`` (cheap: looks at names, not weights)."""
        try:
            cls.locate(path)
        except XpackError:
            return False
        return True

    @classmethod
    def check_artifact(cls, path: "str | os.PathLike") -> None:
        """Raise a one-line XpackError saying why this runtime cannot load ``path`` (if it cannot)."""
        if cls.locate is not Runtime.locate:
            cls.locate(path)
        elif not cls.can_load(path):
            raise XpackError(f"the {cls.name} runtime cannot load {path}: it runs {', '.join(cls.formats)} artifacts; pass {_PATH_KINDS}")

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

    def image_refusal(self) -> str:
        """Why this loaded artifact cannot take an image (one line)."""
        return f"--image given but artifact {self.artifact} is text-only; drop --image or run a vision model's artifact"

    # -- shared ------------------------------------------------------------------------------------

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.artifact)!r}, profile={self.profile.name!r})"

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

    def generate(
        self,
        prompt: "str | Sequence[dict]",
        settings: GenerationSettings | None = None,
        image: "str | os.PathLike | None" = None,
        on_token: TokenCallback | None = None,
    ) -> GenerationResult:
        """Generate the assistant's answer to ``prompt`` (a user message, or a list of chat messages
        that may start with a system message), streaming each new piece of text to ``on_token``."""
        settings = settings or GenerationSettings()
        picture = None
        if image is not None:
            if not self.accepts_images:
                raise XpackError(self.image_refusal())
            picture = load_image(image)
        text = self.prompt_text(prompt, image=picture)
        with PeakMemory() as mem:
            measured = self._generate(text, settings, picture, on_token)
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


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def get_runtime(name: str) -> type[Runtime]:
    """The runtime class registered as ``name`` (imported on demand)."""
    target = RUNTIMES.get(name)
    if target is None:
        raise XpackError(f"unknown runtime: {name} (known: {', '.join(sorted(RUNTIMES))})")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = {"llamacpp": "pip install 'xpack[llama]'", "torch": "pip install 'xpack[pack]'", "onnx": "pip install 'xpack[onnx]'"}.get(name, "reinstall xpack")
        raise XpackError(f"the {name} runtime cannot start: {exc}; install what it needs ({hint})") from None
    return getattr(module, class_name)


_PATH_KINDS = (
    "a .gguf file, a folder from `xpack export` (manifest.json with a format), "
    "or a Hugging Face checkpoint folder (config.json + *.safetensors, e.g. from `xpack merge`)"
)


def gguf_models(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.gguf") if p.is_file() and not p.name.lower().startswith("mmproj"))


def read_json(path: Path) -> dict:
    """A JSON object file of an artifact ({} when the file is missing); a broken one is a one-line error."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XpackError(f"{path} is not valid JSON ({exc}); re-export the artifact") from None
    return data if isinstance(data, dict) else {}


def read_manifest(folder: Path) -> dict:
    return read_json(folder / "manifest.json")


def _runtime_of_format(fmt: str, path: Path) -> str:
    name = FORMAT_RUNTIMES.get(fmt)
    if name is None:
        raise XpackError(f"{path} holds a '{fmt}' artifact, which no runtime runs (formats: {', '.join(sorted(FORMAT_RUNTIMES))})")
    if name not in RUNTIMES:
        raise XpackError(f"{path} holds a {fmt} artifact, but the {name} runtime is not available in this xpack version")
    return name


def artifact_formats(path: "str | os.PathLike") -> list[str]:
    """The formats found at ``path`` (several when a folder holds e.g. both a GGUF and safetensors)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            if path.name.lower().startswith("mmproj"):
                raise XpackError(f"{path} is a vision projector (mmproj), not a model; pass the model .gguf or its folder")
            return ["gguf"]
        if path.suffix.lower() == ".onnx":
            return ["onnx"]
        if path.name.lower().endswith(".onnx_data"):
            raise XpackError(f"{path} holds the weights of an ONNX model, not the model; pass its .onnx file or its folder")
        return []
    if not path.is_dir():
        return []
    manifest_format = read_manifest(path).get("format")
    if isinstance(manifest_format, str) and manifest_format:
        return [manifest_format.lower()]
    found = []
    if gguf_models(path):
        found.append("gguf")
    if any(path.glob("*.onnx")) or any(path.glob("onnx/*.onnx")):
        found.append("onnx")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        found.append("torch")
    return found


def runtime_for(path: "str | os.PathLike", profile: "Profile | None" = None) -> str:
    """The name of the runtime that runs the artifact at ``path``.

    A folder holding several formats is run in the first of ``profile.formats`` it has.
    """
    path = Path(path)
    if not path.exists():
        raise XpackError(f"{path} does not exist; pass {_PATH_KINDS}")
    formats = artifact_formats(path)
    if not formats:
        raise XpackError(f"cannot tell how to run {path}: pass {_PATH_KINDS}")
    if len(formats) > 1:
        order = list(profile.formats) if profile is not None else ["gguf", "onnx", "torch"]
        formats.sort(key=lambda f: order.index(f) if f in order else len(order))
    return _runtime_of_format(formats[0], path)


def load(path: "str | os.PathLike", profile: "Profile", runtime: str | None = None) -> Runtime:
    """Load the artifact at ``path`` on ``profile`` with ``runtime`` (default: the one ``runtime_for`` picks).

    The profile is first adapted to this machine (``resolve_for_machine``: threads clamped to the
    cores here, an error for a GPU profile without a GPU); its notes end up in ``runtime.notes``.
    """
    from xpack.runtimes.profiles import resolve_for_machine

    path = Path(path)
    name = runtime or runtime_for(path, profile)
    cls = get_runtime(name)
    if not path.exists():
        raise XpackError(f"{path} does not exist; pass {_PATH_KINDS}")
    cls.check_artifact(path)
    profile, notes = resolve_for_machine(profile)
    rt = cls(path, profile)
    rt.notes.extend(notes)
    return rt
