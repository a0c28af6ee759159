"""Images for Gemma 3 / MedGemma without torch or transformers: the file, the pixels, the prompt.

An edge box runs the vision graph (``vision.onnx``, written by ``packager/onnx_vision.py``) with
onnxruntime; what goes into it and around it is prepared here, with numpy and Pillow only:

- ``load_image(path)``: an image file as an RGB ``PIL.Image``; a missing, unreadable or non-image
  file is a one-line ``XpackError`` (the helper lives in ``runtimes/base.py``; this module re-exports it).
- ``Gemma3ImagePreprocessor``: transformers' ``Gemma3ImageProcessor`` (the slow, PIL-based one, which
  is what ``AutoProcessor`` gives without torchvision) driven by the checkpoint's
  ``preprocessor_config.json``: RGB -> PIL resize to ``size`` with ``resample`` -> ``x * rescale_factor``
  (in float64, then float32, as transformers does) -> ``(x - image_mean) / image_std`` -> float32
  ``[1, 3, H, W]``. Pan-and-scan crops are not done: a config that turns them on is refused. The
  image is always converted to RGB (transformers does so only with ``do_convert_rgb``; without it a
  grey or RGBA picture would not give the 3 channels the tower takes).
- ``gemma3_image_tokens(folder)``: what ``Gemma3Processor`` puts in the prompt for each image. The chat
  template writes one ``boi_token`` (``<start_of_image>``) where the image goes; the processor replaces
  every one with ``full_image_sequence`` = ``"\\n\\n" + boi + image_token * image_seq_length + eoi +
  "\\n\\n"``, and the model swaps the ``image_seq_length`` image-token embeddings for the rows of the vision
  graph's ``image_features`` (``image_token_id`` says which ids).

    pre = Gemma3ImagePreprocessor.from_folder(folder)
    pixel_values = pre(load_image("scan.png"))            # float32 [1, 3, H, W]
    tokens = gemma3_image_tokens(folder)
    ids = tokenizer.encode(tokens.expand(rendered_chat_text), add_special_tokens=False).ids
    # image_features (vision.onnx) go where ids == tokens.image_token_id, in order
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xpack.errors import XpackError
from xpack.runtimes.base import load_image, read_json

__all__ = [
    "load_image",
    "Gemma3ImagePreprocessor",
    "ImageTokens",
    "gemma3_image_tokens",
    "PREPROCESSOR_CONFIG",
    "PROCESSOR_CONFIG",
]

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
_GEMMA3_PROCESSORS = ("Gemma3ImageProcessor", "Gemma3ImageProcessorFast")
# PIL's resampling filters by the integers Hugging Face configs store (PILImageResampling == PIL.Image.Resampling).
_RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
_IMAGENET_STANDARD = (0.5, 0.5, 0.5)  # transformers' Gemma3ImageProcessor defaults for mean and std


# --------------------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------------------


def _triple(value: Any, key: str, path: Path) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
        raise XpackError(f"{path}: {key} must be a number or a list of 3 numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def _resample(value: Any, path: Path) -> int:
    if isinstance(value, str) and value.upper() in _RESAMPLE_NAMES.values():
        return next(k for k, v in _RESAMPLE_NAMES.items() if v == value.upper())
    if isinstance(value, int) and not isinstance(value, bool) and value in _RESAMPLE_NAMES:
        return value
    raise XpackError(f"{path}: resample {value!r} is not a PIL filter (0-5: {', '.join(_RESAMPLE_NAMES.values())})")


@dataclass(frozen=True)
class Gemma3ImagePreprocessor:
    """transformers' Gemma3ImageProcessor (without pan-and-scan) in numpy + Pillow; see the module docstring."""

    size: tuple[int, int]  # (height, width) the image is resized to
    resample: int = 2  # PIL filter: 2 = BILINEAR
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = _IMAGENET_STANDARD
    image_std: tuple[float, float, float] = _IMAGENET_STANDARD

    @classmethod
    def from_config(cls, config: dict, source: "str | os.PathLike" = PREPROCESSOR_CONFIG) -> "Gemma3ImagePreprocessor":
        """From the contents of a ``preprocessor_config.json`` (``source`` names it in error messages)."""
        path = Path(source)
        kind = config.get("image_processor_type")
        if kind is not None and kind not in _GEMMA3_PROCESSORS:
            raise XpackError(f"{path} is for a {kind}, not Gemma 3's image processor ({' / '.join(_GEMMA3_PROCESSORS)})")
        if config.get("do_pan_and_scan"):
            raise XpackError(f"{path} turns on do_pan_and_scan, which xpack's image preprocessing does not do; set it to false")
        size = config.get("size")
        if not (isinstance(size, dict) and isinstance(size.get("height"), int) and isinstance(size.get("width"), int)):
            raise XpackError(f"{path}: size must be {{\"height\": H, \"width\": W}}, got {size!r}")
        if size["height"] <= 0 or size["width"] <= 0:
            raise XpackError(f"{path}: size {size!r} must be positive")
        factor = config.get("rescale_factor", 1 / 255)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool):
            raise XpackError(f"{path}: rescale_factor must be a number, got {factor!r}")
        std = _triple(config.get("image_std", _IMAGENET_STANDARD), "image_std", path)
        if any(s == 0 for s in std):
            raise XpackError(f"{path}: image_std {list(std)} has a zero")
        return cls(
            size=(int(size["height"]), int(size["width"])),
            resample=_resample(config.get("resample", 2), path),
            do_resize=bool(config.get("do_resize", True)),
            do_rescale=bool(config.get("do_rescale", True)),
            rescale_factor=float(factor),
            do_normalize=bool(config.get("do_normalize", True)),
            image_mean=_triple(config.get("image_mean", _IMAGENET_STANDARD), "image_mean", path),
            image_std=std,
        )

    @classmethod
    def from_folder(cls, folder: "str | os.PathLike") -> "Gemma3ImagePreprocessor":
        """From ``folder/preprocessor_config.json`` (a checkpoint or an exported artifact folder)."""
        path = Path(folder) / PREPROCESSOR_CONFIG
        if not path.is_file():
            raise XpackError(f"{folder} has no {PREPROCESSOR_CONFIG}; copy it from the Hugging Face checkpoint to preprocess images")
        return cls.from_config(read_json(path), path)

    def __call__(self, image) -> "Any":
        """An RGB-convertible ``PIL.Image`` or an image file path -> float32 numpy array [1, 3, H, W]."""
        import numpy as np

        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        if not hasattr(image, "convert") or not hasattr(image, "resize"):
            raise XpackError(f"expected a PIL image or an image file path, got {type(image).__name__}")
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.do_resize:
            height, width = self.size
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)  # uint8 [H, W, 3]
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        pixels = pixels.astype(np.float32, copy=False)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None], dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# prompt
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTokens:
    """What Gemma3Processor writes into the prompt for each image, and which token ids take the image features."""

    boi_token: str  # the placeholder the chat template writes, "<start_of_image>"
    eoi_token: str  # "<end_of_image>"
    image_token: str  # "<image_soft_token>"
    image_token_id: int
    image_seq_length: int  # image tokens per image == the vision graph's mm_tokens_per_image

    @property
    def placeholder(self) -> str:
        return self.boi_token

    @property
    def full_image_sequence(self) -> str:
        """The text each placeholder becomes (Gemma3Processor.full_image_sequence)."""
        return f"\n\n{self.boi_token}{self.image_token * self.image_seq_length}{self.eoi_token}\n\n"

    def count(self, text: str) -> int:
        return text.count(self.boi_token)

    def expand(self, text: str, num_images: int | None = None) -> str:
        """Replace every placeholder in rendered chat text by the full image sequence, as the processor does.

        With ``num_images``, the text must hold exactly that many placeholders.
        """
        found = self.count(text)
        if num_images is not None and found != num_images:
            raise XpackError(
                f"the prompt has {found} image placeholder(s) ({self.boi_token}) for {num_images} image(s); "
                "the chat template must write one per image part"
            )
        return text.replace(self.boi_token, self.full_image_sequence)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken as tokenizer_config.json may store it
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _added_tokens(folder: Path) -> dict[str, int]:
    """content -> id of tokenizer.json's added tokens ({} without tokenizer.json)."""
    data = read_json(folder / "tokenizer.json")
    return {t["content"]: int(t["id"]) for t in data.get("added_tokens") or [] if isinstance(t, dict) and "content" in t and "id" in t}


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def gemma3_image_tokens(folder: "str | os.PathLike") -> ImageTokens:
    """The image part of the prompt for a Gemma 3 checkpoint or artifact folder.

    Token texts come from ``tokenizer_config.json`` (``boi_token`` / ``eoi_token`` / ``image_token``, at
    the top or under ``extra_special_tokens``), else from ``config.json``'s ``*_token_index`` looked up in
    ``tokenizer.json``; the image token id from ``config.json`` (``image_token_index``, or
    ``image_token_id``), checked against ``tokenizer.json``; ``image_seq_length`` from
    ``processor_config.json`` (else ``preprocessor_config.json``, else ``config.json``'s
    ``mm_tokens_per_image``), checked against ``mm_tokens_per_image``.
    """
    folder = Path(folder)
    config = read_json(folder / "config.json")
    if not config:
        raise XpackError(f"{folder} has no config.json; pass the checkpoint or artifact folder of a Gemma 3 vision model")
    tok_config = read_json(folder / "tokenizer_config.json")
    extra = tok_config.get("extra_special_tokens") if isinstance(tok_config.get("extra_special_tokens"), dict) else {}
    added = _added_tokens(folder)
    by_id = {i: t for t, i in added.items()}

    texts: dict[str, str] = {}
    for name, index_key in (("boi_token", "boi_token_index"), ("eoi_token", "eoi_token_index"), ("image_token", "image_token_index")):
        text = _token_text(tok_config.get(name)) or _token_text(extra.get(name))
        if text is None:
            index = _int(config.get(index_key))
            if index is None and name == "image_token":
                index = _int(config.get("image_token_id"))
            text = by_id.get(index) if index is not None else None
        if text is None:
            raise XpackError(f"{folder} does not say what its {name} is (tokenizer_config.json {name}, or config.json {index_key} + tokenizer.json)")
        texts[name] = text

    image_token_id = _int(config.get("image_token_index"))
    if image_token_id is None:
        image_token_id = _int(config.get("image_token_id"))
    if image_token_id is None:
        image_token_id = added.get(texts["image_token"])
    if image_token_id is None:
        raise XpackError(f"{folder}/config.json has no image_token_index (or image_token_id); it is not a Gemma 3 vision checkpoint")
    if texts["image_token"] in added and added[texts["image_token"]] != image_token_id:
        raise XpackError(
            f"{folder}: config.json says the image token id is {image_token_id}, but tokenizer.json gives "
            f"{texts['image_token']} the id {added[texts['image_token']]}; the tokenizer does not belong to this model"
        )

    mm_tokens = _int(config.get("mm_tokens_per_image"))
    seq_length = _int(read_json(folder / PROCESSOR_CONFIG).get("image_seq_length"))
    if seq_length is None:
        seq_length = _int(read_json(folder / PREPROCESSOR_CONFIG).get("image_seq_length"))
    if seq_length is None:
        seq_length = mm_tokens
    if seq_length is None or seq_length <= 0:
        raise XpackError(f"{folder} gives no image_seq_length (processor_config.json) nor mm_tokens_per_image (config.json)")
    if mm_tokens is not None and seq_length != mm_tokens:
        raise XpackError(
            f"{folder}: processor_config.json image_seq_length {seq_length} differs from config.json mm_tokens_per_image "
            f"{mm_tokens}, the number of features the vision tower gives per image"
        )
    return ImageTokens(
        boi_token=texts["boi_token"],
        eoi_token=texts["eoi_token"],
        image_token=texts["image_token"],
        image_token_id=image_token_id,
        image_seq_length=seq_length,
    )
