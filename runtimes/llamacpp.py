"""GGUF artifacts through llama-cpp-python (no torch, no transformers).

The generation loop is ``Llama.generate`` plus an incremental UTF-8 decoder and a set lookup for
end-of-turn tokens: as thin as a raw llama-cpp-python loop, so its decode speed is llama.cpp's.
Chats are rendered with the GGUF's own ``tokenizer.chat_template`` (runtimes/chat.py) and
tokenized by llama.cpp with special tokens parsed.

Sampling is llama.cpp's (top-k -> top-p -> temperature, min_p off); its repetition penalty looks at
the last 64 generated tokens, where transformers' looks at the whole sequence.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Sequence

from xpack.errors import XpackError
from xpack.runtimes.base import END_OF_TURN_TOKENS, GenerationSettings, Runtime, gguf_models, read_manifest, timing_fields
from xpack.runtimes.chat import ChatTemplate

__all__ = ["LlamaCppRuntime", "gguf_file_of"]

_SCORER_CTX_STEP = 256


def gguf_file_of(path: "str | os.PathLike") -> Path:
    """The model .gguf of an artifact: the file itself, manifest.json's ``gguf_file``, or a folder's single non-mmproj .gguf."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise XpackError(f"{path} is not a .gguf file; pass a GGUF model or the folder `xpack export` wrote")
        return path
    if not path.is_dir():
        raise XpackError(f"{path} does not exist; pass a .gguf file or a folder holding one")
    named = read_manifest(path).get("gguf_file")
    if isinstance(named, str) and named:
        candidate = path / named
        if not candidate.is_file():
            raise XpackError(f"{path}/manifest.json names gguf_file {named}, which is missing; re-export the artifact")
        return candidate
    models = gguf_models(path)
    if len(models) == 1:
        return models[0]
    if not models:
        raise XpackError(f"{path} holds no model .gguf file; pass a .gguf file or the folder `xpack export` wrote")
    raise XpackError(
        f"{path} holds several .gguf models ({', '.join(p.name for p in models)}); pass one of them as --artifact"
    )


class LlamaCppRuntime(Runtime):
    name = "llamacpp"
    formats = ("gguf",)

    @classmethod
    def can_load(cls, path) -> bool:
        try:
            gguf_file_of(path)
        except XpackError:
            return False
        return True

    @classmethod
    def check_artifact(cls, path) -> None:
        gguf_file_of(path)

    # -- loading -----------------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            import llama_cpp
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
        self._llama_kwargs = dict(
            model_path=str(self.gguf_path),
            n_gpu_layers=profile.gpu_layers if on_gpu else 0,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        try:
            self.llm = llama_cpp.Llama(n_ctx=profile.n_ctx, logits_all=False, **self._llama_kwargs)
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
        self._piece_buf = ctypes.create_string_buffer(256)
        self.accepts_images = False  # mmproj support comes with the vision export
        self.mmproj_path = self._find_mmproj()

    def _find_mmproj(self) -> Path | None:
        folder = self.artifact if self.artifact.is_dir() else self.artifact.parent
        named = read_manifest(folder).get("mmproj_file") if self.artifact.is_dir() else None
        if isinstance(named, str) and (folder / named).is_file():
            return folder / named
        if self.artifact.is_dir():
            found = sorted(p for p in folder.glob("*.gguf") if p.name.lower().startswith("mmproj"))
            return found[0] if found else None
        return None

    def image_refusal(self) -> str:
        if self.mmproj_path is not None:
            return (
                f"image input for GGUF is not supported yet ({self.mmproj_path.name} is not used); "
                "for images, run the merged checkpoint folder instead (transformers runtime)"
            )
        return f"--image given but artifact {self.artifact} is text-only (a GGUF without an mmproj vision projector); drop --image"

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
        for attr in ("_scorer", "llm"):
            obj = getattr(self, attr, None)
            if obj is not None:
                obj.close()
                setattr(self, attr, None)

    # -- text --------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise XpackError(f"{self.gguf_path} has no chat template (tokenizer.chat_template); re-export it from a model with one")
        return self.chat_template.render(messages, add_generation_prompt)

    def tokenize(self, text: str) -> list[int]:
        add_bos = self.add_bos and not (self.bos_token and text.startswith(self.bos_token))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def _piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render as nothing), cached."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = self._piece_buf
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
        prompt = self.tokenize(text)
        room = llm.n_ctx() - len(prompt)
        if room < 1:
            raise XpackError(
                f"the prompt is {len(prompt)} tokens, more than the context of {llm.n_ctx()} (profile {self.profile.name}'s n_ctx); "
                "shorten it or use a profile with a larger n_ctx"
            )
        limit = min(settings.max_tokens, room)
        llm.set_seed(settings.seed if settings.seed is not None else self._llama_cpp.LLAMA_DEFAULT_SEED)
        llm.reset()  # a fresh prefill every call: the same input always gives the same output
        stop_ids, piece = self.stop_ids, self._piece
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        parts: list[str] = []
        count = steps = 0
        first = None
        finish = "length"
        start = time.perf_counter()
        tokens = llm.generate(
            prompt,
            top_k=settings.top_k,
            top_p=settings.top_p,
            min_p=0.0,
            typical_p=1.0,
            temp=settings.temperature,
            repeat_penalty=settings.repetition_penalty,
        )
        try:
            for token in tokens:
                steps += 1
                if first is None:
                    first = time.perf_counter()
                if token in stop_ids:
                    finish = "stop"
                    break
                count += 1
                chunk = decode(piece(token))
                if chunk:
                    parts.append(chunk)
                    if on_token is not None:
                        on_token(chunk)
                if count >= limit:
                    break
        finally:
            tokens.close()
        end = time.perf_counter()
        tail = decode(b"", True)
        if tail:
            parts.append(tail)
            if on_token is not None:
                on_token(tail)
        return timing_fields(
            text="".join(parts), prompt_tokens=len(prompt), completion_tokens=count, steps=steps,
            start=start, first=first, end=end, finish_reason=finish,
        )

    # -- parity ------------------------------------------------------------------------------------

    def logits(self, token_ids: Sequence[int]):
        """Teacher-forced logits from a second llama.cpp context that keeps every position's logits."""
        import numpy as np

        ids = [int(t) for t in token_ids]
        if not ids:
            raise XpackError("logits needs at least one token id")
        bad = [t for t in ids if not 0 <= t < self._n_vocab]
        if bad:
            raise XpackError(f"token id {bad[0]} is outside the vocabulary (0..{self._n_vocab - 1})")
        need = -(-len(ids) // _SCORER_CTX_STEP) * _SCORER_CTX_STEP
        if self._scorer is None or self._scorer.n_ctx() < len(ids):
            if self._scorer is not None:
                self._scorer.close()
            self._scorer = self._llama_cpp.Llama(n_ctx=need, n_batch=min(need, 512), logits_all=True, **self._llama_kwargs)
        scorer = self._scorer
        scorer.reset()
        scorer.eval(ids)
        return np.array(scorer.scores[: len(ids)], dtype=np.float32, copy=True)

    # -- memory ------------------------------------------------------------------------------------

    def peak_gpu_mb(self) -> float | None:
        """GPU memory this process holds (llama.cpp allocates its buffers up front, so this is the peak)."""
        if self.profile.device != "cuda":
            return None
        smi = shutil.which("nvidia-smi")
        if not smi:
            return None
        try:
            out = subprocess.run(
                [smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10, check=False,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        used = [float(mem) for pid, _, mem in (line.partition(",") for line in out.splitlines()) if pid.strip() == str(os.getpid())]
        return sum(used) if used else None

    def info(self) -> dict:
        return {
            "gguf_file": str(self.gguf_path),
            "architecture": self.metadata.get("general.architecture"),
            "name": self.metadata.get("general.name"),
            "n_ctx": self.llm.n_ctx() if self.llm else None,
            "vocab_size": self._n_vocab,
            "stop_ids": sorted(self.stop_ids),
        }
