"""The torch reference within a memory budget: its layers stream from the checkpoint's safetensors (issue #12).

A Gemma 3 4B reference is 17 GB in float32 and Llama 3.2 11B Vision 43 GB; the machines xpack targets have 16 GB.
With a budget (``TorchRuntime(max_memory=...)``, ``xpack verify --reference-memory``) the model is placed by a
device map that keeps everything outside the repeated layers in memory (embeddings, norms, the output head, the
projector) plus as many layers as the rest of the budget holds, and puts the other layers on accelerate's "disk"
device: transformers then reads those weights from the original safetensors files (no copy is written) and
accelerate's hooks load each layer, cast to the compute dtype, just before it runs and drop it after. The numbers
are the plain model's (the same float32 weights and kernels; a test compares them on the twins), only slower:
each forward re-reads the streamed layers (from the page cache when it holds them).

The token embedding and the output head stay resident, and for Gemma 3 4B they are one 262208 x 2560 table: 2.7 GB
in float32. When the checkpoint stores its weights in 16 bits (bf16 or fp16, as every released one does), a streamed
model holds those tables as stored (1.3 GB) and upcasts what each forward uses: the embedding's rows for the
tokens at hand, the head a block of rows at a time (:func:`with_stored_tables`). 16-bit to float32 is exact, so the
numbers are the float32 model's (a test compares them on the twins).

Why a device map of our own rather than ``device_map="auto"``: accelerate's ``infer_auto_device_map`` fills the
budget in module order, so with a tied embedding it can leave the output head on disk with no weight of its own
to read (transformers 4.57 then fails with ``KeyError: 'lm_head.weight'``), and it gives no clear error when even
one layer does not fit. Here the resident part is fixed, and a budget below it plus the largest layer is one line.
"""

from __future__ import annotations

import json
import struct
import types
from pathlib import Path

from xpack.errors import XpackError

GB = 1e9
HEAD_ROWS = 16384  # rows of a 16-bit output head upcast at once: 168 MB of float32 for Gemma 3's 2560 columns
SIXTEEN_BIT = {"BF16": "bfloat16", "F16": "float16"}


def _blocks(model) -> list[str]:
    """The repeated layers: every child of an ``nn.ModuleList`` (decoder, vision encoder, cross-attention layers)."""
    import torch

    found = [f"{name}.{child}" for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)
             for child, _ in module.named_children()]
    return [b for b in found if not any(b.startswith(f"{outer}.") for outer in found)]  # a list inside a layer moves with it


def _map(model, placed: dict[str, str]) -> dict[str, str]:
    """A device map covering every parameter and buffer: the blocks as ``placed``; every module holding no block on
    "cpu" (whole); the direct tensors of a module that holds blocks on "cpu", one key each."""
    device_map: dict[str, str] = {}
    holders = {p for b in placed for p in _prefixes(b)}

    def visit(prefix: str, module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full in placed:
                device_map[full] = placed[full]
            elif full in holders:
                visit(f"{full}.", child)
            else:
                device_map[full] = "cpu"
        for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            device_map[f"{prefix}{name}"] = "cpu"

    visit("", model)
    return device_map


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def stored_tables(folder: Path, dtype):
    """The 16-bit torch dtype every float tensor of the checkpoint in ``folder`` is stored in (from the safetensors
    headers) when the compute ``dtype`` is float32: the tables can then be held as stored. None otherwise."""
    import torch

    if dtype is not torch.float32:
        return None
    found = set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with open(path, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        except (OSError, ValueError, struct.error):
            return None  # the load itself says what is wrong with the file
        found.update(v["dtype"] for k, v in header.items() if k != "__metadata__" and v.get("dtype", "").startswith(("F", "BF")))
    if len(found) != 1 or next(iter(found)) not in SIXTEEN_BIT:
        return None
    return getattr(torch, SIXTEEN_BIT[found.pop()])


def _tables(model) -> list:
    """The token embedding and, when it has a weight of its own, the output head."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    return [embedding] + ([head] if head is not None and head.weight is not embedding.weight else [])


def _hold_as(model, table_dtype) -> None:
    import torch

    for module in _tables(model):
        module.weight = torch.nn.Parameter(module.weight.to(table_dtype), requires_grad=False)


def _embedding_forward(self, input_ids):
    """The module's own forward (Gemma's scaling included) on a float32 table of just the rows ``input_ids`` use."""
    import torch

    rows, inverse = torch.unique(input_ids, return_inverse=True)
    held, padding = self._parameters["weight"], getattr(self, "padding_idx", None)
    self._parameters["weight"] = torch.nn.Parameter(held[rows].float(), requires_grad=False)
    self.padding_idx = None  # it only stops the gradient of its row, and names a row of the whole table (Mllama's 128004)
    try:
        return type(self).forward(self, inverse)
    finally:
        self._parameters["weight"], self.padding_idx = held, padding


def _head_forward(self, hidden):
    """``hidden @ W.T (+ b)`` in float32, HEAD_ROWS output rows of the 16-bit weight upcast at a time."""
    import torch
    from torch.nn import functional

    w = self.weight
    out = torch.cat([functional.linear(hidden, w[i:i + HEAD_ROWS].float()) for i in range(0, w.shape[0], HEAD_ROWS)], dim=-1)
    return out if getattr(self, "bias", None) is None else out + self.bias.float()


def with_stored_tables(model_class, table_dtype):
    """A subclass of ``model_class`` whose token embedding and output head are created, loaded and held in
    ``table_dtype`` (the checkpoint's own 16-bit type) and computed in float32: transformers loads a parameter in the
    dtype the model created it with, so the float32 copy of the tables is never made. Loaded in their stored type, the
    tables are views into the safetensors file transformers mapped, which would keep the whole mapping, and every
    page of it the load touched, in the resident set: they get memory of their own once loaded."""

    class HeldTables(model_class):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            _hold_as(self, table_dtype)
            self.tie_weights()  # a tied head takes the held table again
            embedding, head = self.get_input_embeddings(), self.get_output_embeddings()
            embedding.forward = types.MethodType(_embedding_forward, embedding)
            if head is not None:
                head.forward = types.MethodType(_head_forward, head)

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            loaded = super().from_pretrained(*args, **kwargs)  # (model, loading info) with output_loading_info
            for module in _tables(loaded[0] if isinstance(loaded, tuple) else loaded):
                module.weight.data = module.weight.data.clone()
            return loaded

    HeldTables.__name__ = HeldTables.__qualname__ = model_class.__name__
    HeldTables.__module__ = model_class.__module__
    return HeldTables


def concrete_class(model_class, folder: Path):
    """The model class an Auto class picks for the checkpoint in ``folder`` (a subclass needs the real one)."""
    from transformers import AutoConfig

    if not getattr(model_class, "_model_mapping", None):
        return model_class
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    return model_class._model_mapping[type(config)]


def layer_sizes(model_class, folder: Path, dtype, table_dtype=None) -> tuple:
    """(meta model, accelerate's module sizes in ``dtype``, the repeated layers) of the checkpoint in ``folder``: built on
    the meta device from its config, nothing read. ``table_dtype``: the embedding and head held in it (:func:`stored_tables`)."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    build = getattr(model_class, "from_config", None) or model_class._from_config  # an Auto class, or a model class itself
    with init_empty_weights():
        model = build(config)
    # in ``dtype`` itself: the meta model takes the config's dtype (bfloat16 for real checkpoints), and accelerate's
    # ``dtype`` argument only ever lowers a size, so a float32 plan of a bf16 checkpoint counted half the bytes
    model.to(dtype)
    model.tie_weights()
    if table_dtype is not None:
        _hold_as(model, table_dtype)
        model.tie_weights()
    return model, compute_module_sizes(model), _blocks(model)


def streamed_device_map(model_class, folder: Path, dtype, budget: int, table_dtype=None) -> dict[str, str] | None:
    """The device map that keeps the reference of ``folder`` within ``budget`` bytes of weights, or None when the whole
    model fits (a plain load). ``table_dtype``: the model is loaded :func:`with_stored_tables` when it streams."""
    if layer_sizes(model_class, folder, dtype)[1][""] <= budget:
        return None
    model, sizes, blocks = layer_sizes(model_class, folder, dtype, table_dtype)
    total = sizes[""]
    if total <= budget:
        return None
    resident = total - sum(sizes[b] for b in blocks)
    largest = max((sizes[b] for b in blocks), default=0)
    if resident + largest > budget:
        raise XpackError(
            f"the torch reference needs at least {(resident + largest) / GB:.1f} GB even with its layers streamed from disk "
            f"(embeddings, head and one layer in {str(dtype).replace('torch.', '')}), above the {budget / GB:.1f} GB it may use; "
            "raise --reference-memory or free memory"
        )
    placed, left = {}, budget - resident
    for b in blocks:  # the first layers stay, the rest stream: one layer of scratch is always left
        keep = sizes[b] <= left - largest
        placed[b] = "cpu" if keep else "disk"
        left -= sizes[b] if keep else 0
    return _map(model, placed)


def lean_device_map(model_class, folder: Path, dtype, table_dtype=None) -> dict[str, str] | None:
    """The least memory a forward can use: every repeated layer streamed, everything else resident (for a check on a
    few tokens, where the speed of each forward does not matter: the ONNX export's torch check). None when the whole
    model takes no more than twice that. ``table_dtype``: the model is loaded :func:`with_stored_tables`."""
    model, sizes, blocks = layer_sizes(model_class, folder, dtype, table_dtype)
    resident = sizes[""] - sum(sizes[b] for b in blocks)
    least = resident + max((sizes[b] for b in blocks), default=0)
    if layer_sizes(model_class, folder, dtype)[1][""] <= 2 * least:
        return None
    return _map(model, {b: "disk" for b in blocks})


def describe(device_map: dict[str, str]) -> str:
    """One line for the report: how many layers streamed."""
    streamed = sum(1 for d in device_map.values() if d == "disk")
    return f"{streamed} of its layers streamed from the safetensors files at each forward, to stay within the memory budget"


def return_freed_memory() -> None:
    """Collect the closed model's reference cycles (accelerate's hooks hold their modules) and hand the freed heap
    back to the OS (glibc keeps small freed blocks in its arenas), so that what runs next in the process, e.g. the
    artifact in ``xpack verify`` or the ONNX graph of an export, does not sit on top of the reference's memory."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


HEAD_CHUNKS = "xpack_head_chunks"  # the name transformers' AttentionInterface knows head_chunked_attention by


def head_chunked_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' ``eager_attention_forward`` (float32 softmax, additive mask, no dropout in eval) computed one head at
    a time: the same numbers, with one head's [queries, keys] scores in memory instead of all of them.

    Why: Llama 3.2 11B Vision's tower attends over its 4 tiles at once (6432 patches), and eager attention holds
    16 x 6432^2 float32 scores (2.6 GB) two or three times over; one head at a time holds 165 MB. What is traced from it
    (the mllama ONNX vision graph) runs the same way in onnxruntime. transformers' sdpa would not do: on CPU with a mask
    its kernel materializes the scores too."""
    import torch

    groups = query.shape[1] // key.shape[1]
    outputs = []
    for h in range(query.shape[1]):
        k, v = key[:, h // groups : h // groups + 1], value[:, h // groups : h // groups + 1]
        scores = torch.matmul(query[:, h : h + 1], k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : k.shape[-2]]
        scores = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        outputs.append(torch.matmul(scores, v))
    return torch.cat(outputs, dim=1).transpose(1, 2).contiguous(), None


def chunk_vision_attention(model) -> None:
    """Have a vision model's tower (its ``config.vision_config``) attend one head at a time (:func:`head_chunked_attention`)."""
    from transformers import AttentionInterface

    vision = getattr(model.config, "vision_config", None)
    if vision is None:
        return
    AttentionInterface.register(HEAD_CHUNKS, head_chunked_attention)
    vision._attn_implementation = HEAD_CHUNKS
