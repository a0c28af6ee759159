"""The machine a profile runs on: cores, memory and GPUs, which shipped profile fits it, and how a
profile is adapted to it (threads clamped to the cores here; a GPU profile without a GPU is an error).

Nothing here imports torch: GPUs are seen through ``nvidia-smi`` and ``/proc/driver/nvidia``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from xpack.errors import XpackError
from xpack.profiles.cgroup_memory import cgroup_memory
from xpack.profiles.profile import Profile, load_profile

__all__ = ["Gpu", "Machine", "machine_info", "detect_profile", "resolve_for_machine"]

BIG_GPU_GB = 40  # a GPU with at least this much memory gets the a100 profile, a smaller one t4


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float | None  # None when only /proc/driver/nvidia was readable


@dataclass(frozen=True)
class Machine:
    cores: int
    ram_gb: float | None
    gpus: tuple[Gpu, ...] = ()
    gpu_probe: str = ""  # how the GPUs were looked for, for messages

    def describe(self) -> str:
        ram = f"{self.ram_gb:.0f} GB RAM" if self.ram_gb is not None else "unknown RAM"
        if self.gpus:
            gpus = ", ".join(f"{g.name} ({g.memory_gb:.0f} GB)" if g.memory_gb else g.name for g in self.gpus)
        else:
            gpus = f"no NVIDIA GPU ({self.gpu_probe})" if self.gpu_probe else "no NVIDIA GPU"
        return f"{self.cores} CPU cores, {ram}, {gpus}"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _ram_gb() -> float | None:
    """The machine's memory, or its memory cgroup's limit where that is smaller (a container)."""
    box = cgroup_memory()
    try:
        import psutil

        total = psutil.virtual_memory().total
    except Exception:  # noqa: BLE001
        return box.limit / 1e9 if box else None
    return min(total, box.limit) / 1e9 if box else total / 1e9


def _probe_gpus() -> tuple[tuple[Gpu, ...], str]:
    """NVIDIA GPUs via nvidia-smi (name + memory), else /proc/driver/nvidia/gpus (names only)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=15, check=False,
            )
            gpus = []
            if out.returncode == 0:
                for line in out.stdout.splitlines():
                    name, _, mem = line.rpartition(",")
                    if name.strip():
                        try:
                            gpus.append(Gpu(name.strip(), float(mem) / 1024))
                        except ValueError:
                            gpus.append(Gpu(name.strip(), None))
            if not gpus:  # older drivers: `nvidia-smi -L` still lists them
                listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=15, check=False)
                for line in listed.stdout.splitlines():
                    m = re.match(r"GPU \d+: (.+?)(?: \(UUID.*)?$", line.strip())
                    if m:
                        gpus.append(Gpu(m.group(1), None))
            if gpus:
                return tuple(gpus), "nvidia-smi"
            return (), f"nvidia-smi found none (exit {out.returncode})"
        except (OSError, subprocess.SubprocessError) as exc:
            return (), f"nvidia-smi failed: {exc}"
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        gpus = []
        for info in sorted(proc.glob("*/information")):
            try:
                m = re.search(r"^Model:\s*(.+)$", info.read_text(), re.M)
            except OSError:
                continue
            gpus.append(Gpu(m.group(1).strip() if m else "NVIDIA GPU", None))
        if gpus:
            return tuple(gpus), "/proc/driver/nvidia/gpus"
    return (), "no nvidia-smi, no /proc/driver/nvidia/gpus"


def machine_info() -> Machine:
    """Cores, RAM and NVIDIA GPUs of this machine (no torch needed)."""
    gpus, probe = _probe_gpus()
    return Machine(cores=_cores(), ram_gb=_ram_gb(), gpus=gpus, gpu_probe=probe)


_BIG_GPU_NAMES = re.compile(r"A100|H100|H200|H800|A800|B100|B200|GH200|A6000|L40|A40\b|RTX 6000", re.I)


def detect_profile(machine: Machine | None = None) -> tuple[Profile, str]:
    """The shipped profile that fits this machine, and why (what was seen)."""
    machine = machine or machine_info()
    seen = f"saw {machine.describe()}"
    if machine.gpus:
        gpu = max(machine.gpus, key=lambda g: g.memory_gb or 0)
        if gpu.memory_gb is not None:
            big = gpu.memory_gb >= BIG_GPU_GB
            why = f"{gpu.name} has {gpu.memory_gb:.0f} GB ({'>=' if big else '<'} {BIG_GPU_GB} GB)"
        else:
            big = bool(_BIG_GPU_NAMES.search(gpu.name))
            why = f"{gpu.name} ({'a' if big else 'not a'} {BIG_GPU_GB}+ GB model by name; memory unknown)"
        name = "a100" if big else "t4"
        return load_profile(name), f"{seen}: {why}, so {name}"
    return load_profile("cpu16"), f"{seen}: no GPU, so cpu16 (threads clamp to the {machine.cores} cores here)"


def resolve_for_machine(profile: Profile, machine: Machine | None = None) -> tuple[Profile, list[str]]:
    """Adapt ``profile`` to this machine: concrete thread count, GPU check. Returns (profile, notes)."""
    machine = machine or machine_info()
    notes: list[str] = []
    if profile.device == "cuda" and not machine.gpus:
        raise XpackError(
            f"profile {profile.name} needs a CUDA GPU but none was found ({machine.gpu_probe}); use --profile cpu16"
        )
    threads = profile.threads
    if threads == 0:
        threads = machine.cores
    elif threads > machine.cores:
        notes.append(
            f"{profile.name} asks for {profile.threads} threads; this machine has {machine.cores} cores: using {machine.cores}"
        )
        threads = machine.cores
    budget = profile.memory_budget_gb
    if budget:
        if profile.device == "cuda":
            mem = max((g.memory_gb or 0) for g in machine.gpus)
            if mem and mem < budget:
                notes.append(f"{profile.name} budgets {budget:g} GB of GPU memory; the GPU here has {mem:.0f} GB")
        elif machine.ram_gb is not None and machine.ram_gb < budget:
            notes.append(f"{profile.name} budgets {budget:g} GB of memory; this machine has {machine.ram_gb:.0f} GB")
    return dataclasses.replace(profile, threads=threads), notes
