"""Read a GGUF file's header (metadata and tensor infos) without reading its tensors.

gguf-py's GGUFReader maps and parses the whole file into numpy views, which takes seconds for a
vocabulary of 50k+ tokens; a manifest's tensor type counts and an mmproj's projector type need only
the header. Kept in runtimes/ (no gguf-py needed on an edge box); the packager uses it too.
"""

from __future__ import annotations

import os
import struct

# GGUF metadata value types -> struct formats (gguf.GGUFValueType); 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_metadata(path: "str | os.PathLike") -> dict:
    """The key/value header of a GGUF file: what llama-cpp-python does not expose for an mmproj
    (projector type, image size). Raises ValueError for a file that is not GGUF."""
    return read_gguf_header(path, tensors=False)[0]


def read_gguf_header(path: "str | os.PathLike", tensors: bool = True) -> tuple[dict, list[tuple[str, tuple[int, ...], int]]]:
    """(metadata, [(tensor name, dims with ne0 first, ggml type id)]). Raises ValueError for a file that is not GGUF."""

    with open(path, "rb") as f:

        def read(n: int) -> bytes:
            data = f.read(n)
            if len(data) != n:
                raise ValueError("the file ends inside its header")
            return data

        def unpack(fmt: str):
            return struct.unpack(fmt, read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return read(unpack("<Q")).decode("utf-8", errors="replace")

        def value(kind: int):
            if kind == 8:
                return string()
            if kind == 9:
                inner, count = unpack("<I"), unpack("<Q")
                return [value(inner) for _ in range(count)]
            if kind not in _GGUF_SCALARS:
                raise ValueError(f"unknown metadata value type {kind}")
            return unpack(_GGUF_SCALARS[kind])

        if read(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        version = unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors = unpack("<Q")
        n_kv = unpack("<Q")
        if n_kv > 1_000_000:
            raise ValueError(f"implausible metadata count {n_kv}")
        metadata = {}
        for _ in range(n_kv):
            key = string()
            metadata[key] = value(unpack("<I"))
        infos = []
        for _ in range(n_tensors if tensors else 0):
            name = string()
            dims = tuple(unpack("<Q") for _ in range(unpack("<I")))
            kind = unpack("<I")
            unpack("<Q")  # data offset
            infos.append((name, dims, kind))
        return metadata, infos
