"""A graph whose weights are not in memory (issue #12): the export of a 4B or 11B model within a few GB.

xpack's decoder graph (decoder_graph.py) is built with a placeholder for each weight: an initializer with its name,
shape and float type and no data, whose external data location is ``PENDING``, beside a recipe that reads it from the
checkpoint. Everything done at ``--bits`` happens on that weightless graph: the fp16 converter only retypes the
placeholders (onnxruntime's ``convert_tensor_float_to_float16`` converts the data a tensor holds, and these hold
none), and quantize.py fetches one weight at a time through :class:`PendingWeights` and appends what it makes to the
data file at once. :meth:`PendingWeights.write_all` then makes each weight still pending, converts it to the type
its placeholder has by then and appends it. Peak memory is the largest weight and what is done to it (Gemma 3 4B:
its 262208 x 2560 embedding, 2.7 GB in float32), not the model (17 GB).

Why not onnx's own ``save_model(save_as_external_data=True)``: it writes the weights out of a ModelProto that holds
them all; onnx cannot put a tensor into a graph without its data in memory, so the placeholders and the writer are here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from xpack.packager.export.onnx.quantize import InMemory, TableColumns
from xpack.packager.io.tensors import NON_FINITE, require_finite

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import onnx

PENDING = "xpack-pending"  # the external data location of a placeholder: no file holds its bytes yet
# onnx's own alignment of external data: tensors of 1 MB and more start on a 64 KB boundary (its allocation
# granularity, so onnxruntime can map them), the others on 64 bytes
ALIGN_THRESHOLD, ALIGN_LARGE, ALIGN_SMALL = 1 << 20, 1 << 16, 64
# an initializer a converter made inline (a constant of the fp16 casts) goes to the data file above this size
INLINE_LIMIT = 1024
# a pending weight is converted and written this many bytes of float32 at a time (write_all)
WRITE_CHUNK_BYTES = 64 << 20
@dataclass(frozen=True)
class Recipe:
    """How one pending weight is made: ``make`` gives its float32 values; ``source`` names the checkpoint tensor it
    is read as is or transposed (``transposed``), '' for computed ones (a norm weight with Gemma's 1 + w folded in).
    ``rows(start, stop)``, where given, reads only those rows of the weight as ``make`` gives it (an embedding table:
    quantize.py quantizes it a chunk of rows at a time instead of whole in float32)."""

    make: Callable[[], "np.ndarray"]
    source: str = ""
    transposed: bool = False
    rows: "Callable[[int, int], np.ndarray] | None" = None


def is_pending(tensor: "onnx.TensorProto") -> bool:
    return any(e.key == "location" and e.value == PENDING for e in tensor.external_data)


class DataFile:
    """One external data file, written front to back: each array appended, the TensorProto that points at it returned."""

    def __init__(self, folder: Path, name: str):
        self.name = name
        self.path = Path(folder) / name
        self._file = open(self.path, "wb")
        self.offset = 0

    def write(self, array: "np.ndarray", name: str) -> "onnx.TensorProto":
        return self.write_rows(name, array.dtype, array.shape, [array])

    def write_rows(self, name: str, dtype, shape: tuple[int, ...], chunks: Iterable["np.ndarray"]) -> "onnx.TensorProto":
        """A tensor of ``shape`` and ``dtype`` written as ``chunks``, consecutive slices along its first axis, each one
        let go before the next is made: the tensor is never whole in memory."""
        import numpy as np
        from onnx import TensorProto, helper

        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        align = ALIGN_LARGE if nbytes >= ALIGN_THRESHOLD else ALIGN_SMALL
        pad = -self.offset % align
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype), dims=shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.name), ("offset", str(self.offset)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        written = 0
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype)
            self._file.write(memoryview(chunk.reshape(-1)).cast("B"))
            written += chunk.nbytes
            del chunk
        if written != nbytes:
            raise RuntimeError(f"{name}: {written} bytes written for a tensor of {nbytes}")
        self.offset += nbytes
        return tensor

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "DataFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PendingWeights(InMemory):
    """The recipes of one graph's placeholders, and where the weights it makes go (``out``, set before writing).
    It is quantize.py's :class:`InMemory` for a graph that holds no weights."""

    def __init__(self):
        self.recipes: dict[str, Recipe] = {}
        self.out: DataFile | None = None
        self._closers: list[Callable[[], None]] = []

    def placeholder(self, name: str, shape: tuple[int, ...], recipe: Recipe) -> "onnx.TensorProto":
        from onnx import TensorProto

        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", PENDING
        self.recipes[name] = recipe
        return tensor

    def on_close(self, closer: Callable[[], None]) -> None:
        """Something the recipes read from (the checkpoint's files), closed with this object."""
        self._closers.append(closer)

    def close(self) -> None:
        for closer in self._closers:
            closer()
        self._closers.clear()

    # -- quantize.py's interface

    def fetch(self, tensor) -> "np.ndarray":
        if is_pending(tensor):
            return self.make(tensor.name)
        return super().fetch(tensor)

    def columns(self, tensor):
        """A Gather table [rows, hidden] as the MatMul weight [hidden, rows] quantize.py reads, a chunk of rows at a
        time where its recipe can (each chunk checked for NaN and inf); otherwise whole, as :meth:`fetch` gives it."""
        recipe = self.recipes.get(tensor.name) if is_pending(tensor) else None
        if recipe is None or recipe.rows is None:
            return super().columns(tensor)
        name = recipe.source or tensor.name

        def read(start: int, stop: int) -> "np.ndarray":
            values = recipe.rows(start, stop)
            require_finite(values, name, NON_FINITE)
            return values

        return TableColumns(read, tuple(tensor.dims))

    def make(self, name: str) -> "np.ndarray":
        """The weight's float32 values from its recipe; NaN or inf in them is a one-line error naming it."""
        recipe = self.recipes[name]
        values = recipe.make()
        require_finite(values, recipe.source or name, NON_FINITE)
        return values

    def emit(self, array: "np.ndarray", name: str):
        if self.out is None:
            raise RuntimeError("PendingWeights.out is not set: open the DataFile the weights go to first")
        return self.out.write(array, name)

    def same_table(self, table, weight, w: "np.ndarray") -> bool:
        """A table and a weight read from one checkpoint tensor, one of them transposed (a tied embedding and head)."""
        a, b = self.recipes.get(table.name), self.recipes.get(weight.name)
        if a is None or b is None:
            return super().same_table(table, weight, w)
        return bool(a.source) and a.source == b.source and a.transposed != b.transposed

    # -- the graph

    def write_all(self, model: "onnx.ModelProto") -> int:
        """Make every weight of ``model`` still pending, in its placeholder's type by now (float32 or fp16), and append
        it to ``out``; larger inline initializers go there too, so the graph file holds no weights. Returns the count."""
        from onnx import TensorProto, helper, numpy_helper

        written = 0
        for tensor in model.graph.initializer:
            if is_pending(tensor):
                shape, dtype = tuple(tensor.dims), helper.tensor_dtype_to_np_dtype(tensor.data_type)  # _as refuses a type it does not make
                tensor.CopyFrom(self.out.write_rows(tensor.name, dtype, shape, self._chunks(tensor.name, shape, tensor.data_type)))
            elif tensor.data_location != TensorProto.EXTERNAL and len(tensor.raw_data) > INLINE_LIMIT:
                tensor.CopyFrom(self.emit(numpy_helper.to_array(tensor), tensor.name))
            else:
                continue
            written += 1
        return written

    def _chunks(self, name: str, shape: tuple[int, ...], data_type: int) -> Iterator["np.ndarray"]:
        """A pending weight in its placeholder's type, WRITE_CHUNK_BYTES of float32 at a time along its first axis: read
        a chunk of rows at a time where the recipe can (an embedding table), else made whole in float32 and converted a
        chunk at a time (the fp16 converter's temporaries are several times what it converts: 2.7 GB of Gemma 3 4B's
        table took it past 8 GB)."""
        recipe = self.recipes[name]
        rows = shape[0] if shape else 1
        step = max(1, WRITE_CHUNK_BYTES // max(1, 4 * (math.prod(shape) // max(rows, 1))))
        if recipe.rows is not None and len(shape) >= 1:
            for start in range(0, rows, step):
                values = recipe.rows(start, min(start + step, rows))
                require_finite(values, recipe.source or name, NON_FINITE)
                yield _as(values, data_type)
            return
        values = self.make(name)
        if not shape:
            yield _as(values, data_type)
            return
        for start in range(0, rows, step):
            yield _as(values[start:start + step], data_type)

    def inline_all(self, model: "onnx.ModelProto") -> None:
        """Put every pending weight's float32 values into the graph itself: for what needs the whole model in memory
        (the calibrated mix, which measures every weight against the calibration statistics)."""
        from onnx import numpy_helper

        for tensor in model.graph.initializer:
            if is_pending(tensor):
                tensor.CopyFrom(numpy_helper.from_array(self.make(tensor.name), tensor.name))


def _as(values: "np.ndarray", data_type: int) -> "np.ndarray":
    """A weight's float32 values in the type its placeholder has now: float32, or fp16 as onnxruntime's converter makes
    it (``convert_np_to_float16``: values beyond fp16's range clipped to it, tiny ones kept at its smallest), so the
    bytes are those of the converter's own output."""
    import numpy as np
    from onnx import TensorProto

    if data_type == TensorProto.FLOAT:
        return np.asarray(values, np.float32)
    if data_type == TensorProto.FLOAT16:
        from onnxruntime.transformers.float16 import convert_np_to_float16

        return convert_np_to_float16(np.asarray(values, np.float32))
    raise RuntimeError(f"a pending weight was retyped to ONNX type {data_type}, which xpack's writer does not make")


def save_graph(model: "onnx.ModelProto", path: Path) -> None:
    """The graph proto alone (its weights already in their data file, pending.py's writer)."""
    import onnx

    if any(is_pending(t) for t in model.graph.initializer):
        raise RuntimeError(f"{path.name}: weights still pending; call PendingWeights.write_all first")
    onnx.save_model(model, str(path))
