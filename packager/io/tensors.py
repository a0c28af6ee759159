"""safetensors reading with clear errors, and a streaming sharded writer.

Why a reader and writer of our own (numpy, no torch):
- ``safetensors.torch.save_file`` needs every tensor of a file in memory at once. A merge that must
  stay within "largest tensor + adapter" of memory knows every output tensor's name, dtype and shape
  up front (from the base's headers), so it writes each file's header first and then the tensors'
  bytes one at a time, hashing them on the way.
- ``safe_open`` memory-maps the file: every tensor read stays in the process's resident memory
  until the file is closed. Plain reads keep one tensor resident, and numpy (which has no bfloat16:
  it is carried as uint16 bits here) spares the merge a torch import.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from xpack.errors import XpackError
from xpack.runtimes.integrity import sha256_of

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

# safetensors dtype names <-> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# numpy dtype a tensor is carried in (bfloat16 and float8 as their raw bits)
_NP_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "uint16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "uint8", "F8_E5M2": "uint8",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def torch_dtype_name(st_dtype: str) -> str:
    return _TORCH_NAMES[st_dtype]


def np_dtype(st_dtype: str) -> "np.dtype":
    import numpy as np

    return np.dtype(_NP_NAMES[st_dtype])


def to_f32(arr: "np.ndarray", st_dtype: str) -> "np.ndarray":
    """A float tensor's values as float32 (bfloat16 bits widened exactly)."""
    import numpy as np

    if st_dtype == "BF16":
        wide = arr.astype(np.uint32)
        wide <<= 16  # in place: an embedding of 262208 x 2560 would otherwise be held three times (2.7 GB each)
        return wide.view(np.float32)
    if st_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{st_dtype} is not a float dtype")
    return arr.astype(np.float32, copy=False)


def from_f32(arr: "np.ndarray", st_dtype: str, inplace: bool = False) -> "np.ndarray":
    """float32 values in a float dtype's storage form; bfloat16 rounds to nearest even, as torch does.

    ``inplace`` lets the bfloat16 rounding use ``arr``'s memory as scratch (it is clobbered).
    """
    import numpy as np

    if st_dtype != "BF16":
        return arr.astype(np_dtype(st_dtype), copy=False)
    src = np.ascontiguousarray(arr, dtype=np.float32)
    nan = np.isnan(src) if np.isnan(src.max(initial=0.0)) else None
    bits = (src if inplace and src is arr else src.copy()).view(np.uint32)
    carry = bits >> 16
    carry &= 1
    carry += 0x7FFF
    bits += carry
    bits >>= 16
    out = bits.astype(np.uint16)
    if nan is not None:
        out[nan] = 0x7FC0
    return out


def _parse(path: Path) -> tuple[dict[str, TensorSpec], dict, dict[str, int], int]:
    """specs (file order), __metadata__, data offset of each tensor, and where the data starts."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000 or 8 + n > size:
                raise ValueError("header length is past the end of the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise XpackError(f"{path} is not a readable safetensors file ({exc}); it is truncated or corrupt, download or save it again") from None
    if not isinstance(header, dict):
        raise XpackError(f"{path} has a corrupt safetensors header; download or save it again")
    meta = header.pop("__metadata__", None) or {}
    specs: dict[str, TensorSpec] = {}
    offsets: dict[str, int] = {}
    end_max = 0
    try:
        items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in items:
            spec = TensorSpec(name, info["dtype"], tuple(int(d) for d in info["shape"]))
            begin, end = (int(x) for x in info["data_offsets"])
            if spec.dtype not in DTYPE_SIZES or end - begin != spec.nbytes:
                raise ValueError(f"tensor {name} has inconsistent size")
            specs[name] = spec
            offsets[name] = begin
            end_max = max(end_max, end)
    except (KeyError, TypeError, ValueError) as exc:
        raise XpackError(f"{path} has a corrupt safetensors header ({exc}); download or save it again") from None
    if 8 + n + end_max > size:
        raise XpackError(
            f"{path} is truncated: it holds {size} bytes but its header needs {8 + n + end_max}; download or save it again"
        )
    return specs, meta, offsets, 8 + n


def read_header(path: Path) -> tuple[dict[str, TensorSpec], dict]:
    """Parse and validate a safetensors header without reading tensor data.

    Returns (specs in file order, __metadata__). A truncated or corrupt file is a one-line XpackError.
    """
    specs, meta, _, _ = _parse(path)
    return specs, meta


class Reader:
    """Tensors of one safetensors file, read one at a time into fresh numpy arrays (storage dtype)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.specs, self.meta, self._offsets, self._start = _parse(self.path)
        self._file = open(self.path, "rb")

    def get(self, name: str) -> "np.ndarray":
        import numpy as np

        spec = self.specs[name]
        out = np.empty(spec.nbytes, dtype=np.uint8)
        self._file.seek(self._start + self._offsets[name])
        if self._file.readinto(memoryview(out)) != spec.nbytes:
            raise XpackError(f"{self.path} is truncated inside tensor {name}; download or save it again")
        return out.view(np_dtype(spec.dtype)).reshape(spec.shape)

    def get_float32(self, name: str, chunk_bytes: int = 1 << 26) -> "np.ndarray":
        """A float tensor as float32, read and widened ``chunk_bytes`` at a time into the one float32 array: a
        bf16 embedding of 262208 x 2560 never sits in memory twice (1.3 GB read + 2.7 GB widened)."""
        import numpy as np

        spec = self.specs[name]
        if spec.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{spec.dtype} is not a float dtype")
        out = np.empty(spec.shape, np.float32)
        flat = out.reshape(-1)
        item = np_dtype(spec.dtype).itemsize
        step = max(1, chunk_bytes // item)
        self._file.seek(self._start + self._offsets[name])
        for start in range(0, flat.size, step):
            count = min(step, flat.size - start)
            raw = np.empty(count * item, np.uint8)
            if self._file.readinto(memoryview(raw)) != raw.size:
                raise XpackError(f"{self.path} is truncated inside tensor {name}; download or save it again")
            flat[start:start + count] = to_f32(raw.view(np_dtype(spec.dtype)), spec.dtype)
        return out

    def get_float32_rows(self, name: str, start: int, stop: int) -> "np.ndarray":
        """Rows ``start:stop`` (along the first axis) of a float tensor as float32, read with ``os.pread`` (safe from
        several threads at once): quantize.py's row-wise table reads one chunk of an embedding at a time."""
        import os

        import numpy as np

        spec = self.specs[name]
        if spec.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{spec.dtype} is not a float dtype")
        row = int(np.prod(spec.shape[1:], dtype=np.int64)) * np_dtype(spec.dtype).itemsize
        raw = np.empty((stop - start) * row, np.uint8)
        offset, done = self._start + self._offsets[name] + start * row, 0
        while done < raw.size:
            n = os.preadv(self._file.fileno(), [memoryview(raw)[done:]], offset + done)
            if n <= 0:
                raise XpackError(f"{self.path} is truncated inside tensor {name}; download or save it again")
            done += n
        return to_f32(raw.view(np_dtype(spec.dtype)), spec.dtype).reshape((stop - start, *spec.shape[1:]))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_all_f32(path: Path) -> tuple[dict[str, "np.ndarray"], set[str]]:
    """Every tensor of a (small) safetensors file, floats as float32; and the dtypes it was saved in."""
    with Reader(path) as r:
        out = {n: to_f32(r.get(n), s.dtype) if s.dtype in FLOAT_DTYPES else r.get(n) for n, s in r.specs.items()}
        return out, {s.dtype for s in r.specs.values()}


# what an export says of a checkpoint tensor holding NaN or inf (require_finite)
NON_FINITE = "in the checkpoint: no quantization can make a working artifact of it (a diverged fine-tune or a damaged file?)"


def all_finite(arr: "np.ndarray") -> bool:
    """Whether every value of a float array is finite, without a mask as large as it: the float64 sum of float32 or
    float16 values cannot overflow, so it is NaN or inf exactly when a value is."""
    import numpy as np

    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in the sum: the answer, not a warning
        return bool(np.isfinite(arr.sum(dtype=np.float64)))


def require_finite(arr: "np.ndarray", name: str, what: str) -> None:
    """A one-line error naming the tensor when ``arr`` holds NaN or inf (issue #14: a NaN merge was written silently)."""
    if not all_finite(arr):
        raise XpackError(f"{name} holds NaN or inf values {what}")


def sha256_file(path: Path) -> str:
    """The file's sha256: runtimes/integrity.py's reader (one reused buffer), the one that `xpack check` uses."""
    return sha256_of(path)


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1000000' -> bytes."""
    t = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    if t.isdigit():
        return int(t)
    raise XpackError(f"invalid size {text!r}; use a number of bytes or a size like 500MB or 5GB")


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int, stem: str = "model") -> dict[str, list[TensorSpec]]:
    """Group tensors (in order) into shard files no larger than ``max_shard_bytes`` (a lone big tensor gets its own)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return {f"{stem}.safetensors": groups[0]}
    n = len(groups)
    return {f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


class ShardedWriter:
    """Write tensors, in the planned order, into pre-planned safetensors shards, one tensor in memory at a time."""

    def __init__(self, out_dir: Path, shards: dict[str, list[TensorSpec]], metadata: dict | None = None):
        self.out_dir = Path(out_dir)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.order: list[tuple[str, TensorSpec]] = [(f, s) for f, specs in shards.items() for s in specs]
        self.shards = shards
        self.pos = 0
        self.file = None
        self.fname = None
        self.hash = None
        self.hashes: dict[str, str] = {}

    def _open(self, fname: str) -> None:
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for spec in self.shards[fname]:
            header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.file = open(self.out_dir / fname, "wb")
        self.fname = fname
        self.hash = hashlib.sha256()
        self._emit(struct.pack("<Q", len(blob)) + blob)

    def _emit(self, data) -> None:
        self.file.write(data)
        self.hash.update(data)

    def _close_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.hashes[self.fname] = self.hash.hexdigest()
            self.file = None

    def write(self, name: str, tensor: "np.ndarray") -> None:
        """Write the next planned tensor, given in its storage dtype (``np_dtype(spec.dtype)``)."""
        import numpy as np

        fname, spec = self.order[self.pos]
        if name != spec.name:
            raise RuntimeError(f"writer expected tensor {spec.name}, got {name}")  # a programming error, not a user one
        if tensor.dtype != np_dtype(spec.dtype) or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"tensor {name}: planned {spec.dtype}{list(spec.shape)}, got {tensor.dtype}{list(tensor.shape)}")
        if fname != self.fname:
            self._close_file()
            self._open(fname)
        if spec.nbytes:
            self._emit(memoryview(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)))
        self.pos += 1

    def close(self) -> dict[str, str]:
        """Finish the last shard, write the index when there are several; return {file: sha256}."""
        if self.pos != len(self.order):
            raise RuntimeError(f"writer got {self.pos} of {len(self.order)} planned tensors")
        self._close_file()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for specs in self.shards.values() for s in specs)},
                "weight_map": {s.name: f for f, specs in self.shards.items() for s in specs},
            }
            stem = next(iter(self.shards)).rsplit("-", 3)[0]
            path = self.out_dir / f"{stem}.safetensors.index.json"
            path.write_text(json.dumps(index, indent=2) + "\n")
        return dict(self.hashes)
