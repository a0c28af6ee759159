"""Whether a job fits in this machine's memory, said in one line before any work instead of an out-of-memory kill
halfway through (issue #12). The sizes come from the checkpoint's safetensors headers (exact parameter counts), times
what each job was measured to hold:

- ONNX export: ONNX_EXPORT_FACTOR x the weights in float32. Measured on real Gemma 3 270M (1.07 GB of float32 weights):
  6.3-6.6 GB peak RSS for --bits 32, 16, 8 and 4; the torch check, the graph proto and the quantizer each hold a copy.
  (Streaming the export one tensor at a time is #12's next step; this estimate goes with it.)
- verify on a CPU profile: the torch reference in float32 + REFERENCE_OVERHEAD_GB (activations and the logits over the
  evaluation text, the runtimes themselves; the artifact runs after the reference is let go). When that exceeds what
  is available, or ``--reference-memory``, the reference streams its layers from disk within the budget
  (runtimes/torch_offload.py) instead of being refused.
Merge and GGUF export stream one tensor at a time and are not checked.
"""

from __future__ import annotations

from pathlib import Path

from xpack.errors import XpackError
from xpack.packager.io.checkpoint import Checkpoint

ONNX_EXPORT_FACTOR = 6.2
REFERENCE_OVERHEAD_GB = 1.0


def float32_bytes(ckpt: Checkpoint) -> int:
    """The checkpoint's weights in float32: 4 bytes per parameter, whatever they are stored in."""
    total = 0
    for spec in ckpt.specs.values():
        n = 4
        for d in spec.shape:
            n *= d
        total += n
    return total


def available_bytes() -> int:
    """Memory this machine can give a new job now (psutil's ``available``: free + reclaimable cache)."""
    import psutil

    return int(psutil.virtual_memory().available)


def require_memory(need: int, what: str, fix: str) -> None:
    """One line and no work when ``need`` bytes exceed what is available."""
    have = available_bytes()
    if need > have:
        raise XpackError(f"{what} needs about {need / 1e9:.1f} GB of memory and this machine has {have / 1e9:.1f} GB available; {fix}")


def check_onnx_export(ckpt: Checkpoint, arch_name: str) -> None:
    weights = float32_bytes(ckpt)
    require_memory(int(ONNX_EXPORT_FACTOR * weights), f"exporting {arch_name} ({weights / 4e9:.1f}B parameters) to ONNX",
                   "export GGUF (it streams one tensor at a time), or use a machine with more memory")


def reference_budget(reference: Path, cap_gb: float | None = None) -> int | None:
    """verify on a CPU profile: the bytes of float32 weights the torch reference may hold, or None when the whole model
    fits (what is available, less REFERENCE_OVERHEAD_GB, capped at ``cap_gb``). A budget makes it stream its layers."""
    weights = float32_bytes(Checkpoint(Path(reference)))
    budget = available_bytes() - int(REFERENCE_OVERHEAD_GB * 1e9)
    if cap_gb is not None:
        budget = min(budget, int(cap_gb * 1e9) - int(REFERENCE_OVERHEAD_GB * 1e9))
    return None if weights <= budget else max(budget, 0)
