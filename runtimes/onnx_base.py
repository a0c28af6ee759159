"""What the ONNX runtimes share (runtimes/onnx_decoder.py, runtimes/onnx_mllama.py): the artifact
check, onnxruntime sessions on the profile's device, the folder's tokenizer and chat template,
llama.cpp's sampler chain, the generation loop and the GPU memory figure. Tokenizing is the
tokenizers library's and the rest numpy's: no torch, no transformers.

Sampling follows llama.cpp's chain as ``runtimes/llamacpp.py`` runs it: the repetition penalty over
the last 64 generated tokens (a logit above 0 is divided by the penalty, one below multiplied),
then greedy at temperature 0, else top-k -> top-p -> temperature -> a draw from numpy's generator
seeded with ``seed``. Chats are rendered with the folder's chat template (runtimes/chat.py).
"""

from __future__ import annotations

import abc
import os
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

from xpack.errors import XpackError
from xpack.runtimes.artifacts import MainFile, read_json
from xpack.runtimes.base import Runtime, context_room
from xpack.runtimes.chat import END_OF_TURN_TOKENS, ChatTemplate, TemplateChat
from xpack.runtimes.gpu_memory import process_gpu_mb
from xpack.runtimes.messages import load_image
from xpack.runtimes.penalties import penalize
from xpack.runtimes.settings import GenerationSettings, TokenRun, take_tokens, timing_fields

__all__ = ["OnnxRuntimeBase", "onnx_file_of", "open_session", "session_options"]

PENALTY_LAST_N = 64  # llama.cpp's default penalty window (llama-cpp-python's last_n_tokens_size)
# transformers' clean_up_tokenization (PreTrainedTokenizerBase.clean_up_tokenization), applied when
# tokenizer_config.json sets clean_up_tokenization_spaces, so that decoded text equals transformers'.
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


ONNX_FILE = MainFile(
    suffix=".onnx", manifest_key="onnx_file",
    candidates=lambda folder: sorted(p for p in [*folder.glob("*.onnx"), *folder.glob("onnx/*.onnx")] if p.is_file()),
    a_file="an .onnx file", a_model="an ONNX model", writer="`xpack export --format onnx`", none=".onnx file", several="several .onnx files",
)


def onnx_file_of(path: "str | os.PathLike") -> Path:
    """The decoder .onnx of an artifact: the file itself, manifest.json's ``onnx_file``, or a folder's single .onnx."""
    return ONNX_FILE.find(path)


def session_options(threads: int | None = None, prepack: bool = True, cast_per_node: bool = False):
    """onnxruntime's SessionOptions as xpack runs graphs: all graph optimizations, sequential, quiet,
    ``threads`` intra-op threads (None: onnxruntime's default) and one inter-op thread.

    ``prepack=False`` keeps the weights where onnxruntime maps them, in the page cache of the ``.onnx.data`` file,
    instead of copying each MatMulNBits weight into private memory at load: the kernel can drop and re-read those pages,
    so a one-off check of an artifact larger than the free memory still runs (each call dequantizes its weights again:
    slower, for a check and not for serving). Measured on Llama 3.2 11B Vision's 6.5 GB int4 decoder: 6.9 GB private
    after the load with prepacking, 0.4 GB private (+ 2.1 GB for the dequantized head during a call) without.

    ``cast_per_node=True`` (an fp16 graph on the CPU provider, a one-off check): the CPU provider has no fp16 MatMul, so
    onnxruntime puts a Cast to float32 before each such node, and with graph optimizations on it folds every Cast of a
    weight into a float32 copy at load, the whole model in float32 (Gemma 3 4B's fp16 check was killed above 16 GB).
    With optimizations off the weights are cast as their nodes run, and the priority-based order runs each Cast just
    before its node, so one float32 weight at a time is alive (measured: 16 fp16 2048 x 2048 MatMuls, 351 MB private
    with the folded copies, 65 MB this way; the default order runs every Cast first, 288 MB). Slower; the same kernels.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if cast_per_node:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return options


def open_session(path: Path, options, providers: Sequence):
    """An InferenceSession of ``path``; a graph onnxruntime cannot load is a one-line XpackError."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types (Fail, InvalidGraph, NoSuchFile, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise XpackError(f"onnxruntime could not load {path} ({clip(first)}); check that the .onnx file and its .onnx_data are complete") from None


def clip(text: str, limit: int = 300) -> str:
    """``text`` within ``limit`` characters, cut between words with an ellipsis (onnxruntime's messages can run on)."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:")
    return f"{cut} ..."


def _ignore(_token: int) -> None:
    pass


def _ids(value) -> set[int]:
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple)):
        return {int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


class Prompt(NamedTuple):
    """A rendered prompt made ready to run."""

    ids: list[int]
    encode_s: float | None  # seconds its image took to encode (None without one)
    state: object  # what the subclass's _stepper needs besides (embeddings and image spans, or the encoded image)


Step = Callable[[int, int], object]  # step(token, cursor) -> the next row of logits


class OnnxRuntimeBase(TemplateChat, Runtime):
    """An ONNX artifact folder on a profile. Subclasses open their graphs (``_load_graphs``: sets
    ``session``, the decoder's session, ``_n_vocab`` and ``kv_layout``), score (``logits``,
    ``logits_with_image``) and run a prompt (``_prompt``, ``_stepper``); the rest is here."""

    name = "onnx"
    formats = ("onnx",)
    locate = staticmethod(onnx_file_of)
    takes_position_ids = True
    takes_embeds = False
    max_length: int | None = None  # positions the graph covers (None: no limit of its own)

    # -- to implement ------------------------------------------------------------------------------

    @abc.abstractmethod
    def _load_graphs(self, folder: Path) -> None:
        """Open the artifact's graphs (``self._session(path)``) and read their layout."""

    @abc.abstractmethod
    def _prompt(self, text: str, image) -> Prompt:
        """The rendered prompt ``text`` (with ``image``, a PIL image, or None) made ready to run."""

    @abc.abstractmethod
    def _stepper(self, ids: list[int], limit: int, state) -> tuple[object, Step]:
        """Run the prompt; returns (the next-token logits row, ``step(token, cursor)`` giving the next row)."""

    # -- loading -----------------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            import numpy as np
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise XpackError(f"the onnx runtime needs onnxruntime, tokenizers and numpy ({exc}); install them with `pip install 'xpack[onnx]'`") from None
        self._np, self._ort = np, ort
        self.onnx_path = onnx_file_of(self.artifact)
        folder = self.onnx_path.parent
        self._pick_device()
        self._load_graphs(folder)
        self._load_tokenizer(folder, Tokenizer)

    def _pick_device(self) -> None:
        """Session options and execution providers for the profile (CUDA for a GPU profile)."""
        ort, profile = self._ort, self.profile
        self.on_gpu = profile.device == "cuda"
        self._threads = profile.threads or (os.cpu_count() or 1)
        self._options = session_options(self._threads)
        if self.on_gpu:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise XpackError(
                    f"profile {profile.name} runs on the GPU, but this onnxruntime has no CUDAExecutionProvider "
                    f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use --profile cpu16"
                )
            self._providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        else:
            self._providers = ["CPUExecutionProvider"]
        self._device = "cuda" if self.on_gpu else "cpu"

    def _session(self, path: Path):
        return open_session(path, self._options, self._providers)

    def _load_tokenizer(self, folder: Path, tokenizer_class) -> None:
        """The tokenizer (``tokenizer_class``: the tokenizers library's Tokenizer), chat template, BOS text,
        generation defaults and end-of-turn ids the export copied beside the graphs."""
        tok_path = folder / "tokenizer.json"
        if not tok_path.is_file():
            raise XpackError(f"{folder} has no tokenizer.json; re-export the artifact with xpack (it copies the tokenizer beside the model)")
        try:
            self.tokenizer = tokenizer_class.from_file(str(tok_path))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise XpackError(f"{tok_path} is not a tokenizer the tokenizers library can read ({exc}); re-export the artifact") from None
        tok_config = read_json(folder / "tokenizer_config.json")
        self.chat_template = ChatTemplate.from_folder(folder)
        self.bos_token = self.chat_template.bos_token if self.chat_template else None
        if self.bos_token is None:
            bos = tok_config.get("bos_token")
            self.bos_token = bos.get("content") if isinstance(bos, dict) else bos if isinstance(bos, str) else None
        self._cleanup = bool(tok_config.get("clean_up_tokenization_spaces", False))
        self.config = read_json(folder / "config.json")
        self.generation_config = read_json(folder / "generation_config.json")
        self.stop_ids = frozenset(self._end_of_turn_ids(tok_config))

    def _end_of_turn_ids(self, tok_config: dict) -> set[int]:
        ids: set[int] = set()
        for source in (self.generation_config.get("eos_token_id"), self.config.get("eos_token_id"), (self.config.get("text_config") or {}).get("eos_token_id")):
            ids |= _ids(source)
        eos = tok_config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        for text in (eos, *END_OF_TURN_TOKENS):
            if isinstance(text, str):
                token = self.tokenizer.token_to_id(text)
                if token is not None:
                    ids.add(int(token))
        return {i for i in ids if 0 <= i < max(self._n_vocab, 1)}

    def close(self) -> None:
        self.session = None

    # -- text --------------------------------------------------------------------------------------

    def _no_chat_template(self) -> str:
        return f"{self.onnx_path.parent} has no chat template (chat_template.jinja or tokenizer_config.json); re-export it from a model with one"

    def tokenize(self, text: str) -> list[int]:
        add_special = not (self.bos_token and text.startswith(self.bos_token))
        return list(self.tokenizer.encode(text, add_special_tokens=add_special).ids)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        if self._cleanup:
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    # -- the model ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.session is None:
            raise XpackError("this runtime was closed; load the artifact again")

    def _logits_ids(self, token_ids: Sequence[int]) -> list[int]:
        """``logits``' token ids, checked."""
        self._check_open()
        ids = self._checked_ids(token_ids)
        if not ids:
            raise XpackError("logits needs at least one token id")
        return ids

    def _image_inputs(self, image, continuation_ids: Sequence[int] | None):
        """``logits_with_image``'s picture (a path or a PIL image) and checked continuation ids."""
        self._check_open()
        if not self.accepts_images:
            raise XpackError(self.image_refusal())
        picture = load_image(image) if not hasattr(image, "convert") else image
        return picture, self._checked_ids(continuation_ids or [])

    def image_refusal(self, flag: str = "--image") -> str:
        return f"{flag} given but artifact {self.artifact} is text-only (no vision.onnx); drop {flag} or export a vision model with xpack"

    # -- generation --------------------------------------------------------------------------------

    def _pick(self, logits, generated: list[int], settings: GenerationSettings, rng) -> int:
        """llama.cpp's sampler chain on one row of logits (float32, modified in place): the repetition penalty over the
        last PENALTY_LAST_N ``generated`` ids, OpenAI's frequency and presence penalties over all of them."""
        np = self._np
        recent = generated[-PENALTY_LAST_N:]
        penalize(logits, generated, settings.frequency_penalty, settings.presence_penalty)
        if settings.repetition_penalty != 1.0 and recent:
            seen = np.fromiter(set(recent), dtype=np.int64)
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / settings.repetition_penalty, values * settings.repetition_penalty)
        if settings.greedy:
            return int(logits.argmax())
        k = settings.top_k if 0 < settings.top_k < logits.shape[0] else logits.shape[0]
        candidates = np.argpartition(logits, -k)[-k:] if k < logits.shape[0] else np.arange(logits.shape[0])
        values = logits[candidates].astype(np.float64)
        order = np.argsort(-values, kind="stable")
        candidates, values = candidates[order], values[order]
        if settings.top_p < 1.0:
            probs = np.exp(values - values[0])
            probs /= probs.sum()
            keep = int(np.searchsorted(np.cumsum(probs), settings.top_p, side="left")) + 1
            candidates, values = candidates[:keep], values[:keep]
        values = values / settings.temperature
        probs = np.exp(values - values.max())
        probs /= probs.sum()
        return int(candidates[rng.choice(len(candidates), p=probs)])

    @property
    def n_ctx(self) -> int:
        """The profile's context, within the positions the graph's rotary tables cover."""
        return min(self.profile.n_ctx, int(self.max_length)) if self.max_length else self.profile.n_ctx

    def _generate(self, text, settings: GenerationSettings, image, on_token) -> dict:
        self._check_open()
        prompt, encode_s, state = self._prompt(text, image)
        limit = min(settings.max_tokens, context_room(len(prompt), self.n_ctx, self.profile.name))
        stop_ids = frozenset() if settings.ignore_eos else self.stop_ids
        rng = self._np.random.default_rng(settings.seed)
        run = TokenRun()
        printed = ""

        def stream(_token: int) -> None:
            """Hand ``on_token`` the new text once it decodes whole (no half of a multi-byte character)."""
            nonlocal printed
            text_now = self.detokenize(run.ids)
            if not text_now.endswith("\ufffd") and text_now.startswith(printed) and len(text_now) > len(printed):
                on_token(text_now[len(printed):])
                printed = text_now

        start = time.perf_counter()
        row, step = self._stepper(prompt, limit, state)
        take_tokens(self._sampled(row, step, len(prompt), settings, rng, run), stop_ids, limit, stream if on_token is not None else _ignore, run)
        end = time.perf_counter()
        answer = self.detokenize(run.ids)
        if on_token is not None and len(answer) > len(printed) and answer.startswith(printed):
            on_token(answer[len(printed):])
        measured = timing_fields(
            text=answer, prompt_tokens=len(prompt), completion_tokens=len(run.ids), steps=run.steps,
            start=start - (encode_s or 0.0), first=run.first, end=end, finish_reason=run.finish, token_ids=run.ids,
        )
        measured["image_encode_s"] = encode_s
        return measured

    def _sampled(self, row, step: Step, cursor: int, settings: GenerationSettings, rng, run: TokenRun) -> Iterator[int]:
        """The sampled ids, from the prompt's next-token ``row`` on: each drawn from its row with the
        repetition penalty over the last ids kept, the next row stepped only when asked for."""
        while True:
            token = self._pick(row, run.ids, settings, rng)
            yield token
            row = step(token, cursor)
            cursor += 1

    # -- memory and facts --------------------------------------------------------------------------

    def peak_gpu_mb(self) -> float | None:
        """GPU memory this process holds (onnxruntime's CUDA arena only grows, so this is its peak)."""
        return process_gpu_mb() if self.on_gpu else None

    def info(self) -> dict:
        return {
            "onnx_file": str(self.onnx_path),
            "providers": self.session.get_providers() if self.session else [],
            "threads": self._threads,
            "kv_cache": self.kv_layout,
            "position_ids": self.takes_position_ids,
            "inputs_embeds": self.takes_embeds,
            "images": self.accepts_images,
            "max_length": self.max_length,
            "vocab_size": self._n_vocab,
            "stop_ids": sorted(self.stop_ids),
        }
