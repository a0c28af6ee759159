"""Chat messages (Hugging Face's content-parts form) and image files as the runtimes take them."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Sequence

from xpack.errors import XpackError


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


# the largest image xpack decodes (issue #14: a 12000 x 12000 PNG took 1.1 GB with Pillow's warning, 20000 x 20000 a
# traceback): 64 million pixels, e.g. 8000 x 8000, 192 MB as RGB; above it, one line before any decoding
MAX_IMAGE_PIXELS = 64_000_000


def check_image(path: "str | os.PathLike") -> tuple[int, int]:
    """An image file's (width, height), read from its header: one clear line when it is missing, unreadable or
    larger than MAX_IMAGE_PIXELS. Nothing is decoded, so `xpack run` says it before loading a model."""
    with _image_errors(Path(path)) as Image:
        with Image.open(path) as probe:
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise XpackError(f"{_too_large(Path(path))} ({width} x {height})")
            probe.verify()
    return width, height


def load_image(path: "str | os.PathLike", exif_transpose: bool = False):
    """Open an image file as an RGB ``PIL.Image`` after :func:`check_image`.
    ``exif_transpose``: apply the EXIF orientation first, as transformers' ``load_image`` does for a path."""
    check_image(path)
    with _image_errors(Path(path)) as Image:
        with Image.open(path) as img:
            if exif_transpose:
                from PIL import ImageOps

                return ImageOps.exif_transpose(img).convert("RGB")
            return img.convert("RGB")


def _too_large(path: Path) -> str:
    return (f"image {path} has more than {MAX_IMAGE_PIXELS / 1e6:.0f} million pixels, the most xpack decodes (the models "
            "see 896 x 896 or 560 x 560 tiles); downscale it first")


@contextlib.contextmanager
def _image_errors(path: Path):
    """Pillow, with its errors (and its decompression-bomb warning) turned into one line about ``path``."""
    import warnings

    if not path.is_file():
        raise XpackError(f"image {path} does not exist or is not a file")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise XpackError("reading --image needs Pillow, which is not installed: pip install 'xpack[onnx]'") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's own warning becomes our one line
            yield Image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise XpackError(_too_large(path)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise XpackError(f"{path} is not a readable image ({type(exc).__name__}); pass a PNG or JPEG file") from None


