"""Is an artifact what was written? Every file against the sha256 its manifest.json holds (issue #14).

``xpack check`` hashes every file, always. Loading (run, verify, export of a folder with a manifest) checks too,
but a multi-GB GGUF must not cost a full read at every start: a file whose hash matched once gets a stamp in
xpack's cache, keyed on the file's device and inode and holding its size, mtime and ctime (ns). While all of
those are unchanged the file is taken as checked; any write, truncation, copy or replacement changes one of
them (ctime cannot be set back by a user), so the next load hashes it again. ``--no-check`` skips the check.

hashlib.sha256 is OpenSSL's (SHA-NI where the CPU has it) and releases the GIL, so files hash in parallel
threads; reading into one reused buffer keeps the memory flat whatever the file size.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from xpack.errors import XpackError
from xpack.paths import cache_home
from xpack.runtimes.artifacts import CARD_FILE, MANIFEST_FILE, MODELFILE, read_manifest

# What no runtime reads: the card and the ollama Modelfile, which users edit before publishing. `xpack check`
# covers them; the check at load does not refuse an artifact for an edited card.
NOT_LOADED = (CARD_FILE, MODELFILE)
READ_BYTES = 8 << 20  # per read: large enough that syscalls cost nothing beside hashing


@dataclass
class CheckReport:
    folder: Path
    files: int = 0
    bytes: int = 0
    hashed_bytes: int = 0  # bytes read and hashed (the rest was taken from stamps)
    seconds: float = 0.0
    bad: list[str] = field(default_factory=list)  # "name: why", in manifest order

    @property
    def ok(self) -> bool:
        return not self.bad

    @property
    def mb_per_s(self) -> float:
        return self.hashed_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"artifact": str(self.folder), "ok": self.ok, "files": self.files, "bytes": self.bytes,
                "hashed_bytes": self.hashed_bytes, "seconds": round(self.seconds, 3), "mb_per_s": round(self.mb_per_s, 1),
                "bad": self.bad}


def manifest_files(folder: Path) -> dict[str, dict]:
    """``files`` of ``folder``'s manifest.json: {relative name: {"bytes", "sha256"}} ({} without a manifest)."""
    files = read_manifest(folder).get("files")
    if not isinstance(files, dict):
        return {}
    return {name: entry for name, entry in files.items() if isinstance(entry, dict) and isinstance(entry.get("sha256"), str)}


def artifact_folder(path: Path) -> Path | None:
    """The folder whose manifest lists ``path`` (the folder itself, or a file's folder); None without one."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / MANIFEST_FILE).is_file():
        return None
    if path.is_file() and path.name not in manifest_files(folder):
        return None
    return folder


def sha256_of(path: Path, progress=None) -> str:
    digest = hashlib.sha256()
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            if progress is not None:
                progress.update(n)
    return digest.hexdigest()


def _stamp_path(st: os.stat_result) -> Path:
    return cache_home() / "verified" / f"{st.st_dev}-{st.st_ino}.json"


def _stat_key(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def stamped_sha256(path: Path) -> str | None:
    """The sha256 a stamp holds for ``path`` while the file is unchanged since it was hashed; else None."""
    try:
        st = os.stat(path)
        stamp = json.loads(_stamp_path(st).read_text())
    except (OSError, ValueError):
        return None
    return stamp.get("sha256") if stamp.get("stat") == _stat_key(st) else None


def write_stamp(path: Path, sha256: str) -> None:
    """Remember that ``path``, as it is now, hashes to ``sha256``; a cache that cannot be written is skipped."""
    try:
        st = os.stat(path)
        target = _stamp_path(st)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"path": str(Path(path).resolve()), "stat": _stat_key(st), "sha256": sha256}))
        os.replace(tmp, target)
    except OSError:
        pass


def check_files(folder: Path, names: list[str] | None = None, use_stamps: bool = False, progress: bool = True) -> CheckReport:
    """Hash ``names`` (default: every file the manifest lists) and compare with the manifest."""
    folder = Path(folder)
    listed = manifest_files(folder)
    names = list(listed) if names is None else [n for n in names if n in listed]
    report = CheckReport(folder, files=len(names))
    todo = []
    for name in names:
        path, want = folder / name, listed[name]
        if not path.is_file():
            report.bad.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        report.bytes += size
        if isinstance(want.get("bytes"), int) and size != want["bytes"]:
            report.bad.append(f"{name}: {size} bytes, the manifest says {want['bytes']}")
        elif not (use_stamps and stamped_sha256(path) == want["sha256"]):
            todo.append(name)
    report.hashed_bytes = sum((folder / n).stat().st_size for n in todo)
    start = time.perf_counter()
    if todo:
        from tqdm.auto import tqdm

        with tqdm(total=report.hashed_bytes, unit="B", unit_scale=True, desc=f"checking {folder.name}", file=sys.stderr,
                  disable=not progress or None, leave=False) as bar, ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1)) as pool:
            hashes = dict(zip(todo, pool.map(lambda n: sha256_of(folder / n, bar), todo)))
        for name in todo:
            if hashes[name] == listed[name]["sha256"]:
                write_stamp(folder / name, hashes[name])
            else:
                report.bad.append(f"{name}: sha256 {hashes[name][:12]}… differs from the manifest's {listed[name]['sha256'][:12]}…")
    report.seconds = time.perf_counter() - start
    order = {n: i for i, n in enumerate(names)}
    report.bad.sort(key=lambda line: order.get(line.split(":", 1)[0], 0))
    return report


def require_intact(path: Path, what: str = "this artifact") -> CheckReport | None:
    """Before a runtime or an export reads ``path``: the files it may read against its manifest (stamps make a
    repeat free; the card and Modelfile are not among them).
    One line naming the first bad file; None when there is no manifest to check against."""
    folder = artifact_folder(Path(path))
    if folder is None:
        return None
    names = [Path(path).name] if Path(path).is_file() else [n for n in manifest_files(folder) if n not in NOT_LOADED]
    report = check_files(folder, names, use_stamps=True)
    if not report.ok:
        raise XpackError(
            f"{folder}/{report.bad[0]}; {what} is damaged or was changed after it was written: re-export or re-copy it "
            f"(`xpack check {folder}` lists every bad file; --no-check skips this check)"
        )
    return report
