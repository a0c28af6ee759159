"""GGUF artifacts through llama-cpp-python (no torch, no transformers).

The generation loop is ``Llama.generate`` plus an incremental UTF-8 decoder and a set lookup for
end-of-turn tokens: as thin as a raw llama-cpp-python loop, so its decode speed is llama.cpp's.
Chats are rendered with the GGUF's own ``tokenizer.chat_template`` (runtimes/chat.py) and
tokenized by llama.cpp with special tokens parsed.

Sampling is llama.cpp's (top-k -> top-p -> temperature, min_p off); its repetition penalty looks at
the last 64 generated tokens, where transformers' looks at the whole sequence.

Images (Gemma 3 / MedGemma: a text GGUF + its ``mmproj-*.gguf``) go through llama.cpp's libmtmd
(``llama_cpp.mtmd_cpp``), as ``Llava15ChatHandler`` drives it: the chat is rendered with the
model's template, the template's image placeholder is replaced by mtmd's media marker,
``mtmd_tokenize`` splits the prompt into text and image chunks, text chunks are evaluated by the
``Llama`` object (so its ``input_ids``/``n_tokens`` stay right) and image chunks are encoded
(``mtmd_encode_chunk``, timed as ``image_encode_s``) and decoded into the same llama.cpp context;
then ``Llama.generate`` finds the whole prompt cached and samples as the text path does.
The image is prepared as transformers' processor prepares it (see ``_prepare_image``).
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import ctypes
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from xpack.errors import XpackError
from xpack.runtimes.artifacts import MainFile, gguf_models, read_manifest
from xpack.runtimes.base import Runtime, context_room
from xpack.runtimes.chat import END_OF_TURN_TOKENS, ChatTemplate, TemplateChat
from xpack.runtimes.gguf_header import read_gguf_metadata
from xpack.runtimes.gpu_memory import process_gpu_mb
from xpack.runtimes.llama_import import load_llama_cpp
from xpack.runtimes.llamacpp_batch import BatchedLlama
from xpack.runtimes.messages import load_image
from xpack.runtimes.penalties import penalize
from xpack.runtimes.settings import GenerationSettings, take_tokens, timing_fields

__all__ = ["LlamaCppRuntime", "gguf_file_of", "read_gguf_metadata"]

_SCORER_CTX_STEP = 256

# How an image appears in a rendered chat, per llama.cpp projector type (``clip.projector_type``):
# (what the chat template writes for an image part, what mtmd gets there instead).
# Gemma 3 / MedGemma: the template writes "<start_of_image>"; transformers' Gemma3Processor replaces
# it with "\n\n<start_of_image>" + mm_tokens_per_image x "<image_soft_token>" + "<end_of_image>\n\n".
# mtmd itself puts <start_of_image> ... <end_of_image> around the image embeddings, so the marker
# goes in with the processor's newlines around it: the token ids around the image are then the
# processor's, token for token.
_IMAGE_PROMPTS = {"gemma3": ("<start_of_image>", "\n\n{marker}\n\n")}
# Projector types whose transformers image processor resizes every image straight to
# image_size x image_size (PIL, BILINEAR: Gemma3ImageProcessor), where llama.cpp would keep the aspect
# ratio and pad with black (PAD_CEIL letterbox). xpack resizes first, so llama.cpp's resize is a copy.
_STRETCH_TO_SQUARE = {"gemma3"}

# llama.cpp's log lines at error level (the latest few), to quote in one-line errors; everything
# libmtmd logs goes here instead of to the terminal.
_GGML_LOG_LEVEL_ERROR = 3
_LOG_ERRORS: "collections.deque[str]" = collections.deque(maxlen=8)
_LOG_CALLBACK = None  # the ctypes callback must stay referenced while libmtmd may call it


def _quiet_mtmd() -> None:
    """Route libmtmd's log through a callback that keeps only its errors (for our one-line messages)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    llama_cpp = load_llama_cpp()
    from llama_cpp import mtmd_cpp as mtmd

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):  # noqa: ARG001 - the C signature
        if level == _GGML_LOG_LEVEL_ERROR and text:
            line = text.decode("utf-8", errors="replace").strip()
            if line:
                _LOG_ERRORS.append(line)

    _LOG_CALLBACK = callback
    mtmd.mtmd_helper_log_set(callback, None)  # the helper's logger and libmtmd's (mtmd_log_set)


def _last_error(since: int) -> str:
    """'': the latest llama.cpp error logged after ``since`` errors had been (as ': <line>')."""
    new = list(_LOG_ERRORS)[since:] if since < len(_LOG_ERRORS) else []
    return f": {new[-1]}" if new else ""


def _prepare_image(image, projector: str, image_size: int):
    """The image as the model's transformers processor sees it before normalization: RGB, and for
    Gemma 3 resized to image_size x image_size with PIL's BILINEAR filter (aspect ratio not kept)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if projector in _STRETCH_TO_SQUARE and image.size != (image_size, image_size):
        from PIL import Image

        image = image.resize((image_size, image_size), resample=Image.BILINEAR)
    return image


@dataclass
class _Vision:
    """The mtmd context of the artifact's mmproj, made on first use."""

    ctx: int
    projector: str
    image_size: int
    placeholder: str
    replacement: str
    load_s: float


@dataclass
class _Chunk:
    """One piece of a tokenized image prompt: text token ids, or an image chunk of ``n_tokens`` embeddings."""

    kind: str  # "text" | "image"
    tokens: list[int]
    n_tokens: int
    handle: int | None = None  # the mtmd_input_chunk of an image (valid while its chunks live)


GGUF_FILE = MainFile(
    suffix=".gguf", manifest_key="gguf_file", candidates=gguf_models, a_file="a .gguf file", a_model="a GGUF model",
    writer="`xpack export`", none="model .gguf file", several="several .gguf models",
)


def gguf_file_of(path: "str | os.PathLike") -> Path:
    """The model .gguf of an artifact: the file itself, manifest.json's ``gguf_file``, or a folder's single non-mmproj .gguf."""
    return GGUF_FILE.find(path)


def _penalize_prompt(llm, prompt: list[int]) -> None:
    """Make the next ``Llama.generate`` count the prompt in its repetition penalty, as transformers does.

    llama-cpp-python builds a fresh sampler per ``generate`` that only remembers the tokens it
    samples (and only the last 64 by default), while transformers' repetition penalty covers the
    prompt and every generated token. Feeding the prompt to the new sampler (the penalty window is
    n_ctx, set at load) gives the torch reference's semantics; the patch undoes itself after one use.
    """
    original = llm._init_sampler

    def init_sampler(*args, **kwargs):
        llm._init_sampler = original
        sampler = original(*args, **kwargs)
        for token in prompt:
            sampler.accept(token)
        return sampler

    llm._init_sampler = init_sampler


def _openai_penalties(settings: GenerationSettings, generated: list[int]):
    """OpenAI's frequency/presence penalties over the ``generated`` ids (penalties.py) as llama-cpp-python's logits
    processor; None when both are 0, which keeps llama.cpp's own sampling path untouched."""
    if settings.frequency_penalty == 0 and settings.presence_penalty == 0:
        return None

    def process(_input_ids, scores):
        return penalize(scores, generated, settings.frequency_penalty, settings.presence_penalty)

    return [process]


class LlamaCppRuntime(TemplateChat, Runtime):
    name = "llamacpp"
    formats = ("gguf",)
    locate = staticmethod(gguf_file_of)

    # -- loading -----------------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            llama_cpp = load_llama_cpp()
        except ImportError as exc:
            raise XpackError(f"the llamacpp runtime needs llama-cpp-python ({exc}); install it with `pip install 'xpack[llama]'`") from None
        self._llama_cpp = llama_cpp
        self.gguf_path = gguf_file_of(self.artifact)
        profile = self.profile
        on_gpu = profile.device == "cuda"
        if on_gpu and not llama_cpp.llama_supports_gpu_offload():
            raise XpackError(
                f"profile {profile.name} runs on the GPU, but this llama-cpp-python was built without GPU support; "
                "reinstall it with CMAKE_ARGS='-DGGML_CUDA=on' or use --profile cpu16"
            )
        threads = profile.threads or (os.cpu_count() or 1)
        llama_kwargs = dict(
            model_path=str(self.gguf_path),
            n_gpu_layers=profile.gpu_layers if on_gpu else 0,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        try:
            # last_n_tokens_size = n_ctx: the repetition penalty sees the whole sequence (see _sample)
            self.llm = llama_cpp.Llama(n_ctx=profile.n_ctx, logits_all=False, last_n_tokens_size=profile.n_ctx, **llama_kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise XpackError(f"llama.cpp could not load {self.gguf_path} ({exc}); check that the file is a complete GGUF") from None
        self._scorer = None
        llm = self.llm
        model = llm._model
        self.metadata = dict(llm.metadata)
        self._vocab = model.vocab
        self._n_vocab = llm.n_vocab()
        self.chat_template = ChatTemplate.from_gguf_metadata(self.metadata, self._token_text)
        bos_id = llm.token_bos()
        self.bos_token = self._token_text(bos_id) if bos_id >= 0 else None
        self.add_bos = bool(model.add_bos_token())
        self.stop_ids = frozenset(self._end_of_turn_ids())
        self._pieces: dict[int, bytes] = {}
        self._threads = threads
        self._vision_state: _Vision | None = None
        self.mmproj_path, self._mmproj_problem = self._find_mmproj()
        self.accepts_images = self.mmproj_path is not None  # the projector itself is loaded with the first image
        self._batcher: BatchedLlama | None = None
        self._llm_lock = threading.Lock()  # the Llama, once text generations run beside it in the batcher

    def parallel(self, slots: int) -> None:
        """Run up to ``slots`` text generations at once (llamacpp_batch.py: continuous batching in a second context on
        the loaded model, ``slots`` KV streams of the profile's n_ctx); an image generation still uses the Llama, one at
        a time. Called by ``xpack serve --max-concurrency``; generate() may then be called from several threads."""
        if self._batcher is None and slots > 1:
            self._batcher = BatchedLlama(self._llama_cpp, self.llm, slots, self.profile.n_ctx, self._threads, self.prompt_cache)

    def _find_mmproj(self) -> tuple[Path | None, str | None]:
        """The vision projector beside the model: manifest.json's ``mmproj_file``, else the one
        ``mmproj-*.gguf`` of the folder (when several, the one named after the model).
        Returns (path, None), (None, None) for a text-only artifact, or (None, why) when it is unclear."""
        folder = self.artifact if self.artifact.is_dir() else self.artifact.parent
        try:
            manifest = read_manifest(folder)
        except XpackError:  # a broken manifest.json beside a .gguf given as a file is not ours to judge
            manifest = {}
        named = manifest.get("mmproj_file")
        if isinstance(named, str) and named and (self.artifact.is_dir() or manifest.get("gguf_file") == self.gguf_path.name):
            if (folder / named).is_file():
                return folder / named, None
            return None, f"{folder}/manifest.json names mmproj_file {named}, which is missing; re-export the artifact"
        found = sorted(p for p in folder.glob("*.gguf") if p.is_file() and p.name.lower().startswith("mmproj"))
        if len(found) <= 1:
            return (found[0] if found else None), None
        stem = self.gguf_path.stem.rsplit("-", 1)[0].lower()  # <name>-<QUANT>.gguf -> <name>
        mine = [p for p in found if p.name.lower().startswith(f"mmproj-{stem}")]
        if len(mine) == 1:
            return mine[0], None
        return None, (
            f"{folder} holds several vision projectors ({', '.join(p.name for p in found)}) and none is named for "
            f"{self.gguf_path.name}; keep one, or name it as mmproj_file in manifest.json"
        )

    def image_refusal(self, flag: str = "--image") -> str:
        if self._mmproj_problem:
            return self._mmproj_problem
        return f"{flag} given but artifact {self.artifact} is text-only (a GGUF without an mmproj vision projector); drop {flag}"

    def _token_text(self, token_id: int) -> str | None:
        try:
            return self._llama_cpp.llama_vocab_get_text(self._vocab, token_id).decode("utf-8", errors="replace")
        except Exception:  # noqa: BLE001 - out-of-range ids in odd metadata
            return None

    def _end_of_turn_ids(self) -> set[int]:
        llm, lib = self.llm, self._llama_cpp
        ids = {i for i in (llm.token_eos(), llm._model.token_eot()) if i is not None and i >= 0}
        # llama.cpp's own end-of-generation marks (eos, eot, eom and the known end-of-turn strings)
        ids.update(i for i in range(self._n_vocab) if lib.llama_vocab_is_eog(self._vocab, i))
        for text in END_OF_TURN_TOKENS:
            toks = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if len(toks) == 1 and self._token_text(toks[0]) == text:
                ids.add(toks[0])
        return ids

    def close(self) -> None:
        batcher = getattr(self, "_batcher", None)
        if batcher is not None:  # its context is on the Llama's model
            batcher.close()
            self._batcher = None
        vision = getattr(self, "_vision_state", None)
        if vision is not None:  # before the model it was made for
            self._mtmd.mtmd_free(vision.ctx)
            self._vision_state = None
        for attr in ("_scorer", "llm"):
            obj = getattr(self, attr, None)
            if obj is not None:
                obj.close()
                setattr(self, attr, None)

    # -- text --------------------------------------------------------------------------------------

    def _no_chat_template(self) -> str:
        return f"{self.gguf_path} has no chat template (tokenizer.chat_template); re-export it from a model with one"

    def prompt_text(self, prompt: "str | Sequence[dict]", image=None) -> str:
        if image is None:
            return super().prompt_text(prompt)
        self._vision()  # a broken or foreign mmproj is the error to report, before the template runs
        try:
            return super().prompt_text(prompt, image=image)
        except TypeError as exc:  # a text-only template concatenating a content-parts list
            raise XpackError(f"the chat template of {self.gguf_path.name} cannot take an image part ({exc})") from None

    def tokenize(self, text: str) -> list[int]:
        add_bos = self.add_bos and not (self.bos_token and text.startswith(self.bos_token))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def _piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render as nothing), cached."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(256)  # its own: the batched server decodes pieces from several threads
            n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:  # buffer too small: -n is the size needed
                buf = ctypes.create_string_buffer(-n)
                n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = bytes(buf.raw[:n])
            self._pieces[token] = piece
        return piece

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return b"".join(self._piece(t) for t in token_ids).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    # -- generation --------------------------------------------------------------------------------

    def _generate(self, text, settings: GenerationSettings, image, on_token) -> dict:
        llm = self.llm
        if llm is None:
            raise XpackError("this runtime was closed; load the artifact again")
        if image is None and self._batcher is not None:
            return self._sample(None, self.tokenize(text), settings, on_token)
        if image is None:
            return self._sample(llm, self.tokenize(text), settings, on_token)
        with self._llm_lock:
            return self._generate_with_image(llm, text, settings, image, on_token)

    def _generate_with_image(self, llm, text, settings: GenerationSettings, image, on_token) -> dict:
        with self._image_chunks(text, image) as chunks:
            n_prompt = sum(c.n_tokens for c in chunks)
            self._check_room(n_prompt, llm.n_ctx())
            start = time.perf_counter()
            encode_s = self._eval_chunks(llm, chunks)
        # The whole prompt is in the context now and llm.input_ids[:n_tokens] describes it (image
        # positions included), so Llama.generate finds it cached and samples at once.
        prompt = llm.input_ids[: llm.n_tokens].tolist()
        measured = self._sample(llm, prompt, settings, on_token, start=start, reset=False)
        llm.reset()  # the image's positions are not tokens a later prompt could share: no prefix is reused from here
        measured["image_encode_s"] = encode_s
        return measured

    def _check_room(self, n_prompt: int, n_ctx: int) -> int:
        return context_room(n_prompt, n_ctx, self.profile.name)

    def _sample(self, llm, prompt: list[int], settings: GenerationSettings, on_token, start: float | None = None, reset: bool = True) -> dict:
        """Sample the answer to ``prompt``; with ``reset=False`` the prompt is already evaluated (image path); ``llm``
        None: in the batcher (:meth:`parallel`)."""
        limit = min(settings.max_tokens, self._check_room(len(prompt), self.profile.n_ctx if llm is None else llm.n_ctx()))
        seed = settings.seed if settings.seed is not None else self._llama_cpp.LLAMA_DEFAULT_SEED
        stop_ids, piece = (frozenset() if settings.ignore_eos else self.stop_ids), self._piece
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        parts: list[str] = []
        if start is None:
            start = time.perf_counter()
        generated: list[int] = []
        if llm is None:
            tokens = self._batcher.tokens(prompt, settings, limit, stop_ids, seed)
        else:
            tokens = self._llama_tokens(llm, prompt, settings, seed, reset, generated)

        def emit(token: int) -> None:
            generated.append(token)
            chunk = decode(piece(token))
            if chunk:
                parts.append(chunk)
                if on_token is not None:
                    on_token(chunk)

        try:
            run = take_tokens(tokens, stop_ids, limit, emit)
        finally:
            tokens.close()
        end = time.perf_counter()
        tail = decode(b"", True)
        if tail:
            parts.append(tail)
            if on_token is not None:
                on_token(tail)
        return timing_fields(
            text="".join(parts), prompt_tokens=len(prompt), completion_tokens=len(run.ids), steps=run.steps,
            start=start, first=run.first, end=end, finish_reason=run.finish, token_ids=run.ids,
        )

    def _llama_tokens(self, llm, prompt: list[int], settings: GenerationSettings, seed: int, reset: bool, generated: list[int]):
        """llama-cpp-python's own generator of sampled ids (one sequence; ``generated``: the ids kept so far, which
        OpenAI's penalties read)."""
        llm.set_seed(seed)
        if reset and not self.prompt_cache:
            llm.reset()  # a fresh prefill every call: the same input always gives the same output
        # with prompt_cache, llama-cpp-python's generate keeps the KV of the longest common prefix with the last prompt
        if settings.repetition_penalty != 1.0:
            _penalize_prompt(llm, prompt)
        return llm.generate(
            prompt,
            top_k=settings.top_k,
            top_p=settings.top_p,
            min_p=0.0,
            typical_p=1.0,
            temp=settings.temperature,
            repeat_penalty=settings.repetition_penalty,
            logits_processor=_openai_penalties(settings, generated),
        )

    # -- images ------------------------------------------------------------------------------------

    def _vision(self) -> _Vision:
        """The mtmd context of the mmproj, made on first use (n_threads and GPU use from the profile)."""
        if self._vision_state is not None:
            return self._vision_state
        if self.llm is None:
            raise XpackError("this runtime was closed; load the artifact again")
        if self.mmproj_path is None:
            raise XpackError(self.image_refusal())
        path = self.mmproj_path
        try:
            from llama_cpp import mtmd_cpp as mtmd
        except (ImportError, OSError) as exc:
            raise XpackError(
                f"images need llama.cpp's libmtmd, which this llama-cpp-python lacks ({exc}); upgrade it with `pip install -U llama-cpp-python`"
            ) from None
        self._mtmd = mtmd
        try:
            meta = read_gguf_metadata(path)
        except (OSError, ValueError, struct.error) as exc:
            raise XpackError(f"{path.name} is not a readable GGUF vision projector ({exc}); re-export the artifact") from None
        projector = meta.get("clip.projector_type")
        if meta.get("general.architecture") != "clip" or not meta.get("clip.has_vision_encoder"):
            raise XpackError(f"{path.name} is not a vision projector (no clip vision encoder in its metadata); re-export the artifact")
        if projector not in _IMAGE_PROMPTS:
            raise XpackError(
                f"{path.name} is a '{projector}' vision projector, which xpack's llama.cpp runtime does not run "
                f"(it runs {', '.join(sorted(_IMAGE_PROMPTS))}); run the merged checkpoint with --runtime torch"
            )
        image_size = meta.get("clip.vision.image_size")
        if not isinstance(image_size, int) or image_size <= 0:
            raise XpackError(f"{path.name} has no clip.vision.image_size; re-export the artifact")
        _quiet_mtmd()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = self.profile.device == "cuda"
        params.n_threads = self._threads
        params.print_timings = False
        params.flash_attn_type = self.llm.context_params.flash_attn_type
        errors = len(_LOG_ERRORS)
        start = time.perf_counter()
        ctx = mtmd.mtmd_init_from_file(str(path).encode(), self.llm.model, params)
        load_s = time.perf_counter() - start
        if not ctx:
            raise XpackError(
                f"llama.cpp could not load the vision projector {path.name}{_last_error(errors)}; "
                f"check that it is a complete mmproj made for {self.gguf_path.name}"
            )
        if not mtmd.mtmd_support_vision(ctx):
            mtmd.mtmd_free(ctx)
            raise XpackError(f"{path.name} has no vision encoder llama.cpp can use; re-export the artifact")
        placeholder, replacement = _IMAGE_PROMPTS[projector]
        self._vision_state = _Vision(
            ctx=ctx,
            projector=projector,
            image_size=image_size,
            placeholder=placeholder,
            replacement=replacement.format(marker=mtmd.mtmd_default_marker().decode("utf-8")),
            load_s=load_s,
        )
        return self._vision_state

    @contextlib.contextmanager
    def _image_chunks(self, text: str, image) -> Iterator[list[_Chunk]]:
        """The rendered prompt ``text`` with ``image`` (a PIL image) at the template's image
        placeholder, tokenized by mtmd into text and image chunks (freed when the block ends)."""
        vision = self._vision()
        mtmd = self._mtmd
        marker = mtmd.mtmd_default_marker().decode("utf-8")
        if marker in text:
            raise XpackError(f"the prompt contains llama.cpp's media marker {marker}; remove it from the text")
        found = text.count(vision.placeholder)
        if found != 1:
            if found == 0:
                raise XpackError(
                    f"the prompt has no place for the image: the chat template of {self.gguf_path.name} wrote no "
                    f"{vision.placeholder} (give the image with a user message, or re-export the model with its chat template)"
                )
            raise XpackError(f"the conversation has {found} image parts ({vision.placeholder}), but one image was given; give one image part")
        text = text.replace(vision.placeholder, vision.replacement)
        picture = _prepare_image(image, vision.projector, vision.image_size)
        data = picture.tobytes()
        bitmap = mtmd.mtmd_bitmap_init(picture.width, picture.height, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))
        if not bitmap:
            raise XpackError(f"llama.cpp could not take the {picture.width}x{picture.height} image")
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            raw = text.encode("utf-8")
            request = mtmd.mtmd_input_text()
            request.text = raw
            request.text_len = len(raw)
            request.add_special = self.add_bos and not (self.bos_token and text.startswith(self.bos_token))
            request.parse_special = True
            errors = len(_LOG_ERRORS)
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = mtmd.mtmd_tokenize(vision.ctx, chunks, ctypes.byref(request), bitmaps, 1)
            if rc != 0:
                raise XpackError(f"llama.cpp could not tokenize the prompt with the image (code {rc}{_last_error(errors)})")
            out: list[_Chunk] = []
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                kind = mtmd.mtmd_input_chunk_get_type(chunk)
                if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    out.append(_Chunk("text", [int(ptr[j]) for j in range(n.value)], n.value))
                elif kind == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
                    if mtmd.mtmd_input_chunk_get_n_pos(chunk) != n_tokens:  # M-RoPE models; not Gemma 3
                        raise XpackError(f"the {vision.projector} projector places images in a way xpack's llama.cpp runtime does not handle")
                    out.append(_Chunk("image", [], n_tokens, chunk))
                else:
                    raise XpackError(f"llama.cpp made a chunk of type {kind} from the prompt; only text and images are handled")
            if not out or out[-1].kind != "text":
                raise XpackError("the prompt ends with the image; put text (the generation prompt) after it")
            yield out
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def _eval_chunks(self, llm, chunks: list[_Chunk], on_text=None) -> float:
        """Evaluate ``chunks`` from position 0 in ``llm``'s context: text through ``Llama.eval`` (which
        keeps ``input_ids``/``n_tokens`` in step), images encoded by mtmd and decoded as embeddings.
        ``on_text(first_position, chunk)`` runs after each text chunk. Returns the image encoding seconds."""
        mtmd, vision = self._mtmd, self._vision_state
        llm.reset()
        llm._ctx.kv_cache_clear()
        encode_s = 0.0
        for chunk in chunks:
            if chunk.kind == "text":
                first = llm.n_tokens
                llm.eval(chunk.tokens)
                if on_text is not None:
                    on_text(first, chunk)
                continue
            errors = len(_LOG_ERRORS)
            start = time.perf_counter()
            rc = mtmd.mtmd_encode_chunk(vision.ctx, chunk.handle)
            encode_s += time.perf_counter() - start
            if rc != 0:
                raise XpackError(f"llama.cpp could not encode the image (code {rc}{_last_error(errors)})")
            n_past = self._llama_cpp.llama_pos(0)
            rc = mtmd.mtmd_helper_decode_image_chunk(
                vision.ctx, llm._ctx.ctx, chunk.handle, mtmd.mtmd_get_output_embd(vision.ctx),
                llm.n_tokens, 0, llm.n_batch, ctypes.byref(n_past), mtmd.mtmd_helper_post_decode_callback(), None,  # no callback (NULL)
            )
            if rc != 0:
                raise XpackError(f"llama.cpp could not decode the image embeddings (code {rc}{_last_error(errors)})")
            llm.n_tokens = n_past.value
        return encode_s

    def _picture(self, image):
        """A PIL image from a path (checked as ``generate`` checks it) or a PIL image as is."""
        if not self.accepts_images:
            raise XpackError(self.image_refusal())
        if isinstance(image, (str, os.PathLike)):
            return load_image(image)
        if not hasattr(image, "tobytes"):
            raise XpackError(f"an image must be a file path or a PIL image, not {type(image).__name__}")
        return image

    def tokenize_with_image(self, prompt: "str | Sequence[dict]", image) -> list[tuple[str, "list[int] | int"]]:
        """How the chat-templated prompt with ``image`` reaches the model: ("text", token ids) and
        ("image", number of image embeddings) pieces, in order."""
        picture = self._picture(image)
        with self._image_chunks(self.prompt_text(prompt, image=picture), picture) as chunks:
            return [("text", c.tokens) if c.kind == "text" else ("image", c.n_tokens) for c in chunks]

    # -- parity ------------------------------------------------------------------------------------

    def _scorer_for(self, n_tokens: int) -> "_Scorer":
        """A second llama.cpp context on the loaded model that keeps every position's logits."""
        need = -(-n_tokens // _SCORER_CTX_STEP) * _SCORER_CTX_STEP
        if self._scorer is None or self._scorer.n_ctx() < n_tokens:
            if self._scorer is not None:
                self._scorer.close()
            self._scorer = _Scorer(self.llm, need)
        return self._scorer

    def logits(self, token_ids: Sequence[int]):
        """Teacher-forced logits from a second llama.cpp context that keeps every position's logits."""
        if self.llm is None:
            raise XpackError("this runtime was closed; load the artifact again")
        ids = self._checked_ids(token_ids)
        if not ids:
            raise XpackError("logits needs at least one token id")
        scorer = self._scorer_for(len(ids))
        scorer.reset()
        scorer.eval(ids)
        return scorer.take(0, len(ids))

    def logits_with_image(self, prompt: "str | Sequence[dict]", image, continuation_ids: Sequence[int] | None = None):
        """Teacher-forced logits of the text that follows the image, for parity with the torch reference.

        ``prompt`` (a user message, or chat messages) is rendered with the chat template and the
        generation prompt, ``image`` (a path or a PIL image) goes where the template puts it, and
        ``continuation_ids`` (e.g. an answer to score) are appended. Returns ``(logits, token_ids)``:
        float32 [n, vocab_size] and the n text token ids after the image (Gemma 3: from
        ``<end_of_image>`` on), row i being the next-token logits after token i.
        """
        import numpy as np

        if self.llm is None:
            raise XpackError("this runtime was closed; load the artifact again")
        picture = self._picture(image)
        extra = self._checked_ids(continuation_ids or [])
        with self._image_chunks(self.prompt_text(prompt, image=picture), picture) as chunks:
            if extra:
                chunks = [*chunks, _Chunk("text", extra, len(extra))]
            n_total = sum(c.n_tokens for c in chunks)
            last_image = max(i for i, c in enumerate(chunks) if c.kind == "image")
            after_image = {id(c) for c in chunks[last_image + 1 :]}
            scorer = self._scorer_for(n_total)
            rows: list = []
            ids: list[int] = []

            def keep(first: int, chunk: _Chunk) -> None:
                if id(chunk) in after_image:
                    rows.append(scorer.take(first, chunk.n_tokens))
                    ids.extend(chunk.tokens)

            self._eval_chunks(scorer, chunks, on_text=keep)
        return np.concatenate(rows, axis=0), ids

    # -- memory ------------------------------------------------------------------------------------

    def peak_gpu_mb(self) -> float | None:
        """GPU memory this process holds (llama.cpp allocates its buffers up front, so this is the peak)."""
        return process_gpu_mb() if self.profile.device == "cuda" else None

    def info(self) -> dict:
        return {
            "gguf_file": str(self.gguf_path),
            "architecture": self.metadata.get("general.architecture"),
            "name": self.metadata.get("general.name"),
            "n_ctx": self.llm.n_ctx() if self.llm else None,
            "vocab_size": self._n_vocab,
            "stop_ids": sorted(self.stop_ids),
            "mmproj_file": str(self.mmproj_path) if self.mmproj_path else None,
            "mmproj_load_s": self._vision_state.load_s if self._vision_state else None,
        }


class _Scorer:
    """A llama.cpp context on a loaded ``Llama``'s model that keeps the logits of every position (teacher forcing).

    Why not a second ``Llama(logits_all=True)``, as llama-cpp-python would have it: that loads the model again,
    and on Gemma 3 4B Q4_K_M it took verify's artifact side from 4.4 to 10.7 GB RSS (a second 2.5 GB mapping and
    its buffers). A second context shares the weights (llama.cpp allows any number per model); the scores are
    written only for the rows evaluated. It has what ``_eval_chunks`` uses of a ``Llama``: ``reset``, ``eval``,
    ``n_tokens``, ``n_batch`` and ``_ctx``.
    """

    def __init__(self, llm, n_ctx: int):
        import numpy as np
        from llama_cpp import _internals

        params = type(llm.context_params).from_buffer_copy(llm.context_params)
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = self.n_batch = min(n_ctx, 512)
        params.n_seq_max = 1
        self._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self._batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self._n_vocab = llm.n_vocab()
        self.scores = np.empty((n_ctx, self._n_vocab), dtype=np.float32)  # pages become memory only where written
        self.n_tokens = 0

    def n_ctx(self) -> int:
        return self._ctx.n_ctx()

    def reset(self) -> None:
        self.n_tokens = 0

    def eval(self, tokens: Sequence[int]) -> None:
        """As ``Llama.eval`` with ``logits_all``: decode ``tokens`` after the first ``n_tokens`` positions."""
        import numpy as np

        self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
        for i in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[i : i + self.n_batch])
            self._batch.set_batch(batch=chunk, n_past=self.n_tokens, logits_all=True)
            self._ctx.decode(self._batch)
            out = np.ctypeslib.as_array(self._ctx.get_logits(), shape=(len(chunk), self._n_vocab))
            self.scores[self.n_tokens : self.n_tokens + len(chunk)] = out
            self.n_tokens += len(chunk)

    def take(self, first: int, n: int):
        """A copy of the logits of positions ``first`` .. ``first + n - 1``."""
        return self.scores[first : first + n].copy()

    def close(self) -> None:
        self._batch.close()
        self._ctx.close()
