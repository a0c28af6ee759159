"""GPU memory this process holds, as nvidia-smi reports it (the runtimes' ``peak_gpu_mb``)."""

from __future__ import annotations

import os
import shutil
import subprocess


def process_gpu_mb() -> float | None:
    """MB of GPU memory held by this process, or None without nvidia-smi or without any GPU memory.

    nvidia-smi rather than NVML's Python bindings: it ships with every driver, where pynvml would be
    one more dependency. llama.cpp allocates its buffers up front and onnxruntime's CUDA arena only
    grows, so for those runtimes this is also the peak."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [float(mem) for pid, _, mem in (line.partition(",") for line in out.splitlines()) if pid.strip() == str(os.getpid())]
    return sum(used) if used else None
