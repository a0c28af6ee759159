"""Weight-only block quantization of an ONNX decoder's MatMuls into onnxruntime's ``MatMulNBits``, written by xpack.

onnxruntime's ``MatMulNBitsQuantizer`` rounds every block to nearest over its [min, max] range, at one
width for the whole model; on the 135M demo model its int4 file loses far more than llama.cpp's Q4_K_M.
Q4_K_M does better with a per-block scale/min search and a mix of widths, and on this model (rows of
576, not a multiple of 256) most of its matrices fall back to Q5_0 and Q8_0. MatMulNBits runs 2, 4 and
8 bits only on CPU, so the same ideas are done here with 4 and 8 bits, on onnxruntime's own operator:

- Search (llama.cpp's ``make_qkx2_quants``): per block, a grid of candidate scales around the block's
  range is tried; for each, the integer codes are rounded, the scale refitted by least squares and the
  weighted squared error kept if it is the lowest so far (llama.cpp's weights for K-quants without an
  importance matrix: ``rms(block) + |x|``). Unlike Q4_K, ``MatMulNBits`` stores an integer zero point,
  so the block's minimum is a multiple of its scale; the search works in that space.
- Mixed widths: 8 bits (blocks of 64) for the output head, every attention projection and the MLP of
  llama.cpp's ``use_more_bits`` layers (first and last eighth, every third between); 4 bits (blocks of
  32) for the other MLPs. Node-name patterns, so callers can choose otherwise.
- A tied embedding is read from the head's packed weight (``GatherBlockQuantized`` over the same
  initializer) instead of being stored a second time, as llama.cpp stores it once.

Measured on the demo model (SmolLM2-135M-Instruct, xpack's decoder graph, onnxruntime 1.32, one thread;
mean KL / top-1 against torch fp32, teacher-forced on the 548 tokens of data/eval_medical.txt; "README"
= the first 1024 tokens of the repository's README.md; "merged" = the demo's merged base + radiology
adapter, eval_medical; decode = median ms per single-token step with the KV cache, interleaved runs;
4-bit blocks of 32, accuracy_level 4 throughout; the first three rows keep onnxruntime's own 4-bit
embedding, the others read the embedding from the head):

| variant | bytes | KL | top-1 | KL README | KL merged | decode ms |
|---|---|---|---|---|---|---|
| RTN, onnxruntime's quantizer (embedding 4-bit) | 106.7 MB | 0.511 | 58.0% | 0.456 | 0.529 | 7.6-7.8 |
| RTN, this module (byte-identical file) | 106.7 MB | 0.511 | 58.0% | 0.456 | - | 7.5 |
| search, all 4-bit | 106.7 MB | 0.422 | 57.5% | 0.341 | - | 7.4 |
| search, all 4-bit, tied embedding shared | 93.0 MB | 0.424 | 58.0% | 0.336 | - | 7.3 |
| search + llama.cpp's Q4_K_M choice at 8/32 (head, qkv + down of use_more_bits) | 118.0 MB | 0.178 | 76.5% | 0.146 | 0.263 | 8.1-8.4 |
| search + head, all qkv, down of use_more_bits, all of first/last eighth (8/32) | 130.1 MB | 0.064 | 84.9% | 0.046 | 0.106 | 8.2-8.8 |
| the same, RTN instead of search | 130.1 MB | 0.084 | 84.1% | 0.058 | - | 8.3 |
| the same + o_proj everywhere (8/32) | 134.1 MB | 0.056 | 84.7% | 0.039 | 0.079 | 8.4 |
| the same, 8-bit blocks of 64 | 125.6 MB | 0.057 | 86.1% | 0.043 | 0.079 | 7.4-8.0 |
| **default**: head, all attention, MLP of use_more_bits (8/64) | 131.1 MB | 0.046 | 86.7% | 0.035 | 0.063 | 7.4-7.9 |
| 4-bit blocks of 16 instead of more 8-bit (head, all qkv, down use_more_bits at 8/32) | 133.4 MB | 0.070 | 84.3% | 0.052 | - | 10.2 |
| llama.cpp Q4_K_M (GGUF, for reference) | 105.5 MB | 0.076 | 85.8% | 0.070 | 0.087 | - |

What bought what (KL on eval_medical, 8/32 unless noted): q|k|v in every layer instead of the
use_more_bits ones -0.07 for 4.6 MB (xpack's graph packs q|k|v in one MatMul, so the whole packed
matrix, not v alone, is the unit: 8 bits for all of it costs 3 MB more than for v alone would, and
q and k gain too); the down projections of use_more_bits -0.08 for 6.4 MB once q|k|v are 8-bit;
o_proj everywhere -0.01 (but -0.03 on the merged model, whose adapter changes q, k, v and o); the
searched scales -0.02 at the same bytes. Quantizing the whole model takes ~14 s on one core.

The layout written is onnxruntime's (byte for byte against its quantizer in tests/test_onnx_quant.py):
``B`` uint8 [N, k_blocks, block_size * bits / 8], codes along K, low nibble first for 4 bits;
``scales`` float [N, k_blocks]; ``zero_points`` uint8 [N, ceil(k_blocks * bits / 8)], packed like B
(4 bits: low nibble = even block, an odd last block padded with 8, as onnxruntime does).
Dequantized weight = (code - zero_point) * scale.
"""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from xpack.packager.export.onnx.common import ACCURACY_LEVEL
from xpack.runtimes.heap import reusing_allocations

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import onnx

# Layer-number placeholders of the 8-bit patterns, replaced by a regex alternation of layer numbers:
# ``{more_bits}`` = llama.cpp's use_more_bits layers (Q4_K_M gives these Q6_K for attn_v and ffn_down),
# ``{ends}`` = its first and last eighth only.
MORE_BITS, ENDS = "{more_bits}", "{ends}"
# Nodes that get 8 bits when ``mixed`` (regexes searched in node names; xpack's graph and optimum's
# name them alike, /lm_head/MatMul, /model/layers.N/mlp/down_proj/MatMul, except that xpack's graph
# packs q|k|v into one /model/layers.N/attn/qkv_proj/MatMul and optimum's attention is /self_attn/).
# Chosen by measurement on the demo model (module docstring): the output head, every attention
# projection (q, k, v, o) and the MLP (gate, up, down) of llama.cpp's use_more_bits layers; the MLPs
# of the other layers stay 4-bit.
DEFAULT_EIGHT_BIT_PATTERNS = (
    r"^/lm_head/",
    r"^/model/layers\.\d+/(attn|self_attn)/",
    r"^/model/layers\.{more_bits}/mlp/",
)
# 8-bit blocks of 64: the same KL as blocks of 32 on the demo model, 7% fewer 8-bit bytes, and
# onnxruntime's int8 kernel runs them ~10% faster (the mix then decodes as fast as plain int4).
EIGHT_BIT_BLOCK_SIZE = 64
# llama.cpp's own choice for Q4_K_M (Q6_K: output head, attn_v and ffn_down of the use_more_bits layers),
# as 8-bit MatMulNBits patterns; with xpack's packed q|k|v, "v" is the whole qkv MatMul.
LLAMA_CPP_Q4_K_M_PATTERNS = (
    r"^/lm_head/",
    r"^/model/layers\.{more_bits}/(attn/qkv_proj|self_attn/v_proj)/",
    r"^/model/layers\.{more_bits}/mlp/down_proj/",
)
# The candidate grid, make_qkx2_quants' form: iscale = (qmax + RMIN + RDELTA * i) / range, i = 0..NSTEP.
# llama.cpp's Q4_K uses -1, 0.1, 20 (qmax - 1 .. qmax + 1); a wider grid, qmax - 4 .. qmax + 4 in steps of
# 0.5, lowers the weighted error of 4-bit blocks of the demo model a further 5% (0.67 -> 0.63 of RTN's;
# finer steps or wider ranges change nothing).
NSTEP, RMIN, RDELTA = 16, -4.0, 0.5
# Blocks searched at once: ~2 MB of float32 per array at block 32, so the working set stays in cache.
CHUNK_BLOCKS = 16384
# Chunks of a weight's output rows quantized at once. numpy releases the GIL in its loops, so threads share the cores
# without copying the weight to other processes; the blocks are independent, so the bytes are those of one thread.
QUANTIZE_THREADS = min(os.cpu_count() or 1, 8)
ONNX_DOMAIN = "com.microsoft"


# ---------------------------------------------------------------------------------------------
# numerics


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third one between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _roundf(x: "np.ndarray") -> "np.ndarray":
    """C's roundf (halves away from zero), exactly: numpy's rint rounds halves to even."""
    import numpy as np

    t = np.trunc(x)
    return t + np.where(np.abs(x - t) >= 0.5, np.sign(x), 0).astype(x.dtype)


def _to_blocks(w: "np.ndarray", block_size: int) -> "np.ndarray":
    """[K, N] weight -> [N, k_blocks, block_size] float32 (K padded with zeros to whole blocks)."""
    import numpy as np

    k, n = w.shape
    k_blocks = -(-k // block_size)
    wt = np.zeros((n, k_blocks * block_size), np.float32)
    wt[:, :k] = w.T
    return wt.reshape(n, k_blocks, block_size)


def rtn_block_params(x: "np.ndarray", bits: int) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """Round-to-nearest over [min(x, 0), max(x, 0)], as onnxruntime's MLAS quantizer does it
    (float32, roundf, codes from x * (1 / scale) + zero_point). x: [blocks, block_size].
    Returns codes uint8 [blocks, block_size], scales float32 [blocks], zero points uint8 [blocks]."""
    import numpy as np

    qmax = np.float32(2**bits - 1)
    lo = np.minimum(x.min(axis=1), np.float32(0))
    hi = np.maximum(x.max(axis=1), np.float32(0))
    scale = ((hi - lo) / qmax).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp_f = np.where(scale != 0, np.float32(0) - lo / scale, lo).astype(np.float32)
    zp = np.clip(_roundf(zp_f), 0, qmax).astype(np.float32)
    with np.errstate(divide="ignore"):
        recip = np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    q = np.clip(_roundf(x * recip[:, None] + zp[:, None]), 0, qmax)
    return q.astype(np.uint8), scale, zp.astype(np.uint8)


def search_block_params(
    x: "np.ndarray", bits: int, *, nstep: int = NSTEP, rmin: float = RMIN, rdelta: float = RDELTA, weighted: bool = True,
    importance: "np.ndarray | None" = None,
) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """Per block, the scale and integer zero point with the least (weighted) squared error over
    llama.cpp's make_qkx2_quants grid, the codes rounded at each candidate and the scale refitted by
    least squares. x: [blocks, block_size]. Same returns as :func:`rtn_block_params`; the plain
    round-to-nearest block is among the candidates, so no block gets worse than RTN (in the weighted error).
    ``importance`` ([blocks, block_size], an importance matrix's column values): the error weights become
    llama.cpp's with an imatrix, ``importance * sqrt(sigma2 + x^2)`` with sigma2 = 2 * mean(x^2) of the block."""
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    qmax = 2**bits - 1
    lo = np.minimum(x.min(axis=1), 0)
    hi = np.maximum(x.max(axis=1), 0)
    span = hi - lo
    flat = span <= 0
    span[flat] = 1.0
    if importance is not None:
        sigma2 = 2 * np.einsum("ij,ij->i", x, x) / x.shape[1]
        w = np.asarray(importance, np.float32) * np.sqrt(sigma2[:, None] + x * x)
    elif weighted:
        w = np.sqrt(np.einsum("ij,ij->i", x, x) / x.shape[1])[:, None] + np.abs(x)
    else:
        w = np.ones_like(x)
    wx = w * x
    sxx = np.einsum("ij,ij->i", wx, x, dtype=np.float64)

    def codes(iscale: "np.ndarray", zp: "np.ndarray") -> "np.ndarray":
        c = np.rint(x * iscale[:, None])
        return np.clip(c, -zp[:, None], (qmax - zp)[:, None], out=c)

    def fit(c: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
        sxc = np.einsum("ij,ij->i", wx, c, dtype=np.float64)
        scc = np.einsum("ij,ij->i", w * c, c, dtype=np.float64)
        ok = (scc > 0) & (sxc > 0)
        safe = np.where(ok, scc, 1.0)
        err = np.where(ok, sxx - sxc * sxc / safe, np.inf)
        return err, np.where(ok, sxc / safe, 0.0)

    # candidate 0: round-to-nearest over the range (the scale still refitted)
    factors = [float(qmax)] + [qmax + rmin + rdelta * i for i in range(nstep + 1)]
    best_err = np.full(x.shape[0], np.inf)
    best_iscale = np.float32(qmax) / span
    best_zp = np.zeros(x.shape[0], np.float32)
    best_scale = np.zeros(x.shape[0], np.float64)
    for f in factors:
        iscale = (np.float32(f) / span).astype(np.float32)
        zp = np.clip(np.rint(-lo * iscale), 0, qmax).astype(np.float32)
        err, scale = fit(codes(iscale, zp))
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_iscale = np.where(better, iscale, best_iscale)
        best_zp = np.where(better, zp, best_zp)
        best_scale = np.where(better, scale, best_scale)
    c = codes(best_iscale, best_zp)
    # one more step: the codes re-rounded at the refitted scale (keeps the zero point)
    ok = best_scale > 0
    c2 = codes(np.where(ok, 1.0 / np.where(ok, best_scale, 1.0), 0).astype(np.float32), best_zp)
    err2, scale2 = fit(c2)
    better = (err2 < best_err)[:, None]
    c = np.where(better, c2, c)
    best_scale = np.where(better[:, 0], scale2, best_scale)
    # blocks with nothing to fit (all zero, or no candidate with a positive scale): round-to-nearest
    fallback = flat | ~np.isfinite(best_err) & ~better[:, 0]
    q = (c + best_zp[:, None]).astype(np.uint8)
    scale = best_scale.astype(np.float32)
    zp = best_zp.astype(np.uint8)
    if fallback.any():
        rq, rs, rz = rtn_block_params(x[fallback], bits)
        q[fallback], scale[fallback], zp[fallback] = rq, rs, rz
    return q, scale, zp


def _pack(values: "np.ndarray", bits: int, pad_value: int = 0) -> "np.ndarray":
    """Pack along the last axis, low bits first (4 bits: element 2i in the low nibble of byte i)."""
    import numpy as np

    per_byte = 8 // bits
    n = values.shape[-1]
    if n % per_byte:
        pad = np.full(values.shape[:-1] + (per_byte - n % per_byte,), pad_value, np.uint8)
        values = np.concatenate([values, pad], axis=-1)
    values = values.astype(np.uint8).reshape(values.shape[:-1] + (-1, per_byte))
    out = np.zeros(values.shape[:-1], np.uint8)
    for i in range(per_byte):
        out |= values[..., i] << np.uint8(bits * i)
    return out


def _unpack(packed: "np.ndarray", bits: int, count: int) -> "np.ndarray":
    """The inverse of :func:`_pack`: ``count`` values along the last axis."""
    import numpy as np

    mask = np.uint8(2**bits - 1)
    out = np.stack([(packed >> np.uint8(bits * i)) & mask for i in range(8 // bits)], axis=-1)
    return out.reshape(packed.shape[:-1] + (-1,))[..., :count]


def quantize_weight(
    w: "np.ndarray", bits: int = 4, block_size: int = 32, *, search: bool = True, weighted: bool = True, importance: "np.ndarray | None" = None,
    threads: int | None = None,
) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """A MatMul weight [K, N] -> MatMulNBits' (B uint8 [N, k_blocks, blob], scales float32 [N, k_blocks],
    zero_points uint8 [N, ceil(k_blocks * bits / 8)]). ``importance`` [K]: an importance matrix (mean x^2 per
    input column) that weighs the search's error (see :func:`search_block_params`). ``threads``: chunks of output
    rows quantized at once (default QUANTIZE_THREADS)."""
    import numpy as np

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, not {block_size}")
    k, n = w.shape
    k_blocks = -(-k // block_size)
    imp = None
    if importance is not None and search:
        imp = np.zeros(k_blocks * block_size, np.float32)
        imp[:k] = np.asarray(importance, np.float32).reshape(-1)
        imp = imp.reshape(k_blocks, block_size)
    packed = np.empty((n, k_blocks, block_size * bits // 8), np.uint8)
    scales = np.empty((n, k_blocks), np.float32)
    zero_points = np.empty((n, -(-k_blocks * bits // 8)), np.uint8)
    # a few output rows at a time (blocks are independent): the float32 copy in blocks is never the whole weight,
    # which for a 262208 x 2560 output head would be 2.7 GB on top of the weight itself
    rows = max(1, CHUNK_BLOCKS // k_blocks)

    def chunk(n0: int) -> None:
        part = slice(n0, min(n0 + rows, n))
        flat = _to_blocks(np.asarray(w[:, part], dtype=np.float32), block_size).reshape(-1, block_size)
        if imp is not None:
            q, s, z = search_block_params(flat, bits, importance=imp[np.arange(flat.shape[0]) % k_blocks])  # block b of a row: column block b % k_blocks
        elif search:
            q, s, z = search_block_params(flat, bits, weighted=weighted)
        else:
            q, s, z = rtn_block_params(flat, bits)
        count = part.stop - part.start
        if k % block_size:  # onnxruntime leaves the padding rows' codes at 0; the kernel never reads them
            q.reshape(count, k_blocks * block_size)[:, k:] = 0
        packed[part] = _pack(q.reshape(count, k_blocks, block_size), bits)
        scales[part] = s.reshape(count, k_blocks)
        zero_points[part] = _pack(z.reshape(count, k_blocks), bits, pad_value=2 ** (bits - 1))

    starts = range(0, n, rows)
    workers = min(threads or QUANTIZE_THREADS, len(starts))
    with reusing_allocations():  # each chunk's temporaries reuse the last one's memory (runtimes/heap.py)
        if workers <= 1:
            for n0 in starts:
                chunk(n0)
        else:  # disjoint rows of the outputs: the same bytes as one chunk after another
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(chunk, starts):
                    pass
    return packed, scales, zero_points


def weight_error(w: "np.ndarray", packed: "np.ndarray", scales: "np.ndarray", zero_points: "np.ndarray", bits: int) -> tuple[float, float]:
    """(sum of squared errors of the quantized weight, sum of squares of ``w`` [K, N]) in float64, a few output rows
    at a time (whole float64 copies of a large output head would be 5 GB each)."""
    import numpy as np

    k, n = w.shape
    rows = max(1, CHUNK_BLOCKS * 32 // max(k, 1))
    err = ref = 0.0
    for n0 in range(0, n, rows):
        part = slice(n0, min(n0 + rows, n))
        original = np.asarray(w[:, part], dtype=np.float32)
        err += float(np.square(dequantize_weight(packed[part], scales[part], zero_points[part], bits, k) - original, dtype=np.float64).sum())
        ref += float(np.square(original, dtype=np.float64).sum())
    return err, ref


def dequantize_weight(packed: "np.ndarray", scales: "np.ndarray", zero_points: "np.ndarray", bits: int, k: int) -> "np.ndarray":
    """The float [K, N] weight a MatMulNBits initializer triple stands for (for checks and tests)."""
    import numpy as np

    n, k_blocks, blob = packed.shape
    q = _unpack(packed, bits, blob * 8 // bits).astype(np.float32)
    z = _unpack(zero_points, bits, k_blocks).astype(np.float32)
    w = (q - z[..., None]) * scales.reshape(n, k_blocks)[..., None]
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)


# ---------------------------------------------------------------------------------------------
# the graph


class TableColumns:
    """A table [rows, hidden] seen as the MatMul weight [hidden, rows] that :func:`quantize_weight` slices by output
    columns (``w[:, part]``), each slice read by ``read(start, stop)`` (those rows, float32). Gemma 3 4B's 262208 x 2560
    embedding is then never whole in float32 (2.7 GB, the peak of the 4B export's table: issue #12)."""

    def __init__(self, read: "Callable[[int, int], np.ndarray]", table_shape: tuple[int, int]):
        self.read = read
        self.shape = (int(table_shape[1]), int(table_shape[0]))

    def __getitem__(self, key) -> "np.ndarray":
        rows, part = key
        if rows != slice(None) or not isinstance(part, slice) or part.step not in (None, 1):
            raise TypeError("TableColumns reads w[:, start:stop] only")
        start, stop, _ = part.indices(self.shape[1])
        return self.read(start, stop).T


class InMemory:
    """How :func:`quantize_matmuls` reads and writes initializers of a graph held in memory (the default). A graph
    whose weights are pending (pending.py: read from the checkpoint one at a time, written to the data file at once)
    gives its own, with the same three methods."""

    def fetch(self, tensor) -> "np.ndarray":
        from onnx import numpy_helper

        return numpy_helper.to_array(tensor)

    def emit(self, array: "np.ndarray", name: str):
        from onnx import numpy_helper

        return numpy_helper.from_array(array, name)

    def columns(self, tensor):
        """The Gather table [rows, hidden] ``tensor`` as the MatMul weight [hidden, rows] :func:`quantize_weight` reads."""
        return self.fetch(tensor).T

    def same_table(self, table, weight, w: "np.ndarray") -> bool:
        """Whether the Gather table ``table`` is the transpose of the MatMul weight ``weight`` (whose values are ``w``)."""
        import numpy as np

        return bool(np.array_equal(self.fetch(table), w.T))


def _layer_count(names: Iterable[str]) -> int:
    layers = [int(m.group(1)) for name in names if (m := re.search(r"/layers\.(\d+)/", name))]
    return max(layers) + 1 if layers else 0


def expand_patterns(patterns: Sequence[str], layers: int) -> list["re.Pattern"]:
    """Compile the 8-bit node patterns: ``{more_bits}`` becomes the alternation of llama.cpp's
    use_more_bits layer numbers, ``{ends}`` that of the first and last eighth (``layers // 8``)."""
    def alternation(keep) -> str:
        chosen = [str(i) for i in range(layers) if keep(i)]
        return "(?:" + "|".join(chosen) + r")(?!\d)" if chosen else "(?!)"

    more = alternation(lambda i: use_more_bits(i, layers))
    ends = alternation(lambda i: i < layers // 8 or i >= 7 * layers // 8)
    return [re.compile(p.replace(MORE_BITS, more).replace(ENDS, ends)) for p in patterns]


def quantize_matmuls(
    model: "onnx.ModelProto",
    bits: int = 4,
    block_size: int = 32,
    *,
    mixed: bool = True,
    search: bool = True,
    accuracy_level: int | None = ACCURACY_LEVEL,
    exclude: Iterable[str] = (),
    eight_bit_patterns: Sequence[str] = DEFAULT_EIGHT_BIT_PATTERNS,
    eight_bit_block_size: int = EIGHT_BIT_BLOCK_SIZE,
    share_embedding: bool = True,
    weighted: bool = True,
    plan: dict[str, tuple[int, int]] | None = None,
    importance: dict[str, "np.ndarray"] | None = None,
    tensors: InMemory | None = None,
) -> tuple["onnx.ModelProto", dict]:
    """Replace every MatMul whose second input is a 2-D float32 initializer [K, N] by a ``MatMulNBits``
    (in place; the model is also returned), with an ``info`` dict of what was done.

    - ``bits``/``block_size``: the width (4 or 8) and block along K of every quantized MatMul not
      picked for 8 bits.
    - ``mixed`` (ignored at 8 bits): nodes whose name matches one of ``eight_bit_patterns`` (regexes
      searched in the node name; ``{more_bits}`` and ``{ends}`` stand for layer numbers, see
      :func:`expand_patterns`) get 8 bits in blocks of ``eight_bit_block_size``.
    - ``search``: the per-block scale / zero-point search; False = round to nearest exactly as
      onnxruntime's MatMulNBitsQuantizer does (the same bytes).
    - ``accuracy_level``: MatMulNBits' attribute (4: int8 activations in the kernel); None/0 = unset.
    - ``exclude``: node names left as float MatMuls.
    - ``share_embedding``: a Gather (axis 0) whose table equals the transpose of a quantized MatMul
      weight (a tied embedding) becomes a ``GatherBlockQuantized`` reading that MatMul's packed weight,
      so the table is stored once, at the head's width. Other Gathers are left as they are.
    - ``weighted``: the search minimizes llama.cpp's weighted error (rms(block) + |x|), not the plain one.
    - ``plan``: weight initializer name -> (bits, block size), overriding ``bits``/``mixed`` for the weights it
      names (a calibrated mix, packager/export/calibrate/onnx_mix.py); ``importance``: weight initializer
      name -> its importance matrix [K], weighing the search's error as llama.cpp does with an imatrix.
    - ``tensors``: how initializers are read and the new ones made (:class:`InMemory` unless given).
    """
    from onnx import helper

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    start = time.perf_counter()
    tensors = tensors or InMemory()
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    excluded = set(exclude)
    nodes = list(graph.node)
    layers = _layer_count(n.name for n in nodes)
    eight = expand_patterns(eight_bit_patterns, layers) if mixed and bits != 8 else []

    # tied embeddings: Gather tables by shape, matched below against the transposed MatMul weights
    tables: dict[tuple[int, int], list[int]] = {}
    if share_embedding:
        for i, node in enumerate(nodes):
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if node.op_type == "Gather" and axis == 0 and node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
                tables.setdefault(tuple(inits[node.input[0]].dims), []).append(i)

    replaced: dict[int, list] = {}  # index of an original node -> the nodes that replace it
    done: dict[str, tuple] = {}  # weight initializer -> (bits, block, names of B / scales / zero points)
    nodes_info: dict[str, dict] = {}
    shared: dict[str, str] = {}
    new_inits = []
    sq_err = sq_ref = 0.0
    for index, node in enumerate(nodes):
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        tensor = inits.get(weight)
        if tensor is None or node.name in excluded or len(tensor.dims) != 2 or tensor.data_type != 1:  # 1: float32
            continue
        k, n = tensor.dims
        if weight in done:  # one weight, several MatMuls: quantized once, at its first node's width
            node_bits, node_block, names = done[weight]
        else:
            w = tensors.fetch(tensor)
            node_bits, node_block = (8, eight_bit_block_size) if any(p.search(node.name) for p in eight) else (bits, block_size)
            if plan and weight in plan:
                node_bits, node_block = plan[weight]
            if (n, k) in tables:  # a tied table can only be shared in whole blocks: a smaller block that divides K
                while node_block > 16 and k % node_block:
                    node_block //= 2
            packed, scales, zero_points = quantize_weight(w, node_bits, node_block, search=search, weighted=weighted,
                                                          importance=(importance or {}).get(weight))
            err, ref = weight_error(w, packed, scales, zero_points, node_bits)
            sq_err, sq_ref = sq_err + err, sq_ref + ref
            names = (f"{weight}_Q{node_bits}", f"{weight}_scales", f"{weight}_zero_points")
            new_inits += [tensors.emit(a, name) for a, name in zip((packed, scales, zero_points), names)]
            done[weight] = (node_bits, node_block, names)
            nodes_info[node.name or weight] = {"bits": node_bits, "block_size": node_block, "K": k, "N": n, "rel_mse": err / ref if ref else 0.0}
            for gi in tables.get((n, k), []) if k % node_block == 0 else []:
                g = nodes[gi]
                if gi in replaced or not tensors.same_table(inits[g.input[0]], tensor, w):
                    continue
                replaced[gi] = _shared_gather(g, names, scales, zero_points, node_bits, node_block, k, new_inits, tensors)
                shared[g.name or g.input[0]] = node.name or weight
                users[g.input[0]] -= 1
            del w
        attrs = dict(K=k, N=n, bits=node_bits, block_size=node_block)
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        replaced[index] = [helper.make_node(
            "MatMulNBits", [node.input[0], *names], list(node.output),
            name=f"{node.name}_Q{node_bits}" if node.name else "", domain=ONNX_DOMAIN, **attrs,
        )]
        users[weight] -= 1

    rebuilt = [x for i, node in enumerate(nodes) for x in replaced.get(i, [node])]
    graph.ClearField("node")
    graph.node.extend(rebuilt)
    unused = {name for name, count in users.items() if count <= 0}
    kept = [i for i in graph.initializer if i.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    for value in [v for v in graph.input if v.name in unused]:  # initializers listed as inputs (IR < 4)
        graph.input.remove(value)
    if not any(o.domain == ONNX_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ONNX_DOMAIN, 1))

    counts: dict[str, int] = {}
    for v in nodes_info.values():
        key = f"{v['bits']}-bit/{v['block_size']}"
        counts[key] = counts.get(key, 0) + 1
    eight_nodes = sorted(k for k, v in nodes_info.items() if v["bits"] == 8) if eight else []
    scheme = f"int{bits} weight-only, block {block_size}, asymmetric (MatMulNBits)"
    if eight_nodes:
        scheme += f"; 8-bit (block {eight_bit_block_size}) for {len(eight_nodes)} of {len(nodes_info)} MatMuls"
    if search:
        scheme += "; per-block scale/zero-point search"
    if shared:
        scheme += "; tied embedding read from the head's packed weight"
    info = {
        "scheme": scheme,
        "quantizer": "xpack onnx_quant (" + ("llama.cpp make_qkx2_quants-style search" if search else "round to nearest, as onnxruntime") + ")",
        "bits": bits,
        "block_size": block_size,
        "symmetric": False,
        "accuracy_level": accuracy_level,
        "search": {"grid": [RMIN, RDELTA, NSTEP], "error_weights": "rms(block) + |x|" if weighted else "uniform"} if search else None,
        "eight_bit_patterns": list(eight_bit_patterns) if eight else [],
        "eight_bit_block_size": eight_bit_block_size if eight else None,
        "eight_bit_nodes": eight_nodes,
        "node_counts": counts,
        "shared_embedding": shared,
        "weight_rel_mse": sq_err / sq_ref if sq_ref else 0.0,
        "nodes": nodes_info,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return model, info


def _shared_gather(g, names: tuple[str, str, str], scales, zero_points, bits: int, block: int, hidden: int, new_inits: list,
                   tensors: InMemory | None = None) -> list:
    """``Gather(table, ids)`` -> ``GatherBlockQuantized`` over the head's packed weight [V, k_blocks, blob], then a
    Reshape of [..., k_blocks, block] to [..., hidden] (hidden: whole blocks). The op wants its scales and zero
    points at data's rank ([V, k_blocks, 1]), MatMulNBits at rank 2: the head's own [V, k_blocks] scales (and, at
    8 bits, its zero points, whose layout is the same) are reshaped by a node onnxruntime folds into a constant at
    load, so the file holds them once; 4-bit zero points are packed two per byte for MatMulNBits and stored again
    unpacked (1 byte per block)."""
    import numpy as np
    from onnx import helper, numpy_helper

    b_name, head_scales, head_zero_points = names
    table, ids, out = g.input[0], g.input[1], g.output[0]
    n, k_blocks = scales.shape
    base = g.name or table
    shape3 = f"{table}_gather_shape"  # a Constant node, not an initializer: the export moves initializers to the external data
    s_name = f"{table}_gather_scales"
    nodes = [
        helper.make_node("Constant", [], [shape3], name=f"{base}/scales/Constant", value=numpy_helper.from_array(np.array([n, k_blocks, 1], np.int64), shape3)),
        helper.make_node("Reshape", [head_scales, shape3], [s_name], name=f"{base}/scales/Reshape"),
    ]
    z_name = f"{table}_gather_zero_points"
    if bits == 8:
        nodes.append(helper.make_node("Reshape", [head_zero_points, shape3], [z_name], name=f"{base}/zero_points/Reshape"))
    else:
        new_inits.append((tensors or InMemory()).emit(_unpack(zero_points, bits, k_blocks).reshape(n, k_blocks, 1).astype(np.uint8), z_name))
    hidden_c = f"{base}/hidden"
    return nodes + [
        helper.make_node("GatherBlockQuantized", [b_name, ids, s_name, z_name], [f"{base}/GatherBlockQuantized/output_0"],
                         name=f"{base}_GatherBlockQuantized", domain=ONNX_DOMAIN, gather_axis=0, quantize_axis=2, block_size=block, bits=bits),
        helper.make_node("Shape", [ids], [f"{base}/Shape/output_0"], name=f"{base}/Shape"),
        helper.make_node("Constant", [], [hidden_c], name=f"{base}/hidden/Constant", value=numpy_helper.from_array(np.array([hidden], np.int64), hidden_c)),
        helper.make_node("Concat", [f"{base}/Shape/output_0", hidden_c], [f"{base}/Concat/output_0"], name=f"{base}/Concat", axis=0),
        helper.make_node("Reshape", [f"{base}/GatherBlockQuantized/output_0", f"{base}/Concat/output_0"], [out], name=f"{base}/Reshape"),
    ]


def quantize_tables(model: "onnx.ModelProto", bits: int, block_size: int, *, search: bool = True, tensors: InMemory | None = None) -> list[str]:
    """Embedding Gathers (axis 0) over a float32 table that no MatMul shares -> ``GatherBlockQuantized`` over the table
    quantized as a MatMulNBits weight would be ([V, k_blocks, blob], asymmetric, ``search`` as in :func:`quantize_weight`),
    the layout a tied embedding reads from the head (:func:`_shared_gather`). One writer for every untied table, at 4
    and 8 bits, one tensor at a time. Returns the names of the new nodes."""
    from onnx import helper

    tensors = tensors or InMemory()
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    done, new_inits, rebuilt = [], [], []
    for node in graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = inits.get(node.input[0]) if node.op_type == "Gather" and axis == 0 else None
        if table is None or len(table.dims) != 2 or table.data_type != 1:
            rebuilt.append(node)
            continue
        rows, hidden = table.dims
        block = block_size
        while block > 16 and hidden % block:
            block //= 2
        if hidden % block:  # the gathered blocks are reshaped back to whole rows
            rebuilt.append(node)
            continue
        w = tensors.columns(table)  # [hidden, rows]: the table as the weight of a MatMul with one output per row
        packed, scales, zero_points = quantize_weight(w, bits, block, search=search)
        del w
        base = node.input[0]
        names = (f"{base}_Q{bits}", f"{base}_scales", f"{base}_zero_points")
        stored = 3 if bits == 8 else 2  # 4-bit zero points are read unpacked (_shared_gather stores them so)
        new_inits += [tensors.emit(a, name) for a, name in list(zip((packed, scales, zero_points), names))[:stored]]
        replacement = _shared_gather(node, names, scales, zero_points, bits, block, hidden, new_inits, tensors)
        rebuilt += replacement
        done.append(replacement[-1].name)
    if not done:
        return done
    graph.ClearField("node")
    graph.node.extend(rebuilt)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + [i for i in new_inits if i.name in used])
    if not any(o.domain == ONNX_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ONNX_DOMAIN, 1))
    return done
