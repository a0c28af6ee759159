"""Llama 3.2 Vision (mllama) through onnxruntime and numpy: the three graphs ``xpack.packager.export.onnx.mllama`` writes,
as a pipeline (:class:`MllamaOnnx`, which the export checks its graphs with) and as a runtime (:class:`MllamaOnnxRuntime`).

No torch, no transformers. The folder holds ``vision.onnx``, ``cross_kv.onnx``, ``decoder.onnx`` and
``mllama_onnx.json`` (layer indices, KV layout, image token, tiles, end-of-turn ids). One image, one
sequence (batch 1):

1. :meth:`MllamaOnnx.encode_image` runs ``vision.onnx`` on already preprocessed ``pixel_values``
   [1, 1, max_tiles, 3, H, W] (``MllamaImageProcessor``'s output), ``aspect_ratio_ids`` [1, 1] and
   ``aspect_ratio_mask`` [1, 1, max_tiles], then ``cross_kv.onnx`` on its output: the keys/values of
   every cross-attention layer, computed once per image and kept in an :class:`ImageState`.
2. :meth:`MllamaOnnx.logits` (teacher forcing) and :meth:`MllamaOnnx.generate_greedy` (prefill, then
   one token a step with the self-attention KV cache) run ``decoder.onnx``.

:class:`MllamaOnnxRuntime` is the same pipeline behind the Runtime interface (``--runtime onnx`` picks it
for a folder holding ``mllama_onnx.json``); tokenizer, chat template, sampling and the generation loop
are runtimes/onnx_base.py's, shared with the decoder runtime.

The masks are built as transformers builds them. ``MllamaProcessor``: the text from the
``<|image|>`` token to the end of the sequence attends to the image's real tiles (``num_tiles`` =
the ones set in ``aspect_ratio_mask``), the text before it to none. ``_prepare_cross_attention_mask``:
each tile stands for its ``tokens_per_tile`` vision tokens; the additive mask is 0 where a token
attends and float32's min where not; a row that attends to nothing (text before the image) gets
``full_text_row_masked_out_mask`` = 0 and an all-zero additive row (so its attention branch attends
uniformly to every vision token, padding tiles included, exactly as transformers 4.57 does, and only
its MLP branch is masked). Generated tokens reuse the last prompt row, as
``MllamaForConditionalGeneration._update_model_kwargs_for_generation`` does. Without an image the
decoder gets one all-zero cross key/value and zero masks, which makes every cross-attention layer
the identity (transformers skips those layers then).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from xpack.errors import XpackError
from xpack.runtimes.artifacts import MLLAMA_FORMAT, MLLAMA_META_FILE, PREPROCESSOR_CONFIG
from xpack.runtimes.images import MllamaImagePreprocessor
from xpack.runtimes.onnx_base import OnnxRuntimeBase, Prompt, open_session, session_options

__all__ = ["MllamaOnnx", "MllamaOnnxRuntime", "ImageState", "cross_attention_masks"]

GRAPHS = ("vision", "cross_kv", "decoder")
_NP_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


@dataclass
class ImageState:
    """One encoded image: the cross-attention keys/values (``cross_key_values.{L}.key/value`` -> array) and its tiles."""

    cross_kv: dict
    num_tiles: int
    max_tiles: int
    tokens_per_tile: int
    cross_attention_states: "object | None" = field(default=None, repr=False)

    @property
    def num_vision_tokens(self) -> int:
        return self.max_tiles * self.tokens_per_tile


def cross_attention_masks(token_ids: Sequence[int], image_token_id: int, num_tiles: int, max_tiles: int, tokens_per_tile: int, dtype="float32"):
    """(cross_attention_mask [1, 1, S, V] additive, full_text_row_masked_out_mask [1, 1, S, 1]) for one image.

    ``MllamaProcessor`` (get_cross_attention_token_mask + convert_sparse_cross_attention_mask_to_dense)
    followed by ``_prepare_cross_attention_mask``, for a sequence holding exactly one ``<|image|>``.
    """
    import numpy as np

    ids = list(token_ids)
    where = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(where) != 1:
        raise XpackError(f"a prompt with an image needs exactly one <|image|> token (id {image_token_id}); it has {len(where)}")
    seq = len(ids)
    tiles = np.zeros((seq, max_tiles), dtype=bool)
    tiles[where[0] :, :num_tiles] = True
    attend = np.repeat(tiles, tokens_per_tile, axis=1)  # [S, V]
    rows = attend.any(axis=1)
    additive = np.where(attend, 0.0, np.finfo(np.float32).min).astype(dtype)
    additive[~rows] = 0.0
    return additive[None, None], rows.astype(dtype)[None, None, :, None]


def _read_meta(folder: Path) -> dict:
    path = folder / MLLAMA_META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise XpackError(f"{folder} has no {MLLAMA_META_FILE}; pass a folder written by the mllama ONNX export") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise XpackError(f"{path} is unreadable ({exc}); re-export the model") from None
    if meta.get("format") != MLLAMA_FORMAT:
        raise XpackError(f"{path} is not an mllama ONNX export (format {meta.get('format')!r}); re-export the model")
    return meta


class MllamaOnnx:
    """The three mllama graphs of ``folder`` in onnxruntime sessions (CPU unless ``providers`` says otherwise)."""

    def __init__(self, folder: "str | os.PathLike", *, providers: Sequence | None = None, threads: int | None = None, prepack: bool = True,
                 cast_per_node: bool = False):
        """``prepack=False``: the weights stay in the mapped data files; ``cast_per_node``: an fp16 graph's weights are cast
        to float32 as their nodes run, not all at load (onnx_base.session_options); both for a one-off check."""
        try:
            import numpy as np

            options = session_options(threads, prepack=prepack, cast_per_node=cast_per_node)  # the first import of onnxruntime
        except ImportError as exc:
            raise XpackError(f"the mllama ONNX runtime needs onnxruntime and numpy ({exc}); install them with `pip install 'xpack[onnx]'`") from None
        self._np = np
        self.folder = Path(folder)
        meta = _read_meta(self.folder)
        self.meta = meta
        providers = list(providers or ["CPUExecutionProvider"])
        self.sessions = {}
        for graph in GRAPHS:
            path = self.folder / meta["files"][graph]
            if not path.is_file():
                raise XpackError(f"{path} is missing; re-export the model")
            self.sessions[graph] = open_session(path, options, providers)
        self.self_layers = [int(i) for i in meta["self_attention_layers"]]
        self.cross_layers = [int(i) for i in meta["cross_attention_layers"]]
        self.kv_heads = int(meta["num_key_value_heads"])
        self.head_dim = int(meta["head_dim"])
        self.image_token_id = int(meta["image_token_id"])
        self.max_tiles = int(meta["max_num_tiles"])
        self.tokens_per_tile = int(meta["tokens_per_tile"])
        self.stop_ids = {int(i) for i in meta.get("eos_token_ids", [])}
        decoder_inputs = {i.name: i for i in self.sessions["decoder"].get_inputs()}
        first_past = f"past_key_values.{self.self_layers[0]}.key"
        self.kv_dtype = np.dtype(_NP_TYPES.get(decoder_inputs[first_past].type, "float32"))
        self.mask_dtype = np.dtype(_NP_TYPES.get(decoder_inputs["cross_attention_mask"].type, "float32"))

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    # -- image -------------------------------------------------------------------------------------

    def encode_image(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> ImageState:
        """Preprocessed image arrays (as ``MllamaImageProcessor`` returns them, batch 1, one image) -> :class:`ImageState`."""
        np = self._np
        vision = self.sessions["vision"]
        shape = vision.get_inputs()[0].shape  # [batch, 1, tiles, C, H, W]
        tile_shape = tuple(int(d) for d in shape[2:])
        pixels = np.asarray(pixel_values, dtype=np.float32)
        if pixels.size != int(np.prod(tile_shape)):
            raise XpackError(f"pixel_values of shape {tuple(pixels.shape)} do not hold one image of {tile_shape[0]} tiles of {tile_shape[1:]}; preprocess it as MllamaImageProcessor does")
        pixels = pixels.reshape((1, 1) + tile_shape)
        ratio_ids = np.asarray(aspect_ratio_ids, dtype=np.int64).reshape(1, 1)
        ratio_mask = np.asarray(aspect_ratio_mask, dtype=np.int64).reshape(1, 1, self.max_tiles)
        num_tiles = int(ratio_mask.sum())
        if not 1 <= num_tiles <= self.max_tiles or int(ratio_ids[0, 0]) < 1:
            raise XpackError(f"aspect_ratio_mask {ratio_mask.reshape(-1).tolist()} / aspect_ratio_ids {ratio_ids.reshape(-1).tolist()} describe no image")
        (states,) = vision.run(None, {"pixel_values": pixels, "aspect_ratio_ids": ratio_ids, "aspect_ratio_mask": ratio_mask})
        cross = self.sessions["cross_kv"]
        values = cross.run(None, {"cross_attention_states": states})
        kv = {o.name: v for o, v in zip(cross.get_outputs(), values)}
        return ImageState(cross_kv=kv, num_tiles=num_tiles, max_tiles=self.max_tiles, tokens_per_tile=self.tokens_per_tile, cross_attention_states=states)

    def no_image(self) -> dict:
        """The cross keys/values of no image: one all-zero vision token, which makes every cross-attention layer the identity."""
        zero = self._np.zeros((1, self.kv_heads, 1, self.head_dim), dtype=self.kv_dtype)
        return {f"cross_key_values.{i}.{kv}": zero for i in self.cross_layers for kv in ("key", "value")}

    def masks(self, token_ids: Sequence[int], image_state: ImageState | None):
        """The decoder's (cross_attention_mask, full_text_row_masked_out_mask) for a prompt of ``token_ids``."""
        np = self._np
        if image_state is None:
            seq = len(token_ids)
            return np.zeros((1, 1, seq, 1), self.mask_dtype), np.zeros((1, 1, seq, 1), self.mask_dtype)
        return cross_attention_masks(
            token_ids, self.image_token_id, image_state.num_tiles, image_state.max_tiles, image_state.tokens_per_tile, self.mask_dtype
        )

    # -- decoder -----------------------------------------------------------------------------------

    def run(self, ids, past: dict, cross_kv: dict, cross_mask, row_mask, start: int):
        """``decoder.onnx`` on ``ids`` after ``start`` cached positions: (logits [S, vocab], the cache to pass next)."""
        np = self._np
        seq = len(ids)
        feed = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, start + seq), dtype=np.int64),
            "position_ids": np.arange(start, start + seq, dtype=np.int64)[None],
            "cross_attention_mask": cross_mask,
            "full_text_row_masked_out_mask": row_mask,
        }
        feed.update(past)
        feed.update(cross_kv)
        session = self.sessions["decoder"]
        outputs = session.run(None, feed)
        names = [o.name for o in session.get_outputs()]
        logits = outputs[names.index("logits")]
        present = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(names, outputs) if n.startswith("present.")}
        return logits[0], present

    def empty_past(self) -> dict:
        empty = self._np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        return {f"past_key_values.{i}.{kv}": empty for i in self.self_layers for kv in ("key", "value")}

    def _check_ids(self, token_ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise XpackError("the prompt is empty; pass at least one token")
        return ids

    def logits(self, token_ids: Sequence[int], image_state: ImageState | None = None):
        """Teacher-forced logits [S, vocab] (float32) of ``token_ids`` (one prefill), with the image if given."""
        ids = self._check_ids(token_ids)
        cross_mask, row_mask = self.masks(ids, image_state)
        cross_kv = image_state.cross_kv if image_state is not None else self.no_image()
        logits, _ = self.run(ids, self.empty_past(), cross_kv, cross_mask, row_mask, 0)
        return logits.astype(self._np.float32)

    def generate_greedy(self, token_ids: Sequence[int], image_state: ImageState | None = None, max_tokens: int = 16, stop_ids=None) -> list[int]:
        """Greedy continuation of ``token_ids`` with the KV cache: at most ``max_tokens`` new ids.

        Stops after emitting an id of ``stop_ids`` (default: the export's ``eos_token_ids``), which is
        kept in the result, as ``transformers``' ``generate`` keeps it.
        """
        np = self._np
        ids = self._check_ids(token_ids)
        stops = self.stop_ids if stop_ids is None else {int(i) for i in stop_ids}
        cross_mask, row_mask = self.masks(ids, image_state)
        cross_kv = image_state.cross_kv if image_state is not None else self.no_image()
        logits, past = self.run(ids, self.empty_past(), cross_kv, cross_mask, row_mask, 0)
        step_cross, step_row = cross_mask[:, :, -1:], row_mask[:, :, -1:]
        out: list[int] = []
        position = len(ids)
        while len(out) < max_tokens:
            token = int(np.argmax(logits[-1]))
            out.append(token)
            if token in stops or len(out) >= max_tokens:
                break
            logits, past = self.run([token], past, cross_kv, step_cross, step_row, position)
            position += 1
        return out


class MllamaOnnxRuntime(OnnxRuntimeBase):
    """A Llama 3.2 Vision ONNX folder (``mllama_onnx.json`` + three graphs) behind the Runtime interface."""

    takes_position_ids = True
    takes_embeds = False

    def _load_graphs(self, folder: Path) -> None:
        self.graphs = MllamaOnnx(folder, providers=self._providers, threads=self._threads)
        self.session = self.graphs.sessions["decoder"]
        self._n_vocab = self.graphs.vocab_size
        self.kv_layout = {"layers": len(self.graphs.self_layers), "cross_layers": len(self.graphs.cross_layers),
                          "heads": self.graphs.kv_heads, "head_dim": self.graphs.head_dim, "dtype": str(self.graphs.kv_dtype)}
        self.accepts_images = (folder / PREPROCESSOR_CONFIG).is_file()
        if self.accepts_images:
            self.preprocess = MllamaImagePreprocessor.from_folder(folder)

    def close(self) -> None:
        super().close()
        self.graphs = None

    def logits(self, token_ids: Sequence[int]):
        """Teacher-forced logits: one pass over ``token_ids`` without an image, float32 [n, vocab]."""
        ids = self._logits_ids(token_ids)
        return self._np.ascontiguousarray(self.graphs.logits(ids), dtype=self._np.float32)

    def _encode(self, picture) -> tuple[ImageState, float]:
        """The image's tiles through the vision and cross-attention K/V graphs, once; and the seconds that took."""
        arrays = self.preprocess(picture)
        start = time.perf_counter()
        state = self.graphs.encode_image(arrays["pixel_values"], arrays["aspect_ratio_ids"], arrays["aspect_ratio_mask"])
        return state, time.perf_counter() - start

    def logits_with_image(self, prompt, image, continuation_ids: Sequence[int] | None = None):
        """Teacher-forced logits of the text after the (last) ``<|image|>`` token, as the other runtimes' method.

        Returns ``(logits, token_ids)``: float32 [n, vocab] and the text token ids after the image."""
        picture, extra = self._image_inputs(image, continuation_ids)
        ids = self.tokenize(self.prompt_text(prompt, image=picture)) + extra
        state, _ = self._encode(picture)
        where = [i for i, t in enumerate(ids) if t == self.graphs.image_token_id]
        if not where:
            raise XpackError("the chat template put no <|image|> token in the prompt; it cannot take image parts")
        start = where[-1] + 1
        return self._np.ascontiguousarray(self.graphs.logits(ids, state)[start:], dtype=self._np.float32), ids[start:]

    def _prompt(self, text: str, image) -> Prompt:
        ids = self.tokenize(text)
        if image is None:
            return Prompt(ids, None, None)
        state, encode_s = self._encode(image)
        return Prompt(ids, encode_s, state)

    def _stepper(self, ids: list[int], limit: int, state: ImageState | None):
        np, graphs = self._np, self.graphs
        cross_mask, row_mask = graphs.masks(ids, state)
        cross_kv = state.cross_kv if state is not None else graphs.no_image()
        logits, past = graphs.run(ids, graphs.empty_past(), cross_kv, cross_mask, row_mask, 0)
        last_cross, last_row = cross_mask[:, :, -1:], row_mask[:, :, -1:]  # generated tokens reuse the last prompt row
        cache = [past]

        def step(token: int, cursor: int):
            out, cache[0] = graphs.run([token], cache[0], cross_kv, last_cross, last_row, cursor)
            return out[-1].astype(np.float32, copy=True)

        return logits[-1].astype(np.float32, copy=True), step
