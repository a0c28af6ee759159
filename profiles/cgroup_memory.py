"""The memory a container gives this process: its memory cgroup's limit and headroom (cgroup v2 or v1).

Why not psutil alone: psutil reads /proc/meminfo, which shows the host's memory inside a container (docker
``--memory 8g``, a Kubernetes limit, a systemd slice); a job sized from it is killed by the cgroup's OOM killer
halfway through instead of being told before it starts (issue #12). psutil has no cgroup reader.

Every cgroup from this process's up to the root counts: the tightest limit holds. Headroom at a level is its limit
less what it uses that the kernel cannot drop (usage less inactive file pages, as ``docker stats`` and the kubelet
count a container's working set).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CgroupMemory", "cgroup_memory"]

# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit number; anything above this is no limit
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class CgroupMemory:
    limit: int  # bytes, the tightest limit on the way to the root
    available: int  # bytes the tightest level can still give (limit - working set), at least 0
    path: str  # the cgroup whose headroom is the smallest, for messages


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _own_path(proc_cgroup: str, v2: bool) -> str | None:
    """This process's cgroup path from /proc/self/cgroup: v2's ``0::/path``, v1's ``N:...memory...:/path``."""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if v2 and parts[0] == "0" and parts[1] == "":
            return parts[2]
        if not v2 and "memory" in parts[1].split(","):
            return parts[2]
    return None


def _levels(mount: Path, own: str) -> list[Path]:
    """The cgroup directories from this process's up to the mount's root."""
    parts = [p for p in own.strip("/").split("/") if p]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_memory(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: str | None = None) -> CgroupMemory | None:
    """The memory cgroup limit on this process and what is left under it; None where there is none (or no cgroupfs)."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    v1 = root / "memory"
    if (v1 / "memory.limit_in_bytes").is_file():
        mount, v2 = v1, False
        files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    elif (root / "cgroup.controllers").is_file():
        mount, v2 = root, True
        files = ("memory.max", "memory.current", "inactive_file")
    else:
        return None
    own = _own_path(proc_cgroup, v2)
    if own is None:
        return None
    tightest: CgroupMemory | None = None
    for level in _levels(mount, own):
        limit = _read_int(level / files[0])
        if limit is None:
            continue
        used = (_read_int(level / files[1]) or 0) - _stat(level / "memory.stat", files[2])
        available = max(limit - max(used, 0), 0)
        if tightest is None or available < tightest.available:
            tightest = CgroupMemory(limit=min(limit, tightest.limit) if tightest else limit, available=available, path=str(level))
        elif limit < tightest.limit:
            tightest = CgroupMemory(limit=limit, available=tightest.available, path=tightest.path)
    return tightest
