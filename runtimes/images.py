"""Images for Gemma 3 / MedGemma without torch or transformers: the file, the pixels, the prompt.

An edge box runs the vision graph (``vision.onnx``, written by ``packager/export/onnx/gemma3_vision.py``) with
onnxruntime; what goes into it and around it is prepared here, with numpy and Pillow only:

- ``load_image(path)``: an image file as an RGB ``PIL.Image``; a missing, unreadable or non-image
  file is a one-line ``XpackError`` (the helper lives in ``runtimes/messages.py``).
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

Llama 3.2 Vision (Mllama) has its own preprocessor here too:

- ``MllamaImagePreprocessor``: transformers' ``MllamaImageProcessor`` (4.57.6; it has no fast variant)
  driven by the checkpoint's ``preprocessor_config.json``. Each image is converted to RGB the way
  transformers does (RGBA composited on a white background), a tiled canvas of up to
  ``max_image_tiles`` tiles of ``size`` x ``size`` is chosen (``get_optimal_tiled_canvas``), the image is
  resized keeping its aspect ratio with PIL and ``resample`` (``get_image_size_fit_to_canvas``), padded
  with black to the canvas (bottom/right), rescaled (float64, then float32) and normalized (float32),
  split into tiles and padded with zero tiles to ``max_image_tiles``. A call gives, for one image and a
  batch of 1, exactly what the processor gives: ``pixel_values`` float32 ``[1, 1, max_tiles, 3, size,
  size]``, ``aspect_ratio_ids`` int64 ``[1, 1]`` (1 + the index of ``(tiles_high, tiles_wide)`` in
  ``mllama_supported_aspect_ratios(max_tiles)``), ``aspect_ratio_mask`` int64 ``[1, 1, max_tiles]``, plus
  ``num_tiles`` (an int; the processor's ``[[n]]``).

    pre = MllamaImagePreprocessor.from_folder(folder)
    inputs = pre(load_image("photo.jpg"))  # {"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "num_tiles"}
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xpack.errors import XpackError
from xpack.runtimes.artifacts import PREPROCESSOR_CONFIG, PROCESSOR_CONFIG, read_json
from xpack.runtimes.messages import load_image

__all__ = [
    "load_image",
    "Gemma3ImagePreprocessor",
    "ImageTokens",
    "gemma3_image_tokens",
    "MllamaImagePreprocessor",
    "mllama_supported_aspect_ratios",
]

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


def _preprocessor_config(folder: "str | os.PathLike") -> tuple[dict, Path]:
    """The contents and path of ``folder/preprocessor_config.json``; one clear line when it is missing."""
    path = Path(folder) / PREPROCESSOR_CONFIG
    if not path.is_file():
        raise XpackError(f"{folder} has no {PREPROCESSOR_CONFIG}; copy it from the Hugging Face checkpoint to preprocess images")
    return read_json(path), path


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
        return cls.from_config(*_preprocessor_config(folder))

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


# --------------------------------------------------------------------------------------------------
# Llama 3.2 Vision (Mllama): tiles
# --------------------------------------------------------------------------------------------------

_MLLAMA_PROCESSORS = ("MllamaImageProcessor",)  # transformers 4.57.6 has no MllamaImageProcessorFast


def mllama_supported_aspect_ratios(max_image_tiles: int) -> list[tuple[int, int]]:
    """transformers' ``get_all_supported_aspect_ratios``: every ``(a, b)`` with ``a * b <= max_image_tiles``, a-major.

    ``aspect_ratio_ids`` are 1 + the index of ``(tiles_high, tiles_wide)`` in this list (0 pads a batch).
    """
    return [(a, b) for a in range(1, max_image_tiles + 1) for b in range(1, max_image_tiles + 1) if a * b <= max_image_tiles]


def _mllama_optimal_canvas(image_height: int, image_width: int, max_image_tiles: int, tile_size: int) -> tuple[int, int]:
    """transformers' ``get_optimal_tiled_canvas``, the same numpy operations in the same order: (height, width)."""
    import numpy as np

    canvases = np.array(mllama_supported_aspect_ratios(max_image_tiles)) * tile_size
    target_heights, target_widths = canvases.T  # the first of each pair is taken as the height, as transformers does
    scale_h = target_heights / image_height
    scale_w = target_widths / image_width
    scales = np.where(scale_w > scale_h, scale_h, scale_w)  # the limiting side: no distortion
    upscaling = scales[scales >= 1]
    selected = np.min(upscaling) if len(upscaling) > 0 else np.max(scales[scales < 1])
    chosen = canvases[scales == selected]
    if len(chosen) > 1:  # the same scale fits several canvases: the least area (least padding), first on a tie
        best = chosen[np.argmin(chosen[:, 0] * chosen[:, 1])]
    else:
        best = chosen[0]
    return int(best[0]), int(best[1])


def _mllama_fit_to_canvas(image_height: int, image_width: int, canvas_height: int, canvas_width: int, tile_size: int) -> tuple[int, int]:
    """transformers' ``get_image_size_fit_to_canvas`` (numpy clip and float64 scales, floor, at least 1): (height, width)."""
    import math

    import numpy as np

    target_width = np.clip(image_width, tile_size, np.int64(canvas_width))
    target_height = np.clip(image_height, tile_size, np.int64(canvas_height))
    scale_h = target_height / image_height
    scale_w = target_width / image_width
    if scale_w < scale_h:
        new_width = target_width
        new_height = min(math.floor(image_height * scale_w) or 1, target_height)
    else:
        new_height = target_height
        new_width = min(math.floor(image_width * scale_h) or 1, target_width)
    return int(new_height), int(new_width)


def _mllama_convert_to_rgb(image):
    """transformers' mllama ``convert_to_rgb``: RGB as is; anything else via RGBA composited over white."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _flag(config: dict, key: str, default: bool, path: Path) -> bool:
    value = config.get(key, default)
    if value is None:  # transformers falls back to None, which its ``if``s read as false
        return False
    if not isinstance(value, (bool, int)):
        raise XpackError(f"{path}: {key} must be true or false, got {value!r}")
    return bool(value)


@dataclass(frozen=True)
class MllamaImagePreprocessor:
    """transformers' MllamaImageProcessor (Llama 3.2 Vision) in numpy + Pillow; see the module docstring."""

    tile_size: int  # size["height"] == size["width"]
    max_image_tiles: int = 4
    resample: int = 2  # PIL filter: 2 = BILINEAR
    do_convert_rgb: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = _IMAGENET_STANDARD  # transformers' default; real checkpoints store CLIP's
    image_std: tuple[float, float, float] = _IMAGENET_STANDARD

    @classmethod
    def from_config(cls, config: dict, source: "str | os.PathLike" = PREPROCESSOR_CONFIG) -> "MllamaImagePreprocessor":
        """From the contents of a ``preprocessor_config.json`` (``source`` names it in error messages).

        Missing keys take MllamaImageProcessor's defaults; keys it does not read are ignored, as it ignores them.
        """
        path = Path(source)
        if not isinstance(config, dict):
            raise XpackError(f"{path} must hold a JSON object, got {type(config).__name__}")
        kind = config.get("image_processor_type")
        if kind is not None and kind not in _MLLAMA_PROCESSORS:
            raise XpackError(f"{path} is for a {kind}, not Llama 3.2 Vision's image processor ({' / '.join(_MLLAMA_PROCESSORS)})")
        if not _flag(config, "do_resize", True, path):
            raise XpackError(f"{path} turns off do_resize, which MllamaImageProcessor does not support; set it to true")
        if not _flag(config, "do_pad", True, path):
            raise XpackError(f"{path} turns off do_pad, which MllamaImageProcessor does not support; set it to true")
        size = config.get("size")
        if size is None:
            size = {"height": 224, "width": 224}  # MllamaImageProcessor's default
        if not (
            isinstance(size, dict)
            and all(isinstance(size.get(k), int) and not isinstance(size.get(k), bool) for k in ("height", "width"))
        ):
            raise XpackError(f"{path}: size must be {{\"height\": N, \"width\": N}} (the tile size), got {size!r}")
        if size["height"] != size["width"] or size["height"] <= 0:
            raise XpackError(f"{path}: size {size!r} must be a positive square tile (height == width)")
        tiles = config.get("max_image_tiles", 4)
        if not isinstance(tiles, int) or isinstance(tiles, bool) or tiles <= 0:
            raise XpackError(f"{path}: max_image_tiles must be a positive integer, got {tiles!r}")
        do_rescale = _flag(config, "do_rescale", True, path)
        factor = config.get("rescale_factor", 1 / 255)
        if do_rescale and (not isinstance(factor, (int, float)) or isinstance(factor, bool)):
            raise XpackError(f"{path}: rescale_factor must be a number, got {factor!r}")
        mean = config.get("image_mean")
        std = config.get("image_std")
        mean = _triple(_IMAGENET_STANDARD if mean is None else mean, "image_mean", path)
        std = _triple(_IMAGENET_STANDARD if std is None else std, "image_std", path)
        do_normalize = _flag(config, "do_normalize", True, path)
        if do_normalize and any(s == 0 for s in std):
            raise XpackError(f"{path}: image_std {list(std)} has a zero")
        return cls(
            tile_size=int(size["height"]),
            max_image_tiles=int(tiles),
            resample=_resample(config.get("resample", 2), path),
            do_convert_rgb=_flag(config, "do_convert_rgb", True, path),
            do_rescale=do_rescale,
            rescale_factor=float(factor) if do_rescale else 1 / 255,
            do_normalize=do_normalize,
            image_mean=mean,
            image_std=std,
        )

    @classmethod
    def from_folder(cls, folder: "str | os.PathLike") -> "MllamaImagePreprocessor":
        """From ``folder/preprocessor_config.json`` (a checkpoint or an exported artifact folder)."""
        return cls.from_config(*_preprocessor_config(folder))

    @property
    def supported_aspect_ratios(self) -> list[tuple[int, int]]:
        return mllama_supported_aspect_ratios(self.max_image_tiles)

    def tiling(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """For an image of ``height`` x ``width``: ((tiles_high, tiles_wide), (resized_height, resized_width))."""
        if height <= 0 or width <= 0:
            raise XpackError(f"the image is {width}x{height} pixels; it must have at least one pixel each way")
        canvas_height, canvas_width = _mllama_optimal_canvas(height, width, self.max_image_tiles, self.tile_size)
        resized = _mllama_fit_to_canvas(height, width, canvas_height, canvas_width, self.tile_size)
        return (canvas_height // self.tile_size, canvas_width // self.tile_size), resized

    def __call__(self, image) -> dict:
        """A ``PIL.Image`` or an image file path -> the processor's output for ``images=[[image]]``, as numpy.

        ``{"pixel_values": float32 [1, 1, max_tiles, 3, tile, tile], "aspect_ratio_ids": int64 [1, 1],
        "aspect_ratio_mask": int64 [1, 1, max_tiles], "num_tiles": int}``. A path is opened as
        transformers opens one (EXIF orientation applied, then RGB).
        """
        import numpy as np
        from PIL import Image

        if isinstance(image, (str, os.PathLike)):
            image = load_image(image, exif_transpose=True)  # as transformers opens a path
        if not isinstance(image, Image.Image):
            raise XpackError(f"expected a PIL image or an image file path, got {type(image).__name__}")
        if self.do_convert_rgb:
            try:
                image = _mllama_convert_to_rgb(image)
            except (ValueError, OSError) as exc:  # a mode Pillow cannot turn into RGBA
                raise XpackError(f"a {image.mode} image cannot be converted to RGB ({exc}); save it as an 8-bit RGB PNG or JPEG") from None
        pixels = np.array(image)  # transformers' to_numpy_array
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise XpackError(
                f"a {image.mode} image is not 8-bit RGB and {PREPROCESSOR_CONFIG} sets do_convert_rgb to false; "
                "convert it to RGB first"
            )
        height, width = pixels.shape[:2]
        (tiles_high, tiles_wide), (new_height, new_width) = self.tiling(height, width)
        tile = self.tile_size

        # transformers' resize: the uint8 array back to a PIL image (mode RGB), PIL resize, back to numpy
        resized = np.asarray(Image.fromarray(pixels).resize((new_width, new_height), resample=self.resample))
        # pad with 0 (black) at the bottom and right to the canvas
        canvas = np.zeros((tiles_high * tile, tiles_wide * tile, 3), dtype=np.uint8)
        canvas[:new_height, :new_width] = resized
        values: Any = canvas
        if self.do_rescale:
            values = (values.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(values.dtype, np.floating):
                values = values.astype(np.float32)
            mean = np.array(self.image_mean, dtype=values.dtype)
            std = np.array(self.image_std, dtype=values.dtype)
            values = (values - mean) / std
        # split_to_tiles: channels first, then tiles in row-major order
        chw = values.transpose(2, 0, 1)
        tiles = chw.reshape(3, tiles_high, tile, tiles_wide, tile).transpose(1, 3, 0, 2, 4).reshape(tiles_high * tiles_wide, 3, tile, tile)
        num_tiles = tiles_high * tiles_wide

        pixel_values = np.zeros((1, 1, self.max_image_tiles, 3, tile, tile), dtype=np.float32)
        pixel_values[0, 0, :num_tiles] = tiles
        aspect_ratio_ids = np.array([[self.supported_aspect_ratios.index((tiles_high, tiles_wide)) + 1]], dtype=np.int64)
        aspect_ratio_mask = np.zeros((1, 1, self.max_image_tiles), dtype=np.int64)
        aspect_ratio_mask[:, :, 0] = 1
        aspect_ratio_mask[0, 0, :num_tiles] = 1
        return {
            "pixel_values": pixel_values,
            "aspect_ratio_ids": aspect_ratio_ids,
            "aspect_ratio_mask": aspect_ratio_mask,
            "num_tiles": num_tiles,
        }
