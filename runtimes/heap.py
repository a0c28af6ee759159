"""glibc's heap policy for the two kinds of work xpack does in one process (a no-op off glibc).

- A streamed torch reference (torch_offload.py) allocates and frees each streamed layer's float32 weights at every
  forward. glibc raises its mmap threshold as large blocks are freed (up to 32 MB), so a Gemma 3 4B layer's attention
  matrices (10-21 MB) end up in the heap, whose freed space fragmented and was never returned: the heap grew by 3.9 GB
  over one verify. :func:`map_large_allocations` serves every block of 1 MB and more with its own mapping instead.
- The ONNX quantizer (packager/export/onnx/quantize.py) makes and drops a few MB of numpy temporaries per block of rows,
  hundreds of thousands of times for an 11B model. Served by mappings, each is zeroed page by page by the kernel: on
  a 4096 x 4096 weight 7.1 s (3.5 s of it in the kernel) against 2.1 s from a heap that keeps them
  (:func:`reusing_allocations`; plain glibc 4.3 s).

mallopt's settings are process-wide and the dynamic one glibc starts with cannot be restored, so the quantizer's
setting is undone to the streamed reference's when that was in force, and to glibc's largest dynamic threshold
(32 MB) otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
LARGE_BYTES = 1 << 20  # the streamed reference: every block from 1 MB up gets its own mapping
DYNAMIC_MAX_BYTES = 32 << 20  # glibc's own ceiling for its dynamic mmap threshold (64-bit)
REUSE_BYTES, REUSE_TRIM_BYTES = 256 << 20, 512 << 20  # the quantizer: blocks below 256 MB reused, the heap kept up to 512 MB free
_state = {"large": False}


def _mallopt(param: int, value: int) -> None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(param, value)
    except OSError:
        pass


def map_large_allocations() -> None:
    """Every allocation of 1 MB and more in its own mapping, returned to the OS when freed (the streamed reference)."""
    _mallopt(M_MMAP_THRESHOLD, LARGE_BYTES)
    _state["large"] = True


@contextlib.contextmanager
def reusing_allocations():
    """Within: blocks below 256 MB come from a heap that keeps freed space for the next ones (the quantizer's temporaries)."""
    _mallopt(M_TRIM_THRESHOLD, REUSE_TRIM_BYTES)
    _mallopt(M_MMAP_THRESHOLD, REUSE_BYTES)
    try:
        yield
    finally:
        _mallopt(M_MMAP_THRESHOLD, LARGE_BYTES if _state["large"] else DYNAMIC_MAX_BYTES)
        _mallopt(M_TRIM_THRESHOLD, 128 << 10)  # glibc's default
