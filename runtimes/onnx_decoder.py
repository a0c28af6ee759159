"""ONNX decoders (``xpack export --format onnx``, or any optimum-style ``text-generation-with-past``
graph) through onnxruntime, with Gemma 3's vision graphs when the artifact has them.

The graph takes ``input_ids``, ``attention_mask``, ``position_ids`` when it has that input, and one
``past_key_values.N.key/value`` per layer, and returns ``logits`` and ``present.N.key/value``. The
KV layout (heads, head size, dtype) is read from the graph's inputs, never from the config (optimum's
own ORTModelForCausalLM guesses it from the config and gets Gemma 2's wrong). A vision model's
decoder takes ``inputs_embeds`` (from ``embed.onnx``, the image features of ``vision.onnx`` put in at
the image tokens) and its attention masks as additive biases.

With xpack's own graph (GroupQueryAttention), the cache is one buffer per layer allocated for the
whole generation and bound as both past and present, so the kernel appends in place
(``XPACK_ONNX_SHARE_KV=0`` turns that off, for measuring). Otherwise the decode loop keeps the cache
where onnxruntime made it: each step's ``present.*`` OrtValues are bound as the next step's
``past_key_values.*`` through an IO binding (no numpy copies, no per-step concatenation in Python),
only the last position's logits are copied out, and the attention mask and position ids are views
of arrays allocated once per call. On a CUDA profile the cache stays on the GPU
(CUDAExecutionProvider) and only the logits come back. Tokenizer, chat template, sampling and the
generation loop are runtimes/onnx_base.py's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from xpack.errors import XpackError
from xpack.runtimes.artifacts import read_json, read_manifest
from xpack.runtimes.images import Gemma3ImagePreprocessor, gemma3_image_tokens
from xpack.runtimes.onnx_base import OnnxRuntimeBase, Prompt

__all__ = ["OnnxDecoderRuntime", "attention_bias"]

_NP_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


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


class OnnxDecoderRuntime(OnnxRuntimeBase):
    """One decoder graph (``model.onnx``), plus ``embed.onnx`` and ``vision.onnx`` for Gemma 3 with images."""

    # -- loading -----------------------------------------------------------------------------------

    def _load_graphs(self, folder: Path) -> None:
        self.session = self._session(self.onnx_path)
        self._read_graph(folder)
        self._read_vision(folder)

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

    # -- the model ---------------------------------------------------------------------------------

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
        ids = self._logits_ids(token_ids)
        mask, positions = self._buffers(len(ids))
        logits, _ = self._run(self.session.io_binding(), ids, self.empty_past, 0, mask, positions)
        return self._np.ascontiguousarray(logits.numpy()[0], dtype=self._np.float32)

    # -- images ------------------------------------------------------------------------------------

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
        """Teacher-forced logits of the text after the (last) image, as the other runtimes' method.

        Returns ``(logits, token_ids)``: float32 [n, vocab] and the text token ids after the image."""
        picture, extra = self._image_inputs(image, continuation_ids)
        np = self._np
        ids, embeds, spans, _ = self._image_prompt(self.prompt_text(prompt, image=picture), picture)
        if extra:
            ids = ids + extra
            embeds = np.concatenate([embeds, self._embed(extra)], axis=1)
        mask, positions = self._buffers(len(ids))
        logits, _ = self._run(self.session.io_binding(), ids, self.empty_past, 0, mask, positions, embeds, spans)
        start = spans[-1][1]
        return np.ascontiguousarray(logits.numpy()[0, start:], dtype=np.float32), ids[start:]

    # -- generation --------------------------------------------------------------------------------

    def _prompt(self, text: str, image) -> Prompt:
        if image is None:
            return Prompt(self.tokenize(text), None, (None, ()))
        ids, embeds, spans, encode_s = self._image_prompt(text, image)
        return Prompt(ids, encode_s, (embeds, spans))

    def _stepper(self, ids: list[int], limit: int, state):
        np = self._np
        embeds, spans = state
        mask, positions = self._buffers(len(ids) + limit)
        binding = self.session.io_binding()
        shared = self.share_buffer
        start_past = self._cache_buffers(len(ids) + limit) if shared else self.empty_past
        logits, past = self._run(binding, ids, start_past, 0, mask, positions, embeds, spans, shared)
        cache = [past]

        def step(token: int, cursor: int):
            out, cache[0] = self._run(binding, [token], cache[0], cursor, mask, positions, shared=shared)
            return out.numpy()[0, -1].astype(np.float32, copy=True)

        return logits.numpy()[0, -1].astype(np.float32, copy=True), step
