"""An OpenAI ``image_url`` part as a decoded RGB image, within the server's limits.

A ``data:image/...;base64,`` URI is decoded in memory; a file is read only from under ``--media-dir`` (a name or a
``file://`` URL inside it; symlinks resolved first, so nothing outside is reachable). The pixel count is read from
the header before anything is decoded: a decompression bomb is a 413, not a gigabyte of pixels. Remote URLs are
refused: the server is for offline machines and fetches nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import warnings
from pathlib import Path

from xpack.runtimes.serve.config import ServeConfig
from xpack.runtimes.serve.requests import ApiError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def decode_image_url(url: str, config: ServeConfig):
    """The image that ``url`` names, as an RGB ``PIL.Image``; an ApiError (400/413) says why not."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, "image_url.url must be a non-empty string", param="messages")
    if url.startswith("data:"):
        data = _data_uri(url, config)
        where = "the data: URI"
    elif url.startswith(("http://", "https://")):
        raise ApiError(400, "this server fetches nothing from the network: send the image as a data: URI, or as a file under --media-dir",
                       param="messages")
    else:
        path = _media_file(url, config)
        if path.stat().st_size > config.max_image_bytes:
            raise ApiError(413, f"the image file is larger than {config.max_image_bytes} bytes", code="image_too_large")
        data = path.read_bytes()
        where = path.name
    return _decode(data, where, config)


def _data_uri(url: str, config: ServeConfig) -> bytes:
    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ApiError(400, "an image data: URI must look like data:image/png;base64,...", param="messages")
    if len(payload) * 3 // 4 > config.max_image_bytes:
        raise ApiError(413, f"the image is larger than {config.max_image_bytes} bytes", code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image data: URI is not valid base64", param="messages") from None


def _media_file(url: str, config: ServeConfig) -> Path:
    if config.media_dir is None:
        raise ApiError(400, "image files are off: start the server with --media-dir DIR, or send the image as a data: URI", param="messages")
    name = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    root = config.media_dir.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ApiError(400, "an image file must be under the server's --media-dir", param="messages")
    if not path.is_file():
        raise ApiError(400, f"no image file {name!r} under --media-dir", param="messages")
    return path


def _decode(data: bytes, where: str, config: ServeConfig):
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as probe:  # the header only: nothing is decoded yet
                width, height = probe.size
                if width * height > config.max_image_pixels:
                    raise ApiError(413, f"the image is {width} x {height}, more than the {config.max_image_pixels} pixels this server decodes",
                                   code="image_too_large")
                probe.verify()
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                return image.convert("RGB")
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, f"the image has more pixels than this server decodes ({config.max_image_pixels})", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ApiError(400, f"{where} is not a readable image ({type(exc).__name__}); send a PNG or JPEG", param="messages") from None
