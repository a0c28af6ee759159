"""Whether a job fits in this machine's memory, said in one line before any work instead of an out-of-memory kill
halfway through (issue #12). The sizes come from the checkpoint's safetensors headers (exact parameter counts), times
what each job was measured to hold:

- ONNX export: ONNX_EXPORT_FACTOR x the weights in float32. Measured on real Gemma 3 270M (1.07 GB of float32 weights):
  6.3-6.6 GB peak RSS for --bits 32, 16, 8 and 4; the torch check, the graph proto and the quantizer each hold a copy.
  (Streaming the export one tensor at a time is #12's next step; this estimate goes with it.)
- verify on a CPU profile: the torch reference in float32 + the artifact's files + REFERENCE_OVERHEAD_GB
  (activations over the evaluation text, the runtimes themselves).
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


def check_cpu_reference(reference: Path, artifact: Path) -> None:
    """verify on a CPU profile: the torch reference in float32 beside the artifact."""
    weights = float32_bytes(Checkpoint(Path(reference)))
    artifact = Path(artifact)
    files = sum(p.stat().st_size for p in artifact.iterdir() if p.is_file()) if artifact.is_dir() else artifact.stat().st_size
    require_memory(weights + files + int(REFERENCE_OVERHEAD_GB * 1e9), f"verifying against the float32 torch reference ({weights / 1e9:.1f} GB)",
                   "verify on a GPU profile (t4, a100), or on a machine with more memory")
