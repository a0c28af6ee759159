"""The server's settings and limits: one frozen dataclass, filled from `xpack serve`'s flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xpack.runtimes.messages import MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class ServeConfig:
    """What `xpack serve` was told. Defaults are the safe ones: loopback only, a bounded queue."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # every route but /health needs `Authorization: Bearer <api_key>` when set
    max_concurrency: int | None = None  # generations at once (None: the runtime's default, engine.DEFAULT_CONCURRENCY)
    max_queue: int = 16  # requests waiting for a slot; past that, 429 with Retry-After
    media_dir: Path | None = None  # image parts may name files under this folder (and nowhere else)
    model_name: str = "xpack"  # the id /v1/models lists and requests may name
    max_body_bytes: int = 20 * 2**20  # a request body above this is refused with 413 before it is parsed
    max_image_bytes: int = 10 * 2**20  # one image, encoded
    max_image_pixels: int = MAX_IMAGE_PIXELS  # read from the image's header: a decompression bomb is refused, not decoded
    max_tokens_limit: int | None = None  # the most max_tokens a request may ask for (None: the profile's context)
    shutdown_timeout_s: float = 30.0  # on SIGTERM: in-flight requests get this long to finish, then they are cancelled
    retry_after_s: int = 1  # the Retry-After of a 429
    prompt_cache: bool = True  # reuse the KV of the previous prompt's common prefix where the runtime can (Runtime.prompt_cache)
