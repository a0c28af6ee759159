"""dequant(quant(W)): the base weights a QLoRA adapter was trained on, as bitsandbytes 0.50.2 computes them on CPU.

A QLoRA adapter learned to correct the 4-bit base, dequant(quant(W)), not W; merging it into W adds
W - dequant(quant(W)), a term it never saw (issue #15). ``xpack merge --qlora-base`` adds the deltas
to dequant(quant(W)) instead, computed here in numpy, one tensor at a time.

Why not bitsandbytes itself: merging runs where neither torch nor bitsandbytes is installed.
tests/test_qlora.py checks this module bit for bit against bitsandbytes' ``quantize_4bit`` +
``dequantize_4bit`` on CPU for every quantized tensor of the twins and the demo model.

What bitsandbytes 0.50.2 does on CPU, and so what this module does:

1. ``quantize_4bit`` (its torch "default" kernel): W in fp32 (a bf16 or fp16 tensor widened exactly),
   flattened row-major, in blocks of ``blocksize``; ``absmax`` per block; each value scaled by
   ``1 / absmax`` (the last, partial block: divided by its absmax), clamped to [-1, 1], and given
   the code book entry whose bucket holds it, the buckets split at the midpoints of the sorted code
   book, a value on a midpoint going to the lower entry (``torch.bucketize``).
2. ``compress_statistics=True`` (``bnb_4bit_use_double_quant``): ``offset`` = the mean of the
   absmax (fp32, summed in the order torch sums on CPU), and ``absmax - offset`` quantized to 8 bits
   with the signed dynamic code book in blocks of 256 by the C kernel ``quantize_cpu``: a 65536-bin
   lookup table over [-1, 1], not the nearest entry (a value near 0 lands on 2.1e-5, not on 0).
   Dequantized: code[q] * absmax2 + offset.
3. ``dequantize_4bit``: code[q] * absmax of the element's block in fp32, then rounded to the dtype W
   was loaded in (bfloat16: to nearest even). xpack keeps the fp32 value, adds the LoRA delta, and
   rounds once. The blocks are the flat ones of step 1, as CUDA (where adapters are trained) and
   bitsandbytes' own reference kernel read them; its AVX-512 CPU kernel reads the absmax per row,
   which differs where a row is not a whole number of blocks (tests/test_qlora.py).

Which dtype matters: transformers casts each weight to ``from_pretrained(dtype=...)`` (float16 when
none is given) before quantizing, and bitsandbytes quantizes ``W.float()``. A bf16 checkpoint
therefore quantizes the same whether it was loaded as bf16 or fp32; xpack quantizes each tensor from
the dtype it is stored in (an fp32 checkpoint loaded as bf16 for training was rounded first: not covered).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from xpack.errors import XpackError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
DEFAULT_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256  # quantize_4bit(compress_statistics=True) quantizes the absmax in blocks of 256

# bitsandbytes.functional.get_4bit_type: NF4 as listed, FP4 in bit-pattern order before dividing by 12.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

# The positive half of bitsandbytes.functional.create_dynamic_map() (signed, 8 bits): 127 fp32 values,
# exactly as torch's CPU linspace and rounding made them. Stored rather than recomputed: torch's fp32
# linspace rounds some points differently from the textbook formula, and the code book must be bitwise
# the one bitsandbytes uses. The whole map is [-reversed(these), 0, these, 1.0].
_DYNAMIC_POSITIVE = """
    0x1.27476ep-21 0x1.b43528p-19 0x1.040bfep-17 0x1.64840cp-16 0x1.6f0068p-15 0x1.15df66p-14
    0x1.743e96p-14 0x1.47ae16p-13 0x1.19ce0ap-12 0x1.8fc506p-12 0x1.02de02p-11 0x1.3dd982p-11
    0x1.78d500p-11 0x1.b3d07cp-11 0x1.eecbfep-11 0x1.4fdf3ap-10 0x1.e353f8p-10 0x1.3b645ap-9
    0x1.851eb8p-9 0x1.ced914p-9 0x1.0c49bap-8 0x1.3126e8p-8 0x1.56041ap-8 0x1.7ae148p-8
    0x1.9fbe76p-8 0x1.c49ba6p-8 0x1.e978d4p-8 0x1.072b02p-7 0x1.19999ap-7 0x1.2c0830p-7
    0x1.3e76c8p-7 0x1.75c290p-7 0x1.d1eb86p-7 0x1.170a3ep-6 0x1.451ebap-6 0x1.733334p-6
    0x1.a147aep-6 0x1.cf5c2ap-6 0x1.fd70a4p-6 0x1.15c290p-5 0x1.2ccccep-5 0x1.43d70ap-5
    0x1.5ae146p-5 0x1.71eb86p-5 0x1.88f5c2p-5 0x1.ap-5 0x1.b70a3ep-5 0x1.ce147ap-5
    0x1.e51ebap-5 0x1.fc28f6p-5 0x1.09999ap-4 0x1.151ebap-4 0x1.20a3d6p-4 0x1.2c28f6p-4
    0x1.37ae14p-4 0x1.433334p-4 0x1.4eb854p-4 0x1.5a3d70p-4 0x1.65c290p-4 0x1.7147aep-4
    0x1.7ccccep-4 0x1.8851eep-4 0x1.93d70ap-4 0x1.b66668p-4 0x1.fp-4 0x1.14ccccp-3
    0x1.31999ap-3 0x1.4e6666p-3 0x1.6b3334p-3 0x1.880000p-3 0x1.a4ccccp-3 0x1.c1999ap-3
    0x1.de6666p-3 0x1.fb3332p-3 0x1.0c0000p-2 0x1.1a6668p-2 0x1.28ccccp-2 0x1.373334p-2
    0x1.459998p-2 0x1.540000p-2 0x1.626666p-2 0x1.70ccccp-2 0x1.7f3334p-2 0x1.8d9998p-2
    0x1.9c0000p-2 0x1.aa6666p-2 0x1.b8ccccp-2 0x1.c73334p-2 0x1.d59998p-2 0x1.e40000p-2
    0x1.f26664p-2 0x1.006666p-1 0x1.079998p-1 0x1.0eccccp-1 0x1.160000p-1 0x1.1d3334p-1
    0x1.246668p-1 0x1.2b999ap-1 0x1.32ccccp-1 0x1.3a0000p-1 0x1.413334p-1 0x1.486668p-1
    0x1.4f999ap-1 0x1.56ccccp-1 0x1.5e0000p-1 0x1.653334p-1 0x1.6c6668p-1 0x1.73999ap-1
    0x1.7accccp-1 0x1.820000p-1 0x1.893334p-1 0x1.906666p-1 0x1.97999ap-1 0x1.9eccccp-1
    0x1.a60000p-1 0x1.ad3334p-1 0x1.b46666p-1 0x1.bb999ap-1 0x1.c2ccccp-1 0x1.ca0000p-1
    0x1.d13334p-1 0x1.d86666p-1 0x1.df999ap-1 0x1.e6ccccp-1 0x1.ee0000p-1 0x1.f53334p-1
    0x1.fc6666p-1
"""


@dataclass(frozen=True)
class QloraBase:
    """How the base was quantized for training: ``BitsAndBytesConfig(bnb_4bit_quant_type=quant_type,
    bnb_4bit_use_double_quant=double_quant)`` with bitsandbytes' block size (64 unless changed)."""

    quant_type: str
    double_quant: bool = False
    blocksize: int = DEFAULT_BLOCKSIZE

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise XpackError(f"unknown --qlora-base {self.quant_type!r}; choose nf4 or fp4 (bitsandbytes' bnb_4bit_quant_type)")
        if self.blocksize not in BLOCKSIZES:
            raise XpackError(
                f"--qlora-blocksize {self.blocksize} is not a bitsandbytes 4-bit block size; choose one of {', '.join(map(str, BLOCKSIZES))}"
            )

    def describe(self) -> dict:
        """What a manifest records about the merge base."""
        return {"qlora_base": self.quant_type, "double_quant": self.double_quant, "blocksize": self.blocksize}

    @property
    def label(self) -> str:
        """``nf4, double quantization, blocksize 64``: the words a card and a note use."""
        dq = "double quantization" if self.double_quant else "no double quantization"
        return f"{self.quant_type}, {dq}, blocksize {self.blocksize}"


def dequant_quant(w: "np.ndarray", base: QloraBase, *, sum_threads: int = 1) -> "np.ndarray":
    """dequant(quant(``w``)) in float32, ``w``'s shape: the weight a model loaded 4-bit with ``base`` computes with.

    ``w`` holds float32 values (a bf16/fp16 tensor widened exactly). ``sum_threads``: the torch
    thread count whose CPU sum order the double quantization's absmax mean follows (it only matters
    above 32768 blocks, where torch splits the sum between threads); 1 is torch's order on one thread.
    """
    import numpy as np

    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    absmax = _absmax(flat, base.blocksize)
    codes = _quantize_4bit(flat, absmax, base)
    if base.double_quant:
        absmax = _double_quant(absmax, sum_threads)
    out = _dequantize_4bit(codes, absmax, base)
    return out.reshape(w.shape)


# ---------------------------------------------------------------------------------------------------
# 4-bit: bitsandbytes/backends/default/ops.py (quantize_4bit) and csrc/cpu_ops.cpp (dequantizeBlockwise4bitCpu)
# ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def code_book(quant_type: str) -> "np.ndarray":
    """The 16 code values of ``quant_type`` as bitsandbytes' get_4bit_type makes them (fp32, divided by their absmax)."""
    import numpy as np

    data = np.array(_NF4 if quant_type == "nf4" else _FP4, dtype=np.float32)
    return data / np.abs(data).max()


@lru_cache(maxsize=None)
def _buckets(quant_type: str) -> tuple["np.ndarray", "np.ndarray"]:
    """The midpoints between the sorted code values, and the code index of each sorted position (FP4 is not sorted)."""
    import numpy as np

    code = code_book(quant_type)
    order = np.argsort(code, kind="stable")  # torch.argsort's order here, the two zeros of FP4 included
    sorted_code = code[order]
    return (sorted_code[:-1] + sorted_code[1:]) / np.float32(2), order.astype(np.uint8)


_CHUNK = 1 << 20  # elements quantized at a time: the temporaries stay a few MB, whatever the tensor
_TINY = 1e-38  # bitsandbytes' absmax.clamp(min=1e-38): an all-zero block scales to 0 instead of dividing by 0


def _absmax(flat: "np.ndarray", blocksize: int) -> "np.ndarray":
    """The absmax of each block; the last, partial block's is stored clamped to 1e-38, the full blocks' as they are."""
    import numpy as np

    full = flat.size - flat.size % blocksize
    out = np.abs(flat[:full].reshape(-1, blocksize)).max(axis=1)
    if full < flat.size:
        out = np.append(out, np.maximum(np.abs(flat[full:]).max(), np.float32(_TINY)))
    return out.astype(np.float32, copy=False)


def _quantize_4bit(flat: "np.ndarray", absmax: "np.ndarray", base: QloraBase) -> "np.ndarray":
    """The 4-bit code index of every element (uint8, unpacked), as bitsandbytes' default quantize_4bit kernel picks it."""
    import numpy as np

    bounds, order = _buckets(base.quant_type)
    bs = base.blocksize
    tiny = np.float32(_TINY)
    full_blocks = flat.size // bs
    codes = np.empty(flat.size, dtype=np.uint8)
    step = max(1, _CHUNK // bs)
    for b0 in range(0, full_blocks, step):
        b1 = min(full_blocks, b0 + step)
        inv = np.float32(1) / np.maximum(absmax[b0:b1], tiny)
        scaled = flat[b0 * bs : b1 * bs].reshape(-1, bs) * inv[:, None]
        np.clip(scaled, -1, 1, out=scaled)
        codes[b0 * bs : b1 * bs] = np.searchsorted(bounds, scaled.reshape(-1), side="left")
    if full_blocks * bs < flat.size:  # the last, partial block is divided by its absmax, not multiplied
        tail = flat[full_blocks * bs :] / absmax[-1]  # clamped already
        codes[full_blocks * bs :] = np.searchsorted(bounds, np.clip(tail, -1, 1), side="left")
    return codes if base.quant_type == "nf4" else order[codes]  # NF4's code book is sorted already


def _dequantize_4bit(codes: "np.ndarray", absmax: "np.ndarray", base: QloraBase) -> "np.ndarray":
    """code[q] * absmax of its block, in fp32."""
    import numpy as np

    code = code_book(base.quant_type)
    bs = base.blocksize
    out = np.empty(codes.size, dtype=np.float32)
    full_blocks = codes.size // bs
    step = max(1, _CHUNK // bs)
    for b0 in range(0, full_blocks, step):
        b1 = min(full_blocks, b0 + step)
        block = code[codes[b0 * bs : b1 * bs]].reshape(-1, bs)
        np.multiply(block, absmax[b0:b1, None], out=out[b0 * bs : b1 * bs].reshape(-1, bs))
    if full_blocks * bs < codes.size:
        out[full_blocks * bs :] = code[codes[full_blocks * bs :]] * absmax[-1]
    return out


# ---------------------------------------------------------------------------------------------------
# Double quantization: the absmax, minus its mean, in 8 bits (csrc/cpu_ops.cpp quantize_cpu_impl)
# ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def dynamic_code_book() -> "np.ndarray":
    """bitsandbytes.functional.create_dynamic_map() (signed, 8 bits): 256 sorted fp32 values in [-1, 1]."""
    import numpy as np

    positive = np.array([float.fromhex(h) for h in _DYNAMIC_POSITIVE.split()], dtype=np.float32)
    return np.concatenate([-positive[::-1], [0.0], positive, [1.0]]).astype(np.float32)


_LUT_SIZE = 65536


@lru_cache(maxsize=1)
def _dynamic_lut() -> "np.ndarray":
    """quantize_cpu's lookup table: bin i (the value -1 + 2i/65535) -> the first code whose upper midpoint is >= it."""
    import numpy as np

    code = dynamic_code_book()
    midpoints = np.float32(0.5) * (code[:-1] + code[1:])
    i = np.arange(_LUT_SIZE, dtype=np.float32)
    values = np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(_LUT_SIZE - 1)
    return np.searchsorted(midpoints, values, side="left").astype(np.uint8)


def _lut_index(normed: "np.ndarray") -> "np.ndarray":
    """quantize_cpu's norm_to_lut_index: (clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5 in fp32, truncated.

    (Whether the compiler fuses the last multiply-add or not gives the same bin: 0.5 lies on the
    product's float32 grid, so the second rounding adds nothing.)
    """
    import numpy as np

    half = (np.clip(normed, -1, 1) + np.float32(1)) * np.float32(0.5)
    return (half * np.float32(_LUT_SIZE - 1) + np.float32(0.5)).astype(np.uint16)


def _quantize_dynamic(x: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
    """8-bit codes and per-256 absmax of ``x`` (fp32), as bitsandbytes' quantize_blockwise on CPU."""
    import numpy as np

    n = x.size
    blocks = -(-n // NESTED_BLOCKSIZE)
    padded = np.zeros(blocks * NESTED_BLOCKSIZE, dtype=np.float32)
    padded[:n] = x
    padded = padded.reshape(blocks, NESTED_BLOCKSIZE)
    absmax = np.abs(padded).max(axis=1)
    zero = absmax == 0
    inv = np.float32(1) / np.where(zero, np.float32(1), absmax)
    codes = _dynamic_lut()[_lut_index(padded * inv[:, None])]
    codes[zero] = 0  # an all-zero block stores code 0 (its absmax 0 makes it 0 again)
    return codes.reshape(-1)[:n], absmax


def _double_quant(absmax: "np.ndarray", sum_threads: int) -> "np.ndarray":
    """The absmax as the 4-bit dequantization sees it after quantize_4bit(compress_statistics=True)."""
    import numpy as np

    offset = torch_mean_f32(absmax, sum_threads)
    codes, absmax2 = _quantize_dynamic(absmax - offset)
    scale = np.repeat(absmax2, NESTED_BLOCKSIZE)[: codes.size]
    return dynamic_code_book()[codes] * scale + offset


# ---------------------------------------------------------------------------------------------------
# torch's float32 sum on CPU (aten/src/ATen/native/cpu/SumKernel.cpp cascade_sum), for the mean
# ---------------------------------------------------------------------------------------------------
# The absmax mean is one number; an ulp of difference moves every dequantized weight by an ulp, so the
# order of the additions is part of the result. torch 2.13 sums float32 in 8-lane vectors (measured on
# an AVX-512 machine too), four vectors at a time, in a cascade of partial sums.

_LANES = 8
_GRAIN = 32768  # at::internal::GRAIN_SIZE: below it torch sums on one thread


def torch_mean_f32(x: "np.ndarray", threads: int = 1) -> "np.float32":
    """``torch.tensor(x).mean()`` for a 1-D float32 ``x`` on CPU, bit for bit, with ``threads`` torch threads."""
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    if n < _GRAIN or threads <= 1:
        total = _cascade_sum(x)
    else:  # two-pass reduction: one partial sum per thread's chunk, then the partials in order
        used = min(threads, -(-n // _GRAIN))
        chunk = -(-n // used)
        total = np.float32(0)
        for start in range(0, n, chunk):
            total = np.float32(total + _cascade_sum(x[start : start + chunk]))
    return np.float32(total / np.float32(n))


def _cascade_sum(x: "np.ndarray") -> "np.float32":
    """One thread's sum: vectorized_inner_sum (8-lane vectors) or, below 8 elements, the scalar row_sum."""
    import numpy as np

    n = x.size
    if n < _LANES:
        return np.float32(_row_sum(x.reshape(n, 1))[0])
    nvec = n // _LANES
    lanes = _row_sum(x[: nvec * _LANES].reshape(nvec, _LANES))
    total = np.float32(0)
    for v in x[nvec * _LANES :]:  # the scalar tail first, then the lanes, one by one
        total = np.float32(total + v)
    for v in lanes:
        total = np.float32(total + v)
    return total


def _row_sum(rows: "np.ndarray") -> "np.ndarray":
    """row_sum: the rows as (-1, 4) groups summed by multi_row_sum, leftovers into the first, then the four added."""
    size = rows.shape[0] // 4
    partial = _multi_row_sum(rows[: size * 4].reshape(size, 4, rows.shape[1]))
    for row in rows[size * 4 :]:
        partial[0] += row
    for k in range(1, 4):
        partial[0] += partial[k]
    return partial[0]


def _multi_row_sum(groups: "np.ndarray") -> "np.ndarray":
    """multi_row_sum: 4 levels of accumulators; level 0 takes 2^p rows, then carries into the levels above."""
    import numpy as np

    size = groups.shape[0]
    levels = 4
    power = max(4, (max(size - 1, 0)).bit_length() // levels)  # max(4, CeilLog2(size) / 4)
    step = 1 << power
    mask = step - 1
    acc = np.zeros((levels, *groups.shape[1:]), dtype=np.float32)
    i = 0
    while i + step <= size:
        for row in groups[i : i + step]:
            acc[0] += row
        i += step
        for j in range(1, levels):
            acc[j] += acc[j - 1]
            acc[j - 1] = 0
            if i & (mask << (j * power)):
                break
    for row in groups[i:]:
        acc[0] += row
    for j in range(1, levels):
        acc[0] += acc[j]
    return acc[0]
