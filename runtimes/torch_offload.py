"""The torch reference within a memory budget: its layers stream from the checkpoint's safetensors (issue #12).

A Gemma 3 4B reference is 17 GB in float32 and Llama 3.2 11B Vision 43 GB; the machines xpack targets have 16 GB.
With a budget (``TorchRuntime(max_memory=...)``, ``xpack verify --reference-memory``) the model is placed by a
device map that keeps everything outside the repeated layers in memory (embeddings, norms, the output head, the
projector) plus as many layers as the rest of the budget holds, and puts the other layers on accelerate's "disk"
device: transformers then reads those weights from the original safetensors files (no copy is written) and
accelerate's hooks load each layer, cast to the compute dtype, just before it runs and drop it after. The numbers
are the plain model's (the same float32 weights and kernels; a test compares them on the twins), only slower:
each forward re-reads the streamed layers (from the page cache when it holds them).

Why a device map of our own rather than ``device_map="auto"``: accelerate's ``infer_auto_device_map`` fills the
budget in module order, so with a tied embedding it can leave the output head on disk with no weight of its own
to read (transformers 4.57 then fails with ``KeyError: 'lm_head.weight'``), and it gives no clear error when even
one layer does not fit. Here the resident part is fixed, and a budget below it plus the largest layer is one line.
"""

from __future__ import annotations

from pathlib import Path

from xpack.errors import XpackError

GB = 1e9


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


def layer_sizes(model_class, folder: Path, dtype) -> tuple:
    """(meta model, accelerate's module sizes in ``dtype``, the repeated layers) of the checkpoint in ``folder``: built on
    the meta device from its config, nothing read."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with init_empty_weights():
        model = model_class.from_config(config)
    # in ``dtype`` itself: the meta model takes the config's dtype (bfloat16 for real checkpoints), and accelerate's
    # ``dtype`` argument only ever lowers a size, so a float32 plan of a bf16 checkpoint counted half the bytes
    model.to(dtype)
    model.tie_weights()
    return model, compute_module_sizes(model), _blocks(model)


def streamed_device_map(model_class, folder: Path, dtype, budget: int) -> dict[str, str] | None:
    """The device map that keeps the reference of ``folder`` within ``budget`` bytes of weights, or None when the whole
    model fits (a plain load)."""
    model, sizes, blocks = layer_sizes(model_class, folder, dtype)
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


def lean_device_map(model_class, folder: Path, dtype) -> tuple[dict[str, str] | None, int]:
    """The least memory a forward can use: every repeated layer streamed, everything else resident (for a check on a
    few tokens, where the speed of each forward does not matter: the ONNX export's torch check). None when the whole
    model takes no more than twice that. Returns the map and the bytes of weights it holds at most."""
    model, sizes, blocks = layer_sizes(model_class, folder, dtype)
    resident = sizes[""] - sum(sizes[b] for b in blocks)
    least = resident + max((sizes[b] for b in blocks), default=0)
    if sizes[""] <= 2 * least:
        return None, sizes[""]
    return _map(model, {b: "disk" for b in blocks}), least


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
