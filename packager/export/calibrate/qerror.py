"""What llama.cpp's quantizer does to one weight matrix, without writing a GGUF.

Choosing a type per tensor under a size or KL budget needs the error each candidate type makes on each
tensor; quantizing a whole GGUF per candidate would take minutes a trial. libggml, shipped inside
llama-cpp-python, exports the very function llama.cpp's quantizer calls on each tensor's float32 rows
(``ggml_quantize_chunk``, with the importance matrix), so calling it on the same rows with the same
imatrix gives the same bytes as the GGUF (tests/test_calibrate.py checks it bit for bit), and gguf-py
dequantizes them. Rows are independent: a large matrix can be passed a slice of rows at a time.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from xpack.errors import XpackError
from xpack.runtimes.llama_import import load_llama_cpp

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

# Types ggml_quantize_chunk writes and gguf-py reads back (F32 is the identity).
TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M",
)


def quant_error(weight: np.ndarray, ggml_type: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """dequant(quant(W)) - W [out, in] float32, exactly as llama.cpp's quantizer makes it for ``ggml_type`` and ``imatrix``."""
    w = _as_rows(weight)
    return dequantize_rows(quantize_rows(w, ggml_type, imatrix), ggml_type) - w


def quantize_rows(weight: np.ndarray, ggml_type: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """The bytes llama.cpp's quantizer writes for ``weight`` [out, in]: uint8 [out, bytes per row]."""
    import numpy as np

    w = _as_rows(weight)
    qtype = _qtype(ggml_type, w.shape[1])
    im = _imatrix(imatrix, w.shape[1], ggml_type)
    lib = _libggml()
    if im is None and lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise XpackError(f"{qtype.name} needs an importance matrix (calibration statistics)")
    if qtype.name == "F32":
        return w.view(np.uint8).copy()
    out = np.empty((w.shape[0], lib.ggml_row_size(int(qtype), w.shape[1])), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], None if im is None else im.ctypes.data)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def dequantize_rows(data: np.ndarray, ggml_type: str) -> np.ndarray:
    """float32 [out, in] of bytes as :func:`quantize_rows` (or a GGUF tensor of that type) holds them."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[ggml_type.upper()]
    if qtype.name == "F32":
        return np.ascontiguousarray(data).view(np.float32)
    return gguf.quants.dequantize(data, qtype).astype(np.float32, copy=False)


def row_bytes(ggml_type: str, n_per_row: int) -> int:
    """Bytes one row of ``n_per_row`` values takes in ``ggml_type`` (what a size budget counts)."""
    import gguf

    qtype = _qtype(ggml_type, n_per_row)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return n_per_row // block * size


def _qtype(ggml_type: str, n_per_row: int):
    import gguf

    name = ggml_type.upper()
    if name not in TYPES:
        raise XpackError(f"xpack cannot evaluate ggml type {ggml_type}; choose one of {', '.join(TYPES)}")
    qtype = gguf.GGMLQuantizationType[name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if n_per_row % block:
        raise XpackError(f"rows of {n_per_row} values cannot be stored as {name}, which needs a multiple of {block}")
    return qtype


def _as_rows(weight) -> np.ndarray:
    import numpy as np

    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise XpackError(f"a weight matrix [out, in] is needed, got shape {w.shape}")
    return w


def _imatrix(imatrix, n_per_row: int, ggml_type: str) -> np.ndarray | None:
    import numpy as np

    if imatrix is None:
        return None
    im = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if im.size != n_per_row or not np.isfinite(im).all():
        raise XpackError(f"the importance matrix for {ggml_type} has {im.size} values; rows of {n_per_row} need as many finite values")
    return im


@lru_cache(maxsize=1)
def _libggml():
    """libggml-base from the llama_cpp package (the library llama.cpp's quantizer itself uses), its signatures declared."""
    llama_cpp = load_llama_cpp()
    from llama_cpp._ctypes_extensions import load_shared_library

    lib = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    return lib
