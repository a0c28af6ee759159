"""ONNX decoders (``xpack export --format onnx``, or any optimum-style ``text-generation-with-past``
graph) through onnxruntime, with the tokenizers library and numpy: no torch, no transformers.

The graph takes ``input_ids``, ``attention_mask``, ``position_ids`` when it has that input, and one
``past_key_values.N.key/value`` per layer, and returns ``logits`` and ``present.N.key/value``. The
KV layout (heads, head size, dtype) is read from the graph's inputs, never from the config (optimum's
own ORTModelForCausalLM guesses it from the config and gets Gemma 2's wrong).

With xpack's own graph (GroupQueryAttention), the cache is one buffer per layer allocated for the
whole generation and bound as both past and present, so the kernel appends in place
(``XPACK_ONNX_SHARE_KV=0`` turns that off, for measuring). Otherwise the decode loop keeps the cache where onnxruntime made it: each step's ``present.*`` OrtValues are
bound as the next step's ``past_key_values.*`` through an IO binding (no numpy copies, no per-step
concatenation in Python), only the last position's logits are copied out, and the attention mask and
position ids are views of arrays allocated once per call. On a CUDA profile the cache stays on the
GPU (CUDAExecutionProvider) and only the logits come back.

Sampling follows llama.cpp's chain as ``runtimes/llamacpp.py`` runs it: the repetition penalty over
the last 64 generated tokens (a logit above 0 is divided by the penalty, one below multiplied),
then greedy at temperature 0, else top-k -> top-p -> temperature -> a draw from numpy's generator
seeded with ``seed``. Chats are rendered with the folder's chat template (runtimes/chat.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Sequence

from xpack.errors import XpackError
from xpack.runtimes.artifacts import read_json, read_manifest
from xpack.runtimes.base import Runtime
from xpack.runtimes.chat import ChatTemplate, END_OF_TURN_TOKENS
from xpack.runtimes.images import gemma3_image_tokens, Gemma3ImagePreprocessor, MllamaImagePreprocessor
from xpack.runtimes.messages import load_image
from xpack.runtimes.onnx_mllama import MllamaOnnx
from xpack.runtimes.settings import GenerationSettings, timing_fields

__all__ = ["OnnxRuntime", "attention_bias", "onnx_file_of"]

MLLAMA_META = "mllama_onnx.json"  # runtimes/onnx_mllama.META_FILE, named here so that text-only loads import nothing more
PENALTY_LAST_N = 64  # llama.cpp's default penalty window (llama-cpp-python's last_n_tokens_size)
_NP_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}
# transformers' clean_up_tokenization (PreTrainedTokenizerBase.clean_up_tokenization), applied when
# tokenizer_config.json sets clean_up_tokenization_spaces, so that decoded text equals transformers'.
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def onnx_file_of(path: "str | os.PathLike") -> Path:
    """The decoder .onnx of an artifact: the file itself, manifest.json's ``onnx_file``, or a folder's single .onnx."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() != ".onnx":
            raise XpackError(f"{path} is not an .onnx file; pass an ONNX model or the folder `xpack export --format onnx` wrote")
        return path
    if not path.is_dir():
        raise XpackError(f"{path} does not exist; pass an .onnx file or a folder holding one")
    named = read_manifest(path).get("onnx_file")
    if isinstance(named, str) and named:
        candidate = path / named
        if not candidate.is_file():
            raise XpackError(f"{path}/manifest.json names onnx_file {named}, which is missing; re-export the artifact")
        return candidate
    models = sorted(p for p in [*path.glob("*.onnx"), *path.glob("onnx/*.onnx")] if p.is_file())
    if len(models) == 1:
        return models[0]
    if not models:
        raise XpackError(f"{path} holds no .onnx file; pass an .onnx file or the folder `xpack export --format onnx` wrote")
    raise XpackError(f"{path} holds several .onnx files ({', '.join(p.name for p in models)}); pass one of them as --artifact")


def attention_bias(start: int, n: int, window: int | None = None, image_spans: Sequence[tuple[int, int]] = ()):
    """Additive attention mask [1, 1, n, start + n] for ``n`` new tokens after ``start`` cached ones, as
    transformers builds it for Gemma 3: causal, within ``window`` positions when given (a sliding
    layer: a token sees itself and the window - 1 before it), and both ways inside each image span
    ``(first, end)`` (absolute positions, end exclusive; the token_type_ids mask)."""
    import numpy as np

    q = np.arange(start, start + n)[:, None]
    k = np.arange(start + n)[None, :]
    allowed = k <= q
    if window:
        allowed &= (q - k) < window
    for first, end in image_spans:
        allowed |= (q >= first) & (q < end) & (k >= first) & (k < end)
    bias = np.where(allowed, np.float32(0), np.finfo(np.float32).min).astype(np.float32)
    return bias[None, None]


def _ids(value) -> set[int]:
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple)):
        return {int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


class OnnxRuntime(Runtime):
    name = "onnx"
    formats = ("onnx",)
    locate = staticmethod(onnx_file_of)

    # -- loading -----------------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            import numpy as np
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise XpackError(f"the onnx runtime needs onnxruntime, tokenizers and numpy ({exc}); install them with `pip install 'xpack[onnx]'`") from None
        self._np, self._ort = np, ort
        self.mllama = None
        self.onnx_path = onnx_file_of(self.artifact)
        folder = self.onnx_path.parent
        profile = self.profile
        self.on_gpu = profile.device == "cuda"
        threads = profile.threads or (os.cpu_count() or 1)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if self.on_gpu:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise XpackError(
                    f"profile {profile.name} runs on the GPU, but this onnxruntime has no CUDAExecutionProvider "
                    f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use --profile cpu16"
                )
            providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self._options, self._providers = options, providers
        self._threads = threads
        self._device = "cuda" if self.on_gpu else "cpu"
        if (folder / MLLAMA_META).is_file():
            self._read_mllama(folder)
        else:
            self.session = self._session(self.onnx_path)
            self._read_graph(folder)
            self._read_vision(folder)

        tok_path = folder / "tokenizer.json"
        if not tok_path.is_file():
            raise XpackError(f"{folder} has no tokenizer.json; re-export the artifact with xpack (it copies the tokenizer beside the model)")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
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

    def _session(self, path: Path):
        try:
            return self._ort.InferenceSession(str(path), self._options, providers=self._providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types (Fail, InvalidGraph, NoSuchFile, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise XpackError(f"onnxruntime could not load {path} ({first[:300]}); check that the .onnx file and its .onnx_data are complete") from None

    def _companion(self, folder: Path, key: str, what: str):
        """The session of a graph the manifest names beside the decoder (``embed_file``, ``vision_file``), or None."""
        named = read_manifest(folder).get(key)
        if not named:
            return None
        path = folder / named
        if not path.is_file():
            raise XpackError(f"{folder}/manifest.json names {key} {named} ({what}), which is missing; re-export the artifact")
        return self._session(path)

    def _read_vision(self, folder: Path) -> None:
        """The embedding graph a decoder taking inputs_embeds needs, and the vision graph with its image preprocessing."""
        self.embedder = self._companion(folder, "embed_file", "the token embedding")
        if self.takes_embeds and self.embedder is None:
            raise XpackError(f"{self.onnx_path.name} takes inputs_embeds but {folder} names no embedding graph (embed_file); re-export it with xpack")
        self.vision = self._companion(folder, "vision_file", "the vision tower")
        self.accepts_images = self.vision is not None and self.takes_embeds
        if self.accepts_images:
            self.preprocess = Gemma3ImagePreprocessor.from_folder(folder)
            self.image_tokens = gemma3_image_tokens(folder)

    def _read_mllama(self, folder: Path) -> None:
        """Llama 3.2 Vision's three graphs (runtimes/onnx_mllama.py); tokenizer, chat and sampling stay this class's."""
        self.mllama = MllamaOnnx(folder, providers=self._providers, threads=self._threads)
        self.session = self.mllama.sessions["decoder"]
        self._n_vocab = self.mllama.vocab_size
        self.kv_layout = {"layers": len(self.mllama.self_layers), "cross_layers": len(self.mllama.cross_layers),
                          "heads": self.mllama.kv_heads, "head_dim": self.mllama.head_dim, "dtype": str(self.mllama.kv_dtype)}
        self.takes_position_ids, self.takes_embeds, self.bias_inputs, self.max_length = True, False, [], None
        self.embedder = self.vision = None
        self.accepts_images = (folder / "preprocessor_config.json").is_file()
        if self.accepts_images:
            self.preprocess = MllamaImagePreprocessor.from_folder(folder)

    def _read_graph(self, folder: Path) -> None:
        """Input/output names and the KV-cache layout, from the graph (the config only when the graph leaves a size symbolic)."""
        session = self.session
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        self.takes_embeds = "inputs_embeds" in inputs
        first = "inputs_embeds" if self.takes_embeds else "input_ids"
        missing = [n for n in (first, "attention_mask") if n not in inputs] + [n for n in ("logits",) if n not in outputs]
        if missing:
            raise XpackError(
                f"{self.onnx_path.name} is not a decoder graph xpack can run (no {', '.join(missing)}); "
                "export it with `xpack export --format onnx` (optimum task text-generation-with-past)"
            )
        past = [n for n in inputs if n.startswith("past_key_values.")]
        if not past:
            raise XpackError(f"{self.onnx_path.name} has no KV cache inputs (past_key_values.*); export it with the text-generation-with-past task")
        past.sort(key=lambda n: (int(n.split(".")[1]), n))
        config = read_json(folder / "config.json")
        text_cfg = config.get("text_config") or config
        self.past_names = past
        self.present_names = []
        self.empty_past = []
        for name in past:
            present = "present." + name[len("past_key_values."):]
            if present not in outputs:
                raise XpackError(f"{self.onnx_path.name} takes {name} but returns no {present}; re-export the artifact")
            self.present_names.append(present)
            shape = inputs[name].shape
            heads = shape[1] if isinstance(shape[1], int) else text_cfg.get("num_key_value_heads") or text_cfg.get("num_attention_heads")
            head_dim = shape[3] if isinstance(shape[3], int) else text_cfg.get("head_dim") or (text_cfg["hidden_size"] // text_cfg["num_attention_heads"])
            dtype = _NP_TYPES.get(inputs[name].type)
            if dtype is None or dtype == "bfloat16":
                raise XpackError(f"{self.onnx_path.name} keeps its KV cache in {inputs[name].type}, which xpack's onnx runtime does not feed; export fp32 or fp16")
            self.empty_past.append(self._ort.OrtValue.ortvalue_from_numpy(self._np.zeros((1, int(heads), 0, int(head_dim)), dtype=dtype)))
        self.kv_layout = {"layers": len(past) // 2, "heads": self.empty_past[0].shape()[1], "head_dim": self.empty_past[0].shape()[3], "dtype": _NP_TYPES[inputs[past[0]].type]}
        self.takes_position_ids = "position_ids" in inputs
        vocab = outputs["logits"].shape[-1]
        self._n_vocab = int(vocab) if isinstance(vocab, int) else int(text_cfg.get("vocab_size", 0))
        self.bias_inputs = [n for n in ("attention_bias", "attention_bias_sliding") if n in inputs]
        # xpack's graphs attend with GroupQueryAttention, which can grow its cache in place (see _cache_buffers)
        self.share_buffer = read_manifest(folder).get("graph") == "xpack" and os.environ.get("XPACK_ONNX_SHARE_KV", "1") != "0"
        self.window = text_cfg.get("sliding_window")
        self.max_length = read_manifest(folder).get("max_length")
        extra = sorted(set(inputs) - {first, "attention_mask", "position_ids", *self.bias_inputs, *past})
        if extra:
            raise XpackError(f"{self.onnx_path.name} takes inputs xpack's onnx runtime does not feed ({', '.join(extra)}); export the decoder with `xpack export --format onnx`")

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

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise XpackError(f"{self.onnx_path.parent} has no chat template (chat_template.jinja or tokenizer_config.json); re-export it from a model with one")
        return self.chat_template.render(messages, add_generation_prompt)

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

    def _embed(self, token_ids):
        return self.embedder.run(["inputs_embeds"], {"input_ids": self._np.asarray([token_ids], dtype=self._np.int64)})[0]

    def _run(self, binding, token_ids, past, start: int, mask, positions, embeds=None, spans=(), shared: bool = False):
        """One forward pass of ``token_ids`` after ``start`` cached positions; returns (logits OrtValue, present OrtValues).

        A vision model's decoder takes ``embeds`` (the prompt's embeddings with the image features in)
        and its attention masks as biases, ``spans`` being the image positions that see each other."""
        np = self._np
        n = len(token_ids)
        if self.takes_embeds:
            binding.bind_cpu_input("inputs_embeds", self._embed(token_ids) if embeds is None else embeds)
        else:
            binding.bind_cpu_input("input_ids", np.asarray([token_ids], dtype=np.int64))
        for name in self.bias_inputs:
            binding.bind_cpu_input(name, attention_bias(start, n, self.window if name.endswith("sliding") else None, spans))
        binding.bind_cpu_input("attention_mask", mask[:, : start + n])
        if self.takes_position_ids:
            binding.bind_cpu_input("position_ids", positions[:, start : start + n])
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.clear_binding_outputs()
        binding.bind_output("logits", "cpu")
        for name, value in zip(self.present_names, past if shared else self.present_names):
            if shared:  # the kernel writes the new keys/values into the buffer it reads the past from
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_output(name, self._device)
        if self.on_gpu:
            binding.synchronize_inputs()
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        else:
            self.session.run_with_iobinding(binding)
        out = binding.get_outputs()
        return out[0], (past if shared else out[1:])

    def _cache_buffers(self, length: int) -> list:
        """One [1, kv_heads, length, head_dim] buffer per past input, allocated once per generation on the
        profile's device: GroupQueryAttention appends in place when past and present are the same
        buffer (onnxruntime-genai's past_present_share_buffer), so no step copies the cache."""
        np, layout = self._np, self.kv_layout
        shape = [1, int(layout["heads"]), int(length), int(layout["head_dim"])]
        return [self._ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(layout["dtype"]).type, self._device) for _ in self.past_names]

    def _buffers(self, length: int):
        np = self._np
        return np.ones((1, length), dtype=np.int64), np.arange(length, dtype=np.int64)[None, :]

    def logits(self, token_ids: Sequence[int]):
        """Teacher-forced logits: one pass over ``token_ids`` with an empty cache, float32 [n, vocab]."""
        self._check_open()
        ids = self._checked_ids(token_ids)
        if not ids:
            raise XpackError("logits needs at least one token id")
        if self.mllama is not None:
            return self._np.ascontiguousarray(self.mllama.logits(ids), dtype=self._np.float32)
        mask, positions = self._buffers(len(ids))
        logits, _ = self._run(self.session.io_binding(), ids, self.empty_past, 0, mask, positions)
        return self._np.ascontiguousarray(logits.numpy()[0], dtype=self._np.float32)

    def _checked_ids(self, token_ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in token_ids]
        bad = [t for t in ids if not 0 <= t < self._n_vocab]
        if bad:
            raise XpackError(f"token id {bad[0]} is outside the vocabulary (0..{self._n_vocab - 1})")
        return ids

    # -- generation --------------------------------------------------------------------------------

    def _pick(self, logits, recent: list[int], settings: GenerationSettings, rng) -> int:
        """llama.cpp's sampler chain on one row of logits (float32, modified in place)."""
        np = self._np
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

    # -- images ------------------------------------------------------------------------------------

    def image_refusal(self, flag: str = "--image") -> str:
        return f"{flag} given but artifact {self.artifact} is text-only (no vision.onnx); drop {flag} or export a vision model with xpack"

    def _image_prompt(self, text: str, picture):
        """Token ids, embeddings (image features at the image tokens), image spans and encode seconds of a rendered prompt with one image."""
        np = self._np
        ids = self.tokenize(self.image_tokens.expand(text, 1))
        pixels = self.preprocess(picture)
        start = time.perf_counter()
        features = self.vision.run(None, {self.vision.get_inputs()[0].name: pixels})[0]
        encode_s = time.perf_counter() - start
        embeds = self._embed(ids)
        where = np.flatnonzero(np.asarray(ids) == self.image_tokens.image_token_id)
        if len(where) != features.shape[1]:
            raise XpackError(f"the prompt holds {len(where)} image tokens for {features.shape[1]} image features; re-export the artifact with xpack")
        embeds[0, where] = features[0].astype(embeds.dtype)
        breaks = np.flatnonzero(np.diff(where) != 1)
        firsts = [where[0], *where[breaks + 1]]
        lasts = [*where[breaks], where[-1]]
        return ids, embeds, [(int(a), int(b) + 1) for a, b in zip(firsts, lasts)], encode_s

    def logits_with_image(self, prompt, image, continuation_ids: Sequence[int] | None = None):
        """Teacher-forced logits of the text after the (last) image token, as the other runtimes' method.

        Returns ``(logits, token_ids)``: float32 [n, vocab] and the text token ids after the image."""
        self._check_open()
        if not self.accepts_images:
            raise XpackError(self.image_refusal())
        np = self._np
        picture = load_image(image) if not hasattr(image, "convert") else image
        extra = self._checked_ids(continuation_ids or [])
        if self.mllama is not None:
            ids = self.tokenize(self.prompt_text(prompt, image=picture)) + extra
            state, _ = self._mllama_image(picture)
            where = [i for i, t in enumerate(ids) if t == self.mllama.image_token_id]
            if not where:
                raise XpackError("the chat template put no <|image|> token in the prompt; it cannot take image parts")
            start = where[-1] + 1
            return np.ascontiguousarray(self.mllama.logits(ids, state)[start:], dtype=np.float32), ids[start:]
        ids, embeds, spans, _ = self._image_prompt(self.prompt_text(prompt, image=picture), picture)
        if extra:
            ids = ids + extra
            embeds = np.concatenate([embeds, self._embed(extra)], axis=1)
        mask, positions = self._buffers(len(ids))
        logits, _ = self._run(self.session.io_binding(), ids, self.empty_past, 0, mask, positions, embeds, spans)
        start = spans[-1][1]
        return np.ascontiguousarray(logits.numpy()[0, start:], dtype=np.float32), ids[start:]

    def _mllama_image(self, picture):
        """Llama 3.2 Vision: the image's tiles through the vision and cross-attention K/V graphs, once."""
        arrays = self.preprocess(picture)
        start = time.perf_counter()
        state = self.mllama.encode_image(arrays["pixel_values"], arrays["aspect_ratio_ids"], arrays["aspect_ratio_mask"])
        return state, time.perf_counter() - start

    # -- generation --------------------------------------------------------------------------------

    def _stepper(self, prompt: list[int], limit: int, embeds, spans, image_state):
        """Run the prompt; returns (next-token logits row, ``step(token, cursor)`` giving the next row)."""
        np = self._np
        if self.mllama is not None:
            m = self.mllama
            cross_mask, row_mask = m.masks(prompt, image_state)
            cross_kv = image_state.cross_kv if image_state is not None else m._no_image()
            logits, past = m._run(prompt, m._empty_past(), cross_kv, cross_mask, row_mask, 0)
            last_cross, last_row = cross_mask[:, :, -1:], row_mask[:, :, -1:]  # generated tokens reuse the last prompt row
            cache = [past]

            def mllama_step(token: int, cursor: int):
                out, cache[0] = m._run([token], cache[0], cross_kv, last_cross, last_row, cursor)
                return out[-1].astype(np.float32, copy=True)

            return logits[-1].astype(np.float32, copy=True), mllama_step
        mask, positions = self._buffers(len(prompt) + limit)
        binding = self.session.io_binding()
        shared = self.share_buffer
        start_past = self._cache_buffers(len(prompt) + limit) if shared else self.empty_past
        logits, past = self._run(binding, prompt, start_past, 0, mask, positions, embeds, spans, shared)
        cache = [past]

        def step(token: int, cursor: int):
            out, cache[0] = self._run(binding, [token], cache[0], cursor, mask, positions, shared=shared)
            return out.numpy()[0, -1].astype(np.float32, copy=True)

        return logits.numpy()[0, -1].astype(np.float32, copy=True), step

    @property
    def n_ctx(self) -> int:
        """The profile's context, within the positions the graph's rotary tables cover."""
        return min(self.profile.n_ctx, int(self.max_length)) if self.max_length else self.profile.n_ctx

    def _generate(self, text, settings: GenerationSettings, image, on_token) -> dict:
        self._check_open()
        np = self._np
        embeds, spans, encode_s, image_state = None, (), None, None
        if image is not None and self.mllama is not None:
            prompt = self.tokenize(text)
            image_state, encode_s = self._mllama_image(image)
        elif image is not None:
            prompt, embeds, spans, encode_s = self._image_prompt(text, image)
        else:
            prompt = self.tokenize(text)
        n_ctx = self.n_ctx
        if len(prompt) >= n_ctx:
            raise XpackError(
                f"the prompt is {len(prompt)} tokens, more than the context of {n_ctx} (profile {self.profile.name}'s n_ctx); "
                "shorten it or use a profile with a larger n_ctx"
            )
        limit = min(settings.max_tokens, n_ctx - len(prompt))
        stop_ids = frozenset() if settings.ignore_eos else self.stop_ids
        rng = np.random.default_rng(settings.seed)
        ids: list[int] = []
        printed = ""
        steps = 0
        first = None
        finish = "length"
        start = time.perf_counter()
        row, step = self._stepper(prompt, limit, embeds, spans, image_state)
        cursor = len(prompt)
        while True:
            token = self._pick(row, ids[-PENALTY_LAST_N:], settings, rng)
            steps += 1
            if first is None:
                first = time.perf_counter()
            if token in stop_ids:
                finish = "stop"
                break
            ids.append(token)
            if on_token is not None:
                text_now = self.detokenize(ids)
                if not text_now.endswith("\ufffd") and text_now.startswith(printed) and len(text_now) > len(printed):
                    on_token(text_now[len(printed):])
                    printed = text_now
            if len(ids) >= limit:
                break
            row = step(token, cursor)
            cursor += 1
        end = time.perf_counter()
        answer = self.detokenize(ids)
        if on_token is not None and len(answer) > len(printed) and answer.startswith(printed):
            on_token(answer[len(printed):])
        measured = timing_fields(
            text=answer, prompt_tokens=len(prompt), completion_tokens=len(ids), steps=steps,
            start=start - (encode_s or 0.0), first=first, end=end, finish_reason=finish, token_ids=ids,
        )
        measured["image_encode_s"] = encode_s
        return measured

    # -- memory and facts --------------------------------------------------------------------------

    def peak_gpu_mb(self) -> float | None:
        """GPU memory this process holds (onnxruntime's CUDA arena only grows, so this is its peak)."""
        if not self.on_gpu:
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
